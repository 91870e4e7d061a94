//! Density: many long-lived, mostly idle passthrough WebSockets held through
//! one proxy, the case the kernel path exists for.
//!
//! A backend process (`ws-echo-many`, one epoll loop) and a client process
//! (`ws-hold`, one epoll loop) each hold every connection; the proxy between
//! them is started fresh for each target, so its memory before the client
//! connects is its baseline. While the connections are held, each sends a
//! 64 B message every `--interval` seconds (staggered), and this process
//! samples the proxy's RSS (its whole process tree), the host's TCP memory
//! (`/proc/net/sockstat`) and slab (`/proc/meminfo`), the proxy's CPU time,
//! and then the upgrade rate of fresh connections while the others stay open.
use std::{
    collections::HashMap,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use gateway_test_support::http::{header_value, ws_accept_response};

use crate::{
    bench::{floor_line, median, Procs},
    bench_ws,
};

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Direct,
    Kernel,
    Userspace,
    Auto,
    Nginx,
    Envoy,
}

const TARGETS: [Target; 6] =
    [Target::Direct, Target::Kernel, Target::Userspace, Target::Auto, Target::Nginx, Target::Envoy];

impl Target {
    fn short(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Kernel => "kernel",
            Target::Userspace => "userspace",
            Target::Auto => "auto",
            Target::Nginx => "nginx",
            Target::Envoy => "envoy",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Kernel => "gateway passthrough (kernel)",
            Target::Userspace => "gateway passthrough (user space)",
            Target::Auto => "gateway passthrough (auto)",
            Target::Nginx => "nginx http proxy",
            Target::Envoy => "envoy http (upgrade)",
        }
    }
}

/// What one target measured while holding the connections.
#[derive(Default, Clone)]
struct Held {
    conns: u64,
    /// Upgrades per second while the client opened them, one after another.
    open_rate: f64,
    rss_kib_per_conn: f64,
    tcp_kib_per_conn: f64,
    slab_kib_per_conn: f64,
    /// The proxy's CPU time per wall second at steady state, in percent of one CPU.
    cpu_pct: f64,
    p50_us: f64,
    p99_us: f64,
    /// Upgrade + echo + close per second on fresh connections meanwhile.
    upgrade_rate: f64,
    /// Flows the gateway reported on the kernel path while they were held.
    kernel_flows: Option<u64>,
}

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1));
    let conns: u64 = value("--conns").map_or(Ok(6000), |v| v.parse()).context("--conns")?;
    let interval: f64 = value("--interval").map_or(Ok(5.0), |v| v.parse()).context("--interval")?;
    let hold_secs: f64 = value("--secs").map_or(Ok(20.0), |v| v.parse()).context("--secs")?;
    let reps: usize = value("--reps").map_or(Ok(1), |v| v.parse()).context("--reps")?;
    if !(1..=9000).contains(&conns)
        || interval <= 0.0
        || !(10.0..=600.0).contains(&hold_secs)
        || !(1..=5).contains(&reps)
    {
        bail!("--conns is 1..9000, --interval > 0, --secs 10..600, --reps 1..5");
    }
    // `--only kernel,auto`: those targets only (`--gateway PATH` then tries
    // another build of the daemon against them, for an A/B).
    let only: Option<Vec<Target>> = value("--only")
        .map(|v| {
            v.split(',')
                .map(|n| {
                    TARGETS.iter().copied().find(|t| t.short() == n).with_context(|| format!("--only: no target {n:?}"))
                })
                .collect()
        })
        .transpose()?;
    let (bin, work, _ns) = crate::bench::prepare(root, "density")?;
    let bin = value("--gateway").map_or(bin, std::path::PathBuf::from);
    raise_nofile();

    let me = std::env::current_exe()?;
    let mut backend = Procs::default();
    let echo_port = crate::bench::free_port()?;
    let echo: SocketAddr = ([127, 0, 0, 1], echo_port).into();
    backend.spawn("ws-echo-many", Command::new(&me).args(["ws-echo-many", &echo.to_string()]), &work)?;
    crate::bench::wait_listening(echo_port)?;

    let mut results: Vec<Vec<Held>> = vec![Vec::new(); TARGETS.len()];
    for rep in 0..reps {
        for (i, &t) in TARGETS.iter().enumerate() {
            if only.as_ref().is_some_and(|o| !o.contains(&t)) {
                continue;
            }
            let mut procs = Procs::default();
            let (addr, pid) = start(t, &bin, echo, &work, &mut procs)?;
            let h = hold_round(t, &me, addr, pid, conns, interval, hold_secs, &bin, &work)
                .with_context(|| format!("{} (repetition {})", t.name(), rep + 1))?;
            eprintln!(
                "density {}: {} conns, RSS {:.1} KiB/conn, TCP {:.2} KiB/conn, CPU {:.1}%, p50 {:.0} µs",
                t.name(),
                h.conns,
                h.rss_kib_per_conn,
                h.tcp_kib_per_conn,
                h.cpu_pct,
                h.p50_us
            );
            results[i].push(h);
            drop(procs);
        }
    }
    let out = render(&results, conns, interval, reps);
    print!("{out}");
    fs::write(root.join("target/bench-density.txt"), &out)?;
    Ok(())
}

/// Starts `t` in front of `echo`; returns where it listens and the pid whose
/// process tree is the proxy (none for direct).
fn start(t: Target, bin: &Path, echo: SocketAddr, work: &Path, procs: &mut Procs) -> Result<(SocketAddr, Option<u32>)> {
    if t == Target::Direct {
        return Ok((echo, None));
    }
    let port = crate::bench::free_port()?;
    let dir = work.join(format!("p{port}"));
    fs::create_dir_all(&dir)?;
    let name = match t {
        Target::Kernel | Target::Userspace | Target::Auto => {
            let offload = match t {
                Target::Kernel => "kernel",
                Target::Userspace => "userspace",
                _ => "auto",
            };
            let yaml = format!(
                "listeners:\n  - name: ws\n    bind: \"127.0.0.1:{port}\"\n    protocol: websocket\n    offload: {offload}\n    routes:\n      - path_prefix: /\n        backends: [\"{echo}\"]\n        mode: passthrough\nadmin:\n  socket: {}\n",
                dir.join("admin.sock").display()
            );
            fs::write(dir.join("gateway.yaml"), yaml)?;
            procs.spawn(
                "gateway",
                Command::new(bin).args(["run", "--config"]).arg(dir.join("gateway.yaml")).env("GATEWAY_LOG", "warn"),
                &dir,
            )?;
            "gateway"
        }
        Target::Nginx => {
            let d = dir.display();
            let cfg = format!(
                "worker_processes auto;\nworker_rlimit_nofile 20000;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
                 events {{ worker_connections 20000; }}\n\
                 http {{\n  access_log off;\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://{echo};\n\
                 \x20     proxy_http_version 1.1;\n      proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection \"upgrade\";\n\
                 \x20     proxy_read_timeout 1h;\n      proxy_send_timeout 1h;\n    }}\n  }}\n}}\n"
            );
            fs::write(dir.join("nginx.conf"), cfg)?;
            procs.spawn(
                "nginx",
                Command::new("nginx").args(["-g", "daemon off;", "-c"]).arg(dir.join("nginx.conf")),
                &dir,
            )?;
            "nginx"
        }
        Target::Envoy => {
            let cfg = format!(
                "static_resources:\n  listeners:\n  - name: ws\n    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}\n\
                 \x20   filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n\
                 \x20         \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n\
                 \x20         stat_prefix: ws\n          upgrade_configs: [{{ upgrade_type: websocket }}]\n\
                 \x20         stream_idle_timeout: 0s\n\
                 \x20         route_config:\n            virtual_hosts: [{{ name: all, domains: [\"*\"], routes: [{{ match: {{ prefix: \"/\" }}, route: {{ cluster: ws, timeout: 0s, idle_timeout: 0s }} }}] }}]\n\
                 \x20         http_filters: [{{ name: envoy.filters.http.router, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }} }}]\n\
                 \x20 clusters:\n  - name: ws\n    type: STATIC\n    connect_timeout: 5s\n\
                 \x20   circuit_breakers: {{ thresholds: [{{ max_connections: 1000000, max_pending_requests: 1000000, max_requests: 1000000 }}] }}\n\
                 \x20   load_assignment:\n      cluster_name: ws\n      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }} }}] }}]\n",
                echo.ip(),
                echo.port()
            );
            fs::write(dir.join("envoy.yaml"), cfg)?;
            procs.spawn("envoy", &mut crate::bench::envoy(&dir.join("envoy.yaml"))?, &dir)?;
            "envoy"
        }
        Target::Direct => unreachable!(),
    };
    crate::bench::wait_listening(port).with_context(|| format!("{name} did not start"))?;
    let pid = procs.pid(name).context("proxy pid")?;
    Ok((([127, 0, 0, 1], port).into(), Some(pid)))
}

#[allow(clippy::too_many_arguments)]
fn hold_round(
    t: Target,
    me: &Path,
    addr: SocketAddr,
    pid: Option<u32>,
    conns: u64,
    interval: f64,
    hold_secs: f64,
    bin: &Path,
    work: &Path,
) -> Result<Held> {
    // Warm the proxy (its first upgrades allocate pools), then take the baseline.
    for _ in 0..20 {
        bench_ws::one_upgrade_at(addr)?;
    }
    let rss0 = pid.map_or(0, tree_rss_kib);
    let (tcp0, slab0) = (sockstat_tcp_kib()?, slab_kib()?);
    let mut client = Command::new(me)
        .args(["ws-hold", &addr.to_string(), &conns.to_string(), &interval.to_string(), &hold_secs.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("ws-hold")?;
    let mut lines = BufReader::new(client.stdout.take().context("ws-hold stdout")?).lines();
    // The client says when every connection is upgraded and messages flow.
    let held = lines.next().context("ws-hold ended before holding its connections")??;
    let open_rate: f64 = held
        .strip_prefix("held ")
        .and_then(|r| r.split_whitespace().nth(1))
        .and_then(|r| r.parse().ok())
        .with_context(|| format!("ws-hold said {held:?}"))?;
    // Steady state: a third of the hold for CPU, memory at its end.
    let window = Duration::from_secs_f64(hold_secs / 3.0);
    let cpu0 = pid.map_or(0, tree_cpu_ticks);
    let t0 = Instant::now();
    std::thread::sleep(window);
    let cpu1 = pid.map_or(0, tree_cpu_ticks);
    let cpu_pct = (cpu1 - cpu0) as f64 / clk_tck() / t0.elapsed().as_secs_f64() * 100.0;
    let rss1 = pid.map_or(0, tree_rss_kib);
    let (tcp1, slab1) = (sockstat_tcp_kib()?, slab_kib()?);
    let kernel_flows = match t {
        Target::Kernel | Target::Userspace | Target::Auto => Some(active_kernel(bin, work, addr)?),
        _ => None,
    };
    // Fresh upgrades while the others are held, for a sixth of the hold.
    let end = Instant::now() + Duration::from_secs_f64(hold_secs / 6.0);
    let (t1, mut n) = (Instant::now(), 0u64);
    while Instant::now() < end && n < 1_000_000 {
        bench_ws::one_upgrade_at(addr)?;
        n += 1;
    }
    let upgrade_rate = n as f64 / t1.elapsed().as_secs_f64();
    let result = lines.next().context("ws-hold ended without a result")??;
    let st = client.wait()?;
    if !st.success() {
        bail!("ws-hold failed ({st}): {result}");
    }
    let r: serde_json::Value = serde_json::from_str(&result).with_context(|| format!("ws-hold said {result:?}"))?;
    let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / conns as f64;
    Ok(Held {
        conns,
        open_rate,
        rss_kib_per_conn: per(rss0, rss1),
        tcp_kib_per_conn: per(tcp0, tcp1),
        slab_kib_per_conn: per(slab0, slab1),
        cpu_pct,
        p50_us: r["p50_us"].as_f64().unwrap_or(f64::NAN),
        p99_us: r["p99_us"].as_f64().unwrap_or(f64::NAN),
        upgrade_rate,
        kernel_flows,
    })
}

/// The gateway's flows on the kernel path (`gateway stats`), to show what
/// each offload setting did with the held connections.
fn active_kernel(bin: &Path, work: &Path, addr: SocketAddr) -> Result<u64> {
    let sock = work.join(format!("p{}", addr.port())).join("admin.sock");
    let out = Command::new(bin).args(["stats", "--json", "--socket"]).arg(&sock).output()?;
    if !out.status.success() {
        bail!("gateway stats: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["listeners"].as_array().into_iter().flatten().filter_map(|l| l["active_kernel"].as_u64()).sum())
}

fn render(results: &[Vec<Held>], conns: u64, interval: f64, reps: usize) -> String {
    let mut out = format!(
        "\n## Density: {conns} passthrough WebSockets held, a 64 B message each every {interval} s \
         (medians of {reps} repetition(s); per connection = held minus the proxy's idle baseline)\n\n\
         | target | on kernel path | opened/s | proxy RSS KiB/conn | host TCP KiB/conn | host slab KiB/conn | proxy CPU % | echo p50 µs | echo p99 µs | upgrades/s while held |\n\
         |---|---|---|---|---|---|---|---|---|---|\n"
    );
    let m = |i: usize, f: fn(&Held) -> f64| median(&results[i].iter().map(f).collect::<Vec<_>>());
    for (i, t) in TARGETS.iter().enumerate() {
        if results[i].is_empty() {
            continue;
        }
        let kernel = results[i].last().and_then(|h| h.kernel_flows).map_or("-".to_string(), |k| k.to_string());
        out += &format!(
            "| {} | {kernel} | {:.0} | {:.1} | {:.2} | {:.2} | {:.1} | {:.0} | {:.0} | {:.0} |\n",
            t.name(),
            m(i, |h| h.open_rate),
            m(i, |h| h.rss_kib_per_conn),
            m(i, |h| h.tcp_kib_per_conn),
            m(i, |h| h.slab_kib_per_conn),
            m(i, |h| h.cpu_pct),
            m(i, |h| h.p50_us),
            m(i, |h| h.p99_us),
            m(i, |h| h.upgrade_rate),
        );
    }
    let idx = |t: Target| TARGETS.iter().position(|x| *x == t).unwrap();
    let rss = |t: Target| m(idx(t), |h| h.rss_kib_per_conn);
    let cpu = |t: Target| m(idx(t), |h| h.cpu_pct);
    out += "\nFloors (issue 13: a spliced flow costs far less than a relayed one):\n";
    let ran = |t: Target| !results[idx(t)].is_empty();
    for t in [Target::Kernel, Target::Auto].into_iter().filter(|&t| ran(t) && ran(Target::Nginx) && ran(Target::Envoy))
    {
        out += &floor_line(
            &format!("{} RSS per connection <= 1/4 of nginx's", t.name()),
            rss(t) <= rss(Target::Nginx) / 4.0,
            format!(
                "{:.1} KiB against nginx {:.1} ({:.2}x), Envoy {:.1} ({:.2}x)",
                rss(t),
                rss(Target::Nginx),
                rss(t) / rss(Target::Nginx),
                rss(Target::Envoy),
                rss(t) / rss(Target::Envoy)
            ),
        );
        out += &floor_line(
            &format!("{} proxy CPU below nginx's", t.name()),
            cpu(t) < cpu(Target::Nginx),
            format!(
                "{:.1}% against nginx {:.1}% ({:.2}x), Envoy {:.1}% ({:.2}x)",
                cpu(t),
                cpu(Target::Nginx),
                cpu(t) / cpu(Target::Nginx),
                cpu(Target::Envoy),
                cpu(t) / cpu(Target::Envoy)
            ),
        );
    }
    out
}

fn raise_nofile() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// `pid` and its descendants (nginx's workers).
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        for task in fs::read_dir(format!("/proc/{p}/task")).into_iter().flatten().flatten() {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            all.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
        i += 1;
    }
    all
}

fn tree_rss_kib(pid: u32) -> u64 {
    tree(pid)
        .iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// utime + stime of the tree, in clock ticks.
fn tree_cpu_ticks(pid: u32) -> u64 {
    tree(pid)
        .iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            // Fields after the command's closing parenthesis; utime and stime are 14 and 15.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

fn sockstat_tcp_kib() -> Result<u64> {
    let s = fs::read_to_string("/proc/net/sockstat")?;
    let pages = s
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .context("no TCP mem in /proc/net/sockstat")?;
    Ok(pages * 4)
}

fn slab_kib() -> Result<u64> {
    let s = fs::read_to_string("/proc/meminfo")?;
    s.lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no Slab in /proc/meminfo")
}

/// One 64 B binary message, masked as a client sends it.
fn client_message() -> Vec<u8> {
    let mask = [0x0fu8, 0x1e, 0x2d, 0x3c];
    let mut f = vec![0x82, 0x80 | 64];
    f.extend_from_slice(&mask);
    f.extend((0..64).map(|i| 0x5a ^ mask[i % 4]));
    f
}

/// A complete frame at the front of `buf`: (first byte, unmasked payload,
/// bytes it took), or None while it is incomplete.
fn parse_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let mask = if masked {
        let m: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(m)
    } else {
        None
    };
    let mut payload = buf.get(at..at.checked_add(len)?)?.to_vec();
    if let Some(m) = mask {
        payload.iter_mut().enumerate().for_each(|(i, b)| *b ^= m[i % 4]);
    }
    Some((buf[0], payload, at + len))
}

fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![first];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= 0xffff => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

struct Epoll(i32);

impl Epoll {
    fn new() -> Result<Self> {
        // SAFETY: epoll_create1 has no preconditions.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            bail!("epoll_create1: {}", std::io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    fn add(&self, fd: i32, token: u64) -> Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
        // SAFETY: both fds are open; ev is valid for the call.
        if unsafe { libc::epoll_ctl(self.0, libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
            bail!("epoll_ctl: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Ready tokens, waiting at most `timeout_ms`.
    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> Vec<u64> {
        // SAFETY: events is a valid, writable buffer of its length.
        let n = unsafe { libc::epoll_wait(self.0, events.as_mut_ptr(), events.len() as i32, timeout_ms) };
        events[..n.max(0) as usize].iter().map(|e| e.u64).collect()
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

/// Reads what `s` has until it would block; false on EOF or an error.
fn read_available(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// `ws-echo-many IP:PORT`: a WebSocket echo server for many connections,
/// one epoll loop in one thread.
pub fn serve_many(args: &[String]) -> Result<()> {
    raise_nofile();
    let l = TcpListener::bind(crate::bench::addr_arg(args, 0)?)?;
    l.set_nonblocking(true)?;
    let ep = Epoll::new()?;
    const LISTENER: u64 = u64::MAX;
    ep.add(l.as_raw_fd(), LISTENER)?;
    struct Conn {
        s: TcpStream,
        buf: Vec<u8>,
        upgraded: bool,
    }
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        for token in ep.wait(&mut events, -1) {
            if token == LISTENER {
                while let Ok((s, _)) = l.accept() {
                    s.set_nonblocking(true)?;
                    s.set_nodelay(true)?;
                    let fd = s.as_raw_fd() as u64;
                    ep.add(fd as i32, fd)?;
                    conns.insert(fd, Conn { s, buf: Vec::new(), upgraded: false });
                }
                continue;
            }
            let Some(c) = conns.get_mut(&token) else { continue };
            let mut open = read_available(&mut c.s, &mut c.buf);
            if !c.upgraded {
                if let Some(end) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&c.buf[..end]).to_string();
                    c.buf.drain(..end + 4);
                    // A request without a key is no upgrade: drop it.
                    let reply = match header_value(&head, "sec-websocket-key") {
                        Some(_) => ws_accept_response(&head),
                        None => String::new(),
                    };
                    open &= !reply.is_empty();
                    open &= c.s.write_all(reply.as_bytes()).is_ok();
                    c.upgraded = true;
                }
            }
            while open && c.upgraded {
                let Some((first, payload, used)) = parse_frame(&c.buf) else { break };
                c.buf.drain(..used);
                let reply = match first & 0x0f {
                    0x9 => Some(server_frame(0x8A, &payload)),
                    0xA => None,
                    _ => Some(server_frame(first, &payload)),
                };
                // Small replies into an idle socket's send buffer: a full one
                // is a client that stopped reading, dropped like an error.
                if let Some(r) = reply {
                    open &= c.s.write_all(&r).is_ok();
                }
            }
            if !open {
                conns.remove(&token);
            }
        }
    }
}

/// `ws-hold IP:PORT CONNS INTERVAL SECS`: opens CONNS WebSockets one after
/// another, prints `held CONNS OPENED_PER_SEC`, then for SECS sends each a
/// 64 B message every INTERVAL seconds (staggered over the interval), and
/// prints one JSON line: messages sent and echoed, round-trip p50 and p99.
pub fn hold(args: &[String]) -> Result<()> {
    raise_nofile();
    let addr = crate::bench::addr_arg(args, 0)?;
    let arg = |i: usize| args.get(i).context("usage: ws-hold IP:PORT CONNS INTERVAL SECS");
    let n: usize = arg(1)?.parse()?;
    let interval: f64 = arg(2)?.parse()?;
    let secs: f64 = arg(3)?.parse()?;
    struct Conn {
        s: TcpStream,
        buf: Vec<u8>,
        sent_at: Option<Instant>,
    }
    let t0 = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let (s, buf) = bench_ws::upgrade_at(addr).with_context(|| format!("upgrade {} of {n}", i + 1))?;
        s.set_nonblocking(true)?;
        conns.push(Conn { s, buf, sent_at: None });
    }
    println!("held {n} {:.1}", n as f64 / t0.elapsed().as_secs_f64());
    std::io::stdout().flush()?;
    let ep = Epoll::new()?;
    for (i, c) in conns.iter().enumerate() {
        ep.add(c.s.as_raw_fd(), i as u64)?;
    }
    let msg = client_message();
    let step = Duration::from_secs_f64(interval / n as f64);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let (mut next, mut sent, mut late) = (0u64, 0u64, 0u64);
    let mut rtts: Vec<f64> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        // Every message due by now, each to the next connection in turn.
        while start + step * next as u32 <= now {
            let c = &mut conns[next as usize % n];
            next += 1;
            if c.sent_at.is_some() {
                // The previous one is still out: count it, do not pile up.
                late += 1;
                continue;
            }
            c.s.write_all(&msg).context("send")?;
            c.sent_at = Some(Instant::now());
            sent += 1;
        }
        let due = (start + step * next as u32).min(end);
        let wait_ms = due.saturating_duration_since(Instant::now()).as_millis().min(100) as i32;
        for token in ep.wait(&mut events, wait_ms) {
            let c = &mut conns[token as usize];
            if !read_available(&mut c.s, &mut c.buf) {
                bail!("connection {token} closed while held");
            }
            while let Some((first, payload, used)) = parse_frame(&c.buf) {
                c.buf.drain(..used);
                if first & 0x0f != 0x2 || payload.len() != 64 {
                    bail!("bad echo frame on connection {token}: opcode {}, {} bytes", first & 0x0f, payload.len());
                }
                let at = c.sent_at.take().context("an echo nobody asked for")?;
                rtts.push(at.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: usize| rtts.get(rtts.len() * p / 100).copied().unwrap_or(f64::NAN);
    println!(
        "{}",
        serde_json::json!({
            "conns": n, "sent": sent, "echoed": rtts.len(), "late": late,
            "p50_us": pct(50), "p99_us": pct(99),
        })
    );
    if rtts.len() as u64 + n as u64 <= sent {
        bail!("only {} of {sent} messages echoed", rtts.len());
    }
    Ok(())
}
