//! `svmgpu-ktap`: svmgpu's guest test suite. Runs inside the test VM (static binary in the
//! initramfs), prints KTAP v1 to stdout or to the file given with `--out`, and exits 1
//! when any test failed.

mod audit;
mod coherence;
mod expect;
mod gpu;
mod holes;
mod inject;
mod ktap;
mod pause;
mod regions;
mod soak;
mod svm;
mod syncobj;
mod tests;
mod util;

use std::io::Write;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut out: Box<dyn Write + Send> = Box::new(std::io::stdout());
    let mut only: Option<String> = None;
    let mut soak: Option<u64> = None;
    let mut seed: u64 = 1;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => {
                let path = args.next().unwrap_or_default();
                match std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&path)
                {
                    Ok(f) => out = Box::new(f),
                    Err(e) => {
                        eprintln!("svmgpu-ktap: cannot open {path}: {e}");
                        std::process::exit(2);
                    }
                }
            }
            "--only" => match args.next() {
                Some(names) => only = Some(names),
                None => {
                    eprintln!("svmgpu-ktap: --only needs test names");
                    std::process::exit(2);
                }
            },
            "--cases" => match args.next().map(|l| svm::select_cases(&l)) {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    eprintln!("svmgpu-ktap: --cases: {e} (svmgpu-ktap --help lists them)");
                    std::process::exit(2);
                }
                None => {
                    eprintln!("svmgpu-ktap: --cases needs SVM case names");
                    std::process::exit(2);
                }
            },
            "--module-args" => match args.next() {
                Some(list) => {
                    util::set_module_args(list.split_whitespace().map(str::to_owned).collect())
                }
                None => {
                    eprintln!("svmgpu-ktap: --module-args needs PARAM=VALUE[ PARAM=VALUE...]");
                    std::process::exit(2);
                }
            },
            "--soak" => soak = args.next().and_then(|v| v.parse().ok()),
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()).unwrap_or(1),
            "-h" | "--help" => {
                println!("usage: svmgpu-ktap [--out FILE] [--only TEST[,TEST...]] [--module-args 'PARAM=VALUE ...']\n       [--cases CASE[,CASE...]]\n       svmgpu-ktap [--out FILE] --soak SECONDS [--seed S]   (scripts/soak.sh)\n--module-args: reload svmgpu.ko with these parameters first, and add them to every reload\n  by a test that does not set them itself (e.g. 'svm_impl=gpusvm': the SVM tests run on drm_gpusvm)\n--cases: run only these cases in the suites svm_mode_single, svm_mode_per_device and\n  svm_mode_shared (names below)\ntests:");
                for t in tests::ALL {
                    println!("  {}", t.0);
                }
                println!("SVM cases (of svm_mode_single, svm_mode_per_device, svm_mode_shared):");
                for c in svm::case_names() {
                    println!("  {c}");
                }
                println!("fault-injection tests (only with --only, in a guest started with the spec scripts/test.sh pairs with them):");
                for t in tests::INJECT {
                    println!("  {}", t.0);
                }
                println!("tests needing large device latencies (only with --only; scripts/test.sh starts their guests with --tlb-inval-latency-ns 20000000):");
                for t in tests::LATENCY {
                    println!("  {}", t.0);
                }
                println!("tests needing the host to pause the VM (only with --only; scripts/test.sh runs them with run-vm.sh --qmp-hook 'scripts/lib/qmp-pause.sh --wait-for ... --until ...'):");
                for t in tests::PAUSE {
                    println!("  {}", t.0);
                }
                println!("tests needing guest RAM in two regions (only with --only; scripts/test.sh runs them with run-vm.sh --config qemu-configs/svmgpu-2-numa.cfg):");
                for t in tests::CONFIG {
                    println!("  {}", t.0);
                }
                return;
            }
            _ => {
                eprintln!("svmgpu-ktap: unknown argument {a}");
                std::process::exit(2);
            }
        }
    }
    if let Some(secs) = soak {
        std::process::exit(soak::run(secs, seed, out));
    }
    let env = tests::Env::new();
    if !util::module_args().is_empty() {
        // The module init loaded runs without them: reload it with them, and wait until
        // every device is bound again.
        let r = util::run("rmmod", &["svmgpu"])
            .and_then(|()| util::run("insmod", &[util::MODULE_PATH]));
        if let Err(e) = r {
            eprintln!(
                "svmgpu-ktap: reloading svmgpu.ko with {:?}: {e}",
                util::module_args()
            );
            std::process::exit(2);
        }
        let t0 = std::time::Instant::now();
        while (util::bound_devices() as u32) < env.gpus && t0.elapsed().as_secs() < 10 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let selected: Vec<_> = match only.as_deref() {
        None => tests::ALL.iter().collect(),
        Some(list) => {
            let mut sel = Vec::new();
            for o in list.split(',') {
                match tests::ALL
                    .iter()
                    .chain(tests::INJECT.iter())
                    .chain(tests::LATENCY.iter())
                    .chain(tests::PAUSE.iter())
                    .chain(tests::CONFIG.iter())
                    .find(|t| t.0 == o)
                {
                    Some(t) => sel.push(t),
                    None => {
                        // An unknown name must fail the run, not pass a plan of 0 tests.
                        eprintln!(
                            "svmgpu-ktap: no test named {o:?} (svmgpu-ktap --help lists them)"
                        );
                        std::process::exit(2);
                    }
                }
            }
            sel
        }
    };
    let out: Box<dyn Write> = out;
    // One more result at the end: the devices' audit around every test (audit.rs).
    let mut k = ktap::Ktap::new(out, selected.len() + 1);
    if !util::module_args().is_empty() {
        k.diag(&format!(
            "svmgpu.ko reloaded with {}",
            util::module_args().join(" ")
        ));
    }
    if let Ok(uptime) = std::fs::read_to_string("/proc/uptime") {
        k.diag(&format!(
            "guest uptime at first test: {} s",
            uptime.split_whitespace().next().unwrap_or("?")
        ));
    }
    let mut dirty = Vec::new();
    let mut snap = audit::snapshot();
    for (name, test) in selected {
        test(&env, name, &mut k);
        let now = audit::snapshot();
        let v = audit::violations(&snap, &now);
        if !v.is_empty() {
            dirty.push(format!("during {name}: {v}"));
        }
        // Devices that went away (unbind) keep their last counters.
        snap.extend(now);
    }
    let outcome = if !dirty.is_empty() {
        ktap::Outcome::Fail(dirty.join(" | "))
    } else if audit::audit_off(&snap) {
        ktap::Outcome::Fail("a device ran instructions its audit did not check (audit off?)".into())
    } else {
        ktap::Outcome::Pass
    };
    k.result("device_audit_clean", &outcome);
    std::process::exit(i32::from(k.failed() > 0));
}
