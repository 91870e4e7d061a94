//! The shipped systemd unit: it verifies, and the capabilities it grants are
//! enough for the daemon, running as an unprivileged user, to load and use
//! the kernel path.
use std::{fs, process::Command};

use gateway_tests::*;

fn unit() -> String {
    fs::read_to_string(repo_path("packaging/gateway.service")).unwrap()
}

#[test]
fn systemd_unit_verifies() {
    // The unit names the installed path; point it at the binary under test.
    let dir = temp_dir("unit");
    let f = dir.join("gateway.service");
    fs::write(&f, unit().replace("/usr/local/bin/gateway", gateway_bin().to_str().unwrap())).unwrap();
    let out = match Command::new("systemd-analyze").arg("verify").arg(&f).output() {
        Ok(o) => o,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("systemd-analyze: {e} (scripts/setup.sh installs systemd)")
        }
        Err(e) => {
            eprintln!("skipping systemd_unit_verifies: systemd-analyze unavailable ({e})");
            return;
        }
    };
    let _ = fs::remove_dir_all(&dir);
    assert!(out.status.success(), "systemd-analyze verify failed:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "systemd-analyze verify warned:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Bit numbers of the capabilities named in the unit's AmbientCapabilities.
fn unit_caps() -> Vec<String> {
    let u = unit();
    let line = u.lines().find_map(|l| l.strip_prefix("AmbientCapabilities=")).expect("AmbientCapabilities in the unit");
    line.split_whitespace().map(|c| c.to_lowercase()).collect()
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn the_units_capabilities_are_enough_for_the_kernel_path() {
    // Keep only what this host's bounding set allows (a sandbox may lack some).
    let bounding = fs::read_to_string("/proc/self/status").unwrap();
    let bnd =
        u64::from_str_radix(bounding.lines().find_map(|l| l.strip_prefix("CapBnd:")).unwrap().trim(), 16).unwrap();
    let bits = [("cap_bpf", 39), ("cap_perfmon", 38), ("cap_net_admin", 12), ("cap_net_bind_service", 10)];
    let mut caps = Vec::new();
    for c in unit_caps() {
        let bit =
            bits.iter().find(|(n, _)| *n == c).unwrap_or_else(|| panic!("unexpected capability {c} in the unit")).1;
        if bnd & (1 << bit) != 0 {
            caps.push(c);
        } else {
            eprintln!("{c} is not in this host's bounding set; running without it");
        }
    }
    let list = caps.join(",");
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let listeners = format!(
        "  - name: t\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{}\"]\n    offload: kernel\n",
        be.addr
    );
    let inh = format!("--inh={list}");
    let amb = format!("--addamb={list}");
    // capsh keeps the capabilities across the switch to nobody as ambient ones,
    // like systemd's AmbientCapabilities= with a DynamicUser.
    let gw = Gateway::start_with(
        &topo,
        &GatewayConfig { listeners, extra: String::new() },
        &[],
        &["capsh", &inh, "--keep=1", "--user=nobody", &amb, "--", "-c", "exec \"$0\" \"$@\""],
    );
    let st = gw.status();
    assert_eq!(st["kernel_path"], true, "{st}\n{}", gw.log_text());
    // Without CAP_SETPCAP the bounding set cannot shrink, and the log says so.
    assert!(gw.log_text().contains("the bounding set stays as started"), "{}", gw.log_text());
    let status = fs::read_to_string(format!("/proc/{}/status", gw.pid())).unwrap();
    assert!(status.lines().any(|l| l.starts_with("Uid:") && l.contains("65534")), "not running as nobody:\n{status}");
    let s = topo.connect(gw.listener("t")).unwrap();
    let f = gw.wait_flow("a kernel flow", |f| f["path"] == "kernel");
    assert_eq!(f["path"], "kernel");
    echo_roundtrip(&s, Pattern(12), 1 << 20).unwrap();
    gw.wait_idle();
}

/// After set-up the daemon keeps only CAP_NET_ADMIN and CAP_NET_BIND_SERVICE,
/// and the kernel path keeps working without the rest.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn daemon_drops_capabilities_after_set_up() {
    let topo = Topology::new();
    let be = Backend::echo(&topo);
    let listeners = format!(
        "  - name: t\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    backends: [\"{}\"]\n    offload: kernel\n",
        be.addr
    );
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let status = fs::read_to_string(format!("/proc/{}/status", gw.pid())).unwrap();
    let cap = |name: &str| {
        let v = status.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim();
        u64::from_str_radix(v, 16).unwrap()
    };
    let wanted = (1 << 10) | (1 << 12); // CAP_NET_BIND_SERVICE, CAP_NET_ADMIN
    assert_eq!(cap("CapEff:"), wanted, "{status}");
    assert_eq!(cap("CapPrm:"), wanted, "{status}");
    assert_eq!(cap("CapBnd:") & !wanted, 0, "{status}");
    let s = topo.connect(gw.listener("t")).unwrap();
    gw.wait_for("a kernel flow", std::time::Duration::from_secs(10), |g| {
        g.flows().iter().any(|f| f["path"] == "kernel")
    });
    echo_roundtrip(&s, Pattern(13), 4 << 20).unwrap();
    gw.wait_idle();
}
