// SPDX-License-Identifier: GPL-2.0

//! One svmgpu device: the driver's state of it ([`Gpu`]), the tables that route the
//! device's records (contexts, ASIDs), and access to the bound device ([`GpuAccess`]).
//!
//! The rest of the device, one concern per file:
//! - `probe.rs`: the virtio driver: probe (config space, queues, `GET_INFO`), removal
//!   with work in flight;
//! - `dispatch.rs`: the queues' interrupt callbacks, and the completion and event records
//!   (spec: Completions, Events), none of them trusted;
//! - `recovery.rs`: resets (driver `RESET`, device-initiated, the virtio reset of last
//!   resort), hangs (`ENGINE_HANG`, the job watchdog) and their counters;
//! - `debugfs.rs`: `svmgpu/virtioN/` (`recovery`, `job_timeout_ms`, `race_delay_us`);
//! - GPU page faults are served by `faults.rs` (per-VM workers).

mod debugfs;
mod dispatch;
mod probe;
mod recovery;

pub(crate) use probe::GpuDriver;
pub(crate) use recovery::Recovery;
use recovery::{HangRing, LastReset, ResetEvents, WATCHDOG_MS};

use crate::{
    ctrl::CtrlQueue,
    events::RxQueue,
    faults::{FaultRec, FaultRing},
    fence::Fences,
    id_table::IdTable,
    userptr::FinishPool,
    virtio,
    vm::Vm,
    wire, NotifierMode, SvmMode,
};
use kernel::{
    device,
    prelude::*,
    sync::{
        aref::ARef,
        atomic::{Atomic, Relaxed},
        Arc, CondVar, Mutex, SpinLock, SpinLockIrq,
    },
    time::msecs_to_jiffies,
    uapi,
    workqueue::{self, impl_has_delayed_work, impl_has_work, DelayedWork, Work, WorkItem},
};

struct Access {
    users: u32,
    dead: bool,
}

/// Driver statistics, reported by DEVICE_QUERY.
pub(crate) struct Stats {
    pub(crate) invalidations: Atomic<u64>,
    pub(crate) invalidation_ns: Atomic<u64>,
    pub(crate) gpu_faults: Atomic<u64>,
    pub(crate) gpu_faults_failed: Atomic<u64>,
    pub(crate) resets: Atomic<u64>,
    /// Total time from a fault's event to its reply handed to the device.
    pub(crate) fault_service_ns: Atomic<u64>,
    /// Total time from a fault's reply handed to the device to the device's answer.
    pub(crate) fault_ack_ns: Atomic<u64>,
    /// Faults resolved through SVM.
    pub(crate) svm_faults: Atomic<u64>,
    /// SVM pages objects of this device's VMs.
    pub(crate) svm_pages: Atomic<u64>,
    /// SVM ranges this device mirrored that the garbage collector removed.
    pub(crate) svm_ranges_collected: Atomic<u64>,
    /// Invalidations that stopped this device in the core's two passes, and in one
    /// (`notifier_mode=single`, `svm_mode=single`, or an empty finish pool).
    pub(crate) invalidations_two_pass: Atomic<u64>,
    pub(crate) invalidations_single_pass: Atomic<u64>,
    /// Commands a first pass could not start without sleeping (back-pressure), started
    /// by the second pass instead.
    pub(crate) commands_deferred: Atomic<u64>,
}

/// Faults a fault ring holds (the device's and each VM's): twice what the device keeps
/// outstanding, and room for duplicates.
pub(crate) fn fault_ring_size(config: &wire::Config) -> usize {
    2 * config.max_outstanding_faults.min(4096) as usize + 64
}

/// Default of the driver's job timeout (`svmgpu/virtioN/job_timeout_ms` in debugfs).
pub(crate) const JOB_TIMEOUT_MS: u32 = 10_000;

/// The driver's state of one device. Shared (`Arc`) by the bus binding, the DRM device,
/// open files, VMs and work items; it outlives the binding, but after removal every
/// operation fails with `ENODEV`.
#[pin_data]
pub(crate) struct Gpu {
    /// `virtioN` bus index, for messages.
    pub(crate) bus_index: u32,
    /// The config space as read at probe.
    pub(crate) config: wire::Config,
    /// The raw config bytes, as handed to user space.
    pub(crate) config_raw: [u8; wire::Config::SIZE],
    /// Negotiated feature bits.
    pub(crate) features: u64,
    /// How MMU notifiers run for this device's userptrs.
    pub(crate) notifier_mode: NotifierMode,
    /// How SVM invalidations stop the devices (fault-mode VMs).
    pub(crate) svm_mode: SvmMode,
    /// The device doing DMA (the transport's device).
    dma_dev: ARef<device::Device>,
    #[pin]
    pub(crate) ctrl: CtrlQueue,
    #[pin]
    eventq: RxQueue,
    #[pin]
    complq: RxQueue,
    /// Context id → the fences of its exec queue (complq routing; allocation of ids).
    #[pin]
    ctxs: SpinLockIrq<IdTable<Arc<Fences>>>,
    /// ASID → its VM (fault routing; allocation of ASIDs; removal).
    #[pin]
    vms: Mutex<IdTable<Arc<Vm>>>,
    #[pin]
    faults: SpinLockIrq<FaultRing>,
    #[pin]
    fault_work: Work<Gpu, 0>,
    #[pin]
    reset_work: Work<Gpu, 1>,
    /// The watchdog: fails jobs that make no progress (driver-side hang detection).
    #[pin]
    watchdog: DelayedWork<Gpu, 2>,
    /// Hangs reported by `ENGINE_HANG` events for `reset_work`.
    #[pin]
    hangs: SpinLockIrq<HangRing>,
    #[pin]
    reset_events: SpinLockIrq<ResetEvents>,
    #[pin]
    reset_cv: CondVar,
    #[pin]
    reset_lock: Mutex<()>,
    #[pin]
    last_reset: SpinLock<LastReset>,
    /// For a virtio reset when `RESET` does not answer.
    vdev: virtio::ResetHandle,
    /// The virtio reset of the last resort (see [`Gpu::wedge`]).
    #[pin]
    wedge_work: Work<Gpu, 3>,
    #[pin]
    wedge_state: SpinLock<u8>,
    #[pin]
    wedge_cv: CondVar,
    /// The driver's job timeout (ms), writable in debugfs.
    pub(crate) job_timeout_ms: Atomic<u32>,
    /// Seqno of the last driver `RESET` that completed (see [`Gpu::reset_and_recover`]).
    reset_seqno: Atomic<u64>,
    /// A test hook (debugfs `race_delay_us`, 0 by default) that widens race windows so
    /// that a guest test hits them every time: how long a revalidation or SVM fault sleeps
    /// between `hmm_range_fault` and taking the notifier lock (a CPU invalidation lands
    /// there; the commit must notice it, `mmu_interval_read_retry`), and how long removal
    /// sleeps after failing every waiter (a notifier returns there; the device must be
    /// stopped already).
    race_delay_us: Atomic<u32>,
    pub(crate) recovery: Recovery,
    #[pin]
    access: SpinLock<Access>,
    #[pin]
    access_cv: CondVar,
    /// Second-pass state of two-pass invalidations.
    pub(crate) finish_pool: FinishPool,
    pub(crate) stats: Stats,
}

impl_has_work! {
    impl HasWork<Self, 0> for Gpu { self.fault_work }
    impl HasWork<Self, 1> for Gpu { self.reset_work }
    impl HasWork<Self, 3> for Gpu { self.wedge_work }
}

impl_has_delayed_work! {
    impl HasDelayedWork<Self, 2> for Gpu { self.watchdog }
}

fn inc(c: &Atomic<u64>) {
    c.add(1, Relaxed);
}

/// Proof that the device is bound (removal waits until every guard is gone): DMA
/// allocations and mappings may be made.
///
/// Why not `Devres`/`Revocable`: their guard ([`kernel::revocable::RevocableGuard`]) is an
/// RCU read-side section, so its holder may not sleep, and `Devres::access` needs a
/// `&Device<Bound>` that an ioctl or a work item does not have. A `GpuAccess` is held
/// across what sleeps: page-table allocation, DMA mapping, `hmm_range_fault`, a control
/// command's round trip. Removal therefore marks the device dead (new `enter` calls fail
/// with `ENODEV`), fails every waiter, and then waits for the last guard, a sleeping
/// revocation that the RCU-based types do not offer.
pub(crate) struct GpuAccess<'a> {
    gpu: &'a Gpu,
}

impl GpuAccess<'_> {
    /// The device doing DMA, bound while the guard lives.
    pub(crate) fn dma_dev(&self) -> &device::Device<device::Bound> {
        // SAFETY: Removal marks the device dead and then waits until no `GpuAccess`
        // exists before the device is unbound, so it is bound while `self` lives.
        unsafe { self.gpu.dma_dev.as_bound() }
    }
}

impl Drop for GpuAccess<'_> {
    fn drop(&mut self) {
        let mut a = self.gpu.access.lock();
        a.users -= 1;
        let last = a.users == 0 && a.dead;
        drop(a);
        if last {
            self.gpu.access_cv.notify_all();
        }
    }
}

impl Gpu {
    /// The test hook `race_delay_us` (debugfs): sleeps that long, if set. Called between
    /// `hmm_range_fault` and the notifier lock (no lock of the notifier path held), and
    /// in removal after the waiters were failed.
    pub(crate) fn race_delay(&self) {
        let us = self.race_delay_us.load(Relaxed);
        if us > 0 {
            kernel::time::delay::fsleep(kernel::time::Delta::from_micros(i64::from(us)));
        }
    }

    /// Whether the test hook `race_delay_us` is set.
    pub(crate) fn race_delay_armed(&self) -> bool {
        self.race_delay_us.load(Relaxed) > 0
    }

    /// Enters the device: `ENODEV` once removal started.
    pub(crate) fn enter(&self) -> Result<GpuAccess<'_>> {
        let mut a = self.access.lock();
        if a.dead {
            return Err(ENODEV);
        }
        a.users += 1;
        Ok(GpuAccess { gpu: self })
    }

    /// Whether removal started.
    pub(crate) fn is_dead(&self) -> bool {
        self.access.lock().dead
    }

    /// Sends GET_INFO and returns the raw response body.
    pub(crate) fn get_info(&self) -> Result<[u8; wire::GetInfoResp::SIZE]> {
        let mut body = [0u8; wire::GetInfoResp::SIZE];
        self.ctrl
            .call(wire::Opcode::GetInfo, &[], &mut body)?
            .ok()
            .map_err(|_| EIO)?;
        Ok(body)
    }

    /// Sends GET_STATS and returns the counters (those the device has, then zeros).
    pub(crate) fn get_stats(&self) -> Result<[u64; uapi::SVMGPU_NUM_STATS as usize]> {
        let mut body = [0u8; wire::StatsResp::SIZE];
        self.ctrl
            .call(wire::Opcode::GetStats, &[], &mut body)?
            .ok()
            .map_err(|_| EIO)?;
        let mut out = [0u64; uapi::SVMGPU_NUM_STATS as usize];
        for (i, o) in out.iter_mut().take(wire::StatsResp::SIZE / 8).enumerate() {
            *o = wire::read_u64(&body, i * 8).unwrap_or(0);
        }
        Ok(out)
    }

    // ---- contexts and ASIDs ----------------------------------------------------------

    /// Allocates a context id for a queue whose jobs complete into `fences`.
    pub(crate) fn alloc_ctx(&self, fences: Arc<Fences>) -> Result<u32> {
        self.ctxs.lock().insert(fences)
    }

    /// Frees a context id.
    pub(crate) fn free_ctx(&self, id: u32) {
        // Dropped outside the IRQ-safe lock.
        let old = self.ctxs.lock().release(id);
        drop(old);
    }

    /// Creates a VM on a free ASID: reserves one, calls `make` with it (without the table
    /// lock: it allocates and sends commands) and publishes the result.
    pub(crate) fn install_vm(&self, make: impl FnOnce(u32) -> Result<Arc<Vm>>) -> Result<Arc<Vm>> {
        self.recover_initiated();
        let asid = self.vms.lock().reserve()?;
        match make(asid) {
            Ok(vm) => {
                self.vms.lock().publish(asid, vm.clone());
                Ok(vm)
            }
            Err(e) => {
                self.vms.lock().release(asid);
                Err(e)
            }
        }
    }

    /// Frees the ASID of `vm` (if it still owns it) and returns the table's reference.
    pub(crate) fn uninstall_vm(&self, vm: &Vm) -> Option<Arc<Vm>> {
        let mut t = self.vms.lock();
        if !t.get(vm.asid).is_some_and(|v| core::ptr::eq(&**v, vm)) {
            return None;
        }
        t.release(vm.asid)
    }

    // ---- page faults (faults.rs) ----------------------------------------------------------

    /// Takes the oldest fault of the device's ring (the dispatcher's input).
    pub(crate) fn pop_fault(&self) -> Option<FaultRec> {
        self.faults.lock().pop()
    }

    /// The VM bound to `asid`, if any.
    pub(crate) fn vm_of(&self, asid: u32) -> Option<Arc<Vm>> {
        self.vms.lock().get(asid).cloned()
    }

    /// Tells the fences of context `ctx_id` that a fault of theirs failed with `err`.
    pub(crate) fn set_fault_errno(&self, ctx_id: u32, err: Error) {
        let fences = self.ctxs.lock().get(ctx_id).cloned();
        if let Some(fences) = fences {
            fences.set_fault_errno(err.to_errno());
        }
    }
}

impl WorkItem<0> for Gpu {
    type Pointer = Arc<Gpu>;

    fn run(this: Arc<Gpu>) {
        if let Ok(access) = this.enter() {
            this.dispatch_faults(&access);
        }
    }
}

impl WorkItem<1> for Gpu {
    type Pointer = Arc<Gpu>;

    fn run(this: Arc<Gpu>) {
        if let Ok(_access) = this.enter() {
            this.handle_reset();
        }
    }
}

impl WorkItem<3> for Gpu {
    type Pointer = Arc<Gpu>;

    fn run(this: Arc<Gpu>) {
        this.do_wedge();
    }
}

impl WorkItem<2> for Gpu {
    type Pointer = Arc<Gpu>;

    fn run(this: Arc<Gpu>) {
        let Ok(access) = this.enter() else { return };
        this.watchdog();
        // Not again once removal started. Queued while `access` is held: removal waits for
        // it (after marking the device dead), then flushes the queued run, which returns.
        if !this.is_dead() {
            let _ = workqueue::system()
                .enqueue_delayed::<_, 2>(this.clone(), msecs_to_jiffies(WATCHDOG_MS));
        }
        drop(access);
    }
}
