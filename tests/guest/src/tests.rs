//! The guest test cases. Each reports one KTAP result (or a nested suite).

use crate::{
    ctl::{Ctl, IOCTL_QUERY},
    expect::Expect,
    ktap::{Ktap, Outcome},
};
use std::{collections::BTreeSet, io::Write, process::Command};

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

type Test = fn(&Env, &str, &mut Ktap<Box<dyn Write>>);

pub const ALL: &[(&str, Test)] = &[
    ("driver_binds_all_devices", driver_binds_all_devices),
    ("config_matches_backend", config_matches_backend),
    ("get_info_round_trip", get_info_round_trip),
    (
        "control_node_rejects_bad_input",
        control_node_rejects_bad_input,
    ),
    ("module_unload_reload", module_unload_reload),
];

const DRIVER_DIR: &str = "/sys/bus/virtio/drivers/svmgpu";
const MODULE_PATH: &str = "/lib/modules/svmgpu.ko";

fn bound_devices() -> usize {
    std::fs::read_dir(DRIVER_DIR)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("virtio"))
                .count()
        })
        .unwrap_or(0)
}

fn driver_binds_all_devices(env: &Env, name: &str, k: &mut Ktap<Box<dyn Write>>) {
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
        match Ctl::open().and_then(|c| c.num_devices()) {
            Ok(n) => Outcome::check(
                n == env.gpus,
                format!("NUM_DEVICES says {n}, want {}", env.gpus),
            ),
            Err(e) => Outcome::Fail(format!("NUM_DEVICES: {e}")),
        }
    })();
    k.result(name, &outcome);
}

fn config_matches_backend(env: &Env, name: &str, k: &mut Ktap<Box<dyn Write>>) {
    let mut cases = Vec::new();
    let mut indices = BTreeSet::new();
    let ctl = match Ctl::open() {
        Ok(c) => c,
        Err(e) => return k.result(name, &Outcome::Fail(format!("open: {e}"))),
    };
    for slot in 0..env.gpus {
        let outcome = match ctl.query(slot) {
            Err(e) => Outcome::Fail(format!("QUERY: {e}")),
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

fn get_info_round_trip(env: &Env, name: &str, k: &mut Ktap<Box<dyn Write>>) {
    let ctl = match Ctl::open() {
        Ok(c) => c,
        Err(e) => return k.result(name, &Outcome::Fail(format!("open: {e}"))),
    };
    let mut cases = Vec::new();
    for slot in 0..env.gpus {
        let outcome = (|| {
            let a = ctl.query(slot).map_err(|e| format!("first QUERY: {e}"))?;
            let b = ctl.query(slot).map_err(|e| format!("second QUERY: {e}"))?;
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

fn errno_of(r: std::io::Result<()>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn control_node_rejects_bad_input(env: &Env, name: &str, k: &mut Ktap<Box<dyn Write>>) {
    let ctl = match Ctl::open() {
        Ok(c) => c,
        Err(e) => return k.result(name, &Outcome::Fail(format!("open: {e}"))),
    };
    let mut cases = Vec::new();
    for slot in [env.gpus, u32::MAX] {
        let got = ctl.query(slot).err().and_then(|e| e.raw_os_error());
        cases.push((
            format!("slot_{slot}_is_enodev"),
            Outcome::check(got == Some(libc::ENODEV), format!("got {got:?}")),
        ));
    }
    // SAFETY: A null argument must be refused by the kernel with EFAULT.
    let got = errno_of(unsafe { ctl.raw_ioctl(IOCTL_QUERY, std::ptr::null_mut()) });
    cases.push((
        "null_pointer_is_efault".into(),
        Outcome::check(got == Some(libc::EFAULT), format!("got {got:?}")),
    ));
    let mut junk = [0u8; 256];
    // SAFETY: An unknown command must be refused without touching the argument.
    let got = errno_of(unsafe { ctl.raw_ioctl(0x5300_00ff, junk.as_mut_ptr()) });
    cases.push((
        "unknown_ioctl_is_enotty".into(),
        Outcome::check(got == Some(libc::ENOTTY), format!("got {got:?}")),
    ));
    k.suite(name, cases);
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {args:?}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn module_unload_reload(env: &Env, name: &str, k: &mut Ktap<Box<dyn Write>>) {
    let mut cases = Vec::new();
    for round in 1..=2 {
        let unload = run("rmmod", &["svmgpu"]).and_then(|()| {
            if std::path::Path::new(crate::ctl::CTL_PATH).exists() || bound_devices() != 0 {
                Err("devices or control node left after rmmod".into())
            } else {
                Ok(())
            }
        });
        cases.push((
            format!("unload_{round}"),
            Outcome::check(unload.is_ok(), unload.err().unwrap_or_default()),
        ));
        let reload = run("insmod", &[MODULE_PATH]).and_then(|()| {
            let n = Ctl::open()
                .and_then(|c| c.num_devices())
                .map_err(|e| e.to_string())?;
            if n != env.gpus || bound_devices() != env.gpus as usize {
                return Err(format!("{n} devices after reload, want {}", env.gpus));
            }
            let ctl = Ctl::open().map_err(|e| e.to_string())?;
            for slot in 0..env.gpus {
                ctl.query(slot)
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
