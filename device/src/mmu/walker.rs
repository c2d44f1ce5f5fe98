// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The page walker (spec/svmgpu.md section 6.9.2): four levels of 512 little-endian entries
//! in guest RAM, read with one 64-bit atomic load each. Every table address and every entry
//! is untrusted: the walk has a fixed depth (so cyclic tables cannot loop), every read is
//! range-checked by `vm-memory`, and every outcome is a [`Leaf`] or a [`WalkFault`].

use std::sync::atomic::Ordering;

use svmgpu_spec::pte::{self, PteKind};
use svmgpu_spec::{AccessKind, FaultReason, PAGE_SIZE_2M, PAGE_SIZE_4K, VA_BITS};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// A successful walk: the leaf that maps the virtual address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// First virtual address of the page.
    pub page_va: u64,
    /// Guest-physical address of the page.
    pub pa: u64,
    /// 2 MiB page (else 4 KiB).
    pub huge: bool,
    /// WRITABLE.
    pub writable: bool,
    /// NO_EXEC clear.
    pub executable: bool,
}

impl Leaf {
    /// Page size in bytes.
    pub fn size(&self) -> u64 {
        if self.huge {
            PAGE_SIZE_2M
        } else {
            PAGE_SIZE_4K
        }
    }

    /// Checks `access` against the leaf's permissions.
    pub fn permits(&self, access: AccessKind) -> Result<(), FaultReason> {
        match access {
            AccessKind::Write | AccessKind::Atomic if !self.writable => {
                Err(FaultReason::WriteProtect)
            }
            AccessKind::Exec if !self.executable => Err(FaultReason::ExecProtect),
            _ => Ok(()),
        }
    }
}

/// A failed walk: why, and at which level (3 = root … 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("page walk failed at level {level}: {reason:?}")]
pub struct WalkFault {
    /// Reason, as reported in the PAGE_FAULT event.
    pub reason: FaultReason,
    /// Level of the entry that ended the walk.
    pub level: u32,
}

impl WalkFault {
    /// True for faults caused by a malformed table rather than a missing mapping (counted as
    /// `pte_errors`).
    pub fn is_pte_error(&self) -> bool {
        matches!(
            self.reason,
            FaultReason::ReservedBit | FaultReason::BadTableAddress
        )
    }
}

/// Walks the table rooted at `root` for `va`. Does not check permissions (see
/// [`Leaf::permits`]); does check that the whole leaf page is guest RAM.
pub fn walk(mem: &GuestMemoryMmap<()>, root: u64, va: u64) -> Result<Leaf, WalkFault> {
    walk_with(mem, root, va, None)
}

/// [`walk`], with an injected guest-memory read error (fault injection, spec section 6.16):
/// the read of the entry at level `read_error` fails — or, if the walk would end above that
/// level, the read of the entry that ends it — as if its table were not guest RAM
/// (`BAD_TABLE_ADDRESS` at that level).
pub fn walk_with(
    mem: &GuestMemoryMmap<()>,
    root: u64,
    va: u64,
    read_error: Option<u32>,
) -> Result<Leaf, WalkFault> {
    if va >> VA_BITS != 0 {
        return Err(WalkFault {
            reason: FaultReason::VaRange,
            level: pte::ROOT_LEVEL,
        });
    }
    let mut table = root;
    // Fixed depth: four iterations at most, whatever the tables contain.
    for level in (0..=pte::ROOT_LEVEL).rev() {
        let fault = |reason| WalkFault { reason, level };
        if read_error == Some(level) {
            return Err(fault(FaultReason::BadTableAddress));
        }
        let addr =
            pte::entry_address(table, va, level).ok_or(fault(FaultReason::BadTableAddress))?;
        let raw: u64 = mem
            .load(GuestAddress(addr), Ordering::Acquire)
            .map_err(|_| fault(FaultReason::BadTableAddress))?;
        let kind = pte::decode(raw, level);
        if read_error.is_some_and(|l| l < level) && !matches!(kind, PteKind::Table { .. }) {
            // The walk ends here, above the level asked for: this read fails instead.
            return Err(fault(FaultReason::BadTableAddress));
        }
        match kind {
            PteKind::NotPresent => return Err(fault(FaultReason::NotPresent)),
            PteKind::Reserved | PteKind::BadLevel => return Err(fault(FaultReason::ReservedBit)),
            PteKind::Table { pa } => table = pa,
            PteKind::Leaf {
                pa,
                size,
                writable,
                executable,
            } => {
                let huge = size == PAGE_SIZE_2M;
                // `size` is 4 KiB or 2 MiB, so it fits usize.
                if !mem.check_range(GuestAddress(pa), size as usize) {
                    return Err(fault(FaultReason::BadPageAddress));
                }
                return Ok(Leaf {
                    page_va: va & !(size - 1),
                    pa,
                    huge,
                    writable,
                    executable,
                });
            }
        }
    }
    // Level 0 entries are leaves or faults, so the loop always returns.
    Err(WalkFault {
        reason: FaultReason::ReservedBit,
        level: 0,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use svmgpu_spec::pte::{page_2m, page_4k, table, Perms};

    /// 33 MiB, so that the last 2 MiB page is only half RAM.
    pub(crate) const RAM: u64 = 33 << 20;

    pub(crate) fn ram() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
    }

    pub(crate) fn put(mem: &GuestMemoryMmap<()>, addr: u64, v: u64) {
        mem.write_obj(v, GuestAddress(addr)).unwrap();
    }

    /// A tiny page-table builder over a bump allocator starting at 1 MiB.
    pub(crate) struct Pt {
        pub root: u64,
        next: u64,
    }

    impl Pt {
        pub(crate) fn new() -> Self {
            Self {
                root: 0x10_0000,
                next: 0x10_1000,
            }
        }

        fn table_for(&mut self, mem: &GuestMemoryMmap<()>, va: u64, stop: u32) -> u64 {
            let mut t = self.root;
            for level in (stop + 1..=3).rev() {
                let e = pte::entry_address(t, va, level).unwrap();
                let raw: u64 = mem.read_obj(GuestAddress(e)).unwrap();
                t = if raw & pte::PRESENT != 0 {
                    raw & pte::ADDR_MASK
                } else {
                    let n = self.next;
                    self.next += 0x1000;
                    put(mem, e, table(n).unwrap());
                    n
                };
            }
            t
        }

        pub(crate) fn map_4k(&mut self, mem: &GuestMemoryMmap<()>, va: u64, pa: u64, p: Perms) {
            let t = self.table_for(mem, va, 0);
            put(
                mem,
                pte::entry_address(t, va, 0).unwrap(),
                page_4k(pa, p).unwrap(),
            );
        }

        pub(crate) fn map_2m(&mut self, mem: &GuestMemoryMmap<()>, va: u64, pa: u64, p: Perms) {
            let t = self.table_for(mem, va, 1);
            put(
                mem,
                pte::entry_address(t, va, 1).unwrap(),
                page_2m(pa, p).unwrap(),
            );
        }

        pub(crate) fn set_raw(&mut self, mem: &GuestMemoryMmap<()>, va: u64, level: u32, raw: u64) {
            let t = self.table_for(mem, va, level);
            put(mem, pte::entry_address(t, va, level).unwrap(), raw);
        }
    }

    const RW: Perms = Perms {
        writable: true,
        no_exec: true,
    };

    #[test]
    fn walks_4k_and_2m() {
        let mem = ram();
        let mut pt = Pt::new();
        pt.map_4k(&mem, 0x7f00_0000_3000, 0x40_0000, RW);
        pt.map_2m(&mem, 0x20_0000_0000, 0x60_0000, Perms::default());
        let l = walk(&mem, pt.root, 0x7f00_0000_3abc).unwrap();
        assert_eq!(
            l,
            Leaf {
                page_va: 0x7f00_0000_3000,
                pa: 0x40_0000,
                huge: false,
                writable: true,
                executable: false
            }
        );
        assert_eq!(l.permits(AccessKind::Write), Ok(()));
        assert_eq!(l.permits(AccessKind::Exec), Err(FaultReason::ExecProtect));
        let h = walk(&mem, pt.root, 0x20_0012_3456).unwrap();
        assert!(h.huge);
        assert_eq!(
            (h.page_va, h.pa, h.size()),
            (0x20_0000_0000, 0x60_0000, 2 << 20)
        );
        assert_eq!(
            h.permits(AccessKind::Atomic),
            Err(FaultReason::WriteProtect)
        );
        assert_eq!(h.permits(AccessKind::Read), Ok(()));
        assert_eq!(h.permits(AccessKind::Exec), Ok(()));
    }

    #[test]
    fn injected_read_errors() {
        let mem = ram();
        let mut pt = Pt::new();
        pt.map_4k(&mem, 0x3000, 0x40_0000, RW);
        pt.map_2m(&mem, 0x4000_0000, 0x60_0000, RW);
        let bad = |level| {
            Err(WalkFault {
                reason: FaultReason::BadTableAddress,
                level,
            })
        };
        for level in 0..=3 {
            assert_eq!(walk_with(&mem, pt.root, 0x3000, Some(level)), bad(level));
        }
        assert_eq!(
            walk_with(&mem, pt.root, 0x3000, None),
            walk(&mem, pt.root, 0x3000)
        );
        // A 2 MiB leaf ends the walk at level 1: a read error asked for level 0 hits it.
        assert_eq!(walk_with(&mem, pt.root, 0x4000_0000, Some(0)), bad(1));
        assert_eq!(walk_with(&mem, pt.root, 0x4000_0000, Some(2)), bad(2));
        // So does a walk that ends on a non-present entry.
        assert_eq!(walk_with(&mem, pt.root, 0x80_0000_0000, Some(0)), bad(3));
        assert_eq!(
            walk_with(&mem, pt.root, 0x20_0000, Some(0)),
            bad(1),
            "level 1 entry not present"
        );
        // VA range is checked first.
        assert_eq!(
            walk_with(&mem, pt.root, 1 << 48, Some(3)),
            Err(WalkFault {
                reason: FaultReason::VaRange,
                level: 3
            })
        );
    }

    #[test]
    fn faults() {
        let mem = ram();
        let mut pt = Pt::new();
        let f = |reason, level| Err(WalkFault { reason, level });
        assert_eq!(walk(&mem, pt.root, 0x1000), f(FaultReason::NotPresent, 3));
        assert_eq!(walk(&mem, pt.root, 1 << 48), f(FaultReason::VaRange, 3));
        assert_eq!(walk(&mem, pt.root, u64::MAX), f(FaultReason::VaRange, 3));
        // Root outside RAM, or misaligned.
        assert_eq!(walk(&mem, RAM, 0), f(FaultReason::BadTableAddress, 3));
        assert_eq!(walk(&mem, 0x10_0008, 0), f(FaultReason::BadTableAddress, 3));
        // Table pointer outside RAM.
        pt.set_raw(&mem, 0x40_0000_0000, 2, table(1 << 40).unwrap());
        assert_eq!(
            walk(&mem, pt.root, 0x40_0000_0000),
            f(FaultReason::BadTableAddress, 1)
        );
        // Reserved bits, HUGE where reserved, bits 20:12 of a 2 MiB leaf.
        pt.set_raw(&mem, 0x5000, 0, 0x40_0000 | pte::PRESENT | (1 << 4));
        assert_eq!(walk(&mem, pt.root, 0x5000), f(FaultReason::ReservedBit, 0));
        pt.set_raw(
            &mem,
            0x80_0000_0000,
            3,
            0x40_0000 | pte::PRESENT | pte::HUGE,
        );
        assert_eq!(
            walk(&mem, pt.root, 0x80_0000_0000),
            f(FaultReason::ReservedBit, 3)
        );
        pt.set_raw(&mem, 0x60_0000, 1, 0x40_1000 | pte::PRESENT | pte::HUGE);
        assert_eq!(
            walk(&mem, pt.root, 0x60_0000),
            f(FaultReason::ReservedBit, 1)
        );
        // Leaf page outside RAM (also partly outside for a 2 MiB page).
        pt.map_4k(&mem, 0x9000, 1 << 40, RW);
        assert_eq!(
            walk(&mem, pt.root, 0x9000),
            f(FaultReason::BadPageAddress, 0)
        );
        pt.map_2m(&mem, 0xa0_0000, 32 << 20, RW);
        assert_eq!(
            walk(&mem, pt.root, 0xa0_0000),
            f(FaultReason::BadPageAddress, 1)
        );
        assert!(WalkFault {
            reason: FaultReason::ReservedBit,
            level: 0
        }
        .is_pte_error());
    }

    #[test]
    fn cyclic_tables_terminate() {
        let mem = ram();
        let root = 0x20_0000u64;
        // Every entry of the root points at the root itself.
        for i in 0..512 {
            put(&mem, root + 8 * i, table(root).unwrap());
        }
        // Level 0 then reads the root as a leaf table: a 4 KiB leaf at the root's page.
        let l = walk(&mem, root, 0x1234_5678_9000).unwrap();
        assert_eq!((l.pa, l.huge), (root, false));
        // A self-pointer with HUGE at level 1 is a 2 MiB leaf, not a loop.
        for i in 0..512 {
            put(&mem, root + 8 * i, table(root).unwrap() | pte::HUGE);
        }
        assert_eq!(
            walk(&mem, root, 0),
            Err(WalkFault {
                reason: FaultReason::ReservedBit,
                level: 3
            })
        );
    }

    #[test]
    fn garbage_tables_never_panic() {
        let mem = ram();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let root = 0x30_0000u64;
        for i in 0..4096u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Bias towards present entries that point back into the garbage area.
            let v = if i % 3 == 0 {
                (root + (x & 0xf000)) | (x & 0xfff) | pte::PRESENT
            } else {
                x
            };
            put(&mem, root + 8 * (i % 8192), v);
        }
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let _ = walk(&mem, root + (x & 0xf000), x & 0xffff_ffff_ffff);
            let _ = walk(&mem, x, x.rotate_left(17));
        }
    }
}
