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
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

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

const fn uffd_iowr(nr: u64, size: usize) -> libc::c_ulong {
    ((3u64 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr) as libc::c_ulong
}
const UFFDIO_API: libc::c_ulong = uffd_iowr(0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: libc::c_ulong = uffd_iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_POISON: libc::c_ulong = uffd_iowr(0x08, std::mem::size_of::<UffdioPoison>());

/// A userfaultfd used only for poison markers: mappings are registered in write-protect mode
/// (which delivers no missing or minor events, so no service thread is needed) and
/// `UFFDIO_POISON` installs markers that make any access raise SIGBUS.
#[derive(Debug)]
pub struct PoisonFd {
    fd: OwnedFd,
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
        // SAFETY: plain syscall with integer arguments.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
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
            features: UFFD_FEATURE_POISON | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) })?;
        Ok(PoisonFd { fd })
    }

    /// Registers `[addr, addr + len)` (a MAP_SHARED shmem mapping) in write-protect mode.
    pub fn register(&self, addr: *mut u8, len: usize) -> KernelResult<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
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
