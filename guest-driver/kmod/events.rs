// SPDX-License-Identifier: GPL-2.0

//! The device → driver queues: eventq (64-byte event records) and complq (32-byte
//! completion records).
//!
//! Each [`RxQueue`] owns a fixed array of receive buffers, allocated at probe and all
//! posted to the device when the queue is attached; the interrupt callback takes used
//! buffers, copies their record out, reposts the buffer at once and then hands the
//! records to the dispatcher (outside the queue's lock). Nothing here allocates or sleeps:
//! it runs in hard-interrupt context.

use crate::virtio::Virtqueue;
use kernel::{new_spinlock_irq, prelude::*, sync::SpinLockIrq};

/// The largest record (an event).
pub(crate) const MAX_RECORD: usize = crate::wire::EVENT_SIZE;
/// Records copied out per lock hold.
const BATCH: usize = 16;

struct Rx {
    vq: Option<Virtqueue>,
    /// Buffer `i` is `bufs[i * rec..][..rec]`; never resized while the device owns any.
    bufs: KVec<u8>,
    rec: usize,
    /// Buffers returned with a length shorter than a record (the spec: used length 0).
    short: u64,
    /// Buffers that could not be reposted (should not happen: the ring has room for all).
    lost_buffers: u64,
}

/// One receive queue (eventq or complq).
#[pin_data]
pub(crate) struct RxQueue {
    #[pin]
    inner: SpinLockIrq<Rx>,
}

impl RxQueue {
    /// A queue of `count` buffers of `rec` bytes.
    pub(crate) fn new(rec: usize, count: usize) -> Result<impl PinInit<Self>> {
        if rec > MAX_RECORD || count == 0 {
            return Err(EINVAL);
        }
        let bufs = KVec::from_elem(0u8, rec * count, GFP_KERNEL)?;
        Ok(pin_init!(Self {
            inner <- new_spinlock_irq!(
                Rx {
                    vq: None,
                    bufs,
                    rec,
                    short: 0,
                    lost_buffers: 0
                },
                "svmgpu_rx"
            ),
        }))
    }

    /// Attaches the virtqueue and posts every buffer to the device.
    pub(crate) fn attach(&self, vq: Virtqueue) -> Result {
        let mut inner = self.inner.lock();
        let Rx { bufs, rec, .. } = &mut *inner;
        let rec = *rec;
        let mut vq = vq;
        for (i, buf) in bufs.chunks_exact_mut(rec).enumerate() {
            // SAFETY: `bufs` is kmalloc memory that is never resized and only freed after the
            // device was reset and the queue detached.
            unsafe { vq.add_inbuf(buf, i + 1)? };
        }
        vq.kick();
        inner.vq = Some(vq);
        Ok(())
    }

    /// Forgets the virtqueue (after a device reset).
    pub(crate) fn detach(&self) -> Option<Virtqueue> {
        self.inner.lock().vq.take()
    }

    /// Takes every used buffer, reposts it and calls `f` with its record (interrupt
    /// context; `f` runs without the queue's lock).
    pub(crate) fn drain(&self, mut f: impl FnMut(&[u8])) {
        let mut recs = [[0u8; MAX_RECORD]; BATCH];
        loop {
            let mut n = 0;
            let more;
            let rec;
            {
                let mut inner = self.inner.lock();
                rec = inner.rec;
                let Rx {
                    vq,
                    bufs,
                    short,
                    lost_buffers,
                    ..
                } = &mut *inner;
                let Some(vq) = vq.as_mut() else { return };
                vq.disable_cb();
                let mut reposted = false;
                while n < BATCH {
                    let Some((token, len)) = vq.get_buf() else {
                        break;
                    };
                    let i = token.wrapping_sub(1);
                    let Some(buf) = i
                        .checked_mul(rec)
                        .and_then(|start| bufs.get_mut(start..start.checked_add(rec)?))
                    else {
                        continue;
                    };
                    if (len as usize) < rec {
                        *short += 1;
                    } else {
                        recs[n][..rec].copy_from_slice(buf);
                        n += 1;
                    }
                    // SAFETY: As in `attach`: the buffer stays valid while the device owns it.
                    if unsafe { vq.add_inbuf(buf, token) }.is_err() {
                        *lost_buffers += 1;
                    }
                    reposted = true;
                }
                if reposted {
                    vq.kick();
                }
                more = n == BATCH || !vq.enable_cb();
            }
            for r in &recs[..n] {
                f(&r[..rec]);
            }
            if !more {
                break;
            }
        }
    }
}
