// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Entry points of the fuzzers (`device/fuzz`, cargo-fuzz) and of the property tests that
//! also replay what they found (`tests/proptests.rs`, `tests/fuzz_regressions/`). Not part of
//! the library: both include this file (`#[path]`) and reach the device through its public
//! API only. Each takes arbitrary bytes and panics only if the device misbehaves: a panic
//! inside the device, or a result that contradicts the spec's reference semantics. The
//! `sequence` target decodes its bytes with `arbitrary` into device operations; the others
//! feed the bytes to the decoders under test (control requests, page tables, batches).

use std::sync::OnceLock;

use svmgpu_spec::isa::Insn;
use svmgpu_spec::pte::{self, PteKind};
use svmgpu_spec::{FaultReason, RespHeader, Status, PAGE_SIZE_2M, PAGE_SIZE_4K, VA_BITS};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use svmgpu_device::config::DeviceOptions;
use svmgpu_device::context::{ExecState, Job};
use svmgpu_device::gpu::Gpu;
use svmgpu_device::isa::{Executor, Step};
use svmgpu_device::mmu::audit::InvalLog;
use svmgpu_device::mmu::walker::{walk, Leaf};
use svmgpu_device::mmu::{AuditFindings, Mmu, Scope, Space, Tables};

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// The control decoder: `data[0..2]` is the response capacity, the rest a request.
pub fn control(data: &[u8]) {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    let gpu = GPU.get_or_init(|| {
        let o = DeviceOptions {
            engines: 1,
            tlb_inval_latency_ns: 0,
            preempt_latency_ns: 0,
            ..Default::default()
        };
        Gpu::new(0, &o).expect("device")
    });
    let cap = 16
        + usize::from(u16::from_le_bytes([
            data.first().copied().unwrap_or(0),
            data.get(1).copied().unwrap_or(0),
        ]));
    let req = data.get(2..).unwrap_or(&[]);
    let (resp, deferred) = gpu.handle_request(req, cap);
    let bytes = resp.bytes();
    assert!(bytes.len() >= RespHeader::SIZE && bytes.len() <= cap);
    let h = RespHeader::decode(bytes).expect("header");
    assert!(Status::from_u32(h.status).is_some());
    assert_eq!(h.reserved, 0);
    if h.status != Status::Ok.as_u32() {
        assert_eq!(bytes.len(), RespHeader::SIZE);
        assert!(deferred.is_none());
    }
    if let Some(d) = deferred {
        gpu.start(d);
    }
}

/// Size of the guest RAM image the walker and ISA fuzzers use.
pub const IMAGE: usize = 64 << 10;

/// A reference walk over a byte image at GPA 0 (spec section 6.9.2, written independently
/// of `mmu::walker`): the leaf, or the fault reason and level.
pub fn reference_walk(image: &[u8], root: u64, va: u64) -> Result<Leaf, (FaultReason, u32)> {
    if va >> VA_BITS != 0 {
        return Err((FaultReason::VaRange, 3));
    }
    let mut table = root;
    for level in (0..4u32).rev() {
        let idx = (va >> (12 + 9 * level)) & 511;
        let addr = table.wrapping_add(idx * 8);
        if table % 4096 != 0 || addr.checked_add(8).is_none_or(|e| e > image.len() as u64) {
            return Err((FaultReason::BadTableAddress, level));
        }
        let raw = u64_at(image, addr as usize);
        match pte::decode(raw, level) {
            PteKind::NotPresent => return Err((FaultReason::NotPresent, level)),
            PteKind::Reserved | PteKind::BadLevel => return Err((FaultReason::ReservedBit, level)),
            PteKind::Table { pa } => table = pa,
            PteKind::Leaf {
                pa,
                size,
                writable,
                executable,
            } => {
                if pa.checked_add(size).is_none_or(|e| e > image.len() as u64) {
                    return Err((FaultReason::BadPageAddress, level));
                }
                return Ok(Leaf {
                    page_va: va & !(size - 1),
                    pa,
                    huge: size == PAGE_SIZE_2M,
                    writable,
                    executable,
                });
            }
        }
    }
    unreachable!("level 0 always returns")
}

fn image_memory(image: &[u8]) -> GuestMemoryMmap<()> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), IMAGE)]).expect("mmap");
    let n = image.len().min(IMAGE);
    mem.write_slice(&image[..n], GuestAddress(0))
        .expect("write");
    mem
}

/// The page walker: `data[0..8]` VA, `data[8..16]` root, the rest a RAM image at GPA 0.
/// The walker must agree with [`reference_walk`].
pub fn walker(data: &[u8]) {
    let va = u64_at(data, 0);
    // Roots inside (or just outside) the image, sometimes unaligned.
    let root = u64_at(data, 8) % (IMAGE as u64 + 8192);
    let image = data.get(16..).unwrap_or(&[]);
    let mem = image_memory(image);
    let mut full = vec![0u8; IMAGE];
    full[..image.len().min(IMAGE)].copy_from_slice(&image[..image.len().min(IMAGE)]);
    let got = walk(&mem, root, va).map_err(|f| (f.reason, f.level));
    let want = reference_walk(&full, root, va);
    assert_eq!(got, want, "va {va:#x} root {root:#x}");
    if let Ok(l) = got {
        assert_eq!(l.page_va % l.size(), 0);
        assert_eq!(l.pa % l.size(), 0);
        assert!(va >= l.page_va && va - l.page_va < l.size());
        assert!(l.size() == PAGE_SIZE_4K || l.size() == PAGE_SIZE_2M);
    }
}

/// Steps an executor may take on one fuzz input.
pub const ISA_MAX_STEPS: usize = 4096;

/// A tiny deterministic generator (SplitMix64) for the ISA fuzzer's driver actions.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The ISA decoder and executor: `data` is a batch at VA 0x10000 in a 64 KiB space mapped
/// 1:1 at GPA 0 with 4 KiB read-write-execute pages, whose page table lives outside it. Runs
/// until the job ends, faults, or [`ISA_MAX_STEPS`]; WAIT/DELAY time is simulated.
///
/// Between instructions a driver model, seeded from the input, remaps pages and invalidates
/// them the way a correct driver does (PTE write, then an invalidation covering it, accepted
/// and completed as the device does it), and invalidates unrelated ranges. The audit, with
/// no grace period, must then count nothing (no stale access, no unflushed entry, no narrow
/// flush), and every access must be checked. At the end the model remaps one cached page
/// *without* invalidating it: the audit's scan must report exactly that entry.
pub fn isa(data: &[u8]) {
    // Decoding alone: every decodable prefix re-encodes to the same qwords.
    let words: Vec<u64> = data
        .chunks(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(a)
        })
        .collect();
    if let Ok(insn) = Insn::decode(&words) {
        let (w, n) = insn.encode();
        assert_eq!(&w[..n], &words[..n], "{insn:?}");
    }

    // Execution. RAM: 64 KiB data space at GPA 0, page tables at 64 KiB.. (so the batch
    // cannot rewrite them).
    let ram = 2 * IMAGE;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram)]).expect("mmap");
    let root = IMAGE as u64;
    let (l2, l1, l0) = (root + 0x1000, root + 0x2000, root + 0x3000);
    let put = |a: u64, v: u64| mem.write_obj(v, GuestAddress(a)).expect("pt");
    put(root, pte::table(l2).unwrap_or(0));
    put(l2, pte::table(l1).unwrap_or(0));
    put(l1, pte::table(l0).unwrap_or(0));
    let rwx = pte::Perms {
        writable: true,
        no_exec: false,
    };
    let pages = IMAGE as u64 / PAGE_SIZE_4K;
    let map = |va_page: u64, pa_page: u64| {
        put(
            l0 + 8 * va_page,
            pte::page_4k(pa_page * PAGE_SIZE_4K, rwx).unwrap_or(0),
        );
    };
    for i in 0..pages {
        map(i, i);
    }
    let n = data.len().min(0x8000);
    // The batch ends at the top of the space: running past it faults or overruns.
    let batch_va = 0x1_0000u64 - (n as u64).div_ceil(8) * 8;
    mem.write_slice(&data[..n], GuestAddress(batch_va))
        .expect("batch");
    let job = Job {
        seqno: 1,
        batch_va,
        batch_len: u32::try_from(n.div_ceil(8).max(1) * 8).unwrap_or(8),
    };
    let log = InvalLog::new();
    let sp = Space {
        mem: &mem,
        asid: 0,
        root,
        log: &log,
        audit: true,
        audit_grace: std::time::Duration::ZERO,
        hook: None,
    };
    let roots = |asid: u32| (asid == 0).then_some(root);
    let tables = Tables {
        mem: &mem,
        root: &roots,
        grace: std::time::Duration::ZERO,
    };
    let mut found = AuditFindings::default();
    let mut mmu = Mmu::new(16, 4).expect("tlb");
    // The device's invalidation: accepted (audit rule 2), covered entries dropped,
    // completed (rule 3).
    let mut invalidate = |mmu: &mut Mmu, scope: Scope| {
        let seq = log.accept();
        let a = mmu.audit_accept(&tables, scope, seq);
        mmu.tlb_mut().invalidate(scope);
        log.complete(scope, seq);
        let c = mmu.audit_complete(&tables, seq);
        found.unflushed += a.unflushed + c.unflushed;
        found.narrow += a.narrow + c.narrow;
    };
    let mut rng = Mix(data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }));
    let mut exec = Executor::new();
    let mut st = ExecState::start(job);
    let mut faulted = false;
    for i in 0..ISA_MAX_STEPS {
        match exec.step(&mut mmu, &sp, &mut st, i % 2 == 0) {
            Step::Next | Step::Fence(_) | Step::FenceBlocked => {}
            Step::Sleep(ns) => st.partial_ns = st.partial_ns.saturating_add(ns.max(1)),
            Step::Fault(_) => {
                faulted = true;
                break;
            }
            Step::End | Step::Error { .. } => break,
        }
        assert!(st.depth <= svmgpu_spec::LOOP_MAX_DEPTH);
        assert!(st.pc >= job.batch_va && st.pc <= job.batch_end());
        let r = rng.next();
        match r % 8 {
            // Remap a page to another physical page, then invalidate a range covering it:
            // that page only, a few pages around it, or the whole ASID.
            0 => {
                let page = (r >> 8) % pages;
                map(page, (r >> 16) % pages);
                let scope = match (r >> 32) % 3 {
                    0 => Scope::Range {
                        asid: 0,
                        start: page * PAGE_SIZE_4K,
                        end: (page + 1) * PAGE_SIZE_4K,
                    },
                    1 => Scope::Range {
                        asid: 0,
                        start: page.saturating_sub(2) * PAGE_SIZE_4K,
                        end: (page + 3) * PAGE_SIZE_4K,
                    },
                    _ => Scope::Asid(0),
                };
                invalidate(&mut mmu, scope);
            }
            // An unrelated invalidation (another range, another ASID).
            1 => {
                let page = (r >> 8) % pages;
                let scope = if r & (1 << 40) == 0 {
                    Scope::Range {
                        asid: 0,
                        start: page * PAGE_SIZE_4K,
                        end: (page + 1) * PAGE_SIZE_4K,
                    }
                } else {
                    Scope::Asid(1)
                };
                invalidate(&mut mmu, scope);
            }
            _ => {}
        }
    }
    let c = mmu.counters;
    assert_eq!(
        (c.stale, c.unflushed, c.narrow, found),
        (0, 0, 0, AuditFindings::default()),
        "a correct driver's remaps made the audit count"
    );
    // Every translated access is checked; only the one that faulted (if any) is not.
    let unchecked = (c.hits + c.misses).saturating_sub(c.audit_checks);
    assert!(unchecked <= u64::from(faulted), "{c:?}, faulted {faulted}");
    // The audit is live: a cached page remapped without invalidation is found at once.
    let cached = (0..pages).find_map(|p| {
        mmu.tlb_mut()
            .lookup(0, p * PAGE_SIZE_4K)
            .map(|e| (p, e.leaf.pa / PAGE_SIZE_4K))
    });
    if let Some((page, pa_page)) = cached {
        map(page, (pa_page + 1) % pages);
        let f = mmu.audit_scan(&tables);
        assert_eq!(
            f.unflushed, 1,
            "a forgotten invalidation of page {page} not seen"
        );
    }
}

/// One operation of the `sequence` target, decoded from the fuzzer's bytes by `arbitrary`.
/// Context ids, ASIDs and pages are taken modulo small ranges so that operations meet.
#[derive(Debug, arbitrary::Arbitrary)]
pub enum Op {
    /// CTX_CREATE of context `ctx % 5` on ASID `asid % 2` (ASID 1 is never bound).
    Create {
        /// Context.
        ctx: u8,
        /// ASID.
        asid: u8,
    },
    /// CTX_DESTROY.
    Destroy {
        /// Context.
        ctx: u8,
    },
    /// JOB_SUBMIT of `batch` (at most 256 bytes, padded to qwords) written into the batch
    /// window.
    Submit {
        /// Context.
        ctx: u8,
        /// The batch bytes.
        batch: Vec<u8>,
    },
    /// CTX_PREEMPT.
    Preempt {
        /// Context.
        ctx: u8,
    },
    /// CTX_RESUME.
    Resume {
        /// Context.
        ctx: u8,
    },
    /// TLB_INVALIDATE of ASID 0: the whole ASID, or `pages % 8 + 1` pages from `page`.
    Invalidate {
        /// Whole ASID.
        whole: bool,
        /// First page (of the 48-bit space, masked to 32 bits of address).
        page: u32,
        /// Pages.
        pages: u8,
    },
    /// Writes `value` (any bits: a garbage PTE too) into the PTE of data page `page % 64`.
    WritePte {
        /// Page of the data window.
        page: u8,
        /// The raw entry.
        value: u64,
    },
    /// FAULT_REPLY to fault id `fault % 64`.
    Reply {
        /// Fault id.
        fault: u8,
        /// CANCEL (else RESUME).
        cancel: bool,
    },
}

/// The whole device, driven by a sequence of at most 64 [`Op`]s decoded from `data`,
/// against a device with guest RAM, two engines and no modelled latency. Every input starts
/// and ends with RESET; the device must answer every request and stay exact (no stale
/// access in audit mode).
pub fn sequence(data: &[u8]) {
    use arbitrary::{Arbitrary, Unstructured};
    use svmgpu_spec::{
        AsidBindReq, CtrlHeader, CtxCreateReq, CtxReq, FaultReplyReq, JobSubmitReq, Opcode,
        ResetReq, TlbInvalidateReq,
    };
    use vm_memory::GuestMemoryAtomic;

    const RAM: usize = 4 << 20;
    const ROOT: u64 = 0x10_0000;
    const BATCH: u64 = 0x20_0000; // VA and GPA of a 64 KiB batch window
    const DATA: u64 = 0x30_0000; // VA of a 256 KiB data window, GPA 0x30_0000..
    static DEV: OnceLock<(Gpu, GuestMemoryMmap<()>)> = OnceLock::new();
    let (gpu, mem) = DEV.get_or_init(|| {
        let o = DeviceOptions {
            engines: 2,
            max_contexts: 4,
            max_faults: 2,
            tlb_entries: 8,
            tlb_ways: 2,
            tlb_inval_latency_ns: 0,
            preempt_latency_ns: 0,
            walk_latency_ns: 0,
            insn_cost_ns: 0,
            timeslice_us: 50,
            audit: true,
            ..Default::default()
        };
        let gpu = Gpu::new(0, &o).expect("device");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]).expect("mmap");
        gpu.set_memory(Some(GuestMemoryAtomic::new(mem.clone())));
        (gpu, mem)
    });
    let send = |op: Opcode, body: &[u8]| {
        let mut req = CtrlHeader {
            opcode: op.as_u32(),
            flags: 0,
            seqno: 1,
        }
        .to_bytes()
        .to_vec();
        req.extend_from_slice(body);
        let (resp, d) = gpu.handle_request(&req, 256);
        assert!(RespHeader::decode(resp.bytes()).is_some());
        if let Some(d) = d {
            gpu.start(d);
        }
    };
    let put = |a: u64, v: u64| {
        let _ = mem.write_obj(v, GuestAddress(a));
    };
    // A fresh page table: batch window RWX, data window RW, 4 KiB pages, tables at ROOT...
    send(Opcode::Reset, &ResetReq::default().to_bytes());
    let _ = mem.write_slice(&[0u8; 0x4000], GuestAddress(ROOT));
    put(ROOT, pte::table(ROOT + 0x1000).unwrap_or(0));
    put(ROOT + 0x1000, pte::table(ROOT + 0x2000).unwrap_or(0));
    put(ROOT + 0x2000 + 8, pte::table(ROOT + 0x3000).unwrap_or(0)); // VA 2 MiB..4 MiB
    let rwx = pte::Perms {
        writable: true,
        no_exec: false,
    };
    for i in 0..(0x2_0000u64 / PAGE_SIZE_4K) {
        put(
            ROOT + 0x3000 + 8 * i,
            pte::page_4k(BATCH + i * PAGE_SIZE_4K, rwx).unwrap_or(0),
        );
    }
    let data_slot = |page: u64| ROOT + 0x3000 + 8 * (((DATA - BATCH) >> 12) + page % 64);
    for i in 0..64 {
        put(
            data_slot(i),
            pte::page_4k(DATA + i * PAGE_SIZE_4K, rwx).unwrap_or(0),
        );
    }
    send(
        Opcode::AsidBind,
        &AsidBindReq {
            asid: 0,
            flags: 0,
            pt_root: ROOT,
        }
        .to_bytes(),
    );
    let mut u = Unstructured::new(data);
    let mut batch_off = 0u64;
    let ctx_req = |ctx: u8| {
        CtxReq {
            ctx_id: u32::from(ctx % 5),
            flags: 0,
        }
        .to_bytes()
    };
    for _ in 0..64 {
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        match op {
            Op::Create { ctx, asid } => send(
                Opcode::CtxCreate,
                &CtxCreateReq {
                    ctx_id: u32::from(ctx % 5),
                    asid: u32::from(asid % 2),
                    flags: 0,
                    reserved: 0,
                }
                .to_bytes(),
            ),
            Op::Destroy { ctx } => send(Opcode::CtxDestroy, &ctx_req(ctx)),
            Op::Submit { ctx, batch } => {
                let bytes = &batch[..batch.len().min(256)];
                let off = batch_off;
                batch_off = (batch_off + 512) % 0x1_0000;
                let _ = mem.write_slice(bytes, GuestAddress(BATCH + off));
                let len = u32::try_from(bytes.len().div_ceil(8).max(1) * 8).unwrap_or(8);
                send(
                    Opcode::JobSubmit,
                    &JobSubmitReq {
                        ctx_id: u32::from(ctx % 5),
                        flags: 0,
                        batch_va: BATCH + off,
                        batch_len: len,
                        reserved: 0,
                    }
                    .to_bytes(),
                );
            }
            Op::Preempt { ctx } => send(Opcode::CtxPreempt, &ctx_req(ctx)),
            Op::Resume { ctx } => send(Opcode::CtxResume, &ctx_req(ctx)),
            Op::Invalidate { whole, page, pages } => send(
                Opcode::TlbInvalidate,
                &TlbInvalidateReq {
                    asid: 0,
                    flags: u32::from(whole),
                    va: if whole { 0 } else { u64::from(page) << 12 },
                    size: if whole {
                        0
                    } else {
                        PAGE_SIZE_4K * (u64::from(pages % 8) + 1)
                    },
                }
                .to_bytes(),
            ),
            Op::WritePte { page, value } => put(data_slot(u64::from(page)), value),
            Op::Reply { fault, cancel } => send(
                Opcode::FaultReply,
                &FaultReplyReq {
                    fault_id: u64::from(fault % 64),
                    action: 1 + u32::from(cancel),
                    flags: 0,
                }
                .to_bytes(),
            ),
        }
    }
    send(Opcode::Reset, &ResetReq::default().to_bytes());
    assert_eq!(
        gpu.held_records().1,
        0,
        "a reset leaves no completion behind"
    );
    assert_eq!(
        gpu.stats()
            .get(svmgpu_device::stats::Counter::StaleAccesses),
        0
    );
}
