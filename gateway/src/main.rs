//! The `gateway` binary: its CLI. `run` starts the daemon (`control::lifecycle::run`);
//! the other commands ask a running one over its admin socket and render the answer.
#![warn(clippy::unwrap_used)]

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::{anyhow, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use gateway::{
    cli::echo,
    config::{self, Config},
    control::admin::{self, FlowsReply},
    flow::table::FlowSnapshot,
};
use tracing::{error, warn};

use gateway::cli::fleet::EXIT_CONFIG;

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "TCP gateway that splices established flows in the kernel (sockmap)",
    after_help = "Examples:\n  gateway check --config /etc/gateway/gateway.yaml\n  gateway run --config /etc/gateway/gateway.yaml\n  gateway flows\n  gateway flows --json --listener pg"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Which running daemon to ask: its admin socket, given or read from a
/// config file.
#[derive(clap::Args)]
struct AdminTarget {
    /// Admin socket of the daemon (default: from --config, else /run/gateway/admin.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Read the admin socket path from this config file.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl AdminTarget {
    fn admin_socket(self) -> Result<PathBuf> {
        if let Some(s) = self.socket {
            return Ok(s);
        }
        if let Some(c) = self.config {
            return Ok(Config::load(&c).map_err(|e| anyhow!("{e}"))?.admin.socket);
        }
        Ok(config::DEFAULT_ADMIN_SOCKET.into())
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate a config file and exit (non-zero, naming the bad key, if it is invalid).
    #[command(after_help = "Example:\n  gateway check --config examples/gateway.yaml")]
    Check {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run the daemon. Needs root (or CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) for the kernel path.
    #[command(
        after_help = "Examples:\n  gateway run --config examples/gateway.yaml\n  gateway run --config examples/gateway.yaml --takeover   # hot upgrade: take the listeners over\n\nLog filter: GATEWAY_LOG (e.g. GATEWAY_LOG=debug); format: GATEWAY_LOG_FORMAT=json|plain"
    )]
    Run {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Hot upgrade: take the listening sockets over from the daemon running
        /// on the config's admin socket. It stops accepting once this one is
        /// ready; its open flows finish there, then it exits.
        #[arg(long)]
        takeover: bool,
    },
    /// Show the live flows of a running daemon.
    #[command(
        after_help = "Examples:\n  gateway flows\n  gateway flows --config /etc/gateway/gateway.yaml --sort bytes\n  gateway flows --json --listener pg\n  gateway flows --sort rate            # two samples --interval apart\n  gateway flows --watch --interval 2   # a live table, with rates, until Ctrl-C"
    )]
    Flows {
        #[command(flatten)]
        daemon: AdminTarget,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only flows of this listener.
        #[arg(long)]
        listener: Option<String>,
        /// Only flows to this backend (IP:PORT).
        #[arg(long)]
        backend: Option<String>,
        #[arg(long, value_enum, default_value_t = SortKey::Age)]
        sort: SortKey,
        /// Redraw the table every --interval, with each flow's rate, until interrupted.
        #[arg(long)]
        watch: bool,
        /// Seconds between samples (rates, --watch).
        #[arg(long, default_value_t = 1.0, value_parser = positive_secs)]
        interval: f64,
    },
    /// Per-listener and per-backend totals: connections, active flows, closes by cause, bytes by path.
    #[command(after_help = "Examples:\n  gateway stats\n  gateway stats --json")]
    Stats {
        #[command(flatten)]
        daemon: AdminTarget,
        #[arg(long)]
        json: bool,
    },
    /// Reload the daemon's config file (like SIGHUP): new flows get the new settings, open flows are untouched.
    #[command(
        after_help = "Example:\n  gateway reload --config /etc/gateway/gateway.yaml   # validates locally first, then asks the daemon"
    )]
    Reload {
        #[command(flatten)]
        daemon: AdminTarget,
    },
    /// Show the daemon's status: kernel path, map usage, bound listeners.
    Status {
        #[command(flatten)]
        daemon: AdminTarget,
    },
    /// Check what this host supports (BPF, sockmap, BTF, kTLS, privileges) and which data paths are usable.
    #[command(
        after_help = "Examples:\n  gateway doctor\n  gateway doctor --config /etc/gateway/gateway.yaml   # exits 1 if an offload: kernel listener can't be honoured\n  gateway doctor --json"
    )]
    Doctor {
        /// Also check this config's listeners against what the host supports.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The fleet's shared document in etcd: listeners, limits, drain_timeout (nodes with `fleet` in their file).
    #[command(
        after_help = "Examples:\n  gateway config push fleet.yaml --config /etc/gateway/gateway.yaml\n  gateway config push fleet.yaml --config /etc/gateway/gateway.yaml --expect-revision 41\n  gateway config get --config /etc/gateway/gateway.yaml > fleet.yaml"
    )]
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// The nodes of a fleet, as each publishes itself in etcd.
    #[command(after_help = "Example:\n  gateway fleet status --config /etc/gateway/gateway.yaml")]
    Fleet {
        #[command(subcommand)]
        cmd: FleetCmd,
    },
    /// Run a built-in echo backend (for the demo and for trying a config out).
    #[command(after_help = "Example:\n  gateway echo --bind 127.0.0.1:7001 --greeting '220 ready'")]
    Echo {
        #[arg(long)]
        bind: SocketAddr,
        /// Send this line first, like a server-speaks-first protocol.
        #[arg(long)]
        greeting: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate FILE with this node's file as `check` does, then write it as the fleet's document.
    Push {
        /// The fleet's document: listeners, limits, drain_timeout.
        file: PathBuf,
        /// A node's own file (its `fleet` section says where etcd is).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Write only if the document is still at this revision (0: none yet);
        /// two operators then cannot overwrite each other blindly.
        #[arg(long, value_name = "N")]
        expect_revision: Option<i64>,
    },
    /// Print the fleet's document, after a comment with its revision.
    Get {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum FleetCmd {
    /// Every live node: its revision against the current one, its state and error, its flows.
    Status {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum SortKey {
    Bytes,
    /// Bytes per second, both ways, between two samples.
    Rate,
    Age,
    Idle,
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 3600]")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Run { .. } | Cmd::Echo { .. }) {
        gateway::util::sys::default_sigpipe();
    }
    match cli.cmd {
        Cmd::Check { config } => match Config::load(&config) {
            Ok(c) => {
                for w in c.warnings() {
                    eprintln!("warning: {w}");
                }
                match &c.fleet {
                    Some(f) => println!(
                        "{}: ok (fleet node {}: listeners, limits and drain_timeout come from etcd, {})",
                        config.display(),
                        f.node,
                        f.config_key()
                    ),
                    None => println!("{}: ok ({} listener(s))", config.display(), c.listeners.len()),
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("invalid configuration: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Cmd::Run { config, takeover } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("invalid configuration: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_logging(cfg.log.format == config::LogFormat::Json);
            for w in cfg.warnings() {
                warn!("{w}");
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(cfg.workers.resolve())
                .enable_all()
                .build()
                .expect("tokio runtime");
            match rt.block_on(gateway::control::lifecycle::run(cfg, &config, takeover)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // The whole chain: what failed, and the error under it.
                    let e = anyhow::Error::from(e);
                    error!("{e:#}");
                    eprintln!("gateway: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Flows { daemon, json, listener, backend, sort, watch, interval } => {
            let view = FlowsView { json, listener, backend, sort, watch, interval };
            exit(flows_cmd(daemon, view))
        }
        Cmd::Status { daemon } => exit(status_cmd(daemon)),
        Cmd::Stats { daemon, json } => exit(stats_cmd(daemon, json)),
        Cmd::Reload { daemon } => exit(reload_cmd(daemon)),
        Cmd::Doctor { config, json } => doctor_cmd(config, json),
        Cmd::Config { cmd: ConfigCmd::Push { file, config, expect_revision } } => {
            gateway::cli::fleet::push(&file, &config, expect_revision)
        }
        Cmd::Config { cmd: ConfigCmd::Get { config } } => gateway::cli::fleet::get(&config),
        Cmd::Fleet { cmd: FleetCmd::Status { config, json } } => gateway::cli::fleet::status(&config, json),
        Cmd::Echo { bind, greeting } => {
            init_logging(false);
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            exit(rt.block_on(echo::run(bind, greeting)).map_err(Into::into))
        }
    }
}

fn doctor_cmd(config: Option<PathBuf>, json: bool) -> ExitCode {
    let cfg = match config.as_deref().map(Config::load).transpose() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let report = rt.block_on(async { gateway::cli::doctor::run(cfg.as_ref()) });
    if json {
        println!("{}", serde_json::to_string_pretty(&report).expect("report serialises"));
    } else {
        print!("{}", report.render());
    }
    if report.unmet_kernel_offload.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn exit(r: Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr; `json` comes from the config, `GATEWAY_LOG_FORMAT`
/// (plain or json) overrides it.
fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GATEWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match std::env::var("GATEWAY_LOG_FORMAT") {
        Ok(v) => v.eq_ignore_ascii_case("json"),
        Err(_) => json,
    };
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

struct FlowsView {
    json: bool,
    listener: Option<String>,
    backend: Option<String>,
    sort: SortKey,
    watch: bool,
    interval: f64,
}

fn flows_cmd(daemon: AdminTarget, view: FlowsView) -> Result<()> {
    let path = daemon.admin_socket()?;
    let fetch = || -> Result<(Vec<FlowSnapshot>, std::time::Instant)> {
        let raw = admin::request(&path, "flows").map_err(|e| anyhow!(e))?;
        let reply: FlowsReply = serde_json::from_slice(&raw).context("daemon sent an unexpected reply")?;
        Ok((reply.flows, std::time::Instant::now()))
    };
    let interval = std::time::Duration::from_secs_f64(view.interval);
    let rates = view.watch || matches!(view.sort, SortKey::Rate);
    let mut prev = if rates {
        let first = fetch()?;
        std::thread::sleep(interval);
        Some(first)
    } else {
        None
    };
    loop {
        let (mut flows, at) = fetch()?;
        if let Some((before, then)) = &prev {
            let secs = at.duration_since(*then).as_secs_f64().max(1e-3);
            let was: std::collections::HashMap<u64, &FlowSnapshot> = before.iter().map(|f| (f.id, f)).collect();
            for f in &mut flows {
                if let Some(p) = was.get(&f.id) {
                    let per = |now: u64, then: u64| Some((now.saturating_sub(then) as f64 / secs) as u64);
                    f.rate_client_to_backend = per(f.bytes_client_to_backend, p.bytes_client_to_backend);
                    f.rate_backend_to_client = per(f.bytes_backend_to_client, p.bytes_backend_to_client);
                }
            }
        }
        let shown = view_flows(&view, flows.clone());
        if view.watch && !view.json {
            // Clear the screen, cursor home.
            print!("\x1b[2J\x1b[H");
        }
        if view.json {
            println!("{}", serde_json::to_string_pretty(&FlowsReply { flows: shown })?);
        } else {
            print_table(&shown, rates);
        }
        if !view.watch {
            return Ok(());
        }
        prev = Some((flows, at));
        std::thread::sleep(interval);
    }
}

/// The flows `view` asks for, in its order.
fn view_flows(view: &FlowsView, mut flows: Vec<FlowSnapshot>) -> Vec<FlowSnapshot> {
    flows.retain(|f| {
        view.listener.as_ref().is_none_or(|l| &f.listener == l)
            && view.backend.as_ref().is_none_or(|b| f.backend.as_ref() == Some(b))
    });
    match view.sort {
        SortKey::Bytes => {
            flows.sort_by_key(|f| std::cmp::Reverse(f.bytes_client_to_backend + f.bytes_backend_to_client))
        }
        SortKey::Rate => flows.sort_by_key(|f| {
            std::cmp::Reverse(f.rate_client_to_backend.unwrap_or(0) + f.rate_backend_to_client.unwrap_or(0))
        }),
        SortKey::Age => flows.sort_by_key(|f| std::cmp::Reverse(f.age_ms)),
        SortKey::Idle => flows.sort_by_key(|f| std::cmp::Reverse(f.idle_ms)),
    }
    flows
}

fn print_table(flows: &[FlowSnapshot], rates: bool) {
    let rate = |f: &FlowSnapshot| match (f.rate_client_to_backend, f.rate_backend_to_client) {
        (Some(a), Some(b)) => format!("{}/s", human_bytes(a + b)),
        _ => "-".into(),
    };
    let rate_head = if rates { format!(" {:>11}", "RATE") } else { String::new() };
    println!(
        "{:>6}  {:<12} {:<22} {:<22} {:<10} {:>10} {:>10}{rate_head} {:>8} {:>8} {:>9} {:>6} {:>5}  FALLBACK",
        "ID", "LISTENER", "CLIENT", "BACKEND", "PATH", "C->B", "B->C", "AGE", "IDLE", "QUEUED", "PAUSES", "MOVES"
    );
    for f in flows {
        let rate_col = if rates { format!(" {:>11}", rate(f)) } else { String::new() };
        println!(
            "{:>6}  {:<12} {:<22} {:<22} {:<10} {:>10} {:>10}{rate_col} {:>8} {:>8} {:>9} {:>6} {:>5}  {}",
            f.id,
            f.listener,
            f.client,
            f.backend.as_deref().unwrap_or("-"),
            f.path,
            human_bytes(f.bytes_client_to_backend),
            human_bytes(f.bytes_backend_to_client),
            human_ms(f.age_ms),
            human_ms(f.idle_ms),
            human_bytes(f.queued_client_to_backend + f.queued_backend_to_client),
            f.pauses_client_to_backend + f.pauses_backend_to_client,
            f.path_switches,
            f.fallback_reason.as_deref().unwrap_or("")
        );
    }
    println!("{} flow(s)", flows.len());
}

fn human_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", U[i])
    }
}

fn human_ms(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1e3),
        60_000..3_600_000 => format!("{}m{}s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{}h{}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

fn reload_cmd(daemon: AdminTarget) -> Result<()> {
    let path = daemon.admin_socket()?;
    let raw = admin::request(&path, "reload").map_err(|e| anyhow!(e))?;
    let v: serde_json::Value = serde_json::from_slice(&raw).context("daemon sent an unexpected reply")?;
    let msg = v["message"].as_str().unwrap_or("");
    if v["ok"] == true {
        println!("{msg}");
        Ok(())
    } else {
        Err(anyhow!("{msg}"))
    }
}

fn stats_cmd(daemon: AdminTarget, json: bool) -> Result<()> {
    let path = daemon.admin_socket()?;
    let raw = admin::request(&path, "stats").map_err(|e| anyhow!(e))?;
    let reply: admin::StatsReply = serde_json::from_slice(&raw).context("daemon sent an unexpected reply")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    println!("kernel path: {}", if reply.kernel_path { "loaded" } else { "not loaded" });
    for l in &reply.listeners {
        let closed: Vec<String> = l.closed.iter().map(|(c, n)| format!("{c} {n}")).collect();
        let user: Vec<String> = l.userspace_by_reason.iter().map(|(c, n)| format!("{c} {n}")).collect();
        println!(
            "\nlistener {} ({}, offload {}): {} accepted, {} active ({} kernel, {} userspace)",
            l.name, l.local, l.offload, l.accepted, l.active, l.active_kernel, l.active_userspace
        );
        let rejected: Vec<String> = l.rejected.iter().map(|(c, n)| format!("{c} {n}")).collect();
        println!("  rejected: {}", if rejected.is_empty() { "none".into() } else { rejected.join(", ") });
        if !l.route_refused.is_empty() {
            let refused: Vec<String> = l.route_refused.iter().map(|(rc, n)| format!("{rc} {n}")).collect();
            println!("  refused by routes: {}", refused.join(", "));
        }
        println!("  closed: {}", if closed.is_empty() { "none".into() } else { closed.join(", ") });
        println!(
            "  flows: {} kernel; userspace: {}",
            l.kernel_flows,
            if user.is_empty() { "none".into() } else { user.join(", ") }
        );
        println!(
            "  bytes: {} client->backend, {} backend->client; {:.1}% moved by the kernel",
            human_bytes(l.bytes.kernel_client_to_backend + l.bytes.user_client_to_backend),
            human_bytes(l.bytes.kernel_backend_to_client + l.bytes.user_backend_to_client),
            100.0 * l.kernel_share
        );
        for b in &l.backends {
            println!(
                "  backend {} ({}): {} active, {} flows, {} connect failures, {}",
                b.address,
                if b.up { "up" } else { "ejected" },
                b.active,
                b.flows,
                b.connect_failures,
                human_bytes(b.bytes.total())
            );
        }
    }
    Ok(())
}

fn status_cmd(daemon: AdminTarget) -> Result<()> {
    let path = daemon.admin_socket()?;
    let raw = admin::request(&path, "status").map_err(|e| anyhow!(e))?;
    let v: serde_json::Value = serde_json::from_slice(&raw).context("daemon sent an unexpected reply")?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}
