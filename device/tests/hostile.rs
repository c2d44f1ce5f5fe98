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
    rig_with(0, options(), 0)
}

/// A rig on device `index` (its threads are named after it) with `bufs` buffers posted.
fn rig_with(index: u32, opts: DeviceOptions, bufs: usize) -> Rig {
    let be = InProcessBackend::start(index, &opts);
    let fe = TestFrontend::connect_with(&be.path, RAM, 0);
    Rig::with_driver(be, Driver::new(fe, bufs))
}

/// Host CPU time the threads of device `index` (`svmgpu<index>-…`) have used.
fn device_cpu(index: u32) -> Duration {
    let prefix = format!("svmgpu{index}-");
    let ticks_per_s = 100; // USER_HZ on Linux
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(&prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the ")" that ends the command name: utime is the 12th, stime 13th.
        let rest = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        ticks += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Duration::from_millis(ticks * 1000 / ticks_per_s)
}

/// CPU the threads of device `index` use over `d` of wall time.
fn cpu_share_over(index: u32, d: Duration) -> f64 {
    let c0 = device_cpu(index);
    let t0 = Instant::now();
    thread::sleep(d);
    (device_cpu(index) - c0).as_secs_f64() / t0.elapsed().as_secs_f64()
}

/// Four nested LOOPs around a NOP: 2^128 iterations, a job that never ends by itself. The
/// offsets are relative, so the batch can go anywhere.
fn runaway() -> Vec<Insn> {
    let mut insns = vec![Insn::Nop];
    for depth in 0..4i64 {
        // LOOP number `depth` starts 8 + 16 × depth bytes into the batch; each loops back
        // to the NOP at its start.
        insns.push(Insn::Loop {
            count: u32::MAX,
            offset: -(8 + 16 * depth),
        });
    }
    insns.push(Insn::End);
    insns
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

#[test]
fn a_context_stuck_in_wait_costs_almost_no_host_cpu() {
    let mut r = rig_with(7, options(), 64);
    r.d.create(1, ASID);
    // WAIT without timeout on a semaphore nobody releases.
    let s = r.run(
        1,
        &[
            Insn::Wait {
                size64: false,
                op: svmgpu_spec::isa::CompareOp::Eq,
                timeout_us: 0,
                va: DATA_VA,
                value: 1,
            },
            Insn::End,
        ],
    );
    thread::sleep(Duration::from_millis(200));
    let share = cpu_share_over(7, Duration::from_secs(2));
    eprintln!("waiting engine: {:.1} % of a core", share * 100.0);
    assert!(
        share < 0.10,
        "a waiting engine used {:.0} % of a core",
        share * 100.0
    );
    // It still notices the release.
    r.d.fe.ram.write(r.data, &1u32.to_le_bytes());
    assert_eq!(r.d.wait_job(s), 0);
}

#[test]
fn a_runaway_long_running_context_costs_time_slices_not_a_host_core() {
    let mut r = rig_with(8, options(), 64);
    let b = CtxCreateReq {
        ctx_id: 1,
        asid: ASID,
        flags: CTX_F_LONG_RUNNING,
        reserved: 0,
    };
    r.d.ok(Opcode::CtxCreate, &b.to_bytes());
    let (s, _) = r.run_at(1, &runaway());
    // Past the first second of host time it is throttled when alone.
    thread::sleep(Duration::from_millis(1500));
    let share = cpu_share_over(8, Duration::from_secs(2));
    eprintln!("runaway engine: {:.1} % of a core", share * 100.0);
    assert!(
        share < 0.30,
        "a runaway job used {:.0} % of a core",
        share * 100.0
    );
    // Another context still gets its slices promptly, and the runaway one is destroyed.
    r.d.create(2, ASID);
    r.run_ok(2, &[Insn::End]);
    assert_eq!(
        r.d.cmd(Opcode::CtxDestroy, &Driver::ctx_body(1)).0,
        Status::Ok
    );
    let _ = s;
}

#[test]
fn a_job_that_runs_too_long_times_out_unless_long_running() {
    let opts = DeviceOptions {
        job_timeout_ms: 300,
        ..options()
    };
    let mut r = rig_with(9, opts, 64);
    r.d.create(1, ASID);
    let t = Instant::now();
    let (s, _) = r.run_at(1, &runaway());
    assert_eq!(r.d.wait_job(s), Status::JobTimeout.as_u32());
    assert!(t.elapsed() >= Duration::from_millis(300));
    let b = CtxCreateReq {
        ctx_id: 2,
        asid: ASID,
        flags: CTX_F_LONG_RUNNING,
        reserved: 0,
    };
    r.d.ok(Opcode::CtxCreate, &b.to_bytes());
    let (s, _) = r.run_at(2, &runaway());
    thread::sleep(Duration::from_millis(700));
    r.d.poll();
    assert!(
        !r.d.completions.iter().any(|c| c.seqno == s),
        "a long-running job does not time out"
    );
    assert_eq!(
        r.d.cmd(Opcode::CtxDestroy, &Driver::ctx_body(2)).0,
        Status::Ok
    );
}

/// Counts the warnings and errors the device logs whose text contains `needle`.
struct CountingLogger;

static LOGGED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl log::Log for CountingLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }

    fn log(&self, r: &log::Record<'_>) {
        if r.level() <= log::Level::Warn && format!("{}", r.args()).contains("control chain") {
            LOGGED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn flush(&self) {}
}

#[test]
fn a_guest_repeating_a_mistake_costs_a_few_log_lines() {
    static LOGGER: CountingLogger = CountingLogger;
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Warn);
    let mut r = rig_with(10, options(), 0);
    let req = r.d.fe.ram.alloc(64, 64);
    for _ in 0..1000 {
        // A chain with no room for a response: dropped, counted, logged.
        let used =
            r.d.fe
                .round_trip(usize::from(QUEUE_CONTROL), &[harness::Buf::r(req, 16)]);
        assert_eq!(used.len, 0);
    }
    let lines = LOGGED.load(std::sync::atomic::Ordering::Relaxed);
    assert!(lines <= 20, "{lines} log lines for 1000 malformed chains");
    assert!(lines >= 1, "the first ones are logged");
    assert!(
        r.be.gpu
            .stats()
            .get(svmgpu_device::stats::Counter::MalformedChains)
            >= 1000
    );
}
