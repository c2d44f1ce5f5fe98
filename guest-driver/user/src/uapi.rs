//! A mirror of `guest-driver/uapi/svmgpu_drm.h` (the C header is the source of truth; the
//! tests below pin every size and ioctl number to the values the header gives).

#![allow(missing_docs)]

pub const SVMGPU_CONFIG_SIZE: usize = 64;
pub const SVMGPU_INFO_SIZE: usize = 40;
pub const SVMGPU_NUM_STATS: usize = 48;

pub const SVMGPU_NOTIFIER_SINGLE: u32 = 0;
pub const SVMGPU_NOTIFIER_TWOPASS: u32 = 1;

pub const SVMGPU_SVM_SINGLE: u32 = 0;
pub const SVMGPU_SVM_PER_DEVICE: u32 = 1;
pub const SVMGPU_SVM_SHARED: u32 = 2;
pub const SVMGPU_VM_PREFETCH_F_WRITE: u32 = 1 << 0;

pub const SVMGPU_QUERY_F_STATS: u32 = 1 << 0;
pub const SVMGPU_VM_CREATE_FAULT_MODE: u32 = 1 << 0;
pub const SVMGPU_EXEC_QUEUE_LONG_RUNNING: u32 = 1 << 0;
pub const SVMGPU_VM_BIND_OP_MAP_USERPTR: u32 = 1;
pub const SVMGPU_VM_BIND_OP_UNMAP: u32 = 2;
pub const SVMGPU_VM_BIND_F_READONLY: u32 = 1 << 0;
pub const SVMGPU_MAX_BIND_SIZE: u64 = 1 << 30;
pub const SVMGPU_MAX_BATCH_LEN: u32 = 1 << 24;
/// `struct drm_svmgpu_sync` flag: an out-syncobj (signalled by the job); else an
/// in-syncobj (waited for).
pub const SVMGPU_SYNC_SIGNAL: u32 = 1 << 0;
/// Most syncobjs one EXEC takes (in and out together).
pub const SVMGPU_MAX_SYNCS: u32 = 64;
/// Hangs after which an open file is banned (EXEC_QUEUE_CREATE, EXEC: ECANCELED).
pub const SVMGPU_HANG_BAN_LIMIT: u32 = 3;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DeviceQuery {
    pub flags: u32,
    pub bus_index: u32,
    pub round_trip_ns: u64,
    pub features: u64,
    pub notifier_mode: u32,
    pub svm_mode: u32,
    pub invalidations: u64,
    pub invalidation_ns: u64,
    pub gpu_faults: u64,
    pub gpu_faults_failed: u64,
    pub config: [u8; SVMGPU_CONFIG_SIZE],
    pub info: [u8; SVMGPU_INFO_SIZE],
    pub stats: [u64; SVMGPU_NUM_STATS],
    pub fault_service_ns: u64,
    pub svm_faults: u64,
    pub svm_pages: u64,
    pub fault_ack_ns: u64,
    pub svm_ranges_collected: u64,
    pub reserved: [u64; 3],
}

impl Default for DeviceQuery {
    fn default() -> Self {
        DeviceQuery {
            flags: 0,
            bus_index: 0,
            round_trip_ns: 0,
            features: 0,
            notifier_mode: 0,
            svm_mode: 0,
            invalidations: 0,
            invalidation_ns: 0,
            gpu_faults: 0,
            gpu_faults_failed: 0,
            config: [0; SVMGPU_CONFIG_SIZE],
            info: [0; SVMGPU_INFO_SIZE],
            stats: [0; SVMGPU_NUM_STATS],
            fault_service_ns: 0,
            svm_faults: 0,
            svm_pages: 0,
            fault_ack_ns: 0,
            svm_ranges_collected: 0,
            reserved: [0; 3],
        }
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct VmCreate {
    pub extensions: u64,
    pub flags: u32,
    pub vm_id: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct VmDestroy {
    pub vm_id: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ExecQueueCreate {
    pub extensions: u64,
    pub vm_id: u32,
    pub flags: u32,
    pub queue_id: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ExecQueueDestroy {
    pub queue_id: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct VmBind {
    pub vm_id: u32,
    pub op: u32,
    pub flags: u32,
    pub pad: u32,
    pub va: u64,
    pub size: u64,
    pub userptr: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Exec {
    pub queue_id: u32,
    pub flags: u32,
    pub batch_va: u64,
    pub batch_len: u32,
    pub pad: u32,
    pub fence: u64,
    /// User pointer to `num_syncs` [`Sync`]s, or 0.
    pub syncs: u64,
    pub num_syncs: u32,
    pub pad2: u32,
}

/// `struct drm_svmgpu_sync`: a syncobj an EXEC waits for (in) or signals (out, with
/// [`SVMGPU_SYNC_SIGNAL`]); `point` 0 = binary, else a timeline point.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sync {
    pub handle: u32,
    pub flags: u32,
    pub point: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct VmPrefetch {
    pub vm_id: u32,
    pub flags: u32,
    pub start: u64,
    pub size: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Wait {
    pub queue_id: u32,
    pub flags: u32,
    pub fence: u64,
    pub timeout_ns: i64,
    pub error: i32,
    pub job_status: u32,
}

/// `struct drm_version` (include/uapi/drm/drm.h).
#[repr(C)]
#[derive(Debug)]
pub struct DrmVersion {
    pub version_major: i32,
    pub version_minor: i32,
    pub version_patchlevel: i32,
    pub name_len: usize,
    pub name: *mut u8,
    pub date_len: usize,
    pub date: *mut u8,
    pub desc_len: usize,
    pub desc: *mut u8,
}

// ---- The DRM core's syncobj ioctls (include/uapi/drm/drm.h) ----------------------------

pub const DRM_SYNCOBJ_CREATE_SIGNALED: u32 = 1 << 0;
pub const DRM_SYNCOBJ_FD_TO_HANDLE_FLAGS_IMPORT_SYNC_FILE: u32 = 1 << 0;
pub const DRM_SYNCOBJ_FD_TO_HANDLE_FLAGS_TIMELINE: u32 = 1 << 1;
pub const DRM_SYNCOBJ_HANDLE_TO_FD_FLAGS_EXPORT_SYNC_FILE: u32 = 1 << 0;
pub const DRM_SYNCOBJ_HANDLE_TO_FD_FLAGS_TIMELINE: u32 = 1 << 1;
pub const DRM_SYNCOBJ_WAIT_FLAGS_WAIT_ALL: u32 = 1 << 0;
pub const DRM_SYNCOBJ_WAIT_FLAGS_WAIT_FOR_SUBMIT: u32 = 1 << 1;
pub const DRM_SYNCOBJ_WAIT_FLAGS_WAIT_AVAILABLE: u32 = 1 << 2;
pub const DRM_SYNCOBJ_WAIT_FLAGS_WAIT_DEADLINE: u32 = 1 << 3;
pub const DRM_SYNCOBJ_QUERY_FLAGS_LAST_SUBMITTED: u32 = 1 << 0;
pub const DRM_CAP_SYNCOBJ: u64 = 0x13;
pub const DRM_CAP_SYNCOBJ_TIMELINE: u64 = 0x14;

/// `struct drm_get_cap`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GetCap {
    pub capability: u64,
    pub value: u64,
}

/// `struct drm_syncobj_create`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncobjCreate {
    pub handle: u32,
    pub flags: u32,
}

/// `struct drm_syncobj_destroy`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncobjDestroy {
    pub handle: u32,
    pub pad: u32,
}

/// `struct drm_syncobj_handle` (HANDLE_TO_FD, FD_TO_HANDLE).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncobjHandle {
    pub handle: u32,
    pub flags: u32,
    pub fd: i32,
    pub pad: u32,
    /// The timeline point (with the `*_FLAGS_TIMELINE` flags; kernel 6.x, zero otherwise).
    pub point: u64,
}

/// `struct drm_syncobj_transfer`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncobjTransfer {
    pub src_handle: u32,
    pub dst_handle: u32,
    pub src_point: u64,
    pub dst_point: u64,
    pub flags: u32,
    pub pad: u32,
}

/// `struct drm_syncobj_wait` (the kernel's layout, with `deadline_nsec`; the DRM core
/// also accepts libdrm's older, shorter one). `timeout_nsec` is ABSOLUTE
/// (CLOCK_MONOTONIC); 0 only polls.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncobjWait {
    pub handles: u64,
    pub timeout_nsec: i64,
    pub count_handles: u32,
    pub flags: u32,
    pub first_signaled: u32,
    pub pad: u32,
    pub deadline_nsec: u64,
}

/// `struct drm_syncobj_timeline_wait` (kernel layout, see [`SyncobjWait`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncobjTimelineWait {
    pub handles: u64,
    pub points: u64,
    pub timeout_nsec: i64,
    pub count_handles: u32,
    pub flags: u32,
    pub first_signaled: u32,
    pub pad: u32,
    pub deadline_nsec: u64,
}

/// `struct drm_syncobj_array` (RESET, SIGNAL).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncobjArray {
    pub handles: u64,
    pub count_handles: u32,
    pub pad: u32,
}

/// `struct drm_syncobj_timeline_array` (QUERY, TIMELINE_SIGNAL).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncobjTimelineArray {
    pub handles: u64,
    pub points: u64,
    pub count_handles: u32,
    pub flags: u32,
}

// ---- sync_file (include/uapi/linux/sync_file.h) ------------------------------------------

/// `struct sync_fence_info`: `status` 0 active, 1 signalled, < 0 the fence's error.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncFenceInfo {
    pub obj_name: [u8; 32],
    pub driver_name: [u8; 32],
    pub status: i32,
    pub flags: u32,
    pub timestamp_ns: u64,
}

/// `struct sync_file_info` (SYNC_IOC_FILE_INFO): `status` 0 active, 1 signalled, < 0 an
/// error.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncFileInfo {
    pub name: [u8; 32],
    pub status: i32,
    pub flags: u32,
    pub num_fences: u32,
    pub pad: u32,
    pub sync_fence_info: u64,
}

const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const DRM_IOCTL_BASE: u64 = b'd' as u64;
const DRM_COMMAND_BASE: u64 = 0x40;

const fn ioc_type(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    ioc_type(dir, DRM_IOCTL_BASE, nr, size)
}

const fn drm_iowr(nr: u64, size: usize) -> u64 {
    ioc(IOC_READ | IOC_WRITE, nr, size)
}

pub const DRM_IOCTL_GET_CAP: u64 = drm_iowr(0x0c, size_of::<GetCap>());
pub const DRM_IOCTL_SYNCOBJ_CREATE: u64 = drm_iowr(0xbf, size_of::<SyncobjCreate>());
pub const DRM_IOCTL_SYNCOBJ_DESTROY: u64 = drm_iowr(0xc0, size_of::<SyncobjDestroy>());
pub const DRM_IOCTL_SYNCOBJ_HANDLE_TO_FD: u64 = drm_iowr(0xc1, size_of::<SyncobjHandle>());
pub const DRM_IOCTL_SYNCOBJ_FD_TO_HANDLE: u64 = drm_iowr(0xc2, size_of::<SyncobjHandle>());
pub const DRM_IOCTL_SYNCOBJ_WAIT: u64 = drm_iowr(0xc3, size_of::<SyncobjWait>());
pub const DRM_IOCTL_SYNCOBJ_RESET: u64 = drm_iowr(0xc4, size_of::<SyncobjArray>());
pub const DRM_IOCTL_SYNCOBJ_SIGNAL: u64 = drm_iowr(0xc5, size_of::<SyncobjArray>());
pub const DRM_IOCTL_SYNCOBJ_TIMELINE_WAIT: u64 = drm_iowr(0xca, size_of::<SyncobjTimelineWait>());
pub const DRM_IOCTL_SYNCOBJ_QUERY: u64 = drm_iowr(0xcb, size_of::<SyncobjTimelineArray>());
pub const DRM_IOCTL_SYNCOBJ_TRANSFER: u64 = drm_iowr(0xcc, size_of::<SyncobjTransfer>());
pub const DRM_IOCTL_SYNCOBJ_TIMELINE_SIGNAL: u64 =
    drm_iowr(0xcd, size_of::<SyncobjTimelineArray>());

/// `SYNC_IOC_FILE_INFO` (`_IOWR('>', 4, struct sync_file_info)`).
pub const SYNC_IOC_FILE_INFO: u64 = ioc_type(
    IOC_READ | IOC_WRITE,
    b'>' as u64,
    4,
    size_of::<SyncFileInfo>(),
);

pub const DRM_IOCTL_VERSION: u64 = ioc(IOC_READ | IOC_WRITE, 0x00, size_of::<DrmVersion>());
pub const DRM_IOCTL_SVMGPU_DEVICE_QUERY: u64 = ioc(
    IOC_READ | IOC_WRITE,
    DRM_COMMAND_BASE,
    size_of::<DeviceQuery>(),
);
pub const DRM_IOCTL_SVMGPU_VM_CREATE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    DRM_COMMAND_BASE + 1,
    size_of::<VmCreate>(),
);
pub const DRM_IOCTL_SVMGPU_VM_DESTROY: u64 =
    ioc(IOC_WRITE, DRM_COMMAND_BASE + 2, size_of::<VmDestroy>());
pub const DRM_IOCTL_SVMGPU_EXEC_QUEUE_CREATE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    DRM_COMMAND_BASE + 3,
    size_of::<ExecQueueCreate>(),
);
pub const DRM_IOCTL_SVMGPU_EXEC_QUEUE_DESTROY: u64 = ioc(
    IOC_WRITE,
    DRM_COMMAND_BASE + 4,
    size_of::<ExecQueueDestroy>(),
);
pub const DRM_IOCTL_SVMGPU_VM_BIND: u64 = ioc(IOC_WRITE, DRM_COMMAND_BASE + 5, size_of::<VmBind>());
pub const DRM_IOCTL_SVMGPU_EXEC: u64 = ioc(
    IOC_READ | IOC_WRITE,
    DRM_COMMAND_BASE + 6,
    size_of::<Exec>(),
);
pub const DRM_IOCTL_SVMGPU_WAIT: u64 = ioc(
    IOC_READ | IOC_WRITE,
    DRM_COMMAND_BASE + 7,
    size_of::<Wait>(),
);
pub const DRM_IOCTL_SVMGPU_VM_PREFETCH: u64 =
    ioc(IOC_WRITE, DRM_COMMAND_BASE + 8, size_of::<VmPrefetch>());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_header() {
        // Sizes a C compiler gives for guest-driver/uapi/svmgpu_drm.h on x86_64.
        assert_eq!(size_of::<DeviceQuery>(), 616);
        assert_eq!(size_of::<VmPrefetch>(), 24);
        assert_eq!(size_of::<VmCreate>(), 16);
        assert_eq!(size_of::<VmDestroy>(), 8);
        assert_eq!(size_of::<ExecQueueCreate>(), 24);
        assert_eq!(size_of::<ExecQueueDestroy>(), 8);
        assert_eq!(size_of::<VmBind>(), 40);
        assert_eq!(size_of::<Exec>(), 48);
        assert_eq!(size_of::<Sync>(), 16);
        // drm.h of the guest kernel (7.3): the syncobj structs (WAIT, TIMELINE_WAIT and
        // HANDLE_TO_FD in their current, longer layout; libdrm-dev 2.4.114's are 32, 40
        // and 16 bytes, which the DRM core accepts too).
        assert_eq!(size_of::<GetCap>(), 16);
        assert_eq!(size_of::<SyncobjCreate>(), 8);
        assert_eq!(size_of::<SyncobjDestroy>(), 8);
        assert_eq!(size_of::<SyncobjHandle>(), 24);
        assert_eq!(size_of::<SyncobjTransfer>(), 32);
        assert_eq!(size_of::<SyncobjWait>(), 40);
        assert_eq!(size_of::<SyncobjTimelineWait>(), 48);
        assert_eq!(size_of::<SyncobjArray>(), 16);
        assert_eq!(size_of::<SyncobjTimelineArray>(), 24);
        // linux/sync_file.h
        assert_eq!(size_of::<SyncFileInfo>(), 56);
        assert_eq!(size_of::<SyncFenceInfo>(), 80);
        assert_eq!(size_of::<Wait>(), 32);
        assert_eq!(size_of::<DrmVersion>(), 64);
    }

    #[test]
    fn ioctl_numbers_match_the_header() {
        assert_eq!(DRM_IOCTL_SVMGPU_DEVICE_QUERY, 0xc268_6440);
        assert_eq!(DRM_IOCTL_SVMGPU_WAIT, 0xc020_6447);
        assert_eq!(DRM_IOCTL_VERSION, 0xc040_6400);
        assert_eq!(DRM_IOCTL_SVMGPU_VM_PREFETCH, 0x4018_6448);
        // The values gcc gives for the header (struct drm_svmgpu_exec with syncs).
        assert_eq!(DRM_IOCTL_SVMGPU_EXEC, 0xc030_6446);
        // libdrm-dev's drm.h and the kernel's agree on these ...
        assert_eq!(DRM_IOCTL_GET_CAP, 0xc010_640c);
        assert_eq!(DRM_IOCTL_SYNCOBJ_CREATE, 0xc008_64bf);
        assert_eq!(DRM_IOCTL_SYNCOBJ_DESTROY, 0xc008_64c0);
        assert_eq!(DRM_IOCTL_SYNCOBJ_RESET, 0xc010_64c4);
        assert_eq!(DRM_IOCTL_SYNCOBJ_QUERY, 0xc018_64cb);
        assert_eq!(DRM_IOCTL_SYNCOBJ_TRANSFER, 0xc020_64cc);
        assert_eq!(DRM_IOCTL_SYNCOBJ_TIMELINE_SIGNAL, 0xc018_64cd);
        // ... these are the kernel's longer layouts (libdrm-dev 2.4.114: 0xc01064c1,
        // 0xc01064c2, 0xc02064c3, 0xc02864ca).
        assert_eq!(DRM_IOCTL_SYNCOBJ_HANDLE_TO_FD, 0xc018_64c1);
        assert_eq!(DRM_IOCTL_SYNCOBJ_FD_TO_HANDLE, 0xc018_64c2);
        assert_eq!(DRM_IOCTL_SYNCOBJ_WAIT, 0xc028_64c3);
        assert_eq!(DRM_IOCTL_SYNCOBJ_TIMELINE_WAIT, 0xc030_64ca);
        assert_eq!(SYNC_IOC_FILE_INFO, 0xc038_3e04);
    }

    #[test]
    fn header_defines_the_same_numbers() {
        let h = include_str!("../../uapi/svmgpu_drm.h");
        for (name, v) in [
            (
                "SVMGPU_NOTIFIER_TWOPASS",
                u64::from(SVMGPU_NOTIFIER_TWOPASS),
            ),
            ("DRM_SVMGPU_WAIT", 7),
            ("DRM_SVMGPU_VM_PREFETCH", 8),
            ("DRM_SVMGPU_EXEC", 6),
            ("SVMGPU_MAX_SYNCS", u64::from(SVMGPU_MAX_SYNCS)),
            ("SVMGPU_SVM_SHARED", u64::from(SVMGPU_SVM_SHARED)),
            ("SVMGPU_SVM_PER_DEVICE", u64::from(SVMGPU_SVM_PER_DEVICE)),
            (
                "SVMGPU_VM_BIND_OP_UNMAP",
                u64::from(SVMGPU_VM_BIND_OP_UNMAP),
            ),
            (
                "SVMGPU_VM_BIND_OP_MAP_USERPTR",
                u64::from(SVMGPU_VM_BIND_OP_MAP_USERPTR),
            ),
        ] {
            let line = h
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("{name} not in the header"));
            let val = line.split_whitespace().nth(2).unwrap_or("");
            let got = match val.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => val.parse().ok(),
            };
            assert_eq!(got, Some(v), "{name}");
        }
        assert_eq!(SVMGPU_SYNC_SIGNAL, 1);
        assert!(
            h.lines()
                .any(|l| l.starts_with("#define SVMGPU_SYNC_SIGNAL (1u << 0)")),
            "SVMGPU_SYNC_SIGNAL is not (1u << 0) in the header"
        );
    }
}
