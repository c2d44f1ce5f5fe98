// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The command-stream executor (spec/svmgpu.md section 6.13): fetches, decodes and executes
//! one instruction at a time for a context, with every memory access (instruction fetch
//! included) translated by the engine's MMU. Decoding is `svmgpu_spec::isa::Insn::decode`;
//! this module adds what depends on the batch and on memory.
//!
//! Bulk instructions (FILL, COPY, CHECKSUM) are restartable (spec 6.13.3): they process
//! their range in address order, and when a translation fails they first process every
//! byte before the page that failed, record that progress (and CHECKSUM's running hash) in
//! the context's [`ExecState`], and continue from there after the fault is resolved — so
//! a job makes progress with only its current page mapped, as a copy engine does. Every
//! other instruction translates what it touches before writing any byte, so a faulting one
//! has no effect and is simply executed again.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use svmgpu_spec::isa::{fnv1a64_update, insn_qwords, Insn, FNV1A64_OFFSET};
use svmgpu_spec::{AccessKind, FaultReason, Status, LOOP_MAX_DEPTH};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, VolatileMemory,
};

use crate::context::ExecState;
use crate::mmu::{Fault, Mmu, Space};

/// How often a WAIT polls memory while its condition is false.
pub const WAIT_POLL_NS: u64 = 2_000;
/// Longest interval between two polls of a WAIT.
pub const WAIT_POLL_MAX_NS: u64 = 1_000_000;

/// The interval before the next poll of a WAIT that has waited `waited_ns` so far: an
/// eighth of that (so a semaphore is seen at most 12.5 % later than it could have been),
/// from [`WAIT_POLL_NS`] up to [`WAIT_POLL_MAX_NS`] — a WAIT that waits for long costs
/// a thousand polls a second, not a host core.
pub fn wait_poll_ns(waited_ns: u64) -> u64 {
    (waited_ns / 8).clamp(WAIT_POLL_NS, WAIT_POLL_MAX_NS)
}

/// Outcome of one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The instruction completed; continue.
    Next,
    /// END: the job completed.
    End,
    /// The job failed with a job status; `address` is the data address involved, or 0.
    Error {
        /// Job status.
        status: Status,
        /// Data address.
        address: u64,
    },
    /// A translation failed; the instruction did nothing and will be re-executed.
    Fault(Fault),
    /// A FENCE with NOTIFY wrote its value: post a FENCE completion with it.
    Fence(u64),
    /// A FENCE with NOTIFY cannot post (completion backlog full); it did nothing.
    FenceBlocked,
    /// WAIT/DELAY is not finished: it needs about this much more engine time. The engine
    /// adds the time it spends to `ExecState::partial_ns` and steps again.
    Sleep(u64),
}

/// What an executed instruction does to the pc.
enum Flow {
    /// Completed: the pc moves past it.
    Advance,
    /// FENCE with NOTIFY completed: the pc moves past it and a completion is due.
    AdvanceFence(u64),
    /// LOOP jumped: the pc is already set.
    Jump,
    /// The pc stays (END, an error, an unfinished WAIT/DELAY, a blocked FENCE).
    Stay(Step),
}

/// A physically contiguous piece of a virtual range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seg {
    va: u64,
    pa: u64,
    len: u64,
}

/// Records the progress of a bulk instruction: `done` bytes of its range are processed.
/// With a fault, the instruction stays (the fault is returned) and continues from `done`
/// after it is resolved.
fn progress(st: &mut ExecState, done: u64, fault: Option<Fault>) -> Result<(), Fault> {
    st.partial_bytes = done;
    match fault {
        Some(f) => Err(f),
        None => Ok(()),
    }
}

/// Checks that every segment is a slice of guest RAM before anything is written; a segment
/// that is not (guest memory changed under a cached translation) and everything after it
/// are dropped from `segs`, and its first byte becomes the failure: the prefix before it is
/// still processed (spec 6.13.3). Returns the processable length and the failure.
fn validated(
    mem: &GuestMemoryMmap<()>,
    segs: &mut Vec<Seg>,
    ok: u64,
    fault: Option<Fault>,
    access: AccessKind,
) -> (u64, Option<Fault>) {
    let mut covered = 0u64;
    for (i, s) in segs.iter().enumerate() {
        if mem.get_slice(GuestAddress(s.pa), s.len as usize).is_err() {
            let f = bad_page(s.va, access);
            segs.truncate(i);
            return (covered, Some(f));
        }
        covered += s.len;
    }
    (ok, fault)
}

/// Shortens a segment list to its first `len` bytes.
fn trim(segs: &mut Vec<Seg>, len: u64) {
    let mut left = len;
    let mut keep = 0;
    for s in segs.iter_mut() {
        if left == 0 {
            break;
        }
        s.len = s.len.min(left);
        left -= s.len;
        keep += 1;
    }
    segs.truncate(keep);
}

/// Bytes moved through a bounce buffer at a time (FILL pattern, CHECKSUM input).
const CHUNK: usize = 4096;

/// Reusable buffers of one engine's executor.
#[derive(Debug)]
pub struct Executor {
    src: Vec<Seg>,
    dst: Vec<Seg>,
    buf: Vec<u8>,
}

impl Default for Executor {
    fn default() -> Self {
        Self::new()
    }
}

fn bad_page(va: u64, access: AccessKind) -> Fault {
    Fault {
        va,
        access,
        reason: FaultReason::BadPageAddress,
        level: 0,
    }
}

fn err(status: Status, address: u64) -> Step {
    Step::Error { status, address }
}

impl Executor {
    /// An executor with empty buffers.
    pub fn new() -> Self {
        Self {
            src: Vec::with_capacity(256),
            dst: Vec::with_capacity(256),
            buf: vec![0; CHUNK],
        }
    }

    /// Executes the instruction at `st.pc` (or continues a WAIT/DELAY). `fence_room` says
    /// whether a FENCE with NOTIFY may post now.
    pub fn step(
        &mut self,
        mmu: &mut Mmu,
        sp: &Space<'_>,
        st: &mut ExecState,
        fence_room: bool,
    ) -> Step {
        let (insn, len) = match self.fetch(mmu, sp, st) {
            Ok(x) => x,
            Err(step) => return step,
        };
        let next = st.pc + 8 * len as u64;
        let done = self.execute(mmu, sp, st, insn, fence_room);
        if let Err(f) = done {
            if f.reason == FaultReason::BadPageAddress {
                // The page stopped being guest RAM under a cached translation: the retry
                // after RESUME walks afresh (spec 6.12.3).
                mmu.forget(sp.asid, f.va);
            }
        }
        match done {
            Ok(Flow::Advance) => {
                st.pc = next;
                st.clear_partial();
                Step::Next
            }
            Ok(Flow::AdvanceFence(v)) => {
                st.pc = next;
                st.clear_partial();
                Step::Fence(v)
            }
            Ok(Flow::Jump) => Step::Next,
            Ok(Flow::Stay(step)) => step,
            Err(f) => Step::Fault(f),
        }
    }

    /// Fetches and decodes the instruction at `st.pc`; returns it and its length in qwords.
    fn fetch(
        &mut self,
        mmu: &mut Mmu,
        sp: &Space<'_>,
        st: &ExecState,
    ) -> Result<(Insn, usize), Step> {
        let pc = st.pc;
        let end = st.job.batch_end();
        if pc.checked_add(8).is_none_or(|e| e > end) {
            return Err(err(Status::JobBatchOverrun, 0));
        }
        let mut w = [0u64; 4];
        w[0] = self.fetch_qword(mmu, sp, pc)?;
        let Some(n) = insn_qwords(w[0]) else {
            return Err(err(Status::JobInvalidInstruction, 0));
        };
        if pc + 8 * n as u64 > end {
            return Err(err(Status::JobBatchOverrun, 0));
        }
        for (i, q) in w.iter_mut().enumerate().take(n).skip(1) {
            *q = self.fetch_qword(mmu, sp, pc + 8 * i as u64)?;
        }
        let insn = Insn::decode(&w[..n]).map_err(|e| err(e.job_status(), 0))?;
        Ok((insn, n))
    }

    fn fetch_qword(&mut self, mmu: &mut Mmu, sp: &Space<'_>, va: u64) -> Result<u64, Step> {
        let t = mmu
            .translate(sp, va, AccessKind::Exec)
            .map_err(Step::Fault)?;
        sp.mem
            .load::<u64>(GuestAddress(t.pa), Ordering::Acquire)
            .map_err(|_| Step::Fault(bad_page(va, AccessKind::Exec)))
    }

    fn execute(
        &mut self,
        mmu: &mut Mmu,
        sp: &Space<'_>,
        st: &mut ExecState,
        insn: Insn,
        fence_room: bool,
    ) -> Result<Flow, Fault> {
        let mem = sp.mem;
        match insn {
            Insn::Nop => Ok(Flow::Advance),
            Insn::End => Ok(Flow::Stay(Step::End)),
            Insn::Store { size64, va, value } => {
                let pa = mmu.translate(sp, va, AccessKind::Write)?.pa;
                let r = if size64 {
                    mem.store(value, GuestAddress(pa), Ordering::Release)
                } else {
                    // Decode checked that bits 63:32 are zero.
                    mem.store(value as u32, GuestAddress(pa), Ordering::Release)
                };
                r.map_err(|_| bad_page(va, AccessKind::Write))?;
                Ok(Flow::Advance)
            }
            Insn::Fill { va, len, pattern } => {
                let done = st.partial_bytes.min(len);
                let (ok, fault) = translate_prefix(
                    mmu,
                    sp,
                    va + done,
                    len - done,
                    AccessKind::Write,
                    &mut self.dst,
                );
                let pat = pattern.to_le_bytes();
                // `done` is a multiple of 4 (FILL's va and len are 4-aligned, and every
                // prefix it stops at ends on a page boundary): the pattern stays in phase.
                for (i, b) in self.buf.iter_mut().enumerate() {
                    *b = pat[i % 4];
                }
                let (ok, fault) = validated(mem, &mut self.dst, ok, fault, AccessKind::Write);
                for s in &self.dst {
                    let slice = mem
                        .get_slice(GuestAddress(s.pa), s.len as usize)
                        .map_err(|_| bad_page(s.va, AccessKind::Write))?;
                    let mut off = 0usize;
                    while off < slice.len() {
                        let n = (slice.len() - off).min(CHUNK);
                        let part = slice
                            .offset(off)
                            .map_err(|_| bad_page(s.va, AccessKind::Write))?;
                        part.copy_from(&self.buf[..n]);
                        off += n;
                    }
                }
                progress(st, done + ok, fault)?;
                Ok(Flow::Advance)
            }
            Insn::Copy { dst, src, len } => {
                let done = st.partial_bytes.min(len);
                let left = len - done;
                let (s_ok, s_fault) =
                    translate_prefix(mmu, sp, src + done, left, AccessKind::Read, &mut self.src);
                // The destination only as far as the source could be translated.
                let (d_ok, d_fault) =
                    translate_prefix(mmu, sp, dst + done, s_ok, AccessKind::Write, &mut self.dst);
                let (s_ok, s_fault) =
                    validated(mem, &mut self.src, s_ok, s_fault, AccessKind::Read);
                let (d_ok, d_fault) =
                    validated(mem, &mut self.dst, d_ok, d_fault, AccessKind::Write);
                // The part both sides can do; the first failure in range order is reported
                // (the source's when both fail at the same offset).
                let ok = s_ok.min(d_ok);
                let fault = if ok == s_ok { s_fault } else { d_fault };
                trim(&mut self.src, ok);
                trim(&mut self.dst, ok);
                copy_segments(mem, &self.src, &self.dst)?;
                progress(st, done + ok, fault)?;
                Ok(Flow::Advance)
            }
            Insn::AtomicAdd { size64, va, value } => {
                let pa = mmu.translate(sp, va, AccessKind::Atomic)?.pa;
                let bad = bad_page(va, AccessKind::Atomic);
                let slice = mem
                    .get_slice(GuestAddress(pa), if size64 { 8 } else { 4 })
                    .map_err(|_| bad)?;
                if size64 {
                    let a = slice.get_atomic_ref::<AtomicU64>(0).map_err(|_| bad)?;
                    a.fetch_add(value, Ordering::SeqCst);
                } else {
                    let a = slice.get_atomic_ref::<AtomicU32>(0).map_err(|_| bad)?;
                    // Decode checked that bits 63:32 are zero.
                    a.fetch_add(value as u32, Ordering::SeqCst);
                }
                Ok(Flow::Advance)
            }
            Insn::Wait {
                size64,
                op,
                timeout_us,
                va,
                value,
            } => {
                let pa = mmu.translate(sp, va, AccessKind::Read)?.pa;
                let bad = |_| bad_page(va, AccessKind::Read);
                let cur = if size64 {
                    mem.load::<u64>(GuestAddress(pa), Ordering::Acquire)
                        .map_err(bad)?
                } else {
                    u64::from(
                        mem.load::<u32>(GuestAddress(pa), Ordering::Acquire)
                            .map_err(bad)?,
                    )
                };
                if op.eval(cur, value) {
                    return Ok(Flow::Advance);
                }
                let limit = u64::from(timeout_us) * 1000;
                if timeout_us != 0 && st.partial_ns >= limit {
                    return Ok(Flow::Stay(err(Status::JobSemaphoreTimeout, va)));
                }
                Ok(Flow::Stay(Step::Sleep(wait_poll_ns(st.partial_ns))))
            }
            Insn::Loop { count, offset } => Ok(self.do_loop(st, count, offset)),
            Insn::Delay { ns } => {
                let ns = u64::from(ns);
                if st.partial_ns >= ns {
                    Ok(Flow::Advance)
                } else {
                    Ok(Flow::Stay(Step::Sleep(ns - st.partial_ns)))
                }
            }
            Insn::Checksum { src, len, dst } => {
                let done = st.partial_bytes.min(len);
                let mut h = if done == 0 {
                    FNV1A64_OFFSET
                } else {
                    st.partial_hash
                };
                let (ok, fault) = translate_prefix(
                    mmu,
                    sp,
                    src + done,
                    len - done,
                    AccessKind::Read,
                    &mut self.src,
                );
                let (ok, fault) = validated(mem, &mut self.src, ok, fault, AccessKind::Read);
                for s in &self.src {
                    let slice = mem
                        .get_slice(GuestAddress(s.pa), s.len as usize)
                        .map_err(|_| bad_page(s.va, AccessKind::Read))?;
                    let mut off = 0usize;
                    while off < slice.len() {
                        let n = (slice.len() - off).min(CHUNK);
                        let part = slice
                            .offset(off)
                            .map_err(|_| bad_page(s.va, AccessKind::Read))?;
                        let got = part.copy_to(&mut self.buf[..n]);
                        h = fnv1a64_update(h, &self.buf[..got]);
                        off += n;
                    }
                }
                st.partial_hash = h;
                progress(st, done + ok, fault)?;
                // Every byte is hashed (and the hash saved): a fault on the result's page
                // only repeats the store.
                let out = mmu.translate(sp, dst, AccessKind::Write)?.pa;
                mem.store(h, GuestAddress(out), Ordering::Release)
                    .map_err(|_| bad_page(dst, AccessKind::Write))?;
                Ok(Flow::Advance)
            }
            Insn::Fence { notify, va, value } => {
                if notify && !fence_room {
                    return Ok(Flow::Stay(Step::FenceBlocked));
                }
                let pa = mmu.translate(sp, va, AccessKind::Write)?.pa;
                // Every earlier write of the job is visible before the fence value.
                fence(Ordering::SeqCst);
                mem.store(value, GuestAddress(pa), Ordering::Release)
                    .map_err(|_| bad_page(va, AccessKind::Write))?;
                Ok(if notify {
                    Flow::AdvanceFence(value)
                } else {
                    Flow::Advance
                })
            }
        }
    }

    /// LOOP (section 6.13.2): a stack of (address, remaining) of depth 4.
    fn do_loop(&mut self, st: &mut ExecState, count: u32, offset: i64) -> Flow {
        let a = st.pc;
        // offset <= 0 (checked by decode); the target must not precede the batch.
        let target = a.checked_sub(offset.unsigned_abs());
        let Some(target) = target.filter(|t| *t >= st.job.batch_va) else {
            return Flow::Stay(err(Status::JobInvalidInstruction, 0));
        };
        let top = st.depth.checked_sub(1).and_then(|i| st.loops.get_mut(i));
        let remaining = match top {
            Some(e) if e.0 == a => {
                e.1 = e.1.saturating_sub(1);
                e.1
            }
            _ => {
                if st.depth >= LOOP_MAX_DEPTH {
                    return Flow::Stay(err(Status::JobLoopOverflow, 0));
                }
                st.loops[st.depth] = (a, count - 1);
                st.depth += 1;
                count - 1
            }
        };
        if remaining == 0 {
            st.depth -= 1;
            Flow::Advance
        } else {
            st.pc = target;
            Flow::Jump
        }
    }
}

/// Translates the pages of `[va, va + len)` for `access`, in order, into segments of guest
/// RAM, each inside one memory region: pages adjacent in guest-physical addresses are merged
/// only within a region, and a page that spans two regions is split where the first ends
/// (guest RAM may be several regions that meet, e.g. one per NUMA node, and a slice of
/// guest memory cannot cross from one to the next). Stops at the first page that does not
/// translate: returns the bytes translated (`out` covers exactly them) and that page's
/// fault, if any.
fn translate_prefix(
    mmu: &mut Mmu,
    sp: &Space<'_>,
    va: u64,
    len: u64,
    access: AccessKind,
    out: &mut Vec<Seg>,
) -> (u64, Option<Fault>) {
    out.clear();
    let mut off = 0u64;
    while off < len {
        let Some(cur) = va.checked_add(off) else {
            let f = Fault {
                va,
                access,
                reason: FaultReason::VaRange,
                level: 3,
            };
            return (off, Some(f));
        };
        let t = match mmu.translate(sp, cur, access) {
            Ok(t) => t,
            Err(f) => return (off, Some(f)),
        };
        let Some(region) = sp.mem.find_region(GuestAddress(t.pa)) else {
            return (off, Some(bad_page(cur, access)));
        };
        let region_start = region.start_addr().0;
        // The region holds `t.pa`: its end is beyond it.
        let region_left = region_start + region.len() - t.pa;
        let n = t.page_left.min(len - off).min(region_left);
        let same_region = |last: &Seg| last.pa >= region_start;
        match out.last_mut() {
            Some(last) if last.pa + last.len == t.pa && same_region(last) => last.len += n,
            _ => out.push(Seg {
                va: cur,
                pa: t.pa,
                len: n,
            }),
        }
        off += n;
    }
    (len, None)
}

/// Copies between two segment lists covering the same number of bytes.
fn copy_segments(mem: &GuestMemoryMmap<()>, src: &[Seg], dst: &[Seg]) -> Result<(), Fault> {
    let (mut i, mut j) = (0usize, 0usize);
    let (mut si, mut dj) = (0u64, 0u64);
    while let (Some(s), Some(d)) = (src.get(i), dst.get(j)) {
        let n = (s.len - si).min(d.len - dj);
        let from = mem
            .get_slice(GuestAddress(s.pa + si), n as usize)
            .map_err(|_| bad_page(s.va + si, AccessKind::Read))?;
        let to = mem
            .get_slice(GuestAddress(d.pa + dj), n as usize)
            .map_err(|_| bad_page(d.va + dj, AccessKind::Write))?;
        // memmove: overlapping ranges give an unspecified result, never undefined behaviour.
        from.copy_to_volatile_slice(to);
        si += n;
        dj += n;
        if si == s.len {
            i += 1;
            si = 0;
        }
        if dj == d.len {
            j += 1;
            dj = 0;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::Job;
    use crate::mmu::audit::InvalLog;
    use crate::mmu::walker::tests::{ram, Pt};
    use svmgpu_spec::isa::{fnv1a64, header, CompareOp, OP_STORE};
    use svmgpu_spec::pte::Perms;

    const RWX: Perms = Perms {
        writable: true,
        no_exec: false,
    };
    const BATCH: u64 = 0x1_0000;
    const DATA: u64 = 0x8_0000;

    struct T {
        mem: GuestMemoryMmap<()>,
        pt: Pt,
        root: u64,
        log: InvalLog,
        mmu: Mmu,
        exec: Executor,
    }

    impl T {
        fn new() -> Self {
            Self::with_memory(ram())
        }

        /// Batch pages at GPA 0x20_0000.., data pages at 0x30_0000.. (every page 4 KiB).
        fn with_memory(mem: GuestMemoryMmap<()>) -> Self {
            let mut pt = Pt::new();
            for i in 0..16 {
                pt.map_4k(&mem, BATCH + i * 0x1000, 0x20_0000 + i * 0x1000, RWX);
                pt.map_4k(&mem, DATA + i * 0x1000, 0x30_0000 + i * 0x1000, RWX);
            }
            Self {
                mem,
                root: pt.root,
                pt,
                log: InvalLog::new(),
                mmu: Mmu::new(16, 4).unwrap(),
                exec: Executor::new(),
            }
        }

        /// Writes raw qwords as a batch and runs it to the end (simulating WAIT/DELAY time);
        /// returns the final step and the number of steps.
        fn run(&mut self, words: &[u64], fence_room: bool) -> (Step, ExecState, usize) {
            for (i, w) in words.iter().enumerate() {
                self.mem
                    .write_obj(*w, GuestAddress(0x20_0000 + 8 * i as u64))
                    .unwrap();
            }
            let job = Job {
                seqno: 1,
                batch_va: BATCH,
                batch_len: 8 * words.len() as u32,
            };
            let mut st = ExecState::start(job);
            let sp = Space {
                mem: &self.mem,
                asid: 0,
                root: self.root,
                log: &self.log,
                audit: false,
                audit_grace: std::time::Duration::ZERO,
                hook: None,
            };
            for n in 1..10_000 {
                match self.exec.step(&mut self.mmu, &sp, &mut st, fence_room) {
                    Step::Next | Step::Fence(_) => {}
                    Step::Sleep(ns) => st.partial_ns += ns,
                    other => return (other, st, n),
                }
            }
            panic!("did not end");
        }

        /// Writes raw qwords as a batch and returns the state at its start.
        fn start(&mut self, words: &[u64]) -> ExecState {
            for (i, w) in words.iter().enumerate() {
                self.mem
                    .write_obj(*w, GuestAddress(0x20_0000 + 8 * i as u64))
                    .unwrap();
            }
            ExecState::start(Job {
                seqno: 1,
                batch_va: BATCH,
                batch_len: 8 * words.len() as u32,
            })
        }

        /// Runs `st` until the job ends, fails or faults.
        fn resume(&mut self, st: &mut ExecState) -> Step {
            let sp = Space {
                mem: &self.mem,
                asid: 0,
                root: self.root,
                log: &self.log,
                audit: false,
                audit_grace: std::time::Duration::ZERO,
                hook: None,
            };
            for _ in 1..10_000 {
                match self.exec.step(&mut self.mmu, &sp, st, true) {
                    Step::Next | Step::Fence(_) => {}
                    Step::Sleep(ns) => st.partial_ns += ns,
                    other => return other,
                }
            }
            panic!("did not end");
        }

        /// Data page `i` (VA `DATA + i * 4 KiB`, GPA `0x30_0000 + i * 4 KiB`) unmapped, and
        /// out of the TLB (a driver's PTE clear and invalidation).
        fn unmap(&mut self, i: u64) {
            self.pt.set_raw(&self.mem, DATA + i * 0x1000, 0, 0);
            self.mmu.tlb_mut().invalidate(crate::mmu::Scope::Range {
                asid: 0,
                start: DATA + i * 0x1000,
                end: DATA + (i + 1) * 0x1000,
            });
        }

        /// Data page `i` mapped again (to its own physical page).
        fn map(&mut self, i: u64) {
            self.pt
                .map_4k(&self.mem, DATA + i * 0x1000, 0x30_0000 + i * 0x1000, RWX);
        }

        fn words(insns: &[Insn]) -> Vec<u64> {
            insns
                .iter()
                .flat_map(|i| {
                    let (w, n) = i.encode();
                    w[..n].to_vec()
                })
                .collect()
        }

        fn read(&self, va: u64) -> u64 {
            self.mem
                .read_obj(GuestAddress(0x30_0000 + (va - DATA)))
                .unwrap()
        }
    }

    #[test]
    fn loop_counts_and_nesting() {
        let mut t = T::new();
        let add = Insn::AtomicAdd {
            size64: true,
            va: DATA,
            value: 1,
        };
        // count = 1 runs the body once; nested 3 × 5.
        let w = T::words(&[
            add,
            Insn::Loop {
                count: 1,
                offset: -24,
            },
            add,
            Insn::Loop {
                count: 3,
                offset: -24,
            },
            Insn::Loop {
                count: 5,
                offset: -40,
            },
            Insn::End,
        ]);
        let (end, st, _) = t.run(&w, true);
        assert_eq!(end, Step::End);
        assert_eq!(st.depth, 0);
        assert_eq!(t.read(DATA), 1 + 15);
    }

    #[test]
    fn errors_and_bounds() {
        let mut t = T::new();
        // Overrun, truncated instruction, undefined opcode, LOOP before the batch.
        let (e, _, _) = t.run(&T::words(&[Insn::Nop]), true);
        assert_eq!(e, err(Status::JobBatchOverrun, 0));
        let (e, _, _) = t.run(&[header(OP_STORE, 0, 0, 0)], true);
        assert_eq!(e, err(Status::JobBatchOverrun, 0));
        let (e, _, _) = t.run(&[0xff], true);
        assert_eq!(e, err(Status::JobInvalidInstruction, 0));
        let w = T::words(&[Insn::Loop {
            count: 2,
            offset: -8,
        }]);
        let (e, _, _) = t.run(&w, true);
        assert_eq!(e, err(Status::JobInvalidInstruction, 0));
        // WAIT timeout (simulated time), DELAY completes, blocked FENCE.
        let w = T::words(&[
            Insn::Delay { ns: 5000 },
            Insn::Wait {
                size64: false,
                op: CompareOp::Ne,
                timeout_us: 10,
                va: DATA + 0x100,
                value: 0,
            },
        ]);
        let (e, _, _) = t.run(&w, true);
        assert_eq!(e, err(Status::JobSemaphoreTimeout, DATA + 0x100));
        let w = T::words(&[Insn::Fence {
            notify: true,
            va: DATA,
            value: 1,
        }]);
        let (e, st, _) = t.run(&w, false);
        assert_eq!((e, st.pc), (Step::FenceBlocked, BATCH));
        // A fault leaves the pc on the instruction; a bulk instruction has done the part
        // before the faulting page (and recorded it), nothing after.
        let w = T::words(&[Insn::Fill {
            va: DATA + 0xf000,
            len: 0x2000,
            pattern: 7,
        }]);
        let (e, st, _) = t.run(&w, true);
        assert!(matches!(e, Step::Fault(f) if f.va == DATA + 0x10000));
        assert_eq!((st.pc, st.partial_bytes), (BATCH, 0x1000));
        assert_eq!(t.read(DATA + 0xfff8), 0x7_0000_0007);
        // A STORE that faults writes nothing (and records nothing).
        let w = T::words(&[
            Insn::Store {
                size64: true,
                va: DATA + 0x10000,
                value: 9,
            },
            Insn::End,
        ]);
        let (e, st, _) = t.run(&w, true);
        assert!(matches!(e, Step::Fault(f) if f.va == DATA + 0x10000));
        assert_eq!((st.pc, st.partial_bytes), (BATCH, 0));
    }

    #[test]
    fn zero_length_bulk_and_checksum() {
        let mut t = T::new();
        let w = T::words(&[
            Insn::Copy {
                dst: 1 << 47,
                src: 1 << 47,
                len: 0,
            },
            Insn::Checksum {
                src: 0,
                len: 0,
                dst: DATA,
            },
            Insn::End,
        ]);
        let (e, _, _) = t.run(&w, true);
        assert_eq!(e, Step::End);
        assert_eq!(t.read(DATA), FNV1A64_OFFSET);
    }

    #[test]
    fn bulk_instructions_across_ram_regions() {
        // Guest RAM in three regions (memory backends, e.g. NUMA nodes) meeting at B1, B2.
        const B1: u64 = 0x50_0000;
        const B2: u64 = 0x70_0000;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), B1 as usize),
            (GuestAddress(B1), (B2 - B1) as usize),
            (GuestAddress(B2), 0x10_0000),
        ])
        .unwrap();
        assert_eq!(mem.num_regions(), 3);
        let mut t = T::with_memory(mem);
        // Two consecutive data pages, physically adjacent, on both sides of B2; and a 2 MiB
        // page at 0x40_0000 whose bytes lie on both sides of B1.
        t.pt.map_4k(&t.mem, DATA, B2 - 0x1000, RWX);
        t.pt.map_4k(&t.mem, DATA + 0x1000, B2, RWX);
        t.pt.map_2m(&t.mem, 0x40_0000, 0x40_0000, RWX);
        for i in 0..0x200u64 {
            t.mem
                .write_obj(0xa5a5_0000_0000_0000 | i, GuestAddress(B1 - 0x800 + 8 * i))
                .unwrap();
        }
        let insns = [
            // FILL across B2.
            Insn::Fill {
                va: DATA + 0x800,
                len: 0x1000,
                pattern: 0x1234_5678,
            },
            // COPY from across B1 (inside one 2 MiB page) to across B2.
            Insn::Copy {
                dst: DATA + 0x400,
                src: 0x40_0000 + (B1 - 0x40_0000) - 0x800,
                len: 0x1000,
            },
            Insn::Checksum {
                src: DATA,
                len: 0x1ff8,
                dst: DATA + 0x1ff8,
            },
            Insn::End,
        ];
        let (end, _, _) = t.run(&T::words(&insns), true);
        assert_eq!(end, Step::End, "no BAD_PAGE_ADDRESS on valid memory");
        let rd = |a: u64| -> u64 { t.mem.read_obj(GuestAddress(a)).unwrap() };
        assert_eq!(rd(B2 - 0x1000 + 0x400), 0xa5a5_0000_0000_0000);
        assert_eq!(
            rd(B2 + 0x3f8),
            0xa5a5_0000_0000_0000 | 0x1ff,
            "copied across both"
        );
        let filled: u32 = t.mem.read_obj(GuestAddress(B2 + 0x7fc)).unwrap();
        assert_eq!(
            filled, 0x1234_5678,
            "the fill's last word, in the third region"
        );
        let mut bytes = vec![0u8; 0x1ff8];
        t.mem
            .read_slice(&mut bytes[..0x1000], GuestAddress(B2 - 0x1000))
            .unwrap();
        t.mem
            .read_slice(&mut bytes[0x1000..], GuestAddress(B2))
            .unwrap();
        assert_eq!(rd(B2 + 0xff8), fnv1a64(&bytes), "checksum across B2");
    }

    #[test]
    fn a_page_that_is_not_ram_any_more_faults_after_the_part_before_it_and_is_walked_again() {
        // A FILL over two data pages caches both translations.
        let mut t = T::new();
        let fill = |pattern| {
            T::words(&[
                Insn::Fill {
                    va: DATA + 0x800,
                    len: 0x1000,
                    pattern,
                },
                Insn::End,
            ])
        };
        assert_eq!(t.run(&fill(0xaaaa_aaaa), true).0, Step::End);
        // The VMM changes the memory map: the second page (GPA 0x30_1000) is not RAM any
        // more, but the TLB still translates to it.
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x30_1000)]).unwrap();
        let mut bytes = vec![0u8; 0x30_1000];
        t.mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
        small.write_slice(&bytes, GuestAddress(0)).unwrap();
        t.mem = small;
        let (end, _, _) = t.run(&fill(0x5555_5555), true);
        assert!(
            matches!(end, Step::Fault(f) if f.reason == FaultReason::BadPageAddress),
            "{end:?}"
        );
        let first: u32 = t.mem.read_obj(GuestAddress(0x30_0800)).unwrap();
        assert_eq!(first, 0x5555_5555, "the part before the bad page is done");
        assert!(
            t.mmu.tlb_mut().lookup(0, DATA + 0x1000).is_none(),
            "the retry walks afresh"
        );
    }

    #[test]
    fn bulk_instructions_continue_from_the_faulting_page() {
        // Data pages 4..12 start unmapped; each fault is resolved by mapping the page it
        // names, as a driver would. Every instruction faults once per missing page, in
        // address order, with the part before each missing page done.
        let src: Vec<u8> = (0..0x4000u32).map(|i| (i * 7 + 3) as u8).collect();
        let insns = [
            // FILL pages 4..8, COPY pages 0..4 onto 8..12, CHECKSUM pages 4..12.
            Insn::Fill {
                va: DATA + 0x4000,
                len: 0x4000,
                pattern: 0xfeed_f00d,
            },
            Insn::Copy {
                dst: DATA + 0x8000,
                src: DATA,
                len: 0x4000,
            },
            Insn::Checksum {
                src: DATA + 0x4000,
                len: 0x8000,
                dst: DATA + 0xf000,
            },
            Insn::End,
        ];
        let mut t = T::new();
        t.mem.write_slice(&src, GuestAddress(0x30_0000)).unwrap();
        for i in 4..12 {
            t.unmap(i);
        }
        let mut st = t.start(&T::words(&insns));
        let mut faults = Vec::new();
        loop {
            match t.resume(&mut st) {
                Step::End => break,
                Step::Fault(f) => {
                    let page = (f.va - DATA) / 0x1000;
                    // Everything of this instruction before the faulting page is done.
                    if page > 4 && page < 8 {
                        assert_eq!(t.read(DATA + page * 0x1000 - 8), 0xfeed_f00d_feed_f00d);
                    }
                    faults.push(page);
                    t.map(page);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            faults,
            (4..12).collect::<Vec<_>>(),
            "one fault per page, in order"
        );
        assert_eq!(
            st.partial_bytes, 0,
            "progress is forgotten once the pc moves on"
        );
        let mut all = vec![0u8; 0x8000];
        t.mem.read_slice(&mut all, GuestAddress(0x30_4000)).unwrap();
        assert!(all[..0x4000]
            .chunks(4)
            .all(|c| c == 0xfeed_f00du32.to_le_bytes()));
        assert_eq!(&all[0x4000..], &src[..]);
        assert_eq!(t.read(DATA + 0xf000), fnv1a64(&all));
    }

    #[test]
    fn a_bulk_instruction_finishes_under_continuous_invalidation() {
        // The worst case of a CPU that keeps changing the mapping: every time a fault is
        // resolved, every other page of the range is unmapped and invalidated before the
        // engine retries. An instruction that needs all its pages mapped at once never
        // finishes; a restartable one needs exactly one fault per page (spec 6.13.3).
        let mut t = T::new();
        let data: Vec<u8> = (0..0xc000u32).map(|i| (i ^ (i >> 8)) as u8).collect();
        t.mem.write_slice(&data, GuestAddress(0x30_0000)).unwrap();
        let mut st = t.start(&T::words(&[
            Insn::Checksum {
                src: DATA,
                len: 0xc000,
                dst: DATA + 0xf000,
            },
            Insn::End,
        ]));
        let mut faults = 0u64;
        loop {
            match t.resume(&mut st) {
                Step::End => break,
                Step::Fault(f) => {
                    faults += 1;
                    assert!(faults <= 12, "no progress: fault {faults} at {:#x}", f.va);
                    let page = (f.va - DATA) / 0x1000;
                    for i in (0..12).filter(|&i| i != page) {
                        t.unmap(i);
                    }
                    t.map(page);
                }
                other => panic!("{other:?}"),
            }
        }
        // The first run found every page mapped and went through; faults only after the
        // churn started: none here. Now with the churn from the start.
        assert_eq!(faults, 0);
        assert_eq!(t.read(DATA + 0xf000), fnv1a64(&data));
        for i in 0..12 {
            t.unmap(i);
        }
        let mut st = t.start(&T::words(&[
            Insn::Checksum {
                src: DATA,
                len: 0xc000,
                dst: DATA + 0xf000,
            },
            Insn::End,
        ]));
        t.mem.write_obj(0u64, GuestAddress(0x30_f000)).unwrap();
        loop {
            match t.resume(&mut st) {
                Step::End => break,
                Step::Fault(f) => {
                    faults += 1;
                    assert!(faults <= 12, "no progress: fault {faults} at {:#x}", f.va);
                    let page = (f.va - DATA) / 0x1000;
                    for i in (0..12).filter(|&i| i != page) {
                        t.unmap(i);
                    }
                    t.map(page);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(faults, 12, "one fault per page");
        assert_eq!(t.read(DATA + 0xf000), fnv1a64(&data));
    }

    #[test]
    fn partial_state_of_copy_and_checksum() {
        let mut t = T::new();
        let src: Vec<u8> = (0..0x2000u32).map(|i| (i % 251) as u8).collect();
        t.mem.write_slice(&src, GuestAddress(0x30_0000)).unwrap();
        // COPY whose destination's second page is missing, source fine: the first page
        // is copied, the fault names the destination page (access WRITE).
        t.unmap(5);
        let mut st = t.start(&T::words(&[
            Insn::Copy {
                dst: DATA + 0x4000,
                src: DATA,
                len: 0x2000,
            },
            Insn::End,
        ]));
        let Step::Fault(f) = t.resume(&mut st) else {
            panic!("no fault")
        };
        assert_eq!((f.va, f.access), (DATA + 0x5000, AccessKind::Write));
        assert_eq!(st.partial_bytes, 0x1000);
        let mut got = vec![0u8; 0x1000];
        t.mem.read_slice(&mut got, GuestAddress(0x30_4000)).unwrap();
        assert_eq!(got, src[..0x1000]);
        t.map(5);
        assert_eq!(t.resume(&mut st), Step::End);
        t.mem.read_slice(&mut got, GuestAddress(0x30_5000)).unwrap();
        assert_eq!(got, src[0x1000..]);
        // CHECKSUM whose result page is missing: every byte is hashed before the fault,
        // and the saved hash is what is stored after it (a change of the source meanwhile
        // is not read again).
        t.unmap(9);
        let mut st = t.start(&T::words(&[
            Insn::Checksum {
                src: DATA,
                len: 0x2000,
                dst: DATA + 0x9000,
            },
            Insn::End,
        ]));
        let Step::Fault(f) = t.resume(&mut st) else {
            panic!("no fault")
        };
        assert_eq!((f.va, st.partial_bytes), (DATA + 0x9000, 0x2000));
        t.mem
            .write_obj(0xdead_u64, GuestAddress(0x30_0000))
            .unwrap();
        t.map(9);
        assert_eq!(t.resume(&mut st), Step::End);
        assert_eq!(t.read(DATA + 0x9000), fnv1a64(&src));
    }
}
