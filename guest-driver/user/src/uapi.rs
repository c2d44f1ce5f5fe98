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

const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const DRM_IOCTL_BASE: u64 = b'd' as u64;
const DRM_COMMAND_BASE: u64 = 0x40;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (DRM_IOCTL_BASE << 8) | nr
}

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
        assert_eq!(size_of::<Exec>(), 32);
        assert_eq!(size_of::<Wait>(), 32);
        assert_eq!(size_of::<DrmVersion>(), 64);
    }

    #[test]
    fn ioctl_numbers_match_the_header() {
        assert_eq!(DRM_IOCTL_SVMGPU_DEVICE_QUERY, 0xc268_6440);
        assert_eq!(DRM_IOCTL_SVMGPU_WAIT, 0xc020_6447);
        assert_eq!(DRM_IOCTL_VERSION, 0xc040_6400);
        assert_eq!(DRM_IOCTL_SVMGPU_VM_PREFETCH, 0x4018_6448);
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
            let val = val.trim_start_matches("0x");
            assert_eq!(u64::from_str_radix(val, 16).ok(), Some(v), "{name}");
        }
    }
}
