//! A listener at run time: its settings and counters, admission, backend
//! choice and connecting; and the set of running listeners (`Listeners`),
//! each read by new flows through its settings cell (`Settings`).
use crate::policy::maglev::Table;
use crate::util::sync::Locked;
use std::{collections::BTreeMap, sync::Mutex};
use std::{
    hash::{Hash, Hasher},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};
use tokio::task::JoinHandle;

use tokio::net::TcpStream;
use tracing::debug;

use crate::{
    config::{Balance, Listener},
    flow::stats::ListenerStats,
    policy::health::Health,
    policy::limits::Admission,
};

/// A listener's runtime state.
pub struct ListenerRt {
    pub cfg: Listener,
    pub local: SocketAddr,
    pub stats: Arc<ListenerStats>,
    pub health: Health,
    admission: Arc<Admission>,
    rr: AtomicUsize,
    /// Round-robin position of each HTTP route.
    route_rr: Vec<AtomicUsize>,
    all: Vec<usize>,
    active: Vec<AtomicU32>,
    /// Upgraded connections each route holds now, by route name; shared
    /// with the settings a reload makes, so a route's cap counts its flows
    /// across reloads.
    pub route_active: RouteCounts,
    /// Maglev tables (`balance: maglev`) by the backends they were built
    /// over (a pool's members that are up), the last few.
    maglev: Mutex<Vec<(Vec<usize>, Arc<Table>)>>,
}

/// Maglev tables kept per listener: a pool or two, each healthy and with
/// a backend ejected.
const MAGLEV_TABLES: usize = 8;

/// Upgraded connections per route name.
pub type RouteCounts = Arc<Mutex<std::collections::HashMap<String, u32>>>;

/// One upgraded connection counted against its route's `max_connections`;
/// given back when dropped (the flow's end).
pub struct RouteSlot {
    counts: RouteCounts,
    route: String,
}

impl RouteSlot {
    /// A place under `cap` on `route`, if there is one.
    pub fn take(counts: &RouteCounts, route: &str, cap: u32) -> Option<RouteSlot> {
        let mut c = counts.locked();
        let n = c.entry(route.to_string()).or_default();
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(RouteSlot { counts: counts.clone(), route: route.to_string() })
    }

    /// A flow that exists already (handed over by a hot upgrade): counted
    /// even over the cap, so that new ones wait until enough have ended.
    pub fn count(counts: &RouteCounts, route: &str) -> RouteSlot {
        *counts.locked().entry(route.to_string()).or_default() += 1;
        RouteSlot { counts: counts.clone(), route: route.to_string() }
    }
}

impl Drop for RouteSlot {
    fn drop(&mut self) {
        if let Some(n) = self.counts.locked().get_mut(&self.route) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The backends a flow may use and how to choose among them: the whole list
/// for a TCP listener, a route's share for a websocket listener.
#[derive(Clone, Copy)]
pub struct Pool<'a> {
    pub members: &'a [usize],
    pub balance: Balance,
    rr: &'a AtomicUsize,
    /// `balance: maglev`: the hash of the request's key (the client's
    /// address when `None`).
    pub key: Option<u64>,
}

impl Pool<'_> {
    pub fn with_key(self, key: Option<u64>) -> Self {
        Pool { key, ..self }
    }
}

impl ListenerRt {
    pub fn new(cfg: Listener, local: SocketAddr, global: Arc<crate::policy::limits::Global>) -> Self {
        let stats = Arc::new(ListenerStats::new(cfg.backends.len()));
        Self::with_stats(cfg, local, global, stats)
    }

    fn with_stats(
        cfg: Listener,
        local: SocketAddr,
        global: Arc<crate::policy::limits::Global>,
        stats: Arc<ListenerStats>,
    ) -> Self {
        let active = cfg.backends.iter().map(|_| AtomicU32::new(0)).collect();
        let admission = Arc::new(Admission::new(cfg.limits.clone(), global));
        let health = Health::new(cfg.health.clone(), cfg.backends.len());
        let route_rr = cfg.http().map_or(0, |h| h.routes.len()).max(cfg.sni_routes().map_or(0, <[_]>::len));
        let route_rr = (0..route_rr).map(|_| AtomicUsize::new(0)).collect();
        let all = (0..cfg.backends.len()).collect();
        let route_active = RouteCounts::default();
        Self {
            cfg,
            local,
            stats,
            health,
            admission,
            rr: AtomicUsize::new(0),
            route_rr,
            all,
            active,
            route_active,
            maglev: Mutex::new(Vec::new()),
        }
    }

    /// New settings for a listener that keeps running: its totals carry over
    /// when the backend list is the same (they are indexed by backend).
    pub fn carry_over(cfg: Listener, prev: &ListenerRt, global: Arc<crate::policy::limits::Global>) -> Self {
        let stats = if cfg.backends == prev.cfg.backends {
            prev.stats.clone()
        } else {
            Arc::new(ListenerStats::new(cfg.backends.len()))
        };
        let mut rt = Self::with_stats(cfg, prev.local, global, stats);
        rt.route_active = prev.route_active.clone();
        rt
    }

    pub fn with_local(mut self, local: SocketAddr) -> Self {
        self.local = local;
        self
    }

    /// Totals for `gateway stats` and the metrics, given the live flows.
    pub fn report(&self, live: &[crate::flow::table::FlowSnapshot]) -> crate::flow::stats::ListenerReport {
        let backends: Vec<String> = self.cfg.backends.iter().map(ToString::to_string).collect();
        let mut r =
            self.stats.report(&self.cfg.name, &self.local.to_string(), &self.cfg.offload.to_string(), &backends, live);
        for (i, b) in r.backends.iter_mut().enumerate() {
            b.up = self.health.is_up(i);
        }
        r
    }

    /// Every backend, chosen by the listener's `balance`.
    pub fn pool(&self) -> Pool<'_> {
        Pool { members: &self.all, balance: self.cfg.balance, rr: &self.rr, key: None }
    }

    /// The backends of HTTP route `i`.
    pub fn route_pool(&self, i: usize) -> Pool<'_> {
        let r = &self.cfg.http().expect("an HTTP listener").routes[i];
        Pool { members: &r.backends, balance: r.balance, rr: &self.route_rr[i], key: None }
    }

    /// The backends of SNI route `i` (tcp listeners with `routes`).
    pub fn sni_pool(&self, i: usize) -> Pool<'_> {
        let r = &self.cfg.sni_routes().expect("a listener with SNI routes")[i];
        Pool { members: &r.backends, balance: r.balance, rr: &self.route_rr[i], key: None }
    }

    /// Backends (indices into `cfg.backends`) in the order to try them for this client.
    fn candidates(&self, client: SocketAddr, pool: Pool<'_>) -> Vec<usize> {
        let m = pool.members;
        let n = m.len();
        if n == 0 {
            return Vec::new();
        }
        if pool.balance == Balance::Maglev {
            // The table over the backends that are up: an ejected one is out
            // of it (its keys spread over the rest, the others' stay), and
            // back in it, the same table as before, once it is up again.
            let up: Vec<usize> = m.iter().copied().filter(|&i| self.health.is_up(i)).collect();
            let key = pool.key.unwrap_or_else(|| crate::policy::maglev::hash(client.ip().to_string().as_bytes()));
            let Some(first) = self.maglev_table(&up).pick(key) else { return Vec::new() };
            // The others after it, for the connect attempts that follow a failure.
            return (0..up.len()).map(|i| up[(first + i) % up.len()]).collect();
        }
        let start = match pool.balance {
            Balance::RoundRobin => pool.rr.fetch_add(1, Relaxed) % n,
            Balance::SourceHash => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                client.ip().hash(&mut h);
                (h.finish() % n as u64) as usize
            }
            Balance::LeastConn => {
                // Fewest active flows; ties broken round-robin.
                let offset = pool.rr.fetch_add(1, Relaxed);
                (0..n).map(|i| (i + offset) % n).min_by_key(|&i| self.active[m[i]].load(Relaxed)).unwrap_or(0)
            }
            Balance::Maglev => unreachable!("chosen above"),
        };
        // Ejected backends get no new flows.
        (0..n).map(|i| m[(start + i) % n]).filter(|&i| self.health.is_up(i)).collect()
    }

    /// The backend a new connection for this client would try first.
    pub fn first_choice(&self, client: SocketAddr, pool: Pool<'_>) -> Option<usize> {
        self.candidates(client, pool).first().copied()
    }

    /// The Maglev table over these backends (indices into `cfg.backends`,
    /// named by address), built once.
    fn maglev_table(&self, over: &[usize]) -> Arc<Table> {
        let mut tables = self.maglev.locked();
        if let Some((_, t)) = tables.iter().find(|(b, _)| b == over) {
            return t.clone();
        }
        let names: Vec<String> = over.iter().map(|&i| self.cfg.backends[i].to_string()).collect();
        let t = Arc::new(Table::new(&names, self.cfg.maglev_table_size));
        if tables.len() == MAGLEV_TABLES {
            tables.remove(0);
        }
        tables.push((over.to_vec(), t.clone()));
        t
    }

    /// Counts a flow on backend `idx` until the guard drops.
    pub fn activate(&self, idx: usize) -> Active<'_> {
        self.active[idx].fetch_add(1, Relaxed);
        Active(&self.active[idx])
    }

    /// Admission, before anything else (a backend connect above all). A
    /// client turned away is counted by cause and reset at once.
    pub fn admit(&self, client: &TcpStream, peer: SocketAddr) -> Option<crate::policy::limits::Admitted> {
        self.stats.accepted();
        match self.admission.admit(peer.ip()) {
            Ok(a) => Some(a),
            Err(cause) => {
                self.stats.rejected(cause);
                debug!(listener = %self.cfg.name, client = %peer, cause, "connection rejected");
                // Close at once, with RST: no TIME_WAIT left behind by a flood.
                let _ = socket2::SockRef::from(client).set_linger(Some(Duration::ZERO));
                None
            }
        }
    }
}

impl ListenerRt {
    /// A place under the listener's admission for one more WebSocket stream
    /// of a client already connected (HTTP/2); a refusal is counted by
    /// cause, as a connection's is.
    pub fn admit_stream(&self, client: SocketAddr) -> Result<crate::policy::limits::Admitted, &'static str> {
        self.admission.admit(client.ip()).inspect_err(|cause| {
            self.stats.rejected(cause);
            debug!(listener = %self.cfg.name, %client, cause, "WebSocket stream refused");
        })
    }
}

/// Decrements a backend's active count when the flow ends.
pub struct Active<'a>(&'a AtomicU32);
impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Connects one of `pool`'s backends, trying them in turn; the stream has TCP_NODELAY set.
pub async fn connect(
    rt: &ListenerRt,
    flow: &crate::flow::table::Flow,
    pool: Pool<'_>,
    send_proxy: Option<crate::config::ProxyVersion>,
) -> Result<(TcpStream, usize), String> {
    let client = flow.client;
    // `send_proxy`: the header goes first on each backend connection, before
    // any byte of the client's (and before TLS to the backend).
    let header = send_proxy.map(|v| {
        let dst = flow.dst.locked().unwrap_or(rt.local);
        crate::edge::proxy_header::encode(v, client, dst)
    });
    let mut tried = Vec::new();
    let candidates = rt.candidates(client, pool);
    if candidates.is_empty() {
        return Err(format!(
            "all {} backend(s) are ejected after failing health checks (health.failures {}, eject_for {:?})",
            pool.members.len(),
            rt.cfg.health.failures,
            rt.cfg.health.eject_for
        ));
    }
    for idx in candidates.into_iter().cycle().take(rt.cfg.connect_attempts as usize) {
        let addr = rt.cfg.backends[idx];
        let attempt = async {
            let mut s = connect_one(addr).await?;
            if let Some(h) = &header {
                tokio::io::AsyncWriteExt::write_all(&mut s, h).await?;
            }
            Ok::<_, std::io::Error>(s)
        };
        match tokio::time::timeout(rt.cfg.connect_timeout, attempt).await {
            Ok(Ok(s)) => {
                rt.health.succeeded(idx, &rt.cfg.name, addr);
                return Ok((s, idx));
            }
            // Out of descriptors or memory here: not the backend's fault,
            // so it is not counted against its health, and no other
            // backend would fare better.
            Ok(Err(e))
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) =>
            {
                rt.stats.rejected("local-resources");
                return Err(format!("no local resources to connect {addr}: {e}"));
            }
            Ok(Err(e)) => tried.push(format!("{addr} ({e})")),
            Err(_) => tried.push(format!("{addr} (no answer within {:?})", rt.cfg.connect_timeout)),
        }
        rt.stats.connect_failed(idx);
        rt.health.failed(idx, &rt.cfg.name, addr);
        debug!(listener = %rt.cfg.name, %client, "connect attempt failed: {}", tried.last().map_or("", String::as_str));
    }
    Err(format!("tried: {}", tried.join(", ")))
}

/// One connect, with TCP_NODELAY set. A non-blocking connect to a nearby
/// peer (loopback, a veth into another namespace) usually completes inside
/// the syscall: then the stream is used at once, without a turn through the
/// event loop to learn that it is writable.
async fn connect_one(addr: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
    s.set_tcp_nodelay(true)?;
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    if let Some(e) = s.take_error()? {
        return Err(e);
    }
    let connected = s.peer_addr().is_ok();
    let stream = TcpStream::from_std(s.into())?;
    if !connected {
        stream.writable().await?;
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    Ok(stream)
}

/// A listener's settings cell: where new flows read its settings from (a
/// reload swaps them; established flows keep the `Arc` they started with).
pub type Settings = Arc<Mutex<Arc<ListenerRt>>>;

pub struct Running {
    pub settings: Settings,
    pub bind: SocketAddr,
    pub(crate) accept: Option<JoinHandle<()>>,
    pub(crate) checks: JoinHandle<()>,
    /// A duplicate of the listening socket, for a hot upgrade's handover;
    /// gone once the listener stops.
    pub(crate) sock: Option<std::os::fd::OwnedFd>,
}

impl Running {
    /// Stops accepting: the accept loop ends, and with it and the duplicate
    /// this process's last descriptors of the listening socket. Unless a
    /// successor holds it too, the socket closes and new clients are
    /// refused. Returns the accept loop, to wait for its end.
    pub(crate) fn stop(&mut self) -> Option<JoinHandle<()>> {
        self.checks.abort();
        self.sock = None;
        let accept = self.accept.take()?;
        accept.abort();
        Some(accept)
    }
}

/// The running listeners, by name.
#[derive(Default)]
pub struct Listeners {
    pub running: Mutex<BTreeMap<String, Running>>,
    /// Serialises reloads, and a reload with the end of accepting; holds
    /// whether accepting has ended (drain or hot upgrade), after which no
    /// reload starts a listener.
    pub(crate) reloading: tokio::sync::Mutex<bool>,
}

impl Listeners {
    /// Snapshot of the current settings of every listener.
    pub fn current(&self) -> Vec<Arc<ListenerRt>> {
        self.running.locked().values().map(|r| r.settings.locked().clone()).collect()
    }

    /// Each listener (name, configured bind, bound address) with a new
    /// descriptor of its listening socket, for a hot upgrade.
    pub fn sockets(&self) -> std::io::Result<(Vec<crate::handoff::OfferedListener>, Vec<std::os::fd::OwnedFd>)> {
        let run = self.running.locked();
        let mut offered = Vec::new();
        let mut fds = Vec::new();
        for (name, r) in run.iter() {
            let Some(sock) = &r.sock else { continue };
            fds.push(sock.try_clone()?);
            let local = r.settings.locked().local;
            offered.push(crate::handoff::OfferedListener { name: name.clone(), bind: r.bind, local });
        }
        Ok((offered, fds))
    }

    /// Stops accepting on every listener (at shutdown, or once a successor
    /// accepts), and returns once this process holds none of the listening
    /// sockets any more: a client that connects after that is refused
    /// instead of waiting in a backlog nobody reads. The listeners stay
    /// listed, with their counters.
    pub async fn stop_all(&self) {
        // After any reload under way, and before any other: none starts a
        // listener once this has stopped them.
        *self.reloading.lock().await = true;
        let loops: Vec<JoinHandle<()>> = self.running.locked().values_mut().filter_map(Running::stop).collect();
        for l in loops {
            // Aborted: the loop ends at its next await, dropping its socket.
            let _ = l.await;
        }
    }
}
