//! TLS termination with rustls (`tls` on a listener).
//!
//! - Certificates load when the config is checked, so `gateway check` names
//!   an unreadable file, a file with no certificate or key, or a key that
//!   does not match its certificate.
//! - The certificate is chosen by SNI among each certificate's `names`
//!   (exact or `*.suffix`); no match, or no SNI, gets the first one.
//! - A terminated flow stays in user space (this host has no kTLS, and
//!   sockmap sockets can't use it anyway): `relay::relay` copies
//!   between the TLS stream and the backend, close_notify standing for the
//!   half-close. rustls reads through a record gate and may hand its
//!   traffic keys out, so that a hot upgrade can move the session
//!   (`tls::session`).
use std::{fmt, path::Path, sync::Arc, time::Duration};

use rustls::{
    crypto::ring::default_provider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ServerConfig,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;

use crate::util::host::HostMatch;

/// A listener's TLS settings, ready to serve.
#[derive(Clone)]
pub struct Tls {
    pub config: Arc<ServerConfig>,
    pub handshake_timeout: Duration,
    /// For `gateway status` and the log: each certificate's file and names.
    pub summary: Vec<String>,
    /// Certificates that load but that clients will refuse today (expired,
    /// or not valid yet): `gateway check` and the daemon's log warn of them.
    pub warnings: Vec<String>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("certificates", &self.summary).finish_non_exhaustive()
    }
}

/// One certificate chain with its key and the SNI names it serves.
pub struct CertSpec<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub names: Vec<HostMatch>,
}

/// Loads and checks one chain and key; the error names the file and the problem.
fn load(spec: &CertSpec<'_>) -> Result<CertifiedKey, String> {
    let chain = load_chain(spec.cert)?;
    if chain.is_empty() {
        return Err(format!("{}: no PEM certificate in the file", spec.cert.display()));
    }
    let key =
        PrivateKeyDer::from_pem_file(spec.key).map_err(|e| format!("{}: {}", spec.key.display(), pem_error(&e)))?;
    let signer = default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: unusable private key: {e}", spec.key.display()))?;
    let ck = CertifiedKey::new(chain, signer);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(format!("{}: the key does not match the certificate in {}", spec.key.display(), spec.cert.display()))
        }
        Err(e) => Err(format!("{}: {e}", spec.cert.display())),
    }
}

/// Reads a PEM file of certificates; the error names the file.
fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {}", path.display(), pem_error(&e)))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {}", path.display(), pem_error(&e)))
}

/// A CA bundle as trust anchors.
fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(load_chain(path)?);
    if added == 0 {
        return Err(format!("{}: no usable CA certificate in the file", path.display()));
    }
    Ok(roots)
}

fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => format!("cannot read: {io}"),
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM item of the expected kind in the file".into(),
        other => format!("bad PEM: {other:?}"),
    }
}

/// Builds the listener's rustls config. Errors are one line each, for the
/// config's error list.
pub fn build(
    certs: &[CertSpec<'_>],
    tls13_only: bool,
    alpn: &[String],
    client_ca: Option<&Path>,
    handshake_timeout: Duration,
) -> Result<Tls, Vec<String>> {
    let mut errors = Vec::new();
    let mut loaded = Vec::new();
    let mut warnings = Vec::new();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    for spec in certs {
        match load(spec) {
            Ok(ck) => {
                for (k, der) in ck.cert.iter().enumerate() {
                    let which = if k == 0 { "the certificate".to_string() } else { format!("chain certificate {k}") };
                    let file = spec.cert.display();
                    match validity(der) {
                        Some((_, not_after)) if now > not_after => warnings.push(format!(
                            "{file}: {which} expired on {} (notAfter); clients will refuse it",
                            utc(not_after)
                        )),
                        Some((not_before, _)) if now < not_before => warnings.push(format!(
                            "{file}: {which} is not valid before {} (notBefore); clients will refuse it until then",
                            utc(not_before)
                        )),
                        Some(_) => {}
                        None => warnings.push(format!("{file}: {which} has no readable validity period")),
                    }
                }
                loaded.push((spec.names.clone(), Arc::new(ck)))
            }
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let versions: &[&rustls::SupportedProtocolVersion] =
        if tls13_only { &[&rustls::version::TLS13] } else { &[&rustls::version::TLS13, &rustls::version::TLS12] };
    let provider = Arc::new(default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| vec![format!("TLS versions: {e}")])?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            // mTLS: a client must present a certificate this bundle signed.
            let roots = load_roots(ca).map_err(|e| vec![e])?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| vec![format!("{}: {e}", ca.display())])?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(BySni { certs: loaded }));
    // A hot upgrade takes the traffic keys along (`tls::session`).
    config.enable_secret_extraction = true;
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let summary = certs
        .iter()
        .map(|c| {
            let names: Vec<String> = c.names.iter().map(ToString::to_string).collect();
            format!("{} ({})", c.cert.display(), if names.is_empty() { "default".into() } else { names.join(", ") })
        })
        .collect();
    Ok(Tls { config: Arc::new(config), handshake_timeout, summary, warnings })
}

/// An X.509 certificate's (notBefore, notAfter), in Unix seconds, read from
/// its DER: Certificate → tbsCertificate → [version], serial, signature,
/// issuer, validity.
fn validity(der: &[u8]) -> Option<(i64, i64)> {
    let (_, cert, _) = tlv(der)?;
    let (_, mut tbs, _) = tlv(cert)?;
    if tlv(tbs)?.0 == 0xa0 {
        tbs = tlv(tbs)?.2;
    }
    for _ in 0..3 {
        tbs = tlv(tbs)?.2;
    }
    let (tag, period, _) = tlv(tbs)?;
    if tag != 0x30 {
        return None;
    }
    let (t1, not_before, rest) = tlv(period)?;
    let (t2, not_after, _) = tlv(rest)?;
    Some((asn1_time(t1, not_before)?, asn1_time(t2, not_after)?))
}

/// One DER element: (tag, contents, what follows).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, hdr) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = len << 8 | usize::from(*b.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let end = hdr.checked_add(len)?;
    (end <= b.len()).then(|| (tag, &b[hdr..end], &b[end..]))
}

/// UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ), in Unix seconds.
fn asn1_time(tag: u8, s: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(s).ok()?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = s.get(0..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, s.get(2..)?)
        }
        0x18 => (s.get(0..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    let two = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day, h, m, sec) = (two(0)?, two(2)?, two(4)?, two(6)?, two(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's method).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

/// Unix seconds as "YYYY-MM-DD HH:MM UTC".
fn utc(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", secs / 3600, secs % 3600 / 60)
}

/// Picks the certificate by SNI: exact names first, then the longest
/// wildcard, else the first certificate.
#[derive(Debug)]
struct BySni {
    certs: Vec<(Vec<HostMatch>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name().map(|s| s.trim_end_matches('.').to_ascii_lowercase());
        let best = sni.as_deref().and_then(|name| {
            self.certs
                .iter()
                .flat_map(|(names, ck)| names.iter().map(move |n| (n, ck)))
                .filter(|(n, _)| !matches!(n, HostMatch::Any) && n.matches(Some(name)))
                .max_by_key(|(n, _)| n.rank())
                .map(|(_, ck)| ck.clone())
        });
        best.or_else(|| self.certs.first().map(|(_, ck)| ck.clone()))
    }
}

/// Waits for the client's first TLS record(s) and returns the ClientHello's
/// SNI, leaving every byte in the socket (MSG_PEEK): a passthrough backend
/// then gets the ClientHello itself, and rustls reads it again to terminate.
pub async fn peek_sni(s: &TcpStream) -> Result<Option<String>, String> {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; MAX_HELLO];
    loop {
        s.readable().await.map_err(|e| e.to_string())?;
        let r = s.try_io(tokio::io::Interest::READABLE, || {
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = n as usize;
            if n == 0 {
                return Ok(Err("the client closed before its ClientHello".to_string()));
            }
            match parse_client_hello(&buf[..n]) {
                // More to come: clearing readiness waits for the next bytes.
                Hello::Incomplete if n < buf.len() => Err(std::io::ErrorKind::WouldBlock.into()),
                Hello::Incomplete => Ok(Err(format!("ClientHello over {MAX_HELLO} bytes"))),
                Hello::Invalid(why) => Ok(Err(why.to_string())),
                Hello::Sni(sni) => Ok(Ok(sni)),
            }
        });
        match r {
            Ok(done) => return done,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Largest ClientHello accepted (records included).
const MAX_HELLO: usize = 16 * 1024 + 5;

pub(crate) enum Hello {
    Incomplete,
    Invalid(&'static str),
    Sni(Option<String>),
}

/// Parses a ClientHello out of TLS handshake records (RFC 8446 §4.1.2,
/// RFC 6066 §3), reassembling it across records.
pub(crate) fn parse_client_hello(data: &[u8]) -> Hello {
    // Handshake bytes from consecutive handshake records.
    let mut hs = Vec::new();
    let mut rest = data;
    loop {
        if rest.len() < 5 {
            break;
        }
        if rest[0] != 22 {
            return Hello::Invalid("not a TLS handshake record");
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if rest.len() < 5 + len {
            hs.extend_from_slice(&rest[5..]);
            break;
        }
        hs.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
        if hs.len() >= 4 && hs.len() >= 4 + u24(&hs[1..4]) {
            break;
        }
    }
    if data.is_empty() || (data[0] != 22) {
        return if data.is_empty() { Hello::Incomplete } else { Hello::Invalid("not a TLS handshake record") };
    }
    if hs.len() < 4 {
        return Hello::Incomplete;
    }
    if hs[0] != 1 {
        return Hello::Invalid("the first handshake message is not a ClientHello");
    }
    let body_len = u24(&hs[1..4]);
    if hs.len() < 4 + body_len {
        return Hello::Incomplete;
    }
    let body = &hs[4..4 + body_len];
    match sni_of(body) {
        Some(sni) => Hello::Sni(sni),
        None => Hello::Invalid("malformed ClientHello"),
    }
}

fn u24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

/// The server_name of a ClientHello body; `None` when malformed.
fn sni_of(body: &[u8]) -> Option<Option<String>> {
    let mut p = 2 + 32; // legacy_version, random
    let sid = usize::from(*body.get(p)?);
    p += 1 + sid;
    let suites = usize::from(u16::from_be_bytes([*body.get(p)?, *body.get(p + 1)?]));
    p += 2 + suites;
    let comp = usize::from(*body.get(p)?);
    p += 1 + comp;
    if p == body.len() {
        return Some(None); // no extensions
    }
    let ext_len = usize::from(u16::from_be_bytes([*body.get(p)?, *body.get(p + 1)?]));
    p += 2;
    let exts = body.get(p..p + ext_len)?;
    let mut q = 0;
    while q + 4 <= exts.len() {
        let ty = u16::from_be_bytes([exts[q], exts[q + 1]]);
        let len = usize::from(u16::from_be_bytes([exts[q + 2], exts[q + 3]]));
        let data = exts.get(q + 4..q + 4 + len)?;
        if ty == 0 {
            // server_name_list: u16 length, then (type u8, name u16-prefixed)*.
            let mut r = 2;
            while r + 3 <= data.len() {
                let kind = data[r];
                let n = usize::from(u16::from_be_bytes([data[r + 1], data[r + 2]]));
                let name = data.get(r + 3..r + 3 + n)?;
                if kind == 0 {
                    let name = std::str::from_utf8(name).ok()?;
                    return Some(Some(name.trim_end_matches('.').to_ascii_lowercase()));
                }
                r += 3 + n;
            }
            return Some(None);
        }
        q += 4 + len;
    }
    Some(None)
}

/// TLS to the backends (`backend_tls`): what to verify them against and the
/// name to send.
#[derive(Clone)]
pub struct Origination {
    pub connector: tokio_rustls::TlsConnector,
    /// SNI sent and name verified; `None`: the backend's IP address.
    pub server_name: Option<rustls_pki_types::ServerName<'static>>,
    pub summary: String,
}

impl fmt::Debug for Origination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary)
    }
}

/// Debian's bundle of the system's trusted CAs.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Builds `backend_tls`: roots from `ca` (or the system bundle), SNI from `sni`.
pub fn origination(ca: Option<&Path>, sni: Option<&str>) -> Result<Origination, String> {
    let bundle = ca.unwrap_or(Path::new(SYSTEM_ROOTS));
    let roots = load_roots(bundle)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut config = config;
    config.enable_secret_extraction = true;
    let server_name = match sni {
        None => None,
        Some(n) => Some(
            rustls_pki_types::ServerName::try_from(n.to_string()).map_err(|_| format!("{n:?} is not a server name"))?,
        ),
    };
    let summary = format!("verify against {}, name {}", bundle.display(), sni.unwrap_or("(backend address)"));
    Ok(Origination { connector: tokio_rustls::TlsConnector::from(Arc::new(config)), server_name, summary })
}

impl Origination {
    /// The TLS handshake with a connected backend.
    pub async fn connect(
        &self,
        addr: std::net::SocketAddr,
        stream: TcpStream,
    ) -> std::io::Result<crate::tls::session::Conn> {
        use std::os::fd::AsRawFd;
        let name =
            self.server_name.clone().unwrap_or_else(|| rustls_pki_types::ServerName::IpAddress(addr.ip().into()));
        let fd = stream.as_raw_fd();
        let s = self.connector.connect(name, crate::util::gate::Gate::new(Box::new(stream), &[])).await?;
        Ok(crate::tls::session::Conn::client(s, fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first flight of a rustls client for `name`: its ClientHello in
    /// TLS records, as the gateway peeks it.
    fn client_hello(name: &str) -> Vec<u8> {
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    fn sni(h: Hello) -> Result<Option<String>, String> {
        match h {
            Hello::Sni(s) => Ok(s),
            Hello::Incomplete => Err("incomplete".into()),
            Hello::Invalid(why) => Err(why.into()),
        }
    }

    #[test]
    fn sni_from_real_client_hellos() {
        let hello = client_hello("Api.Example.com");
        assert_eq!(sni(parse_client_hello(&hello)), Ok(Some("api.example.com".into())));
        // Every prefix is incomplete, never an error or another answer.
        for n in 0..hello.len() {
            assert_eq!(sni(parse_client_hello(&hello[..n])), Err("incomplete".into()), "prefix of {n} bytes");
        }
        // The same hello cut into two records, at every point.
        let body = &hello[5..];
        for cut in 1..body.len() {
            let mut two = Vec::new();
            for part in [&body[..cut], &body[cut..]] {
                two.extend_from_slice(&[22, 3, 1]);
                two.extend_from_slice(&(part.len() as u16).to_be_bytes());
                two.extend_from_slice(part);
            }
            assert_eq!(sni(parse_client_hello(&two)), Ok(Some("api.example.com".into())), "cut at {cut}");
        }
        // An address is not a server_name: no SNI (RFC 6066 §3).
        assert_eq!(sni(parse_client_hello(&client_hello("192.0.2.7"))), Ok(None));
    }

    #[test]
    fn bad_client_hellos_are_refused_without_panic() {
        let hello = client_hello("a.example");
        let mut not_handshake = hello.clone();
        not_handshake[0] = 23;
        assert_eq!(sni(parse_client_hello(&not_handshake)), Err("not a TLS handshake record".into()));
        let mut not_hello = hello.clone();
        not_hello[5] = 2;
        assert_eq!(sni(parse_client_hello(&not_hello)), Err("the first handshake message is not a ClientHello".into()));
        assert!(sni(parse_client_hello(b"GET / HTTP/1.1\r\n\r\n")).is_err());
        // Every byte set to each of a few values: an answer, never a panic
        // or a read past the end.
        for i in 0..hello.len() {
            for v in [0x00, 0x01, 0x7f, 0xff] {
                let mut m = hello.clone();
                m[i] = v;
                let _ = parse_client_hello(&m);
            }
        }
    }

    #[test]
    fn asn1_times_and_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(asn1_time(0x17, b"200201000000Z"), Some(1_580_515_200));
        assert_eq!(asn1_time(0x18, b"20200201000000Z"), Some(1_580_515_200));
        assert_eq!(asn1_time(0x17, b"201301000000Z"), None);
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_827_400), "2000-02-29 12:30 UTC");
        assert_eq!(utc(1_580_515_200), "2020-02-01 00:00 UTC");
        // A truncated element is refused, not read past its end.
        assert_eq!(tlv(&[0x30, 0x05, 1, 2]), None);
        assert_eq!(tlv(&[0x30, 0x02, 1, 2, 3]), Some((0x30, &[1u8, 2][..], &[3u8][..])));
    }
}
