// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! One engine: a thread that takes runnable contexts from the device's run queue and runs
//! each for a time slice (spec/svmgpu.md section 6.8.2), one instruction at a time, holding its
//! MMU only for the instruction in flight. Between instructions it checks the context's
//! attention flag (preemption, destroy, reset), so a context stops at an instruction boundary;
//! WAIT and DELAY are interruptible and keep their elapsed time.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use svmgpu_spec::Status;

use crate::context::ExecState;
use crate::device::{Device, Pick, SliceEnd};
use crate::inject::{Kind, Subject};
use crate::isa::{Executor, Step};
use crate::mmu::{Space, WalkHook};
use crate::stats::{Counter, Extra};
use crate::timing::Pacer;

/// How long an engine waits when there is no guest memory (between connections).
const NO_MEMORY_NAP: Duration = Duration::from_micros(50);
/// A job whose instructions have taken this much host time is a runaway candidate: when it
/// runs alone, the engine rests [`RUNAWAY_REST`] times as long as each slice burnt.
const RUNAWAY_CPU: Duration = Duration::from_secs(1);
/// See [`RUNAWAY_CPU`]: such a job gets at most 1/8 of a host core when alone.
const RUNAWAY_REST: u32 = 7;

/// The engine thread's body: runs until the device shuts down.
pub(crate) fn run(sh: &Device, e: usize) {
    let mut exec = Executor::new();
    while let Some(pick) = sh.next_pick(e) {
        // A bug in the executor must not take the engine (and every context waiting for
        // it) down with it: a panic is contained as a device-initiated reset.
        let slice = panic::catch_unwind(AssertUnwindSafe(|| {
            if sh.take_slice_failure() {
                panic!("engine {e}: injected slice failure (test hook)");
            }
            if pick.hang {
                sh.hang(e, &pick);
                (pick.exec, SliceEnd::Stopped, Duration::ZERO)
            } else {
                run_slice(sh, e, &mut exec, &pick)
            }
        }));
        match slice {
            Ok((state, end, burnt)) => {
                if end == SliceEnd::Expired && state.cpu_ns >= RUNAWAY_CPU.as_nanos() as u64 {
                    sh.rest(&pick, burnt * RUNAWAY_REST);
                }
                sh.end_slice(e, pick, state, end);
            }
            Err(_) => {
                exec = Executor::new();
                sh.engine_failed(e, &pick);
            }
        }
    }
}

/// `walk-read-error` for the walks of one context on one engine.
#[derive(Debug)]
struct InjectWalk<'a> {
    sh: &'a Device,
    ctx: u32,
    engine: u32,
}

impl WalkHook for InjectWalk<'_> {
    fn read_error(&self, asid: u32, va: u64) -> Option<u32> {
        let subject = Subject {
            asid: Some(asid),
            ctx: Some(self.ctx),
            engine: Some(self.engine),
            va: Some((va, va.saturating_add(1))),
            ..Subject::default()
        };
        self.sh
            .injector()
            .check(Kind::WalkReadError, &subject, self.sh.stats())
            .map(|h| h.level)
    }
}

/// Runs `pick` for one time slice on engine `e`; returns its state, how the slice ended
/// and the host time its instructions took (sleeps excluded).
fn run_slice(
    sh: &Device,
    e: usize,
    exec: &mut Executor,
    pick: &Pick,
) -> (ExecState, SliceEnd, Duration) {
    let mut st = pick.exec;
    let Some(mem) = sh.memory() else {
        // No guest memory (between connections): nothing can run.
        thread::sleep(NO_MEMORY_NAP);
        return (st, SliceEnd::Stopped, Duration::ZERO);
    };
    pick.attention.attach_current();
    let mut slept = Duration::ZERO;
    let t = sh.timing();
    let audit = sh.audit();
    let audit_grace = sh.audit_grace();
    let started = Instant::now();
    let deadline = started + Duration::from_nanos(t.timeslice_ns);
    let mut pacer = Pacer::new();
    let mut insns = 0u64;
    let walk_hook = InjectWalk {
        sh,
        ctx: pick.ctx,
        engine: e as u32,
    };
    let hook = sh
        .injector()
        .active(Kind::WalkReadError)
        .then_some(&walk_hook as &dyn WalkHook);
    let ran_before = st.ran_ns;
    let end = loop {
        if pick.attention.asked() || sh.shutting_down() {
            break SliceEnd::Stopped;
        }
        let now = Instant::now();
        if now >= deadline {
            break SliceEnd::Expired;
        }
        // The job timeout counts the time on an engine, this slice included.
        let on_engine = ran_before.saturating_add(nanos(now - started));
        if !pick.long_running && t.job_timeout_ns != 0 && on_engine >= t.job_timeout_ns {
            break SliceEnd::Failed {
                status: Status::JobTimeout,
                address: 0,
            };
        }
        let Some(root) = sh.root(pick.asid) else {
            // Unbound under us: only a reset does that, and it discards the context.
            break SliceEnd::Stopped;
        };
        let pc = st.pc;
        let (step, walks) = {
            let mut mmu = sh.mmu(e);
            let walks_before = mmu.counters.walks;
            let sp = Space {
                mem: &mem,
                asid: pick.asid,
                root,
                log: sh.log(),
                audit,
                audit_grace,
                hook,
            };
            let step = exec.step(&mut mmu, &sp, &mut st, sh.fence_room());
            (step, mmu.counters.walks - walks_before)
        };
        slept += pacer.charge(t.insn_ns + walks * t.walk_ns);
        match step {
            Step::Next => {
                insns += 1;
                if sh.injector().active(Kind::FaultSpurious)
                    || sh.injector().active(Kind::FaultPhantom)
                {
                    if let Some(f) = sh.inject_after_insn(e, pick, pc) {
                        break SliceEnd::Fault(f);
                    }
                }
            }
            Step::Fence(value) => {
                insns += 1;
                sh.post_fence(pick, st.job.seqno, value);
                if sh.injector().active(Kind::FaultSpurious)
                    || sh.injector().active(Kind::FaultPhantom)
                {
                    if let Some(f) = sh.inject_after_insn(e, pick, pc) {
                        break SliceEnd::Fault(f);
                    }
                }
            }
            Step::End => {
                insns += 1;
                break SliceEnd::Done;
            }
            Step::Error { status, address } => break SliceEnd::Failed { status, address },
            Step::Fault(f) => break SliceEnd::Fault(f),
            Step::FenceBlocked => break SliceEnd::FenceBlocked,
            Step::Sleep(ns) => {
                // Until the WAIT polls again or the DELAY is over, the slice ends, or
                // attention is asked for (preemption, destroy, reset).
                let left = deadline.saturating_duration_since(now);
                let d = pick.attention.sleep(Duration::from_nanos(ns).min(left));
                slept += d;
                // Elapsed running time, whatever the sleep's precision.
                st.partial_ns = st.partial_ns.saturating_add(nanos(d).max(1));
            }
        }
    };
    let elapsed = started.elapsed();
    let burnt = elapsed.saturating_sub(slept);
    st.ran_ns = ran_before.saturating_add(nanos(elapsed));
    st.cpu_ns = st.cpu_ns.saturating_add(nanos(burnt));
    let c = sh.mmu(e).take_counters();
    let s = sh.stats();
    s.add(Counter::Instructions, insns);
    s.add(Counter::TlbHits, c.hits);
    s.add(Counter::TlbMisses, c.misses);
    s.add(Counter::PageWalks, c.walks);
    s.add(Counter::PteErrors, c.pte_errors);
    s.add(Counter::AuditChecks, c.audit_checks);
    s.add(Counter::StaleAccesses, c.stale);
    s.add(Counter::UnflushedEntries, c.unflushed);
    s.add(Counter::NarrowFlushEntries, c.narrow);
    s.add_extra(Extra::AuditMismatches, c.mismatches);
    s.add_extra(Extra::TlbFillsUncached, c.uncached);
    if let Some(es) = s.engine(e) {
        let busy = nanos(elapsed);
        es.slices.fetch_add(1, Ordering::Relaxed);
        es.busy_ns.fetch_add(busy, Ordering::Relaxed);
        es.instructions.fetch_add(insns, Ordering::Relaxed);
        es.tlb_hits.fetch_add(c.hits, Ordering::Relaxed);
        es.tlb_misses.fetch_add(c.misses, Ordering::Relaxed);
    }
    (st, end, burnt)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
