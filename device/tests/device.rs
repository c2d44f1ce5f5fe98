// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The whole device through the vhost-user harness and its driver model: MMU, TLBs and
//! invalidation, the ISA, jobs, page faults, preemption, concurrency, reset, and malformed
//! input of every kind (each answered with an error while the device keeps serving).

#[allow(dead_code)]
mod harness;

use std::thread;
use std::time::{Duration, Instant};

use harness::driver::{encode, Driver, RW, RWX, RX};
use harness::rig::{Rig, ASID, BATCH_VA, DATA_VA, RAM};
use harness::{InProcessBackend, TestFrontend};
use svmgpu_device::config::DeviceOptions;
use svmgpu_device::stats::Extra;
use svmgpu_spec::isa::{fnv1a64, header, CompareOp, Insn, OP_NOP, OP_STORE};
use svmgpu_spec::pte::{self, Perms};
use svmgpu_spec::*;

fn options() -> DeviceOptions {
    DeviceOptions {
        engines: 2,
        tlb_entries: 64,
        tlb_ways: 4,
        max_faults: 8,
        tlb_inval_latency_ns: 100_000,
        preempt_latency_ns: 200_000,
        walk_latency_ns: 0,
        insn_cost_ns: 0,
        ..Default::default()
    }
}

fn store64(va: u64, value: u64) -> Insn {
    Insn::Store {
        size64: true,
        va,
        value,
    }
}

fn copy(dst: u64, src: u64, len: u64) -> Insn {
    Insn::Copy { dst, src, len }
}

#[test]
fn tlb_keeps_stale_translations_until_invalidated() {
    let mut r = Rig::new(
        DeviceOptions {
            engines: 1,
            ..options()
        },
        1 << SVMGPU_F_AUDIT,
    );
    r.d.create(1, ASID);
    let src_va = 0x3000_0000;
    let page_a = r.d.fe.ram.alloc(4096, 4096);
    let page_b = r.d.fe.ram.alloc(4096, 4096);
    r.d.fe.ram.write(page_a, &111u64.to_le_bytes());
    r.d.fe.ram.write(page_b, &222u64.to_le_bytes());
    r.d.map_4k(&r.pt, src_va, page_a, RX);

    r.run_ok(1, &[copy(DATA_VA, src_va, 8), Insn::End]);
    assert_eq!(r.d.read_u64(r.data), 111);

    // Remap without invalidating: the device still uses the cached translation.
    r.d.map_4k(&r.pt, src_va, page_b, RX);
    r.run_ok(1, &[copy(DATA_VA + 8, src_va, 8), Insn::End]);
    assert_eq!(r.d.read_u64(r.data + 8), 111, "stale translation is real");
    let gpu = r.be.gpu.clone();
    assert!(gpu.stats().get_extra(Extra::AuditMismatches) >= 1);

    // Invalidate and wait: now the new page is used.
    let t = Instant::now();
    let s = r.d.invalidate(ASID, src_va, 4096);
    let c = r.d.wait_done(s);
    assert!(
        t.elapsed() >= Duration::from_micros(100),
        "latency honoured"
    );
    assert_eq!(
        (c.status, c.ctx_id, c.opcode),
        (0, CTX_NONE, Opcode::TlbInvalidate.as_u32())
    );
    assert!(c.value >= 1, "the cached entry was dropped");
    r.run_ok(1, &[copy(DATA_VA + 16, src_va, 8), Insn::End]);
    assert_eq!(r.d.read_u64(r.data + 16), 222);

    let st = r.d.stats();
    assert_eq!(st.stale_accesses, 0);
    assert!(st.audit_checks > 0);
    assert_eq!(st.tlb_invalidations, 1);
    assert!(st.tlb_hits > 0 && st.tlb_misses > 0 && st.page_walks >= st.tlb_misses);
    assert_eq!(st.jobs_completed, 3);
}

#[test]
fn two_mib_pages_and_whole_asid_invalidation() {
    let mut r = Rig::new(options(), 0);
    r.d.create(1, ASID);
    let big_va = 0x4000_0000;
    let huge_a = r.d.fe.ram.alloc(2 << 20, 2 << 20);
    let huge_b = r.d.fe.ram.alloc(2 << 20, 2 << 20);
    r.d.map_2m(&r.pt, big_va, huge_a, RW);
    r.run_ok(
        1,
        &[
            Insn::Fill {
                va: big_va + 0x8_0000,
                len: 1 << 20,
                pattern: 0xa5a5_5a5a,
            },
            Insn::Checksum {
                src: big_va + 0x8_0000,
                len: 1 << 20,
                dst: DATA_VA,
            },
            Insn::End,
        ],
    );
    let expect = fnv1a64(&[0x5a, 0x5a, 0xa5, 0xa5].repeat(1 << 18));
    assert_eq!(r.d.read_u64(r.data), expect);
    assert_eq!(r.d.read_u32(huge_a + 0x8_0000 + 0xffffc), 0xa5a5_5a5a);
    assert_eq!(r.d.read_u32(huge_a + 0x18_0000), 0, "nothing past the fill");

    // Remap the 2 MiB page; stale until a whole-ASID (here: every ASID) invalidation.
    r.d.map_2m(&r.pt, big_va, huge_b, RW);
    let s = r.run(1, &[store64(big_va, 7), Insn::End]);
    assert_eq!(r.d.wait_job(s), 0);
    let both = (r.d.read_u64(huge_a), r.d.read_u64(huge_b));
    // Which engine ran it decides whether its TLB had the entry; with two engines either.
    assert!(both == (7, 0) || both == (0, 7), "{both:?}");
    let s = r.d.invalidate_asid(ASID_ALL);
    assert_eq!(r.d.wait_done(s).status, 0);
    r.run_ok(1, &[store64(big_va + 8, 9), Insn::End]);
    assert_eq!(r.d.read_u64(huge_b + 8), 9);
    let s = r.d.invalidate_asid(ASID);
    assert_eq!(r.d.wait_done(s).status, 0);
}

#[test]
fn every_instruction() {
    let mut r = Rig::new(options(), 0);
    r.d.create(3, ASID);
    let v = DATA_VA;
    let src: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
    r.d.fe.ram.write(r.data + 0x1_0000, &src);
    r.d.fe.ram.write(r.data + 0x3000, &40u64.to_le_bytes());
    let s = r.run(
        3,
        &[
            Insn::Nop,
            Insn::Store {
                size64: false,
                va: v + 4,
                value: 0xdead_beef,
            },
            store64(v + 8, u64::MAX - 1),
            Insn::Fill {
                va: v + 0x100,
                len: 64,
                pattern: 0x0102_0304,
            },
            // Unaligned, crossing several 4 KiB pages on both sides.
            copy(v + 0x2_0001, v + 0x1_0003, 9000),
            Insn::AtomicAdd {
                size64: true,
                va: v + 8,
                value: 3,
            },
            Insn::AtomicAdd {
                size64: false,
                va: v + 4,
                value: 1,
            },
            // Nested loops: inner body runs 3 × 4 times.
            Insn::AtomicAdd {
                size64: false,
                va: v + 0x200,
                value: 1,
            },
            Insn::Loop {
                count: 3,
                offset: -24,
            },
            Insn::Loop {
                count: 4,
                offset: -40,
            },
            Insn::Delay { ns: 1000 },
            Insn::Wait {
                size64: true,
                op: CompareOp::Ge,
                timeout_us: 0,
                va: v + 0x3000,
                value: 40,
            },
            Insn::Checksum {
                src: v + 0x1_0000,
                len: 10_000,
                dst: v + 0x400,
            },
            Insn::Fence {
                notify: true,
                va: v + 0x500,
                value: 0x77,
            },
            Insn::Fence {
                notify: false,
                va: v + 0x508,
                value: 0x78,
            },
            Insn::End,
        ],
    );
    // FENCE completion precedes JOB_DONE.
    let f =
        r.d.wait_completion(|c| c.kind == CompletionKind::Fence.as_u32());
    assert_eq!((f.seqno, f.value, f.ctx_id, f.status), (s, 0x77, 3, 0));
    assert_eq!(r.d.wait_job(s), 0);
    let d = r.data;
    assert_eq!(r.d.read_u32(d + 4), 0xdead_bef0);
    assert_eq!(r.d.read_u64(d + 8), 1); // wrapped
    assert_eq!(r.d.fe.ram.read(d + 0x100, 8), vec![4, 3, 2, 1, 4, 3, 2, 1]);
    assert_eq!(r.d.fe.ram.read(d + 0x2_0001, 9000), src[3..9003].to_vec());
    assert_eq!(r.d.read_u32(d + 0x200), 12);
    assert_eq!(r.d.read_u64(d + 0x400), fnv1a64(&src));
    assert_eq!(
        (r.d.read_u64(d + 0x500), r.d.read_u64(d + 0x508)),
        (0x77, 0x78)
    );
    let st = r.d.stats();
    assert!(st.instructions >= 30);
    assert_eq!(st.completions_posted, 2, "the FENCE and the JOB_DONE");
}

#[test]
fn wait_on_a_semaphore_written_by_another_context() {
    let mut r = Rig::new(options(), 0);
    r.d.create(1, ASID);
    r.d.create(2, ASID);
    let sem = DATA_VA + 0x800;
    let waiter = r.run(
        1,
        &[
            Insn::Wait {
                size64: false,
                op: CompareOp::Eq,
                timeout_us: 0,
                va: sem,
                value: 5,
            },
            store64(DATA_VA + 0x808, 1),
            Insn::End,
        ],
    );
    thread::sleep(Duration::from_millis(5));
    assert_eq!(r.d.read_u64(r.data + 0x808), 0, "still waiting");
    r.run_ok(
        2,
        &[
            Insn::Store {
                size64: false,
                va: sem,
                value: 5,
            },
            Insn::End,
        ],
    );
    assert_eq!(r.d.wait_job(waiter), 0);
    assert_eq!(r.d.read_u64(r.data + 0x808), 1);
    // A WAIT that times out fails the job.
    let s = r.run(
        2,
        &[
            Insn::Wait {
                size64: true,
                op: CompareOp::Gt,
                timeout_us: 200,
                va: sem,
                value: u64::MAX,
            },
            Insn::End,
        ],
    );
    assert_eq!(r.d.wait_job(s), Status::JobSemaphoreTimeout.as_u32());
}

fn expect_failure(r: &mut Rig, ctx: u32, insns: &[Insn], status: Status) {
    r.d.create(ctx, ASID);
    // Queue the job and a second one behind it while preempted; the second is skipped.
    let p = r.d.ok(Opcode::CtxPreempt, &Driver::ctx_body(ctx));
    assert_eq!(r.d.wait_done(p).status, 0);
    let s = r.run(ctx, insns);
    let s2 = r.run(ctx, &[Insn::End]);
    let q = r.d.ok(Opcode::CtxResume, &Driver::ctx_body(ctx));
    assert_eq!(r.d.wait_done(q).status, 0);
    assert_eq!(r.d.wait_job(s), status.as_u32(), "{insns:?}");
    let ev =
        r.d.wait_event(|e| matches!(e, Event::ContextError(c) if c.ctx_id == ctx));
    let Event::ContextError(ce) = ev else {
        unreachable!()
    };
    assert_eq!(
        (ce.error, ce.asid, ce.job_seqno),
        (status.as_u32(), ASID, s)
    );
    assert_eq!(r.d.wait_job(s2), Status::JobSkipped.as_u32());
    // The context is in the error state until destroyed.
    let b = JobSubmitReq {
        ctx_id: ctx,
        flags: 0,
        batch_va: BATCH_VA,
        batch_len: 8,
        reserved: 0,
    };
    assert_eq!(
        r.d.cmd(Opcode::JobSubmit, &b.to_bytes()).0,
        Status::BadState
    );
    r.d.ok(Opcode::CtxDestroy, &Driver::ctx_body(ctx));
}

#[test]
fn job_errors_and_garbage_instructions() {
    let mut r = Rig::new(options(), 0);
    use Status::*;
    // Zeroed memory (opcode 0).
    r.d.fe.ram.write(r.batch + 0x8000, &[0u8; 64]);
    r.d.create(10, ASID);
    let s = r.d.submit(10, BATCH_VA + 0x8000, 64);
    assert_eq!(r.d.wait_job(s), JobInvalidInstruction.as_u32());
    r.d.ok(Opcode::CtxDestroy, &Driver::ctx_body(10));
    // No END: runs off the batch.
    expect_failure(&mut r, 11, &[Insn::Nop, Insn::Nop], JobBatchOverrun);
    // Instruction longer than what is left of the batch.
    r.d.create(12, ASID);
    r.d.fe
        .ram
        .write(r.batch + 0x9000, &header(OP_STORE, 0, 0, 0).to_le_bytes());
    let s = r.d.submit(12, BATCH_VA + 0x9000, 8);
    assert_eq!(r.d.wait_job(s), JobBatchOverrun.as_u32());
    r.d.ok(Opcode::CtxDestroy, &Driver::ctx_body(12));
    // Misaligned store; reserved header bits; bad LOOP target; loop nesting overflow.
    expect_failure(
        &mut r,
        13,
        &[store64(DATA_VA + 4, 1), Insn::End],
        JobMisaligned,
    );
    r.d.create(14, ASID);
    r.d.fe.ram.write(
        r.batch + 0xa000,
        &(header(OP_NOP, 0, 0, 0) | 1 << 24).to_le_bytes(),
    );
    let s = r.d.submit(14, BATCH_VA + 0xa000, 8);
    assert_eq!(r.d.wait_job(s), JobInvalidInstruction.as_u32());
    r.d.ok(Opcode::CtxDestroy, &Driver::ctx_body(14));
    expect_failure(
        &mut r,
        15,
        &[Insn::Loop {
            count: 2,
            offset: -0x10_0000,
        }],
        JobInvalidInstruction,
    );
    let mut deep = vec![Insn::Nop];
    for i in 0..5 {
        deep.push(Insn::Loop {
            count: 2,
            offset: -8 - 16 * i,
        });
    }
    deep.push(Insn::End);
    expect_failure(&mut r, 16, &deep, JobLoopOverflow);

    // Random garbage batches: every job ends with some status, the device keeps serving.
    let mut x: u64 = 0x853c_49e6_748f_ea9b;
    r.d.create(20, ASID);
    for round in 0..40 {
        let mut bytes = Vec::new();
        for i in 0..32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Valid opcodes with garbage operands, sometimes pointing into the data area.
            let q = match i % 4 {
                0 => (x & 0xffff_ffff_00ff_ffff) & !0xf0 | ((x >> 8) % 12),
                1 => DATA_VA + (x & 0x3_fff8),
                _ => x,
            };
            bytes.extend_from_slice(&q.to_le_bytes());
        }
        r.d.fe.ram.write(r.batch + 0xc000, &bytes);
        let s = r.d.submit(20, BATCH_VA + 0xc000, bytes.len() as u32);
        let c =
            r.d.wait_completion(|c| c.kind == CompletionKind::JobDone.as_u32() && c.seqno == s);
        // A fault on garbage: cancel it.
        if c.status != 0 {
            r.d.ok(Opcode::CtxDestroy, &Driver::ctx_body(20));
            r.d.create(20, ASID);
        }
        let _ = round;
        r.d.poll();
        for (_, e) in std::mem::take(&mut r.d.events) {
            if let Event::PageFault(f) = e {
                let _ = r.d.reply(f.fault_id, FaultAction::Cancel);
            }
        }
    }
    let (h, _, _) = r.d.fe.control(Opcode::GetInfo.as_u32(), &[], 40);
    assert_eq!(h.status, 0);
}

#[test]
fn garbage_instructions_that_fault_are_answered() {
    // Garbage that reaches memory faults; faults get replies; every job completes.
    let mut r = Rig::new(options(), 0);
    r.d.create(1, ASID);
    let mut x: u64 = 0x1234_5678_9abc_def0;
    for _ in 0..30 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let insn = match x % 4 {
            0 => store64(x & 0xffff_ffff_fff8, x),
            1 => copy(x & 0xffff_ffff_ffff, (x >> 3) & 0xffff_ffff_ffff, x % 5000),
            2 => Insn::Checksum {
                src: x >> 16,
                len: x % 3000,
                dst: DATA_VA,
            },
            _ => Insn::Fill {
                va: (x >> 20) & !3,
                len: (x % 100) * 4,
                pattern: x as u32,
            },
        };
        let s = r.run(1, &[insn, Insn::End]);
        loop {
            r.d.poll();
            if let Some(i) = r.d.completions.iter().position(|c| c.seqno == s) {
                let c = r.d.completions.remove(i);
                if c.status != 0 {
                    r.d.ok(Opcode::CtxDestroy, &Driver::ctx_body(1));
                    r.d.create(1, ASID);
                }
                break;
            }
            if let Some(i) =
                r.d.events
                    .iter()
                    .position(|(_, e)| matches!(e, Event::PageFault(_)))
            {
                let (_, Event::PageFault(f)) = r.d.events.remove(i) else {
                    unreachable!()
                };
                assert_eq!(r.d.reply(f.fault_id, FaultAction::Cancel), Status::Ok);
            }
            thread::sleep(Duration::from_micros(100));
        }
    }
}

#[test]
fn page_fault_resume_and_cancel() {
    let mut r = Rig::new(options(), 0);
    r.d.create(1, ASID);
    let hole = 0x5000_0000u64;
    // COPY from a mapped page into a range whose second page is missing: the fault names
    // the missing page, the part before it is copied (a bulk instruction is restartable,
    // spec 6.13.3) and the rest after RESUME.
    let dst_a = r.d.fe.ram.alloc(4096, 4096);
    r.d.map_4k(&r.pt, hole, dst_a, RW);
    r.d.fe.ram.write(r.data, &[0x11; 64]);
    let s = r.run(1, &[copy(hole + 4064, DATA_VA, 64), Insn::End]);
    let f = r.d.wait_fault();
    assert_eq!(
        (f.va, f.asid, f.ctx_id, f.access, f.reason, f.level),
        (
            hole + 4096,
            ASID,
            1,
            AccessKind::Write.as_u32(),
            FaultReason::NotPresent.as_u32(),
            0
        )
    );
    assert_eq!(
        r.d.fe.ram.read(dst_a + 4064, 32),
        vec![0x11; 32],
        "the part before the missing page"
    );
    let dst_b = r.d.fe.ram.alloc(4096, 4096);
    r.d.map_4k(&r.pt, hole + 4096, dst_b, RW);
    assert_eq!(r.d.reply(f.fault_id, FaultAction::Resume), Status::Ok);
    assert_eq!(r.d.wait_job(s), 0);
    assert_eq!(r.d.fe.ram.read(dst_b, 32), vec![0x11; 32]);
    assert_eq!(r.d.reply(f.fault_id, FaultAction::Resume), Status::NotFound);

    // Write to a read-only page: WRITE_PROTECT; cancel fails the job with JOB_FAULT.
    let ro = 0x5100_0000;
    let ro_pa = r.d.fe.ram.alloc(4096, 4096);
    r.d.map_4k(&r.pt, ro, ro_pa, RX);
    let s = r.run(1, &[store64(ro + 8, 1), Insn::End]);
    let f = r.d.wait_fault();
    assert_eq!(
        (f.va, f.reason, f.level),
        (ro + 8, FaultReason::WriteProtect.as_u32(), 0)
    );
    assert_eq!(r.d.reply(f.fault_id, FaultAction::Cancel), Status::Ok);
    assert_eq!(r.d.wait_job(s), Status::JobFault.as_u32());
    let Event::ContextError(ce) = r.d.wait_event(|e| matches!(e, Event::ContextError(_))) else {
        unreachable!()
    };
    assert_eq!(
        (ce.error, ce.address, ce.ctx_id),
        (Status::JobFault.as_u32(), ro + 8, 1)
    );
    r.d.ok(Opcode::CtxDestroy, &Driver::ctx_body(1));

    // Instruction fetch from a NO_EXEC page: EXEC_PROTECT.
    r.d.create(2, ASID);
    r.d.fe.ram.write(r.data + 0x4000, &encode(&[Insn::End]));
    let s = r.d.submit(2, DATA_VA + 0x4000, 8);
    let f = r.d.wait_fault();
    assert_eq!(
        (f.access, f.reason),
        (AccessKind::Exec.as_u32(), FaultReason::ExecProtect.as_u32())
    );
    // Upgrading the PTE needs no invalidation: resume and it runs.
    r.d.map_4k(&r.pt, DATA_VA + 0x4000, r.data + 0x4000, RWX);
    assert_eq!(r.d.reply(f.fault_id, FaultAction::Resume), Status::Ok);
    assert_eq!(r.d.wait_job(s), 0);

    // Resume without fixing: a new fault with a new id.
    let s = r.run(2, &[store64(0x6000_0000, 1), Insn::End]);
    let f1 = r.d.wait_fault();
    assert_eq!(r.d.reply(f1.fault_id, FaultAction::Resume), Status::Ok);
    let f2 = r.d.wait_fault();
    assert!(f2.fault_id > f1.fault_id);
    assert_eq!(r.d.reply(f2.fault_id, FaultAction::Cancel), Status::Ok);
    assert_eq!(r.d.wait_job(s), Status::JobFault.as_u32());
    // Unknown ids and bad actions.
    assert_eq!(r.d.reply(999_999, FaultAction::Resume), Status::NotFound);
    let b = FaultReplyReq {
        fault_id: f2.fault_id,
        action: 7,
        flags: 0,
    };
    assert_eq!(
        r.d.cmd(Opcode::FaultReply, &b.to_bytes()).0,
        Status::InvalidArgument
    );
    let st = r.d.stats();
    assert_eq!(
        (st.page_faults, st.faults_resumed, st.faults_canceled),
        (5, 3, 2)
    );
}

/// Forward progress under CPU churn (spec 6.13.3): a CHECKSUM over the 64 pages of the
/// data area while "the CPU" unmaps every other page of it (PTEs cleared, TLB_INVALIDATE
/// completed) each time a fault is resolved, before the RESUME. An instruction that needs
/// its whole range mapped at once never finishes; a restartable one needs one fault per
/// page.
#[test]
fn a_bulk_instruction_finishes_while_every_fault_unmaps_the_rest() {
    let mut r = Rig::new(options(), 0);
    r.d.create(1, ASID);
    let pages = 64u64;
    let bytes: Vec<u8> = (0..pages * 4096)
        .map(|i| (i * 13 + (i >> 12)) as u8)
        .collect();
    r.d.fe.ram.write(r.data, &bytes);
    // Every page but `keep` unmapped, `keep` mapped, and the TLB told.
    fn churn(r: &mut Rig, pages: u64, keep: Option<u64>) {
        for p in (0..pages).filter(|&p| Some(p) != keep) {
            r.d.set_pte(&r.pt, DATA_VA + p * 4096, 0, 0);
        }
        if let Some(p) = keep {
            let pa = r.data + p * 4096;
            r.d.map_4k(&r.pt, DATA_VA + p * 4096, pa, RW);
        }
        let s = r.d.invalidate(ASID, DATA_VA, pages * 4096);
        assert_eq!(r.d.wait_done(s).status, 0);
    }
    churn(&mut r, pages, None);
    let out = BATCH_VA + 0x8000;
    let s = r.run(
        1,
        &[
            Insn::Checksum {
                src: DATA_VA,
                len: pages * 4096,
                dst: out,
            },
            Insn::End,
        ],
    );
    // How long the faults were with "the driver" at least: from the event seen to the reply
    // sent (each includes an invalidation round trip).
    let mut held = Duration::ZERO;
    let t0 = Instant::now();
    for p in 0..pages {
        let f = r.d.wait_fault();
        let seen = Instant::now();
        assert_eq!(f.va, DATA_VA + p * 4096, "fault {p} is on the next page");
        churn(&mut r, pages, Some(p));
        held += seen.elapsed();
        assert_eq!(r.d.reply(f.fault_id, FaultAction::Resume), Status::Ok);
    }
    assert_eq!(r.d.wait_job(s), 0);
    let total = t0.elapsed();
    assert_eq!(r.d.read_u64(r.batch + 0x8000), fnv1a64(&bytes));
    let st = r.d.stats();
    assert_eq!((st.page_faults, st.faults_resumed), (pages, pages));
    // The fault-service counters (spec 6.18): every resumed fault was retried, the driver's
    // part holds at least what the test spent on each, and the parts add up.
    assert_eq!(st.faults_retried, pages);
    let ns = |d: Duration| d.as_nanos() as u64;
    assert!(
        st.fault_driver_ns >= ns(held),
        "driver part {} ns < {} ns held",
        st.fault_driver_ns,
        ns(held)
    );
    assert!(st.fault_retry_ns > st.fault_driver_ns && st.fault_retry_ns <= ns(total));
    let stats = r.be.gpu.stats();
    let device_part =
        stats.get_extra(Extra::FaultDeliverNs) + stats.get_extra(Extra::FaultResumeNs);
    assert!(
        (st.fault_driver_ns + device_part).abs_diff(st.fault_retry_ns) <= 3 * pages,
        "{} + {device_part} != {}",
        st.fault_driver_ns,
        st.fault_retry_ns
    );
}

#[test]
fn garbage_page_tables_fault_cleanly() {
    let mut r = Rig::new(options(), 0);
    r.d.create(1, ASID);
    let cases: [(u64, u32, u64, FaultReason); 4] = [
        (
            0x7000_0000,
            0,
            0x4000 | pte::PRESENT | 1 << 5,
            FaultReason::ReservedBit,
        ),
        (
            0x7100_0000,
            1,
            0x20_1000 | pte::PRESENT | pte::HUGE,
            FaultReason::ReservedBit,
        ),
        (
            0x7200_0000,
            1,
            pte::table(1 << 45).unwrap(),
            FaultReason::BadTableAddress,
        ),
        (
            0x7300_0000,
            0,
            pte::page_4k(1 << 44, RW).unwrap(),
            FaultReason::BadPageAddress,
        ),
    ];
    for (va, level, raw, reason) in cases {
        r.d.set_pte(&r.pt, va, level, raw);
        let s = r.run(1, &[store64(va, 1), Insn::End]);
        let f = r.d.wait_fault();
        assert_eq!((f.va, f.reason), (va, reason.as_u32()), "{va:#x}");
        assert_eq!(r.d.reply(f.fault_id, FaultAction::Cancel), Status::Ok);
        assert_eq!(r.d.wait_job(s), Status::JobFault.as_u32());
        r.d.ok(Opcode::CtxDestroy, &Driver::ctx_body(1));
        r.d.create(1, ASID);
    }
    // A VA beyond 48 bits.
    let s = r.run(1, &[store64(1 << 50, 1), Insn::End]);
    let f = r.d.wait_fault();
    assert_eq!(f.reason, FaultReason::VaRange.as_u32());
    r.d.reply(f.fault_id, FaultAction::Cancel);
    r.d.wait_job(s);
    assert!(r.d.stats().pte_errors >= 3);
}

#[test]
fn many_faults_outstanding_and_coalescing() {
    // Without coalescing, max 2 outstanding: the third waits for a slot.
    let mut r = Rig::new(
        DeviceOptions {
            max_faults: 2,
            ..options()
        },
        0,
    );
    let base = 0x6000_0000u64;
    let mut jobs = Vec::new();
    for ctx in 1..=3u32 {
        r.d.create(ctx, ASID);
        jobs.push(r.run(
            ctx,
            &[store64(base + u64::from(ctx) * 0x1000, 1), Insn::End],
        ));
    }
    let f1 = r.d.wait_fault();
    let f2 = r.d.wait_fault();
    thread::sleep(Duration::from_millis(5));
    r.d.poll();
    assert!(!r
        .d
        .events
        .iter()
        .any(|(_, e)| matches!(e, Event::PageFault(_))));
    for f in [f1, f2] {
        let pa = r.d.fe.ram.alloc(4096, 4096);
        r.d.map_4k(&r.pt, f.va & !0xfff, pa, RW);
        assert_eq!(r.d.reply(f.fault_id, FaultAction::Resume), Status::Ok);
    }
    let f3 = r.d.wait_fault();
    let pa = r.d.fe.ram.alloc(4096, 4096);
    r.d.map_4k(&r.pt, f3.va & !0xfff, pa, RW);
    r.d.reply(f3.fault_id, FaultAction::Resume);
    for s in jobs {
        assert_eq!(r.d.wait_job(s), 0);
    }

    // With coalescing: four contexts faulting on one page share one fault.
    let mut r = Rig::new(options(), 1 << SVMGPU_F_FAULT_COALESCE);
    let page = 0x6100_0000u64;
    let mut jobs = Vec::new();
    for ctx in 1..=4u32 {
        r.d.create(ctx, ASID);
        jobs.push(r.run(
            ctx,
            &[
                store64(page + 8 * u64::from(ctx), u64::from(ctx)),
                Insn::End,
            ],
        ));
    }
    let f = r.d.wait_fault();
    // Give every context time to hit the page.
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.be.gpu.stats().get_extra(Extra::FaultsCoalesced) < 3 {
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(1));
    }
    r.d.poll();
    assert!(!r
        .d
        .events
        .iter()
        .any(|(_, e)| matches!(e, Event::PageFault(_))));
    let pa = r.d.fe.ram.alloc(4096, 4096);
    r.d.map_4k(&r.pt, page, pa, RW);
    assert_eq!(r.d.reply(f.fault_id, FaultAction::Resume), Status::Ok);
    for s in jobs {
        assert_eq!(r.d.wait_job(s), 0);
    }
    for ctx in 1..=4u64 {
        assert_eq!(r.d.read_u64(pa + 8 * ctx), ctx);
    }
    assert_eq!(r.d.stats().page_faults, 1);
}

/// A batch that adds 1 to `counter` `n` times with a DELAY of `ns` between adds.
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

#[test]
fn preempt_stops_and_resume_continues_exactly() {
    let mut r = Rig::new(options(), 0);
    let ctxs = [1u32, 2, 3, 4];
    let n = 2000;
    let mut jobs = Vec::new();
    for &c in &ctxs {
        r.d.create(c, ASID);
        jobs.push(r.run(c, &counting_loop(DATA_VA + 8 * u64::from(c), n, 20_000)));
    }
    // Wait until all have made progress.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ctxs
        .iter()
        .all(|&c| r.d.read_u64(r.data + 8 * u64::from(c)) > 2)
    {
        assert!(Instant::now() < deadline, "no progress");
        thread::sleep(Duration::from_millis(1));
    }
    // Start all preemptions at once, wait for them afterwards.
    let t = Instant::now();
    let seqnos: Vec<u64> = ctxs
        .iter()
        .map(|&c| r.d.ok(Opcode::CtxPreempt, &Driver::ctx_body(c)))
        .collect();
    for (&s, &c) in seqnos.iter().zip(&ctxs) {
        let done = r.d.wait_done(s);
        assert_eq!(
            (done.status, done.ctx_id, done.opcode),
            (0, c, Opcode::CtxPreempt.as_u32())
        );
    }
    assert!(t.elapsed() >= Duration::from_micros(200));
    let counts: Vec<u64> = ctxs
        .iter()
        .map(|&c| r.d.read_u64(r.data + 8 * u64::from(c)))
        .collect();
    thread::sleep(Duration::from_millis(20));
    let later: Vec<u64> = ctxs
        .iter()
        .map(|&c| r.d.read_u64(r.data + 8 * u64::from(c)))
        .collect();
    assert_eq!(counts, later, "preempted contexts do not run");
    assert!(counts.iter().all(|&x| x < u64::from(n)));
    // Jobs may still be submitted to a preempted context; they run after resume.
    let extra = r.run(1, &[store64(DATA_VA + 0x100, 5), Insn::End]);
    // Preempting again completes OK at once; resume continues exactly where it stopped.
    let s = r.d.ok(Opcode::CtxPreempt, &Driver::ctx_body(1));
    assert_eq!(r.d.wait_done(s).status, 0);
    for &c in &ctxs {
        let s = r.d.ok(Opcode::CtxResume, &Driver::ctx_body(c));
        assert_eq!(r.d.wait_done(s).status, 0);
    }
    for s in jobs {
        assert_eq!(r.d.wait_job(s), 0);
    }
    assert_eq!(r.d.wait_job(extra), 0);
    for &c in &ctxs {
        assert_eq!(r.d.read_u64(r.data + 8 * u64::from(c)), u64::from(n));
    }
    // Resume of a context that is not preempted completes OK.
    let s = r.d.ok(Opcode::CtxResume, &Driver::ctx_body(2));
    assert_eq!(r.d.wait_done(s).status, 0);
    assert_eq!(r.d.stats().preemptions, 5);
}

#[test]
fn preempt_a_stalled_context_and_destroy_cancels_pending_ops() {
    let mut r = Rig::new(options(), 0);
    r.d.create(1, ASID);
    let s = r.run(1, &[store64(0x6400_0000, 3), Insn::End]);
    let f = r.d.wait_fault();
    let p = r.d.ok(Opcode::CtxPreempt, &Driver::ctx_body(1));
    assert_eq!(r.d.wait_done(p).status, 0);
    // The fault stays outstanding; resolving it does not run the preempted context.
    let pa = r.d.fe.ram.alloc(4096, 4096);
    r.d.map_4k(&r.pt, 0x6400_0000, pa, RW);
    assert_eq!(r.d.reply(f.fault_id, FaultAction::Resume), Status::Ok);
    thread::sleep(Duration::from_millis(5));
    assert_eq!(r.d.read_u64(pa), 0);
    let q = r.d.ok(Opcode::CtxResume, &Driver::ctx_body(1));
    assert_eq!(r.d.wait_done(q).status, 0);
    assert_eq!(r.d.wait_job(s), 0);
    assert_eq!(r.d.read_u64(pa), 3);

    // Destroy a running context with a preemption outstanding: CANCELED, no JOB_DONE.
    r.d.create(2, ASID);
    let long = r.run(2, &counting_loop(DATA_VA, 1000, 100_000));
    thread::sleep(Duration::from_millis(2));
    let p = r.d.ok(Opcode::CtxPreempt, &Driver::ctx_body(2));
    r.d.ok(Opcode::CtxDestroy, &Driver::ctx_body(2));
    let done = r.d.wait_done(p);
    assert!(done.status == Status::Canceled.as_u32() || done.status == 0);
    let v = r.d.read_u64(r.data);
    thread::sleep(Duration::from_millis(5));
    assert_eq!(r.d.read_u64(r.data), v, "nothing runs after destroy");
    r.d.poll();
    assert!(!r.d.completions.iter().any(|c| c.seqno == long));
    // The id can be reused at once.
    r.d.create(2, ASID);
    r.run_ok(2, &[Insn::End]);
}

#[test]
fn concurrency_across_engines() {
    let mut r = Rig::new(
        DeviceOptions {
            engines: 4,
            timeslice_us: 200,
            ..options()
        },
        0,
    );
    let shared = DATA_VA + 0x3_0000;
    let mut jobs = Vec::new();
    for c in 0..8u32 {
        r.d.create(c, ASID);
        let own = DATA_VA + 0x1000 * u64::from(c);
        for _ in 0..3 {
            jobs.push(r.run(
                c,
                &[
                    Insn::AtomicAdd {
                        size64: true,
                        va: shared,
                        value: 1,
                    },
                    Insn::Loop {
                        count: 500,
                        offset: -24,
                    },
                    Insn::Fill {
                        va: own,
                        len: 4096,
                        pattern: c,
                    },
                    Insn::Fence {
                        notify: true,
                        va: own + 4088,
                        value: u64::from(c),
                    },
                    Insn::End,
                ],
            ));
        }
    }
    for s in jobs {
        assert_eq!(r.d.wait_job(s), 0);
    }
    assert_eq!(r.d.read_u64(r.data + 0x3_0000), 8 * 3 * 500);
    for c in 0..8u64 {
        assert_eq!(r.d.read_u32(r.data + 0x1000 * c + 4), c as u32);
    }
    let fences =
        r.d.completions
            .iter()
            .filter(|c| c.kind == CompletionKind::Fence.as_u32())
            .count();
    assert_eq!(fences, 24);
}

#[test]
fn reset_discards_everything_and_the_device_keeps_serving() {
    let mut r = Rig::new(options(), 0);
    r.d.create(1, ASID);
    let long = r.run(1, &counting_loop(DATA_VA, 10_000, 100_000));
    r.d.create(2, ASID);
    let _ = r.run(2, &[store64(0x6800_0000, 1), Insn::End]);
    let f = r.d.wait_fault();
    let slow = TlbInvalidateReq {
        asid: ASID,
        flags: TLB_INVAL_F_WHOLE_ASID,
        va: 0,
        size: 0,
    };
    let _ = r.d.ok(Opcode::TlbInvalidate, &slow.to_bytes());
    r.d.ok(Opcode::Reset, &ResetReq::default().to_bytes());
    let Event::DeviceReset(e) = r.d.wait_event(|e| matches!(e, Event::DeviceReset(_))) else {
        unreachable!()
    };
    assert_eq!(
        (e.reason, e.reset_count),
        (ResetReason::DriverRequest.as_u32(), 1)
    );
    let v = r.d.read_u64(r.data);
    thread::sleep(Duration::from_millis(5));
    assert_eq!(r.d.read_u64(r.data), v, "nothing runs after reset");
    r.d.poll();
    assert!(!r.d.completions.iter().any(|c| c.seqno == long));
    assert_eq!(r.d.reply(f.fault_id, FaultAction::Resume), Status::NotFound);
    // Contexts and bindings are gone.
    let b = CtxCreateReq {
        ctx_id: 1,
        asid: ASID,
        flags: 0,
        reserved: 0,
    };
    assert_eq!(
        r.d.cmd(Opcode::CtxCreate, &b.to_bytes()).0,
        Status::BadState
    );
    r.d.bind(ASID, &r.pt);
    r.d.create(1, ASID);
    r.run_ok(1, &[store64(DATA_VA + 16, 4), Insn::End]);
    assert_eq!(r.d.stats().resets, 1);
}

#[test]
fn command_validation() {
    let mut r = Rig::new(
        DeviceOptions {
            tlb_inval_latency_ns: 1_000_000_000,
            ..options()
        },
        0,
    );
    use Status::*;
    let max_ctx = r.d.fe.get_config(Config::OFFSET_MAX_CONTEXTS as u32, 4);
    let max_ctx = u32::from_le_bytes(max_ctx.try_into().unwrap());
    let create = |ctx_id, asid, flags, reserved| {
        CtxCreateReq {
            ctx_id,
            asid,
            flags,
            reserved,
        }
        .to_bytes()
    };
    let cases: Vec<(Opcode, Vec<u8>, Status)> = vec![
        (
            Opcode::Reset,
            ResetReq {
                flags: 1,
                reserved: 0,
            }
            .to_bytes()
            .to_vec(),
            InvalidArgument,
        ),
        (
            Opcode::CtxCreate,
            create(max_ctx, ASID, 0, 0).to_vec(),
            InvalidArgument,
        ),
        (
            Opcode::CtxCreate,
            create(1, 9999, 0, 0).to_vec(),
            InvalidArgument,
        ),
        (
            Opcode::CtxCreate,
            create(1, ASID, 2, 0).to_vec(),
            InvalidArgument,
        ),
        (
            Opcode::CtxCreate,
            create(1, ASID, 0, 1).to_vec(),
            InvalidArgument,
        ),
        (Opcode::CtxCreate, create(1, 5, 0, 0).to_vec(), BadState),
        (Opcode::CtxDestroy, Driver::ctx_body(7).to_vec(), NotFound),
        (
            Opcode::CtxDestroy,
            CtxReq {
                ctx_id: 1,
                flags: 1,
            }
            .to_bytes()
            .to_vec(),
            InvalidArgument,
        ),
        (Opcode::CtxPreempt, Driver::ctx_body(7).to_vec(), NotFound),
        (
            Opcode::CtxResume,
            Driver::ctx_body(max_ctx).to_vec(),
            InvalidArgument,
        ),
        (
            Opcode::AsidBind,
            AsidBindReq {
                asid: 2,
                flags: 0,
                pt_root: 0x1008,
            }
            .to_bytes()
            .to_vec(),
            InvalidArgument,
        ),
        (
            Opcode::AsidBind,
            AsidBindReq {
                asid: 2,
                flags: 0,
                pt_root: RAM,
            }
            .to_bytes()
            .to_vec(),
            BadAddress,
        ),
        (
            Opcode::AsidBind,
            AsidBindReq {
                asid: 2,
                flags: 0,
                pt_root: 1 << 52,
            }
            .to_bytes()
            .to_vec(),
            InvalidArgument,
        ),
        (
            Opcode::AsidBind,
            AsidBindReq {
                asid: 2,
                flags: 1,
                pt_root: 0,
            }
            .to_bytes()
            .to_vec(),
            InvalidArgument,
        ),
        (
            Opcode::AsidUnbind,
            AsidUnbindReq { asid: 3, flags: 0 }.to_bytes().to_vec(),
            NotFound,
        ),
        (
            Opcode::TlbInvalidate,
            TlbInvalidateReq {
                asid: ASID,
                flags: 0,
                va: 0x1000,
                size: 0,
            }
            .to_bytes()
            .to_vec(),
            InvalidArgument,
        ),
        (
            Opcode::TlbInvalidate,
            TlbInvalidateReq {
                asid: ASID,
                flags: 0,
                va: 0x1001,
                size: 4096,
            }
            .to_bytes()
            .to_vec(),
            InvalidArgument,
        ),
        (
            Opcode::TlbInvalidate,
            TlbInvalidateReq {
                asid: ASID,
                flags: 0,
                va: (1 << 48) - 4096,
                size: 8192,
            }
            .to_bytes()
            .to_vec(),
            InvalidArgument,
        ),
        (
            Opcode::TlbInvalidate,
            TlbInvalidateReq {
                asid: ASID,
                flags: 0,
                va: u64::MAX - 4095,
                size: 8192,
            }
            .to_bytes()
            .to_vec(),
            InvalidArgument,
        ),
        (
            Opcode::TlbInvalidate,
            TlbInvalidateReq {
                asid: ASID_ALL,
                flags: 0,
                va: 0,
                size: 4096,
            }
            .to_bytes()
            .to_vec(),
            InvalidArgument,
        ),
        (
            Opcode::TlbInvalidate,
            TlbInvalidateReq {
                asid: ASID,
                flags: 1,
                va: 0,
                size: 4096,
            }
            .to_bytes()
            .to_vec(),
            InvalidArgument,
        ),
        (
            Opcode::TlbInvalidate,
            TlbInvalidateReq {
                asid: ASID,
                flags: 2,
                va: 0,
                size: 0,
            }
            .to_bytes()
            .to_vec(),
            InvalidArgument,
        ),
        (
            Opcode::JobSubmit,
            JobSubmitReq {
                ctx_id: 1,
                flags: 0,
                batch_va: BATCH_VA,
                batch_len: 8,
                reserved: 0,
            }
            .to_bytes()
            .to_vec(),
            NotFound,
        ),
        (
            Opcode::FaultReply,
            FaultReplyReq {
                fault_id: 1,
                action: 1,
                flags: 1,
            }
            .to_bytes()
            .to_vec(),
            InvalidArgument,
        ),
    ];
    for (op, body, want) in cases {
        assert_eq!(r.d.cmd(op, &body).0, want, "{op:?} {body:?}");
    }
    r.d.create(1, ASID);
    assert_eq!(
        r.d.cmd(Opcode::CtxCreate, &create(1, ASID, 0, 0)).0,
        AlreadyExists
    );
    assert_eq!(
        r.d.cmd(
            Opcode::AsidUnbind,
            &AsidUnbindReq {
                asid: ASID,
                flags: 0
            }
            .to_bytes()
        )
        .0,
        BadState
    );
    let job = |batch_va, batch_len| {
        JobSubmitReq {
            ctx_id: 1,
            flags: 0,
            batch_va,
            batch_len,
            reserved: 0,
        }
        .to_bytes()
    };
    for (va, len) in [
        (BATCH_VA + 4, 8),
        (BATCH_VA, 0),
        (BATCH_VA, 12),
        (BATCH_VA, MAX_BATCH_LEN + 8),
        ((1 << 48) - 8, 16),
        (u64::MAX - 7, 8),
    ] {
        assert_eq!(
            r.d.cmd(Opcode::JobSubmit, &job(va, len)).0,
            InvalidArgument,
            "{va:#x} {len}"
        );
    }
    // 64 jobs fit a preempted context's queue; the 65th is BUSY.
    let p = r.d.ok(Opcode::CtxPreempt, &Driver::ctx_body(1));
    assert_eq!(r.d.wait_done(p).status, 0);
    r.d.fe.ram.write(r.batch, &encode(&[Insn::End]));
    for _ in 0..JOB_QUEUE_DEPTH {
        r.d.submit(1, BATCH_VA, 8);
    }
    assert_eq!(r.d.cmd(Opcode::JobSubmit, &job(BATCH_VA, 8)).0, Busy);
    // 256 slow invalidations are accepted; the 257th is BUSY.
    for _ in 0..MAX_ASYNC_OUTSTANDING {
        r.d.invalidate(ASID, 0, 4096);
    }
    let b = TlbInvalidateReq {
        asid: ASID,
        flags: 0,
        va: 0,
        size: 4096,
    };
    assert_eq!(r.d.cmd(Opcode::TlbInvalidate, &b.to_bytes()).0, Busy);
    assert_eq!(r.d.cmd(Opcode::CtxResume, &Driver::ctx_body(1)).0, Busy);
    // Unbinding a bound ASID without contexts, rebinding it.
    r.d.bind(2, &r.pt);
    r.d.ok(
        Opcode::AsidUnbind,
        &AsidUnbindReq { asid: 2, flags: 0 }.to_bytes(),
    );
    // A reset clears it all; then the device serves as new.
    r.d.ok(Opcode::Reset, &ResetReq::default().to_bytes());
    r.d.bind(ASID, &r.pt);
    r.d.create(1, ASID);
    r.d.fe.ram.write(r.batch, &encode(&[Insn::End]));
    let s = r.d.submit(1, BATCH_VA, 8);
    assert_eq!(r.d.wait_job(s), 0);
}

#[test]
fn unusable_event_and_completion_buffers() {
    let be = InProcessBackend::start(0, &options());
    let fe = TestFrontend::connect(&be.path, RAM);
    let mut d = Driver::new(fe, 0);
    // A short buffer and one outside guest RAM first, then good ones.
    let short = d.fe.ram.alloc(16, 16);
    d.post_raw(false, short, 16);
    d.post_raw(false, RAM + 4096, 32);
    d.post_raw(true, short, 16);
    d.supply(8);
    let mut r = Rig::with_driver(be, d);
    r.d.create(1, ASID);
    let before = r.d.stats().malformed_chains;
    r.run_ok(1, &[Insn::End]);
    // The record went into a good buffer after the bad ones were returned with length 0.
    assert!(r.d.unused >= 1);
    let s = r.run(1, &[store64(0x6900_0000, 1), Insn::End]);
    let f = r.d.wait_fault();
    r.d.reply(f.fault_id, FaultAction::Cancel);
    assert_eq!(r.d.wait_job(s), Status::JobFault.as_u32());
    assert_eq!(r.d.unused, 3);
    assert_eq!(r.d.stats().malformed_chains, before + 3);
}

#[test]
fn virtio_reset_by_disconnect_and_reconnect() {
    let mut r = Rig::new(options(), 0);
    r.d.create(1, ASID);
    let _ = r.run(1, &counting_loop(DATA_VA, 100_000, 100_000));
    thread::sleep(Duration::from_millis(2));
    let path = r.be.path.clone();
    let gpu = r.be.gpu.clone();
    let be = r.be;
    drop(r.d);
    // The new connection finds a fresh device.
    let fe = TestFrontend::connect(&path, RAM);
    let mut d = Driver::new(fe, 8);
    let b = CtxCreateReq {
        ctx_id: 1,
        asid: ASID,
        flags: 0,
        reserved: 0,
    };
    assert_eq!(d.cmd(Opcode::CtxCreate, &b.to_bytes()).0, Status::BadState);
    let pt = d.page_table();
    let batch = d.alloc_mapped(&pt, BATCH_VA, 4096, RWX);
    d.bind(ASID, &pt);
    d.create(1, ASID);
    let s = d.run_batch(1, BATCH_VA, batch, &[Insn::End]);
    assert_eq!(d.wait_job(s), 0);
    assert!(gpu.stats().get(svmgpu_device::stats::Counter::Resets) >= 1);
    drop(be);
}

#[test]
fn perms_are_as_spec() {
    // Sanity of the harness constants.
    assert_eq!(
        RX,
        Perms {
            writable: false,
            no_exec: false
        }
    );
}

#[test]
fn completions_are_held_until_buffers_come_and_fences_wait_for_room() {
    let be = InProcessBackend::start(0, &options());
    let fe = TestFrontend::connect(&be.path, RAM);
    let mut d = Driver::new(fe, 0);
    let pt = d.page_table();
    let batch = d.alloc_mapped(&pt, BATCH_VA, 64 << 10, RWX);
    d.alloc_mapped(&pt, DATA_VA, 4096, RW);
    d.bind(ASID, &pt);
    d.create(1, ASID);
    // 70 notifying fences: 64 are held, then the context waits for complq room.
    let n = FENCE_BACKLOG + 6;
    let mut insns = vec![
        Insn::Fence {
            notify: true,
            va: DATA_VA,
            value: 0,
        };
        n as usize
    ];
    for (i, f) in insns.iter_mut().enumerate() {
        *f = Insn::Fence {
            notify: true,
            va: DATA_VA,
            value: i as u64,
        };
    }
    insns.push(Insn::End);
    let s = d.run_batch(1, BATCH_VA, batch, &insns);
    let deadline = Instant::now() + Duration::from_secs(5);
    while be.gpu.held_records().1 < FENCE_BACKLOG as usize {
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(Duration::from_millis(5));
    assert_eq!(
        be.gpu.held_records().1,
        FENCE_BACKLOG as usize,
        "no more than the backlog"
    );
    // Buffers arrive: everything is delivered, in order, FENCEs before the JOB_DONE.
    d.supply(100);
    assert_eq!(d.wait_job(s), 0);
    let values: Vec<u64> = d
        .completions
        .iter()
        .filter(|c| c.kind == CompletionKind::Fence.as_u32())
        .map(|c| c.value)
        .collect();
    assert_eq!(values, (0..u64::from(n)).collect::<Vec<_>>());
    assert_eq!(be.gpu.held_records(), (0, 0));
}

#[test]
fn event_backlog_overflow_is_reported_as_events_lost() {
    let be = InProcessBackend::start(
        0,
        &DeviceOptions {
            max_faults: 1,
            ..options()
        },
    );
    let fe = TestFrontend::connect(&be.path, RAM);
    let mut d = Driver::new(fe, 0);
    let pt = d.page_table();
    let batch = d.alloc_mapped(&pt, BATCH_VA, 4096, RWX);
    d.bind(ASID, &pt);
    d.fe.ram.write(batch, &[0u8; 8]); // opcode 0: every job fails
                                      // Completions flow (so that the test can wait for the jobs); events do not.
    for _ in 0..128 {
        let gpa = d.fe.ram.alloc(32, 64);
        d.post_raw(false, gpa, 32);
    }
    let cap = 1 + EVENT_BACKLOG_EXTRA;
    let n = cap + 5;
    for ctx in 0..n {
        d.create(ctx, ASID);
        let s = d.submit(ctx, BATCH_VA, 8);
        assert_eq!(d.wait_job(s), Status::JobInvalidInstruction.as_u32());
    }
    assert_eq!(be.gpu.held_records().0, cap as usize);
    d.supply(100);
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.events.len() < cap as usize + 1 {
        assert!(Instant::now() < deadline, "{} events", d.events.len());
        d.poll();
        thread::sleep(Duration::from_millis(1));
    }
    let errors = d
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::ContextError(_)))
        .count();
    assert_eq!(errors, cap as usize);
    let lost: Vec<u64> = d
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::EventsLost(l) => Some(l.lost),
            _ => None,
        })
        .collect();
    assert_eq!(lost, vec![5]);
    assert_eq!(d.stats().events_lost, 5);
}

#[test]
fn random_command_storm_then_reset() {
    use std::sync::atomic::Ordering;
    let panicked = harness::watch_device_panics();

    let mut r = Rig::new(
        DeviceOptions {
            max_contexts: 8,
            max_faults: 4,
            tlb_entries: 8,
            tlb_ways: 2,
            tlb_inval_latency_ns: 20_000,
            preempt_latency_ns: 30_000,
            timeslice_us: 100,
            ..options()
        },
        (1 << SVMGPU_F_AUDIT) | (1 << SVMGPU_F_FAULT_COALESCE),
    );
    // SVMGPU_STORM_SEED=<u64> replays another storm.
    let mut x: u64 = std::env::var("SVMGPU_STORM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15)
        .max(1);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..600 {
        let v = next();
        let ctx = (v >> 8) as u32 % 9; // 8 is out of range
        let va = DATA_VA + (((v >> 16) % 0x8_0000) & !7);
        match v % 12 {
            0 => {
                let b = CtxCreateReq {
                    ctx_id: ctx,
                    asid: ASID,
                    flags: 0,
                    reserved: 0,
                };
                let _ = r.d.cmd(Opcode::CtxCreate, &b.to_bytes());
            }
            1 => {
                let _ = r.d.cmd(Opcode::CtxDestroy, &Driver::ctx_body(ctx));
            }
            2 | 3 => {
                let insns = match v >> 40 & 3 {
                    0 => vec![store64(va, v), Insn::End],
                    1 => counting_loop(va, (v >> 20) as u32 % 50 + 1, 2_000),
                    2 => vec![
                        copy(va, DATA_VA + (v >> 30) % 0x4_0000, (v >> 50) % 9000),
                        Insn::End,
                    ],
                    _ => vec![
                        Insn::Fence {
                            notify: true,
                            va: va & !7,
                            value: v,
                        },
                        Insn::Nop,
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
            4 => {
                let _ = r.d.cmd(Opcode::CtxPreempt, &Driver::ctx_body(ctx));
            }
            5 => {
                let _ = r.d.cmd(Opcode::CtxResume, &Driver::ctx_body(ctx));
            }
            6 => {
                // Unmap or remap a data page, sometimes with garbage.
                let raw = match v >> 36 & 3 {
                    0 => 0,
                    1 => v | pte::PRESENT,
                    _ => pte::page_4k(r.data + ((v >> 20) % 64) * 4096, RW).unwrap(),
                };
                r.d.set_pte(&r.pt, va & !0xfff, 0, raw);
            }
            7 => {
                let b = TlbInvalidateReq {
                    asid: if v >> 33 & 1 == 0 { ASID } else { ASID_ALL },
                    flags: (v >> 33 & 1) as u32,
                    va: if v >> 33 & 1 == 0 { va & !0xfff } else { 0 },
                    size: if v >> 33 & 1 == 0 {
                        4096 * ((v >> 50) % 16 + 1)
                    } else {
                        0
                    },
                };
                let _ = r.d.cmd(Opcode::TlbInvalidate, &b.to_bytes());
            }
            8 | 9 => {
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
                    if v >> 35 & 1 == 0 {
                        let pa = r.data + ((f.va >> 12) % 64) * 4096;
                        r.d.map_4k(&r.pt, f.va & !0xfff, pa, RW);
                        r.d.reply(f.fault_id, FaultAction::Resume);
                    } else {
                        r.d.reply(f.fault_id, FaultAction::Cancel);
                    }
                }
                r.d.completions.clear();
            }
            10 => {
                let b = FaultReplyReq {
                    fault_id: v >> 50,
                    action: (v >> 20) as u32 % 4,
                    flags: 0,
                };
                let _ = r.d.cmd(Opcode::FaultReply, &b.to_bytes());
            }
            _ => {
                let raw: Vec<u8> = (0..(v % 40) as usize)
                    .map(|i| (v >> (i % 56)) as u8)
                    .collect();
                let _ = r.d.fe.control_bytes(&raw, 64);
            }
        }
    }
    // Still serving; a reset brings it back to a clean state.
    r.d.ok(Opcode::Reset, &ResetReq::default().to_bytes());
    r.d.bind(ASID, &r.pt);
    r.d.map_4k(&r.pt, DATA_VA, r.data, RW);
    r.d.create(0, ASID);
    r.run_ok(0, &[store64(DATA_VA, 0x5a5a), Insn::End]);
    assert_eq!(r.d.read_u64(r.data), 0x5a5a);
    let st = r.d.stats();
    assert_eq!(st.stale_accesses, 0);
    assert!(st.commands_completed >= 300, "{st:?}");
    assert!(!panicked.load(Ordering::SeqCst), "a device thread panicked");
}

#[test]
fn two_pass_invalidation_on_two_devices_overlaps_the_latencies() {
    let lat = Duration::from_millis(100);
    let opts = DeviceOptions {
        tlb_inval_latency_ns: lat.as_nanos() as u32,
        ..options()
    };
    let mut a = Rig::new(opts.clone(), 0);
    let mut b = Rig::new(opts, 0);
    // Single pass: invalidate and wait on each device in turn.
    let t = Instant::now();
    for r in [&mut a, &mut b] {
        let s = r.d.invalidate(ASID, DATA_VA, 4096);
        assert_eq!(r.d.wait_done(s).status, 0);
    }
    let single = t.elapsed();
    // Two passes: start both, then wait for both.
    let t = Instant::now();
    let sa = a.d.invalidate(ASID, DATA_VA, 4096);
    let sb = b.d.invalidate(ASID, DATA_VA, 4096);
    assert_eq!(a.d.wait_done(sa).status, 0);
    assert_eq!(b.d.wait_done(sb).status, 0);
    let two = t.elapsed();
    assert!(single >= 2 * lat, "{single:?}");
    assert!(
        two >= lat && two < single,
        "two-pass {two:?}, single-pass {single:?}"
    );
    // The device's own timing of them (JSON-only counters): two invalidations each, each
    // at least the latency from acceptance to COMMAND_DONE, and exactly the latency plus
    // how late the timer completed it.
    for r in [&a, &b] {
        let stats = r.be.gpu.stats();
        let device = stats.get_extra(Extra::TlbInvalDeviceNs);
        let late = stats.get_extra(Extra::TlbInvalLateNs);
        let nominal = 2 * lat.as_nanos() as u64;
        assert!(device >= nominal, "{device} ns < {nominal} ns");
        assert!(
            (device - late).abs_diff(nominal) <= 2,
            "device {device} ns - late {late} ns != {nominal} ns"
        );
    }
}
