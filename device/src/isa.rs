// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The command-stream executor (spec/svmgpu.md section 6.13): fetches, decodes and executes
//! one instruction at a time for a context, with every memory access (instruction fetch
//! included) translated by the engine's MMU. Decoding is `svmgpu_spec::isa::Insn::decode`;
//! this module adds what depends on the batch and on memory.
//!
//! An instruction translates every page it touches before writing any byte, so a faulting
//! instruction has no effect and is simply executed again after the fault is resolved.

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

/// Checks that every segment is a slice of guest RAM, before anything is written, so that
/// an instruction that faults has no effect (spec 6.13.3).
fn validate(mem: &GuestMemoryMmap<()>, segs: &[Seg], access: AccessKind) -> Result<(), Fault> {
    for s in segs {
        mem.get_slice(GuestAddress(s.pa), s.len as usize)
            .map_err(|_| bad_page(s.va, access))?;
    }
    Ok(())
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
                st.partial_ns = 0;
                Step::Next
            }
            Ok(Flow::AdvanceFence(v)) => {
                st.pc = next;
                st.partial_ns = 0;
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
                translate_range(mmu, sp, va, len, AccessKind::Write, &mut self.dst)?;
                validate(mem, &self.dst, AccessKind::Write)?;
                let pat = pattern.to_le_bytes();
                for (i, b) in self.buf.iter_mut().enumerate() {
                    *b = pat[i % 4];
                }
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
                Ok(Flow::Advance)
            }
            Insn::Copy { dst, src, len } => {
                translate_range(mmu, sp, src, len, AccessKind::Read, &mut self.src)?;
                translate_range(mmu, sp, dst, len, AccessKind::Write, &mut self.dst)?;
                validate(mem, &self.src, AccessKind::Read)?;
                validate(mem, &self.dst, AccessKind::Write)?;
                copy_segments(mem, &self.src, &self.dst)?;
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
                translate_range(mmu, sp, src, len, AccessKind::Read, &mut self.src)?;
                let out = mmu.translate(sp, dst, AccessKind::Write)?.pa;
                let mut h = FNV1A64_OFFSET;
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

/// Translates every page of `[va, va + len)` for `access` into segments of guest RAM, each
/// inside one memory region: pages adjacent in guest-physical addresses are merged only
/// within a region, and a page that spans two regions is split where the first ends
/// (guest RAM may be several regions that meet, e.g. one per NUMA node, and a slice of
/// guest memory cannot cross from one to the next).
fn translate_range(
    mmu: &mut Mmu,
    sp: &Space<'_>,
    va: u64,
    len: u64,
    access: AccessKind,
    out: &mut Vec<Seg>,
) -> Result<(), Fault> {
    out.clear();
    let mut off = 0u64;
    while off < len {
        let cur = va.checked_add(off).ok_or(Fault {
            va,
            access,
            reason: FaultReason::VaRange,
            level: 3,
        })?;
        let t = mmu.translate(sp, cur, access)?;
        let region = sp
            .mem
            .find_region(GuestAddress(t.pa))
            .ok_or(bad_page(cur, access))?;
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
    Ok(())
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
        // A fault leaves the pc on the instruction and writes nothing.
        let w = T::words(&[Insn::Fill {
            va: DATA + 0xf000,
            len: 0x2000,
            pattern: 7,
        }]);
        let (e, st, _) = t.run(&w, true);
        assert!(matches!(e, Step::Fault(f) if f.va == DATA + 0x10000));
        assert_eq!(st.pc, BATCH);
        assert_eq!(t.read(DATA + 0xf000), 0);
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
    fn a_page_that_is_not_ram_any_more_faults_without_effect_and_is_walked_again() {
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
        assert_eq!(first, 0xaaaa_aaaa, "a faulting instruction has no effect");
        assert!(
            t.mmu.tlb_mut().lookup(0, DATA + 0x1000).is_none(),
            "the retry walks afresh"
        );
    }
}
