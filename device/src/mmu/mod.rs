// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The memory management unit of one engine: its TLB in front of the page walker, with the
//! permission rules of spec/svmgpu.md section 10 and the audit of section 11.4.
//!
//! - [`walker`]: the page walk over guest RAM;
//! - [`tlb`]: the set-associative, ASID-tagged TLB;
//! - [`audit`]: invalidation sequence numbers and the stale-access check.

pub mod audit;
pub mod tlb;
pub mod walker;

use svmgpu_spec::{AccessKind, FaultReason};
use vm_memory::GuestMemoryMmap;

use audit::InvalLog;
use tlb::{Tlb, TlbEntry, TlbError};
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
}

/// One engine's MMU.
#[derive(Debug)]
pub struct Mmu {
    tlb: Tlb,
    /// Counters since the last [`Mmu::take_counters`].
    pub counters: MmuCounters,
}

impl Mmu {
    /// An MMU with an empty TLB of the given geometry.
    pub fn new(entries: u32, ways: u32) -> Result<Self, TlbError> {
        Ok(Self {
            tlb: Tlb::new(entries, ways)?,
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
        if let Some(e) = self.tlb.lookup(sp.asid, va) {
            if e.leaf.permits(access).is_ok() {
                self.counters.hits += 1;
                if sp.audit {
                    self.audit_hit(sp, &e, va);
                }
                return Ok(Self::through(&e.leaf, va));
            }
            // Permission mismatch: the PTE may have been upgraded; drop and re-walk.
            self.tlb.remove(sp.asid, &e.leaf);
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
        self.tlb.insert(TlbEntry {
            asid: sp.asid,
            leaf,
            fill_seq,
        });
        if sp.audit {
            // A fresh walk agrees with memory by construction.
            self.counters.audit_checks += 1;
        }
        Ok(Self::through(&leaf, va))
    }

    fn audit_hit(&mut self, sp: &Space<'_>, e: &TlbEntry, va: u64) {
        self.counters.audit_checks += 1;
        if sp.log.is_stale(e) {
            self.counters.stale += 1;
            log::error!(
                "audit: stale access: asid {} va {va:#x} used a translation (page {:#x} -> {:#x}) \
                 that a completed invalidation covered",
                sp.asid,
                e.leaf.page_va,
                e.leaf.pa
            );
        }
        match walk(sp.mem, sp.root, va) {
            Ok(l) if l == e.leaf => {}
            other => {
                self.counters.mismatches += 1;
                log::debug!(
                    "audit: asid {} va {va:#x}: TLB has {:?}, memory has {other:?}",
                    sp.asid,
                    e.leaf
                );
            }
        }
    }

    fn through(leaf: &Leaf, va: u64) -> Translation {
        let off = va - leaf.page_va;
        Translation {
            pa: leaf.pa + off,
            page_left: leaf.size() - off,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use svmgpu_spec::pte::Perms;
    use tlb::Scope;
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
}
