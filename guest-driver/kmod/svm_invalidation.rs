// SPDX-License-Identifier: GPL-2.0

//! The state an SVM invalidation carries from its first pass to its second, shared by both
//! SVM implementations (`svm.rs`, `gpusvm_svm.rs`): the devices (VMs) it started a
//! `TLB_INVALIDATE` on, and what it could not track.

use crate::{ctrl::Ticket, vm::Vm, wire};
use kernel::{
    prelude::*,
    sync::{
        atomic::{Atomic, Relaxed},
        Arc,
    },
    time::{Instant, Monotonic},
};

/// Devices (VMs) one pending invalidation tracks; more are invalidated synchronously.
pub(crate) const MAX_TARGETS: usize = 16;

/// One device (VM) an invalidation started on.
pub(crate) struct Target {
    pub(crate) vm: Arc<Vm>,
    pub(crate) ticket: Option<Ticket>,
    /// The first pass could not start the command without sleeping (back-pressure): the
    /// second pass starts it, outside the notifier lock.
    pub(crate) deferred: bool,
    /// The command could not be started: reset the device.
    pub(crate) failed: bool,
    pub(crate) start: u64,
    pub(crate) end: u64,
}

/// The first pass's state, carried to the second.
pub(crate) struct Pending {
    pub(crate) targets: [Option<Target>; MAX_TARGETS],
    /// More VMs were hit than `targets` holds: their pages carry `token`.
    pub(crate) overflow: bool,
    /// Pages marked by another overflowing invalidation were hit: wait for it.
    pub(crate) conflict: bool,
    /// Names this invalidation in the pages it could not track (never 0).
    pub(crate) token: u64,
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) t0: Instant<Monotonic>,
}

/// Source of [`Pending::token`].
static TOKENS: Atomic<u64> = Atomic::new(1);

impl Pending {
    pub(crate) fn new(start: usize, end: usize) -> Self {
        Self {
            targets: [const { None }; MAX_TARGETS],
            overflow: false,
            conflict: false,
            token: TOKENS.fetch_add(1, Relaxed),
            start,
            end,
            t0: Instant::<Monotonic>::now(),
        }
    }

    /// Counts the invalidation on every device it stops, as one of `two` passes or one.
    pub(crate) fn count(&self, two: bool) {
        for t in self.targets.iter().flatten() {
            let s = &t.vm.gpu.stats;
            if two {
                s.invalidations_two_pass.add(1, Relaxed);
            } else {
                s.invalidations_single_pass.add(1, Relaxed);
            }
        }
    }

    /// Whether the invalidation started on `vm`'s device.
    pub(crate) fn is_target(&self, vm: &Arc<Vm>) -> bool {
        self.targets
            .iter()
            .flatten()
            .any(|t| Arc::ptr_eq(&t.vm, vm))
    }
}

/// Starts a `TLB_INVALIDATE` of `[start, end)` on the VM's device; `may_sleep` as for
/// [`crate::ctrl::CtrlQueue::start`].
pub(crate) fn start_tlb_invalidate(
    vm: &Vm,
    start: u64,
    end: u64,
    may_sleep: bool,
) -> Result<Ticket> {
    let body = wire::TlbInvalidateReq {
        asid: vm.asid,
        flags: 0,
        va: start,
        size: end - start,
    }
    .to_bytes();
    vm.gpu
        .ctrl
        .start(wire::Opcode::TlbInvalidate, &body, may_sleep)
}
