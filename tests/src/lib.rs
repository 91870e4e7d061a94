//! Helpers for gateway's end-to-end tests.
//!
//! Every test builds its own three hosts as network namespaces: a client, the
//! gateway and a backend, joined by two veth pairs:
//!
//! ```text
//!   client 10.77.1.2 ── 10.77.1.1 gateway 10.77.2.1 ── 10.77.2.2 backend
//! ```
//!
//! Sockets for the client and backend roles are created by this process on
//! threads that have entered the namespace (a socket keeps the namespace it was
//! created in), so test code uses ordinary std sockets. The daemon runs as a
//! real process inside the gateway namespace.
use std::{
    fs,
    io::{self, BufRead, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

pub use serde_json::Value;

pub const CLIENT_IP: &str = "10.77.1.2";
pub const GW_CLIENT_SIDE_IP: &str = "10.77.1.1";
pub const GW_BACKEND_SIDE_IP: &str = "10.77.2.1";
pub const BACKEND_IP: &str = "10.77.2.2";
pub const GW_CLIENT_SIDE_IP6: &str = "fd77:1::1";
pub const BACKEND_IP6: &str = "fd77:2::2";

/// Tests that need root carry
/// `#[cfg_attr(not(gateway_privileged), ignore = "...")]`: `build.rs` sets
/// the cfg when the tests are built as root, or in CI, so elsewhere they are
/// reported as ignored, with the reason, never as passed. Run where they
/// are not ignored, the harness checks: without root (in CI) the test fails
/// here, saying why. Also raises the open-files limit to its hard limit.
pub fn privileged() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (network namespaces, BPF): run the README's test command as root");
    }
    raise_nofile();
}

fn raise_nofile() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: r is valid for reads and writes.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// The gateway binary under test.
pub fn gateway_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GATEWAY_BIN") {
        return p.into();
    }
    // target/<profile>/deps/<test> -> target/<profile>/gateway
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("gateway");
    assert!(p.exists(), "{} not found: build it first (cargo xtask test does)", p.display());
    p
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

static NS_SEQ: AtomicU32 = AtomicU32::new(0);

/// Three namespaces and two links; removed on drop.
pub struct Topology {
    pub client: String,
    pub gw: String,
    pub backend: String,
}

impl Topology {
    pub fn new() -> Self {
        privileged();
        let id = format!("gwt{}x{}", std::process::id(), NS_SEQ.fetch_add(1, Ordering::Relaxed));
        let t = Self { client: format!("{id}c"), gw: format!("{id}g"), backend: format!("{id}b") };
        for ns in [&t.client, &t.gw, &t.backend] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        sh(&["ip", "link", "add", "c0", "netns", &t.client, "type", "veth", "peer", "name", "g0", "netns", &t.gw]);
        sh(&["ip", "link", "add", "g1", "netns", &t.gw, "type", "veth", "peer", "name", "b0", "netns", &t.backend]);
        for (ns, dev, addr) in [
            (&t.client, "c0", "10.77.1.2/24"),
            (&t.gw, "g0", "10.77.1.1/24"),
            (&t.gw, "g1", "10.77.2.1/24"),
            (&t.backend, "b0", "10.77.2.2/24"),
        ] {
            sh(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        for (ns, dev, addr) in [
            (&t.client, "c0", "fd77:1::2/64"),
            (&t.gw, "g0", "fd77:1::1/64"),
            (&t.gw, "g1", "fd77:2::1/64"),
            (&t.backend, "b0", "fd77:2::2/64"),
        ] {
            // nodad: the address is usable at once, no duplicate-address wait.
            sh(&["ip", "-n", ns, "-6", "addr", "add", addr, "dev", dev, "nodad"]);
        }
        sh(&["ip", "-n", &t.client, "route", "add", "default", "via", GW_CLIENT_SIDE_IP]);
        sh(&["ip", "-n", &t.backend, "route", "add", "default", "via", GW_BACKEND_SIDE_IP]);
        sh(&["ip", "-n", &t.client, "-6", "route", "add", "default", "via", "fd77:1::1"]);
        sh(&["ip", "-n", &t.backend, "-6", "route", "add", "default", "via", "fd77:2::1"]);
        t
    }

    /// Runs `f` on a thread inside namespace `ns`.
    pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{ns}");
        thread::spawn(move || {
            let fd = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: fd is an open netns file; setns affects this thread only.
            let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread panicked")
    }

    /// A TCP connection from the client host.
    pub fn connect(&self, to: SocketAddr) -> io::Result<TcpStream> {
        Self::in_ns(&self.client, move || TcpStream::connect_timeout(&to, Duration::from_secs(10)))
    }

    /// A listening socket on the backend host, on a port the kernel picks.
    pub fn backend_listener(&self) -> TcpListener {
        Self::in_ns(&self.backend, || TcpListener::bind((BACKEND_IP, 0)).unwrap())
    }

    /// An IPv6 listening socket on the backend host.
    pub fn backend_listener6(&self) -> TcpListener {
        Self::in_ns(&self.backend, || TcpListener::bind((BACKEND_IP6, 0)).unwrap())
    }

    /// Command running inside a namespace (entering only its network namespace).
    pub fn cmd_in(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.client, &self.gw, &self.backend] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Deterministic pseudo-random bytes, addressable by offset, so a stream can be
/// generated and checked piecewise without holding it in memory.
#[derive(Clone, Copy)]
pub struct Pattern(pub u64);

impl Pattern {
    fn word(&self, i: u64) -> u64 {
        // splitmix64
        let mut z = self.0.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        for (k, b) in buf.iter_mut().enumerate() {
            let pos = offset + k as u64;
            *b = self.word(pos / 8).to_le_bytes()[(pos % 8) as usize];
        }
    }

    /// Writes `len` bytes of the pattern.
    pub fn send(&self, w: &mut impl Write, len: u64) -> io::Result<()> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            self.fill(off, &mut buf[..n]);
            w.write_all(&buf[..n])?;
            off += n as u64;
        }
        Ok(())
    }

    /// Reads exactly `len` bytes and checks them against the pattern; with
    /// `expect_eof`, also checks that the stream ends right after them.
    pub fn expect(&self, r: &mut impl Read, len: u64, expect_eof: bool) -> Result<(), String> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut want = vec![0u8; 256 * 1024];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            let got = r.read(&mut buf[..n]).map_err(|e| format!("read failed at byte {off} of {len}: {e}"))?;
            if got == 0 {
                return Err(format!("stream ended at byte {off} of {len}"));
            }
            self.fill(off, &mut want[..got]);
            if buf[..got] != want[..got] {
                let i = (0..got).find(|&i| buf[i] != want[i]).unwrap();
                return Err(format!("byte {} differs (stream of {len})", off + i as u64));
            }
            off += got as u64;
        }
        if expect_eof {
            match r.read(&mut buf[..1]) {
                Ok(0) => {}
                Ok(_) => return Err(format!("extra bytes after the {len} expected")),
                Err(e) => return Err(format!("expected EOF after {len} bytes, got {e}")),
            }
        }
        Ok(())
    }
}

/// Config for the daemon under test: `listeners` is YAML for the list items;
/// `extra` follows the `admin:` block, so its indented first lines extend that
/// block (`  metrics: ...`) and the rest adds top-level keys (`kernel: ...`).
pub struct GatewayConfig {
    pub listeners: String,
    pub extra: String,
}

/// A running daemon, killed on drop (its log is printed if the test failed).
pub struct Gateway {
    pub child: Child,
    pub dir: PathBuf,
    pub admin: PathBuf,
    pub log: PathBuf,
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "gateway-test-{}-{}-{}",
        tag,
        std::process::id(),
        NS_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&d).unwrap();
    d
}

impl Gateway {
    pub fn start(topo: &Topology, cfg: &GatewayConfig) -> Self {
        Self::start_with(topo, cfg, &[], &[])
    }

    /// Starts the daemon with extra environment and a wrapper command (such
    /// as `setpriv ...`) placed between `ip netns exec NS` and the binary.
    pub fn start_with(topo: &Topology, cfg: &GatewayConfig, env: &[(&str, &str)], wrapper: &[&str]) -> Self {
        let mut gw = Self::spawn(topo, cfg, env, wrapper);
        gw.wait_ready();
        gw
    }

    /// Spawns the daemon without waiting for it to be ready.
    pub fn spawn(topo: &Topology, cfg: &GatewayConfig, env: &[(&str, &str)], wrapper: &[&str]) -> Self {
        let dir = temp_dir("gw");
        if !wrapper.is_empty() {
            // The wrapped daemon may run as another user: let it create its admin socket.
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        }
        let admin = dir.join("admin.sock");
        let config = dir.join("gateway.yaml");
        fs::write(
            &config,
            format!("listeners:\n{}\nadmin:\n  socket: {}\n{}", cfg.listeners, admin.display(), cfg.extra),
        )
        .unwrap();
        let log = dir.join("gateway.log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &topo.gw]).args(wrapper).arg(gateway_bin());
        cmd.args(["run", "--config"])
            .arg(&config)
            .env("GATEWAY_LOG", std::env::var("GATEWAY_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn gateway");
        Self { child, dir, admin, log }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("gateway exited during start-up ({status}):\n{}", self.log_text());
            }
            if self.admin.exists() && self.try_request("status").is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "gateway not ready after 30 s:\n{}", self.log_text());
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Hot upgrade: a second daemon on this one's config file, started with
    /// `--takeover`; returns once it answers on the admin socket as itself.
    pub fn take_over(&self, topo: &Topology) -> Gateway {
        let log = self.dir.join(format!("gateway-takeover-{}.log", NS_SEQ.fetch_add(1, Ordering::Relaxed)));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &topo.gw])
            .arg(gateway_bin())
            .args(["run", "--takeover", "--config"])
            .arg(self.dir.join("gateway.yaml"))
            .env("GATEWAY_LOG", std::env::var("GATEWAY_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        let child = cmd.spawn().expect("spawn gateway --takeover");
        let mut gw = Gateway { child, dir: self.dir.clone(), admin: self.admin.clone(), log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = gw.child.try_wait() {
                panic!("gateway --takeover exited during start-up ({status}):\n{}", gw.log_text());
            }
            // `ip netns exec` execs the daemon: the child's pid is the daemon's.
            if gw.try_request("status").is_ok_and(|v| v["pid"] == gw.child.id()) {
                return gw;
            }
            assert!(Instant::now() < deadline, "gateway --takeover not serving after 30 s:\n{}", gw.log_text());
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `limit` for the daemon to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn try_request(&self, what: &str) -> Result<Value, String> {
        use std::os::unix::net::UnixStream;
        let mut s = UnixStream::connect(&self.admin).map_err(|e| e.to_string())?;
        s.write_all(format!("{what}\n").as_bytes()).map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
    }

    pub fn status(&self) -> Value {
        self.try_request("status").unwrap()
    }

    /// The address a listener actually bound.
    pub fn listener(&self, name: &str) -> SocketAddr {
        let st = self.status();
        let l = st["listeners"].as_array().unwrap().iter().find(|l| l["name"] == name).expect("listener");
        l["local"].as_str().unwrap().parse().unwrap()
    }

    /// `gateway flows --json`, through the CLI.
    pub fn flows(&self) -> Vec<Value> {
        let out = Command::new(gateway_bin()).args(["flows", "--json", "--socket"]).arg(&self.admin).output().unwrap();
        assert!(out.status.success(), "gateway flows failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["flows"].as_array().unwrap().clone()
    }

    /// `gateway stats --json`, through the CLI.
    pub fn stats(&self) -> Value {
        let out = Command::new(gateway_bin()).args(["stats", "--json", "--socket"]).arg(&self.admin).output().unwrap();
        assert!(out.status.success(), "gateway stats failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Waits for a live flow matching `pred` and returns it.
    pub fn wait_flow(&self, what: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
        let mut found = None;
        self.wait_for(what, Duration::from_secs(10), |g| {
            found = g.flows().into_iter().find(|f| pred(f));
            found.is_some()
        });
        found.unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open file descriptors of the daemon.
    pub fn fd_count(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    /// Bytes the daemon has read with read(2)-family calls (`rchar`); the
    /// daemon reads spliced sockets with read(2), so any byte of a kernel
    /// flow that it copied shows up here.
    pub fn rchar(&self) -> u64 {
        let io = fs::read_to_string(format!("/proc/{}/io", self.pid())).unwrap();
        io.lines().find_map(|l| l.strip_prefix("rchar: ")).unwrap().trim().parse().unwrap()
    }

    /// Context switches of all the daemon's threads so far (voluntary and
    /// not): how often it was woken or put aside.
    pub fn context_switches(&self) -> u64 {
        let mut total = 0;
        for task in fs::read_dir(format!("/proc/{}/task", self.pid())).unwrap().flatten() {
            // A thread may exit between the listing and the read.
            let Ok(status) = fs::read_to_string(task.path().join("status")) else { continue };
            for l in status.lines() {
                if let Some(v) =
                    l.strip_prefix("voluntary_ctxt_switches:").or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                {
                    total += v.trim().parse::<u64>().unwrap();
                }
            }
        }
        total
    }

    /// CPU time the daemon has used (user + system), in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the ")" that ends the command name: utime is the 12th, stime the 13th.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    /// Waits until `cond` holds, failing with `what` after `limit`.
    pub fn wait_for(&self, what: &str, limit: Duration, mut cond: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n--- gateway log ---\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until no flow, map entry or slot is left.
    pub fn wait_idle(&self) {
        self.wait_for("no flows and empty kernel maps", Duration::from_secs(10), |g| {
            let s = g.status();
            s["flows"] == 0
                && s["kernel_sockets"] == 0
                && s["kernel_index_entries"] == 0
                && s["kernel_slots_in_use"] == 0
        });
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- gateway log ({}) ---\n{}", self.log.display(), self.log_text());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A backend on the backend host: runs `handler` on a thread per connection.
pub struct Backend {
    pub addr: SocketAddr,
}

impl Backend {
    pub fn spawn(topo: &Topology, handler: impl Fn(TcpStream) + Send + Sync + Clone + 'static) -> Self {
        Self::serve(topo.backend_listener(), handler)
    }

    /// Serves `handler` on an existing listening socket.
    pub fn serve(l: TcpListener, handler: impl Fn(TcpStream) + Send + Sync + Clone + 'static) -> Self {
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { break };
                let h = handler.clone();
                thread::Builder::new().stack_size(256 * 1024).spawn(move || h(conn)).unwrap();
            }
        });
        Self { addr }
    }

    /// Echoes every byte and forwards half-close.
    pub fn echo(topo: &Topology) -> Self {
        Self::spawn(topo, |mut s| {
            let _ = echo_conn(&mut s);
        })
    }
}

pub fn echo_conn(s: &mut TcpStream) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            s.shutdown(Shutdown::Write)?;
            return Ok(total);
        }
        s.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Sends `len` pattern bytes on a clone of `s` from another thread, checks the
/// `len` echoed bytes, then half-closes and expects EOF.
pub fn echo_roundtrip(s: &TcpStream, pattern: Pattern, len: u64) -> Result<(), String> {
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || -> io::Result<()> {
        pattern.send(&mut w, len)?;
        w.shutdown(Shutdown::Write)
    });
    let mut r = s.try_clone().unwrap();
    let res = pattern.expect(&mut r, len, true);
    writer.join().unwrap().map_err(|e| format!("send failed: {e}"))?;
    res
}

/// Reads until EOF or error, returning what ended the stream.
pub fn read_until_closed(s: &mut TcpStream, limit: Duration) -> io::Result<usize> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(e) => return Err(e),
        }
    }
}

/// Path of a file in the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join(rel)
}

/// `SO_LINGER {on, 0}`: closing the socket then sends RST.
pub fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: l is a valid linger struct for the size given.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_LINGER: {}", io::Error::last_os_error());
}

/// Lossy links: the `test-lossy` tc classifier on the ingress of every veth
/// end, dropping `per_mille`/1000 of the TCP segments that carry payload.
/// GSO is turned off on the links so one drop loses one MSS, not 64 KB.
pub struct LossyLinks {
    _programs: Vec<aya::Ebpf>,
}

impl Topology {
    pub fn make_lossy(&self, per_mille: u32) -> LossyLinks {
        let obj = std::env::var_os("GATEWAY_EBPF_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_path("gateway-ebpf/target/bpfel-unknown-none/release"))
            .join("test-lossy");
        let bytes =
            fs::read(&obj).unwrap_or_else(|e| panic!("{}: {e} (cargo xtask build-ebpf builds it)", obj.display()));
        let mut programs = Vec::new();
        for (ns, devs) in [(&self.client, &["c0"][..]), (&self.gw, &["g0", "g1"][..]), (&self.backend, &["b0"][..])] {
            let bytes = bytes.clone();
            let devs: Vec<String> = devs.iter().map(|d| d.to_string()).collect();
            for d in &devs {
                sh(&["ip", "-n", ns, "link", "set", "dev", d, "gso_max_segs", "1"]);
            }
            programs.push(Self::in_ns(ns, move || {
                use aya::programs::{tc, SchedClassifier, TcAttachType};
                let mut ebpf = aya::Ebpf::load(&bytes).expect("load test-lossy");
                let mut loss: aya::maps::Array<_, u32> =
                    aya::maps::Array::try_from(ebpf.map_mut("LOSS").expect("LOSS map")).unwrap();
                loss.set(0, per_mille, 0).unwrap();
                let prog: &mut SchedClassifier = ebpf.program_mut("lossy").unwrap().try_into().unwrap();
                prog.load().unwrap();
                for d in &devs {
                    let _ = tc::qdisc_add_clsact(d);
                    prog.attach(d, TcAttachType::Ingress).unwrap_or_else(|e| panic!("attach to {d}: {e}"));
                }
                ebpf
            }));
        }
        LossyLinks { _programs: programs }
    }
}

/// TCP segments retransmitted so far by the sockets of namespace `ns`
/// (`RetransSegs` of its /proc/net/snmp).
pub fn tcp_retransmits(ns: &str) -> u64 {
    let out = Topology::cmd_in(ns, "cat").arg("/proc/net/snmp").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap_or(""), tcp.next().unwrap_or(""));
    let i = names.split_whitespace().position(|n| n == "RetransSegs").expect("RetransSegs");
    values.split_whitespace().nth(i).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// A third-party peer process (Node `ws`, Python `websockets`) running in a
/// namespace; stopped on drop.
pub struct Peer {
    pub child: Child,
    pub addr: SocketAddr,
    what: String,
}

impl Peer {
    /// Starts `program args...` in `ns` and waits for its `READY <port>` line;
    /// the peer listens on `ip`.
    pub fn start(ns: &str, ip: &str, program: &str, args: &[&str]) -> Self {
        let what = format!("{program} {}", args.join(" "));
        let mut child = Topology::cmd_in(ns, program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: {e} (scripts/setup.sh installs the test peers)"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let mut lines = io::BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            // Keep draining so the peer never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(Ok(l))) => l,
            other => {
                let _ = child.kill();
                panic!("{what} did not print READY within 30 s: {other:?}");
            }
        };
        let port: u16 = line
            .strip_prefix("READY ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("{what}: expected \"READY <port>\", got {line:?}"));
        Self { child, addr: SocketAddr::new(ip.parse().unwrap(), port), what }
    }

    /// The Node app server (`tests/peers/node/server.js`) on the backend host.
    pub fn node_server(topo: &Topology, name: &str) -> Self {
        let script = repo_path("tests/peers/node/server.js");
        let listen = format!("{BACKEND_IP}:0");
        Self::start(&topo.backend, BACKEND_IP, "node", &[script.to_str().unwrap(), "--listen", &listen, "--name", name])
    }

    /// The Python `ssl` echo server on the backend host, serving `cert`/`key`.
    pub fn tls_echo_server(topo: &Topology, cert: &Path, key: &Path) -> Self {
        let script = repo_path("tests/peers/tls_echo_server.py");
        let listen = format!("{BACKEND_IP}:0");
        let args = [
            script.to_str().unwrap(),
            "--listen",
            &listen,
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ];
        Self::start(&topo.backend, BACKEND_IP, "python3", &args)
    }

    /// The Python `websockets` echo server on the backend host.
    pub fn python_server(topo: &Topology) -> Self {
        let script = repo_path("tests/peers/ws_echo_server.py");
        let listen = format!("{BACKEND_IP}:0");
        Self::start(&topo.backend, BACKEND_IP, "python3", &[script.to_str().unwrap(), "--listen", &listen])
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.what);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a short-lived peer (client) in `ns`, bounded by `timeout(1)`, and
/// returns its exit status, stdout and stderr.
pub fn run_peer(ns: &str, program: &str, args: &[&str], limit: Duration) -> (bool, String, String) {
    let secs = limit.as_secs().max(1).to_string();
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "timeout", &secs, program])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The Python `websockets` client (`tests/peers/ws_client.py`) in the client
/// namespace; returns its JSON line (which has `error` on failure).
pub fn py_client(topo: &Topology, args: &[&str]) -> Value {
    let script = repo_path("tests/peers/ws_client.py");
    let mut all = vec![script.to_str().unwrap()];
    all.extend_from_slice(args);
    let (_, out, err) = run_peer(&topo.client, "python3", &all, Duration::from_secs(120));
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|_| panic!("ws_client.py {args:?}: no JSON line\nstdout: {out}\nstderr: {err}"))
}

/// The Node `ws` client (`tests/peers/node/client.js`) in the client namespace.
pub fn node_client(topo: &Topology, args: &[&str]) -> Value {
    let script = repo_path("tests/peers/node/client.js");
    let mut all = vec![script.to_str().unwrap()];
    all.extend_from_slice(args);
    let (_, out, err) = run_peer(&topo.client, "node", &all, Duration::from_secs(120));
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|_| panic!("client.js {args:?}: no JSON line\nstdout: {out}\nstderr: {err}"))
}

/// curl in the client namespace: returns (status code, headers, body).
pub fn curl(topo: &Topology, args: &[&str]) -> (u16, String, String) {
    let mut all = vec!["-s", "-S", "-i", "--max-time", "30"];
    all.extend_from_slice(args);
    let (_, out, err) = run_peer(&topo.client, "curl", &all, Duration::from_secs(60));
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("curl {args:?}: no response ({err})"));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

/// A long-running client peer whose stdout is read line by line and whose
/// stdin says when to go on (`ws_client.py hold` and `wait-close`).
pub struct Held {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Held {
    pub fn py_client(topo: &Topology, args: &[&str]) -> Self {
        Self::python(topo, "tests/peers/ws_client.py", args)
    }

    /// `python3 SCRIPT args...` (a path in the repository) in the client namespace.
    pub fn python(topo: &Topology, script: &str, args: &[&str]) -> Self {
        let script = repo_path(script);
        let mut child = Topology::cmd_in(&topo.client, "python3")
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 ws_client.py");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for l in io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The next line the peer prints, within `limit`.
    pub fn line(&mut self, limit: Duration) -> String {
        self.lines.recv_timeout(limit).unwrap_or_else(|e| panic!("no line from the client peer within {limit:?}: {e}"))
    }

    /// Tells the peer to go on.
    pub fn go_on(&mut self) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads an HTTP head (through the blank line) from `s`; returns it and any
/// bytes read past it.
pub fn read_http_head(s: &mut TcpStream) -> io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the end of the head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The value of header `name` in an HTTP head (case-insensitive).
pub fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// One unfragmented WebSocket frame. Clients mask (RFC 6455 §5.3).
pub fn ws_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n < 65536 => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// Reads one unmasked frame (server to client) given bytes already read.
pub fn read_ws_frame(s: &mut TcpStream, mut have: Vec<u8>) -> io::Result<(u8, Vec<u8>, Vec<u8>)> {
    let mut chunk = [0u8; 4096];
    loop {
        if have.len() >= 2 {
            let (op, len0) = (have[0] & 0x0f, (have[1] & 0x7f) as usize);
            let (hdr, len) = match len0 {
                126 if have.len() >= 4 => (4, u16::from_be_bytes([have[2], have[3]]) as usize),
                127 if have.len() >= 10 => (10, u64::from_be_bytes(have[2..10].try_into().unwrap()) as usize),
                126 | 127 => (usize::MAX, 0),
                n => (2, n),
            };
            if hdr != usize::MAX && have.len() >= hdr + len {
                let rest = have.split_off(hdr + len);
                return Ok((op, have[hdr..].to_vec(), rest));
            }
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed inside a frame"));
        }
        have.extend_from_slice(&chunk[..n]);
    }
}

/// A handshake-valid WebSocket upgrade request head.
pub fn ws_upgrade_request(path: &str, host: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// The `101` a WebSocket server answers `request_head` with.
pub fn ws_accept_response(request_head: &str) -> String {
    let key = header_value(request_head, "sec-websocket-key").expect("Sec-WebSocket-Key");
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n\r\n")
}

/// A test CA and one leaf certificate per name (P-256, valid two days),
/// made with the openssl CLI in `dir`: `ca.pem`, and `NAME.pem` /
/// `NAME.key` for each name (the name is the leaf's only DNS SAN).
pub fn test_certs(dir: &Path, names: &[&str]) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (scripts/setup.sh installs it)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=gateway test CA"]);
    run(&ca);
    for n in names {
        let (key, csr, pem, ext) = (format!("{n}.key"), format!("{n}.csr"), format!("{n}.pem"), format!("{n}.ext"));
        let subj = format!("/CN={n}");
        let mut req = vec!["req"];
        req.extend_from_slice(&ec);
        req.extend_from_slice(&["-keyout", &key, "-out", &csr, "-subj", &subj]);
        run(&req);
        fs::write(dir.join(&ext), format!("subjectAltName=DNS:{n}\n")).unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
    }
}

/// `name.pem`/`name.key` in `dir`, signed by the CA `test_certs` made
/// there, valid only from `start` to `end` (`YYYYMMDDHHMMSSZ`): certificates
/// that are expired, or not valid yet, today (`openssl ca` takes explicit dates).
pub fn dated_cert(dir: &Path, name: &str, start: &str, end: &str) {
    let db = dir.join(format!("{name}.db"));
    fs::create_dir_all(&db).unwrap();
    fs::write(db.join("index.txt"), "").unwrap();
    fs::write(db.join("serial"), "1000\n").unwrap();
    let cnf = dir.join(format!("{name}.cnf"));
    fs::write(
        &cnf,
        format!(
            "[ca]\ndefault_ca = t\n[t]\ndatabase = {d}/index.txt\nnew_certs_dir = {d}\nserial = {d}/serial\n\
             default_md = sha256\npolicy = p\nx509_extensions = x\n[p]\ncommonName = supplied\n[x]\nsubjectAltName = DNS:{name}\n",
            d = db.display()
        ),
    )
    .unwrap();
    let (key, csr, pem, subj) =
        (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("/CN={name}"));
    for args in [
        vec![
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subj,
        ],
        vec![
            "ca",
            "-batch",
            "-notext",
            "-config",
            cnf.to_str().unwrap(),
            "-cert",
            "ca.pem",
            "-keyfile",
            "ca.key",
            "-in",
            &csr,
            "-out",
            &pem,
            "-startdate",
            start,
            "-enddate",
            end,
        ],
    ] {
        let out = Command::new("openssl").args(&args).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// What [`rustls_echo`] saw.
#[derive(Debug)]
pub struct RustlsEcho {
    /// Every byte came back, in order.
    pub intact: bool,
    /// The server answered our close_notify with its own (a clean TLS close).
    pub clean_close: bool,
    pub version: String,
}

/// A rustls client connection held open, from the client host.
pub struct TlsHeld {
    s: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl TlsHeld {
    /// Connects and verifies the server as `name` against `ca`.
    pub fn connect(topo: &Topology, to: SocketAddr, ca: &Path, name: &str) -> Self {
        use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let cfg =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let name = ServerName::try_from(name.to_string()).unwrap();
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
        let sock = topo.connect(to).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        TlsHeld { s: rustls::StreamOwned::new(conn, sock) }
    }

    /// Sends `len` pattern bytes from stream offset `offset` in 16 KiB round
    /// trips through an echo; whether every byte came back, in order.
    pub fn echo(&mut self, offset: usize, len: usize) -> bool {
        let mut intact = true;
        let mut back = vec![0u8; 16 << 10];
        let mut sent = 0;
        while sent < len {
            let n = (len - sent).min(16 << 10);
            let at = offset + sent;
            let chunk: Vec<u8> = (at..at + n).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
            self.s.write_all(&chunk).unwrap();
            self.s.read_exact(&mut back[..n]).unwrap();
            intact &= back[..n] == chunk[..];
            sent += n;
        }
        intact
    }

    pub fn version(&self) -> String {
        format!("{:?}", self.s.conn.protocol_version().unwrap())
    }

    /// close_notify, then reads to the end: whether the server answered
    /// with its own (a clean TLS close).
    pub fn close(mut self) -> bool {
        self.s.conn.send_close_notify();
        self.s.flush().unwrap();
        let mut rest = Vec::new();
        matches!(self.s.read_to_end(&mut rest), Ok(0))
    }
}

/// A rustls client in this process, from the client host: verifies the
/// server as `name` against `ca`, sends `size` random-ish bytes in 16 KiB
/// round trips through an echo, then close_notify, and reads to the end.
pub fn rustls_echo(topo: &Topology, to: SocketAddr, ca: &Path, name: &str, size: usize) -> RustlsEcho {
    let mut held = TlsHeld::connect(topo, to, ca, name);
    let intact = held.echo(0, size);
    let version = held.version();
    let clean_close = held.close();
    RustlsEcho { intact, clean_close, version }
}

/// The Python `ssl` client (`tests/peers/tls_client.py`) in the client namespace.
pub fn tls_client(topo: &Topology, args: &[&str]) -> Value {
    let script = repo_path("tests/peers/tls_client.py");
    let mut all = vec![script.to_str().unwrap()];
    all.extend_from_slice(args);
    let (_, out, err) = run_peer(&topo.client, "python3", &all, Duration::from_secs(120));
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|_| panic!("tls_client.py {args:?}: no JSON line\nstdout: {out}\nstderr: {err}"))
}

/// nginx (Debian's, with the stream module) as a TCP proxy on the gateway
/// host: the third-party baseline a test compares the daemon with. Stopped
/// on drop.
pub struct Nginx {
    child: Child,
    dir: PathBuf,
    pub addr: SocketAddr,
}

impl Nginx {
    /// `proxy_pass` from a port on the gateway's client side to `backend`.
    /// The port is one the kernel picked in the gateway's namespace, which
    /// only this test uses.
    pub fn stream(topo: &Topology, backend: SocketAddr) -> Self {
        let port = Topology::in_ns(&topo.gw, || {
            TcpListener::bind((GW_CLIENT_SIDE_IP, 0)).unwrap().local_addr().unwrap().port()
        });
        let dir = temp_dir("nginx");
        let d = dir.display();
        let module = "/usr/lib/nginx/modules/ngx_stream_module.so";
        assert!(Path::new(module).exists(), "{module} missing: scripts/setup.sh installs libnginx-mod-stream");
        let conf = format!(
            "load_module {module};\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             stream {{ server {{ listen {GW_CLIENT_SIDE_IP}:{port}; proxy_pass {backend}; }} }}\n"
        );
        fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Topology::cmd_in(&topo.gw, "nginx")
            .args(["-g", "daemon off;", "-c"])
            .arg(dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .expect("nginx (scripts/setup.sh installs it)");
        let addr = SocketAddr::new(GW_CLIENT_SIDE_IP.parse().unwrap(), port);
        let mut n = Self { child, dir, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while topo.connect(addr).is_err() {
            if let Ok(Some(st)) = n.child.try_wait() {
                panic!("nginx exited ({st}): {}", fs::read_to_string(n.dir.join("stderr.log")).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "nginx not listening on {addr} after 10 s");
            thread::sleep(Duration::from_millis(20));
        }
        n.child.try_wait().unwrap();
        n
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our own child (SIGQUIT: nginx's graceful stop).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

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
