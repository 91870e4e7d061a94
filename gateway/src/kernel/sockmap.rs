//! The kernel path: loads the sockmap verdict, owns its maps, and splices
//! socket pairs into it.
//!
//! Each spliced socket gets a [`SockSlot`] in the `SLOTS` array, which is
//! mmapped here so that the verdict's counters are read, and user space's own
//! fields written, in place.
use crate::util::sync::Locked;
use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    ptr::{self, NonNull},
    sync::Mutex,
};

use aya::{
    maps::{Array, HashMap, Map, MapData, SockHash},
    programs::SkSkb,
    Ebpf, EbpfLoader,
};
use gateway_common::{
    KernelConfig, SockSlot, MAP_CONFIG, MAP_SLOTS, MAP_SLOT_INDEX, MAP_SOCKS, MAP_WAKE, PROG_VERDICT,
};
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};

use crate::{kernel::btf::Btf, util::sys};

/// The program name of the experiment's stream parser (see [`Attach`]).
const PROG_PARSER: &str = "gateway_parser";
/// `enum bpf_attach_type` value of `BPF_SK_SKB_VERDICT` (aya 0.14 only
/// attaches the stream kinds).
const BPF_SK_SKB_VERDICT: u32 = 38;

/// How the verdict is attached to the SOCKHASH. The default, a stream
/// verdict without a parser, is the product; the others exist so the
/// benchmark can measure them against it (issue 4's latency study), chosen by
/// `GATEWAY_EXPERIMENT_SK_SKB=stream_verdict|skb_verdict|parser`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attach {
    StreamVerdict,
    /// `BPF_SK_SKB_VERDICT`: the same program through the attach type meant for it.
    SkbVerdict,
    /// A stream parser (returning each skb's length) in front of the verdict,
    /// which puts strparser in the receive path.
    Parser,
}

impl Attach {
    fn from_env() -> Result<Self, String> {
        match std::env::var("GATEWAY_EXPERIMENT_SK_SKB").as_deref() {
            Err(_) | Ok("") | Ok("stream_verdict") => Ok(Self::StreamVerdict),
            Ok("skb_verdict") => Ok(Self::SkbVerdict),
            Ok("parser") => Ok(Self::Parser),
            Ok(other) => {
                Err(format!("GATEWAY_EXPERIMENT_SK_SKB={other:?} is not one of stream_verdict, skb_verdict, parser"))
            }
        }
    }
}

/// `BPF_PROG_ATTACH` of `prog` to `map` with `attach_type`.
fn attach_raw(prog: std::os::fd::BorrowedFd<'_>, map: std::os::fd::BorrowedFd<'_>, attach_type: u32) -> io::Result<()> {
    // The BPF_PROG_ATTACH member of `union bpf_attr`, zero-padded to the
    // size of the union's largest member the kernel checks.
    #[repr(C)]
    struct ProgAttach {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
        rest: [u32; 28],
    }
    const BPF_PROG_ATTACH: libc::c_long = 8;
    let attr = ProgAttach {
        target_fd: map.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        attach_flags: 0,
        rest: [0; 28],
    };
    // SAFETY: attr is a valid, fully initialised bpf_attr prefix of the size passed.
    let r =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_ATTACH, &raw const attr, std::mem::size_of::<ProgAttach>()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway.bpf.o"));

/// Why the kernel path could not take a flow (or any flow).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    #[error("this build has no eBPF object (build with `cargo xtask build`)")]
    NoObject,
    #[error("not privileged: loading sockmap programs needs root or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON")]
    NotPrivileged,
    #[error("eBPF programs failed to load: {0}")]
    LoadFailed(String),
    #[error("kernel flow table is full ({0} flows); raise kernel.max_flows")]
    MapFull(u32),
    #[error("socket could not be added to the sockmap: {0}")]
    InsertFailed(String),
    /// Only established sockets can enter a SOCKHASH; a peer that already
    /// sent FIN (or RST) before the hand-off is relayed in user space.
    #[error("the {0} closed its side before the hand-off")]
    NotEstablished(&'static str),
    #[error("the kernel can't bound this flow's queue (no tcp_sock.bytes_acked in kernel BTF)")]
    NoFlowControl,
    #[error("the global cap on queued bytes ({0} bytes) leaves no room for another kernel flow")]
    QueueCap(u64),
}

/// Why a predecessor's kernel maps could not be taken over (hot upgrade).
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error(
        "the running daemon's kernel maps have layout {} (slots of {} bytes), this binary's {} ({} bytes): \
         a binary that changes what the kernel programs share needs a cold restart",
        theirs.0, theirs.1, ours.0, ours.1
    )]
    Layout { theirs: (u32, u32), ours: (u32, u32) },
    #[error("the running daemon sent {0} kernel map descriptors, not {HANDOVER_FDS}")]
    Descriptors(usize),
    #[error("{0}")]
    Io(&'static str, #[source] io::Error),
    #[error("{0}")]
    Map(&'static str, #[source] aya::maps::MapError),
}

/// The mmapped `SLOTS` array.
struct SlotTable {
    base: NonNull<SockSlot>,
    len: u32,
    map_len: usize,
}

// SAFETY: the mapping is shared memory; all accesses go through volatile reads
// and writes of plain integers, and slot ownership is handed out by `free`.
unsafe impl Send for SlotTable {}
// SAFETY: as for Send: shared use is volatile integer reads and writes.
unsafe impl Sync for SlotTable {}

impl SlotTable {
    fn map(data: &MapData, len: u32) -> io::Result<Self> {
        let bytes = len as usize * std::mem::size_of::<SockSlot>();
        let page = 4096;
        let map_len = bytes.div_ceil(page) * page;
        // SAFETY: mapping a BPF_F_MMAPABLE array map fd, shared, of its size.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { base: NonNull::new(p.cast()).expect("mmap gives MAP_FAILED, not null"), len, map_len })
    }

    fn slot(&self, i: u32) -> *mut SockSlot {
        assert!(i < self.len);
        // SAFETY: i is in bounds of the mapping.
        unsafe { self.base.as_ptr().add(i as usize) }
    }

    fn read(&self, i: u32) -> SockSlot {
        // SAFETY: in bounds; the kernel writes concurrently, so read volatile.
        unsafe { ptr::read_volatile(self.slot(i)) }
    }
}

impl Drop for SlotTable {
    fn drop(&mut self) {
        // SAFETY: unmapping what `map` mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
    }
}

struct Maps {
    socks: SockHash<MapData, u64>,
    index: HashMap<MapData, u64, u32>,
    /// First in, first out: a slot just released is the last to be reused,
    /// so a verdict that looked it up just before the release is long done.
    free: std::collections::VecDeque<u32>,
    /// Handed over (hot upgrade): the free slots are the next daemon's now,
    /// and no flow is spliced here any more; a slot released here is left
    /// free (owner 0) for the next daemon to take (`sweep`).
    sealed: bool,
    /// Slots of flows a sealed predecessor (or one before it) still runs:
    /// neither free nor live here, and ours once their owner is 0.
    foreign: std::collections::BTreeSet<u32>,
    /// Slots of live flows (both of each flow), with their socket's fd.
    active: std::collections::BTreeMap<u32, i32>,
    /// The bound currently written into every active slot.
    high_water: u64,
    /// The bound the live sockets' buffers were last sized for.
    buffers_for: u64,
}

pub struct KernelPath {
    /// `kernel.pin_path`: what is pinned, removed at exit unless kept.
    pins: Mutex<Option<Pins>>,
    // The loaded object (None when the maps were adopted from a predecessor,
    // whose program stays attached to SOCKS).
    _ebpf: Option<Ebpf>,
    // Maps the program uses that no other field owns.
    _kept: (Option<Array<MapData, KernelConfig>>, MapData),
    /// Descriptors of SOCKS, SLOT_INDEX, SLOTS and WAKE, for a hot upgrade.
    handover_fds: [std::os::fd::OwnedFd; HANDOVER_FDS],
    /// Hang-ups, errors and the verdict's wake-ups of spliced sockets.
    wakeups: std::sync::Arc<crate::kernel::wake::Wakeups>,
    maps: Mutex<Maps>,
    slots: SlotTable,
    max_flows: u32,
    pub trim: bool,
    /// Bounds on queued bytes; None when the kernel can't enforce them.
    pub flow_control: Option<FlowControl>,
    /// The config asked for bounds (so a flow must not be spliced without them).
    settings_bounded: bool,
}

/// The bounds on bytes queued in the kernel path.
#[derive(Debug, Clone, Copy)]
pub struct FlowControl {
    /// Per direction of one flow.
    pub per_flow: u64,
    /// Across every direction of every kernel flow.
    pub total: u64,
}

/// No flow gets a share below this; past it, new flows stay in user space.
/// The smallest `max_queued_per_flow` allowed, so that the default cap (1
/// GiB) has room for the default `max_flows` (8,192); at 128 KiB, half the
/// map could never be used and the 4,097th held WebSocket was relayed (or,
/// with `offload: kernel`, closed).
pub const MIN_HIGH_WATER: u64 = 64 * 1024;

impl FlowControl {
    /// The per-direction bound when `flows` kernel flows share the total:
    /// the bytes a direction may take from its sender and not yet have put
    /// in its receiver's socket.
    pub fn share(&self, flows: usize) -> u64 {
        let share = self.total / (2 * flows.max(1) as u64);
        self.per_flow.min(share)
    }
}

/// The share as written into the slots: below `per_flow`, rounded down to
/// one of eight steps per power of two (at most 12.5% under the exact
/// share). With thousands of flows the exact share changes at every splice
/// and release, and each change rewrites every live slot; stepped, it
/// changes once per few percent of flows come or gone.
fn stepped(share: u64, per_flow: u64) -> u64 {
    if share >= per_flow || share < 16 {
        return share.min(per_flow);
    }
    let unit = 1u64 << (63 - share.leading_zeros() - 3);
    share / unit * unit
}

/// The bound the live slots move to, if it moves from `current` to
/// `target`: down at once (the cap must hold for the flows there are), up
/// only once it has grown by a quarter, so that a number of flows going to
/// and fro across a step does not rewrite every slot each time.
fn next_high_water(current: u64, target: u64) -> Option<u64> {
    let moves = current == 0 || target < current || target >= current + current / 4;
    (moves && target != current).then_some(target)
}

/// Of a direction's share, the sockmap's queue in front of the receiver
/// may hold half (the verdict's `high_water`); the other half is the
/// sender-side socket's receive buffer, where bytes passed to user space
/// wait (see [`size_buffers`]).
fn high_water(share: u64) -> u64 {
    share / 2
}

/// A socket pair spliced in the kernel. Dropping it does not release the
/// slots: call [`KernelPath::release`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Splice {
    pub client_cookie: u64,
    pub backend_cookie: u64,
    /// Slot of the client socket (client→backend bytes).
    pub client_slot: u32,
    /// Slot of the backend socket (backend→client bytes).
    pub backend_slot: u32,
    /// [`sys::bytes_queued_total`] of each socket before anything could be
    /// redirected into it: the baseline for "has the peer drained?".
    pub client_sent_base: u64,
    pub backend_sent_base: u64,
}

impl KernelPath {
    /// Loads and attaches the programs, sized and configured by `settings`.
    pub fn load(settings: &crate::config::Kernel) -> Result<Self, Unavailable> {
        let max_flows = settings.max_flows;
        if OBJECT.is_empty() {
            return Err(Unavailable::NoObject);
        }
        const CAP_NET_ADMIN: u64 = 1 << 12;
        const CAP_SYS_ADMIN: u64 = 1 << 21;
        const CAP_PERFMON: u64 = 1 << 38;
        const CAP_BPF: u64 = 1 << 39;
        let caps = sys::effective_caps();
        let has = |c| caps & c != 0;
        if !(has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))) || !has(CAP_NET_ADMIN) {
            return Err(Unavailable::NotPrivileged);
        }
        let sockets = max_flows.saturating_mul(2);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_SOCKS, sockets)
            .map_max_entries(MAP_SLOT_INDEX, sockets)
            .map_max_entries(MAP_SLOTS, sockets)
            .map_max_entries(MAP_WAKE, wake_ring_bytes(sockets))
            .load(OBJECT)
            .map_err(|e| Unavailable::LoadFailed(format!("{e:#}")))?;
        spawn_ebpf_logger(&mut ebpf);

        let btf = Btf::from_sys_fs();
        let mut cfg = KernelConfig::default();
        let offset = |strukt: &str, member: &str| -> Result<u32, String> {
            let btf = btf.as_ref().map_err(ToString::to_string)?;
            btf.member_offset(strukt, member).map_err(|e| e.to_string())
        };
        let attach = Attach::from_env().map_err(Unavailable::LoadFailed)?;
        if settings.trim_overlaps && attach == Attach::Parser {
            // strparser keeps its own state in skb->cb, where the trim reads the seq.
            warn!("overlap trimming disabled: GATEWAY_EXPERIMENT_SK_SKB=parser uses skb->cb");
        } else if settings.trim_overlaps {
            match offset("sk_buff", "cb").and_then(|cb| Ok((cb, offset("tcp_skb_cb", "seq")?))) {
                Ok((cb, seq)) => (cfg.cb_offset, cfg.seq_offset) = (cb, seq),
                Err(e) => warn!("overlap trimming disabled: {e}; retransmissions on lossy links may duplicate bytes"),
            }
        }
        let mut flow_control = None;
        if settings.max_queued_per_flow > 0 {
            match offset("tcp_sock", "bytes_acked")
                .and_then(|a| Ok((a, offset("tcp_sock", "write_seq")?, offset("tcp_sock", "snd_una")?)))
            {
                Ok((acked, write_seq, snd_una)) => {
                    (cfg.acked_offset, cfg.write_seq_offset, cfg.snd_una_offset) = (acked, write_seq, snd_una);
                    flow_control =
                        Some(FlowControl { per_flow: settings.max_queued_per_flow, total: settings.max_queued_total });
                }
                Err(e) => warn!("kernel flow control unavailable ({e}): flows will be relayed in user space"),
            }
        }
        let take = |ebpf: &mut Ebpf, name: &str| -> Result<Map, Unavailable> {
            ebpf.take_map(name).ok_or_else(|| Unavailable::LoadFailed(format!("object has no map {name}")))
        };
        let load_err = |e: &dyn std::fmt::Display| Unavailable::LoadFailed(e.to_string());
        let mut pins = match &settings.pin_path {
            Some(dir) => Some(Pins::prepare(dir, settings.keep_pinned).map_err(Unavailable::LoadFailed)?),
            None => None,
        };
        let mut take = |ebpf: &mut Ebpf, name: &str, file: &str| -> Result<Map, Unavailable> {
            let map = take(ebpf, name)?;
            if let Some(p) = pins.as_mut() {
                p.pin(file, |path| map.pin(path).map_err(|e| format!("{e:#}"))).map_err(Unavailable::LoadFailed)?;
            }
            Ok(map)
        };
        let mut config: Array<MapData, KernelConfig> =
            Array::try_from(take(&mut ebpf, MAP_CONFIG, "config")?).map_err(|e| load_err(&e))?;
        config.set(0, cfg, 0).map_err(|e| load_err(&e))?;
        let socks: SockHash<MapData, u64> =
            SockHash::try_from(take(&mut ebpf, MAP_SOCKS, "socks")?).map_err(|e| load_err(&e))?;
        let index_map = take(&mut ebpf, MAP_SLOT_INDEX, "slot_index")?;
        let Map::HashMap(index_data) = &index_map else {
            return Err(Unavailable::LoadFailed("SLOT_INDEX is not a hash map".into()));
        };
        let index_fd = index_data.fd().as_fd().try_clone_to_owned().map_err(|e| load_err(&e))?;
        let index: HashMap<MapData, u64, u32> = HashMap::try_from(index_map).map_err(|e| load_err(&e))?;
        let Map::Array(slots_data) = take(&mut ebpf, MAP_SLOTS, "slots")? else {
            return Err(Unavailable::LoadFailed("SLOTS is not an array".into()));
        };
        let slots = SlotTable::map(&slots_data, sockets).map_err(|e| load_err(&format!("mmap SLOTS: {e}")))?;
        let Map::RingBuf(wake) = take(&mut ebpf, MAP_WAKE, "wake")? else {
            return Err(Unavailable::LoadFailed("WAKE is not a ring buffer".into()));
        };
        let wake_fd = wake.fd().as_fd().try_clone_to_owned().map_err(|e| load_err(&e))?;
        let wakeups = crate::kernel::wake::Wakeups::new(wake).map_err(|e| load_err(&format!("epoll for WAKE: {e}")))?;
        wakeups.read_ring().map_err(|e| load_err(&format!("epoll for WAKE: {e}")))?;
        // The maps taken above must stay open until the program is loaded:
        // its instructions refer to their fds.
        let prog: &mut SkSkb = ebpf
            .program_mut(PROG_VERDICT)
            .ok_or_else(|| load_err(&"object has no verdict program"))?
            .try_into()
            .map_err(|e| load_err(&e))?;
        prog.load().map_err(|e| load_err(&format!("{e:#}")))?;
        if let Some(p) = pins.as_mut() {
            p.pin("verdict", |path| prog.pin(path).map_err(|e| format!("{e:#}"))).map_err(Unavailable::LoadFailed)?;
        }
        match attach {
            Attach::StreamVerdict => {
                let link = prog.attach(socks.fd()).map_err(|e| load_err(&format!("{e:#}")))?;
                keep_attached(prog, link)?;
            }
            Attach::SkbVerdict => {
                let fd = prog.fd().map_err(|e| load_err(&e))?;
                attach_raw(fd.as_fd(), socks.fd().as_fd(), BPF_SK_SKB_VERDICT)
                    .map_err(|e| load_err(&format!("BPF_PROG_ATTACH(BPF_SK_SKB_VERDICT): {e}")))?;
            }
            Attach::Parser => {
                let link = prog.attach(socks.fd()).map_err(|e| load_err(&format!("{e:#}")))?;
                keep_attached(prog, link)?;
                let parser: &mut SkSkb = ebpf
                    .program_mut(PROG_PARSER)
                    .ok_or_else(|| load_err(&"object has no parser program"))?
                    .try_into()
                    .map_err(|e| load_err(&e))?;
                parser.load().map_err(|e| load_err(&format!("{e:#}")))?;
                let link = parser.attach(socks.fd()).map_err(|e| load_err(&format!("{e:#}")))?;
                keep_attached(parser, link)?;
            }
        }
        if attach != Attach::StreamVerdict {
            warn!(
                ?attach,
                "experiment: verdict attached as GATEWAY_EXPERIMENT_SK_SKB says (benchmark comparisons only)"
            );
        }
        info!(
            max_flows,
            trim_overlaps = cfg.cb_offset != 0,
            max_queued_per_flow = flow_control.map_or(0, |f| f.per_flow),
            max_queued_total = flow_control.map_or(0, |f| f.total),
            "kernel path ready: sk_skb verdict attached to SOCKHASH"
        );
        if let Some(p) = &pins {
            info!(dir = %p.dir.display(), keep_pinned = p.keep, "maps and verdict pinned");
        }
        let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().map_err(|e| load_err(&e));
        let handover_fds = [dup(socks.fd().as_fd())?, dup(index_fd.as_fd())?, dup(slots_data.fd().as_fd())?, wake_fd];
        Ok(Self {
            pins: Mutex::new(pins),
            _ebpf: Some(ebpf),
            _kept: (Some(config), slots_data),
            handover_fds,
            wakeups,
            maps: Mutex::new(Maps {
                socks,
                index,
                free: (0..sockets).collect(),
                foreign: Default::default(),
                sealed: false,
                active: Default::default(),
                high_water: 0,
                buffers_for: 0,
            }),
            slots,
            max_flows,
            trim: cfg.cb_offset != 0,
            flow_control,
            settings_bounded: settings.max_queued_per_flow > 0,
        })
    }

    /// Removes the pins this daemon made (unless `kernel.keep_pinned`); a pin
    /// another daemon has since replaced (hot upgrade) is left alone.
    pub fn unpin(&self) {
        if let Some(p) = self.pins.locked().take() {
            p.remove();
        }
    }

    /// Where the maps are pinned, if they are.
    pub fn pinned_at(&self) -> Option<std::path::PathBuf> {
        self.pins.locked().as_ref().map(|p| p.dir.clone())
    }

    /// Puts both sockets in the SOCKHASH. From here on the verdict forwards
    /// what they receive; bytes that arrived before are forwarded when the
    /// caller next reads the socket (see [`crate::dataplane::splice`]).
    pub fn splice(&self, client: &impl AsRawFd, backend: &impl AsRawFd) -> Result<Splice, Unavailable> {
        let insert_err = |e: &dyn std::error::Error| {
            let mut msg = e.to_string();
            let mut src = e.source();
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            Unavailable::InsertFailed(msg)
        };
        // One TCP_INFO per socket: its state, and the acked count the flow's
        // byte accounting starts from.
        let established = |fd: i32, side| match sys::tcp_info(&fd) {
            Ok(i) if i.state == sys::TCP_ESTABLISHED => Ok(i),
            _ => Err(Unavailable::NotEstablished(side)),
        };
        let client_info = established(client.as_raw_fd(), "client")?;
        let backend_info = established(backend.as_raw_fd(), "backend")?;
        let cc = sys::socket_cookie(client).map_err(|e| insert_err(&e))?;
        let bc = sys::socket_cookie(backend).map_err(|e| insert_err(&e))?;
        // Nothing is redirected into either socket before `enabled` is set below.
        let client_acked = client_info.bytes_acked;
        let backend_acked = backend_info.bytes_acked;
        let client_sent_base = client_acked + sys::outq(client).map_err(|e| insert_err(&e))?;
        let backend_sent_base = backend_acked + sys::outq(backend).map_err(|e| insert_err(&e))?;
        if self.settings_bounded && self.flow_control.is_none() {
            return Err(Unavailable::NoFlowControl);
        }
        let mut maps = self.maps.locked();
        if maps.free.len() < 2 || maps.sealed {
            return Err(Unavailable::MapFull(self.max_flows));
        }
        let high_water = match self.flow_control {
            Some(fc) => {
                let share = stepped(fc.share(maps.active.len() / 2 + 1), fc.per_flow);
                if share < MIN_HIGH_WATER.min(fc.per_flow) {
                    return Err(Unavailable::QueueCap(fc.total));
                }
                // The flow's share of the cap also sizes its socket buffers.
                size_buffers(&[client.as_raw_fd(), backend.as_raw_fd()], share);
                high_water(share)
            }
            None => 0,
        };
        let cs = maps.free.pop_front().expect("two free slots, checked above");
        let bs = maps.free.pop_front().expect("two free slots, checked above");
        // SAFETY: the slots are free, so no verdict writes them (no index
        // entry names them, and a stale lookup finds another owner).
        unsafe {
            ptr::write_volatile(
                self.slots.slot(cs),
                SockSlot {
                    owner_cookie: cc,
                    peer_cookie: bc,
                    acked_base: client_acked,
                    high_water,
                    ..Default::default()
                },
            );
            ptr::write_volatile(
                self.slots.slot(bs),
                SockSlot {
                    owner_cookie: bc,
                    peer_cookie: cc,
                    acked_base: backend_acked,
                    high_water,
                    ..Default::default()
                },
            );
        }
        let splice = Splice {
            client_cookie: cc,
            backend_cookie: bc,
            client_slot: cs,
            backend_slot: bs,
            client_sent_base,
            backend_sent_base,
        };
        let result = (|| {
            maps.index.insert(cc, cs, 0).map_err(|e| insert_err(&e))?;
            maps.index.insert(bc, bs, 0).map_err(|e| insert_err(&e))?;
            // The backend first: once the client is in, its bytes go to the backend.
            maps.socks.insert(bc, backend.as_raw_fd(), 0).map_err(|e| insert_err(&e))?;
            maps.socks.insert(cc, client.as_raw_fd(), 0).map_err(|e| insert_err(&e))?;
            Ok(())
        })();
        if let Err(e) = result {
            Self::unlink(&mut maps, &splice);
            self.disown(cs);
            self.disown(bs);
            maps.free.extend([cs, bs]);
            // A peer's FIN between the state check above and the insert
            // (the sockmap takes established sockets only): the flow is not
            // broken, just no longer a candidate for the kernel path.
            for (fd, side) in [(client.as_raw_fd(), "client"), (backend.as_raw_fd(), "backend")] {
                if sys::tcp_info(&fd).is_ok_and(|i| i.state != sys::TCP_ESTABLISHED) {
                    return Err(Unavailable::NotEstablished(side));
                }
            }
            return Err(e);
        }
        maps.active.extend([(cs, client.as_raw_fd()), (bs, backend.as_raw_fd())]);
        self.rebalance(&mut maps);
        // Below its own share when the others' bound was not raised yet.
        self.write_high_water(&maps, [cs, bs]);
        drop(maps);
        // Both sockets are in the map: let the verdict redirect.
        for s in [cs, bs] {
            // SAFETY: `enabled` is a user-space-owned field of a slot we own.
            unsafe { ptr::write_volatile(&raw mut (*self.slots.slot(s)).enabled, 1) };
        }
        debug!(client_cookie = cc, backend_cookie = bc, "spliced");
        Ok(splice)
    }

    fn unlink(maps: &mut Maps, s: &Splice) {
        for c in [s.client_cookie, s.backend_cookie] {
            let _ = maps.socks.remove(&c);
            let _ = maps.index.remove(&c);
        }
    }

    /// Frees both sockets' slots. Call right before closing the sockets:
    /// only the index entries go here (the verdict then passes whatever
    /// still arrives), the close itself takes a socket out of the SOCKHASH.
    /// Sealed (handed over), the slots stay out of the free list: owner 0
    /// tells the daemon that took over that they are its to take.
    pub fn release(&self, s: &Splice) {
        let mut maps = self.maps.locked();
        for c in [s.client_cookie, s.backend_cookie] {
            let _ = maps.index.remove(&c);
        }
        maps.active.remove(&s.client_slot);
        maps.active.remove(&s.backend_slot);
        self.disown(s.client_slot);
        self.disown(s.backend_slot);
        if !maps.sealed {
            maps.free.extend([s.client_slot, s.backend_slot]);
        }
        self.rebalance(&mut maps);
    }

    /// A flow handed to the next daemon: its slots and index entries go on
    /// there, untouched; this daemon only stops counting them.
    pub fn forget(&self, s: &Splice) {
        let mut maps = self.maps.locked();
        maps.active.remove(&s.client_slot);
        maps.active.remove(&s.backend_slot);
    }

    /// Frees a slot whose flow this daemon will not release itself: its
    /// owner's index entry (if it still names the slot) goes, then the owner.
    fn free_in_place(&self, maps: &mut Maps, i: u32) {
        let owner = self.slots.read(i).owner_cookie;
        if owner != 0 && maps.index.get(&owner, 0).ok() == Some(i) {
            let _ = maps.index.remove(&owner);
        }
        self.disown(i);
    }

    /// Marks a slot free (owner 0); after its index entry is gone.
    fn disown(&self, i: u32) {
        // SAFETY: `owner_cookie` is a user-space-owned field; the slot is ours
        // (live or being released under the maps lock).
        unsafe { ptr::write_volatile(&raw mut (*self.slots.slot(i)).owner_cookie, 0) };
    }

    /// At exit of a daemon that handed over: every slot it still holds is
    /// released for the next daemon (its sockets close with the process).
    pub fn leave(&self) {
        let mut maps = self.maps.locked();
        if !maps.sealed {
            return;
        }
        let live: Vec<u32> = maps.active.keys().copied().collect();
        for i in live {
            self.free_in_place(&mut maps, i);
        }
        maps.active.clear();
    }

    /// The predecessor has sealed its maps (hot upgrade): every slot that is
    /// neither free nor live here runs one of its flows, and becomes ours
    /// once released (`sweep`).
    pub fn predecessor_sealed(&self) {
        let mut maps = self.maps.locked();
        let known: std::collections::BTreeSet<u32> = maps.free.iter().chain(maps.active.keys()).copied().collect();
        maps.foreign = (0..self.slots.len).filter(|i| !known.contains(i)).collect();
        drop(maps);
        self.sweep();
    }

    /// Takes the foreign slots whose owner released them. Returns how many
    /// are still foreign. Nothing while this daemon is sealed itself: then
    /// they are its successor's to take.
    pub fn sweep(&self) -> usize {
        let mut maps = self.maps.locked();
        if maps.sealed {
            return 0;
        }
        let released: Vec<u32> = maps
            .foreign
            .iter()
            .copied()
            .filter(|&i| !maps.active.contains_key(&i) && self.slots.read(i).owner_cookie == 0)
            .collect();
        for i in &released {
            maps.foreign.remove(i);
        }
        if !released.is_empty() {
            debug!(slots = released.len(), "slots released by a previous daemon taken back");
        }
        maps.free.extend(released);
        maps.foreign.len()
    }

    /// Slots offered to a successor that is gone without confirming: only
    /// it could have used them, and its sockets closed with it. Index
    /// entries its flows left are removed.
    pub fn reclaim(&self, offered: &[u32]) {
        let mut maps = self.maps.locked();
        for &i in offered {
            self.free_in_place(&mut maps, i);
        }
        if !maps.sealed {
            maps.free.extend(offered.iter().copied());
        }
    }

    /// Free slots, and slots a previous daemon's flows still hold.
    pub fn slots_free(&self) -> (usize, usize) {
        let maps = self.maps.locked();
        (maps.free.len(), maps.foreign.len())
    }

    /// Shares the global cap among the live flows: when their number changes
    /// the bound, it is rewritten in every live slot.
    fn rebalance(&self, maps: &mut Maps) {
        let Some(fc) = self.flow_control else { return };
        let share = stepped(fc.share(maps.active.len() / 2), fc.per_flow);
        let Some(hw) = next_high_water(maps.high_water, high_water(share)) else {
            return;
        };
        maps.high_water = hw;
        let live: Vec<u32> = maps.active.keys().copied().collect();
        self.write_high_water(maps, live);
        let share = hw * 2;
        // Resize the live sockets' buffers too, when the share moved by more
        // than a quarter (each resize is two syscalls per socket).
        let last = maps.buffers_for;
        if last == 0 || share * 4 < last * 3 || share * 3 > last * 4 {
            maps.buffers_for = share;
            let fds: Vec<i32> = maps.active.values().copied().collect();
            size_buffers(&fds, share);
        }
    }

    /// Writes the current bound into these live slots (under the maps lock).
    fn write_high_water(&self, maps: &Maps, slots: impl IntoIterator<Item = u32>) {
        if self.flow_control.is_none() {
            return;
        }
        for i in slots {
            // SAFETY: `high_water` is a user-space-owned field of a live slot.
            unsafe { ptr::write_volatile(&raw mut (*self.slots.slot(i)).high_water, maps.high_water) };
        }
    }

    /// While a slot is not enabled the verdict passes its bytes to user space.
    /// Watches a spliced flow's sockets for what the supervisor must handle
    /// while the verdict redirects (see [`crate::kernel::wake`]).
    pub fn watch(&self, s: &Splice, client: i32, backend: i32) -> io::Result<crate::kernel::wake::Watch> {
        self.wakeups.watch([s.client_slot, s.backend_slot], [client, backend])
    }

    pub fn set_enabled(&self, i: u32, on: bool) {
        // SAFETY: `enabled` is a user-space-owned field of a slot this flow owns.
        unsafe { ptr::write_volatile(&raw mut (*self.slots.slot(i)).enabled, u32::from(on)) };
    }

    pub fn slot(&self, i: u32) -> SockSlot {
        self.slots.read(i)
    }

    /// Records that user space wrote `n` more of this socket's passed bytes to its peer.
    pub fn add_user_forwarded(&self, i: u32, n: u64) {
        let p = self.slots.slot(i);
        // SAFETY: `user_fwd` is written by user space only, by this flow's task only.
        unsafe {
            let f = &raw mut (*p).user_fwd;
            ptr::write_volatile(f, ptr::read_volatile(f) + n);
        }
    }

    /// Entries in use, for leak checks: (sockhash entries, index entries, slots in use).
    pub fn usage(&self) -> (usize, usize, usize) {
        let maps = self.maps.locked();
        let socks = maps.socks.keys().filter(Result::is_ok).count();
        let index = maps.index.keys().filter(Result::is_ok).count();
        (socks, index, self.slots.len as usize - maps.free.len())
    }

    /// WAKE records read, passes noticed only at a periodic check, and reads
    /// that found the ring nearly full (every flow re-checked).
    pub fn wakeups(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let w = &self.wakeups;
        (w.delivered.load(Relaxed), w.late.load(Relaxed), w.overflows.load(Relaxed))
    }

    /// Whether this daemon reads the verdict's wake-ups (see [`crate::kernel::wake`]).
    pub fn wakeups_reading(&self) -> bool {
        self.wakeups.reading()
    }

    /// A supervisor found a pass at its periodic check, not woken for it.
    pub fn late_wakeup(&self) {
        self.wakeups.late.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn max_flows(&self) -> u32 {
        self.max_flows
    }
}

/// Sizes the socket buffers of a kernel flow from its share of the cap (the
/// kernel doubles the values given):
/// - receive buffers, half the share: bytes passed to user space are charged
///   there, which then closes the window (autotuning would let it reach
///   tcp_rmem[2]); the sockmap queue holds the other half ([`high_water`]),
///   so a direction takes at most its share from its sender beyond what a
///   plain proxy would;
/// - send buffers, half the share too, where autotuning would stop at
///   tcp_wmem[2] (4 MiB here): the kernel's worker, finding the buffer full,
///   retries only a tick (4 ms here) later, and meanwhile the sockmap queue
///   fills and the flow pauses (16 MiB WebSocket echoes: 40 MB of 145 MB
///   relayed with autotuning, 13 MB with this). The supervisor grows one
///   further only while its receiver keeps up (`splice::grow_for_passed`).
fn size_buffers(fds: &[i32], share: u64) {
    let buf = (share / 4).clamp(32 * 1024, 16 << 20);
    let snd = (share / 4).max(32 * 1024);
    for fd in fds {
        let _ = sys::set_rcvbuf(fd, buf as usize);
        let _ = sys::set_sndbuf_force(fd, snd);
    }
}

/// Forwards the kernel programs' aya-log records to the daemon's log.
fn spawn_ebpf_logger(ebpf: &mut Ebpf) {
    match aya_log::EbpfLogger::init(ebpf) {
        // SAFETY: the logger owns its ring/perf buffer fd and never replaces it.
        Ok(logger) => match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
        {
            Ok(mut fd) => {
                tokio::spawn(async move {
                    loop {
                        let Ok(mut guard) = fd.readable_mut().await else {
                            break;
                        };
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                });
            }
            Err(e) => warn!("kernel program log not forwarded: {e}"),
        },
        Err(e) => warn!("kernel program log not forwarded: {e}"),
    }
}

/// The BPF filesystem's magic number (statfs f_type).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Pinned objects of `kernel.pin_path`, each with the (device, inode) it got.
pub struct Pins {
    dir: std::path::PathBuf,
    keep: bool,
    made: Vec<(std::path::PathBuf, (u64, u64))>,
}

impl Pins {
    /// Checks that `dir` is on a BPF filesystem (mounting one on
    /// /sys/fs/bpf when `dir` is under it and nothing is mounted there, as
    /// the boot here does not), and creates it.
    fn prepare(dir: &std::path::Path, keep: bool) -> Result<Self, String> {
        let default = std::path::Path::new("/sys/fs/bpf");
        if dir.starts_with(default) && !on_bpffs(default) {
            sys::mount_bpffs(default).map_err(|e| {
                format!("kernel.pin_path: /sys/fs/bpf is not a BPF filesystem and mounting one failed ({e}); run `mount -t bpf bpf /sys/fs/bpf`")
            })?;
            info!("mounted a BPF filesystem on /sys/fs/bpf for kernel.pin_path");
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("kernel.pin_path: cannot create {}: {e}", dir.display()))?;
        if !on_bpffs(dir) {
            return Err(format!(
                "kernel.pin_path: {} is not on a BPF filesystem; mount one (mount -t bpf bpf DIR) or use /sys/fs/bpf/...",
                dir.display()
            ));
        }
        Ok(Pins { dir: dir.to_path_buf(), keep, made: Vec::new() })
    }

    /// Pins one object as `dir/name`, replacing a pin left by an earlier
    /// daemon (kept pins, or a hot upgrade's predecessor).
    fn pin(&mut self, name: &str, pin: impl FnOnce(&std::path::Path) -> Result<(), String>) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        let path = self.dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path)
                .map_err(|e| format!("kernel.pin_path: cannot replace {}: {e}", path.display()))?;
        }
        pin(&path).map_err(|e| format!("kernel.pin_path: pinning {}: {e}", path.display()))?;
        let id = std::fs::metadata(&path).map(|m| (m.dev(), m.ino())).map_err(|e| e.to_string())?;
        self.made.push((path, id));
        Ok(())
    }

    fn remove(self) {
        use std::os::unix::fs::MetadataExt;
        if self.keep {
            info!(dir = %self.dir.display(), "kernel.keep_pinned: maps and verdict stay pinned");
            return;
        }
        for (path, id) in &self.made {
            if std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == *id) {
                if let Err(e) = std::fs::remove_file(path) {
                    warn!(path = %path.display(), "cannot remove a pin: {e}");
                }
            }
        }
        // Only if empty: another daemon may pin there too.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn on_bpffs(path: &std::path::Path) -> bool {
    sys::fs_type(path).is_ok_and(|t| t == BPF_FS_MAGIC)
}

/// Drops aya's handle on an attachment without detaching: the verdict stays
/// attached to SOCKS for as long as SOCKS lives, also past this process when
/// a hot upgrade has handed the map on. (Without user references the kernel
/// frees the map and releases the program with it.)
fn keep_attached(prog: &mut SkSkb, link: aya::programs::sk_skb::SkSkbLinkId) -> Result<(), Unavailable> {
    let link = prog.take_link(link).map_err(|e| Unavailable::LoadFailed(e.to_string()))?;
    std::mem::forget(link);
    Ok(())
}

/// Descriptors a hot upgrade hands over: SOCKS, SLOT_INDEX, SLOTS, WAKE.
pub const HANDOVER_FDS: usize = 4;

/// Size of the WAKE ring for `sockets` slots: room for several records per
/// socket (a record takes 16 bytes), a power of two, at least the default.
fn wake_ring_bytes(sockets: u32) -> u32 {
    (sockets.saturating_mul(64)).next_power_of_two().max(gateway_common::WAKE_RING_BYTES)
}

/// What a new daemon needs to adopt this one's kernel maps (hot upgrade).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Handover {
    /// `SHARED_LAYOUT` and the size of a slot, of the daemon that offers
    /// its maps (0: one from before either was sent).
    #[serde(default)]
    pub layout: u32,
    #[serde(default)]
    pub slot_size: u32,
    pub max_flows: u32,
    pub trim: bool,
    pub flow_control: Option<(u64, u64)>,
    pub settings_bounded: bool,
    /// Slots the next daemon may use.
    pub free: Vec<u32>,
}

impl KernelPath {
    /// The maps' descriptors (SOCKS, SLOT_INDEX, SLOTS, WAKE) and what goes with
    /// them, with half of the free slots: the next daemon's, from now on.
    pub fn handover(&self) -> (Handover, Vec<std::os::fd::BorrowedFd<'_>>) {
        use std::os::fd::AsFd;
        let mut maps = self.maps.locked();
        let keep = maps.free.len() / 2;
        let given: Vec<u32> = maps.free.split_off(keep).into();
        let info = Handover {
            layout: gateway_common::SHARED_LAYOUT,
            slot_size: std::mem::size_of::<SockSlot>() as u32,
            max_flows: self.max_flows,
            trim: self.trim,
            flow_control: self.flow_control.map(|f| (f.per_flow, f.total)),
            settings_bounded: self.settings_bounded,
            free: given,
        };
        (info, self.handover_fds.iter().map(AsFd::as_fd).collect())
    }

    /// Takes over a predecessor's maps (its verdict stays attached to
    /// SOCKS): flows it hands over keep their slots, new flows take the
    /// slots it did not use.
    pub fn adopt(info: &Handover, fds: Vec<std::os::fd::OwnedFd>) -> Result<Self, AdoptError> {
        use std::os::fd::AsFd;
        let ours = (gateway_common::SHARED_LAYOUT, std::mem::size_of::<SockSlot>() as u32);
        if (info.layout, info.slot_size) != ours {
            return Err(AdoptError::Layout { theirs: (info.layout, info.slot_size), ours });
        }
        let fds: [std::os::fd::OwnedFd; HANDOVER_FDS] =
            fds.try_into().map_err(|fds: Vec<_>| AdoptError::Descriptors(fds.len()))?;
        let dup = |fd: &std::os::fd::OwnedFd| {
            fd.as_fd().try_clone_to_owned().map_err(|e| AdoptError::Io("duplicating a map descriptor", e))
        };
        let handover_fds = [dup(&fds[0])?, dup(&fds[1])?, dup(&fds[2])?, dup(&fds[3])?];
        let [socks, index, slots, wake] = fds;
        let map = |name| move |e| AdoptError::Map(name, e);
        let socks = MapData::from_fd(socks).map_err(map("SOCKS"))?;
        let index = MapData::from_fd(index).map_err(map("SLOT_INDEX"))?;
        let slots_data = MapData::from_fd(slots).map_err(map("SLOTS"))?;
        let socks: SockHash<MapData, u64> = SockHash::try_from(Map::SockHash(socks)).map_err(map("SOCKS"))?;
        let index: HashMap<MapData, u64, u32> = HashMap::try_from(Map::HashMap(index)).map_err(map("SLOT_INDEX"))?;
        let sockets = info.max_flows.saturating_mul(2);
        let slots = SlotTable::map(&slots_data, sockets).map_err(|e| AdoptError::Io("mmap SLOTS", e))?;
        let wake = MapData::from_fd(wake).map_err(map("WAKE"))?;
        let wakeups = crate::kernel::wake::Wakeups::new(wake).map_err(|e| AdoptError::Io("epoll for WAKE", e))?;
        let free: std::collections::VecDeque<u32> = info.free.iter().copied().collect();
        info!(max_flows = info.max_flows, free_slots = free.len(), "kernel path adopted from the previous daemon");
        Ok(Self {
            pins: Mutex::new(None),
            _ebpf: None,
            _kept: (None, slots_data),
            handover_fds,
            wakeups,
            maps: Mutex::new(Maps {
                socks,
                index,
                free,
                sealed: false,
                foreign: Default::default(),
                active: Default::default(),
                high_water: 0,
                buffers_for: 0,
            }),
            slots,
            max_flows: info.max_flows,
            trim: info.trim,
            flow_control: info.flow_control.map(|(per_flow, total)| FlowControl { per_flow, total }),
            settings_bounded: info.settings_bounded,
        })
    }

    /// Stops splicing here and gives up the remaining free slots (to the
    /// next daemon, with the flows handed over).
    pub fn seal(&self) -> Vec<u32> {
        self.wakeups.seal();
        let mut maps = self.maps.locked();
        maps.sealed = true;
        // What was foreign here is the successor's to find (it counts every
        // slot it neither got nor runs).
        maps.foreign.clear();
        std::mem::take(&mut maps.free).into()
    }

    /// Slots the previous daemon gave up, usable here now.
    pub fn add_free(&self, slots: &[u32]) {
        self.maps.locked().free.extend(slots.iter().copied());
    }

    /// The predecessor has sealed its maps (hot upgrade): the verdict's
    /// wake-ups are this daemon's to read from now on. Until then (or if
    /// that fails), flows here watch their sockets' readability.
    pub fn take_wakeups(&self) {
        if let Err(e) = self.wakeups.read_ring() {
            warn!("cannot read the verdict's wake-ups ({e}): kernel flows watch their sockets' readability");
        }
    }

    /// Counts a flow handed over by the predecessor as live (its slots were
    /// never in this daemon's free list).
    pub fn adopt_flow(&self, s: &Splice, client_fd: i32, backend_fd: i32) {
        let mut maps = self.maps.locked();
        maps.foreign.remove(&s.client_slot);
        maps.foreign.remove(&s.backend_slot);
        maps.active.extend([(s.client_slot, client_fd), (s.backend_slot, backend_fd)]);
        self.rebalance(&mut maps);
        // The predecessor's bound may not be this daemon's.
        self.write_high_water(&maps, [s.client_slot, s.backend_slot]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_share_steps_down_by_at_most_an_eighth() {
        let fc = FlowControl { per_flow: 8 * MIB, total: 1 << 30 };
        // Under the cap's binding point the share is per_flow itself, even
        // when that is not a step.
        assert_eq!(stepped(fc.share(10), fc.per_flow), 8 * MIB);
        assert_eq!(stepped(5_000_000, 5_000_000), 5_000_000);
        let mut changes = 0;
        let mut last = 0;
        for flows in 1..=8192 {
            let exact = fc.share(flows);
            let s = stepped(exact, fc.per_flow);
            assert!(s <= exact && s * 8 >= exact * 7, "{flows} flows: {s} for {exact}");
            changes += usize::from(s != last);
            last = s;
        }
        // From 64 flows (where the cap starts to bind) to 8,192 the exact
        // share takes about 8,000 values; stepped, a few dozen.
        assert!(changes < 64, "{changes} changes");
        // The minimum share is a step: a flow refused stepped would have been
        // refused exact.
        assert_eq!(stepped(MIN_HIGH_WATER, 8 * MIB), MIN_HIGH_WATER);
        assert!(stepped(MIN_HIGH_WATER + 1, 8 * MIB) >= MIN_HIGH_WATER);
    }

    #[test]
    fn the_bound_goes_down_at_once_and_up_by_a_quarter() {
        assert_eq!(next_high_water(0, 100), Some(100));
        assert_eq!(next_high_water(100, 100), None);
        assert_eq!(next_high_water(100, 90), Some(90));
        // One step back up (flows going to and fro): no rewrite.
        assert_eq!(next_high_water(90, 100), None);
        assert_eq!(next_high_water(100, 124), None);
        assert_eq!(next_high_water(100, 125), Some(125));
    }

    #[test]
    fn the_cap_holds_with_the_stepped_share() {
        let fc = FlowControl { per_flow: 8 * MIB, total: 1 << 30 };
        // Flows arriving one by one, then leaving, then arriving again: the
        // bound in the slots never lets them hold more than the cap.
        let mut hw = 0;
        let path = (1..=8192).chain((1..8192).rev()).chain(1..=4096);
        for flows in path {
            if let Some(next) = next_high_water(hw, high_water(stepped(fc.share(flows), fc.per_flow))) {
                hw = next;
            }
            assert!(2 * hw * 2 * flows as u64 <= fc.total, "{flows} flows at {hw}");
        }
    }
}
