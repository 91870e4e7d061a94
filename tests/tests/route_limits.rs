//! Per-route limits on long-lived connections (`max_connections`,
//! `message_rate`/`byte_rate`, `idle_timeout`, `max_duration`, and what a
//! reload does to their flows with `on_change`), with Python `websockets`
//! and curl against a Node backend.
use std::{io::Write, net::TcpStream, time::Duration};

use gateway_tests::*;

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn a_route_holds_at_most_its_max_connections() {
    let topo = Topology::new();
    let backend = Peer::node_server(&topo, "b1");
    let b = backend.addr;
    let listeners = format!(
        "  - name: w\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    protocol: websocket\n    routes:\n\
         \x20     - path_prefix: /capped\n        backends: [\"{b}\"]\n        max_connections: 2\n\
         \x20     - path_prefix: /free\n        backends: [\"{b}\"]\n"
    );
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let at = gw.listener("w");
    let capped = format!("ws://{at}/capped");
    let mut held = Held::py_client(&topo, &["hold", &capped, "--count", "2"]);
    assert_eq!(held.line(Duration::from_secs(30)), "OPEN 2");
    // A third is refused before any backend is contacted; other routes and
    // plain requests on this one are not counted.
    let v = py_client(&topo, &["echo", &capped, "--sizes", "5"]);
    assert!(v["error"].as_str().unwrap_or_default().contains("503"), "{v}");
    let v = py_client(&topo, &["echo", &format!("ws://{at}/free"), "--sizes", "5"]);
    assert!(v["error"].is_null(), "{v}");
    let (status, head, _) = curl(&topo, &[&format!("http://{at}/capped/headers")]);
    assert_eq!(status, 200, "{head}");
    // The two end: their places come back.
    held.go_on();
    assert_eq!(held.line(Duration::from_secs(30)), "CLOSED 2");
    gw.wait_for("the held flows gone", Duration::from_secs(10), |g| {
        !g.flows().iter().any(|f| f["route"].as_str().is_some_and(|r| r.ends_with("/capped")))
    });
    let v = py_client(&topo, &["echo", &capped, "--sizes", "5"]);
    assert!(v["error"].is_null(), "{v}");
    let l = gw.listener_stats("w");
    assert_eq!(l["route_refused"]["*/capped route-max-connections"], 1, "{l}");
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn inspect_routes_hold_clients_to_their_message_and_byte_rates() {
    let topo = Topology::new();
    let backend = Peer::node_server(&topo, "b1");
    let b = backend.addr;
    let listeners = format!(
        "  - name: w\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    protocol: websocket\n    routes:\n\
         \x20     - path_prefix: /msgs\n        backends: [\"{b}\"]\n        mode: inspect\n        message_rate: 5/s\n\
         \x20     - path_prefix: /bytes\n        backends: [\"{b}\"]\n        mode: inspect\n        byte_rate: 8KiB/s\n"
    );
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let at = gw.listener("w");
    // Within the burst (one period's worth; the client sends each size as a
    // text and a binary message): echoed.
    let v = py_client(&topo, &["echo", &format!("ws://{at}/msgs"), "--sizes", "1,1"]);
    assert!(v["error"].is_null(), "{v}");
    // Twelve at once: the sixth goes over, and the client gets 1008.
    let v = py_client(&topo, &["echo", &format!("ws://{at}/msgs"), "--sizes", "1,1,1,1,1,1"]);
    assert!(v["error"].as_str().unwrap_or_default().contains("1008"), "{v}");
    // A second's bytes (two messages of 4 KiB) pass; four do not.
    let v = py_client(&topo, &["echo", &format!("ws://{at}/bytes"), "--sizes", "4096"]);
    assert!(v["error"].is_null(), "{v}");
    let v = py_client(&topo, &["echo", &format!("ws://{at}/bytes"), "--sizes", "4096,4096"]);
    assert!(v["error"].as_str().unwrap_or_default().contains("1008"), "{v}");
    // Counted as flows the gateway closed for a rule.
    gw.wait_for("the closes counted", Duration::from_secs(10), |g| {
        let l = g.listener_stats("w");
        l["closed"]["rejected"].as_u64() >= Some(2)
    });
    let log = gw.log_text();
    assert!(
        log.contains("went over the route's message_rate") && log.contains("went over the route's byte_rate"),
        "{log}"
    );
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn a_route_closes_its_idle_connections_sooner_than_the_listener() {
    let topo = Topology::new();
    let backend = Peer::node_server(&topo, "b1");
    let b = backend.addr;
    let listeners = format!(
        "  - name: w\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    protocol: websocket\n    idle_timeout: 1h\n    routes:\n\
         \x20     - path_prefix: /short\n        backends: [\"{b}\"]\n        idle_timeout: 1s\n\
         \x20     - path_prefix: /short-inspect\n        backends: [\"{b}\"]\n        mode: inspect\n        idle_timeout: 1s\n\
         \x20     - path_prefix: /long\n        backends: [\"{b}\"]\n"
    );
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let at = gw.listener("w");
    let mut held: Vec<Held> = ["/short", "/short-inspect", "/long"]
        .iter()
        .map(|p| Held::py_client(&topo, &["hold", &format!("ws://{at}{p}"), "--count", "1"]))
        .collect();
    for h in &mut held {
        assert_eq!(h.line(Duration::from_secs(30)), "OPEN 1");
    }
    // The two short routes' flows close for idleness; the other stays.
    gw.wait_for("the short routes' flows closed", Duration::from_secs(15), |g| {
        let f = g.flows();
        f.len() == 1 && f[0]["route"].as_str().is_some_and(|r| r.ends_with("/long"))
    });
    let l = gw.listener_stats("w");
    assert_eq!(l["closed"]["idle-timeout"], 2, "{l}");
}

/// The listener `w` of the tests below: these routes, each `path: extra`
/// settings, in front of `b`.
fn ws_routes(b: std::net::SocketAddr, routes: &[(&str, &str)]) -> String {
    let mut out = format!("  - name: w\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    protocol: websocket\n    routes:\n");
    for (path, extra) in routes {
        out += &format!("      - path_prefix: {path}\n        backends: [\"{b}\"]\n");
        for line in extra.split(';').filter(|l| !l.trim().is_empty()) {
            out += &format!("        {}\n", line.trim());
        }
    }
    out
}

fn tcp_listener(name: &str, b: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "  - name: {name}\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{b}\"]\n    offload: kernel\n{extra}"
    )
}

/// A TCP flow through `at`, one echo checked.
fn tcp_flow(topo: &Topology, at: std::net::SocketAddr) -> TcpStream {
    let mut s = topo.connect(at).unwrap();
    s.write_all(b"ping\n").unwrap();
    let mut back = [0u8; 5];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::io::Read::read_exact(&mut s, &mut back).unwrap();
    assert_eq!(&back, b"ping\n");
    s
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn flows_end_at_their_max_duration() {
    let topo = Topology::new();
    let backend = Peer::node_server(&topo, "b1");
    let echo = Backend::echo(&topo);
    let routes = [("/pass", "max_duration: 1s"), ("/insp", "mode: inspect; max_duration: 1s"), ("/long", "")];
    let listeners =
        format!("{}{}", ws_routes(backend.addr, &routes), tcp_listener("t", echo.addr, "    max_duration: 1s\n"));
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let at = gw.listener("w");
    let mut held: Vec<Held> = ["/pass", "/insp", "/long"]
        .iter()
        .map(|p| Held::py_client(&topo, &["wait-close", &format!("ws://{at}{p}")]))
        .collect();
    for h in &mut held {
        assert_eq!(h.line(Duration::from_secs(30)), "OPEN 1");
    }
    let mut tcp = tcp_flow(&topo, gw.listener("t"));
    // Inspect mode says goodbye with 1001; passthrough (in the kernel here)
    // and TCP end with a FIN.
    let r: serde_json::Value = serde_json::from_str(&held[1].line(Duration::from_secs(30))).unwrap();
    assert_eq!(
        (r["close_code"].as_u64(), r["close_reason"].as_str()),
        (Some(1001), Some("max duration reached")),
        "{r}"
    );
    let r: serde_json::Value = serde_json::from_str(&held[0].line(Duration::from_secs(30))).unwrap();
    assert!(r["close_code"].is_null(), "passthrough carries no close frame of the gateway's: {r}");
    assert!(read_until_closed(&mut tcp, Duration::from_secs(30)).is_ok(), "the TCP flow was not ended");
    gw.wait_for("only the unlimited route's flow left", Duration::from_secs(15), |g| {
        let f = g.flows();
        f.len() == 1 && f[0]["route"].as_str().is_some_and(|r| r.ends_with("/long"))
    });
    assert_eq!(gw.listener_stats("w")["closed"]["max-duration"], 2);
    assert_eq!(gw.listener_stats("t")["closed"]["max-duration"], 1);
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn a_reload_closes_the_flows_of_changed_routes_that_say_so() {
    let topo = Topology::new();
    let (b1, b2) = (Peer::node_server(&topo, "b1"), Peer::node_server(&topo, "b2"));
    let (e1, e2) = (Backend::echo(&topo), Backend::echo(&topo));
    // /moved and /kept-policy get a new backend; /same does not change.
    let before = [("/moved", "mode: inspect; on_change: close"), ("/same", "on_change: close"), ("/kept-policy", "")];
    let tcp = |close_to: std::net::SocketAddr, keep_to: std::net::SocketAddr| {
        format!("{}{}", tcp_listener("tc", close_to, "    on_change: close\n"), tcp_listener("tk", keep_to, ""))
    };
    let listeners = format!("{}{}", ws_routes(b1.addr, &before), tcp(e1.addr, e1.addr));
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let at = gw.listener("w");
    let mut held: Vec<Held> = ["/moved", "/same", "/kept-policy"]
        .iter()
        .map(|p| Held::py_client(&topo, &["wait-close", &format!("ws://{at}{p}")]))
        .collect();
    for h in &mut held {
        assert_eq!(h.line(Duration::from_secs(30)), "OPEN 1");
    }
    let (mut tc, mut tk) = (tcp_flow(&topo, gw.listener("tc")), tcp_flow(&topo, gw.listener("tk")));
    gw.wait_for("five flows carried", Duration::from_secs(10), |g| g.flows().len() == 5);

    // Each route and listener as before, but with the other backend where
    // it says so; /same keeps its settings but sits behind routes that moved.
    let mut after = ws_routes(b2.addr, &[before[0]]);
    after += &ws_routes(b1.addr, &[before[1]]).lines().skip(4).map(|l| format!("{l}\n")).collect::<String>();
    after += &ws_routes(b2.addr, &[before[2]]).lines().skip(4).map(|l| format!("{l}\n")).collect::<String>();
    after += &tcp(e2.addr, e2.addr);
    gw.rewrite(&after);
    let (ok, out) = gw.reload();
    assert!(ok && out.contains("2 flow(s) of changed routes closing"), "{out}");

    let r: serde_json::Value = serde_json::from_str(&held[0].line(Duration::from_secs(30))).unwrap();
    assert_eq!((r["close_code"].as_u64(), r["close_reason"].as_str()), (Some(1001), Some("route changed")), "{r}");
    assert!(read_until_closed(&mut tc, Duration::from_secs(30)).is_ok(), "tc's flow was kept");
    gw.wait_for("the two flows gone", Duration::from_secs(15), |g| g.flows().len() == 3);
    // Both listeners' counters started over with their new backend lists;
    // the flow log says how each flow ended.
    let log = gw.log_text();
    let ended = |l: &str| {
        log.lines()
            .filter(|x| {
                x.contains("flow close")
                    && x.contains(&format!("listener={l} "))
                    && x.contains("cause=\"route-changed\"")
            })
            .count()
    };
    assert_eq!((ended("w"), ended("tc"), ended("tk")), (1, 1, 0), "{log}");
    // The others go on, on their old backends: one more echo each.
    let mut tk2 = tk.try_clone().unwrap();
    tk2.write_all(b"more\n").unwrap();
    let mut back = [0u8; 5];
    std::io::Read::read_exact(&mut tk, &mut back).unwrap();
    assert_eq!(&back, b"more\n");
    let routes: Vec<String> = gw.flows().iter().filter_map(|f| f["route"].as_str().map(String::from)).collect();
    assert!(
        routes.iter().any(|r| r.ends_with("/same")) && routes.iter().any(|r| r.ends_with("/kept-policy")),
        "{routes:?}"
    );
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn a_hot_upgrade_keeps_the_routes_limits_on_the_flows_it_moves() {
    let topo = Topology::new();
    let backend = Peer::node_server(&topo, "b1");
    let routes = [("/capped", "max_connections: 1"), ("/short", "idle_timeout: 3s"), ("/long", "")];
    let listeners = ws_routes(backend.addr, &routes)
        .replace("    protocol: websocket\n", "    protocol: websocket\n    idle_timeout: 1h\n");
    let old = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let at = old.listener("w");
    let mut held: Vec<Held> = ["/capped", "/long"]
        .iter()
        .map(|p| Held::py_client(&topo, &["hold", &format!("ws://{at}{p}"), "--count", "1"]))
        .collect();
    for h in &mut held {
        assert_eq!(h.line(Duration::from_secs(30)), "OPEN 1");
    }
    let new = old.take_over(&topo);
    new.wait_for("both flows moved", Duration::from_secs(15), |g| g.flows().len() == 2);
    // The moved flow holds the route's one place in the new daemon too.
    let v = py_client(&topo, &["echo", &format!("ws://{at}/capped"), "--sizes", "5"]);
    assert!(v["error"].as_str().unwrap_or_default().contains("503"), "{v}");
    // A flow moved on /short goes on with the route's idle_timeout, not the
    // listener's hour.
    let mut short = Held::py_client(&topo, &["wait-close", &format!("ws://{at}/short")]);
    assert_eq!(short.line(Duration::from_secs(30)), "OPEN 1");
    let newer = new.take_over(&topo);
    let _ = short.line(Duration::from_secs(30));
    newer.wait_for("the /short flow closed for idleness", Duration::from_secs(30), |g| {
        g.listener_stats("w")["closed"]["idle-timeout"] == 1
    });
    let v = py_client(&topo, &["echo", &format!("ws://{at}/capped"), "--sizes", "5"]);
    assert!(v["error"].as_str().unwrap_or_default().contains("503"), "{v}");
    for h in &mut held {
        h.go_on();
        assert_eq!(h.line(Duration::from_secs(30)), "CLOSED 1");
    }
}
