//! The userspace relay: the fallback when a flow can't be spliced in the
//! kernel. Same semantics as the kernel path: half-close is forwarded, a reset
//! on one side resets the other, and `idle_timeout` closes quiet flows.
use std::{
    os::fd::RawFd,
    sync::atomic::{AtomicBool, Ordering::Relaxed},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::{
    flow::table::{CloseCause, Flow, Side, Stopped},
    tls::session::Conn,
    util::sys,
};

/// Copy buffer per direction. 64 KiB or more halves the CPU per byte of the
/// 8 KiB default (see the performance baseline).
pub const BUF_SIZE: usize = 256 * 1024;

/// Copies one direction until EOF, then forwards the half-close. An error
/// names the side at fault: the reading side for a read, the other for a
/// write. `reading` is true while it waits for bytes holding none: a moment
/// when dropping it loses nothing (a read not yet completed leaves the bytes
/// in the socket, or in a TLS session).
async fn pump_marked<R, W>(
    mut from: R,
    mut to: W,
    flow: &Flow,
    side: Side,
    reading: &AtomicBool,
    eof_ok: Option<&EofGuard<'_>>,
) -> Result<(), Side>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let other = if side == Side::Client { Side::Backend } else { Side::Client };
    let mut total = 0u64;
    loop {
        reading.store(true, Relaxed);
        let buf = lent_read(&mut from).await.map_err(|_| side)?;
        let n = buf.len();
        if n == 0 && eof_ok.is_some_and(|ok| !ok(side, total)) {
            // Not the end yet (see `EofGuard`); nothing is held meanwhile.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            continue;
        }
        reading.store(false, Relaxed);
        total += n as u64;
        if n == 0 {
            // Forward the half-close (close_notify on TLS); the other
            // direction keeps going.
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf).await.map_err(|_| other)?;
        give_back(buf);
        // A no-op on TCP; TLS writers buffer a record until flushed.
        to.flush().await.map_err(|_| other)?;
        flow.add_user(side, n as u64);
    }
}

/// Copy buffers not in use, per worker thread: a direction borrows one only
/// while a read has bytes for it and until they are written, so a held,
/// quiet flow holds none (it held two, about 16 KiB of touched pages, which
/// put the relay's memory per idle WebSocket above nginx's).
const POOLED: usize = 4;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The next bytes of `from` (empty at EOF) in a buffer lent from the pool.
/// Each poll lends a buffer and takes it back if the read is pending: a
/// pending `poll_read` leaves the buffer untouched (the `AsyncRead`
/// contract), so nothing is held while waiting.
async fn lent_read<R: AsyncRead + Unpin>(from: &mut R) -> std::io::Result<Vec<u8>> {
    std::future::poll_fn(|cx| {
        let mut buf = lend();
        let mut rb = tokio::io::ReadBuf::uninit(buf.spare_capacity_mut());
        match std::pin::Pin::new(&mut *from).poll_read(cx, &mut rb) {
            std::task::Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                // SAFETY: `ReadBuf` guarantees its first `filled` bytes are
                // initialised, and they are the start of `buf`'s spare capacity.
                unsafe { buf.set_len(n) };
                std::task::Poll::Ready(Ok(buf))
            }
            other => {
                give_back(buf);
                other.map(|r| r.map(|()| Vec::new()))
            }
        }
    })
    .await
}

/// A copy buffer from the pool (or a new one), empty, for a caller that
/// reads into it itself; hand it back with [`give_back`].
pub(crate) fn lend() -> Vec<u8> {
    POOL.with_borrow_mut(Vec::pop).unwrap_or_else(|| Vec::with_capacity(BUF_SIZE))
}

pub(crate) fn give_back(mut buf: Vec<u8>) {
    buf.clear();
    POOL.with_borrow_mut(|p| {
        if p.len() < POOLED && buf.capacity() == BUF_SIZE {
            p.push(buf);
        }
    });
}

/// Whether an EOF read on `side` after `n` bytes is the end of that side's
/// bytes. A socket still in the SOCKHASH reports EOF once the bytes the
/// kernel handed over are read, while bytes the verdict passed behind the
/// sockmap's own queue may not have reached it yet (`carry::relay_demoted`).
pub type EofGuard<'a> = dyn Fn(Side, u64) -> bool + Sync + 'a;

/// Detached: stopped for a hot upgrade with neither direction holding a
/// byte or past EOF, and every rustls session between records; the sides.
pub type Relayed = crate::flow::table::Stopped<(Conn, Conn)>;

/// Relays two sides (TLS ones included) until both directions are closed,
/// one side resets, or the flow is idle for `idle`; once `detach` turns
/// true, stops at the first moment both directions wait for bytes holding
/// none (a read not yet completed leaves the bytes in the socket, or in the
/// TLS session) with every rustls session between records.
pub async fn relay(
    client: Conn,
    backend: Conn,
    flow: &Flow,
    idle: Duration,
    mut detach: Option<tokio::sync::watch::Receiver<bool>>,
    eof_ok: Option<&EofGuard<'_>>,
) -> Relayed {
    let fds = (client.fd(), backend.fd());
    let resting: Vec<_> = [client.resting_flag(), backend.resting_flag()].into_iter().flatten().collect();
    match (client, backend) {
        // Plain TCP, the common case: owned halves, no lock between them.
        (Conn::Plain(c), Conn::Plain(b)) => {
            let ((cr, cw), (br, bw)) = (c.into_split(), b.into_split());
            match pump_both((cr, cw, br, bw), fds, &resting, flow, idle, &mut detach, eof_ok).await {
                Ok(cause) => Stopped::Closed(cause),
                Err((cr, cw, br, bw)) => match (cr.reunite(cw), br.reunite(bw)) {
                    (Ok(c), Ok(b)) => Stopped::Detached((Conn::Plain(c), Conn::Plain(b))),
                    _ => unreachable!("halves of the same sockets"),
                },
            }
        }
        (c, b) => {
            let ((cr, cw), (br, bw)) = (tokio::io::split(c), tokio::io::split(b));
            match pump_both((cr, cw, br, bw), fds, &resting, flow, idle, &mut detach, eof_ok).await {
                Ok(cause) => Stopped::Closed(cause),
                Err((cr, cw, br, bw)) => Stopped::Detached((cr.unsplit(cw), br.unsplit(bw))),
            }
        }
    }
}

/// Both pumps over the halves (client read, client write, backend read,
/// backend write): the close cause, or the halves back once detached.
async fn pump_both<CR, CW, BR, BW>(
    mut h: (CR, CW, BR, BW),
    fds: (Option<RawFd>, Option<RawFd>),
    resting: &[std::sync::Arc<AtomicBool>],
    flow: &Flow,
    idle: Duration,
    detach: &mut Option<tokio::sync::watch::Receiver<bool>>,
    eof_ok: Option<&EofGuard<'_>>,
) -> Result<CloseCause, (CR, CW, BR, BW)>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    BR: AsyncRead + Unpin,
    BW: AsyncWrite + Unpin,
{
    let (c_reading, b_reading) = (AtomicBool::new(false), AtomicBool::new(false));
    let stopped = {
        let c2b = pump_marked(&mut h.0, &mut h.3, flow, Side::Client, &c_reading, eof_ok);
        let b2c = pump_marked(&mut h.2, &mut h.1, flow, Side::Backend, &b_reading, eof_ok);
        let quiet = || c_reading.load(Relaxed) && b_reading.load(Relaxed) && resting.iter().all(|r| r.load(Relaxed));
        drive(c2b, b2c, fds, flow, idle, detach, quiet).await
    };
    stopped.ok_or(h)
}

/// Runs both directions to the end (`Some`), or until `detach` turns true
/// and `quiet` holds while neither direction has ended (`None`).
async fn drive(
    c2b: impl std::future::Future<Output = Result<(), Side>>,
    b2c: impl std::future::Future<Output = Result<(), Side>>,
    (cfd, bfd): (Option<RawFd>, Option<RawFd>),
    flow: &Flow,
    idle: Duration,
    detach: &mut Option<tokio::sync::watch::Receiver<bool>>,
    quiet: impl Fn() -> bool,
) -> Option<CloseCause> {
    tokio::pin!(c2b, b2c);
    let (mut c2b_done, mut b2c_done) = (false, false);
    let mut detach_asked = false;
    let mut first_closed = None;
    // The idle check sleeps until the flow's idle deadline, not on a fixed
    // tick: held, quiet flows cost nothing (a one-second tick was 3.5% of a
    // CPU at 2,000 held WebSockets).
    let until_idle = || {
        let deadline = flow.user_last_ns.load(Relaxed).saturating_add(idle.as_nanos() as u64);
        Duration::from_nanos(deadline.saturating_sub(sys::monotonic_ns())).max(Duration::from_millis(50))
    };
    let abort = |by: Side| {
        // Reset the other side, as the peer reset us: SO_LINGER 0 then close.
        for fd in [cfd, bfd].into_iter().flatten() {
            sys::set_linger_zero(fd);
        }
        CloseCause::Reset { by }
    };
    loop {
        tokio::select! {
            r = &mut c2b, if !c2b_done => {
                c2b_done = true;
                match r {
                    Ok(()) => { first_closed.get_or_insert(Side::Client); }
                    Err(by) => return Some(abort(by)),
                }
            }
            r = &mut b2c, if !b2c_done => {
                b2c_done = true;
                match r {
                    Ok(()) => { first_closed.get_or_insert(Side::Backend); }
                    Err(by) => return Some(abort(by)),
                }
            }
            () = tokio::time::sleep(until_idle()) => {
                let last = flow.user_last_ns.load(Relaxed);
                if sys::monotonic_ns().saturating_sub(last) >= idle.as_nanos() as u64 {
                    return Some(CloseCause::IdleTimeout);
                }
            }
            cause = flow.ending.reached() => return Some(cause),
            () = crate::dataplane::splice::asked_to_detach(detach), if !detach_asked => detach_asked = true,
            () = tokio::time::sleep(Duration::from_millis(5)), if detach_asked => {}
        }
        if c2b_done && b2c_done {
            return Some(CloseCause::Closed { first: first_closed.unwrap_or(Side::Client) });
        }
        if detach_asked && !c2b_done && !b2c_done && quiet() {
            return None;
        }
    }
}
