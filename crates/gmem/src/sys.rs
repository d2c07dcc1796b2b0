//! Thin, audited wrappers around the system calls gmem needs: memfd, fallocate, mmap/madvise
//! and userfaultfd. Every `unsafe` block of the memory layer that is not a mapping access sits
//! here or in [`crate::mapping`].

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use crate::error::{Errno, KernelResult};

/// The host page size gmem works in.
pub const PAGE_SIZE: u64 = 4096;

/// Returns `Err(Errno::last())` when `ret` is -1.
fn check(ret: libc::c_int) -> KernelResult<libc::c_int> {
    if ret == -1 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

/// Creates an anonymous memory file (`memfd_create(name, MFD_CLOEXEC)`).
pub fn memfd_create(name: &CStr) -> KernelResult<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; the call has no other inputs.
    let fd = check(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `ftruncate(fd, size)`.
pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> KernelResult<()> {
    let size = i64::try_from(size).map_err(|_| Errno::EINVAL)?;
    // SAFETY: plain syscall on a borrowed, open descriptor.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size) }).map(drop)
}

/// `fallocate(fd, mode, offset, len)`.
pub fn fallocate(fd: BorrowedFd<'_>, mode: u32, offset: u64, len: u64) -> KernelResult<()> {
    let offset = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
    let len = i64::try_from(len).map_err(|_| Errno::EINVAL)?;
    let mode = libc::c_int::try_from(mode).map_err(|_| Errno::EOPNOTSUPP)?;
    // SAFETY: plain syscall on a borrowed, open descriptor.
    check(unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset, len) }).map(drop)
}

/// Bytes of file pages allocated to `fd` (`st_blocks` × 512).
pub fn allocated_bytes(fd: BorrowedFd<'_>) -> KernelResult<u64> {
    let st = fstat(fd)?;
    Ok(u64::try_from(st.st_blocks).unwrap_or(0) * 512)
}

/// `fstat(fd)`.
pub fn fstat(fd: BorrowedFd<'_>) -> KernelResult<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable `stat` for the duration of the call.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// `madvise(addr, len, advice)` on raw memory.
///
/// # Safety
/// `[addr, addr + len)` must belong to mappings this process owns and no Rust reference into
/// it may be live; the advices gmem uses (DONTNEED on shared memory, POPULATE_*) keep contents.
pub unsafe fn madvise_raw(addr: *mut u8, len: usize, advice: libc::c_int) -> KernelResult<()> {
    // SAFETY: the caller vouches for the range.
    check(unsafe { libc::madvise(addr.cast(), len, advice) }).map(drop)
}

/// Replaces `[addr, addr + len)` with a read/write shared mapping of `fd` at `fd_off`.
///
/// # Safety
/// `[addr, addr + len)` must lie inside a mapping this process owns and no Rust reference into
/// it may be live.
pub unsafe fn mmap_fixed_raw(
    addr: *mut u8,
    len: usize,
    fd: BorrowedFd<'_>,
    fd_off: u64,
) -> KernelResult<()> {
    let fd_off = libc::off_t::try_from(fd_off).map_err(|_| Errno::EINVAL)?;
    // SAFETY: MAP_FIXED over a range the caller owns.
    let p = unsafe {
        libc::mmap(
            addr.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd.as_raw_fd(),
            fd_off,
        )
    };
    if p == libc::MAP_FAILED {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// Moves the pages of `[from, from + len)` onto `[to, to + len)` (`mremap(MREMAP_FIXED)`),
/// replacing whatever was mapped there in one step: no access can see the range unmapped.
///
/// # Safety
/// Both ranges must be mappings this process owns with no Rust reference into them; `from`
/// is unmapped afterwards and must not be unmapped again.
pub unsafe fn mremap_fixed_raw(from: *mut u8, to: *mut u8, len: usize) -> KernelResult<()> {
    // SAFETY: the caller vouches for both ranges.
    let p = unsafe {
        libc::mremap(
            from.cast(),
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            to.cast::<libc::c_void>(),
        )
    };
    if p == libc::MAP_FAILED {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// `pread` until `buf` is full (a hole reads zeros).
pub fn pread_exact(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> KernelResult<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let off = i64::try_from(offset + done as u64).map_err(|_| Errno::EINVAL)?;
        // SAFETY: the destination is the unfilled tail of `buf`.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                off,
            )
        };
        match n {
            n if n > 0 => done += n.unsigned_abs(),
            0 => {
                buf[done..].fill(0);
                break;
            }
            _ if Errno::last() == Errno::EINTR => {}
            _ => return Err(Errno::last()),
        }
    }
    Ok(())
}

/// `pwrite` all of `data`.
pub fn pwrite_all(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> KernelResult<()> {
    let mut done = 0usize;
    while done < data.len() {
        let off = i64::try_from(offset + done as u64).map_err(|_| Errno::EINVAL)?;
        // SAFETY: the source is the unwritten tail of `data`.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                data[done..].as_ptr().cast(),
                data.len() - done,
                off,
            )
        };
        match n {
            n if n > 0 => done += n.unsigned_abs(),
            _ if Errno::last() == Errno::EINTR => {}
            _ => return Err(Errno::last()),
        }
    }
    Ok(())
}

/// The data runs (allocated, `[start, end)` byte offsets) of `fd` inside `[start, end)`,
/// found with `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`: one pair of calls per run.
pub fn data_runs(fd: BorrowedFd<'_>, start: u64, end: u64) -> KernelResult<Vec<(u64, u64)>> {
    let seek = |off: u64, whence: libc::c_int| -> KernelResult<Option<u64>> {
        let o = libc::off_t::try_from(off).map_err(|_| Errno::EINVAL)?;
        // SAFETY: lseek takes integers only; it moves the descriptor's offset, which gmem
        // never uses (every access is positional).
        let r = unsafe { libc::lseek(fd.as_raw_fd(), o, whence) };
        if r >= 0 {
            Ok(Some(r.unsigned_abs()))
        } else if Errno::last() == Errno(libc::ENXIO) {
            Ok(None)
        } else {
            Err(Errno::last())
        }
    };
    let mut runs = Vec::new();
    let mut at = start;
    while at < end {
        let Some(data) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        runs.push((data, hole));
        at = hole;
    }
    Ok(runs)
}

/// An owned mapping; unmapped on drop.
#[derive(Debug)]
pub struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a `Mmap` is an address range, not a reference into Rust-managed memory; every access
// goes through raw pointers whose users uphold their own synchronisation.
unsafe impl Send for Mmap {}
// SAFETY: as above; `&Mmap` only hands out the address.
unsafe impl Sync for Mmap {}

impl Mmap {
    /// `mmap(NULL, len, PROT_READ|PROT_WRITE, flags, fd, offset)`.
    pub fn new(
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
        len: usize,
        flags: libc::c_int,
    ) -> KernelResult<Mmap> {
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        let offset = libc::off_t::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let raw_fd = fd.map_or(-1, |f| f.as_raw_fd());
        // SAFETY: a NULL hint lets the kernel pick a fresh range, so no existing memory is
        // replaced; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw_fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(Errno::ENOMEM)?;
        Ok(Mmap { ptr, len })
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping has at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes `value` to the first byte of every page of `[off, off + len)` (faulting them
    /// in); EFAULT outside the mapping. A page that cannot be faulted in raises SIGBUS, as
    /// any access to the mapping would.
    pub fn touch_pages(&self, off: u64, len: u64, value: u8) -> KernelResult<()> {
        let end = off.checked_add(len).ok_or(Errno::EFAULT)?;
        if end > self.len as u64 {
            return Err(Errno::EFAULT);
        }
        let mut p = off;
        while p < end {
            // In bounds (checked), so it fits in usize.
            #[allow(clippy::cast_possible_truncation)]
            // SAFETY: inside this live mapping; volatile so the touch is not elided.
            unsafe {
                self.ptr.as_ptr().add(p as usize).write_volatile(value)
            };
            p += PAGE_SIZE;
        }
        Ok(())
    }

    /// `madvise` on `[off, off + len)` of this mapping.
    pub fn madvise(&self, off: usize, len: usize, advice: libc::c_int) -> KernelResult<()> {
        self.check_range(off, len)?;
        // SAFETY: the range lies inside this mapping, which this object owns; no Rust reference
        // into a mapping is ever held across a call.
        unsafe { madvise_raw(self.ptr.as_ptr().add(off), len, advice) }
    }

    fn check_range(&self, off: usize, len: usize) -> KernelResult<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Errno::EINVAL),
        }
    }
}

impl Mmap {
    /// Gives up ownership of the range (after it was moved away with `mremap`).
    pub fn into_raw(self) -> (*mut u8, usize) {
        let me = std::mem::ManuallyDrop::new(self);
        (me.ptr.as_ptr(), me.len)
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by `Mmap::new` and is unmapped exactly once, here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// userfaultfd uAPI (include/uapi/linux/userfaultfd.h). libc lacks most of it.
const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_FEATURE_POISON: u64 = 1 << 14;
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioPoison {
    range: UffdioRange,
    mode: u64,
    updated: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

/// `struct uffd_msg` (packed, 32 bytes): the event byte, then for a page fault the flags at
/// byte 8 and the address at byte 16.
#[repr(C)]
#[derive(Default)]
struct UffdMsg {
    event: u8,
    reserved: [u8; 7],
    flags: u64,
    address: u64,
    feat: u64,
}

const fn uffd_iowr(nr: u64, size: usize) -> libc::c_ulong {
    ((3u64 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr) as libc::c_ulong
}
const fn uffd_ior(nr: u64, size: usize) -> libc::c_ulong {
    ((2u64 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr) as libc::c_ulong
}
const UFFDIO_WAKE: libc::c_ulong = uffd_ior(0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_CONTINUE: libc::c_ulong = uffd_iowr(0x07, std::mem::size_of::<UffdioContinue>());
const UFFDIO_API: libc::c_ulong = uffd_iowr(0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: libc::c_ulong = uffd_iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_POISON: libc::c_ulong = uffd_iowr(0x08, std::mem::size_of::<UffdioPoison>());

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
    modes: u64,
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
            UFFD_FEATURE_POISON | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
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
        let features = UFFD_FEATURE_POISON
            | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
            | UFFD_FEATURE_MISSING_SHMEM
            | UFFD_FEATURE_MINOR_SHMEM;
        let modes =
            UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR | UFFDIO_REGISTER_MODE_WP;
        Self::open(0, features, modes).or_else(|_| Self::open(UFFD_USER_MODE_ONLY, features, modes))
    }

    fn open(extra: libc::c_int, features: u64, modes: u64) -> KernelResult<PoisonFd> {
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
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) })?;
        Ok(PoisonFd { fd, modes })
    }

    /// Another descriptor of the same userfaultfd (`dup`): events, registrations and
    /// resolutions are shared.
    pub fn try_clone(&self) -> KernelResult<PoisonFd> {
        let fd = self.fd.try_clone().map_err(|_| Errno::last())?;
        Ok(PoisonFd {
            fd,
            modes: self.modes,
        })
    }

    /// The descriptor, for `poll`.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Reads one event without blocking: `None` if there is none (or it is not a page fault).
    pub fn read_fault(&self) -> KernelResult<Option<FaultEvent>> {
        let mut msg = UffdMsg::default();
        let want = std::mem::size_of::<UffdMsg>();
        // SAFETY: reads at most `want` bytes into `msg`, a plain struct of that size.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut msg as *mut UffdMsg).cast(), want) };
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
            minor: msg.flags & 4 != 0,
            write: msg.flags & 1 != 0,
        }))
    }

    /// `UFFDIO_CONTINUE`: maps the page-cache pages of `[addr, addr + len)` and wakes the
    /// faulters. EEXIST if a PTE (or marker) is already there; EFAULT if a page is not in the
    /// page cache.
    pub fn continue_page(&self, addr: u64, len: u64) -> KernelResult<()> {
        let mut c = UffdioContinue {
            range: UffdioRange { start: addr, len },
            mode: 0,
            mapped: 0,
        };
        // SAFETY: UFFDIO_CONTINUE reads and writes a `struct uffdio_continue`; the kernel
        // checks that the range belongs to a registered mapping.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_CONTINUE, &mut c) }).map(drop)
    }

    /// `UFFDIO_WAKE`: the faulters waiting on `[addr, addr + len)` retry their access.
    pub fn wake(&self, addr: u64, len: u64) -> KernelResult<()> {
        let mut r = UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range`; it only wakes waiters.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut r) }).map(drop)
    }

    /// Registers `[addr, addr + len)` (a MAP_SHARED shmem mapping) in this descriptor's modes
    /// (write-protect only, or missing + minor + write-protect).
    pub fn register(&self, addr: *mut u8, len: usize) -> KernelResult<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode: self.modes,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`; it does not
        // touch the memory of the range.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) }).map(drop)
    }

    /// Installs poison markers on `[addr, addr + len)`, whose PTEs must be none.
    pub fn poison(&self, addr: *mut u8, len: usize) -> Result<(), PoisonError> {
        let mut p = UffdioPoison {
            range: UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode: 0,
            updated: 0,
        };
        // SAFETY: UFFDIO_POISON reads and writes a `struct uffdio_poison`; the range belongs
        // to a mapping registered by this process (the kernel checks that).
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_POISON, &mut p) };
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

/// An eventfd, used to stop a thread that polls it with other descriptors.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// `eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)`.
    pub fn new() -> KernelResult<EventFd> {
        // SAFETY: plain syscall with integer arguments.
        let fd = check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(EventFd { fd })
    }

    /// Makes the eventfd readable (for good: it is never read).
    pub fn signal(&self) -> KernelResult<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes the 8 bytes of `one`.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if n < 0 {
            Err(Errno::last())
        } else {
            Ok(())
        }
    }

    /// The descriptor, for `poll`.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }
}

/// Blocks until `a` or `b` is readable (or has an error); returns which.
pub fn poll_two(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> KernelResult<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: a.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` holds two valid `pollfd`s for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r >= 0 {
            return Ok((fds[0].revents != 0, fds[1].revents != 0));
        }
        if Errno::last() != Errno::EINTR {
            return Err(Errno::last());
        }
    }
}
