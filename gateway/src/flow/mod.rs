//! Flows as the operator sees them: the table of live flows and its
//! snapshots (`table`), the flow log (`log`), and per-listener and
//! per-backend totals (`stats`).
pub mod log;
pub mod stats;
pub mod table;
