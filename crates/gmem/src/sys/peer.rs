//! System calls of the peer channels: `SOCK_SEQPACKET` socket pairs, fixed-size records with
//! a timeout, descriptors passed with `SCM_RIGHTS`, `pthread_atfork`, `dup3`.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::error::{Errno, KernelResult};

use super::check;

/// `socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC)`: a reliable, ordered, message-keeping
/// channel between two processes.
pub(crate) fn seqpacket_pair() -> KernelResult<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both descriptors were just returned by the kernel and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends one record of exactly `N` bytes (one packet), without SIGPIPE on a closed peer.
pub(crate) fn send_record<const N: usize>(fd: BorrowedFd<'_>, rec: &[u8; N]) -> KernelResult<()> {
    loop {
        // SAFETY: `rec` is valid for `N` bytes for the duration of the call.
        let n = unsafe { libc::send(fd.as_raw_fd(), rec.as_ptr().cast(), N, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return if n as usize == N {
                Ok(())
            } else {
                Err(Errno(libc::EMSGSIZE))
            };
        }
        let e = Errno::last();
        if e != Errno::EINTR {
            return Err(e);
        }
    }
}

/// Receives one record of `N` bytes, waiting at most `timeout` (`None`: forever). `Ok(None)`:
/// the peer closed its end. ETIMEDOUT when nothing came in time.
pub(crate) fn recv_record<const N: usize>(
    fd: BorrowedFd<'_>,
    timeout: Option<Duration>,
) -> KernelResult<Option<[u8; N]>> {
    if let Some(t) = timeout {
        let ms = libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX);
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            if r > 0 {
                break;
            }
            if r == 0 {
                return Err(Errno(libc::ETIMEDOUT));
            }
            let e = Errno::last();
            if e != Errno::EINTR {
                return Err(e);
            }
        }
    }
    let mut rec = [0u8; N];
    loop {
        // SAFETY: `rec` is valid and writable for `N` bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), rec.as_mut_ptr().cast(), N, 0) };
        if n == 0 {
            return Ok(None);
        }
        if n > 0 {
            return if n as usize == N {
                Ok(Some(rec))
            } else {
                Err(Errno(libc::EMSGSIZE))
            };
        }
        let e = Errno::last();
        if e == Errno(libc::ECONNRESET) {
            return Ok(None);
        }
        if e != Errno::EINTR {
            return Err(e);
        }
    }
}

/// Sends `data` with the descriptors `fds` attached (`SCM_RIGHTS`) on a Unix socket.
pub(crate) fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> KernelResult<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let bytes = std::mem::size_of_val(raw.as_slice());
    let bytes32 = u32::try_from(bytes).map_err(|_| Errno::EINVAL)?;
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(bytes32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid value of this plain C struct.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: `msg` points at a control buffer of `space` bytes, room for one header and
    // `bytes` of descriptors; CMSG_FIRSTHDR/CMSG_DATA stay inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() {
            return Err(Errno::EINVAL);
        }
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(bytes32) as usize;
        std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), bytes);
    }
    loop {
        // SAFETY: `msg` and everything it points at are valid for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return if n as usize == data.len() {
                Ok(())
            } else {
                Err(Errno(libc::EMSGSIZE))
            };
        }
        let e = Errno::last();
        if e != Errno::EINTR {
            return Err(e);
        }
    }
}

/// Receives up to `data.len()` bytes (how many is returned; 0 at end of stream) and the
/// descriptors sent with them by [`send_with_fds`] (at most `max_fds`).
pub(crate) fn recv_with_fds(
    sock: BorrowedFd<'_>,
    data: &mut [u8],
    max_fds: usize,
) -> KernelResult<(usize, Vec<OwnedFd>)> {
    let bytes = u32::try_from(max_fds * std::mem::size_of::<RawFd>()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(bytes) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid value of this plain C struct.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    let n = loop {
        // SAFETY: `msg` and its buffers are valid for the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = Errno::last();
        if e != Errno::EINTR {
            return Err(e);
        }
    };
    let mut out = Vec::new();
    // SAFETY: the kernel filled the control buffer; CMSG_FIRSTHDR/NXTHDR walk it within
    // `msg_controllen`, and each SCM_RIGHTS payload holds whole descriptors it installed in
    // this process, which nobody else owns.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = payload / std::mem::size_of::<RawFd>();
                let p = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..count {
                    out.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(Errno(libc::EMSGSIZE));
    }
    Ok((n, out))
}

/// `dup3(from, onto, O_CLOEXEC)`: `onto`'s number now refers to `from`'s open file.
pub(crate) fn dup_onto(from: BorrowedFd<'_>, onto: BorrowedFd<'_>) -> KernelResult<()> {
    // SAFETY: both descriptors are open; dup3 replaces what `onto`'s number refers to, which
    // its owner keeps using as the same number.
    check(unsafe { libc::dup3(from.as_raw_fd(), onto.as_raw_fd(), libc::O_CLOEXEC) }).map(drop)
}

/// This process's id.
pub(crate) fn getpid() -> u32 {
    std::process::id()
}

/// Registers fork handlers (`pthread_atfork`): `prepare` runs in the forking thread before
/// the fork, `parent` and `child` after it in each process.
pub(crate) fn atfork(
    prepare: unsafe extern "C" fn(),
    parent: unsafe extern "C" fn(),
    child: unsafe extern "C" fn(),
) -> KernelResult<()> {
    // SAFETY: registering three functions with the C library; they stay valid (statics).
    let r = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if r != 0 {
        Err(Errno(r))
    } else {
        Ok(())
    }
}
