// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device timer: completes TLB invalidations and fires preemptions when their latency
//! has elapsed (spec/svmgpu.md sections 11 and 12).
//!
//! An invalidation completes by dropping the covered entries from every engine's TLB — each
//! MMU lock waits for the instruction in flight on that engine, so every access that used an
//! old translation has finished — then recording it for the audit and posting COMMAND_DONE.
//!
//! It also runs the deadlines of fault injection: the end of a device-initiated reset, and
//! the release of a completion held back by `completion-reorder`; and, in audit mode, the
//! periodic scan of every TLB against memory (spec section 11.4).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::gpu::State;

use svmgpu_spec::{Opcode, Status, CTX_NONE};

use crate::gpu::{command_done, PendingInval, Shared};
use crate::stats::Counter;

/// Period of the audit's TLB scan: half the grace period, within these bounds.
const SCAN_MIN: Duration = Duration::from_millis(50);
const SCAN_MAX: Duration = Duration::from_secs(1);

/// When the audit scans next (`None`: audit off).
fn next_scan(sh: &Shared, after: Instant) -> Option<Instant> {
    sh.audit()
        .then(|| after + (sh.audit_grace() / 2).clamp(SCAN_MIN, SCAN_MAX))
}

/// The timer thread's body: runs until the device shuts down.
pub(crate) fn run(sh: &Shared) {
    let mut st = sh.lock();
    let mut scan_at = next_scan(sh, Instant::now());
    loop {
        if sh.shutdown.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        match scan_at {
            Some(at) if at <= now => {
                drop(st);
                sh.audit_tlbs(|m, t| m.audit_scan(t));
                scan_at = next_scan(sh, Instant::now());
                st = sh.lock();
                continue;
            }
            // Audit mode started (features negotiated) or stopped since the last look.
            None if sh.audit() => scan_at = next_scan(sh, now),
            Some(_) if !sh.audit() => scan_at = None,
            _ => {}
        }
        // Preemptions whose latency elapsed.
        let mut fired = Vec::new();
        st.preempt_timers.retain(|&(d, ctx, uid)| {
            if d <= now {
                fired.push((ctx, uid));
                false
            } else {
                true
            }
        });
        for (ctx, uid) in fired {
            if let Some(c) = st.contexts.get_mut(&ctx).filter(|c| c.uid == uid) {
                for op in c
                    .ops
                    .iter_mut()
                    .filter(|o| o.preempt && !o.dropped && o.deadline <= now)
                {
                    op.fired = true;
                }
                sh.advance_ops(&mut st, ctx);
            }
        }
        // Fault injection: a device-initiated reset that is over, a held-back completion.
        let ended = sh.end_device_reset(&mut st, now);
        if sh.outbox.release_held_back(now) || ended {
            drop(st);
            sh.flush();
            st = sh.lock();
            continue;
        }
        // Invalidations whose latency elapsed.
        let mut due: Vec<PendingInval> = Vec::new();
        st.invals.retain(|i| {
            if i.deadline <= now {
                due.push(*i);
                false
            } else {
                true
            }
        });
        if !due.is_empty() {
            let generation = st.generation;
            drop(st);
            complete_invalidations(sh, &due, generation);
            sh.flush();
            st = sh.lock();
            continue;
        }
        let next = next_deadline(sh, &st).into_iter().chain(scan_at).min();
        drop(st);
        sh.flush();
        st = sh.lock();
        if sh.shutdown.load(Ordering::Acquire) {
            return;
        }
        // Re-check: work may have arrived while the lock was released.
        let next_now = next_deadline(sh, &st).into_iter().chain(scan_at).min();
        st = match next_now.or(next) {
            Some(d) => {
                let wait = d.saturating_duration_since(Instant::now());
                sh.timer
                    .wait_timeout(st, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0)
            }
            None => sh.timer.wait(st).unwrap_or_else(|p| p.into_inner()),
        };
    }
}

/// The earliest deadline the timer has to act on.
fn next_deadline(sh: &Shared, st: &State) -> Option<Instant> {
    st.invals
        .iter()
        .map(|i| i.deadline)
        .chain(st.preempt_timers.iter().map(|p| p.0))
        .chain(st.resetting_until)
        .chain(sh.outbox.held_back_deadline())
        .min()
}

fn complete_invalidations(sh: &Shared, due: &[PendingInval], generation: u64) {
    for inv in due {
        if inv.status != Status::Ok {
            // Injected failure (`tlb-inval-error`): nothing is dropped and the audit does not
            // count it as completed; the completion guarantees nothing (spec 11.2).
            let st = sh.lock();
            if st.generation == generation {
                let done = command_done(inv.seqno, CTX_NONE, Opcode::TlbInvalidate, inv.status, 0);
                sh.complete(&st, done);
            }
            continue;
        }
        let mut dropped = 0;
        for e in 0..sh.mmus.len() {
            dropped += sh.mmu(e).tlb_mut().invalidate(inv.scope);
        }
        sh.log.complete(inv.scope, inv.seq);
        if sh.audit() {
            // What it left behind (spec 11.4, rule 3), before its completion is posted.
            sh.audit_tlbs(|m, t| m.audit_complete(t, inv.seq));
        }
        sh.stats.inc(Counter::TlbInvalidations);
        sh.stats.add(Counter::TlbEntriesInvalidated, dropped);
        let st = sh.lock();
        if st.generation == generation {
            sh.complete(
                &st,
                command_done(
                    inv.seqno,
                    CTX_NONE,
                    Opcode::TlbInvalidate,
                    Status::Ok,
                    dropped,
                ),
            );
        }
    }
}
