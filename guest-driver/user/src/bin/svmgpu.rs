//! `svmgpu`: a small CLI for the svmgpu DRM uAPI, for the guest.
//!
//! ```text
//! svmgpu list                       the devices' render nodes
//! svmgpu query [--stats] [N]        DEVICE_QUERY of device N (default: all)
//! svmgpu run [N] [--size BYTES]     run a FILL + CHECKSUM job and verify it on the CPU
//! svmgpu bench-invalidate [--iters N] [--size BYTES] [--long-running]
//!                                   time CPU invalidations (mprotect) of one buffer bound
//!                                   on every device
//! svmgpu bench-svm-invalidate [--iters N] [--size BYTES]
//!                                   time CPU invalidations (mprotect) of one SVM range
//!                                   mirrored on every device (fault-mode VMs, no bind)
//! svmgpu bench-fault [--iters N] [--contexts C[,C...]]
//!                                   GPU fault service time (device-timed end to end, and
//!                                   the driver's split) against a bare command round
//!                                   trip, and fault throughput with C contexts
//! ```
//!
//! Parsed with clap: `svmgpu COMMAND --help` shows a command's options; a bad value (e.g.
//! `svmgpu run --size abc`) is an error (exit status 2), never a silent default.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use svmgpu::{spec::isa::Insn, Batch, Device, Mapping};

/// A small CLI for the svmgpu DRM uAPI (guest-driver/uapi/svmgpu_drm.h), for the guest.
#[derive(Parser)]
#[command(name = "svmgpu", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the devices' render nodes.
    List,
    /// DEVICE_QUERY of device N (default: every device).
    Query {
        /// Also fetch the device's GET_STATS counters.
        #[arg(long)]
        stats: bool,
        /// Device index (0-based, in render-node order).
        n: Option<usize>,
    },
    /// Run a FILL + CHECKSUM job on device N (default: every device) and verify it on the
    /// CPU.
    Run {
        /// Device index (0-based, in render-node order).
        n: Option<usize>,
        /// Bytes to fill and checksum, 4..=1048576, a multiple of 4.
        #[arg(long, default_value_t = 64 * 1024, value_parser = parse_job_size)]
        size: usize,
    },
    /// Time CPU invalidations (mprotect) of one buffer bound on every device.
    BenchInvalidate {
        /// Invalidations to time.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
        iters: u32,
        /// Buffer size in bytes (a multiple of 4096).
        #[arg(long, default_value_t = 64 * 1024, value_parser = parse_buffer_size)]
        size: usize,
        /// Long-running exec queues (preempted instead of waited for).
        #[arg(long)]
        long_running: bool,
    },
    /// Time CPU invalidations (mprotect) of one SVM range mirrored on every device
    /// (fault-mode VMs, no bind).
    BenchSvmInvalidate {
        /// Invalidations to time.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
        iters: u32,
        /// Range size in bytes (a multiple of 4096).
        #[arg(long, default_value_t = 64 * 1024, value_parser = parse_buffer_size)]
        size: usize,
        /// Mirror the range on the first K devices only (default: every device), e.g. 1 for
        /// the one-GPU reference measured in the same guest as the N-GPU figure.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        devices: Option<u32>,
    },
    /// GPU fault service time (device-timed end to end, and the driver's split) against a
    /// bare command round trip, and fault throughput with C contexts (one line per C).
    BenchFault {
        /// Faults to time (0: only the throughput part).
        #[arg(long, default_value_t = 200)]
        iters: u32,
        /// Contexts (threads) for the throughput part: a comma-separated list, each 1..=64.
        #[arg(long, default_value = "8", value_delimiter = ',',
              value_parser = clap::value_parser!(u32).range(1..=64))]
        contexts: Vec<u32>,
    },
}

fn parse_bytes(v: &str) -> Result<usize, String> {
    v.parse::<usize>()
        .map_err(|e| format!("'{v}' is not a number of bytes ({e})"))
}

fn parse_job_size(v: &str) -> Result<usize, String> {
    let n = parse_bytes(v)?;
    if n == 0 || n % 4 != 0 || n > 1 << 20 {
        return Err(format!("{n} is not a multiple of 4 from 4 to 1048576"));
    }
    Ok(n)
}

fn parse_buffer_size(v: &str) -> Result<usize, String> {
    let n = parse_bytes(v)?;
    if n == 0 || n % 4096 != 0 || n > 1 << 30 {
        return Err(format!("{n} is not a nonzero multiple of 4096 up to 1 GiB"));
    }
    Ok(n)
}

fn pick(devs: &[Device], n: Option<usize>) -> Vec<(usize, &Device)> {
    devs.iter()
        .enumerate()
        .filter(|(i, _)| n.is_none_or(|n| n == *i))
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let devs = match Device::enumerate() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("svmgpu: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Cmd::Query { n: Some(n), .. } | Cmd::Run { n: Some(n), .. } = cli.cmd {
        if n >= devs.len() {
            eprintln!("svmgpu: no device {n} ({} device(s))", devs.len());
            return ExitCode::from(2);
        }
    }
    match cli.cmd {
        Cmd::List => {
            for (i, d) in devs.iter().enumerate() {
                match d.query(false) {
                    Ok(q) => println!(
                        "{i}: {} virtio{} device_index {} engines {} asids {} contexts {}",
                        d.path().display(),
                        q.bus_index,
                        q.config.device_index,
                        q.config.num_engines,
                        q.config.num_asids,
                        q.config.max_contexts
                    ),
                    Err(e) => println!("{i}: {} query failed: {e}", d.path().display()),
                }
            }
            ExitCode::SUCCESS
        }
        Cmd::Query { stats, n } => {
            let mut rc = ExitCode::SUCCESS;
            for (i, d) in pick(&devs, n) {
                match d.query(stats) {
                    Ok(q) => {
                        println!("{i}: {} {q:#?}", d.path().display());
                    }
                    Err(e) => {
                        eprintln!("{i}: {e}");
                        rc = ExitCode::FAILURE;
                    }
                }
            }
            rc
        }
        Cmd::Run { n, size } => {
            let mut rc = ExitCode::SUCCESS;
            for (i, d) in pick(&devs, n) {
                match svmgpu::fill_and_checksum(d, size, 0x5a5a_0000 | i as u32, 0x10_0000) {
                    Ok(r) if r.outcome.error == 0 && r.gpu_sum == r.cpu_sum && r.pattern_ok => {
                        println!(
                            "{i}: job ok (fence {}, checksum {:#018x})",
                            r.fence, r.gpu_sum
                        )
                    }
                    Ok(r) => {
                        println!("{i}: job FAILED: {r:?}");
                        rc = ExitCode::FAILURE;
                    }
                    Err(e) => {
                        println!("{i}: error: {e}");
                        rc = ExitCode::FAILURE;
                    }
                }
            }
            rc
        }
        Cmd::BenchInvalidate {
            iters,
            size,
            long_running,
        } => match bench_invalidate(&devs, iters as usize, size, long_running) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("svmgpu: bench-invalidate: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::BenchSvmInvalidate {
            iters,
            size,
            devices,
        } => {
            let k = devices.map_or(devs.len(), |k| k as usize);
            if k > devs.len() {
                eprintln!(
                    "svmgpu: bench-svm-invalidate: --devices {k}, but {} device(s)",
                    devs.len()
                );
                return ExitCode::from(2);
            }
            match bench_svm_invalidate(&devs[..k], iters as usize, size) {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("svmgpu: bench-svm-invalidate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::BenchFault { iters, contexts } => {
            let mut rc = ExitCode::SUCCESS;
            if iters > 0 {
                match bench_fault(&devs, iters as usize) {
                    Ok(line) => println!("{line}"),
                    Err(e) => {
                        eprintln!("svmgpu: bench-fault: {e}");
                        rc = ExitCode::FAILURE;
                    }
                }
            }
            for c in contexts {
                match bench_fault_throughput(&devs, c as usize) {
                    Ok(line) => println!("{line}"),
                    Err(e) => {
                        eprintln!("svmgpu: bench-fault: throughput with {c} contexts: {e}");
                        rc = ExitCode::FAILURE;
                    }
                }
            }
            rc
        }
    }
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn mprotect(buf: &Mapping, prot: i32) -> std::io::Result<()> {
    // SAFETY: `buf` is a mapping we own; only its protection changes.
    if unsafe { libc::mprotect(buf.addr() as *mut _, buf.len(), prot) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Binds one buffer on every device, then repeatedly makes every device map it (a job)
/// and times the `mprotect(PROT_READ)` that invalidates all of them. Prints
/// `key=value` pairs: median/mean/min in ns, and the notifier mode.
pub fn bench_invalidate(
    devs: &[Device],
    iters: usize,
    size: usize,
    long_running: bool,
) -> std::io::Result<String> {
    if devs.is_empty() {
        return Err(std::io::Error::other("no device"));
    }
    let mut buf = Mapping::anon(size + 4096)?;
    let ctl_off = buf.len() - 4096;
    let va = 0x40_0000u64;
    let mut b = Batch::new();
    b.push(Insn::Store {
        size64: false,
        va: va + ctl_off as u64 + 2048,
        value: 1,
    })
    .end();
    b.write_to(&mut buf.as_mut_slice()[ctl_off..]);
    let mut setup = Vec::new();
    for d in devs {
        let vm = d.vm_create(false)?;
        let q = d.exec_queue_create(vm, long_running)?;
        d.bind_userptr(vm, va, buf.len() as u64, buf.addr(), false)?;
        setup.push((d, vm, q));
    }
    let driver = |d: &Device| {
        d.query(false)
            .map(|q| (q.invalidations, q.invalidation_ns))
            .unwrap_or((0, 0))
    };
    let before: Vec<(u64, u64)> = devs.iter().map(driver).collect();
    let mut times = Vec::with_capacity(iters);
    let mut baseline = Vec::with_capacity(iters);
    for _ in 0..iters {
        // Every device maps the buffer again (EXEC revalidates) and has used it.
        for (d, _, q) in &setup {
            let f = d.exec(*q, va + ctl_off as u64, b.len_bytes() as u32)?;
            let o = d.wait(*q, f, 10_000_000_000)?;
            if o.error != 0 {
                return Err(std::io::Error::other(format!("job failed: {o:?}")));
            }
        }
        let t0 = now_ns();
        mprotect(&buf, libc::PROT_READ)?;
        let t1 = now_ns();
        times.push(t1 - t0);
        // Nothing is mapped on the GPU any more: the same call without device work.
        mprotect(&buf, libc::PROT_READ | libc::PROT_WRITE)?;
        let t2 = now_ns();
        mprotect(&buf, libc::PROT_READ)?;
        baseline.push(now_ns() - t2);
        mprotect(&buf, libc::PROT_READ | libc::PROT_WRITE)?;
    }
    let after: Vec<(u64, u64)> = devs.iter().map(driver).collect();
    let mode = devs[0].query(false)?.notifier_mode;
    for (d, vm, q) in setup {
        let _ = d.exec_queue_destroy(q);
        let _ = d.vm_destroy(vm);
    }
    let stats = |v: &mut Vec<u64>| {
        v.sort_unstable();
        let med = v[v.len() / 2];
        let mean = v.iter().sum::<u64>() / v.len() as u64;
        (med, mean, v[0])
    };
    let (med, mean, min) = stats(&mut times);
    let (bmed, _, _) = stats(&mut baseline);
    let invals: u64 = after
        .iter()
        .zip(before.iter())
        .map(|(a, b)| a.0 - b.0)
        .sum();
    let inval_ns: u64 = after
        .iter()
        .zip(before.iter())
        .map(|(a, b)| a.1 - b.1)
        .sum();
    Ok(format!(
        "mode={} devices={} long_running={} iters={} size={} median_ns={} mean_ns={} min_ns={} \
         baseline_median_ns={} device_invalidations={} driver_mean_ns_per_device_invalidation={}",
        if mode == svmgpu::uapi::SVMGPU_NOTIFIER_TWOPASS {
            "twopass"
        } else {
            "single"
        },
        devs.len(),
        long_running,
        iters,
        size,
        med,
        mean,
        min,
        bmed,
        invals,
        inval_ns / invals.max(1)
    ))
}

/// Anonymous memory of `len` bytes aligned to `align`, inside a reservation that is
/// unmapped on drop.
struct Aligned {
    base: *mut libc::c_void,
    base_len: usize,
    addr: u64,
    len: usize,
}

impl Aligned {
    fn new(len: usize, align: usize) -> std::io::Result<Self> {
        // SAFETY: A fresh reservation, then a fixed read-write mapping inside it.
        unsafe {
            let base_len = len + align;
            let base = libc::mmap(
                std::ptr::null_mut(),
                base_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            let a = (base as usize).div_ceil(align) * align;
            let p = libc::mmap(
                a as *mut _,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                let e = std::io::Error::last_os_error();
                libc::munmap(base, base_len);
                return Err(e);
            }
            // Populate it on the CPU: the GPU faults measure the driver, not page
            // allocation.
            std::ptr::write_bytes(p.cast::<u8>(), 0x11, len);
            Ok(Aligned {
                base,
                base_len,
                addr: a as u64,
                len,
            })
        }
    }

    fn protect(&self, prot: i32) -> std::io::Result<()> {
        // SAFETY: Our mapping; only its protection changes.
        if unsafe { libc::mprotect(self.addr as *mut _, self.len, prot) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: The reservation made by `new`.
        unsafe { libc::munmap(self.base, self.base_len) };
    }
}

/// A fault-mode VM with a queue and a prefetched batch page on one device.
struct SvmCtx<'a> {
    dev: &'a Device,
    vm: u32,
    q: u32,
    batch: Mapping,
}

impl<'a> SvmCtx<'a> {
    fn new(dev: &'a Device) -> std::io::Result<Self> {
        let vm = dev.vm_create(true)?;
        let q = dev.exec_queue_create(vm, false)?;
        let batch = Mapping::anon(64 * 1024)?;
        dev.vm_prefetch(vm, batch.addr(), batch.len() as u64, true)?;
        Ok(SvmCtx { dev, vm, q, batch })
    }

    fn run(&mut self, b: &Batch) -> std::io::Result<()> {
        b.write_to(self.batch.as_mut_slice());
        let f = self
            .dev
            .exec_retry(self.q, self.batch.addr(), b.len_bytes() as u32)?;
        let o = self.dev.wait(self.q, f, 30_000_000_000)?;
        if o.error != 0 {
            return Err(std::io::Error::other(format!("job failed: {o:?}")));
        }
        Ok(())
    }
}

impl Drop for SvmCtx<'_> {
    fn drop(&mut self) {
        let _ = self.dev.exec_queue_destroy(self.q);
        let _ = self.dev.vm_destroy(self.vm);
    }
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn svm_mode_name(m: u32) -> &'static str {
    match m {
        svmgpu::uapi::SVMGPU_SVM_SINGLE => "single",
        svmgpu::uapi::SVMGPU_SVM_PER_DEVICE => "per_device",
        _ => "shared",
    }
}

/// One SVM range (`size` bytes, aligned to itself) mirrored on every device through
/// fault-mode VMs: each iteration makes every device fault it in (a job that stores into
/// it), then times the `mprotect(PROT_READ)` that invalidates it on all of them at once.
pub fn bench_svm_invalidate(devs: &[Device], iters: usize, size: usize) -> std::io::Result<String> {
    if devs.is_empty() {
        return Err(std::io::Error::other("no device"));
    }
    let size = size.next_power_of_two().max(4096);
    let data = Aligned::new(size, size)?;
    let mut ctxs = devs
        .iter()
        .map(SvmCtx::new)
        .collect::<std::io::Result<Vec<_>>>()?;
    let driver = |d: &Device| {
        d.query(false)
            .map(|q| (q.invalidations, q.invalidation_ns))
            .unwrap_or((0, 0))
    };
    let before: Vec<(u64, u64)> = devs.iter().map(driver).collect();
    let mut times = Vec::with_capacity(iters);
    let mut baseline = Vec::with_capacity(iters);
    // The devices' own count of completed TLB invalidations, around the timed calls only:
    // every timed mprotect must have invalidated every device once (a mode that skipped a
    // device must not look fast), and the baseline none.
    let mut rtt = Vec::with_capacity(iters);
    let mut dev_invals = 0u64;
    let mut baseline_invals = 0u64;
    for it in 0..iters {
        for (i, c) in ctxs.iter_mut().enumerate() {
            let mut b = Batch::new();
            b.push(Insn::Store {
                size64: false,
                va: data.addr + (i * 64) as u64,
                value: it as u64,
            })
            .end();
            c.run(&b)?;
        }
        let c0 = device_tlb_invalidations(devs)?;
        let t0 = now_ns();
        data.protect(libc::PROT_READ)?;
        times.push(now_ns() - t0);
        let c1 = device_tlb_invalidations(devs)?;
        data.protect(libc::PROT_READ | libc::PROT_WRITE)?;
        // Nothing mirrored on the GPUs now: the same call without device work.
        let c2 = device_tlb_invalidations(devs)?;
        let t2 = now_ns();
        data.protect(libc::PROT_READ)?;
        baseline.push(now_ns() - t2);
        let c3 = device_tlb_invalidations(devs)?;
        data.protect(libc::PROT_READ | libc::PROT_WRITE)?;
        dev_invals += c1 - c0;
        baseline_invals += c3 - c2;
        // The bare command round trip (GET_INFO) of the same run, for scale.
        rtt.push(devs[0].query(false)?.round_trip_ns);
    }
    let after: Vec<(u64, u64)> = devs.iter().map(driver).collect();
    let mode = devs[0].query(false)?.svm_mode;
    drop(ctxs.drain(..));
    let invals: u64 = after.iter().zip(&before).map(|(a, b)| a.0 - b.0).sum();
    let inval_ns: u64 = after.iter().zip(&before).map(|(a, b)| a.1 - b.1).sum();
    let mean = times.iter().sum::<u64>() / times.len().max(1) as u64;
    let min = times.iter().copied().min().unwrap_or(0);
    Ok(format!(
        "bench=svm_invalidate svm_mode={} devices={} iters={} size={} median_ns={} mean_ns={} \
         min_ns={} baseline_median_ns={} device_invalidations={} \
         driver_mean_ns_per_device_invalidation={} device_tlb_invalidations={} \
         expected_tlb_invalidations={} baseline_tlb_invalidations={} \
         bare_round_trip_median_ns={}",
        svm_mode_name(mode),
        devs.len(),
        iters,
        size,
        median(&mut times),
        mean,
        min,
        median(&mut baseline),
        invals,
        inval_ns / invals.max(1),
        dev_invals,
        (iters * devs.len()) as u64,
        baseline_invals,
        median(&mut rtt)
    ))
}

/// GET_STATS index of `tlb_invalidations` (spec 6.18, offset 88).
const STAT_TLB_INVALIDATIONS: usize = 11;
/// GET_STATS indices of the fault-service counters (spec 6.18, since v0.3).
const STAT_FAULTS_RETRIED: usize = 26;
const STAT_FAULT_RETRY_NS: usize = 27;
const STAT_FAULT_DRIVER_NS: usize = 28;

/// The sum over `devs` of the devices' `tlb_invalidations` counters.
fn device_tlb_invalidations(devs: &[Device]) -> std::io::Result<u64> {
    let mut n = 0;
    for d in devs {
        n += d.query(true)?.stats[STAT_TLB_INVALIDATIONS];
    }
    Ok(n)
}

/// GPU fault service time, on a fault-mode VM of the first device.
///
/// `iters` times, a fresh 4 KiB mapping (one 4 KiB SVM range, populated on the CPU) is
/// stored to by a job. The device's own counters (GET_STATS, spec 6.18) give the end-to-end
/// service time, from the failed access to its retry, and of that the part from the
/// PAGE_FAULT event's delivery to the FAULT_REPLY's acceptance; the driver's DEVICE_QUERY
/// counters give its split: event to reply sent (`fault_service_ns`) and reply to the
/// device's answer (`fault_ack_ns`); DEVICE_QUERY's GET_INFO round trip, measured in the
/// same loop, is the bare command round trip; and the user-visible cost is the job with a
/// fault minus the same job without.
pub fn bench_fault(devs: &[Device], iters: usize) -> std::io::Result<String> {
    if devs.is_empty() {
        return Err(std::io::Error::other("no device"));
    }
    let d = &devs[0];
    let mut c = SvmCtx::new(d)?;
    let s0 = d.query(true)?;
    let mut service = Vec::with_capacity(iters);
    let mut rtt = Vec::with_capacity(iters);
    let mut job_fault = Vec::with_capacity(iters);
    let mut job_nofault = Vec::with_capacity(iters);
    for it in 0..iters {
        let m = Aligned::new(4096, 4096)?;
        let mut b = Batch::new();
        b.push(Insn::Store {
            size64: false,
            va: m.addr + 8,
            value: it as u64,
        })
        .end();
        let q0 = d.query(false)?;
        let t0 = now_ns();
        c.run(&b)?;
        let t1 = now_ns();
        // The fault worker adds the service time after its reply completed, which may be
        // just after the job: wait (briefly) until it is accounted.
        let mut q1 = d.query(false)?;
        while q1.fault_service_ns == q0.fault_service_ns && now_ns() - t1 < 50_000_000 {
            std::thread::sleep(std::time::Duration::from_micros(200));
            q1 = d.query(false)?;
        }
        let t2 = now_ns();
        c.run(&b)?;
        job_nofault.push(now_ns() - t2);
        job_fault.push(t1 - t0);
        let nf = q1.gpu_faults - q0.gpu_faults;
        if let Some(per_fault) = (q1.fault_service_ns - q0.fault_service_ns).checked_div(nf) {
            service.push(per_fault);
        }
        rtt.push(q0.round_trip_ns);
        rtt.push(q1.round_trip_ns);
    }
    drop(c);
    let s1 = d.query(true)?;
    let retried = s1.stats[STAT_FAULTS_RETRIED] - s0.stats[STAT_FAULTS_RETRIED];
    let per = |i: usize| {
        (s1.stats[i] - s0.stats[i])
            .checked_div(retried)
            .unwrap_or(0)
    };
    let e2e = per(STAT_FAULT_RETRY_NS);
    let dev_driver = per(STAT_FAULT_DRIVER_NS);
    let nf = s1.gpu_faults - s0.gpu_faults;
    let ack = (s1.fault_ack_ns - s0.fault_ack_ns)
        .checked_div(nf)
        .unwrap_or(0);
    let svc = median(&mut service);
    let rt = median(&mut rtt);
    let jf = median(&mut job_fault);
    let jn = median(&mut job_nofault);
    Ok(format!(
        "bench=fault svm_mode={} devices={} iters={} device_faults_retried={} \
         device_end_to_end_mean_ns={} device_driver_part_mean_ns={} \
         end_to_end_over_round_trip={:.2} fault_service_median_ns={} fault_ack_mean_ns={} \
         bare_round_trip_median_ns={} service_over_round_trip={:.2} \
         job_with_fault_median_ns={} job_without_fault_median_ns={} user_visible_fault_ns={}",
        svm_mode_name(d.query(false)?.svm_mode),
        devs.len(),
        iters,
        retried,
        e2e,
        dev_driver,
        e2e as f64 / rt.max(1) as f64,
        svc,
        ack,
        rt,
        svc as f64 / rt.max(1) as f64,
        jf,
        jn,
        jf.saturating_sub(jn)
    ))
}

/// Fault throughput: `contexts` threads, each with its own fault-mode VM and queue (on the
/// devices in turn), run 4 jobs that each store once into every 64 KiB chunk of a fresh
/// 1 MiB mapping (16 faults per job). Prints the aggregate rate and each device's.
pub fn bench_fault_throughput(devs: &[Device], contexts: usize) -> std::io::Result<String> {
    if devs.is_empty() {
        return Err(std::io::Error::other("no device"));
    }
    let rounds = 4usize;
    let faults = |d: &Device| d.query(false).map(|q| q.svm_faults).unwrap_or(0);
    let f0: Vec<u64> = devs.iter().map(faults).collect();
    let t0 = now_ns();
    let errors: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..contexts)
            .map(|t| {
                let d = &devs[t % devs.len()];
                sc.spawn(move || -> std::io::Result<()> {
                    let mut c = SvmCtx::new(d)?;
                    for _ in 0..rounds {
                        let m = Aligned::new(1 << 20, 1 << 20)?;
                        let mut b = Batch::new();
                        for chunk in 0..16u64 {
                            b.push(Insn::Store {
                                size64: false,
                                va: m.addr + chunk * 65536 + 4 * t as u64,
                                value: t as u64,
                            });
                        }
                        b.end();
                        // A 1 MiB VMA aligned to 1 MiB: 64 KiB ranges, one fault each.
                        c.run(&b)?;
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter()
            .filter_map(|h| h.join().ok().and_then(|r| r.err()).map(|e| e.to_string()))
            .collect()
    });
    let dt = now_ns() - t0;
    if let Some(e) = errors.first() {
        return Err(std::io::Error::other(e.clone()));
    }
    let f1: Vec<u64> = devs.iter().map(faults).collect();
    let per_dev: Vec<u64> = f1.iter().zip(&f0).map(|(a, b)| a - b).collect();
    let total: u64 = per_dev.iter().sum();
    let rate = |n: u64| n as f64 * 1e9 / dt.max(1) as f64;
    let per_dev_rates: Vec<String> = per_dev.iter().map(|&n| format!("{:.0}", rate(n))).collect();
    Ok(format!(
        "bench=fault_throughput svm_mode={} devices={} contexts={} throughput_faults={} \
         throughput_ns={} faults_per_s={:.0} faults_per_s_per_device={}",
        svm_mode_name(devs[0].query(false)?.svm_mode),
        devs.len(),
        contexts,
        total,
        dt,
        rate(total),
        per_dev_rates.join("/")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("svmgpu").chain(args.iter().copied()))
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            &["run", "--size", "abc"][..],
            &["run", "--size", "6"],
            &["run", "--size", "2097152"],
            &["run", "x"],
            &["bench-invalidate", "--iters", "0"],
            &["bench-invalidate", "--size", "100"],
            &["bench-fault", "--contexts", "65"],
            &["bench-fault", "--contexts", "8,0"],
            &["query", "--stat"],
            &["frobnicate"],
            &[],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn parses_good_values() {
        let Cli {
            cmd: Cmd::Run { n, size },
        } = parse(&["run", "1", "--size", "4096"]).unwrap()
        else {
            panic!("not run");
        };
        assert_eq!((n, size), (Some(1), 4096));
        let Cli {
            cmd:
                Cmd::BenchInvalidate {
                    iters,
                    size,
                    long_running,
                },
        } = parse(&[
            "bench-invalidate",
            "--iters",
            "100",
            "--size",
            "65536",
            "--long-running",
        ])
        .unwrap()
        else {
            panic!("not bench-invalidate");
        };
        assert_eq!((iters, size, long_running), (100, 65536, true));
        assert!(matches!(
            parse(&["query", "--stats"]).unwrap().cmd,
            Cmd::Query {
                stats: true,
                n: None
            }
        ));
    }
}
