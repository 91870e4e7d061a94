//! Accepting clients of TCP listeners, and taking over the flows a
//! predecessor daemon hands over (hot upgrade).
use crate::flow::table::Fallback;
use crate::util::sync::Locked;
use crate::{
    edge::carry::{accept_tls, both, finish, forward, relay_movable, retire, supervise, turn_away, ws_movable},
    edge::listener::{connect, ListenerRt},
    edge::plane::Plane,
};
use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::{
    config::Offload,
    dataplane::splice,
    flow::table::{CloseCause, FlowPath},
    tls::session::Conn,
};

pub async fn serve(listener: TcpListener, slot: crate::edge::listener::Settings, plane: Arc<Plane>) {
    let mut last_warned = None;
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                // The settings in force when the client arrived stay with its flow.
                let rt = slot.locked().clone();
                let plane = plane.clone();
                // One task per client. Without `proxy_protocol` a websocket
                // client's task is `websocket_client` itself: that task carries
                // an upgraded flow for days, and a wrapper would be dead
                // weight in it (about 120 bytes a flow).
                match (rt.cfg.http().is_some(), rt.cfg.proxy_protocol.is_some()) {
                    (true, false) => {
                        let dst = client.local_addr().unwrap_or(rt.local);
                        tokio::spawn(websocket_client(client, peer, dst, rt, plane));
                    }
                    (true, true) => {
                        tokio::spawn(async move {
                            let mut client = client;
                            let Some((peer, dst)) = proxied(&mut client, peer, &rt).await else { return };
                            websocket_client(client, peer, dst, rt, plane).await;
                        });
                    }
                    (false, _) => {
                        tokio::spawn(async move {
                            let mut client = client;
                            let Some((peer, dst)) = proxied(&mut client, peer, &rt).await else { return };
                            handle(client, peer, dst, &rt, &plane).await;
                        });
                    }
                }
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: keep the listener, back off briefly,
                // and say so at most once a minute.
                let what = format!("listener {}", slot.locked().cfg.name);
                crate::util::sys::accept_failed(&what, e, &mut last_warned).await;
            }
        }
    }
}

/// Who the client is, and the address it reached: with `proxy_protocol`, as
/// the balancer's header says (the header taken out of the socket, nothing
/// after it); otherwise the socket's own. `None`: turned away (a source not
/// in `from`, or no good header in time), counted, the socket reset.
async fn proxied(client: &mut TcpStream, peer: SocketAddr, rt: &ListenerRt) -> Option<(SocketAddr, SocketAddr)> {
    let local = client.local_addr().unwrap_or(rt.local);
    let Some(pp) = &rt.cfg.proxy_protocol else { return Some((peer, local)) };
    let refused = |client: &TcpStream, cause: &'static str, why: &dyn std::fmt::Display| {
        rt.stats.accepted();
        rt.stats.rejected(cause);
        debug!(listener = %rt.cfg.name, balancer = %peer, "connection refused: {why}");
        let _ = socket2::SockRef::from(client).set_linger(Some(std::time::Duration::ZERO));
        None
    };
    if !pp.from.iter().any(|c| c.contains(peer.ip())) {
        return refused(client, "proxy-source", &"a source not in proxy_protocol.from");
    }
    match tokio::time::timeout(pp.timeout, crate::edge::proxy_header::read(client, pp.accept)).await {
        Ok(Ok(crate::edge::proxy_header::Header::Proxied { src, dst })) => Some((src, dst)),
        Ok(Ok(crate::edge::proxy_header::Header::Local)) => Some((peer, local)),
        Ok(Err(e)) => refused(client, "proxy-header", &e),
        Err(_) => refused(client, "proxy-header", &format_args!("no whole PROXY header within {:?}", pp.timeout)),
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, dst: SocketAddr, rt: &ListenerRt, plane: &Plane) {
    let Some(_admitted) = rt.admit(&client, peer) else { return };
    let guard = plane.flows.open(&rt.cfg.name, peer);
    let flow = &guard.flow;
    *flow.dst.locked() = Some(dst);
    crate::flow::log::record_with("open", || crate::flow::table::snapshot_one(flow, None));
    let _ = client.set_nodelay(true);
    // SNI routes: the ClientHello is peeked (left in the socket) to choose
    // the route, hence the pool and whether TLS is terminated here.
    let mut pool = rt.pool();
    let mut terminate = rt.cfg.tls.is_some();
    if let Some(routes) = rt.cfg.sni_routes() {
        let timeout = rt.cfg.tls.as_ref().map_or(crate::config::DEFAULT_HANDSHAKE_TIMEOUT, |t| t.handshake_timeout);
        let sni = match tokio::time::timeout(timeout, crate::tls::terminate::peek_sni(&client)).await {
            Ok(Ok(sni)) => sni,
            Ok(Err(why)) => {
                return turn_away(flow, &format!("no usable TLS ClientHello: {why}"), "tls-handshake", rt, plane)
            }
            Err(_) => {
                return turn_away(flow, "no TLS ClientHello within the handshake timeout", "tls-handshake", rt, plane)
            }
        };
        let Some(i) = crate::config::pick_sni_route(routes, sni.as_deref()) else {
            let why = format!("no route for SNI {}", sni.as_deref().unwrap_or("(none)"));
            return turn_away(flow, &why, "sni-reject", rt, plane);
        };
        *flow.route.locked() = Some(format!("sni {}", routes[i].sni));
        match routes[i].mode {
            crate::config::SniMode::Reject => {
                let why = format!("SNI {} is rejected by routes[{i}]", sni.as_deref().unwrap_or("(none)"));
                return turn_away(flow, &why, "sni-reject", rt, plane);
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
            match accept_tls(client, tls, flow, rt, plane).await {
                Some(s) => Conn::server(s, fd),
                None => return,
            }
        }
    };
    let (backend, idx) = match connect(rt, flow, pool, rt.cfg.send_proxy).await {
        Ok(b) => b,
        Err(tried) => {
            warn!(flow = flow.id, listener = %rt.cfg.name, client = %peer, "no backend answered; closing the client ({tried})");
            retire(flow, None, &CloseCause::NoBackend, rt, plane);
            return;
        }
    };
    let _active = rt.activate(idx);
    *flow.backend.locked() = Some(rt.cfg.backends[idx]);
    if let Some(d) = rt.cfg.max_duration {
        flow.ending.set(flow.started_ns + d.as_nanos() as u64, &CloseCause::MaxDuration);
    }
    // TLS to the backend: verified as configured; a failure counts against
    // the backend like a failed connect.
    let backend = match rt.cfg.backend_tls() {
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
                    retire(flow, Some(idx), &CloseCause::Error(format!("backend TLS: {why}")), rt, plane);
                    return;
                }
            }
        }
    };
    let cause = match (client, backend) {
        // The PROXY header was read from the client's socket: what came with
        // it goes first (see `settle`), unless the client keeps it busy.
        (Conn::Plain(mut client), Conn::Plain(mut backend)) if rt.cfg.proxy_protocol.is_some() => {
            match crate::edge::carry::settle(&mut client, &mut backend, flow, crate::flow::table::Side::Client).await {
                Ok(true) => forward(client, backend, idx, flow, rt, plane, rt.cfg.idle_timeout).await,
                Ok(false) => {
                    flow.set_path(FlowPath::Userspace {
                        reason: "the client kept sending while its PROXY header was taken off".into(),
                        code: Fallback::Unsettled,
                    });
                    let Some(cause) =
                        relay_movable(plane, Conn::Plain(client), Conn::Plain(backend), flow, rt.cfg.idle_timeout)
                            .await
                    else {
                        return;
                    };
                    retire(flow, Some(idx), &cause, rt, plane);
                    cause
                }
                Err(e) => {
                    let cause = CloseCause::Error(format!("the bytes after the PROXY header: {e}"));
                    retire(flow, Some(idx), &cause, rt, plane);
                    cause
                }
            }
        }
        (Conn::Plain(client), Conn::Plain(backend)) => {
            if !plane.handoff_delay.is_zero() {
                tokio::time::sleep(plane.handoff_delay).await;
            }
            forward(client, backend, idx, flow, rt, plane, rt.cfg.idle_timeout).await
        }
        (client, backend) => {
            flow.set_path(FlowPath::Userspace {
                reason: "TLS is terminated or originated in user space (no kTLS on this host)".into(),
                code: Fallback::Tls,
            });
            crate::flow::log::record_with("handoff", || crate::flow::table::snapshot_one(flow, None));
            let Some(cause) = relay_movable(plane, client, backend, flow, rt.cfg.idle_timeout).await else {
                return;
            };
            retire(flow, Some(idx), &cause, rt, plane);
            cause
        }
    };
    debug!(flow = flow.id, %cause, "flow task done");
}

/// Goes on with a flow the previous daemon handed over (hot upgrade):
/// supervised (kernel) or relayed (user space) here from where it stopped,
/// then retired here.
pub async fn adopt(plane: Arc<Plane>, m: crate::handoff::Migrant) {
    use std::os::fd::AsRawFd;
    let flow = plane.flows.adopt(&m.info.flow, m.info.path());
    let rt = plane.listeners.current().into_iter().find(|r| r.cfg.name == m.info.flow.listener);
    let idx = rt.as_ref().and_then(|r| m.info.flow.backend.and_then(|b| r.cfg.backends.iter().position(|x| *x == b)));
    let k = plane.kernel.as_ref();
    crate::flow::log::record_with("adopt", || crate::flow::table::snapshot_one(&flow, k));
    let idle = rt.as_ref().map_or(crate::config::DEFAULT_IDLE_TIMEOUT, |r| r.cfg.idle_timeout);
    let _active = rt.as_ref().zip(idx).map(|(r, i)| r.activate(i));
    let client = m.client;
    let backend = match (&m.info.moved, m.backend) {
        (crate::handoff::Moved::Http { client_tls, early, .. }, _) => {
            // An idle HTTP connection: served here from its next request.
            let early = crate::util::hex::from_hex(early);
            let conn = Conn::resume(crate::tls::session::Parked { tcp: client, tls: client_tls.clone() });
            let cause = match (rt.clone().filter(|r| r.cfg.http().is_some()), conn, early) {
                (Some(rt), Ok(conn), Ok(early)) => {
                    let io = crate::edge::http::ClientIo::new(conn, early.into());
                    crate::edge::http::serve(io, flow.clone(), rt, plane.clone()).await;
                    // Out of the table however it ended (closed, upgraded and
                    // moved on, or moved on idle): no guard holds it here.
                    plane.flows.retire(&flow, k, |_| {});
                    return;
                }
                (None, ..) => CloseCause::Error(format!(
                    "listener {} is not a websocket listener in this config",
                    m.info.flow.listener
                )),
                (_, Err(e), _) => CloseCause::Error(format!("the moved HTTP connection: {e}")),
                (_, _, Err(e)) => CloseCause::Error(format!("the moved HTTP connection: {e}")),
            };
            return finish(&plane, &flow, rt.as_deref(), None, &cause);
        }
        (_, Some(b)) => b,
        (_, None) => return finish(&plane, &flow, None, None, &CloseCause::Error("no backend socket came".into())),
    };
    // An upgraded WebSocket of a route here: that route's idle_timeout, and
    // a place under its max_connections.
    let route = rt
        .as_ref()
        .zip(m.info.flow.route.as_deref())
        .and_then(|(r, name)| r.cfg.http()?.routes.iter().find(|x| x.name() == name).map(|x| (&r.route_active, x)));
    let idle = route.and_then(|(_, x)| x.idle_timeout).unwrap_or(idle);
    let _route_slot = route.map(|(counts, x)| crate::edge::listener::RouteSlot::count(counts, &x.name()));
    let info = m.info;
    let cause = match (&info.moved, k) {
        (crate::handoff::Moved::Kernel { splice: s, resume }, Some(k)) => {
            k.adopt_flow(s, client.as_raw_fd(), backend.as_raw_fd());
            let cause = match both(splice::Sock::from_std(client), splice::Sock::from_std(backend)) {
                // It may move on again, at the next upgrade.
                Ok((client, backend)) => {
                    let auto = rt.as_ref().filter(|r| r.cfg.offload == Offload::Auto).map(|r| &*r.stats);
                    match supervise(&plane, k, s, (client, backend), &flow, idle, Some(resume), auto).await {
                        Some(cause) => cause,
                        None => {
                            // Moved on: out of this daemon's table, no totals.
                            plane.flows.retire(&flow, Some(k), |_| {});
                            return;
                        }
                    }
                }
                Err(e) => CloseCause::Error(format!("cannot watch the sockets: {e}")),
            };
            finish(&plane, &flow, rt.as_deref(), idx, &cause);
            k.release(s);
            return;
        }
        (crate::handoff::Moved::WebSocket { limits, client_early, backend_early, client_tls, .. }, _) => {
            let early = crate::util::hex::from_hex(client_early)
                .and_then(|c| Ok((c, crate::util::hex::from_hex(backend_early)?)));
            let client = Conn::resume(crate::tls::session::Parked { tcp: client, tls: client_tls.clone() });
            match (client, TcpStream::from_std(backend), early) {
                (Ok(client), Ok(backend), Ok((client_early, backend_early))) => {
                    let ends = crate::dataplane::ws::Ends {
                        client,
                        client_early: client_early.into(),
                        backend,
                        backend_early: backend_early.into(),
                        flow: &flow,
                        limits: *limits,
                        idle,
                        shutdown: plane.shutdown.subscribe(),
                    };
                    match ws_movable(&plane, ends).await {
                        Some(cause) => cause,
                        None => {
                            plane.flows.retire(&flow, k, |_| {});
                            return;
                        }
                    }
                }
                (Err(e), _, _) => CloseCause::Error(format!("the moved WebSocket: {e}")),
                (_, _, Err(e)) => CloseCause::Error(format!("the moved WebSocket: {e}")),
                (_, Err(e), _) => CloseCause::Error(format!("cannot register the sockets: {e}")),
            }
        }
        // A relayed flow: plain sockets, or TLS sessions carried on here.
        (crate::handoff::Moved::Userspace { .. }, _) | (crate::handoff::Moved::Tls { .. }, _) => {
            let (client_tls, backend_tls) = match &info.moved {
                crate::handoff::Moved::Tls { client, backend, .. } => (client.clone(), backend.clone()),
                _ => (None, None),
            };
            let c = Conn::resume(crate::tls::session::Parked { tcp: client, tls: client_tls.clone() });
            let b = Conn::resume(crate::tls::session::Parked { tcp: backend, tls: backend_tls.clone() });
            match (c, b) {
                (Ok(c), Ok(b)) => match relay_movable(&plane, c, b, &flow, idle).await {
                    Some(cause) => cause,
                    None => {
                        plane.flows.retire(&flow, k, |_| {});
                        return;
                    }
                },
                (Err(e), _) | (_, Err(e)) => CloseCause::Error(format!("the moved TLS flow: {e}")),
            }
        }
        (crate::handoff::Moved::Kernel { .. }, None) => {
            CloseCause::Error("a kernel flow came without the kernel maps".into())
        }
        (crate::handoff::Moved::Http { .. }, _) => unreachable!("served above"),
    };
    finish(&plane, &flow, rt.as_deref(), idx, &cause);
}

/// A client of a websocket listener, from admission to close: HTTP/1.1
/// (`http::serve`), or HTTP/2 when TLS agreed on `h2` (`h2::serve`).
pub async fn websocket_client(
    client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    rt: Arc<ListenerRt>,
    plane: Arc<Plane>,
) {
    let Some(_admitted) = rt.admit(&client, peer) else { return };
    let guard = plane.flows.open(&rt.cfg.name, peer);
    let flow = guard.flow.clone();
    *flow.dst.locked() = Some(dst);
    crate::flow::log::record_with("open", || crate::flow::table::snapshot_one(&flow, None));
    let _ = client.set_nodelay(true);
    let client = match &rt.cfg.tls {
        None => Conn::Plain(client),
        Some(tls) => {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&client);
            match accept_tls(client, tls, &flow, &rt, &plane).await {
                Some(s) => Conn::server(s, fd),
                None => return,
            }
        }
    };
    let h2 = client.alpn() == Some(b"h2");
    let client = crate::edge::http::ClientIo::new(client, bytes::Bytes::new());
    if h2 {
        // Boxed: the task of an HTTP/1.1 client carries its upgraded flow
        // for days, and holds only what that needs.
        Box::pin(crate::edge::h2::serve(client, flow, rt.clone(), plane.clone())).await;
        return;
    }
    crate::edge::http::serve(client, flow, rt.clone(), plane.clone()).await;
}
