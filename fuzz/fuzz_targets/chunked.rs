//! Drives a `Gate` over bytes that arrive in chunks of the input's choosing
//! and are read into buffers of its choosing, and checks what the gate
//! says against the frame boundaries the target knows.
use std::{
    pin::Pin,
    task::{Context, Poll, Waker},
};

use gateway::fuzzing::{Framing, Gate};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream that hands out `wire` in the chunk sizes `sizes` gives, cycling.
struct Chunks {
    wire: Vec<u8>,
    at: usize,
    sizes: Vec<usize>,
    next: usize,
}

impl AsyncRead for Chunks {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let s = &mut *self;
        let size = s.sizes[s.next % s.sizes.len()];
        s.next += 1;
        let n = size.min(s.wire.len() - s.at).min(out.remaining());
        out.put_slice(&s.wire[s.at..s.at + n]);
        s.at += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Chunks {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Reads `wire` through a gate (`early` of it already held, the rest in
/// chunks), checking after every read that no read crossed a frame end in
/// `ends`, that the reader got every byte in order, and that `resting` is
/// true exactly at the ends in `resting_at` (and at the start).
pub fn drive<F: Framing>(wire: &[u8], early: usize, chunks: &[u8], reads: &[u8], ends: &[usize], resting_at: &[usize]) {
    let sizes: Vec<usize> = chunks.iter().map(|&c| usize::from(c) * 37 % 4099 + 1).collect();
    let sizes = if sizes.is_empty() { vec![4096] } else { sizes };
    let early = early.min(wire.len());
    let inner = Chunks { wire: wire[early..].to_vec(), at: 0, sizes, next: 0 };
    let mut gate = Gate::<F>::new(Box::new(inner), &wire[..early]);
    let mut cx = Context::from_waker(Waker::noop());
    let mut got = Vec::with_capacity(wire.len());
    let mut k = 0;
    let mut empty_reads = 0;
    while got.len() < wire.len() {
        let size = reads.get(k % reads.len().max(1)).map_or(4096, |&r| usize::from(r) * 53 % 8192 + 1);
        k += 1;
        let mut buf = vec![0u8; size];
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut gate).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) => {}
            other => panic!("the gate over a ready stream gave {other:?}"),
        }
        let n = rb.filled().len();
        let (from, to) = (got.len(), got.len() + n);
        got.extend_from_slice(rb.filled());
        if n == 0 {
            // The stream hands out at least a byte a read while it has any.
            empty_reads += 1;
            assert!(empty_reads < 3, "no progress at byte {from} of {}", wire.len());
            continue;
        }
        empty_reads = 0;
        if let Some(e) = ends.iter().find(|&&e| e > from && e < to) {
            panic!("one read of bytes {from}..{to} crossed the frame end at {e}");
        }
        let want = resting_at.binary_search(&to).is_ok();
        assert_eq!(gate.resting(), want, "resting after byte {to} (frame ends {ends:?})");
    }
    assert!(got == wire, "the bytes read differ from the bytes sent");
}
