//! The daemon itself: its shared state (`daemon`), its life from set-up to
//! the drain (`lifecycle`), reloading its listeners (`reload`), keeping a
//! fleet node in step with etcd (`fleet`), the admin socket and metrics
//! (`admin`), and the hot upgrade's protocol (`upgrade`).
pub mod admin;
pub mod daemon;
pub mod fleet;
pub mod lifecycle;
pub mod reload;
pub mod upgrade;
