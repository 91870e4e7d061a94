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

pub use crate::util::host::HostMatch;
use serde::Deserialize;
use serde_yaml::Value;

/// Upper bound on backend connect attempts per client, whatever the config says.
pub const MAX_CONNECT_ATTEMPTS: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {}", .errors.join("\n  "))]
    Invalid { path: PathBuf, errors: Vec<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    /// HTTP/1.1 with WebSocket upgrades, routed by host and path.
    Websocket,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConn,
    SourceHash,
    /// Maglev consistent hashing on the listener's `hash_key`.
    Maglev,
}

/// `hash_key`: what `balance: maglev` hashes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HashKey {
    /// The client's address (without the port).
    #[default]
    Source,
    /// A request header (lower-case name), cookie or query parameter;
    /// requests without it hash the client's address.
    Header(String),
    Cookie(String),
    Query(String),
}

impl HashKey {
    pub fn parse(s: &str) -> Result<HashKey, String> {
        let bad = || format!("{s:?} is not a hash key (source, \"header:NAME\", \"cookie:NAME\" or \"query:NAME\")");
        match s.split_once(':') {
            None if s == "source" => Ok(HashKey::Source),
            Some((kind, name)) if !name.is_empty() => match kind {
                "header" => hyper::header::HeaderName::from_bytes(name.as_bytes())
                    .map(|h| HashKey::Header(h.as_str().to_string()))
                    .map_err(|_| format!("{name:?} is not a header name")),
                "cookie" => Ok(HashKey::Cookie(name.to_string())),
                "query" => Ok(HashKey::Query(name.to_string())),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

/// `proxy_protocol.accept`: which PROXY protocol headers a listener takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyAccept {
    V1,
    V2,
    Any,
}

/// `send_proxy`: the PROXY protocol header written to backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}

/// `proxy_protocol`: every connection starts with a PROXY header from a
/// balancer at one of `from`, whose source address then stands for the
/// client everywhere (admission, balancing, X-Forwarded-For, flows, logs).
#[derive(Debug, Clone)]
pub struct ProxyProtocol {
    pub accept: ProxyAccept,
    pub from: Vec<crate::policy::limits::Cidr>,
    /// The whole header must arrive within this.
    pub timeout: Duration,
}

pub const DEFAULT_PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// What a reload (or a fleet push) does to the established flows of a
/// route or TCP listener that it changed or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnChange {
    /// They go on with the settings they started with.
    #[default]
    Keep,
    /// They are closed (FIN; close 1001 in inspect mode), counted as
    /// `route-changed`.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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

/// Parses a duration written as `250ms`, `5s`, `10m`, `1h`, `2d` or a sum such as `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad =
        || format!("{s:?} is not a duration (write a number and a unit: 250ms, 5s, 10m, 1h, 2d; or a sum like 1m30s)");
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Required, unless `fleet` is set: then it comes from etcd.
    listeners: Option<Vec<RawListener>>,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    kernel: RawKernel,
    #[serde(default)]
    log: RawLog,
    limits: Option<RawLimits>,
    drain_timeout: Option<Value>,
    workers: Option<Value>,
    fleet: Option<RawFleet>,
}

/// The fleet-wide part of a config: what a fleet's nodes share through
/// etcd (`<prefix>config`). The rest stays in each node's own file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocument {
    listeners: Vec<RawListener>,
    limits: Option<RawLimits>,
    drain_timeout: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    etcd: RawEtcd,
    node: Option<Value>,
    cache: Option<PathBuf>,
    status_ttl: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    endpoints: Vec<String>,
    prefix: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<Value>,
    flow_interval: Option<Value>,
}

/// Values are kept as YAML here and converted during validation, so that every
/// error names its full key path (serde_yaml only reports the enclosing item).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Value,
    bind: Value,
    protocol: Option<Value>,
    backends: Option<Value>,
    balance: Option<Value>,
    routes: Option<Value>,
    handshake_timeout: Option<Value>,
    max_request_head: Option<Value>,
    max_concurrent_streams: Option<Value>,
    tls: Option<RawTls>,
    backend_tls: Option<RawBackendTls>,
    offload: Option<Value>,
    connect_timeout: Option<Value>,
    connect_attempts: Option<Value>,
    idle_timeout: Option<Value>,
    max_duration: Option<Value>,
    on_change: Option<Value>,
    proxy_protocol: Option<RawProxyProtocol>,
    send_proxy: Option<Value>,
    hash_key: Option<Value>,
    maglev_table_size: Option<Value>,
    allow: Option<Value>,
    deny: Option<Value>,
    max_connections: Option<Value>,
    max_connections_per_source: Option<Value>,
    connection_rate: Option<Value>,
    connection_rate_per_source: Option<Value>,
    per_source_ipv6_prefix: Option<Value>,
    health: Option<RawHealth>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    certificates: Value,
    min_version: Option<Value>,
    alpn: Option<Value>,
    handshake_timeout: Option<Value>,
    client_ca: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackendTls {
    ca: Option<Value>,
    sni: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSniRoute {
    sni: Option<Value>,
    backends: Option<Value>,
    balance: Option<Value>,
    mode: Value,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCert {
    cert: Value,
    key: Value,
    names: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    host: Option<Value>,
    path_prefix: Option<Value>,
    backends: Option<Value>,
    bridge_tcp: Option<Value>,
    balance: Option<Value>,
    allowed_origins: Option<Value>,
    mode: Option<Value>,
    max_message_size: Option<Value>,
    ping_interval: Option<Value>,
    auth: Option<RawAuth>,
    max_connections: Option<Value>,
    message_rate: Option<Value>,
    byte_rate: Option<Value>,
    idle_timeout: Option<Value>,
    max_duration: Option<Value>,
    on_change: Option<Value>,
    send_proxy: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxyProtocol {
    accept: Option<Value>,
    from: Option<Value>,
    timeout: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    jwt: Option<RawJwt>,
    external: Option<RawExternal>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExternal {
    url: String,
    timeout: Option<Value>,
    headers: Option<Vec<String>>,
    failure_mode_allow: Option<bool>,
    upstream_headers: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    /// A JWKS file (RFC 7517).
    keys: Option<PathBuf>,
    /// An inline HS256 secret.
    secret: Option<String>,
    token_from: Option<Vec<String>>,
    issuer: Option<String>,
    audiences: Option<Vec<String>>,
    leeway: Option<Value>,
    claims_to_headers: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    failures: Option<Value>,
    eject_for: Option<Value>,
    interval: Option<Value>,
    timeout: Option<Value>,
    send: Option<Value>,
    expect: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<Value>,
}

/// Collects errors, each prefixed with its key path.
#[derive(Default)]
struct Errors(Vec<String>);

impl Errors {
    /// A route's `auth.external`.
    fn external(&mut self, path: &str, raw: &RawExternal) -> Option<External> {
        let rest = raw.url.strip_prefix("http://");
        let (authority, path_prefix) = match rest.map(|r| r.split_once('/').map_or((r, ""), |(a, p)| (a, p))) {
            Some((a, p))
                if a.rsplit_once(':').is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok()) =>
            {
                (a.to_string(), format!("/{}", p.trim_end_matches('/')).trim_end_matches('/').to_string())
            }
            _ => {
                self.push(&format!("{path}.url"), format_args!("{:?} is not an http://host:port[/path] URL", raw.url));
                return None;
            }
        };
        let timeout = match &raw.timeout {
            Some(v) => self.duration(&format!("{path}.timeout"), v)?,
            None => DEFAULT_EXTERNAL_AUTH_TIMEOUT,
        };
        let mut names = |key: &str, list: &Option<Vec<String>>| -> Vec<String> {
            let mut out = Vec::new();
            for (i, h) in list.iter().flatten().enumerate() {
                match hyper::header::HeaderName::from_bytes(h.as_bytes()) {
                    Ok(n) => out.push(n.as_str().to_string()),
                    Err(_) => self.push(&format!("{path}.{key}[{i}]"), format_args!("{h:?} is not a header name")),
                }
            }
            out
        };
        let headers = names("headers", &raw.headers);
        let upstream_headers = names("upstream_headers", &raw.upstream_headers);
        Some(External {
            authority,
            path_prefix,
            timeout,
            headers,
            failure_mode_allow: raw.failure_mode_allow.unwrap_or(false),
            upstream_headers,
        })
    }

    /// A route's `auth.jwt`: its keys loaded (a bad JWKS file fails `check`).
    fn jwt(&mut self, path: &str, raw: &RawJwt) -> Option<std::sync::Arc<crate::policy::jwt::Jwt>> {
        use crate::policy::jwt;
        let keys = match (&raw.keys, &raw.secret) {
            (Some(file), None) => match std::fs::read_to_string(file) {
                Ok(text) => jwt::parse_jwks(&text)
                    .map_err(|e| self.push(&format!("{path}.keys"), format_args!("{}: {e}", file.display())))
                    .ok()?,
                Err(e) => {
                    self.push(&format!("{path}.keys"), format_args!("cannot read {}: {e}", file.display()));
                    return None;
                }
            },
            (None, Some(secret)) if secret.len() >= 32 => jwt::secret_key(secret.as_bytes()),
            (None, Some(_)) => {
                self.push(&format!("{path}.secret"), "an HS256 secret of 32 bytes at least");
                return None;
            }
            _ => {
                self.push(path, "needs exactly one of keys (a JWKS file) and secret (HS256)");
                return None;
            }
        };
        let mut j = jwt::Jwt::new(keys);
        if let Some(from) = &raw.token_from {
            j.token_from.clear();
            for (i, s) in from.iter().enumerate() {
                match jwt::Source::parse(s) {
                    Ok(src) => j.token_from.push(src),
                    Err(e) => self.push(&format!("{path}.token_from[{i}]"), e),
                }
            }
            if from.is_empty() {
                self.push(&format!("{path}.token_from"), "must name at least one place");
            }
        }
        j.issuer = raw.issuer.clone();
        j.audiences = raw.audiences.clone().unwrap_or_default();
        if let Some(v) = &raw.leeway {
            j.leeway = self.duration(&format!("{path}.leeway"), v)?;
        }
        for (claim, header) in raw.claims_to_headers.iter().flatten() {
            if hyper::header::HeaderName::from_bytes(header.as_bytes()).is_err() {
                self.push(
                    &format!("{path}.claims_to_headers.{claim}"),
                    format_args!("{header:?} is not a header name"),
                );
            }
        }
        j.claims_to_headers = raw.claims_to_headers.clone().unwrap_or_default();
        Some(std::sync::Arc::new(j))
    }

    fn push(&mut self, path: &str, msg: impl fmt::Display) {
        self.0.push(format!("{path}: {msg}"));
    }

    fn string(&mut self, path: &str, v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            other => {
                self.push(path, format_args!("expected a string, found {}", yaml_kind(other)));
                None
            }
        }
    }

    fn addr(&mut self, path: &str, v: &Value) -> Option<SocketAddr> {
        let s = self.string(path, v)?;
        match s.trim().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.push(
                    path,
                    format_args!("{s:?} is not an IP:PORT address (write e.g. \"10.0.0.5:5432\" or \"[::1]:8080\")"),
                );
                None
            }
        }
    }

    fn duration(&mut self, path: &str, v: &Value) -> Option<Duration> {
        let s = self.string(path, v)?;
        match parse_duration(&s) {
            Ok(d) if d.is_zero() => {
                self.push(path, format_args!("{s:?} must be greater than 0"));
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.push(path, e);
                None
            }
        }
    }

    fn size(&mut self, path: &str, v: &Value) -> Option<u64> {
        let s = self.string(path, v)?;
        match parse_size(&s) {
            Ok(n) => Some(n),
            Err(e) => {
                self.push(path, e);
                None
            }
        }
    }

    fn cidrs(&mut self, path: &str, v: &Value) -> Vec<crate::policy::limits::Cidr> {
        let Value::Sequence(items) = v else {
            self.push(path, format_args!("expected a list of addresses or CIDR prefixes, found {}", yaml_kind(v)));
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            if let Some(s) = self.string(&p, item) {
                match crate::policy::limits::Cidr::parse(&s) {
                    Ok(c) => out.push(c),
                    Err(e) => self.push(&p, e),
                }
            }
        }
        out
    }

    fn rate(&mut self, path: &str, v: &Value) -> Option<crate::policy::limits::Rate> {
        let s = self.string(path, v)?;
        crate::policy::limits::Rate::parse(&s).map_err(|e| self.push(path, e)).ok()
    }

    fn backend_list(&mut self, path: &str, v: &Value) -> Vec<SocketAddr> {
        let mut backends = Vec::new();
        match v {
            Value::Sequence(items) if items.is_empty() => self.push(path, "must list at least one backend"),
            Value::Sequence(items) => {
                for (k, item) in items.iter().enumerate() {
                    let bp = format!("{path}[{k}]");
                    let Some(a) = self.addr(&bp, item) else { continue };
                    if a.port() == 0 {
                        self.push(&bp, format_args!("\"{a}\" has port 0"));
                    } else if a.ip().is_unspecified() {
                        self.push(&bp, format_args!("\"{a}\" is not a reachable address"));
                    } else if let Some(j) = backends.iter().position(|b| *b == a) {
                        self.push(&bp, format_args!("duplicate backend \"{a}\" (also [{j}])"));
                    } else {
                        backends.push(a);
                    }
                }
            }
            other => self.push(path, format_args!("expected a list of IP:PORT addresses, found {}", yaml_kind(other))),
        }
        backends
    }

    fn balance(&mut self, path: &str, v: &Value) -> Option<Balance> {
        self.choice(
            path,
            v,
            &[
                ("round_robin", Balance::RoundRobin),
                ("least_conn", Balance::LeastConn),
                ("source_hash", Balance::SourceHash),
                ("maglev", Balance::Maglev),
            ],
        )
    }

    /// A websocket listener's routes. Fills `all` with the union of the
    /// routes' backends, which each route indexes into.
    fn http_listener(&mut self, i: usize, l: &RawListener, all: &mut Vec<SocketAddr>) -> Option<HttpListener> {
        let p = |key: &str| format!("listeners[{i}].{key}");
        // The listener's `balance` is the routes' default; its errors are
        // reported where the listener's keys are checked.
        let default_balance = l.balance.as_ref().and_then(|v| Errors::default().balance("", v)).unwrap_or_default();
        let handshake_timeout = match &l.handshake_timeout {
            Some(v) => self.duration(&p("handshake_timeout"), v),
            None => Some(DEFAULT_HANDSHAKE_TIMEOUT),
        };
        let max_request_head = match &l.max_request_head {
            Some(v) => self.size(&p("max_request_head"), v).and_then(|n| {
                if (8192..=1 << 20).contains(&n) {
                    Some(n as usize)
                } else {
                    self.push(&p("max_request_head"), format_args!("{n} is out of range (8KiB to 1MiB)"));
                    None
                }
            }),
            None => Some(DEFAULT_MAX_REQUEST_HEAD),
        };
        let max_concurrent_streams = match &l.max_concurrent_streams {
            Some(v) => self.uint(&p("max_concurrent_streams"), v, 1..=1024).map(|n| n as u32),
            None => Some(DEFAULT_MAX_CONCURRENT_STREAMS),
        };
        let items = match &l.routes {
            None => {
                self.push(&p("routes"), "is required on a websocket listener: list at least one route");
                return None;
            }
            Some(Value::Sequence(items)) if items.is_empty() => {
                self.push(&p("routes"), "must list at least one route");
                return None;
            }
            Some(Value::Sequence(items)) => items,
            Some(other) => {
                self.push(&p("routes"), format_args!("expected a list of routes, found {}", yaml_kind(other)));
                return None;
            }
        };
        let mut routes: Vec<Route> = Vec::new();
        let mut ok = true;
        for (k, item) in items.iter().enumerate() {
            let rp = |key: &str| format!("listeners[{i}].routes[{k}].{key}");
            let raw: RawRoute = match serde_yaml::from_value(item.clone()) {
                Ok(r) => r,
                Err(err) => {
                    self.push(&format!("listeners[{i}].routes[{k}]"), err);
                    ok = false;
                    continue;
                }
            };
            let before = self.0.len();
            let host = match &raw.host {
                None => HostMatch::Any,
                Some(v) => self
                    .string(&rp("host"), v)
                    .and_then(|h| host_match(&h).map_err(|m| self.push(&rp("host"), m)).ok())
                    .unwrap_or(HostMatch::Any),
            };
            let path_prefix = match &raw.path_prefix {
                None => "/".to_string(),
                Some(v) => match self.string(&rp("path_prefix"), v) {
                    Some(s) if s.starts_with('/') && !s.contains(['?', '#', ' ']) => s,
                    Some(s) => {
                        self.push(
                            &rp("path_prefix"),
                            format_args!("{s:?} must start with '/' and hold no '?', '#' or space"),
                        );
                        String::new()
                    }
                    None => String::new(),
                },
            };
            let (list, mode) = match (&raw.backends, &raw.bridge_tcp) {
                (Some(_), Some(_)) => {
                    self.push(&rp("bridge_tcp"), "a route has either `backends` (WebSocket or HTTP servers) or `bridge_tcp` (raw TCP servers), not both");
                    (Vec::new(), WsMode::Passthrough)
                }
                (None, None) => {
                    self.push(
                        &format!("listeners[{i}].routes[{k}]"),
                        "needs `backends` (WebSocket or HTTP servers) or `bridge_tcp` (raw TCP servers)",
                    );
                    (Vec::new(), WsMode::Passthrough)
                }
                (Some(v), None) => {
                    let mode = match &raw.mode {
                        None => Some(WsMode::Passthrough),
                        Some(m) => self.choice(
                            &rp("mode"),
                            m,
                            &[("passthrough", WsMode::Passthrough), ("inspect", WsMode::Inspect)],
                        ),
                    };
                    (self.backend_list(&rp("backends"), v), mode.unwrap_or(WsMode::Passthrough))
                }
                (None, Some(v)) => {
                    if raw.mode.is_some() {
                        self.push(
                            &rp("mode"),
                            "does not apply to a bridge_tcp route (it always terminates the WebSocket)",
                        );
                    }
                    (self.backend_list(&rp("bridge_tcp"), v), WsMode::BridgeTcp)
                }
            };
            let balance = match &raw.balance {
                Some(v) => self.balance(&rp("balance"), v).unwrap_or_default(),
                None => default_balance,
            };
            let allowed_origins = raw.allowed_origins.as_ref().and_then(|v| match v {
                Value::Sequence(items) if !items.is_empty() => {
                    let mut out = Vec::new();
                    for (j, o) in items.iter().enumerate() {
                        let op = format!("{}[{j}]", rp("allowed_origins"));
                        if let Some(s) = self.string(&op, o) {
                            let s = s.trim().trim_end_matches('/').to_ascii_lowercase();
                            if s == "*" || s == "null" || (s.contains("://") && !s.ends_with("://")) {
                                out.push(s);
                            } else {
                                self.push(
                                    &op,
                                    format_args!(
                                        "{s:?} is not an origin (write e.g. \"https://chat.example.com\", or \"*\")"
                                    ),
                                );
                            }
                        }
                    }
                    Some(out)
                }
                other => {
                    self.push(
                        &rp("allowed_origins"),
                        format_args!("expected a non-empty list of origins, found {}", yaml_kind(other)),
                    );
                    None
                }
            });
            let max_message_size = match &raw.max_message_size {
                Some(v) => self.size(&rp("max_message_size"), v).map_or(DEFAULT_MAX_MESSAGE_SIZE, |n| {
                    if n == 0 || n > 1 << 30 {
                        self.push(&rp("max_message_size"), format_args!("{n} is out of range (1 byte to 1GiB)"));
                    }
                    n as usize
                }),
                None => DEFAULT_MAX_MESSAGE_SIZE,
            };
            let ping_interval = raw.ping_interval.as_ref().and_then(|v| self.duration(&rp("ping_interval"), v));
            if mode == WsMode::Passthrough {
                for (key, set) in [
                    ("max_message_size", raw.max_message_size.is_some()),
                    ("ping_interval", raw.ping_interval.is_some()),
                ] {
                    if set {
                        self.push(
                            &rp(key),
                            "applies to `mode: inspect` and `bridge_tcp` routes only (passthrough never parses frames)",
                        );
                    }
                }
            }
            for (j, r) in routes.iter().enumerate() {
                if r.host == host && r.path_prefix == path_prefix {
                    self.push(
                        &rp("path_prefix"),
                        format_args!("conflicts with routes[{j}]: same host {host} and path_prefix {path_prefix:?}"),
                    );
                }
            }
            let jwt = raw.auth.as_ref().and_then(|a| a.jwt.as_ref()).and_then(|j| self.jwt(&rp("auth.jwt"), j));
            let external = raw
                .auth
                .as_ref()
                .and_then(|a| a.external.as_ref())
                .and_then(|x| self.external(&rp("auth.external"), x));
            let max_connections = raw
                .max_connections
                .as_ref()
                .and_then(|v| self.uint(&rp("max_connections"), v, 1..=10_000_000))
                .map(|n| n as u32);
            let idle_timeout = raw.idle_timeout.as_ref().and_then(|v| self.duration(&rp("idle_timeout"), v));
            if idle_timeout.is_some_and(|d| d.is_zero()) {
                self.push(&rp("idle_timeout"), "must be more than 0");
            }
            let max_duration = raw.max_duration.as_ref().and_then(|v| self.duration(&rp("max_duration"), v));
            let on_change = raw.on_change.as_ref().and_then(|v| self.on_change(&rp("on_change"), v));
            let send_proxy = raw.send_proxy.as_ref().and_then(|v| self.send_proxy(&rp("send_proxy"), v));
            let message_rate = raw.message_rate.as_ref().and_then(|v| {
                let s = self.string(&rp("message_rate"), v)?;
                crate::policy::limits::Rate::parse(&s).map_err(|e| self.push(&rp("message_rate"), e)).ok()
            });
            let byte_rate = raw.byte_rate.as_ref().and_then(|v| {
                let s = self.string(&rp("byte_rate"), v)?;
                parse_byte_rate(&s).map_err(|e| self.push(&rp("byte_rate"), e)).ok()
            });
            if mode != WsMode::Inspect {
                for (key, set) in [("message_rate", raw.message_rate.is_some()), ("byte_rate", raw.byte_rate.is_some())]
                {
                    if set {
                        self.push(
                            &rp(key),
                            "applies to `mode: inspect` routes only (the gateway must see the messages)",
                        );
                    }
                }
            }
            let indices = pool_indices(&list, all);
            if self.0.len() != before {
                ok = false;
            }
            routes.push(Route {
                host,
                path_prefix,
                backends: indices,
                balance,
                allowed_origins,
                mode,
                max_message_size,
                ping_interval,
                jwt,
                external,
                max_connections,
                message_rate,
                byte_rate,
                idle_timeout,
                max_duration,
                on_change,
                send_proxy,
            });
        }
        if !ok {
            return None;
        }
        Some(HttpListener {
            routes,
            handshake_timeout: handshake_timeout?,
            max_request_head: max_request_head?,
            max_concurrent_streams: max_concurrent_streams?,
        })
    }

    /// A listener's `tls` block; loads and checks the certificates.
    /// `websocket` listeners speak HTTP/1.1, and HTTP/2 when `alpn` offers
    /// `h2` (RFC 8441 WebSockets); their ALPN is `http/1.1` unless set.
    fn tls(&mut self, i: usize, t: &RawTls, websocket: bool) -> Option<crate::tls::terminate::Tls> {
        let p = |key: &str| format!("listeners[{i}].tls.{key}");
        let items = match &t.certificates {
            Value::Sequence(items) if !items.is_empty() => items.clone(),
            other => {
                self.push(
                    &p("certificates"),
                    format_args!("expected a non-empty list of {{cert, key, names}}, found {}", yaml_kind(other)),
                );
                return None;
            }
        };
        let before = self.0.len();
        let mut specs: Vec<(PathBuf, PathBuf, Vec<HostMatch>)> = Vec::new();
        for (k, item) in items.iter().enumerate() {
            let cp = |key: &str| format!("listeners[{i}].tls.certificates[{k}].{key}");
            let raw: RawCert = match serde_yaml::from_value(item.clone()) {
                Ok(r) => r,
                Err(err) => {
                    self.push(&format!("listeners[{i}].tls.certificates[{k}]"), err);
                    continue;
                }
            };
            let cert = self.string(&cp("cert"), &raw.cert).map(PathBuf::from);
            let key = self.string(&cp("key"), &raw.key).map(PathBuf::from);
            let mut names = Vec::new();
            match &raw.names {
                None => {}
                Some(Value::Sequence(ns)) => {
                    for (j, n) in ns.iter().enumerate() {
                        let np = format!("{}[{j}]", cp("names"));
                        if let Some(s) = self.string(&np, n) {
                            match host_match(&s) {
                                Ok(HostMatch::Any) => self.push(&np, "must be a host name or *.suffix"),
                                Ok(m) => names.push(m),
                                Err(m) => self.push(&np, m),
                            }
                        }
                    }
                }
                Some(other) => {
                    self.push(&cp("names"), format_args!("expected a list of host names, found {}", yaml_kind(other)))
                }
            }
            if let (Some(c), Some(k)) = (cert, key) {
                specs.push((c, k, names));
            }
        }
        let tls13_only = match &t.min_version {
            None => false,
            Some(v) => self.choice(&p("min_version"), v, &[("1.2", false), ("1.3", true)]).unwrap_or(false),
        };
        let alpn: Vec<String> = match &t.alpn {
            None if websocket => vec!["http/1.1".into()],
            None => Vec::new(),
            Some(Value::Sequence(items)) => {
                items.iter().enumerate().filter_map(|(j, a)| self.string(&format!("{}[{j}]", p("alpn")), a)).collect()
            }
            Some(other) => {
                self.push(&p("alpn"), format_args!("expected a list of protocol names, found {}", yaml_kind(other)));
                Vec::new()
            }
        };
        if websocket {
            for (j, a) in alpn.iter().enumerate() {
                if a != "http/1.1" && a != "h2" {
                    self.push(
                        &format!("{}[{j}]", p("alpn")),
                        format_args!("{a:?} is not offered: a websocket listener speaks \"h2\" and \"http/1.1\" only"),
                    );
                }
            }
        }
        let timeout = match &t.handshake_timeout {
            Some(v) => self.duration(&p("handshake_timeout"), v).unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT),
            None => DEFAULT_HANDSHAKE_TIMEOUT,
        };
        let client_ca = t.client_ca.as_ref().and_then(|v| self.string(&p("client_ca"), v)).map(PathBuf::from);
        if self.0.len() != before {
            return None;
        }
        let certs: Vec<crate::tls::terminate::CertSpec<'_>> = specs
            .iter()
            .map(|(c, k, n)| crate::tls::terminate::CertSpec { cert: c, key: k, names: n.clone() })
            .collect();
        match crate::tls::terminate::build(&certs, tls13_only, &alpn, client_ca.as_deref(), timeout) {
            Ok(t) => Some(t),
            Err(errs) => {
                for m in errs {
                    self.push(&p("certificates"), m);
                }
                None
            }
        }
    }

    /// A tcp listener's SNI `routes`; fills `all` with the union of their backends.
    fn sni_routes(&mut self, i: usize, v: &Value, all: &mut Vec<SocketAddr>) -> Option<Vec<SniRoute>> {
        let Value::Sequence(items) = v else {
            self.push(
                &format!("listeners[{i}].routes"),
                format_args!("expected a list of routes, found {}", yaml_kind(v)),
            );
            return None;
        };
        if items.is_empty() {
            self.push(&format!("listeners[{i}].routes"), "must list at least one route");
            return None;
        }
        let before = self.0.len();
        let mut routes: Vec<SniRoute> = Vec::new();
        for (k, item) in items.iter().enumerate() {
            let rp = |key: &str| format!("listeners[{i}].routes[{k}].{key}");
            let raw: RawSniRoute = match serde_yaml::from_value(item.clone()) {
                Ok(r) => r,
                Err(err) => {
                    self.push(&format!("listeners[{i}].routes[{k}]"), err);
                    continue;
                }
            };
            let sni = match &raw.sni {
                None => HostMatch::Any,
                Some(v) => self
                    .string(&rp("sni"), v)
                    .and_then(|h| host_match(&h).map_err(|m| self.push(&rp("sni"), m)).ok())
                    .unwrap_or(HostMatch::Any),
            };
            let mode = self
                .choice(
                    &rp("mode"),
                    &raw.mode,
                    &[
                        ("terminate", SniMode::Terminate),
                        ("passthrough", SniMode::Passthrough),
                        ("reject", SniMode::Reject),
                    ],
                )
                .unwrap_or(SniMode::Reject);
            let list = match (&raw.backends, mode) {
                (Some(_), SniMode::Reject) => {
                    self.push(&rp("backends"), "a reject route has no backends");
                    Vec::new()
                }
                (None, SniMode::Reject) => Vec::new(),
                (Some(b), _) => self.backend_list(&rp("backends"), b),
                (None, _) => {
                    self.push(&rp("backends"), "is required for terminate and passthrough routes");
                    Vec::new()
                }
            };
            let balance = raw.balance.as_ref().and_then(|b| self.balance(&rp("balance"), b)).unwrap_or_default();
            for (j, r) in routes.iter().enumerate() {
                if r.sni == sni {
                    self.push(&rp("sni"), format_args!("conflicts with routes[{j}]: both match SNI {sni}"));
                }
            }
            let indices = pool_indices(&list, all);
            routes.push(SniRoute { sni, backends: indices, balance, mode });
        }
        (self.0.len() == before).then_some(routes)
    }

    fn send_proxy(&mut self, path: &str, v: &Value) -> Option<ProxyVersion> {
        self.choice(path, v, &[("v1", ProxyVersion::V1), ("v2", ProxyVersion::V2)])
    }

    fn on_change(&mut self, path: &str, v: &Value) -> Option<OnChange> {
        self.choice(path, v, &[("keep", OnChange::Keep), ("close", OnChange::Close)])
    }

    fn choice<T: Copy>(&mut self, path: &str, v: &Value, options: &[(&str, T)]) -> Option<T> {
        let s = self.string(path, v)?;
        if let Some((_, t)) = options.iter().find(|(name, _)| *name == s.trim()) {
            return Some(*t);
        }
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        self.push(path, format_args!("{s:?} is not one of {}", names.join(", ")));
        None
    }

    fn uint(&mut self, path: &str, v: &Value, range: std::ops::RangeInclusive<u64>) -> Option<u64> {
        match v.as_u64() {
            Some(n) if range.contains(&n) => Some(n),
            _ => {
                let shown = serde_yaml::to_string(v).unwrap_or_default();
                self.push(
                    path,
                    format_args!("{} is not a whole number from {} to {}", shown.trim(), range.start(), range.end()),
                );
                None
            }
        }
    }
}

/// A route's backends as indices into the listener's `all`, which takes
/// the ones it does not have yet.
fn pool_indices(list: &[SocketAddr], all: &mut Vec<SocketAddr>) -> Vec<usize> {
    list.iter()
        .map(|a| {
            all.iter().position(|b| b == a).unwrap_or_else(|| {
                all.push(*a);
                all.len() - 1
            })
        })
        .collect()
}

/// `chat.example.com`, `*.example.com` (any name below it), `*` or empty = any.
fn host_match(h: &str) -> Result<HostMatch, String> {
    let h = h.trim().to_ascii_lowercase();
    if h.is_empty() || h == "*" {
        return Ok(HostMatch::Any);
    }
    let (wild, name) = match h.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, h.as_str()),
    };
    let label_ok = |l: &str| {
        !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if name.split('.').all(label_ok) {
        Ok(if wild { HostMatch::Suffix(format!(".{name}")) } else { HostMatch::Exact(name.to_string()) })
    } else {
        Err(format!("{h:?} is not a host name (write e.g. \"chat.example.com\" or \"*.example.com\"; no port)"))
    }
}

fn yaml_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    socket: Option<PathBuf>,
    metrics: Option<Value>,
    group: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKernel {
    max_flows: Option<u32>,
    trim_overlaps: Option<bool>,
    max_queued_per_flow: Option<Value>,
    max_queued_total: Option<Value>,
    pin_path: Option<PathBuf>,
    keep_pinned: Option<bool>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listeners: Vec<Listener>,
    pub admin: Admin,
    pub kernel: Kernel,
    pub log: Log,
    /// Concurrent client connections across all listeners.
    pub max_connections: Option<u64>,
    /// After SIGTERM/SIGINT, how long open flows may take to finish.
    pub drain_timeout: Duration,
    /// Threads of the user-space event loop (`workers`).
    pub workers: Workers,
    /// Where the fleet-wide part comes from, on a node of a fleet.
    pub fleet: Option<Fleet>,
}

/// A node of a fleet (`fleet`): listeners, limits and drain_timeout come
/// from etcd, the rest from the node's own file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    /// `host:port` of each etcd member (its client URL without `http://`).
    pub endpoints: Vec<String>,
    /// Key prefix: the document is `<prefix>config`, the nodes'
    /// status `<prefix>nodes/<node>`.
    pub prefix: String,
    pub node: String,
    /// The last document applied and its revision, to start from when etcd
    /// cannot be reached.
    pub cache: PathBuf,
    /// Lease of this node's status key.
    pub status_ttl: Duration,
}

impl Fleet {
    pub fn config_key(&self) -> String {
        format!("{}config", self.prefix)
    }

    pub fn nodes_prefix(&self) -> String {
        format!("{}nodes/", self.prefix)
    }

    pub fn node_key(&self) -> String {
        format!("{}{}", self.nodes_prefix(), self.node)
    }
}

pub const DEFAULT_FLEET_PREFIX: &str = "/gateway/";
pub const DEFAULT_FLEET_CACHE: &str = "/var/lib/gateway/fleet.yaml";
pub const DEFAULT_STATUS_TTL: Duration = Duration::from_secs(10);

impl RawFleet {
    fn validate(&self, e: &mut Errors) -> Option<Fleet> {
        let mut endpoints = Vec::new();
        if self.etcd.endpoints.is_empty() {
            e.push("fleet.etcd.endpoints", "must list at least one etcd member (http://host:port)");
        }
        for (i, url) in self.etcd.endpoints.iter().enumerate() {
            let path = format!("fleet.etcd.endpoints[{i}]");
            match url.strip_prefix("http://").map(|a| a.trim_end_matches('/')) {
                Some(a)
                    if a.rsplit_once(':')
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)) =>
                {
                    endpoints.push(a.to_string())
                }
                Some(_) => e.push(&path, format_args!("{url:?} needs a host and a port (http://host:port)")),
                None if url.starts_with("https://") => e.push(
                    &path,
                    format_args!(
                        "{url:?}: TLS to etcd is not supported yet; reach etcd over a private network with http://"
                    ),
                ),
                None => e.push(&path, format_args!("{url:?} is not an http://host:port URL")),
            }
        }
        let prefix = self.etcd.prefix.clone().unwrap_or_else(|| DEFAULT_FLEET_PREFIX.into());
        if !prefix.starts_with('/') || !prefix.ends_with('/') {
            e.push("fleet.etcd.prefix", format_args!("{prefix:?} must start and end with '/'"));
        }
        let node = match &self.node {
            Some(v) => e.string("fleet.node", v),
            None => Some(crate::util::sys::hostname().unwrap_or_default()),
        };
        if let Some(n) = &node {
            if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                e.push(
                    "fleet.node",
                    format_args!("{n:?} must be a non-empty name of letters, digits, '-', '_' and '.'"),
                );
            }
        }
        let cache = self.cache.clone().unwrap_or_else(|| DEFAULT_FLEET_CACHE.into());
        if !cache.is_absolute() {
            e.push("fleet.cache", format_args!("{:?} must be an absolute path", cache.display().to_string()));
        }
        let status_ttl =
            self.status_ttl.as_ref().map_or(Some(DEFAULT_STATUS_TTL), |v| e.duration("fleet.status_ttl", v));
        if let Some(ttl) = status_ttl.filter(|t| *t < Duration::from_secs(2) || *t > Duration::from_secs(3600)) {
            e.push("fleet.status_ttl", format_args!("{ttl:?} is out of range (2s to 1h)"));
        }
        Some(Fleet { endpoints, prefix, node: node?, cache, status_ttl: status_ttl? })
    }
}

/// How many threads run the user-space side (accept, connect, hand-off,
/// HTTP, TLS, relayed flows). Read at start only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// One per CPU this process may use, less one (at least one): the
    /// kernel path's forwarding runs in softirq and the sockmap's kernel
    /// worker, on CPUs the daemon's threads then leave free, and event loops
    /// that wake each other across CPUs cost more per connection than they
    /// add (measured on 2 CPUs; see README `workers`).
    Auto,
    Fixed(usize),
}

impl Workers {
    pub fn resolve(self) -> usize {
        match self {
            Workers::Fixed(n) => n,
            Workers::Auto => std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)),
        }
    }
}

pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Clone)]
pub struct Log {
    pub format: LogFormat,
    /// Flows older than this get an `update` record this often.
    pub flow_interval: Duration,
}

pub const DEFAULT_FLOW_LOG_INTERVAL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub bind: SocketAddr,
    pub backends: Vec<SocketAddr>,
    pub balance: Balance,
    pub offload: Offload,
    pub connect_timeout: Duration,
    pub connect_attempts: u32,
    pub idle_timeout: Duration,
    /// A flow (an upgraded one on websocket listeners, unless its route sets
    /// its own) is closed this long after it started, whatever it carries.
    pub max_duration: Option<Duration>,
    /// What a reload does to flows whose listener (TCP) or route
    /// (websocket, unless the route sets its own) it changed or removed.
    pub on_change: OnChange,
    /// Connections start with a PROXY header from these balancers.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Backend connections start with a PROXY header (websocket routes may
    /// set their own).
    pub send_proxy: Option<ProxyVersion>,
    /// `balance: maglev` (the listener's or a route's): what it hashes, and
    /// the lookup table's size (a prime).
    pub hash_key: HashKey,
    pub maglev_table_size: usize,
    /// Admission rules, checked before a backend is contacted.
    pub limits: crate::policy::limits::Rules,
    pub health: crate::policy::health::HealthConfig,
    /// TLS termination (either kind).
    pub tls: Option<crate::tls::terminate::Tls>,
    /// What it speaks, with the settings only that kind has.
    pub kind: ListenerKind,
}

/// What a listener speaks (`protocol`), with the settings only that kind has.
#[derive(Debug, Clone)]
pub enum ListenerKind {
    Tcp {
        /// With `routes`: the pool and mode chosen by the ClientHello's SNI.
        /// The listener's `backends` is then the union of the routes'.
        sni_routes: Option<Vec<SniRoute>>,
        /// TLS to the backends.
        backend_tls: Option<crate::tls::terminate::Origination>,
    },
    /// `protocol: websocket`: HTTP/1.1 with upgrades, routed by host and
    /// path. The listener's `backends` is the union of every route's
    /// backends, which the routes index into.
    WebSocket(HttpListener),
}

impl Listener {
    /// What a flow of a TCP listener depends on, for `on_change`: every
    /// setting but `on_change` itself.
    pub fn fingerprint(&self) -> String {
        let mut bare = self.clone();
        bare.on_change = OnChange::Keep;
        format!("{bare:?}")
    }

    /// The HTTP side of a websocket listener.
    pub fn http(&self) -> Option<&HttpListener> {
        match &self.kind {
            ListenerKind::WebSocket(h) => Some(h),
            ListenerKind::Tcp { .. } => None,
        }
    }

    pub fn sni_routes(&self) -> Option<&[SniRoute]> {
        match &self.kind {
            ListenerKind::Tcp { sni_routes, .. } => sni_routes.as_deref(),
            ListenerKind::WebSocket(_) => None,
        }
    }

    pub fn backend_tls(&self) -> Option<&crate::tls::terminate::Origination> {
        match &self.kind {
            ListenerKind::Tcp { backend_tls, .. } => backend_tls.as_ref(),
            ListenerKind::WebSocket(_) => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SniMode {
    /// Decrypt with the listener's `tls` block, relay in user space.
    Terminate,
    /// Leave the TLS alone: the ClientHello and the rest go to the backend,
    /// on the kernel path.
    Passthrough,
    /// Close the connection.
    Reject,
}

#[derive(Debug, Clone)]
pub struct SniRoute {
    /// `Any` matches every name, and a ClientHello without SNI.
    pub sni: HostMatch,
    pub backends: Vec<usize>,
    pub balance: Balance,
    pub mode: SniMode,
}

#[derive(Debug, Clone)]
pub struct HttpListener {
    pub routes: Vec<Route>,
    /// From accept to the end of the upgrade (or of a request head).
    pub handshake_timeout: Duration,
    /// Largest request head accepted; larger ones get 431.
    pub max_request_head: usize,
    /// HTTP/2: streams a client connection may have open at once.
    pub max_concurrent_streams: u32,
}

/// The route for `sni`: an exact name, else the longest wildcard, else a
/// route without `sni` (which also takes a ClientHello without SNI).
pub fn pick_sni_route(routes: &[SniRoute], sni: Option<&str>) -> Option<usize> {
    routes.iter().enumerate().filter(|(_, r)| r.sni.matches(sni)).max_by_key(|(_, r)| r.sni.rank()).map(|(i, _)| i)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsMode {
    /// Forward the upgrade, then hand both sockets to the kernel path.
    Passthrough,
    /// Terminate the WebSocket on both sides and relay messages.
    Inspect,
    /// Terminate the client's WebSocket and carry binary payloads to a raw TCP backend.
    BridgeTcp,
}

impl fmt::Display for WsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WsMode::Passthrough => "passthrough",
            WsMode::Inspect => "inspect",
            WsMode::BridgeTcp => "bridge_tcp",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    pub host: HostMatch,
    /// Starts with '/'; matches whole path segments.
    pub path_prefix: String,
    /// Indices into the listener's `backends`.
    pub backends: Vec<usize>,
    pub balance: Balance,
    /// Lower-cased origins; `None` allows any (and no) `Origin`.
    pub allowed_origins: Option<Vec<String>>,
    pub mode: WsMode,
    /// inspect and bridge_tcp: largest message accepted (close 1009 above it).
    pub max_message_size: usize,
    /// inspect and bridge_tcp: ping both sides this often; a side that has
    /// not answered by the next ping is closed.
    pub ping_interval: Option<Duration>,
    /// `auth.jwt`: requests must carry a token these keys verify.
    pub jwt: Option<std::sync::Arc<crate::policy::jwt::Jwt>>,
    /// `auth.external`: an HTTP service decides each request.
    pub external: Option<External>,
    /// Upgraded connections the route holds at once; one more gets 503.
    pub max_connections: Option<u32>,
    /// inspect: messages (and bytes) a client may send, per connection;
    /// going over closes with 1008.
    pub message_rate: Option<crate::policy::limits::Rate>,
    pub byte_rate: Option<crate::policy::limits::Rate>,
    /// An upgraded flow of this route that moves no byte for this long is
    /// closed (the listener's `idle_timeout` otherwise).
    pub idle_timeout: Option<Duration>,
    /// An upgraded flow of this route is closed this long after its 101,
    /// whatever it carries (the listener's `max_duration` otherwise).
    pub max_duration: Option<Duration>,
    /// The listener's `on_change` otherwise.
    pub on_change: Option<OnChange>,
    /// The listener's `send_proxy` otherwise.
    pub send_proxy: Option<ProxyVersion>,
}

/// `auth.external`: ask an HTTP authorization service about each request
/// (as Envoy's ext_authz in HTTP mode and nginx's auth_request do).
#[derive(Debug, Clone)]
pub struct External {
    /// `host:port` of the service.
    pub authority: String,
    /// Prepended to the request's own path.
    pub path_prefix: String,
    pub timeout: Duration,
    /// Request headers sent along (lower-case).
    pub headers: Vec<String>,
    /// With the service out of reach or too slow: allow (true) or 503.
    pub failure_mode_allow: bool,
    /// Headers of an allowing answer that go to the backend (lower-case).
    pub upstream_headers: Vec<String>,
}

pub const DEFAULT_EXTERNAL_AUTH_TIMEOUT: Duration = Duration::from_millis(500);

impl Route {
    /// How flows and stats name the route: `host` then `path_prefix`.
    pub fn name(&self) -> String {
        format!("{}{}", self.host, self.path_prefix)
    }

    /// What a flow of the route depends on, for `on_change`: every setting
    /// but `on_change` itself, with the backends as addresses (their
    /// indices into the listener's list move when other routes change).
    pub fn fingerprint(&self, listener: &Listener) -> String {
        let backends: Vec<SocketAddr> =
            self.backends.iter().filter_map(|&i| listener.backends.get(i).copied()).collect();
        let mut bare = self.clone();
        bare.backends.clear();
        bare.on_change = None;
        format!("{bare:?} {backends:?}")
    }

    /// Does this route's prefix cover `path`? Whole segments only: `/ws`
    /// covers `/ws`, `/ws/`, `/ws/a`, not `/wsx`.
    pub fn covers(&self, path: &str) -> bool {
        let pre = self.path_prefix.as_str();
        path.starts_with(pre) && (pre.ends_with('/') || path.len() == pre.len() || path.as_bytes()[pre.len()] == b'/')
    }
}

pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_REQUEST_HEAD: usize = 16 << 10;
/// HTTP/2 streams a client connection may have open at once (nginx's
/// `http2_max_concurrent_streams` default).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 128;
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 << 20;

#[derive(Debug, Clone)]
pub struct Admin {
    pub socket: PathBuf,
    /// Address of the Prometheus endpoint (`GET /metrics`), when enabled.
    pub metrics: Option<SocketAddr>,
    /// Group allowed to use the admin socket (name and gid), besides its owner.
    pub group: Option<(String, u32)>,
}

#[derive(Debug, Clone)]
pub struct Kernel {
    /// Flows the kernel maps can hold at once (two sockets each).
    pub max_flows: u32,
    /// Cut retransmitted bytes that overlap data already forwarded.
    pub trim_overlaps: bool,
    /// Bound on the bytes one direction of a kernel flow may hold (taken
    /// from the sender, not yet acknowledged by the receiver); 0 = unbounded.
    pub max_queued_per_flow: u64,
    /// Bound on the sum over all kernel flows; flows share it.
    pub max_queued_total: u64,
    /// A directory on a BPF filesystem where the maps and the verdict are
    /// pinned while the daemon runs (for bpftool and other tools).
    pub pin_path: Option<PathBuf>,
    /// Leave the pins in place when the daemon exits.
    pub keep_pinned: bool,
}

pub const DEFAULT_ADMIN_SOCKET: &str = "/run/gateway/admin.sock";
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_MAX_FLOWS: u32 = 8192;
/// Used when the host's largest TCP receive window can't be read.
pub const DEFAULT_MAX_QUEUED_PER_FLOW: u64 = 8 << 20;

/// The default per-flow bound: a quarter of the largest receive window TCP
/// itself lets one socket take on this host (`net.ipv4.tcp_rmem` max),
/// within 4..8 MiB. A direction of a kernel flow holds at most half the
/// bound in the sockmap queue and half in the client socket's receive
/// buffer, which is also the window its sender sees, plus a send buffer of
/// half the bound (see `kernel::size_buffers`): at the end of a bulk run
/// here that is at most ~17 MB queued (16 MiB let 29 MB pile up, 32 MiB 50
/// MB). The window is the price: 4 MiB, or ~60 MB/s per flow at 50 ms RTT;
/// raise the bound for flows from far away. A smaller bound makes a fast
/// sender pause the kernel path more often, and each pause relays bytes in
/// user space (see ARCHITECTURE.md).
pub fn default_max_queued_per_flow() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse::<u64>().ok())
        .map_or(DEFAULT_MAX_QUEUED_PER_FLOW, |max| max / 4)
        .clamp(4 << 20, 8 << 20)
}
pub const DEFAULT_MAX_QUEUED_TOTAL: u64 = 1 << 30;

/// Parses a byte size: `65536`, `512KiB`, `4MiB`, `1GiB` (also `k`, `m`, `g`).
/// A byte rate such as `1MiB/s` (a size, then `/s`, `/m` or `/h`).
pub fn parse_byte_rate(s: &str) -> Result<crate::policy::limits::Rate, String> {
    let bad = || format!("{s:?} is not a byte rate (write e.g. \"1MiB/s\")");
    let (size, unit) = s.trim().split_once('/').ok_or_else(bad)?;
    let n = parse_size(size.trim()).map_err(|_| bad())?;
    let secs = crate::policy::limits::Rate::period_secs(unit).ok_or_else(bad)?;
    if n == 0 {
        return Err(format!("{s:?} must allow at least one byte"));
    }
    Ok(crate::policy::limits::Rate { per_sec: n as f64 / secs, burst: n as f64 })
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size (write e.g. 65536, 512KiB, 4MiB, 1GiB)");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..split].parse().map_err(|_| bad())?;
    let mult: u64 = match t[split..].trim() {
        "" | "B" => 1,
        "KiB" | "k" | "K" => 1 << 10,
        "MiB" | "m" | "M" => 1 << 20,
        "GiB" | "g" | "G" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

impl Config {
    /// What is valid but will not work as meant: certificates clients will
    /// refuse today. One line each, naming the listener and the file.
    pub fn warnings(&self) -> Vec<String> {
        self.listeners
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                let tls = l.tls.iter().flat_map(|t| t.warnings.iter());
                tls.map(move |w| format!("listeners[{i}].tls.certificates ({}): {w}", l.name))
            })
            .collect()
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        raw.validate(true).map_err(|errors| ConfigError::Invalid { path: path.to_path_buf(), errors })
    }

    /// A fleet node's config: its own file (`own`, with `fleet` set) and the
    /// fleet's document (`document`: listeners, limits, drain_timeout),
    /// validated as `check` validates one file, with the same key paths.
    /// Errors name `source` (where the document came from).
    pub fn with_document(own: &str, own_path: &Path, document: &str, source: &Path) -> Result<Self, ConfigError> {
        let mut raw: RawConfig = serde_yaml::from_str(own)
            .map_err(|e| ConfigError::Parse { path: own_path.to_path_buf(), message: e.to_string() })?;
        let doc: RawDocument = serde_yaml::from_str(document).map_err(|e| ConfigError::Parse {
            path: source.to_path_buf(),
            message: format!("{e} (the fleet's document holds listeners, limits and drain_timeout; the rest stays in each node's file)"),
        })?;
        if raw.fleet.is_none() {
            return Err(ConfigError::Invalid {
                path: own_path.to_path_buf(),
                errors: vec!["fleet: must be set to use a fleet's document".into()],
            });
        }
        (raw.listeners, raw.limits, raw.drain_timeout) = (Some(doc.listeners), doc.limits, doc.drain_timeout);
        raw.validate(false).map_err(|errors| ConfigError::Invalid { path: source.to_path_buf(), errors })
    }
}

impl RawConfig {
    /// `own_file`: a node's own file. With `fleet` set, the fleet-wide part
    /// (listeners, limits, drain_timeout) comes from etcd, not from there.
    fn validate(self, own_file: bool) -> Result<Config, Vec<String>> {
        let mut e = Errors::default();
        if self.fleet.is_some() && own_file {
            let here = [
                ("listeners", self.listeners.is_some()),
                ("limits", self.limits.is_some()),
                ("drain_timeout", self.drain_timeout.is_some()),
            ];
            for (key, _) in here.iter().filter(|(_, present)| *present) {
                e.push(key, "comes from etcd when `fleet` is set (the fleet's document, `gateway config push`)");
            }
        } else if self.listeners.as_ref().is_none_or(Vec::is_empty) {
            e.push("listeners", "must list at least one listener");
        }
        let fleet = self.fleet.as_ref().and_then(|f| f.validate(&mut e));
        let limits = self.limits.clone().unwrap_or_default();
        let raw_listeners = self.listeners.as_deref().unwrap_or_default();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut binds: Vec<(SocketAddr, usize)> = Vec::new();
        let mut listeners = Vec::new();
        for (i, l) in raw_listeners.iter().enumerate() {
            let p = |key: &str| format!("listeners[{i}].{key}");
            let name = e.string(&p("name"), &l.name).map(|n| n.trim().to_string());
            if let Some(name) = &name {
                if name.is_empty() {
                    e.push(&p("name"), "must not be empty");
                } else if !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                    e.push(&p("name"), format_args!("{name:?} may only contain letters, digits, '-', '_' and '.'"));
                } else if let Some(j) = names.insert(name.clone(), i) {
                    e.push(&p("name"), format_args!("duplicate listener name {name:?} (also listeners[{j}].name)"));
                }
            }
            let bind = e.addr(&p("bind"), &l.bind);
            if let Some(bind) = bind {
                for &(other, j) in &binds {
                    let same = other == bind && bind.port() != 0;
                    let overlaps = bind.port() != 0
                        && other.port() == bind.port()
                        && other.is_ipv4() == bind.is_ipv4()
                        && (other.ip().is_unspecified() || bind.ip().is_unspecified());
                    if same {
                        e.push(
                            &p("bind"),
                            format_args!("duplicate bind address \"{bind}\" (also listeners[{j}].bind)"),
                        );
                    } else if overlaps {
                        e.push(&p("bind"), format_args!("\"{bind}\" overlaps \"{other}\" of listeners[{j}].bind"));
                    }
                }
                binds.push((bind, i));
            }
            let protocol = match &l.protocol {
                Some(v) => e.choice(&p("protocol"), v, &[("tcp", Protocol::Tcp), ("websocket", Protocol::Websocket)]),
                None => Some(Protocol::Tcp),
            };
            let mut backends = Vec::new();
            let mut http = None;
            let mut sni_routes: Option<Vec<SniRoute>> = None;
            if protocol == Some(Protocol::Websocket) {
                if l.backends.is_some() {
                    e.push(
                        &p("backends"),
                        "a websocket listener sends each request by its `routes`; list the backends under each route",
                    );
                }
                http = e.http_listener(i, l, &mut backends);
            } else {
                for (key, v) in [
                    ("handshake_timeout", &l.handshake_timeout),
                    ("max_request_head", &l.max_request_head),
                    ("max_concurrent_streams", &l.max_concurrent_streams),
                ] {
                    if v.is_some() {
                        e.push(&p(key), "applies to `protocol: websocket` listeners only");
                    }
                }
                match (&l.backends, &l.routes) {
                    (Some(_), Some(_)) => e.push(
                        &p("routes"),
                        "a tcp listener has either `backends` or SNI `routes` (each with its backends), not both",
                    ),
                    (None, None) => {
                        e.push(&p("backends"), "is required: list at least one IP:PORT backend (or SNI `routes`)")
                    }
                    (Some(v), None) => backends = e.backend_list(&p("backends"), v),
                    (None, Some(v)) => sni_routes = e.sni_routes(i, v, &mut backends),
                }
            }
            let balance = l.balance.as_ref().map_or(Some(Balance::RoundRobin), |v| e.balance(&p("balance"), v));
            let offload = l.offload.as_ref().map_or(Some(Offload::Auto), |v| {
                e.choice(
                    &p("offload"),
                    v,
                    &[("auto", Offload::Auto), ("kernel", Offload::Kernel), ("userspace", Offload::Userspace)],
                )
            });
            let connect_timeout = l
                .connect_timeout
                .as_ref()
                .map_or(Some(DEFAULT_CONNECT_TIMEOUT), |v| e.duration(&p("connect_timeout"), v));
            let idle_timeout =
                l.idle_timeout.as_ref().map_or(Some(DEFAULT_IDLE_TIMEOUT), |v| e.duration(&p("idle_timeout"), v));
            let max_duration = l.max_duration.as_ref().and_then(|v| e.duration(&p("max_duration"), v));
            let on_change = l.on_change.as_ref().map_or(Some(OnChange::Keep), |v| e.on_change(&p("on_change"), v));
            let send_proxy = l.send_proxy.as_ref().and_then(|v| e.send_proxy(&p("send_proxy"), v));
            let hash_key = match &l.hash_key {
                None => Some(HashKey::Source),
                Some(v) => e.string(&p("hash_key"), v).and_then(|s| {
                    let k = HashKey::parse(&s).map_err(|m| e.push(&p("hash_key"), m)).ok()?;
                    if k != HashKey::Source && protocol != Some(Protocol::Websocket) {
                        e.push(
                            &p("hash_key"),
                            "only `source` on a tcp listener (it has no request to read a key from)",
                        );
                        return None;
                    }
                    Some(k)
                }),
            };
            let maglev_table_size = match &l.maglev_table_size {
                None => Some(crate::policy::maglev::DEFAULT_TABLE_SIZE),
                Some(v) => {
                    e.uint(&p("maglev_table_size"), v, 3..=crate::policy::maglev::MAX_TABLE_SIZE as u64).and_then(|n| {
                        let n = n as usize;
                        if crate::policy::maglev::is_prime(n) {
                            Some(n)
                        } else {
                            e.push(
                                &p("maglev_table_size"),
                                format_args!("{n} is not a prime (Maglev needs one; e.g. 65537, 131071, 1000003)"),
                            );
                            None
                        }
                    })
                }
            };
            let proxy_protocol = l.proxy_protocol.as_ref().and_then(|pp| {
                let accept = pp.accept.as_ref().map_or(Some(ProxyAccept::Any), |v| {
                    e.choice(
                        &p("proxy_protocol.accept"),
                        v,
                        &[("v1", ProxyAccept::V1), ("v2", ProxyAccept::V2), ("any", ProxyAccept::Any)],
                    )
                });
                let from = match &pp.from {
                    Some(v) => e.cidrs(&p("proxy_protocol.from"), v),
                    None => Vec::new(),
                };
                if from.is_empty() {
                    e.push(
                        &p("proxy_protocol.from"),
                        "is required: the balancers' addresses or CIDR prefixes (a header from anyone else could claim any source)",
                    );
                }
                let timeout = pp
                    .timeout
                    .as_ref()
                    .map_or(Some(DEFAULT_PROXY_HEADER_TIMEOUT), |v| e.duration(&p("proxy_protocol.timeout"), v));
                Some(ProxyProtocol { accept: accept?, from, timeout: timeout? })
            });
            let count = |e: &mut Errors, key: &str, v: &Option<Value>| {
                v.as_ref().and_then(|v| e.uint(&p(key), v, 1..=10_000_000)).map(|n| n as u32)
            };
            let limits = crate::policy::limits::Rules {
                allow: l.allow.as_ref().map(|v| e.cidrs(&p("allow"), v)).unwrap_or_default(),
                deny: l.deny.as_ref().map(|v| e.cidrs(&p("deny"), v)).unwrap_or_default(),
                max_connections: count(&mut e, "max_connections", &l.max_connections),
                max_connections_per_source: count(&mut e, "max_connections_per_source", &l.max_connections_per_source),
                connection_rate: l.connection_rate.as_ref().and_then(|v| e.rate(&p("connection_rate"), v)),
                connection_rate_per_source: l
                    .connection_rate_per_source
                    .as_ref()
                    .and_then(|v| e.rate(&p("connection_rate_per_source"), v)),
                per_source_ipv6_prefix: l
                    .per_source_ipv6_prefix
                    .as_ref()
                    .and_then(|v| e.uint(&p("per_source_ipv6_prefix"), v, 1..=128))
                    .map(|n| n as u8),
            };
            let mut health = crate::policy::health::HealthConfig::default();
            if let Some(h) = &l.health {
                if let Some(v) = &h.failures {
                    health.failures = e.uint(&p("health.failures"), v, 1..=1000).map_or(health.failures, |n| n as u32);
                }
                if let Some(v) = &h.eject_for {
                    health.eject_for = e.duration(&p("health.eject_for"), v).unwrap_or(health.eject_for);
                }
                if let Some(v) = &h.interval {
                    health.interval = e.duration(&p("health.interval"), v);
                }
                if let Some(v) = &h.timeout {
                    health.timeout = e.duration(&p("health.timeout"), v).unwrap_or(health.timeout);
                }
                for (key, v, slot) in [("send", &h.send, &mut health.send), ("expect", &h.expect, &mut health.expect)] {
                    let Some(v) = v else { continue };
                    match e.string(&p(&format!("health.{key}")), v) {
                        Some(s) if s.is_empty() => e.push(&p(&format!("health.{key}")), "must not be empty"),
                        Some(s) if s.len() > 4096 => e.push(&p(&format!("health.{key}")), "is over 4096 bytes"),
                        Some(s) => *slot = Some(s.into_bytes()),
                        None => {}
                    }
                }
                if (health.send.is_some() || health.expect.is_some()) && health.interval.is_none() {
                    e.push(&p("health.interval"), "is required with send/expect (they are active checks)");
                }
            }
            let tls = l.tls.as_ref().and_then(|t| e.tls(i, t, protocol == Some(Protocol::Websocket)));
            let backend_tls = l.backend_tls.as_ref().and_then(|b| {
                if protocol == Some(Protocol::Websocket) {
                    e.push(&p("backend_tls"), "is not supported on websocket listeners yet");
                    return None;
                }
                let ca = b.ca.as_ref().and_then(|v| e.string(&p("backend_tls.ca"), v)).map(PathBuf::from);
                let sni = b.sni.as_ref().and_then(|v| e.string(&p("backend_tls.sni"), v));
                crate::tls::terminate::origination(ca.as_deref(), sni.as_deref())
                    .map_err(|m| e.push(&p("backend_tls"), m))
                    .ok()
            });
            if let Some(routes) = &sni_routes {
                if routes.iter().any(|r| r.mode == SniMode::Terminate) && l.tls.is_none() {
                    e.push(&p("tls"), "is required: a route has mode terminate (it needs the certificates)");
                }
            }
            let connect_attempts = match &l.connect_attempts {
                Some(v) => e.uint(&p("connect_attempts"), v, 1..=u64::from(MAX_CONNECT_ATTEMPTS)).map(|n| n as u32),
                None => Some((backends.len() as u32).clamp(1, 3)),
            };
            if let (
                Some(name),
                Some(bind),
                Some(_protocol), // valid; the kind below says which
                Some(balance),
                Some(offload),
                Some(ct),
                Some(it),
                Some(ca),
                Some(on_change),
                Some(hash_key),
                Some(maglev_table_size),
            ) = (
                name,
                bind,
                protocol,
                balance,
                offload,
                connect_timeout,
                idle_timeout,
                connect_attempts,
                on_change,
                hash_key,
                maglev_table_size,
            ) {
                listeners.push(Listener {
                    name,
                    bind,
                    backends,
                    balance,
                    offload,
                    connect_timeout: ct,
                    connect_attempts: ca,
                    idle_timeout: it,
                    max_duration,
                    on_change,
                    proxy_protocol,
                    send_proxy,
                    hash_key,
                    maglev_table_size,
                    limits,
                    health,
                    tls,
                    kind: match http {
                        Some(h) => ListenerKind::WebSocket(h),
                        None => ListenerKind::Tcp { sni_routes, backend_tls },
                    },
                });
            }
        }
        if let Some(n) = self.kernel.max_flows {
            if !(1..=1 << 20).contains(&n) {
                e.push("kernel.max_flows", format_args!("{n} is out of range (1 to 1048576)"));
            }
        }
        let per_flow = self
            .kernel
            .max_queued_per_flow
            .as_ref()
            .map_or_else(|| Some(default_max_queued_per_flow()), |v| e.size("kernel.max_queued_per_flow", v));
        let total = self
            .kernel
            .max_queued_total
            .as_ref()
            .map_or(Some(DEFAULT_MAX_QUEUED_TOTAL), |v| e.size("kernel.max_queued_total", v));
        if let (Some(p), Some(t)) = (per_flow, total) {
            if p != 0 && p < 64 * 1024 {
                e.push(
                    "kernel.max_queued_per_flow",
                    format_args!("{p} is too small (at least 64KiB, or 0 for unbounded)"),
                );
            }
            if p != 0 && t < 2 * p {
                e.push(
                    "kernel.max_queued_total",
                    format_args!("{t} is below two flows' worth of kernel.max_queued_per_flow ({p})"),
                );
            }
        }
        let metrics = self.admin.metrics.as_ref().and_then(|v| e.addr("admin.metrics", v));
        let group = self.admin.group.as_ref().and_then(|v| {
            let name = e.string("admin.group", v)?;
            match crate::util::sys::group_id(&name) {
                Some(gid) => Some((name, gid)),
                None => {
                    e.push("admin.group", format_args!("{name:?} is not a group on this host"));
                    None
                }
            }
        });
        let max_connections =
            limits.max_connections.as_ref().and_then(|v| e.uint("limits.max_connections", v, 1..=10_000_000));
        let drain_timeout =
            self.drain_timeout.as_ref().map_or(Some(DEFAULT_DRAIN_TIMEOUT), |v| e.duration("drain_timeout", v));
        let workers = match &self.workers {
            None => Some(Workers::Auto),
            Some(v) if v.as_str() == Some("auto") => Some(Workers::Auto),
            Some(v) if v.is_string() => {
                e.push(
                    "workers",
                    format_args!("{:?} is not `auto` or a whole number from 1 to 1024", v.as_str().unwrap_or_default()),
                );
                None
            }
            Some(v) => e.uint("workers", v, 1..=1024).map(|n| Workers::Fixed(n as usize)),
        };
        let log_format = self.log.format.as_ref().map_or(Some(LogFormat::Plain), |v| {
            e.choice("log.format", v, &[("plain", LogFormat::Plain), ("json", LogFormat::Json)])
        });
        let flow_interval = self
            .log
            .flow_interval
            .as_ref()
            .map_or(Some(DEFAULT_FLOW_LOG_INTERVAL), |v| e.duration("log.flow_interval", v));
        if let Some(path) = &self.kernel.pin_path {
            if path.as_os_str().is_empty() || !path.is_absolute() {
                e.push("kernel.pin_path", format_args!("{:?} must be an absolute path", path.display().to_string()));
            }
        }
        if self.kernel.keep_pinned == Some(true) && self.kernel.pin_path.is_none() {
            e.push("kernel.keep_pinned", "needs kernel.pin_path (there is nothing to keep)");
        }
        if let Some(path) = &self.admin.socket {
            if path.as_os_str().is_empty() || !path.is_absolute() {
                e.push("admin.socket", format_args!("{:?} must be an absolute path", path.display().to_string()));
            }
        }
        if !e.0.is_empty() {
            return Err(e.0);
        }
        Ok(Config {
            listeners,
            admin: Admin { socket: self.admin.socket.unwrap_or_else(|| DEFAULT_ADMIN_SOCKET.into()), metrics, group },
            kernel: Kernel {
                max_flows: self.kernel.max_flows.unwrap_or(DEFAULT_MAX_FLOWS),
                trim_overlaps: self.kernel.trim_overlaps.unwrap_or(true),
                max_queued_per_flow: per_flow.unwrap_or_else(default_max_queued_per_flow),
                max_queued_total: total.unwrap_or(DEFAULT_MAX_QUEUED_TOTAL),
                pin_path: self.kernel.pin_path,
                keep_pinned: self.kernel.keep_pinned.unwrap_or(false),
            },
            max_connections,
            drain_timeout: drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            workers: workers.unwrap_or(Workers::Auto),
            fleet,
            log: Log {
                format: log_format.unwrap_or(LogFormat::Plain),
                flow_interval: flow_interval.unwrap_or(DEFAULT_FLOW_LOG_INTERVAL),
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
    fn sizes() {
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert_eq!(parse_size("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        for bad in ["", "MiB", "4 TB", "-1", "1.5MiB", "4MB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert_rejected(
            &format!("{GOOD}kernel:\n  max_queued_per_flow: 4MB\n"),
            &["kernel.max_queued_per_flow", "\"4MB\""],
        );
        assert_rejected(
            &format!("{GOOD}kernel:\n  max_queued_per_flow: 1KiB\n"),
            &["kernel.max_queued_per_flow", "too small"],
        );
        assert_rejected(
            &format!("{GOOD}kernel:\n  max_queued_per_flow: 16MiB\n  max_queued_total: 16MiB\n"),
            &["kernel.max_queued_total", "two flows"],
        );
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

    const NODE: &str = "fleet:\n  etcd:\n    endpoints: [\"http://10.0.0.1:2379\", \"http://etcd-b:2379/\"]\n  node: gw-a\n  cache: /var/lib/gateway/a.yaml\n";

    #[test]
    fn a_fleet_node_file_leaves_the_fleet_wide_part_to_etcd() {
        let c = parse(NODE).unwrap();
        let f = c.fleet.as_ref().unwrap();
        assert_eq!(f.endpoints, ["10.0.0.1:2379", "etcd-b:2379"]);
        assert_eq!((f.config_key().as_str(), f.node_key().as_str()), ("/gateway/config", "/gateway/nodes/gw-a"));
        assert_eq!(f.status_ttl, DEFAULT_STATUS_TTL);
        assert!(c.listeners.is_empty());
        assert_rejected(&format!("{NODE}{GOOD}"), &["listeners: comes from etcd"]);
        assert_rejected(&format!("{NODE}drain_timeout: 5s\n"), &["drain_timeout: comes from etcd"]);
        assert_rejected(
            &NODE.replace("http://10.0.0.1:2379", "https://10.0.0.1:2379"),
            &["fleet.etcd.endpoints[0]", "TLS"],
        );
        assert_rejected(&NODE.replace("http://10.0.0.1:2379", "http://10.0.0.1"), &["fleet.etcd.endpoints[0]", "port"]);
        assert_rejected(&NODE.replace("gw-a", "gw a"), &["fleet.node"]);
        assert_rejected(&format!("{NODE}  status_ttl: 1s\n"), &["fleet.status_ttl"]);
        assert_rejected(&NODE.replace("/var/lib/gateway/a.yaml", "a.yaml"), &["fleet.cache"]);
    }

    #[test]
    fn a_fleet_document_is_checked_as_one_file_with_the_same_key_paths() {
        let doc = GOOD.split("admin:").next().unwrap();
        let src = Path::new("etcd:/gateway/config@7");
        let c = Config::with_document(NODE, Path::new("node.yaml"), doc, src).unwrap();
        assert_eq!(c.listeners.len(), parse(GOOD).unwrap().listeners.len());
        assert!(c.fleet.is_some());
        let bad = doc.replace("protocol: tcp", "protocol: udp");
        let e = Config::with_document(NODE, Path::new("node.yaml"), &bad, src).unwrap_err().to_string();
        assert!(e.starts_with("etcd:/gateway/config@7: listeners[0].protocol"), "{e}");
        // Node-local settings stay in the node's file.
        let e = Config::with_document(NODE, Path::new("node.yaml"), &format!("{doc}admin:\n  socket: /x\n"), src)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `admin`") && e.contains("each node's file"), "{e}");
        // A file without `fleet` has no document.
        assert!(Config::with_document(GOOD, Path::new("g.yaml"), doc, src).is_err());
    }

    #[test]
    fn auth_jwt_values_are_checked_by_key_path() {
        let ws = |auth: &str| {
            format!(
                "listeners:\n  - name: w\n    bind: \"127.0.0.1:0\"\n    protocol: websocket\n    routes:\n      \
                 - path_prefix: /a\n        backends: [\"127.0.0.1:9\"]\n        auth:\n          jwt:\n{auth}"
            )
        };
        let secret = "            secret: \"0123456789abcdef0123456789abcdef\"\n";
        let c = parse(&ws(secret)).unwrap();
        assert!(c.listeners[0].http().unwrap().routes[0].jwt.is_some());
        let p = "listeners[0].routes[0].auth.jwt";
        assert_rejected(&ws("            secret: short\n"), &[&format!("{p}.secret")]);
        assert_rejected(&ws("            issuer: x\n"), &[p, "exactly one of keys"]);
        assert_rejected(&ws("            keys: /nonexistent/jwks.json\n"), &[&format!("{p}.keys"), "cannot read"]);
        assert_rejected(
            &ws(&format!("{secret}            token_from: [header, \"query:\"]\n")),
            &[&format!("{p}.token_from[1]")],
        );
        assert_rejected(&ws(&format!("{secret}            leeway: soon\n")), &[&format!("{p}.leeway")]);
        assert_rejected(
            &ws(&format!("{secret}            claims_to_headers: {{ sub: \"X User\" }}\n")),
            &[&format!("{p}.claims_to_headers.sub")],
        );
        assert_rejected(&ws(&format!("{secret}            algorithm: none\n")), &["algorithm"]);
        let capped = ws(secret).replace("        auth:\n", "        max_connections: 0\n        auth:\n");
        assert_rejected(&capped, &["listeners[0].routes[0].max_connections"]);
        let rated = ws(secret)
            .replace("        auth:\n", "        message_rate: 10/s\n        byte_rate: lots\n        auth:\n");
        assert_rejected(&rated, &["routes[0].message_rate: applies to `mode: inspect`", "routes[0].byte_rate"]);
    }

    #[test]
    fn max_duration_and_on_change_are_checked_by_key_path() {
        let ws = |listener: &str, route: &str| {
            format!(
                "listeners:\n  - name: w\n    bind: \"127.0.0.1:0\"\n    protocol: websocket\n{listener}    routes:\n      \
                 - path_prefix: /a\n        backends: [\"127.0.0.1:9\"]\n{route}"
            )
        };
        let c = parse(&ws("    on_change: close\n    max_duration: 1h\n", "        max_duration: 24h\n")).unwrap();
        let l = &c.listeners[0];
        assert_eq!((l.on_change, l.max_duration), (OnChange::Close, Some(Duration::from_secs(3600))));
        let r = &l.http().unwrap().routes[0];
        assert_eq!((r.on_change, r.max_duration), (None, Some(Duration::from_secs(86400))));
        assert_eq!(parse(&ws("", "")).unwrap().listeners[0].on_change, OnChange::Keep);
        assert_rejected(
            &ws("", "        max_duration: 0s\n"),
            &["listeners[0].routes[0].max_duration: \"0s\" must be greater than 0"],
        );
        assert_rejected(&ws("", "        on_change: drop\n"), &["listeners[0].routes[0].on_change", "keep"]);
        assert_rejected(&ws("    max_duration: forever\n", ""), &["listeners[0].max_duration"]);
        assert_rejected(&ws("    on_change: yes\n", ""), &["listeners[0].on_change"]);
    }

    #[test]
    fn proxy_protocol_and_send_proxy_are_checked_by_key_path() {
        let tcp = |extra: &str| {
            format!("listeners:\n  - name: t\n    bind: \"127.0.0.1:0\"\n    backends: [\"127.0.0.1:9\"]\n{extra}")
        };
        let c =
            parse(&tcp("    proxy_protocol: { accept: v2, from: [\"10.0.0.0/24\"] }\n    send_proxy: v1\n")).unwrap();
        let l = &c.listeners[0];
        let pp = l.proxy_protocol.as_ref().unwrap();
        assert_eq!((pp.accept, pp.from.len(), pp.timeout), (ProxyAccept::V2, 1, DEFAULT_PROXY_HEADER_TIMEOUT));
        assert_eq!(l.send_proxy, Some(ProxyVersion::V1));
        let p = "listeners[0].proxy_protocol";
        assert_rejected(&tcp("    proxy_protocol: { accept: v2 }\n"), &[&format!("{p}.from: is required")]);
        assert_rejected(&tcp("    proxy_protocol: { accept: v3, from: [\"10.0.0.1\"] }\n"), &[&format!("{p}.accept")]);
        assert_rejected(&tcp("    proxy_protocol: { from: [\"10.0.0.300\"] }\n"), &[&format!("{p}.from")]);
        assert_rejected(
            &tcp("    proxy_protocol: { from: [\"10.0.0.1\"], timeout: 0s }\n"),
            &[&format!("{p}.timeout")],
        );
        assert_rejected(&tcp("    proxy_protocol: { from: [\"10.0.0.1\"], to: x }\n"), &["unknown field `to`"]);
        assert_rejected(&tcp("    send_proxy: v3\n"), &["listeners[0].send_proxy"]);
        let ws = "listeners:\n  - name: w\n    bind: \"127.0.0.1:0\"\n    protocol: websocket\n    routes:\n      \
                  - path_prefix: /a\n        backends: [\"127.0.0.1:9\"]\n        send_proxy: v2\n";
        assert_eq!(parse(ws).unwrap().listeners[0].http().unwrap().routes[0].send_proxy, Some(ProxyVersion::V2));
        assert_rejected(&ws.replace("send_proxy: v2", "send_proxy: yes"), &["listeners[0].routes[0].send_proxy"]);
    }

    #[test]
    fn maglev_settings_are_checked_by_key_path() {
        let l = |proto: &str, extra: &str| {
            format!(
                "listeners:\n  - name: l\n    bind: \"127.0.0.1:0\"\n{proto}    backends: [\"127.0.0.1:9\"]\n    balance: maglev\n{extra}"
            )
        };
        let c = parse(&l("", "")).unwrap();
        let x = &c.listeners[0];
        assert_eq!(
            (x.balance, &x.hash_key, x.maglev_table_size),
            (Balance::Maglev, &HashKey::Source, crate::policy::maglev::DEFAULT_TABLE_SIZE)
        );
        assert_eq!(parse(&l("", "    maglev_table_size: 131071\n")).unwrap().listeners[0].maglev_table_size, 131_071);
        assert_rejected(
            &l("", "    maglev_table_size: 65536\n"),
            &["listeners[0].maglev_table_size: 65536 is not a prime"],
        );
        assert_rejected(&l("", "    maglev_table_size: 1\n"), &["listeners[0].maglev_table_size"]);
        assert_rejected(
            &l("", "    hash_key: \"header:X-User\"\n"),
            &["listeners[0].hash_key: only `source` on a tcp listener"],
        );
        assert_rejected(&l("", "    hash_key: \"ip\"\n"), &["listeners[0].hash_key", "is not a hash key"]);
        let ws = "listeners:\n  - name: w\n    bind: \"127.0.0.1:0\"\n    protocol: websocket\n    hash_key: \"cookie:sid\"\n    routes:\n      \
                  - path_prefix: /a\n        backends: [\"127.0.0.1:9\"]\n        balance: maglev\n";
        let c = parse(ws).unwrap();
        assert_eq!(c.listeners[0].hash_key, HashKey::Cookie("sid".into()));
        assert_eq!(c.listeners[0].http().unwrap().routes[0].balance, Balance::Maglev);
        assert_rejected(&ws.replace("cookie:sid", "header:"), &["listeners[0].hash_key"]);
        assert_rejected(&ws.replace("cookie:sid", "header:a b"), &["listeners[0].hash_key", "not a header name"]);
    }

    #[test]
    fn rejects_unknown_keys_with_their_path() {
        assert_rejected(&GOOD.replace("balance:", "balanse:"), &["listeners[0]", "balanse"]);
        assert_rejected(&format!("{GOOD}extra: 1\n"), &["extra"]);
        assert_rejected(&GOOD.replace("socket:", "sock:"), &["admin", "sock"]);
        assert_rejected(
            &format!("{GOOD}  group: no-such-group-here\n"),
            &["admin.group", "\"no-such-group-here\" is not a group"],
        );
    }

    #[test]
    fn rejects_bad_values_with_path_and_value() {
        assert_rejected(&GOOD.replace("5s", "5x"), &["listeners[0].connect_timeout", "\"5x\""]);
        assert_rejected(&GOOD.replace("1h", "forever"), &["listeners[0].idle_timeout", "\"forever\""]);
        assert_rejected(
            &GOOD.replace("10.0.0.6:5432", "10.0.0.x:5432"),
            &["listeners[0].backends[1]", "10.0.0.x:5432"],
        );
        assert_rejected(&GOOD.replace("0.0.0.0:15432", "0.0.0.0"), &["listeners[0].bind", "\"0.0.0.0\""]);
        assert_rejected(
            &GOOD.replace("connect_timeout: 5s", "connect_timeout: 0s"),
            &["listeners[0].connect_timeout", "greater than 0"],
        );
        assert_rejected(
            &GOOD.replace("connect_timeout: 5s", "connect_attempts: 0"),
            &["listeners[0].connect_attempts", "0 is not"],
        );
        assert_rejected(&GOOD.replace("round_robin", "random"), &["listeners[0].balance", "random"]);
        assert_rejected(&GOOD.replace("offload: auto", "offload: fast"), &["listeners[0].offload", "fast"]);
        assert_rejected(&GOOD.replace("protocol: tcp", "protocol: udp"), &["listeners[0].protocol", "udp"]);
        assert_rejected(
            &format!("{GOOD}kernel:\n  pin_path: gw\n"),
            &["kernel.pin_path", "\"gw\" must be an absolute path"],
        );
        assert_rejected(
            &format!("{GOOD}kernel:\n  keep_pinned: true\n"),
            &["kernel.keep_pinned", "needs kernel.pin_path"],
        );
        let c = parse(&format!("{GOOD}kernel:\n  pin_path: /sys/fs/bpf/gateway\n")).unwrap();
        assert_eq!(
            (c.kernel.pin_path.as_deref(), c.kernel.keep_pinned),
            (Some(Path::new("/sys/fs/bpf/gateway")), false)
        );
    }

    #[test]
    fn limits_and_acls() {
        let with = |extra: &str| GOOD.replace("    idle_timeout: 1h\n", &format!("    idle_timeout: 1h\n{extra}"));
        let c = parse(&with("    allow: [\"10.0.0.0/8\"]\n    max_connections: 100\n    connection_rate: \"50/s\"\n"))
            .unwrap();
        assert_eq!(c.listeners[0].limits.max_connections, Some(100));
        assert_eq!(c.listeners[0].limits.allow.len(), 1);
        assert_rejected(&with("    deny: [\"10.0.0.0/33\"]\n"), &["listeners[0].deny[0]", "\"10.0.0.0/33\""]);
        assert_rejected(&with("    connection_rate: 50\n"), &["listeners[0].connection_rate", "\"50\" is not a rate"]);
        assert_rejected(&with("    max_connections_per_source: 0\n"), &["listeners[0].max_connections_per_source"]);
        assert_rejected(&with("    per_source_ipv6_prefix: 129\n"), &["listeners[0].per_source_ipv6_prefix"]);
        let c = parse(&with("    per_source_ipv6_prefix: 56\n")).unwrap();
        assert_eq!(c.listeners[0].limits.per_source_ipv6_prefix, Some(56));
        assert_rejected(&format!("{GOOD}limits:\n  max_connections: -1\n"), &["limits.max_connections"]);
        assert_rejected(&format!("{GOOD}limits:\n  max_conns: 1\n"), &["limits", "unknown field `max_conns`"]);
        assert_rejected(&format!("{GOOD}drain_timeout: soon\n"), &["drain_timeout", "\"soon\""]);
        assert_rejected(&format!("{GOOD}workers: 0\n"), &["workers", "0 is not a whole number from 1 to 1024"]);
        assert_rejected(&format!("{GOOD}workers: many\n"), &["workers", "\"many\" is not `auto`"]);
        let c = parse(&with("    health:\n      failures: 2\n      eject_for: 10s\n      interval: 1s\n")).unwrap();
        assert_eq!(c.listeners[0].health.failures, 2);
        assert_eq!(c.listeners[0].health.interval, Some(Duration::from_secs(1)));
        assert_rejected(&with("    health:\n      failures: 0\n"), &["listeners[0].health.failures"]);
        assert_rejected(&with("    health:\n      interval: often\n"), &["listeners[0].health.interval", "\"often\""]);
        assert_rejected(&with("    health:\n      sned: ping\n"), &["listeners[0]", "unknown field `sned`"]);
        assert_rejected(&with("    health:\n      send: ping\n"), &["listeners[0].health.interval", "send/expect"]);
        assert_rejected(
            &with("    health:\n      interval: 1s\n      expect: \"\"\n"),
            &["listeners[0].health.expect", "empty"],
        );
        let c = parse(&with("    health:\n      interval: 1s\n      send: \"PING\\r\\n\"\n      expect: \"+PONG\"\n"))
            .unwrap();
        assert_eq!(c.listeners[0].health.send.as_deref(), Some(&b"PING\r\n"[..]));
        assert_eq!(c.listeners[0].health.expect.as_deref(), Some(&b"+PONG"[..]));
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
            &["listeners[1].name", "duplicate listener name \"a\"", "listeners[1].bind", "127.0.0.1:7000"],
        );
        let overlap = two.replacen("name: a", "name: b", 1).replacen("127.0.0.1:7000", "0.0.0.0:7000", 1);
        assert_rejected(&overlap, &["listeners[1].bind", "overlaps"]);
    }

    const WS: &str = r#"
listeners:
  - name: chat
    bind: "0.0.0.0:8080"
    protocol: websocket
    handshake_timeout: 10s
    routes:
      - host: chat.example.com
        path_prefix: /ws
        backends: ["10.0.0.7:9000"]
        balance: round_robin
        allowed_origins: ["https://chat.example.com"]
        mode: passthrough
      - path_prefix: /mqtt
        bridge_tcp: ["10.0.0.8:1883"]
"#;

    #[test]
    fn accepts_the_documented_websocket_shape() {
        let c = parse(WS).unwrap();
        let l = &c.listeners[0];
        assert!(matches!(l.kind, ListenerKind::WebSocket(_)));
        let http = l.http().unwrap();
        assert_eq!(http.handshake_timeout, Duration::from_secs(10));
        assert_eq!(http.routes[0].host, HostMatch::Exact("chat.example.com".into()));
        assert_eq!(http.routes[0].allowed_origins.as_deref(), Some(&["https://chat.example.com".to_string()][..]));
        assert_eq!(http.routes[1].mode, WsMode::BridgeTcp);
        assert_eq!(http.routes[1].host, HostMatch::Any);
        // The listener's backends are the routes' union; routes index into it.
        assert_eq!(l.backends.len(), 2);
        assert_eq!(http.routes[1].backends, vec![1]);
        assert!(http.routes[0].covers("/ws") && http.routes[0].covers("/ws/a") && !http.routes[0].covers("/wsx"));
    }

    #[test]
    fn rejects_bad_websocket_listeners_with_their_path() {
        let r = |from: &str, to: &str| WS.replacen(from, to, 1);
        assert_rejected(
            &r("    handshake_timeout: 10s\n", "    backends: [\"10.0.0.1:1\"]\n"),
            &["listeners[0].backends", "routes"],
        );
        // A tcp listener's routes are SNI routes: the HTTP keys are unknown there.
        assert_rejected(
            &r("protocol: websocket", "protocol: tcp"),
            &[
                "listeners[0].handshake_timeout",
                "protocol: websocket",
                "listeners[0].routes[0]",
                "unknown field `host`",
            ],
        );
        assert_rejected(
            &r("        bridge_tcp:", "        backends: [\"10.0.0.9:1\"]\n        bridge_tcp:"),
            &["listeners[0].routes[1].bridge_tcp", "not both"],
        );
        assert_rejected(
            &r("        bridge_tcp: [\"10.0.0.8:1883\"]\n", ""),
            &["listeners[0].routes[1]", "needs `backends`"],
        );
        assert_rejected(
            &r("chat.example.com\n", "chat.example.com:443\n"),
            &["listeners[0].routes[0].host", "not a host name"],
        );
        assert_rejected(&r("/mqtt", "mqtt"), &["listeners[0].routes[1].path_prefix", "must start with '/'"]);
        assert_rejected(&r("mode: passthrough", "mode: sniff"), &["listeners[0].routes[0].mode", "\"sniff\""]);
        assert_rejected(
            &r("mode: passthrough", "ping_interval: 1s"),
            &["listeners[0].routes[0].ping_interval", "inspect"],
        );
        assert_rejected(
            &r("https://chat.example.com", "chat.example.com"),
            &["listeners[0].routes[0].allowed_origins[0]", "not an origin"],
        );
        assert_rejected(&r("balance: round_robin", "weight: 2"), &["listeners[0].routes[0]", "unknown field `weight`"]);
        assert_rejected(
            &r(
                "        bridge_tcp: [\"10.0.0.8:1883\"]",
                "        bridge_tcp: [\"10.0.0.8:1883\"]\n        mode: inspect",
            ),
            &["listeners[0].routes[1].mode", "bridge_tcp"],
        );
        assert_rejected(&r("    routes:\n", "    routes: []\n    x_routes:\n"), &["listeners[0]"]);
        assert_rejected(
            &r("handshake_timeout: 10s", "handshake_timeout: 10"),
            &["listeners[0].handshake_timeout", "\"10\""],
        );
        assert_rejected(
            &r("handshake_timeout: 10s", "max_request_head: 1KiB"),
            &["listeners[0].max_request_head", "out of range"],
        );
        assert_rejected(
            &r("handshake_timeout: 10s", "max_concurrent_streams: 0"),
            &["listeners[0].max_concurrent_streams", "0"],
        );
        assert_rejected(
            &r("handshake_timeout: 10s", "max_concurrent_streams: many"),
            &["listeners[0].max_concurrent_streams"],
        );
        // Two routes for the same host and prefix conflict.
        let dup =
            WS.replace("      - path_prefix: /mqtt\n", "      - host: chat.example.com\n        path_prefix: /ws\n");
        assert_rejected(&dup, &["listeners[0].routes[1].path_prefix", "conflicts with routes[0]"]);
        let c =
            parse(&r("mode: passthrough", "mode: inspect\n        max_message_size: 1MiB\n        ping_interval: 20s"))
                .unwrap();
        let route = &c.listeners[0].http().unwrap().routes[0];
        assert_eq!(
            (route.mode, route.max_message_size, route.ping_interval),
            (WsMode::Inspect, 1 << 20, Some(Duration::from_secs(20)))
        );
    }

    #[test]
    fn sni_routes_pick_exact_then_longest_wildcard_then_the_default() {
        let r = |sni: HostMatch| SniRoute {
            sni,
            backends: vec![0],
            balance: Balance::RoundRobin,
            mode: SniMode::Passthrough,
        };
        let routes = [
            r(HostMatch::Any),
            r(HostMatch::Suffix(".example.com".into())),
            r(HostMatch::Suffix(".b.example.com".into())),
            r(HostMatch::Exact("x.b.example.com".into())),
        ];
        assert_eq!(pick_sni_route(&routes, Some("x.b.example.com")), Some(3));
        assert_eq!(pick_sni_route(&routes, Some("y.b.example.com")), Some(2));
        assert_eq!(pick_sni_route(&routes, Some("c.example.com")), Some(1));
        assert_eq!(pick_sni_route(&routes, Some("example.com")), Some(0));
        assert_eq!(pick_sni_route(&routes, Some("other.org")), Some(0));
        // A ClientHello without SNI goes to the route without `sni`, or none.
        assert_eq!(pick_sni_route(&routes, None), Some(0));
        assert_eq!(pick_sni_route(&routes[1..], None), None);
        assert_eq!(pick_sni_route(&routes[1..], Some("other.org")), None);
    }

    #[test]
    fn wildcard_hosts_and_route_order() {
        let m = host_match("*.Example.com").unwrap();
        assert!(m.matches(Some("a.example.com")) && m.matches(Some("a.b.example.com")));
        assert!(!m.matches(Some("example.com")) && !m.matches(None));
        assert!(HostMatch::Exact("x".into()).rank() > m.rank() && m.rank() > HostMatch::Any.rank());
    }
}
