// SPDX-License-Identifier: GPL-2.0

//! Resets and hangs: the driver's `RESET` (coalesced by the seqno of the command that
//! failed), device-initiated resets (`DEVICE_RESET` events), the virtio reset of last
//! resort (the device is given up), `ENGINE_HANG` reports and the job watchdog, and what
//! the driver restores after a reset (spec: Device reset, Hangs).

use super::{inc, Gpu};
use crate::wire;
use kernel::{
    prelude::*,
    sync::{
        atomic::{Atomic, Relaxed},
        Arc, CondVarTimeoutResult,
    },
    time::{msecs_to_jiffies, Instant, Monotonic},
};

/// Recovery counters, per kind (debugfs `svmgpu/virtioN/recovery`, spec 6.16.2).
pub(crate) struct Recovery {
    /// Completion records too short or otherwise undecodable.
    pub(crate) completions_corrupt: Atomic<u64>,
    /// Completion records of an undefined kind.
    pub(crate) completions_unknown_kind: Atomic<u64>,
    /// `JOB_DONE`s matching no job in flight (corrupted seqno, unknown context, late).
    pub(crate) job_done_unknown: Atomic<u64>,
    /// Second `JOB_DONE`s for one job.
    pub(crate) job_done_duplicate: Atomic<u64>,
    /// Event records undecodable or of an unknown type.
    pub(crate) events_corrupt: Atomic<u64>,
    /// Events whose `event_seq` is not newer than the last one (replayed).
    pub(crate) events_stale: Atomic<u64>,
    /// `PAGE_FAULT` events for a fault already queued (duplicated).
    pub(crate) fault_events_duplicate: Atomic<u64>,
    /// `FAULT_REPLY`s answered `NOT_FOUND` (duplicated or phantom faults).
    pub(crate) fault_replies_not_found: Atomic<u64>,
    /// `EVENTS_LOST` events, and the events they report.
    pub(crate) events_lost_reports: Atomic<u64>,
    pub(crate) events_lost: Atomic<u64>,
    /// `ENGINE_HANG` events that named a job in flight, and the others (ignored).
    pub(crate) hang_events: Atomic<u64>,
    pub(crate) hang_events_bogus: Atomic<u64>,
    /// Jobs the driver's own timeout declared hung.
    pub(crate) job_timeouts: Atomic<u64>,
    /// Open files banned after repeated hangs.
    pub(crate) clients_banned: Atomic<u64>,
    /// Invalidations or preemptions that failed or timed out (each resets the device).
    pub(crate) invalidation_failures: Atomic<u64>,
    /// `RESET` commands the driver sent and that completed.
    pub(crate) resets_driver: Atomic<u64>,
    /// Reset requests a `RESET` sent meanwhile had answered already (coalesced).
    pub(crate) resets_coalesced: Atomic<u64>,
    /// Device-initiated resets recovered from, and those a driver reset had covered.
    pub(crate) resets_device: Atomic<u64>,
    pub(crate) resets_superseded: Atomic<u64>,
    /// `RESET` failed: the driver reset the device through virtio and gave it up.
    pub(crate) virtio_resets: Atomic<u64>,
    /// `ASID_BIND`s that failed while restoring VMs after a reset.
    pub(crate) rebind_failures: Atomic<u64>,
    /// GPU faults at an address whose mapping was already valid for the access (the
    /// device raised them although nothing was missing: injected spurious faults, walks
    /// that failed to read the page table), and faults reported as a page-table read
    /// error (`BAD_TABLE_ADDRESS`).
    pub(crate) faults_on_valid_mappings: Atomic<u64>,
    pub(crate) faults_bad_table: Atomic<u64>,
}

impl Recovery {
    pub(super) fn new() -> Self {
        Self {
            completions_corrupt: Atomic::new(0),
            completions_unknown_kind: Atomic::new(0),
            job_done_unknown: Atomic::new(0),
            job_done_duplicate: Atomic::new(0),
            events_corrupt: Atomic::new(0),
            events_stale: Atomic::new(0),
            fault_events_duplicate: Atomic::new(0),
            fault_replies_not_found: Atomic::new(0),
            events_lost_reports: Atomic::new(0),
            events_lost: Atomic::new(0),
            hang_events: Atomic::new(0),
            hang_events_bogus: Atomic::new(0),
            job_timeouts: Atomic::new(0),
            clients_banned: Atomic::new(0),
            invalidation_failures: Atomic::new(0),
            resets_driver: Atomic::new(0),
            resets_coalesced: Atomic::new(0),
            resets_device: Atomic::new(0),
            resets_superseded: Atomic::new(0),
            virtio_resets: Atomic::new(0),
            rebind_failures: Atomic::new(0),
            faults_on_valid_mappings: Atomic::new(0),
            faults_bad_table: Atomic::new(0),
        }
    }
}

/// What the driver knows about the device's resets (`DEVICE_RESET` events).
pub(super) struct ResetEvents {
    /// Largest `reset_count` seen in a `DEVICE_RESET` event.
    pub(super) seen_count: u64,
    /// Largest `reset_count` of a `DEVICE_INITIATED` one.
    pub(super) initiated_count: u64,
    /// `DRIVER_REQUEST` events seen.
    pub(super) driver_events: u64,
    /// The driver restored its state after every reset up to this count.
    pub(super) recovered_count: u64,
    /// Largest device-initiated `reset_count` counted as covered by a driver reset.
    pub(super) superseded: u64,
    /// Largest `event_seq` seen.
    pub(super) last_event_seq: u64,
}

/// The last reset, for debugfs.
pub(super) struct LastReset {
    pub(super) reason: &'static str,
    /// When (none yet: `None`).
    pub(super) at: Option<Instant<Monotonic>>,
}

/// Hangs reported by `ENGINE_HANG` events, waiting for the reset worker.
pub(super) const HANG_SLOTS: usize = 16;

pub(super) struct HangRing {
    pub(super) recs: [(u32, u64); HANG_SLOTS],
    pub(super) len: usize,
}

/// How often the watchdog looks for overdue jobs.
pub(super) const WATCHDOG_MS: u32 = 250;

/// `wedge_state`: no virtio reset asked for, asked for (the wedge work runs), done.
pub(super) const WEDGE_NONE: u8 = 0;
pub(super) const WEDGE_REQUESTED: u8 = 1;
pub(super) const WEDGE_DONE: u8 = 2;

impl Gpu {
    // ---- resets and hangs ----------------------------------------------------------------

    /// Whether a driver `RESET` completed that the device served after the command of seqno
    /// `after`.
    fn reset_since(&self, after: u64) -> bool {
        self.reset_seqno.load(Relaxed) > after
    }

    fn note_reset(&self, reason: &'static str) {
        let mut l = self.last_reset.lock();
        l.reason = reason;
        l.at = Some(Instant::<Monotonic>::now());
    }

    /// Resets the device with the `RESET` command (after a failed or timed-out
    /// invalidation, preemption or `CTX_DESTROY`) and restores what the driver still needs.
    /// Afterwards the device runs nothing and caches no translation. If `RESET` is not
    /// answered in time (`RESETTING` answers are retried), the device is reset through
    /// virtio, which stops every access to guest memory, and given up (every operation
    /// then fails with `ENODEV`): either way nothing the device did before can reach guest
    /// memory when this returns.
    ///
    /// `after` is the seqno of the last command whose failure calls for the reset (or the
    /// queue's [`CtrlQueue::last_seqno`] after it was sent): a `RESET` that completed with a
    /// later seqno was served by the device after that command, so it discarded it and the
    /// guarantee holds already. So many waiters failing at once (a dropped invalidation)
    /// reset the device once, not once each.
    pub(crate) fn reset_and_recover(self: &Arc<Self>, after: u64, why: &'static str) {
        if self.is_dead() || self.ctrl.is_closed() || self.reset_since(after) {
            return;
        }
        let _guard = self.reset_lock.lock();
        if self.reset_since(after) {
            inc(&self.recovery.resets_coalesced);
            return;
        }
        pr_warn!("virtio{}: resetting the device ({})\n", self.bus_index, why);
        self.note_reset(why);
        let before = self.reset_events.lock().driver_events;
        let body = wire::ResetReq {
            flags: 0,
            reserved: 0,
        }
        .to_bytes();
        match self
            .ctrl
            .call(wire::Opcode::Reset, &body, &mut [])
            .and_then(|r| r.ok())
        {
            Ok(seqno) => {
                inc(&self.recovery.resets_driver);
                self.reset_seqno.store(seqno, Relaxed);
                // Wait (bounded) for the reset's DEVICE_RESET event: events before it (an
                // earlier device-initiated reset) are then known to be covered by this one.
                let mut re = self.reset_events.lock();
                let mut remaining = msecs_to_jiffies(1000);
                while re.driver_events == before {
                    match self.reset_cv.wait_timeout(&mut re, remaining) {
                        CondVarTimeoutResult::Woken { jiffies } => remaining = jiffies,
                        _ => break,
                    }
                }
                re.recovered_count = re.recovered_count.max(re.seen_count);
                drop(re);
                self.after_reset();
            }
            Err(e) => {
                pr_err!(
                    "svmgpu: virtio{}: RESET failed ({:?}); virtio reset, the device is given up\n",
                    self.bus_index,
                    e
                );
                self.note_reset("RESET failed: virtio reset, device given up");
                self.wedge();
            }
        }
    }

    /// Stops the device for good with a virtio reset (it then touches no memory and raises
    /// no interrupt) and fails everything: the last resort when `RESET` does not work.
    /// Waits until that is done.
    ///
    /// The virtio reset runs in a work item (`wedge_work`): the transport synchronises its
    /// interrupt vectors under the PCI MSI domain mutex, whose holders allocate memory, and
    /// callers here may be MMU notifiers (reclaim context). The wait is not a real
    /// dependency on that mutex: this device's instance of it is only taken by its own
    /// probe and unbind, which never run while a VM of the device lives.
    fn wedge(self: &Arc<Self>) {
        *self.wedge_state.lock() = WEDGE_REQUESTED;
        let _ = crate::reclaim_queue().enqueue::<_, 3>(self.clone());
        let mut st = self.wedge_state.lock();
        while *st != WEDGE_DONE {
            self.wedge_cv.wait(&mut st);
        }
    }

    /// The wedge work: the virtio reset and failing everything (see [`Gpu::wedge`]).
    pub(super) fn do_wedge(&self) {
        if *self.wedge_state.lock() != WEDGE_REQUESTED {
            return;
        }
        if !self.is_dead() {
            self.virtio_reset_and_fail();
        }
        *self.wedge_state.lock() = WEDGE_DONE;
        self.wedge_cv.notify_all();
    }

    fn virtio_reset_and_fail(&self) {
        inc(&self.recovery.virtio_resets);
        self.vdev.reset();
        self.retire_device_buffers(EIO);
    }

    /// After a virtio reset (the device owns no buffer any more): drops the queues, retires
    /// every command slot and fails every waiter, and fails every queue's jobs with `err`.
    pub(super) fn retire_device_buffers(&self, err: Error) {
        let _ = self.ctrl.detach();
        let _ = self.eventq.detach();
        let _ = self.complq.detach();
        self.ctrl.reset_done();
        let ctxs = self.ctxs.lock();
        for f in ctxs.iter() {
            f.lose(err.to_errno());
        }
    }

    /// What the driver does after any device reset: every incomplete asynchronous command
    /// counts as complete, every job without a `JOB_DONE` fails, outstanding faults are
    /// gone, and the ASIDs of live VMs are bound again to their page tables (which live in
    /// guest memory and stay valid); their queues are lost: user space sees `EIO` and
    /// recreates them.
    fn after_reset(&self) {
        self.stats.resets.add(1, Relaxed);
        self.ctrl.reset_done();
        {
            let ctxs = self.ctxs.lock();
            for f in ctxs.iter() {
                f.lose(EIO.to_errno());
            }
        }
        self.faults.lock().clear();
        self.hangs.lock().len = 0;
        let t = self.vms.lock();
        for vm in t.iter() {
            vm.clear_faults();
            if vm.rebind_asid().is_err() {
                inc(&self.recovery.rebind_failures);
            }
        }
    }

    /// The reset worker: device-initiated resets, then `ENGINE_HANG` reports.
    pub(super) fn handle_reset(self: &Arc<Self>) {
        self.recover_initiated();
        loop {
            let h = {
                let mut ring = self.hangs.lock();
                if ring.len == 0 {
                    break;
                }
                ring.len -= 1;
                let n = ring.len;
                ring.recs[n]
            };
            self.handle_hang(h.0, Some(h.1), false);
        }
    }

    /// Restores the driver's state after a device-initiated reset whose `DEVICE_RESET`
    /// event arrived, unless that was done already (or a later `RESET` of the driver's
    /// covered it). Also called before new VMs and contexts are created, so that a
    /// recovery still pending cannot lose them.
    pub(crate) fn recover_initiated(&self) {
        {
            let _guard = self.reset_lock.lock();
            let mut re = self.reset_events.lock();
            if re.initiated_count > re.recovered_count {
                re.recovered_count = re.seen_count;
                re.superseded = re.initiated_count;
                drop(re);
                pr_warn!("virtio{}: the device reset itself\n", self.bus_index);
                inc(&self.recovery.resets_device);
                self.note_reset("device-initiated reset");
                self.after_reset();
            } else if re.initiated_count > re.superseded {
                // A RESET of the driver's since covered it.
                re.superseded = re.initiated_count;
                drop(re);
                inc(&self.recovery.resets_superseded);
            }
        }
    }

    /// A job of context `ctx_id` hung: `job` (reported by `ENGINE_HANG`, which must name a
    /// job in flight) or the oldest in flight (the watchdog). Fails it with `-ETIMEDOUT`
    /// (later jobs `-ECANCELED`), bans the queue, counts the hang against its file (banned
    /// after [`crate::fence::HANG_BAN_LIMIT`]), and destroys the context, which frees the
    /// engine; if `CTX_DESTROY` does not answer, resets the device.
    fn handle_hang(self: &Arc<Self>, ctx_id: u32, job: Option<u64>, timeout: bool) {
        let f = self.ctxs.lock().get(ctx_id).cloned();
        let hung = f.as_ref().and_then(|f| f.hang(job));
        let (Some(f), Some(seqno)) = (f, hung) else {
            if !timeout {
                inc(&self.recovery.hang_events_bogus);
            }
            return;
        };
        inc(if timeout {
            &self.recovery.job_timeouts
        } else {
            &self.recovery.hang_events
        });
        let hangs = f.client.hangs.fetch_add(1, Relaxed) + 1;
        if hangs == crate::fence::HANG_BAN_LIMIT {
            inc(&self.recovery.clients_banned);
        }
        pr_warn!(
            "virtio{}: job {} of context {} hung ({}); the queue is banned\n",
            self.bus_index,
            seqno,
            ctx_id,
            if timeout {
                "driver timeout"
            } else {
                "ENGINE_HANG"
            }
        );
        let body = wire::CtxReq { ctx_id, flags: 0 }.to_bytes();
        match self.ctrl.call(wire::Opcode::CtxDestroy, &body, &mut []) {
            Ok(r)
                if r.status == wire::Status::Ok.as_u32()
                    || r.status == wire::Status::NotFound.as_u32() => {}
            Err(e) if e == ENODEV => {}
            _ => self.reset_and_recover(
                self.ctrl.last_seqno(),
                "CTX_DESTROY of a hung context failed",
            ),
        }
    }

    /// The context `ctx_id` made progress (a fault raised or resolved): its jobs are not
    /// hung (any context: IRQ-safe locks only).
    pub(crate) fn ctx_progress(&self, ctx_id: u32) {
        let f = self.ctxs.lock().get(ctx_id).cloned();
        if let Some(f) = f {
            f.progress();
        }
    }

    /// The watchdog: declares hung the oldest job of every queue that made no progress for
    /// the job timeout (the `ENGINE_HANG` event may have been lost, or never sent).
    pub(super) fn watchdog(self: &Arc<Self>) {
        let timeout = self.job_timeout_ms.load(Relaxed);
        let n = self.ctxs.lock().limit();
        // Ids are at most 4096 (the table's limit).
        for id in 0..n as u32 {
            let f = self.ctxs.lock().get(id).cloned();
            if let Some(seqno) = f.and_then(|f| f.overdue(timeout)) {
                self.handle_hang(id, Some(seqno), true);
            }
        }
    }
}
