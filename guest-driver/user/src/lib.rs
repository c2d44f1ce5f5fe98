//! `svmgpu`: a userspace library over the svmgpu DRM uAPI
//! (`guest-driver/uapi/svmgpu_drm.h`): find the devices' render nodes, create VMs and exec
//! queues, bind CPU memory (userptr), build batches, submit them and wait for their
//! fences, or signal and wait for DRM syncobjs (the job's completion as a `dma_fence`:
//! [`Device::exec_with_syncs`], the `syncobj_*` methods, [`sync_file_info`]). Used by the
//! guest test runner and the `svmgpu` CLI.

pub mod uapi;

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};
pub use svmgpu_spec as spec;
use svmgpu_spec::{isa::Insn, Config, GetInfoResp};

/// Where DRM device nodes live.
pub const DRI_DIR: &str = "/dev/dri";
/// The DRM driver name of svmgpu.
pub const DRIVER_NAME: &str = "svmgpu";

/// What DEVICE_QUERY returns.
#[derive(Debug, Clone)]
pub struct Query {
    pub bus_index: u32,
    pub round_trip_ns: u64,
    pub features: u64,
    pub notifier_mode: u32,
    pub svm_mode: u32,
    pub invalidations: u64,
    pub invalidation_ns: u64,
    pub gpu_faults: u64,
    pub gpu_faults_failed: u64,
    pub config: Config,
    pub info: GetInfoResp,
    pub stats: [u64; uapi::SVMGPU_NUM_STATS],
    pub fault_service_ns: u64,
    pub svm_faults: u64,
    pub svm_pages: u64,
    /// Total time from the driver's FAULT_REPLYs to the device's answers (this device).
    pub fault_ack_ns: u64,
    /// SVM ranges this device mirrored that the garbage collector removed.
    pub svm_ranges_collected: u64,
}

impl Query {
    /// The device's `stale_accesses` counter (needs the stats).
    pub fn stale_accesses(&self) -> u64 {
        self.stats[22]
    }
    /// The device's `audit_checks` counter (needs the stats).
    pub fn audit_checks(&self) -> u64 {
        self.stats[23]
    }
    /// The device's `unflushed_entries` counter (spec 6.10.4; needs the stats): TLB
    /// entries that stayed ahead of memory longer than the grace period with nothing
    /// covering them.
    pub fn unflushed_entries(&self) -> u64 {
        self.stats[24]
    }
    /// The device's `narrow_flush_entries` counter (spec 6.10.4; needs the stats): of
    /// those, the ones a completed invalidation of their ASID left behind.
    pub fn narrow_flush_entries(&self) -> u64 {
        self.stats[25]
    }
    /// Every audit violation the device counts: stale accesses, unflushed entries,
    /// entries a narrow flush left behind.
    pub fn audit_violations(&self) -> u64 {
        self.stale_accesses() + self.unflushed_entries() + self.narrow_flush_entries()
    }
}

/// An open svmgpu render node.
#[derive(Debug)]
pub struct Device {
    file: File,
    path: PathBuf,
}

impl AsFd for Device {
    /// The open file (for ioctls this crate does not wrap).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The outcome of a fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceOutcome {
    /// 0 or a negative errno.
    pub error: i32,
    /// The device's job status.
    pub job_status: u32,
}

impl Device {
    /// Opens `path` and checks that it is an svmgpu DRM node.
    pub fn open(path: &Path) -> io::Result<Device> {
        let file = File::options().read(true).write(true).open(path)?;
        let dev = Device {
            file,
            path: path.to_path_buf(),
        };
        let name = dev.driver_name()?;
        if name != DRIVER_NAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is driven by {name}", path.display()),
            ));
        }
        Ok(dev)
    }

    /// Every svmgpu render node, in the order of the devices' virtio bus index.
    pub fn enumerate() -> io::Result<Vec<Device>> {
        let mut devs: Vec<(u32, Device)> = Vec::new();
        let dir = match std::fs::read_dir(DRI_DIR) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        for e in dir.flatten() {
            if !e.file_name().to_string_lossy().starts_with("renderD") {
                continue;
            }
            if let Ok(d) = Device::open(&e.path()) {
                let idx = d.query(false).map(|q| q.bus_index).unwrap_or(u32::MAX);
                devs.push((idx, d));
            }
        }
        devs.sort_by_key(|(i, _)| *i);
        Ok(devs.into_iter().map(|(_, d)| d).collect())
    }

    /// The node's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This open file's usage as the kernel reports it in `/proc/self/fdinfo/FD`: the DRM
    /// core's keys (`drm-driver`, `drm-client-id`) and the driver's
    /// (`drm-engine-render`, `drm-engine-capacity-render`, `svmgpu-*`: guest-driver/README.md),
    /// as `(key, value)` pairs in the kernel's order.
    pub fn fdinfo(&self) -> io::Result<Vec<(String, String)>> {
        let path = format!("/proc/self/fdinfo/{}", self.file.as_raw_fd());
        let text = std::fs::read_to_string(path)?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect())
    }

    /// Issues `cmd` with a raw pointer argument.
    ///
    /// # Safety
    /// `arg` must point to memory of the size `cmd` encodes, or be deliberately bad (the
    /// kernel must then answer EFAULT without touching it).
    pub unsafe fn raw_ioctl(&self, cmd: u64, arg: *mut u8) -> io::Result<()> {
        loop {
            // SAFETY: The fd is open; the argument's validity is the caller's promise.
            let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), cmd as libc::Ioctl, arg) };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            // DRM's user-space convention (drmIoctl): restart on EINTR/EAGAIN.
            if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) {
                return Err(e);
            }
        }
    }

    fn ioctl<T>(&self, cmd: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: `arg` is a `T`, the type `cmd` encodes (the uapi module pins the sizes).
        unsafe { self.raw_ioctl(cmd, (arg as *mut T).cast()) }
    }

    /// The DRM driver name (DRM_IOCTL_VERSION).
    pub fn driver_name(&self) -> io::Result<String> {
        let mut name = [0u8; 64];
        let mut v = uapi::DrmVersion {
            version_major: 0,
            version_minor: 0,
            version_patchlevel: 0,
            name_len: name.len(),
            name: name.as_mut_ptr(),
            date_len: 0,
            date: std::ptr::null_mut(),
            desc_len: 0,
            desc: std::ptr::null_mut(),
        };
        self.ioctl(uapi::DRM_IOCTL_VERSION, &mut v)?;
        let n = v.name_len.min(name.len());
        Ok(String::from_utf8_lossy(&name[..n]).into_owned())
    }

    /// DEVICE_QUERY (with the device's statistics if `stats`).
    pub fn query(&self, stats: bool) -> io::Result<Query> {
        let mut q = uapi::DeviceQuery {
            flags: if stats { uapi::SVMGPU_QUERY_F_STATS } else { 0 },
            ..Default::default()
        };
        self.ioctl(uapi::DRM_IOCTL_SVMGPU_DEVICE_QUERY, &mut q)?;
        let bad = |what| io::Error::new(io::ErrorKind::InvalidData, what);
        Ok(Query {
            bus_index: q.bus_index,
            round_trip_ns: q.round_trip_ns,
            features: q.features,
            notifier_mode: q.notifier_mode,
            svm_mode: q.svm_mode,
            invalidations: q.invalidations,
            invalidation_ns: q.invalidation_ns,
            gpu_faults: q.gpu_faults,
            gpu_faults_failed: q.gpu_faults_failed,
            config: Config::decode(&q.config).ok_or_else(|| bad("config"))?,
            info: GetInfoResp::decode(&q.info).ok_or_else(|| bad("info"))?,
            stats: q.stats,
            fault_service_ns: q.fault_service_ns,
            svm_faults: q.svm_faults,
            svm_pages: q.svm_pages,
            fault_ack_ns: q.fault_ack_ns,
            svm_ranges_collected: q.svm_ranges_collected,
        })
    }

    /// VM_CREATE.
    pub fn vm_create(&self, fault_mode: bool) -> io::Result<u32> {
        let mut a = uapi::VmCreate {
            flags: if fault_mode {
                uapi::SVMGPU_VM_CREATE_FAULT_MODE
            } else {
                0
            },
            ..Default::default()
        };
        self.ioctl(uapi::DRM_IOCTL_SVMGPU_VM_CREATE, &mut a)?;
        Ok(a.vm_id)
    }

    /// VM_DESTROY.
    pub fn vm_destroy(&self, vm_id: u32) -> io::Result<()> {
        let mut a = uapi::VmDestroy { vm_id, pad: 0 };
        self.ioctl(uapi::DRM_IOCTL_SVMGPU_VM_DESTROY, &mut a)
    }

    /// EXEC_QUEUE_CREATE.
    pub fn exec_queue_create(&self, vm_id: u32, long_running: bool) -> io::Result<u32> {
        let mut a = uapi::ExecQueueCreate {
            vm_id,
            flags: if long_running {
                uapi::SVMGPU_EXEC_QUEUE_LONG_RUNNING
            } else {
                0
            },
            ..Default::default()
        };
        self.ioctl(uapi::DRM_IOCTL_SVMGPU_EXEC_QUEUE_CREATE, &mut a)?;
        Ok(a.queue_id)
    }

    /// EXEC_QUEUE_DESTROY.
    pub fn exec_queue_destroy(&self, queue_id: u32) -> io::Result<()> {
        let mut a = uapi::ExecQueueDestroy { queue_id, pad: 0 };
        self.ioctl(uapi::DRM_IOCTL_SVMGPU_EXEC_QUEUE_DESTROY, &mut a)
    }

    /// VM_BIND with any arguments (for tests of invalid input).
    pub fn vm_bind_raw(&self, a: &mut uapi::VmBind) -> io::Result<()> {
        self.ioctl(uapi::DRM_IOCTL_SVMGPU_VM_BIND, a)
    }

    /// Binds `[va, va + size)` of the VM to the CPU range at `userptr`.
    pub fn bind_userptr(
        &self,
        vm_id: u32,
        va: u64,
        size: u64,
        userptr: u64,
        readonly: bool,
    ) -> io::Result<()> {
        self.vm_bind_raw(&mut uapi::VmBind {
            vm_id,
            op: uapi::SVMGPU_VM_BIND_OP_MAP_USERPTR,
            flags: if readonly {
                uapi::SVMGPU_VM_BIND_F_READONLY
            } else {
                0
            },
            pad: 0,
            va,
            size,
            userptr,
        })
    }

    /// Unbinds the binding at `va` of `size` bytes.
    pub fn unbind(&self, vm_id: u32, va: u64, size: u64) -> io::Result<()> {
        self.vm_bind_raw(&mut uapi::VmBind {
            vm_id,
            op: uapi::SVMGPU_VM_BIND_OP_UNMAP,
            va,
            size,
            ..Default::default()
        })
    }

    /// VM_PREFETCH with any arguments.
    pub fn vm_prefetch_raw(&self, a: &mut uapi::VmPrefetch) -> io::Result<()> {
        self.ioctl(uapi::DRM_IOCTL_SVMGPU_VM_PREFETCH, a)
    }

    /// Populates the fault-mode VM's SVM mapping of `[start, start + size)` ahead of use.
    pub fn vm_prefetch(&self, vm_id: u32, start: u64, size: u64, write: bool) -> io::Result<()> {
        self.vm_prefetch_raw(&mut uapi::VmPrefetch {
            vm_id,
            flags: if write {
                uapi::SVMGPU_VM_PREFETCH_F_WRITE
            } else {
                0
            },
            start,
            size,
        })
    }

    /// EXEC with any arguments.
    pub fn exec_raw(&self, a: &mut uapi::Exec) -> io::Result<u64> {
        self.ioctl(uapi::DRM_IOCTL_SVMGPU_EXEC, a)?;
        Ok(a.fence)
    }

    /// Submits the batch at `batch_va` (`batch_len` bytes) on a queue; returns its fence.
    pub fn exec(&self, queue_id: u32, batch_va: u64, batch_len: u32) -> io::Result<u64> {
        self.exec_raw(&mut uapi::Exec {
            queue_id,
            batch_va,
            batch_len,
            ..Default::default()
        })
    }

    /// Submits the batch with in- and out-syncobjs (`uapi::Sync`, out ones with
    /// [`uapi::SVMGPU_SYNC_SIGNAL`]); returns its fence. Waits (in the kernel) until every
    /// in-fence signalled before the job is queued.
    pub fn exec_with_syncs(
        &self,
        queue_id: u32,
        batch_va: u64,
        batch_len: u32,
        syncs: &[uapi::Sync],
    ) -> io::Result<u64> {
        self.exec_raw(&mut uapi::Exec {
            queue_id,
            batch_va,
            batch_len,
            syncs: if syncs.is_empty() {
                0
            } else {
                syncs.as_ptr() as u64
            },
            num_syncs: u32::try_from(syncs.len()).map_err(|_| einval())?,
            ..Default::default()
        })
    }

    /// Like [`Device::exec`], retrying while the queue is full (EBUSY).
    pub fn exec_retry(&self, queue_id: u32, batch_va: u64, batch_len: u32) -> io::Result<u64> {
        loop {
            match self.exec(queue_id, batch_va, batch_len) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                r => return r,
            }
        }
    }

    /// WAIT with any arguments.
    pub fn wait_raw(&self, a: &mut uapi::Wait) -> io::Result<FenceOutcome> {
        self.ioctl(uapi::DRM_IOCTL_SVMGPU_WAIT, a)?;
        Ok(FenceOutcome {
            error: a.error,
            job_status: a.job_status,
        })
    }

    /// Waits up to `timeout_ns` for a fence.
    pub fn wait(&self, queue_id: u32, fence: u64, timeout_ns: i64) -> io::Result<FenceOutcome> {
        self.wait_raw(&mut uapi::Wait {
            queue_id,
            fence,
            timeout_ns,
            ..Default::default()
        })
    }

    /// A DRM capability (DRM_IOCTL_GET_CAP), e.g. `uapi::DRM_CAP_SYNCOBJ_TIMELINE`.
    pub fn get_cap(&self, capability: u64) -> io::Result<u64> {
        let mut a = uapi::GetCap {
            capability,
            value: 0,
        };
        self.ioctl(uapi::DRM_IOCTL_GET_CAP, &mut a)?;
        Ok(a.value)
    }

    /// DRM_IOCTL_SYNCOBJ_CREATE: a new syncobj of this file, with no fence, or (if
    /// `signaled`) an already signalled one.
    pub fn syncobj_create(&self, signaled: bool) -> io::Result<u32> {
        let mut a = uapi::SyncobjCreate {
            handle: 0,
            flags: if signaled {
                uapi::DRM_SYNCOBJ_CREATE_SIGNALED
            } else {
                0
            },
        };
        self.ioctl(uapi::DRM_IOCTL_SYNCOBJ_CREATE, &mut a)?;
        Ok(a.handle)
    }

    /// DRM_IOCTL_SYNCOBJ_DESTROY.
    pub fn syncobj_destroy(&self, handle: u32) -> io::Result<()> {
        let mut a = uapi::SyncobjDestroy { handle, pad: 0 };
        self.ioctl(uapi::DRM_IOCTL_SYNCOBJ_DESTROY, &mut a)
    }

    /// DRM_IOCTL_SYNCOBJ_WAIT on binary syncobjs until the ABSOLUTE CLOCK_MONOTONIC time
    /// `timeout_abs_ns` ([`deadline_ns`] makes one from a relative time; 0 only polls).
    /// `flags`: `uapi::DRM_SYNCOBJ_WAIT_FLAGS_*` (WAIT_ALL: every one, else any one).
    /// Returns the index of the first signalled one (without WAIT_ALL). Errors: ETIME
    /// (timed out), EINVAL (a syncobj has no fence and WAIT_FOR_SUBMIT is not set).
    pub fn syncobj_wait(
        &self,
        handles: &[u32],
        timeout_abs_ns: i64,
        flags: u32,
    ) -> io::Result<u32> {
        let mut a = uapi::SyncobjWait {
            handles: handles.as_ptr() as u64,
            timeout_nsec: timeout_abs_ns,
            count_handles: u32::try_from(handles.len()).map_err(|_| einval())?,
            flags,
            ..Default::default()
        };
        self.ioctl(uapi::DRM_IOCTL_SYNCOBJ_WAIT, &mut a)?;
        Ok(a.first_signaled)
    }

    /// DRM_IOCTL_SYNCOBJ_TIMELINE_WAIT on `(handle, point)` pairs (point 0: a binary
    /// syncobj), as [`Device::syncobj_wait`].
    pub fn syncobj_timeline_wait(
        &self,
        points: &[(u32, u64)],
        timeout_abs_ns: i64,
        flags: u32,
    ) -> io::Result<u32> {
        let handles: Vec<u32> = points.iter().map(|p| p.0).collect();
        let pts: Vec<u64> = points.iter().map(|p| p.1).collect();
        let mut a = uapi::SyncobjTimelineWait {
            handles: handles.as_ptr() as u64,
            points: pts.as_ptr() as u64,
            timeout_nsec: timeout_abs_ns,
            count_handles: u32::try_from(points.len()).map_err(|_| einval())?,
            flags,
            ..Default::default()
        };
        self.ioctl(uapi::DRM_IOCTL_SYNCOBJ_TIMELINE_WAIT, &mut a)?;
        Ok(a.first_signaled)
    }

    /// DRM_IOCTL_SYNCOBJ_HANDLE_TO_FD with `EXPORT_SYNC_FILE`: the syncobj's current fence
    /// (binary) as a sync_file (poll() it: readable once signalled; [`sync_file_info`]).
    /// EINVAL if it has no fence.
    pub fn syncobj_export_sync_file(&self, handle: u32) -> io::Result<OwnedFd> {
        self.syncobj_export(
            handle,
            uapi::DRM_SYNCOBJ_HANDLE_TO_FD_FLAGS_EXPORT_SYNC_FILE,
            0,
        )
    }

    /// DRM_IOCTL_SYNCOBJ_HANDLE_TO_FD with `EXPORT_SYNC_FILE | TIMELINE`: the fence at a
    /// timeline point as a sync_file.
    pub fn syncobj_export_sync_file_point(&self, handle: u32, point: u64) -> io::Result<OwnedFd> {
        self.syncobj_export(
            handle,
            uapi::DRM_SYNCOBJ_HANDLE_TO_FD_FLAGS_EXPORT_SYNC_FILE
                | uapi::DRM_SYNCOBJ_HANDLE_TO_FD_FLAGS_TIMELINE,
            point,
        )
    }

    /// DRM_IOCTL_SYNCOBJ_HANDLE_TO_FD without flags: the syncobj itself as an fd (for
    /// another process or device file: [`Device::syncobj_import`]).
    pub fn syncobj_to_fd(&self, handle: u32) -> io::Result<OwnedFd> {
        self.syncobj_export(handle, 0, 0)
    }

    fn syncobj_export(&self, handle: u32, flags: u32, point: u64) -> io::Result<OwnedFd> {
        let mut a = uapi::SyncobjHandle {
            handle,
            flags,
            fd: -1,
            pad: 0,
            point,
        };
        self.ioctl(uapi::DRM_IOCTL_SYNCOBJ_HANDLE_TO_FD, &mut a)?;
        // SAFETY: The kernel returned a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(a.fd) })
    }

    /// DRM_IOCTL_SYNCOBJ_FD_TO_HANDLE without flags: a syncobj fd of
    /// [`Device::syncobj_to_fd`] as a handle of this file.
    pub fn syncobj_import(&self, fd: &OwnedFd) -> io::Result<u32> {
        let mut a = uapi::SyncobjHandle {
            fd: fd.as_raw_fd(),
            ..Default::default()
        };
        self.ioctl(uapi::DRM_IOCTL_SYNCOBJ_FD_TO_HANDLE, &mut a)?;
        Ok(a.handle)
    }

    /// DRM_IOCTL_SYNCOBJ_FD_TO_HANDLE with `IMPORT_SYNC_FILE`: puts the sync_file's fence
    /// in the existing syncobj `handle` (binary).
    pub fn syncobj_import_sync_file(&self, handle: u32, sync_file: &OwnedFd) -> io::Result<()> {
        let mut a = uapi::SyncobjHandle {
            handle,
            flags: uapi::DRM_SYNCOBJ_FD_TO_HANDLE_FLAGS_IMPORT_SYNC_FILE,
            fd: sync_file.as_raw_fd(),
            ..Default::default()
        };
        self.ioctl(uapi::DRM_IOCTL_SYNCOBJ_FD_TO_HANDLE, &mut a)
    }

    /// DRM_IOCTL_SYNCOBJ_QUERY of one timeline syncobj: its last signalled point, or with
    /// `uapi::DRM_SYNCOBJ_QUERY_FLAGS_LAST_SUBMITTED` in `flags` its last submitted one.
    pub fn syncobj_query(&self, handle: u32, flags: u32) -> io::Result<u64> {
        let handles = [handle];
        let mut points = [0u64];
        let mut a = uapi::SyncobjTimelineArray {
            handles: handles.as_ptr() as u64,
            points: points.as_mut_ptr() as u64,
            count_handles: 1,
            flags,
        };
        self.ioctl(uapi::DRM_IOCTL_SYNCOBJ_QUERY, &mut a)?;
        Ok(points[0])
    }

    /// DRM_IOCTL_SYNCOBJ_TIMELINE_SIGNAL: adds an already signalled fence at `(handle,
    /// point)` (for a binary syncobj use [`Device::syncobj_signal`]: point 0 here adds to
    /// the syncobj's chain rather than replacing its fence).
    pub fn syncobj_timeline_signal(&self, points: &[(u32, u64)]) -> io::Result<()> {
        let handles: Vec<u32> = points.iter().map(|p| p.0).collect();
        let pts: Vec<u64> = points.iter().map(|p| p.1).collect();
        let mut a = uapi::SyncobjTimelineArray {
            handles: handles.as_ptr() as u64,
            points: pts.as_ptr() as u64,
            count_handles: u32::try_from(points.len()).map_err(|_| einval())?,
            flags: 0,
        };
        self.ioctl(uapi::DRM_IOCTL_SYNCOBJ_TIMELINE_SIGNAL, &mut a)
    }

    /// DRM_IOCTL_SYNCOBJ_SIGNAL: gives binary syncobjs an already signalled fence.
    pub fn syncobj_signal(&self, handles: &[u32]) -> io::Result<()> {
        let mut a = uapi::SyncobjArray {
            handles: handles.as_ptr() as u64,
            count_handles: u32::try_from(handles.len()).map_err(|_| einval())?,
            pad: 0,
        };
        self.ioctl(uapi::DRM_IOCTL_SYNCOBJ_SIGNAL, &mut a)
    }

    /// DRM_IOCTL_SYNCOBJ_RESET: removes the fence of binary syncobjs.
    pub fn syncobj_reset(&self, handles: &[u32]) -> io::Result<()> {
        let mut a = uapi::SyncobjArray {
            handles: handles.as_ptr() as u64,
            count_handles: u32::try_from(handles.len()).map_err(|_| einval())?,
            pad: 0,
        };
        self.ioctl(uapi::DRM_IOCTL_SYNCOBJ_RESET, &mut a)
    }

    /// DRM_IOCTL_SYNCOBJ_TRANSFER: copies the fence at `src_point` of `src` to
    /// `dst_point` of `dst` (point 0: binary), e.g. a timeline point into a binary syncobj.
    pub fn syncobj_transfer(
        &self,
        src: u32,
        src_point: u64,
        dst: u32,
        dst_point: u64,
    ) -> io::Result<()> {
        let mut a = uapi::SyncobjTransfer {
            src_handle: src,
            dst_handle: dst,
            src_point,
            dst_point,
            flags: 0,
            pad: 0,
        };
        self.ioctl(uapi::DRM_IOCTL_SYNCOBJ_TRANSFER, &mut a)
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// The current CLOCK_MONOTONIC time in nanoseconds (the clock of syncobj wait timeouts).
pub fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// The absolute timeout of a syncobj wait that ends `rel_ns` from now.
pub fn deadline_ns(rel_ns: i64) -> i64 {
    monotonic_ns().saturating_add(rel_ns)
}

/// One fence of a sync_file, as SYNC_IOC_FILE_INFO describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncFence {
    /// The fence's driver (`dma_fence_ops::get_driver_name`).
    pub driver: String,
    /// Its timeline (`get_timeline_name`).
    pub timeline: String,
    /// 0 active, 1 signalled, < 0 signalled with that error.
    pub status: i32,
}

/// What SYNC_IOC_FILE_INFO tells about a sync_file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncFileStatus {
    /// 0 active, 1 signalled, < 0 signalled with an error (the first fence's error).
    pub status: i32,
    pub fences: Vec<SyncFence>,
}

fn c_str(b: &[u8]) -> String {
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..n]).into_owned()
}

/// SYNC_IOC_FILE_INFO (linux/sync_file.h) on a sync_file: its status and each fence's.
pub fn sync_file_info(fd: &OwnedFd) -> io::Result<SyncFileStatus> {
    let info = |a: &mut uapi::SyncFileInfo| {
        // SAFETY: `a` is a `struct sync_file_info`; its `sync_fence_info` is 0 or points
        // to `num_fences` entries.
        let rc = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                uapi::SYNC_IOC_FILE_INFO as libc::Ioctl,
                std::ptr::from_mut(a),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let mut a = uapi::SyncFileInfo::default();
    info(&mut a)?;
    let mut fences = vec![uapi::SyncFenceInfo::default(); a.num_fences as usize];
    let mut b = uapi::SyncFileInfo {
        num_fences: a.num_fences,
        sync_fence_info: fences.as_mut_ptr() as u64,
        ..Default::default()
    };
    if !fences.is_empty() {
        info(&mut b)?;
    }
    Ok(SyncFileStatus {
        status: if fences.is_empty() {
            a.status
        } else {
            b.status
        },
        fences: fences
            .iter()
            .map(|f| SyncFence {
                driver: c_str(&f.driver_name),
                timeline: c_str(&f.obj_name),
                status: f.status,
            })
            .collect(),
    })
}

/// Whether the fd is readable within `timeout_ms` (poll; a sync_file is readable once
/// its fences signalled).
pub fn poll_readable(fd: &OwnedFd, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: One valid pollfd.
        let rc = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if rc >= 0 {
            return Ok(rc > 0 && p.revents & libc::POLLIN != 0);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// A batch under construction.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    words: Vec<u64>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an instruction.
    pub fn push(&mut self, insn: Insn) -> &mut Self {
        let (w, n) = insn.encode();
        self.words.extend_from_slice(&w[..n]);
        self
    }

    /// Appends `END`.
    pub fn end(&mut self) -> &mut Self {
        self.push(Insn::End)
    }

    /// Current length in bytes (the offset of the next instruction).
    pub fn len_bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Writes the batch into `out` (little-endian); returns its length.
    pub fn write_to(&self, out: &mut [u8]) -> usize {
        for (chunk, w) in out.chunks_exact_mut(8).zip(self.words.iter()) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        self.len_bytes()
    }
}

/// Anonymous memory (mmap), page aligned; unmapped on drop unless [`Mapping::leak`]ed.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: The mapping is plain memory owned by this object.
unsafe impl Send for Mapping {}

impl Mapping {
    /// `len` bytes (rounded up to pages) of zeroed private anonymous memory.
    pub fn anon(len: usize) -> io::Result<Mapping> {
        Self::with_flags(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
    }

    /// `len` bytes of shared anonymous memory (survives fork without COW).
    pub fn shared(len: usize) -> io::Result<Mapping> {
        Self::with_flags(len, libc::MAP_SHARED | libc::MAP_ANONYMOUS)
    }

    fn with_flags(len: usize, flags: i32) -> io::Result<Mapping> {
        let len = len.div_ceil(4096) * 4096;
        // SAFETY: A fresh anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memory. The GPU may write it concurrently: use volatile reads for polling.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: The mapping is readable for `len` bytes while `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: As above, and `&mut self` makes the CPU access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Reads the u64 at byte offset `off` (volatile: the GPU writes behind our back).
    pub fn read_u64(&self, off: usize) -> u64 {
        assert!(off + 8 <= self.len && off.is_multiple_of(8));
        // SAFETY: In bounds and aligned.
        unsafe { std::ptr::read_volatile(self.ptr.add(off).cast::<u64>()) }
    }

    /// Reads the u32 at byte offset `off` (volatile).
    pub fn read_u32(&self, off: usize) -> u32 {
        assert!(off + 4 <= self.len && off.is_multiple_of(4));
        // SAFETY: In bounds and aligned.
        unsafe { std::ptr::read_volatile(self.ptr.add(off).cast::<u32>()) }
    }

    /// Writes the u32 at byte offset `off` (volatile).
    pub fn write_u32(&self, off: usize, v: u32) {
        assert!(off + 4 <= self.len && off.is_multiple_of(4));
        // SAFETY: In bounds and aligned; the mapping is writable.
        unsafe { std::ptr::write_volatile(self.ptr.add(off).cast::<u32>(), v) }
    }

    /// Forgets the mapping without unmapping it (the caller unmapped it itself).
    pub fn leak(self) {
        std::mem::forget(self);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: The mapping was created by `mmap` with this length.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// FNV-1a-64, as the device's CHECKSUM computes it.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    svmgpu_spec::isa::fnv1a64(bytes)
}

/// The result of [`fill_and_checksum`].
#[derive(Debug, Clone, Copy)]
pub struct FillResult {
    pub fence: u64,
    pub outcome: FenceOutcome,
    /// The checksum the GPU stored.
    pub gpu_sum: u64,
    /// The checksum the CPU computes over the filled bytes.
    pub cpu_sum: u64,
    /// Every filled word holds the pattern.
    pub pattern_ok: bool,
}

/// The basic bind/exec/verify flow on one device: binds a buffer of `data_len` bytes plus a
/// page for the batch and the result, fills the data with `pattern` and checksums it on the
/// GPU, then verifies on the CPU. Creates and destroys its own VM and queue.
pub fn fill_and_checksum(
    dev: &Device,
    data_len: usize,
    pattern: u32,
    va: u64,
) -> io::Result<FillResult> {
    let vm = dev.vm_create(false)?;
    let res = (|| {
        let q = dev.exec_queue_create(vm, false)?;
        let r = (|| {
            let mut buf = Mapping::anon(data_len + 4096)?;
            let data_va = va;
            let ctl_off = buf.len() - 4096;
            let ctl_va = va + ctl_off as u64;
            let mut b = Batch::new();
            b.push(Insn::Fill {
                va: data_va,
                len: data_len as u64,
                pattern,
            })
            .push(Insn::Checksum {
                src: data_va,
                len: data_len as u64,
                dst: ctl_va + 2048,
            })
            .end();
            b.write_to(&mut buf.as_mut_slice()[ctl_off..]);
            dev.bind_userptr(vm, va, buf.len() as u64, buf.addr(), false)?;
            let fence = dev.exec(q, ctl_va, b.len_bytes() as u32)?;
            let outcome = dev.wait(q, fence, 10_000_000_000)?;
            let gpu_sum = buf.read_u64(ctl_off + 2048);
            let data = &buf.as_slice()[..data_len];
            let cpu_sum = fnv1a64(data);
            let pattern_ok = data
                .chunks_exact(4)
                .all(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) == pattern);
            dev.unbind(vm, va, buf.len() as u64)?;
            Ok(FillResult {
                fence,
                outcome,
                gpu_sum,
                cpu_sum,
                pattern_ok,
            })
        })();
        let _ = dev.exec_queue_destroy(q);
        r
    })();
    let _ = dev.vm_destroy(vm);
    res
}
