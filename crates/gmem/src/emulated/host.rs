//! The host side of one emulated file under the guard ([`super::guard`]): the check every host
//! fault of the file goes through, in any process, and what a conversion does to host access.
//!
//! The file's [`Gate`] is the kernel's invalidate lock for host faults: the guard thread holds
//! it from the attribute check until the page is mapped (or poisoned); a conversion holds it
//! from its first zap until the new attributes are recorded in it. Nothing done under the gate
//! waits for a host fault to be served, so a thread that faults while it holds the file's
//! state lock (a `read_at` into a host mapping of the same file) never stops a conversion from
//! being served, nor the reverse.
//!
//! A conversion to private takes the pages out of every address space at once, with no other
//! process taking part:
//! - this process's host mappings are zapped (`MADV_DONTNEED`; the data stays in the file);
//! - a page the guard mapped in another address space (a fork child, a process the file was
//!   handed to) cannot be zapped there, so it is *replaced*: its content is held by reference
//!   (`vmsplice` into a pipe: every write up to the zap is in it), the page is punched out of
//!   the file (which zaps it in every process), and the content is written back into a new
//!   page. A stopped, slow or hostile process neither delays nor fails the conversion, and
//!   faults through the check when it next touches the page.
//!
//! A conversion to shared clears the markers the guard left in this process's host mappings
//! (`MADV_DONTNEED` over the pages that have one, and only those) and maps again at once the
//! first page of each run these mappings had mapped when they were made private (the host's
//! working set, `UFFDIO_CONTINUE`); the rest of it comes back by fault-around, a window per
//! guard fault ([`Inner::serve_host_fault`]). In another address space, the markers the guard
//! left there on private pages are replaced by the page (`UFFDIO_CONTINUE`, or
//! `UFFDIO_ZEROPAGE` for a page the file lost), since only that process's own
//! `MADV_DONTNEED` could clear them.

use std::collections::BTreeSet;
use std::sync::MutexGuard;

use std::sync::Arc;

use super::chunk_map::ChunkMap;
use super::guard::{Guard, Space};
use super::page_state::{NoMemory, PageSet, RunSet};
use super::{Inner, Mechanism};
use crate::attributes::{pages_of, AttributeStore};
use crate::error::{Errno, KernelResult};
use crate::sys::{self, PAGE_SIZE};

/// Pages a guard fault in the remembered working set maps at least (the kernel's
/// `fault_around_bytes`, 64 KiB).
const FAULT_AROUND: u64 = 16;

/// Pages a guard fault maps at most (2 MiB).
const FAULT_AROUND_MAX: u64 = 512;

/// What the host side of a file knows, under the file's gate.
#[derive(Debug)]
pub(super) struct Gate {
    /// The attributes the check reads: a copy of the file's, changed by a conversion while it
    /// holds the gate.
    pub(super) attrs: AttributeStore,
    /// Pages the guard mapped in another address space since they last left every one (a
    /// conversion to private must replace them).
    pub(super) elsewhere: PageSet,
    /// Pages the guard mapped in this process since they were last made private (with
    /// [`super::HostPages::Replace`] a conversion to private replaces them too).
    pub(super) exposed: RunSet,
    /// Pages this process's host mappings had mapped when they were last made private (the
    /// host's working set, not yet mapped again): a conversion back to shared maps the first
    /// page of each run at once, and a guard fault on one maps a window of the run
    /// (fault-around), so the working set does not fault through the guard page by page. Not
    /// for NO_DIRECT_MAP files (a page is handed out only at a fault).
    pub(super) was_mapped: RunSet,
    /// Pages on which the guard left a poison marker in this process's host mappings (a
    /// private page touched): a conversion to shared zaps these, and only these.
    pub(super) own_markers: PageSet,
    /// Poison markers the guard left in another address space: (page, space, address).
    pub(super) markers: BTreeSet<(u64, u64, u64)>,
    /// Markers a failed host hand-out left on shared pages (NO_DIRECT_MAP): (page, space,
    /// address), cleared when the page leaves the file or changes hands.
    pub(super) sigbus: BTreeSet<(u64, u64, u64)>,
    /// Blocks of this process's host mappings the guard released to the kernel (see
    /// [`Inner::try_release`]): (block index, address of the block in the mapping).
    pub(super) released: ChunkMap<(u64, usize), ()>,
    /// Released blocks that a conversion to private guarded again (the host's working set at
    /// 2 MiB, as [`Gate::was_mapped`] is at 4 KiB): a conversion back to shared releases the
    /// first of each run at once, and a guard fault releases the others.
    /// (Changed on conversion paths: a map whose allocations are fallible.)
    pub(super) was_released: ChunkMap<(u64, usize), ()>,
    /// Whether a block of this file was ever released: its conversions to private then
    /// register its host mappings over the runs first ([`Guard::register_own_file`]).
    pub(super) ever_released: bool,
    /// While the library remaps a host mapping of the file: no block is released (its
    /// mapping must stay one VMA until `mremap` is done; found in review).
    pub(super) no_release: bool,
    /// VMAs charged to the process's budget for the released blocks (each splits its
    /// mapping like a hole).
    released_charge: usize,
    /// The pipe [`Inner::replace_pages`] holds pages in (made on first use, kept).
    pipe: Option<sys::HoldPipe>,
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some(p) = self.pipe.take() {
            super::fork::close_private_pipe(p);
        }
    }
}

impl Gate {
    pub(super) fn new(attrs: AttributeStore) -> Gate {
        let npages = attrs.npages();
        Gate {
            attrs,
            elsewhere: PageSet::new(npages),
            exposed: RunSet::default(),
            was_mapped: RunSet::default(),
            own_markers: PageSet::new(npages),
            markers: BTreeSet::new(),
            sigbus: BTreeSet::new(),
            released: ChunkMap::default(),
            was_released: ChunkMap::default(),
            ever_released: false,
            no_release: false,
            released_charge: 0,
            pipe: None,
        }
    }

    /// Charges the VMA budget for the blocks now released (each splits its mapping like a
    /// hole).
    fn charge_released(&mut self) {
        let n = self.released.len();
        super::vma_budget::charge(&mut self.released_charge, n);
    }
}

/// The pages from the first run's start to the last one's end, of byte runs in order: a
/// conversion's changing runs, between which every page has the attributes asked for already
/// (so one update over the span is the update of the runs; checked in debug builds against
/// `attrs`, the copy about to be updated, for `private`).
pub(super) fn span_pages(
    runs: &[(u64, u64)],
    attrs: &AttributeStore,
    private: bool,
) -> Option<(u64, u64)> {
    debug_assert!(
        runs.windows(2).all(|w| {
            let (gap_first, gap_end) = (w[0].1 / PAGE_SIZE, w[1].0 / PAGE_SIZE);
            gap_first < gap_end && attrs.range_is(gap_first, gap_end, private)
        }),
        "changing runs {runs:?}: a gap without the attributes asked for"
    );
    let (first, last) = (runs.first()?, runs.last()?);
    Some((first.0 / PAGE_SIZE, last.1.div_ceil(PAGE_SIZE)))
}

/// A 2 MiB block of a file (its index) and its address in a host mapping of this process.
type Block = (u64, usize);

/// The 2 MiB block of the file holding `offset`, and where that block starts in the mapping
/// whose page at `addr` maps `offset` (not necessarily inside the mapping).
fn block_of(addr: u64, offset: u64) -> (u64, usize) {
    let block = offset / super::HUGE_SIZE;
    let baddr = addr.wrapping_sub(offset - block * super::HUGE_SIZE);
    // An address past usize (none is) gives an unaligned one, which nothing releases.
    (block, usize::try_from(baddr).unwrap_or(1))
}

/// Installs a poison marker at `addr` of `space`. The kernel answers EAGAIN while a mapping
/// change of that address space (an `munmap` or `mremap` of a registered range in another
/// thread) waits for its event to be read; in this process's space the guard's reader reads
/// it at once, so the call is retried (yielding, for at most about 10 ms: never waiting on
/// the server, which may be this thread). In another space the events are held while the
/// fault is served ([`Guard::hold`]): no retry, the faulting thread faults again. False if no
/// marker could be installed.
fn poison(space: &Space, addr: u64, len: usize) -> bool {
    let tries = if space.own { 1000 } else { 1 };
    for _ in 0..tries {
        match space.uffd.poison(addr, len) {
            Ok(()) => return true,
            Err(sys::uffd::PoisonError::Failed(Errno::EAGAIN)) => {
                std::thread::sleep(std::time::Duration::from_micros(10));
            }
            Err(_) => return false,
        }
    }
    false
}

/// Which markers of other address spaces [`Inner::map_over_markers`] replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Markers {
    /// Those on private pages ([`Gate::markers`]).
    Private,
    /// Those failed NO_DIRECT_MAP hand-outs left ([`Gate::sigbus`]).
    FailedHandOut,
}

/// Maps the file's page over the marker at `addr` of `space` (`UFFDIO_CONTINUE`;
/// `UFFDIO_ZEROPAGE` if the file lost the page), once.
fn map_over(space: &Space, addr: u64) -> Result<(), Errno> {
    match space.uffd.continue_page(addr, PAGE_SIZE) {
        Err(Errno::EAGAIN) => Err(Errno::EAGAIN),
        Err(_) => space.uffd.zeropage(addr, PAGE_SIZE),
        Ok(()) => Ok(()),
    }
}

impl super::EmulatedGuestMemfd {
    /// The host side of a conversion of the changing runs (bytes; §2.4 step 3a), between the
    /// safety check and the point of no return: with the guard, every host mapping of every
    /// process faults through the check, which reads the gate's attributes; to private, the
    /// pages leave every address space before the new attributes are recorded there, to
    /// shared the markers left anywhere are replaced by the pages. Remap mode revokes or
    /// restores the runs in this process's mappings. On failure nothing is changed.
    ///
    /// `platform_to_shared` is the platform's make-shared work on the range (the content
    /// rule: TDX zeroes, SNP scrambles), called once if the conversion is to shared and gets
    /// past its last failure: under the guard, before any host access can see a page as
    /// shared — the kernel holds the invalidate lock across the arch hook, so a host fault
    /// in between waits and then sees the new content, never the private one (found in
    /// review: a host thread, or a fork child served by the guard, read the guest's private
    /// content between the attribute change and the hook).
    pub(super) fn host_convert(
        &self,
        st: &mut super::State,
        changing: &[(u64, u64)],
        to_private: bool,
        platform_to_shared: &mut dyn FnMut(),
    ) -> KernelResult<()> {
        match &self.inner.mechanism {
            Mechanism::Guard(_) if to_private => self.inner.host_to_private(changing),
            Mechanism::Guard(_) => self.inner.host_to_shared(changing, platform_to_shared),
            // A received file's conversions are its owner's.
            Mechanism::Served(_) => Err(Errno::EOPNOTSUPP),
            Mechanism::Remap => {
                self.remap_convert(st, changing, to_private)?;
                if !to_private {
                    // The hook runs with the range still inaccessible to the host, which
                    // is given it only afterwards.
                    platform_to_shared();
                    self.open_restored(st, changing);
                }
                Ok(())
            }
        }
    }
}

impl Inner {
    /// The guard serving this file's host faults (the owner's copy of a file in Guard mode).
    /// None in a fork child's copy: the guard object there is the parent's, its descriptors
    /// act on the parent's address space, and its locks may have been inherited held by its
    /// threads, which the child does not have (found in review: a child's `munmap` waited
    /// for ever on the record of mappings).
    pub(super) fn guard(&self) -> Option<&Arc<Guard>> {
        match &self.mechanism {
            Mechanism::Guard(g) if self.in_own_space() => Some(g),
            Mechanism::Guard(_) | Mechanism::Served(_) | Mechanism::Remap => None,
        }
    }

    pub(super) fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Serves one host fault at page address `addr` of `space`, which maps file offset
    /// `offset` there (the guard thread): a private page gets a poison marker, and the
    /// faulting access raises SIGBUS when it retries; a shared page is handed out (with
    /// NO_DIRECT_MAP: removed from the direct map; a failed removal is a marker too) and
    /// mapped. Any other outcome (EEXIST: a PTE is there; EFAULT: a concurrent punch took the
    /// page) wakes the faulter, whose retry faults again.
    ///
    /// In this process's own mappings, a fault on a page of the remembered working set
    /// ([`Gate::was_mapped`]) maps a window of it at once, as the kernel's fault-around and
    /// readahead do: from the faulting page on, as many pages as are mapped just below it (at
    /// least [`FAULT_AROUND`], at most [`FAULT_AROUND_MAX`]), each shared and remembered, and
    /// within the mapping (`room` bytes from `addr`). A host that walks its working set takes
    /// a handful of faults per 2 MiB; one that touches a page takes one.
    pub(super) fn serve_host_fault(
        &self,
        space: &Space,
        addr: u64,
        offset: u64,
        room: u64,
        minor: bool,
    ) {
        let ps = PAGE_SIZE as usize;
        let mut gate = self.gate();
        let page = offset / PAGE_SIZE;
        if offset >= self.size || gate.attrs.is_private(page) {
            if poison(space, addr, ps) {
                if space.own {
                    // Untracked (no memory for the record), the marker stays past a
                    // conversion to shared: refused, never granted.
                    let _ = gate.own_markers.try_insert(page);
                } else {
                    gate.markers.insert((page, space.id, addr));
                }
            }
            let _ = space.uffd.wake(addr, PAGE_SIZE);
            return;
        }
        if self.hand_out(offset, PAGE_SIZE).is_err() {
            // The access gets SIGBUS, as the kernel's fault does when the removal fails: a
            // marker, retried while another thread's unmap is in flight (without it the
            // faulter's retry would be served afresh, and succeed).
            if poison(space, addr, ps) {
                gate.sigbus.insert((page, space.id, addr));
                self.failure_markers
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            let _ = space.uffd.wake(addr, PAGE_SIZE);
            return;
        }
        if space.own && self.may_release() {
            if let Some(guard) = self.guard() {
                let (block, baddr) = block_of(addr, offset);
                if gate.released.get(&(block, baddr)).is_some() {
                    // A fault here: the block was registered in the guard's modes at the time
                    // (by a fork's prepare handler, a conversion's fail-closed step, or a
                    // partial failure), or the fault was queued before the release. Either
                    // way it is known as guarded from now on and released again below, if it
                    // may be: never only woken (a block registered but recorded as released
                    // made its faulting thread loop for ever: found in review).
                    self.forget_released(&mut gate, block, baddr);
                }
                if self.try_release(&mut gate, guard, block, baddr) {
                    // The retry is the kernel's fault: one PMD for the whole block.
                    let _ = space.uffd.wake(addr, PAGE_SIZE);
                    return;
                }
            }
        }
        // What is mapped is recorded first, whether or not the call gets to it: a call that
        // stops part-way (a page of the window left the file) has mapped the pages before it,
        // a conversion to private replaces only the pages counted elsewhere and, with
        // `HostPages::Replace`, here (found in review: the faulting page stayed mapped,
        // uncounted). A record that cannot be made (no memory) is a refusal: SIGBUS.
        let mut end = page + 1;
        if minor && space.own {
            end = self.fault_around_end(&gate, page, room);
        }
        let recorded = if space.own {
            gate.exposed
                .try_insert_range(page, end)
                .or_else(|_| {
                    end = page + 1;
                    gate.exposed.try_insert(page)
                })
                .is_ok()
        } else {
            gate.elsewhere.try_insert(page).is_ok()
        };
        if !recorded {
            let _ = poison(space, addr, ps);
            let _ = space.uffd.wake(addr, PAGE_SIZE);
            return;
        }
        if space.own {
            // A hint: what stays remembered is only mapped again if shared.
            let _ = gate.was_mapped.try_move_range(page, end, None);
        }
        let mapped = if minor {
            space
                .uffd
                .continue_page(addr, (end - page) * PAGE_SIZE)
                .or_else(|e| {
                    // A page of the window had an entry already, or left the file: the faulting
                    // page alone (the first of the window) decides.
                    if end > page + 1 {
                        space.uffd.continue_page(addr, PAGE_SIZE)
                    } else {
                        Err(e)
                    }
                })
        } else if self.options.folio_size == super::FolioSize::Huge
            && self.allocate_blocks(page, page + 1).is_ok()
        {
            // A page the file does not hold yet, in a file of huge folios: its 2 MiB block
            // was allocated whole (one folio where the kernel can), and the page is mapped.
            space
                .uffd
                .continue_page(addr, PAGE_SIZE)
                .or_else(|_| space.uffd.zeropage(addr, PAGE_SIZE))
        } else {
            // A page the file does not hold yet: a new zeroed one (EEXIST if it arrived since
            // the fault: map that one).
            space
                .uffd
                .zeropage(addr, PAGE_SIZE)
                .or_else(|_| space.uffd.continue_page(addr, PAGE_SIZE))
        };
        if mapped.is_err() {
            let _ = space.uffd.wake(addr, PAGE_SIZE);
        }
    }

    /// Whether this file's blocks may be released to the kernel's faults in this process's
    /// host mappings: huge folios, host pages zapped (with `HostPages::Replace` every page
    /// the host maps must be counted), and not NO_DIRECT_MAP (every host page is handed out
    /// at its fault).
    pub(super) fn may_release(&self) -> bool {
        self.options.folio_size == super::FolioSize::Huge
            && self.options.host_pages == super::HostPages::Zap
            && !self.no_direct_map()
    }

    /// *Releases* block `block` of the file at `baddr` of this process's host mappings
    /// (under the gate): if the block is wholly shared, wholly in the file, and mapped whole
    /// and 2 MiB-aligned there, the guard stops checking its faults
    /// ([`Guard::release_own_block`]) and the kernel maps it with one PMD, as it maps a huge
    /// folio of a guest_memfd. It is guarded again first by a conversion to private of any
    /// page of it ([`Inner::reguard_released`]), by the library's `mremap` of its mapping, by
    /// an unmap or remap event touching it ([`Inner::released_moved`]), and by the fork
    /// *prepare* handler, so that a fork child inherits it guarded
    /// ([`super::guard::reguard_for_fork`]; a raw `clone` child, which runs no handler, does
    /// not inherit it: `MADV_DONTFORK`). Released at a guard fault, and by a conversion to
    /// shared for the first block of each run the host had mapped huge
    /// ([`Inner::release_first_blocks`]). Only this process's mappings: other address
    /// spaces are served at 4 KiB. False: nothing changed.
    pub(super) fn try_release(
        &self,
        gate: &mut Gate,
        guard: &Guard,
        block: u64,
        baddr: usize,
    ) -> bool {
        let (first, end) = (block * super::HUGE_PAGES, (block + 1) * super::HUGE_PAGES);
        let (boff, len) = (block * super::HUGE_SIZE, super::HUGE_SIZE);
        // Not while the library remaps the mapping; not past the VMA budget (a released
        // block splits its mapping like a hole).
        if gate.no_release
            || !super::vma_budget::room(1, false)
            || baddr % super::HUGE_SIZE as usize != 0
            || boff + len > self.size
            || !gate.attrs.range_is(first, end, false)
            || !guard.own_maps(self, baddr, len as usize, boff)
            || !guard.kernel_maps(baddr, len as usize, self.ino, boff)
        {
            return false;
        }
        // Wholly in the file (a page the kernel's fault would allocate is allocated here, as
        // every allocation of a block is: whole). Its first data run, without a list.
        let mut first_run = None;
        let _ = sys::for_each_data_run(
            std::os::fd::AsFd::as_fd(&self.memfd),
            boff,
            boff + len,
            |s, e| {
                first_run.get_or_insert((s, e));
            },
        );
        let whole = first_run.is_some_and(|(s, e)| s <= boff && e >= boff + len);
        // Not while a fork is under way (its prepare handler guarded every released block
        // for the child; one released now would be missing there): the server never waits
        // for the fork lock, it only tries it.
        let Ok(_no_fork) = super::fork::FORK_LOCK.try_read() else {
            return false;
        };
        // Nor while an event read is not yet handled: a fork's, whose child may hold copies of
        // the block's 4 KiB entries that `forked_from` must count from `exposed`, which a
        // release clears (found in review). Checked under the fork lock: a fork whose event is
        // not read yet still holds it, and no fork starts while it is held here.
        if guard.events_pending() {
            return false;
        }
        if !whole {
            return false;
        }
        // Recorded first (a conversion to shared releases blocks past its point of no
        // return: without memory for the records, the block stays guarded), and forgotten
        // again if the release fails (no allocation).
        if gate.released.try_insert((block, baddr), ()).is_err() {
            return false;
        }
        let Ok(replaced) = super::guard::note_released(baddr, self.ino, boff) else {
            gate.released.remove(&(block, baddr));
            return false;
        };
        // Set before the release is tried: a release that fails part-way may leave the block
        // unregistered where a raw `mremap` moved it, and the next conversion to private's
        // fail-closed step (`register_own_file`, only for files that released a block) is
        // what registers it wherever it went (found in review; pre-existing: it was set only
        // on success).
        gate.ever_released = true;
        if guard.release_own_block(baddr).is_err() {
            gate.released.remove(&(block, baddr));
            super::guard::restore_released(baddr, replaced);
            return false;
        }
        gate.was_released.remove(&(block, baddr));
        gate.charge_released();
        // Its entries were zapped, and the kernel's are not inherited (`MADV_DONTFORK`): not
        // counted as mapped here until it is guarded again (a fork's `forked_from` would
        // count them as mapped in the child, and their conversion would replace them,
        // splitting the folio) — unless another host mapping of this process maps part of
        // the block: `exposed` is per page, not per mapping, and that mapping's entries are
        // a fork child's too (found in review).
        // (Kept whole if a run cannot be cut: on the safe side, see `host_to_private`.)
        if !guard.own_maps_elsewhere(self, baddr, boff, boff + len) {
            let _ = gate.exposed.try_move_range(first, end, None);
        }
        let _ = gate.was_mapped.try_move_range(first, end, None);
        true
    }

    /// Guards again every released block with a page in `runs` (bytes), before a conversion
    /// to private zaps them (under the gate): registered in the guard's modes first, so a
    /// fault after the zap is checked. Err: the blocks that could not be registered stay
    /// released and the conversion fails (nothing of it has changed yet).
    fn reguard_released(
        &self,
        gate: &mut Gate,
        guard: &Guard,
        runs: &[(u64, u64)],
    ) -> KernelResult<Vec<Block>> {
        if gate.released.is_empty() {
            return Ok(Vec::new());
        }
        // Collected fallibly: ENOMEM, nothing changed.
        let mut hit: Vec<(u64, usize)> = Vec::new();
        for ((b, a), ()) in gate.released.iter() {
            let (bs, be) = (b * super::HUGE_SIZE, (b + 1) * super::HUGE_SIZE);
            if runs.iter().any(|&(s, e)| s < be && bs < e) {
                hit.try_reserve(1).map_err(|_| Errno::ENOMEM)?;
                hit.push((b, a));
            }
        }
        self.reguard_blocks(gate, guard, &mut hit)?;
        Ok(hit)
    }

    /// Guards again the released blocks `hit` (under the gate): one registration for each
    /// run of blocks adjacent in the file and in memory (a 1 GiB run is one call, not 512),
    /// where the kernel maps that run as recorded (a block whose mapping has gone meanwhile is
    /// only forgotten; the conversion's fail-closed step registers whatever the record holds);
    /// then they are forgotten as released. Every block is registered, also one a fork's
    /// prepare handler guarded already (idempotent; "not in the process-wide table" must not
    /// be read as "guarded": found in review).
    fn reguard_blocks(
        &self,
        gate: &mut Gate,
        guard: &Guard,
        hit: &mut [Block],
    ) -> KernelResult<()> {
        let hs = super::HUGE_SIZE as usize;
        hit.sort_unstable_by_key(|&(_, a)| a);
        let mut i = 0;
        while i < hit.len() {
            let mut j = i + 1;
            while j < hit.len() && hit[j].1 == hit[j - 1].1 + hs && hit[j].0 == hit[j - 1].0 + 1 {
                j += 1;
            }
            let (b0, a0) = hit[i];
            // Counted as mapped here before they are guarded (`forget_released` then adds
            // nothing, so allocates nothing): without memory, ENOMEM with these blocks still
            // released, never a guarded block a fork would not count.
            let pages = (
                b0 * super::HUGE_PAGES,
                (b0 + (j - i) as u64) * super::HUGE_PAGES,
            );
            gate.exposed
                .try_insert_range(pages.0, pages.1)
                .map_err(|_| Errno::ENOMEM)?;
            if guard.kernel_maps(a0, (j - i) * hs, self.ino, b0 * super::HUGE_SIZE) {
                guard.reguard_own(a0, (j - i) * hs)?;
                for &(b, a) in &hit[i..j] {
                    self.forget_released(gate, b, a);
                }
            } else {
                // Each on its own, forgotten as soon as it is registered (a failure part-way
                // must not leave a registered block recorded as released: found in review).
                for &(b, a) in &hit[i..j] {
                    if guard.kernel_maps(a, hs, self.ino, b * super::HUGE_SIZE) {
                        guard.reguard_own(a, hs)?;
                    }
                    self.forget_released(gate, b, a);
                }
            }
            i = j;
        }
        Ok(())
    }

    /// The released blocks of this process's host mapping `[addr, addr + len)` are forgotten
    /// (the library is about to unmap it): not at the unmap's event, which a fork could come
    /// before (its prepare handler would register whatever is mapped there by then).
    pub(super) fn released_unmapped_now(&self, addr: usize, len: usize) {
        let mut gate = self.gate();
        let gone: Vec<Block> = gate
            .released
            .iter()
            .map(|(k, ())| k)
            .filter(|&(_, a)| a >= addr && a < addr.saturating_add(len))
            .collect();
        for (b, a) in gone {
            gate.released.remove(&(b, a));
            super::guard::note_guarded(a, self.ino);
        }
        gate.was_released
            .retain(|&(_, a), ()| !(a >= addr && a < addr.saturating_add(len)));
        gate.charge_released();
    }

    /// Forgets every block of this file recorded as released (the file goes).
    pub(super) fn forget_all_released(&self) {
        let mut gate = self.gate();
        for ((_, a), ()) in gate.released.iter() {
            super::guard::note_guarded(a, self.ino);
        }
        gate.released.clear();
        gate.was_released.clear();
        gate.charge_released();
    }

    /// Block `block` at `baddr` is guarded (again): no longer released, and counted as mapped
    /// here (the kernel mapped any page of it; a fork now copies those entries).
    fn forget_released(&self, gate: &mut Gate, block: u64, baddr: usize) {
        gate.released.remove(&(block, baddr));
        gate.charge_released();
        super::guard::note_guarded(baddr, self.ino);
        gate.exposed
            .insert_range(block * super::HUGE_PAGES, (block + 1) * super::HUGE_PAGES);
    }

    /// Guards again the released blocks of this process's host mapping `[addr, addr + len)`
    /// (before the library moves or resizes it: a mapping with a released block is several
    /// VMAs, which `mremap` refuses to move as one).
    pub(super) fn reguard_mapping(&self, addr: usize, len: usize) -> KernelResult<()> {
        let Some(guard) = self.guard() else {
            return Ok(());
        };
        let mut gate = self.gate();
        // No release until the library's `mremap` is done ([`Inner::release_allowed_again`]).
        gate.no_release = true;
        let hs = super::HUGE_SIZE as usize;
        let mut hit: Vec<(u64, usize)> = gate
            .released
            .iter()
            .map(|(k, ())| k)
            .filter(|&(_, a)| a < addr.saturating_add(len) && addr < a + hs)
            .collect();
        self.reguard_blocks(&mut gate, guard, &mut hit)
    }

    /// The library's `mremap` of a host mapping is done: blocks may be released again.
    pub(super) fn release_allowed_again(&self) {
        if self.guard().is_some() {
            self.gate().no_release = false;
        }
    }

    /// After an `munmap` (`to` None) or `mremap` of `[from, from + len)` in this process
    /// (the guard's events): a released block it touched is guarded again wherever a part
    /// of it is still mapped — at the old address, and, moved, at the new one where the
    /// record still holds it — and forgotten (an `munmap` then a mapping of something else
    /// there would otherwise be registered later). A part that cannot be registered keeps
    /// the block recorded as released, so a conversion to private tries again (and fails).
    pub(super) fn released_moved(&self, guard: &Guard, from: u64, len: u64, to: Option<u64>) {
        let mut gate = self.gate();
        let (Ok(from), Ok(len)) = (usize::try_from(from), usize::try_from(len)) else {
            return;
        };
        let end = from.saturating_add(len);
        let hs = super::HUGE_SIZE as usize;
        gate.was_released
            .retain(|&(_, a), ()| !(a < end && from < a + hs));
        let hit: Vec<(u64, usize)> = gate
            .released
            .iter()
            .map(|(k, ())| k)
            .filter(|&(_, a)| a < end && from < a + hs)
            .collect();
        for (b, a) in hit {
            if super::guard::released_state(a, self.ino) != Some(false) {
                // Guarded by a fork's prepare handler already: moved or unmapped as any
                // guarded mapping.
                self.forget_released(&mut gate, b, a);
                continue;
            }
            let boff = b * super::HUGE_SIZE;
            // Registered again wherever the kernel still maps a part of the block as it was:
            // the part left at the old address (a partial unmap or move, or all of it after
            // `MREMAP_DONTUNMAP`, which leaves the old mapping in place: found in review), and
            // the moved part at its new one. Only there: what else is mapped at these
            // addresses by now is not registered.
            let mut ok = true;
            let mut again = |at: usize, n: usize, off: u64| {
                if n > 0 && guard.kernel_maps(at, n, self.ino, off) {
                    ok &= guard.reguard_own(at, n).is_ok();
                }
            };
            again(a, hs, boff);
            if a < from {
                again(a, from - a, boff);
            }
            if end < a + hs {
                again(end, a + hs - end, boff + (end - a) as u64);
            }
            if let Some(to) = to.and_then(|t| usize::try_from(t).ok()) {
                let (ms, me) = (a.max(from), (a + hs).min(end));
                again(to + (ms - from), me - ms, boff + (ms - a) as u64);
            }
            if ok {
                self.forget_released(&mut gate, b, a);
            }
        }
    }

    /// A fork of an address space that maps this file: the child has a copy of its
    /// page-table entries. From this process (`own`), every page mapped here is now mapped
    /// elsewhere too; from another space, its pages are in `elsewhere` already.
    pub(super) fn forked_from(&self, own: bool) {
        if !own {
            return;
        }
        let mut gate = self.gate();
        // Blocks the prepare handler guarded again before this fork: the child inherited
        // their entries, so they count as mapped here (and so elsewhere, below). One it could
        // not guard stayed released, and the child has nothing there.
        let guarded: Vec<(u64, usize)> = gate
            .released
            .iter()
            .map(|(k, ())| k)
            .filter(|&(_, a)| super::guard::released_state(a, self.ino) != Some(false))
            .collect();
        for (b, a) in guarded {
            self.forget_released(&mut gate, b, a);
        }
        let pages = self.size / PAGE_SIZE;
        let gate = &mut *gate;
        for (a, b) in gate.exposed.runs_in(0, pages) {
            gate.elsewhere.insert_range(a, b);
        }
    }

    /// A fork of address space `parent` made `child`, which got copies of the parent's
    /// poison markers (the page-table entries of its write-protect-armed host mappings were
    /// copied): record them as the child's, so that a conversion to shared replaces them by
    /// the page. `ranges` are the parts of the parent's mappings of this file the child
    /// inherited (address, file offset, length); in this process the markers are kept by
    /// page, elsewhere by address.
    pub(super) fn markers_forked(
        &self,
        parent_own: bool,
        parent: u64,
        child: u64,
        ranges: &[(usize, u64, usize)],
    ) {
        let mut gate = self.gate();
        let inherited = |a: u64| {
            ranges
                .iter()
                .any(|&(s, _, l)| (s as u64..s as u64 + l as u64).contains(&a))
        };
        let mut copies: Vec<(u64, u64, u64)> = Vec::new();
        if parent_own {
            for &(addr, offset, len) in ranges {
                let (first, end) = pages_of(offset, len as u64);
                for (a, b) in gate.own_markers.runs_in(first, end) {
                    for p in a..b {
                        copies.push((p, child, addr as u64 + (p * PAGE_SIZE - offset)));
                    }
                }
            }
        } else {
            copies.extend(
                gate.markers
                    .iter()
                    .filter(|m| m.1 == parent && inherited(m.2))
                    .map(|&(p, _, a)| (p, child, a)),
            );
        }
        gate.markers.extend(copies);
        let failed: Vec<(u64, u64, u64)> = gate
            .sigbus
            .iter()
            .filter(|m| m.1 == parent && inherited(m.2))
            .map(|&(p, _, a)| (p, child, a))
            .collect();
        gate.sigbus.extend(failed);
    }

    /// `mremap` in another address space `space` moved `[from, from + len)` to `to`: the
    /// markers recorded there moved with their page-table entries. (A destination that was
    /// mapped was unmapped first, with an event of its own.)
    pub(super) fn markers_moved(&self, space: u64, from: u64, to: u64, len: u64) {
        let end = from.saturating_add(len);
        let to_end = to.saturating_add(len);
        let mut gate = self.gate();
        let gate = &mut *gate;
        for set in [&mut gate.markers, &mut gate.sigbus] {
            // Whatever was recorded at the destination went (unmapped, with an event of its
            // own that may not have been handled yet).
            set.retain(|m| {
                m.1 != space || !(to..to_end).contains(&m.2) || (from..end).contains(&m.2)
            });
            let moved: Vec<(u64, u64, u64)> = set
                .iter()
                .filter(|m| m.1 == space && (from..end).contains(&m.2))
                .copied()
                .collect();
            for m in &moved {
                set.remove(m);
            }
            set.extend(moved.iter().map(|m| (m.0, space, m.2 - from + to)));
        }
    }

    /// `[start, end)` of another address space `space` was unmapped: the markers recorded
    /// there went with it.
    pub(super) fn markers_unmapped(&self, space: u64, start: u64, end: u64) {
        let mut gate = self.gate();
        let gate = &mut *gate;
        for set in [&mut gate.markers, &mut gate.sigbus] {
            set.retain(|m| m.1 != space || !(start..end).contains(&m.2));
        }
    }

    /// The end (page, exclusive) of the fault-around window from `page` (see
    /// [`Inner::serve_host_fault`]): `page + 1` unless `page` is in the remembered working
    /// set.
    fn fault_around_end(&self, gate: &Gate, page: u64, room: u64) -> u64 {
        if !gate.was_mapped.contains(page) {
            return page + 1;
        }
        let want = gate
            .exposed
            .run_below(page, FAULT_AROUND_MAX)
            .max(FAULT_AROUND);
        let limit = (page + want)
            .min(page + (room / PAGE_SIZE).max(1))
            .min(self.size / PAGE_SIZE);
        let mut end = page + 1;
        while end < limit && gate.was_mapped.contains(end) && !gate.attrs.is_private(end) {
            end += 1;
        }
        end
    }

    /// A conversion's host side, to private, for the changing runs (bytes) of the file:
    /// under the gate, zap this process's host mappings, replace the pages mapped in another
    /// address space, then record the new attributes in the gate. On failure nothing is
    /// recorded (pages zapped here fault back in as shared).
    pub(super) fn host_to_private(&self, runs: &[(u64, u64)]) -> KernelResult<()> {
        let Some(guard) = self.guard() else {
            return Err(Errno::EOPNOTSUPP);
        };
        guard.flush();
        let mut gate = self.gate();
        // The nodes recording the attributes take, past the point of no return (one update).
        gate.attrs.try_reserve().map_err(|_| Errno::ENOMEM)?;
        // A released block is guarded again before anything of the conversion is done, and
        // (fail closed) every host mapping of the file over the runs is registered in the
        // guard's modes, whatever the bookkeeping of released blocks missed.
        let reguarded = self.reguard_released(&mut gate, guard, runs)?;
        if gate.ever_released {
            for &(s, e) in runs {
                guard.register_own_file(self, s, e)?;
            }
        }
        let replace_own = self.options.host_pages == super::HostPages::Replace;
        if !replace_own {
            for &(s, e) in runs {
                // DONTNEED on a shared mapping drops PTEs (and markers) only, never data.
                guard.zap_own(self, s, e, || self.fail_after.injected_failure())?;
            }
        }
        for &(s, e) in runs {
            let (first, end) = pages_of(s, e - s);
            // The pages mapped anywhere leave the file (a punch zaps them in every process);
            // the others have no page-table entry to zap, only markers, which stay right.
            // The runs of both sets in order, a run at a time (no list is allocated).
            let mut from = first;
            loop {
                let elsewhere = gate.elsewhere.first_in(from, end);
                let here = if replace_own {
                    gate.exposed.first_in(from, end)
                } else {
                    None
                };
                let (a, b) = match (elsewhere, here) {
                    (Some(p), Some(q)) => std::cmp::min_by_key(p, q, |r| r.0),
                    (Some(p), None) | (None, Some(p)) => p,
                    (None, None) => break,
                };
                self.fail_after.injected_failure()?;
                self.replace_pages(&mut gate, a, b)?;
                from = b;
            }
        }
        let remember = !self.no_direct_map();
        for &(s, e) in runs {
            let (first, end) = pages_of(s, e - s);
            // Past the point of no return: nothing here may fail. A set that cannot take
            // pages out (no memory to split a run or stretch) keeps them, which for these is
            // on the safe side (`elsewhere`, `exposed`: more pages replaced later; `was_mapped`:
            // a hint checked against the attributes).
            let _ = gate.elsewhere.try_remove_range(first, end);
            let gate = &mut *gate;
            // The working set is what was mapped in this shared period: pages remembered
            // before it and not touched since are forgotten.
            let _ = gate.was_mapped.try_move_range(first, end, None);
            let to = remember.then_some(&mut gate.was_mapped);
            let _ = gate.exposed.try_move_range(first, end, to);
        }
        // Markers left on private pages stay: the pages are private again. One update over
        // the runs' span (the pages between them are private already): what the reserve
        // covers by the store's own test (an update per run splits nodes only at the
        // request's ends too, but that takes an argument).
        if let Some((first, end)) = span_pages(runs, &gate.attrs, true) {
            gate.attrs.set_range(first, end, true);
        }
        // The blocks released in this shared period are the working set at 2 MiB; those
        // remembered from before it and not released since are forgotten.
        let in_runs = |&(b, _): &Block| {
            let (bs, be) = (b * super::HUGE_SIZE, (b + 1) * super::HUGE_SIZE);
            runs.iter().any(|&(s, e)| s < be && bs < e)
        };
        gate.was_released.retain(|b, ()| !in_runs(b));
        for block in reguarded {
            // A hint (the block is released again at its first guard fault otherwise).
            let _ = gate.was_released.try_insert(block, ());
        }
        Ok(())
    }

    /// A conversion's host side, to shared: clear this process's markers (`MADV_DONTNEED` on
    /// the pages that have one), record the attributes in the gate, map this process's
    /// working set again and map the pages over the markers left in another address space.
    /// `Err` (ENOMEM for the reserve, or from this process's zap) only before the attributes
    /// are recorded: nothing to put back.
    ///
    /// `platform_to_shared` runs under the gate once nothing can fail any more, before any
    /// page is mapped back: host faults on the range wait for it (gmem's views, through which
    /// it works, are never registered with the guard: nothing under the gate waits for a
    /// fault).
    pub(super) fn host_to_shared(
        &self,
        runs: &[(u64, u64)],
        platform_to_shared: &mut dyn FnMut(),
    ) -> KernelResult<()> {
        let Some(guard) = self.guard() else {
            return Err(Errno::EOPNOTSUPP);
        };
        guard.flush();
        let mut gate = self.gate();
        gate.attrs.try_reserve().map_err(|_| Errno::ENOMEM)?;
        // This process's markers go first (the only step that can fail: then nothing has
        // changed); no fault is served meanwhile, the gate being held.
        for &(s, e) in runs {
            let (first, end) = pages_of(s, e - s);
            let mut from = first;
            while let Some((a, b)) = gate.own_markers.first_in(from, end) {
                from = b;
                guard.zap_own(self, a * PAGE_SIZE, b * PAGE_SIZE, || {
                    self.fail_after.injected_failure()
                })?;
            }
        }
        // One update over the runs' span (the pages between them are shared already).
        if let Some((first, end)) = span_pages(runs, &gate.attrs, false) {
            gate.attrs.set_range(first, end, false);
        }
        for &(s, e) in runs {
            let (first, end) = pages_of(s, e - s);
            // Without memory to split a stretch of them, the marks stay: a later conversion
            // to shared zaps those pages again (nothing there to zap).
            let _ = gate.own_markers.try_remove_range(first, end);
        }
        // Past the last failure, before anything is mapped back: the platform's content rule.
        platform_to_shared();
        // The first block of each run that the host had mapped huge when it was made private
        // is released again at once (best effort: a block not released faults through the
        // guard, which releases it); the others at their first guard fault.
        if !gate.was_released.is_empty() {
            self.release_first_blocks(&mut gate, guard, runs);
        }
        // The first page of each run of the host's working set comes back at once (best
        // effort: a page not mapped here faults through the guard as any other); the rest
        // stays remembered, for the fault-around of the guard's next fault there. Only for
        // runs no longer than the fault-around's largest window: there the premap spares the
        // host the run's one guard fault (≈ 46 µs against ≈ 1 µs); a longer run takes several
        // guard faults to walk anyway, and its premap — the first `UFFDIO_CONTINUE` after a
        // large zap allocates a page table again, 13–20 µs — doubled the conversion of 1 GiB.
        for &(s, e) in runs {
            let (first, end) = pages_of(s, e - s);
            let mut from = first;
            while let Some((a, b)) = gate.was_mapped.first_in(from, end) {
                from = b;
                // The run within this conversion (a long run remembered from conversions of
                // its pieces one by one still gets its first page back when one comes back).
                if b - a > FAULT_AROUND_MAX {
                    continue;
                }
                // Counted as mapped here first (with `HostPages::Replace` only counted pages
                // are replaced); a page that cannot be counted (no memory) is not mapped.
                if gate.exposed.try_insert(a).is_err() {
                    continue;
                }
                guard.premap_own(self, a * PAGE_SIZE, (a + 1) * PAGE_SIZE);
                let _ = gate.was_mapped.try_move_range(a, a + 1, None);
            }
        }
        let elsewhere = !gate.markers.is_empty();
        drop(gate);
        if elsewhere {
            self.map_over_markers(guard, runs, Markers::Private);
        }
        Ok(())
    }

    /// Releases again, at a conversion to shared of `runs` (bytes), the first block of each
    /// run that was released when it was last made private ([`Gate::was_released`]), as the
    /// first page of each run of the 4 KiB working set is mapped back: the host's next touch
    /// is then the kernel's PMD fault, not a guard fault (≈ 46 µs here) that releases it.
    /// One per run: releasing every block at every conversion to shared made the 1 GiB
    /// round trip 6.6× instead of 110× faster than with 4 KiB folios.
    fn release_first_blocks(&self, gate: &mut Gate, guard: &Guard, runs: &[(u64, u64)]) {
        for &(s, e) in runs {
            // In order of block: the first found is the first of the run.
            let first = gate
                .was_released
                .iter()
                .map(|(k, ())| k)
                .find(|&(b, _)| b * super::HUGE_SIZE >= s && (b + 1) * super::HUGE_SIZE <= e);
            if let Some((block, baddr)) = first {
                gate.was_released.remove(&(block, baddr));
                self.try_release(gate, guard, block, baddr);
            }
        }
    }

    /// Maps the file's pages over the markers of kind `which` left in other address spaces
    /// on pages of `runs` (bytes), and forgets them (`UFFDIO_CONTINUE` at the recorded
    /// address; `UFFDIO_ZEROPAGE` if the file lost the page). Called without the gate.
    ///
    /// A marker is recorded by address, and `UFFDIO_CONTINUE` maps whatever page the mapping
    /// at that address holds *now*: a process that moved a mapping of a private page there
    /// would get that page (found in review). So each space's markers are
    /// mapped with its events held ([`Guard::hold`]) after every event read before is handled
    /// ([`Guard::flush`]; an `munmap` or `mremap` there moves or drops the recorded markers):
    /// the record is then what the space maps, and a change still in flight makes the kernel
    /// answer EAGAIN, after which the hold is let go, the event handled, and the space tried
    /// again (for about 10 ms; a marker that cannot be replaced by then is forgotten, and
    /// that process keeps SIGBUS on the page: refused, never granted).
    ///
    /// Past a conversion's point of no return: its lists are allocated fallibly, and without
    /// memory for them the markers stay (refused, never granted; a later conversion of the
    /// page tries again). A page that cannot be counted in `elsewhere` is not mapped, and its
    /// marker is forgotten as one not replaced in time is.
    fn map_over_markers(&self, guard: &Guard, runs: &[(u64, u64)], which: Markers) {
        let in_runs = |gate: &Gate, space: Option<u64>| -> Result<Vec<(u64, u64, u64)>, NoMemory> {
            let set = match which {
                Markers::Private => &gate.markers,
                Markers::FailedHandOut => &gate.sigbus,
            };
            let mut out = Vec::new();
            for &(s, e) in runs {
                let (first, end) = pages_of(s, e - s);
                for &m in set.range((first, 0, 0)..(end, 0, 0)) {
                    if space.is_none_or(|id| m.1 == id) {
                        out.try_reserve(1)?;
                        out.push(m);
                    }
                }
            }
            Ok(out)
        };
        let Ok(mut spaces) = in_runs(&self.gate(), None) else {
            return;
        };
        spaces.sort_unstable_by_key(|m| m.1);
        spaces.dedup_by_key(|m| m.1);
        for id in spaces.into_iter().map(|m| m.1) {
            let space = guard.space(id);
            for _ in 0..1000 {
                let hold = space.as_ref().and_then(|sp| guard.hold(sp));
                guard.flush();
                let mut gate = self.gate();
                let mut again = false;
                let Ok(entries) = in_runs(&gate, Some(id)) else {
                    return;
                };
                for entry in entries {
                    // Never a page the gate says is private (a failed hand-out's marker is
                    // cleared after conversions both ways: found in review), a NO_DIRECT_MAP
                    // page only once handed out, as a fault would, and only a page counted
                    // as mapped in another space first (the next conversion to private must
                    // take it away; without memory for that, not mapped).
                    let allowed = !gate.attrs.is_private(entry.0)
                        && (which == Markers::Private
                            || self.hand_out(entry.0 * PAGE_SIZE, PAGE_SIZE).is_ok())
                        && gate.elsewhere.try_insert(entry.0).is_ok();
                    let mapped = match (&space, &hold) {
                        (Some(sp), Some(_)) if allowed => map_over(sp, entry.2),
                        _ => Err(Errno::EINVAL),
                    };
                    if mapped == Err(Errno::EAGAIN) {
                        again = true;
                        break;
                    }
                    match which {
                        Markers::Private => gate.markers.remove(&entry),
                        Markers::FailedHandOut => gate.sigbus.remove(&entry),
                    };
                }
                drop(gate);
                drop(hold);
                if !again {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_micros(10));
            }
            let mut gate = self.gate();
            let Ok(entries) = in_runs(&gate, Some(id)) else {
                return;
            };
            for entry in entries {
                match which {
                    Markers::Private => gate.markers.remove(&entry),
                    Markers::FailedHandOut => gate.sigbus.remove(&entry),
                };
            }
        }
    }

    /// Pages `[first, end)` leave the file (punch-hole): the punch unmaps them from every
    /// process, so none is mapped anywhere any more, and none is to be mapped again at the
    /// next conversion to shared.
    pub(super) fn forget_mapped(&self, first: u64, end: u64) {
        let mut gate = self.gate();
        // A run set that cannot cut a run (no memory) keeps it whole: safe for both (see
        // `host_to_private`), and the punch zaps every page anyway.
        let _ = gate.exposed.try_move_range(first, end, None);
        let _ = gate.elsewhere.try_remove_range(first, end);
        let _ = gate.was_mapped.try_move_range(first, end, None);
    }

    /// Clears the markers failed hand-outs left on pages `[first, end)` (they leave the file or
    /// change hands): this process's with `MADV_DONTNEED`, another space's by mapping over it.
    pub(super) fn clear_failure_markers(&self, first: u64, end: u64) {
        let Some(guard) = self.guard() else {
            return;
        };
        // None was ever left (a flag, no lock): the common case.
        if !self
            .failure_markers
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return;
        }
        if self
            .gate()
            .sigbus
            .range((first, 0, 0)..(end, 0, 0))
            .next()
            .is_none()
        {
            return;
        }
        guard.flush();
        {
            let mut gate = self.gate();
            // Collected fallibly (past a conversion's point of no return): without memory the
            // markers stay, refused, never granted.
            let mut own: Vec<(u64, u64, u64)> = Vec::new();
            for &entry in gate.sigbus.range((first, 0, 0)..(end, 0, 0)) {
                if entry.1 == guard.own.id {
                    if own.try_reserve(1).is_err() {
                        return;
                    }
                    own.push(entry);
                }
            }
            for entry in own {
                gate.sigbus.remove(&entry);
                if let Ok(a) = usize::try_from(entry.2) {
                    guard.zap_own_page(self, a);
                }
            }
        }
        self.map_over_markers(
            guard,
            &[(first * PAGE_SIZE, end * PAGE_SIZE)],
            Markers::FailedHandOut,
        );
    }

    /// Replaces pages `[first, end)` of the file by new ones with the same content, so that
    /// no address space maps the old ones any more and no reference to them reaches the
    /// file: the content is held by reference first (`vmsplice` of the guest view into the
    /// gate's pipe: writes up to the zap land in it), the pages are punched out (zapped in
    /// every process), and the content is written back. A step at a time (what the pipe
    /// holds, 1 MiB where the kernel allows). A failure before a step's punch changes nothing
    /// of it; after it, the write-back is retried (it needs memory for the new pages) until
    /// it succeeds.
    fn replace_pages(&self, gate: &mut Gate, first: u64, end: u64) -> KernelResult<()> {
        if self.options.folio_size == super::FolioSize::Huge {
            return self.replace_blocks(first, end);
        }
        let mut in_use = InUse(Some(match gate.pipe.take() {
            Some(p) => p,
            None => super::fork::private_pipe()?,
        }));
        self.replace_through(&mut in_use, first, end)?;
        gate.pipe = in_use.0.take();
        Ok(())
    }

    /// [`Inner::replace_pages`] for a file of huge folios, a whole 2 MiB block at a time: a
    /// punch of part of a folio that a pipe holds cannot split it, and zeroes that part of
    /// the very folio the pipe holds (found in review: the write-back wrote zeros). So every
    /// page of each block is held (in as many pipes as that takes), the block is punched
    /// whole (the folio leaves the file, unchanged), and everything is written back.
    fn replace_blocks(&self, first: u64, end: u64) -> KernelResult<()> {
        let pages = self.size / PAGE_SIZE;
        let mut b = first - first % super::HUGE_PAGES;
        while b < end {
            let block_end = (b + super::HUGE_PAGES).min(pages);
            let fd = std::os::fd::AsFd::as_fd(&self.memfd);
            let mut held: Vec<(InUse, u64, usize)> = Vec::new();
            let (mut off, stop) = (b * PAGE_SIZE, block_end * PAGE_SIZE);
            while off < stop {
                let pipe = InUse(Some(super::fork::private_pipe()?));
                let Some(p) = pipe.0.as_ref() else {
                    return Err(Errno::EBADF);
                };
                let want = usize::try_from(stop - off).unwrap_or(usize::MAX);
                let n = p.hold_file(fd, off, want)?;
                if n == 0 {
                    return Err(Errno::EAGAIN);
                }
                held.try_reserve(1).map_err(|_| Errno::ENOMEM)?;
                held.push((pipe, off, n));
                off += n as u64;
            }
            // A failure before the punch changes nothing (the pipes go with what they hold).
            sys::fallocate(
                fd,
                crate::uapi::FALLOC_FL_PUNCH_HOLE | crate::uapi::FALLOC_FL_KEEP_SIZE,
                b * PAGE_SIZE,
                stop - b * PAGE_SIZE,
            )?;
            // The new pages: one 2 MiB folio again where the kernel can give one.
            let _ = self.allocate_blocks(b, block_end);
            for (pipe, off, n) in &held {
                let Some(p) = pipe.0.as_ref() else { continue };
                let mut done = 0usize;
                let mut delay = std::time::Duration::from_micros(100);
                while p.release_into_file(fd, *off, *n, &mut done).is_err() {
                    // Out of memory for the new pages: the content waits in the pipe.
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(std::time::Duration::from_millis(100));
                }
            }
            b = block_end;
        }
        Ok(())
    }

    /// Replaces pages `[first, end)` through the pipe `in_use` holds, a pipe's worth at a
    /// time (4 KiB folios: a punch of part of what is held splits nothing).
    fn replace_through(&self, in_use: &mut InUse, first: u64, end: u64) -> KernelResult<()> {
        let Some(pipe) = in_use.0.as_ref() else {
            return Err(Errno::EBADF);
        };
        let fd = std::os::fd::AsFd::as_fd(&self.memfd);
        let (mut off, end) = (first * PAGE_SIZE, end * PAGE_SIZE);
        while off < end {
            let want = usize::try_from(end - off).unwrap_or(usize::MAX);
            let held = pipe.hold_file(fd, off, want)?;
            // A failure changes nothing (the pipe goes with what it holds).
            sys::fallocate(
                fd,
                crate::uapi::FALLOC_FL_PUNCH_HOLE | crate::uapi::FALLOC_FL_KEEP_SIZE,
                off,
                held as u64,
            )?;
            let mut done = 0usize;
            let mut delay = std::time::Duration::from_micros(100);
            while pipe.release_into_file(fd, off, held, &mut done).is_err() {
                // Out of memory for the new pages: the content waits in the pipe.
                std::thread::sleep(delay);
                delay = (delay * 2).min(std::time::Duration::from_millis(100));
            }
            off += held as u64;
        }
        Ok(())
    }
}

/// A replacement pipe in use: closed (a private descriptor: forgotten first) if dropped with
/// whatever it may still hold; put back in the gate only empty.
struct InUse(Option<sys::HoldPipe>);

impl Drop for InUse {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            super::fork::close_private_pipe(p);
        }
    }
}
