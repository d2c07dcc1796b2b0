//! `fork()`: a child process keeps the parent's host mappings of every file, so it must be
//! bound by the same rules. Fork copies neither the poison markers of a shared file mapping
//! nor its userfaultfd registration (hole mappings are VMAs and are copied as they are), and
//! the parent's later conversions must reach the child.
//!
//! Fork handlers (`pthread_atfork`), registered with the first file:
//! - *prepare* (forking thread, before the fork): takes [`FORK_LOCK`] exclusively, so no
//!   other thread is inside any file's state (the child then inherits no lock held by a
//!   thread that does not exist there), and gives every live file a channel to the child;
//! - *parent*: each file adds its end of the channel as a peer
//!   ([`super::peers::Peers`]); the lock is released;
//! - *child* (before `fork()` returns there, when no other thread exists): each file becomes a
//!   follower ([`EmulatedGuestMemfd::follow`]): its userfaultfd is replaced by the child's own,
//!   every private run of every mapping is revoked again, and an agent thread starts that
//!   applies the parent's conversions; the lock is released.
//!
//! A program that forks with a raw `clone` system call bypasses the handlers (as it bypasses
//! every library's); `std::process::Command`, `posix_spawn` and `vfork` + `exec` replace the
//! address space, and with it the mappings, before anything can touch them.

use std::cell::RefCell;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard, Once, RwLock, RwLockWriteGuard, Weak};

use super::{peers, EmulatedGuestMemfd, Inner, Mechanism};
use crate::attributes::pages_of;
use crate::error::KernelResult;
use crate::sys::{peer, PAGE_SIZE};

/// Held shared by every operation on any emulated file's state and by everything else that
/// takes one of a file's locks (the fault service, pin releases, the copies of accesses,
/// the peer count, the page-bit queries), exclusively by the fork handlers across `fork()`:
/// a lock of the file held by another thread at the fork would stay held forever in the
/// child (a peer count taken by a test while another thread forked once left a child's
/// agent waiting on the peer list, and the owner's conversions failed after the timeout).
pub(super) static FORK_LOCK: RwLock<()> = RwLock::new(());

/// Every live file of this process.
static FILES: Mutex<Vec<Weak<Inner>>> = Mutex::new(Vec::new());

static HANDLERS: Once = Once::new();

/// A file's channel to the child: (parent end, child end).
type Channel = (OwnedFd, OwnedFd);

struct Held {
    _fork: RwLockWriteGuard<'static, ()>,
    _files: MutexGuard<'static, Vec<Weak<Inner>>>,
    /// Each live file and its channel (parent end, child end); `None` if the channel could
    /// not be made (the child then revokes every page of that file in its mappings).
    files: Vec<(Arc<Inner>, Option<Channel>)>,
}

thread_local! {
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

/// Shared access to the fork lock.
pub(super) fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    FORK_LOCK
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Records a new file and installs the fork handlers once.
pub(super) fn register(inner: &Arc<Inner>) {
    HANDLERS.call_once(|| {
        // Without handlers a fork child would not follow conversions: nothing else to do
        // than to say so where it matters (the file still works in this process).
        let _ = peer::atfork(prepare, parent, child);
    });
    let mut files = FILES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    files.retain(|w| w.strong_count() > 0);
    files.push(Arc::downgrade(inner));
}

extern "C" fn prepare() {
    let fork = FORK_LOCK
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let files_guard = FILES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let files = files_guard
        .iter()
        .filter_map(Weak::upgrade)
        .map(|inner| (inner, peer::seqpacket_pair().ok()))
        .collect();
    HELD.with(|h| {
        *h.borrow_mut() = Some(Held {
            _fork: fork,
            _files: files_guard,
            files,
        });
    });
}

extern "C" fn parent() {
    let Some(held) = HELD.with(|h| h.borrow_mut().take()) else {
        return;
    };
    let Held {
        _fork,
        _files,
        files,
    } = held;
    for (inner, ends) in files {
        if let Some((parent_end, _child_end)) = ends {
            inner.peers.add(parent_end);
        }
    }
    // The child's ends close here, then the FILES lock and the fork lock are released.
}

extern "C" fn child() {
    let Some(held) = HELD.with(|h| h.borrow_mut().take()) else {
        return;
    };
    for (inner, ends) in held.files.iter() {
        let file = EmulatedGuestMemfd {
            inner: Arc::clone(inner),
        };
        let end = ends.as_ref().and_then(|(_, c)| c.try_clone().ok());
        file.become_fork_child(end);
    }
}

impl EmulatedGuestMemfd {
    /// In a fork child (the fork lock is held by this, the only, thread): this copy of the file
    /// becomes a follower of the parent's. Its peers are the parent's, not ours: they are
    /// forgotten. Every private run is revoked again in every mapping. Without a channel
    /// (`end` is `None`), or if the agent cannot start, every page of the file is revoked in
    /// this process's mappings: nothing private can leak, at the cost of shared pages too.
    fn become_fork_child(&self, end: Option<OwnedFd>) {
        let inner = &self.inner;
        inner
            .follower
            .store(true, std::sync::atomic::Ordering::SeqCst);
        inner.peers.forget_all();
        let mut st = inner
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let uffd_ok = match &inner.mechanism {
            Mechanism::Poison(uffd) => uffd.reopen_in_child().is_ok(),
            Mechanism::Remap => true,
        };
        let agent = match end {
            Some(end) if uffd_ok => peers::spawn_agent(end, Arc::downgrade(inner)).is_ok(),
            _ => false,
        };
        let size = inner.size;
        let private: Vec<(u64, u64)> = if agent {
            let (first, last) = pages_of(0, size);
            st.attrs
                .runs(first, last)
                .into_iter()
                .filter(|r| r.2)
                .map(|(s, e, _)| (s * PAGE_SIZE, e * PAGE_SIZE))
                .collect()
        } else {
            vec![(0, size)]
        };
        for m in st.mappings.iter_mut() {
            for &(s, e) in &private {
                // Holes survived the fork; markers did not. Revoke the rest of each run
                // (a hole over the whole run if that cannot be done piecewise).
                let mut at = s;
                for (hs, he) in m.holes_in(s, e).unwrap_or_default() {
                    if at < hs && self.revoke(m, at, hs).is_err() {
                        let _ = self.revoke_forced(m, at, hs);
                    }
                    at = he;
                }
                if at < e && self.revoke(m, at, e).is_err() {
                    let _ = self.revoke_forced(m, at, e);
                }
            }
        }
    }
}

/// A panic-free check that the handlers are installed (for tests and reports).
#[allow(dead_code)]
pub(super) fn handlers_installed() -> KernelResult<bool> {
    Ok(HANDLERS.is_completed())
}
