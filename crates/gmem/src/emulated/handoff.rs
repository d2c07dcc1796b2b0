//! Handing the file to another process ([`EmulatedGuestMemfd::send_to`] /
//! [`EmulatedGuestMemfd::receive`]).
//!
//! The sender sends, in one message, a header (size, flags) and the memory file
//! (`SCM_RIGHTS`). The receiver makes a userfaultfd for its own address space (with the
//! guard's features), sends it back, and registers every host mapping it makes of the file
//! with it. The sender's guard serves that userfaultfd from then on, as it serves the sender's
//! fork children: the receiver's faults are checked against the sender's attributes, its
//! pages are taken out of its address space by the sender's conversions, and it takes no part
//! in them. The receiver is a follower: it maps the file and asks the owner for conversions
//! (below); everything else is the owner's.
//!
//! Without the guard (Remap mode) nothing would see the receiver's accesses: EOPNOTSUPP.
//!
//! Conversions: the kernel lets any holder of a guest_memfd convert it. A receiver does so
//! through its owner: the first message also carries one end of a socket pair (the *link*),
//! and a thread of the owner's serves it, running the one conversion sequence
//! ([`EmulatedGuestMemfd::set_attributes`]) for each request and answering its errno and
//! `error_offset`. Both ends are private descriptors (a fork child of either process gets
//! the hole file in their place). Once the owner has gone, a receiver's conversions answer
//! EOPNOTSUPP (the trust boundary's "owner death").
//!
//! The first message carries a third descriptor, one end of the *custody* stream (private at
//! both ends too): the owner hands the receiver the userfaultfd of each of the receiver's
//! descendants as it learns of it, and the receiver's `gmem-orphan` thread serves them all,
//! with its own, once the owner has gone ([`super::orphan`]).
//!
//! A fork (or clone) child of the owner holds, in the kernel's model, every descriptor the
//! owner had at the fork, and may convert with any of them. Its copy of a file asks the owner
//! over the *fork link*, a datagram socket pair made with the guard: the child inherits one
//! end (not private), the owner's `gmem-fork-link` thread serves the other (private). A
//! request names the file by inode and by the file's secret, which the child has from its
//! copy of the owner's memory (so a file made after the fork, whose secret it never saw,
//! cannot be named), and carries one end of a fresh socket pair for the answer, which the
//! owner sends without waiting (a child that does not read it delays nothing). Many
//! children share the link; each request is one datagram.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;

use super::{EmulatedGuestMemfd, EmulatedOptions, Mechanism};
use crate::error::{Errno, KernelResult};
use crate::file::GuestMemfd;
use crate::sys::{peer, PoisonFd};
use crate::uapi::kvm_memory_attributes2;
use crate::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};

const MAGIC: u64 = u64::from_le_bytes(*b"GMEMFD04");
const REPLY: u64 = u64::from_le_bytes(*b"GMEMUF02");
const HEADER: usize = 24;
/// A conversion request over the link: offset, size, attributes, flags.
const LINK_REQUEST: usize = 32;
/// Its answer: errno (0: success), error_offset.
const LINK_REPLY: usize = 16;
/// A fork child's request over the fork link: inode, the file's secret, then a
/// [`LINK_REQUEST`].
const FORK_REQUEST: usize = 8 + 16 + LINK_REQUEST;

/// The request bytes of conversion `a` (offset, size, attributes, flags).
fn request(a: &kvm_memory_attributes2) -> [u8; LINK_REQUEST] {
    let mut req = [0u8; LINK_REQUEST];
    req[0..8].copy_from_slice(&a.offset.to_le_bytes());
    req[8..16].copy_from_slice(&a.size.to_le_bytes());
    req[16..24].copy_from_slice(&a.attributes.to_le_bytes());
    req[24..32].copy_from_slice(&a.flags.to_le_bytes());
    req
}

/// The conversion a request asks for.
fn requested(req: &[u8]) -> kvm_memory_attributes2 {
    kvm_memory_attributes2 {
        offset: word(req, 0),
        size: word(req, 8),
        attributes: word(req, 16),
        flags: word(req, 24),
        ..kvm_memory_attributes2::default()
    }
}

/// The answer to conversion `a` (its outcome and `error_offset`).
fn answer(outcome: KernelResult<()>, a: &kvm_memory_attributes2) -> [u8; LINK_REPLY] {
    let errno = match outcome {
        Ok(()) => 0,
        Err(e) => e.0,
    };
    let mut reply = [0u8; LINK_REPLY];
    reply[0..8].copy_from_slice(&i64::from(errno).to_le_bytes());
    reply[8..16].copy_from_slice(&a.error_offset.to_le_bytes());
    reply
}

/// The outcome an answer reports (its `error_offset` into `a`).
fn answered(reply: &[u8; LINK_REPLY], a: &mut kvm_memory_attributes2) -> KernelResult<()> {
    let errno = i64::from_le_bytes(reply[0..8].try_into().unwrap_or([0; 8]));
    a.error_offset = word(reply, 8);
    match i32::try_from(errno) {
        Ok(0) => Ok(()),
        Ok(e) => Err(Errno(e)),
        Err(_) => Err(Errno(libc::EPROTO)),
    }
}

/// The owner's side of the fork link (the `gmem-fork-link` thread, for the life of the
/// process): each request names a live file of this process by inode and secret, is
/// converted by the one conversion sequence, and answered on the socket that came with it.
/// A request that names no such file is answered EOPNOTSUPP; one without a socket, or of
/// the wrong size, is dropped.
pub(super) fn serve_fork_link(
    guard: &super::guard::Guard,
    link: &std::os::unix::net::UnixDatagram,
) {
    loop {
        let mut req = [0u8; FORK_REQUEST];
        let (n, mut fds) = match peer::recv_with_fds(link.as_fd(), &mut req, 1) {
            Ok(v) => v,
            Err(_) => {
                // Nothing to read is not an error on a blocking socket; a pause keeps an
                // unexpected one from spinning.
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
        };
        let Some(reply_to) = fds.pop() else {
            continue;
        };
        // A Unix stream socket and nothing else: the answer is sent without waiting, and a
        // socket of another kind could still hold the sender in a lock (found in review: a
        // kTLS socket whose peer does not read).
        if n != FORK_REQUEST || !peer::is_unix_stream(reply_to.as_fd()) {
            continue;
        }
        let mut a = requested(&req[24..]);
        let outcome = match guard.file(word(&req, 0)) {
            Some(inner) if inner.fork_secret[..] == req[8..24] && inner.in_own_space() => {
                let file = EmulatedGuestMemfd { inner };
                GuestMemfd::set_attributes(&file, &mut a)
            }
            _ => Err(Errno::EOPNOTSUPP),
        };
        let _ = peer::send_nonblocking(reply_to.as_fd(), &answer(outcome, &a));
    }
}

/// A Unix stream socket pair, both ends private from the moment they exist (a fork child gets
/// the hole file in their place).
fn private_pair() -> KernelResult<(super::fork::PrivateStream, super::fork::PrivateStream)> {
    let quiet = super::fork::quiet();
    let (a, b) = UnixStream::pair().map_err(|e| io_errno(&e))?;
    Ok((
        super::fork::PrivateStream::track(a, &quiet),
        super::fork::PrivateStream::track(b, &quiet),
    ))
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Reads a whole record of `N` bytes and the descriptors sent with it.
fn recv_record<const N: usize>(
    socket: &UnixStream,
    max_fds: usize,
) -> KernelResult<([u8; N], Vec<std::os::fd::OwnedFd>)> {
    let mut rec = [0u8; N];
    let (n, fds) = peer::recv_with_fds(socket.as_fd(), &mut rec, max_fds)?;
    if n == 0 {
        return Err(Errno(libc::EPROTO));
    }
    if n < N {
        (&*socket)
            .read_exact(&mut rec[n..])
            .map_err(|e| io_errno(&e))?;
    }
    Ok((rec, fds))
}

fn word(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(w)
}

impl EmulatedGuestMemfd {
    /// Hands the file to the process at the other end of `socket`, which calls
    /// [`EmulatedGuestMemfd::receive`]. From then on this process's guard serves that
    /// process's host mappings of the file. EOPNOTSUPP without the guard (Remap mode) or in a
    /// follower; EPROTO if the other end does not answer as a receiver.
    pub fn send_to(&self, socket: &UnixStream) -> KernelResult<()> {
        self.owner_only()?;
        let Mechanism::Guard(guard) = &self.inner.mechanism else {
            return Err(Errno::EOPNOTSUPP);
        };
        let mut header = [0u8; HEADER];
        header[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        header[8..16].copy_from_slice(&self.inner.size.to_le_bytes());
        header[16..24].copy_from_slice(&self.inner.flags.to_le_bytes());
        // The link the receiver converts through, and the custody stream, over which it is
        // given the userfaultfds of its fork children as they come (it serves them once this
        // process has gone: `orphan`). The receiver's ends are closed here once sent.
        let (mine, theirs) = private_pair()?;
        let (custody, their_custody) = private_pair()?;
        let (Some(theirs_s), Some(their_custody_s)) = (theirs.get(), their_custody.get()) else {
            return Err(Errno::EBADF);
        };
        peer::send_with_fds(
            socket.as_fd(),
            &header,
            &[
                self.inner.memfd.as_fd(),
                theirs_s.as_fd(),
                their_custody_s.as_fd(),
            ],
        )?;
        drop(theirs);
        drop(their_custody);
        let (reply, mut fds) = recv_record::<8>(socket, 1)?;
        if word(&reply, 0) != REPLY || fds.len() != 1 {
            return Err(Errno(libc::EPROTO));
        }
        let uffd = fds.pop().ok_or(Errno(libc::EPROTO))?;
        // A userfaultfd and nothing else (found in review: a pipe's read end, always readable
        // once its writer closed, kept the guard's reader spinning).
        let link =
            std::fs::read_link(format!("/proc/self/fd/{}", uffd.as_raw_fd())).unwrap_or_default();
        if link.as_os_str() != "anon_inode:[userfaultfd]" {
            return Err(Errno(libc::EPROTO));
        }
        let uffd = PoisonFd::adopt(uffd);
        uffd.ensure_initialised();
        // Private from now on: a fork child of this process does not keep it.
        super::fork::track_uffd(&uffd);
        guard.add_space_keeping(uffd, &self.inner, custody)?;
        let owner = self.clone();
        std::thread::Builder::new()
            .name("gmem-link".into())
            .spawn(move || owner.serve_link(&mine))
            .map_err(|_| Errno::EAGAIN)?;
        Ok(())
    }

    /// The owner's side of a receiver's link: each request (offset, size, attributes, flags)
    /// is converted here, by the one conversion sequence, and answered (errno, error_offset),
    /// until the receiver closes its end.
    fn serve_link(&self, link: &super::fork::PrivateStream) {
        let Some(mut s) = link.get() else {
            return;
        };
        loop {
            let mut req = [0u8; LINK_REQUEST];
            if s.read_exact(&mut req).is_err() {
                return;
            }
            let mut a = requested(&req);
            let outcome = GuestMemfd::set_attributes(self, &mut a);
            if s.write_all(&answer(outcome, &a)).is_err() {
                return;
            }
        }
    }

    /// A receiver's conversion, run by the owner over the link: the owner's answer, or
    /// EOPNOTSUPP once the owner has gone (a receiver's fork child has no link).
    pub(super) fn convert_through_owner(&self, a: &mut kvm_memory_attributes2) -> KernelResult<()> {
        let Some(link) = self.inner.owner_link.as_ref() else {
            return Err(Errno::EOPNOTSUPP);
        };
        if !self.inner.in_own_space() {
            return Err(Errno::EOPNOTSUPP);
        }
        let link = link
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(mut s) = link.get() else {
            return Err(Errno::EOPNOTSUPP);
        };
        let mut reply = [0u8; LINK_REPLY];
        if s.write_all(&request(a)).is_err() || s.read_exact(&mut reply).is_err() {
            return Err(Errno::EOPNOTSUPP);
        }
        answered(&reply, a)
    }

    /// A fork (or clone) child's conversion, run by the owner over the fork link: the
    /// owner's answer, or EOPNOTSUPP once the owner has gone, for a copy of a file the owner
    /// no longer has, and for a received file's children (they have no link).
    pub(super) fn convert_through_fork_link(
        &self,
        a: &mut kvm_memory_attributes2,
    ) -> KernelResult<()> {
        let Mechanism::Guard(guard) = &self.inner.mechanism else {
            return Err(Errno::EOPNOTSUPP);
        };
        let (mine, theirs) = UnixStream::pair().map_err(|e| io_errno(&e))?;
        let mut req = [0u8; FORK_REQUEST];
        req[0..8].copy_from_slice(&self.inner.ino.to_le_bytes());
        req[8..24].copy_from_slice(&self.inner.fork_secret);
        req[24..].copy_from_slice(&request(a));
        peer::send_with_fds(guard.fork_link().as_fd(), &req, &[theirs.as_fd()])
            .map_err(|_| Errno::EOPNOTSUPP)?;
        drop(theirs);
        let mut reply = [0u8; LINK_REPLY];
        (&mine)
            .read_exact(&mut reply)
            .map_err(|_| Errno::EOPNOTSUPP)?;
        answered(&reply, a)
    }

    /// Receives a file sent with [`EmulatedGuestMemfd::send_to`]: a follower whose host
    /// mappings the sender's guard serves. EPROTO for anything that is not such a message;
    /// the errno of `userfaultfd()` where this process can have none.
    pub fn receive(socket: &UnixStream) -> KernelResult<EmulatedGuestMemfd> {
        let (header, mut fds) = recv_record::<HEADER>(socket, 3)?;
        let (magic, size, flags) = (word(&header, 0), word(&header, 8), word(&header, 16));
        if magic != MAGIC || fds.len() != 3 {
            return Err(Errno(libc::EPROTO));
        }
        let custody = fds.pop().ok_or(Errno(libc::EPROTO))?;
        let link = fds.pop().ok_or(Errno(libc::EPROTO))?;
        let memfd = fds.pop().ok_or(Errno(libc::EPROTO))?;
        let (link, custody) = {
            let quiet = super::fork::quiet();
            (
                super::fork::PrivateStream::track(UnixStream::from(link), &quiet),
                super::fork::PrivateStream::track(UnixStream::from(custody), &quiet),
            )
        };
        // Recorded at once, so that a fork child of this process does not keep it (a fork in
        // the instant since `recvmsg` returned is the one not covered).
        let placeholder = super::hole()?;
        let quiet = super::fork::quiet();
        let memfd = super::fork::DataFd::track(memfd, placeholder, &quiet)?;
        drop(quiet);
        // The receiver's own userfaultfd is private too: a fork child of the receiver does not
        // keep it (made and recorded with no fork in between; closed and forgotten if the
        // receive fails).
        let uffd = {
            let _quiet = super::fork::quiet();
            let (uffd, _) = PoisonFd::guard()?;
            super::fork::track_fd(uffd.raw_fd());
            uffd
        };
        // The orphan watch's copy of it (served by the watch once the owner has gone).
        let watched = {
            let _quiet = super::fork::quiet();
            match peer::dup_low(uffd.as_fd()) {
                Ok(fd) => {
                    super::fork::track_fd(fd.as_raw_fd());
                    PoisonFd::adopt(fd)
                }
                Err(e) => {
                    drop(_quiet);
                    super::fork::close_private_uffd(uffd);
                    return Err(e);
                }
            }
        };
        let reply = REPLY.to_le_bytes();
        if let Err(e) = peer::send_with_fds(socket.as_fd(), &reply, &[uffd.as_fd()]) {
            super::fork::close_private_uffd(uffd);
            super::fork::close_private_uffd(watched);
            return Err(e);
        }
        // A follower keeps only the flags that say what the host may do; platform models and
        // the direct map are the owner's.
        let flags = flags & (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
        let file = match Self::build(
            memfd,
            size,
            flags,
            EmulatedOptions::default(),
            Some((uffd, link)),
        ) {
            Ok(f) => f,
            Err(e) => {
                super::fork::close_private_uffd(watched);
                return Err(e);
            }
        };
        super::orphan::watch(watched, custody)?;
        Ok(file)
    }
}
