//! An ordered map whose every allocation is fallible, for the host side's page sets
//! ([`super::page_state::RunSet`], [`super::page_state::PageSet`]), which change on
//! conversion paths: std's `BTreeMap` aborts the process when a node cannot be allocated, and
//! a conversion must answer ENOMEM (or, past its point of no return, keep a record that errs
//! on the safe side) instead.
//!
//! Sorted chunks of at most [`CHUNK`] entries, each allocated with room for all of them: an
//! insert into a chunk with room allocates nothing, a full chunk splits in two (one fallible
//! allocation), and a removal never allocates. Lookups are two binary searches: O(log n).

use std::collections::TryReserveError;

/// Entries per chunk (16 bytes each for `u64` keys and values: 1 KiB chunks).
const CHUNK: usize = 64;

/// The ordered map; see the module's documentation.
#[derive(Debug)]
pub(super) struct ChunkMap<K, V> {
    /// Non-empty, sorted, each with capacity [`CHUNK`]; every key of a chunk is below every
    /// key of the next.
    chunks: Vec<Vec<(K, V)>>,
}

impl<K, V> ChunkMap<K, V> {
    /// An empty map (allocates nothing; usable in a `static`).
    pub(super) const fn new() -> Self {
        ChunkMap { chunks: Vec::new() }
    }
}

impl<K, V> Default for ChunkMap<K, V> {
    fn default() -> Self {
        ChunkMap::new()
    }
}

impl<K: Ord + Copy, V: Copy> ChunkMap<K, V> {
    /// Whether the map holds no entry.
    pub(super) fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// The number of entries (O(chunks)).
    pub(super) fn len(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    /// Index of the chunk that holds `key` or would: the last whose first key is at most
    /// `key`, or the first chunk.
    fn chunk_for(&self, key: &K) -> usize {
        self.chunks
            .partition_point(|c| c.first().is_some_and(|e| e.0 <= *key))
            .saturating_sub(1)
    }

    /// The value at `key`.
    pub(super) fn get(&self, key: &K) -> Option<V> {
        let c = self.chunks.get(self.chunk_for(key))?;
        c.binary_search_by(|e| e.0.cmp(key)).ok().map(|i| c[i].1)
    }

    /// The value at `key`, to change in place.
    pub(super) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let ci = self.chunk_for(key);
        let c = self.chunks.get_mut(ci)?;
        let i = c.binary_search_by(|e| e.0.cmp(key)).ok()?;
        Some(&mut c[i].1)
    }

    /// The entry with the greatest key at most `key`.
    pub(super) fn at_or_below(&self, key: &K) -> Option<(K, V)> {
        let ci = self
            .chunks
            .partition_point(|c| c.first().is_some_and(|e| e.0 <= *key));
        let c = self.chunks.get(ci.checked_sub(1)?)?;
        let i = c.partition_point(|e| e.0 <= *key);
        c.get(i.checked_sub(1)?).copied()
    }

    /// The entry with the least key at least `key`.
    pub(super) fn at_or_above(&self, key: &K) -> Option<(K, V)> {
        let ci = self.chunk_for(key);
        let c = self.chunks.get(ci)?;
        let i = c.partition_point(|e| e.0 < *key);
        match c.get(i) {
            Some(e) => Some(*e),
            None => self.chunks.get(ci + 1).and_then(|n| n.first()).copied(),
        }
    }

    /// Sets `key` to `value`, returning the value it replaces. Allocates only to add a key
    /// to a full chunk (or to an empty map); if that fails, the map is unchanged.
    pub(super) fn try_insert(&mut self, key: K, value: V) -> Result<Option<V>, TryReserveError> {
        if self.chunks.is_empty() {
            self.chunks.try_reserve(1)?;
            let mut c = Vec::new();
            c.try_reserve_exact(CHUNK)?;
            c.push((key, value));
            self.chunks.push(c);
            return Ok(None);
        }
        let ci = self.chunk_for(&key);
        let c = &mut self.chunks[ci];
        let i = match c.binary_search_by(|e| e.0.cmp(&key)) {
            Ok(i) => return Ok(Some(std::mem::replace(&mut c[i].1, value))),
            Err(i) => i,
        };
        if c.len() < CHUNK {
            // Within the chunk's capacity: no allocation.
            c.insert(i, (key, value));
            return Ok(None);
        }
        // Split: the upper half goes to a new chunk after this one.
        self.chunks.try_reserve(1)?;
        let mut upper = Vec::new();
        upper.try_reserve_exact(CHUNK)?;
        let c = &mut self.chunks[ci];
        upper.extend(c.drain(CHUNK / 2..));
        if i <= CHUNK / 2 {
            c.insert(i, (key, value));
        } else {
            upper.insert(i - CHUNK / 2, (key, value));
        }
        self.chunks.insert(ci + 1, upper);
        Ok(None)
    }

    /// Removes `key`, returning its value. Never allocates: an emptied chunk goes, and a
    /// chunk left under a quarter full takes in the next one when both fit in one.
    pub(super) fn remove(&mut self, key: &K) -> Option<V> {
        let ci = self.chunk_for(key);
        let c = self.chunks.get_mut(ci)?;
        let i = c.binary_search_by(|e| e.0.cmp(key)).ok()?;
        let (_, value) = c.remove(i);
        if c.is_empty() {
            self.chunks.remove(ci);
        } else if c.len() < CHUNK / 4
            && self
                .chunks
                .get(ci + 1)
                .is_some_and(|n| n.len() + self.chunks[ci].len() <= CHUNK)
        {
            let next = self.chunks.remove(ci + 1);
            // Within the chunk's capacity (CHUNK): no allocation.
            self.chunks[ci].extend_from_slice(&next);
        }
        Some(value)
    }

    /// Keeps only the entries `keep` accepts (never allocates).
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        for c in &mut self.chunks {
            c.retain(|e| keep(&e.0, &e.1));
        }
        self.chunks.retain(|c| !c.is_empty());
    }

    /// Every entry, in order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (K, V)> + '_ {
        self.chunks.iter().flatten().copied()
    }

    /// Every entry, in order, its value to change in place.
    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (&K, &mut V)> + '_ {
        self.chunks.iter_mut().flatten().map(|e| (&e.0, &mut e.1))
    }

    /// Removes every entry.
    pub(super) fn clear(&mut self) {
        self.chunks.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::ChunkMap;
    use std::collections::BTreeMap;

    /// Random inserts, removals and lookups against std's `BTreeMap`, over key spaces that
    /// make chunks split, empty and merge.
    #[test]
    fn matches_btreemap() {
        let mut x = 0x853c_49e6_748f_ea9bu64;
        let mut rnd = |m: u64| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) % m
        };
        for keys in [8u64, 200, 5_000] {
            let mut m: ChunkMap<u64, u64> = ChunkMap::default();
            let mut model = BTreeMap::new();
            for step in 0..20_000u64 {
                let k = rnd(keys);
                match rnd(8) {
                    0..=3 => {
                        let got = m.try_insert(k, step).expect("allocation");
                        assert_eq!(got, model.insert(k, step), "insert {k}");
                    }
                    4..=5 => assert_eq!(m.remove(&k), model.remove(&k), "remove {k}"),
                    6 => {
                        if let Some(v) = m.get_mut(&k) {
                            *v += 1;
                        }
                        if let Some(v) = model.get_mut(&k) {
                            *v += 1;
                        }
                    }
                    _ => {
                        let r = rnd(keys);
                        m.retain(|&k, _| k != r);
                        model.retain(|&k, _| k != r);
                    }
                }
                assert_eq!(m.get(&k), model.get(&k).copied());
                assert_eq!(
                    m.at_or_below(&k),
                    model.range(..=k).next_back().map(|(a, b)| (*a, *b))
                );
                assert_eq!(
                    m.at_or_above(&k),
                    model.range(k..).next().map(|(a, b)| (*a, *b))
                );
                assert!(m.chunks.iter().all(|c| !c.is_empty() && c.len() <= 64));
                assert!(m.chunks.iter().all(|c| c.capacity() >= 64));
            }
            assert_eq!(m.len(), model.len());
            assert!(m.iter().eq(model.iter().map(|(a, b)| (*a, *b))));
            m.clear();
            assert!(m.is_empty());
        }
    }
}
