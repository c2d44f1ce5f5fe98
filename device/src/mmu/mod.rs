// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The memory management unit of one engine: its TLB in front of the page walker, with the
//! permission rules of spec/svmgpu.md section 6.9 and the audit of section 6.10.4.
//!
//! - [`walker`]: the page walk over guest RAM;
//! - [`scope`]: what an invalidation covers;
//! - [`tlb`]: the set-associative, ASID-tagged TLB;
//! - [`audit`]: invalidation sequence numbers and what the audit found about each entry.

pub mod audit;
pub mod scope;
pub mod tlb;
pub mod walker;

use std::time::{Duration, Instant};

use svmgpu_spec::{AccessKind, FaultReason};
use vm_memory::GuestMemoryMmap;

use audit::{ahead_of_memory, InvalLog, Verdict};
pub use scope::Scope;
use tlb::{Eviction, Tlb, TlbEntry, TlbError};
use walker::{walk, walk_with, Leaf, WalkFault};

/// A failed translation, as reported in a PAGE_FAULT event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Byte address of the access.
    pub va: u64,
    /// Access kind.
    pub access: AccessKind,
    /// Reason.
    pub reason: FaultReason,
    /// Level of the entry that ended the walk.
    pub level: u32,
}

/// The address space a context runs in, for the duration of one time slice.
#[derive(Clone, Copy, Debug)]
pub struct Space<'a> {
    /// Guest RAM.
    pub mem: &'a GuestMemoryMmap<()>,
    /// ASID.
    pub asid: u32,
    /// Root table GPA.
    pub root: u64,
    /// Invalidation sequence numbers and, in audit mode, the log to check against.
    pub log: &'a InvalLog,
    /// Audit mode negotiated.
    pub audit: bool,
    /// Audit: how long an entry may stay ahead of memory, uncovered, before it counts as
    /// unflushed (spec section 6.10.4).
    pub audit_grace: Duration,
    /// Fault injection into page walks (`walk-read-error`), asked before every walk that
    /// translates an access (never for audit walks, which stay exact).
    pub hook: Option<&'a dyn WalkHook>,
}

/// Asked before each translating page walk: `Some(level)` makes the read at that level fail.
pub trait WalkHook: std::fmt::Debug + Sync {
    /// The level whose read fails for this walk, if any.
    fn read_error(&self, asid: u32, va: u64) -> Option<u32>;
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Guest-physical address of the byte.
    pub pa: u64,
    /// Bytes from `pa` to the end of the page (≥ 1).
    pub page_left: u64,
}

/// Per-engine MMU counters, folded into the device statistics at slice boundaries (keeping
/// shared atomics off the per-access path).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmuCounters {
    /// Accesses translated by a TLB hit.
    pub hits: u64,
    /// Accesses that needed a walk.
    pub misses: u64,
    /// Walks performed (misses, permission re-walks, audit walks not counted).
    pub walks: u64,
    /// Walks that ended on a malformed entry or table address.
    pub pte_errors: u64,
    /// Audit: accesses checked.
    pub audit_checks: u64,
    /// Audit: accesses through a translation a completed invalidation covered.
    pub stale: u64,
    /// Audit: TLB hits whose entry disagrees with the page table in memory (normal between
    /// a PTE change and its invalidation).
    pub mismatches: u64,
    /// Audit: entries found unflushed (`unflushed_entries`).
    pub unflushed: u64,
    /// Audit: entries found unflushed that a completed invalidation left behind
    /// (`narrow_flush_entries`).
    pub narrow: u64,
    /// Translations not cached because their set was full and never evicts.
    pub uncached: u64,
}

impl MmuCounters {
    fn count(&mut self, v: Verdict) {
        self.unflushed += u64::from(v.unflushed);
        self.narrow += u64::from(v.narrow);
    }
}

/// What the audit's checks outside accesses found (added to the device statistics by the
/// caller).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditFindings {
    /// Entries found unflushed.
    pub unflushed: u64,
    /// Of those, entries a completed invalidation left behind.
    pub narrow: u64,
}

impl AuditFindings {
    fn count(&mut self, v: Verdict) {
        self.unflushed += u64::from(v.unflushed);
        self.narrow += u64::from(v.narrow);
    }
}

/// Guest RAM and the ASIDs' page-table roots, for the audit's checks outside accesses.
#[derive(Clone, Copy)]
pub struct Tables<'a> {
    /// Guest RAM.
    pub mem: &'a GuestMemoryMmap<()>,
    /// The root of a bound ASID.
    pub root: &'a dyn Fn(u32) -> Option<u64>,
    /// How long an entry may stay ahead of memory before it counts.
    pub grace: Duration,
}

impl std::fmt::Debug for Tables<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tables")
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl Tables<'_> {
    /// The time of the check if `e` is ahead of memory at the first address of its page
    /// (an unbound ASID is not checked: unbinding dropped its entries).
    fn ahead(&self, e: &TlbEntry, now: Instant) -> Option<Instant> {
        let root = (self.root)(e.asid)?;
        let va = e.leaf.page_va;
        ahead_of_memory(&e.leaf, &walk(self.mem, root, va), va).then_some(now)
    }
}

/// One engine's MMU.
#[derive(Debug)]
pub struct Mmu {
    tlb: Tlb,
    /// Counters since the last [`Mmu::take_counters`].
    pub counters: MmuCounters,
}

impl Mmu {
    /// An MMU with an empty LRU TLB of the given geometry.
    pub fn new(entries: u32, ways: u32) -> Result<Self, TlbError> {
        Self::with_eviction(entries, ways, Eviction::Lru)
    }

    /// An MMU with an empty TLB of the given geometry and replacement.
    pub fn with_eviction(entries: u32, ways: u32, eviction: Eviction) -> Result<Self, TlbError> {
        Ok(Self {
            tlb: Tlb::with_eviction(entries, ways, eviction)?,
            counters: MmuCounters::default(),
        })
    }

    /// The TLB (for invalidation).
    pub fn tlb_mut(&mut self) -> &mut Tlb {
        &mut self.tlb
    }

    /// Returns and clears the counters.
    pub fn take_counters(&mut self) -> MmuCounters {
        std::mem::take(&mut self.counters)
    }

    /// Drops the cached translation of `va` in `asid`, if any (its page stopped being
    /// guest RAM: the next access walks afresh).
    pub fn forget(&mut self, asid: u32, va: u64) {
        if let Some(slot) = self.tlb.lookup_slot(asid, va) {
            self.tlb.remove_slot(slot);
        }
    }

    fn fault(va: u64, access: AccessKind, f: WalkFault) -> Fault {
        Fault {
            va,
            access,
            reason: f.reason,
            level: f.level,
        }
    }

    fn do_walk(&mut self, sp: &Space<'_>, va: u64, access: AccessKind) -> Result<Leaf, Fault> {
        self.counters.walks += 1;
        let read_error = sp.hook.and_then(|h| h.read_error(sp.asid, va));
        walk_with(sp.mem, sp.root, va, read_error).map_err(|f| {
            if f.is_pte_error() {
                self.counters.pte_errors += 1;
            }
            Self::fault(va, access, f)
        })
    }

    /// Translates one byte address for `access`.
    #[inline]
    pub fn translate(
        &mut self,
        sp: &Space<'_>,
        va: u64,
        access: AccessKind,
    ) -> Result<Translation, Fault> {
        if let Some(slot) = self.tlb.lookup_slot(sp.asid, va) {
            if let Some(e) = self.tlb.entry(slot) {
                if e.leaf.permits(access).is_ok() {
                    self.counters.hits += 1;
                    if sp.audit {
                        self.audit_hit(sp, slot, &e, va);
                    }
                    return Ok(Self::through(&e.leaf, va));
                }
            }
            // Permission mismatch: the PTE may have been upgraded; drop and re-walk.
            self.tlb.remove_slot(slot);
        }
        self.translate_miss(sp, va, access)
    }

    #[cold]
    fn translate_miss(
        &mut self,
        sp: &Space<'_>,
        va: u64,
        access: AccessKind,
    ) -> Result<Translation, Fault> {
        self.counters.misses += 1;
        let fill_seq = sp.log.current();
        let leaf = self.do_walk(sp, va, access)?;
        leaf.permits(access).map_err(|reason| Fault {
            va,
            access,
            reason,
            level: if leaf.huge { 1 } else { 0 },
        })?;
        if !self.tlb.insert(TlbEntry::new(sp.asid, leaf, fill_seq)) {
            self.counters.uncached += 1;
        }
        if sp.audit {
            // A fresh walk agrees with memory by construction.
            self.counters.audit_checks += 1;
        }
        Ok(Self::through(&leaf, va))
    }

    fn audit_hit(&mut self, sp: &Space<'_>, slot: usize, e: &TlbEntry, va: u64) {
        self.counters.audit_checks += 1;
        if sp.log.is_stale(e.asid, &e.leaf, e.fill_seq) {
            self.counters.stale += 1;
            crate::error_limited!(
                "audit: stale access: asid {} va {va:#x} used a translation (page {:#x} -> {:#x}) \
                 that a completed invalidation covered",
                sp.asid,
                e.leaf.page_va,
                e.leaf.pa
            );
        }
        let memory = walk(sp.mem, sp.root, va);
        if memory != Ok(e.leaf) {
            self.counters.mismatches += 1;
            log::debug!(
                "audit: asid {} va {va:#x}: TLB has {:?}, memory has {memory:?}",
                sp.asid,
                e.leaf
            );
        }
        let ahead = ahead_of_memory(&e.leaf, &memory, va).then(Instant::now);
        if let Some(entry) = self.tlb.entry_mut(slot) {
            let v = entry.audit.observe(ahead, sp.audit_grace);
            report(entry, v);
            self.counters.count(v);
        }
    }

    /// Audit, at the acceptance of the invalidation `seq` of `scope` (spec section 6.10.4,
    /// rule 2): every entry of the ASID(s) it concerns filled before it is marked covered
    /// if it covers it, else checked, and marked left behind if ahead of memory.
    pub fn audit_accept(&mut self, t: &Tables<'_>, scope: Scope, seq: u64) -> AuditFindings {
        let now = Instant::now();
        let mut found = AuditFindings::default();
        for e in self.tlb.entries_mut() {
            if e.fill_seq >= seq || !scope.concerns(e.asid) {
                continue;
            }
            if scope.covers(e.asid, &e.leaf) {
                e.audit.covered = true;
                continue;
            }
            let v = e.audit.passed_over(seq, t.ahead(e, now), t.grace);
            report(e, v);
            found.count(v);
        }
        found
    }

    /// Audit: the invalidation `seq` completed with status OK (after it dropped its
    /// entries): the entries it left behind were passed over by a completed flush, and are
    /// checked again.
    pub fn audit_complete(&mut self, t: &Tables<'_>, seq: u64) -> AuditFindings {
        let now = Instant::now();
        let mut found = AuditFindings::default();
        for e in self.tlb.entries_mut() {
            if e.audit.left_behind_by == Some(seq) {
                e.audit.completed(seq);
                let v = e.audit.observe(t.ahead(e, now), t.grace);
                report(e, v);
                found.count(v);
            }
        }
        found
    }

    /// Audit: checks every entry against memory (the periodic scan of spec section 6.10.4).
    pub fn audit_scan(&mut self, t: &Tables<'_>) -> AuditFindings {
        let now = Instant::now();
        let mut found = AuditFindings::default();
        for e in self.tlb.entries_mut() {
            let v = e.audit.observe(t.ahead(e, now), t.grace);
            report(e, v);
            found.count(v);
        }
        found
    }

    fn through(leaf: &Leaf, va: u64) -> Translation {
        let off = va - leaf.page_va;
        Translation {
            pa: leaf.pa + off,
            page_left: leaf.size() - off,
        }
    }
}

/// Logs what a check counted.
fn report(e: &TlbEntry, v: Verdict) {
    if v.unflushed {
        crate::error_limited!(
            "audit: unflushed TLB entry: asid {} page {:#x} -> {:#x} has been ahead of its \
             page table for longer than the grace period and no invalidation covers it",
            e.asid,
            e.leaf.page_va,
            e.leaf.pa
        );
    }
    if v.narrow {
        crate::error_limited!(
            "audit: narrow flush: asid {} page {:#x} -> {:#x} was ahead of its page table when \
             invalidation #{} of its ASID was accepted, which did not cover it and completed",
            e.asid,
            e.leaf.page_va,
            e.leaf.pa,
            e.audit.left_behind_by.unwrap_or(0)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use svmgpu_spec::pte::Perms;
    use walker::tests::{ram, Pt};

    const RW: Perms = Perms {
        writable: true,
        no_exec: false,
    };
    const RO: Perms = Perms {
        writable: false,
        no_exec: false,
    };

    #[test]
    fn hits_misses_and_stale_translations() {
        let mem = ram();
        let log = InvalLog::new();
        let mut pt = Pt::new();
        pt.map_4k(&mem, 0x1000, 0x40_0000, RW);
        let sp = Space {
            mem: &mem,
            asid: 1,
            root: pt.root,
            log: &log,
            audit: true,
            audit_grace: Duration::ZERO,
            hook: None,
        };
        let mut m = Mmu::new(16, 4).unwrap();
        let t = m.translate(&sp, 0x1234, AccessKind::Write).unwrap();
        assert_eq!(
            t,
            Translation {
                pa: 0x40_0234,
                page_left: 0xdcc
            }
        );
        m.translate(&sp, 0x1000, AccessKind::Read).unwrap();
        assert_eq!((m.counters.hits, m.counters.misses), (1, 1));

        // Remap without invalidating: the TLB still translates to the old page.
        pt.map_4k(&mem, 0x1000, 0x50_0000, RW);
        assert_eq!(
            m.translate(&sp, 0x1000, AccessKind::Read).unwrap().pa,
            0x40_0000
        );
        assert_eq!(m.counters.mismatches, 1);
        assert_eq!(
            m.counters.stale, 0,
            "not stale before an invalidation completed"
        );

        // Invalidate: the next access walks and sees the new page.
        let seq = log.accept();
        assert_eq!(m.tlb_mut().invalidate(Scope::Asid(1)), 1);
        log.complete(Scope::Asid(1), seq);
        assert_eq!(
            m.translate(&sp, 0x1000, AccessKind::Read).unwrap().pa,
            0x50_0000
        );
        assert_eq!(m.counters.stale, 0);

        // A TLB entry that survived an invalidation would be counted as stale.
        pt.map_4k(&mem, 0x1000, 0x60_0000, RW);
        let seq = log.accept();
        log.complete(Scope::Asid(1), seq); // "forgot" to drop it from the TLB
        m.translate(&sp, 0x1000, AccessKind::Read).unwrap();
        assert_eq!(m.counters.stale, 1);
    }

    #[test]
    fn permissions() {
        let mem = ram();
        let log = InvalLog::new();
        let mut pt = Pt::new();
        pt.map_4k(&mem, 0x1000, 0x40_0000, RO);
        pt.map_2m(
            &mem,
            0x20_0000,
            0x60_0000,
            Perms {
                writable: true,
                no_exec: true,
            },
        );
        let sp = Space {
            mem: &mem,
            asid: 0,
            root: pt.root,
            log: &log,
            audit: false,
            audit_grace: Duration::ZERO,
            hook: None,
        };
        let mut m = Mmu::new(8, 2).unwrap();
        m.translate(&sp, 0x1000, AccessKind::Read).unwrap();
        let f = m.translate(&sp, 0x1008, AccessKind::Write).unwrap_err();
        assert_eq!(
            (f.reason, f.level, f.va),
            (FaultReason::WriteProtect, 0, 0x1008)
        );
        // Upgrading the PTE needs no invalidation: a permission miss re-walks.
        pt.map_4k(&mem, 0x1000, 0x40_0000, RW);
        assert!(m.translate(&sp, 0x1008, AccessKind::Atomic).is_ok());
        let f = m.translate(&sp, 0x20_0000, AccessKind::Exec).unwrap_err();
        assert_eq!((f.reason, f.level), (FaultReason::ExecProtect, 1));
        let t = m.translate(&sp, 0x3f_fff8, AccessKind::Write).unwrap();
        assert_eq!(
            t,
            Translation {
                pa: 0x7f_fff8,
                page_left: 8
            }
        );
        let f = m.translate(&sp, 0x80_0000, AccessKind::Read).unwrap_err();
        assert_eq!(f.reason, FaultReason::NotPresent);
        // Failed walks are never cached: mapping the page makes it work at once.
        pt.map_4k(&mem, 0x80_0000, 0x41_0000, RO);
        assert!(m.translate(&sp, 0x80_0000, AccessKind::Read).is_ok());
    }

    /// An MMU, a space of ASID 1 over `pt` and the tables view of the audit, with `grace`.
    fn audited<'a>(
        mem: &'a GuestMemoryMmap<()>,
        log: &'a InvalLog,
        root: u64,
        grace: Duration,
    ) -> Space<'a> {
        Space {
            mem,
            asid: 1,
            root,
            log,
            audit: true,
            audit_grace: grace,
            hook: None,
        }
    }

    /// Accepts an invalidation of `scope` (audit rule 2), then completes it as the device
    /// does: drop the covered entries, record it, mark what it left behind.
    fn invalidate(m: &mut Mmu, t: &Tables<'_>, log: &InvalLog, scope: Scope) -> AuditFindings {
        let seq = log.accept();
        let mut found = m.audit_accept(t, scope, seq);
        m.tlb_mut().invalidate(scope);
        log.complete(scope, seq);
        let done = m.audit_complete(t, seq);
        found.unflushed += done.unflushed;
        found.narrow += done.narrow;
        found
    }

    #[test]
    fn a_narrow_flush_is_found() {
        let mem = ram();
        let log = InvalLog::new();
        let mut pt = Pt::new();
        pt.map_4k(&mem, 0x1000, 0x40_0000, RW);
        pt.map_4k(&mem, 0x2000, 0x41_0000, RW);
        let root = pt.root;
        let sp = audited(&mem, &log, root, Duration::ZERO);
        let roots = move |a: u32| (a == 1).then_some(root);
        let t = Tables {
            mem: &mem,
            root: &roots,
            grace: Duration::ZERO,
        };
        let mut m = Mmu::new(16, 4).unwrap();
        m.translate(&sp, 0x1000, AccessKind::Write).unwrap();
        m.translate(&sp, 0x2000, AccessKind::Write).unwrap();

        // The driver clears both PTEs but invalidates only the first page.
        pt.set_raw(&mem, 0x1000, 0, 0);
        pt.set_raw(&mem, 0x2000, 0, 0);
        let narrow = Scope::Range {
            asid: 1,
            start: 0x1000,
            end: 0x2000,
        };
        let seq = log.accept();
        assert_eq!(
            m.audit_accept(&t, narrow, seq),
            AuditFindings {
                unflushed: 1,
                narrow: 0
            },
            "left behind at acceptance, not yet completed"
        );
        m.tlb_mut().invalidate(narrow);
        log.complete(narrow, seq);
        assert_eq!(
            m.audit_complete(&t, seq),
            AuditFindings {
                unflushed: 0,
                narrow: 1
            },
            "a narrow flush once it completed"
        );
        // The GPU still reaches the old page through the entry left behind; counted once.
        assert_eq!(
            m.translate(&sp, 0x2008, AccessKind::Write).unwrap().pa,
            0x41_0008
        );
        assert_eq!((m.counters.unflushed, m.counters.narrow), (0, 0));
        assert_eq!(m.counters.stale, 0, "no covering invalidation completed");
    }

    #[test]
    fn a_correct_driver_counts_nothing() {
        let mem = ram();
        let log = InvalLog::new();
        let mut pt = Pt::new();
        for i in 0..4 {
            pt.map_4k(&mem, 0x1000 * (i + 1), 0x40_0000 + 0x1000 * i, RO);
        }
        let root = pt.root;
        let sp = audited(&mem, &log, root, Duration::ZERO);
        let roots = move |a: u32| (a == 1).then_some(root);
        let t = Tables {
            mem: &mem,
            root: &roots,
            grace: Duration::ZERO,
        };
        let mut m = Mmu::new(16, 4).unwrap();
        for i in 1..=4 {
            m.translate(&sp, 0x1000 * i, AccessKind::Read).unwrap();
        }
        // An upgrade without invalidation grants more, never less.
        pt.map_4k(&mem, 0x1000, 0x40_0000, RW);
        m.translate(&sp, 0x1000, AccessKind::Read).unwrap();
        assert_eq!(m.audit_scan(&t), AuditFindings::default());

        // Unrelated invalidations of the ASID while nothing is ahead of memory.
        let other = Scope::Range {
            asid: 1,
            start: 0x10_0000,
            end: 0x10_1000,
        };
        assert_eq!(
            invalidate(&mut m, &t, &log, other),
            AuditFindings::default()
        );

        // Remap page 2, then invalidate a range covering it; until it completes, accesses
        // use the old page (a TLB), but the entry is covered.
        pt.map_4k(&mem, 0x2000, 0x50_0000, RO);
        let seq = log.accept();
        let cover = Scope::Range {
            asid: 1,
            start: 0x2000,
            end: 0x3000,
        };
        assert_eq!(m.audit_accept(&t, cover, seq), AuditFindings::default());
        assert_eq!(
            m.translate(&sp, 0x2000, AccessKind::Read).unwrap().pa,
            0x40_1000
        );
        // Meanwhile another invalidation of the ASID that does not cover page 2 completes.
        assert_eq!(
            invalidate(&mut m, &t, &log, other),
            AuditFindings::default()
        );
        m.translate(&sp, 0x2000, AccessKind::Read).unwrap();
        assert_eq!(m.audit_scan(&t), AuditFindings::default());
        m.tlb_mut().invalidate(cover);
        log.complete(cover, seq);
        assert_eq!(m.audit_complete(&t, seq), AuditFindings::default());
        assert_eq!(
            m.translate(&sp, 0x2000, AccessKind::Read).unwrap().pa,
            0x50_0000
        );

        // Unmap pages 3 and 4 and flush the whole ASID.
        pt.set_raw(&mem, 0x3000, 0, 0);
        pt.set_raw(&mem, 0x4000, 0, 0);
        assert_eq!(
            invalidate(&mut m, &t, &log, Scope::Asid(1)),
            AuditFindings::default()
        );
        assert!(m.translate(&sp, 0x3000, AccessKind::Read).is_err());
        assert_eq!(m.audit_scan(&t), AuditFindings::default());
        assert_eq!(
            (m.counters.unflushed, m.counters.narrow, m.counters.stale),
            (0, 0, 0)
        );
        assert!(
            m.counters.mismatches > 0,
            "the window before completion was seen"
        );
    }

    #[test]
    fn an_uninvalidated_change_is_unflushed_after_the_grace_period() {
        let mem = ram();
        let log = InvalLog::new();
        let mut pt = Pt::new();
        pt.map_4k(&mem, 0x1000, 0x40_0000, RW);
        let root = pt.root;
        let grace = Duration::from_millis(30);
        let sp = audited(&mem, &log, root, grace);
        let roots = move |a: u32| (a == 1).then_some(root);
        let t = Tables {
            mem: &mem,
            root: &roots,
            grace,
        };
        let mut m = Mmu::new(16, 4).unwrap();
        m.translate(&sp, 0x1000, AccessKind::Write).unwrap();
        // Write-protected (e.g. fork's COW) and never invalidated.
        pt.map_4k(&mem, 0x1000, 0x40_0000, RO);
        m.translate(&sp, 0x1000, AccessKind::Write).unwrap();
        assert_eq!(
            m.audit_scan(&t),
            AuditFindings::default(),
            "within the grace period"
        );
        std::thread::sleep(grace);
        assert_eq!(
            m.audit_scan(&t),
            AuditFindings {
                unflushed: 1,
                narrow: 0
            }
        );
        m.translate(&sp, 0x1000, AccessKind::Write).unwrap();
        assert_eq!(m.counters.unflushed, 0, "counted once");
    }

    #[test]
    fn a_tlb_that_never_evicts_keeps_a_forgotten_entry() {
        let mem = ram();
        let log = InvalLog::new();
        let mut pt = Pt::new();
        // One set of 2 ways; 5 pages.
        for i in 0..5 {
            pt.map_4k(&mem, 0x1000 * i, 0x40_0000 + 0x1000 * i, RW);
        }
        let root = pt.root;
        let sp = audited(&mem, &log, root, Duration::ZERO);
        let roots = move |a: u32| (a == 1).then_some(root);
        let t = Tables {
            mem: &mem,
            root: &roots,
            grace: Duration::ZERO,
        };
        for (eviction, kept) in [(Eviction::Lru, false), (Eviction::Never, true)] {
            let mut m = Mmu::with_eviction(2, 2, eviction).unwrap();
            m.translate(&sp, 0, AccessKind::Write).unwrap();
            // Forgotten invalidation of page 0, then other work fills the set.
            pt.set_raw(&mem, 0, 0, 0);
            for i in 1..5 {
                m.translate(&sp, 0x1000 * i, AccessKind::Write).unwrap();
            }
            let found = m.audit_scan(&t);
            assert_eq!(found.unflushed == 1, kept, "{eviction:?}");
            assert_eq!(m.counters.uncached > 0, kept, "{eviction:?}");
            pt.map_4k(&mem, 0, 0x40_0000, RW);
        }
    }
}
