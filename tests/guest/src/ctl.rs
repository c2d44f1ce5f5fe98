//! The driver's control node, `/dev/svmgpu` (guest-driver/uapi/svmgpu_ctl.h).

use std::{fs::File, io, os::fd::AsRawFd};
use svmgpu_spec::{Config, GetInfoResp};

pub const CTL_PATH: &str = "/dev/svmgpu";

const QUERY_SIZE: usize = 16 + Config::SIZE + GetInfoResp::SIZE;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((b'S' as u64) << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
pub const IOCTL_NUM_DEVICES: u64 = ioc(IOC_READ, 0x00, 4);
pub const IOCTL_QUERY: u64 = ioc(IOC_READ | IOC_WRITE, 0x01, QUERY_SIZE);

/// What one QUERY returns.
#[derive(Debug, Clone)]
pub struct Query {
    pub bus_index: u32,
    pub round_trip_ns: u64,
    pub config: Config,
    pub info: GetInfoResp,
}

/// An open control node.
#[derive(Debug)]
pub struct Ctl(File);

impl Ctl {
    pub fn open() -> io::Result<Self> {
        Ok(Ctl(File::options()
            .read(true)
            .write(true)
            .open(CTL_PATH)?))
    }

    /// Issues `cmd` with a raw pointer argument.
    ///
    /// # Safety
    /// `arg` must point to memory of the size `cmd` encodes, or be deliberately bad (the
    /// kernel must then answer EFAULT without touching it).
    pub unsafe fn raw_ioctl(&self, cmd: u64, arg: *mut u8) -> io::Result<()> {
        // SAFETY: The fd is open; the argument's validity is the caller's promise.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), cmd as _, arg) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn num_devices(&self) -> io::Result<u32> {
        let mut n = [0u8; 4];
        // SAFETY: `n` is the 4 bytes NUM_DEVICES writes.
        unsafe { self.raw_ioctl(IOCTL_NUM_DEVICES, n.as_mut_ptr())? };
        Ok(u32::from_ne_bytes(n))
    }

    pub fn query(&self, slot: u32) -> io::Result<Query> {
        let mut q = [0u8; QUERY_SIZE];
        q[..4].copy_from_slice(&slot.to_ne_bytes());
        // SAFETY: `q` has the size QUERY encodes.
        unsafe { self.raw_ioctl(IOCTL_QUERY, q.as_mut_ptr())? };
        let bad = |what| io::Error::new(io::ErrorKind::InvalidData, what);
        let config = Config::decode(&q[16..16 + Config::SIZE]).ok_or_else(|| bad("config"))?;
        let info = GetInfoResp::decode(&q[16 + Config::SIZE..]).ok_or_else(|| bad("info"))?;
        Ok(Query {
            bus_index: u32::from_ne_bytes(q[4..8].try_into().unwrap_or_default()),
            round_trip_ns: u64::from_ne_bytes(q[8..16].try_into().unwrap_or_default()),
            config,
            info,
        })
    }
}
