//! The guest test cases. Each reports one KTAP result (or a nested suite).

use crate::{
    expect::Expect,
    gpu, inject,
    ktap::{Ktap, Outcome},
    util::{bound_devices, devices, errno, run, DRIVER_DIR, MODULE_PATH},
};
use std::{collections::BTreeSet, io::Write};
use svmgpu::{uapi, Device};

pub struct Env {
    pub expect: Expect,
    pub gpus: u32,
}

impl Env {
    pub fn new() -> Self {
        let expect = Expect::load();
        let gpus = expect.num("gpus").unwrap_or(0) as u32;
        Env { expect, gpus }
    }
}

pub type K = Ktap<Box<dyn Write>>;
type Test = fn(&Env, &str, &mut K);

/// Fault-injection tests: each needs its guest started with the injection spec that
/// `scripts/test.sh` pairs with its name; run only with `--only NAME`.
pub const INJECT: &[(&str, Test)] = &[
    ("inject_tlb_inval_delay", inject::tlb_inval_delay),
    ("inject_tlb_inval_drop", inject::tlb_inval_drop),
    ("inject_tlb_inval_error", inject::tlb_inval_error),
    ("inject_preempt_delay", inject::preempt_delay),
    ("inject_preempt_drop", inject::preempt_drop),
    ("inject_preempt_error", inject::preempt_error),
    ("inject_engine_hang", inject::engine_hang),
    ("inject_event_overflow", inject::event_overflow),
    ("inject_fault_spurious", inject::fault_spurious),
    ("inject_fault_duplicate", inject::fault_duplicate),
    ("inject_fault_phantom", inject::fault_phantom),
    ("inject_completion_corrupt", inject::completion_corrupt),
    ("inject_completion_duplicate", inject::completion_duplicate),
    ("inject_completion_reorder", inject::completion_reorder),
    ("inject_device_reset", inject::device_reset),
    ("inject_reset_timeout", inject::reset_timeout),
    ("inject_walk_read_error", inject::walk_read_error),
];

/// Tests that need large device latencies (`--tlb-inval-latency-ns 20000000`), so that a
/// driver returning early from a notifier is caught every time: scripts/test.sh runs them
/// in guests of their own; run only with `--only NAME`.
pub const LATENCY: &[(&str, Test)] = &[
    ("coherence_after_syscall", crate::coherence::after_syscall),
    ("coherence_many_bindings", crate::coherence::many_bindings),
    ("coherence_many_vms", crate::coherence::many_vms),
    (
        "unbind_stops_device_before_notifiers_return",
        crate::holes::unbind_stops_device_before_notifiers_return,
    ),
];

/// Tests that need the host to pause and continue the VM while they run (QMP `stop`/`cont`
/// through `run-vm.sh --qmp-hook`, see `pause.rs`): scripts/test.sh runs them in a guest of
/// their own; run only with `--only NAME`.
pub const PAUSE: &[(&str, Test)] =
    &[("jobs_survive_vm_pause", crate::pause::jobs_survive_vm_pause)];

/// Tests for a hand-written QEMU configuration: `bulk_instructions_across_ram_regions` needs
/// guest RAM in two regions meeting at 512 MiB (`run-vm.sh --config
/// qemu-configs/svmgpu-2-numa.cfg`, see `regions.rs`); run only with `--only NAME`.
pub const CONFIG: &[(&str, Test)] = &[(
    "bulk_instructions_across_ram_regions",
    crate::regions::bulk_instructions_across_ram_regions,
)];

pub const ALL: &[(&str, Test)] = &[
    ("driver_binds_all_devices", driver_binds_all_devices),
    ("config_matches_backend", config_matches_backend),
    ("get_info_round_trip", get_info_round_trip),
    (
        "device_query_rejects_bad_input",
        device_query_rejects_bad_input,
    ),
    ("kunit_suites_pass", kunit_suites_pass),
    ("exec_fill_checksum", gpu::exec_fill_checksum),
    (
        "fdinfo_reports_client_usage",
        gpu::fdinfo_reports_client_usage,
    ),
    (
        "exec_jobs_complete_in_order",
        gpu::exec_jobs_complete_in_order,
    ),
    (
        "vm_bind_rejects_bad_arguments",
        gpu::vm_bind_rejects_bad_arguments,
    ),
    (
        "exec_and_wait_reject_bad_arguments",
        gpu::exec_and_wait_reject_bad_arguments,
    ),
    (
        "gpu_access_to_unbound_va_is_efault",
        gpu::gpu_access_to_unbound_va_is_efault,
    ),
    (
        "readonly_binding_rejects_gpu_writes",
        gpu::readonly_binding_rejects_gpu_writes,
    ),
    (
        "fault_mode_populates_on_gpu_fault",
        gpu::fault_mode_populates_on_gpu_fault,
    ),
    (
        "fault_mode_unmapped_userptr_is_efault",
        gpu::fault_mode_unmapped_userptr_is_efault,
    ),
    ("userptr_invalidate_munmap", gpu::userptr_invalidate_munmap),
    (
        "userptr_invalidate_mprotect",
        gpu::userptr_invalidate_mprotect,
    ),
    (
        "userptr_invalidate_madvise_dontneed",
        gpu::userptr_invalidate_madvise_dontneed,
    ),
    (
        "userptr_invalidate_fork_cow",
        gpu::userptr_invalidate_fork_cow,
    ),
    (
        "userptr_invalidate_while_job_runs",
        gpu::userptr_invalidate_while_job_runs,
    ),
    (
        "userptr_invalidate_race_fault_mode",
        gpu::userptr_invalidate_race_fault_mode,
    ),
    (
        "long_running_preempted_on_invalidation",
        gpu::long_running_preempted_on_invalidation,
    ),
    (
        "wait_timeout_survives_signals",
        gpu::wait_timeout_survives_signals,
    ),
    ("many_vms_and_queues", gpu::many_vms_and_queues),
    ("devices_share_one_buffer", gpu::devices_share_one_buffer),
    ("no_stale_tlb_accesses", gpu::no_stale_tlb_accesses),
    ("device_unbind_while_busy", gpu::device_unbind_while_busy),
    ("module_unload_while_busy", gpu::module_unload_while_busy),
    (
        "invalidation_timing_single_vs_twopass",
        gpu::invalidation_timing,
    ),
    (
        "svm_bind_inside_mirrored_range",
        crate::holes::svm_bind_inside_mirrored_range,
    ),
    ("svm_next_to_binding", crate::holes::svm_next_to_binding),
    (
        "revalidation_races_invalidation",
        crate::coherence::revalidation_races_invalidation,
    ),
    (
        "invalidation_flood_is_back_pressure",
        crate::holes::invalidation_flood_is_back_pressure,
    ),
    (
        "out_syncobj_binary_signals_on_completion",
        crate::syncobj::out_syncobj_binary_signals_on_completion,
    ),
    (
        "out_syncobj_timeline_point",
        crate::syncobj::out_syncobj_timeline_point,
    ),
    (
        "in_syncobj_orders_jobs_across_queues",
        crate::syncobj::in_syncobj_orders_jobs_across_queues,
    ),
    (
        "in_sync_file_orders_jobs_across_devices",
        crate::syncobj::in_sync_file_orders_jobs_across_devices,
    ),
    (
        "sync_file_export_polls",
        crate::syncobj::sync_file_export_polls,
    ),
    (
        "failed_job_fence_carries_error",
        crate::syncobj::failed_job_fence_carries_error,
    ),
    (
        "exec_syncs_reject_bad_arguments",
        crate::syncobj::exec_syncs_reject_bad_arguments,
    ),
    (
        "exec_interrupted_in_fence_wait_has_no_effect",
        crate::syncobj::exec_interrupted_in_fence_wait_has_no_effect,
    ),
    ("svm_mode_single", crate::svm::mode_single),
    ("svm_mode_per_device", crate::svm::mode_per_device),
    ("svm_mode_shared", crate::svm::mode_shared),
    ("module_unload_reload", module_unload_reload),
];

fn driver_binds_all_devices(env: &Env, name: &str, k: &mut K) {
    let outcome = (|| {
        if env.gpus == 0 {
            return Outcome::Fail("no expected GPU count in /etc/svmgpu-expect".into());
        }
        let bound = bound_devices();
        if bound != env.gpus as usize {
            return Outcome::Fail(format!(
                "{DRIVER_DIR} lists {bound} devices, want {}",
                env.gpus
            ));
        }
        match Device::enumerate() {
            Ok(d) => Outcome::check(
                d.len() == env.gpus as usize,
                format!("{} svmgpu render nodes, want {}", d.len(), env.gpus),
            ),
            Err(e) => Outcome::Fail(format!("enumerate: {e}")),
        }
    })();
    k.result(name, &outcome);
}

fn config_matches_backend(env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else { return };
    let mut cases = Vec::new();
    let mut indices = BTreeSet::new();
    for (slot, dev) in devs.iter().enumerate() {
        let outcome = match dev.query(false) {
            Err(e) => Outcome::Fail(format!("DEVICE_QUERY: {e}")),
            Ok(q) => {
                let c = &q.config;
                indices.insert(c.device_index);
                let mut bad = Vec::new();
                let mut want = |field: &str, got: u64, key: &str| {
                    if let Some(w) = env.expect.num(key) {
                        if got != w {
                            bad.push(format!("{field} = {got}, want {w}"));
                        }
                    }
                };
                want("magic", c.magic.into(), "magic");
                want("version", c.version.into(), "version");
                want("num_engines", c.num_engines.into(), "engines");
                want("num_asids", c.num_asids.into(), "asids");
                want("max_contexts", c.max_contexts.into(), "max_contexts");
                want("tlb_entries", c.tlb_entries.into(), "tlb_entries");
                want("tlb_ways", c.tlb_ways.into(), "tlb_ways");
                want("page_size_mask", c.page_size_mask, "page_size_mask");
                want("va_bits", c.va_bits.into(), "va_bits");
                want(
                    "max_outstanding_faults",
                    c.max_outstanding_faults.into(),
                    "max_faults",
                );
                want(
                    "tlb_inval_latency_ns",
                    c.tlb_inval_latency_ns.into(),
                    "tlb_inval_latency_ns",
                );
                want(
                    "preempt_latency_ns",
                    c.preempt_latency_ns.into(),
                    "preempt_latency_ns",
                );
                if c.magic != svmgpu_spec::CONFIG_MAGIC {
                    bad.push(format!("magic {:#x} is not the spec's", c.magic));
                }
                Outcome::check(bad.is_empty(), bad.join("; "))
            }
        };
        cases.push((format!("device_{slot}"), outcome));
    }
    let all: BTreeSet<u32> = (0..env.gpus).collect();
    cases.push((
        "device_indices_distinct".into(),
        Outcome::check(
            indices == all,
            format!("device_index values {indices:?}, want {all:?}"),
        ),
    ));
    k.suite(name, cases);
}

fn get_info_round_trip(_env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else { return };
    let mut cases = Vec::new();
    for (slot, dev) in devs.iter().enumerate() {
        let outcome = (|| {
            let a = dev.query(false).map_err(|e| format!("first QUERY: {e}"))?;
            let b = dev.query(false).map_err(|e| format!("second QUERY: {e}"))?;
            if a.info.device_index != a.config.device_index {
                return Err(format!(
                    "GET_INFO device_index {} != config {}",
                    a.info.device_index, a.config.device_index
                ));
            }
            if a.info.spec_version != a.config.version || a.info.num_engines != a.config.num_engines
            {
                return Err("GET_INFO disagrees with the config space".into());
            }
            if b.info.commands_completed != a.info.commands_completed + 1 {
                return Err(format!(
                    "commands_completed went {} -> {}, want +1",
                    a.info.commands_completed, b.info.commands_completed
                ));
            }
            Ok(format!(
                "virtio{}: GET_INFO round trip {} ns, {} ns",
                a.bus_index, a.round_trip_ns, b.round_trip_ns
            ))
        })();
        let outcome = match outcome {
            Ok(diag) => {
                k.diag(&format!("device_{slot}: {diag}"));
                Outcome::Pass
            }
            Err(e) => Outcome::Fail(e),
        };
        cases.push((format!("device_{slot}"), outcome));
    }
    k.suite(name, cases);
}

fn device_query_rejects_bad_input(_env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else { return };
    let dev = &devs[0];
    let mut cases = Vec::new();
    let mut q = uapi::DeviceQuery {
        flags: 0x80,
        ..Default::default()
    };
    // SAFETY: `q` has the size the command encodes.
    let got = errno(unsafe {
        dev.raw_ioctl(
            uapi::DRM_IOCTL_SVMGPU_DEVICE_QUERY,
            (&mut q as *mut uapi::DeviceQuery).cast(),
        )
    });
    cases.push((
        "undefined_flag_is_einval".into(),
        Outcome::check(got == Some(libc::EINVAL), format!("got {got:?}")),
    ));
    let mut q = uapi::DeviceQuery {
        reserved: [0, 7, 0],
        ..Default::default()
    };
    // SAFETY: `q` has the size the command encodes.
    let got = errno(unsafe {
        dev.raw_ioctl(
            uapi::DRM_IOCTL_SVMGPU_DEVICE_QUERY,
            (&mut q as *mut uapi::DeviceQuery).cast(),
        )
    });
    cases.push((
        "nonzero_reserved_is_einval".into(),
        Outcome::check(got == Some(libc::EINVAL), format!("got {got:?}")),
    ));
    // SAFETY: A null argument must be refused by the kernel with EFAULT.
    let got =
        errno(unsafe { dev.raw_ioctl(uapi::DRM_IOCTL_SVMGPU_DEVICE_QUERY, std::ptr::null_mut()) });
    cases.push((
        "null_pointer_is_efault".into(),
        Outcome::check(got == Some(libc::EFAULT), format!("got {got:?}")),
    ));
    let mut junk = [0u8; 256];
    // An ioctl number past the driver's last one (DRM_COMMAND_BASE + 0x20).
    let unknown = (3u64 << 30) | (8 << 16) | (u64::from(b'd') << 8) | 0x60;
    // SAFETY: An unknown command must be refused without touching the argument.
    let got = errno(unsafe { dev.raw_ioctl(unknown, junk.as_mut_ptr()) });
    cases.push((
        "unknown_ioctl_is_einval".into(),
        Outcome::check(got == Some(libc::EINVAL), format!("got {got:?}")),
    ));
    k.suite(name, cases);
}

/// The module's KUnit suites (run when it was loaded) report through debugfs. They are
/// enumerated from the kernel (every `svmgpu_*` folder of /sys/kernel/debug/kunit), not
/// from a fixed list: a suite added to the module is checked without editing this test,
/// and no suite at all is a failure.
fn kunit_suites_pass(_env: &Env, name: &str, k: &mut K) {
    let mut cases = Vec::new();
    let mut suites: Vec<String> = std::fs::read_dir("/sys/kernel/debug/kunit")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("svmgpu"))
                .collect()
        })
        .unwrap_or_default();
    suites.sort();
    k.diag(&format!("KUnit suites of the module: {suites:?}"));
    if suites.is_empty() {
        cases.push((
            "suites_found".to_string(),
            Outcome::Fail("no svmgpu KUnit suite in /sys/kernel/debug/kunit".into()),
        ));
    }
    for suite in suites {
        let path = format!("/sys/kernel/debug/kunit/{suite}/results");
        let outcome = match std::fs::read_to_string(&path) {
            Err(e) => Outcome::Fail(format!("{path}: {e}")),
            Ok(text) => {
                let oks = text
                    .lines()
                    .filter(|l| l.trim_start().starts_with("ok "))
                    .count();
                let bad: Vec<&str> = text
                    .lines()
                    .filter(|l| l.trim_start().starts_with("not ok"))
                    .collect();
                for l in text.lines().filter(|l| l.trim_start().starts_with("ok ")) {
                    k.diag(&format!("{suite}: {}", l.trim()));
                }
                Outcome::check(
                    bad.is_empty() && oks > 0,
                    format!("{} ok, failures: {bad:?}", oks),
                )
            }
        };
        cases.push((suite.to_string(), outcome));
    }
    k.suite(name, cases);
}

fn module_unload_reload(env: &Env, name: &str, k: &mut K) {
    let mut cases = Vec::new();
    for round in 1..=2 {
        let unload = run("rmmod", &["svmgpu"]).and_then(|()| {
            let nodes = Device::enumerate().map(|d| d.len()).unwrap_or(0);
            if nodes != 0 || bound_devices() != 0 {
                Err("devices or render nodes left after rmmod".into())
            } else {
                Ok(())
            }
        });
        cases.push((
            format!("unload_{round}"),
            Outcome::check(unload.is_ok(), unload.err().unwrap_or_default()),
        ));
        let reload = run("insmod", &[MODULE_PATH]).and_then(|()| {
            let devs = Device::enumerate().map_err(|e| e.to_string())?;
            if devs.len() != env.gpus as usize || bound_devices() != env.gpus as usize {
                return Err(format!(
                    "{} devices after reload, want {}",
                    devs.len(),
                    env.gpus
                ));
            }
            for (slot, d) in devs.iter().enumerate() {
                d.query(false)
                    .map_err(|e| format!("QUERY {slot} after reload: {e}"))?;
            }
            Ok(())
        });
        cases.push((
            format!("reload_{round}"),
            Outcome::check(reload.is_ok(), reload.err().unwrap_or_default()),
        ));
    }
    k.suite(name, cases);
}
