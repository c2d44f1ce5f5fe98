// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device timer: completes TLB invalidations and fires preemptions when their latency
//! has elapsed (spec/svmgpu.md sections 6.10 and 6.11), ends device-initiated resets and
//! releases completions held back by `completion-reorder` (fault injection), and in audit
//! mode scans every TLB against memory (spec section 6.10.4). The rules live in
//! [`Device`]; this is the thread that runs them on time.

use std::time::{Duration, Instant};

use crate::device::Device;

/// Period of the audit's TLB scan: half the grace period, within these bounds.
const SCAN_MIN: Duration = Duration::from_millis(50);
const SCAN_MAX: Duration = Duration::from_secs(1);

/// When the audit scans next (`None`: audit off).
fn next_scan(dev: &Device, after: Instant) -> Option<Instant> {
    dev.audit()
        .then(|| after + (dev.audit_grace() / 2).clamp(SCAN_MIN, SCAN_MAX))
}

/// The timer thread's body: runs until the device shuts down.
pub(crate) fn run(dev: &Device) {
    let mut st = dev.lock();
    let mut scan_at = next_scan(dev, Instant::now());
    loop {
        if dev.shutting_down() {
            return;
        }
        let now = Instant::now();
        match scan_at {
            Some(at) if at <= now => {
                drop(st);
                dev.audit_tlbs(|m, t| m.audit_scan(t));
                scan_at = next_scan(dev, Instant::now());
                st = dev.lock();
                continue;
            }
            // Audit mode started (features negotiated) or stopped since the last look.
            None if dev.audit() => scan_at = next_scan(dev, now),
            Some(_) if !dev.audit() => scan_at = None,
            _ => {}
        }
        dev.fire_preemptions(&mut st, now);
        // Fault injection: a device-initiated reset that is over, a held-back completion.
        let ended = dev.end_device_reset(&mut st, now);
        if dev.outbox().release_held_back(now) || ended {
            drop(st);
            dev.flush();
            st = dev.lock();
            continue;
        }
        let (due, generation) = dev.take_due_invalidations(&mut st, now);
        if !due.is_empty() {
            drop(st);
            dev.complete_invalidations(&due, generation);
            st = dev.lock();
            continue;
        }
        drop(st);
        dev.flush();
        st = dev.lock();
        if dev.shutting_down() {
            return;
        }
        // Work may have arrived while the lock was released: look at the deadlines now.
        let next = dev.next_deadline(&st).into_iter().chain(scan_at).min();
        st = dev.wait_timer(st, next);
    }
}
