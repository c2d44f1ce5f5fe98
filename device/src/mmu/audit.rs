// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Audit mode (spec/svmgpu.md section 6.10.4): the device checks its TLBs against the page
//! tables in memory.
//!
//! - [`InvalLog`]: every accepted invalidation takes the next sequence number and every TLB
//!   entry remembers the sequence number current when its walk started. An access is
//!   *stale* if a completed invalidation covering the entry's page was accepted after that
//!   walk started (a device fault: that invalidation must have dropped the entry).
//! - [`EntryAudit`]: what the checks found about one TLB entry: since when it has been
//!   *ahead of memory* ([`ahead_of_memory`]: it grants what the page table no longer does),
//!   whether an invalidation accepted after its fill covers it, and whether one left it
//!   behind. [`EntryAudit::observe`] turns that into the driver mistakes the device counts:
//!   an entry ahead of memory for longer than the grace period with nothing covering it is
//!   *unflushed*; if a completed invalidation left it behind, it was a *narrow flush*.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::scope::Scope;
use super::walker::{Leaf, WalkFault};

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

    /// True if a completed invalidation covering the translation of `leaf` in `asid` was
    /// accepted after the walk that filled it started (at sequence number `fill_seq`).
    pub fn is_stale(&self, asid: u32, leaf: &Leaf, fill_seq: u64) -> bool {
        let d = self.done.lock().unwrap_or_else(|p| p.into_inner());
        d.iter()
            .rev()
            .take_while(|(_, seq)| *seq > fill_seq)
            .any(|(scope, _)| scope.covers(asid, leaf))
    }
}

/// True if a TLB entry caching `entry` grants at `va` (an address of its page) something
/// that `memory`, a fresh walk of `va`, does not: the walk fails, or reaches another
/// physical address, or withholds write or execute permission the entry gives. An entry
/// that grants less than memory (a permission upgrade) is not ahead of memory.
pub fn ahead_of_memory(entry: &Leaf, memory: &Result<Leaf, WalkFault>, va: u64) -> bool {
    let Ok(m) = memory else {
        return true;
    };
    let pa = |l: &Leaf| l.pa.wrapping_add(va.wrapping_sub(l.page_va));
    pa(entry) != pa(m) || (entry.writable && !m.writable) || (entry.executable && !m.executable)
}

/// What the audit's checks found about one TLB entry (spec section 6.10.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryAudit {
    /// When a check first found the entry ahead of memory, every later check agreeing.
    pub ahead_since: Option<Instant>,
    /// An invalidation accepted after the entry was filled covers it.
    pub covered: bool,
    /// Sequence number of an invalidation of the entry's ASID that did not cover it,
    /// accepted while the entry was ahead of memory.
    pub left_behind_by: Option<u64>,
    /// That invalidation completed with status OK.
    pub left_behind_done: bool,
    /// Already counted in `unflushed_entries` (each entry is counted once).
    pub reported: bool,
    /// Already counted in `narrow_flush_entries`.
    pub narrow_reported: bool,
}

/// What one check of an entry adds to the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The entry is unflushed (`unflushed_entries`).
    pub unflushed: bool,
    /// ... and a completed invalidation left it behind (`narrow_flush_entries`).
    pub narrow: bool,
}

impl EntryAudit {
    /// Records one check: `ahead` is the time of the check if it found the entry ahead of
    /// memory, `None` if not. Returns what to count.
    pub fn observe(&mut self, ahead: Option<Instant>, grace: Duration) -> Verdict {
        let Some(now) = ahead else {
            // Agrees with memory (again): whatever was found before is over.
            self.ahead_since = None;
            self.left_behind_by = None;
            self.left_behind_done = false;
            return Verdict::default();
        };
        let since = *self.ahead_since.get_or_insert(now);
        if self.covered || now.saturating_duration_since(since) < grace {
            return Verdict::default();
        }
        // The narrowing invalidation may complete after the entry was counted unflushed.
        let v = Verdict {
            unflushed: !self.reported,
            narrow: self.left_behind_done && !self.narrow_reported,
        };
        self.reported = true;
        self.narrow_reported |= v.narrow;
        v
    }

    /// An invalidation with sequence number `seq` that does not cover the entry was
    /// accepted; `ahead` as for [`EntryAudit::observe`].
    pub fn passed_over(&mut self, seq: u64, ahead: Option<Instant>, grace: Duration) -> Verdict {
        if ahead.is_some() && self.left_behind_by.is_none() {
            self.left_behind_by = Some(seq);
        }
        self.observe(ahead, grace)
    }

    /// The invalidation with sequence number `seq` completed with status OK.
    pub fn completed(&mut self, seq: u64) {
        if self.left_behind_by == Some(seq) {
            self.left_behind_done = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use svmgpu_spec::FaultReason;

    fn leaf(page_va: u64, pa: u64) -> Leaf {
        Leaf {
            page_va,
            pa,
            huge: false,
            writable: true,
            executable: true,
        }
    }

    #[test]
    fn stale_only_after_a_covering_later_invalidation() {
        let log = InvalLog::new();
        let l = leaf(0x7000, 0x9000);
        let fill = log.current();
        assert!(!log.is_stale(3, &l, fill));
        let other = log.accept();
        log.complete(Scope::Asid(4), other);
        assert!(!log.is_stale(3, &l, fill), "other ASID");
        let s = log.accept();
        log.complete(
            Scope::Range {
                asid: 3,
                start: 0x8000,
                end: 0x9000,
            },
            s,
        );
        assert!(!log.is_stale(3, &l, fill), "other range");
        let s = log.accept();
        log.complete(Scope::Asid(3), s);
        assert!(log.is_stale(3, &l, fill));
        // A translation filled after that invalidation was accepted is not stale.
        assert!(!log.is_stale(3, &l, log.current()));
    }

    #[test]
    fn out_of_order_completions_are_still_found() {
        let log = InvalLog::new();
        let l = leaf(0x1000, 0x2000);
        // The entry's walk started after invalidation `old` was accepted; `covering`, accepted
        // after the walk, completes before `old`, which was delayed.
        let old = log.accept();
        let covering = log.accept();
        let later = log.accept();
        log.complete(Scope::Asid(9), later);
        assert!(!log.is_stale(1, &l, old));
        log.complete(Scope::Asid(1), covering);
        log.complete(Scope::Asid(9), old);
        assert!(
            log.is_stale(1, &l, old),
            "found behind an older one that completed later"
        );
    }

    #[test]
    fn ahead_of_memory_is_granting_more() {
        let e = leaf(0x1000, 0x40_0000);
        let fault = Err(WalkFault {
            reason: FaultReason::NotPresent,
            level: 0,
        });
        assert!(!ahead_of_memory(&e, &Ok(e), 0x1008), "same translation");
        assert!(ahead_of_memory(&e, &fault, 0x1008), "unmapped");
        assert!(
            ahead_of_memory(&e, &Ok(leaf(0x1000, 0x50_0000)), 0x1008),
            "remapped"
        );
        let ro = Leaf {
            writable: false,
            ..e
        };
        let nx = Leaf {
            executable: false,
            ..e
        };
        assert!(ahead_of_memory(&e, &Ok(ro), 0x1000), "write revoked");
        assert!(ahead_of_memory(&e, &Ok(nx), 0x1000), "execute revoked");
        // Memory granting more than the entry (an upgrade) is not a mistake.
        assert!(!ahead_of_memory(&ro, &Ok(e), 0x1000));
        assert!(!ahead_of_memory(&nx, &Ok(e), 0x1000));
        // A 2 MiB entry against 4 KiB pages mapping the same bytes agrees at each address.
        let huge = Leaf {
            page_va: 0x20_0000,
            pa: 0x60_0000,
            huge: true,
            ..e
        };
        let small = leaf(0x20_3000, 0x60_3000);
        assert!(!ahead_of_memory(&huge, &Ok(small), 0x20_3010));
        assert!(ahead_of_memory(
            &huge,
            &Ok(leaf(0x20_3000, 0x70_3000)),
            0x20_3010
        ));
    }

    #[test]
    fn unflushed_after_the_grace_period_once() {
        let grace = Duration::from_millis(10);
        let t0 = Instant::now();
        let mut a = EntryAudit::default();
        assert_eq!(a.observe(None, grace), Verdict::default());
        assert_eq!(a.observe(Some(t0), grace), Verdict::default(), "just found");
        let late = t0 + grace;
        assert_eq!(
            a.observe(Some(late), grace),
            Verdict {
                unflushed: true,
                narrow: false
            }
        );
        assert_eq!(
            a.observe(Some(late), grace),
            Verdict::default(),
            "counted once"
        );

        // A check that finds it agreeing again starts over.
        let mut a = EntryAudit::default();
        a.observe(Some(t0), grace);
        a.observe(None, grace);
        assert_eq!(a.observe(Some(late), grace), Verdict::default());
        assert_eq!(a.ahead_since, Some(late));

        // Covered by an accepted invalidation: never unflushed, however long.
        let mut a = EntryAudit {
            covered: true,
            ..EntryAudit::default()
        };
        a.observe(Some(t0), grace);
        assert_eq!(a.observe(Some(t0 + 100 * grace), grace), Verdict::default());
    }

    #[test]
    fn narrow_flush_needs_a_completed_invalidation_that_left_it_behind() {
        let grace = Duration::ZERO;
        let t0 = Instant::now();
        // Left behind by 5 (ahead at its acceptance); 5 completes.
        let mut a = EntryAudit::default();
        let v = a.passed_over(5, Some(t0), Duration::from_secs(1));
        assert_eq!(v, Verdict::default(), "within the grace period");
        a.completed(4);
        assert!(!a.left_behind_done, "another invalidation");
        a.completed(5);
        assert_eq!(
            a.observe(Some(t0), grace),
            Verdict {
                unflushed: true,
                narrow: true
            }
        );
        // Passed over while agreeing with memory: not left behind.
        let mut a = EntryAudit::default();
        a.passed_over(5, None, grace);
        a.completed(5);
        assert_eq!(
            a.observe(Some(t0), grace),
            Verdict {
                unflushed: true,
                narrow: false
            }
        );
        // Left behind, not yet completed: unflushed now, narrow once it completes.
        let mut a = EntryAudit::default();
        assert_eq!(
            a.passed_over(6, Some(t0), grace),
            Verdict {
                unflushed: true,
                narrow: false
            }
        );
        a.completed(6);
        assert_eq!(
            a.observe(Some(t0), grace),
            Verdict {
                unflushed: false,
                narrow: true
            }
        );
        assert_eq!(a.observe(Some(t0), grace), Verdict::default(), "once each");
    }
}
