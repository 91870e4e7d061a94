//! The modes in which the gateway terminates WebSockets (tokio-tungstenite),
//! after `http.rs` has done the upgrade. These flows stay in user space.
//!
//! - `inspect`: a WebSocket on each side; messages are relayed whole, counted,
//!   and held to `max_message_size` (close 1009). Pings and pongs are answered
//!   on each side, not relayed. A close is forwarded with its code and reason.
//! - `bridge_tcp`: the client's WebSocket against a raw TCP backend, as
//!   websockify does. Message payloads go to the TCP stream, TCP bytes come
//!   back as binary messages. The client's close half-closes the TCP stream;
//!   the backend's EOF becomes a close (1000), and what the client sends
//!   until it answers still reaches the backend.
//!
//! In both: `ping_interval` pings each WebSocket side, and a side that has
//! sent nothing by the next ping is dropped; `idle_timeout` and the daemon's
//! drain end the flow with close 1001 (going away).
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
    time::{sleep_until, Instant},
};
use tokio_tungstenite::{
    tungstenite::{
        protocol::{frame::coding::CloseCode, CloseFrame, Role, WebSocketConfig},
        Error as WsError, Message,
    },
    WebSocketStream,
};
use tracing::{debug, info};

use crate::{
    config::Route,
    flows::{CloseCause, Flow, Side},
};

/// Any byte stream a WebSocket runs over (TCP, or TLS terminated here).
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

type Ws = WebSocketStream<Box<dyn Io>>;

/// How long a close handshake may take once started.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// Bytes read from a bridge_tcp backend per message, at most.
const BRIDGE_CHUNK: usize = 64 << 10;

/// Both sides of an upgraded flow, with the bytes read past the heads.
pub struct Ends<'a> {
    pub client: Box<dyn Io>,
    pub client_early: Bytes,
    pub backend: TcpStream,
    pub backend_early: Bytes,
    pub flow: &'a Flow,
    pub route: &'a Route,
    pub idle: Duration,
    pub shutdown: watch::Receiver<bool>,
}

/// Resolves once the daemon's drain has started.
pub async fn draining(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn ws_config(route: &Route) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(route.max_message_size))
        .max_frame_size(Some(route.max_message_size))
}

fn close(code: CloseCode, reason: &str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: reason.to_string().into() }))
}

fn other(side: Side) -> Side {
    match side {
        Side::Client => Side::Backend,
        Side::Backend => Side::Client,
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// What a WebSocket read error means for the flow, and the close code owed
/// to the side that caused it (none when its connection is gone).
fn read_error(side: Side, e: &WsError, max: usize) -> (CloseCause, Option<Message>) {
    match e {
        WsError::Capacity(_) => (
            CloseCause::Rejected(format!("{side} sent a message over max_message_size ({max} bytes)")),
            Some(close(CloseCode::Size, "message too big")),
        ),
        WsError::Utf8(_) => (
            CloseCause::Error(format!("{side} sent invalid UTF-8 text")),
            Some(close(CloseCode::Invalid, "invalid UTF-8")),
        ),
        WsError::Protocol(p) => (
            CloseCause::Error(format!("{side} broke the WebSocket protocol: {p}")),
            Some(close(CloseCode::Protocol, "protocol error")),
        ),
        WsError::ConnectionClosed | WsError::AlreadyClosed => (CloseCause::Closed { first: side }, None),
        _ => (CloseCause::Reset { by: side }, None),
    }
}

/// Ping bookkeeping for one side.
struct Liveness {
    every: Option<Duration>,
    next: Instant,
    heard: [bool; 2],
}

impl Liveness {
    fn new(every: Option<Duration>) -> Self {
        let next = every.map_or_else(far_future, |d| Instant::now() + d);
        Self { every, next, heard: [true, true] }
    }

    fn heard(&mut self, side: Side) {
        self.heard[side as usize] = true;
    }

    /// At a tick: the side that stayed silent since the last ping, if any;
    /// otherwise arm the next round.
    fn tick(&mut self) -> Option<Side> {
        let silent = [Side::Client, Side::Backend].into_iter().find(|s| !self.heard[*s as usize]);
        self.heard = [false, false];
        self.next = Instant::now() + self.every.unwrap_or(Duration::from_secs(86_400));
        silent
    }
}

/// Relays messages between two WebSockets.
pub async fn inspect(e: Ends<'_>) -> CloseCause {
    let cfg = ws_config(e.route);
    let c = Ws::from_partially_read(e.client, e.client_early.to_vec(), Role::Server, Some(cfg)).await;
    let backend: Box<dyn Io> = Box::new(e.backend);
    let b = Ws::from_partially_read(backend, e.backend_early.to_vec(), Role::Client, Some(cfg)).await;
    let mut ws = [c, b];
    let (flow, max) = (e.flow, e.route.max_message_size);
    let mut shutdown = e.shutdown;
    let mut open = [true, true];
    let mut live = Liveness::new(e.route.ping_interval);
    let mut idle_at = Instant::now() + e.idle;
    let mut closing: Option<Instant> = None;
    let mut cause: Option<CloseCause> = None;
    // Starts a close on both sides (unless already closing).
    macro_rules! close_both {
        ($why:expr, $to_client:expr, $to_backend:expr) => {
            if closing.is_none() {
                cause.get_or_insert($why);
                closing = Some(Instant::now() + CLOSE_WAIT);
                for (i, m) in [$to_client, $to_backend].into_iter().enumerate() {
                    if let (true, Some(m)) = (open[i], m) {
                        let _ = ws[i].send(m).await;
                    }
                }
            }
        };
    }
    while open[0] || open[1] {
        let [c, b] = &mut ws;
        let (side, m) = tokio::select! {
            m = c.next(), if open[0] => (Side::Client, m),
            m = b.next(), if open[1] => (Side::Backend, m),
            () = sleep_until(live.next), if closing.is_none() => {
                match live.tick() {
                    Some(silent) => {
                        info!(flow = flow.id, "{silent} did not answer a ping within ping_interval; closing the flow");
                        open[silent as usize] = false;
                        let why = CloseCause::Error(format!("{silent} did not answer a ping within ping_interval"));
                        let to_other = Some(close(CloseCode::Away, "peer stopped answering"));
                        let (tc, tb) = if silent == Side::Client { (None, to_other) } else { (to_other, None) };
                        close_both!(why, tc, tb);
                    }
                    None => {
                        for (i, w) in ws.iter_mut().enumerate() {
                            if open[i] {
                                let _ = w.send(Message::Ping(Bytes::from_static(b"gateway"))).await;
                            }
                        }
                    }
                }
                continue;
            }
            () = sleep_until(idle_at), if closing.is_none() => {
                let m = || Some(close(CloseCode::Away, "idle timeout"));
                close_both!(CloseCause::IdleTimeout, m(), m());
                continue;
            }
            () = crate::ws::draining(&mut shutdown), if closing.is_none() => {
                let m = || Some(close(CloseCode::Away, "gateway shutting down"));
                close_both!(CloseCause::Shutdown, m(), m());
                continue;
            }
            () = sleep_until(closing.unwrap_or_else(far_future)), if closing.is_some() => break,
        };
        let (x, y) = (side as usize, other(side) as usize);
        live.heard(side);
        match m {
            Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                idle_at = Instant::now() + e.idle;
                if closing.is_some() || !open[y] {
                    continue;
                }
                let len = msg.len() as u64;
                if ws[y].send(msg).await.is_err() {
                    open[y] = false;
                    let m = Some(close(CloseCode::Away, "peer went away"));
                    let (tc, tb) = if side == Side::Client { (m, None) } else { (None, m) };
                    close_both!(CloseCause::Reset { by: other(side) }, tc, tb);
                    continue;
                }
                flow.add_message(side, len);
            }
            Some(Ok(Message::Close(frame))) => {
                // Forward the close as sent; tungstenite answers this side.
                if closing.is_none() {
                    cause = Some(CloseCause::Closed { first: side });
                    closing = Some(Instant::now() + CLOSE_WAIT);
                    if open[y] {
                        let _ = ws[y].send(Message::Close(frame)).await;
                    }
                }
            }
            Some(Ok(_)) => {} // ping, pong: answered per side
            None => {
                open[x] = false;
                let m = Some(close(CloseCode::Away, "peer went away"));
                let (tc, tb) = if side == Side::Client { (None, m) } else { (m, None) };
                close_both!(CloseCause::Closed { first: side }, tc, tb);
            }
            Some(Err(err)) => {
                let (why, owed) = read_error(side, &err, max);
                debug!(flow = flow.id, %side, "websocket read: {err}");
                match owed {
                    Some(m) => {
                        let _ = ws[x].send(m).await;
                    }
                    None => open[x] = false,
                }
                let m = Some(close(CloseCode::Away, "peer went away"));
                let (tc, tb) = if side == Side::Client { (None, m) } else { (m, None) };
                close_both!(why, tc, tb);
            }
        }
    }
    cause.unwrap_or(CloseCause::Closed { first: Side::Client })
}

/// Bridges the client's WebSocket to a raw TCP backend.
pub async fn bridge(e: Ends<'_>) -> CloseCause {
    let cfg = ws_config(e.route);
    let mut ws = Ws::from_partially_read(e.client, e.client_early.to_vec(), Role::Server, Some(cfg)).await;
    let mut tcp = e.backend;
    let (mut tr, mut tw) = tcp.split();
    let (flow, max) = (e.flow, e.route.max_message_size);
    let mut shutdown = e.shutdown;
    let mut buf = vec![0u8; BRIDGE_CHUNK];
    let (mut ws_open, mut tcp_reading) = (true, true);
    let mut live = Liveness::new(e.route.ping_interval);
    live.heard(Side::Backend); // TCP has no pings
    let mut idle_at = Instant::now() + e.idle;
    let mut closing: Option<Instant> = None;
    let mut cause: Option<CloseCause> = None;
    while ws_open {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(msg @ (Message::Binary(_) | Message::Text(_)))) => {
                    live.heard(Side::Client);
                    idle_at = Instant::now() + e.idle;
                    let len = msg.len();
                    if let Err(err) = tw.write_all(&msg.into_data()).await {
                        debug!(flow = flow.id, "bridge write to backend: {err}");
                        cause.get_or_insert(CloseCause::Reset { by: Side::Backend });
                        let _ = ws.send(close(CloseCode::Away, "backend went away")).await;
                        break;
                    }
                    flow.add_message(Side::Client, len as u64);
                }
                Some(Ok(Message::Close(_))) => {
                    // The client is done sending: half-close the TCP stream.
                    // (tungstenite answers the close; nothing can follow it.)
                    live.heard(Side::Client);
                    cause.get_or_insert(CloseCause::Closed { first: Side::Client });
                    let _ = tw.shutdown().await;
                    tcp_reading = false;
                    closing.get_or_insert(Instant::now() + CLOSE_WAIT);
                }
                Some(Ok(_)) => live.heard(Side::Client),
                None => {
                    ws_open = false;
                    cause.get_or_insert(CloseCause::Closed { first: Side::Client });
                }
                Some(Err(err)) => {
                    let (why, owed) = read_error(Side::Client, &err, max);
                    debug!(flow = flow.id, "websocket read: {err}");
                    cause.get_or_insert(why);
                    match owed {
                        Some(m) => {
                            let _ = ws.send(m).await;
                            closing.get_or_insert(Instant::now() + CLOSE_WAIT);
                        }
                        None => ws_open = false,
                    }
                    let _ = tw.shutdown().await;
                    tcp_reading = false;
                }
            },
            n = tr.read(&mut buf), if tcp_reading && closing.is_none() => match n {
                Ok(0) => {
                    // The backend's half-close becomes the close handshake;
                    // the client's messages until its answer still go through.
                    tcp_reading = false;
                    cause.get_or_insert(CloseCause::Closed { first: Side::Backend });
                    let _ = ws.send(close(CloseCode::Normal, "backend closed the connection")).await;
                    closing = Some(Instant::now() + CLOSE_WAIT);
                }
                Ok(n) => {
                    idle_at = Instant::now() + e.idle;
                    if ws.send(Message::Binary(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                        cause.get_or_insert(CloseCause::Reset { by: Side::Client });
                        break;
                    }
                    flow.add_message(Side::Backend, n as u64);
                }
                Err(err) => {
                    debug!(flow = flow.id, "bridge read from backend: {err}");
                    tcp_reading = false;
                    cause.get_or_insert(CloseCause::Reset { by: Side::Backend });
                    let _ = ws.send(close(CloseCode::Away, "backend went away")).await;
                    closing = Some(Instant::now() + CLOSE_WAIT);
                }
            },
            () = sleep_until(live.next), if closing.is_none() => {
                if live.tick().is_some() {
                    info!(flow = flow.id, "client did not answer a ping within ping_interval; closing the flow");
                    cause.get_or_insert(CloseCause::Error("client did not answer a ping within ping_interval".into()));
                    break;
                }
                live.heard(Side::Backend);
                let _ = ws.send(Message::Ping(Bytes::from_static(b"gateway"))).await;
            }
            () = sleep_until(idle_at), if closing.is_none() => {
                cause.get_or_insert(CloseCause::IdleTimeout);
                let _ = ws.send(close(CloseCode::Away, "idle timeout")).await;
                closing = Some(Instant::now() + CLOSE_WAIT);
            }
            () = crate::ws::draining(&mut shutdown), if closing.is_none() => {
                cause.get_or_insert(CloseCause::Shutdown);
                let _ = ws.send(close(CloseCode::Away, "gateway shutting down")).await;
                closing = Some(Instant::now() + CLOSE_WAIT);
            }
            () = sleep_until(closing.unwrap_or_else(far_future)), if closing.is_some() => break,
        }
    }
    cause.unwrap_or(CloseCause::Closed { first: Side::Client })
}
