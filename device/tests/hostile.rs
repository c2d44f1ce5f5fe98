// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A hostile guest through the harness (issue 14, section 1): one that posts no event or
//! completion buffers and keeps submitting, answers faults it never saw, loops
//! create/fault/destroy. The device must keep every backlog bounded and keep serving.

#[allow(dead_code)]
mod harness;

use std::thread;
use std::time::{Duration, Instant};

use harness::driver::{encode, Driver, RW};
use harness::rig::{Rig, ASID, BATCH_VA, DATA_VA, RAM};
use harness::{InProcessBackend, TestFrontend};
use svmgpu_device::config::DeviceOptions;
use svmgpu_spec::isa::Insn;
use svmgpu_spec::*;

fn options() -> DeviceOptions {
    DeviceOptions {
        engines: 1,
        max_faults: 4,
        tlb_inval_latency_ns: 0,
        preempt_latency_ns: 0,
        walk_latency_ns: 0,
        insn_cost_ns: 0,
        ..Default::default()
    }
}

/// A rig whose driver posts no eventq/complq buffers (it could, later, with `supply`).
fn blind_rig() -> Rig {
    let be = InProcessBackend::start(0, &options());
    let fe = TestFrontend::connect_with(&be.path, RAM, 0);
    Rig::with_driver(be, Driver::new(fe, 0))
}

fn job_body(ctx_id: u32, batch_va: u64, batch_len: u32) -> [u8; JobSubmitReq::SIZE] {
    JobSubmitReq {
        ctx_id,
        flags: 0,
        batch_va,
        batch_len,
        reserved: 0,
    }
    .to_bytes()
}

/// Waits until the device holds `n` completion records.
fn wait_held_completions(r: &Rig, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.be.gpu.held_records().1 < n {
        assert!(
            Instant::now() < deadline,
            "held {:?}, want {n} completions",
            r.be.gpu.held_records()
        );
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn submissions_without_completion_buffers_meet_busy_not_a_growing_backlog() {
    let mut r = blind_rig();
    r.d.create(1, ASID);
    r.d.fe.ram.write(r.batch, &encode(&[Insn::End]));
    let (mut ok, mut busy) = (0u32, 0u32);
    for _ in 0..2_000 {
        match r.d.cmd(Opcode::JobSubmit, &job_body(1, BATCH_VA, 8)).0 {
            Status::Ok => ok += 1,
            Status::Busy => busy += 1,
            s => panic!("{s:?}"),
        }
    }
    // Every job ran, but its JOB_DONE was never delivered: its slot is still taken.
    assert_eq!(ok, JOB_QUEUE_DEPTH, "accepted");
    assert_eq!(busy, 2_000 - JOB_QUEUE_DEPTH);
    wait_held_completions(&r, JOB_QUEUE_DEPTH as usize);
    assert_eq!(r.be.gpu.held_records().1, JOB_QUEUE_DEPTH as usize);
    // Destroying and re-creating the context frees nothing: the slots belong to the id.
    let (st, _) = r.d.cmd(Opcode::CtxDestroy, &Driver::ctx_body(1));
    assert_eq!(st, Status::Ok);
    r.d.create(1, ASID);
    assert_eq!(
        r.d.cmd(Opcode::JobSubmit, &job_body(1, BATCH_VA, 8)).0,
        Status::Busy
    );
    // Buffers come: the JOB_DONEs are delivered and the context id has room again.
    r.d.supply(JOB_QUEUE_DEPTH as usize + 8);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        r.d.poll();
        if r.d.completions.len() == JOB_QUEUE_DEPTH as usize {
            break;
        }
        assert!(Instant::now() < deadline, "{}", r.d.completions.len());
        thread::sleep(Duration::from_millis(1));
    }
    let s = r.d.submit(1, BATCH_VA, 8);
    assert_eq!(r.d.wait_job(s), 0);
}

#[test]
fn blind_fault_replies_cannot_grow_the_event_backlog() {
    let mut r = blind_rig();
    r.d.create(1, ASID);
    // A store to an unmapped page: the context faults again after every RESUME.
    let unmapped = DATA_VA + (16 << 20);
    r.d.fe.ram.write(
        r.batch,
        &encode(&[
            Insn::Store {
                size64: true,
                va: unmapped,
                value: 1,
            },
            Insn::End,
        ]),
    );
    let (st, _) = r.d.cmd(Opcode::JobSubmit, &job_body(1, BATCH_VA, 32));
    assert_eq!(st, Status::Ok);
    // Fault ids are sequential: a guest that never reads events can still guess them.
    let mut answered = 0;
    let mut id = 1;
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered < 2_000 {
        assert!(Instant::now() < deadline, "answered {answered}");
        match r.d.reply(id, FaultAction::Resume) {
            Status::Ok => {
                answered += 1;
                id += 1;
            }
            Status::NotFound => thread::yield_now(), // not raised yet
            s => panic!("{s:?}"),
        }
    }
    let (events, _) = r.be.gpu.held_records();
    assert!(
        events <= 4 + EVENT_BACKLOG_EXTRA as usize,
        "{events} events held after {answered} blind replies"
    );
}

#[test]
fn create_fault_destroy_loops_cannot_grow_the_event_backlog() {
    let mut r = blind_rig();
    let unmapped = DATA_VA + (16 << 20);
    r.d.fe.ram.write(
        r.batch,
        &encode(&[Insn::Store {
            size64: true,
            va: unmapped,
            value: 1,
        }]),
    );
    for round in 0..500 {
        r.d.create(1, ASID);
        let (st, _) = r.d.cmd(Opcode::JobSubmit, &job_body(1, BATCH_VA, 24));
        assert_eq!(st, Status::Ok, "round {round}");
        // Let it fault (or not yet: either way the destroy drops the fault).
        if round % 2 == 0 {
            thread::sleep(Duration::from_micros(200));
        }
        assert_eq!(
            r.d.cmd(Opcode::CtxDestroy, &Driver::ctx_body(1)).0,
            Status::Ok
        );
    }
    let (events, _) = r.be.gpu.held_records();
    assert!(
        events <= 4 + EVENT_BACKLOG_EXTRA as usize,
        "{events} events held after 500 create/fault/destroy rounds"
    );
    // Still serving, and with buffers the driver sees no event of a dropped fault.
    r.d.supply(128);
    r.d.map_4k(&r.pt, unmapped, r.data, RW);
    r.d.create(1, ASID);
    let s = r.d.submit(1, BATCH_VA, 24);
    // The batch has no END: it overruns without faulting.
    assert_eq!(r.d.wait_job(s), Status::JobBatchOverrun.as_u32());
    r.d.poll();
    assert!(
        !r.d.events
            .iter()
            .any(|(_, e)| matches!(e, Event::PageFault(_))),
        "{:?}",
        r.d.events
    );
}
