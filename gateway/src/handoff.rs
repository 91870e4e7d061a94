//! A flow on its way to a successor daemon (hot upgrade). The nouns:
//! - `Migrant`: one flow moving, its sockets and its `MigrantInfo` (what
//!   the flow carries: its counters, `flow::table::Carried`, and by its path
//!   a `Moved`: the kernel slots and the supervisor's `Resume`, a relay's
//!   reason, a WebSocket's limits and unread bytes, TLS sessions parked
//!   between records);
//! - `Intake`: where flow runners offer a detached flow (`Handed` says what
//!   became of it);
//! - `OfferedListener`: a listening socket the successor takes.
//!
//! Flow runners build these; only `control::upgrade` sends and receives
//! them (its own messages, `Offer`, `FlowBatch` and `Taken`, stay there).
use std::{
    net::{SocketAddr, TcpStream},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use crate::{flow::table::Flow, util::sync::Locked};

/// A flow moving to the new process, as the hand-over sends it (its
/// sockets travel beside the message): what it carries, flattened into the
/// same JSON object as where its bytes go.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrantInfo {
    #[serde(flatten)]
    pub flow: crate::flow::table::Carried,
    pub moved: Moved,
}

/// Where a moving flow's bytes go.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Moved {
    /// Still in the (shared) kernel maps: its slots and supervisor state.
    Kernel { splice: crate::kernel::sockmap::Splice, resume: crate::dataplane::splice::Resume },
    /// Relayed in user space, for this reason (nothing was held in hand).
    Userspace { reason: String, code: String },
    /// A terminated WebSocket (inspect, bridge_tcp) between messages: its
    /// route's limits, and the bytes read past the last message (hex).
    WebSocket {
        reason: String,
        code: String,
        limits: crate::dataplane::ws::Limits,
        client_early: String,
        backend_early: String,
        /// wss: the client's TLS session.
        #[serde(default)]
        client_tls: Option<crate::tls::session::ParkedTls>,
    },
    /// An idle HTTP connection of a websocket listener (no backend socket
    /// goes along): its TLS session, and the bytes read past its last
    /// request (hex).
    Http { reason: String, code: String, client_tls: Option<crate::tls::session::ParkedTls>, early: String },
    /// Relayed with TLS on one side or both: each session's keys and the
    /// ciphertext read past its last record.
    Tls {
        reason: String,
        code: String,
        client: Option<crate::tls::session::ParkedTls>,
        backend: Option<crate::tls::session::ParkedTls>,
    },
}

/// Whether a live flow can move to a new daemon by its path: kernel flows,
/// and flows relayed in user space, TLS ones included (terminated WebSockets
/// are marked on the flow, `Flow::movable`); HTTP connections are not.
pub fn movable(f: &Flow) -> bool {
    use crate::flow::table::FlowPath;
    match &*f.path.locked() {
        FlowPath::Kernel { .. } => true,
        FlowPath::Userspace { code, .. } => code.moves_as_relay(),
        FlowPath::Connecting | FlowPath::Relayed { .. } => false,
    }
}

impl MigrantInfo {
    /// Its path in the new daemon's flow table.
    pub fn path(&self) -> crate::flow::table::FlowPath {
        use crate::flow::table::FlowPath;
        match &self.moved {
            Moved::Kernel { splice, .. } => {
                FlowPath::Kernel { client_slot: splice.client_slot, backend_slot: splice.backend_slot }
            }
            Moved::Userspace { reason, code }
            | Moved::WebSocket { reason, code, .. }
            | Moved::Tls { reason, code, .. }
            | Moved::Http { reason, code, .. } => {
                FlowPath::Userspace { reason: reason.clone(), code: crate::flow::table::Fallback::parse(code) }
            }
        }
    }

    pub fn of(flow: &Flow, moved: Moved) -> Self {
        MigrantInfo { flow: flow.carried(), moved }
    }
}

pub struct Migrant {
    pub info: MigrantInfo,
    pub client: std::net::TcpStream,
    /// None for an HTTP connection (its backend connection stays behind).
    pub backend: Option<std::net::TcpStream>,
}

impl MigrantInfo {
    /// Whether a backend socket travels with the flow.
    pub(crate) fn with_backend(&self) -> bool {
        !matches!(self.moved, Moved::Http { .. })
    }
}

/// A listening socket offered to the successor (its descriptor travels
/// beside the message).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OfferedListener {
    pub name: String,
    /// The configured address (a port 0 stays 0 here).
    pub bind: SocketAddr,
    /// The address bound.
    pub local: SocketAddr,
}

/// Where detached flows wait for the successor: open while a hot upgrade
/// takes flows, closed (and emptied) when it sends them.
#[derive(Default)]
pub struct Intake(Mutex<Option<Vec<Migrant>>>);

/// What became of a flow offered to the successor.
pub enum Handed<T, E> {
    Taken,
    /// No successor takes flows now: what the flow holds, to go on here.
    NotTaking(T),
    /// `build` failed: the flow can neither move nor go on.
    Failed(E),
}

impl Intake {
    pub fn open(&self) {
        *self.0.locked() = Some(Vec::new());
    }

    /// Closes the intake: the flows offered until now.
    pub fn close(&self) -> Vec<Migrant> {
        self.0.locked().take().unwrap_or_default()
    }

    /// Offers a detached flow: if the intake is open, `build` turns what the
    /// flow holds into what it carries and its sockets, under the intake's
    /// lock, so nothing leaves the flow (TLS keys included) for a hand-over
    /// that has ended.
    pub fn offer<T, E>(
        &self,
        flow: &Flow,
        held: T,
        build: impl FnOnce(T) -> Result<(Moved, TcpStream, Option<TcpStream>), E>,
    ) -> Handed<T, E> {
        let mut intake = self.0.locked();
        let Some(list) = intake.as_mut() else { return Handed::NotTaking(held) };
        match build(held) {
            Ok((moved, client, backend)) => {
                list.push(Migrant { info: MigrantInfo::of(flow, moved), client, backend });
                Handed::Taken
            }
            Err(e) => Handed::Failed(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hot upgrade may run between two versions: the message keeps the
    /// flat shape earlier daemons send and read.
    #[test]
    fn a_migrant_is_one_flat_object_as_before() {
        let earlier = r#"{"listener":"t","client":"127.0.0.1:1","backend":null,"route":null,"age_ms":5,
            "user_c2b":1,"user_b2c":2,"moved":{"Userspace":{"reason":"r","code":"configured-userspace"}}}"#;
        let m: MigrantInfo = serde_json::from_str(earlier).unwrap();
        assert_eq!((m.flow.listener.as_str(), m.flow.age_ms, m.flow.user_b2c, m.flow.msgs_c2b), ("t", 5, 2, 0));
        let v = serde_json::to_value(&m).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in ["listener", "client", "age_ms", "user_c2b", "http_requests", "moved"] {
            assert!(keys.contains(&k), "{k} missing from {v}");
        }
        assert!(!keys.contains(&"flow"), "{v}");
    }
}
