//! Test support, never loaded by the daemon: a tc classifier that drops about
//! 2% of TCP segments that carry payload (SYN, FIN and RST are spared, so
//! connect and close timing stay predictable). The end-to-end tests attach it
//! to the ingress of each veth end to make the links lossy; this kernel has no
//! netem and no gact action.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_get_prandom_u32,
    macros::{classifier, map},
    maps::Array,
    programs::TcContext,
};

/// Drop probability in parts per thousand (index 0); the test sets it.
#[map(name = "LOSS")]
static LOSS: Array<u32> = Array::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;

#[classifier]
pub fn lossy(ctx: TcContext) -> i32 {
    drop_some(&ctx).unwrap_or(TC_ACT_OK)
}

fn drop_some(ctx: &TcContext) -> Option<i32> {
    let proto = u16::from_be(ctx.load::<u16>(12).ok()?);
    if proto != ETH_P_IP {
        return Some(TC_ACT_OK);
    }
    let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    let total = usize::from(u16::from_be(ctx.load::<u16>(ETH_HLEN + 2).ok()?));
    if ctx.load::<u8>(ETH_HLEN + 9).ok()? != IPPROTO_TCP {
        return Some(TC_ACT_OK);
    }
    let tcp = ETH_HLEN + ihl;
    let doff = usize::from(ctx.load::<u8>(tcp + 12).ok()? >> 4) * 4;
    let flags: u8 = ctx.load(tcp + 13).ok()?;
    if flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 || total <= ihl + doff {
        return Some(TC_ACT_OK);
    }
    let per_mille = *LOSS.get(0)?;
    // SAFETY: helper without arguments.
    let r = unsafe { bpf_get_prandom_u32() } % 1000;
    Some(if r < per_mille { TC_ACT_SHOT } else { TC_ACT_OK })
}

// The panic handler and the license section every program object needs.
#[cfg(not(test))]
mod shared;
