//! The devices' audit around every test: the runner snapshots each device's audit
//! counters (GET_STATS through DEVICE_QUERY) before and after each test, and reports one
//! more KTAP result at the end, `device_audit_clean`, that fails naming every test during
//! which a device counted a stale access, an unflushed TLB entry or an entry a narrow
//! flush left behind (spec 6.10.4), or when a device ran instructions its audit did not
//! check (the audit is off).

use std::collections::BTreeMap;
use svmgpu::Device;

/// Audit counters of one device: (stale, unflushed, narrow flush, checks, instructions).
type Counters = (u64, u64, u64, u64, u64);

/// Every bound device's counters, by virtio bus index. Opens and closes the render nodes
/// (a test may unload the module next).
pub fn snapshot() -> BTreeMap<u32, Counters> {
    let mut out = BTreeMap::new();
    if let Ok(devs) = Device::enumerate() {
        for d in devs {
            if let Ok(q) = d.query(true) {
                out.insert(
                    q.bus_index,
                    (
                        q.stale_accesses(),
                        q.unflushed_entries(),
                        q.narrow_flush_entries(),
                        q.audit_checks(),
                        q.stats[crate::coherence::STAT_INSTRUCTIONS],
                    ),
                );
            }
        }
    }
    out
}

/// What grew between two snapshots: "" if no violation did.
pub fn violations(before: &BTreeMap<u32, Counters>, after: &BTreeMap<u32, Counters>) -> String {
    let mut out = Vec::new();
    for (bus, a) in after {
        let b = before.get(bus).copied().unwrap_or((0, 0, 0, 0, 0));
        let grew = |x: u64, y: u64| y.saturating_sub(x);
        let (s, u, n) = (grew(b.0, a.0), grew(b.1, a.1), grew(b.2, a.2));
        if s + u + n > 0 {
            out.push(format!(
                "virtio{bus}: {s} stale accesses, {u} unflushed TLB entries, {n} left behind by a narrow flush"
            ));
        }
    }
    out.join("; ")
}

/// Whether some device ran instructions that its audit did not check (the audit is off).
pub fn audit_off(s: &BTreeMap<u32, Counters>) -> bool {
    s.values().any(|c| c.4 > 0 && c.3 == 0)
}
