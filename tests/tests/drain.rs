//! Shutdown: SIGTERM stops accepting and lets open flows finish within
//! `drain_timeout`; a second signal exits at once.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use gateway_tests::*;

fn start(topo: &Topology, backend: SocketAddr, drain: &str) -> (Gateway, SocketAddr) {
    let listeners = format!(
        "  - name: t\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{backend}\"]\n    offload: kernel\n"
    );
    let gw = Gateway::start(topo, &GatewayConfig { listeners, extra: format!("drain_timeout: {drain}\n") });
    let addr = gw.listener("t");
    (gw, addr)
}

fn signal(gw: &Gateway, sig: i32) {
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(gw.pid() as i32, sig) }, 0);
}

fn wait_exit(gw: &mut Gateway, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = gw.child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit within {limit:?}:\n{}", gw.log_text());
        thread::sleep(Duration::from_millis(20));
    }
}

fn held_flow(topo: &Topology, gw: &Gateway, addr: SocketAddr) -> TcpStream {
    let mut s = topo.connect(addr).unwrap();
    s.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    gw.wait_for("the flow", Duration::from_secs(10), |g| g.flows().len() == 1);
    s
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn sigterm_drains_in_flight_transfers() {
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let (mut gw, addr) = start(&topo, be.addr, "30s");
    const LEN: u64 = 32 << 20;
    let s = topo.connect(addr).unwrap();
    gw.wait_for("the flow", Duration::from_secs(10), |g| g.flows().len() == 1);
    // The transfer runs while the daemon is told to stop.
    let transfer = {
        let s = s.try_clone().unwrap();
        thread::spawn(move || echo_roundtrip(&s, Pattern(8), LEN))
    };
    signal(&gw, libc::SIGTERM);
    // New clients are refused once the listener has closed...
    gw.wait_for(
        "the listener to close",
        Duration::from_secs(10),
        |_| matches!(topo.connect(addr), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
    );
    // ...while the transfer in flight completes intact.
    transfer.join().unwrap().unwrap_or_else(|e| panic!("transfer cut by the drain: {e}"));
    drop(s);
    let st = wait_exit(&mut gw, Duration::from_secs(20));
    assert!(st.success(), "{st}");
    let log = gw.log_text();
    assert!(log.contains("draining") && log.contains("all flows finished"), "{log}");
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn drain_timeout_and_second_signal_end_the_wait() {
    let topo = Topology::new();
    let be = Backend::echo(&topo);

    // An idle flow outlives a 500 ms drain: the daemon closes it and exits.
    let (mut gw, addr) = start(&topo, be.addr, "500ms");
    let mut held = held_flow(&topo, &gw, addr);
    let t0 = Instant::now();
    signal(&gw, libc::SIGTERM);
    wait_exit(&mut gw, Duration::from_secs(20));
    assert!(t0.elapsed() >= Duration::from_millis(450), "exited after {:?}, before drain_timeout", t0.elapsed());
    assert!(gw.log_text().contains("drain_timeout reached"), "{}", gw.log_text());
    assert!(read_until_closed(&mut held, Duration::from_secs(10)).map_or(true, |n| n == 0));

    // With a long drain, a second signal exits at once.
    let (mut gw, addr) = start(&topo, be.addr, "1h");
    let mut held = held_flow(&topo, &gw, addr);
    signal(&gw, libc::SIGTERM);
    gw.wait_for("the drain to start", Duration::from_secs(10), |g| g.log_text().contains("draining"));
    // The listening socket closed before the drain was logged: while a flow
    // is still open, a new client is refused at once (a balancer in front
    // retries elsewhere) rather than left in a backlog nobody reads...
    match topo.connect(addr) {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
        Ok(mut s) => {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            panic!("a client connected during the drain (then read {:?})", s.read(&mut [0u8; 1]));
        }
    }
    assert_eq!(gw.flows().len(), 1, "the held flow is still open");
    // ...and the open flow goes on.
    for msg in [b"ping", b"pong"] {
        held.write_all(msg).unwrap();
        let mut b = [0u8; 4];
        held.read_exact(&mut b).unwrap_or_else(|e| panic!("the held flow broke during the drain: {e}"));
        assert_eq!(&b, msg);
    }
    signal(&gw, libc::SIGINT);
    wait_exit(&mut gw, Duration::from_secs(10));
    assert!(gw.log_text().contains("second signal"), "{}", gw.log_text());
}

/// A BPF filesystem mounted on a directory of the test's own, unmounted
/// (which also drops what is pinned in it) on drop.
struct Bpffs(std::path::PathBuf);

impl Bpffs {
    fn mount() -> Self {
        let dir = temp_dir("bpffs");
        let st = std::process::Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir).status().unwrap();
        assert!(st.success(), "mount -t bpf bpf {}", dir.display());
        Bpffs(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `kernel.pin_path` pins the maps and the verdict while the daemon runs;
/// the exit removes them, unless `keep_pinned`. A path off a BPF filesystem
/// stops the start with the fix in the message.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn pinned_maps_go_at_exit_unless_kept() {
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let fs = Bpffs::mount();
    let listeners = format!(
        "  - name: t\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{}\"]\n    offload: kernel\n",
        be.addr
    );
    let names = ["config", "slot_index", "slots", "socks", "verdict"];
    for keep in [false, true] {
        let pin = fs.0.join(format!("gw-{keep}"));
        let extra = format!("kernel:\n  pin_path: {}\n  keep_pinned: {keep}\n", pin.display());
        let mut gw = Gateway::start(&topo, &GatewayConfig { listeners: listeners.clone(), extra });
        assert_eq!(gw.status()["pinned_at"], pin.display().to_string());
        for n in names {
            assert!(pin.join(n).exists(), "{n} is not pinned in {}", pin.display());
        }
        // Flows ride the kernel path as usual.
        let s = topo.connect(gw.listener("t")).unwrap();
        echo_roundtrip(&s, Pattern(5), 1 << 20).unwrap();
        signal(&gw, libc::SIGTERM);
        assert!(wait_exit(&mut gw, Duration::from_secs(30)).success());
        for n in names {
            assert_eq!(pin.join(n).exists(), keep, "{n} after exit with keep_pinned: {keep}");
        }
    }
    let extra = format!("kernel:\n  pin_path: {}\n", temp_dir("notbpffs").display());
    let mut gw = Gateway::spawn(&topo, &GatewayConfig { listeners, extra }, &[], &[]);
    assert!(!wait_exit(&mut gw, Duration::from_secs(30)).success());
    let log = gw.log_text();
    assert!(log.contains("is not on a BPF filesystem") && log.contains("mount -t bpf bpf"), "{log}");
}
