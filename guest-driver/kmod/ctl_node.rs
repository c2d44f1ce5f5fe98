// SPDX-License-Identifier: GPL-2.0

//! `/dev/svmgpu`: the control node (see `guest-driver/uapi/svmgpu_ctl.h`).
//!
//! A documented stopgap until the per-device DRM render nodes exist: it enumerates the
//! bound devices and runs a GET_INFO round trip on one of them.

use crate::gpu::Gpu;
use kernel::{
    fs::File,
    ioctl::{_IOR, _IOWR},
    miscdevice::{MiscDevice, MiscDeviceRegistration},
    prelude::*,
    time::{Instant, Monotonic},
    uaccess::{UserPtr, UserSlice},
};

/// `struct svmgpu_ctl_query` is 16 bytes of header, the config space and the info body.
const QUERY_SIZE: usize = 16 + crate::wire::Config::SIZE + crate::wire::GetInfoResp::SIZE;
const IOCTL_NUM_DEVICES: u32 = _IOR::<u32>(b'S' as u32, 0x00);
const IOCTL_QUERY: u32 = _IOWR::<[u8; QUERY_SIZE]>(b'S' as u32, 0x01);

/// An open file of the control node; it carries no state.
pub(crate) struct CtlNode;

#[vtable]
impl MiscDevice for CtlNode {
    type Ptr = KBox<Self>;

    fn open(_file: &File, _misc: &MiscDeviceRegistration<Self>) -> Result<KBox<Self>> {
        Ok(KBox::new(CtlNode, GFP_KERNEL)?)
    }

    fn ioctl(_me: &CtlNode, _file: &File, cmd: u32, arg: usize) -> Result<isize> {
        let arg = UserPtr::from_addr(arg);
        match cmd {
            IOCTL_NUM_DEVICES => {
                let n = Gpu::count() as u32;
                UserSlice::new(arg, 4)
                    .writer()
                    .write_slice(&n.to_ne_bytes())?;
                Ok(0)
            }
            IOCTL_QUERY => query(arg),
            _ => Err(ENOTTY),
        }
    }
}

static SEQNO: kernel::sync::atomic::Atomic<u64> = kernel::sync::atomic::Atomic::new(2);

fn query(arg: UserPtr) -> Result<isize> {
    let (mut reader, mut writer) = UserSlice::new(arg, QUERY_SIZE).reader_writer();
    let mut q = [0u8; QUERY_SIZE];
    reader.read_slice(&mut q[..4])?;
    let slot = u32::from_ne_bytes([q[0], q[1], q[2], q[3]]) as usize;
    let gpu = Gpu::get(slot).ok_or(ENODEV)?;
    let seqno = SEQNO.fetch_add(1, kernel::sync::atomic::Relaxed);
    let start = Instant::<Monotonic>::now();
    let info = gpu.get_info(seqno)?;
    let ns = start.elapsed().as_nanos() as u64;
    q[4..8].copy_from_slice(&gpu.bus_index.to_ne_bytes());
    q[8..16].copy_from_slice(&ns.to_ne_bytes());
    q[16..16 + gpu.config_raw.len()].copy_from_slice(&gpu.config_raw);
    q[16 + gpu.config_raw.len()..].copy_from_slice(&info);
    writer.write_slice(&q)?;
    Ok(0)
}
