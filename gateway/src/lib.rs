//! gateway: a TCP gateway that accepts and connects in user space and splices
//! established flows in the kernel with a sockmap verdict program.
//!
//! ARCHITECTURE.md at the repository root walks a connection through these
//! modules.
// `unwrap` outside tests says nothing about why it cannot fail: use
// `expect` with the invariant, or handle the case (see clippy.toml).
#![warn(clippy::unwrap_used)]
pub mod admin;
pub mod btf;
pub mod carry;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod echo;
pub mod flowlog;
pub mod flows;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod gate;
pub mod handoff;
pub mod health;
pub mod hex;
pub mod host;
pub mod http;
pub mod kernel;
pub mod limits;
pub mod listener;
pub mod proxy;
pub mod relay;
pub mod reload;
pub mod session;
pub mod splice;
pub mod stats;
pub mod sync;
pub mod sys;
pub mod tls;
pub mod upgrade;
pub mod wake;
pub mod ws;
