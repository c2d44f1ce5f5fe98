//! `svmgpu`: a small CLI for the svmgpu DRM uAPI, for the guest.
//!
//! ```text
//! svmgpu list                       the devices' render nodes
//! svmgpu query [--stats] [N]        DEVICE_QUERY of device N (default: all)
//! svmgpu run [N] [--size BYTES]     run a FILL + CHECKSUM job and verify it on the CPU
//! svmgpu bench-invalidate [--iters N] [--size BYTES] [--long-running]
//!                                   time CPU invalidations (mprotect) of one buffer bound
//!                                   on every device
//! ```

use std::process::ExitCode;
use svmgpu::{spec::isa::Insn, Batch, Device, Mapping};

fn usage() -> ExitCode {
    eprintln!(
        "usage: svmgpu list | query [--stats] [N] | run [N] [--size BYTES] | \
         bench-invalidate [--iters N] [--size BYTES] [--long-running]"
    );
    ExitCode::from(2)
}

fn pick(devs: &[Device], n: Option<usize>) -> Vec<(usize, &Device)> {
    devs.iter()
        .enumerate()
        .filter(|(i, _)| n.is_none_or(|n| n == *i))
        .collect()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        return usage();
    };
    let mut n = None;
    let mut stats = false;
    let mut size = 64 * 1024usize;
    let mut iters = 200usize;
    let mut long_running = false;
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--stats" => stats = true,
            "--long-running" => long_running = true,
            "--size" => size = it.next().and_then(|v| v.parse().ok()).unwrap_or(size),
            "--iters" => iters = it.next().and_then(|v| v.parse().ok()).unwrap_or(iters),
            v => match v.parse() {
                Ok(v) => n = Some(v),
                Err(_) => return usage(),
            },
        }
    }
    let devs = match Device::enumerate() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("svmgpu: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cmd.as_str() {
        "list" => {
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
        "query" => {
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
        "run" => {
            let mut rc = ExitCode::SUCCESS;
            for (i, d) in pick(&devs, n) {
                match svmgpu::fill_and_checksum(
                    d,
                    size.min(1 << 20),
                    0x5a5a_0000 | i as u32,
                    0x10_0000,
                ) {
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
        "bench-invalidate" => match bench_invalidate(&devs, iters, size, long_running) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("svmgpu: bench-invalidate: {e}");
                ExitCode::FAILURE
            }
        },
        _ => usage(),
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
