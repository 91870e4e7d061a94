//! The running daemon's shared state: its flows, listeners, config, kernel
//! path, and the signals of its drain and hot upgrade.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use crate::{
    flows::FlowTable,
    kernel::{KernelPath, Unavailable},
};

/// Shared state of the running daemon.
pub struct Daemon {
    pub flows: FlowTable,
    pub listeners: crate::listener::Listeners,
    /// The config in force (updated by reloads) and where it came from.
    pub config: std::sync::Mutex<crate::config::Config>,
    pub config_path: std::path::PathBuf,
    pub global: Arc<crate::limits::Global>,
    /// Bound address of the metrics endpoint.
    pub metrics: Option<SocketAddr>,
    pub kernel: Option<KernelPath>,
    /// Why the kernel path is not available, when it is not.
    pub kernel_unavailable: Option<Unavailable>,
    /// Test hook (`GATEWAY_TEST_HANDOFF_DELAY_MS`): wait this long between
    /// connecting the backend and the hand-off, so tests can queue bytes on
    /// both sockets before it. Zero in production.
    pub handoff_delay: Duration,
    /// Set to true when the drain starts.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// Set to true once a new process has taken the listeners over (hot upgrade).
    pub handed_over: tokio::sync::watch::Sender<bool>,
    /// Kernel flows detached for the new process; Some while it takes them.
    pub migrants: crate::handoff::Intake,
    /// The flows have been sent (or the sending failed): once the table is
    /// empty too, the old daemon may exit.
    pub handover_done: std::sync::atomic::AtomicBool,
}
