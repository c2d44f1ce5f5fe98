// SPDX-License-Identifier: GPL-2.0

//! The control queue: commands to the device, each answered with a status.
//!
//! Commands use preallocated slots, each with its own request and response buffer, so a
//! command can be sent from any context (notifier callbacks included) without allocating.
//! A sender takes a free slot, writes the request, queues the chain and kicks, all under
//! one IRQ-safe spinlock that the queue's interrupt callback also takes to retire chains.
//!
//! A waiter sleeps on a condition variable with a timeout. If it gives up (timeout or
//! signal) while the device still owns the slot's buffers, the slot is marked abandoned
//! and is only reused once the device hands it back (or the device is reset), so the
//! device never writes into memory the driver reuses.

use crate::virtio::Virtqueue;
use kernel::{
    new_condvar, new_spinlock_irq,
    prelude::*,
    sync::{CondVar, SpinLockIrq},
    time::{msecs_to_jiffies, Jiffies},
};

/// Number of commands that can be in flight at once.
pub(crate) const SLOTS: usize = 32;
/// Largest request or response a slot carries.
pub(crate) const BUF_SIZE: usize = 256;

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// The device owns the buffers; a waiter is waiting.
    InFlight,
    /// The device wrote this many bytes of response.
    Done(u32),
    /// The device owns the buffers, nobody waits: free the slot when it comes back.
    Abandoned,
}

struct Inner {
    vq: Option<Virtqueue>,
    states: [SlotState; SLOTS],
    /// Slot `i` owns `bufs[2 * i * BUF_SIZE..][..BUF_SIZE]` (request) and the next
    /// `BUF_SIZE` bytes (response). Never resized, so the device's addresses stay valid.
    bufs: KVec<u8>,
    /// Chains the device returned with a token that matched no slot in flight.
    bogus_completions: u64,
}

/// The control queue of one device.
#[pin_data]
pub(crate) struct CtrlQueue {
    #[pin]
    inner: SpinLockIrq<Inner>,
    #[pin]
    done: CondVar,
}

impl CtrlQueue {
    pub(crate) fn new() -> Result<impl PinInit<Self>> {
        let bufs = KVec::from_elem(0u8, 2 * SLOTS * BUF_SIZE, GFP_KERNEL)?;
        let inner = Inner {
            vq: None,
            states: [SlotState::Free; SLOTS],
            bufs,
            bogus_completions: 0,
        };
        Ok(pin_init!(Self {
            inner <- new_spinlock_irq!(inner, "svmgpu_ctrl"),
            done <- new_condvar!("svmgpu_ctrl_done"),
        }))
    }

    /// Gives the queue its virtqueue, once found.
    pub(crate) fn attach(&self, vq: Virtqueue) {
        self.inner.lock().vq = Some(vq);
    }

    /// Forgets the virtqueue after a device reset: the device owns no buffer any more, so
    /// every slot is retired and every waiter fails with `ENODEV`.
    pub(crate) fn detach(&self) -> Option<Virtqueue> {
        let mut inner = self.inner.lock();
        for state in inner.states.iter_mut() {
            *state = match *state {
                SlotState::InFlight => SlotState::Done(0),
                SlotState::Abandoned => SlotState::Free,
                s => s,
            };
        }
        let vq = inner.vq.take();
        drop(inner);
        self.done.notify_all();
        vq
    }

    /// Sends `req` and waits up to `timeout_ms` for the response, which is copied into
    /// `resp`. Returns the number of bytes the device wrote.
    pub(crate) fn call(&self, req: &[u8], resp: &mut [u8], timeout_ms: u32) -> Result<usize> {
        if req.len() > BUF_SIZE || resp.len() > BUF_SIZE {
            return Err(EINVAL);
        }
        let mut inner = self.inner.lock();
        let idx = inner
            .states
            .iter()
            .position(|s| *s == SlotState::Free)
            .ok_or(EBUSY)?;
        {
            let Inner {
                vq, states, bufs, ..
            } = &mut *inner;
            let vq = vq.as_mut().ok_or(ENODEV)?;
            let (reqbuf, respbuf) =
                bufs[2 * idx * BUF_SIZE..][..2 * BUF_SIZE].split_at_mut(BUF_SIZE);
            reqbuf[..req.len()].copy_from_slice(req);
            respbuf[..resp.len()].fill(0);
            // SAFETY: The slot's buffers live in `bufs`, which is never resized and only
            // freed after the device was reset; the slot is not reused until the chain comes
            // back or the device is reset (`detach`).
            unsafe { vq.add_chain(&reqbuf[..req.len()], &mut respbuf[..resp.len()], idx + 1)? };
            states[idx] = SlotState::InFlight;
            vq.kick();
        }
        let mut remaining: Jiffies = msecs_to_jiffies(timeout_ms);
        loop {
            if let SlotState::Done(len) = inner.states[idx] {
                let len = (len as usize).min(resp.len());
                let off = (2 * idx + 1) * BUF_SIZE;
                resp[..len].copy_from_slice(&inner.bufs[off..off + len]);
                inner.states[idx] = SlotState::Free;
                return if inner.vq.is_none() {
                    Err(ENODEV)
                } else {
                    Ok(len)
                };
            }
            use kernel::sync::CondVarTimeoutResult as R;
            match self.done.wait_interruptible_timeout(&mut inner, remaining) {
                R::Woken { jiffies } => remaining = jiffies,
                R::Timeout => {
                    inner.states[idx] = SlotState::Abandoned;
                    return Err(ETIMEDOUT);
                }
                R::Signal { .. } => {
                    inner.states[idx] = SlotState::Abandoned;
                    return Err(ERESTARTSYS);
                }
            }
        }
    }

    /// The queue's interrupt callback: retire every used chain and wake the waiters.
    pub(crate) fn complete(&self) {
        let mut inner = self.inner.lock();
        let Inner {
            vq,
            states,
            bogus_completions,
            ..
        } = &mut *inner;
        let Some(vq) = vq.as_mut() else { return };
        loop {
            vq.disable_cb();
            while let Some((token, len)) = vq.get_buf() {
                match states.get_mut(token.wrapping_sub(1)) {
                    Some(state) if *state == SlotState::InFlight => {
                        *state = SlotState::Done(len);
                    }
                    Some(state) if *state == SlotState::Abandoned => *state = SlotState::Free,
                    _ => *bogus_completions += 1,
                }
            }
            if vq.enable_cb() {
                break;
            }
        }
        drop(inner);
        self.done.notify_all();
    }
}
