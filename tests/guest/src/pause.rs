//! A VM paused and continued by the host (issue 14, section 2): QEMU's `stop`/`cont` stop
//! and restart the device's rings (`GET_VRING_BASE`), which the device must treat as a
//! pause that keeps every state, not as a reset (spec 6.14.4).
//!
//! `jobs_survive_vm_pause` runs jobs of every kind on every device for [`RUN_S`] seconds of
//! guest time while the host pauses the VM: `scripts/test.sh` starts the guest with
//! `run-vm.sh --qmp-hook 'scripts/lib/qmp-pause.sh --wait-for ... --until ...'`, which
//! waits for [`START`] on the side channel, then stops and continues the VM several times
//! and checks at every stop that [`DONE`] has not been printed yet (so every pause fell
//! inside this test). Guest time does not advance while the VM is stopped, so the test
//! cannot see the pauses itself; what it checks is that nothing was lost to them: every
//! job completes with the right data, counters counted by long jobs are exact, and neither
//! the device nor the driver reset anything.

use crate::{
    ktap::Outcome,
    tests::{Env, K},
    util::*,
};
use std::collections::BTreeMap;
use svmgpu::{fnv1a64, spec::isa::Insn, Device};

/// Printed (as a KTAP diagnostic on the side channel) when the jobs start: the host's
/// pause hook starts its stop/cont rounds when it sees it.
pub const START: &str = "pause-test: jobs running";
/// Printed when every job has finished: no pause may come after it.
pub const DONE: &str = "pause-test: jobs done";
/// Guest seconds of work: longer than the hook's rounds take in guest time (5 rounds of
/// 1 s running between stops, after 1 s), with room for a slow host.
const RUN_S: u64 = 15;

/// Jobs of every kind on every device while the host pauses the VM (see the module).
pub fn jobs_survive_vm_pause(_env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else { return };
    let before = match snapshot(&devs) {
        Ok(s) => s,
        Err(e) => return k.result(name, &Outcome::Fail(e)),
    };
    k.diag(START);
    let t0 = now_ns();
    let results: Vec<Result<Counts, String>> = std::thread::scope(|sc| {
        let hs: Vec<_> = devs
            .iter()
            .enumerate()
            .map(|(i, d)| sc.spawn(move || work(d, i, t0)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or(Err("thread panicked".into())))
            .collect()
    });
    k.diag(DONE);
    let mut cases = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let o = match r {
            Ok(c) => {
                k.diag(&format!(
                    "device {i}: {} fill+checksum jobs, {} counting jobs, {} fault-mode jobs, {} invalidations, all verified",
                    c.fill, c.count, c.fault, c.inval
                ));
                Outcome::check(
                    c.fill > 0 && c.count > 0 && c.fault > 0,
                    format!("too little work to mean anything: {c:?}"),
                )
            }
            Err(e) => Outcome::Fail(e.clone()),
        };
        cases.push((format!("device_{i}_jobs_complete_with_right_data"), o));
    }
    let o = match snapshot(&devs) {
        Ok(after) => {
            let changed: Vec<String> = after
                .iter()
                .filter(|(key, v)| before.get(*key) != Some(v))
                .map(|(key, v)| format!("{key}: {} -> {v}", before.get(key).copied().unwrap_or(0)))
                .collect();
            Outcome::check(
                changed.is_empty(),
                format!("a pause is not a reset, yet: {}", changed.join(", ")),
            )
        }
        Err(e) => Outcome::Fail(e),
    };
    cases.push(("no_reset_device_or_driver".into(), o));
    k.suite(name, cases);
}

#[derive(Debug, Default)]
struct Counts {
    fill: u64,
    count: u64,
    fault: u64,
    inval: u64,
}

/// The reset counters of every device: the device's own (`GET_STATS` `resets`) and the
/// driver's (debugfs `recovery`: driver and device resets, virtio resets).
fn snapshot(devs: &[Device]) -> Result<BTreeMap<String, u64>, String> {
    let mut m = BTreeMap::new();
    for (i, d) in devs.iter().enumerate() {
        let q = ctx("DEVICE_QUERY(stats)", d.query(true))?;
        m.insert(format!("device {i} GET_STATS resets"), q.stats[20]);
        let path = format!("/sys/kernel/debug/svmgpu/virtio{}/recovery", q.bus_index);
        let text = ctx(&path, std::fs::read_to_string(&path))?;
        for line in text.lines() {
            let mut f = line.split_whitespace();
            if let (Some(key), Some(v)) = (f.next(), f.next()) {
                if matches!(key, "resets" | "virtio_resets" | "invalidation_failures") {
                    let v = v.parse().map_err(|_| format!("{path}: {line}"))?;
                    m.insert(format!("device {i} driver {key}"), v);
                }
            }
        }
    }
    Ok(m)
}

/// One device's share: until [`RUN_S`] guest seconds have passed, round after round of
/// - FILL + CHECKSUM of a bound buffer (non-fault VM), checked on the CPU;
/// - a counting job (200 × ATOMIC_ADD + DELAY 50 µs, ~10 ms: long enough to be running
///   when a pause comes) whose count must be exact;
/// - a fault-mode job that stores into fresh memory (a GPU fault per round), checked;
/// - an `mprotect` of the bound buffer (a TLB invalidation on the device).
fn work(d: &Device, i: usize, t0: u64) -> Result<Counts, String> {
    const LEN: usize = 64 * 1024;
    let mut c = Counts::default();
    let mut s = Setup::new(d, false, false)?;
    s.bind_data(LEN)?;
    let mut svm = Setup::new(d, true, false)?;
    let mut round = 0u32;
    while now_ns() - t0 < RUN_S * 1_000_000_000 {
        round += 1;
        let what = |job: &str| format!("device {i} round {round} {job}");
        // FILL + CHECKSUM.
        let pattern = (i as u32) << 24 | round;
        let b = batch(&[
            Insn::Fill {
                va: DATA_VA,
                len: LEN as u64,
                pattern,
            },
            Insn::Checksum {
                src: DATA_VA,
                len: LEN as u64,
                dst: BATCH_VA + 8192,
            },
        ]);
        s.run_ok(&b).map_err(|e| format!("{}: {e}", what("fill")))?;
        let data = s.data().as_slice();
        ensure(
            data.chunks_exact(4).all(|w| w == pattern.to_le_bytes()),
            || format!("{}: pattern not everywhere", what("fill")),
        )?;
        let sum = s.batch_buf.read_u64(8192);
        ensure(sum == fnv1a64(data), || {
            format!("{}: GPU checksum {sum:#x} != CPU's", what("fill"))
        })?;
        c.fill += 1;
        // A counting job, about 10 ms.
        s.batch_buf.write_u32(12288, 0);
        s.batch_buf.write_u32(12292, 0);
        let b = counting_job(BATCH_VA + 12288, 200, 50_000, BATCH_VA + 12292, round);
        s.run_ok(&b)
            .map_err(|e| format!("{}: {e}", what("count")))?;
        let (n, done) = (s.batch_buf.read_u32(12288), s.batch_buf.read_u32(12292));
        ensure(n == 200 && done == round, || {
            format!("{}: count {n} (want 200), done {done:#x}", what("count"))
        })?;
        c.count += 1;
        // A fault-mode job on fresh memory: a GPU fault, resolved through SVM.
        let m = ctx("mmap", svmgpu::Mapping::anon(4096))?;
        let b = batch(&[Insn::Store {
            size64: false,
            va: m.addr() + 64,
            value: u64::from(round),
        }]);
        // The fault-mode VM runs its batch from its bound batch buffer.
        svm.run_ok(&b)
            .map_err(|e| format!("{}: {e}", what("fault")))?;
        ensure(m.read_u32(64) == round, || {
            format!("{}: stored {:#x}", what("fault"), m.read_u32(64))
        })?;
        c.fault += 1;
        // An invalidation of the bound buffer on the device.
        let p = s.data().addr() as *mut libc::c_void;
        // SAFETY: Our mapping; only its protection changes.
        let rc = unsafe { libc::mprotect(p, LEN, libc::PROT_READ) };
        // SAFETY: As above.
        let rc2 = unsafe { libc::mprotect(p, LEN, libc::PROT_READ | libc::PROT_WRITE) };
        ensure(rc == 0 && rc2 == 0, || {
            format!("mprotect: {}", std::io::Error::last_os_error())
        })?;
        c.inval += 1;
    }
    Ok(c)
}
