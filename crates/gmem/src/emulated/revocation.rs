//! Host-mapping revocation: private pages of every host mapping raise SIGBUS.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Included};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::vma_budget;
use super::{EmulatedGuestMemfd, Inner, State};
use crate::attributes::pages_of;
use crate::error::{Errno, KernelResult};
use crate::mapping::MappingRegistry;
use crate::sys::{Mmap, PoisonError, PoisonFd, PAGE_SIZE};

pub(super) enum Mechanism {
    Poison(PoisonFd),
    Remap,
}

#[derive(Debug)]
pub(super) struct MappingEntry {
    pub(super) id: u64,
    /// The host mapping (shared with its [`HostMapping`](crate::HostMapping), which removes
    /// this entry before it unmaps).
    pub(super) map: Arc<Mmap>,
    pub(super) addr: usize,
    pub(super) len: usize,
    pub(super) file_offset: u64,
    /// File ranges `[start, end)` currently replaced by the hole file (coalesced; adjacent
    /// holes are one VMA because the hole file is mapped at the same offset).
    pub(super) holes: BTreeMap<u64, u64>,
    /// Whether the last optimistic revocation in this mapping found present PTEs: if so,
    /// the next ones zap before poisoning instead of trying the marker first. A zap-first
    /// revocation cannot tell whether PTEs were there, so every 8th one is optimistic again
    /// to re-learn. A wrong guess costs one extra system call.
    pub(super) expect_populated: bool,
    /// Zap-first revocations since the last optimistic one.
    pub(super) zap_first_streak: u8,
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
/// registered with userfaultfd or not (Remap mode), a hole, or re-mapped by a conversion. Every
/// VMA of a host mapping carries the flag (a `MAP_FIXED` or moved VMA starts without it, so
/// each layout change sets it again), which also keeps equal neighbours mergeable.
pub(super) fn no_thp(map: &Mmap, off: usize, len: usize) -> KernelResult<()> {
    map.madvise(off, len, libc::MADV_NOHUGEPAGE)
}

/// `UFFDIO_POISON` over a range that may span several VMAs (one call must stay inside one
/// VMA, else ENOENT; adjacent VMAs of the memory file do not always merge after remaps):
/// halves the range at each ENOENT, so a boundary costs O(log n) calls.
pub(super) fn poison_split(uffd: &PoisonFd, addr: u64, len: usize) -> Result<(), PoisonError> {
    match uffd.poison(addr, len) {
        Err(PoisonError::Failed(Errno::ENOENT)) if len > PAGE_SIZE as usize => {
            let half = (len / 2) & !(PAGE_SIZE as usize - 1);
            let half = half.max(PAGE_SIZE as usize);
            poison_split(uffd, addr, half)?;
            // `half < len`: still inside the caller's range.
            let rest = addr + half as u64;
            poison_split(uffd, rest, len - half).map_err(|e| match e {
                PoisonError::Exists { done } => PoisonError::Exists {
                    done: done + half as u64,
                },
                other => other,
            })
        }
        other => other,
    }
}

impl EmulatedGuestMemfd {
    /// Makes file range `[start, end)` (bytes), currently shared, inaccessible in mapping
    /// `m`: a hole mapping for a long run (or always, with [`Revocation::Remap`]; or when
    /// `force_hole`), poison markers otherwise.
    pub(super) fn revoke_with(
        &self,
        m: &mut MappingEntry,
        start: u64,
        end: u64,
        force_hole: bool,
    ) -> KernelResult<()> {
        let Some((off, len)) = m.window(start, end) else {
            return Ok(());
        };
        self.inner.fail_after.injected_failure()?;
        let opts = &self.inner.options;
        let s = start.max(m.file_offset);
        let uffd = match &self.inner.mechanism {
            // Markers for a short run, and for a long one past the mapping's hole budget or
            // the process's VMA budget (markers add no VMA).
            Mechanism::Poison(uffd)
                if !force_hole
                    && ((len as u64) < opts.hole_min_bytes
                        || m.holes.len() >= opts.hole_budget
                        || !vma_budget::room(m.hole_delta(s, s + len as u64), false)) =>
            {
                uffd
            }
            // Remap mode has only holes: past the process's VMA budget a revocation fails
            // (ENOMEM, rolled back), keeping the rest of the budget for restores.
            Mechanism::Remap
                if !force_hole && !vma_budget::room(m.hole_delta(s, s + len as u64), false) =>
            {
                return Err(Errno::ENOMEM);
            }
            Mechanism::Poison(_) | Mechanism::Remap => {
                // The window lies inside the mapping. The hole file is empty, so every access
                // to the new mapping is past its end: SIGBUS.
                m.map.map_fixed(off, len, self.inner.hole.as_fd(), s)?;
                no_thp(&m.map, off, len)?;
                m.add_hole(s, s + len as u64);
                return Ok(());
            }
        };
        // Markers go only on empty PTEs. Unless the last revocation here found the mapping
        // populated, poison optimistically (an unpopulated range needs this one call); at the
        // first present PTE, zap from there and retry. A concurrent access can re-fault a page
        // between the zap and the marker; the loop then zaps again from that page.
        let mut done = 0usize;
        let mut zaps = 0u32;
        let zap_first = m.expect_populated && m.zap_first_streak < 8;
        if zap_first {
            m.zap_first_streak += 1;
            m.map.madvise(off, len, libc::MADV_DONTNEED)?;
        } else {
            m.zap_first_streak = 0;
        }
        let mut found_present = false;
        let mut registered = false;
        while done < len {
            let at = m.addr as u64 + (off + done) as u64;
            match poison_split(uffd, at, len - done) {
                Ok(()) => break,
                Err(PoisonError::Exists { done: d }) => {
                    found_present = true;
                    done += usize::try_from(d).map_err(|_| Errno::EFAULT)?;
                    zaps += 1;
                    if zaps > 10_000 {
                        return Err(Errno::EAGAIN);
                    }
                    m.map.madvise(off + done, len - done, libc::MADV_DONTNEED)?;
                }
                // Part of the mapping is not registered (memory-file VMAs are registered
                // lazily, see `reregister`): register it all and try again, once.
                Err(PoisonError::Failed(Errno::ENOENT)) if !registered => {
                    registered = true;
                    self.reregister(m)?;
                }
                Err(PoisonError::Failed(e)) => return Err(e),
            }
        }
        if !zap_first {
            m.expect_populated = found_present;
        }
        Ok(())
    }

    pub(super) fn revoke(&self, m: &mut MappingEntry, start: u64, end: u64) -> KernelResult<()> {
        self.revoke_with(m, start, end, false)
    }

    /// Undoes a partial restore: a hole over the whole run works whatever mix of holes,
    /// markers and restored pages it holds.
    pub(super) fn revoke_forced(
        &self,
        m: &mut MappingEntry,
        start: u64,
        end: u64,
    ) -> KernelResult<()> {
        vma_budget::with_reserve(|| self.revoke_with(m, start, end, true))
    }

    /// Makes file range `[start, end)` (bytes), currently private, accessible again in
    /// mapping `m`: markers are zapped; a hole inside the range is replaced by the memory
    /// file; a hole that reaches beyond the range is split around an aligned neighbourhood of
    /// the range rebuilt with markers, or rebuilt whole as markers when the budgets have no
    /// room for a split ([`EmulatedGuestMemfd::restore_part`]). At the kernel's VMA limit the
    /// layout changes draw on the process's reserve ([`vma_budget::with_reserve`]).
    pub(super) fn restore(&self, m: &mut MappingEntry, start: u64, end: u64) -> KernelResult<()> {
        let Some((off, len)) = m.window(start, end) else {
            return Ok(());
        };
        self.inner.fail_after.injected_failure()?;
        let s = start.max(m.file_offset);
        let e = s + len as u64;
        let holes = m.holes_in(s, e)?;
        let covered: u64 = holes.iter().map(|(a, b)| b - a).sum();
        if let Mechanism::Poison(_) = self.inner.mechanism {
            if covered < e - s {
                // DONTNEED on a shared mapping drops PTEs and markers only, never file
                // contents.
                m.map.madvise(off, len, libc::MADV_DONTNEED)?;
            }
        }
        let any_hole = !holes.is_empty();
        for (ps, pe) in holes {
            let (hs, he) = m
                .holes
                .range(..=ps)
                .next_back()
                .map_or((ps, pe), |(&a, &b)| (a, b));
            match &self.inner.mechanism {
                Mechanism::Poison(uffd) if hs < ps || pe < he => {
                    vma_budget::with_reserve(|| self.restore_part(uffd, m, (hs, he), (ps, pe)))?
                }
                // Remap mode: re-mapping the middle of a hole splits it (one more hole). A
                // restore may use the budget up to the hard limit; past it, ENOMEM (the
                // whole hole can still be converted back: that frees VMAs).
                Mechanism::Remap if hs < ps && pe < he && !vma_budget::room(1, true) => {
                    return Err(Errno::ENOMEM)
                }
                _ => vma_budget::with_reserve(|| self.unhole(m, ps, pe))?,
            }
        }
        // NO_DIRECT_MAP: a memory-file VMA mapped over a hole, or moved by `rebuild_hole`,
        // starts unregistered and its faults would not be seen: register the mapping again
        // now (not lazily), so the host hand-out covers every shared page.
        if let Some(service) = self.inner.fault_service() {
            service.uffd.register(&m.map)?;
        }
        if any_hole {
            vma_budget::refill();
        }
        Ok(())
    }

    /// Maps the memory file over hole piece `[hs, he)` of `m` (and registers it).
    pub(super) fn unhole(&self, m: &mut MappingEntry, hs: u64, he: u64) -> KernelResult<()> {
        let Some((off, len)) = m.window(hs, he) else {
            return Ok(());
        };
        m.map.map_fixed(off, len, self.inner.memfd.as_fd(), hs)?;
        no_thp(&m.map, off, len)?;
        // Not registered yet: the next poison here registers the mapping (`reregister`).
        m.remove_hole(hs, he);
        Ok(())
    }

    /// Registers the whole of mapping `m` with the userfaultfd again. Registration is only
    /// needed by `UFFDIO_POISON` (markers act without it), and layout changes lose it: a
    /// memory-file VMA mapped over a hole starts unregistered, and `mremap` merges the moved
    /// VMA with an equal registered neighbour first and only then drops the userfaultfd
    /// context of the (merged) result, neighbour included (seen on 6.18). So registration is
    /// lazy: a poison that fails with ENOENT registers the mapping and retries. Registering a
    /// registered range with the same userfaultfd is allowed; hole VMAs (shmem too) are
    /// registered harmlessly.
    pub(super) fn reregister(&self, m: &MappingEntry) -> KernelResult<()> {
        match &self.inner.mechanism {
            Mechanism::Poison(uffd) => uffd.register(&m.map),
            Mechanism::Remap => Ok(()),
        }
    }

    /// Restores `[ps, pe)`, part of hole `[hs, he)` (Poison mode), at a cost that depends on
    /// the range, not on the hole: only the aligned neighbourhood of the range (granule
    /// [`EmulatedOptions::hole_min_bytes`](super::EmulatedOptions::hole_min_bytes), at most
    /// 2 MiB) is rebuilt as the memory file with markers around the range, and the hole is
    /// split around it. A split adds a hole: when the mapping's hole budget or the process's
    /// VMA budget has no room, the whole hole is rebuilt as markers instead (no lasting VMA,
    /// so a conversion to shared never fails for want of one; cost proportional to the hole).
    fn restore_part(
        &self,
        uffd: &PoisonFd,
        m: &mut MappingEntry,
        (hs, he): (u64, u64),
        (ps, pe): (u64, u64),
    ) -> KernelResult<()> {
        let g = self.inner.options.hole_min_bytes.clamp(PAGE_SIZE, 2 << 20) / PAGE_SIZE * PAGE_SIZE;
        let rs = hs.max(ps - ps % g);
        let re = he.min(pe.div_ceil(g).saturating_mul(g));
        let splits = hs < rs && re < he;
        if !splits || (m.holes.len() < self.inner.options.hole_budget && vma_budget::room(1, false))
        {
            self.rebuild_hole(uffd, m, (rs, re), (ps, pe))
        } else {
            self.rebuild_hole(uffd, m, (hs, he), (ps, pe))
        }
    }

    /// Replaces `[hs, he)`, all of it a hole of `m` (a whole hole or a piece of one), by the
    /// memory file with markers on every page but `[ps, pe)`, atomically: the replacement is
    /// built at a fresh address and moved over the hole with `mremap` (which splits the hole
    /// VMA around it if `[hs, he)` is a piece), so no access ever sees a private page of it
    /// exposed.
    pub(super) fn rebuild_hole(
        &self,
        uffd: &PoisonFd,
        m: &mut MappingEntry,
        (hs, he): (u64, u64),
        (ps, pe): (u64, u64),
    ) -> KernelResult<()> {
        let Some((dest, len)) = m.window(hs, he) else {
            return Ok(());
        };
        // Inaccessible until its private pages carry markers: its address is the kernel's
        // (predictable) choice, so another thread could otherwise read one in between, as a
        // review showed for new host mappings.
        let fresh =
            Mmap::new_inaccessible(Some(self.inner.memfd.as_fd()), hs, len, libc::MAP_SHARED)?;
        // The flag moves with the VMA.
        no_thp(&fresh, 0, len)?;
        uffd.register(&fresh)?;
        for (a, b) in [(hs, ps), (pe, he)] {
            if a < b {
                // Both differences are below `len`, a usize.
                #[allow(clippy::cast_possible_truncation)]
                let (off, n) = ((a - hs) as usize, (b - a) as usize);
                // Inside `fresh`, which nothing has accessed: its PTEs are all none.
                let at = fresh.as_ptr() as u64 + off as u64;
                poison_split(uffd, at, n).map_err(|p| match p {
                    PoisonError::Failed(e) => e,
                    PoisonError::Exists { .. } => Errno::EAGAIN,
                })?;
            }
        }
        fresh.protect(libc::PROT_READ | libc::PROT_WRITE)?;
        // `fresh` is ours and `dest` is inside the mapping; after the move `fresh`'s range is
        // gone.
        fresh.move_onto(&m.map, dest)?;
        // The move drops the userfaultfd registration (the markers stay, and a marker raises
        // SIGBUS with or without it); the next poison here registers the mapping again.
        m.remove_hole(hs, he);
        Ok(())
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
    /// mappings every conversion revokes in, revokes its private pages, and only then makes it
    /// readable and writable.
    pub(super) fn register_mapping(&self, map: &Arc<Mmap>, file_offset: u64) -> KernelResult<u64> {
        let mut st = self.write_state();
        let id = u64::try_from(self.inner.next_id.fetch_add(1, Ordering::Relaxed))
            .map_err(|_| Errno::ENOMEM)?;
        let mut entry = MappingEntry {
            id,
            map: map.clone(),
            addr: map.as_ptr() as usize,
            len: map.len(),
            file_offset,
            holes: BTreeMap::new(),
            expect_populated: false,
            zap_first_streak: 0,
            charged: 0,
        };
        no_thp(map, 0, map.len())?;
        vma_budget::refill();
        if let Mechanism::Poison(uffd) = &self.inner.mechanism {
            uffd.register(map)?;
        }
        if let Some(service) = self.inner.fault_service() {
            // NO_DIRECT_MAP: host faults become events (a no-op re-registration when the
            // mechanism's userfaultfd is the service's).
            service.uffd.register(map)?;
            service
                .maps()
                .push((id, entry.addr, entry.len, entry.file_offset));
        }
        let file_end = file_offset
            .saturating_add(map.len() as u64)
            .min(self.inner.size);
        let (first, end) = pages_of(file_offset, file_end.saturating_sub(file_offset));
        let runs = st.attrs.try_runs(first, end).map_err(|_| Errno::ENOMEM);
        let runs = match runs {
            Ok(runs) => runs,
            Err(e) => {
                self.inner.forget_mapping(id);
                return Err(e);
            }
        };
        for (s, e, private) in runs {
            if private {
                if let Err(e) = self.revoke(&mut entry, s * PAGE_SIZE, e * PAGE_SIZE) {
                    self.inner.forget_mapping(id);
                    return Err(e);
                }
            }
        }
        // Every private page is revoked: the mapping (made inaccessible by the caller) may
        // now be read and written. Under the lock, so no conversion sees it half-made.
        if let Err(e) = map.protect(libc::PROT_READ | libc::PROT_WRITE) {
            drop(entry);
            self.inner.forget_mapping(id);
            return Err(e);
        }
        st.mappings.push(entry);
        Ok(id)
    }
}

impl MappingRegistry for Inner {
    fn unregister(&self, id: u64) {
        let _fork = super::fork::shared();
        let mut st = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st.mappings.retain(|m| m.id != id);
        drop(st);
        self.forget_mapping(id);
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
