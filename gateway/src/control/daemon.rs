//! The running daemon's shared state: the plane its flows run on, the
//! config in force, the global limits, and whether its flows have gone to a
//! successor. `lifecycle::run` builds it.
use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use crate::{config::Config, edge::plane::Plane, policy::limits::Global};

/// Shared state of the running daemon.
pub struct Daemon {
    pub plane: Arc<Plane>,
    /// The config in force (updated by reloads) and where it came from.
    pub config: std::sync::Mutex<Config>,
    pub config_path: PathBuf,
    pub global: Arc<Global>,
    /// Bound address of the metrics endpoint.
    pub metrics: Option<SocketAddr>,
    /// The flows have been sent (or the sending failed): once the table is
    /// empty too, the old daemon may exit.
    pub handover_done: std::sync::atomic::AtomicBool,
    /// On a node of a fleet: the node and where it stands.
    pub fleet: Option<Arc<crate::fleet::node::Node>>,
}
