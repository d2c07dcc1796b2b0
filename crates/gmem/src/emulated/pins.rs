//! The file's pin table: every reference the file counts on its pages, long-term pins
//! (`pin`, the analogue of `FOLL_LONGTERM` GUP) and the transient references of in-flight
//! accesses (the folio references the kernel's GUP and guest faults hold for an access). A
//! conversion to private answers EAGAIN at the first page any of them covers (docs/series.md
//! §2.4 step 3b); a punch detaches the pages it frees from every long-term pin.
//!
//! A transient reference is taken and dropped on every access, so it costs no allocation: it
//! takes one of [`SLOTS`] fixed slots under a short lock (a bit in a word, two numbers). Only
//! when every slot is busy (more accesses in flight at once than slots) does it go to the map
//! of long-term pins, whose insertion is fallible (ENOMEM, nothing taken).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use crate::error::{Errno, KernelResult};

/// Transient references held at once without an allocation.
const SLOTS: usize = 64;

/// What one entry of the table is, for its release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PinId {
    /// A slot of the fixed table.
    Slot(usize),
    /// An entry of the map (long-term pins, and transient references past the slots).
    Map(u64),
}

#[derive(Debug)]
struct Table {
    /// Bit `i` set: slot `i` holds the page range `slots[i]`.
    busy: u64,
    slots: [(u64, u64); SLOTS],
    /// id → the page ranges still attached to the file (a punch detaches pages).
    map: BTreeMap<u64, Vec<(u64, u64)>>,
    next_id: u64,
}

/// The pin table of one file.
#[derive(Debug)]
pub(super) struct PinTable {
    table: Mutex<Table>,
}

impl Default for PinTable {
    fn default() -> Self {
        PinTable {
            table: Mutex::new(Table {
                busy: 0,
                slots: [(0, 0); SLOTS],
                map: BTreeMap::new(),
                next_id: 1,
            }),
        }
    }
}

impl PinTable {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// References pages `[first, end)` for an access in flight: a free slot, or (all busy)
    /// an entry of the map. ENOMEM if the map cannot grow (nothing taken).
    pub(super) fn take_transient(&self, first: u64, end: u64) -> KernelResult<PinId> {
        let mut t = self.lock();
        if t.busy != u64::MAX {
            let i = t.busy.trailing_ones() as usize;
            t.busy |= 1 << i;
            t.slots[i] = (first, end);
            return Ok(PinId::Slot(i));
        }
        Self::insert(&mut t, first, end)
    }

    /// A long-term pin of pages `[first, end)` (it stays until released, with the pages a
    /// punch frees detached). ENOMEM if the map cannot grow (nothing taken).
    pub(super) fn take_long_term(&self, first: u64, end: u64) -> KernelResult<PinId> {
        Self::insert(&mut self.lock(), first, end)
    }

    fn insert(t: &mut Table, first: u64, end: u64) -> KernelResult<PinId> {
        let mut ranges = Vec::new();
        ranges.try_reserve_exact(1).map_err(|_| Errno::ENOMEM)?;
        ranges.push((first, end));
        let id = t.next_id;
        t.next_id = t.next_id.checked_add(1).ok_or(Errno::ENOMEM)?;
        t.map.insert(id, ranges);
        Ok(PinId::Map(id))
    }

    /// Drops entry `id`.
    pub(super) fn release(&self, id: PinId) {
        let mut t = self.lock();
        match id {
            PinId::Slot(i) => t.busy &= !(1u64 << i),
            PinId::Map(id) => {
                t.map.remove(&id);
            }
        }
    }

    /// The first page of `[first, end)` any entry covers.
    pub(super) fn first_pinned(&self, first: u64, end: u64) -> Option<u64> {
        let t = self.lock();
        let mut busy = t.busy;
        let mut best: Option<u64> = None;
        let mut see = |s: u64, e: u64| {
            if s < end && e > first {
                let p = s.max(first);
                best = Some(best.map_or(p, |b| b.min(p)));
            }
        };
        while busy != 0 {
            let i = busy.trailing_zeros() as usize;
            busy &= busy - 1;
            let (s, e) = t.slots[i];
            see(s, e);
        }
        for &(s, e) in t.map.values().flatten() {
            see(s, e);
        }
        best
    }

    /// Pages `[first, end)` leave the file (punch-hole): long-term pins no longer hold them
    /// (a range around them is cut in two). Transient references end with their access.
    pub(super) fn detach(&self, first: u64, end: u64) {
        let mut t = self.lock();
        for ranges in t.map.values_mut() {
            *ranges = ranges
                .iter()
                .flat_map(|&(s, e)| [(s, e.min(first)), (s.max(end), e)])
                .filter(|(s, e)| s < e)
                .collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{PinId, PinTable, SLOTS};

    /// Slots are reused after release, the map takes over when they are all busy, and the
    /// first pinned page is the lowest covered one across both.
    #[test]
    fn slots_then_map_and_the_first_pinned_page() {
        let t = PinTable::default();
        assert_eq!(t.first_pinned(0, 100), None);
        let ids: Vec<PinId> = (0..SLOTS as u64)
            .map(|i| t.take_transient(10 + i, 11 + i).unwrap())
            .collect();
        assert!(ids.iter().all(|id| matches!(id, PinId::Slot(_))));
        let past = t.take_transient(5, 6).unwrap();
        assert!(matches!(past, PinId::Map(_)), "all slots busy: the map");
        assert_eq!(t.first_pinned(0, 100), Some(5));
        assert_eq!(t.first_pinned(7, 100), Some(10));
        assert_eq!(t.first_pinned(12, 13), Some(12));
        t.release(past);
        t.release(ids[0]);
        assert_eq!(t.first_pinned(0, 100), Some(11));
        assert_eq!(
            t.take_transient(1, 2).unwrap(),
            ids[0],
            "a freed slot is reused"
        );
        assert_eq!(t.first_pinned(0, 100), Some(1));
        for id in ids {
            t.release(id);
        }
        assert_eq!(t.first_pinned(0, 1000), None);
    }

    /// A punch detaches the freed pages from long-term pins, cutting a range in two where
    /// it falls inside.
    #[test]
    fn a_punch_detaches_pages_from_long_term_pins() {
        let t = PinTable::default();
        let a = t.take_long_term(0, 10).unwrap();
        let _b = t.take_long_term(20, 30).unwrap();
        t.detach(3, 6);
        assert_eq!(t.first_pinned(3, 6), None);
        assert_eq!(t.first_pinned(3, 7), Some(6));
        assert_eq!(t.first_pinned(0, 3), Some(0));
        t.detach(0, 25);
        assert_eq!(t.first_pinned(0, 25), None);
        assert_eq!(t.first_pinned(0, 100), Some(25));
        t.release(a);
        assert_eq!(t.first_pinned(0, 100), Some(25));
    }
}
