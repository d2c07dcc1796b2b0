//! `fork()`: no file's lock may be held by another thread when the address space is copied
//! (the child would inherit it held, for ever).
//!
//! A child made by `fork` or by `clone` without `CLONE_VM` needs nothing of its own to be
//! bound by the file's rules: its host mappings are registered where the parent's were, and
//! the kernel hands its userfaultfd to the parent's guard (`UFFD_EVENT_FORK`), which serves
//! its faults and reaches its address space in every conversion ([`super::guard`]). So the
//! fork handlers (`pthread_atfork`, installed with the first file) only order `fork` with
//! gmem's own locks: *prepare* takes [`FORK_LOCK`] exclusively — every holder of a file's
//! lock holds it shared — and *parent* and *child* release it. Besides, *prepare* guards again
//! the blocks of huge-folio files released to the kernel's faults, by system calls alone
//! ([`super::guard::reguard_for_fork`]). They call nothing else (no allocation, no C library
//! function another library may interpose), so a fork cannot hang in them;
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

/// Held shared across the system calls that make (or close) one of gmem's private
/// descriptors or a mapping a fork child must not inherit, until it is recorded (or after it
/// is forgotten): no fork happens in between. Taken exclusively by the *prepare* handler
/// after [`FORK_LOCK`]. Its holders call nothing that waits on gmem, so the guard's server
/// thread, which never takes [`FORK_LOCK`], may take it.
static QUIET: RwLock<()> = RwLock::new(());

static HANDLERS: Once = Once::new();

type Held = (RwLockWriteGuard<'static, ()>, RwLockWriteGuard<'static, ()>);

thread_local! {
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

/// Shared access to the fork lock.
pub(super) fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    FORK_LOCK
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// No fork until the guard goes ([`QUIET`]): hold it across making (or closing) a private
/// descriptor or a mapping and recording (or forgetting) it.
pub(super) fn quiet() -> std::sync::RwLockReadGuard<'static, ()> {
    register();
    QUIET
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
    let quiet = QUIET
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Released blocks of huge-folio files are guarded again, so the child inherits them
    // (system calls only: `guard::reguard_for_fork`), never one of gmem's views made at a
    // released block's old address (their table is read under its lock, held only here:
    // not across the fork, which waits for the guard's reader).
    super::guard::reguard_for_fork(&crate::sys::own_views());
    HELD.with(|h| *h.borrow_mut() = Some((fork, quiet)));
    FORKING_PID.store(peer::getpid_raw(), Ordering::Relaxed);
}

/// The pid of the process in `fork` (set by `prepare`): the child's parent.
static FORKING_PID: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

extern "C" fn release() {
    HELD.with(|h| drop(h.borrow_mut().take()));
}

extern "C" fn child() {
    release();
    // SAFETY: a fork child's handler: one thread, and no guard of the views table alive
    // (the prepare handler let its own go before the fork).
    #[allow(unsafe_code)]
    unsafe {
        crate::sys::own_views_forget_in_child();
    }
    super::guard::forget_own_uffd();
    forget_private_fds();
    if INHERITS_HOST_MAPPINGS.load(Ordering::Relaxed)
        && !(peer::die_with_parent(FORKING_PID.load(Ordering::Relaxed))
            && crate::sys::seccomp::restrict_fork_child())
    {
        // What the child cannot be trusted with (a userfaultfd, growing mappings, new pid
        // namespaces: `sys::seccomp`) could not be taken from it, or its parent has gone
        // already (its host mappings are no longer guarded): it does not run (fail closed;
        // the kernel refuses a filter only without memory or past its length limit). System
        // calls only.
        crate::sys::peer::exit_unrestricted_child();
    }
}

/// Set once this process has made a host mapping that fork children inherit (under the
/// guard, or a received file's): from then on every fork child gets the child's filter.
static INHERITS_HOST_MAPPINGS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Records that this process has a host mapping fork children inherit (the child's filter
/// is assembled now: the child handler may not allocate).
pub(super) fn host_mapping_inherited() {
    if !INHERITS_HOST_MAPPINGS.load(Ordering::Relaxed) {
        crate::sys::seccomp::prepare_fork_child_filter();
        INHERITS_HOST_MAPPINGS.store(true, Ordering::Relaxed);
    }
}

/// Private descriptors are tracked below this number (the kernel's default `fs.nr_open`): a
/// bit each, 128 KiB of zero pages until used.
const TRACKED: usize = 1 << 20;

/// Bit `n`: descriptor `n` is one of gmem's private descriptors (a file's data, the guard's
/// userfaultfds and epoll, a replacement pipe, a receiver's userfaultfd), which a fork child
/// must not keep.
static PRIVATE_FDS: [AtomicU64; TRACKED / 64] = [const { AtomicU64::new(0) }; TRACKED / 64];

/// One past the highest word of [`PRIVATE_FDS`] ever used (the child handler scans below it).
static WORDS_USED: AtomicUsize = AtomicUsize::new(0);

/// The descriptor a fork child gets in place of each private one: the empty hole file.
static PLACEHOLDER: AtomicI32 = AtomicI32::new(-1);

/// Records `fd` as private (the caller holds [`quiet`] since it was made, or is the guard's
/// reader, which may take no lock). False if it is past [`TRACKED`].
pub(super) fn track_fd(fd: RawFd) -> bool {
    match usize::try_from(fd) {
        Ok(n) if n < TRACKED => {
            WORDS_USED.fetch_max(n / 64 + 1, Ordering::Relaxed);
            PRIVATE_FDS[n / 64].fetch_or(1 << (n % 64), Ordering::Relaxed);
            true
        }
        _ => false,
    }
}

/// Forgets `fd` (the caller holds [`quiet`] until it is closed — except the guard's server
/// and a receiver's orphan thread, which may take no lock: a fork child that copies such a
/// descriptor in between has it replaced by kind, as every userfaultfd it did not make).
pub(super) fn untrack_fd(fd: RawFd) {
    if let Ok(n) = usize::try_from(fd) {
        if n < TRACKED {
            PRIVATE_FDS[n / 64].fetch_and(!(1 << (n % 64)), Ordering::Relaxed);
        }
    }
}

/// Sets the placeholder fork children get (the process's hole file).
pub(super) fn set_placeholder(fd: BorrowedFd<'static>) {
    PLACEHOLDER.store(fd.as_raw_fd(), Ordering::Relaxed);
}

/// In a fork child: every private descriptor becomes the placeholder. System calls only (no
/// allocation, no lock, nothing an interposer sees).
fn forget_private_fds() {
    let placeholder = PLACEHOLDER.load(Ordering::Relaxed);
    if placeholder < 0 {
        return;
    }
    for (k, word) in PRIVATE_FDS[..WORDS_USED.load(Ordering::Relaxed).min(TRACKED / 64)]
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
    // And those installed an instant before their record (a fork event's userfaultfd, a
    // received file's memory): found by kind.
    peer::replace_unrecorded_private_fds(placeholder);
}

/// The descriptor of an emulated file's memory, recorded so that a fork child does not keep
/// it (see the module documentation). Made and dropped under [`quiet`], so no fork sees it
/// open and unrecorded.
#[derive(Debug)]
pub(super) struct DataFd {
    fd: Option<OwnedFd>,
    placeholder: BorrowedFd<'static>,
}

impl DataFd {
    /// Records `fd` (moved below [`TRACKED`] if it is not), with `placeholder` to stand for it
    /// in fork children. `_quiet` is [`quiet`], held since `fd` was made. EMFILE if no number
    /// below [`TRACKED`] is free.
    pub(super) fn track(
        fd: OwnedFd,
        placeholder: BorrowedFd<'static>,
        _quiet: &std::sync::RwLockReadGuard<'static, ()>,
    ) -> KernelResult<DataFd> {
        let fd = if usize::try_from(fd.as_raw_fd()).is_ok_and(|n| n < TRACKED) {
            fd
        } else {
            peer::dup_low(fd.as_fd())?
        };
        set_placeholder(placeholder);
        if !track_fd(fd.as_raw_fd()) {
            return Err(Errno(libc::EMFILE));
        }
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
        // Not the fork lock: the guard's server thread may drop the last reference to a file
        // (found in review: it would wait on a fork that waits on it).
        let _quiet = quiet();
        if let Some(fd) = self.fd.take() {
            // Forgotten, then closed, with no fork in between: the number is free only once
            // its bit is clear, so a file made meanwhile by another thread keeps its own.
            untrack_fd(fd.as_raw_fd());
            peer::close_raw(fd);
        }
    }
}

/// A new replacement pipe, recorded as private (made under [`quiet`]).
pub(super) fn private_pipe() -> KernelResult<crate::sys::HoldPipe> {
    let _quiet = quiet();
    let pipe = crate::sys::HoldPipe::new()?;
    for fd in pipe.raw_fds() {
        track_fd(fd);
    }
    Ok(pipe)
}

/// Forgets and closes a pipe made by [`private_pipe`] (under [`quiet`], by system call).
pub(super) fn close_private_pipe(pipe: crate::sys::HoldPipe) {
    let _quiet = quiet();
    for fd in pipe.raw_fds() {
        untrack_fd(fd);
    }
    pipe.close_raw();
}

/// Forgets and closes a private userfaultfd that is not kept (under [`quiet`], by system
/// call).
pub(super) fn close_private_uffd(uffd: crate::sys::PoisonFd) {
    let _quiet = quiet();
    untrack_fd(uffd.raw_fd());
    uffd.close_raw();
}

/// [`close_private_uffd`] without [`quiet`], for a thread that may take no lock (a receiver's
/// orphan thread, which a fork may be waiting on): a fork child that copies the descriptor in
/// between has it replaced by kind, as every userfaultfd it did not make.
pub(super) fn close_private_uffd_unlocked(uffd: crate::sys::PoisonFd) {
    untrack_fd(uffd.raw_fd());
    uffd.close_raw();
}

/// Records a userfaultfd this process received or made as private (under [`quiet`]; one
/// received by `recvmsg` was open, unrecorded, since that call returned).
pub(super) fn track_uffd(uffd: &crate::sys::PoisonFd) {
    let _quiet = quiet();
    track_fd(uffd.raw_fd());
}

/// A socket recorded as private (a fork child gets the hole file in its place): the link
/// between a receiver and the owner it asks to convert ([`super::handoff`]). Forgotten and
/// closed (by system call) under [`quiet`] when dropped.
#[derive(Debug)]
pub(super) struct PrivateStream {
    s: Option<std::os::unix::net::UnixStream>,
}

impl PrivateStream {
    /// Records `s` (made under `_quiet`, held since).
    pub(super) fn track(
        s: std::os::unix::net::UnixStream,
        _quiet: &std::sync::RwLockReadGuard<'static, ()>,
    ) -> PrivateStream {
        track_fd(s.as_raw_fd());
        PrivateStream { s: Some(s) }
    }

    /// The socket (None only inside `drop`).
    pub(super) fn get(&self) -> Option<&std::os::unix::net::UnixStream> {
        self.s.as_ref()
    }
}

impl Drop for PrivateStream {
    fn drop(&mut self) {
        let _quiet = quiet();
        if let Some(s) = self.s.take() {
            untrack_fd(s.as_raw_fd());
            peer::close_raw(OwnedFd::from(s));
        }
    }
}
