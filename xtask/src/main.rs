//! Developer tasks. `cargo xtask help` lists them.
use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};

mod bench;
mod bench_auth;
mod bench_density;
mod bench_h2;
mod bench_place;
mod bench_tls;
mod bench_ws;
mod layers;
mod study;

const USAGE: &str = "\
usage: cargo xtask <task> [args]

tasks:
  build-ebpf [--debug]   build the kernel programs (gateway-ebpf) for bpfel-unknown-none
  build [--release]      build-ebpf, then the daemon with the object embedded
  test [cargo test args] build, then run every test in the workspace (needs root for the e2e tests);
                         without arguments, first `cargo fmt --check` and clippy with -D warnings
  layers [ROOT]          fail if a module of the daemon (gateway/src) imports a layer above its own, or
                         modules import each other in a cycle; the test command runs it first
  fuzz [SECONDS]         build the fuzz targets (fuzz/, cargo-fuzz, libFuzzer) and run each for SECONDS
                         (20) from its seed corpus; a failing input is printed and kept under
                         target/fuzz-run/<target>/artifacts; the test command runs this after the suite
  soak [FLOWS]           the churn test (tests/tests/soak.rs) at FLOWS (100000) flows across every
                         mode, a tenth aborted; then no fds, tasks, map entries or slots left, RSS flat
  bench [--quick] [--attach-variants] [--rates-only]
                         benchmark direct / kernel path / userspace path / haproxy / nginx
                         (--attach-variants: also the verdict attached as BPF_SK_SKB_VERDICT
                         and behind a stream parser, 64 B RR; --rates-only: connection and
                         upgrade rates and unpinned latencies only)
  bench-auth [--secs S] [--reps N]
                         upgrades/s through one daemon on the same passthrough route without auth and with
                         JWT verification (HS256, RS256, ES256), as ratios in the same run (also a section of
                         `bench`)
  bench-h2 [--reps N]    WebSockets over HTTP/2 (RFC 8441): the gateway, HAProxy and Envoy with Node's http2
                         client (bulk over 4 streams, 100 streams at once), and the gateway's HTTP/2 streams
                         against its HTTP/1.1 wss (also a section of `bench`)
  bench-density [--conns N] [--interval S] [--secs S] [--reps N] [--only T,..] [--gateway BIN]
                         hold N (6000) passthrough WebSockets through the gateway (kernel, user
                         space, auto), nginx and Envoy, one 64 B message each every S (5) s:
                         proxy RSS, host TCP memory and slab per connection, proxy CPU, echo
                         p50/p99, upgrade rate while held (--only: of these targets, named
                         direct|kernel|userspace|auto|nginx|envoy; --gateway: this daemon, unbuilt)
";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build-ebpf") => build_ebpf(args.iter().any(|a| a == "--debug")).map(|_| ()),
        Some("build") => build(args.iter().any(|a| a == "--release")),
        Some("test") => test(&args[1..]),
        // The churn test at 10^5 flows (CI runs it at 5,000).
        Some("soak") => soak(&args[1..]),
        Some("fuzz") => fuzz(&args[1..]),
        Some("layers") => layers::check(&args.get(1).map(PathBuf::from).unwrap_or_else(root)),
        Some("bench") => build_release_daemon().and_then(|()| bench::run(&root(), &args[1..])),
        // Run by `bench --attach-variants` (root, cgroup v2): the sk_msg study.
        Some("study-skmsg") => study::run(&root(), &args[1..]),
        // For work on the upgrade path, outside the full bench:
        // `ws-echo PORT` serves the bench's WebSocket echo backend;
        // `ws-upgrades PORT COUNT` runs the bench's upgrade loop against PORT;
        // `ws-rr PORT SECS` its 64 B echo round trips on one WebSocket.
        Some("ws-echo") => bench_ws::serve_port(&args[1..]),
        Some("ws-upgrades") => bench_ws::upgrades(&args[1..]),
        Some("ws-rr") => bench_ws::round_trips(&args[1..]),
        // The bench's three-host placement runs these on the client and
        // backend hosts: `tcp-echo IP:PORT`, `rr IP:PORT SECS`, `crr IP:PORT SECS`.
        Some("bench-auth") => build_release_daemon().and_then(|()| bench_auth::run(&root(), &args[1..])),
        Some("bench-h2") => build_release_daemon().and_then(|()| bench_h2::run(&root(), &args[1..])),
        Some("bench-density") if args.iter().any(|a| a == "--gateway") => bench_density::run(&root(), &args[1..]),
        Some("bench-density") => build_release_daemon().and_then(|()| bench_density::run(&root(), &args[1..])),
        // The density bench's backend and client, one epoll loop each.
        Some("ws-echo-many") => bench_density::serve_many(&args[1..]),
        Some("ws-hold") => bench_density::hold(&args[1..]),
        Some("tcp-echo") => bench::tcp_echo_task(&args[1..]),
        Some("rr") => bench::rr_task(&args[1..]),
        Some("crr") => bench::crr_task(&args[1..]),
        Some("help" | "--help" | "-h") | None => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(anyhow::anyhow!("unknown task '{other}'\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn cargo() -> Command {
    Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// The nightly that builds the kernel crate; scripts/setup.sh records which one
/// matches bpf-linker's LLVM.
fn ebpf_toolchain() -> String {
    std::fs::read_to_string(root().join("target/ebpf-toolchain"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "nightly".into())
}

/// Builds gateway-ebpf and returns the object's path.
fn build_ebpf(debug: bool) -> Result<PathBuf> {
    let dir = root().join("gateway-ebpf");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&dir)
        .args(["run", &ebpf_toolchain(), "cargo", "build", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        // The daemon's environment must not leak into the nightly build.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO")
        .env("CARGO_ENCODED_RUSTFLAGS", "-C\x1fdebuginfo=2\x1f-C\x1flink-arg=--btf");
    if !debug {
        cmd.arg("--release");
    }
    run(&mut cmd).context("building the kernel programs (did scripts/setup.sh run?)")?;
    let profile = if debug { "debug" } else { "release" };
    let obj = dir.join("target/bpfel-unknown-none").join(profile).join("gateway-ebpf");
    if !obj.exists() {
        bail!("the build did not produce {}", obj.display());
    }
    Ok(obj)
}

fn build(release: bool) -> Result<()> {
    let obj = build_ebpf(false)?;
    let mut cmd = cargo();
    cmd.current_dir(root()).args(["build", "--workspace", "--all-targets"]).env("GATEWAY_EBPF_OBJECT", &obj);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

/// The benchmark measures the optimised daemon only.
fn build_release_daemon() -> Result<()> {
    let obj = build_ebpf(false)?;
    run(cargo().current_dir(root()).args(["build", "--release", "-p", "gateway"]).env("GATEWAY_EBPF_OBJECT", &obj))
}

fn test(extra: &[String]) -> Result<()> {
    let obj = build_ebpf(false)?;
    // The whole suite (no arguments, as CI runs it) starts with the house
    // rules: rustfmt's check, and clippy with warnings denied.
    if extra.is_empty() {
        layers::check(&root())?;
        run(cargo().current_dir(root()).args(["fmt", "--all", "--", "--check"]))?;
        run(cargo()
            .current_dir(root())
            .args(["clippy", "--workspace", "--all-targets", "--all-features", "--", "-D", "warnings"])
            .env("GATEWAY_EBPF_OBJECT", &obj))?;
    }
    // Build first so that the e2e tests find target/debug/gateway.
    run(cargo().current_dir(root()).args(["build", "--workspace", "--all-targets"]).env("GATEWAY_EBPF_OBJECT", &obj))?;
    let mut cmd = cargo();
    cmd.current_dir(root())
        .args(["test", "--workspace", "--no-fail-fast"])
        .env("GATEWAY_EBPF_OBJECT", &obj)
        .env("GATEWAY_BIN", root().join("target/debug/gateway"))
        .args(extra)
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("cannot start {cmd:?}"))?;
    // Tee the output and keep it: a failure's report is printed when its
    // test binary ends, and later binaries scroll it out of a CI log's tail.
    let mut kept = Vec::new();
    {
        use std::io::{BufRead, Write};
        let out = child.stdout.take().context("cargo test's stdout")?;
        let mut tty = std::io::stdout().lock();
        for line in std::io::BufReader::new(out).lines() {
            let line = line.context("reading cargo test's output")?;
            let _ = writeln!(tty, "{line}");
            kept.push(line);
        }
    }
    let status = child.wait()?;
    if status.success() && extra.is_empty() {
        return fuzz(&[]);
    }
    if !status.success() {
        let again = failure_reports(&kept);
        if !again.is_empty() {
            println!("\nxtask: the failures' reports again (printed above, where each test binary ended):");
            for line in again {
                println!("{line}");
            }
        }
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// `cargo fuzz` on the kernel crate's nightly, with the environment of the
/// cargo that runs xtask left out (as for the kernel crate).
fn cargo_fuzz(obj: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root().join("fuzz"))
        .args(["run", &ebpf_toolchain(), "cargo", "fuzz"])
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO")
        .env("GATEWAY_EBPF_OBJECT", obj);
    cmd
}

/// Every fuzz target for a bounded time (`SECONDS`, default 20) from its seed
/// corpus (`fuzz/corpus/<target>`, left unchanged: what libFuzzer finds goes
/// to a scratch corpus). Without sanitizers: the targets exercise safe Rust,
/// where a panic or a failed property is the finding.
fn fuzz(args: &[String]) -> Result<()> {
    let secs: u64 = match args.first() {
        Some(s) => s.parse().with_context(|| format!("fuzz: {s:?} is not a number of seconds"))?,
        None => 20,
    };
    let obj = build_ebpf(false)?;
    let flags = ["-s", "none", "--debug-assertions"];
    run(cargo_fuzz(&obj).arg("build").args(flags)).context("building the fuzz targets (did scripts/setup.sh run?)")?;
    let list = cargo_fuzz(&obj).arg("list").output().context("cargo fuzz list")?;
    let targets: Vec<String> = String::from_utf8_lossy(&list.stdout).split_whitespace().map(str::to_owned).collect();
    if targets.is_empty() {
        bail!("cargo fuzz list found no targets");
    }
    for t in &targets {
        let work = root().join("target/fuzz-run").join(t);
        let _ = std::fs::remove_dir_all(&work);
        let (corpus, artifacts) = (work.join("corpus"), work.join("artifacts"));
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        let log = work.join("log");
        let status = cargo_fuzz(&obj)
            .arg("run")
            .args(flags)
            .arg(t)
            .arg(&corpus)
            .arg(root().join("fuzz/corpus").join(t))
            .arg("--")
            .arg(format!("-max_total_time={secs}"))
            .arg("-rss_limit_mb=2048")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(work.join("stderr"))?)
            .status()
            .with_context(|| format!("cannot run the fuzz target {t}"))?;
        let stderr = std::fs::read_to_string(work.join("stderr")).unwrap_or_default();
        let done = stderr.lines().find(|l| l.starts_with("Done ")).unwrap_or("no summary").to_string();
        if status.success() {
            println!("fuzz {t}: {done}");
            continue;
        }
        println!("fuzz {t} FAILED ({status}); the end of its output:");
        let lines: Vec<&str> = stderr.lines().collect();
        for l in &lines[lines.len().saturating_sub(60)..] {
            println!("  {l}");
        }
        for a in std::fs::read_dir(&artifacts)?.flatten() {
            let bytes = std::fs::read(a.path())?;
            let hex: String = bytes.iter().take(2048).map(|b| format!("{b:02x}")).collect();
            println!("  input {} ({} bytes, hex): {hex}", a.path().display(), bytes.len());
        }
        bail!("the fuzz target {t} failed");
    }
    Ok(())
}

/// `tests/tests/soak.rs` with `GATEWAY_SOAK_FLOWS` (default 100,000), its
/// figures printed.
fn soak(args: &[String]) -> Result<()> {
    let flows = args.first().cloned().unwrap_or_else(|| "100000".into());
    let obj = build_ebpf(false)?;
    run(cargo().current_dir(root()).args(["build", "--workspace", "--all-targets"]).env("GATEWAY_EBPF_OBJECT", &obj))?;
    run(cargo()
        .current_dir(root())
        .args(["test", "-p", "gateway-tests", "--test", "soak", "--", "--nocapture"])
        .env("GATEWAY_EBPF_OBJECT", &obj)
        .env("GATEWAY_BIN", root().join("target/debug/gateway"))
        .env("GATEWAY_SOAK_FLOWS", flows))
}

/// The `---- name stdout ----` sections of libtest's reports, each cut to
/// its first 150 lines.
fn failure_reports(lines: &[String]) -> Vec<&str> {
    const PER_TEST: usize = 150;
    let mut out = Vec::new();
    let mut taken = None;
    for line in lines {
        if line.starts_with("---- ") && line.ends_with(" ----") {
            taken = Some(0);
        } else if line == "failures:" || line.starts_with("test result:") {
            taken = None;
        }
        if let Some(n) = taken.as_mut() {
            if *n < PER_TEST {
                out.push(line.as_str());
            }
            *n += 1;
        }
    }
    out
}
