//! Latency study only, never loaded by the daemon: same-host socket
//! acceleration with sk_msg, as Cilium and Merbridge do it. A sock_ops program
//! on a cgroup puts both ends of every established IPv4 TCP connection to or
//! from one port (`STUDY_PORT[0]`) in `STUDY_SOCKS`, keyed by their 4-tuple;
//! an sk_msg program on that map redirects each sendmsg straight into the
//! peer socket's receive queue (`BPF_F_INGRESS`), in the sender's context:
//! no TCP segment, no softirq, no kworker. `cargo xtask bench
//! --attach-variants` measures a 64 B round trip over it against plain
//! loopback TCP, as the lower bound a same-host client could reach.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        sk_action::SK_PASS,
    },
    macros::{map, sk_msg, sock_ops},
    maps::{Array, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};

/// Both ports in network order (as `(ntohl(local_port) >> 16)` and
/// `remote_port >> 16` give them, the way sock_ops and sk_msg expose them).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SockKey {
    local_ip4: u32,
    remote_ip4: u32,
    local_port: u32,
    remote_port: u32,
}

#[map(name = "STUDY_SOCKS")]
static STUDY_SOCKS: SockHash<SockKey> = SockHash::with_max_entries(1024, 0);

/// The port whose connections are accelerated, host order (index 0).
#[map(name = "STUDY_PORT")]
static STUDY_PORT: Array<u32> = Array::with_max_entries(1, 0);

const AF_INET: u32 = 2;

#[sock_ops]
pub fn study_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 0;
    }
    if ctx.family() != AF_INET {
        return 0;
    }
    let Some(&port) = STUDY_PORT.get(0) else { return 0 };
    let local = u32::from_be(ctx.local_port()) >> 16;
    let remote = ctx.remote_port() >> 16;
    let wanted = u32::from((port as u16).to_be());
    if local != wanted && remote != wanted {
        return 0;
    }
    let mut key =
        SockKey { local_ip4: ctx.local_ip4(), remote_ip4: ctx.remote_ip4(), local_port: local, remote_port: remote };
    let _ = STUDY_SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY));
    0
}

#[sk_msg]
pub fn study_redirect(ctx: SkMsgContext) -> u32 {
    // SAFETY: ctx.msg is the kernel's sk_msg_md for this program run.
    let md = unsafe { &*ctx.msg };
    let mut peer = SockKey {
        local_ip4: md.remote_ip4,
        remote_ip4: md.local_ip4,
        local_port: md.remote_port >> 16,
        remote_port: u32::from_be(md.local_port) >> 16,
    };
    // A peer not (yet) in the map: the message goes out as plain TCP.
    let _ = STUDY_SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS));
    SK_PASS
}

// The panic handler and the license section every program object needs.
#[cfg(not(test))]
mod shared;
