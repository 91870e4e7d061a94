//! TLS clients and servers of the tests' own (rustls), and the Python TLS client.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use crate::*;

/// What [`rustls_echo`] saw.
#[derive(Debug)]
pub struct RustlsEcho {
    /// Every byte came back, in order.
    pub intact: bool,
    /// The server answered our close_notify with its own (a clean TLS close).
    pub clean_close: bool,
    pub version: String,
}

/// A rustls client connection held open, from the client host.
pub struct TlsHeld {
    s: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl TlsHeld {
    /// Connects and verifies the server as `name` against `ca`.
    pub fn connect(topo: &Topology, to: SocketAddr, ca: &Path, name: &str) -> Self {
        use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let cfg =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let name = ServerName::try_from(name.to_string()).unwrap();
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
        let sock = topo.connect(to).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        TlsHeld { s: rustls::StreamOwned::new(conn, sock) }
    }

    /// Sends `len` pattern bytes from stream offset `offset` in 16 KiB round
    /// trips through an echo; whether every byte came back, in order.
    pub fn echo(&mut self, offset: usize, len: usize) -> bool {
        let mut intact = true;
        let mut back = vec![0u8; 16 << 10];
        let mut sent = 0;
        while sent < len {
            let n = (len - sent).min(16 << 10);
            let at = offset + sent;
            let chunk: Vec<u8> = (at..at + n).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
            self.s.write_all(&chunk).unwrap();
            self.s.read_exact(&mut back[..n]).unwrap();
            intact &= back[..n] == chunk[..];
            sent += n;
        }
        intact
    }

    pub fn version(&self) -> String {
        format!("{:?}", self.s.conn.protocol_version().unwrap())
    }

    /// close_notify, then reads to the end: whether the server answered
    /// with its own (a clean TLS close).
    pub fn close(mut self) -> bool {
        self.s.conn.send_close_notify();
        self.s.flush().unwrap();
        let mut rest = Vec::new();
        matches!(self.s.read_to_end(&mut rest), Ok(0))
    }
}

/// A rustls client in this process, from the client host: verifies the
/// server as `name` against `ca`, sends `size` random-ish bytes in 16 KiB
/// round trips through an echo, then close_notify, and reads to the end.
pub fn rustls_echo(topo: &Topology, to: SocketAddr, ca: &Path, name: &str, size: usize) -> RustlsEcho {
    let mut held = TlsHeld::connect(topo, to, ca, name);
    let intact = held.echo(0, size);
    let version = held.version();
    let clean_close = held.close();
    RustlsEcho { intact, clean_close, version }
}

/// The Python `ssl` client (`tests/peers/tls_client.py`) in the client namespace.
pub fn tls_client(topo: &Topology, args: &[&str]) -> Value {
    json_peer(topo, "python3", "tests/peers/tls_client.py", args)
}
