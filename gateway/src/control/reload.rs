//! The set of running listeners, and reloading it from a new config file
//! (SIGHUP or `gateway reload`) without touching established flows.
//!
//! - The new file is validated first; a bad file changes nothing.
//! - Listeners are matched by name. Same name and bind: new flows get the new
//!   settings, the socket stays open, stats carry over when the backend list
//!   is unchanged. A changed bind, or a new name, binds a new socket; every
//!   bind is done before anything is applied, so a failed bind changes nothing.
//! - Removed listeners stop accepting; their flows go on until they end.
//! - Established flows keep the settings they started with (kernel and
//!   userspace alike): each holds its own reference to its listener's state.
use crate::util::sync::Locked;
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
};

use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{
    config::{Config, Listener},
    control::daemon::Daemon,
    edge::listener::{ListenerRt, Running, Settings},
    edge::proxy,
    policy::limits::Global,
};

fn spawn_checks(rt: &Arc<ListenerRt>) -> JoinHandle<()> {
    let rt = rt.clone();
    // A backend the gateway sends PROXY headers to may refuse a connection
    // without one: its checks start with a LOCAL header (HAProxy's
    // `check-send-proxy`).
    let first: Vec<Option<Vec<u8>>> = (0..rt.cfg.backends.len())
        .map(|i| {
            let version = match rt.cfg.http() {
                None => rt.cfg.send_proxy,
                Some(http) => http
                    .routes
                    .iter()
                    .filter(|r| r.backends.contains(&i))
                    .find_map(|r| r.send_proxy.or(rt.cfg.send_proxy)),
            };
            version.map(crate::edge::proxy_header::encode_local)
        })
        .collect();
    tokio::spawn(async move { crate::policy::health::check(&rt.health, &rt.cfg.name, &rt.cfg.backends, &first).await })
}

/// Starts serving an already bound listener.
pub fn start(daemon: &Arc<Daemon>, sock: tokio::net::TcpListener, rt: Arc<ListenerRt>) {
    info!(listener = %rt.cfg.name, local = %rt.local, offload = %rt.cfg.offload, backends = rt.cfg.backends.len(), "listening");
    let checks = spawn_checks(&rt);
    let bind = rt.cfg.bind;
    let name = rt.cfg.name.clone();
    let slot: Settings = Arc::new(Mutex::new(rt));
    let dup = match std::os::fd::AsFd::as_fd(&sock).try_clone_to_owned() {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(listener = %name, "cannot duplicate the listening socket ({e}); not serving it");
            checks.abort();
            return;
        }
    };
    let accept = Some(tokio::spawn(proxy::serve(sock, slot.clone(), daemon.plane.clone())));
    daemon
        .plane
        .listeners
        .running
        .locked()
        .insert(name, Running { settings: slot, bind, accept, checks, sock: Some(dup) });
}

/// Binds a listener's socket: reuse-address, IPv6-only for IPv6, backlog 4096.
pub fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    tokio::net::TcpListener::from_std(s.into())
}

/// Reloads from `path` (on a node of a fleet: its own file, with the
/// fleet's document running). On success, returns a one-line summary.
pub async fn reload(daemon: &Arc<Daemon>, path: &Path, global: &Arc<Global>) -> Result<String, String> {
    // The config is built under the lock: a fleet document applied meanwhile
    // is then the one merged, never rolled back.
    let stopped = daemon.plane.listeners.reloading.lock().await;
    let cfg = match &daemon.fleet {
        Some(node) => node.reload_own(),
        None => Config::load(path),
    }
    .map_err(|e| format!("reload rejected, the running config stays: {e}"))?;
    apply_locked(daemon, cfg, &path.display().to_string(), global, *stopped).await
}

/// Applies a validated config (from the file, or a fleet's document named by
/// `source`) without touching established flows: binds what is new before
/// changing anything, then swaps each listener's settings. On success, a
/// one-line summary.
pub async fn apply(daemon: &Arc<Daemon>, cfg: Config, source: &str, global: &Arc<Global>) -> Result<String, String> {
    let stopped = daemon.plane.listeners.reloading.lock().await;
    apply_locked(daemon, cfg, source, global, *stopped).await
}

/// `apply`, with the reload lock held by the caller; `stopped`: accepting
/// has ended (drain or hot upgrade).
async fn apply_locked(
    daemon: &Arc<Daemon>,
    cfg: Config,
    source: &str,
    global: &Arc<Global>,
    stopped: bool,
) -> Result<String, String> {
    if stopped {
        return Err(format!("{source} not applied: the daemon has stopped accepting (drain or hot upgrade)"));
    }
    for w in cfg.warnings() {
        warn!("reload: {w}");
    }
    let old = daemon.config.locked().clone();
    for (what, changed) in [
        ("kernel", format!("{:?}", cfg.kernel) != format!("{:?}", old.kernel)),
        ("admin", format!("{:?}", cfg.admin) != format!("{:?}", old.admin)),
        ("log", format!("{:?}", cfg.log) != format!("{:?}", old.log)),
        ("limits", cfg.max_connections != old.max_connections),
        ("drain_timeout", cfg.drain_timeout != old.drain_timeout),
        ("workers", cfg.workers != old.workers),
    ] {
        if changed {
            warn!("reload: changes to `{what}` take effect at the next restart");
        }
    }

    // Bind what is new before changing anything.
    let running: BTreeMap<String, (SocketAddr, Arc<ListenerRt>)> = daemon
        .plane
        .listeners
        .running
        .locked()
        .iter()
        .map(|(n, r)| (n.clone(), (r.bind, r.settings.locked().clone())))
        .collect();
    let mut fresh: Vec<(Listener, tokio::net::TcpListener)> = Vec::new();
    for l in &cfg.listeners {
        if running.get(&l.name).is_some_and(|(bind, _)| *bind == l.bind) {
            continue;
        }
        let sock = bind(l.bind).map_err(|e| {
            format!("reload rejected, the running config stays: listener {:?}: cannot bind {}: {e}", l.name, l.bind)
        })?;
        fresh.push((l.clone(), sock));
    }

    let (mut updated, mut added, mut removed) = (0, 0, 0);
    let wanted: Vec<&str> = cfg.listeners.iter().map(|l| l.name.as_str()).collect();
    {
        let mut run = daemon.plane.listeners.running.locked();
        // Removed listeners (and listeners whose bind changed) stop accepting.
        let gone: Vec<String> = run
            .iter()
            .filter(|(n, r)| {
                !wanted.contains(&n.as_str()) || cfg.listeners.iter().any(|l| &l.name == *n && l.bind != r.bind)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            if let Some(mut r) = run.remove(&n) {
                r.stop();
                if !wanted.contains(&n.as_str()) {
                    removed += 1;
                    info!(listener = %n, "reload: listener removed; its flows go on until they end");
                }
            }
        }
        // Same name and bind: new settings for new flows.
        for l in &cfg.listeners {
            let Some(r) = run.get_mut(&l.name) else { continue };
            let (_, prev) = &running[&l.name];
            let rt = Arc::new(ListenerRt::carry_over(l.clone(), prev, global.clone()));
            r.checks.abort();
            r.checks = spawn_checks(&rt);
            *r.settings.locked() = rt;
            updated += 1;
        }
    }
    for (l, sock) in fresh {
        let local = sock.local_addr().map_err(|e| e.to_string())?;
        let rt = match running.get(&l.name) {
            Some((_, prev)) => {
                // Rebound to a new address: updated, not added.
                updated += 1;
                ListenerRt::carry_over(l, prev, global.clone()).with_local(local)
            }
            None => {
                added += 1;
                ListenerRt::new(l, local, global.clone())
            }
        };
        start(daemon, sock, Arc::new(rt));
    }
    let closing = close_changed(&daemon.plane, &old, &cfg);
    *daemon.config.locked() = cfg;
    let mut summary = format!("reloaded {source}: {updated} listener(s) updated, {added} added, {removed} removed");
    if closing > 0 {
        summary += &format!("; {closing} flow(s) of changed routes closing (on_change: close)");
    }
    info!("{summary}");
    Ok(summary)
}

/// `on_change: close`: ends the established flows whose TCP listener or
/// websocket route the new config changed or removed (the policy is the new
/// config's where the route stays, the old one's where it went). Returns how
/// many. HTTP connections that have not upgraded are not touched: their next
/// request goes by the new config anyway.
fn close_changed(plane: &crate::edge::plane::Plane, old: &Config, new: &Config) -> usize {
    use crate::config::OnChange;
    // (listener, route name; None for a TCP listener's every flow).
    let mut changed: Vec<(&str, Option<String>)> = Vec::new();
    for o in &old.listeners {
        let n = new.listeners.iter().find(|l| l.name == o.name);
        match o.http() {
            None => {
                let policy = n.map_or(o.on_change, |n| n.on_change);
                if policy == OnChange::Close && n.is_none_or(|n| n.fingerprint() != o.fingerprint()) {
                    changed.push((&o.name, None));
                }
            }
            Some(h) => {
                for r in &h.routes {
                    let name = r.name();
                    let now = n.and_then(|n| Some((n, n.http()?.routes.iter().find(|x| x.name() == name)?)));
                    let policy = match now {
                        Some((nl, nr)) => nr.on_change.unwrap_or(nl.on_change),
                        None => r.on_change.unwrap_or(o.on_change),
                    };
                    let moved = now.is_none_or(|(nl, nr)| nr.fingerprint(nl) != r.fingerprint(o));
                    if policy == OnChange::Close && moved {
                        changed.push((&o.name, Some(name)));
                    }
                }
            }
        }
    }
    if changed.is_empty() {
        return 0;
    }
    let flows = plane.flows.matching(|f| {
        !matches!(*f.path.locked(), crate::flow::table::FlowPath::Connecting)
            && changed.iter().any(|(l, r)| {
                *l == f.listener && r.as_ref().is_none_or(|r| f.route.locked().as_deref() == Some(r.as_str()))
            })
    });
    let now = crate::util::sys::monotonic_ns();
    for f in &flows {
        f.ending.set(now, &crate::flow::table::CloseCause::RouteChanged);
    }
    for (l, r) in &changed {
        info!(listener = %l, route = r.as_deref().unwrap_or("(all)"), "reload: changed with on_change: close; its flows are closed");
    }
    flows.len()
}
