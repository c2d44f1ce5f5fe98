// SPDX-License-Identifier: GPL-2.0

//! Shared virtual memory (SVM): fault-mode VMs use the CPU address space of the process
//! that created them, with no bind, on one or several devices at once.
//!
//! DOC: Overview
//!
//! The model follows drm_gpusvm with the range/pages split (drm_gpusvm.c, and the seeds'
//! "split MM and device state across gpusvm/range/pages"):
//!
//! - [`Svm`]: the MM side, one object per process (`mm`), found in a module-wide registry
//!   keyed by the mm and refcounted by the fault-mode VMs that use it. In `svm_mode=shared`
//!   every device of the process shares one object; in `single` and `per_device` each
//!   device has its own (the key also names the device), so each has its own notifiers.
//! - *Notifiers* ([`SvmNotifier`]): MMU interval notifiers over large aligned intervals
//!   (512 MiB, as gpusvm's `notifier_size`), created on the first fault in the interval
//!   and removed when the garbage collector has removed their last range (as
//!   `drm_gpusvm_range_remove` removes an empty notifier). Each range holds a reference on
//!   its notifier, and so does a fault between `read_begin` and its retry check: a notifier
//!   is only unlinked once no range lies in its interval, and only freed (removed from the
//!   mm) when the last reference goes, never under the notifier lock.
//! - [`Range`]: a CPU VA range mirrored on demand, chunked by what the VMA allows (the
//!   largest of 2 MiB, 64 KiB, 4 KiB whose aligned chunk around the faulting address lies
//!   inside the VMA and overlaps no other range and no binding of the faulting VM, as
//!   drm_gpusvm bounds chunks by the GPU VMA), kept in a vector sorted by address: the
//!   role of gpusvm's interval tree. Ranges never overlap, so ordering them by start
//!   orders them by end too, and every lookup (a fault's address, an invalidation's
//!   first range) is a binary search, O(log n); insertion and removal move the tail
//!   (`memmove`, no allocation under the notifier lock). A range belongs to the notifier
//!   whose interval contains it.
//! - [`Pages`] (`svm_pages.rs`): the device side, one per VM that touched the range
//!   (notifier sequence, valid and writable flags, invalidations in flight): one range, N
//!   pages, N GPUs.
//!
//! GPU page fault ([`Svm::fault`], from a device's fault worker, or [`Svm::prefetch`]):
//! look the VMA up (no VMA or not readable: `EFAULT`; a write to a read-only VMA:
//! `EACCES`), find or create the notifier, the range and this VM's pages, then the
//! `mmu_interval_read_begin` / `hmm_range_fault` / retry loop (`hmm.rs`: the PFN array is
//! re-initialised on every `-EBUSY`), allocate the page-table levels the PTEs need, and
//! under the notifier lock check that no invalidation hit the range since (the range's
//! invalidation count, read before `read_begin`, unchanged — or `mmu_interval_read_retry`
//! false): only then take the pages' guest-physical addresses, write the PTEs and mark
//! the pages valid (as `drm_gpusvm_get_pages` maps pages only under its notifier lock:
//! an unpinned page that an invalidation may have freed never reaches the device); else
//! (or if the range was unmapped meanwhile) start over. Pages are faulted writable when
//! the VMA is writable (so COW is broken once, as gpusvm does), read-only otherwise. No
//! page is pinned. A range whose VMA was split since it was made (mprotect, mremap), or
//! that overlaps a binding of the faulting VM (made before the bind, or by another VM),
//! is evicted (invalidated on every device and removed) and made again to fit. A fault
//! that keeps losing races returns `EAGAIN`, which the fault worker answers `RESUME` (the
//! access faults again).
//!
//! Invalidation ([`SvmNotifierData`] callbacks), for every range the CPU range hits and
//! every pages object that may be in use: under the notifier lock publish the sequence,
//! mark the pages invalid, clear the VM's PTEs and *start* a `TLB_INVALIDATE` on its
//! device (one per VM, covering every range it hits); then *wait* for all of them.
//! `single`: both in the one pass of each device's own notifier, one
//! device after the other; `per_device`: each device's notifier in two passes, so the
//! core starts every device before waiting for any; `shared`: the one notifier of the
//! range starts every device in its first pass and waits for all in its second. The
//! second-pass state comes from a preallocated pool of the object; when the pool is
//! empty the first pass waits itself (single pass). A failed or timed-out wait resets the
//! device before the notifier returns. On `MMU_NOTIFY_UNMAP` the ranges hit are also
//! marked unmapped and the garbage-collector work is queued: it removes them (a range
//! partly unmapped is removed whole; the part still mapped is faulted in again as new,
//! smaller ranges that fit the new VMA: the split). The notifier itself never frees.
//!
//! Contracts (from the seeds): a range leaves the list only once no device can use its
//! pages (PTEs cleared, TLBs invalidated); `hmm_range_fault` only inside read_begin/retry;
//! page addresses taken only under the notifier lock after the retry check; no `GFP_KERNEL`
//! allocation and no waiting for reclaim under the notifier lock (lists grow by swapping
//! in a vector allocated before the lock is taken); a non-blockable invalidation that
//! would have to stop a device returns `false` (and only `try_lock`s).
//!
//! Locking, outermost first (see also the overview in `svmgpu.rs`):
//!
//! 1. the VM lock (the fault path holds it throughout; it keeps the VM's link to the
//!    object, and with it the object and its notifiers, alive);
//! 2. [`Svm::lock`]: the notifier list (insertion takes the mmap lock) and teardown;
//! 3. the mmap lock (`hmm_range_fault`, VMA lookup; the core around notifiers);
//! 4. [`Svm::nlock`], the SVM *notifier lock*: the range list and every range's and
//!    pages' state; taken in notifier callbacks;
//! 5. the VM's notifier lock (its page table), inside the SVM one;
//! 6. the device's locks (control queue...).
//!
//! Lifetime: a fault-mode VM takes a reference on the object at creation and gives it
//! back when it is released (after its ASID is unbound or the device reset, it drops its
//! pages from every range). The last one removes the object from the
//! registry and tears it down: notifiers unlinked, garbage collector flushed, ranges
//! freed (with them the last references on the notifiers, whose removal waits for the
//! callbacks in progress; those see the object dead and do nothing).

use crate::{
    finish_pool,
    gpu::GpuAccess,
    hmm::{self, HmmPfn},
    mmu_notifier::{self, IntervalNotifier, IntervalOps, Invalidation, Passes, Start},
    pagetable::Prealloc,
    svm_invalidation::{start_tlb_invalidate, Pending, Target, MAX_TARGETS},
    svm_pages::Pages,
    vm::Vm,
    SvmMode,
};
use kernel::{
    mm::{virt::flags as vmf, Mm},
    new_mutex, new_work,
    prelude::*,
    sync::{
        aref::ARef,
        atomic::{Atomic, Relaxed},
        Arc, Mutex,
    },
    time::{delay::fsleep, Delta, Instant, Monotonic},
    workqueue::{self, impl_has_work, Work, WorkItem},
};

const SZ_4K: usize = 4096;
const SZ_64K: usize = 64 << 10;
const SZ_2M: usize = 2 << 20;
/// Interval of one notifier (gpusvm's `notifier_size`).
const NOTIFIER_SIZE: usize = 512 << 20;
/// Chunk sizes, largest first.
const CHUNKS: [usize; 3] = [SZ_2M, SZ_64K, SZ_4K];
/// Second-pass state of an SVM notifier, from the SVM object's pool.
type FinishRef = finish_pool::FinishRef<Pending>;
type FinishPool = finish_pool::FinishPool<Pending>;

/// Room for pages objects a new range starts with (VMs mirroring it; it grows).
const PAGES_PER_RANGE: usize = 8;
/// Fault retries against racing invalidations before `EAGAIN`.
const FAULT_TRIES: usize = 64;
/// `hmm_range_fault` failures (`EFAULT`) before the fault fails.
const HMM_TRIES: usize = 8;

static RANGES_LIVE: Atomic<u64> = Atomic::new(0);
static RANGES_COLLECTED: Atomic<u64> = Atomic::new(0);
static NOTIFIERS_LIVE: Atomic<u64> = Atomic::new(0);
static NOTIFIERS_PRUNED: Atomic<u64> = Atomic::new(0);

/// Module-wide SVM figures (debugfs `svmgpu/svm_ranges`).
pub(crate) struct Stats {
    /// Ranges of every SVM object.
    pub(crate) ranges: u64,
    /// Ranges the garbage collector removed after an unmap.
    pub(crate) ranges_collected: u64,
    /// Notifiers linked in an SVM object.
    pub(crate) notifiers: u64,
    /// Notifiers removed because their last range went (not at teardown).
    pub(crate) notifiers_pruned: u64,
}

/// The module-wide SVM figures.
pub(crate) fn stats() -> Stats {
    Stats {
        ranges: RANGES_LIVE.load(Relaxed),
        ranges_collected: RANGES_COLLECTED.load(Relaxed),
        notifiers: NOTIFIERS_LIVE.load(Relaxed),
        notifiers_pruned: NOTIFIERS_PRUNED.load(Relaxed),
    }
}

kernel::sync::global_lock! {
    // SAFETY: Initialised in the module initialiser (`init`) before any VM exists.
    unsafe(uninit) static REGISTRY: Mutex<KVec<Entry>> = KVec::new();
}

/// A registry entry: an SVM object and the number of VMs using it.
struct Entry {
    svm: Arc<Svm>,
    users: usize,
}

/// Initialises the registry (module init, once).
pub(crate) fn init() {
    // SAFETY: Called once, from the module initialiser.
    unsafe { REGISTRY.init() };
}

/// The SVM object of the calling process for a fault-mode VM on device `gpu_key` (used
/// only in the per-device modes), created if needed; the caller owns one user reference
/// ([`release`]).
pub(crate) fn attach(gpu_key: usize, mode: SvmMode) -> Result<Arc<Svm>> {
    let task = kernel::current!();
    let cur = task.mm().ok_or(EINVAL)?;
    // Notifiers are inserted later by the fault worker, under the VM lock: set the mm up
    // here, without locks (see `mmu_notifier::prepare_interval_notifiers`).
    mmu_notifier::prepare_interval_notifiers(cur)?;
    let key = match mode {
        SvmMode::Shared => 0,
        SvmMode::Single | SvmMode::PerDevice => gpu_key,
    };
    let passes = match mode {
        SvmMode::Single => Passes::Single,
        SvmMode::PerDevice | SvmMode::Shared => Passes::Two,
    };
    // Allocated before the registry lock (it is not a notifier lock, but keep it short).
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
    let svm = Arc::pin_init(
        try_pin_init!(Svm {
            mm,
            key,
            passes,
            lock <- new_mutex!(SvmS { notifiers: KVec::new(), dead: false }, "svmgpu_svm"),
            nlock <- new_mutex!(SvmN { ranges: KVec::new(), dead: false }, "svmgpu_svm_notifier"),
            gc_work <- new_work!("svmgpu_svm_gc"),
            pool: FinishPool::new()?,
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

/// Gives back a user reference from [`attach`]; the last one tears the object down.
pub(crate) fn release(svm: Arc<Svm>) {
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
        e.svm.teardown();
    }
}

/// The state under [`Svm::lock`].
struct SvmS {
    /// The notifiers new ranges use, one per interval (see [`Svm::prune_notifiers`]).
    notifiers: KVec<Arc<SvmNotifier>>,
    dead: bool,
}

/// The state under [`Svm::nlock`] (the SVM notifier lock).
pub(crate) struct SvmN {
    /// Ranges, sorted by start, non-overlapping.
    ranges: KVec<KBox<Range>>,
    dead: bool,
}

/// A CPU VA range mirrored for the GPUs.
pub(crate) struct Range {
    start: usize,
    end: usize,
    /// The notifier whose interval contains the range.
    notifier: Arc<SvmNotifier>,
    /// The CPU unmapped (part of) the range: the garbage collector removes it.
    unmapped: bool,
    /// Bumped by every invalidation that hits the range (under the notifier lock).
    gen: u64,
    /// One per VM mirroring the range (capacity reserved at creation).
    pages: KVec<Pages>,
}

impl Range {
    fn len(&self) -> usize {
        self.end - self.start
    }

    fn pages_of(&mut self, vm: &Vm) -> Option<&mut Pages> {
        self.pages.iter_mut().find(|p| p.is_for(vm))
    }
}

/// The data of one notifier.
pub(crate) struct SvmNotifierData {
    svm: *const Svm,
    /// First byte of the interval (`NOTIFIER_SIZE` aligned).
    start: usize,
    /// Unlinked from the object (no range in its interval): no range may use it any more.
    /// Set and read under the SVM notifier lock.
    pruned: Atomic<u32>,
}

// SAFETY: `svm` points to the object whose ranges and fault paths hold every reference on
// the notifier: the object outlives it.
unsafe impl Send for SvmNotifierData {}
// SAFETY: See `Send`.
unsafe impl Sync for SvmNotifierData {}

/// A notifier over one aligned interval of the mm.
pub(crate) type SvmNotifier = IntervalNotifier<SvmNotifierData>;

/// The per-mm SVM object.
#[pin_data]
pub(crate) struct Svm {
    /// The mirrored mm (`mmgrab`).
    mm: ARef<Mm>,
    /// 0 when shared by every device, else the device's key.
    key: usize,
    passes: Passes,
    #[pin]
    lock: Mutex<SvmS>,
    #[pin]
    nlock: Mutex<SvmN>,
    #[pin]
    gc_work: Work<Svm>,
    pool: FinishPool,
}

impl_has_work! {
    impl HasWork<Self> for Svm { self.gc_work }
}

impl WorkItem for Svm {
    type Pointer = Arc<Svm>;

    fn run(this: Arc<Svm>) {
        this.collect();
    }
}

/// The chunk of a new range around `addr`: the largest of [`CHUNKS`] whose aligned span
/// lies inside `[lo, hi)` and overlaps nothing `avoid` names.
fn chunk_for(
    addr: usize,
    lo: usize,
    hi: usize,
    avoid: &dyn Fn(u64, u64) -> bool,
) -> Option<(usize, usize)> {
    CHUNKS
        .iter()
        .map(|&c| {
            let s = addr & !(c - 1);
            (s, s + c)
        })
        .find(|&(s, e)| s >= lo && e <= hi && !avoid(s as u64, (e - s) as u64))
}

/// Index of the first range whose end is above `addr`.
fn first_ending_after(ranges: &[KBox<Range>], addr: usize) -> usize {
    ranges.partition_point(|r| r.end <= addr)
}

/// What a VMA lookup found.
struct VmaInfo {
    start: usize,
    end: usize,
    writable: bool,
}

impl Svm {
    /// Whether `mm` of the calling task is the mirrored one.
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
        // Not the last user in practice (the process is alive while its GPU faults); if
        // it is, exit_mmap would run here, outside every SVM lock.
        drop(mm);
        Ok(info)
    }

    /// The notifier of the interval containing `addr`, inserted if needed.
    fn notifier_for(&self, addr: usize) -> Result<Arc<SvmNotifier>> {
        let start = addr & !(NOTIFIER_SIZE - 1);
        let mut s = self.lock.lock();
        if s.dead {
            return Err(ENODEV);
        }
        if let Some(n) = s.notifiers.iter().find(|n| n.data().start == start) {
            return Ok(n.clone());
        }
        s.notifiers.reserve(1, GFP_KERNEL)?;
        // An `mm_users` reference for the insertion.
        let mm = self.mm.mmget_not_zero().ok_or(EFAULT)?;
        let data = SvmNotifierData {
            svm: core::ptr::from_ref(self),
            start,
            pruned: Atomic::new(0),
        };
        let n = Arc::pin_init(
            IntervalNotifier::new(&mm, start, NOTIFIER_SIZE, self.passes, data),
            GFP_KERNEL,
        )?;
        drop(mm);
        s.notifiers
            .push_within_capacity(n.clone())
            .map_err(|_| ENOMEM)?;
        NOTIFIERS_LIVE.add(1, Relaxed);
        Ok(n)
    }

    /// Unlinks the notifiers whose interval holds no range any more (the garbage
    /// collector's last step, as `drm_gpusvm_range_remove` removes an empty notifier).
    /// A fault that took one before it was unlinked sees it pruned under the notifier lock
    /// and takes a new one; the core removes it when its last reference goes, here or in
    /// that fault, outside the notifier lock.
    fn prune_notifiers(&self) {
        let mut s = self.lock.lock();
        if s.dead {
            return;
        }
        let mut pruned = 0u64;
        {
            let ns = self.nlock.lock();
            for n in s.notifiers.iter() {
                let (start, end) = n.data().interval();
                let i = first_ending_after(&ns.ranges, start);
                if ns.ranges.get(i).is_none_or(|r| r.start >= end) {
                    n.data().pruned.store(1, Relaxed);
                    pruned += 1;
                }
            }
        }
        if pruned == 0 {
            return;
        }
        // Dropped under the object lock, which no notifier callback takes: removal waits
        // for the callbacks in progress, and those only take the notifier lock.
        s.notifiers.retain(|n| n.data().pruned.load(Relaxed) == 0);
        NOTIFIERS_LIVE.add(pruned.wrapping_neg(), Relaxed);
        NOTIFIERS_PRUNED.add(pruned, Relaxed);
    }

    /// Finds the range containing `addr` or creates one (chunked by the VMA, and not
    /// overlapping what `avoid` names: the VM's bindings), and makes sure it has a pages
    /// object for `vm`. Returns the range's bounds.
    fn range_for(
        &self,
        vm: &Arc<Vm>,
        addr: usize,
        vma: &VmaInfo,
        avoid: &dyn Fn(u64, u64) -> bool,
    ) -> Result<(usize, usize)> {
        let mut notifier = self.notifier_for(addr)?;
        let nstart = addr & !(NOTIFIER_SIZE - 1);
        // Everything that may be needed, allocated before the notifier lock.
        let alloc_range = |notifier: &Arc<SvmNotifier>| -> Result<KBox<Range>> {
            Ok(KBox::new(
                Range {
                    start: 0,
                    end: 0,
                    notifier: notifier.clone(),
                    unmapped: false,
                    gen: 0,
                    pages: KVec::with_capacity(PAGES_PER_RANGE, GFP_KERNEL)?,
                },
                GFP_KERNEL,
            )?)
        };
        let mut new_range = None;
        let mut spare: KVec<KBox<Range>> = {
            let ns = self.nlock.lock();
            let len = ns.ranges.len();
            if len == ns.ranges.capacity() {
                drop(ns);
                KVec::with_capacity(len * 2 + 16, GFP_KERNEL)?
            } else {
                KVec::new()
            }
        };
        let mut pages = None;
        let mut pages_spare: KVec<Pages> = KVec::new();
        loop {
            let mut ns = self.nlock.lock();
            if ns.dead {
                return Err(ENODEV);
            }
            let i = first_ending_after(&ns.ranges, addr);
            let found = i < ns.ranges.len() && ns.ranges[i].start <= addr;
            if found && ns.ranges[i].unmapped {
                // Waiting for the garbage collector: collect it now.
                drop(ns);
                self.collect();
                continue;
            }
            if !found && notifier.data().pruned.load(Relaxed) != 0 {
                // The garbage collector unlinked the notifier since it was looked up.
                drop(ns);
                new_range = None;
                notifier = self.notifier_for(addr)?;
                continue;
            }
            if !found && new_range.is_none() {
                drop(ns);
                new_range = Some(alloc_range(&notifier)?);
                continue;
            }
            if !found {
                // The largest chunk inside the VMA and the notifier interval, not
                // overlapping a neighbour nor a binding of the VM (as drm_gpusvm bounds
                // its chunks by the GPU VMA). The 4 KiB chunk around `addr` always fits:
                // `addr` is in no binding (bindings are resolved before SVM).
                let lo = if i > 0 { ns.ranges[i - 1].end } else { 0 };
                let hi = ns.ranges.get(i).map_or(usize::MAX, |r| r.start);
                let lo = lo.max(vma.start).max(nstart);
                let hi = hi.min(vma.end).min(nstart + NOTIFIER_SIZE);
                let (s, e) = chunk_for(addr, lo, hi, avoid).ok_or(EFAULT)?;
                if ns.ranges.len() == ns.ranges.capacity() {
                    if spare.capacity() <= ns.ranges.len() {
                        let want = ns.ranges.len() * 2 + 16;
                        drop(ns);
                        spare = KVec::with_capacity(want, GFP_KERNEL)?;
                        continue;
                    }
                    // Move the ranges into the bigger vector (no allocation).
                    for r in ns.ranges.drain_all() {
                        let _ = spare.push_within_capacity(r);
                    }
                    core::mem::swap(&mut ns.ranges, &mut spare);
                }
                let mut r = new_range.take().ok_or(ENOMEM)?;
                r.start = s;
                r.end = e;
                ns.ranges.insert_within_capacity(i, r).map_err(|_| ENOMEM)?;
                RANGES_LIVE.add(1, Relaxed);
            }
            let r = &mut ns.ranges[i];
            let bounds = (r.start, r.end);
            if r.pages_of(vm).is_some() {
                return Ok(bounds);
            }
            if r.pages.len() == r.pages.capacity() {
                // One more VM than the range has room for: a bigger vector, allocated
                // without the notifier lock, swapped in under it (no limit on the VMs that
                // mirror a range).
                if pages_spare.capacity() <= r.pages.len() {
                    let want = r.pages.len() * 2;
                    drop(ns);
                    pages_spare = KVec::with_capacity(want, GFP_KERNEL)?;
                    continue;
                }
                for p in r.pages.drain_all() {
                    // Within the capacity checked above.
                    let _ = pages_spare.push_within_capacity(p);
                }
                core::mem::swap(&mut r.pages, &mut pages_spare);
            }
            match pages.take() {
                Some(p) => {
                    r.pages.push_within_capacity(p).map_err(|_| ENOSPC)?;
                    return Ok(bounds);
                }
                None => {
                    drop(ns);
                    pages = Some(Pages::new(vm));
                }
            }
        }
    }

    /// Takes the SVM notifier lock once (called under `as_in_reclaim`: lockdep learns it
    /// is taken in reclaim).
    pub(crate) fn prime_lockdep(&self) {
        drop(self.nlock.lock());
    }

    /// Whether `vm`'s PTEs map `addr` now, writable if `write` (a snapshot, for
    /// statistics).
    pub(crate) fn is_mapped(&self, vm: &Vm, addr: usize, write: bool) -> bool {
        let mut ns = self.nlock.lock();
        let i = first_ending_after(&ns.ranges, addr);
        ns.ranges
            .get_mut(i)
            .filter(|r| r.start <= addr)
            .and_then(|r| r.pages_of(vm))
            .is_some_and(|p| p.valid && (p.writable || !write))
    }

    /// Resolves a GPU fault (or a prefetch) of `vm` at `addr`: makes the VM's PTEs map the
    /// CPU pages of the range containing it. The caller holds the VM lock (the VM is
    /// alive and uses this object) and `acc`. `in_binding` tells whether a VA range
    /// overlaps one of the VM's bindings (SVM then refuses it). Returns the end of the
    /// range. Errors: `EFAULT` (no usable CPU mapping), `EACCES` (write to read-only
    /// memory), `ENOMEM`, `ENOSPC`, `EAGAIN`, `ENODEV`, `ESRCH`.
    pub(crate) fn fault(
        &self,
        vm: &Arc<Vm>,
        acc: &GpuAccess<'_>,
        addr: usize,
        write: bool,
        in_binding: impl Fn(u64, u64) -> bool,
    ) -> Result<usize> {
        let addr = addr & !(SZ_4K - 1);
        // `hmm_range_fault` failures: the VMA may have changed between the lookup and the
        // fault (mprotect, munmap racing), so a failure is retried from the lookup a few
        // times before it is final (a permanent one, e.g. a file page beyond EOF, fails
        // the same way every time).
        let mut hmm_failures = 0;
        // A read fault maps the range writable when the VMA is, which is only
        // opportunistic: an `EPERM` from `hmm_range_fault` there means the VMA became
        // read-only since the lookup (`mprotect` racing), and the range is then mapped
        // read-only rather than the fault failed (an unpaced mprotect churn made eight
        // such races in a row fail a read).
        let mut read_only = false;
        for _ in 0..FAULT_TRIES {
            let vma = self.vma_info(addr, write)?;
            let (start, end) = self.range_for(vm, addr, &vma, &in_binding)?;
            if start < vma.start || end > vma.end || in_binding(start as u64, (end - start) as u64)
            {
                // The VMA changed since the range was made (mprotect or mremap split it):
                // the range no longer has one protection. Or the range overlaps a binding
                // of this VM (it was made before the bind, or by another VM): the VM
                // cannot mirror it whole. Evict it; the next round makes a smaller one
                // that fits.
                self.evict(start)?;
                continue;
            }
            match self.populate(vm, acc, start, end, vma.writable && !read_only) {
                Ok(true) => return Ok(end),
                // The range went away (unmapped) or an invalidation raced: again.
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

    /// Faults in, maps and commits the range `[start, end)` for `vm`. `Ok(false)` if it
    /// must be retried from the VMA lookup.
    fn populate(
        &self,
        vm: &Arc<Vm>,
        acc: &GpuAccess<'_>,
        start: usize,
        end: usize,
        writable: bool,
    ) -> Result<bool> {
        let npages = (end - start) / SZ_4K;
        let mut pfns: KVVec<HmmPfn> = KVVec::from_elem(0, npages, GFP_KERNEL)?;
        // Scratch for the pages' addresses (filled under the notifier lock).
        let mut addrs: KVVec<u64> = KVVec::from_elem(0, npages, GFP_KERNEL)?;
        for _ in 0..FAULT_TRIES {
            // The range's invalidation count, read *before* `read_begin` (see below).
            let (notifier, gen0) = {
                let mut ns = self.nlock.lock();
                let i = first_ending_after(&ns.ranges, start);
                let Some(r) = ns
                    .ranges
                    .get_mut(i)
                    .filter(|r| r.start == start && !r.unmapped)
                else {
                    return Ok(false);
                };
                let (n, g) = (r.notifier.clone(), r.gen);
                match r.pages_of(vm) {
                    Some(p) if p.valid && (p.writable || !writable) => return Ok(true),
                    Some(p) if p.valid => {
                        // Mapped read-only, now needed writable: stop the device from
                        // using the old mapping before it is replaced.
                        drop(ns);
                        self.zap_vm_range(vm, start);
                        continue;
                    }
                    Some(_) => (n, g),
                    None => return Ok(false),
                }
            };
            // `notifier` is a reference of this fault's: the range may go meanwhile, the
            // notifier stays inserted until the retry check below is done.
            let seq = hmm::fault_range(&notifier, start, &mut pfns, writable)?;
            vm.gpu.race_delay();
            let counts = match vm.nlock.lock().pt.as_ref() {
                Some(pt) => pt.missing(start as u64, (end - start) as u64),
                None => return Err(ENODEV),
            };
            let mut pre = Prealloc::alloc(acc.dma_dev(), counts)?;
            let mut ns = self.nlock.lock();
            let i = first_ending_after(&ns.ranges, start);
            let Some(r) = ns
                .ranges
                .get_mut(i)
                .filter(|r| r.start == start && !r.unmapped)
            else {
                return Ok(false);
            };
            // The pages are current unless an invalidation hit the range since `gen0` was
            // read. The notifier's own sequence covers its whole interval, so unrelated
            // invalidations elsewhere in it would make the check fail needlessly; the
            // range's count is exact: every invalidation of the range bumps it under this
            // lock in its first pass, and one whose first pass ran before `gen0` was read
            // had finished (or `read_begin` waited for it) before the pages were walked.
            if r.gen != gen0 && r.notifier.read_retry(seq) {
                // Invalidated since read_begin: these pages may be stale (or freed).
                continue;
            }
            let Some(p) = r.pages_of(vm) else {
                return Ok(false);
            };
            let res = p.commit(start as u64, &pfns, &mut addrs, writable, &mut pre, seq);
            drop(ns);
            drop(pre);
            res?;
            return Ok(true);
        }
        Err(EAGAIN)
    }

    /// Makes `vm`'s pages of the range at `start` invalid: PTEs cleared, TLBs invalidated
    /// and waited for (the pages object stays).
    fn zap_vm_range(&self, vm: &Vm, start: usize) {
        let mut len = 0;
        {
            let mut ns = self.nlock.lock();
            let i = first_ending_after(&ns.ranges, start);
            if let Some(r) = ns.ranges.get_mut(i).filter(|r| r.start == start) {
                let (s, l) = (r.start as u64, r.len() as u64);
                if r.pages_of(vm).is_some_and(|p| p.invalidate(s, l)) {
                    len = l;
                }
            }
        }
        if len == 0 {
            return;
        }
        let _ = vm.invalidate_tlb(start as u64, len);
        let mut ns = self.nlock.lock();
        let i = first_ending_after(&ns.ranges, start);
        if let Some(p) = ns
            .ranges
            .get_mut(i)
            .filter(|r| r.start == start)
            .and_then(|r| r.pages_of(vm))
        {
            p.invalidated();
        }
    }

    /// Removes the range starting at `start` now, as if the CPU had unmapped it: every
    /// device's PTEs are cleared and its TLBs invalidated (waited for) before the range
    /// leaves the list.
    fn evict(&self, start: usize) -> Result {
        // Room for every VM mirroring the range, allocated without the notifier lock.
        let mut vms: KVec<Arc<Vm>> = KVec::new();
        let len = loop {
            let mut ns = self.nlock.lock();
            let i = first_ending_after(&ns.ranges, start);
            let Some(r) = ns.ranges.get_mut(i).filter(|r| r.start == start) else {
                return Ok(());
            };
            if r.pages.len() > vms.capacity() {
                let want = r.pages.len();
                drop(ns);
                vms = KVec::with_capacity(want, GFP_KERNEL)?;
                continue;
            }
            r.unmapped = true;
            r.gen = r.gen.wrapping_add(1);
            let (s, l) = (r.start as u64, r.len() as u64);
            for p in r.pages.iter_mut() {
                if p.invalidate(s, l) {
                    // Within the capacity: one entry per pages object of the range.
                    let _ = vms.push_within_capacity(p.vm.clone());
                }
            }
            break l;
        };
        for vm in vms.iter() {
            let _ = vm.invalidate_tlb(start as u64, len);
        }
        {
            let mut ns = self.nlock.lock();
            let i = first_ending_after(&ns.ranges, start);
            if let Some(r) = ns.ranges.get_mut(i).filter(|r| r.start == start) {
                for p in r.pages.iter_mut() {
                    if vms.iter().any(|v| p.is_for(v)) {
                        p.invalidated();
                    }
                }
            }
        }
        self.collect();
        Ok(())
    }

    /// Drops `vm`'s pages from every range (or from the ranges overlapping `only`), after
    /// clearing its PTEs; with `flush`, the device's TLBs are invalidated (and waited
    /// for) before the pages objects go, else the caller guarantees the device no longer
    /// uses the VM's translations (ASID unbound, device reset).
    pub(crate) fn detach_vm(&self, vm: &Vm, only: Option<(u64, u64)>, flush: bool) {
        let hit = |r: &Range| {
            only.is_none_or(|(va, size)| {
                crate::vm::ranges_overlap(r.start as u64, r.len() as u64, va, size)
            })
        };
        if flush {
            // The span of every range whose PTEs this clears: the TLB invalidation covers
            // all of it, not only `only` (a range overlapping a new binding is cleared
            // whole, and translations of its other pages must not survive).
            let mut cleared: Option<(u64, u64)> = None;
            {
                let mut ns = self.nlock.lock();
                for r in ns.ranges.iter_mut().filter(|r| hit(r)) {
                    let (s, l) = (r.start as u64, r.len() as u64);
                    if r.pages_of(vm).is_some_and(|p| p.invalidate(s, l)) {
                        cleared = Some(match cleared {
                            None => (s, s + l),
                            Some((a, b)) => (a.min(s), b.max(s + l)),
                        });
                    }
                }
            }
            if let Some((start, end)) = cleared {
                let _ = vm.invalidate_tlb(start, end - start);
            }
        }
        let mut ns = self.nlock.lock();
        for r in ns.ranges.iter_mut().filter(|r| hit(r)) {
            // The device no longer uses these pages (see above).
            r.pages.retain(|p| !p.is_for(vm));
        }
    }

    /// The garbage collector: removes the ranges the CPU unmapped, once no invalidation
    /// is in flight for them.
    fn collect(&self) {
        let mut collected = false;
        loop {
            let victim = {
                let mut ns = self.nlock.lock();
                let Some(i) = ns
                    .ranges
                    .iter()
                    .position(|r| r.unmapped && r.pages.iter().all(|p| p.inflight == 0))
                else {
                    break;
                };
                // The invalidation that marked it unmapped cleared the PTEs and waited for
                // the TLBs: no device uses its pages any more.
                for p in ns.ranges[i].pages.iter() {
                    p.vm.gpu.stats.svm_ranges_collected.add(1, Relaxed);
                }
                ns.ranges.remove(i).ok()
            };
            if victim.is_some() {
                RANGES_LIVE.add(1u64.wrapping_neg(), Relaxed);
                RANGES_COLLECTED.add(1, Relaxed);
                collected = true;
            }
            // Outside the notifier lock: it may hold the last reference on a notifier.
            drop(victim);
        }
        if collected {
            self.prune_notifiers();
        }
    }

    /// Tears the object down once no VM uses it.
    fn teardown(&self) {
        let notifiers = {
            let mut s = self.lock.lock();
            s.dead = true;
            core::mem::take(&mut s.notifiers)
        };
        NOTIFIERS_LIVE.add((notifiers.len() as u64).wrapping_neg(), Relaxed);
        // Ranges may still hold references: those notifiers are removed with the ranges
        // below (removal waits for the callbacks in progress, which see `dead`).
        drop(notifiers);
        // A queued collection runs now (and drops its reference, never the last: the
        // caller holds one).
        crate::reclaim_queue::flush_work(&self.gc_work);
        let ranges = {
            let mut ns = self.nlock.lock();
            ns.dead = true;
            core::mem::take(&mut ns.ranges)
        };
        RANGES_LIVE.add((ranges.len() as u64).wrapping_neg(), Relaxed);
        drop(ranges);
    }

    fn queue_gc(&self) {
        // SAFETY: `self` is inside an `Arc` (every `Svm` is created by `attach`), which the
        // registry keeps alive until teardown has removed the notifiers and cancelled the
        // work; `ManuallyDrop` keeps the count balanced.
        let me = core::mem::ManuallyDrop::new(unsafe { Arc::from_raw(core::ptr::from_ref(self)) });
        // Queueing never allocates; if it is queued already, the clone is dropped here,
        // never the last reference (the registry holds one).
        let _ = workqueue::system().enqueue(Arc::clone(&me));
    }
}

// ---- invalidation ---------------------------------------------------------------------------

// `Started` is moved once, into the core's finish slot: boxing it would allocate in the
// notifier's first pass.
#[allow(clippy::large_enum_variant)]
enum Begin {
    Retry,
    Nothing,
    Started(Pending),
}

impl SvmNotifierData {
    fn svm(&self) -> &Svm {
        // SAFETY: The object owns the notifier and outlives it (teardown removes the
        // notifiers first).
        unsafe { &*self.svm }
    }

    /// The notifier's interval.
    fn interval(&self) -> (usize, usize) {
        (self.start, self.start + NOTIFIER_SIZE)
    }

    /// First pass: publish the sequence, invalidate the pages, start the TLB
    /// invalidations.
    fn begin(this: &SvmNotifier, inv: &Invalidation<'_>) -> Begin {
        let svm = this.data().svm();
        let mut ns = if inv.blockable() {
            svm.nlock.lock()
        } else {
            match svm.nlock.try_lock() {
                Some(g) => g,
                None => return Begin::Retry,
            }
        };
        let (nstart, nend) = this.data().interval();
        let start = inv.start().max(nstart);
        let end = inv.end().min(nend);
        let first = first_ending_after(&ns.ranges, start);
        let hit = |r: &KBox<Range>| r.start < end;
        if !inv.blockable() {
            // Only go on if no device has to be stopped.
            let busy = ns.ranges[first..]
                .iter()
                .take_while(|r| hit(r))
                .any(|r| r.pages.iter().any(|p| p.busy()));
            if busy {
                return Begin::Retry;
            }
        }
        inv.set_seq();
        // A pruned notifier has no range in its interval and never gets one again (a newer
        // notifier of the interval serves the ranges there).
        if ns.dead || this.data().pruned.load(Relaxed) != 0 {
            return Begin::Nothing;
        }
        let unmap = inv.is_unmap();
        let mut p = Pending::new(start, end);
        let mut any = false;
        let mut gc = false;
        for r in ns.ranges[first..].iter_mut() {
            if r.start >= end {
                break;
            }
            r.gen = r.gen.wrapping_add(1);
            if unmap {
                r.unmapped = true;
                gc = true;
            }
            let (rs, rl) = (r.start as u64, r.len() as u64);
            for pg in r.pages.iter_mut() {
                if pg.overflow != 0 {
                    // Another invalidation that could not track this VM has cleared its
                    // PTEs (no fault can map them again before it is done) and stops it in
                    // its second pass: wait for that in ours.
                    p.conflict = true;
                    p.overflow = true;
                    any = true;
                    continue;
                }
                if !pg.invalidate(rs, rl) {
                    continue;
                }
                any = true;
                let slot = p
                    .targets
                    .iter()
                    .position(|t| t.as_ref().is_some_and(|t| Arc::ptr_eq(&t.vm, &pg.vm)))
                    .or_else(|| p.targets.iter().position(|t| t.is_none()));
                match slot {
                    Some(k) => {
                        let t = p.targets[k].get_or_insert_with(|| Target {
                            vm: pg.vm.clone(),
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
                        // More devices than a pending invalidation tracks: the pages carry
                        // this invalidation's token; its second pass finds them, stops
                        // their devices (outside the lock) and waits, before it returns.
                        pg.overflow = p.token;
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
        drop(ns);
        if gc {
            svm.queue_gc();
        }
        if any {
            Begin::Started(p)
        } else {
            Begin::Nothing
        }
    }

    /// Second pass, for the VMs the first pass could not track (more than [`MAX_TARGETS`]
    /// hit; their pages carry the invalidation's token): in rounds of up to `MAX_TARGETS`
    /// VMs, collect them under the lock, invalidate their TLBs and wait without it, then
    /// finish their pages (token cleared, one in-flight invalidation less). Then, if the
    /// first pass met pages another overflowing invalidation had marked (`conflict`: that
    /// one cleared their PTEs and stops their devices), wait until it is done with them.
    /// Allocation-free; nothing sleeps under the lock.
    fn complete_overflow(svm: &Svm, p: &Pending) {
        loop {
            let mut round: [Option<(Arc<Vm>, u64, u64)>; MAX_TARGETS] =
                [const { None }; MAX_TARGETS];
            {
                let ns = svm.nlock.lock();
                let first = first_ending_after(&ns.ranges, p.start);
                for r in ns.ranges[first..].iter().take_while(|r| r.start < p.end) {
                    let (rs, re) = (r.start as u64, r.end as u64);
                    for pg in r.pages.iter().filter(|pg| pg.overflow == p.token) {
                        if let Some(e) = round
                            .iter_mut()
                            .flatten()
                            .find(|(vm, _, _)| Arc::ptr_eq(vm, &pg.vm))
                        {
                            e.1 = e.1.min(rs);
                            e.2 = e.2.max(re);
                        } else if let Some(free) = round.iter_mut().find(|e| e.is_none()) {
                            *free = Some((pg.vm.clone(), rs, re));
                        }
                    }
                }
            }
            if round.iter().all(|e| e.is_none()) {
                break;
            }
            let mut tickets: [Option<crate::ctrl::Ticket>; MAX_TARGETS] =
                [const { None }; MAX_TARGETS];
            for (e, t) in round.iter().zip(tickets.iter_mut()) {
                if let Some((vm, s, end)) = e {
                    *t = start_tlb_invalidate(vm, *s, *end, true).ok();
                }
            }
            for (e, t) in round.iter().zip(tickets.iter_mut()) {
                let Some((vm, _, _)) = e else { continue };
                let ctrl = &vm.gpu.ctrl;
                let mut after = ctrl.last_seqno();
                let ok = t
                    .take()
                    .map(|tk| {
                        after = tk.seqno();
                        ctrl.wait(tk)
                    })
                    .is_some_and(|d| d.is_ok_and(|d| d.succeeded()));
                if !ok {
                    vm.gpu
                        .reset_and_recover(after, "an SVM TLB invalidation failed or timed out");
                }
                vm.gpu.stats.invalidations.add(1, Relaxed);
            }
            let mut ns = svm.nlock.lock();
            let first = first_ending_after(&ns.ranges, p.start);
            for r in ns.ranges[first..]
                .iter_mut()
                .take_while(|r| r.start < p.end)
            {
                for pg in r.pages.iter_mut().filter(|pg| pg.overflow == p.token) {
                    if round
                        .iter()
                        .flatten()
                        .any(|(vm, _, _)| Arc::ptr_eq(vm, &pg.vm))
                    {
                        pg.overflow = 0;
                        pg.invalidated();
                    }
                }
            }
        }
        if !p.conflict {
            return;
        }
        let t0 = Instant::<Monotonic>::now();
        loop {
            let foreign = {
                let ns = svm.nlock.lock();
                let first = first_ending_after(&ns.ranges, p.start);
                ns.ranges[first..]
                    .iter()
                    .take_while(|r| r.start < p.end)
                    .any(|r| r.pages.iter().any(|pg| pg.overflow != 0))
            };
            // The other invalidation's waits are bounded (a failed one resets the
            // device), so this ends; the bound is a safety net against a lost wake-up.
            if !foreign || t0.elapsed().as_millis() > 2 * i64::from(crate::ctrl::TIMEOUT_MS) {
                return;
            }
            fsleep(Delta::from_millis(1));
        }
    }

    /// Second pass (or the rest of the single pass): wait for every device, then unmap.
    fn complete(this: &SvmNotifier, mut p: Pending) {
        let svm = this.data().svm();
        if p.overflow {
            Self::complete_overflow(svm, &p);
        }
        for t in p.targets.iter_mut().flatten().filter(|t| t.deferred) {
            t.vm.gpu.stats.commands_deferred.add(1, Relaxed);
            match start_tlb_invalidate(&t.vm, t.start, t.end, true) {
                Ok(tk) => t.ticket = Some(tk),
                Err(_) => t.failed = true,
            }
        }
        for t in p.targets.iter_mut().flatten() {
            let ctrl = &t.vm.gpu.ctrl;
            let mut after = ctrl.last_seqno();
            let ok = !t.failed
                && t.ticket
                    .take()
                    .map(|tk| {
                        after = tk.seqno();
                        ctrl.wait(tk)
                    })
                    .is_some_and(|d| d.is_ok_and(|d| d.succeeded()));
            if !ok {
                // No guarantee from the device: reset it (it then holds no translation).
                t.vm.gpu
                    .reset_and_recover(after, "an SVM TLB invalidation failed or timed out");
            }
        }
        {
            let mut ns = svm.nlock.lock();
            let first = first_ending_after(&ns.ranges, p.start);
            for r in ns.ranges[first..].iter_mut() {
                if r.start >= p.end {
                    break;
                }
                for pg in r.pages.iter_mut() {
                    let mine = p
                        .targets
                        .iter()
                        .flatten()
                        .any(|t| Arc::ptr_eq(&t.vm, &pg.vm));
                    if mine && pg.inflight > 0 {
                        pg.invalidated();
                    }
                }
            }
        }
        let gc = {
            let ns = svm.nlock.lock();
            let first = first_ending_after(&ns.ranges, p.start);
            ns.ranges[first..]
                .iter()
                .take_while(|r| r.start < p.end)
                .any(|r| r.unmapped)
        };
        if gc {
            // Unmapped ranges whose invalidation just finished can go now.
            svm.queue_gc();
        }
        let dt = p.t0.elapsed().as_nanos().max(0) as u64;
        for t in p.targets.iter().flatten() {
            t.vm.gpu.stats.invalidations.add(1, Relaxed);
            t.vm.gpu.stats.invalidation_ns.add(dt, Relaxed);
        }
        // Dropping the VM references here is never the last one for a live VM's pages;
        // a VM released meanwhile only frees memory.
        drop(p);
    }
}

impl IntervalOps for SvmNotifierData {
    type Finish = FinishRef;

    fn invalidate(this: &SvmNotifier, inv: &Invalidation<'_>) -> bool {
        match Self::begin(this, inv) {
            Begin::Retry => false,
            Begin::Nothing => true,
            Begin::Started(p) => {
                p.count(false);
                Self::complete(this, p);
                true
            }
        }
    }

    fn invalidate_start(this: &SvmNotifier, inv: &Invalidation<'_>) -> Start<FinishRef> {
        match Self::begin(this, inv) {
            Begin::Retry => Start::Retry,
            Begin::Nothing => Start::Done,
            Begin::Started(p) => match this.data().svm().pool.get(p) {
                Ok(f) => Start::Finish(f),
                // No finish item free: fall back to single pass.
                Err(p) => {
                    p.count(false);
                    Self::complete(this, p);
                    Start::Done
                }
            },
        }
    }

    fn invalidate_finish(this: &SvmNotifier, finish: FinishRef) {
        if let Some(p) = finish.into_inner() {
            p.count(true);
            Self::complete(this, p);
        }
    }
}

#[kunit_tests(svmgpu_svm)]
mod tests {
    use super::*;

    fn nothing(_: u64, _: u64) -> bool {
        false
    }

    #[test]
    fn chunks_follow_the_vma() {
        // A 4 MiB VMA, 2 MiB aligned: 2 MiB chunks.
        assert_eq!(
            chunk_for(0x20_1000, 0x20_0000, 0x60_0000, &nothing),
            Some((0x20_0000, 0x40_0000))
        );
        // A 1 MiB VMA: 64 KiB chunks.
        assert_eq!(
            chunk_for(0x21_1000, 0x20_0000, 0x30_0000, &nothing),
            Some((0x21_0000, 0x22_0000))
        );
        // A 12 KiB VMA: 4 KiB chunks.
        assert_eq!(
            chunk_for(0x20_2000, 0x20_1000, 0x20_4000, &nothing),
            Some((0x20_2000, 0x20_3000))
        );
        // Outside: none.
        assert_eq!(chunk_for(0x10_0000, 0x20_0000, 0x30_0000, &nothing), None);
    }

    #[test]
    fn chunks_avoid_bindings() {
        // A binding of the first 64 KiB of a 4 MiB VMA at 0x20_0000: a fault at +1 MiB
        // gets the 64 KiB chunk around it, not the 2 MiB one that holds the binding.
        let binding = |va: u64, len: u64| crate::vm::ranges_overlap(va, len, 0x20_0000, 0x1_0000);
        assert_eq!(
            chunk_for(0x30_0000, 0x20_0000, 0x60_0000, &binding),
            Some((0x30_0000, 0x31_0000))
        );
        // Right next to the binding: the 64 KiB chunk would hold it too; 4 KiB.
        let binding = |va: u64, len: u64| crate::vm::ranges_overlap(va, len, 0x20_0000, 0x1000);
        assert_eq!(
            chunk_for(0x20_1000, 0x20_0000, 0x60_0000, &binding),
            Some((0x20_1000, 0x20_2000))
        );
        // Far from the binding: still 2 MiB.
        assert_eq!(
            chunk_for(0x40_0000, 0x20_0000, 0x60_0000, &binding),
            Some((0x40_0000, 0x60_0000))
        );
    }
}
