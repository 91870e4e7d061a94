//! gateway: a TCP and WebSocket gateway that accepts, routes and connects in
//! user space and splices established flows in the kernel with a sockmap
//! verdict program.
//!
//! The modules are layers, declared here from the bottom up. A module imports
//! only modules of its own layer or of the layers declared before it, and no
//! two modules import each other, however indirectly: `cargo xtask layers`
//! checks both, and the README's test command runs it. ARCHITECTURE.md walks
//! a connection through them.
// `unwrap` outside tests says nothing about why it cannot fail: use
// `expect` with the invariant, or handle the case (see clippy.toml).
#![warn(clippy::unwrap_used)]
pub mod util;
pub mod tls;
pub mod policy;
pub mod config;
pub mod fleet;
pub mod kernel;
pub mod flow;
pub mod dataplane;
pub mod handoff;
pub mod edge;
pub mod control;
pub mod cli;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
