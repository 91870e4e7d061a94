//! The host's memory as the host sees it (`HostMem`), for bounds a test asserts.
use std::fs;

/// What the host holds, read from the host's side: `/proc/net/sockstat`
/// (TCP memory charged to sockets), `/proc/meminfo` and the page
/// allocator's per-CPU lists (`/proc/zoneinfo`).
///
/// MemAvailable alone counts the page allocator's per-CPU lists as used; they are free pages the allocator keeps per
/// CPU, and on this kernel (6.7+ tunes their size by the free pattern) they
/// grow by tens of MB when pages are freed on another CPU than the one that
/// allocated them, as the sockmap's kernel worker does.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostMem {
    pub tcp: u64,
    pub available: u64,
    pub free: u64,
    pub pcp: u64,
}

impl HostMem {
    pub fn now() -> Self {
        let kib = |text: &str, key: &str| -> u64 {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {key} in /proc/meminfo"))
                * 1024
        };
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap();
        let sockstat = fs::read_to_string("/proc/net/sockstat").unwrap();
        let tcp_pages = sockstat
            .lines()
            .find(|l| l.starts_with("TCP:"))
            .and_then(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.iter().position(|w| *w == "mem").and_then(|i| f.get(i + 1)).and_then(|v| v.parse::<u64>().ok())
            })
            .expect("TCP mem in /proc/net/sockstat");
        let zoneinfo = fs::read_to_string("/proc/zoneinfo").unwrap();
        // Each CPU's pageset of each zone: "count: N" (pages).
        let pcp_pages: u64 = zoneinfo
            .lines()
            .filter_map(|l| l.trim().strip_prefix("count:"))
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum();
        HostMem {
            tcp: tcp_pages * 4096,
            available: kib(&meminfo, "MemAvailable:"),
            free: kib(&meminfo, "MemFree:"),
            pcp: pcp_pages * 4096,
        }
    }

    /// Growth since `base`, each field saturating at 0: TCP memory, the drop
    /// of MemAvailable, and the drop of MemAvailable with the per-CPU lists
    /// counted as available (memory taken, as opposed to cached by the
    /// allocator).
    pub fn growth_since(&self, base: &HostMem) -> (u64, u64, u64) {
        (
            self.tcp.saturating_sub(base.tcp),
            base.available.saturating_sub(self.available),
            (base.available + base.pcp).saturating_sub(self.available + self.pcp),
        )
    }
}
