//! Types shared by the kernel programs (`gateway-ebpf`) and the daemon.
//!
//! Everything here is `#[repr(C)]`, made only of `u32`/`u64` fields laid out
//! so that there is no implicit padding, because both sides read the same bytes.
#![no_std]
#![warn(clippy::unwrap_used)]

/// Name of the SOCKHASH that holds every spliced socket, keyed by socket cookie.
pub const MAP_SOCKS: &str = "SOCKS";
/// Name of the hash that maps a socket cookie to its slot index.
pub const MAP_SLOT_INDEX: &str = "SLOT_INDEX";
/// Name of the `BPF_F_MMAPABLE` array of [`SockSlot`]s.
pub const MAP_SLOTS: &str = "SLOTS";
/// Name of the one-element array holding the [`KernelConfig`].
pub const MAP_CONFIG: &str = "CONFIG";
/// Name of the one-element per-CPU scratch array the verdict uses.
pub const MAP_SCRATCH: &str = "SCRATCH";
/// Name of the ring buffer through which the verdict wakes user space when a
/// socket starts passing bytes (each record: the slot index, a `u32`).
pub const MAP_WAKE: &str = "WAKE";
/// Default size of `WAKE` (the daemon sizes it with the slots: several
/// records of 16 bytes per socket). The daemon reads it as records come; a
/// full ring only delays a wake-up until the flow's next periodic check.
pub const WAKE_RING_BYTES: u32 = 256 * 1024;
/// Name of the verdict program.
pub const PROG_VERDICT: &str = "gateway_verdict";

/// Default number of slots (two per flow) compiled into the object. The daemon
/// may resize the maps before loading.
pub const DEFAULT_MAX_SOCKETS: u32 = 16_384;

/// `BPF_F_MMAPABLE`, so user space can read the kernel's counters and write its
/// own in place (a map update from user space would replace the whole value and
/// lose the verdict's increments).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Largest length `bpf_skb_adjust_room` trims in one call on sk_skb programs.
pub const TRIM_CHUNK: u32 = 4095;
/// Upper bound on trim calls per skb: 64 * 4095 covers a 256 KiB overlap.
pub const TRIM_MAX_CALLS: u32 = 64;

/// The version of what the kernel programs and user space share: the maps,
/// [`SockSlot`], [`KernelConfig`] and what their fields mean. A daemon
/// adopts another's maps at a hot upgrade only when both have the same.
/// Bump it with any change to them.
pub const SHARED_LAYOUT: u32 = 3;

/// Per-socket state of a spliced flow. One slot exists for each of the two
/// sockets; the slot of socket X describes the bytes *received on X*, which the
/// verdict redirects to the egress of X's peer P.
///
/// Ownership of the fields: `owner_cookie`, `peer_cookie`, `acked_base`,
/// `high_water`, `enabled` and `user_fwd` are written by user space only; all other fields
/// by the verdict only. The verdict for one socket runs under that socket's
/// lock, so plain (non-atomic) increments are race-free.
///
/// Flow control: the bytes taken from X and not yet in P's TCP send queue are
/// X's backlog: `redirected + user_fwd - (bytes_acked(P) - P.acked_base +
/// write_seq(P) - snd_una(P))`. They sit in the sockmap's queue in front of P,
/// which the kernel does not bound. While the backlog is above `high_water`,
/// the verdict passes X's bytes to user space instead of redirecting them;
/// passed bytes are charged to X's receive buffer, so X's window closes and
/// TCP slows the sender down, as it would in front of any proxy.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SockSlot {
    /// Cookie of the socket that holds this slot; 0 while the slot is free.
    /// The verdict acts on a slot only for its owner: a lookup that raced
    /// with a release and a reuse finds another owner and passes.
    pub owner_cookie: u64,
    /// Cookie of the socket this socket's payload is redirected to.
    pub peer_cookie: u64,
    /// `tcp_sock::bytes_acked` of *this* socket at the hand-off (user space).
    pub acked_base: u64,
    /// Payload bytes the verdict accepted (after trimming overlaps).
    pub rx_bytes: u64,
    /// Bytes redirected in the kernel to the peer's egress.
    pub redirected: u64,
    /// Bytes handed to user space with SK_PASS.
    pub passed: u64,
    /// Of `passed`, bytes user space has written to the peer.
    pub user_fwd: u64,
    /// Bytes cut from retransmitted segments that overlapped forwarded data.
    pub trimmed: u64,
    /// `bpf_ktime_get_ns()` of the last payload seen (CLOCK_MONOTONIC).
    pub last_ns: u64,
    /// Redirects the kernel refused (the peer left the map).
    pub redirect_errors: u64,
    /// Trims that failed (the skb is then forwarded as it is).
    pub trim_errors: u64,
    /// Backlog toward the peer when the verdict last ran, and its maximum.
    pub backlog: u64,
    pub max_backlog: u64,
    /// Times the flow went over `high_water` and was paused.
    pub pauses: u64,
    /// Bound on the backlog, in bytes; 0 means unbounded (user space).
    pub high_water: u64,
    /// TCP sequence number expected next on this socket.
    pub next_seq: u32,
    /// Non-zero once `next_seq` holds a value.
    pub seq_valid: u32,
    /// User space sets this to 1 once both sockets are in the SOCKHASH.
    pub enabled: u32,
    /// Non-zero while over `high_water`.
    pub paused: u32,
    /// Non-zero once the verdict has told user space (a `WAKE` record) that
    /// this socket passes bytes; cleared by the next redirect. User space
    /// stops watching a socket's readability only while this is zero and
    /// nothing passed waits, so the next pass always sends a record.
    pub notified: u32,
    pub _pad: u32,
}

/// Settings the daemon hands to the verdict program at load time.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelConfig {
    /// Byte offset of `struct sk_buff::cb` in this kernel (from its BTF); the
    /// TCP sequence number (`tcp_skb_cb::seq`) sits at `cb_offset + seq_offset`.
    /// Zero disables overlap trimming.
    pub cb_offset: u32,
    /// Offset of `seq` within `struct tcp_skb_cb`.
    pub seq_offset: u32,
    /// Offsets of `bytes_acked`, `write_seq` and `snd_una` in `struct
    /// tcp_sock`; a zero `acked_offset` disables flow control.
    pub acked_offset: u32,
    pub write_seq_offset: u32,
    pub snd_una_offset: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), made of integers, and without padding (the size
    // asserts below): every bit pattern is a valid value.
    unsafe impl aya::Pod for super::SockSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelConfig {}
}

const _: () = assert!(core::mem::size_of::<SockSlot>() == 144);
const _: () = assert!(core::mem::size_of::<KernelConfig>() == 24);
