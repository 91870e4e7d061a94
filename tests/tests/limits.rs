//! Limits and access control: each rule turns away exactly the connections
//! it should, before any backend is contacted, and counts them by cause.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use gateway_tests::*;

/// An echo backend that counts the connections it accepted.
fn counting_backend(topo: &Topology) -> (Backend, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    let be = Backend::spawn(topo, move |mut s| {
        c.fetch_add(1, Ordering::SeqCst);
        let _ = echo_conn(&mut s);
    });
    (be, n)
}

fn gateway(topo: &Topology, backend: SocketAddr, rules: &str, extra: &str) -> Gateway {
    let listeners = format!(
        "  - name: t\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{backend}\"]\n    offload: kernel\n{rules}\
         \x20 - name: t6\n    bind: \"[{GW_CLIENT_SIDE_IP6}]:0\"\n    backends: [\"{backend}\"]\n    offload: kernel\n{rules}"
    );
    Gateway::start(topo, &GatewayConfig { listeners, extra: extra.into() })
}

/// Served: an echo comes back.
fn served(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if s.write_all(b"ping").is_err() {
        return false;
    }
    let mut b = [0u8; 4];
    s.read_exact(&mut b).is_ok() && &b == b"ping"
}

/// Turned away: the gateway closes the connection without a byte (its RST
/// may even beat the end of connect()).
fn turned_away(s: std::io::Result<TcpStream>) -> bool {
    match s {
        Ok(mut s) => matches!(read_until_closed(&mut s, Duration::from_secs(10)), Ok(0) | Err(_)),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

fn rejected(gw: &Gateway, listener: &str, cause: &str) -> u64 {
    let v = gw.stats();
    let l = v["listeners"].as_array().unwrap().iter().find(|l| l["name"] == listener).unwrap().clone();
    l["rejected"][cause].as_u64().unwrap_or(0)
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn acls_reject_exactly_what_they_list() {
    let topo = Topology::new();
    let (be, accepted) = counting_backend(&topo);
    // deny wins over allow; IPv4 and IPv6 prefixes.
    let gw = gateway(
        &topo,
        be.addr,
        "    allow: [\"10.0.0.0/8\", \"fd77::/16\"]\n    deny: [\"10.77.1.2\", \"fd77:1::/64\"]\n",
        "",
    );
    for name in ["t", "t6"] {
        assert!(turned_away(topo.connect(gw.listener(name))), "{name}: the denied client was served");
        assert_eq!(rejected(&gw, name, "denied"), 1);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "a denied client reached the backend");
    drop(gw);
    // An allow list without the client denies it; one with it serves it.
    let gw = gateway(&topo, be.addr, "    allow: [\"192.0.2.0/24\"]\n", "");
    assert!(turned_away(topo.connect(gw.listener("t"))));
    assert_eq!(rejected(&gw, "t", "denied"), 1);
    drop(gw);
    let gw = gateway(&topo, be.addr, "    allow: [\"10.77.1.0/24\"]\n", "");
    let mut s = topo.connect(gw.listener("t")).unwrap();
    assert!(served(&mut s));
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    drop(s);
    gw.wait_idle();
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn connection_caps_and_rates() {
    let topo = Topology::new();
    let (be, accepted) = counting_backend(&topo);

    // max_connections: 2 held, the third turned away, room again after a close.
    let gw = gateway(&topo, be.addr, "    max_connections: 2\n", "");
    let addr = gw.listener("t");
    let mut held: Vec<TcpStream> = (0..2).map(|_| topo.connect(addr).unwrap()).collect();
    for s in &mut held {
        assert!(served(s));
    }
    assert!(turned_away(topo.connect(addr)));
    assert_eq!(rejected(&gw, "t", "max-connections"), 1);
    held.pop();
    gw.wait_for("a free place", Duration::from_secs(10), |g| g.flows().len() == 1);
    let mut again = topo.connect(addr).unwrap();
    assert!(served(&mut again));
    drop((held, again));
    gw.wait_idle();
    drop(gw);

    // Per source: one at a time from this client.
    let gw = gateway(&topo, be.addr, "    max_connections_per_source: 1\n", "");
    let addr = gw.listener("t");
    let mut first = topo.connect(addr).unwrap();
    assert!(served(&mut first));
    assert!(turned_away(topo.connect(addr)));
    assert_eq!(rejected(&gw, "t", "max-connections-per-source"), 1);
    drop(first);
    gw.wait_idle();
    drop(gw);

    // Rates: two new connections an hour, per listener and per source.
    for (key, cause) in [("connection_rate", "rate-limit"), ("connection_rate_per_source", "source-rate-limit")] {
        let gw = gateway(&topo, be.addr, &format!("    {key}: \"2/h\"\n"), "");
        let addr = gw.listener("t");
        for _ in 0..2 {
            let mut s = topo.connect(addr).unwrap();
            assert!(served(&mut s), "{key}: within the rate");
        }
        assert!(turned_away(topo.connect(addr)), "{key}: over the rate");
        assert_eq!(rejected(&gw, "t", cause), 1);
        gw.wait_idle();
    }

    // The global cap spans listeners.
    let before = accepted.load(Ordering::SeqCst);
    let gw = gateway(&topo, be.addr, "", "limits:\n  max_connections: 1\n");
    let mut a = topo.connect(gw.listener("t")).unwrap();
    assert!(served(&mut a));
    assert!(turned_away(topo.connect(gw.listener("t6"))));
    assert_eq!(rejected(&gw, "t6", "global-max-connections"), 1);
    assert_eq!(accepted.load(Ordering::SeqCst), before + 1, "a rejected client reached the backend");
    drop(a);
    gw.wait_idle();
}

fn backend_report(gw: &Gateway, addr: SocketAddr) -> Value {
    gw.stats()["listeners"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addr.to_string())
        .unwrap()
        .clone()
}

/// Passive health: a backend that refuses is ejected after `failures`
/// consecutive failures and gets no new flows; with every backend ejected the
/// client is closed with a clear reason. Active checks bring it back.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn failing_backends_are_ejected_and_come_back() {
    let topo = Topology::new();
    let (good, _) = counting_backend(&topo);
    // A port that refuses now and will be served later: keep the listener
    // socket's address, close it, reopen it for the comeback.
    let dead_l = topo.backend_listener();
    let dead = dead_l.local_addr().unwrap();
    drop(dead_l);
    let listeners = format!(
        "  - name: t\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{dead}\", \"{}\"]\n    offload: kernel\n    balance: round_robin\n    connect_attempts: 2\n    health:\n      failures: 1\n      eject_for: 1h\n      interval: 300ms\n      timeout: 200ms\n",
        good.addr
    );
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let addr = gw.listener("t");
    gw.wait_for("the dead backend to be ejected", Duration::from_secs(10), |g| backend_report(g, dead)["up"] == false);
    let fails = backend_report(&gw, dead)["connect_failures"].as_u64().unwrap();
    for _ in 0..4 {
        let mut s = topo.connect(addr).unwrap();
        assert!(served(&mut s));
    }
    assert_eq!(
        backend_report(&gw, dead)["connect_failures"].as_u64().unwrap(),
        fails,
        "clients were sent to an ejected backend"
    );
    assert_eq!(backend_report(&gw, good.addr)["flows"], 4);
    gw.wait_idle();

    // The backend comes back: the active check puts it back in rotation.
    let revived = Topology::in_ns(&topo.backend, move || std::net::TcpListener::bind(dead).unwrap());
    let _revived = Backend::serve(revived, |mut s| {
        let _ = echo_conn(&mut s);
    });
    gw.wait_for("the revived backend to be up", Duration::from_secs(10), |g| backend_report(g, dead)["up"] == true);
    assert!(gw.log_text().contains("back in rotation"), "{}", gw.log_text());
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn all_backends_down_is_said_plainly() {
    let topo = Topology::new();
    let dead = topo.backend_listener().local_addr().unwrap();
    let listeners = format!(
        "  - name: t\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{dead}\"]\n    offload: kernel\n    health:\n      failures: 1\n      eject_for: 1h\n"
    );
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let addr = gw.listener("t");
    for _ in 0..2 {
        assert!(turned_away(topo.connect(addr)));
    }
    gw.wait_idle();
    let log = gw.log_text();
    assert!(log.contains("backend ejected"), "{log}");
    assert!(log.contains("all 1 backend(s) are ejected"), "{log}");
    assert_eq!(backend_report(&gw, dead)["connect_failures"], 1, "the ejected backend was tried again");
}

/// A backend for send/expect checks: answers "PING\r\n" with `answer`, echoes
/// anything else.
fn pinging_backend(topo: &Topology, answer: &'static [u8]) -> Backend {
    Backend::spawn(topo, move |mut s| {
        let mut buf = [0u8; 4096];
        let Ok(n) = s.read(&mut buf) else { return };
        if buf[..n].starts_with(b"PING\r\n") {
            let _ = s.write_all(answer);
            return;
        }
        if n > 0 && s.write_all(&buf[..n]).is_ok() {
            let _ = echo_conn(&mut s);
        }
    })
}

/// Active send/expect checks eject a backend that accepts connections but
/// answers wrongly, and leave the one that answers right in rotation.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn send_expect_checks_eject_a_backend_that_answers_wrongly() {
    let topo = Topology::new();
    let good = pinging_backend(&topo, b"+PONG\r\n");
    let bad = pinging_backend(&topo, b"-ERR not ready\r\n");
    let listeners = format!(
        "  - name: t\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{}\", \"{}\"]\n    offload: kernel\n    health:\n      failures: 1\n      eject_for: 1h\n      interval: 200ms\n      timeout: 500ms\n      send: \"PING\\r\\n\"\n      expect: \"+PONG\"\n",
        bad.addr, good.addr
    );
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    gw.wait_for("the wrongly answering backend to be ejected", Duration::from_secs(10), |g| {
        backend_report(g, bad.addr)["up"] == false
    });
    assert_eq!(backend_report(&gw, good.addr)["up"], true);
    for _ in 0..4 {
        let mut s = topo.connect(gw.listener("t")).unwrap();
        assert!(served(&mut s));
    }
    assert_eq!(backend_report(&gw, good.addr)["flows"], 4);
    assert_eq!(backend_report(&gw, bad.addr)["flows"], 0);
    gw.wait_idle();
}
