// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Audit mode bookkeeping (spec/svmgpu.md section 11.4): which invalidations were accepted
//! when, and which have completed, so that an access through a TLB entry can be checked
//! against every completed invalidation that covers it.
//!
//! Every accepted invalidation takes the next sequence number; every TLB entry remembers the
//! sequence number current when its walk started. An access is *stale* if a completed
//! invalidation covering the entry's page was accepted after that walk started.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::tlb::{Scope, TlbEntry};

/// Completed invalidations remembered for the stale check. Older ones are forgotten; an
/// entry old enough to need them has been evicted long before in any realistic TLB, and a
/// forgotten one can only hide a stale access, never invent one.
pub const AUDIT_LOG_LEN: usize = 4096;

/// Invalidation sequence numbers and the log of completed invalidations.
#[derive(Debug, Default)]
pub struct InvalLog {
    accepted: AtomicU64,
    done: Mutex<VecDeque<(Scope, u64)>>,
}

impl InvalLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current sequence number (a walk starting now records it).
    #[inline]
    pub fn current(&self) -> u64 {
        self.accepted.load(Ordering::Acquire)
    }

    /// Takes the sequence number of a newly accepted invalidation.
    pub fn accept(&self) -> u64 {
        self.accepted.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Records that the invalidation `seq` with `scope` completed (its completion is about to
    /// be posted). The log is kept in sequence order, so that [`InvalLog::is_stale`] finds
    /// every later invalidation at its end even when invalidations complete out of order
    /// (an injected delay).
    pub fn complete(&self, scope: Scope, seq: u64) {
        let mut d = self.done.lock().unwrap_or_else(|p| p.into_inner());
        if d.len() == AUDIT_LOG_LEN {
            d.pop_front();
        }
        // Usually the last position: completions come in acceptance order but for delays.
        let at = d.iter().rposition(|(_, s)| *s <= seq).map_or(0, |i| i + 1);
        d.insert(at, (scope, seq));
    }

    /// True if a completed invalidation covering `e` was accepted after `e`'s walk started.
    pub fn is_stale(&self, e: &TlbEntry) -> bool {
        let d = self.done.lock().unwrap_or_else(|p| p.into_inner());
        d.iter()
            .rev()
            .take_while(|(_, seq)| *seq > e.fill_seq)
            .any(|(scope, _)| scope.covers(e.asid, &e.leaf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmu::walker::Leaf;

    #[test]
    fn stale_only_after_a_covering_later_invalidation() {
        let log = InvalLog::new();
        let e = TlbEntry {
            asid: 3,
            leaf: Leaf {
                page_va: 0x7000,
                pa: 0x9000,
                huge: false,
                writable: true,
                executable: true,
            },
            fill_seq: log.current(),
        };
        assert!(!log.is_stale(&e));
        let other = log.accept();
        log.complete(Scope::Asid(4), other);
        assert!(!log.is_stale(&e), "other ASID");
        let s = log.accept();
        log.complete(
            Scope::Range {
                asid: 3,
                start: 0x8000,
                end: 0x9000,
            },
            s,
        );
        assert!(!log.is_stale(&e), "other range");
        let s = log.accept();
        log.complete(Scope::Asid(3), s);
        assert!(log.is_stale(&e));
        // A translation filled after that invalidation was accepted is not stale.
        let fresh = TlbEntry {
            fill_seq: log.current(),
            ..e
        };
        assert!(!log.is_stale(&fresh));
    }

    #[test]
    fn out_of_order_completions_are_still_found() {
        let log = InvalLog::new();
        let e = TlbEntry {
            asid: 1,
            leaf: Leaf {
                page_va: 0x1000,
                pa: 0x2000,
                huge: false,
                writable: true,
                executable: true,
            },
            fill_seq: log.current(),
        };
        // The entry's walk started after invalidation `old` was accepted; `covering`, accepted
        // after the walk, completes before `old`, which was delayed.
        let old = log.accept();
        let covering = log.accept();
        let e = TlbEntry { fill_seq: old, ..e };
        let later = log.accept();
        log.complete(Scope::Asid(9), later);
        assert!(!log.is_stale(&e));
        log.complete(Scope::Asid(1), covering);
        log.complete(Scope::Asid(9), old);
        assert!(
            log.is_stale(&e),
            "found behind an older one that completed later"
        );
    }
}
