//! Placements for the latency and connection-rate figures (issue 13): where
//! the client, the proxy and the backend run changes the round trip more
//! than the path does (see docs/latency.md).
//!
//! - "one process" (`bench.rs`): client and echo threads in the bench
//!   process, everything on one loopback;
//! - "three hosts" (here): client, proxy and backend in three network
//!   namespaces joined by veth pairs, each a process of its own (the echo
//!   servers and the clients are this binary's `tcp-echo`, `ws-echo`, `rr`,
//!   `ws-rr` and `crr` tasks);
//! - "busy" (`bench.rs`): the one-process placement with a bounded busy
//!   loop on every CPU.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// The proxies' side of the client link; they listen on every address.
pub const GW_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 1);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 2);
pub const GW_BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 2, 1);
pub const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 2, 2);

/// The client and backend namespaces, linked to the bench's own namespace
/// (the proxies' host) by two veth pairs; deleted on drop, with the
/// processes started in them.
pub struct Hosts {
    pub client: String,
    pub backend: String,
    procs: Vec<std::process::Child>,
}

impl Hosts {
    /// `gw` is the namespace the bench runs in (the proxies' host).
    pub fn create(gw: &str) -> Result<Self> {
        let client = format!("{gw}c");
        let backend = format!("{gw}b");
        let hosts = Hosts { client: client.clone(), backend: backend.clone(), procs: Vec::new() };
        let ip = |args: &[&str]| -> Result<()> {
            let st = Command::new("ip").args(args).status()?;
            if !st.success() {
                bail!("ip {args:?} failed");
            }
            Ok(())
        };
        for ns in [&client, &backend] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", gw, "link", "add", "bc0", "type", "veth", "peer", "name", "bc1", "netns", &client])?;
        ip(&["-n", gw, "link", "add", "bb0", "type", "veth", "peer", "name", "bb1", "netns", &backend])?;
        for (ns, dev, addr) in [
            (gw, "bc0", format!("{GW_IP}/24")),
            (client.as_str(), "bc1", format!("{CLIENT_IP}/24")),
            (gw, "bb0", format!("{GW_BACKEND_IP}/24")),
            (backend.as_str(), "bb1", format!("{BACKEND_IP}/24")),
        ] {
            ip(&["-n", ns, "addr", "add", &addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&["-n", &client, "route", "add", "default", "via", &GW_IP.to_string()])?;
        ip(&["-n", &backend, "route", "add", "default", "via", &GW_BACKEND_IP.to_string()])?;
        // Direct: the client reaches the backend through the proxies' host,
        // routed by its kernel.
        for (ns, key, value) in [
            (gw, "net.ipv4.ip_forward", "1"),
            (client.as_str(), "net.ipv4.tcp_tw_reuse", "1"),
            (client.as_str(), "net.ipv4.ip_local_port_range", "1024 65000"),
        ] {
            let st = Command::new("ip")
                .args(["netns", "exec", ns, "sysctl", "-q", "-w", &format!("{key}={value}")])
                .status()?;
            if !st.success() {
                bail!("sysctl {key} in {ns} failed");
            }
        }
        Ok(hosts)
    }

    /// Starts this binary's `task args...` in the backend namespace.
    pub fn serve(&mut self, task: &str, addr: SocketAddr, work: &Path) -> Result<()> {
        let log = std::fs::File::create(work.join(format!("backend-{task}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.backend])
            .arg(std::env::current_exe()?)
            .args([task, &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("backend {task}"))?;
        self.procs.push(child);
        Ok(())
    }

    /// Waits until `addr` accepts connections from the client host.
    pub fn wait(&self, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let st = Command::new("ip")
                .args(["netns", "exec", &self.client, "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port()))
                .stderr(Stdio::null())
                .status()?;
            if st.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nothing answers on {addr} from the client host after 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs this binary's `task args...` in the client namespace, bounded by
    /// `limit`, and returns its output's numbers.
    pub fn client(&self, task: &str, args: &[String], limit: Duration) -> Result<Vec<f64>> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.client, "timeout", &limit.as_secs().max(1).to_string()])
            .arg(std::env::current_exe()?)
            .arg(task)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("{task} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|w| w.parse().ok()).collect())
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.client, &self.backend] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Keeps every CPU busy for `secs` with a spinning thread each (bounded:
/// each stops at its deadline).
pub fn busy_cpus(secs: f64) -> Vec<std::thread::JoinHandle<()>> {
    let n = std::thread::available_parallelism().map_or(2, |n| n.get());
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    (0..n)
        .map(|_| {
            std::thread::spawn(move || {
                let mut x = 0u64;
                while Instant::now() < deadline {
                    for _ in 0..10_000 {
                        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                    }
                }
            })
        })
        .collect()
}
