//! HTTP/2 on websocket listeners whose TLS offers `h2` (ALPN): plain requests
//! are proxied as `http` proxies them (to HTTP/1.1 backends), and an extended
//! CONNECT with `:protocol = websocket` (RFC 8441) opens a WebSocket on one
//! stream of the connection.
//!
//! - Each such stream is a flow of its own, routed, authorised and limited as
//!   an HTTP/1.1 upgrade on the same route (`ClientConn::serve`).
//! - Towards the backend it is an HTTP/1.1 upgrade: a GET with a
//!   `Sec-WebSocket-Key` of the gateway's own, whose `Sec-WebSocket-Accept`
//!   is checked before the client gets its 200. A backend's refusal reaches
//!   the client as the backend sent it.
//! - The stream's bytes are DATA frames of the client's connection, beside
//!   other streams, so the kernel path cannot carry them: passthrough relays
//!   them in user space (fallback `http2-stream`); inspect and bridge_tcp run
//!   as they do over HTTP/1.1.
//! - The connection is never handed to a new daemon: a hot upgrade or a
//!   drain sends GOAWAY, and the streams already open finish here.
use std::sync::{atomic::Ordering::Relaxed, Arc};

use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{io::AsyncWriteExt, time::Instant};
use tracing::debug;

use super::http::{ClientConn, ClientIo, Tunnel};
use crate::{
    config::WsMode,
    edge::{carry, listener::ListenerRt, plane::Plane},
    flow::table::{CloseCause, Fallback, Flow, FlowPath, Side, Stopped},
    tls::session::Conn,
    util::sync::Locked,
};

/// Serves an HTTP/2 client connection until it closes, its idle time runs
/// out with no WebSocket stream open, or the daemon drains it. Retires the
/// connection's flow; each WebSocket stream retires its own.
pub(super) async fn serve(client: ClientIo, flow: Arc<Flow>, rt: Arc<ListenerRt>, plane: Arc<Plane>) {
    let http = rt.cfg.http().expect("a websocket listener has routes");
    flow.set_path(FlowPath::Userspace {
        reason: "HTTP/2: requests and WebSocket streams share the connection, served in user space".into(),
        code: Fallback::Http,
    });
    let (streams, mut agreed) = tokio::sync::mpsc::unbounded_channel();
    let conn = ClientConn::new(&client, &flow, &rt, Some(streams));
    let last_byte = client.last_byte.clone();
    last_byte.now();
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(http.max_concurrent_streams)
        .max_header_list_size(u32::try_from(http.max_request_head).unwrap_or(u32::MAX));
    let mut served = Box::pin(builder.serve_connection(TokioIo::new(client), conn.service()));
    let mut shutdown = plane.shutdown.subscribe();
    let mut handed_over = plane.handed_over.subscribe();
    let mut draining = false;
    let mut stalled = false;
    let result = loop {
        // No byte either way for idle_timeout closes the connection, as on
        // HTTP/1.1, unless a WebSocket stream is open: each of those keeps
        // its own route's idle_timeout.
        let still = if draining { rt.cfg.idle_timeout.min(super::http::DRAIN_STALL) } else { rt.cfg.idle_timeout };
        // Until its first request, a connection has handshake_timeout to
        // send one, as an HTTP/1.1 request head does: a client that opens
        // TLS and says nothing holds its place only that long.
        let first = conn.requests.load(Relaxed) == 0;
        let still = if first { still.min(http.handshake_timeout) } else { still };
        let streams_open = conn.tunnels.load(Relaxed) > 0;
        let at = last_byte.last() + still;
        let at = if streams_open { at.max(Instant::now() + still) } else { at };
        tokio::select! {
            r = &mut served => break r,
            // A WebSocket stream the backend agreed to: a task of its own
            // carries it from the client's 200 on.
            Some(tunnel) = agreed.recv() => {
                tokio::spawn(carry_stream(tunnel, rt.clone(), plane.clone(), flow.clone()));
            }
            () = tokio::time::sleep_until(at) => {
                if conn.tunnels.load(Relaxed) == 0 && last_byte.last() + still <= Instant::now() {
                    stalled = true;
                    break Ok(());
                }
            }
            // The drain, or a hot upgrade: GOAWAY; requests and streams
            // under way finish here, new ones go elsewhere.
            () = crate::dataplane::ws::draining(&mut shutdown), if !draining => {
                served.as_mut().graceful_shutdown();
                draining = true;
            }
            () = crate::dataplane::ws::draining(&mut handed_over), if !draining => {
                served.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    };
    drop(served);
    let cause = match result {
        _ if stalled && conn.requests.load(Relaxed) == 0 => {
            CloseCause::Error(format!("no HTTP/2 request within handshake_timeout ({:?})", http.handshake_timeout))
        }
        _ if stalled && draining => CloseCause::Shutdown,
        _ if stalled => CloseCause::IdleTimeout,
        Ok(()) => CloseCause::Closed { first: Side::Client },
        Err(e) => CloseCause::Error(format!("http2: {e}")),
    };
    carry::retire(&flow, None, &cause, &rt, &plane);
}

/// A WebSocket stream as a flow of its own, from the client's 200 to its
/// close (`connection`: the client connection's flow).
async fn carry_stream(tunnel: Tunnel, rt: Arc<ListenerRt>, plane: Arc<Plane>, connection: Arc<Flow>) {
    let Tunnel {
        client,
        mut backend,
        backend_early,
        route: ri,
        backend_idx: idx,
        slot: _slot,
        open: _open,
        place: _place,
    } = tunnel;
    let guard = plane.flows.open(&rt.cfg.name, connection.client);
    let flow = guard.flow.clone();
    let route = &rt.cfg.http().expect("a websocket listener has routes").routes[ri];
    *flow.dst.locked() = *connection.dst.locked();
    *flow.route.locked() = Some(route.name());
    *flow.backend.locked() = Some(rt.cfg.backends[idx]);
    let (reason, code) = match route.mode {
        WsMode::Passthrough => (
            format!(
                "WebSocket over HTTP/2 (a stream of flow {}): its bytes travel in the connection's frames, \
                 relayed in user space",
                connection.id
            ),
            Fallback::Http2Stream,
        ),
        mode => (
            format!("mode {mode} over HTTP/2 (a stream of flow {}): messages are relayed in user space", connection.id),
            if mode == WsMode::Inspect { Fallback::WebSocketInspect } else { Fallback::WebSocketBridge },
        ),
    };
    flow.set_path(FlowPath::Userspace { reason, code });
    crate::flow::log::record_with("open", || crate::flow::table::snapshot_one(&flow, None));
    let idle = route.idle_timeout.unwrap_or(rt.cfg.idle_timeout);
    if let Some(d) = route.max_duration.or(rt.cfg.max_duration) {
        flow.ending.set(crate::util::sys::monotonic_ns() + d.as_nanos() as u64, &CloseCause::MaxDuration);
    }
    let mut client = match client.await {
        Ok(up) => Conn::Stream(Box::new(TokioIo::new(up))),
        Err(e) => {
            carry::retire(&flow, Some(idx), &CloseCause::Error(format!("client stream: {e}")), &rt, &plane);
            return;
        }
    };
    crate::flow::log::record_with("handoff", || crate::flow::table::snapshot_one(&flow, None));
    let _active = rt.activate(idx);
    let cause = match route.mode {
        WsMode::Passthrough => {
            // The backend's first frames, sent right behind its 101.
            match client.write_all(&backend_early).await {
                Ok(()) => {
                    flow.add_user(Side::Backend, backend_early.len() as u64);
                    drop(backend_early);
                    closed(crate::dataplane::relay::relay(client, Conn::Plain(backend), &flow, idle, None, None).await)
                }
                Err(e) => {
                    let _ = backend.shutdown().await;
                    CloseCause::Error(format!("writing early bytes to the client: {e}"))
                }
            }
        }
        WsMode::Inspect | WsMode::BridgeTcp => {
            let ends = crate::dataplane::ws::Ends {
                client,
                client_early: Bytes::new(),
                backend,
                backend_early,
                flow: &flow,
                limits: crate::dataplane::ws::Limits::of(route),
                idle,
                shutdown: plane.shutdown.subscribe(),
            };
            closed(crate::dataplane::ws::run(ends, None).await)
        }
    };
    debug!(flow = flow.id, connection = connection.id, "WebSocket stream closed");
    carry::retire(&flow, Some(idx), &cause, &rt, &plane);
}

/// How a flow that was never asked to detach ended.
fn closed<T>(s: Stopped<T>) -> CloseCause {
    match s {
        Stopped::Closed(cause) => cause,
        Stopped::Detached(_) => CloseCause::Error("stopped for a hand-over it was not asked for".into()),
    }
}
