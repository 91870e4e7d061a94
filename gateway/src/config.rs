//! The YAML configuration: parsing and validation.
//!
//! Parsing is strict (`deny_unknown_fields` everywhere) and every error names
//! the key path and the offending value, e.g.
//! `listeners[1].connect_timeout: "5x" is not a duration (...)`.
use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{de, Deserialize, Deserializer};

/// Upper bound on backend connect attempts per client, whatever the config says.
pub const MAX_CONNECT_ATTEMPTS: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {}", .errors.join("\n  "))]
    Invalid { path: PathBuf, errors: Vec<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConn,
    SourceHash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Offload {
    /// Kernel path when the programs are loaded, userspace relay otherwise.
    #[default]
    Auto,
    /// Kernel path or refuse to start.
    Kernel,
    /// Always the userspace relay.
    Userspace,
}

impl fmt::Display for Offload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Offload::Auto => "auto",
            Offload::Kernel => "kernel",
            Offload::Userspace => "userspace",
        })
    }
}

/// A duration written as `250ms`, `5s`, `10m`, `1h`, `2d` or a sum such as `1m30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Dur).map_err(de::Error::custom)
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!("{s:?} is not a duration (write a number and a unit: 250ms, 5s, 10m, 1h, 2d; or a sum like 1m30s)")
    };
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// An `IP:PORT` socket address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Addr(pub SocketAddr);

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.trim().parse::<SocketAddr>().map(Addr).map_err(|_| {
            de::Error::custom(format!(
                "{s:?} is not an IP:PORT address (write e.g. \"10.0.0.5:5432\" or \"[::1]:8080\")"
            ))
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listeners: Vec<RawListener>,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    kernel: RawKernel,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: String,
    bind: Addr,
    #[serde(default = "default_protocol")]
    protocol: Protocol,
    backends: Vec<Addr>,
    #[serde(default)]
    balance: Balance,
    #[serde(default)]
    offload: Offload,
    connect_timeout: Option<Dur>,
    connect_attempts: Option<u32>,
    idle_timeout: Option<Dur>,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKernel {
    max_flows: Option<u32>,
    trim_overlaps: Option<bool>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listeners: Vec<Listener>,
    pub admin: Admin,
    pub kernel: Kernel,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub bind: SocketAddr,
    pub protocol: Protocol,
    pub backends: Vec<SocketAddr>,
    pub balance: Balance,
    pub offload: Offload,
    pub connect_timeout: Duration,
    pub connect_attempts: u32,
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub socket: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Kernel {
    /// Flows the kernel maps can hold at once (two sockets each).
    pub max_flows: u32,
    /// Cut retransmitted bytes that overlap data already forwarded.
    pub trim_overlaps: bool,
}

pub const DEFAULT_ADMIN_SOCKET: &str = "/run/gateway/admin.sock";
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_MAX_FLOWS: u32 = 8192;

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        raw.validate().map_err(|errors| ConfigError::Invalid {
            path: path.to_path_buf(),
            errors,
        })
    }
}

impl RawConfig {
    fn validate(self) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();
        if self.listeners.is_empty() {
            errors.push("listeners: must list at least one listener".to_string());
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut binds: HashMap<SocketAddr, usize> = HashMap::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let name = l.name.trim();
            if name.is_empty() {
                errors.push(format!("listeners[{i}].name: must not be empty"));
            } else if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                errors.push(format!(
                    "listeners[{i}].name: {:?} may only contain letters, digits, '-', '_' and '.'",
                    l.name
                ));
            } else if let Some(j) = names.insert(name, i) {
                errors.push(format!("listeners[{i}].name: duplicate listener name {name:?} (also listeners[{j}].name)"));
            }
            let bind = l.bind.0;
            if let Some(j) = binds.insert(bind, i) {
                errors.push(format!("listeners[{i}].bind: duplicate bind address \"{bind}\" (also listeners[{j}].bind)"));
            } else if bind.port() != 0 {
                // Wildcard and specific addresses on one port collide too.
                for (other, j) in &binds {
                    if *j != i
                        && other.port() == bind.port()
                        && (other.ip().is_unspecified() || bind.ip().is_unspecified())
                        && other.is_ipv4() == bind.is_ipv4()
                    {
                        errors.push(format!(
                            "listeners[{i}].bind: \"{bind}\" overlaps \"{other}\" of listeners[{j}].bind"
                        ));
                    }
                }
            }
            if l.backends.is_empty() {
                errors.push(format!(
                    "listeners[{i}].backends: must list at least one backend"
                ));
            }
            let mut seen = HashMap::new();
            for (k, b) in l.backends.iter().enumerate() {
                if b.0.port() == 0 {
                    errors.push(format!(
                        "listeners[{i}].backends[{k}]: \"{}\" has port 0",
                        b.0
                    ));
                }
                if b.0.ip().is_unspecified() {
                    errors.push(format!(
                        "listeners[{i}].backends[{k}]: \"{}\" is not a reachable address",
                        b.0
                    ));
                }
                if let Some(j) = seen.insert(b.0, k) {
                    errors.push(format!("listeners[{i}].backends[{k}]: duplicate backend \"{}\" (also backends[{j}])", b.0));
                }
            }
            if let Some(Dur(d)) = l.connect_timeout {
                if d.is_zero() {
                    errors.push(format!(
                        "listeners[{i}].connect_timeout: must be greater than 0"
                    ));
                }
            }
            if let Some(Dur(d)) = l.idle_timeout {
                if d.is_zero() {
                    errors.push(format!(
                        "listeners[{i}].idle_timeout: must be greater than 0"
                    ));
                }
            }
            if let Some(n) = l.connect_attempts {
                if n == 0 || n > MAX_CONNECT_ATTEMPTS {
                    errors.push(format!(
                        "listeners[{i}].connect_attempts: {n} is out of range (1 to {MAX_CONNECT_ATTEMPTS})"
                    ));
                }
            }
        }
        if let Some(n) = self.kernel.max_flows {
            if !(1..=1 << 20).contains(&n) {
                errors.push(format!(
                    "kernel.max_flows: {n} is out of range (1 to 1048576)"
                ));
            }
        }
        if let Some(p) = &self.admin.socket {
            if p.as_os_str().is_empty() || !p.is_absolute() {
                errors.push(format!(
                    "admin.socket: {:?} must be an absolute path",
                    p.display().to_string()
                ));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let listeners = self
            .listeners
            .into_iter()
            .map(|l| {
                let backends: Vec<SocketAddr> = l.backends.iter().map(|a| a.0).collect();
                Listener {
                    connect_attempts: l
                        .connect_attempts
                        .unwrap_or_else(|| (backends.len() as u32).min(3)),
                    name: l.name.trim().to_string(),
                    bind: l.bind.0,
                    protocol: l.protocol,
                    backends,
                    balance: l.balance,
                    offload: l.offload,
                    connect_timeout: l.connect_timeout.map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0),
                    idle_timeout: l.idle_timeout.map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
                }
            })
            .collect();
        Ok(Config {
            listeners,
            admin: Admin {
                socket: self
                    .admin
                    .socket
                    .unwrap_or_else(|| DEFAULT_ADMIN_SOCKET.into()),
            },
            kernel: Kernel {
                max_flows: self.kernel.max_flows.unwrap_or(DEFAULT_MAX_FLOWS),
                trim_overlaps: self.kernel.trim_overlaps.unwrap_or(true),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, String> {
        Config::parse(s, Path::new("t.yaml")).map_err(|e| e.to_string())
    }

    const GOOD: &str = r#"
listeners:
  - name: pg
    bind: "0.0.0.0:15432"
    protocol: tcp
    backends: ["10.0.0.5:5432", "10.0.0.6:5432"]
    balance: round_robin
    offload: auto
    connect_timeout: 5s
    idle_timeout: 1h
admin:
  socket: /run/gateway/admin.sock
"#;

    #[test]
    fn accepts_the_documented_shape() {
        let c = parse(GOOD).unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.name, "pg");
        assert_eq!(l.backends.len(), 2);
        assert_eq!(l.connect_timeout, Duration::from_secs(5));
        assert_eq!(l.idle_timeout, Duration::from_secs(3600));
        assert_eq!(l.connect_attempts, 2);
        assert_eq!(c.admin.socket, PathBuf::from("/run/gateway/admin.sock"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        for bad in ["", "5", "s", "5x", "-1s", "1.5s", "5 s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn assert_rejected(yaml: &str, needles: &[&str]) {
        let e = parse(yaml).expect_err("accepted a bad config");
        for n in needles {
            assert!(e.contains(n), "error {e:?} does not mention {n:?}");
        }
    }

    #[test]
    fn rejects_unknown_keys_with_their_path() {
        assert_rejected(
            &GOOD.replace("balance:", "balanse:"),
            &["listeners[0]", "balanse"],
        );
        assert_rejected(&format!("{GOOD}extra: 1\n"), &["extra"]);
        assert_rejected(&GOOD.replace("socket:", "sock:"), &["admin", "sock"]);
    }

    #[test]
    fn rejects_bad_values_with_path_and_value() {
        assert_rejected(
            &GOOD.replace("5s", "5x"),
            &["listeners[0].connect_timeout", "\"5x\""],
        );
        assert_rejected(
            &GOOD.replace("1h", "forever"),
            &["listeners[0].idle_timeout", "\"forever\""],
        );
        assert_rejected(
            &GOOD.replace("10.0.0.6:5432", "10.0.0.x:5432"),
            &["listeners[0].backends[1]", "10.0.0.x:5432"],
        );
        assert_rejected(
            &GOOD.replace("0.0.0.0:15432", "0.0.0.0"),
            &["listeners[0].bind", "\"0.0.0.0\""],
        );
        assert_rejected(
            &GOOD.replace("round_robin", "random"),
            &["listeners[0].balance", "random"],
        );
        assert_rejected(
            &GOOD.replace("offload: auto", "offload: fast"),
            &["listeners[0].offload", "fast"],
        );
        assert_rejected(
            &GOOD.replace("protocol: tcp", "protocol: udp"),
            &["listeners[0].protocol", "udp"],
        );
    }

    #[test]
    fn rejects_empty_backends() {
        assert_rejected(
            &GOOD.replace(r#"["10.0.0.5:5432", "10.0.0.6:5432"]"#, "[]"),
            &["listeners[0].backends", "at least one"],
        );
    }

    #[test]
    fn rejects_duplicates() {
        let two = r#"
listeners:
  - name: a
    bind: "127.0.0.1:7000"
    backends: ["127.0.0.1:1"]
  - name: a
    bind: "127.0.0.1:7000"
    backends: ["127.0.0.1:2"]
"#;
        assert_rejected(
            two,
            &[
                "listeners[1].name",
                "duplicate listener name \"a\"",
                "listeners[1].bind",
                "127.0.0.1:7000",
            ],
        );
        let overlap =
            two.replacen("name: a", "name: b", 1)
                .replacen("127.0.0.1:7000", "0.0.0.0:7000", 1);
        assert_rejected(&overlap, &["listeners[1].bind", "overlaps"]);
    }
}
