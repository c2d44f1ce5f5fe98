// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the device has room for (spec/svmgpu.md sections 6.3.3, 6.4.11 and 6.6): slots a command
//! takes when it is accepted and gets back only when its last trace has left the device —
//! its completion record is in a used ring, or it was discarded without one. A driver that
//! posts no completion buffers therefore meets `BUSY`, never a backlog that grows.
//!
//! - asynchronous commands: at most [`MAX_ASYNC_OUTSTANDING`] until their COMMAND_DONE is
//!   delivered;
//! - jobs: at most [`JOB_QUEUE_DEPTH`] per context id — queued, running, or completed with
//!   their JOB_DONE not yet delivered. Counted per id, not per context, so destroying and
//!   re-creating a context does not make room;
//! - FENCE records held: at most [`FENCE_BACKLOG`]; a FENCE with NOTIFY waits meanwhile.
//!
//! Outstanding page faults are bounded by the fault table (`max_outstanding_faults`), which
//! frees a slot when the fault is answered or dropped; the outbox withdraws the fault's
//! event then, so it is bounded by the same number.
//!
//! Lock-free: every counter is an atomic that never goes below zero or above its bound.

use std::sync::atomic::{AtomicU32, Ordering};

use svmgpu_spec::{FENCE_BACKLOG, JOB_QUEUE_DEPTH, MAX_ASYNC_OUTSTANDING};

/// Takes one unit of `c` if that keeps it at most `max`.
fn take(c: &AtomicU32, max: u32) -> bool {
    c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
        (n < max).then_some(n + 1)
    })
    .is_ok()
}

/// Gives back `n` units of `c` (never below zero: a reset may have cleared it meanwhile).
fn give(c: &AtomicU32, n: u32) {
    let _ = c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        Some(v.saturating_sub(n))
    });
}

/// The device's slots.
#[derive(Debug)]
pub struct Budget {
    async_cmds: AtomicU32,
    jobs: Vec<AtomicU32>,
    fences: AtomicU32,
}

impl Budget {
    /// Every slot free, for a device of `max_contexts` contexts.
    pub fn new(max_contexts: u32) -> Self {
        Self {
            async_cmds: AtomicU32::new(0),
            jobs: (0..max_contexts).map(|_| AtomicU32::new(0)).collect(),
            fences: AtomicU32::new(0),
        }
    }

    /// Takes an asynchronous-command slot; false if all are in use (`BUSY`).
    pub fn take_async(&self) -> bool {
        take(&self.async_cmds, MAX_ASYNC_OUTSTANDING)
    }

    /// Gives an asynchronous-command slot back (its COMMAND_DONE was delivered, or the
    /// command was never started).
    pub fn give_async(&self) {
        give(&self.async_cmds, 1);
    }

    /// Asynchronous commands holding a slot.
    pub fn async_held(&self) -> u32 {
        self.async_cmds.load(Ordering::Acquire)
    }

    /// Takes a job slot of context id `ctx`; false if it has none left (`BUSY`) or the id
    /// is out of range.
    pub fn take_job(&self, ctx: u32) -> bool {
        self.jobs
            .get(ctx as usize)
            .is_some_and(|c| take(c, JOB_QUEUE_DEPTH))
    }

    /// Gives `n` job slots of context id `ctx` back.
    pub fn give_jobs(&self, ctx: u32, n: u32) {
        if let Some(c) = self.jobs.get(ctx as usize) {
            give(c, n);
        }
    }

    /// Job slots context id `ctx` holds.
    pub fn jobs_held(&self, ctx: u32) -> u32 {
        self.jobs
            .get(ctx as usize)
            .map_or(0, |c| c.load(Ordering::Acquire))
    }

    /// True if a FENCE with NOTIFY may post now.
    pub fn fence_room(&self) -> bool {
        self.fences.load(Ordering::Acquire) < FENCE_BACKLOG
    }

    /// Counts a FENCE record held. It may exceed the bound by the FENCEs that checked for
    /// room at the same time (one per engine): the bound is what makes a FENCE wait.
    pub fn hold_fence(&self) {
        self.fences.fetch_add(1, Ordering::AcqRel);
    }

    /// A held FENCE record was delivered.
    pub fn release_fence(&self) {
        give(&self.fences, 1);
    }

    /// Every slot free again (a reset discarded what held them).
    pub fn clear(&self) {
        self.async_cmds.store(0, Ordering::Release);
        for c in &self.jobs {
            c.store(0, Ordering::Release);
        }
        self.fences.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_release() {
        let b = Budget::new(2);
        for _ in 0..MAX_ASYNC_OUTSTANDING {
            assert!(b.take_async());
        }
        assert!(!b.take_async(), "BUSY at the limit");
        b.give_async();
        assert!(b.take_async());
        for _ in 0..JOB_QUEUE_DEPTH {
            assert!(b.take_job(1));
        }
        assert!(!b.take_job(1));
        assert!(b.take_job(0), "per context id");
        assert!(!b.take_job(2), "id out of range");
        b.give_jobs(1, 3);
        assert_eq!(b.jobs_held(1), JOB_QUEUE_DEPTH - 3);
        b.give_jobs(1, 1000);
        assert_eq!(b.jobs_held(1), 0, "never below zero");
        for _ in 0..FENCE_BACKLOG {
            assert!(b.fence_room());
            b.hold_fence();
        }
        assert!(!b.fence_room());
        b.release_fence();
        assert!(b.fence_room());
        b.clear();
        assert_eq!((b.async_held(), b.jobs_held(0)), (0, 0));
        b.give_async();
        assert_eq!(b.async_held(), 0);
    }
}
