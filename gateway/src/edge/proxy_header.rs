//! The PROXY protocol (versions 1 and 2, as HAProxy specifies it): a header
//! an L4 balancer puts before a connection's first byte to say whom the
//! connection is really from, read on listeners with `proxy_protocol`, and
//! written to backends with `send_proxy`.
//!
//! Reading takes exactly the header out of the socket, nothing after it: the
//! bytes that follow stay in the socket for the SNI peek, hyper or the
//! kernel path.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::{io::AsyncReadExt, net::TcpStream};

use crate::config::{ProxyAccept as Accept, ProxyVersion as Version};

/// What a header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A proxied connection: its client (`src`) and the address it reached (`dst`).
    Proxied { src: SocketAddr, dst: SocketAddr },
    /// The balancer's own connection (v2 LOCAL, v1 UNKNOWN, or an address
    /// family other than TCP over IPv4 or IPv6): the socket's addresses stand.
    Local,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("no PROXY header (the connection starts with other bytes)")]
    Missing,
    #[error("a PROXY {0} header, and this listener accepts {1}")]
    Version(&'static str, &'static str),
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("the connection ended inside the PROXY header")]
    Eof,
    #[error("reading the PROXY header: {0}")]
    Io(String),
}

const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// TLVs past the addresses are skipped, up to this many bytes.
const V2_MAX_BODY: usize = 4096;

/// Reads the header that must start the connection, and nothing more.
pub async fn read(s: &mut TcpStream, accept: Accept) -> Result<Header, Error> {
    // Eight bytes are header bytes whichever version it is (v1's shortest
    // line is 15 bytes, v2's header 16).
    let mut head = [0u8; 16];
    fill(s, &mut head[..8]).await?;
    if head[..6] == *b"PROXY " {
        if accept == Accept::V2 {
            return Err(Error::Version("v1", "v2 only"));
        }
        let mut line = head[..8].to_vec();
        read_line(s, &mut line).await?;
        return parse_v1(&line);
    }
    if head[..8] != V2_SIG[..8] {
        return Err(Error::Missing);
    }
    fill(s, &mut head[8..]).await?;
    if head[..12] != V2_SIG {
        return Err(Error::Missing);
    }
    if accept == Accept::V1 {
        return Err(Error::Version("v2", "v1 only"));
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > V2_MAX_BODY {
        return Err(Error::Malformed(format!("{len} bytes of addresses and TLVs (at most {V2_MAX_BODY})")));
    }
    let mut body = vec![0u8; len];
    fill(s, &mut body).await?;
    parse_v2(&head, &body)
}

async fn fill(s: &mut TcpStream, buf: &mut [u8]) -> Result<(), Error> {
    match s.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Error::Eof),
        Err(e) => Err(Error::Io(e.to_string())),
    }
}

/// Reads the rest of a v1 line into `line`, up to and including its CRLF:
/// what a peek shows is taken only up to the line's end (all of it while no
/// line end is in sight: those are header bytes too).
async fn read_line(s: &mut TcpStream, line: &mut Vec<u8>) -> Result<(), Error> {
    loop {
        if line.ends_with(b"\r\n") {
            return Ok(());
        }
        if line.len() >= V1_MAX {
            return Err(Error::Malformed(format!("a v1 line longer than {V1_MAX} bytes")));
        }
        let mut peeked = [0u8; V1_MAX];
        let n = s.peek(&mut peeked[..V1_MAX - line.len()]).await.map_err(|e| Error::Io(e.to_string()))?;
        if n == 0 {
            return Err(Error::Eof);
        }
        // A CR already taken may be followed by the LF at the start of this.
        let end = if line.last() == Some(&b'\r') && peeked[0] == b'\n' {
            Some(1)
        } else {
            peeked[..n].windows(2).position(|w| w == b"\r\n").map(|i| i + 2)
        };
        let take = end.unwrap_or(n);
        let mut got = vec![0u8; take];
        fill(s, &mut got).await?;
        line.extend_from_slice(&got);
    }
}

/// A whole v1 line, CRLF included.
pub fn parse_v1(line: &[u8]) -> Result<Header, Error> {
    let bad = |why: &str| Error::Malformed(format!("v1: {why}"));
    let text = line.strip_suffix(b"\r\n").ok_or_else(|| bad("no CRLF"))?;
    let text = std::str::from_utf8(text).map_err(|_| bad("not ASCII"))?;
    let mut parts = text.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(bad("no PROXY keyword"));
    }
    let family = parts.next().ok_or_else(|| bad("no protocol"))?;
    if family == "UNKNOWN" {
        return Ok(Header::Local);
    }
    let v6 = match family {
        "TCP4" => false,
        "TCP6" => true,
        other => return Err(bad(&format!("protocol {other:?} (TCP4, TCP6 or UNKNOWN)"))),
    };
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(bad("expected source, destination and two ports"));
    };
    let ip = |s: &str| -> Result<IpAddr, Error> {
        let ip: IpAddr = s.parse().map_err(|_| bad(&format!("address {s:?}")))?;
        if ip.is_ipv6() != v6 {
            return Err(bad(&format!("address {s:?} is not {family}")));
        }
        Ok(ip)
    };
    let port = |s: &str| -> Result<u16, Error> {
        // No sign, no leading zero (the specification's form).
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0')) {
            return Err(bad(&format!("port {s:?}")));
        }
        s.parse().map_err(|_| bad(&format!("port {s:?}")))
    };
    Ok(Header::Proxied { src: SocketAddr::new(ip(src)?, port(sport)?), dst: SocketAddr::new(ip(dst)?, port(dport)?) })
}

/// A v2 header: its 16 fixed bytes and the `len` bytes after them.
pub fn parse_v2(head: &[u8; 16], body: &[u8]) -> Result<Header, Error> {
    let bad = |why: String| Error::Malformed(format!("v2: {why}"));
    let (version, command) = (head[12] >> 4, head[12] & 0xf);
    if version != 2 {
        return Err(bad(format!("version {version}")));
    }
    match command {
        0 => return Ok(Header::Local),
        1 => {}
        c => return Err(bad(format!("command {c} (0 LOCAL or 1 PROXY)"))),
    }
    let (family, transport) = (head[13] >> 4, head[13] & 0xf);
    if transport != 1 {
        // Not a stream (UDP, or unspecified): nothing to say about a TCP connection.
        return Ok(Header::Local);
    }
    match family {
        1 if body.len() >= 12 => {
            let a = |i: usize| IpAddr::V4(Ipv4Addr::new(body[i], body[i + 1], body[i + 2], body[i + 3]));
            let p = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
            Ok(Header::Proxied { src: SocketAddr::new(a(0), p(8)), dst: SocketAddr::new(a(4), p(10)) })
        }
        2 if body.len() >= 36 => {
            let a = |i: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&body[i..i + 16]);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            let p = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
            Ok(Header::Proxied { src: SocketAddr::new(a(0), p(32)), dst: SocketAddr::new(a(16), p(34)) })
        }
        1 | 2 => Err(bad(format!("{} bytes, too short for the addresses", body.len()))),
        // AF_UNIX or unspecified: the socket's addresses stand.
        _ => Ok(Header::Local),
    }
}

/// The header that tells a backend about a connection from `src` to `dst`.
/// Mixed families are both written as IPv6 (IPv4-mapped).
pub fn encode(version: Version, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = match (src, dst) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => (src, dst),
        _ => (mapped(src), mapped(dst)),
    };
    match version {
        Version::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!("PROXY {family} {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port()).into_bytes()
        }
        Version::V2 => {
            let mut out = V2_SIG.to_vec();
            out.push(0x21);
            let addrs: Vec<u8> = match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(0x11);
                    [s.octets().as_slice(), &d.octets()].concat()
                }
                (s, d) => {
                    out.push(0x21);
                    [v6(s).octets().as_slice(), &v6(d).octets()].concat()
                }
            };
            let len = (addrs.len() + 4) as u16;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&addrs);
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
            out
        }
    }
}

/// The header of a connection the gateway makes on its own behalf (an
/// active health check): v2 LOCAL, v1 UNKNOWN. A backend that requires a
/// header accepts it and keeps the socket's addresses.
pub fn encode_local(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        Version::V2 => {
            let mut out = V2_SIG.to_vec();
            // Version 2, command LOCAL; family unspecified; no addresses.
            out.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
            out
        }
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

fn mapped(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(v6(a.ip())), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn local_headers_parse_as_local() {
        assert_eq!(parse_v1(&encode_local(Version::V1)), Ok(Header::Local));
        let v2 = encode_local(Version::V2);
        let head: [u8; 16] = v2[..16].try_into().unwrap();
        assert_eq!(v2.len(), 16);
        assert_eq!(parse_v2(&head, &v2[16..]), Ok(Header::Local));
    }

    #[test]
    fn v1_lines_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_v1(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"),
            Ok(Header::Proxied { src: a("192.0.2.1:56324"), dst: a("198.51.100.2:443") })
        );
        assert_eq!(
            parse_v1(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n"),
            Ok(Header::Proxied { src: a("[2001:db8::1]:1"), dst: a("[2001:db8::2]:65535") })
        );
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n"), Ok(Header::Local));
        assert_eq!(parse_v1(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"), Ok(Header::Local));
        for bad in [
            &b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\n"[..],
            b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 056324 443\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 443\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n",
            b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n",
        ] {
            assert!(matches!(parse_v1(bad), Err(Error::Malformed(_))), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn what_is_encoded_parses_back() {
        for (src, dst) in [
            (a("192.0.2.1:56324"), a("198.51.100.2:443")),
            (a("[2001:db8::1]:1"), a("[2001:db8::2]:65535")),
            (a("192.0.2.1:7"), a("[2001:db8::2]:8")),
        ] {
            let want = match (src, dst) {
                (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => (src, dst),
                _ => (mapped(src), mapped(dst)),
            };
            let line = encode(Version::V1, src, dst);
            assert!(line.len() <= V1_MAX);
            assert_eq!(parse_v1(&line), Ok(Header::Proxied { src: want.0, dst: want.1 }));
            let bin = encode(Version::V2, src, dst);
            let head: [u8; 16] = bin[..16].try_into().unwrap();
            assert_eq!(usize::from(u16::from_be_bytes([head[14], head[15]])), bin.len() - 16);
            assert_eq!(parse_v2(&head, &bin[16..]), Ok(Header::Proxied { src: want.0, dst: want.1 }));
        }
    }

    #[test]
    fn v2_local_other_families_and_short_bodies() {
        let mut head = [0u8; 16];
        head[..12].copy_from_slice(&V2_SIG);
        head[12] = 0x20;
        assert_eq!(parse_v2(&head, &[]), Ok(Header::Local));
        head[12] = 0x21;
        head[13] = 0x31; // AF_UNIX stream
        assert_eq!(parse_v2(&head, &[0; 216]), Ok(Header::Local));
        head[13] = 0x11;
        assert!(matches!(parse_v2(&head, &[0; 11]), Err(Error::Malformed(_))));
        // TLVs after the addresses are skipped.
        let mut body = vec![192, 0, 2, 1, 198, 51, 100, 2, 0, 80, 1, 187];
        body.extend_from_slice(&[0x04, 0x00, 0x01, 0x00]);
        assert_eq!(parse_v2(&head, &body), Ok(Header::Proxied { src: a("192.0.2.1:80"), dst: a("198.51.100.2:443") }));
        head[12] = 0x31;
        assert!(matches!(parse_v2(&head, &body), Err(Error::Malformed(_))));
        head[12] = 0x22;
        assert!(matches!(parse_v2(&head, &body), Err(Error::Malformed(_))));
    }
}
