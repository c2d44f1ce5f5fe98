// SPDX-License-Identifier: GPL-2.0

//! svmgpu: driver for the svmgpu virtual GPU (virtio device ID 62).
//!
//! DOC: Overview
//!
//! svmgpu is a virtual GPU served by a vhost-user backend; its contract is the Markdown
//! spec in `spec/` of the svmgpu repository, whose wire structs this module compiles
//! directly (`wire.rs`). The driver binds every svmgpu virtio device and gives each a DRM
//! render node whose uAPI is `guest-driver/uapi/svmgpu_drm.h`.
//!
//! Model:
//!
//! - [`virtio`]: a virtio bus abstraction (none exists upstream): driver registration,
//!   typed devices usable as DRM parents, virtqueues.
//! - [`ctrl`]: the control queue, with preallocated command slots (commands can be sent
//!   from notifier context without allocating) and asynchronous commands split into
//!   `start` (returns a ticket) and `wait`.
//! - [`events`]: eventq and complq receive rings, preallocated and reposted in the
//!   interrupt callback; [`gpu`] dispatches their records (job completions, command
//!   completions, page faults, resets) and owns the per-device state, resets and removal;
//!   [`faults`]: the GPU page-fault service (a dispatcher per device, a worker per VM,
//!   replies posted in batches) on the module's `WQ_MEM_RECLAIM` workqueue
//!   ([`reclaim_queue`]).
//! - [`drm_driver`]: the DRM driver, open files and ioctls.
//! - [`vm`]: VMs (an ASID and a [`pagetable`] in DMA-coherent memory), exec submission,
//!   fault resolution, the rebind worker; [`exec_queue`]: device contexts with their job
//!   [`fence`]s.
//! - [`userptr`]: bindings of CPU memory without pinning, on top of [`mmu_notifier`] (a
//!   safe abstraction of `mmu_interval_notifier`, single- and two-pass) and [`hmm`] (a safe
//!   abstraction of `hmm_range_fault`), designed to be reused by an SVM layer.
//! - [`svm`] and [`svm_pages`]: shared virtual memory for fault-mode VMs: a per-`mm` SVM
//!   object with notifiers over large intervals, ranges chunked by the VMA and garbage
//!   collected after unmap, and one *pages* object per device (VM) and range; GPU faults
//!   at any CPU address of the process, prefetch, and invalidation across devices in
//!   three modes (`svm_mode=single|per_device|shared`). Its `DOC:` overview has the
//!   details and its own locking. [`gpusvm_svm`] is the second implementation of the same,
//!   on the kernel's `drm_gpusvm` (`kernel::drm::gpusvm`), selected with
//!   `svm_impl=native|gpusvm` ([`svm_impl`]).
//!
//! Locking, outermost first (each lock is only ever taken with the ones above it held, in
//! this order; the notifier locks are taken from reclaim and lockdep is told so at VM
//! creation, see [`mmu_notifier::as_in_reclaim`]):
//!
//! 1. per open file, the handle tables (a mutex: lookups, insertions, removals; an object
//!    is destroyed under it only when its handle could not be allocated);
//! 2. per VM, the *VM lock* (mutex; the gpu_vm lock of the VM_BIND locking document):
//!    bindings and their scratch state, revalidation, exec, GPU fault resolution, the
//!    rebind worker, prefetch; held around `hmm_range_fault` and `GFP_KERNEL` allocations;
//! 3. per SVM object, its lock (mutex): the notifier list; a notifier is inserted under it
//!    (which takes the mmap lock; the mm's notifier state is set up beforehand, in the
//!    ioctl, so insertion never takes `mm_take_all_locks` here);
//! 4. the mm's mmap lock (`hmm_range_fault`, VMA lookups; the core holds it around most
//!    notifier calls);
//! 5. per SVM object, the *SVM notifier lock* (mutex): ranges and their pages; taken in
//!    notifier callbacks: nothing allocates, sleeps on the device or takes a lock above
//!    it under it;
//! 6. per VM, the *VM notifier lock* (mutex; the userptr notifier lock): validity of each
//!    binding's mapping and the sequence it was made for, the page table's entries, the
//!    long-running queues' preemption state; taken in notifier callbacks (alone, or inside
//!    the SVM one), same rules. `mmu_interval_set_seq` is called under it; exec checks
//!    `mmu_interval_read_retry` and *posts* its job under it (the answer is collected
//!    after). Non-blockable invalidations only `try_lock` it and return false rather than
//!    wait;
//! 7. IRQ-safe spinlocks shared with the interrupt callbacks, taken last and never
//!    around a sleep: the control queue (then a queue's fences, whose seqno hook it
//!    calls, then a job's `dma_fence`, signalled under the fences' lock), the receive
//!    rings, the context table, the device's fault ring, the hang ring, the reset events;
//!    and each VM's fault queue (a plain spinlock).
//!
//! Beside that chain, per device: the *reset lock* (mutex), then the VM table (mutex),
//! then a VM's notifier lock (6: re-binding ASIDs after a reset reads the page-table
//! root). Neither is ever taken under 5 or 6: a notifier that needs a reset asks for it in
//! its second pass, after releasing them. The command slots and asynchronous entries of
//! the control queue are resources, not locks: a first pass never waits for one (what does
//! not fit is started by the second pass, which may).
//!
//! An invalidation (for every binding it hits) publishes the sequence, marks the binding
//! invalid and clears its PTEs under the notifier lock, then starts `TLB_INVALIDATE` (and
//! `CTX_PREEMPT` for long-running queues) and waits for their completions — in the same
//! callback (`notifier_mode=single`) or, by default, in the second pass of the core's
//! two-pass notifiers (`notifier_mode=twopass`), so that every device's invalidation runs
//! in parallel. A failed or timed-out wait resets the device first; the device uses the
//! pages' guest-physical addresses (spec "Addresses"), so nothing is DMA-mapped or
//! unmapped.

use choice_param::{choice_param, Choice, ChoiceParam};
use kernel::{driver, prelude::*, sync::atomic::Atomic};

mod choice_param;
mod ctrl;
mod drm_driver;
mod events;
mod exec_queue;
mod faults;
mod fence;
mod finish_pool;
mod gpu;
mod gpusvm_svm;
mod handles;
mod hmm;
mod id_table;
mod mmu_notifier;
mod pagetable;
mod reclaim_queue;
mod svm;
mod svm_impl;
mod svm_invalidation;
mod svm_pages;
mod syncs;
mod userptr;
mod virtio;
mod vm;
#[path = "../../spec/src/wire.rs"]
// Shared with the device's crate, a library whose public API clippy leaves alone (its
// `to_bytes(&self)` on `Copy` types).
#[allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::wrong_self_convention
)]
mod wire;

module! {
    type: SvmgpuModule,
    name: "svmgpu",
    authors: ["svmgpu developers"],
    description: "Driver for the svmgpu virtual GPU",
    license: "GPL",
    params: {
        audit: bool {
            default: true,
            description: "Accept the device's AUDIT feature (it counts stale TLB accesses)",
        },
    },
}

/// How userptr invalidations stop the devices (module parameter `notifier_mode`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotifierMode {
    /// One pass per notifier: start and wait in the same callback.
    Single,
    /// The core's two passes: start everywhere first, wait in the second pass.
    TwoPass,
}

impl Choice for NotifierMode {
    const NAMES: &'static [&'static str] = &["single", "twopass"];

    fn from_index(index: usize) -> Self {
        match index {
            0 => NotifierMode::Single,
            _ => NotifierMode::TwoPass,
        }
    }
}

impl NotifierMode {
    pub(crate) fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

static NOTIFIER_MODE: ChoiceParam<NotifierMode> = ChoiceParam::new(NotifierMode::TwoPass as usize);
choice_param!(
    "svmgpu",
    "notifier_mode",
    NOTIFIER_MODE: NotifierMode,
    "How userptr invalidations stop the devices: single (one pass per notifier) or twopass (default)"
);

/// The notifier mode in effect (read at probe).
pub(crate) fn notifier_mode() -> NotifierMode {
    NOTIFIER_MODE.get()
}

/// Whether the AUDIT feature is accepted.
pub(crate) fn audit() -> bool {
    module_parameters::audit.value()
}

/// The module's debugfs directory `svmgpu/` (devices add `virtioN/` under it), published
/// for probe while [`DebugfsRoot`] lives.
static DEBUGFS_ROOT: Atomic<*mut kernel::debugfs::Dir> = Atomic::new(core::ptr::null_mut());

/// Owns the debugfs root and publishes it in [`DEBUGFS_ROOT`]; also serves
/// `svmgpu/svm_ranges`, the module-wide SVM figures (live ranges of every process, and
/// ranges the garbage collector removed), which the render node does not tell anyone.
struct DebugfsRoot(
    *mut kernel::debugfs::Dir,
    Option<Pin<KBox<kernel::debugfs::File<()>>>>,
);

// SAFETY: The pointer is an owned `KBox<Dir>`; `Dir` is `Send` and `Sync`.
unsafe impl Send for DebugfsRoot {}
// SAFETY: See `Send`.
unsafe impl Sync for DebugfsRoot {}

impl DebugfsRoot {
    fn new() -> Result<Self> {
        let dir = KBox::new(kernel::debugfs::Dir::new(c"svmgpu"), GFP_KERNEL)?;
        let ranges = KBox::pin_init(
            dir.read_callback_file(c"svm_ranges", (), &|(): &(), f| {
                let s = svm_impl::stats();
                writeln!(f, "live {}\ncollected {}", s.ranges, s.ranges_collected)?;
                writeln!(
                    f,
                    "notifiers {}\nnotifiers_pruned {}",
                    s.notifiers, s.notifiers_pruned
                )
            }),
            GFP_KERNEL,
        )
        .ok();
        let p = KBox::into_raw(dir);
        DEBUGFS_ROOT.store(p, kernel::sync::atomic::Release);
        Ok(Self(p, ranges))
    }
}

impl Drop for DebugfsRoot {
    fn drop(&mut self) {
        DEBUGFS_ROOT.store(core::ptr::null_mut(), kernel::sync::atomic::Release);
        // The file goes before its directory.
        drop(self.1.take());
        // SAFETY: `self.0` came from `KBox::into_raw` in `new`; the driver (whose devices
        // use the root) is unregistered before this field is dropped (declaration order).
        drop(unsafe { KBox::from_raw(self.0) });
    }
}

/// The debugfs root, while the module is loaded.
pub(crate) fn debugfs_root() -> Option<&'static kernel::debugfs::Dir> {
    let p = DEBUGFS_ROOT.load(kernel::sync::atomic::Acquire);
    // SAFETY: Non-null only between `DebugfsRoot::new` and its drop, which happens after
    // every device was unbound (the callers are probe of a device of this driver).
    unsafe { p.as_ref() }
}

/// How SVM invalidations stop the devices (module parameter `svm_mode`; see
/// `SVMGPU_SVM_*` in the uAPI header and the `DOC:` overview of [`svm`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum SvmMode {
    /// One SVM object per process and device, single-pass notifiers.
    Single,
    /// One SVM object per process and device, two-pass notifiers.
    PerDevice,
    /// One SVM object per process, one two-pass notifier driving every device.
    Shared,
}

impl Choice for SvmMode {
    const NAMES: &'static [&'static str] = &["single", "per_device", "shared"];

    fn from_index(index: usize) -> Self {
        match index {
            0 => SvmMode::Single,
            1 => SvmMode::PerDevice,
            _ => SvmMode::Shared,
        }
    }
}

impl SvmMode {
    pub(crate) fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The `SVMGPU_SVM_*` value (the names' order).
    pub(crate) fn uapi(self) -> u32 {
        self as u32
    }
}

static SVM_MODE: ChoiceParam<SvmMode> = ChoiceParam::new(SvmMode::Shared as usize);
choice_param!(
    "svmgpu",
    "svm_mode",
    SVM_MODE: SvmMode,
    "How SVM invalidations stop the devices: single, per_device or shared (default)"
);

/// The SVM mode in effect (fixed while the module is loaded: the parameter is read-only).
pub(crate) fn svm_mode() -> SvmMode {
    SVM_MODE.get()
}

/// The module's `WQ_MEM_RECLAIM` workqueue (GPU fault service, resets, the virtio reset of
/// last resort, rebinds), published for the devices while [`Reclaim`] lives.
static RECLAIM_QUEUE: Atomic<*mut reclaim_queue::ReclaimQueue> = Atomic::new(core::ptr::null_mut());

/// Owns the reclaim workqueue and publishes it in [`RECLAIM_QUEUE`].
struct Reclaim(*mut reclaim_queue::ReclaimQueue);

// SAFETY: The pointer is an owned `KBox<ReclaimQueue>`, which is `Send` and `Sync`.
unsafe impl Send for Reclaim {}
// SAFETY: See `Send`.
unsafe impl Sync for Reclaim {}

impl Reclaim {
    fn new() -> Result<Self> {
        let q = KBox::new(reclaim_queue::ReclaimQueue::new(c"svmgpu")?, GFP_KERNEL)?;
        let p = KBox::into_raw(q);
        RECLAIM_QUEUE.store(p, kernel::sync::atomic::Release);
        Ok(Self(p))
    }
}

impl Drop for Reclaim {
    fn drop(&mut self) {
        RECLAIM_QUEUE.store(core::ptr::null_mut(), kernel::sync::atomic::Release);
        // SAFETY: `self.0` came from `KBox::into_raw` in `new`; the driver (whose devices
        // and VMs queue work on it) is unregistered and every file closed before this field
        // is dropped (declaration order; the module is only unloaded once unused).
        drop(unsafe { KBox::from_raw(self.0) });
    }
}

/// The module's `WQ_MEM_RECLAIM` workqueue: for work an MMU notifier or memory reclaim
/// may wait for. The system workqueue before module init completed (never in practice:
/// devices probe after it).
pub(crate) fn reclaim_queue() -> &'static kernel::workqueue::Queue {
    let p = RECLAIM_QUEUE.load(kernel::sync::atomic::Acquire);
    // SAFETY: Non-null only between `Reclaim::new` and its drop, which happens after every
    // device was unbound and every file closed (the callers are devices' and VMs' work).
    match unsafe { p.as_ref() } {
        Some(q) => q.queue(),
        None => kernel::workqueue::system(),
    }
}

#[pin_data]
struct SvmgpuModule {
    // Dropped first: every device is unbound before the debugfs root and the reclaim
    // workqueue go away.
    #[pin]
    driver: driver::Registration<virtio::Adapter<gpu::GpuDriver>>,
    _debugfs: DebugfsRoot,
    _reclaim: Reclaim,
}

impl kernel::InPlaceModule for SvmgpuModule {
    fn init(module: &'static ThisModule) -> impl PinInit<Self, Error> {
        svm_impl::init();
        pr_info!(
            "notifier_mode={} svm_mode={} svm_impl={}\n",
            notifier_mode().name(),
            svm_mode().name(),
            svm_impl::svm_impl().name()
        );
        try_pin_init!(Self {
            // Before the driver: probe uses them.
            _debugfs: DebugfsRoot::new()?,
            _reclaim: Reclaim::new()?,
            driver <- driver::Registration::new(c"svmgpu", module),
        })
    }
}
