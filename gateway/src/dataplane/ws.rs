//! The modes in which the gateway terminates WebSockets (tokio-tungstenite),
//! after `edge::http` has done the upgrade. These flows stay in user space.
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
//!
//! A hot upgrade moves these flows too. tungstenite keeps what it has read in
//! a buffer of its own, so each WebSocket reads through a [`Gate`], which
//! hands it one frame at a time and keeps the bytes after that frame itself.
//! Between two whole messages, tungstenite then holds nothing: the sockets,
//! the gates' bytes, a wss client's TLS session (`tls::session`) and the
//! route's limits are all the flow is, and another process can go on with it.
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
    config::{Route, WsMode},
    flow::table::{CloseCause, Flow, Side, Stopped},
};

use crate::{
    tls::session::Conn,
    util::gate::{Framing, Gate},
};

type Ws = WebSocketStream<Gate<Frames>>;

/// What a terminated WebSocket flow keeps of its route: a flow goes on with
/// the settings it started with, through reloads and upgrades.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    pub bridge: bool,
    pub max_message_size: usize,
    pub ping_interval: Option<Duration>,
    /// inspect: the client's messages per second, and bytes per second
    /// (absent in the messages of daemons before them).
    #[serde(default)]
    pub message_rate: Option<crate::policy::limits::Rate>,
    #[serde(default)]
    pub byte_rate: Option<crate::policy::limits::Rate>,
}

impl Limits {
    pub fn of(route: &Route) -> Self {
        Limits {
            bridge: route.mode == WsMode::BridgeTcp,
            max_message_size: route.max_message_size,
            ping_interval: route.ping_interval,
            message_rate: route.message_rate,
            byte_rate: route.byte_rate,
        }
    }
}

/// How long a close handshake may take once started.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// Bytes read from a bridge_tcp backend per message, at most.
const BRIDGE_CHUNK: usize = 64 << 10;

/// Both sides of an upgraded flow, with the bytes read past the heads.
pub struct Ends<'a> {
    pub client: Conn,
    pub client_early: Bytes,
    pub backend: TcpStream,
    pub backend_early: Bytes,
    pub flow: &'a Flow,
    pub limits: Limits,
    pub idle: Duration,
    pub shutdown: watch::Receiver<bool>,
}

/// How a terminated WebSocket flow ended here. Detached: stopped between
/// whole messages for a hot upgrade; the sockets and the bytes read past the
/// last message, nothing else.
pub type Ended = crate::flow::table::Stopped<AtRest>;

/// A terminated WebSocket flow between messages, as [`Ends`] takes it again.
pub struct AtRest {
    /// The client's socket and, over wss, its TLS session.
    pub client: crate::tls::session::Parked,
    pub client_early: Vec<u8>,
    pub backend: std::net::TcpStream,
    pub backend_early: Vec<u8>,
}

/// Runs the flow in its mode until it closes or, once `detach` turns true,
/// until it is between whole messages on both sides.
pub async fn run(e: Ends<'_>, detach: Option<watch::Receiver<bool>>) -> Ended {
    if e.limits.bridge {
        bridge(e, detach).await
    } else {
        inspect(e, detach).await
    }
}

/// Where the bytes handed to tungstenite stand in the frame sequence
/// (RFC 6455 section 5.2): in a header (`have` of `need` bytes), or in a
/// payload (`left` bytes to go).
#[derive(Default)]
pub struct Frames {
    head: [u8; 14],
    have: usize,
    need: usize,
    left: u64,
    /// The current frame carries data (text, binary, continuation).
    data: bool,
    fin: bool,
    /// A message's first frames have passed and its final one has not.
    fragmented: bool,
}

impl Framing for Frames {
    /// Between whole messages: whole frames only, and the last data frame
    /// ended its message.
    fn resting(&self) -> bool {
        self.at_boundary() && !self.fragmented
    }

    fn allowed(&self, ahead: &[u8]) -> u64 {
        if self.at_boundary() {
            if let Some((head, payload)) = Self::frame_len(ahead) {
                return (head as u64).saturating_add(payload);
            }
        }
        self.step()
    }

    fn pass(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = bytes.len().min(usize::try_from(self.step()).unwrap_or(usize::MAX));
            self.pass_step(&bytes[..n]);
            bytes = &bytes[n..];
        }
    }
}

impl Frames {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }

    /// Header and payload length of a frame whose header `bytes` start with.
    fn frame_len(bytes: &[u8]) -> Option<(usize, u64)> {
        let b1 = *bytes.get(1)?;
        let ext = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let head = 2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 };
        if bytes.len() < head {
            return None;
        }
        let len = match b1 & 0x7f {
            126 => u64::from(u16::from_be_bytes([bytes[2], bytes[3]])),
            127 => u64::from_be_bytes(bytes[2..10].try_into().expect("eight bytes")),
            n => u64::from(n),
        };
        Some((head, len))
    }

    /// The bytes up to the end of the header or payload under way.
    fn step(&self) -> u64 {
        if self.left > 0 {
            self.left
        } else if self.have < 2 {
            (2 - self.have) as u64
        } else {
            (self.need - self.have) as u64
        }
    }

    /// Takes note of bytes within one [`Frames::step`].
    fn pass_step(&mut self, bytes: &[u8]) {
        if self.left > 0 {
            self.left -= bytes.len() as u64;
            if self.left == 0 {
                self.frame_done();
            }
            return;
        }
        self.head[self.have..self.have + bytes.len()].copy_from_slice(bytes);
        self.have += bytes.len();
        if self.have == 2 {
            let ext = match self.head[1] & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
            self.need = 2 + ext + mask;
        }
        if self.have >= 2 && self.have == self.need {
            let (_, len) = Self::frame_len(&self.head[..self.have]).expect("a whole header");
            self.fin = self.head[0] & 0x80 != 0;
            self.data = self.head[0] & 0x0f < 8;
            self.have = 0;
            self.left = len;
            if len == 0 {
                self.frame_done();
            }
        }
    }

    fn frame_done(&mut self) {
        if self.data {
            self.fragmented = !self.fin;
        }
    }
}

/// The socket (and TLS session) under a gate's stream, with the gate's bytes.
fn park(ws: Ws) -> Result<(crate::tls::session::Parked, Vec<u8>), CloseCause> {
    let (io, left) = ws.into_inner().into_parts();
    let lost = |why: String| CloseCause::Error(format!("could not hand the WebSocket over: {why}"));
    let io = match io.into_any().downcast::<Conn>() {
        Ok(conn) => return conn.park().map(|p| (p, left)).map_err(|e| lost(e.to_string())),
        Err(io) => io,
    };
    match io.downcast::<TcpStream>() {
        Ok(s) => {
            Ok((crate::tls::session::Parked { tcp: s.into_std().map_err(|e| lost(e.to_string()))?, tls: None }, left))
        }
        Err(_) => Err(lost("an unknown stream".into())),
    }
}

/// Whether the client's stream under a WebSocket holds nothing (a TLS
/// session: no plaintext waiting, nothing to send).
fn client_quiet(ws: &mut Ws) -> bool {
    ws.get_mut().inner_mut().as_any_mut().downcast_mut::<Conn>().is_some_and(Conn::quiet)
}

/// Resolves once the daemon's drain has started.
pub async fn draining(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Why a write to a peer gave up.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stall {
    /// The write failed: the peer is gone.
    Failed,
    /// It did not complete in time: the peer stopped reading.
    TimedOut,
    /// The drain began while it waited.
    Draining,
}

/// A write to a peer, run until it completes, `until` passes or (given the
/// daemon's shutdown receiver) the drain begins: a peer that stops reading
/// holds a flow no longer than its deadlines.
async fn bounded<T, E>(
    write: impl std::future::Future<Output = Result<T, E>>,
    until: Instant,
    drain: Option<&mut watch::Receiver<bool>>,
) -> Result<T, Stall> {
    let drain = async {
        match drain {
            Some(rx) => draining(rx).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        r = write => r.map_err(|_| Stall::Failed),
        () = sleep_until(until) => Err(Stall::TimedOut),
        () = drain => Err(Stall::Draining),
    }
}

/// What a stalled write to `side` ends its flow with.
fn stalled(side: Side, stall: Stall) -> CloseCause {
    match stall {
        Stall::Failed => CloseCause::Reset { by: side },
        Stall::TimedOut => CloseCause::IdleTimeout,
        Stall::Draining => CloseCause::Shutdown,
    }
}

/// tungstenite's read buffer here. Its default (128 KiB, and as much again
/// for writes) is kept per WebSocket for the flow's life; the `Gate` in
/// front hands it one frame at a time anyway. With the defaults a churn of
/// inspect flows left the daemon holding 110 MiB (`tests/tests/soak.rs`).
const WS_READ_BUFFER: usize = 16 * 1024;

fn ws_config(limits: &Limits) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(limits.max_message_size))
        .max_frame_size(Some(limits.max_message_size))
        .read_buffer_size(WS_READ_BUFFER)
        // Every send is flushed at once: nothing gains from a write buffer.
        .write_buffer_size(0)
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
async fn inspect(e: Ends<'_>, mut detach: Option<watch::Receiver<bool>>) -> Ended {
    let cfg = ws_config(&e.limits);
    let c = Ws::from_raw_socket(Gate::new(Box::new(e.client), &e.client_early), Role::Server, Some(cfg)).await;
    let b = Ws::from_raw_socket(Gate::new(Box::new(e.backend), &e.backend_early), Role::Client, Some(cfg)).await;
    let mut ws = [c, b];
    let (flow, max) = (e.flow, e.limits.max_message_size);
    let mut shutdown = e.shutdown;
    let mut open = [true, true];
    let mut detach_asked = false;
    let mut live = Liveness::new(e.limits.ping_interval);
    // The route's message_rate and byte_rate, for the client's messages.
    let (mut msg_bucket, mut byte_bucket) = (None, None);
    let mut idle_at = Instant::now() + e.idle;
    let mut closing: Option<Instant> = None;
    let mut cause: Option<CloseCause> = None;
    // Starts a close on both sides (unless already closing).
    macro_rules! close_both {
        ($why:expr, $to_client:expr, $to_backend:expr) => {
            if closing.is_none() {
                cause.get_or_insert($why);
                let until = Instant::now() + CLOSE_WAIT;
                closing = Some(until);
                for (i, m) in [$to_client, $to_backend].into_iter().enumerate() {
                    if let (true, Some(m)) = (open[i], m) {
                        if bounded(ws[i].send(m), until, None).await.is_err() {
                            open[i] = false;
                        }
                    }
                }
            }
        };
    }
    while open[0] || open[1] {
        if detach_asked && closing.is_none() && open == [true, true] && ws.iter().all(|w| w.get_ref().resting()) {
            // A pong tungstenite owes goes out before the sockets leave.
            let mut flushed = true;
            for w in &mut ws {
                flushed &= bounded(w.flush(), Instant::now() + CLOSE_WAIT, Some(&mut shutdown)).await.is_ok();
            }
            if flushed && client_quiet(&mut ws[0]) {
                let [c, b] = ws;
                return match (park(c), park(b)) {
                    (Ok((client, client_early)), Ok((backend, backend_early))) if backend.tls.is_none() => {
                        Stopped::Detached(AtRest { client, client_early, backend: backend.tcp, backend_early })
                    }
                    (Err(why), _) | (_, Err(why)) => Stopped::Closed(why),
                    _ => Stopped::Closed(CloseCause::Error("a WebSocket backend over TLS".into())),
                };
            }
        }
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
                        // A side that cannot take a ping within the interval
                        // is as silent as one that does not answer it.
                        let until = live.next;
                        for i in 0..2 {
                            if !open[i] {
                                continue;
                            }
                            let ping = Message::Ping(Bytes::from_static(b"gateway"));
                            if let Err(stall) = bounded(ws[i].send(ping), until, Some(&mut shutdown)).await {
                                let side = if i == 0 { Side::Client } else { Side::Backend };
                                info!(flow = flow.id, "{side} stopped reading ({stall:?}); closing the flow");
                                open[i] = false;
                                let m = || Some(close(CloseCode::Away, "peer stopped reading"));
                                let (tc, tb) = if i == 0 { (None, m()) } else { (m(), None) };
                                close_both!(stalled(side, stall), tc, tb);
                                break;
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
            cause = flow.ending.reached(), if closing.is_none() => {
                let why = if cause == CloseCause::MaxDuration { "max duration reached" } else { "route changed" };
                let m = || Some(close(CloseCode::Away, why));
                close_both!(cause, m(), m());
                continue;
            }
            () = crate::dataplane::ws::draining(&mut shutdown), if closing.is_none() => {
                let m = || Some(close(CloseCode::Away, "gateway shutting down"));
                close_both!(CloseCause::Shutdown, m(), m());
                continue;
            }
            () = sleep_until(closing.unwrap_or_else(far_future)), if closing.is_some() => break,
            () = crate::dataplane::splice::asked_to_detach(&mut detach), if !detach_asked => {
                detach_asked = true;
                continue;
            }
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
                if side == Side::Client {
                    let now = std::time::Instant::now();
                    let over = [
                        (e.limits.message_rate, &mut msg_bucket, 1.0, "message_rate"),
                        (e.limits.byte_rate, &mut byte_bucket, len as f64, "byte_rate"),
                    ]
                    .into_iter()
                    .find_map(|(rate, bucket, n, what)| {
                        let rate = rate?;
                        let b = bucket.get_or_insert_with(|| crate::policy::limits::Bucket::new(rate));
                        (!b.take_n(rate, n, now)).then_some(what)
                    });
                    if let Some(what) = over {
                        info!(flow = flow.id, "the client went over the route's {what}; closing with 1008");
                        close_both!(
                            CloseCause::Rejected(format!("client over the route's {what}")),
                            Some(close(CloseCode::Policy, "rate limit")),
                            Some(close(CloseCode::Away, "client went away"))
                        );
                        continue;
                    }
                }
                // The message must be taken within idle_timeout, and the drain
                // does not wait for a peer that stopped reading.
                if let Err(stall) = bounded(ws[y].send(msg), Instant::now() + e.idle, Some(&mut shutdown)).await {
                    if stall != Stall::Failed {
                        info!(flow = flow.id, "{} stopped reading ({stall:?}); closing the flow", other(side));
                    }
                    open[y] = false;
                    let m = Some(close(CloseCode::Away, "peer went away"));
                    let (tc, tb) = if side == Side::Client { (m, None) } else { (None, m) };
                    close_both!(stalled(other(side), stall), tc, tb);
                    continue;
                }
                flow.add_message(side, len);
            }
            Some(Ok(Message::Close(frame))) => {
                // Forward the close as sent; tungstenite answers this side.
                if closing.is_none() {
                    cause = Some(CloseCause::Closed { first: side });
                    let until = Instant::now() + CLOSE_WAIT;
                    closing = Some(until);
                    if open[y] && bounded(ws[y].send(Message::Close(frame)), until, None).await.is_err() {
                        open[y] = false;
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
                        if bounded(ws[x].send(m), Instant::now() + CLOSE_WAIT, None).await.is_err() {
                            open[x] = false;
                        }
                    }
                    None => open[x] = false,
                }
                let m = Some(close(CloseCode::Away, "peer went away"));
                let (tc, tb) = if side == Side::Client { (None, m) } else { (m, None) };
                close_both!(why, tc, tb);
            }
        }
    }
    Stopped::Closed(cause.unwrap_or(CloseCause::Closed { first: Side::Client }))
}

/// Bridges the client's WebSocket to a raw TCP backend.
async fn bridge(e: Ends<'_>, mut detach: Option<watch::Receiver<bool>>) -> Ended {
    let cfg = ws_config(&e.limits);
    let mut ws = Ws::from_raw_socket(Gate::new(Box::new(e.client), &e.client_early), Role::Server, Some(cfg)).await;
    let mut tcp = e.backend;
    // Bytes read from the backend before the upgrade's 101 came back.
    if !e.backend_early.is_empty() {
        let n = e.backend_early.len();
        if let Err(stall) = bounded(ws.send(Message::Binary(e.backend_early)), Instant::now() + e.idle, None).await {
            return Stopped::Closed(stalled(Side::Client, stall));
        }
        e.flow.add_message(Side::Backend, n as u64);
    }
    let (flow, max) = (e.flow, e.limits.max_message_size);
    let mut shutdown = e.shutdown;
    let mut buf = vec![0u8; BRIDGE_CHUNK];
    let (mut ws_open, mut tcp_reading) = (true, true);
    let mut detach_asked = false;
    let mut live = Liveness::new(e.limits.ping_interval);
    live.heard(Side::Backend); // TCP has no pings
    let mut idle_at = Instant::now() + e.idle;
    let mut closing: Option<Instant> = None;
    let mut cause: Option<CloseCause> = None;
    let (mut tr, mut tw) = tcp.split();
    // Writes that end the flow anyway (closes, the half-close): bounded by
    // the close's own wait.
    let soon = || Instant::now() + CLOSE_WAIT;
    while ws_open {
        if detach_asked && closing.is_none() && tcp_reading && ws.get_ref().resting() {
            // Nothing is held for the backend: each message is written before
            // the next is read. A pong tungstenite owes goes out first.
            let flushed = bounded(ws.flush(), Instant::now() + CLOSE_WAIT, Some(&mut shutdown)).await.is_ok();
            if flushed && client_quiet(&mut ws) {
                break;
            }
        }
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(msg @ (Message::Binary(_) | Message::Text(_)))) => {
                    live.heard(Side::Client);
                    idle_at = Instant::now() + e.idle;
                    let len = msg.len();
                    let data = msg.into_data();
                    if let Err(stall) = bounded(tw.write_all(&data), Instant::now() + e.idle, Some(&mut shutdown)).await {
                        debug!(flow = flow.id, "bridge write to backend: {stall:?}");
                        cause.get_or_insert(stalled(Side::Backend, stall));
                        let _ = bounded(ws.send(close(CloseCode::Away, "backend went away")), soon(), None).await;
                        break;
                    }
                    flow.add_message(Side::Client, len as u64);
                }
                Some(Ok(Message::Close(_))) => {
                    // The client is done sending: half-close the TCP stream.
                    // (tungstenite answers the close; nothing can follow it.)
                    live.heard(Side::Client);
                    cause.get_or_insert(CloseCause::Closed { first: Side::Client });
                    let _ = bounded(tw.shutdown(), soon(), None).await;
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
                            let _ = bounded(ws.send(m), soon(), None).await;
                            closing.get_or_insert(Instant::now() + CLOSE_WAIT);
                        }
                        None => ws_open = false,
                    }
                    let _ = bounded(tw.shutdown(), soon(), None).await;
                    tcp_reading = false;
                }
            },
            n = tr.read(&mut buf), if tcp_reading && closing.is_none() => match n {
                Ok(0) => {
                    // The backend's half-close becomes the close handshake;
                    // the client's messages until its answer still go through.
                    tcp_reading = false;
                    cause.get_or_insert(CloseCause::Closed { first: Side::Backend });
                    let _ = bounded(ws.send(close(CloseCode::Normal, "backend closed the connection")), soon(), None).await;
                    closing = Some(Instant::now() + CLOSE_WAIT);
                }
                Ok(n) => {
                    idle_at = Instant::now() + e.idle;
                    let m = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
                    if let Err(stall) = bounded(ws.send(m), Instant::now() + e.idle, Some(&mut shutdown)).await {
                        if stall != Stall::Failed {
                            info!(flow = flow.id, "client stopped reading ({stall:?}); closing the flow");
                        }
                        cause.get_or_insert(stalled(Side::Client, stall));
                        break;
                    }
                    flow.add_message(Side::Backend, n as u64);
                }
                Err(err) => {
                    debug!(flow = flow.id, "bridge read from backend: {err}");
                    tcp_reading = false;
                    cause.get_or_insert(CloseCause::Reset { by: Side::Backend });
                    let _ = bounded(ws.send(close(CloseCode::Away, "backend went away")), soon(), None).await;
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
                let ping = Message::Ping(Bytes::from_static(b"gateway"));
                if let Err(stall) = bounded(ws.send(ping), live.next, Some(&mut shutdown)).await {
                    info!(flow = flow.id, "client stopped reading ({stall:?}); closing the flow");
                    cause.get_or_insert(stalled(Side::Client, stall));
                    break;
                }
            }
            () = sleep_until(idle_at), if closing.is_none() => {
                cause.get_or_insert(CloseCause::IdleTimeout);
                let _ = bounded(ws.send(close(CloseCode::Away, "idle timeout")), soon(), None).await;
                closing = Some(Instant::now() + CLOSE_WAIT);
            }
            end = flow.ending.reached(), if closing.is_none() => {
                let why = if end == CloseCause::MaxDuration { "max duration reached" } else { "route changed" };
                cause.get_or_insert(end);
                let _ = bounded(ws.send(close(CloseCode::Away, why)), soon(), None).await;
                closing = Some(Instant::now() + CLOSE_WAIT);
            }
            () = crate::dataplane::ws::draining(&mut shutdown), if closing.is_none() => {
                cause.get_or_insert(CloseCause::Shutdown);
                let _ = bounded(ws.send(close(CloseCode::Away, "gateway shutting down")), soon(), None).await;
                closing = Some(Instant::now() + CLOSE_WAIT);
            }
            () = sleep_until(closing.unwrap_or_else(far_future)), if closing.is_some() => break,
            () = crate::dataplane::splice::asked_to_detach(&mut detach), if !detach_asked => detach_asked = true,
        }
    }
    let parked = ws_open && detach_asked && closing.is_none() && tcp_reading && cause.is_none();
    if !parked {
        return Stopped::Closed(cause.unwrap_or(CloseCause::Closed { first: Side::Client }));
    }
    match (park(ws), tcp.into_std()) {
        (Ok((client, client_early)), Ok(backend)) => {
            Stopped::Detached(AtRest { client, client_early, backend, backend_early: Vec::new() })
        }
        (Err(why), _) => Stopped::Closed(why),
        (_, Err(e)) => Stopped::Closed(CloseCause::Error(format!("could not hand the WebSocket over: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::Frames;
    use crate::util::gate::Framing;

    /// A frame's bytes: FIN, opcode, mask bit (key 0), length encoding.
    fn frame(fin: bool, opcode: u8, masked: bool, len: usize) -> Vec<u8> {
        let mut f = vec![(u8::from(fin) << 7) | opcode];
        let m = if masked { 0x80 } else { 0 };
        match len {
            0..=125 => f.push(m | len as u8),
            126..=65535 => {
                f.push(m | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(m | 127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(0x5a, len));
        f
    }

    /// Passes `bytes` in pieces of at most `piece`, as the gate would.
    fn pass_all(fr: &mut Frames, bytes: &[u8], piece: usize) {
        let mut at = 0;
        while at < bytes.len() {
            let ahead = &bytes[at..(at + piece).min(bytes.len())];
            let n = ahead.len().min(fr.allowed(ahead) as usize);
            fr.pass(&bytes[at..at + n]);
            at += n;
        }
    }

    #[test]
    fn frames_end_where_their_headers_say() {
        for piece in [1, 3, 7, 4096] {
            for (len, masked) in [(0, false), (5, true), (125, true), (126, false), (70_000, true)] {
                let mut fr = Frames::default();
                let f = frame(true, 2, masked, len);
                // Never more than the rest of the frame.
                pass_all(&mut fr, &f[..f.len() - 1], piece);
                assert!(!fr.at_boundary() && fr.allowed(&[]) == 1, "len {len} piece {piece}");
                fr.pass(&f[f.len() - 1..]);
                assert!(fr.at_boundary() && !fr.fragmented, "len {len} piece {piece}");
            }
        }
    }

    #[test]
    fn a_whole_frame_ahead_is_handed_on_at_once_and_no_further() {
        let mut fr = Frames::default();
        let (first, second) = (frame(true, 2, true, 300), frame(true, 1, true, 5));
        let mut ahead = first.clone();
        ahead.extend_from_slice(&second);
        assert_eq!(fr.allowed(&ahead), first.len() as u64);
        fr.pass(&first);
        assert!(fr.resting());
        // Only part of a header ahead: no more than that part of the frame.
        assert_eq!(fr.allowed(&second[..1]), 2);
    }

    #[test]
    fn a_fragmented_message_is_not_between_messages_until_its_last_frame() {
        let mut fr = Frames::default();
        pass_all(&mut fr, &frame(false, 1, true, 10), 4096);
        assert!(fr.at_boundary() && fr.fragmented);
        // A ping in the middle does not end the message.
        pass_all(&mut fr, &frame(true, 9, true, 4), 4096);
        assert!(fr.fragmented);
        pass_all(&mut fr, &frame(false, 0, true, 300), 4096);
        assert!(fr.fragmented);
        pass_all(&mut fr, &frame(true, 0, true, 0), 4096);
        assert!(fr.at_boundary() && !fr.fragmented);
    }
}
