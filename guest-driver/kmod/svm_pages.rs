// SPDX-License-Identifier: GPL-2.0

//! SVM *pages*: the device side of an SVM range (see the `DOC:` overview in [`crate::svm`]).
//!
//! A [`Pages`] object mirrors one [`crate::svm::Range`] into one VM, i.e. on one device
//! (the drm_gpusvm_pages of the range/pages split): the DMA addresses of the range's CPU
//! pages for that device, the notifier sequence they were obtained under, whether the
//! VM's PTEs map them (`valid`), and how many invalidations are still in flight for it.
//! A range holds one `Pages` per VM that touched it: one range, N pages, N GPUs.
//!
//! Every field is protected by the SVM object's notifier lock (the range lives in the
//! SVM object's range list, which that lock protects); the VM's PTEs additionally by the
//! VM's notifier lock, always taken inside the SVM one. Nothing here allocates: the DMA
//! array is allocated when the object is created, before any lock.

use crate::{
    hmm::HmmPfn,
    pagetable::Prealloc,
    userptr::{map_pages, unmap_pages},
    vm::Vm,
    wire,
};
use kernel::{
    bindings,
    prelude::*,
    sync::{atomic::Relaxed, Arc},
};

/// One VM's mirror of one SVM range.
pub(crate) struct Pages {
    /// The VM (and through it the device) the pages are mapped for.
    pub(crate) vm: Arc<Vm>,
    /// The VM's PTEs map `dma`, obtained under notifier sequence `seq`.
    pub(crate) valid: bool,
    /// The notifier sequence of the committed mapping.
    pub(crate) seq: u64,
    /// The PTEs (and DMA direction) allow writes.
    pub(crate) writable: bool,
    /// The committed DMA addresses, one per 4 KiB page of the range.
    pub(crate) dma: KVVec<u64>,
    /// `dma` holds live DMA mappings.
    pub(crate) dma_mapped: bool,
    /// Invalidations started (first pass) and not finished.
    pub(crate) inflight: u32,
}

impl Pages {
    /// Pages for a range of `npages` 4 KiB pages (allocates: call it without locks).
    pub(crate) fn new(vm: &Arc<Vm>, npages: usize) -> Result<Self> {
        let dma = KVVec::from_elem(0, npages, GFP_KERNEL)?;
        vm.gpu.stats.svm_pages.add(1, Relaxed);
        Ok(Self {
            vm: vm.clone(),
            valid: false,
            seq: 0,
            writable: false,
            dma,
            dma_mapped: false,
            inflight: 0,
        })
    }

    /// Whether the pages belong to `vm`.
    pub(crate) fn is_for(&self, vm: &Vm) -> bool {
        core::ptr::eq(&*self.vm, vm)
    }

    /// Whether the device may be using (or be about to stop using) these pages: an
    /// invalidation has work to do.
    pub(crate) fn busy(&self) -> bool {
        self.valid || self.inflight > 0 || self.dma_mapped
    }

    fn dir(writable: bool) -> bindings::dma_data_direction {
        if writable {
            bindings::dma_data_direction::DMA_BIDIRECTIONAL
        } else {
            bindings::dma_data_direction::DMA_TO_DEVICE
        }
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

    /// Second pass: the device's TLB invalidation for these pages completed. Unmaps the
    /// DMA addresses unless the pages were made valid again since. Under the SVM notifier
    /// lock.
    pub(crate) fn invalidated(&mut self) {
        self.inflight = self.inflight.saturating_sub(1);
        if !self.valid {
            self.release_dma();
        }
    }

    /// Unmaps the committed DMA addresses. Only once the device can no longer use them
    /// (PTEs cleared and TLB invalidated, or the ASID unbound, or the device reset).
    pub(crate) fn release_dma(&mut self) {
        if self.dma_mapped {
            unmap_pages(
                self.vm.gpu.dma_dev_raw(),
                &self.dma,
                Self::dir(self.writable),
            );
            self.dma_mapped = false;
        }
    }

    /// Commits a mapping made by [`Staged::map`] (the caller checked the notifier
    /// sequence under the SVM notifier lock): writes the PTEs of `[start, ...)` and makes
    /// the pages valid. Takes the VM's notifier lock. On error the staged DMA mappings
    /// are released by the caller.
    pub(crate) fn commit(
        &mut self,
        start: u64,
        staged: &mut Staged,
        pre: &mut Prealloc,
        seq: u64,
    ) -> Result {
        let mut ns = self.vm.nlock.lock();
        if ns.dead {
            return Err(ENODEV);
        }
        let pt = ns.pt.as_mut().ok_or(ENODEV)?;
        if let Err(e) = pt.map(start, &staged.dma, staged.writable, pre) {
            pt.clear(start, (staged.dma.len() as u64) * wire::PAGE_SIZE_4K);
            return Err(e);
        }
        drop(ns);
        // Nothing is mapped here: an invalidation (which made the pages invalid) unmapped
        // before a commit could follow it. Keep the mappings balanced anyway.
        self.release_dma();
        core::mem::swap(&mut self.dma, &mut staged.dma);
        self.writable = staged.writable;
        self.dma_mapped = true;
        staged.mapped = false;
        self.valid = true;
        self.seq = seq;
        Ok(())
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // Owners release the DMA mappings first (a range never leaves the tree mapped);
        // this is the final fallback.
        self.release_dma();
        self.vm
            .gpu
            .stats
            .svm_pages
            .add(1u64.wrapping_neg(), Relaxed);
    }
}

/// DMA mappings made for a fault before they are committed (scratch, per fault).
pub(crate) struct Staged {
    dev: *mut bindings::device,
    pub(crate) dma: KVVec<u64>,
    pub(crate) writable: bool,
    mapped: bool,
}

impl Staged {
    /// Scratch for `npages` pages (allocates: no locks held).
    pub(crate) fn new(vm: &Vm, npages: usize) -> Result<Self> {
        Ok(Self {
            dev: vm.gpu.dma_dev_raw(),
            dma: KVVec::from_elem(0, npages, GFP_KERNEL)?,
            writable: false,
            mapped: false,
        })
    }

    /// DMA-maps the pages of `pfns` (from `hmm_range_fault`) for the device. The caller
    /// holds a `GpuAccess` (the device is bound).
    pub(crate) fn map(&mut self, pfns: &[HmmPfn], writable: bool) -> Result {
        self.unmap();
        map_pages(self.dev, pfns, &mut self.dma, Pages::dir(writable))?;
        self.writable = writable;
        self.mapped = true;
        Ok(())
    }

    /// Drops mappings that were not committed.
    pub(crate) fn unmap(&mut self) {
        if self.mapped {
            unmap_pages(self.dev, &self.dma, Pages::dir(self.writable));
            self.mapped = false;
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        self.unmap();
    }
}
