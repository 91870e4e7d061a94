//! The kernel path: loads the sockmap verdict, owns its maps, and splices
//! socket pairs into it.
//!
//! Each spliced socket gets a [`SockSlot`] in the `SLOTS` array, which is
//! mmapped here so that the verdict's counters are read, and user space's own
//! fields written, in place.
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
use gateway_common::{KernelConfig, SockSlot, MAP_CONFIG, MAP_SLOTS, MAP_SLOT_INDEX, MAP_SOCKS, PROG_VERDICT};
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};

use crate::{btf::Btf, sys};

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
}

impl Unavailable {
    /// Short machine-readable form for stats and JSON.
    pub fn code(&self) -> &'static str {
        match self {
            Unavailable::NoObject => "no-ebpf-object",
            Unavailable::NotPrivileged => "not-privileged",
            Unavailable::LoadFailed(_) => "load-failed",
            Unavailable::MapFull(_) => "map-full",
            Unavailable::InsertFailed(_) => "insert-failed",
            Unavailable::NotEstablished(_) => "closed-before-handoff",
        }
    }
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
        Ok(Self { base: NonNull::new(p.cast()).unwrap(), len, map_len })
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
    free: Vec<u32>,
}

pub struct KernelPath {
    // Keeps the program (and its attachment to SOCKS) alive.
    _ebpf: Ebpf,
    // Maps the program uses that no other field owns.
    _kept: (Array<MapData, KernelConfig>, MapData),
    maps: Mutex<Maps>,
    slots: SlotTable,
    max_flows: u32,
    pub trim: bool,
}

/// A socket pair spliced in the kernel. Dropping it does not release the
/// slots: call [`KernelPath::release`].
#[derive(Debug)]
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
    /// Loads and attaches the programs. `max_flows` sizes the maps.
    pub fn load(max_flows: u32, trim: bool) -> Result<Self, Unavailable> {
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
            .load(OBJECT)
            .map_err(|e| Unavailable::LoadFailed(format!("{e:#}")))?;
        spawn_ebpf_logger(&mut ebpf);

        let cfg = if trim {
            match Btf::from_sys_fs()
                .and_then(|b| Ok((b.member_offset("sk_buff", "cb")?, b.member_offset("tcp_skb_cb", "seq")?)))
            {
                Ok((cb_offset, seq_offset)) => KernelConfig { cb_offset, seq_offset },
                Err(e) => {
                    warn!("overlap trimming disabled: {e}; retransmissions on lossy links may duplicate bytes");
                    KernelConfig::default()
                }
            }
        } else {
            KernelConfig::default()
        };
        let take = |ebpf: &mut Ebpf, name: &str| -> Result<Map, Unavailable> {
            ebpf.take_map(name).ok_or_else(|| Unavailable::LoadFailed(format!("object has no map {name}")))
        };
        let load_err = |e: &dyn std::fmt::Display| Unavailable::LoadFailed(e.to_string());
        let mut config: Array<MapData, KernelConfig> =
            Array::try_from(take(&mut ebpf, MAP_CONFIG)?).map_err(|e| load_err(&e))?;
        config.set(0, cfg, 0).map_err(|e| load_err(&e))?;
        let socks: SockHash<MapData, u64> =
            SockHash::try_from(take(&mut ebpf, MAP_SOCKS)?).map_err(|e| load_err(&e))?;
        let index: HashMap<MapData, u64, u32> =
            HashMap::try_from(take(&mut ebpf, MAP_SLOT_INDEX)?).map_err(|e| load_err(&e))?;
        let Map::Array(slots_data) = take(&mut ebpf, MAP_SLOTS)? else {
            return Err(Unavailable::LoadFailed("SLOTS is not an array".into()));
        };
        let slots = SlotTable::map(&slots_data, sockets).map_err(|e| load_err(&format!("mmap SLOTS: {e}")))?;
        // The maps taken above must stay open until the program is loaded:
        // its instructions refer to their fds.
        let prog: &mut SkSkb = ebpf
            .program_mut(PROG_VERDICT)
            .ok_or_else(|| load_err(&"object has no verdict program"))?
            .try_into()
            .map_err(|e| load_err(&e))?;
        prog.load().map_err(|e| load_err(&format!("{e:#}")))?;
        prog.attach(socks.fd()).map_err(|e| load_err(&format!("{e:#}")))?;
        info!(max_flows, trim_overlaps = cfg.cb_offset != 0, "kernel path ready: sk_skb verdict attached to SOCKHASH");
        Ok(Self {
            _ebpf: ebpf,
            _kept: (config, slots_data),
            maps: Mutex::new(Maps { socks, index, free: (0..sockets).rev().collect() }),
            slots,
            max_flows,
            trim: cfg.cb_offset != 0,
        })
    }

    /// Puts both sockets in the SOCKHASH. From here on the verdict forwards
    /// what they receive; bytes that arrived before are forwarded when the
    /// caller next reads the socket (see [`crate::splice`]).
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
        let established = |fd: i32| matches!(sys::tcp_info(&fd), Ok(i) if i.state == sys::TCP_ESTABLISHED);
        if !established(client.as_raw_fd()) {
            return Err(Unavailable::NotEstablished("client"));
        }
        if !established(backend.as_raw_fd()) {
            return Err(Unavailable::NotEstablished("backend"));
        }
        let cc = sys::socket_cookie(client).map_err(|e| insert_err(&e))?;
        let bc = sys::socket_cookie(backend).map_err(|e| insert_err(&e))?;
        // Nothing is redirected into either socket before `enabled` is set below.
        let client_sent_base = sys::bytes_queued_total(client).map_err(|e| insert_err(&e))?;
        let backend_sent_base = sys::bytes_queued_total(backend).map_err(|e| insert_err(&e))?;
        let mut maps = self.maps.lock().unwrap();
        if maps.free.len() < 2 {
            return Err(Unavailable::MapFull(self.max_flows));
        }
        let cs = maps.free.pop().unwrap();
        let bs = maps.free.pop().unwrap();
        // SAFETY: the slots are free, so no verdict writes them (no index entry).
        unsafe {
            ptr::write_volatile(self.slots.slot(cs), SockSlot { peer_cookie: bc, ..Default::default() });
            ptr::write_volatile(self.slots.slot(bs), SockSlot { peer_cookie: cc, ..Default::default() });
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
            maps.free.extend([cs, bs]);
            return Err(e);
        }
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

    /// Takes both sockets out of the maps and frees their slots. Call before
    /// closing the sockets.
    pub fn release(&self, s: &Splice) {
        let mut maps = self.maps.lock().unwrap();
        Self::unlink(&mut maps, s);
        maps.free.extend([s.client_slot, s.backend_slot]);
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
        let maps = self.maps.lock().unwrap();
        let socks = maps.socks.keys().filter(Result::is_ok).count();
        let index = maps.index.keys().filter(Result::is_ok).count();
        (socks, index, self.slots.len as usize - maps.free.len())
    }

    pub fn max_flows(&self) -> u32 {
        self.max_flows
    }
}

/// Forwards the kernel programs' aya-log records to the daemon's log.
fn spawn_ebpf_logger(ebpf: &mut Ebpf) {
    match aya_log::EbpfLogger::init(ebpf) {
        // SAFETY: the logger owns its ring/perf buffer fd and never replaces it.
        Ok(logger) => match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
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
