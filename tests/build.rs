//! `cfg(gateway_privileged)`: set when the tests are built as root, or in CI
//! (`CI=true`, where a missing root must fail the tests, not skip them).
//! Without it the tests that need root are ignored, with the reason.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(gateway_privileged)");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-changed=build.rs");
    // The effective uid: the third field of /proc/self/status's `Uid:` line.
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false);
    let ci = matches!(std::env::var("CI").as_deref(), Ok("true" | "1"));
    if root || ci {
        println!("cargo::rustc-cfg=gateway_privileged");
    }
}
