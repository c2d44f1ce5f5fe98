// SPDX-License-Identifier: GPL-2.0

//! The queues' interrupt callbacks (hard-interrupt context) and the records they carry:
//! completions (`COMMAND_DONE`, `JOB_DONE`, `FENCE`) and events (`PAGE_FAULT`,
//! `DEVICE_RESET`, `ENGINE_HANG`, `EVENTS_LOST`, `CONTEXT_ERROR`). Nothing in a record is
//! trusted (spec: Completions, Events): undecodable records, unknown kinds and seqnos,
//! duplicates and replays are counted and ignored.

use super::{inc, recovery::HANG_SLOTS, Gpu};
use crate::{faults::FaultRec, fence::DoneKind, virtio, wire};
use kernel::{
    sync::{atomic::Relaxed, Arc},
    time::{Instant, Monotonic},
};

impl Gpu {
    // ---- interrupt callbacks -----------------------------------------------------------

    /// A completion record (interrupt context). Nothing in it is trusted (spec 6.6, 6.16.2):
    /// undecodable records, unknown kinds and seqnos, duplicates are counted and ignored.
    fn on_completion(self: &Arc<Self>, rec: &[u8]) {
        let r = &self.recovery;
        let Some(c) = wire::Completion::decode(rec) else {
            inc(&r.completions_corrupt);
            return;
        };
        match wire::CompletionKind::from_u32(c.kind) {
            // Unknown seqnos and duplicates are counted by the control queue.
            Some(wire::CompletionKind::CommandDone) => {
                self.ctrl.command_done(c.seqno, c.status, c.value)
            }
            Some(wire::CompletionKind::JobDone) => {
                let f = self.ctxs.lock().get(c.ctx_id).cloned();
                match f.map(|f| f.job_done(c.seqno, c.status)) {
                    Some(DoneKind::Accepted) => {}
                    Some(DoneKind::Duplicate) => inc(&r.job_done_duplicate),
                    Some(DoneKind::Unknown) | None => inc(&r.job_done_unknown),
                }
            }
            // FENCE completions carry nothing the driver's fences need.
            Some(wire::CompletionKind::Fence) => {}
            None => inc(&r.completions_unknown_kind),
        }
    }

    /// An event record (interrupt context); as untrusted as completions.
    fn on_event(self: &Arc<Self>, rec: &[u8]) {
        let r = &self.recovery;
        let Some((seq, ev)) = wire::Event::decode(rec) else {
            inc(&r.events_corrupt);
            return;
        };
        {
            let mut re = self.reset_events.lock();
            if seq <= re.last_event_seq {
                drop(re);
                inc(&r.events_stale);
                return;
            }
            re.last_event_seq = seq;
        }
        match ev {
            wire::Event::PageFault(f) => {
                if self.faults.lock().contains(f.fault_id) {
                    inc(&r.fault_events_duplicate);
                    return;
                }
                // A context that faults is running, not hung (the watchdog's view).
                self.ctx_progress(f.ctx_id);
                self.faults.lock().push(FaultRec {
                    fault_id: f.fault_id,
                    va: f.va,
                    asid: f.asid,
                    access: f.access,
                    ctx_id: f.ctx_id,
                    reason: f.reason,
                    t0: Some(Instant::<Monotonic>::now()),
                });
                let _ = crate::reclaim_queue().enqueue::<_, 0>(self.clone());
            }
            wire::Event::DeviceReset(e) => {
                let initiated = e.reason != wire::ResetReason::DriverRequest.as_u32();
                {
                    let mut re = self.reset_events.lock();
                    re.seen_count = re.seen_count.max(e.reset_count);
                    if initiated {
                        re.initiated_count = re.initiated_count.max(e.reset_count);
                    } else {
                        re.driver_events += 1;
                    }
                }
                self.reset_cv.notify_all();
                if initiated {
                    let _ = crate::reclaim_queue().enqueue::<_, 1>(self.clone());
                }
            }
            wire::Event::EngineHang(h) => {
                let mut ring = self.hangs.lock();
                if ring.len < HANG_SLOTS {
                    let n = ring.len;
                    ring.recs[n] = (h.ctx_id, h.job_seqno);
                    ring.len += 1;
                }
                // Else dropped: the watchdog's timeout catches the hang.
                drop(ring);
                let _ = crate::reclaim_queue().enqueue::<_, 1>(self.clone());
            }
            wire::Event::EventsLost(l) => {
                // Context errors also come with the job's JOB_DONE status; hangs are
                // caught by the watchdog.
                inc(&r.events_lost_reports);
                r.events_lost.add(l.lost, Relaxed);
            }
            // The job's JOB_DONE carries the error; nothing else to do.
            wire::Event::ContextError(_) => {}
        }
    }
}

/// The control queue's callback: command completions were used (interrupt context).
///
/// # Safety
///
/// Called by the virtio core for a queue of a device whose callback context is its `Gpu`
/// (set in probe, valid until the queues are deleted).
pub(super) unsafe extern "C" fn ctrl_callback(vq: *mut virtio::RawVirtqueue) {
    // SAFETY: The callback context is the `Gpu` set in `probe`, valid until the queues are
    // deleted in `unbind`.
    let gpu = unsafe { &*virtio::callback_context(vq).cast::<Gpu>() };
    gpu.ctrl.complete();
}

/// The event queue's callback (interrupt context).
///
/// # Safety
///
/// As for [`ctrl_callback`]; the context is the contents of an `Arc<Gpu>`.
pub(super) unsafe extern "C" fn event_callback(vq: *mut virtio::RawVirtqueue) {
    // SAFETY: As in `ctrl_callback`. The `Gpu` is the contents of an `Arc` (see `probe`).
    let gpu = unsafe { ArcRef::from_ctx(virtio::callback_context(vq)) };
    gpu.get().eventq.drain(|rec| gpu.get().on_event(rec));
}

/// The completion queue's callback (interrupt context).
///
/// # Safety
///
/// As for [`event_callback`].
pub(super) unsafe extern "C" fn compl_callback(vq: *mut virtio::RawVirtqueue) {
    // SAFETY: As in `event_callback`.
    let gpu = unsafe { ArcRef::from_ctx(virtio::callback_context(vq)) };
    gpu.get().complq.drain(|rec| gpu.get().on_completion(rec));
}

/// An `Arc<Gpu>` borrowed from the raw pointer of the callback context (not dropped).
struct ArcRef(core::mem::ManuallyDrop<Arc<Gpu>>);

impl ArcRef {
    /// # Safety
    ///
    /// `ctx` must be `Arc::as_ptr` of an `Arc<Gpu>` that stays alive while `Self` lives.
    unsafe fn from_ctx(ctx: *const core::ffi::c_void) -> Self {
        // SAFETY: Per the contract, `ctx` came from `Arc::as_ptr`; `ManuallyDrop` keeps the
        // reference count balanced.
        Self(core::mem::ManuallyDrop::new(unsafe {
            Arc::from_raw(ctx.cast::<Gpu>())
        }))
    }

    fn get(&self) -> &Arc<Gpu> {
        &self.0
    }
}
