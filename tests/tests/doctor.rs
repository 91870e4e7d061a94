//! `gateway doctor` on this host: real probes, and the exit status operators
//! script against.
use std::{fs, process::Command};

use gateway_tests::{gateway_bin, temp_dir, Value};

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn doctor_reports_this_host() {
    let out = Command::new(gateway_bin()).args(["doctor", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kernel_path"], true, "{v}");
    assert_eq!(v["userspace_path"], true);
    let checks = v["checks"].as_array().unwrap();
    let get = |n: &str| checks.iter().find(|c| c["name"] == n).unwrap_or_else(|| panic!("no {n} check in {v}"));
    assert_eq!(get("sockmap")["ok"], true);
    assert_eq!(get("privileges")["ok"], true);
    assert_eq!(get("btf")["ok"], true);
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(get("kernel")["detail"], release.trim());
    // kTLS is probed, not assumed: whatever the answer, it is explained.
    assert!(get("ktls")["detail"].as_str().unwrap().contains("TCP_ULP"));

    let text = Command::new(gateway_bin()).arg("doctor").output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("kernel     usable"), "{text}");
}

/// Unprivileged, with a config that insists on the kernel path: doctor says
/// which listener can't be served that way and exits non-zero.
#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn doctor_fails_when_offload_kernel_cannot_be_honoured() {
    let dir = temp_dir("doctor");
    let f = dir.join("gateway.yaml");
    fs::write(
        &f,
        "listeners:\n  - name: strict\n    bind: \"127.0.0.1:0\"\n    backends: [\"127.0.0.1:9\"]\n    offload: kernel\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .arg(gateway_bin())
        .args(["doctor", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("kernel     NOT usable") && text.contains("not privileged"), "{text}");
    assert!(text.contains("\"strict\" has offload: kernel"), "{text}");
    let _ = fs::remove_dir_all(&dir);
}
