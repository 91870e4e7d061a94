//! `gateway stats` and the Prometheus endpoint agree with what was sent, on
//! both data paths, for closed and live flows. curl scrapes the metrics.
use std::{collections::HashMap, time::Duration};

use gateway_tests::*;

/// `name{labels} value` lines of a Prometheus text page.
fn samples(page: &str) -> HashMap<String, u64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn stats_and_metrics_match_the_bytes_sent() {
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let listeners = format!(
        "  - name: k\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{0}\"]\n    offload: kernel\n\
         \x20 - name: u\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{0}\"]\n    offload: userspace\n",
        be.addr
    );
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: "  metrics: \"127.0.0.1:0\"\n".into() });
    let metrics = gw.status()["metrics"].as_str().expect("metrics address in status").to_string();
    let (k, u) = (gw.listener("k"), gw.listener("u"));
    const KLEN: u64 = 3 << 20;
    const ULEN: u64 = 5 << 20;
    echo_roundtrip(&topo.connect(k).unwrap(), Pattern(1), KLEN).unwrap();
    echo_roundtrip(&topo.connect(u).unwrap(), Pattern(2), ULEN).unwrap();
    gw.wait_idle();
    // One more kernel flow, left open: live bytes count too.
    let mut live = topo.connect(k).unwrap();
    {
        use std::io::{Read, Write};
        live.write_all(&[7u8; 1000]).unwrap();
        let mut back = [0u8; 1000];
        live.read_exact(&mut back).unwrap();
    }
    gw.wait_for("the live flow", Duration::from_secs(10), |g| g.flows().len() == 1);

    let v = gw.stats();
    let l = |name: &str| v["listeners"].as_array().unwrap().iter().find(|l| l["name"] == name).unwrap().clone();
    let (ks, us) = (l("k"), l("u"));
    let n = |x: &Value, k: &str| x[k].as_u64().unwrap_or_else(|| panic!("{k} in {x}"));
    let b = |x: &Value, k: &str| x["bytes"][k].as_u64().unwrap();
    assert_eq!(n(&ks, "accepted"), 2, "{ks}");
    assert_eq!(n(&ks, "active_kernel"), 1, "{ks}");
    assert_eq!(n(&ks, "kernel_flows"), 2, "{ks}");
    assert_eq!(ks["closed"]["client-closed"], 1, "{ks}");
    for dir in ["client_to_backend", "backend_to_client"] {
        assert_eq!(b(&ks, &format!("kernel_{dir}")) + b(&ks, &format!("user_{dir}")), KLEN + 1000, "{ks}");
        assert_eq!(b(&us, &format!("user_{dir}")), ULEN, "{us}");
        assert_eq!(b(&us, &format!("kernel_{dir}")), 0, "{us}");
    }
    assert_eq!(us["userspace_by_reason"]["configured-userspace"], 1, "{us}");
    assert_eq!(ks["backends"][0]["flows"], 2, "{ks}");

    // Prometheus, scraped by curl inside the gateway's namespace.
    let out = Topology::cmd_in(&topo.gw, "curl").args(["-sf", &format!("http://{metrics}/metrics")]).output().unwrap();
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    let page = String::from_utf8_lossy(&out.stdout);
    let m = samples(&page);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in\n{page}"));
    for (listener, len) in [("k", KLEN + 1000), ("u", ULEN)] {
        for dir in ["client_to_backend", "backend_to_client"] {
            let total =
                get(&format!("gateway_bytes_total{{listener=\"{listener}\",path=\"kernel\",direction=\"{dir}\"}}"))
                    + get(&format!(
                        "gateway_bytes_total{{listener=\"{listener}\",path=\"userspace\",direction=\"{dir}\"}}"
                    ));
            assert_eq!(total, len, "{listener} {dir}");
        }
    }
    assert_eq!(get("gateway_flows_closed_total{listener=\"k\",cause=\"client-closed\"}"), 1);
    assert_eq!(get("gateway_flows_active{listener=\"k\",path=\"kernel\"}"), 1);
    assert_eq!(get("gateway_kernel_path_available{}"), 1);
    assert!(!page.contains("flow=\""), "metrics must not be labelled per flow");
    // Other paths, other methods and oversized heads get their status.
    let big = format!("X-Big: {}", "a".repeat(20_000));
    for (args, want) in [
        (vec![format!("http://{metrics}/nope")], "404"),
        (vec!["-X".into(), "POST".into(), format!("http://{metrics}/metrics")], "405"),
        (vec!["-H".into(), big, format!("http://{metrics}/metrics")], "431"),
    ] {
        let out = Topology::cmd_in(&topo.gw, "curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "status for the request meant to get {want}");
    }
    drop(live);
    gw.wait_idle();
}

/// One JSON record per flow event: open, hand-off, periodic updates while it
/// lives, close with bytes, duration, path and cause.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn flow_log_records_each_event_as_json() {
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let listeners = format!(
        "  - name: k\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{}\"]\n    offload: kernel\n",
        be.addr
    );
    let gw = Gateway::start(
        &topo,
        &GatewayConfig { listeners, extra: "log:\n  format: json\n  flow_interval: 200ms\n".into() },
    );
    let s = topo.connect(gw.listener("k")).unwrap();
    echo_roundtrip(&s, Pattern(4), 1 << 20).unwrap_or_else(|e| panic!("{e}"));
    drop(s);
    gw.wait_idle();
    // A second flow that stays open past a few update intervals.
    let mut open = topo.connect(gw.listener("k")).unwrap();
    {
        use std::io::{Read, Write};
        open.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        open.read_exact(&mut b).unwrap();
    }
    let records = |g: &Gateway| -> Vec<Value> {
        g.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "gateway::flow")
            .collect()
    };
    gw.wait_for("update records for the open flow", Duration::from_secs(10), |g| {
        records(g).iter().filter(|r| r["fields"]["event"] == "update" && r["fields"]["flow"] == 2).count() >= 2
    });
    drop(open);
    gw.wait_idle();
    let recs = records(&gw);
    let of = |flow: u64, event: &str| -> Vec<Value> {
        recs.iter()
            .filter(|r| r["fields"]["flow"] == flow && r["fields"]["event"] == event)
            .map(|r| r["fields"].clone())
            .collect()
    };
    assert_eq!(of(1, "open").len(), 1, "{recs:?}");
    let handoff = &of(1, "handoff")[0];
    assert_eq!(handoff["path"], "kernel");
    let close = &of(1, "close")[0];
    assert_eq!(close["bytes_c2b"], 1 << 20, "{close}");
    assert_eq!(close["bytes_b2c"], 1 << 20, "{close}");
    assert_eq!(close["path"], "kernel");
    assert_eq!(close["cause"], "client-closed");
    assert!(close["duration_ms"].as_u64().is_some());
    assert_eq!(of(2, "close").len(), 1);
    assert!(of(2, "update").iter().all(|u| u["path"] == "kernel"));
}

/// The admin socket is root-only by default; `admin.group` opens it to a group.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn admin_socket_is_owner_only_unless_a_group_is_named() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let listeners = format!("  - name: t\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{}\"]\n", be.addr);
    let gw = Gateway::start(&topo, &GatewayConfig { listeners: listeners.clone(), extra: String::new() });
    let m = std::fs::metadata(&gw.admin).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    assert_eq!(m.uid(), 0);
    drop(gw);
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: "  group: nogroup\n".into() });
    let m = std::fs::metadata(&gw.admin).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o660);
    let nogroup = std::process::Command::new("getent").args(["group", "nogroup"]).output().unwrap();
    let gid: u32 = String::from_utf8_lossy(&nogroup.stdout).split(':').nth(2).unwrap().parse().unwrap();
    assert_eq!(m.gid(), gid);

    // A member of the group, not the daemon's user, reads...
    let as_nobody = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
            .args(args)
            .output()
            .unwrap()
    };
    let sock = gw.admin.to_str().unwrap();
    let bin = gateway_bin();
    let bin = bin.to_str().unwrap();
    for cmd in ["flows", "stats"] {
        let out = as_nobody(&[bin, cmd, "--json", "--socket", sock]);
        assert!(out.status.success(), "{cmd} as a group member: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v.get("flows").is_some() || v.get("listeners").is_some(), "{cmd}: {v}");
    }
    // ...and is refused what changes the daemon or hands out its sockets.
    let out = as_nobody(&[bin, "reload", "--socket", sock]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("daemon's own user"), "reload as a group member: {err}");
    let ask = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'handover\\n'); \
               m,a,f,_=s.recvmsg(4096, socket.CMSG_SPACE(64*4)); print(len(a), m.decode())";
    // Debian's interpreter: root's own (pyenv) is not readable by nobody.
    let out = as_nobody(&["/usr/bin/python3", "-c", ask, sock]);
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        reply.starts_with("0 ") && reply.contains("daemon's own user"),
        "handover as a group member: {reply} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(gw.log_text().contains("refused \"handover\" to a read-only peer"), "{}", gw.log_text());
    // The daemon's own user still may: the refusals changed nothing.
    assert!(gw.try_request("reload").unwrap()["ok"] == true);
    let s = topo.connect(gw.listener("t")).unwrap();
    echo_roundtrip(&s, Pattern(2), 1 << 16).unwrap();
}

/// `gateway flows --sort rate` samples twice and puts the busy flow first
/// with its rate; an idle flow shows a rate of 0. `--watch` redraws.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn flows_sort_by_rate_between_two_samples() {
    use std::{
        io::{Read, Write},
        sync::{
            atomic::{AtomicBool, Ordering},
            Arc,
        },
    };
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let listeners = format!(
        "  - name: k\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{}\"]\n    offload: kernel\n",
        be.addr
    );
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let k = gw.listener("k");
    let mut idle = topo.connect(k).unwrap();
    idle.write_all(b"hello").unwrap();
    let mut b = [0u8; 5];
    idle.read_exact(&mut b).unwrap();
    // A busy flow: 64 KiB round trips until told to stop (at most 60 s).
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let (stop, mut s) = (stop.clone(), topo.connect(k).unwrap());
        std::thread::spawn(move || {
            let (chunk, mut back) = (vec![7u8; 64 << 10], vec![0u8; 64 << 10]);
            let end = std::time::Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < end {
                s.write_all(&chunk).unwrap();
                s.read_exact(&mut back).unwrap();
            }
        })
    };
    gw.wait_for("two flows", Duration::from_secs(10), |g| g.flows().len() == 2);
    let flows = |args: &[&str]| {
        let out = std::process::Command::new(gateway_bin())
            .args(["flows", "--socket"])
            .arg(&gw.admin)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let v: Value = serde_json::from_str(&flows(&["--json", "--sort", "rate", "--interval", "0.5"])).unwrap();
    let f = v["flows"].as_array().unwrap();
    assert_eq!(f.len(), 2, "{v}");
    let rate =
        |f: &Value| f["rate_client_to_backend"].as_u64().unwrap() + f["rate_backend_to_client"].as_u64().unwrap();
    assert!(rate(&f[0]) > 0 && f[0]["bytes_client_to_backend"].as_u64() > Some(5), "busy flow first: {v}");
    assert_eq!(rate(&f[1]), 0, "{v}");
    // The table has the column; a bad interval is refused by name.
    assert!(flows(&["--sort", "rate", "--interval", "0.2"]).contains("RATE"));
    let out = std::process::Command::new(gateway_bin())
        .args(["flows", "--interval", "0", "--socket"])
        .arg(&gw.admin)
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--interval"));
    stop.store(true, Ordering::Relaxed);
    busy.join().unwrap();
}
