//! What gateway's end-to-end tests (`tests/`) and its bench (`xtask`) share:
//! HTTP heads and WebSocket frames read and written by hand (`http`), and
//! test certificates made with the openssl CLI (`pki`).
pub mod http;
pub mod pki;
