//! Moving a connected flow's bytes: supervising it in the kernel (`splice`),
//! relaying it in user space (`relay`), and the WebSocket modes that stay in
//! user space (`ws`). Each ends in `flow::table::Stopped`: closed, or
//! detached for a successor.
pub mod relay;
pub mod splice;
pub mod ws;
