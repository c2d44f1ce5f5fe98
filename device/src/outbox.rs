// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Device → driver records (spec/svmgpu.md sections 6.2, 6.5 and 6.6): the event backlog and the
//! completion backlog, and their delivery into driver-posted eventq/complq buffers.
//!
//! Records are queued by whoever produces them (control thread, engines, the timer) and
//! delivered whenever buffers are available: right after queuing, and when the driver kicks
//! eventq/complq. Every backlog is bounded:
//! - events: `max_outstanding_faults + 64` droppable events (CONTEXT_ERROR, ENGINE_HANG),
//!   dropped and counted beyond that and reported by EVENTS_LOST; PAGE_FAULT events are
//!   bounded by the outstanding faults, because a fault that ends (answered, dropped) before
//!   its event was delivered withdraws it ([`Outbox::withdraw_fault`]);
//! - completions: by the [`Budget`]: one COMMAND_DONE per asynchronous-command slot, one
//!   JOB_DONE per job slot (`max_contexts × JOB_QUEUE_DEPTH`), at most `FENCE_BACKLOG`
//!   FENCE records; each slot comes back when its record is delivered.
//!
//! Producers only ever take the backlog lock, for a push; delivery — which consumes guest
//! buffers, possibly all unusable — runs under its own lock without holding the backlog's,
//! one delivering thread at a time (others leave a note and return), so no producer waits
//! for the guest.
//!
//! A reset discards the backlogs (after any delivery in progress) and clears the budget;
//! records produced by work of an earlier reset generation are dropped on arrival.
//!
//! Fault injection (spec section 6.16) acts here too: a completion may be queued corrupted,
//! twice, or held back behind the next one (at most one record is held back, and only until
//! its deadline); a droppable event may be dropped as if the backlog were full. Bounds hold:
//! a duplicate is one more record per record, and takes no slot of its own: the original's
//! slot comes back when the original is delivered.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use svmgpu_spec::{
    Completion, CompletionKind, Event, EventsLostEvent, COMPLETION_SIZE, EVENT_BACKLOG_EXTRA,
    EVENT_SIZE,
};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use crate::budget::Budget;
use crate::chain::{write_record, Desc};
use crate::stats::{Counter, Stats};

/// What delivering a completion record gives back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Nothing (an injected duplicate, or a record of an undefined kind).
    None,
    /// An asynchronous-command slot (COMMAND_DONE).
    Async,
    /// A job slot of this context id (JOB_DONE).
    Job(u32),
    /// A FENCE record's place in the backlog.
    Fence,
}

#[derive(Clone, Copy, Debug)]
struct Held {
    rec: Completion,
    slot: Slot,
}

impl Held {
    fn new(rec: Completion) -> Self {
        let slot = match CompletionKind::from_u32(rec.kind) {
            Some(CompletionKind::CommandDone) => Slot::Async,
            Some(CompletionKind::JobDone) => Slot::Job(rec.ctx_id),
            Some(CompletionKind::Fence) => Slot::Fence,
            None => Slot::None,
        };
        Self { rec, slot }
    }
}

/// How an injected completion is queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injected {
    /// Queued as this (corrupted) record; the slot follows the original.
    Corrupt(Completion),
    /// Queued twice.
    Duplicate,
    /// Held back until the next completion is queued, or until the deadline.
    Reorder(Instant),
}

/// The records not yet delivered.
struct Backlog {
    generation: u64,
    events: VecDeque<Event>,
    event_cap: usize,
    /// Droppable events held (the others are bounded elsewhere).
    droppable: usize,
    lost: u64,
    next_event_seq: u64,
    completions: VecDeque<Held>,
    /// A completion held back by `completion-reorder`, and when it goes anyway.
    held_back: Option<(Held, Instant)>,
    eventq: Option<VringRwLock>,
    complq: Option<VringRwLock>,
    /// When the PAGE_FAULT event of each outstanding fault was delivered (the fault-service
    /// statistics, spec 6.18): taken by the fault's reply, removed when it is withdrawn.
    /// At most `event_cap` entries (only injected events, whose ids are never replied to,
    /// could leave entries behind; beyond the cap a delivery is not timed).
    delivered: HashMap<u64, Instant>,
}

impl std::fmt::Debug for Backlog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backlog")
            .field("generation", &self.generation)
            .field("events", &self.events.len())
            .field("completions", &self.completions.len())
            .field("attached", &self.eventq.is_some())
            .finish_non_exhaustive()
    }
}

fn droppable(ev: &Event) -> bool {
    !matches!(ev, Event::PageFault(_) | Event::DeviceReset(_))
}

/// The two backlogs, the rings they drain into, and the budget their records hold.
#[derive(Debug)]
pub struct Outbox {
    backlog: Mutex<Backlog>,
    /// Held by the one thread delivering.
    delivery: Mutex<()>,
    /// Records may be waiting: the delivering thread looks again before it leaves.
    pending: AtomicBool,
    /// Set while the device is paused: nothing is delivered, so no ring moves until the
    /// rings run again (spec 6.14.4), and where each ring stood can tell a restart from a
    /// reset.
    held: AtomicBool,
    budget: Budget,
}

/// Result of offering one record to a ring.
enum Offer {
    Written,
    NoBuffer,
}

impl Outbox {
    /// Empty backlogs for a device with `max_faults` outstanding faults and `max_contexts`
    /// contexts.
    pub fn new(max_faults: u32, max_contexts: u32) -> Self {
        Self {
            backlog: Mutex::new(Backlog {
                generation: 0,
                events: VecDeque::new(),
                event_cap: max_faults as usize + EVENT_BACKLOG_EXTRA as usize,
                droppable: 0,
                lost: 0,
                next_event_seq: 1,
                completions: VecDeque::new(),
                held_back: None,
                eventq: None,
                complq: None,
                delivered: HashMap::new(),
            }),
            delivery: Mutex::new(()),
            pending: AtomicBool::new(false),
            held: AtomicBool::new(false),
            budget: Budget::new(max_contexts),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Backlog> {
        self.backlog.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device's slots.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// The reset generation records are produced for.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Uses these rings from now on (the connection's eventq and complq).
    pub fn attach(&self, eventq: &VringRwLock, complq: &VringRwLock) {
        let mut b = self.lock();
        if b.eventq.is_none() {
            b.eventq = Some(eventq.clone());
            b.complq = Some(complq.clone());
        }
    }

    /// Discards every held record, clears the budget and starts a new generation, once no
    /// record is being delivered. A virtio reset also forgets the rings and restarts
    /// `event_seq` at 1.
    pub fn discard(&self, virtio: bool) {
        let _delivering = self.delivery.lock().unwrap_or_else(|p| p.into_inner());
        let mut b = self.lock();
        b.generation += 1;
        b.events.clear();
        b.droppable = 0;
        b.lost = 0;
        b.completions.clear();
        b.held_back = None;
        b.delivered.clear();
        self.budget.clear();
        if virtio {
            b.eventq = None;
            b.complq = None;
            b.next_event_seq = 1;
        }
    }

    /// Queues an event produced in generation `gen`. DEVICE_RESET and PAGE_FAULT events are
    /// never dropped; others are when the backlog is full.
    pub fn push_event(&self, gen: u64, ev: Event, stats: &Stats) {
        let mut b = self.lock();
        if gen != b.generation {
            return;
        }
        if droppable(&ev) {
            if b.droppable >= b.event_cap {
                b.lost += 1;
                stats.inc(Counter::EventsLost);
                return;
            }
            b.droppable += 1;
        }
        b.events.push_back(ev);
        self.pending.store(true, Ordering::Release);
    }

    /// True if a droppable event would be kept now.
    pub fn event_room(&self) -> bool {
        let b = self.lock();
        b.droppable < b.event_cap
    }

    /// Queues an event of generation `gen` only if the backlog has room (injected events,
    /// which the bounds of section 6.5.3 do not account for); it counts as droppable. False
    /// if it was not queued.
    pub fn push_event_if_room(&self, gen: u64, ev: Event) -> bool {
        let mut b = self.lock();
        if gen != b.generation || b.droppable >= b.event_cap {
            return false;
        }
        b.droppable += 1;
        b.events.push_back(ev);
        self.pending.store(true, Ordering::Release);
        true
    }

    /// Withdraws the undelivered PAGE_FAULT events of fault `fault_id` (the fault ended
    /// before the driver saw it). Injected copies went in as droppable.
    pub fn withdraw_fault(&self, fault_id: u64) {
        let mut b = self.lock();
        let before = b.events.len();
        b.events
            .retain(|e| !matches!(e, Event::PageFault(f) if f.fault_id == fault_id));
        let gone = before - b.events.len();
        // The first was the fault's own event; more are injected duplicates.
        b.droppable = b.droppable.saturating_sub(gone.saturating_sub(1));
        b.delivered.remove(&fault_id);
    }

    /// When the PAGE_FAULT event of fault `fault_id` was delivered (first delivery), if it
    /// was; forgets it (the fault is being answered).
    pub fn take_delivered(&self, fault_id: u64) -> Option<Instant> {
        self.lock().delivered.remove(&fault_id)
    }

    /// Drops an event of generation `gen` as if the backlog were full (`event-overflow`):
    /// counted in `events_lost` and reported by EVENTS_LOST.
    pub fn lose_event(&self, gen: u64, stats: &Stats) {
        let mut b = self.lock();
        if gen == b.generation {
            b.lost += 1;
            stats.inc(Counter::EventsLost);
            self.pending.store(true, Ordering::Release);
        }
    }

    fn queue(&self, b: &mut Backlog, h: Held) {
        if h.slot == Slot::Fence {
            self.budget.hold_fence();
        }
        b.completions.push_back(h);
        self.pending.store(true, Ordering::Release);
    }

    /// Queues a completion produced in generation `gen` (and after it, a completion held
    /// back by `completion-reorder`).
    pub fn push_completion(&self, gen: u64, rec: Completion) {
        let mut b = self.lock();
        if gen != b.generation {
            return;
        }
        self.queue(&mut b, Held::new(rec));
        if let Some((h, _)) = b.held_back.take() {
            self.queue(&mut b, h);
        }
    }

    /// Queues a completion of generation `gen` the way fault injection says.
    pub fn push_injected(&self, gen: u64, rec: Completion, how: Injected) {
        let mut b = self.lock();
        if gen != b.generation {
            return;
        }
        let h = Held::new(rec);
        match how {
            Injected::Corrupt(bad) => self.queue(&mut b, Held { rec: bad, ..h }),
            Injected::Duplicate => {
                self.queue(&mut b, h);
                self.queue(
                    &mut b,
                    Held {
                        slot: Slot::None,
                        ..h
                    },
                );
            }
            Injected::Reorder(deadline) => {
                // One record is held back at a time: an earlier one goes first.
                if let Some((old, _)) = b.held_back.take() {
                    self.queue(&mut b, old);
                }
                b.held_back = Some((h, deadline));
                return;
            }
        }
        if let Some((h, _)) = b.held_back.take() {
            self.queue(&mut b, h);
        }
    }

    /// When the held-back completion goes anyway, if there is one.
    pub fn held_back_deadline(&self) -> Option<Instant> {
        self.lock().held_back.map(|(_, d)| d)
    }

    /// Queues the held-back completion if its deadline is reached; true if it did.
    pub fn release_held_back(&self, now: Instant) -> bool {
        let mut b = self.lock();
        match b.held_back {
            Some((h, d)) if d <= now => {
                b.held_back = None;
                self.queue(&mut b, h);
                true
            }
            _ => false,
        }
    }

    /// Holds every record (`true`) or delivers again (`false`). When holding starts, a
    /// delivery in progress is waited for: after this returns, nothing is written into a ring
    /// until delivery resumes.
    pub fn hold(&self, on: bool) {
        self.held.store(on, Ordering::Release);
        if on {
            drop(self.delivery.lock().unwrap_or_else(|p| p.into_inner()));
        }
    }

    /// Delivers what the rings have buffers for; returns true if a FENCE record left the
    /// backlog (waiting fences may proceed). If another thread is delivering, it does the
    /// work (it looks again before it stops) and this returns at once.
    pub fn flush(&self, mem: &GuestMemoryMmap<()>, stats: &Stats) -> bool {
        self.pending.store(true, Ordering::Release);
        let mut fence_freed = false;
        loop {
            let Ok(_delivering) = self.delivery.try_lock() else {
                return fence_freed;
            };
            while self.pending.swap(false, Ordering::AcqRel) {
                if self.held.load(Ordering::Acquire) {
                    // Delivered when it resumes (which flushes).
                    return fence_freed;
                }
                fence_freed |= self.deliver_completions(mem, stats);
                self.deliver_events(mem, stats);
            }
            drop(_delivering);
            // A producer may have left its note between the last look and the unlock.
            if !self.pending.load(Ordering::Acquire) {
                return fence_freed;
            }
        }
    }

    fn deliver_completions(&self, mem: &GuestMemoryMmap<()>, stats: &Stats) -> bool {
        let (q, generation) = {
            let b = self.lock();
            match &b.complq {
                Some(q) => (q.clone(), b.generation),
                None => return false,
            }
        };
        let mut fence_freed = false;
        let mut used = false;
        loop {
            let Some(h) = self.lock().completions.front().copied() else {
                break;
            };
            match offer(&q, mem, &h.rec.to_bytes(), stats) {
                Offer::Written => {
                    used = true;
                    stats.inc(Counter::CompletionsPosted);
                    let mut b = self.lock();
                    // Only a reset (which waits for this delivery) changes the backlog's
                    // front besides this thread.
                    if b.generation == generation {
                        b.completions.pop_front();
                    }
                    drop(b);
                    match h.slot {
                        Slot::Async => self.budget.give_async(),
                        Slot::Job(ctx) => self.budget.give_jobs(ctx, 1),
                        Slot::Fence => {
                            self.budget.release_fence();
                            fence_freed = true;
                        }
                        Slot::None => {}
                    }
                }
                Offer::NoBuffer => break,
            }
        }
        notify(&q, used);
        fence_freed
    }

    fn deliver_events(&self, mem: &GuestMemoryMmap<()>, stats: &Stats) {
        let Some(q) = self.lock().eventq.clone() else {
            return;
        };
        let mut used = false;
        loop {
            let (ev, seq) = {
                let mut b = self.lock();
                if b.lost > 0 && b.droppable < b.event_cap {
                    let lost = std::mem::take(&mut b.lost);
                    b.droppable += 1;
                    b.events.push_back(Event::EventsLost(EventsLostEvent {
                        lost,
                        ..Default::default()
                    }));
                }
                let Some(ev) = b.events.front().copied() else {
                    break;
                };
                (ev, b.next_event_seq)
            };
            let mut bytes = [0u8; EVENT_SIZE];
            // The buffer is exactly one record long.
            let _ = ev.encode(seq, &mut bytes);
            match offer(&q, mem, &bytes, stats) {
                Offer::Written => {
                    used = true;
                    stats.inc(Counter::EventsPosted);
                    let mut b = self.lock();
                    b.next_event_seq += 1;
                    // Unless the fault it reports ended meanwhile and withdrew it (the
                    // driver then sees an event for a fault that is no longer outstanding,
                    // as with an injected duplicate: its reply gets NOT_FOUND), the front is
                    // still `ev` — a reset waits for this delivery.
                    if b.events.front() == Some(&ev) {
                        b.events.pop_front();
                        if droppable(&ev) {
                            b.droppable = b.droppable.saturating_sub(1);
                        }
                        if let Event::PageFault(f) = ev {
                            if b.delivered.len() < b.event_cap {
                                b.delivered.entry(f.fault_id).or_insert_with(Instant::now);
                            }
                        }
                    }
                }
                Offer::NoBuffer => break,
            }
        }
        notify(&q, used);
    }

    /// Records held (events, completions), for tests and statistics.
    pub fn held(&self) -> (usize, usize) {
        let b = self.lock();
        (
            b.events.len(),
            b.completions.len() + usize::from(b.held_back.is_some()),
        )
    }
}

fn notify(q: &VringRwLock, used: bool) {
    if used {
        if let Err(e) = q.signal_used_queue() {
            crate::warn_limited!("used-buffer notification failed: {e}");
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
                    crate::warn_limited!("add_used failed: {e}");
                }
                return Offer::Written;
            }
            None => {
                stats.inc(Counter::MalformedChains);
                crate::warn_limited!(
                    "a buffer of {} bytes or outside guest RAM was returned unused",
                    bytes.len()
                );
                if let Err(e) = st.add_used(head, 0) {
                    crate::warn_limited!("add_used failed: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use svmgpu_spec::{DeviceResetEvent, PageFaultEvent, FENCE_BACKLOG};

    fn fault(id: u64) -> Event {
        Event::PageFault(PageFaultEvent {
            fault_id: id,
            ..Default::default()
        })
    }

    #[test]
    fn backlog_bounds_and_generations() {
        let stats = Stats::new();
        let o = Outbox::new(1, 4);
        let g = o.generation();
        let ctx_err = Event::ContextError(Default::default());
        for _ in 0..(1 + EVENT_BACKLOG_EXTRA as usize + 10) {
            o.push_event(g, ctx_err, &stats);
        }
        assert_eq!(o.held().0, 65);
        assert_eq!(stats.get(Counter::EventsLost), 10);
        o.push_event(g, fault(1), &stats);
        o.push_event(g, Event::DeviceReset(DeviceResetEvent::default()), &stats);
        assert_eq!(o.held().0, 67, "faults and resets are never dropped");
        assert!(o.budget().take_async());
        o.discard(false);
        assert_eq!((o.held(), o.budget().async_held()), ((0, 0), 0));
        // A record of the old generation is dropped.
        o.push_completion(g, Completion::default());
        assert_eq!(o.held().1, 0);
        let fence = Completion {
            kind: CompletionKind::Fence.as_u32(),
            ..Default::default()
        };
        for _ in 0..FENCE_BACKLOG {
            assert!(o.budget().fence_room());
            o.push_completion(g + 1, fence);
        }
        assert!(!o.budget().fence_room());
        // Injected completions: a duplicate, a corrupt record and one held back.
        let o = Outbox::new(1, 4);
        let g = o.generation();
        let cmd = |seqno| Completion {
            kind: CompletionKind::CommandDone.as_u32(),
            seqno,
            ..Default::default()
        };
        o.push_injected(g, cmd(1), Injected::Duplicate);
        assert_eq!(o.held().1, 2);
        let mut bad = fence;
        bad.seqno = 1 << 63;
        o.push_injected(g, fence, Injected::Corrupt(bad));
        assert!(
            o.lock().completions.iter().any(|h| h.slot == Slot::Fence),
            "the slot of the original"
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
        let slots: Vec<Slot> = o.lock().completions.iter().map(|h| h.slot).collect();
        assert_eq!(
            slots,
            [
                Slot::Async,
                Slot::None,
                Slot::Fence,
                Slot::Async,
                Slot::Async
            ]
        );
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

    #[test]
    fn a_fault_that_ends_withdraws_its_events() {
        let stats = Stats::new();
        let o = Outbox::new(2, 1);
        let g = o.generation();
        o.push_event(g, fault(7), &stats);
        // An injected duplicate goes in as droppable.
        assert!(o.push_event_if_room(g, fault(7)));
        o.push_event(g, fault(8), &stats);
        o.push_event(g, Event::ContextError(Default::default()), &stats);
        assert_eq!(o.held().0, 4);
        o.withdraw_fault(7);
        assert_eq!(o.held().0, 2);
        assert_eq!(o.lock().droppable, 1, "the duplicate's room is back");
        o.withdraw_fault(9);
        assert_eq!(o.held().0, 2);
        // Blind answers to faults nobody saw cannot grow the backlog.
        for id in 100..10_000 {
            o.push_event(g, fault(id), &stats);
            o.withdraw_fault(id);
        }
        assert_eq!(o.held().0, 2);
    }
}
