//! Every system call gmem makes, and all of its `unsafe`: thin, audited wrappers whose
//! interface is safe. memfd, fallocate, positional I/O, mmap/madvise/mremap on an owned
//! [`Mmap`], volatile accesses, pipes and vmsplice pins ([`vmsplice_pin`]), userfaultfd
//! ([`uffd`]), the faulting-access probe ([`probe`]) and the KVM ioctls gmem issues itself
//! ([`kvm`]). The crate root denies `unsafe_code` everywhere else; [`crate::os`] is the public,
//! safe facade for the other crates of the workspace.
//!
//! An [`Mmap`] never hands out a Rust reference into its memory (only its address, and copies
//! made with volatile accesses), so replacing, zapping or poisoning its pages changes what an
//! access reads or whether it faults, never the validity of a Rust reference.

pub(crate) mod kvm;
pub(crate) mod peer;
pub(crate) mod probe;
pub(crate) mod seccomp;
pub(crate) mod uffd;

pub use uffd::{
    read_uffd_msg, uffd_space_alive, userfaultfd_features, userfaultfd_kernel_faults, FaultEvent,
    PoisonFd, RawUffdMsg, UffdEvent,
};

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

/// Creates an anonymous memory file (`memfd_create(name, MFD_CLOEXEC)`) that only this
/// descriptor (and its duplicates) reaches: its mode is 0, so opening it anew through
/// `/proc/<pid>/fd` — which another process of the same user may do — is EACCES. The
/// descriptor's own access, checked when it was made, is read and write.
pub fn memfd_create(name: &CStr) -> KernelResult<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; the call has no other inputs.
    let fd = check(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    fchmod(std::os::fd::AsFd::as_fd(&fd), 0)?;
    Ok(fd)
}

/// [`memfd_create`] with sealing allowed (`MFD_ALLOW_SEALING`), for a file whose size is then
/// sealed ([`seal_size`]).
pub fn memfd_create_sealable(name: &CStr) -> KernelResult<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; the call has no other inputs.
    let fd = check(unsafe {
        libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    fchmod(std::os::fd::AsFd::as_fd(&fd), 0)?;
    Ok(fd)
}

/// Seals a memory file's size (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`): no holder of a
/// descriptor can `ftruncate` it any more (a receiver that shrank it made the owner's next
/// access SIGBUS: found in review). Punching holes stays allowed.
pub fn seal_size(fd: BorrowedFd<'_>) -> KernelResult<()> {
    // SAFETY: F_ADD_SEALS on the caller's memfd; no memory is passed.
    check(unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    })
    .map(|_| ())
}

/// `fchmod(fd, mode)`.
pub fn fchmod(fd: BorrowedFd<'_>, mode: libc::mode_t) -> KernelResult<()> {
    // SAFETY: changes the mode of the caller's open file; no memory is passed.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(|_| ())
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
    let mut runs = Vec::new();
    for_each_data_run(fd, start, end, |s, e| runs.push((s, e)))?;
    Ok(runs)
}

/// [`data_runs`] without collecting them: calls `f(start, end)` for each run, in order (no
/// allocation, for a conversion past its point of no return).
pub fn for_each_data_run(
    fd: BorrowedFd<'_>,
    start: u64,
    end: u64,
    mut f: impl FnMut(u64, u64),
) -> KernelResult<()> {
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
    let mut at = start;
    while at < end {
        let Some(data) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        f(data, hole);
        at = hole;
    }
    Ok(())
}

/// An owned mapping; unmapped on drop.
#[derive(Debug)]
pub struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
    /// Set once any part of the mapping is `MADV_DONTFORK`: the address space it lives in
    /// ([`peer::address_space`]). A fork child's copy of this object then describes a range
    /// the child does not have, and dropping it there unmaps nothing (found in review: it
    /// unmapped whatever the child had put there since).
    only_in: std::sync::atomic::AtomicU64,
    /// A host mapping of an emulated file in Remap mode ([`Mmap::keep_from_users`]): what it
    /// maps is gmem's to change, so the public `protect`, `protect_range` and `map_fixed`
    /// refuse it.
    kept: std::sync::atomic::AtomicBool,
    /// Recorded in `OWN_VIEWS` (`Mmap::record_own_view`): forgotten there when dropped.
    own_view: bool,
}

/// gmem's own views of memory files in this process (guest view, direct map, their windows,
/// the short-lived mapping of one block): start → end. They map a memory file as a host
/// mapping does, same inode and offsets, so the guard, when it makes its record of host
/// mappings what `/proc/self/maps` says (or asks the kernel what is mapped at a recorded
/// address), must leave these out: one taken for a host mapping was registered with the
/// guard's userfaultfd by a conversion's fail-closed step, and gmem's own access to a private
/// page through it then raised SIGBUS (found by the stress test of huge folios). A view is
/// mapped and recorded, and unmapped and forgotten, under this lock, which the guard holds
/// while it reads the maps, so it never sees one without the other.
///
/// A lock of its own, not a `Mutex`: a fork may come while another thread holds it (the
/// prepare handler does not hold it across `fork`, which would let the guard's server wait on
/// a fork that waits on the guard's reader: found in review), and a child — made by `fork` or
/// by a raw `clone` or `_Fork`, which run no fork handler — has none of the views (each is
/// `MADV_DONTFORK`): a table whose address space is not this one (`peer::address_space`, a
/// token in a `MADV_WIPEONFORK` page) is taken as empty and its lock as free, by the first
/// caller in the new address space (found in review: a raw `clone` child that made a file of
/// its own had its host mapping, placed where a parent's view had been, taken for that view).
static OWN_VIEWS: OwnViews = OwnViews {
    space: std::sync::atomic::AtomicU64::new(0),
    locked: std::sync::atomic::AtomicBool::new(false),
    map: std::cell::UnsafeCell::new(std::collections::BTreeMap::new()),
};

/// The table of gmem's own views and its lock (see `OWN_VIEWS`).
struct OwnViews {
    /// The address space the table describes (its token), or the token's complement while
    /// the table is being emptied for it.
    space: std::sync::atomic::AtomicU64,
    locked: std::sync::atomic::AtomicBool,
    map: std::cell::UnsafeCell<std::collections::BTreeMap<usize, usize>>,
}

// SAFETY: `map` is reached only through an `OwnViewsGuard`, which holds `locked` (acquired
// with Acquire, released with Release) while `space` names this address space, or by the one
// thread that moved `space` to its "being emptied" value, which no other thread locks under.
unsafe impl Sync for OwnViews {}

/// The table of gmem's own views, held (see `OWN_VIEWS`).
pub struct OwnViewsGuard(());

impl std::ops::Deref for OwnViewsGuard {
    type Target = std::collections::BTreeMap<usize, usize>;
    fn deref(&self) -> &Self::Target {
        // SAFETY: this guard holds the lock: no other reference to the map exists.
        unsafe { &*OWN_VIEWS.map.get() }
    }
}

impl std::ops::DerefMut for OwnViewsGuard {
    fn deref_mut(&mut self) -> &mut Self::Target {
        // SAFETY: as above, and `&mut self` makes this the only reference through the guard.
        unsafe { &mut *OWN_VIEWS.map.get() }
    }
}

impl Drop for OwnViewsGuard {
    fn drop(&mut self) {
        OWN_VIEWS
            .locked
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Takes the lock of gmem's own views (a process-wide table, `OWN_VIEWS` in this module), for
/// `Mmap::record_own_view`, `is_own_view` and the fork prepare handler. Its holders take no
/// other lock (it is taken after the guard's records, never before) and wait on nothing but
/// system calls on memory; a waiter yields. In a new address space the table is emptied
/// first (see `OWN_VIEWS`).
pub fn own_views() -> OwnViewsGuard {
    // (Not the low bit as a flag: two pids that differ in it — the tokens where no
    // `MADV_WIPEONFORK` page can be had — named one table: found in review.)
    use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
    let me = peer::address_space();
    let emptying = !me;
    loop {
        let v = OWN_VIEWS.space.load(Acquire);
        if v == me {
            if OWN_VIEWS
                .locked
                .compare_exchange_weak(false, true, Acquire, Relaxed)
                .is_ok()
            {
                return OwnViewsGuard(());
            }
        } else if v != emptying
            && OWN_VIEWS
                .space
                .compare_exchange(v, emptying, AcqRel, Relaxed)
                .is_ok()
        {
            // Another address space's table (this process is its child) or none yet: no
            // thread of this address space locks it until `space` names it (above).
            // SAFETY: the only reference to the map now (see the `Sync` impl); the old nodes
            // are leaked, never freed (a thread of the parent may have been changing them).
            unsafe {
                std::mem::forget(std::ptr::replace(
                    OWN_VIEWS.map.get(),
                    std::collections::BTreeMap::new(),
                ));
            }
            OWN_VIEWS.locked.store(false, Release);
            OWN_VIEWS.space.store(me, Release);
            continue;
        }
        std::thread::yield_now();
    }
}

/// In a fork child (from its fork handler, one thread, no allocation): the table of gmem's
/// own views is emptied for this address space and its lock freed at once — a second line
/// beside the token, which a program's `MADV_KEEPONFORK` on the token's page would defeat.
/// The parent's copy of the map is left as it is (a thread may have been changing it).
///
/// # Safety
/// Only in a fork child's fork handler: the process has one thread, and no `OwnViewsGuard`
/// is alive in it.
pub unsafe fn own_views_forget_in_child() {
    // SAFETY: the caller's contract: one thread, no guard alive; replacing the map leaks
    // the old nodes, never frees memory another thread could be using.
    unsafe {
        std::mem::forget(std::ptr::replace(
            OWN_VIEWS.map.get(),
            std::collections::BTreeMap::new(),
        ));
    }
    OWN_VIEWS
        .locked
        .store(false, std::sync::atomic::Ordering::Release);
    OWN_VIEWS
        .space
        .store(peer::address_space(), std::sync::atomic::Ordering::Release);
}

/// Whether `[start, end)` overlaps one of gmem's own views in `views` (the held lock).
pub fn is_own_view(
    views: &std::collections::BTreeMap<usize, usize>,
    start: usize,
    end: usize,
) -> bool {
    views
        .range(..end)
        .next_back()
        .is_some_and(|(_, &e)| e > start)
}

// SAFETY: a `Mmap` is an address range, not a reference into Rust-managed memory; every access
// goes through raw pointers whose users uphold their own synchronisation.
unsafe impl Send for Mmap {}
// SAFETY: as above; `&Mmap` only hands out the address.
unsafe impl Sync for Mmap {}

/// `MPOL_F_NODE` (`get_mempolicy`: return the node).
const MPOL_F_NODE: libc::c_ulong = 1;
/// `MPOL_F_ADDR` (`get_mempolicy`: the policy at an address).
const MPOL_F_ADDR: libc::c_ulong = 2;

/// The user address space of x86-64 with 4-level paging (the kernel's `TASK_SIZE`): a longer
/// mapping is ENOMEM before the file is asked.
pub const TASK_SIZE: u64 = (1 << 47) - PAGE_SIZE;

/// What `PROCMAP_QUERY` (Linux 6.11+) says of the VMA of this process holding an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmaAt {
    /// First byte of the VMA.
    pub start: u64,
    /// One past its last byte.
    pub end: u64,
    /// File offset at `start`.
    pub offset: u64,
    /// Inode of the file it maps (0: none).
    pub inode: u64,
}

/// `struct procmap_query` of `linux/fs.h`.
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

/// `_IOWR('f', 17, struct procmap_query)`.
const PROCMAP_QUERY: u64 =
    (3 << 30) | ((std::mem::size_of::<ProcmapQuery>() as u64) << 16) | (0x66 << 8) | 17;

/// A descriptor of `/proc/self/maps` kept open for [`vma_at`] (-1: none).
static MAPS_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Opens `/proc/self/maps` once and keeps it for [`vma_at`] (the query then costs one
/// `ioctl`, ≈ 0.7 µs, instead of ≈ 5 µs with its own open and close). Returns the descriptor
/// (the caller records it as private: a fork child must not query this process's layout).
pub fn keep_maps_fd() -> KernelResult<libc::c_int> {
    let kept = MAPS_FD.load(std::sync::atomic::Ordering::Relaxed);
    if kept >= 0 {
        return Ok(kept);
    }
    // Kept for the process's life.
    let fd = libc::c_int::try_from(open_proc_maps()?).map_err(|_| Errno::last())?;
    MAPS_FD.store(fd, std::sync::atomic::Ordering::Relaxed);
    Ok(fd)
}

/// `openat("/proc/self/maps")` by system call (no allocation, nothing an interposer sees):
/// the new descriptor, which the caller closes or keeps.
fn open_proc_maps() -> KernelResult<i64> {
    let path = c"/proc/self/maps";
    // SAFETY: openat of a NUL-terminated path; the caller owns the descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    Ok(fd)
}

/// The VMA of this process holding `addr` (`Ok(None)`: nothing is mapped there), by
/// `PROCMAP_QUERY` on `/proc/self/maps` (the descriptor [`keep_maps_fd`] keeps, or one opened
/// and closed for the query) — system calls only, no allocation, nothing an interposer sees,
/// so a fork handler may call it. ENOTTY before Linux 6.11.
pub fn vma_at(addr: u64) -> KernelResult<Option<VmaAt>> {
    vma_query(addr, 0)
}

/// The first VMA of this process that holds `addr` or lies above it (`Ok(None)`: none), as
/// [`vma_at`] (`PROCMAP_QUERY_COVERING_OR_NEXT_VMA`).
pub fn vma_at_or_above(addr: u64) -> KernelResult<Option<VmaAt>> {
    /// `PROCMAP_QUERY_COVERING_OR_NEXT_VMA` of `linux/fs.h` (0x01–0x08 ask for permissions).
    const COVERING_OR_NEXT_VMA: u64 = 0x10;
    vma_query(addr, COVERING_OR_NEXT_VMA)
}

fn vma_query(addr: u64, query_flags: u64) -> KernelResult<Option<VmaAt>> {
    let kept = MAPS_FD.load(std::sync::atomic::Ordering::Relaxed);
    // The kept descriptor, or one opened here and closed below.
    let fd = if kept >= 0 {
        i64::from(kept)
    } else {
        open_proc_maps()?
    };
    let mut q = ProcmapQuery {
        size: std::mem::size_of::<ProcmapQuery>() as u64,
        query_flags,
        query_addr: addr,
        ..ProcmapQuery::default()
    };
    // SAFETY: PROCMAP_QUERY reads and writes a `struct procmap_query` (no name or build id
    // asked for: their sizes are 0); `fd` is the kept descriptor or the one opened above,
    // closed after.
    let (r, errno) = unsafe {
        let r = libc::syscall(libc::SYS_ioctl, fd, PROCMAP_QUERY, &mut q);
        let errno = Errno::last();
        if kept < 0 {
            libc::syscall(libc::SYS_close, fd);
        }
        (r, errno)
    };
    match r {
        0 => Ok(Some(VmaAt {
            start: q.vma_start,
            end: q.vma_end,
            offset: q.vma_offset,
            inode: q.inode,
        })),
        _ if errno == Errno(libc::ENOENT) => Ok(None),
        _ => Err(errno),
    }
}

/// `mmap(2)`'s generic checks, which answer before any file's own, in do_mmap's order: a zero
/// length or an unaligned offset is EINVAL; a length that overflows when rounded up to pages
/// or exceeds the user address space is ENOMEM; for a fixed address (`addr`), a range ending
/// past the user address space is ENOMEM, then an unaligned address EINVAL. Returns the length
/// rounded up to pages.
pub fn mmap_checks(addr: Option<usize>, len: usize, offset: u64) -> KernelResult<usize> {
    if len == 0 || offset % PAGE_SIZE != 0 {
        return Err(Errno::EINVAL);
    }
    let len = len
        .checked_next_multiple_of(PAGE_SIZE as usize)
        .filter(|&l| l as u64 <= TASK_SIZE)
        .ok_or(Errno::ENOMEM)?;
    if let Some(addr) = addr {
        if addr as u64 > TASK_SIZE - len as u64 {
            return Err(Errno::ENOMEM);
        }
        if addr % PAGE_SIZE as usize != 0 {
            return Err(Errno::EINVAL);
        }
    }
    Ok(len)
}

/// Where a mapping goes when its address is chosen by the caller (`mmap`'s `MAP_FIXED`), as
/// a VMM maps guest memory into a range it reserved: the promise that the range may be
/// replaced is made once, when the placement is made ([`Placement::replacing`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Placement {
    addr: usize,
    len: usize,
    replace: bool,
}

impl Placement {
    /// `[addr, addr + len)`, where nothing may be mapped (`MAP_FIXED_NOREPLACE`: EEXIST
    /// otherwise). Nothing is ever replaced, so anyone may make one.
    pub fn vacant(addr: usize, len: usize) -> Placement {
        Placement {
            addr,
            len,
            replace: false,
        }
    }

    /// `[addr, addr + len)` (`len` rounded up to pages), replacing whatever is mapped there
    /// (`MAP_FIXED`).
    ///
    /// # Safety
    ///
    /// The range must be the caller's to replace: nothing else — no Rust reference, no other
    /// owner such as an [`Mmap`] or an allocator — may use what is mapped there now. The
    /// mapping placed there owns the range and unmaps it when dropped.
    pub unsafe fn replacing(addr: usize, len: usize) -> Placement {
        Placement {
            addr,
            len,
            replace: true,
        }
    }

    /// The first address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// The length asked for (before rounding to pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length asked for is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether what is mapped there is replaced (`MAP_FIXED`) or refused (EEXIST).
    pub fn replaces(&self) -> bool {
        self.replace
    }
}

impl Mmap {
    /// `mmap(NULL, len, PROT_READ|PROT_WRITE, flags, fd, offset)`; EINVAL for `MAP_FIXED`
    /// (use [`Mmap::map_fixed`] inside a mapping).
    pub fn new(
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
        len: usize,
        flags: libc::c_int,
    ) -> KernelResult<Mmap> {
        Self::new_prot(fd, offset, len, flags, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// [`Mmap::new`] with no access at all (`PROT_NONE`), to be made accessible with
    /// [`Mmap::protect`] once it is ready (a host mapping of a guest_memfd: after its private
    /// pages are revoked, so that no access, not even through `process_vm_readv` at an address
    /// guessed in advance, ever reaches one).
    pub fn new_inaccessible(
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
        len: usize,
        flags: libc::c_int,
    ) -> KernelResult<Mmap> {
        Self::new_prot(fd, offset, len, flags, libc::PROT_NONE)
    }

    fn new_prot(
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
        len: usize,
        flags: libc::c_int,
        prot: libc::c_int,
    ) -> KernelResult<Mmap> {
        if len == 0 || flags & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE) != 0 {
            return Err(Errno::EINVAL);
        }
        let offset = libc::off_t::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let raw_fd = fd.map_or(-1, |f| f.as_raw_fd());
        // SAFETY: a NULL hint lets the kernel pick a fresh range, so no existing memory is
        // replaced; the result is checked before use.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, raw_fd, offset) };
        if ptr == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(Errno::ENOMEM)?;
        Ok(Mmap {
            ptr,
            len,
            only_in: std::sync::atomic::AtomicU64::new(0),
            kept: std::sync::atomic::AtomicBool::new(false),
            own_view: false,
        })
    }

    /// [`Mmap::new`] at an address aligned to `align` (a power of two, a multiple of the page
    /// size): an inaccessible anonymous reservation `len + align` long is made, the mapping
    /// placed inside it at the aligned address (`MAP_FIXED`), and the rest of the reservation
    /// unmapped. For a view that may map huge folios with one PMD each (2 MiB alignment).
    pub fn new_aligned(
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
        len: usize,
        flags: libc::c_int,
        align: usize,
    ) -> KernelResult<Mmap> {
        Self::new_aligned_prot(
            fd,
            offset,
            len,
            flags,
            align,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    }

    /// [`Mmap::new_inaccessible`] placed as a huge page-table entry needs it: the address is
    /// congruent to `offset` modulo `align` (a power of two, a multiple of the page size), so
    /// every `align`-aligned block of the file inside the mapping is `align`-aligned in memory.
    pub fn new_inaccessible_aligned(
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
        len: usize,
        flags: libc::c_int,
        align: usize,
    ) -> KernelResult<Mmap> {
        Self::new_aligned_prot(fd, offset, len, flags, align, libc::PROT_NONE)
    }

    fn new_aligned_prot(
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
        len: usize,
        flags: libc::c_int,
        align: usize,
        prot: libc::c_int,
    ) -> KernelResult<Mmap> {
        if !align.is_power_of_two() || align % PAGE_SIZE as usize != 0 {
            return Err(Errno::EINVAL);
        }
        let len_pages = len
            .checked_next_multiple_of(PAGE_SIZE as usize)
            .ok_or(Errno::ENOMEM)?;
        let room = len_pages.checked_add(align).ok_or(Errno::ENOMEM)?;
        let reservation = Mmap::new_prot(
            None,
            0,
            room,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            libc::PROT_NONE,
        )?;
        let start = reservation.as_ptr() as usize;
        // `offset % align` past an aligned address: below `start + align`, so the mapping
        // ends inside the reservation.
        #[allow(clippy::cast_possible_truncation)] // Below `align`, a usize.
        let at = start.next_multiple_of(align) - align + (offset % align as u64) as usize;
        let at = if at < start { at + align } else { at };
        // The reservation is given up: the mapping below replaces part of it, the rest is
        // unmapped here.
        std::mem::forget(reservation);
        // SAFETY: [at, at + len_pages) lies inside the reservation made above, which nothing
        // else knows of and which was given up (forgotten) for this mapping.
        let placement = unsafe { Placement::replacing(at, len_pages) };
        let mapped = Mmap::new_at(placement, fd, offset, flags, prot);
        let head = at - start;
        let tail_start = at + len_pages;
        let tail = start + room - tail_start;
        // SAFETY: the head and tail of the reservation made above (not part of the mapping),
        // which nothing else knows of.
        unsafe {
            if head > 0 {
                libc::munmap(start as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap(tail_start as *mut libc::c_void, tail);
            }
        }
        match mapped {
            Ok(m) => Ok(m),
            Err(e) => {
                // SAFETY: the middle of the reservation, still reserved (the placement failed).
                unsafe { libc::munmap(at as *mut libc::c_void, len_pages) };
                Err(e)
            }
        }
    }

    /// Whether every page of `[off, off + len)` of this mapping is mapped by a huge page-table
    /// entry (a PMD: `PAGEMAP_SCAN`'s `PAGE_IS_HUGE`). Ok(false) where the kernel has no
    /// `PAGEMAP_SCAN` (before 6.7).
    pub fn is_huge_mapped(&self, off: usize, len: usize) -> KernelResult<bool> {
        let end = off.checked_add(len).ok_or(Errno::EFAULT)?;
        if end > self.len || len == 0 {
            return Err(Errno::EFAULT);
        }
        let start = self.ptr.as_ptr() as u64 + off as u64;
        pagemap_all_huge(start, start + len as u64)
    }

    /// Marks this mapping as a host mapping of an emulated file in Remap mode: from now on the
    /// public [`Mmap::protect`], [`Mmap::protect_range`] and [`Mmap::map_fixed`] answer
    /// EOPNOTSUPP on it. A host mapping's [`Mmap`] is
    /// reachable through `HostMapping::mmap`, and under Remap a range of it is kept
    /// `PROT_NONE` over private content while a conversion to shared runs its platform hook
    /// (found in review: a program could have opened it with `protect`).
    pub(crate) fn keep_from_users(&self) {
        self.kept.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn refuse_if_kept(&self) -> KernelResult<()> {
        if self.kept.load(std::sync::atomic::Ordering::Relaxed) {
            Err(Errno::EOPNOTSUPP)
        } else {
            Ok(())
        }
    }

    /// `mprotect` of `[off, off + len)` of this mapping (EINVAL outside it; EOPNOTSUPP on a
    /// host mapping of an emulated file in Remap mode).
    pub fn protect_range(&self, off: usize, len: usize, prot: libc::c_int) -> KernelResult<()> {
        self.refuse_if_kept()?;
        self.protect_range_any(off, len, prot)
    }

    /// [`Mmap::protect_range`] on any mapping (gmem's own use).
    pub(crate) fn protect_range_any(
        &self,
        off: usize,
        len: usize,
        prot: libc::c_int,
    ) -> KernelResult<()> {
        self.check_range(off, len)?;
        // SAFETY: the range lies inside this mapping, which this object owns and into which no
        // Rust reference exists (module documentation).
        check(unsafe { libc::mprotect(self.ptr.as_ptr().add(off).cast(), len, prot) }).map(drop)
    }

    /// `mprotect` of the whole mapping (EOPNOTSUPP on a host mapping of an emulated file in
    /// Remap mode).
    pub fn protect(&self, prot: libc::c_int) -> KernelResult<()> {
        self.refuse_if_kept()?;
        self.protect_any(prot)
    }

    /// [`Mmap::protect`] on any mapping (gmem's own use).
    pub(crate) fn protect_any(&self, prot: libc::c_int) -> KernelResult<()> {
        // SAFETY: the range is this mapping's own; no Rust reference points into it (module
        // documentation), and accesses through raw pointers are checked by their users.
        check(unsafe { libc::mprotect(self.ptr.as_ptr().cast(), self.len, prot) }).map(drop)
    }

    /// `mmap(addr, len, prot, flags | MAP_FIXED, fd, offset)` at `at` (`MAP_FIXED_NOREPLACE`
    /// for a [`Placement::vacant`] one: EEXIST if anything is mapped there). The length is
    /// rounded up to pages, as mmap(2) does; the kernel checks the rest, in its order. EINVAL
    /// for `MAP_FIXED` in `flags`; EPERM for address 0 (the unprivileged kernel's answer: a
    /// mapping at 0 could not be held).
    pub fn new_at(
        at: Placement,
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
        flags: libc::c_int,
        prot: libc::c_int,
    ) -> KernelResult<Mmap> {
        let Placement { addr, len, replace } = at;
        if len == 0 || flags & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE) != 0 {
            return Err(Errno::EINVAL);
        }
        if addr == 0 {
            return Err(Errno(libc::EPERM));
        }
        let len = len
            .checked_next_multiple_of(PAGE_SIZE as usize)
            .ok_or(Errno::ENOMEM)?;
        let offset = libc::off_t::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let raw_fd = fd.map_or(-1, |f| f.as_raw_fd());
        let fixed = if replace {
            libc::MAP_FIXED
        } else {
            libc::MAP_FIXED_NOREPLACE
        };
        // SAFETY: a replacing placement was made by `Placement::replacing`, whose caller gave
        // the range up; a vacant one (MAP_FIXED_NOREPLACE) replaces nothing. The result is
        // checked before use.
        let ptr = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len,
                prot,
                flags | fixed,
                raw_fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(Errno::ENOMEM)?;
        if ptr.as_ptr() as usize != addr {
            // Kernels before 4.17 take MAP_FIXED_NOREPLACE as a hint and map elsewhere.
            // SAFETY: the kernel just mapped this range for us; nothing else knows of it.
            unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
            return Err(Errno(libc::EEXIST));
        }
        Ok(Mmap {
            ptr,
            len,
            only_in: std::sync::atomic::AtomicU64::new(0),
            kept: std::sync::atomic::AtomicBool::new(false),
            own_view: false,
        })
    }

    /// Records this mapping as one of gmem's own views of a memory file, never a host
    /// mapping (`OWN_VIEWS`; `views` is its lock, `own_views`, held since before the mapping
    /// was made); it is forgotten there when dropped, under the same lock as its `munmap`.
    pub fn record_own_view(&mut self, views: &mut std::collections::BTreeMap<usize, usize>) {
        let start = self.ptr.as_ptr() as usize;
        views.insert(start, start + self.len);
        self.own_view = true;
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

    /// `madvise` on `[off, off + len)` of this mapping (EINVAL outside it). EOPNOTSUPP for
    /// `MADV_DOFORK` on a mapping gmem keeps from fork children (`MADV_DONTFORK`: a Remap
    /// host mapping, whose fork children nothing would guard — found in review — or a view).
    pub fn madvise(&self, off: usize, len: usize, advice: libc::c_int) -> KernelResult<()> {
        self.check_range(off, len)?;
        if advice == libc::MADV_DOFORK
            && self.only_in.load(std::sync::atomic::Ordering::Relaxed) != 0
        {
            return Err(Errno::EOPNOTSUPP);
        }
        if advice == libc::MADV_DONTFORK {
            self.only_in
                .store(peer::address_space(), std::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: the range lies inside this mapping, which this object owns and into which no
        // Rust reference exists (module documentation).
        check(unsafe { libc::madvise(self.ptr.as_ptr().add(off).cast(), len, advice) }).map(drop)
    }

    /// Replaces `[off, off + len)` of this mapping with a read/write shared mapping of `fd` at
    /// `fd_off` (`mmap(MAP_FIXED)` inside this mapping's own range; EINVAL outside it;
    /// EOPNOTSUPP on a host mapping of an emulated file in Remap mode).
    pub fn map_fixed(
        &self,
        off: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        fd_off: u64,
    ) -> KernelResult<()> {
        self.refuse_if_kept()?;
        self.map_fixed_any(off, len, fd, fd_off, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// [`Mmap::map_fixed`] with protection `prot`, on any mapping (gmem's own use).
    pub(crate) fn map_fixed_any(
        &self,
        off: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        fd_off: u64,
        prot: libc::c_int,
    ) -> KernelResult<()> {
        self.check_range(off, len)?;
        let fd_off = libc::off_t::try_from(fd_off).map_err(|_| Errno::EINVAL)?;
        // SAFETY: MAP_FIXED over a range inside this mapping, which this object owns and into
        // which no Rust reference exists (module documentation).
        let p = unsafe {
            libc::mmap(
                self.ptr.as_ptr().add(off).cast(),
                len,
                prot,
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

    /// Copies `[off, off + buf.len())` of the mapping into `buf` with volatile accesses (EFAULT
    /// outside the mapping). A page that cannot be faulted in raises SIGBUS, as any access to
    /// the mapping would.
    pub fn read_volatile(&self, off: usize, buf: &mut [u8]) -> KernelResult<()> {
        self.check_access(off, buf.len())?;
        // SAFETY: the range is inside this live mapping (checked) and `buf` is exclusively
        // borrowed; volatile copies make no assumption about concurrent writers.
        unsafe { volatile_copy(self.ptr.as_ptr().add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into the mapping at `off` with volatile accesses (EFAULT outside the
    /// mapping); SIGBUS as [`Mmap::read_volatile`].
    pub fn write_volatile(&self, off: usize, data: &[u8]) -> KernelResult<()> {
        self.check_access(off, data.len())?;
        // SAFETY: as in `read_volatile`; the destination is inside the live mapping, which no
        // Rust reference points into.
        unsafe { volatile_copy(data.as_ptr(), self.ptr.as_ptr().add(off), data.len()) };
        Ok(())
    }

    /// `mbind(2)` of `[off, off + len)`: memory policy `mode` (`MPOL_*`) over the nodes of
    /// `nodemask` (bit n = node n; 0 with `MPOL_DEFAULT`). EINVAL outside the mapping.
    pub fn mbind(&self, off: usize, len: usize, mode: i32, nodemask: u64) -> KernelResult<()> {
        self.check_range(off, len)?;
        let mask = [nodemask];
        // An empty mask is passed as NULL, 0 (as MPOL_DEFAULT requires).
        let (mask_ptr, maxnode): (*const u64, libc::c_ulong) = if nodemask == 0 {
            (std::ptr::null(), 0)
        } else {
            (mask.as_ptr(), 64)
        };
        // SAFETY: the range lies inside this mapping; `mask` is one readable word and maxnode
        // names at most its 64 bits (or NULL, 0). mbind changes no memory the caller can see.
        check(unsafe {
            libc::syscall(
                libc::SYS_mbind,
                self.ptr.as_ptr().add(off),
                len,
                mode,
                mask_ptr,
                maxnode,
                0,
            )
        } as libc::c_int)
        .map(drop)
    }

    /// `get_mempolicy(2)` with `MPOL_F_ADDR` at `off`: the policy mode and node mask that
    /// apply there.
    pub fn mempolicy(&self, off: usize) -> KernelResult<(i32, u64)> {
        self.check_range(off, 1)?;
        self.get_mempolicy(off, MPOL_F_ADDR)
    }

    /// `get_mempolicy(2)` with `MPOL_F_NODE | MPOL_F_ADDR` at `off`: the node of the page
    /// there (faulting it in if needed, as the kernel does).
    pub fn page_node(&self, off: usize) -> KernelResult<i32> {
        self.check_range(off, 1)?;
        self.get_mempolicy(off, MPOL_F_NODE | MPOL_F_ADDR)
            .map(|(n, _)| n)
    }

    fn get_mempolicy(&self, off: usize, flags: libc::c_ulong) -> KernelResult<(i32, u64)> {
        let mut mode: libc::c_int = 0;
        let mut mask = [0u64];
        // SAFETY: `mode` and `mask` are writable for the sizes given (one int, 64 bits);
        // `off` lies inside this mapping (checked by the callers).
        check(unsafe {
            libc::syscall(
                libc::SYS_get_mempolicy,
                &mut mode as *mut libc::c_int,
                mask.as_mut_ptr(),
                64 as libc::c_ulong,
                self.ptr.as_ptr().add(off),
                flags,
            )
        } as libc::c_int)?;
        Ok((mode, mask[0]))
    }

    fn check_range(&self, off: usize, len: usize) -> KernelResult<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Errno::EINVAL),
        }
    }

    fn check_access(&self, off: usize, len: usize) -> KernelResult<()> {
        self.check_range(off, len).map_err(|_| Errno::EFAULT)
    }
}

impl Mmap {
    /// `mremap` of this mapping to `new_len` bytes: in place, or moved anywhere
    /// (`MREMAP_MAYMOVE`), or to `at` (`MREMAP_FIXED`; a [`Placement::vacant`] target is
    /// reserved first, so nothing there is replaced). Afterwards this object is the mapping
    /// at its new place; on failure nothing changed.
    pub(crate) fn remap(
        &mut self,
        new_len: usize,
        may_move: bool,
        at: Option<Placement>,
    ) -> KernelResult<()> {
        let new_len = match new_len.checked_next_multiple_of(PAGE_SIZE as usize) {
            Some(n) if n > 0 => n,
            _ => return Err(Errno::EINVAL),
        };
        let mut flags = if may_move { libc::MREMAP_MAYMOVE } else { 0 };
        // A vacant target is reserved (EEXIST if anything is there), then replaced.
        let mut reserved = None;
        let target = match at {
            Some(p) => {
                if !may_move {
                    return Err(Errno::EINVAL);
                }
                flags |= libc::MREMAP_FIXED;
                if !p.replaces() {
                    reserved = Some(Mmap::new_at(
                        Placement::vacant(p.addr(), new_len),
                        None,
                        0,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                        libc::PROT_NONE,
                    )?);
                }
                p.addr() as *mut libc::c_void
            }
            None => std::ptr::null_mut(),
        };
        // SAFETY: the source is this owned mapping, into which no Rust reference exists; a
        // fixed target was given up by the caller (`Placement::replacing`) or reserved just
        // above. On success the old range is not unmapped again: this object is updated to
        // the new one.
        let p = unsafe { libc::mremap(self.ptr.as_ptr().cast(), self.len, new_len, flags, target) };
        if p == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        if let Some(r) = reserved {
            // Replaced by the moved mapping: the reservation no longer exists.
            std::mem::forget(r);
        }
        let Some(ptr) = NonNull::new(p.cast::<u8>()) else {
            return Err(Errno::ENOMEM);
        };
        self.ptr = ptr;
        self.len = new_len;
        Ok(())
    }
}

/// [`madvise_range`] by system call (not through the C library, whose `madvise` an
/// interposer such as `gmem exec`'s may take locks in): for the guard's server thread, which
/// may hold the fork lock shared while it calls it.
///
/// # Safety
/// As [`madvise_range`].
pub(crate) unsafe fn madvise_raw(addr: usize, len: usize, advice: libc::c_int) -> KernelResult<()> {
    // SAFETY: per the function's contract.
    if unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) } == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// `madvise(advice)` on `[addr, addr + len)`, a range of this process's address space that no
/// [`Mmap`] of the caller's stands for (a mapping the guard follows by address).
///
/// # Safety
///
/// The range must be a `MAP_SHARED` mapping of a file of the caller's, or not mapped, and the
/// advice one that only drops page-table entries there (`MADV_DONTNEED`: a shared file
/// mapping loses no data by it) or changes only how its VMAs are inherited or mapped
/// (`MADV_DONTFORK`, `MADV_DOFORK`, `MADV_HUGEPAGE`, `MADV_NOHUGEPAGE`).
pub(crate) unsafe fn madvise_range(
    addr: usize,
    len: usize,
    advice: libc::c_int,
) -> KernelResult<()> {
    // SAFETY: per the function's contract.
    if unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) } == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        let only_in = *self.only_in.get_mut();
        if only_in != 0 && only_in != peer::address_space() {
            // A fork child's copy of a mapping it did not inherit: nothing of it is ours.
            return;
        }
        // Forgotten as a view under the lock its `munmap` is made under (see `OWN_VIEWS`).
        let mut views = self.own_view.then(own_views);
        // SAFETY: the range was mapped by `Mmap::new` and is unmapped exactly once, here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if let Some(v) = views.as_mut() {
            v.remove(&(self.ptr.as_ptr() as usize));
        }
    }
}

/// Copies `src` into `dst` (the shorter length) with volatile reads and writes, for a source
/// that may be a shared mapping written concurrently (a populate source).
pub fn copy_volatile(src: &[u8], dst: &mut [u8]) {
    let n = src.len().min(dst.len());
    // SAFETY: both ranges are valid for `n` bytes and do not overlap (`dst` is exclusive).
    unsafe { volatile_copy(src.as_ptr(), dst.as_mut_ptr(), n) };
}

/// Copies `len` bytes with volatile accesses (u64-wide where both sides are aligned).
///
/// # Safety
/// Both ranges must be valid for `len` bytes and not overlap.
unsafe fn volatile_copy(src: *const u8, dst: *mut u8, len: usize) {
    let mut i = 0;
    if (src as usize) % 8 == (dst as usize) % 8 {
        while i < len && (src as usize + i) % 8 != 0 {
            // SAFETY: i < len and both ranges are valid for len bytes (caller).
            unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
            i += 1;
        }
        while i + 8 <= len {
            // SAFETY: in bounds as above, and both pointers are 8-aligned here.
            unsafe {
                dst.add(i)
                    .cast::<u64>()
                    .write_volatile(src.add(i).cast::<u64>().read_volatile());
            }
            i += 8;
        }
    }
    while i < len {
        // SAFETY: i < len and both ranges are valid for len bytes (caller).
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
        i += 1;
    }
}

/// `pipe2(O_CLOEXEC | O_NONBLOCK)`: (read end, write end).
pub fn pipe() -> KernelResult<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(Errno::last());
    }
    // SAFETY: both descriptors were just returned by the kernel and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A pipe kept to hold pages by reference for a moment (`vmsplice`), then read empty: made
/// once, grown to 1 MiB where the kernel allows (`fs.pipe-max-size`).
#[derive(Debug)]
pub struct HoldPipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl HoldPipe {
    /// The raw descriptors, read end and write end (for the record of private descriptors a
    /// fork child must not keep).
    pub fn raw_fds(&self) -> [libc::c_int; 2] {
        [self.r.as_raw_fd(), self.w.as_raw_fd()]
    }

    /// Closes both ends by system call (never an interposed C library function), with
    /// whatever the pipe still holds.
    pub fn close_raw(self) {
        let HoldPipe { r, w } = self;
        peer::close_raw(r);
        peer::close_raw(w);
    }

    /// A new, empty pipe.
    pub fn new() -> KernelResult<HoldPipe> {
        let (r, w) = pipe()?;
        // SAFETY: F_SETPIPE_SZ on our own pipe; a refusal leaves the default size, which
        // only makes more steps.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
        Ok(HoldPipe { r, w })
    }

    /// Takes references to the pages of `[off, off + len)` of file `fd` (`splice` from the
    /// file: its page-cache pages, no copy and no mapping): returns how many bytes it holds
    /// (at most what the pipe takes). The pipe must be empty.
    pub fn hold_file(&self, fd: BorrowedFd<'_>, off: u64, len: usize) -> KernelResult<usize> {
        let mut done = 0usize;
        while done < len {
            let mut at = libc::loff_t::try_from(off + done as u64).map_err(|_| Errno::EINVAL)?;
            // SAFETY: splice between our file and our pipe; `at` is a valid offset cell.
            let n = unsafe {
                libc::splice(
                    fd.as_raw_fd(),
                    &mut at,
                    self.w.as_raw_fd(),
                    std::ptr::null_mut(),
                    len - done,
                    libc::SPLICE_F_NONBLOCK,
                )
            };
            if n > 0 {
                done += n.unsigned_abs();
                continue;
            }
            if done > 0 && (n == 0 || Errno::last() == Errno::EAGAIN) {
                break;
            }
            return Err(if n == 0 { Errno::EFAULT } else { Errno::last() });
        }
        Ok(done)
    }

    /// Writes what the pipe holds into file `fd` at `off` (`splice`: new page-cache pages),
    /// from `*done` on (`*done` counts what was written, for a retry).
    pub fn release_into_file(
        &self,
        fd: BorrowedFd<'_>,
        off: u64,
        len: usize,
        done: &mut usize,
    ) -> KernelResult<()> {
        while *done < len {
            let mut at = libc::loff_t::try_from(off + *done as u64).map_err(|_| Errno::EINVAL)?;
            // SAFETY: splice between our pipe and our file; `at` is a valid offset cell.
            let n = unsafe {
                libc::splice(
                    self.r.as_raw_fd(),
                    std::ptr::null_mut(),
                    fd.as_raw_fd(),
                    &mut at,
                    len - *done,
                    0,
                )
            };
            if n > 0 {
                *done += n.unsigned_abs();
                continue;
            }
            return Err(if n == 0 { Errno::EFAULT } else { Errno::last() });
        }
        Ok(())
    }
}

/// Vmsplices `[off, off + len)` of `map` into pipes that are never read; returns them. While
/// they are open the kernel holds a reference on every page (EFAULT outside the mapping).
pub fn vmsplice_pin(map: &Mmap, off: usize, len: usize) -> KernelResult<Vec<(OwnedFd, OwnedFd)>> {
    map.check_access(off, len)?;
    // SAFETY: inside the mapping (checked).
    let addr = unsafe { map.as_ptr().add(off) };
    let mut pipes = Vec::new();
    let mut done = 0usize;
    while done < len {
        let (r, w) = pipe()?;
        // Grow the pipe to hold the rest (one slot per page); the kernel may cap it
        // (fs.pipe-max-size), in which case more pipes follow.
        let want = libc::c_int::try_from((len - done).next_power_of_two()).unwrap_or(i32::MAX);
        // SAFETY: F_SETPIPE_SZ on our own pipe; the result is only a size.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
        let mut in_this_pipe = 0usize;
        while done < len {
            let iov = libc::iovec {
                // SAFETY: done < len, inside the checked range.
                iov_base: unsafe { addr.add(done) }.cast(),
                iov_len: len - done,
            };
            // SAFETY: one iovec over memory of the live mapping; vmsplice takes page
            // references and never writes the memory.
            let n = unsafe { libc::vmsplice(w.as_raw_fd(), &iov, 1, libc::SPLICE_F_NONBLOCK) };
            if n > 0 {
                done += n.unsigned_abs();
                in_this_pipe += n.unsigned_abs();
                continue;
            }
            let e = Errno::last();
            if (e == Errno::EAGAIN || n == 0) && in_this_pipe > 0 {
                break; // This pipe is full: next pipe.
            }
            return Err(if n == 0 { Errno::EFAULT } else { e });
        }
        pipes.push((r, w));
    }
    Ok(pipes)
}

/// An epoll instance: which of many descriptors (each named by a token) are readable.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    /// The raw descriptor (for the record of private descriptors a fork child must not keep).
    pub fn raw_fd(&self) -> libc::c_int {
        self.fd.as_raw_fd()
    }

    /// `epoll_create1(EPOLL_CLOEXEC)`.
    pub fn new() -> KernelResult<Epoll> {
        // SAFETY: plain syscall with an integer argument.
        let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll { fd })
    }

    /// Watches `fd` for input, reported as `token`.
    pub fn add(&self, fd: BorrowedFd<'_>, token: u64) -> KernelResult<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event for the call; the kernel copies it.
        check(unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &mut ev,
            )
        })
        .map(drop)
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: BorrowedFd<'_>) -> KernelResult<()> {
        // SAFETY: EPOLL_CTL_DEL ignores the event argument (NULL allowed since 2.6.9).
        check(unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd.as_raw_fd(),
                std::ptr::null_mut(),
            )
        })
        .map(drop)
    }

    /// Waits at most `timeout_ms` (-1: for ever) and writes the tokens of the readable
    /// descriptors into `ready` (64 at most); how many. An interrupted wait returns none.
    /// Allocates nothing.
    pub fn wait_into(&self, ready: &mut [u64; 64], timeout_ms: i32) -> KernelResult<usize> {
        const MAX: usize = 64;
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; MAX];
        // SAFETY: `evs` has room for MAX events for the duration of the call.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                evs.as_mut_ptr(),
                MAX as libc::c_int,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = Errno::last();
            return if e == Errno::EINTR { Ok(0) } else { Err(e) };
        }
        let n = usize::try_from(n).unwrap_or(0).min(MAX);
        for (r, e) in ready.iter_mut().zip(&evs[..n]) {
            *r = e.u64;
        }
        Ok(n)
    }
}

/// `PAGEMAP_SCAN` (`linux/fs.h`, 6.7): `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `PAGE_IS_HUGE`: mapped by a PMD (THP) or a hugetlb entry.
const PAGE_IS_HUGE: u64 = 1 << 6;
/// `PAGE_IS_PRESENT`.
const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = (3 << 30) | (96 << 16) | ((b'f' as libc::c_ulong) << 8) | 16;

/// Whether every page of this process's `[start, end)` is present and mapped huge.
fn pagemap_all_huge(start: u64, end: u64) -> KernelResult<bool> {
    // Opened per call: a `/proc/self/pagemap` descriptor reads the page tables of the
    // address space that opened it, and one kept would answer for the parent in a fork child
    // (found in review). A query costs a block mapping and a populate anyway.
    let Ok(file) = std::fs::File::open("/proc/self/pagemap") else {
        return Ok(false);
    };
    let fd = OwnedFd::from(file);
    let mut regions = [PageRegion::default(); 4];
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        start,
        end,
        vec: regions.as_mut_ptr() as u64,
        vec_len: regions.len() as u64,
        // Regions that are not present and huge: any one answers "no".
        category_inverted: PAGE_IS_HUGE | PAGE_IS_PRESENT,
        category_anyof_mask: PAGE_IS_HUGE | PAGE_IS_PRESENT,
        return_mask: PAGE_IS_HUGE | PAGE_IS_PRESENT,
        ..PmScanArg::default()
    };
    // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len` regions into `regions`,
    // which outlives the call; it only reads this process's page tables.
    let n = unsafe { libc::ioctl(fd.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
    if n < 0 {
        let e = Errno::last();
        // No PAGEMAP_SCAN on this kernel: nothing is known to be huge.
        return if e == Errno::EINVAL || e == Errno(libc::ENOTTY) {
            Ok(false)
        } else {
            Err(e)
        };
    }
    // No region lacking either category (inverted: one is reported when either is missing),
    // over the whole range: the walk must have reached its end (a range with no VMA reports
    // nothing and ends the walk early).
    Ok(n == 0 && arg.walk_end >= end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `vma_at` answers for the VMA holding an address, `vma_at_or_above` also for the next
    /// one above a hole, and nothing above the last.
    #[test]
    fn vma_queries_find_the_holding_and_the_next_vma() {
        let len = 3 * PAGE_SIZE as usize;
        let m = Mmap::new(None, 0, len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS).unwrap();
        let base = m.as_ptr() as u64;
        // SAFETY: the middle page of our own anonymous mapping; nothing refers into it.
        let rc =
            unsafe { libc::munmap((base + PAGE_SIZE) as *mut libc::c_void, PAGE_SIZE as usize) };
        assert_eq!(rc, 0);
        match vma_at(base + PAGE_SIZE) {
            // Before Linux 6.11 both answer ENOTTY (their documented answer there), which the
            // callers take as "the kernel cannot say".
            Err(e) if e == Errno(libc::ENOTTY) => {
                assert_eq!(vma_at_or_above(base).err(), Some(Errno(libc::ENOTTY)));
                return;
            }
            r => assert_eq!(r.unwrap(), None, "a hole"),
        }
        let next = vma_at_or_above(base + PAGE_SIZE).unwrap().unwrap();
        assert_eq!(next.start, base + 2 * PAGE_SIZE, "the VMA above the hole");
        assert_eq!(vma_at(base).unwrap().unwrap().start, base);
        assert_eq!(vma_at_or_above(TASK_SIZE - PAGE_SIZE).unwrap(), None);
    }
}
