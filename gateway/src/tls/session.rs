//! TLS sessions that move to another process at a hot upgrade.
//!
//! rustls can't rebuild a connection in another process, and this host has
//! no kTLS to hand a session to. After the handshake, though, a TLS session
//! is only its record protection: an AEAD key, an IV and a sequence number
//! each way (RFC 8446 section 5; RFC 5288 and 7905 for TLS 1.2). So:
//! - every TLS stream here reads through a [`Gate`] with [`Records`]
//!   framing, which hands rustls one record at a time;
//! - at a quiet moment (whole records handed on and processed, no plaintext
//!   waiting, nothing to send) [`Conn::park`] takes the socket and the
//!   traffic keys out of rustls (`dangerous_extract_secrets`, which needs
//!   `enable_secret_extraction` on the configs);
//! - the next process goes on with [`Resumed`], a record layer on `ring`'s
//!   AEADs: application data each way, close_notify, and the server's
//!   session tickets ignored. A KeyUpdate after the move ends the session
//!   with an error: the traffic secret it needs is not part of the keys.
//!
//! The keys travel over the admin socket (root-only unless configured
//! otherwise) to the process that takes the flows.
use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    pin::Pin,
    sync::{atomic::AtomicBool, Arc},
    task::{ready, Context, Poll},
};

use hyper_util::rt::TokioIo;
use ring::aead;
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::util::gate::{Framing, Gate};

/// TLS record boundaries: a 5-byte header, then the length it names.
#[derive(Default)]
pub struct Records {
    head: [u8; 5],
    have: usize,
    left: u64,
}

impl Framing for Records {
    fn allowed(&self, ahead: &[u8]) -> u64 {
        if self.resting() && ahead.len() >= 5 {
            return 5 + u64::from(u16::from_be_bytes([ahead[3], ahead[4]]));
        }
        self.step()
    }

    fn pass(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = bytes.len().min(usize::try_from(self.step()).unwrap_or(usize::MAX));
            let (now, rest) = bytes.split_at(n);
            if self.left > 0 {
                self.left -= n as u64;
            } else {
                self.head[self.have..self.have + n].copy_from_slice(now);
                self.have += n;
                if self.have == 5 {
                    self.have = 0;
                    self.left = u64::from(u16::from_be_bytes([self.head[3], self.head[4]]));
                }
            }
            bytes = rest;
        }
    }

    fn resting(&self) -> bool {
        self.have == 0 && self.left == 0
    }
}

impl Records {
    /// The bytes up to the end of the header or payload under way.
    fn step(&self) -> u64 {
        if self.left > 0 {
            self.left
        } else {
            (5 - self.have) as u64
        }
    }
}

/// A TLS session terminated here (client side of a listener with `tls`).
pub type ServerTls = tokio_rustls::server::TlsStream<Gate<Records>>;
/// A TLS session originated here (`backend_tls`).
pub type ClientTls = tokio_rustls::client::TlsStream<Gate<Records>>;

/// Largest TLS plaintext fragment (RFC 8446 section 5.1).
const MAX_FRAGMENT: usize = 16 * 1024;
/// Largest record payload accepted: fragment, content type, padding, tag.
const MAX_CIPHERTEXT: usize = MAX_FRAGMENT + 256;
const TAG: usize = 16;
/// Records one AES-GCM key may seal (rustls's confidentiality limit).
const AES_GCM_RECORDS: u64 = 1 << 24;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const NEW_SESSION_TICKET: u8 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Cipher {
    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Cipher::Aes128Gcm => &aead::AES_128_GCM,
            Cipher::Aes256Gcm => &aead::AES_256_GCM,
            Cipher::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }
}

/// One direction's record protection.
#[derive(Clone, Serialize, Deserialize)]
pub struct Direction {
    /// Hex.
    key: String,
    /// Hex, 12 bytes.
    iv: String,
    seq: u64,
}

/// A session's record protection both ways, as it moves between processes.
#[derive(Clone, Serialize, Deserialize)]
pub struct Keys {
    pub tls13: bool,
    pub cipher: Cipher,
    tx: Direction,
    rx: Direction,
}

#[cfg(feature = "fuzzing")]
impl Keys {
    /// Whether both directions' keys and IVs have the cipher's lengths.
    pub(crate) fn check(&self) -> Result<(), MoveError> {
        Sealing::new(self.cipher, &self.tx)?;
        Sealing::new(self.cipher, &self.rx)?;
        Ok(())
    }
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys {{ tls13: {}, cipher: {:?}, (secrets left out) }}", self.tls13, self.cipher)
    }
}

/// A parked TLS session: its keys and the ciphertext read but not opened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParkedTls {
    pub keys: Keys,
    /// Hex.
    pub early: String,
}

/// A flow side between two bytes: its socket and, over TLS, its session.
pub struct Parked {
    pub tcp: std::net::TcpStream,
    pub tls: Option<ParkedTls>,
}

/// Why a TLS session could not leave rustls, or be taken up again from
/// its keys (a hot upgrade).
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("TLS version {0:?} can't move")]
    Version(Option<ProtocolVersion>),
    #[error("a cipher other than AES-GCM or ChaCha20-Poly1305 can't move")]
    Cipher,
    #[error("rustls did not give the traffic keys: {0}")]
    Secrets(#[source] rustls::Error),
    #[error("the stream under the session is not a TCP socket")]
    NotTcp,
    #[error("the socket: {0}")]
    Socket(#[from] io::Error),
    /// Keys or carried bytes that do not decode, or have the wrong length.
    #[error("bad key material: {0}")]
    Keys(String),
}

pub(crate) fn keys_of(version: Option<ProtocolVersion>, s: rustls::ExtractedSecrets) -> Result<Keys, MoveError> {
    let tls13 = match version {
        Some(ProtocolVersion::TLSv1_3) => true,
        Some(ProtocolVersion::TLSv1_2) => false,
        v => return Err(MoveError::Version(v)),
    };
    let dir = |(seq, secrets): (u64, ConnectionTrafficSecrets)| -> Result<(Cipher, Direction), MoveError> {
        let (cipher, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (Cipher::Chacha20Poly1305, key, iv),
            _ => return Err(MoveError::Cipher),
        };
        let hex = crate::util::hex::to_hex;
        Ok((cipher, Direction { key: hex(key.as_ref()), iv: hex(iv.as_ref()), seq }))
    };
    let (cipher, tx) = dir(s.tx)?;
    let (_, rx) = dir(s.rx)?;
    Ok(Keys { tls13, cipher, tx, rx })
}

/// Whether a rustls session holds nothing: whole records handed on and
/// processed, no plaintext waiting, nothing to send, no close_notify seen.
fn rustls_quiet<D>(gate: &Gate<Records>, conn: &mut rustls::ConnectionCommon<D>) -> bool {
    if !gate.resting() {
        return false;
    }
    // Processing may queue a record to send (an answer): checked after it.
    match conn.process_new_packets() {
        Ok(io) => io.plaintext_bytes_to_read() == 0 && io.tls_bytes_to_write() == 0 && !io.peer_has_closed(),
        Err(_) => false,
    }
}

/// The TCP socket under a gate, and the bytes the gate still holds.
fn tcp_of(gate: Gate<Records>) -> Result<(std::net::TcpStream, Vec<u8>), MoveError> {
    let (io, early) = gate.into_parts();
    let tcp = io.into_any().downcast::<TcpStream>().map_err(|_| MoveError::NotTcp)?;
    Ok((tcp.into_std()?, early))
}

/// The socket, the traffic keys and the ciphertext a rustls session's gate
/// still holds.
fn take_session(
    gate: Gate<Records>,
    conn: rustls::Connection,
) -> Result<(std::net::TcpStream, Keys, Vec<u8>), MoveError> {
    let version = conn.protocol_version();
    let secrets = conn.dangerous_extract_secrets().map_err(MoveError::Secrets)?;
    let (tcp, early) = tcp_of(gate)?;
    Ok((tcp, keys_of(version, secrets)?, early))
}

/// One side of a flow relayed in user space.
pub enum Conn {
    Plain(TcpStream),
    Server(Box<ServerTls>, RawFd),
    Client(Box<ClientTls>, RawFd),
    Resumed(Box<Resumed>),
    /// A stream of a multiplexed connection (a WebSocket over HTTP/2): no
    /// socket of its own, and it never moves.
    Stream(Box<TokioIo<hyper::upgrade::Upgraded>>),
}

impl Conn {
    pub fn server(s: ServerTls, fd: RawFd) -> Self {
        Conn::Server(Box::new(s), fd)
    }

    pub fn client(s: ClientTls, fd: RawFd) -> Self {
        Conn::Client(Box::new(s), fd)
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self, Conn::Plain(_))
    }

    /// The TCP socket under it (an error resets through it); none under a
    /// stream, whose connection carries other streams.
    pub fn fd(&self) -> Option<RawFd> {
        match self {
            Conn::Plain(s) => Some(s.as_raw_fd()),
            Conn::Server(_, fd) | Conn::Client(_, fd) => Some(*fd),
            Conn::Resumed(r) => Some(r.tcp.as_raw_fd()),
            Conn::Stream(_) => None,
        }
    }

    /// The protocol ALPN agreed on a TLS connection from a client.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            Conn::Server(s, _) => s.get_ref().1.alpn_protocol(),
            _ => None,
        }
    }

    /// Set while a rustls session's gate is between records, for a relay
    /// that holds the stream split; `None` where nothing can sit half-read.
    pub fn resting_flag(&self) -> Option<Arc<AtomicBool>> {
        match self {
            Conn::Server(s, _) => Some(s.get_ref().0.resting_flag()),
            Conn::Client(s, _) => Some(s.get_ref().0.resting_flag()),
            Conn::Plain(_) | Conn::Resumed(_) | Conn::Stream(_) => None,
        }
    }

    /// Whether [`Conn::park`] can take it now without losing a byte.
    pub fn quiet(&mut self) -> bool {
        match self {
            Conn::Plain(_) => true,
            Conn::Server(s, _) => {
                let (gate, conn) = s.get_mut();
                rustls_quiet(gate, conn)
            }
            Conn::Client(s, _) => {
                let (gate, conn) = s.get_mut();
                rustls_quiet(gate, conn)
            }
            Conn::Resumed(r) => r.quiet(),
            Conn::Stream(_) => false,
        }
    }

    /// Takes the socket and the session out (only once [`Conn::quiet`]).
    pub fn park(self) -> Result<Parked, MoveError> {
        let (tcp, keys, early) = match self {
            Conn::Plain(s) => return Ok(Parked { tcp: s.into_std()?, tls: None }),
            Conn::Server(s, _) => {
                let (gate, conn) = s.into_inner();
                take_session(gate, conn.into())?
            }
            Conn::Client(s, _) => {
                let (gate, conn) = s.into_inner();
                take_session(gate, conn.into())?
            }
            Conn::Resumed(r) => {
                let keys = r.keys();
                let early = r.rbuf;
                (r.tcp.into_std()?, keys, early)
            }
            Conn::Stream(_) => return Err(MoveError::NotTcp),
        };
        Ok(Parked { tcp, tls: Some(ParkedTls { keys, early: crate::util::hex::to_hex(&early) }) })
    }

    /// Goes on with a parked side (needs the runtime, for the socket).
    pub fn resume(p: Parked) -> Result<Conn, MoveError> {
        let tcp = TcpStream::from_std(p.tcp)?;
        match p.tls {
            None => Ok(Conn::Plain(tcp)),
            Some(t) => {
                let early = crate::util::hex::from_hex(&t.early).map_err(MoveError::Keys)?;
                Ok(Conn::Resumed(Box::new(Resumed::new(tcp, &t.keys, early)?)))
            }
        }
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut *$self {
            Conn::Plain($s) => $e,
            Conn::Server($s, _) => $e,
            Conn::Client($s, _) => $e,
            Conn::Resumed($s) => $e,
            Conn::Stream($s) => $e,
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// One direction of a resumed session.
struct Sealing {
    key: aead::LessSafeKey,
    raw: Vec<u8>,
    iv: [u8; 12],
    seq: u64,
}

impl Sealing {
    fn new(cipher: Cipher, d: &Direction) -> Result<Self, MoveError> {
        let raw = crate::util::hex::from_hex(&d.key).map_err(MoveError::Keys)?;
        let iv: [u8; 12] = crate::util::hex::from_hex(&d.iv)
            .map_err(MoveError::Keys)?
            .try_into()
            .map_err(|_| MoveError::Keys("the IV is not 12 bytes".into()))?;
        let key = aead::UnboundKey::new(cipher.algorithm(), &raw)
            .map_err(|_| MoveError::Keys("a key of the wrong length".into()))?;
        Ok(Sealing { key: aead::LessSafeKey::new(key), raw, iv, seq: d.seq })
    }

    /// The IV with the sequence number XORed into its last 8 bytes.
    fn nonce(&self) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    fn direction(&self) -> Direction {
        let hex = crate::util::hex::to_hex;
        Direction { key: hex(&self.raw), iv: hex(&self.iv), seq: self.seq }
    }
}

/// TLS 1.2's additional data: sequence, type, version, plaintext length.
fn aad12(seq: u64, typ: u8, len: usize) -> [u8; 13] {
    let mut a = [0u8; 13];
    a[..8].copy_from_slice(&seq.to_be_bytes());
    a[8] = typ;
    a[9..11].copy_from_slice(&[3, 3]);
    a[11..].copy_from_slice(&(len as u16).to_be_bytes());
    a
}

fn bad(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// A TLS session carried on from the keys of another process: the record
/// layer only.
pub struct Resumed {
    tcp: TcpStream,
    tls13: bool,
    cipher: Cipher,
    tx: Sealing,
    rx: Sealing,
    /// Ciphertext read, not yet opened.
    rbuf: Vec<u8>,
    plain: Vec<u8>,
    plain_off: usize,
    /// Records sealed, not yet written.
    wbuf: Vec<u8>,
    wbuf_off: usize,
    read_closed: bool,
    shut: bool,
}

impl Resumed {
    pub fn new(tcp: TcpStream, keys: &Keys, early: Vec<u8>) -> Result<Self, MoveError> {
        Ok(Resumed {
            tcp,
            tls13: keys.tls13,
            cipher: keys.cipher,
            tx: Sealing::new(keys.cipher, &keys.tx)?,
            rx: Sealing::new(keys.cipher, &keys.rx)?,
            rbuf: early,
            plain: Vec::new(),
            plain_off: 0,
            wbuf: Vec::new(),
            wbuf_off: 0,
            read_closed: false,
            shut: false,
        })
    }

    fn keys(&self) -> Keys {
        Keys { tls13: self.tls13, cipher: self.cipher, tx: self.tx.direction(), rx: self.rx.direction() }
    }

    fn quiet(&self) -> bool {
        self.plain_off == self.plain.len() && self.wbuf_off == self.wbuf.len() && !self.read_closed && !self.shut
    }

    /// Appends one record of `typ` carrying `data` (at most a fragment).
    fn seal(&mut self, typ: u8, data: &[u8]) -> io::Result<()> {
        let tx = &mut self.tx;
        let nonce = aead::Nonce::assume_unique_for_key(tx.nonce());
        let sealed = |payload: &mut Vec<u8>, aad: &[u8]| {
            tx.key.seal_in_place_append_tag(nonce, aead::Aad::from(aad), payload).map_err(|_| bad("TLS seal failed"))
        };
        if self.tls13 {
            let mut payload = Vec::with_capacity(data.len() + 1 + TAG);
            payload.extend_from_slice(data);
            payload.push(typ);
            let len = (payload.len() + TAG) as u16;
            let head = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
            sealed(&mut payload, &head)?;
            self.wbuf.extend_from_slice(&head);
            self.wbuf.extend_from_slice(&payload);
        } else {
            let aad = aad12(tx.seq, typ, data.len());
            let explicit = self.cipher != Cipher::Chacha20Poly1305;
            let explicit_nonce = tx.nonce();
            let mut payload = data.to_vec();
            sealed(&mut payload, &aad)?;
            let len = (payload.len() + if explicit { 8 } else { 0 }) as u16;
            self.wbuf.extend_from_slice(&[typ, 3, 3, (len >> 8) as u8, len as u8]);
            if explicit {
                self.wbuf.extend_from_slice(&explicit_nonce[4..]);
            }
            self.wbuf.extend_from_slice(&payload);
        }
        tx.seq += 1;
        Ok(())
    }

    /// Opens the first record of `rbuf` if it is whole; false if it is not.
    fn open(&mut self) -> io::Result<bool> {
        if self.rbuf.len() < 5 {
            return Ok(false);
        }
        let len = usize::from(u16::from_be_bytes([self.rbuf[3], self.rbuf[4]]));
        if len > MAX_CIPHERTEXT + 8 {
            return Err(bad(format!("a TLS record of {len} bytes")));
        }
        if self.rbuf.len() < 5 + len {
            return Ok(false);
        }
        let head: [u8; 5] = self.rbuf[..5].try_into().expect("five bytes");
        let mut payload: Vec<u8> = self.rbuf[5..5 + len].to_vec();
        self.rbuf.drain(..5 + len);
        let rx = &mut self.rx;
        let open_err = || bad("a TLS record failed authentication");
        let (typ, content) = if self.tls13 {
            if head[0] != APPLICATION_DATA {
                return Err(bad(format!("an unprotected TLS record (type {})", head[0])));
            }
            let nonce = aead::Nonce::assume_unique_for_key(rx.nonce());
            let plain = rx.key.open_in_place(nonce, aead::Aad::from(head), &mut payload).map_err(|_| open_err())?;
            let end = plain.iter().rposition(|b| *b != 0).ok_or_else(|| bad("a TLS record without a type"))?;
            (plain[end], plain[..end].to_vec())
        } else {
            let explicit = self.cipher != Cipher::Chacha20Poly1305;
            let (nonce, body) = if explicit {
                if payload.len() < 8 + TAG {
                    return Err(bad("a short TLS record"));
                }
                let mut n = rx.iv;
                n[4..].copy_from_slice(&payload[..8]);
                (n, &mut payload[8..])
            } else {
                if payload.len() < TAG {
                    return Err(bad("a short TLS record"));
                }
                (rx.nonce(), &mut payload[..])
            };
            let aad = aad12(rx.seq, head[0], body.len() - TAG);
            let nonce = aead::Nonce::assume_unique_for_key(nonce);
            let plain = rx.key.open_in_place(nonce, aead::Aad::from(aad), body).map_err(|_| open_err())?;
            (head[0], plain.to_vec())
        };
        rx.seq += 1;
        match typ {
            APPLICATION_DATA => self.plain.extend_from_slice(&content),
            ALERT if content.get(1) == Some(&0) => self.read_closed = true,
            ALERT => return Err(bad(format!("the peer sent TLS alert {:?}", content.get(1)))),
            // Session tickets from a backend are of no use to a moved session.
            HANDSHAKE if self.tls13 && content.first() == Some(&NEW_SESSION_TICKET) => {}
            HANDSHAKE => {
                return Err(bad(format!(
                    "a TLS handshake message (type {:?}) after a hot upgrade: key updates and renegotiation are not supported there",
                    content.first()
                )))
            }
            t => return Err(bad(format!("an unexpected TLS record (type {t})"))),
        }
        Ok(true)
    }

    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wbuf_off < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.wbuf[self.wbuf_off..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wbuf_off += n;
        }
        self.wbuf.clear();
        self.wbuf_off = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Resumed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let r = &mut *self;
        loop {
            if r.plain_off < r.plain.len() {
                let n = (r.plain.len() - r.plain_off).min(out.remaining());
                out.put_slice(&r.plain[r.plain_off..r.plain_off + n]);
                r.plain_off += n;
                if r.plain_off == r.plain.len() {
                    r.plain.clear();
                    r.plain_off = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if r.read_closed {
                return Poll::Ready(Ok(()));
            }
            if r.open()? {
                continue;
            }
            let len = r.rbuf.len();
            r.rbuf.resize(len + 2 * MAX_CIPHERTEXT, 0);
            let mut rb = ReadBuf::new(&mut r.rbuf[len..]);
            let polled = Pin::new(&mut r.tcp).poll_read(cx, &mut rb);
            let n = rb.filled().len();
            r.rbuf.truncate(len + n);
            ready!(polled)?;
            if n == 0 {
                // A TCP close without close_notify may be a truncation: as
                // rustls does, an error, never an end.
                let why = if r.rbuf.is_empty() { "TCP closed without close_notify" } else { "a TLS record cut short" };
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, why)));
            }
        }
    }
}

impl AsyncWrite for Resumed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = &mut *self;
        ready!(r.poll_write_out(cx))?;
        if r.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if r.cipher != Cipher::Chacha20Poly1305 && r.tx.seq >= AES_GCM_RECORDS {
            // A key past its safe use; only a KeyUpdate (which needs the
            // traffic secret) would renew it. Close, as rustls does.
            r.seal(ALERT, &[1, 0])?;
            r.shut = true;
            let _ = r.poll_write_out(cx);
            return Poll::Ready(Err(io::Error::other(
                "the moved TLS session used its key for as many records as is safe",
            )));
        }
        let n = buf.len().min(MAX_FRAGMENT);
        r.seal(APPLICATION_DATA, &buf[..n])?;
        // What the socket does not take now goes at the next write or flush.
        if let Poll::Ready(Err(e)) = r.poll_write_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_out(cx))?;
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.seal(ALERT, &[1, 0])?; // close_notify
            self.shut = true;
        }
        ready!(self.poll_write_out(cx))?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    //! A session set up by rustls on one side, parked and carried on by
    //! [`Resumed`] against an untouched rustls peer: every version and
    //! cipher the gateway offers, both roles, data both ways, close_notify.
    use std::{path::Path, sync::Arc};

    use rustls::crypto::ring::{cipher_suite as cs, default_provider};
    use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
    use tokio::{
        io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name)
    }

    fn provider(suite: rustls::SupportedCipherSuite) -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::CryptoProvider { cipher_suites: vec![suite], ..default_provider() })
    }

    fn configs(suite: rustls::SupportedCipherSuite) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(fixture("session.pem")).unwrap().map(Result::unwrap).collect();
        let key = PrivateKeyDer::from_pem_file(fixture("session.key")).unwrap();
        let version = match suite {
            rustls::SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
            rustls::SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
        };
        let mut server = rustls::ServerConfig::builder_with_provider(provider(suite))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs.clone(), key)
            .unwrap();
        server.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(fixture("ca.pem")).unwrap()).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider(suite))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.enable_secret_extraction = true;
        (Arc::new(server), Arc::new(client))
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// `len` bytes from `a` to `b` and back the other way, compared.
    async fn both_ways<A, B>(a: &mut A, b: &mut B, seed: u8, len: usize)
    where
        A: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        for (from_a, data) in [(true, pattern(seed, len)), (false, pattern(seed ^ 0x55, len))] {
            let mut got = vec![0u8; len];
            if from_a {
                let write = async {
                    a.write_all(&data).await.unwrap();
                    a.flush().await.unwrap();
                };
                tokio::join!(write, async { b.read_exact(&mut got).await.unwrap() });
            } else {
                let write = async {
                    b.write_all(&data).await.unwrap();
                    b.flush().await.unwrap();
                };
                tokio::join!(write, async { a.read_exact(&mut got).await.unwrap() });
            }
            assert!(got == data, "bytes differ ({len} bytes, from_a {from_a})");
        }
    }

    /// Parks `conn` (after `quiet`), then resumes it from its parts; with
    /// the length of the ciphertext its gate still held.
    fn move_it(mut conn: Conn) -> (Conn, usize) {
        assert!(conn.quiet(), "not quiet after a whole exchange");
        let parked = conn.park().unwrap();
        let tls = parked.tls.clone().unwrap();
        let held = tls.early.len() / 2;
        // What travels between processes: JSON.
        let tls: ParkedTls = serde_json::from_str(&serde_json::to_string(&tls).unwrap()).unwrap();
        (Conn::resume(Parked { tcp: parked.tcp, tls: Some(tls) }).unwrap(), held)
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn a_parked_session_goes_on_with_resumed_records() {
        let suites = [
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ];
        for suite in suites {
            let name = format!("{:?}", suite.suite());
            let (server_cfg, client_cfg) = configs(suite);
            let sni = ServerName::try_from("session.test").unwrap();

            // The gateway as the TLS server (a listener's `tls`).
            let (c, s) = pair().await;
            let fd = s.as_raw_fd();
            let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg.clone());
            let connector = tokio_rustls::TlsConnector::from(client_cfg.clone());
            let (ours, mut peer) =
                tokio::join!(acceptor.accept(Gate::new(Box::new(s), &[])), connector.connect(sni.clone(), c));
            let (mut ours, peer_ref) = (Conn::server(ours.unwrap(), fd), peer.as_mut().unwrap());
            both_ways(&mut ours, peer_ref, 1, 100_000).await;
            // Two records in one TCP segment: the gate reads both and hands
            // rustls the first; the second moves as ciphertext.
            let (a, b) = (pattern(6, 100), pattern(7, 200));
            let wire = {
                let (_, conn) = peer_ref.get_mut();
                std::io::Write::write_all(&mut conn.writer(), &a).unwrap();
                std::io::Write::write_all(&mut conn.writer(), &b).unwrap();
                let mut wire = Vec::new();
                while conn.wants_write() {
                    conn.write_tls(&mut wire).unwrap();
                }
                wire
            };
            peer_ref.get_mut().0.write_all(&wire).await.unwrap();
            let mut got = vec![0u8; a.len()];
            ours.read_exact(&mut got).await.unwrap();
            assert!(got == a, "{name}");
            let (mut ours, held) = move_it(ours);
            assert!(held > b.len(), "{name}: the gate held {held} bytes of ciphertext, not the second record");
            assert!(matches!(ours, Conn::Resumed(_)), "{name}");
            let mut got = vec![0u8; b.len()];
            ours.read_exact(&mut got).await.unwrap();
            assert!(got == b, "{name}: the record carried over differs");
            both_ways(&mut ours, peer_ref, 2, 300_000).await;
            // Moves again, as at a second upgrade.
            let (mut ours, _) = move_it(ours);
            both_ways(&mut ours, peer_ref, 3, 1000).await;
            // close_notify each way: EOF on both, no error.
            ours.shutdown().await.unwrap();
            let mut rest = Vec::new();
            assert_eq!(peer_ref.read_to_end(&mut rest).await.unwrap(), 0, "{name}");
            peer_ref.shutdown().await.unwrap();
            assert_eq!(ours.read(&mut [0u8; 16]).await.unwrap(), 0, "{name}");

            // The gateway as the TLS client (`backend_tls`).
            let (c, s) = pair().await;
            let fd = c.as_raw_fd();
            let (mut peer, ours) =
                tokio::join!(acceptor.accept(s), connector.connect(sni.clone(), Gate::new(Box::new(c), &[])));
            let (mut ours, peer_ref) = (Conn::client(ours.unwrap(), fd), peer.as_mut().unwrap());
            both_ways(&mut ours, peer_ref, 4, 50_000).await;
            let (mut ours, _) = move_it(ours);
            both_ways(&mut ours, peer_ref, 5, 200_000).await;
            peer_ref.shutdown().await.unwrap();
            assert_eq!(ours.read(&mut [0u8; 16]).await.unwrap(), 0, "{name}");
        }
    }

    /// What a resumed session does with records that are not what they
    /// should be: a flipped bit anywhere, a record cut short before the TCP
    /// close, a length over the limit, a TCP close without close_notify.
    /// Each is an error (never a panic, never plaintext that was not sent).
    #[tokio::test]
    async fn a_resumed_session_refuses_bad_records() {
        let suites = [
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ];
        // The gateway's side moved to `Resumed`, and the peer's next record
        // as it would go on the wire.
        async fn resumed(suite: rustls::SupportedCipherSuite) -> (Conn, TcpStream, Vec<u8>) {
            let (server_cfg, client_cfg) = configs(suite);
            let (c, s) = pair().await;
            let fd = s.as_raw_fd();
            let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
            let connector = tokio_rustls::TlsConnector::from(client_cfg);
            let sni = ServerName::try_from("session.test").unwrap();
            let (ours, peer) = tokio::join!(acceptor.accept(Gate::new(Box::new(s), &[])), connector.connect(sni, c));
            let (mut ours, mut peer) = (Conn::server(ours.unwrap(), fd), peer.unwrap());
            both_ways(&mut ours, &mut peer, 9, 1000).await;
            let (ours, _) = move_it(ours);
            let (tcp, mut conn) = peer.into_inner();
            std::io::Write::write_all(&mut conn.writer(), &pattern(1, 300)).unwrap();
            let mut wire = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut wire).unwrap();
            }
            (ours, tcp, wire)
        }
        async fn read_err(ours: &mut Conn) -> String {
            let mut got = Vec::new();
            match tokio::time::timeout(std::time::Duration::from_secs(10), ours.read_to_end(&mut got)).await {
                Ok(Err(e)) => {
                    assert!(got.is_empty(), "plaintext came out of a bad record: {} bytes", got.len());
                    e.to_string()
                }
                Ok(Ok(n)) => panic!("read {n} bytes to a clean end"),
                Err(_) => panic!("no answer within 10 s"),
            }
        }
        for suite in suites {
            let name = format!("{:?}", suite.suite());
            let (_, _, clean) = resumed(suite).await;
            // Every position of the record, one bit flipped (a sample of
            // positions for speed: header, nonce, body, tag).
            let step = (clean.len() / 12).max(1);
            for at in (5..clean.len()).step_by(step).chain([clean.len() - 1]) {
                let (mut ours, mut tcp, mut wire) = resumed(suite).await;
                wire[at] ^= 0x01;
                tcp.write_all(&wire).await.unwrap();
                tcp.shutdown().await.unwrap();
                let e = read_err(&mut ours).await;
                assert!(e.contains("authentication") || e.contains("record"), "{name}, bit at {at}: {e}");
            }
            // Cut short, then the TCP close.
            let (mut ours, mut tcp, wire) = resumed(suite).await;
            tcp.write_all(&wire[..wire.len() - 3]).await.unwrap();
            tcp.shutdown().await.unwrap();
            assert!(read_err(&mut ours).await.contains("cut short"), "{name}");
            // A length no TLS record may have.
            let (mut ours, mut tcp, _) = resumed(suite).await;
            tcp.write_all(&[23, 3, 3, 0x7f, 0xff]).await.unwrap();
            assert!(read_err(&mut ours).await.contains("bytes"), "{name}");
            // A TCP close with no close_notify: not an end of stream.
            let (mut ours, mut tcp, _) = resumed(suite).await;
            tcp.shutdown().await.unwrap();
            assert!(read_err(&mut ours).await.contains("without close_notify"), "{name}");
        }
    }

    #[test]
    fn records_end_where_their_headers_say() {
        let mut r = Records::default();
        let mut rec = vec![23, 3, 3, 0x01, 0x00];
        rec.extend(std::iter::repeat_n(7u8, 256));
        for chunk in rec.chunks(3) {
            let mut at = 0;
            while at < chunk.len() {
                let n = (chunk.len() - at).min(r.allowed(&chunk[at..]) as usize);
                r.pass(&chunk[at..at + n]);
                at += n;
            }
        }
        assert!(r.resting());
        // A whole record ahead is handed on at once, and only that record.
        let mut two = rec.clone();
        two.extend_from_slice(&rec);
        assert_eq!(r.allowed(&two), rec.len() as u64);
        r.pass(&two[..rec.len()]);
        assert!(r.resting());
        r.pass(&[23, 3]);
        assert!(!r.resting() && r.allowed(&[]) == 3);
    }
}
