//! Per-listener and per-backend totals (`gateway stats`) and their Prometheus
//! exposition (`admin.metrics`). Labels are listener, backend, path, cause and
//! direction — never a flow.
//!
//! A flow's bytes count live while it is open and move into the totals when it
//! closes; both happen under the flow table's lock, so a counter never goes
//! backwards between two scrapes.
use crate::util::sync::Locked;
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Mutex,
    },
};

use serde::{Deserialize, Serialize};

use crate::flow::table::{CloseCause, FlowSnapshot};

/// Bytes of one listener or backend, by path and direction.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bytes {
    pub kernel_client_to_backend: u64,
    pub kernel_backend_to_client: u64,
    pub user_client_to_backend: u64,
    pub user_backend_to_client: u64,
}

impl Bytes {
    fn add(&mut self, f: &FlowSnapshot) {
        self.kernel_client_to_backend += f.kernel_bytes_client_to_backend;
        self.kernel_backend_to_client += f.kernel_bytes_backend_to_client;
        self.user_client_to_backend += f.user_bytes_client_to_backend;
        self.user_backend_to_client += f.user_bytes_backend_to_client;
    }

    pub fn total(&self) -> u64 {
        self.kernel_client_to_backend
            + self.kernel_backend_to_client
            + self.user_client_to_backend
            + self.user_backend_to_client
    }
}

#[derive(Debug, Default)]
struct Closed {
    by_cause: BTreeMap<String, u64>,
    fallbacks: BTreeMap<String, u64>,
    kernel_flows: u64,
    bytes: Bytes,
    backends: Vec<BackendClosed>,
}

#[derive(Debug, Default, Clone)]
struct BackendClosed {
    flows: u64,
    bytes: Bytes,
}

/// Counters of one listener.
pub struct ListenerStats {
    accepted: AtomicU64,
    /// Connections turned away before any backend was contacted, by cause
    /// (indexed like [`crate::policy::limits::CAUSES`]).
    rejected: [AtomicU64; crate::policy::limits::CAUSES.len()],
    connect_failures: Vec<AtomicU64>,
    closed: Mutex<Closed>,
    /// `offload: auto` moves between the paths, by (to, reason).
    switches: Mutex<BTreeMap<(String, String), u64>>,
    /// Requests a route refused (its authentication, its max_connections),
    /// by (route, cause).
    route_refused: Mutex<BTreeMap<(String, String), u64>>,
}

/// `gateway stats` for one listener.
#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerReport {
    pub name: String,
    pub local: String,
    pub offload: String,
    pub accepted: u64,
    /// Turned away before any backend was contacted, by cause.
    pub rejected: BTreeMap<String, u64>,
    pub active: u64,
    pub active_kernel: u64,
    pub active_userspace: u64,
    /// Closed flows by cause (client-closed, backend-reset, idle-timeout, no-backend, ...).
    pub closed: BTreeMap<String, u64>,
    /// Flows relayed in user space, by reason code (open and closed).
    pub userspace_by_reason: BTreeMap<String, u64>,
    /// Flows spliced in the kernel (open and closed).
    pub kernel_flows: u64,
    /// `offload: auto` moves of flows between the paths, by
    /// `to-userspace: <reason>` / `to-kernel: <reason>`.
    #[serde(default)]
    pub path_switches: BTreeMap<String, u64>,
    /// Requests a route refused (authentication, max_connections), by
    /// `<route> <cause>`.
    #[serde(default)]
    pub route_refused: BTreeMap<String, u64>,
    pub bytes: Bytes,
    /// Share of the bytes the kernel moved, 0..1.
    pub kernel_share: f64,
    pub backends: Vec<BackendReport>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BackendReport {
    pub address: String,
    /// False while ejected by the health checks.
    pub up: bool,
    pub active: u64,
    pub flows: u64,
    pub connect_failures: u64,
    pub bytes: Bytes,
}

impl ListenerStats {
    pub fn new(backends: usize) -> Self {
        Self {
            accepted: AtomicU64::new(0),
            rejected: Default::default(),
            connect_failures: (0..backends).map(|_| AtomicU64::new(0)).collect(),
            closed: Mutex::new(Closed { backends: vec![BackendClosed::default(); backends], ..Default::default() }),
            switches: Mutex::default(),
            route_refused: Mutex::default(),
        }
    }

    /// A request `route` refused, for `cause`.
    pub fn route_refused(&self, route: &str, cause: &str) {
        *self.route_refused.locked().entry((route.to_string(), cause.to_string())).or_default() += 1;
    }

    /// A flow moved to `to` (`kernel`, `userspace`) for `reason`.
    pub fn switched(&self, to: &str, reason: &str) {
        *self.switches.locked().entry((to.to_string(), reason.to_string())).or_default() += 1;
    }

    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Relaxed);
    }

    pub fn rejected(&self, cause: &str) {
        if let Some(i) = crate::policy::limits::CAUSES.iter().position(|c| *c == cause) {
            self.rejected[i].fetch_add(1, Relaxed);
        }
    }

    pub fn connect_failed(&self, backend: usize) {
        self.connect_failures[backend].fetch_add(1, Relaxed);
    }

    /// Folds a closing flow into the totals. Call under the flow table's lock
    /// (see [`crate::flow::table::FlowTable::retire`]).
    pub fn close(&self, f: &FlowSnapshot, backend: Option<usize>, cause: &CloseCause) {
        let mut c = self.closed.locked();
        *c.by_cause.entry(cause.code().to_string()).or_default() += 1;
        match (f.path.as_str(), &f.fallback_code) {
            ("kernel", _) => c.kernel_flows += 1,
            ("userspace", Some(code)) => *c.fallbacks.entry(code.clone()).or_default() += 1,
            _ => {}
        }
        c.bytes.add(f);
        if let Some(b) = backend {
            c.backends[b].flows += 1;
            c.backends[b].bytes.add(f);
        }
    }

    /// Totals including the listener's live flows. Call under the flow table's lock.
    pub fn report(
        &self,
        name: &str,
        local: &str,
        offload: &str,
        backends: &[String],
        live: &[FlowSnapshot],
    ) -> ListenerReport {
        let c = self.closed.locked();
        let mut bytes = c.bytes;
        let mut userspace = c.fallbacks.clone();
        let mut kernel_flows = c.kernel_flows;
        let (mut active_kernel, mut active_user) = (0, 0);
        let mut per_backend: Vec<(u64, u64, Bytes)> = c.backends.iter().map(|b| (0, b.flows, b.bytes)).collect();
        for f in live.iter().filter(|f| f.listener == name) {
            bytes.add(f);
            match f.path.as_str() {
                "kernel" => {
                    active_kernel += 1;
                    kernel_flows += 1;
                }
                "userspace" => {
                    active_user += 1;
                    *userspace.entry(f.fallback_code.clone().unwrap_or_default()).or_default() += 1;
                }
                _ => {}
            }
            if let Some(i) = f.backend.as_ref().and_then(|b| backends.iter().position(|x| x == b)) {
                per_backend[i].0 += 1;
                per_backend[i].1 += 1;
                per_backend[i].2.add(f);
            }
        }
        let active = live.iter().filter(|f| f.listener == name).count() as u64;
        let kernel_bytes = bytes.kernel_client_to_backend + bytes.kernel_backend_to_client;
        ListenerReport {
            name: name.into(),
            local: local.into(),
            offload: offload.into(),
            accepted: self.accepted.load(Relaxed),
            rejected: crate::policy::limits::CAUSES
                .iter()
                .zip(&self.rejected)
                .map(|(c, n)| (c.to_string(), n.load(Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            active,
            active_kernel,
            active_userspace: active_user,
            closed: c.by_cause.clone(),
            userspace_by_reason: userspace,
            kernel_flows,
            route_refused: self.route_refused.locked().iter().map(|((r, c), n)| (format!("{r} {c}"), *n)).collect(),
            path_switches: self
                .switches
                .locked()
                .iter()
                .map(|((to, why), n)| (format!("to-{to}: {why}"), *n))
                .collect(),
            bytes,
            kernel_share: if bytes.total() == 0 { 0.0 } else { kernel_bytes as f64 / bytes.total() as f64 },
            backends: backends
                .iter()
                .zip(per_backend)
                .zip(&self.connect_failures)
                .map(|((addr, (active, flows, bytes)), fails)| BackendReport {
                    address: addr.clone(),
                    up: true,
                    active,
                    flows,
                    connect_failures: fails.load(Relaxed),
                    bytes,
                })
                .collect(),
        }
    }
}

/// Prometheus text exposition (format 0.0.4) of the reports.
pub fn prometheus(reports: &[ListenerReport], kernel_path: bool) -> String {
    let mut o = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, u64)>| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(o, "{name}{{{labels}}} {v}");
        }
    };
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let l = |r: &ListenerReport| format!("listener=\"{}\"", esc(&r.name));
    family(
        "gateway_kernel_path_available",
        "gauge",
        "1 when the sockmap programs are loaded.",
        vec![(String::new(), u64::from(kernel_path))],
    );
    family(
        "gateway_connections_accepted_total",
        "counter",
        "Client connections accepted.",
        reports.iter().map(|r| (l(r), r.accepted)).collect(),
    );
    family(
        "gateway_connections_rejected_total",
        "counter",
        "Connections turned away before any backend was contacted, by cause.",
        reports
            .iter()
            .flat_map(|r| r.rejected.iter().map(move |(c, n)| (format!("{},cause=\"{}\"", l(r), esc(c)), *n)))
            .collect(),
    );
    family(
        "gateway_route_refused_total",
        "counter",
        "Requests a route refused (auth.jwt, auth.external, max_connections), by route and cause.",
        reports
            .iter()
            .flat_map(|r| {
                r.route_refused.iter().map(move |(rc, n)| {
                    let (route, cause) = rc.rsplit_once(' ').unwrap_or((rc, ""));
                    (format!("{},route=\"{}\",cause=\"{}\"", l(r), esc(route), esc(cause)), *n)
                })
            })
            .collect(),
    );
    family(
        "gateway_flows_active",
        "gauge",
        "Open flows by data path.",
        reports
            .iter()
            .flat_map(|r| {
                [
                    (format!("{},path=\"kernel\"", l(r)), r.active_kernel),
                    (format!("{},path=\"userspace\"", l(r)), r.active_userspace),
                ]
            })
            .collect(),
    );
    family(
        "gateway_flows_closed_total",
        "counter",
        "Closed flows by cause.",
        reports
            .iter()
            .flat_map(|r| r.closed.iter().map(move |(c, n)| (format!("{},cause=\"{}\"", l(r), esc(c)), *n)))
            .collect(),
    );
    family(
        "gateway_flows_userspace_total",
        "counter",
        "Flows relayed in user space, by reason.",
        reports
            .iter()
            .flat_map(|r| {
                r.userspace_by_reason.iter().map(move |(c, n)| (format!("{},reason=\"{}\"", l(r), esc(c)), *n))
            })
            .collect(),
    );
    family(
        "gateway_flows_kernel_total",
        "counter",
        "Flows spliced in the kernel.",
        reports.iter().map(|r| (l(r), r.kernel_flows)).collect(),
    );
    family(
        "gateway_flow_path_switches_total",
        "counter",
        "Flows offload: auto moved between the kernel path and the user-space relay, by destination and reason.",
        reports
            .iter()
            .flat_map(|r| {
                r.path_switches.iter().map(move |(k, n)| {
                    let (to, why) = k.strip_prefix("to-").and_then(|k| k.split_once(": ")).unwrap_or((k, ""));
                    (format!("{},to=\"{}\",reason=\"{}\"", l(r), esc(to), esc(why)), *n)
                })
            })
            .collect(),
    );
    let bytes_rows = |prefix: String, b: &Bytes| {
        vec![
            (format!("{prefix},path=\"kernel\",direction=\"client_to_backend\""), b.kernel_client_to_backend),
            (format!("{prefix},path=\"kernel\",direction=\"backend_to_client\""), b.kernel_backend_to_client),
            (format!("{prefix},path=\"userspace\",direction=\"client_to_backend\""), b.user_client_to_backend),
            (format!("{prefix},path=\"userspace\",direction=\"backend_to_client\""), b.user_backend_to_client),
        ]
    };
    family(
        "gateway_bytes_total",
        "counter",
        "Bytes forwarded, by data path (kernel: moved by the sockmap verdict without the daemon reading them) and direction.",
        reports.iter().flat_map(|r| bytes_rows(l(r), &r.bytes)).collect(),
    );
    let b = |r: &ListenerReport, be: &BackendReport| format!("{},backend=\"{}\"", l(r), esc(&be.address));
    family(
        "gateway_backend_up",
        "gauge",
        "1 unless the backend is ejected by the health checks.",
        reports.iter().flat_map(|r| r.backends.iter().map(move |be| (b(r, be), u64::from(be.up)))).collect(),
    );
    family(
        "gateway_backend_flows_active",
        "gauge",
        "Open flows per backend.",
        reports.iter().flat_map(|r| r.backends.iter().map(move |be| (b(r, be), be.active))).collect(),
    );
    family(
        "gateway_backend_flows_total",
        "counter",
        "Flows per backend.",
        reports.iter().flat_map(|r| r.backends.iter().map(move |be| (b(r, be), be.flows))).collect(),
    );
    family(
        "gateway_backend_connect_failures_total",
        "counter",
        "Failed connect attempts per backend.",
        reports.iter().flat_map(|r| r.backends.iter().map(move |be| (b(r, be), be.connect_failures))).collect(),
    );
    family(
        "gateway_backend_bytes_total",
        "counter",
        "Bytes forwarded per backend, by data path and direction.",
        reports.iter().flat_map(|r| r.backends.iter().flat_map(move |be| bytes_rows(b(r, be), &be.bytes))).collect(),
    );
    o
}
