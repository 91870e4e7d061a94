//! Backend health. Passive: `failures` consecutive failed connects eject a
//! backend for `eject_for`. Active (when `interval` is set): a TCP connect to
//! every backend each interval, optionally sending `send` and expecting the
//! answer to contain `expect` (as HAProxy's tcp-check send/expect); a success
//! brings an ejected backend back, a failure counts like a failed client
//! connect. An ejected backend gets no new
//! flows; when all are ejected, clients are closed with a clear log line.
use crate::util::sync::Locked;
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, Ordering::Relaxed},
        Mutex,
    },
    time::{Duration, Instant},
};

use tracing::{debug, info, warn};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Consecutive failures that eject a backend.
    pub failures: u32,
    pub eject_for: Duration,
    /// Active checks every this long, if set.
    pub interval: Option<Duration>,
    /// The whole check (connect, send, expect) must finish within this.
    pub timeout: Duration,
    /// Active checks: bytes to send once connected.
    pub send: Option<Vec<u8>>,
    /// Active checks: the answer must contain these bytes (read up to
    /// `MAX_EXPECT_READ`, until the backend closes or `timeout`).
    pub expect: Option<Vec<u8>>,
}

/// How much of a check's answer is searched for `expect`.
pub const MAX_EXPECT_READ: usize = 16 << 10;

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            failures: 3,
            eject_for: Duration::from_secs(30),
            interval: None,
            timeout: Duration::from_secs(1),
            send: None,
            expect: None,
        }
    }
}

#[derive(Default)]
struct Backend {
    consecutive: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

pub struct Health {
    cfg: HealthConfig,
    backends: Vec<Backend>,
}

impl Health {
    pub fn new(cfg: HealthConfig, n: usize) -> Self {
        Self { cfg, backends: (0..n).map(|_| Backend::default()).collect() }
    }

    pub fn config(&self) -> &HealthConfig {
        &self.cfg
    }

    /// Whether backend `i` may get new flows now.
    pub fn is_up(&self, i: usize) -> bool {
        let mut until = self.backends[i].ejected_until.locked();
        match *until {
            Some(t) if Instant::now() < t => false,
            Some(_) => {
                // The ejection ran out: one more chance.
                *until = None;
                true
            }
            None => true,
        }
    }

    pub fn succeeded(&self, i: usize, listener: &str, addr: SocketAddr) {
        self.backends[i].consecutive.store(0, Relaxed);
        if self.backends[i].ejected_until.locked().take().is_some() {
            info!(listener, backend = %addr, "backend answers again: back in rotation");
        }
    }

    pub fn failed(&self, i: usize, listener: &str, addr: SocketAddr) {
        let n = self.backends[i].consecutive.fetch_add(1, Relaxed) + 1;
        if n >= self.cfg.failures {
            let mut until = self.backends[i].ejected_until.locked();
            if until.is_none() {
                warn!(listener, backend = %addr, failures = n, eject_for = ?self.cfg.eject_for, "backend ejected");
            }
            *until = Some(Instant::now() + self.cfg.eject_for);
        }
    }
}

/// Active checks for one listener's backends, forever. `first[i]`: bytes
/// written before anything else on backend `i` (a PROXY header, when the
/// gateway sends one to it).
pub async fn check(health: &Health, listener: &str, backends: &[SocketAddr], first: &[Option<Vec<u8>>]) {
    let Some(every) = health.cfg.interval else { return };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (i, addr) in backends.iter().enumerate() {
            let first = first.get(i).and_then(Option::as_deref);
            match tokio::time::timeout(health.cfg.timeout, probe(*addr, first, &health.cfg)).await {
                Ok(Ok(())) => health.succeeded(i, listener, *addr),
                Ok(Err(why)) => {
                    debug!(listener, backend = %addr, "health check failed: {why}");
                    health.failed(i, listener, *addr);
                }
                Err(_) => {
                    debug!(listener, backend = %addr, "health check failed: no answer within {:?}", health.cfg.timeout);
                    health.failed(i, listener, *addr);
                }
            }
        }
    }
}

/// One active check: connect (and write `first`), then send and expect if
/// configured.
async fn probe(addr: SocketAddr, first: Option<&[u8]>, cfg: &HealthConfig) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    if let Some(first) = first {
        s.write_all(first).await.map_err(|e| format!("PROXY header: {e}"))?;
    }
    if let Some(send) = &cfg.send {
        s.write_all(send).await.map_err(|e| format!("send: {e}"))?;
    }
    let Some(expect) = &cfg.expect else { return Ok(()) };
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < MAX_EXPECT_READ {
        let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if got.windows(expect.len()).any(|w| w == expect.as_slice()) {
            return Ok(());
        }
    }
    Err(format!("the answer ({} bytes) does not contain the expected {:?}", got.len(), String::from_utf8_lossy(expect)))
}
