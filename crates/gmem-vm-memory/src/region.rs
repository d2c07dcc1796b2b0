//! [`GmemRegion`]: one range of a gmem file as a vm-memory region, and the per-page state the
//! accessors and conversions share.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gmem::file::{GuestMemfd, MemslotSource};
use gmem::mapping::{HostMapping, MapKind};
use gmem::os::PAGE_SIZE;
use gmem::uapi::KVM_MEM_GUEST_MEMFD;
use kvm_bindings::kvm_userspace_memory_region2;
use vm_memory::bitmap::{Bitmap, BS};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    AtomicAccess, Bytes, GuestAddress, GuestMemoryError, GuestMemoryRegion, GuestRegionMmap,
    GuestUsize, MemoryRegionAddress, ReadVolatile, VolatileSlice, WriteVolatile,
};

use crate::error::{private_error, RegionError};

/// Per-page state of a region, shared by accessors (which take references) and conversions
/// (which set the private bit, then wait for references to drain).
///
/// The protocol is Dekker's, on sequentially consistent atomics: an access increments the
/// reference count of every page it covers, *then* reads their private bits; a conversion to
/// private sets the private bits, *then* reads the reference counts. Either the access sees
/// the bit (and refuses, dropping its references), or the conversion sees the reference (and
/// waits for it or fails with EAGAIN naming the page). A conversion to shared clears the bits
/// only after the file's pages are shared and every listener agreed.
pub(crate) struct PageState {
    /// One bit per page: set = private (or becoming private: accesses are refused).
    private: Box<[AtomicU64]>,
    /// References per page held by accessors, slices and [`crate::GmemAccess`] guards.
    refs: Box<[AtomicU32]>,
    /// Serialises conversions of this region.
    pub(crate) convert_lock: Mutex<()>,
}

impl PageState {
    fn new(pages: u64) -> Self {
        let words = pages.div_ceil(64) as usize;
        PageState {
            private: (0..words).map(|_| AtomicU64::new(0)).collect(),
            refs: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            convert_lock: Mutex::new(()),
        }
    }

    #[inline]
    pub(crate) fn is_private(&self, page: u64) -> bool {
        self.private[(page / 64) as usize].load(Ordering::SeqCst) & (1 << (page % 64)) != 0
    }

    /// The first private page of `[first, first + n)`.
    #[inline]
    pub(crate) fn first_private(&self, first: u64, n: u64) -> Option<u64> {
        if n == 1 {
            return self.is_private(first).then_some(first);
        }
        let mut p = first;
        let end = first + n;
        while p < end {
            let w = self.private[(p / 64) as usize].load(Ordering::SeqCst);
            let lo = p % 64;
            let hi = (end - (p - lo)).min(64);
            let mask = if hi == 64 { !0u64 } else { (1u64 << hi) - 1 } & !((1u64 << lo) - 1);
            let hit = w & mask;
            if hit != 0 {
                return Some(p - lo + u64::from(hit.trailing_zeros()));
            }
            p = p - lo + 64;
        }
        None
    }

    pub(crate) fn set_private(&self, first: u64, n: u64, private: bool) {
        for p in first..first + n {
            let bit = 1u64 << (p % 64);
            let w = &self.private[(p / 64) as usize];
            if private {
                w.fetch_or(bit, Ordering::SeqCst);
            } else {
                w.fetch_and(!bit, Ordering::SeqCst);
            }
        }
    }

    /// Runs `(first page, n)` of `[first, first + n)` whose bit differs from `private`.
    pub(crate) fn changing_runs(&self, first: u64, n: u64, private: bool) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for p in first..first + n {
            if self.is_private(p) != private {
                match out.last_mut() {
                    Some((s, l)) if *s + *l == p => *l += 1,
                    _ => out.push((p, 1)),
                }
            }
        }
        out
    }

    /// Takes a reference on `[first, first + n)`; `Err(page)` (nothing held) if a page is
    /// private.
    #[inline]
    pub(crate) fn acquire(&self, first: u64, n: u64) -> Result<(), u64> {
        if n == 1 {
            // One page (most device accesses): one increment, one bit.
            self.refs[first as usize].fetch_add(1, Ordering::SeqCst);
            if !self.is_private(first) {
                return Ok(());
            }
            self.refs[first as usize].fetch_sub(1, Ordering::Release);
            return Err(first);
        }
        for r in &self.refs[first as usize..(first + n) as usize] {
            r.fetch_add(1, Ordering::SeqCst);
        }
        match self.first_private(first, n) {
            None => Ok(()),
            Some(p) => {
                self.release(first, n);
                Err(p)
            }
        }
    }

    #[inline]
    pub(crate) fn release(&self, first: u64, n: u64) {
        if n == 1 {
            self.refs[first as usize].fetch_sub(1, Ordering::Release);
            return;
        }
        for r in &self.refs[first as usize..(first + n) as usize] {
            r.fetch_sub(1, Ordering::Release);
        }
    }

    /// The first page of `[first, first + n)` still referenced once `wait` has passed.
    pub(crate) fn wait_unreferenced(&self, first: u64, n: u64, wait: Duration) -> Option<u64> {
        let deadline = Instant::now() + wait;
        let mut spins = 0u32;
        loop {
            let busy =
                (first..first + n).find(|&p| self.refs[p as usize].load(Ordering::SeqCst) != 0);
            match busy {
                None => return None,
                Some(p) if Instant::now() >= deadline => return Some(p),
                Some(_) => {
                    spins += 1;
                    if spins < 64 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
            }
        }
    }

    /// References held now on page `page` (tests and diagnostics).
    pub(crate) fn refs_at(&self, page: u64) -> u32 {
        self.refs[page as usize].load(Ordering::SeqCst)
    }
}

/// One range of a gmem file as guest memory: the file, the offset of the region in it, the
/// VMM's host mapping of the range (private pages raise SIGBUS there), a vm-memory
/// [`GuestRegionMmap`] over that mapping carrying the dirty bitmap `B`, and the per-page
/// shared/private state every accessor checks.
///
/// The region's own vm-memory methods ([`GuestMemoryRegion::get_slice`], its
/// `Bytes<MemoryRegionAddress>`) refuse ranges with a private page with vm-memory's error
/// naming the address, but hold no reference: a conversion may revoke the pages while the
/// slice is in use. Device code should go through [`crate::GmemMemory`] or a
/// [`crate::GmemAccess`], which hold references. [`GuestMemoryRegion::get_host_address`]
/// gives the raw address, as for any vm-memory region: what is done with it is unchecked.
pub struct GmemRegion<B: Bitmap = ()> {
    /// The host address of the region's first byte (the mapping's; cached here so an access
    /// builds its slice without going through vm-memory's region and the mapping's `Arc`).
    host_addr: usize,
    start: GuestAddress,
    len: u64,
    mmap: GuestRegionMmap<B>,
    file: Arc<dyn GuestMemfd>,
    file_offset: u64,
    pub(crate) state: PageState,
    // Last: dropped after `mmap`, which only borrows the mapping (built on its pointer).
    host: HostMapping,
}

impl<B: Bitmap> fmt::Debug for GmemRegion<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GmemRegion")
            .field("gpa", &format_args!("{:#x}", self.mmap.start_addr().0))
            .field("len", &format_args!("{:#x}", self.host.len()))
            .field("file", &self.file.backend())
            .field("file_offset", &format_args!("{:#x}", self.file_offset))
            .finish()
    }
}

impl<B: Bitmap + vm_memory::bitmap::NewBitmap> GmemRegion<B> {
    /// `[file_offset, file_offset + len)` of `file` at guest physical `gpa`, with a new
    /// dirty bitmap of `len` bytes. The file must be mappable (`GUEST_MEMFD_FLAG_MMAP`), the
    /// range page-aligned and inside the file. The pages' attributes are read from the file
    /// once: from then on every conversion must go through [`crate::GmemMemory::convert`].
    pub fn new(
        file: Arc<dyn GuestMemfd>,
        file_offset: u64,
        len: u64,
        gpa: GuestAddress,
    ) -> Result<Self, RegionError> {
        let bad = |why: String| RegionError::Invalid {
            gpa: gpa.0,
            len,
            file_offset,
            why,
        };
        if len == 0
            || len % PAGE_SIZE != 0
            || file_offset % PAGE_SIZE != 0
            || gpa.0 % PAGE_SIZE != 0
        {
            return Err(bad("not page-aligned or empty".into()));
        }
        if file_offset.checked_add(len).is_none_or(|e| e > file.size()) {
            return Err(bad(format!(
                "past the end of the file (size {:#x})",
                file.size()
            )));
        }
        if gpa.0.checked_add(len).is_none() {
            return Err(bad("overflows the guest physical address space".into()));
        }
        if !file.mmappable() {
            return Err(bad(
                "the file was created without GUEST_MEMFD_FLAG_MMAP: the host has no access".into(),
            ));
        }
        let ulen = usize::try_from(len).map_err(|_| bad("too large for this host".into()))?;
        let host = file
            .mmap(file_offset, ulen, MapKind::Shared)
            .map_err(|errno| RegionError::Kernel { op: "mmap", errno })?;
        // SAFETY: `host` is a live MAP_SHARED mapping of exactly `ulen` bytes; the region
        // stores it and drops it after the `GuestRegionMmap` built here (field order), which
        // does not own the mapping (raw pointer: never unmapped by vm-memory).
        let builder = unsafe {
            MmapRegionBuilder::new_with_bitmap(ulen, B::with_len(ulen))
                .with_raw_mmap_pointer(host.as_ptr())
        };
        let mr = builder
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .map_err(|e| bad(format!("vm-memory refused the mapping: {e}")))?;
        let mmap = GuestRegionMmap::new(mr, gpa).ok_or_else(|| bad("overflows".into()))?;
        let state = PageState::new(len / PAGE_SIZE);
        let runs = file
            .attribute_runs(file_offset, len)
            .map_err(|errno| RegionError::Kernel {
                op: "attribute_runs",
                errno,
            })?;
        for (off, l, attrs) in runs {
            if attrs != 0 {
                state.set_private((off - file_offset) / PAGE_SIZE, l / PAGE_SIZE, true);
            }
        }
        Ok(GmemRegion {
            host_addr: host.as_ptr() as usize,
            start: gpa,
            len,
            mmap,
            file,
            file_offset,
            state,
            host,
        })
    }
}

impl<B: Bitmap> GmemRegion<B> {
    /// The gmem file.
    pub fn file(&self) -> &Arc<dyn GuestMemfd> {
        &self.file
    }

    /// Offset of the region's first byte in the file.
    pub fn file_offset(&self) -> u64 {
        self.file_offset
    }

    /// The VMM's host mapping of the region (private pages raise SIGBUS in it).
    pub fn host_mapping(&self) -> &HostMapping {
        &self.host
    }

    /// The vm-memory region over the host mapping, *unchecked*: for code that must see
    /// plain memory (it can SIGBUS on private pages).
    pub fn as_mmap_region(&self) -> &GuestRegionMmap<B> {
        &self.mmap
    }

    /// Whether the page containing region offset `offset` is private, as the accessors see it.
    pub fn is_private(&self, offset: u64) -> bool {
        self.state.is_private(offset / PAGE_SIZE)
    }

    /// References held now on the page containing region offset `offset` by accessors,
    /// slices and guards (diagnostics).
    pub fn references_at(&self, offset: u64) -> u32 {
        self.state.refs_at(offset / PAGE_SIZE)
    }

    /// What a VMM needs to bind this region as KVM memslot `slot`
    /// (`KVM_SET_USER_MEMORY_REGION2`):
    ///
    /// - kernel backend: `flags = KVM_MEM_GUEST_MEMFD`, the guest_memfd and this region's
    ///   offset in it, `userspace_addr` the file's own shared mapping at that offset (the
    ///   series' in-place layout);
    /// - emulated backend: `flags = 0` and `userspace_addr` in the emulated file's guest view
    ///   (in which private pages stay accessible to the guest), as an ordinary memslot.
    ///
    /// The addresses stay valid as long as the file lives.
    pub fn memslot(&self, slot: u32) -> Result<kvm_userspace_memory_region2, RegionError> {
        let source = self
            .file
            .memslot_source()
            .map_err(|errno| RegionError::Kernel {
                op: "memslot_source",
                errno,
            })?;
        let mut r = kvm_userspace_memory_region2 {
            slot,
            guest_phys_addr: self.mmap.start_addr().0,
            memory_size: self.host.len() as u64,
            ..Default::default()
        };
        match source {
            MemslotSource::GuestMemfd {
                fd, userspace_addr, ..
            } => {
                use std::os::fd::AsRawFd;
                r.flags = KVM_MEM_GUEST_MEMFD;
                r.userspace_addr = userspace_addr + self.file_offset;
                r.guest_memfd_offset = self.file_offset;
                r.guest_memfd = u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX);
            }
            MemslotSource::GuestView { userspace_addr, .. } => {
                r.userspace_addr = userspace_addr + self.file_offset;
            }
        }
        Ok(r)
    }

    /// The pages `(first, n)` of `[offset, offset + count)` (count > 0, in bounds).
    #[inline]
    pub(crate) fn pages_of(offset: u64, count: u64) -> (u64, u64) {
        let first = offset / PAGE_SIZE;
        let last = (offset + count - 1) / PAGE_SIZE;
        (first, last - first + 1)
    }

    /// The slice `[offset, offset + count)`, which the caller has checked is inside the
    /// region (`offset + count <= len`), with the dirty bitmap's slice at `offset`.
    #[inline]
    pub(crate) fn slice_in_bounds(
        &self,
        offset: u64,
        count: usize,
    ) -> VolatileSlice<'_, BS<'_, B>> {
        debug_assert!(offset
            .checked_add(count as u64)
            .is_some_and(|e| e <= self.len));
        // SAFETY: `[offset, offset + count)` is inside the region (the caller checked), so
        // inside `host`, a live MAP_SHARED mapping of `len` bytes that the region owns and
        // unmaps only when dropped, after every slice borrowing `self` is gone. Guest memory
        // is accessed only volatilely, as for any vm-memory region. The caller holds a
        // reference on the pages or checked them, as for `get_slice`.
        unsafe {
            VolatileSlice::with_bitmap(
                (self.host_addr as *mut u8).add(offset as usize),
                count,
                self.mmap.bitmap().slice_at(offset as usize),
                None,
            )
        }
    }

    /// A slice of `[offset, offset + count)` without a reference, refused if a page is
    /// private at the time of the call.
    fn checked_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> vm_memory::guest_memory::Result<VolatileSlice<'_, BS<'_, B>>> {
        if count > 0 && offset.0 < self.len() {
            let count_in = (count as u64).min(self.len() - offset.0);
            let (first, n) = Self::pages_of(offset.0, count_in);
            if let Some(p) = self.state.first_private(first, n) {
                let page_addr = (p * PAGE_SIZE).max(offset.0);
                return Err(private_error(self.start_addr().0 + page_addr, count));
            }
        }
        self.mmap.get_slice(offset, count)
    }
}

impl<B: Bitmap> GuestMemoryRegion for GmemRegion<B> {
    type B = B;

    #[inline]
    fn len(&self) -> GuestUsize {
        self.len
    }

    #[inline]
    fn start_addr(&self) -> GuestAddress {
        self.start
    }

    fn bitmap(&self) -> BS<'_, Self::B> {
        self.mmap.bitmap()
    }

    fn get_host_address(
        &self,
        addr: MemoryRegionAddress,
    ) -> vm_memory::guest_memory::Result<*mut u8> {
        self.mmap.get_host_address(addr)
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> vm_memory::guest_memory::Result<VolatileSlice<'_, BS<'_, B>>> {
        self.checked_slice(offset, count)
    }
}

type RResult<T> = Result<T, GuestMemoryError>;

/// Region-relative accesses: each is one checked slice, refused (vm-memory's error naming the
/// guest physical address) if a page is private; no reference is held (see [`GmemRegion`]).
impl<B: Bitmap> Bytes<MemoryRegionAddress> for GmemRegion<B> {
    type E = GuestMemoryError;

    fn write(&self, buf: &[u8], addr: MemoryRegionAddress) -> RResult<usize> {
        let n = self.clamp(addr, buf.len())?;
        Ok(self.checked_slice(addr, n)?.write(&buf[..n], 0)?)
    }

    fn read(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> RResult<usize> {
        let n = self.clamp(addr, buf.len())?;
        Ok(self.checked_slice(addr, n)?.read(&mut buf[..n], 0)?)
    }

    fn write_slice(&self, buf: &[u8], addr: MemoryRegionAddress) -> RResult<()> {
        Ok(self.checked_slice(addr, buf.len())?.write_slice(buf, 0)?)
    }

    fn read_slice(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> RResult<()> {
        Ok(self.checked_slice(addr, buf.len())?.read_slice(buf, 0)?)
    }

    fn read_volatile_from<F: ReadVolatile>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> RResult<usize> {
        let n = self.clamp(addr, count)?;
        Ok(self.checked_slice(addr, n)?.read_volatile_from(0, src, n)?)
    }

    fn read_exact_volatile_from<F: ReadVolatile>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> RResult<()> {
        Ok(self
            .checked_slice(addr, count)?
            .read_exact_volatile_from(0, src, count)?)
    }

    fn write_volatile_to<F: WriteVolatile>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> RResult<usize> {
        let n = self.clamp(addr, count)?;
        Ok(self.checked_slice(addr, n)?.write_volatile_to(0, dst, n)?)
    }

    fn write_all_volatile_to<F: WriteVolatile>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> RResult<()> {
        Ok(self
            .checked_slice(addr, count)?
            .write_all_volatile_to(0, dst, count)?)
    }

    fn store<T: AtomicAccess>(
        &self,
        val: T,
        addr: MemoryRegionAddress,
        order: Ordering,
    ) -> RResult<()> {
        Ok(self
            .checked_slice(addr, std::mem::size_of::<T>())?
            .store(val, 0, order)?)
    }

    fn load<T: AtomicAccess>(&self, addr: MemoryRegionAddress, order: Ordering) -> RResult<T> {
        Ok(self
            .checked_slice(addr, std::mem::size_of::<T>())?
            .load(0, order)?)
    }
}

impl<B: Bitmap> GmemRegion<B> {
    /// `count` clamped to the end of the region (vm-memory's partial-access rule).
    fn clamp(&self, addr: MemoryRegionAddress, count: usize) -> RResult<usize> {
        if addr.0 >= self.len() {
            return Err(GuestMemoryError::InvalidBackendAddress);
        }
        Ok(count.min((self.len() - addr.0) as usize))
    }
}
