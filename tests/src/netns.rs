//! The three hosts: a client, the gateway and a backend as network
//! namespaces joined by two veth pairs (`Topology`), and the privilege check
//! every end-to-end test starts with (`privileged`).
use std::{
    fs,
    io::{self},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::Duration,
};

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

pub(crate) fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

pub(crate) static NS_SEQ: AtomicU32 = AtomicU32::new(0);

/// Three namespaces and two links; removed on drop.
pub struct Topology {
    pub client: String,
    pub gw: String,
    pub backend: String,
    /// Whether dropping it deletes the namespaces (a view into a
    /// `FleetNet` does not).
    pub(crate) owned: bool,
}

impl Topology {
    pub fn new() -> Self {
        privileged();
        let id = format!("gwt{}x{}", std::process::id(), NS_SEQ.fetch_add(1, Ordering::Relaxed));
        let t = Self { client: format!("{id}c"), gw: format!("{id}g"), backend: format!("{id}b"), owned: true };
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
        if !self.owned {
            return;
        }
        for ns in [&self.client, &self.gw, &self.backend] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
