//! The WebSocket part of the benchmark: upgrade + 64 B echo + close rate, and
//! 64 B echo latency on one WebSocket, against a WebSocket echo server in
//! this process: direct, the gateway's passthrough routes (`offload: auto`,
//! `kernel` and `userspace`) and inspect route, nginx as an HTTP proxy
//! passing the Upgrade headers, and Envoy's HTTP connection manager with
//! websocket upgrades.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use gateway_test_support::http::{header_value, next_ws_frame, read_http_head, ws_accept_response, ws_frame};

#[derive(Clone, Copy, PartialEq)]
pub enum WsTarget {
    Direct,
    /// `offload: auto`, the default.
    Passthrough,
    PassthroughKernel,
    PassthroughUser,
    Inspect,
    Nginx,
    Envoy,
}

pub const WS_TARGETS: [WsTarget; 7] = [
    WsTarget::Direct,
    WsTarget::Passthrough,
    WsTarget::PassthroughKernel,
    WsTarget::PassthroughUser,
    WsTarget::Inspect,
    WsTarget::Nginx,
    WsTarget::Envoy,
];

impl WsTarget {
    pub fn name(self) -> &'static str {
        match self {
            WsTarget::Direct => "direct",
            WsTarget::Passthrough => "gateway passthrough (auto)",
            WsTarget::PassthroughKernel => "gateway passthrough (kernel)",
            WsTarget::PassthroughUser => "gateway passthrough (user space)",
            WsTarget::Inspect => "gateway inspect",
            WsTarget::Nginx => "nginx http proxy",
            WsTarget::Envoy => "envoy http (upgrade)",
        }
    }

    pub fn index(self) -> usize {
        WS_TARGETS.iter().position(|t| *t == self).unwrap()
    }
}

#[derive(Default, Clone)]
pub struct WsSample {
    pub upgrades: Vec<f64>,
    /// Per upgrade, µs: connect until the 101 is read, then the first
    /// echo, then the close answer.
    pub phases: Vec<[f64; 3]>,
    pub p50: Vec<f64>,
    pub p99: Vec<f64>,
    pub pinned_p50: Vec<f64>,
    pub pinned_p99: Vec<f64>,
    pub busy_p50: Vec<f64>,
    pub busy_p99: Vec<f64>,
    /// The three-host placement.
    pub far_p50: Vec<f64>,
    pub far_p99: Vec<f64>,
}

const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

fn frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    ws_frame(opcode, payload, masked.then_some(MASK))
}

/// A WebSocket echo server: answers pings, echoes data frames, returns closes.
pub fn serve_ws_echo(l: TcpListener) {
    for c in l.incoming() {
        let Ok(mut c) = c else { continue };
        thread::spawn(move || -> std::io::Result<()> {
            c.set_nodelay(true)?;
            let (head, mut have) = read_http_head(&mut c)?;
            if header_value(&head, "sec-websocket-key").is_none() {
                return Ok(());
            }
            c.write_all(ws_accept_response(&head).as_bytes())?;
            loop {
                let (op, payload) = next_ws_frame(&mut c, &mut have)?;
                match op {
                    0x8 => {
                        // Answer the close, then let the client close TCP
                        // first (its TIME_WAIT is reusable, as in the TCP
                        // connection-rate test).
                        c.write_all(&frame(0x8, &payload, false))?;
                        c.set_read_timeout(Some(Duration::from_secs(5)))?;
                        let mut rest = [0u8; 512];
                        while matches!(c.read(&mut rest), Ok(n) if n > 0) {}
                        return Ok(());
                    }
                    0x9 => c.write_all(&frame(0xA, &payload, false))?,
                    0xA => {}
                    _ => c.write_all(&frame(op, &payload, false))?,
                }
            }
        });
    }
}

pub fn upgrade(port: u16) -> Result<(TcpStream, Vec<u8>)> {
    upgrade_at(([127, 0, 0, 1], port).into())
}

pub fn upgrade_at(addr: SocketAddr) -> Result<(TcpStream, Vec<u8>)> {
    upgrade_with(addr, "")
}

/// An upgrade with `extra` header lines (each ending in CRLF).
pub fn upgrade_with(addr: SocketAddr, extra: &str) -> Result<(TcpStream, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: bench\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
        .as_bytes(),
    )?;
    let (head, rest) = read_http_head(&mut s)?;
    if !head.starts_with("HTTP/1.1 101") {
        bail!("upgrade refused: {}", head.lines().next().unwrap_or_default());
    }
    Ok((s, rest))
}

/// One 64 B binary message echoed on an upgraded connection.
pub fn round_trip(s: &mut TcpStream, have: &mut Vec<u8>) -> Result<()> {
    s.write_all(&frame(0x2, &[0x5a; 64], true))?;
    let (op, p) = next_ws_frame(s, have)?;
    if op != 0x2 || p.len() != 64 {
        bail!("bad echo frame (opcode {op}, {} bytes)", p.len());
    }
    Ok(())
}

/// 64 B echo on one WebSocket for `secs`: (p50, p99) in µs.
pub fn ws_rr(port: u16, secs: f64) -> Result<(f64, f64)> {
    ws_rr_at(([127, 0, 0, 1], port).into(), secs)
}

pub fn ws_rr_at(addr: SocketAddr, secs: f64) -> Result<(f64, f64)> {
    let (mut s, mut have) = upgrade_at(addr)?;
    let msg = frame(0x2, &[0x5a; 64], true);
    let mut lat = Vec::new();
    for _ in 0..100 {
        s.write_all(&msg)?;
        next_ws_frame(&mut s, &mut have)?;
    }
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while (Instant::now() < end || lat.len() < 10) && lat.len() < 2_000_000 {
        let t = Instant::now();
        s.write_all(&msg)?;
        let (op, p) = next_ws_frame(&mut s, &mut have)?;
        if op != 0x2 || p.len() != 64 {
            bail!("bad echo frame (opcode {op}, {} bytes)", p.len());
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    s.write_all(&frame(0x8, &1000u16.to_be_bytes(), true))?;
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok((lat[lat.len() / 2], lat[lat.len() * 99 / 100]))
}

/// One upgrade + 64 B echo + close handshake; the client then closes TCP
/// first. Returns how long each phase took (see `WsSample::phases`).
pub fn one_upgrade(port: u16) -> Result<[f64; 3]> {
    one_upgrade_at(([127, 0, 0, 1], port).into())
}

pub fn one_upgrade_at(addr: SocketAddr) -> Result<[f64; 3]> {
    one_upgrade_with(addr, "")
}

pub fn one_upgrade_with(addr: SocketAddr, extra: &str) -> Result<[f64; 3]> {
    let t0 = Instant::now();
    let (mut s, mut have) = upgrade_with(addr, extra)?;
    let t1 = Instant::now();
    s.write_all(&frame(0x2, &[0x33; 64], true))?;
    next_ws_frame(&mut s, &mut have)?;
    let t2 = Instant::now();
    s.write_all(&frame(0x8, &1000u16.to_be_bytes(), true))?;
    let (op, _) = next_ws_frame(&mut s, &mut have)?;
    if op != 0x8 {
        bail!("expected a close frame, got opcode {op}");
    }
    let t3 = Instant::now();
    let us = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e6;
    Ok([us(t0, t1), us(t1, t2), us(t2, t3)])
}

use crate::bench::median;

pub fn render(samples: &[WsSample]) -> String {
    let d = &samples[0];
    let (du, dp, dpp) = (median(&d.upgrades), median(&d.p50), median(&d.pinned_p50));
    let mut o = String::from(
        "\n## WebSocket\n\nBackend: a WebSocket echo server in the bench process (three hosts: a process on the backend \
         host). upgrades = sequential connect + upgrade + 64 B echo + close handshake; echo = 64 B binary message round \
         trip on one WebSocket, p50 [min-max of the repetitions' p50s] / p99, µs, in the placements of the TCP table.\n\n\
         | target | upgrades/s (x direct) | echo one process | pinned | busy | three hosts |\n\
         |---|---|---|---|---|---|\n",
    );
    let spread = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        if v.len() < 2 {
            format!("{:.1}", median(v))
        } else {
            format!("{:.1} [{lo:.1}-{hi:.1}]", median(v))
        }
    };
    let _ = (dp, dpp);
    for (t, s) in WS_TARGETS.iter().zip(samples) {
        let u = median(&s.upgrades);
        let far = if s.far_p50.is_empty() {
            "-".to_string()
        } else {
            format!("{} / {:.1}", spread(&s.far_p50), median(&s.far_p99))
        };
        o += &format!(
            "| {} | {u:.0} ({:.2}) | {} / {:.1} | {} / {:.1} | {} / {:.1} | {far} |\n",
            t.name(),
            u / du,
            spread(&s.p50),
            median(&s.p99),
            spread(&s.pinned_p50),
            median(&s.pinned_p99),
            spread(&s.busy_p50),
            median(&s.busy_p99),
        );
    }
    let (k, n) = (&samples[WsTarget::Passthrough.index()], &samples[WsTarget::Nginx.index()]);
    let line = crate::bench::floor_line;
    o += "\nWhere an upgrade's time goes (median µs per phase, same runs):\n\n\
           | target | connect to 101 | first echo | close handshake |\n|---|---|---|---|\n";
    for (t, s) in WS_TARGETS.iter().zip(samples) {
        let col = |i: usize| median(&s.phases.iter().map(|p| p[i]).collect::<Vec<_>>());
        o += &format!("| {} | {:.1} | {:.1} | {:.1} |\n", t.name(), col(0), col(1), col(2));
    }
    o += "\n### Against the floors of issue 3\n\n";
    let (ku, nu) = (median(&k.upgrades), median(&n.upgrades));
    o += &line(
        "passthrough upgrade rate >= nginx's",
        ku >= nu,
        format!("{:.2}x direct vs nginx {:.2}x direct", ku / du, nu / du),
    );
    let (ka, na) = (median(&k.pinned_p50) - dpp, median(&n.pinned_p50) - dpp);
    o += &line(
        "passthrough pinned echo latency no worse than nginx's",
        ka <= na,
        format!("+{ka:.1} µs vs nginx +{na:.1} µs"),
    );
    o += "\n### Against the floors of issue 13 (WebSocket passthrough)\n\n";
    let (a, kk, uu) = (
        &samples[WsTarget::Passthrough.index()],
        &samples[WsTarget::PassthroughKernel.index()],
        &samples[WsTarget::PassthroughUser.index()],
    );
    for (label, pick) in [
        ("one process", (|s: &WsSample| (&s.p50, &s.p99)) as fn(&WsSample) -> (&Vec<f64>, &Vec<f64>)),
        ("pinned", |s: &WsSample| (&s.pinned_p50, &s.pinned_p99)),
        ("busy", |s: &WsSample| (&s.busy_p50, &s.busy_p99)),
        ("three hosts", |s: &WsSample| (&s.far_p50, &s.far_p99)),
    ] {
        for (q, which) in [("p50", 0), ("p99", 1)] {
            let get = |s: &WsSample| {
                let (p50, p99) = pick(s);
                median(if which == 0 { p50 } else { p99 })
            };
            let (ok, best) = crate::bench::within_best(get(a), get(kk), get(uu));
            o += &line(
                &format!("auto passthrough echo {q}, {label}: no worse than the better path (+10% or +2 µs)"),
                ok,
                format!("{:.1} µs vs kernel {:.1}, user space {:.1} (best {best:.1})", get(a), get(kk), get(uu)),
            );
        }
    }
    let e = &samples[WsTarget::Envoy.index()];
    o += &format!(
        "- passthrough (auto) against Envoy: {:.2}x its upgrade rate; echo p50 {:.1} vs {:.1} µs (one process)\n",
        ku / median(&e.upgrades),
        median(&k.p50),
        median(&e.p50)
    );
    o
}

fn port_arg(args: &[String], i: usize) -> Result<u64> {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("usage: ws-echo PORT | ws-upgrades PORT COUNT | ws-rr PORT SECS"))
}

/// `cargo xtask ws-echo PORT|IP:PORT`: the echo backend alone (on
/// 127.0.0.1 when given a port).
pub fn serve_port(args: &[String]) -> Result<()> {
    let addr = crate::bench::addr_arg(args, 0)?;
    serve_ws_echo(TcpListener::bind(addr)?);
    Ok(())
}

/// `cargo xtask ws-rr PORT|IP:PORT SECS`: 64 B echo round trips on one
/// WebSocket for SECS seconds; prints the p50 and p99 in µs.
pub fn round_trips(args: &[String]) -> Result<()> {
    let addr = crate::bench::addr_arg(args, 0)?;
    let secs = port_arg(args, 1)?.clamp(1, 600) as f64;
    let (p50, p99) = ws_rr_at(addr, secs)?;
    println!("p50 {p50:.1} p99 {p99:.1}");
    Ok(())
}

/// `cargo xtask ws-upgrades PORT COUNT`: COUNT sequential upgrades; prints
/// the rate and the median of each phase.
pub fn upgrades(args: &[String]) -> Result<()> {
    let port = u16::try_from(port_arg(args, 0)?)?;
    let n = port_arg(args, 1)?.clamp(1, 1_000_000);
    let t = Instant::now();
    let mut phases = Vec::new();
    for _ in 0..n {
        phases.push(one_upgrade(port)?);
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let col = |i: usize| median(&phases.iter().map(|p: &[f64; 3]| p[i]).collect::<Vec<_>>());
    println!("{rate:.0} upgrades/s; median µs: to 101 {:.1}, echo {:.1}, close {:.1}", col(0), col(1), col(2));
    Ok(())
}
