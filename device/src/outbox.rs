// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Device → driver records (spec/svmgpu.md sections 4, 7 and 8): the event backlog and the
//! completion backlog, and their delivery into driver-posted eventq/complq buffers.
//!
//! Records are queued by whoever produces them (control thread, engines, the timer) and
//! delivered whenever buffers are available: right after queuing, and when the driver kicks
//! eventq/complq. Every backlog is bounded:
//! - events: `max_outstanding_faults + 64`; PAGE_FAULT events are never dropped (the fault
//!   table bounds them), other events are dropped and counted, and reported by EVENTS_LOST;
//! - completions: one COMMAND_DONE per accepted asynchronous command (at most
//!   `MAX_ASYNC_OUTSTANDING` until delivered), one JOB_DONE per job (at most
//!   `max_contexts × JOB_QUEUE_DEPTH`), and at most [`FENCE_BACKLOG`] FENCE records: a FENCE
//!   with NOTIFY waits while that many are held.
//!
//! A reset discards the backlogs; records produced by work of an earlier reset generation are
//! dropped on arrival.
//!
//! Fault injection (spec section 16.3) acts here too: a completion may be queued corrupted,
//! twice, or held back behind the next one (at most one record is held back, and only until
//! its deadline); a droppable event may be dropped as if the backlog were full. Bounds hold:
//! a duplicate is one more record per record, and is not counted against the FENCE or
//! asynchronous-command budgets, which follow the original.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use log::warn;
use svmgpu_spec::{
    Completion, CompletionKind, Event, EventsLostEvent, COMPLETION_SIZE, EVENT_BACKLOG_EXTRA,
    EVENT_SIZE,
};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use crate::chain::{write_record, Desc};
use crate::stats::{Counter, Stats};

/// FENCE completions the device holds before a FENCE with NOTIFY waits for complq buffers.
pub const FENCE_BACKLOG: usize = svmgpu_spec::FENCE_BACKLOG as usize;

#[derive(Clone, Copy, Debug)]
struct Held {
    rec: Completion,
    /// Counts against `async_pending` until delivered.
    is_async: bool,
    /// Counts against the FENCE backlog until delivered.
    fence: bool,
}

impl Held {
    fn new(rec: Completion) -> Self {
        Self {
            rec,
            is_async: rec.kind == CompletionKind::CommandDone.as_u32(),
            fence: rec.kind == CompletionKind::Fence.as_u32(),
        }
    }
}

/// How an injected completion is queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injected {
    /// Queued as this (corrupted) record; the budgets follow the original.
    Corrupt(Completion),
    /// Queued twice.
    Duplicate,
    /// Held back until the next completion is queued, or until the deadline.
    Reorder(Instant),
}

struct Inner {
    generation: u64,
    events: VecDeque<Event>,
    event_cap: usize,
    lost: u64,
    next_event_seq: u64,
    completions: VecDeque<Held>,
    /// A completion held back by `completion-reorder`, and when it goes anyway.
    held_back: Option<(Held, Instant)>,
    eventq: Option<VringRwLock>,
    complq: Option<VringRwLock>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("generation", &self.generation)
            .field("events", &self.events.len())
            .field("completions", &self.completions.len())
            .field("attached", &self.eventq.is_some())
            .finish_non_exhaustive()
    }
}

/// The two backlogs and the rings they drain into.
#[derive(Debug)]
pub struct Outbox {
    inner: Mutex<Inner>,
    /// Asynchronous commands accepted and whose COMMAND_DONE is not yet in a used ring.
    async_pending: AtomicU32,
    /// FENCE records held (read on every FENCE without taking the lock).
    fences: AtomicUsize,
}

/// Result of offering one record to a ring.
enum Offer {
    Written,
    NoBuffer,
}

impl Outbox {
    /// Empty backlogs for a device with `max_faults` outstanding faults.
    pub fn new(max_faults: u32) -> Self {
        Self {
            inner: Mutex::new(Inner {
                generation: 0,
                events: VecDeque::new(),
                event_cap: max_faults as usize + EVENT_BACKLOG_EXTRA as usize,
                lost: 0,
                next_event_seq: 1,
                completions: VecDeque::new(),
                held_back: None,
                eventq: None,
                complq: None,
            }),
            async_pending: AtomicU32::new(0),
            fences: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reset generation records are produced for.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Asynchronous commands not yet completed into a used ring.
    pub fn async_pending(&self) -> u32 {
        self.async_pending.load(Ordering::Acquire)
    }

    /// Counts a newly accepted asynchronous command.
    pub fn async_accepted(&self) {
        self.async_pending.fetch_add(1, Ordering::AcqRel);
    }

    /// True if a FENCE with NOTIFY may post now.
    pub fn fence_room(&self) -> bool {
        self.fences.load(Ordering::Acquire) < FENCE_BACKLOG
    }

    /// Uses these rings from now on (the connection's eventq and complq).
    pub fn attach(&self, eventq: &VringRwLock, complq: &VringRwLock) {
        let mut i = self.lock();
        if i.eventq.is_none() {
            i.eventq = Some(eventq.clone());
            i.complq = Some(complq.clone());
        }
    }

    /// Discards every held record and starts a new generation. A virtio reset also forgets
    /// the rings and restarts `event_seq` at 1.
    pub fn discard(&self, virtio: bool) {
        let mut i = self.lock();
        i.generation += 1;
        i.events.clear();
        i.lost = 0;
        i.completions.clear();
        i.held_back = None;
        self.fences.store(0, Ordering::Release);
        self.async_pending.store(0, Ordering::Release);
        if virtio {
            i.eventq = None;
            i.complq = None;
            i.next_event_seq = 1;
        }
    }

    /// Queues an event produced in generation `gen`. DEVICE_RESET and PAGE_FAULT events are
    /// never dropped; others are when the backlog is full.
    pub fn push_event(&self, gen: u64, ev: Event, stats: &Stats) {
        let mut i = self.lock();
        if gen != i.generation {
            return;
        }
        let keep = matches!(ev, Event::PageFault(_) | Event::DeviceReset(_));
        if !keep && i.events.len() >= i.event_cap {
            i.lost += 1;
            stats.inc(Counter::EventsLost);
            return;
        }
        i.events.push_back(ev);
    }

    /// True if a droppable event would be kept now.
    pub fn event_room(&self) -> bool {
        let i = self.lock();
        i.events.len() < i.event_cap
    }

    /// Queues an event of generation `gen` only if the backlog has room (injected events,
    /// which the bounds of section 7.3 do not account for). False if it was not queued.
    pub fn push_event_if_room(&self, gen: u64, ev: Event) -> bool {
        let mut i = self.lock();
        if gen != i.generation || i.events.len() >= i.event_cap {
            return false;
        }
        i.events.push_back(ev);
        true
    }

    /// Drops an event of generation `gen` as if the backlog were full (`event-overflow`):
    /// counted in `events_lost` and reported by EVENTS_LOST.
    pub fn lose_event(&self, gen: u64, stats: &Stats) {
        let mut i = self.lock();
        if gen == i.generation {
            i.lost += 1;
            stats.inc(Counter::EventsLost);
        }
    }

    fn queue(&self, i: &mut Inner, h: Held) {
        if h.fence {
            self.fences.fetch_add(1, Ordering::AcqRel);
        }
        i.completions.push_back(h);
    }

    /// Queues a completion produced in generation `gen` (and after it, a completion held
    /// back by `completion-reorder`).
    pub fn push_completion(&self, gen: u64, rec: Completion) {
        let mut i = self.lock();
        if gen != i.generation {
            return;
        }
        self.queue(&mut i, Held::new(rec));
        if let Some((h, _)) = i.held_back.take() {
            self.queue(&mut i, h);
        }
    }

    /// Queues a completion of generation `gen` the way fault injection says.
    pub fn push_injected(&self, gen: u64, rec: Completion, how: Injected) {
        let mut i = self.lock();
        if gen != i.generation {
            return;
        }
        let h = Held::new(rec);
        match how {
            Injected::Corrupt(bad) => self.queue(&mut i, Held { rec: bad, ..h }),
            Injected::Duplicate => {
                self.queue(&mut i, h);
                let copy = Held {
                    is_async: false,
                    fence: false,
                    ..h
                };
                self.queue(&mut i, copy);
            }
            Injected::Reorder(deadline) => {
                // One record is held back at a time: an earlier one goes first.
                if let Some((old, _)) = i.held_back.take() {
                    self.queue(&mut i, old);
                }
                i.held_back = Some((h, deadline));
                return;
            }
        }
        if let Some((h, _)) = i.held_back.take() {
            self.queue(&mut i, h);
        }
    }

    /// When the held-back completion goes anyway, if there is one.
    pub fn held_back_deadline(&self) -> Option<Instant> {
        self.lock().held_back.map(|(_, d)| d)
    }

    /// Queues the held-back completion if its deadline is reached; true if it did.
    pub fn release_held_back(&self, now: Instant) -> bool {
        let mut i = self.lock();
        match i.held_back {
            Some((h, d)) if d <= now => {
                i.held_back = None;
                self.queue(&mut i, h);
                true
            }
            _ => false,
        }
    }

    /// Delivers what the rings have buffers for; returns true if a FENCE record left the
    /// backlog (waiting fences may proceed).
    pub fn flush(&self, mem: &GuestMemoryMmap<()>, stats: &Stats) -> bool {
        let mut i = self.lock();
        let i = &mut *i;
        let mut fence_freed = false;
        if let Some(q) = i.complq.clone() {
            let mut used = false;
            while let Some(h) = i.completions.front() {
                let bytes = h.rec.to_bytes();
                match offer(&q, mem, &bytes, stats) {
                    Offer::Written => {
                        used = true;
                        stats.inc(Counter::CompletionsPosted);
                        if h.is_async {
                            let _ = self.async_pending.fetch_update(
                                Ordering::AcqRel,
                                Ordering::Acquire,
                                |n| n.checked_sub(1),
                            );
                        }
                        if h.fence {
                            self.fences.fetch_sub(1, Ordering::AcqRel);
                            fence_freed = true;
                        }
                        i.completions.pop_front();
                    }
                    Offer::NoBuffer => break,
                }
            }
            notify(&q, used);
        }
        if let Some(q) = i.eventq.clone() {
            let mut used = false;
            loop {
                if i.lost > 0 && i.events.len() < i.event_cap {
                    let lost = std::mem::take(&mut i.lost);
                    i.events.push_back(Event::EventsLost(EventsLostEvent {
                        lost,
                        ..Default::default()
                    }));
                }
                let Some(ev) = i.events.front() else { break };
                let mut bytes = [0u8; EVENT_SIZE];
                // The buffer is exactly one record long.
                let _ = ev.encode(i.next_event_seq, &mut bytes);
                match offer(&q, mem, &bytes, stats) {
                    Offer::Written => {
                        used = true;
                        i.next_event_seq += 1;
                        stats.inc(Counter::EventsPosted);
                        i.events.pop_front();
                    }
                    Offer::NoBuffer => break,
                }
            }
            notify(&q, used);
        }
        fence_freed
    }

    /// Records held (events, completions), for tests and statistics.
    pub fn held(&self) -> (usize, usize) {
        let i = self.lock();
        (
            i.events.len(),
            i.completions.len() + usize::from(i.held_back.is_some()),
        )
    }
}

fn notify(q: &VringRwLock, used: bool) {
    if used {
        if let Err(e) = q.signal_used_queue() {
            warn!("used-buffer notification failed: {e}");
        }
    }
}

/// Writes `bytes` into the next available buffer of `q`. Buffers too short or outside guest
/// RAM are returned with used length 0, counted, and the next one is tried.
fn offer(q: &VringRwLock, mem: &GuestMemoryMmap<()>, bytes: &[u8], stats: &Stats) -> Offer {
    debug_assert!(bytes.len() == EVENT_SIZE || bytes.len() == COMPLETION_SIZE);
    let mut st = q.get_mut();
    if !st.is_enabled() || !st.get_queue().ready() {
        return Offer::NoBuffer;
    }
    // Bounded by the ring size: every iteration consumes one available chain.
    loop {
        let Some(chain) = st.get_queue_mut().pop_descriptor_chain(mem) else {
            return Offer::NoBuffer;
        };
        let head = chain.head_index();
        let descs: Vec<Desc> = chain
            .map(|d| Desc {
                addr: d.addr().0,
                len: d.len(),
                writable: d.is_write_only(),
            })
            .collect();
        match write_record(mem, &descs, bytes) {
            Some(n) => {
                if let Err(e) = st.add_used(head, n) {
                    warn!("add_used failed: {e}");
                }
                return Offer::Written;
            }
            None => {
                stats.inc(Counter::MalformedChains);
                warn!(
                    "a buffer of {} bytes or outside guest RAM was returned unused",
                    bytes.len()
                );
                if let Err(e) = st.add_used(head, 0) {
                    warn!("add_used failed: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use svmgpu_spec::{DeviceResetEvent, PageFaultEvent};

    #[test]
    fn backlog_bounds_and_generations() {
        let stats = Stats::new();
        let o = Outbox::new(1);
        let g = o.generation();
        let ctx_err = Event::ContextError(Default::default());
        for _ in 0..(1 + EVENT_BACKLOG_EXTRA as usize + 10) {
            o.push_event(g, ctx_err, &stats);
        }
        assert_eq!(o.held().0, 65);
        assert_eq!(stats.get(Counter::EventsLost), 10);
        o.push_event(g, Event::PageFault(PageFaultEvent::default()), &stats);
        o.push_event(g, Event::DeviceReset(DeviceResetEvent::default()), &stats);
        assert_eq!(o.held().0, 67, "faults and resets are never dropped");
        o.async_accepted();
        assert_eq!(o.async_pending(), 1);
        o.discard(false);
        assert_eq!((o.held(), o.async_pending()), ((0, 0), 0));
        // A record of the old generation is dropped.
        o.push_completion(g, Completion::default());
        assert_eq!(o.held().1, 0);
        let fence = Completion {
            kind: CompletionKind::Fence.as_u32(),
            ..Default::default()
        };
        for _ in 0..FENCE_BACKLOG {
            assert!(o.fence_room());
            o.push_completion(g + 1, fence);
        }
        assert!(!o.fence_room());
        // Injected completions: a duplicate, a corrupt record and one held back.
        let o = Outbox::new(1);
        let g = o.generation();
        let cmd = |seqno| Completion {
            kind: CompletionKind::CommandDone.as_u32(),
            seqno,
            ..Default::default()
        };
        o.async_accepted();
        o.push_injected(g, cmd(1), Injected::Duplicate);
        assert_eq!(o.held().1, 2);
        let mut bad = fence;
        bad.seqno = 1 << 63;
        o.push_injected(g, fence, Injected::Corrupt(bad));
        assert_eq!(
            o.fences.load(Ordering::Relaxed),
            1,
            "budget of the original"
        );
        let later = Instant::now() + std::time::Duration::from_secs(60);
        o.push_injected(g, cmd(2), Injected::Reorder(later));
        assert_eq!(o.held_back_deadline(), Some(later));
        assert_eq!(o.held().1, 4, "the held-back record counts as held");
        assert!(!o.release_held_back(Instant::now()));
        o.push_completion(g, cmd(3));
        assert_eq!(o.held_back_deadline(), None);
        let order: Vec<u64> = o.lock().completions.iter().map(|h| h.rec.seqno).collect();
        assert_eq!(order, [1, 1, 1 << 63, 3, 2]);
        o.push_injected(g, cmd(4), Injected::Reorder(Instant::now()));
        assert!(o.release_held_back(Instant::now()));
        // Injected events: dropped as lost, or queued only where there is room.
        let s2 = Stats::new();
        o.lose_event(g, &s2);
        assert_eq!(s2.get(Counter::EventsLost), 1);
        for _ in 0..EVENT_BACKLOG_EXTRA + 1 {
            assert!(o.event_room());
            assert!(o.push_event_if_room(g, ctx_err));
        }
        assert!(!o.event_room());
        assert!(!o.push_event_if_room(g, ctx_err));
        o.discard(false);
        assert_eq!(o.held(), (0, 0));
        assert_eq!(o.held_back_deadline(), None);

        // No rings attached: nothing is delivered.
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 0x10000)]).unwrap();
        assert!(!o.flush(&mem, &stats));
    }
}
