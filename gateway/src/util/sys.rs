//! Thin wrappers over the socket options and ioctls the data path needs.
//! All `unsafe` FFI of the daemon lives here.
use std::{io, mem, os::fd::AsRawFd};

/// `SO_COOKIE`: the kernel's 64-bit id of a socket, the key of the SOCKHASH.
pub fn socket_cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: v and len are valid for writes of the sizes given.
    let r =
        unsafe { libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE, (&raw mut v).cast(), &mut len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// `SIOCOUTQ`: bytes in the socket's send queue, sent or not, not yet acknowledged.
pub fn outq(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut v: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (== SIOCOUTQ) writes one int.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut v) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v.max(0) as u64)
}

/// The parts of `struct tcp_info` (linux/tcp.h) the daemon reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpInfo {
    pub state: u8,
    pub rtt_us: u32,
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// Time (µs) the socket's sending was limited by the peer's receive
    /// window; 0 on kernels before 4.10.
    pub rwnd_limited_us: u64,
}

/// TCP states from include/net/tcp_states.h.
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_CLOSE: u8 = 7;

pub fn tcp_info(fd: &impl AsRawFd) -> io::Result<TcpInfo> {
    // Offsets in the stable UAPI layout of struct tcp_info.
    const RTT: usize = 68;
    const BYTES_ACKED: usize = 120;
    const BYTES_RECEIVED: usize = 128;
    const RWND_LIMITED: usize = 176;
    let mut buf = [0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: buf and len are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, buf.as_mut_ptr().cast(), &mut len)
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < BYTES_RECEIVED + 8 {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "tcp_info too short"));
    }
    let u32_at = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().expect("four bytes"));
    let u64_at = |o: usize| u64::from_ne_bytes(buf[o..o + 8].try_into().expect("eight bytes"));
    Ok(TcpInfo {
        state: buf[0],
        rtt_us: u32_at(RTT),
        bytes_acked: u64_at(BYTES_ACKED),
        bytes_received: u64_at(BYTES_RECEIVED),
        rwnd_limited_us: if len as usize >= RWND_LIMITED + 8 { u64_at(RWND_LIMITED) } else { 0 },
    })
}

/// Everything ever queued for sending on this socket, up to a constant offset:
/// acknowledged bytes plus those still in the send queue.
pub fn bytes_queued_total(fd: &impl AsRawFd) -> io::Result<u64> {
    Ok(tcp_info(fd)?.bytes_acked + outq(fd)?)
}

/// `SO_ERROR`, which also clears it.
pub fn take_error(fd: &impl AsRawFd) -> io::Result<Option<io::Error>> {
    socket2::SockRef::from(&BorrowedRaw(fd.as_raw_fd())).take_error()
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is valid for writes.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Effective capability set of this process (bit n = capability n).
pub fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

struct BorrowedRaw(i32);
impl std::os::fd::AsFd for BorrowedRaw {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: callers pass an fd they keep open for the duration of the call.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.0) }
    }
}

/// `SO_LINGER {on, 0}`: the next close sends RST instead of FIN.
pub fn set_linger_zero(fd: std::os::fd::RawFd) {
    let _ = socket2::SockRef::from(&BorrowedRaw(fd)).set_linger(Some(std::time::Duration::ZERO));
}

/// `shutdown(fd, SHUT_WR)`: sends FIN after everything queued.
pub fn shutdown_write(fd: &impl AsRawFd) -> io::Result<()> {
    socket2::SockRef::from(&BorrowedRaw(fd.as_raw_fd())).shutdown(std::net::Shutdown::Write)
}

/// `SO_SNDBUF` as the kernel reports it (twice what was set: it counts its
/// bookkeeping).
pub fn sndbuf(fd: &impl AsRawFd) -> io::Result<u64> {
    socket2::SockRef::from(&BorrowedRaw(fd.as_raw_fd())).send_buffer_size().map(|n| n as u64)
}

/// `SO_SNDBUFFORCE`: sets the send buffer past `net.core.wmem_max` (needs
/// CAP_NET_ADMIN; the kernel doubles the value for bookkeeping overhead).
pub fn set_sndbuf_force(fd: &impl AsRawFd, bytes: u64) -> io::Result<()> {
    let v: libc::c_int = bytes.min(i32::MAX as u64 / 2) as libc::c_int;
    // SAFETY: v is a valid int for the size given.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&raw const v).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `SO_RCVBUF` (the kernel doubles it; this also turns off receive autotuning).
pub fn set_rcvbuf(fd: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    socket2::SockRef::from(&BorrowedRaw(fd.as_raw_fd())).set_recv_buffer_size(bytes)
}

/// read(2) on a socket. The daemon reads spliced sockets with read(2) rather
/// than recv(2) on purpose: read(2) is counted in /proc/PID/io `rchar`, so
/// every byte of a kernel flow the daemon copies is visible from outside.
pub fn read(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// read(2) into `buf`'s spare capacity (never zeroed first: a large buffer
/// that gets few or no bytes costs no page touches); appends what was read.
pub fn read_spare(fd: &impl AsRawFd, buf: &mut Vec<u8>) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: spare is valid for writes of its length; read(2) initialises
    // exactly the n bytes it reports, which is all set_len exposes.
    let n = unsafe { libc::read(fd.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the first n spare bytes were just written by read(2).
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// The gid of group `name`, from the system's group database.
pub fn group_id(name: &str) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: libc::group is plain data; all-zero is a valid (empty) value.
    let mut grp: libc::group = unsafe { mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the sizes given; getgrnam_r is re-entrant.
    let r = unsafe { libc::getgrnam_r(cname.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    (r == 0 && !out.is_null()).then_some(grp.gr_gid)
}

/// What [`drop_capabilities_except`] did.
pub struct Dropped {
    /// The capabilities kept (effective and permitted).
    pub kept: u64,
    /// Whether the bounding set lost the others too: that takes
    /// CAP_SETPCAP, which a service started with ambient capabilities (a
    /// systemd DynamicUser) does not hold; its unit's CapabilityBoundingSet
    /// is the bound then.
    pub bounding: bool,
}

/// Restores SIGPIPE's default action, for the CLI's commands: a reader that
/// goes away (`gateway flows | head`) ends the command quietly, as with any
/// Unix tool, instead of a panic in `println!`. Not for the daemon, whose
/// writes to closed sockets must fail, not kill it.
pub fn default_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_DFL has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// This host's name (uname's nodename).
pub fn hostname() -> io::Result<String> {
    // SAFETY: uname fills the struct it is given.
    let mut u: libc::utsname = unsafe { mem::zeroed() };
    // SAFETY: u is valid for writes.
    if unsafe { libc::uname(&mut u) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: nodename is NUL-terminated within its array.
    let name = unsafe { std::ffi::CStr::from_ptr(u.nodename.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

/// Lifts the soft open-files limit to the hard one (a gateway holds two
/// sockets per flow). Returns the soft limit before and after; they are
/// equal when it already was the hard limit or could not be raised.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: r is valid for reads and writes.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = r.rlim_cur;
    if r.rlim_cur < r.rlim_max {
        r.rlim_cur = r.rlim_max;
        // SAFETY: r is a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Ok((before, before));
        }
    }
    Ok((before, r.rlim_cur))
}

/// Keeps only the capabilities in `keep` (bit n = capability n): effective,
/// permitted and inheritable are set to `keep` ∩ permitted, which also empties
/// the ambient set; the bounding set loses everything else when it may.
pub fn drop_capabilities_except(keep: u64) -> io::Result<Dropped> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut hdr = Header { version: VERSION_3, pid: 0 };
    let mut cur = [Data::default(); 2];
    // SAFETY: capget writes two Data records for version 3.
    if unsafe { libc::syscall(libc::SYS_capget, &mut hdr, cur.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let permitted = u64::from(cur[0].permitted) | (u64::from(cur[1].permitted) << 32);
    let kept = permitted & keep;
    // The bounding set first (needs CAP_SETPCAP, which is still held, if at all).
    let mut bounding = true;
    for cap in 0..64u64 {
        if keep & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments.
            let dropped = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } == 0;
            if !dropped && io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
                bounding = false;
            }
            // EINVAL: past the kernel's last capability.
        }
    }
    let lo = (kept & 0xffff_ffff) as u32;
    let hi = (kept >> 32) as u32;
    let new = [
        Data { effective: lo, permitted: lo, inheritable: lo },
        Data { effective: hi, permitted: hi, inheritable: hi },
    ];
    let mut hdr = Header { version: VERSION_3, pid: 0 };
    // SAFETY: capset reads two Data records for version 3.
    if unsafe { libc::syscall(libc::SYS_capset, &mut hdr, new.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Dropped { kept, bounding })
}

/// `statfs(2)` f_type of the filesystem holding `path`.
pub fn fs_type(path: &std::path::Path) -> io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs is plain data, all-zero is a valid value.
    let mut st: libc::statfs = unsafe { mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path, st is valid for writes.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// Mounts a BPF filesystem on `dir` (needs CAP_SYS_ADMIN).
pub fn mount_bpffs(dir: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let target = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: every argument is a valid NUL-terminated string, data is null.
    let r = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Most descriptors one SCM_RIGHTS message carries (the kernel's SCM_MAX_FD).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// Sends `data` with `fds` attached (SCM_RIGHTS) on a Unix stream socket.
/// The receiver gets its own descriptors for the same open files.
pub fn send_fds(sock: &impl AsRawFd, data: &[u8], fds: &[std::os::fd::RawFd]) -> io::Result<()> {
    if data.is_empty() || fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "send_fds: no data, or too many descriptors"));
    }
    let fd_bytes = mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut control = vec![0u8; space.max(1)];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: control holds CMSG_SPACE(fd_bytes) bytes, room for one header
        // and the descriptors; CMSG_FIRSTHDR is non-null for such a buffer.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), fd_bytes as usize);
        }
    }
    // SAFETY: msg describes valid buffers (above).
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if (n as usize) < data.len() {
        // The descriptors went with the first byte; the rest is plain data.
        let mut rest = &data[n as usize..];
        while !rest.is_empty() {
            // SAFETY: rest is valid for reads of its length.
            let m = unsafe { libc::send(sock.as_raw_fd(), rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
            if m < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    // The descriptors are gone with the first part: wait for
                    // room rather than have the caller send it all again.
                    io::ErrorKind::WouldBlock => {
                        let mut p = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
                        // SAFETY: p is one valid pollfd.
                        if unsafe { libc::poll(&mut p, 1, 10_000) } <= 0 {
                            return Err(io::Error::new(io::ErrorKind::TimedOut, "send_fds: the peer stopped reading"));
                        }
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            rest = &rest[m as usize..];
        }
    }
    Ok(())
}

/// Receives one message: up to `buf.len()` bytes and the descriptors that
/// came with them (close-on-exec).
pub fn recv_fds(sock: &impl AsRawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<std::os::fd::OwnedFd>)> {
    use std::os::fd::FromRawFd;
    let fd_bytes = (MAX_FDS_PER_MESSAGE * mem::size_of::<libc::c_int>()) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; every pointer set below outlives the recvmsg call.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg describes valid buffers (above).
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of
    // well-formed headers; each SCM_RIGHTS payload is an array of new fds,
    // which this process now owns.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let len = (*c).cmsg_len as usize - (data as usize - c as usize);
                for k in 0..len / mem::size_of::<libc::c_int>() {
                    let fd = std::ptr::read_unaligned(data.cast::<libc::c_int>().add(k));
                    fds.push(std::os::fd::OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "descriptors were truncated"));
    }
    Ok((n as usize, fds))
}

/// After a failed accept (EMFILE and the like): wait a little instead of
/// spinning, and say so at most once a minute.
pub async fn accept_failed(what: &str, e: io::Error, last_warned: &mut Option<tokio::time::Instant>) {
    let now = tokio::time::Instant::now();
    if last_warned.is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(60)) {
        tracing::warn!("{what}: accept failed: {e}; retrying");
        *last_warned = Some(now);
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read,
        os::{fd::AsRawFd, unix::net::UnixStream},
    };

    /// Descriptors sent over a socket pair arrive as new descriptors of the
    /// same open files, with the data, whatever the message's size.
    #[test]
    fn descriptors_pass_with_their_message() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let body = vec![b'x'; 100_000];
        let sender = std::thread::spawn(move || {
            super::send_fds(&a, &body, &[l1.as_raw_fd(), l2.as_raw_fd()]).unwrap();
            (l1.local_addr().unwrap(), l2.local_addr().unwrap())
        });
        let mut buf = vec![0u8; 200_000];
        let (mut n, fds) = super::recv_fds(&b, &mut buf).unwrap();
        while n < 100_000 {
            n += b.read(&mut buf[n..]).unwrap();
        }
        let sent = sender.join().unwrap();
        assert_eq!(fds.len(), 2);
        let got: Vec<_> = fds.into_iter().map(|fd| std::net::TcpListener::from(fd).local_addr().unwrap()).collect();
        assert_eq!((got[0], got[1]), sent);
        assert!(buf[..n].iter().all(|&c| c == b'x'));
        assert!(super::send_fds(&b, b"", &[]).is_err());
    }
}
