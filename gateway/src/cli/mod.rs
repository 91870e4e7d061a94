//! Commands of the binary that are not the daemon: `doctor` and `echo`.
pub mod doctor;
pub mod echo;
