//! `fork()`: no file's lock may be held by another thread when the address space is copied
//! (the child would inherit it held, for ever).
//!
//! A child made by `fork` or by `clone` without `CLONE_VM` needs nothing of its own to be
//! bound by the file's rules: its host mappings are registered where the parent's were, and
//! the kernel hands its userfaultfd to the parent's guard (`UFFD_EVENT_FORK`), which serves
//! its faults and reaches its address space in every conversion ([`super::guard`]). So the
//! fork handlers (`pthread_atfork`, installed with the first file) only order `fork` with
//! gmem's own locks: *prepare* takes [`FORK_LOCK`] exclusively — every holder of a file's
//! lock holds it shared — and *parent* and *child* release it. They call nothing else (no
//! allocation, no system call another library may interpose), so a fork cannot hang in them;
//! the guard thread never takes the lock, so `fork`, which waits for the guard to read the
//! event, never waits for it either. A raw `clone` bypasses the handlers and is guarded all
//! the same (it only risks a lock held at that moment in its own copy of gmem, which it does
//! not use: a child's files are followers).

use std::cell::RefCell;
use std::sync::{Once, RwLock, RwLockWriteGuard};

use crate::sys::peer;

/// Held shared by every operation on any emulated file's state and by everything else that
/// takes one of a file's locks (pin releases, the copies of accesses, the page-bit queries),
/// exclusively by the fork handlers across `fork()`.
pub(super) static FORK_LOCK: RwLock<()> = RwLock::new(());

static HANDLERS: Once = Once::new();

thread_local! {
    static HELD: RefCell<Option<RwLockWriteGuard<'static, ()>>> = const { RefCell::new(None) };
}

/// Shared access to the fork lock.
pub(super) fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    FORK_LOCK
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Installs the fork handlers once.
pub(super) fn register() {
    HANDLERS.call_once(|| {
        // Without handlers a fork taken while another thread holds a file's lock leaves the
        // child that lock held; the file still works in this process.
        let _ = peer::atfork(prepare, release, release);
    });
}

extern "C" fn prepare() {
    let fork = FORK_LOCK
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    HELD.with(|h| *h.borrow_mut() = Some(fork));
}

extern "C" fn release() {
    HELD.with(|h| drop(h.borrow_mut().take()));
}
