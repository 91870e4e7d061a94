//! The upgrade rate with JWT verification on (issue 17): one daemon with the
//! same passthrough route four times, without auth and with an HS256
//! secret, an RS256 key and an ES256 key (a JWKS file), in front of one
//! WebSocket echo server; sequential upgrade + 64 B echo + close on each in
//! turns, rotating the order, so each ratio to the route without auth is
//! measured in the same run. The keys and tokens are minted by
//! `tests/peers/mint_jwt.py` (Python's `cryptography`), never by the
//! gateway's own code.
use std::{
    fmt::Write as _,
    fs,
    net::{SocketAddr, TcpListener},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};

use crate::bench::{free_port, median, wait_listening, Procs};

const SECRET: &str = "bench-secret-of-at-least-32-bytes-long";

/// (name, the token's algorithm (none: no auth), the key id in the JWKS)
const ROUTES: [(&str, &str, &str); 4] =
    [("no auth", "", ""), ("JWT HS256", "HS256", ""), ("JWT RS256", "RS256", "r1"), ("JWT ES256", "ES256", "e1")];

/// `cargo xtask bench-auth [--secs S] [--reps N]` on its own.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1));
    let secs: f64 = value("--secs").map_or(Ok(2.0), |v| v.parse()).context("--secs")?;
    let reps: usize = value("--reps").map_or(Ok(3), |v| v.parse()).context("--reps")?;
    if !(0.5..=60.0).contains(&secs) || !(1..=10).contains(&reps) {
        bail!("--secs is 0.5..60, --reps 1..10");
    }
    let (bin, work, _ns) = crate::bench::prepare(root, "auth")?;
    print!("{}", section(root, &bin, &work, reps, secs)?);
    Ok(())
}

/// Runs the measurement in the current network namespace; the report.
pub fn section(root: &Path, bin: &Path, work: &Path, reps: usize, secs: f64) -> Result<String> {
    let mint = root.join("tests/peers/mint_jwt.py");
    let keys = work.join("jwt-keys");
    let py = |args: &[&str]| -> Result<String> {
        let out = Command::new("python3").arg(&mint).args(args).output()?;
        if !out.status.success() {
            bail!("mint_jwt.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    };
    py(&["keys", &keys.to_string_lossy()])?;
    let exp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_secs() + 3600;
    let claims = format!(r#"{{"sub":"bench","exp":{exp}}}"#);
    let (rsa, ec) = (keys.join("rsa.pem"), keys.join("ec.pem"));
    let mut tokens = Vec::new();
    for (_, alg, kid) in ROUTES {
        tokens.push(match alg {
            "" => String::new(),
            "HS256" => py(&["sign", "HS256", SECRET, &claims])?,
            "RS256" => py(&["sign", "RS256", &rsa.to_string_lossy(), &claims, "--kid", kid])?,
            _ => py(&["sign", "ES256", &ec.to_string_lossy(), &claims, "--kid", kid])?,
        });
    }

    let echo = TcpListener::bind("127.0.0.1:0")?;
    let echo_addr = echo.local_addr()?;
    thread::spawn(move || crate::bench_ws::serve_ws_echo(echo));
    let ports: Vec<u16> = ROUTES.iter().map(|_| free_port()).collect::<Result<_>>()?;
    let mut yaml = String::from("listeners:\n");
    for (i, (_, alg, _)) in ROUTES.iter().enumerate() {
        let auth = match *alg {
            "" => String::new(),
            "HS256" => format!("        auth:\n          jwt:\n            secret: \"{SECRET}\"\n"),
            _ => format!("        auth:\n          jwt:\n            keys: {}\n", keys.join("jwks.json").display()),
        };
        write!(
            yaml,
            "  - name: auth-{i}\n    bind: \"127.0.0.1:{}\"\n    protocol: websocket\n    routes:\n      \
             - path_prefix: /\n        backends: [\"{echo_addr}\"]\n{auth}",
            ports[i]
        )?;
    }
    write!(yaml, "admin:\n  socket: {}\n", work.join("auth-admin.sock").display())?;
    let config = work.join("auth.yaml");
    fs::write(&config, yaml)?;
    let mut procs = Procs::default();
    procs.spawn(
        "gateway-auth",
        Command::new(bin).args(["run", "--config"]).arg(&config).env("GATEWAY_LOG", "warn"),
        work,
    )?;
    for p in &ports {
        wait_listening(*p)?;
    }

    let headers: Vec<String> = tokens
        .iter()
        .map(|t| if t.is_empty() { String::new() } else { format!("Authorization: Bearer {t}\r\n") })
        .collect();
    let addr = |i: usize| SocketAddr::from(([127, 0, 0, 1], ports[i]));
    // Every route upgrades (a refused token would measure 401s).
    for i in 0..ROUTES.len() {
        crate::bench_ws::one_upgrade_with(addr(i), &headers[i]).with_context(|| ROUTES[i].0)?;
    }
    let mut rates = vec![Vec::new(); ROUTES.len()];
    for rep in 0..reps {
        for k in 0..ROUTES.len() {
            let i = (k + rep) % ROUTES.len();
            let end = Instant::now() + Duration::from_secs_f64(secs);
            let (t, mut n) = (Instant::now(), 0u64);
            while Instant::now() < end && n < 1_000_000 {
                crate::bench_ws::one_upgrade_with(addr(i), &headers[i]).with_context(|| ROUTES[i].0)?;
                n += 1;
            }
            rates[i].push(n as f64 / t.elapsed().as_secs_f64());
        }
    }
    drop(procs);

    let mut out = format!(
        "\n## Upgrades with JWT verification\n\nOne daemon, the same passthrough route (offload auto) four times, in \
         front of one WebSocket echo server; sequential upgrade + 64 B echo + close for {secs} s per route and \
         repetition, {reps} repetitions in rotating order. Tokens from tests/peers/mint_jwt.py (RSA 2048, P-256).\n\n\
         | route | upgrades/s (min-max) | x no auth, median of the repetitions' ratios (min-max) |\n|---|---|---|\n"
    );
    let spread = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
        (median(v), lo, hi)
    };
    for (i, (name, ..)) in ROUTES.iter().enumerate() {
        let (m, lo, hi) = spread(&rates[i]);
        let ratios: Vec<f64> = rates[i].iter().zip(&rates[0]).map(|(a, b)| a / b).collect();
        let (rm, rlo, rhi) = spread(&ratios);
        writeln!(out, "| {name} | {m:.0} ({lo:.0}-{hi:.0}) | {rm:.2} ({rlo:.2}-{rhi:.2}) |")?;
    }
    Ok(out)
}
