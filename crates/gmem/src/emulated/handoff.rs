//! Handing the file to another process ([`EmulatedGuestMemfd::send_to`] /
//! [`EmulatedGuestMemfd::receive`]), and what a follower does when the owner converts
//! ([`EmulatedGuestMemfd::follow`]).
//!
//! Over a connected Unix socket go, in one message, a header (size, flags, the number of
//! private runs), the memory file and one end of a new peer channel (`SCM_RIGHTS`), then the
//! private runs. The owner sends it under its state lock and adds the channel as a peer in
//! the same hold, so the receiver starts from exactly the attributes that every later
//! message on the channel changes. The receiver's file is a follower: it maps, reads and
//! writes; its mappings are revoked and restored by its agent as the owner converts.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use super::{peers, EmulatedGuestMemfd, EmulatedOptions, StateWrite};
use crate::attributes::pages_of;
use crate::error::{Errno, KernelResult};
use crate::sys::{peer, PAGE_SIZE};
use crate::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};

const MAGIC: u64 = u64::from_le_bytes(*b"GMEMFD01");
const HEADER: usize = 32;
/// Runs sent at most (a receiver allocates nothing larger).
const MAX_RUNS: u64 = 1 << 24;

fn io_errno(e: &std::io::Error) -> Errno {
    Errno(e.raw_os_error().unwrap_or(libc::EIO))
}

impl EmulatedGuestMemfd {
    /// Hands the file to the process at the other end of `socket`, which calls
    /// [`EmulatedGuestMemfd::receive`]. From then on every conversion here returns only once
    /// that process has applied it to its mappings (until it exits or drops the file).
    pub fn send_to(&self, socket: &UnixStream) -> KernelResult<()> {
        self.owner_only()?;
        let st = self.write_state();
        let (first, last) = pages_of(0, self.inner.size);
        let runs: Vec<(u64, u64)> = st
            .attrs
            .runs(first, last)
            .into_iter()
            .filter(|r| r.2)
            .map(|(s, e, _)| (s * PAGE_SIZE, e * PAGE_SIZE))
            .collect();
        let (mine, theirs) = peer::seqpacket_pair()?;
        let mut header = [0u8; HEADER];
        header[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        header[8..16].copy_from_slice(&self.inner.size.to_le_bytes());
        header[16..24].copy_from_slice(&self.inner.flags.to_le_bytes());
        header[24..32].copy_from_slice(&(runs.len() as u64).to_le_bytes());
        peer::send_with_fds(
            socket.as_fd(),
            &header,
            &[self.inner.memfd.as_fd(), theirs.as_fd()],
        )?;
        let mut body = Vec::new();
        body.try_reserve_exact(runs.len() * 16)
            .map_err(|_| Errno::ENOMEM)?;
        for (s, e) in &runs {
            body.extend_from_slice(&s.to_le_bytes());
            body.extend_from_slice(&e.to_le_bytes());
        }
        (&*socket).write_all(&body).map_err(|e| io_errno(&e))?;
        self.inner.peers.add(mine);
        drop(st);
        Ok(())
    }

    /// Receives a file sent with [`EmulatedGuestMemfd::send_to`]: a follower of the sender's
    /// file, with its attributes, whose mappings follow the sender's conversions. EPROTO for
    /// anything that is not such a message.
    pub fn receive(socket: &UnixStream) -> KernelResult<EmulatedGuestMemfd> {
        let mut header = [0u8; HEADER];
        let (n, mut fds) = peer::recv_with_fds(socket.as_fd(), &mut header, 2)?;
        if n < HEADER {
            (&*socket)
                .read_exact(&mut header[n..])
                .map_err(|e| io_errno(&e))?;
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let (magic, size, flags, nruns) = (word(0), word(8), word(16), word(24));
        if magic != MAGIC || fds.len() != 2 || nruns > MAX_RUNS {
            return Err(Errno(libc::EPROTO));
        }
        let channel = fds.pop().ok_or(Errno(libc::EPROTO))?;
        let memfd = fds.pop().ok_or(Errno(libc::EPROTO))?;
        let mut body = Vec::new();
        body.try_reserve_exact(nruns as usize * 16)
            .map_err(|_| Errno::ENOMEM)?;
        body.resize(nruns as usize * 16, 0);
        (&*socket).read_exact(&mut body).map_err(|e| io_errno(&e))?;
        // A follower keeps only the flags that say what the host may do; platform models and
        // the direct map are the owner's.
        let flags = flags & (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
        let file = Self::with_memfd(
            memfd,
            size,
            flags | GUEST_MEMFD_FLAG_INIT_SHARED,
            EmulatedOptions::default(),
        )?;
        file.inner
            .follower
            .store(true, std::sync::atomic::Ordering::SeqCst);
        {
            let mut st = file.write_state();
            for rec in body.chunks_exact(16) {
                let mut a = [0u8; 8];
                a.copy_from_slice(&rec[..8]);
                let s = u64::from_le_bytes(a);
                a.copy_from_slice(&rec[8..]);
                let e = u64::from_le_bytes(a);
                if s >= e || e > size || s % PAGE_SIZE != 0 || e % PAGE_SIZE != 0 {
                    return Err(Errno(libc::EPROTO));
                }
                st.attrs.set_range(s / PAGE_SIZE, e / PAGE_SIZE, true);
            }
        }
        peers::spawn_agent(channel, std::sync::Arc::downgrade(&file.inner))?;
        Ok(file)
    }

    /// A follower applies one change of the owner's: `[start, end)` is now private (or
    /// shared). Its mappings are revoked or restored and its attribute mirror updated; its
    /// own peers (its fork children) follow before it answers.
    pub(super) fn follow(&self, start: u64, end: u64, private: bool) -> KernelResult<()> {
        if start % PAGE_SIZE != 0 || end % PAGE_SIZE != 0 || start >= end || end > self.inner.size {
            return Err(Errno::EINVAL);
        }
        let mut st: StateWrite<'_> = self.write_state();
        let (first, last) = (start / PAGE_SIZE, end / PAGE_SIZE);
        // As in a conversion: every allocation before the point of no return, fallibly.
        let changing = self.changing_runs(&st, first, last, private)?;
        if changing.is_empty() {
            return Ok(());
        }
        if st.attrs.try_reserve().is_err() || self.inner.peers.try_reserve().is_err() {
            return Err(Errno::ENOMEM);
        }
        if private {
            self.apply_all(&mut st, &changing, Self::revoke, Self::restore)?;
        } else {
            self.apply_all(&mut st, &changing, Self::restore, Self::revoke_forced)?;
        }
        if let Err(e) = self.inner.peers.set(&changing, private) {
            let _ = if private {
                self.apply_all(&mut st, &changing, Self::restore, Self::revoke_forced)
            } else {
                self.apply_all(&mut st, &changing, Self::revoke_forced, Self::restore)
            };
            let _ = self.inner.peers.set(&changing, !private);
            return Err(e);
        }
        st.attrs.set_range(first, last, private);
        self.inner.guest_view.zap_changed(&changing);
        Ok(())
    }
}
