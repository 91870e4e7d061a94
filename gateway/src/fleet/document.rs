//! The fleet's document (`<prefix>config`: listeners, limits,
//! drain_timeout) as a node holds it: its text and the etcd revision it
//! came from, checked against the node's own file, and cached on disk so
//! that a node restarted while etcd is down serves the last one it applied.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError};

/// A document as read from etcd (or from the cache).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    pub text: String,
    /// The key's mod_revision.
    pub revision: i64,
}

/// Where errors say the document came from: `etcd:<key>@<revision>`.
pub fn source(key: &str, revision: i64) -> PathBuf {
    PathBuf::from(format!("etcd:{key}@{revision}"))
}

impl Document {
    /// The node's config with this document: validated as `check` does.
    pub fn config(&self, own: &str, own_path: &Path, key: &str) -> Result<Config, ConfigError> {
        Config::with_document(own, own_path, &self.text, &source(key, self.revision))
    }

    /// Whether two documents say the same (formatting and comments aside):
    /// a push of the same content touches nothing.
    pub fn same_content(&self, other: &str) -> bool {
        let parse = |t: &str| serde_yaml::from_str::<serde_yaml::Value>(t).ok();
        match (parse(&self.text), parse(other)) {
            (Some(a), Some(b)) => a == b,
            _ => self.text == other,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read the fleet cache {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the fleet cache {} does not parse: {message}", path.display())]
    Garbled { path: PathBuf, message: String },
    #[error("cannot write the fleet cache {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The cache file: the last applied document, as YAML with its revision.
pub fn load_cache(path: &Path) -> Result<Option<Document>, CacheError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_yaml::from_str(&text)
            .map(Some)
            .map_err(|e| CacheError::Garbled { path: path.to_path_buf(), message: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CacheError::Read { path: path.to_path_buf(), source }),
    }
}

/// Writes the cache whole or not at all (a temporary file renamed over it).
pub fn store_cache(path: &Path, doc: &Document) -> Result<(), CacheError> {
    let write = || -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        let text = serde_yaml::to_string(doc).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|source| CacheError::Write { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_content_is_the_same_document() {
        let d = Document { text: "listeners: []\ndrain_timeout: 5s\n".into(), revision: 3 };
        assert!(d.same_content("# pushed again\ndrain_timeout: 5s\nlisteners: []\n"));
        assert!(!d.same_content("listeners: []\ndrain_timeout: 6s\n"));
    }

    #[test]
    fn the_cache_keeps_text_and_revision() {
        let dir = std::env::temp_dir().join(format!("gw-fleet-cache-{}", std::process::id()));
        let path = dir.join("sub/fleet.yaml");
        assert_eq!(load_cache(&path).unwrap(), None);
        let d = Document { text: "listeners:\n  - name: a\n".into(), revision: 42 };
        store_cache(&path, &d).unwrap();
        assert_eq!(load_cache(&path).unwrap(), Some(d));
        std::fs::write(&path, "[not a cache").unwrap();
        assert!(matches!(load_cache(&path), Err(CacheError::Garbled { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
