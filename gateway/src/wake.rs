//! What wakes the supervisor of a spliced flow.
//!
//! Every skb the verdict redirects still ends in the socket's `data_ready`,
//! which wakes whoever polls the socket for readability, although nothing is
//! left to read: on a bulk flow that is tens of thousands of wake-ups a
//! second, and a fifth of a CPU spent finding nothing (measured). So a
//! spliced socket is watched for readability only while it has bytes for
//! user space. The rest of the time, one epoll set of the daemon's own
//! watches it for what a redirect never produces:
//! - hang-up and error (`EPOLLRDHUP`, `EPOLLHUP`, `EPOLLERR`), for the FIN
//!   and RST the supervisor forwards;
//! - the verdict's `WAKE` ring buffer, where it writes a socket's slot when
//!   that socket starts passing bytes (see [`gateway_common::SockSlot::notified`]).
//!
//! One task drains that set and wakes the flow that owns the slot.
use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{Arc, Mutex, OnceLock},
};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::Notify};

/// The epoll token of the ring buffer (slots are `u32`s).
const RING: u64 = u64::MAX;

pub struct Wakeups {
    epoll: OwnedFd,
    /// `None` once the ring belongs to a newer daemon (hot upgrade).
    ring: Mutex<Option<RingBuf<MapData>>>,
    /// The ring is in the epoll set (locked after `ring`).
    reading: Mutex<bool>,
    /// The flow supervisor waiting on each watched slot.
    waiters: Mutex<HashMap<u32, Arc<Notify>>>,
    started: OnceLock<()>,
}

/// A flow's registration; dropping it stops the watch.
pub struct Watch {
    wakeups: Arc<Wakeups>,
    slots: [u32; 2],
    fds: [RawFd; 2],
    notify: Arc<Notify>,
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
    pub fn new(ring: RingBuf<MapData>) -> io::Result<Arc<Self>> {
        // SAFETY: plain syscall; the fd it returns is ours alone.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Arc::new(Self {
            epoll,
            ring: Mutex::new(Some(ring)),
            reading: Mutex::new(false),
            waiters: Mutex::new(HashMap::new()),
            started: OnceLock::new(),
        }))
    }

    /// Starts reading the ring (what it already holds is read at once).
    pub fn read_ring(&self) -> io::Result<()> {
        let ring = self.ring.lock().unwrap();
        let mut reading = self.reading.lock().unwrap();
        if let (Some(ring), false) = (ring.as_ref(), *reading) {
            epoll_ctl(
                &self.epoll,
                libc::EPOLL_CTL_ADD,
                ring.as_raw_fd(),
                (libc::EPOLLIN | libc::EPOLLET) as u32,
                RING,
            )?;
            *reading = true;
        }
        Ok(())
    }

    /// Watches a flow's two sockets (with their slots) for hang-ups, errors
    /// and the verdict's wake-ups. Call from within the runtime.
    pub fn watch(self: &Arc<Self>, slots: [u32; 2], fds: [RawFd; 2]) -> io::Result<Watch> {
        self.started.get_or_init(|| {
            tokio::spawn(Arc::clone(self).dispatch());
        });
        let notify = Arc::new(Notify::new());
        {
            let mut waiters = self.waiters.lock().unwrap();
            for s in slots {
                waiters.insert(s, Arc::clone(&notify));
            }
        }
        let mut watch = Watch { wakeups: Arc::clone(self), slots, fds: [-1, -1], notify };
        for (i, (fd, slot)) in fds.into_iter().zip(slots).enumerate() {
            // Edge-triggered: one event per hang-up or error, never one per skb.
            epoll_ctl(&self.epoll, libc::EPOLL_CTL_ADD, fd, (libc::EPOLLRDHUP | libc::EPOLLET) as u32, slot.into())?;
            watch.fds[i] = fd;
        }
        Ok(watch)
    }

    /// Stops reading the ring: from now on it is the next daemon's (a hot
    /// upgrade). Flows that stay here notice passes at their periodic check.
    pub fn seal(&self) {
        let ring = self.ring.lock().unwrap().take();
        if let (Some(ring), true) = (ring, std::mem::take(&mut *self.reading.lock().unwrap())) {
            let _ = epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, ring.as_raw_fd(), 0, 0);
        }
    }

    async fn dispatch(self: Arc<Self>) {
        // SAFETY: `self` (so the epoll set) outlives this registration.
        let epoll = match unsafe { AsyncFd::register(Set(self.epoll.as_raw_fd())) }.map_err(|e| e.into_parts().1) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(
                    "cannot watch spliced sockets for wake-ups: {e}; flows notice them at their periodic check"
                );
                return;
            }
        };
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            let Ok(mut guard) = epoll.readable().await else { return };
            // SAFETY: `events` has room for its length; timeout 0 never blocks.
            let n = unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("epoll_wait on spliced sockets: {e}");
                    return;
                }
                continue;
            }
            if (n as usize) < events.len() {
                guard.clear_ready();
            }
            let waiters = self.waiters.lock().unwrap();
            let wake = |slot: u32| {
                if let Some(n) = waiters.get(&slot) {
                    n.notify_one();
                }
            };
            for ev in &events[..n as usize] {
                if ev.u64 != RING {
                    wake(ev.u64 as u32);
                    continue;
                }
                if let Some(ring) = self.ring.lock().unwrap().as_mut() {
                    while let Some(item) = ring.next() {
                        if let Ok(b) = <[u8; 4]>::try_from(&item[..item.len().min(4)]) {
                            wake(u32::from_ne_bytes(b));
                        }
                    }
                }
            }
        }
    }
}

/// The epoll set's descriptor, registered with the runtime without owning it.
struct Set(RawFd);

impl AsRawFd for Set {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl Watch {
    /// Resolves at the next hang-up, error or wake-up of either socket (or
    /// at once, if one came since the last call).
    pub async fn woken(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        for fd in self.fds {
            if fd >= 0 {
                let _ = epoll_ctl(&self.wakeups.epoll, libc::EPOLL_CTL_DEL, fd, 0, 0);
            }
        }
        let mut waiters = self.wakeups.waiters.lock().unwrap();
        for s in self.slots {
            if waiters.get(&s).is_some_and(|n| Arc::ptr_eq(n, &self.notify)) {
                waiters.remove(&s);
            }
        }
    }
}
