//! The latency study's same-host sk_msg redirect (issue 4): loads
//! `gateway-ebpf`'s `study-skmsg` object, moves this process into a cgroup of
//! its own with the sock_ops program attached, and serves a TCP echo on a
//! port whose connections the sk_msg program redirects socket to socket.
use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    thread,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, SockHash},
    programs::{CgroupAttachMode, SkMsg, SockOps},
    Ebpf,
};

const CGROUP2: &str = "/sys/fs/cgroup/unified";

pub struct SkMsgStudy {
    _ebpf: Ebpf,
    _socks: SockHash<aya::maps::MapData, [u32; 4]>,
    cgroup: PathBuf,
    home: PathBuf,
    /// The accelerated echo port on 127.0.0.1.
    port: u16,
}

/// `xtask study-skmsg SECS` (run by the bench): in a cgroup of its own, a
/// plain loopback echo and an sk_msg-redirected one, sampled interleaved;
/// prints their p50s in µs.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let secs: f64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let study = SkMsgStudy::start(root, crate::bench::serve_echo)?;
    let plain = TcpListener::bind("127.0.0.1:0")?;
    let plain_port = plain.local_addr()?.port();
    thread::spawn(move || crate::bench::serve_echo(plain));
    let mut conns = vec![crate::bench::Interleaved::tcp(plain_port)?, crate::bench::Interleaved::tcp(study.port)?];
    let lat = crate::bench::Interleaved::measure(&mut conns, secs)?;
    println!("{:.1} {:.1}", lat[0].0, lat[1].0);
    Ok(())
}

impl SkMsgStudy {
    fn start(root: &Path, serve: fn(TcpListener)) -> Result<Self> {
        let obj = root.join("gateway-ebpf/target/bpfel-unknown-none/release/study-skmsg");
        let bytes = fs::read(&obj).with_context(|| format!("{} (cargo xtask build-ebpf builds it)", obj.display()))?;
        let own = fs::read_to_string("/proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| anyhow!("no cgroup v2 entry in /proc/self/cgroup"))?;
        let home = Path::new(CGROUP2).join(rel.trim_start_matches('/'));
        let cgroup = Path::new(CGROUP2).join(format!("gateway-bench-study-{}", std::process::id()));
        fs::create_dir_all(&cgroup).with_context(|| cgroup.display().to_string())?;
        let pid = std::process::id().to_string();
        fs::write(cgroup.join("cgroup.procs"), &pid).with_context(|| format!("moving into {}", cgroup.display()))?;
        // Sockets created from here on belong to the study cgroup.
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let mut ebpf = Ebpf::load(&bytes)?;
        let mut port_map: Array<_, u32> =
            Array::try_from(ebpf.map_mut("STUDY_PORT").ok_or_else(|| anyhow!("STUDY_PORT"))?)?;
        port_map.set(0, u32::from(port), 0)?;
        let socks: SockHash<_, [u32; 4]> =
            SockHash::try_from(ebpf.take_map("STUDY_SOCKS").ok_or_else(|| anyhow!("STUDY_SOCKS"))?)?;
        let msg: &mut SkMsg =
            ebpf.program_mut("study_redirect").ok_or_else(|| anyhow!("study_redirect"))?.try_into()?;
        msg.load()?;
        msg.attach(socks.fd())?;
        let ops: &mut SockOps =
            ebpf.program_mut("study_sockops").ok_or_else(|| anyhow!("study_sockops"))?.try_into()?;
        ops.load()?;
        ops.attach(fs::File::open(&cgroup)?, CgroupAttachMode::Single)?;
        thread::spawn(move || serve(listener));
        let study = Self { _ebpf: ebpf, _socks: socks, cgroup, home, port };
        // A connection that round-trips proves the redirect does not lose data.
        study.check()?;
        Ok(study)
    }

    fn check(&self) -> Result<()> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        s.write_all(b"sk_msg study")?;
        let mut b = [0u8; 12];
        s.read_exact(&mut b)?;
        if &b != b"sk_msg study" {
            bail!("the sk_msg study echo returned {b:?}");
        }
        Ok(())
    }
}

impl Drop for SkMsgStudy {
    fn drop(&mut self) {
        let _ = fs::write(self.home.join("cgroup.procs"), std::process::id().to_string());
        let _ = fs::remove_dir(&self.cgroup);
    }
}
