// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What an invalidation covers (spec/svmgpu.md section 6.10.1).

use super::walker::Leaf;

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
    /// True if the scope covers the translation of `leaf` in `asid`.
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

    /// True if the scope concerns `asid` at all (every ASID for [`Scope::All`]).
    pub fn concerns(&self, asid: u32) -> bool {
        match *self {
            Scope::All => true,
            Scope::Asid(a) | Scope::Range { asid: a, .. } => a == asid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(page_va: u64, huge: bool) -> Leaf {
        Leaf {
            page_va,
            pa: 0,
            huge,
            writable: true,
            executable: true,
        }
    }

    #[test]
    fn coverage() {
        let r = Scope::Range {
            asid: 1,
            start: 0x4000,
            end: 0x6000,
        };
        assert!(r.covers(1, &leaf(0x4000, false)));
        assert!(r.covers(1, &leaf(0x5000, false)));
        assert!(!r.covers(1, &leaf(0x6000, false)), "end is exclusive");
        assert!(!r.covers(1, &leaf(0x3000, false)));
        assert!(!r.covers(2, &leaf(0x4000, false)), "other ASID");
        assert!(
            r.covers(1, &leaf(0, true)),
            "a range inside a 2 MiB page covers it"
        );
        assert!(Scope::Asid(2).covers(2, &leaf(0x1234_5000, false)));
        assert!(!Scope::Asid(2).covers(1, &leaf(0, false)));
        assert!(Scope::All.covers(7, &leaf(0, true)));
        assert!(r.concerns(1) && !r.concerns(2));
        assert!(Scope::Asid(3).concerns(3) && !Scope::Asid(3).concerns(1));
        assert!(Scope::All.concerns(9));
    }
}
