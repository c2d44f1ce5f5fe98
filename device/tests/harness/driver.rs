// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A tiny guest driver on top of [`TestFrontend`]: it keeps eventq and complq supplied,
//! collects events and completions, writes page tables into guest RAM, builds batches and
//! issues every control command of spec/svmgpu.md.

use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

use svmgpu_spec::isa::Insn;
use svmgpu_spec::pte::{self, Perms};
use svmgpu_spec::*;

use super::{Buf, TestFrontend, TIMEOUT};

const EVQ: usize = QUEUE_EVENT as usize;
const CQ: usize = QUEUE_COMPLETION as usize;

/// Read-write, executable.
pub const RWX: Perms = Perms {
    writable: true,
    no_exec: false,
};
/// Read-only, executable.
pub const RX: Perms = Perms {
    writable: false,
    no_exec: false,
};
/// Read-write, not executable.
pub const RW: Perms = Perms {
    writable: true,
    no_exec: true,
};

/// The driver model.
pub struct Driver {
    /// The frontend (guest RAM, queues).
    pub fe: TestFrontend,
    bufs: [HashMap<u16, u64>; 2],
    /// Completions received and not yet taken.
    pub completions: Vec<Completion>,
    /// Events received (with their event_seq) and not yet taken.
    pub events: Vec<(u64, Event)>,
    /// Buffers the device returned unused (used length 0: too short or not RAM).
    pub unused: usize,
    /// The last event_seq seen.
    pub last_event_seq: u64,
}

/// A page table in guest RAM.
pub struct PageTable {
    /// Root GPA.
    pub root: u64,
}

impl Driver {
    /// Starts the queues (size 256) and posts `nbufs` buffers on eventq and complq.
    pub fn new(mut fe: TestFrontend, nbufs: usize) -> Self {
        fe.start(256);
        let mut d = Self {
            fe,
            bufs: [HashMap::new(), HashMap::new()],
            completions: Vec::new(),
            events: Vec::new(),
            unused: 0,
            last_event_seq: 0,
        };
        for _ in 0..nbufs {
            d.post_buf(EVQ);
            d.post_buf(CQ);
        }
        d.fe.queues[EVQ].kick();
        d.fe.queues[CQ].kick();
        d
    }

    /// Posts `n` more buffers on eventq and complq, and kicks.
    pub fn supply(&mut self, n: usize) {
        for _ in 0..n {
            self.post_buf(EVQ);
            self.post_buf(CQ);
        }
        self.fe.queues[EVQ].kick();
        self.fe.queues[CQ].kick();
    }

    fn post_buf(&mut self, q: usize) {
        let len = if q == EVQ {
            EVENT_SIZE
        } else {
            COMPLETION_SIZE
        } as u32;
        let gpa = self.fe.ram.alloc(u64::from(len), 64);
        self.post_at(q, gpa, len);
    }

    /// Posts a buffer of `len` bytes at `gpa` on eventq (`event`) or complq, and kicks.
    pub fn post_raw(&mut self, event: bool, gpa: u64, len: u32) {
        let q = if event { EVQ } else { CQ };
        self.post_at(q, gpa, len);
        self.fe.queues[q].kick();
    }

    fn post_at(&mut self, q: usize, gpa: u64, len: u32) {
        let head = self.fe.queues[q].add_chain(&self.fe.ram, &[Buf::w(gpa, len)]);
        self.bufs[q - EVQ].insert(head, gpa);
    }

    /// Collects used event and completion buffers and posts them again.
    pub fn poll(&mut self) {
        for q in [EVQ, CQ] {
            let mut any = false;
            while let Some(u) = self.fe.queues[q].poll_used(&self.fe.ram) {
                let gpa = self.bufs[q - EVQ].remove(&u.id).expect("known buffer");
                if u.len == 0 {
                    self.unused += 1;
                    continue;
                }
                if q == EVQ {
                    assert_eq!(u.len as usize, EVENT_SIZE);
                    let b = self.fe.ram.read(gpa, EVENT_SIZE);
                    let (seq, ev) = Event::decode(&b).expect("valid event");
                    assert_eq!(seq, self.last_event_seq + 1, "event_seq has no gaps");
                    self.last_event_seq = seq;
                    self.events.push((seq, ev));
                    self.post_at(q, gpa, EVENT_SIZE as u32);
                } else {
                    assert_eq!(u.len as usize, COMPLETION_SIZE);
                    let b = self.fe.ram.read(gpa, COMPLETION_SIZE);
                    self.completions
                        .push(Completion::decode(&b).expect("valid completion"));
                    self.post_at(q, gpa, COMPLETION_SIZE as u32);
                }
                any = true;
            }
            if any {
                self.fe.queues[q].kick();
            }
        }
    }

    /// Waits for (and removes) the first completion matching `pred`.
    pub fn wait_completion(&mut self, pred: impl Fn(&Completion) -> bool) -> Completion {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            self.poll();
            if let Some(i) = self.completions.iter().position(&pred) {
                return self.completions.remove(i);
            }
            assert!(
                Instant::now() < deadline,
                "no matching completion; have {:?}",
                self.completions
            );
            thread::sleep(Duration::from_micros(50));
        }
    }

    /// Waits for the JOB_DONE of `seqno`; returns its status.
    pub fn wait_job(&mut self, seqno: u64) -> u32 {
        self.wait_completion(|c| c.kind == CompletionKind::JobDone.as_u32() && c.seqno == seqno)
            .status
    }

    /// Waits for the COMMAND_DONE of `seqno`.
    pub fn wait_done(&mut self, seqno: u64) -> Completion {
        self.wait_completion(|c| c.kind == CompletionKind::CommandDone.as_u32() && c.seqno == seqno)
    }

    /// Waits for (and removes) the first event matching `pred`.
    pub fn wait_event(&mut self, pred: impl Fn(&Event) -> bool) -> Event {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            self.poll();
            if let Some(i) = self.events.iter().position(|(_, e)| pred(e)) {
                return self.events.remove(i).1;
            }
            assert!(
                Instant::now() < deadline,
                "no matching event; have {:?}",
                self.events
            );
            thread::sleep(Duration::from_micros(50));
        }
    }

    /// Waits for the next PAGE_FAULT event.
    pub fn wait_fault(&mut self) -> PageFaultEvent {
        match self.wait_event(|e| matches!(e, Event::PageFault(_))) {
            Event::PageFault(f) => f,
            _ => unreachable!(),
        }
    }

    /// Sends a command; returns the status and seqno.
    pub fn cmd(&mut self, op: Opcode, body: &[u8]) -> (Status, u64) {
        let (h, _, seqno) = self
            .fe
            .control(op.as_u32(), body, op.response_body_size() as u32);
        (Status::from_u32(h.status).expect("known status"), seqno)
    }

    /// Sends a command that must succeed; returns its seqno.
    pub fn ok(&mut self, op: Opcode, body: &[u8]) -> u64 {
        let (st, seqno) = self.cmd(op, body);
        assert_eq!(st, Status::Ok, "{op:?}");
        seqno
    }

    /// GET_STATS.
    pub fn stats(&mut self) -> StatsResp {
        let (h, body, _) = self.fe.control(
            Opcode::GetStats.as_u32(),
            &[],
            Opcode::GetStats.response_body_size() as u32,
        );
        assert_eq!(h.status, 0);
        StatsResp::decode(&body).unwrap()
    }

    /// A new, empty page table.
    pub fn page_table(&mut self) -> PageTable {
        PageTable {
            root: self.fe.ram.alloc(4096, 4096),
        }
    }

    fn table_for(&mut self, pt: &PageTable, va: u64, stop: u32) -> u64 {
        let mut t = pt.root;
        for level in (stop + 1..=3).rev() {
            let e = pte::entry_address(t, va, level).unwrap();
            let raw = u64::from_le_bytes(self.fe.ram.read(e, 8).try_into().unwrap());
            t = if raw & pte::PRESENT != 0 {
                raw & pte::ADDR_MASK
            } else {
                let n = self.fe.ram.alloc(4096, 4096);
                self.fe.ram.write(e, &pte::table(n).unwrap().to_le_bytes());
                n
            };
        }
        t
    }

    /// Writes the raw entry for `va` at `level`, creating tables above it.
    pub fn set_pte(&mut self, pt: &PageTable, va: u64, level: u32, raw: u64) {
        let t = self.table_for(pt, va, level);
        self.fe.ram.write(
            pte::entry_address(t, va, level).unwrap(),
            &raw.to_le_bytes(),
        );
    }

    /// Maps one 4 KiB page.
    pub fn map_4k(&mut self, pt: &PageTable, va: u64, pa: u64, p: Perms) {
        self.set_pte(pt, va, 0, pte::page_4k(pa, p).unwrap());
    }

    /// Maps one 2 MiB page.
    pub fn map_2m(&mut self, pt: &PageTable, va: u64, pa: u64, p: Perms) {
        self.set_pte(pt, va, 1, pte::page_2m(pa, p).unwrap());
    }

    /// Allocates `len` bytes of RAM and maps them at `va` with 4 KiB pages; returns the GPA.
    pub fn alloc_mapped(&mut self, pt: &PageTable, va: u64, len: u64, p: Perms) -> u64 {
        let len = len.div_ceil(4096) * 4096;
        let gpa = self.fe.ram.alloc(len, 4096);
        for off in (0..len).step_by(4096) {
            self.map_4k(pt, va + off, gpa + off, p);
        }
        gpa
    }

    /// ASID_BIND.
    pub fn bind(&mut self, asid: u32, pt: &PageTable) {
        let b = AsidBindReq {
            asid,
            flags: 0,
            pt_root: pt.root,
        };
        self.ok(Opcode::AsidBind, &b.to_bytes());
    }

    /// CTX_CREATE.
    pub fn create(&mut self, ctx_id: u32, asid: u32) {
        let b = CtxCreateReq {
            ctx_id,
            asid,
            flags: 0,
            reserved: 0,
        };
        self.ok(Opcode::CtxCreate, &b.to_bytes());
    }

    /// A context request body.
    pub fn ctx_body(ctx_id: u32) -> [u8; 8] {
        CtxReq { ctx_id, flags: 0 }.to_bytes()
    }

    /// JOB_SUBMIT; returns the job's seqno.
    pub fn submit(&mut self, ctx_id: u32, batch_va: u64, batch_len: u32) -> u64 {
        let b = JobSubmitReq {
            ctx_id,
            flags: 0,
            batch_va,
            batch_len,
            reserved: 0,
        };
        self.ok(Opcode::JobSubmit, &b.to_bytes())
    }

    /// Writes `insns` at GPA `gpa` (mapped at `va`), submits them; returns the seqno.
    pub fn run_batch(&mut self, ctx_id: u32, va: u64, gpa: u64, insns: &[Insn]) -> u64 {
        let bytes = encode(insns);
        self.fe.ram.write(gpa, &bytes);
        self.submit(ctx_id, va, bytes.len() as u32)
    }

    /// TLB_INVALIDATE of a range; returns the seqno (the command is only started).
    pub fn invalidate(&mut self, asid: u32, va: u64, size: u64) -> u64 {
        let b = TlbInvalidateReq {
            asid,
            flags: 0,
            va,
            size,
        };
        self.ok(Opcode::TlbInvalidate, &b.to_bytes())
    }

    /// TLB_INVALIDATE of a whole ASID (or `ASID_ALL`).
    pub fn invalidate_asid(&mut self, asid: u32) -> u64 {
        let b = TlbInvalidateReq {
            asid,
            flags: TLB_INVAL_F_WHOLE_ASID,
            va: 0,
            size: 0,
        };
        self.ok(Opcode::TlbInvalidate, &b.to_bytes())
    }

    /// FAULT_REPLY.
    pub fn reply(&mut self, fault_id: u64, action: FaultAction) -> Status {
        let b = FaultReplyReq {
            fault_id,
            action: action.as_u32(),
            flags: 0,
        };
        self.cmd(Opcode::FaultReply, &b.to_bytes()).0
    }

    /// Reads a little-endian u64 from guest RAM.
    pub fn read_u64(&self, gpa: u64) -> u64 {
        u64::from_le_bytes(self.fe.ram.read(gpa, 8).try_into().unwrap())
    }

    /// Reads a little-endian u32 from guest RAM.
    pub fn read_u32(&self, gpa: u64) -> u32 {
        u32::from_le_bytes(self.fe.ram.read(gpa, 4).try_into().unwrap())
    }
}

/// Encodes instructions into batch bytes.
pub fn encode(insns: &[Insn]) -> Vec<u8> {
    let mut out = Vec::new();
    for i in insns {
        let mut b = [0u8; 32];
        let n = i.encode_bytes(&mut b).unwrap();
        out.extend_from_slice(&b[..n]);
    }
    out
}
