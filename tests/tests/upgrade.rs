//! Hot upgrade end to end: a second daemon takes the listening sockets and
//! the kernel maps over (`gateway run --takeover`). A kernel flow moves to
//! it; a userspace flow finishes on the first; both keep moving bytes and
//! are never reset; no
//! connection attempt during the switch is refused; WebSockets held open
//! across it keep working; the first daemon exits once its flows have ended.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use gateway_tests::*;

/// Sends `len` pattern bytes at `offset` of the stream and reads them back.
fn echo_more(s: &mut TcpStream, pattern: Pattern, offset: u64, len: u64) {
    let mut buf = vec![0u8; len as usize];
    pattern.fill(offset, &mut buf);
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || w.write_all(&buf));
    let mut back = vec![0u8; len as usize];
    s.read_exact(&mut back).unwrap();
    writer.join().unwrap().unwrap();
    let mut want = vec![0u8; len as usize];
    pattern.fill(offset, &mut want);
    assert!(back == want, "echoed bytes differ at offset {offset}");
}

/// Connect, 64 B echo, close; the error, if any.
fn one_conn(topo: &Topology, to: SocketAddr) -> Result<(), String> {
    let mut s = topo.connect(to).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[7u8; 64]).map_err(|e| format!("write: {e}"))?;
    let mut b = [0u8; 64];
    s.read_exact(&mut b).map_err(|e| format!("read: {e}"))?;
    Ok(())
}

#[test]
fn takeover_keeps_every_flow_and_refuses_no_connection() {
    if !require_root("takeover_keeps_every_flow_and_refuses_no_connection") {
        return;
    }
    let topo = Arc::new(Topology::new());
    let be = Backend::echo(&topo);
    let ws = Peer::python_server(&topo);
    let listeners = format!(
        "  - name: k\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{b}\"]\n    offload: kernel\n\
         \x20 - name: u\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{b}\"]\n    offload: userspace\n\
         \x20 - name: w\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    protocol: websocket\n    routes:\n\
         \x20     - path_prefix: /\n        backends: [\"{w}\"]\n",
        b = be.addr,
        w = ws.addr
    );
    let mut old = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let (k, u) = (old.listener("k"), old.listener("u"));

    // Long-lived WebSockets (Python `websockets`) open across the switch.
    let url = format!("ws://{}/chat", old.listener("w"));
    let mut held = Held::py_client(&topo, &["hold", &url, "--count", "20", "--again"]);
    assert_eq!(held.line(Duration::from_secs(60)), "OPEN 20");

    // One flow on each path, 1 MiB echoed before the switch.
    const MIB: u64 = 1 << 20;
    let (pk, pu) = (Pattern(11), Pattern(12));
    let mut ck = topo.connect(k).unwrap();
    let mut cu = topo.connect(u).unwrap();
    echo_more(&mut ck, pk, 0, MIB);
    echo_more(&mut cu, pu, 0, MIB);
    let paths: Vec<String> = old.flows().iter().map(|f| f["path"].as_str().unwrap_or_default().to_string()).collect();
    assert!(paths.contains(&"kernel".to_string()) && paths.contains(&"userspace".to_string()), "{paths:?}");

    // Connections all through the switch (bounded in count and time).
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let churn = {
        let (topo, stop, done, failed) = (topo.clone(), stop.clone(), done.clone(), failed.clone());
        thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(60);
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) && Instant::now() < end && done.load(Ordering::Relaxed) < 20_000 {
                if let Err(e) = one_conn(&topo, k) {
                    failed.fetch_add(1, Ordering::Relaxed);
                    errors.push(e);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            errors
        })
    };
    let before = done.load(Ordering::Relaxed);
    let new = old.take_over(&topo);
    // A few more after the old daemon has stopped accepting.
    let after = done.load(Ordering::Relaxed);
    while done.load(Ordering::Relaxed) < after + 50 {
        thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    let errors = churn.join().unwrap();
    assert!(
        errors.is_empty(),
        "{} of {} connections failed during the switch: {errors:?}",
        errors.len(),
        done.load(Ordering::Relaxed)
    );
    assert!(after > before, "no connection was made during the switch");

    // The new daemon serves the same ports; the listeners are its own now.
    assert_eq!((new.listener("k"), new.listener("u")), (k, u));
    let mut ck2 = topo.connect(k).unwrap();
    echo_more(&mut ck2, Pattern(13), 0, MIB);

    // The kernel flow moved to the new daemon with its counters; the
    // userspace one stayed with the old daemon.
    new.wait_for("the moved kernel flow", Duration::from_secs(20), |g| {
        g.flows().iter().any(|f| {
            f["listener"] == "k" && f["path"] == "kernel" && f["bytes_client_to_backend"].as_u64() >= Some(MIB)
        })
    });
    assert!(!new.flows().iter().any(|f| f["listener"] == "u"), "a userspace flow moved: {:?}", new.flows());
    let log = old.log_text();
    let moved = log
        .lines()
        .find(|l| l.contains("upgrade: kernel flows moved"))
        .and_then(|l| l.split("moved=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no count of moved flows:\n{log}"));
    assert!(moved >= 1, "{log}");
    assert!(new.log_text().contains(&format!("moved_flows={moved}")), "{}", new.log_text());

    // Every flow goes on, intact, after the switch: 1 MiB more each way on
    // both (the moved one now supervised by the new daemon, its bytes still
    // carried by the kernel), and a message on every WebSocket, which then
    // closes cleanly.
    echo_more(&mut ck, pk, MIB, MIB);
    echo_more(&mut cu, pu, MIB, MIB);
    held.go_on();
    assert_eq!(held.line(Duration::from_secs(60)), "CLOSED 20");
    assert!(old.wait_exit(Duration::from_millis(200)).is_none(), "the old daemon left while its flows were open");

    // Closing them ends them where they live: no reset anywhere.
    for s in [&ck, &cu] {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    for s in [&mut ck, &mut cu] {
        assert_eq!(read_until_closed(s, Duration::from_secs(20)).unwrap(), 0);
    }
    let status = old.wait_exit(Duration::from_secs(30)).expect("the old daemon did not exit after its flows ended");
    assert!(status.success(), "old daemon: {status}\n{}", old.log_text());
    let both_ways = format!("bytes_c2b={} bytes_b2c={}", 2 * MIB, 2 * MIB);
    let closed = |log: &str, listener: &str, path: &str| {
        let close = log
            .lines()
            .find(|l| {
                l.contains("flow close") && l.contains(&format!("listener={listener} ")) && l.contains(&both_ways)
            })
            .unwrap_or_else(|| panic!("no close record of the {path} flow with 2 MiB each way:\n{log}"));
        assert!(close.contains(&format!("path={path} ")) && close.contains("cause=\"client-closed\""), "{close}");
    };
    let log = old.log_text();
    assert!(log.contains("every flow of this process has ended"), "{log}");
    closed(&log, "u", "userspace");
    new.wait_for("the moved flow's close", Duration::from_secs(20), |g| {
        !g.flows().iter().any(|f| f["listener"] == "k" && f["bytes_client_to_backend"].as_u64() >= Some(2 * MIB))
    });
    closed(&new.log_text(), "k", "kernel");

    // And the new one still serves once the old one is gone.
    one_conn(&topo, k).unwrap();
    one_conn(&topo, u).unwrap();
    drop(ck2);
}
