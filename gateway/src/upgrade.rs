//! Hot upgrade: a new gateway process (`gateway run --takeover`) takes the
//! listening sockets over from the running one through its admin socket, so
//! no connection is refused while binaries change.
//!
//! 1. The new process sends `handover` on the old one's admin socket. The old
//!    one answers with a JSON line naming its listeners, and a duplicate of
//!    each listening socket attached (SCM_RIGHTS). Both now hold the same
//!    sockets: the same accept queues, so whichever accepts a connection
//!    serves it.
//! 2. The new process uses them for the listeners of the same name and bind,
//!    binds the others, loads its own kernel programs, takes over the admin
//!    socket's path, and sends `ready`.
//! 3. The old process stops accepting (its copies close; the sockets live on
//!    in the new process) and answers `ok`. Its established flows, kernel
//!    and userspace, carry on there untouched until they end; then it exits.
//!    A signal during that wait starts its normal drain.
//!
//! If the new process dies or never confirms, the old one keeps accepting.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::Path,
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tracing::{info, warn};

use crate::{proxy::Daemon, sys};

/// The admin request that starts a handover.
pub const REQUEST: &str = "handover";

/// How long the old process waits for the new one's `ready`.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// What the old process offers, in the order of the attached sockets.
#[derive(Debug, Serialize, Deserialize)]
pub struct Offer {
    pub pid: u32,
    pub listeners: Vec<Offered>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Offered {
    pub name: String,
    /// The configured address (a port 0 stays 0 here).
    pub bind: SocketAddr,
    /// The address bound.
    pub local: SocketAddr,
}

/// Old side: answers `handover` on an admin connection.
pub async fn give(conn: tokio::net::UnixStream, daemon: &Arc<Daemon>) -> std::io::Result<()> {
    let (listeners, socks) = daemon.listeners.sockets()?;
    if socks.len() > sys::MAX_FDS_PER_MESSAGE {
        let why =
            format!("{} listeners are more than one handover carries ({})", socks.len(), sys::MAX_FDS_PER_MESSAGE);
        warn!("upgrade refused: {why}");
        let mut conn = conn;
        return conn.write_all(format!("{}\n", serde_json::json!({ "error": why })).as_bytes()).await;
    }
    let mut body = serde_json::to_vec(&Offer { pid: std::process::id(), listeners })?;
    body.push(b'\n');
    let fds: Vec<i32> = socks.iter().map(AsRawFd::as_raw_fd).collect();
    loop {
        conn.writable().await?;
        match conn.try_io(tokio::io::Interest::WRITABLE, || sys::send_fds(&conn, &body, &fds)) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    drop(socks);
    info!(listeners = fds.len(), "upgrade: listening sockets sent to a new process; waiting for it to be ready");
    let mut conn = tokio::io::BufReader::new(conn);
    let mut line = String::new();
    let confirmed = matches!(
        tokio::time::timeout(READY_WITHIN, conn.read_line(&mut line)).await,
        Ok(Ok(_)) if line.trim() == "ready"
    );
    if !confirmed {
        warn!("upgrade: the new process did not confirm within {READY_WITHIN:?}; this one keeps accepting");
        return Ok(());
    }
    daemon.listeners.stop_all();
    daemon.handed_over.send_replace(true);
    conn.get_mut().write_all(b"ok\n").await?;
    info!(open_flows = daemon.flows.len(), "upgrade: the new process accepts now; established flows finish here");
    Ok(())
}

/// New side: the listening sockets received from the running daemon.
pub struct Taken {
    pub from_pid: u32,
    listeners: Vec<(Offered, Option<OwnedFd>)>,
    conn: UnixStream,
}

/// Asks the daemon behind `admin` for its listening sockets.
pub fn take(admin: &Path) -> Result<Taken, String> {
    let at = admin.display();
    let mut conn = UnixStream::connect(admin).map_err(|e| format!("no running daemon answers on {at}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    conn.write_all(format!("{REQUEST}\n").as_bytes()).map_err(|e| format!("{at}: {e}"))?;
    let mut buf = vec![0u8; 64 << 10];
    let (mut n, fds) = sys::recv_fds(&conn, &mut buf).map_err(|e| format!("{at}: receiving the sockets: {e}"))?;
    while n > 0 && !buf[..n].contains(&b'\n') && n < buf.len() {
        match conn.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(m) => n += m,
            Err(e) => return Err(format!("{at}: {e}")),
        }
    }
    let line = buf[..n].split(|&b| b == b'\n').next().unwrap_or_default();
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            return Err(format!("the running daemon refused: {e}"));
        }
    }
    let offer: Offer = serde_json::from_slice(line).map_err(|e| {
        format!("{at}: not a handover answer ({e}); is the running daemon a version without hot upgrade?")
    })?;
    if offer.listeners.len() != fds.len() {
        return Err(format!("{at}: {} listeners offered with {} sockets", offer.listeners.len(), fds.len()));
    }
    let listeners = offer.listeners.into_iter().zip(fds.into_iter().map(Some)).collect();
    Ok(Taken { from_pid: offer.pid, listeners, conn })
}

impl Taken {
    /// The socket of the listener with this name and configured bind, if offered.
    pub fn claim(&mut self, name: &str, bind: SocketAddr) -> Option<std::net::TcpListener> {
        let (_, fd) = self.listeners.iter_mut().find(|(o, fd)| o.name == name && o.bind == bind && fd.is_some())?;
        let l = std::net::TcpListener::from(fd.take()?);
        l.set_nonblocking(true).ok()?;
        Some(l)
    }

    /// Tells the old daemon to stop accepting. Offered sockets no listener
    /// claimed close here: connections waiting in them are lost, so they
    /// are named.
    pub fn confirm(mut self) -> Result<(), String> {
        for (o, fd) in &self.listeners {
            if fd.is_some() {
                warn!(listener = %o.name, local = %o.local, "upgrade: listener not in the new config; its socket closes");
            }
        }
        self.conn.write_all(b"ready\n").map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(&self.conn).read_line(&mut line).map_err(|e| e.to_string())?;
        if line.trim() != "ok" {
            return Err(format!("the old daemon (pid {}) did not acknowledge: {line:?}", self.from_pid));
        }
        Ok(())
    }
}
