//! Supervises a flow spliced in the kernel.
//!
//! The verdict moves the payload; this task only handles what the verdict
//! does not:
//! - bytes that arrived before the splice (one read per socket makes the
//!   kernel run the verdict on them) and bytes passed to user space while the
//!   flow was being enabled (copied here, before any redirect, so order holds);
//! - FIN: the redirect does not carry it, so when a side reaches EOF the FIN is
//!   sent to the peer once every byte before it is in the peer's send queue;
//! - RST and errors: the peer is reset;
//! - `idle_timeout`, from the verdict's last-byte timestamps.
use std::{io, os::fd::AsRawFd, time::Duration};

use tokio::net::TcpStream;

use crate::{
    flows::{CloseCause, Flow, Side},
    kernel::{KernelPath, Splice},
    sys,
};

struct End<'a> {
    side: Side,
    sock: &'a TcpStream,
    /// Slot counting the bytes received on this socket.
    slot: u32,
    /// Read EOF on this socket.
    eof: bool,
    /// Forwarded that EOF as a FIN to the peer.
    fin_forwarded: bool,
    /// Bytes user space wrote from this socket to the peer after the splice.
    user_written: u64,
    /// The peer's "everything queued for sending" counter at the splice.
    peer_base: u64,
}

enum Step {
    Continue,
    Done(CloseCause),
}

pub async fn run(
    kernel: &KernelPath,
    splice: &Splice,
    client: &TcpStream,
    backend: &TcpStream,
    flow: &Flow,
    idle: Duration,
) -> CloseCause {
    let mut c = End {
        side: Side::Client,
        sock: client,
        slot: splice.client_slot,
        eof: false,
        fin_forwarded: false,
        user_written: 0,
        peer_base: splice.backend_sent_base,
    };
    let mut b = End {
        side: Side::Backend,
        sock: backend,
        slot: splice.backend_slot,
        eof: false,
        fin_forwarded: false,
        user_written: 0,
        peer_base: splice.client_sent_base,
    };
    let spliced_ns = sys::monotonic_ns();
    let mut first_eof: Option<Side> = None;
    let idle_tick = idle.min(Duration::from_secs(1)).max(Duration::from_millis(20));

    // Bytes queued before the sockets entered the map wait until the socket
    // is read; this read makes the kernel run the verdict on them.
    for end in [&mut c, &mut b] {
        let peer = if end.side == Side::Client { backend } else { client };
        if let Step::Done(cause) = on_readable(kernel, end, peer, flow).await {
            return cause;
        }
    }

    loop {
        let fin_pending = (c.eof && !c.fin_forwarded) || (b.eof && !b.fin_forwarded);
        let any_eof = c.eof || b.eof;
        let wait = if fin_pending {
            Duration::from_millis(1)
        } else if any_eof {
            Duration::from_millis(50).min(idle_tick)
        } else {
            idle_tick
        };
        let step = tokio::select! {
            r = client.readable(), if !c.eof => match r {
                Ok(()) => on_readable(kernel, &mut c, backend, flow).await,
                Err(e) => Step::Done(reset(client, backend, Side::Client, &e)),
            },
            r = backend.readable(), if !b.eof => match r {
                Ok(()) => on_readable(kernel, &mut b, client, flow).await,
                Err(e) => Step::Done(reset(client, backend, Side::Backend, &e)),
            },
            () = tokio::time::sleep(wait) => Step::Continue,
        };
        if let Step::Done(cause) = step {
            return cause;
        }
        for (end, peer) in [(&mut c, backend), (&mut b, client)] {
            if end.eof && first_eof.is_none() {
                first_eof = Some(end.side);
            }
            if end.eof && !end.fin_forwarded && drained(kernel, end, peer) {
                if let Err(e) = sys::shutdown_write(peer) {
                    return reset(client, backend, end.side, &e);
                }
                end.fin_forwarded = true;
                tracing::debug!(side = %end.side, "FIN forwarded");
            } else if end.eof && !end.fin_forwarded {
                let slot = kernel.slot(end.slot);
                tracing::trace!(side = %end.side, redirected = slot.redirected, user = end.user_written,
                    queued = sys::bytes_queued_total(peer).unwrap_or(0).saturating_sub(end.peer_base), "FIN waits for the peer to drain");
            }
        }
        if c.fin_forwarded && b.fin_forwarded {
            return CloseCause::Closed { first: first_eof.unwrap_or(Side::Client) };
        }
        // A socket at EOF is always readable, so it is not polled any more;
        // notice a later RST from its state instead.
        for (end, fin_sent_into_it) in [(&c, b.fin_forwarded), (&b, c.fin_forwarded)] {
            if end.eof {
                if let Some(e) = broken(end.sock, fin_sent_into_it) {
                    return reset(client, backend, end.side, &e);
                }
            }
        }
        let last = kernel
            .slot(c.slot)
            .last_ns
            .max(kernel.slot(b.slot).last_ns)
            .max(spliced_ns)
            .max(flow.user_last_ns.load(std::sync::atomic::Ordering::Relaxed));
        if sys::monotonic_ns().saturating_sub(last) >= idle.as_nanos() as u64 {
            return CloseCause::IdleTimeout;
        }
    }
}

/// Reads what the socket has for user space: EOF, an error, or bytes the
/// verdict passed instead of redirecting (only while the flow was enabled).
async fn on_readable(kernel: &KernelPath, end: &mut End<'_>, peer: &TcpStream, flow: &Flow) -> Step {
    let mut buf = Vec::new();
    loop {
        if buf.is_empty() {
            buf = vec![0u8; 64 * 1024];
        }
        match end.sock.try_read(&mut buf) {
            Ok(0) => {
                tracing::debug!(side = %end.side, "EOF");
                end.eof = true;
                return Step::Continue;
            }
            Ok(n) => {
                if let Err(e) = write_all(peer, &buf[..n]).await {
                    let other = if end.side == Side::Client { Side::Backend } else { Side::Client };
                    return Step::Done(reset(end.sock, peer, other, &e));
                }
                end.user_written += n as u64;
                kernel.add_user_forwarded(end.slot, n as u64);
                flow.add_user(end.side, n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Step::Done(reset(end.sock, peer, end.side, &e)),
        }
    }
}

async fn write_all(sock: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        sock.writable().await?;
        match sock.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// True once every byte received on `end` before its EOF is in the peer's
/// send queue, so a FIN queued now goes out after them.
fn drained(kernel: &KernelPath, end: &End<'_>, peer: &TcpStream) -> bool {
    let slot = kernel.slot(end.slot);
    let expected = slot.redirected + end.user_written;
    match sys::bytes_queued_total(peer) {
        Ok(total) => total.saturating_sub(end.peer_base) >= expected,
        // The peer is gone; nothing more can be delivered.
        Err(_) => true,
    }
}

/// An RST sets the socket error. A socket that saw FIN both ways also ends up
/// in CLOSE (its TIME_WAIT lives on without it), which is not an error.
fn broken(sock: &TcpStream, fin_sent_into_it: bool) -> Option<io::Error> {
    if let Ok(Some(e)) = sys::take_error(sock) {
        return Some(e);
    }
    match sys::tcp_info(sock) {
        Ok(i) if i.state == sys::TCP_CLOSE && !fin_sent_into_it => {
            Some(io::Error::new(io::ErrorKind::ConnectionAborted, "socket closed without FIN exchange"))
        }
        _ => None,
    }
}

/// Resets both sockets (SO_LINGER 0; the close that follows sends RST).
fn reset(a: &TcpStream, b: &TcpStream, by: Side, why: &io::Error) -> CloseCause {
    tracing::debug!(side = %by, "resetting the flow: {why}");
    sys::set_linger_zero(a.as_raw_fd());
    sys::set_linger_zero(b.as_raw_fd());
    CloseCause::Reset { by }
}
