//! Fault-injection tests (spec 6.16, recovery 6.16.2): one per injected fault kind.
//!
//! Each test runs in a guest whose device was started with the injection spec that
//! `scripts/test.sh` pairs with the test's name (`inject_<kind>`, table `INJECT_SUITE` there;
//! `run-vm.sh --inject SPEC`). It injects while real work runs (non-fault and fault-mode VMs,
//! userptr invalidations, long-running queues, a buffer shared by two devices when there are
//! two), then checks what spec 6.16.2 and the uAPI header promise:
//!
//! - the affected submissions fail with the documented error (`-EIO` for work lost in a
//!   reset, `-ETIMEDOUT`/`-ECANCELED` for a hung job and the jobs behind it, `ECANCELED`
//!   for a banned queue or client) and the unaffected ones succeed;
//! - data written by the GPU before the fault is intact (CPU and GPU checksums);
//! - the device serves new work afterwards, also SVM memory (no binding), and its audit
//!   counted no violation;
//! - the benign kinds (no reset) also run an SVM workload under the injection in every
//!   SVM mode (the module reloaded with `svm_mode=single|per_device|shared`);
//! - the driver's recovery counters (debugfs `svmgpu/virtioN/recovery`) show that it saw
//!   and handled the fault, and the device's `injected_faults` that it was injected.
//!
//! The console checker of `scripts/test.sh` adds: no kernel warning, lockdep or DMA-API
//! report. Filters in the specs (`device=0`, `asid=1`, `ctx=N`) rely on the driver handing
//! out the lowest free ASID and context id, and on each test running alone in its guest.

use crate::{
    ktap::Outcome,
    tests::{Env, K},
    util::*,
};
use std::collections::BTreeMap;
use svmgpu::{fnv1a64, spec::isa::CompareOp, spec::isa::Insn, Batch, Device, Mapping};

const EIO: i32 = -libc::EIO;
const EFAULT: i32 = -libc::EFAULT;
const ETIMEDOUT: i32 = -libc::ETIMEDOUT;
const ECANCELED: i32 = -libc::ECANCELED;

/// Index of `injected_faults` and `preemptions` in the device's GET_STATS counters.
const STAT_PREEMPTIONS: usize = 15;
const STAT_INJECTED: usize = 21;

/// Batch-buffer offsets: the semaphore a blocked job waits for, and checksum results.
const SEM_OFF: usize = 12 * 4096;
const SUM_OFF: usize = 15 * 4096;

fn outcome(r: TResult) -> Outcome {
    match r {
        Ok(()) => Outcome::Pass,
        Err(e) => Outcome::Fail(e),
    }
}

struct Cases {
    list: Vec<(String, Outcome)>,
}

impl Cases {
    fn new() -> Self {
        Cases { list: Vec::new() }
    }
    fn add(&mut self, name: &str, r: TResult) {
        self.list.push((name.to_string(), outcome(r)));
    }
    fn finish(self, k: &mut K, name: &str) {
        k.suite(name, self.list);
    }
}

// ---- driver and device state ------------------------------------------------------------

fn debugfs_dir(d: &Device) -> Result<String, String> {
    let q = ctx("DEVICE_QUERY", d.query(false))?;
    Ok(format!("/sys/kernel/debug/svmgpu/virtio{}", q.bus_index))
}

/// The driver's recovery counters of `d` (debugfs).
fn recovery(d: &Device) -> Result<BTreeMap<String, String>, String> {
    recovery_at(&debugfs_dir(d)?)
}

/// The recovery counters in the debugfs directory `dir` (also once the device is given up).
fn recovery_at(dir: &str) -> Result<BTreeMap<String, String>, String> {
    let path = format!("{dir}/recovery");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

fn counter(d: &Device, key: &str) -> Result<u64, String> {
    let r = recovery(d)?;
    r.get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no counter {key} in debugfs"))
}

fn last_reason(d: &Device) -> String {
    recovery(d)
        .ok()
        .and_then(|r| r.get("last_reset_reason").cloned())
        .unwrap_or_default()
}

fn set_job_timeout(d: &Device, ms: u32) -> TResult {
    let path = format!("{}/job_timeout_ms", debugfs_dir(d)?);
    std::fs::write(&path, format!("{ms}\n")).map_err(|e| format!("{path}: {e}"))
}

fn device_stat(d: &Device, i: usize) -> Result<u64, String> {
    Ok(ctx("DEVICE_QUERY(stats)", d.query(true))?.stats[i])
}

/// Polls `cond` every 10 ms for up to `ms`.
fn wait_for(ms: u64, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = now_ns();
    loop {
        if cond() {
            return true;
        }
        if now_ns() - t0 > ms * 1_000_000 {
            return false;
        }
        sleep_ms(10);
    }
}

/// Changes the protection and back (RW → RWX → RW): each change invalidates the range.
fn mprotect_cycle(m: &Mapping) -> TResult {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: Changes the protection of our own mapping, back and forth.
    let ok = unsafe {
        libc::mprotect(m.addr() as *mut _, m.len(), rw | libc::PROT_EXEC) == 0
            && libc::mprotect(m.addr() as *mut _, m.len(), rw) == 0
    };
    ensure(ok, || "mprotect".into())
}

/// The GPU checksum of `m`, computed by a new VM and queue of `d`.
fn gpu_checksum(d: &Device, m: &Mapping) -> Result<u64, String> {
    let mut s = Setup::new(d, false, false)?;
    ctx(
        "bind",
        d.bind_userptr(s.vm, DATA_VA, m.len() as u64, m.addr(), false),
    )?;
    let b = batch(&[Insn::Checksum {
        src: DATA_VA,
        len: m.len() as u64,
        dst: BATCH_VA + SUM_OFF as u64,
    }]);
    let o = s.run(&b)?;
    ensure(o.error == 0, || format!("checksum job: {o:?}"))?;
    let sum = s.batch_buf.read_u64(SUM_OFF);
    let _ = d.unbind(s.vm, DATA_VA, m.len() as u64);
    Ok(sum)
}

fn errno_of<T>(r: std::io::Result<T>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

// ---- jobs -------------------------------------------------------------------------------

/// FILL `len` bytes at `va` with `pattern`, then CHECKSUM them into `sum_va`.
fn fill_sum(va: u64, len: u64, pattern: u32, sum_va: u64) -> Batch {
    batch(&[
        Insn::Fill { va, len, pattern },
        Insn::Checksum {
            src: va,
            len,
            dst: sum_va,
        },
    ])
}

/// A job that blocks until the semaphore in the batch buffer is set, then stores `magic`.
fn blocked_job(done_va: u64, magic: u32) -> Batch {
    batch(&[
        Insn::Wait {
            size64: false,
            op: CompareOp::Eq,
            timeout_us: 0,
            va: BATCH_VA + SEM_OFF as u64,
            value: 1,
        },
        Insn::Store {
            size64: false,
            va: done_va,
            value: u64::from(magic),
        },
    ])
}

/// Runs a FILL + CHECKSUM of the setup's data on queue `q` and checks it on the CPU.
fn fill_and_verify(s: &mut Setup<'_>, q: u32, pattern: u32) -> TResult {
    let len = s.data().len() as u64;
    let b = fill_sum(DATA_VA, len, pattern, BATCH_VA + SUM_OFF as u64);
    b.write_to(&mut s.batch_buf.as_mut_slice()[..4096]);
    let f = ctx("EXEC", s.dev.exec_retry(q, BATCH_VA, b.len_bytes() as u32))?;
    let o = ctx("WAIT", s.dev.wait(q, f, 20_000_000_000))?;
    ensure(o.error == 0, || format!("fill job failed: {o:?}"))?;
    let data = s.data().as_slice();
    let ok = data
        .chunks_exact(4)
        .all(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) == pattern);
    ensure(ok, || format!("CPU does not see pattern {pattern:#x}"))?;
    let gpu = s.batch_buf.read_u64(SUM_OFF);
    let cpu = fnv1a64(data);
    ensure(gpu == cpu, || {
        format!("GPU checksum {gpu:#x} != CPU {cpu:#x}")
    })
}

/// Data the GPU wrote before the fault: a buffer in its own VM (ASID 0, context 0 on a
/// fresh device), filled with a pattern and checksummed by the GPU. Kept until `verify`.
struct Precious<'a> {
    s: Setup<'a>,
    sum: u64,
}

impl<'a> Precious<'a> {
    fn new(d: &'a Device) -> Result<Self, String> {
        let mut s = Setup::new(d, false, false)?;
        s.bind_data(64 << 10)?;
        let q = s.q;
        fill_and_verify(&mut s, q, 0x5eed_c0de)?;
        let sum = fnv1a64(s.data().as_slice());
        Ok(Precious { s, sum })
    }

    /// The CPU still sees what the GPU wrote, and a new GPU job (on a new queue: the old
    /// one may have been lost in a reset) checksums the same.
    fn verify(&mut self) -> TResult {
        let cpu = fnv1a64(self.s.data().as_slice());
        ensure(cpu == self.sum, || {
            format!("data changed: checksum {cpu:#x}, was {:#x}", self.sum)
        })?;
        let d = self.s.dev;
        let q = ctx("EXEC_QUEUE_CREATE", d.exec_queue_create(self.s.vm, false))?;
        let len = self.s.data().len() as u64;
        let b = batch(&[Insn::Checksum {
            src: DATA_VA,
            len,
            dst: BATCH_VA + SUM_OFF as u64,
        }]);
        b.write_to(&mut self.s.batch_buf.as_mut_slice()[4096..8192]);
        let r = (|| {
            let f = ctx(
                "EXEC",
                d.exec_retry(q, BATCH_VA + 4096, b.len_bytes() as u32),
            )?;
            let o = ctx("WAIT", d.wait(q, f, 20_000_000_000))?;
            ensure(o.error == 0, || format!("checksum job: {o:?}"))?;
            let gpu = self.s.batch_buf.read_u64(SUM_OFF);
            ensure(gpu == self.sum, || {
                format!("GPU checksum {gpu:#x}, was {:#x}", self.sum)
            })
        })();
        let _ = d.exec_queue_destroy(q);
        r
    }
}

// ---- SVM under injection ---------------------------------------------------------------

/// SVM memory (a fault-mode VM, no binding: batches and data at their CPU addresses)
/// under whatever the device injects, on one device: `rounds` of FILL + CHECKSUM of
/// 256 KiB of anonymous memory between CPU invalidations (mprotect, MADV_DONTNEED), the
/// documented errors (a GPU access to an unmapped address is EFAULT, a GPU write to
/// read-only memory EACCES), and the clean-up: once the VM is gone, the device holds no
/// SVM pages. `lost_ok`: a reset may hit this work (EIO is then accepted for a job, once).
fn svm_workload(d: &Device, rounds: u32, lost_ok: bool) -> TResult {
    const LEN: usize = 256 << 10;
    let r = (|| {
        let vm = ctx("VM_CREATE(fault mode)", d.vm_create(true))?;
        let mut q = ctx("EXEC_QUEUE_CREATE", d.exec_queue_create(vm, false))?;
        let mut batch_mem = ctx("mmap", Mapping::anon(16 * 4096))?;
        let data = ctx("mmap", Mapping::anon(LEN))?;
        let ro = ctx("mmap", Mapping::anon(4096))?;
        // SAFETY: Our own mapping.
        unsafe { libc::mprotect(ro.addr() as *mut _, 4096, libc::PROT_READ) };
        let sum_va = batch_mem.addr() + SUM_OFF as u64;
        let mut lost = 0;
        let r = (|| {
            let mut run = |q: u32, slot: usize, b: &Batch| svm_run(d, q, &mut batch_mem, slot, b);
            for r in 0..rounds {
                let pattern = 0x5c00_0000 | r;
                let o = run(q, 0, &fill_sum(data.addr(), LEN as u64, pattern, sum_va))?;
                if o.error == EIO && lost_ok && lost == 0 {
                    // Lost in a reset: the queue is gone, a new one works.
                    lost += 1;
                    q = ctx("EXEC_QUEUE_CREATE", d.exec_queue_create(vm, false))?;
                    continue;
                }
                ensure(o.error == 0, || format!("SVM round {r}: fill job {o:?}"))?;
                ensure(all_words(data.as_slice(), pattern), || {
                    format!("SVM round {r}: the CPU does not see pattern {pattern:#x}")
                })?;
                let gpu = read_u64_at(sum_va);
                let cpu = fnv1a64(data.as_slice());
                ensure(gpu == cpu, || {
                    format!("SVM round {r}: GPU checksum {gpu:#x} != CPU {cpu:#x}")
                })?;
                if r % 2 == 0 {
                    mprotect_cycle(&data)?;
                } else {
                    // SAFETY: Discards our own mapping's contents (the next round refills).
                    unsafe { libc::madvise(data.addr() as *mut _, LEN, libc::MADV_DONTNEED) };
                }
            }
            // The documented errors, on queues of their own (a failed job ends its queue).
            let q2 = ctx("EXEC_QUEUE_CREATE", d.exec_queue_create(vm, false))?;
            let o = run(
                q2,
                1,
                &batch(&[Insn::Store {
                    size64: false,
                    va: 0x10,
                    value: 1,
                }]),
            );
            let _ = d.exec_queue_destroy(q2);
            ensure(o.as_ref().is_ok_and(|o| o.error == EFAULT), || {
                format!("GPU store to an unmapped address: {o:?}, want EFAULT")
            })?;
            let q3 = ctx("EXEC_QUEUE_CREATE", d.exec_queue_create(vm, false))?;
            let o = run(
                q3,
                2,
                &batch(&[Insn::Store {
                    size64: false,
                    va: ro.addr(),
                    value: 1,
                }]),
            );
            let _ = d.exec_queue_destroy(q3);
            ensure(o.as_ref().is_ok_and(|o| o.error == -libc::EACCES), || {
                format!("GPU store to read-only memory: {o:?}, want EACCES")
            })
        })();
        let _ = d.exec_queue_destroy(q);
        ctx("VM_DESTROY", d.vm_destroy(vm))?;
        r
    })();
    r?;
    // Clean-up: no SVM pages of this device are left (this runner's only SVM user).
    let pages = ctx("DEVICE_QUERY", d.query(false))?.svm_pages;
    ensure(pages == 0, || {
        format!("{pages} SVM pages left after the VM was destroyed")
    })
}

/// Submits `b` at batch slot `slot` of `mem` (a fault-mode VM's queue `q`: the batch at its
/// CPU address) and waits.
fn svm_run(
    d: &Device,
    q: u32,
    mem: &mut Mapping,
    slot: usize,
    b: &Batch,
) -> Result<svmgpu::FenceOutcome, String> {
    let off = slot * 4096;
    b.write_to(&mut mem.as_mut_slice()[off..off + 4096]);
    let f = ctx(
        "EXEC",
        d.exec_retry(q, mem.addr() + off as u64, b.len_bytes() as u32),
    )?;
    ctx("WAIT", d.wait(q, f, 30_000_000_000))
}

/// The u64 at `va` (a mapped, 8-byte aligned address of this process).
fn read_u64_at(va: u64) -> u64 {
    // SAFETY: The caller names a mapped, aligned word.
    unsafe { std::ptr::read_volatile(va as *const u64) }
}

fn all_words(bytes: &[u8], pattern: u32) -> bool {
    bytes
        .chunks_exact(4)
        .all(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) == pattern)
}

/// The SVM workload on every device in each SVM mode (the module reloaded with
/// `svm_mode=MODE`; rate-based injections keep firing across reloads), then back to the
/// default module parameters.
fn svm_in_every_mode(c: &mut Cases, rounds: u32) {
    for mode in ["single", "per_device", "shared"] {
        let r = (|| {
            run("rmmod", &["svmgpu"])?;
            run("insmod", &[MODULE_PATH, &format!("svm_mode={mode}")])?;
            let devs = ctx("enumerate", Device::enumerate())?;
            for (i, d) in devs.iter().enumerate() {
                svm_workload(d, rounds, false).map_err(|e| format!("device {i}: {e}"))?;
                let n = counter(d, "resets")?;
                ensure(n == 0, || {
                    format!("device {i}: {n} resets ({})", last_reason(d))
                })?;
            }
            Ok(())
        })();
        c.add(&format!("svm_{mode}_workload"), r);
    }
    let r = run("rmmod", &["svmgpu"]).and_then(|()| run("insmod", &[MODULE_PATH]));
    c.add("reload_default", r);
}

// ---- the common workload ----------------------------------------------------------------

/// Real work on one device: a non-fault and a fault-mode VM filling and checksumming
/// their data between userptr invalidations (mprotect, madvise(DONTNEED)), and a
/// long-running queue preempted by invalidations while its job runs.
fn workload(d: &Device, rounds: u32, diags: &mut Vec<String>) -> TResult {
    for fault_mode in [false, true] {
        let mut s = Setup::new(d, fault_mode, false)?;
        s.bind_data(32 << 10)?;
        let q = s.q;
        for r in 0..rounds {
            fill_and_verify(&mut s, q, 0xa000_0000 | r)
                .map_err(|e| format!("fault_mode={fault_mode} round {r}: {e}"))?;
            let m = s.data();
            if r % 3 == 2 {
                // SAFETY: Discards the contents of our own mapping.
                unsafe { libc::madvise(m.addr() as *mut _, m.len(), libc::MADV_DONTNEED) };
            } else {
                mprotect_cycle(m)?;
            }
        }
    }
    // Long-running queue: invalidations while a job runs preempt it.
    let mut s = Setup::new(d, false, true)?;
    s.bind_data(16 << 10)?;
    let f = ctx(
        "EXEC",
        s.submit(&counting_job(DATA_VA, 400, 50_000, DATA_VA + 8, 0xfeed)),
    )?;
    for _ in 0..5 {
        mprotect_cycle(s.data())?;
        sleep_ms(2);
    }
    let o = ctx("WAIT", s.wait(f))?;
    ensure(o.error == 0, || format!("long-running job: {o:?}"))?;
    let magic = s.data().read_u32(8);
    let count = s.data().read_u32(0);
    ensure(magic == 0xfeed && count == 400, || {
        format!("long-running job: counter {count}, magic {magic:#x}")
    })?;
    diags.push(format!(
        "{rounds} rounds x (non-fault, fault mode) + a preempted long-running job"
    ));
    Ok(())
}

/// One buffer bound on two devices: each fills half, invalidations hit both.
fn shared_workload(a: &Device, b: &Device, rounds: u32) -> TResult {
    let len = 32usize << 10;
    let data = ctx("mmap", Mapping::anon(len))?;
    let mut sa = Setup::new(a, false, false)?;
    let mut sb = Setup::new(b, false, false)?;
    for s in [&sa, &sb] {
        ctx(
            "bind shared",
            s.dev
                .bind_userptr(s.vm, DATA_VA, len as u64, data.addr(), false),
        )?;
    }
    for r in 0..rounds {
        let half = (len / 2) as u64;
        let fa = {
            let bt = fill_sum(DATA_VA, half, 0xaa00 + r, BATCH_VA + SUM_OFF as u64);
            ctx("EXEC a", sa.submit(&bt))?
        };
        let fb = {
            let bt = fill_sum(DATA_VA + half, half, 0xbb00 + r, BATCH_VA + SUM_OFF as u64);
            ctx("EXEC b", sb.submit(&bt))?
        };
        let oa = ctx("WAIT a", sa.wait(fa))?;
        let ob = ctx("WAIT b", sb.wait(fb))?;
        ensure(oa.error == 0 && ob.error == 0, || {
            format!("shared round {r}: {oa:?} {ob:?}")
        })?;
        let w = |off: usize| data.read_u32(off);
        ensure(w(0) == 0xaa00 + r && w(len - 4) == 0xbb00 + r, || {
            format!("shared round {r}: {:#x} {:#x}", w(0), w(len - 4))
        })?;
        // Invalidates the buffer on both devices at once.
        mprotect_cycle(&data)?;
    }
    for s in [&mut sa, &mut sb] {
        let _ = s.dev.unbind(s.vm, DATA_VA, len as u64);
    }
    Ok(())
}

/// After the scenario: every device serves new work, its audit counted no stale access,
/// and the devices in `injected` counted an injection.
fn final_checks(devs: &[Device], injected: &[usize], c: &mut Cases) {
    for (i, d) in devs.iter().enumerate() {
        let r = (|| {
            // A new file: the test's own may be banned.
            let d = &ctx("open", Device::open(d.path()))?;
            let fr = ctx(
                "fill_and_checksum",
                svmgpu::fill_and_checksum(d, 64 << 10, 0x600d, DATA_VA),
            )?;
            ensure(
                fr.outcome.error == 0 && fr.pattern_ok && fr.gpu_sum == fr.cpu_sum,
                || format!("new work after recovery: {fr:?}"),
            )
        })();
        c.add(&format!("device_{i}_serves_new_work"), r);
        // SVM memory (no binding) works after the recovery too, with the documented
        // errors and its clean-up.
        let r = ctx("open", Device::open(d.path())).and_then(|d| svm_workload(&d, 2, false));
        c.add(&format!("device_{i}_serves_svm"), r);
        let r = crate::coherence::audit_clean(std::slice::from_ref(d));
        c.add(&format!("device_{i}_no_stale_access"), r);
        if injected.contains(&i) {
            let r = device_stat(d, STAT_INJECTED)
                .and_then(|n| ensure(n > 0, || "the device injected nothing".into()));
            c.add(&format!("device_{i}_injected"), r);
        }
    }
}

/// A fault kind that needs no reset: the common workload on every device (and on a buffer
/// shared by two devices) succeeds, no device was reset, and `check` sees the kind's
/// traces in the driver's counters.
fn benign(
    k: &mut K,
    name: &str,
    rounds: u32,
    check: &dyn Fn(&[Device], &mut Vec<String>) -> TResult,
) {
    let Some(devs) = devices(k, name) else {
        return;
    };
    let mut c = Cases::new();
    let mut precious = Vec::new();
    for d in &devs {
        match Precious::new(d) {
            Ok(p) => precious.push(p),
            Err(e) => {
                c.add("precious_data", Err(e));
                return c.finish(k, name);
            }
        }
    }
    for (i, d) in devs.iter().enumerate() {
        let mut diags = Vec::new();
        let r = workload(d, rounds, &mut diags);
        for m in diags {
            k.diag(&format!("device_{i}: {m}"));
        }
        c.add(&format!("device_{i}_workload"), r);
    }
    if devs.len() >= 2 {
        c.add(
            "two_devices_shared_buffer",
            shared_workload(&devs[0], &devs[1], rounds),
        );
    }
    let mut diags = Vec::new();
    c.add("driver_saw_it", check(&devs, &mut diags));
    for m in diags {
        k.diag(&m);
    }
    let r = devs.iter().try_for_each(|d| {
        let n = counter(d, "resets")?;
        ensure(n == 0, || format!("{n} resets ({})", last_reason(d)))
    });
    c.add("no_reset", r);
    for (i, p) in precious.iter_mut().enumerate() {
        c.add(&format!("device_{i}_data_intact"), p.verify());
    }
    drop(precious);
    let all: Vec<usize> = (0..devs.len()).collect();
    final_checks(&devs, &all, &mut c);
    // SVM memory under the same injection, in every SVM mode (reloads the module: after
    // the checks above, which read the driver's counters of this load).
    drop(devs);
    svm_in_every_mode(&mut c, rounds.min(4));
    c.finish(k, name);
}

fn sum_counter(devs: &[Device], key: &str) -> Result<u64, String> {
    devs.iter().map(|d| counter(d, key)).sum()
}

// ---- benign kinds -----------------------------------------------------------------------

pub fn tlb_inval_delay(_env: &Env, name: &str, k: &mut K) {
    // tlb-inval-delay:delay_us=3000
    benign(k, name, 6, &|devs, diags| {
        for d in devs {
            let q = ctx("DEVICE_QUERY", d.query(false))?;
            ensure(q.invalidations > 0, || "no invalidation".into())?;
            let mean = q.invalidation_ns / q.invalidations;
            diags.push(format!(
                "{} invalidations, mean {} us",
                q.invalidations,
                mean / 1000
            ));
            ensure(mean >= 3_000_000, || {
                format!("mean invalidation {mean} ns < the injected 3 ms delay")
            })?;
        }
        Ok(())
    });
}

pub fn preempt_delay(_env: &Env, name: &str, k: &mut K) {
    // preempt-delay:delay_us=100000 (100 ms: well above what an mprotect costs under TCG
    // without it, 10-25 ms, so that the check below tells a waiting driver from one that
    // does not wait for the preemption)
    benign(k, name, 3, &|devs, diags| {
        for d in devs {
            let p = device_stat(d, STAT_PREEMPTIONS)?;
            ensure(p > 0, || "no preemption".into())?;
            // What the injection causes: an invalidation that preempts a running
            // long-running job returns no earlier than the delayed preemption completed.
            let ms = preempting_invalidation_ms(d)?;
            diags.push(format!(
                "{p} preemptions; an mprotect preempting a running job took {ms:.1} ms"
            ));
            ensure(ms >= 3.0, || {
                format!(
                    "the invalidation returned after {ms:.1} ms, before the 3 ms preemption delay"
                )
            })?;
        }
        Ok(())
    });
}

/// Time of one `mprotect` that must preempt a running long-running job (its binding
/// valid: the job writes through it), in ms.
fn preempting_invalidation_ms(d: &Device) -> Result<f64, String> {
    let mut s = Setup::new(d, false, true)?;
    s.bind_data(4096)?;
    let f = ctx(
        "EXEC",
        s.submit(&counting_job(DATA_VA, 4000, 50_000, DATA_VA + 8, 1)),
    )?;
    let t0 = now_ns();
    let c0 = s.data().read_u32(0);
    while s.data().read_u32(0) < c0 + 2 {
        ensure(now_ns() - t0 < 20_000_000_000, || {
            "the job does not run".into()
        })?;
        if let Ok(o) = d.wait(s.q, f, 0) {
            return Err(format!("the job ended early: {o:?}"));
        }
        sleep_ms(1);
    }
    let m = s.data();
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let t = now_ns();
    // SAFETY: Changes the protection of our own mapping (never read-only).
    let rc = unsafe { libc::mprotect(m.addr() as *mut _, m.len(), rw | libc::PROT_EXEC) };
    let ms = (now_ns() - t) as f64 / 1e6;
    ensure(rc == 0, || "mprotect".into())?;
    // SAFETY: As above.
    unsafe { libc::mprotect(m.addr() as *mut _, m.len(), rw) };
    Ok(ms)
}

pub fn fault_spurious(_env: &Env, name: &str, k: &mut K) {
    // fault-spurious:p=0.05,count=100
    benign(k, name, 6, &|devs, diags| {
        // What the injection causes: faults at addresses the driver had mapped already
        // (the instruction just fetched), resolved without a change.
        let n = sum_counter(devs, "faults_on_valid_mappings")?;
        diags.push(format!("{n} GPU faults on valid mappings"));
        ensure(n > 0, || {
            "no fault on a valid mapping: the injection went unseen".into()
        })
    });
}

pub fn fault_duplicate(_env: &Env, name: &str, k: &mut K) {
    // fault-duplicate:p=1
    benign(k, name, 6, &|devs, diags| {
        let dup = sum_counter(devs, "fault_events_duplicate")?;
        let nf = sum_counter(devs, "fault_replies_not_found")?;
        diags.push(format!("duplicates dropped {dup}, replies NOT_FOUND {nf}"));
        ensure(dup + nf > 0, || "no duplicated fault detected".into())
    });
}

pub fn fault_phantom(_env: &Env, name: &str, k: &mut K) {
    // fault-phantom:p=0.05,count=40
    benign(k, name, 6, &|devs, diags| {
        let nf = sum_counter(devs, "fault_replies_not_found")?;
        diags.push(format!("replies NOT_FOUND {nf}"));
        ensure(nf > 0, || "no phantom fault answered NOT_FOUND".into())
    });
}

pub fn walk_read_error(_env: &Env, name: &str, k: &mut K) {
    // walk-read-error:p=0.05,count=60
    benign(k, name, 6, &|devs, diags| {
        // What the injection causes: faults reported as page-table read errors
        // (BAD_TABLE_ADDRESS), at addresses whose mapping is valid.
        let bad = sum_counter(devs, "faults_bad_table")?;
        let valid = sum_counter(devs, "faults_on_valid_mappings")?;
        diags.push(format!(
            "{bad} faults with reason BAD_TABLE_ADDRESS, {valid} on valid mappings"
        ));
        ensure(bad > 0 && valid > 0, || {
            "no page-table read error resolved as such: the injection went unseen".into()
        })
    });
}

pub fn completion_duplicate(_env: &Env, name: &str, k: &mut K) {
    // completion-duplicate:p=1
    benign(k, name, 6, &|devs, diags| {
        let jobs = sum_counter(devs, "job_done_duplicate")?;
        let cmds = sum_counter(devs, "command_done_unknown")?;
        diags.push(format!(
            "duplicate JOB_DONE {jobs}, unmatched COMMAND_DONE {cmds}"
        ));
        ensure(jobs > 0 && cmds > 0, || "duplicates not detected".into())
    });
}

pub fn completion_reorder(_env: &Env, name: &str, k: &mut K) {
    // completion-reorder:p=0.5
    benign(k, name, 6, &|devs, diags| {
        let n = devs
            .iter()
            .map(|d| device_stat(d, STAT_INJECTED))
            .sum::<Result<u64, String>>()?;
        diags.push(format!("{n} completions reordered"));
        ensure(n > 0, || "nothing reordered".into())
    });
}

// ---- invalidation or preemption never completes / fails: the notifier resets -------------

/// Device 0 fails (or never completes) the first invalidation or preemption. A userptr
/// invalidation (mprotect) with jobs in flight on two VMs must return only after the
/// device was reset (after the driver's 5 s timeout when nothing completes); the jobs in
/// flight fail with -EIO, their queues are lost (EXEC: EIO), new queues on the same VMs
/// run, device 1 is not affected.
fn invalidation_failure(k: &mut K, name: &str, long_running: bool, never_completes: bool) {
    let Some(devs) = devices(k, name) else {
        return;
    };
    let d = &devs[0];
    let mut c = Cases::new();
    let r = (|| -> TResult {
        let mut precious = Precious::new(d)?;
        let mut s = Setup::new(d, false, long_running)?;
        s.bind_data(16 << 10)?;
        s.batch_buf.write_u32(SEM_OFF, 0);
        let mut other = Setup::new(d, false, false)?;
        other.bind_data(4096)?;
        other.batch_buf.write_u32(SEM_OFF, 0);
        // Device 1: work before and after, unaffected.
        let mut u = match devs.get(1) {
            Some(d1) => {
                let mut u = Setup::new(d1, false, false)?;
                u.bind_data(16 << 10)?;
                Some(u)
            }
            None => None,
        };
        let fj = ctx("EXEC J", s.submit(&blocked_job(DATA_VA + 8, 0xdead)))?;
        let fo = ctx("EXEC other", other.submit(&blocked_job(DATA_VA, 0xdead)))?;
        let fu = match u.as_mut() {
            Some(u) => Some(ctx(
                "EXEC dev1",
                u.submit(&counting_job(DATA_VA, 200, 20_000, DATA_VA + 8, 7)),
            )?),
            None => None,
        };
        sleep_ms(20);
        let resets_before = counter(d, "resets_driver")?;
        let t0 = now_ns();
        mprotect_cycle(s.data())?;
        let dt_ms = (now_ns() - t0) / 1_000_000;
        let resets_at_return = counter(d, "resets_driver");
        k.diag(&format!("the invalidation returned after {dt_ms} ms"));
        let mut c2 = Vec::new();
        c2.push((
            "notifier_waited_for_reset",
            (|| {
                // The device gave no guarantee: the notifier may only return once the
                // device was reset (RESET completed), and, when the command never
                // completes, not before the driver's 5 s timeout.
                let at_return = resets_at_return?;
                ensure(at_return > resets_before, || {
                    format!(
                        "resets_driver {resets_before} -> {at_return} when the invalidation returned: it returned before the reset"
                    )
                })?;
                if never_completes {
                    ensure(dt_ms >= 4000, || {
                        format!("returned after {dt_ms} ms, before the 5 s timeout")
                    })?;
                }
                Ok(())
            })(),
        ));
        let reason = last_reason(d);
        k.diag(&format!("last reset reason: {reason}"));
        c2.push((
            "device_reset_by_driver",
            (|| {
                let n = counter(d, "resets_driver")?;
                let f = counter(d, "invalidation_failures")?;
                ensure(n >= 1 && f >= 1, || {
                    format!("resets_driver {n}, invalidation_failures {f}")
                })?;
                ensure(reason.contains("invalidation"), || {
                    format!("reason: {reason}")
                })
            })(),
        ));
        // Lost work: the jobs in flight fail with -EIO, the queues refuse new jobs.
        c2.push((
            "jobs_in_flight_fail_eio",
            (|| {
                let oj = ctx("WAIT J", s.wait(fj))?;
                let oo = ctx("WAIT other", other.wait(fo))?;
                ensure(oj.error == EIO && oo.error == EIO, || {
                    format!("J {oj:?}, other {oo:?}")
                })
            })(),
        ));
        c2.push(("lost_queue_exec_eio", {
            let b = store(DATA_VA, 1);
            let e = errno_of(other.submit(&b));
            ensure(e == libc::EIO, || {
                format!("EXEC on a lost queue: errno {e}")
            })
        }));
        // New queues on the same VMs: the ASIDs were bound again, page tables valid.
        c2.push((
            "new_queue_same_vm_runs",
            (|| {
                let q = ctx("EXEC_QUEUE_CREATE", d.exec_queue_create(s.vm, long_running))?;
                let r = fill_and_verify(&mut s, q, 0x1234_5678);
                let _ = d.exec_queue_destroy(q);
                r
            })(),
        ));
        c2.push((
            "device_1_unaffected",
            match (u.as_mut(), fu) {
                (Some(u), Some(fu)) => (|| {
                    let o = ctx("WAIT dev1", u.wait(fu))?;
                    ensure(o.error == 0, || format!("dev1 job: {o:?}"))?;
                    let q = u.q;
                    fill_and_verify(u, q, 0x77)?;
                    let n = counter(u.dev, "resets")?;
                    ensure(n == 0, || format!("device 1 was reset {n} times"))
                })(),
                _ => Ok(()),
            },
        ));
        c2.push(("data_intact", precious.verify()));
        for (n, r) in c2 {
            c.add(n, r);
        }
        Ok(())
    })();
    if let Err(e) = r {
        c.add("scenario", Err(e));
    }
    final_checks(&devs, &[0], &mut c);
    c.finish(k, name);
}

fn store(va: u64, value: u32) -> Batch {
    batch(&[Insn::Store {
        size64: false,
        va,
        value: u64::from(value),
    }])
}

pub fn tlb_inval_drop(_env: &Env, name: &str, k: &mut K) {
    // tlb-inval-drop:count=1,device=0
    invalidation_failure(k, name, false, true);
}

pub fn tlb_inval_error(_env: &Env, name: &str, k: &mut K) {
    // tlb-inval-error:count=1,device=0,status=internal
    invalidation_failure(k, name, false, false);
}

pub fn preempt_drop(_env: &Env, name: &str, k: &mut K) {
    // preempt-drop:count=1,device=0
    invalidation_failure(k, name, true, true);
}

pub fn preempt_error(_env: &Env, name: &str, k: &mut K) {
    // preempt-error:count=1,device=0
    invalidation_failure(k, name, true, false);
}

// ---- hangs ------------------------------------------------------------------------------

/// Device 0 hangs the first three jobs of ASID 1 (`engine-hang:asid=1,count=3,device=0`).
/// Each hung job fails with -ETIMEDOUT, the jobs behind it with -ECANCELED, its queue is
/// banned (EXEC: ECANCELED) while a queue of another VM keeps running; after the third
/// hang the file is banned (EXEC_QUEUE_CREATE and EXEC: ECANCELED) and a new file works.
/// No device reset is needed: destroying the context frees the engine.
pub fn engine_hang(_env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else {
        return;
    };
    let d = &devs[0];
    let mut c = Cases::new();
    let r = (|| -> TResult {
        let precious = Precious::new(d)?; // ASID 0, context 0
        let mut a = Setup::new(d, false, false)?; // ASID 1, context 1
        a.bind_data(4096)?;
        let mut b = Setup::new(d, false, false)?; // ASID 2, context 2
        b.bind_data(16 << 10)?;
        let f1 = ctx("EXEC hung", a.submit(&store(DATA_VA, 1)))?;
        let f2 = ctx("EXEC behind", a.submit_at(1, &store(DATA_VA + 4, 2)))?;
        let t0 = now_ns();
        let o1 = ctx("WAIT hung", a.wait(f1))?;
        let o2 = ctx("WAIT behind", a.wait(f2))?;
        k.diag(&format!(
            "hung job failed after {} ms",
            (now_ns() - t0) / 1_000_000
        ));
        c.add(
            "hung_job_etimedout",
            ensure(o1.error == ETIMEDOUT, || format!("{o1:?}")),
        );
        c.add(
            "job_behind_ecanceled",
            ensure(o2.error == ECANCELED, || format!("{o2:?}")),
        );
        c.add("hung_queue_banned", {
            let e = errno_of(a.submit(&store(DATA_VA, 3)));
            ensure(e == libc::ECANCELED, || format!("EXEC: errno {e}"))
        });
        c.add("other_queue_runs", {
            let q = b.q;
            fill_and_verify(&mut b, q, 0xb0b0)
        });
        c.add(
            "hang_seen_no_reset",
            (|| {
                let h = counter(d, "hang_events")?;
                let r = counter(d, "resets")?;
                ensure(h == 1 && r == 0, || format!("hang_events {h}, resets {r}"))
            })(),
        );
        // Two more hangs in VM a (fresh queues): the file is banned.
        for n in 2..=3 {
            let q = ctx("EXEC_QUEUE_CREATE", d.exec_queue_create(a.vm, false))?;
            let bt = store(DATA_VA, n);
            bt.write_to(&mut a.batch_buf.as_mut_slice()[2 * 4096..3 * 4096]);
            let f = ctx(
                "EXEC",
                d.exec(q, BATCH_VA + 2 * 4096, bt.len_bytes() as u32),
            )?;
            let o = ctx("WAIT", d.wait(q, f, 20_000_000_000))?;
            c.add(
                &format!("hang_{n}_etimedout"),
                ensure(o.error == ETIMEDOUT, || format!("{o:?}")),
            );
            let _ = d.exec_queue_destroy(q);
        }
        c.add(
            "client_banned",
            (|| {
                let e = errno_of(d.exec_queue_create(b.vm, false));
                ensure(e == libc::ECANCELED, || {
                    format!("EXEC_QUEUE_CREATE: errno {e}")
                })?;
                let e = errno_of(b.submit(&store(DATA_VA, 9)));
                ensure(e == libc::ECANCELED, || format!("EXEC: errno {e}"))?;
                let n = counter(d, "clients_banned")?;
                ensure(n == 1, || format!("clients_banned {n}"))
            })(),
        );
        // A new file works, and sees the banned file's data intact.
        c.add(
            "new_client_runs_data_intact",
            (|| {
                let d2 = ctx("open", Device::open(d.path()))?;
                let sum = precious.sum;
                let cpu = fnv1a64(precious.s.data().as_slice());
                ensure(cpu == sum, || {
                    format!("CPU checksum {cpu:#x}, was {sum:#x}")
                })?;
                let gpu = gpu_checksum(&d2, precious.s.data())?;
                ensure(gpu == sum, || {
                    format!("GPU checksum {gpu:#x}, was {sum:#x}")
                })
            })(),
        );
        Ok(())
    })();
    if let Err(e) = r {
        c.add("scenario", Err(e));
    }
    final_checks(&devs, &[0], &mut c);
    c.finish(k, name);
}

/// Device 0 hangs the first job of ASID 1 and drops CONTEXT_ERROR / ENGINE_HANG events
/// (`engine-hang:asid=1,count=1,device=0;event-overflow:device=0`). The driver's own job
/// timeout (1 s here) catches the hang; a faulting job of another VM still reports
/// -EFAULT through its JOB_DONE; EVENTS_LOST is counted.
pub fn event_overflow(_env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else {
        return;
    };
    let d = &devs[0];
    let mut c = Cases::new();
    let r = (|| -> TResult {
        set_job_timeout(d, 1000)?;
        let mut precious = Precious::new(d)?; // ASID 0
        let mut a = Setup::new(d, false, false)?; // ASID 1
        a.bind_data(4096)?;
        let mut b = Setup::new(d, false, false)?; // ASID 2
        b.bind_data(16 << 10)?;
        let f1 = ctx("EXEC hung", a.submit(&store(DATA_VA, 1)))?;
        // A GPU access to an unbound address: CONTEXT_ERROR (dropped) + JOB_DONE(FAULT).
        let fb = ctx("EXEC faulting", b.submit(&store(0x7000_0000, 1)))?;
        let ob = ctx("WAIT faulting", b.wait(fb))?;
        c.add(
            "fault_reported_by_job_done",
            ensure(ob.error == EFAULT, || format!("{ob:?}")),
        );
        let t0 = now_ns();
        let o1 = ctx("WAIT hung", a.wait(f1))?;
        k.diag(&format!(
            "hung job failed {} ms later",
            (now_ns() - t0) / 1_000_000
        ));
        c.add(
            "driver_timeout_fails_hung_job",
            ensure(o1.error == ETIMEDOUT, || format!("{o1:?}")),
        );
        c.add(
            "counters",
            (|| {
                let t = counter(d, "job_timeouts")?;
                let h = counter(d, "hang_events")?;
                let l = counter(d, "events_lost")?;
                k.diag(&format!(
                    "job_timeouts {t}, hang_events {h}, events_lost {l}"
                ));
                ensure(t == 1 && h == 0 && l >= 1, || {
                    format!("job_timeouts {t}, hang_events {h}, events_lost {l}")
                })
            })(),
        );
        c.add(
            "new_queue_runs",
            (|| {
                let q = ctx("EXEC_QUEUE_CREATE", d.exec_queue_create(b.vm, false))?;
                let r = fill_and_verify(&mut b, q, 0xcafe);
                let _ = d.exec_queue_destroy(q);
                r
            })(),
        );
        c.add("data_intact", precious.verify());
        set_job_timeout(d, 10_000)
    })();
    if let Err(e) = r {
        c.add("scenario", Err(e));
    }
    final_checks(&devs, &[0], &mut c);
    c.finish(k, name);
}

/// Device 0 corrupts the JOB_DONE of contexts 1 (seqno), 2 (kind) and 3 (status), once
/// each. The first two are lost completions: the driver ignores the records (counted) and
/// its job timeout fails the jobs (-ETIMEDOUT); the third fails with -EIO and the undefined
/// status; context 4 runs normally. Device 1 corrupts the first COMMAND_DONE: the userptr
/// invalidation waiting for it resets the device.
pub fn completion_corrupt(_env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else {
        return;
    };
    let d = &devs[0];
    let mut c = Cases::new();
    let r = (|| -> TResult {
        set_job_timeout(d, 1000)?;
        let mut precious = Precious::new(d)?; // context 0
        let mut s = Setup::new(d, false, false)?; // context 1
        s.bind_data(16 << 10)?;
        let mut extra = Vec::new();
        for _ in 0..3 {
            extra.push(ctx("EXEC_QUEUE_CREATE", d.exec_queue_create(s.vm, false))?);
            // 2, 3, 4
        }
        let mut run = |q: u32, slot: usize, value: u32| -> Result<svmgpu::FenceOutcome, String> {
            let bt = store(DATA_VA + 4 * slot as u64, value);
            let off = slot * 4096;
            bt.write_to(&mut s.batch_buf.as_mut_slice()[off..off + 4096]);
            let f = ctx(
                "EXEC",
                d.exec(q, BATCH_VA + off as u64, bt.len_bytes() as u32),
            )?;
            ctx("WAIT", d.wait(q, f, 20_000_000_000))
        };
        let o1 = run(s.q, 0, 1)?;
        let o2 = run(extra[0], 1, 2)?;
        let o3 = run(extra[1], 2, 3)?;
        let o4 = run(extra[2], 3, 4)?;
        c.add(
            "corrupt_seqno_times_out",
            ensure(o1.error == ETIMEDOUT, || format!("{o1:?}")),
        );
        c.add(
            "corrupt_kind_times_out",
            ensure(o2.error == ETIMEDOUT, || format!("{o2:?}")),
        );
        c.add(
            "corrupt_status_fails_eio",
            ensure(
                o3.error == EIO && (0xbad00..=0xbadff).contains(&o3.job_status),
                || format!("{o3:?}"),
            ),
        );
        c.add(
            "unaffected_context_runs",
            ensure(o4.error == 0, || format!("{o4:?}")),
        );
        c.add(
            "records_ignored_and_counted",
            (|| {
                let u = counter(d, "job_done_unknown")?;
                let kk = counter(d, "completions_unknown_kind")?;
                let t = counter(d, "job_timeouts")?;
                ensure(u == 1 && kk == 1 && t == 2, || {
                    format!("job_done_unknown {u}, completions_unknown_kind {kk}, job_timeouts {t}")
                })
            })(),
        );
        // The jobs did run (only their completions were corrupted).
        let got: Vec<u32> = (0..4).map(|i| s.data().read_u32(4 * i)).collect();
        c.add(
            "jobs_wrote",
            ensure(got == [1, 2, 3, 4], || format!("{got:?}")),
        );
        for q in extra {
            let _ = d.exec_queue_destroy(q);
        }
        c.add("data_intact", precious.verify());
        set_job_timeout(d, 10_000)?;
        if let Some(d1) = devs.get(1) {
            let r = (|| {
                let mut s = Setup::new(d1, false, false)?;
                s.bind_data(16 << 10)?;
                let q = s.q;
                fill_and_verify(&mut s, q, 0x11)?;
                let t0 = now_ns();
                mprotect_cycle(s.data())?;
                let dt = (now_ns() - t0) / 1_000_000;
                k.diag(&format!(
                    "device 1: invalidation with a corrupted COMMAND_DONE took {dt} ms"
                ));
                let n = counter(d1, "resets_driver")?;
                let u = counter(d1, "command_done_unknown")?;
                ensure(n == 1 && u >= 1, || {
                    format!("resets_driver {n}, command_done_unknown {u}")
                })?;
                let q = ctx("EXEC_QUEUE_CREATE", d1.exec_queue_create(s.vm, false))?;
                let r = fill_and_verify(&mut s, q, 0x22);
                let _ = d1.exec_queue_destroy(q);
                r
            })();
            c.add("device_1_lost_command_done_resets", r);
        }
        Ok(())
    })();
    if let Err(e) = r {
        c.add("scenario", Err(e));
    }
    let injected: Vec<usize> = (0..devs.len()).collect();
    final_checks(&devs, &injected, &mut c);
    c.finish(k, name);
}

/// Device 0 resets itself at its 7th control request (`device-reset:after=6,count=1,
/// device=0`): while a job of queue J is blocked on the GPU, the next EXEC on J meets the
/// reset (RESETTING answers are retried; the context is then gone: EIO). J's job fails
/// with -EIO, the driver restores the VMs after the DEVICE_RESET event, new queues run.
pub fn device_reset(_env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else {
        return;
    };
    let d = &devs[0];
    let mut c = Cases::new();
    let r = (|| -> TResult {
        // Requests: ASID_BIND, CTX_CREATE, JOB_SUBMIT (precious); ASID_BIND, CTX_CREATE (s);
        // JOB_SUBMIT (J); then the EXEC below.
        let mut precious = Precious::new(d)?;
        let mut s = Setup::new(d, false, false)?;
        s.bind_data(16 << 10)?;
        s.batch_buf.write_u32(SEM_OFF, 0);
        let fj = ctx("EXEC J", s.submit(&blocked_job(DATA_VA + 8, 0xdead)))?;
        sleep_ms(10);
        let before = counter(d, "resets_device")?;
        let e = errno_of(s.submit_at(1, &store(DATA_VA, 5)));
        k.diag(&format!("EXEC during the reset: errno {e}"));
        c.add(
            "exec_during_reset_eio",
            ensure(e == libc::EIO, || format!("errno {e} (before {before})")),
        );
        let oj = ctx("WAIT J", s.wait(fj))?;
        c.add(
            "job_in_flight_fails_eio",
            ensure(oj.error == EIO, || format!("{oj:?}")),
        );
        c.add(
            "driver_recovered",
            (|| {
                ensure(
                    wait_for(5000, || counter(d, "resets_device").unwrap_or(0) == 1),
                    || format!("resets_device {:?}", counter(d, "resets_device")),
                )?;
                let r = last_reason(d);
                ensure(r.contains("device-initiated"), || format!("reason {r}"))
            })(),
        );
        c.add(
            "new_queue_same_vm_runs",
            (|| {
                let q = ctx("EXEC_QUEUE_CREATE", d.exec_queue_create(s.vm, false))?;
                let r = fill_and_verify(&mut s, q, 0xabcd);
                let _ = d.exec_queue_destroy(q);
                r
            })(),
        );
        c.add("data_intact", precious.verify());
        if let Some(d1) = devs.get(1) {
            c.add(
                "device_1_unaffected",
                (|| {
                    let mut diags = Vec::new();
                    workload(d1, 2, &mut diags)?;
                    let n = counter(d1, "resets")?;
                    ensure(n == 0, || format!("device 1 reset {n} times"))
                })(),
            );
        }
        Ok(())
    })();
    if let Err(e) = r {
        c.add("scenario", Err(e));
    }
    final_checks(&devs, &[0], &mut c);
    c.finish(k, name);
}

/// The device resets itself for 8 s at its 4th control request
/// (`device-reset:after=3,count=1,delay_us=8000000,device=1`), which is the TLB
/// invalidation of an mprotect while a job runs: the invalidation is refused
/// (`RESETTING`), the driver's `RESET` is refused too for longer than its 5 s bound, so the
/// driver stops the device with a virtio reset before the notifier returns, and gives the
/// device up (ENODEV; the job in flight fails with -EIO). The other device is not affected;
/// reloading the module binds the device again and it serves new work.
pub fn reset_timeout(_env: &Env, name: &str, k: &mut K) {
    let mut c = Cases::new();
    let r = (|| -> TResult {
        let devs = ctx("enumerate", Device::enumerate())?;
        ensure(devs.len() >= 2, || "needs 2 devices".into())?;
        let d = &devs[1];
        let dir = debugfs_dir(d)?;
        let mut s = Setup::new(d, false, false)?; // ASID_BIND, CTX_CREATE
        s.bind_data(16 << 10)?;
        s.batch_buf.write_u32(SEM_OFF, 0);
        let fj = ctx("EXEC J", s.submit(&blocked_job(DATA_VA + 8, 0xdead)))?; // JOB_SUBMIT
        sleep_ms(10);
        let t0 = now_ns();
        mprotect_cycle(s.data())?; // TLB_INVALIDATE: the device resets itself
        let dt = (now_ns() - t0) / 1_000_000;
        k.diag(&format!("the invalidation returned after {dt} ms"));
        c.add(
            "notifier_returns_after_virtio_reset",
            (|| {
                let rec = recovery_at(&dir)?;
                let get = |k: &str| rec.get(k).cloned().unwrap_or_default();
                let v: u64 = get("virtio_resets").parse().unwrap_or(0);
                let r = get("last_reset_reason");
                k.diag(&format!("last reset reason: {r}"));
                ensure(v == 1 && r.contains("virtio reset"), || {
                    format!("virtio_resets {v}, reason {r}")
                })?;
                ensure(dt >= 4000, || {
                    format!("returned after {dt} ms, before RESET's 5 s bound")
                })
            })(),
        );
        c.add(
            "job_in_flight_fails_eio",
            (|| {
                let o = ctx("WAIT", s.wait(fj))?;
                ensure(o.error == EIO, || format!("{o:?}"))
            })(),
        );
        c.add("device_given_up", {
            let e1 = errno_of(s.submit_at(1, &store(DATA_VA, 1)));
            let e2 = errno_of(d.exec_queue_create(s.vm, false));
            ensure(e1 == libc::EIO && e2 == libc::ENODEV, || {
                format!("EXEC on the lost queue: errno {e1}, EXEC_QUEUE_CREATE: errno {e2}")
            })
        });
        c.add(
            "device_0_unaffected",
            (|| {
                let fr = ctx(
                    "fill_and_checksum",
                    svmgpu::fill_and_checksum(&devs[0], 16 << 10, 0x99, DATA_VA),
                )?;
                ensure(
                    fr.outcome.error == 0 && fr.pattern_ok && fr.gpu_sum == fr.cpu_sum,
                    || format!("{fr:?}"),
                )
            })(),
        );
        drop(s);
        drop(devs);
        c.add(
            "module_reload_binds_again",
            (|| {
                run("rmmod", &["svmgpu"])?;
                run("insmod", &[MODULE_PATH])?;
                ensure(wait_for(10_000, || bound_devices() >= 2), || {
                    "devices not bound again".into()
                })
            })(),
        );
        Ok(())
    })();
    if let Err(e) = r {
        c.add("scenario", Err(e));
    }
    match Device::enumerate() {
        Ok(devs) if devs.len() >= 2 => final_checks(&devs, &[1], &mut c),
        other => c.add("devices_after_reload", Err(format!("{other:?}"))),
    }
    c.finish(k, name);
}
