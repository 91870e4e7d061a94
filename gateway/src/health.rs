//! Backend health. Passive: `failures` consecutive failed connects eject a
//! backend for `eject_for`. Active (when `interval` is set): a TCP connect to
//! every backend each interval; a success brings an ejected backend back, a
//! failure counts like a failed client connect. An ejected backend gets no new
//! flows; when all are ejected, clients are closed with a clear log line.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, Ordering::Relaxed},
        Mutex,
    },
    time::{Duration, Instant},
};

use tracing::{info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// Consecutive failures that eject a backend.
    pub failures: u32,
    pub eject_for: Duration,
    /// Active checks every this long, if set.
    pub interval: Option<Duration>,
    pub timeout: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self { failures: 3, eject_for: Duration::from_secs(30), interval: None, timeout: Duration::from_secs(1) }
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

    pub fn config(&self) -> HealthConfig {
        self.cfg
    }

    /// Whether backend `i` may get new flows now.
    pub fn is_up(&self, i: usize) -> bool {
        let mut until = self.backends[i].ejected_until.lock().unwrap();
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
        if self.backends[i].ejected_until.lock().unwrap().take().is_some() {
            info!(listener, backend = %addr, "backend answers again: back in rotation");
        }
    }

    pub fn failed(&self, i: usize, listener: &str, addr: SocketAddr) {
        let n = self.backends[i].consecutive.fetch_add(1, Relaxed) + 1;
        if n >= self.cfg.failures {
            let mut until = self.backends[i].ejected_until.lock().unwrap();
            if until.is_none() {
                warn!(listener, backend = %addr, failures = n, eject_for = ?self.cfg.eject_for, "backend ejected");
            }
            *until = Some(Instant::now() + self.cfg.eject_for);
        }
    }
}

/// Active checks for one listener's backends, forever.
pub async fn check(health: &Health, listener: &str, backends: &[SocketAddr]) {
    let Some(every) = health.cfg.interval else { return };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (i, addr) in backends.iter().enumerate() {
            match tokio::time::timeout(health.cfg.timeout, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => health.succeeded(i, listener, *addr),
                _ => health.failed(i, listener, *addr),
            }
        }
    }
}
