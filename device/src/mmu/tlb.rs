// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! One engine's TLB (spec/svmgpu.md section 6.9.3): `entries` entries, `ways`-way set
//! associative, tagged by (ASID, virtual page, page size), LRU replacement within a set, or
//! no replacement at all ([`Eviction::Never`], a debugging aid: a forgotten invalidation
//! stays observable). Entries stay until invalidated or evicted, so stale translations are
//! real.
//!
//! A 4 KiB page and a 2 MiB page are indexed by their own page numbers, so a lookup probes
//! the 4 KiB set, then the 2 MiB set.

use svmgpu_spec::{PAGE_SIZE_2M, PAGE_SIZE_4K};
use thiserror::Error;

use super::audit::EntryAudit;
use super::scope::Scope;
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
    /// What the audit found about it (audit mode only).
    pub audit: EntryAudit,
}

impl TlbEntry {
    /// A fresh entry: the translation `leaf` of `asid`, walked at sequence number
    /// `fill_seq`.
    pub fn new(asid: u32, leaf: Leaf, fill_seq: u64) -> Self {
        Self {
            asid,
            leaf,
            fill_seq,
            audit: EntryAudit::default(),
        }
    }

    fn is(&self, asid: u32, page_va: u64, huge: bool) -> bool {
        self.asid == asid && self.leaf.page_va == page_va && self.leaf.huge == huge
    }
}

/// What a new translation does when its set is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Eviction {
    /// It replaces the least recently used entry of the set.
    #[default]
    Lru,
    /// It is not cached (used for its access only): entries leave only by invalidation.
    Never,
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
    eviction: Eviction,
}

impl Tlb {
    /// An empty TLB with LRU replacement.
    pub fn new(entries: u32, ways: u32) -> Result<Self, TlbError> {
        Self::with_eviction(entries, ways, Eviction::Lru)
    }

    /// An empty TLB.
    pub fn with_eviction(entries: u32, ways: u32, eviction: Eviction) -> Result<Self, TlbError> {
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
            eviction,
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

    fn probe(&mut self, base: usize, asid: u32, page_va: u64, huge: bool) -> Option<usize> {
        let ways = self.ways;
        for (i, slot) in self
            .slots
            .get_mut(base..base + ways)?
            .iter_mut()
            .enumerate()
        {
            if slot.entry.is_some_and(|e| e.is(asid, page_va, huge)) {
                self.clock += 1;
                slot.stamp = self.clock;
                return Some(base + i);
            }
        }
        None
    }

    /// The slot of the entry translating `va` in `asid`, if cached (and marks it recently
    /// used).
    #[inline]
    pub fn lookup_slot(&mut self, asid: u32, va: u64) -> Option<usize> {
        let p4 = va & !(PAGE_SIZE_4K - 1);
        let b4 = self.set_index(va >> 12);
        if let Some(i) = self.probe(b4, asid, p4, false) {
            return Some(i);
        }
        let p2 = va & !(PAGE_SIZE_2M - 1);
        let b2 = self.set_index(va >> 21);
        self.probe(b2, asid, p2, true)
    }

    /// The entry translating `va` in `asid`, if cached (and marks it recently used).
    #[inline]
    pub fn lookup(&mut self, asid: u32, va: u64) -> Option<TlbEntry> {
        let i = self.lookup_slot(asid, va)?;
        self.entry(i)
    }

    /// The entry in slot `i`, if any.
    #[inline]
    pub fn entry(&self, i: usize) -> Option<TlbEntry> {
        self.slots.get(i)?.entry
    }

    /// The entry in slot `i`, if any, to update.
    pub fn entry_mut(&mut self, i: usize) -> Option<&mut TlbEntry> {
        self.slots.get_mut(i)?.entry.as_mut()
    }

    /// Every valid entry, to update (audit checks).
    pub fn entries_mut(&mut self) -> impl Iterator<Item = &mut TlbEntry> {
        self.slots.iter_mut().filter_map(|s| s.entry.as_mut())
    }

    /// Drops the entry in slot `i`.
    pub fn remove_slot(&mut self, i: usize) {
        if let Some(s) = self.slots.get_mut(i) {
            s.entry = None;
        }
    }

    /// Caches a translation, replacing the same page's entry, else taking a free way, else
    /// (LRU) replacing the set's least recently used entry. False if it was not cached (a
    /// full set that never evicts).
    pub fn insert(&mut self, e: TlbEntry) -> bool {
        let shift = if e.leaf.huge { 21 } else { 12 };
        let base = self.set_index(e.leaf.page_va >> shift);
        self.clock += 1;
        let stamp = self.clock;
        let Some(set) = self.slots.get_mut(base..base + self.ways) else {
            return false;
        };
        let same = set.iter().position(|s| {
            s.entry
                .is_some_and(|x| x.is(e.asid, e.leaf.page_va, e.leaf.huge))
        });
        let mut victim = same.or_else(|| set.iter().position(|s| s.entry.is_none()));
        if victim.is_none() && self.eviction == Eviction::Lru {
            victim = set
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.stamp)
                .map(|(i, _)| i);
        }
        match victim.and_then(|i| set.get_mut(i)) {
            Some(slot) => {
                *slot = Slot {
                    entry: Some(e),
                    stamp,
                };
                true
            }
            None => false,
        }
    }

    /// Drops the entry for exactly this page, if cached (a permission upgrade re-walks).
    pub fn remove(&mut self, asid: u32, leaf: &Leaf) {
        let shift = if leaf.huge { 21 } else { 12 };
        let base = self.set_index(leaf.page_va >> shift);
        let ways = self.ways;
        if let Some(set) = self.slots.get_mut(base..base + ways) {
            for s in set {
                if s.entry.is_some_and(|x| x.is(asid, leaf.page_va, leaf.huge)) {
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
        TlbEntry::new(asid, leaf(page_va, huge), 0)
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
    fn never_evicting_keeps_entries_until_invalidated() {
        let mut t = Tlb::with_eviction(4, 4, Eviction::Never).unwrap();
        for i in 0..4 {
            assert!(t.insert(entry(0, i << 12, false)));
        }
        // The set is full: the fifth page is not cached and nothing is evicted.
        assert!(!t.insert(entry(0, 4 << 12, false)));
        assert!(t.lookup(0, 4 << 12).is_none());
        for i in 0..4 {
            assert!(t.lookup(0, i << 12).is_some(), "page {i} kept");
        }
        // Re-filling a cached page still replaces it; an invalidation makes room.
        assert!(t.insert(entry(0, 2 << 12, false)));
        assert_eq!(
            t.invalidate(Scope::Range {
                asid: 0,
                start: 0,
                end: 0x1000
            }),
            1
        );
        assert!(t.insert(entry(0, 4 << 12, false)));
        assert!(t.lookup(0, 4 << 12).is_some());
    }

    #[test]
    fn slots_and_audit_state() {
        let mut t = Tlb::new(16, 4).unwrap();
        t.insert(entry(1, 0x3000, false));
        let i = t.lookup_slot(1, 0x3abc).unwrap();
        assert_eq!(t.entry(i).unwrap().leaf.page_va, 0x3000);
        t.entry_mut(i).unwrap().audit.covered = true;
        assert!(t.lookup(1, 0x3000).unwrap().audit.covered);
        assert_eq!(t.entries_mut().count(), 1);
        t.remove_slot(i);
        assert!(t.lookup_slot(1, 0x3000).is_none());
        assert!(t.entry(i).is_none() && t.entry(999).is_none());
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
