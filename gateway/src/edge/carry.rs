//! Carrying a flow once its client and backend are connected (or its
//! WebSocket upgraded): on the kernel path, in the relay, or moving between
//! them (`offload: auto`), and to a successor daemon at a hot upgrade.
use crate::flow::table::Stopped;
use crate::flow::table::{Fallback, KernelRefusal};
use crate::handoff::Handed;
use crate::util::sync::Locked;
use crate::{edge::listener::ListenerRt, edge::plane::Plane};
use std::{sync::atomic::Ordering::Relaxed, time::Duration};

use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::{
    config::Offload,
    dataplane::relay,
    dataplane::splice,
    flow::stats::ListenerStats,
    flow::table::{CloseCause, FlowPath},
    kernel::sockmap::{KernelPath, Unavailable},
    tls::session::Conn,
};

/// The server side of a TLS handshake. A failure is counted per listener
/// (`tls-handshake`), costs one debug line, never a flood at warn, and
/// retires the flow.
pub async fn accept_tls(
    client: TcpStream,
    tls: &crate::tls::terminate::Tls,
    flow: &crate::flow::table::Flow,
    rt: &ListenerRt,
    plane: &Plane,
) -> Option<crate::tls::session::ServerTls> {
    // Read a record at a time, so that the session can move (`tls::session`).
    let client = crate::util::gate::Gate::new(Box::new(client), &[]);
    let accept = tokio_rustls::TlsAcceptor::from(tls.config.clone()).accept(client);
    let why = match tokio::time::timeout(tls.handshake_timeout, accept).await {
        Ok(Ok(s)) => return Some(s),
        Ok(Err(e)) => format!("TLS handshake failed: {e}"),
        Err(_) => format!("TLS handshake not finished within {:?}", tls.handshake_timeout),
    };
    rt.stats.rejected("tls-handshake");
    debug!(flow = flow.id, listener = %rt.cfg.name, client = %flow.client, "{why}");
    retire(flow, None, &CloseCause::Rejected(why), rt, plane);
    None
}

/// Closes a client before any backend is contacted, counted under `cause`.
pub(crate) fn turn_away(flow: &crate::flow::table::Flow, why: &str, cause: &str, rt: &ListenerRt, plane: &Plane) {
    rt.stats.rejected(cause);
    debug!(flow = flow.id, listener = %rt.cfg.name, client = %flow.client, "{why}");
    retire(flow, None, &CloseCause::Rejected(why.to_string()), rt, plane);
}

/// A settle stops after this many full reads (of the relay's buffer size).
const SETTLE_ROUNDS: usize = 64;

/// Makes a socket the daemon has read from fit for the sockmap. The kernel
/// hands the verdict whole skbs from the receive queue, so an skb the daemon
/// read only part of (a PROXY header, an HTTP head with the first bytes of
/// what follows it) would be carried again from its start. Reads what
/// `from` has queued until a read comes back short (the queue then holds no
/// skb begun) and writes it to `to`, counted as the daemon's bytes.
/// `Ok(false)`: the sender kept every read full for `SETTLE_ROUNDS` reads;
/// the caller relays the flow instead.
pub(crate) async fn settle(
    from: &mut TcpStream,
    to: &mut TcpStream,
    flow: &crate::flow::table::Flow,
    side: crate::flow::table::Side,
) -> std::io::Result<bool> {
    use tokio::io::AsyncWriteExt;
    // The relay's pooled buffer: no allocation per flow (most settles read
    // nothing).
    let mut buf = crate::dataplane::relay::lend();
    let settled = async {
        for _ in 0..SETTLE_ROUNDS {
            buf.clear();
            match from.try_read_buf(&mut buf) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) => return Err(e),
            }
            to.write_all(&buf).await?;
            flow.add_user(side, buf.len() as u64);
            if buf.len() < buf.capacity() {
                return Ok(true);
            }
        }
        Ok(false)
    }
    .await;
    crate::dataplane::relay::give_back(buf);
    settled
}

/// Carries a connected client/backend pair (TCP_NODELAY already set) to its
/// end: on the kernel path when the listener and the host allow it, in the
/// userspace relay otherwise. Retires the flow.
pub async fn forward(
    client: TcpStream,
    backend: TcpStream,
    idx: usize,
    flow: &crate::flow::table::Flow,
    rt: &ListenerRt,
    plane: &Plane,
    idle: Duration,
) -> CloseCause {
    let peer = flow.client;
    let kernel = match (rt.cfg.offload, &plane.kernel) {
        (Offload::Userspace, _) => Err(("offload: userspace".to_string(), Fallback::Configured)),
        (_, None) => {
            let why = plane.kernel_unavailable.as_ref().map_or("kernel path not loaded".into(), |u| u.to_string());
            let code =
                Fallback::Kernel(plane.kernel_unavailable.as_ref().map_or(KernelRefusal::Unavailable, Into::into));
            Err((why, code))
        }
        (_, Some(k)) => match k.splice(&client, &backend) {
            Ok(s) => Ok((k, s)),
            Err(e) if rt.cfg.offload == Offload::Kernel && !matches!(e, Unavailable::NotEstablished(_)) => {
                warn!(flow = flow.id, listener = %rt.cfg.name, client = %peer, "offload: kernel and the flow cannot be spliced ({e}); closing it");
                let cause = CloseCause::Rejected(e.to_string());
                retire(flow, Some(idx), &cause, rt, plane);
                return cause;
            }
            Err(e) => Err((e.to_string(), Fallback::Kernel((&e).into()))),
        },
    };
    match kernel {
        Ok((k, s)) => {
            flow.set_path(FlowPath::Kernel { client_slot: s.client_slot, backend_slot: s.backend_slot });
            crate::flow::log::record_with("handoff", || crate::flow::table::snapshot_one(flow, Some(k)));
            let (client, backend) = match both(splice::Sock::from_tokio(client), splice::Sock::from_tokio(backend)) {
                Ok((c, b)) => (c, b),
                Err(e) => {
                    warn!(flow = flow.id, "cannot watch the spliced sockets: {e}; closing the flow");
                    let cause = CloseCause::Error(e.to_string());
                    retire(flow, Some(idx), &cause, rt, plane);
                    k.release(&s);
                    return cause;
                }
            };
            let auto = (rt.cfg.offload == Offload::Auto).then_some(&*rt.stats);
            let Some(cause) = supervise(plane, k, &s, (client, backend), flow, idle, None, auto).await else {
                return CloseCause::HandedOver;
            };
            // Final counters before the slots are reused.
            retire(flow, Some(idx), &cause, rt, plane);
            k.release(&s);
            cause
        }
        Err((reason, code)) => {
            flow.set_path(FlowPath::Userspace { reason: reason.clone(), code });
            crate::flow::log::record_with("handoff", || crate::flow::table::snapshot_one(flow, plane.kernel.as_ref()));
            debug!(flow = flow.id, %reason, "relayed in user space");
            let (client, backend) = (Conn::Plain(client), Conn::Plain(backend));
            let Some(cause) = Box::pin(relay_movable(plane, client, backend, flow, idle)).await else {
                return CloseCause::HandedOver;
            };
            retire(flow, Some(idx), &cause, rt, plane);
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
pub(crate) async fn supervise(
    plane: &Plane,
    k: &KernelPath,
    s: &crate::kernel::sockmap::Splice,
    (client, backend): (splice::Sock, splice::Sock),
    flow: &crate::flow::table::Flow,
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
        let detach = Some(plane.handed_over.subscribe());
        let outcome =
            splice::Supervisor::new(k, s, (c, b), flow, idle, resume.as_ref(), auto.is_some()).run(detach).await;
        match outcome {
            splice::Outcome::Closed(cause) => return Some(cause),
            splice::Outcome::Detached(r) => {
                // To the new daemon, while it still takes flows.
                let held = socks.take().expect("taken once, then returned");
                let handed = plane.migrants.offer(flow, held, |(client, backend)| {
                    let moved = crate::handoff::Moved::Kernel { splice: s.clone(), resume: r.clone() };
                    Ok::<_, std::convert::Infallible>((moved, client.into_inner(), Some(backend.into_inner())))
                });
                let handed = match handed {
                    Handed::Taken => true,
                    Handed::NotTaking(held) => {
                        socks = Some(held);
                        false
                    }
                    Handed::Failed(never) => match never {},
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
                return match Box::pin(splice::Supervisor::new(k, s, (c, b), flow, idle, Some(&r), false).run(None))
                    .await
                {
                    splice::Outcome::Closed(cause) => Some(cause),
                    _ => unreachable!("no detach without a receiver, no move without auto"),
                };
            }
            splice::Outcome::ToUserspace(mut r, why) => {
                let stats = auto.expect("moves only with offload: auto");
                let (client, backend) = socks.take().expect("the sockets are back at each turn");
                let path = |relayed: bool| match relayed {
                    true => crate::flow::table::FlowPath::Relayed {
                        client_slot: s.client_slot,
                        backend_slot: s.backend_slot,
                        reason: why.reason().to_string(),
                        code: why.fallback(),
                    },
                    false => crate::flow::table::FlowPath::Kernel {
                        client_slot: s.client_slot,
                        backend_slot: s.backend_slot,
                    },
                };
                flow.switch_path(path(true), format!("to-userspace: {}", why.code()));
                stats.switched("userspace", why.code());
                crate::flow::log::record_with("switch", || crate::flow::table::snapshot_one(flow, Some(k)));
                let client = client.into_inner();
                let backend = backend.into_inner();
                let (client, backend) = match both(TcpStream::from_std(client), TcpStream::from_std(backend)) {
                    Ok((c, b)) => (c, b),
                    Err(e) => {
                        return Some(CloseCause::Error(format!("cannot relay the flow: {e}")));
                    }
                };
                let user = |f: &crate::flow::table::Flow| (f.user_c2b.load(Relaxed), f.user_b2c.load(Relaxed));
                let before = user(flow);
                // Boxed, as the other rare turns: a flow on the kernel path
                // holds only what that path needs.
                let relayed = Box::pin(relay_demoted(plane, k, s, client, backend, flow, idle, light_for));
                let (client, backend, back_why) = match relayed.await {
                    Stopped::Closed(cause) => return Some(cause),
                    Stopped::Detached((c, b, w)) => (c, b, w),
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
                crate::flow::log::record_with("switch", || crate::flow::table::snapshot_one(flow, Some(k)));
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

/// Detached: stopped at a quiet moment (nothing held, no EOF); the sockets,
/// and why.
type Relayed = Stopped<(TcpStream, TcpStream, &'static str)>;

/// Relays a flow `offload: auto` took off the kernel path until it closes,
/// or until it has been light for `light_for` (`light`: interactive
/// again, where the kernel path costs less and answers sooner) or a hot
/// upgrade starts (`hand-over`: kernel flows move to the new daemon); then
/// stops at a quiet moment and gives the sockets back.
#[allow(clippy::too_many_arguments)]
async fn relay_demoted(
    plane: &Plane,
    k: &KernelPath,
    s: &crate::kernel::sockmap::Splice,
    client: TcpStream,
    backend: TcpStream,
    flow: &crate::flow::table::Flow,
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
    let eof_ok = |side: crate::flow::table::Side, read: u64| {
        let (slot, before) = match side {
            crate::flow::table::Side::Client => (s.client_slot, read_before.0),
            crate::flow::table::Side::Backend => (s.backend_slot, read_before.1),
        };
        before + read >= k.slot(slot).passed
    };
    let relay = relay::relay(Conn::Plain(client), Conn::Plain(backend), flow, idle, Some(rx), Some(&eof_ok));
    tokio::pin!(relay);
    let mut handed = plane.handed_over.subscribe();
    let monitor = async {
        let moved = || flow.user_c2b.load(Relaxed) + flow.user_b2c.load(Relaxed);
        let queued = || crate::util::sys::outq(&fds.0).unwrap_or(0).max(crate::util::sys::outq(&fds.1).unwrap_or(0));
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
                Stopped::Closed(cause) => Stopped::Closed(cause),
                Stopped::Detached((Conn::Plain(c), Conn::Plain(b))) => Stopped::Detached((c, b, why.unwrap_or("light"))),
                Stopped::Detached(..) => unreachable!("plain sockets in, plain sockets out"),
            },
            w = &mut monitor, if why.is_none() => {
                why = Some(w);
                let _ = tx.send(true);
            }
        }
    }
}

/// The flow's fallback reason and code, as a moved flow carries them.
fn path_reason(flow: &crate::flow::table::Flow, default: Fallback) -> (String, String) {
    match flow.path.locked().clone() {
        FlowPath::Userspace { reason, code } => (reason, code.code().to_string()),
        _ => (String::new(), default.code().to_string()),
    }
}

/// Runs a terminated WebSocket flow (inspect, bridge_tcp) until it closes
/// (`Some`), or until it is handed to a new daemon between messages at a hot
/// upgrade (`None`).
pub async fn ws_movable(plane: &Plane, ends: crate::dataplane::ws::Ends<'_>) -> Option<CloseCause> {
    use std::sync::atomic::Ordering::Relaxed;
    let flow = ends.flow;
    let (limits, idle) = (ends.limits, ends.idle);
    flow.movable.store(true, Relaxed);
    let mut ended = crate::dataplane::ws::run(ends, Some(plane.handed_over.subscribe())).await;
    loop {
        let p = match ended {
            Stopped::Closed(cause) => {
                flow.movable.store(false, Relaxed);
                return Some(cause);
            }
            Stopped::Detached(p) => p,
        };
        // To the new daemon while it still takes flows; else on here. Not
        // movable only once pushed: the upgrade waits for the movable flows.
        let handed = plane.migrants.offer(flow, p, |p| {
            let (reason, code) = path_reason(flow, Fallback::WebSocketInspect);
            let moved = crate::handoff::Moved::WebSocket {
                reason,
                code,
                limits,
                client_early: crate::util::hex::to_hex(&p.client_early),
                backend_early: crate::util::hex::to_hex(&p.backend_early),
                client_tls: p.client.tls,
            };
            Ok::<_, std::convert::Infallible>((moved, p.client.tcp, Some(p.backend)))
        });
        let p = match handed {
            Handed::Taken => None,
            Handed::NotTaking(p) => Some(p),
            Handed::Failed(never) => match never {},
        };
        flow.movable.store(false, Relaxed);
        let Some(p) = p else {
            debug!(flow = flow.id, "handed to the new daemon");
            return None;
        };
        let client = Conn::resume(p.client);
        ended = match (client, TcpStream::from_std(p.backend)) {
            (Ok(client), Ok(backend)) => {
                let ends = crate::dataplane::ws::Ends {
                    client,
                    client_early: p.client_early.into(),
                    backend,
                    backend_early: p.backend_early.into(),
                    flow,
                    limits,
                    idle,
                    shutdown: plane.shutdown.subscribe(),
                };
                crate::dataplane::ws::run(ends, None).await
            }
            _ => Stopped::Closed(CloseCause::Error("lost the sockets at a hot upgrade".into())),
        };
    }
}

/// Relays a flow in user space (TLS on either side or none) until it closes
/// (`Some`), or until it is handed to a new daemon at a quiet moment of a
/// hot upgrade (`None`), with its sessions' keys (`tls::session`).
pub async fn relay_movable(
    plane: &Plane,
    client: Conn,
    backend: Conn,
    flow: &crate::flow::table::Flow,
    idle: Duration,
) -> Option<CloseCause> {
    let mut relayed = relay::relay(client, backend, flow, idle, Some(plane.handed_over.subscribe()), None).await;
    loop {
        let (mut c, mut b) = match relayed {
            Stopped::Closed(cause) => return Some(cause),
            Stopped::Detached((c, b)) => (c, b),
        };
        // Between records; a session may still owe the peer a record.
        use tokio::io::AsyncWriteExt;
        let flushed = c.flush().await.is_ok() && b.flush().await.is_ok();
        if flushed && c.quiet() && b.quiet() {
            // Checked, taken out and handed over under one lock: the keys
            // never leave rustls for a hand-over that has ended.
            let handed = plane.migrants.offer(flow, (c, b), |(c, b)| -> Result<_, crate::tls::session::MoveError> {
                let (reason, code) = path_reason(flow, Fallback::Tls);
                let (c, b) = c.park().and_then(|c| Ok((c, b.park()?)))?;
                let moved = match (c.tls, b.tls) {
                    (None, None) => crate::handoff::Moved::Userspace { reason, code },
                    (client, backend) => crate::handoff::Moved::Tls { reason, code, client, backend },
                };
                Ok((moved, c.tcp, Some(b.tcp)))
            });
            match handed {
                Handed::Taken => {
                    debug!(flow = flow.id, "handed to the new daemon");
                    return None;
                }
                Handed::NotTaking(held) => (c, b) = held,
                Handed::Failed(why) => return Some(CloseCause::Error(format!("could not hand the flow over: {why}"))),
            }
        }
        // Too late, or not at rest after all: it ends here.
        relayed = relay::relay(c, b, flow, idle, None, None).await;
    }
}

/// Retires an adopted flow: into its listener's totals when the listener is
/// still configured.
pub(crate) fn finish(
    plane: &Plane,
    flow: &crate::flow::table::Flow,
    rt: Option<&ListenerRt>,
    idx: Option<usize>,
    cause: &CloseCause,
) {
    match rt {
        Some(rt) => retire(flow, idx, cause, rt, plane),
        None => {
            let s = plane.flows.retire(flow, plane.kernel.as_ref(), |_| {});
            crate::flow::log::record("close", &s, Some(cause.code()));
        }
    }
}

/// Logs the flow's close record and moves its counters into the totals.
pub fn retire(
    flow: &crate::flow::table::Flow,
    backend: Option<usize>,
    cause: &CloseCause,
    rt: &ListenerRt,
    plane: &Plane,
) {
    let s = plane.flows.retire(flow, plane.kernel.as_ref(), |snap| rt.stats.close(snap, backend, cause));
    crate::flow::log::record("close", &s, Some(cause.code()));
    if let CloseCause::Rejected(why) | CloseCause::Error(why) = cause {
        debug!(flow = s.id, "closed: {why}");
    }
}

/// Both results, or the first error (of two sockets set up the same way).
pub(crate) fn both<A, B>(a: std::io::Result<A>, b: std::io::Result<B>) -> std::io::Result<(A, B)> {
    Ok((a?, b?))
}
