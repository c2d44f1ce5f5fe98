// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The emulated GPU: state that outlives vhost-user connections (identity, config space,
//! statistics, ASIDs, contexts, faults, TLBs, engines) and the rules that tie them together
//! (scheduling, preemption, page faults, context errors, resets).
//!
//! Threads: one per engine ([`crate::engine`]) and one timer ([`crate::timer`]) per device,
//! plus the vhost-user worker that serves the control queue. Locks, always taken in this
//! order: `state` → an engine's MMU → the outbox → a vring. An engine holds its MMU only for
//! one instruction, so whoever takes it (invalidation, reset) waits for at most the
//! instruction in flight.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, info};
use svmgpu_spec::{
    AccessKind, Completion, CompletionKind, Config, ContextErrorEvent, DeviceResetEvent,
    EngineHangEvent, Event, FaultReason, Opcode, PageFaultEvent, ResetReason, Status, ASID_ALL,
    CONFIG_SIZE, CTX_NONE, SVMGPU_F_AUDIT, SVMGPU_F_FAULT_COALESCE, VA_BITS,
};
use thiserror::Error;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};

use crate::config::{read_config, DeviceOptions, OptionsError};
use crate::context::{Context, CtxOp, ExecState, Job, Stall};
use crate::fault::{FaultReport, FaultTable, Raised, Waiter};
use crate::inject::{Field, Injector, Kind, RecKind, Subject};
use crate::mmu::audit::InvalLog;
use crate::mmu::tlb::Eviction;
use crate::mmu::{AuditFindings, Fault, Mmu, Scope, Tables};
use crate::outbox::{Injected, Outbox};
use crate::stats::{Counter, Extra, Stats};
use crate::timing::Timing;

/// Guest memory as the device sees it.
pub type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Errors creating a GPU.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GpuError {
    /// Invalid options.
    #[error("invalid device options: {0}")]
    Options(#[from] OptionsError),
    /// A thread could not be started.
    #[error("cannot start a device thread: {0}")]
    Thread(String),
}

/// An invalidation accepted and not yet completed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PendingInval {
    pub seqno: u64,
    pub scope: Scope,
    pub seq: u64,
    pub deadline: Instant,
    /// `OK`, or the failure an injection (`tlb-inval-error`) completes it with.
    pub status: Status,
}

/// Work started after a control response is in the used ring (so that no completion can
/// overtake the response that accepted its command).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deferred {
    /// Start a TLB invalidation.
    Invalidate {
        /// Command seqno.
        seqno: u64,
        /// Coverage.
        scope: Scope,
    },
    /// Start a CTX_PREEMPT (`preempt`) or CTX_RESUME.
    CtxOp {
        /// Context id.
        ctx: u32,
        /// Context uid.
        uid: u64,
        /// Command seqno.
        seqno: u64,
        /// Preempt (else resume).
        preempt: bool,
    },
    /// Queue a job.
    Job {
        /// Context id.
        ctx: u32,
        /// Context uid.
        uid: u64,
        /// The job.
        job: Job,
    },
}

/// Mutable device state, under one lock.
#[derive(Debug)]
pub(crate) struct State {
    /// Reset generation (equal to the outbox's).
    pub generation: u64,
    pub contexts: HashMap<u32, Context>,
    pub runq: VecDeque<u32>,
    /// The context uid each engine runs.
    pub engines: Vec<Option<u64>>,
    pub faults: FaultTable,
    pub invals: Vec<PendingInval>,
    /// Preemption deadlines: (deadline, ctx, uid).
    pub preempt_timers: Vec<(Instant, u32, u64)>,
    pub fence_waiters: Vec<u32>,
    pub next_uid: u64,
    pub reset_count: u64,
    /// A connection has used the device since the last virtio reset.
    pub active: bool,
    /// A device-initiated reset is in progress until then (DEVICE_RESET is queued then).
    pub resetting_until: Option<Instant>,
}

/// What an engine took from the run queue.
#[derive(Clone, Debug)]
pub(crate) struct Pick {
    pub ctx: u32,
    pub uid: u64,
    pub asid: u32,
    pub generation: u64,
    pub exec: ExecState,
    pub attention: Arc<AtomicBool>,
    /// Injected engine hang: the engine makes no progress on this job.
    pub hang: bool,
}

/// How an engine's time slice ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SliceEnd {
    /// The slice ran out.
    Expired,
    /// Asked to stop (preemption, destroy, reset, shutdown).
    Stopped,
    /// END.
    Done,
    /// The job failed.
    Failed { status: Status, address: u64 },
    /// A translation failed.
    Fault(Fault),
    /// A FENCE with NOTIFY waits for completion room.
    FenceBlocked,
}

/// Why and where a job failed (the CONTEXT_ERROR event's fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    pub job: Job,
    pub status: Status,
    pub engine: u32,
    pub pc: u64,
    pub address: u64,
}

/// A JOB_DONE record.
pub(crate) fn job_done(seqno: u64, ctx: u32, status: Status) -> Completion {
    Completion {
        kind: CompletionKind::JobDone.as_u32(),
        status: status.as_u32(),
        seqno,
        ctx_id: ctx,
        opcode: Opcode::JobSubmit.as_u32(),
        value: 0,
    }
}

/// A COMMAND_DONE record.
pub(crate) fn command_done(
    seqno: u64,
    ctx: u32,
    op: Opcode,
    status: Status,
    value: u64,
) -> Completion {
    Completion {
        kind: CompletionKind::CommandDone.as_u32(),
        status: status.as_u32(),
        seqno,
        ctx_id: ctx,
        opcode: op.as_u32(),
        value,
    }
}

/// A FENCE record.
pub(crate) fn fence_done(seqno: u64, ctx: u32, value: u64) -> Completion {
    Completion {
        kind: CompletionKind::Fence.as_u32(),
        status: Status::Ok.as_u32(),
        seqno,
        ctx_id: ctx,
        opcode: Opcode::JobSubmit.as_u32(),
        value,
    }
}

/// Everything the device's threads share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub index: u32,
    pub options: DeviceOptions,
    pub config: Config,
    pub config_bytes: [u8; CONFIG_SIZE],
    pub stats: Stats,
    pub timing: Timing,
    pub mem: RwLock<Option<Memory>>,
    pub state: Mutex<State>,
    /// Engines wait here for runnable contexts.
    pub work: Condvar,
    /// The timer waits here for the next deadline.
    pub timer: Condvar,
    /// Control waits here for engines to let go of contexts.
    pub idle: Condvar,
    pub mmus: Vec<Mutex<Mmu>>,
    /// Per ASID: `root | 1` when bound, 0 when not (read by engines on every walk).
    pub roots: Vec<AtomicU64>,
    pub log: InvalLog,
    pub outbox: Outbox,
    /// Device feature bits the driver accepted.
    pub features: AtomicU64,
    pub shutdown: AtomicBool,
    /// Fault-injection rules.
    pub inject: Injector,
    /// A device-initiated reset is in progress (control requests get `RESETTING`).
    pub resetting: AtomicBool,
}

/// One emulated svmgpu device.
#[derive(Debug)]
pub struct Gpu {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn memory(&self) -> Option<GuestMemoryLoadGuard<GuestMemoryMmap<()>>> {
        let m = self.mem.read().unwrap_or_else(|p| p.into_inner());
        m.as_ref().map(|m| m.memory())
    }

    pub fn mmu(&self, e: usize) -> MutexGuard<'_, Mmu> {
        self.mmus[e].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn audit(&self) -> bool {
        self.options.audit || self.features.load(Ordering::Relaxed) & (1 << SVMGPU_F_AUDIT) != 0
    }

    /// How long a TLB entry may stay ahead of memory before the audit counts it.
    pub fn audit_grace(&self) -> Duration {
        Duration::from_nanos(self.options.audit_grace_ns)
    }

    /// Runs an audit check over every engine's TLB (`check` gets each MMU and the tables),
    /// and adds what it found to the statistics. Takes each MMU in turn, never the state
    /// lock, so it waits at most for one instruction per engine.
    pub fn audit_tlbs(&self, check: impl Fn(&mut Mmu, &Tables<'_>) -> AuditFindings) {
        let Some(mem) = self.memory() else { return };
        let root = |asid: u32| self.root(asid);
        let tables = Tables {
            mem: &mem,
            root: &root,
            grace: self.audit_grace(),
        };
        let mut found = AuditFindings::default();
        for e in 0..self.mmus.len() {
            let f = check(&mut self.mmu(e), &tables);
            found.unflushed += f.unflushed;
            found.narrow += f.narrow;
        }
        self.stats.add(Counter::UnflushedEntries, found.unflushed);
        self.stats.add(Counter::NarrowFlushEntries, found.narrow);
    }

    pub fn coalesce(&self) -> bool {
        self.features.load(Ordering::Relaxed) & (1 << SVMGPU_F_FAULT_COALESCE) != 0
    }

    /// The root of a bound ASID.
    pub fn root(&self, asid: u32) -> Option<u64> {
        let v = self.roots.get(asid as usize)?.load(Ordering::Acquire);
        (v & 1 != 0).then_some(v & !1)
    }

    /// Delivers held records; wakes contexts waiting for completion room.
    pub fn flush(&self) {
        let Some(mem) = self.memory() else { return };
        let freed = self.outbox.flush(&mem, &self.stats);
        if freed && self.outbox.fence_room() {
            let mut st = self.lock();
            if !st.fence_waiters.is_empty() {
                let waiters = std::mem::take(&mut st.fence_waiters);
                for id in waiters {
                    if let Some(c) = st.contexts.get_mut(&id) {
                        if c.stall == Stall::Completions {
                            c.stall = Stall::None;
                        }
                    }
                    self.make_runnable(&mut st, id);
                }
            }
        }
    }

    /// Queues a completion record of the current generation (through the completion
    /// injections: at most one applies, tried in the order corrupt, duplicate, reorder).
    pub fn complete(&self, st: &State, rec: Completion) {
        const KINDS: [Kind; 3] = [
            Kind::CompletionCorrupt,
            Kind::CompletionDuplicate,
            Kind::CompletionReorder,
        ];
        if KINDS.iter().any(|&k| self.inject.active(k)) {
            let subject = Subject {
                ctx: (rec.ctx_id != CTX_NONE).then_some(rec.ctx_id),
                rec: match CompletionKind::from_u32(rec.kind) {
                    Some(CompletionKind::CommandDone) => Some(RecKind::Command),
                    Some(CompletionKind::JobDone) => Some(RecKind::Job),
                    Some(CompletionKind::Fence) => Some(RecKind::Fence),
                    None => None,
                },
                seqno: Some(rec.seqno),
                ..Subject::default()
            };
            for kind in KINDS {
                let Some(hit) = self.inject.check(kind, &subject, &self.stats) else {
                    continue;
                };
                let how = match kind {
                    Kind::CompletionCorrupt => {
                        let mut bad = rec;
                        match hit.field {
                            Field::Seqno => bad.seqno = hit.random | 1 << 63,
                            Field::Kind => bad.kind = 0xbad0 | (hit.random as u32 & 0xf),
                            Field::Status => bad.status = 0xb_ad00 | (hit.random as u32 & 0xff),
                        }
                        Injected::Corrupt(bad)
                    }
                    Kind::CompletionDuplicate => Injected::Duplicate,
                    _ => {
                        self.timer.notify_all();
                        Injected::Reorder(Instant::now() + hit.delay)
                    }
                };
                self.outbox.push_injected(st.generation, rec, how);
                return;
            }
        }
        self.outbox.push_completion(st.generation, rec);
    }

    /// Queues a droppable event (CONTEXT_ERROR, ENGINE_HANG), unless `event-overflow` drops
    /// it.
    fn post_droppable(&self, st: &State, ev: Event, subject: Subject) {
        if self
            .inject
            .check(Kind::EventOverflow, &subject, &self.stats)
            .is_some()
        {
            self.outbox.lose_event(st.generation, &self.stats);
        } else {
            self.outbox.push_event(st.generation, ev, &self.stats);
        }
    }

    /// Puts a context in the run queue if it can run and is not there yet.
    pub fn make_runnable(&self, st: &mut State, id: u32) {
        let Some(c) = st.contexts.get_mut(&id) else {
            return;
        };
        if c.runnable() && !c.queued {
            c.queued = true;
            st.runq.push_back(id);
            self.work.notify_one();
        }
    }

    /// Takes the next runnable context for engine `e`.
    pub fn pick(&self, st: &mut State, e: usize) -> Option<Pick> {
        while let Some(id) = st.runq.pop_front() {
            let generation = st.generation;
            let Some(c) = st.contexts.get_mut(&id) else {
                continue;
            };
            c.queued = false;
            if !c.runnable() {
                continue;
            }
            let (exec, fresh) = match c.exec.take() {
                Some(x) => (x, false),
                None => match c.jobs.pop_front() {
                    Some(job) => (ExecState::start(job), true),
                    None => continue,
                },
            };
            c.running = Some(e);
            // An injected hang strikes when a job starts.
            let hang = fresh
                && self.inject.active(Kind::EngineHang)
                && self
                    .inject
                    .check(
                        Kind::EngineHang,
                        &Subject {
                            asid: Some(c.asid),
                            ctx: Some(id),
                            engine: Some(e as u32),
                            seqno: Some(exec.job.seqno),
                            ..Subject::default()
                        },
                        &self.stats,
                    )
                    .is_some();
            let pick = Pick {
                ctx: id,
                uid: c.uid,
                asid: c.asid,
                generation,
                exec,
                attention: c.attention.clone(),
                hang,
            };
            st.engines[e] = Some(c.uid);
            return Some(pick);
        }
        None
    }

    /// Takes back a context from engine `e` after its slice.
    pub fn finish(&self, st: &mut State, e: usize, pick: Pick, exec: ExecState, end: SliceEnd) {
        st.engines[e] = None;
        self.idle.notify_all();
        if st.generation != pick.generation {
            return;
        }
        let Some(c) = st.contexts.get_mut(&pick.ctx).filter(|c| c.uid == pick.uid) else {
            return;
        };
        c.running = None;
        c.attention.store(false, Ordering::Release);
        let id = pick.ctx;
        match end {
            SliceEnd::Expired | SliceEnd::Stopped => c.exec = Some(exec),
            SliceEnd::Done => {
                c.exec = None;
                self.stats.inc(Counter::JobsCompleted);
                self.complete(st, job_done(exec.job.seqno, id, Status::Ok));
            }
            SliceEnd::Failed { status, address } => {
                c.exec = None;
                let f = Failure {
                    job: exec.job,
                    status,
                    engine: e as u32,
                    pc: exec.pc,
                    address,
                };
                self.fail_context(st, id, f);
            }
            SliceEnd::Fault(f) => {
                c.exec = Some(exec);
                self.raise_fault(st, id, e as u32, f);
            }
            SliceEnd::FenceBlocked => {
                c.exec = Some(exec);
                c.stall = Stall::Completions;
                st.fence_waiters.push(id);
                // Room may have appeared between the engine's check and now.
                if self.outbox.fence_room() {
                    if let Some(c) = st.contexts.get_mut(&id) {
                        c.stall = Stall::None;
                    }
                }
            }
        }
        self.advance_ops(st, id);
        self.make_runnable(st, id);
    }

    /// Raises (or coalesces, or defers) the fault of context `id`'s access.
    pub fn raise_fault(&self, st: &mut State, id: u32, engine: u32, fault: Fault) {
        let coalesce = self.coalesce();
        let Some(c) = st.contexts.get_mut(&id) else {
            return;
        };
        let w = Waiter {
            ctx: id,
            uid: c.uid,
        };
        let report = FaultReport {
            asid: c.asid,
            engine,
            fault,
        };
        match st.faults.raise(w, report, coalesce) {
            Raised::New(fid) => {
                c.stall = Stall::Fault(fid);
                self.post_fault(st, fid, id, report);
            }
            Raised::Attached(fid) => {
                c.stall = Stall::Fault(fid);
                self.stats.inc_extra(Extra::FaultsCoalesced);
            }
            Raised::Deferred => c.stall = Stall::NoFaultSlot,
        }
    }

    fn post_fault(&self, st: &State, fid: u64, ctx: u32, r: FaultReport) {
        self.stats.inc(Counter::PageFaults);
        debug!(
            "svmgpu{}: fault {fid}: ctx {ctx} asid {} va {:#x} {:?} {:?} level {}",
            self.index, r.asid, r.fault.va, r.fault.access, r.fault.reason, r.fault.level
        );
        let ev = Event::PageFault(PageFaultEvent {
            fault_id: fid,
            va: r.fault.va,
            asid: r.asid,
            ctx_id: ctx,
            engine: r.engine,
            access: r.fault.access.as_u32(),
            reason: r.fault.reason.as_u32(),
            level: r.fault.level,
            flags: 0,
            reserved: 0,
        });
        self.outbox.push_event(st.generation, ev, &self.stats);
        // A duplicate only where the backlog has room (it is not bounded by the fault table).
        if self.inject.active(Kind::FaultDuplicate) && self.outbox.event_room() {
            let subject = Subject {
                asid: Some(r.asid),
                ctx: Some(ctx),
                engine: Some(r.engine),
                va: Some((r.fault.va, r.fault.va.saturating_add(1))),
                ..Subject::default()
            };
            if self
                .inject
                .check(Kind::FaultDuplicate, &subject, &self.stats)
                .is_some()
            {
                self.outbox.push_event_if_room(st.generation, ev);
            }
        }
    }

    /// `fault-spurious` and `fault-phantom`, asked after engine `e` executed the
    /// instruction at `pc` for `pick`. A spurious fault stalls the context on its pc (which
    /// is mapped: it was just fetched; the context continues after the instruction on
    /// RESUME); a phantom fault is an event for an address no job touched, with an id that
    /// is never outstanding (a reply gets NOT_FOUND).
    pub fn inject_after_insn(&self, e: usize, pick: &Pick, pc: u64) -> Option<Fault> {
        let subject = Subject {
            asid: Some(pick.asid),
            ctx: Some(pick.ctx),
            engine: Some(e as u32),
            va: Some((pc, pc.saturating_add(8))),
            seqno: Some(pick.exec.job.seqno),
            ..Subject::default()
        };
        if self
            .inject
            .check(Kind::FaultSpurious, &subject, &self.stats)
            .is_some()
        {
            return Some(Fault {
                va: pc,
                access: AccessKind::Exec,
                reason: FaultReason::NotPresent,
                level: 0,
            });
        }
        if self.inject.active(Kind::FaultPhantom) && self.outbox.event_room() {
            let mut st = self.lock();
            if st.generation != pick.generation {
                return None;
            }
            let hit = self
                .inject
                .check(Kind::FaultPhantom, &subject, &self.stats)?;
            let fault_id = st.faults.allocate_id();
            let va = hit.phantom_va() & ((1 << VA_BITS) - 1);
            debug!(
                "svmgpu{}: phantom fault {fault_id}: ctx {} va {va:#x}",
                self.index, pick.ctx
            );
            let ev = Event::PageFault(PageFaultEvent {
                fault_id,
                va,
                asid: pick.asid,
                ctx_id: pick.ctx,
                engine: e as u32,
                access: AccessKind::Read.as_u32(),
                reason: FaultReason::NotPresent.as_u32(),
                level: 0,
                flags: 0,
                reserved: 0,
            });
            self.outbox.push_event_if_room(st.generation, ev);
            drop(st);
            self.flush();
        }
        None
    }

    /// An injected engine hang (`engine-hang`): engine `e` makes no progress on `pick`'s
    /// job. After the hang threshold it posts ENGINE_HANG (once). It lets go only when the
    /// context is destroyed, the device resets, or the device shuts down; it ignores
    /// preemption (a CTX_PREEMPT of the context does not complete).
    pub fn hang(&self, e: usize, pick: &Pick) {
        const POLL: Duration = Duration::from_millis(1);
        let started = Instant::now();
        let threshold = Duration::from_nanos(self.timing.hang_ns);
        let mut reported = false;
        loop {
            if self.shutdown.load(Ordering::Acquire) {
                return;
            }
            {
                let st = self.lock();
                let alive = st.generation == pick.generation
                    && st
                        .contexts
                        .get(&pick.ctx)
                        .is_some_and(|c| c.uid == pick.uid);
                if !alive {
                    return;
                }
                let stalled = started.elapsed();
                if !reported && stalled >= threshold {
                    reported = true;
                    self.stats.inc(Counter::EngineHangs);
                    info!(
                        "svmgpu{}: engine {e} hung on ctx {} job {}",
                        self.index, pick.ctx, pick.exec.job.seqno
                    );
                    let ev = Event::EngineHang(EngineHangEvent {
                        engine: e as u32,
                        ctx_id: pick.ctx,
                        job_seqno: pick.exec.job.seqno,
                        pc: pick.exec.pc,
                        stalled_ns: u64::try_from(stalled.as_nanos()).unwrap_or(u64::MAX),
                        ..Default::default()
                    });
                    let subject = Subject {
                        asid: Some(pick.asid),
                        ctx: Some(pick.ctx),
                        engine: Some(e as u32),
                        ..Subject::default()
                    };
                    self.post_droppable(&st, ev, subject);
                    drop(st);
                    self.flush();
                }
            }
            let left = threshold.saturating_sub(started.elapsed());
            let nap = if reported || left.is_zero() {
                POLL
            } else {
                left.min(POLL)
            };
            thread::sleep(nap);
        }
    }

    /// Raises faults that waited for a slot, while slots are free.
    pub fn raise_deferred(&self, st: &mut State) {
        let coalesce = self.coalesce();
        while let Some((w, report)) = st.faults.next_deferred() {
            let alive = st
                .contexts
                .get(&w.ctx)
                .is_some_and(|c| c.uid == w.uid && c.stall == Stall::NoFaultSlot);
            if !alive {
                continue;
            }
            let stall = match st.faults.raise(w, report, coalesce) {
                Raised::New(fid) => {
                    self.post_fault(st, fid, w.ctx, report);
                    Stall::Fault(fid)
                }
                Raised::Attached(fid) => Stall::Fault(fid),
                Raised::Deferred => Stall::NoFaultSlot,
            };
            if let Some(c) = st.contexts.get_mut(&w.ctx) {
                c.stall = stall;
            }
        }
    }

    /// Puts a context in the error state (section 9.2): JOB_DONE with the error for the
    /// failing job, CONTEXT_ERROR, JOB_SKIPPED for every queued job, its faults dropped.
    pub fn fail_context(&self, st: &mut State, id: u32, f: Failure) {
        let Some(c) = st.contexts.get_mut(&id) else {
            return;
        };
        c.error = Some(f.status);
        c.stall = Stall::None;
        c.exec = None;
        let uid = c.uid;
        let asid = c.asid;
        let skipped: Vec<Job> = c.jobs.drain(..).collect();
        debug!(
            "svmgpu{}: ctx {id} error {:?} at pc {:#x}",
            self.index, f.status, f.pc
        );
        self.stats.inc(Counter::JobsFailed);
        self.complete(st, job_done(f.job.seqno, id, f.status));
        let ev = Event::ContextError(ContextErrorEvent {
            ctx_id: id,
            asid,
            error: f.status.as_u32(),
            engine: f.engine,
            job_seqno: f.job.seqno,
            pc: f.pc,
            address: f.address,
            reserved: 0,
        });
        let subject = Subject {
            asid: Some(asid),
            ctx: Some(id),
            engine: Some(f.engine),
            seqno: Some(f.job.seqno),
            ..Subject::default()
        };
        self.post_droppable(st, ev, subject);
        for j in skipped {
            self.stats.inc(Counter::JobsFailed);
            self.complete(st, job_done(j.seqno, id, Status::JobSkipped));
        }
        st.faults.forget(uid);
        self.raise_deferred(st);
        self.advance_ops(st, id);
    }

    /// Applies a context's accepted CTX_PREEMPT/CTX_RESUME commands, in order, as far as
    /// possible now.
    pub fn advance_ops(&self, st: &mut State, id: u32) {
        loop {
            let Some(c) = st.contexts.get_mut(&id) else {
                return;
            };
            let Some(op) = c.ops.front().copied() else {
                return;
            };
            if op.preempt {
                if !op.fired {
                    return;
                }
                if let Some(status) = op.fail {
                    // Injected failure: nothing is preempted, nothing is guaranteed.
                    c.ops.pop_front();
                    self.complete(
                        st,
                        command_done(op.seqno, id, Opcode::CtxPreempt, status, 0),
                    );
                    continue;
                }
                if c.running.is_some() {
                    c.interrupt();
                    return;
                }
                c.preempted = true;
                c.ops.pop_front();
                self.stats.inc(Counter::Preemptions);
                self.complete(
                    st,
                    command_done(op.seqno, id, Opcode::CtxPreempt, Status::Ok, 0),
                );
            } else {
                c.preempted = false;
                c.ops.pop_front();
                self.complete(
                    st,
                    command_done(op.seqno, id, Opcode::CtxResume, Status::Ok, 0),
                );
                self.make_runnable(st, id);
            }
        }
    }

    /// Starts an accepted TLB invalidation: it takes its sequence number, the audit looks
    /// at the entries it concerns (spec 11.4, rule 2) before the timer can complete it, then
    /// the injections decide when and how it completes.
    fn start_invalidation(&self, seqno: u64, scope: Scope) {
        let seq = self.log.accept();
        if self.audit() {
            self.audit_tlbs(|m, t| m.audit_accept(t, scope, seq));
        }
        let mut st = self.lock();
        let now = Instant::now();
        let mut deadline = now + Duration::from_nanos(self.timing.tlb_inval_ns);
        let mut status = Status::Ok;
        let subject = Subject {
            asid: Some(match scope {
                Scope::All => ASID_ALL,
                Scope::Asid(a) | Scope::Range { asid: a, .. } => a,
            }),
            va: Some(match scope {
                Scope::Range { start, end, .. } => (start, end),
                _ => (0, 1 << VA_BITS),
            }),
            seqno: Some(seqno),
            ..Subject::default()
        };
        let inj = &self.inject;
        if inj
            .check(Kind::TlbInvalDrop, &subject, &self.stats)
            .is_some()
        {
            // Accepted, never completed: it stays outstanding until a reset.
            return;
        }
        if let Some(h) = inj.check(Kind::TlbInvalError, &subject, &self.stats) {
            status = h.status;
        }
        if let Some(h) = inj.check(Kind::TlbInvalDelay, &subject, &self.stats) {
            deadline += h.delay;
        }
        st.invals.push(PendingInval {
            seqno,
            scope,
            seq,
            deadline,
            status,
        });
        self.timer.notify_all();
    }

    /// Starts deferred work (see [`Deferred`]).
    pub fn start(&self, d: Deferred) {
        if let Deferred::Invalidate { seqno, scope } = d {
            self.start_invalidation(seqno, scope);
            return;
        }
        let mut st = self.lock();
        let now = Instant::now();
        match d {
            Deferred::Invalidate { .. } => {} // started above
            Deferred::CtxOp {
                ctx,
                uid,
                seqno,
                preempt,
            } => {
                let Some(c) = st.contexts.get_mut(&ctx).filter(|c| c.uid == uid) else {
                    return;
                };
                let mut op = CtxOp {
                    seqno,
                    preempt,
                    deadline: now + Duration::from_nanos(self.timing.preempt_ns),
                    fired: false,
                    fail: None,
                    dropped: false,
                };
                if preempt {
                    let subject = Subject {
                        asid: Some(c.asid),
                        ctx: Some(ctx),
                        seqno: Some(seqno),
                        ..Subject::default()
                    };
                    let inj = &self.inject;
                    if inj
                        .check(Kind::PreemptDrop, &subject, &self.stats)
                        .is_some()
                    {
                        op.dropped = true;
                    } else {
                        if let Some(h) = inj.check(Kind::PreemptError, &subject, &self.stats) {
                            op.fail = Some(h.status);
                        }
                        if let Some(h) = inj.check(Kind::PreemptDelay, &subject, &self.stats) {
                            op.deadline += h.delay;
                        }
                    }
                }
                c.ops.push_back(op);
                if preempt && !op.dropped {
                    st.preempt_timers.push((op.deadline, ctx, uid));
                    self.timer.notify_all();
                }
                self.advance_ops(&mut st, ctx);
            }
            Deferred::Job { ctx, uid, job } => {
                let Some(c) = st.contexts.get_mut(&ctx).filter(|c| c.uid == uid) else {
                    return;
                };
                c.jobs.push_back(job);
                self.make_runnable(&mut st, ctx);
            }
        }
        drop(st);
        self.flush();
    }

    /// CTX_DESTROY: stops the context (waiting for its engine to reach an instruction
    /// boundary) and frees it. False if there is no such context.
    pub fn destroy(&self, id: u32) -> bool {
        let mut st = self.lock();
        let Some(c) = st.contexts.remove(&id) else {
            return false;
        };
        c.interrupt();
        if let Some(e) = c.running {
            while st.engines.get(e).copied().flatten() == Some(c.uid) {
                st = self
                    .idle
                    .wait_timeout(st, Duration::from_millis(10))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        st.faults.forget(c.uid);
        self.raise_deferred(&mut st);
        for op in &c.ops {
            let opcode = if op.preempt {
                Opcode::CtxPreempt
            } else {
                Opcode::CtxResume
            };
            self.complete(&st, command_done(op.seqno, id, opcode, Status::Canceled, 0));
        }
        drop(st);
        self.flush();
        true
    }

    /// FAULT_REPLY. False if the fault is not outstanding.
    pub fn fault_reply(&self, fault_id: u64, resume: bool) -> bool {
        let mut st = self.lock();
        let Some(o) = st.faults.take(fault_id) else {
            return false;
        };
        for w in &o.waiters {
            let Some(c) = st.contexts.get_mut(&w.ctx).filter(|c| c.uid == w.uid) else {
                continue;
            };
            if c.stall != Stall::Fault(fault_id) {
                continue;
            }
            c.stall = Stall::None;
            if resume {
                self.make_runnable(&mut st, w.ctx);
            } else if let Some(x) = c.exec {
                let f = Failure {
                    job: x.job,
                    status: Status::JobFault,
                    engine: o.report.engine,
                    pc: x.pc,
                    address: o.report.fault.va,
                };
                self.fail_context(&mut st, w.ctx, f);
            }
        }
        self.stats.inc(if resume {
            Counter::FaultsResumed
        } else {
            Counter::FaultsCanceled
        });
        self.raise_deferred(&mut st);
        drop(st);
        self.flush();
        true
    }

    /// Stops everything and discards all state but statistics and counters (spec section
    /// 15). `virtio` also forgets the rings and restarts `event_seq`.
    pub fn reset(&self, reason: Option<ResetReason>) {
        let mut st = self.lock();
        if reason.is_none() {
            // A virtio reset also ends a device-initiated reset (no DEVICE_RESET: the queues
            // are reset too).
            st.resetting_until = None;
            self.resetting.store(false, Ordering::Release);
            if !st.active {
                return;
            }
        }
        st = self.stop_all(st, reason.is_none());
        st.reset_count += 1;
        self.stats.inc(Counter::Resets);
        match reason {
            Some(reason) => {
                self.outbox.push_event(
                    st.generation,
                    Event::DeviceReset(DeviceResetEvent {
                        reason: reason.as_u32(),
                        reset_count: st.reset_count,
                        ..Default::default()
                    }),
                    &self.stats,
                );
            }
            None => st.active = false,
        }
        info!("svmgpu{}: reset ({reason:?})", self.index);
        drop(st);
        self.flush();
    }

    /// Starts a device-initiated reset (`device-reset` injection): everything is stopped and
    /// discarded now, control requests are answered `RESETTING` for `duration`, then the
    /// timer queues DEVICE_RESET (`DEVICE_INITIATED`) and the device serves again.
    pub fn begin_device_reset(&self, duration: Duration) {
        let mut st = self.lock();
        self.resetting.store(true, Ordering::Release);
        st = self.stop_all(st, false);
        st.reset_count += 1;
        self.stats.inc(Counter::Resets);
        st.resetting_until = Some(Instant::now() + duration);
        info!(
            "svmgpu{}: device-initiated reset started ({} µs)",
            self.index,
            duration.as_micros()
        );
        self.timer.notify_all();
    }

    /// Ends a device-initiated reset whose time is up: queues DEVICE_RESET, then lets
    /// control requests through. True if it ended one.
    pub fn end_device_reset(&self, st: &mut State, now: Instant) -> bool {
        if st.resetting_until.is_none_or(|d| d > now) {
            return false;
        }
        st.resetting_until = None;
        self.outbox.push_event(
            st.generation,
            Event::DeviceReset(DeviceResetEvent {
                reason: ResetReason::DeviceInitiated.as_u32(),
                reset_count: st.reset_count,
                ..Default::default()
            }),
            &self.stats,
        );
        self.resetting.store(false, Ordering::Release);
        info!("svmgpu{}: device-initiated reset done", self.index);
        true
    }

    /// The common part of every reset: discard the records, contexts, faults, pending
    /// commands and bindings, wait for the engines to let go, empty the TLBs.
    fn stop_all<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        virtio: bool,
    ) -> MutexGuard<'a, State> {
        self.outbox.discard(virtio);
        st.generation = self.outbox.generation();
        for c in st.contexts.values() {
            c.interrupt();
        }
        st.contexts.clear();
        st.runq.clear();
        st.faults.clear();
        st.invals.clear();
        st.preempt_timers.clear();
        st.fence_waiters.clear();
        for r in &self.roots {
            r.store(0, Ordering::Release);
        }
        // Engines finish the instruction in flight and see the new generation.
        while st.engines.iter().any(Option::is_some) {
            st = self
                .idle
                .wait_timeout(st, Duration::from_millis(10))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        for e in 0..self.mmus.len() {
            self.mmu(e).tlb_mut().invalidate(Scope::All);
        }
        st
    }
}

impl Gpu {
    /// A device with socket index `index`; starts its engine and timer threads.
    pub fn new(index: u32, options: &DeviceOptions) -> Result<Self, GpuError> {
        options.validate()?;
        let config = options.config_space(index);
        let mmus = (0..options.engines)
            .map(|_| {
                // Geometry was validated above.
                let eviction = if options.tlb_no_evict {
                    Eviction::Never
                } else {
                    Eviction::Lru
                };
                Mmu::with_eviction(options.tlb_entries, options.tlb_ways, eviction)
                    .map(Mutex::new)
                    .map_err(|e| GpuError::Thread(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            index,
            options: options.clone(),
            config,
            config_bytes: config.to_bytes(),
            stats: Stats::with_engines(options.engines as usize),
            timing: options.timing(),
            mem: RwLock::new(None),
            state: Mutex::new(State {
                generation: 0,
                contexts: HashMap::new(),
                runq: VecDeque::new(),
                engines: vec![None; options.engines as usize],
                faults: FaultTable::new(options.max_faults as usize),
                invals: Vec::new(),
                preempt_timers: Vec::new(),
                fence_waiters: Vec::new(),
                next_uid: 1,
                reset_count: 0,
                active: false,
                resetting_until: None,
            }),
            work: Condvar::new(),
            timer: Condvar::new(),
            idle: Condvar::new(),
            mmus,
            roots: (0..options.asids).map(|_| AtomicU64::new(0)).collect(),
            log: InvalLog::new(),
            outbox: Outbox::new(options.max_faults),
            features: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
            inject: Injector::new(index),
            resetting: AtomicBool::new(false),
        });
        let gpu = Gpu {
            shared: shared.clone(),
            threads: Mutex::new(Vec::new()),
        };
        let mut threads = Vec::new();
        for e in 0..options.engines as usize {
            let sh = shared.clone();
            threads.push(
                thread::Builder::new()
                    .name(format!("svmgpu{index}-engine{e}"))
                    .spawn(move || crate::engine::run(&sh, e))
                    .map_err(|e| GpuError::Thread(e.to_string()))?,
            );
        }
        let sh = shared.clone();
        threads.push(
            thread::Builder::new()
                .name(format!("svmgpu{index}-timer"))
                .spawn(move || crate::timer::run(&sh))
                .map_err(|e| GpuError::Thread(e.to_string()))?,
        );
        *gpu.threads.lock().unwrap_or_else(|p| p.into_inner()) = threads;
        Ok(gpu)
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Socket index.
    pub fn index(&self) -> u32 {
        self.shared.index
    }

    /// Options it was created with.
    pub fn options(&self) -> &DeviceOptions {
        &self.shared.options
    }

    /// Config space.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Config space bytes.
    pub fn config_bytes(&self) -> &[u8; CONFIG_SIZE] {
        &self.shared.config_bytes
    }

    /// A vhost-user GET_CONFIG answer: exactly `size` bytes.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        read_config(&self.shared.config_bytes, offset, size)
    }

    /// Statistics.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Fault-injection rules (spec section 16.3).
    pub fn injector(&self) -> &Injector {
        &self.shared.inject
    }

    /// True while a device-initiated reset is in progress.
    pub fn resetting(&self) -> bool {
        self.shared.resetting.load(Ordering::Acquire)
    }

    /// Uses this guest memory from now on (SET_MEM_TABLE). TLBs are flushed, since what
    /// they point to may no longer be RAM.
    pub fn set_memory(&self, mem: Option<Memory>) {
        let some = mem.is_some();
        *self.shared.mem.write().unwrap_or_else(|p| p.into_inner()) = mem;
        for e in 0..self.shared.mmus.len() {
            self.shared.mmu(e).tlb_mut().invalidate(Scope::All);
        }
        if some {
            self.shared.lock().active = true;
        }
    }

    /// The device feature bits the driver accepted.
    pub fn set_features(&self, features: u64) {
        self.shared.features.store(features, Ordering::Relaxed);
        // Audit mode may have started: the timer schedules the audit's scans.
        let _st = self.shared.lock();
        self.shared.timer.notify_all();
    }

    /// Delivers held events and completions into the connection's rings.
    pub fn attach_and_flush(
        &self,
        eventq: &vhost_user_backend::VringRwLock,
        complq: &vhost_user_backend::VringRwLock,
    ) {
        self.shared.outbox.attach(eventq, complq);
        self.shared.flush();
    }

    /// Starts deferred work of a control request whose response is in the used ring.
    pub fn start(&self, d: Deferred) {
        self.shared.start(d);
    }

    /// A virtio reset or a frontend disconnect (spec section 15.2).
    pub fn virtio_reset(&self) {
        self.shared.reset(None);
    }

    /// Records held for the driver (events, completions).
    pub fn held_records(&self) -> (usize, usize) {
        self.shared.outbox.held()
    }

    /// Per-device statistics as JSON, with the device-only counters.
    pub fn stats_json(&self) -> String {
        self.shared.stats.to_json(self.shared.index)
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            // Wake every waiter under the lock, so none misses the flag.
            let _st = self.shared.lock();
            self.shared.work.notify_all();
            self.shared.timer.notify_all();
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::handle_request;
    use crate::mmu::walker::tests::{ram, Pt};
    use svmgpu_spec::isa::Insn;
    use svmgpu_spec::pte::Perms;
    use svmgpu_spec::{
        AsidBindReq, CtrlHeader, CtxCreateReq, JobSubmitReq, RespHeader, TlbInvalidateReq,
    };
    use vm_memory::{Bytes, GuestAddress};

    fn send(g: &Gpu, op: Opcode, body: &[u8]) -> u32 {
        let mut req = CtrlHeader {
            opcode: op.as_u32(),
            flags: 0,
            seqno: 9,
        }
        .to_bytes()
        .to_vec();
        req.extend_from_slice(body);
        let (resp, d) = handle_request(g, &req, 256);
        if let Some(d) = d {
            g.start(d);
        }
        RespHeader::decode(resp.bytes()).unwrap().status
    }

    fn wait_held(g: &Gpu, completions: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while g.held_records().1 < completions {
            assert!(Instant::now() < deadline, "{:?}", g.held_records());
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn jobs_and_invalidations_without_a_connection() {
        let o = DeviceOptions {
            engines: 1,
            tlb_inval_latency_ns: 0,
            walk_latency_ns: 0,
            insn_cost_ns: 0,
            ..Default::default()
        };
        let g = Gpu::new(0, &o).unwrap();
        let mem = ram();
        let mut pt = Pt::new();
        let rw = Perms {
            writable: true,
            no_exec: false,
        };
        pt.map_4k(&mem, 0x1000, 0x40_0000, rw);
        pt.map_4k(&mem, 0x2000, 0x41_0000, rw);
        g.set_memory(Some(GuestMemoryAtomic::new(mem.clone())));
        let bind = AsidBindReq {
            asid: 1,
            flags: 0,
            pt_root: pt.root,
        };
        assert_eq!(send(&g, Opcode::AsidBind, &bind.to_bytes()), 0);
        let create = CtxCreateReq {
            ctx_id: 3,
            asid: 1,
            flags: 0,
            reserved: 0,
        };
        assert_eq!(send(&g, Opcode::CtxCreate, &create.to_bytes()), 0);
        let mut batch = [0u8; 32];
        let n = Insn::Store {
            size64: true,
            va: 0x2008,
            value: 77,
        }
        .encode_bytes(&mut batch)
        .unwrap();
        Insn::End.encode_bytes(&mut batch[n..]).unwrap();
        mem.write_slice(&batch, GuestAddress(0x40_0000)).unwrap();
        let job = JobSubmitReq {
            ctx_id: 3,
            flags: 0,
            batch_va: 0x1000,
            batch_len: 32,
            reserved: 0,
        };
        assert_eq!(send(&g, Opcode::JobSubmit, &job.to_bytes()), 0);
        // No rings: the JOB_DONE is held, the store is done.
        wait_held(&g, 1);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x41_0008)).unwrap(), 77);
        let inv = TlbInvalidateReq {
            asid: 1,
            flags: 0,
            va: 0x1000,
            size: 0x2000,
        };
        assert_eq!(send(&g, Opcode::TlbInvalidate, &inv.to_bytes()), 0);
        wait_held(&g, 2);
        assert_eq!(g.stats().get(Counter::TlbInvalidations), 1);
        assert_eq!(g.stats().get(Counter::TlbEntriesInvalidated), 2);
        // A virtio reset discards what is held.
        g.virtio_reset();
        assert_eq!(g.held_records(), (0, 0));
        assert_eq!(g.stats().get(Counter::Resets), 1);
    }

    #[test]
    fn new_validates_and_stops() {
        let bad = DeviceOptions {
            tlb_ways: 3,
            ..Default::default()
        };
        assert!(matches!(Gpu::new(0, &bad), Err(GpuError::Options(_))));
        let g = Gpu::new(2, &DeviceOptions::default()).unwrap();
        assert_eq!(g.index(), 2);
        assert_eq!(g.config().device_index, 2);
        assert_eq!(g.read_config(8, 4), vec![2, 0, 0, 0]);
        drop(g); // joins its threads
    }
}
