// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Device options (from the command line) and the config space they produce
//! (spec/svmgpu.md section 4).

use svmgpu_spec::{
    Config, CONFIG_MAGIC, CONFIG_SIZE, PAGE_SIZE_2M, PAGE_SIZE_4K, SPEC_VERSION, VA_BITS,
};
use thiserror::Error;

use crate::timing::Timing;

/// Upper bounds that keep a mistyped option from making the device allocate without bound.
pub mod limits {
    /// Most engines.
    pub const MAX_ENGINES: u32 = 64;
    /// Most ASIDs.
    pub const MAX_ASIDS: u32 = 1 << 16;
    /// Most contexts.
    pub const MAX_CONTEXTS: u32 = 1 << 16;
    /// Most TLB entries per engine.
    pub const MAX_TLB_ENTRIES: u32 = 1 << 20;
    /// Most outstanding faults.
    pub const MAX_FAULTS: u32 = 1 << 16;
}

/// Errors in device options.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OptionsError {
    /// An option that must be positive is zero.
    #[error("--{0} must be at least 1")]
    Zero(&'static str),
    /// An option is above its bound.
    #[error("--{name} is {value}, the maximum is {max}")]
    TooLarge {
        /// Option name.
        name: &'static str,
        /// Given value.
        value: u32,
        /// Bound.
        max: u32,
    },
    /// The TLB geometry is not a whole number of sets.
    #[error("--tlb-entries ({entries}) must be a multiple of --tlb-ways ({ways})")]
    TlbGeometry {
        /// `--tlb-entries`.
        entries: u32,
        /// `--tlb-ways`.
        ways: u32,
    },
}

/// Options of one emulated GPU; they feed the config space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceOptions {
    /// Engines.
    pub engines: u32,
    /// ASIDs.
    pub asids: u32,
    /// Contexts.
    pub max_contexts: u32,
    /// TLB entries per engine.
    pub tlb_entries: u32,
    /// TLB ways.
    pub tlb_ways: u32,
    /// Outstanding page faults.
    pub max_faults: u32,
    /// Nominal TLB invalidation latency.
    pub tlb_inval_latency_ns: u32,
    /// Nominal preemption latency.
    pub preempt_latency_ns: u32,
    /// Modelled cost of one page walk (TLB miss).
    pub walk_latency_ns: u32,
    /// Modelled cost of one instruction.
    pub insn_cost_ns: u32,
    /// Time-slice length.
    pub timeslice_us: u32,
    /// An engine that makes no progress for this long posts ENGINE_HANG (spec 6.5.2, 6.17).
    pub hang_threshold_us: u32,
    /// Audit every access even if the driver did not accept `SVMGPU_F_AUDIT`.
    pub audit: bool,
    /// Audit: how long a TLB entry may stay ahead of its page table, with no invalidation
    /// covering it accepted, before it counts as unflushed (spec 6.10.4).
    pub audit_grace_ns: u64,
    /// TLBs never evict: a translation whose set is full is used uncached (spec 6.9.3).
    pub tlb_no_evict: bool,
    /// A job of a context without `CTX_F_LONG_RUNNING` that has been on an engine this long
    /// fails with `JOB_TIMEOUT` (spec 6.17); 0: never.
    pub job_timeout_ms: u32,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            engines: 2,
            asids: 64,
            max_contexts: 256,
            tlb_entries: 64,
            tlb_ways: 4,
            max_faults: 64,
            tlb_inval_latency_ns: defaults::TLB_INVAL_LATENCY_NS,
            preempt_latency_ns: defaults::PREEMPT_LATENCY_NS,
            walk_latency_ns: defaults::WALK_LATENCY_NS,
            insn_cost_ns: defaults::INSN_COST_NS,
            timeslice_us: defaults::TIMESLICE_US,
            hang_threshold_us: defaults::HANG_THRESHOLD_US,
            audit: false,
            audit_grace_ns: defaults::AUDIT_GRACE_NS,
            tlb_no_evict: false,
            job_timeout_ms: defaults::JOB_TIMEOUT_MS,
        }
    }
}

/// Default latencies (device/README.md, "Timing model", says where each comes from).
pub mod defaults {
    /// TLB invalidation, acceptance to completion.
    pub const TLB_INVAL_LATENCY_NS: u32 = 10_000;
    /// Preemption, acceptance to the context stopped.
    pub const PREEMPT_LATENCY_NS: u32 = 50_000;
    /// One page walk.
    pub const WALK_LATENCY_NS: u32 = 500;
    /// One instruction.
    pub const INSN_COST_NS: u32 = 20;
    /// Time slice.
    pub const TIMESLICE_US: u32 = 1_000;
    /// Engine-hang threshold.
    pub const HANG_THRESHOLD_US: u32 = 100_000;
    /// Audit grace period: 2 s, far above the microseconds a correct driver takes from a PTE
    /// write to the acceptance of the invalidation covering it, even on a loaded TCG host
    /// (device/README.md, "Audit").
    pub const AUDIT_GRACE_NS: u64 = 2_000_000_000;
    /// Job timeout: 10 s of engine time, twice the 5 s after which svmgpu.ko gives up on a
    /// job itself, so that it only ends jobs no driver is watching.
    pub const JOB_TIMEOUT_MS: u32 = 10_000;
}

impl DeviceOptions {
    /// Checks ranges and the TLB geometry.
    pub fn validate(&self) -> Result<(), OptionsError> {
        let bounded = [
            ("engines", self.engines, limits::MAX_ENGINES),
            ("asids", self.asids, limits::MAX_ASIDS),
            ("max-contexts", self.max_contexts, limits::MAX_CONTEXTS),
            ("tlb-entries", self.tlb_entries, limits::MAX_TLB_ENTRIES),
            ("tlb-ways", self.tlb_ways, limits::MAX_TLB_ENTRIES),
            ("max-faults", self.max_faults, limits::MAX_FAULTS),
        ];
        for (name, value, max) in bounded {
            if value == 0 {
                return Err(OptionsError::Zero(name));
            }
            if value > max {
                return Err(OptionsError::TooLarge { name, value, max });
            }
        }
        if self.timeslice_us == 0 {
            return Err(OptionsError::Zero("timeslice-us"));
        }
        if self.tlb_entries % self.tlb_ways != 0 {
            return Err(OptionsError::TlbGeometry {
                entries: self.tlb_entries,
                ways: self.tlb_ways,
            });
        }
        Ok(())
    }

    /// The config space of device `device_index` with these options.
    pub fn config_space(&self, device_index: u32) -> Config {
        Config {
            magic: CONFIG_MAGIC,
            version: SPEC_VERSION,
            device_index,
            num_engines: self.engines,
            num_asids: self.asids,
            max_contexts: self.max_contexts,
            tlb_entries: self.tlb_entries,
            tlb_ways: self.tlb_ways,
            page_size_mask: PAGE_SIZE_4K | PAGE_SIZE_2M,
            va_bits: VA_BITS,
            max_outstanding_faults: self.max_faults,
            tlb_inval_latency_ns: self.tlb_inval_latency_ns,
            preempt_latency_ns: self.preempt_latency_ns,
            reserved0: 0,
            reserved1: 0,
        }
    }
}

impl DeviceOptions {
    /// The timing model of these options.
    pub fn timing(&self) -> Timing {
        Timing {
            tlb_inval_ns: u64::from(self.tlb_inval_latency_ns),
            preempt_ns: u64::from(self.preempt_latency_ns),
            walk_ns: u64::from(self.walk_latency_ns),
            insn_ns: u64::from(self.insn_cost_ns),
            timeslice_ns: u64::from(self.timeslice_us) * 1000,
            hang_ns: u64::from(self.hang_threshold_us) * 1000,
            job_timeout_ns: u64::from(self.job_timeout_ms) * 1_000_000,
        }
    }

    /// The config values the devices will present, as `key=value` lines (the format of the
    /// guest tests' `/etc/svmgpu-expect`; `device_index` differs per device and is left out).
    pub fn expected_config(&self) -> String {
        let c = self.config_space(0);
        format!(
            "magic={:#x}\nversion={:#x}\nengines={}\nasids={}\nmax_contexts={}\n\
             tlb_entries={}\ntlb_ways={}\npage_size_mask={:#x}\nva_bits={}\nmax_faults={}\n\
             tlb_inval_latency_ns={}\npreempt_latency_ns={}\n",
            c.magic,
            c.version,
            c.num_engines,
            c.num_asids,
            c.max_contexts,
            c.tlb_entries,
            c.tlb_ways,
            c.page_size_mask,
            c.va_bits,
            c.max_outstanding_faults,
            c.tlb_inval_latency_ns,
            c.preempt_latency_ns
        )
    }
}

/// Answers a vhost-user GET_CONFIG: exactly `size` bytes starting at `offset`, zero beyond
/// the config space (vhost-user treats any other length as a failure).
pub fn read_config(space: &[u8; CONFIG_SIZE], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let start = (offset as usize).min(CONFIG_SIZE);
    let end = (offset as usize)
        .saturating_add(size as usize)
        .min(CONFIG_SIZE);
    if start < end {
        out[..end - start].copy_from_slice(&space[start..end]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let o = DeviceOptions::default();
        assert_eq!(o.validate(), Ok(()));
        assert_eq!(o.engines, 2);
        assert_eq!(o.asids, 64);
        assert_eq!(o.max_contexts, 256);
        assert_eq!(o.tlb_entries, 64);
        assert_eq!(o.tlb_ways, 4);
        assert_eq!(o.max_faults, 64);
        assert_eq!(o.tlb_inval_latency_ns, 10_000);
        assert_eq!(o.preempt_latency_ns, 50_000);
    }

    #[test]
    fn validation() {
        let bad = DeviceOptions {
            tlb_entries: 10,
            ..Default::default()
        };
        assert_eq!(
            bad.validate(),
            Err(OptionsError::TlbGeometry {
                entries: 10,
                ways: 4
            })
        );
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "--tlb-entries (10) must be a multiple of --tlb-ways (4)"
        );
        let zero = DeviceOptions {
            tlb_ways: 0,
            ..Default::default()
        };
        assert_eq!(zero.validate(), Err(OptionsError::Zero("tlb-ways")));
        let zero = DeviceOptions {
            engines: 0,
            ..Default::default()
        };
        assert_eq!(
            zero.validate().unwrap_err().to_string(),
            "--engines must be at least 1"
        );
        let big = DeviceOptions {
            engines: 1000,
            ..Default::default()
        };
        assert!(matches!(
            big.validate(),
            Err(OptionsError::TooLarge {
                name: "engines",
                ..
            })
        ));
        // Latencies may be zero (tests scale them down).
        let fast = DeviceOptions {
            tlb_inval_latency_ns: 0,
            preempt_latency_ns: 0,
            ..Default::default()
        };
        assert_eq!(fast.validate(), Ok(()));
    }

    #[test]
    fn config_space_bytes() {
        let o = DeviceOptions {
            engines: 3,
            asids: 16,
            max_contexts: 32,
            tlb_entries: 128,
            tlb_ways: 8,
            max_faults: 7,
            tlb_inval_latency_ns: 123,
            preempt_latency_ns: 456,
            ..Default::default()
        };
        let b = o.config_space(5).to_bytes();
        let u32_at = |off: usize| u32::from_le_bytes(b[off..off + 4].try_into().unwrap());
        assert_eq!(&b[0..4], b"SVMG");
        assert_eq!(u32_at(4), 0x0000_0003);
        assert_eq!(u32_at(8), 5);
        assert_eq!(u32_at(12), 3);
        assert_eq!(u32_at(16), 16);
        assert_eq!(u32_at(20), 32);
        assert_eq!(u32_at(24), 128);
        assert_eq!(u32_at(28), 8);
        assert_eq!(
            u64::from_le_bytes(b[32..40].try_into().unwrap()),
            (1 << 12) | (1 << 21)
        );
        assert_eq!(u32_at(40), 48);
        assert_eq!(u32_at(44), 7);
        assert_eq!(u32_at(48), 123);
        assert_eq!(u32_at(52), 456);
        assert_eq!(&b[56..64], &[0; 8]);
    }

    #[test]
    fn read_config_is_exact_size() {
        let space = DeviceOptions::default().config_space(1).to_bytes();
        assert_eq!(read_config(&space, 0, 64), space.to_vec());
        assert_eq!(read_config(&space, 8, 4), vec![1, 0, 0, 0]);
        assert_eq!(read_config(&space, 60, 8), vec![0; 8]);
        assert_eq!(read_config(&space, 200, 3), vec![0; 3]);
        assert_eq!(read_config(&space, u32::MAX, 4), vec![0; 4]);
        assert_eq!(read_config(&space, 0, 100).len(), 100);
        assert_eq!(&read_config(&space, 0, 100)[..64], &space[..]);
    }
}
