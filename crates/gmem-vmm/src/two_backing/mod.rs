//! The two-backing model, as every production VMM implements guest_memfd conversion today
//! (QEMU's `kvm_convert_memory` + `RamBlockAttributes`, Cloud Hypervisor's SEV-SNP path,
//! libkrun's conversion worker; DESIGN.md "The two models"): the baseline gmem's in-place
//! model is measured against.
//!
//! - A **private store**: a memfd standing for a flags-0 guest_memfd (private-only; the guest
//!   reaches it through KVM, modelled here by an internal mapping the VMM never hands out).
//! - A separate **shared memfd**: the ordinary guest RAM mapping the VMM and its devices use.
//! - **Per-page attributes** ([`AttributeStore`]), like QEMU's per-RAMBlock bitmap.
//! - To private: record the attribute and discard the shared copy
//!   (`fallocate(PUNCH_HOLE | KEEP_SIZE)` on the shared memfd, which is what QEMU's
//!   `ram_block_discard_range` does for fd-backed RAM, and which also zaps every mapping of
//!   it, as libkrun's `MADV_DONTNEED` does for anonymous RAM).
//! - To shared: record the attribute and punch the private copy (QEMU's
//!   `ram_block_discard_guest_memfd_range`, Cloud Hypervisor's `punch_holes_in_guest_memfd`,
//!   libkrun's worker).
//! - The next access to the newly active side faults in zeroed memory.
//! - With [`TwoBackingOptions::preserve_content`] (what a pKVM or software-protected guest
//!   expects: the same contents in both states) the data is first copied across: only the
//!   pages the source holds (`mincore` of its mapping), with `pwrite` from the source mapping
//!   into the destination file (measured here as the fastest of `pwrite`,
//!   `copy_file_range` and `memcpy` between mappings). Stale data on the destination side
//!   is punched first, so the destination reads exactly as the source did.
//!
//! Invariant: the inactive side of every page is a hole, unless the host wrote to the shared
//! copy of a private page (possible in this model, which has no SIGBUS; not through the safe
//! accessors here, which refuse private pages like the in-place model).
//!
//! Locking: one `RwLock` over the attributes, exclusive for conversion and punch-hole, shared
//! for guest and host accesses.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::backing::{
    check_bounds, check_refused, AttributeRun, BackingKind, Footprint, GuestBacking, HostReachable,
};
use gmem::attributes::AttributeStore;
use gmem::error::{AccessError, ConversionError, Errno, KernelResult};
use gmem::file::{MemslotSource, PinGuard};
use gmem::os::{self as sys, Mmap, PAGE_SIZE};
use gmem::uapi::kvm_memory_attributes2;
use gmem::uapi::{FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, KVM_MEMORY_ATTRIBUTE_PRIVATE};

/// Options of the two-backing model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TwoBackingOptions {
    /// Copy the data across before discarding the old copy, so contents survive conversion
    /// (pKVM, software-protected VMs). Off: conversion is destructive (SNP, TDX at runtime).
    pub preserve_content: bool,
}

/// Why a two-backing guest could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwoBackingError {
    /// The size is zero, not a multiple of the page size, or too large.
    #[error(
        "guest size {size:#x} is invalid: it must be a non-zero multiple of the page size \
         ({PAGE_SIZE:#x}) below 2^63"
    )]
    Size {
        /// The size asked for.
        size: u64,
    },
    /// A system call failed.
    #[error("{what} failed: {errno}")]
    Sys {
        /// Which call.
        what: &'static str,
        /// Its errno.
        errno: Errno,
    },
}

/// A guest's memory in the two-backing model. See the module documentation.
pub struct TwoBacking {
    /// Stands for the flags-0 guest_memfd.
    private_fd: OwnedFd,
    /// The ordinary shared RAM.
    shared_fd: OwnedFd,
    /// The guest's access to private memory (KVM's, in a real VMM).
    private_view: Mmap,
    /// The VMM's mapping of the shared RAM: host accesses and the guest's shared accesses.
    shared_view: Mmap,
    size: u64,
    options: TwoBackingOptions,
    attrs: RwLock<AttributeStore>,
    /// The guest's composite view for a KVM memslot, made on first use: each page mapped
    /// from the side its attribute selects, re-mapped on conversion.
    guest_view: OnceLock<Result<Mmap, Errno>>,
}

impl fmt::Debug for TwoBacking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TwoBacking")
            .field("size", &self.size)
            .field("preserve_content", &self.options.preserve_content)
            .finish()
    }
}

/// Which pages of `[start, end)` (file offsets) the file mapped whole at `view` holds in its
/// page cache (`mincore`).
fn resident(view: &Mmap, start: u64, end: u64) -> KernelResult<Vec<bool>> {
    let (off, len) = (
        usize::try_from(start).map_err(|_| Errno::EINVAL)?,
        usize::try_from(end - start).map_err(|_| Errno::EINVAL)?,
    );
    if off.checked_add(len).is_none_or(|e| e > view.len()) {
        return Err(Errno::EINVAL);
    }
    let mut vec = vec![0u8; len.div_ceil(PAGE_SIZE as usize)];
    // SAFETY: the range lies inside `view` (checked) and `vec` has one byte per page of it;
    // mincore only writes `vec`.
    let r = unsafe { libc::mincore(view.as_ptr().add(off).cast(), len, vec.as_mut_ptr()) };
    if r != 0 {
        return Err(Errno::last());
    }
    Ok(vec.into_iter().map(|b| b & 1 == 1).collect())
}

/// Writes `[src, src + len)` (inside a live mapping) to `fd` at `offset`.
///
/// # Safety
/// `[src, src + len)` must lie inside a live mapping whose pages are readable.
unsafe fn pwrite_from(
    fd: BorrowedFd<'_>,
    src: *const u8,
    len: usize,
    offset: u64,
) -> KernelResult<()> {
    let mut done = 0usize;
    while done < len {
        let off = libc::off_t::try_from(offset + done as u64).map_err(|_| Errno::EINVAL)?;
        // SAFETY: the source is the unwritten tail of the caller's range.
        let n = unsafe { libc::pwrite(fd.as_raw_fd(), src.add(done).cast(), len - done, off) };
        match n {
            n if n > 0 => done += n.unsigned_abs(),
            _ if Errno::last() == Errno::EINTR => {}
            0 => return Err(Errno::EFAULT),
            _ => return Err(Errno::last()),
        }
    }
    Ok(())
}

fn pages(offset: u64, len: u64) -> (u64, u64) {
    (
        offset / PAGE_SIZE,
        offset.saturating_add(len).div_ceil(PAGE_SIZE),
    )
}

impl TwoBacking {
    /// A guest of `size` bytes whose pages start private (as CoCo VMMs set whole regions
    /// private after creating them) or shared.
    pub fn new(
        size: u64,
        private: bool,
        options: TwoBackingOptions,
    ) -> Result<Self, TwoBackingError> {
        if size == 0 || size % PAGE_SIZE != 0 || i64::try_from(size).is_err() {
            return Err(TwoBackingError::Size { size });
        }
        let len = usize::try_from(size).map_err(|_| TwoBackingError::Size { size })?;
        let sys = |what| move |errno| TwoBackingError::Sys { what, errno };
        let private_fd = sys::memfd_create(c"gmem-2b-private").map_err(sys("memfd_create"))?;
        let shared_fd = sys::memfd_create(c"gmem-2b-shared").map_err(sys("memfd_create"))?;
        sys::ftruncate(private_fd.as_fd(), size).map_err(sys("ftruncate"))?;
        sys::ftruncate(shared_fd.as_fd(), size).map_err(sys("ftruncate"))?;
        let flags = libc::MAP_SHARED | libc::MAP_NORESERVE;
        let private_view =
            Mmap::new(Some(private_fd.as_fd()), 0, len, flags).map_err(sys("mmap"))?;
        let shared_view = Mmap::new(Some(shared_fd.as_fd()), 0, len, flags).map_err(sys("mmap"))?;
        Ok(TwoBacking {
            private_fd,
            shared_fd,
            private_view,
            shared_view,
            size,
            options,
            attrs: RwLock::new(AttributeStore::new(size / PAGE_SIZE, private)),
            guest_view: OnceLock::new(),
        })
    }

    /// The options.
    pub fn options(&self) -> TwoBackingOptions {
        self.options
    }

    /// Bytes allocated in the private store and in the shared memfd.
    pub fn allocated(&self) -> KernelResult<(u64, u64)> {
        Ok((
            sys::allocated_bytes(self.private_fd.as_fd())?,
            sys::allocated_bytes(self.shared_fd.as_fd())?,
        ))
    }

    /// The attributes of `[offset, offset + len)` as runs `(offset, len, attributes)`, as
    /// [`gmem::GuestMemfd::attribute_runs`] gives them (EINVAL past the end).
    pub fn attribute_runs(&self, offset: u64, len: u64) -> KernelResult<Vec<(u64, u64, u64)>> {
        let end = offset.checked_add(len).ok_or(Errno::EINVAL)?;
        if end > self.size {
            return Err(Errno::EINVAL);
        }
        let (first, last) = pages(offset, len);
        Ok(self
            .read_attrs()
            .runs(first, last)
            .into_iter()
            .map(|(s, e, private)| {
                let (a, b) = ((s * PAGE_SIZE).max(offset), (e * PAGE_SIZE).min(end));
                (a, b - a, u64::from(private) * KVM_MEMORY_ATTRIBUTE_PRIVATE)
            })
            .collect())
    }

    /// Allocates the active side of every page of `[offset, offset + len)`
    /// (`fallocate(KEEP_SIZE)` on the private store for private runs, on the shared memfd
    /// for shared ones): what a VMM does when the guest's PMCT `fallocate` request comes.
    pub fn allocate(&self, offset: u64, len: u64) -> KernelResult<()> {
        if offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 {
            return Err(Errno::EINVAL);
        }
        let end = offset.checked_add(len).ok_or(Errno::EINVAL)?;
        if end > self.size {
            return Err(Errno::EINVAL);
        }
        let attrs = self.write_attrs();
        let (first, last) = pages(offset, len);
        for (s, e, private) in attrs.runs(first, last) {
            let fd = if private {
                self.private_fd.as_fd()
            } else {
                self.shared_fd.as_fd()
            };
            sys::fallocate(fd, FALLOC_FL_KEEP_SIZE, s * PAGE_SIZE, (e - s) * PAGE_SIZE)?;
        }
        Ok(())
    }

    /// Which pages of `[offset, offset + len)` the shared memfd holds: a private page's
    /// shared copy must have been discarded by its conversion.
    pub fn shared_resident(&self, offset: u64, len: u64) -> KernelResult<Vec<bool>> {
        let end = offset.checked_add(len).ok_or(Errno::EINVAL)?;
        resident(&self.shared_view, offset, end)
    }

    /// The guest's composite view, for binding a plain KVM memslot: one mapping of the
    /// whole guest in which each page maps the private store or the shared memfd, as its
    /// attribute selects, re-mapped (`MAP_FIXED`) by every later conversion of it. It stands
    /// for KVM's memslot, which takes private pages from the guest_memfd and shared ones from
    /// `userspace_addr`; the re-map is the stand-in for the stage-2 invalidation that makes the
    /// guest fault the page in from its new backing. Made on first use (it costs one VMA per
    /// run of equal attributes, so a guest fragmented past `vm.max_map_count` cannot have one).
    pub(crate) fn guest_view(&self) -> KernelResult<&Mmap> {
        if let Some(v) = self.guest_view.get() {
            return v.as_ref().map_err(|e| *e);
        }
        let attrs = self.write_attrs();
        let v = self.guest_view.get_or_init(|| {
            let len = usize::try_from(self.size).map_err(|_| Errno::ENOMEM)?;
            let view = Mmap::new(
                Some(self.shared_fd.as_fd()),
                0,
                len,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            )?;
            for (s, e, private) in attrs.runs(0, self.size / PAGE_SIZE) {
                if private {
                    Self::remap(&view, self.private_fd.as_fd(), s * PAGE_SIZE, e * PAGE_SIZE)?;
                }
            }
            Ok(view)
        });
        v.as_ref().map_err(|e| *e)
    }

    /// Maps `[start, end)` of `fd` over the same range of `view` (which maps the whole file).
    fn remap(view: &Mmap, fd: BorrowedFd<'_>, start: u64, end: u64) -> KernelResult<()> {
        let (off, len) = (
            usize::try_from(start).map_err(|_| Errno::EINVAL)?,
            usize::try_from(end - start).map_err(|_| Errno::EINVAL)?,
        );
        if off.checked_add(len).is_none_or(|e| e > view.len()) {
            return Err(Errno::EINVAL);
        }
        view.map_fixed(off, len, fd, start)
    }

    fn read_attrs(&self) -> RwLockReadGuard<'_, AttributeStore> {
        self.attrs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_attrs(&self) -> RwLockWriteGuard<'_, AttributeStore> {
        self.attrs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Converts `[offset, offset + len)`: EINVAL for an empty, unaligned or out-of-range
    /// request (docs/series.md §2.3). Runs already in the target state are left alone. A failure
    /// reports the start of the run that failed in `error_offset`; runs before it are
    /// converted.
    fn convert(&self, offset: u64, len: u64, to_private: bool) -> Result<(), ConversionError> {
        let einval = ConversionError {
            errno: Errno::EINVAL,
            error_offset: 0,
        };
        match offset.checked_add(len) {
            Some(end) if len != 0 && end <= self.size => {}
            _ => return Err(einval),
        }
        if offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(einval);
        }
        let (first, end) = pages(offset, len);
        let mut attrs = self.write_attrs();
        let changing: Vec<(u64, u64)> = attrs
            .runs(first, end)
            .into_iter()
            .filter(|r| r.2 != to_private)
            .map(|(s, e, _)| (s, e))
            .collect();
        for (s, e) in changing {
            let (start, stop) = (s * PAGE_SIZE, e * PAGE_SIZE);
            // The run's attributes are recorded after its content moved: their nodes first
            // (ENOMEM with this run unchanged, never an abort).
            attrs.try_reserve().map_err(|_| ConversionError {
                errno: Errno::ENOMEM,
                error_offset: start,
            })?;
            self.move_run(start, stop, to_private)
                .map_err(|errno| ConversionError {
                    errno,
                    error_offset: start,
                })?;
            attrs.set_range(s, e, to_private);
            if let Some(Ok(view)) = self.guest_view.get() {
                let dst = if to_private {
                    self.private_fd.as_fd()
                } else {
                    self.shared_fd.as_fd()
                };
                Self::remap(view, dst, start, stop).map_err(|errno| ConversionError {
                    errno,
                    error_offset: start,
                })?;
            }
        }
        Ok(())
    }

    /// Makes the other side of `[start, end)` the active one: copy (if preserving), then
    /// discard the old copy.
    fn move_run(&self, start: u64, end: u64, to_private: bool) -> KernelResult<()> {
        let (src_fd, src_view, dst_fd, dst_view) = if to_private {
            (
                self.shared_fd.as_fd(),
                &self.shared_view,
                self.private_fd.as_fd(),
                &self.private_view,
            )
        } else {
            (
                self.private_fd.as_fd(),
                &self.private_view,
                self.shared_fd.as_fd(),
                &self.shared_view,
            )
        };
        if self.options.preserve_content {
            Self::copy(src_view, dst_fd, dst_view, start, end)?;
        }
        sys::fallocate(
            src_fd,
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
            start,
            end - start,
        )
    }

    /// Copies the pages of `[start, end)` that the source file holds from the source file
    /// (read through its mapping) to the destination file; the destination's stale data
    /// there goes first. Which pages a file holds comes from `mincore()` on its mapping
    /// (page-cache residency, bounded to the range; `SEEK_HOLE` is not, and walks every
    /// folio up to the next hole, which made fragmented conversions quadratic).
    fn copy(
        src_view: &Mmap,
        dst_fd: BorrowedFd<'_>,
        dst_view: &Mmap,
        start: u64,
        end: u64,
    ) -> KernelResult<()> {
        let dst_resident = resident(dst_view, start, end)?;
        if dst_resident.iter().any(|&r| r) {
            sys::fallocate(
                dst_fd,
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                start,
                end - start,
            )?;
        }
        let src_resident = resident(src_view, start, end)?;
        let mut i = 0usize;
        while i < src_resident.len() {
            if !src_resident[i] {
                i += 1;
                continue;
            }
            let j = src_resident[i..]
                .iter()
                .position(|&r| !r)
                .map_or(src_resident.len(), |k| i + k);
            let from = start + i as u64 * PAGE_SIZE;
            let n = (j - i) * PAGE_SIZE as usize;
            let off = usize::try_from(from).map_err(|_| Errno::EINVAL)?;
            // SAFETY: `[from, from + n)` lies inside the file (`end <= size`), so inside the
            // source mapping, which covers the whole file; a memfd mapping inside the file
            // size never faults fatally.
            unsafe { pwrite_from(dst_fd, src_view.as_ptr().add(off), n, from)? };
            i = j;
        }
        Ok(())
    }

    /// Copies between guest memory and `buf`, each page through the side its attribute
    /// selects. `to_guest`: `buf` → memory.
    fn guest_copy(
        &self,
        offset: u64,
        buf: *mut u8,
        len: usize,
        to_guest: bool,
    ) -> KernelResult<()> {
        check_bounds(offset, len as u64, self.size).map_err(|_| Errno::EFAULT)?;
        if len == 0 {
            return Ok(());
        }
        let attrs = self.read_attrs();
        let end = offset + len as u64;
        let (first, last) = pages(offset, len as u64);
        for (s, e, private) in attrs.runs(first, last) {
            let a = (s * PAGE_SIZE).max(offset);
            let b = (e * PAGE_SIZE).min(end);
            let view = if private {
                &self.private_view
            } else {
                &self.shared_view
            };
            // Both are inside the file and the buffer, whose sizes fit in usize.
            #[allow(clippy::cast_possible_truncation)]
            let (mem_off, buf_off, n) = (a as usize, (a - offset) as usize, (b - a) as usize);
            // `[a, b)` lies inside the file, so inside `view`, which maps all of it (a memfd
            // mapping inside the file size never faults fatally).
            // SAFETY: `[buf_off, buf_off + n)` lies inside the caller's buffer of `len` bytes,
            // lent for the call.
            let user = unsafe { buf.add(buf_off) };
            if to_guest {
                // SAFETY: as above.
                view.write_volatile(mem_off, unsafe { std::slice::from_raw_parts(user, n) })?;
            } else {
                // SAFETY: as above.
                view.read_volatile(mem_off, unsafe { std::slice::from_raw_parts_mut(user, n) })?;
            }
        }
        Ok(())
    }

    /// Refuses a host access to a private page, holding the lock that keeps it shared.
    fn check_host(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<RwLockReadGuard<'_, AttributeStore>, AccessError> {
        check_bounds(offset, len, self.size)?;
        let attrs = self.read_attrs();
        if len > 0 {
            let (first, end) = pages(offset, len);
            if let Some(page) = attrs.first_with(first, end, true) {
                return Err(AccessError::Private {
                    offset: offset.max(page * PAGE_SIZE),
                });
            }
        }
        Ok(attrs)
    }

    fn host_copy(
        &self,
        offset: u64,
        buf: *mut u8,
        len: usize,
        to_mem: bool,
    ) -> Result<(), AccessError> {
        let _attrs = self.check_host(offset, len as u64)?;
        // In bounds (checked): fits in usize.
        #[allow(clippy::cast_possible_truncation)]
        let off = offset as usize;
        // `[offset, offset + len)` is inside the file, so inside the shared mapping.
        let copied = if to_mem {
            // SAFETY: `buf` is the caller's buffer of `len` bytes, lent for the call.
            self.shared_view
                .write_volatile(off, unsafe { std::slice::from_raw_parts(buf, len) })
        } else {
            // SAFETY: as above.
            self.shared_view
                .read_volatile(off, unsafe { std::slice::from_raw_parts_mut(buf, len) })
        };
        copied.map_err(|_| AccessError::OutOfBounds {
            offset,
            len: len as u64,
            size: self.size,
        })
    }
}

impl GuestBacking for TwoBacking {
    fn kind(&self) -> BackingKind {
        BackingKind::TwoBacking {
            preserve_content: self.options.preserve_content,
        }
    }

    fn guest_memfd(&self) -> Option<&dyn gmem::GuestMemfd> {
        None
    }

    fn memslot_source(&self) -> KernelResult<MemslotSource<'_>> {
        let view = self.guest_view()?;
        Ok(MemslotSource::GuestView {
            userspace_addr: view.as_ptr() as u64,
            len: self.size,
        })
    }

    fn set_attributes(&self, attrs: &mut kvm_memory_attributes2) -> KernelResult<()> {
        let to_private = attrs.attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0;
        self.convert(attrs.offset, attrs.size, to_private)
            .map_err(|e| {
                attrs.error_offset = e.error_offset;
                e.errno
            })
    }

    fn attribute_runs(&self, offset: u64, len: u64) -> KernelResult<Vec<AttributeRun>> {
        TwoBacking::attribute_runs(self, offset, len)
    }

    fn allocate(&self, offset: u64, len: u64) -> KernelResult<()> {
        TwoBacking::allocate(self, offset, len)
    }

    fn pin(&self, _offset: u64, _len: u64) -> KernelResult<PinGuard> {
        // Its VMMs discard whatever the pins: no pin blocks a conversion.
        Err(Errno::ENOTTY)
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn is_private(&self, offset: u64) -> bool {
        self.read_attrs().is_private(offset / PAGE_SIZE)
    }

    fn guest_write(&self, offset: u64, data: &[u8]) -> KernelResult<()> {
        // The source buffer is only read (`to_guest`).
        self.guest_copy(offset, data.as_ptr().cast_mut(), data.len(), true)
    }

    fn guest_read(&self, offset: u64, buf: &mut [u8]) -> KernelResult<()> {
        self.guest_copy(offset, buf.as_mut_ptr(), buf.len(), false)
    }

    fn guest_touch(&self, offset: u64, len: u64, value: u8) -> KernelResult<()> {
        check_bounds(offset, len, self.size).map_err(|_| Errno::EFAULT)?;
        let attrs = self.read_attrs();
        let end = offset + len;
        let (first, last) = pages(offset, len);
        for (s, e, private) in attrs.runs(first, last) {
            let view = if private {
                &self.private_view
            } else {
                &self.shared_view
            };
            let a = (s * PAGE_SIZE).max(offset);
            let b = (e * PAGE_SIZE).min(end);
            // `[a, b)` is inside the file, which `view` maps whole.
            view.touch_pages(a, b - a, value)?;
        }
        Ok(())
    }

    fn host_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        self.host_copy(offset, buf.as_mut_ptr(), buf.len(), false)
    }

    fn host_write(&self, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        // The source buffer is only read (`to_mem`).
        self.host_copy(offset, data.as_ptr().cast_mut(), data.len(), true)
    }

    fn host_touch(&self, offset: u64, len: u64, value: u8) -> Result<(), AccessError> {
        let _attrs = self.check_host(offset, len)?;
        // In bounds (checked), inside the shared mapping of the whole file.
        self.shared_view
            .touch_pages(offset, len, value)
            .map_err(|_| AccessError::OutOfBounds {
                offset,
                len,
                size: self.size,
            })?;
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> KernelResult<()> {
        if offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 {
            return Err(Errno::EINVAL);
        }
        let _attrs = self.write_attrs();
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(());
        }
        let mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
        sys::fallocate(self.private_fd.as_fd(), mode, offset, end - offset)?;
        sys::fallocate(self.shared_fd.as_fd(), mode, offset, end - offset)
    }

    fn check_host_revoked(&self, offset: u64) -> Result<(), HostReachable> {
        check_refused(self, offset)?;
        let page = offset - offset % PAGE_SIZE;
        match self.shared_resident(page, PAGE_SIZE) {
            Ok(r) if r.iter().all(|&x| !x) => Ok(()),
            Ok(_) => Err(HostReachable::SharedCopy),
            Err(e) => Err(HostReachable::Unchecked(e)),
        }
    }

    fn footprint(&self) -> KernelResult<Footprint> {
        let (p, s) = self.allocated()?;
        Ok(Footprint {
            file_bytes: p + s,
            metadata_bytes: self.read_attrs().metadata_bytes() as u64,
        })
    }
}

#[cfg(test)]
mod tests;
