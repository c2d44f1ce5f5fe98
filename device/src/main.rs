// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `svmgpu-device`: serve svmgpu virtual GPUs on vhost-user sockets.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use svmgpu_device::config::{defaults, DeviceOptions};
use svmgpu_device::daemon::{self, DaemonConfig};
use svmgpu_device::inject::InjectSpec;

/// svmgpu: a virtual GPU with device page tables, TLBs and recoverable page faults, served
/// as vhost-user devices (virtio ID 62).
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Socket path prefix: device i listens on `<SOCKET_PATH><i>` (P0, P1, ...).
    #[arg(
        short,
        long,
        value_name = "PATH",
        required_unless_present = "print_config"
    )]
    socket_path: Option<PathBuf>,

    /// Print the config values the devices would present (`key=value` lines) and exit.
    #[arg(long)]
    print_config: bool,

    /// On exit, write every device's statistics to this file as a JSON array.
    #[arg(long, value_name = "PATH")]
    stats_json: Option<PathBuf>,

    /// Number of devices (sockets) to serve, one thread each.
    #[arg(short = 'c', long, default_value_t = 1)]
    socket_count: u32,

    /// Engines per device.
    #[arg(long, default_value_t = 2)]
    engines: u32,

    /// Address spaces (ASIDs) per device.
    #[arg(long, default_value_t = 64)]
    asids: u32,

    /// Contexts per device.
    #[arg(long, default_value_t = 256)]
    max_contexts: u32,

    /// TLB entries per engine.
    #[arg(long, default_value_t = 64)]
    tlb_entries: u32,

    /// TLB associativity; must divide --tlb-entries.
    #[arg(long, default_value_t = 4)]
    tlb_ways: u32,

    /// Page faults that can be outstanding at once.
    #[arg(long, default_value_t = 64)]
    max_faults: u32,

    /// Nominal TLB invalidation latency (acceptance to completion), in nanoseconds.
    #[arg(long, default_value_t = defaults::TLB_INVAL_LATENCY_NS)]
    tlb_inval_latency_ns: u32,

    /// Nominal preemption latency (acceptance to the context stopped), in nanoseconds.
    #[arg(long, default_value_t = defaults::PREEMPT_LATENCY_NS)]
    preempt_latency_ns: u32,

    /// Modelled cost of one page walk (a TLB miss), in nanoseconds.
    #[arg(long, default_value_t = defaults::WALK_LATENCY_NS)]
    walk_latency_ns: u32,

    /// Modelled cost of one instruction, in nanoseconds.
    #[arg(long, default_value_t = defaults::INSN_COST_NS)]
    insn_cost_ns: u32,

    /// Time-slice length, in microseconds.
    #[arg(long, default_value_t = defaults::TIMESLICE_US)]
    timeslice_us: u32,

    /// An engine that makes no progress for this long (an injected hang) posts ENGINE_HANG,
    /// in microseconds.
    #[arg(long, default_value_t = defaults::HANG_THRESHOLD_US)]
    hang_threshold_us: u32,

    /// Fault injection: `ITEM[;ITEM...]`, each `seed=S` or `KIND[:key=value,...]`
    /// (repeatable; see device/README.md, "Fault injection").
    #[arg(long, value_name = "SPEC")]
    inject: Vec<String>,

    /// Serve the runtime control socket (svmgpu-ctl) at PATH, owner-only (mode 0600).
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,

    /// Audit every engine access (re-walk and count stale accesses) even if the driver does
    /// not accept the AUDIT feature.
    #[arg(long)]
    audit: bool,

    /// Audit: a TLB entry ahead of its page table for this long, with no invalidation
    /// covering it accepted, counts as unflushed (GET_STATS unflushed_entries), in
    /// nanoseconds.
    #[arg(long, value_name = "NS", default_value_t = defaults::AUDIT_GRACE_NS)]
    audit_grace_ns: u64,

    /// TLBs never evict: entries leave only by invalidation, and a translation whose set is
    /// full is used uncached (keeps a forgotten invalidation observable).
    #[arg(long)]
    tlb_no_evict: bool,

    /// A job of a context created without CTX_F_LONG_RUNNING that has been on an engine this
    /// long fails with JOB_TIMEOUT, in milliseconds (0: never).
    #[arg(long, value_name = "MS", default_value_t = defaults::JOB_TIMEOUT_MS)]
    job_timeout_ms: u32,
}

impl TryFrom<Args> for DaemonConfig {
    type Error = String;

    fn try_from(a: Args) -> Result<Self, String> {
        let inject = InjectSpec::parse_all(&a.inject).map_err(|e| format!("--inject: {e}"))?;
        Ok(DaemonConfig {
            socket_path: a.socket_path.unwrap_or_default(),
            socket_count: a.socket_count,
            stats_json: a.stats_json,
            inject,
            control_socket: a.control_socket,
            options: DeviceOptions {
                engines: a.engines,
                asids: a.asids,
                max_contexts: a.max_contexts,
                tlb_entries: a.tlb_entries,
                tlb_ways: a.tlb_ways,
                max_faults: a.max_faults,
                tlb_inval_latency_ns: a.tlb_inval_latency_ns,
                preempt_latency_ns: a.preempt_latency_ns,
                walk_latency_ns: a.walk_latency_ns,
                insn_cost_ns: a.insn_cost_ns,
                timeslice_us: a.timeslice_us,
                hang_threshold_us: a.hang_threshold_us,
                audit: a.audit,
                audit_grace_ns: a.audit_grace_ns,
                tlb_no_evict: a.tlb_no_evict,
                job_timeout_ms: a.job_timeout_ms,
            },
        })
    }
}

fn main() -> ExitCode {
    env_logger::init();
    let args = Args::parse();
    let print_config = args.print_config;
    let config = match DaemonConfig::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("svmgpu-device: {e}");
            return ExitCode::from(2);
        }
    };
    if print_config {
        if let Err(e) = config.options.validate() {
            eprintln!("svmgpu-device: {e}");
            return ExitCode::from(2);
        }
        print!("{}", config.options.expected_config());
        return ExitCode::SUCCESS;
    }
    if let Err(e) = config.validate() {
        eprintln!("svmgpu-device: {e}");
        return ExitCode::from(2);
    }
    match daemon::run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svmgpu-device: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(a: Args) -> DaemonConfig {
        DaemonConfig::try_from(a).unwrap()
    }

    #[test]
    fn defaults() {
        let c = cfg(Args::parse_from(["svmgpu-device", "-s", "/tmp/x"]));
        assert_eq!(c.socket_path, PathBuf::from("/tmp/x"));
        assert_eq!(c.stats_json, None);
        assert_eq!(c.socket_count, 1);
        assert_eq!(c.options, DeviceOptions::default());
    }

    #[test]
    fn all_options() {
        let c = cfg(Args::parse_from([
            "svmgpu-device",
            "--socket-path",
            "/tmp/y",
            "--socket-count",
            "4",
            "--engines",
            "3",
            "--asids",
            "16",
            "--max-contexts",
            "8",
            "--tlb-entries",
            "32",
            "--tlb-ways",
            "8",
            "--max-faults",
            "5",
            "--tlb-inval-latency-ns",
            "1",
            "--preempt-latency-ns",
            "2",
            "--walk-latency-ns",
            "3",
            "--insn-cost-ns",
            "4",
            "--timeslice-us",
            "5",
            "--hang-threshold-us",
            "6",
            "--audit",
            "--audit-grace-ns",
            "7",
            "--tlb-no-evict",
            "--job-timeout-ms",
            "8",
            "--inject",
            "seed=3;engine-hang:count=1",
            "--inject",
            "device-reset:p=0.5",
            "--control-socket",
            "/tmp/ctl",
        ]));
        assert_eq!(
            c.inject.to_string(),
            "seed=3;engine-hang:count=1;device-reset:p=0.5"
        );
        assert_eq!(c.control_socket, Some(PathBuf::from("/tmp/ctl")));
        assert_eq!(c.socket_count, 4);
        assert_eq!(
            c.options,
            DeviceOptions {
                engines: 3,
                asids: 16,
                max_contexts: 8,
                tlb_entries: 32,
                tlb_ways: 8,
                max_faults: 5,
                tlb_inval_latency_ns: 1,
                preempt_latency_ns: 2,
                walk_latency_ns: 3,
                insn_cost_ns: 4,
                timeslice_us: 5,
                hang_threshold_us: 6,
                audit: true,
                audit_grace_ns: 7,
                tlb_no_evict: true,
                job_timeout_ms: 8,
            }
        );
        assert!(c.validate().is_ok());
    }

    #[test]
    fn invalid_geometry_is_reported() {
        let c = cfg(Args::parse_from([
            "svmgpu-device",
            "-s",
            "/tmp/z",
            "--tlb-entries",
            "10",
        ]));
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("--tlb-entries (10) must be a multiple of --tlb-ways (4)"),
            "{e}"
        );
    }

    #[test]
    fn invalid_inject_is_reported() {
        let a = Args::parse_from(["svmgpu-device", "-s", "/tmp/z", "--inject", "engine-hung"]);
        let e = DaemonConfig::try_from(a).unwrap_err();
        assert!(
            e.starts_with("--inject: unknown injection kind 'engine-hung'"),
            "{e}"
        );
        let c = cfg(Args::parse_from([
            "svmgpu-device",
            "-s",
            "/tmp/z",
            "--inject",
            "engine-hang:device=1",
        ]));
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("device=1, but there are only 1 device(s)"),
            "{e}"
        );
    }

    #[test]
    fn missing_socket_is_an_error() {
        assert!(Args::try_parse_from(["svmgpu-device"]).is_err());
    }
}
