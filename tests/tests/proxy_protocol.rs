//! The PROXY protocol both ways, with HAProxy as the peer: in front of the
//! gateway sending v2 and v1 (`send-proxy-v2`, `send-proxy`), and behind it
//! accepting what the gateway sends (`accept-proxy`); on the kernel path and
//! on a websocket listener.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use gateway_tests::*;

/// A connection from the client host to `to`, from `src` (an address of
/// the client host's loopback).
fn connect_from(topo: &Topology, src: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let src: SocketAddr = format!("{src}:0").parse().unwrap();
    Topology::in_ns(&topo.client, move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.bind(&src.into())?;
        s.connect_timeout(&to.into(), Duration::from_secs(10))?;
        Ok(s.into())
    })
}

fn echo_through(s: &mut TcpStream, n: usize) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let data: Vec<u8> = (0..n).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut w = s.try_clone()?;
    let sent = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent));
    let mut back = vec![0u8; n];
    s.read_exact(&mut back)?;
    writer.join().unwrap()?;
    if let Some(i) = back.iter().zip(&data).position(|(a, b)| a != b) {
        panic!(
            "the bytes after the PROXY header came back changed from byte {i} of {n}: {:?} for {:?}",
            &back[i..(i + 16).min(n)],
            &data[i..(i + 16).min(n)]
        );
    }
    Ok(())
}

/// Whether the gateway ended the connection (FIN or RST) within 20 s.
fn ended(s: &mut TcpStream) -> bool {
    match read_until_closed(s, Duration::from_secs(20)) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

fn rejected(gw: &Gateway, listener: &str, cause: &str) -> u64 {
    gw.listener_stats(listener)["rejected"][cause].as_u64().unwrap_or(0)
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn haproxy_in_front_tells_the_gateway_who_the_client_is() {
    let topo = Topology::new();
    let echo = Backend::echo(&topo);
    let node = Peer::node_server(&topo, "b1");
    let listeners = format!(
        "  - name: t\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{}\"]\n    offload: kernel\n\
         \x20   deny: [\"127.0.0.2\"]\n\
         \x20   proxy_protocol: {{ accept: v2, from: [\"{CLIENT_IP}\"], timeout: 1s }}\n\
         \x20 - name: w\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    protocol: websocket\n\
         \x20   proxy_protocol: {{ accept: any, from: [\"{CLIENT_IP}/32\"] }}\n    routes:\n\
         \x20     - path_prefix: /\n        backends: [\"{}\"]\n\
         \x20 - name: elsewhere\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{}\"]\n\
         \x20   proxy_protocol: {{ from: [\"192.0.2.0/24\"] }}\n",
        echo.addr, node.addr, echo.addr
    );
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let (t, w) = (gw.listener("t"), gw.listener("w"));
    // HAProxy on the client host: v2 to the TCP listener, v1 to the websocket one.
    let (haproxy, front) = Haproxy::start(&topo.client, &["127.0.0.1", "127.0.0.1"], |a| {
        format!(
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             listen to_t\n  bind {}\n  server gw {t} send-proxy-v2\n\
             listen to_w\n  bind {}\n  server gw {w} send-proxy\n",
            a[0], a[1]
        )
    });

    // The client as HAProxy saw it (127.0.0.1 on the client host) is the
    // flow's client; a MiB each way comes back intact on the kernel path.
    let mut s = connect_from(&topo, "127.0.0.1", front[0]).unwrap();
    echo_through(&mut s, 1 << 20).unwrap();
    let f = gw.wait_flow("the proxied flow", |f| f["listener"] == "t");
    let local = s.local_addr().unwrap();
    assert_eq!(f["client"], local.to_string(), "{f}");
    assert_eq!(f["path"], "kernel", "{f}");
    let kernel =
        f["kernel_bytes_client_to_backend"].as_u64().unwrap() + f["kernel_bytes_backend_to_client"].as_u64().unwrap();
    assert!(kernel > 0, "no byte after the header went through the kernel: {f}");
    drop(s);

    // The ACL judges the source the header gave: 127.0.0.2 is denied.
    let before = rejected(&gw, "t", "denied");
    let mut s = connect_from(&topo, "127.0.0.2", front[0]).unwrap();
    assert!(read_until_closed(&mut s, Duration::from_secs(20)).is_ok(), "a denied source was served");
    gw.wait_for("the denial counted", Duration::from_secs(10), |g| rejected(g, "t", "denied") > before);

    // No header (a client straight from an allowed balancer address), or a
    // header that never ends: refused and counted; and any connection from
    // a source not in `from`.
    let mut s = topo.connect(t).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert!(ended(&mut s), "a connection without a header was served");
    let mut s = topo.connect(t).unwrap();
    s.write_all(b"\r\n\r\n\0\r\nQU").unwrap();
    assert!(ended(&mut s), "a slow header was waited on forever");
    gw.wait_for("two bad headers counted", Duration::from_secs(10), |g| rejected(g, "t", "proxy-header") == 2);
    // Reset at once: the connect itself may already see it.
    let stranger = match topo.connect(gw.listener("elsewhere")) {
        Ok(mut s) => ended(&mut s),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(stranger, "a connection from a source not in `from` was served");
    gw.wait_for("the stranger counted", Duration::from_secs(10), |g| rejected(g, "elsewhere", "proxy-source") == 1);

    // The websocket listener: X-Forwarded-For names the client HAProxy saw,
    // and a WebSocket upgrades through both.
    let (status, head, body) = curl(&topo, &[&format!("http://{}/headers", front[1])]);
    assert_eq!(status, 200, "{head}{body}");
    let seen: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1", "{seen}");
    let v = py_client(&topo, &["echo", &format!("ws://{}/chat", front[1]), "--sizes", "5,70000"]);
    assert!(v["error"].is_null(), "{v}\n{}", haproxy.log());
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn haproxy_behind_reads_the_header_the_gateway_sends() {
    let topo = Topology::new();
    // HAProxy on the backend host answers each request with the client and
    // destination its PROXY header named.
    let (_haproxy, back) = Haproxy::start(&topo.backend, &[BACKEND_IP], |a| {
        format!(
            "defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend seen\n  bind {} accept-proxy\n\
             \x20 http-request return status 200 content-type text/plain lf-string \"%[src] %[dst]:%[dst_port]\"\n",
            a[0]
        )
    });
    let b = back[0];
    let listeners = format!(
        "  - name: p1\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{b}\"]\n    offload: kernel\n    send_proxy: v1\n\
         \x20 - name: p2\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{b}\"]\n    offload: kernel\n    send_proxy: v2\n\
         \x20 - name: w\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    protocol: websocket\n    routes:\n\
         \x20     - path_prefix: /\n        backends: [\"{b}\"]\n        send_proxy: v2\n"
    );
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    for name in ["p1", "p2", "w"] {
        let at = gw.listener(name);
        let (status, head, body) = curl(&topo, &[&format!("http://{at}/")]);
        assert_eq!(status, 200, "{name}: {head}{body}");
        assert_eq!(body.trim(), format!("{CLIENT_IP} {at}"), "{name}: HAProxy saw another client");
    }
    // The TCP listeners carried the request and the answer on the kernel
    // path, behind the header.
    gw.wait_for("both TCP flows closed", Duration::from_secs(10), |g| g.flows().is_empty());
    let log = gw.log_text();
    for name in ["p1", "p2"] {
        let line = log
            .lines()
            .find(|l| l.contains("flow close") && l.contains(&format!("listener={name} ")))
            .unwrap_or_else(|| panic!("no close record for {name}:\n{log}"));
        let kernel: u64 = line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("kernel_bytes="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(line.contains("path=kernel") && kernel > 0, "{name}: {line}");
    }
}

/// Active health checks of a backend the gateway sends PROXY headers to
/// start with a LOCAL header (v2) or `PROXY UNKNOWN` (v1), as HAProxy's
/// `check-send-proxy` does: HAProxy with `accept-proxy` answers them, and the
/// backend stays up. Without the header it drops every check.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn health_checks_of_a_proxy_backend_send_a_local_header() {
    let topo = Topology::new();
    let (haproxy, back) = Haproxy::start(&topo.backend, &[BACKEND_IP, BACKEND_IP, BACKEND_IP], |a| {
        let mut conf =
            "global\n  log stderr format raw local0 info\ndefaults\n  mode http\n  log global\n  option httplog\n\
                        \x20 timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n"
                .to_string();
        for (i, addr) in a.iter().enumerate() {
            conf.push_str(&format!(
                "frontend f{i}\n  bind {addr} accept-proxy\n  http-request return status 200 content-type text/plain string ok\n"
            ));
        }
        conf
    });
    let health = "    health:\n      failures: 1\n      interval: 100ms\n      timeout: 1s\n      send: \"GET /health-check HTTP/1.0\\r\\n\\r\\n\"\n      expect: \"200 OK\"\n";
    let listeners = format!(
        "  - name: p1\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{}\"]\n    send_proxy: v1\n{health}\
         \x20 - name: p2\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{}\"]\n    send_proxy: v2\n{health}\
         \x20 - name: w\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    protocol: websocket\n{health}    routes:\n\
         \x20     - path_prefix: /\n        backends: [\"{}\"]\n        send_proxy: v2\n",
        back[0], back[1], back[2]
    );
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    // Three checks answered on each frontend, from the gateway's own address.
    gw.wait_for("three answered checks per backend", Duration::from_secs(20), |_| {
        let log = haproxy.log();
        (0..3).all(|i| {
            log.lines()
                .filter(|l| {
                    l.starts_with(GW_BACKEND_SIDE_IP) && l.contains(&format!(" f{i} ")) && l.contains("/health-check")
                })
                .count()
                >= 3
        })
    });
    let log = haproxy.log();
    assert!(!log.contains("does not look like a PROXY protocol header"), "{log}");
    for name in ["p1", "p2", "w"] {
        let l = gw.listener_stats(name);
        assert_eq!(l["backends"][0]["up"], true, "{name}: {l}");
        // And the backend still serves clients through the gateway.
        let (status, _, body) = curl(&topo, &[&format!("http://{}/", gw.listener(name))]);
        assert_eq!((status, body.as_str()), (200, "ok"), "{name}");
    }
}
