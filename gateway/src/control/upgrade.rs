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
//!    binds the others, adopts the kernel maps (step 4), takes over the admin
//!    socket's path, and sends `ready`.
//! 3. The old process stops accepting (its copies close; the sockets live on
//!    in the new process) and answers `ok`.
//! 4. Flows move: the offer also carried the kernel maps (SOCKS,
//!    SLOT_INDEX, SLOTS) and half of the free slots, so the new process
//!    splices into the same maps, under the verdict the old one attached. At
//!    a quiet moment (nothing held in user space, no EOF, not over a bound)
//!    each kernel flow's supervisor, and each TCP relay, stops; the flow's
//!    sockets, slots and counters go to the new process, which carries it on.
//!    A kernel flow's bytes never stop: the kernel moves them throughout.
//!    Inspect and bridge WebSockets move between two whole messages (see
//!    `dataplane::ws`), with the bytes read past the last one; TLS sessions between
//!    two records, with their traffic keys (see `tls::session`).
//!    An idle HTTP connection moves too (`http::serve` holds hyper's
//!    shutdown back and takes the socket); a busy one finishes its request
//!    with `Connection: close`.
//! 5. Flows that can't move within a few seconds (half-closed, congested,
//!    mid-message, mid-record) finish in the old process, which exits when
//!    they have. A signal starts its normal drain.
//!
//! If the new process dies or never confirms, the old one keeps accepting.
use std::{
    io::{Read, Write},
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

use crate::{
    control::daemon::Daemon,
    handoff::{movable, Migrant, MigrantInfo, OfferedListener},
    util::sys,
};

/// The admin request that starts a handover.
pub const REQUEST: &str = "handover";

/// How long the old process waits for the new one's `ready`.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// What the old process offers, in the order of the attached sockets.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Offer {
    pub pid: u32,
    pub listeners: Vec<OfferedListener>,
    /// With the kernel path: its maps' descriptors follow the listeners'.
    pub kernel: Option<crate::kernel::sockmap::Handover>,
}

/// One message of moving flows (up to `FLOWS_PER_MESSAGE`, two sockets each).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct FlowBatch {
    pub(crate) flows: Vec<MigrantInfo>,
    /// The old daemon's last free slots (in the final message).
    free: Vec<u32>,
    more: bool,
}

const FLOWS_PER_MESSAGE: usize = sys::MAX_FDS_PER_MESSAGE / 2;

/// The largest message of moving flows a new daemon reads.
const MAX_MOVING_MESSAGE: usize = 64 << 20;

/// How long the old daemon waits for its kernel flows to reach a quiet moment.
const MOVE_WITHIN: Duration = Duration::from_secs(3);

/// Old side: answers `handover` on an admin connection.
pub async fn give(conn: tokio::net::UnixStream, daemon: &Arc<Daemon>) -> std::io::Result<()> {
    // One handover at a time: a second would offer the same slots and sockets.
    async fn refuse(mut conn: tokio::net::UnixStream, why: &str) -> std::io::Result<()> {
        warn!("upgrade refused: {why}");
        conn.write_all(format!("{}\n", serde_json::json!({ "error": why })).as_bytes()).await
    }
    static GIVING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let Ok(_one) = GIVING.try_lock() else {
        return refuse(conn, "another handover is in progress").await;
    };
    if *daemon.plane.handed_over.borrow() {
        return refuse(conn, "this daemon has already handed its listeners over").await;
    }
    let (listeners, socks) = daemon.plane.listeners.sockets()?;
    if socks.len() + crate::kernel::sockmap::HANDOVER_FDS > sys::MAX_FDS_PER_MESSAGE {
        let why =
            format!("{} listeners are more than one handover carries ({})", socks.len(), sys::MAX_FDS_PER_MESSAGE);
        return refuse(conn, &why).await;
    }
    let (kernel, kernel_fds) = match &daemon.plane.kernel {
        Some(k) => {
            let (info, fds) = k.handover();
            (Some(info), fds.iter().map(AsRawFd::as_raw_fd).collect())
        }
        None => (None, Vec::new()),
    };
    // The slots offered are the new process's from now on: they come back
    // only if it is gone without confirming (its sockets closed with it).
    let offered: Vec<u32> = kernel.as_ref().map(|k| k.free.clone()).unwrap_or_default();
    let successor = conn.peer_cred().ok().and_then(|c| c.pid());
    let mut body = serde_json::to_vec(&Offer { pid: std::process::id(), listeners, kernel })?;
    body.push(b'\n');
    let fds: Vec<i32> = socks.iter().map(AsRawFd::as_raw_fd).chain(kernel_fds).collect();
    let give_back = || {
        let Some(k) = &daemon.plane.kernel else { return };
        // SAFETY: kill(2) with signal 0 only checks that the process exists.
        let gone = successor.is_some_and(|pid| unsafe { libc::kill(pid, 0) } != 0);
        if gone {
            k.reclaim(&offered);
        } else if !offered.is_empty() {
            warn!(
                slots = offered.len(),
                pid = successor,
                "upgrade: the kernel slots offered stay with the process that did not confirm (it may use them)"
            );
        }
    };
    if let Err(e) = send_line(&conn, &body, &fds).await {
        give_back();
        return Err(e);
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
        give_back();
        warn!("upgrade: the new process did not confirm within {READY_WITHIN:?}; this one keeps accepting");
        return Ok(());
    }
    daemon.plane.listeners.stop_all().await;
    daemon.plane.migrants.open();
    daemon.plane.handed_over.send_replace(true);
    // However the rest goes, the main loop may then wait for the flows left.
    struct Done<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Release);
        }
    }
    let _done = Done(&daemon.handover_done);
    conn.get_mut().write_all(b"ok\n").await?;
    info!(open_flows = daemon.plane.flows.len(), "upgrade: the new process accepts now; moving the flows");
    // Kernel flows, TCP relays and terminated WebSockets over TCP detach at
    // their next quiet moment.
    let deadline = tokio::time::Instant::now() + MOVE_WITHIN;
    let movable_left = || {
        daemon.plane.flows.count(movable)
            + daemon.plane.flows.count(|f| f.movable.load(std::sync::atomic::Ordering::Relaxed))
    };
    while movable_left() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let moving = daemon.plane.migrants.close();
    let free = daemon.plane.kernel.as_ref().map(|k| k.seal()).unwrap_or_default();
    let stayed = movable_left();
    let conn = conn.into_inner();
    let total = moving.len();
    let mut batches = moving.chunks(FLOWS_PER_MESSAGE).peekable();
    if batches.peek().is_none() {
        send(&conn, &FlowBatch { flows: Vec::new(), free: free.clone(), more: false }, &[]).await?;
    }
    while let Some(batch) = batches.next() {
        let more = batches.peek().is_some();
        let fds: Vec<i32> = batch
            .iter()
            .flat_map(|m| std::iter::once(m.client.as_raw_fd()).chain(m.backend.as_ref().map(AsRawFd::as_raw_fd)))
            .collect();
        let msg = FlowBatch {
            flows: batch.iter().map(|m| m.info.clone()).collect(),
            free: if more { Vec::new() } else { free.clone() },
            more,
        };
        send(&conn, &msg, &fds).await?;
    }
    // Our copies of the moved sockets close here; the new process holds them.
    drop(moving);
    info!(moved = total, stayed, open_flows = daemon.plane.flows.len(), "upgrade: flows moved; the rest finish here");
    Ok(())
}

/// One JSON line with descriptors attached.
async fn send(conn: &tokio::net::UnixStream, msg: &impl Serialize, fds: &[i32]) -> std::io::Result<()> {
    let mut body = serde_json::to_vec(msg)?;
    body.push(b'\n');
    send_line(conn, &body, fds).await
}

async fn send_line(conn: &tokio::net::UnixStream, body: &[u8], fds: &[i32]) -> std::io::Result<()> {
    loop {
        conn.writable().await?;
        match conn.try_io(tokio::io::Interest::WRITABLE, || sys::send_fds(conn, body, fds)) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// New side: the listening sockets received from the running daemon.
pub(crate) struct Taken {
    pub from_pid: u32,
    listeners: Vec<(OfferedListener, Option<OwnedFd>)>,
    /// The old daemon's kernel maps, to adopt instead of loading new ones.
    pub kernel: Option<(crate::kernel::sockmap::Handover, Vec<OwnedFd>)>,
    conn: UnixStream,
}

/// Why the new process could not take over (its side of the protocol).
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("no running daemon answers on {}", path.display())]
    NoDaemon {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(&'static str, #[source] std::io::Error),
    #[error("the running daemon refused: {0}")]
    Refused(String),
    #[error("not a handover answer; is the running daemon a version without hot upgrade?")]
    NotAnOffer(#[source] serde_json::Error),
    #[error("receiving flows: a message that does not parse")]
    BadFlows(#[source] serde_json::Error),
    /// The two sides disagree on what was sent.
    #[error("{0}")]
    Protocol(String),
}

/// Asks the daemon behind `admin` for its listening sockets.
pub(crate) fn take(admin: &Path) -> Result<Taken, TakeoverError> {
    use TakeoverError::Io;
    let mut conn =
        UnixStream::connect(admin).map_err(|source| TakeoverError::NoDaemon { path: admin.to_path_buf(), source })?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| Io("the admin socket", e))?;
    conn.write_all(format!("{REQUEST}\n").as_bytes()).map_err(|e| Io("asking for the sockets", e))?;
    let mut buf = vec![0u8; 64 << 10];
    let (mut n, fds) = sys::recv_fds(&conn, &mut buf).map_err(|e| Io("receiving the sockets", e))?;
    while n > 0 && !buf[..n].contains(&b'\n') && n < buf.len() {
        match conn.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(m) => n += m,
            Err(e) => return Err(Io("receiving the sockets", e)),
        }
    }
    let line = buf[..n].split(|&b| b == b'\n').next().unwrap_or_default();
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            return Err(TakeoverError::Refused(e.to_string()));
        }
    }
    let offer: Offer = serde_json::from_slice(line).map_err(TakeoverError::NotAnOffer)?;
    // The kernel maps' descriptors follow the listeners'; how many there
    // are depends on the sender's version, which `KernelPath::adopt` checks.
    if fds.len() < offer.listeners.len() || (offer.kernel.is_none() && fds.len() != offer.listeners.len()) {
        return Err(TakeoverError::Protocol(format!(
            "{} listeners announced, {} descriptors received",
            offer.listeners.len(),
            fds.len()
        )));
    }
    let mut fds = fds.into_iter();
    let listeners = offer.listeners.into_iter().zip(fds.by_ref().map(Some)).collect();
    let kernel = offer.kernel.map(|info| (info, fds.collect()));
    Ok(Taken { from_pid: offer.pid, listeners, kernel, conn })
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
    /// Returns the kernel flows the old daemon then hands over, and its last
    /// free slots.
    pub fn confirm(mut self) -> Result<(Vec<Migrant>, Vec<u32>), TakeoverError> {
        use TakeoverError::Io;
        for (o, fd) in &self.listeners {
            if fd.is_some() {
                warn!(listener = %o.name, local = %o.local, "upgrade: listener not in the new config; its socket closes");
            }
        }
        self.conn.write_all(b"ready\n").map_err(|e| Io("announcing ready", e))?;
        // Byte by byte up to the newline: what follows carries descriptors.
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.len() < 64 {
            match (&self.conn).read(&mut b) {
                Ok(1) if b[0] == b'\n' => break,
                Ok(1) => line.push(b[0]),
                Ok(_) => break,
                Err(e) => return Err(Io("waiting for the old daemon's ok", e)),
            }
        }
        if line != b"ok" {
            return Err(TakeoverError::Protocol(format!(
                "the old daemon (pid {}) did not acknowledge: {:?}",
                self.from_pid,
                String::from_utf8_lossy(&line)
            )));
        }
        self.conn
            .set_read_timeout(Some(MOVE_WITHIN + Duration::from_secs(10)))
            .map_err(|e| Io("the admin socket", e))?;
        let mut moved = Vec::new();
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let (mut n, fds) = sys::recv_fds(&self.conn, &mut buf).map_err(|e| Io("receiving flows", e))?;
            while n > 0 && buf[n - 1] != b'\n' {
                // A message's WebSockets may carry bytes read past their
                // last message (up to 16 KiB a side, in hex).
                if n == buf.len() {
                    if buf.len() >= MAX_MOVING_MESSAGE {
                        return Err(TakeoverError::Protocol(format!(
                            "receiving flows: a message over {MAX_MOVING_MESSAGE} bytes"
                        )));
                    }
                    buf.resize(buf.len() * 2, 0);
                }
                match (&self.conn).read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(m) => n += m,
                    Err(e) => return Err(Io("receiving flows", e)),
                }
            }
            let msg: FlowBatch = serde_json::from_slice(&buf[..n]).map_err(TakeoverError::BadFlows)?;
            let want: usize = msg.flows.iter().map(|f| 1 + usize::from(f.with_backend())).sum();
            if fds.len() != want {
                return Err(TakeoverError::Protocol(format!(
                    "{} flows announced with {} sockets ({want} expected)",
                    msg.flows.len(),
                    fds.len()
                )));
            }
            let mut fds = fds.into_iter();
            for info in msg.flows {
                // Counted above: one socket per flow, two with a backend.
                let client = fds.next().expect("counted").into();
                let backend = if info.with_backend() { Some(fds.next().expect("counted").into()) } else { None };
                moved.push(Migrant { info, client, backend });
            }
            if !msg.more {
                return Ok((moved, msg.free));
            }
        }
    }
}
