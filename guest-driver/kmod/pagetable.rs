// SPDX-License-Identifier: GPL-2.0

//! A VM's device page table: 4 levels of 4 KiB tables in DMA-coherent memory, in the
//! format of spec section 6.9 (`wire::pte`), written only by the driver and read by the
//! device.
//!
//! Locking (see the overview in `svmgpu.rs`): the *structure* (which tables exist) only
//! changes under both the VM lock and the notifier lock; *leaf entries* change under the
//! notifier lock. So a holder of the VM lock may read the structure (to count what
//! [`PageTable::map`] will need, [`PageTable::missing`]) and allocate the missing tables
//! (`GFP_KERNEL`, [`Prealloc::alloc`]) without the notifier lock, then take the notifier
//! lock and [`PageTable::map`] without allocating; the MMU notifier only ever calls
//! [`PageTable::clear`], which neither allocates nor frees. Tables are freed only when the
//! whole page table is dropped (VM destruction, after the ASID was unbound).
//!
//! Every entry is written with one 64-bit volatile store; a new table is zeroed before the
//! entry pointing to it is published, and a mapping is cleared before the TLB
//! invalidation that covers it is started (the caller's part).

use crate::wire::{self, pte};
use kernel::{
    device::{Bound, Device},
    dma::Coherent,
    prelude::*,
};

/// Levels below the root that have tables: 2, 1, 0.
const SUB_LEVELS: usize = 3;
const PAGE: u64 = wire::PAGE_SIZE_4K;

/// Index into the table at `level` for `va` (`va < 2^48`).
pub(crate) fn index(va: u64, level: u32) -> usize {
    pte::index(va, level).unwrap_or(0)
}

/// The VA span of one entry at `level`.
pub(crate) fn span(level: u32) -> u64 {
    pte::level_span(level).unwrap_or(0)
}

/// A 4 KiB leaf for a page at `pa`.
pub(crate) fn leaf(pa: u64, writable: bool) -> Option<u64> {
    pte::page_4k(
        pa,
        pte::Perms {
            writable,
            no_exec: false,
        },
    )
}

/// How many tables of each level (index = level, 0..=2) a mapping of `[va, va + size)`
/// needs in an empty page table: the distinct entries of the level above it spans.
pub(crate) fn tables_spanned(va: u64, size: u64) -> [usize; SUB_LEVELS] {
    let mut out = [0; SUB_LEVELS];
    if size == 0 {
        return out;
    }
    let last = va + size - 1;
    for (level, o) in out.iter_mut().enumerate() {
        // A level-L table covers one entry of level L + 1.
        let shift = 12 + 9 * (level as u32 + 1);
        *o = ((last >> shift) - (va >> shift) + 1) as usize;
    }
    out
}

struct Table {
    mem: Coherent<[u64]>,
    /// Child tables (levels 3..1); empty for level-0 tables.
    children: KVec<Option<KBox<Table>>>,
}

impl Table {
    fn new(dev: &Device<Bound>, level: u32) -> Result<Self> {
        let mem = Coherent::<u64>::zeroed_slice(dev, pte::ENTRIES_PER_TABLE, GFP_KERNEL)?;
        let mut children = KVec::new();
        if level > 0 {
            children.reserve(pte::ENTRIES_PER_TABLE, GFP_KERNEL)?;
            for _ in 0..pte::ENTRIES_PER_TABLE {
                children.push(None, GFP_KERNEL)?;
            }
        }
        Ok(Self { mem, children })
    }

    fn gpa(&self) -> u64 {
        self.mem.dma_address()
    }

    fn set(&self, i: usize, v: u64) {
        if i >= pte::ENTRIES_PER_TABLE {
            return;
        }
        // SAFETY: `i` is within the 512 entries of the allocation; the device only reads
        // the memory, and the CPU writes it only here, under the notifier lock.
        unsafe { core::ptr::write_volatile(self.mem.as_mut_ptr().cast::<u64>().add(i), v) };
    }

    fn get(&self, i: usize) -> u64 {
        if i >= pte::ENTRIES_PER_TABLE {
            return 0;
        }
        // SAFETY: As in `set`.
        unsafe { core::ptr::read_volatile(self.mem.as_ptr().cast::<u64>().add(i)) }
    }
}

/// Tables allocated ahead of a [`PageTable::map`], per level (index = level 0..=2).
pub(crate) struct Prealloc {
    tables: [KVec<KBox<Table>>; SUB_LEVELS],
}

impl Prealloc {
    /// Allocates `counts[l]` tables of level `l` (`GFP_KERNEL`: not under the notifier
    /// lock).
    pub(crate) fn alloc(dev: &Device<Bound>, counts: [usize; SUB_LEVELS]) -> Result<Self> {
        let mut tables = [KVec::new(), KVec::new(), KVec::new()];
        for (level, (v, &n)) in tables.iter_mut().zip(counts.iter()).enumerate() {
            v.reserve(n, GFP_KERNEL)?;
            for _ in 0..n {
                v.push(
                    KBox::new(Table::new(dev, level as u32)?, GFP_KERNEL)?,
                    GFP_KERNEL,
                )?;
            }
        }
        Ok(Self { tables })
    }
}

/// A VM's page table.
pub(crate) struct PageTable {
    root: Table,
}

impl PageTable {
    /// An empty page table (just the root).
    pub(crate) fn new(dev: &Device<Bound>) -> Result<Self> {
        Ok(Self {
            root: Table::new(dev, pte::ROOT_LEVEL)?,
        })
    }

    /// The GPA of the root table, for `ASID_BIND`.
    pub(crate) fn root_gpa(&self) -> u64 {
        self.root.gpa()
    }

    /// The tables of each level [`PageTable::map`] of `[va, va + size)` will add.
    pub(crate) fn missing(&self, va: u64, size: u64) -> [usize; SUB_LEVELS] {
        let mut out = [0; SUB_LEVELS];
        if size > 0 {
            Self::count(Some(&self.root), pte::ROOT_LEVEL, va, va + size, &mut out);
        }
        out
    }

    fn count(t: Option<&Table>, level: u32, va: u64, end: u64, out: &mut [usize; SUB_LEVELS]) {
        if level == 0 {
            return;
        }
        let span = span(level);
        let mut a = va;
        while a < end {
            let next = ((a / span) + 1) * span;
            let child = t.and_then(|t| t.children.get(index(a, level))?.as_deref());
            if child.is_none() {
                out[level as usize - 1] += 1;
            }
            Self::count(child, level - 1, a, next.min(end), out);
            a = next;
        }
    }

    /// Maps `addrs.len()` 4 KiB pages at `va` to the DMA addresses `addrs`, taking missing
    /// tables from `pre`. Never allocates (call it under the notifier lock). Fails with
    /// `ENOMEM` only if `pre` is short (the caller counted with [`PageTable::missing`]
    /// under the same VM lock, so it is not).
    pub(crate) fn map(
        &mut self,
        va: u64,
        addrs: &[u64],
        writable: bool,
        pre: &mut Prealloc,
    ) -> Result {
        for (i, &pa) in addrs.iter().enumerate() {
            let a = va + i as u64 * PAGE;
            let entry = leaf(pa, writable).ok_or(EINVAL)?;
            let mut t = &mut self.root;
            let mut level = pte::ROOT_LEVEL;
            while level > 0 {
                let idx = index(a, level);
                if t.children[idx].is_none() {
                    let new = pre.tables[level as usize - 1].pop().ok_or(ENOMEM)?;
                    let ptr = pte::table(new.gpa()).ok_or(EINVAL)?;
                    t.children[idx] = Some(new);
                    // The new table is zeroed (and nothing points to it yet): publish it.
                    core::sync::atomic::fence(core::sync::atomic::Ordering::Release);
                    t.set(idx, ptr);
                }
                t = t.children[idx].as_deref_mut().ok_or(EINVAL)?;
                level -= 1;
            }
            t.set(index(a, 0), entry);
        }
        Ok(())
    }

    /// Clears the leaf entries of `[va, va + size)` that exist. Neither allocates nor frees:
    /// safe in MMU-notifier context.
    pub(crate) fn clear(&mut self, va: u64, size: u64) {
        if size > 0 {
            Self::clear_in(&self.root, pte::ROOT_LEVEL, va, va + size);
        }
    }

    fn clear_in(t: &Table, level: u32, va: u64, end: u64) {
        let span = span(level);
        let mut a = va;
        while a < end {
            let next = ((a / span) + 1) * span;
            let idx = index(a, level);
            if level == 0 {
                if t.get(idx) != 0 {
                    t.set(idx, 0);
                }
            } else if let Some(child) = t.children.get(idx).and_then(|c| c.as_deref()) {
                Self::clear_in(child, level - 1, a, next.min(end));
            }
            a = next;
        }
    }

    /// The leaf entry for `va`, if its tables exist (for tests and debugging).
    #[allow(dead_code)]
    pub(crate) fn lookup(&self, va: u64) -> Option<u64> {
        let mut t = &self.root;
        let mut level = pte::ROOT_LEVEL;
        while level > 0 {
            t = t.children.get(index(va, level))?.as_deref()?;
            level -= 1;
        }
        Some(t.get(index(va, 0)))
    }
}

#[kunit_tests(svmgpu_pagetable)]
mod tests {
    use super::*;

    #[test]
    fn leaf_encoding_follows_the_spec() {
        assert_eq!(
            leaf(0x1234_5000, true),
            Some(0x1234_5000 | pte::PRESENT | pte::WRITABLE)
        );
        assert_eq!(leaf(0x1234_5000, false), Some(0x1234_5000 | pte::PRESENT));
        // Unaligned or wider than 52 bits: no entry.
        assert_eq!(leaf(0x1234_5008, true), None);
        assert_eq!(leaf(1 << 52, true), None);
        let e = leaf(0xabc_d000, false).unwrap_or(0);
        assert_eq!(e & pte::RESERVED_MASK, 0);
        assert!(matches!(
            pte::decode(e, 0),
            pte::PteKind::Leaf {
                pa: 0xabc_d000,
                writable: false,
                ..
            }
        ));
    }

    #[test]
    fn indices_take_nine_bits_per_level() {
        let va: u64 = (3 << 39) | (5 << 30) | (7 << 21) | (11 << 12) | 0x123;
        assert_eq!(index(va, 3), 3);
        assert_eq!(index(va, 2), 5);
        assert_eq!(index(va, 1), 7);
        assert_eq!(index(va, 0), 11);
        assert_eq!(span(0), 4096);
        assert_eq!(span(1), 2 << 20);
        assert_eq!(span(3), 512 << 30);
    }

    #[test]
    fn tables_spanned_counts_distinct_parents() {
        // One page: one table per level.
        assert_eq!(tables_spanned(0x1000, 0x1000), [1, 1, 1]);
        // 2 MiB aligned 2 MiB: one leaf table.
        assert_eq!(tables_spanned(2 << 20, 2 << 20), [1, 1, 1]);
        // Straddling a 2 MiB boundary: two leaf tables.
        assert_eq!(tables_spanned((2 << 20) - 0x1000, 0x2000), [2, 1, 1]);
        // Straddling a 1 GiB boundary: two level-1 and two level-0 tables.
        assert_eq!(tables_spanned((1 << 30) - 0x1000, 0x2000), [2, 2, 1]);
        // Straddling a 512 GiB boundary: two of each.
        assert_eq!(tables_spanned((512 << 30) - 0x1000, 0x2000), [2, 2, 2]);
        assert_eq!(tables_spanned(0, 0), [0, 0, 0]);
    }
}
