//! HTTP heads and WebSocket frames by hand, for peers that must control
//! every byte (a backend that answers slowly, a frame split on purpose).
use std::{
    io::{self, Read},
    net::TcpStream,
};

/// Reads an HTTP head (through the blank line) from `s`; returns it and any
/// bytes read past it.
pub fn read_http_head(s: &mut TcpStream) -> io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the end of the head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The value of header `name` in an HTTP head (case-insensitive).
pub fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// One unfragmented WebSocket frame. Clients mask (RFC 6455 §5.3).
pub fn ws_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n < 65536 => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// Takes one whole frame off `have`, reading from `s` until there is one:
/// its opcode and payload, unmasked if it was masked (so it reads either
/// direction). 64-bit lengths are refused: no peer here sends them.
pub fn next_ws_frame(s: &mut TcpStream, have: &mut Vec<u8>) -> io::Result<(u8, Vec<u8>)> {
    let mut chunk = [0u8; 4096];
    loop {
        if have.len() >= 2 {
            let key_len = if have[1] & 0x80 != 0 { 4 } else { 0 };
            let (hdr, len) = match have[1] & 0x7f {
                126 if have.len() >= 4 => (4, u16::from_be_bytes([have[2], have[3]]) as usize),
                126 => (usize::MAX, 0),
                127 => return Err(io::Error::new(io::ErrorKind::InvalidData, "a 64-bit frame length")),
                n => (2, n as usize),
            };
            if hdr != usize::MAX && have.len() >= hdr + key_len + len {
                let op = have[0] & 0x0f;
                let key = have[hdr..hdr + key_len].to_vec();
                let mut payload: Vec<u8> = have.drain(..hdr + key_len + len).skip(hdr + key_len).collect();
                if !key.is_empty() {
                    payload.iter_mut().enumerate().for_each(|(i, b)| *b ^= key[i % 4]);
                }
                return Ok((op, payload));
            }
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed inside a frame"));
        }
        have.extend_from_slice(&chunk[..n]);
    }
}

/// One frame given the bytes already read: (opcode, payload, the bytes
/// read past it).
pub fn read_ws_frame(s: &mut TcpStream, mut have: Vec<u8>) -> io::Result<(u8, Vec<u8>, Vec<u8>)> {
    let (op, payload) = next_ws_frame(s, &mut have)?;
    Ok((op, payload, have))
}

/// A handshake-valid WebSocket upgrade request head.
pub fn ws_upgrade_request(path: &str, host: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// The `101` a WebSocket server answers `request_head` with.
pub fn ws_accept_response(request_head: &str) -> String {
    let key = header_value(request_head, "sec-websocket-key").expect("Sec-WebSocket-Key");
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n\r\n")
}
