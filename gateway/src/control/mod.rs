//! The daemon itself: its shared state (`daemon`), reloading its listeners
//! (`reload`), the admin socket and metrics (`admin`), and the hot upgrade's
//! protocol (`upgrade`).
pub mod admin;
pub mod daemon;
pub mod reload;
pub mod upgrade;
