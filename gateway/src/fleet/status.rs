//! What a node of a fleet says about itself: under `<prefix>nodes/<node>`
//! in etcd (with a lease, so a node that dies is gone within its TTL), and
//! in `gateway status`.
use serde::{Deserialize, Serialize};

/// Where the node stands with the fleet's document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Runs the current document (`revision`).
    Applied,
    /// The document at `revision` did not validate (`error`); the node
    /// serves the last good one (`applied_revision`).
    Rejected,
    /// etcd cannot be reached: the node serves what it last applied.
    Disconnected,
}

/// A listener as the node runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub local: String,
}

/// The status document of one node (`<prefix>nodes/<node>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub version: String,
    pub pid: u32,
    /// The etcd mod_revision of the document last seen.
    pub revision: i64,
    /// The revision of the document running (differs when `rejected`).
    pub applied_revision: i64,
    pub state: State,
    /// For a rejected revision: the message `gateway check` prints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub listeners: Vec<ListenerStatus>,
    pub flows: usize,
    pub kernel_path: bool,
    /// RFC 3339, UTC.
    pub updated_at: String,
}
