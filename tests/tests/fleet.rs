//! A fleet of gateways sharing one configuration through a real three-member
//! etcd cluster (Debian's etcd-server), each node in a namespace of its own:
//! pushes, rejected documents, compare-and-swap, membership by lease, flows
//! that live through pushes, and etcd members, quorum and the whole cluster
//! going away.
use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Output,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use gateway_tests::*;

/// A node of the fleet: its own file (node-local settings and `fleet`) and
/// its cache, kept across restarts of its daemon.
fn start_node(net: &FleetNet, etcd: &EtcdCluster, i: usize, cache: &Path) -> Gateway {
    let endpoints = etcd.endpoints_yaml();
    Gateway::start_yaml(&net.topology(i), |admin, _| {
        format!(
            "admin:\n  socket: {}\nfleet:\n  etcd:\n    endpoints: {endpoints}\n    prefix: /fleet-test/\n  node: gw-{i}\n  cache: {}\n  status_ttl: 3s\n",
            admin.display(),
            cache.display()
        )
    })
}

/// `gateway ARGS` run on node `i`'s host.
fn gateway_cli(net: &FleetNet, i: usize, args: &[&str]) -> Output {
    Topology::cmd_in(&net.nodes[i], gateway_bin().to_str().unwrap()).args(args).output().expect("gateway CLI")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Pushes `doc` with node `i`'s file; the revision it was written at.
fn push(net: &FleetNet, gw: &Gateway, doc: &str) -> i64 {
    static PUSHES: AtomicU32 = AtomicU32::new(0);
    let file = gw.dir.join(format!("doc-{}.yaml", PUSHES.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&file, doc).unwrap();
    let node_file = gw.dir.join("gateway.yaml");
    let o = gateway_cli(net, 0, &["config", "push", file.to_str().unwrap(), "--config", node_file.to_str().unwrap()]);
    assert!(o.status.success(), "push failed: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    out.trim().rsplit(' ').next().and_then(|r| r.parse().ok()).unwrap_or_else(|| panic!("no revision in {out:?}"))
}

fn fleet_of(gw: &Gateway) -> Value {
    gw.status()["fleet"].clone()
}

fn wait_applied(gw: &Gateway, revision: i64) {
    gw.wait_for(&format!("revision {revision} applied"), Duration::from_secs(20), |g| {
        let f = fleet_of(g);
        f["applied_revision"] == revision && f["state"] == "applied"
    });
}

/// One round trip through `to`, with a pattern of `len` bytes.
fn echo_through(topo: &Topology, to: SocketAddr, seed: u64) {
    let s = topo.connect(to).unwrap_or_else(|e| panic!("connect {to}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    echo_roundtrip(&s, Pattern(seed), 4096).unwrap_or_else(|e| panic!("echo through {to}: {e}"));
}

/// Bytes both ways on a flow that stays open.
fn exchange(s: &TcpStream, p: Pattern, len: u64) -> Result<(), String> {
    let (mut w, mut r) = (s, s);
    p.send(&mut w, len).map_err(|e| format!("send failed: {e}"))?;
    p.expect(&mut r, len, false)
}

fn document(backend: SocketAddr, drain: &str) -> String {
    format!(
        "listeners:\n  - {{ name: k, bind: \"0.0.0.0:0\", backends: [\"{backend}\"], offload: kernel }}\n  \
         - {{ name: u, bind: \"0.0.0.0:0\", backends: [\"{backend}\"], offload: userspace }}\ndrain_timeout: {drain}\n"
    )
}

/// The node's listener `name`, as reached from the client host.
/// Runs `etcdctl get ARGS` until `done` holds on what it prints, for at most
/// 15 s; that output.
fn wait_etcd(etcd: &EtcdCluster, args: &[&str], what: &str, mut done: impl FnMut(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    loop {
        let (ok, out, err) = etcd.etcdctl(&all);
        if ok && done(&out) {
            return out;
        }
        assert!(Instant::now() < deadline, "{what}: {out}{err}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn listener_at(net: &FleetNet, gw: &Gateway, i: usize, name: &str) -> SocketAddr {
    SocketAddr::new(net.node_ip(i).parse().unwrap(), gw.listener(name).port())
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn a_push_reaches_every_node_a_bad_document_is_rejected_and_a_dead_node_leaves() {
    let net = FleetNet::new(3);
    let etcd = EtcdCluster::start(&net);
    let backend = Backend::echo(&net.topology(0));
    let caches = temp_dir("fleet-caches");
    let mut nodes: Vec<Gateway> =
        (0..3).map(|i| start_node(&net, &etcd, i, &caches.join(format!("gw-{i}.yaml")))).collect();
    // No document yet: every node runs, with no listener.
    for gw in &nodes {
        assert_eq!(gw.status()["listeners"].as_array().map(Vec::len), Some(0), "{}", gw.log_text());
    }

    // 1. A push reaches all three; each serves it, on the kernel path too.
    let rev = push(&net, &nodes[0], &document(backend.addr, "5s"));
    for (i, gw) in nodes.iter().enumerate() {
        wait_applied(gw, rev);
        let topo = net.topology(i);
        echo_through(&topo, listener_at(&net, gw, i, "u"), i as u64);
        let to = listener_at(&net, gw, i, "k");
        let s = topo.connect(to).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        exchange(&s, Pattern(7), 1000).unwrap();
        let f = gw.wait_flow("a kernel flow", |f| f["listener"] == "k");
        assert_eq!(f["path"], "kernel", "{f}");
    }
    // Their status keys say so (published right after applying).
    let parse = |out: &str| -> Vec<Value> { out.lines().filter_map(|l| serde_json::from_str(l).ok()).collect() };
    let out =
        wait_etcd(&etcd, &["--prefix", "--print-value-only", "/fleet-test/nodes/"], "the nodes' status keys", |out| {
            let s = parse(out);
            s.len() == 3 && s.iter().all(|s| s["revision"] == rev)
        });
    let statuses = parse(&out);
    for s in &statuses {
        assert_eq!(s["revision"], rev, "{s}");
        assert_eq!(s["state"], "applied", "{s}");
        assert_eq!(s["kernel_path"], true, "{s}");
        assert_eq!(s["listeners"].as_array().map(Vec::len), Some(2), "{s}");
    }

    // 2. A document written around `config push` that does not validate:
    // every node rejects it with the key-path message and keeps serving.
    let bad = format!(
        "listeners:\n  - {{ name: k, bind: \"0.0.0.0:0\", backends: [\"{}\"], offload: sometimes }}\n",
        backend.addr
    );
    let (ok, _, err) = etcd.etcdctl(&["put", "/fleet-test/config", &bad]);
    assert!(ok, "{err}");
    for (i, gw) in nodes.iter().enumerate() {
        gw.wait_for("the bad document rejected", Duration::from_secs(20), |g| fleet_of(g)["state"] == "rejected");
        let f = fleet_of(gw);
        assert!(f["error"].as_str().unwrap_or_default().contains("listeners[0].offload"), "{f}");
        assert_eq!(f["applied_revision"], rev, "{f}");
        echo_through(&net.topology(i), listener_at(&net, gw, i, "u"), 10 + i as u64);
    }
    let o = gateway_cli(
        &net,
        0,
        &["fleet", "status", "--json", "--config", nodes[0].dir.join("gateway.yaml").to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    let fs: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(fs["nodes"].as_array().map(Vec::len), Some(3), "{fs}");
    assert!(fs["nodes"].as_array().unwrap().iter().all(|n| n["state"] == "rejected" && n["error"].is_string()), "{fs}");
    // `config push` refuses the same document before writing anything.
    let bad_file = nodes[0].dir.join("bad.yaml");
    std::fs::write(&bad_file, &bad).unwrap();
    let node_file = nodes[0].dir.join("gateway.yaml");
    let o =
        gateway_cli(&net, 0, &["config", "push", bad_file.to_str().unwrap(), "--config", node_file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(text(&o).contains("listeners[0].offload"), "{}", text(&o));
    // A valid push afterwards applies.
    let rev2 = push(&net, &nodes[0], &document(backend.addr, "6s"));
    for gw in &nodes {
        wait_applied(gw, rev2);
    }

    // 8. A stale --expect-revision is refused, and nothing is written.
    let doc_file = nodes[0].dir.join("cas.yaml");
    std::fs::write(&doc_file, document(backend.addr, "7s")).unwrap();
    let stale = (rev2 - 1).to_string();
    let o = gateway_cli(
        &net,
        0,
        &[
            "config",
            "push",
            doc_file.to_str().unwrap(),
            "--config",
            node_file.to_str().unwrap(),
            "--expect-revision",
            &stale,
        ],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("refused"), "{}", text(&o));
    let o = gateway_cli(&net, 0, &["config", "get", "--config", node_file.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with(&format!("# /fleet-test/config at revision {rev2}\n")),
        "{}",
        text(&o)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("drain_timeout: 6s"), "{}", text(&o));
    // With the current revision it goes through.
    let current = rev2.to_string();
    let o = gateway_cli(
        &net,
        0,
        &[
            "config",
            "push",
            doc_file.to_str().unwrap(),
            "--config",
            node_file.to_str().unwrap(),
            "--expect-revision",
            &current,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));

    // The same content again, written another way: a new revision that
    // changes nothing (no listener rebound).
    let ports: Vec<u16> = nodes.iter().map(|g| g.listener("k").port()).collect();
    let same = format!("# the same, reformatted\n{}", document(backend.addr, "7s").replace("{ name", "{name"));
    let rev3 = push(&net, &nodes[0], &same);
    for (gw, port) in nodes.iter().zip(&ports) {
        wait_applied(gw, rev3);
        assert_eq!(gw.listener("k").port(), *port);
        assert!(gw.log_text().contains("the same document again"), "{}", gw.log_text());
    }
    // A deleted document changes nothing running.
    let (ok, _, err) = etcd.etcdctl(&["del", "/fleet-test/config"]);
    assert!(ok, "{err}");
    for (i, gw) in nodes.iter().enumerate() {
        gw.wait_for("the deletion logged", Duration::from_secs(20), |g| g.log_text().contains("was deleted"));
        assert_eq!(fleet_of(gw)["applied_revision"], rev3);
        echo_through(&net.topology(i), listener_at(&net, gw, i, "k"), 50 + i as u64);
    }

    // 7. A node killed with SIGKILL: its status key is gone within its TTL.
    let mut dead = nodes.pop().unwrap();
    dead.child.kill().unwrap();
    let _ = dead.child.wait();
    wait_etcd(&etcd, &["--prefix", "--keys-only", "/fleet-test/nodes/"], "gw-2's status outlived its lease", |keys| {
        !keys.contains("gw-2")
    });
    let o = gateway_cli(&net, 0, &["fleet", "status", "--config", node_file.to_str().unwrap()]);
    let table = text(&o);
    assert!(table.contains("gw-0") && table.contains("gw-1") && !table.contains("gw-2"), "{table}");
    drop(dead);
    let _ = std::fs::remove_dir_all(&caches);
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn a_hundred_flows_live_through_twenty_pushes() {
    let net = FleetNet::new(1);
    let etcd = EtcdCluster::start(&net);
    let topo = net.topology(0);
    let backend = Backend::echo(&topo);
    let ws = Peer::python_server(&topo);
    let caches = temp_dir("fleet-caches");
    let gw = start_node(&net, &etcd, 0, &caches.join("gw-0.yaml"));
    let spare = Backend::echo(&topo);
    // Each round changes what new flows get: u's backends, a listener x
    // added or removed, k's connect timeout.
    let doc = |round: u32| {
        let u_backends = if round.is_multiple_of(2) {
            format!("\"{}\"", backend.addr)
        } else {
            format!("\"{}\", \"{}\"", spare.addr, backend.addr)
        };
        let x = if round % 2 == 1 {
            format!("  - {{ name: x, bind: \"0.0.0.0:0\", backends: [\"{}\"] }}\n", spare.addr)
        } else {
            String::new()
        };
        format!(
            "listeners:\n  - {{ name: k, bind: \"0.0.0.0:0\", backends: [\"{b}\"], offload: kernel, connect_timeout: {t}s }}\n  \
             - {{ name: u, bind: \"0.0.0.0:0\", backends: [{u_backends}], offload: userspace }}\n  \
             - {{ name: w, bind: \"0.0.0.0:0\", protocol: websocket, routes: [{{ path_prefix: /, backends: [\"{w}\"] }}] }}\n\
             {x}drain_timeout: 5s\n",
            b = backend.addr,
            t = 2 + round,
            w = ws.addr
        )
    };
    let rev = push(&net, &gw, &doc(0));
    wait_applied(&gw, rev);
    let (k, u, w) = (listener_at(&net, &gw, 0, "k"), listener_at(&net, &gw, 0, "u"), listener_at(&net, &gw, 0, "w"));
    // 40 kernel, 40 user-space TCP flows and 20 WebSocket passthrough flows.
    let mut tcp: Vec<(TcpStream, u64)> = Vec::new();
    for i in 0..80u64 {
        let s = topo.connect(if i < 40 { k } else { u }).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        tcp.push((s, i));
    }
    let mut websockets: Vec<(TcpStream, Vec<u8>)> = Vec::new();
    for _ in 0..20 {
        let mut s = topo.connect(w).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        std::io::Write::write_all(&mut s, ws_upgrade_request("/", "fleet.test").as_bytes()).unwrap();
        let (head, rest) = read_http_head(&mut s).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        websockets.push((s, rest));
    }
    gw.wait_for("100 flows", Duration::from_secs(10), |g| g.status()["flows"] == 100);
    for round in 0..20u32 {
        // A push that changes the document (each applies)...
        let rev = push(&net, &gw, &doc(1 + round));
        wait_applied(&gw, rev);
        let has_x = gw.status()["listeners"].as_array().unwrap().iter().any(|l| l["name"] == "x");
        assert_eq!(has_x, round.is_multiple_of(2), "listener x after push {round}");
        // ...and every flow still carries its bytes intact, both ways.
        for (s, seed) in &tcp {
            exchange(s, Pattern(seed * 1000 + u64::from(round)), 2048)
                .unwrap_or_else(|e| panic!("flow {seed} after push {round}: {e}"));
        }
        for (i, (s, have)) in websockets.iter_mut().enumerate() {
            let payload: Vec<u8> = (0..512).map(|b| (b as u8) ^ (i as u8) ^ (round as u8)).collect();
            std::io::Write::write_all(s, &ws_frame(0x2, &payload, Some([1, 2, 3, 4]))).unwrap();
            let (op, got, rest) = read_ws_frame(s, std::mem::take(have)).unwrap();
            assert_eq!((op, got.as_slice()), (0x2, payload.as_slice()), "websocket {i} after push {round}");
            *have = rest;
        }
    }
    let f = gw.flows();
    assert_eq!(f.len(), 100, "every flow is still open");
    assert_eq!(
        f.iter().filter(|f| f["listener"] == "k" && f["path"] == "kernel").count(),
        40,
        "kernel flows stayed spliced"
    );
    drop(tcp);
    drop(websockets);
    let _ = std::fs::remove_dir_all(&caches);
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn nodes_ride_out_etcd_failures_compaction_and_a_restart_without_etcd() {
    let net = FleetNet::new(2);
    let mut etcd = EtcdCluster::start(&net);
    let backend = Backend::echo(&net.topology(0));
    let caches = temp_dir("fleet-caches");
    let cache: Vec<PathBuf> = (0..2).map(|i| caches.join(format!("gw-{i}.yaml"))).collect();
    // Daemons that handed over; dropped last (they share their successor's directory).
    let mut retired = Vec::new();
    let mut nodes: Vec<Gateway> = (0..2).map(|i| start_node(&net, &etcd, i, &cache[i])).collect();
    let rev = push(&net, &nodes[0], &document(backend.addr, "5s"));
    for gw in &nodes {
        wait_applied(gw, rev);
    }

    // A hot upgrade of a fleet node: the successor reads the document and
    // takes the listeners over, the old daemon leaves, and the node's status
    // key is the successor's.
    let mut old = nodes.remove(1);
    let new = old.take_over(&net.topology(1));
    wait_applied(&new, rev);
    let exit = old.wait_exit(Duration::from_secs(30)).expect("the old daemon did not exit");
    assert!(exit.success(), "{}", old.log_text());
    echo_through(&net.topology(1), listener_at(&net, &new, 1, "u"), 3);
    wait_etcd(
        &etcd,
        &["--print-value-only", "/fleet-test/nodes/gw-1"],
        "gw-1's status is not the successor's",
        |out| serde_json::from_str::<Value>(out.trim()).is_ok_and(|s| s["pid"] == new.pid()),
    );
    nodes.insert(1, new);
    retired.push(old);

    // The member serving the nodes' watches (the first, where they start)
    // hangs with its sockets open: the nodes notice from the keep-alive to
    // that member, go to another, and apply the next push.
    etcd.pause(0, true);
    let rev = push(&net, &nodes[0], &document(backend.addr, "4s"));
    for gw in &nodes {
        wait_applied(gw, rev);
    }
    etcd.pause(0, false);

    // 4. One member down: pushes still apply.
    etcd.stop(0);
    let rev = push(&net, &nodes[0], &document(backend.addr, "6s"));
    for gw in &nodes {
        wait_applied(gw, rev);
    }
    // Two down (no quorum): the gateways keep serving.
    etcd.stop(1);
    for (i, gw) in nodes.iter().enumerate() {
        gw.wait_for("etcd lost", Duration::from_secs(20), |g| fleet_of(g)["connected"] == false);
        echo_through(&net.topology(i), listener_at(&net, gw, i, "u"), 20 + i as u64);
        echo_through(&net.topology(i), listener_at(&net, gw, i, "k"), 30 + i as u64);
    }
    // Restored: a push applies everywhere.
    etcd.restart(0);
    etcd.restart(1);
    etcd.wait_healthy(&[0, 1, 2]);
    let rev = push(&net, &nodes[0], &document(backend.addr, "7s"));
    for gw in &nodes {
        wait_applied(gw, rev);
    }

    // 5. A node cut off while the history it would watch from is compacted
    // away converges once it is back.
    net.cut_off_etcd(1, true);
    nodes[1].wait_for("cut off", Duration::from_secs(20), |g| fleet_of(g)["connected"] == false);
    let mut last = rev;
    for d in 8..11 {
        last = push(&net, &nodes[0], &document(backend.addr, &format!("{d}s")));
    }
    let (ok, _, err) = etcd.etcdctl(&["compact", &last.to_string(), "--physical"]);
    assert!(ok, "{err}");
    // Cut off for longer than its status TTL (3 s): its lease is gone too.
    wait_etcd(
        &etcd,
        &["--prefix", "--keys-only", "/fleet-test/nodes/"],
        "gw-1's status outlived its lease while cut off",
        |keys| !keys.contains("gw-1"),
    );
    net.cut_off_etcd(1, false);
    wait_applied(&nodes[1], last);
    wait_applied(&nodes[0], last);
    // Back, it publishes again under a new lease, and stays applied.
    wait_etcd(
        &etcd,
        &["--print-value-only", "/fleet-test/nodes/gw-1"],
        "gw-1 did not publish its status again",
        |out| {
            serde_json::from_str::<Value>(out.trim())
                .is_ok_and(|s| s["applied_revision"] == last && s["state"] == "applied")
        },
    );
    assert_eq!(fleet_of(&nodes[1])["state"], "applied");

    // 6. All of etcd down, a node restarted: it serves from its cache.
    for i in 0..3 {
        etcd.stop(i);
    }
    drop(nodes.remove(0));
    let gw = start_node(&net, &etcd, 0, &cache[0]);
    let f = fleet_of(&gw);
    assert_eq!(f["applied_revision"], last, "{f}");
    assert_eq!(f["state"], "disconnected", "{f}");
    echo_through(&net.topology(0), listener_at(&net, &gw, 0, "u"), 40);
    drop(gw);
    drop(nodes);
    drop(retired);
    let _ = std::fs::remove_dir_all(&caches);
}
