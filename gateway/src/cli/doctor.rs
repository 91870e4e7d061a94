//! `gateway doctor`: what this host supports for each data path, and why.
//!
//! Every check is a real probe (load the programs, open a kTLS socket, read
//! kernel BTF), not a guess from the kernel version.
use std::{io, net::TcpListener, os::fd::AsRawFd};

use serde::Serialize;

use crate::{
    config::{self, Offload},
    kernel::btf::Btf,
    kernel::sockmap::KernelPath,
    util::sys,
};

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    /// The kernel path (sockmap splice) can be used by this process.
    pub kernel_path: bool,
    /// Why not, when it can't.
    pub kernel_path_reason: Option<String>,
    /// The userspace relay works everywhere.
    pub userspace_path: bool,
    /// Listeners of the given config whose `offload: kernel` can't be honoured.
    pub unmet_kernel_offload: Vec<String>,
}

fn check(name: &'static str, ok: bool, detail: impl Into<String>) -> Check {
    Check { name, ok, detail: detail.into() }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(|e| format!("unknown ({e})"), |s| s.trim().into())
}

fn mount_of(fstype: &str) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&fstype)).then(|| f[1].to_string())
    })
}

/// kTLS: a connected TCP socket accepts `TCP_ULP "tls"` only where the tls
/// module exists.
fn ktls() -> io::Result<()> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let c = std::net::TcpStream::connect(l.local_addr()?)?;
    let _server = l.accept()?;
    let name = b"tls";
    // SAFETY: name is valid for the length given.
    let r = unsafe {
        libc::setsockopt(c.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_ULP, name.as_ptr().cast(), name.len() as u32)
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs every probe. Needs a tokio runtime (the kernel path's loader starts
/// its log reader on it).
pub fn run(cfg: Option<&config::Config>) -> Report {
    let mut checks = Vec::new();
    checks.push(check("kernel", true, kernel_release()));
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let caps = sys::effective_caps();
    let cap = |bit: u32| caps & (1 << bit) != 0;
    let names = [(21, "CAP_SYS_ADMIN"), (39, "CAP_BPF"), (38, "CAP_PERFMON"), (12, "CAP_NET_ADMIN")];
    let held: Vec<&str> = names.iter().filter(|(b, _)| cap(*b)).map(|(_, n)| *n).collect();
    let privileged = (cap(21) || (cap(39) && cap(38))) && cap(12);
    checks.push(check(
        "privileges",
        privileged,
        format!(
            "euid {euid}; holds {}{}",
            if held.is_empty() { "none of CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN".into() } else { held.join(", ") },
            if privileged { "" } else { " (the kernel path needs CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN, or root)" }
        ),
    ));
    match Btf::from_sys_fs() {
        Ok(btf) => {
            let fields = [
                ("sk_buff", "cb"),
                ("tcp_skb_cb", "seq"),
                ("tcp_sock", "bytes_acked"),
                ("tcp_sock", "write_seq"),
                ("tcp_sock", "snd_una"),
            ];
            let missing: Vec<String> = fields
                .iter()
                .filter(|(s, m)| btf.member_offset(s, m).is_err())
                .map(|(s, m)| format!("{s}.{m}"))
                .collect();
            checks.push(check(
                "btf",
                missing.is_empty(),
                if missing.is_empty() {
                    "/sys/kernel/btf/vmlinux has the fields the overlap trim and the queue bound read".to_string()
                } else {
                    format!("missing {}: overlap trim or queue bound unavailable", missing.join(", "))
                },
            ));
        }
        Err(e) => checks.push(check("btf", false, format!("{e}: no overlap trim, no queue bound"))),
    }
    let bpffs = mount_of("bpf");
    checks.push(check(
        "bpffs",
        true,
        bpffs.map_or("not mounted (not needed: nothing is pinned)".into(), |m| {
            format!("mounted at {m} (not needed: nothing is pinned)")
        }),
    ));
    let cgroup2 = mount_of("cgroup2");
    checks.push(check(
        "cgroup2",
        true,
        cgroup2.map_or("not mounted (not needed: no cgroup programs)".into(), |m| {
            format!("mounted at {m} (not needed: no cgroup programs)")
        }),
    ));
    let kernel = KernelPath::load(&config::Kernel {
        max_flows: 4,
        trim_overlaps: true,
        max_queued_per_flow: config::default_max_queued_per_flow(),
        max_queued_total: config::DEFAULT_MAX_QUEUED_TOTAL,
        pin_path: None,
        keep_pinned: false,
    });
    let (kernel_ok, kernel_reason) = match &kernel {
        Ok(k) => {
            checks.push(check(
                "sockmap",
                true,
                format!(
                    "sk_skb stream verdict loaded and attached to a SOCKHASH; overlap trim {}; queue bound {}",
                    if k.trim { "on" } else { "off" },
                    if k.flow_control.is_some() { "on" } else { "off" }
                ),
            ));
            (true, None)
        }
        Err(e) => {
            checks.push(check("sockmap", false, e.to_string()));
            (false, Some(e.to_string()))
        }
    };
    drop(kernel);
    checks.push(match ktls() {
        Ok(()) => check("ktls", true, "TCP_ULP \"tls\" available (not used: kTLS sockets can't join a sockmap)"),
        Err(e) => check(
            "ktls",
            false,
            format!("TCP_ULP \"tls\" unavailable ({e}); TLS flows the gateway decrypts stay in user space"),
        ),
    });
    let unmet_kernel_offload = match (cfg, kernel_ok) {
        (Some(c), false) => {
            c.listeners.iter().filter(|l| l.offload == Offload::Kernel).map(|l| l.name.clone()).collect()
        }
        _ => Vec::new(),
    };
    Report {
        checks,
        kernel_path: kernel_ok,
        kernel_path_reason: kernel_reason,
        userspace_path: true,
        unmet_kernel_offload,
    }
}

impl Report {
    pub fn render(&self) -> String {
        let mut o = String::new();
        for c in &self.checks {
            o += &format!("{:<5} {:<11} {}\n", if c.ok { "ok" } else { "no" }, c.name, c.detail);
        }
        o += "\ndata paths:\n";
        o += &match &self.kernel_path_reason {
            None => "  kernel     usable: flows are spliced in the kernel (offload: auto or kernel)\n".to_string(),
            Some(why) => format!("  kernel     NOT usable: {why}\n"),
        };
        o += "  userspace  usable: relay with 256 KiB buffers (offload: userspace, and the fallback)\n";
        for l in &self.unmet_kernel_offload {
            o += &format!("\nlistener {l:?} has offload: kernel, which this host can't honour: `gateway run` would refuse to start\n");
        }
        o
    }
}
