// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Outstanding page faults (spec/svmgpu.md section 6.12): ids, the bound on outstanding
//! faults, coalescing of accesses to one page, and the queue of faults waiting for a slot.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use crate::mmu::Fault;

/// A context waiting on a fault: its id and unique id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiter {
    /// Context id.
    pub ctx: u32,
    /// Context uid.
    pub uid: u64,
}

/// What a fault event reports besides the id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultReport {
    /// ASID.
    pub asid: u32,
    /// Engine the access ran on.
    pub engine: u32,
    /// The failed access.
    pub fault: Fault,
}

/// One outstanding fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outstanding {
    /// The report of the access that raised it.
    pub report: FaultReport,
    /// Contexts whose access waits on it (more than one only with coalescing).
    pub waiters: Vec<Waiter>,
    /// When it was raised (the fault-service statistics).
    pub raised: Instant,
}

/// When a fault answered RESUME went through its stages (spec 6.18): what the statistics
/// need once the access is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultTimes {
    /// Raised (the access failed).
    pub raised: Instant,
    /// Its PAGE_FAULT event was delivered, if it was.
    pub delivered: Option<Instant>,
    /// Its FAULT_REPLY was accepted.
    pub replied: Instant,
}

/// Result of [`FaultTable::raise`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Raised {
    /// A new fault: post a PAGE_FAULT event with this id.
    New(u64),
    /// Attached to an outstanding fault on the same page (coalescing).
    Attached(u64),
    /// The maximum is outstanding: the access waits for a slot, without an event.
    Deferred,
}

/// The device's outstanding faults.
#[derive(Debug)]
pub struct FaultTable {
    next_id: u64,
    max: usize,
    outstanding: HashMap<u64, Outstanding>,
    deferred: VecDeque<(Waiter, FaultReport)>,
}

impl FaultTable {
    /// An empty table allowing `max` outstanding faults.
    pub fn new(max: usize) -> Self {
        Self {
            next_id: 1,
            max: max.max(1),
            outstanding: HashMap::new(),
            deferred: VecDeque::new(),
        }
    }

    /// Faults outstanding.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Raises (or attaches, or defers) the fault of `w`'s access, at `now`.
    pub fn raise(
        &mut self,
        w: Waiter,
        report: FaultReport,
        coalesce: bool,
        now: Instant,
    ) -> Raised {
        if coalesce {
            let page = report.fault.va >> 12;
            let same = self
                .outstanding
                .iter_mut()
                .find(|(_, o)| o.report.asid == report.asid && o.report.fault.va >> 12 == page);
            if let Some((&id, o)) = same {
                o.waiters.push(w);
                return Raised::Attached(id);
            }
        }
        if self.outstanding.len() >= self.max {
            self.deferred.push_back((w, report));
            return Raised::Deferred;
        }
        let id = self.next_id;
        // Ids are never reused while the backend runs (2^64 faults are out of reach).
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.outstanding.insert(
            id,
            Outstanding {
                report,
                waiters: vec![w],
                raised: now,
            },
        );
        Raised::New(id)
    }

    /// A fresh fault id that is never outstanding (an injected phantom fault's): a reply
    /// to it gets NOT_FOUND.
    pub fn allocate_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    /// Removes a fault being replied to.
    pub fn take(&mut self, id: u64) -> Option<Outstanding> {
        self.outstanding.remove(&id)
    }

    /// The next deferred fault, if a slot is free.
    pub fn next_deferred(&mut self) -> Option<(Waiter, FaultReport)> {
        if self.outstanding.len() < self.max {
            self.deferred.pop_front()
        } else {
            None
        }
    }

    /// Forgets a context (destroyed or in error): its waits are dropped, and so is every
    /// fault no other context waits on. Returns the ids of the faults dropped.
    pub fn forget(&mut self, uid: u64) -> Vec<u64> {
        let mut dropped = Vec::new();
        self.outstanding.retain(|&id, o| {
            o.waiters.retain(|w| w.uid != uid);
            if o.waiters.is_empty() {
                dropped.push(id);
            }
            !o.waiters.is_empty()
        });
        self.deferred.retain(|(w, _)| w.uid != uid);
        dropped
    }

    /// Drops everything (reset); ids keep counting.
    pub fn clear(&mut self) {
        self.outstanding.clear();
        self.deferred.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use svmgpu_spec::{AccessKind, FaultReason};

    fn report(va: u64) -> FaultReport {
        FaultReport {
            asid: 1,
            engine: 0,
            fault: Fault {
                va,
                access: AccessKind::Read,
                reason: FaultReason::NotPresent,
                level: 0,
            },
        }
    }

    fn w(n: u64) -> Waiter {
        Waiter {
            ctx: n as u32,
            uid: n,
        }
    }

    #[test]
    fn raise_coalesce_defer_forget() {
        let mut t = FaultTable::new(2);
        let now = Instant::now();
        assert_eq!(t.raise(w(1), report(0x1000), true, now), Raised::New(1));
        assert_eq!(
            t.raise(w(2), report(0x1ff8), true, now),
            Raised::Attached(1)
        );
        assert_eq!(t.raise(w(3), report(0x1ff8), false, now), Raised::New(2));
        assert_eq!(t.raise(w(4), report(0x5000), true, now), Raised::Deferred);
        assert_eq!(t.next_deferred(), None);
        let o = t.take(1).unwrap();
        assert_eq!(o.waiters, vec![w(1), w(2)]);
        assert_eq!(t.take(1), None);
        assert_eq!(t.next_deferred(), Some((w(4), report(0x5000))));
        assert_eq!(t.forget(3), vec![2]);
        assert_eq!(t.outstanding(), 0);
        assert_eq!(t.forget(3), Vec::<u64>::new());
        t.clear();
        assert_eq!(
            t.raise(w(1), report(0), false, now),
            Raised::New(3),
            "ids are not reused"
        );
        assert_eq!(t.allocate_id(), 4);
        assert_eq!(t.take(4), None, "an allocated id is never outstanding");
        assert_eq!(t.raise(w(1), report(0), false, now), Raised::New(5));
    }
}
