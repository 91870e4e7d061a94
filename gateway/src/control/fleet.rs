//! A node of a fleet at run time. At start, the fleet's document (or, with
//! etcd out of reach, the cached one) decides the listeners; then one task
//! keeps the node in step: it reads the document, applies each new revision
//! as a reload does (open flows go on, kernel flows included), publishes
//! the node's status under a lease, and watches for the next revision. Any
//! failure to reach etcd marks the node `disconnected` (it keeps serving)
//! and starts over with backoff; starting over reads the document again, so
//! a node cut off past a compaction still converges.
//!
//! The pipeline is document → validate → apply → publish; only `session`
//! knows the document comes from etcd, so another source (xDS, say) would
//! be one more module feeding `consider`.
use std::{path::Path, sync::Arc, time::Duration};

use tracing::{info, warn};

use crate::{
    config::{Config, Offload},
    control::{daemon::Daemon, reload},
    fleet::{
        document::{self, Document},
        etcd::{EtcdError, Event},
        node::Node,
        status::{ListenerStatus, NodeStatus, State},
    },
    util::sync::Locked,
};

/// How long start-up waits for etcd before it serves from the cache.
const START_WITHIN: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why a fleet node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read {}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cache(#[from] document::CacheError),
    #[error("the cached document does not validate with this node's file")]
    CacheInvalid(#[source] crate::config::ConfigError),
    #[error("the node's own file does not validate")]
    OwnFile(#[source] crate::config::ConfigError),
}

/// The node's config to start with, and the node: the document from etcd
/// if it answers within `START_WITHIN` and the document validates; else the
/// cached one; else the node's own file alone (no listeners until a first
/// document comes).
pub async fn start(own: Config, own_path: &Path) -> Result<(Config, Arc<Node>), StartError> {
    let fleet = own.fleet.clone().expect("start is for fleet nodes");
    let text = std::fs::read_to_string(own_path)
        .map_err(|source| StartError::Read { path: own_path.to_path_buf(), source })?;
    let node = Arc::new(Node::new(fleet.clone(), own_path, text));
    let key = fleet.config_key();
    let read = tokio::time::timeout(START_WITHIN, node.etcd.get(&key)).await;
    let from_etcd = match read {
        Ok(Ok((kv, _))) => {
            node.update(|s| s.connected = true);
            kv.map(|kv| Document { text: String::from_utf8_lossy(&kv.value).into_owned(), revision: kv.mod_revision })
        }
        Ok(Err(e)) => {
            warn!(node = %fleet.node, "fleet: etcd cannot be reached at start ({e}); serving the cached document");
            None
        }
        Err(_) => {
            warn!(node = %fleet.node, "fleet: etcd did not answer within {START_WITHIN:?}; serving the cached document");
            None
        }
    };
    if let Some(doc) = &from_etcd {
        node.update(|s| s.revision = doc.revision);
        match node.config_with(doc) {
            Ok(cfg) => {
                if let Err(e) = document::store_cache(&fleet.cache, doc) {
                    warn!(node = %fleet.node, "fleet: {e}");
                }
                node.update(|s| {
                    (s.state, s.applied, s.applied_revision) = (State::Applied, Some(doc.clone()), doc.revision)
                });
                info!(node = %fleet.node, revision = doc.revision, "fleet: applying the document from etcd");
                return Ok((cfg, node));
            }
            Err(e) => {
                warn!(node = %fleet.node, revision = doc.revision, "fleet: the document is rejected: {e}");
                node.update(|s| (s.state, s.error) = (State::Rejected, Some(e.to_string())));
            }
        }
    }
    if let Some(doc) = document::load_cache(&fleet.cache)? {
        let cfg = node.config_with(&doc).map_err(StartError::CacheInvalid)?;
        info!(node = %fleet.node, revision = doc.revision, cache = %fleet.cache.display(), "fleet: serving the cached document");
        node.update(|s| {
            if from_etcd.is_none() {
                s.state = if s.connected { State::Applied } else { State::Disconnected };
                s.revision = doc.revision;
            }
            (s.applied, s.applied_revision) = (Some(doc.clone()), doc.revision);
        });
        return Ok((cfg, node));
    }
    if from_etcd.is_none() {
        warn!(node = %fleet.node, key = %key, "fleet: no document yet (push one with `gateway config push`); no listeners until then");
        node.update(|s| s.state = if s.connected { State::Applied } else { State::Disconnected });
    }
    Ok((own, node))
}

/// At start, the document (or the cache) cannot be served on this host (a
/// listener's address is taken, the kernel path it asks for is missing):
/// the node starts with its own file alone, `rejected` with `why`, and
/// takes the next document that it can serve.
pub fn refuse_at_start(node: &Node, why: String) -> Result<Config, StartError> {
    warn!(node = %node.cfg.node, "fleet: the document is rejected on this node, starting with no listener: {why}");
    node.update(|s| (s.state, s.error, s.applied, s.applied_revision) = (State::Rejected, Some(why), None, 0));
    node.own_config().map_err(StartError::OwnFile)
}

/// Keeps the node in step with the fleet until the drain starts or a
/// successor takes over (hot upgrade): from then on the node applies no
/// document, and its status lease is revoked, so that `fleet status` shows
/// the successor (which publishes under a lease of its own) or nothing.
pub async fn run(daemon: Arc<Daemon>, node: Arc<Node>) {
    let mut lease = 0;
    let (mut shutdown, mut handed_over) = (daemon.plane.shutdown.subscribe(), daemon.plane.handed_over.subscribe());
    let keep_in_step = async {
        let mut backoff = Duration::from_millis(100);
        loop {
            let Err(e) = session(&daemon, &node, &mut lease, &mut backoff).await;
            let e = e.to_string();
            let s = node.standing();
            if s.connected || s.last_error.as_ref() != Some(&e) {
                warn!(node = %node.cfg.node, "fleet: etcd: {e}; serving what was applied, reconnecting");
            }
            node.update(|s| (s.connected, s.state, s.last_error) = (false, State::Disconnected, Some(e)));
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    };
    tokio::select! {
        () = keep_in_step => {}
        _ = shutdown.wait_for(|s| *s) => {}
        _ = handed_over.wait_for(|h| *h) => {}
    }
    if lease != 0 {
        match tokio::time::timeout(Duration::from_secs(2), node.etcd.revoke(lease)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(node = %node.cfg.node, "fleet: could not revoke the status lease ({e}); it expires within status_ttl")
            }
            Err(_) => {
                warn!(node = %node.cfg.node, "fleet: no answer to revoking the status lease; it expires within status_ttl")
            }
        }
    }
}

enum Never {}

/// One connection's worth: catch up, publish, then watch and keep the
/// lease alive until something fails.
async fn session(
    daemon: &Arc<Daemon>,
    node: &Node,
    lease: &mut i64,
    backoff: &mut Duration,
) -> Result<Never, EtcdError> {
    let key = node.cfg.config_key();
    let (kv, store_revision) = node.etcd.get(&key).await?;
    if !node.standing().connected {
        info!(node = %node.cfg.node, "fleet: connected to etcd");
    }
    node.update(|s| (s.connected, s.last_error) = (true, None));
    match kv {
        Some(kv) => {
            consider(
                daemon,
                node,
                Document { text: String::from_utf8_lossy(&kv.value).into_owned(), revision: kv.mod_revision },
            )
            .await
        }
        None => node.update(|s| {
            if s.state == State::Disconnected {
                s.state = if s.error.is_some() { State::Rejected } else { State::Applied };
            }
        }),
    }
    publish(daemon, node, lease).await?;
    *backoff = Duration::from_millis(100);
    let mut watch = node.etcd.watch(&key, store_revision + 1).await?;
    let mut tick = tokio::time::interval(node.cfg.status_ttl / 3);
    // A late tick (a slow member) is not made up for by a burst.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            events = watch.next() => {
                for e in events? {
                    match e {
                        Event::Put(kv) => {
                            let doc = Document { text: String::from_utf8_lossy(&kv.value).into_owned(), revision: kv.mod_revision };
                            consider(daemon, node, doc).await;
                        }
                        Event::Delete { mod_revision, .. } => warn!(
                            node = %node.cfg.node, revision = mod_revision,
                            "fleet: {key} was deleted; nothing changes (the last document stays applied)"
                        ),
                    }
                }
                publish(daemon, node, lease).await?;
            }
            _ = tick.tick() => {
                // A member that dies, freezes or loses its quorum keeps the
                // watch open and silent: the keep-alive goes to that member,
                // and its failure ends the session (the next one reads the
                // document again, from another member).
                if *lease != 0 && !node.etcd.keep_alive_at(watch.endpoint(), *lease).await? {
                    *lease = 0;
                }
                publish(daemon, node, lease).await?;
            }
        }
    }
}

/// A document seen: applied if new and valid, else the reason it is not.
async fn consider(daemon: &Arc<Daemon>, node: &Node, doc: Document) {
    let standing = node.standing();
    // The revision seen is the one etcd says, not the highest ever seen: a
    // rebuilt cluster starts its revisions again.
    node.update(|s| s.revision = doc.revision);
    if standing.state == State::Rejected && standing.revision == doc.revision {
        // Rejected already (read again after a reconnect).
        return;
    }
    let name = &node.cfg.node;
    if let Some(running) = standing.applied.as_ref().filter(|a| a.same_content(&doc.text)) {
        // Same content under a new revision: nothing to change (no
        // listener restarted, no flow touched).
        if running.revision != doc.revision {
            info!(node = %name, revision = doc.revision, "fleet: the same document again; nothing changes");
        }
        settle(node, doc);
        return;
    }
    let cfg = match node.config_with(&doc) {
        Ok(cfg) => cfg,
        Err(e) => {
            warn!(node = %name, revision = doc.revision, applied = standing.applied_revision, "fleet: document rejected, the running config stays: {e}");
            node.update(|s| (s.state, s.error) = (State::Rejected, Some(e.to_string())));
            return;
        }
    };
    if let (None, Some(l)) = (&daemon.plane.kernel, cfg.listeners.iter().find(|l| l.offload == Offload::Kernel)) {
        let why = daemon.plane.kernel_unavailable.as_ref().map_or("not loaded".into(), ToString::to_string);
        let e = format!(
            "listener {:?} has offload: kernel, but the kernel path is unavailable on this node: {why}",
            l.name
        );
        warn!(node = %name, revision = doc.revision, "fleet: document rejected, the running config stays: {e}");
        node.update(|s| (s.state, s.error) = (State::Rejected, Some(e)));
        return;
    }
    let source = document::source(&node.cfg.config_key(), doc.revision).display().to_string();
    match reload::apply(daemon, cfg, &source, &daemon.global).await {
        Ok(_) => settle(node, doc),
        Err(e) => {
            warn!(node = %name, revision = doc.revision, "fleet: {e}");
            node.update(|s| (s.state, s.error) = (State::Rejected, Some(e)));
        }
    }
}

/// `doc` runs now: remember it, here and in the cache.
fn settle(node: &Node, doc: Document) {
    if let Err(e) = document::store_cache(&node.cfg.cache, &doc) {
        warn!(node = %node.cfg.node, "fleet: {e}");
    }
    node.update(|s| {
        (s.state, s.error, s.applied_revision, s.applied) = (State::Applied, None, doc.revision, Some(doc))
    });
}

/// Puts this node's status under its lease (a new lease if it has none).
async fn publish(daemon: &Daemon, node: &Node, lease: &mut i64) -> Result<(), EtcdError> {
    let body = serde_json::to_vec(&status(daemon, node)).expect("status serialises");
    if *lease != 0 {
        match node.etcd.put(&node.cfg.node_key(), &body, *lease).await {
            // A node cut off for longer than its TTL comes back with its
            // lease gone: take a new one.
            Err(EtcdError::Refused { message, .. }) if message.contains("lease not found") => *lease = 0,
            other => return other.map(drop),
        }
    }
    *lease = node.etcd.grant(node.cfg.status_ttl).await?;
    node.etcd.put(&node.cfg.node_key(), &body, *lease).await.map(drop)
}

pub fn status(daemon: &Daemon, node: &Node) -> NodeStatus {
    let s = node.standing();
    let mut listeners: Vec<ListenerStatus> = daemon
        .plane
        .listeners
        .running
        .locked()
        .iter()
        .map(|(name, r)| ListenerStatus { name: name.clone(), local: r.settings.locked().local.to_string() })
        .collect();
    listeners.sort_by(|a, b| a.name.cmp(&b.name));
    NodeStatus {
        node: node.cfg.node.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        revision: s.revision,
        applied_revision: s.applied_revision,
        state: s.state,
        error: s.error,
        listeners,
        flows: daemon.plane.flows.len(),
        kernel_path: daemon.plane.kernel.is_some(),
        updated_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    }
}
