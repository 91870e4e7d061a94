//! The bottom layer: what every other layer may use and that knows nothing of
//! flows. The daemon's FFI (`sys`), locks that outlive a panic, a framed read
//! buffer, hex text and host name patterns.
pub mod gate;
pub mod hex;
pub mod host;
pub mod sync;
pub mod sys;
