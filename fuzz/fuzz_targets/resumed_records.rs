//! The TLS record layer a flow resumes with after a hot upgrade, against
//! rustls: a client writes records with real keys (every version and cipher
//! the gateway moves), the input mutates them (flipped bits, cuts, inserted,
//! repeated or dropped bytes), and the resumed server side reads them. It
//! gives the plaintext sent, or a prefix of it and then an error or EOF:
//! never other bytes, never a panic. Untouched records read whole, to the
//! close_notify.
#![no_main]
use std::{
    io::Write,
    sync::{Arc, OnceLock},
};

use libfuzzer_sys::fuzz_target;
use rustls::crypto::ring::{cipher_suite as cs, default_provider};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncReadExt;

const CERT: &[u8] = include_bytes!("../../gateway/testdata/session.pem");
const KEY: &[u8] = include_bytes!("../../gateway/testdata/session.key");
const CA: &[u8] = include_bytes!("../../gateway/testdata/ca.pem");

struct World {
    rt: tokio::runtime::Runtime,
    listener: std::net::TcpListener,
    configs: Vec<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>)>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let suites = [
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ];
        let configs = suites
            .into_iter()
            .map(|suite| {
                let provider =
                    Arc::new(rustls::crypto::CryptoProvider { cipher_suites: vec![suite], ..default_provider() });
                let version = match suite {
                    rustls::SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
                    rustls::SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
                };
                let certs: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(CERT).map(|c| c.expect("fixture")).collect();
                let key = PrivateKeyDer::from_pem_slice(KEY).expect("fixture");
                let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(&[version])
                    .expect("suite and version agree")
                    .with_no_client_auth()
                    .with_single_cert(certs, key)
                    .expect("fixture");
                server.enable_secret_extraction = true;
                server.send_tls13_tickets = 0;
                let mut roots = rustls::RootCertStore::empty();
                roots.add(CertificateDer::from_pem_slice(CA).expect("fixture")).expect("fixture");
                let client = rustls::ClientConfig::builder_with_provider(provider)
                    .with_protocol_versions(&[version])
                    .expect("suite and version agree")
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                (Arc::new(server), Arc::new(client))
            })
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().expect("a runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
        World { rt, listener, configs }
    })
}

/// Moves records between the two sides until neither has any to send.
fn pump(a: &mut rustls::Connection, b: &mut rustls::Connection) {
    while deliver(a, b) | deliver(b, a) {}
}

/// The records `from` has to send, read and processed by `to`; whether
/// there were any.
fn deliver(from: &mut rustls::Connection, to: &mut rustls::Connection) -> bool {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).expect("to memory");
    }
    let mut r = &buf[..];
    while !r.is_empty() {
        to.read_tls(&mut r).expect("from memory");
        to.process_new_packets().expect("a clean handshake");
    }
    !buf.is_empty()
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let [suite, writes, ops @ ..] = data else { return };
    let (server_cfg, client_cfg) = &w.configs[usize::from(*suite) % w.configs.len()];
    let name = ServerName::try_from("session.test").expect("a DNS name");
    let mut client =
        rustls::Connection::from(rustls::ClientConnection::new(client_cfg.clone(), name).expect("a client"));
    let mut server = rustls::Connection::from(rustls::ServerConnection::new(server_cfg.clone()).expect("a server"));
    pump(&mut client, &mut server);
    assert!(!client.is_handshaking() && !server.is_handshaking());

    // The plaintext, in up to 8 writes (so records of several sizes).
    client.set_buffer_limit(None);
    let mut sent = Vec::new();
    for k in 0..usize::from(writes % 8) + 1 {
        let len = (usize::from(*writes) * 131 + k * 977) % 20_000;
        let part: Vec<u8> = (0..len).map(|i| (i * 7 + k) as u8).collect();
        client.writer().write_all(&part).expect("to memory");
        sent.extend_from_slice(&part);
    }
    client.send_close_notify();
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire).expect("to memory");
    }
    let untouched = ops.is_empty();
    let mut ops = ops;
    while let [op, a, b, rest @ ..] = ops {
        ops = rest;
        if wire.is_empty() {
            break;
        }
        let at = usize::from(u16::from_be_bytes([*a, *b])) * 7 % wire.len();
        match op % 5 {
            0 => wire[at] ^= 1 << (b % 8),
            1 => wire.truncate(at),
            2 => wire.insert(at, *a),
            3 => {
                let end = (at + usize::from(*b) + 1).min(wire.len());
                let copy = wire[at..end].to_vec();
                wire.splice(end..end, copy);
            }
            _ => {
                let end = (at + usize::from(*b) + 1).min(wire.len());
                wire.drain(at..end);
            }
        }
    }

    let version = server.protocol_version();
    let keys = gateway::fuzzing::keys_of(version, server.dangerous_extract_secrets().expect("extraction on"))
        .expect("a cipher that moves");
    // A loopback socket whose peer has closed: after the carried ciphertext,
    // the resumed session reads EOF.
    let peer = std::net::TcpStream::connect(w.listener.local_addr().unwrap()).expect("loopback");
    let (ours, _) = w.listener.accept().expect("loopback");
    drop(peer);
    let (got, end) = w.rt.block_on(async {
        let mut r = gateway::fuzzing::resume(ours, &keys, wire).expect("the keys just extracted");
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            match r.read(&mut buf).await {
                Ok(0) => return (got, Ok(())),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, Err(e)),
            }
        }
    });
    assert!(got.len() <= sent.len() && got == sent[..got.len()], "other bytes than were sent ({end:?})");
    if untouched {
        assert!(end.is_ok() && got == sent, "untouched records: {} of {} bytes, {end:?}", got.len(), sent.len());
    }
});
