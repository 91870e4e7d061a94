//! Admission, authentication and backend health: the rules a new client is
//! checked against (`limits`), the JWTs a route asks for (`jwt`), and which
//! backends may be chosen (`health`).
pub mod health;
pub mod jwt;
pub mod limits;
pub mod maglev;
