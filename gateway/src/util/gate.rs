//! A read buffer that hands on a framed byte stream one frame at a time.
//!
//! tungstenite and rustls keep what they read in buffers of their own, which
//! no API empties. A hot upgrade can only move a flow at a moment when they
//! hold nothing, so they read through a [`Gate`]: it reads from the socket
//! into its own buffer and hands on at most the rest of the current frame
//! (WebSocket frame, TLS record). Once the last frame handed on is whole and
//! processed, everything not yet processed is in the gate, where it can be
//! taken along.
use std::{
    any::Any,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    task::{ready, Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Any byte stream a flow runs over (TCP, or TLS terminated here).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The concrete stream back (a hot upgrade takes the socket out).
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
    fn as_any(&self) -> &(dyn Any + Send);
    fn as_any_mut(&mut self) -> &mut (dyn Any + Send);
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
    fn as_any(&self) -> &(dyn Any + Send) {
        self
    }
    fn as_any_mut(&mut self) -> &mut (dyn Any + Send) {
        self
    }
}

/// Where a stream of frames stands, from the bytes handed on.
pub trait Framing: Default + Unpin + Send + 'static {
    /// How many of the next bytes belong to the current frame: to its end,
    /// seen from the bytes `ahead` (those the gate holds) when they hold
    /// the header of a new one, else to the end of what is known (the
    /// header, or the payload).
    fn allowed(&self, ahead: &[u8]) -> u64;
    /// Takes note of bytes handed on (no more than [`Framing::allowed`]).
    fn pass(&mut self, bytes: &[u8]);
    /// Whether the reader above holds nothing once it has processed what
    /// was handed on.
    fn resting(&self) -> bool;
}

/// Bytes a [`Gate`] reads from its stream at once.
const GATE_READ: usize = 16 << 10;

/// A stream read through a buffer of its own, handed on a frame at a time.
pub struct Gate<F> {
    inner: Box<dyn Io>,
    /// Read from `inner`; `start..end` not handed on yet.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    framing: F,
    /// [`Framing::resting`], for whoever can't reach the gate (a split stream).
    resting: Arc<AtomicBool>,
}

impl<F: Framing> Gate<F> {
    /// A gate whose first bytes are `early` (read before it existed).
    pub fn new(inner: Box<dyn Io>, early: &[u8]) -> Self {
        let mut buf = early.to_vec();
        let end = buf.len();
        buf.resize(end.max(GATE_READ), 0);
        Gate { inner, buf, start: 0, end, framing: F::default(), resting: Arc::new(AtomicBool::new(true)) }
    }

    pub fn resting(&self) -> bool {
        self.framing.resting()
    }

    pub fn resting_flag(&self) -> Arc<AtomicBool> {
        self.resting.clone()
    }

    pub fn inner_mut(&mut self) -> &mut dyn Io {
        &mut *self.inner
    }

    /// The TCP socket read, when that is what the gate reads.
    pub fn tcp_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.inner.as_any().downcast_ref::<tokio::net::TcpStream>().map(AsRawFd::as_raw_fd)
    }

    /// The stream and the bytes read from it that were not handed on.
    pub fn into_parts(self) -> (Box<dyn Io>, Vec<u8>) {
        let left = self.buf[self.start..self.end].to_vec();
        (self.inner, left)
    }
}

impl<F: Framing> AsyncRead for Gate<F> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let g = &mut *self;
        if g.start == g.end {
            g.start = 0;
            g.end = 0;
            g.buf.resize(GATE_READ, 0);
            let mut rb = ReadBuf::new(&mut g.buf);
            ready!(Pin::new(&mut g.inner).poll_read(cx, &mut rb))?;
            g.end = rb.filled().len();
            if g.end == 0 {
                return Poll::Ready(Ok(())); // EOF
            }
        }
        let allowed = usize::try_from(g.framing.allowed(&g.buf[g.start..g.end])).unwrap_or(usize::MAX);
        let n = (g.end - g.start).min(out.remaining()).min(allowed);
        let bytes = &g.buf[g.start..g.start + n];
        out.put_slice(bytes);
        g.framing.pass(bytes);
        g.start += n;
        g.resting.store(g.framing.resting(), Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl<F: Framing> AsyncWrite for Gate<F> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
