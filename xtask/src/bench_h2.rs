//! WebSockets over HTTP/2 (RFC 8441, issue 18): the gateway against HAProxy
//! and Envoy with the same client, Node's own `http2`
//! (`tests/peers/node/h2_client.js`, `ws` framing on each stream), in front
//! of one WebSocket echo server (Node's `ws`, `tests/peers/node/server.js`);
//! and, on the gateway, HTTP/2 streams against HTTP/1.1 wss on the same
//! listener. Each run is timed as a whole client
//! process, and the proxy's CPU (utime + stime from /proc) is read around
//! it; targets take turns in rotating order, so every ratio is of one run.
use std::{fmt::Write as _, fs, net::SocketAddr, path::Path, process::Command, time::Instant};

use anyhow::{bail, Context, Result};

use crate::bench::{free_port, median, wait_listening, Procs};

/// Each bulk stream echoes one text and one binary message of each size.
const BULK_SIZES: &str = "1048576,4194304,16777216";
const BULK_STREAMS: u64 = 4;
/// Streams opened at once on one connection, one 1-byte echo each.
const MANY_STREAMS: u64 = 100;

/// `cargo xtask bench-h2 [--reps N]` on its own.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1));
    let reps: usize = value("--reps").map_or(Ok(3), |v| v.parse()).context("--reps")?;
    if !(1..=10).contains(&reps) {
        bail!("--reps is 1..10");
    }
    let (bin, work, _ns) = crate::bench::prepare(root, "h2")?;
    print!("{}", section(root, &bin, &work, reps)?);
    Ok(())
}

/// One client run through one proxy: wall seconds and the proxy's CPU
/// seconds, or why it failed.
type Turn = Result<(f64, f64), String>;

struct Target {
    name: &'static str,
    pid: u32,
    port: u16,
}

/// The proxy's CPU seconds so far (utime + stime, all its threads).
fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<u64> = rest.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // utime and stime are fields 14 and 15 of stat; here 11 and 12 (state is not a number).
    Ok((f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)) as f64 / tck)
}

/// Runs `node SCRIPT args` and checks its JSON: every stream (or the one
/// WebSocket) echoed `echoes` messages and closed with 4001.
fn client(root: &Path, script: &str, args: &[String], pid: u32, echoes: u64) -> Turn {
    let before = cpu_secs(pid).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let out = Command::new("node")
        .arg(root.join("tests/peers/node").join(script))
        .args(args)
        .output()
        .map_err(|e| format!("node: {e}"))?;
    let wall = t.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid).map_err(|e| e.to_string())? - before;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(text.lines().last().unwrap_or_default()).map_err(|_| format!("no JSON: {text}"))?;
    let one = [v.clone()];
    let streams = v["streams"].as_array().map_or(&one[..], |s| s.as_slice());
    for s in streams {
        if s.get("status").is_some_and(|st| st != 200) {
            let body = s["body"].as_str().unwrap_or_default().trim();
            return Err(format!("HTTP {} {body:?}", s["status"]));
        }
        if s["echoed"] != echoes || s["close_code"] != 4001 {
            return Err(format!("{} {}", v["error"], s));
        }
    }
    Ok((wall, cpu))
}

/// Runs the measurement in the current network namespace; the report.
pub fn section(root: &Path, bin: &Path, work: &Path, reps: usize) -> Result<String> {
    let kit = crate::bench_tls::Kit::make(work)?;
    let ca = work.join("ca.pem");
    let mut procs = Procs::default();
    // The echo server: Node's `ws` (messages of any size; strict: it refuses
    // an upgrade without a key).
    let echo_port = free_port()?;
    let node_server = root.join("tests/peers/node/server.js");
    let listen = format!("127.0.0.1:{echo_port}");
    procs.spawn("node-echo-h2", Command::new("node").arg(&node_server).args(["--listen", &listen]), work)?;
    wait_listening(echo_port)?;
    let echo_addr = SocketAddr::from(([127, 0, 0, 1], echo_port));
    let (gw_port, hap_port, envoy_port) = (free_port()?, free_port()?, free_port()?);

    let yaml = format!(
        "listeners:\n  - name: h2\n    bind: \"127.0.0.1:{gw_port}\"\n    protocol: websocket\n    tls:\n      \
         alpn: [\"h2\", \"http/1.1\"]\n      certificates: [{{ cert: {}, key: {} }}]\n    routes:\n      \
         - path_prefix: /\n        backends: [\"{echo_addr}\"]\nadmin:\n  socket: {}\n",
        kit.cert.display(),
        kit.key.display(),
        work.join("h2-admin.sock").display()
    );
    let config = work.join("h2.yaml");
    fs::write(&config, yaml)?;
    procs.spawn(
        "gateway-h2",
        Command::new(bin).args(["run", "--config"]).arg(&config).env("GATEWAY_LOG", "warn"),
        work,
    )?;

    // HAProxy (2.4 on) takes extended CONNECT and upgrades to HTTP/1.1
    // backends with a key of its own, as the gateway does.
    let pem = work.join("h2-haproxy.pem");
    fs::write(&pem, [fs::read(&kit.cert)?, fs::read(&kit.key)?].concat())?;
    let hap = format!(
        "global\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  \
         timeout server 60s\n  timeout tunnel 1h\nfrontend h2\n  bind 127.0.0.1:{hap_port} ssl crt {} alpn h2,http/1.1\n  \
         default_backend echo\nbackend echo\n  server e {echo_addr}\n",
        pem.display()
    );
    let hap_cfg = work.join("h2-haproxy.cfg");
    fs::write(&hap_cfg, hap)?;
    procs.spawn("haproxy-h2", Command::new("haproxy").arg("-db").arg("-f").arg(&hap_cfg), work)?;

    let envoy = format!(
        "static_resources:\n  listeners:\n  - name: h2\n    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {envoy_port} }} }}\n    \
         filter_chains:\n    - transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \
         \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          \
         common_tls_context:\n            alpn_protocols: [\"h2\", \"http/1.1\"]\n            \
         tls_certificates: [{{ certificate_chain: {{ filename: {} }}, private_key: {{ filename: {} }} }}]\n      \
         filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \
         \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          \
         stat_prefix: h2\n          codec_type: AUTO\n          http2_protocol_options: {{ allow_connect: true }}\n          \
         upgrade_configs: [{{ upgrade_type: websocket }}]\n          route_config:\n            \
         virtual_hosts: [{{ name: all, domains: [\"*\"], routes: [{{ match: {{ prefix: \"/\" }}, route: {{ cluster: echo, timeout: 0s }} }}] }}]\n          \
         http_filters: [{{ name: envoy.filters.http.router, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }} }}]\n  \
         clusters:\n  - name: echo\n    type: STATIC\n    connect_timeout: 5s\n    load_assignment:\n      cluster_name: echo\n      \
         endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }} }}] }}]\n",
        kit.cert.display(),
        kit.key.display(),
        echo_addr.port()
    );
    let envoy_cfg = work.join("h2-envoy.yaml");
    fs::write(&envoy_cfg, envoy)?;
    procs.spawn("envoy-h2", &mut crate::bench::envoy(&envoy_cfg)?, work)?;
    for p in [gw_port, hap_port, envoy_port] {
        wait_listening(p)?;
    }
    let pid = |name: &str| procs.pid(name).with_context(|| format!("{name} is not running"));
    let targets = [
        Target { name: "gateway", pid: pid("gateway-h2")?, port: gw_port },
        Target { name: "HAProxy", pid: pid("haproxy-h2")?, port: hap_port },
        Target { name: "Envoy", pid: pid("envoy-h2")?, port: envoy_port },
    ];

    let tls_args = |port: u16, scheme: &str| -> Vec<String> {
        vec![
            format!("{scheme}://127.0.0.1:{port}/ws"),
            "--ca".into(),
            ca.display().to_string(),
            "--servername".into(),
            crate::bench_tls::NAME.into(),
        ]
    };
    let with = |mut base: Vec<String>, more: &[&str]| {
        base.extend(more.iter().map(|s| s.to_string()));
        base
    };
    let sizes: Vec<u64> = BULK_SIZES.split(',').map(|s| s.parse().unwrap_or(0)).collect();
    let bulk_echoes = 2 * sizes.len() as u64;
    let bulk_bytes = |streams: u64| streams * 2 * sizes.iter().sum::<u64>();

    // [target][workload] turns: bulk over 4 streams, 100 streams at once.
    let mut h2: Vec<[Vec<Turn>; 2]> = targets.iter().map(|_| [Vec::new(), Vec::new()]).collect();
    // The gateway alone: one WebSocket over HTTP/2, then over HTTP/1.1 wss.
    let mut one: [Vec<Turn>; 2] = [Vec::new(), Vec::new()];
    for rep in 0..reps {
        for k in 0..targets.len() {
            let (i, t) = ((k + rep) % targets.len(), &targets[(k + rep) % targets.len()]);
            let bulk = with(tls_args(t.port, "https"), &["--streams", "4", "--sizes", BULK_SIZES]);
            h2[i][0].push(client(root, "h2_client.js", &bulk, t.pid, bulk_echoes));
            let many = with(tls_args(t.port, "https"), &["--streams", &MANY_STREAMS.to_string(), "--sizes", "1"]);
            h2[i][1].push(client(root, "h2_client.js", &many, t.pid, 2));
        }
        let g = &targets[0];
        let turns = [
            with(tls_args(g.port, "https"), &["--streams", "1", "--sizes", BULK_SIZES]),
            with(tls_args(g.port, "wss"), &["--sizes", BULK_SIZES]),
        ];
        for k in 0..2 {
            let j = (k + rep) % 2;
            let script = if j == 0 { "h2_client.js" } else { "client.js" };
            one[j].push(client(root, script, &turns[j], g.pid, bulk_echoes));
        }
    }
    drop(procs);

    let spread = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
        (median(v), lo, hi)
    };
    let ok = |turns: &[Turn]| -> Result<Vec<(f64, f64)>, String> {
        turns.iter().cloned().collect::<Result<Vec<_>, String>>()
    };
    let mut out = format!(
        "\n## WebSockets over HTTP/2 (RFC 8441)\n\nOne TLS listener per proxy (ALPN h2, http/1.1) in front of one \
         WebSocket echo server (Node `ws`, HTTP/1.1); the client is Node's `http2` (tests/peers/node/h2_client.js), \
         timed as a whole process; proxy CPU from /proc around each run. {reps} repetitions, targets in rotating \
         order. bulk: {BULK_STREAMS} streams on one connection, each echoing a text and a binary message of 1, 4 \
         and 16 MiB ({} MiB each way in all); streams: {MANY_STREAMS} WebSocket streams opened at once on one \
         connection, one 1-byte echo each, then closed.\n\n\
         | target | bulk wall s (min-max) | bulk proxy CPU s per GB relayed (min-max) | bulk wall x gateway | {MANY_STREAMS} streams wall s (min-max) |\n|---|---|---|---|---|\n",
        bulk_bytes(BULK_STREAMS) >> 20
    );
    let gw_bulk = ok(&h2[0][0]).ok();
    for (i, t) in targets.iter().enumerate() {
        match (ok(&h2[i][0]), ok(&h2[i][1])) {
            (Ok(bulk), Ok(many)) => {
                let walls: Vec<f64> = bulk.iter().map(|b| b.0).collect();
                let per_gb: Vec<f64> = bulk.iter().map(|b| b.1 / (2 * bulk_bytes(BULK_STREAMS)) as f64 * 1e9).collect();
                let (w, wlo, whi) = spread(&walls);
                let (c, clo, chi) = spread(&per_gb);
                let ratio = gw_bulk.as_ref().map_or("-".to_string(), |g| {
                    let r: Vec<f64> = bulk.iter().zip(g).map(|(a, b)| a.0 / b.0).collect();
                    let (m, lo, hi) = spread(&r);
                    format!("{m:.2} ({lo:.2}-{hi:.2})")
                });
                let (m, mlo, mhi) = spread(&many.iter().map(|b| b.0).collect::<Vec<_>>());
                writeln!(
                    out,
                    "| {} | {w:.2} ({wlo:.2}-{whi:.2}) | {c:.2} ({clo:.2}-{chi:.2}) | {ratio} | {m:.2} ({mlo:.2}-{mhi:.2}) |",
                    t.name
                )?;
            }
            (Err(e), _) | (_, Err(e)) => writeln!(out, "| {} | failed: {e} | | | |", t.name)?,
        }
    }
    out += "\nThe gateway alone, one WebSocket with the bulk messages: over an HTTP/2 stream against HTTP/1.1 wss on \
            the same listener (both relayed in user space).\n\n| protocol | wall s (min-max) | gateway CPU s per GB relayed (min-max) |\n|---|---|---|\n";
    for (j, name) in ["HTTP/2 stream", "HTTP/1.1 wss"].iter().enumerate() {
        match ok(&one[j]) {
            Ok(v) => {
                let (w, wlo, whi) = spread(&v.iter().map(|b| b.0).collect::<Vec<_>>());
                let per_gb: Vec<f64> = v.iter().map(|b| b.1 / (2 * bulk_bytes(1)) as f64 * 1e9).collect();
                let (c, clo, chi) = spread(&per_gb);
                writeln!(out, "| {name} | {w:.2} ({wlo:.2}-{whi:.2}) | {c:.2} ({clo:.2}-{chi:.2}) |")?;
            }
            Err(e) => writeln!(out, "| {name} | failed: {e} | |")?,
        }
    }
    Ok(out)
}
