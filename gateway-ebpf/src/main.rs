//! gateway's kernel programs.
//!
//! One `sk_skb` stream verdict (attached without a stream parser, so the kernel
//! runs it in verdict-only mode) is attached to the `SOCKS` SOCKHASH. For every
//! skb received on a socket in that map it:
//! 1. finds the socket's slot (`SLOT_INDEX`, keyed by socket cookie);
//! 2. trims the part of a retransmitted segment that overlaps bytes already
//!    handled (verdict-only mode hands such segments over whole);
//! 3. counts the bytes;
//! 4. redirects the payload to the peer socket's egress, or passes it to user
//!    space while the flow is still being set up or over its bound; the first
//!    pass after a redirect writes the slot's index to `WAKE`, since user
//!    space does not watch a redirecting socket's readability (every skb
//!    would wake it).
#![no_std]
#![no_main]

use core::ptr::{addr_of, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    cty::c_void,
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_map_lookup_elem, bpf_probe_read_kernel, bpf_sk_release},
    macros::{map, stream_parser, stream_verdict},
    maps::{Array, HashMap, PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::warn;
use gateway_common::{
    BPF_F_MMAPABLE, DEFAULT_MAX_SOCKETS, KernelConfig, SockSlot, TRIM_CHUNK, TRIM_MAX_CALLS, WAKE_RING_BYTES,
};

// ---- Maps -------------------------------------------------------------------

#[map(name = "SOCKS")]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

#[map(name = "SLOT_INDEX")]
static SLOT_INDEX: HashMap<u64, u32> = HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

#[map(name = "SLOTS")]
static SLOTS: Array<SockSlot> = Array::with_max_entries(DEFAULT_MAX_SOCKETS, BPF_F_MMAPABLE);

#[map(name = "CONFIG")]
static CONFIG: Array<KernelConfig> = Array::with_max_entries(1, 0);

#[map(name = "WAKE")]
static WAKE: RingBuf = RingBuf::with_byte_size(WAKE_RING_BYTES, 0);

/// `bpf_ringbuf_output` flag: wake the reader whatever its position.
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Turns the peer's socket pointer into a plain number for
/// bpf_probe_read_kernel (the verifier forbids arithmetic on socket pointers).
#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

// ---- Verdict ----------------------------------------------------------------

/// Not attached by default: the benchmark's latency study attaches it in front
/// of the verdict (GATEWAY_EXPERIMENT_SK_SKB=parser) to measure strparser.
/// Each skb is one message.
#[stream_parser]
pub fn gateway_parser(ctx: SkBuffContext) -> u32 {
    ctx.len()
}

#[stream_verdict]
pub fn gateway_verdict(ctx: SkBuffContext) -> u32 {
    match try_verdict(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_verdict(ctx: &SkBuffContext) -> Result<u32, u32> {
    // SAFETY: the context pointer is the skb the kernel handed us.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // A socket without a slot is not ours to forward: leave it to user space.
    // SAFETY: a hash lookup; the value is a plain u32 copied out at once.
    let idx = unsafe { SLOT_INDEX.get(&cookie) }.ok_or(SK_PASS)?;
    let slot = SLOTS.get_ptr_mut(*idx).ok_or(SK_PASS)?;
    // SAFETY: array values live as long as the map; this socket's verdict runs
    // under its socket lock, so it is the only kernel writer of this slot.
    let slot = unsafe { &mut *slot };
    // The index entry may be one a release removed just now, and the slot
    // already another socket's: then it is not this socket's to forward.
    // SAFETY: a valid, aligned field of the slot; user space writes it.
    if unsafe { read_volatile(&slot.owner_cookie) } != cookie {
        return Err(SK_PASS);
    }

    // A FIN arrives as an skb without payload. Redirected, it would reach the
    // peer's send path after user space has shut that down, and fail there
    // with EPIPE; user space forwards FIN itself.
    if ctx.len() == 0 {
        return Ok(SK_DROP);
    }

    if !trim_overlap(ctx, slot) {
        // Entirely old data: it was already forwarded once.
        return Ok(SK_DROP);
    }

    let len = u64::from(ctx.len());
    slot.rx_bytes += len;
    // SAFETY: a helper without arguments.
    slot.last_ns = unsafe { bpf_ktime_get_ns() };

    // Until user space has enabled the flow, and while it still holds bytes it
    // was passed earlier, keep passing so that the order of bytes is kept.
    // SAFETY: valid, aligned fields of the slot, written by user space.
    let enabled = unsafe { read_volatile(&slot.enabled) };
    // SAFETY: as above.
    let user_fwd = unsafe { read_volatile(&slot.user_fwd) };
    if enabled == 0 || slot.passed > user_fwd {
        return Ok(pass(slot, *idx, len));
    }

    // Flow control: over the bound, pass to user space, which closes this
    // socket's receive window instead of queueing without limit.
    // SAFETY: as above.
    let high_water = unsafe { read_volatile(&slot.high_water) };
    if high_water != 0 {
        if let Some(delivered) = peer_delivered(slot) {
            let backlog = (slot.redirected + user_fwd).saturating_sub(delivered);
            slot.backlog = backlog;
            if backlog > slot.max_backlog {
                slot.max_backlog = backlog;
            }
            if backlog + len > high_water {
                if slot.paused == 0 {
                    slot.paused = 1;
                    slot.pauses += 1;
                }
                return Ok(pass(slot, *idx, len));
            }
            slot.paused = 0;
        }
    }

    let mut peer = slot.peer_cookie;
    let verdict = SOCKS.redirect_skb(ctx, &mut peer, 0) as u32;
    if verdict == SK_PASS {
        slot.redirected += len;
        if slot.notified != 0 {
            slot.notified = 0;
        }
    } else {
        slot.redirect_errors += 1;
        // Once per flow: the count is in `gateway flows`; a log line per skb
        // would let a peer flood the log.
        if slot.redirect_errors == 1 {
            warn!(
                ctx,
                "redirect to peer {} failed; {} bytes dropped (further failures of this socket are only counted)",
                peer,
                len
            );
        }
    }
    Ok(verdict)
}

/// Passes the skb to user space, and wakes user space if this is the first
/// pass since a redirect. When the ring is full, `notified` stays clear and
/// the next pass tries again.
#[inline(always)]
fn pass(slot: &mut SockSlot, idx: u32, len: u64) -> u32 {
    slot.passed += len;
    // Always wake the reader (BPF_RB_FORCE_WAKEUP): records are rare, and
    // the default wakes only a reader that has caught up.
    if slot.notified == 0 && WAKE.output::<u32>(idx, BPF_RB_FORCE_WAKEUP).is_ok() {
        slot.notified = 1;
    }
    SK_PASS
}

/// Bytes that entered the peer's TCP send queue since the hand-off: those its
/// remote end acknowledged plus those still queued.
#[inline(always)]
fn peer_delivered(slot: &SockSlot) -> Option<u64> {
    let cfg = CONFIG.get(0)?;
    if cfg.acked_offset == 0 {
        return None;
    }
    // SAFETY: a hash lookup; the value is copied out at once.
    let peer_slot_idx = unsafe { SLOT_INDEX.get(&slot.peer_cookie) }?;
    // SAFETY: `get_ptr` checked the index; array values live as long as the map.
    let acked_base = unsafe { read_volatile(&(*SLOTS.get_ptr(*peer_slot_idx)?).acked_base) };
    let mut key = slot.peer_cookie;
    // SAFETY: a SOCKHASH lookup from a program returns a referenced socket (or
    // null), released below on every path.
    let sk = unsafe { bpf_map_lookup_elem(addr_of!(SOCKS) as *mut c_void, (&raw mut key).cast()) };
    if sk.is_null() {
        return None;
    }
    let queued = match SCRATCH.get_ptr_mut(0) {
        // SAFETY: `scratch` is this CPU's valid slot of a per-CPU array; the
        // reads of kernel memory go through bpf_probe_read_kernel.
        Some(scratch) => unsafe {
            // Store and reload through memory: the value comes back as a plain number.
            write_volatile(scratch, sk as u64);
            let base = read_volatile(scratch);
            let acked = bpf_probe_read_kernel((base + u64::from(cfg.acked_offset)) as *const u64).ok();
            let write_seq = bpf_probe_read_kernel((base + u64::from(cfg.write_seq_offset)) as *const u32).ok();
            let snd_una = bpf_probe_read_kernel((base + u64::from(cfg.snd_una_offset)) as *const u32).ok();
            match (acked, write_seq, snd_una) {
                (Some(a), Some(w), Some(u)) => Some(a.saturating_sub(acked_base) + u64::from(w.wrapping_sub(u))),
                _ => None,
            }
        },
        None => None,
    };
    // SAFETY: `sk` came from the lookup above, non-null, released once.
    unsafe { bpf_sk_release(sk) };
    queued
}

/// Cuts the bytes of this skb that come before the sequence number expected
/// next. Returns false when the whole skb is old.
#[inline(always)]
fn trim_overlap(ctx: &SkBuffContext, slot: &mut SockSlot) -> bool {
    let Some(cfg) = CONFIG.get(0) else {
        return true;
    };
    if cfg.cb_offset == 0 {
        return true;
    }
    let len = ctx.len();
    if len == 0 {
        return true;
    }
    let off = (cfg.cb_offset + cfg.seq_offset) as usize;
    // SAFETY: the verdict's context is the kernel's `struct sk_buff`; `cb` holds
    // the `tcp_skb_cb` of a segment taken from a TCP receive queue. The read
    // goes through bpf_probe_read_kernel, which tolerates a bad address.
    let seq_ptr = (ctx.skb.skb as *const u8).wrapping_add(off) as *const u32;
    let Ok(seq) = (unsafe { bpf_probe_read_kernel(seq_ptr) }) else {
        slot.trim_errors += 1;
        return true;
    };
    let end = seq.wrapping_add(len);
    if slot.seq_valid == 0 {
        slot.next_seq = end;
        slot.seq_valid = 1;
        return true;
    }
    let overlap = slot.next_seq.wrapping_sub(seq) as i32;
    if overlap <= 0 {
        // In order (or a gap TCP will fill later, which it never hands us).
        slot.next_seq = end;
        return true;
    }
    let overlap = overlap as u32;
    if overlap >= len {
        slot.trimmed += u64::from(len);
        return false;
    }
    let mut left = overlap;
    for _ in 0..TRIM_MAX_CALLS {
        if left == 0 {
            break;
        }
        let n = if left > TRIM_CHUNK { TRIM_CHUNK } else { left };
        if ctx.adjust_room(-(n as i32), 0, 0).is_err() {
            break;
        }
        left -= n;
    }
    if left != 0 {
        slot.trim_errors += 1;
        if slot.trim_errors == 1 {
            warn!(ctx, "could not trim {} overlapping bytes (further failures of this socket are only counted)", left);
        }
    }
    slot.trimmed += u64::from(overlap - left);
    slot.next_seq = end;
    true
}

// The panic handler and the license section every program object needs.
#[cfg(not(test))]
mod shared;
