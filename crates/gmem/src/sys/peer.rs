//! System calls between processes: descriptors passed with `SCM_RIGHTS` (a file handed to
//! another process), `pthread_atfork`, `getpid`.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use crate::error::{Errno, KernelResult};

/// The most descriptors one message carries (`SCM_RIGHTS`): gmem's messages carry at most
/// three (the handoff's memory file, link and custody stream).
const MAX_FDS: usize = 4;

/// A control buffer for [`MAX_FDS`] descriptors (`CMSG_SPACE(16)`: 32 bytes), aligned for a
/// `cmsghdr`.
type FdBuf = [u64; 4];

/// A `msghdr` for one buffer `iov` and control buffer `cbuf`, with room for `nfds`
/// descriptors (EINVAL past [`MAX_FDS`]). The caller keeps both alive across the call it is
/// used for.
fn fds_header(iov: &mut libc::iovec, cbuf: &mut FdBuf, nfds: usize) -> KernelResult<libc::msghdr> {
    if nfds > MAX_FDS {
        return Err(Errno::EINVAL);
    }
    // SAFETY: an all-zero msghdr is a valid value of this plain C struct.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    if nfds > 0 {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure computation.
        msg.msg_controllen =
            unsafe { libc::CMSG_SPACE((nfds * std::mem::size_of::<RawFd>()) as u32) } as usize;
        if msg.msg_controllen > std::mem::size_of_val(cbuf) {
            return Err(Errno::EINVAL);
        }
    }
    Ok(msg)
}

/// `sendmsg` of `data` with the descriptors `fds` attached (at most [`MAX_FDS`]), with
/// `flags` (EINTR retried). Allocates nothing and takes no C library lock: the guard's
/// reader calls it while a fork may hold the allocator's locks.
fn sendmsg_fds(sock: RawFd, data: &[u8], fds: &[RawFd], flags: libc::c_int) -> KernelResult<()> {
    let mut cbuf: FdBuf = [0; 4];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let msg = fds_header(&mut iov, &mut cbuf, fds.len())?;
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds);
        // SAFETY: `msg` points at `cbuf`, room for one header and `fds` (checked by
        // `fds_header`); CMSG_FIRSTHDR/CMSG_DATA stay inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            if c.is_null() {
                return Err(Errno::EINVAL);
            }
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), bytes);
        }
    }
    loop {
        // SAFETY: `msg` and everything it points at are valid for the call.
        let n = unsafe { libc::sendmsg(sock, &msg, flags) };
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

/// `recvmsg` of up to `data.len()` bytes and at most `max` descriptors (close-on-exec):
/// (bytes, the descriptors installed, how many), the caller owning each; 0 bytes and none at
/// the end of a stream. Any further descriptor the kernel installed is closed by system call;
/// EMSGSIZE (every descriptor closed) if the control data was cut (a descriptor that could
/// not be installed). Allocates nothing and takes no C library lock.
fn recvmsg_fds(
    sock: RawFd,
    data: &mut [u8],
    max: usize,
) -> KernelResult<(usize, [RawFd; MAX_FDS], usize)> {
    let max = max.min(MAX_FDS);
    let mut cbuf: FdBuf = [0; 4];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut msg = fds_header(&mut iov, &mut cbuf, max)?;
    let n = loop {
        // SAFETY: `msg` and its buffers are valid for the call.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = Errno::last();
        if e != Errno::EINTR {
            return Err(e);
        }
    };
    let mut fds = [-1; MAX_FDS];
    let mut count = 0;
    if max > 0 {
        // SAFETY: the kernel filled the control buffer; CMSG_FIRSTHDR/NXTHDR walk it within
        // `msg_controllen`, and an SCM_RIGHTS payload holds whole descriptors it installed in
        // this process, which nobody else owns.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let payload =
                        ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                    let p = libc::CMSG_DATA(c).cast::<RawFd>();
                    for i in 0..payload / std::mem::size_of::<RawFd>() {
                        let raw = p.add(i).read_unaligned();
                        if count < max {
                            fds[count] = raw;
                            count += 1;
                        } else {
                            close_raw_fd(raw);
                        }
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        for &fd in &fds[..count] {
            close_raw_fd(fd);
        }
        return Err(Errno(libc::EMSGSIZE));
    }
    Ok((n, fds, count))
}

/// Sends `data` with the descriptors `fds` attached (`SCM_RIGHTS`, at most four) on a Unix
/// socket.
pub(crate) fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> KernelResult<()> {
    let mut raw = [-1; MAX_FDS];
    let raw = raw.get_mut(..fds.len()).ok_or(Errno::EINVAL)?;
    for (r, f) in raw.iter_mut().zip(fds) {
        *r = f.as_raw_fd();
    }
    sendmsg_fds(sock.as_raw_fd(), data, raw, libc::MSG_NOSIGNAL)
}

/// Sends `data` with one descriptor `fd` attached on socket `sock`, without waiting
/// (`MSG_DONTWAIT`) and without SIGPIPE. Allocates nothing and takes no C library lock.
pub(crate) fn send_fd_nonblocking(sock: RawFd, data: &[u8], fd: RawFd) -> KernelResult<()> {
    sendmsg_fds(sock, data, &[fd], libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
}

/// Receives up to `data.len()` bytes and at most one descriptor sent with them (close-on-exec)
/// on socket `sock`: (bytes, descriptor); 0 bytes and none at the end of a stream. Allocates
/// nothing and takes no C library lock. EMSGSIZE if a descriptor was sent but could not be
/// installed (the kernel closes it).
pub(crate) fn recv_fd(sock: RawFd, data: &mut [u8]) -> KernelResult<(usize, Option<OwnedFd>)> {
    let (n, fds, count) = recvmsg_fds(sock, data, 1)?;
    // SAFETY: a descriptor the kernel installed for this call, owned by nobody else.
    Ok((
        n,
        (count > 0).then(|| unsafe { OwnedFd::from_raw_fd(fds[0]) }),
    ))
}

/// Receives up to `data.len()` bytes (how many is returned; 0 at end of stream) and the
/// descriptors sent with them by [`send_with_fds`] (at most `max_fds`, at most four).
pub(crate) fn recv_with_fds(
    sock: BorrowedFd<'_>,
    data: &mut [u8],
    max_fds: usize,
) -> KernelResult<(usize, Vec<OwnedFd>)> {
    let (n, fds, count) = recvmsg_fds(sock.as_raw_fd(), data, max_fds)?;
    // SAFETY: descriptors the kernel installed for this call, owned by nobody else.
    let out = fds[..count]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    Ok((n, out))
}

/// A token naming this address space, without a system call once known: it is kept in a page
/// marked `MADV_WIPEONFORK`, which every child made without `CLONE_VM` (by `fork`, or a raw
/// `clone` that runs no fork handler, in a new pid namespace or not) finds zero-filled, and so
/// makes a new token. A `CLONE_VM` child shares the address space, and so the token: gmem's
/// decisions "is this the process that made the file" are decisions about an address space.
/// Where the page cannot be had, the token is the pid (asked every time), and stays so for
/// the life of the process: the first call decides, once, for every thread (a token that
/// changed within one address space would let gmem's table of views be emptied under its
/// holders: found in review).
pub(crate) fn address_space() -> u64 {
    use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
    // The page, installed once without blocking (a fork while another thread is in here must
    // not leave the child waiting on a half-made initialisation): every racer makes a page,
    // one wins, the others unmap theirs. A racer that could not make one offers the pid
    // instead (`PID_ONLY`); whichever offer wins holds for the process.
    static CELL: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());
    let pid_only: *mut AtomicU64 = std::ptr::without_provenance_mut(1);
    let mut cell = CELL.load(Ordering::Acquire);
    if cell.is_null() {
        let new = wipe_on_fork_cell().unwrap_or(pid_only);
        cell = match CELL.compare_exchange(
            std::ptr::null_mut(),
            new,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => new,
            Err(winner) => {
                if new != pid_only {
                    // SAFETY: `new` is the page this call mapped and nothing else refers to.
                    unsafe { libc::munmap(new.cast(), crate::sys::PAGE_SIZE as usize) };
                }
                winner
            }
        };
    }
    if cell == pid_only {
        return u64::from(std::process::id());
    }
    // SAFETY: `cell` points into a page mapped for the life of the process (never unmapped
    // once installed), page-aligned, accessed only through this atomic.
    let cell = unsafe { &*cell };
    match cell.load(Ordering::Acquire) {
        0 => {
            let token = new_token();
            match cell.compare_exchange(0, token, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => token,
                Err(other) => other,
            }
        }
        token => token,
    }
}

/// A token no other address space of this boot has: 8 random bytes (`getrandom`), else the
/// pid and the time; never 0.
fn new_token() -> u64 {
    let mut t = 0u64;
    // SAFETY: getrandom writes at most 8 bytes into `t`.
    let n = unsafe { libc::getrandom(std::ptr::addr_of_mut!(t).cast(), 8, libc::GRND_NONBLOCK) };
    if n != 8 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t = (u64::from(std::process::id()) << 32) ^ nanos;
    }
    t.max(1)
}

/// 16 random bytes (`getrandom`, waiting for the pool only before it was ever initialised);
/// None if the kernel gives none.
pub(crate) fn random_secret() -> Option<[u8; 16]> {
    let mut t = [0u8; 16];
    // SAFETY: getrandom writes at most 16 bytes into `t`.
    let n = unsafe { libc::getrandom(t.as_mut_ptr().cast(), 16, 0) };
    (n == 16).then_some(t)
}

/// Whether `fd` is a Unix stream socket (`SO_DOMAIN`, `SO_TYPE`).
pub(crate) fn is_unix_stream(fd: BorrowedFd<'_>) -> bool {
    let opt = |name: libc::c_int| -> Option<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`, which lives across the call.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                std::ptr::addr_of_mut!(v).cast(),
                &mut len,
            )
        };
        (r == 0).then_some(v)
    };
    opt(libc::SO_DOMAIN) == Some(libc::AF_UNIX) && opt(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}

/// Sends `data` on socket `fd` without waiting (`MSG_DONTWAIT`) and without SIGPIPE: an
/// answer to a process that may not read it. ENOTSOCK for anything but a socket.
pub(crate) fn send_nonblocking(fd: BorrowedFd<'_>, data: &[u8]) -> KernelResult<()> {
    // SAFETY: `data` is valid for reads of its length across the call.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(Errno::last())
    } else if n as usize != data.len() {
        Err(Errno(libc::EMSGSIZE))
    } else {
        Ok(())
    }
}

/// A `u64` at the start of a page of its own that a child made without `CLONE_VM` sees as
/// zero (never freed once installed).
fn wipe_on_fork_cell() -> Option<*mut std::sync::atomic::AtomicU64> {
    let len = crate::sys::PAGE_SIZE as usize;
    // SAFETY: a new private anonymous mapping at an address the kernel chooses; it replaces
    // nothing.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: `addr` is the page mapped above; WIPEONFORK only changes what a child sees.
    if unsafe { libc::madvise(addr, len, libc::MADV_WIPEONFORK) } != 0 {
        // SAFETY: the page mapped above, referenced by nothing.
        unsafe { libc::munmap(addr, len) };
        return None;
    }
    Some(addr.cast())
}

/// `dup3(from, to, O_CLOEXEC)` by system call (never an interposed C library function): for a
/// fork handler, which may call nothing that takes a lock. Async-signal-safe.
pub(crate) fn dup3_raw(from: RawFd, to: RawFd) -> KernelResult<()> {
    // SAFETY: dup3 replaces descriptor `to` with a duplicate of `from`; it touches no memory.
    let r = unsafe { libc::syscall(libc::SYS_dup3, from, to, libc::O_CLOEXEC) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// `getpid(2)` by system call (no C library cache, no lock: for a fork handler).
pub(crate) fn getpid_raw() -> i64 {
    // SAFETY: getpid has no arguments and touches no memory.
    unsafe { libc::syscall(libc::SYS_getpid) }
}

/// In a fork child: dies (SIGKILL) when the thread that forked it exits
/// (`PR_SET_PDEATHSIG`), and says false if `parent` has already gone. When the owner of a file
/// exits, the userfaultfds of its children's address spaces close with it and the kernel
/// unregisters their host mappings: a child that outlived it would read every page, private
/// ones included. System calls only (a fork child handler).
pub(crate) fn die_with_parent(parent: i64) -> bool {
    // SAFETY: prctl and getppid by system call, integer arguments only.
    unsafe {
        libc::syscall(
            libc::SYS_prctl,
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL,
            0,
            0,
            0,
        ) == 0
            && libc::syscall(libc::SYS_getppid) == parent
    }
}

/// Ends a fork child that could not be restricted: a line on standard error and
/// `_exit(127)`, by system calls only (a fork child handler).
pub(crate) fn exit_unrestricted_child() -> ! {
    const MSG: &[u8] = b"gmem: a fork child of a process with guest memory could not be restricted (seccomp), or its parent has gone; it exits\n";
    // SAFETY: write(2) of a static buffer, then _exit(2): async-signal-safe, no memory of
    // the process touched.
    unsafe {
        libc::syscall(libc::SYS_write, 2, MSG.as_ptr(), MSG.len());
        libc::_exit(127)
    }
}

/// In a fork child: replaces with `placeholder` every descriptor that is a userfaultfd or an
/// emulated file's memory (`/memfd:gmem`) — the ones a read of a fork event or a `recvmsg`
/// of a received file install in the parent an instant before gmem records them, so that a
/// fork in that instant would hand them to the child (found by a test). System calls and
/// stack buffers only (a fork child handler): `getdents64` over `/proc/self/fd`,
/// `readlinkat`, `dup3`.
pub(crate) fn replace_unrecorded_private_fds(placeholder: RawFd) {
    const UFFD: &[u8] = b"anon_inode:[userfaultfd]";
    const DATA: &[u8] = b"/memfd:gmem (deleted)";
    // SAFETY: openat of a constant path; getdents64 and readlinkat write into the stack
    // buffers below within their lengths; dup3 and close act on descriptors only.
    unsafe {
        let dir = libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/proc/self/fd".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        ) as RawFd;
        if dir < 0 {
            return;
        }
        let mut buf = [0u8; 4096];
        loop {
            let n = libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len());
            if n <= 0 {
                break;
            }
            let n = n as usize;
            let mut at = 0usize;
            while at + 19 <= n {
                // struct linux_dirent64: ino (8), off (8), reclen (2), type (1), name.
                let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
                if reclen == 0 || at + reclen > n {
                    break;
                }
                let name = &buf[at + 19..at + reclen];
                let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                let name = &name[..len];
                let mut fd: RawFd = 0;
                let mut digits = !name.is_empty();
                for &b in name {
                    if b.is_ascii_digit() {
                        fd = fd.saturating_mul(10).saturating_add(RawFd::from(b - b'0'));
                    } else {
                        digits = false;
                    }
                }
                if digits && fd != dir && fd != placeholder {
                    let mut cname = [0u8; 16];
                    cname[..len.min(15)].copy_from_slice(&name[..len.min(15)]);
                    let mut link = [0u8; 64];
                    let l = libc::syscall(
                        libc::SYS_readlinkat,
                        dir,
                        cname.as_ptr(),
                        link.as_mut_ptr(),
                        link.len(),
                    );
                    if l > 0 {
                        let link = &link[..l as usize];
                        if link == UFFD || link == DATA {
                            libc::syscall(libc::SYS_dup3, placeholder, fd, libc::O_CLOEXEC);
                        }
                    }
                }
                at += reclen;
            }
        }
        libc::syscall(libc::SYS_close, dir);
    }
}

/// Closes `fd` by system call (never an interposed C library function: the descriptor is
/// gmem's own, unknown to any interposer).
pub(crate) fn close_raw(fd: OwnedFd) {
    let raw = fd.into_raw_fd();
    // SAFETY: `raw` was owned (taken out of its `OwnedFd` above) and is closed once.
    unsafe { libc::syscall(libc::SYS_close, raw) };
}

/// `poll(2)` of `fds` for up to `timeout_ms` (-1: no limit): how many have events (their
/// `revents`), 0 on timeout; EINTR is an error like any other.
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> KernelResult<usize> {
    let n = libc::nfds_t::try_from(fds.len()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: `fds` is `n` valid `pollfd`s, written by the kernel only within the slice.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), n, timeout_ms) };
    usize::try_from(r).map_err(|_| Errno::last())
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, 0)` of a raw descriptor: the duplicate's number, which the
/// caller owns (and closes with [`close_raw_fd`]). Allocates nothing.
pub(crate) fn dup_raw(fd: RawFd) -> KernelResult<RawFd> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor; it touches no memory. By system call,
    // never an interposed C library function (the guard's reader calls it).
    let r = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_DUPFD_CLOEXEC, 0) };
    RawFd::try_from(r)
        .ok()
        .filter(|&r| r >= 0)
        .ok_or_else(Errno::last)
}

/// Closes raw descriptor `fd`, which the caller owns, by system call (never an interposed C
/// library function).
pub(crate) fn close_raw_fd(fd: RawFd) {
    // SAFETY: close(2) touches no memory; the caller owns `fd`.
    unsafe { libc::syscall(libc::SYS_close, fd) };
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, 0)`: a duplicate at the lowest free number.
pub(crate) fn dup_low(fd: BorrowedFd<'_>) -> KernelResult<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor; it touches no memory.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `r` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
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

#[cfg(test)]
mod tests {
    /// Every child made without `CLONE_VM` (fork, a raw clone, one in a new pid namespace
    /// when permitted) has an address-space token of its own, different from its parent's,
    /// and stable within it; a `CLONE_VM` child shares its parent's.
    #[test]
    fn each_address_space_has_its_own_token() {
        let mine = super::address_space();
        assert_ne!(mine, 0);
        assert_eq!(super::address_space(), mine);
        for how in ["fork", "raw clone", "clone newpid"] {
            let (r, w) = {
                let mut fds = [0; 2];
                // SAFETY: pipe writes two descriptors into `fds`.
                assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
                (fds[0], fds[1])
            };
            // SAFETY: the child only computes its token, writes it to the pipe and `_exit`s.
            let pid = unsafe {
                match how {
                    "fork" => libc::fork(),
                    "raw clone" => {
                        libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) as libc::pid_t
                    }
                    _ => libc::syscall(
                        libc::SYS_clone,
                        libc::SIGCHLD | libc::CLONE_NEWPID,
                        0,
                        0,
                        0,
                        0,
                    ) as libc::pid_t,
                }
            };
            if pid < 0 {
                // A new pid namespace needs privilege.
                continue;
            }
            if pid == 0 {
                let t = super::address_space();
                let ok = t != mine && t != 0 && super::address_space() == t;
                let b = [u8::from(ok)];
                // SAFETY: writes one byte to the pipe, then ends the child.
                unsafe {
                    libc::write(w, b.as_ptr().cast(), 1);
                    libc::_exit(0);
                }
            }
            let mut b = [0u8];
            // SAFETY: reads one byte from the pipe; waits for the child made above.
            unsafe {
                libc::close(w);
                assert_eq!(libc::read(r, b.as_mut_ptr().cast(), 1), 1, "{how}");
                libc::close(r);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            assert_eq!(b[0], 1, "{how}: the child's token was its parent's");
        }
        assert_eq!(super::address_space(), mine);
    }
}
