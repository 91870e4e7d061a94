//! End-to-end TCP forwarding: client, gateway and backend in three network
//! namespaces, the real daemon with the real kernel programs.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use gateway_tests::*;

fn listener(name: &str, backends: &[SocketAddr], offload: &str, extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "  - name: {name}\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    protocol: tcp\n    backends: [{}]\n    offload: {offload}\n{extra}",
        list.join(", ")
    )
}

fn start(topo: &Topology, backends: &[SocketAddr], offload: &str, extra: &str) -> (Gateway, SocketAddr) {
    let gw = Gateway::start(
        topo,
        &GatewayConfig { listeners: listener("t", backends, offload, extra), extra: String::new() },
    );
    let addr = gw.listener("t");
    if offload != "userspace" {
        assert_eq!(gw.status()["kernel_path"], true, "kernel path did not load:\n{}", gw.log_text());
    }
    (gw, addr)
}

/// The single live flow, once it has reached `path`.
fn live_flow(gw: &Gateway, path: &str) -> Value {
    let mut found = None;
    gw.wait_for(&format!("one flow on the {path} path"), Duration::from_secs(10), |g| {
        let f = g.flows();
        found = f.first().cloned();
        f.len() == 1 && f[0]["path"] == path
    });
    found.unwrap()
}

const SIZES: &[u64] = &[1, 1000, 65_536 + 7, 1 << 20, 16 << 20, 64 << 20];

fn payloads(offload: &str, path: &str) {
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let (gw, addr) = start(&topo, &[be.addr], offload, "");
    for (i, &len) in SIZES.iter().enumerate() {
        let s = topo.connect(addr).unwrap();
        let f = live_flow(&gw, path);
        echo_roundtrip(&s, Pattern(i as u64 + 1), len).unwrap_or_else(|e| panic!("{len} bytes via {path}: {e}"));
        let _ = f;
        drop(s);
        gw.wait_idle();
    }
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn payloads_each_way_kernel_path() {
    payloads("kernel", "kernel");
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn payloads_each_way_userspace_path() {
    payloads("userspace", "userspace");
}

/// Different streams each way at once, so the two directions can't mask each other.
fn both_directions(offload: &str) {
    let topo = Topology::new();
    const UP: u64 = 24 << 20;
    const DOWN: u64 = 40 << 20;
    let be = Backend::spawn(&topo, |s| {
        let mut w = s.try_clone().unwrap();
        let t = thread::spawn(move || {
            Pattern(0xD0).send(&mut w, DOWN).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut r = s;
        let res = Pattern(0xA0).expect(&mut r, UP, true);
        t.join().unwrap();
        // Report the verdict through the reverse stream's fate: a failed check resets.
        if let Err(e) = res {
            eprintln!("backend saw a bad upload: {e}");
            let _ = socket_reset(&r);
        }
    });
    let (gw, addr) = start(&topo, &[be.addr], offload, "");
    let s = topo.connect(addr).unwrap();
    let mut w = s.try_clone().unwrap();
    let t = thread::spawn(move || {
        Pattern(0xA0).send(&mut w, UP).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut r = s.try_clone().unwrap();
    Pattern(0xD0).expect(&mut r, DOWN, true).unwrap();
    t.join().unwrap();
    drop((r, s));
    gw.wait_idle();
}

/// Makes the next close of `s` (and of its clones) send RST, and closes it.
fn socket_reset(s: &TcpStream) -> std::io::Result<()> {
    set_linger_zero(s);
    s.shutdown(Shutdown::Read)
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn different_streams_both_directions_kernel_path() {
    both_directions("kernel");
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn different_streams_both_directions_userspace_path() {
    both_directions("userspace");
}

/// Bytes that reach the gateway before the splice, from both sides: the
/// daemon is told to wait before handing off, so the client's upload and the
/// backend's greeting are already queued on its sockets when it does.
fn early_data(delay_ms: u32) {
    let topo = Topology::new();
    const EARLY: u64 = 200_000;
    let be = Backend::spawn(&topo, |mut s| {
        Pattern(0xBB).send(&mut s, EARLY).unwrap();
        let _ = echo_conn(&mut s);
    });
    let cfg = GatewayConfig { listeners: listener("t", &[be.addr], "kernel", ""), extra: String::new() };
    let delay = delay_ms.to_string();
    let gw = Gateway::start_with(&topo, &cfg, &[("GATEWAY_TEST_HANDOFF_DELAY_MS", &delay)], &[]);
    let addr = gw.listener("t");
    let mut s = topo.connect(addr).unwrap();
    // Sent at once, before the gateway has even connected to the backend.
    let mut up = s.try_clone().unwrap();
    let sender = thread::spawn(move || Pattern(0xCC).send(&mut up, EARLY));
    // The greeting arrives first, then the echo of what we sent.
    Pattern(0xBB).expect(&mut s, EARLY, false).expect("server-first greeting");
    Pattern(0xCC).expect(&mut s, EARLY, false).expect("echo of the early upload");
    sender.join().unwrap().unwrap();
    let f = live_flow(&gw, "kernel");
    // More data after the splice still flows, on the kernel path.
    s.write_all(b"after").unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"after");
    assert_eq!(f["path"], "kernel");
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_until_closed(&mut s, Duration::from_secs(10)).unwrap(), 0);
    gw.wait_idle();
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn data_queued_before_handoff_both_directions() {
    early_data(300);
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn data_sent_during_handoff_both_directions() {
    early_data(0);
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn server_speaks_first() {
    let topo = Topology::new();
    let be = Backend::spawn(&topo, |mut s| {
        s.write_all(b"220 smtp.test ESMTP ready\r\n").unwrap();
        let _ = echo_conn(&mut s);
    });
    for offload in ["kernel", "userspace"] {
        let (gw, addr) = start(&topo, &[be.addr], offload, "");
        let mut s = topo.connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut greeting = [0u8; 27];
        s.read_exact(&mut greeting).unwrap_or_else(|e| panic!("{offload}: no greeting: {e}"));
        assert_eq!(&greeting, b"220 smtp.test ESMTP ready\r\n");
        s.write_all(b"EHLO x\r\n").unwrap();
        let mut reply = [0u8; 8];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"EHLO x\r\n");
        drop(s);
        gw.wait_idle();
    }
}

/// The client half-closes; the backend still answers after seeing EOF.
fn client_half_close(offload: &str) {
    let topo = Topology::new();
    let be = Backend::spawn(&topo, |mut s| {
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        // EOF seen: now answer with a large reply, proving the reverse direction lives on.
        Pattern(got.len() as u64).send(&mut s, 4 << 20).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
    });
    let (gw, addr) = start(&topo, &[be.addr], offload, "");
    let mut s = topo.connect(addr).unwrap();
    live_flow(&gw, if offload == "kernel" { "kernel" } else { "userspace" });
    let req = vec![7u8; 300_000];
    s.write_all(&req).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    Pattern(req.len() as u64).expect(&mut s, 4 << 20, true).unwrap();
    drop(s);
    gw.wait_idle();
}

/// The backend half-closes first; the client keeps sending afterwards.
fn backend_half_close(offload: &str) {
    let topo = Topology::new();
    let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let tx = std::sync::Mutex::new(tx);
    let tx = std::sync::Arc::new(tx);
    let be = Backend::spawn(&topo, move |mut s| {
        Pattern(1).send(&mut s, 1 << 20).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let r = Pattern(2).expect(&mut s, 3 << 20, true);
        tx.lock().unwrap().send(r).unwrap();
    });
    let (gw, addr) = start(&topo, &[be.addr], offload, "");
    let mut s = topo.connect(addr).unwrap();
    Pattern(1).expect(&mut s, 1 << 20, true).expect("backend's bytes, then EOF");
    // Our direction still works after the backend's FIN.
    Pattern(2).send(&mut s, 3 << 20).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    rx.recv_timeout(Duration::from_secs(20)).unwrap().expect("backend got our bytes after its FIN");
    drop(s);
    gw.wait_idle();
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn half_close_each_way_kernel_path() {
    client_half_close("kernel");
    backend_half_close("kernel");
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn half_close_each_way_userspace_path() {
    client_half_close("userspace");
    backend_half_close("userspace");
}

/// A reset from one side closes the other promptly.
fn resets(offload: &str) {
    let topo = Topology::new();
    // Client resets: the backend sees its connection end.
    let (tx, rx) = std::sync::mpsc::channel::<std::io::Result<usize>>();
    let tx = std::sync::Arc::new(std::sync::Mutex::new(tx));
    let be = Backend::spawn(&topo, move |mut s| {
        let mut first = [0u8; 5];
        s.read_exact(&mut first).unwrap();
        s.write_all(b"ready").unwrap();
        let r = read_until_closed(&mut s, Duration::from_secs(15));
        tx.lock().unwrap().send(r).unwrap();
    });
    let (gw, addr) = start(&topo, &[be.addr], offload, "");
    let mut s = topo.connect(addr).unwrap();
    s.write_all(b"hello").unwrap();
    let mut ready = [0u8; 5];
    s.read_exact(&mut ready).unwrap();
    socket_reset(&s).unwrap();
    drop(s);
    let t0 = Instant::now();
    let seen = rx.recv_timeout(Duration::from_secs(15)).expect("backend never saw the client's reset");
    assert!(t0.elapsed() < Duration::from_secs(5), "reset took {:?} to reach the backend", t0.elapsed());
    if let Err(e) = &seen {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "backend saw {e}");
    }
    gw.wait_idle();
    drop(gw);

    // Backend resets: the client sees its connection end.
    let be = Backend::spawn(&topo, |mut s| {
        let mut first = [0u8; 5];
        s.read_exact(&mut first).unwrap();
        s.write_all(b"bye").unwrap();
        socket_reset(&s).unwrap();
    });
    let (gw, addr) = start(&topo, &[be.addr], offload, "");
    let mut s = topo.connect(addr).unwrap();
    s.write_all(b"hello").unwrap();
    let t0 = Instant::now();
    let r = read_until_closed(&mut s, Duration::from_secs(15));
    assert!(r.is_ok() || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset), "client saw {r:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "reset took {:?} to reach the client", t0.elapsed());
    gw.wait_idle();
    assert!(gw.log_text().contains("backend-reset"), "close cause not logged:\n{}", gw.log_text());
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn reset_each_way_kernel_path() {
    resets("kernel");
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn reset_each_way_userspace_path() {
    resets("userspace");
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn refused_backend_is_skipped_then_client_closed() {
    let topo = Topology::new();
    // A port nothing listens on: take one and close it.
    let dead = topo.backend_listener().local_addr().unwrap();
    let be = Backend::echo(&topo);
    // The dead backend first: the client is served by the next one.
    let (gw, addr) = start(&topo, &[dead, be.addr], "kernel", "    balance: round_robin\n    connect_attempts: 2\n");
    for i in 0..4 {
        let s = topo.connect(addr).unwrap();
        echo_roundtrip(&s, Pattern(i), 10_000).unwrap();
    }
    gw.wait_idle();
    drop(gw);
    // Only dead backends: the client is closed, and the log says why.
    let (gw, addr) = start(&topo, &[dead], "kernel", "");
    let mut s = topo.connect(addr).unwrap();
    let r = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(matches!(r, Ok(0)) || r.is_err(), "client not closed: {r:?}");
    gw.wait_idle();
    let log = gw.log_text();
    assert!(log.contains("no backend answered") && log.contains(&dead.to_string()), "{log}");
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn silent_backend_hits_connect_timeout() {
    let topo = Topology::new();
    // SYNs to this address go to a MAC nobody has: no answer, no error.
    let silent: SocketAddr = "10.77.2.50:9".parse().unwrap();
    Topology::in_ns(&topo.gw, || {
        let st = std::process::Command::new("ip")
            .args(["neigh", "add", "10.77.2.50", "lladdr", "02:00:00:00:00:99", "dev", "g1", "nud", "permanent"])
            .status()
            .unwrap();
        assert!(st.success());
    });
    let (gw, addr) = start(&topo, &[silent], "auto", "    connect_timeout: 300ms\n    connect_attempts: 2\n");
    let mut s = topo.connect(addr).unwrap();
    let t0 = Instant::now();
    let r = read_until_closed(&mut s, Duration::from_secs(10));
    let took = t0.elapsed();
    assert!(matches!(r, Ok(0)) || r.is_err(), "client not closed: {r:?}");
    // Two attempts of 300 ms each, with generous slack for a busy machine.
    assert!(took >= Duration::from_millis(550), "closed after {took:?}, before two timeouts");
    gw.wait_idle();
    assert!(gw.log_text().contains("no answer within 300ms"), "{}", gw.log_text());
}

fn idle_timeout(offload: &str, path: &str) {
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let (gw, addr) = start(&topo, &[be.addr], offload, "    idle_timeout: 700ms\n");
    let mut s = topo.connect(addr).unwrap();
    // Activity keeps the flow open past the timeout...
    let mut t0 = Instant::now();
    for i in 0..6 {
        if i > 0 {
            thread::sleep(Duration::from_millis(200)); // pacing of the traffic, not synchronisation
        }
        s.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        t0 = Instant::now();
    }
    assert_eq!(live_flow(&gw, path)["path"], path);
    // ...and silence closes it.
    let r = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(matches!(r, Ok(0)), "idle flow not closed cleanly: {r:?}");
    assert!(t0.elapsed() >= Duration::from_millis(600), "closed after {:?}", t0.elapsed());
    gw.wait_idle();
    assert!(gw.log_text().contains("idle-timeout"));
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn idle_timeout_closes_kernel_flows() {
    idle_timeout("kernel", "kernel");
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn idle_timeout_closes_userspace_flows() {
    idle_timeout("userspace", "userspace");
}

/// Echoes 64 MiB through a gateway started with `offload` and `extra` config;
/// returns the flow's stats just before it closes, and the daemon's CPU ticks
/// and read(2) bytes meanwhile.
/// What the daemon did while a 64 MiB echo went both ways.
struct Spent {
    cpu_ticks: u64,
    /// Bytes it read (its rchar).
    read: u64,
    context_switches: u64,
}

fn echo_64m(offload: &str, extra: &str) -> (Value, Spent) {
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let gw = Gateway::start(
        &topo,
        &GatewayConfig { listeners: listener("t", &[be.addr], offload, ""), extra: extra.into() },
    );
    let addr = gw.listener("t");
    const LEN: u64 = 64 << 20;
    let s = topo.connect(addr).unwrap();
    let path = if offload == "userspace" { "userspace" } else { "kernel" };
    live_flow(&gw, path);
    let (cpu_before, rchar_before, switches_before) = (gw.cpu_ticks(), gw.rchar(), gw.context_switches());
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || Pattern(9).send(&mut w, LEN));
    let mut r = s.try_clone().unwrap();
    Pattern(9).expect(&mut r, LEN, false).unwrap();
    writer.join().unwrap().unwrap();
    let spent = Spent {
        cpu_ticks: gw.cpu_ticks() - cpu_before,
        read: gw.rchar() - rchar_before,
        context_switches: gw.context_switches() - switches_before,
    };
    let f = live_flow(&gw, path);
    let n = |k: &str| f[k].as_u64().unwrap();
    for dir in ["client_to_backend", "backend_to_client"] {
        assert_eq!(n(&format!("bytes_{dir}")), LEN, "{f}");
        assert_eq!(n(&format!("kernel_bytes_{dir}")) + n(&format!("user_bytes_{dir}")), LEN, "{f}");
    }
    drop((s, r));
    gw.wait_idle();
    (f, spent)
}

/// The kernel moves the bytes: its counters match what was sent, and the
/// daemon neither reports copying nor read (its rchar) any of them, nor is it
/// woken for them (each redirected skb still signals the socket readable).
/// With the default queue bound it copies only while a reader lags, and what
/// it reads matches what it reports.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn kernel_path_really_carries_the_bytes() {
    let (f, kernel) = echo_64m("kernel", "kernel:\n  max_queued_per_flow: 0\n");
    let (kernel_cpu, kernel_read) = (kernel.cpu_ticks, kernel.read);
    assert_eq!(f["kernel_bytes_client_to_backend"], 64 << 20, "{f}");
    assert_eq!(f["kernel_bytes_backend_to_client"], 64 << 20, "{f}");
    assert_eq!(f["user_bytes_client_to_backend"], 0, "{f}");
    assert_eq!(f["user_bytes_backend_to_client"], 0, "{f}");
    assert!(kernel_read < 1 << 20, "the daemon read {kernel_read} bytes while the kernel moved 128 MiB");
    // At least 2 x 1024 skbs of 64 KiB; woken for each, the daemon switched
    // about 9 times per MiB.
    let switches = kernel.context_switches;
    assert!(switches < 128, "the daemon's threads switched {switches} times while the kernel moved 128 MiB");
    let (f_user, user) = echo_64m("userspace", "");
    assert_eq!(f_user["user_bytes_client_to_backend"], 64 << 20);
    eprintln!(
        "daemon for 2 x 64 MiB: kernel path {kernel_cpu} CPU ticks, {kernel_read} bytes read, {switches} context switches; \
         userspace relay {} ticks, {} context switches",
        user.cpu_ticks, user.context_switches
    );
    let (f, Spent { read, .. }) = echo_64m("kernel", "");
    let copied =
        f["user_bytes_client_to_backend"].as_u64().unwrap() + f["user_bytes_backend_to_client"].as_u64().unwrap();
    eprintln!("default bound: the daemon copied {copied} of 128 MiB and read {read} bytes");
    assert!(read >= copied, "the daemon reports copying {copied} bytes but read only {read}");
    assert!(read < copied + (1 << 20), "the daemon read {read} bytes but reports copying {copied}");
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn thousand_concurrent_flows_leave_nothing_behind() {
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let (gw, addr) = start(&topo, &[be.addr], "kernel", "");
    let fds_before = gw.fd_count();
    const N: usize = 1000;
    const LEN: usize = 8192;
    let mut conns = Vec::with_capacity(N);
    for _ in 0..N {
        conns.push(topo.connect(addr).unwrap());
    }
    gw.wait_for("1000 live kernel flows", Duration::from_secs(60), |g| {
        let f = g.flows();
        f.len() == N && f.iter().all(|f| f["path"] == "kernel")
    });
    // A spliced flow holds its two sockets and no other descriptor (the
    // hang-up watch is the wake thread's one epoll set for every flow).
    let held = gw.fd_count() - fds_before;
    assert!(held <= 2 * N + 8, "{N} kernel flows hold {held} descriptors in the daemon");
    let mut buf = vec![0u8; LEN];
    for (i, c) in conns.iter_mut().enumerate() {
        Pattern(i as u64).fill(0, &mut buf);
        c.write_all(&buf).unwrap();
    }
    for (i, c) in conns.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Pattern(i as u64).expect(c, LEN as u64, false).unwrap_or_else(|e| panic!("flow {i}: {e}"));
    }
    for c in &conns {
        c.shutdown(Shutdown::Write).unwrap();
    }
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(read_until_closed(c, Duration::from_secs(30)).unwrap(), 0, "flow {i} not closed cleanly");
    }
    drop(conns);
    gw.wait_idle();
    gw.wait_for("the daemon's fds back to where they were", Duration::from_secs(10), |g| g.fd_count() <= fds_before);
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn balance_policies() {
    let topo = Topology::new();
    // Each backend answers with its own tag.
    let tagged = |tag: u8| {
        Backend::spawn(&topo, move |mut s| {
            let _ = s.write_all(&[tag]);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        })
    };
    let (a, b) = (tagged(b'a'), tagged(b'b'));
    let ask = |addr| {
        let mut s = topo.connect(addr).unwrap();
        let mut t = [0u8];
        s.read_exact(&mut t).unwrap();
        (t[0], s)
    };
    // round_robin alternates.
    let (gw, addr) = start(&topo, &[a.addr, b.addr], "kernel", "    balance: round_robin\n");
    let tags: Vec<u8> = (0..4).map(|_| ask(addr).0).collect();
    assert_eq!(tags, b"abab");
    drop(gw);
    // source_hash: one client address, one backend.
    let (gw, addr) = start(&topo, &[a.addr, b.addr], "kernel", "    balance: source_hash\n");
    let tags: Vec<u8> = (0..6).map(|_| ask(addr).0).collect();
    assert!(tags.iter().all(|&t| t == tags[0]), "{tags:?}");
    drop(gw);
    // least_conn: with a flow held open on one backend, the next goes to the other.
    let (gw, addr) = start(&topo, &[a.addr, b.addr], "kernel", "    balance: least_conn\n");
    let (first, _held) = ask(addr);
    gw.wait_for("held flow", Duration::from_secs(5), |g| g.flows().len() == 1);
    for _ in 0..3 {
        let (t, s) = ask(addr);
        assert_ne!(t, first, "least_conn sent a flow to the busier backend");
        drop(s);
        // Only the held flow is left before the next choice.
        gw.wait_for("the short flow to end", Duration::from_secs(5), |g| g.flows().len() == 1);
    }
}

/// An unprivileged daemon can't load the programs: `auto` falls back to the
/// userspace relay and says why, once in the log and in every flow's stats.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn unprivileged_daemon_falls_back_and_says_why() {
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let cfg = GatewayConfig { listeners: listener("t", &[be.addr], "auto", ""), extra: String::new() };
    let gw = Gateway::start_with(
        &topo,
        &cfg,
        &[],
        &["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"],
    );
    let st = gw.status();
    assert_eq!(st["kernel_path"], false);
    assert!(st["kernel_unavailable"].as_str().unwrap().contains("not privileged"), "{st}");
    let addr = gw.listener("t");
    let s = topo.connect(addr).unwrap();
    let f = live_flow(&gw, "userspace");
    assert_eq!(f["fallback_code"], "not-privileged");
    echo_roundtrip(&s, Pattern(5), 1 << 20).unwrap();
    assert_eq!(gw.log_text().matches("kernel path unavailable").count(), 1, "{}", gw.log_text());
}

/// With every link dropping ~2% of data segments, retransmissions reach the
/// verdict overlapping bytes it already forwarded; the trim keeps the stream
/// exact. Both directions, up to 64 MiB.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn lossy_links_kernel_path_stays_exact() {
    let topo = Topology::new();
    let _lossy = topo.make_lossy(20);
    let be = Backend::echo(&topo);
    let (gw, addr) = start(&topo, &[be.addr], "kernel", "");
    assert_eq!(gw.status()["trim_overlaps"], true, "overlap trimming is off:\n{}", gw.log_text());
    for (i, &len) in SIZES.iter().enumerate() {
        let s = topo.connect(addr).unwrap();
        live_flow(&gw, "kernel");
        let t0 = Instant::now();
        echo_roundtrip(&s, Pattern(100 + i as u64), len)
            .unwrap_or_else(|e| panic!("{len} bytes over lossy links: {e}"));
        eprintln!("lossy: {len} bytes echoed in {:?}", t0.elapsed());
        drop(s);
        gw.wait_idle();
    }
    let trimmed: u64 = gw
        .log_text()
        .lines()
        .filter_map(|l| l.split("trimmed_bytes=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    let retrans: u64 = [&topo.client, &topo.gw, &topo.backend].iter().map(|ns| tcp_retransmits(ns)).sum();
    eprintln!("lossy: {retrans} segments retransmitted, {trimmed} overlapping bytes trimmed by the verdict");
    assert!(retrans > 100, "only {retrans} retransmissions: the links were not lossy");
}

/// A third-party client: socat sends a file through the gateway to the echo
/// backend and writes what comes back; both paths return it byte for byte.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn socat_client_round_trip() {
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let dir = temp_dir("socat");
    let input = dir.join("in.bin");
    let mut f = std::fs::File::create(&input).unwrap();
    Pattern(77).send(&mut f, 8 << 20).unwrap();
    drop(f);
    for offload in ["kernel", "userspace"] {
        let (gw, addr) = start(&topo, &[be.addr], offload, "");
        let output = dir.join(format!("out-{offload}.bin"));
        let st = Topology::cmd_in(&topo.client, "sh")
            .arg("-c")
            .arg(format!("socat -t 10 -T 30 - TCP:{addr} < {} > {}", input.display(), output.display()))
            .status()
            .unwrap();
        assert!(st.success(), "socat failed via {offload}");
        let got = std::fs::read(&output).unwrap();
        let want = std::fs::read(&input).unwrap();
        assert_eq!(got.len(), want.len(), "socat via {offload}: length");
        assert!(got == want, "socat via {offload}: bytes differ");
        gw.wait_idle();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// When the kernel maps are full, further flows are relayed in user space
/// (`offload: auto`) with the reason in their stats, and still work.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn full_kernel_maps_fall_back_per_flow() {
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let gw = Gateway::start(
        &topo,
        &GatewayConfig { listeners: listener("t", &[be.addr], "auto", ""), extra: "kernel:\n  max_flows: 2\n".into() },
    );
    let addr = gw.listener("t");
    let held: Vec<TcpStream> = (0..2).map(|_| topo.connect(addr).unwrap()).collect();
    gw.wait_for("two kernel flows", Duration::from_secs(10), |g| {
        let f = g.flows();
        f.len() == 2 && f.iter().all(|f| f["path"] == "kernel")
    });
    let third = topo.connect(addr).unwrap();
    let f = gw.wait_flow("the third flow to fall back", |f| f["path"] == "userspace");
    assert_eq!(f["fallback_code"], "map-full", "{f}");
    assert!(f["fallback_reason"].as_str().unwrap().contains("kernel.max_flows"), "{f}");
    echo_roundtrip(&third, Pattern(3), 1 << 20).unwrap();
    for (i, s) in held.iter().enumerate() {
        echo_roundtrip(s, Pattern(10 + i as u64), 1 << 20).unwrap();
    }
    drop((held, third));
    gw.wait_idle();
}

/// IPv6 end to end: an IPv6 listener in front of an IPv6 backend, on both paths.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn ipv6_flows_on_both_paths() {
    let topo = Topology::new();
    let be = Backend::serve(topo.backend_listener6(), |mut s| {
        let _ = echo_conn(&mut s);
    });
    for offload in ["kernel", "userspace"] {
        let listeners = format!(
            "  - name: t\n    bind: \"[{GW_CLIENT_SIDE_IP6}]:0\"\n    backends: [\"{}\"]\n    offload: {offload}\n",
            be.addr
        );
        let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
        let addr = gw.listener("t");
        assert!(addr.is_ipv6());
        let s = topo.connect(addr).unwrap();
        let f = live_flow(&gw, offload);
        assert!(f["client"].as_str().unwrap().starts_with("[fd77:1::2]"), "{f}");
        echo_roundtrip(&s, Pattern(6), 4 << 20).unwrap_or_else(|e| panic!("IPv6 via {offload}: {e}"));
        drop(s);
        gw.wait_idle();
    }
}

/// `offload: kernel` is a promise: without the kernel path the daemon refuses
/// to start, says why, and binds nothing.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn offload_kernel_refuses_to_start_without_the_kernel_path() {
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let cfg = GatewayConfig { listeners: listener("t", &[be.addr], "kernel", ""), extra: String::new() };
    let mut gw = Gateway::spawn(
        &topo,
        &cfg,
        &[],
        &["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = gw.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the daemon kept running:\n{}", gw.log_text());
        thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let log = gw.log_text();
    assert!(log.contains("offload: kernel") && log.contains("not privileged"), "{log}");
    assert!(!gw.admin.exists(), "admin socket created by a daemon that refused to start");
}

/// Out of descriptors, the daemon turns the newcomer away as a local fault
/// (`rejected: local-resources`): the backend is not charged with a failed
/// connect, stays up, and the daemon serves again once descriptors free up.
/// "ping" through an echo flow, within 10 s.
fn ping(s: &mut std::net::TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"ping")?;
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    assert_eq!(&b, b"ping");
    Ok(())
}

/// With no `limits.max_connections`, the daemon caps connections at what
/// its open-files limit holds (two descriptors a flow, 256 set aside): a
/// flood is turned away at admission, counted, before accepts and backend
/// connects start failing for want of descriptors.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn the_default_cap_follows_the_open_files_limit() {
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    const NOFILE: u64 = 300;
    let cfg = GatewayConfig { listeners: listener("t", &[be.addr], "kernel", ""), extra: String::new() };
    let gw = Gateway::start_with(&topo, &cfg, &[], &["prlimit", &format!("--nofile={NOFILE}:{NOFILE}"), "--"]);
    let addr = gw.listener("t");
    let cap = gw.status()["max_connections"].as_u64().unwrap_or_else(|| panic!("{}", gw.status()));
    // 256 kept aside, one listener.
    assert_eq!(cap, (NOFILE - 256 - 1) / 2, "{}", gw.status());
    assert!(gw.log_text().contains("connection cap from the open-files limit"), "{}", gw.log_text());
    let mut held: Vec<_> = (0..cap).map(|_| topo.connect(addr).unwrap()).collect();
    for (i, s) in held.iter_mut().enumerate() {
        ping(s).unwrap_or_else(|e| panic!("flow {i} of {cap}: {e}"));
    }
    // Twice the cap more: every one closed at admission.
    for i in 0..2 * cap {
        // The reset may come before the connect has returned.
        let mut over = match topo.connect(addr) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => continue,
            Err(e) => panic!("client {i} over the cap: {e}"),
        };
        match ping(&mut over) {
            Err(e) => assert!(
                matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset),
                "client {i} over the cap: {e}"
            ),
            Ok(()) => panic!("client {i} over the cap of {cap} was served"),
        }
    }
    let stats = gw.stats();
    let t = &stats["listeners"][0];
    assert_eq!(t["rejected"]["global-max-connections"], 2 * cap, "{t}");
    assert!(t["rejected"]["local-resources"].as_u64().unwrap_or(0) == 0, "{t}");
    assert_eq!(t["backends"][0]["up"], true, "{t}");
    assert!(!gw.log_text().contains("no local resources"), "{}", gw.log_text());
    // A place freed is a place taken.
    drop(held.pop());
    gw.wait_for("the freed place", Duration::from_secs(10), |g| g.status()["connections"].as_u64() == Some(cap - 1));
    let mut again = topo.connect(addr).unwrap();
    ping(&mut again).unwrap();
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn fd_exhaustion_is_local_and_the_backend_stays_healthy() {
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let (gw, addr) = start(&topo, &[be.addr], "kernel", "");
    // The soft limit only: nobody here may raise a hard limit again.
    let nofile = |limit: usize| {
        let st = std::process::Command::new("prlimit")
            .args(["--pid", &gw.pid().to_string(), &format!("--nofile={limit}:")])
            .status()
            .unwrap();
        assert!(st.success(), "prlimit --nofile={limit}");
    };
    const K: usize = 4;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", gw.pid())).unwrap();
    let open_files: usize = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap();
    // K flows, then a limit one above the lowest free descriptor number (a
    // new descriptor takes the lowest free one, and fails with EMFILE when
    // none is free below the limit): the next client is accepted with the
    // last one and its backend connect finds none. Set again until two
    // looks agree (an admin connection may close meanwhile).
    let mut held: Vec<_> = (0..K).map(|_| topo.connect(addr).unwrap()).collect();
    for (i, s) in held.iter_mut().enumerate() {
        ping(s).unwrap_or_else(|e| panic!("flow {i}: {e}"));
    }
    gw.wait_for("the flows", Duration::from_secs(10), |g| g.flows().len() == K);
    let lowest_free = || {
        let used: std::collections::BTreeSet<usize> = std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        (0..).find(|n| !used.contains(n)).unwrap()
    };
    let mut last = None;
    gw.wait_for("a settled descriptor limit", Duration::from_secs(10), |_| {
        let limit = lowest_free() + 1;
        nofile(limit);
        last.replace(limit) == Some(limit)
    });
    let mut over = topo.connect(addr).unwrap();
    match ping(&mut over) {
        Err(e) => assert!(
            matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset),
            "the client over the limit was not closed: {e}"
        ),
        Ok(()) => panic!("a flow over the descriptor limit was served"),
    }
    // Descriptors again: the daemon serves, and the backend was never blamed.
    nofile(open_files);
    drop(held.pop());
    let mut again = topo.connect(addr).unwrap();
    ping(&mut again).unwrap_or_else(|e| panic!("no recovery after the limit was lifted: {e}"));
    let stats = gw.stats();
    let t = &stats["listeners"][0];
    assert_eq!(t["backends"][0]["connect_failures"], 0, "{t}");
    assert_eq!(t["backends"][0]["up"], true, "{t}");
    assert!(t["rejected"]["local-resources"].as_u64().is_some_and(|n| n >= 1), "{t}");
    assert!(gw.log_text().contains("no local resources to connect"), "{}", gw.log_text());
}
