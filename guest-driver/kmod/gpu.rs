// SPDX-License-Identifier: GPL-2.0

//! One svmgpu device: probe, the queues' interrupt callbacks, event and completion
//! dispatch, GPU page faults, resets, and removal with work in flight.

use crate::{
    ctrl::CtrlQueue,
    drm_driver::{self, SvmgpuDrm},
    events::RxQueue,
    faults::{FaultRec, FaultRing},
    fence::{DoneKind, Fences},
    reclaim_queue::{flush_delayed_work, flush_work},
    userptr::FinishPool,
    virtio,
    vm::Vm,
    wire, NotifierMode, SvmMode,
};
use kernel::{
    debugfs,
    device::{self, Core},
    drm, new_condvar, new_delayed_work, new_mutex, new_spinlock, new_spinlock_irq, new_work,
    prelude::*,
    str::CString,
    sync::{
        aref::ARef,
        atomic::{Atomic, Relaxed},
        Arc, CondVar, CondVarTimeoutResult, Mutex, SpinLock, SpinLockIrq,
    },
    time::{msecs_to_jiffies, Instant, Monotonic},
    uaccess::UserSliceReader,
    uapi,
    workqueue::{self, impl_has_delayed_work, impl_has_work, DelayedWork, Work, WorkItem},
};

/// Receive buffers posted on eventq and complq.
const EVENT_BUFS: usize = 128;
const COMPL_BUFS: usize = 256;

struct VmTable {
    vms: KVec<Option<Arc<Vm>>>,
    /// ASIDs reserved (a VM being created, or published in `vms`).
    used: KVec<bool>,
}

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

/// Recovery counters, per kind (debugfs `svmgpu/virtioN/recovery`, spec 6.16.2).
pub(crate) struct Recovery {
    /// Completion records too short or otherwise undecodable.
    pub(crate) completions_corrupt: Atomic<u64>,
    /// Completion records of an undefined kind.
    pub(crate) completions_unknown_kind: Atomic<u64>,
    /// `JOB_DONE`s matching no job in flight (corrupted seqno, unknown context, late).
    pub(crate) job_done_unknown: Atomic<u64>,
    /// Second `JOB_DONE`s for one job.
    pub(crate) job_done_duplicate: Atomic<u64>,
    /// Event records undecodable or of an unknown type.
    pub(crate) events_corrupt: Atomic<u64>,
    /// Events whose `event_seq` is not newer than the last one (replayed).
    pub(crate) events_stale: Atomic<u64>,
    /// `PAGE_FAULT` events for a fault already queued (duplicated).
    pub(crate) fault_events_duplicate: Atomic<u64>,
    /// `FAULT_REPLY`s answered `NOT_FOUND` (duplicated or phantom faults).
    pub(crate) fault_replies_not_found: Atomic<u64>,
    /// `EVENTS_LOST` events, and the events they report.
    pub(crate) events_lost_reports: Atomic<u64>,
    pub(crate) events_lost: Atomic<u64>,
    /// `ENGINE_HANG` events that named a job in flight, and the others (ignored).
    pub(crate) hang_events: Atomic<u64>,
    pub(crate) hang_events_bogus: Atomic<u64>,
    /// Jobs the driver's own timeout declared hung.
    pub(crate) job_timeouts: Atomic<u64>,
    /// Open files banned after repeated hangs.
    pub(crate) clients_banned: Atomic<u64>,
    /// Invalidations or preemptions that failed or timed out (each resets the device).
    pub(crate) invalidation_failures: Atomic<u64>,
    /// `RESET` commands the driver sent and that completed.
    pub(crate) resets_driver: Atomic<u64>,
    /// Reset requests a `RESET` sent meanwhile had answered already (coalesced).
    pub(crate) resets_coalesced: Atomic<u64>,
    /// Device-initiated resets recovered from, and those a driver reset had covered.
    pub(crate) resets_device: Atomic<u64>,
    pub(crate) resets_superseded: Atomic<u64>,
    /// `RESET` failed: the driver reset the device through virtio and gave it up.
    pub(crate) virtio_resets: Atomic<u64>,
    /// `ASID_BIND`s that failed while restoring VMs after a reset.
    pub(crate) rebind_failures: Atomic<u64>,
    /// GPU faults at an address whose mapping was already valid for the access (the
    /// device raised them although nothing was missing: injected spurious faults, walks
    /// that failed to read the page table), and faults reported as a page-table read
    /// error (`BAD_TABLE_ADDRESS`).
    pub(crate) faults_on_valid_mappings: Atomic<u64>,
    pub(crate) faults_bad_table: Atomic<u64>,
}

impl Recovery {
    fn new() -> Self {
        Self {
            completions_corrupt: Atomic::new(0),
            completions_unknown_kind: Atomic::new(0),
            job_done_unknown: Atomic::new(0),
            job_done_duplicate: Atomic::new(0),
            events_corrupt: Atomic::new(0),
            events_stale: Atomic::new(0),
            fault_events_duplicate: Atomic::new(0),
            fault_replies_not_found: Atomic::new(0),
            events_lost_reports: Atomic::new(0),
            events_lost: Atomic::new(0),
            hang_events: Atomic::new(0),
            hang_events_bogus: Atomic::new(0),
            job_timeouts: Atomic::new(0),
            clients_banned: Atomic::new(0),
            invalidation_failures: Atomic::new(0),
            resets_driver: Atomic::new(0),
            resets_coalesced: Atomic::new(0),
            resets_device: Atomic::new(0),
            resets_superseded: Atomic::new(0),
            virtio_resets: Atomic::new(0),
            rebind_failures: Atomic::new(0),
            faults_on_valid_mappings: Atomic::new(0),
            faults_bad_table: Atomic::new(0),
        }
    }
}

/// What the driver knows about the device's resets (`DEVICE_RESET` events).
struct ResetEvents {
    /// Largest `reset_count` seen in a `DEVICE_RESET` event.
    seen_count: u64,
    /// Largest `reset_count` of a `DEVICE_INITIATED` one.
    initiated_count: u64,
    /// `DRIVER_REQUEST` events seen.
    driver_events: u64,
    /// The driver restored its state after every reset up to this count.
    recovered_count: u64,
    /// Largest device-initiated `reset_count` counted as covered by a driver reset.
    superseded: u64,
    /// Largest `event_seq` seen.
    last_event_seq: u64,
}

/// The last reset, for debugfs.
struct LastReset {
    reason: &'static str,
    /// When (none yet: `None`).
    at: Option<Instant<Monotonic>>,
}

/// Hangs reported by `ENGINE_HANG` events, waiting for the reset worker.
const HANG_SLOTS: usize = 16;

struct HangRing {
    recs: [(u32, u64); HANG_SLOTS],
    len: usize,
}

/// Faults a fault ring holds (the device's and each VM's): twice what the device keeps
/// outstanding, and room for duplicates.
pub(crate) fn fault_ring_size(config: &wire::Config) -> usize {
    2 * config.max_outstanding_faults.min(4096) as usize + 64
}

/// Largest `race_delay_us` (debugfs).
const MAX_RACE_DELAY_US: u32 = 1_000_000;

/// Default of the driver's job timeout (`svmgpu/virtioN/job_timeout_ms` in debugfs).
pub(crate) const JOB_TIMEOUT_MS: u32 = 10_000;
/// How often the watchdog looks for overdue jobs.
const WATCHDOG_MS: u32 = 250;

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
    ctxs: SpinLockIrq<KVec<Option<Arc<Fences>>>>,
    /// ASID → its VM (fault routing; allocation of ASIDs; removal).
    #[pin]
    vms: Mutex<VmTable>,
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
    /// A test hook (debugfs `race_delay_us`, 0 by default): how long a revalidation or
    /// SVM fault sleeps between `hmm_range_fault` and taking the notifier lock, so that a
    /// guest test can make a CPU invalidation land in that window every time and check
    /// that the commit notices it (`mmu_interval_read_retry`).
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

/// `wedge_state`: no virtio reset asked for, asked for (the wedge work runs), done.
const WEDGE_NONE: u8 = 0;
const WEDGE_REQUESTED: u8 = 1;
const WEDGE_DONE: u8 = 2;

impl_has_delayed_work! {
    impl HasDelayedWork<Self, 2> for Gpu { self.watchdog }
}

fn inc(c: &Atomic<u64>) {
    c.add(1, Relaxed);
}

/// Proof that the device is bound (removal waits until every guard is gone): DMA
/// allocations and mappings may be made.
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
    /// `hmm_range_fault` and the notifier lock (no lock of the notifier path held).
    pub(crate) fn race_delay(&self) {
        let us = self.race_delay_us.load(Relaxed);
        if us > 0 {
            kernel::time::delay::fsleep(kernel::time::Delta::from_micros(i64::from(us)));
        }
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
        let mut ctxs = self.ctxs.lock();
        let id = ctxs.iter().position(|c| c.is_none()).ok_or(ENOSPC)?;
        ctxs[id] = Some(fences);
        Ok(id as u32)
    }

    /// Frees a context id.
    pub(crate) fn free_ctx(&self, id: u32) {
        // Dropped outside the IRQ-safe lock.
        let old = self.ctxs.lock().get_mut(id as usize).and_then(|c| c.take());
        drop(old);
    }

    /// Creates a VM on a free ASID: reserves one, calls `make` with it (without the table
    /// lock: it allocates and sends commands) and publishes the result.
    pub(crate) fn install_vm(&self, make: impl FnOnce(u32) -> Result<Arc<Vm>>) -> Result<Arc<Vm>> {
        self.recover_initiated();
        let asid = {
            let mut t = self.vms.lock();
            let a = t.used.iter().position(|u| !u).ok_or(ENOSPC)?;
            t.used[a] = true;
            a as u32
        };
        match make(asid) {
            Ok(vm) => {
                self.vms.lock().vms[asid as usize] = Some(vm.clone());
                Ok(vm)
            }
            Err(e) => {
                self.vms.lock().used[asid as usize] = false;
                Err(e)
            }
        }
    }

    /// Frees the ASID of `vm` (if it still owns it) and returns the table's reference.
    pub(crate) fn uninstall_vm(&self, vm: &Vm) -> Option<Arc<Vm>> {
        let mut t = self.vms.lock();
        let a = vm.asid as usize;
        let owns = matches!(t.vms.get(a), Some(Some(v)) if core::ptr::eq(&**v, vm));
        if !owns {
            return None;
        }
        t.used[a] = false;
        t.vms[a].take()
    }

    // ---- interrupt callbacks -----------------------------------------------------------

    /// A completion record (interrupt context). Nothing in it is trusted (spec 6.6, 6.16.2):
    /// undecodable records, unknown kinds and seqnos, duplicates are counted and ignored.
    fn on_completion(self: &Arc<Self>, rec: &[u8]) {
        let r = &self.recovery;
        let Some(c) = wire::Completion::decode(rec) else {
            inc(&r.completions_corrupt);
            return;
        };
        match wire::CompletionKind::from_u32(c.kind) {
            // Unknown seqnos and duplicates are counted by the control queue.
            Some(wire::CompletionKind::CommandDone) => {
                self.ctrl.command_done(c.seqno, c.status, c.value)
            }
            Some(wire::CompletionKind::JobDone) => {
                let f = self
                    .ctxs
                    .lock()
                    .get(c.ctx_id as usize)
                    .and_then(|f| f.clone());
                match f.map(|f| f.job_done(c.seqno, c.status)) {
                    Some(DoneKind::Accepted) => {}
                    Some(DoneKind::Duplicate) => inc(&r.job_done_duplicate),
                    Some(DoneKind::Unknown) | None => inc(&r.job_done_unknown),
                }
            }
            // FENCE completions carry nothing the driver's fences need.
            Some(wire::CompletionKind::Fence) => {}
            None => inc(&r.completions_unknown_kind),
        }
    }

    /// An event record (interrupt context); as untrusted as completions.
    fn on_event(self: &Arc<Self>, rec: &[u8]) {
        let r = &self.recovery;
        let Some((seq, ev)) = wire::Event::decode(rec) else {
            inc(&r.events_corrupt);
            return;
        };
        {
            let mut re = self.reset_events.lock();
            if seq <= re.last_event_seq {
                drop(re);
                inc(&r.events_stale);
                return;
            }
            re.last_event_seq = seq;
        }
        match ev {
            wire::Event::PageFault(f) => {
                if self.faults.lock().contains(f.fault_id) {
                    inc(&r.fault_events_duplicate);
                    return;
                }
                // A context that faults is running, not hung (the watchdog's view).
                self.ctx_progress(f.ctx_id);
                self.faults.lock().push(FaultRec {
                    fault_id: f.fault_id,
                    va: f.va,
                    asid: f.asid,
                    access: f.access,
                    ctx_id: f.ctx_id,
                    reason: f.reason,
                    t0: Some(Instant::<Monotonic>::now()),
                });
                let _ = crate::reclaim_queue().enqueue::<_, 0>(self.clone());
            }
            wire::Event::DeviceReset(e) => {
                let initiated = e.reason != wire::ResetReason::DriverRequest.as_u32();
                {
                    let mut re = self.reset_events.lock();
                    re.seen_count = re.seen_count.max(e.reset_count);
                    if initiated {
                        re.initiated_count = re.initiated_count.max(e.reset_count);
                    } else {
                        re.driver_events += 1;
                    }
                }
                self.reset_cv.notify_all();
                if initiated {
                    let _ = crate::reclaim_queue().enqueue::<_, 1>(self.clone());
                }
            }
            wire::Event::EngineHang(h) => {
                let mut ring = self.hangs.lock();
                if ring.len < HANG_SLOTS {
                    let n = ring.len;
                    ring.recs[n] = (h.ctx_id, h.job_seqno);
                    ring.len += 1;
                }
                // Else dropped: the watchdog's timeout catches the hang.
                drop(ring);
                let _ = crate::reclaim_queue().enqueue::<_, 1>(self.clone());
            }
            wire::Event::EventsLost(l) => {
                // Context errors also come with the job's JOB_DONE status; hangs are
                // caught by the watchdog.
                inc(&r.events_lost_reports);
                r.events_lost.add(l.lost, Relaxed);
            }
            // The job's JOB_DONE carries the error; nothing else to do.
            wire::Event::ContextError(_) => {}
        }
    }

    // ---- page faults (faults.rs) ----------------------------------------------------------

    /// Takes the oldest fault of the device's ring (the dispatcher's input).
    pub(crate) fn pop_fault(&self) -> Option<FaultRec> {
        self.faults.lock().pop()
    }

    /// The VM bound to `asid`, if any.
    pub(crate) fn vm_of(&self, asid: u32) -> Option<Arc<Vm>> {
        self.vms
            .lock()
            .vms
            .get(asid as usize)
            .and_then(|v| v.clone())
    }

    /// Tells the fences of context `ctx_id` that a fault of theirs failed with `err`.
    pub(crate) fn set_fault_errno(&self, ctx_id: u32, err: Error) {
        let fences = self
            .ctxs
            .lock()
            .get(ctx_id as usize)
            .and_then(|c| c.clone());
        if let Some(fences) = fences {
            fences.set_fault_errno(err.to_errno());
        }
    }

    // ---- resets and hangs ----------------------------------------------------------------

    /// Whether a driver `RESET` completed that the device served after the command of seqno
    /// `after`.
    fn reset_since(&self, after: u64) -> bool {
        self.reset_seqno.load(Relaxed) > after
    }

    fn note_reset(&self, reason: &'static str) {
        let mut l = self.last_reset.lock();
        l.reason = reason;
        l.at = Some(Instant::<Monotonic>::now());
    }

    /// Resets the device with the `RESET` command (after a failed or timed-out
    /// invalidation, preemption or `CTX_DESTROY`) and restores what the driver still needs.
    /// Afterwards the device runs nothing and caches no translation. If `RESET` is not
    /// answered in time (`RESETTING` answers are retried), the device is reset through
    /// virtio, which stops every access to guest memory, and given up (every operation
    /// then fails with `ENODEV`): either way nothing the device did before can reach guest
    /// memory when this returns.
    ///
    /// `after` is the seqno of the last command whose failure calls for the reset (or the
    /// queue's [`CtrlQueue::last_seqno`] after it was sent): a `RESET` that completed with a
    /// later seqno was served by the device after that command, so it discarded it and the
    /// guarantee holds already. So many waiters failing at once (a dropped invalidation)
    /// reset the device once, not once each.
    pub(crate) fn reset_and_recover(self: &Arc<Self>, after: u64, why: &'static str) {
        if self.is_dead() || self.ctrl.is_closed() || self.reset_since(after) {
            return;
        }
        let _guard = self.reset_lock.lock();
        if self.reset_since(after) {
            inc(&self.recovery.resets_coalesced);
            return;
        }
        pr_warn!("virtio{}: resetting the device ({})\n", self.bus_index, why);
        self.note_reset(why);
        let before = self.reset_events.lock().driver_events;
        let body = wire::ResetReq {
            flags: 0,
            reserved: 0,
        }
        .to_bytes();
        match self
            .ctrl
            .call(wire::Opcode::Reset, &body, &mut [])
            .and_then(|r| r.ok())
        {
            Ok(seqno) => {
                inc(&self.recovery.resets_driver);
                self.reset_seqno.store(seqno, Relaxed);
                // Wait (bounded) for the reset's DEVICE_RESET event: events before it (an
                // earlier device-initiated reset) are then known to be covered by this one.
                let mut re = self.reset_events.lock();
                let mut remaining = msecs_to_jiffies(1000);
                while re.driver_events == before {
                    match self.reset_cv.wait_timeout(&mut re, remaining) {
                        CondVarTimeoutResult::Woken { jiffies } => remaining = jiffies,
                        _ => break,
                    }
                }
                re.recovered_count = re.recovered_count.max(re.seen_count);
                drop(re);
                self.after_reset();
            }
            Err(e) => {
                pr_err!(
                    "svmgpu: virtio{}: RESET failed ({:?}); virtio reset, the device is given up\n",
                    self.bus_index,
                    e
                );
                self.note_reset("RESET failed: virtio reset, device given up");
                self.wedge();
            }
        }
    }

    /// Stops the device for good with a virtio reset (it then touches no memory and raises
    /// no interrupt) and fails everything: the last resort when `RESET` does not work.
    /// Waits until that is done.
    ///
    /// The virtio reset runs in a work item (`wedge_work`): the transport synchronises its
    /// interrupt vectors under the PCI MSI domain mutex, whose holders allocate memory, and
    /// callers here may be MMU notifiers (reclaim context). The wait is not a real
    /// dependency on that mutex: this device's instance of it is only taken by its own
    /// probe and unbind, which never run while a VM of the device lives.
    fn wedge(self: &Arc<Self>) {
        *self.wedge_state.lock() = WEDGE_REQUESTED;
        let _ = crate::reclaim_queue().enqueue::<_, 3>(self.clone());
        let mut st = self.wedge_state.lock();
        while *st != WEDGE_DONE {
            self.wedge_cv.wait(&mut st);
        }
    }

    /// The wedge work: the virtio reset and failing everything (see [`Gpu::wedge`]).
    fn do_wedge(&self) {
        if *self.wedge_state.lock() != WEDGE_REQUESTED {
            return;
        }
        if !self.is_dead() {
            self.virtio_reset_and_fail();
        }
        *self.wedge_state.lock() = WEDGE_DONE;
        self.wedge_cv.notify_all();
    }

    fn virtio_reset_and_fail(&self) {
        inc(&self.recovery.virtio_resets);
        self.vdev.reset();
        // The device owns no buffer any more: retire every slot, fail every waiter.
        let _ = self.ctrl.detach();
        let _ = self.eventq.detach();
        let _ = self.complq.detach();
        self.ctrl.reset_done();
        let ctxs = self.ctxs.lock();
        for f in ctxs.iter().flatten() {
            f.lose(EIO.to_errno());
        }
    }

    /// What the driver does after any device reset: every incomplete asynchronous command
    /// counts as complete, every job without a `JOB_DONE` fails, outstanding faults are
    /// gone, and the ASIDs of live VMs are bound again to their page tables (which live in
    /// guest memory and stay valid); their queues are lost: user space sees `EIO` and
    /// recreates them.
    fn after_reset(&self) {
        self.stats.resets.add(1, Relaxed);
        self.ctrl.reset_done();
        {
            let ctxs = self.ctxs.lock();
            for f in ctxs.iter().flatten() {
                f.lose(EIO.to_errno());
            }
        }
        self.faults.lock().clear();
        self.hangs.lock().len = 0;
        let t = self.vms.lock();
        for vm in t.vms.iter().flatten() {
            vm.clear_faults();
            if vm.rebind_asid().is_err() {
                inc(&self.recovery.rebind_failures);
            }
        }
    }

    /// The reset worker: device-initiated resets, then `ENGINE_HANG` reports.
    fn handle_reset(self: &Arc<Self>) {
        self.recover_initiated();
        loop {
            let h = {
                let mut ring = self.hangs.lock();
                if ring.len == 0 {
                    break;
                }
                ring.len -= 1;
                let n = ring.len;
                ring.recs[n]
            };
            self.handle_hang(h.0, Some(h.1), false);
        }
    }

    /// Restores the driver's state after a device-initiated reset whose `DEVICE_RESET`
    /// event arrived, unless that was done already (or a later `RESET` of the driver's
    /// covered it). Also called before new VMs and contexts are created, so that a
    /// recovery still pending cannot lose them.
    pub(crate) fn recover_initiated(&self) {
        {
            let _guard = self.reset_lock.lock();
            let mut re = self.reset_events.lock();
            if re.initiated_count > re.recovered_count {
                re.recovered_count = re.seen_count;
                re.superseded = re.initiated_count;
                drop(re);
                pr_warn!("virtio{}: the device reset itself\n", self.bus_index);
                inc(&self.recovery.resets_device);
                self.note_reset("device-initiated reset");
                self.after_reset();
            } else if re.initiated_count > re.superseded {
                // A RESET of the driver's since covered it.
                re.superseded = re.initiated_count;
                drop(re);
                inc(&self.recovery.resets_superseded);
            }
        }
    }

    /// A job of context `ctx_id` hung: `job` (reported by `ENGINE_HANG`, which must name a
    /// job in flight) or the oldest in flight (the watchdog). Fails it with `-ETIMEDOUT`
    /// (later jobs `-ECANCELED`), bans the queue, counts the hang against its file (banned
    /// after [`crate::fence::HANG_BAN_LIMIT`]), and destroys the context, which frees the
    /// engine; if `CTX_DESTROY` does not answer, resets the device.
    fn handle_hang(self: &Arc<Self>, ctx_id: u32, job: Option<u64>, timeout: bool) {
        let f = self
            .ctxs
            .lock()
            .get(ctx_id as usize)
            .and_then(|f| f.clone());
        let hung = f.as_ref().and_then(|f| f.hang(job));
        let (Some(f), Some(seqno)) = (f, hung) else {
            if !timeout {
                inc(&self.recovery.hang_events_bogus);
            }
            return;
        };
        inc(if timeout {
            &self.recovery.job_timeouts
        } else {
            &self.recovery.hang_events
        });
        let hangs = f.client.hangs.fetch_add(1, Relaxed) + 1;
        if hangs == crate::fence::HANG_BAN_LIMIT {
            inc(&self.recovery.clients_banned);
        }
        pr_warn!(
            "virtio{}: job {} of context {} hung ({}); the queue is banned\n",
            self.bus_index,
            seqno,
            ctx_id,
            if timeout {
                "driver timeout"
            } else {
                "ENGINE_HANG"
            }
        );
        let body = wire::CtxReq { ctx_id, flags: 0 }.to_bytes();
        match self.ctrl.call(wire::Opcode::CtxDestroy, &body, &mut []) {
            Ok(r)
                if r.status == wire::Status::Ok.as_u32()
                    || r.status == wire::Status::NotFound.as_u32() => {}
            Err(e) if e == ENODEV => {}
            _ => self.reset_and_recover(
                self.ctrl.last_seqno(),
                "CTX_DESTROY of a hung context failed",
            ),
        }
    }

    /// The context `ctx_id` made progress (a fault raised or resolved): its jobs are not
    /// hung (any context: IRQ-safe locks only).
    pub(crate) fn ctx_progress(&self, ctx_id: u32) {
        let f = self
            .ctxs
            .lock()
            .get(ctx_id as usize)
            .and_then(|f| f.clone());
        if let Some(f) = f {
            f.progress();
        }
    }

    /// The watchdog: declares hung the oldest job of every queue that made no progress for
    /// the job timeout (the `ENGINE_HANG` event may have been lost, or never sent).
    fn watchdog(self: &Arc<Self>) {
        let timeout = self.job_timeout_ms.load(Relaxed);
        let n = self.ctxs.lock().len();
        for id in 0..n {
            let f = self.ctxs.lock().get(id).and_then(|f| f.clone());
            if let Some(seqno) = f.and_then(|f| f.overdue(timeout)) {
                self.handle_hang(id as u32, Some(seqno), true);
            }
        }
    }

    /// The debugfs `recovery` file.
    fn write_recovery(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let r = &self.recovery;
        let c = self.ctrl.counters();
        let l = |a: &Atomic<u64>| a.load(Relaxed);
        writeln!(f, "resets {}", l(&self.stats.resets))?;
        writeln!(f, "resets_driver {}", l(&r.resets_driver))?;
        writeln!(f, "resets_coalesced {}", l(&r.resets_coalesced))?;
        writeln!(f, "resets_device {}", l(&r.resets_device))?;
        writeln!(f, "resets_superseded {}", l(&r.resets_superseded))?;
        writeln!(f, "virtio_resets {}", l(&r.virtio_resets))?;
        writeln!(f, "invalidation_failures {}", l(&r.invalidation_failures))?;
        writeln!(f, "rebind_failures {}", l(&r.rebind_failures))?;
        writeln!(
            f,
            "faults_on_valid_mappings {}",
            l(&r.faults_on_valid_mappings)
        )?;
        writeln!(f, "faults_bad_table {}", l(&r.faults_bad_table))?;
        writeln!(
            f,
            "invalidations_two_pass {}",
            l(&self.stats.invalidations_two_pass)
        )?;
        writeln!(
            f,
            "invalidations_single_pass {}",
            l(&self.stats.invalidations_single_pass)
        )?;
        writeln!(
            f,
            "invalidation_commands_deferred {}",
            l(&self.stats.commands_deferred)
        )?;
        writeln!(f, "hang_events {}", l(&r.hang_events))?;
        writeln!(f, "hang_events_bogus {}", l(&r.hang_events_bogus))?;
        writeln!(f, "job_timeouts {}", l(&r.job_timeouts))?;
        writeln!(f, "clients_banned {}", l(&r.clients_banned))?;
        writeln!(f, "completions_corrupt {}", l(&r.completions_corrupt))?;
        writeln!(
            f,
            "completions_unknown_kind {}",
            l(&r.completions_unknown_kind)
        )?;
        writeln!(f, "command_done_unknown {}", c.bogus_command_done)?;
        writeln!(f, "job_done_unknown {}", l(&r.job_done_unknown))?;
        writeln!(f, "job_done_duplicate {}", l(&r.job_done_duplicate))?;
        writeln!(f, "chains_unknown {}", c.bogus_chains)?;
        writeln!(f, "resetting_retries {}", c.resetting_retries)?;
        writeln!(f, "events_corrupt {}", l(&r.events_corrupt))?;
        writeln!(f, "events_stale {}", l(&r.events_stale))?;
        writeln!(f, "fault_events_duplicate {}", l(&r.fault_events_duplicate))?;
        writeln!(
            f,
            "fault_replies_not_found {}",
            l(&r.fault_replies_not_found)
        )?;
        writeln!(f, "fault_ring_overflows {}", self.faults.lock().dropped)?;
        writeln!(f, "gpu_faults {}", l(&self.stats.gpu_faults))?;
        writeln!(f, "fault_service_ns {}", l(&self.stats.fault_service_ns))?;
        writeln!(f, "fault_ack_ns {}", l(&self.stats.fault_ack_ns))?;
        writeln!(f, "events_lost_reports {}", l(&r.events_lost_reports))?;
        writeln!(f, "events_lost {}", l(&r.events_lost))?;
        writeln!(f, "job_timeout_ms {}", self.job_timeout_ms.load(Relaxed))?;
        let last = self.last_reset.lock();
        match last.at {
            Some(t) => writeln!(f, "last_reset_ms_ago {}", t.elapsed().as_millis())?,
            None => writeln!(f, "last_reset_ms_ago none")?,
        }
        writeln!(f, "last_reset_reason {}", last.reason)
    }

    // ---- removal -----------------------------------------------------------------------

    /// Removal, once the device is stopped (virtio reset): refuse new work, retire every
    /// buffer the device owned, complete its asynchronous commands (a reset discarded
    /// them) and fail every fence and waiter.
    ///
    /// The control queue is closed only after the reset: a closed queue means the device
    /// no longer touches guest memory, which is what lets an invalidation that could not
    /// get a guarantee from the device return ([`Gpu::reset_and_recover`] returns at once
    /// when the queue is closed). Closing it first would let a notifier unmap pages the
    /// device still runs jobs on.
    fn shutdown(&self) {
        self.access.lock().dead = true;
        let _ = self.ctrl.detach();
        let _ = self.eventq.detach();
        let _ = self.complq.detach();
        self.ctrl.reset_done();
        let ctxs = self.ctxs.lock();
        for f in ctxs.iter().flatten() {
            f.lose(ENODEV.to_errno());
        }
    }

    fn wait_users(&self) {
        let mut a = self.access.lock();
        while a.users > 0 {
            self.access_cv.wait(&mut a);
        }
    }

    /// After the device was reset: release the device state of every VM.
    fn kill_vms(&self) {
        // Reserved before the lock: the VM table lock is taken in notifier context (resets),
        // so nothing may allocate under it.
        let mut out = KVec::new();
        if out
            .reserve(self.config.num_asids.min(4096) as usize, GFP_KERNEL)
            .is_err()
        {
            pr_err!("virtio{}: out of memory releasing VMs\n", self.bus_index);
            return;
        }
        let vms = {
            let mut t = self.vms.lock();
            for v in t.vms.iter_mut() {
                if let Some(vm) = v.take() {
                    // Within the reserved capacity: at most `num_asids` entries.
                    let _ = out.push_within_capacity(vm);
                }
            }
            out
        };
        for vm in vms.iter() {
            vm.kill();
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

unsafe extern "C" fn ctrl_callback(vq: *mut virtio::RawVirtqueue) {
    // SAFETY: The callback context is the `Gpu` set in `probe`, valid until the queues are
    // deleted in `unbind`.
    let gpu = unsafe { &*virtio::callback_context(vq).cast::<Gpu>() };
    gpu.ctrl.complete();
}

unsafe extern "C" fn event_callback(vq: *mut virtio::RawVirtqueue) {
    // SAFETY: As in `ctrl_callback`. The `Gpu` is the contents of an `Arc` (see `probe`).
    let gpu = unsafe { ArcRef::from_ctx(virtio::callback_context(vq)) };
    gpu.get().eventq.drain(|rec| gpu.get().on_event(rec));
}

unsafe extern "C" fn compl_callback(vq: *mut virtio::RawVirtqueue) {
    // SAFETY: As in `event_callback`.
    let gpu = unsafe { ArcRef::from_ctx(virtio::callback_context(vq)) };
    gpu.get().complq.drain(|rec| gpu.get().on_completion(rec));
}

/// An `Arc<Gpu>` borrowed from the raw pointer of the callback context (not dropped).
struct ArcRef(core::mem::ManuallyDrop<Arc<Gpu>>);

impl ArcRef {
    /// # Safety
    ///
    /// `ctx` must be `Arc::as_ptr` of an `Arc<Gpu>` that stays alive while `Self` lives.
    unsafe fn from_ctx(ctx: *const core::ffi::c_void) -> Self {
        // SAFETY: Per the contract, `ctx` came from `Arc::as_ptr`; `ManuallyDrop` keeps the
        // reference count balanced.
        Self(core::mem::ManuallyDrop::new(unsafe {
            Arc::from_raw(ctx.cast::<Gpu>())
        }))
    }

    fn get(&self) -> &Arc<Gpu> {
        &self.0
    }
}

/// The virtio driver of svmgpu devices.
pub(crate) struct GpuDriver;

/// What the driver keeps per bound device.
#[pin_data]
pub(crate) struct BoundGpu<'bound> {
    gpu: Arc<Gpu>,
    #[pin]
    drm: Mutex<Option<drm::Registration<'bound, SvmgpuDrm>>>,
    /// debugfs `svmgpu/virtioN/` and its files (removed with the binding).
    _debugfs: Option<DebugFs>,
}

/// A device's debugfs directory: `recovery` (counters, last reset), `job_timeout_ms` and
/// `race_delay_us`.
struct DebugFs {
    _files: [Pin<KBox<debugfs::File<Arc<Gpu>>>>; 3],
    _dir: debugfs::Dir,
}

/// A decimal number written to a debugfs file.
fn read_number(r: &mut UserSliceReader) -> Result<u32> {
    let mut buf = [0u8; 16];
    let n = r.len();
    if n == 0 || n > buf.len() {
        return Err(EINVAL);
    }
    r.read_slice(&mut buf[..n])?;
    let s = core::str::from_utf8(&buf[..n]).map_err(|_| EINVAL)?;
    s.trim().parse().map_err(|_| EINVAL)
}

fn write_job_timeout(gpu: &Arc<Gpu>, r: &mut UserSliceReader) -> Result {
    let v = read_number(r)?;
    if v < 100 {
        return Err(EINVAL);
    }
    gpu.job_timeout_ms.store(v, Relaxed);
    Ok(())
}

fn write_race_delay(gpu: &Arc<Gpu>, r: &mut UserSliceReader) -> Result {
    let v = read_number(r)?;
    if v > MAX_RACE_DELAY_US {
        return Err(EINVAL);
    }
    gpu.race_delay_us.store(v, Relaxed);
    Ok(())
}

impl DebugFs {
    fn new(gpu: &Arc<Gpu>) -> Result<Self> {
        let Some(root) = crate::debugfs_root() else {
            return Err(ENOENT);
        };
        let name = CString::try_from_fmt(fmt!("virtio{}", gpu.bus_index))?;
        let dir = root.subdir(&name);
        let recovery = KBox::pin_init(
            dir.read_callback_file(c"recovery", gpu.clone(), &|g: &Arc<Gpu>, f| {
                g.write_recovery(f)
            }),
            GFP_KERNEL,
        )?;
        let timeout = KBox::pin_init(
            dir.read_write_callback_file(
                c"job_timeout_ms",
                gpu.clone(),
                &|g: &Arc<Gpu>, f| writeln!(f, "{}", g.job_timeout_ms.load(Relaxed)),
                &write_job_timeout,
            ),
            GFP_KERNEL,
        )?;
        let race = KBox::pin_init(
            dir.read_write_callback_file(
                c"race_delay_us",
                gpu.clone(),
                &|g: &Arc<Gpu>, f| writeln!(f, "{}", g.race_delay_us.load(Relaxed)),
                &write_race_delay,
            ),
            GFP_KERNEL,
        )?;
        Ok(Self {
            _files: [recovery, timeout, race],
            _dir: dir,
        })
    }
}

static ID_TABLE: virtio::IdTable = virtio::IdTable::new(wire::VIRTIO_ID_SVMGPU);
static FEATURES_AUDIT: [core::ffi::c_uint; 1] = [wire::SVMGPU_F_AUDIT];
static FEATURES_NONE: [core::ffi::c_uint; 0] = [];

/// The virtio transport feature by which a device declares that it accesses memory
/// through the platform's IOMMU (virtio 1.x, bit 33).
const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;

fn read_config<C: device::DeviceContext>(
    dev: &virtio::Device<C>,
) -> Result<([u8; wire::Config::SIZE], wire::Config)> {
    let mut raw = [0u8; wire::Config::SIZE];
    dev.read_config(0, &mut raw);
    let config = wire::Config::decode(&raw).ok_or(EINVAL)?;
    if config.magic != wire::CONFIG_MAGIC {
        dev_err!(dev, "bad config magic {:#x}\n", config.magic);
        return Err(ENODEV);
    }
    if config.version >> 16 != wire::SPEC_VERSION >> 16 {
        dev_err!(dev, "unsupported spec version {:#x}\n", config.version);
        return Err(ENODEV);
    }
    if config.num_asids == 0 || config.max_contexts == 0 || config.max_outstanding_faults == 0 {
        dev_err!(dev, "config space describes no usable device\n");
        return Err(ENODEV);
    }
    Ok((raw, config))
}

impl GpuDriver {
    fn setup(dev: &virtio::Device<Core<'_>>) -> Result<Arc<Gpu>> {
        let (raw, config) = read_config(dev)?;
        if dev.features() & (1 << VIRTIO_F_ACCESS_PLATFORM) != 0 {
            // The spec's address model: the device uses guest-physical addresses (page
            // tables and the pages they map). A device behind the platform's IOMMU would
            // need DMA addresses, and bounce buffering cannot give SVM's coherence.
            dev_err!(
                dev,
                "the device offers VIRTIO_F_ACCESS_PLATFORM, which svmgpu does not support (spec: Addresses)\n"
            );
            return Err(ENODEV);
        }
        dev_info!(
            dev,
            "config: version {}.{} index {} engines {} asids {} contexts {} tlb {}x{} pages {:#x} va_bits {} faults {} inval {} ns preempt {} ns\n",
            config.version >> 16,
            config.version & 0xffff,
            config.device_index,
            config.num_engines,
            config.num_asids,
            config.max_contexts,
            config.tlb_entries,
            config.tlb_ways,
            config.page_size_mask,
            config.va_bits,
            config.max_outstanding_faults,
            config.tlb_inval_latency_ns,
            config.preempt_latency_ns
        );
        let bound: &virtio::Device<device::Bound> = dev;
        let dma_dev: ARef<device::Device> = bound.dma_device().into();

        let mut ctxs = KVec::new();
        for _ in 0..config.max_contexts.min(4096) {
            ctxs.push(None, GFP_KERNEL)?;
        }
        let mut vms = KVec::new();
        for _ in 0..config.num_asids.min(4096) {
            vms.push(None, GFP_KERNEL)?;
        }
        let used = KVec::from_elem(false, vms.len(), GFP_KERNEL)?;
        let fault_cap = fault_ring_size(&config);

        let gpu = Arc::pin_init(
            try_pin_init!(Gpu {
                bus_index: dev.index(),
                config,
                config_raw: raw,
                features: dev.features(),
                notifier_mode: crate::notifier_mode(),
                svm_mode: crate::svm_mode(),
                dma_dev,
                ctrl <- CtrlQueue::new()?,
                eventq <- RxQueue::new(wire::EVENT_SIZE, EVENT_BUFS)?,
                complq <- RxQueue::new(wire::COMPLETION_SIZE, COMPL_BUFS)?,
                ctxs <- new_spinlock_irq!(ctxs, "svmgpu_ctxs"),
                vms <- new_mutex!(VmTable { vms, used }, "svmgpu_vms"),
                faults <- new_spinlock_irq!(FaultRing::new(fault_cap)?, "svmgpu_faults"),
                fault_work <- new_work!("svmgpu_fault_work"),
                reset_work <- new_work!("svmgpu_reset_work"),
                watchdog <- new_delayed_work!("svmgpu_watchdog"),
                hangs <- new_spinlock_irq!(
                    HangRing { recs: [(0, 0); HANG_SLOTS], len: 0 },
                    "svmgpu_hangs"
                ),
                reset_events <- new_spinlock_irq!(
                    ResetEvents {
                        seen_count: 0,
                        initiated_count: 0,
                        driver_events: 0,
                        recovered_count: 0,
                        superseded: 0,
                        last_event_seq: 0,
                    },
                    "svmgpu_reset_events"
                ),
                reset_cv <- new_condvar!("svmgpu_reset_cv"),
                reset_lock <- new_mutex!((), "svmgpu_reset"),
                last_reset <- new_spinlock!(
                    LastReset { reason: "none", at: None },
                    "svmgpu_last_reset"
                ),
                // SAFETY: Resets through it run with a `GpuAccess` or from notifiers of
                // live VMs, and do_wedge checks `is_dead` first: removal marks the device
                // dead and waits for both before the device is unbound.
                vdev: unsafe { virtio::ResetHandle::new(dev) },
                wedge_work <- new_work!("svmgpu_wedge_work"),
                wedge_state <- new_spinlock!(WEDGE_NONE, "svmgpu_wedge"),
                wedge_cv <- new_condvar!("svmgpu_wedge_cv"),
                job_timeout_ms: Atomic::new(JOB_TIMEOUT_MS),
                reset_seqno: Atomic::new(0),
                race_delay_us: Atomic::new(0),
                recovery: Recovery::new(),
                access <- new_spinlock!(Access { users: 0, dead: false }, "svmgpu_access"),
                access_cv <- new_condvar!("svmgpu_access_cv"),
                finish_pool: FinishPool::new()?,
                stats: Stats {
                    invalidations: Atomic::new(0),
                    invalidation_ns: Atomic::new(0),
                    gpu_faults: Atomic::new(0),
                    gpu_faults_failed: Atomic::new(0),
                    resets: Atomic::new(0),
                    fault_service_ns: Atomic::new(0),
                    fault_ack_ns: Atomic::new(0),
                    svm_faults: Atomic::new(0),
                    svm_pages: Atomic::new(0),
                    svm_ranges_collected: Atomic::new(0),
                    invalidations_two_pass: Atomic::new(0),
                    invalidations_single_pass: Atomic::new(0),
                    commands_deferred: Atomic::new(0),
                },
            }),
            GFP_KERNEL,
        )?;

        // SAFETY: `gpu` is kept alive by `Bound` until `unbind`, which resets the device and
        // deletes the queues before dropping it.
        unsafe { dev.set_callback_context(Arc::as_ptr(&gpu).cast()) };
        let [ctrlq, eventq, complq] = dev.find_vqs(&[
            (c"control", Some(ctrl_callback as virtio::Callback)),
            (c"event", Some(event_callback as virtio::Callback)),
            (c"complete", Some(compl_callback as virtio::Callback)),
        ])?;
        gpu.ctrl.attach(ctrlq);
        let fail = |e: Error| {
            dev.reset();
            gpu.ctrl.detach();
            gpu.eventq.detach();
            gpu.complq.detach();
            dev.del_vqs();
            e
        };
        gpu.eventq.attach(eventq).map_err(fail)?;
        gpu.complq.attach(complq).map_err(fail)?;
        dev.ready();

        let t0 = Instant::<Monotonic>::now();
        let info = gpu.get_info().map_err(fail)?;
        let info = wire::GetInfoResp::decode(&info).ok_or(EIO).map_err(fail)?;
        dev_info!(
            dev,
            "GET_INFO: spec {:#x} index {} engines {} commands completed {} ({} ns); features {:#x}; notifiers {}\n",
            info.spec_version,
            info.device_index,
            info.num_engines,
            info.commands_completed,
            t0.elapsed().as_nanos(),
            gpu.features,
            gpu.notifier_mode.name()
        );
        Ok(gpu)
    }
}

impl virtio::Driver for GpuDriver {
    type Data<'bound> = BoundGpu<'bound>;
    const ID_TABLE: &'static virtio::IdTable = &ID_TABLE;

    fn features() -> &'static [core::ffi::c_uint] {
        if crate::audit() {
            &FEATURES_AUDIT
        } else {
            &FEATURES_NONE
        }
    }

    fn probe<'bound>(
        dev: &'bound virtio::Device<Core<'_>>,
    ) -> impl PinInit<Self::Data<'bound>, Error> + 'bound {
        let setup = || -> Result<(Arc<Gpu>, drm::Registration<'bound, SvmgpuDrm>)> {
            let gpu = Self::setup(dev)?;
            let fail = |e: Error| {
                dev.reset();
                gpu.shutdown();
                dev.del_vqs();
                e
            };
            let reg = drm_driver::register(dev, gpu.clone()).map_err(fail)?;
            Ok((gpu, reg))
        };
        let res = setup();
        let dbg = match &res {
            Ok((gpu, _)) => {
                let _ = workqueue::system()
                    .enqueue_delayed::<_, 2>(gpu.clone(), msecs_to_jiffies(WATCHDOG_MS));
                DebugFs::new(gpu).ok()
            }
            Err(_) => None,
        };
        try_pin_init!(BoundGpu {
            gpu: match &res {
                Ok((gpu, _)) => gpu.clone(),
                Err(e) => Err(*e)?,
            },
            drm <- new_mutex!(res.ok().map(|r| r.1), "svmgpu_drm_reg"),
            _debugfs: dbg,
        })
    }

    fn unbind<'bound>(dev: &'bound virtio::Device<Core<'_>>, this: Pin<&Self::Data<'bound>>) {
        let gpu = &this.gpu;
        // 1. Stop the device first: after a virtio reset it touches no memory and raises
        //    no interrupt, so nothing that waits for it may give up before this.
        dev.reset();
        // 2. Refuse new work; retire the device's buffers; fail every fence and waiter.
        gpu.shutdown();
        // 3. Unregister the render node: waits for ioctls in flight (which now fail fast).
        drop(this.drm.lock().take());
        // 4. Wait for workers and remaining users of the device.
        gpu.wait_users();
        // 5. Work queued meanwhile sees the device dead and returns (the watchdog does not
        //    queue itself again).
        flush_work(&gpu.fault_work);
        flush_work(&gpu.reset_work);
        flush_work(&gpu.wedge_work);
        flush_delayed_work(&gpu.watchdog);
        // 6. Release the page tables and DMA mappings of every VM (their files may stay
        //    open; they only see ENODEV).
        gpu.kill_vms();
        dev.del_vqs();
        dev_info!(dev, "removed\n");
    }
}
