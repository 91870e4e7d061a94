//! Hot upgrade end to end: a second daemon takes the listening sockets, the
//! kernel maps and the flows over (`gateway run --takeover`). TCP flows
//! (kernel and userspace), WebSockets (passthrough, inspect, bridge_tcp)
//! and TLS sessions (terminated, originated, wss) move to it; all keep
//! moving bytes, none is reset; no connection attempt during the switch is
//! refused; the first daemon exits once its flows have moved.
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
/// One request on a kept-alive HTTP/1.1 connection: the status and body
/// (Content-Length or chunked).
fn keepalive_get(s: &mut TcpStream, path: &str) -> (u16, String) {
    write!(s, "GET {path} HTTP/1.1\r\nHost: app.test\r\n\r\n").unwrap();
    let (head, mut body) = read_http_head(s).unwrap();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut chunk = [0u8; 4096];
    let done = |body: &[u8]| match header_value(&head, "content-length") {
        Some(n) => body.len() >= n.parse::<usize>().unwrap(),
        None => body.ends_with(b"0\r\n\r\n"),
    };
    while !done(&body) {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "the connection closed in the middle of a response: {head}");
        body.extend_from_slice(&chunk[..n]);
    }
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn one_conn(topo: &Topology, to: SocketAddr) -> Result<(), String> {
    let mut s = topo.connect(to).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[7u8; 64]).map_err(|e| format!("write: {e}"))?;
    let mut b = [0u8; 64];
    s.read_exact(&mut b).map_err(|e| format!("read: {e}"))?;
    Ok(())
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn takeover_keeps_every_flow_and_refuses_no_connection() {
    let topo = Arc::new(Topology::new());
    let be = Backend::echo(&topo);
    let ws = Peer::python_server(&topo);
    let app = Peer::node_server(&topo, "app");
    let listeners = format!(
        "  - name: k\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{b}\"]\n    offload: kernel\n\
         \x20 - name: u\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{b}\"]\n    offload: userspace\n\
         \x20 - name: w\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    protocol: websocket\n    routes:\n\
         \x20     - path_prefix: /pass\n        backends: [\"{w}\"]\n\
         \x20     - path_prefix: /inspect\n        backends: [\"{w}\"]\n        mode: inspect\n\
         \x20     - path_prefix: /bridge\n        bridge_tcp: [\"{b}\"]\n\
         \x20     - path_prefix: /page\n        backends: [\"{a}\"]\n",
        b = be.addr,
        w = ws.addr,
        a = app.addr
    );
    let mut old = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let (k, u) = (old.listener("k"), old.listener("u"));

    // A kept-alive HTTP connection, idle at the switch: it moves too, and
    // its next request is served by the new daemon, no close in between.
    let mut page = topo.connect(old.listener("w")).unwrap();
    page.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (status, body) = keepalive_get(&mut page, "/page/1");
    assert!(status == 200 && body.contains("page from app at /page/1"), "{status} {body}");

    // Long-lived WebSockets (Python `websockets`) open across the switch:
    // passthrough ones (kernel path), inspect ones (relayed message by
    // message) and bridge_tcp ones (to the TCP echo backend).
    let w = old.listener("w");
    let mut held: Vec<Held> = ["pass", "inspect", "bridge"]
        .iter()
        .map(|route| {
            let url = format!("ws://{w}/{route}");
            let mut args = vec!["hold", &url, "--count", "10", "--again"];
            if *route == "bridge" {
                args.push("--binary");
            }
            Held::py_client(&topo, &args)
        })
        .collect();
    for h in &mut held {
        assert_eq!(h.line(Duration::from_secs(60)), "OPEN 10");
    }

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

    // The TCP flows (kernel and userspace) and the WebSockets moved to the
    // new daemon with their counters (the inspect and bridge ones with the
    // message each relayed before).
    new.wait_for("the moved flows", Duration::from_secs(20), |g| {
        let f = g.flows();
        let has = |l: &str, path: &str| {
            f.iter()
                .any(|f| f["listener"] == l && f["path"] == path && f["bytes_client_to_backend"].as_u64() >= Some(MIB))
        };
        has("k", "kernel") && has("u", "userspace") && f.iter().filter(|f| f["listener"] == "w").count() == 31
    });
    let flows = new.flows();
    let on = |path: &str| {
        let ws = |f: &&Value| f["listener"] == "w" && f["path"] == path && f["fallback_code"] != "http";
        flows.iter().filter(ws).collect::<Vec<_>>()
    };
    assert_eq!(on("kernel").len(), 10, "{flows:?}");
    let terminated = on("userspace");
    assert_eq!(terminated.len(), 20, "{flows:?}");
    for code in ["websocket-inspect", "websocket-bridge"] {
        let of_code: Vec<_> = terminated.iter().filter(|f| f["fallback_code"] == code).collect();
        assert_eq!(of_code.len(), 10, "{code}: {flows:?}");
        for f in of_code {
            let msgs = (f["messages_client_to_backend"].as_u64(), f["messages_backend_to_client"].as_u64());
            assert_eq!(msgs, (Some(1), Some(1)), "{f}");
        }
    }
    let log = old.log_text();
    let count = |log: &str, line: &str, key: &str| {
        log.lines()
            .find(|l| l.contains(line))
            .and_then(|l| l.split(key).nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}:\n{log}"))
    };
    let moved = count(&log, "upgrade: flows moved", "moved=");
    // The two TCP flows, the thirty WebSockets, the HTTP connection, and
    // perhaps some of the connections made during the switch.
    assert!(moved >= 33, "{log}");
    assert_eq!(count(&new.log_text(), "this one serves every listener", "moved_flows="), moved);

    let (status, body) = keepalive_get(&mut page, "/page/2");
    assert!(status == 200 && body.contains("page from app at /page/2"), "{status} {body}");
    let http: Vec<_> = new.flows().into_iter().filter(|f| f["fallback_code"] == "http").collect();
    assert!(http.len() == 1 && http[0]["http_requests"] == 2, "{http:?}");

    // Every flow goes on, intact, after the switch: 1 MiB more each way on
    // the TCP flows, now served by the new daemon (the kernel flow's bytes
    // still carried by the kernel), and a message on every WebSocket, which
    // then closes cleanly.
    echo_more(&mut ck, pk, MIB, MIB);
    echo_more(&mut cu, pu, MIB, MIB);
    for h in &mut held {
        h.go_on();
        assert_eq!(h.line(Duration::from_secs(60)), "CLOSED 10");
    }
    // The moved terminated flows closed on the new daemon, each with the
    // messages of both daemons counted.
    new.wait_for("the terminated flows' close", Duration::from_secs(20), |g| {
        let log = g.log_text();
        ["websocket-inspect", "websocket-bridge"].iter().all(|code| {
            let closed = |l: &&str| l.contains("flow close") && l.contains(&format!("fallback=\"{code}\""));
            log.lines().filter(closed).filter(|l| l.contains("msgs_c2b=2 msgs_b2c=2")).count() == 10
        })
    });

    // The old daemon left once its flows had moved; none closed there.
    let status = old.wait_exit(Duration::from_secs(30)).expect("the old daemon did not exit after its flows moved");
    assert!(status.success(), "old daemon: {status}\n{}", old.log_text());
    let log = old.log_text();
    assert!(log.contains("every flow of this process has ended"), "{log}");
    assert_eq!(log.lines().filter(|l| l.contains("flow close") && l.contains("listener=w ")).count(), 0, "{log}");

    // A second upgrade: the flows the first moved move again, with their
    // history, and the middle daemon leaves once it holds none.
    let mut new = new;
    let newer = new.take_over(&topo);
    newer.wait_for("the twice-moved flows", Duration::from_secs(20), |g| {
        let f = g.flows();
        let has =
            |l: &str| f.iter().any(|f| f["listener"] == l && f["bytes_client_to_backend"].as_u64() >= Some(2 * MIB));
        has("k") && has("u")
    });
    let status = new.wait_exit(Duration::from_secs(30)).expect("the middle daemon did not exit once its flows moved");
    assert!(status.success(), "middle daemon: {status}\n{}", new.log_text());
    echo_more(&mut ck, pk, 2 * MIB, MIB);
    echo_more(&mut cu, pu, 2 * MIB, MIB);
    echo_more(&mut ck2, Pattern(13), MIB, MIB);

    // Closing the TCP flows ends them on the last daemon: no reset, every
    // byte counted there, history included.
    for s in [&ck, &cu] {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    for s in [&mut ck, &mut cu] {
        assert_eq!(read_until_closed(s, Duration::from_secs(20)).unwrap(), 0);
    }
    newer.wait_for("the moved flows' close", Duration::from_secs(20), |g| {
        !g.flows().iter().any(|f| f["bytes_client_to_backend"].as_u64() >= Some(3 * MIB))
    });
    let log = newer.log_text();
    let both_ways = format!("bytes_c2b={} bytes_b2c={}", 3 * MIB, 3 * MIB);
    for (listener, path) in [("k", "kernel"), ("u", "userspace")] {
        let close = log
            .lines()
            .find(|l| {
                l.contains("flow close") && l.contains(&format!("listener={listener} ")) && l.contains(&both_ways)
            })
            .unwrap_or_else(|| panic!("no close record of the {path} flow with 3 MiB each way:\n{log}"));
        assert!(close.contains(&format!("path={path} ")) && close.contains("cause=\"client-closed\""), "{close}");
    }

    // And the last one serves on.
    one_conn(&topo, k).unwrap();
    one_conn(&topo, u).unwrap();
    drop(ck2);
}

/// TLS sessions move with their keys: a terminated one (rustls client), an
/// originated one (Python `ssl` echo server behind `backend_tls`), and wss
/// WebSockets on a passthrough and an inspect route (Python `websockets`).
/// Every byte arrives across two upgrades, the sessions close cleanly
/// (close_notify answered) on the last daemon, and no daemon keeps one.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn takeover_moves_tls_sessions() {
    let topo = Arc::new(Topology::new());
    let dir = temp_dir("upgrade-tls");
    test_certs(&dir, &["gw.test", "backend.test"]).expect("test certificates (openssl)");
    let d = dir.display();
    let be = Backend::echo(&topo);
    let tls_be = Peer::tls_echo_server(&topo, &dir.join("backend.test.pem"), &dir.join("backend.test.key"));
    let ws = Peer::python_server(&topo);
    let certs =
        format!("    tls:\n      certificates:\n        - cert: {d}/gw.test.pem\n          key: {d}/gw.test.key\n");
    let listeners = format!(
        "  - name: t\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{b}\"]\n{certs}\
         \x20 - name: o\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{tb}\"]\n    backend_tls:\n      ca: {d}/ca.pem\n      sni: backend.test\n\
         \x20 - name: s\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    protocol: websocket\n{certs}    routes:\n\
         \x20     - path_prefix: /pass\n        backends: [\"{w}\"]\n\
         \x20     - path_prefix: /inspect\n        backends: [\"{w}\"]\n        mode: inspect\n",
        b = be.addr,
        tb = tls_be.addr,
        w = ws.addr
    );
    let mut old = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let ca = dir.join("ca.pem");
    let mut t = TlsHeld::connect(&topo, old.listener("t"), &ca, "gw.test");
    let mut o = topo.connect(old.listener("o")).unwrap();
    const CHUNK: u64 = 256 << 10;
    assert!(t.echo(0, CHUNK as usize));
    echo_more(&mut o, Pattern(21), 0, CHUNK);
    let s = old.listener("s");
    let mut held: Vec<Held> = ["pass", "inspect"]
        .iter()
        .map(|route| {
            let url = format!("wss://{s}/{route}");
            Held::py_client(
                &topo,
                &["hold", &url, "--count", "10", "--again", "--ca", ca.to_str().unwrap(), "--sni", "gw.test"],
            )
        })
        .collect();
    for h in &mut held {
        assert_eq!(h.line(Duration::from_secs(60)), "OPEN 10");
    }

    let mut new = old.take_over(&topo);
    new.wait_for("the moved TLS flows", Duration::from_secs(20), |g| {
        let f = g.flows();
        let n = |l: &str, code: &str| f.iter().filter(|f| f["listener"] == l && f["fallback_code"] == code).count();
        n("t", "userspace-tls") == 1
            && n("o", "userspace-tls") == 1
            && n("s", "userspace-tls") == 10
            && n("s", "websocket-inspect") == 10
    });
    let status = old.wait_exit(Duration::from_secs(30)).expect("the old daemon did not exit after its flows moved");
    assert!(status.success(), "old daemon: {status}\n{}", old.log_text());
    assert!(t.echo(CHUNK as usize, CHUNK as usize), "terminated session: bytes differ after the upgrade");
    echo_more(&mut o, Pattern(21), CHUNK, CHUNK);

    // Once more: the sessions the first upgrade resumed move again.
    let newer = new.take_over(&topo);
    let status = new.wait_exit(Duration::from_secs(30)).expect("the middle daemon did not exit after its flows moved");
    assert!(status.success(), "middle daemon: {status}\n{}", new.log_text());
    assert!(t.echo(2 * CHUNK as usize, CHUNK as usize), "terminated session: bytes differ after the second upgrade");
    echo_more(&mut o, Pattern(21), 2 * CHUNK, CHUNK);
    for h in &mut held {
        h.go_on();
        assert_eq!(h.line(Duration::from_secs(60)), "CLOSED 10");
    }
    assert!(t.close(), "the terminated session did not answer close_notify");
    o.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_until_closed(&mut o, Duration::from_secs(20)).unwrap(), 0);
    newer.wait_for("the TLS flows' close", Duration::from_secs(20), |g| {
        let log = g.log_text();
        let closed =
            |l: &str| log.lines().filter(|x| x.contains("flow close") && x.contains(&format!("listener={l} "))).count();
        closed("t") == 1 && closed("o") == 1 && closed("s") == 20
    });
    let log = newer.log_text();
    let three = format!("bytes_c2b={} bytes_b2c={}", 3 * CHUNK, 3 * CHUNK);
    for l in ["t", "o"] {
        let close = log
            .lines()
            .find(|x| x.contains("flow close") && x.contains(&format!("listener={l} ")))
            .unwrap_or_else(|| panic!("no close record for {l}:\n{log}"));
        assert!(close.contains(&three) && close.contains("cause=\"client-closed\""), "{close}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Kernel slots across hot upgrades: a flow that stays in an old daemon
/// (half-closed flows do not move) releases its slots when it ends, and the
/// newest daemon takes them, even two upgrades later; after five upgrades
/// every slot is free again and `max_flows` flows splice at once. Then
/// slots are reused hundreds of times under concurrent churn, and no byte
/// crosses from one flow to another.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn upgrades_lose_no_kernel_slot_and_reused_slots_carry_no_stray_byte() {
    let topo = Arc::new(Topology::new());
    // Once asked, says hello and half-closes; then reads until the client closes.
    let hello = Backend::spawn(&topo, |mut s| {
        let mut ask = [0u8];
        if s.read_exact(&mut ask).is_err() {
            return;
        }
        let _ = s.write_all(b"hi");
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let echo = Backend::echo(&topo);
    const MAX_FLOWS: u64 = 8;
    let listeners = format!(
        "  - name: h\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{}\"]\n    offload: kernel\n\
         \x20 - name: e\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{}\"]\n    offload: auto\n",
        hello.addr, echo.addr
    );
    let mut gw =
        Gateway::start(&topo, &GatewayConfig { listeners, extra: format!("kernel:\n  max_flows: {MAX_FLOWS}\n") });
    let slots = |g: &Gateway| {
        let s = g.status();
        (s["kernel_slots_free"].as_u64().unwrap(), s["kernel_slots_foreign"].as_u64().unwrap())
    };
    assert_eq!(slots(&gw), (2 * MAX_FLOWS, 0));
    // A kernel flow whose backend has half-closed: it stays where it is.
    let half_closed = |g: &Gateway| {
        let mut s = topo.connect(g.listener("h")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // Spliced before the backend half-closes.
        g.wait_for("the kernel flow", Duration::from_secs(10), |g| {
            g.flows().iter().any(|f| f["listener"] == "h" && f["path"] == "kernel")
        });
        s.write_all(b"?").unwrap();
        let mut hi = Vec::new();
        s.read_to_end(&mut hi).unwrap();
        assert_eq!(hi, b"hi");
        s
    };
    // Generation i runs flow i; flow i ends after the next two upgrades.
    let mut old: Vec<(Gateway, TcpStream)> = Vec::new();
    // Kept until the end: every generation shares one directory, which a
    // dropped Gateway removes.
    let mut exited = Vec::new();
    let mut flow = half_closed(&gw);
    for round in 0..5 {
        let next = gw.take_over(&topo);
        old.push((gw, flow));
        gw = next;
        flow = half_closed(&gw);
        if old.len() == 2 {
            // Two daemons back: its flow ends, the daemon exits, and the
            // newest takes its slots.
            let (mut g, s) = old.remove(0);
            drop(s);
            assert!(
                g.wait_exit(Duration::from_secs(30)).is_some(),
                "round {round}: the old daemon stayed:\n{}",
                g.log_text()
            );
            exited.push(g);
        }
    }
    drop(flow);
    for (mut g, s) in old.drain(..) {
        drop(s);
        assert!(g.wait_exit(Duration::from_secs(30)).is_some(), "an old daemon stayed:\n{}", g.log_text());
        exited.push(g);
    }
    gw.wait_for("every slot free again", Duration::from_secs(20), |g| {
        g.status()["flows"] == 0 && slots(g) == (2 * MAX_FLOWS, 0)
    });

    // max_flows at once, all spliced: no capacity was lost.
    let mut held: Vec<TcpStream> = (0..MAX_FLOWS).map(|_| topo.connect(gw.listener("e")).unwrap()).collect();
    for (i, s) in held.iter_mut().enumerate() {
        echo_more(s, Pattern(100 + i as u64), 0, 4096);
    }
    gw.wait_for("max_flows kernel flows", Duration::from_secs(10), |g| {
        let f = g.flows();
        f.len() == MAX_FLOWS as usize && f.iter().all(|f| f["path"] == "kernel")
    });
    drop(held);
    gw.wait_idle();

    // Churn: 4 clients, 150 flows each, each flow its own pattern; 16
    // slots reused over and over while neighbours still run (`offload:
    // auto`, so a flow that finds every slot taken, its predecessors not
    // yet gone, is relayed rather than closed).
    let e = gw.listener("e");
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let topo = topo.clone();
            thread::spawn(move || {
                for n in 0..150u64 {
                    let mut s = topo.connect(e).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    echo_more(&mut s, Pattern(w * 1000 + n), 0, 32 * 1024);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a churned flow got bytes that were not its own");
    }
    gw.wait_idle();
    assert_eq!(slots(&gw), (2 * MAX_FLOWS, 0));
    let s = gw.stats();
    let e_stats = s["listeners"].as_array().unwrap().iter().find(|l| l["name"] == "e").unwrap().clone();
    let kernel = e_stats["kernel_flows"].as_u64().unwrap();
    // Each slot reused ten times and more.
    assert!(kernel >= 2 * MAX_FLOWS * 10, "{e_stats}");
}
