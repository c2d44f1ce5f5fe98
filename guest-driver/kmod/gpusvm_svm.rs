// SPDX-License-Identifier: GPL-2.0

//! Shared virtual memory on the kernel's own `drm_gpusvm` (`svm_impl=gpusvm`).
//!
//! DOC: Overview
//!
//! The second SVM implementation of the driver: the same model, uAPI behaviour and three
//! `svm_mode`s as the native one ([`crate::svm`]), with the MM side (notifiers, ranges,
//! chunking, `hmm_range_fault`, the notifier lock) done by `drivers/gpu/drm/drm_gpusvm.c`
//! through the Rust abstraction `kernel::drm::gpusvm`, as extended by the project's kernel
//! patches (two-pass notifiers, pages attached to a range by several devices, pages
//! without DMA mapping).
//!
//! - [`GSvm`]: one `drm_gpusvm` per process (`svm_mode=shared`: every device of the
//!   process; two-pass) or per process and device (`per_device`: two-pass; `single`:
//!   single pass), in a registry keyed by the mm like the native objects, refcounted by
//!   the fault-mode VMs. Notifiers of 512 MiB, ranges of 2 MiB / 64 KiB / 4 KiB chunked
//!   by the VMA, the notifier interval and the faulting VM's bindings (the GPU VA range
//!   given to `drm_gpusvm_range_find_or_insert()` is the largest of those chunks around
//!   the fault that holds no binding of the VM).
//! - Pages: one `drm_gpusvm_pages` per VM that touched a range, attached to the range
//!   (`drm_gpusvm_range_attach_pages()`): one range, N pages, N GPUs. They are made with
//!   `drm_gpusvm_init_pages_no_dma()`: the device uses guest-physical addresses (spec,
//!   "Addresses"), so `drm_gpusvm_get_pages()` records each page's physical address under
//!   the notifier lock once the notifier sequence is confirmed, instead of DMA mapping it.
//!   Their driver data: the VM, whether its PTEs map the range (`mapped`) and writable,
//!   and the invalidations in flight.
//!
//! GPU fault ([`GSvm::fault`]): VMA lookup (as the native path: `EFAULT`, `EACCES`),
//! garbage collection of unmapped ranges, `drm_gpusvm_range_find_or_insert()` under the
//! driver lock, eviction of a range that no longer fits its VMA or overlaps a binding of
//! the VM, this VM's pages (attached if new), page-table levels allocated,
//! `drm_gpusvm_get_pages_locked()` (writable when the VMA is), which returns holding the
//! notifier lock (read mode) it checked the pages under; then, without dropping it: the
//! pages still valid (`drm_gpusvm_pages_valid()`, which the first pass of any
//! invalidation of the range clears) and the range not unmapped, the addresses into the
//! PTEs. (Dropping the lock in between let queued invalidations in first: under an
//! unpaced `MADV_DONTNEED` churn most faults had to fault their pages again.)
//!
//! Invalidation (the `drm_gpusvm` callbacks, the notifier lock held in write mode by the
//! core): for every range hit, marked unmapped on `MMU_NOTIFY_UNMAP`; for every pages
//! object whose device may use it (PTEs written, or an invalidation in flight): the pages
//! invalidated (`drm_gpusvm_pages_invalidate()`: no commit can use them any more), the
//! VM's PTEs cleared, a `TLB_INVALIDATE` started on its device without sleeping (one per
//! VM covering every range hit; deferred to the second pass when the device is full).
//! Pages the device never mapped are unmapped at once. Second pass
//! ([`DriverGpuSvm::invalidate_finish`], or the rest of the single pass): wait for every
//! device (reset it if the wait fails), then under `drm_gpusvm_in_notifier_lock()` unmap
//! the pages (`drm_gpusvm_unmap_pages()`), as the IOMMU model wants it after the device
//! stopped. The finish objects come from a preallocated pool of 64; an empty pool makes
//! the first pass complete the invalidation itself (single pass). `svm_mode=single` runs
//! the whole invalidation in one pass, waiting under the notifier lock (as
//! `drm_gpusvm`'s single-pass notifier is built).
//!
//! Garbage collector (a work item, and the start of every fault): removes unmapped
//! ranges without invalidations in flight: each pages object unmapped and detached, then
//! `drm_gpusvm_range_remove()` (which removes the notifier once empty).
//!
//! Locking, outermost first: the VM lock; the `drm_gpusvm` driver lock (range lookup,
//! insertion, removal, notifier removal: never taken in a callback); the pages' lock of
//! the abstraction; the mmap lock; the `drm_gpusvm` notifier lock (read: commit; write:
//! callbacks and `in_notifier_lock`); the VM's notifier lock (PTEs); the device's locks.
//! Nothing allocates under the notifier lock.

use crate::{
    drm_driver::{SvmgpuDevice, SvmgpuDrm},
    finish_pool::{self, FinishPool},
    gpu::GpuAccess,
    mmu_notifier::{self, FinishItem, FinishLink},
    pagetable::Prealloc,
    svm_invalidation::{start_tlb_invalidate, Pending, Target, MAX_TARGETS},
    vm::Vm,
    SvmMode,
};
use core::ptr::NonNull;
use kernel::{
    drm::gpusvm::{
        self as gs, Ctx, DriverGpuSvm, GpuSvm, Invalidation, Notifier, NotifierWriteGuard,
        PagesRef, Passes, RangeRef, SvmPages, SvmRange,
    },
    ffi::c_ulong,
    mm::{virt::flags as vmf, Mm},
    new_work,
    prelude::*,
    sync::{
        aref::ARef,
        atomic::{Atomic, Relaxed},
        Arc,
    },
    time::{delay::fsleep, Delta, Instant, Monotonic},
    workqueue::{self, impl_has_work, Work, WorkItem},
};

const SZ_4K: usize = 4096;
const SZ_64K: usize = 64 << 10;
const SZ_2M: usize = 2 << 20;
/// Interval of one notifier (`notifier_size`).
const NOTIFIER_SIZE: usize = 512 << 20;
/// Chunk sizes, largest first (`chunk_sizes` of the `drm_gpusvm`).
static CHUNKS: [c_ulong; 3] = [SZ_2M, SZ_64K, SZ_4K];
/// The CPU address space a `drm_gpusvm` mirrors (x86-64 user space).
const MM_RANGE: usize = 1 << 47;
/// Fault retries against racing invalidations before `EAGAIN`.
const FAULT_TRIES: usize = 64;
/// `hmm_range_fault` failures (`EFAULT`) before the fault fails.
const HMM_TRIES: usize = 8;

static RANGES_LIVE: Atomic<u64> = Atomic::new(0);
static RANGES_COLLECTED: Atomic<u64> = Atomic::new(0);
static NOTIFIERS_LIVE: Atomic<u64> = Atomic::new(0);
static NOTIFIERS_PRUNED: Atomic<u64> = Atomic::new(0);

/// The module-wide figures of this implementation (debugfs `svmgpu/svm_ranges`, added to
/// the native ones).
pub(crate) fn stats() -> crate::svm::Stats {
    crate::svm::Stats {
        ranges: RANGES_LIVE.load(Relaxed),
        ranges_collected: RANGES_COLLECTED.load(Relaxed),
        notifiers: NOTIFIERS_LIVE.load(Relaxed),
        notifiers_pruned: NOTIFIERS_PRUNED.load(Relaxed),
    }
}

/// The notifiers a `drm_gpusvm` has, as last counted under its driver lock (the core
/// inserts a notifier with its first range and removes it with its last); its share of
/// [`NOTIFIERS_LIVE`], given back when the object goes (`drm_gpusvm_fini()` removes the
/// rest).
struct NotifierTally(Atomic<u64>);

impl NotifierTally {
    /// Records `now` notifiers (counted under the driver lock); a decrease is counted as
    /// pruned when `pruned` (the garbage collector removed their last ranges).
    fn update(&self, now: usize, pruned: bool) {
        let now = now as u64;
        let old = self.0.xchg(now, Relaxed);
        NOTIFIERS_LIVE.add(now.wrapping_sub(old), Relaxed);
        if pruned && now < old {
            NOTIFIERS_PRUNED.add(old - now, Relaxed);
        }
    }
}

impl Drop for NotifierTally {
    fn drop(&mut self) {
        NOTIFIERS_LIVE.add(self.0.load(Relaxed).wrapping_neg(), Relaxed);
    }
}

kernel::sync::global_lock! {
    // SAFETY: Initialised in the module initialiser (`init`) before any VM exists.
    unsafe(uninit) static REGISTRY: Mutex<KVec<Entry>> = KVec::new();
}

/// A registry entry: a GPU SVM and the number of VMs using it.
struct Entry {
    svm: Arc<GSvm>,
    users: usize,
}

/// Initialises the registry (module init, once).
pub(crate) fn init() {
    // SAFETY: Called once, from the module initialiser.
    unsafe { REGISTRY.init() };
}

/// The GPU SVM of the calling process for a fault-mode VM on device `gpu_key` (the key is
/// used only in the per-device modes), created if needed; the caller owns one user
/// reference ([`release`]).
pub(crate) fn attach(gpu_key: usize, mode: SvmMode) -> Result<Arc<GSvm>> {
    let task = kernel::current!();
    let cur = task.mm().ok_or(EINVAL)?;
    // Notifiers are inserted later by the fault worker, under the VM lock and the driver
    // lock: set the mm up here, without locks (see `mmu_notifier::prepare_interval_notifiers`).
    mmu_notifier::prepare_interval_notifiers(cur)?;
    let key = match mode {
        SvmMode::Shared => 0,
        SvmMode::Single | SvmMode::PerDevice => gpu_key,
    };
    let passes = match mode {
        SvmMode::Single => Passes::Single,
        SvmMode::PerDevice | SvmMode::Shared => Passes::Two,
    };
    let mut reg = REGISTRY.lock();
    if let Some(e) = reg
        .iter_mut()
        .find(|e| e.svm.mm.as_raw() == cur.as_raw() && e.svm.key == key)
    {
        e.users += 1;
        return Ok(e.svm.clone());
    }
    reg.reserve(1, GFP_KERNEL)?;
    // An `mmgrab` reference: the mm stays allocated while the object lives.
    let mm: ARef<Mm> = ARef::from(&**cur);
    let drv = SvmDrv {
        pool: FinishPool::new()?,
    };
    let svm = Arc::pin_init(
        try_pin_init!(GSvm {
            key,
            gc_pending: Atomic::new(false),
            notifiers: NotifierTally(Atomic::new(0)),
            gc_work <- new_work!("svmgpu_gpusvm_gc"),
            svm <- GpuSvm::new(
                c"svmgpu",
                &mm,
                0..MM_RANGE,
                NOTIFIER_SIZE,
                &CHUNKS,
                passes,
                drv,
            ),
            mm,
        }),
        GFP_KERNEL,
    )?;
    reg.push_within_capacity(Entry {
        svm: svm.clone(),
        users: 1,
    })
    .map_err(|_| ENOMEM)?;
    Ok(svm)
}

/// Gives back a user reference from [`attach`]; the last one tears the GPU SVM down.
pub(crate) fn release(svm: Arc<GSvm>) {
    let last = {
        let mut reg = REGISTRY.lock();
        let Some(i) = reg.iter().position(|e| Arc::ptr_eq(&e.svm, &svm)) else {
            return;
        };
        reg[i].users -= 1;
        if reg[i].users == 0 {
            reg.remove(i).ok()
        } else {
            None
        }
    };
    if let Some(e) = last {
        // No VM uses it any more: a queued collection runs now (and drops its reference);
        // the last reference then removes every notifier and range (`drm_gpusvm_fini()`).
        crate::reclaim_queue::flush_work(&e.svm.gc_work);
        drop(e);
    }
}

/// The driver side of every `drm_gpusvm` of the module.
pub(crate) struct SvmDrv {
    /// Second-pass states.
    pool: FinishPool<Pending>,
}

/// The data of every range: counts the live ranges.
pub(crate) struct RangeData;

impl Default for RangeData {
    fn default() -> Self {
        RANGES_LIVE.add(1, Relaxed);
        RangeData
    }
}

impl Drop for RangeData {
    fn drop(&mut self) {
        RANGES_LIVE.add(1u64.wrapping_neg(), Relaxed);
    }
}

/// The data of every pages object: one VM's mirror of one range.
pub(crate) struct PagesData {
    /// The VM (and through it the device) the pages are mapped for.
    vm: Arc<Vm>,
    /// The VM's PTEs map the range (committed, not invalidated since).
    mapped: Atomic<bool>,
    /// The PTEs allow writes.
    writable: Atomic<bool>,
    /// The pages were got with write access.
    got_writable: Atomic<bool>,
    /// Invalidations started (first pass) and not finished.
    inflight: Atomic<u32>,
    /// The token of an invalidation that could not track this VM in its first pass and
    /// stops it in its second (0: none).
    overflow: Atomic<u64>,
    /// The last single-pass invalidation that stopped this VM's device for another one's
    /// overflow.
    seen: Atomic<u64>,
}

impl PagesData {
    fn new(vm: &Arc<Vm>) -> Self {
        vm.gpu.stats.svm_pages.add(1, Relaxed);
        Self {
            vm: vm.clone(),
            mapped: Atomic::new(false),
            writable: Atomic::new(false),
            got_writable: Atomic::new(false),
            inflight: Atomic::new(0),
            overflow: Atomic::new(0),
            seen: Atomic::new(0),
        }
    }

    fn is_for(&self, vm: &Vm) -> bool {
        core::ptr::eq(&*self.vm, vm)
    }

    /// The device may be using (or be about to stop using) the pages.
    fn busy(&self) -> bool {
        self.mapped.load(Relaxed)
            || self.inflight.load(Relaxed) > 0
            || self.overflow.load(Relaxed) != 0
    }

    /// Clears the VM's PTEs of `[start, start + len)` if they map the range.
    fn clear_ptes(&self, start: u64, len: u64) {
        if self.mapped.xchg(false, Relaxed) {
            let mut ns = self.vm.nlock.lock();
            if let Some(pt) = ns.pt.as_mut() {
                pt.clear(start, len);
            }
        }
    }

    /// An invalidation of the pages finished (under the notifier lock in write mode).
    fn invalidated(&self) {
        let n = self.inflight.load(Relaxed);
        self.inflight.store(n.saturating_sub(1), Relaxed);
    }
}

impl Drop for PagesData {
    fn drop(&mut self) {
        self.vm
            .gpu
            .stats
            .svm_pages
            .add(1u64.wrapping_neg(), Relaxed);
    }
}

/// A second-pass state from the pool (a slot is owned by one invalidation at a time).
pub(crate) struct GFinish(finish_pool::FinishRef<Pending>);

// SAFETY: `FinishItem` guarantees the same: the link of a live slot, the same slot back.
unsafe impl gs::Finish for GFinish {
    fn into_raw(self) -> NonNull<FinishLink> {
        self.0.into_link()
    }

    unsafe fn from_raw(ptr: NonNull<FinishLink>) -> Self {
        // SAFETY: Per the contract, `ptr` came from `into_raw`, i.e. `into_link`.
        Self(unsafe { finish_pool::FinishRef::from_link(ptr) })
    }
}

type Svm = GpuSvm<SvmDrv>;
type Range = SvmRange<SvmDrv>;
type Pages = SvmPages<SvmDrv>;

/// A `drm_gpusvm` of the module, with its garbage collector.
#[pin_data]
pub(crate) struct GSvm {
    /// The mirrored mm (`mmgrab`), the registry key with `key`.
    mm: ARef<Mm>,
    /// 0 when shared by every device, else the device's key.
    key: usize,
    /// A range may be unmapped and waiting for the garbage collector.
    gc_pending: Atomic<bool>,
    /// Its notifiers, for the statistics.
    notifiers: NotifierTally,
    #[pin]
    svm: Svm,
    #[pin]
    gc_work: Work<GSvm>,
}

impl_has_work! {
    impl HasWork<Self> for GSvm { self.gc_work }
}

impl WorkItem for GSvm {
    type Pointer = Arc<GSvm>;

    fn run(this: Arc<GSvm>) {
        this.collect();
    }
}

/// What a VMA lookup found.
struct VmaInfo {
    start: usize,
    end: usize,
    writable: bool,
}

/// The GPU VA range a new range around `addr` may use: the largest of the chunks around
/// it that overlaps nothing `avoid` names (the VM's bindings), as drm_gpusvm bounds its
/// chunks by the GPU VMA.
fn gpuva_for(addr: usize, avoid: &dyn Fn(u64, u64) -> bool) -> core::ops::Range<usize> {
    CHUNKS
        .iter()
        .map(|&c| {
            let s = addr & !(c - 1);
            s..s + c
        })
        .find(|r| !avoid(r.start as u64, (r.end - r.start) as u64))
        .unwrap_or(addr..addr + SZ_4K)
}

impl GSvm {
    fn of(svm: &Svm) -> &GSvm {
        // SAFETY: Every `drm_gpusvm` of this driver is the `svm` field of a `GSvm` (made by
        // `attach`), alive while its GPU SVM is used.
        unsafe { &*kernel::container_of!(core::ptr::from_ref(svm), GSvm, svm) }
    }

    /// Takes the notifier lock once (called under `as_in_reclaim`: lockdep learns it is
    /// taken in reclaim; `drm_gpusvm_init()` primes it the same way).
    pub(crate) fn prime_lockdep(&self) {
        drop(self.svm.in_notifier_lock());
    }

    /// Whether the calling task's mm is the mirrored one.
    pub(crate) fn is_current_mm(&self) -> bool {
        kernel::current!()
            .mm()
            .is_some_and(|m| m.as_raw() == self.mm.as_raw())
    }

    fn vma_info(&self, addr: usize, write: bool) -> Result<VmaInfo> {
        let mm = self.mm.mmget_not_zero().ok_or(EFAULT)?;
        let guard = mm.mmap_read_lock();
        let vma = guard.vma_lookup(addr).ok_or(EFAULT)?;
        let fl = vma.flags();
        if fl & (vmf::IO | vmf::PFNMAP) != 0 || fl & vmf::READ == 0 {
            return Err(EFAULT);
        }
        let writable = fl & vmf::WRITE != 0;
        if write && !writable {
            return Err(EACCES);
        }
        let info = VmaInfo {
            start: vma.start(),
            end: vma.end(),
            writable,
        };
        drop(guard);
        drop(mm);
        Ok(info)
    }

    /// `vm`'s pages of `range`, attached if new.
    fn pages_for<'a>(
        &'a self,
        range: &RangeRef<'a, SvmDrv>,
        vm: &Arc<Vm>,
        drm: &SvmgpuDevice,
    ) -> Result<PagesRef<'a, SvmDrv>> {
        {
            let g = self.svm.notifier_lock();
            if let Some(p) = range.pages(&g).find(|p| p.data().is_for(vm)) {
                return Ok(p.get_ref(&self.svm));
            }
        }
        let p = Pages::new(range, drm, true, PagesData::new(vm))?;
        range.attach_pages(&p)?;
        Ok(p)
    }

    /// Whether `vm`'s PTEs map `addr` now, writable if `write` (a snapshot, for
    /// statistics).
    pub(crate) fn is_mapped(&self, vm: &Vm, addr: usize, write: bool) -> bool {
        let Some(r) = self.svm.lock().find(addr) else {
            return false;
        };
        let mapped = {
            let g = self.svm.notifier_lock();
            r.pages(&g).any(|p| {
                let d = p.data();
                d.is_for(vm) && d.mapped.load(Relaxed) && (d.writable.load(Relaxed) || !write)
            })
        };
        mapped
    }

    /// Resolves a GPU fault (or a prefetch) of `vm` at `addr`: makes the VM's PTEs map the
    /// CPU pages of the range containing it. The caller holds the VM lock. `in_binding`
    /// tells whether a VA range overlaps one of the VM's bindings. Returns the end of the
    /// range. Errors as the native path: `EFAULT`, `EACCES`, `ENOMEM`, `EAGAIN`, `ENODEV`.
    pub(crate) fn fault(
        &self,
        vm: &Arc<Vm>,
        drm: &SvmgpuDevice,
        acc: &GpuAccess<'_>,
        addr: usize,
        write: bool,
        in_binding: impl Fn(u64, u64) -> bool,
    ) -> Result<usize> {
        let addr = addr & !(SZ_4K - 1);
        let mut hmm_failures = 0;
        // A read fault maps the range writable when the VMA is, which is only
        // opportunistic: an `EPERM` from `hmm_range_fault` there means the VMA became
        // read-only since the lookup (`mprotect` racing), and the range is then mapped
        // read-only rather than the fault failed (an unpaced mprotect churn made eight
        // such races in a row fail a read).
        let mut read_only = false;
        for _ in 0..FAULT_TRIES {
            let vma = self.vma_info(addr, write)?;
            // Unmapped ranges go first, so the view of the ranges is current.
            self.collect();
            let gpuva = gpuva_for(addr, &in_binding);
            let ctx = Ctx::new().read_only(!vma.writable);
            let found = {
                let g = self.svm.lock();
                let r = g.find_or_insert(addr, gpuva, &ctx);
                self.notifiers.update(g.notifier_count(), false);
                r
            };
            let range = match found {
                Ok(r) => r,
                // The VMA changed since the lookup (unmapped, made read-only): again.
                Err(e) if e == ENOENT || e == EPERM => continue,
                Err(e) if e == EIO || e == EINVAL => return Err(EFAULT),
                Err(e) => return Err(e),
            };
            let (start, end) = (range.start(), range.end());
            if range.is_unmapped() {
                continue;
            }
            if start < vma.start || end > vma.end || in_binding(start as u64, (end - start) as u64)
            {
                // The VMA changed since the range was made (mprotect or mremap split it),
                // or the range overlaps a binding of this VM: evict it; the next round
                // makes a smaller one that fits.
                self.evict(&range)?;
                continue;
            }
            let pages = match self.pages_for(&range, vm, drm) {
                Ok(p) => p,
                // Unmapped meanwhile.
                Err(e) if e == EFAULT => continue,
                Err(e) => return Err(e),
            };
            match self.populate(vm, acc, &range, &pages, vma.writable && !read_only) {
                Ok(true) => return Ok(end),
                Ok(false) => continue,
                Err(e) if e == EPERM && !write && !read_only => read_only = true,
                Err(e) if e == EFAULT || e == EPERM => {
                    hmm_failures += 1;
                    if hmm_failures >= HMM_TRIES {
                        return Err(EFAULT);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(EAGAIN)
    }

    /// Gets and commits `pages` of `range` for `vm`. `Ok(false)` if it must be retried from
    /// the VMA lookup.
    fn populate(
        &self,
        vm: &Arc<Vm>,
        acc: &GpuAccess<'_>,
        range: &Range,
        pages: &Pages,
        writable: bool,
    ) -> Result<bool> {
        let (start, end) = (range.start(), range.end());
        let npages = (end - start) / SZ_4K;
        // Scratch for the pages' addresses (filled under the notifier lock).
        let mut addrs: KVVec<u64> = KVVec::from_elem(0, npages, GFP_KERNEL)?;
        let d = pages.data();
        for _ in 0..FAULT_TRIES {
            {
                let g = self.svm.notifier_lock();
                if range.is_unmapped() || pages.is_unmapped() {
                    return Ok(false);
                }
                let valid = pages.valid(&g);
                if valid && d.mapped.load(Relaxed) {
                    if d.writable.load(Relaxed) || !writable {
                        return Ok(true);
                    }
                    // Mapped read-only, now needed writable: stop the device from using
                    // the old mapping before it is replaced.
                    drop(g);
                    self.zap(range, pages);
                    continue;
                }
                if valid && writable && !d.got_writable.load(Relaxed) {
                    // Got read-only, never mapped: get them again, writable.
                    drop(g);
                    pages.unmap();
                    continue;
                }
            }
            // The page-table levels the PTEs need, allocated before the pages are got:
            // nothing allocates under the notifier lock, which the commit below holds
            // from the pages' check on.
            let counts = match vm.nlock.lock().pt.as_ref() {
                Some(pt) => pt.missing(start as u64, (end - start) as u64),
                None => return Err(ENODEV),
            };
            let mut pre = Prealloc::alloc(acc.dma_dev(), counts)?;
            let ctx = Ctx::new().read_only(!writable);
            // `drm_gpusvm_get_pages_locked()` returns holding the notifier lock from its
            // own check that no invalidation hit the range since the walk, so the PTEs
            // are written before any can. The test hook `race_delay_us` needs a window
            // there instead: with it set, the pages are got unlocked and the lock is taken
            // again after the delay, and the validity check below catches what landed.
            let got = if vm.gpu.race_delay_armed() {
                pages.get_pages(&self.svm, range, &ctx).map(|()| {
                    vm.gpu.race_delay();
                    self.svm.notifier_lock()
                })
            } else {
                pages.get_pages_locked(&self.svm, range, &ctx)
            };
            let g = match got {
                Ok(g) => g,
                // Invalidations kept racing for the core's timeout: the access faults again.
                Err(e) if e == EBUSY => return Err(EAGAIN),
                // Detached since `pages_for` (the range was unmapped and collected, or
                // evicted, by another thread's fault or the garbage collector): again from
                // the VMA lookup.
                Err(e) if e == EINVAL => return Ok(false),
                Err(e) => return Err(e),
            };
            if writable {
                d.got_writable.store(true, Relaxed);
            }
            if range.is_unmapped() || pages.is_unmapped() {
                return Ok(false);
            }
            // Invalidated since `drm_gpusvm_get_pages()`: the first pass of every
            // invalidation makes the pages invalid under the notifier lock.
            let Some(it) = pages.addresses(&g) else {
                continue;
            };
            let mut k = 0;
            for (pa, order) in it {
                for j in 0..(1usize << order) {
                    if let Some(a) = addrs.get_mut(k) {
                        *a = pa + (j * SZ_4K) as u64;
                    }
                    k += 1;
                }
            }
            if k != npages {
                return Err(EFAULT);
            }
            let res = {
                let mut ns = vm.nlock.lock();
                if ns.dead {
                    Err(ENODEV)
                } else if let Some(pt) = ns.pt.as_mut() {
                    let r = pt.map(start as u64, &addrs, writable, &mut pre);
                    if r.is_err() {
                        pt.clear(start as u64, (end - start) as u64);
                    }
                    r
                } else {
                    Err(ENODEV)
                }
            };
            if res.is_ok() {
                d.writable.store(writable, Relaxed);
                d.mapped.store(true, Relaxed);
            }
            drop(g);
            drop(pre);
            res?;
            return Ok(true);
        }
        Err(EAGAIN)
    }

    /// Makes `pages` (of one VM) of `range` unmapped: PTEs cleared, TLBs invalidated and
    /// waited for, then the addresses dropped (the pages stay attached).
    fn zap(&self, range: &Range, pages: &Pages) {
        let d = pages.data();
        {
            let g = self.svm.in_notifier_lock();
            pages.invalidate(&g);
            d.clear_ptes(range.start() as u64, range.size() as u64);
            d.inflight.add(1, Relaxed);
        }
        let _ =
            d.vm.invalidate_tlb(range.start() as u64, range.size() as u64);
        let g = self.svm.in_notifier_lock();
        pages.unmap_locked(&g);
        d.invalidated();
    }

    /// Removes `range` now, as if the CPU had unmapped it: every device's PTEs are cleared
    /// and its TLBs invalidated (waited for, without the notifier lock) before the range is
    /// collected.
    fn evict(&self, range: &Range) -> Result {
        let (start, len) = (range.start(), range.size());
        // Room for every VM mirroring the range, allocated without the notifier lock.
        let mut vms: KVec<Arc<Vm>> = KVec::new();
        loop {
            let g = self.svm.in_notifier_lock();
            let n = range.pages(&g).count();
            if n > vms.capacity() {
                drop(g);
                vms = KVec::with_capacity(n, GFP_KERNEL)?;
                continue;
            }
            range.set_unmapped(&g, start..start + len);
            self.gc_pending.store(true, Relaxed);
            for p in range.pages(&g) {
                let d = p.data();
                if !d.busy() {
                    p.unmap_locked(&g);
                    continue;
                }
                p.invalidate(&g);
                d.clear_ptes(start as u64, len as u64);
                d.inflight.add(1, Relaxed);
                // Within the capacity: one entry per pages object of the range.
                let _ = vms.push_within_capacity(d.vm.clone());
            }
            break;
        }
        for vm in vms.iter() {
            let _ = vm.invalidate_tlb(start as u64, len as u64);
        }
        {
            let g = self.svm.in_notifier_lock();
            for p in range.pages(&g) {
                let d = p.data();
                if vms.iter().any(|v| d.is_for(v)) && d.inflight.load(Relaxed) > 0 {
                    p.unmap_locked(&g);
                    d.invalidated();
                }
            }
        }
        self.collect();
        Ok(())
    }

    /// Drops `vm`'s pages from every range (or from the ranges overlapping `only`), after
    /// clearing its PTEs; with `flush`, the device's TLBs are invalidated (and waited for)
    /// before the pages go, else the caller guarantees that the device no longer uses the
    /// VM's translations (ASID unbound, device reset).
    pub(crate) fn detach_vm(&self, vm: &Vm, only: Option<(u64, u64)>, flush: bool) {
        let span = match only {
            Some((va, size)) => va as usize..(va + size) as usize,
            None => 0..MM_RANGE,
        };
        let ranges = match self.svm.lock().ranges(span) {
            Ok(r) => r,
            // Out of memory: nothing better than leaving the pages to the teardown.
            Err(_) => return,
        };
        if flush {
            let mut cleared: Option<(u64, u64)> = None;
            {
                let g = self.svm.in_notifier_lock();
                for r in ranges.iter() {
                    let (s, l) = (r.start() as u64, r.size() as u64);
                    for p in r.pages(&g).filter(|p| p.data().is_for(vm)) {
                        p.invalidate(&g);
                        if p.data().mapped.load(Relaxed) {
                            p.data().clear_ptes(s, l);
                            cleared = Some(match cleared {
                                None => (s, s + l),
                                Some((a, b)) => (a.min(s), b.max(s + l)),
                            });
                        }
                    }
                }
            }
            if let Some((start, end)) = cleared {
                let _ = vm.invalidate_tlb(start, end - start);
            }
        }
        for r in ranges.iter() {
            let p = {
                let g = self.svm.notifier_lock();
                r.pages(&g)
                    .find(|p| p.data().is_for(vm))
                    .map(|p| p.get_ref(&self.svm))
            };
            if let Some(p) = p {
                // The device no longer uses these pages (see above).
                p.data().mapped.store(false, Relaxed);
                p.unmap();
                r.detach_pages(&p);
            }
        }
    }

    /// The garbage collector: removes the unmapped ranges without invalidations in flight.
    fn collect(&self) {
        // Set by whoever marks a range unmapped, before it queues the collector.
        if !self.gc_pending.xchg(false, Relaxed) {
            return;
        }
        let g = self.svm.lock();
        let Ok(ranges) = g.ranges(0..MM_RANGE) else {
            self.gc_pending.store(true, Relaxed);
            return;
        };
        for r in ranges.iter().filter(|r| r.is_unmapped()) {
            // The invalidation that marked it unmapped cleared the PTEs, waited for the
            // TLBs and unmapped the pages; one still in flight keeps it (its second pass
            // queues the collector again).
            let busy = {
                let ng = self.svm.notifier_lock();
                r.pages(&ng).any(|p| p.data().inflight.load(Relaxed) > 0)
            };
            if busy {
                self.gc_pending.store(true, Relaxed);
                continue;
            }
            loop {
                let p = {
                    let ng = self.svm.notifier_lock();
                    r.pages(&ng).next().map(|p| p.get_ref(&self.svm))
                };
                let Some(p) = p else { break };
                p.data().vm.gpu.stats.svm_ranges_collected.add(1, Relaxed);
                p.unmap();
                r.detach_pages(&p);
            }
            g.remove(r);
            RANGES_COLLECTED.add(1, Relaxed);
        }
        self.notifiers.update(g.notifier_count(), true);
        drop(g);
        drop(ranges);
    }

    fn queue_gc(&self) {
        // SAFETY: `self` is inside an `Arc` (every `GSvm` is made by `attach`), which the
        // registry keeps alive until `release` flushed the work; `ManuallyDrop` keeps the
        // count balanced.
        let me = core::mem::ManuallyDrop::new(unsafe { Arc::from_raw(core::ptr::from_ref(self)) });
        // Queueing never allocates; if it is queued already, the clone is dropped here,
        // never the last reference (the registry holds one).
        let _ = workqueue::system().enqueue(Arc::clone(&me));
    }
}

// ---- invalidation ---------------------------------------------------------------------------

/// Waits for `ticket` (started for `vm`, if any); resets the device unless it completed
/// `OK`: either way the device no longer holds the invalidated translations afterwards.
fn finish_tlb_invalidate(vm: &Vm, ticket: Option<crate::ctrl::Ticket>) {
    let ctrl = &vm.gpu.ctrl;
    let mut after = ctrl.last_seqno();
    let ok = ticket
        .map(|tk| {
            after = tk.seqno();
            ctrl.wait(tk)
        })
        .is_some_and(|d| d.is_ok_and(|d| d.succeeded()));
    if !ok {
        // No guarantee from the device: reset it (it then holds no translation).
        vm.gpu
            .reset_and_recover(after, "an SVM TLB invalidation failed or timed out");
    }
}

/// Runs `f` with the notifier lock in write mode: `held` if the caller is a single pass
/// (the core holds it), else taken here.
fn locked<R>(
    svm: &Svm,
    held: Option<&NotifierWriteGuard<'_, SvmDrv>>,
    f: impl FnOnce(&NotifierWriteGuard<'_, SvmDrv>) -> R,
) -> R {
    match held {
        Some(g) => f(g),
        None => f(&svm.in_notifier_lock()),
    }
}

/// Up to [`MAX_TARGETS`] VMs, each with the span of its pages to invalidate.
type Round = [Option<(Arc<Vm>, u64, u64)>; MAX_TARGETS];

/// Adds `vm`'s `[s, e)` to `round`; false if the round is full (and `vm` not in it).
fn round_add(round: &mut Round, vm: &Arc<Vm>, s: u64, e: u64) -> bool {
    if let Some(x) = round.iter_mut().flatten().find(|x| Arc::ptr_eq(&x.0, vm)) {
        x.1 = x.1.min(s);
        x.2 = x.2.max(e);
        return true;
    }
    match round.iter_mut().find(|x| x.is_none()) {
        Some(free) => {
            *free = Some((vm.clone(), s, e));
            true
        }
        None => false,
    }
}

/// Invalidates the TLBs of every VM of `round` and waits for all.
fn stop_round(round: &Round) {
    let mut tickets: [Option<crate::ctrl::Ticket>; MAX_TARGETS] = [const { None }; MAX_TARGETS];
    for (x, t) in round.iter().zip(tickets.iter_mut()) {
        if let Some((vm, s, e)) = x {
            *t = start_tlb_invalidate(vm, *s, *e, true).ok();
        }
    }
    for (x, t) in round.iter().zip(tickets.iter_mut()) {
        if let Some((vm, _, _)) = x {
            finish_tlb_invalidate(vm, t.take());
            vm.gpu.stats.invalidations.add(1, Relaxed);
        }
    }
}

/// First pass: under the notifier lock (held by the core), invalidate the pages, clear the
/// PTEs and start the TLB invalidations. `None` if no device has to be waited for.
fn begin(inv: &Invalidation<'_, SvmDrv>) -> Option<Pending> {
    let g = inv.guard();
    let n = inv.notifier();
    let (start, end) = (inv.start().max(n.start()), inv.end().min(n.end()));
    let unmap = inv.is_unmap();
    let mut p = Pending::new(start, end);
    let mut any = false;
    let mut gc = false;
    for r in inv.ranges() {
        if unmap {
            inv.set_unmapped(r);
            gc = true;
        }
        let (rs, rl) = (r.start() as u64, r.size() as u64);
        for pg in r.pages(g) {
            let d = pg.data();
            if d.overflow.load(Relaxed) != 0 {
                // Another invalidation that could not track this VM has cleared its PTEs
                // (no fault can map them again before it is done) and stops it in its
                // second pass: this one waits for that too.
                p.conflict = true;
                p.overflow = true;
                any = true;
                continue;
            }
            if !d.busy() {
                // The device never mapped these pages: no need to stop it.
                pg.unmap_locked(g);
                continue;
            }
            pg.invalidate(g);
            d.clear_ptes(rs, rl);
            d.inflight.add(1, Relaxed);
            any = true;
            let slot = p
                .targets
                .iter()
                .position(|t| t.as_ref().is_some_and(|t| Arc::ptr_eq(&t.vm, &d.vm)))
                .or_else(|| p.targets.iter().position(|t| t.is_none()));
            match slot {
                Some(k) => {
                    let t = p.targets[k].get_or_insert_with(|| Target {
                        vm: d.vm.clone(),
                        ticket: None,
                        deferred: false,
                        failed: false,
                        start: rs,
                        end: rs + rl,
                    });
                    t.start = t.start.min(rs);
                    t.end = t.end.max(rs + rl);
                }
                None => {
                    // More devices than a pending invalidation tracks: the pages carry this
                    // invalidation's token; its second pass finds them and stops their
                    // devices before it returns.
                    d.overflow.store(p.token, Relaxed);
                    p.overflow = true;
                }
            }
        }
    }
    // Start every device before anyone waits (without sleeping under the lock).
    for t in p.targets.iter_mut().flatten() {
        match start_tlb_invalidate(&t.vm, t.start, t.end, false) {
            Ok(tk) => t.ticket = Some(tk),
            Err(e) if e == EBUSY => t.deferred = true,
            Err(_) => t.failed = true,
        }
    }
    if gc {
        let gs = GSvm::of(inv.svm());
        gs.gc_pending.store(true, Relaxed);
        gs.queue_gc();
    }
    any.then_some(p)
}

/// The VMs the first pass could not track (their pages carry its token), in rounds of up
/// to [`MAX_TARGETS`]: collected under the lock, stopped (TLB invalidation, waited for)
/// without it unless `held`, then their pages unmapped. Then the pages another overflowing
/// invalidation marked (`conflict`): without `held`, wait (bounded) until that one is done
/// with them; with `held` (a single pass: the other one's second pass needs the lock held
/// here), stop their devices here (their PTEs are cleared).
fn complete_overflow(
    svm: &Svm,
    notifier: &Notifier<SvmDrv>,
    held: Option<&NotifierWriteGuard<'_, SvmDrv>>,
    p: &Pending,
) {
    loop {
        let mut round: Round = [const { None }; MAX_TARGETS];
        locked(svm, held, |g| {
            for r in notifier.ranges(g, p.start..p.end) {
                let (rs, re) = (r.start() as u64, r.end() as u64);
                for pg in r.pages(g) {
                    let d = pg.data();
                    if d.overflow.load(Relaxed) == p.token {
                        round_add(&mut round, &d.vm, rs, re);
                    }
                }
            }
        });
        if round.iter().all(|x| x.is_none()) {
            break;
        }
        stop_round(&round);
        locked(svm, held, |g| {
            for r in notifier.ranges(g, p.start..p.end) {
                for pg in r.pages(g) {
                    let d = pg.data();
                    let mine = round.iter().flatten().any(|x| Arc::ptr_eq(&x.0, &d.vm));
                    if mine && d.overflow.load(Relaxed) == p.token {
                        pg.unmap_locked(g);
                        d.overflow.store(0, Relaxed);
                        d.invalidated();
                    }
                }
            }
        });
    }
    if !p.conflict {
        return;
    }
    if let Some(g) = held {
        loop {
            let mut round: Round = [const { None }; MAX_TARGETS];
            for r in notifier.ranges(g, p.start..p.end) {
                let (rs, re) = (r.start() as u64, r.end() as u64);
                for pg in r.pages(g) {
                    let d = pg.data();
                    let foreign = d.overflow.load(Relaxed);
                    if foreign != 0
                        && foreign != p.token
                        && d.seen.load(Relaxed) != p.token
                        && round_add(&mut round, &d.vm, rs, re)
                    {
                        d.seen.store(p.token, Relaxed);
                    }
                }
            }
            if round.iter().all(|x| x.is_none()) {
                return;
            }
            stop_round(&round);
        }
    }
    let t0 = Instant::<Monotonic>::now();
    loop {
        let foreign = {
            let g = svm.notifier_lock();
            notifier
                .ranges(&g, p.start..p.end)
                .any(|r| r.pages(&g).any(|pg| pg.data().overflow.load(Relaxed) != 0))
        };
        // The other invalidation's waits are bounded (a failed one resets the device),
        // so this ends; the bound is a safety net against a lost wake-up.
        if !foreign || t0.elapsed().as_millis() > 2 * i64::from(crate::ctrl::TIMEOUT_MS) {
            return;
        }
        fsleep(Delta::from_millis(1));
    }
}

/// Second pass (or the rest of a single pass, `held`: the notifier lock the core holds):
/// wait for every device, then unmap the pages.
fn complete(
    svm: &Svm,
    notifier: &Notifier<SvmDrv>,
    held: Option<&NotifierWriteGuard<'_, SvmDrv>>,
    mut p: Pending,
) {
    if p.overflow {
        complete_overflow(svm, notifier, held, &p);
    }
    for t in p.targets.iter_mut().flatten().filter(|t| t.deferred) {
        t.vm.gpu.stats.commands_deferred.add(1, Relaxed);
        match start_tlb_invalidate(&t.vm, t.start, t.end, true) {
            Ok(tk) => t.ticket = Some(tk),
            Err(_) => t.failed = true,
        }
    }
    for t in p.targets.iter_mut().flatten() {
        let ticket = if t.failed { None } else { t.ticket.take() };
        finish_tlb_invalidate(&t.vm, ticket);
    }
    let gc = locked(svm, held, |g| {
        let mut gc = false;
        for r in notifier.ranges(g, p.start..p.end) {
            gc |= r.is_unmapped();
            for pg in r.pages(g) {
                let d = pg.data();
                if p.is_target(&d.vm)
                    && d.inflight.load(Relaxed) > 0
                    && d.overflow.load(Relaxed) == 0
                {
                    // The device no longer uses them.
                    pg.unmap_locked(g);
                    d.invalidated();
                }
            }
        }
        gc
    });
    if gc {
        // Unmapped ranges whose invalidation just finished can go now.
        let gs = GSvm::of(svm);
        gs.gc_pending.store(true, Relaxed);
        gs.queue_gc();
    }
    let dt = p.t0.elapsed().as_nanos().max(0) as u64;
    for t in p.targets.iter().flatten() {
        t.vm.gpu.stats.invalidations.add(1, Relaxed);
        t.vm.gpu.stats.invalidation_ns.add(dt, Relaxed);
    }
    // Dropping the VM references is never the last one for a VM whose pages are attached.
    drop(p);
}

impl DriverGpuSvm for SvmDrv {
    type Driver = SvmgpuDrm;
    type RangeData = RangeData;
    type PagesData = PagesData;
    type Finish = GFinish;

    fn invalidate(inv: &Invalidation<'_, Self>) {
        if let Some(p) = begin(inv) {
            p.count(false);
            complete(inv.svm(), inv.notifier(), Some(inv.guard()), p);
        }
    }

    fn invalidate_start(inv: &Invalidation<'_, Self>) -> Option<GFinish> {
        let p = begin(inv)?;
        match inv.svm().data().pool.get(p) {
            Ok(f) => Some(GFinish(f)),
            // No finish object free: complete here (single pass).
            Err(p) => {
                p.count(false);
                complete(inv.svm(), inv.notifier(), Some(inv.guard()), p);
                None
            }
        }
    }

    fn invalidate_finish(svm: &Svm, notifier: &Notifier<Self>, finish: GFinish) {
        if let Some(p) = finish.0.into_inner() {
            p.count(true);
            complete(svm, notifier, None, p);
        }
    }
}

#[kunit_tests(svmgpu_gpusvm)]
mod tests {
    use super::*;

    fn nothing(_: u64, _: u64) -> bool {
        false
    }

    #[test]
    fn gpuva_avoids_bindings() {
        assert_eq!(gpuva_for(0x20_1000, &nothing), 0x20_0000..0x40_0000);
        // A binding of the first 64 KiB of the 2 MiB chunk: the 64 KiB chunk around the
        // fault, away from it.
        let binding = |va: u64, len: u64| crate::vm::ranges_overlap(va, len, 0x20_0000, 0x1_0000);
        assert_eq!(gpuva_for(0x30_0000, &binding), 0x30_0000..0x31_0000);
        // Right next to a 4 KiB binding: 4 KiB.
        let binding = |va: u64, len: u64| crate::vm::ranges_overlap(va, len, 0x20_0000, 0x1000);
        assert_eq!(gpuva_for(0x20_1000, &binding), 0x20_1000..0x20_2000);
    }
}
