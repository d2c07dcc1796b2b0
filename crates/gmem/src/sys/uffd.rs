//! userfaultfd: poison markers, fault events and their resolution, and the `UFFDIO_API`
//! handshake.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::{check, Mmap};
use crate::error::{Errno, KernelResult};
use crate::uapi::{
    uffd_msg, uffdio_api, uffdio_continue, uffdio_poison, uffdio_range, uffdio_register,
    uffdio_zeropage, UFFDIO_API, UFFDIO_CONTINUE, UFFDIO_POISON, UFFDIO_REGISTER,
    UFFDIO_REGISTER_MODE_MINOR, UFFDIO_REGISTER_MODE_MISSING, UFFDIO_REGISTER_MODE_WP,
    UFFDIO_UNREGISTER, UFFDIO_WAKE, UFFDIO_ZEROPAGE, UFFD_API, UFFD_EVENT_FORK,
    UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMAP, UFFD_EVENT_UNMAP, UFFD_FEATURE_EVENT_FORK,
    UFFD_FEATURE_EVENT_REMAP, UFFD_FEATURE_EVENT_UNMAP, UFFD_FEATURE_MINOR_SHMEM,
    UFFD_FEATURE_MISSING_SHMEM, UFFD_FEATURE_POISON, UFFD_FEATURE_THREAD_ID,
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM, UFFD_PAGEFAULT_FLAG_MINOR, UFFD_PAGEFAULT_FLAG_WRITE,
    UFFD_USER_MODE_ONLY,
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

/// The features of the guard's userfaultfd ([`PoisonFd::guard`]): missing and minor faults
/// on shmem, poison markers, and the events that follow an address space: `fork` (and
/// `clone` without `CLONE_VM`) and `mremap`.
pub const GUARD_FEATURES: u64 = UFFD_FEATURE_MISSING_SHMEM
    | UFFD_FEATURE_MINOR_SHMEM
    | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    | UFFD_FEATURE_POISON
    | UFFD_FEATURE_EVENT_FORK
    | UFFD_FEATURE_EVENT_REMAP
    | UFFD_FEATURE_EVENT_UNMAP
    | UFFD_FEATURE_THREAD_ID;

/// The registration modes of the guard: every fault on a page without a PTE is an event
/// (missing, minor), and write-protect mode, which no page is ever protected in: a VMA armed
/// for it is one the kernel's THP collapse leaves alone (`MADV_COLLAPSE` and khugepaged keep
/// its page table), where otherwise host code could `MADV_HUGEPAGE` + `MADV_COLLAPSE` a host
/// mapping into one PMD over the whole folio, private pages included (found in review). The
/// price: `fork` copies such a VMA's page-table entries into the child (the guard counts
/// every page this process had mapped as mapped elsewhere at a fork event).
const GUARD_MODES: u64 =
    UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR | UFFDIO_REGISTER_MODE_WP;

/// Registers `[addr, addr + len)` with userfaultfd `fd` in the guard's modes and makes it
/// inherited by children again without `MADV_HUGEPAGE` — by system call only (no C library
/// function another library may interpose, no allocation), for a fork handler. True if the
/// registration succeeded.
///
/// # Safety
/// `[addr, addr + len)` must be a `MAP_SHARED` shmem mapping of the caller's (the advices
/// change only VMA flags; the registration touches no memory).
pub(crate) unsafe fn reguard_raw(fd: libc::c_int, addr: u64, len: u64) -> bool {
    let mut reg = uffdio_register {
        range: uffdio_range { start: addr, len },
        mode: GUARD_MODES,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`; per the contract,
    // the range is the caller's shared mapping and the advices change only its VMA flags.
    unsafe {
        if libc::syscall(libc::SYS_ioctl, fd, UFFDIO_REGISTER(), &mut reg) != 0 {
            return false;
        }
        libc::syscall(libc::SYS_madvise, addr, len, libc::MADV_DOFORK);
        libc::syscall(libc::SYS_madvise, addr, len, libc::MADV_NOHUGEPAGE);
    }
    true
}

/// One message of a userfaultfd.
#[derive(Debug)]
pub enum UffdEvent {
    /// A fault at `address` on a page without a PTE.
    Fault(FaultEvent),
    /// The registered address space was copied by `fork` (or `clone` without `CLONE_VM`):
    /// the child's own userfaultfd, registered where the parent's mappings were.
    Fork(PoisonFd),
    /// `mremap` moved `[from, from + len)` to `to`; a length of 0 is a duplicate of the
    /// shared mapping at `from` (`mremap(from, 0, n, MREMAP_MAYMOVE)`) made at `to`.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Old length (0: a duplicate).
        len: u64,
    },
    /// `munmap` (or a shrinking `mremap`) removed `[start, end)`.
    Unmap {
        /// First address removed.
        start: u64,
        /// End of the removed range.
        end: u64,
    },
    /// An event gmem does not ask for.
    Other(u8),
}

/// One message of a userfaultfd, as read (`struct uffd_msg`); the all-zero value stands for
/// none.
#[derive(Debug, Default, Clone, Copy)]
pub struct RawUffdMsg(uffd_msg);

impl RawUffdMsg {
    /// Whether the message is a page fault (not an event such as fork, remap or unmap).
    pub fn is_fault(&self) -> bool {
        self.0.event == UFFD_EVENT_PAGEFAULT
    }

    /// The descriptor a `UFFD_EVENT_FORK` message carries (installed in this process by the
    /// read), without taking it; `None` for any other message.
    pub fn fork_fd(&self) -> Option<libc::c_int> {
        // The low half of the first argument is the child's descriptor, installed in this
        // process by the read.
        #[allow(clippy::cast_possible_truncation)]
        (self.0.event == UFFD_EVENT_FORK).then_some(self.0.flags as u32 as libc::c_int)
    }

    /// What the message says: `None` for the all-zero value. A `UFFD_EVENT_FORK` message
    /// carries a descriptor the read installed in this process: decode it once, and the
    /// returned [`PoisonFd`] owns it.
    pub fn decode(self) -> Option<UffdEvent> {
        let msg = self.0;
        Some(match msg.event {
            0 => return None,
            UFFD_EVENT_PAGEFAULT => UffdEvent::Fault(FaultEvent {
                address: msg.address,
                minor: msg.flags & UFFD_PAGEFAULT_FLAG_MINOR != 0,
                write: msg.flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                // The low half of the feature word.
                #[allow(clippy::cast_possible_truncation)]
                tid: msg.feat as u32,
            }),
            UFFD_EVENT_FORK => {
                let raw = self.fork_fd()?;
                // SAFETY: the kernel installed this descriptor in our table for the read that
                // produced this message, which is decoded once; nothing else owns it.
                UffdEvent::Fork(PoisonFd::adopt(unsafe { OwnedFd::from_raw_fd(raw) }))
            }
            UFFD_EVENT_REMAP => UffdEvent::Remap {
                from: msg.flags,
                to: msg.address,
                len: msg.feat,
            },
            UFFD_EVENT_UNMAP => UffdEvent::Unmap {
                start: msg.flags,
                end: msg.address,
            },
            other => UffdEvent::Other(other),
        })
    }
}

/// [`PoisonFd::space_alive`] of a raw userfaultfd `fd` (a descriptor the caller keeps open).
pub fn uffd_space_alive(fd: libc::c_int) -> bool {
    let mut wp = crate::uapi::uffdio_writeprotect {
        range: uffdio_range {
            start: 0x10000,
            len: super::PAGE_SIZE,
        },
        mode: 0,
    };
    // SAFETY: UFFDIO_WRITEPROTECT reads a `struct uffdio_writeprotect`; mode 0 only resolves
    // write protection, which gmem never sets (on a descriptor that is no userfaultfd the
    // kernel refuses the request and touches nothing).
    let r = unsafe { libc::ioctl(fd, crate::uapi::UFFDIO_WRITEPROTECT(), &mut wp) };
    !(r < 0 && Errno::last() == Errno(libc::ESRCH))
}

/// Reads one message from userfaultfd `fd` without blocking: `None` if there is none. Makes
/// no allocation and takes no C library lock (a `read(2)`), so it may run while another
/// thread is inside `fork`.
pub fn read_uffd_msg(fd: libc::c_int) -> KernelResult<Option<RawUffdMsg>> {
    let mut msg = uffd_msg::default();
    let want = std::mem::size_of::<uffd_msg>();
    // SAFETY: reads at most `want` bytes into `msg`, a plain struct of that size.
    let n = unsafe { libc::read(fd, (&mut msg as *mut uffd_msg).cast(), want) };
    if n < 0 {
        let e = Errno::last();
        return if e == Errno::EAGAIN || e == Errno::EINTR {
            Ok(None)
        } else {
            Err(e)
        };
    }
    if n.unsigned_abs() != want || msg.event == 0 {
        return Ok(None);
    }
    Ok(Some(RawUffdMsg(msg)))
}

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
    /// The faulting thread (with `UFFD_FEATURE_THREAD_ID`; 0 otherwise).
    pub tid: u32,
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

    /// The guard's userfaultfd (`GUARD_FEATURES`): mappings are registered in missing and
    /// minor mode, and the address spaces of fork children come as `UffdEvent::Fork`. It
    /// receives the faults of kernel-mode accesses too where this process may have them (root,
    /// `CAP_SYS_PTRACE` or `vm.unprivileged_userfaultfd`); elsewhere it is user-mode only and
    /// a system call touching a page without a PTE fails with EFAULT. The second value says
    /// which (`true`: kernel-mode faults are events).
    pub fn guard() -> KernelResult<(PoisonFd, bool)> {
        match Self::open(0, GUARD_FEATURES, GUARD_MODES) {
            Ok(fd) => Ok((fd, true)),
            Err(_) => {
                Self::open(UFFD_USER_MODE_ONLY, GUARD_FEATURES, GUARD_MODES).map(|f| (f, false))
            }
        }
    }

    /// Completes the `UFFDIO_API` handshake of a userfaultfd another process sent, if that
    /// process did not (an uninitialised one polls readable for ever and cannot be read:
    /// found in review, the guard's reader spun). One already initialised answers EINVAL,
    /// which is what is expected.
    pub fn ensure_initialised(&self) {
        let _ = uffdio_api_handshake(std::os::fd::AsFd::as_fd(&self.fd), GUARD_FEATURES);
    }

    /// The raw descriptor (for the record of private descriptors a fork child must not keep).
    pub fn raw_fd(&self) -> libc::c_int {
        self.fd.as_raw_fd()
    }

    /// Closes the descriptor by system call (never an interposed C library function).
    pub fn close_raw(self) {
        super::peer::close_raw(self.fd);
    }

    /// A userfaultfd the kernel delivered (`UffdEvent::Fork`) or another process sent,
    /// registered in the guard's modes.
    pub fn adopt(fd: OwnedFd) -> PoisonFd {
        PoisonFd {
            fd,
            modes: GUARD_MODES.into(),
        }
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

    /// The descriptor, for `poll`.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Reads one message without blocking: `None` if there is none.
    pub fn read_event(&self) -> KernelResult<Option<UffdEvent>> {
        Ok(read_uffd_msg(self.fd.as_raw_fd())?.and_then(|m| m.decode()))
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
            // The low half of the feature word.
            #[allow(clippy::cast_possible_truncation)]
            tid: msg.feat as u32,
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

    /// `UFFDIO_ZEROPAGE`: a missing page of `[addr, addr + len)` becomes a new zero-filled
    /// page of the file, mapped, and the faulters are woken. EEXIST if the page cache already
    /// holds it (then [`PoisonFd::continue_page`] maps it) or a PTE is there; a poison marker is
    /// replaced.
    pub fn zeropage(&self, addr: u64, len: u64) -> KernelResult<()> {
        let mut z = uffdio_zeropage {
            range: uffdio_range { start: addr, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes a `struct uffdio_zeropage`; the kernel
        // checks that the range belongs to a registered mapping.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE(), &mut z) }).map(drop)
    }

    /// Whether the address space this userfaultfd was made for still exists. A call that
    /// reaches the address space answers ESRCH once it has gone (the process exited or
    /// executed another program): `UFFDIO_WRITEPROTECT` resolving (mode 0: protecting
    /// nothing) one page at 64 KiB, which answers ENOENT where no registered mapping is there
    /// and changes nothing where one is (no page is ever write-protected). (A zero-length
    /// `UFFDIO_ZEROPAGE`, used before, answers EINVAL first on 6.18, alive or not: found in
    /// review — no space was ever found gone.)
    pub fn space_alive(&self) -> bool {
        uffd_space_alive(self.fd.as_raw_fd())
    }

    /// `UFFDIO_UNREGISTER` of `[addr, addr + len)`.
    pub fn unregister(&self, addr: u64, len: u64) -> KernelResult<()> {
        let mut r = uffdio_range { start: addr, len };
        // SAFETY: UFFDIO_UNREGISTER reads a `struct uffdio_range`; it changes no memory.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER(), &mut r) }).map(drop)
    }

    /// Registers `[addr, addr + len)` of the address space this userfaultfd was made for
    /// (possibly another process's), in this descriptor's modes.
    pub fn register_range(&self, addr: u64, len: u64) -> KernelResult<()> {
        let mut reg = uffdio_register {
            range: uffdio_range { start: addr, len },
            mode: self.modes.load(std::sync::atomic::Ordering::Relaxed),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`; it does not
        // touch the memory of the range.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER(), &mut reg) }).map(drop)
    }

    /// Registers `[addr, addr + len)` in write-protect mode alone (after
    /// [`PoisonFd::unregister`]: a range registered already keeps the modes it has). No page
    /// is ever write-protected, so no fault of the range is an event: the kernel serves them
    /// (a huge folio with one PMD), while `munmap`, `mremap` and `fork` of it still come as
    /// events and the kernel's THP collapse still leaves its page table alone.
    pub fn register_wp_only(&self, addr: u64, len: u64) -> KernelResult<()> {
        let mut reg = uffdio_register {
            range: uffdio_range { start: addr, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`; it does not
        // touch the memory of the range.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER(), &mut reg) }).map(drop)
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
