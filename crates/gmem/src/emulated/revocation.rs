//! Host mappings of the file in this process: their registration with the guard (or, in Remap
//! mode, their hole mappings), and the Remap fallback's revocation.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Included};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::vma_budget;
use super::{EmulatedGuestMemfd, Inner, Mechanism, State};
use crate::attributes::pages_of;
use crate::error::{Errno, KernelResult};
use crate::mapping::MappingRegistry;
use crate::sys::{Mmap, Placement};

#[derive(Debug)]
pub(super) struct MappingEntry {
    pub(super) id: u64,
    /// Remap mode: the host mapping (shared with its [`HostMapping`](crate::HostMapping),
    /// which removes this entry before it unmaps), into which holes are mapped. Under the
    /// guard the entry holds no reference: the guard follows the mapping by address, and
    /// the [`HostMapping`](crate::HostMapping) alone owns it (and may `mremap` it).
    pub(super) map: Option<Arc<Mmap>>,
    pub(super) addr: usize,
    pub(super) len: usize,
    pub(super) file_offset: u64,
    /// Remap mode: file ranges `[start, end)` currently replaced by the hole file (coalesced;
    /// adjacent holes are one VMA because the hole file is mapped at the same offset).
    pub(super) holes: BTreeMap<u64, u64>,
    /// What this mapping's holes charge the process's VMA budget ([`vma_budget`]), released
    /// when the entry goes.
    pub(super) charged: usize,
}

impl Drop for MappingEntry {
    fn drop(&mut self) {
        vma_budget::charge(&mut self.charged, 0);
    }
}

impl MappingEntry {
    /// Remap mode's mapping (EINVAL under the guard, which never asks for it).
    fn mmap(&self) -> KernelResult<Arc<Mmap>> {
        self.map.clone().ok_or(Errno::EINVAL)
    }

    /// The part of file range `[start, end)` this mapping covers, as (offset in the mapping,
    /// length).
    pub(super) fn window(&self, start: u64, end: u64) -> Option<(usize, usize)> {
        let m_end = self.file_offset + self.len as u64;
        let (s, e) = (start.max(self.file_offset), end.min(m_end));
        if s >= e {
            return None;
        }
        // Both differences are below `self.len`, a usize.
        #[allow(clippy::cast_possible_truncation)]
        let (off, len) = ((s - self.file_offset) as usize, (e - s) as usize);
        Some((off, len))
    }

    /// The hole entries overlapping `[start, end)` (`touching`: or adjacent to it), in order.
    /// Holes are disjoint, so only the last entry starting at or before `start` can reach
    /// into the range from the left: O(log n + k), not a scan of every hole below `end`.
    fn entries(
        &self,
        start: u64,
        end: u64,
        touching: bool,
    ) -> impl Iterator<Item = (u64, u64)> + '_ {
        let before = self
            .holes
            .range(..=start)
            .next_back()
            .filter(move |(_, &e)| e > start || (touching && e == start));
        let upper = if touching {
            Included(end)
        } else {
            Excluded(end)
        };
        let after = self.holes.range((Excluded(start), upper));
        before.into_iter().chain(after).map(|(&s, &e)| (s, e))
    }

    /// The hole pieces overlapping `[start, end)`, clipped to it (ENOMEM if the list cannot
    /// be allocated: conversions fail, never abort).
    pub(super) fn holes_in(&self, start: u64, end: u64) -> KernelResult<Vec<(u64, u64)>> {
        let n = self.entries(start, end, false).count();
        let mut out = Vec::new();
        out.try_reserve_exact(n).map_err(|_| Errno::ENOMEM)?;
        out.extend(
            self.entries(start, end, false)
                .map(|(s, e)| (s.max(start), e.min(end))),
        );
        Ok(out)
    }

    /// How many more hole entries recording `[start, end)` as a hole leaves (negative when it
    /// merges neighbours).
    pub(super) fn hole_delta(&self, start: u64, end: u64) -> isize {
        let merged = self.entries(start, end, true).count();
        1 - isize::try_from(merged).unwrap_or(isize::MAX)
    }

    /// Records `[start, end)` as a hole, merging neighbours.
    pub(super) fn add_hole(&mut self, mut start: u64, mut end: u64) {
        loop {
            let Some((s, e)) = self.entries(start, end, true).next() else {
                break;
            };
            self.holes.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.holes.insert(start, end);
        vma_budget::charge(&mut self.charged, self.holes.len());
    }

    /// Forgets `[start, end)` as a hole, splitting entries.
    pub(super) fn remove_hole(&mut self, start: u64, end: u64) {
        loop {
            let Some((s, e)) = self.entries(start, end, false).next() else {
                break;
            };
            self.holes.remove(&s);
            if s < start {
                self.holes.insert(s, start);
            }
            if end < e {
                self.holes.insert(end, e);
            }
        }
        vma_budget::charge(&mut self.charged, self.holes.len());
    }
}

/// Marks `[off, off + len)` of a host mapping `VM_NOHUGEPAGE`, so `MADV_COLLAPSE` there is
/// EINVAL as on a guest_memfd mapping (which has no huge pages), whatever else the VMA is:
/// registered with userfaultfd or not, a hole, or re-mapped by a conversion. Every VMA of a
/// host mapping carries the flag (a `MAP_FIXED` VMA starts without it, so each layout change
/// sets it again), which also keeps equal neighbours mergeable.
pub(super) fn no_thp(map: &Mmap, off: usize, len: usize) -> KernelResult<()> {
    map.madvise(off, len, libc::MADV_NOHUGEPAGE)
}

impl EmulatedGuestMemfd {
    /// Remap mode: makes file range `[start, end)` (bytes), currently shared, inaccessible in
    /// mapping `m` with a hole mapping (ENOMEM past the process's VMA budget, unless
    /// `forced`: an undo draws on the reserve).
    pub(super) fn revoke_with(
        &self,
        m: &mut MappingEntry,
        start: u64,
        end: u64,
        forced: bool,
    ) -> KernelResult<()> {
        let Some((off, len)) = m.window(start, end) else {
            return Ok(());
        };
        self.inner.fail_after.injected_failure()?;
        let s = start.max(m.file_offset);
        if !forced && !vma_budget::room(m.hole_delta(s, s + len as u64), false) {
            return Err(Errno::ENOMEM);
        }
        // The window lies inside the mapping. The hole file is empty, so every access to the
        // new mapping is past its end: SIGBUS.
        let map = m.mmap()?;
        map.map_fixed_any(
            off,
            len,
            self.inner.hole.as_fd(),
            s,
            libc::PROT_READ | libc::PROT_WRITE,
        )?;
        no_thp(&map, off, len)?;
        map.madvise(off, len, libc::MADV_DONTFORK)?;
        m.add_hole(s, s + len as u64);
        Ok(())
    }

    pub(super) fn revoke(&self, m: &mut MappingEntry, start: u64, end: u64) -> KernelResult<()> {
        self.revoke_with(m, start, end, false)
    }

    /// Undoes a partial restore: a hole over the whole run works whatever mix of holes and
    /// restored pages it holds.
    pub(super) fn revoke_forced(
        &self,
        m: &mut MappingEntry,
        start: u64,
        end: u64,
    ) -> KernelResult<()> {
        vma_budget::with_reserve(|| self.revoke_with(m, start, end, true))
    }

    /// Remap mode: makes file range `[start, end)` (bytes), currently private, accessible
    /// again in mapping `m`: the memory file is mapped over every hole piece of the range.
    /// Re-mapping the middle of a hole splits it (one more hole): a restore may use the budget
    /// up to the hard limit, past it ENOMEM (the whole hole can still be converted back: that
    /// frees VMAs).
    pub(super) fn restore(&self, m: &mut MappingEntry, start: u64, end: u64) -> KernelResult<()> {
        self.restore_with(m, start, end, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// [`Self::restore`], the file mapped back inaccessible (`PROT_NONE`: an access faults,
    /// SIGSEGV) until [`Self::open_restored`]: for a conversion to shared whose platform hook
    /// changes the content, which must run before the host can read a page of the range
    /// (trust boundary 14, closed).
    pub(super) fn restore_closed(
        &self,
        m: &mut MappingEntry,
        start: u64,
        end: u64,
    ) -> KernelResult<()> {
        self.restore_with(m, start, end, libc::PROT_NONE)
    }

    fn restore_with(
        &self,
        m: &mut MappingEntry,
        start: u64,
        end: u64,
        prot: libc::c_int,
    ) -> KernelResult<()> {
        let Some((_, len)) = m.window(start, end) else {
            return Ok(());
        };
        self.inner.fail_after.injected_failure()?;
        let s = start.max(m.file_offset);
        let e = s + len as u64;
        let holes = m.holes_in(s, e)?;
        let any_hole = !holes.is_empty();
        for (ps, pe) in holes {
            let (hs, he) = m
                .holes
                .range(..=ps)
                .next_back()
                .map_or((ps, pe), |(&a, &b)| (a, b));
            if hs < ps && pe < he && !vma_budget::room(1, true) {
                return Err(Errno::ENOMEM);
            }
            vma_budget::with_reserve(|| self.unhole(m, ps, pe, prot))?;
        }
        if any_hole {
            vma_budget::refill();
        }
        Ok(())
    }

    /// Maps the memory file over hole piece `[hs, he)` of `m`, with protection `prot`.
    pub(super) fn unhole(
        &self,
        m: &mut MappingEntry,
        hs: u64,
        he: u64,
        prot: libc::c_int,
    ) -> KernelResult<()> {
        let Some((off, len)) = m.window(hs, he) else {
            return Ok(());
        };
        let map = m.mmap()?;
        map.map_fixed_any(off, len, self.inner.memfd.as_fd(), hs, prot)?;
        no_thp(&map, off, len)?;
        map.madvise(off, len, libc::MADV_DONTFORK)?;
        m.remove_hole(hs, he);
        Ok(())
    }

    /// Remap mode's host side of a conversion of the changing runs: hole mappings over them
    /// in every host mapping of this process (to private) or the memory file mapped back (to
    /// shared), rolled back on failure; then the gate's copy of the attributes.
    pub(super) fn remap_convert(
        &self,
        st: &mut State,
        changing: &[(u64, u64)],
        to_private: bool,
    ) -> KernelResult<()> {
        type RunOp = fn(&EmulatedGuestMemfd, &mut MappingEntry, u64, u64) -> KernelResult<()>;
        let (op, undo): (RunOp, RunOp) = if to_private {
            (Self::revoke, Self::restore)
        } else if self.inner.hooks.make_shared {
            // The platform's make-shared hook (TDX zeroes, SNP scrambles) runs after this,
            // past the last failure: until it has, the range stays inaccessible here.
            (Self::restore_closed, Self::revoke_forced)
        } else {
            (Self::restore, Self::revoke_forced)
        };
        // The host side's copy of the attributes takes one update past the point of no
        // return: its nodes are reserved first (ENOMEM with nothing changed).
        self.inner
            .gate()
            .attrs
            .try_reserve()
            .map_err(|_| Errno::ENOMEM)?;
        self.apply_all(st, changing, op, undo)?;
        // One update over the runs' span (the pages between them have the attributes
        // already), which the reserve covers.
        let mut gate = self.inner.gate();
        if let Some((first, end)) = super::host::span_pages(changing, &gate.attrs, to_private) {
            gate.attrs.set_range(first, end, to_private);
        }
        Ok(())
    }

    /// Remap mode, after a conversion to shared restored `runs` closed
    /// ([`Self::restore_closed`]) and the platform's hook ran: makes them readable and
    /// writable in every host mapping of this process. Past the conversion's point of no
    /// return, so nothing can be rolled back: a window whose `mprotect` fails (ENOMEM merging
    /// the pieces with their neighbours, which takes no new VMA) stays inaccessible — refused,
    /// never granted; mapping the file again there would need `MADV_DONTFORK` again, which
    /// could fail in turn and leave a fork child the mapping.
    pub(super) fn open_restored(&self, st: &mut State, runs: &[(u64, u64)]) {
        if !self.inner.hooks.make_shared {
            return;
        }
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        for m in &mut st.mappings {
            let Ok(map) = m.mmap() else {
                continue;
            };
            for &(s, e) in runs {
                let Some((off, len)) = m.window(s, e) else {
                    continue;
                };
                let _ = map.protect_range_any(off, len, rw);
            }
        }
    }

    /// Applies `op` to every run in every mapping; on failure, undoes what was done with
    /// `undo` and returns the error.
    pub(super) fn apply_all(
        &self,
        st: &mut State,
        runs: &[(u64, u64)],
        op: fn(&Self, &mut MappingEntry, u64, u64) -> KernelResult<()>,
        undo: fn(&Self, &mut MappingEntry, u64, u64) -> KernelResult<()>,
    ) -> KernelResult<()> {
        for i in 0..st.mappings.len() {
            for (j, &(s, e)) in runs.iter().enumerate() {
                if let Err(err) = op(self, &mut st.mappings[i], s, e) {
                    // Roll back: every run of the mappings before this one, and this
                    // mapping's runs up to and including the failed one (which may be half
                    // done). Best effort: a failing undo of a to-private conversion leaves a
                    // page revoked, never exposed.
                    for done in &mut st.mappings[..i] {
                        for &(s, e) in runs {
                            let _ = undo(self, done, s, e);
                        }
                    }
                    for &(s, e) in &runs[..=j] {
                        let _ = undo(self, &mut st.mappings[i], s, e);
                    }
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Adds host mapping `map` (of the file from `file_offset`, mapped `PROT_NONE`) to the
    /// mappings of this process and makes its private pages refused — registered with the
    /// guard (every fault checked from now on), with the userfaultfd a received file's sender
    /// serves, or, in Remap mode, with hole mappings over its private runs — and only then
    /// makes it readable and writable.
    pub(super) fn register_mapping(
        &self,
        st: &mut super::StateWrite<'_>,
        map: &Arc<Mmap>,
        file_offset: u64,
    ) -> KernelResult<u64> {
        let id = u64::try_from(self.inner.next_mapping_id.fetch_add(1, Ordering::Relaxed))
            .map_err(|_| Errno::ENOMEM)?;
        let mut entry = MappingEntry {
            id,
            map: matches!(self.inner.mechanism, Mechanism::Remap).then(|| map.clone()),
            addr: map.as_ptr() as usize,
            len: map.len(),
            file_offset,
            holes: BTreeMap::new(),
            charged: 0,
        };
        no_thp(map, 0, map.len())?;
        if !matches!(self.inner.mechanism, Mechanism::Remap) {
            super::fork::host_mapping_inherited();
        }
        match &self.inner.mechanism {
            Mechanism::Guard(g) => g.register(map, &self.inner, file_offset)?,
            Mechanism::Served(uffd) => uffd.register(map)?,
            Mechanism::Remap => {
                // Nothing would see a fork child's accesses: it does not inherit the mapping.
                map.madvise(0, map.len(), libc::MADV_DONTFORK)?;
                vma_budget::refill();
                let file_end = file_offset
                    .saturating_add(map.len() as u64)
                    .min(self.inner.size);
                let (first, end) = pages_of(file_offset, file_end.saturating_sub(file_offset));
                // The private runs (bytes), as a conversion's changing runs are found.
                let mut private = Vec::new();
                st.attrs
                    .try_runs_unlike(first, end, false, &mut private)
                    .map_err(|_| Errno::ENOMEM)?;
                for (s, e) in private {
                    self.revoke(&mut entry, s, e)?;
                }
            }
        }
        // Every private page is refused: the mapping (made inaccessible by the caller) may
        // now be read and written. Under the lock, so no conversion sees it half-made.
        // Under Remap, what the mapping maps and its protection are gmem's (holes, and ranges
        // kept `PROT_NONE` while a conversion's hook runs); elsewhere a program may change its
        // protection as the kernel lets it (the guard checks every fault whatever it is).
        if matches!(self.inner.mechanism, Mechanism::Remap) {
            map.keep_from_users();
        }
        if let Err(e) = map.protect_any(libc::PROT_READ | libc::PROT_WRITE) {
            self.inner.forget_mapping(entry.addr);
            return Err(e);
        }
        st.mappings.push(entry);
        Ok(id)
    }
}

impl Inner {
    /// The guard forgets the mapping at `addr` (unregistered or never completed).
    pub(super) fn forget_mapping(&self, addr: usize) {
        if let Some(g) = self.guard() {
            g.unregister(addr);
        }
    }
}

impl MappingRegistry for EmulatedGuestMemfd {
    fn remap(
        &self,
        id: u64,
        map: &mut Mmap,
        new_len: usize,
        may_move: bool,
        at: Option<Placement>,
    ) -> KernelResult<()> {
        let _fork = super::fork::shared();
        let mut st = self
            .inner
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(entry) = st.mappings.iter_mut().find(|m| m.id == id) else {
            return Err(Errno::EINVAL);
        };
        // Under the state lock: no conversion runs while the mapping moves. A block released
        // to the kernel's faults is guarded again first (the mapping is one VMA again).
        let remapped = self
            .inner
            .reguard_mapping(entry.addr, entry.len)
            .and_then(|()| map.remap(new_len, may_move, at));
        self.inner.release_allowed_again();
        remapped?;
        entry.addr = map.as_ptr() as usize;
        entry.len = map.len();
        if let Some(g) = self.inner.guard() {
            // The move (and a shrink's unmap) came as events; handled, the record is at the
            // new address, and takes the new length (an in-place growth has no event).
            g.flush();
            g.resize_range(entry.addr, entry.len);
        }
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> KernelResult<()> {
        crate::file::GuestMemfd::punch_hole(self, offset, len)
    }

    fn unregister(&self, id: u64) {
        let _fork = super::fork::shared();
        let mut st = self
            .inner
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let addr = st.mappings.iter().find(|m| m.id == id).map(|m| m.addr);
        st.mappings.retain(|m| m.id != id);
        drop(st);
        if let Some(addr) = addr {
            self.inner.forget_mapping(addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use crate::emulated::{EmulatedOptions, Revocation};
    use crate::file::GuestMemfd;
    use crate::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};

    /// A conversion zaps the guest view's pages of the changing runs, and only those, in
    /// both directions (as the kernel invalidates KVM's mappings of a converted range), for
    /// one run and for several. The guest view does not depend on the revocation mode: Auto
    /// (poison markers where userfaultfd offers them) and Remap, so that the test runs on any
    /// host.
    #[test]
    fn conversions_zap_the_guest_view_of_the_changing_pages() {
        for revocation in [Revocation::Auto, Revocation::Remap] {
            let f = EmulatedGuestMemfd::create_with(
                16 * PS,
                GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                EmulatedOptions::with_revocation(revocation),
            )
            .expect("create");
            let host = f.mmap_all().expect("mmap");
            let g = f.guest_view().expect("guest view").as_ptr() as usize;
            let at = |p: u64| g + (p * PS) as usize;
            let touch_all = || {
                host.write_volatile(0, &[1u8; 16 * PS as usize])
                    .expect("host");
                f.guest_touch(0, 16 * PS, 2).expect("guest");
                assert!((0..16).all(|p| pte_present(at(p))), "{revocation:?}");
            };
            touch_all();
            // One run, twice (the second zaps first: the mapping was found populated).
            for _ in 0..2 {
                f.set_private(PS, 2 * PS).expect("to private");
                let present: Vec<bool> = (0..4).map(|p| pte_present(at(p))).collect();
                assert_eq!(present, [true, false, false, true], "{revocation:?}");
                f.guest_touch(PS, 2 * PS, 3).expect("guest");
                f.set_shared(PS, 2 * PS).expect("to shared");
                let present: Vec<bool> = (0..4).map(|p| pte_present(at(p))).collect();
                assert_eq!(present, [true, false, false, true], "{revocation:?}");
                touch_all();
            }
            // Several changing runs: every other page of 0..12 private first, then the whole
            // range; only the pages that change (the odd ones) lose their guest PTEs.
            for p in (0..12).step_by(2) {
                f.set_private(p * PS, PS).expect("to private");
            }
            touch_all_shared_then(&f, &host, 12);
            f.set_private(0, 12 * PS).expect("to private");
            let present: Vec<bool> = (0..16).map(|p| pte_present(at(p))).collect();
            let want: Vec<bool> = (0..16).map(|p| p >= 12 || p % 2 == 0).collect();
            assert_eq!(present, want, "{revocation:?}");
        }
    }

    /// Touches every page of `[0, n)` from the guest, and the shared ones from the host.
    fn touch_all_shared_then(f: &EmulatedGuestMemfd, host: &crate::HostMapping, n: u64) {
        f.guest_touch(0, n * PS, 4).expect("guest");
        for p in (1..n).step_by(2) {
            host.write_volatile((p * PS) as usize, &[5u8; 8])
                .expect("host");
        }
    }
}

#[cfg(test)]
mod guest_view_tests {
    use super::tests_support::*;
    use crate::file::GuestMemfd;

    /// An unaligned guest read (found in review: a byte extent was noted, and the zap of the
    /// unaligned clipped range failed with EINVAL, leaving the page mapped for good).
    #[test]
    fn an_unaligned_guest_access_is_zapped_with_its_page() {
        let f = file();
        let g = f.guest_view().expect("guest view").as_ptr() as usize;
        let at = |p: u64| g + (p * PS) as usize;
        let mut b = [0u8; 8];
        f.guest_read(100, &mut b).expect("guest read");
        assert!(pte_present(at(0)));
        f.set_private(0, PS).expect("to private");
        let after_first = pte_present(at(0));
        f.set_shared(0, PS).expect("to shared");
        let after_second = pte_present(at(0));
        assert!(
            !after_first && !after_second,
            "page 0 stayed mapped in the guest view: after to-private {after_first}, after to-shared {after_second}"
        );
    }

    /// A guest read of one page maps its page-cache neighbours too (fault-around on a shared
    /// shmem mapping): a conversion of a neighbour must zap it (found in review).
    #[test]
    fn pages_mapped_by_fault_around_are_zapped() {
        let f = file();
        let host = f.mmap_all().expect("mmap");
        host.write_volatile(0, &[1u8; 16 * PS as usize])
            .expect("host");
        let g = f.guest_view().expect("guest view").as_ptr() as usize;
        let at = |p: u64| g + (p * PS) as usize;
        let mut b = [0u8; 8];
        f.guest_read(0, &mut b).expect("guest read");
        f.set_private(5 * PS, PS).expect("to private");
        assert!(
            !pte_present(at(5)),
            "page 5 stayed mapped in the guest view across its conversion"
        );
    }

    /// Once the guest view is handed out as a memslot, what a vCPU maps there unseen by gmem
    /// (here: a write through the view's address) is zapped by every conversion of it; gmem's
    /// own accesses are zapped before that too, and a conversion of pages nothing accessed
    /// leaves the others mapped.
    #[test]
    fn a_memslot_view_is_zapped_whatever_mapped_it() {
        let f = file();
        let g = f.guest_view().expect("guest view").as_ptr() as usize;
        let at = |p: u64| g + (p * PS) as usize;
        // gmem's own access to page 1 is seen; a conversion of page 5 leaves page 1 mapped.
        f.guest_touch(PS, PS, 1).expect("guest");
        f.set_private(5 * PS, PS).expect("to private");
        assert!(pte_present(at(1)));
        f.set_private(PS, PS).expect("to private");
        assert!(!pte_present(at(1)));
        // Handed out: a write through the address, unseen by gmem, is zapped too.
        let _ = f.memslot_source().expect("memslot source");
        let view = f.guest_view().expect("guest view");
        view.write_volatile((3 * PS) as usize, &[9]).expect("write");
        assert!(pte_present(at(3)));
        f.set_private(3 * PS, PS).expect("to private");
        assert!(!pte_present(at(3)));
        view.write_volatile((3 * PS) as usize, &[9]).expect("write");
        f.set_shared(3 * PS, PS).expect("to shared");
        assert!(!pte_present(at(3)));
    }
}

#[cfg(test)]
mod tests_support {
    use std::io::{Read, Seek, SeekFrom};

    pub(super) use crate::emulated::EmulatedGuestMemfd;
    use crate::emulated::{EmulatedOptions, Revocation};
    pub(super) use crate::sys::PAGE_SIZE as PS;
    use crate::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};

    /// Whether this process has a PTE for `addr` (`/proc/self/pagemap` bit 63).
    pub(super) fn pte_present(addr: usize) -> bool {
        let mut f = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
        f.seek(SeekFrom::Start((addr as u64 / PS) * 8))
            .expect("seek");
        let mut b = [0u8; 8];
        f.read_exact(&mut b).expect("read pagemap");
        u64::from_le_bytes(b) >> 63 == 1
    }

    /// A 16-page shared file with the default revocation (any host: the guest view does not
    /// depend on the mode).
    pub(super) fn file() -> EmulatedGuestMemfd {
        EmulatedGuestMemfd::create_with(
            16 * PS,
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            EmulatedOptions::with_revocation(Revocation::Auto),
        )
        .expect("create")
    }
}
