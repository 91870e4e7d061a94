//! The gateway daemon under test: its config, its process in the gateway
//! namespace, and its admin socket.
use std::{
    fs,
    io::{Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use crate::*;

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
        Self::spawn_yaml(topo, env, wrapper, |admin, _| {
            format!("listeners:\n{}\nadmin:\n  socket: {}\n{}", cfg.listeners, admin.display(), cfg.extra)
        })
    }

    /// Starts the daemon on a whole config of the test's own: `yaml` gets the
    /// admin socket's path and the daemon's own directory.
    pub fn start_yaml(topo: &Topology, yaml: impl FnOnce(&Path, &Path) -> String) -> Self {
        let mut gw = Self::spawn_yaml(topo, &[], &[], yaml);
        gw.wait_ready();
        gw
    }

    pub fn spawn_yaml(
        topo: &Topology,
        env: &[(&str, &str)],
        wrapper: &[&str],
        yaml: impl FnOnce(&Path, &Path) -> String,
    ) -> Self {
        let dir = temp_dir("gw");
        if !wrapper.is_empty() {
            // The wrapped daemon may run as another user: let it create its admin socket.
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        }
        let admin = dir.join("admin.sock");
        let config = dir.join("gateway.yaml");
        fs::write(&config, yaml(&admin, &dir)).unwrap();
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

    /// Rewrites the config file with these listeners (the admin socket as
    /// before), for a reload.
    pub fn rewrite(&self, listeners: &str) {
        fs::write(
            self.dir.join("gateway.yaml"),
            format!("listeners:\n{listeners}\nadmin:\n  socket: {}\n", self.admin.display()),
        )
        .unwrap();
    }

    /// `gateway reload`: whether it succeeded, and what it printed.
    pub fn reload(&self) -> (bool, String) {
        let out = Command::new(gateway_bin()).args(["reload", "--socket"]).arg(&self.admin).output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
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

    /// One listener's part of `gateway stats --json`.
    pub fn listener_stats(&self, name: &str) -> Value {
        let v = self.stats();
        let found = v["listeners"].as_array().unwrap().iter().find(|l| l["name"] == name).cloned();
        found.unwrap_or_else(|| panic!("no listener {name} in the stats: {v}"))
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

/// Path of a file in the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join(rel)
}
