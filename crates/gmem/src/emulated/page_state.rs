//! Per-page state (up to date, removed from the direct map) and the direct map: the guest
//! fault (`kvm_gmem_get_pfn`), the host hand-out, zero-once, the platform hooks of
//! conversion and release.

use std::collections::BTreeMap;
use std::os::fd::AsFd;

use super::{EmulatedGuestMemfd, Inner, State, GUEST_VIEW_FLAGS};
use crate::attributes::{pages_of, AttributeStore};
use crate::error::{AccessError, Errno, KernelResult};
use crate::mapping::ViewRef;
use crate::platform::{HookCall, HookSite, PageRef, PAGE};
use crate::sys::{self, PAGE_SIZE};
use crate::uapi::{GUEST_MEMFD_FLAG_NO_DIRECT_MAP, KVM_MEMORY_ATTRIBUTE_PRIVATE};

/// A sparse set of page indices (64-page words; only non-empty words are stored), so a
/// sparse 1 TiB file costs nothing.
#[derive(Debug, Default)]
pub(super) struct PageSet {
    pub(super) words: BTreeMap<u64, u64>,
}

impl PageSet {
    pub(super) fn contains(&self, page: u64) -> bool {
        self.words
            .get(&(page / 64))
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    pub(super) fn insert(&mut self, page: u64) {
        *self.words.entry(page / 64).or_insert(0) |= 1 << (page % 64);
    }

    /// The runs `[a, b)` of members inside `[first, end)`, in order (a word at a time).
    pub(super) fn range(&self, first: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        if first >= end {
            return out;
        }
        for (&k, &w) in self.words.range(first / 64..=(end - 1) / 64) {
            let mut m = w & Self::mask(k, first, end);
            while m != 0 {
                let lo = u64::from(m.trailing_zeros());
                let ones = u64::from((m >> lo).trailing_ones());
                let (a, b) = (k * 64 + lo, k * 64 + lo + ones);
                match out.last_mut() {
                    Some(last) if last.1 == a => last.1 = b,
                    _ => out.push((a, b)),
                }
                if lo + ones >= 64 {
                    break;
                }
                m &= !((1u64 << (lo + ones)) - 1);
            }
        }
        out
    }

    /// The bits of word `k` that fall inside `[first, end)`.
    fn mask(k: u64, first: u64, end: u64) -> u64 {
        let lo = first.saturating_sub(k * 64).min(64);
        let hi = end.saturating_sub(k * 64).min(64);
        if lo >= hi {
            return 0;
        }
        let upto = |n: u64| if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        upto(hi) & !upto(lo)
    }

    /// Adds every page of `[first, end)` (a word at a time).
    pub(super) fn insert_range(&mut self, first: u64, end: u64) {
        if first >= end {
            return;
        }
        for k in first / 64..=(end - 1) / 64 {
            *self.words.entry(k).or_insert(0) |= Self::mask(k, first, end);
        }
    }

    /// Removes the members of `[first, end)` and adds them to `to` (a word at a time; no
    /// list of pages is built).
    pub(super) fn move_range(&mut self, first: u64, end: u64, mut to: Option<&mut PageSet>) {
        if first >= end {
            return;
        }
        let hit: Vec<(u64, u64)> = self
            .words
            .range(first / 64..=(end - 1) / 64)
            .map(|(&k, &w)| (k, w & Self::mask(k, first, end)))
            .filter(|&(_, m)| m != 0)
            .collect();
        for (k, m) in hit {
            if let Some(w) = self.words.get_mut(&k) {
                *w &= !m;
                if *w == 0 {
                    self.words.remove(&k);
                }
            }
            if let Some(t) = to.as_deref_mut() {
                *t.words.entry(k).or_insert(0) |= m;
            }
        }
    }

    /// Removes and returns the members of `[first, end)`.
    pub(super) fn take_range(&mut self, first: u64, end: u64) -> Vec<u64> {
        let mut out = Vec::new();
        if first >= end {
            return out;
        }
        let keys: Vec<u64> = self
            .words
            .range(first / 64..=(end - 1) / 64)
            .map(|(&k, _)| k)
            .collect();
        for k in keys {
            let Some(w) = self.words.get_mut(&k) else {
                continue;
            };
            for bit in 0..64 {
                let p = k * 64 + bit;
                if p >= first && p < end && *w & (1 << bit) != 0 {
                    *w &= !(1 << bit);
                    out.push(p);
                }
            }
            if *w == 0 {
                self.words.remove(&k);
            }
        }
        out
    }
}

/// A set of page indices kept as maximal runs `[start, end)` (by start): for sets that are
/// mostly long runs (the pages a host mapping has mapped), where every operation costs
/// O(log runs) and a 1 GiB run is one entry.
#[derive(Debug, Default)]
pub(super) struct RunSet {
    runs: BTreeMap<u64, u64>,
}

impl RunSet {
    /// The run holding `page`, if any.
    fn run_of(&self, page: u64) -> Option<(u64, u64)> {
        let (&a, &b) = self.runs.range(..=page).next_back()?;
        (page < b).then_some((a, b))
    }

    pub(super) fn contains(&self, page: u64) -> bool {
        self.run_of(page).is_some()
    }

    pub(super) fn insert(&mut self, page: u64) {
        self.insert_range(page, page + 1);
    }

    /// Adds `[first, end)`, merged with the runs it touches. Allocates only the entry it adds
    /// (none where it extends a run that starts at or before `first`).
    pub(super) fn insert_range(&mut self, mut first: u64, mut end: u64) {
        if first >= end {
            return;
        }
        if let Some((&a, &b)) = self.runs.range(..=first).next_back() {
            if b >= first {
                first = a;
                end = end.max(b);
            }
        }
        // The runs starting inside (first, end] are swallowed (the one at `first` is
        // replaced below).
        while let Some((&a, &b)) = self.runs.range(first + 1..=end).next() {
            self.runs.remove(&a);
            end = end.max(b);
        }
        self.runs.insert(first, end);
    }

    /// The runs inside `[first, end)`, cut to it, in order.
    pub(super) fn range(&self, first: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if first >= end {
            return out;
        }
        if let Some((a, b)) = self.run_of(first) {
            out.push((a.max(first), b.min(end)));
        }
        for (&a, &b) in self.runs.range(first + 1..end) {
            out.push((a, b.min(end)));
        }
        out
    }

    /// The first run inside `[first, end)`, cut to it (no allocation).
    pub(super) fn first_in(&self, first: u64, end: u64) -> Option<(u64, u64)> {
        if first >= end {
            return None;
        }
        if let Some((a, b)) = self.run_of(first) {
            return Some((a.max(first), b.min(end)));
        }
        let (&a, &b) = self.runs.range(first + 1..end).next()?;
        Some((a, b.min(end)))
    }

    /// Removes the members of `[first, end)` and adds them to `to`. Allocates nothing but
    /// what `to` gains and the remainders of runs cut at the edges.
    pub(super) fn move_range(&mut self, first: u64, end: u64, mut to: Option<&mut RunSet>) {
        if first >= end {
            return;
        }
        // A run reaching into the range from the left: cut at `first`.
        if let Some((a, b)) = self.run_of(first) {
            if a < first {
                self.runs.insert(a, first);
                self.runs.insert(first, b);
            }
        }
        // Every run starting inside the range: taken out, its part past `end` put back.
        while let Some((&a, &b)) = self.runs.range(first..end).next() {
            self.runs.remove(&a);
            if b > end {
                self.runs.insert(end, b);
            }
            if let Some(t) = to.as_deref_mut() {
                t.insert_range(a, b.min(end));
            }
        }
    }

    /// How many pages just below `page` are members, at most `cap`.
    pub(super) fn run_below(&self, page: u64, cap: u64) -> u64 {
        match page.checked_sub(1).and_then(|p| self.run_of(p)) {
            Some((a, _)) => (page - a).min(cap),
            None => 0,
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct PageBits {
    /// Zeroed once (or known to hold zero-filled or host-written data); cleared by punch-hole.
    pub(super) uptodate: PageSet,
    /// Removed from the direct map (NO_DIRECT_MAP); set only after the removal succeeded.
    pub(super) removed: PageSet,
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
        if !self.page_present(index)? {
            self.gmem_write(bits, index, None)?;
            self.log(HookCall::Zero(index));
        }
        bits.uptodate.insert(index);
        Ok(())
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
                if present.binary_search(&index).is_err() {
                    self.gmem_write(&bits, index, None)?;
                    self.log(HookCall::Zero(index));
                }
                bits.uptodate.insert(index);
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
            self.remove_from_direct_map(index)?;
            bits.removed.insert(index);
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
            self.remove_from_direct_map(index).map_err(err)?;
            bits.removed.insert(index);
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
            for index in bits.removed.take_range(first, end) {
                if self.restore_direct_map(index).is_ok() {
                    self.log(HookCall::DirectMapRestore(index));
                } else {
                    // The kernel WARNs; the page stays marked and is never touched.
                    bits.removed.insert(index);
                }
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
        bits.uptodate.take_range(first, end);
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
                let mut s = PageSet::default();
                s.insert_range(a, b);
                let mut moved = PageSet::default();
                s.move_range(c, d, Some(&mut moved));
                for p in 0..300 {
                    let was = p >= a && p < b;
                    let cut = p >= c && p < d;
                    assert_eq!(s.contains(p), was && !cut, "[{a},{b}) - [{c},{d}) at {p}");
                    assert_eq!(
                        moved.contains(p),
                        was && cut,
                        "[{a},{b}) & [{c},{d}) at {p}"
                    );
                }
                assert!(s.words.values().all(|&w| w != 0), "no empty word kept");
                for (x, y) in [(0, 300), (a, d), (c, b), (a + 1, b)] {
                    let runs = s.range(x, y);
                    let pages: Vec<u64> = runs.iter().flat_map(|&(p, q)| p..q).collect();
                    let walked: Vec<u64> = (x..y).filter(|&p| s.contains(p)).collect();
                    assert_eq!(pages, walked, "runs of [{a},{b}) - [{c},{d}) in [{x},{y})");
                    assert!(runs.windows(2).all(|w| w[0].1 < w[1].0), "runs are maximal");
                }
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
                    let (mut w, mut r) = (PageSet::default(), RunSet::default());
                    w.insert_range(a, b);
                    r.insert_range(a, b);
                    w.insert_range(e, f);
                    r.insert_range(e, f);
                    w.insert(150);
                    r.insert(150);
                    let (mut wm, mut rm) = (PageSet::default(), RunSet::default());
                    rm.insert(300);
                    wm.insert(300);
                    w.move_range(c, d, Some(&mut wm));
                    r.move_range(c, d, Some(&mut rm));
                    for p in 0..310 {
                        let at = format!("[{a},{b})+[{e},{f}) - [{c},{d}) at {p}");
                        assert_eq!(r.contains(p), w.contains(p), "{at}");
                        assert_eq!(rm.contains(p), wm.contains(p), "moved: {at}");
                        let walked = (0..p).rev().take_while(|&q| w.contains(q)).count();
                        assert_eq!(r.run_below(p, 40), (walked as u64).min(40), "{at}");
                    }
                    for (x, y) in [(0, 310), (a, d), (c, b), (a + 1, b)] {
                        assert_eq!(r.range(x, y), w.range(x, y), "range [{x},{y})");
                        assert_eq!(
                            r.first_in(x, y),
                            w.range(x, y).first().copied(),
                            "first_in [{x},{y})"
                        );
                    }
                    for set in [&r, &rm] {
                        let runs: Vec<(u64, u64)> =
                            set.runs.iter().map(|(&a, &b)| (a, b)).collect();
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
}
