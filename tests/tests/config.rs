//! `gateway check` and `gateway run` against good and bad config files, through
//! the binary, as an operator would see them.
use std::{fs, process::Command};

use gateway_tests::{gateway_bin, repo_path, temp_dir};

fn check(yaml: &str) -> (i32, String) {
    let dir = temp_dir("cfg");
    let f = dir.join("gateway.yaml");
    fs::write(&f, yaml).unwrap();
    let out = Command::new(gateway_bin()).args(["check", "--config"]).arg(&f).output().unwrap();
    let _ = fs::remove_dir_all(&dir);
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

const GOOD: &str = r#"listeners:
  - name: pg
    bind: "127.0.0.1:15432"
    protocol: tcp
    backends: ["10.0.0.5:5432", "10.0.0.6:5432"]
    balance: round_robin
    offload: auto
    connect_timeout: 5s
    idle_timeout: 1h
admin:
  socket: /run/gateway/admin.sock
"#;

/// The websocket listener shape of the WebSocket issue.
const WS: &str = r#"listeners:
  - name: chat
    bind: "0.0.0.0:8080"
    protocol: websocket
    handshake_timeout: 10s
    routes:
      - host: chat.example.com
        path_prefix: /ws
        backends: ["10.0.0.7:9000"]
        balance: round_robin
        allowed_origins: ["https://chat.example.com"]
        mode: passthrough
      - path_prefix: /mqtt
        bridge_tcp: ["10.0.0.8:1883"]
"#;

#[test]
fn shipped_example_and_documented_shape_pass() {
    let (code, err) = check(WS);
    assert_eq!(code, 0, "{err}");
    let out = Command::new(gateway_bin())
        .args(["check", "--config"])
        .arg(repo_path("examples/gateway.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(check(GOOD).0, 0);
}

#[test]
fn every_kind_of_bad_config_is_rejected_with_its_key_path_and_value() {
    let cases: &[(&str, String, &[&str])] = &[
        ("unknown key", GOOD.replace("balance:", "balanse:"), &["listeners[0]", "unknown field `balanse`"]),
        ("unknown top-level key", format!("{GOOD}metrics: {{}}\n"), &["unknown field `metrics`"]),
        ("unknown admin key", GOOD.replace("socket:", "path:"), &["admin", "unknown field `path`"]),
        (
            "duplicate name",
            GOOD.replace(
                "admin:",
                "  - name: pg\n    bind: \"127.0.0.1:15433\"\n    backends: [\"10.0.0.7:1\"]\nadmin:",
            ),
            &["listeners[1].name", "duplicate listener name \"pg\""],
        ),
        (
            "duplicate bind",
            GOOD.replace(
                "admin:",
                "  - name: pg2\n    bind: \"127.0.0.1:15432\"\n    backends: [\"10.0.0.7:1\"]\nadmin:",
            ),
            &["listeners[1].bind", "duplicate bind address \"127.0.0.1:15432\""],
        ),
        (
            "bad bind address",
            GOOD.replace("127.0.0.1:15432", "localhost:99999"),
            &["listeners[0].bind", "\"localhost:99999\""],
        ),
        (
            "bad backend address",
            GOOD.replace("10.0.0.6:5432", "10.0.0.6"),
            &["listeners[0].backends[1]", "\"10.0.0.6\" is not an IP:PORT address"],
        ),
        ("bad duration", GOOD.replace("5s", "5 seconds"), &["listeners[0].connect_timeout", "\"5 seconds\""]),
        ("bad idle duration", GOOD.replace("1h", "1hr"), &["listeners[0].idle_timeout", "\"1hr\""]),
        (
            "empty backends",
            GOOD.replace(r#"["10.0.0.5:5432", "10.0.0.6:5432"]"#, "[]"),
            &["listeners[0].backends", "must list at least one backend"],
        ),
        ("bad balance", GOOD.replace("round_robin", "fastest"), &["listeners[0].balance", "\"fastest\"", "least_conn"]),
        ("bad offload", GOOD.replace("offload: auto", "offload: turbo"), &["listeners[0].offload", "\"turbo\""]),
        ("bad protocol", GOOD.replace("protocol: tcp", "protocol: sctp"), &["listeners[0].protocol", "\"sctp\""]),
        ("not YAML", "listeners: [\n".to_string(), &["gateway.yaml"]),
        (
            "websocket listener with backends",
            WS.replace("    routes:", "    backends: [\"10.0.0.1:1\"]\n    routes:"),
            &["listeners[0].backends", "routes"],
        ),
        (
            "websocket listener without routes",
            WS.split("    routes:").next().unwrap().to_string(),
            &["listeners[0].routes", "is required on a websocket listener"],
        ),
        (
            "route with no backends",
            WS.replace("        backends: [\"10.0.0.7:9000\"]\n", ""),
            &["listeners[0].routes[0]", "needs `backends`"],
        ),
        (
            "route with a bad backend",
            WS.replace("10.0.0.7:9000", "10.0.0.7"),
            &["listeners[0].routes[0].backends[0]", "\"10.0.0.7\""],
        ),
        (
            "route with a bad host",
            WS.replace("host: chat.example.com", "host: \"chat example\""),
            &["listeners[0].routes[0].host", "not a host name"],
        ),
        (
            "route with a bad mode",
            WS.replace("mode: passthrough", "mode: tap"),
            &["listeners[0].routes[0].mode", "\"tap\""],
        ),
        (
            "route with a bad origin",
            WS.replace("\"https://chat.example.com\"", "\"chat\""),
            &["listeners[0].routes[0].allowed_origins[0]", "\"chat\""],
        ),
        (
            "conflicting routes",
            WS.replace("      - path_prefix: /mqtt", "      - host: chat.example.com\n        path_prefix: /ws"),
            &["listeners[0].routes[1].path_prefix", "conflicts with routes[0]"],
        ),
        (
            "bad handshake_timeout",
            WS.replace("handshake_timeout: 10s", "handshake_timeout: soon"),
            &["listeners[0].handshake_timeout", "\"soon\""],
        ),
    ];
    for (what, yaml, needles) in cases {
        let (code, err) = check(yaml);
        assert_ne!(code, 0, "{what}: accepted");
        for n in *needles {
            assert!(err.contains(n), "{what}: message {err:?} does not contain {n:?}");
        }
    }
}

/// `run` validates too, and a bad file starts nothing: no admin socket, no listener.
#[test]
fn run_refuses_a_bad_file_before_starting_anything() {
    let dir = temp_dir("cfgrun");
    let admin = dir.join("admin.sock");
    let f = dir.join("gateway.yaml");
    let yaml = GOOD.replace("/run/gateway/admin.sock", admin.to_str().unwrap()).replace("1h", "forever");
    fs::write(&f, yaml).unwrap();
    let out = Command::new(gateway_bin()).args(["run", "--config"]).arg(&f).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("listeners[0].idle_timeout") && err.contains("\"forever\""), "{err}");
    assert!(!admin.exists(), "admin socket created for a rejected config");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn missing_file_is_named() {
    let out = Command::new(gateway_bin()).args(["check", "--config", "/nonexistent/gateway.yaml"]).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/gateway.yaml") && err.contains("No such file"), "{err}");
}

/// A listener that can't bind stops the start-up with its name and address,
/// before the admin socket exists.
#[test]
fn run_names_the_listener_that_cannot_bind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = temp_dir("cfgbind");
    let admin = dir.join("admin.sock");
    let f = dir.join("gateway.yaml");
    let yaml = format!(
        "listeners:\n  - name: busy\n    bind: \"{addr}\"\n    backends: [\"127.0.0.1:9\"]\n    offload: userspace\nadmin:\n  socket: {}\n",
        admin.display()
    );
    fs::write(&f, yaml).unwrap();
    let out = Command::new(gateway_bin()).args(["run", "--config"]).arg(&f).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("\"busy\"") && err.contains(&addr.to_string()) && err.contains("in use"), "{err}");
    assert!(!admin.exists());
    drop(taken);
    let _ = fs::remove_dir_all(&dir);
}
