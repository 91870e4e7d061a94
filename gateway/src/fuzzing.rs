//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, off in
//! the daemon): the parsers that peers and operators reach, without the
//! sockets and tasks around them. Each target states the property it checks.
use std::net::TcpStream as StdTcpStream;

pub use crate::{
    dataplane::ws::Frames,
    tls::session::{Keys, Records, Resumed},
    util::gate::{Framing, Gate},
};

/// What the SNI peek made of the bytes a client sent first.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// Not a whole ClientHello yet.
    Incomplete,
    /// Refused: not a ClientHello the listener can route.
    Invalid,
    /// A ClientHello, and its server name if it has one.
    Sni(Option<String>),
}

pub fn client_hello(data: &[u8]) -> Hello {
    match crate::tls::terminate::parse_client_hello(data) {
        crate::tls::terminate::Hello::Incomplete => Hello::Incomplete,
        crate::tls::terminate::Hello::Invalid(_) => Hello::Invalid,
        crate::tls::terminate::Hello::Sni(s) => Hello::Sni(s),
    }
}

/// The host a request routes on and the `Host` value forwarded with it.
pub fn request_target<B>(req: &hyper::Request<B>) -> Result<(Option<String>, Option<String>), &'static str> {
    let t = crate::edge::http::request_target(req)?;
    Ok((t.host, t.authority.map(|a| String::from_utf8_lossy(a.as_bytes()).into_owned())))
}

/// The path routes see: `None` when it is already normal.
pub fn normalize_path(path: &str) -> Result<Option<String>, &'static str> {
    crate::edge::http::normalize_path(path)
}

/// A backend's response head: its status and length, once whole; and for a
/// 101 the head the client gets.
pub fn response_head(buf: &[u8]) -> Result<Option<(u16, usize)>, String> {
    Ok(crate::edge::http::response_head(buf)?.map(|h| {
        let status = h.status.as_u16();
        if status == 101 {
            drop(crate::edge::http::switched(h.status, h.headers));
        }
        (status, h.len)
    }))
}

/// A rustls session's traffic keys, as a hot upgrade carries them.
pub fn keys_of(
    version: Option<rustls::ProtocolVersion>,
    s: rustls::ExtractedSecrets,
) -> Result<Keys, crate::tls::session::MoveError> {
    crate::tls::session::keys_of(version, s)
}

/// A TLS session resumed from its keys and the ciphertext already read.
pub fn resume(tcp: StdTcpStream, keys: &Keys, early: Vec<u8>) -> Result<Resumed, crate::tls::session::MoveError> {
    tcp.set_nonblocking(true)?;
    let tcp = tokio::net::TcpStream::from_std(tcp)?;
    Resumed::new(tcp, keys, early)
}

/// An admin request line, read as the admin socket reads it (lossy UTF-8):
/// what it asks for.
pub fn admin_request(line: &[u8]) -> crate::control::admin::Request {
    crate::control::admin::Request::parse(&String::from_utf8_lossy(line))
}

/// The hand-over's wire messages, and what the new daemon makes of their
/// fields before it touches a socket: every input an error or a value.
pub fn handover(line: &[u8]) {
    use crate::{handoff::Moved, util::hex::from_hex};
    if let Ok(m) = serde_json::from_slice::<crate::control::upgrade::FlowBatch>(line) {
        for f in &m.flows {
            let _ = f.path();
            let (hex, tls): (Vec<&String>, Vec<&crate::tls::session::ParkedTls>) = match &f.moved {
                Moved::Kernel { .. } | Moved::Userspace { .. } => (vec![], vec![]),
                Moved::WebSocket { client_early, backend_early, client_tls, .. } => {
                    (vec![client_early, backend_early], client_tls.iter().collect())
                }
                Moved::Http { early, client_tls, .. } => (vec![early], client_tls.iter().collect()),
                Moved::Tls { client, backend, .. } => (vec![], client.iter().chain(backend).collect()),
            };
            for h in hex.into_iter().chain(tls.iter().map(|t| &t.early)) {
                let _ = from_hex(h);
            }
            for t in tls {
                let _ = t.keys.check();
            }
        }
    }
    let _ = serde_json::from_slice::<crate::control::upgrade::Offer>(line);
}
