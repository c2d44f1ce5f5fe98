// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Figures of device/README.md ("Hostile guest: figures"), measured on the real
//! `svmgpu-device` binary. Not part of the suite (`#[ignore]`); run them with
//!
//! ```sh
//! cargo test --release -p svmgpu-device --test figures -- --ignored --nocapture --test-threads 1
//! ```

#[allow(dead_code)]
mod harness;

use std::thread;
use std::time::{Duration, Instant};

use harness::driver::{encode, Driver, RW, RWX};
use harness::{DaemonProcess, TestFrontend};
use svmgpu_spec::isa::{CompareOp, Insn};
use svmgpu_spec::*;

const RAM: u64 = 64 << 20;
const ASID: u32 = 1;
const BATCH_VA: u64 = 0x1000_0000;
const DATA_VA: u64 = 0x2000_0000;

/// A field of /proc/PID/status, in kB.
fn status_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// User + system CPU time of process `pid`.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10) // USER_HZ = 100
}

/// A daemon with one device, and a driver with `bufs` event/completion buffers, one bound
/// address space with a batch page and a data page, and context 1.
fn setup(args: &[&str], bufs: usize) -> (DaemonProcess, Driver, u64) {
    let mut dp = DaemonProcess::spawn(args);
    dp.wait_for_sockets(1);
    let fe = TestFrontend::connect_with(&dp.socket(0), RAM, 0);
    let mut d = Driver::new(fe, bufs);
    let pt = d.page_table();
    let batch = d.alloc_mapped(&pt, BATCH_VA, 4096, RWX);
    d.alloc_mapped(&pt, DATA_VA, 4096, RW);
    d.bind(ASID, &pt);
    d.create(1, ASID);
    (dp, d, batch)
}

#[test]
#[ignore = "a figure, not a check: run by hand (see the module doc)"]
fn figure_memory_after_blind_submissions() {
    let n: u64 = std::env::var("SVMGPU_FIGURE_SUBMISSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let (dp, mut d, batch) = setup(&["--engines", "1"], 0);
    let pid = dp.child.id();
    d.fe.ram.write(batch, &encode(&[Insn::End]));
    let body = JobSubmitReq {
        ctx_id: 1,
        flags: 0,
        batch_va: BATCH_VA,
        batch_len: 8,
        reserved: 0,
    }
    .to_bytes();
    let mut ok = 0u64;
    let t = Instant::now();
    let mut rss_at_100k = 0;
    for i in 0..n {
        if d.cmd(Opcode::JobSubmit, &body).0 == Status::Ok {
            ok += 1;
        }
        if i == 100_000 {
            rss_at_100k = status_kb(pid, "VmRSS:");
        }
    }
    let rss = status_kb(pid, "VmRSS:");
    let hwm = status_kb(pid, "VmHWM:");
    println!(
        "{n} blind JOB_SUBMITs [END] (no eventq/complq buffers) in {:.0} s: {ok} accepted; \
         backend VmRSS {rss_at_100k} kB after 100 000, {rss} kB after {n} (peak {hwm} kB)",
        t.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore = "a figure, not a check: run by hand (see the module doc)"]
fn figure_cpu_of_an_idle_device_with_a_context_stuck_in_wait() {
    let (dp, mut d, batch) = setup(&[], 64);
    let pid = dp.child.id();
    let insns = [
        Insn::Wait {
            size64: false,
            op: CompareOp::Eq,
            timeout_us: 0,
            va: DATA_VA,
            value: 1,
        },
        Insn::End,
    ];
    d.run_batch(1, BATCH_VA, batch, &insns);
    thread::sleep(Duration::from_secs(1));
    let (c0, t0) = (cpu(pid), Instant::now());
    thread::sleep(Duration::from_secs(10));
    let used = cpu(pid) - c0;
    println!(
        "backend (2 engines, defaults) with one context stuck in WAIT, nothing else: \
         {:.2} % of one core over {:.0} s",
        100.0 * used.as_secs_f64() / t0.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
