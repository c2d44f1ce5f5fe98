// SPDX-License-Identifier: GPL-2.0

//! Userptr bindings: a GPU VA range of a VM mapped to a CPU range of a process, without
//! pinning, kept coherent with the CPU page tables by an MMU interval notifier.
//!
//! Per binding, two kinds of state (see the locking overview in `svmgpu.rs`):
//!
//! - [`Entry`] (under the VM lock): the binding and the scratch arrays used to fault the
//!   CPU pages in (`hmm_range_fault`) and to compute their addresses before committing;
//! - [`UNState`] (under the VM's notifier lock, via `LockedBy`): whether the GPU mapping
//!   is valid, the notifier sequence it was made for, and invalidations in flight.
//!
//! [`revalidate`] follows the VM_BIND locking rules: `mmu_interval_read_begin` and fault
//! without the notifier lock, then under it check `mmu_interval_read_retry` and only then
//! take the pages' guest-physical addresses and write the PTEs (else drop the work and
//! retry), as `drm_gpusvm_get_pages` maps pages only under its notifier lock: an unpinned
//! page is never used after an invalidation could have freed it. The device uses
//! guest-physical addresses (spec, "Addresses"), so no page is DMA-mapped and nothing is
//! unmapped afterwards. The notifier, under the same lock,
//! publishes the new sequence (`mmu_interval_set_seq`), marks the binding invalid and
//! clears its PTEs, then stops the device: it *starts* a `TLB_INVALIDATE` for the binding
//! (and a `CTX_PREEMPT` for the VM's long-running queues) and *waits* for them, in the
//! same call (single pass) or in `invalidate_finish` (two passes, with the state carried
//! in a [`FinishRef`] from the device's preallocated [`FinishPool`]; when the pool is
//! empty it falls back to single pass). A failed or timed-out wait resets the device,
//! after which it holds no translation.

use crate::{
    ctrl::Ticket,
    finish_pool,
    gpu::GpuAccess,
    hmm::{self, HmmPfn},
    mmu_notifier::{IntervalNotifier, IntervalOps, Invalidation, Start},
    pagetable::Prealloc,
    vm::{NState, Vm, MAX_LR_PER_VM},
    wire,
};
use kernel::{
    prelude::*,
    sync::{atomic::Relaxed, Arc, LockedBy},
    time::{Instant, Monotonic},
};

/// Second-pass state of a userptr notifier, from the device's pool.
type FinishRef = finish_pool::FinishRef<Pending>;
/// The device's pool of userptr second-pass states.
pub(crate) type FinishPool = finish_pool::FinishPool<Pending>;

/// State of a binding under the VM's notifier lock.
pub(crate) struct UNState {
    /// The PTEs map the pages of `seq`, which the device may use.
    pub(crate) valid: bool,
    /// The notifier sequence the mapping was made for.
    pub(crate) seq: u64,
    /// Invalidations started and not finished.
    pub(crate) inflight: u32,
}

/// The notifier's data: one binding.
pub(crate) struct UserptrData {
    pub(crate) vm: Arc<Vm>,
    pub(crate) va: u64,
    pub(crate) size: u64,
    pub(crate) cpu: usize,
    pub(crate) readonly: bool,
    pub(crate) n: LockedBy<UNState, NState>,
}

/// A binding's notifier.
pub(crate) type Userptr = IntervalNotifier<UserptrData>;

/// A binding in the VM's list (under the VM lock).
pub(crate) struct Entry {
    pub(crate) up: Pin<KBox<Userptr>>,
    /// Scratch: the PFNs `hmm_range_fault` returns.
    pub(crate) pfns: KVVec<HmmPfn>,
    /// Scratch: the pages' addresses, computed under the notifier lock for the PTEs.
    pub(crate) staging: KVVec<u64>,
    /// The last revalidation failed (e.g. the CPU range is unmapped).
    pub(crate) broken: bool,
}

impl Entry {
    pub(crate) fn data(&self) -> &UserptrData {
        self.up.data()
    }

    /// Whether `[va, va + size)` intersects this binding.
    pub(crate) fn overlaps(&self, va: u64, size: u64) -> bool {
        crate::vm::ranges_overlap(self.data().va, self.data().size, va, size)
    }
}

/// Makes the binding's GPU mapping valid again (or for the first time): the VM_BIND
/// locking rules' retry loop. The caller holds the VM lock (`entry` is in its list) and a
/// [`GpuAccess`]. Errors: those of [`hmm::fault_range`] (`EFAULT`...), `ENOMEM`, `ENODEV`
/// (the VM died), `EAGAIN` (invalidations kept racing).
pub(crate) fn revalidate(entry: &mut Entry, acc: &GpuAccess<'_>) -> Result {
    let Entry {
        up,
        pfns,
        staging,
        broken,
    } = entry;
    let d = up.data();
    let vm = &d.vm;
    for _ in 0..64 {
        {
            let ns = vm.nlock.lock();
            if ns.dead {
                return Err(ENODEV);
            }
            if d.n.access(&ns).valid {
                *broken = false;
                return Ok(());
            }
        }
        let seq = match hmm::fault_range(up, d.cpu, pfns, !d.readonly) {
            Ok(seq) => seq,
            Err(e) => {
                *broken = true;
                return Err(e);
            }
        };
        vm.gpu.race_delay();
        let counts = {
            let ns = vm.nlock.lock();
            match ns.pt.as_ref() {
                Some(pt) => pt.missing(d.va, d.size),
                None => [0; 3],
            }
        };
        let mut pre = Prealloc::alloc(acc.dma_dev(), counts)?;
        let mut ns = vm.nlock.lock();
        if ns.dead {
            return Err(ENODEV);
        }
        if up.read_retry(seq) {
            // An invalidation ran since `read_begin`: these pages may be stale (or freed).
            continue;
        }
        // Current pages: only now may their addresses reach the device.
        if let Err(e) = hmm::page_addresses(pfns, staging) {
            *broken = true;
            return Err(e);
        }
        let mapped = match ns.pt.as_mut() {
            Some(pt) => {
                let r = pt.map(d.va, staging, !d.readonly, &mut pre);
                if r.is_err() {
                    pt.clear(d.va, d.size);
                }
                r
            }
            None => Err(ENODEV),
        };
        mapped?;
        let un = d.n.access_mut(&mut ns);
        un.valid = true;
        un.seq = seq;
        *broken = false;
        drop(ns);
        drop(pre);
        return Ok(());
    }
    Err(EAGAIN)
}

/// Clears the binding's PTEs and marks it invalid (for unbind), under the notifier lock.
pub(crate) fn zap(entry: &Entry, ns: &mut NState) {
    let d = entry.data();
    if let Some(pt) = ns.pt.as_mut() {
        pt.clear(d.va, d.size);
    }
    d.n.access_mut(ns).valid = false;
}

/// The notifier-side state of a new binding.
pub(crate) fn new_unstate() -> UNState {
    UNState {
        valid: false,
        seq: 0,
        inflight: 0,
    }
}

// ---- invalidation -------------------------------------------------------------------------

/// Device work started by the first pass.
pub(crate) struct Pending {
    /// Commands started (or joined) by the first pass.
    tickets: [Option<Ticket>; 1 + MAX_LR_PER_VM],
    /// Commands the first pass could not start without sleeping (every command slot or
    /// asynchronous entry in use: back-pressure, never a reason to reset): the second pass
    /// starts them, outside the notifier lock, before it waits. The binding's TLB
    /// invalidation, and the contexts to preempt.
    deferred_tlb: bool,
    deferred_preempts: [Option<u32>; MAX_LR_PER_VM],
    /// A command could not be started at all (the device is going away or was given up).
    failed: bool,
    /// The latest seqno of the commands (a reset served after it covers them all).
    last_seqno: u64,
    preempted: bool,
    t0: Instant<Monotonic>,
}

impl Pending {
    fn new() -> Self {
        Self {
            tickets: [const { None }; 1 + MAX_LR_PER_VM],
            deferred_tlb: false,
            deferred_preempts: [None; MAX_LR_PER_VM],
            failed: false,
            last_seqno: 0,
            preempted: false,
            t0: Instant::<Monotonic>::now(),
        }
    }

    fn push(&mut self, t: Ticket) {
        self.last_seqno = self.last_seqno.max(t.seqno());
        if let Some(slot) = self.tickets.iter_mut().find(|t| t.is_none()) {
            *slot = Some(t);
        }
    }
}

// `Started` is moved once, into the core's finish slot: boxing it would allocate in the
// notifier's first pass.
#[allow(clippy::large_enum_variant)]
enum Begin {
    Retry,
    Nothing,
    Started(Pending),
}

impl UserptrData {
    fn tlb_body(&self) -> [u8; wire::TlbInvalidateReq::SIZE] {
        wire::TlbInvalidateReq {
            asid: self.vm.asid,
            flags: 0,
            va: self.va,
            size: self.size,
        }
        .to_bytes()
    }

    /// The first pass: publish the sequence, invalidate the mapping, start the device work.
    fn begin(this: &Userptr, inv: &Invalidation<'_>) -> Begin {
        let d = this.data();
        let vm = &d.vm;
        let mut ns = if inv.blockable() {
            vm.nlock.lock()
        } else {
            match vm.nlock.try_lock() {
                Some(g) => g,
                None => return Begin::Retry,
            }
        };
        let dead = ns.dead;
        let un = d.n.access_mut(&mut ns);
        if dead || !(un.valid || un.inflight > 0) {
            // The device cannot be using these pages.
            inv.set_seq();
            return Begin::Nothing;
        }
        if !inv.blockable() {
            return Begin::Retry;
        }
        inv.set_seq();
        let was_valid = un.valid;
        un.valid = false;
        un.inflight += 1;
        if was_valid {
            if let Some(pt) = ns.pt.as_mut() {
                pt.clear(d.va, d.size);
            }
        }
        let mut p = Pending::new();
        let ctrl = &vm.gpu.ctrl;
        // Long-running queues: preempt them (the rebind worker resumes them), once per
        // VM: an invalidation that finds a preemption in flight (started by another
        // binding's invalidation, not resumed since) waits for that one too.
        for (k, lr) in ns.lr.iter_mut().enumerate() {
            let joined = if lr.preempted {
                lr.preempt.and_then(|id| ctrl.join(id))
            } else {
                None
            };
            let started = match joined {
                Some(t) => Ok(t),
                None => {
                    let body = wire::CtxReq {
                        ctx_id: lr.ctx_id,
                        flags: 0,
                    }
                    .to_bytes();
                    ctrl.start(wire::Opcode::CtxPreempt, &body, false)
                }
            };
            match started {
                Ok(t) => {
                    lr.preempt = Some(t.id());
                    p.push(t);
                }
                Err(e) if e == EBUSY => p.deferred_preempts[k] = Some(lr.ctx_id),
                Err(_) => p.failed = true,
            }
            lr.preempted = true;
            p.preempted = true;
        }
        // The PTEs are cleared: invalidate the TLBs for the whole binding.
        match ctrl.start(wire::Opcode::TlbInvalidate, &d.tlb_body(), false) {
            Ok(t) => p.push(t),
            Err(e) if e == EBUSY => p.deferred_tlb = true,
            Err(_) => p.failed = true,
        }
        Begin::Started(p)
    }

    /// The second pass (or the rest of the single pass): start what the first pass
    /// deferred, wait, then release the pages.
    fn complete(this: &Userptr, mut p: Pending) {
        let d = this.data();
        let vm = &d.vm;
        let gpu = &vm.gpu;
        let ctrl = &gpu.ctrl;
        let deferred = p.deferred_preempts;
        let n_deferred = deferred.iter().flatten().count() + usize::from(p.deferred_tlb);
        gpu.stats.commands_deferred.add(n_deferred as u64, Relaxed);
        for ctx_id in deferred.iter().flatten() {
            let body = wire::CtxReq {
                ctx_id: *ctx_id,
                flags: 0,
            }
            .to_bytes();
            match ctrl.start(wire::Opcode::CtxPreempt, &body, true) {
                Ok(t) => p.push(t),
                Err(_) => p.failed = true,
            }
        }
        if p.deferred_tlb {
            match ctrl.start(wire::Opcode::TlbInvalidate, &d.tlb_body(), true) {
                Ok(t) => p.push(t),
                Err(_) => p.failed = true,
            }
        }
        let mut ok = !p.failed;
        for t in p.tickets.iter_mut() {
            if let Some(t) = t.take() {
                match ctrl.wait(t) {
                    Ok(done) if done.succeeded() => {}
                    _ => ok = false,
                }
            }
        }
        if !ok {
            // The device gives no guarantee: reset it, then it holds no translation and
            // runs nothing (if RESET fails, a virtio reset stops it for good).
            gpu.recovery.invalidation_failures.add(1, Relaxed);
            if p.failed {
                // A command never went out: only a reset after now covers the device.
                p.last_seqno = p.last_seqno.max(ctrl.last_seqno());
            }
            gpu.reset_and_recover(
                p.last_seqno,
                "an invalidation or preemption failed or timed out",
            );
        }
        let mut ns = vm.nlock.lock();
        let dead = ns.dead;
        let un = d.n.access_mut(&mut ns);
        un.inflight = un.inflight.saturating_sub(1);
        drop(ns);
        gpu.stats.invalidations.add(1, Relaxed);
        gpu.stats
            .invalidation_ns
            .add(p.t0.elapsed().as_nanos() as u64, Relaxed);
        if p.preempted && !dead {
            vm.queue_rebind();
        }
    }
}

impl IntervalOps for UserptrData {
    type Finish = FinishRef;

    fn invalidate(this: &Userptr, inv: &Invalidation<'_>) -> bool {
        match Self::begin(this, inv) {
            Begin::Retry => false,
            Begin::Nothing => true,
            Begin::Started(p) => {
                this.data()
                    .vm
                    .gpu
                    .stats
                    .invalidations_single_pass
                    .add(1, Relaxed);
                Self::complete(this, p);
                true
            }
        }
    }

    fn invalidate_start(this: &Userptr, inv: &Invalidation<'_>) -> Start<FinishRef> {
        match Self::begin(this, inv) {
            Begin::Retry => Start::Retry,
            Begin::Nothing => Start::Done,
            Begin::Started(p) => {
                let gpu = &this.data().vm.gpu;
                match gpu.finish_pool.get(p) {
                    Ok(f) => {
                        gpu.stats.invalidations_two_pass.add(1, Relaxed);
                        Start::Finish(f)
                    }
                    // No finish item free: fall back to single pass.
                    Err(p) => {
                        gpu.stats.invalidations_single_pass.add(1, Relaxed);
                        Self::complete(this, p);
                        Start::Done
                    }
                }
            }
        }
    }

    fn invalidate_finish(this: &Userptr, finish: FinishRef) {
        // `get` always stores a state before handing a slot out.
        let p = finish.into_inner().unwrap_or_else(|| {
            let mut p = Pending::new();
            p.failed = true;
            p
        });
        Self::complete(this, p);
    }
}
