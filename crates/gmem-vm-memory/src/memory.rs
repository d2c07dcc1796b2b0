//! [`GmemMemory`]: guest memory over gmem regions for device emulation, in vm-memory's
//! vocabulary ([`GuestMemory`], hence [`vm_memory::Bytes`]), with the one conversion entry
//! point; [`GmemAccess`]: a guard whose slices keep their pages referenced until it drops.

use std::cell::RefCell;
use std::fmt;
use std::iter::FusedIterator;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use gmem::error::{Errno, KernelResult};
use gmem::file::PinGuard;
use gmem::os::PAGE_SIZE;
use gmem::uapi::kvm_memory_attributes2;
use gmem_vmm::backing::AttributeRun;
use gmem_vmm::{convert_pieces, ConvertPiece, ConvertTarget};
use vm_memory::bitmap::{Bitmap, BS};
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    Address, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    GuestRegionCollection, MemoryRegionAddress, Permissions, VolatileSlice,
};

use crate::error::{private_error, ConvertError, RegionError};
use crate::listener::{ConversionEvent, ConversionListener, ListenerContext, ListenerError};
use crate::region::GmemRegion;

/// References held on behalf of one iterator or guard: `(region index, first page, pages)`.
///
/// The first range is inline (`pages == 0`: none) and the rest in a vector that stays empty
/// (no allocation) for an access inside one region, so the common case costs no loop and no
/// allocation to record or release.
#[derive(Default)]
pub(crate) struct Held {
    one: (usize, u64, u64),
    more: Vec<(usize, u64, u64)>,
}

impl Held {
    #[inline]
    fn push(&mut self, h: (usize, u64, u64)) {
        if self.one.2 == 0 {
            self.one = h;
        } else {
            self.push_more(h);
        }
    }

    #[cold]
    fn push_more(&mut self, h: (usize, u64, u64)) {
        self.more.push(h);
    }

    #[inline]
    fn release_all<B: Bitmap>(&mut self, mem: &GmemMemory<B>) {
        let (r, first, n) = std::mem::take(&mut self.one);
        if n != 0 {
            mem.arcs[r].state.release(first, n);
        }
        if !self.more.is_empty() {
            self.release_more(mem);
        }
    }

    #[cold]
    fn release_more<B: Bitmap>(&mut self, mem: &GmemMemory<B>) {
        for (r, first, n) in self.more.drain(..) {
            mem.arcs[r].state.release(first, n);
        }
    }

    fn move_into(&mut self, other: &mut Held) {
        let one = std::mem::take(&mut self.one);
        if one.2 != 0 {
            other.push(one);
        }
        for h in self.more.drain(..) {
            other.push(h);
        }
    }

    fn count(&self) -> usize {
        usize::from(self.one.2 != 0) + self.more.len()
    }
}

/// A VMM-owned long-term pin ([`GmemMemory::pin`]): a real gmem pin, dropped by the
/// conversion entry point when a conversion of its pages fails with EAGAIN.
struct VmmPin {
    gpa: u64,
    len: u64,
    _guard: PinGuard,
}

/// Guest memory over gmem regions, for device emulation.
///
/// - Accessors (`Bytes` through [`GuestMemory`]: `read`, `write`, `read_obj`, `write_obj`,
///   `read_slice`, ...; `get_slices`; `check_range`) refuse any range with a private page with
///   vm-memory's error naming the address ([`crate::private_address`]), never SIGBUS.
/// - Every access takes a reference on its pages before checking them (see
///   [`GmemAccess`] for how long it lasts); a conversion to private first makes accessors
///   refuse the pages, then waits for their references to drain (up to
///   [`GmemMemory::set_busy_wait`]) or fails with EAGAIN naming the page.
/// - Conversions go through [`GmemMemory::convert`] only (the per-page state is this object's).
///
/// How long a reference lasts:
/// - on `GmemMemory` itself: as long as the slice *iterator* returned by `get_slices` lives,
///   so every `Bytes` method (which copies while iterating) is covered; a `VolatileSlice`
///   kept after the iterator is dropped is *not* (a conversion may revoke it: SIGBUS). Use
///   [`GmemMemory::access`] for slices that outlive the call.
/// - on a [`GmemAccess`]: until the guard drops, and the borrow checker ties every slice to
///   the guard.
pub struct GmemMemory<B: Bitmap = ()> {
    regions: GuestRegionCollection<GmemRegion<B>>,
    /// The same regions in address order, by index (what references name).
    arcs: Vec<Arc<GmemRegion<B>>>,
    listeners: RwLock<Vec<Arc<dyn ConversionListener>>>,
    pins: Mutex<Vec<VmmPin>>,
    busy_wait: RwLock<Duration>,
}

impl<B: Bitmap> fmt::Debug for GmemMemory<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GmemMemory")
            .field("regions", &self.regions.iter().collect::<Vec<_>>())
            .finish()
    }
}

/// How long a conversion to private waits by default for in-flight accesses on its pages
/// before failing with EAGAIN.
pub const DEFAULT_BUSY_WAIT: Duration = Duration::from_millis(10);

impl<B: Bitmap> GmemMemory<B> {
    /// Guest memory over `regions` (they must not overlap).
    pub fn new(mut regions: Vec<GmemRegion<B>>) -> Result<Self, RegionError> {
        regions.sort_by_key(|r| r.start_addr());
        let arcs: Vec<Arc<GmemRegion<B>>> = regions.into_iter().map(Arc::new).collect();
        Ok(GmemMemory {
            regions: GuestRegionCollection::from_arc_regions(arcs.clone())?,
            arcs,
            listeners: RwLock::new(Vec::new()),
            pins: Mutex::new(Vec::new()),
            busy_wait: RwLock::new(DEFAULT_BUSY_WAIT),
        })
    }

    /// The regions as vm-memory's collection (a `GuestMemoryBackend`). Its own accessors check
    /// private pages but hold no reference; device code should use `self`.
    pub fn regions(&self) -> &GuestRegionCollection<GmemRegion<B>> {
        &self.regions
    }

    /// A guard for one unit of device work (a request, a descriptor chain): every range it
    /// checks or hands out as slices stays referenced until the guard drops.
    pub fn access(&self) -> GmemAccess<'_, B> {
        GmemAccess {
            mem: self,
            held: RefCell::new(Held::default()),
        }
    }

    /// Registers a conversion listener; it is told of every later conversion.
    pub fn add_listener(&self, l: Arc<dyn ConversionListener>) {
        self.listeners
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(l);
    }

    /// Removes every listener.
    pub fn clear_listeners(&self) {
        self.listeners
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// How long a conversion to private waits for in-flight accesses before EAGAIN
    /// (0: fail at once, the kernel's behaviour for a transient reference).
    pub fn set_busy_wait(&self, wait: Duration) {
        *self
            .busy_wait
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = wait;
    }

    /// Takes a VMM-owned long-term pin on `[gpa, gpa + len)` (a real gmem pin: the file's own
    /// conversion check sees it). [`GmemMemory::convert`] drops the VMM's pins on a range
    /// whose conversion fails with EAGAIN and retries once, as gmem-vmm does.
    pub fn pin(&self, gpa: u64, len: u64) -> KernelResult<()> {
        let mut out = Vec::new();
        for (r, off, g, l) in self.pieces(gpa, len) {
            out.push(VmmPin {
                gpa: g,
                len: l,
                _guard: r.file().pin(r.file_offset() + off, l)?,
            });
        }
        self.pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(out);
        Ok(())
    }

    /// VMM pins held.
    pub fn pins_held(&self) -> usize {
        self.pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    fn drop_pins(&self, gpa: u64, len: u64) -> bool {
        let mut pins = self
            .pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = pins.len();
        pins.retain(|p| !(p.gpa < gpa + len && gpa < p.gpa + p.len));
        pins.len() != n
    }

    /// The pieces `(region, region offset, gpa, len)` of `[gpa, gpa + len)` that regions back;
    /// holes (MMIO, unbacked) are skipped.
    pub(crate) fn pieces(&self, gpa: u64, len: u64) -> Vec<(&GmemRegion<B>, u64, u64, u64)> {
        let end = gpa.saturating_add(len);
        self.regions
            .iter()
            .filter_map(|r| {
                let rs = r.start_addr().0;
                let re = rs + r.len();
                let s = gpa.max(rs);
                let e = end.min(re);
                (s < e).then_some((r, s - rs, s, e - s))
            })
            .collect()
    }

    /// Whether the page at `gpa` is private (false where no region backs it).
    pub fn is_private(&self, gpa: u64) -> bool {
        self.regions
            .to_region_addr(GuestAddress(gpa))
            .is_some_and(|(r, a)| r.is_private(a.0))
    }

    /// The one conversion entry point, for `KVM_HC_MAP_GPA_RANGE` and `KVM_EXIT_MEMORY_FAULT`
    /// (decode them with [`gmem_vmm::ConvertRequest`]) or any VMM policy.
    ///
    /// - EINVAL unless `gpa` and `size` are page-aligned, `size > 0`, no overflow;
    /// - the range is split across the regions it covers; parts no region backs (MMIO
    ///   holes) are skipped, as QEMU's `kvm_convert_memory` skips non-RAM sections; EINVAL if
    ///   no region backs any of it;
    /// - per region, runs of pages that change state: to private, accessors start refusing,
    ///   listeners are told, in-flight accesses are waited for (then EAGAIN at the page),
    ///   the file converts (`KVM_SET_MEMORY_ATTRIBUTES2`); to shared, the file converts,
    ///   listeners are told, accessors may use the pages;
    /// - a piece failing with EAGAIN is retried once after dropping the VMM's own pins on it
    ///   ([`GmemMemory::pin`]); a piece still failing puts back the pieces already converted
    ///   (listeners told) and returns the error. The split/retry/rollback loop is gmem-vmm's
    ///   ([`gmem_vmm::convert_pieces`]), shared with `Vm::convert`.
    pub fn convert(&self, gpa: u64, size: u64, to_private: bool) -> Result<(), ConvertError> {
        let invalid = |why| ConvertError::Invalid { gpa, size, why };
        if gpa % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 {
            return Err(invalid("not page-aligned"));
        }
        if size == 0 {
            return Err(invalid("empty"));
        }
        if gpa.checked_add(size).is_none() {
            return Err(invalid("overflows"));
        }
        let failure: RefCell<Option<ConvertError>> = RefCell::new(None);
        let busy_wait = *self
            .busy_wait
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let listeners = self
            .listeners
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let pieces: Vec<ConvertPiece<RegionTarget<'_, B>>> = self
            .regions
            .iter()
            .enumerate()
            .filter_map(|(index, r)| {
                let rs = r.start_addr().0;
                let s = gpa.max(rs);
                let e = (gpa + size).min(rs + r.len());
                (s < e).then(|| ConvertPiece {
                    target: RegionTarget {
                        region: r,
                        index,
                        listeners: &listeners,
                        busy_wait,
                        failure: &failure,
                    },
                    offset: r.file_offset() + (s - rs),
                    gpa: gmem_vmm::Gpa(s),
                    len: e - s,
                })
            })
            .collect();
        if pieces.is_empty() {
            return Err(invalid("no guest memory region backs any of it"));
        }
        convert_pieces(&pieces, to_private, &mut |g, l| self.drop_pins(g.raw(), l)).map_err(|f| {
            // The first failure recorded is the one that stopped the conversion (rollbacks
            // record nothing).
            failure.borrow_mut().take().unwrap_or(match f.errno {
                Errno::EAGAIN => ConvertError::Busy {
                    error_gpa: f.error_gpa.map_or(gpa, gmem_vmm::Gpa::raw),
                },
                errno => ConvertError::Kernel {
                    errno,
                    error_gpa: f.error_gpa.map(gmem_vmm::Gpa::raw),
                },
            })
        })
    }

    /// The region containing `addr`, by index, and the offset in it.
    #[inline]
    fn find(&self, addr: GuestAddress) -> Option<(usize, &GmemRegion<B>, MemoryRegionAddress)> {
        let i = match self.arcs.binary_search_by_key(&addr, |r| r.start_addr()) {
            Ok(i) => i,
            Err(0) => return None,
            Err(i) => i - 1,
        };
        let r = &self.arcs[i];
        let off = addr.0 - r.start_addr().0;
        (off < r.len()).then_some((i, r.as_ref(), MemoryRegionAddress(off)))
    }

    /// Takes references on `[addr, addr + count)` for a slice iterator step: the piece in
    /// the first region, or the error.
    #[inline]
    fn take_piece(
        &self,
        addr: GuestAddress,
        count: usize,
        held: &mut Held,
    ) -> Result<VolatileSlice<'_, BS<'_, B>>, GuestMemoryError> {
        let (idx, r, raddr) = self
            .find(addr)
            .ok_or(GuestMemoryError::InvalidGuestAddress(addr))?;
        let n = count.min((r.len() - raddr.0) as usize);
        let (first, pages) = GmemRegion::<B>::pages_of(raddr.0, n as u64);
        if let Err(p) = r.state.acquire(first, pages) {
            let at = (p * PAGE_SIZE).max(raddr.0);
            return Err(private_error(r.start_addr().0 + at, count));
        }
        held.push((idx, first, pages));
        Ok(r.slice_in_bounds(raddr.0, n))
    }

    fn check_and_hold(&self, addr: GuestAddress, count: usize, held: &mut Held) -> bool {
        let mut at = addr;
        let mut left = count;
        let mut mine = Held::default();
        while left > 0 {
            match self.take_piece(at, left, &mut mine) {
                Ok(s) => {
                    left -= s.len();
                    match at.checked_add(s.len() as u64) {
                        Some(a) => at = a,
                        None if left == 0 => {}
                        None => {
                            mine.release_all(self);
                            return false;
                        }
                    }
                }
                Err(_) => {
                    mine.release_all(self);
                    return false;
                }
            }
        }
        mine.move_into(held);
        true
    }
}

/// One region's part of a conversion, for gmem-vmm's [`convert_pieces`].
struct RegionTarget<'a, B: Bitmap> {
    region: &'a GmemRegion<B>,
    index: usize,
    listeners: &'a [Arc<dyn ConversionListener>],
    busy_wait: Duration,
    failure: &'a RefCell<Option<ConvertError>>,
}

impl<B: Bitmap> RegionTarget<'_, B> {
    fn event(&self, first: u64, n: u64, to_private: bool) -> ConversionEvent {
        let off = first * PAGE_SIZE;
        ConversionEvent {
            gpa: self.region.start_addr().0 + off,
            len: n * PAGE_SIZE,
            to_private,
            region: self.index,
            file_offset: self.region.file_offset() + off,
        }
    }

    /// Tells every listener of every run; on a refusal, tells those already told the
    /// opposite (reverse order) and records the refusal.
    fn notify(&self, runs: &[(u64, u64)], to_private: bool) -> Result<(), ()> {
        let cx = ListenerContext {
            file: self.region.file(),
        };
        let mut told: Vec<(usize, ConversionEvent)> = Vec::new();
        for (i, l) in self.listeners.iter().enumerate() {
            for &(first, n) in runs {
                let ev = self.event(first, n, to_private);
                let r = if to_private {
                    l.to_private(&ev, cx)
                } else {
                    l.to_shared(&ev, cx)
                };
                if let Err(ListenerError(why)) = r {
                    self.undo(&told, cx);
                    self.record(ConvertError::Listener {
                        listener: l.name().to_string(),
                        gpa: ev.gpa,
                        len: ev.len,
                        why,
                    });
                    return Err(());
                }
                told.push((i, ev));
            }
        }
        Ok(())
    }

    fn undo(&self, told: &[(usize, ConversionEvent)], cx: ListenerContext<'_>) {
        for (i, ev) in told.iter().rev() {
            let back = ConversionEvent {
                to_private: !ev.to_private,
                ..*ev
            };
            let l = &self.listeners[*i];
            let _ = if back.to_private {
                l.to_private(&back, cx)
            } else {
                l.to_shared(&back, cx)
            };
        }
    }

    fn undo_all(&self, runs: &[(u64, u64)], to_private_was: bool) {
        let told: Vec<(usize, ConversionEvent)> = (0..self.listeners.len())
            .flat_map(|i| runs.iter().map(move |&(f, n)| (i, (f, n))))
            .map(|(i, (f, n))| (i, self.event(f, n, to_private_was)))
            .collect();
        self.undo(
            &told,
            ListenerContext {
                file: self.region.file(),
            },
        );
    }

    fn record(&self, e: ConvertError) {
        let mut f = self.failure.borrow_mut();
        if f.is_none() {
            *f = Some(e);
        }
    }
}

impl<B: Bitmap> ConvertTarget for RegionTarget<'_, B> {
    fn set_attributes(&self, attrs: &mut kvm_memory_attributes2) -> KernelResult<()> {
        let region = self.region;
        let _g = region
            .state
            .convert_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let to_private = attrs.attributes != 0;
        let first = (attrs.offset - region.file_offset()) / PAGE_SIZE;
        let n = attrs.size / PAGE_SIZE;
        let runs = region.state.changing_runs(first, n, to_private);
        let file = region.file();
        if to_private {
            // 1. Accessors refuse from now on.
            for &(f, c) in &runs {
                region.state.set_private(f, c, true);
            }
            let undo_bits = || {
                for &(f, c) in &runs {
                    region.state.set_private(f, c, false);
                }
            };
            // 2. Listeners, before revocation.
            if self.notify(&runs, true).is_err() {
                undo_bits();
                return Err(Errno(libc::EIO));
            }
            // 3. In-flight accesses: wait for them, or EAGAIN at the first still held.
            for &(f, c) in &runs {
                if let Some(p) = region.state.wait_unreferenced(f, c, self.busy_wait) {
                    self.undo_all(&runs, true);
                    undo_bits();
                    attrs.error_offset = region.file_offset() + p * PAGE_SIZE;
                    return Err(Errno::EAGAIN);
                }
            }
            // 4. The file revokes (its own pins give EAGAIN + error_offset).
            if let Err(e) = file.set_attributes(attrs) {
                self.undo_all(&runs, true);
                undo_bits();
                return Err(e);
            }
            Ok(())
        } else {
            // 1. The file makes the pages usable.
            file.set_attributes(attrs)?;
            // 2. Listeners, after.
            if self.notify(&runs, false).is_err() {
                for &(f, c) in &runs {
                    let mut back = kvm_memory_attributes2::new(
                        region.file_offset() + f * PAGE_SIZE,
                        c * PAGE_SIZE,
                        gmem::uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE,
                    );
                    // Best effort: nobody else can reference these pages (accessors still
                    // refuse them), only a new gmem pin taken meanwhile could refuse.
                    let _ = file.set_attributes(&mut back);
                }
                return Err(Errno(libc::EIO));
            }
            // 3. Accessors may use them.
            for &(f, c) in &runs {
                region.state.set_private(f, c, false);
            }
            Ok(())
        }
    }

    fn attribute_runs(&self, offset: u64, len: u64) -> KernelResult<Vec<AttributeRun>> {
        let first = (offset - self.region.file_offset()) / PAGE_SIZE;
        let n = len / PAGE_SIZE;
        let mut out: Vec<AttributeRun> = Vec::new();
        for p in first..first + n {
            let a = if self.region.state.is_private(p) {
                gmem::uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE
            } else {
                0
            };
            let off = self.region.file_offset() + p * PAGE_SIZE;
            match out.last_mut() {
                Some((s, l, aa)) if *aa == a && *s + *l == off => *l += PAGE_SIZE,
                _ => out.push((off, PAGE_SIZE, a)),
            }
        }
        Ok(out)
    }
}

/// Slices of a [`GmemMemory`] range, each with references on its pages.
///
/// The references are released when the iterator drops (on [`GmemMemory`]) or moved into the
/// guard that made it (on [`GmemAccess`]).
pub struct GmemSliceIter<'a, B: Bitmap> {
    mem: &'a GmemMemory<B>,
    addr: GuestAddress,
    count: usize,
    held: Held,
    sink: Option<&'a RefCell<Held>>,
}

impl<B: Bitmap> fmt::Debug for GmemSliceIter<'_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GmemSliceIter")
            .field("addr", &self.addr)
            .field("count", &self.count)
            .field("held", &self.held.count())
            .finish()
    }
}

impl<'a, B: Bitmap> Iterator for GmemSliceIter<'a, B> {
    type Item = Result<VolatileSlice<'a, BS<'a, B>>, GuestMemoryError>;

    // Always inlined: vm-memory's `Bytes` calls it twice per access (peek, then fold); as a
    // call it costs ~30 instructions per access (callgrind).
    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.count == 0 {
            return None;
        }
        match self.mem.take_piece(self.addr, self.count, &mut self.held) {
            Ok(s) => {
                self.count -= s.len();
                match self.addr.checked_add(s.len() as u64) {
                    Some(a) => self.addr = a,
                    None => {
                        if self.count != 0 {
                            self.count = 0;
                            return Some(Err(GuestMemoryError::GuestAddressOverflow));
                        }
                    }
                }
                Some(Ok(s))
            }
            Err(e) => {
                self.count = 0;
                Some(Err(e))
            }
        }
    }
}

impl<B: Bitmap> FusedIterator for GmemSliceIter<'_, B> {}

impl<'a, B: Bitmap> GuestMemorySliceIterator<'a, BS<'a, B>> for GmemSliceIter<'a, B> {
    /// vm-memory's default wraps the iterator in `Peekable` and `filter_map`; every `Bytes`
    /// method goes through here, and that wrapper around this iterator was most of what the
    /// checks added to a 4 KiB copy (callgrind). Same behaviour: the first piece's error is
    /// returned, a later error ends the iteration (after which this iterator yields nothing).
    #[inline]
    fn stop_on_error(
        mut self,
    ) -> vm_memory::guest_memory::Result<impl Iterator<Item = VolatileSlice<'a, BS<'a, B>>>> {
        match self.next() {
            Some(Err(e)) => Err(e),
            first => Ok(StopOnError {
                first: first.and_then(Result::ok),
                rest: self,
            }),
        }
    }
}

/// [`GmemSliceIter::stop_on_error`]'s iterator: the first slice, then the rest until an error.
/// Owns the slice iterator, so the references live as long as it does.
struct StopOnError<'a, B: Bitmap> {
    first: Option<VolatileSlice<'a, BS<'a, B>>>,
    rest: GmemSliceIter<'a, B>,
}

impl<'a, B: Bitmap> Iterator for StopOnError<'a, B> {
    type Item = VolatileSlice<'a, BS<'a, B>>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if let Some(s) = self.first.take() {
            return Some(s);
        }
        self.rest.next()?.ok()
    }
}

impl<B: Bitmap> Drop for GmemSliceIter<'_, B> {
    #[inline]
    fn drop(&mut self) {
        match self.sink {
            Some(sink) => self.held.move_into(&mut sink.borrow_mut()),
            None => self.held.release_all(self.mem),
        }
    }
}

impl<B: Bitmap> GuestMemory for GmemMemory<B> {
    type PhysicalMemory = GuestRegionCollection<GmemRegion<B>>;
    type Bitmap = B;

    /// Whether every byte is backed by a region and every page shared, now (a point-in-time
    /// answer; a [`GmemAccess`] also holds the range).
    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        if access == Permissions::No {
            return true;
        }
        let mut h = Held::default();
        let ok = self.check_and_hold(addr, count, &mut h);
        h.release_all(self);
        ok
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        _access: Permissions,
    ) -> vm_memory::guest_memory::Result<impl GuestMemorySliceIterator<'a, BS<'a, B>>> {
        Ok(GmemSliceIter {
            mem: self,
            addr,
            count,
            held: Held::default(),
            sink: None,
        })
    }

    /// `None`: the physical memory would bypass the private-page checks.
    fn physical_memory(&self) -> Option<&Self::PhysicalMemory> {
        None
    }
}

/// A guard over a [`GmemMemory`] for one unit of device work: every range it checks
/// (`check_range` true) or hands out (`get_slices`, and through them every `Bytes` method,
/// virtio-queue's descriptor chains, `Reader`/`Writer`) stays referenced until the guard
/// drops. Slices borrow the guard, so none can outlive it. A conversion to private of a page
/// the guard holds waits (up to [`GmemMemory::set_busy_wait`]) and then fails with EAGAIN
/// naming the page: keep guards short (one request), as a kernel GUP pin would be.
pub struct GmemAccess<'m, B: Bitmap = ()> {
    mem: &'m GmemMemory<B>,
    held: RefCell<Held>,
}

impl<B: Bitmap> fmt::Debug for GmemAccess<'_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GmemAccess")
            .field("held", &self.held.borrow().count())
            .finish()
    }
}

impl<'m, B: Bitmap> GmemAccess<'m, B> {
    /// The memory.
    pub fn memory(&self) -> &'m GmemMemory<B> {
        self.mem
    }

    /// Ranges referenced so far.
    pub fn held_ranges(&self) -> usize {
        self.held.borrow().count()
    }
}

impl<B: Bitmap> Drop for GmemAccess<'_, B> {
    fn drop(&mut self) {
        self.held.get_mut().release_all(self.mem);
    }
}

impl<'m, B: Bitmap> GuestMemory for GmemAccess<'m, B> {
    type PhysicalMemory = GuestRegionCollection<GmemRegion<B>>;
    type Bitmap = B;

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        if access == Permissions::No {
            return true;
        }
        let mut h = Held::default();
        let ok = self.mem.check_and_hold(addr, count, &mut h);
        h.move_into(&mut self.held.borrow_mut());
        ok
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        _access: Permissions,
    ) -> vm_memory::guest_memory::Result<impl GuestMemorySliceIterator<'a, BS<'a, B>>> {
        Ok(GmemSliceIter {
            mem: self.mem,
            addr,
            count,
            held: Held::default(),
            sink: Some(&self.held),
        })
    }

    fn physical_memory(&self) -> Option<&Self::PhysicalMemory> {
        None
    }
}
