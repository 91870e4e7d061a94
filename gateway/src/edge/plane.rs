//! What a flow needs from the daemon it runs in, and nothing more: the table
//! it is counted in, the running listeners (for a flow adopted at a hot
//! upgrade), the kernel path (or why there is none), the intake that offers a
//! detached flow to a successor, and the signals of the drain and of the hot
//! upgrade. The daemon (`control::daemon`) owns one and adds what only the
//! control layer reads: the config in force, the global limits, the metrics
//! address.
use std::time::Duration;

use crate::{
    edge::listener::Listeners,
    flow::table::FlowTable,
    handoff::Intake,
    kernel::sockmap::{KernelPath, Unavailable},
};

pub struct Plane {
    pub flows: FlowTable,
    pub listeners: Listeners,
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
    /// Flows detached for the new process; Some while it takes them.
    pub migrants: Intake,
}
