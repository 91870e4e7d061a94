//! Helpers for gateway's end-to-end tests.
//!
//! Every test builds its own three hosts as network namespaces: a client, the
//! gateway and a backend, joined by two veth pairs:
//!
//! ```text
//!   client 10.77.1.2 ── 10.77.1.1 gateway 10.77.2.1 ── 10.77.2.2 backend
//! ```
//!
//! Sockets for the client and backend roles are created by this process on
//! threads that have entered the namespace (a socket keeps the namespace it was
//! created in), so test code uses ordinary std sockets. The daemon runs as a
//! real process inside the gateway namespace.
mod daemon;
mod fleet;
mod framing;
mod hostmem;
mod lossy;
mod netns;
mod peers;
mod tls;

pub use daemon::*;
pub use fleet::*;
pub use framing::*;
pub use gateway_test_support::{http::*, pki::*};
pub use hostmem::*;
pub use lossy::*;
pub use netns::*;
pub use peers::*;
pub use serde_json::Value;
pub use tls::*;
