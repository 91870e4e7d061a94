//! WebSocket listeners end to end: real peers (Python `websockets`, Node
//! `ws`, curl) in the client and backend namespaces, the real daemon and
//! kernel programs in the gateway namespace.
use std::{
    io::{Read, Write},
    net::SocketAddr,
    time::Duration,
};

use gateway_tests::*;

/// A websocket listener named `name` with `routes` (YAML list items).
fn ws_listener(name: &str, offload: &str, routes: &str) -> String {
    format!(
        "  - name: {name}\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    protocol: websocket\n    offload: {offload}\n\
         \x20   handshake_timeout: 2s\n    routes:\n{routes}"
    )
}

/// One route: `first` is its first key line (`path_prefix: /ws`), `more`
/// further keys, one per line.
fn route(first: &str, backends: &[SocketAddr], more: &[&str]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    let mut r = format!("      - {first}\n        backends: [{}]\n", list.join(", "));
    for m in more {
        r.push_str(&format!("        {m}\n"));
    }
    r
}

fn start(topo: &Topology, listeners: String) -> Gateway {
    Gateway::start(topo, &GatewayConfig { listeners, extra: String::new() })
}

fn no_error(v: &Value) {
    assert!(v.get("error").is_none(), "peer failed: {v}");
}

/// Messages and payload bytes `ws_client.py echo` sends for these sizes.
fn echo_totals(sizes: &[u64], fragments: bool) -> (u64, u64) {
    let per = |n: u64| if fragments && n > 1 { 4 } else { 2 };
    (sizes.iter().map(|&n| per(n)).sum(), sizes.iter().map(|&n| n * per(n)).sum())
}

fn join(sizes: &[u64]) -> String {
    sizes.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn passthrough_websockets_ride_the_kernel_path() {
    let topo = Topology::new();
    let node = Peer::node_server(&topo, "n1");
    // A bound well above the largest message in flight (16 MiB, echoed one
    // at a time), so flow control never passes bytes to the daemon here;
    // what it does over the bound is `flow_control.rs`'s subject.
    let gw = Gateway::start(
        &topo,
        &GatewayConfig {
            listeners: ws_listener("chat", "kernel", &route("path_prefix: /ws", &[node.addr], &[])),
            extra: "kernel:\n  max_queued_per_flow: 64MiB\n".into(),
        },
    );
    let url = format!("ws://{}/ws/room", gw.listener("chat"));

    // Python client: text and binary, 0 B to 16 MiB, whole and fragmented,
    // ping/pong, a close with code and reason.
    let sizes = [0, 1, 125, 126, 65535, 65536, 1 << 20, 16 << 20];
    let r = py_client(&topo, &["echo", &url, "--sizes", &join(&sizes), "--fragments", "5", "--close", "4000:see you"]);
    no_error(&r);
    let (messages, bytes) = echo_totals(&sizes, true);
    assert_eq!((r["echoed"].as_u64(), r["bytes"].as_u64()), (Some(messages), Some(bytes)), "{r}");
    assert_eq!(r["pong"], true, "{r}");
    assert_eq!((r["close_code"].as_u64(), r["close_reason"].as_str()), (Some(4000), Some("see you")), "{r}");
    gw.wait_idle();

    // The kernel carried the frames: its counters cover every payload byte
    // each way, and the daemon itself copied almost nothing (the heads go
    // through hyper, not through these counters).
    let s = gw.listener_stats("chat");
    let b = |k: &str| s["bytes"][k].as_u64().unwrap();
    assert_eq!(s["kernel_flows"], 1, "{s}");
    for dir in ["client_to_backend", "backend_to_client"] {
        assert!(b(&format!("kernel_{dir}")) >= bytes, "kernel bytes {dir} below the {bytes} payload bytes: {s}");
        assert!(b(&format!("user_{dir}")) < 64 * 1024, "the daemon copied {dir} bytes: {s}");
    }

    // Node client: subprotocol and permessage-deflate are negotiated by the
    // peers, end to end, and pass through byte-exact.
    let r = node_client(&topo, &[&url, "--protocol", "chat.v2", "--deflate", "--close", "4001:node bye"]);
    no_error(&r);
    assert_eq!(r["protocol"], "chat.v2", "{r}");
    assert!(r["extensions"].as_str().unwrap_or_default().contains("permessage-deflate"), "{r}");
    assert_eq!(r["pong"], "node-ping", "{r}");
    assert_eq!((r["close_code"].as_u64(), r["close_reason"].as_str()), (Some(4001), Some("node bye")), "{r}");
    let r = py_client(&topo, &["echo", &url, "--deflate", "--protocol", "chat.v3", "--fragments", "3"]);
    no_error(&r);
    assert_eq!(r["protocol"], "chat.v3", "{r}");
    assert!(r["extensions"].as_str().unwrap_or_default().contains("permessage-deflate"), "{r}");
    gw.wait_idle();
    assert_eq!(gw.listener_stats("chat")["kernel_flows"], 3);
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn userspace_offload_and_a_python_backend() {
    let topo = Topology::new();
    let py = Peer::python_server(&topo);
    let gw = start(&topo, ws_listener("u", "userspace", &route("path_prefix: /", &[py.addr], &[])));
    let url = format!("ws://{}/anything", gw.listener("u"));
    let sizes = [0, 1, 126, 65536, 16 << 20];
    let r = node_client(&topo, &[&url, "--sizes", &join(&sizes), "--deflate", "--protocol", "p1"]);
    no_error(&r);
    assert_eq!((r["protocol"].as_str(), r["echoed"].as_u64()), (Some("p1"), Some(2 * sizes.len() as u64)), "{r}");
    assert!(r["extensions"].as_str().unwrap_or_default().contains("permessage-deflate"), "{r}");
    let r = py_client(&topo, &["echo", &url, "--sizes", "0,1,65535,1048576", "--fragments", "4", "--close", "4002:x"]);
    no_error(&r);
    assert_eq!(r["close_code"], 4002, "{r}");

    // A live flow says where it is and why.
    let mut held = Held::py_client(&topo, &["hold", &url, "--count", "1"]);
    assert_eq!(held.line(Duration::from_secs(30)), "OPEN 1");
    let f = gw.wait_flow("the held flow", |f| f["path"] == "userspace");
    assert_eq!(f["fallback_code"], "configured-userspace", "{f}");
    assert_eq!(f["route"], "*/", "{f}");
    held.go_on();
    assert_eq!(held.line(Duration::from_secs(30)), "CLOSED 1");
    gw.wait_idle();
    let s = gw.listener_stats("u");
    assert_eq!(s["kernel_flows"], 0, "{s}");
    assert!(s["bytes"]["user_client_to_backend"].as_u64().unwrap() > 16 << 20, "{s}");
}

/// A backend that answers the upgrade and sends a first frame in the same
/// write as its 101, then waits for the client to leave.
fn greeting_backend(topo: &Topology, greeting: &'static str) -> Backend {
    Backend::spawn(topo, move |mut s| {
        let Ok((head, _)) = read_http_head(&mut s) else { return };
        let mut out = ws_accept_response(&head).into_bytes();
        out.extend(ws_frame(0x1, greeting.as_bytes(), None));
        let _ = s.write_all(&out);
        let _ = read_until_closed(&mut s, Duration::from_secs(30));
    })
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn bytes_past_the_heads_are_forwarded_in_order() {
    let topo = Topology::new();
    let raw = greeting_backend(&topo, "hello with the 101");
    let node = Peer::node_server(&topo, "n1");
    let routes = route("path_prefix: /raw", &[raw.addr], &[])
        + &route("path_prefix: /inspect-raw", &[raw.addr], &["mode: inspect"])
        + &route("path_prefix: /echo", &[node.addr], &[]);
    let gw = start(&topo, ws_listener("w", "kernel", &routes));
    let addr = gw.listener("w");

    // The backend's frame, in the same segment as its 101.
    for path in ["/raw", "/inspect-raw"] {
        let r = py_client(&topo, &["expect-first", &format!("ws://{addr}{path}")]);
        assert_eq!(r["first"], "hello with the 101", "{path}: {r}");
    }

    // The client's frames, right behind its request head in one write.
    let mut s = topo.connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = ws_upgrade_request("/echo", "gw.test").into_bytes();
    let mask = Some([1, 2, 3, 4]);
    out.extend(ws_frame(0x1, b"early bird", mask));
    out.extend(ws_frame(0x2, &[7u8; 300], mask));
    s.write_all(&out).unwrap();
    let (head, rest) = read_http_head(&mut s).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (op, payload, rest) = read_ws_frame(&mut s, rest).unwrap();
    assert_eq!((op, payload.as_slice()), (0x1, &b"early bird"[..]));
    let (op, payload, _) = read_ws_frame(&mut s, rest).unwrap();
    assert_eq!((op, payload), (0x2, vec![7u8; 300]));
    let f = gw.wait_flow("the early-bird flow", |f| f["route"] == "*/echo");
    assert_eq!(f["path"], "kernel", "{f}");
    drop(s);
    gw.wait_idle();
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn upgrade_errors_get_the_right_status() {
    let topo = Topology::new();
    let node = Peer::node_server(&topo, "n1");
    let refusing = Backend::spawn(&topo, |mut s| {
        if read_http_head(&mut s).is_ok() {
            let _ =
                s.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 13\r\nx-from: backend\r\n\r\nnot you, bob\n");
            let _ = read_until_closed(&mut s, Duration::from_secs(10));
        }
    });
    let dead: SocketAddr = topo.backend_listener().local_addr().unwrap(); // closed on drop: refused
    let routes = route("host: chat.test\n        path_prefix: /ws", &[node.addr], &[])
        + &route(
            "host: chat.test\n        path_prefix: /strict",
            &[node.addr],
            &["allowed_origins: [\"https://chat.test\"]"],
        )
        + &route("host: chat.test\n        path_prefix: /refuse", &[refusing.addr], &[])
        + &route("host: chat.test\n        path_prefix: /dead", &[dead], &[]);
    let gw = start(&topo, ws_listener("w", "auto", &routes));
    let base = format!("http://{}", gw.listener("w"));
    let up = ["-H", "Host: chat.test", "-H", "Connection: Upgrade", "-H", "Upgrade: websocket"];
    let v13 = ["-H", "Sec-WebSocket-Version: 13"];
    let key = ["-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="];
    let ask = |path: &str, extra: &[&[&str]]| {
        let url = format!("{base}{path}");
        let mut args: Vec<&str> = extra.iter().flat_map(|a| a.iter().copied()).collect();
        args.push(&url);
        curl(&topo, &args)
    };

    let cases: Vec<(&str, Vec<&[&str]>, u16, &str)> = vec![
        ("/ws", vec![&up, &v13], 400, "missing Sec-WebSocket-Key"),
        ("/ws", vec![&up, &v13, &["-H", "Sec-WebSocket-Key: short=="]], 400, "not the base64 of 16 bytes"),
        ("/ws", vec![&up, &v13, &key, &["-X", "POST"]], 400, "must be a GET"),
        (
            "/ws",
            vec![&["-H", "Host: chat.test", "-H", "Connection: keep-alive", "-H", "Upgrade: websocket"], &v13, &key],
            400,
            "Connection header must list \"upgrade\"",
        ),
        ("/ws", vec![&up, &key], 400, "missing Sec-WebSocket-Version"),
        ("/ws", vec![&up, &key, &["-H", "Sec-WebSocket-Version: 8"]], 426, "this gateway speaks 13"),
        ("/nowhere", vec![&up, &v13, &key], 404, "no route for host chat.test and path /nowhere"),
        (
            "/ws",
            vec![&["-H", "Host: other.test", "-H", "Connection: Upgrade", "-H", "Upgrade: websocket"], &v13, &key],
            404,
            "no route",
        ),
        (
            "/strict",
            vec![&up, &v13, &key, &["-H", "Origin: https://evil.test"]],
            403,
            "\"https://evil.test\" is not allowed",
        ),
        ("/strict", vec![&up, &v13, &key], 403, "no Origin header"),
        ("/dead", vec![&up, &v13, &key], 502, "no backend answered"),
        ("/refuse", vec![&up, &v13, &key], 403, "not you, bob"),
    ];
    for (path, extra, status, body) in cases {
        let (got, head, text) = ask(path, &extra);
        assert_eq!(got, status, "{path} {extra:?}: {head}\n{text}");
        assert!(text.contains(body), "{path} {extra:?}: body {text:?} does not say {body:?}");
        if status == 426 {
            assert_eq!(header_value(&head, "sec-websocket-version").as_deref(), Some("13"), "{head}");
        }
    }
    // Matching is case-insensitive, as RFC 6455 and RFC 9110 say.
    let mixed = ["-H", "Host: CHAT.test", "-H", "Connection: keep-alive, UPGRADE", "-H", "Upgrade: WebSocket"];
    let (got, head, _) =
        ask("/strict", &[&mixed, &v13, &key, &["-H", "Origin: HTTPS://Chat.Test"], &["--max-time", "2"]]);
    assert_eq!(got, 101, "{head}");
    // The backend's refusal reaches the client as the backend sent it.
    let (_, head, _) = ask("/refuse", &[&up, &v13, &key]);
    assert_eq!(header_value(&head, "x-from").as_deref(), Some("backend"), "{head}");

    // An oversized head: 431.
    let big = format!("X-Big: {}", "a".repeat(20_000));
    let (got, _, _) = ask("/ws", &[&up, &v13, &key, &["-H", &big]]);
    assert_eq!(got, 431);

    // A head that never ends is closed after handshake_timeout (2s here).
    let mut s = topo.connect(gw.listener("w")).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: chat.test\r\nConnection: Upgrade\r\n").unwrap();
    let r = read_until_closed(&mut s, Duration::from_secs(20));
    assert!(r.is_ok(), "the stalled handshake was not closed: {r:?}");
    gw.wait_idle();
    // The refused connect counts against the dead backend.
    let s = gw.listener_stats("w");
    let dead_report = s["backends"].as_array().unwrap().iter().find(|b| b["address"] == dead.to_string()).unwrap();
    assert!(dead_report["connect_failures"].as_u64().unwrap() >= 1, "{s}");
}

/// A chunked body's data (RFC 9112 §7.1), trailers ignored.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").expect("CRLF after a chunk");
    }
    out
}

/// Host and path confusion: what a route matched is what its backend gets.
/// Two `Host` headers, or a `Host` that names another host than an
/// absolute-form target, are refused; the path is normalised before it is
/// matched and forwarded normalised; the `Host` routed on is the one sent.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn host_confusion_is_refused_and_paths_are_normalised() {
    let topo = Topology::new();
    let (n1, n2) = (Peer::node_server(&topo, "n1"), Peer::node_server(&topo, "n2"));
    let routes = route("host: app.test\n        path_prefix: /pub", &[n1.addr], &[])
        + &route("host: other.test\n        path_prefix: /", &[n2.addr], &[]);
    let gw = start(&topo, ws_listener("app", "kernel", &routes));
    let addr = gw.listener("app");
    // One request on its own connection, as sent; the status line and body back.
    let raw = |head: &str| -> (String, String) {
        let mut s = topo.connect(addr).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap_or_else(|e| panic!("{head:?}: {e}"));
        let text = String::from_utf8_lossy(&got).into_owned();
        let (head_part, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let chunked = head_part.to_ascii_lowercase().contains("transfer-encoding: chunked");
        (head_part.lines().next().unwrap_or("").to_string(), if chunked { dechunk(body) } else { body.to_string() })
    };
    let json = |status: &str, body: &str| -> Value {
        assert!(status.contains(" 200 "), "{status}: {body}");
        serde_json::from_str(body).unwrap_or_else(|_| panic!("{body}"))
    };
    // Two Host headers: whichever a backend would read, refused here.
    for hosts in [["app.test", "other.test"], ["other.test", "app.test"], ["app.test", "app.test"]] {
        let (status, body) = raw(&format!(
            "GET /pub/headers HTTP/1.1\r\nHost: {}\r\nHost: {}\r\nConnection: close\r\n\r\n",
            hosts[0], hosts[1]
        ));
        assert!(status.contains(" 400 "), "{hosts:?}: {status}");
        assert!(body.contains("more than one Host header"), "{body}");
    }
    // An absolute-form target wins over Host; one that disagrees is refused.
    let (status, body) = raw("GET http://other.test/headers HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n");
    assert!(status.contains(" 400 ") && body.contains("different hosts"), "{status}: {body}");
    // Routed on the target's authority, and that is the Host n2 sees.
    let (status, body) = raw("GET http://Other.Test:8080/x/headers HTTP/1.1\r\nConnection: close\r\n\r\n");
    let v = json(&status, &body);
    assert_eq!((v["name"].as_str(), v["headers"]["host"].as_str()), (Some("n2"), Some("Other.Test:8080")), "{v}");
    assert_eq!(v["url"], "/x/headers", "{v}");
    // Dot segments, plain or escaped, cannot climb out of /pub into a path
    // no route of app.test covers.
    for path in ["/pub/../admin/headers", "/pub/%2e%2e/admin/headers", "/pub/.%2E/admin/headers"] {
        let (status, body) = raw(&format!("GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"));
        assert!(status.contains(" 404 ") && body.contains("path /admin/headers"), "{path}: {status}: {body}");
    }
    // What stays under /pub is forwarded normalised; other escapes stay.
    let (status, body) =
        raw("GET /pub/x/../%61/%2f/./headers?q=%2e HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n");
    let v = json(&status, &body);
    assert_eq!((v["name"].as_str(), v["url"].as_str()), (Some("n1"), Some("/pub/a/%2F/headers?q=%2e")), "{v}");
    assert_eq!(v["headers"]["host"], "app.test", "{v}");
    let (status, body) = raw("GET /pub/%zz HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n");
    assert!(status.contains(" 400 ") && body.contains("percent-encoding"), "{status}: {body}");
    // And a curl that sends what it is told (--path-as-is) gets the same.
    let (code, _, body) =
        curl(&topo, &["--path-as-is", "-H", "Host: app.test", &format!("http://{addr}/pub/../admin/headers")]);
    assert_eq!(code, 404, "{body}");
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn plain_http_and_websockets_share_the_listener() {
    let topo = Topology::new();
    let (n1, n2) = (Peer::node_server(&topo, "n1"), Peer::node_server(&topo, "n2"));
    let routes = route("host: app.test\n        path_prefix: /", &[n1.addr], &[])
        + &route("host: \"*.app.test\"\n        path_prefix: /", &[n2.addr], &[])
        + &route("path_prefix: /api", &[n2.addr], &[])
        + &route("path_prefix: /", &[n1.addr], &[]);
    let gw = start(&topo, ws_listener("app", "kernel", &routes));
    let base = format!("http://{}", gw.listener("app"));
    let name_for = |host: &str, path: &str| {
        let (status, _, body) = curl(&topo, &["-H", &format!("Host: {host}"), &format!("{base}{path}")]);
        assert_eq!(status, 200, "{host}{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{host}{path}: {body}"));
        (v["name"].as_str().unwrap().to_string(), v)
    };
    // Host first (exact, then wildcard), then the longest whole-segment prefix.
    assert_eq!(name_for("app.test", "/api/headers").0, "n1");
    assert_eq!(name_for("www.app.test", "/headers").0, "n2");
    assert_eq!(name_for("other.test", "/api/headers").0, "n2");
    assert_eq!(name_for("other.test", "/apiary/headers").0, "n1");
    let (_, v) = name_for("app.test:8080", "/headers?x=1");
    let h = &v["headers"];
    assert_eq!(h["x-forwarded-for"], CLIENT_IP, "{v}");
    assert_eq!(h["forwarded"], format!("for={CLIENT_IP};proto=http;host=app.test"), "{v}");
    assert_eq!(h["host"], "app.test:8080", "{v}");
    assert_eq!(v["url"], "/headers?x=1", "{v}");

    // A streamed (chunked) 4 MiB body echoed back byte for byte.
    let dir = temp_dir("http");
    let (input, output) = (dir.join("in"), dir.join("out"));
    let mut body = vec![0u8; 4 << 20];
    Pattern(9).fill(0, &mut body);
    std::fs::write(&input, &body).unwrap();
    let (ok, _, err) = run_peer(
        &topo.client,
        "curl",
        &[
            "-sS",
            "--fail",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &format!("@{}", input.display()),
            "-o",
            output.to_str().unwrap(),
            &format!("{base}/echo"),
        ],
        Duration::from_secs(60),
    );
    assert!(ok, "curl: {err}");
    assert!(std::fs::read(&output).unwrap() == body, "the echoed body differs");
    // Bodies are counted in the flow's (and then the listener's) bytes.
    gw.wait_idle();
    let s = gw.listener_stats("app");
    for dir in ["client_to_backend", "backend_to_client"] {
        assert!(s["bytes"][format!("user_{dir}")].as_u64().unwrap() >= 4 << 20, "{dir}: {s}");
    }

    // Keep-alive: two requests, one client connection.
    let accepted = gw.listener_stats("app")["accepted"].as_u64().unwrap();
    let (ok, out, err) = run_peer(
        &topo.client,
        "curl",
        &["-sS", "-v", "--fail", &format!("{base}/page/1"), &format!("{base}/page/2")],
        Duration::from_secs(60),
    );
    assert!(ok, "{err}");
    assert!(out.contains("page from n1 at /page/1") && out.contains("page from n1 at /page/2"), "{out}");
    assert!(err.contains("Re-using existing connection"), "curl did not keep the connection: {err}");
    gw.wait_idle();
    assert_eq!(gw.listener_stats("app")["accepted"].as_u64().unwrap(), accepted + 1);

    // And WebSocket on the same listener and host.
    let r = node_client(&topo, &[&format!("ws://{}/chat", gw.listener("app"))]);
    no_error(&r);
    gw.wait_idle();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn inspect_mode_limits_pings_counts_and_goes_away() {
    let topo = Topology::new();
    let node = Peer::node_server(&topo, "n1");
    let more = ["mode: inspect", "max_message_size: 64KiB", "ping_interval: 300ms"];
    let gw = start(&topo, ws_listener("i", "kernel", &route("path_prefix: /i", &[node.addr], &more)));
    let url = format!("ws://{}/i", gw.listener("i"));

    let sizes = [0, 1, 125, 126, 65535, 65536];
    let r = py_client(&topo, &["echo", &url, "--sizes", &join(&sizes), "--fragments", "3", "--close", "4003:bye"]);
    no_error(&r);
    assert_eq!(r["echoed"].as_u64(), Some(echo_totals(&sizes, true).0), "{r}");
    assert_eq!((r["close_code"].as_u64(), r["close_reason"].as_str()), (Some(4003), Some("bye")), "{r}");
    let r = node_client(&topo, &[&url, "--sizes", "0,1,65536"]);
    no_error(&r);
    assert_eq!(r["extensions"], "", "inspect mode must not let an extension through: {r}");

    // Over max_message_size: close 1009.
    let r = py_client(&topo, &["big", &url, "--size", "65537"]);
    assert_eq!(r["close_code"], 1009, "{r}");

    // A live inspect flow counts messages and says it is in user space.
    let mut held = Held::py_client(&topo, &["wait-close", &url]);
    assert_eq!(held.line(Duration::from_secs(30)), "OPEN 1");
    let f = gw.wait_flow("the inspected flow", |f| f["messages_backend_to_client"] == 1);
    assert_eq!(
        (f["path"].as_str(), f["fallback_code"].as_str()),
        (Some("userspace"), Some("websocket-inspect")),
        "{f}"
    );
    assert_eq!(f["messages_client_to_backend"], 1, "{f}");

    // A client that never answers pings is dropped; the answering one stays.
    let mut mute = topo.connect(gw.listener("i")).unwrap();
    mute.write_all(ws_upgrade_request("/i", "gw.test").as_bytes()).unwrap();
    let closed = read_until_closed(&mut mute, Duration::from_secs(20));
    assert!(closed.is_ok(), "a client that never answers pings was kept: {closed:?}");
    assert!(gw.log_text().contains("did not answer a ping"), "{}", gw.log_text());
    let live = gw.flows();
    assert_eq!(live.len(), 1, "the answering client went too: {live:?}");

    // Shutdown: close 1001 (going away) to the client.
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(gw.pid() as i32, libc::SIGTERM) };
    let r: Value = serde_json::from_str(&held.line(Duration::from_secs(30))).unwrap();
    assert_eq!(r["close_code"], 1001, "{r}");
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn bridge_tcp_carries_binary_messages_to_a_tcp_server() {
    let topo = Topology::new();
    let echo = Backend::echo(&topo);
    let bye = Backend::spawn(&topo, |mut s| {
        let _ = s.write_all(b"bye");
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let routes = format!(
        "      - path_prefix: /tcp\n        bridge_tcp: [\"{}\"]\n      - path_prefix: /bye\n        bridge_tcp: [\"{}\"]\n",
        echo.addr, bye.addr
    );
    let gw = start(&topo, ws_listener("b", "kernel", &routes));
    let url = format!("ws://{}/tcp", gw.listener("b"));
    let r = py_client(&topo, &["bridge", &url, "--sizes", "1,1000,65536,1048576", "--protocol", "binary"]);
    no_error(&r);
    assert_eq!(
        (r["bytes"].as_u64(), r["protocol"].as_str()),
        (Some(1 + 1000 + 65536 + 1048576), Some("binary")),
        "{r}"
    );
    assert_eq!(r["close_code"], 1000, "{r}");

    // The backend's EOF becomes a close after its last bytes.
    let r = py_client(&topo, &["expect-first", &format!("ws://{}/bye", gw.listener("b"))]);
    assert_eq!(r["first"], "627965", "{r}"); // b"bye", hex
                                             // Plain HTTP is not for a bridge route.
    let (status, _, _) = curl(&topo, &[&format!("http://{}/tcp", gw.listener("b"))]);
    assert_eq!(status, 426);
    gw.wait_idle();
    let s = gw.listener_stats("b");
    assert!(s["bytes"]["user_client_to_backend"].as_u64().unwrap() >= 1 + 1000 + 65536 + 1048576, "{s}");
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn a_thousand_websockets_open_then_closed_leave_nothing() {
    let topo = Topology::new();
    let node = Peer::node_server(&topo, "n1");
    let gw = start(&topo, ws_listener("many", "kernel", &route("path_prefix: /", &[node.addr], &[])));
    let fds = gw.fd_count();
    let url = format!("ws://{}/many", gw.listener("many"));
    let mut held = Held::py_client(&topo, &["hold", &url, "--count", "1000"]);
    assert_eq!(held.line(Duration::from_secs(120)), "OPEN 1000");
    let flows = gw.flows();
    assert_eq!(flows.len(), 1000);
    assert!(flows.iter().all(|f| f["path"] == "kernel"), "a flow is not on the kernel path");
    assert_eq!(gw.status()["kernel_sockets"], 2000);
    held.go_on();
    assert_eq!(held.line(Duration::from_secs(120)), "CLOSED 1000");
    gw.wait_idle();
    gw.wait_for("fds back to the start", Duration::from_secs(10), |g| g.fd_count() <= fds);
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn passthrough_half_close_and_reset_reach_the_other_side() {
    let topo = Topology::new();
    // A backend that accepts the upgrade, then reports what it saw through a channel.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let be = Backend::spawn(&topo, move |mut s| {
        let Ok((head, _)) = read_http_head(&mut s) else { return };
        s.write_all(ws_accept_response(&head).as_bytes()).unwrap();
        let mut got = Vec::new();
        let outcome = match s.read_to_end(&mut got) {
            // EOF: the client half-closed. The reverse direction still works.
            Ok(_) => {
                let reply = s.write_all(b"after your FIN").and_then(|()| s.shutdown(std::net::Shutdown::Write));
                format!("eof after {} bytes, reply {:?}", got.len(), reply.is_ok())
            }
            Err(e) => format!("error {:?}", e.kind()),
        };
        let _ = tx.send(outcome);
    });
    let gw = start(&topo, ws_listener("h", "kernel", &route("path_prefix: /", &[be.addr], &[])));
    let addr = gw.listener("h");
    let upgraded = || {
        let mut s = topo.connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(ws_upgrade_request("/", "gw.test").as_bytes()).unwrap();
        let (head, rest) = read_http_head(&mut s).unwrap();
        assert!(head.starts_with("HTTP/1.1 101") && rest.is_empty(), "{head}");
        gw.wait_flow("the upgraded flow", |f| f["path"] == "kernel");
        s
    };

    // Half-close: the backend sees EOF after the bytes, and still answers.
    let mut s = upgraded();
    s.write_all(&[9u8; 1000]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)).unwrap(), "eof after 1000 bytes, reply true");
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"after your FIN");
    drop(s);
    gw.wait_idle();

    // Reset: the backend's connection is reset too.
    let s = upgraded();
    set_linger_zero(&s);
    drop(s);
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)).unwrap(), "error ConnectionReset");
    gw.wait_idle();
}

/// A client that sends until the gateway stops taking its bytes and never
/// reads what comes back: `head` first (an upgrade's 101 is read, nothing
/// after it), then `chunk` over and over, bounded in bytes and time.
fn stalled_client(topo: &Topology, addr: SocketAddr, head: &str, chunk: &[u8]) -> std::net::TcpStream {
    let mut s = topo.connect(addr).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    if head.contains("Upgrade: websocket") {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).unwrap_or_else(|e| panic!("the 101 to {head:?}: {e}"));
            got.push(b[0]);
        }
        assert!(got.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&got));
    }
    s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(20);
    let mut sent = 0usize;
    while sent < 512 << 20 && std::time::Instant::now() < until {
        match s.write(chunk) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
            // Closed already (idle_timeout may pass while buffers fill).
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) => break,
            Err(e) => panic!("sending to {addr}: {e}"),
        }
    }
    assert!(sent > 0);
    s
}

const UPGRADE: &str = "GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// One masked (with key 0) binary frame of 64 KiB.
fn frame() -> Vec<u8> {
    let mut f = vec![0x82, 0xFF];
    f.extend_from_slice(&65536u64.to_be_bytes());
    f.extend_from_slice(&[0; 4]);
    f.resize(f.len() + 65536, b'x');
    f
}

/// Three listeners (inspect, bridge_tcp, plain HTTP) whose backends answer
/// everything they are sent, with this `idle_timeout`.
fn echoing_listeners(topo: &Topology, node: &Peer, tcp_echo: &Backend, idle: &str) -> String {
    let inspect = route("path_prefix: /", &[node.addr], &["mode: inspect"]);
    let bridge = format!("      - path_prefix: /\n        bridge_tcp: [\"{}\"]\n", tcp_echo.addr);
    let plain = route("path_prefix: /", &[node.addr], &[]);
    let _ = topo;
    [("i", inspect), ("b", bridge), ("h", plain)]
        .iter()
        .map(|(name, r)| ws_listener(name, "auto", r) + &format!("    idle_timeout: {idle}\n"))
        .collect()
}

/// A peer that stops reading is closed by `idle_timeout` and by the drain,
/// in every mode that writes from user space: the writes wait under the
/// flow's deadlines, not outside them.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn a_peer_that_stops_reading_is_closed_by_idle_timeout_and_by_drain() {
    let topo = Topology::new();
    let node = Peer::node_server(&topo, "n1");
    let tcp_echo = Backend::echo(&topo);
    let post = "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1073741824\r\n\r\n";
    let stall_all = |gw: &Gateway| -> Vec<std::net::TcpStream> {
        vec![
            stalled_client(&topo, gw.listener("i"), UPGRADE, &frame()),
            stalled_client(&topo, gw.listener("b"), UPGRADE, &frame()),
            stalled_client(&topo, gw.listener("h"), post, &[b'x'; 65536]),
        ]
    };

    // idle_timeout: each flow closes on its own, counted as idle.
    let gw = start(&topo, echoing_listeners(&topo, &node, &tcp_echo, "2s"));
    let held = stall_all(&gw);
    gw.wait_for("the stalled flows to be closed by idle_timeout", Duration::from_secs(30), |g| {
        g.status()["flows"] == 0
    });
    for name in ["i", "b", "h"] {
        let s = gw.listener_stats(name);
        assert_eq!(s["closed"]["idle-timeout"], 1, "listener {name}: {s}");
    }
    drop(held);
    drop(gw);

    // The drain: a flow whose peer stopped reading does not hold the daemon
    // for drain_timeout (120 s here); each mode closes it within seconds.
    let mut gw = Gateway::start(
        &topo,
        &GatewayConfig {
            listeners: echoing_listeners(&topo, &node, &tcp_echo, "1h"),
            extra: "drain_timeout: 120s\n".into(),
        },
    );
    let _held = stall_all(&gw);
    gw.wait_for("three flows", Duration::from_secs(10), |g| g.status()["flows"] == 3);
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(gw.pid() as i32, libc::SIGTERM) }, 0);
    let st = gw.wait_exit(Duration::from_secs(60));
    assert!(st.is_some(), "the drain waited on peers that stopped reading:\n{}", gw.log_text());
    assert!(gw.log_text().contains("all flows finished"), "{}", gw.log_text());
}

/// A client that sends a MiB of frames right behind its upgrade request,
/// without waiting for the 101: hyper reads the head and part of what
/// follows, and the rest must reach the backend once, in order, when the
/// sockets go into the sockmap (the kernel hands the verdict whole skbs,
/// so one read only in part would be sent again from its start).
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn frames_sent_behind_the_upgrade_request_arrive_once() {
    let topo = Topology::new();
    let node = Peer::node_server(&topo, "n1");
    let gw = start(&topo, ws_listener("k", "kernel", &route("path_prefix: /ws", &[node.addr], &[])));
    for round in 0..3u8 {
        let mut s = topo.connect(gw.listener("k")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let payloads: Vec<Vec<u8>> = (0..64u32)
            .map(|i| (0..16 * 1024u32).map(|j| (i * 31 + j * 7 + u32::from(round)) as u8).collect())
            .collect();
        let mut burst = ws_upgrade_request("/ws", "gw.test").into_bytes();
        for p in &payloads {
            burst.extend(ws_frame(0x2, p, Some([1, 2, 3, 4])));
        }
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || w.write_all(&burst));
        let (head, mut have) = read_http_head(&mut s).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        for (i, p) in payloads.iter().enumerate() {
            let (op, got) = next_ws_frame(&mut s, &mut have).unwrap();
            assert!(op == 0x2 && got == *p, "round {round}: echo {i} of 64 is not message {i} ({} bytes)", got.len());
        }
        writer.join().unwrap().unwrap();
        s.write_all(&ws_frame(0x8, &1000u16.to_be_bytes(), Some([1, 2, 3, 4]))).unwrap();
        let (op, _) = next_ws_frame(&mut s, &mut have).unwrap();
        assert_eq!(op, 0x8);
    }
}
