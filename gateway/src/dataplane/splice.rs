//! Supervises a flow spliced in the kernel.
//!
//! The verdict moves the payload; this task only handles what the verdict
//! does not:
//! - bytes that arrived before the splice (one read per socket makes the
//!   kernel run the verdict on them) and bytes passed to user space while the
//!   flow was being enabled (copied here, before any redirect, so order holds);
//! - FIN: the redirect does not carry it, so when a side reaches EOF the FIN is
//!   sent to the peer once every byte before it is in the peer's send queue;
//! - RST and errors: the peer is reset;
//! - `idle_timeout`, from the verdict's last-byte timestamps.
//!
//! While the verdict redirects, nothing here watches the sockets'
//! readability (each redirected skb would wake it): [`crate::kernel::wake`] wakes the
//! supervisor on a hang-up, an error, or the verdict's first pass. A socket
//! is watched for readability only while it has bytes for user space.
use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    time::Duration,
};

use std::io::Write;

use tokio::io::unix::AsyncFd;

/// A spliced socket (non-blocking). It is not registered with the runtime
/// except while its [`Supervisor`] reads bytes passed to user space from it.
pub struct Sock(std::net::TcpStream);

impl Sock {
    /// Takes a connected socket out of the runtime's registration.
    pub fn from_tokio(s: tokio::net::TcpStream) -> io::Result<Sock> {
        Ok(Sock(s.into_std()?))
    }

    /// The same for a socket not yet known to the runtime (a hot upgrade's).
    pub fn from_std(s: std::net::TcpStream) -> io::Result<Sock> {
        s.set_nonblocking(true)?;
        Ok(Sock(s))
    }

    pub fn get_ref(&self) -> &std::net::TcpStream {
        &self.0
    }

    pub fn into_inner(self) -> std::net::TcpStream {
        self.0
    }
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A [`Sock`]'s descriptor, registered for readability while it passes
/// bytes. It does not own the descriptor: dropping it only deregisters.
struct Readable(RawFd);

impl AsRawFd for Readable {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl Readable {
    fn register(sock: &Sock) -> io::Result<AsyncFd<Readable>> {
        // SAFETY: the socket outlives this registration, which the
        // `Supervisor` holds and drops with itself, before `run` returns.
        unsafe { AsyncFd::register_with_interest(Readable(sock.as_raw_fd()), tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
    }
}

use crate::{
    flow::table::{CloseCause, Flow, Side},
    kernel::sockmap::{KernelPath, Splice},
    util::sys,
};

struct End<'a> {
    side: Side,
    sock: &'a Sock,
    kernel: &'a KernelPath,
    /// Slot counting the bytes received on this socket.
    slot: u32,
    /// Read EOF on this socket.
    eof: bool,
    /// Forwarded that EOF as a FIN to the peer.
    fin_forwarded: bool,
    /// Bytes user space wrote from this socket to the peer after the splice.
    user_written: u64,
    /// The peer's "everything queued for sending" counter at the splice.
    peer_base: u64,
    /// Passed bytes read from this socket, not yet written to the peer: they
    /// wait until every byte redirected before them is in the peer's queue.
    pending: Vec<u8>,
    /// How much of `pending` has been written.
    pending_off: usize,
    /// Send buffer size set on this socket (0: the kernel's autotuning).
    sndbuf: u64,
    /// Whether the peer's receiver keeps up, as last judged (see
    /// [`grow_for_passed`]), and the sample it was judged from: when, and
    /// the peer's time limited by its receiver's window (TCP_INFO).
    peer_receiver_slow: bool,
    peer_judged: bool,
    peer_rwnd_sample: Option<(u64, u64)>,
}

impl End<'_> {
    fn new<'a>(kernel: &'a KernelPath, side: Side, sock: &'a Sock, slot: u32, peer_base: u64) -> End<'a> {
        End {
            side,
            sock,
            kernel,
            slot,
            eof: false,
            fin_forwarded: false,
            user_written: 0,
            peer_base,
            pending: Vec::new(),
            pending_off: 0,
            sndbuf: 0,
            peer_receiver_slow: true,
            peer_judged: false,
            peer_rwnd_sample: None,
        }
    }
}

enum Step {
    Continue,
    Done(CloseCause),
}

/// Sockmap queue in front of a passing socket above which the flow stops
/// redirecting in both directions.
const CONGESTED: u64 = 256 * 1024;

/// Largest chunk of passed bytes held at once per direction.
const CHUNK: usize = 256 * 1024;

/// What a supervisor hands to the next daemon with a flow (hot upgrade),
/// besides the [`Splice`]: what user space wrote into each socket's peer,
/// and the send buffers it set.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Resume {
    pub client_user_written: u64,
    pub backend_user_written: u64,
    pub client_sndbuf: u64,
    pub backend_sndbuf: u64,
}

pub enum Outcome {
    Closed(CloseCause),
    /// Handed over: stopped at a quiet moment (nothing held here, no EOF,
    /// not over a bound), the sockets untouched.
    Detached(Resume),
    /// `offload: auto` found the kernel path the worse one for this flow:
    /// the verdict now passes every byte (both slots disabled), every byte
    /// it redirected is in the peer's send queue and nothing is held here,
    /// so a user-space relay can take the sockets over (what it writes
    /// must be added to `user_fwd` before the slots are enabled again).
    ToUserspace(Resume, Demotion),
}

/// Why `offload: auto` moved a kernel flow to user space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Demotion {
    /// Over its bound in front of a receiver that does not keep up: relayed,
    /// the flow holds what a plain proxy holds, not the sockmap's queue too.
    SlowReceiver,
    /// Over its bound again and again while the receiver keeps up: the
    /// kernel's worker, which finishes each redirect on the CPU that
    /// received the bytes, falls behind the sender (measured on one host:
    /// it shares the sender's CPU and the other one idles).
    KernelBehind,
}

impl Demotion {
    pub fn fallback(self) -> crate::flow::table::Fallback {
        match self {
            Demotion::SlowReceiver => crate::flow::table::Fallback::SlowReceiver,
            Demotion::KernelBehind => crate::flow::table::Fallback::KernelBehind,
        }
    }

    pub fn code(self) -> &'static str {
        self.fallback().code()
    }

    pub fn reason(self) -> &'static str {
        match self {
            Demotion::SlowReceiver => {
                "offload: auto moved it to user space: over its queue bound in front of a receiver that does not keep up"
            }
            Demotion::KernelBehind => {
                "offload: auto moved it to user space: the kernel's redirect fell behind the sender again and again"
            }
        }
    }
}

/// The longest a flow sleeps with nothing to do, in case a wake-up was lost
/// some way the dispatcher cannot see.
const SAFETY_TICK: Duration = Duration::from_secs(60);

/// Pauses (a direction over its bound) within [`BEHIND_WINDOW`] that make
/// `offload: auto` relay a flow whose receiver keeps up.
const BEHIND_PAUSES: u64 = 2;
const BEHIND_WINDOW: Duration = Duration::from_secs(2);

/// The flow's path as its supervisor has decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The verdict redirects; a direction over its bound passes to user
    /// space by itself, and its passed bytes are forwarded here.
    Spliced,
    /// Both directions over their bounds: both slots disabled, every byte
    /// passed and relayed here until the flow has caught up.
    Congested,
    /// `offload: auto` moves the flow to user space: both slots disabled,
    /// until nothing is held here and every redirected byte is in its peer's
    /// send queue.
    Demoting(Demotion),
}

/// One direction (the bytes received on one socket) as a turn sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Seen {
    /// The verdict passes this socket's bytes to user space: over its
    /// bound, or passed bytes not forwarded yet.
    passing: bool,
    /// Every byte passed has been forwarded, and nothing is held here.
    caught_up: bool,
    /// Bytes redirected from this socket and not yet in the peer's send
    /// queue (the sockmap's queue in front of the peer).
    queued: u64,
    /// This socket's own send queue is under half the bound (read only
    /// while congested, false otherwise).
    outq_low: bool,
    /// Passed bytes read here and not yet written to the peer.
    holding: bool,
    eof: bool,
    fin_forwarded: bool,
}

impl Seen {
    /// Held passed bytes go to the peer only once every byte redirected
    /// before them is in the peer's send queue: the order holds.
    fn flush_due(&self) -> bool {
        self.holding && self.queued == 0
    }

    /// EOF goes to the peer as a FIN once every byte before it is there.
    fn fin_due(&self) -> bool {
        self.eof && !self.fin_forwarded && !self.holding && self.queued == 0
    }
}

/// Where a demotion stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Demoting {
    /// Not demoting.
    No,
    /// Bytes still held here or queued in front of a peer.
    Waiting,
    /// Nothing held, everything redirected delivered: the relay takes over.
    Ready(Demotion),
    /// A side closed meanwhile: finish here with both slots disabled.
    SideClosed,
}

impl Mode {
    /// Congestion, entered when a direction passes while the sockmap queue
    /// in front of its own socket (the other direction's) is full too, and
    /// left once both have caught up and drained. `offload: auto`'s move is
    /// judged apart, from the receivers over time.
    fn after_congestion(self, c: &Seen, b: &Seen) -> Mode {
        match self {
            Mode::Spliced if (c.passing && b.queued > CONGESTED) || (b.passing && c.queued > CONGESTED) => {
                Mode::Congested
            }
            Mode::Congested if [c, b].iter().all(|s| s.caught_up && s.queued == 0 && s.outq_low) => Mode::Spliced,
            m => m,
        }
    }

    fn demoting(self, c: &Seen, b: &Seen) -> Demoting {
        let Mode::Demoting(why) = self else { return Demoting::No };
        if c.eof || b.eof {
            Demoting::SideClosed
        } else if !c.holding && !b.holding && c.queued == 0 && b.queued == 0 {
            Demoting::Ready(why)
        } else {
            Demoting::Waiting
        }
    }

    /// A hot upgrade takes the flow at a quiet moment: on the kernel path,
    /// nothing held, no EOF, neither direction passing.
    fn detachable(self, c: &Seen, b: &Seen) -> bool {
        self == Mode::Spliced && [c, b].iter().all(|s| !s.holding && !s.eof && !s.passing)
    }
}

/// How long a turn waits for an event. Waiting on the kernel (a drain
/// before a FIN or before passed bytes) is polled with `backoff`; a flow
/// with a side at EOF checks for a later RST; one that needs polling (no
/// wake-ups from the ring, or a socket whose readability is not watched)
/// polls at `poll_tick`; otherwise everything that can happen to the flow
/// wakes it and it sleeps until its idle deadline, so that a held, idle
/// flow costs no CPU (at 2,000 held WebSockets a one-second check was the
/// daemon's whole CPU: 1.2%).
fn next_wait(
    waiting_on_drain: bool,
    backoff: Duration,
    eof: bool,
    polled: bool,
    poll_tick: Duration,
    until_idle: Duration,
) -> Duration {
    if waiting_on_drain {
        backoff
    } else if eof {
        Duration::from_millis(50).min(poll_tick)
    } else if polled {
        poll_tick
    } else {
        until_idle.clamp(Duration::from_millis(20), SAFETY_TICK)
    }
}

fn passing(s: &gateway_common::SockSlot) -> bool {
    s.paused != 0 || s.passed > s.user_fwd
}

/// Supervises one spliced flow until it ends or, once `detach` turns
/// true, until a quiet moment to hand it over: what it has seen and
/// decided so far, turn by turn. Each turn decides (`turn`), then arms the
/// wake-ups it needs (`arm`) and waits for one (`wait`).
pub struct Supervisor<'a> {
    kernel: &'a KernelPath,
    splice: &'a Splice,
    flow: &'a Flow,
    c: End<'a>,
    b: End<'a>,
    mode: Mode,
    idle: Duration,
    /// `offload: auto`: judge whether the flow is better relayed.
    auto: bool,
    detach_asked: bool,
    first_eof: Option<Side>,
    spliced_ns: u64,
    /// The periodic check, while something is found only by polling.
    poll_tick: Duration,
    backoff: Duration,
    /// Whether the last wait ended on the timer rather than on an event.
    timer_woke: bool,
    /// `offload: auto`: the pauses seen (when, how many in all).
    pauses_seen: Pauses,
    /// Hang-ups, errors and the verdict's first pass; without it, both
    /// sockets stay watched for readability, as before it existed.
    watch: Option<crate::kernel::wake::Watch>,
    /// Each socket's readability registration, while it has bytes for us.
    reads: [Option<AsyncFd<Readable>>; 2],
}

impl<'a> Supervisor<'a> {
    /// `resume` continues a handed-over or relayed flow.
    pub fn new(
        kernel: &'a KernelPath,
        splice: &'a Splice,
        (client, backend): (&'a Sock, &'a Sock),
        flow: &'a Flow,
        idle: Duration,
        resume: Option<&Resume>,
        auto: bool,
    ) -> Self {
        let mut c = End::new(kernel, Side::Client, client, splice.client_slot, splice.backend_sent_base);
        let mut b = End::new(kernel, Side::Backend, backend, splice.backend_slot, splice.client_sent_base);
        if let Some(r) = resume {
            (c.user_written, b.user_written, c.sndbuf, b.sndbuf) =
                (r.client_user_written, r.backend_user_written, r.client_sndbuf, r.backend_sndbuf);
        }
        let pauses_seen = Pauses { window: None, last: kernel.slot(c.slot).pauses + kernel.slot(b.slot).pauses };
        Supervisor {
            kernel,
            splice,
            flow,
            c,
            b,
            mode: Mode::Spliced,
            idle,
            auto,
            detach_asked: false,
            first_eof: None,
            spliced_ns: sys::monotonic_ns(),
            poll_tick: idle.min(Duration::from_secs(1)).max(Duration::from_millis(20)),
            backoff: Duration::from_millis(1),
            timer_woke: false,
            pauses_seen,
            watch: None,
            reads: [None, None],
        }
    }

    pub async fn run(mut self, mut detach: Option<tokio::sync::watch::Receiver<bool>>) -> Outcome {
        let (client, backend) = (self.c.sock, self.b.sock);
        // Bytes queued before the sockets entered the map wait until the
        // socket is read; this read makes the kernel run the verdict on them.
        for (end, peer) in [(&mut self.c, backend), (&mut self.b, client)] {
            if let (Step::Done(cause), _) = read_passed(end, peer) {
                return Outcome::Closed(cause);
            }
        }
        self.watch = match self.kernel.watch(self.splice, client.as_raw_fd(), backend.as_raw_fd()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    flow = self.flow.id,
                    "cannot watch the spliced sockets for hang-ups ({e}); polling them"
                );
                None
            }
        };
        loop {
            let progress = match self.turn() {
                Ok(progress) => progress,
                Err(outcome) => return outcome,
            };
            let (wait, unwatched) = self.arm(progress);
            if let Step::Done(cause) = self.wait(wait, unwatched, &mut detach).await {
                return Outcome::Closed(cause);
            }
        }
    }

    /// Both directions as they are now.
    fn seen(&self, bound: u64) -> [Seen; 2] {
        let (sc, sb) = (self.kernel.slot(self.c.slot), self.kernel.slot(self.b.slot));
        [self.seen_one(Side::Client, bound, passing(&sb)), self.seen_one(Side::Backend, bound, passing(&sc))]
    }

    /// One direction. `queued` costs a socket option read, and a turn of a
    /// flow with nothing to do needs none: it is read only when a decision
    /// looks at it (held bytes, an EOF to forward, congestion or a
    /// demotion, the other direction passing), and is 0 otherwise.
    fn seen_one(&self, side: Side, bound: u64, other_passing: bool) -> Seen {
        let (end, peer) = match side {
            Side::Client => (&self.c, self.b.sock),
            Side::Backend => (&self.b, self.c.sock),
        };
        let s = self.kernel.slot(end.slot);
        let needed =
            !end.pending.is_empty() || (end.eof && !end.fin_forwarded) || self.mode != Mode::Spliced || other_passing;
        Seen {
            passing: passing(&s),
            caught_up: end.pending.is_empty() && s.passed == s.user_fwd,
            queued: if needed { backlog_into(self.kernel, end, peer) } else { 0 },
            outq_low: self.mode == Mode::Congested && sys::outq(end.sock).is_ok_and(|q| q < bound / 2),
            holding: !end.pending.is_empty(),
            eof: end.eof,
            fin_forwarded: end.fin_forwarded,
        }
    }

    fn set_enabled(&self, on: bool) {
        self.kernel.set_enabled(self.c.slot, on);
        self.kernel.set_enabled(self.b.slot, on);
    }

    fn resume(&self) -> Resume {
        Resume {
            client_user_written: self.c.user_written,
            backend_user_written: self.b.user_written,
            client_sndbuf: self.c.sndbuf,
            backend_sndbuf: self.b.sndbuf,
        }
    }

    /// One turn's decisions and what they do. Whether anything moved, or
    /// how the flow ends here.
    fn turn(&mut self) -> Result<bool, Outcome> {
        let (kernel, flow) = (self.kernel, self.flow);
        let (client, backend) = (self.c.sock, self.b.sock);
        let mut progress = false;
        let (sc, sb) = (kernel.slot(self.c.slot), kernel.slot(self.b.slot));
        let bound = sc.high_water;
        // A direction over its bound passes to user space (the verdict does
        // that by itself). Its passed bytes are only charged to the socket,
        // and so close its window, when nothing waits in the sockmap queue in
        // front of that same socket; make room for that queue, and if the
        // other direction keeps it full too, stop redirecting both ways until
        // the flow has caught up.
        if passing(&sc) {
            make_room_for_passing(kernel, &mut self.c, &self.b, bound);
        }
        if passing(&sb) {
            make_room_for_passing(kernel, &mut self.b, &self.c, bound);
        }
        let mut seen = self.seen(bound);
        let mode = self.mode.after_congestion(&seen[0], &seen[1]);
        if mode != self.mode {
            self.set_enabled(mode == Mode::Spliced);
            match mode {
                Mode::Congested => tracing::debug!(
                    flow = flow.id,
                    "both directions over their bounds: relaying in user space until drained"
                ),
                _ => tracing::debug!(flow = flow.id, "caught up: back on the kernel path"),
            }
            self.mode = mode;
        }
        let mut first_eof = self.first_eof;
        for ((end, peer), seen) in [(&mut self.c, backend), (&mut self.b, client)].into_iter().zip(&mut seen) {
            if seen.flush_due() {
                if let Step::Done(cause) = flush(kernel, end, peer, flow) {
                    return Err(Outcome::Closed(cause));
                }
                // Writing them moved the peer's queue as far as the bytes
                // written: what is queued in front of it stays the same.
                seen.holding = !end.pending.is_empty();
                if seen.holding {
                    grow_for_passed(end, peer, bound);
                }
                progress = true;
            }
            if end.eof && first_eof.is_none() {
                first_eof = Some(end.side);
            }
            if seen.fin_due() {
                if let Err(e) = sys::shutdown_write(peer) {
                    return Err(Outcome::Closed(reset(client, backend, end.side, &e)));
                }
                end.fin_forwarded = true;
                seen.fin_forwarded = true;
                progress = true;
                tracing::debug!(side = %end.side, "FIN forwarded");
            }
        }
        self.first_eof = first_eof;
        if self.auto && !matches!(self.mode, Mode::Demoting(_)) && !self.detach_asked && !self.c.eof && !self.b.eof {
            if let Some(why) = judge_auto(&mut self.c, &sc, backend, &mut self.b, &sb, client, &mut self.pauses_seen) {
                self.mode = Mode::Demoting(why);
                self.set_enabled(false);
                tracing::debug!(flow = flow.id, reason = why.code(), "offload auto: moving the flow to user space");
            }
        }
        // What follows is read again after the slots were disabled: a byte
        // redirected just before must count.
        if matches!(self.mode, Mode::Demoting(_)) || self.detach_asked {
            seen = self.seen(bound);
        }
        match self.mode.demoting(&seen[0], &seen[1]) {
            // Every redirected byte in its peer's send queue, nothing held
            // here: the relay takes over (passed bytes still unread stay in
            // the sockets, in order).
            Demoting::Ready(why) => return Err(Outcome::ToUserspace(self.resume(), why)),
            // Finish in the kernel path's user-space mode (the slots stay
            // disabled).
            Demoting::SideClosed => self.mode = Mode::Congested,
            Demoting::No | Demoting::Waiting => {}
        }
        if self.detach_asked && self.mode.detachable(&seen[0], &seen[1]) {
            return Err(Outcome::Detached(self.resume()));
        }
        if self.c.fin_forwarded && self.b.fin_forwarded {
            return Err(Outcome::Closed(CloseCause::Closed { first: self.first_eof.unwrap_or(Side::Client) }));
        }
        // A socket at EOF is always readable, so it is not polled any more;
        // notice a later RST from its state instead, when the timer wakes us.
        for (end, fin_sent_into_it) in [(&self.c, self.b.fin_forwarded), (&self.b, self.c.fin_forwarded)] {
            if end.eof && self.timer_woke {
                if let Some(e) = broken(end.sock, fin_sent_into_it) {
                    return Err(Outcome::Closed(reset(client, backend, end.side, &e)));
                }
            }
        }
        if sys::monotonic_ns().saturating_sub(self.last_active()) >= self.idle.as_nanos() as u64 {
            return Err(Outcome::Closed(CloseCause::IdleTimeout));
        }
        if let Some(cause) = self.flow.ending.due() {
            return Err(Outcome::Closed(cause));
        }
        Ok(progress)
    }

    /// When a byte last moved, either way, on either path.
    fn last_active(&self) -> u64 {
        self.kernel
            .slot(self.c.slot)
            .last_ns
            .max(self.kernel.slot(self.b.slot).last_ns)
            .max(self.spliced_ns)
            .max(self.flow.user_last_ns.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Arms the wake-ups the next wait needs: a socket's readability only
    /// while the verdict passes its bytes (or has not yet told us, with a
    /// WAKE record, that it does) or some wait here; the rest of the time
    /// `watch` wakes us. Returns how long to wait, and the sockets to read
    /// at the timer (readability wanted, not watched).
    fn arm(&mut self, progress: bool) -> (Duration, [bool; 2]) {
        let kernel = self.kernel;
        let mut unwatched = [false; 2];
        let woken_by_ring = self.watch.is_some() && kernel.wakeups_reading();
        let relaying = self.mode != Mode::Spliced;
        let [c_read, b_read] = &mut self.reads;
        for (i, (end, read)) in [(&self.c, c_read), (&self.b, b_read)].into_iter().enumerate() {
            let s = kernel.slot(end.slot);
            let passes = passing(&s) || s.notified != 0;
            let want = !end.eof && (!woken_by_ring || relaying || !end.pending.is_empty() || passes);
            if passes
                && !end.eof
                && read.is_none()
                && self.timer_woke
                && woken_by_ring
                && !self.watch.as_ref().is_some_and(|w| w.arrived())
            {
                // A pass since the last turn, and no WAKE record came for it
                // (a full ring): found only now, at the periodic check.
                kernel.late_wakeup();
                tracing::debug!(flow = self.flow.id, side = %end.side, "a pass noticed at the periodic check");
            }
            if !want {
                *read = None;
            } else if read.is_none() {
                match Readable::register(end.sock) {
                    Ok(r) => *read = Some(r),
                    // The timer (polling, since it waits on a pass) reads it instead.
                    Err(e) => tracing::debug!(flow = self.flow.id, side = %end.side, "cannot watch readability: {e}"),
                }
            }
            unwatched[i] = want && read.is_none();
        }
        let waiting_on_drain = relaying
            || [&self.c, &self.b].iter().any(|e| {
                let s = kernel.slot(e.slot);
                !e.pending.is_empty() || (e.eof && !e.fin_forwarded) || passing(&s)
            });
        self.backoff =
            if progress { Duration::from_millis(1) } else { (self.backoff * 2).min(Duration::from_millis(16)) };
        let polled = !woken_by_ring
            || !self.watch.as_ref().is_some_and(crate::kernel::wake::Watch::dispatched)
            || unwatched != [false; 2];
        let until_idle = Duration::from_nanos(
            self.last_active().saturating_add(self.idle.as_nanos() as u64).saturating_sub(sys::monotonic_ns()),
        );
        // `max_duration` (or a reload's close) wakes it as idleness does.
        let until_idle = self.flow.ending.remaining().map_or(until_idle, |left| until_idle.min(left));
        let eof = self.c.eof || self.b.eof;
        (next_wait(waiting_on_drain, self.backoff, eof, polled, self.poll_tick, until_idle), unwatched)
    }

    /// Waits for the first of: a socket's passed bytes, a wake-up from the
    /// ring or a hang-up, the timer, the hot upgrade's call.
    async fn wait(
        &mut self,
        wait: Duration,
        unwatched: [bool; 2],
        detach: &mut Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Step {
        let (client, backend) = (self.c.sock, self.b.sock);
        let (c, b) = (&mut self.c, &mut self.b);
        let [c_read, b_read] = &self.reads;
        self.timer_woke = false;
        tokio::select! {
            r = readable(c_read), if !c.eof && c.pending.is_empty() => match r {
                Ok(mut guard) => {
                    let (step, drained) = read_passed(c, backend);
                    if drained {
                        guard.clear_ready();
                    }
                    step
                }
                Err(e) => Step::Done(reset(client, backend, Side::Client, &e)),
            },
            r = readable(b_read), if !b.eof && b.pending.is_empty() => match r {
                Ok(mut guard) => {
                    let (step, drained) = read_passed(b, client);
                    if drained {
                        guard.clear_ready();
                    }
                    step
                }
                Err(e) => Step::Done(reset(client, backend, Side::Backend, &e)),
            },
            // A hang-up, an error or a pass: whatever it was, a read finds it.
            () = woken(&self.watch) => read_sides([(c, backend, true), (b, client, true)]),
            () = tokio::time::sleep(wait) => {
                self.timer_woke = true;
                // A socket whose readability could not be watched is read here.
                read_sides([(c, backend, unwatched[0]), (b, client, unwatched[1])])
            }
            () = asked_to_detach(detach), if !self.detach_asked => {
                self.detach_asked = true;
                Step::Continue
            }
            // A deadline set or moved: the next turn's check sees it.
            () = self.flow.ending.changed() => Step::Continue,
        }
    }
}

/// Reads each chosen socket that is not at EOF and holds no passed bytes.
fn read_sides(sides: [(&mut End<'_>, &Sock, bool); 2]) -> Step {
    for (end, peer, chosen) in sides {
        if chosen && !end.eof && end.pending.is_empty() {
            if let (Step::Done(cause), _) = read_passed(end, peer) {
                return Step::Done(cause);
            }
        }
    }
    Step::Continue
}

/// The socket's next readability, while it is registered (never otherwise).
async fn readable(r: &Option<AsyncFd<Readable>>) -> io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, Readable>> {
    match r {
        Some(r) => r.readable().await,
        None => std::future::pending().await,
    }
}

/// The flow's next wake-up from [`crate::kernel::wake`] (never without a watch).
async fn woken(w: &Option<crate::kernel::wake::Watch>) {
    match w {
        Some(w) => w.woken().await,
        None => std::future::pending().await,
    }
}

/// Reads what the socket has for user space: EOF, an error, or a chunk of the
/// bytes the verdict passed instead of redirecting (while the flow was being
/// enabled, or while it was over its queue bound).
fn read_passed(end: &mut End<'_>, peer: &Sock) -> (Step, bool) {
    // Most calls find EOF or nothing: until a flow has passed bytes, they
    // read into the thread's scratch buffer and only bytes that came are
    // copied out, into the flow's own chunk buffer, which is then read into
    // directly and kept (a fresh 256 KiB per call was most of a short flow's
    // user time).
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(CHUNK));
    }
    debug_assert!(end.pending.is_empty());
    loop {
        let read = if end.pending.capacity() >= CHUNK {
            sys::read_spare(end.sock, &mut end.pending)
        } else {
            SCRATCH.with_borrow_mut(|buf| {
                buf.clear();
                let r = sys::read_spare(end.sock, buf);
                if matches!(r, Ok(n) if n > 0) {
                    let mut own = Vec::with_capacity(CHUNK);
                    own.extend_from_slice(buf);
                    end.pending = own;
                }
                r
            })
        };
        match read {
            Ok(0) if !all_passed_read(end) => {
                // The kernel reports EOF once the bytes it has handed over
                // are read, but bytes it passed while its own queue in
                // front of this socket held others wait in that queue until
                // its worker moves them over: they come first.
                tracing::debug!(side = %end.side, "EOF with passed bytes still in the sockmap's queue");
                return (Step::Continue, true);
            }
            Ok(0) => {
                tracing::debug!(side = %end.side, "EOF");
                end.eof = true;
                return (Step::Continue, false);
            }
            Ok(_) => return (Step::Continue, false),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (Step::Continue, true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (Step::Done(reset(end.sock, peer, end.side, &e)), false),
        }
    }
}

/// Whether every byte the verdict passed on this socket has been read: those
/// user space forwarded (`user_fwd`) and those it holds.
fn all_passed_read(end: &End<'_>) -> bool {
    let s = end.kernel.slot(end.slot);
    s.user_fwd + (end.pending.len() - end.pending_off) as u64 >= s.passed
}

/// Writes the pending passed bytes to the peer; every byte redirected before
/// them is already in the peer's send queue, so the order holds.
fn flush(kernel: &KernelPath, end: &mut End<'_>, peer: &Sock, flow: &Flow) -> Step {
    // Never wait here for the peer to take the bytes: the other direction may
    // be what it waits for. What does not fit stays pending for the next turn.
    while end.pending_off < end.pending.len() {
        match peer.get_ref().write(&end.pending[end.pending_off..]) {
            Ok(n) => {
                end.pending_off += n;
                end.user_written += n as u64;
                kernel.add_user_forwarded(end.slot, n as u64);
                flow.add_user(end.side, n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let other = if end.side == Side::Client { Side::Backend } else { Side::Client };
                return Step::Done(reset(end.sock, peer, other, &e));
            }
        }
    }
    end.pending.clear();
    end.pending_off = 0;
    Step::Continue
}

/// Bytes taken from `end` and not yet in `peer`'s send queue: the sockmap's
/// queue in front of `peer`.
fn backlog_into(kernel: &KernelPath, end: &End<'_>, peer: &Sock) -> u64 {
    let slot = kernel.slot(end.slot);
    let expected = slot.redirected + end.user_written;
    match sys::bytes_queued_total(peer) {
        Ok(total) => expected.saturating_sub(total.saturating_sub(end.peer_base)),
        // The peer is gone; nothing more can be delivered.
        Err(_) => 0,
    }
}

/// A socket that passes its bytes to user space must have an empty sockmap
/// queue in front of its own send path: the kernel queues passed bytes
/// behind that queue, uncharged, and the receive window would stay open
/// (measured: with room for only part of the queue, 640 MB piled up in 10
/// s behind it). The queue is at most the flow's bound, so growing the
/// socket's send buffer by the whole share lets the kernel move it into
/// the send queue at once. This is the one buffer that grows in front of a
/// slow receiver too: bytes in it are charged and close the window, bytes
/// behind it are not.
fn make_room_for_passing(kernel: &KernelPath, passing: &mut End<'_>, other: &End<'_>, bound: u64) {
    let stuck = backlog_into(kernel, other, passing.sock);
    if stuck == 0 {
        return;
    }
    // `bound` is the sockmap queue's, half the flow's share.
    let cap = 3 * bound + (1 << 20);
    let want = (sys::outq(passing.sock).unwrap_or(0) + stuck + (1 << 20)).min(cap);
    // Never below what the other direction's passed bytes grew it to.
    if want > passing.sndbuf && sys::sndbuf(passing.sock).map_or(true, |have| have / 2 < want) {
        passing.sndbuf = want;
        if let Err(e) = sys::set_sndbuf_force(passing.sock, want) {
            tracing::debug!(side = %passing.side, "could not grow the send buffer: {e}");
        }
    }
}

/// Passed bytes wait because the peer's send buffer is full. When the
/// peer's receiver keeps up, the buffer is what holds the flow back: under
/// steady load the passing socket's queue then never empties, so the flow
/// would never go back to the kernel, and the kernel's worker, finding the
/// buffer full, retries only a tick (4 ms here) later. Then grow the peer's
/// send buffer (within the bound, as for [`make_room_for_passing`]) so that
/// one pass can take the whole queue. When the receiver is what is slow
/// (the peer's sending was limited by its window since the last turn), a
/// bigger buffer would only hold more of the flow's bytes: leave it.
fn grow_for_passed(end: &mut End<'_>, peer: &Sock, bound: u64) {
    if judge_receiver(end, peer) {
        return;
    }
    let cap = sndbuf_cap(bound);
    let left = (end.pending.len() - end.pending_off) as u64;
    let want = (sys::outq(peer).unwrap_or(0) + left + 4 * CHUNK as u64).min(cap);
    if sys::sndbuf(peer).is_ok_and(|have| have / 2 < want) {
        if let Err(e) = sys::set_sndbuf_force(peer, want) {
            tracing::debug!(side = %end.side, "could not grow the peer's send buffer: {e}");
        }
    }
}

/// The most the supervisor grows a send buffer to, as given to
/// SO_SNDBUFFORCE (the kernel doubles it): room for the sockmap's queue in
/// front of it (the bound) and a chunk of passed bytes.
fn sndbuf_cap(bound: u64) -> u64 {
    (bound + (1 << 20)) / 2
}

/// Whether the receiver behind `peer` does not keep up: `peer`'s sending
/// was limited by its receiver's window for a quarter of the time or more,
/// judged over 20 ms at least (the kernel keeps that time in ticks, 4 ms
/// here). Until a first judgment, the receiver counts as slow.
fn judge_receiver(end: &mut End<'_>, peer: &Sock) -> bool {
    const JUDGE_NS: u64 = 20_000_000;
    let now = sys::monotonic_ns();
    let limited = sys::tcp_info(peer).map_or(0, |i| i.rwnd_limited_us);
    match end.peer_rwnd_sample {
        Some((at, before)) if now.saturating_sub(at) >= JUDGE_NS => {
            let limited_ns = limited.saturating_sub(before) * 1000;
            end.peer_receiver_slow = limited_ns * 4 >= now - at;
            end.peer_judged = true;
            end.peer_rwnd_sample = Some((now, limited));
        }
        Some(_) => {}
        None => end.peer_rwnd_sample = Some((now, limited)),
    }
    end.peer_receiver_slow
}

/// The pauses `offload: auto` has seen: the count at the last turn, and the
/// current window.
struct Pauses {
    window: Option<Window>,
    last: u64,
}

/// A window of pauses: when it started, the count before it, and how long
/// each peer's sending had been limited by its receiver's window (µs) then.
#[derive(Clone, Copy)]
struct Window {
    start: u64,
    base: u64,
    limited_us: [u64; 2],
}

/// `offload: auto`: whether this flow is better relayed in user space, and
/// why. A direction over its bound in front of a slow receiver would hold
/// the sockmap's queue on top of what a relay holds; one that goes over its
/// bound [`BEHIND_PAUSES`] times within [`BEHIND_WINDOW`] while its receiver
/// keeps up moves faster relayed (the kernel's worker is what lags). Which of
/// the two it is gets judged over the whole window at the end: one 20 ms
/// sample can fall in a moment the slow reader caught up.
fn judge_auto<'a>(
    c: &mut End<'a>,
    sc: &gateway_common::SockSlot,
    backend: &Sock,
    b: &mut End<'a>,
    sb: &gateway_common::SockSlot,
    client: &Sock,
    pauses_seen: &mut Pauses,
) -> Option<Demotion> {
    let over = |s: &gateway_common::SockSlot| s.paused != 0 || s.passed > s.user_fwd;
    for (end, s, peer) in [(c, sc, backend), (b, sb, client)] {
        if over(s) {
            let slow = judge_receiver(end, peer);
            if end.peer_judged && slow {
                return Some(Demotion::SlowReceiver);
            }
        }
    }
    let pauses = sc.pauses + sb.pauses;
    if pauses > pauses_seen.last {
        let now = sys::monotonic_ns();
        let limited = |s: &Sock| sys::tcp_info(s).map_or(0, |i| i.rwnd_limited_us);
        let limited_now = [limited(backend), limited(client)];
        let w = match pauses_seen.window {
            Some(w) if now.saturating_sub(w.start) <= BEHIND_WINDOW.as_nanos() as u64 => w,
            // A new window, from the count before these pauses.
            _ => Window { start: now, base: pauses_seen.last, limited_us: limited_now },
        };
        pauses_seen.window = Some(w);
        pauses_seen.last = pauses;
        let span_us = now.saturating_sub(w.start) / 1000;
        // Under 20 ms says nothing about the receivers: wait for the next pause.
        if pauses - w.base >= BEHIND_PAUSES && span_us >= 20_000 {
            let slow = limited_now.iter().zip(w.limited_us).any(|(n, s)| n.saturating_sub(s) * 4 >= span_us);
            return Some(if slow { Demotion::SlowReceiver } else { Demotion::KernelBehind });
        }
    }
    None
}

/// An RST sets the socket error. A socket that saw FIN both ways also ends up
/// in CLOSE (its TIME_WAIT lives on without it), which is not an error.
fn broken(sock: &Sock, fin_sent_into_it: bool) -> Option<io::Error> {
    if let Ok(Some(e)) = sys::take_error(sock) {
        return Some(e);
    }
    match sys::tcp_info(sock) {
        Ok(i) if i.state == sys::TCP_CLOSE && !fin_sent_into_it => {
            Some(io::Error::new(io::ErrorKind::ConnectionAborted, "socket closed without FIN exchange"))
        }
        _ => None,
    }
}

/// Resets both sockets (SO_LINGER 0; the close that follows sends RST).
fn reset(a: &Sock, b: &Sock, by: Side, why: &io::Error) -> CloseCause {
    tracing::debug!(side = %by, "resetting the flow: {why}");
    sys::set_linger_zero(a.as_raw_fd());
    sys::set_linger_zero(b.as_raw_fd());
    CloseCause::Reset { by }
}

/// Resolves once `detach` turns true (never without one).
pub(crate) async fn asked_to_detach(detach: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    match detach {
        Some(rx) => {
            if rx.wait_for(|d| *d).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A direction with nothing to do.
    fn calm() -> Seen {
        Seen { caught_up: true, outq_low: true, ..Default::default() }
    }

    #[test]
    fn passing_into_a_full_queue_congests_both_ways_until_both_caught_up() {
        assert_eq!(Mode::Spliced.after_congestion(&calm(), &calm()), Mode::Spliced);
        // The client's bytes pass (over their bound) while the backend's
        // redirects fill the queue in front of the client's own socket.
        let passes = Seen { passing: true, caught_up: false, ..calm() };
        let full = Seen { queued: CONGESTED + 1, ..calm() };
        assert_eq!(Mode::Spliced.after_congestion(&passes, &full), Mode::Congested);
        assert_eq!(Mode::Spliced.after_congestion(&full, &passes), Mode::Congested, "either way");
        // Either alone is the verdict's own business.
        assert_eq!(Mode::Spliced.after_congestion(&passes, &Seen { queued: CONGESTED, ..calm() }), Mode::Spliced);
        assert_eq!(Mode::Spliced.after_congestion(&calm(), &full), Mode::Spliced);
        // Back on the kernel path only with both directions caught up,
        // drained and their send queues low.
        assert_eq!(Mode::Congested.after_congestion(&calm(), &calm()), Mode::Spliced);
        for not_yet in
            [Seen { caught_up: false, ..calm() }, Seen { queued: 1, ..calm() }, Seen { outq_low: false, ..calm() }]
        {
            assert_eq!(Mode::Congested.after_congestion(&not_yet, &calm()), Mode::Congested, "{not_yet:?}");
            assert_eq!(Mode::Congested.after_congestion(&calm(), &not_yet), Mode::Congested, "{not_yet:?}");
        }
        // Congestion neither starts nor ends a demotion.
        let demoting = Mode::Demoting(Demotion::SlowReceiver);
        assert_eq!(demoting.after_congestion(&passes, &full), demoting);
        assert_eq!(demoting.after_congestion(&calm(), &calm()), demoting);
    }

    #[test]
    fn passed_bytes_and_the_fin_wait_behind_what_was_redirected() {
        let held = Seen { holding: true, queued: 10, ..Default::default() };
        assert!(!held.flush_due(), "redirected bytes before them are still queued");
        assert!(Seen { queued: 0, ..held }.flush_due());
        assert!(!Seen::default().flush_due(), "nothing held");
        let eof = Seen { eof: true, ..Default::default() };
        assert!(eof.fin_due());
        assert!(!Seen { queued: 1, ..eof }.fin_due(), "redirected bytes before it still queued");
        assert!(!Seen { holding: true, ..eof }.fin_due(), "passed bytes before it still held");
        assert!(!Seen { fin_forwarded: true, ..eof }.fin_due(), "forwarded once");
        assert!(!Seen::default().fin_due(), "no EOF");
    }

    #[test]
    fn a_demotion_hands_the_flow_over_only_with_nothing_held_or_queued() {
        let demoting = Mode::Demoting(Demotion::KernelBehind);
        let idle = Seen::default();
        assert_eq!(Mode::Spliced.demoting(&idle, &idle), Demoting::No);
        assert_eq!(Mode::Congested.demoting(&idle, &idle), Demoting::No);
        assert_eq!(demoting.demoting(&idle, &idle), Demoting::Ready(Demotion::KernelBehind));
        assert_eq!(demoting.demoting(&Seen { holding: true, ..idle }, &idle), Demoting::Waiting);
        assert_eq!(demoting.demoting(&idle, &Seen { queued: 1, ..idle }), Demoting::Waiting);
        // A side that closed meanwhile: the flow ends here.
        assert_eq!(demoting.demoting(&Seen { eof: true, ..idle }, &idle), Demoting::SideClosed);
        assert_eq!(demoting.demoting(&idle, &Seen { eof: true, holding: true, ..idle }), Demoting::SideClosed);
    }

    #[test]
    fn a_flow_detaches_only_on_the_kernel_path_and_at_rest() {
        let rest = Seen { caught_up: true, ..Default::default() };
        assert!(Mode::Spliced.detachable(&rest, &rest));
        // Redirected bytes in flight are in the maps the successor shares.
        assert!(Mode::Spliced.detachable(&Seen { queued: 5, ..rest }, &rest));
        for busy in [Seen { passing: true, ..rest }, Seen { holding: true, ..rest }, Seen { eof: true, ..rest }] {
            assert!(!Mode::Spliced.detachable(&busy, &rest), "{busy:?}");
            assert!(!Mode::Spliced.detachable(&rest, &busy), "{busy:?}");
        }
        assert!(!Mode::Congested.detachable(&rest, &rest));
        assert!(!Mode::Demoting(Demotion::SlowReceiver).detachable(&rest, &rest));
    }

    #[test]
    fn the_wait_polls_a_drain_and_sleeps_an_idle_flow_until_its_deadline() {
        let (backoff, tick) = (Duration::from_millis(4), Duration::from_secs(1));
        let far = Duration::from_secs(300);
        assert_eq!(next_wait(true, backoff, true, true, tick, far), backoff);
        assert_eq!(next_wait(false, backoff, true, true, tick, far), Duration::from_millis(50), "a side at EOF");
        assert_eq!(next_wait(false, backoff, true, false, Duration::from_millis(20), far), Duration::from_millis(20));
        assert_eq!(next_wait(false, backoff, false, true, tick, far), tick, "polled");
        assert_eq!(next_wait(false, backoff, false, false, tick, far), SAFETY_TICK);
        assert_eq!(next_wait(false, backoff, false, false, tick, Duration::from_secs(5)), Duration::from_secs(5));
        assert_eq!(next_wait(false, backoff, false, false, tick, Duration::ZERO), Duration::from_millis(20));
    }
}
