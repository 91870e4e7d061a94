//! TLS: terminating it with rustls (`terminate`: server and client configs,
//! the SNI peek, the handshake) and the record layer of a session that moves
//! to a successor process at a hot upgrade (`session`).
pub mod session;
pub mod terminate;
