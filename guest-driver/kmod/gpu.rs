// SPDX-License-Identifier: GPL-2.0

//! One svmgpu device: probe, the queues' interrupt callbacks, event and completion
//! dispatch, GPU page faults, resets, and removal with work in flight.

use crate::{
    ctrl::CtrlQueue,
    drm_driver::{self, SvmgpuDrm},
    events::RxQueue,
    fence::Fences,
    userptr::FinishPool,
    virtio,
    vm::Vm,
    wire, NotifierMode,
};
use kernel::{
    bindings,
    device::{self, Core},
    drm, new_condvar, new_mutex, new_spinlock, new_spinlock_irq, new_work,
    prelude::*,
    sync::{
        aref::ARef,
        atomic::{Atomic, Relaxed},
        Arc, CondVar, Mutex, SpinLock, SpinLockIrq,
    },
    time::{Instant, Monotonic},
    workqueue::{self, impl_has_work, Work, WorkItem},
};

/// Receive buffers posted on eventq and complq.
const EVENT_BUFS: usize = 128;
const COMPL_BUFS: usize = 256;

/// A GPU page fault waiting for the fault worker.
#[derive(Clone, Copy, Default)]
struct FaultRec {
    fault_id: u64,
    va: u64,
    asid: u32,
    access: u32,
}

struct FaultRing {
    recs: KVec<FaultRec>,
    head: usize,
    len: usize,
    dropped: u64,
}

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
}

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
    /// A device-initiated reset (or a hang) is pending for `reset_work`.
    reset_pending: Atomic<u32>,
    #[pin]
    reset_lock: Mutex<()>,
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

    /// Sends GET_STATS and returns the counters.
    pub(crate) fn get_stats(&self) -> Result<[u64; 24]> {
        let mut body = [0u8; wire::StatsResp::SIZE];
        self.ctrl
            .call(wire::Opcode::GetStats, &[], &mut body)?
            .ok()
            .map_err(|_| EIO)?;
        let mut out = [0u64; 24];
        for (i, o) in out.iter_mut().enumerate() {
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

    /// The device doing DMA, as a raw pointer for the DMA API.
    ///
    /// Only used where the caller knows the device is still bound: under a VM's notifier
    /// lock with the VM not dead (removal kills every VM under that lock before it
    /// completes), or with a [`GpuAccess`].
    pub(crate) fn dma_dev_raw(&self) -> *mut bindings::device {
        // `device::Device` is a transparent wrapper of `struct device`.
        core::ptr::from_ref::<device::Device>(&self.dma_dev)
            .cast::<bindings::device>()
            .cast_mut()
    }

    // ---- interrupt callbacks -----------------------------------------------------------

    fn on_completion(self: &Arc<Self>, rec: &[u8]) {
        let Some(c) = wire::Completion::decode(rec) else {
            return;
        };
        match wire::CompletionKind::from_u32(c.kind) {
            Some(wire::CompletionKind::CommandDone) => {
                self.ctrl.command_done(c.seqno, c.status, c.value)
            }
            Some(wire::CompletionKind::JobDone) => {
                let f = self
                    .ctxs
                    .lock()
                    .get(c.ctx_id as usize)
                    .and_then(|f| f.clone());
                if let Some(f) = f {
                    f.job_done(c.seqno, c.status);
                }
            }
            // FENCE completions carry nothing the driver's fences need.
            _ => {}
        }
    }

    fn on_event(self: &Arc<Self>, rec: &[u8]) {
        let Some((_, ev)) = wire::Event::decode(rec) else {
            return;
        };
        match ev {
            wire::Event::PageFault(f) => {
                let mut ring = self.faults.lock();
                let cap = ring.recs.len();
                if ring.len == cap {
                    ring.dropped += 1;
                } else {
                    let i = (ring.head + ring.len) % cap;
                    ring.recs[i] = FaultRec {
                        fault_id: f.fault_id,
                        va: f.va,
                        asid: f.asid,
                        access: f.access,
                    };
                    ring.len += 1;
                }
                drop(ring);
                let _ = workqueue::system().enqueue::<_, 0>(self.clone());
            }
            wire::Event::DeviceReset(r) => {
                if r.reason != wire::ResetReason::DriverRequest.as_u32() {
                    self.reset_pending.store(1, Relaxed);
                    let _ = workqueue::system().enqueue::<_, 1>(self.clone());
                }
            }
            wire::Event::EngineHang(_) => {
                self.reset_pending.store(2, Relaxed);
                let _ = workqueue::system().enqueue::<_, 1>(self.clone());
            }
            // The job's JOB_DONE carries the error; nothing else to do.
            wire::Event::ContextError(_) | wire::Event::EventsLost(_) => {}
        }
    }

    // ---- page faults -------------------------------------------------------------------

    fn pop_fault(&self) -> Option<FaultRec> {
        let mut ring = self.faults.lock();
        if ring.len == 0 {
            return None;
        }
        let r = ring.recs[ring.head];
        ring.head = (ring.head + 1) % ring.recs.len();
        ring.len -= 1;
        Some(r)
    }

    fn handle_faults(self: &Arc<Self>) {
        while let Some(f) = self.pop_fault() {
            if self.is_dead() {
                return;
            }
            self.stats.gpu_faults.add(1, Relaxed);
            let vm = self
                .vms
                .lock()
                .vms
                .get(f.asid as usize)
                .and_then(|v| v.clone());
            let ok = match vm {
                Some(vm) => vm.handle_fault(f.va, f.access).is_ok(),
                None => false,
            };
            if !ok {
                self.stats.gpu_faults_failed.add(1, Relaxed);
            }
            let action = if ok {
                wire::FaultAction::Resume
            } else {
                wire::FaultAction::Cancel
            };
            let body = wire::FaultReplyReq {
                fault_id: f.fault_id,
                action: action.as_u32(),
                flags: 0,
            }
            .to_bytes();
            // NOT_FOUND is normal (duplicated faults, context destroyed meanwhile).
            let _ = self.ctrl.call(wire::Opcode::FaultReply, &body, &mut []);
        }
    }

    // ---- resets ------------------------------------------------------------------------

    /// Resets the device with the `RESET` command (after a failed or timed-out
    /// invalidation or preemption, or a hang) and restores what the driver still needs.
    /// Afterwards the device runs nothing and caches no translation.
    pub(crate) fn reset_and_recover(&self, why: &str) {
        if self.is_dead() {
            return;
        }
        let _guard = self.reset_lock.lock();
        pr_warn!("virtio{}: resetting the device ({})\n", self.bus_index, why);
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
            Ok(_) => self.after_reset(),
            Err(e) => {
                pr_err!(
                    "svmgpu: virtio{}: RESET failed ({:?}); the device is unusable\n",
                    self.bus_index,
                    e
                );
                self.ctrl.close();
            }
        }
    }

    /// What the driver does after any device reset: every incomplete asynchronous command
    /// counts as complete, every job without a `JOB_DONE` fails, outstanding faults are
    /// gone, and the ASIDs of live VMs are bound again (their queues are lost: user space
    /// sees `EIO` and recreates them).
    fn after_reset(&self) {
        self.stats.resets.add(1, Relaxed);
        self.ctrl.reset_done();
        {
            let ctxs = self.ctxs.lock();
            for f in ctxs.iter().flatten() {
                f.lose(-(bindings::EIO as i32));
            }
        }
        {
            let mut ring = self.faults.lock();
            ring.len = 0;
        }
        let t = self.vms.lock();
        for vm in t.vms.iter().flatten() {
            vm.rebind_asid();
        }
    }

    fn handle_reset(self: &Arc<Self>) {
        match self.reset_pending.xchg(0, Relaxed) {
            1 => {
                let _guard = self.reset_lock.lock();
                pr_warn!("virtio{}: the device reset itself\n", self.bus_index);
                self.after_reset();
            }
            2 => self.reset_and_recover("engine hang"),
            _ => {}
        }
    }

    // ---- removal -----------------------------------------------------------------------

    /// First step of removal: refuse new work, fail every waiter, wait for users.
    fn shutdown(&self) {
        self.access.lock().dead = true;
        self.ctrl.close();
        let ctxs = self.ctxs.lock();
        for f in ctxs.iter().flatten() {
            f.lose(-(bindings::ENODEV as i32));
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
        if let Ok(_access) = this.enter() {
            this.handle_faults();
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

unsafe extern "C" fn ctrl_callback(vq: *mut bindings::virtqueue) {
    // SAFETY: The callback context is the `Gpu` set in `probe`, valid until the queues are
    // deleted in `unbind`.
    let gpu = unsafe { &*virtio::callback_context(vq).cast::<Gpu>() };
    gpu.ctrl.complete();
}

unsafe extern "C" fn event_callback(vq: *mut bindings::virtqueue) {
    // SAFETY: As in `ctrl_callback`. The `Gpu` is the contents of an `Arc` (see `probe`).
    let gpu = unsafe { ArcRef::from_ctx(virtio::callback_context(vq)) };
    gpu.get().eventq.drain(|rec| gpu.get().on_event(rec));
}

unsafe extern "C" fn compl_callback(vq: *mut bindings::virtqueue) {
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
}

static ID_TABLE: virtio::IdTable = virtio::IdTable::new(wire::VIRTIO_ID_SVMGPU);
static FEATURES_AUDIT: [core::ffi::c_uint; 1] = [wire::SVMGPU_F_AUDIT];
static FEATURES_NONE: [core::ffi::c_uint; 0] = [];

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
        let fault_cap = 2 * config.max_outstanding_faults.min(4096) as usize + 64;
        let recs = KVec::from_elem(FaultRec::default(), fault_cap, GFP_KERNEL)?;

        let gpu = Arc::pin_init(
            try_pin_init!(Gpu {
                bus_index: dev.index(),
                config,
                config_raw: raw,
                features: dev.features(),
                notifier_mode: crate::notifier_mode(),
                dma_dev,
                ctrl <- CtrlQueue::new()?,
                eventq <- RxQueue::new(wire::EVENT_SIZE, EVENT_BUFS)?,
                complq <- RxQueue::new(wire::COMPLETION_SIZE, COMPL_BUFS)?,
                ctxs <- new_spinlock_irq!(ctxs, "svmgpu_ctxs"),
                vms <- new_mutex!(VmTable { vms, used }, "svmgpu_vms"),
                faults <- new_spinlock_irq!(
                    FaultRing { recs, head: 0, len: 0, dropped: 0 },
                    "svmgpu_faults"
                ),
                fault_work <- new_work!("svmgpu_fault_work"),
                reset_work <- new_work!("svmgpu_reset_work"),
                reset_pending: Atomic::new(0),
                reset_lock <- new_mutex!((), "svmgpu_reset"),
                access <- new_spinlock!(Access { users: 0, dead: false }, "svmgpu_access"),
                access_cv <- new_condvar!("svmgpu_access_cv"),
                finish_pool: FinishPool::new()?,
                stats: Stats {
                    invalidations: Atomic::new(0),
                    invalidation_ns: Atomic::new(0),
                    gpu_faults: Atomic::new(0),
                    gpu_faults_failed: Atomic::new(0),
                    resets: Atomic::new(0),
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
                gpu.shutdown();
                dev.reset();
                gpu.ctrl.detach();
                gpu.eventq.detach();
                gpu.complq.detach();
                dev.del_vqs();
                e
            };
            let reg = drm_driver::register(dev, gpu.clone()).map_err(fail)?;
            Ok((gpu, reg))
        };
        let res = setup();
        try_pin_init!(BoundGpu {
            gpu: match &res {
                Ok((gpu, _)) => gpu.clone(),
                Err(e) => Err(*e)?,
            },
            drm <- new_mutex!(res.ok().map(|r| r.1), "svmgpu_drm_reg"),
        })
    }

    fn unbind<'bound>(dev: &'bound virtio::Device<Core<'_>>, this: Pin<&Self::Data<'bound>>) {
        let gpu = &this.gpu;
        // 1. Refuse new work; fail every fence and command waiter.
        gpu.shutdown();
        // 2. Unregister the render node: waits for ioctls in flight (which now fail fast).
        drop(this.drm.lock().take());
        // 3. Wait for workers and remaining users of the device.
        gpu.wait_users();
        // 4. Reset: the device touches no memory and raises no interrupt afterwards.
        dev.reset();
        // 5. Work queued before the reset sees the device dead and returns.
        // SAFETY: The work items are embedded in `gpu`, which is alive.
        unsafe {
            bindings::flush_work(Work::<Gpu, 0>::raw_get(&gpu.fault_work));
            bindings::flush_work(Work::<Gpu, 1>::raw_get(&gpu.reset_work));
        }
        gpu.ctrl.detach();
        gpu.eventq.detach();
        gpu.complq.detach();
        // 6. Release the page tables and DMA mappings of every VM (their files may stay
        //    open; they only see ENODEV).
        gpu.kill_vms();
        dev.del_vqs();
        dev_info!(dev, "removed\n");
    }
}
