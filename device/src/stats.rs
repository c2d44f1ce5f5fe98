// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Per-device statistics: lock-free counters in the order of the spec's GET_STATS body
//! (spec/svmgpu.md section 6.18), readable as the wire struct and, through serde, as JSON
//! (counters in wire order, then the device-only ones, then per engine).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use svmgpu_spec::StatsResp;

/// Defines the counter enum, its names and the mapping onto [`StatsResp`] in one place, so
/// that the three can never disagree.
macro_rules! counters {
    ($($var:ident => $field:ident),* $(,)?) => {
        /// One statistics counter.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Counter {
            $(
                #[doc = concat!("`", stringify!($field), "`")]
                $var,
            )*
        }

        impl Counter {
            /// Every counter, in wire order.
            pub const ALL: &'static [Counter] = &[$(Counter::$var),*];

            /// The counter's name, as in the spec, GET_STATS and the JSON dump.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$var => stringify!($field),)*
                }
            }
        }

        impl Stats {
            /// A snapshot as the GET_STATS wire struct.
            pub fn snapshot(&self) -> StatsResp {
                StatsResp {
                    $($field: self.get(Counter::$var),)*
                }
            }
        }
    };
}

counters! {
    CommandsCompleted => commands_completed,
    CommandsFailed => commands_failed,
    MalformedChains => malformed_chains,
    EventsPosted => events_posted,
    EventsLost => events_lost,
    CompletionsPosted => completions_posted,
    PageFaults => page_faults,
    FaultsResumed => faults_resumed,
    FaultsCanceled => faults_canceled,
    TlbHits => tlb_hits,
    TlbMisses => tlb_misses,
    TlbInvalidations => tlb_invalidations,
    TlbEntriesInvalidated => tlb_entries_invalidated,
    PageWalks => page_walks,
    PteErrors => pte_errors,
    Preemptions => preemptions,
    JobsCompleted => jobs_completed,
    JobsFailed => jobs_failed,
    Instructions => instructions,
    EngineHangs => engine_hangs,
    Resets => resets,
    InjectedFaults => injected_faults,
    StaleAccesses => stale_accesses,
    AuditChecks => audit_checks,
    UnflushedEntries => unflushed_entries,
    NarrowFlushEntries => narrow_flush_entries,
    FaultsRetried => faults_retried,
    FaultRetryNs => fault_retry_ns,
    FaultDriverNs => fault_driver_ns,
}

/// Number of counters (29 in spec v0.3).
pub const NUM_COUNTERS: usize = StatsResp::SIZE / 8;

/// Device-side counters that GET_STATS does not carry (growing its body would break drivers
/// that size the response buffer exactly); they appear in the JSON dump after the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Extra {
    /// Audit mode: TLB hits whose entry disagreed with the page table in memory (expected
    /// between a PTE change and the invalidation that covers it; not an error).
    AuditMismatches,
    /// Faulting accesses attached to an outstanding fault on the same page (coalescing).
    FaultsCoalesced,
    /// Translations used without being cached: their TLB set was full and never evicts
    /// (`--tlb-no-evict`).
    TlbFillsUncached,
    /// Of `fault_retry_ns`, the part from the raising of each fault to the delivery of its
    /// PAGE_FAULT event (the device's event posting).
    FaultDeliverNs,
    /// Of `fault_retry_ns`, the part from the acceptance of each FAULT_REPLY to the retry
    /// (the device waking an engine and taking the context up again).
    FaultResumeNs,
    /// Of the invalidations counted in `tlb_invalidations`, the total time from each one's
    /// acceptance to its COMMAND_DONE handed to the outbox: the device's part of an
    /// invalidation (its latency, the timer's lateness, the MMU locks, the TLB scan).
    TlbInvalDeviceNs,
    /// Of `tlb_inval_device_ns`, the part after each invalidation's nominal deadline
    /// (acceptance + latency + injected delay): how late the device completes them.
    TlbInvalLateNs,
}

impl Extra {
    /// Every extra counter, in JSON order.
    pub const ALL: &'static [Extra] = &[
        Extra::AuditMismatches,
        Extra::FaultsCoalesced,
        Extra::TlbFillsUncached,
        Extra::FaultDeliverNs,
        Extra::FaultResumeNs,
        Extra::TlbInvalDeviceNs,
        Extra::TlbInvalLateNs,
    ];

    /// Its JSON name.
    pub const fn name(self) -> &'static str {
        match self {
            Extra::AuditMismatches => "audit_mismatches",
            Extra::FaultsCoalesced => "faults_coalesced",
            Extra::TlbFillsUncached => "tlb_fills_uncached",
            Extra::FaultDeliverNs => "fault_deliver_ns",
            Extra::FaultResumeNs => "fault_resume_ns",
            Extra::TlbInvalDeviceNs => "tlb_inval_device_ns",
            Extra::TlbInvalLateNs => "tlb_inval_late_ns",
        }
    }
}

/// One engine's counters (JSON only): how busy it is and how well its TLB does.
#[derive(Debug, Default, Serialize)]
pub struct EngineStats {
    /// Time slices run.
    pub slices: AtomicU64,
    /// Time spent running contexts, in nanoseconds.
    pub busy_ns: AtomicU64,
    /// Instructions executed.
    pub instructions: AtomicU64,
    /// Accesses translated by a TLB hit.
    pub tlb_hits: AtomicU64,
    /// Accesses that needed a walk.
    pub tlb_misses: AtomicU64,
}

/// The statistics of one device. Counters are monotonic from backend start.
#[derive(Debug, Default)]
pub struct Stats {
    counters: [AtomicU64; NUM_COUNTERS],
    extra: [AtomicU64; Extra::ALL.len()],
    engines: Vec<EngineStats>,
}

/// `{"commands_completed":N,...,"audit_mismatches":N,...,"engines":[{...}]}`.
impl Serialize for Stats {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for &c in Counter::ALL {
            m.serialize_entry(c.name(), &self.get(c))?;
        }
        for &c in Extra::ALL {
            m.serialize_entry(c.name(), &self.get_extra(c))?;
        }
        #[derive(Serialize)]
        struct Engine<'a> {
            engine: usize,
            #[serde(flatten)]
            counters: &'a EngineStats,
        }
        let engines: Vec<Engine<'_>> = self
            .engines
            .iter()
            .enumerate()
            .map(|(engine, counters)| Engine { engine, counters })
            .collect();
        m.serialize_entry("engines", &engines)?;
        m.end()
    }
}

impl Stats {
    /// All counters zero, no per-engine counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// All counters zero, with per-engine counters for `engines` engines.
    pub fn with_engines(engines: usize) -> Self {
        Self {
            engines: (0..engines).map(|_| EngineStats::default()).collect(),
            ..Self::default()
        }
    }

    /// The counters of engine `e`.
    pub fn engine(&self, e: usize) -> Option<&EngineStats> {
        self.engines.get(e)
    }

    /// Adds one; returns the value before.
    pub fn inc(&self, c: Counter) -> u64 {
        self.add(c, 1)
    }

    /// Adds `n`; returns the value before.
    pub fn add(&self, c: Counter, n: u64) -> u64 {
        if n == 0 {
            return self.get(c);
        }
        self.counters[c as usize].fetch_add(n, Ordering::Relaxed)
    }

    /// Current value.
    pub fn get(&self, c: Counter) -> u64 {
        self.counters[c as usize].load(Ordering::Relaxed)
    }

    /// Adds one to a device-only counter.
    pub fn inc_extra(&self, c: Extra) {
        self.add_extra(c, 1);
    }

    /// Adds `n` to a device-only counter.
    pub fn add_extra(&self, c: Extra, n: u64) {
        if n != 0 {
            self.extra[c as usize].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Current value of a device-only counter.
    pub fn get_extra(&self, c: Extra) -> u64 {
        self.extra[c as usize].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_match_wire_order() {
        assert_eq!(NUM_COUNTERS, 29);
        assert_eq!(Counter::ALL.len(), NUM_COUNTERS);
        let s = Stats::new();
        for (i, &c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c as usize, i);
            s.add(c, i as u64 + 1);
        }
        let bytes = s.snapshot().to_bytes();
        for i in 0..NUM_COUNTERS {
            let v = u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
            assert_eq!(v, i as u64 + 1, "counter {}", Counter::ALL[i].name());
        }
        assert_eq!(
            StatsResp::OFFSET_AUDIT_CHECKS,
            Counter::AuditChecks as usize * 8
        );
        assert_eq!(StatsResp::OFFSET_RESETS, Counter::Resets as usize * 8);
        assert_eq!(
            StatsResp::OFFSET_NARROW_FLUSH_ENTRIES,
            Counter::NarrowFlushEntries as usize * 8
        );
        assert_eq!(
            StatsResp::OFFSET_FAULT_DRIVER_NS,
            Counter::FaultDriverNs as usize * 8
        );
    }

    #[test]
    fn inc_returns_previous() {
        let s = Stats::new();
        assert_eq!(s.inc(Counter::CommandsCompleted), 0);
        assert_eq!(s.inc(Counter::CommandsCompleted), 1);
        assert_eq!(s.get(Counter::CommandsCompleted), 2);
    }

    #[test]
    fn json() {
        let s = Stats::new();
        s.inc(Counter::MalformedChains);
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.starts_with("{\"commands_completed\":0,"), "{j}");
        assert!(j.contains("\"malformed_chains\":1"));
        assert!(j.contains("\"audit_checks\":0,\"unflushed_entries\":0,"));
        s.inc_extra(Extra::FaultsCoalesced);
        let j = serde_json::to_string(&s).unwrap();
        assert!(
            j.ends_with(
                "\"audit_mismatches\":0,\"faults_coalesced\":1,\"tlb_fills_uncached\":0,\
                 \"fault_deliver_ns\":0,\"fault_resume_ns\":0,\"tlb_inval_device_ns\":0,\
                 \"tlb_inval_late_ns\":0,\"engines\":[]}"
            ),
            "{j}"
        );
        let e = Stats::with_engines(2);
        e.engine(1).unwrap().slices.fetch_add(3, Ordering::Relaxed);
        assert!(e.engine(2).is_none());
        let j = serde_json::to_string(&e).unwrap();
        assert!(
            j.contains(
                "\"engines\":[{\"engine\":0,\"slices\":0,\"busy_ns\":0,\"instructions\":0,\
                 \"tlb_hits\":0,\"tlb_misses\":0},{\"engine\":1,\"slices\":3,\"busy_ns\":0,\
                 \"instructions\":0,\"tlb_hits\":0,\"tlb_misses\":0}]"
            ),
            "{j}"
        );
    }
}
