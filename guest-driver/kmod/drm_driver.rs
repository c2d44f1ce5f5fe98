// SPDX-License-Identifier: GPL-2.0

//! The DRM driver: one render node per device, its open files and the ioctls of
//! `guest-driver/uapi/svmgpu_drm.h` (whose errors are documented there).

use crate::{
    exec_queue::ExecQueue,
    fence::Client,
    gpu::Gpu,
    handles::{Destroy, Handles},
    syncs::Syncs,
    virtio,
    vm::{self, Vm},
    wire, NotifierMode,
};
use core::fmt::Write;
use kernel::{
    device::{Core, DeviceContext},
    drm::{self, gem, ioctl, print::Printer, Registered},
    new_mutex,
    prelude::*,
    sync::{atomic::Relaxed, Arc, Mutex},
    time::{msecs_to_jiffies, Instant, Monotonic},
    uapi,
};

/// The DRM driver of svmgpu devices.
pub(crate) struct SvmgpuDrm;

/// The driver's DRM device type.
pub(crate) type SvmgpuDevice<Ctx = drm::Normal> = drm::Device<SvmgpuDrm, Ctx>;

const INFO: drm::DriverInfo = drm::DriverInfo {
    major: 0,
    minor: 2,
    patchlevel: 0,
    name: c"svmgpu",
    desc: c"svmgpu virtual GPU",
};

/// GEM objects: required by the DRM core; the uAPI creates none (memory is userptr).
#[pin_data]
pub(crate) struct NoObject {}

impl gem::DriverObject for NoObject {
    type Driver = SvmgpuDrm;
    type Args = ();

    fn new(_dev: &SvmgpuDevice, _size: usize, _args: ()) -> impl PinInit<Self, Error> {
        try_pin_init!(NoObject {})
    }
}

#[vtable]
impl drm::Driver for SvmgpuDrm {
    type Data = Arc<Gpu>;
    type RegistrationData<'a> = ();
    type File = File;
    type Object = gem::Object<NoObject>;
    type ParentDevice<Ctx: DeviceContext> = virtio::Device<Ctx>;

    const INFO: drm::DriverInfo = INFO;
    const FEAT_RENDER: bool = true;
    const FEAT_SYNCOBJ: bool = true;

    fn show_fdinfo(_dev: &Dev, file: &DrmFile, p: &mut Printer) {
        File::show_fdinfo(file, p);
    }

    kernel::declare_drm_ioctls! {
        (SVMGPU_DEVICE_QUERY, drm_svmgpu_device_query, ioctl::RENDER_ALLOW, File::device_query),
        (SVMGPU_VM_CREATE, drm_svmgpu_vm_create, ioctl::RENDER_ALLOW, File::vm_create),
        (SVMGPU_VM_DESTROY, drm_svmgpu_vm_destroy, ioctl::RENDER_ALLOW, File::vm_destroy),
        (SVMGPU_EXEC_QUEUE_CREATE, drm_svmgpu_exec_queue_create, ioctl::RENDER_ALLOW,
         File::exec_queue_create),
        (SVMGPU_EXEC_QUEUE_DESTROY, drm_svmgpu_exec_queue_destroy, ioctl::RENDER_ALLOW,
         File::exec_queue_destroy),
        (SVMGPU_VM_BIND, drm_svmgpu_vm_bind, ioctl::RENDER_ALLOW, File::vm_bind),
        (SVMGPU_EXEC, drm_svmgpu_exec, ioctl::RENDER_ALLOW, File::exec),
        (SVMGPU_WAIT, drm_svmgpu_wait, ioctl::RENDER_ALLOW, File::wait),
        (SVMGPU_VM_PREFETCH, drm_svmgpu_vm_prefetch, ioctl::RENDER_ALLOW, File::vm_prefetch),
    }
}

/// Creates and registers the DRM device of a bound virtio device.
pub(crate) fn register<'bound>(
    dev: &'bound virtio::Device<Core<'_>>,
    gpu: Arc<Gpu>,
) -> Result<drm::Registration<'bound, SvmgpuDrm>> {
    let bound: &'bound virtio::Device<kernel::device::Bound> = dev;
    let drm = drm::UnregisteredDevice::<SvmgpuDrm>::new(bound, Ok::<_, Error>(gpu))?;
    // SAFETY: The registration is kept in the bus device's data and dropped in `unbind`
    // (or with the data); it is never forgotten.
    unsafe { drm::Registration::new(bound.as_ref(), drm, (), 0) }
}

/// A file's objects, by handle. The queues are declared first: closing the file drops
/// (destroys) them before the VMs they run on.
#[pin_data]
struct Objs {
    #[pin]
    queues: Handles<ExecQueue>,
    #[pin]
    vms: Handles<Vm>,
}

impl Destroy for Vm {
    fn destroy(&self) {
        Vm::destroy(self)
    }
}

impl Destroy for ExecQueue {
    fn destroy(&self) {
        ExecQueue::destroy(self)
    }
}

/// An open render node: the client's VMs and exec queues (destroyed with the file, when
/// `objs` is dropped).
#[pin_data]
pub(crate) struct File {
    gpu: Arc<Gpu>,
    /// Hang accounting of this client (banned after repeated hangs).
    client: Arc<Client>,
    /// The handle tables; the mutex makes check-then-insert and check-then-remove atomic
    /// (a queue is created only on a live VM, a VM is destroyed only without queues).
    #[pin]
    objs: Mutex<Objs>,
}

impl drm::file::DriverFile for File {
    type Driver = SvmgpuDrm;

    fn open(dev: &SvmgpuDevice) -> Result<Pin<KBox<Self>>> {
        let gpu: Arc<Gpu> = (**dev).clone();
        let client = Client::new()?;
        KBox::pin_init(
            try_pin_init!(File {
                gpu,
                client,
                objs <- new_mutex!(
                    pin_init!(Objs {
                        queues <- Handles::new(),
                        vms <- Handles::new(),
                    }),
                    "svmgpu_file"
                ),
            }),
            GFP_KERNEL,
        )
    }
}

type Dev = SvmgpuDevice<Registered>;
pub(crate) type DrmFile = drm::File<File>;

fn copy_bytes(dst: &mut [u8], src: &[u8]) {
    let n = dst.len().min(src.len());
    dst[..n].copy_from_slice(&src[..n]);
}

impl File {
    /// The file's usage, in its `fdinfo` (Documentation/gpu/drm-usage-stats.rst):
    /// `drm-engine-render` is the time its queues had jobs outstanding (from a submission
    /// to an idle queue until the queue is idle again), summed over its queues, so it grows
    /// by up to the number of queues per second; `drm-engine-capacity-render` is the
    /// device's engine count; then the file's completed jobs, VMs and queues.
    fn show_fdinfo(file: &DrmFile, p: &mut Printer) {
        let this = file.inner().get_ref();
        // The client's total first: a period that ends between the two reads is then
        // missed once (and counted at the next read), never counted twice.
        let ended = this.client.busy_ns();
        let jobs = this.client.jobs_done();
        let objs = this.objs.lock();
        let (queues, open) = objs.queues.fold((0u32, 0u64), |(n, ns), q| {
            (n + 1, ns.saturating_add(q.fences.busy_now_ns()))
        });
        let vms = objs.vms.fold(0u32, |n, _| n + 1);
        drop(objs);
        let engines = this.gpu.config.num_engines;
        // A printer's output cannot fail in a way the caller could act on.
        let _ = writeln!(p, "drm-engine-render:\t{} ns", ended.saturating_add(open));
        let _ = writeln!(p, "drm-engine-capacity-render:\t{engines}");
        let _ = writeln!(p, "svmgpu-jobs-completed:\t{jobs}");
        let _ = writeln!(p, "svmgpu-vms:\t{vms}");
        let _ = writeln!(p, "svmgpu-exec-queues:\t{queues}");
    }

    fn gpu(file: &DrmFile) -> &Arc<Gpu> {
        &file.inner().get_ref().gpu
    }

    fn objs(file: &DrmFile) -> &Mutex<Objs> {
        &file.inner().get_ref().objs
    }

    pub(crate) fn device_query(
        _dev: &Dev,
        _reg: &(),
        a: &mut uapi::drm_svmgpu_device_query,
        file: &DrmFile,
    ) -> Result<u32> {
        if a.flags & !uapi::SVMGPU_QUERY_F_STATS != 0 || a.reserved != [0; 3] {
            return Err(EINVAL);
        }
        let gpu = Self::gpu(file);
        let _acc = gpu.enter()?;
        let t0 = Instant::<Monotonic>::now();
        let info = gpu.get_info()?;
        a.round_trip_ns = t0.elapsed().as_nanos() as u64;
        a.bus_index = gpu.bus_index;
        a.features = gpu.features;
        a.notifier_mode = match gpu.notifier_mode {
            NotifierMode::Single => uapi::SVMGPU_NOTIFIER_SINGLE,
            NotifierMode::TwoPass => uapi::SVMGPU_NOTIFIER_TWOPASS,
        };
        a.svm_mode = gpu.svm_mode.uapi();
        a.invalidations = gpu.stats.invalidations.load(Relaxed);
        a.invalidation_ns = gpu.stats.invalidation_ns.load(Relaxed);
        a.gpu_faults = gpu.stats.gpu_faults.load(Relaxed);
        a.gpu_faults_failed = gpu.stats.gpu_faults_failed.load(Relaxed);
        copy_bytes(&mut a.config, &gpu.config_raw);
        copy_bytes(&mut a.info, &info);
        a.fault_service_ns = gpu.stats.fault_service_ns.load(Relaxed);
        a.svm_faults = gpu.stats.svm_faults.load(Relaxed);
        a.svm_pages = gpu.stats.svm_pages.load(Relaxed);
        a.fault_ack_ns = gpu.stats.fault_ack_ns.load(Relaxed);
        a.svm_ranges_collected = gpu.stats.svm_ranges_collected.load(Relaxed);
        a.stats = [0; uapi::SVMGPU_NUM_STATS as usize];
        if a.flags & uapi::SVMGPU_QUERY_F_STATS != 0 {
            a.stats = gpu.get_stats()?;
        }
        Ok(0)
    }

    pub(crate) fn vm_create(
        dev: &Dev,
        _reg: &(),
        a: &mut uapi::drm_svmgpu_vm_create,
        file: &DrmFile,
    ) -> Result<u32> {
        if a.flags & !uapi::SVMGPU_VM_CREATE_FAULT_MODE != 0 || a.extensions != 0 {
            return Err(EINVAL);
        }
        let gpu = Self::gpu(file);
        let acc = gpu.enter()?;
        let fault_mode = a.flags & uapi::SVMGPU_VM_CREATE_FAULT_MODE != 0;
        let vm = Vm::create(gpu, &acc, fault_mode, dev)?;
        // On failure (out of memory or ids) the VM is destroyed.
        a.vm_id = Self::objs(file).lock().vms.insert(vm)?;
        Ok(0)
    }

    pub(crate) fn vm_destroy(
        _dev: &Dev,
        _reg: &(),
        a: &mut uapi::drm_svmgpu_vm_destroy,
        file: &DrmFile,
    ) -> Result<u32> {
        if a.pad != 0 {
            return Err(EINVAL);
        }
        let entry = {
            let o = Self::objs(file).lock();
            let vm = o.vms.get(a.vm_id)?;
            if o.queues.any(|q| Arc::ptr_eq(&q.vm, &vm)) {
                return Err(EBUSY);
            }
            o.vms.remove(a.vm_id)
        };
        // Destroyed here, without the table lock.
        drop(entry);
        Ok(0)
    }

    pub(crate) fn exec_queue_create(
        _dev: &Dev,
        _reg: &(),
        a: &mut uapi::drm_svmgpu_exec_queue_create,
        file: &DrmFile,
    ) -> Result<u32> {
        if a.flags & !uapi::SVMGPU_EXEC_QUEUE_LONG_RUNNING != 0 || a.pad != 0 || a.extensions != 0 {
            return Err(EINVAL);
        }
        let gpu = Self::gpu(file);
        let vm = Self::objs(file).lock().vms.get(a.vm_id)?;
        let _acc = gpu.enter()?;
        let q = ExecQueue::create(
            &vm,
            a.flags & uapi::SVMGPU_EXEC_QUEUE_LONG_RUNNING != 0,
            &file.inner().get_ref().client,
        )?;
        let o = Self::objs(file).lock();
        // The VM may have been destroyed meanwhile (its handle gone, or given to a new VM):
        // undo.
        if !o.vms.get(a.vm_id).is_ok_and(|v| Arc::ptr_eq(&v, &vm)) {
            drop(o);
            q.destroy();
            return Err(ENOENT);
        }
        a.queue_id = o.queues.insert(q)?;
        Ok(0)
    }

    pub(crate) fn exec_queue_destroy(
        _dev: &Dev,
        _reg: &(),
        a: &mut uapi::drm_svmgpu_exec_queue_destroy,
        file: &DrmFile,
    ) -> Result<u32> {
        if a.pad != 0 {
            return Err(EINVAL);
        }
        let entry = Self::objs(file).lock().queues.remove(a.queue_id);
        // Destroyed here, without the table lock.
        drop(entry.ok_or(ENOENT)?);
        Ok(0)
    }

    pub(crate) fn vm_bind(
        _dev: &Dev,
        _reg: &(),
        a: &mut uapi::drm_svmgpu_vm_bind,
        file: &DrmFile,
    ) -> Result<u32> {
        if a.pad != 0 {
            return Err(EINVAL);
        }
        vm::check_bind_range(a.va, a.size, u64::from(uapi::SVMGPU_MAX_BIND_SIZE))?;
        match a.op {
            uapi::SVMGPU_VM_BIND_OP_MAP_USERPTR => {
                if a.flags & !uapi::SVMGPU_VM_BIND_F_READONLY != 0
                    || a.userptr % wire::PAGE_SIZE_4K != 0
                    || a.userptr.checked_add(a.size).is_none()
                {
                    return Err(EINVAL);
                }
                let gpu = Self::gpu(file);
                let vm = Self::objs(file).lock().vms.get(a.vm_id)?;
                let acc = gpu.enter()?;
                vm.bind_userptr(
                    &acc,
                    a.va,
                    a.size,
                    a.userptr as usize,
                    a.flags & uapi::SVMGPU_VM_BIND_F_READONLY != 0,
                )?;
            }
            uapi::SVMGPU_VM_BIND_OP_UNMAP => {
                if a.flags != 0 || a.userptr != 0 {
                    return Err(EINVAL);
                }
                let vm = Self::objs(file).lock().vms.get(a.vm_id)?;
                vm.unbind(a.va, a.size)?;
            }
            _ => return Err(EINVAL),
        }
        Ok(0)
    }

    pub(crate) fn vm_prefetch(
        _dev: &Dev,
        _reg: &(),
        a: &mut uapi::drm_svmgpu_vm_prefetch,
        file: &DrmFile,
    ) -> Result<u32> {
        if a.flags & !uapi::SVMGPU_VM_PREFETCH_F_WRITE != 0 {
            return Err(EINVAL);
        }
        vm::check_bind_range(a.start, a.size, u64::from(uapi::SVMGPU_MAX_BIND_SIZE))?;
        let gpu = Self::gpu(file);
        let vm = Self::objs(file).lock().vms.get(a.vm_id)?;
        if !vm.fault_mode {
            return Err(EINVAL);
        }
        let acc = gpu.enter()?;
        vm.prefetch(
            &acc,
            a.start,
            a.size,
            a.flags & uapi::SVMGPU_VM_PREFETCH_F_WRITE != 0,
        )?;
        Ok(0)
    }

    pub(crate) fn exec(
        _dev: &Dev,
        _reg: &(),
        a: &mut uapi::drm_svmgpu_exec,
        file: &DrmFile,
    ) -> Result<u32> {
        if a.flags != 0
            || a.pad != 0
            || a.pad2 != 0
            || a.batch_va % 8 != 0
            || a.batch_len % 8 != 0
            || a.batch_len == 0
            || a.batch_len > uapi::SVMGPU_MAX_BATCH_LEN
            || a.batch_va.saturating_add(u64::from(a.batch_len)) > 1u64 << wire::VA_BITS
        {
            return Err(EINVAL);
        }
        let gpu = Self::gpu(file);
        let q = Self::objs(file).lock().queues.get(a.queue_id)?;
        if q.fences.client.banned() {
            return Err(ECANCELED);
        }
        let syncs = Syncs::resolve(file, a.syncs, a.num_syncs)?;
        syncs.wait()?;
        let acc = gpu.enter()?;
        let (seqno, fence) = q.vm.exec(&q, &acc, a.batch_va, a.batch_len)?;
        syncs.signal_with(&fence);
        a.fence = seqno;
        Ok(0)
    }

    pub(crate) fn wait(
        _dev: &Dev,
        _reg: &(),
        a: &mut uapi::drm_svmgpu_wait,
        file: &DrmFile,
    ) -> Result<u32> {
        if a.flags != 0 || a.timeout_ns < 0 {
            return Err(EINVAL);
        }
        let q = Self::objs(file).lock().queues.get(a.queue_id)?;
        let ms = (a.timeout_ns as u64)
            .div_ceil(1_000_000)
            .min(u64::from(u32::MAX)) as u32;
        let jiffies = if a.timeout_ns == 0 {
            0
        } else {
            msecs_to_jiffies(ms).max(1)
        };
        let mut remaining = 0;
        let o = match q.fences.wait(a.fence, jiffies, &mut remaining) {
            Ok(o) => o,
            Err(e) if e == ERESTARTSYS => {
                // Interrupted by a signal: the call restarts with what is left of its
                // timeout (the DRM core copies the argument back on errors too).
                let left_ns = crate::fence::jiffies_to_ns(remaining);
                a.timeout_ns = left_ns.min(a.timeout_ns as u64) as i64;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        a.error = o.error;
        a.job_status = o.status;
        Ok(0)
    }
}
