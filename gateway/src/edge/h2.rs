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
use hyper::{
    body::Incoming,
    header::{self, HeaderValue},
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{io::AsyncWriteExt, net::TcpStream, time::Instant};
use tracing::{debug, warn};

use super::http::{
    accept_bridge, empty, reply, strip_hop_by_hop, Body, ClientConn, ClientIo, InFlightGuard, Target,
    SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_KEY,
};
use crate::{
    config::WsMode,
    edge::{carry, listener::ListenerRt, listener::RouteSlot, plane::Plane},
    flow::table::{CloseCause, Fallback, Flow, FlowPath, Side, Stopped},
    tls::session::Conn,
    util::sync::Locked,
};

/// Streams a client may have open at once (nginx's default is 128, Envoy's
/// unbounded); more are refused by the protocol itself (REFUSED_STREAM).
const MAX_STREAMS: u32 = 128;

/// Serves an HTTP/2 client connection until it closes, its idle time runs
/// out with no WebSocket stream open, or the daemon drains it. Retires the
/// connection's flow; each WebSocket stream retires its own.
pub(super) async fn serve(client: ClientIo, flow: Arc<Flow>, rt: Arc<ListenerRt>, plane: Arc<Plane>) {
    let http = rt.cfg.http().expect("a websocket listener has routes");
    flow.set_path(FlowPath::Userspace {
        reason: "HTTP/2: requests and WebSocket streams share the connection, served in user space".into(),
        code: Fallback::Http,
    });
    let conn = ClientConn::new(&client, &flow, &rt, &plane);
    let last_byte = client.last_byte.clone();
    last_byte.now();
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(MAX_STREAMS)
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
        let streams_open = conn.tunnels.load(Relaxed) > 0;
        let at = last_byte.last() + still;
        let at = if streams_open { at.max(Instant::now() + still) } else { at };
        tokio::select! {
            r = &mut served => break r,
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
        _ if stalled && draining => CloseCause::Shutdown,
        _ if stalled => CloseCause::IdleTimeout,
        Ok(()) => CloseCause::Closed { first: Side::Client },
        Err(e) => CloseCause::Error(format!("http2: {e}")),
    };
    carry::retire(&flow, None, &cause, &rt, &plane);
}

/// An extended CONNECT whose `:protocol` is not `websocket`, or whose
/// `Sec-WebSocket-Version` is not 13: the answer, naming what is wrong.
pub(super) fn check_connect(req: &Request<Incoming>) -> Result<(), Box<Response<Body>>> {
    let protocol = req.extensions().get::<hyper::ext::Protocol>().map_or("", |p| p.as_str());
    if !protocol.eq_ignore_ascii_case("websocket") {
        return Err(Box::new(reply(
            StatusCode::BAD_REQUEST,
            format!("unsupported :protocol {protocol:?}; this gateway takes websocket"),
            false,
        )));
    }
    super::http::check_version(req.headers())
}

/// The backend's side of a WebSocket stream, once the backend agreed.
struct Agreed {
    stream: TcpStream,
    /// Bytes the backend sent right behind its 101.
    early: Bytes,
    /// The end-to-end headers of its answer, for the client's 200.
    headers: header::HeaderMap,
}

impl ClientConn {
    /// A WebSocket stream (RFC 8441) for route `ri`, its checks passed and
    /// its place under the route's `max_connections` taken: connects a
    /// backend, upgrades with it over HTTP/1.1, and answers 200 with the
    /// backend's WebSocket headers; a task of its own then carries the
    /// stream as a flow. Anything else is answered as an HTTP/1.1 upgrade
    /// would be (the backend's refusal, 502, 504).
    pub(super) async fn tunnel(
        &self,
        mut req: Request<Incoming>,
        ri: usize,
        target: &Target,
        slot: Option<RouteSlot>,
    ) -> Response<Body> {
        let deadline = Instant::now() + self.http().handshake_timeout;
        let route = &self.http().routes[ri];
        let (stream, idx) = match self.connect(ri, deadline, self.maglev_key(ri, &req)).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let client = hyper::upgrade::on(&mut req);
        let agreed = if route.mode == WsMode::BridgeTcp {
            // The gateway is the WebSocket server: no handshake with the backend.
            let (parts, _) = accept_bridge(req.headers()).into_parts();
            let mut headers = parts.headers;
            strip_hop_by_hop(&mut headers);
            headers.remove(SEC_WEBSOCKET_ACCEPT);
            Agreed { stream, early: Bytes::new(), headers }
        } else {
            match self.upgrade_backend(req, target, route.mode, stream, idx, deadline).await {
                Ok(a) => a,
                Err(resp) => return resp,
            }
        };
        self.tunnels.fetch_add(1, Relaxed);
        let carried = Carried {
            open: InFlightGuard(self.tunnels.clone()),
            slot,
            rt: self.rt.clone(),
            plane: self.plane.clone(),
            connection: self.flow.clone(),
            route: ri,
            idx,
        };
        let Agreed { stream, early, headers } = agreed;
        tokio::spawn(carried.run(client, stream, early));
        let mut r = Response::new(empty());
        *r.headers_mut() = headers;
        r
    }

    /// The HTTP/1.1 upgrade towards the backend for a WebSocket stream,
    /// with a key of the gateway's own and its accept checked.
    async fn upgrade_backend(
        &self,
        req: Request<Incoming>,
        target: &Target,
        mode: WsMode,
        stream: TcpStream,
        idx: usize,
        deadline: Instant,
    ) -> Result<Agreed, Response<Body>> {
        use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
        let key = generate_key();
        let mut out = self.outgoing(req, target);
        *out.method_mut() = Method::GET;
        let h = out.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(SEC_WEBSOCKET_KEY, HeaderValue::from_str(&key).expect("base64 is a header value"));
        if mode == WsMode::Inspect {
            // The gateway parses the frames, and it speaks no extension.
            h.remove(SEC_WEBSOCKET_EXTENSIONS);
        }
        let (stream, early, head) = self.exchange_upgrade(stream, out, idx, deadline).await?;
        let backend_addr = self.rt.cfg.backends[idx];
        let want = derive_accept_key(key.as_bytes());
        let got = head.headers.get(SEC_WEBSOCKET_ACCEPT);
        if got.is_none_or(|g| g.as_bytes() != want.as_bytes()) {
            let shown = got.map_or("none".to_string(), |g| format!("{:?}", String::from_utf8_lossy(g.as_bytes())));
            warn!(flow = self.flow.id, backend = %backend_addr, "upgrade failed: Sec-WebSocket-Accept {shown}, not {want:?}");
            return Err(reply(
                StatusCode::BAD_GATEWAY,
                format!("backend {backend_addr} answered the upgrade with Sec-WebSocket-Accept {shown}, not the one for the gateway's key"),
                false,
            ));
        }
        let mut headers = head.headers;
        strip_hop_by_hop(&mut headers);
        headers.remove(SEC_WEBSOCKET_ACCEPT);
        Ok(Agreed { stream, early, headers })
    }
}

/// What the task carrying a WebSocket stream holds: its place under the
/// route's `max_connections` and among the connection's open streams.
struct Carried {
    open: InFlightGuard,
    slot: Option<RouteSlot>,
    rt: Arc<ListenerRt>,
    plane: Arc<Plane>,
    /// The client connection's flow.
    connection: Arc<Flow>,
    route: usize,
    idx: usize,
}

impl Carried {
    /// The stream as a flow, from the client's 200 to its close.
    async fn run(self, client: hyper::upgrade::OnUpgrade, mut backend: TcpStream, backend_early: Bytes) {
        let Carried { open: _open, slot: _slot, rt, plane, connection, route: ri, idx } = self;
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
                format!(
                    "mode {mode} over HTTP/2 (a stream of flow {}): messages are relayed in user space",
                    connection.id
                ),
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
                        closed(
                            crate::dataplane::relay::relay(client, Conn::Plain(backend), &flow, idle, None, None).await,
                        )
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
}

/// How a flow that was never asked to detach ended.
fn closed<T>(s: Stopped<T>) -> CloseCause {
    match s {
        Stopped::Closed(cause) => cause,
        Stopped::Detached(_) => CloseCause::Error("stopped for a hand-over it was not asked for".into()),
    }
}
