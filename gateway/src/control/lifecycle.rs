//! The daemon's life, from set-up through serving to the drain (`run`).
//!
//! Set-up takes, in order: the signal handlers; a predecessor's listening
//! sockets and kernel maps (hot upgrade); the kernel path; every listener's
//! socket, the metrics endpoint and the admin socket (a bad bind starts
//! nothing); then it drops the capabilities it no longer needs and serves.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{error, info, warn};

use crate::{
    config::{Config, Offload},
    control::{admin, daemon::Daemon, reload, upgrade},
    edge::{listener::ListenerRt, plane::Plane},
    kernel::sockmap::{KernelPath, Unavailable},
    policy::limits::Global,
    util::sys,
};

/// Why the daemon did not start, or stopped short.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot install the signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("--takeover")]
    Takeover(#[from] upgrade::TakeoverError),
    #[error("--takeover: the hand-over task failed")]
    TakeoverTask(#[source] tokio::task::JoinError),
    #[error("--takeover: cannot adopt the kernel maps")]
    Adopt(#[from] crate::kernel::sockmap::AdoptError),
    #[error("listener {listener:?} has offload: kernel, but the kernel path is unavailable: {why}")]
    KernelRequired { listener: String, why: Unavailable },
    #[error("listener {listener:?}: cannot bind {addr}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin.metrics: cannot bind {addr}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin.socket: cannot {what} {path}")]
    AdminSocket {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fleet")]
    Fleet(#[from] crate::control::fleet::StartError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The signals the daemon answers: SIGTERM and SIGINT drain, SIGHUP reloads.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> Result<Self, RunError> {
        let on = |k| signal(k).map_err(RunError::Signals);
        Ok(Self {
            term: on(SignalKind::terminate())?,
            int: on(SignalKind::interrupt())?,
            hup: on(SignalKind::hangup())?,
        })
    }

    /// The next SIGTERM or SIGINT, by name.
    async fn stop(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Runs the daemon until a signal has drained it, or, after a hot upgrade,
/// until its last flow has ended.
pub async fn run(cfg: Config, config_path: &Path, takeover: bool) -> Result<(), RunError> {
    // Handlers first: a SIGHUP or SIGTERM that arrives once the admin socket
    // answers must find them in place (the default action would kill us).
    let mut signals = Signals::install()?;
    // A hot upgrade takes the running daemon's listening sockets, and its
    // kernel maps, first.
    let mut taken = match takeover {
        true => {
            let t = upgrade::take(&cfg.admin.socket)?;
            info!(from_pid = t.from_pid, kernel_maps = t.kernel.is_some(), "upgrade: listening sockets received");
            Some(t)
        }
        false => None,
    };
    // On a node of a fleet, the fleet's document (or the cached one) says
    // what to serve.
    let (mut cfg, fleet) = match cfg.fleet {
        Some(_) => {
            let (cfg, node) = crate::control::fleet::start(cfg, config_path).await?;
            (cfg, Some(node))
        }
        None => (cfg, None),
    };
    let (kernel, unavailable) = kernel_path(&cfg, taken.as_mut())?;
    // A fleet node whose document this host cannot serve starts with no
    // listener and says why (a crash here would only restart into the same).
    if let (Some(node), Some(why)) = (&fleet, &unavailable) {
        if let Some(l) = cfg.listeners.iter().find(|l| l.offload == Offload::Kernel) {
            let e = format!("listener {:?} has offload: kernel, but the kernel path is unavailable: {why}", l.name);
            cfg = crate::control::fleet::refuse_at_start(node, e)?;
        }
    }
    let global = Arc::new(Global { max: Some(connection_cap(&cfg)), ..Default::default() });
    // Bind everything before serving anything: a bad bind starts nothing.
    let bound = match bind_all(&cfg, taken.as_mut(), &global) {
        Ok(bound) => bound,
        Err(e) => match &fleet {
            Some(node) => {
                cfg = crate::control::fleet::refuse_at_start(node, anyhow_chain(&e))?;
                Vec::new()
            }
            None => return Err(e),
        },
    };
    let metrics = match cfg.admin.metrics {
        Some(addr) => {
            Some(tokio::net::TcpListener::bind(addr).await.map_err(|source| RunError::Metrics { addr, source })?)
        }
        None => None,
    };
    let admin_error = |what| {
        let path = cfg.admin.socket.clone();
        move |source| RunError::AdminSocket { what, path, source }
    };
    let (mut admin_guard, admin_listener) =
        admin::AdminServer::bind(&cfg.admin.socket, cfg.admin.group.as_ref().map(|g| g.1), taken.is_some())
            .map_err(admin_error("bind"))?;
    let daemon = Arc::new(Daemon {
        plane: Arc::new(Plane {
            flows: Default::default(),
            listeners: Default::default(),
            kernel,
            kernel_unavailable: unavailable,
            handoff_delay: handoff_delay(),
            shutdown: tokio::sync::watch::channel(false).0,
            handed_over: tokio::sync::watch::channel(false).0,
            migrants: Default::default(),
        }),
        config: std::sync::Mutex::new(cfg.clone()),
        config_path: config_path.to_path_buf(),
        global: global.clone(),
        metrics: metrics.as_ref().and_then(|m| m.local_addr().ok()),
        handover_done: Default::default(),
        fleet: fleet.clone(),
    });
    for (sock, rt) in bound {
        reload::start(&daemon, sock, rt);
    }
    drop_capabilities();
    tokio::spawn(admin::serve(admin_listener, daemon.clone()));
    let d = daemon.clone();
    tokio::spawn(crate::flow::log::periodic(
        move || d.plane.flows.snapshot(d.plane.kernel.as_ref()),
        cfg.log.flow_interval,
    ));
    if let Some(node) = fleet {
        tokio::spawn(crate::control::fleet::run(daemon.clone(), node));
    }
    if let Some(m) = metrics {
        info!(metrics = %m.local_addr()?, "serving Prometheus metrics at /metrics");
        tokio::spawn(admin::serve_metrics(m, daemon.clone()));
    }
    info!(
        admin = %cfg.admin.socket.display(),
        kernel_path = daemon.plane.kernel.is_some(),
        workers = cfg.workers.resolve(),
        "gateway running"
    );
    if let Some(t) = taken {
        let from = t.from_pid;
        // Blocking, briefly: a line each way, then the flows, on a local socket.
        let (moved, free) =
            tokio::task::spawn_blocking(move || t.confirm()).await.map_err(RunError::TakeoverTask)??;
        if let Some(k) = &daemon.plane.kernel {
            k.add_free(&free);
            k.predecessor_sealed();
            k.take_wakeups();
            // The flows that stayed behind release their slots as they end:
            // taken here, so that no upgrade loses capacity.
            let d = daemon.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                while d.plane.kernel.as_ref().is_some_and(|k| k.sweep() > 0) {
                    every.tick().await;
                }
            });
        }
        // The old daemon answered on the admin path until now.
        admin_guard.publish().map_err(admin_error("move to"))?;
        info!(
            from_pid = from,
            moved_flows = moved.len(),
            "upgrade: the old daemon stopped accepting; this one serves every listener"
        );
        for m in moved {
            tokio::spawn(crate::edge::proxy::adopt(daemon.plane.clone(), m));
        }
    }
    let Some(signal) = serve(&daemon, &mut signals).await else {
        info!("upgrade: every flow of this process has ended; exiting");
        leave(&daemon);
        return Ok(());
    };
    drain(&daemon, &mut signals, signal, cfg.drain_timeout).await;
    leave(&daemon);
    Ok(())
}

/// The kernel path, loaded once for all listeners that may use it, or
/// adopted from the daemon taken over (whose verdict stays attached); or
/// why there is none. A listener with `offload: kernel` needs it.
fn kernel_path(
    cfg: &Config,
    taken: Option<&mut upgrade::Taken>,
) -> Result<(Option<KernelPath>, Option<Unavailable>), RunError> {
    // A fleet node's listeners come and go with the fleet's document: it
    // loads the kernel path whatever it serves at start.
    let wants_kernel = cfg.fleet.is_some() || cfg.listeners.iter().any(|l| l.offload != Offload::Userspace);
    let (kernel, unavailable) = match taken.and_then(|t| t.kernel.take()) {
        Some((info, fds)) => {
            if cfg.kernel.pin_path.is_some() {
                warn!("upgrade: the adopted kernel maps are not pinned again; kernel.pin_path applies at the next cold start");
            }
            (Some(KernelPath::adopt(&info, fds)?), None)
        }
        None if wants_kernel => match KernelPath::load(&cfg.kernel) {
            Ok(k) => (Some(k), None),
            Err(e) => (None, Some(e)),
        },
        None => (None, None),
    };
    if let Some(why) = &unavailable {
        for l in &cfg.listeners {
            match l.offload {
                // A fleet node refuses the document instead (see `run`).
                Offload::Kernel if cfg.fleet.is_some() => {}
                Offload::Kernel => {
                    return Err(RunError::KernelRequired { listener: l.name.clone(), why: why.clone() });
                }
                Offload::Auto => {
                    warn!(listener = %l.name, "kernel path unavailable, flows will be relayed in user space: {why}")
                }
                Offload::Userspace => {}
            }
        }
    }
    Ok((kernel, unavailable))
}

/// Binds every listener of `cfg` (or claims its socket from the daemon taken
/// over).
fn bind_all(
    cfg: &Config,
    mut taken: Option<&mut upgrade::Taken>,
    global: &Arc<Global>,
) -> Result<Vec<(tokio::net::TcpListener, Arc<ListenerRt>)>, RunError> {
    let mut bound = Vec::new();
    for l in &cfg.listeners {
        let sock = match taken.as_mut().and_then(|t| t.claim(&l.name, l.bind)) {
            Some(s) => tokio::net::TcpListener::from_std(s)?,
            None => reload::bind(l.bind).map_err(|source| RunError::Bind {
                listener: l.name.clone(),
                addr: l.bind,
                source,
            })?,
        };
        let local = sock.local_addr()?;
        bound.push((sock, Arc::new(ListenerRt::new(l.clone(), local, global.clone()))));
    }
    Ok(bound)
}

/// An error and its sources, on one line.
fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s = format!("{s}: {c}");
        source = c.source();
    }
    s
}

/// Test hook (`GATEWAY_TEST_HANDOFF_DELAY_MS`, see `Plane::handoff_delay`).
fn handoff_delay() -> Duration {
    std::env::var("GATEWAY_TEST_HANDOFF_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::ZERO, Duration::from_millis)
}

/// Set-up is over: programs loaded, sockets bound. Keep CAP_NET_ADMIN
/// (SO_SNDBUFFORCE for the queue bound) and CAP_NET_BIND_SERVICE (listeners
/// added by a reload); every other capability goes.
fn drop_capabilities() {
    const CAP_NET_BIND_SERVICE: u64 = 1 << 10;
    const CAP_NET_ADMIN: u64 = 1 << 12;
    match sys::drop_capabilities_except(CAP_NET_ADMIN | CAP_NET_BIND_SERVICE) {
        Ok(d) if d.bounding => {
            info!(capabilities = format!("{:#x}", d.kept), "dropped every capability not needed after set-up")
        }
        Ok(d) => info!(
            capabilities = format!("{:#x}", d.kept),
            "dropped every capability not needed after set-up; the bounding set stays as started \
             (no CAP_SETPCAP: the service manager's bounding set is the limit)"
        ),
        Err(e) => warn!("could not drop capabilities: {e}"),
    }
}

/// Serves until a stop signal (returned by name), reloading on SIGHUP. After
/// a hot upgrade, returns `None` once the moving flows are sent and every
/// flow left here has ended; a signal still drains them as usual.
async fn serve(daemon: &Arc<Daemon>, signals: &mut Signals) -> Option<&'static str> {
    let mut handed_over = daemon.plane.handed_over.subscribe();
    loop {
        tokio::select! {
            _ = signals.term.recv() => return Some("SIGTERM"),
            _ = signals.int.recv() => return Some("SIGINT"),
            _ = signals.hup.recv() => {
                // The outcome is logged either way; a bad file changes nothing.
                if let Err(e) = reload::reload(daemon, &daemon.config_path, &daemon.global).await {
                    error!("{e}");
                }
            }
            _ = handed_over.wait_for(|h| *h) => {
                // The listeners are the new process's now. Open flows go on
                // here until they end.
                let ended = async {
                    let sent = || daemon.handover_done.load(Ordering::Acquire);
                    while !(sent() && daemon.plane.flows.is_empty()) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                };
                return tokio::select! {
                    () = ended => None,
                    s = signals.stop() => Some(s),
                };
            }
        }
    }
}

/// Stops accepting (the listening sockets close), then lets open flows
/// finish for up to `drain_timeout`; a second signal ends it at once.
async fn drain(daemon: &Daemon, signals: &mut Signals, signal: &str, drain_timeout: Duration) {
    let plane = &daemon.plane;
    plane.listeners.stop_all().await;
    // Idle HTTP connections close; inspect-mode WebSockets get close 1001.
    plane.shutdown.send_replace(true);
    info!(signal, open_flows = plane.flows.len(), ?drain_timeout, "stopped accepting; draining");
    let drained = async {
        while !plane.flows.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        () = drained => info!("all flows finished; exiting"),
        () = tokio::time::sleep(drain_timeout) => {
            warn!(open_flows = plane.flows.len(), "drain_timeout reached; closing the remaining flows");
        }
        _ = signals.stop() => warn!(open_flows = plane.flows.len(), "second signal: exiting at once"),
    }
}

/// Pins go first (unless kept): with them gone, the programs and maps go
/// with the process. Returning from `run` drops the runtime: every flow's
/// sockets close, which also takes them out of the sockmap.
fn leave(daemon: &Daemon) {
    if let Some(k) = &daemon.plane.kernel {
        k.leave();
        k.unpin();
    }
}

/// Descriptors kept aside from flows: the admin socket and its clients, the
/// metrics endpoint, health checks, BPF maps and programs, the wake thread's
/// epoll set, the log, a hot upgrade's channel.
const RESERVED_FDS: u64 = 256;

/// The daemon-wide cap on concurrent connections: `limits.max_connections`,
/// or else what the open-files limit (raised to the hard one first) holds
/// at two descriptors a flow, so that a flood is turned away at admission
/// (counted, `global-max-connections`) instead of failing accepts and
/// backend connects.
fn connection_cap(cfg: &Config) -> u64 {
    let nofile = match sys::raise_nofile_limit() {
        Ok((before, after)) => {
            if after > before {
                info!(from = before, to = after, "raised the open-files limit");
            }
            after
        }
        Err(e) => {
            warn!("cannot read the open-files limit: {e}");
            u64::MAX
        }
    };
    let (cap, over) = cap_for(cfg.max_connections, nofile, cfg.listeners.len());
    match (cfg.max_connections, over) {
        (Some(n), Some(fits)) => warn!(
            "limits.max_connections {n} is more than the open-files limit {nofile} holds (about {fits} flows \
             at two descriptors each): past that, clients are turned away as local-resources"
        ),
        (Some(_), None) => {}
        (None, _) => info!(
            max_connections = cap,
            open_files = nofile,
            "connection cap from the open-files limit (set limits.max_connections to choose)"
        ),
    }
    cap
}

/// The cap, and how many flows the descriptors hold when the configured cap
/// is more than that.
fn cap_for(configured: Option<u64>, nofile: u64, listeners: usize) -> (u64, Option<u64>) {
    let fits = (nofile.saturating_sub(RESERVED_FDS + listeners as u64) / 2).max(1);
    match configured {
        Some(n) if n > fits && nofile != libc::RLIM_INFINITY => (n, Some(fits)),
        Some(n) => (n, None),
        None => (fits, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_follows_the_descriptors_unless_configured() {
        // Two descriptors a flow, after the reserve and the listeners.
        assert_eq!(cap_for(None, 20_000, 4), ((20_000 - 256 - 4) / 2, None));
        assert_eq!(cap_for(None, 100, 4), (1, None), "never zero");
        assert_eq!(cap_for(Some(500), 20_000, 4), (500, None));
        assert_eq!(cap_for(Some(50_000), 20_000, 4), (50_000, Some(9_870)), "kept, with a warning");
        assert_eq!(cap_for(Some(50_000), libc::RLIM_INFINITY, 4), (50_000, None));
    }
}
