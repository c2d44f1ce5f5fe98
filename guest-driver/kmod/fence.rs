// SPDX-License-Identifier: GPL-2.0

//! The driver's job fences.
//!
//! The kernel's Rust tree has no `dma_fence` / syncobj abstraction yet, so the fences are
//! the driver's own: a job's fence is the `seqno` of its `JOB_SUBMIT`. The control queue
//! hands out seqnos in the order it puts commands on the ring, and the device runs the
//! jobs of one context in that order and posts their `JOB_DONE`s in that order, so one
//! number per exec queue says which fences have signalled: `completed` (the seqno of the
//! last `JOB_DONE`). The first failed job is remembered (the context then stays in the
//! error state: later jobs are skipped); jobs the device discards without a `JOB_DONE`
//! (context destroyed, device reset or removed) fail with the error recorded by
//! [`Fences::lose`].
//!
//! `JOB_DONE` is handled in the complq interrupt callback: the state is under an IRQ-safe
//! spinlock and waiters sleep on a condition variable.

use crate::wire;
use kernel::{
    new_condvar, new_spinlock_irq,
    prelude::*,
    sync::{CondVar, CondVarTimeoutResult, SpinLockIrq},
    time::Jiffies,
};

struct State {
    /// Seqnos up to this one belong to commands sent before the queue existed (a late
    /// `JOB_DONE` of a previous owner of the context id is ignored).
    floor: u64,
    /// Largest seqno returned to user space.
    submitted: u64,
    /// Seqno of the last `JOB_DONE`.
    completed: u64,
    /// Jobs submitted and not completed (for statistics and idling).
    inflight: u32,
    /// The first failed job: seqno, errno, device status.
    error: Option<(u64, i32, u32)>,
    /// Every job not completed failed with this errno (queue lost).
    lost: Option<i32>,
}

/// The outcome of a signalled fence.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// 0 or a negative errno.
    pub(crate) error: i32,
    /// The device's job status (0 if it succeeded or the driver failed it).
    pub(crate) status: u32,
}

/// Maps a job status to the errno user space sees on the fence.
pub(crate) fn job_errno(status: u32) -> i32 {
    use wire::Status as S;
    match S::from_u32(status) {
        Some(S::Ok) => 0,
        Some(S::JobFault) => -(kernel::bindings::EFAULT as i32),
        Some(S::JobSkipped) => -(kernel::bindings::ECANCELED as i32),
        _ => -(kernel::bindings::EIO as i32),
    }
}

/// The fences of one exec queue.
#[pin_data]
pub(crate) struct Fences {
    #[pin]
    state: SpinLockIrq<State>,
    #[pin]
    cv: CondVar,
}

impl Fences {
    pub(crate) fn new(floor: u64) -> impl PinInit<Self> {
        pin_init!(Self {
            state <- new_spinlock_irq!(
                State {
                    floor,
                    submitted: floor,
                    completed: floor,
                    inflight: 0,
                    error: None,
                    lost: None
                },
                "svmgpu_fences"
            ),
            cv <- new_condvar!("svmgpu_fences_cv"),
        })
    }

    /// A job is about to be submitted. Fails if the queue is lost or in the error state.
    pub(crate) fn begin_submit(&self) -> Result {
        let mut s = self.state.lock();
        if s.lost.is_some() || s.error.is_some() {
            return Err(EIO);
        }
        s.inflight += 1;
        Ok(())
    }

    /// The submission of a job ended: with its seqno if the device queued it.
    pub(crate) fn end_submit(&self, seqno: Option<u64>) {
        let mut s = self.state.lock();
        match seqno {
            Some(seqno) => s.submitted = s.submitted.max(seqno),
            None => s.inflight = s.inflight.saturating_sub(1),
        }
    }

    /// `JOB_DONE` for `seqno` with `status` (interrupt context).
    pub(crate) fn job_done(&self, seqno: u64, status: u32) {
        let mut s = self.state.lock();
        if seqno <= s.floor {
            return;
        }
        s.completed = s.completed.max(seqno);
        s.inflight = s.inflight.saturating_sub(1);
        if status != wire::Status::Ok.as_u32() && status != wire::Status::JobSkipped.as_u32() {
            if s.error.is_none() {
                s.error = Some((seqno, job_errno(status), status));
            }
        }
        drop(s);
        self.cv.notify_all();
    }

    /// Every job without a `JOB_DONE` fails with `errno` (negative), and so do later
    /// submissions.
    pub(crate) fn lose(&self, errno: i32) {
        let mut s = self.state.lock();
        if s.lost.is_none() {
            s.lost = Some(errno);
        }
        s.inflight = 0;
        drop(s);
        self.cv.notify_all();
    }

    /// Jobs submitted and not completed.
    #[allow(dead_code)]
    pub(crate) fn inflight(&self) -> u32 {
        self.state.lock().inflight
    }

    fn outcome(s: &State, fence: u64) -> Option<Outcome> {
        if fence <= s.completed {
            return Some(match s.error {
                Some((seq, err, status)) if seq == fence => Outcome { error: err, status },
                Some((seq, _, _)) if seq < fence => Outcome {
                    error: -(kernel::bindings::ECANCELED as i32),
                    status: wire::Status::JobSkipped.as_u32(),
                },
                _ => Outcome {
                    error: 0,
                    status: 0,
                },
            });
        }
        s.lost.map(|e| Outcome {
            error: e,
            status: 0,
        })
    }

    /// Waits up to `timeout` (interruptibly) for `fence`. `EINVAL` if the queue never
    /// returned it, `ETIME` on timeout, `ERESTARTSYS` on a signal.
    pub(crate) fn wait(&self, fence: u64, timeout: Jiffies) -> Result<Outcome> {
        let mut s = self.state.lock();
        if fence <= s.floor || fence > s.submitted {
            return Err(EINVAL);
        }
        let mut remaining = timeout;
        loop {
            if let Some(o) = Self::outcome(&s, fence) {
                return Ok(o);
            }
            if remaining == 0 {
                return Err(ETIME);
            }
            match self.cv.wait_interruptible_timeout(&mut s, remaining) {
                CondVarTimeoutResult::Woken { jiffies } => remaining = jiffies,
                CondVarTimeoutResult::Timeout => remaining = 0,
                CondVarTimeoutResult::Signal { .. } => {
                    return match Self::outcome(&s, fence) {
                        Some(o) => Ok(o),
                        None => Err(ERESTARTSYS),
                    }
                }
            }
        }
    }
}
