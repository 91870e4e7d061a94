//! Reload: 100 open flows (kernel and userspace) stay intact across 20
//! reloads, a bad file changes nothing, new flows get the new settings, and a
//! removed listener stops accepting while its flows go on.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use gateway_tests::*;

fn listener(name: &str, backend: SocketAddr, offload: &str, idle: &str) -> String {
    format!(
        "  - name: {name}\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{backend}\"]\n    offload: {offload}\n    idle_timeout: {idle}\n"
    )
}

/// One message through each flow, checked.
fn exchange(flows: &mut [TcpStream], round: usize) {
    for (i, s) in flows.iter_mut().enumerate() {
        let msg = format!("round {round} flow {i}\n");
        s.write_all(msg.as_bytes()).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.read_exact(&mut back).unwrap_or_else(|e| panic!("flow {i} after reload {round}: {e}"));
        assert_eq!(back, msg.as_bytes(), "flow {i} after reload {round}");
    }
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn hundred_flows_survive_twenty_reloads() {
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let base = format!("{}{}", listener("k", be.addr, "kernel", "1h"), listener("u", be.addr, "userspace", "1h"));
    let gw = Gateway::start(&topo, &GatewayConfig { listeners: base.clone(), extra: String::new() });
    let (k, u) = (gw.listener("k"), gw.listener("u"));
    let mut flows: Vec<TcpStream> =
        (0..60).map(|_| topo.connect(k).unwrap()).chain((0..40).map(|_| topo.connect(u).unwrap())).collect();
    gw.wait_for("100 flows", Duration::from_secs(30), |g| g.flows().len() == 100);
    exchange(&mut flows, 0);

    for round in 1..=20 {
        let (ok, msg) = match round {
            // A bad file: rejected, nothing changes.
            7 => {
                gw.rewrite(&format!("{base}    unknown_key: 1\n"));
                let r = gw.reload();
                assert!(!r.0, "a bad file was accepted: {}", r.1);
                assert!(r.1.contains("reload rejected") && r.1.contains("unknown_key"), "{}", r.1);
                (true, r.1)
            }
            // Listener u removed: it stops accepting, its flows go on.
            10 => {
                gw.rewrite(&listener("k", be.addr, "kernel", "1h"));
                gw.reload()
            }
            // Settings change on k: new flows use them (userspace now).
            15 => {
                gw.rewrite(&listener("k", be.addr, "userspace", "30m"));
                gw.reload()
            }
            _ => {
                let idle = if round % 2 == 0 { "1h" } else { "2h" };
                let l = if round < 10 {
                    format!("{}{}", listener("k", be.addr, "kernel", idle), listener("u", be.addr, "userspace", idle))
                } else if round < 15 {
                    listener("k", be.addr, "kernel", idle)
                } else {
                    listener("k", be.addr, "userspace", idle)
                };
                gw.rewrite(&l);
                gw.reload()
            }
        };
        assert!(ok, "reload {round} failed: {msg}");
        exchange(&mut flows, round);
        if round == 10 {
            assert!(
                matches!(topo.connect(u), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
                "the removed listener still accepts"
            );
        }
        if round == 15 {
            let mut fresh = topo.connect(k).unwrap();
            gw.wait_flow("the new flow", |f| f["path"] == "userspace" && f["listener"] == "k");
            exchange(std::slice::from_mut(&mut fresh), round);
        }
    }
    // The old flows kept their paths: 60 kernel, 40 userspace.
    let f = gw.flows();
    let kernel = f.iter().filter(|f| f["path"] == "kernel").count();
    assert_eq!(kernel, 60, "open flows changed path across reloads");
    assert!(gw.log_text().contains("reload rejected"), "{}", gw.log_text());
    drop(flows);
    gw.wait_idle();
}

/// SIGHUP reloads too: a listener added to the file starts accepting.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn sighup_reloads_the_file() {
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let gw = Gateway::start(
        &topo,
        &GatewayConfig { listeners: listener("a", be.addr, "kernel", "1h"), extra: String::new() },
    );
    gw.rewrite(&format!("{}{}", listener("a", be.addr, "kernel", "1h"), listener("b", be.addr, "auto", "1h")));
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(gw.pid() as i32, libc::SIGHUP) }, 0);
    gw.wait_for("listener b", Duration::from_secs(10), |g| {
        g.status()["listeners"].as_array().unwrap().iter().any(|l| l["name"] == "b")
    });
    let mut s = topo.connect(gw.listener("b")).unwrap();
    exchange(std::slice::from_mut(&mut s), 1);
    drop(s);
    gw.wait_idle();
}
