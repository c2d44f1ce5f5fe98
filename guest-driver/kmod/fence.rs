// SPDX-License-Identifier: GPL-2.0

//! The driver's job fences.
//!
//! A job's fence is the `seqno` of its `JOB_SUBMIT`. The control queue hands out seqnos in
//! the order it puts commands on the ring, so the jobs of one exec queue have increasing
//! seqnos. A fence signals when its job *and every earlier job of the queue* got a
//! `JOB_DONE`: `completed` is the seqno up to which that holds.
//!
//! Each job also has a standard `dma_fence` (kernel patch 0011, `kernel::dma_fence`): the
//! queue is one fence context, the job's seqno is the fence's, and the fence signals with
//! the job's outcome (the error `WAIT` reports) at the moment the job's outcome becomes
//! known here: when it retires in order, or when the queue is lost or hangs. EXEC installs
//! it in the caller's out-syncobjs. The fence is created in [`Fences::register`], under the
//! control queue's lock where the seqno is handed out, from memory EXEC allocated before
//! ([`FenceSlot`]); the pending job owns the only [`UnsignalledFence`], so every job's fence
//! is signalled exactly once, and a job dropped without an outcome (the queue freed with jobs
//! pending) signals `-ECANCELED`.
//!
//! Nothing a `JOB_DONE` says is trusted blindly (spec 6.6, 6.16.2): every job the device
//! accepted is recorded in `pending` (under the control queue's lock, before the request
//! is on the ring, so a `JOB_DONE` can never arrive before its job is known), and a
//! `JOB_DONE` is accepted only for a pending job that has none yet. Completions for
//! unknown seqnos (corrupted), a second `JOB_DONE` for a job (duplicated) are counted and
//! ignored; a `JOB_DONE` that arrives before an earlier job's (reordered) is kept until
//! the earlier one arrives. The first failed job is remembered (the context then stays in
//! the error state: later jobs are skipped); jobs the device discards without a `JOB_DONE`
//! (context destroyed, device reset or removed, hang) fail with the errors recorded by
//! [`Fences::lose`] / [`Fences::hang`].
//!
//! `JOB_DONE` is handled in the complq interrupt callback: the state is under an IRQ-safe
//! spinlock and waiters sleep on a condition variable. `dma_fence`s are signalled under
//! that spinlock (their callbacks run in any context, and never take it).

use crate::wire;
use kernel::{
    dma_fence::{Context, Fence, FenceNames, FenceSlot, UnsignalledFence},
    new_condvar, new_spinlock_irq,
    prelude::*,
    sync::{
        aref::ARef,
        atomic::{Atomic, Relaxed},
        Arc, CondVar, CondVarTimeoutResult, SpinLockIrq,
    },
    time::{Instant, Jiffies, Monotonic},
};

/// Jobs of one queue the driver tracks at once (the device's `JOB_QUEUE_DEPTH`).
pub(crate) const MAX_PENDING: usize = 64;

/// Hangs of an open file's jobs after which the file is banned (uAPI: `ECANCELED`).
pub(crate) const HANG_BAN_LIMIT: u32 = 3;

/// Per open file (shared by its queues' fences): how many of its jobs hung, and its usage
/// as `fdinfo` shows it.
pub(crate) struct Client {
    pub(crate) hangs: Atomic<u32>,
    /// Time its queues had jobs outstanding, over busy periods that ended, in ns.
    busy_ns: Atomic<u64>,
    /// Jobs of its queues that completed (with any status).
    jobs_done: Atomic<u64>,
}

impl Client {
    pub(crate) fn new() -> Result<Arc<Client>> {
        Ok(Arc::new(
            Client {
                hangs: Atomic::new(0),
                busy_ns: Atomic::new(0),
                jobs_done: Atomic::new(0),
            },
            GFP_KERNEL,
        )?)
    }

    /// Whether the file is banned (too many hangs).
    pub(crate) fn banned(&self) -> bool {
        self.hangs.load(Relaxed) >= HANG_BAN_LIMIT
    }

    /// Time its queues had jobs outstanding, over busy periods that ended, in ns (a
    /// queue's current period is [`Fences::busy_now_ns`]).
    pub(crate) fn busy_ns(&self) -> u64 {
        self.busy_ns.load(Relaxed)
    }

    /// Jobs of its queues that completed.
    pub(crate) fn jobs_done(&self) -> u64 {
        self.jobs_done.load(Relaxed)
    }
}

struct Job {
    seqno: u64,
    /// The `JOB_DONE` status, once it arrived.
    done: Option<u32>,
    /// The job's `dma_fence`, until it is signalled with the job's outcome.
    fence: Option<UnsignalledFence>,
}

impl Job {
    const NONE: Job = Job {
        seqno: 0,
        done: None,
        fence: None,
    };
}

/// The names of the job fences.
struct JobFenceNames;

impl FenceNames for JobFenceNames {
    const DRIVER_NAME: &'static CStr = c"svmgpu";
    const TIMELINE_NAME: &'static CStr = c"svmgpu-exec-queue";
}

/// Why the queue's remaining jobs failed without a `JOB_DONE`.
#[derive(Clone, Copy)]
struct Lost {
    /// The first job without `JOB_DONE` fails with `first` (hang: `-ETIMEDOUT`), the
    /// others with `rest`.
    first_seqno: u64,
    first: i32,
    rest: i32,
}

struct State {
    /// Seqnos up to this one belong to commands sent before the queue existed.
    floor: u64,
    /// Largest seqno returned to user space.
    submitted: u64,
    /// Every job of the queue with a seqno up to this one has completed.
    completed: u64,
    /// Jobs accepted (or being submitted) and not retired, oldest first.
    pending: [Job; MAX_PENDING],
    npending: usize,
    /// When the oldest pending job last made progress (submitted to an idle queue, an
    /// earlier job completed, or the queue's context raised a page fault or had one
    /// resolved): the driver's hang timeout counts from here.
    progress: Instant<Monotonic>,
    /// The first failed job: seqno, errno, device status.
    error: Option<(u64, i32, u32)>,
    /// The queue is lost: every job not completed failed.
    lost: Option<Lost>,
    /// A job of the queue hung: the queue is banned (uAPI: `ECANCELED`).
    hung: bool,
    /// The errno of the next `JOB_FAULT`, when the driver cancelled a page fault of this
    /// queue for a reason more precise than "no mapping" (`EACCES`).
    fault_errno: Option<i32>,
    /// Since when the queue has had a job outstanding (`None`: idle).
    busy_since: Option<Instant<Monotonic>>,
}

/// The outcome of a signalled fence.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// 0 or a negative errno.
    pub(crate) error: i32,
    /// The device's job status (0 if it succeeded or the driver failed it).
    pub(crate) status: u32,
}

impl Outcome {
    /// The outcome as a `dma_fence` result.
    fn result(self) -> Result {
        if self.error == 0 {
            Ok(())
        } else {
            Err(Error::from_errno(self.error))
        }
    }
}

/// What [`Fences::job_done`] made of a `JOB_DONE`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum DoneKind {
    /// It completed a pending job (possibly ahead of an earlier one).
    Accepted,
    /// Its seqno matches no job of the queue (corrupted, or a late one of a lost queue).
    Unknown,
    /// The job already had its `JOB_DONE`.
    Duplicate,
}

/// Maps a job status to the errno user space sees on the fence.
pub(crate) fn job_errno(status: u32) -> i32 {
    use wire::Status as S;
    match S::from_u32(status) {
        Some(S::Ok) => 0,
        Some(S::JobFault) => EFAULT.to_errno(),
        Some(S::JobSkipped) => ECANCELED.to_errno(),
        _ => EIO.to_errno(),
    }
}

/// The fences of one exec queue.
#[pin_data]
pub(crate) struct Fences {
    #[pin]
    state: SpinLockIrq<State>,
    #[pin]
    cv: CondVar,
    /// The `dma_fence` context of the queue's job fences.
    context: Context,
    /// The open file the queue belongs to (hang accounting, bans).
    pub(crate) client: Arc<Client>,
}

impl Fences {
    pub(crate) fn new(floor: u64, client: Arc<Client>) -> impl PinInit<Self> {
        pin_init!(Self {
            state <- new_spinlock_irq!(
                State {
                    floor,
                    submitted: floor,
                    completed: floor,
                    pending: [Job::NONE; MAX_PENDING],
                    npending: 0,
                    progress: Instant::<Monotonic>::now(),
                    error: None,
                    lost: None,
                    hung: false,
                    fault_errno: None,
                    busy_since: None,
                },
                "svmgpu_fences"
            ),
            cv <- new_condvar!("svmgpu_fences_cv"),
            context: Context::new(),
            client,
        })
    }

    /// A job is about to be submitted. `ECANCELED` if a job of the queue hung (banned),
    /// `EIO` if the queue is lost or in the error state, `EBUSY` if it has
    /// [`MAX_PENDING`] jobs in flight.
    pub(crate) fn begin_submit(&self) -> Result {
        let s = self.state.lock();
        if s.hung {
            return Err(ECANCELED);
        }
        if s.lost.is_some() || s.error.is_some() {
            return Err(EIO);
        }
        if s.npending == MAX_PENDING {
            return Err(EBUSY);
        }
        Ok(())
    }

    /// Records the seqno of a `JOB_SUBMIT` about to be put on the ring (called under the
    /// control queue's lock, so before any `JOB_DONE` for it can arrive), and makes the
    /// job's `dma_fence` in `slot`. Returns the fence, or gives `slot` back if there is no
    /// room (the submission must then not be sent).
    fn register(&self, seqno: u64, slot: FenceSlot) -> Result<ARef<Fence>, FenceSlot> {
        let mut s = self.state.lock();
        if s.npending == MAX_PENDING || s.lost.is_some() {
            return Err(slot);
        }
        if s.npending == 0 {
            let now = Instant::<Monotonic>::now();
            s.progress = now;
            s.busy_since = Some(now);
        }
        let fence = slot.init::<JobFenceNames>(&self.context, seqno);
        let shared = fence.fence().clone();
        let n = s.npending;
        s.pending[n] = Job {
            seqno,
            done: None,
            fence: Some(fence),
        };
        s.npending += 1;
        Ok(shared)
    }

    /// The submission of `seqno` ended: accepted (its fence is returned to user space) or
    /// not (refused, or no answer: no `JOB_DONE` is expected for it).
    pub(crate) fn end_submit(&self, seqno: u64, accepted: bool) {
        let mut s = self.state.lock();
        if accepted {
            s.submitted = s.submitted.max(seqno);
            return;
        }
        if let Some(i) = s.pending[..s.npending]
            .iter()
            .position(|j| j.seqno == seqno)
        {
            let n = s.npending;
            s.pending[i..n].rotate_left(1);
            // Never returned to user space, but maybe installed nowhere yet either: its
            // fence (dropped here) signals -ECANCELED.
            s.pending[n - 1] = Job::NONE;
            s.npending -= 1;
        }
        Self::retire(&mut s);
        self.end_busy_period(&mut s);
        drop(s);
        self.cv.notify_all();
    }

    /// Ends the queue's busy period if no job is outstanding any more, adding it to the
    /// client's busy time.
    fn end_busy_period(&self, s: &mut State) {
        if s.npending == 0 {
            if let Some(t) = s.busy_since.take() {
                let ns = t.elapsed().as_nanos().max(0) as u64;
                self.client.busy_ns.fetch_add(ns, Relaxed);
            }
        }
    }

    /// How long the queue's current busy period has lasted, in ns (0 when idle).
    pub(crate) fn busy_now_ns(&self) -> u64 {
        let s = self.state.lock();
        s.busy_since
            .map_or(0, |t| t.elapsed().as_nanos().max(0) as u64)
    }

    /// Retires completed jobs from the front, in seqno order.
    fn retire(s: &mut State) {
        let mut k = 0;
        while k < s.npending {
            let Some(status) = s.pending[k].done else {
                break;
            };
            let seqno = s.pending[k].seqno;
            s.completed = s.completed.max(seqno);
            if status != wire::Status::Ok.as_u32()
                && status != wire::Status::JobSkipped.as_u32()
                && s.error.is_none()
            {
                let mut errno = job_errno(status);
                if status == wire::Status::JobFault.as_u32() {
                    errno = s.fault_errno.take().unwrap_or(errno);
                }
                s.error = Some((seqno, errno, status));
            }
            Self::signal(s, k);
            k += 1;
        }
        if k > 0 {
            let n = s.npending;
            s.pending[..n].rotate_left(k);
            s.npending -= k;
            s.progress = Instant::<Monotonic>::now();
        }
    }

    /// Signals the `dma_fence` of pending job `k`, whose outcome is known.
    fn signal(s: &mut State, k: usize) {
        let outcome = Self::outcome(s, s.pending[k].seqno);
        if let (Some(o), Some(fence)) = (outcome, s.pending[k].fence.take()) {
            fence.signal(o.result());
        }
    }

    /// The queue is lost (`s.lost` set): signals the fences of every pending job with
    /// their outcome, and forgets the jobs.
    fn drop_pending(s: &mut State) {
        for k in 0..s.npending {
            Self::signal(s, k);
        }
        s.npending = 0;
    }

    /// `JOB_DONE` for `seqno` with `status` (interrupt context).
    pub(crate) fn job_done(&self, seqno: u64, status: u32) -> DoneKind {
        let mut s = self.state.lock();
        if s.lost.is_some() {
            return DoneKind::Unknown;
        }
        let n = s.npending;
        let Some(job) = s.pending[..n].iter_mut().find(|j| j.seqno == seqno) else {
            // A seqno of the queue's past: its job completed and was retired already.
            return if seqno > s.floor && seqno <= s.completed {
                DoneKind::Duplicate
            } else {
                DoneKind::Unknown
            };
        };
        if job.done.is_some() {
            return DoneKind::Duplicate;
        }
        job.done = Some(status);
        self.client.jobs_done.fetch_add(1, Relaxed);
        Self::retire(&mut s);
        self.end_busy_period(&mut s);
        drop(s);
        self.cv.notify_all();
        DoneKind::Accepted
    }

    /// The driver is about to cancel a page fault of this queue's running job: its
    /// `JOB_FAULT` reports `errno` (negative) instead of `-EFAULT`.
    pub(crate) fn set_fault_errno(&self, errno: i32) {
        self.state.lock().fault_errno = Some(errno);
    }

    /// Every job without a `JOB_DONE` fails with `errno` (negative), and so do later
    /// submissions (`EIO`).
    pub(crate) fn lose(&self, errno: i32) {
        let mut s = self.state.lock();
        if s.lost.is_none() {
            s.lost = Some(Lost {
                first_seqno: 0,
                first: errno,
                rest: errno,
            });
        }
        Self::drop_pending(&mut s);
        self.end_busy_period(&mut s);
        drop(s);
        self.cv.notify_all();
    }

    /// The job `seqno` hung (or, with `None`, the oldest job without a `JOB_DONE`): it
    /// fails with `-ETIMEDOUT`, later jobs with `-ECANCELED`, and the queue is banned.
    /// Returns the seqno of the job declared hung, or `None` if `seqno` is not a pending
    /// job without `JOB_DONE` (a bogus `ENGINE_HANG`) or the queue is lost already.
    pub(crate) fn hang(&self, seqno: Option<u64>) -> Option<u64> {
        let mut s = self.state.lock();
        if s.lost.is_some() {
            return None;
        }
        let n = s.npending;
        let first = s.pending[..n].iter().find(|j| j.done.is_none())?.seqno;
        if let Some(want) = seqno {
            if !s.pending[..n]
                .iter()
                .any(|j| j.seqno == want && j.done.is_none())
            {
                return None;
            }
        }
        let hung = seqno.unwrap_or(first);
        s.lost = Some(Lost {
            first_seqno: hung,
            first: ETIMEDOUT.to_errno(),
            rest: ECANCELED.to_errno(),
        });
        s.hung = true;
        // Jobs before the hung one that did complete keep their outcome.
        Self::retire(&mut s);
        Self::drop_pending(&mut s);
        self.end_busy_period(&mut s);
        drop(s);
        self.cv.notify_all();
        Some(hung)
    }

    /// The queue's running job made progress (it faulted, or a fault of it was resolved).
    pub(crate) fn progress(&self) {
        let mut s = self.state.lock();
        if s.npending > 0 {
            s.progress = Instant::<Monotonic>::now();
        }
    }

    /// If the oldest pending job made no progress for `timeout_ms`, its seqno.
    pub(crate) fn overdue(&self, timeout_ms: u32) -> Option<u64> {
        let s = self.state.lock();
        if s.lost.is_some() || s.npending == 0 {
            return None;
        }
        let waited = s.progress.elapsed().as_nanos() as u64;
        if waited < u64::from(timeout_ms) * 1_000_000 {
            return None;
        }
        s.pending[..s.npending]
            .iter()
            .find(|j| j.done.is_none())
            .map(|j| j.seqno)
    }

    /// Jobs submitted and not completed.
    #[allow(dead_code)]
    pub(crate) fn inflight(&self) -> u32 {
        self.state.lock().npending as u32
    }

    fn outcome(s: &State, fence: u64) -> Option<Outcome> {
        if fence <= s.completed {
            return Some(match s.error {
                Some((seq, err, status)) if seq == fence => Outcome { error: err, status },
                Some((seq, _, _)) if seq < fence => Outcome {
                    error: ECANCELED.to_errno(),
                    status: wire::Status::JobSkipped.as_u32(),
                },
                _ => Outcome {
                    error: 0,
                    status: 0,
                },
            });
        }
        s.lost.map(|l| Outcome {
            error: if fence == l.first_seqno {
                l.first
            } else {
                l.rest
            },
            status: 0,
        })
    }

    /// Waits up to `timeout` (interruptibly) for `fence`. `EINVAL` if the queue never
    /// returned it, `ETIME` on timeout, `ERESTARTSYS` on a signal.
    ///
    /// `remaining` is set to what is left of `timeout` when the wait ends: on
    /// `ERESTARTSYS` (a signal), the caller hands it back to user space, so that the
    /// restarted call does not wait longer than the original.
    pub(crate) fn wait(
        &self,
        fence: u64,
        timeout: Jiffies,
        remaining: &mut Jiffies,
    ) -> Result<Outcome> {
        let mut s = self.state.lock();
        *remaining = timeout;
        if fence <= s.floor || fence > s.submitted {
            return Err(EINVAL);
        }
        loop {
            if let Some(o) = Self::outcome(&s, fence) {
                return Ok(o);
            }
            if *remaining == 0 {
                return Err(ETIME);
            }
            match self.cv.wait_interruptible_timeout(&mut s, *remaining) {
                CondVarTimeoutResult::Woken { jiffies } => *remaining = jiffies,
                CondVarTimeoutResult::Timeout => *remaining = 0,
                CondVarTimeoutResult::Signal { jiffies } => {
                    *remaining = jiffies;
                    return match Self::outcome(&s, fence) {
                        Some(o) => Ok(o),
                        None => Err(ERESTARTSYS),
                    };
                }
            }
        }
    }
}

/// `j` jiffies in nanoseconds.
pub(crate) fn jiffies_to_ns(j: Jiffies) -> u64 {
    // One second is `HZ` jiffies.
    let hz = kernel::time::msecs_to_jiffies(1000).max(1);
    (j as u64).saturating_mul(1_000_000_000) / hz as u64
}

/// The seqno hook of one job submission: registers the job with its queue's fences and
/// makes its `dma_fence` from memory allocated before (no allocation under the control
/// queue's lock).
pub(crate) struct JobRegistration<'a> {
    fences: &'a Fences,
    slot: core::cell::Cell<Option<FenceSlot>>,
    fence: core::cell::Cell<Option<ARef<Fence>>>,
}

impl<'a> JobRegistration<'a> {
    /// Allocates the job's `dma_fence` (may sleep).
    pub(crate) fn new(fences: &'a Fences) -> Result<Self> {
        Ok(Self {
            fences,
            slot: core::cell::Cell::new(Some(FenceSlot::new(GFP_KERNEL)?)),
            fence: core::cell::Cell::new(None),
        })
    }

    /// The job's `dma_fence`, once the job was registered.
    pub(crate) fn take_fence(&self) -> Option<ARef<Fence>> {
        self.fence.take()
    }
}

impl crate::ctrl::SeqnoHook for JobRegistration<'_> {
    fn register(&self, seqno: u64) -> bool {
        let Some(slot) = self.slot.take() else {
            // One registration per submission attempt.
            return false;
        };
        match self.fences.register(seqno, slot) {
            Ok(fence) => {
                self.fence.set(Some(fence));
                true
            }
            Err(slot) => {
                self.slot.set(Some(slot));
                false
            }
        }
    }
}

#[kunit_tests(svmgpu_job_fences)]
mod tests {
    use super::*;
    use crate::ctrl::SeqnoHook;

    /// A queue's fences, and the `dma_fence` of each of its jobs.
    type Queue = (Pin<KBox<Fences>>, KVec<ARef<Fence>>);

    /// A queue with jobs `seqnos` registered (as the control queue would).
    fn queue(seqnos: &[u64]) -> Result<Queue> {
        let fences = KBox::pin_init(Fences::new(10, Client::new()?), GFP_KERNEL)?;
        let mut out = KVec::new();
        for &seqno in seqnos {
            let job = JobRegistration::new(&fences)?;
            assert!(job.register(seqno));
            fences.end_submit(seqno, true);
            out.push(job.take_fence().ok_or(EINVAL)?, GFP_KERNEL)?;
        }
        Ok((fences, out))
    }

    fn status_of(f: &Fence) -> Option<i32> {
        f.status().map(|r| r.map_or_else(|e| e.to_errno(), |()| 0))
    }

    #[test]
    fn job_fences_signal_in_order_with_the_job_outcome() -> Result {
        let (fences, f) = queue(&[11, 12, 13])?;
        assert_eq!(f[0].seqno(), 11);
        assert_eq!(f[0].context(), f[2].context());
        // 12 completes first (reordered): nothing signals until 11 did.
        assert!(fences.job_done(12, wire::Status::JobFault.as_u32()) == DoneKind::Accepted);
        assert_eq!(status_of(&f[0]), None);
        assert_eq!(status_of(&f[1]), None);
        assert!(fences.job_done(11, wire::Status::Ok.as_u32()) == DoneKind::Accepted);
        assert_eq!(status_of(&f[0]), Some(0));
        assert_eq!(status_of(&f[1]), Some(EFAULT.to_errno()));
        // Skipped behind the failed job.
        assert!(fences.job_done(13, wire::Status::JobSkipped.as_u32()) == DoneKind::Accepted);
        assert_eq!(status_of(&f[2]), Some(ECANCELED.to_errno()));
        Ok(())
    }

    #[test]
    fn a_hang_and_a_loss_signal_every_pending_fence() -> Result {
        let (fences, f) = queue(&[11, 12, 13])?;
        assert!(fences.job_done(11, wire::Status::Ok.as_u32()) == DoneKind::Accepted);
        assert_eq!(fences.hang(None), Some(12));
        assert_eq!(status_of(&f[0]), Some(0));
        assert_eq!(status_of(&f[1]), Some(ETIMEDOUT.to_errno()));
        assert_eq!(status_of(&f[2]), Some(ECANCELED.to_errno()));

        let (fences, f) = queue(&[11, 12])?;
        fences.lose(EIO.to_errno());
        assert_eq!(status_of(&f[0]), Some(EIO.to_errno()));
        assert_eq!(status_of(&f[1]), Some(EIO.to_errno()));
        Ok(())
    }

    #[test]
    fn a_refused_submission_or_a_freed_queue_leaves_no_fence_unsignalled() -> Result {
        let (fences, f) = queue(&[11])?;
        let job = JobRegistration::new(&fences)?;
        assert!(job.register(12));
        fences.end_submit(12, false);
        let refused = job.take_fence().ok_or(EINVAL)?;
        assert_eq!(status_of(&refused), Some(ECANCELED.to_errno()));
        assert_eq!(status_of(&f[0]), None);
        drop(fences);
        assert_eq!(status_of(&f[0]), Some(ECANCELED.to_errno()));
        Ok(())
    }
}
