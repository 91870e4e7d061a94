//! TLS termination on tcp and websocket listeners, with real clients (Python
//! `ssl` and `websockets`, `openssl s_client`, curl) and test certificates
//! made by the openssl CLI.
use std::{fs, io::Write, net::SocketAddr, path::Path, time::Duration};

use gateway_tests::*;

fn tls_listener(name: &str, backend: SocketAddr, dir: &Path, extra: &str) -> String {
    let d = dir.display();
    format!(
        "  - name: {name}\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{backend}\"]\n    offload: auto\n    tls:\n      certificates:\n\
         \x20       - cert: {d}/a.gw.test.pem\n          key: {d}/a.gw.test.key\n          names: [\"a.gw.test\"]\n\
         \x20       - cert: {d}/b.gw.test.pem\n          key: {d}/b.gw.test.key\n          names: [\"b.gw.test\", \"*.b.gw.test\"]\n{extra}"
    )
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn terminated_flows_are_intact_and_certificates_follow_sni() {
    let dir = temp_dir("tls");
    test_certs(&dir, &["a.gw.test", "b.gw.test"]).expect("test certificates (openssl)");
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let listeners = tls_listener("t", be.addr, &dir, "      alpn: [\"echo/1\"]\n")
        + &tls_listener("t13", be.addr, &dir, "      min_version: \"1.3\"\n");
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let addr = gw.listener("t");
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let ca = dir.join("ca.pem");
    let ca = ca.to_str().unwrap();

    // 1 B to 16 MiB each way, checked by hash, on the certificate SNI picks.
    for size in ["1", "65536", "16777216"] {
        let r =
            tls_client(&topo, &[&host, &port, "--ca", ca, "--sni", "a.gw.test", "--size", size, "--alpn", "echo/1"]);
        assert_eq!(r["intact"], true, "{size} bytes: {r}");
        assert_eq!(r["names"], serde_json::json!(["a.gw.test"]), "{r}");
        assert_eq!((r["version"].as_str(), r["alpn"].as_str()), (Some("TLSv1.3"), Some("echo/1")), "{r}");
    }
    // A rustls client: the same bytes back, and close_notify answered by
    // close_notify once the backend has closed.
    let r = rustls_echo(&topo, addr, &dir.join("ca.pem"), "a.gw.test", 4 << 20);
    assert!(r.intact && r.clean_close && r.version == "TLSv1_3", "{r:?}");
    let r = tls_client(&topo, &[&host, &port, "--ca", ca, "--sni", "b.gw.test", "--size", "1000"]);
    assert_eq!((r["intact"].as_bool(), &r["names"]), (Some(true), &serde_json::json!(["b.gw.test"])), "{r}");
    // An unknown name gets the first certificate, which the client refuses.
    let r = tls_client(&topo, &[&host, &port, "--ca", ca, "--sni", "c.gw.test", "--size", "1"]);
    assert!(r["error"].as_str().unwrap_or_default().contains("c.gw.test"), "{r}");

    // openssl s_client agrees, and min_version 1.3 refuses TLS 1.2.
    let t13 = gw.listener("t13").to_string();
    let s_client = |target: &str, version: &str| {
        let (ok, out, err) = run_peer(
            &topo.client,
            "openssl",
            &["s_client", "-connect", target, "-servername", "b.gw.test", "-CAfile", ca, "-brief", version],
            Duration::from_secs(20),
        );
        (ok, format!("{out}{err}"))
    };
    let (_, text) = s_client(&addr.to_string(), "-tls1_2");
    assert!(text.contains("Protocol version: TLSv1.2") && text.contains("Verification: OK"), "{text}");
    let (_, text) = s_client(&t13, "-tls1_2");
    assert!(!text.contains("Protocol version: TLSv1.2"), "min_version 1.3 let TLS 1.2 through: {text}");
    let (_, text) = s_client(&t13, "-tls1_3");
    assert!(text.contains("Protocol version: TLSv1.3"), "{text}");

    // A client that does not speak TLS is counted and closed; no backend is contacted.
    let mut s = topo.connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(read_until_closed(&mut s, Duration::from_secs(20)).is_ok());
    gw.wait_idle();
    let v = gw.stats();
    let l = v["listeners"].as_array().unwrap().iter().find(|l| l["name"] == "t").unwrap().clone();
    // Turned away: the client that refused the default certificate, and the
    // one that spoke HTTP. Terminated: three a, one rustls, one b, one s_client.
    assert_eq!(l["rejected"]["tls-handshake"], 2, "{l}");
    assert_eq!(l["kernel_flows"], 0, "{l}");
    assert_eq!(l["userspace_by_reason"]["userspace-tls"], 6, "{l}");
    assert!(l["bytes"]["user_client_to_backend"].as_u64().unwrap() >= 16 << 20, "{l}");
    fs::remove_dir_all(dir).unwrap();
}

fn check(yaml: &str) -> (i32, String) {
    let dir = temp_dir("tlscfg");
    let f = dir.join("gateway.yaml");
    fs::write(&f, yaml).unwrap();
    let out = std::process::Command::new(gateway_bin()).args(["check", "--config"]).arg(&f).output().unwrap();
    let _ = fs::remove_dir_all(&dir);
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_tls_config_names_the_file_and_the_problem() {
    let dir = temp_dir("tlsbad");
    test_certs(&dir, &["a.gw.test", "b.gw.test"]).expect("test certificates (openssl)");
    fs::write(dir.join("junk.pem"), "not a certificate\n").unwrap();
    let d = dir.display();
    let yaml = |cert: &str, key: &str, extra: &str| {
        format!(
            "listeners:\n  - name: t\n    bind: \"127.0.0.1:0\"\n    backends: [\"127.0.0.1:9\"]\n{extra}    tls:\n      certificates:\n\
             \x20       - cert: {d}/{cert}\n          key: {d}/{key}\nadmin:\n  socket: /run/gateway/admin.sock\n"
        )
    };
    assert_eq!(check(&yaml("a.gw.test.pem", "a.gw.test.key", "")).0, 0);
    let cases = [
        (yaml("missing.pem", "a.gw.test.key", ""), vec!["listeners[0].tls.certificates", "missing.pem", "cannot read"]),
        (yaml("a.gw.test.pem", "b.gw.test.key", ""), vec!["b.gw.test.key", "does not match", "a.gw.test.pem"]),
        (yaml("junk.pem", "a.gw.test.key", ""), vec!["junk.pem", "no PEM"]),
        (yaml("a.gw.test.pem", "junk.pem", ""), vec!["junk.pem", "no PEM"]),
        (
            format!(
                "listeners:\n  - name: w\n    bind: \"127.0.0.1:0\"\n    protocol: websocket\n    routes:\n\
                 \x20     - backends: [\"127.0.0.1:9\"]\n    tls:\n      alpn: [\"h2\", \"h3\", \"http/1.1\"]\n      certificates:\n\
                 \x20       - cert: {d}/a.gw.test.pem\n          key: {d}/a.gw.test.key\nadmin:\n  socket: /run/gateway/admin.sock\n"
            ),
            vec!["listeners[0].tls.alpn[1]", "\"h3\" is not offered", "\"h2\" and \"http/1.1\" only"],
        ),
    ];
    for (y, needles) in cases {
        let (code, err) = check(&y);
        assert_ne!(code, 0, "accepted:\n{y}");
        for n in needles {
            assert!(err.contains(n), "{err:?} does not say {n:?}");
        }
    }
    fs::remove_dir_all(dir).unwrap();
}

/// `gateway check` accepts certificates clients will refuse today (the
/// operator may be about to replace them) but warns, naming the file and the
/// date; the daemon logs the same.
#[test]
fn expired_or_not_yet_valid_certificates_are_warned_of() {
    let dir = temp_dir("tlsdates");
    test_certs(&dir, &["a.gw.test"]).expect("test certificates (openssl)");
    dated_cert(&dir, "old.gw.test", "20200101000000Z", "20200201000000Z").expect("test certificates (openssl)");
    dated_cert(&dir, "new.gw.test", "20990101000000Z", "20990201000000Z").expect("test certificates (openssl)");
    let d = dir.display();
    let yaml = |name: &str| {
        format!(
            "listeners:\n  - name: t\n    bind: \"127.0.0.1:0\"\n    backends: [\"127.0.0.1:9\"]\n    tls:\n      certificates:\n\
             \x20       - cert: {d}/{name}.pem\n          key: {d}/{name}.key\nadmin:\n  socket: /run/gateway/admin.sock\n"
        )
    };
    for (name, needles) in [
        (
            "old.gw.test",
            vec!["warning: listeners[0].tls.certificates (t)", "old.gw.test.pem", "expired on 2020-02-01 00:00 UTC"],
        ),
        ("new.gw.test", vec!["new.gw.test.pem", "not valid before 2099-01-01 00:00 UTC"]),
    ] {
        let (code, err) = check(&yaml(name));
        assert_eq!(code, 0, "{name}: a warning is not an error: {err}");
        for n in needles {
            assert!(err.contains(n), "{err:?} does not say {n:?}");
        }
    }
    let (code, err) = check(&yaml("a.gw.test"));
    assert_eq!((code, err.contains("warning")), (0, false), "{err}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn sni_routes_terminate_pass_through_in_the_kernel_or_reject() {
    let dir = temp_dir("sni");
    test_certs(&dir, &["a.gw.test", "b.gw.test"]).expect("test certificates (openssl)");
    let topo = Topology::new();
    let plain = Backend::echo(&topo);
    // b.gw.test's TLS is the backend's own: the gateway never decrypts it.
    let tls_backend = Peer::tls_echo_server(&topo, &dir.join("b.gw.test.pem"), &dir.join("b.gw.test.key"));
    let d = dir.display();
    let listeners = format!(
        "  - name: s\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    offload: kernel\n    tls:\n      certificates:\n\
         \x20       - cert: {d}/a.gw.test.pem\n          key: {d}/a.gw.test.key\n    routes:\n\
         \x20     - sni: a.gw.test\n        mode: terminate\n        backends: [\"{}\"]\n\
         \x20     - sni: b.gw.test\n        mode: passthrough\n        backends: [\"{}\"]\n\
         \x20     - sni: \"*.blocked.test\"\n        mode: reject\n",
        plain.addr, tls_backend.addr
    );
    // A bound above the 16 MiB in flight, so flow control never passes the
    // passthrough flow's bytes to the daemon (`flow_control.rs` covers that).
    let extra = "kernel:\n  max_queued_per_flow: 64MiB\n".to_string();
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra });
    let addr = gw.listener("s");
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let ca = dir.join("ca.pem");
    let ca = ca.to_str().unwrap();
    const SIZE: u64 = 16 << 20;
    let size = SIZE.to_string();

    let r = tls_client(&topo, &[&host, &port, "--ca", ca, "--sni", "a.gw.test", "--size", &size]);
    assert_eq!((r["intact"].as_bool(), &r["names"]), (Some(true), &serde_json::json!(["a.gw.test"])), "{r}");
    let r = tls_client(&topo, &[&host, &port, "--ca", ca, "--sni", "b.gw.test", "--size", &size]);
    assert_eq!((r["intact"].as_bool(), &r["names"]), (Some(true), &serde_json::json!(["b.gw.test"])), "{r}");
    for sni in ["x.blocked.test", "unknown.gw.test"] {
        let r = tls_client(&topo, &[&host, &port, "--ca", ca, "--sni", sni, "--size", "1"]);
        assert!(r.get("error").is_some(), "{sni} was served: {r}");
    }
    gw.wait_idle();
    let v = gw.stats();
    let l = &v["listeners"][0];
    assert_eq!(l["rejected"]["sni-reject"], 2, "{l}");
    assert_eq!(l["userspace_by_reason"]["userspace-tls"], 1, "{l}");
    // The passthrough flow's ciphertext (ClientHello included) went through
    // the kernel path; the daemon copied none of it.
    assert_eq!(l["kernel_flows"], 1, "{l}");
    let b = l["backends"].as_array().unwrap().iter().find(|b| b["address"] == tls_backend.addr.to_string()).unwrap();
    assert!(b["bytes"]["kernel_client_to_backend"].as_u64().unwrap() > SIZE, "{b}");
    assert!(b["bytes"]["kernel_backend_to_client"].as_u64().unwrap() > SIZE, "{b}");
    assert_eq!(b["bytes"]["user_client_to_backend"], 0, "{b}");
    assert_eq!(b["bytes"]["user_backend_to_client"], 0, "{b}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_sni_routes_are_named() {
    let base = |routes: &str, extra: &str| {
        format!(
            "listeners:\n  - name: t\n    bind: \"127.0.0.1:0\"\n{extra}    routes:\n{routes}admin:\n  socket: /run/gateway/admin.sock\n"
        )
    };
    let pass = "      - sni: a.test\n        mode: passthrough\n        backends: [\"127.0.0.1:9\"]\n";
    assert_eq!(check(&base(pass, "")).0, 0);
    let cases = [
        (base(pass, "    backends: [\"127.0.0.1:8\"]\n"), vec!["listeners[0].routes", "not both"]),
        (base(&pass.replace("passthrough", "terminate"), ""), vec!["listeners[0].tls", "is required"]),
        (base(&format!("{pass}{pass}"), ""), vec!["listeners[0].routes[1].sni", "conflicts with routes[0]"]),
        (
            base("      - sni: a.test\n        mode: reject\n        backends: [\"127.0.0.1:9\"]\n", ""),
            vec!["listeners[0].routes[0].backends", "reject"],
        ),
        (base(&pass.replace("passthrough", "sniff"), ""), vec!["listeners[0].routes[0].mode", "\"sniff\""]),
        (
            base("      - sni: a.test\n        mode: passthrough\n", ""),
            vec!["listeners[0].routes[0].backends", "required"],
        ),
    ];
    for (y, needles) in cases {
        let (code, err) = check(&y);
        assert_ne!(code, 0, "accepted:\n{y}");
        for n in needles {
            assert!(err.contains(n), "{err:?} does not say {n:?}");
        }
    }
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn mtls_accepts_a_client_certificate_and_refuses_none() {
    let dir = temp_dir("mtls");
    test_certs(&dir, &["a.gw.test", "b.gw.test", "client.gw.test"]).expect("test certificates (openssl)");
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let d = dir.display();
    let listeners = tls_listener("m", be.addr, &dir, &format!("      client_ca: {d}/ca.pem\n"));
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let addr = gw.listener("m");
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let (ca, cert, key) = (format!("{d}/ca.pem"), format!("{d}/client.gw.test.pem"), format!("{d}/client.gw.test.key"));
    let r = tls_client(
        &topo,
        &[&host, &port, "--ca", &ca, "--sni", "a.gw.test", "--size", "100000", "--cert", &cert, "--key", &key],
    );
    assert_eq!(r["intact"], true, "{r}");
    let r = tls_client(&topo, &[&host, &port, "--ca", &ca, "--sni", "a.gw.test", "--size", "100000"]);
    assert!(r.get("error").is_some(), "a client without a certificate was served: {r}");
    gw.wait_idle();
    let v = gw.stats();
    assert_eq!(v["listeners"][0]["rejected"]["tls-handshake"], 1, "{v}");
    assert_eq!(v["listeners"][0]["userspace_by_reason"]["userspace-tls"], 1, "{v}");
    fs::remove_dir_all(dir).unwrap();
}

/// A reload swaps the certificates for new connections; an established TLS
/// flow goes on untouched.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn certificates_reload_without_dropping_flows() {
    let dir = temp_dir("tlsreload");
    test_certs(&dir, &["a.gw.test", "b.gw.test"]).expect("test certificates (openssl)");
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let d = dir.display();
    let listener = |certs: &[&str]| {
        let mut l = format!(
            "  - name: r\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{}\"]\n    tls:\n      certificates:\n",
            be.addr
        );
        for c in certs {
            l += &format!("        - cert: {d}/{c}.pem\n          key: {d}/{c}.key\n          names: [\"{c}\"]\n");
        }
        l
    };
    let gw = Gateway::start(&topo, &GatewayConfig { listeners: listener(&["a.gw.test"]), extra: String::new() });
    let addr = gw.listener("r");
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let ca = format!("{d}/ca.pem");
    let mut held = Held::python(
        &topo,
        "tests/peers/tls_client.py",
        &[&host, &port, "--ca", &ca, "--sni", "a.gw.test", "--size", "1048576", "--hold"],
    );
    assert_eq!(held.line(Duration::from_secs(30)), "OPEN");
    // Before the reload, b.gw.test gets a.gw.test's certificate (the default).
    let r = tls_client(&topo, &[&host, &port, "--ca", &ca, "--sni", "b.gw.test", "--size", "1"]);
    assert!(r.get("error").is_some(), "{r}");

    let cfg =
        format!("listeners:\n{}\nadmin:\n  socket: {}\n", listener(&["a.gw.test", "b.gw.test"]), gw.admin.display());
    fs::write(gw.dir.join("gateway.yaml"), cfg).unwrap();
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(gw.pid() as i32, libc::SIGHUP) }, 0);
    gw.wait_for("b.gw.test's certificate after the reload", Duration::from_secs(20), |_| {
        let r = tls_client(&topo, &[&host, &port, "--ca", &ca, "--sni", "b.gw.test", "--size", "1"]);
        r["names"] == serde_json::json!(["b.gw.test"])
    });
    // The flow opened before the reload still carries 1 MiB intact.
    held.go_on();
    let r: Value = serde_json::from_str(&held.line(Duration::from_secs(60))).unwrap();
    assert_eq!((r["intact"].as_bool(), &r["names"]), (Some(true), &serde_json::json!(["a.gw.test"])), "{r}");
    gw.wait_idle();
    fs::remove_dir_all(dir).unwrap();
}

/// `backend_tls`: TLS to the backend, verified against the configured CA and
/// name; a backend that fails verification counts as a failed connect.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn tls_to_backends_is_verified() {
    let dir = temp_dir("orig");
    test_certs(&dir, &["a.gw.test", "b.gw.test"]).expect("test certificates (openssl)");
    let topo = Topology::new();
    let tls_backend = Peer::tls_echo_server(&topo, &dir.join("b.gw.test.pem"), &dir.join("b.gw.test.key"));
    let d = dir.display();
    let listener = |name: &str, sni: &str| {
        format!(
            "  - name: {name}\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{}\"]\n    backend_tls:\n      ca: {d}/ca.pem\n      sni: {sni}\n",
            tls_backend.addr
        )
    };
    let listeners = listener("good", "b.gw.test") + &listener("wrong", "wrong.gw.test");
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    // Every byte comes back before the client closes: a client FIN becomes
    // close_notify, and many TLS servers (asyncio's among them) treat that as
    // a full close.
    let s = topo.connect(gw.listener("good")).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || Pattern(3).send(&mut w, 4 << 20));
    let mut r = s.try_clone().unwrap();
    Pattern(3).expect(&mut r, 4 << 20, false).unwrap();
    writer.join().unwrap().unwrap();
    drop((s, r));
    let mut s = topo.connect(gw.listener("wrong")).unwrap();
    assert!(read_until_closed(&mut s, Duration::from_secs(20)).is_ok());
    gw.wait_idle();
    let log = gw.log_text();
    assert!(log.contains("backend TLS failed") && log.contains("wrong.gw.test"), "{log}");
    let v = gw.stats();
    let l = |n: &str| v["listeners"].as_array().unwrap().iter().find(|l| l["name"] == n).unwrap().clone();
    assert_eq!(l("good")["userspace_by_reason"]["userspace-tls"], 1, "{v}");
    assert!(l("good")["bytes"]["user_client_to_backend"].as_u64().unwrap() >= 4 << 20, "{v}");
    assert_eq!(l("wrong")["backends"][0]["connect_failures"], 1, "{v}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn wss_is_terminated_on_websocket_listeners() {
    let dir = temp_dir("wss");
    test_certs(&dir, &["ws.gw.test"]).expect("test certificates (openssl)");
    let topo = Topology::new();
    let node = Peer::node_server(&topo, "n1");
    let d = dir.display();
    let listeners = format!(
        "  - name: w\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    protocol: websocket\n    offload: auto\n    tls:\n      certificates:\n\
         \x20       - cert: {d}/ws.gw.test.pem\n          key: {d}/ws.gw.test.key\n    routes:\n\
         \x20     - path_prefix: /ws\n        backends: [\"{n}\"]\n\
         \x20     - path_prefix: /inspect\n        backends: [\"{n}\"]\n        mode: inspect\n\
         \x20     - path_prefix: /\n        backends: [\"{n}\"]\n",
        n = node.addr
    );
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let addr = gw.listener("w");
    let ca = dir.join("ca.pem");
    let ca = ca.to_str().unwrap();

    // Python `websockets` over wss, 1 B to 16 MiB each way, every byte
    // compared, on a passthrough route and on an inspect route.
    let sizes = "1,125,65536,1048576,16777216";
    for path in ["/ws/room", "/inspect/room"] {
        let url = format!("wss://{addr}{path}");
        let r = py_client(&topo, &["echo", &url, "--ca", ca, "--sni", "ws.gw.test", "--sizes", sizes]);
        assert!(r.get("error").is_none(), "{path}: {r}");
        assert_eq!(r["echoed"], 10, "{path}: {r}");
        assert_eq!(r["close_code"], 4000, "{path}: {r}");
    }
    // A certificate for another name is refused by the client.
    let url = format!("wss://{addr}/ws/room");
    let r = py_client(&topo, &["echo", &url, "--ca", ca, "--sni", "other.gw.test", "--sizes", "1"]);
    assert!(r["error"].as_str().is_some_and(|e| e.contains("CERTIFICATE_VERIFY_FAILED")), "{r}");

    // Plain HTTPS on the same listener, ALPN http/1.1; the backend learns the
    // client came over TLS.
    let resolve = format!("ws.gw.test:{}:{}", addr.port(), addr.ip());
    let base = format!("https://ws.gw.test:{}", addr.port());
    let (status, head, body) = curl(&topo, &["--cacert", ca, "--resolve", &resolve, &format!("{base}/headers")]);
    assert_eq!(status, 200, "{head}\n{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["headers"]["x-forwarded-proto"], "https", "{v}");
    assert!(v["headers"]["forwarded"].as_str().unwrap().contains("proto=https"), "{v}");
    let (_, _, alpn) = run_peer(
        &topo.client,
        "curl",
        &["-s", "-o", "/dev/null", "-v", "--cacert", ca, "--resolve", &resolve, &format!("{base}/page")],
        Duration::from_secs(30),
    );
    assert!(alpn.contains("ALPN: server accepted http/1.1"), "{alpn}");

    // Every WebSocket stayed in user space, as TLS must here, and says so.
    gw.wait_idle();
    let v = gw.stats();
    let l = v["listeners"].as_array().unwrap().iter().find(|l| l["name"] == "w").unwrap().clone();
    assert_eq!(l["kernel_flows"], 0, "{l}");
    assert!(l["userspace_by_reason"]["userspace-tls"].as_u64().unwrap() >= 1, "{l}");
    assert!(l["userspace_by_reason"]["websocket-inspect"].as_u64().unwrap() >= 1, "{l}");
    assert!(l["rejected"]["tls-handshake"].as_u64().unwrap() >= 1, "{l}");
    assert!(l["bytes"]["user_client_to_backend"].as_u64().unwrap() >= 2 * (16 << 20), "{l}");
    fs::remove_dir_all(dir).unwrap();
}
