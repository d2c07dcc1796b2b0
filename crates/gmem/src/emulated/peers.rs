//! Other processes that map the file: forked children and processes the file was handed to
//! (its *peers*). The series' principle holds in every process that maps the file: a
//! conversion to private returns only once the pages are revoked in all of them.
//!
//! Each peer is a `SOCK_SEQPACKET` channel to one process. The process that converts (the
//! file's *owner*) tells every peer, in order, which runs changed and to what, then waits for
//! each peer's acknowledgement; a peer's *agent* thread applies each change to its own host
//! mappings with the same revocation engine as the owner's (markers or holes) before it
//! acknowledges. A peer whose process has exited (its end closed) is forgotten. A peer that
//! does not answer within [`PEER_TIMEOUT`], or cannot apply the change, fails the
//! conversion: it is rolled back locally and the peers are told the old attributes, in the
//! same order, so a late peer ends where the owner is.
//!
//! Peers come from two places:
//! - `fork()`: fork handlers (`pthread_atfork`) give each live file a channel to the child
//!   before the fork and start the child's agent after it. Fork copies neither the poison
//!   markers of a shared file mapping nor the userfaultfd registration; the child's handler
//!   therefore opens its own userfaultfd and revokes every private run again before `fork()`
//!   returns in the child, when no other thread exists there. Hole mappings are VMAs and are
//!   copied as they are.
//! - [`crate::EmulatedGuestMemfd::send_to`] / [`crate::EmulatedGuestMemfd::receive`]: the
//!   memory file, a channel and the private runs pass over a Unix socket (`SCM_RIGHTS`).
//!
//! A peer is a *follower*: it maps, reads and writes the file, but conversions, allocation,
//! punch-hole, pins and populate are the owner's (EOPNOTSUPP in a follower).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use super::{EmulatedGuestMemfd, Inner};
use crate::error::{Errno, KernelResult};
use crate::sys::peer as sys;

/// How long the owner waits for a peer's acknowledgement before the conversion fails with
/// EAGAIN (nothing changed).
pub(super) const PEER_TIMEOUT: Duration = Duration::from_secs(10);

const OP_PRIVATE: u32 = 1;
const OP_SHARED: u32 = 2;
const OP_BARRIER: u32 = 3;
const OP_ACK: u32 = 4;

/// One message: `op`, an errno (acks), a byte range, a sequence number (barrier and ack).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Wire {
    pub(super) op: u32,
    pub(super) errno: i32,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) seq: u64,
}

impl Wire {
    const SIZE: usize = 32;

    fn encode(&self) -> [u8; Wire::SIZE] {
        let mut b = [0u8; Wire::SIZE];
        b[0..4].copy_from_slice(&self.op.to_le_bytes());
        b[4..8].copy_from_slice(&self.errno.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    fn decode(b: &[u8; Wire::SIZE]) -> Wire {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        Wire {
            op: u32_at(0),
            errno: u32_at(4) as i32,
            offset: u64_at(8),
            len: u64_at(16),
            seq: u64_at(24),
        }
    }
}

/// The owner's side: one channel per peer process.
#[derive(Debug, Default)]
pub(super) struct Peers {
    list: Mutex<Vec<OwnedFd>>,
    seq: std::sync::atomic::AtomicU64,
    /// Room for the indices of peers found gone during one [`Peers::set`], reserved by
    /// [`Peers::try_reserve`] before a conversion's point of no return.
    gone: Mutex<Vec<usize>>,
}

impl Peers {
    /// Forgets every peer (a fork child's copy: those are the parent's).
    pub(super) fn forget_all(&self) {
        self.lock().clear();
    }

    /// Adds a peer (the owner's end of its channel).
    pub(super) fn add(&self, end: OwnedFd) {
        self.lock().push(end);
    }

    /// How many peers are attached. Under the fork lock, as every other holder of this lock:
    /// a fork child must never inherit it held (its agent forwards through it).
    pub(super) fn count(&self) -> usize {
        let _fork = super::fork::shared();
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<OwnedFd>> {
        self.list
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes sure the next [`Peers::set`] allocates nothing (ENOMEM otherwise).
    pub(super) fn try_reserve(&self) -> Result<(), std::collections::TryReserveError> {
        let n = self.lock().len();
        if n == 0 {
            return Ok(());
        }
        let mut gone = self
            .gone
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        gone.clear();
        gone.try_reserve(n)
    }

    /// Tells every peer that the byte runs `runs` are now private (or shared) and waits until
    /// each has applied it to its mappings. Peers that have gone are forgotten. Err: the
    /// first errno a peer answered, or EAGAIN when one did not answer in time.
    pub(super) fn set(&self, runs: &[(u64, u64)], private: bool) -> KernelResult<()> {
        let mut list = self.lock();
        if list.is_empty() {
            return Ok(());
        }
        let seq = self
            .seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .wrapping_add(1);
        let op = if private { OP_PRIVATE } else { OP_SHARED };
        let mut gone = self
            .gone
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        gone.clear();
        for (i, end) in list.iter().enumerate() {
            let sent = runs
                .iter()
                .try_for_each(|&(s, e)| {
                    sys::send_record(
                        end.as_fd(),
                        &Wire {
                            op,
                            errno: 0,
                            offset: s,
                            len: e - s,
                            seq,
                        }
                        .encode(),
                    )
                })
                .and_then(|()| {
                    sys::send_record(
                        end.as_fd(),
                        &Wire {
                            op: OP_BARRIER,
                            errno: 0,
                            offset: 0,
                            len: 0,
                            seq,
                        }
                        .encode(),
                    )
                });
            if sent.is_err() {
                // EPIPE / ECONNRESET: the process is gone, and its mappings with it.
                gone.push(i);
            }
        }
        let mut first_err = None;
        for (i, end) in list.iter().enumerate() {
            if gone.contains(&i) {
                continue;
            }
            loop {
                match sys::recv_record::<{ Wire::SIZE }>(end.as_fd(), Some(PEER_TIMEOUT)) {
                    Ok(Some(b)) => {
                        let w = Wire::decode(&b);
                        if w.op != OP_ACK || w.seq != seq {
                            // A late acknowledgement of an earlier request: skip it.
                            continue;
                        }
                        if w.errno != 0 && first_err.is_none() {
                            first_err = Some(Errno(w.errno));
                        }
                    }
                    Ok(None) => gone.push(i),
                    Err(e) if e == Errno(libc::ETIMEDOUT) => {
                        first_err.get_or_insert(Errno::EAGAIN);
                    }
                    Err(_) => gone.push(i),
                }
                break;
            }
        }
        gone.sort_unstable();
        gone.dedup();
        for &i in gone.iter().rev() {
            list.remove(i);
        }
        match first_err {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// Starts a follower's agent: a thread that applies the owner's changes, in order, to this
/// process's copy of the file (held weakly: the agent ends with the file or the channel).
pub(super) fn spawn_agent(end: OwnedFd, file: Weak<Inner>) -> KernelResult<()> {
    std::thread::Builder::new()
        .name("gmem-peer".into())
        .spawn(move || agent(&end, &file))
        .map(drop)
        .map_err(|_| Errno::EAGAIN)
}

fn agent(end: &OwnedFd, file: &Weak<Inner>) {
    let mut first_err = 0i32;
    while let Ok(Some(b)) = sys::recv_record::<{ Wire::SIZE }>(end.as_fd(), None) {
        let w = Wire::decode(&b);
        match w.op {
            OP_PRIVATE | OP_SHARED => {
                let Some(inner) = file.upgrade() else { return };
                let f = EmulatedGuestMemfd { inner };
                let r = w
                    .offset
                    .checked_add(w.len)
                    .ok_or(Errno::EINVAL)
                    .and_then(|e| f.follow(w.offset, e, w.op == OP_PRIVATE));
                if let Err(e) = r {
                    if first_err == 0 {
                        first_err = e.raw();
                    }
                }
            }
            OP_BARRIER => {
                let ack = Wire {
                    op: OP_ACK,
                    errno: first_err,
                    offset: 0,
                    len: 0,
                    seq: w.seq,
                };
                first_err = 0;
                if sys::send_record(end.as_fd(), &ack.encode()).is_err() {
                    return;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trips() {
        let w = Wire {
            op: OP_SHARED,
            errno: -3,
            offset: 1 << 40,
            len: 4096,
            seq: u64::MAX,
        };
        assert_eq!(Wire::decode(&w.encode()), w);
    }
}
