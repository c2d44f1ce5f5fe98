//! The guest side of `scripts/soak.sh`: random workloads on every device, one thread per
//! device, for a given time, while the host injects random faults through the device's
//! control socket. Checks the invariants continuously and reports on the side channel:
//!
//! - every ioctl fails only with an error the uAPI documents for recovery (`EIO`, `EAGAIN`,
//!   `ECANCELED`), every fence signals 0 or a recovery error (`-EIO`, `-ETIMEDOUT`,
//!   `-ECANCELED`), never anything else (no `-EFAULT`: the jobs only touch bound memory);
//! - every job that succeeded wrote exactly what it should (CPU pattern check and GPU
//!   checksum = CPU checksum);
//! - data written by the GPU at the start (one buffer per device) never changes (CPU
//!   checksum every few seconds, GPU checksum every 30 s);
//! - the device's audit counts no stale access (every few seconds);
//! - every device keeps serving: at least one job succeeds in every 60 s window.
//!
//! Prints `soak-progress` lines while it runs and one `soak-summary` line at the end;
//! exits 1 on any violation (each printed as `soak-violation`).

use crate::util::*;
use std::{
    collections::BTreeMap,
    io::Write,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use svmgpu::{fnv1a64, spec::isa::Insn, Device, Mapping};

const SUM_OFF: usize = 15 * 4096;

/// SplitMix64: a small seeded generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Default)]
struct Tally {
    counts: BTreeMap<String, u64>,
    violations: Vec<String>,
}

struct Shared {
    tally: Mutex<Tally>,
    out: Mutex<Box<dyn Write + Send>>,
}

impl Shared {
    fn count(&self, what: &str) {
        let mut t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        *t.counts.entry(what.to_string()).or_default() += 1;
    }
    fn violation(&self, dev: usize, what: String) {
        self.say(&format!("soak-violation device {dev}: {what}"));
        let mut t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        t.violations.push(format!("device {dev}: {what}"));
    }
    fn say(&self, line: &str) {
        let mut o = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(o, "{line}");
        let _ = o.flush();
    }
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// The outcome of one job, as far as the invariants go.
enum JobEnd {
    Ok,
    /// A documented recovery error (fence or ioctl): the queue (or file) must be replaced.
    Recovered(&'static str),
}

/// What the worker of one device owns: an open file, a non-fault and a fault-mode VM with
/// their queues and buffers, and a long-running queue.
struct Worker<'a> {
    dev: Device,
    path: std::path::PathBuf,
    rng: Rng,
    sh: &'a Shared,
    setups: Vec<Setup<'static>>,
}

/// Leaks a `Device` so that `Setup<'static>` can borrow it (a file per ban, a few per run).
fn leak(d: Device) -> &'static Device {
    Box::leak(Box::new(d))
}

impl Worker<'_> {
    fn fresh_setups(&mut self) -> Result<(), String> {
        self.setups.clear();
        let d = leak(ctx("open", Device::open(&self.path))?);
        for (fault_mode, lr) in [(false, false), (true, false), (false, true)] {
            let mut s = Setup::new(d, fault_mode, lr)?;
            s.bind_data(32 << 10)?;
            self.setups.push(s);
        }
        Ok(())
    }

    /// Classifies an ioctl error: recovery errors are allowed, others are violations.
    fn ioctl_err(&self, what: &str, e: &std::io::Error) -> Result<JobEnd, String> {
        match errno(e) {
            libc::EIO => Ok(JobEnd::Recovered("ioctl EIO (queue lost in a reset)")),
            libc::ECANCELED => Ok(JobEnd::Recovered("ioctl ECANCELED (banned)")),
            libc::EAGAIN => Ok(JobEnd::Recovered("ioctl EAGAIN (resetting)")),
            _ => Err(format!("{what}: undocumented error {e}")),
        }
    }

    /// FILL + CHECKSUM of the setup's data with a random pattern and length; checks the
    /// data if it succeeded.
    fn fill_job(&mut self, i: usize) -> Result<JobEnd, String> {
        let pattern = self.rng.next() as u32 | 1;
        let len = 4096 * (1 + self.rng.below(8));
        let s = &mut self.setups[i];
        let b = batch(&[
            Insn::Fill {
                va: DATA_VA,
                len,
                pattern,
            },
            Insn::Checksum {
                src: DATA_VA,
                len,
                dst: BATCH_VA + SUM_OFF as u64,
            },
        ]);
        let f = match s.submit(&b) {
            Ok(f) => f,
            Err(e) => return self.ioctl_err("EXEC", &e),
        };
        let s = &self.setups[i];
        let o = match s.dev.wait(s.q, f, 60_000_000_000) {
            Ok(o) => o,
            Err(e) if errno(&e) == libc::ETIME => {
                return Err("a fence did not signal in 60 s".into())
            }
            Err(e) => return Err(format!("WAIT: {e}")),
        };
        match o.error {
            0 => {}
            e if e == -libc::EIO => return Ok(JobEnd::Recovered("fence -EIO (reset)")),
            e if e == -libc::ETIMEDOUT => return Ok(JobEnd::Recovered("fence -ETIMEDOUT (hang)")),
            e if e == -libc::ECANCELED => return Ok(JobEnd::Recovered("fence -ECANCELED")),
            _ => return Err(format!("job failed with an unexpected outcome {o:?}")),
        }
        let data = &s.data().as_slice()[..len as usize];
        let ok = data
            .chunks_exact(4)
            .all(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) == pattern);
        if !ok {
            return Err(format!(
                "job succeeded but the CPU does not see pattern {pattern:#x}"
            ));
        }
        let gpu = s.batch_buf.read_u64(SUM_OFF);
        let cpu = fnv1a64(data);
        if gpu != cpu {
            return Err(format!("GPU checksum {gpu:#x} != CPU {cpu:#x}"));
        }
        Ok(JobEnd::Ok)
    }

    /// Invalidates the data of setup `i`: mprotect, or (with `discard`) madvise(DONTNEED),
    /// which also zeroes it.
    fn invalidate(&mut self, i: usize, discard: bool) -> Result<(), String> {
        let m = self.setups[i].data();
        let how = if discard { self.rng.below(2) } else { 0 };
        // SAFETY: Changes the protection of, or discards, our own mapping.
        let ok = unsafe {
            if how == 0 {
                let rw = libc::PROT_READ | libc::PROT_WRITE;
                libc::mprotect(m.addr() as *mut _, m.len(), rw | libc::PROT_EXEC) == 0
                    && libc::mprotect(m.addr() as *mut _, m.len(), rw) == 0
            } else {
                libc::madvise(m.addr() as *mut _, m.len(), libc::MADV_DONTNEED) == 0
            }
        };
        if ok {
            Ok(())
        } else {
            Err("mprotect/madvise failed".into())
        }
    }

    /// A long-running job preempted by invalidations while it runs.
    fn lr_job(&mut self) -> Result<JobEnd, String> {
        let s = &mut self.setups[2];
        s.data().write_u32(0, 0);
        let b = counting_job(DATA_VA, 100, 50_000, DATA_VA + 8, 0xfeed);
        let f = match s.submit(&b) {
            Ok(f) => f,
            Err(e) => return self.ioctl_err("EXEC", &e),
        };
        for _ in 0..3 {
            self.invalidate(2, false)?;
        }
        let s = &self.setups[2];
        let o = s
            .dev
            .wait(s.q, f, 60_000_000_000)
            .map_err(|e| format!("WAIT: {e}"))?;
        match o.error {
            0 => {
                let (n, m) = (s.data().read_u32(0), s.data().read_u32(8));
                if n != 100 || m != 0xfeed {
                    return Err(format!("long-running job: counter {n}, magic {m:#x}"));
                }
                Ok(JobEnd::Ok)
            }
            e if e == -libc::EIO || e == -libc::ETIMEDOUT || e == -libc::ECANCELED => {
                Ok(JobEnd::Recovered("long-running fence error"))
            }
            _ => Err(format!("long-running job: unexpected outcome {o:?}")),
        }
    }

    /// Replaces the queue of setup `i` (lost or banned); a banned file is replaced too.
    fn replace_queue(&mut self, i: usize) -> Result<(), String> {
        let s = &mut self.setups[i];
        let lr = i == 2;
        let _ = s.dev.exec_queue_destroy(s.q);
        match s.dev.exec_queue_create(s.vm, lr) {
            Ok(q) => {
                s.q = q;
                self.sh.count("queues replaced");
                Ok(())
            }
            Err(e) if errno(&e) == libc::ECANCELED || errno(&e) == libc::EAGAIN => {
                self.sh.count("files replaced (banned)");
                self.fresh_setups()
            }
            Err(e) => Err(format!("EXEC_QUEUE_CREATE: {e}")),
        }
    }
}

/// The data written at the start: a buffer bound in a VM of its own file.
struct Precious {
    dev: &'static Device,
    m: Mapping,
    sum: u64,
}

impl Precious {
    fn new(path: &std::path::Path) -> Result<Self, String> {
        let dev = leak(ctx("open", Device::open(path))?);
        let mut m = ctx("mmap", Mapping::anon(64 << 10))?;
        for (i, b) in m.as_mut_slice().iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let sum = fnv1a64(m.as_slice());
        Ok(Precious { dev, m, sum })
    }

    fn cpu_ok(&self) -> bool {
        fnv1a64(self.m.as_slice()) == self.sum
    }

    /// GPU checksum, in a new VM and queue (retried: any job may meet an injection).
    fn gpu_sum(&mut self) -> Result<Option<u64>, String> {
        let vm = ctx("VM_CREATE", self.dev.vm_create(false));
        let vm = match vm {
            Ok(v) => v,
            Err(_) => {
                self.dev = leak(ctx("open", Device::open(self.dev.path()))?);
                return Ok(None);
            }
        };
        let r = (|| {
            let mut s_batch = ctx("mmap", Mapping::anon(BATCH_SIZE))?;
            let d = self.dev;
            ctx(
                "bind",
                d.bind_userptr(vm, BATCH_VA, BATCH_SIZE as u64, s_batch.addr(), false),
            )?;
            ctx(
                "bind",
                d.bind_userptr(vm, DATA_VA, self.m.len() as u64, self.m.addr(), false),
            )?;
            let b = batch(&[Insn::Checksum {
                src: DATA_VA,
                len: self.m.len() as u64,
                dst: BATCH_VA + SUM_OFF as u64,
            }]);
            b.write_to(&mut s_batch.as_mut_slice()[..4096]);
            let q = match d.exec_queue_create(vm, false) {
                Ok(q) => q,
                Err(_) => return Ok(None),
            };
            let r = match d.exec_retry(q, BATCH_VA, b.len_bytes() as u32) {
                Ok(f) => match d.wait(q, f, 60_000_000_000) {
                    Ok(o) if o.error == 0 => Ok(Some(s_batch.read_u64(SUM_OFF))),
                    Ok(_) => Ok(None),
                    Err(e) => Err(format!("WAIT: {e}")),
                },
                Err(_) => Ok(None),
            };
            let _ = d.exec_queue_destroy(q);
            let _ = d.unbind(vm, DATA_VA, self.m.len() as u64);
            r
        })();
        let _ = self.dev.vm_destroy(vm);
        r
    }
}

fn run_device(idx: usize, path: std::path::PathBuf, seed: u64, secs: u64, sh: &Shared) {
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(secs);
    let dev = match Device::open(&path) {
        Ok(d) => d,
        Err(e) => return sh.violation(idx, format!("open: {e}")),
    };
    let mut w = Worker {
        dev,
        path: path.clone(),
        rng: Rng(seed ^ (idx as u64).wrapping_mul(0x1234_5678_9abc_def1)),
        sh,
        setups: Vec::new(),
    };
    let mut precious = match Precious::new(&path) {
        Ok(p) => p,
        Err(e) => return sh.violation(idx, e),
    };
    if let Err(e) = w.fresh_setups() {
        return sh.violation(idx, format!("set-up: {e}"));
    }
    let _ = &w.dev;
    let mut last_ok = Instant::now();
    let mut last_check = Instant::now();
    let mut last_gpu_check = Instant::now();
    let mut gpu_verified = false;
    while Instant::now() < end {
        let op = w.rng.below(10);
        let r: Result<(), String> = (|| {
            match op {
                0..=4 => {
                    let i = w.rng.below(2) as usize;
                    sh.count(if i == 0 {
                        "jobs non-fault"
                    } else {
                        "jobs fault-mode"
                    });
                    match w.fill_job(i)? {
                        JobEnd::Ok => {
                            sh.count("jobs ok, data verified");
                            last_ok = Instant::now();
                        }
                        JobEnd::Recovered(why) => {
                            sh.count(why);
                            w.replace_queue(i)?;
                        }
                    }
                }
                5..=7 => {
                    let i = w.rng.below(2) as usize;
                    sh.count("userptr invalidations");
                    w.invalidate(i, true)?;
                }
                8 => {
                    sh.count("long-running jobs");
                    match w.lr_job()? {
                        JobEnd::Ok => {
                            sh.count("jobs ok, data verified");
                            last_ok = Instant::now();
                        }
                        JobEnd::Recovered(why) => {
                            sh.count(why);
                            w.replace_queue(2)?;
                        }
                    }
                }
                _ => {
                    // Rebind: unbind and bind the data again.
                    let i = w.rng.below(2) as usize;
                    sh.count("rebinds");
                    let s = &mut w.setups[i];
                    let m = s.data.take().ok_or("no data")?;
                    match s.dev.unbind(s.vm, DATA_VA, m.len() as u64) {
                        Ok(()) => {}
                        Err(e) if matches!(errno(&e), libc::EIO | libc::ETIMEDOUT) => {
                            sh.count("unbind EIO/ETIMEDOUT (device reset)")
                        }
                        Err(e) => return Err(format!("unbind: {e}")),
                    }
                    drop(m);
                    s.bind_data(32 << 10)?;
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            w.sh.violation(idx, e);
            // Start over with fresh objects, so one violation is not reported forever.
            let _ = w.fresh_setups();
        }
        if last_check.elapsed() > Duration::from_secs(3) {
            last_check = Instant::now();
            sh.count("invariant checks");
            if !precious.cpu_ok() {
                sh.violation(idx, "data written at the start changed".into());
            }
            match w.dev.query(true) {
                Ok(q) if q.stale_accesses() != 0 => {
                    sh.violation(idx, format!("{} stale accesses", q.stale_accesses()))
                }
                Ok(_) => {}
                Err(e) => sh.violation(idx, format!("DEVICE_QUERY: {e}")),
            }
            if last_ok.elapsed() > Duration::from_secs(60) {
                sh.violation(
                    idx,
                    "no job succeeded for 60 s: the device stopped serving".into(),
                );
                last_ok = Instant::now();
            }
        }
        if last_gpu_check.elapsed() > Duration::from_secs(30) {
            match precious.gpu_sum() {
                Ok(Some(s)) if s == precious.sum => {
                    last_gpu_check = Instant::now();
                    gpu_verified = true;
                    sh.count("GPU checksums of the initial data");
                }
                Ok(Some(s)) => {
                    sh.violation(idx, format!("GPU checksum of the initial data {s:#x}"))
                }
                Ok(None) => sh.count("GPU checksum retried (recovery)"),
                Err(e) => sh.violation(idx, e),
            }
        }
    }
    // The device serves new work at the end: a fresh file, retried over recoveries.
    let mut served = false;
    for _ in 0..20 {
        if let Ok(d) = Device::open(&path) {
            if let Ok(r) = svmgpu::fill_and_checksum(&d, 16 << 10, 0x600d, DATA_VA) {
                if r.outcome.error == 0 && r.pattern_ok && r.gpu_sum == r.cpu_sum {
                    served = true;
                    break;
                }
            }
        }
        sleep_ms(500);
    }
    if !served {
        sh.violation(idx, "the device does not serve new work at the end".into());
    } else {
        sh.count("final new-work checks");
    }
    if !gpu_verified {
        match precious.gpu_sum() {
            Ok(Some(s)) if s == precious.sum => sh.count("GPU checksums of the initial data"),
            other => sh.violation(idx, format!("initial data never GPU-verified: {other:?}")),
        }
    }
    if !precious.cpu_ok() {
        sh.violation(idx, "data written at the start changed".into());
    }
    w.setups.clear();
}

/// Runs the soak for `secs` seconds with `seed`; returns the process exit status.
pub fn run(secs: u64, seed: u64, out: Box<dyn Write + Send>) -> i32 {
    let sh = Arc::new(Shared {
        tally: Mutex::new(Tally::default()),
        out: Mutex::new(out),
    });
    let devs = match Device::enumerate() {
        Ok(d) if !d.is_empty() => d,
        _ => {
            sh.say("soak-violation: no svmgpu device");
            sh.say("svmgpu-soak-result FAIL");
            return 1;
        }
    };
    sh.say(&format!(
        "soak-start devices {} seconds {secs} seed {seed}",
        devs.len()
    ));
    let paths: Vec<_> = devs.iter().map(|d| d.path().to_path_buf()).collect();
    drop(devs);
    let t0 = Instant::now();
    let handles: Vec<_> = paths
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let sh = sh.clone();
            std::thread::spawn(move || run_device(i, p, seed, secs, &sh))
        })
        .collect();
    let progress = {
        let sh = sh.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(30));
            if t0.elapsed() >= Duration::from_secs(secs) {
                break;
            }
            let t = sh.tally.lock().unwrap_or_else(|e| e.into_inner());
            let line = format!(
                "soak-progress t={}s jobs_ok={} recoveries={} violations={}",
                t0.elapsed().as_secs(),
                t.counts.get("jobs ok, data verified").copied().unwrap_or(0),
                t.counts
                    .iter()
                    .filter(|(k, _)| k.starts_with("fence")
                        || k.starts_with("ioctl")
                        || k.starts_with("long-running fence"))
                    .map(|(_, v)| v)
                    .sum::<u64>(),
                t.violations.len()
            );
            drop(t);
            sh.say(&line);
        })
    };
    for h in handles {
        if h.join().is_err() {
            sh.violation(99, "a worker thread panicked".into());
        }
    }
    let _ = progress.join();
    let t = sh.tally.lock().unwrap_or_else(|e| e.into_inner());
    let counts: Vec<String> = t.counts.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let summary = format!(
        "soak-summary seconds={} violations={} | {}",
        t0.elapsed().as_secs(),
        t.violations.len(),
        counts.join(" | ")
    );
    let failed = !t.violations.is_empty();
    drop(t);
    sh.say(&summary);
    sh.say(if failed {
        "svmgpu-soak-result FAIL"
    } else {
        "svmgpu-soak-result PASS"
    });
    i32::from(failed)
}
