//! Byte streams a test can check: numbered patterns, echo exchanges, reads
//! to EOF, and resets.
use std::{
    io::{self, Read, Write},
    net::{Shutdown, TcpStream},
    os::fd::AsRawFd,
    thread,
    time::Duration,
};

/// Deterministic pseudo-random bytes, addressable by offset, so a stream can be
/// generated and checked piecewise without holding it in memory.
#[derive(Clone, Copy)]
pub struct Pattern(pub u64);

impl Pattern {
    fn word(&self, i: u64) -> u64 {
        // splitmix64
        let mut z = self.0.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        for (k, b) in buf.iter_mut().enumerate() {
            let pos = offset + k as u64;
            *b = self.word(pos / 8).to_le_bytes()[(pos % 8) as usize];
        }
    }

    /// Writes `len` bytes of the pattern.
    pub fn send(&self, w: &mut impl Write, len: u64) -> io::Result<()> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            self.fill(off, &mut buf[..n]);
            w.write_all(&buf[..n])?;
            off += n as u64;
        }
        Ok(())
    }

    /// Reads exactly `len` bytes and checks them against the pattern; with
    /// `expect_eof`, also checks that the stream ends right after them.
    pub fn expect(&self, r: &mut impl Read, len: u64, expect_eof: bool) -> Result<(), String> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut want = vec![0u8; 256 * 1024];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            let got = r.read(&mut buf[..n]).map_err(|e| format!("read failed at byte {off} of {len}: {e}"))?;
            if got == 0 {
                return Err(format!("stream ended at byte {off} of {len}"));
            }
            self.fill(off, &mut want[..got]);
            if buf[..got] != want[..got] {
                let i = (0..got).find(|&i| buf[i] != want[i]).unwrap();
                return Err(format!("byte {} differs (stream of {len})", off + i as u64));
            }
            off += got as u64;
        }
        if expect_eof {
            match r.read(&mut buf[..1]) {
                Ok(0) => {}
                Ok(_) => return Err(format!("extra bytes after the {len} expected")),
                Err(e) => return Err(format!("expected EOF after {len} bytes, got {e}")),
            }
        }
        Ok(())
    }
}

pub fn echo_conn(s: &mut TcpStream) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            s.shutdown(Shutdown::Write)?;
            return Ok(total);
        }
        s.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Sends `len` pattern bytes on a clone of `s` from another thread, checks the
/// `len` echoed bytes, then half-closes and expects EOF.
pub fn echo_roundtrip(s: &TcpStream, pattern: Pattern, len: u64) -> Result<(), String> {
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || -> io::Result<()> {
        pattern.send(&mut w, len)?;
        w.shutdown(Shutdown::Write)
    });
    let mut r = s.try_clone().unwrap();
    let res = pattern.expect(&mut r, len, true);
    writer.join().unwrap().map_err(|e| format!("send failed: {e}"))?;
    res
}

/// Reads until EOF or error, returning what ended the stream.
pub fn read_until_closed(s: &mut TcpStream, limit: Duration) -> io::Result<usize> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(e) => return Err(e),
        }
    }
}

/// `SO_LINGER {on, 0}`: closing the socket then sends RST.
pub fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: l is a valid linger struct for the size given.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_LINGER: {}", io::Error::last_os_error());
}
