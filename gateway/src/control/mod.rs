//! The daemon itself: its shared state (`daemon`), its life from set-up to
//! the drain (`lifecycle`), reloading its listeners (`reload`), the admin
//! socket and metrics (`admin`), and the hot upgrade's protocol (`upgrade`).
pub mod admin;
pub mod daemon;
pub mod lifecycle;
pub mod reload;
pub mod upgrade;
