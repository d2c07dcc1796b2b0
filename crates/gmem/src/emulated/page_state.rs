//! Per-page state (up to date, removed from the direct map) and the direct map: the guest
//! fault (`kvm_gmem_get_pfn`), the host hand-out, zero-once, the platform hooks of
//! conversion and release.

use std::collections::TryReserveError;
use std::os::fd::AsFd;

use super::chunk_map::ChunkMap;
use super::{EmulatedGuestMemfd, Inner, State, GUEST_VIEW_FLAGS};
use crate::attributes::{pages_of, AttributeStore};
use crate::error::{AccessError, Errno, KernelResult};
use crate::mapping::ViewRef;
use crate::platform::{HookCall, HookSite, PageRef, PAGE};
use crate::sys::{self, PAGE_SIZE};
use crate::uapi::{GUEST_MEMFD_FLAG_NO_DIRECT_MAP, KVM_MEMORY_ATTRIBUTE_PRIVATE};

/// What a set could not record: an allocation failed (the set says what each method then
/// holds). Std's collections abort the process there instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NoMemory;

impl From<TryReserveError> for NoMemory {
    fn from(_: TryReserveError) -> Self {
        NoMemory
    }
}

impl From<NoMemory> for crate::error::Errno {
    fn from(_: NoMemory) -> Self {
        crate::error::Errno::ENOMEM
    }
}

/// The infallible insert of a set, for paths that are not a conversion's (a guard fault, a
/// fork event): an allocation failure ends the process, as it does in std's collections.
fn or_abort<T>(r: Result<T, NoMemory>) -> T {
    match r {
        Ok(v) => v,
        Err(NoMemory) => std::alloc::handle_alloc_error(std::alloc::Layout::new::<[u64; 128]>()),
    }
}

/// A set of the pages of one file, on the attribute store's radix tree (a page is a member
/// where the store says "private"): O(log pages) for any operation, a uniform stretch of any
/// length is one slot (a sparse 1 TiB file, or one mapped whole, costs nothing), and every
/// change takes its nodes from a reserve topped up fallibly first, so a change that cannot be
/// made leaves the set as it was.
#[derive(Debug)]
pub(super) struct PageSet {
    pages: AttributeStore,
}

impl PageSet {
    /// An empty set for a file of `npages` pages (pages past it are never members).
    pub(super) fn new(npages: u64) -> PageSet {
        PageSet {
            pages: AttributeStore::new(npages, false),
        }
    }

    pub(super) fn contains(&self, page: u64) -> bool {
        self.pages.is_private(page)
    }

    /// Adds `page`; on failure the set is unchanged.
    pub(super) fn try_insert(&mut self, page: u64) -> Result<(), NoMemory> {
        self.try_insert_range(page, page + 1)
    }

    /// Adds `page` (a failed allocation ends the process: not for a conversion's path).
    pub(super) fn insert(&mut self, page: u64) {
        or_abort(self.try_insert(page));
    }

    /// Adds every page of `[first, end)`; on failure the set is unchanged.
    pub(super) fn try_insert_range(&mut self, first: u64, end: u64) -> Result<(), NoMemory> {
        self.pages.try_reserve()?;
        self.pages.set_range(first, end, true);
        Ok(())
    }

    /// [`PageSet::try_insert_range`], where a failed allocation ends the process.
    pub(super) fn insert_range(&mut self, first: u64, end: u64) {
        or_abort(self.try_insert_range(first, end));
    }

    /// Removes every page of `[first, end)`; on failure (a uniform stretch cannot be split)
    /// the set is unchanged.
    pub(super) fn try_remove_range(&mut self, first: u64, end: u64) -> Result<(), NoMemory> {
        self.pages.try_reserve()?;
        self.pages.set_range(first, end, false);
        Ok(())
    }

    /// Removes `page`; on failure the set is unchanged. Right after `page` was added, this
    /// allocates nothing (the node holding it is there).
    pub(super) fn try_remove(&mut self, page: u64) -> Result<(), NoMemory> {
        self.try_remove_range(page, page + 1)
    }

    /// The first maximal run `[a, b)` of members inside `[first, end)`, cut to it (no
    /// allocation): walk the set with `from = b`.
    pub(super) fn first_in(&self, first: u64, end: u64) -> Option<(u64, u64)> {
        let end = end.min(self.pages.npages());
        let a = self.pages.first_with(first, end, true)?;
        let b = self.pages.first_with(a, end, false).unwrap_or(end);
        Some((a, b.min(end)))
    }

    /// The maximal runs of members inside `[first, end)`, in order (no allocation).
    pub(super) fn runs_in(&self, first: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        std::iter::successors(self.first_in(first, end), move |&(_, b)| {
            self.first_in(b, end)
        })
    }
}

/// A set of page indices kept as maximal runs `[start, end)` (by start): for sets that are
/// mostly long runs (the pages a host mapping has mapped), where every operation costs
/// O(log runs) and a 1 GiB run is one entry. Every allocation is fallible ([`ChunkMap`]);
/// each change allocates at most one entry, first, so a failed change leaves the set as it
/// was.
#[derive(Debug, Default)]
pub(super) struct RunSet {
    runs: ChunkMap<u64, u64>,
}

impl RunSet {
    /// The run holding `page`, if any.
    fn run_of(&self, page: u64) -> Option<(u64, u64)> {
        let (a, b) = self.runs.at_or_below(&page)?;
        (page < b).then_some((a, b))
    }

    pub(super) fn contains(&self, page: u64) -> bool {
        self.run_of(page).is_some()
    }

    /// Adds `page`; on failure the set is unchanged.
    pub(super) fn try_insert(&mut self, page: u64) -> Result<(), NoMemory> {
        self.try_insert_range(page, page + 1)
    }

    /// Adds `[first, end)`, merged with the runs it touches; on failure the set is
    /// unchanged. Allocates only the entry it adds (none where it extends a run that starts
    /// at or before `first`).
    pub(super) fn try_insert_range(
        &mut self,
        mut first: u64,
        mut end: u64,
    ) -> Result<(), NoMemory> {
        if first >= end {
            return Ok(());
        }
        if let Some((a, b)) = self.runs.at_or_below(&first) {
            if b >= first {
                first = a;
                end = end.max(b);
            }
        }
        // The runs starting inside (first, end] are swallowed: the last may reach further.
        if let Some((a, b)) = self.runs.at_or_below(&end) {
            if a > first {
                end = end.max(b);
            }
        }
        // The one allocation first, then removals only.
        match self.runs.get_mut(&first) {
            Some(e) => *e = end,
            None => {
                self.runs.try_insert(first, end)?;
            }
        }
        while let Some((a, _)) = self.runs.at_or_above(&(first + 1)) {
            if a > end {
                break;
            }
            self.runs.remove(&a);
        }
        Ok(())
    }

    /// [`RunSet::try_insert_range`], where a failed allocation ends the process (not for a
    /// conversion's path).
    pub(super) fn insert_range(&mut self, first: u64, end: u64) {
        or_abort(self.try_insert_range(first, end));
    }

    /// The first run inside `[first, end)`, cut to it (no allocation).
    pub(super) fn first_in(&self, first: u64, end: u64) -> Option<(u64, u64)> {
        if first >= end {
            return None;
        }
        if let Some((a, b)) = self.run_of(first) {
            return Some((a.max(first), b.min(end)));
        }
        let (a, b) = self.runs.at_or_above(&(first + 1))?;
        (a < end).then_some((a, b.min(end)))
    }

    /// The runs inside `[first, end)`, cut to it, in order (no allocation).
    pub(super) fn runs_in(&self, first: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        std::iter::successors(self.first_in(first, end), move |&(_, b)| {
            self.first_in(b, end)
        })
    }

    /// Removes the members of `[first, end)` and adds them to `to`, which is a hint (what it
    /// cannot take is left out of it). On failure (a run reaching past `end` cannot be cut
    /// there) the set is unchanged and `to` has nothing new.
    pub(super) fn try_move_range(
        &mut self,
        first: u64,
        end: u64,
        mut to: Option<&mut RunSet>,
    ) -> Result<(), NoMemory> {
        if first >= end {
            return Ok(());
        }
        // The one allocation, first: a run from before `end` to past it keeps its part past
        // `end` as a run of its own.
        if let Some((a, b)) = self.runs.at_or_below(&(end - 1)) {
            if b > end {
                self.runs.try_insert(end, b)?;
                if let Some(e) = self.runs.get_mut(&a) {
                    *e = end;
                }
            }
        }
        // A run reaching into the range from the left: cut at `first`.
        if let Some((a, b)) = self.run_of(first) {
            if a < first {
                if let Some(e) = self.runs.get_mut(&a) {
                    *e = first;
                }
                if let Some(t) = to.as_deref_mut() {
                    let _ = t.try_insert_range(first, b.min(end));
                }
            }
        }
        // Every run starting inside the range (each ends by `end` now): taken out.
        while let Some((a, b)) = self.runs.at_or_above(&first) {
            if a >= end {
                break;
            }
            self.runs.remove(&a);
            if let Some(t) = to.as_deref_mut() {
                let _ = t.try_insert_range(a, b);
            }
        }
        Ok(())
    }

    /// How many pages just below `page` are members, at most `cap`.
    pub(super) fn run_below(&self, page: u64, cap: u64) -> u64 {
        match page.checked_sub(1).and_then(|p| self.run_of(p)) {
            Some((a, _)) => (page - a).min(cap),
            None => 0,
        }
    }
}

#[derive(Debug)]
pub(super) struct PageBits {
    /// Zeroed once (or known to hold zero-filled or host-written data); cleared by punch-hole.
    pub(super) uptodate: PageSet,
    /// Removed from the direct map (NO_DIRECT_MAP); set only after the removal succeeded.
    pub(super) removed: PageSet,
}

impl PageBits {
    /// No page up to date or removed, in a file of `npages` pages.
    pub(super) fn new(npages: u64) -> PageBits {
        PageBits {
            uptodate: PageSet::new(npages),
            removed: PageSet::new(npages),
        }
    }
}

impl EmulatedGuestMemfd {
    pub fn direct_map_removed(&self, index: u64) -> bool {
        let _fork = super::fork::shared();
        self.inner.bits().removed.contains(index)
    }

    /// Whether page `index` is up to date (zeroed once since it was last freed).
    pub fn page_uptodate(&self, index: u64) -> bool {
        let _fork = super::fork::shared();
        self.inner.bits().uptodate.contains(index)
    }

    /// A guest fault (`kvm_gmem_get_pfn`) on every page of `[offset, offset + len)`, as a vCPU
    /// touching them would cause: the VMM calls it for pages its vCPUs access through a
    /// memslot, which the emulated backend does not see (like `KVM_PRE_FAULT_MEMORY`).
    pub fn guest_fault(&self, offset: u64, len: u64) -> KernelResult<()> {
        self.owner_only()?;
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.size => {}
            _ => return Err(Errno::EFAULT),
        }
        let st = self.read_state();
        self.inner.fault_range(&st, offset, len)
    }
}

impl Inner {
    pub(super) fn bits(&self) -> std::sync::MutexGuard<'_, PageBits> {
        self.pages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn no_direct_map(&self) -> bool {
        self.flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP != 0
    }

    pub(super) fn log(&self, call: HookCall) {
        if let Some(log) = self.hook_log.get() {
            log.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(call);
        }
    }

    /// The direct map (or its window) holding page `index`, and the page's offset in it.
    pub(super) fn dm_page(&self, index: u64) -> KernelResult<(ViewRef<'_>, usize)> {
        let off = index.checked_mul(PAGE_SIZE).ok_or(Errno::EFAULT)?;
        self.direct_map.slice(
            self.memfd.as_fd(),
            self.size,
            GUEST_VIEW_FLAGS,
            off,
            PAGE_SIZE,
        )
    }

    /// A hook's handle on page `index`; EFAULT if the page is removed from the direct map
    /// (gmem never touches a removed page).
    pub(super) fn page_ref(&self, bits: &PageBits, index: u64) -> KernelResult<PageRef<'_>> {
        if bits.removed.contains(index) {
            return Err(Errno::EFAULT);
        }
        let (dm, off) = self.dm_page(index)?;
        // A page of the direct map, which lives as long as `self`, and is mapped: its removed
        // mark is clear, and marks change only under the `pages` lock the caller holds.
        Ok(PageRef::new(index, dm, off))
    }

    /// gmem's own write of page `index` (`None`: zeroes) through the direct map: refused
    /// for a removed page, and checked with the platform (SNP, TDX: never a guest-owned page).
    pub(super) fn gmem_write(
        &self,
        bits: &PageBits,
        index: u64,
        data: Option<&[u8]>,
    ) -> KernelResult<()> {
        if bits.removed.contains(index) {
            return Err(Errno::EFAULT);
        }
        self.platform.gmem_write(index)?;
        let (dm, off) = self.dm_page(index)?;
        let zeros = [0u8; PAGE];
        let data = data.unwrap_or(&zeros);
        // A mapped page of the direct map (not removed, checked under the lock); at most a
        // page is written.
        dm.write_volatile(off, &data[..data.len().min(PAGE)])
    }

    pub(super) fn page_present(&self, index: u64) -> KernelResult<bool> {
        let off = index * PAGE_SIZE;
        Ok(!sys::data_runs(self.memfd.as_fd(), off, off + PAGE_SIZE)?.is_empty())
    }

    /// Present pages of `[first, end)`.
    pub(super) fn present_pages(&self, first: u64, end: u64) -> Vec<u64> {
        let runs = sys::data_runs(self.memfd.as_fd(), first * PAGE_SIZE, end * PAGE_SIZE)
            .unwrap_or_default();
        runs.into_iter()
            .flat_map(|(s, e)| s / PAGE_SIZE..e.div_ceil(PAGE_SIZE))
            .collect()
    }

    /// Zero-once (§2.6): a page not up to date is zeroed through the direct map and marked.
    /// A page the memfd already holds is only marked: shmem zero-filled it when it was
    /// allocated, by fallocate or by a host or vCPU fault the emulated backend does not see
    /// (host faults are seen on NO_DIRECT_MAP files only), which in the kernel would have
    /// zeroed and marked it then.
    pub(super) fn make_uptodate(&self, bits: &mut PageBits, index: u64) -> KernelResult<()> {
        if bits.uptodate.contains(index) {
            return Ok(());
        }
        // Marked first (ENOMEM, nothing done, if it cannot be), unmarked if the zeroing
        // fails: the node holding the mark is there, so that allocates nothing.
        bits.uptodate.try_insert(index)?;
        let zeroed = match self.page_present(index) {
            Ok(true) => Ok(()),
            Ok(false) => self.gmem_write(bits, index, None).map(|()| {
                self.log(HookCall::Zero(index));
            }),
            Err(e) => Err(e),
        };
        if zeroed.is_err() {
            let _ = bits.uptodate.try_remove(index);
        }
        zeroed
    }

    /// The guest fault (`kvm_gmem_get_pfn`, §2.6, §3.2) of every page of
    /// `[offset, offset + len)`, under the shared lock `st`, page by page: zero if not up to
    /// date; make-private if the page is private (every time: the hook is idempotent); with
    /// NO_DIRECT_MAP, remove it from the direct map, marking it only once that succeeded.
    pub(super) fn fault_range(&self, st: &State, offset: u64, len: u64) -> KernelResult<()> {
        // A follower's page bits are a stale copy: first use (zeroing, hand-out) is the
        // owner's to track, and zeroing here could wipe what the owner wrote since.
        if self.is_follower() {
            return Ok(());
        }
        let (first, end) = pages_of(offset, len);
        let mut bits = self.bits();
        // Pages not up to date: one presence scan (SEEK_DATA) for all of them.
        let stale: Vec<u64> = (first..end)
            .filter(|&i| !bits.uptodate.contains(i))
            .collect();
        let present = match (stale.first(), stale.last()) {
            (Some(&lo), Some(&hi)) => self.present_pages(lo, hi + 1),
            _ => Vec::new(),
        };
        let mut stale = stale.into_iter().peekable();
        for index in first..end {
            if stale.next_if_eq(&index).is_some() {
                // Marked first, as in `make_uptodate`.
                bits.uptodate.try_insert(index)?;
                if present.binary_search(&index).is_err() {
                    if let Err(e) = self.gmem_write(&bits, index, None) {
                        let _ = bits.uptodate.try_remove(index);
                        return Err(e);
                    }
                    self.log(HookCall::Zero(index));
                }
            }
            self.fault_page(st, &mut bits, index)?;
        }
        Ok(())
    }

    /// The rest of the guest fault of one page, once it is up to date.
    pub(super) fn fault_page(
        &self,
        st: &State,
        bits: &mut PageBits,
        index: u64,
    ) -> KernelResult<()> {
        if self.hooks.make_private && st.attrs.get(index) & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0 {
            let page = self.page_ref(bits, index)?;
            self.log(self.hook_call(HookSite::Fault, index));
            self.platform.make_private(&page)?;
        }
        if self.no_direct_map() && !bits.removed.contains(index) {
            // Marked only once the removal succeeded (gmem touches no page marked removed, so
            // a mark is never made without one): the mark's node is made first, and a
            // failed removal takes the mark away again (no allocation).
            bits.removed.try_insert(index)?;
            if let Err(e) = self.remove_from_direct_map(index) {
                let _ = bits.removed.try_remove(index);
                return Err(e);
            }
            self.log(HookCall::DirectMapRemove(index));
        }
        Ok(())
    }

    /// A host hand-out (the safe accessors; a host-mapping fault, served by the fault
    /// service): with NO_DIRECT_MAP, each page is made up to date and removed from the direct
    /// map. A failed removal marks nothing.
    pub(super) fn hand_out(&self, offset: u64, len: u64) -> Result<(), AccessError> {
        if !self.no_direct_map() || len == 0 || self.is_follower() {
            return Ok(());
        }
        let (first, end) = pages_of(offset, len);
        let mut bits = self.bits();
        for index in first..end {
            let err = |errno| AccessError::DirectMap {
                offset: index * PAGE_SIZE,
                errno,
            };
            if bits.removed.contains(index) {
                continue;
            }
            self.make_uptodate(&mut bits, index).map_err(err)?;
            // As in `fault_page`.
            bits.removed.try_insert(index).map_err(|e| err(e.into()))?;
            if let Err(e) = self.remove_from_direct_map(index) {
                let _ = bits.removed.try_remove(index);
                return Err(err(e));
            }
            self.log(HookCall::DirectMapRemove(index));
        }
        Ok(())
    }

    /// Makes page `index` inaccessible in the direct map: the empty hole file is mapped over
    /// it, so a stray access raises SIGBUS (a backstop: gmem checks the mark first).
    pub(super) fn remove_from_direct_map(&self, index: u64) -> KernelResult<()> {
        self.fail_after.injected_failure()?;
        let (dm, off) = self.dm_page(index)?;
        // One page inside the direct map, which only gmem accesses, always under the `pages`
        // lock the caller holds.
        dm.map_fixed(off, PAGE, self.hole.as_fd(), index * PAGE_SIZE)
    }

    /// Maps the memory file back at page `index` of the direct map.
    pub(super) fn restore_direct_map(&self, index: u64) -> KernelResult<()> {
        let (dm, off) = self.dm_page(index)?;
        // As in `remove_from_direct_map`; a new mapping of the file is not inherited by fork
        // children, as the rest of the direct map is not (no fork in between).
        let _quiet = super::fork::quiet();
        dm.map_fixed(off, PAGE, self.memfd.as_fd(), index * PAGE_SIZE)?;
        dm.madvise(off, PAGE, libc::MADV_DONTFORK)
    }

    /// §2.4 step 4b: make-shared on every present page of `[first, end)`.
    pub(super) fn make_shared_range(&self, first: u64, end: u64) {
        let bits = self.bits();
        // Past the conversion's point of no return: the present pages are visited without
        // collecting them (no allocation).
        let _ = sys::for_each_data_run(
            self.memfd.as_fd(),
            first * PAGE_SIZE,
            end * PAGE_SIZE,
            |s, e| {
                for index in s / PAGE_SIZE..e.div_ceil(PAGE_SIZE) {
                    // A removed page cannot occur: platforms with make-shared do not offer
                    // NO_DIRECT_MAP.
                    if let Ok(page) = self.page_ref(&bits, index) {
                        self.log(self.hook_call(HookSite::ToShared, index));
                        self.platform.make_shared(&page);
                    }
                }
            },
        );
    }

    /// Pages `[first, end)` leave the file (punch-hole, release): restore the direct map of
    /// removed pages, then reclaim present pages (the kernel's `free_folio` order, §3.2),
    /// and forget that they were up to date. No per-page work without NO_DIRECT_MAP or a
    /// reclaim hook.
    ///
    /// With the v8 placement on TDX the change is the KVM MMU's invalidation with the private
    /// filter, so only pages private in `attrs` are visited.
    pub(super) fn free_pages(&self, attrs: &AttributeStore, first: u64, end: u64) {
        let mut bits = self.bits();
        if self.no_direct_map() {
            // A page at a time (no list): unmarked first — a mark that cannot be taken away
            // (no memory to split a stretch of marks) leaves the page out of the direct map
            // and marked, never touched, as the kernel's WARN does — then restored, and
            // marked again if that fails (the mark's node is there: no allocation).
            let mut from = first;
            while let Some((a, b)) = bits.removed.first_in(from, end) {
                for index in a..b {
                    if bits.removed.try_remove(index).is_err() {
                        continue;
                    }
                    if self.restore_direct_map(index).is_ok() {
                        self.log(HookCall::DirectMapRestore(index));
                    } else {
                        // The kernel WARNs; the page stays marked and is never touched.
                        bits.removed.insert(index);
                    }
                }
                from = b;
            }
        }
        if self.hooks.reclaim {
            let private_only = self
                .options
                .hook_placement
                .private_filter(self.platform.kind());
            for index in self.present_pages(first, end) {
                if private_only && attrs.get(index) & KVM_MEMORY_ATTRIBUTE_PRIVATE == 0 {
                    continue;
                }
                if let Ok(page) = self.page_ref(&bits, index) {
                    self.log(self.hook_call(HookSite::Free, index));
                    self.platform.reclaim(&page);
                }
            }
        }
        // Without memory to split a stretch, the pages stay marked: each was zeroed, and a
        // page punched out of the file comes back zero-filled from shmem anyway.
        let _ = bits.uptodate.try_remove_range(first, end);
    }
}

#[cfg(test)]
mod tests {
    use super::{PageSet, RunSet};

    /// Page ranges across and along 64-page word edges.
    const EDGES: [(u64, u64); 7] = [
        (0, 1),
        (3, 64),
        (63, 65),
        (64, 128),
        (5, 200),
        (190, 191),
        (0, 256),
    ];

    /// The word-level range operations agree with page-by-page ones, across word edges.
    #[test]
    fn range_operations_match_page_by_page() {
        let ranges = EDGES;
        for &(a, b) in &ranges {
            for &(c, d) in &ranges {
                let mut s = PageSet::new(512);
                s.insert_range(a, b);
                s.try_remove_range(c, d).unwrap();
                for p in 0..300 {
                    let was = p >= a && p < b;
                    let cut = p >= c && p < d;
                    assert_eq!(s.contains(p), was && !cut, "[{a},{b}) - [{c},{d}) at {p}");
                }
                for (x, y) in [(0, 300), (a, d), (c, b), (a + 1, b)] {
                    let runs: Vec<(u64, u64)> = s.runs_in(x, y).collect();
                    let pages: Vec<u64> = runs.iter().flat_map(|&(p, q)| p..q).collect();
                    let walked: Vec<u64> = (x..y).filter(|&p| s.contains(p)).collect();
                    assert_eq!(pages, walked, "runs of [{a},{b}) - [{c},{d}) in [{x},{y})");
                    assert!(runs.windows(2).all(|w| w[0].1 < w[1].0), "runs are maximal");
                }
                s.try_insert(c).unwrap();
                assert!(s.contains(c));
                s.try_remove(c).unwrap();
                assert!(!s.contains(c));
            }
        }
    }

    /// The run-based set answers as the word-based one for every operation.
    #[test]
    fn run_set_matches_page_set() {
        let ranges = EDGES;
        for &(a, b) in &ranges {
            for &(c, d) in &ranges {
                for &(e, f) in &[(1, 2), (200, 210), (60, 70)] {
                    let (mut w, mut r) = (PageSet::new(512), RunSet::default());
                    w.insert_range(a, b);
                    r.insert_range(a, b);
                    w.insert_range(e, f);
                    r.insert_range(e, f);
                    w.insert(150);
                    r.try_insert(150).unwrap();
                    let (mut wm, mut rm) = (PageSet::new(512), RunSet::default());
                    rm.try_insert(300).unwrap();
                    wm.insert(300);
                    // What moves: the members of [c, d).
                    for p in c..d {
                        if w.contains(p) {
                            wm.insert(p);
                        }
                    }
                    w.try_remove_range(c, d).unwrap();
                    r.try_move_range(c, d, Some(&mut rm)).unwrap();
                    for p in 0..310 {
                        let at = format!("[{a},{b})+[{e},{f}) - [{c},{d}) at {p}");
                        assert_eq!(r.contains(p), w.contains(p), "{at}");
                        assert_eq!(rm.contains(p), wm.contains(p), "moved: {at}");
                        let walked = (0..p).rev().take_while(|&q| w.contains(q)).count();
                        assert_eq!(r.run_below(p, 40), (walked as u64).min(40), "{at}");
                    }
                    for (x, y) in [(0, 310), (a, d), (c, b), (a + 1, b)] {
                        let runs: Vec<(u64, u64)> = r.runs_in(x, y).collect();
                        assert_eq!(runs, w.runs_in(x, y).collect::<Vec<_>>(), "[{x},{y})");
                        assert_eq!(r.first_in(x, y), w.first_in(x, y), "first_in [{x},{y})");
                    }
                    for set in [&r, &rm] {
                        let runs: Vec<(u64, u64)> = set.runs.iter().collect();
                        assert!(
                            runs.windows(2).all(|w| w[0].1 < w[1].0),
                            "maximal: {runs:?}"
                        );
                        assert!(runs.iter().all(|&(a, b)| a < b), "no empty run");
                    }
                }
            }
        }
    }

    /// Random operations on both sets against a page-by-page model, over a span that makes
    /// the run set's chunks split and merge.
    #[test]
    fn random_operations_match_a_model() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = |m: u64| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) % m
        };
        const N: u64 = 3_000;
        let (mut w, mut r, mut to) = (PageSet::new(N), RunSet::default(), RunSet::default());
        let mut model = vec![false; N as usize];
        let mut moved = vec![false; N as usize];
        for _ in 0..4_000 {
            let a = rnd(N);
            let span = if rnd(4) == 0 { 400 } else { 8 };
            let b = (a + 1 + rnd(span)).min(N);
            match rnd(3) {
                0 => {
                    w.try_insert_range(a, b).unwrap();
                    r.try_insert_range(a, b).unwrap();
                    model[a as usize..b as usize].fill(true);
                }
                1 => {
                    w.try_remove_range(a, b).unwrap();
                    r.try_move_range(a, b, Some(&mut to)).unwrap();
                    for p in a..b {
                        moved[p as usize] |= model[p as usize];
                        model[p as usize] = false;
                    }
                }
                _ => {
                    let run: Vec<(u64, u64)> = r.runs_in(a, b).collect();
                    let want: Vec<u64> = (a..b).filter(|&p| model[p as usize]).collect();
                    let got: Vec<u64> = run.iter().flat_map(|&(p, q)| p..q).collect();
                    assert_eq!(got, want, "run set in [{a}, {b})");
                    assert_eq!(run, w.runs_in(a, b).collect::<Vec<_>>(), "[{a}, {b})");
                }
            }
        }
        for p in 0..N {
            assert_eq!(r.contains(p), model[p as usize], "page {p}");
            assert_eq!(w.contains(p), model[p as usize], "page {p}");
            assert_eq!(to.contains(p), moved[p as usize], "moved page {p}");
        }
    }
}
