//! userfaultfd: poison markers, fault events and their resolution, and the `UFFDIO_API`
//! handshake.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::{check, Mmap};
use crate::error::{Errno, KernelResult};
use crate::uapi::{
    uffd_msg, uffdio_api, uffdio_continue, uffdio_poison, uffdio_range, uffdio_register,
    UFFDIO_API, UFFDIO_CONTINUE, UFFDIO_POISON, UFFDIO_REGISTER, UFFDIO_REGISTER_MODE_MINOR,
    UFFDIO_REGISTER_MODE_MISSING, UFFDIO_REGISTER_MODE_WP, UFFDIO_WAKE, UFFD_API,
    UFFD_EVENT_PAGEFAULT, UFFD_FEATURE_MINOR_SHMEM, UFFD_FEATURE_MISSING_SHMEM,
    UFFD_FEATURE_POISON, UFFD_FEATURE_WP_HUGETLBFS_SHMEM, UFFD_PAGEFAULT_FLAG_MINOR,
    UFFD_PAGEFAULT_FLAG_WRITE, UFFD_USER_MODE_ONLY,
};

/// `userfaultfd(O_CLOEXEC | O_NONBLOCK | extra)`.
fn userfaultfd(extra: libc::c_int) -> KernelResult<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC | libc::O_NONBLOCK | extra,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| Errno::EBADF)?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `UFFDIO_API` asking for `features`; returns the features the kernel offers.
fn uffdio_api_handshake(fd: BorrowedFd<'_>, features: u64) -> KernelResult<u64> {
    let mut api = uffdio_api {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API(), &mut api) })?;
    Ok(api.features)
}

/// The userfaultfd features this kernel offers: `UFFDIO_API` with no feature asked for, on a
/// fresh user-mode-only userfaultfd (which needs no privilege). Fails with the errno of
/// `userfaultfd()` or of `UFFDIO_API`.
pub fn userfaultfd_features() -> KernelResult<u64> {
    let fd = userfaultfd(UFFD_USER_MODE_ONLY)?;
    uffdio_api_handshake(std::os::fd::AsFd::as_fd(&fd), 0)
}

/// Whether this process may have a userfaultfd that receives kernel-mode faults too
/// (`userfaultfd(0)`: root, `CAP_SYS_PTRACE` or `vm.unprivileged_userfaultfd` = 1); the errno
/// otherwise (EPERM).
pub fn userfaultfd_kernel_faults() -> KernelResult<()> {
    userfaultfd(0).map(drop)
}

/// The features of a [`PoisonFd::new`]: poison markers on shmem.
pub const POISON_FEATURES: u64 = UFFD_FEATURE_POISON | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;

/// The features of a [`PoisonFd::with_fault_events`]: poison markers, and missing and minor
/// faults on shmem.
pub const FAULT_EVENT_FEATURES: u64 =
    POISON_FEATURES | UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM;

/// A userfaultfd for poison markers: `UFFDIO_POISON` installs markers that make any access
/// raise SIGBUS. [`PoisonFd::new`] registers mappings in write-protect mode only, which
/// delivers no missing or minor events, so no service thread is needed.
/// [`PoisonFd::with_fault_events`] also registers them in missing and minor mode: every fault
/// on a page without a PTE becomes an event that a service thread must resolve
/// ([`PoisonFd::read_fault`], [`PoisonFd::continue_page`], [`PoisonFd::wake`]).
#[derive(Debug)]
pub struct PoisonFd {
    fd: OwnedFd,
    /// `UFFDIO_REGISTER` modes used by [`PoisonFd::register`].
    modes: std::sync::atomic::AtomicU64,
}

/// One page-fault event read from a [`PoisonFd`] opened with fault events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultEvent {
    /// Faulting address (not page-aligned).
    pub address: u64,
    /// Whether the page was in the page cache (a minor fault).
    pub minor: bool,
    /// Whether the access was a write.
    pub write: bool,
}

/// Outcome of one `UFFDIO_POISON`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonError {
    /// A page already has a PTE; `done` bytes before it were poisoned.
    Exists { done: u64 },
    /// Any other failure.
    Failed(Errno),
}

impl PoisonFd {
    /// Opens a userfaultfd (user-mode faults only, so no privilege is needed) with the
    /// features gmem needs.
    pub fn new() -> KernelResult<PoisonFd> {
        Self::open(
            UFFD_USER_MODE_ONLY,
            POISON_FEATURES,
            UFFDIO_REGISTER_MODE_WP,
        )
    }

    /// Like [`PoisonFd::new`], but mappings are registered in missing, minor and write-protect
    /// mode (shmem supports the three together), so every fault on a page without a PTE is
    /// an event. Kernel-mode faults (a system call reading or writing a registered range) are
    /// events too where this process may have them (root, CAP_SYS_PTRACE or
    /// `vm.unprivileged_userfaultfd`); elsewhere the descriptor is user-mode only and such a
    /// system call fails with EFAULT on a page not yet mapped.
    pub fn with_fault_events() -> KernelResult<PoisonFd> {
        let features = FAULT_EVENT_FEATURES;
        let modes =
            UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR | UFFDIO_REGISTER_MODE_WP;
        Self::open(0, features, modes).or_else(|_| Self::open(UFFD_USER_MODE_ONLY, features, modes))
    }

    fn open(extra: libc::c_int, features: u64, modes: u64) -> KernelResult<PoisonFd> {
        let fd = userfaultfd(extra)?;
        uffdio_api_handshake(std::os::fd::AsFd::as_fd(&fd), features)?;
        Ok(PoisonFd {
            fd,
            modes: modes.into(),
        })
    }

    /// Another descriptor of the same userfaultfd (`dup`): events, registrations and
    /// resolutions are shared.
    pub fn try_clone(&self) -> KernelResult<PoisonFd> {
        let fd = self.fd.try_clone().map_err(|_| Errno::last())?;
        Ok(PoisonFd {
            fd,
            modes: self.modes.load(std::sync::atomic::Ordering::Relaxed).into(),
        })
    }

    /// In a forked child: this descriptor's number now refers to a fresh userfaultfd of the
    /// child's own (the parent's is tied to the parent's address space, and fork does not
    /// carry registrations over), registered in write-protect mode only (the child has no
    /// service thread for missing or minor events). Registrations are then made again as
    /// needed ([`PoisonFd::register`]).
    pub fn reopen_in_child(&self) -> KernelResult<()> {
        let fresh = userfaultfd(UFFD_USER_MODE_ONLY)?;
        uffdio_api_handshake(
            std::os::fd::AsFd::as_fd(&fresh),
            UFFD_FEATURE_POISON | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        )?;
        super::peer::dup_onto(
            std::os::fd::AsFd::as_fd(&fresh),
            std::os::fd::AsFd::as_fd(&self.fd),
        )?;
        self.modes.store(
            UFFDIO_REGISTER_MODE_WP,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }

    /// The descriptor, for `poll`.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Reads one event without blocking: `None` if there is none (or it is not a page fault).
    pub fn read_fault(&self) -> KernelResult<Option<FaultEvent>> {
        let mut msg = uffd_msg::default();
        let want = std::mem::size_of::<uffd_msg>();
        // SAFETY: reads at most `want` bytes into `msg`, a plain struct of that size.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut msg as *mut uffd_msg).cast(),
                want,
            )
        };
        if n < 0 {
            let e = Errno::last();
            return if e == Errno::EAGAIN || e == Errno::EINTR {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if n.unsigned_abs() != want || msg.event != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        Ok(Some(FaultEvent {
            address: msg.address,
            minor: msg.flags & UFFD_PAGEFAULT_FLAG_MINOR != 0,
            write: msg.flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
        }))
    }

    /// `UFFDIO_CONTINUE`: maps the page-cache pages of `[addr, addr + len)` and wakes the
    /// faulters. EEXIST if a PTE (or marker) is already there; EFAULT if a page is not in the
    /// page cache.
    pub fn continue_page(&self, addr: u64, len: u64) -> KernelResult<()> {
        let mut c = uffdio_continue {
            range: uffdio_range { start: addr, len },
            mode: 0,
            mapped: 0,
        };
        // SAFETY: UFFDIO_CONTINUE reads and writes a `struct uffdio_continue`; the kernel
        // checks that the range belongs to a registered mapping.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_CONTINUE(), &mut c) }).map(drop)
    }

    /// `UFFDIO_WAKE`: the faulters waiting on `[addr, addr + len)` retry their access.
    pub fn wake(&self, addr: u64, len: u64) -> KernelResult<()> {
        let mut r = uffdio_range { start: addr, len };
        // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range`; it only wakes waiters.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE(), &mut r) }).map(drop)
    }

    /// Registers the whole of `map` (a MAP_SHARED shmem mapping) in this descriptor's modes
    /// (write-protect only, or missing + minor + write-protect). Only [`Mmap`]s are ever
    /// registered: memory that no Rust reference points into.
    pub fn register(&self, map: &Mmap) -> KernelResult<()> {
        let mut reg = uffdio_register {
            range: uffdio_range {
                start: map.as_ptr() as u64,
                len: map.len() as u64,
            },
            mode: self.modes.load(std::sync::atomic::Ordering::Relaxed),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`; it does not
        // touch the memory of the range.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER(), &mut reg) }).map(drop)
    }

    /// Installs poison markers on `[addr, addr + len)`, whose PTEs must be none.
    pub fn poison(&self, addr: u64, len: usize) -> Result<(), PoisonError> {
        let mut p = uffdio_poison {
            range: uffdio_range {
                start: addr,
                len: len as u64,
            },
            mode: 0,
            updated: 0,
        };
        // SAFETY: UFFDIO_POISON reads and writes a `struct uffdio_poison`; the kernel refuses
        // a range outside the mappings registered with this descriptor, which are `Mmap`s
        // (`register`) that no Rust reference points into, and only puts markers on empty
        // PTEs: an access then raises SIGBUS instead of reading a page.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_POISON(), &mut p) };
        if ret == 0 {
            return Ok(());
        }
        let errno = Errno::last();
        match (errno, u64::try_from(p.updated)) {
            (_, Ok(done)) if done > 0 => Err(PoisonError::Exists { done }),
            (Errno::EEXIST, _) => Err(PoisonError::Exists { done: 0 }),
            (e, _) => Err(PoisonError::Failed(e)),
        }
    }
}
