// SPDX-License-Identifier: GPL-2.0

//! GPU page-fault service (spec section 13).
//!
//! A `PAGE_FAULT` event stalls one context until the driver replies `RESUME` (retry the
//! access) or `CANCEL` (the job fails). The service is split so that one slow fault (an
//! `hmm_range_fault` that waits for I/O, a VM whose invalidations keep racing) stalls
//! nobody else:
//!
//! - the eventq callback (interrupt context) puts every fault in the device's
//!   [`FaultRing`] (preallocated, IRQ-safe; a fault already queued is a duplicate) and
//!   queues the device's *dispatcher*;
//! - the dispatcher hands each fault to the VM of its ASID — every VM has a ring of its
//!   own and a work item — and answers faults of unknown ASIDs (`CANCEL`) itself;
//! - each VM's *fault worker* drains its ring in batches: it resolves the faults in order
//!   (a fault on a page the batch already resolved reuses that result; a fault in an SVM
//!   range faults the whole range in once), then posts the batch's `FAULT_REPLY`s
//!   together and collects their answers afterwards, instead of one round trip each.
//!
//! All of it runs on the module's `WQ_MEM_RECLAIM` workqueue (`crate::reclaim_queue`),
//! unbound: workers of different VMs run concurrently. Faults of one VM are resolved in
//! order, by one worker at a time (the VM lock serialises them anyway).

use crate::{
    gpu::{Gpu, GpuAccess},
    vm::Vm,
    wire,
};
use kernel::{
    prelude::*,
    sync::{atomic::Relaxed, Arc},
    time::{Instant, Monotonic},
};

/// Faults a VM worker resolves before it posts their replies.
const BATCH: usize = 16;

/// A GPU page fault waiting for service.
#[derive(Clone, Copy, Default)]
pub(crate) struct FaultRec {
    pub(crate) fault_id: u64,
    pub(crate) va: u64,
    pub(crate) asid: u32,
    pub(crate) access: u32,
    pub(crate) ctx_id: u32,
    /// `wire::FaultReason`.
    pub(crate) reason: u32,
    /// When the event arrived (service-time statistics).
    pub(crate) t0: Option<Instant<Monotonic>>,
}

/// A fixed-capacity FIFO of faults (allocated up front: it is filled from interrupt
/// context, or under a spinlock).
pub(crate) struct FaultRing {
    recs: KVec<FaultRec>,
    head: usize,
    len: usize,
    /// Faults that found the ring full.
    pub(crate) dropped: u64,
}

impl FaultRing {
    /// A ring of `cap` faults (allocates: no locks held).
    pub(crate) fn new(cap: usize) -> Result<Self> {
        Ok(Self {
            recs: KVec::from_elem(FaultRec::default(), cap.max(1), GFP_KERNEL)?,
            head: 0,
            len: 0,
            dropped: 0,
        })
    }

    /// Appends `f`; false (and counted) if the ring is full.
    pub(crate) fn push(&mut self, f: FaultRec) -> bool {
        let cap = self.recs.len();
        if self.len == cap {
            self.dropped += 1;
            return false;
        }
        self.recs[(self.head + self.len) % cap] = f;
        self.len += 1;
        true
    }

    /// Takes the oldest fault.
    pub(crate) fn pop(&mut self) -> Option<FaultRec> {
        if self.len == 0 {
            return None;
        }
        let f = self.recs[self.head];
        self.head = (self.head + 1) % self.recs.len();
        self.len -= 1;
        Some(f)
    }

    /// Whether a fault with this id is queued.
    pub(crate) fn contains(&self, fault_id: u64) -> bool {
        let cap = self.recs.len();
        (0..self.len).any(|i| self.recs[(self.head + i) % cap].fault_id == fault_id)
    }

    /// Forgets every queued fault (the device was reset: they are gone there too).
    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }
}

/// What the driver answers a fault, and why (statistics).
#[derive(Clone, Copy)]
struct Outcome {
    action: wire::FaultAction,
    /// The mapping was valid already (a spurious fault, or a walk that failed to read).
    was_valid: bool,
    /// The fault could not be resolved (`CANCEL`).
    failed: bool,
}

/// Resolves `f` for `vm` and tells the fault's context what it needs to know.
fn resolve(gpu: &Gpu, vm: &Arc<Vm>, f: &FaultRec) -> Outcome {
    let res = vm.handle_fault(f.va, f.access);
    let was_valid = res == Ok(true);
    let res = res.map(|_| ());
    // EAGAIN: CPU invalidations kept racing with the resolution; the access is retried
    // and faults again (the device never caches a failed walk).
    let ok = res.is_ok() || res == Err(EAGAIN);
    if res == Err(EACCES) {
        // A write to memory the CPU maps read-only: the fence says so.
        gpu.set_fault_errno(f.ctx_id, EACCES);
    }
    Outcome {
        action: if ok {
            wire::FaultAction::Resume
        } else {
            wire::FaultAction::Cancel
        },
        was_valid,
        failed: !ok,
    }
}

/// Whether a fault at `b` is answered by having resolved one at `a` (same page, and `a`
/// asked for at least the access `b` needs).
fn same_resolution(a: &FaultRec, b: &FaultRec) -> bool {
    let page = |f: &FaultRec| f.va & !(wire::PAGE_SIZE_4K - 1);
    let writes = |f: &FaultRec| {
        matches!(
            wire::AccessKind::from_u32(f.access),
            Some(wire::AccessKind::Write | wire::AccessKind::Atomic)
        )
    };
    page(a) == page(b) && (writes(a) || !writes(b))
}

impl Gpu {
    /// The dispatcher: hands every queued fault to its VM's worker; answers those of
    /// ASIDs without a VM (`CANCEL`).
    pub(crate) fn dispatch_faults(self: &Arc<Self>, acc: &GpuAccess<'_>) {
        while let Some(f) = self.pop_fault() {
            if self.is_dead() {
                return;
            }
            match self.vm_of(f.asid) {
                Some(vm) => {
                    if vm.queue_fault(f) {
                        vm.queue_fault_work();
                    } else {
                        // The VM's ring is full (more faults than the device has
                        // outstanding: duplicates). Let the access fault again.
                        self.reply_faults(acc, &[(f, wire::FaultAction::Resume)]);
                    }
                }
                None => {
                    self.stats.gpu_faults.add(1, Relaxed);
                    self.stats.gpu_faults_failed.add(1, Relaxed);
                    self.reply_faults(acc, &[(f, wire::FaultAction::Cancel)]);
                }
            }
        }
    }

    /// Sends the `FAULT_REPLY`s of `replies` without waiting for each answer: all are
    /// posted, then collected. `NOT_FOUND` answers are normal (duplicated or phantom
    /// faults, a context destroyed or a device reset meanwhile) and only counted.
    pub(crate) fn reply_faults(
        &self,
        _acc: &GpuAccess<'_>,
        replies: &[(FaultRec, wire::FaultAction)],
    ) {
        let mut posted: [Option<(crate::ctrl::Posted, Instant<Monotonic>)>; BATCH] =
            [const { None }; BATCH];
        for chunk in replies.chunks(BATCH) {
            for ((f, action), slot) in chunk.iter().zip(posted.iter_mut()) {
                let body = wire::FaultReplyReq {
                    fault_id: f.fault_id,
                    action: action.as_u32(),
                    flags: 0,
                }
                .to_bytes();
                // Service time: from the event to the reply handed to the device.
                if let Some(t0) = f.t0 {
                    let dt = t0.elapsed().as_nanos().max(0) as u64;
                    self.stats.fault_service_ns.add(dt, Relaxed);
                }
                // At most BATCH of ours are in flight, far fewer than the queue's slots:
                // waiting for a free one always ends (other senders free theirs).
                *slot = self
                    .ctrl
                    .post(
                        wire::Opcode::FaultReply,
                        &body,
                        0,
                        None,
                        &Default::default(),
                        true,
                    )
                    .ok()
                    .map(|p| (p, Instant::<Monotonic>::now()));
            }
            for (slot, (f, _)) in posted.iter_mut().zip(chunk) {
                if let Some((p, t)) = slot.take() {
                    if let Ok(reply) = self.ctrl.collect(p, &mut []) {
                        if reply.status == wire::Status::NotFound.as_u32() {
                            self.recovery.fault_replies_not_found.add(1, Relaxed);
                        }
                    }
                    // Acknowledgement time: from the reply handed to the device to its
                    // answer (the device resumes the context before it answers).
                    let dt = t.elapsed().as_nanos().max(0) as u64;
                    self.stats.fault_ack_ns.add(dt, Relaxed);
                }
                // The context continues: the watchdog counts this as progress.
                self.ctx_progress(f.ctx_id);
            }
        }
    }
}

impl Vm {
    /// The VM's fault worker: resolves its queued faults in batches (see the module
    /// documentation).
    pub(crate) fn service_faults(self: &Arc<Self>) {
        let gpu = &self.gpu;
        let Ok(acc) = gpu.enter() else { return };
        loop {
            let mut batch = [FaultRec::default(); BATCH];
            let mut n = 0;
            while n < BATCH {
                match self.pop_fault() {
                    Some(f) => {
                        batch[n] = f;
                        n += 1;
                    }
                    None => break,
                }
            }
            if n == 0 || gpu.is_dead() {
                return;
            }
            let mut replies = [(FaultRec::default(), wire::FaultAction::Resume); BATCH];
            let mut outcomes: [Option<Outcome>; BATCH] = [None; BATCH];
            for i in 0..n {
                let f = batch[i];
                gpu.stats.gpu_faults.add(1, Relaxed);
                if f.reason == wire::FaultReason::BadTableAddress.as_u32() {
                    gpu.recovery.faults_bad_table.add(1, Relaxed);
                }
                // A page the batch resolved already (several contexts, or accesses of one
                // instruction, on the same page): the same answer, without another walk.
                let earlier = (0..i)
                    .find(|&j| same_resolution(&batch[j], &f))
                    .and_then(|j| outcomes[j]);
                let o = match earlier {
                    Some(o) if !o.failed => Outcome {
                        was_valid: false,
                        ..o
                    },
                    _ => resolve(gpu, self, &f),
                };
                if o.was_valid {
                    gpu.recovery.faults_on_valid_mappings.add(1, Relaxed);
                }
                if o.failed {
                    gpu.stats.gpu_faults_failed.add(1, Relaxed);
                }
                outcomes[i] = Some(o);
                replies[i] = (f, o.action);
            }
            gpu.reply_faults(&acc, &replies[..n]);
        }
    }
}
