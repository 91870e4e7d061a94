//! Websocket listeners: HTTP/1.1 served by hyper, routed by host and path.
//!
//! - A WebSocket upgrade is checked (RFC 6455 §4.2.1), routed, checked against
//!   the route's origins, and forwarded to a backend: the request head is
//!   written and the response head read here (`exchange`), hyper's client
//!   only reads a refusal and its body. The backend's answer goes back to
//!   the client as the backend sent it. After a `101` both sockets, with any
//!   bytes read past the heads, go to the kernel path (`passthrough`), or to
//!   `dataplane::ws` (`inspect`, `bridge_tcp`).
//! - Any other request is reverse-proxied as HTTP/1.1, bodies streamed, over
//!   one backend connection per client connection, reused while it serves
//!   the same route.
//!
//! The client connection is one flow from accept to close; it carries the
//! listener's admission, and its path says what happened to it.
use crate::flow::table::Fallback;
use crate::handoff::Handed;
use crate::util::sync::Locked;
use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{
    body::Incoming,
    client::conn::http1::SendRequest,
    header::{self, HeaderMap, HeaderName, HeaderValue},
    upgrade::OnUpgrade,
    Method, Request, Response, StatusCode, Uri, Version,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{io::AsyncWriteExt, net::TcpStream, time::Instant};
use tracing::{debug, warn};

use crate::{
    config::{HttpListener, Route, WsMode},
    edge::carry,
    edge::listener::{self, ListenerRt},
    edge::plane::Plane,
    flow::table::{CloseCause, Flow, FlowPath, Side},
    tls::session,
};

pub(super) type Body = BoxBody<Bytes, hyper::Error>;

pub(super) const SEC_WEBSOCKET_KEY: &str = "sec-websocket-key";
pub(super) const SEC_WEBSOCKET_VERSION: &str = "sec-websocket-version";
pub(super) const SEC_WEBSOCKET_ACCEPT: &str = "sec-websocket-accept";
pub(super) const SEC_WEBSOCKET_PROTOCOL: &str = "sec-websocket-protocol";
pub(super) const SEC_WEBSOCKET_EXTENSIONS: &str = "sec-websocket-extensions";

/// An upgrade accepted by the service, finished once hyper has sent the 101.
struct Upgrade {
    route: usize,
    backend_idx: usize,
    client: OnUpgrade,
    backend: BackendSide,
    /// Its place under the route's `max_connections`, for the flow's life.
    slot: Option<listener::RouteSlot>,
}

/// hyper's client connection to a backend, driven by the flow's own task.
type BackendConn = std::pin::Pin<Box<dyn std::future::Future<Output = hyper::Result<()>> + Send>>;

enum BackendSide {
    /// The backend's own 101, from hyper's client, and the connection that
    /// completes it (an upgrade request with a body).
    WebSocket(OnUpgrade, BackendConn),
    /// The backend answered 101 to `exchange`: its socket and the bytes
    /// read past the head.
    Exchanged(TcpStream, Bytes),
    /// bridge_tcp: a raw TCP connection.
    Tcp(TcpStream),
}

/// One client connection of a websocket listener, as its requests see it.
pub(super) struct ClientConn {
    pub(super) rt: Arc<ListenerRt>,
    pub(super) flow: Arc<Flow>,
    /// The backend connection plain requests reuse, and its backend.
    backend: tokio::sync::Mutex<Option<(usize, SendRequest<Counted>)>>,
    /// HTTP/1.1: the upgrade the connection ends in.
    upgrade: Mutex<Option<Upgrade>>,
    /// The client came over TLS (`X-Forwarded-Proto: https`).
    tls: bool,
    /// Requests whose response is not yet written whole (its body not yet
    /// dropped by hyper), and requests taken in all: an idle connection can
    /// move at a hot upgrade.
    pub(super) in_flight: Arc<AtomicUsize>,
    pub(super) requests: AtomicU64,
    /// HTTP/2: the WebSocket streams open on the connection, and where the
    /// agreed ones go to be carried.
    pub(super) tunnels: Arc<AtomicUsize>,
    streams: Option<tokio::sync::mpsc::UnboundedSender<Tunnel>>,
    /// Whether a WebSocket stream holds the connection's own admission place.
    place_taken: Arc<AtomicBool>,
    /// `ClientIo::hold` of this connection.
    hold: Arc<AtomicBool>,
}

impl ClientConn {
    /// `streams`: HTTP/2 only (see `Tunnel`).
    pub(super) fn new(
        client: &ClientIo,
        flow: &Arc<Flow>,
        rt: &Arc<ListenerRt>,
        streams: Option<tokio::sync::mpsc::UnboundedSender<Tunnel>>,
    ) -> Arc<Self> {
        Arc::new(ClientConn {
            rt: rt.clone(),
            flow: flow.clone(),
            backend: tokio::sync::Mutex::new(None),
            upgrade: Mutex::new(None),
            tls: rt.cfg.tls.is_some(),
            in_flight: Arc::new(AtomicUsize::new(0)),
            requests: AtomicU64::new(0),
            tunnels: Arc::new(AtomicUsize::new(0)),
            streams,
            place_taken: Arc::new(AtomicBool::new(false)),
            hold: client.hold.clone(),
        })
    }

    /// The service hyper calls for each request of the connection.
    pub(super) fn service(
        self: &Arc<Self>,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<InFlight>,
        Error = Infallible,
        Future = impl std::future::Future<Output = Result<Response<InFlight>, Infallible>> + Send + 'static,
    > + Clone {
        let conn = self.clone();
        hyper::service::service_fn(move |req| {
            let conn = conn.clone();
            conn.in_flight.fetch_add(1, Ordering::Relaxed);
            conn.requests.fetch_add(1, Ordering::Relaxed);
            // A request while the connection is let go at a hot upgrade: its
            // response says close, and the close must happen.
            conn.hold.store(false, Ordering::Relaxed);
            // Dropped with the request if it never gets that far.
            let guard = InFlightGuard(conn.in_flight.clone());
            async move {
                let resp = conn.serve(req).await;
                Ok::<_, Infallible>(resp.map(|inner| InFlight { inner, _guard: guard }))
            }
        })
    }
}

/// The client stream as hyper serves it: what a previous daemon handed over
/// with the connection first; a shutdown hyper asks for can be held back,
/// when a hot upgrade takes the idle connection instead of closing it.
pub struct ClientIo {
    conn: session::Conn,
    early: Bytes,
    hold: Arc<AtomicBool>,
    pub(super) last_byte: Arc<LastByte>,
}

/// When a client connection last moved a byte, either way: `idle_timeout`
/// counts from there, so a client that stops reading a response (or stops
/// sending a body) is closed like an idle one.
pub(super) struct LastByte {
    base: Instant,
    /// Milliseconds since `base`.
    at: AtomicU64,
}

impl LastByte {
    fn new() -> Self {
        Self { base: Instant::now(), at: AtomicU64::new(0) }
    }

    pub(super) fn now(&self) {
        self.at.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub(super) fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.at.load(Ordering::Relaxed))
    }
}

impl ClientIo {
    pub fn new(conn: session::Conn, early: Bytes) -> Self {
        ClientIo { conn, early, hold: Arc::new(AtomicBool::new(false)), last_byte: Arc::new(LastByte::new()) }
    }

    /// The stream, and the bytes handed over but not yet read (after `first`).
    fn into_parts(self, first: Bytes) -> (session::Conn, Bytes) {
        if self.early.is_empty() {
            return (self.conn, first);
        }
        let mut all = first.to_vec();
        all.extend_from_slice(&self.early);
        (self.conn, all.into())
    }
}

impl tokio::io::AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.conn).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last_byte.now();
        }
        r
    }
}

impl tokio::io::AsyncWrite for ClientIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.conn).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                self.last_byte.now();
            }
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.conn).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.hold.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.conn).poll_shutdown(cx)
    }
}

/// A response body that counts its request as in flight until hyper drops
/// it (written whole, or the connection gone).
pub(super) struct InFlight {
    inner: Body,
    _guard: InFlightGuard,
}

pub(super) struct InFlightGuard(pub(super) Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl hyper::body::Body for InFlight {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves a client connection until it closes, is upgraded, or (idle at a
/// hot upgrade) goes to the new daemon. Retires the flow when it ends here.
pub async fn serve(client: ClientIo, flow: Arc<Flow>, rt: Arc<ListenerRt>, plane: Arc<Plane>) {
    // hyper's connection state (a few KiB) lives in a box of its own, freed
    // at the 101: the task of an upgraded flow, which may live for days,
    // holds only what carrying it needs (4 KiB a spliced WebSocket in all,
    // 12 KiB before; `cargo xtask bench-density`).
    if let Some(up) = Box::pin(serve_http(client, &flow, &rt, &plane)).await {
        upgraded(up, &flow, &rt, &plane).await;
    }
}

/// The HTTP part of [`serve`]: the upgrade to carry on with, if it came to one.
async fn serve_http(client: ClientIo, flow: &Arc<Flow>, rt: &Arc<ListenerRt>, plane: &Arc<Plane>) -> Option<Upgrade> {
    let http = rt.cfg.http().expect("a websocket listener has routes");
    let conn = ClientConn::new(&client, flow, rt, None);
    let svc = conn.service();
    let hold = client.hold.clone();
    let last_byte = client.last_byte.clone();
    last_byte.now();
    // Idle, it moves at a hot upgrade (the old daemon waits for it).
    flow.movable.store(true, Ordering::Relaxed);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(http.handshake_timeout)
        .max_buf_size(http.max_request_head)
        .keep_alive(true);
    let mut served = builder.serve_connection(TokioIo::new(client), svc).with_upgrades();
    let mut shutdown = plane.shutdown.subscribe();
    let mut handed_over = plane.handed_over.subscribe();
    let mut draining = false;
    // At a hot upgrade: the requests taken when the idle connection was let go.
    let mut moving: Option<u64> = None;
    let mut stalled = false;
    let result = loop {
        // No byte either way for idle_timeout closes the connection, idle or
        // in the middle of a request; once the drain has begun, a few
        // seconds do.
        let still = if draining { rt.cfg.idle_timeout.min(DRAIN_STALL) } else { rt.cfg.idle_timeout };
        tokio::select! {
            r = &mut served => break r,
            () = tokio::time::sleep_until(last_byte.last() + still) => {
                if last_byte.last() + still <= Instant::now() {
                    stalled = true;
                    break Ok(());
                }
            }
            // The drain: finish the request in progress, then close.
            () = crate::dataplane::ws::draining(&mut shutdown), if !draining => {
                Pin::new(&mut served).graceful_shutdown();
                draining = true;
            }
            // A hot upgrade: an idle connection ends here without a close
            // and moves; a busy one finishes its request, then closes.
            () = crate::dataplane::ws::draining(&mut handed_over), if !draining => {
                if conn.in_flight.load(Ordering::Relaxed) == 0 {
                    hold.store(true, Ordering::Relaxed);
                    moving = Some(conn.requests.load(Ordering::Relaxed));
                }
                Pin::new(&mut served).graceful_shutdown();
                draining = true;
            }
        }
    };
    let upgrade = conn.upgrade.locked().take();
    // A request came in while it was being let go: its response said close.
    let idle = moving.is_some_and(|n| n == conn.requests.load(Ordering::Relaxed));
    drop(conn);
    if stalled {
        let cause = if draining { CloseCause::Shutdown } else { CloseCause::IdleTimeout };
        carry::retire(flow, None, &cause, rt, plane);
        return None;
    }
    if let (Ok(()), None, true) = (&result, &upgrade, idle) {
        if let Some(parts) = served.into_parts() {
            let (client, early) = parts.io.into_inner().into_parts(parts.read_buf);
            let handed = hand_over_idle(client, early, flow, plane).await;
            flow.movable.store(false, Ordering::Relaxed);
            if !handed {
                carry::retire(flow, None, &CloseCause::Shutdown, rt, plane);
            }
            return None;
        }
    }
    flow.movable.store(false, Ordering::Relaxed);
    match (result, upgrade) {
        (Ok(()), Some(up)) => Some(up),
        (result, _) => {
            let cause = match result {
                Ok(()) => CloseCause::Closed { first: Side::Client },
                Err(e) if e.is_timeout() => CloseCause::Error(format!(
                    "request head not complete within handshake_timeout ({:?})",
                    http.handshake_timeout
                )),
                Err(e) => CloseCause::Error(format!("http: {e}")),
            };
            carry::retire(flow, None, &cause, rt, plane);
            None
        }
    }
}

/// An idle connection at a hot upgrade: to the new daemon (its TLS session
/// too), with the bytes read past the last request. Not taken (too late, or
/// a TLS session not at rest), it closes here.
async fn hand_over_idle(mut client: session::Conn, early: Bytes, flow: &Flow, plane: &Plane) -> bool {
    use tokio::io::AsyncWriteExt;
    let at_rest = client.flush().await.is_ok() && client.quiet();
    if at_rest {
        let (reason, code) = match flow.path.locked().clone() {
            FlowPath::Userspace { reason, code } => (reason, code.code().to_string()),
            _ => (String::new(), Fallback::Http.code().to_string()),
        };
        // Checked, taken out and handed over under one lock: a session's
        // keys never leave rustls for a hand-over that has ended.
        let handed = plane.migrants.offer(flow, client, |client| -> Result<_, session::MoveError> {
            let p = client.park()?;
            let moved = crate::handoff::Moved::Http {
                reason,
                code,
                client_tls: p.tls,
                early: crate::util::hex::to_hex(&early),
            };
            Ok((moved, p.tcp, None))
        });
        match handed {
            Handed::Taken => {
                debug!(flow = flow.id, "idle HTTP connection handed to the new daemon");
                return true;
            }
            Handed::NotTaking(c) => client = c,
            Handed::Failed(e) => {
                debug!(flow = flow.id, "idle HTTP connection not handed over: {e}");
                return false;
            }
        }
    }
    let _ = client.shutdown().await;
    false
}

/// The HTTP settings of a listener this module serves: only websocket
/// listeners come here, and validation gives each of them its settings.
pub(super) fn http_of(rt: &ListenerRt) -> &HttpListener {
    rt.cfg.http().expect("a websocket listener has HTTP settings")
}

/// After the 101: take both sockets back from hyper and carry the flow.
async fn upgraded(mut up: Upgrade, flow: &Flow, rt: &ListenerRt, plane: &Plane) {
    // Counted against the route's max_connections until the flow ends.
    let _route_slot = up.slot.take();
    let idle = http_of(rt).routes[up.route].idle_timeout.unwrap_or(rt.cfg.idle_timeout);
    let idx = up.backend_idx;
    let route = &http_of(rt).routes[up.route];
    if let Some(d) = route.max_duration.or(rt.cfg.max_duration) {
        flow.ending.set(crate::util::sys::monotonic_ns() + d.as_nanos() as u64, &CloseCause::MaxDuration);
    }
    let client = match up.client.await.map(raw::<ClientIo>) {
        Ok(Some((io, read))) => io.into_parts(read),
        Ok(None) => unreachable!("the server's connection is TokioIo<ClientIo>"),
        Err(e) => {
            carry::retire(flow, Some(idx), &CloseCause::Error(format!("client upgrade: {e}")), rt, plane);
            return;
        }
    };
    let backend = match up.backend {
        BackendSide::Tcp(s) => (s, Bytes::new()),
        BackendSide::Exchanged(s, early) => (s, early),
        BackendSide::WebSocket(on, conn) => match conn.await.and(on.await).map(raw::<TcpStream>) {
            Ok(Some(b)) => b,
            Ok(None) => unreachable!("the client's connection to the backend is TokioIo<TcpStream>"),
            Err(e) => {
                carry::retire(flow, Some(idx), &CloseCause::Error(format!("backend upgrade: {e}")), rt, plane);
                return;
            }
        },
    };
    let _active = rt.activate(idx);
    let ((mut client, client_early), (mut backend, backend_early)) = (client, backend);
    let cause = match route.mode {
        WsMode::Passthrough => {
            // Bytes read past the heads (frames sent right behind the
            // request or the 101) go first, before the kernel takes over.
            let early = async {
                backend.write_all(&client_early).await.map_err(|e| (Side::Backend, e))?;
                client.write_all(&backend_early).await.map_err(|e| (Side::Client, e))
            };
            let timeout = http_of(rt).handshake_timeout;
            match tokio::time::timeout(timeout, early).await {
                Ok(Ok(())) => {
                    flow.add_user(Side::Client, client_early.len() as u64);
                    flow.add_user(Side::Backend, backend_early.len() as u64);
                    // Each may share hyper's whole read buffer: not kept for
                    // the life of the flow.
                    drop((client_early, backend_early));
                    match client {
                        session::Conn::Plain(mut client) => {
                            if !plane.handoff_delay.is_zero() {
                                tokio::time::sleep(plane.handoff_delay).await;
                            }
                            // Both heads were read off the sockets (and a
                            // PROXY header): no skb may be left half read
                            // when they go into the sockmap.
                            let settled = async {
                                Ok::<_, std::io::Error>(
                                    carry::settle(&mut client, &mut backend, flow, Side::Client).await?
                                        && carry::settle(&mut backend, &mut client, flow, Side::Backend).await?,
                                )
                            };
                            // Boxed: it runs once, and the task carries the flow for days.
                            match Box::pin(settled).await {
                                Ok(true) => {
                                    carry::forward(client, backend, idx, flow, rt, plane, idle).await;
                                    return;
                                }
                                Ok(false) => {
                                    flow.set_path(FlowPath::Userspace {
                                        reason: "a side kept sending while the heads were taken off".into(),
                                        code: Fallback::Unsettled,
                                    });
                                    let (c, b) = (session::Conn::Plain(client), session::Conn::Plain(backend));
                                    match Box::pin(carry::relay_movable(plane, c, b, flow, idle)).await {
                                        Some(cause) => cause,
                                        None => return,
                                    }
                                }
                                Err(e) => CloseCause::Error(format!("the bytes after the heads: {e}")),
                            }
                        }
                        // wss: the client's bytes are ciphertext, relayed here.
                        tls => {
                            flow.set_path(FlowPath::Userspace {
                                reason: "TLS is terminated in user space (no kTLS on this host)".into(),
                                code: Fallback::Tls,
                            });
                            crate::flow::log::record_with("handoff", || crate::flow::table::snapshot_one(flow, None));
                            match Box::pin(carry::relay_movable(plane, tls, session::Conn::Plain(backend), flow, idle))
                                .await
                            {
                                Some(cause) => cause,
                                None => return,
                            }
                        }
                    }
                }
                Ok(Err((side, e))) => CloseCause::Error(format!("writing early bytes to the {side}: {e}")),
                Err(_) => CloseCause::Error("early bytes not written within handshake_timeout".into()),
            }
        }
        WsMode::Inspect | WsMode::BridgeTcp => {
            let code =
                if route.mode == WsMode::Inspect { Fallback::WebSocketInspect } else { Fallback::WebSocketBridge };
            let reason = format!("mode {}: messages are relayed in user space", route.mode);
            flow.set_path(FlowPath::Userspace { reason, code });
            crate::flow::log::record_with("handoff", || crate::flow::table::snapshot_one(flow, None));
            let ends = crate::dataplane::ws::Ends {
                client,
                client_early,
                backend,
                backend_early,
                flow,
                limits: crate::dataplane::ws::Limits::of(route),
                idle,
                shutdown: plane.shutdown.subscribe(),
            };
            match Box::pin(carry::ws_movable(plane, ends)).await {
                Some(cause) => cause,
                None => return,
            }
        }
    };
    carry::retire(flow, Some(idx), &cause, rt, plane);
}

/// The stream under an upgraded connection and the bytes hyper read past the head.
fn raw<I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(
    up: hyper::upgrade::Upgraded,
) -> Option<(I, Bytes)> {
    let parts = up.downcast::<TokioIo<I>>().ok()?;
    Some((parts.io.into_inner(), parts.read_buf))
}

/// A body whose data bytes are added to the flow's counters as they pass.
pub(super) struct Counted {
    inner: Incoming,
    flow: Arc<Flow>,
    side: Side,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                this.flow.add_user(this.side, d.len() as u64);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl ClientConn {
    pub(super) fn counted(&self, inner: Incoming, side: Side) -> Counted {
        Counted { inner, flow: self.flow.clone(), side }
    }

    /// The request as it goes to a backend: HTTP/1.1, origin-form, without
    /// hop-by-hop headers, with the forwarding headers, its body counted.
    /// The Host header is the one the request was routed on.
    pub(super) fn outgoing(&self, req: Request<Incoming>, target: &Target) -> Request<Counted> {
        let (parts, body) = req.into_parts();
        let mut out = Request::from_parts(parts, self.counted(body, Side::Client));
        *out.version_mut() = Version::HTTP_11;
        *out.uri_mut() = origin_form(out.uri());
        strip_hop_by_hop(out.headers_mut());
        join_cookies(out.headers_mut());
        if let Some(a) = &target.authority {
            out.headers_mut().insert(header::HOST, a.clone());
        }
        add_forwarded(out.headers_mut(), self.flow.client, target.host.as_deref(), self.tls);
        out
    }

    pub(super) fn http(&self) -> &HttpListener {
        http_of(&self.rt)
    }

    async fn serve(&self, mut req: Request<Incoming>) -> Response<Body> {
        // An extended CONNECT (RFC 8441): a WebSocket on an HTTP/2 stream.
        let tunnel = req.extensions().get::<hyper::ext::Protocol>().is_some();
        let upgrade = tunnel || wants_websocket(req.headers());
        if req.method() == Method::CONNECT && !tunnel {
            let mut r = reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is taken only as an HTTP/2 WebSocket (:protocol websocket, RFC 8441)",
                false,
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"));
            return r;
        }
        let target = match request_target(&req) {
            Ok(t) => t,
            Err(why) => return reply(StatusCode::BAD_REQUEST, why, upgrade),
        };
        if req.version() == Version::HTTP_11 && target.host.is_none() {
            return reply(StatusCode::BAD_REQUEST, "HTTP/1.1 request without a Host header", upgrade);
        }
        if upgrade {
            let checked = if tunnel { check_connect(&req) } else { check_upgrade(&req) };
            if let Err(resp) = checked {
                return *resp;
            }
        }
        // Routed, and forwarded, on the normalised path: what the backend
        // sees is what the route's prefix matched.
        match normalize_path(req.uri().path()) {
            Ok(None) => {}
            Ok(Some(path)) => {
                let pq = match req.uri().query() {
                    Some(q) => format!("{path}?{q}"),
                    None => path,
                };
                match pq.parse() {
                    Ok(uri) => *req.uri_mut() = uri,
                    Err(_) => return reply(StatusCode::BAD_REQUEST, "malformed request target", upgrade),
                }
            }
            Err(why) => return reply(StatusCode::BAD_REQUEST, why, upgrade),
        }
        let host = &target.host;
        let path = req.uri().path();
        let Some(ri) = pick_route(self.http(), host.as_deref(), path) else {
            let shown = host.as_deref().unwrap_or("(none)");
            return reply(StatusCode::NOT_FOUND, format!("no route for host {shown} and path {path}"), upgrade);
        };
        let route = &self.http().routes[ri];
        let route_name = route.name();
        *self.flow.route.locked() = Some(route_name.clone());
        if let Some(jwt) = &route.jwt {
            if let Err(denied) = authenticate(jwt, &mut req) {
                self.rt.stats.route_refused(&route_name, denied.code());
                // The cause, never the token.
                tracing::info!(flow = self.flow.id, listener = %self.rt.cfg.name, route = %route_name, client = %self.flow.client, cause = denied.code(), "request refused by auth.jwt");
                let mut r = reply(StatusCode::UNAUTHORIZED, denied.describe(), upgrade);
                if let Ok(v) = HeaderValue::from_str(&denied.challenge()) {
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
                return r;
            }
        }
        if let Some(ext) = &route.external {
            let pq = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
            match super::authz::check(ext, req.method(), &pq, req.headers(), self.flow.client).await {
                Ok(super::authz::Decision::Allow(add)) => {
                    for (n, v) in add {
                        req.headers_mut().insert(n, v);
                    }
                }
                Ok(super::authz::Decision::Deny { status, headers, body }) => {
                    self.rt.stats.route_refused(&route_name, "external-denied");
                    tracing::info!(flow = self.flow.id, listener = %self.rt.cfg.name, route = %route_name, client = %self.flow.client, %status, "request refused by auth.external");
                    let mut r = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
                    *r.status_mut() = status;
                    *r.headers_mut() = headers;
                    if upgrade {
                        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    return r;
                }
                Err(why) if ext.failure_mode_allow => {
                    warn!(flow = self.flow.id, route = %route_name, "auth.external: {why}; allowed (failure_mode_allow)");
                }
                Err(why) => {
                    self.rt.stats.route_refused(&route_name, "external-unavailable");
                    warn!(flow = self.flow.id, route = %route_name, "auth.external: {why}; refused with 503");
                    return reply(StatusCode::SERVICE_UNAVAILABLE, "the authorization service did not answer", upgrade);
                }
            }
        }
        if !upgrade {
            if route.mode == WsMode::BridgeTcp {
                let mut r = reply(
                    StatusCode::UPGRADE_REQUIRED,
                    "this route bridges WebSocket to TCP; send a WebSocket upgrade",
                    false,
                );
                r.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                return r;
            }
            return self.proxy(req, ri, &target).await;
        }
        if let Some(allowed) = &route.allowed_origins {
            let origin = req.headers().get(header::ORIGIN).and_then(|o| o.to_str().ok());
            let norm = origin.map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase());
            if !allowed.iter().any(|a| a == "*" || Some(a) == norm.as_ref()) {
                let shown = origin.map_or("no Origin header".to_string(), |o| format!("origin {o:?}"));
                debug!(flow = self.flow.id, "upgrade refused: {shown} is not allowed");
                return reply(StatusCode::FORBIDDEN, format!("{shown} is not allowed on this route"), true);
            }
        }
        let slot = match route.max_connections {
            Some(cap) => match listener::RouteSlot::take(&self.rt.route_active, &route_name, cap) {
                Some(s) => Some(s),
                None => {
                    self.rt.stats.route_refused(&route_name, "route-max-connections");
                    let mut r = reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("route {route_name} holds its max_connections ({cap})"),
                        true,
                    );
                    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                    return r;
                }
            },
            None => None,
        };
        if tunnel {
            return self.tunnel(req, ri, &target, slot).await;
        }
        self.upgrade(req, ri, &target, slot).await
    }

    /// What `balance: maglev` hashes for this request on route `ri` (the
    /// listener's `hash_key`); `None`: the client's address.
    pub(super) fn maglev_key(&self, ri: usize, req: &Request<Incoming>) -> Option<u64> {
        use crate::config::{Balance, HashKey};
        if self.http().routes[ri].balance != Balance::Maglev {
            return None;
        }
        let value = match &self.rt.cfg.hash_key {
            HashKey::Source => None,
            HashKey::Header(h) => req.headers().get(h.as_str()).map(HeaderValue::as_bytes),
            HashKey::Cookie(c) => crate::policy::jwt::cookie(req.headers(), c).map(str::as_bytes),
            HashKey::Query(q) => crate::policy::jwt::query_param(req.uri().query(), q).map(str::as_bytes),
        }?;
        Some(crate::policy::maglev::hash(value))
    }

    /// Connects one of route `ri`'s backends within `deadline` (`key`: see
    /// `maglev_key`).
    pub(super) async fn connect(
        &self,
        ri: usize,
        deadline: Instant,
        key: Option<u64>,
    ) -> Result<(TcpStream, usize), Response<Body>> {
        let pool = self.rt.route_pool(ri).with_key(key);
        let send_proxy = self.http().routes[ri].send_proxy.or(self.rt.cfg.send_proxy);
        match tokio::time::timeout_at(deadline, listener::connect(&self.rt, &self.flow, pool, send_proxy)).await {
            Ok(Ok((s, idx))) => {
                *self.flow.backend.locked() = Some(self.rt.cfg.backends[idx]);
                Ok((s, idx))
            }
            Ok(Err(tried)) => {
                warn!(flow = self.flow.id, listener = %self.rt.cfg.name, client = %self.flow.client, "no backend answered ({tried})");
                Err(reply(StatusCode::BAD_GATEWAY, format!("no backend answered ({tried})"), true))
            }
            Err(_) => Err(reply(StatusCode::GATEWAY_TIMEOUT, "no backend answered within handshake_timeout", true)),
        }
    }

    /// The start of an upgrade (HTTP/1.1 or HTTP/2): a backend of route
    /// `ri` connected within `handshake_timeout`, the client's side of the
    /// upgrade to come, and the deadline the rest of the handshake keeps.
    async fn backend_for_upgrade(
        &self,
        req: &mut Request<Incoming>,
        ri: usize,
    ) -> Result<(TcpStream, usize, OnUpgrade, Instant), Response<Body>> {
        let deadline = Instant::now() + self.http().handshake_timeout;
        let (stream, idx) = self.connect(ri, deadline, self.maglev_key(ri, req)).await?;
        Ok((stream, idx, hyper::upgrade::on(req), deadline))
    }

    async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        ri: usize,
        target: &Target,
        slot: Option<listener::RouteSlot>,
    ) -> Response<Body> {
        let route = &self.http().routes[ri];
        let (stream, idx, client, deadline) = match self.backend_for_upgrade(&mut req, ri).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        if route.mode == WsMode::BridgeTcp {
            let resp = accept_bridge(req.headers());
            *self.upgrade.locked() =
                Some(Upgrade { route: ri, backend_idx: idx, client, backend: BackendSide::Tcp(stream), slot });
            return resp;
        }
        let backend_addr = self.rt.cfg.backends[idx];
        let offered_upgrade = req.headers().get(header::UPGRADE).cloned();
        let mut out = self.outgoing(req, target);
        out.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        out.headers_mut().insert(header::UPGRADE, offered_upgrade.unwrap_or(HeaderValue::from_static("websocket")));
        if route.mode == WsMode::Inspect {
            // The gateway parses the frames, and it speaks no extension.
            out.headers_mut().remove(SEC_WEBSOCKET_EXTENSIONS);
        }
        if !has_body(out.headers()) {
            return match self.exchange_upgrade(stream, out, idx, deadline).await {
                Ok((stream, early, head)) => {
                    *self.upgrade.locked() = Some(Upgrade {
                        route: ri,
                        backend_idx: idx,
                        client,
                        backend: BackendSide::Exchanged(stream, early),
                        slot,
                    });
                    switched(head.status, head.headers)
                }
                Err(resp) => resp,
            };
        }
        // The client connection is polled here, next to the request, not in
        // a task of its own: one task per flow, no cross-task wake-ups.
        let handshake = async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Counted>(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            let mut conn: BackendConn = Box::pin(conn.with_upgrades());
            let send = sender.send_request(out);
            tokio::pin!(send);
            tokio::select! {
                biased;
                r = &mut send => r.map(|resp| (resp, conn)).map_err(|e| e.to_string()),
                r = &mut conn => match r {
                    // Upgraded already (the 101 went through in the same
                    // poll): the response is waiting in `send`.
                    Ok(()) => {
                        let done: BackendConn = Box::pin(std::future::ready(Ok(())));
                        send.await.map(|resp| (resp, done)).map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e.to_string()),
                },
            }
        };
        let (mut resp, conn) = match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                warn!(flow = self.flow.id, backend = %backend_addr, "upgrade failed: {e}");
                return reply(StatusCode::BAD_GATEWAY, format!("backend {backend_addr} failed the upgrade: {e}"), true);
            }
            Err(_) => {
                return reply(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("backend {backend_addr} did not answer the upgrade within handshake_timeout"),
                    true,
                )
            }
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The backend's refusal, as it sent it; its body still needs the connection.
            tokio::spawn(conn);
            debug!(flow = self.flow.id, status = %resp.status(), "backend refused the upgrade");
            strip_hop_by_hop(resp.headers_mut());
            return resp.map(|b| self.counted(b, Side::Backend).boxed());
        }
        let backend = hyper::upgrade::on(&mut resp);
        *self.upgrade.locked() =
            Some(Upgrade { route: ri, backend_idx: idx, client, backend: BackendSide::WebSocket(backend, conn), slot });
        let (parts, _) = resp.into_parts();
        switched(parts.status, parts.headers)
    }

    /// An upgrade without a body, forwarded by `exchange`: the backend's 101
    /// with its socket and the bytes read past the head, for the hand-off;
    /// or what the client gets instead: the backend's refusal (read by
    /// hyper's client, for its body), or the gateway's 502 or 504.
    pub(super) async fn exchange_upgrade(
        &self,
        mut stream: TcpStream,
        out: Request<Counted>,
        idx: usize,
        deadline: Instant,
    ) -> Result<(TcpStream, Bytes, ResponseHead), Response<Body>> {
        let backend_addr = self.rt.cfg.backends[idx];
        let bad_gateway = |e: String| {
            warn!(flow = self.flow.id, backend = %backend_addr, "upgrade failed: {e}");
            reply(StatusCode::BAD_GATEWAY, format!("backend {backend_addr} failed the upgrade: {e}"), true)
        };
        let head = request_head(&out);
        let (buf, parsed) = match tokio::time::timeout_at(deadline, exchange(&mut stream, &head)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(bad_gateway(e)),
            Err(_) => {
                return Err(reply(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("backend {backend_addr} did not answer the upgrade within handshake_timeout"),
                    true,
                ))
            }
        };
        if parsed.status != StatusCode::SWITCHING_PROTOCOLS {
            // A refusal, perhaps with a body: hyper's client reads it from
            // what was read so far and the rest of the socket (the request
            // it writes is the one already sent, so it is dropped).
            debug!(flow = self.flow.id, status = %parsed.status, "backend refused the upgrade");
            let io = TokioIo::new(Replayed { read: buf, at: 0, inner: stream, written: false, reader: None });
            let resp = async {
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake::<_, Counted>(io).await.map_err(|e| e.to_string())?;
                // The request is queued before the connection first reads:
                // a response with no request in flight would be an error.
                let resp = sender.send_request(out);
                tokio::spawn(conn);
                resp.await.map_err(|e| e.to_string())
            };
            return Err(match tokio::time::timeout_at(deadline, resp).await {
                Ok(Ok(mut resp)) => {
                    strip_hop_by_hop(resp.headers_mut());
                    resp.map(|b| self.counted(b, Side::Backend).boxed())
                }
                Ok(Err(e)) => bad_gateway(e),
                Err(_) => bad_gateway("its refusal did not arrive within handshake_timeout".into()),
            });
        }
        let early = Bytes::copy_from_slice(&buf[parsed.len..]);
        Ok((stream, early, parsed))
    }

    /// A plain request, reverse-proxied.
    async fn proxy(&self, req: Request<Incoming>, ri: usize, target: &Target) -> Response<Body> {
        self.flow.http_requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if matches!(*self.flow.path.locked(), FlowPath::Connecting) {
            self.flow.set_path(FlowPath::Userspace {
                reason: "plain HTTP requests are proxied in user space".into(),
                code: Fallback::Http,
            });
        }
        let route = &self.http().routes[ri];
        let key = self.maglev_key(ri, &req);
        // `balance: maglev`: the cached connection serves this request only
        // if it goes to the backend the request's key picks.
        let wanted = (route.balance == crate::config::Balance::Maglev)
            .then(|| self.rt.first_choice(self.flow.client, self.rt.route_pool(ri).with_key(key)));
        let mut cached = self.backend.lock().await;
        let reuse = match cached.take() {
            Some((idx, mut s))
                if route.backends.contains(&idx)
                    && self.rt.health.is_up(idx)
                    && wanted.is_none_or(|w| w == Some(idx)) =>
            {
                s.ready().await.ok().map(|()| (idx, s))
            }
            _ => None,
        };
        let (idx, mut sender) = match reuse {
            Some(r) => r,
            None => {
                let deadline = Instant::now() + self.rt.cfg.connect_timeout * self.rt.cfg.connect_attempts;
                let (stream, idx) = match self.connect(ri, deadline, key).await {
                    Ok(b) => b,
                    Err(resp) => return resp,
                };
                match hyper::client::conn::http1::handshake::<_, Counted>(TokioIo::new(stream)).await {
                    Ok((sender, conn)) => {
                        tokio::spawn(conn);
                        (idx, sender)
                    }
                    Err(e) => return reply(StatusCode::BAD_GATEWAY, format!("backend connection failed: {e}"), false),
                }
            }
        };
        let backend_addr = self.rt.cfg.backends[idx];
        *self.flow.backend.locked() = Some(backend_addr);
        let out = self.outgoing(req, target);
        match sender.send_request(out).await {
            Ok(mut resp) => {
                *cached = Some((idx, sender));
                strip_hop_by_hop(resp.headers_mut());
                resp.map(|b| self.counted(b, Side::Backend).boxed())
            }
            Err(e) => {
                warn!(flow = self.flow.id, backend = %backend_addr, "request failed: {e}");
                reply(StatusCode::BAD_GATEWAY, format!("backend {backend_addr} failed: {e}"), false)
            }
        }
    }
}

pub(super) fn empty() -> Body {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}

/// The gateway's own answer: a status and a one-line reason. Failed upgrades
/// close the connection (the client may already be sending frames).
pub(super) fn reply(status: StatusCode, why: impl Into<String>, close: bool) -> Response<Body> {
    let mut body = why.into();
    body.push('\n');
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if close {
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// Checks a request against a route's `auth.jwt`: on success, the chosen
/// claims become request headers (each removed first, so a client cannot
/// forge them) and a token read from `Sec-WebSocket-Protocol` leaves that
/// header (the backend never sees it, and cannot pick it as the protocol).
fn authenticate(jwt: &crate::policy::jwt::Jwt, req: &mut Request<Incoming>) -> Result<(), crate::policy::jwt::Denied> {
    use crate::policy::jwt::{claim_value, looks_like_jwt, Denied, Source};
    let (token, source) = jwt.token(req.headers(), req.uri().query()).ok_or(Denied::Missing)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let claims = jwt.verify(&token, now)?;
    if *source == Source::Subprotocol {
        let rest: Vec<String> = tokens(req.headers(), header::SEC_WEBSOCKET_PROTOCOL)
            .filter(|e| !e.is_empty() && !looks_like_jwt(e))
            .map(String::from)
            .collect();
        req.headers_mut().remove(header::SEC_WEBSOCKET_PROTOCOL);
        if let Ok(v) = HeaderValue::from_str(&rest.join(", ")) {
            if !rest.is_empty() {
                req.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, v);
            }
        }
    }
    for (claim, name) in &jwt.claims_to_headers {
        let Ok(name) = header::HeaderName::from_bytes(name.as_bytes()) else { continue };
        req.headers_mut().remove(&name);
        if let Some(v) = claims.get(claim).map(claim_value).and_then(|v| HeaderValue::from_str(&v).ok()) {
            req.headers_mut().insert(name, v);
        }
    }
    Ok(())
}

/// Comma-separated tokens of every instance of a header.
pub(super) fn tokens(h: &HeaderMap, name: impl header::AsHeaderName) -> impl Iterator<Item = &str> {
    h.get_all(name).into_iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim)
}

/// Is this an attempt at a WebSocket upgrade? (`Upgrade` lists `websocket`.)
fn wants_websocket(h: &HeaderMap) -> bool {
    tokens(h, header::UPGRADE).any(|t| t.eq_ignore_ascii_case("websocket"))
}

/// RFC 6455 §4.2.1. `Err` is the answer: 400 naming what is wrong, or 426.
fn check_upgrade(req: &Request<Incoming>) -> Result<(), Box<Response<Body>>> {
    let h = req.headers();
    let bad = |why: String| Err(Box::new(reply(StatusCode::BAD_REQUEST, why, true)));
    if req.method() != Method::GET {
        return bad(format!("a WebSocket upgrade must be a GET request, not {}", req.method()));
    }
    if req.version() != Version::HTTP_11 {
        return bad(format!("a WebSocket upgrade needs HTTP/1.1, not {:?}", req.version()));
    }
    if !tokens(h, header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade")) {
        let found: Vec<&str> = tokens(h, header::CONNECTION).collect();
        return bad(format!("the Connection header must list \"upgrade\" (found {:?})", found.join(", ")));
    }
    check_version(h)?;
    let keys: Vec<&HeaderValue> = h.get_all(SEC_WEBSOCKET_KEY).iter().collect();
    match keys.as_slice() {
        [] => bad("missing Sec-WebSocket-Key".into()),
        [k] if is_websocket_key(k.as_bytes().trim_ascii()) => Ok(()),
        [k] => {
            bad(format!("Sec-WebSocket-Key {:?} is not the base64 of 16 bytes", String::from_utf8_lossy(k.as_bytes())))
        }
        _ => bad("more than one Sec-WebSocket-Key".into()),
    }
}

/// `Sec-WebSocket-Version: 13`, or the answer: 400 when missing, 426 naming
/// the version spoken otherwise (RFC 6455 §4.4).
pub(super) fn check_version(h: &HeaderMap) -> Result<(), Box<Response<Body>>> {
    let versions: Vec<&HeaderValue> = h.get_all(SEC_WEBSOCKET_VERSION).iter().collect();
    match versions.as_slice() {
        [] => Err(Box::new(reply(
            StatusCode::BAD_REQUEST,
            "missing Sec-WebSocket-Version (this gateway speaks 13)",
            true,
        ))),
        [v] if v.as_bytes().trim_ascii() == b"13" => Ok(()),
        _ => {
            let shown: Vec<String> =
                versions.iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
            let mut r = reply(
                StatusCode::UPGRADE_REQUIRED,
                format!("unsupported Sec-WebSocket-Version {:?}; this gateway speaks 13", shown.join(", ")),
                true,
            );
            r.headers_mut().insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            Err(Box::new(r))
        }
    }
}

/// 16 bytes in base64: 22 alphabet characters, then "==".
fn is_websocket_key(k: &[u8]) -> bool {
    k.len() == 24
        && k[22..] == *b"=="
        && k[..22].iter().all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
        // The last character carries 2 bits; the 4 unused ones must be zero.
        && b"AQgw".contains(&k[21])
}

/// What a request is routed on: the host, and the authority forwarded as
/// its `Host`.
pub(crate) struct Target {
    /// Lower case, without port or trailing dot.
    pub(crate) host: Option<String>,
    pub(crate) authority: Option<HeaderValue>,
}

/// The request's host, from its one `Host` header or an absolute-form
/// target (RFC 9112 §3.2.2: the target's authority wins, so a `Host` that
/// names another host is refused rather than forwarded beside it).
pub(crate) fn request_target<B>(req: &Request<B>) -> Result<Target, &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    let parse = |raw: &str| -> Result<Option<String>, &'static str> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Ok(None);
        }
        let a: hyper::http::uri::Authority = raw.parse().map_err(|_| "malformed Host header")?;
        if raw.contains('@') {
            return Err("malformed Host header (userinfo)");
        }
        let host = a.host().trim_end_matches('.').to_ascii_lowercase();
        Ok((!host.is_empty()).then_some(host))
    };
    let from_header = match header {
        None => None,
        Some(v) => parse(v.to_str().map_err(|_| "malformed Host header")?)?,
    };
    match req.uri().authority() {
        Some(a) => {
            let host = parse(a.as_str())?;
            if from_header.is_some() && from_header != host {
                return Err("the Host header and the request target name different hosts");
            }
            let authority = HeaderValue::from_str(a.as_str()).map_err(|_| "malformed request target")?;
            Ok(Target { host, authority: Some(authority) })
        }
        None => Ok(Target { authority: from_header.as_ref().and(header.cloned()), host: from_header }),
    }
}

/// The path as routes see it (Envoy's `normalize_path`): percent-encoded
/// unreserved characters decoded, other escapes in upper case, and dot
/// segments removed (RFC 3986 §6.2.2, §5.2.4), so `/pub/../admin` and
/// `/pub/%2e%2e/admin` both route as `/admin`. `None` when it is already
/// normal; an error for a bad escape.
pub(crate) fn normalize_path(path: &str) -> Result<Option<String>, &'static str> {
    if !path.starts_with('/') || !path.bytes().any(|b| b == b'%' || b == b'.') {
        return Ok(None);
    }
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            decoded.push(bytes[i]);
            i += 1;
            continue;
        }
        let (Some(h), Some(l)) = (bytes.get(i + 1).and_then(|&b| hex(b)), bytes.get(i + 2).and_then(|&b| hex(b)))
        else {
            return Err("malformed percent-encoding in the path");
        };
        let c = (h * 16 + l) as u8;
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
            decoded.push(c);
        } else {
            decoded.extend_from_slice(format!("%{c:02X}").as_bytes());
        }
        i += 3;
    }
    // Only escapes of ASCII were replaced: still UTF-8.
    let decoded = String::from_utf8(decoded).map_err(|_| "malformed path")?;
    let mut out: Vec<&str> = Vec::new();
    let mut segments = decoded[1..].split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => {
                out.push(s);
                continue;
            }
        }
        // `/a/.` and `/a/b/..` end in a directory: `/a/`.
        if last {
            out.push("");
        }
    }
    let normal = format!("/{}", out.join("/"));
    Ok((normal != path).then_some(normal))
}

/// The route for a request: the most specific host first (exact, then the
/// longest wildcard, then routes without a host), then the longest prefix.
pub fn pick_route(http: &HttpListener, host: Option<&str>, path: &str) -> Option<usize> {
    http.routes
        .iter()
        .enumerate()
        .filter(|(_, r)| r.host.matches(host) && r.covers(path))
        .max_by_key(|(i, r): &(usize, &Route)| (r.host.rank(), r.path_prefix.len(), std::cmp::Reverse(*i)))
        .map(|(i, _)| i)
}

fn origin_form(uri: &Uri) -> Uri {
    let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
    pq.parse().unwrap_or_else(|_| Uri::from_static("/"))
}

/// RFC 9110 §7.6.1: headers for this hop only, and those `Connection` names.
pub(super) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> =
        tokens(h, header::CONNECTION).filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok()).collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        h.remove(n);
    }
}

/// One `Cookie` header: HTTP/2 clients may send a field per cookie (RFC 9113
/// §8.2.3), and an HTTP/1.1 backend takes one, its pairs joined by "; ".
fn join_cookies(h: &mut HeaderMap) {
    if h.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined: Vec<&[u8]> = h.get_all(header::COOKIE).iter().map(HeaderValue::as_bytes).collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        h.insert(header::COOKIE, v);
    }
}

/// Appends the client to `X-Forwarded-For` and `Forwarded`, and sets
/// `X-Forwarded-Proto`.
fn add_forwarded(h: &mut HeaderMap, client: SocketAddr, host: Option<&str>, tls: bool) {
    let proto = if tls { "https" } else { "http" };
    let ip = client.ip().to_canonical();
    let xff = match tokens(h, "x-forwarded-for").filter(|t| !t.is_empty()).collect::<Vec<_>>() {
        v if v.is_empty() => ip.to_string(),
        v => format!("{}, {ip}", v.join(", ")),
    };
    let node = if ip.is_ipv6() { format!("\"[{ip}]\"") } else { ip.to_string() };
    let mut fwd = format!("for={node};proto={proto}");
    if let Some(host) = host.filter(|h| h.bytes().all(|c| c.is_ascii_alphanumeric() || b".-_".contains(&c))) {
        fwd.push_str(";host=");
        fwd.push_str(host);
    }
    let prev: Vec<&str> = h.get_all(header::FORWARDED).iter().filter_map(|v| v.to_str().ok()).collect();
    let fwd = if prev.is_empty() { fwd } else { format!("{}, {fwd}", prev.join(", ")) };
    for (name, value) in [("x-forwarded-for", xff), ("forwarded", fwd), ("x-forwarded-proto", proto.into())] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
}

/// The gateway's own 101 for a bridge_tcp route (it is the WebSocket server).
pub(super) fn accept_bridge(h: &HeaderMap) -> Response<Body> {
    let key = h.get(SEC_WEBSOCKET_KEY).map(|k| k.as_bytes().trim_ascii()).unwrap_or_default();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key);
    let mut r = Response::new(empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hs = r.headers_mut();
    hs.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    hs.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        hs.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    // websockify clients offer "binary"; it is the only subprotocol spoken.
    if tokens(h, SEC_WEBSOCKET_PROTOCOL).any(|p| p == "binary") {
        hs.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("binary"));
    }
    r
}

/// The backend's 101 as the client gets it: its end-to-end headers, and the
/// upgrade it agreed to.
pub(crate) fn switched(status: StatusCode, mut headers: HeaderMap) -> Response<Body> {
    let upgrade = headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut headers);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, upgrade.unwrap_or(HeaderValue::from_static("websocket")));
    let mut resp = Response::new(empty());
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// Whether a request announces a body (RFC 9112 §6.3).
fn has_body(h: &HeaderMap) -> bool {
    h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes().iter().any(|&b| b != b'0'))
}

/// An HTTP/1.1 request head, as hyper's client would write it.
fn request_head<B>(req: &Request<B>) -> Vec<u8> {
    let mut h = Vec::with_capacity(512);
    h.extend_from_slice(req.method().as_str().as_bytes());
    h.push(b' ');
    h.extend_from_slice(req.uri().path_and_query().map_or("/", |p| p.as_str()).as_bytes());
    h.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        h.extend_from_slice(name.as_str().as_bytes());
        h.extend_from_slice(b": ");
        h.extend_from_slice(value.as_bytes());
        h.extend_from_slice(b"\r\n");
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// How long a drained connection may go without moving a byte before it is
/// closed (a request in progress is otherwise let finish).
pub(super) const DRAIN_STALL: Duration = Duration::from_secs(5);

/// The largest response head `exchange` reads.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

pub(crate) struct ResponseHead {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    /// Bytes of the head, blank line included.
    pub(crate) len: usize,
}

/// Writes the request head, reads until the response head is complete.
/// Returns everything read (head and what followed it) and the parsed head.
async fn exchange(stream: &mut TcpStream, head: &[u8]) -> Result<(Vec<u8>, ResponseHead), String> {
    use tokio::io::AsyncReadExt;
    stream.write_all(head).await.map_err(|e| format!("writing the request: {e}"))?;
    let mut buf = Vec::with_capacity(4096);
    loop {
        let n = stream.read_buf(&mut buf).await.map_err(|e| format!("reading the response: {e}"))?;
        if n == 0 {
            return Err("the connection closed before a complete response head".into());
        }
        match response_head(&buf)? {
            Some(head) => return Ok((buf, head)),
            None if buf.len() >= MAX_RESPONSE_HEAD => {
                return Err(format!("response head over {MAX_RESPONSE_HEAD} bytes"))
            }
            None => {
                if buf.capacity() == buf.len() {
                    buf.reserve(buf.len());
                }
            }
        }
    }
}

/// The response head at the start of `buf`: `None` while it is incomplete,
/// an error if it is not an HTTP/1.1 head this module can forward.
pub(crate) fn response_head(buf: &[u8]) -> Result<Option<ResponseHead>, String> {
    let mut slots = [httparse::EMPTY_HEADER; 100];
    let mut resp = httparse::Response::new(&mut slots);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            if resp.version != Some(1) {
                return Err("the response is not HTTP/1.1".into());
            }
            let status =
                resp.code.and_then(|c| StatusCode::from_u16(c).ok()).ok_or("the response has no valid status code")?;
            let mut headers = HeaderMap::with_capacity(resp.headers.len());
            for h in resp.headers.iter() {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| format!("invalid header name {:?} in the response", h.name))?;
                let value = HeaderValue::from_bytes(h.value)
                    .map_err(|_| format!("invalid value for header {name} in the response"))?;
                headers.append(name, value);
            }
            Ok(Some(ResponseHead { status, headers, len }))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(format!("malformed response: {e}")),
    }
}

/// A backend socket whose first bytes were already read: reads return those
/// first; writes are dropped (hyper's client writes the request that was
/// already sent). Nothing is read before that write: hyper's client takes
/// bytes that come with no request in flight for an error.
struct Replayed {
    read: Vec<u8>,
    at: usize,
    inner: TcpStream,
    written: bool,
    reader: Option<std::task::Waker>,
}

impl tokio::io::AsyncRead for Replayed {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.written {
            this.reader = Some(cx.waker().clone());
            return std::task::Poll::Pending;
        }
        if this.at < this.read.len() {
            let n = out.remaining().min(this.read.len() - this.at);
            out.put_slice(&this.read[this.at..this.at + n]);
            this.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

impl tokio::io::AsyncWrite for Replayed {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.written = true;
        if let Some(w) = this.reader.take() {
            w.wake();
        }
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
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
    check_version(req.headers())
}

/// A WebSocket stream (RFC 8441) its backend agreed to, for the HTTP/2
/// connection's loop (`h2::serve`) to carry once the client has its 200.
pub(super) struct Tunnel {
    pub(super) client: OnUpgrade,
    pub(super) backend: TcpStream,
    /// Bytes the backend sent right behind its 101.
    pub(super) backend_early: Bytes,
    pub(super) route: usize,
    pub(super) backend_idx: usize,
    /// Its place under the route's `max_connections`, and among the
    /// connection's open streams (`ClientConn::tunnels`), for its life.
    pub(super) slot: Option<listener::RouteSlot>,
    pub(super) open: InFlightGuard,
    /// Its place under the listener's admission.
    pub(super) place: StreamPlace,
}

/// A WebSocket stream's place under the listener's caps and rates. The
/// connection's own place (taken at accept) covers one stream; each further
/// stream open at once takes a place of its own, so a client holds as many
/// WebSockets under `max_connections_per_source` over HTTP/2 as it could
/// over HTTP/1.1 (nginx's `limit_conn` counts HTTP/2 streams too).
/// Held for its drop, which gives the place back.
pub(super) enum StreamPlace {
    /// The connection's place, free again when the stream ends.
    Connection(#[allow(dead_code)] ConnectionPlace),
    Own(#[allow(dead_code)] crate::policy::limits::Admitted),
}

pub(super) struct ConnectionPlace(Arc<AtomicBool>);

impl Drop for ConnectionPlace {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
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
        slot: Option<listener::RouteSlot>,
    ) -> Response<Body> {
        let route = &self.http().routes[ri];
        let place = match self.stream_place() {
            Ok(p) => p,
            Err(resp) => return *resp,
        };
        let (stream, idx, client, deadline) = match self.backend_for_upgrade(&mut req, ri).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
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
        let Agreed { stream, early, headers } = agreed;
        self.tunnels.fetch_add(1, Ordering::Relaxed);
        let tunnel = Tunnel {
            client,
            backend: stream,
            backend_early: early,
            route: ri,
            backend_idx: idx,
            slot,
            open: InFlightGuard(self.tunnels.clone()),
            place,
        };
        // To the connection's loop, which carries it once hyper has sent the 200.
        match &self.streams {
            Some(tx) if tx.send(tunnel).is_ok() => {}
            _ => return reply(StatusCode::SERVICE_UNAVAILABLE, "the connection is closing", false),
        }
        let mut r = Response::new(empty());
        *r.headers_mut() = headers;
        r
    }

    /// A place for one more WebSocket stream (see `StreamPlace`), or the
    /// answer: 503 (a cap) or 429 (a rate), with `Retry-After`.
    fn stream_place(&self) -> Result<StreamPlace, Box<Response<Body>>> {
        if self.place_taken.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            return Ok(StreamPlace::Connection(ConnectionPlace(self.place_taken.clone())));
        }
        match self.rt.admit_stream(self.flow.client) {
            Ok(a) => Ok(StreamPlace::Own(a)),
            Err(cause) => {
                let status = match cause {
                    "rate-limit" | "source-rate-limit" => StatusCode::TOO_MANY_REQUESTS,
                    "denied" => StatusCode::FORBIDDEN,
                    _ => StatusCode::SERVICE_UNAVAILABLE,
                };
                let mut r = reply(status, format!("over the listener's limits ({cause})"), false);
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                Err(Box::new(r))
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_picked_by_host_then_longest_whole_segment_prefix() {
        let yaml = r#"
listeners:
  - name: w
    bind: "0.0.0.0:8080"
    protocol: websocket
    routes:
      - path_prefix: /
        backends: ["10.0.0.1:1"]
      - path_prefix: /api
        backends: ["10.0.0.2:1"]
      - path_prefix: /api/v2
        backends: ["10.0.0.3:1"]
      - host: "*.example.com"
        path_prefix: /
        backends: ["10.0.0.4:1"]
      - host: a.example.com
        path_prefix: /
        backends: ["10.0.0.5:1"]
"#;
        let c = crate::config::Config::parse(yaml, std::path::Path::new("t.yaml")).unwrap();
        let h = c.listeners[0].http().unwrap();
        let pick = |host: Option<&str>, path: &str| pick_route(h, host, path);
        assert_eq!(pick(None, "/api/v2/x"), Some(2));
        assert_eq!(pick(None, "/api/v2"), Some(2));
        // Whole segments: /api/v20 is under /api, not under /api/v2.
        assert_eq!(pick(None, "/api/v20"), Some(1));
        assert_eq!(pick(None, "/apix"), Some(0));
        // A route for the host beats any path length without one; an exact
        // host beats a wildcard, which needs a label before its suffix.
        assert_eq!(pick(Some("b.example.com"), "/api/v2"), Some(3));
        assert_eq!(pick(Some("a.example.com"), "/api"), Some(4));
        assert_eq!(pick(Some("example.com"), "/api"), Some(1));
    }

    #[test]
    fn websocket_keys() {
        assert!(is_websocket_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        for bad in [&b"dGhlIHNhbXBsZSBub25jZQ="[..], b"dGhlIHNhbXBsZSBub25jZR==", b"not a key at all!!!!!!==", b""] {
            assert!(!is_websocket_key(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn paths_are_normalised_before_routing() {
        let n = |p: &str| normalize_path(p).unwrap().unwrap_or_else(|| p.to_string());
        assert_eq!(n("/pub/../admin"), "/admin");
        assert_eq!(n("/pub/%2e%2e/admin"), "/admin");
        assert_eq!(n("/pub/%2E%2e/%61dmin"), "/admin");
        assert_eq!(n("/../../etc"), "/etc");
        assert_eq!(n("/a/./b/."), "/a/b/");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/a/%2f/b%2fc"), "/a/%2F/b%2Fc");
        assert_eq!(n("/a//b"), "/a//b");
        assert_eq!(n("/v1.2/x.json"), "/v1.2/x.json");
        assert_eq!(n("/.well-known/x"), "/.well-known/x");
        assert_eq!(normalize_path("/ws"), Ok(None));
        assert_eq!(normalize_path("*"), Ok(None));
        assert!(normalize_path("/a%2").is_err());
        assert!(normalize_path("/a%zz").is_err());
    }

    #[test]
    fn hop_by_hop_headers_stop_here() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "keep-alive, X-Secret, upgrade"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "close"),
            ("proxy-authenticate", "Basic"),
            ("trailer", "x"),
            ("sec-websocket-protocol", "chat"),
            ("cookie", "a=1"),
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["sec-websocket-protocol", "cookie"]);
    }

    #[test]
    fn cookie_fields_become_one_header() {
        let mut h = HeaderMap::new();
        for v in ["a=1", "b=2", "c=3"] {
            h.append(header::COOKIE, HeaderValue::from_static(v));
        }
        join_cookies(&mut h);
        let all: Vec<&HeaderValue> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3"]);
        let mut one = HeaderMap::new();
        one.insert(header::COOKIE, HeaderValue::from_static("x=1; y=2"));
        join_cookies(&mut one);
        assert_eq!(one.get(header::COOKIE).unwrap(), "x=1; y=2");
    }

    #[test]
    fn hosts_are_one_and_agree() {
        let req = |target: &str, hosts: &[&str]| {
            let mut b = Request::builder().uri(target);
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            request_target(&b.body(()).unwrap())
        };
        let t = req("/x", &["App.Test.:8080"]).unwrap();
        assert_eq!(t.host.as_deref(), Some("app.test"));
        assert_eq!(t.authority.unwrap(), "App.Test.:8080");
        assert!(req("/x", &["a.test", "b.test"]).is_err());
        assert!(req("/x", &["a.test", "a.test"]).is_err());
        assert!(req("/x", &["user@a.test"]).is_err());
        assert!(req("/x", &["a test"]).is_err());
        let t = req("http://a.test:81/x", &["A.test"]).unwrap();
        assert_eq!((t.host.as_deref(), t.authority.unwrap()), (Some("a.test"), HeaderValue::from_static("a.test:81")));
        assert!(req("http://a.test/x", &["evil.test"]).is_err());
        let t = req("/x", &[]).unwrap();
        assert!(t.host.is_none() && t.authority.is_none());
    }

    #[test]
    fn request_heads_and_bodies() {
        let req = Request::get("http://ignored/ws?room=1")
            .header("host", "chat.test")
            .header("sec-websocket-protocol", "a, b")
            .body(())
            .unwrap();
        let want = b"GET /ws?room=1 HTTP/1.1\r\nhost: chat.test\r\nsec-websocket-protocol: a, b\r\n\r\n".to_vec();
        assert_eq!(String::from_utf8_lossy(&request_head(&req)), String::from_utf8_lossy(&want));
        let mut h = HeaderMap::new();
        assert!(!has_body(&h));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("00"));
        assert!(!has_body(&h));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        assert!(has_body(&h));
        h.remove(header::CONTENT_LENGTH);
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert!(has_body(&h));
    }

    /// The exchange against a raw socket: the request head arrives as
    /// written, a 101 split over two writes is parsed, and the bytes behind
    /// it are returned for the hand-off.
    #[tokio::test]
    async fn exchange_reads_a_split_101_and_keeps_what_follows() {
        use tokio::io::AsyncReadExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let backend = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = vec![0u8; 18];
            s.read_exact(&mut got).await.unwrap();
            s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n").await.unwrap();
            s.write_all(b"Connection: Upgrade\r\n\r\n\x81\x02hi").await.unwrap();
            got
        });
        let mut s = TcpStream::connect(addr).await.unwrap();
        let (buf, head) = exchange(&mut s, b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(backend.await.unwrap(), b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(head.status, StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(head.headers.get("upgrade").unwrap(), "websocket");
        assert_eq!(&buf[head.len..], b"\x81\x02hi");
    }
}
