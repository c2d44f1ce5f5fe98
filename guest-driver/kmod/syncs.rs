// SPDX-License-Identifier: GPL-2.0

//! The in- and out-syncobjs of an EXEC (`struct drm_svmgpu_sync`).
//!
//! The device has no job dependencies, so the driver holds a job back itself: EXEC first
//! resolves every sync (the fences of the in-syncobjs, the out-syncobjs and, for timeline
//! points, their chain nodes), so that every error comes before any effect; then waits for
//! the in-fences, interruptibly and before it takes any lock; and once the job is queued
//! installs its fence in the out-syncobjs, which cannot fail any more.

use crate::drm_driver::DrmFile;
use kernel::{
    dma_fence::Fence,
    drm::syncobj::{ChainLink, SyncObj},
    prelude::*,
    sync::aref::ARef,
    uaccess::{UserPtr, UserSlice},
    uapi,
};

/// Bytes of one `struct drm_svmgpu_sync`.
const SYNC_SIZE: usize = core::mem::size_of::<uapi::drm_svmgpu_sync>();

/// An out-syncobj, ready to receive the job's fence.
struct OutSync {
    obj: ARef<SyncObj>,
    /// Timeline: the chain node and point; binary: `None`.
    point: Option<(ChainLink, u64)>,
}

/// The resolved syncs of one EXEC.
pub(crate) struct Syncs {
    wait: KVec<ARef<Fence>>,
    signal: KVec<OutSync>,
}

impl Syncs {
    /// Reads `num` syncs at user address `ptr` and resolves them: `EINVAL` (too many,
    /// undefined flags, an in-syncobj without a fence at its point), `ENOENT` (unknown
    /// handle), `EFAULT`, `ENOMEM`.
    pub(crate) fn resolve(file: &DrmFile, ptr: u64, num: u32) -> Result<Self> {
        let mut syncs = Syncs {
            wait: KVec::new(),
            signal: KVec::new(),
        };
        if num == 0 {
            return Ok(syncs);
        }
        if num > uapi::SVMGPU_MAX_SYNCS {
            return Err(EINVAL);
        }
        let len = num as usize * SYNC_SIZE;
        let addr = usize::try_from(ptr).map_err(|_| EFAULT)?;
        let mut raw = KVec::with_capacity(len, GFP_KERNEL)?;
        UserSlice::new(UserPtr::from_addr(addr), len).read_all(&mut raw, GFP_KERNEL)?;
        for s in raw.chunks_exact(SYNC_SIZE) {
            let handle = u32::from_ne_bytes([s[0], s[1], s[2], s[3]]);
            let flags = u32::from_ne_bytes([s[4], s[5], s[6], s[7]]);
            let mut p = [0u8; 8];
            p.copy_from_slice(&s[8..16]);
            let point = u64::from_ne_bytes(p);
            if flags & !uapi::SVMGPU_SYNC_SIGNAL != 0 {
                return Err(EINVAL);
            }
            if flags & uapi::SVMGPU_SYNC_SIGNAL != 0 {
                let obj = SyncObj::lookup(file, handle)?;
                let point = match point {
                    0 => None,
                    p => Some((ChainLink::new(GFP_KERNEL)?, p)),
                };
                syncs.signal.push(OutSync { obj, point }, GFP_KERNEL)?;
            } else {
                let fence = SyncObj::find_fence(file, handle, point)?;
                syncs.wait.push(fence, GFP_KERNEL)?;
            }
        }
        Ok(syncs)
    }

    /// Waits until every in-fence signalled (whatever its outcome). `ERESTARTSYS` on a
    /// signal (nothing happened yet: the call restarts).
    pub(crate) fn wait(&self) -> Result {
        for fence in self.wait.iter() {
            fence.wait(true, None)?;
        }
        Ok(())
    }

    /// Installs the job's fence in every out-syncobj.
    pub(crate) fn signal_with(self, fence: &Fence) {
        for out in self.signal {
            match out.point {
                Some((link, point)) => out.obj.add_point(link, fence, point),
                None => out.obj.replace_fence(Some(fence)),
            }
        }
    }
}
