// SPDX-License-Identifier: GPL-2.0

//! VMs: a GPU address space on one device (an ASID and its page table), its userptr
//! bindings, exec submission with revalidation, GPU page-fault resolution, and the
//! rebind worker that resumes long-running queues after an invalidation.

use crate::{
    ctrl::TicketId,
    drm_driver::SvmgpuDevice,
    exec_queue::ExecQueue,
    faults::{FaultRec, FaultRing},
    fence::JobRegistration,
    gpu::{Gpu, GpuAccess},
    mmu_notifier::{self, IntervalNotifier, Passes},
    pagetable::PageTable,
    svm_impl::SvmRef,
    userptr::{self, Entry, UserptrData},
    wire, NotifierMode,
};
use kernel::{
    dma_fence::Fence,
    new_mutex, new_spinlock, new_work,
    prelude::*,
    sync::{aref::ARef, Arc, LockedBy, Mutex, SpinLock},
    time::{delay::fsleep, Delta, Instant, Monotonic},
    workqueue::{impl_has_work, Work, WorkItem},
};

/// Long-running exec queues per VM (each one is preempted on invalidation).
pub(crate) const MAX_LR_PER_VM: usize = 16;
/// Rounds of the rebind worker while the device has no room for its resumes.
const REBIND_TRIES: usize = 5000;
/// Rounds of EXEC's revalidate / check / post loop (invalidations racing it, no room on
/// the device, a device-initiated reset in progress) before `EAGAIN`.
const EXEC_TRIES: usize = 1000;

/// Whether `[a, a + alen)` and `[b, b + blen)` intersect (lengths nonzero, no overflow).
pub(crate) fn ranges_overlap(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// Whether `[a, a + alen)` contains `x`.
pub(crate) fn range_contains(a: u64, alen: u64, x: u64) -> bool {
    x >= a && x - a < alen
}

/// Validates a VM_BIND range: 4 KiB aligned, nonzero, at most `max`, inside 48 bits.
pub(crate) fn check_bind_range(va: u64, size: u64, max: u64) -> Result {
    let page = wire::PAGE_SIZE_4K;
    if va % page != 0 || size % page != 0 || size == 0 || size > max {
        return Err(EINVAL);
    }
    let end = va.checked_add(size).ok_or(EINVAL)?;
    if end > 1u64 << wire::VA_BITS {
        return Err(EINVAL);
    }
    Ok(())
}

/// A long-running exec queue of the VM, as the notifier sees it.
pub(crate) struct LrCtx {
    pub(crate) ctx_id: u32,
    /// Preempted by an invalidation, not resumed yet.
    pub(crate) preempted: bool,
    /// The last preemption started while `preempted`: later invalidations join it
    /// instead of starting one each.
    pub(crate) preempt: Option<TicketId>,
}

/// What the notifier lock protects.
pub(crate) struct NState {
    /// The page table (`None` once the VM is destroyed or the device removed).
    pub(crate) pt: Option<PageTable>,
    pub(crate) dead: bool,
    /// Long-running queues (capacity reserved at creation: never allocates).
    pub(crate) lr: KVec<LrCtx>,
}

/// What the VM lock protects.
pub(crate) struct VState {
    /// Bindings, sorted by VA, non-overlapping.
    pub(crate) entries: KVec<Entry>,
    /// Exec queues using the VM.
    pub(crate) queues: u32,
    pub(crate) dead: bool,
    /// Fault mode: the SVM object of the creating process (one user reference).
    pub(crate) svm: Option<SvmRef>,
}

/// A VM.
///
/// Locks, outermost first: `lock` (the "gpu_vm lock": bindings, revalidation, exec), the
/// mmap lock (taken by `hmm_range_fault` and the core around notifiers), `nlock` (the
/// "notifier lock": validity of the GPU mappings, PTE writes; taken in MMU-notifier
/// callbacks, so nothing allocates under it).
#[pin_data]
pub(crate) struct Vm {
    pub(crate) gpu: Arc<Gpu>,
    pub(crate) asid: u32,
    pub(crate) fault_mode: bool,
    #[pin]
    pub(crate) lock: Mutex<VState>,
    #[pin]
    pub(crate) nlock: Mutex<NState>,
    #[pin]
    rebind_work: Work<Vm>,
    /// GPU faults of this VM waiting for its fault worker (`faults.rs`).
    #[pin]
    faults: SpinLock<FaultRing>,
    #[pin]
    fault_work: Work<Vm, 1>,
}

impl_has_work! {
    impl HasWork<Self> for Vm { self.rebind_work }
    impl HasWork<Self, 1> for Vm { self.fault_work }
}

impl WorkItem for Vm {
    type Pointer = Arc<Vm>;

    fn run(this: Arc<Vm>) {
        this.rebind();
    }
}

impl WorkItem<1> for Vm {
    type Pointer = Arc<Vm>;

    fn run(this: Arc<Vm>) {
        this.service_faults();
    }
}

impl Vm {
    /// Creates a VM: an ASID bound to an empty page table. `drm` is the device's DRM
    /// device (SVM pages of the `gpusvm` implementation are mapped for it).
    pub(crate) fn create(
        gpu: &Arc<Gpu>,
        acc: &GpuAccess<'_>,
        fault_mode: bool,
        drm: &SvmgpuDevice,
    ) -> Result<Arc<Vm>> {
        let svm = if fault_mode {
            Some(SvmRef::attach(gpu, drm)?)
        } else {
            None
        };
        // Whether the VM took over the user reference (its release gives it back).
        let handed = core::cell::Cell::new(false);
        let (svm_ref, handed_ref) = (&svm, &handed);
        let r = gpu.install_vm(|asid| {
            let pt = PageTable::new(acc.dma_dev())?;
            let root = pt.root_gpa();
            let lr = KVec::with_capacity(MAX_LR_PER_VM, GFP_KERNEL)?;
            let faults = FaultRing::new(crate::gpu::fault_ring_size(&gpu.config))?;
            let vm = Arc::pin_init(
                try_pin_init!(Vm {
                    gpu: gpu.clone(),
                    asid,
                    fault_mode,
                    lock <- new_mutex!(
                        VState {
                            entries: KVec::new(),
                            queues: 0,
                            dead: false,
                            svm: {
                                handed_ref.set(svm_ref.is_some());
                                svm_ref.clone()
                            },
                        },
                        "svmgpu_vm"
                    ),
                    nlock <- new_mutex!(
                        NState {
                            pt: Some(pt),
                            dead: false,
                            lr
                        },
                        "svmgpu_vm_notifier"
                    ),
                    rebind_work <- new_work!("svmgpu_vm_rebind"),
                    faults <- new_spinlock!(faults, "svmgpu_vm_faults"),
                    fault_work <- new_work!("svmgpu_vm_faults"),
                }),
                GFP_KERNEL,
            )?;
            let body = wire::AsidBindReq {
                asid,
                flags: 0,
                pt_root: root,
            }
            .to_bytes();
            if let Err(e) = gpu
                .ctrl
                .call(wire::Opcode::AsidBind, &body, &mut [])
                .and_then(|r| r.ok())
            {
                vm.release(false);
                return Err(e);
            }
            Ok(vm)
        });
        // The reference was not handed to a VM: creation failed before.
        if let Some(svm) = svm {
            if !handed.get() {
                svm.release();
            }
        }
        if let Ok(vm) = &r {
            // The notifier locks are taken from reclaim: tell lockdep once they exist (the
            // VM lock is not one of them: it is held around allocations).
            let svm = vm.lock.lock().svm.clone();
            crate::mmu_notifier::as_in_reclaim(|| {
                drop(vm.nlock.lock());
                if let Some(svm) = svm.as_ref() {
                    svm.prime_lockdep();
                }
            });
        }
        r
    }

    /// Binds the ASID to the page table again (after a device reset).
    pub(crate) fn rebind_asid(&self) -> Result {
        let root = match self.nlock.lock().pt.as_ref() {
            Some(pt) => pt.root_gpa(),
            None => return Ok(()),
        };
        let body = wire::AsidBindReq {
            asid: self.asid,
            flags: 0,
            pt_root: root,
        }
        .to_bytes();
        self.gpu
            .ctrl
            .call(wire::Opcode::AsidBind, &body, &mut [])
            .and_then(|r| r.ok())
            .map(|_| ())
    }

    /// Releases the VM's device state. With `unbind`, the ASID is unbound on the device
    /// first (which drops its TLB entries); without, the device was reset or never used
    /// the VM. Idempotent.
    fn release(&self, unbind: bool) {
        let (entries, svm) = {
            let mut vs = self.lock.lock();
            if vs.dead {
                return;
            }
            vs.dead = true;
            (core::mem::take(&mut vs.entries), vs.svm.take())
        };
        if unbind {
            let body = wire::AsidUnbindReq {
                asid: self.asid,
                flags: 0,
            }
            .to_bytes();
            let r = self
                .gpu
                .ctrl
                .call(wire::Opcode::AsidUnbind, &body, &mut [])
                .map(|r| r.status);
            match r {
                Ok(s) if s == wire::Status::Ok.as_u32() || s == wire::Status::NotFound.as_u32() => {
                }
                Err(e) if e == ENODEV => {}
                _ => self
                    .gpu
                    .reset_and_recover(self.gpu.ctrl.last_seqno(), "ASID_UNBIND failed"),
            }
        }
        if let Some(svm) = svm {
            // The device no longer uses the VM's translations (ASID unbound, or reset):
            // drop its SVM pages and give the object back.
            svm.detach_vm(self, None, false);
            svm.release();
        }
        {
            let mut ns = self.nlock.lock();
            ns.dead = true;
            let pt = ns.pt.take();
            ns.lr.clear();
            drop(ns);
            drop(pt);
        }
        // Removes the notifiers (waits for invalidations in progress, which see `dead`).
        drop(entries);
        crate::reclaim_queue::flush_work(&self.rebind_work);
        crate::reclaim_queue::flush_work(&self.fault_work);
    }

    /// Destroys the VM (VM_DESTROY, file close). Its exec queues are destroyed already.
    pub(crate) fn destroy(&self) {
        self.release(true);
        drop(self.gpu.uninstall_vm(self));
    }

    /// Releases the VM's device state when the device is removed (already reset).
    pub(crate) fn kill(&self) {
        self.release(false);
    }

    /// Counts an exec queue on the VM; `ENODEV` if it is dead.
    pub(crate) fn add_queue(&self, ctx_id: u32, long_running: bool) -> Result {
        let mut vs = self.lock.lock();
        if vs.dead {
            return Err(ENODEV);
        }
        if long_running {
            let mut ns = self.nlock.lock();
            if ns.dead {
                return Err(ENODEV);
            }
            ns.lr
                .push_within_capacity(LrCtx {
                    ctx_id,
                    preempted: false,
                    preempt: None,
                })
                .map_err(|_| ENOSPC)?;
        }
        vs.queues += 1;
        Ok(())
    }

    /// Forgets an exec queue.
    pub(crate) fn remove_queue(&self, ctx_id: u32) {
        let mut vs = self.lock.lock();
        vs.queues = vs.queues.saturating_sub(1);
        let mut ns = self.nlock.lock();
        ns.lr.retain(|l| l.ctx_id != ctx_id);
    }

    /// Binds `[va, va + size)` to the CPU range at `cpu` of the calling process.
    pub(crate) fn bind_userptr(
        self: &Arc<Self>,
        acc: &GpuAccess<'_>,
        va: u64,
        size: u64,
        cpu: usize,
        readonly: bool,
    ) -> Result {
        let task = kernel::current!();
        let mm = task.mm().ok_or(EFAULT)?;
        // The binding's notifier is inserted under the VM lock below: set the mm up first.
        mmu_notifier::prepare_interval_notifiers(mm)?;
        let npages = (size / wire::PAGE_SIZE_4K) as usize;
        // Everything a binding needs is allocated here, before any lock.
        let pfns = KVVec::from_elem(0, npages, GFP_KERNEL)?;
        let staging = KVVec::from_elem(0, npages, GFP_KERNEL)?;
        let unstate = userptr::new_unstate();
        let mut vs = self.lock.lock();
        if vs.dead {
            return Err(ENODEV);
        }
        if vs.entries.iter().any(|e| e.overlaps(va, size)) {
            return Err(EEXIST);
        }
        vs.entries.reserve(1, GFP_KERNEL)?;
        if let Some(svm) = vs.svm.as_ref() {
            // The binding takes precedence: SVM mappings of this VM in its VA range go.
            svm.detach_vm(self, Some((va, size)), true);
        }
        let passes = match self.gpu.notifier_mode {
            NotifierMode::Single => Passes::Single,
            NotifierMode::TwoPass => Passes::Two,
        };
        let data = UserptrData {
            vm: self.clone(),
            va,
            size,
            cpu,
            readonly,
            n: LockedBy::new(&self.nlock, unstate),
        };
        let up = KBox::pin_init(
            IntervalNotifier::new(mm, cpu, size as usize, passes, data),
            GFP_KERNEL,
        )?;
        let mut entry = Entry {
            up,
            pfns,
            staging,
            broken: false,
        };
        if !self.fault_mode {
            // Fault the CPU pages in now; a hole or a missing permission is EFAULT.
            if let Err(e) = userptr::revalidate(&mut entry, acc) {
                drop(vs);
                drop(entry);
                return Err(if e == ENOMEM || e == ENODEV || e == EAGAIN {
                    e
                } else {
                    EFAULT
                });
            }
        }
        vs.entries.push_within_capacity(entry).map_err(|_| ENOMEM)?;
        vs.entries.sort_unstable_by_key(|e| e.data().va);
        Ok(())
    }

    /// Removes the binding that starts at `va` and has `size` bytes: clears its PTEs,
    /// invalidates the TLBs and waits (the device uses the pages no more afterwards).
    pub(crate) fn unbind(&self, va: u64, size: u64) -> Result {
        let mut vs = self.lock.lock();
        if vs.dead {
            return Err(ENODEV);
        }
        let i = vs
            .entries
            .iter()
            .position(|e| e.data().va == va && e.data().size == size)
            .ok_or(ENOENT)?;
        let entry = vs.entries.remove(i).map_err(|_| ENOENT)?;
        {
            let mut ns = self.nlock.lock();
            userptr::zap(&entry, &mut ns);
        }
        let res = self.invalidate_tlb(va, size);
        drop(vs);
        drop(entry);
        res
    }

    /// Invalidates the TLBs for `[va, va + size)` and waits; resets the device on failure.
    pub(crate) fn invalidate_tlb(&self, va: u64, size: u64) -> Result {
        let body = wire::TlbInvalidateReq {
            asid: self.asid,
            flags: 0,
            va,
            size,
        }
        .to_bytes();
        let ctrl = &self.gpu.ctrl;
        let mut after = 0;
        let r = ctrl
            .start(wire::Opcode::TlbInvalidate, &body, true)
            .and_then(|t| {
                after = t.seqno();
                ctrl.wait(t)
            });
        match r {
            Ok(d) if d.succeeded() => Ok(()),
            Err(e) if e == ENODEV => Err(e),
            _ => {
                if after == 0 {
                    after = ctrl.last_seqno();
                }
                self.gpu
                    .reset_and_recover(after, "TLB invalidation failed or timed out");
                Err(EIO)
            }
        }
    }

    /// Resolves a GPU page fault at `va`: revalidates the binding that contains it, or
    /// (fault mode, no binding) mirrors the CPU memory at `va` through SVM. `EACCES`: a
    /// write to memory the CPU maps read-only (SVM). `Ok(true)` when the mapping was
    /// already valid for the access (a fault the device raised although nothing was
    /// missing: injected, or a walk that failed to read the page table).
    pub(crate) fn handle_fault(self: &Arc<Self>, va: u64, access: u32) -> Result<bool> {
        let acc = self.gpu.enter()?;
        let mut vs = self.lock.lock();
        if vs.dead {
            return Err(ENODEV);
        }
        let va = va & !(wire::PAGE_SIZE_4K - 1);
        let write = matches!(
            wire::AccessKind::from_u32(access),
            Some(wire::AccessKind::Write | wire::AccessKind::Atomic)
        );
        let VState { entries, svm, .. } = &mut *vs;
        if let Some(entry) = entries
            .iter_mut()
            .find(|e| range_contains(e.data().va, e.data().size, va))
        {
            if write && entry.data().readonly {
                return Err(EFAULT);
            }
            let was_valid = entry.data().n.access(&self.nlock.lock()).valid;
            userptr::revalidate(entry, &acc)?;
            return Ok(was_valid);
        }
        let svm = svm.as_ref().ok_or(EFAULT)?;
        let was_valid = svm.is_mapped(self, va as usize, write);
        let entries = &*entries;
        svm.fault(self, &acc, va as usize, write, |s, l| {
            entries.iter().any(|e| e.overlaps(s, l))
        })?;
        self.gpu
            .stats
            .svm_faults
            .add(1, kernel::sync::atomic::Relaxed);
        Ok(was_valid)
    }

    /// VM_PREFETCH: populates the SVM ranges covering `[start, start + size)` (skipping
    /// bindings). Only for fault-mode VMs, from the process that created the VM.
    pub(crate) fn prefetch(
        self: &Arc<Self>,
        acc: &GpuAccess<'_>,
        start: u64,
        size: u64,
        write: bool,
    ) -> Result {
        let vs = self.lock.lock();
        if vs.dead {
            return Err(ENODEV);
        }
        let svm = vs.svm.as_ref().ok_or(EINVAL)?;
        if !svm.is_current_mm() {
            return Err(EINVAL);
        }
        let end = start + size;
        let mut a = start;
        while a < end {
            if let Some(e) = vs
                .entries
                .iter()
                .find(|e| range_contains(e.data().va, e.data().size, a))
            {
                a = e.data().va + e.data().size;
                continue;
            }
            let r = svm.fault(self, acc, a as usize, write, |s, l| {
                vs.entries.iter().any(|e| e.overlaps(s, l))
            });
            a = match r {
                Ok(range_end) => range_end as u64,
                Err(e) if e == EACCES => return Err(EFAULT),
                Err(e) => return Err(e),
            };
        }
        Ok(())
    }

    /// Submits a job of `q` (the exec function of the VM_BIND locking rules): revalidate
    /// what was invalidated, then, under the notifier lock, check that nothing was
    /// invalidated since and *post* the job (no waiting under the lock: the notifier lock
    /// is taken by invalidations, which reclaim may run); the device's answer is collected
    /// after the lock is released. A submission the device cannot take yet (every command
    /// slot in use), or answers `RESETTING`, is retried from the check. Returns the job's
    /// fence.
    pub(crate) fn exec(
        &self,
        q: &ExecQueue,
        acc: &GpuAccess<'_>,
        batch_va: u64,
        batch_len: u32,
    ) -> Result<(u64, ARef<Fence>)> {
        let mut vs = self.lock.lock();
        if vs.dead {
            return Err(ENODEV);
        }
        let ctrl = &self.gpu.ctrl;
        let t0 = Instant::<Monotonic>::now();
        for _ in 0..EXEC_TRIES {
            if !self.fault_mode {
                for e in vs.entries.iter_mut() {
                    userptr::revalidate(e, acc).map_err(|e| {
                        if e == ENOMEM || e == ENODEV || e == EAGAIN {
                            e
                        } else {
                            EFAULT
                        }
                    })?;
                }
            }
            // The job's dma_fence, allocated before the notifier lock under which it is made
            // (an allocation there could recurse into reclaim, and so into notifiers).
            let job = JobRegistration::new(&q.fences)?;
            let ns = self.nlock.lock();
            if ns.dead {
                return Err(ENODEV);
            }
            if !self.fault_mode
                && vs.entries.iter().any(|e| {
                    let un = e.data().n.access(&ns);
                    !un.valid || e.up.read_retry(un.seq)
                })
            {
                // An invalidation raced with the revalidation: again.
                continue;
            }
            q.fences.begin_submit()?;
            let body = wire::JobSubmitReq {
                ctx_id: q.ctx_id,
                flags: 0,
                batch_va,
                batch_len,
                reserved: 0,
            }
            .to_bytes();
            // Posted under the notifier lock: an invalidation either ran before (and the
            // check above saw it) or posts its commands after the job in the control
            // queue, which the device serves in order (spec 5.3): the job is on the
            // device before the invalidation starts, which then stops it. The fences learn
            // the seqno before the device can answer (exact JOB_DONE matching); a refused
            // or unanswered submission is forgotten again.
            let registered = core::cell::Cell::new(None);
            let posted = ctrl.post(
                wire::Opcode::JobSubmit,
                &body,
                0,
                Some(&job),
                &registered,
                false,
            );
            drop(ns);
            let r = match posted {
                Ok(p) => ctrl.collect(p, &mut []),
                Err(e) => Err(e),
            };
            let accepted = matches!(&r, Ok(reply) if reply.status == wire::Status::Ok.as_u32());
            if !accepted {
                if let Some(seqno) = registered.get() {
                    // Refused, not sent, or no answer: no JOB_DONE is expected for it (a
                    // late one is ignored as unknown).
                    q.fences.end_submit(seqno, false);
                }
            }
            let busy = matches!(&r, Err(e) if *e == EBUSY);
            let resetting =
                matches!(&r, Ok(reply) if reply.status == wire::Status::Resetting.as_u32());
            if (busy || resetting) && t0.elapsed().as_millis() < i64::from(crate::ctrl::TIMEOUT_MS)
            {
                // Back-pressure (no command slot) or a device-initiated reset in progress:
                // wait outside the notifier lock, then check and post again.
                if busy {
                    ctrl.wait_for_slot()?;
                } else {
                    ctrl.note_resetting_retry();
                    fsleep(Delta::from_millis(2));
                }
                continue;
            }
            // The queue's fences had no room after all (a job completed late): EBUSY, as
            // for a full queue.
            let r = r
                .map_err(|e| if e == ENOBUFS { EBUSY } else { e })
                .and_then(|reply| reply.ok());
            let seqno = r?;
            q.fences.end_submit(seqno, true);
            // Registered (it was accepted): the hook made the fence.
            let fence = job.take_fence().ok_or(EIO)?;
            return Ok((seqno, fence));
        }
        Err(EAGAIN)
    }

    /// Queues the rebind worker (after an invalidation preempted long-running queues).
    pub(crate) fn queue_rebind(self: &Arc<Self>) {
        // Already queued: that run will see this invalidation's effects.
        let _ = crate::reclaim_queue().enqueue::<_, 0>(self.clone());
    }

    /// Queues a GPU fault for this VM's fault worker; false if its ring is full.
    pub(crate) fn queue_fault(&self, f: FaultRec) -> bool {
        self.faults.lock().push(f)
    }

    /// The oldest queued fault.
    pub(crate) fn pop_fault(&self) -> Option<FaultRec> {
        self.faults.lock().pop()
    }

    /// Forgets the queued faults (the device was reset).
    pub(crate) fn clear_faults(&self) {
        self.faults.lock().clear();
    }

    /// Queues the fault worker (a run already queued serves the new fault too).
    pub(crate) fn queue_fault_work(self: &Arc<Self>) {
        let _ = crate::reclaim_queue().enqueue::<_, 1>(self.clone());
    }

    /// The rebind worker: revalidate the bindings and resume the preempted long-running
    /// queues. The resumes are started under the notifier lock without sleeping; when the
    /// device has no room for them (back-pressure), the worker waits a little outside the
    /// locks and tries again.
    fn rebind(&self) {
        let Ok(acc) = self.gpu.enter() else { return };
        for _ in 0..REBIND_TRIES {
            let mut vs = self.lock.lock();
            if vs.dead {
                return;
            }
            for e in vs.entries.iter_mut() {
                let _ = userptr::revalidate(e, &acc);
            }
            let mut ns = self.nlock.lock();
            if ns.dead {
                return;
            }
            // A binding invalidated again since: its invalidation queues this work again.
            let raced = vs
                .entries
                .iter()
                .any(|e| !e.broken && !e.data().n.access(&ns).valid);
            if raced {
                return;
            }
            let mut tickets = [const { None }; MAX_LR_PER_VM];
            let mut busy = false;
            for (lr, t) in ns.lr.iter_mut().zip(tickets.iter_mut()) {
                if !lr.preempted {
                    continue;
                }
                let body = wire::CtxReq {
                    ctx_id: lr.ctx_id,
                    flags: 0,
                }
                .to_bytes();
                match self.gpu.ctrl.start(wire::Opcode::CtxResume, &body, false) {
                    Ok(tk) => {
                        *t = Some(tk);
                        lr.preempted = false;
                        lr.preempt = None;
                    }
                    Err(e) if e == EBUSY => busy = true,
                    // The device went away or was given up: nothing to resume.
                    Err(_) => {}
                }
            }
            drop(ns);
            drop(vs);
            for t in tickets.iter_mut() {
                if let Some(t) = t.take() {
                    let _ = self.gpu.ctrl.wait(t);
                }
            }
            if !busy {
                return;
            }
            fsleep(Delta::from_millis(1));
        }
    }
}

#[kunit_tests(svmgpu_vm)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_half_open() {
        assert!(ranges_overlap(0x1000, 0x1000, 0x1000, 0x1000));
        assert!(ranges_overlap(0x1000, 0x2000, 0x2000, 0x1000));
        assert!(!ranges_overlap(0x1000, 0x1000, 0x2000, 0x1000));
        assert!(!ranges_overlap(0x2000, 0x1000, 0x1000, 0x1000));
        assert!(ranges_overlap(0, u64::MAX, 0x5000, 0x1000));
        assert!(range_contains(0x1000, 0x1000, 0x1fff));
        assert!(!range_contains(0x1000, 0x1000, 0x2000));
        assert!(!range_contains(0x1000, 0x1000, 0xfff));
    }

    #[test]
    fn bind_ranges_are_checked() {
        let max = 1 << 30;
        assert!(check_bind_range(0x1000, 0x1000, max).is_ok());
        assert_eq!(check_bind_range(0x1001, 0x1000, max), Err(EINVAL));
        assert_eq!(check_bind_range(0x1000, 0x1001, max), Err(EINVAL));
        assert_eq!(check_bind_range(0x1000, 0, max), Err(EINVAL));
        assert_eq!(check_bind_range(0x1000, max + 0x1000, max), Err(EINVAL));
        assert!(check_bind_range((1 << 48) - 0x1000, 0x1000, max).is_ok());
        assert_eq!(check_bind_range(1 << 48, 0x1000, max), Err(EINVAL));
        assert_eq!(check_bind_range(u64::MAX - 0xfff, 0x1000, max), Err(EINVAL));
    }
}
