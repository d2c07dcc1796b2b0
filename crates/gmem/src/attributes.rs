//! The per-file shared/private attribute store.
//!
//! The kernel keeps one maple-tree entry per run of equal attributes (v7 01/42). gmem keeps a
//! 64-ary radix tree over page indices instead: a slot is either uniform (all shared, all
//! private) or split; the last level is a 4096-page bitmap (512 bytes). Uniform subtrees are
//! collapsed after every update, so the store is as small as the pattern allows:
//!
//! - a uniform file of any size is one slot;
//! - the worst case (every other page private) costs about one bit per page: 1 GiB is 64
//!   leaves, ~33 KiB, i.e. 0.003% of the memory tracked (the maple tree needs ~0.2%);
//! - a lookup walks at most `depth` slots (2 for files up to 1 GiB, 3 up to 64 GiB): O(1) in
//!   the number of fragments, O(log size).
//!
//! Only `KVM_MEMORY_ATTRIBUTE_PRIVATE` exists, so a page's attributes are one bit.

use crate::error::{AccessError, Errno, KernelResult};
use crate::sys::PAGE_SIZE;
use crate::uapi::{flag_names, GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE};

/// log2 of the pages a leaf bitmap covers.
const LEAF_SHIFT: u32 = 12;
/// u64 words in a leaf.
const LEAF_WORDS: usize = 1 << (LEAF_SHIFT - 6);
/// log2 of the fan-out of an inner node.
const FAN_SHIFT: u32 = 6;
const FAN: usize = 1 << FAN_SHIFT;

#[derive(Debug, Clone)]
enum Slot {
    Shared,
    Private,
    Leaf(Box<[u64; LEAF_WORDS]>),
    Inner(Box<[Slot; FAN]>),
}

impl Slot {
    fn uniform(private: bool) -> Slot {
        if private {
            Slot::Private
        } else {
            Slot::Shared
        }
    }

    fn as_uniform(&self) -> Option<bool> {
        match self {
            Slot::Shared => Some(false),
            Slot::Private => Some(true),
            _ => None,
        }
    }
}

/// Word mask for bits `[lo, hi)` of one u64, `hi <= 64`.
fn mask(lo: u32, hi: u32) -> u64 {
    debug_assert!(lo < hi && hi <= 64);
    let high = if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 };
    high & !((1u64 << lo) - 1)
}

/// Calls `f(word_index, mask)` for every word that bits `[s, e)` of a leaf touch.
fn for_words(s: u64, e: u64, mut f: impl FnMut(usize, u64) -> bool) -> bool {
    let mut p = s;
    while p < e {
        // Leaf-local indices are below 4096: the casts are lossless.
        #[allow(clippy::cast_possible_truncation)]
        let (w, lo) = ((p / 64) as usize, (p % 64) as u32);
        let word_end = (p / 64 + 1) * 64;
        let hi_abs = e.min(word_end);
        #[allow(clippy::cast_possible_truncation)]
        let hi = (hi_abs - (p / 64) * 64) as u32;
        if !f(w, mask(lo, hi)) {
            return false;
        }
        p = hi_abs;
    }
    true
}

/// Nodes kept for the next updates, so that an update after
/// [`AttributeStore::try_reserve`] allocates nothing: a conversion records its attributes after
/// the point of no return, where an allocation failure could only abort (issue 11: ENOMEM with
/// nothing changed, never an abort). Nodes that updates free go back while there is room, so
/// alternating conversions reuse the same few nodes instead of allocating and freeing them.
// The boxes move between the reserve and the tree as they are: no copy, no allocation.
#[allow(clippy::vec_box)]
#[derive(Debug, Clone, Default)]
struct Spare {
    leaves: Vec<Box<[u64; LEAF_WORDS]>>,
    inners: Vec<Box<[Slot; FAN]>>,
    /// Nodes an update had to allocate because the reserve was empty (none after
    /// [`AttributeStore::try_reserve`]; tests check it).
    unreserved: u64,
}

impl Spare {
    /// A leaf with every bit `fill` (a kept one, else a new allocation).
    fn leaf(&mut self, fill: u64) -> Box<[u64; LEAF_WORDS]> {
        match self.leaves.pop() {
            Some(mut b) => {
                b.fill(fill);
                b
            }
            None => {
                self.unreserved += 1;
                Box::new([fill; LEAF_WORDS])
            }
        }
    }

    /// An inner node with every child uniform `private`.
    fn inner(&mut self, private: bool) -> Box<[Slot; FAN]> {
        match self.inners.pop() {
            Some(mut b) => {
                b.iter_mut().for_each(|c| *c = Slot::uniform(private));
                b
            }
            None => {
                self.unreserved += 1;
                Box::new(std::array::from_fn(|_| Slot::uniform(private)))
            }
        }
    }

    /// Keeps the nodes of a subtree that leaves the tree, as far as the reserve has room (it
    /// never grows here: pushing below the capacity does not allocate).
    fn recycle(&mut self, slot: Slot) {
        match slot {
            Slot::Shared | Slot::Private => {}
            Slot::Leaf(b) => {
                if self.leaves.len() < self.leaves.capacity() {
                    self.leaves.push(b);
                }
            }
            Slot::Inner(mut children) => {
                // Uniform children hold nothing (the common case: a collapse).
                for c in children.iter_mut().filter(|c| c.as_uniform().is_none()) {
                    let c = std::mem::replace(c, Slot::Shared);
                    self.recycle(c);
                }
                if self.inners.len() < self.inners.capacity() {
                    self.inners.push(children);
                }
            }
        }
    }
}

/// A leaf, allocated fallibly.
fn try_leaf() -> Result<Box<[u64; LEAF_WORDS]>, std::collections::TryReserveError> {
    let mut v: Vec<u64> = Vec::new();
    v.try_reserve_exact(LEAF_WORDS)?;
    v.resize(LEAF_WORDS, 0);
    // Exactly LEAF_WORDS long, and with the capacity reserved exactly, so `into_boxed_slice`
    // keeps the allocation.
    Ok(v.into_boxed_slice()
        .try_into()
        .unwrap_or_else(|_| Box::new([0; LEAF_WORDS])))
}

/// An inner node, allocated fallibly.
fn try_inner() -> Result<Box<[Slot; FAN]>, std::collections::TryReserveError> {
    let mut v: Vec<Slot> = Vec::new();
    v.try_reserve_exact(FAN)?;
    v.resize_with(FAN, || Slot::Shared);
    // As in `try_leaf`.
    Ok(v.into_boxed_slice()
        .try_into()
        .unwrap_or_else(|_| Box::new(std::array::from_fn(|_| Slot::Shared))))
}

/// The attribute of every page of one file.
#[derive(Debug, Clone)]
pub struct AttributeStore {
    npages: u64,
    root: Slot,
    /// log2 of the pages the root covers.
    root_shift: u32,
    spare: Spare,
}

impl AttributeStore {
    /// A store for `npages` pages, all private or all shared.
    pub fn new(npages: u64, private: bool) -> Self {
        let mut root_shift = LEAF_SHIFT;
        while root_shift < 64 && (1u64 << root_shift) < npages {
            root_shift += FAN_SHIFT;
        }
        AttributeStore {
            npages,
            root: Slot::uniform(private),
            root_shift,
            spare: Spare::default(),
        }
    }

    /// Makes sure the next [`AttributeStore::set_range`] allocates nothing: keeps the most
    /// nodes one update can need (a split on each side of the range at every level: two
    /// inner nodes per level and two leaves; at most 14 inner nodes and 2 leaves, about 15 KiB,
    /// for the largest file), allocating what is missing fallibly. Err: not enough memory
    /// (nothing changed in the attributes).
    pub fn try_reserve(&mut self) -> Result<(), std::collections::TryReserveError> {
        let levels = ((self.root_shift - LEAF_SHIFT) / FAN_SHIFT) as usize;
        let (inners, leaves) = (2 * levels, 2usize);
        let sp = &mut self.spare;
        sp.inners
            .try_reserve_exact(inners.saturating_sub(sp.inners.len()))?;
        sp.leaves
            .try_reserve_exact(leaves.saturating_sub(sp.leaves.len()))?;
        while sp.inners.len() < inners {
            sp.inners.push(try_inner()?);
        }
        while sp.leaves.len() < leaves {
            sp.leaves.push(try_leaf()?);
        }
        Ok(())
    }

    /// Number of pages tracked.
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// Whether page `page` is private. Pages past the end count as shared, like a GFN with no
    /// file (docs/series.md §2.1).
    pub fn is_private(&self, page: u64) -> bool {
        if page >= self.npages {
            return false;
        }
        let mut slot = &self.root;
        let mut shift = self.root_shift;
        loop {
            match slot {
                Slot::Shared => return false,
                Slot::Private => return true,
                Slot::Leaf(bits) => {
                    let local = page & ((1 << LEAF_SHIFT) - 1);
                    // local < 4096.
                    #[allow(clippy::cast_possible_truncation)]
                    return bits[(local / 64) as usize] >> (local % 64) & 1 == 1;
                }
                Slot::Inner(children) => {
                    shift -= FAN_SHIFT;
                    // Masked to 6 bits.
                    #[allow(clippy::cast_possible_truncation)]
                    let idx = ((page >> shift) & (FAN as u64 - 1)) as usize;
                    slot = &children[idx];
                }
            }
        }
    }

    /// The attributes of page `page` as the uAPI spells them.
    pub fn get(&self, page: u64) -> u64 {
        if self.is_private(page) {
            KVM_MEMORY_ATTRIBUTE_PRIVATE
        } else {
            0
        }
    }

    /// Gives pages `[start, end)` the attribute `private`.
    pub fn set_range(&mut self, start: u64, end: u64, private: bool) {
        let end = end.min(self.npages);
        if start >= end {
            return;
        }
        set(
            &mut self.root,
            0,
            self.root_shift,
            start,
            end,
            private,
            self.npages,
            &mut self.spare,
        );
    }

    /// Whether every page of `[start, end)` has the attribute `private`.
    pub fn range_is(&self, start: u64, end: u64, private: bool) -> bool {
        self.first_with(start, end, !private).is_none()
    }

    /// The first page of `[start, end)` whose attribute is `private`.
    pub fn first_with(&self, start: u64, end: u64, private: bool) -> Option<u64> {
        let end = end.min(self.npages);
        if start >= end {
            return None;
        }
        first(&self.root, 0, self.root_shift, start, end, private)
    }

    /// The runs of equal attributes that cover `[start, end)`, in order, as
    /// `(first_page, end_page, private)`.
    pub fn runs(&self, start: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let end = end.min(self.npages);
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        if start < end {
            runs(
                &self.root,
                0,
                self.root_shift,
                start,
                end,
                &mut |s, e, p| match out.last_mut() {
                    Some(last) if last.1 == s && last.2 == p => last.1 = e,
                    _ => out.push((s, e, p)),
                },
            );
        }
        out
    }

    /// The runs of `[start, end)` whose attribute is not `private`, in bytes, into `out`
    /// (cleared first): a conversion's changing runs. Grows `out` fallibly, so a caller that
    /// keeps it allocates nothing once it has room (the conversion path keeps one per file).
    pub fn try_runs_unlike(
        &self,
        start: u64,
        end: u64,
        private: bool,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<(), std::collections::TryReserveError> {
        out.clear();
        let end = end.min(self.npages);
        let mut failed = None;
        if start < end {
            runs(
                &self.root,
                0,
                self.root_shift,
                start,
                end,
                &mut |s, e, p| {
                    let (s, e) = (s * PAGE_SIZE, e * PAGE_SIZE);
                    match out.last_mut() {
                        _ if p == private => {}
                        Some(last) if last.1 == s => last.1 = e,
                        _ if failed.is_some() => {}
                        _ => match out.try_reserve(1) {
                            Ok(()) => out.push((s, e)),
                            Err(err) => failed = Some(err),
                        },
                    }
                },
            );
        }
        failed.map_or(Ok(()), Err)
    }

    /// `Err(AccessError::Private)` naming the first private byte of `[offset, offset + len)`.
    pub fn check_shared(&self, offset: u64, len: u64) -> Result<(), AccessError> {
        if len == 0 {
            return Ok(());
        }
        let (first, end) = pages_of(offset, len);
        match self.first_with(first, end, true) {
            Some(page) => Err(AccessError::Private {
                offset: offset.max(page * PAGE_SIZE),
            }),
            None => Ok(()),
        }
    }

    /// The runs of `[offset, offset + len)` in bytes, as `(offset, len, attributes)`; EINVAL if
    /// the range leaves a file of `size` bytes.
    pub fn byte_runs(
        &self,
        offset: u64,
        len: u64,
        size: u64,
    ) -> KernelResult<Vec<(u64, u64, u64)>> {
        match offset.checked_add(len) {
            Some(end) if end <= size => {}
            _ => return Err(Errno::EINVAL),
        }
        let (first, end) = pages_of(offset, len);
        Ok(self
            .runs(first, end)
            .into_iter()
            .map(|(s, e, p)| {
                (
                    s * PAGE_SIZE,
                    (e - s) * PAGE_SIZE,
                    if p { KVM_MEMORY_ATTRIBUTE_PRIVATE } else { 0 },
                )
            })
            .collect())
    }

    /// Number of runs of equal attributes over the whole file (the kernel's maple-tree
    /// entries).
    pub fn fragments(&self) -> usize {
        self.runs(0, self.npages).len()
    }

    /// Bytes of memory the store uses, its own struct included.
    pub fn metadata_bytes(&self) -> usize {
        fn slot_bytes(slot: &Slot) -> usize {
            match slot {
                Slot::Shared | Slot::Private => 0,
                Slot::Leaf(_) => std::mem::size_of::<[u64; LEAF_WORDS]>(),
                Slot::Inner(children) => {
                    std::mem::size_of::<[Slot; FAN]>()
                        + children.iter().map(slot_bytes).sum::<usize>()
                }
            }
        }
        std::mem::size_of::<Self>()
            + slot_bytes(&self.root)
            + self.spare.leaves.len() * std::mem::size_of::<[u64; LEAF_WORDS]>()
            + self.spare.inners.len() * std::mem::size_of::<[Slot; FAN]>()
            + (self.spare.leaves.capacity() + self.spare.inners.capacity())
                * std::mem::size_of::<Box<()>>()
    }
}

/// Indices of the children of a slot at `base` (children of `2^child_shift` pages) that
/// `[s, e)` touches; `s < e`, both inside the slot.
fn child_range(base: u64, child_shift: u32, s: u64, e: u64) -> std::ops::RangeInclusive<usize> {
    // Both quotients are below FAN (64): the casts are lossless.
    #[allow(clippy::cast_possible_truncation)]
    let (a, b) = (
        ((s - base) >> child_shift) as usize,
        ((e - 1 - base) >> child_shift) as usize,
    );
    a..=b
}

/// The pages `[first, end)` that bytes `[offset, offset + len)` touch.
pub fn pages_of(offset: u64, len: u64) -> (u64, u64) {
    (
        offset / PAGE_SIZE,
        offset.saturating_add(len).div_ceil(PAGE_SIZE),
    )
}

/// The checks of a host access that need no attribute: the range must lie inside the file
/// (`size` bytes) and the file must have `GUEST_MEMFD_FLAG_MMAP` (else the host has no access
/// at all). Every backend's safe accessors run this, then [`AttributeStore::check_shared`]
/// under their lock.
pub fn check_host_access(
    offset: u64,
    len: usize,
    size: u64,
    flags: u64,
) -> Result<(), AccessError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => {}
        _ => {
            return Err(AccessError::OutOfBounds {
                offset,
                len: len as u64,
                size,
            })
        }
    }
    if flags & GUEST_MEMFD_FLAG_MMAP == 0 {
        return Err(AccessError::NotMappable {
            flags: flag_names(flags),
        });
    }
    Ok(())
}

/// Sets `[start, end)` in `slot` (which covers `[base, base + 2^shift)`) to `private`; pages
/// at or past `limit` (the file's end) do not exist, so a slot whose existing pages are all
/// covered becomes uniform. New nodes come from `spare` where it holds them, and nodes that
/// leave the tree go back to it.
#[allow(clippy::too_many_arguments)]
fn set(
    slot: &mut Slot,
    base: u64,
    shift: u32,
    start: u64,
    end: u64,
    private: bool,
    limit: u64,
    spare: &mut Spare,
) {
    let span_end = base.saturating_add(1u64 << shift);
    let (s, e) = (start.max(base), end.min(span_end));
    if s >= e {
        return;
    }
    if s == base && e >= span_end.min(limit) {
        spare.recycle(std::mem::replace(slot, Slot::uniform(private)));
        return;
    }
    if slot.as_uniform() == Some(private) {
        return;
    }
    if shift == LEAF_SHIFT {
        if let Some(u) = slot.as_uniform() {
            *slot = Slot::Leaf(spare.leaf(if u { u64::MAX } else { 0 }));
        }
        if let Slot::Leaf(bits) = slot {
            for_words(s - base, e - base, |w, m| {
                if private {
                    bits[w] |= m;
                } else {
                    bits[w] &= !m;
                }
                true
            });
            // Bits of pages past the file's end are don't-care.
            let valid = limit.saturating_sub(base).min(1 << LEAF_SHIFT);
            let uniform_as = |v: u64| {
                if valid == 1 << LEAF_SHIFT {
                    // Every bit is a page of the file: whole words (vectorised).
                    bits.iter().all(|&w| w == v)
                } else {
                    for_words(0, valid, |w, m| bits[w] & m == v & m)
                }
            };
            let collapsed = if uniform_as(0) {
                Some(Slot::Shared)
            } else if uniform_as(u64::MAX) {
                Some(Slot::Private)
            } else {
                None
            };
            if let Some(u) = collapsed {
                spare.recycle(std::mem::replace(slot, u));
            }
        }
        return;
    }
    if let Some(u) = slot.as_uniform() {
        *slot = Slot::Inner(spare.inner(u));
    }
    if let Slot::Inner(children) = slot {
        let child_shift = shift - FAN_SHIFT;
        let touched = child_range(base, child_shift, s, e);
        for i in touched.clone() {
            let child_base = base + ((i as u64) << child_shift);
            set(
                &mut children[i],
                child_base,
                child_shift,
                s,
                e,
                private,
                limit,
                spare,
            );
        }
        // Collapse only if what was touched is now uniform (cheap test first).
        if touched
            .clone()
            .any(|i| children[i].as_uniform() != Some(private))
        {
            return;
        }
        // Children wholly past the file's end are don't-care.
        let live = usize::try_from(limit.saturating_sub(base).div_ceil(1u64 << child_shift))
            .unwrap_or(FAN)
            .min(FAN);
        let first = children[0].as_uniform();
        if first.is_some() && children[..live].iter().all(|c| c.as_uniform() == first) {
            spare.recycle(std::mem::replace(slot, Slot::uniform(first == Some(true))));
        }
    }
}

fn first(slot: &Slot, base: u64, shift: u32, start: u64, end: u64, private: bool) -> Option<u64> {
    let span_end = base.saturating_add(1u64 << shift);
    let (s, e) = (start.max(base), end.min(span_end));
    if s >= e {
        return None;
    }
    match slot {
        Slot::Shared | Slot::Private => (slot.as_uniform() == Some(private)).then_some(s),
        Slot::Leaf(bits) => {
            let mut found = None;
            for_words(s - base, e - base, |w, m| {
                let word = if private { bits[w] } else { !bits[w] };
                let hit = word & m;
                if hit != 0 {
                    found = Some(base + (w as u64) * 64 + u64::from(hit.trailing_zeros()));
                    return false;
                }
                true
            });
            found
        }
        Slot::Inner(children) => {
            let child_shift = shift - FAN_SHIFT;
            child_range(base, child_shift, s, e).find_map(|i| {
                let child_base = base + ((i as u64) << child_shift);
                first(&children[i], child_base, child_shift, s, e, private)
            })
        }
    }
}

fn runs(
    slot: &Slot,
    base: u64,
    shift: u32,
    start: u64,
    end: u64,
    out: &mut dyn FnMut(u64, u64, bool),
) {
    let span_end = base.saturating_add(1u64 << shift);
    let (s, e) = (start.max(base), end.min(span_end));
    if s >= e {
        return;
    }
    match slot {
        Slot::Shared => out(s, e, false),
        Slot::Private => out(s, e, true),
        Slot::Leaf(bits) => {
            let mut p = s;
            while p < e {
                let local = p - base;
                // local < 4096.
                #[allow(clippy::cast_possible_truncation)]
                let v = bits[(local / 64) as usize] >> (local % 64) & 1 == 1;
                let next = first(slot, base, shift, p, e, !v).unwrap_or(e);
                out(p, next, v);
                p = next;
            }
        }
        Slot::Inner(children) => {
            let child_shift = shift - FAN_SHIFT;
            for i in child_range(base, child_shift, s, e) {
                let child_base = base + ((i as u64) << child_shift);
                runs(&children[i], child_base, child_shift, s, e, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trivially correct model: one bool per page.
    fn check(store: &AttributeStore, model: &[bool]) {
        for (i, &p) in model.iter().enumerate() {
            assert_eq!(store.is_private(i as u64), p, "page {i}");
        }
        let mut expect = Vec::new();
        for (i, &p) in model.iter().enumerate() {
            match expect.last_mut() {
                Some((_, e, v)) if *v == p => *e = i as u64 + 1,
                _ => expect.push((i as u64, i as u64 + 1, p)),
            }
        }
        assert_eq!(store.runs(0, model.len() as u64), expect);
        // A conversion's changing runs, over the whole store and a piece of it, into a list
        // that already holds something (it is cleared).
        let n = model.len() as u64;
        let mut got = vec![(1, 1)];
        for (a, b) in [(0, n), (n / 3, (2 * n / 3 + 1).min(n))] {
            for private in [false, true] {
                let mut want: Vec<(u64, u64)> = Vec::new();
                for i in a..b {
                    if model[i as usize] == private {
                        continue;
                    }
                    let (s, e) = (i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
                    match want.last_mut() {
                        Some(last) if last.1 == s => last.1 = e,
                        _ => want.push((s, e)),
                    }
                }
                store
                    .try_runs_unlike(a, b, private, &mut got)
                    .expect("allocation");
                assert_eq!(got, want, "[{a}, {b}) unlike {private}");
            }
        }
    }

    /// After `try_reserve`, an update allocates nothing, whatever the range and the tree it
    /// meets (it runs after a conversion's point of no return); and the results stay right.
    #[test]
    fn an_update_after_try_reserve_allocates_nothing() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        // 1 page to 2^51 pages (the largest file): 1 to 7 inner levels.
        for npages in [1u64, 4096, 4097, 1 << 18, 1 << 30, 1 << 51] {
            let mut s = AttributeStore::new(npages, false);
            for _ in 0..2000 {
                // Mostly small ranges near a few hot spots, sometimes huge ones.
                let start = match rnd(4) {
                    0 => rnd(npages),
                    1 => rnd(64),
                    _ => (npages / 2).saturating_sub(rnd(5000)),
                };
                let len = if rnd(10) == 0 {
                    rnd(npages) + 1
                } else {
                    rnd(9000) + 1
                };
                let end = start.saturating_add(len).min(npages);
                s.try_reserve().expect("reserve");
                let before = s.spare.unreserved;
                let private = rnd(2) == 1;
                s.set_range(start, end, private);
                assert_eq!(
                    s.spare.unreserved, before,
                    "{npages} pages: [{start}, {end})"
                );
                assert!(s.range_is(start, end, private));
            }
        }
        // And against the page-by-page model on a small file.
        let n = 3 * 4096 + 5;
        let mut s = AttributeStore::new(n, true);
        let mut m = vec![true; n as usize];
        for _ in 0..300 {
            let a = rnd(n);
            let b = (a + rnd(5000) + 1).min(n);
            let p = rnd(2) == 0;
            s.try_reserve().expect("reserve");
            s.set_range(a, b, p);
            m[a as usize..b as usize].iter_mut().for_each(|v| *v = p);
        }
        check(&s, &m);
        assert_eq!(s.spare.unreserved, 0);
    }

    #[test]
    fn initial_state() {
        let s = AttributeStore::new(10, true);
        assert!(s.is_private(0) && s.is_private(9));
        assert!(!s.is_private(10), "past the end counts as shared");
        assert_eq!(s.fragments(), 1);
        let s = AttributeStore::new(1 << 40, false);
        assert_eq!(s.fragments(), 1);
        assert!(
            s.metadata_bytes() <= 128,
            "a uniform 4 EiB file is one slot (and the store's fixed fields)"
        );
    }

    #[test]
    fn set_and_collapse() {
        let n = 3 * 4096 + 17;
        let mut s = AttributeStore::new(n, false);
        let mut m = vec![false; n as usize];
        let ops = [
            (0u64, 1u64, true),
            (5, 4200, true),
            (4095, 4097, false),
            (63, 65, false),
            (8000, n, true),
            (0, n, false),
            (12, 13, true),
            (12, 13, false),
        ];
        for (a, b, p) in ops {
            s.set_range(a, b, p);
            for x in &mut m[a as usize..b as usize] {
                *x = p;
            }
            check(&s, &m);
            assert!(s.range_is(a, b, p));
        }
        assert_eq!(s.fragments(), 1);
        assert_eq!(
            s.metadata_bytes(),
            std::mem::size_of::<AttributeStore>(),
            "collapsed back to one slot"
        );
    }

    #[test]
    fn first_with_finds_the_first_page() {
        let mut s = AttributeStore::new(1 << 20, false);
        s.set_range(70_000, 70_001, true);
        s.set_range(900_000, 900_010, true);
        assert_eq!(s.first_with(0, 1 << 20, true), Some(70_000));
        assert_eq!(s.first_with(70_001, 1 << 20, true), Some(900_000));
        assert_eq!(s.first_with(0, 70_000, true), None);
        assert_eq!(s.first_with(70_000, 70_001, false), None);
    }

    #[test]
    fn worst_case_metadata_within_budget() {
        // Every other page private over 1 GiB: 131,072 private fragments.
        let npages = (1u64 << 30) / 4096;
        let mut s = AttributeStore::new(npages, false);
        for p in (0..npages).step_by(2) {
            s.set_range(p, p + 1, true);
        }
        assert_eq!(s.fragments() as u64, npages);
        let bytes = s.metadata_bytes();
        assert!(bytes <= 512 * 1024, "{bytes} bytes");
        // 0.05% of 1 GiB is 536,870 bytes.
        assert!((bytes as f64) / (1u64 << 30) as f64 <= 0.0005);
    }

    #[test]
    fn random_ops_match_model() {
        // A small deterministic LCG keeps the test reproducible without extra crates.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = |m: u64| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) % m
        };
        for &n in &[1u64, 63, 4096, 4097, 70_000] {
            let mut s = AttributeStore::new(n, rnd(2) == 1);
            let mut m = vec![s.is_private(0); n as usize];
            for _ in 0..200 {
                let a = rnd(n);
                let len = if rnd(4) == 0 {
                    rnd(n - a) + 1
                } else {
                    (rnd(100) + 1).min(n - a)
                };
                let p = rnd(2) == 1;
                s.set_range(a, a + len, p);
                for v in &mut m[a as usize..(a + len) as usize] {
                    *v = p;
                }
            }
            check(&s, &m);
        }
    }
}
