//! Accepting clients, choosing and connecting a backend, and handing the pair
//! to the kernel path or the userspace relay.
use crate::sync::Locked;
use std::{
    hash::{Hash, Hasher},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::{
    config::{Balance, Listener, Offload},
    flows::{CloseCause, FlowPath, FlowTable},
    health::Health,
    kernel::{KernelPath, Unavailable},
    limits::Admission,
    relay,
    session::Conn,
    splice,
    stats::ListenerStats,
};

/// Shared state of the running daemon.
pub struct Daemon {
    pub flows: FlowTable,
    pub listeners: crate::reload::Listeners,
    /// The config in force (updated by reloads) and where it came from.
    pub config: std::sync::Mutex<crate::config::Config>,
    pub config_path: std::path::PathBuf,
    pub global: Arc<crate::limits::Global>,
    /// Bound address of the metrics endpoint.
    pub metrics: Option<SocketAddr>,
    pub kernel: Option<KernelPath>,
    /// Why the kernel path is not available, when it is not.
    pub kernel_unavailable: Option<Unavailable>,
    /// Test hook (`GATEWAY_TEST_HANDOFF_DELAY_MS`): wait this long between
    /// connecting the backend and the hand-off, so tests can queue bytes on
    /// both sockets before it. Zero in production.
    pub handoff_delay: Duration,
    /// Set to true when the drain starts.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// Set to true once a new process has taken the listeners over (hot upgrade).
    pub handed_over: tokio::sync::watch::Sender<bool>,
    /// Kernel flows detached for the new process; Some while it takes them.
    pub migrants: std::sync::Mutex<Option<Vec<crate::upgrade::Migrant>>>,
    /// The flows have been sent (or the sending failed): once the table is
    /// empty too, the old daemon may exit.
    pub handover_done: std::sync::atomic::AtomicBool,
}

/// A listener's runtime state.
pub struct ListenerRt {
    pub cfg: Listener,
    pub local: SocketAddr,
    pub stats: Arc<ListenerStats>,
    pub health: Health,
    admission: Admission,
    rr: AtomicUsize,
    /// Round-robin position of each HTTP route.
    route_rr: Vec<AtomicUsize>,
    all: Vec<usize>,
    active: Vec<AtomicU32>,
}

/// The backends a flow may use and how to choose among them: the whole list
/// for a TCP listener, a route's share for a websocket listener.
#[derive(Clone, Copy)]
pub struct Pool<'a> {
    pub members: &'a [usize],
    pub balance: Balance,
    rr: &'a AtomicUsize,
}

impl ListenerRt {
    pub fn new(cfg: Listener, local: SocketAddr, global: Arc<crate::limits::Global>) -> Self {
        let stats = Arc::new(ListenerStats::new(cfg.backends.len()));
        Self::with_stats(cfg, local, global, stats)
    }

    fn with_stats(
        cfg: Listener,
        local: SocketAddr,
        global: Arc<crate::limits::Global>,
        stats: Arc<ListenerStats>,
    ) -> Self {
        let active = cfg.backends.iter().map(|_| AtomicU32::new(0)).collect();
        let admission = Admission::new(cfg.limits.clone(), global);
        let health = Health::new(cfg.health.clone(), cfg.backends.len());
        let route_rr = cfg.http.as_ref().map_or(0, |h| h.routes.len()).max(cfg.sni_routes.as_ref().map_or(0, Vec::len));
        let route_rr = (0..route_rr).map(|_| AtomicUsize::new(0)).collect();
        let all = (0..cfg.backends.len()).collect();
        Self { cfg, local, stats, health, admission, rr: AtomicUsize::new(0), route_rr, all, active }
    }

    /// New settings for a listener that keeps running: its totals carry over
    /// when the backend list is the same (they are indexed by backend).
    pub fn carry_over(cfg: Listener, prev: &ListenerRt, global: Arc<crate::limits::Global>) -> Self {
        let stats = if cfg.backends == prev.cfg.backends {
            prev.stats.clone()
        } else {
            Arc::new(ListenerStats::new(cfg.backends.len()))
        };
        Self::with_stats(cfg, prev.local, global, stats)
    }

    pub fn with_local(mut self, local: SocketAddr) -> Self {
        self.local = local;
        self
    }

    /// Totals for `gateway stats` and the metrics, given the live flows.
    pub fn report(&self, live: &[crate::flows::FlowSnapshot]) -> crate::stats::ListenerReport {
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
        Pool { members: &self.all, balance: self.cfg.balance, rr: &self.rr }
    }

    /// The backends of HTTP route `i`.
    pub fn route_pool(&self, i: usize) -> Pool<'_> {
        let r = &self.cfg.http.as_ref().expect("an HTTP listener").routes[i];
        Pool { members: &r.backends, balance: r.balance, rr: &self.route_rr[i] }
    }

    /// The backends of SNI route `i` (tcp listeners with `routes`).
    pub fn sni_pool(&self, i: usize) -> Pool<'_> {
        let r = &self.cfg.sni_routes.as_ref().expect("a listener with SNI routes")[i];
        Pool { members: &r.backends, balance: r.balance, rr: &self.route_rr[i] }
    }

    /// Backends (indices into `cfg.backends`) in the order to try them for this client.
    fn candidates(&self, client: SocketAddr, pool: Pool<'_>) -> Vec<usize> {
        let m = pool.members;
        let n = m.len();
        if n == 0 {
            return Vec::new();
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
        };
        // Ejected backends get no new flows.
        (0..n).map(|i| m[(start + i) % n]).filter(|&i| self.health.is_up(i)).collect()
    }

    /// Counts a flow on backend `idx` until the guard drops.
    pub fn activate(&self, idx: usize) -> Active<'_> {
        self.active[idx].fetch_add(1, Relaxed);
        Active(&self.active[idx])
    }

    /// Admission, before anything else (a backend connect above all). A
    /// client turned away is counted by cause and reset at once.
    pub fn admit(&self, client: &TcpStream, peer: SocketAddr) -> Option<crate::limits::Admitted<'_>> {
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

/// Decrements a backend's active count when the flow ends.
pub struct Active<'a>(&'a AtomicU32);
impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

pub async fn serve(listener: TcpListener, slot: crate::reload::Slot, daemon: Arc<Daemon>) {
    let mut last_warned = None;
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                // The settings in force when the client arrived stay with its flow.
                let rt = slot.locked().clone();
                let daemon = daemon.clone();
                if rt.cfg.http.is_some() {
                    tokio::spawn(crate::http::handle(client, peer, rt, daemon));
                } else {
                    tokio::spawn(async move { handle(client, peer, &rt, &daemon).await });
                }
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: keep the listener, back off briefly,
                // and say so at most once a minute.
                let what = format!("listener {}", slot.locked().cfg.name);
                crate::sys::accept_failed(&what, e, &mut last_warned).await;
            }
        }
    }
}

/// Connects one of `pool`'s backends, trying them in turn; the stream has TCP_NODELAY set.
pub async fn connect(rt: &ListenerRt, client: SocketAddr, pool: Pool<'_>) -> Result<(TcpStream, usize), String> {
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
        match tokio::time::timeout(rt.cfg.connect_timeout, connect_one(addr)).await {
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

async fn handle(client: TcpStream, peer: SocketAddr, rt: &ListenerRt, daemon: &Daemon) {
    let Some(_admitted) = rt.admit(&client, peer) else { return };
    let guard = daemon.flows.open(&rt.cfg.name, peer);
    let flow = &guard.flow;
    crate::flowlog::record_with("open", || crate::flows::snapshot_one(flow, None));
    let _ = client.set_nodelay(true);
    // SNI routes: the ClientHello is peeked (left in the socket) to choose
    // the route, hence the pool and whether TLS is terminated here.
    let mut pool = rt.pool();
    let mut terminate = rt.cfg.tls.is_some();
    if let Some(routes) = &rt.cfg.sni_routes {
        let timeout = rt.cfg.tls.as_ref().map_or(crate::config::DEFAULT_HANDSHAKE_TIMEOUT, |t| t.handshake_timeout);
        let sni = match tokio::time::timeout(timeout, crate::tls::peek_sni(&client)).await {
            Ok(Ok(sni)) => sni,
            Ok(Err(why)) => {
                return turn_away(flow, &format!("no usable TLS ClientHello: {why}"), "tls-handshake", rt, daemon)
            }
            Err(_) => {
                return turn_away(flow, "no TLS ClientHello within the handshake timeout", "tls-handshake", rt, daemon)
            }
        };
        let Some(i) = crate::config::pick_sni_route(routes, sni.as_deref()) else {
            let why = format!("no route for SNI {}", sni.as_deref().unwrap_or("(none)"));
            return turn_away(flow, &why, "sni-reject", rt, daemon);
        };
        *flow.route.locked() = Some(format!("sni {}", routes[i].sni));
        match routes[i].mode {
            crate::config::SniMode::Reject => {
                let why = format!("SNI {} is rejected by routes[{i}]", sni.as_deref().unwrap_or("(none)"));
                return turn_away(flow, &why, "sni-reject", rt, daemon);
            }
            crate::config::SniMode::Passthrough => terminate = false,
            crate::config::SniMode::Terminate => terminate = true,
        }
        pool = rt.sni_pool(i);
    }
    // TLS first: a client that can't finish its handshake never costs a
    // backend connection.
    let client = match rt.cfg.tls.as_ref().filter(|_| terminate) {
        None => Conn::Plain(client),
        Some(tls) => {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&client);
            match accept_tls(client, tls, flow, rt, daemon).await {
                Some(s) => Conn::server(s, fd),
                None => return,
            }
        }
    };
    let (backend, idx) = match connect(rt, peer, pool).await {
        Ok(b) => b,
        Err(tried) => {
            warn!(flow = flow.id, listener = %rt.cfg.name, client = %peer, "no backend answered; closing the client ({tried})");
            retire(flow, None, &CloseCause::NoBackend, rt, daemon);
            return;
        }
    };
    let _active = rt.activate(idx);
    *flow.backend.locked() = Some(rt.cfg.backends[idx]);
    // TLS to the backend: verified as configured; a failure counts against
    // the backend like a failed connect.
    let backend = match &rt.cfg.backend_tls {
        None => Conn::Plain(backend),
        Some(o) => {
            let addr = rt.cfg.backends[idx];
            match tokio::time::timeout(rt.cfg.connect_timeout, o.connect(addr, backend)).await {
                Ok(Ok(s)) => s,
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no TLS handshake within {:?}", rt.cfg.connect_timeout),
                    };
                    rt.stats.connect_failed(idx);
                    rt.health.failed(idx, &rt.cfg.name, addr);
                    warn!(flow = flow.id, listener = %rt.cfg.name, backend = %addr, "backend TLS failed ({}): {why}", o.summary);
                    retire(flow, Some(idx), &CloseCause::Error(format!("backend TLS: {why}")), rt, daemon);
                    return;
                }
            }
        }
    };
    let cause = match (client, backend) {
        (Conn::Plain(client), Conn::Plain(backend)) => {
            if !daemon.handoff_delay.is_zero() {
                tokio::time::sleep(daemon.handoff_delay).await;
            }
            forward(client, backend, idx, flow, rt, daemon).await
        }
        (client, backend) => {
            flow.set_path(FlowPath::Userspace {
                reason: "TLS is terminated or originated in user space (no kTLS on this host)".into(),
                code: "userspace-tls",
            });
            crate::flowlog::record_with("handoff", || crate::flows::snapshot_one(flow, None));
            let Some(cause) = relay_movable(daemon, client, backend, flow, rt.cfg.idle_timeout).await else {
                return;
            };
            retire(flow, Some(idx), &cause, rt, daemon);
            cause
        }
    };
    debug!(flow = flow.id, %cause, "flow task done");
}

/// The server side of a TLS handshake. A failure is counted per listener
/// (`tls-handshake`), costs one debug line, never a flood at warn, and
/// retires the flow.
pub async fn accept_tls(
    client: TcpStream,
    tls: &crate::tls::Tls,
    flow: &crate::flows::Flow,
    rt: &ListenerRt,
    daemon: &Daemon,
) -> Option<crate::session::ServerTls> {
    // Read a record at a time, so that the session can move (`session.rs`).
    let client = crate::gate::Gate::new(Box::new(client), &[]);
    let accept = tokio_rustls::TlsAcceptor::from(tls.config.clone()).accept(client);
    let why = match tokio::time::timeout(tls.handshake_timeout, accept).await {
        Ok(Ok(s)) => return Some(s),
        Ok(Err(e)) => format!("TLS handshake failed: {e}"),
        Err(_) => format!("TLS handshake not finished within {:?}", tls.handshake_timeout),
    };
    rt.stats.rejected("tls-handshake");
    debug!(flow = flow.id, listener = %rt.cfg.name, client = %flow.client, "{why}");
    retire(flow, None, &CloseCause::Rejected(why), rt, daemon);
    None
}

/// Closes a client before any backend is contacted, counted under `cause`.
fn turn_away(flow: &crate::flows::Flow, why: &str, cause: &str, rt: &ListenerRt, daemon: &Daemon) {
    rt.stats.rejected(cause);
    debug!(flow = flow.id, listener = %rt.cfg.name, client = %flow.client, "{why}");
    retire(flow, None, &CloseCause::Rejected(why.to_string()), rt, daemon);
}

/// Carries a connected client/backend pair (TCP_NODELAY already set) to its
/// end: on the kernel path when the listener and the host allow it, in the
/// userspace relay otherwise. Retires the flow.
pub async fn forward(
    client: TcpStream,
    backend: TcpStream,
    idx: usize,
    flow: &crate::flows::Flow,
    rt: &ListenerRt,
    daemon: &Daemon,
) -> CloseCause {
    let peer = flow.client;
    let kernel = match (rt.cfg.offload, &daemon.kernel) {
        (Offload::Userspace, _) => Err(("offload: userspace".to_string(), "configured-userspace")),
        (_, None) => {
            let why = daemon.kernel_unavailable.as_ref().map_or("kernel path not loaded".into(), |u| u.to_string());
            let code = daemon.kernel_unavailable.as_ref().map_or("unavailable", Unavailable::code);
            Err((why, code))
        }
        (_, Some(k)) => match k.splice(&client, &backend) {
            Ok(s) => Ok((k, s)),
            Err(e) if rt.cfg.offload == Offload::Kernel && !matches!(e, Unavailable::NotEstablished(_)) => {
                warn!(flow = flow.id, listener = %rt.cfg.name, client = %peer, "offload: kernel and the flow cannot be spliced ({e}); closing it");
                let cause = CloseCause::Rejected(e.to_string());
                retire(flow, Some(idx), &cause, rt, daemon);
                return cause;
            }
            Err(e) => Err((e.to_string(), e.code())),
        },
    };
    match kernel {
        Ok((k, s)) => {
            flow.set_path(FlowPath::Kernel { client_slot: s.client_slot, backend_slot: s.backend_slot });
            crate::flowlog::record_with("handoff", || crate::flows::snapshot_one(flow, Some(k)));
            let (client, backend) = match both(splice::Sock::from_tokio(client), splice::Sock::from_tokio(backend)) {
                Ok((c, b)) => (c, b),
                Err(e) => {
                    warn!(flow = flow.id, "cannot watch the spliced sockets: {e}; closing the flow");
                    let cause = CloseCause::Error(e.to_string());
                    retire(flow, Some(idx), &cause, rt, daemon);
                    k.release(&s);
                    return cause;
                }
            };
            let auto = (rt.cfg.offload == Offload::Auto).then_some(&*rt.stats);
            let Some(cause) = supervise(daemon, k, &s, (client, backend), flow, rt.cfg.idle_timeout, None, auto).await
            else {
                return CloseCause::HandedOver;
            };
            // Final counters before the slots are reused.
            retire(flow, Some(idx), &cause, rt, daemon);
            k.release(&s);
            cause
        }
        Err((reason, code)) => {
            flow.set_path(FlowPath::Userspace { reason: reason.clone(), code });
            crate::flowlog::record_with("handoff", || crate::flows::snapshot_one(flow, daemon.kernel.as_ref()));
            debug!(flow = flow.id, %reason, "relayed in user space");
            let (client, backend) = (Conn::Plain(client), Conn::Plain(backend));
            let Some(cause) = Box::pin(relay_movable(daemon, client, backend, flow, rt.cfg.idle_timeout)).await else {
                return CloseCause::HandedOver;
            };
            retire(flow, Some(idx), &cause, rt, daemon);
            cause
        }
    }
}

/// Supervises a spliced flow until it closes (`Some`), or until it is
/// handed to a new daemon at a quiet moment of a hot upgrade (`None`).
/// With `offload: auto` (`auto` holds the listener's counters), the flow
/// may move to the user-space relay and back meanwhile (see [`splice::Demotion`]
/// and [`relay_demoted`]).
#[allow(clippy::too_many_arguments)]
async fn supervise(
    daemon: &Daemon,
    k: &KernelPath,
    s: &crate::kernel::Splice,
    (client, backend): (splice::Sock, splice::Sock),
    flow: &crate::flows::Flow,
    idle: Duration,
    resume: Option<&splice::Resume>,
    auto: Option<&ListenerStats>,
) -> Option<CloseCause> {
    let mut socks = Some((client, backend));
    let mut resume = resume.cloned();
    // How long a relayed flow must stay light before it goes back to the
    // kernel; doubled at each return, so a flow that keeps crossing over
    // settles in the relay.
    let mut light_for = LIGHT_FOR;
    loop {
        let (c, b) = socks.as_ref().expect("the sockets are back at each turn");
        let detach = Some(daemon.handed_over.subscribe());
        let outcome = splice::run(k, s, c, b, flow, idle, detach, resume.as_ref(), auto.is_some()).await;
        match outcome {
            splice::Outcome::Closed(cause) => return Some(cause),
            splice::Outcome::Detached(r) => {
                // To the new daemon, while it still takes flows.
                let handed = match daemon.migrants.locked().as_mut() {
                    Some(list) => {
                        let (client, backend) = socks.take().expect("taken once, then returned");
                        let moved = crate::upgrade::Moved::Kernel { splice: s.clone(), resume: r.clone() };
                        let info = crate::upgrade::MigrantInfo::of(flow, moved);
                        list.push(crate::upgrade::Migrant {
                            info,
                            client: client.into_inner(),
                            backend: Some(backend.into_inner()),
                        });
                        true
                    }
                    None => false,
                };
                if handed {
                    // Its slots are the new daemon's now: not released here,
                    // and not this daemon's to free at its exit either.
                    k.forget(s);
                    debug!(flow = flow.id, "handed to the new daemon");
                    return None;
                }
                // Too late: the flows have gone; this one ends here.
                let (c, b) = socks.as_ref().expect("not handed over");
                return match Box::pin(splice::run(k, s, c, b, flow, idle, None, Some(&r), false)).await {
                    splice::Outcome::Closed(cause) => Some(cause),
                    _ => unreachable!("no detach without a receiver, no move without auto"),
                };
            }
            splice::Outcome::ToUserspace(mut r, why) => {
                let stats = auto.expect("moves only with offload: auto");
                let (client, backend) = socks.take().expect("the sockets are back at each turn");
                let path = |relayed: bool| match relayed {
                    true => crate::flows::FlowPath::Relayed {
                        client_slot: s.client_slot,
                        backend_slot: s.backend_slot,
                        reason: why.reason().to_string(),
                        code: why.code(),
                    },
                    false => {
                        crate::flows::FlowPath::Kernel { client_slot: s.client_slot, backend_slot: s.backend_slot }
                    }
                };
                flow.switch_path(path(true), format!("to-userspace: {}", why.code()));
                stats.switched("userspace", why.code());
                crate::flowlog::record_with("switch", || crate::flows::snapshot_one(flow, Some(k)));
                let client = client.into_inner();
                let backend = backend.into_inner();
                let (client, backend) = match both(TcpStream::from_std(client), TcpStream::from_std(backend)) {
                    Ok((c, b)) => (c, b),
                    Err(e) => {
                        return Some(CloseCause::Error(format!("cannot relay the flow: {e}")));
                    }
                };
                let user = |f: &crate::flows::Flow| (f.user_c2b.load(Relaxed), f.user_b2c.load(Relaxed));
                let before = user(flow);
                // Boxed, as the other rare turns: a flow on the kernel path
                // holds only what that path needs.
                let relayed = Box::pin(relay_demoted(daemon, k, s, client, backend, flow, idle, light_for));
                let (client, backend, back_why) = match relayed.await {
                    Relayed::Closed(cause) => return Some(cause),
                    Relayed::Back(c, b, w) => (c, b, w),
                };
                // Back to the kernel: what the relay wrote counts as
                // forwarded passed bytes, so the verdict's bookkeeping (and
                // the supervisor's) go on from there; bytes passed but not
                // read yet keep the verdict passing until they are forwarded.
                let after = user(flow);
                let (c2b, b2c) = (after.0 - before.0, after.1 - before.1);
                k.add_user_forwarded(s.client_slot, c2b);
                k.add_user_forwarded(s.backend_slot, b2c);
                r.client_user_written += c2b;
                r.backend_user_written += b2c;
                k.set_enabled(s.client_slot, true);
                k.set_enabled(s.backend_slot, true);
                flow.switch_path(path(false), format!("to-kernel: {back_why}"));
                stats.switched("kernel", back_why);
                crate::flowlog::record_with("switch", || crate::flows::snapshot_one(flow, Some(k)));
                match both(splice::Sock::from_tokio(client), splice::Sock::from_tokio(backend)) {
                    Ok((c, b)) => socks = Some((c, b)),
                    Err(e) => {
                        return Some(CloseCause::Error(format!("cannot return the flow to the kernel path: {e}")));
                    }
                }
                resume = Some(r);
                light_for = (light_for * 2).min(LIGHT_FOR_MAX);
            }
        }
    }
}

/// A relayed flow goes back to the kernel once it has been light this long
/// (at first; the wait doubles at each return, up to [`LIGHT_FOR_MAX`]).
const LIGHT_FOR: Duration = Duration::from_secs(2);
const LIGHT_FOR_MAX: Duration = Duration::from_secs(64);
/// Light: under this many bytes a second, with both send queues under
/// [`LIGHT_QUEUE`] (a receiver that keeps up) at every sample.
const LIGHT_RATE: u64 = 256 * 1024;
const LIGHT_QUEUE: u64 = 64 * 1024;

enum Relayed {
    Closed(CloseCause),
    /// Stopped at a quiet moment (nothing held, no EOF): the sockets, and why.
    Back(TcpStream, TcpStream, &'static str),
}

/// Relays a flow `offload: auto` took off the kernel path until it closes,
/// or until it has been light for `light_for` (`light`: interactive
/// again, where the kernel path costs less and answers sooner) or a hot
/// upgrade starts (`hand-over`: kernel flows move to the new daemon); then
/// stops at a quiet moment and gives the sockets back.
#[allow(clippy::too_many_arguments)]
async fn relay_demoted(
    daemon: &Daemon,
    k: &KernelPath,
    s: &crate::kernel::Splice,
    client: TcpStream,
    backend: TcpStream,
    flow: &crate::flows::Flow,
    idle: Duration,
    light_for: Duration,
) -> Relayed {
    use std::os::fd::AsRawFd;
    const SAMPLE: Duration = Duration::from_millis(250);
    let fds = (client.as_raw_fd(), backend.as_raw_fd());
    let (tx, rx) = tokio::sync::watch::channel(false);
    // Bytes read from each socket before the relay: all it forwarded, since
    // nothing was held when the supervisor stopped.
    let read_before = (k.slot(s.client_slot).user_fwd, k.slot(s.backend_slot).user_fwd);
    let eof_ok = |side: crate::flows::Side, read: u64| {
        let (slot, before) = match side {
            crate::flows::Side::Client => (s.client_slot, read_before.0),
            crate::flows::Side::Backend => (s.backend_slot, read_before.1),
        };
        before + read >= k.slot(slot).passed
    };
    let relay = relay::relay(Conn::Plain(client), Conn::Plain(backend), flow, idle, Some(rx), Some(&eof_ok));
    tokio::pin!(relay);
    let mut handed = daemon.handed_over.subscribe();
    let monitor = async {
        let moved = || flow.user_c2b.load(Relaxed) + flow.user_b2c.load(Relaxed);
        let queued = || crate::sys::outq(&fds.0).unwrap_or(0).max(crate::sys::outq(&fds.1).unwrap_or(0));
        let needed = (light_for.as_millis() / SAMPLE.as_millis()).max(1) as usize;
        // (bytes moved so far, whether the send queues were short) per sample.
        let mut window: std::collections::VecDeque<(u64, bool)> = std::collections::VecDeque::new();
        window.push_back((moved(), queued() < LIGHT_QUEUE));
        let mut tick = tokio::time::interval(SAMPLE);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                up = async { handed.wait_for(|h| *h).await.is_ok() } => {
                    if up {
                        return "hand-over";
                    }
                    std::future::pending::<()>().await;
                }
            }
            window.push_back((moved(), queued() < LIGHT_QUEUE));
            if window.len() > needed + 1 {
                window.pop_front();
            }
            if window.len() == needed + 1 {
                let (first, last) = (window[0].0, window[window.len() - 1].0);
                let bytes = last - first;
                let rate = bytes * 1000 / light_for.as_millis().max(1) as u64;
                if rate < LIGHT_RATE && window.iter().all(|(_, short)| *short) {
                    return "light";
                }
            }
        }
    };
    tokio::pin!(monitor);
    let mut why = None;
    loop {
        tokio::select! {
            r = &mut relay => return match r {
                relay::Relayed::Closed(cause) => Relayed::Closed(cause),
                relay::Relayed::Detached(Conn::Plain(c), Conn::Plain(b)) => Relayed::Back(c, b, why.unwrap_or("light")),
                relay::Relayed::Detached(..) => unreachable!("plain sockets in, plain sockets out"),
            },
            w = &mut monitor, if why.is_none() => {
                why = Some(w);
                let _ = tx.send(true);
            }
        }
    }
}

/// The flow's fallback reason and code, as a moved flow carries them.
fn path_reason(flow: &crate::flows::Flow, default: &str) -> (String, String) {
    match flow.path.locked().clone() {
        FlowPath::Userspace { reason, code } => (reason, code.to_string()),
        _ => (String::new(), default.to_string()),
    }
}

/// Runs a terminated WebSocket flow (inspect, bridge_tcp) until it closes
/// (`Some`), or until it is handed to a new daemon between messages at a hot
/// upgrade (`None`).
pub async fn ws_movable(daemon: &Daemon, ends: crate::ws::Ends<'_>) -> Option<CloseCause> {
    use std::sync::atomic::Ordering::Relaxed;
    let flow = ends.flow;
    let (limits, idle) = (ends.limits, ends.idle);
    flow.movable.store(true, Relaxed);
    let mut ended = crate::ws::run(ends, Some(daemon.handed_over.subscribe())).await;
    loop {
        let p = match ended {
            crate::ws::Ended::Closed(cause) => {
                flow.movable.store(false, Relaxed);
                return Some(cause);
            }
            crate::ws::Ended::Detached(p) => p,
        };
        // To the new daemon while it still takes flows; else on here. Not
        // movable only once pushed: the upgrade waits for the movable flows.
        let p = match daemon.migrants.locked().as_mut() {
            Some(list) => {
                let (reason, code) = path_reason(flow, "websocket-inspect");
                let moved = crate::upgrade::Moved::WebSocket {
                    reason,
                    code,
                    limits,
                    client_early: crate::hex::to_hex(&p.client_early),
                    backend_early: crate::hex::to_hex(&p.backend_early),
                    client_tls: p.client.tls,
                };
                let info = crate::upgrade::MigrantInfo::of(flow, moved);
                list.push(crate::upgrade::Migrant { info, client: p.client.tcp, backend: Some(p.backend) });
                None
            }
            None => Some(p),
        };
        flow.movable.store(false, Relaxed);
        let Some(p) = p else {
            debug!(flow = flow.id, "handed to the new daemon");
            return None;
        };
        let client = Conn::resume(p.client);
        ended = match (client, TcpStream::from_std(p.backend)) {
            (Ok(client), Ok(backend)) => {
                let ends = crate::ws::Ends {
                    client,
                    client_early: p.client_early.into(),
                    backend,
                    backend_early: p.backend_early.into(),
                    flow,
                    limits,
                    idle,
                    shutdown: daemon.shutdown.subscribe(),
                };
                crate::ws::run(ends, None).await
            }
            _ => crate::ws::Ended::Closed(CloseCause::Error("lost the sockets at a hot upgrade".into())),
        };
    }
}

/// Relays a flow in user space (TLS on either side or none) until it closes
/// (`Some`), or until it is handed to a new daemon at a quiet moment of a
/// hot upgrade (`None`), with its sessions' keys (`session.rs`).
pub async fn relay_movable(
    daemon: &Daemon,
    client: Conn,
    backend: Conn,
    flow: &crate::flows::Flow,
    idle: Duration,
) -> Option<CloseCause> {
    let mut relayed = relay::relay(client, backend, flow, idle, Some(daemon.handed_over.subscribe()), None).await;
    loop {
        let (mut c, mut b) = match relayed {
            relay::Relayed::Closed(cause) => return Some(cause),
            relay::Relayed::Detached(c, b) => (c, b),
        };
        // Between records; a session may still owe the peer a record.
        use tokio::io::AsyncWriteExt;
        let flushed = c.flush().await.is_ok() && b.flush().await.is_ok();
        if flushed && c.quiet() && b.quiet() {
            // Checked, taken out and handed over under one lock: the keys
            // never leave rustls for a hand-over that has ended.
            let mut migrants = daemon.migrants.locked();
            if let Some(list) = migrants.as_mut() {
                let (reason, code) = path_reason(flow, "userspace-tls");
                return match c.park().and_then(|c| Ok((c, b.park()?))) {
                    Ok((c, b)) => {
                        let moved = match (c.tls, b.tls) {
                            (None, None) => crate::upgrade::Moved::Userspace { reason, code },
                            (client, backend) => crate::upgrade::Moved::Tls { reason, code, client, backend },
                        };
                        let info = crate::upgrade::MigrantInfo::of(flow, moved);
                        list.push(crate::upgrade::Migrant { info, client: c.tcp, backend: Some(b.tcp) });
                        debug!(flow = flow.id, "handed to the new daemon");
                        None
                    }
                    Err(why) => Some(CloseCause::Error(format!("could not hand the flow over: {why}"))),
                };
            }
        }
        // Too late, or not at rest after all: it ends here.
        relayed = relay::relay(c, b, flow, idle, None, None).await;
    }
}

/// Goes on with a flow the previous daemon handed over (hot upgrade):
/// supervised (kernel) or relayed (user space) here from where it stopped,
/// then retired here.
pub async fn adopt(daemon: Arc<Daemon>, m: crate::upgrade::Migrant) {
    use std::os::fd::AsRawFd;
    let flow = daemon.flows.adopt(m.info.carried());
    let rt = daemon.listeners.current().into_iter().find(|r| r.cfg.name == m.info.listener);
    let idx = rt.as_ref().and_then(|r| m.info.backend.and_then(|b| r.cfg.backends.iter().position(|x| *x == b)));
    let k = daemon.kernel.as_ref();
    crate::flowlog::record_with("adopt", || crate::flows::snapshot_one(&flow, k));
    let idle = rt.as_ref().map_or(crate::config::DEFAULT_IDLE_TIMEOUT, |r| r.cfg.idle_timeout);
    let _active = rt.as_ref().zip(idx).map(|(r, i)| r.activate(i));
    let client = m.client;
    let backend = match (&m.info.moved, m.backend) {
        (crate::upgrade::Moved::Http { client_tls, early, .. }, _) => {
            // An idle HTTP connection: served here from its next request.
            let early = crate::hex::from_hex(early);
            let conn = Conn::resume(crate::session::Parked { tcp: client, tls: client_tls.clone() });
            let cause = match (rt.clone().filter(|r| r.cfg.http.is_some()), conn, early) {
                (Some(rt), Ok(conn), Ok(early)) => {
                    let io = crate::http::ClientIo::new(conn, early.into());
                    crate::http::serve(io, flow.clone(), rt, daemon.clone()).await;
                    // Out of the table however it ended (closed, upgraded and
                    // moved on, or moved on idle): no guard holds it here.
                    daemon.flows.retire(&flow, k, |_| {});
                    return;
                }
                (None, ..) => CloseCause::Error(format!(
                    "listener {} is not a websocket listener in this config",
                    m.info.listener
                )),
                (_, Err(e), _) | (_, _, Err(e)) => CloseCause::Error(format!("the moved HTTP connection: {e}")),
            };
            return finish(&daemon, &flow, rt.as_deref(), None, &cause);
        }
        (_, Some(b)) => b,
        (_, None) => return finish(&daemon, &flow, None, None, &CloseCause::Error("no backend socket came".into())),
    };
    let info = m.info;
    let cause = match (&info.moved, k) {
        (crate::upgrade::Moved::Kernel { splice: s, resume }, Some(k)) => {
            k.adopt_flow(s, client.as_raw_fd(), backend.as_raw_fd());
            let cause = match both(splice::Sock::from_std(client), splice::Sock::from_std(backend)) {
                // It may move on again, at the next upgrade.
                Ok((client, backend)) => {
                    let auto = rt.as_ref().filter(|r| r.cfg.offload == Offload::Auto).map(|r| &*r.stats);
                    match supervise(&daemon, k, s, (client, backend), &flow, idle, Some(resume), auto).await {
                        Some(cause) => cause,
                        None => {
                            // Moved on: out of this daemon's table, no totals.
                            daemon.flows.retire(&flow, Some(k), |_| {});
                            return;
                        }
                    }
                }
                Err(e) => CloseCause::Error(format!("cannot watch the sockets: {e}")),
            };
            finish(&daemon, &flow, rt.as_deref(), idx, &cause);
            k.release(s);
            return;
        }
        (crate::upgrade::Moved::WebSocket { limits, client_early, backend_early, client_tls, .. }, _) => {
            let early = crate::hex::from_hex(client_early).and_then(|c| Ok((c, crate::hex::from_hex(backend_early)?)));
            let client = Conn::resume(crate::session::Parked { tcp: client, tls: client_tls.clone() });
            match (client, TcpStream::from_std(backend), early) {
                (Ok(client), Ok(backend), Ok((client_early, backend_early))) => {
                    let ends = crate::ws::Ends {
                        client,
                        client_early: client_early.into(),
                        backend,
                        backend_early: backend_early.into(),
                        flow: &flow,
                        limits: *limits,
                        idle,
                        shutdown: daemon.shutdown.subscribe(),
                    };
                    match ws_movable(&daemon, ends).await {
                        Some(cause) => cause,
                        None => {
                            daemon.flows.retire(&flow, k, |_| {});
                            return;
                        }
                    }
                }
                (Err(e), _, _) | (_, _, Err(e)) => CloseCause::Error(format!("the moved WebSocket: {e}")),
                (_, Err(e), _) => CloseCause::Error(format!("cannot register the sockets: {e}")),
            }
        }
        // A relayed flow: plain sockets, or TLS sessions carried on here.
        (crate::upgrade::Moved::Userspace { .. }, _) | (crate::upgrade::Moved::Tls { .. }, _) => {
            let (client_tls, backend_tls) = match &info.moved {
                crate::upgrade::Moved::Tls { client, backend, .. } => (client.clone(), backend.clone()),
                _ => (None, None),
            };
            let c = Conn::resume(crate::session::Parked { tcp: client, tls: client_tls.clone() });
            let b = Conn::resume(crate::session::Parked { tcp: backend, tls: backend_tls.clone() });
            match (c, b) {
                (Ok(c), Ok(b)) => match relay_movable(&daemon, c, b, &flow, idle).await {
                    Some(cause) => cause,
                    None => {
                        daemon.flows.retire(&flow, k, |_| {});
                        return;
                    }
                },
                (Err(e), _) | (_, Err(e)) => CloseCause::Error(format!("the moved TLS flow: {e}")),
            }
        }
        (crate::upgrade::Moved::Kernel { .. }, None) => {
            CloseCause::Error("a kernel flow came without the kernel maps".into())
        }
        (crate::upgrade::Moved::Http { .. }, _) => unreachable!("served above"),
    };
    finish(&daemon, &flow, rt.as_deref(), idx, &cause);
}

/// Retires an adopted flow: into its listener's totals when the listener is
/// still configured.
fn finish(daemon: &Daemon, flow: &crate::flows::Flow, rt: Option<&ListenerRt>, idx: Option<usize>, cause: &CloseCause) {
    match rt {
        Some(rt) => retire(flow, idx, cause, rt, daemon),
        None => {
            let s = daemon.flows.retire(flow, daemon.kernel.as_ref(), |_| {});
            crate::flowlog::record("close", &s, Some(cause.code()));
        }
    }
}

/// Logs the flow's close record and moves its counters into the totals.
pub fn retire(flow: &crate::flows::Flow, backend: Option<usize>, cause: &CloseCause, rt: &ListenerRt, daemon: &Daemon) {
    let s = daemon.flows.retire(flow, daemon.kernel.as_ref(), |snap| rt.stats.close(snap, backend, cause));
    crate::flowlog::record("close", &s, Some(cause.code()));
    if let CloseCause::Rejected(why) | CloseCause::Error(why) = cause {
        debug!(flow = s.id, "closed: {why}");
    }
}

/// Both results, or the first error (of two sockets set up the same way).
fn both<A, B>(a: std::io::Result<A>, b: std::io::Result<B>) -> std::io::Result<(A, B)> {
    Ok((a?, b?))
}
