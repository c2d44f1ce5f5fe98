//! `svmgpu`: a userspace library over the svmgpu DRM uAPI
//! (`guest-driver/uapi/svmgpu_drm.h`): find the devices' render nodes, create VMs and exec
//! queues, bind CPU memory (userptr), build batches, submit them and wait for their
//! fences. Used by the guest test runner and the `svmgpu` CLI.

pub mod uapi;

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
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
