// SPDX-License-Identifier: GPL-2.0

//! SVM *pages*: the device side of an SVM range (see the `DOC:` overview in [`crate::svm`]).
//!
//! A [`Pages`] object mirrors one [`crate::svm::Range`] into one VM, i.e. on one device
//! (the drm_gpusvm_pages of the range/pages split): the notifier sequence its mapping was
//! made under, whether the VM's PTEs map the range's CPU pages (`valid`), whether they
//! allow writes, and how many invalidations are still in flight for it. A range holds one
//! `Pages` per VM that touched it: one range, N pages, N GPUs.
//!
//! The device addresses guest memory by guest-physical address (spec, "Addresses"): the
//! PTEs hold the pages' physical addresses, taken under the SVM notifier lock once the
//! notifier sequence is known to be current ([`Pages::commit`]), and valid until the next
//! invalidation clears them. No page is pinned or DMA-mapped, so nothing is unmapped.
//!
//! Every field is protected by the SVM object's notifier lock (the range lives in the
//! SVM object's range list, which that lock protects); the VM's PTEs additionally by the
//! VM's notifier lock, always taken inside the SVM one. Nothing here allocates.

use crate::{hmm, hmm::HmmPfn, pagetable::Prealloc, vm::Vm, wire};
use kernel::{
    prelude::*,
    sync::{atomic::Relaxed, Arc},
};

/// One VM's mirror of one SVM range.
pub(crate) struct Pages {
    /// The VM (and through it the device) the pages are mapped for.
    pub(crate) vm: Arc<Vm>,
    /// The VM's PTEs map the range's pages of notifier sequence `seq`.
    pub(crate) valid: bool,
    /// The notifier sequence of the committed mapping.
    pub(crate) seq: u64,
    /// The PTEs allow writes.
    pub(crate) writable: bool,
    /// Invalidations started (first pass) and not finished.
    pub(crate) inflight: u32,
    /// The token of an invalidation that could not track this VM in its first pass (more
    /// VMs than it holds) and stops it in its second; 0 if none.
    pub(crate) overflow: u64,
}

impl Pages {
    /// Pages of `vm`, not mapped yet.
    pub(crate) fn new(vm: &Arc<Vm>) -> Self {
        vm.gpu.stats.svm_pages.add(1, Relaxed);
        Self {
            vm: vm.clone(),
            valid: false,
            seq: 0,
            writable: false,
            inflight: 0,
            overflow: 0,
        }
    }

    /// Whether the pages belong to `vm`.
    pub(crate) fn is_for(&self, vm: &Vm) -> bool {
        core::ptr::eq(&*self.vm, vm)
    }

    /// Whether the device may be using (or be about to stop using) these pages: an
    /// invalidation has work to do.
    pub(crate) fn busy(&self) -> bool {
        self.valid || self.inflight > 0
    }

    /// First pass of an invalidation of `[start, start + len)` (the whole range): marks
    /// the pages invalid and clears the VM's PTEs. Under the SVM notifier lock; takes the
    /// VM's notifier lock. Returns whether the device must be told (TLB invalidation).
    pub(crate) fn invalidate(&mut self, start: u64, len: u64) -> bool {
        if !self.busy() {
            return false;
        }
        let was_valid = self.valid;
        self.valid = false;
        self.inflight += 1;
        if was_valid {
            let mut ns = self.vm.nlock.lock();
            if let Some(pt) = ns.pt.as_mut() {
                pt.clear(start, len);
            }
        }
        true
    }

    /// Second pass: the device's TLB invalidation for these pages completed. Under the
    /// SVM notifier lock.
    pub(crate) fn invalidated(&mut self) {
        self.inflight = self.inflight.saturating_sub(1);
    }

    /// Commits the pages of `pfns` (from `hmm_range_fault` under notifier sequence `seq`,
    /// which the caller checked is still current, under the SVM notifier lock): takes
    /// their guest-physical addresses into `addrs` (scratch, one entry per page), writes
    /// the PTEs of `[start, ...)` and makes the pages valid. Takes the VM's notifier lock.
    pub(crate) fn commit(
        &mut self,
        start: u64,
        pfns: &[HmmPfn],
        addrs: &mut [u64],
        writable: bool,
        pre: &mut Prealloc,
        seq: u64,
    ) -> Result {
        hmm::page_addresses(pfns, addrs)?;
        let mut ns = self.vm.nlock.lock();
        if ns.dead {
            return Err(ENODEV);
        }
        let pt = ns.pt.as_mut().ok_or(ENODEV)?;
        if let Err(e) = pt.map(start, addrs, writable, pre) {
            pt.clear(start, (addrs.len() as u64) * wire::PAGE_SIZE_4K);
            return Err(e);
        }
        drop(ns);
        self.writable = writable;
        self.valid = true;
        self.seq = seq;
        Ok(())
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        self.vm
            .gpu
            .stats
            .svm_pages
            .add(1u64.wrapping_neg(), Relaxed);
    }
}
