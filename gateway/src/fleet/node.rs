//! This node of a fleet: its settings, its etcd client, its own file (the
//! node-local part of its config), and where it stands with the fleet's
//! document. `control::fleet` moves it along; `gateway status` reads it.
use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, ConfigError},
    fleet::{document::Document, etcd::Etcd, status::State},
    util::sync::Locked,
};

pub struct Node {
    pub cfg: crate::config::Fleet,
    pub etcd: Etcd,
    /// The node's own file, and its text as last read (start or reload).
    pub own_path: PathBuf,
    own_text: Mutex<String>,
    standing: Mutex<Standing>,
}

/// Where the node stands (also the `fleet` part of `gateway status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Standing {
    pub node: String,
    pub state: State,
    /// The revision of the last document seen.
    pub revision: i64,
    /// The document running (None before a first one).
    #[serde(skip)]
    pub applied: Option<Document>,
    pub applied_revision: i64,
    pub error: Option<String>,
    pub connected: bool,
    /// Why etcd was last out of reach.
    #[serde(default)]
    pub last_error: Option<String>,
}

impl Node {
    pub fn new(cfg: crate::config::Fleet, own_path: &Path, own_text: String) -> Self {
        let standing = Standing {
            node: cfg.node.clone(),
            state: State::Disconnected,
            revision: 0,
            applied: None,
            applied_revision: 0,
            error: None,
            connected: false,
            last_error: None,
        };
        Node {
            etcd: Etcd::new(cfg.endpoints.clone()),
            cfg,
            own_path: own_path.to_path_buf(),
            own_text: Mutex::new(own_text),
            standing: Mutex::new(standing),
        }
    }

    pub fn standing(&self) -> Standing {
        self.standing.locked().clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut Standing)) {
        f(&mut self.standing.locked());
    }

    /// The node's own file alone (no listeners).
    pub fn own_config(&self) -> Result<Config, ConfigError> {
        Config::parse(&self.own_text.locked(), &self.own_path)
    }

    /// The node's config with `doc`, validated as `check` does.
    pub fn config_with(&self, doc: &Document) -> Result<Config, ConfigError> {
        doc.config(&self.own_text.locked(), &self.own_path, &self.cfg.config_key())
    }

    /// Reads the node's own file again (a reload): with the document
    /// running, the config to apply. Until a first document, the file's own
    /// config (no listeners).
    pub fn reload_own(&self) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(&self.own_path)
            .map_err(|source| ConfigError::Read { path: self.own_path.clone(), source })?;
        let own = Config::parse(&text, &self.own_path)?;
        if own.fleet.as_ref() != Some(&self.cfg) {
            return Err(ConfigError::Invalid {
                path: self.own_path.clone(),
                errors: vec![
                    "fleet: changed in the file; changes to `fleet` need a restart (this reload changes nothing)"
                        .into(),
                ],
            });
        }
        let cfg = match self.standing().applied {
            Some(doc) => Config::with_document(
                &text,
                &self.own_path,
                &doc.text,
                &crate::fleet::document::source(&self.cfg.config_key(), doc.revision),
            )?,
            None => own,
        };
        *self.own_text.locked() = text;
        Ok(cfg)
    }
}
