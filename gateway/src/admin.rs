//! The admin socket: a Unix stream socket, one request line per connection,
//! one JSON document back.
//!
//! Requests: `flows`, `listeners`, `status`.
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::warn;

use crate::{flows::FlowSnapshot, proxy::Daemon};

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
    /// `kernel.pin_path`, while the maps and the verdict are pinned there.
    #[serde(default)]
    pub pinned_at: Option<String>,
    pub listeners: Vec<ListenerInfo>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StatsReply {
    pub kernel_path: bool,
    pub listeners: Vec<crate::stats::ListenerReport>,
}

/// Totals of every listener, consistent with its live flows.
pub fn stats(daemon: &Daemon) -> StatsReply {
    let current = daemon.listeners.current();
    let listeners =
        daemon.flows.with_live(daemon.kernel.as_ref(), |live| current.iter().map(|l| l.report(live)).collect());
    StatsReply { kernel_path: daemon.kernel.is_some(), listeners }
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
}

impl AdminServer {
    /// Binds the socket, replacing a stale one, readable by root only.
    /// Binds the socket; with `group` (a gid), members of that group may use
    /// it too (mode 0660), otherwise only its owner (0600).
    /// With `take_over` (hot upgrade) a live daemon's socket file is replaced.
    pub fn bind(path: &Path, group: Option<u32>, take_over: bool) -> std::io::Result<(Self, UnixListener)> {
        use std::os::unix::fs::MetadataExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if take_over && path.exists() {
            std::fs::remove_file(path)?;
        }
        if path.exists() {
            // A live daemon answers; a dead one left a stale file.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running daemon", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let l = UnixListener::bind(path)?;
        let file = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        let guard = Self { path: path.to_path_buf(), file };
        match group {
            Some(gid) => {
                std::os::unix::fs::chown(path, None, Some(gid))?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
            }
            None => std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?,
        }
        Ok((guard, l))
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let now = std::fs::metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        if now.is_some() && now == self.file {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn listener_infos(daemon: &Daemon) -> Vec<ListenerInfo> {
    daemon
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

pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(conn, &daemon).await {
                warn!("admin request failed: {e}");
            }
        });
    }
}

async fn answer(conn: UnixStream, daemon: &Arc<Daemon>) -> std::io::Result<()> {
    let listeners = &listener_infos(daemon);
    // One request line, read byte by byte so nothing past it is consumed
    // (a handover goes on over the same connection).
    let mut line = Vec::new();
    let mut conn = conn;
    while line.len() < 4096 {
        match conn.read_u8().await {
            Ok(b'\n') => break,
            Ok(b) => line.push(b),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    if line.trim() == crate::upgrade::REQUEST {
        return crate::upgrade::give(conn, daemon).await;
    }
    let (_, mut w) = conn.into_split();
    let body = match line.trim() {
        "flows" => serde_json::to_vec(&FlowsReply { flows: daemon.flows.snapshot(daemon.kernel.as_ref()) }),
        "listeners" => serde_json::to_vec(listeners),
        "stats" => serde_json::to_vec(&stats(daemon)),
        "reload" => {
            let r = crate::reload::reload(daemon, &daemon.config_path, &daemon.global).await;
            if let Err(e) = &r {
                warn!("{e}");
            }
            serde_json::to_vec(&match r {
                Ok(summary) => serde_json::json!({ "ok": true, "message": summary }),
                Err(e) => serde_json::json!({ "ok": false, "message": e }),
            })
        }
        "status" => {
            let (s, i, u) = daemon.kernel.as_ref().map_or((0, 0, 0), |k| k.usage());
            let (woken, late, overflows) = daemon.kernel.as_ref().map_or((0, 0, 0), |k| k.wakeups());
            serde_json::to_vec(&Status {
                pid: std::process::id(),
                kernel_path: daemon.kernel.is_some(),
                kernel_unavailable: daemon.kernel_unavailable.as_ref().map(ToString::to_string),
                trim_overlaps: daemon.kernel.as_ref().is_some_and(|k| k.trim),
                max_queued_per_flow: daemon.kernel.as_ref().and_then(|k| k.flow_control).map(|f| f.per_flow),
                max_queued_total: daemon.kernel.as_ref().and_then(|k| k.flow_control).map(|f| f.total),
                flows: daemon.flows.len(),
                metrics: daemon.metrics.map(|a| a.to_string()),
                kernel_sockets: s,
                kernel_index_entries: i,
                kernel_slots_in_use: u,
                kernel_wakeups: woken,
                kernel_late_wakeups: late,
                kernel_wake_overflows: overflows,
                workers: tokio::runtime::Handle::current().metrics().num_workers(),
                pinned_at: daemon.kernel.as_ref().and_then(|k| k.pinned_at()).map(|p| p.display().to_string()),
                listeners: listeners
                    .iter()
                    .map(|l| ListenerInfo { name: l.name.clone(), local: l.local.clone(), offload: l.offload.clone() })
                    .collect(),
            })
        }
        other => Ok(serde_json::to_vec(
            &serde_json::json!({ "error": format!("unknown request {other:?}; try flows, stats, listeners, status or reload") }),
        )
        .unwrap()),
    }
    .map_err(std::io::Error::other)?;
    w.write_all(&body).await?;
    w.shutdown().await
}

/// A minimal HTTP/1.1 endpoint for Prometheus: `GET /metrics`, one request
/// per connection.
pub async fn serve_metrics(listener: tokio::net::TcpListener, daemon: Arc<Daemon>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else { continue };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let (r, mut w) = conn.into_split();
            let mut head = Vec::new();
            let mut r = BufReader::new(r.take(16 * 1024));
            // Request line, then headers until the empty line.
            loop {
                let mut line = Vec::new();
                match tokio::time::timeout(std::time::Duration::from_secs(10), r.read_until(b'\n', &mut line)).await {
                    Ok(Ok(n)) if n > 0 => {
                        let end = line == b"\r\n" || line == b"\n";
                        head.extend_from_slice(&line);
                        if end {
                            break;
                        }
                    }
                    _ => return,
                }
            }
            let request_line =
                String::from_utf8_lossy(head.split(|&b| b == b'\n').next().unwrap_or_default()).to_string();
            let mut parts = request_line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, body) = match (method, path.split('?').next().unwrap_or("")) {
                ("GET", "/metrics") => {
                    let s = stats(&daemon);
                    ("200 OK", crate::stats::prometheus(&s.listeners, s.kernel_path))
                }
                ("GET", _) => ("404 Not Found", "try /metrics\n".to_string()),
                _ => ("405 Method Not Allowed", "GET /metrics\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = w.write_all(resp.as_bytes()).await;
            let _ = w.shutdown().await;
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
    Ok(out)
}
