//! HTTP/2 on a TLS websocket listener that offers `h2` (RFC 8441): Node's
//! own `http2` client opens WebSockets as extended CONNECT streams, several
//! on one connection, beside plain requests (curl and Node), while HTTP/1.1
//! clients (Python `websockets`, Node `ws`) keep working on the same port.
use std::{
    fs,
    io::{BufRead, BufReader, Write},
};

use gateway_tests::*;
use serde_json::Value;

/// Reads an HTTP/1.1 request head off a backend connection: its path.
fn request_path(s: &std::net::TcpStream) -> Option<String> {
    let mut r = BufReader::new(s);
    let mut first = String::new();
    r.read_line(&mut first).ok()?;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 || line == "\r\n" {
            break;
        }
    }
    first.split_whitespace().nth(1).map(String::from)
}

/// Listener `w`: websocket, TLS offering h2 and http/1.1 with the test
/// certificate for ws.gw.test in `dir`; `keys` are further listener lines,
/// `routes` its route lines.
fn h2_listener(dir: &std::path::Path, keys: &str, routes: &str) -> String {
    let d = dir.display();
    format!(
        "  - name: w\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    protocol: websocket\n{keys}    tls:\n      \
         alpn: [\"h2\", \"http/1.1\"]\n      certificates:\n        - cert: {d}/ws.gw.test.pem\n          \
         key: {d}/ws.gw.test.key\n    routes:\n{routes}"
    )
}

/// A Node client's arguments (h2_client.js, client.js) for `url`, verifying
/// ws.gw.test against `ca`.
fn h2_args<'a>(url: &'a str, ca: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![url, "--ca", ca, "--servername", "ws.gw.test"];
    args.extend_from_slice(more);
    args
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn websockets_over_http2_share_the_connection_and_the_port() {
    let dir = temp_dir("h2ws");
    test_certs(&dir, &["ws.gw.test"]).expect("test certificates (openssl)");
    let topo = Topology::new();
    let node = Peer::node_server(&topo, "n1");
    // Python `websockets` refuses an upgrade without a Sec-WebSocket-Key:
    // the gateway must send one of its own.
    let py = Peer::python_server(&topo);
    // A backend that answers /bad-accept with a 101 whose accept is wrong,
    // and anything else with its own refusal.
    let odd = Backend::spawn(&topo, |mut s| {
        let reply: &[u8] = match request_path(&s).as_deref() {
            Some("/odd/bad-accept") => {
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: c2VjcmV0IGtleSB0aGF0IGlzIHdyb25n\r\n\r\n"
            }
            _ => b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 17\r\n\r\nnot on this room\n",
        };
        let _ = s.write_all(reply);
    });
    let routes = format!(
        "      - path_prefix: /ws\n        backends: [\"{n}\"]\n\
         \x20     - path_prefix: /py\n        backends: [\"{p}\"]\n\
         \x20     - path_prefix: /inspect\n        backends: [\"{n}\"]\n        mode: inspect\n        max_message_size: 2MiB\n\
         \x20     - path_prefix: /odd\n        backends: [\"{o}\"]\n\
         \x20     - path_prefix: /guarded\n        backends: [\"{n}\"]\n        allowed_origins: [\"https://app.gw.test\"]\n\
         \x20     - path_prefix: /\n        backends: [\"{n}\"]\n",
        n = node.addr,
        p = py.addr,
        o = odd.addr,
    );
    let keys = "    max_concurrent_streams: 16\n    handshake_timeout: 2s\n    idle_timeout: 5m\n";
    let listeners = h2_listener(&dir, keys, &routes);
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let addr = gw.listener("w");
    let ca = dir.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let base = format!("https://{addr}");
    let h2 = |path: &str, more: &[&str]| {
        let url = format!("{base}{path}");
        node_h2_client(&topo, &h2_args(&url, ca, more))
    };
    // Every stream echoed each message whole, answered its ping, and closed
    // with the client's code; `want` streams in all.
    let all_echoed = |r: &Value, want: usize, sizes: usize| {
        assert!(r.get("error").is_none(), "{r}");
        assert_eq!(r["alpn"], "h2", "{r}");
        assert_eq!(r["connect_protocol"], true, "the gateway did not offer SETTINGS_ENABLE_CONNECT_PROTOCOL: {r}");
        assert_eq!(r["max_streams"], 16, "SETTINGS_MAX_CONCURRENT_STREAMS is not max_concurrent_streams: {r}");
        let streams = r["streams"].as_array().unwrap();
        assert_eq!(streams.len(), want, "{r}");
        for s in streams {
            assert!(s.get("error").is_none(), "{s}");
            assert_eq!(s["status"], 200, "{s}");
            assert_eq!(s["echoed"], 2 * sizes, "{s}");
            assert_eq!(s["pong"], format!("h2-ping-{}", s["stream"]), "{s}");
            assert_eq!((s["close_code"].as_u64(), s["close_reason"].as_str()), (Some(4001), Some("h2 done")), "{s}");
        }
    };

    // Passthrough: three WebSockets at once on one connection, 0 B to 1 MiB
    // each way, with a plain GET on the same connection first.
    let sizes = "0,1,125,126,65536,1048576";
    let r = h2("/ws/room?x=1", &["--streams", "3", "--sizes", sizes, "--get", "/page", "--protocol", "chat,superchat"]);
    all_echoed(&r, 3, 6);
    assert_eq!(r["get"]["status"], 200, "{r}");
    assert_eq!(r["get"]["body"], "page from n1 at /page\n", "{r}");
    for s in r["streams"].as_array().unwrap() {
        assert_eq!(s["protocol"], "chat", "the backend's subprotocol reaches the client: {s}");
    }
    // Towards a strict backend (Python `websockets`), and in inspect mode.
    all_echoed(&h2("/py/room", &["--streams", "2", "--sizes", sizes]), 2, 6);
    all_echoed(&h2("/inspect/room", &["--streams", "2", "--sizes", "0,1,65536,1048576"]), 2, 4);

    // Refusals reach the stream, not the connection: the route's origin
    // check, no route at all, the backend's own refusal with its body, and a
    // backend whose accept does not answer the gateway's key.
    let refused = |r: &Value| r["streams"][0].clone();
    let s = refused(&h2("/guarded/x", &["--origin", "https://evil.gw.test"]));
    assert_eq!(s["status"], 403, "{s}");
    assert!(s["body"].as_str().unwrap().contains("is not allowed"), "{s}");
    let s = refused(&h2("/guarded/x", &["--origin", "https://app.gw.test", "--sizes", "1"]));
    assert_eq!((s["status"].as_u64(), s["echoed"].as_u64()), (Some(200), Some(2)), "{s}");
    let s = refused(&h2("/odd/room", &[]));
    assert_eq!(s["status"], 403, "{s}");
    assert_eq!(s["body"], "not on this room\n", "{s}");
    let s = refused(&h2("/odd/bad-accept", &[]));
    assert_eq!(s["status"], 502, "{s}");
    assert!(s["body"].as_str().unwrap().contains("Sec-WebSocket-Accept"), "{s}");
    let s = refused(&h2("/ws/x", &["--header", "sec-websocket-version: 8"]));
    assert_eq!(s["status"], 426, "{s}");

    // Plain HTTP/2 requests on the same listener (curl, nghttp2), proxied to
    // the HTTP/1.1 backend with the forwarding headers.
    let resolve = format!("ws.gw.test:{}:{}", addr.port(), addr.ip());
    let named = format!("https://ws.gw.test:{}", addr.port());
    let (status, head, body) =
        curl(&topo, &["--http2", "--cacert", ca, "--resolve", &resolve, &format!("{named}/headers?q=1")]);
    assert!(head.starts_with("HTTP/2 200"), "{head}\n{body}");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["url"], "/headers?q=1", "{v}");
    assert_eq!(v["headers"]["host"], format!("ws.gw.test:{}", addr.port()), "{v}");
    assert_eq!(v["headers"]["x-forwarded-proto"], "https", "{v}");
    let (status, _, body) = curl(
        &topo,
        &["--http2", "--cacert", ca, "--resolve", &resolve, "--data-binary", "h2 body", &format!("{named}/echo")],
    );
    assert_eq!((status, body.as_str()), (200, "h2 body"));

    // HTTP/1.1 clients on the same port: Python `websockets` and Node `ws`
    // upgrade as before, and curl's ALPN says which protocol it got.
    let url = format!("wss://{addr}/ws/room");
    let r = py_client(&topo, &["echo", &url, "--ca", ca, "--sni", "ws.gw.test", "--sizes", "1,65536"]);
    assert!(r.get("error").is_none(), "{r}");
    assert_eq!(r["echoed"], 4, "{r}");
    let r = node_client(&topo, &h2_args(&url, ca, &["--sizes", "1,65536"]));
    assert!(r.get("error").is_none(), "{r}");
    assert_eq!((r["echoed"].as_u64(), r["close_code"].as_u64()), (Some(4), Some(4001)), "{r}");
    let (status, head, _) =
        curl(&topo, &["--http1.1", "--cacert", ca, "--resolve", &resolve, &format!("{named}/page")]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(status, 200);

    // A client that agrees on h2 and sends nothing is closed after
    // handshake_timeout (2 s here), well before idle_timeout (5 min).
    let port = addr.port().to_string();
    let r = tls_client(
        &topo,
        &[&addr.ip().to_string(), &port, "--ca", ca, "--sni", "ws.gw.test", "--alpn", "h2", "--wait-close", "60"],
    );
    assert_eq!((r["alpn"].as_str(), r["server_closed"].as_bool()), (Some("h2"), Some(true)), "{r}");

    // Each WebSocket stream was a flow of its own, relayed in user space
    // (`http2-stream`) or inspected; the kernel path took none.
    gw.wait_idle();
    let l = gw.listener_stats("w");
    assert_eq!(l["kernel_flows"], 0, "{l}");
    assert_eq!(l["userspace_by_reason"]["http2-stream"].as_u64(), Some(3 + 2 + 1), "{l}");
    assert_eq!(l["userspace_by_reason"]["websocket-inspect"].as_u64(), Some(2), "{l}");
    let log = gw.log_text();
    assert!(log.contains("fallback=\"http2-stream\""), "no stream flow in the flow log");
    drop(gw);
    fs::remove_dir_all(dir).unwrap();
}

/// `check` takes `h2` and `http/1.1` in a websocket listener's ALPN, in
/// either order, and names any other protocol by its place.
#[test]
fn check_refuses_alpn_a_websocket_listener_cannot_speak() {
    let dir = temp_dir("h2alpn");
    test_certs(&dir, &["ws.gw.test"]).expect("test certificates (openssl)");
    let d = dir.display();
    let yaml = |alpn: &str| {
        format!(
            "listeners:\n  - name: w\n    bind: \"127.0.0.1:0\"\n    protocol: websocket\n    routes:\n\
             \x20     - backends: [\"127.0.0.1:9\"]\n    tls:\n      alpn: {alpn}\n      certificates:\n\
             \x20       - cert: {d}/ws.gw.test.pem\n          key: {d}/ws.gw.test.key\nadmin:\n  socket: /run/gateway/admin.sock\n"
        )
    };
    let check = |y: &str| {
        let path = dir.join("gw.yaml");
        fs::write(&path, y).unwrap();
        let out = std::process::Command::new(gateway_bin())
            .args(["check", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for ok in ["[\"h2\", \"http/1.1\"]", "[\"http/1.1\", \"h2\"]", "[\"h2\"]"] {
        let (good, err) = check(&yaml(ok));
        assert!(good, "{ok}: {err}");
    }
    let (good, err) = check(&yaml("[\"h2\", \"spdy/3\"]"));
    assert!(!good);
    assert!(err.contains("listeners[0].tls.alpn[1]") && err.contains("\"spdy/3\" is not offered"), "{err}");
    assert!(!err.contains("alpn[0]"), "{err}");
    fs::remove_dir_all(dir).unwrap();
}

/// A hot upgrade with WebSocket streams open: an HTTP/2 connection does not
/// move (its streams share one TLS session and one HPACK state), so the old
/// daemon sends GOAWAY and carries the open streams to their end, while new
/// connections reach the new daemon. The old daemon then exits by itself.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn open_streams_finish_in_the_old_daemon_at_a_hot_upgrade() {
    let dir = temp_dir("h2up");
    test_certs(&dir, &["ws.gw.test"]).expect("test certificates (openssl)");
    let topo = Topology::new();
    let node = Peer::node_server(&topo, "n1");
    let listeners = h2_listener(&dir, "", &format!("      - path_prefix: /\n        backends: [\"{}\"]\n", node.addr));
    let mut old = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let addr = old.listener("w");
    let ca = dir.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let url = format!("https://{addr}/ws/held");
    let args = h2_args(&url, ca, &["--streams", "2", "--sizes", "1,65536"]);
    let mut held = Held::node_h2_client(&topo, &args);
    assert_eq!(held.line(std::time::Duration::from_secs(60)), "OPEN 2");

    let new = old.take_over(&topo);
    // A new connection reaches the new daemon, which carries its stream.
    let r = node_h2_client(&topo, &h2_args(&url, ca, &["--sizes", "1"]));
    assert_eq!((r["streams"][0]["status"].as_u64(), r["streams"][0]["echoed"].as_u64()), (Some(200), Some(2)), "{r}");
    new.wait_for("the new connection's stream", std::time::Duration::from_secs(10), |g| {
        g.listener_stats("w")["userspace_by_reason"]["http2-stream"] == 1
    });
    // The held streams were not moved: they go on in the old daemon.
    assert!(new.flows().iter().all(|f| f["fallback_code"] != "http2-stream"), "{:?}", new.flows());
    held.go_on();
    let done: Value = serde_json::from_str(&held.line(std::time::Duration::from_secs(60))).unwrap();
    assert_eq!(done["goaway"], 0, "the old daemon's GOAWAY (NO_ERROR) did not reach the held connection: {done}");
    for s in done["streams"].as_array().unwrap() {
        assert!(s.get("error").is_none(), "{done}");
        assert_eq!(s["echoed"], 5, "the held stream's last echo went through: {done}");
        assert_eq!(s["close_code"], 4001, "{done}");
    }
    let status =
        old.wait_exit(std::time::Duration::from_secs(30)).expect("the old daemon did not exit once its streams ended");
    assert!(status.success(), "old daemon: {status}\n{}", old.log_text());
    let log = old.log_text();
    let closed = log.lines().filter(|l| l.contains("flow close") && l.contains("fallback=\"http2-stream\"")).count();
    assert_eq!(closed, 2, "{log}");
    drop(new);
    fs::remove_dir_all(dir).unwrap();
}

/// WebSocket streams count under the listener's admission: the connection's
/// own place covers one, each further stream open at once takes a place of
/// its own. With `max_connections_per_source: 3`, one client holds three
/// WebSockets over HTTP/2, as it could hold three connections over
/// HTTP/1.1; the fourth stream is refused with 503 and counted, and once the
/// three close, their places are free again.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn websocket_streams_count_under_the_listener_limits() {
    let dir = temp_dir("h2lim");
    test_certs(&dir, &["ws.gw.test"]).expect("test certificates (openssl)");
    let topo = Topology::new();
    let node = Peer::node_server(&topo, "n1");
    let route = format!("      - path_prefix: /\n        backends: [\"{}\"]\n", node.addr);
    let listeners = h2_listener(&dir, "    max_connections_per_source: 3\n", &route);
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let addr = gw.listener("w");
    let ca = dir.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let url = format!("https://{addr}/ws/held");
    let args = h2_args(&url, ca, &["--streams", "4", "--sizes", "1"]);
    let mut held = Held::node_h2_client(&topo, &args);
    assert_eq!(held.line(std::time::Duration::from_secs(60)), "OPEN 4");
    assert_eq!(gw.listener_stats("w")["rejected"]["max-connections-per-source"], 1);
    held.go_on();
    let done: Value = serde_json::from_str(&held.line(std::time::Duration::from_secs(60))).unwrap();
    let streams = done["streams"].as_array().unwrap();
    let refused: Vec<&Value> = streams.iter().filter(|s| s["status"] != 200).collect();
    assert_eq!(refused.len(), 1, "{done}");
    assert_eq!(refused[0]["status"], 503, "{done}");
    assert!(refused[0]["body"].as_str().unwrap().contains("max-connections-per-source"), "{done}");
    for s in streams.iter().filter(|s| s["status"] == 200) {
        assert_eq!((s["echoed"].as_u64(), s["close_code"].as_u64()), (Some(3), Some(4001)), "{done}");
    }
    // The places came back: three streams again on a new connection.
    gw.wait_idle();
    let r = node_h2_client(&topo, &h2_args(&url, ca, &["--streams", "3", "--sizes", "1"]));
    let ok = r["streams"].as_array().unwrap().iter().filter(|s| s["status"] == 200 && s["close_code"] == 4001).count();
    assert_eq!(ok, 3, "{r}");
    drop(gw);
    fs::remove_dir_all(dir).unwrap();
}
