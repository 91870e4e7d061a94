//! The admin socket: a Unix stream socket, one request line per connection,
//! one JSON document back.
//!
//! Requests: `flows`, `listeners`, `status`.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

use crate::{control::daemon::Daemon, flow::table::FlowSnapshot};

#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerInfo {
    pub name: String,
    /// The address actually bound (a configured port 0 shows the real port).
    pub local: String,
    pub offload: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub kernel_path: bool,
    pub kernel_unavailable: Option<String>,
    pub trim_overlaps: bool,
    /// Bounds on queued bytes (per direction of a flow, and in total); absent
    /// when the kernel path is unbounded or not loaded.
    pub max_queued_per_flow: Option<u64>,
    pub max_queued_total: Option<u64>,
    pub flows: usize,
    /// Address of the Prometheus endpoint, when enabled.
    pub metrics: Option<String>,
    /// Kernel map usage: SOCKHASH entries, index entries, slots in use.
    pub kernel_sockets: usize,
    pub kernel_index_entries: usize,
    pub kernel_slots_in_use: usize,
    /// Slots free here, and slots flows of a previous daemon still hold
    /// (taken here as they end).
    #[serde(default)]
    pub kernel_slots_free: usize,
    #[serde(default)]
    pub kernel_slots_foreign: usize,
    /// The verdict's wake-ups read (a kernel flow started passing bytes to
    /// user space), and passes a flow noticed only at its periodic check.
    #[serde(default)]
    pub kernel_wakeups: u64,
    #[serde(default)]
    pub kernel_late_wakeups: u64,
    /// Reads of the wake-up ring that found it nearly full: records may have
    /// been lost, so every kernel flow re-checked its sockets.
    #[serde(default)]
    pub kernel_wake_overflows: u64,
    /// Threads of the user-space event loop (`workers`).
    #[serde(default)]
    pub workers: usize,
    /// The daemon-wide connection cap (`limits.max_connections`, or what
    /// the open-files limit holds), and the clients holding a place under it.
    #[serde(default)]
    pub max_connections: Option<u64>,
    #[serde(default)]
    pub connections: u64,
    /// Tasks alive in the daemon's runtime (one per flow, and a few of its own).
    #[serde(default)]
    pub tasks: usize,
    /// `kernel.pin_path`, while the maps and the verdict are pinned there.
    #[serde(default)]
    pub pinned_at: Option<String>,
    pub listeners: Vec<ListenerInfo>,
    /// On a node of a fleet: where it stands with the fleet's document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::fleet::node::Standing>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StatsReply {
    pub kernel_path: bool,
    pub listeners: Vec<crate::flow::stats::ListenerReport>,
}

/// Totals of every listener, consistent with its live flows.
pub fn stats(daemon: &Daemon) -> StatsReply {
    let current = daemon.plane.listeners.current();
    let listeners = daemon
        .plane
        .flows
        .with_live(daemon.plane.kernel.as_ref(), |live| current.iter().map(|l| l.report(live)).collect());
    StatsReply { kernel_path: daemon.plane.kernel.is_some(), listeners }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FlowsReply {
    pub flows: Vec<FlowSnapshot>,
}

pub struct AdminServer {
    path: PathBuf,
    /// (device, inode) of the socket file bound: after a hot upgrade the
    /// path is the new process's, and is left alone.
    file: Option<(u64, u64)>,
    /// During a hot upgrade: where the socket goes once the old daemon has
    /// confirmed (see [`AdminServer::publish`]); until then it is bound
    /// beside it and the old daemon keeps answering on the path.
    pending: Option<PathBuf>,
}

impl AdminServer {
    /// Binds the socket; with `group` (a gid), members of that group may use
    /// it too (mode 0660, read-only commands), otherwise only its owner
    /// (0600). The mode comes from the umask at bind, so the socket is never
    /// reachable with wider permissions, and the group is set without
    /// following a symlink. With `take_over` (hot upgrade) the socket is bound
    /// beside a live daemon's, to replace it at [`AdminServer::publish`].
    pub fn bind(path: &Path, group: Option<u32>, take_over: bool) -> std::io::Result<(Self, UnixListener)> {
        use std::os::unix::fs::MetadataExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let (at, pending) = if take_over {
            let mut name = path.file_name().unwrap_or_default().to_os_string();
            name.push(format!(".new-{}", std::process::id()));
            let at = path.with_file_name(name);
            let _ = std::fs::remove_file(&at);
            (at, Some(path.to_path_buf()))
        } else {
            if std::fs::symlink_metadata(path).is_ok() {
                // A live daemon answers; a dead one left a stale file.
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        format!("{} is in use by a running daemon", path.display()),
                    ));
                }
                std::fs::remove_file(path)?;
            }
            (path.to_path_buf(), None)
        };
        let mask = if group.is_some() { 0o117 } else { 0o177 };
        // SAFETY: umask has no preconditions; the previous mask is restored
        // right after the bind.
        let old = unsafe { libc::umask(mask) };
        let bound = UnixListener::bind(&at);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let l = bound?;
        let meta = std::fs::symlink_metadata(&at)?;
        let guard = Self { path: at.clone(), file: Some((meta.dev(), meta.ino())), pending };
        if let Some(gid) = group {
            std::os::unix::fs::lchown(&at, None, Some(gid))?;
        }
        Ok((guard, l))
    }

    /// Hot upgrade, once the old daemon has confirmed: the socket takes the
    /// configured path (an atomic rename over the old daemon's, which then
    /// leaves the path alone).
    pub fn publish(&mut self) -> std::io::Result<()> {
        let Some(to) = self.pending.take() else { return Ok(()) };
        std::fs::rename(&self.path, &to)?;
        self.path = to;
        Ok(())
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let now = std::fs::symlink_metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        if now.is_some() && now == self.file {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn listener_infos(daemon: &Daemon) -> Vec<ListenerInfo> {
    daemon
        .plane
        .listeners
        .current()
        .iter()
        .map(|rt| ListenerInfo {
            name: rt.cfg.name.clone(),
            local: rt.local.to_string(),
            offload: rt.cfg.offload.to_string(),
        })
        .collect()
}

/// Admin (and metrics) connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 32;
/// The whole request (a line, or an HTTP head) must arrive within this.
const REQUEST_WITHIN: Duration = Duration::from_secs(5);
/// The longest request line.
const MAX_REQUEST: usize = 4096;

/// What a connected peer may ask: the daemon's own uid (or root) may change
/// it and take its sockets over; anyone else who can open the socket (the
/// `admin.group`) may only read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Full,
    ReadOnly,
}

fn access_of(conn: &UnixStream) -> Access {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    match conn.peer_cred() {
        Ok(c) if c.uid() == 0 || c.uid() == me => Access::Full,
        _ => Access::ReadOnly,
    }
}

/// The admission of an accept loop: at most [`MAX_CONNECTIONS`] served at
/// once (more are closed unanswered), and a failed accept backs off.
struct Capped {
    what: &'static str,
    slots: Arc<tokio::sync::Semaphore>,
    last_warned: Option<tokio::time::Instant>,
}

impl Capped {
    fn new(what: &'static str) -> Self {
        Capped { what, slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)), last_warned: None }
    }

    /// The next accepted connection with its permit to be served, if any.
    async fn admit<C>(&mut self, accepted: std::io::Result<C>) -> Option<(C, tokio::sync::OwnedSemaphorePermit)> {
        let conn = match accepted {
            Ok(c) => c,
            Err(e) => {
                crate::util::sys::accept_failed(self.what, e, &mut self.last_warned).await;
                return None;
            }
        };
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => Some((conn, permit)),
            Err(_) => {
                debug!("{}: {MAX_CONNECTIONS} connections already open; closing a new one", self.what);
                None
            }
        }
    }
}

pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    let mut capped = Capped::new("admin socket");
    loop {
        let Some((conn, permit)) = capped.admit(listener.accept().await.map(|(c, _)| c)).await else { continue };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(conn, &daemon).await {
                warn!("admin request failed: {e}");
            }
            drop(permit);
        });
    }
}

/// What an admin request line asks for. Parsed once, so the access check
/// and the answer go by the same reading of the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Flows,
    Listeners,
    Stats,
    Status,
    Reload,
    /// The hot upgrade's hand-over (`upgrade::REQUEST`).
    Handover,
    Unknown(String),
}

impl Request {
    pub fn parse(line: &str) -> Self {
        match line.trim() {
            "flows" => Request::Flows,
            "listeners" => Request::Listeners,
            "stats" => Request::Stats,
            "status" => Request::Status,
            "reload" => Request::Reload,
            crate::control::upgrade::REQUEST => Request::Handover,
            other => Request::Unknown(other.to_string()),
        }
    }

    /// Whether it changes the daemon or hands out descriptors and secrets:
    /// for the daemon's own user or root only.
    pub fn changes_state(&self) -> bool {
        matches!(self, Request::Reload | Request::Handover)
    }
}

/// The request line, read byte by byte so nothing past it is consumed (a
/// handover goes on over the same connection); `Err` says what was wrong.
async fn read_request(conn: &mut UnixStream) -> Result<String, String> {
    let mut line = Vec::new();
    let read = async {
        loop {
            match conn.read_u8().await {
                Ok(b'\n') => return Ok(()),
                Ok(_) if line.len() >= MAX_REQUEST => return Err(format!("request longer than {MAX_REQUEST} bytes")),
                Ok(b) => line.push(b),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    match tokio::time::timeout(REQUEST_WITHIN, read).await {
        Ok(Ok(())) => Ok(String::from_utf8_lossy(&line).into_owned()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no complete request line within {REQUEST_WITHIN:?}")),
    }
}

async fn answer(conn: UnixStream, daemon: &Arc<Daemon>) -> std::io::Result<()> {
    let listeners = &listener_infos(daemon);
    let mut conn = conn;
    let access = access_of(&conn);
    let line = match read_request(&mut conn).await {
        Ok(l) => l,
        Err(why) => {
            debug!("admin request dropped: {why}");
            let _ = conn.write_all(serde_json::json!({ "error": why }).to_string().as_bytes()).await;
            return Ok(());
        }
    };
    let request = Request::parse(&line);
    if request.changes_state() && access != Access::Full {
        let why = format!(
            "{:?} is for the daemon's own user (uid {}) or root; members of admin.group may use flows, stats, listeners and status",
            line.trim(),
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() }
        );
        let uid = conn.peer_cred().map(|c| c.uid()).ok();
        warn!(peer_uid = ?uid, "admin: refused {:?} to a read-only peer", line.trim());
        let reply = serde_json::json!({ "ok": false, "error": why, "message": why });
        conn.write_all(format!("{reply}\n").as_bytes()).await?;
        return conn.shutdown().await;
    }
    if request == Request::Handover {
        return crate::control::upgrade::give(conn, daemon).await;
    }
    let (_, mut w) = conn.into_split();
    let body = match request {
        Request::Flows => serde_json::to_vec(&FlowsReply { flows: daemon.plane.flows.snapshot(daemon.plane.kernel.as_ref()) }),
        Request::Listeners => serde_json::to_vec(listeners),
        Request::Stats => serde_json::to_vec(&stats(daemon)),
        Request::Reload => {
            let r = crate::control::reload::reload(daemon, &daemon.config_path, &daemon.global).await;
            if let Err(e) = &r {
                warn!("{e}");
            }
            serde_json::to_vec(&match r {
                Ok(summary) => serde_json::json!({ "ok": true, "message": summary }),
                Err(e) => serde_json::json!({ "ok": false, "message": e }),
            })
        }
        Request::Status => {
            let (s, i, u) = daemon.plane.kernel.as_ref().map_or((0, 0, 0), |k| k.usage());
            let (slots_free, slots_foreign) = daemon.plane.kernel.as_ref().map_or((0, 0), |k| k.slots_free());
            let (woken, late, overflows) = daemon.plane.kernel.as_ref().map_or((0, 0, 0), |k| k.wakeups());
            serde_json::to_vec(&Status {
                pid: std::process::id(),
                kernel_path: daemon.plane.kernel.is_some(),
                kernel_unavailable: daemon.plane.kernel_unavailable.as_ref().map(ToString::to_string),
                trim_overlaps: daemon.plane.kernel.as_ref().is_some_and(|k| k.trim),
                max_queued_per_flow: daemon.plane.kernel.as_ref().and_then(|k| k.flow_control).map(|f| f.per_flow),
                max_queued_total: daemon.plane.kernel.as_ref().and_then(|k| k.flow_control).map(|f| f.total),
                flows: daemon.plane.flows.len(),
                metrics: daemon.metrics.map(|a| a.to_string()),
                kernel_sockets: s,
                kernel_index_entries: i,
                kernel_slots_in_use: u,
                kernel_slots_free: slots_free,
                kernel_slots_foreign: slots_foreign,
                kernel_wakeups: woken,
                kernel_late_wakeups: late,
                kernel_wake_overflows: overflows,
                workers: tokio::runtime::Handle::current().metrics().num_workers(),
                max_connections: daemon.global.max,
                connections: daemon.global.active.load(std::sync::atomic::Ordering::Relaxed),
                tasks: tokio::runtime::Handle::current().metrics().num_alive_tasks(),
                pinned_at: daemon.plane.kernel.as_ref().and_then(|k| k.pinned_at()).map(|p| p.display().to_string()),
                listeners: listeners
                    .iter()
                    .map(|l| ListenerInfo { name: l.name.clone(), local: l.local.clone(), offload: l.offload.clone() })
                    .collect(),
                fleet: daemon.fleet.as_ref().map(|n| n.standing()),
            })
        }
        Request::Handover => unreachable!("answered above"),
        Request::Unknown(other) => serde_json::to_vec(
            &serde_json::json!({ "error": format!("unknown request {other:?}; try flows, stats, listeners, status or reload") }),
        ),
    }
    .map_err(std::io::Error::other)?;
    w.write_all(&body).await?;
    w.shutdown().await
}

/// The Prometheus endpoint: `GET /metrics` on hyper's HTTP/1.1 server, one
/// request per connection, its head within `REQUEST_WITHIN` and at most
/// 16 KiB (hyper answers 431 past that), the answer within the same again.
pub async fn serve_metrics(listener: tokio::net::TcpListener, daemon: Arc<Daemon>) {
    use http_body_util::Full;
    use hyper::{body::Bytes, Method, Response, StatusCode};
    use hyper_util::rt::{TokioIo, TokioTimer};

    let mut capped = Capped::new("metrics endpoint");
    loop {
        let Some((conn, permit)) = capped.admit(listener.accept().await.map(|(c, _)| c)).await else { continue };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let answer = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (status, body) = match (req.method(), req.uri().path()) {
                    (&Method::GET, "/metrics") => {
                        let s = stats(&daemon);
                        (StatusCode::OK, crate::flow::stats::prometheus(&s.listeners, s.kernel_path))
                    }
                    (&Method::GET, _) => (StatusCode::NOT_FOUND, "try /metrics\n".to_string()),
                    _ => (StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n".to_string()),
                };
                let resp = Response::builder()
                    .status(status)
                    .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                    .body(Full::new(Bytes::from(body)));
                async move { resp }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(REQUEST_WITHIN)
                .max_buf_size(16 * 1024)
                .keep_alive(false)
                .serve_connection(TokioIo::new(conn), answer);
            match tokio::time::timeout(2 * REQUEST_WITHIN, served).await {
                Ok(Err(e)) => debug!("metrics request: {e}"),
                Err(_) => debug!("metrics request: not answered within {:?}", 2 * REQUEST_WITHIN),
                Ok(Ok(())) => {}
            }
        });
    }
}

/// Client side, used by the CLI.
pub fn request(socket: &Path, what: &str) -> Result<Vec<u8>, String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the daemon at {}: {e}\n  is `gateway run` running? pass --socket PATH or --config FILE to point at its admin socket",
            socket.display()
        )
    })?;
    s.write_all(format!("{what}\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| e.to_string())?;
    // A refusal or a bad request: the daemon's own words.
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out) {
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            return Err(format!("the daemon refused {what:?}: {e}"));
        }
    }
    Ok(out)
}
