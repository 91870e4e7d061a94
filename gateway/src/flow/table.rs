//! The table of live flows and the snapshots `gateway flows` prints.
use crate::util::sync::Locked;
use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use crate::{kernel::sockmap::KernelPath, util::sys};

/// Why a flow is relayed in user space rather than spliced in the kernel.
/// Its code is what `stats`, the metrics, the flow log and `flows --json`
/// show, and what a hot upgrade carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fallback {
    /// `offload: userspace`.
    Configured,
    /// The kernel path is not loaded, or refused this flow (its reason).
    Kernel(KernelRefusal),
    /// TLS on one side or both (terminated, or originated to the backend).
    Tls,
    /// A terminated WebSocket (`inspect`, `bridge_tcp`) and plain HTTP: the
    /// daemon reads every message or request.
    WebSocketInspect,
    WebSocketBridge,
    Http,
    /// A WebSocket over HTTP/2 (RFC 8441): its bytes are DATA frames of a
    /// stream, sharing the client's connection with other streams.
    Http2Stream,
    /// Moved there by `offload: auto`.
    SlowReceiver,
    KernelBehind,
    /// The daemon read from a socket (a PROXY header, an HTTP head) and the
    /// sender kept it too busy to leave no skb half read (see `carry::settle`).
    Unsettled,
    /// Carried over from a daemon whose code this one does not know.
    Moved,
}

/// Why the kernel path did not take a flow (`kernel::Unavailable`, by kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelRefusal {
    NoObject,
    NotPrivileged,
    LoadFailed,
    MapFull,
    InsertFailed,
    ClosedBeforeHandoff,
    NoFlowControl,
    QueueCap,
    /// Not loaded, for no reason recorded.
    Unavailable,
}

const FALLBACKS: &[(Fallback, &str)] = &[
    (Fallback::Configured, "configured-userspace"),
    (Fallback::Kernel(KernelRefusal::NotPrivileged), "not-privileged"),
    (Fallback::Kernel(KernelRefusal::LoadFailed), "load-failed"),
    (Fallback::Kernel(KernelRefusal::NoObject), "no-ebpf-object"),
    (Fallback::Kernel(KernelRefusal::MapFull), "map-full"),
    (Fallback::Kernel(KernelRefusal::InsertFailed), "insert-failed"),
    (Fallback::Kernel(KernelRefusal::ClosedBeforeHandoff), "closed-before-handoff"),
    (Fallback::Kernel(KernelRefusal::NoFlowControl), "no-flow-control"),
    (Fallback::Kernel(KernelRefusal::QueueCap), "global-queue-cap"),
    (Fallback::Kernel(KernelRefusal::Unavailable), "unavailable"),
    (Fallback::Tls, "userspace-tls"),
    (Fallback::WebSocketInspect, "websocket-inspect"),
    (Fallback::WebSocketBridge, "websocket-bridge"),
    (Fallback::Http, "http"),
    (Fallback::Http2Stream, "http2-stream"),
    (Fallback::SlowReceiver, "slow-receiver"),
    (Fallback::KernelBehind, "kernel-behind"),
    (Fallback::Unsettled, "unsettled"),
    (Fallback::Moved, "moved"),
];

impl Fallback {
    pub fn code(self) -> &'static str {
        FALLBACKS.iter().find(|(f, _)| *f == self).map_or("moved", |(_, c)| c)
    }

    /// The fallback a code names; `Moved` for one this daemon does not know.
    pub fn parse(code: &str) -> Self {
        FALLBACKS.iter().find(|(_, c)| *c == code).map_or(Fallback::Moved, |(f, _)| *f)
    }

    /// Whether a flow relayed for this reason moves to a successor daemon
    /// as a plain relay (terminated WebSockets and HTTP connections move
    /// their own way, `Flow::movable`).
    pub fn moves_as_relay(self) -> bool {
        matches!(self, Fallback::Configured | Fallback::Kernel(_) | Fallback::Tls)
    }
}

impl From<&crate::kernel::sockmap::Unavailable> for KernelRefusal {
    fn from(u: &crate::kernel::sockmap::Unavailable) -> Self {
        use crate::kernel::sockmap::Unavailable as U;
        match u {
            U::NoObject => KernelRefusal::NoObject,
            U::NotPrivileged => KernelRefusal::NotPrivileged,
            U::LoadFailed(_) => KernelRefusal::LoadFailed,
            U::MapFull(_) => KernelRefusal::MapFull,
            U::InsertFailed(_) => KernelRefusal::InsertFailed,
            U::NotEstablished(_) => KernelRefusal::ClosedBeforeHandoff,
            U::NoFlowControl => KernelRefusal::NoFlowControl,
            U::QueueCap(_) => KernelRefusal::QueueCap,
        }
    }
}

/// Where a flow's bytes are moved.
#[derive(Debug, Clone)]
pub enum FlowPath {
    /// Accepted, backend not connected yet.
    Connecting,
    /// Spliced in the kernel; the slots hold its counters.
    Kernel { client_slot: u32, backend_slot: u32 },
    /// Relayed by the daemon; `reason` says why it is not in the kernel.
    Userspace { reason: String, code: Fallback },
    /// Spliced, then moved to the daemon's relay by `offload: auto` (the
    /// sockets stay in the maps, the verdict passing every byte); the slots
    /// hold what the kernel moved before.
    Relayed { client_slot: u32, backend_slot: u32, reason: String, code: Fallback },
}

/// How a flow's runner (the kernel path's supervisor, a relay, a WebSocket
/// relay) stopped: the flow closed, or it stopped at a quiet moment with
/// what it needs to go on elsewhere (a successor daemon, the other path).
pub enum Stopped<T> {
    Closed(CloseCause),
    Detached(T),
}

/// How a flow ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseCause {
    /// Both sides closed their write halves (`first` closed first).
    Closed {
        first: Side,
    },
    Reset {
        by: Side,
    },
    IdleTimeout,
    /// Its route's `max_duration` was reached.
    MaxDuration,
    /// A reload or fleet push changed or removed its route (or TCP listener),
    /// which has `on_change: close`.
    RouteChanged,
    /// Ended by the daemon's drain (inspect-mode WebSockets get close 1001).
    Shutdown,
    /// Handed to a new daemon (hot upgrade), which goes on with it.
    HandedOver,
    NoBackend,
    Rejected(String),
    Error(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Backend => "backend",
        })
    }
}

impl CloseCause {
    /// Short label for stats and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            CloseCause::Closed { first: Side::Client } => "client-closed",
            CloseCause::Closed { first: Side::Backend } => "backend-closed",
            CloseCause::Reset { by: Side::Client } => "client-reset",
            CloseCause::Reset { by: Side::Backend } => "backend-reset",
            CloseCause::IdleTimeout => "idle-timeout",
            CloseCause::MaxDuration => "max-duration",
            CloseCause::RouteChanged => "route-changed",
            CloseCause::Shutdown => "shutdown",
            CloseCause::HandedOver => "handed-over",
            CloseCause::NoBackend => "no-backend",
            CloseCause::Rejected(_) => "rejected",
            CloseCause::Error(_) => "error",
        }
    }
}

impl fmt::Display for CloseCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseCause::Closed { first } => write!(f, "{first}-closed"),
            CloseCause::Reset { by } => write!(f, "{by}-reset"),
            CloseCause::IdleTimeout => f.write_str("idle-timeout"),
            CloseCause::MaxDuration => f.write_str("max-duration"),
            CloseCause::RouteChanged => f.write_str("route-changed"),
            CloseCause::Shutdown => f.write_str("shutdown"),
            CloseCause::HandedOver => f.write_str("handed-over"),
            CloseCause::NoBackend => f.write_str("no-backend"),
            CloseCause::Rejected(why) => write!(f, "rejected: {why}"),
            CloseCause::Error(e) => write!(f, "error: {e}"),
        }
    }
}

pub struct Flow {
    pub id: u64,
    pub listener: String,
    pub client: SocketAddr,
    pub backend: Mutex<Option<SocketAddr>>,
    pub started: SystemTime,
    pub started_ns: u64,
    pub path: Mutex<FlowPath>,
    /// Bytes the daemon itself copied, each way.
    pub user_c2b: AtomicU64,
    pub user_b2c: AtomicU64,
    /// Monotonic ns of the last byte the daemon itself moved.
    pub user_last_ns: AtomicU64,
    /// Websocket listeners: the route that served the flow (`host/prefix`),
    /// how many plain HTTP requests it carried, and in inspect and bridge
    /// modes the messages relayed each way.
    pub route: Mutex<Option<String>>,
    pub http_requests: AtomicU64,
    pub msgs_c2b: AtomicU64,
    pub msgs_b2c: AtomicU64,
    /// A terminated WebSocket or an HTTP connection, which a hot upgrade
    /// moves at rest (between messages, between requests).
    pub movable: AtomicBool,
    /// Times `offload: auto` moved the flow between the kernel path and the
    /// relay, and the last move (`to-userspace: slow-receiver`, ...).
    pub path_switches: AtomicU64,
    pub last_switch: Mutex<Option<String>>,
    /// When the flow must end whatever it carries.
    pub ending: Ending,
    /// The address the client reached (the listener's, or what a PROXY
    /// header said), for `send_proxy`.
    pub dst: Mutex<Option<SocketAddr>>,
}

/// When a flow must end whatever it carries: its route's `max_duration`,
/// or a reload that changed its route (`on_change: close`). Each loop that
/// carries a flow (the kernel flow's supervisor, the relay, inspect mode)
/// waits on [`Ending::reached`] beside its sockets.
#[derive(Debug, Default)]
pub struct Ending {
    /// Monotonic ns; 0: never.
    at_ns: AtomicU64,
    /// 0: max duration, 1: route changed.
    why: AtomicU8,
    changed: tokio::sync::Notify,
}

impl Ending {
    /// Ends the flow at `at_ns` (monotonic), unless it ends earlier already.
    pub fn set(&self, at_ns: u64, why: &CloseCause) {
        use std::sync::atomic::Ordering::{Acquire, Release};
        let at_ns = at_ns.max(1);
        let current = self.at_ns.load(Acquire);
        if current != 0 && current <= at_ns {
            return;
        }
        self.why.store(u8::from(matches!(why, CloseCause::RouteChanged)), Release);
        self.at_ns.store(at_ns, Release);
        // One loop carries a flow at a time: a permit if it is not waiting
        // right now, so it sees this at its next wait.
        self.changed.notify_one();
    }

    /// Monotonic ns it ends at, if it must.
    pub fn at_ns(&self) -> Option<u64> {
        Some(self.at_ns.load(std::sync::atomic::Ordering::Acquire)).filter(|&t| t != 0)
    }

    fn cause(&self) -> CloseCause {
        match self.why.load(std::sync::atomic::Ordering::Acquire) {
            1 => CloseCause::RouteChanged,
            _ => CloseCause::MaxDuration,
        }
    }

    /// The cause, once the flow must end.
    pub fn due(&self) -> Option<CloseCause> {
        self.at_ns().filter(|&at| sys::monotonic_ns() >= at).map(|_| self.cause())
    }

    /// How long until the flow must end, if it must.
    pub fn remaining(&self) -> Option<std::time::Duration> {
        self.at_ns().map(|at| std::time::Duration::from_nanos(at.saturating_sub(sys::monotonic_ns())))
    }

    /// Resolves when the deadline is set or moved (a loop with a timer of
    /// its own waits on this, and checks [`Ending::due`] at each turn).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Resolves once the flow must end, with the cause; pending forever if
    /// it never must. Set or moved meanwhile, it wakes.
    pub async fn reached(&self) -> CloseCause {
        loop {
            if let Some(cause) = self.due() {
                return cause;
            }
            match self.remaining() {
                // Boxed: this future sits in a carried flow's task for its
                // whole life, and a timer entry is most of its size; only
                // flows with a deadline allocate one.
                Some(left) => {
                    let sleep = Box::pin(tokio::time::sleep(left));
                    tokio::select! {
                        () = self.changed.notified() => {}
                        () = sleep => {}
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }
}

impl Flow {
    pub fn add_user(&self, side: Side, n: u64) {
        match side {
            Side::Client => self.user_c2b.fetch_add(n, Relaxed),
            Side::Backend => self.user_b2c.fetch_add(n, Relaxed),
        };
        self.user_last_ns.store(sys::monotonic_ns(), Relaxed);
    }

    pub fn add_message(&self, side: Side, len: u64) {
        match side {
            Side::Client => self.msgs_c2b.fetch_add(1, Relaxed),
            Side::Backend => self.msgs_b2c.fetch_add(1, Relaxed),
        };
        self.add_user(side, len);
    }

    pub fn set_path(&self, p: FlowPath) {
        *self.path.locked() = p;
    }

    /// Moves the flow to another path (`offload: auto`), counted.
    pub fn switch_path(&self, p: FlowPath, what: String) {
        self.set_path(p);
        self.path_switches.fetch_add(1, Relaxed);
        *self.last_switch.locked() = Some(what);
    }
}

/// One row of `gateway flows`, also its JSON form.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowSnapshot {
    pub id: u64,
    pub listener: String,
    pub client: String,
    pub backend: Option<String>,
    /// `kernel`, `userspace` or `connecting`.
    pub path: String,
    /// Why the flow is not on the kernel path, when it is not.
    pub fallback_reason: Option<String>,
    pub fallback_code: Option<String>,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
    /// Of those, the bytes the kernel redirected without user space seeing them.
    pub kernel_bytes_client_to_backend: u64,
    pub kernel_bytes_backend_to_client: u64,
    /// Of those, the bytes the daemon copied itself.
    pub user_bytes_client_to_backend: u64,
    pub user_bytes_backend_to_client: u64,
    /// Retransmitted bytes the verdict cut because they had been forwarded already.
    pub trimmed_bytes: u64,
    /// Kernel flows: bytes taken from the sender and not yet acknowledged by
    /// the receiver (as of the last segment), their maximum, the bound, and
    /// how often the bound paused the direction.
    pub queued_client_to_backend: u64,
    pub queued_backend_to_client: u64,
    pub max_queued_client_to_backend: u64,
    pub max_queued_backend_to_client: u64,
    pub queue_bound: u64,
    pub pauses_client_to_backend: u64,
    pub pauses_backend_to_client: u64,
    /// Kernel flows: skbs the verdict could not redirect (the peer left the
    /// map; their bytes were dropped, and TCP does not resend them) and
    /// retransmissions it could not trim. Counted here rather than logged
    /// per skb, so a peer cannot flood the log.
    #[serde(default)]
    pub redirect_errors: u64,
    #[serde(default)]
    pub trim_errors: u64,
    pub started_at: String,
    pub last_activity_at: String,
    pub age_ms: u64,
    pub idle_ms: u64,
    /// Websocket listeners: the route (`host/prefix`) that served the flow.
    #[serde(default)]
    pub route: Option<String>,
    #[serde(default)]
    pub http_requests: u64,
    /// inspect and bridge_tcp: WebSocket messages relayed each way.
    #[serde(default)]
    pub messages_client_to_backend: u64,
    #[serde(default)]
    pub messages_backend_to_client: u64,
    /// Bytes per second each way between two samples (`gateway flows
    /// --sort rate` or `--watch`); the daemon itself leaves them out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_client_to_backend: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_backend_to_client: Option<u64>,
    /// `offload: auto`: times the flow moved between the kernel path and the
    /// relay, and the last move (`to-userspace: slow-receiver`,
    /// `to-userspace: kernel-behind`, `to-kernel: light`).
    #[serde(default)]
    pub path_switches: u64,
    #[serde(default)]
    pub last_switch: Option<String>,
}

/// What a flow carries from the daemon it started in to the next (a hot
/// upgrade): all a new daemon's table needs besides a new id and its path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Carried {
    pub listener: String,
    pub client: SocketAddr,
    pub backend: Option<SocketAddr>,
    pub route: Option<String>,
    pub age_ms: u64,
    pub user_c2b: u64,
    pub user_b2c: u64,
    #[serde(default)]
    pub msgs_c2b: u64,
    #[serde(default)]
    pub msgs_b2c: u64,
    #[serde(default)]
    pub http_requests: u64,
    /// What is left of its `max_duration` (or of a reload's close).
    #[serde(default)]
    pub ends_in_ms: Option<u64>,
    #[serde(default)]
    pub route_changed: bool,
    #[serde(default)]
    pub dst: Option<SocketAddr>,
}

impl Flow {
    pub fn carried(&self) -> Carried {
        Carried {
            listener: self.listener.clone(),
            client: self.client,
            backend: *self.backend.locked(),
            route: self.route.locked().clone(),
            age_ms: (sys::monotonic_ns().saturating_sub(self.started_ns) / 1_000_000),
            user_c2b: self.user_c2b.load(Relaxed),
            user_b2c: self.user_b2c.load(Relaxed),
            msgs_c2b: self.msgs_c2b.load(Relaxed),
            msgs_b2c: self.msgs_b2c.load(Relaxed),
            http_requests: self.http_requests.load(Relaxed),
            ends_in_ms: self.ending.at_ns().map(|t| t.saturating_sub(sys::monotonic_ns()) / 1_000_000),
            route_changed: matches!(self.ending.cause(), CloseCause::RouteChanged),
            dst: *self.dst.locked(),
        }
    }
}

#[derive(Default)]
pub struct FlowTable {
    next_id: AtomicU64,
    flows: Mutex<BTreeMap<u64, Arc<Flow>>>,
}

/// Removes its flow from the table when dropped.
pub struct FlowGuard<'a> {
    table: &'a FlowTable,
    pub flow: Arc<Flow>,
}

impl Drop for FlowGuard<'_> {
    fn drop(&mut self) {
        self.table.flows.locked().remove(&self.flow.id);
    }
}

impl FlowTable {
    pub fn open(&self, listener: &str, client: SocketAddr) -> FlowGuard<'_> {
        let id = self.next_id.fetch_add(1, Relaxed) + 1;
        let now = sys::monotonic_ns();
        let flow = Arc::new(Flow {
            id,
            listener: listener.to_string(),
            client,
            backend: Mutex::new(None),
            started: SystemTime::now(),
            started_ns: now,
            path: Mutex::new(FlowPath::Connecting),
            user_c2b: AtomicU64::new(0),
            user_b2c: AtomicU64::new(0),
            user_last_ns: AtomicU64::new(now),
            route: Mutex::new(None),
            http_requests: AtomicU64::new(0),
            msgs_c2b: AtomicU64::new(0),
            msgs_b2c: AtomicU64::new(0),
            movable: AtomicBool::new(false),
            path_switches: AtomicU64::new(0),
            last_switch: Mutex::new(None),
            ending: Ending::default(),
            dst: Mutex::new(None),
        });
        self.flows.locked().insert(id, flow.clone());
        FlowGuard { table: self, flow }
    }

    /// A flow handed over by the previous daemon: a new id here, its start
    /// time, backend, route and user byte counts carried over.
    pub fn adopt(&self, m: &Carried, path: FlowPath) -> Arc<Flow> {
        let id = self.next_id.fetch_add(1, Relaxed) + 1;
        let now = sys::monotonic_ns();
        let age = std::time::Duration::from_millis(m.age_ms);
        let f = Arc::new(Flow {
            id,
            listener: m.listener.clone(),
            client: m.client,
            backend: Mutex::new(m.backend),
            started: SystemTime::now() - age,
            started_ns: now.saturating_sub(age.as_nanos() as u64),
            path: Mutex::new(path),
            user_c2b: AtomicU64::new(m.user_c2b),
            user_b2c: AtomicU64::new(m.user_b2c),
            user_last_ns: AtomicU64::new(now),
            route: Mutex::new(m.route.clone()),
            http_requests: AtomicU64::new(m.http_requests),
            msgs_c2b: AtomicU64::new(m.msgs_c2b),
            msgs_b2c: AtomicU64::new(m.msgs_b2c),
            movable: AtomicBool::new(false),
            path_switches: AtomicU64::new(0),
            last_switch: Mutex::new(None),
            ending: Ending::default(),
            dst: Mutex::new(m.dst),
        });
        if let Some(ms) = m.ends_in_ms {
            f.ending.set(
                now + ms * 1_000_000,
                &if m.route_changed { CloseCause::RouteChanged } else { CloseCause::MaxDuration },
            );
        }
        // In the table until `retire`.
        self.flows.locked().insert(id, f.clone());
        f
    }

    /// The live flows `pick` chooses.
    pub fn matching(&self, pick: impl Fn(&Flow) -> bool) -> Vec<Arc<Flow>> {
        self.flows.locked().values().filter(|f| pick(f)).cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.flows.locked().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many live flows `pred` holds for.
    pub fn count(&self, pred: impl Fn(&Flow) -> bool) -> usize {
        self.flows.locked().values().filter(|f| pred(f)).count()
    }

    pub fn snapshot(&self, kernel: Option<&KernelPath>) -> Vec<FlowSnapshot> {
        let flows: Vec<Arc<Flow>> = self.flows.locked().values().cloned().collect();
        flows.iter().map(|f| snapshot_one(f, kernel)).collect()
    }

    /// Takes a closing flow out of the table, handing its final snapshot to
    /// `fold` (which adds it to the totals) under the table's lock, so that a
    /// reader of totals plus live flows never sees it twice or not at all.
    pub fn retire(&self, flow: &Flow, kernel: Option<&KernelPath>, fold: impl FnOnce(&FlowSnapshot)) -> FlowSnapshot {
        let mut flows = self.flows.locked();
        let snap = snapshot_one(flow, kernel);
        fold(&snap);
        flows.remove(&flow.id);
        snap
    }

    /// Runs `read` on snapshots of the live flows while no flow can retire.
    pub fn with_live<R>(&self, kernel: Option<&KernelPath>, read: impl FnOnce(&[FlowSnapshot]) -> R) -> R {
        let flows = self.flows.locked();
        let snaps: Vec<FlowSnapshot> = flows.values().map(|f| snapshot_one(f, kernel)).collect();
        read(&snaps)
    }
}

pub fn snapshot_one(f: &Flow, kernel: Option<&KernelPath>) -> FlowSnapshot {
    let now_ns = sys::monotonic_ns();
    let now = SystemTime::now();
    let user_c2b = f.user_c2b.load(Relaxed);
    let user_b2c = f.user_b2c.load(Relaxed);
    let mut last_ns = f.user_last_ns.load(Relaxed);
    let (mut k_c2b, mut k_b2c, mut trimmed) = (0, 0, 0);
    let (mut c, mut b) = (gateway_common::SockSlot::default(), gateway_common::SockSlot::default());
    let path = f.path.locked().clone();
    let (path_name, reason, code) = match &path {
        FlowPath::Connecting => ("connecting", None, None),
        FlowPath::Kernel { client_slot, backend_slot } | FlowPath::Relayed { client_slot, backend_slot, .. } => {
            if let Some(k) = kernel {
                c = k.slot(*client_slot);
                b = k.slot(*backend_slot);
                k_c2b = c.redirected;
                k_b2c = b.redirected;
                trimmed = c.trimmed + b.trimmed;
                last_ns = last_ns.max(c.last_ns).max(b.last_ns);
            }
            match &path {
                FlowPath::Relayed { reason, code, .. } => {
                    ("userspace", Some(reason.clone()), Some(code.code().to_string()))
                }
                _ => ("kernel", None, None),
            }
        }
        FlowPath::Userspace { reason, code } => ("userspace", Some(reason.clone()), Some(code.code().to_string())),
    };
    let relayed = matches!(path, FlowPath::Relayed { .. });
    let idle = std::time::Duration::from_nanos(now_ns.saturating_sub(last_ns));
    let age = std::time::Duration::from_nanos(now_ns.saturating_sub(f.started_ns));
    FlowSnapshot {
        id: f.id,
        listener: f.listener.clone(),
        client: f.client.to_string(),
        backend: f.backend.locked().map(|b| b.to_string()),
        path: path_name.to_string(),
        fallback_reason: reason,
        fallback_code: code,
        bytes_client_to_backend: k_c2b + user_c2b,
        bytes_backend_to_client: k_b2c + user_b2c,
        kernel_bytes_client_to_backend: k_c2b,
        kernel_bytes_backend_to_client: k_b2c,
        user_bytes_client_to_backend: user_c2b,
        user_bytes_backend_to_client: user_b2c,
        trimmed_bytes: trimmed,
        // A relayed flow's queue drained before the relay took it (the
        // verdict, passing every byte, no longer updates the figure).
        queued_client_to_backend: if relayed { 0 } else { c.backlog },
        queued_backend_to_client: if relayed { 0 } else { b.backlog },
        max_queued_client_to_backend: c.max_backlog,
        max_queued_backend_to_client: b.max_backlog,
        queue_bound: c.high_water,
        pauses_client_to_backend: c.pauses,
        pauses_backend_to_client: b.pauses,
        redirect_errors: c.redirect_errors + b.redirect_errors,
        trim_errors: c.trim_errors + b.trim_errors,
        started_at: humantime::format_rfc3339_millis(f.started).to_string(),
        last_activity_at: humantime::format_rfc3339_millis(now - idle.min(age)).to_string(),
        age_ms: age.as_millis() as u64,
        idle_ms: idle.min(age).as_millis() as u64,
        route: f.route.locked().clone(),
        http_requests: f.http_requests.load(Relaxed),
        messages_client_to_backend: f.msgs_c2b.load(Relaxed),
        messages_backend_to_client: f.msgs_b2c.load(Relaxed),
        rate_client_to_backend: None,
        rate_backend_to_client: None,
        path_switches: f.path_switches.load(Relaxed),
        last_switch: f.last_switch.locked().clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_codes_are_unique_and_read_back() {
        let mut seen = std::collections::HashSet::new();
        for (f, code) in FALLBACKS {
            assert!(seen.insert(*code), "{code} twice");
            assert_eq!(f.code(), *code);
            assert_eq!(Fallback::parse(code), *f);
        }
        // A code from a newer daemon, carried over at a hot upgrade.
        assert_eq!(Fallback::parse("some-new-reason"), Fallback::Moved);
        assert!(Fallback::Kernel(KernelRefusal::MapFull).moves_as_relay() && !Fallback::Http.moves_as_relay());
    }
}
