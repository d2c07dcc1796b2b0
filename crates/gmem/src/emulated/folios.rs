//! Huge folios ([`FolioSize::Huge`]): each 2 MiB block of the file is allocated whole, as one
//! shmem THP folio, and its order is what the kernel's `kvm_gmem_get_pfn` reports as
//! `max_order`.
//!
//! Allocation. The kernel's shmem allocates a 2 MiB folio for a fault in a 2 MiB-aligned
//! mapping that asks for one (`MADV_HUGEPAGE`, with `shmem_enabled` `advise` or more) when the
//! block holds no page yet; `write(2)` and `fallocate(2)` have no mapping to ask with, and a
//! host fault is served by `UFFDIO_ZEROPAGE`, which allocates 4 KiB. So every path that
//! would allocate a page of such a file first allocates its whole block through a mapping of
//! it (`MADV_POPULATE_WRITE` over the block: zero-filled, as a new page is), and the guest
//! view and the direct map are mapped 2 MiB-aligned with `MADV_HUGEPAGE`, so their own faults
//! allocate huge too. Where the kernel cannot give a huge folio (fragmented memory, a block
//! partly present), it gives 4 KiB ones: nothing depends on the folio being huge but the
//! order reported.
//!
//! Split and merge. Host mappings are exact to 4 KiB whatever the folio (the guard maps 4 KiB
//! entries of it). The guest view maps a huge folio with one PMD; a conversion of part of it
//! zaps that PMD (a file THP's PMD is zapped whole, never split into PTEs), and the next guest
//! access maps it with one PMD again — the guest's stage 2 at 4 KiB for a mixed folio is
//! KVM's choice, reported by [`EmulatedGuestMemfd::max_order`]. A punch of part of a block
//! splits the folio (shmem's truncation does), and the block is 4 KiB folios until it is
//! punched whole and allocated again.
//!
//! The order is not recorded: it is asked of the kernel when wanted (the block mapped afresh,
//! then `PAGEMAP_SCAN`'s `PAGE_IS_HUGE`), so it is right after any split, whoever allocated
//! the block. (A fresh mapping, because a view that once mapped the block with 4 KiB entries
//! keeps its page table, and maps even a 2 MiB folio with 4 KiB entries there.)

use super::{EmulatedGuestMemfd, FolioSize, Inner, GUEST_VIEW_FLAGS, HUGE_ORDER, HUGE_PAGES};
use crate::error::{Errno, KernelResult};
use crate::sys::PAGE_SIZE;
use std::os::fd::AsFd;

impl Inner {
    /// The 2 MiB blocks overlapping pages `[first, end)`, as page ranges.
    fn blocks(&self, first: u64, end: u64) -> impl Iterator<Item = (u64, u64)> {
        let last = (self.size / PAGE_SIZE).min(end);
        let start = first - first % HUGE_PAGES;
        (start..last)
            .step_by(HUGE_PAGES as usize)
            .map(|b| (b, b + HUGE_PAGES))
    }

    /// With huge folios: allocates every 2 MiB block overlapping pages `[first, end)` that
    /// holds no page yet, whole (one huge folio where the kernel can give one), through a
    /// mapping of the block made for the purpose. Nothing to do for a file of 4 KiB folios.
    pub(super) fn allocate_blocks(&self, first: u64, end: u64) -> KernelResult<()> {
        if self.options.folio_size != FolioSize::Huge {
            return Ok(());
        }
        for (b, e) in self.blocks(first, end) {
            if !self.present_pages(b, e).is_empty() {
                continue;
            }
            self.block_view(b, libc::MADV_POPULATE_WRITE)?;
        }
        Ok(())
    }

    /// Maps the 2 MiB block from page `b` afresh (2 MiB-aligned, `MADV_HUGEPAGE`: a new VMA,
    /// with no page table left by earlier 4 KiB mappings), applies `advice` to it, and
    /// answers whether the block is then mapped with one huge entry; the mapping goes.
    fn block_view(&self, b: u64, advice: libc::c_int) -> KernelResult<bool> {
        let len = (HUGE_PAGES * PAGE_SIZE) as usize;
        // Private, as gmem's views are: never inherited by a fork child.
        let view = crate::mapping::map_view(
            self.memfd.as_fd(),
            b * PAGE_SIZE,
            len,
            GUEST_VIEW_FLAGS,
            true,
            true,
        )?;
        view.madvise(0, len, advice)?;
        view.is_huge_mapped(0, len)
    }

    /// The order of the folio holding page `index`: 9 for a 2 MiB folio, else 0 (a page not
    /// allocated has no folio: 0).
    pub(super) fn folio_order(&self, index: u64) -> KernelResult<u8> {
        if self.options.folio_size != FolioSize::Huge || index >= self.size / PAGE_SIZE {
            return Ok(0);
        }
        let b = index - index % HUGE_PAGES;
        if self.present_pages(b, b + HUGE_PAGES).len() as u64 != HUGE_PAGES {
            return Ok(0);
        }
        // Every page is present: a fresh mapping of the block allocates nothing, and maps it
        // with one PMD exactly when its folio is one 2 MiB folio.
        Ok(if self.block_view(b, libc::MADV_POPULATE_READ)? {
            HUGE_ORDER
        } else {
            0
        })
    }
}

impl EmulatedGuestMemfd {
    /// The size of the folios behind the file.
    pub fn folio_size(&self) -> FolioSize {
        self.inner.options.folio_size
    }

    /// The order of the folio holding page `index` (9: a 2 MiB folio; 0: a 4 KiB one, or no
    /// page yet), asked of the kernel now. EINVAL past the file; EOPNOTSUPP in a follower.
    pub fn folio_order(&self, index: u64) -> KernelResult<u8> {
        self.owner_only()?;
        if index >= self.inner.size / PAGE_SIZE {
            return Err(Errno::EINVAL);
        }
        self.inner.folio_order(index)
    }

    /// `kvm_gmem_get_pfn`'s `max_order` for page `index`, as the in-place series has KVM map
    /// it: the folio's order, but 0 when the folio's pages do not all have the same
    /// attribute (a mixed 2 MiB folio is mapped at 4 KiB). [`memslot_max_order`] adds the
    /// memslot's own limits. EINVAL past the file; EOPNOTSUPP in a follower.
    pub fn max_order(&self, index: u64) -> KernelResult<u8> {
        let order = self.folio_order(index)?;
        if order == 0 {
            return Ok(0);
        }
        let b = index - index % HUGE_PAGES;
        let st = self.read_state();
        let private = st.attrs.is_private(b);
        Ok(if st.attrs.range_is(b, b + HUGE_PAGES, private) {
            order
        } else {
            0
        })
    }
}

/// The largest mapping order a memslot's guest frame `gfn` can use, from the file's
/// `max_order` at that page (`file_order`) and the memslot: `base_gfn` and `npages` of the
/// slot, bound at page `first_index` of the file. A 2 MiB mapping needs the whole aligned
/// 2 MiB of guest frames inside the slot, and guest frames and file pages aligned alike
/// (`base_gfn ≡ first_index` modulo 512), as KVM's `kvm_gmem_max_mapping_level` and the
/// memslot's large-page checks ask. 0 for a frame outside the slot.
pub fn memslot_max_order(
    file_order: u8,
    base_gfn: u64,
    npages: u64,
    first_index: u64,
    gfn: u64,
) -> u8 {
    if gfn < base_gfn || gfn - base_gfn >= npages || file_order < HUGE_ORDER {
        return 0;
    }
    let block = gfn - gfn % HUGE_PAGES;
    let inside = block >= base_gfn && block + HUGE_PAGES <= base_gfn.saturating_add(npages);
    let aligned = base_gfn % HUGE_PAGES == first_index % HUGE_PAGES;
    if inside && aligned {
        HUGE_ORDER
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::memslot_max_order;

    /// A 2 MiB mapping only for a frame whose whole aligned 2 MiB is in the slot, with
    /// frames and file pages aligned alike.
    #[test]
    fn the_memslot_limits_the_mapping_order() {
        // Slot of 1024 frames at gfn 512, bound at file page 0.
        assert_eq!(memslot_max_order(9, 512, 1024, 0, 512), 9);
        assert_eq!(memslot_max_order(9, 512, 1024, 0, 1535), 9);
        assert_eq!(
            memslot_max_order(9, 512, 1024, 0, 1536),
            0,
            "outside the slot"
        );
        assert_eq!(memslot_max_order(9, 512, 1024, 0, 511), 0, "below the slot");
        assert_eq!(memslot_max_order(0, 512, 1024, 0, 600), 0, "a 4 KiB folio");
        // Bound at file page 1: frames and pages are not aligned alike.
        assert_eq!(memslot_max_order(9, 512, 1024, 1, 600), 0);
        // A slot of 700 frames at gfn 512: the second block is cut by the slot's end.
        assert_eq!(memslot_max_order(9, 512, 700, 0, 600), 9);
        assert_eq!(memslot_max_order(9, 512, 700, 0, 1100), 0);
        // A slot starting mid-block: the first partial block is 4 KiB.
        assert_eq!(memslot_max_order(9, 100, 2048, 100, 200), 0);
        assert_eq!(memslot_max_order(9, 100, 2048, 100, 600), 9);
    }
}
