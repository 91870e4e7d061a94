//! What wakes the supervisor of a spliced flow.
//!
//! Every skb the verdict redirects still ends in the socket's `data_ready`,
//! which wakes whoever polls the socket for readability, although nothing is
//! left to read: on a bulk flow that is tens of thousands of wake-ups a
//! second, and a fifth of a CPU spent finding nothing (measured). So a
//! spliced socket is watched for readability only while it has bytes for
//! user space. The rest of the time the supervisor waits for what a
//! redirect never produces:
//! - hang-up and error (`EPOLLRDHUP`, `EPOLLHUP`, `EPOLLERR`), for the FIN
//!   and RST it forwards;
//! - a record in the verdict's `WAKE` ring buffer, where it writes a socket's
//!   slot when that socket starts passing bytes (see
//!   [`gateway_common::SockSlot::notified`]).
//!
//! One thread waits for both in one epoll set (the ring and every watched
//! socket, edge-triggered, keyed by slot) and wakes the flow that owns the
//! slot. A flow thus holds no descriptor beyond its two sockets (it had an
//! epoll set of its own, a third: 6,000 held WebSockets took 18,000 of the
//! 20,000 a process may open here) and no timer beyond its idle deadline.
//! When one read of the ring finds it nearly full, records may have been
//! lost, and every flow re-checks. A pass found at a flow's periodic check
//! with no record read for it is still counted (`kernel_late_wakeups` in
//! `gateway status`).
//! The dispatcher is a thread of its own: as a task, behind 200 busy flows,
//! it ran late enough that up to 46 of about 380 passes were found that way;
//! as a thread, none in ten runs.
use crate::util::sync::Locked;
use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{
            AtomicBool, AtomicU64,
            Ordering::{Relaxed, SeqCst},
        },
        Arc, Mutex, OnceLock,
    },
};

use aya::maps::{Map, MapData, RingBuf};
use gateway_common::WAKE_RING_BYTES;
use tokio::sync::Notify;

enum Ring {
    /// Not read yet (a predecessor still reads it: hot upgrade). The reader
    /// is made only when reading starts, since it keeps the consumer
    /// position it finds when made.
    Held(MapData),
    Reading(RingBuf<MapData>),
    /// Another daemon's now, or reading failed.
    Gone,
}

pub struct Wakeups {
    epoll: OwnedFd,
    ring: Mutex<Ring>,
    /// This daemon reads the ring: while it does not, supervisors watch
    /// their sockets' readability instead of waiting for a record.
    reading: AtomicBool,
    /// The flow supervisor waiting on each watched slot.
    waiters: Mutex<HashMap<u32, Arc<Waiter>>>,
    started: OnceLock<()>,
    /// WAKE records read, and passes a supervisor found at its periodic
    /// check with no wake-up come for it: `gateway status` shows both.
    pub delivered: AtomicU64,
    pub late: AtomicU64,
    /// Reads of the ring that found it nearly full (every flow re-checked).
    pub overflows: AtomicU64,
    /// The dispatcher stopped: hang-ups are found by polling.
    hangups_lost: AtomicBool,
}

struct Waiter {
    notify: Notify,
    /// A wake-up came since the supervisor last took one.
    arrived: AtomicBool,
}

impl Waiter {
    fn wake(&self) {
        self.arrived.store(true, SeqCst);
        self.notify.notify_one();
    }
}

/// A flow's registration; dropping it stops the watch.
pub struct Watch {
    wakeups: Arc<Wakeups>,
    slots: [u32; 2],
    waiter: Arc<Waiter>,
    /// The sockets in the dispatcher's set (taken out on drop).
    fds: Vec<RawFd>,
}

/// The dispatcher's token for the ring; a socket's is its slot + 1.
const RING_TOKEN: u64 = 0;

/// One record in the ring: an 8-byte header and the 4-byte slot, padded to 8.
const RECORD_BYTES: usize = 16;

fn new_epoll() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd it returns is ours alone.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn epoll_ctl(epoll: &OwnedFd, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: plain syscall on descriptors we hold; `ev` outlives the call.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Wakeups {
    /// Reads `ring` once [`Wakeups::read_ring`] is called: a daemon that
    /// adopts its predecessor's ring must not read it alongside.
    pub fn new(ring: MapData) -> io::Result<Arc<Self>> {
        let epoll = new_epoll()?;
        Ok(Arc::new(Self {
            epoll,
            ring: Mutex::new(Ring::Held(ring)),
            reading: AtomicBool::new(false),
            waiters: Mutex::new(HashMap::new()),
            started: OnceLock::new(),
            delivered: AtomicU64::new(0),
            late: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
            hangups_lost: AtomicBool::new(false),
        }))
    }

    /// Starts reading the ring (what it already holds is read at once).
    pub fn read_ring(&self) -> io::Result<()> {
        let mut ring = self.ring.locked();
        let data = match std::mem::replace(&mut *ring, Ring::Gone) {
            Ring::Held(data) => data,
            other => {
                *ring = other;
                return Ok(());
            }
        };
        let reader = RingBuf::try_from(Map::RingBuf(data)).map_err(io::Error::other)?;
        epoll_ctl(
            &self.epoll,
            libc::EPOLL_CTL_ADD,
            reader.as_raw_fd(),
            (libc::EPOLLIN | libc::EPOLLET) as u32,
            RING_TOKEN,
        )?;
        *ring = Ring::Reading(reader);
        self.reading.store(true, SeqCst);
        drop(ring);
        self.wake_all();
        Ok(())
    }

    /// Whether this daemon reads the verdict's wake-ups.
    pub fn reading(&self) -> bool {
        self.reading.load(SeqCst)
    }

    /// Stops reading the ring: from now on it is the next daemon's (a hot
    /// upgrade). Flows that stay here go back to watching readability.
    pub fn seal(&self) {
        let old = std::mem::replace(&mut *self.ring.locked(), Ring::Gone);
        self.stop_reading();
        if let Ring::Reading(reader) = old {
            let _ = epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, reader.as_raw_fd(), 0, 0);
        }
    }

    fn stop_reading(&self) {
        self.reading.store(false, SeqCst);
        self.wake_all();
    }

    /// Every supervisor re-checks what to watch.
    fn wake_all(&self) {
        let waiters: Vec<_> = self.waiters.locked().values().cloned().collect();
        for w in waiters {
            w.wake();
        }
    }

    /// Watches a flow's two sockets (with their slots) for hang-ups, errors
    /// and the verdict's wake-ups.
    pub fn watch(self: &Arc<Self>, slots: [u32; 2], fds: [RawFd; 2]) -> io::Result<Watch> {
        self.started.get_or_init(|| {
            let me = Arc::clone(self);
            if let Err(e) = std::thread::Builder::new().name("gateway-wake".into()).spawn(move || me.dispatch()) {
                tracing::error!("cannot start the wake-up thread: {e}; spliced sockets are watched for readability");
                self.hangups_lost.store(true, SeqCst);
                self.stop_reading();
            }
        });
        let waiter = Arc::new(Waiter { notify: Notify::new(), arrived: AtomicBool::new(false) });
        {
            let mut waiters = self.waiters.locked();
            for s in slots {
                waiters.insert(s, Arc::clone(&waiter));
            }
        }
        // Dropping the watch (as on an error below) unregisters the waiter
        // and the sockets added so far.
        let mut watch = Watch { wakeups: Arc::clone(self), slots, waiter, fds: Vec::with_capacity(2) };
        for (fd, slot) in fds.into_iter().zip(slots) {
            // Edge-triggered: one event per hang-up or error, never one per skb.
            let events = (libc::EPOLLRDHUP | libc::EPOLLET) as u32;
            epoll_ctl(&self.epoll, libc::EPOLL_CTL_ADD, fd, events, u64::from(slot) + 1)?;
            watch.fds.push(fd);
        }
        Ok(watch)
    }

    /// The dispatcher's thread: it blocks in epoll_wait, so a wake-up
    /// reaches its flow however busy the runtime is (a task in the runtime
    /// waited behind hundreds of busy flows, up to a second).
    fn dispatch(&self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        let mut slots = Vec::new();
        loop {
            // SAFETY: `events` has room for the number asked for.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("epoll_wait on the WAKE ring: {e}; spliced sockets are watched for readability");
                    // Hang-ups are no longer dispatched: every flow polls.
                    self.hangups_lost.store(true, SeqCst);
                    self.stop_reading();
                    return;
                }
                continue;
            }
            slots.clear();
            let mut ring_ready = false;
            for ev in &events[..n as usize] {
                match ev.u64 {
                    RING_TOKEN => ring_ready = true,
                    token => slots.push((token - 1) as u32),
                }
            }
            // The ring is read to its end at every turn.
            let mut records = 0;
            if ring_ready {
                if let Ring::Reading(reader) = &mut *self.ring.locked() {
                    while let Some(item) = reader.next() {
                        if let Ok(b) = <[u8; 4]>::try_from(&item[..item.len().min(4)]) {
                            records += 1;
                            slots.push(u32::from_ne_bytes(b));
                        }
                    }
                }
                self.delivered.fetch_add(records as u64, Relaxed);
            }
            // Nearly full: the verdict may have found no room for a record
            // (it tries again at that socket's next pass, which may not come).
            if (records + 1) * RECORD_BYTES >= WAKE_RING_BYTES as usize {
                self.overflows.fetch_add(1, Relaxed);
                self.wake_all();
                continue;
            }
            let waiters = self.waiters.locked();
            for s in &slots {
                if let Some(w) = waiters.get(s) {
                    w.wake();
                }
            }
        }
    }
}

impl Watch {
    /// Resolves at the next hang-up, error or wake-up of either socket (or
    /// at once, if one came since the last call).
    pub async fn woken(&self) {
        self.waiter.notify.notified().await;
        self.waiter.arrived.store(false, SeqCst);
    }

    /// Whether hang-ups still reach [`Watch::woken`]; if not, the flow's
    /// periodic check must find them.
    pub fn dispatched(&self) -> bool {
        !self.wakeups.hangups_lost.load(SeqCst)
    }

    /// A wake-up came that [`Watch::woken`] has not yet taken.
    pub fn arrived(&self) -> bool {
        self.waiter.arrived.load(SeqCst)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        for fd in &self.fds {
            let _ = epoll_ctl(&self.wakeups.epoll, libc::EPOLL_CTL_DEL, *fd, 0, 0);
        }
        let mut waiters = self.wakeups.waiters.locked();
        for s in self.slots {
            if waiters.get(&s).is_some_and(|w| Arc::ptr_eq(w, &self.waiter)) {
                waiters.remove(&s);
            }
        }
    }
}
