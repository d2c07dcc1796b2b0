//! Host mappings of a guest_memfd, and faulting accesses run so that SIGBUS is reported
//! instead of fatal.
//!
//! A [`HostMapping`] is what `mmap()` of a guest_memfd returns: the same physical memory the
//! guest uses, shared pages read/write in place, private pages raising a real SIGBUS (the
//! kernel's, on the kernel backend; a userfaultfd poison marker or a hole mapping, on the
//! emulated one).
//!
//! [`HostMapping::probe_read`] runs one access in a child process that shares this process's
//! memory (`clone(CLONE_VM | CLONE_VFORK)`) but not its signal handlers: the child installs its
//! own SIGBUS/SIGSEGV handlers, so a fault is reported with its address and code, and the calling
//! process never has a process-wide handler installed. A `fork()` child would not do: its
//! copy of a shared mapping starts without the parent's PTEs (and so without poison markers).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Errno, KernelResult};
use crate::sys::{self, Mmap, Placement};

/// Who must hear of a mapping's end (the emulated file revokes private pages in every live
/// mapping, so it keeps a list).
pub(crate) trait MappingRegistry: Send + Sync {
    /// `mremap` of the mapping `id` (`map`), with the registry following it.
    fn remap(
        &self,
        id: u64,
        map: &mut Mmap,
        new_len: usize,
        may_move: bool,
        at: Option<Placement>,
    ) -> KernelResult<()>;

    /// `MADV_REMOVE` on the file's `[offset, offset + len)`: a punch hole.
    fn punch(&self, offset: u64, len: u64) -> KernelResult<()>;

    /// The mapping `id` is about to be unmapped.
    fn unregister(&self, id: u64);
}

/// A mapping of a whole file (offset 0, the file's size), made on first use and kept for the
/// file's lifetime: the kernel file's host view, the emulated file's guest view and direct
/// map. A failure to map is kept too: every later use reports the same errno.
#[derive(Debug, Default)]
pub(crate) struct WholeFileView(OnceLock<Result<Mmap, Errno>>);

impl WholeFileView {
    /// The view of `fd` (`size` bytes, `flags` as `mmap()`'s), mapped on the first call.
    pub(crate) fn get_or_map(
        &self,
        fd: BorrowedFd<'_>,
        size: u64,
        flags: libc::c_int,
    ) -> KernelResult<&Mmap> {
        self.get_or_map_with(fd, size, flags, false, false)
    }

    /// [`WholeFileView::get_or_map`], 2 MiB-aligned and asking for huge folios
    /// (`MADV_HUGEPAGE`) when `huge`, and never inherited by a fork child when `private`.
    pub(crate) fn get_or_map_with(
        &self,
        fd: BorrowedFd<'_>,
        size: u64,
        flags: libc::c_int,
        huge: bool,
        private: bool,
    ) -> KernelResult<&Mmap> {
        let view = self.0.get_or_init(|| {
            let len = usize::try_from(size).map_err(|_| Errno::ENOMEM)?;
            map_view(fd, 0, len, flags, huge, private)
        });
        view.as_ref().map_err(|e| *e)
    }

    /// The view, if it was mapped.
    pub(crate) fn get(&self) -> Option<&Mmap> {
        self.0.get().and_then(|v| v.as_ref().ok())
    }
}

/// A view of `len` bytes of `fd` from `offset`: with `private`, never inherited by a fork
/// child (`MADV_DONTFORK`, set before any fork can copy it); with `huge`, 2 MiB-aligned and
/// marked `MADV_HUGEPAGE`, so that a 2 MiB block of the file allocated through it is one huge
/// folio and is mapped by one PMD.
pub(crate) fn map_view(
    fd: BorrowedFd<'_>,
    offset: u64,
    len: usize,
    flags: libc::c_int,
    huge: bool,
    private: bool,
) -> KernelResult<Mmap> {
    // No fork between the mapping and its MADV_DONTFORK.
    let _quiet = private.then(crate::emulated::fork_quiet);
    // A private view is one of gmem's own (the emulated file's): mapped and recorded as such
    // under one hold of the record's lock, so the guard, which reads the kernel's maps under
    // it, never takes it for a host mapping (`sys::OWN_VIEWS`).
    let mut views = private.then(crate::sys::own_views);
    let mut map = if huge {
        let map = Mmap::new_aligned(Some(fd), offset, len, flags, HUGE_ALIGN)?;
        map.madvise(0, len, libc::MADV_HUGEPAGE)?;
        map
    } else {
        Mmap::new(Some(fd), offset, len, flags)?
    };
    // gmem's own views map every page, private ones included: a fork child must not inherit
    // them (found in review: a child read private pages through them, before and after the
    // fork; DESIGN.md said they were not inherited, and they were).
    if private {
        map.madvise(0, len, libc::MADV_DONTFORK)?;
    }
    if let Some(v) = views.as_mut() {
        map.record_own_view(v);
    }
    Ok(map)
}

/// The alignment of a view that maps huge folios (a PMD's span).
const HUGE_ALIGN: usize = 2 << 20;

/// Files larger than this are seen through windows ([`VIEW_CHUNK`] each, mapped on first use)
/// instead of one mapping of the whole file: a whole-file view of a file of 2^47 bytes or more
/// cannot be mapped at all (the user address space is 2^47 bytes), and several views of a
/// smaller one would use most of it.
pub(crate) const WHOLE_VIEW_MAX: u64 = 1 << 44;
/// The window size of a windowed view (aligned in the file).
pub(crate) const VIEW_CHUNK: u64 = 1 << 30;
/// The most windows one view keeps: each is one VMA and [`VIEW_CHUNK`] of address space, kept
/// for the file's lifetime (a removal from the direct map is a layout change of its window,
/// so windows are never dropped early). Past it, ENOMEM.
pub(crate) const VIEW_CHUNKS_MAX: usize = 4096;

/// A borrowed whole-file view or a shared window of one.
pub(crate) enum ViewRef<'a> {
    /// The whole-file view.
    Whole(&'a Mmap),
    /// A window, kept alive by its view and by this handle.
    Window(Arc<Mmap>),
}

impl Deref for ViewRef<'_> {
    type Target = Mmap;
    fn deref(&self) -> &Mmap {
        match self {
            ViewRef::Whole(m) => m,
            ViewRef::Window(m) => m,
        }
    }
}

/// gmem's internal view of a whole file (the emulated guest view, the direct map): one mapping
/// for a file up to [`WHOLE_VIEW_MAX`], windows of [`VIEW_CHUNK`] mapped on first use beyond,
/// so a file of any size the kernel accepts (up to `i64::MAX`) works and costs only the windows
/// it touches. [`FileView::whole`] still maps the whole file for a caller that needs one
/// contiguous range (a memslot), where the address space allows.
#[derive(Debug, Default)]
pub(crate) struct FileView {
    whole: WholeFileView,
    windows: Mutex<BTreeMap<u64, Arc<Mmap>>>,
    /// What gmem's own accesses may have mapped in this view since the zap that last covered
    /// it ([`FileView::begin_access`], [`FileView::zap_changed`]).
    accessed: Mutex<Accessed>,
    /// The whole view's address was handed out (a memslot): anything may be mapped in it.
    exposed: AtomicBool,
    /// Mapped 2 MiB-aligned with `MADV_HUGEPAGE` (a file of huge folios).
    huge: bool,
}

/// The part of a [`FileView`] that gmem's own accesses may have mapped: byte range
/// `extent` of the file (page-aligned), and the accesses in flight.
///
/// An access maps more than it touches: a read fault on a shared file mapping also maps the
/// neighbouring pages the page cache holds ("fault-around", up to a page table's span: 2 MiB
/// of address space on x86-64, never across it). So an access to `[off, off + len)` notes
/// `[off - 2 MiB, off + len + 2 MiB)`, rounded out to pages and clipped to the file.
#[derive(Debug, Default)]
pub(crate) struct Accessed {
    extent: Option<(u64, u64)>,
    in_flight: usize,
}

impl Accessed {
    /// What fault-around may map beyond one page table's span.
    const FAULT_AROUND_SPAN: u64 = 2 << 20;

    /// The span an access to `[off, off + len)` of a `size`-byte file may map.
    fn span(off: u64, len: u64, size: u64) -> (u64, u64) {
        let page = sys::PAGE_SIZE;
        let lo = off.saturating_sub(Self::FAULT_AROUND_SPAN) / page * page;
        let hi = off
            .saturating_add(len)
            .saturating_add(Self::FAULT_AROUND_SPAN)
            .min(size)
            .div_ceil(page)
            .saturating_mul(page);
        (lo.min(hi), hi)
    }

    fn note(&mut self, (s, e): (u64, u64)) {
        self.extent = Some(match self.extent {
            Some((lo, hi)) => (lo.min(s), hi.max(e)),
            None => (s, e),
        });
    }
}

/// One of gmem's own accesses through a [`FileView`], in flight until dropped.
pub(crate) struct AccessGuard<'a> {
    view: &'a FileView,
}

impl Drop for AccessGuard<'_> {
    fn drop(&mut self) {
        let mut a = self.view.accessed();
        a.in_flight = a.in_flight.saturating_sub(1);
    }
}

impl FileView {
    /// A view of a file of huge folios (`huge`: mapped 2 MiB-aligned, `MADV_HUGEPAGE`) or of
    /// 4 KiB ones.
    pub(crate) fn new(huge: bool) -> FileView {
        FileView {
            huge,
            ..FileView::default()
        }
    }

    /// The whole-file view (mapped on the first call; ENOMEM where the file does not fit).
    pub(crate) fn whole(
        &self,
        fd: BorrowedFd<'_>,
        size: u64,
        flags: libc::c_int,
    ) -> KernelResult<&Mmap> {
        self.whole.get_or_map_with(fd, size, flags, self.huge, true)
    }

    /// The view holding `[off, off + len)` of the file and the range's offset in it; EFAULT
    /// outside the file or across a window boundary (see [`FileView::pieces`]).
    pub(crate) fn slice(
        &self,
        fd: BorrowedFd<'_>,
        size: u64,
        flags: libc::c_int,
        off: u64,
        len: u64,
    ) -> KernelResult<(ViewRef<'_>, usize)> {
        let end = off.checked_add(len).ok_or(Errno::EFAULT)?;
        if end > size {
            return Err(Errno::EFAULT);
        }
        if size <= WHOLE_VIEW_MAX {
            let whole = self.whole(fd, size, flags)?;
            return Ok((
                ViewRef::Whole(whole),
                usize::try_from(off).map_err(|_| Errno::EFAULT)?,
            ));
        }
        let base = off - off % VIEW_CHUNK;
        if end > base + VIEW_CHUNK {
            return Err(Errno::EFAULT);
        }
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let window = match windows.get(&base) {
            Some(w) => w.clone(),
            None => {
                if windows.len() >= VIEW_CHUNKS_MAX {
                    return Err(Errno::ENOMEM);
                }
                // At most VIEW_CHUNK bytes.
                #[allow(clippy::cast_possible_truncation)]
                let n = VIEW_CHUNK.min(size - base) as usize;
                let w = Arc::new(map_view(fd, base, n, flags, self.huge, true)?);
                windows.insert(base, w.clone());
                w
            }
        };
        // Below VIEW_CHUNK.
        #[allow(clippy::cast_possible_truncation)]
        Ok((ViewRef::Window(window), (off - base) as usize))
    }

    /// Calls `f(view, offset in the view, offset in the range, length)` for each piece of file
    /// range `[off, off + len)`, one per window (one in all for a whole-file view).
    pub(crate) fn pieces(
        &self,
        fd: BorrowedFd<'_>,
        size: u64,
        flags: libc::c_int,
        off: u64,
        len: u64,
        mut f: impl FnMut(&Mmap, usize, usize, usize) -> KernelResult<()>,
    ) -> KernelResult<()> {
        let mut pos = 0u64;
        while pos < len {
            let at = off.checked_add(pos).ok_or(Errno::EFAULT)?;
            let n = if size <= WHOLE_VIEW_MAX {
                len - pos
            } else {
                (len - pos).min(VIEW_CHUNK - at % VIEW_CHUNK)
            };
            let (view, o) = self.slice(fd, size, flags, at, n)?;
            let (p, n_) = (
                usize::try_from(pos).map_err(|_| Errno::EFAULT)?,
                usize::try_from(n).map_err(|_| Errno::EFAULT)?,
            );
            f(&view, o, p, n_)?;
            pos += n;
        }
        Ok(())
    }

    /// gmem's own access to `[off, off + len)` of a file of `size` bytes through this view
    /// begins; it ends when the returned guard goes. What the access may map is noted (see
    /// [`Accessed`]) when it begins, and while any access is in flight no zap forgets
    /// anything, so the note outlives the access.
    pub(crate) fn begin_access(&self, off: u64, len: u64, size: u64) -> AccessGuard<'_> {
        let mut a = self.accessed();
        a.note(Accessed::span(off, len, size));
        a.in_flight += 1;
        AccessGuard { view: self }
    }

    fn accessed(&self) -> std::sync::MutexGuard<'_, Accessed> {
        self.accessed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The whole view's address leaves gmem (a memslot): from now on every change zaps.
    pub(crate) fn expose(&self) {
        self.exposed.store(true, Ordering::Release);
    }

    /// After a conversion of the byte runs `runs`: zaps this view's PTEs of them (as the
    /// kernel invalidates KVM's mappings of a converted range), or only of the part gmem's own
    /// accesses may have mapped when the view was never handed out — nothing at all when no
    /// access came since the last zap (an empty `MADV_DONTNEED` is a system call all the
    /// same). Best effort: zapping our own shared mappings does not fail; if it did, the guest
    /// would keep a mapping of the same page, which holds the same data.
    pub(crate) fn zap_changed(&self, runs: &[(u64, u64)]) {
        if self.exposed.load(Ordering::Acquire) {
            for &(s, e) in runs {
                self.advise_mapped(s, e - s, libc::MADV_DONTNEED);
            }
            return;
        }
        // Forgotten before the zap, and only when no access is in flight (one that began
        // before this conversion may map a page after the zap, and its note must outlive
        // it).
        let (lo, hi) = {
            let mut a = self.accessed();
            let Some((lo, hi)) = a.extent else {
                return;
            };
            if a.in_flight == 0 && runs.iter().any(|&(s, e)| s <= lo && hi <= e) {
                a.extent = None;
            }
            (lo, hi)
        };
        for &(s, e) in runs {
            let (s, e) = (s.max(lo), e.min(hi));
            if s < e {
                self.advise_mapped(s, e - s, libc::MADV_DONTNEED);
            }
        }
    }

    /// `madvise(advice)` of file range `[off, off + len)` wherever it is mapped (the whole
    /// view, the windows that exist); nothing mapped, nothing to do. Best effort.
    pub(crate) fn advise_mapped(&self, off: u64, len: u64, advice: libc::c_int) {
        let end = off.saturating_add(len);
        if let Some(whole) = self.whole.get() {
            let e = end.min(whole.len() as u64);
            if off < e {
                // Inside the whole view (clipped to it).
                #[allow(clippy::cast_possible_truncation)]
                let _ = whole.madvise(off as usize, (e - off) as usize, advice);
            }
        }
        let windows = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let first = off - off % VIEW_CHUNK;
        for (&base, w) in windows.range(first..end) {
            let (s, e) = (off.max(base), end.min(base + w.len() as u64));
            if s < e {
                // Inside the window (clipped to it).
                #[allow(clippy::cast_possible_truncation)]
                let _ = w.madvise((s - base) as usize, (e - s) as usize, advice);
            }
        }
    }
}

/// How a mapping is shared, as `mmap()`'s `MAP_SHARED` / `MAP_PRIVATE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// `MAP_SHARED`: the only kind guest_memfd accepts.
    Shared,
    /// `MAP_PRIVATE` (copy-on-write): refused with EINVAL.
    Private,
}

impl MapKind {
    /// `mmap()`'s flag for this kind.
    pub fn mmap_flag(self) -> libc::c_int {
        match self {
            MapKind::Shared => libc::MAP_SHARED,
            MapKind::Private => libc::MAP_PRIVATE,
        }
    }
}

/// A host userspace mapping of (part of) a guest_memfd. Unmapped on drop.
pub struct HostMapping {
    /// Shared with the emulated file's registration, which revokes private pages in it; the
    /// registration goes first (on drop), so the range is unmapped after it.
    map: Arc<Mmap>,
    file_offset: u64,
    registration: Option<(Arc<dyn MappingRegistry>, u64)>,
}

impl fmt::Debug for HostMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostMapping")
            .field("addr", &self.map.as_ptr())
            .field("len", &self.map.len())
            .field("file_offset", &self.file_offset)
            .finish()
    }
}

impl HostMapping {
    pub(crate) fn new(
        map: Arc<Mmap>,
        file_offset: u64,
        registration: Option<(Arc<dyn MappingRegistry>, u64)>,
    ) -> Self {
        HostMapping {
            map,
            file_offset,
            registration,
        }
    }

    /// First byte of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// Length in bytes (may exceed the file: accesses past its end raise SIGBUS).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The file offset the mapping starts at.
    pub fn file_offset(&self) -> u64 {
        self.file_offset
    }

    /// The underlying mapping.
    pub fn mmap(&self) -> &Mmap {
        &self.map
    }

    /// Copies `[off, off + buf.len())` of the mapping into `buf`.
    ///
    /// This is a plain memory access: on a private page (or past the end of the file) the
    /// process receives SIGBUS, exactly as with any access to a guest_memfd mapping. Use
    /// [`HostMapping::probe_read`] to have the fault reported, or the file's safe accessors
    /// to get a typed error. Fails with EFAULT only when the range is outside the mapping.
    pub fn read_volatile(&self, off: usize, buf: &mut [u8]) -> KernelResult<()> {
        self.map.read_volatile(off, buf)
    }

    /// Copies `data` into the mapping at `off`. SIGBUS on a private page, as
    /// [`HostMapping::read_volatile`].
    pub fn write_volatile(&self, off: usize, data: &[u8]) -> KernelResult<()> {
        self.map.write_volatile(off, data)
    }

    /// Writes `value` to the first byte of every page of `[off, off + len)` (faulting them in).
    /// SIGBUS on a private page, as [`HostMapping::read_volatile`].
    pub fn touch_pages(&self, off: usize, len: usize, value: u8) -> KernelResult<()> {
        self.map.touch_pages(off as u64, len as u64, value)
    }

    /// `madvise(2)` on `[off, off + len)` of the mapping, with guest_memfd's answers on the
    /// emulated backend:
    /// - `MADV_COLLAPSE` is EINVAL, as the kernel refuses it on a guest_memfd VMA (guest_memfd
    ///   has no huge folios; a huge page could expose private neighbours), whatever the memfd
    ///   behind it would allow;
    /// - `MADV_REMOVE` punches the range out of the file (`fallocate(PUNCH_HOLE)`, with its
    ///   checks and errno), as on any shmem-like file;
    /// - `MADV_POPULATE_READ`/`WRITE` map the shared pages up to the first private one and
    ///   answer EFAULT there, as the kernel's fault handler answers SIGBUS for a private page
    ///   (the guard's marker would otherwise say EHWPOISON).
    ///
    /// Every other advice is the kernel's answer on the mapping. `MADV_DONTNEED`,
    /// `MADV_PAGEOUT` and the like drop page-table entries only: the next access faults
    /// through the guard's check again.
    pub fn madvise(&self, off: usize, len: usize, advice: libc::c_int) -> KernelResult<()> {
        let Some((registry, _)) = &self.registration else {
            return self.map.madvise(off, len, advice);
        };
        let in_range = || {
            off.checked_add(len)
                .filter(|&end| end <= self.len())
                .ok_or(Errno::EINVAL)
        };
        match advice {
            libc::MADV_COLLAPSE => {
                in_range()?;
                Err(Errno::EINVAL)
            }
            libc::MADV_REMOVE => {
                // madvise's own checks: an aligned start, the length in whole pages, every
                // page mapped (ENOMEM).
                const PAGE: usize = sys::PAGE_SIZE as usize;
                if off % PAGE != 0 {
                    return Err(Errno::EINVAL);
                }
                let len = len.checked_next_multiple_of(PAGE).ok_or(Errno::EINVAL)?;
                if off.checked_add(len).is_none_or(|end| end > self.len()) {
                    return Err(Errno::ENOMEM);
                }
                registry.punch(self.file_offset + off as u64, len as u64)
            }
            libc::MADV_POPULATE_READ | libc::MADV_POPULATE_WRITE => {
                match self.map.madvise(off, len, advice) {
                    Err(e) if e == Errno(libc::EHWPOISON) => Err(Errno::EFAULT),
                    other => other,
                }
            }
            _ => self.map.madvise(off, len, advice),
        }
    }

    /// `mremap(2)` of the mapping to `new_len` bytes, as the kernel allows it on a guest_memfd
    /// mapping: in place (shrink, or grow where the addresses after it are free: ENOMEM
    /// otherwise), moved anywhere (`may_move`, `MREMAP_MAYMOVE`), or moved to `at`
    /// (`MREMAP_FIXED`; a [`Placement::vacant`] target is EEXIST if anything is mapped
    /// there). The file offset stays; pages past the file's end raise SIGBUS as always. The
    /// guard follows the mapping: private pages are refused at the new addresses, and
    /// nothing at the old ones is touched afterwards. On failure nothing changed.
    ///
    /// EOPNOTSUPP where the emulation cannot follow a moved mapping (the Remap fallback,
    /// whose holes are mapped into it).
    pub fn mremap(
        &mut self,
        new_len: usize,
        may_move: bool,
        at: Option<Placement>,
    ) -> KernelResult<()> {
        let Some(map) = Arc::get_mut(&mut self.map) else {
            return Err(Errno::EOPNOTSUPP);
        };
        match &self.registration {
            Some((registry, id)) => registry.remap(*id, map, new_len, may_move, at),
            None => map.remap(new_len, may_move, at),
        }
    }

    /// Reads `len` bytes at `off` in a child process, so that a fault is reported.
    pub fn probe_read(&self, off: usize, len: usize) -> KernelResult<Probe<Vec<u8>>> {
        sys::probe::probe(&self.map, off, len, ProbeOp::Read).map(|p| p.rebase(self.as_ptr()))
    }

    /// Fills `len` bytes at `off` with `byte` in a child process, so that a fault is reported.
    pub fn probe_write(&self, off: usize, len: usize, byte: u8) -> KernelResult<Probe<()>> {
        let p = sys::probe::probe(&self.map, off, len, ProbeOp::Fill(byte))?;
        Ok(match p.rebase(self.as_ptr()) {
            Probe::Done(_) => Probe::Done(()),
            Probe::Fault(f) => Probe::Fault(f),
        })
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // Unregister before the address range is released: once unregistered no conversion
        // touches it, so a later mapping that reuses the address is never revoked by mistake.
        if let Some((registry, id)) = self.registration.take() {
            registry.unregister(id);
        }
    }
}

/// A fault raised by a probed access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// `SIGBUS` or `SIGSEGV`.
    pub signal: i32,
    /// `si_code` (`BUS_ADRERR`, `BUS_MCEERR_AR`, `SEGV_ACCERR`, ...).
    pub code: i32,
    /// Faulting address; after [`HostMapping::probe_read`], the offset into the mapping.
    pub addr: u64,
}

impl Fault {
    /// Whether the fault is a SIGBUS.
    pub fn is_sigbus(&self) -> bool {
        self.signal == libc::SIGBUS
    }
}

/// What a probed access did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe<T> {
    /// The access completed.
    Done(T),
    /// The access faulted.
    Fault(Fault),
}

impl<T> Probe<T> {
    fn rebase(self, base: *mut u8) -> Probe<T> {
        match self {
            Probe::Fault(mut f) => {
                f.addr = f.addr.wrapping_sub(base as u64);
                Probe::Fault(f)
            }
            done => done,
        }
    }

    /// The fault, if the access faulted.
    pub fn fault(&self) -> Option<Fault> {
        match self {
            Probe::Fault(f) => Some(*f),
            Probe::Done(_) => None,
        }
    }

    /// Whether the access raised SIGBUS.
    pub fn is_sigbus(&self) -> bool {
        self.fault().is_some_and(|f| f.is_sigbus())
    }
}

/// The access a probe performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOp {
    /// Read every byte.
    Read,
    /// Write this byte to every byte.
    Fill(u8),
}
