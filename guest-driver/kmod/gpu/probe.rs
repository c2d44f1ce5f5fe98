// SPDX-License-Identifier: GPL-2.0

//! The virtio driver of svmgpu devices: probe (config space, features, queues,
//! `GET_INFO`, the render node) and removal with work in flight.

use super::{
    debugfs::DebugFs,
    dispatch::{compl_callback, ctrl_callback, event_callback},
    fault_ring_size,
    recovery::{HangRing, LastReset, Recovery, ResetEvents, HANG_SLOTS, WATCHDOG_MS, WEDGE_NONE},
    Access, Gpu, Stats, JOB_TIMEOUT_MS,
};
use crate::{
    ctrl::CtrlQueue,
    drm_driver::{self, SvmgpuDrm},
    events::RxQueue,
    faults::FaultRing,
    id_table::IdTable,
    reclaim_queue::{flush_delayed_work, flush_work},
    userptr::FinishPool,
    virtio, wire,
};
use kernel::{
    device::{self, Core},
    drm, new_condvar, new_delayed_work, new_mutex, new_spinlock, new_spinlock_irq, new_work,
    prelude::*,
    sync::{aref::ARef, atomic::Atomic, Arc, Mutex},
    time::{msecs_to_jiffies, Instant, Monotonic},
    workqueue,
};

/// Receive buffers posted on eventq and complq.
const EVENT_BUFS: usize = 128;
const COMPL_BUFS: usize = 256;

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
    /// The device's queues, deleted at unbind after the reset.
    #[pin]
    queues: Mutex<Option<virtio::Queues>>,
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
    fn setup(dev: &virtio::Device<Core<'_>>) -> Result<(Arc<Gpu>, virtio::Queues)> {
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

        let ctxs = IdTable::new(config.max_contexts.min(4096) as usize)?;
        let vms = IdTable::new(config.num_asids.min(4096) as usize)?;
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
                vms <- new_mutex!(vms, "svmgpu_vms"),
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
        let (queues, [ctrlq, eventq, complq]) = dev.find_vqs(&[
            (c"control", Some(ctrl_callback as virtio::Callback)),
            (c"event", Some(event_callback as virtio::Callback)),
            (c"complete", Some(compl_callback as virtio::Callback)),
        ])?;
        gpu.ctrl.attach(ctrlq);
        let t0 = Instant::<Monotonic>::now();
        let started = (|| {
            gpu.eventq.attach(eventq)?;
            gpu.complq.attach(complq)?;
            dev.ready();
            let info = gpu.get_info()?;
            wire::GetInfoResp::decode(&info).ok_or(EIO)
        })();
        let info = match started {
            Ok(info) => info,
            Err(e) => {
                let reset = dev.reset();
                let _ = gpu.ctrl.detach();
                let _ = gpu.eventq.detach();
                let _ = gpu.complq.detach();
                // Fails (leaving the rings allocated) only if a queue handle survived.
                let _ = dev.del_vqs(reset, queues);
                return Err(e);
            }
        };
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
        Ok((gpu, queues))
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
        type Setup<'bound> = (
            Arc<Gpu>,
            virtio::Queues,
            drm::Registration<'bound, SvmgpuDrm>,
        );
        let setup = || -> Result<Setup<'bound>> {
            let (gpu, queues) = Self::setup(dev)?;
            match drm_driver::register(dev, gpu.clone()) {
                Ok(reg) => Ok((gpu, queues, reg)),
                Err(e) => {
                    let reset = dev.reset();
                    gpu.shutdown();
                    let _ = dev.del_vqs(reset, queues);
                    Err(e)
                }
            }
        };
        let (res, queues, reg) = match setup() {
            Ok((gpu, queues, reg)) => (Ok(gpu), Some(queues), Some(reg)),
            Err(e) => (Err(e), None, None),
        };
        let dbg = match &res {
            Ok(gpu) => {
                let _ = workqueue::system()
                    .enqueue_delayed::<_, 2>(gpu.clone(), msecs_to_jiffies(WATCHDOG_MS));
                DebugFs::new(gpu).ok()
            }
            Err(_) => None,
        };
        try_pin_init!(BoundGpu {
            gpu: res?,
            drm <- new_mutex!(reg, "svmgpu_drm_reg"),
            _debugfs: dbg,
            queues <- new_mutex!(queues, "svmgpu_queues"),
        })
    }

    fn unbind<'bound>(dev: &'bound virtio::Device<Core<'_>>, this: Pin<&Self::Data<'bound>>) {
        let gpu = &this.gpu;
        // 1. Stop the device first: after a virtio reset it touches no memory and raises
        //    no interrupt, so nothing that waits for it may give up before this.
        let reset = dev.reset();
        // 2. Refuse new work; retire the device's buffers; fail every fence and waiter.
        gpu.shutdown();
        //    (The test hook `race_delay_us` widens the window after this step: whatever
        //    waited for the device returns now, which is only sound because step 1 ran.)
        gpu.race_delay();
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
        // 7. Free the rings: `shutdown` dropped every queue handle.
        if let Some(queues) = this.queues.lock().take() {
            let _ = dev.del_vqs(reset, queues);
        }
        dev_info!(dev, "removed\n");
    }
}

impl Gpu {
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
        self.retire_device_buffers(ENODEV);
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
            for vm in t.take_all() {
                // Within the reserved capacity: at most `num_asids` entries.
                let _ = out.push_within_capacity(vm);
            }
            out
        };
        for vm in vms.iter() {
            vm.kill();
        }
    }
}
