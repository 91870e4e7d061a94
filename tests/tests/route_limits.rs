//! Per-route limits on long-lived connections (`max_connections` on a
//! WebSocket route), with Python `websockets` and curl against a Node
//! backend.
use std::time::Duration;

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
    let stats = gw.stats();
    let l = stats["listeners"].as_array().unwrap().iter().find(|l| l["name"] == "w").unwrap().clone();
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
        let s = g.stats();
        let l = s["listeners"].as_array().unwrap().iter().find(|l| l["name"] == "w").unwrap().clone();
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
    let s = gw.stats();
    let l = s["listeners"].as_array().unwrap().iter().find(|l| l["name"] == "w").unwrap().clone();
    assert_eq!(l["closed"]["idle-timeout"], 2, "{l}");
}
