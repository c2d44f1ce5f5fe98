// SPDX-License-Identifier: GPL-2.0

//! The control queue: commands to the device, each answered with a status.
//!
//! Commands use preallocated slots, each with its own request and response buffer, so a
//! command can be sent from any context (MMU-notifier callbacks included) without
//! allocating. A sender takes a free slot, allocates the command's `seqno`, writes the
//! request, queues the chain and kicks, all under one IRQ-safe spinlock that the queue's
//! interrupt callback also takes to retire chains; so the device sees commands in `seqno`
//! order (which the job fences rely on).
//!
//! Two ways to send:
//!
//! - [`CtrlQueue::call`]: synchronous; waits (uninterruptibly, bounded) for the response.
//! - [`CtrlQueue::start`] / [`CtrlQueue::wait`]: for the spec's asynchronous commands
//!   (`TLB_INVALIDATE`, `CTX_PREEMPT`, `CTX_RESUME`). `start` queues the command and returns
//!   a [`Ticket`] at once; the response (accepted or not) is retired by the interrupt
//!   callback, and the `COMMAND_DONE` completion on complq (carrying the `seqno`) by
//!   [`CtrlQueue::command_done`]. `wait` sleeps until the completion arrived or the
//!   timeout expired. This is the split a two-pass MMU notifier needs: start on every
//!   device first, wait afterwards.
//!
//! A waiter that gives up (timeout) while the device still owns the slot's buffers marks
//! the slot abandoned; it is only reused once the device hands it back (or the device is
//! reset), so the device never writes into memory the driver reuses.

use crate::{virtio::Virtqueue, wire};
use kernel::{
    new_condvar, new_spinlock_irq,
    prelude::*,
    sync::{CondVar, CondVarTimeoutResult, SpinLockIrq, SpinLockIrqGuard},
    time::{delay::fsleep, msecs_to_jiffies, Delta, Instant, Jiffies, Monotonic},
};

/// Number of commands that can be in flight at once.
pub(crate) const SLOTS: usize = 64;
/// Largest request or response a slot carries (GET_STATS answers 232 bytes).
pub(crate) const BUF_SIZE: usize = 256;
/// Asynchronous commands that can be incomplete at once (the spec's limit).
pub(crate) const ASYNC_SLOTS: usize = wire::MAX_ASYNC_OUTSTANDING as usize;
/// How long a command may take before the driver gives up on it.
pub(crate) const TIMEOUT_MS: u32 = 5000;

/// Status the driver reports for asynchronous commands that the device discarded by a
/// reset: the spec says they may be considered complete (the device holds no translation
/// and runs nothing), so [`CtrlQueue::wait`] returns it as success.
pub(crate) const STATUS_RESET: u32 = u32::MAX;

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// The device owns the buffers; a synchronous waiter is waiting.
    InFlight,
    /// The device wrote this many bytes of response.
    Done(u32),
    /// The device owns the buffers, nobody waits: free the slot when it comes back.
    Abandoned,
    /// An asynchronous command: the response goes to this entry of the async table.
    Async(u16),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AsyncState {
    Free,
    /// Sent; waiting for the response and the `COMMAND_DONE`.
    Pending,
    /// Completed (or refused) with `status`; freed when its last waiter collected it.
    Done,
}

/// An asynchronous command: its outcome and how many [`Ticket`]s wait for it. An entry
/// is freed when it is `Done` and no ticket is left (a waiter that gave up leaves the
/// entry to be freed by the completion, or by the reset that discards the command).
#[derive(Clone, Copy)]
struct AsyncEntry {
    state: AsyncState,
    seqno: u64,
    status: u32,
    value: u64,
    waiters: u32,
}

impl AsyncEntry {
    const FREE: Self = Self {
        state: AsyncState::Free,
        seqno: 0,
        status: 0,
        value: 0,
        waiters: 0,
    };
}

struct Inner {
    vq: Option<Virtqueue>,
    /// No new command is accepted (the device is going away); waiters fail with ENODEV.
    closed: bool,
    states: [SlotState; SLOTS],
    /// Slot `i` owns `bufs[2 * i * BUF_SIZE..][..BUF_SIZE]` (request) and the next
    /// `BUF_SIZE` bytes (response). Never resized, so the device's addresses stay valid.
    bufs: KVec<u8>,
    asyncs: KVec<AsyncEntry>,
    next_seqno: u64,
    /// `COMMAND_DONE` completions that matched no incomplete command (corrupted seqno,
    /// duplicated, or for a command a reset discarded).
    bogus_done: u64,
    /// Used chains whose token matched no slot in flight.
    bogus_chains: u64,
    /// Requests answered `RESETTING` and sent again.
    resetting_retries: u64,
}

/// Counters of the control queue (debugfs).
#[derive(Clone, Copy, Default)]
pub(crate) struct CtrlCounters {
    pub(crate) bogus_command_done: u64,
    pub(crate) bogus_chains: u64,
    pub(crate) resetting_retries: u64,
}

/// Called with the seqno a request gets, under the queue's lock before the request is on
/// the ring (so before the device can answer it). If the request is not accepted, its
/// poster tells the hook's owner (job submission: `Fences::end_submit`).
pub(crate) trait SeqnoHook {
    /// The request is about to be sent with `seqno`; false: do not send it
    /// ([`CtrlQueue::post`] fails with `ENOBUFS`).
    fn register(&self, seqno: u64) -> bool;
}

/// A synchronous command sent by [`CtrlQueue::post`]; give it to [`CtrlQueue::collect`].
#[must_use = "the response of a posted command must be collected"]
pub(crate) struct Posted {
    idx: usize,
    seqno: u64,
}

/// The reply to a synchronous command.
pub(crate) struct Reply {
    /// The response status (`wire::Status`).
    pub(crate) status: u32,
    /// The request's `seqno`.
    pub(crate) seqno: u64,
}

impl Reply {
    /// `Ok` for status OK, else the errno the driver uses for device refusals.
    pub(crate) fn ok(&self) -> Result<u64> {
        if self.status == wire::Status::Ok.as_u32() {
            Ok(self.seqno)
        } else {
            Err(status_to_errno(self.status))
        }
    }
}

/// Maps a device status to the errno ioctls report for it.
pub(crate) fn status_to_errno(status: u32) -> Error {
    use wire::Status as S;
    match S::from_u32(status) {
        Some(S::Ok) => EINVAL,
        Some(S::Busy) => EBUSY,
        Some(S::NoResources) => ENOMEM,
        Some(S::Timeout) => ETIMEDOUT,
        Some(S::Resetting) => EAGAIN,
        _ => EIO,
    }
}

/// An asynchronous command in flight, one per waiter; give it to [`CtrlQueue::wait`].
#[must_use = "an asynchronous command must be waited for"]
pub(crate) struct Ticket {
    idx: u16,
    seqno: u64,
}

impl Ticket {
    /// The command's seqno (its place in the control queue's order).
    pub(crate) fn seqno(&self) -> u64 {
        self.seqno
    }

    /// What names the command for [`CtrlQueue::join`].
    pub(crate) fn id(&self) -> TicketId {
        TicketId {
            idx: self.idx,
            seqno: self.seqno,
        }
    }
}

/// The name of an asynchronous command, kept to [`CtrlQueue::join`] it later (not a
/// waiter itself).
#[derive(Clone, Copy)]
pub(crate) struct TicketId {
    idx: u16,
    seqno: u64,
}

/// The outcome of an asynchronous command.
#[derive(Clone, Copy)]
pub(crate) struct AsyncDone {
    /// The status of the response if the command was refused, else of its `COMMAND_DONE`;
    /// [`STATUS_RESET`] if a reset discarded it.
    pub(crate) status: u32,
    /// The completion's `value` (entries dropped, for `TLB_INVALIDATE`).
    #[allow(dead_code)]
    pub(crate) value: u64,
}

impl AsyncDone {
    /// Whether the command's guarantees hold: status OK, discarded by a reset, or refused
    /// `NOT_FOUND` (the context or ASID does not exist on the device, e.g. a hung context
    /// the driver destroyed: nothing of it can run or translate).
    pub(crate) fn succeeded(&self) -> bool {
        self.status == wire::Status::Ok.as_u32()
            || self.status == STATUS_RESET
            || self.status == wire::Status::NotFound.as_u32()
    }
}

/// The control queue of one device.
#[pin_data]
pub(crate) struct CtrlQueue {
    #[pin]
    inner: SpinLockIrq<Inner>,
    #[pin]
    done: CondVar,
}

impl CtrlQueue {
    pub(crate) fn new() -> Result<impl PinInit<Self>> {
        let bufs = KVec::from_elem(0u8, 2 * SLOTS * BUF_SIZE, GFP_KERNEL)?;
        let asyncs = KVec::from_elem(AsyncEntry::FREE, ASYNC_SLOTS, GFP_KERNEL)?;
        let inner = Inner {
            vq: None,
            closed: false,
            states: [SlotState::Free; SLOTS],
            bufs,
            asyncs,
            next_seqno: 1,
            bogus_done: 0,
            bogus_chains: 0,
            resetting_retries: 0,
        };
        Ok(pin_init!(Self {
            inner <- new_spinlock_irq!(inner, "svmgpu_ctrl"),
            done <- new_condvar!("svmgpu_ctrl_done"),
        }))
    }

    /// The queue's counters.
    pub(crate) fn counters(&self) -> CtrlCounters {
        let inner = self.inner.lock();
        CtrlCounters {
            bogus_command_done: inner.bogus_done,
            bogus_chains: inner.bogus_chains,
            resetting_retries: inner.resetting_retries,
        }
    }

    /// Whether the queue refuses commands: the device was stopped by a virtio reset
    /// (removal, or given up after a failed `RESET`) and its buffers retired. Only
    /// [`CtrlQueue::detach`] closes it, after that reset: closed implies stopped.
    pub(crate) fn is_closed(&self) -> bool {
        self.inner.lock().closed
    }

    /// The last seqno handed out.
    pub(crate) fn last_seqno(&self) -> u64 {
        self.inner.lock().next_seqno - 1
    }

    /// Gives the queue its virtqueue, once found.
    pub(crate) fn attach(&self, vq: Virtqueue) {
        self.inner.lock().vq = Some(vq);
    }

    /// Forgets the virtqueue after a device reset: the device owns no buffer any more, so
    /// every slot is retired and every waiter fails with `ENODEV`.
    pub(crate) fn detach(&self) -> Option<Virtqueue> {
        let mut inner = self.inner.lock();
        inner.closed = true;
        for state in inner.states.iter_mut() {
            *state = match *state {
                SlotState::InFlight => SlotState::Done(0),
                SlotState::Abandoned | SlotState::Async(_) => SlotState::Free,
                s => s,
            };
        }
        let vq = inner.vq.take();
        drop(inner);
        self.done.notify_all();
        vq
    }

    /// After a `RESET` command or a device-initiated reset: every incomplete asynchronous
    /// command was discarded and counts as complete ([`STATUS_RESET`]).
    pub(crate) fn reset_done(&self) {
        let mut inner = self.inner.lock();
        for e in inner.asyncs.iter_mut() {
            // seqno 0: reserved by a sender still waiting for a slot, not sent yet.
            if e.state == AsyncState::Pending && e.seqno != 0 {
                e.state = AsyncState::Done;
                e.status = STATUS_RESET;
                if e.waiters == 0 {
                    *e = AsyncEntry::FREE;
                }
            }
        }
        drop(inner);
        self.done.notify_all();
    }

    /// Takes a free slot (waiting for one if `may_sleep`), allocates a seqno, writes the
    /// request and queues it. Returns the slot and the seqno.
    fn send(
        &self,
        inner: &mut SpinLockIrqGuard<'_, Inner>,
        opcode: wire::Opcode,
        body: &[u8],
        resp_len: usize,
        may_sleep: bool,
        state: impl FnOnce(u64) -> Result<SlotState>,
    ) -> Result<(usize, u64)> {
        let req_len = wire::CtrlHeader::SIZE + body.len();
        if req_len > BUF_SIZE || resp_len > BUF_SIZE {
            return Err(EINVAL);
        }
        let mut remaining: Jiffies = msecs_to_jiffies(TIMEOUT_MS);
        let idx = loop {
            if inner.closed || inner.vq.is_none() {
                return Err(ENODEV);
            }
            if let Some(idx) = inner.states.iter().position(|s| *s == SlotState::Free) {
                break idx;
            }
            if !may_sleep {
                return Err(EBUSY);
            }
            match self.done.wait_timeout(inner, remaining) {
                CondVarTimeoutResult::Woken { jiffies } => remaining = jiffies,
                _ => return Err(EBUSY),
            }
        };
        let seqno = inner.next_seqno;
        let slot_state = state(seqno)?;
        let Inner {
            vq,
            states,
            bufs,
            next_seqno,
            ..
        } = &mut **inner;
        let vq = vq.as_mut().ok_or(ENODEV)?;
        let (reqbuf, respbuf) = bufs[2 * idx * BUF_SIZE..][..2 * BUF_SIZE].split_at_mut(BUF_SIZE);
        wire::CtrlHeader {
            opcode: opcode.as_u32(),
            flags: 0,
            seqno,
        }
        .encode(reqbuf)
        .ok_or(EINVAL)?;
        reqbuf[wire::CtrlHeader::SIZE..req_len].copy_from_slice(body);
        respbuf[..resp_len].fill(0);
        // SAFETY: The slot's buffers live in `bufs`, which is never resized and only freed
        // after the device was reset; the slot is not reused until the chain comes back or
        // the device is reset (`detach`).
        unsafe { vq.add_chain(&reqbuf[..req_len], &mut respbuf[..resp_len], idx + 1)? };
        states[idx] = slot_state;
        *next_seqno += 1;
        vq.kick();
        Ok((idx, seqno))
    }

    /// Sends a synchronous command and waits up to [`TIMEOUT_MS`] for its response; the
    /// response body (if any, status OK) is copied into `resp_body`.
    ///
    /// A `RESETTING` answer (a device-initiated reset is in progress, spec 6.14.1) is not
    /// returned: the request is sent again (every 2 ms, for at most [`TIMEOUT_MS`]), as the
    /// spec asks; only then is `RESETTING` returned (`EAGAIN`).
    pub(crate) fn call(
        &self,
        opcode: wire::Opcode,
        body: &[u8],
        resp_body: &mut [u8],
    ) -> Result<Reply> {
        let t0 = Instant::<Monotonic>::now();
        loop {
            let posted = self.post(
                opcode,
                body,
                resp_body.len(),
                None,
                &Default::default(),
                true,
            )?;
            let r = self.collect(posted, resp_body);
            let retry = matches!(&r, Ok(reply) if reply.status == wire::Status::Resetting.as_u32());
            if !retry || t0.elapsed().as_millis() >= i64::from(TIMEOUT_MS) {
                return r;
            }
            self.note_resetting_retry();
            fsleep(Delta::from_millis(2));
        }
    }

    /// Sends a synchronous command without waiting for its response: the first half of
    /// [`CtrlQueue::call`], for callers that must not wait under a lock (EXEC posts
    /// its `JOB_SUBMIT` under the VM's notifier lock and collects the answer after it).
    /// With `may_sleep` false and every slot in use, fails with `EBUSY` (see
    /// [`CtrlQueue::wait_for_slot`]). `registered` learns the seqno `hook` registered.
    pub(crate) fn post(
        &self,
        opcode: wire::Opcode,
        body: &[u8],
        resp_body_len: usize,
        hook: Option<&dyn SeqnoHook>,
        registered: &core::cell::Cell<Option<u64>>,
        may_sleep: bool,
    ) -> Result<Posted> {
        let resp_len = wire::RespHeader::SIZE + resp_body_len;
        let mut inner = self.inner.lock();
        let (idx, seqno) =
            self.send(
                &mut inner,
                opcode,
                body,
                resp_len,
                may_sleep,
                |seqno| match hook {
                    // The hook has no room: not a lack of command slots.
                    Some(h) if !h.register(seqno) => Err(ENOBUFS),
                    Some(_) => {
                        registered.set(Some(seqno));
                        Ok(SlotState::InFlight)
                    }
                    None => Ok(SlotState::InFlight),
                },
            )?;
        Ok(Posted { idx, seqno })
    }

    /// Waits (uninterruptibly, at most [`TIMEOUT_MS`]) for the response of a command
    /// [`CtrlQueue::post`] sent; its body (status OK) is copied into `resp_body`.
    pub(crate) fn collect(&self, posted: Posted, resp_body: &mut [u8]) -> Result<Reply> {
        let Posted { idx, seqno } = posted;
        let mut inner = self.inner.lock();
        let mut remaining: Jiffies = msecs_to_jiffies(TIMEOUT_MS);
        loop {
            if let SlotState::Done(len) = inner.states[idx] {
                // Decode before the slot is freed: another sender may reuse its buffers.
                let reply = Self::decode_reply(&inner, idx, len, seqno, resp_body);
                inner.states[idx] = SlotState::Free;
                drop(inner);
                self.done.notify_all();
                return reply;
            }
            if inner.closed {
                inner.states[idx] = SlotState::Abandoned;
                return Err(ENODEV);
            }
            match self.done.wait_timeout(&mut inner, remaining) {
                CondVarTimeoutResult::Woken { jiffies } => remaining = jiffies,
                _ => {
                    inner.states[idx] = SlotState::Abandoned;
                    return Err(ETIMEDOUT);
                }
            }
        }
    }

    /// Counts a request answered `RESETTING` that its sender will send again.
    pub(crate) fn note_resetting_retry(&self) {
        self.inner.lock().resetting_retries += 1;
    }

    /// Waits (at most [`TIMEOUT_MS`]) until a command slot is free, for a caller whose
    /// non-sleeping [`CtrlQueue::post`] failed with `EBUSY` and who retries after releasing
    /// its locks. `ENODEV` once the queue is closed.
    pub(crate) fn wait_for_slot(&self) -> Result {
        let mut inner = self.inner.lock();
        let mut remaining: Jiffies = msecs_to_jiffies(TIMEOUT_MS);
        loop {
            if inner.closed || inner.vq.is_none() {
                return Err(ENODEV);
            }
            if inner.states.contains(&SlotState::Free) {
                return Ok(());
            }
            match self.done.wait_timeout(&mut inner, remaining) {
                CondVarTimeoutResult::Woken { jiffies } => remaining = jiffies,
                _ => return Err(EBUSY),
            }
        }
    }

    fn decode_reply(
        inner: &Inner,
        idx: usize,
        len: u32,
        seqno: u64,
        resp_body: &mut [u8],
    ) -> Result<Reply> {
        if inner.vq.is_none() {
            return Err(ENODEV);
        }
        let off = (2 * idx + 1) * BUF_SIZE;
        let resp = &inner.bufs[off..off + BUF_SIZE];
        let len = (len as usize).min(wire::RespHeader::SIZE + resp_body.len());
        let hdr = wire::RespHeader::decode(&resp[..len]).ok_or(EIO)?;
        if hdr.seqno != seqno {
            return Err(EIO);
        }
        if hdr.status == wire::Status::Ok.as_u32() && !resp_body.is_empty() {
            if len < wire::RespHeader::SIZE + resp_body.len() {
                return Err(EIO);
            }
            resp_body.copy_from_slice(&resp[wire::RespHeader::SIZE..len]);
        }
        Ok(Reply {
            status: hdr.status,
            seqno,
        })
    }

    /// Starts an asynchronous command without waiting for it. With `may_sleep`, waits (at
    /// most [`TIMEOUT_MS`] each) for a free asynchronous entry and a free slot when all
    /// are in use (back-pressure: the device completes commands on its own); otherwise
    /// fails with `EBUSY` (the caller defers the command to where it may sleep). Never
    /// allocates.
    pub(crate) fn start(
        &self,
        opcode: wire::Opcode,
        body: &[u8],
        may_sleep: bool,
    ) -> Result<Ticket> {
        let mut inner = self.inner.lock();
        let mut remaining: Jiffies = msecs_to_jiffies(TIMEOUT_MS);
        // Reserve an entry first: `send` may drop the lock while it waits for a slot.
        let aidx = loop {
            if inner.closed {
                return Err(ENODEV);
            }
            if let Some(i) = inner
                .asyncs
                .iter()
                .position(|e| e.state == AsyncState::Free)
            {
                break i;
            }
            if !may_sleep {
                return Err(EBUSY);
            }
            match self.done.wait_timeout(&mut inner, remaining) {
                CondVarTimeoutResult::Woken { jiffies } => remaining = jiffies,
                _ => return Err(EBUSY),
            }
        };
        inner.asyncs[aidx] = AsyncEntry {
            state: AsyncState::Pending,
            waiters: 1,
            ..AsyncEntry::FREE
        };
        let sent = self.send(
            &mut inner,
            opcode,
            body,
            wire::RespHeader::SIZE,
            may_sleep,
            |_| Ok(SlotState::Async(aidx as u16)),
        );
        match sent {
            // Still under the lock that the interrupt callback takes: nothing can have
            // retired the command before its seqno is recorded.
            Ok((_, seqno)) => {
                inner.asyncs[aidx].seqno = seqno;
                Ok(Ticket {
                    idx: aidx as u16,
                    seqno,
                })
            }
            Err(e) => {
                inner.asyncs[aidx] = AsyncEntry::FREE;
                drop(inner);
                self.done.notify_all();
                Err(e)
            }
        }
    }

    /// One more waiter for the asynchronous command `id` (e.g. a second invalidation that
    /// needs a preemption another one started): `None` if it is no longer tracked (its
    /// last waiter collected it), in which case the caller starts a new one.
    pub(crate) fn join(&self, id: TicketId) -> Option<Ticket> {
        let mut inner = self.inner.lock();
        let e = inner.asyncs.get_mut(id.idx as usize)?;
        if e.seqno != id.seqno || e.state == AsyncState::Free || e.waiters == 0 {
            return None;
        }
        e.waiters += 1;
        Some(Ticket {
            idx: id.idx,
            seqno: id.seqno,
        })
    }

    /// Drops one waiter of entry `idx` (under the lock); frees the entry once it is done
    /// and nobody waits for it any more.
    fn put_waiter(inner: &mut Inner, idx: usize) {
        let e = &mut inner.asyncs[idx];
        e.waiters = e.waiters.saturating_sub(1);
        if e.waiters == 0 && e.state == AsyncState::Done {
            *e = AsyncEntry::FREE;
        }
    }

    /// Waits (uninterruptibly, at most [`TIMEOUT_MS`]) for an asynchronous command.
    /// `ETIMEDOUT` if it did not complete in time, `ENODEV` if the device went away.
    pub(crate) fn wait(&self, ticket: Ticket) -> Result<AsyncDone> {
        let idx = ticket.idx as usize;
        let mut inner = self.inner.lock();
        let mut remaining: Jiffies = msecs_to_jiffies(TIMEOUT_MS);
        let r = loop {
            let e = inner.asyncs[idx];
            if e.seqno != ticket.seqno || e.state == AsyncState::Free {
                // Not reachable: an entry with a waiter is never freed.
                break Err(EINVAL);
            }
            if e.state == AsyncState::Done {
                break Ok(AsyncDone {
                    status: e.status,
                    value: e.value,
                });
            }
            if inner.closed {
                break Err(ENODEV);
            }
            match self.done.wait_timeout(&mut inner, remaining) {
                CondVarTimeoutResult::Woken { jiffies } => remaining = jiffies,
                _ => break Err(ETIMEDOUT),
            }
        };
        if !matches!(r, Err(e) if e == EINVAL) {
            Self::put_waiter(&mut inner, idx);
        }
        drop(inner);
        self.done.notify_all();
        r
    }

    /// Marks the asynchronous entry `aidx` done with `status` (`seqno` must match); frees
    /// it if nobody waits (the waiters gave up).
    fn finish_async(inner: &mut Inner, aidx: usize, seqno: u64, status: u32, value: u64) -> bool {
        let Some(e) = inner.asyncs.get_mut(aidx) else {
            return false;
        };
        if e.seqno != seqno {
            return false;
        }
        match e.state {
            AsyncState::Pending => {
                e.state = AsyncState::Done;
                e.status = status;
                e.value = value;
                if e.waiters == 0 {
                    *e = AsyncEntry::FREE;
                }
                true
            }
            // Already completed: the response of an accepted command after its completion.
            AsyncState::Done => true,
            AsyncState::Free => false,
        }
    }

    /// A `COMMAND_DONE` completion arrived (interrupt context).
    pub(crate) fn command_done(&self, seqno: u64, status: u32, value: u64) {
        let mut inner = self.inner.lock();
        let aidx = inner
            .asyncs
            .iter()
            .position(|e| e.seqno == seqno && e.state == AsyncState::Pending);
        match aidx {
            Some(aidx) => {
                Self::finish_async(&mut inner, aidx, seqno, status, value);
            }
            // The spec: ignore completions that match nothing outstanding.
            None => inner.bogus_done += 1,
        }
        drop(inner);
        self.done.notify_all();
    }

    /// The queue's interrupt callback: retire every used chain and wake the waiters.
    pub(crate) fn complete(&self) {
        let mut inner = self.inner.lock();
        if inner.vq.is_none() {
            return;
        }
        loop {
            if let Some(vq) = inner.vq.as_mut() {
                vq.disable_cb();
            }
            while let Some((token, len)) = inner.vq.as_mut().and_then(|vq| vq.get_buf()) {
                let idx = token.wrapping_sub(1);
                match inner.states.get(idx).copied() {
                    Some(SlotState::InFlight) => inner.states[idx] = SlotState::Done(len),
                    Some(SlotState::Abandoned) => inner.states[idx] = SlotState::Free,
                    Some(SlotState::Async(aidx)) => {
                        inner.states[idx] = SlotState::Free;
                        let off = (2 * idx + 1) * BUF_SIZE;
                        let n = (len as usize).min(BUF_SIZE);
                        let hdr = wire::RespHeader::decode(&inner.bufs[off..off + n]);
                        let seqno = inner.asyncs[aidx as usize].seqno;
                        match hdr {
                            // Accepted: the COMMAND_DONE completes it.
                            Some(h) if h.status == wire::Status::Ok.as_u32() => {}
                            // Refused (or no answer): no completion follows.
                            other => {
                                let status = other
                                    .map(|h| h.status)
                                    .unwrap_or(wire::Status::Internal.as_u32());
                                Self::finish_async(&mut inner, aidx as usize, seqno, status, 0);
                            }
                        }
                    }
                    _ => inner.bogus_chains += 1,
                }
            }
            let more = inner.vq.as_mut().is_some_and(|vq| !vq.enable_cb());
            if !more {
                break;
            }
        }
        drop(inner);
        self.done.notify_all();
    }
}
