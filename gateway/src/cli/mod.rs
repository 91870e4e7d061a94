//! Commands of the binary that are not the daemon: `doctor`, `echo`, and
//! the fleet's `config push|get` and `fleet status`.
pub mod doctor;
pub mod echo;
pub mod fleet;
