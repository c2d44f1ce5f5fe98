// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Contexts (spec/svmgpu.md section 6.8.2): an ASID, a queue of jobs, the saved execution
//! state of the current job, and the scheduling state (running, stalled, preempted, error).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use svmgpu_spec::{Status, JOB_QUEUE_DEPTH, LOOP_MAX_DEPTH};

use crate::fault::FaultTimes;

/// A submitted job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Job {
    /// Seqno of its JOB_SUBMIT.
    pub seqno: u64,
    /// Batch start.
    pub batch_va: u64,
    /// Batch length in bytes.
    pub batch_len: u32,
}

impl Job {
    /// One past the batch's last byte (cannot overflow: checked at submission).
    pub fn batch_end(&self) -> u64 {
        self.batch_va + u64::from(self.batch_len)
    }
}

/// The execution state of a job: what preemption saves and resume restores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecState {
    /// The job.
    pub job: Job,
    /// Address of the next instruction.
    pub pc: u64,
    /// LOOP stack: (instruction address, remaining count).
    pub loops: [(u64, u32); LOOP_MAX_DEPTH],
    /// Entries used in `loops`.
    pub depth: usize,
    /// Running time already spent in the current WAIT or DELAY.
    pub partial_ns: u64,
    /// Bytes of the current bulk instruction (FILL, COPY, CHECKSUM) already processed: it
    /// continues from there after a fault (spec 6.13.3).
    pub partial_bytes: u64,
    /// The current CHECKSUM's running hash over its first `partial_bytes` bytes.
    pub partial_hash: u64,
    /// Time the job has been on an engine (the job timeout counts it).
    pub ran_ns: u64,
    /// Host time its instructions took, sleeps excluded (a job that burns much of it is
    /// throttled when it runs alone).
    pub cpu_ns: u64,
}

impl ExecState {
    /// The state at the start of `job`.
    pub fn start(job: Job) -> Self {
        Self {
            job,
            pc: job.batch_va,
            loops: [(0, 0); LOOP_MAX_DEPTH],
            depth: 0,
            partial_ns: 0,
            partial_bytes: 0,
            partial_hash: 0,
            ran_ns: 0,
            cpu_ns: 0,
        }
    }

    /// Forgets the progress of the instruction at `pc` (the pc moved on).
    pub fn clear_partial(&mut self) {
        self.partial_ns = 0;
        self.partial_bytes = 0;
        self.partial_hash = 0;
    }
}

/// Why a context that has work cannot run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stall {
    /// It can run.
    None,
    /// An access waits for the reply to this fault.
    Fault(u64),
    /// An access failed while the maximum of faults was outstanding; its fault is raised
    /// when one is replied.
    NoFaultSlot,
    /// A FENCE with NOTIFY waits for room in the completion backlog.
    Completions,
}

/// A CTX_PREEMPT or CTX_RESUME accepted for a context, applied in acceptance order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtxOp {
    /// Seqno of the command.
    pub seqno: u64,
    /// True for CTX_PREEMPT, false for CTX_RESUME.
    pub preempt: bool,
    /// Preempt: when the latency has elapsed.
    pub deadline: Instant,
    /// Preempt: the deadline has passed.
    pub fired: bool,
    /// Preempt: injected failure (`preempt-error`): completes with this status when it
    /// fires, without preempting.
    pub fail: Option<Status>,
    /// Preempt: injected drop (`preempt-drop`): never fires.
    pub dropped: bool,
}

/// One context.
#[derive(Debug)]
pub struct Context {
    /// Driver-chosen id.
    pub id: u32,
    /// Unique for the backend's lifetime, so that an engine returning a context can tell
    /// whether it is still the same one (the id may have been destroyed and reused).
    pub uid: u64,
    /// ASID.
    pub asid: u32,
    /// CTX_CREATE flags.
    pub flags: u32,
    /// Jobs submitted and not started.
    pub jobs: VecDeque<Job>,
    /// The started job's state while the context is not on an engine.
    pub exec: Option<ExecState>,
    /// On an engine now (its state is there, not in `exec`).
    pub running: Option<usize>,
    /// In the run queue.
    pub queued: bool,
    /// Stall reason.
    pub stall: Stall,
    /// Preempted flag.
    pub preempted: bool,
    /// The error that put it in the error state.
    pub error: Option<Status>,
    /// Accepted CTX_PREEMPT/CTX_RESUME commands not yet completed.
    pub ops: VecDeque<CtxOp>,
    /// Asks the engine running it to stop at the next instruction boundary.
    pub attention: Arc<Attention>,
    /// Its access waited on a fault answered RESUME and has not been retried yet: when the
    /// fault went through its stages (counted when an engine takes the context up again).
    pub resumed: Option<FaultTimes>,
}

/// A request to the engine running a context to stop at the next instruction boundary. An
/// engine that sleeps inside WAIT or DELAY is woken by it.
#[derive(Debug, Default)]
pub struct Attention {
    asked: AtomicBool,
    /// The engine thread to wake while it runs the context.
    engine: Mutex<Option<Thread>>,
}

impl Attention {
    /// Asks for attention (and wakes the engine if it sleeps).
    pub fn ask(&self) {
        self.asked.store(true, Ordering::Release);
        if let Some(t) = &*self.engine.lock().unwrap_or_else(|p| p.into_inner()) {
            t.unpark();
        }
    }

    /// True if attention was asked for.
    pub fn asked(&self) -> bool {
        self.asked.load(Ordering::Acquire)
    }

    /// Clears the request (the context left its engine).
    pub fn clear(&self) {
        self.asked.store(false, Ordering::Release);
        *self.engine.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The calling engine thread runs the context from now on.
    pub fn attach_current(&self) {
        *self.engine.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread::current());
    }

    /// Sleeps up to `d`, or until attention is asked for; returns the time slept.
    pub fn sleep(&self, d: Duration) -> Duration {
        let t0 = Instant::now();
        let until = t0 + d;
        loop {
            let now = Instant::now();
            if self.asked() || now >= until {
                return now - t0;
            }
            thread::park_timeout(until - now);
        }
    }
}

impl Context {
    /// A new idle context.
    pub fn new(id: u32, uid: u64, asid: u32, flags: u32) -> Self {
        Self {
            id,
            uid,
            asid,
            flags,
            jobs: VecDeque::new(),
            exec: None,
            running: None,
            queued: false,
            stall: Stall::None,
            preempted: false,
            error: None,
            ops: VecDeque::new(),
            attention: Arc::new(Attention::default()),
            resumed: None,
        }
    }

    /// Jobs queued or running.
    pub fn job_count(&self) -> usize {
        self.jobs.len() + usize::from(self.exec.is_some() || self.running.is_some())
    }

    /// True if another job may be queued.
    pub fn has_job_room(&self) -> bool {
        self.job_count() < JOB_QUEUE_DEPTH as usize
    }

    /// True if it has work and nothing keeps an engine from running it.
    pub fn runnable(&self) -> bool {
        self.running.is_none()
            && !self.preempted
            && self.error.is_none()
            && self.stall == Stall::None
            && (self.exec.is_some() || !self.jobs.is_empty())
    }

    /// Asks its engine to stop at the next boundary.
    pub fn interrupt(&self) {
        self.attention.ask();
    }

    /// The front op is a preemption whose latency has elapsed.
    pub fn preempt_due(&self) -> bool {
        self.ops.front().is_some_and(|o| o.preempt && o.fired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runnable_and_room() {
        let mut c = Context::new(1, 1, 0, 0);
        assert!(!c.runnable());
        let job = Job {
            seqno: 1,
            batch_va: 0x1000,
            batch_len: 8,
        };
        assert_eq!(job.batch_end(), 0x1008);
        c.jobs.push_back(job);
        assert!(c.runnable());
        c.preempted = true;
        assert!(!c.runnable());
        c.preempted = false;
        c.stall = Stall::Fault(3);
        assert!(!c.runnable());
        c.stall = Stall::None;
        for _ in 1..JOB_QUEUE_DEPTH {
            assert!(c.has_job_room());
            c.jobs.push_back(job);
        }
        assert!(!c.has_job_room());
        let s = ExecState::start(job);
        assert_eq!((s.pc, s.depth), (0x1000, 0));
        assert!(!c.preempt_due());
    }
}
