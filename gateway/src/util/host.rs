//! Host name patterns, as routes and certificates name them: one name, a
//! `*.suffix` wildcard, or any.
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com`: stored as `.example.com`.
    Suffix(String),
}

impl HostMatch {
    /// `host` is lower-case and without a port.
    pub fn matches(&self, host: Option<&str>) -> bool {
        match (self, host) {
            (HostMatch::Any, _) => true,
            (HostMatch::Exact(h), Some(host)) => h == host,
            (HostMatch::Suffix(sfx), Some(host)) => host.len() > sfx.len() && host.ends_with(sfx.as_str()),
            _ => false,
        }
    }

    /// Exact names beat wildcards, longer wildcards beat shorter ones, and
    /// routes without a host come last.
    pub fn rank(&self) -> usize {
        match self {
            HostMatch::Any => 0,
            HostMatch::Suffix(s) => 1 + s.len(),
            HostMatch::Exact(_) => usize::MAX,
        }
    }
}

impl fmt::Display for HostMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostMatch::Any => f.write_str("*"),
            HostMatch::Exact(h) => f.write_str(h),
            HostMatch::Suffix(s) => write!(f, "*{s}"),
        }
    }
}
