//! The TLS part of the benchmark (issue 5): the handshake rate and the bulk
//! throughput of TLS terminated by the gateway against nginx stream with
//! `ssl`, and of SNI passthrough (the kernel path carrying the ciphertext)
//! against a direct TLS connection; Envoy terminating TLS in front of a
//! tcp_proxy is the other peer. The clients and the TLS backends are
//! rustls in this process; certificates are an ECDSA P-256 CA and leaf made
//! with the openssl CLI, the same for every target.
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
};

use crate::bench::median;

/// The name the leaf certificate is for, and that clients send as SNI.
pub const NAME: &str = "bench.gw.test";

#[derive(Clone, Copy, PartialEq)]
pub enum TlsTarget {
    Direct,
    Passthrough,
    Terminate,
    Nginx,
    Envoy,
}

pub const TLS_TARGETS: [TlsTarget; 5] =
    [TlsTarget::Direct, TlsTarget::Passthrough, TlsTarget::Terminate, TlsTarget::Nginx, TlsTarget::Envoy];

impl TlsTarget {
    pub fn name(self) -> &'static str {
        match self {
            TlsTarget::Direct => "direct TLS (rustls backend)",
            TlsTarget::Passthrough => "gateway SNI passthrough (kernel)",
            TlsTarget::Terminate => "gateway terminate (rustls)",
            TlsTarget::Nginx => "nginx stream ssl",
            TlsTarget::Envoy => "envoy tcp_proxy + TLS",
        }
    }
}

#[derive(Default, Clone)]
pub struct TlsSample {
    pub handshakes: Vec<f64>,
    pub gbps: Vec<f64>,
    pub suite: String,
}

/// The certificate files, and the rustls configurations built from them.
pub struct Kit {
    pub cert: PathBuf,
    pub key: PathBuf,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl Kit {
    pub fn make(work: &Path) -> Result<Self> {
        gateway_test_support::pki::test_certs(work, &[NAME])?;
        let (cert, key) = (work.join(format!("{NAME}.pem")), work.join(format!("{NAME}.key")));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(work.join("ca.pem"))?)?;
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Every handshake is a full one, as a new client's.
        client.resumption = rustls::client::Resumption::disabled();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)?.collect::<Result<_, _>>()?;
        let server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, PrivateKeyDer::from_pem_file(&key)?)?;
        Ok(Kit { cert, key, client: Arc::new(client), server: Arc::new(server) })
    }

    fn connect(&self, port: u16) -> Result<StreamOwned<ClientConnection, TcpStream>> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let conn = ClientConnection::new(self.client.clone(), ServerName::try_from(NAME)?)?;
        Ok(StreamOwned::new(conn, s))
    }

    /// One connect + full handshake + 64 B echo + close_notify; returns the
    /// cipher suite negotiated.
    pub fn one_handshake(&self, port: u16) -> Result<String> {
        let mut s = self.connect(port)?;
        s.write_all(&[0x5a; 64])?;
        let mut back = [0u8; 64];
        s.read_exact(&mut back)?;
        let suite = s.conn.negotiated_cipher_suite().map(|c| format!("{:?}", c.suite())).unwrap_or_default();
        s.conn.send_close_notify();
        s.flush()?;
        Ok(suite)
    }

    /// Writes as fast as it can for `secs` to a sink behind `port`: Gbit/s.
    pub fn bulk(&self, port: u16, secs: u32) -> Result<f64> {
        let mut s = self.connect(port)?;
        let chunk = vec![0x42u8; 256 << 10];
        let start = Instant::now();
        let end = start + Duration::from_secs(secs.into());
        let mut sent = 0u64;
        while Instant::now() < end {
            s.write_all(&chunk)?;
            sent += chunk.len() as u64;
        }
        let gbps = sent as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9;
        s.conn.send_close_notify();
        s.flush()?;
        Ok(gbps)
    }

    /// A rustls TLS backend: each connection echoes (`sink` false) or
    /// discards what it reads.
    pub fn serve(&self, l: TcpListener, sink: bool) {
        let cfg = self.server.clone();
        thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                let cfg = cfg.clone();
                thread::spawn(move || -> Result<()> {
                    c.set_nodelay(true)?;
                    let mut s = StreamOwned::new(ServerConnection::new(cfg)?, c);
                    let mut buf = vec![0u8; 256 << 10];
                    loop {
                        let n = match s.read(&mut buf) {
                            Ok(0) | Err(_) => return Ok(()),
                            Ok(n) => n,
                        };
                        if !sink {
                            s.write_all(&buf[..n])?;
                        }
                    }
                });
            }
        });
    }
}

/// A plaintext sink behind the TLS-terminating targets.
pub fn serve_sink(l: TcpListener) {
    for c in l.incoming() {
        let Ok(mut c) = c else { continue };
        thread::spawn(move || {
            let mut buf = vec![0u8; 256 << 10];
            while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
        });
    }
}

pub fn render(samples: &[TlsSample], bulk_secs: u32) -> String {
    let d = &samples[0];
    let (dh, dg) = (median(&d.handshakes), median(&d.gbps));
    let mut o = format!(
        "\n## TLS\n\nClients: rustls, full handshakes (no resumption), ECDSA P-256 certificate. handshakes = sequential \
         connect + handshake + 64 B echo + close_notify; bulk = one connection writing for {bulk_secs} s. Direct and \
         passthrough end at a rustls backend in the bench process; terminate and nginx decrypt and forward \
         plaintext to an echo server or a sink.\n\n\
         | target | handshakes/s (x direct TLS) | bulk Gbit/s (x direct TLS) | cipher suite |\n|---|---|---|---|\n"
    );
    for (t, s) in TLS_TARGETS.iter().zip(samples) {
        let (h, g) = (median(&s.handshakes), median(&s.gbps));
        o += &format!("| {} | {h:.0} ({:.2}) | {g:.2} ({:.2}) | {} |\n", t.name(), h / dh, g / dg, s.suite);
    }
    let (t, n, e) = (&samples[2], &samples[3], &samples[4]);
    let line = crate::bench::floor_line;
    o += "\n### Against the floors of issue 5\n\n";
    let (th, nh) = (median(&t.handshakes), median(&n.handshakes));
    o += &line("terminated handshake rate >= nginx's", th >= nh, format!("{th:.0}/s vs nginx {nh:.0}/s"));
    let (tg, ng) = (median(&t.gbps), median(&n.gbps));
    o += &line(
        "terminated bulk throughput >= nginx's",
        tg >= ng,
        format!("{tg:.2} Gbit/s vs nginx {ng:.2} Gbit/s ({:.2}x)", tg / ng),
    );
    o += &format!(
        "- against Envoy: {:.2}x its handshake rate, {:.2}x its bulk throughput\n",
        th / median(&e.handshakes),
        tg / median(&e.gbps)
    );
    let p = &samples[1];
    o += &format!(
        "- passthrough against direct TLS: {:.2}x the handshake rate, {:.2}x the bulk throughput\n",
        median(&p.handshakes) / dh,
        median(&p.gbps) / dg
    );
    o
}
