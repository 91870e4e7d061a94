//! `gateway config push|get` and `gateway fleet status`: the fleet's
//! document and its nodes, read and written in etcd from any host that
//! has a node's file.
use std::{path::Path, process::ExitCode};

use crate::{
    config::{Config, Fleet},
    fleet::{etcd::Etcd, status::NodeStatus},
};

/// Exit status for a configuration that does not validate (sysexits EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;

/// A node's own file, its text, and its `fleet` section; or the exit for
/// a file that is not one.
fn node_file(path: &Path) -> Result<(String, Fleet), ExitCode> {
    let invalid = |e: &dyn std::fmt::Display| {
        eprintln!("invalid configuration: {e}");
        ExitCode::from(EXIT_CONFIG)
    };
    let text = std::fs::read_to_string(path).map_err(|e| invalid(&format!("cannot read {}: {e}", path.display())))?;
    let cfg = Config::parse(&text, path).map_err(|e| invalid(&e))?;
    let fleet = cfg.fleet.ok_or_else(|| {
        invalid(&format!("{}: fleet: not set; this command needs a fleet node's file", path.display()))
    })?;
    Ok((text, fleet))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("gateway: {e}");
    ExitCode::FAILURE
}

/// `gateway config push FILE --config NODE_FILE [--expect-revision N]`.
pub fn push(file: &Path, config: &Path, expect: Option<i64>) -> ExitCode {
    let (own, fleet) = match node_file(config) {
        Ok(f) => f,
        Err(code) => return code,
    };
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("invalid configuration: cannot read {}: {e}", file.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Exactly what `check` and every node check, with the same key paths.
    match Config::with_document(&own, config, &text, file) {
        Ok(cfg) => {
            for w in cfg.warnings() {
                eprintln!("warning: {w}");
            }
        }
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let key = fleet.config_key();
    let etcd = Etcd::new(fleet.endpoints.clone());
    let written = runtime().block_on(async {
        match expect {
            None => etcd.put(&key, text.as_bytes(), 0).await.map(Ok),
            Some(n) => etcd.put_if(&key, text.as_bytes(), n).await,
        }
    });
    match written {
        Ok(Ok(revision)) => {
            println!("pushed {key}: revision {revision}");
            ExitCode::SUCCESS
        }
        Ok(Err(now)) => fail(format!(
            "refused: {key} is at revision {now}, not {}; nothing was written (get it, merge, push again)",
            expect.unwrap_or_default()
        )),
        Err(e) => fail(e),
    }
}

/// `gateway config get --config NODE_FILE`.
pub fn get(config: &Path) -> ExitCode {
    let (_, fleet) = match node_file(config) {
        Ok(f) => f,
        Err(code) => return code,
    };
    let key = fleet.config_key();
    match runtime().block_on(Etcd::new(fleet.endpoints.clone()).get(&key)) {
        Ok((Some(kv), _)) => {
            println!("# {key} at revision {}", kv.mod_revision);
            print!("{}", String::from_utf8_lossy(&kv.value));
            ExitCode::SUCCESS
        }
        Ok((None, _)) => {
            fail(format!("no document at {key} yet (gateway config push FILE --config {})", config.display()))
        }
        Err(e) => fail(e),
    }
}

/// `gateway fleet status --config NODE_FILE [--json]`.
pub fn status(config: &Path, json: bool) -> ExitCode {
    let (_, fleet) = match node_file(config) {
        Ok(f) => f,
        Err(code) => return code,
    };
    let etcd = Etcd::new(fleet.endpoints.clone());
    let read = runtime().block_on(async {
        let (doc, _) = etcd.get(&fleet.config_key()).await?;
        let (nodes, _) = etcd.list(&fleet.nodes_prefix()).await?;
        Ok::<_, crate::fleet::etcd::EtcdError>((doc.map_or(0, |d| d.mod_revision), nodes))
    });
    let (current, kvs) = match read {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let mut nodes: Vec<NodeStatus> = Vec::new();
    for kv in kvs {
        match serde_json::from_slice(&kv.value) {
            Ok(n) => nodes.push(n),
            Err(e) => eprintln!("warning: {}: not a node status ({e})", kv.key),
        }
    }
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    if json {
        let v = serde_json::json!({ "revision": current, "nodes": nodes });
        println!("{}", serde_json::to_string_pretty(&v).expect("serialises"));
        return ExitCode::SUCCESS;
    }
    println!("document {} at revision {current}; {} node(s)", fleet.config_key(), nodes.len());
    println!(
        "{:<16} {:<13} {:>9} {:>9} {:>7} {:<6} {:<20} LISTENERS",
        "NODE", "STATE", "REVISION", "APPLIED", "FLOWS", "KERNEL", "UPDATED"
    );
    for n in &nodes {
        let behind = if n.applied_revision < current { "*" } else { "" };
        let listeners: Vec<String> = n.listeners.iter().map(|l| format!("{}={}", l.name, l.local)).collect();
        println!(
            "{:<16} {:<13} {:>9} {:>8}{behind:<1} {:>7} {:<6} {:<20} {}",
            n.node,
            format!("{:?}", n.state).to_lowercase(),
            n.revision,
            n.applied_revision,
            n.flows,
            if n.kernel_path { "yes" } else { "no" },
            n.updated_at,
            listeners.join(" ")
        );
        if let Some(e) = &n.error {
            println!("    rejected: {}", e.replace('\n', "\n      "));
        }
    }
    ExitCode::SUCCESS
}
