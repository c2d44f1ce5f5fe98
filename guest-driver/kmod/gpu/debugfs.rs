// SPDX-License-Identifier: GPL-2.0

//! The device's debugfs directory `svmgpu/virtioN/`: `recovery` (every recovery counter,
//! the last reset), `job_timeout_ms` (the watchdog's timeout) and `race_delay_us` (a test
//! hook: see [`Gpu::race_delay`]).

use super::Gpu;
use kernel::{
    debugfs,
    prelude::*,
    str::CString,
    sync::{
        atomic::{Atomic, Relaxed},
        Arc,
    },
    uaccess::UserSliceReader,
};

/// Largest `race_delay_us` (debugfs).
const MAX_RACE_DELAY_US: u32 = 1_000_000;

/// A device's debugfs directory: `recovery` (counters, last reset), `job_timeout_ms` and
/// `race_delay_us`.
pub(super) struct DebugFs {
    _files: [Pin<KBox<debugfs::File<Arc<Gpu>>>>; 3],
    _dir: debugfs::Dir,
}

/// A decimal number written to a debugfs file.
fn read_number(r: &mut UserSliceReader) -> Result<u32> {
    let mut buf = [0u8; 16];
    let n = r.len();
    if n == 0 || n > buf.len() {
        return Err(EINVAL);
    }
    r.read_slice(&mut buf[..n])?;
    let s = core::str::from_utf8(&buf[..n]).map_err(|_| EINVAL)?;
    s.trim().parse().map_err(|_| EINVAL)
}

fn write_job_timeout(gpu: &Arc<Gpu>, r: &mut UserSliceReader) -> Result {
    let v = read_number(r)?;
    if v < 100 {
        return Err(EINVAL);
    }
    gpu.job_timeout_ms.store(v, Relaxed);
    Ok(())
}

fn write_race_delay(gpu: &Arc<Gpu>, r: &mut UserSliceReader) -> Result {
    let v = read_number(r)?;
    if v > MAX_RACE_DELAY_US {
        return Err(EINVAL);
    }
    gpu.race_delay_us.store(v, Relaxed);
    Ok(())
}

impl DebugFs {
    pub(super) fn new(gpu: &Arc<Gpu>) -> Result<Self> {
        let Some(root) = crate::debugfs_root() else {
            return Err(ENOENT);
        };
        let name = CString::try_from_fmt(fmt!("virtio{}", gpu.bus_index))?;
        let dir = root.subdir(&name);
        let recovery = KBox::pin_init(
            dir.read_callback_file(c"recovery", gpu.clone(), &|g: &Arc<Gpu>, f| {
                g.write_recovery(f)
            }),
            GFP_KERNEL,
        )?;
        let timeout = KBox::pin_init(
            dir.read_write_callback_file(
                c"job_timeout_ms",
                gpu.clone(),
                &|g: &Arc<Gpu>, f| writeln!(f, "{}", g.job_timeout_ms.load(Relaxed)),
                &write_job_timeout,
            ),
            GFP_KERNEL,
        )?;
        let race = KBox::pin_init(
            dir.read_write_callback_file(
                c"race_delay_us",
                gpu.clone(),
                &|g: &Arc<Gpu>, f| writeln!(f, "{}", g.race_delay_us.load(Relaxed)),
                &write_race_delay,
            ),
            GFP_KERNEL,
        )?;
        Ok(Self {
            _files: [recovery, timeout, race],
            _dir: dir,
        })
    }
}

impl Gpu {
    /// The debugfs `recovery` file.
    fn write_recovery(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let r = &self.recovery;
        let c = self.ctrl.counters();
        let l = |a: &Atomic<u64>| a.load(Relaxed);
        writeln!(f, "resets {}", l(&self.stats.resets))?;
        writeln!(f, "resets_driver {}", l(&r.resets_driver))?;
        writeln!(f, "resets_coalesced {}", l(&r.resets_coalesced))?;
        writeln!(f, "resets_device {}", l(&r.resets_device))?;
        writeln!(f, "resets_superseded {}", l(&r.resets_superseded))?;
        writeln!(f, "virtio_resets {}", l(&r.virtio_resets))?;
        writeln!(f, "invalidation_failures {}", l(&r.invalidation_failures))?;
        writeln!(f, "rebind_failures {}", l(&r.rebind_failures))?;
        writeln!(
            f,
            "faults_on_valid_mappings {}",
            l(&r.faults_on_valid_mappings)
        )?;
        writeln!(f, "faults_bad_table {}", l(&r.faults_bad_table))?;
        writeln!(
            f,
            "invalidations_two_pass {}",
            l(&self.stats.invalidations_two_pass)
        )?;
        writeln!(
            f,
            "invalidations_single_pass {}",
            l(&self.stats.invalidations_single_pass)
        )?;
        writeln!(
            f,
            "invalidation_commands_deferred {}",
            l(&self.stats.commands_deferred)
        )?;
        writeln!(f, "hang_events {}", l(&r.hang_events))?;
        writeln!(f, "hang_events_bogus {}", l(&r.hang_events_bogus))?;
        writeln!(f, "job_timeouts {}", l(&r.job_timeouts))?;
        writeln!(f, "clients_banned {}", l(&r.clients_banned))?;
        writeln!(f, "completions_corrupt {}", l(&r.completions_corrupt))?;
        writeln!(
            f,
            "completions_unknown_kind {}",
            l(&r.completions_unknown_kind)
        )?;
        writeln!(f, "command_done_unknown {}", c.bogus_command_done)?;
        writeln!(f, "job_done_unknown {}", l(&r.job_done_unknown))?;
        writeln!(f, "job_done_duplicate {}", l(&r.job_done_duplicate))?;
        writeln!(f, "chains_unknown {}", c.bogus_chains)?;
        writeln!(f, "resetting_retries {}", c.resetting_retries)?;
        writeln!(f, "events_corrupt {}", l(&r.events_corrupt))?;
        writeln!(f, "events_stale {}", l(&r.events_stale))?;
        writeln!(f, "fault_events_duplicate {}", l(&r.fault_events_duplicate))?;
        writeln!(
            f,
            "fault_replies_not_found {}",
            l(&r.fault_replies_not_found)
        )?;
        writeln!(f, "fault_ring_overflows {}", self.faults.lock().dropped)?;
        writeln!(f, "gpu_faults {}", l(&self.stats.gpu_faults))?;
        writeln!(f, "fault_service_ns {}", l(&self.stats.fault_service_ns))?;
        writeln!(f, "fault_ack_ns {}", l(&self.stats.fault_ack_ns))?;
        writeln!(f, "events_lost_reports {}", l(&r.events_lost_reports))?;
        writeln!(f, "events_lost {}", l(&r.events_lost))?;
        writeln!(f, "job_timeout_ms {}", self.job_timeout_ms.load(Relaxed))?;
        let last = self.last_reset.lock();
        match last.at {
            Some(t) => writeln!(f, "last_reset_ms_ago {}", t.elapsed().as_millis())?,
            None => writeln!(f, "last_reset_ms_ago none")?,
        }
        writeln!(f, "last_reset_reason {}", last.reason)
    }
}
