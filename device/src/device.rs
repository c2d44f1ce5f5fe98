// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device: state that outlives vhost-user connections (identity, config space,
//! statistics, ASIDs, contexts, faults, TLBs) and the rules that tie them together
//! (scheduling, preemption, page faults, context errors, resets). Its threads — one per
//! engine ([`crate::engine`]), one timer ([`crate::timer`]), and the vhost-user worker that
//! serves the control queue — share one [`Device`]; [`crate::gpu::Gpu`] owns them.
//!
//! Locks, always taken in this order (a lock is only ever taken while holding locks above
//! it in this list):
//! 0. the vhost-user backend's ring marks (`stopped` in [`crate::vhu_svmgpu`]), held across
//!    the pause, resume or virtio reset that a ring stop, restart or `RESET_DEVICE` causes,
//!    so that these happen in the order the frontend's messages and the ring events came;
//! 1. `state` (this module's [`State`]);
//! 2. an engine's MMU (`mmus[e]`; one at a time) — an engine holds its own only for one
//!    instruction, so whoever takes it (invalidation, reset, audit) waits for at most the
//!    instruction in flight, and never longer than [`ENGINE_STOP_TIMEOUT`];
//! 3. the outbox's delivery lock, then its backlog lock (producers take only the latter);
//! 4. a vring's lock (vhost-user-backend's `VringRwLock`).
//!
//! Leaves, taken under any of those and holding nothing else: the injector's rule lock, the
//! invalidation log's lock, a context's `Attention` thread slot and the guest-memory
//! `RwLock`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info};
use svmgpu_spec::{
    AccessKind, Completion, CompletionKind, Config, ContextErrorEvent, DeviceResetEvent,
    EngineHangEvent, Event, FaultReason, Opcode, PageFaultEvent, ResetReason, Status, ASID_ALL,
    CONFIG_SIZE, CTX_F_LONG_RUNNING, CTX_NONE, PAGE_SIZE_4K, SVMGPU_F_AUDIT,
    SVMGPU_F_FAULT_COALESCE, VA_BITS,
};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryLoadGuard,
    GuestMemoryMmap,
};

use crate::config::{DeviceOptions, OptionsError};
use crate::context::{Attention, Context, CtxOp, ExecState, Job, Stall};
use crate::fault::{FaultReport, FaultTable, FaultTimes, Raised, Waiter};
use crate::inject::{Field, Injector, Kind, RecKind, Subject};
use crate::mmu::audit::InvalLog;
use crate::mmu::tlb::Eviction;
use crate::mmu::{AuditFindings, Fault, Mmu, Scope, Tables};
use crate::outbox::{Injected, Outbox};
use crate::records::{command_done, fence_done, job_done};
use crate::stats::{Counter, Extra, Stats};
use crate::timing::Timing;

/// Longest wait for an engine to reach an instruction boundary (CTX_DESTROY, resets, TLB
/// invalidation): one instruction takes microseconds; an engine that takes longer is stuck
/// and the device resets itself.
pub const ENGINE_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Guest memory as the device sees it.
pub type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// An invalidation accepted and not yet completed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PendingInval {
    seqno: u64,
    scope: Scope,
    seq: u64,
    deadline: Instant,
    /// When it was accepted (its response in the used ring): the device-side timing of
    /// invalidations (`tlb_inval_device_ns`, `tlb_inval_late_ns`, JSON only).
    accepted: Instant,
    /// `OK`, or the failure an injection (`tlb-inval-error`) completes it with.
    status: Status,
}

/// Work of an accepted command, started after its control response is in the used ring
/// (so that no completion can overtake the response that accepted it): `Gpu::start`, or
/// `Gpu::cancel` if the response could not be written. It holds the command's slot
/// (see [`crate::budget`]) and belongs to the reset generation it was accepted in: after a
/// reset it is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deferred {
    generation: u64,
    work: Work,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
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

/// Mutable device state, under one lock. Only this module looks inside; the threads that
/// lock it hand it back to [`Device`]'s methods.
#[derive(Debug)]
pub(crate) struct State {
    /// Reset generation (equal to the outbox's).
    generation: u64,
    contexts: HashMap<u32, Context>,
    runq: VecDeque<u32>,
    /// The context uid each engine runs.
    engines: Vec<Option<u64>>,
    faults: FaultTable,
    invals: Vec<PendingInval>,
    /// Preemption deadlines: (deadline, ctx, uid).
    preempt_timers: Vec<(Instant, u32, u64)>,
    fence_waiters: Vec<u32>,
    next_uid: u64,
    reset_count: u64,
    /// A connection has used the device since the last virtio reset.
    active: bool,
    /// A device-initiated reset is in progress until then (DEVICE_RESET is queued then).
    resetting_until: Option<Instant>,
    /// The VMM stopped the rings (a pause, spec 6.14.4): engines run nothing.
    paused: bool,
}

/// Why the device refused a command: the status the driver gets, and what was wrong (for
/// the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub status: Status,
    pub why: &'static str,
}

const fn refuse(status: Status, why: &'static str) -> Refusal {
    Refusal { status, why }
}

/// What an engine took from the run queue.
#[derive(Clone, Debug)]
pub(crate) struct Pick {
    pub ctx: u32,
    pub uid: u64,
    pub asid: u32,
    pub generation: u64,
    pub exec: ExecState,
    pub attention: Arc<Attention>,
    /// Injected engine hang: the engine makes no progress on this job.
    pub hang: bool,
    /// `CTX_F_LONG_RUNNING`: the job timeout does not apply.
    pub long_running: bool,
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

/// One device: what its threads share.
#[derive(Debug)]
pub(crate) struct Device {
    index: u32,
    options: DeviceOptions,
    config: Config,
    config_bytes: [u8; CONFIG_SIZE],
    stats: Stats,
    timing: Timing,
    mem: RwLock<Option<Memory>>,
    state: Mutex<State>,
    /// Engines wait here for runnable contexts.
    work: Condvar,
    /// The timer waits here for the next deadline.
    timer: Condvar,
    /// Control waits here for engines to let go of contexts.
    idle: Condvar,
    mmus: Vec<Mutex<Mmu>>,
    /// Per ASID: `root | 1` when bound, 0 when not (read by engines on every walk).
    roots: Vec<AtomicU64>,
    log: InvalLog,
    outbox: Outbox,
    /// Device feature bits the driver accepted.
    features: AtomicU64,
    shutdown: AtomicBool,
    /// Fault-injection rules.
    inject: Injector,
    /// Per engine: its TLB must be emptied before it runs anything (it was stuck in an
    /// instruction when a reset emptied the others).
    tlb_flush_pending: Vec<AtomicBool>,
    /// [`ENGINE_STOP_TIMEOUT`] (shorter in tests).
    stop_timeout: Duration,
    /// Test hook (see [`Device::fail_next_slice`]).
    #[cfg(test)]
    fail_next_slice: AtomicBool,
    /// A device-initiated reset is in progress (control requests get `RESETTING`).
    resetting: AtomicBool,
}

impl Device {
    /// The device with socket index `index` (its threads are started by the caller).
    pub fn new(index: u32, options: &DeviceOptions) -> Result<Self, OptionsError> {
        options.validate()?;
        let config = options.config_space(index);
        let eviction = if options.tlb_no_evict {
            Eviction::Never
        } else {
            Eviction::Lru
        };
        let mut mmus = Vec::new();
        for _ in 0..options.engines {
            let mmu = Mmu::with_eviction(options.tlb_entries, options.tlb_ways, eviction).map_err(
                |_| OptionsError::TlbGeometry {
                    entries: options.tlb_entries,
                    ways: options.tlb_ways,
                },
            )?;
            mmus.push(Mutex::new(mmu));
        }
        Ok(Self {
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
                paused: false,
            }),
            work: Condvar::new(),
            timer: Condvar::new(),
            idle: Condvar::new(),
            mmus,
            roots: (0..options.asids).map(|_| AtomicU64::new(0)).collect(),
            log: InvalLog::new(),
            outbox: Outbox::new(options.max_faults, options.max_contexts),
            features: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
            inject: Injector::new(index),
            tlb_flush_pending: (0..options.engines)
                .map(|_| AtomicBool::new(false))
                .collect(),
            stop_timeout: ENGINE_STOP_TIMEOUT,
            #[cfg(test)]
            fail_next_slice: AtomicBool::new(false),
            resetting: AtomicBool::new(false),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- what the other parts of the backend read -------------------------------------

    /// Socket index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Options it was created with.
    pub fn options(&self) -> &DeviceOptions {
        &self.options
    }

    /// Config space.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Config space bytes.
    pub fn config_bytes(&self) -> &[u8; CONFIG_SIZE] {
        &self.config_bytes
    }

    /// Statistics.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The timing model.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Fault-injection rules.
    pub fn injector(&self) -> &Injector {
        &self.inject
    }

    /// Invalidation sequence numbers (the audit's log).
    pub fn log(&self) -> &InvalLog {
        &self.log
    }

    /// Records for the driver and the budget of slots.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// True while a device-initiated reset is in progress.
    pub fn resetting(&self) -> bool {
        self.resetting.load(Ordering::Acquire)
    }

    /// True once the device is shutting down (its threads end).
    pub fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// Asks every thread of the device to end.
    pub fn shut_down(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        // Wake every waiter under the lock, so none misses the flag.
        let _st = self.lock();
        self.work.notify_all();
        self.timer.notify_all();
        self.idle.notify_all();
    }

    /// Uses this guest memory from now on (SET_MEM_TABLE). TLBs are flushed, since what
    /// they point to may no longer be RAM.
    pub fn set_memory(&self, mem: Option<Memory>) {
        let some = mem.is_some();
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = mem;
        self.invalidate_tlbs(Scope::All);
        if some {
            self.lock().active = true;
        }
    }

    /// The device feature bits the driver accepted.
    pub fn set_features(&self, features: u64) {
        self.features.store(features, Ordering::Relaxed);
        // Audit mode may have started: the timer schedules the audit's scans.
        let _st = self.lock();
        self.timer.notify_all();
    }

    /// True if a FENCE with NOTIFY may post now.
    pub fn fence_room(&self) -> bool {
        self.outbox.budget().fence_room()
    }

    // ---- engines ----------------------------------------------------------------------

    /// The next context engine `e` runs: waits for one; `None` when the device shuts down.
    pub fn next_pick(&self, e: usize) -> Option<Pick> {
        let mut st = self.lock();
        loop {
            if self.shutting_down() {
                return None;
            }
            if let Some(p) = self.pick(&mut st, e) {
                if self.tlb_flush_pending[e].swap(false, Ordering::AcqRel) {
                    self.mmu(e).tlb_mut().invalidate(Scope::All);
                }
                return Some(p);
            }
            st = self.work.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Engine `e` ends its slice of `pick`: the context's state and what happens next.
    pub fn end_slice(&self, e: usize, pick: Pick, exec: ExecState, end: SliceEnd) {
        {
            let mut st = self.lock();
            self.finish(&mut st, e, pick, exec, end);
        }
        self.flush();
    }

    /// Engine `e` failed (its thread panicked) while running `pick`: the context's state is
    /// unknown, so the device resets itself (spec 6.14.1) and the engine starts afresh.
    pub fn engine_failed(&self, e: usize, pick: &Pick) {
        log::error!(
            "svmgpu{}: engine {e} failed while running context {}: device-initiated reset",
            self.index,
            pick.ctx
        );
        {
            let mut st = self.lock();
            st.engines[e] = None;
            self.idle.notify_all();
        }
        self.tlb_flush_pending[e].store(true, Ordering::Release);
        self.begin_device_reset(Duration::ZERO);
    }

    /// Test hook: the next slice engine threads run panics (to check that a failing engine
    /// is contained).
    #[cfg(test)]
    pub fn fail_next_slice(&self) {
        self.fail_next_slice.store(true, Ordering::Release);
    }

    /// Test hook: true once, after [`Device::fail_next_slice`].
    pub fn take_slice_failure(&self) -> bool {
        #[cfg(test)]
        {
            self.fail_next_slice.swap(false, Ordering::AcqRel)
        }
        #[cfg(not(test))]
        {
            false
        }
    }

    /// A job that burns host CPU ran a slice alone on engine `e`: the engine rests for
    /// `rest` before it takes the job again, unless other work comes (a runaway job costs
    /// time slices, not a whole host core, spec 6.17). Woken by new work and by attention.
    pub fn rest(&self, pick: &Pick, rest: Duration) {
        let until = Instant::now() + rest;
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            if now >= until || !st.runq.is_empty() || pick.attention.asked() || self.shutting_down()
            {
                return;
            }
            // In steps of at most a millisecond: attention does not signal this condvar.
            let step = (until - now).min(Duration::from_millis(1));
            st = self
                .work
                .wait_timeout(st, step)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// A FENCE with NOTIFY of `pick`'s job `seqno` executed: its completion.
    pub fn post_fence(&self, pick: &Pick, seqno: u64, value: u64) {
        {
            let st = self.lock();
            if st.generation == pick.generation {
                self.complete(&st, fence_done(seqno, pick.ctx, value));
            }
        }
        self.flush();
    }

    // ---- the timer --------------------------------------------------------------------

    /// Preemptions whose latency elapsed take effect.
    pub fn fire_preemptions(&self, st: &mut State, now: Instant) {
        let mut fired = Vec::new();
        st.preempt_timers.retain(|&(d, ctx, uid)| {
            if d <= now {
                fired.push((ctx, uid));
                false
            } else {
                true
            }
        });
        for (ctx, uid) in fired {
            if let Some(c) = st.contexts.get_mut(&ctx).filter(|c| c.uid == uid) {
                for op in c
                    .ops
                    .iter_mut()
                    .filter(|o| o.preempt && !o.dropped && o.deadline <= now)
                {
                    op.fired = true;
                }
                self.advance_ops(st, ctx);
            }
        }
    }

    /// The invalidations whose latency elapsed, and the generation they belong to.
    pub fn take_due_invalidations(&self, st: &mut State, now: Instant) -> (Vec<PendingInval>, u64) {
        let mut due = Vec::new();
        st.invals.retain(|i| {
            if i.deadline <= now {
                due.push(*i);
                false
            } else {
                true
            }
        });
        (due, st.generation)
    }

    /// Completes invalidations of generation `generation` (spec 6.10.2): drops the covered
    /// entries from every engine's TLB — each MMU lock waits for the instruction in flight
    /// on that engine, so every access that used an old translation has finished — records
    /// them for the audit and posts COMMAND_DONE. Called without the state lock.
    pub fn complete_invalidations(&self, due: &[PendingInval], generation: u64) {
        for inv in due {
            if inv.status != Status::Ok {
                // Injected failure (`tlb-inval-error`): nothing is dropped and the audit does
                // not count it as completed; the completion guarantees nothing (spec 6.10.2).
                let st = self.lock();
                if st.generation == generation {
                    let done =
                        command_done(inv.seqno, CTX_NONE, Opcode::TlbInvalidate, inv.status, 0);
                    self.complete(&st, done);
                }
                continue;
            }
            let mut dropped = 0;
            for e in 0..self.mmus.len() {
                let Some(mut m) = self.mmu_within(e, self.stop_timeout) else {
                    // The reset discards this invalidation and every other pending one.
                    self.engine_stuck(e);
                    return;
                };
                dropped += m.tlb_mut().invalidate(inv.scope);
            }
            self.log.complete(inv.scope, inv.seq);
            if self.audit() {
                // What it left behind (spec 6.10.4, rule 3), before its completion is posted.
                self.audit_tlbs(|m, t| m.audit_complete(t, inv.seq));
            }
            self.stats.inc(Counter::TlbInvalidations);
            self.stats.add(Counter::TlbEntriesInvalidated, dropped);
            let done_at = Instant::now();
            let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            self.stats.add_extra(
                Extra::TlbInvalDeviceNs,
                ns(done_at.saturating_duration_since(inv.accepted)),
            );
            self.stats.add_extra(
                Extra::TlbInvalLateNs,
                ns(done_at.saturating_duration_since(inv.deadline)),
            );
            let st = self.lock();
            if st.generation == generation {
                let done = command_done(
                    inv.seqno,
                    CTX_NONE,
                    Opcode::TlbInvalidate,
                    Status::Ok,
                    dropped,
                );
                self.complete(&st, done);
            }
        }
        self.flush();
    }

    /// The earliest deadline the timer has to act on.
    pub fn next_deadline(&self, st: &State) -> Option<Instant> {
        st.invals
            .iter()
            .map(|i| i.deadline)
            .chain(st.preempt_timers.iter().map(|p| p.0))
            .chain(st.resetting_until)
            .chain(self.outbox.held_back_deadline())
            .min()
    }

    /// The timer waits until `until` (or until woken).
    pub fn wait_timer<'a>(
        &self,
        st: MutexGuard<'a, State>,
        until: Option<Instant>,
    ) -> MutexGuard<'a, State> {
        match until {
            Some(d) => {
                let wait = d.saturating_duration_since(Instant::now());
                self.timer
                    .wait_timeout(st, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0)
            }
            None => self.timer.wait(st).unwrap_or_else(|p| p.into_inner()),
        }
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
            // A stuck engine (see `engine_stuck`) is not audited meanwhile.
            if let Some(mut m) = self.mmu_within(e, self.stop_timeout) {
                let f = check(&mut m, &tables);
                found.unflushed += f.unflushed;
                found.narrow += f.narrow;
            }
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
        if freed && self.outbox.budget().fence_room() {
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
        if st.paused {
            return None;
        }
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
            if let Some(t) = c.resumed.take() {
                self.count_retry(&t);
            }
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
                long_running: c.flags & CTX_F_LONG_RUNNING != 0,
            };
            st.engines[e] = Some(c.uid);
            return Some(pick);
        }
        None
    }

    /// An access that waited on a fault answered RESUME is retried now: the fault-service
    /// statistics (spec 6.18).
    fn count_retry(&self, t: &FaultTimes) {
        let now = Instant::now();
        let ns = |a: Instant, b: Instant| {
            u64::try_from(b.saturating_duration_since(a).as_nanos()).unwrap_or(u64::MAX)
        };
        // An event never delivered (the reply came first: an injected or guessed one)
        // counts as delivered when it was raised.
        let delivered = t.delivered.unwrap_or(t.raised).min(t.replied);
        self.stats.inc(Counter::FaultsRetried);
        self.stats.add(Counter::FaultRetryNs, ns(t.raised, now));
        self.stats
            .add(Counter::FaultDriverNs, ns(delivered, t.replied));
        self.stats
            .add_extra(Extra::FaultDeliverNs, ns(t.raised, delivered));
        self.stats
            .add_extra(Extra::FaultResumeNs, ns(t.replied, now));
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
        c.attention.clear();
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
                if self.outbox.budget().fence_room() {
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
        match st.faults.raise(w, report, coalesce, Instant::now()) {
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
            let stall = match st.faults.raise(w, report, coalesce, Instant::now()) {
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

    /// Puts a context in the error state (section 6.8.2): JOB_DONE with the error for the
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
        self.forget_faults(st, uid);
        self.raise_deferred(st);
        self.advance_ops(st, id);
    }

    /// Drops the faults only context `uid` waited on; their undelivered events go too.
    fn forget_faults(&self, st: &mut State, uid: u64) {
        for id in st.faults.forget(uid) {
            self.outbox.withdraw_fault(id);
        }
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
    /// at the entries it concerns (spec 6.10.4, rule 2) before the timer can complete it, then
    /// the injections decide when and how it completes.
    fn start_invalidation(&self, generation: u64, seqno: u64, scope: Scope) {
        if self.lock().generation != generation {
            return;
        }
        let seq = self.log.accept();
        if self.audit() {
            self.audit_tlbs(|m, t| m.audit_accept(t, scope, seq));
        }
        let mut st = self.lock();
        if st.generation != generation {
            return;
        }
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
            accepted: now,
            status,
        });
        self.timer.notify_all();
    }

    /// Starts the work of an accepted command (its response is in the used ring). Work of
    /// an earlier reset generation is dropped: the reset discarded the command and freed its
    /// slot.
    pub fn start(&self, d: Deferred) {
        if let Work::Invalidate { seqno, scope } = d.work {
            self.start_invalidation(d.generation, seqno, scope);
            return;
        }
        let mut st = self.lock();
        if st.generation != d.generation {
            return;
        }
        let now = Instant::now();
        match d.work {
            Work::Invalidate { .. } => {} // started above
            Work::CtxOp {
                ctx,
                uid,
                seqno,
                preempt,
            } => {
                let Some(c) = st.contexts.get_mut(&ctx).filter(|c| c.uid == uid) else {
                    // Destroyed between its response and now: canceled, as the destroy
                    // would have done (spec 6.4.5); the slot comes back with the completion.
                    let op = if preempt {
                        Opcode::CtxPreempt
                    } else {
                        Opcode::CtxResume
                    };
                    self.complete(&st, command_done(seqno, ctx, op, Status::Canceled, 0));
                    drop(st);
                    self.flush();
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
            Work::Job { ctx, uid, job } => {
                let Some(c) = st.contexts.get_mut(&ctx).filter(|c| c.uid == uid) else {
                    // Destroyed between its response and now: discarded without JOB_DONE.
                    self.outbox.budget().give_jobs(ctx, 1);
                    return;
                };
                c.jobs.push_back(job);
                self.make_runnable(&mut st, ctx);
            }
        }
        drop(st);
        self.flush();
    }

    /// Gives back the slot of accepted work that will never start (its response could not
    /// be written into the chain: the driver never learnt it was accepted).
    pub fn cancel(&self, d: Deferred) {
        let st = self.lock();
        if st.generation != d.generation {
            return;
        }
        match d.work {
            Work::Invalidate { .. } | Work::CtxOp { .. } => self.outbox.budget().give_async(),
            Work::Job { ctx, .. } => self.outbox.budget().give_jobs(ctx, 1),
        }
    }

    // ---- commands (spec section 6.4): the state each one changes, and its refusals ------

    /// CTX_CREATE of a validated request.
    pub fn create_context(&self, id: u32, asid: u32, flags: u32) -> Result<(), Refusal> {
        let mut st = self.lock();
        if st.contexts.contains_key(&id) {
            return Err(refuse(Status::AlreadyExists, "context id in use"));
        }
        if self.root(asid).is_none() {
            return Err(refuse(Status::BadState, "ASID not bound"));
        }
        let uid = st.next_uid;
        st.next_uid += 1;
        st.contexts.insert(id, Context::new(id, uid, asid, flags));
        Ok(())
    }

    /// CTX_PREEMPT (`preempt`) or CTX_RESUME accepted: takes an asynchronous slot.
    pub fn accept_ctx_op(&self, ctx: u32, preempt: bool, seqno: u64) -> Result<Deferred, Refusal> {
        let st = self.lock();
        let uid = st
            .contexts
            .get(&ctx)
            .map(|c| c.uid)
            .ok_or(refuse(Status::NotFound, "no such context"))?;
        self.take_async_slot()?;
        Ok(Deferred {
            generation: st.generation,
            work: Work::CtxOp {
                ctx,
                uid,
                seqno,
                preempt,
            },
        })
    }

    /// TLB_INVALIDATE accepted: takes an asynchronous slot.
    pub fn accept_invalidation(&self, seqno: u64, scope: Scope) -> Result<Deferred, Refusal> {
        let st = self.lock();
        self.take_async_slot()?;
        Ok(Deferred {
            generation: st.generation,
            work: Work::Invalidate { seqno, scope },
        })
    }

    fn take_async_slot(&self) -> Result<(), Refusal> {
        if self.outbox.budget().take_async() {
            Ok(())
        } else {
            Err(refuse(
                Status::Busy,
                "too many asynchronous commands outstanding",
            ))
        }
    }

    /// JOB_SUBMIT accepted: takes a job slot of the context id.
    pub fn accept_job(&self, ctx: u32, job: Job) -> Result<Deferred, Refusal> {
        let st = self.lock();
        let c = st
            .contexts
            .get(&ctx)
            .ok_or(refuse(Status::NotFound, "no such context"))?;
        if c.error.is_some() {
            return Err(refuse(Status::BadState, "context in the error state"));
        }
        if !self.outbox.budget().take_job(ctx) {
            return Err(refuse(
                Status::Busy,
                "job queue full (jobs queued, running, or with their JOB_DONE undelivered)",
            ));
        }
        Ok(Deferred {
            generation: st.generation,
            work: Work::Job {
                ctx,
                uid: c.uid,
                job,
            },
        })
    }

    /// ASID_BIND of a validated root: checks that the root table is guest RAM.
    pub fn bind_asid(&self, asid: u32, root: u64) -> Result<(), Refusal> {
        let in_ram = self
            .memory()
            .is_some_and(|m| m.check_range(GuestAddress(root), PAGE_SIZE_4K as usize));
        if !in_ram {
            return Err(refuse(Status::BadAddress, "root table is not guest RAM"));
        }
        if let Some(slot) = self.roots.get(asid as usize) {
            slot.store(root | 1, Ordering::Release);
        }
        Ok(())
    }

    /// ASID_UNBIND: unbinds under the state lock (no context can be created on it any
    /// more), then drops its TLB entries without holding that lock, so that control,
    /// engines and the timer are not held up while each engine finishes its instruction.
    pub fn unbind_asid(&self, asid: u32) -> Result<(), Refusal> {
        {
            let st = self.lock();
            if self.root(asid).is_none() {
                return Err(refuse(Status::NotFound, "ASID not bound"));
            }
            if st.contexts.values().any(|c| c.asid == asid) {
                return Err(refuse(Status::BadState, "a context uses the ASID"));
            }
            if let Some(slot) = self.roots.get(asid as usize) {
                slot.store(0, Ordering::Release);
            }
        }
        self.invalidate_tlbs(Scope::Asid(asid));
        Ok(())
    }

    /// Drops what `scope` covers from every engine's TLB; an engine stuck in an
    /// instruction has its whole TLB emptied before it runs again instead.
    fn invalidate_tlbs(&self, scope: Scope) {
        for e in 0..self.mmus.len() {
            match self.mmu_within(e, self.stop_timeout) {
                Some(mut m) => {
                    m.tlb_mut().invalidate(scope);
                }
                None => self.tlb_flush_pending[e].store(true, Ordering::Release),
            }
        }
    }

    /// FAULT_REPLY.
    pub fn answer_fault(&self, fault_id: u64, resume: bool) -> Result<(), Refusal> {
        if self.fault_reply(fault_id, resume) {
            Ok(())
        } else {
            Err(refuse(Status::NotFound, "no such outstanding fault"))
        }
    }

    /// CTX_DESTROY: stops the context (waiting for its engine to reach an instruction
    /// boundary, at most [`ENGINE_STOP_TIMEOUT`]: then the device resets itself and the
    /// answer is RESETTING) and frees it.
    pub fn destroy_context(&self, id: u32) -> Result<(), Refusal> {
        let mut st = self.lock();
        let Some(c) = st.contexts.remove(&id) else {
            return Err(refuse(Status::NotFound, "no such context"));
        };
        c.interrupt();
        // Its jobs are discarded without JOB_DONE: their slots come back now.
        let jobs = c.jobs.len() + usize::from(c.exec.is_some() || c.running.is_some());
        self.outbox
            .budget()
            .give_jobs(id, u32::try_from(jobs).unwrap_or(u32::MAX));
        if let Some(e) = c.running {
            let (guard, stopped) = self.wait_engine_off(st, e, Some(c.uid));
            st = guard;
            if !stopped {
                drop(st);
                self.engine_stuck(e);
                return Err(refuse(
                    Status::Resetting,
                    "its engine did not stop in time: device-initiated reset",
                ));
            }
        }
        self.forget_faults(&mut st, c.uid);
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
        Ok(())
    }

    /// FAULT_REPLY. False if the fault is not outstanding.
    pub fn fault_reply(&self, fault_id: u64, resume: bool) -> bool {
        let mut st = self.lock();
        let Some(o) = st.faults.take(fault_id) else {
            return false;
        };
        let times = FaultTimes {
            raised: o.raised,
            delivered: self.outbox.take_delivered(fault_id),
            replied: Instant::now(),
        };
        self.outbox.withdraw_fault(fault_id);
        for w in &o.waiters {
            let Some(c) = st.contexts.get_mut(&w.ctx).filter(|c| c.uid == w.uid) else {
                continue;
            };
            if c.stall != Stall::Fault(fault_id) {
                continue;
            }
            c.stall = Stall::None;
            if resume {
                c.resumed = Some(times);
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
        if reason.is_none() {
            // The rings are reset too: nothing is left to resume.
            st.paused = false;
            self.outbox.hold(false);
        }
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

    /// The VMM stopped the rings (spec 6.14.4): the engines stop at an instruction boundary
    /// and start nothing until [`Device::resume`]; every state is kept. When this returns,
    /// no engine accesses guest memory (a snapshot or a migration sees it all). Timers keep
    /// running: what completes meanwhile is held for the rings.
    pub fn pause(&self) {
        let mut st = self.lock();
        if st.paused {
            return;
        }
        st.paused = true;
        for c in st.contexts.values().filter(|c| c.running.is_some()) {
            c.interrupt();
        }
        for e in 0..st.engines.len() {
            let (guard, stopped) = self.wait_engine_off(st, e, None);
            st = guard;
            if !stopped {
                log::error!(
                    "svmgpu{}: engine {e} did not stop for the pause within {} ms",
                    self.index,
                    self.stop_timeout.as_millis()
                );
            }
        }
        drop(st);
        // Nothing moves in any ring from now on: the rings that still run may be stopped
        // next, and each must stay where the VMM will read it.
        self.outbox.hold(true);
        info!("svmgpu{}: paused (rings stopped)", self.index);
    }

    /// The rings run again after a pause: contexts continue where they stopped.
    pub fn resume(&self) {
        let mut st = self.lock();
        if !st.paused {
            return;
        }
        st.paused = false;
        let ids: Vec<u32> = st.contexts.keys().copied().collect();
        for id in ids {
            self.make_runnable(&mut st, id);
        }
        self.work.notify_all();
        info!("svmgpu{}: resumed", self.index);
        drop(st);
        self.outbox.hold(false);
        self.flush();
    }

    /// True while paused.
    pub fn paused(&self) -> bool {
        self.lock().paused
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
        // Engines finish the instruction in flight and see the new generation. One that
        // does not in time is abandoned: its result will be ignored (old generation), and
        // its TLB is emptied before it runs anything again.
        for e in 0..st.engines.len() {
            let (guard, stopped) = self.wait_engine_off(st, e, None);
            st = guard;
            if !stopped {
                log::error!(
                    "svmgpu{}: engine {e} did not stop within {} ms; abandoned",
                    self.index,
                    self.stop_timeout.as_millis()
                );
                st.engines[e] = None;
            }
        }
        for e in 0..self.mmus.len() {
            self.empty_tlb(e);
        }
        st
    }

    /// Waits until engine `e` no longer runs `uid` (any context if `None`), at most
    /// [`ENGINE_STOP_TIMEOUT`]; true if it stopped.
    fn wait_engine_off<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        e: usize,
        uid: Option<u64>,
    ) -> (MutexGuard<'a, State>, bool) {
        let deadline = Instant::now() + self.stop_timeout;
        loop {
            let busy = match st.engines.get(e).copied().flatten() {
                None => false,
                Some(u) => uid.is_none_or(|want| want == u),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if !busy || left.is_zero() {
                return (st, !busy);
            }
            st = self
                .idle
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Empties engine `e`'s TLB, or, if the engine holds its MMU for longer than
    /// [`ENGINE_STOP_TIMEOUT`] (it is stuck in an instruction), has it emptied before the
    /// engine runs anything again.
    fn empty_tlb(&self, e: usize) {
        match self.mmu_within(e, self.stop_timeout) {
            Some(mut m) => {
                m.tlb_mut().invalidate(Scope::All);
            }
            None => self.tlb_flush_pending[e].store(true, Ordering::Release),
        }
    }

    /// Engine `e`'s MMU, if it can be taken within `timeout`.
    pub fn mmu_within(&self, e: usize, timeout: Duration) -> Option<MutexGuard<'_, Mmu>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.mmus[e].try_lock() {
                Ok(m) => return Some(m),
                Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_micros(200));
        }
    }

    /// Engine `e` did not stop in time (or failed): the device resets itself (spec 6.14.1),
    /// so that every other context's state is consistent again and the driver hears of it.
    pub fn engine_stuck(&self, e: usize) {
        log::error!(
            "svmgpu{}: engine {e} did not reach an instruction boundary within {} ms: \
             device-initiated reset",
            self.index,
            self.stop_timeout.as_millis()
        );
        self.begin_device_reset(Duration::ZERO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmu::walker::tests::{ram, Pt};
    use svmgpu_spec::pte::Perms;

    /// A device without threads (nothing runs unless a test does it), with one context on
    /// a bound ASID, and a short engine-stop bound.
    fn device() -> (Device, GuestMemoryMmap<()>) {
        let o = DeviceOptions {
            engines: 1,
            ..Default::default()
        };
        let mut d = Device::new(0, &o).unwrap();
        d.stop_timeout = Duration::from_millis(50);
        let mem = ram();
        let mut pt = Pt::new();
        pt.map_4k(&mem, 0x1000, 0x40_0000, Perms::default());
        d.set_memory(Some(GuestMemoryAtomic::new(mem.clone())));
        d.bind_asid(1, pt.root).unwrap();
        d.create_context(3, 1, 0).unwrap();
        (d, mem)
    }

    #[test]
    fn destroying_a_context_on_a_stuck_engine_resets_the_device() {
        let (d, _mem) = device();
        // Engine 0 took the context and never comes back (a stuck instruction).
        {
            let mut st = d.lock();
            let uid = st.contexts[&3].uid;
            st.contexts.get_mut(&3).unwrap().running = Some(0);
            st.engines[0] = Some(uid);
        }
        let t = Instant::now();
        let r = d.destroy_context(3);
        assert_eq!(r.map_err(|r| r.status), Err(Status::Resetting));
        assert!(t.elapsed() < Duration::from_secs(5), "bounded");
        assert!(d.resetting(), "a device-initiated reset");
        assert_eq!(d.stats().get(Counter::Resets), 1);
        // The reset abandoned the engine: it runs new work (after emptying its TLB).
        assert!(d.lock().engines[0].is_none());
        let now = Instant::now();
        assert!(d.end_device_reset(&mut d.lock(), now));
        d.bind_asid(1, 0x10_0000).unwrap();
        d.create_context(3, 1, 0).unwrap();
        assert_eq!(d.destroy_context(3), Ok(()));
    }

    #[test]
    fn a_stuck_engine_cannot_block_an_invalidation_forever() {
        let (d, _mem) = device();
        // The engine holds its MMU (mid-instruction) and never lets go.
        let held = d.mmu(0);
        let t = Instant::now();
        let inv = PendingInval {
            seqno: 1,
            scope: Scope::All,
            seq: d.log.accept(),
            deadline: t,
            accepted: t,
            status: Status::Ok,
        };
        let generation = d.lock().generation;
        std::thread::scope(|s| {
            s.spawn(|| d.complete_invalidations(&[inv], generation));
            std::thread::sleep(Duration::from_millis(300));
            assert!(d.resetting(), "the device reset itself instead of waiting");
            drop(held);
        });
        assert_eq!(d.stats().get(Counter::TlbInvalidations), 0, "not completed");
    }

    #[test]
    fn job_slots_come_back_when_jobs_are_discarded() {
        let (d, _mem) = device();
        let job = Job {
            seqno: 1,
            batch_va: 0x1000,
            batch_len: 8,
        };
        let mut accepted = Vec::new();
        for _ in 0..JOB_QUEUE_DEPTH_USIZE {
            accepted.push(d.accept_job(3, job).unwrap());
        }
        assert_eq!(
            d.accept_job(3, job).map_err(|r| r.status),
            Err(Status::Busy)
        );
        // One response could not be written: its slot comes back.
        d.cancel(accepted.pop().unwrap());
        let extra = d.accept_job(3, job).unwrap();
        accepted.push(extra);
        for a in accepted {
            d.start(a);
        }
        // Destroyed: its queued jobs get no JOB_DONE, their slots come back.
        d.destroy_context(3).unwrap();
        assert_eq!(d.outbox.budget().jobs_held(3), 0);
        // Work accepted before a reset does not start after it.
        d.create_context(3, 1, 0).unwrap();
        let late = d.accept_job(3, job).unwrap();
        d.reset(Some(ResetReason::DriverRequest));
        d.bind_asid(1, 0x10_0000).unwrap();
        d.create_context(3, 1, 0).unwrap();
        d.start(late);
        assert!(d.lock().contexts[&3].jobs.is_empty());
        assert_eq!(d.outbox.budget().jobs_held(3), 0);
    }

    const JOB_QUEUE_DEPTH_USIZE: usize = svmgpu_spec::JOB_QUEUE_DEPTH as usize;
}
