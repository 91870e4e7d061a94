//! The kernel path: the sockmap programs and their maps (`sockmap`), what
//! wakes the supervisor of a spliced flow (`wake`), and the BTF offsets the
//! verdict needs (`btf`).
pub mod btf;
pub mod sockmap;
pub mod wake;
