// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The timing model (spec/svmgpu.md section 6.17). Every latency is a device option; the
//! defaults are chosen to be comparable to real GPUs (see device/README.md, "Timing model",
//! for where each comes from). Engines are paced: an engine never runs ahead of the modelled
//! cost of what it executed (instructions and page walks), so that a guest measuring, say,
//! two-pass against single-pass invalidation sees GPU-like proportions.

use std::time::{Duration, Instant};

/// Latencies of one device, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// TLB invalidation: acceptance to completion.
    pub tlb_inval_ns: u64,
    /// Preemption: acceptance to the context being stopped.
    pub preempt_ns: u64,
    /// Cost of one page walk (a TLB miss).
    pub walk_ns: u64,
    /// Cost of one instruction.
    pub insn_ns: u64,
    /// Time-slice length.
    pub timeslice_ns: u64,
    /// Engine-hang threshold: no progress for this long posts ENGINE_HANG.
    pub hang_ns: u64,
    /// Job timeout (0: none): a job that is not long-running fails after this much time on
    /// an engine.
    pub job_timeout_ns: u64,
}

/// How far the modelled time may run ahead of real time before the engine sleeps; below
/// this, sleeping costs more than it models.
const PACE_SLACK: Duration = Duration::from_micros(50);

/// Holds an engine back to its modelled speed during one time slice.
#[derive(Debug)]
pub struct Pacer {
    start: Instant,
    modelled: Duration,
}

impl Pacer {
    /// Starts pacing now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            modelled: Duration::ZERO,
        }
    }

    /// Adds `ns` of modelled time, and sleeps if the model is ahead of real time by more
    /// than the slack; returns the time slept.
    pub fn charge(&mut self, ns: u64) -> Duration {
        if ns == 0 {
            return Duration::ZERO;
        }
        self.modelled += Duration::from_nanos(ns);
        let real = self.start.elapsed();
        match self.modelled.checked_sub(real) {
            Some(ahead) if ahead > PACE_SLACK => {
                std::thread::sleep(ahead);
                ahead
            }
            _ => Duration::ZERO,
        }
    }
}

impl Default for Pacer {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_holds_back_to_the_model() {
        let mut p = Pacer::new();
        let t = Instant::now();
        for _ in 0..100 {
            p.charge(20_000); // 100 × 20 µs = 2 ms modelled
        }
        assert!(t.elapsed() >= Duration::from_micros(1900));
        let t = Instant::now();
        let mut q = Pacer::new();
        q.charge(0);
        q.charge(10);
        assert!(t.elapsed() < Duration::from_millis(50));
    }
}
