// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! One engine's TLB (spec/svmgpu.md section 10.3): `entries` entries, `ways`-way set
//! associative, tagged by (ASID, virtual page, page size), LRU replacement within a set.
//! Entries stay until invalidated or evicted, so stale translations are real.
//!
//! A 4 KiB page and a 2 MiB page are indexed by their own page numbers, so a lookup probes
//! the 4 KiB set, then the 2 MiB set.

use svmgpu_spec::{PAGE_SIZE_2M, PAGE_SIZE_4K};
use thiserror::Error;

use super::walker::Leaf;

/// Errors creating a TLB.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum TlbError {
    /// Zero entries or ways, or entries not a multiple of ways.
    #[error("a TLB of {entries} entries cannot be {ways}-way set associative")]
    Geometry {
        /// Entries.
        entries: u32,
        /// Ways.
        ways: u32,
    },
}

/// One cached translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbEntry {
    /// ASID tag.
    pub asid: u32,
    /// The leaf it caches.
    pub leaf: Leaf,
    /// The device's invalidation sequence number when the walk that filled it started
    /// (audit mode: an invalidation accepted later covers a translation older than itself).
    pub fill_seq: u64,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    entry: Option<TlbEntry>,
    /// LRU stamp: larger is more recent.
    stamp: u64,
}

/// A set-associative, ASID-tagged TLB.
#[derive(Debug)]
pub struct Tlb {
    slots: Vec<Slot>,
    ways: usize,
    sets: u64,
    /// `sets - 1` when `sets` is a power of two (a mask instead of a division).
    set_mask: Option<u64>,
    clock: u64,
}

/// What an invalidation covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every entry.
    All,
    /// Every entry of one ASID.
    Asid(u32),
    /// Entries of one ASID whose page intersects `[start, end)`.
    Range {
        /// ASID.
        asid: u32,
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
}

impl Scope {
    /// True if the scope covers `e`.
    pub fn covers(&self, asid: u32, leaf: &Leaf) -> bool {
        match *self {
            Scope::All => true,
            Scope::Asid(a) => a == asid,
            Scope::Range {
                asid: a,
                start,
                end,
            } => {
                a == asid && leaf.page_va < end && leaf.page_va.saturating_add(leaf.size()) > start
            }
        }
    }
}

impl Tlb {
    /// An empty TLB.
    pub fn new(entries: u32, ways: u32) -> Result<Self, TlbError> {
        if entries == 0 || ways == 0 || entries % ways != 0 {
            return Err(TlbError::Geometry { entries, ways });
        }
        let sets = u64::from(entries / ways);
        Ok(Self {
            slots: vec![
                Slot {
                    entry: None,
                    stamp: 0
                };
                entries as usize
            ],
            ways: ways as usize,
            sets,
            set_mask: sets.is_power_of_two().then(|| sets - 1),
            clock: 0,
        })
    }

    fn set_index(&self, vpn: u64) -> usize {
        // Fold in the ASID-independent high bits so that equal low bits of distant regions
        // do not always collide.
        let h = vpn ^ (vpn >> 17);
        let set = match self.set_mask {
            Some(m) => h & m,
            None => h % self.sets,
        };
        // set < sets <= entries, which fits usize.
        set as usize * self.ways
    }

    fn probe(&mut self, base: usize, asid: u32, page_va: u64, huge: bool) -> Option<TlbEntry> {
        let ways = self.ways;
        for slot in self.slots.get_mut(base..base + ways)? {
            if let Some(e) = slot.entry {
                if e.asid == asid && e.leaf.page_va == page_va && e.leaf.huge == huge {
                    self.clock += 1;
                    slot.stamp = self.clock;
                    return Some(e);
                }
            }
        }
        None
    }

    /// The entry translating `va` in `asid`, if cached (and marks it recently used).
    #[inline]
    pub fn lookup(&mut self, asid: u32, va: u64) -> Option<TlbEntry> {
        let p4 = va & !(PAGE_SIZE_4K - 1);
        let b4 = self.set_index(va >> 12);
        if let Some(e) = self.probe(b4, asid, p4, false) {
            return Some(e);
        }
        let p2 = va & !(PAGE_SIZE_2M - 1);
        let b2 = self.set_index(va >> 21);
        self.probe(b2, asid, p2, true)
    }

    /// Caches a translation, replacing the same page's entry or the set's least recently
    /// used one.
    pub fn insert(&mut self, e: TlbEntry) {
        let shift = if e.leaf.huge { 21 } else { 12 };
        let base = self.set_index(e.leaf.page_va >> shift);
        self.clock += 1;
        let stamp = self.clock;
        let Some(set) = self.slots.get_mut(base..base + self.ways) else {
            return;
        };
        let same = set.iter().position(|s| {
            s.entry.is_some_and(|x| {
                x.asid == e.asid && x.leaf.page_va == e.leaf.page_va && x.leaf.huge == e.leaf.huge
            })
        });
        let victim = same
            .or_else(|| set.iter().position(|s| s.entry.is_none()))
            .or_else(|| {
                set.iter()
                    .enumerate()
                    .min_by_key(|(_, s)| s.stamp)
                    .map(|(i, _)| i)
            });
        if let Some(slot) = victim.and_then(|i| set.get_mut(i)) {
            *slot = Slot {
                entry: Some(e),
                stamp,
            };
        }
    }

    /// Drops the entry for exactly this page, if cached (a permission upgrade re-walks).
    pub fn remove(&mut self, asid: u32, leaf: &Leaf) {
        let shift = if leaf.huge { 21 } else { 12 };
        let base = self.set_index(leaf.page_va >> shift);
        let ways = self.ways;
        if let Some(set) = self.slots.get_mut(base..base + ways) {
            for s in set {
                if s.entry.is_some_and(|x| {
                    x.asid == asid && x.leaf.page_va == leaf.page_va && x.leaf.huge == leaf.huge
                }) {
                    s.entry = None;
                }
            }
        }
    }

    /// Drops every entry `scope` covers; returns how many.
    pub fn invalidate(&mut self, scope: Scope) -> u64 {
        let mut n = 0;
        for s in &mut self.slots {
            if s.entry.is_some_and(|e| scope.covers(e.asid, &e.leaf)) {
                s.entry = None;
                n += 1;
            }
        }
        n
    }

    /// Entries currently valid.
    pub fn occupancy(&self) -> usize {
        self.slots.iter().filter(|s| s.entry.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(page_va: u64, huge: bool) -> Leaf {
        Leaf {
            page_va,
            pa: page_va ^ 0x1_0000_0000,
            huge,
            writable: true,
            executable: true,
        }
    }

    fn entry(asid: u32, page_va: u64, huge: bool) -> TlbEntry {
        TlbEntry {
            asid,
            leaf: leaf(page_va, huge),
            fill_seq: 0,
        }
    }

    #[test]
    fn geometry() {
        assert!(Tlb::new(0, 1).is_err());
        assert!(Tlb::new(8, 0).is_err());
        assert!(Tlb::new(10, 4).is_err());
        assert!(Tlb::new(12, 4).is_ok()); // 3 sets: modulo indexing
        assert!(Tlb::new(1, 1).is_ok());
    }

    #[test]
    fn hit_miss_and_tags() {
        let mut t = Tlb::new(64, 4).unwrap();
        assert_eq!(t.lookup(1, 0x5000), None);
        t.insert(entry(1, 0x5000, false));
        assert_eq!(t.lookup(1, 0x5fff).unwrap().leaf.page_va, 0x5000);
        assert_eq!(t.lookup(2, 0x5000), None, "ASID tagged");
        assert_eq!(t.lookup(1, 0x6000), None);
        t.insert(entry(1, 0x20_0000, true));
        assert!(t.lookup(1, 0x3f_ffff).unwrap().leaf.huge);
        // Re-inserting the same page replaces it.
        t.insert(entry(1, 0x5000, false));
        assert_eq!(t.occupancy(), 2);
        t.remove(1, &leaf(0x5000, false));
        assert_eq!(t.lookup(1, 0x5000), None);
    }

    #[test]
    fn lru_eviction_within_a_set() {
        // One set of 4 ways: the fifth page evicts the least recently used.
        let mut t = Tlb::new(4, 4).unwrap();
        for i in 0..4 {
            t.insert(entry(0, i << 12, false));
        }
        assert!(t.lookup(0, 0).is_some()); // page 0 now most recent
        t.insert(entry(0, 4 << 12, false));
        assert!(t.lookup(0, 0).is_some());
        assert!(t.lookup(0, 1 << 12).is_none(), "page 1 was the LRU");
        assert_eq!(t.occupancy(), 4);
    }

    #[test]
    fn invalidation_scopes() {
        let mut t = Tlb::new(256, 8).unwrap();
        for i in 0..16u64 {
            t.insert(entry(1, i << 12, false));
            t.insert(entry(2, i << 12, false));
        }
        t.insert(entry(1, 0x40_0000, true));
        let r = Scope::Range {
            asid: 1,
            start: 0x4000,
            end: 0x6000,
        };
        assert_eq!(t.invalidate(r), 2);
        assert!(t.lookup(1, 0x4000).is_none() && t.lookup(1, 0x6000).is_some());
        assert!(t.lookup(2, 0x4000).is_some());
        // A range inside a 2 MiB page covers it.
        let r = Scope::Range {
            asid: 1,
            start: 0x41_0000,
            end: 0x41_1000,
        };
        assert_eq!(t.invalidate(r), 1);
        assert_eq!(t.invalidate(Scope::Asid(2)), 16);
        assert_eq!(t.invalidate(Scope::All), 14);
        assert_eq!(t.occupancy(), 0);
    }
}
