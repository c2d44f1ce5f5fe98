// SPDX-License-Identifier: GPL-2.0

//! Userptr bindings: a GPU VA range of a VM mapped to a CPU range of a process, without
//! pinning, kept coherent with the CPU page tables by an MMU interval notifier.
//!
//! Per binding, two kinds of state (see the locking overview in `svmgpu.rs`):
//!
//! - [`Entry`] (under the VM lock): the binding and the scratch arrays used to fault the
//!   CPU pages in (`hmm_range_fault`) and DMA-map them before committing;
//! - [`UNState`] (under the VM's notifier lock, via `LockedBy`): whether the GPU mapping
//!   is valid, the notifier sequence it was made for, and the committed DMA addresses.
//!
//! [`revalidate`] follows the VM_BIND locking rules: `mmu_interval_read_begin`, fault and
//! map without the notifier lock, then under it check `mmu_interval_read_retry` and only
//! then write the PTEs (else drop the work and retry). The notifier, under the same lock,
//! publishes the new sequence (`mmu_interval_set_seq`), marks the binding invalid and
//! clears its PTEs, then stops the device: it *starts* a `TLB_INVALIDATE` for the binding
//! (and a `CTX_PREEMPT` for the VM's long-running queues) and *waits* for them, in the
//! same call (single pass) or in `invalidate_finish` (two passes, with the state carried
//! in a [`FinishRef`] from the device's preallocated [`FinishPool`]; when the pool is
//! empty it falls back to single pass). Only after the waits are the pages DMA-unmapped.
//! A failed or timed-out wait resets the device, after which it holds no translation.

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
    bindings,
    prelude::*,
    sync::{atomic::Relaxed, Arc, LockedBy},
    time::{Instant, Monotonic},
};

const PAGE: usize = bindings::PAGE_SIZE;

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
    /// The committed DMA addresses, one per page (meaningful if `dma_mapped`).
    pub(crate) dma: KVVec<u64>,
    /// `dma` holds live DMA mappings.
    pub(crate) dma_mapped: bool,
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
    /// Scratch: DMA addresses mapped and not committed yet.
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

impl UserptrData {
    fn dir(&self) -> bindings::dma_data_direction {
        if self.readonly {
            bindings::dma_data_direction::DMA_TO_DEVICE
        } else {
            bindings::dma_data_direction::DMA_BIDIRECTIONAL
        }
    }
}

/// DMA-maps the pages of `pfns` into `out`; on failure nothing stays mapped.
pub(crate) fn map_pages(
    dev: *mut bindings::device,
    pfns: &[HmmPfn],
    out: &mut [u64],
    dir: bindings::dma_data_direction,
) -> Result {
    for (i, (&p, o)) in pfns.iter().zip(out.iter_mut()).enumerate() {
        let err = if !hmm::pfn_valid(p) {
            Some(EFAULT)
        } else {
            // SAFETY: `dev` is a bound device (the caller holds a `GpuAccess`); the page is
            // a valid page returned by `hmm_range_fault` (not pinned: the mapping is only
            // used while the notifier sequence is unchanged, and unmapped after the
            // invalidation that ends it).
            let a =
                unsafe { bindings::dma_map_page_attrs(dev, hmm::pfn_to_page(p), 0, PAGE, dir, 0) };
            // SAFETY: `a` was just returned for `dev`.
            if unsafe { bindings::dma_mapping_error(dev, a) } != 0 {
                Some(ENOMEM)
            } else {
                *o = a;
                None
            }
        };
        if let Some(e) = err {
            unmap_pages(dev, &out[..i], dir);
            return Err(e);
        }
    }
    Ok(())
}

/// Undoes [`map_pages`].
pub(crate) fn unmap_pages(
    dev: *mut bindings::device,
    addrs: &[u64],
    dir: bindings::dma_data_direction,
) {
    for &a in addrs {
        // SAFETY: `a` was mapped by `map_pages` for `dev` with `dir`, and is unmapped once.
        unsafe { bindings::dma_unmap_page_attrs(dev, a, PAGE, dir, 0) };
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
    let dev = vm.gpu.dma_dev_raw();
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
        map_pages(dev, pfns, staging, d.dir())?;
        let counts = {
            let ns = vm.nlock.lock();
            match ns.pt.as_ref() {
                Some(pt) => pt.missing(d.va, d.size),
                None => [0; 3],
            }
        };
        let mut pre = match Prealloc::alloc(acc.dma_dev(), counts) {
            Ok(p) => p,
            Err(e) => {
                unmap_pages(dev, staging, d.dir());
                return Err(e);
            }
        };
        let mut ns = vm.nlock.lock();
        if ns.dead || up.read_retry(seq) {
            // An invalidation ran since `read_begin`: these pages may be stale.
            let dead = ns.dead;
            drop(ns);
            unmap_pages(dev, staging, d.dir());
            if dead {
                return Err(ENODEV);
            }
            continue;
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
        if let Err(e) = mapped {
            drop(ns);
            unmap_pages(dev, staging, d.dir());
            return Err(e);
        }
        let un = d.n.access_mut(&mut ns);
        if un.dma_mapped {
            // Not reachable (an invalidation unmaps before a commit can follow it); keep
            // the mappings balanced anyway.
            unmap_pages(dev, &un.dma, d.dir());
        }
        core::mem::swap(&mut un.dma, staging);
        un.dma_mapped = true;
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

/// Unmaps the binding's committed DMA addresses, under the notifier lock, once the device
/// can no longer use them.
pub(crate) fn release_dma(entry: &Entry, ns: &mut NState, dev: *mut bindings::device) {
    let d = entry.data();
    let un = d.n.access_mut(ns);
    if un.dma_mapped {
        unmap_pages(dev, &un.dma, d.dir());
        un.dma_mapped = false;
    }
}

/// Creates the notifier-side state for a binding of `npages` pages.
pub(crate) fn new_unstate(npages: usize) -> Result<UNState> {
    Ok(UNState {
        valid: false,
        seq: 0,
        dma: KVVec::from_elem(0, npages, GFP_KERNEL)?,
        dma_mapped: false,
        inflight: 0,
    })
}

// ---- invalidation -------------------------------------------------------------------------

/// Device work started by the first pass.
pub(crate) struct Pending {
    tickets: [Option<Ticket>; 1 + MAX_LR_PER_VM],
    /// A command could not be started: the device must be reset.
    failed: bool,
    preempted: bool,
    t0: Instant<Monotonic>,
}

enum Begin {
    Retry,
    Nothing,
    Started(Pending),
}

impl UserptrData {
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
        if dead || !(un.valid || un.inflight > 0 || un.dma_mapped) {
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
        let mut p = Pending {
            tickets: [const { None }; 1 + MAX_LR_PER_VM],
            failed: false,
            preempted: false,
            t0: Instant::<Monotonic>::now(),
        };
        let ctrl = &vm.gpu.ctrl;
        // Long-running queues: preempt them (they are resumed by the rebind worker).
        let mut n = 0;
        for lr in ns.lr.iter_mut() {
            let body = wire::CtxReq {
                ctx_id: lr.ctx_id,
                flags: 0,
            }
            .to_bytes();
            match ctrl.start(wire::Opcode::CtxPreempt, &body, true) {
                Ok(t) => {
                    p.tickets[n] = Some(t);
                    n += 1;
                }
                Err(_) => p.failed = true,
            }
            lr.preempted = true;
            p.preempted = true;
        }
        // The PTEs are cleared: invalidate the TLBs for the whole binding.
        let body = wire::TlbInvalidateReq {
            asid: vm.asid,
            flags: 0,
            va: d.va,
            size: d.size,
        }
        .to_bytes();
        match ctrl.start(wire::Opcode::TlbInvalidate, &body, true) {
            Ok(t) => p.tickets[n] = Some(t),
            Err(_) => p.failed = true,
        }
        Begin::Started(p)
    }

    /// The second pass (or the rest of the single pass): wait, then release the pages.
    fn complete(this: &Userptr, mut p: Pending) {
        let d = this.data();
        let vm = &d.vm;
        let gpu = &vm.gpu;
        let mut ok = !p.failed;
        for t in p.tickets.iter_mut() {
            if let Some(t) = t.take() {
                match gpu.ctrl.wait(t) {
                    Ok(done) if done.succeeded() => {}
                    _ => ok = false,
                }
            }
        }
        if !ok {
            // The device gives no guarantee: reset it, then it holds no translation and
            // runs nothing (if RESET fails, a virtio reset stops it for good).
            gpu.recovery.invalidation_failures.add(1, Relaxed);
            gpu.reset_and_recover("an invalidation or preemption failed or timed out");
        }
        let mut ns = vm.nlock.lock();
        let dead = ns.dead;
        let un = d.n.access_mut(&mut ns);
        un.inflight = un.inflight.saturating_sub(1);
        if !dead && un.dma_mapped && !un.valid {
            unmap_pages(gpu.dma_dev_raw(), &un.dma, d.dir());
            un.dma_mapped = false;
        }
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
                Self::complete(this, p);
                true
            }
        }
    }

    fn invalidate_start(this: &Userptr, inv: &Invalidation<'_>) -> Start<FinishRef> {
        match Self::begin(this, inv) {
            Begin::Retry => Start::Retry,
            Begin::Nothing => Start::Done,
            Begin::Started(p) => match this.data().vm.gpu.finish_pool.get(p) {
                Ok(f) => Start::Finish(f),
                // No finish item free: fall back to single pass.
                Err(p) => {
                    Self::complete(this, p);
                    Start::Done
                }
            },
        }
    }

    fn invalidate_finish(this: &Userptr, finish: FinishRef) {
        // `get` always stores a state before handing a slot out.
        let p = this
            .data()
            .vm
            .gpu
            .finish_pool
            .put(finish)
            .unwrap_or(Pending {
                tickets: [const { None }; 1 + MAX_LR_PER_VM],
                failed: true,
                preempted: false,
                t0: Instant::<Monotonic>::now(),
            });
        Self::complete(this, p);
    }
}
