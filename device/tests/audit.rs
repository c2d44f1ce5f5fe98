// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The audit of spec/svmgpu.md section 6.10.4 through the harness's driver model: a device in
//! audit mode reports the driver mistakes it can see by itself — a flush narrower than the
//! PTEs cleared (`narrow_flush_entries`), PTEs changed and never invalidated
//! (`unflushed_entries`, after the grace period) — and a TLB that never evicts keeps such a
//! mistake observable. A correct driver's sequences leave every audit counter at zero.

#[allow(dead_code)]
mod harness;

use std::thread;
use std::time::{Duration, Instant};

use harness::rig::{Rig, ASID, DATA_VA};
use svmgpu_device::config::DeviceOptions;
use svmgpu_device::inject::InjectSpec;
use svmgpu_device::stats::Extra;
use svmgpu_spec::isa::Insn;
use svmgpu_spec::*;

const PAGE: u64 = PAGE_SIZE_4K;

fn options(grace: Duration) -> DeviceOptions {
    DeviceOptions {
        engines: 1,
        tlb_inval_latency_ns: 0,
        preempt_latency_ns: 0,
        walk_latency_ns: 0,
        insn_cost_ns: 0,
        audit_grace_ns: u64::try_from(grace.as_nanos()).unwrap(),
        ..Default::default()
    }
}

fn store(va: u64, value: u64) -> Insn {
    Insn::Store {
        size64: true,
        va,
        value,
    }
}

/// A job storing `value` into each of `pages` pages of the data area.
fn store_pages(r: &mut Rig, pages: std::ops::Range<u64>, value: u64) {
    let mut insns: Vec<Insn> = pages.map(|i| store(DATA_VA + i * PAGE, value)).collect();
    insns.push(Insn::End);
    r.run_ok(1, &insns);
}

/// Clears the PTEs of data pages `pages` (the driver's unmap).
fn clear(r: &mut Rig, pages: std::ops::Range<u64>) {
    for i in pages {
        r.d.set_pte(&r.pt, DATA_VA + i * PAGE, 0, 0);
    }
}

/// Invalidates data pages `pages` and waits for the completion.
fn flush(r: &mut Rig, pages: std::ops::Range<u64>) {
    let s = r.d.invalidate(
        ASID,
        DATA_VA + pages.start * PAGE,
        (pages.end - pages.start) * PAGE,
    );
    assert_eq!(r.d.wait_done(s).status, 0);
}

/// Polls GET_STATS until `pred` holds (the periodic scan runs every 50 ms or more).
fn wait_stats(r: &mut Rig, what: &str, pred: impl Fn(&StatsResp) -> bool) -> StatsResp {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = r.d.stats();
        if pred(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: {st:?}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_flush_narrower_than_the_clear_is_reported() {
    let mut r = Rig::new(options(Duration::ZERO), 1 << SVMGPU_F_AUDIT);
    r.d.create(1, ASID);
    store_pages(&mut r, 0..4, 1);
    // The driver clears four PTEs, invalidates the first page only, and waits.
    clear(&mut r, 0..4);
    flush(&mut r, 0..1);
    let st = r.d.stats();
    assert_eq!(
        (st.unflushed_entries, st.narrow_flush_entries),
        (3, 3),
        "the three pages left behind"
    );
    // The GPU really still writes through them (the TLB is real); nothing is counted twice.
    store_pages(&mut r, 1..4, 2);
    assert_eq!(r.d.read_u64(r.data + PAGE), 2);
    let st = r.d.stats();
    assert_eq!((st.unflushed_entries, st.narrow_flush_entries), (3, 3));
    assert_eq!(
        st.stale_accesses, 0,
        "the device dropped what it was told to"
    );
}

#[test]
fn a_correct_driver_leaves_the_audit_at_zero() {
    let mut r = Rig::new(options(Duration::ZERO), 1 << SVMGPU_F_AUDIT);
    r.d.create(1, ASID);
    store_pages(&mut r, 0..8, 1);
    // Clear, then invalidate a range covering the clear; the GPU touches the pages in the
    // window before the completion.
    clear(&mut r, 0..4);
    flush(&mut r, 0..4);
    // Write-protect (fork's COW), invalidate the page, then upgrade back without one (an
    // upgrade needs no invalidation).
    r.d.map_4k(
        &r.pt,
        DATA_VA + 5 * PAGE,
        r.data + 5 * PAGE,
        harness::driver::RX,
    );
    flush(&mut r, 5..6);
    store_pages(&mut r, 6..8, 2);
    r.d.map_4k(
        &r.pt,
        DATA_VA + 5 * PAGE,
        r.data + 5 * PAGE,
        harness::driver::RW,
    );
    store_pages(&mut r, 4..8, 3);
    // Remap a page and invalidate the whole ASID.
    let other = r.d.fe.ram.alloc(PAGE, PAGE);
    r.d.map_4k(&r.pt, DATA_VA + 7 * PAGE, other, harness::driver::RW);
    let s = r.d.invalidate_asid(ASID);
    assert_eq!(r.d.wait_done(s).status, 0);
    store_pages(&mut r, 4..8, 4);
    assert_eq!(r.d.read_u64(other), 4);
    // A slow invalidation covering a cleared page is pending while the GPU keeps using the
    // page and another invalidation of the ASID, which does not cover it, completes: the
    // entry is ahead of memory at that acceptance, but covered.
    let spec = InjectSpec::parse(&format!(
        "tlb-inval-delay:va={:#x},delay_us=200000",
        DATA_VA + 6 * PAGE
    ))
    .unwrap();
    r.be.gpu.injector().add(&spec).unwrap();
    store_pages(&mut r, 4..7, 5);
    clear(&mut r, 6..7);
    let slow = r.d.invalidate(ASID, DATA_VA + 6 * PAGE, PAGE);
    store_pages(&mut r, 6..7, 6);
    flush(&mut r, 4..5);
    store_pages(&mut r, 6..7, 7);
    assert_eq!(
        r.d.read_u64(r.data + 6 * PAGE),
        7,
        "the slow one is pending"
    );
    assert_eq!(r.d.wait_done(slow).status, 0);
    // Let the periodic scan look too.
    thread::sleep(Duration::from_millis(120));
    let st = r.d.stats();
    assert!(st.audit_checks > 0);
    assert_eq!(
        (
            st.stale_accesses,
            st.unflushed_entries,
            st.narrow_flush_entries
        ),
        (0, 0, 0)
    );
}

#[test]
fn ptes_cleared_and_never_invalidated_are_reported_after_the_grace_period() {
    let grace = Duration::from_millis(100);
    let mut r = Rig::new(options(grace), 1 << SVMGPU_F_AUDIT);
    r.d.create(1, ASID);
    store_pages(&mut r, 0..2, 1);
    let t0 = Instant::now();
    clear(&mut r, 0..1);
    // Not within the grace period (the clear happened after t0; stats come before).
    store_pages(&mut r, 0..1, 2);
    let st = r.d.stats();
    if t0.elapsed() < grace {
        assert_eq!(st.unflushed_entries, 0, "reported within the grace period");
    }
    // The scan finds it without another access.
    let st = wait_stats(&mut r, "unflushed entry never reported", |s| {
        s.unflushed_entries == 1
    });
    assert!(t0.elapsed() >= grace);
    assert_eq!(st.narrow_flush_entries, 0, "no invalidation at all");
    // Invalidating it late changes nothing already counted and leaves nothing to count.
    flush(&mut r, 0..1);
    store_pages(&mut r, 1..2, 3);
    thread::sleep(2 * grace);
    let st = r.d.stats();
    assert_eq!((st.unflushed_entries, st.narrow_flush_entries), (1, 0));
}

/// A forgotten invalidation of page 0, then jobs that touch more pages than the one-set TLB
/// holds; returns the audit counters once the scan had time to look.
fn forgotten_invalidation(no_evict: bool) -> (StatsResp, u64) {
    let opts = DeviceOptions {
        tlb_entries: 4,
        tlb_ways: 4,
        tlb_no_evict: no_evict,
        ..options(Duration::ZERO)
    };
    let mut r = Rig::new(opts, 1 << SVMGPU_F_AUDIT);
    r.d.create(1, ASID);
    store_pages(&mut r, 0..1, 1);
    clear(&mut r, 0..1);
    for round in 0..3 {
        store_pages(&mut r, 1..9, round);
    }
    thread::sleep(Duration::from_millis(120));
    let st = r.d.stats();
    let uncached = r.be.gpu.stats().get_extra(Extra::TlbFillsUncached);
    (st, uncached)
}

#[test]
fn a_tlb_that_never_evicts_keeps_a_forgotten_invalidation_observable() {
    // LRU: the stale entry is evicted by other work and nothing is left to see.
    let (st, uncached) = forgotten_invalidation(false);
    assert_eq!((st.unflushed_entries, uncached), (0, 0));
    // Never evicting: the entry stays, other translations go uncached, the scan finds it.
    let (st, uncached) = forgotten_invalidation(true);
    assert_eq!(st.unflushed_entries, 1);
    assert!(uncached > 0);
}
