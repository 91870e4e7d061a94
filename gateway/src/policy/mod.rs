//! Admission and backend health: the rules a new client is checked against
//! (`limits`) and which backends may be chosen (`health`).
pub mod health;
pub mod limits;
