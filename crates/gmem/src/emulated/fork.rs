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
//!
//! The memory file's descriptor is the one path to the data that does not go through a
//! mapping (`pread` reads a private page). A fork child must not keep it: the *child* handler
//! replaces every file's data descriptor ([`DataFd`], recorded in a bitmap by number) with the
//! empty hole file (`dup3` by system call), so the child's descriptor table holds no path to
//! the data while its host mappings go on faulting through the parent's guard. What the
//! handlers cannot reach (a raw `clone` runs none) is in DESIGN.md's trust boundary.

use std::cell::RefCell;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Once, RwLock, RwLockWriteGuard};

use crate::error::{Errno, KernelResult};
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
        let _ = peer::atfork(prepare, release, child);
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

extern "C" fn child() {
    release();
    forget_data_fds();
}

/// Data descriptors are tracked below this number (the kernel's default `fs.nr_open`): a
/// bit each, 128 KiB of zero pages until used.
const TRACKED: usize = 1 << 20;

/// Bit `n`: descriptor `n` is an emulated file's data descriptor.
static DATA_FDS: [AtomicU64; TRACKED / 64] = [const { AtomicU64::new(0) }; TRACKED / 64];

/// One past the highest word of [`DATA_FDS`] ever used (the child handler scans below it).
static WORDS_USED: AtomicUsize = AtomicUsize::new(0);

/// The descriptor a fork child gets in place of each data descriptor: the empty hole file.
static PLACEHOLDER: AtomicI32 = AtomicI32::new(-1);

/// In a fork child: every data descriptor becomes the placeholder. System calls only (no
/// allocation, no lock, nothing an interposer sees).
fn forget_data_fds() {
    let placeholder = PLACEHOLDER.load(Ordering::Relaxed);
    if placeholder < 0 {
        return;
    }
    for (k, word) in DATA_FDS[..WORDS_USED.load(Ordering::Relaxed).min(TRACKED / 64)]
        .iter()
        .enumerate()
    {
        let mut bits = word.load(Ordering::Relaxed);
        while bits != 0 {
            let bit = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            // Below TRACKED, an i32.
            #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
            let fd = (k * 64 + bit) as RawFd;
            let _ = peer::dup3_raw(placeholder, fd);
        }
    }
}

/// The descriptor of an emulated file's memory, recorded so that a fork child does not keep
/// it (see the module documentation). Made and dropped under the fork lock, so no fork sees
/// it open and unrecorded.
#[derive(Debug)]
pub(super) struct DataFd {
    fd: Option<OwnedFd>,
    placeholder: BorrowedFd<'static>,
}

impl DataFd {
    /// Records `fd` (moved below [`TRACKED`] if it is not), with `placeholder` to stand for it
    /// in fork children. `_fork` is the fork lock, held since `fd` was made. EMFILE if no
    /// number below [`TRACKED`] is free.
    pub(super) fn track(
        fd: OwnedFd,
        placeholder: BorrowedFd<'static>,
        _fork: &std::sync::RwLockReadGuard<'static, ()>,
    ) -> KernelResult<DataFd> {
        let fd = if usize::try_from(fd.as_raw_fd()).is_ok_and(|n| n < TRACKED) {
            fd
        } else {
            peer::dup_low(fd.as_fd())?
        };
        let n = usize::try_from(fd.as_raw_fd()).map_err(|_| Errno::EBADF)?;
        if n >= TRACKED {
            return Err(Errno(libc::EMFILE));
        }
        PLACEHOLDER.store(placeholder.as_raw_fd(), Ordering::Relaxed);
        WORDS_USED.fetch_max(n / 64 + 1, Ordering::Relaxed);
        DATA_FDS[n / 64].fetch_or(1 << (n % 64), Ordering::Relaxed);
        Ok(DataFd {
            fd: Some(fd),
            placeholder,
        })
    }
}

impl AsFd for DataFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // `fd` is None only inside `drop`.
        self.fd.as_ref().map_or(self.placeholder, AsFd::as_fd)
    }
}

impl Drop for DataFd {
    fn drop(&mut self) {
        let _fork = shared();
        if let Some(fd) = self.fd.take() {
            // Forgotten, then closed, with no fork in between: the number is free only once
            // its bit is clear, so a file made meanwhile by another thread keeps its own.
            if let Ok(n) = usize::try_from(fd.as_raw_fd()) {
                if n < TRACKED {
                    DATA_FDS[n / 64].fetch_and(!(1 << (n % 64)), Ordering::Relaxed);
                }
            }
            peer::close_raw(fd);
        }
    }
}
