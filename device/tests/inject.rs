// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Fault injection (spec/svmgpu.md section 6.16) through the vhost-user harness: every kind
//! has its observable effect on the wire, the device keeps serving afterwards, and the same
//! seed gives the same injections.

#[allow(dead_code)]
mod harness;

use std::thread;
use std::time::{Duration, Instant};

use harness::driver::{encode, Driver, RW, RX};
use harness::rig::{Rig, ASID, BATCH_VA, DATA_VA, RAM};
use harness::{InProcessBackend, TestFrontend};
use svmgpu_device::config::DeviceOptions;
use svmgpu_device::inject::{InjectSpec, Kind};
use svmgpu_spec::isa::Insn;
use svmgpu_spec::*;

/// How long "never" is checked for.
const QUIET: Duration = Duration::from_millis(40);

fn options() -> DeviceOptions {
    DeviceOptions {
        engines: 1,
        max_faults: 8,
        tlb_inval_latency_ns: 0,
        preempt_latency_ns: 0,
        walk_latency_ns: 0,
        insn_cost_ns: 0,
        hang_threshold_us: 2_000,
        ..Default::default()
    }
}

/// Injection helpers of this file.
impl Rig {
    fn inject(&self, spec: &str) {
        let spec = InjectSpec::parse(spec).unwrap();
        self.be.gpu.injector().add(&spec).unwrap();
    }

    fn injected(&self, k: Kind) -> u64 {
        self.be.gpu.injector().injected(k)
    }

    /// Asserts that no completion matching `pred` arrives for [`QUIET`].
    fn never(&mut self, what: &str, pred: impl Fn(&Completion) -> bool) {
        let until = Instant::now() + QUIET;
        while Instant::now() < until {
            self.d.poll();
            assert!(
                !self.d.completions.iter().any(&pred),
                "{what}: {:?}",
                self.d.completions
            );
            thread::sleep(Duration::from_micros(200));
        }
    }

    fn never_done(&mut self, seqno: u64) {
        self.never("unexpected COMMAND_DONE", |c| {
            c.kind == CompletionKind::CommandDone.as_u32() && c.seqno == seqno
        });
    }

    fn never_job(&mut self, seqno: u64) {
        self.never("unexpected JOB_DONE", |c| {
            c.kind == CompletionKind::JobDone.as_u32() && c.seqno == seqno
        });
    }
}

fn store64(va: u64, value: u64) -> Insn {
    Insn::Store {
        size64: true,
        va,
        value,
    }
}

/// Adds 1 to `counter` `n` times with a DELAY of `ns` between adds.
fn counting_loop(counter: u64, n: u32, ns: u32) -> Vec<Insn> {
    vec![
        Insn::AtomicAdd {
            size64: true,
            va: counter,
            value: 1,
        },
        Insn::Delay { ns },
        Insn::Loop {
            count: n,
            offset: -32,
        },
        Insn::End,
    ]
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_micros(200));
    }
}

fn ctx_error(e: &Event) -> bool {
    matches!(e, Event::ContextError(_))
}

#[test]
fn tlb_inval_drop_never_completes_while_others_do() {
    let mut r = Rig::new(options(), 0);
    r.inject("tlb-inval-drop:asid=2,count=1");
    let a = r.d.invalidate(ASID, DATA_VA, 4096);
    let dropped = r.d.invalidate(2, 0, 4096);
    let b = r.d.invalidate(2, 0, 4096);
    let all = r.d.invalidate_asid(ASID_ALL);
    for s in [a, b, all] {
        assert_eq!(r.d.wait_done(s).status, 0);
    }
    r.never_done(dropped);
    assert_eq!(r.injected(Kind::TlbInvalDrop), 1);
    assert_eq!(r.d.stats().injected_faults, 1);
    // A reset discards it; the device serves new work after.
    r.d.ok(Opcode::Reset, &ResetReq::default().to_bytes());
    r.d.bind(ASID, &r.pt);
    r.d.create(1, ASID);
    let s = r.run(1, &[store64(DATA_VA, 5), Insn::End]);
    assert_eq!(r.d.wait_job(s), 0);
    r.never_done(dropped);
}

#[test]
fn tlb_inval_error_completes_with_failure_and_drops_nothing() {
    let mut r = Rig::new(options(), 1 << SVMGPU_F_AUDIT);
    r.d.create(1, ASID);
    let src = 0x3000_0000;
    let page_a = r.d.fe.ram.alloc(4096, 4096);
    let page_b = r.d.fe.ram.alloc(4096, 4096);
    r.d.fe.ram.write(page_a, &111u64.to_le_bytes());
    r.d.fe.ram.write(page_b, &222u64.to_le_bytes());
    r.d.map_4k(&r.pt, src, page_a, RX);
    let copy = |dst| Insn::Copy { dst, src, len: 8 };
    let s = r.run(1, &[copy(DATA_VA), Insn::End]);
    assert_eq!(r.d.wait_job(s), 0);
    r.d.map_4k(&r.pt, src, page_b, RX);
    r.inject("tlb-inval-error:status=internal,count=1");
    let s = r.d.invalidate(ASID, src, 4096);
    let c = r.d.wait_done(s);
    assert_eq!(
        (c.status, c.value, c.opcode),
        (Status::Internal.as_u32(), 0, Opcode::TlbInvalidate.as_u32())
    );
    // Nothing was dropped: the stale translation is still used, and the audit does not count
    // it (the failed invalidation guaranteed nothing).
    let s = r.run(1, &[copy(DATA_VA + 8), Insn::End]);
    assert_eq!(r.d.wait_job(s), 0);
    assert_eq!(r.d.read_u64(r.data + 8), 111);
    // The next one succeeds.
    let s = r.d.invalidate(ASID, src, 4096);
    let c = r.d.wait_done(s);
    assert_eq!(c.status, 0);
    assert!(c.value >= 1);
    let s = r.run(1, &[copy(DATA_VA + 16), Insn::End]);
    assert_eq!(r.d.wait_job(s), 0);
    assert_eq!(r.d.read_u64(r.data + 16), 222);
    let st = r.d.stats();
    assert_eq!(st.stale_accesses, 0);
    assert!(st.audit_checks > 0);
    assert_eq!(st.tlb_invalidations, 1, "only the successful one");
    assert_eq!(r.injected(Kind::TlbInvalError), 1);
}

#[test]
fn delays_add_to_invalidation_and_preemption_latency() {
    let mut r = Rig::new(options(), 0);
    r.inject("tlb-inval-delay:delay_us=30000,count=1;preempt-delay:delay_us=30000,ctx=1");
    let t = Instant::now();
    let s = r.d.invalidate(ASID, DATA_VA, 4096);
    assert_eq!(r.d.wait_done(s).status, 0);
    assert!(
        t.elapsed() >= Duration::from_millis(30),
        "{:?}",
        t.elapsed()
    );
    let t = Instant::now();
    let s = r.d.invalidate(ASID, DATA_VA, 4096);
    assert_eq!(r.d.wait_done(s).status, 0);
    assert!(
        t.elapsed() < Duration::from_millis(30),
        "count=1: only once"
    );

    r.d.create(1, ASID);
    let job = r.run(1, &counting_loop(DATA_VA, 100_000, 10_000));
    wait_until("progress", || r.d.read_u64(r.data) > 0);
    let t = Instant::now();
    let s = r.d.ok(Opcode::CtxPreempt, &Driver::ctx_body(1));
    assert_eq!(r.d.wait_done(s).status, 0);
    assert!(
        t.elapsed() >= Duration::from_millis(30),
        "{:?}",
        t.elapsed()
    );
    let n = r.d.read_u64(r.data);
    thread::sleep(Duration::from_millis(5));
    assert_eq!(r.d.read_u64(r.data), n, "preempted for real");
    assert_eq!(r.injected(Kind::TlbInvalDelay), 1);
    assert_eq!(r.injected(Kind::PreemptDelay), 1);
    r.d.ok(Opcode::CtxDestroy, &Driver::ctx_body(1));
    r.never_job(job);
}

#[test]
fn preempt_drop_never_completes_and_preempt_error_preempts_nothing() {
    let mut r = Rig::new(options(), 0);
    r.d.create(1, ASID);
    let job = r.run(1, &counting_loop(DATA_VA, 1_000_000, 10_000));
    wait_until("progress", || r.d.read_u64(r.data) > 0);
    // Each preemption asks the drop rule first, then the error rule.
    r.inject("preempt-error:count=1;preempt-drop:count=1,after=2");

    // The first preemption fails: TIMEOUT, and the context keeps running.
    let s = r.d.ok(Opcode::CtxPreempt, &Driver::ctx_body(1));
    let c = r.d.wait_done(s);
    assert_eq!((c.status, c.ctx_id), (Status::Timeout.as_u32(), 1));
    let n = r.d.read_u64(r.data);
    wait_until("still running", || r.d.read_u64(r.data) > n + 2);

    // The second one is not dropped (after=2 skips two matches), it works.
    let s = r.d.ok(Opcode::CtxPreempt, &Driver::ctx_body(1));
    assert_eq!(r.d.wait_done(s).status, 0);
    let s = r.d.ok(Opcode::CtxResume, &Driver::ctx_body(1));
    assert_eq!(r.d.wait_done(s).status, 0);

    // The third is dropped: no completion, the context keeps running, and a later RESUME
    // waits behind it (acceptance order).
    let dropped = r.d.ok(Opcode::CtxPreempt, &Driver::ctx_body(1));
    let resume = r.d.ok(Opcode::CtxResume, &Driver::ctx_body(1));
    r.never_done(dropped);
    r.never_done(resume);
    let n = r.d.read_u64(r.data);
    wait_until("still running", || r.d.read_u64(r.data) > n + 2);
    // Destroying the context cancels both.
    r.d.ok(Opcode::CtxDestroy, &Driver::ctx_body(1));
    assert_eq!(r.d.wait_done(dropped).status, Status::Canceled.as_u32());
    assert_eq!(r.d.wait_done(resume).status, Status::Canceled.as_u32());
    r.never_job(job);
    assert_eq!(r.injected(Kind::PreemptError), 1);
    assert_eq!(r.injected(Kind::PreemptDrop), 1);
}

#[test]
fn engine_hang_posts_engine_hang_and_ends_with_destroy_or_reset() {
    let mut r = Rig::new(options(), 0);
    r.inject("engine-hang:ctx=1,count=1");
    r.d.create(1, ASID);
    r.d.create(2, ASID);
    let (hung, pc) = r.run_at(1, &[store64(DATA_VA, 1), Insn::End]);
    let ev = r.d.wait_event(|e| matches!(e, Event::EngineHang(_)));
    let Event::EngineHang(h) = ev else {
        unreachable!()
    };
    assert_eq!((h.engine, h.ctx_id, h.job_seqno, h.pc), (0, 1, hung, pc));
    assert!(h.stalled_ns >= 2_000_000, "{}", h.stalled_ns);
    assert_eq!(r.d.read_u64(r.data), 0, "the hung job did nothing");
    // One engine, hung: other contexts' jobs wait; a preemption of the hung context does
    // not complete.
    let other = r.run(2, &[store64(DATA_VA + 8, 2), Insn::End]);
    let preempt = r.d.ok(Opcode::CtxPreempt, &Driver::ctx_body(1));
    r.never_job(hung);
    r.never_job(other);
    r.never_done(preempt);
    assert_eq!(r.d.stats().engine_hangs, 1);
    // Destroying the hung context frees the engine (bounded wait).
    let t = Instant::now();
    r.d.ok(Opcode::CtxDestroy, &Driver::ctx_body(1));
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(r.d.wait_done(preempt).status, Status::Canceled.as_u32());
    assert_eq!(r.d.wait_job(other), 0);
    assert_eq!(r.d.read_u64(r.data + 8), 2);

    // Again, ended by a RESET this time.
    r.inject("engine-hang:count=1");
    let hung = r.run(2, &[store64(DATA_VA, 3), Insn::End]);
    r.d.wait_event(|e| matches!(e, Event::EngineHang(_)));
    r.d.ok(Opcode::Reset, &ResetReq::default().to_bytes());
    r.d.wait_event(|e| matches!(e, Event::DeviceReset(_)));
    r.d.bind(ASID, &r.pt);
    r.d.create(2, ASID);
    let s = r.run(2, &[store64(DATA_VA, 4), Insn::End]);
    assert_eq!(r.d.wait_job(s), 0);
    assert_eq!(r.d.read_u64(r.data), 4);
    r.never_job(hung);
    assert_eq!(r.injected(Kind::EngineHang), 2);
}

#[test]
fn device_initiated_reset_answers_resetting_then_posts_device_reset() {
    let mut r = Rig::new(options(), 0);
    r.d.create(1, ASID);
    let job = r.run(1, &counting_loop(DATA_VA, 1_000_000, 10_000));
    wait_until("progress", || r.d.read_u64(r.data) > 0);
    let resets_before = r.d.stats().resets;
    r.inject("device-reset:count=1,delay_us=50000");
    let t = Instant::now();
    let create2 = CtxCreateReq {
        ctx_id: 2,
        asid: ASID,
        flags: 0,
        reserved: 0,
    };
    let (st, _) = r.d.cmd(Opcode::CtxCreate, &create2.to_bytes());
    assert_eq!(st, Status::Resetting);
    // While it lasts: RESETTING for everything but GET_INFO and GET_STATS.
    let (st, _) = r.d.cmd(Opcode::CtxCreate, &create2.to_bytes());
    assert_eq!(st, Status::Resetting);
    let (st, _) = r.d.cmd(Opcode::Reset, &ResetReq::default().to_bytes());
    assert_eq!(st, Status::Resetting);
    assert_eq!(r.d.cmd(Opcode::GetInfo, &[]).0, Status::Ok);
    assert_eq!(r.d.stats().resets, resets_before + 1);
    let ev = r.d.wait_event(|e| matches!(e, Event::DeviceReset(_)));
    assert!(
        t.elapsed() >= Duration::from_millis(50),
        "{:?}",
        t.elapsed()
    );
    let Event::DeviceReset(d) = ev else {
        unreachable!()
    };
    assert_eq!(d.reason, ResetReason::DeviceInitiated.as_u32());
    assert_eq!(d.reset_count, resets_before + 1);
    // All state is lost: the ASID is unbound, the context is gone, its job never completes.
    let (st, _) = r.d.cmd(Opcode::CtxCreate, &create2.to_bytes());
    assert_eq!(st, Status::BadState, "ASID no longer bound");
    let (st, _) = r.d.cmd(Opcode::CtxDestroy, &Driver::ctx_body(1));
    assert_eq!(st, Status::NotFound);
    let n = r.d.read_u64(r.data);
    thread::sleep(Duration::from_millis(5));
    assert_eq!(r.d.read_u64(r.data), n, "nothing runs");
    r.never_job(job);
    // And the device serves new work.
    r.d.bind(ASID, &r.pt);
    r.d.create(2, ASID);
    let s = r.run(2, &[store64(DATA_VA + 8, 9), Insn::End]);
    assert_eq!(r.d.wait_job(s), 0);
    assert_eq!(r.d.read_u64(r.data + 8), 9);
    assert_eq!(r.injected(Kind::DeviceReset), 1);
}

#[test]
fn walk_read_error_faults_bad_table_address_and_resume_retries() {
    let mut r = Rig::new(options(), 0);
    r.d.create(1, ASID);
    r.inject("walk-read-error:count=1,level=2");
    let (s, pc) = r.run_at(1, &[store64(DATA_VA, 6), Insn::End]);
    let f = r.d.wait_fault();
    assert_eq!(
        (f.va, f.ctx_id, f.asid, f.access, f.reason, f.level),
        (
            pc,
            1,
            ASID,
            AccessKind::Exec.as_u32(),
            FaultReason::BadTableAddress.as_u32(),
            2
        )
    );
    assert_eq!(r.d.reply(f.fault_id, FaultAction::Resume), Status::Ok);
    assert_eq!(r.d.wait_job(s), 0);
    assert_eq!(r.d.read_u64(r.data), 6);
    let st = r.d.stats();
    assert_eq!((st.page_faults, st.faults_resumed), (1, 1));
    assert!(st.pte_errors >= 1);
    assert_eq!(r.injected(Kind::WalkReadError), 1);
}

#[test]
fn spurious_faults_stall_on_a_valid_mapping_and_resume() {
    let mut r = Rig::new(options(), 0);
    r.d.create(1, ASID);
    r.inject("fault-spurious:count=1,ctx=1");
    let (s, pc) = r.run_at(
        1,
        &[store64(DATA_VA, 7), store64(DATA_VA + 8, 8), Insn::End],
    );
    let f = r.d.wait_fault();
    assert_eq!(
        (f.va, f.ctx_id, f.access, f.reason),
        (
            pc,
            1,
            AccessKind::Exec.as_u32(),
            FaultReason::NotPresent.as_u32()
        )
    );
    // The first store is done, the context waits for the reply.
    assert_eq!(r.d.read_u64(r.data), 7);
    r.never_job(s);
    assert_eq!(r.d.read_u64(r.data + 8), 0);
    assert_eq!(r.d.reply(f.fault_id, FaultAction::Resume), Status::Ok);
    assert_eq!(r.d.wait_job(s), 0);
    assert_eq!(r.d.read_u64(r.data + 8), 8);
    assert_eq!(r.injected(Kind::FaultSpurious), 1);
}

#[test]
fn duplicated_faults_share_an_id_and_the_second_reply_is_not_found() {
    let mut r = Rig::new(options(), 0);
    r.d.create(1, ASID);
    r.inject("fault-duplicate:count=1");
    let va = 0x4000_0000;
    let s = r.run(1, &[store64(va, 1), Insn::End]);
    let f1 = r.d.wait_fault();
    let f2 = r.d.wait_fault();
    assert_eq!(f1, f2, "the same event twice");
    let page = r.d.fe.ram.alloc(4096, 4096);
    r.d.map_4k(&r.pt, va, page, RW);
    assert_eq!(r.d.reply(f1.fault_id, FaultAction::Resume), Status::Ok);
    assert_eq!(
        r.d.reply(f2.fault_id, FaultAction::Resume),
        Status::NotFound
    );
    assert_eq!(r.d.wait_job(s), 0);
    assert_eq!(r.d.read_u64(page), 1);
    assert_eq!(r.d.stats().page_faults, 1);
    assert_eq!(r.injected(Kind::FaultDuplicate), 1);
}

#[test]
fn phantom_faults_name_untouched_addresses_and_ids_never_outstanding() {
    let mut r = Rig::new(options(), 0);
    r.d.create(1, ASID);
    r.inject("fault-phantom:count=1,va=0x70000000-0x70001000");
    let s = r.run(1, &[store64(DATA_VA, 3), Insn::End]);
    // The job completes without any reply: nothing waits on a phantom fault.
    assert_eq!(r.d.wait_job(s), 0);
    let f = r.d.wait_fault();
    assert!((0x7000_0000..0x7000_1000).contains(&f.va), "{:#x}", f.va);
    assert_eq!((f.ctx_id, f.asid), (1, ASID));
    assert_eq!(r.d.reply(f.fault_id, FaultAction::Cancel), Status::NotFound);
    // Fault ids stay unique: the next real fault gets a later id.
    let s = r.run(1, &[store64(0x5000_0000, 1), Insn::End]);
    let real = r.d.wait_fault();
    assert!(real.fault_id > f.fault_id);
    assert_eq!(r.d.reply(real.fault_id, FaultAction::Cancel), Status::Ok);
    assert_eq!(r.d.wait_job(s), Status::JobFault.as_u32());
    assert_eq!(r.d.stats().page_faults, 1, "phantoms are not page faults");
    assert_eq!(r.injected(Kind::FaultPhantom), 1);
}

#[test]
fn duplicated_and_corrupted_completions_appear() {
    let mut r = Rig::new(options(), 0);
    r.d.create(1, ASID);
    r.inject("completion-duplicate:count=1,rec=job");
    let s = r.run(1, &[Insn::End]);
    assert_eq!(r.d.wait_job(s), 0);
    assert_eq!(r.d.wait_job(s), 0, "twice");
    r.never_job(s);

    r.inject("completion-corrupt:count=1,rec=command");
    let s = r.d.invalidate(ASID, DATA_VA, 4096);
    let c =
        r.d.wait_completion(|c| c.kind == CompletionKind::CommandDone.as_u32());
    assert_ne!(c.seqno, s);
    assert!(c.seqno >> 63 == 1, "{:#x}", c.seqno);
    assert_eq!((c.opcode, c.status), (Opcode::TlbInvalidate.as_u32(), 0));
    r.never_done(s);

    r.inject("completion-corrupt:count=1,rec=job,field=kind");
    let s = r.run(1, &[Insn::End]);
    let c = r.d.wait_completion(|c| c.seqno == s);
    assert_eq!(c.kind & 0xfff0, 0xbad0);
    r.never_job(s);

    r.inject("completion-corrupt:count=1,rec=job,field=status");
    let s = r.run(1, &[Insn::End]);
    let st = r.d.wait_job(s);
    assert!(Status::from_u32(st).is_none(), "{st:#x} is not a status");

    // The budgets follow the originals: the device still accepts 256 commands.
    let mut seqnos = Vec::new();
    for _ in 0..MAX_ASYNC_OUTSTANDING {
        seqnos.push(r.d.invalidate(ASID, DATA_VA, 4096));
    }
    for s in seqnos {
        assert_eq!(r.d.wait_done(s).status, 0);
    }
    assert_eq!(r.injected(Kind::CompletionDuplicate), 1);
    assert_eq!(r.injected(Kind::CompletionCorrupt), 3);
}

#[test]
fn reordered_completions_arrive_after_the_next_one_or_after_their_delay() {
    let mut r = Rig::new(options(), 0);
    r.inject("completion-reorder:count=1,rec=command,delay_us=5000000");
    let s1 = r.d.invalidate(ASID, DATA_VA, 4096);
    let s2 = r.d.invalidate(ASID, DATA_VA, 4096);
    wait_until("both completions", || {
        r.d.poll();
        r.d.completions.len() >= 2
    });
    let order: Vec<u64> = r.d.completions.drain(..).map(|c| c.seqno).collect();
    assert_eq!(order, [s2, s1]);
    // Alone, a held-back record goes after its delay.
    r.inject("completion-reorder:count=1,delay_us=20000");
    let t = Instant::now();
    let s = r.d.invalidate(ASID, DATA_VA, 4096);
    assert_eq!(r.d.wait_done(s).status, 0);
    assert!(
        t.elapsed() >= Duration::from_millis(20),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(r.injected(Kind::CompletionReorder), 2);
}

#[test]
fn event_overflow_drops_an_event_and_reports_events_lost() {
    let mut r = Rig::new(options(), 0);
    r.inject("event-overflow:count=1");
    let bad = [Insn::Store {
        size64: true,
        va: DATA_VA + 1,
        value: 0,
    }];
    for ctx in [1, 2] {
        r.d.create(ctx, ASID);
        let s = r.run(ctx, &bad);
        assert_eq!(r.d.wait_job(s), Status::JobMisaligned.as_u32());
    }
    let lost = r.d.wait_event(|e| matches!(e, Event::EventsLost(_)));
    let Event::EventsLost(l) = lost else {
        unreachable!()
    };
    assert_eq!(l.lost, 1);
    let e = r.d.wait_event(ctx_error);
    let Event::ContextError(e) = e else {
        unreachable!()
    };
    assert_eq!(e.ctx_id, 2, "the first one was dropped");
    assert!(!r.d.events.iter().any(|(_, e)| ctx_error(e)));
    assert_eq!(r.d.stats().events_lost, 1);
    assert_eq!(r.injected(Kind::EventOverflow), 1);
}

/// An injection as the history tells it: sequence number, rule, seqno it applied to.
type Injection = (u64, u64, Option<u64>);

/// Runs 32 invalidations on a fresh device with `seed` and a 50 % failure rule; returns
/// their statuses and the device's injection history.
fn seeded_run(seed: u64) -> (Vec<u32>, Vec<Injection>) {
    let mut r = Rig::new(options(), 0);
    r.inject(&format!(
        "seed={seed};tlb-inval-error:p=0.5;completion-duplicate:p=0.2,rec=job"
    ));
    r.d.create(1, ASID);
    let mut statuses = Vec::new();
    for i in 0..32 {
        let s = r.d.invalidate(ASID, DATA_VA, 4096);
        statuses.push(r.d.wait_done(s).status);
        if i % 4 == 0 {
            let j = r.run(1, &[Insn::End]);
            assert_eq!(r.d.wait_job(j), 0);
        }
    }
    let history =
        r.be.gpu
            .injector()
            .history()
            .iter()
            .map(|h| (h.seq, h.rule, h.subject.seqno))
            .collect();
    (statuses, history)
}

#[test]
fn the_same_seed_replays_the_same_injections() {
    let (a, ha) = seeded_run(1234);
    let (b, hb) = seeded_run(1234);
    assert_eq!(a, b);
    assert_eq!(ha, hb);
    assert!(
        a.contains(&0) && a.contains(&Status::Timeout.as_u32()),
        "{a:?}"
    );
    let (c, _) = seeded_run(4321);
    assert_ne!(a, c);
}

#[test]
fn no_rules_no_feature_bit() {
    let be = InProcessBackend::start(0, &options());
    let fe = TestFrontend::connect(&be.path, RAM);
    assert_eq!(fe.offered_features & (1 << SVMGPU_F_FAULT_INJECT), 0);
    drop(fe);
    // Configured at start (as --inject does), the device offers the bit.
    be.gpu.injector().set_advertised(true);
    let fe = TestFrontend::connect(&be.path, RAM);
    assert_ne!(fe.offered_features & (1 << SVMGPU_F_FAULT_INJECT), 0);
}

#[test]
fn a_storm_with_every_kind_injected_stays_safe_and_a_reset_recovers() {
    use std::sync::atomic::Ordering;
    use svmgpu_spec::pte;
    let panicked = harness::watch_device_panics();

    let mut r = Rig::new(
        DeviceOptions {
            engines: 2,
            max_contexts: 8,
            max_faults: 4,
            tlb_entries: 8,
            tlb_ways: 2,
            tlb_inval_latency_ns: 20_000,
            preempt_latency_ns: 30_000,
            timeslice_us: 100,
            hang_threshold_us: 500,
            ..options()
        },
        (1 << SVMGPU_F_AUDIT) | (1 << SVMGPU_F_FAULT_COALESCE),
    );
    let kinds: Vec<String> = Kind::ALL
        .iter()
        .map(|k| match k {
            Kind::DeviceReset => "device-reset:p=0.004,delay_us=500".to_string(),
            Kind::EngineHang => "engine-hang:p=0.1".to_string(),
            Kind::FaultSpurious | Kind::FaultPhantom => format!("{}:p=0.03", k.name()),
            Kind::TlbInvalDelay | Kind::PreemptDelay | Kind::CompletionReorder => {
                format!("{}:p=0.05,delay_us=300", k.name())
            }
            k => format!("{}:p=0.05", k.name()),
        })
        .collect();
    r.inject(&format!("seed=77;{}", kinds.join(";")));

    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..800 {
        let v = next();
        let ctx = (v >> 8) as u32 % 4;
        let va = DATA_VA + (((v >> 16) % 0x1_0000) & !7);
        match v % 12 {
            0 | 1 => {
                let b = CtxCreateReq {
                    ctx_id: ctx,
                    asid: ASID,
                    flags: 0,
                    reserved: 0,
                };
                if r.d.cmd(Opcode::CtxCreate, &b.to_bytes()).0 == Status::BadState {
                    // Unbound by a device-initiated reset: bind again.
                    let b = AsidBindReq {
                        asid: ASID,
                        flags: 0,
                        pt_root: r.pt.root,
                    };
                    let _ = r.d.cmd(Opcode::AsidBind, &b.to_bytes());
                }
            }
            2 => {
                if v >> 50 & 3 == 0 {
                    let _ = r.d.cmd(Opcode::CtxDestroy, &Driver::ctx_body(ctx));
                }
            }
            3..=6 => {
                let insns = match v >> 40 & 3 {
                    0 => vec![store64(va, v), Insn::End],
                    1 => counting_loop(va, (v >> 20) as u32 % 30 + 1, 2_000),
                    2 => vec![store64(0x6000_0000 + (va & 0xfff8), 1), Insn::End],
                    _ => vec![
                        Insn::Fence {
                            notify: true,
                            va,
                            value: v,
                        },
                        Insn::End,
                    ],
                };
                let bytes = encode(&insns);
                let off = (v >> 24) % 60 * 1024;
                r.d.fe.ram.write(r.batch + off, &bytes);
                let b = JobSubmitReq {
                    ctx_id: ctx,
                    flags: 0,
                    batch_va: BATCH_VA + off,
                    batch_len: bytes.len() as u32,
                    reserved: 0,
                };
                let _ = r.d.cmd(Opcode::JobSubmit, &b.to_bytes());
            }
            7 => {
                let _ = r.d.cmd(Opcode::CtxPreempt, &Driver::ctx_body(ctx));
            }
            8 => {
                let _ = r.d.cmd(Opcode::CtxResume, &Driver::ctx_body(ctx));
            }
            9 => {
                let raw = if v >> 36 & 1 == 0 {
                    0
                } else {
                    pte::page_4k(r.data + ((v >> 20) % 16) * 4096, RW).unwrap()
                };
                r.d.set_pte(&r.pt, va & !0xfff, 0, raw);
                let b = TlbInvalidateReq {
                    asid: ASID,
                    flags: 0,
                    va: va & !0xfff,
                    size: 4096,
                };
                let _ = r.d.cmd(Opcode::TlbInvalidate, &b.to_bytes());
            }
            _ => {
                r.d.poll();
                let faults: Vec<PageFaultEvent> =
                    r.d.events
                        .drain(..)
                        .filter_map(|(_, e)| match e {
                            Event::PageFault(f) => Some(f),
                            _ => None,
                        })
                        .collect();
                for f in faults {
                    let action = if v >> 35 & 1 == 0 {
                        FaultAction::Resume
                    } else {
                        FaultAction::Cancel
                    };
                    let _ = r.d.reply(f.fault_id, action);
                }
                r.d.completions.clear();
            }
        }
    }
    let gpu = r.be.gpu.clone();
    assert!(
        gpu.stats()
            .get(svmgpu_device::stats::Counter::InjectedFaults)
            > 20
    );
    // Recovery: no more rules, wait for a device-initiated reset to end, RESET.
    gpu.injector().clear();
    wait_until("the end of a device-initiated reset", || !gpu.resetting());
    r.d.ok(Opcode::Reset, &ResetReq::default().to_bytes());
    r.d.bind(ASID, &r.pt);
    r.d.map_4k(&r.pt, DATA_VA, r.data, RW);
    r.d.create(0, ASID);
    let s = r.run(0, &[store64(DATA_VA, 0x5a5a), Insn::End]);
    assert_eq!(r.d.wait_job(s), 0);
    assert_eq!(r.d.read_u64(r.data), 0x5a5a);
    let st = r.d.stats();
    assert_eq!(st.stale_accesses, 0, "safety holds under injection");
    assert!(st.audit_checks > 0);
    assert!(!panicked.load(Ordering::SeqCst), "a device thread panicked");
    let per_kind: u64 = Kind::ALL.iter().map(|&k| gpu.injector().injected(k)).sum();
    assert_eq!(per_kind, st.injected_faults);
}
