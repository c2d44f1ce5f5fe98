// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! # svmgpu-spec
//!
//! The wire contract of the svmgpu virtual GPU, v0.3: identity, feature bits, config
//! space, control requests and responses, events, completion records, the page-table
//! format and the command-stream ISA.
//!
//! The normative text is `spec/svmgpu.md`; this crate follows it. All definitions live in
//! one file, `src/wire.rs`, which the guest kernel module also compiles directly (with
//! `#[path = ".../spec/src/wire.rs"] mod wire;`), so it is `no_std`, dependency-free,
//! `unsafe`-free and never panics on input: decoders return `Option`/`Result`.
//!
//! Every struct is encoded explicitly little-endian: `decode(&[u8]) -> Option<Self>`,
//! `encode(&self, &mut [u8]) -> Option<usize>`, `to_bytes()`, `SIZE` and one `OFFSET_*`
//! constant per field.

#![no_std]

mod wire;
pub use wire::*;

#[cfg(test)]
mod tests {
    use super::isa::*;
    use super::pte::*;
    use super::*;

    #[test]
    fn identity() {
        assert_eq!(VIRTIO_ID_SVMGPU, 0x3e);
        assert_eq!(PCI_VENDOR_ID, 0x1af4);
        assert_eq!(PCI_DEVICE_ID, 0x1040 + VIRTIO_ID_SVMGPU as u16);
        assert_eq!(SPEC_VERSION, 0x0000_0003);
        assert_eq!(spec_version_major(SPEC_VERSION), 0);
        assert_eq!(spec_version_minor(SPEC_VERSION), 3);
        assert_eq!(CONFIG_MAGIC.to_le_bytes(), *b"SVMG");
        assert_eq!((QUEUE_CONTROL, QUEUE_EVENT, QUEUE_COMPLETION), (0, 1, 2));
        assert_eq!(NUM_QUEUES, 3);
        assert_eq!(MAX_QUEUE_SIZE, 1024);
        assert_eq!(VIRTIO_F_VERSION_1, 32);
        assert_eq!(SVMGPU_FEATURES_MASK, 0b111);
    }

    #[test]
    fn config_layout() {
        assert_eq!(Config::SIZE, CONFIG_SIZE);
        assert_eq!(Config::SIZE, 64);
        let offs = [
            (Config::OFFSET_MAGIC, 0),
            (Config::OFFSET_VERSION, 4),
            (Config::OFFSET_DEVICE_INDEX, 8),
            (Config::OFFSET_NUM_ENGINES, 12),
            (Config::OFFSET_NUM_ASIDS, 16),
            (Config::OFFSET_MAX_CONTEXTS, 20),
            (Config::OFFSET_TLB_ENTRIES, 24),
            (Config::OFFSET_TLB_WAYS, 28),
            (Config::OFFSET_PAGE_SIZE_MASK, 32),
            (Config::OFFSET_VA_BITS, 40),
            (Config::OFFSET_MAX_OUTSTANDING_FAULTS, 44),
            (Config::OFFSET_TLB_INVAL_LATENCY_NS, 48),
            (Config::OFFSET_PREEMPT_LATENCY_NS, 52),
            (Config::OFFSET_RESERVED0, 56),
            (Config::OFFSET_RESERVED1, 60),
        ];
        for (got, want) in offs {
            assert_eq!(got, want);
        }
        let c = Config {
            magic: CONFIG_MAGIC,
            version: SPEC_VERSION,
            device_index: 3,
            num_engines: 2,
            num_asids: 64,
            max_contexts: 256,
            tlb_entries: 64,
            tlb_ways: 4,
            page_size_mask: PAGE_SIZE_4K | PAGE_SIZE_2M,
            va_bits: 48,
            max_outstanding_faults: 64,
            tlb_inval_latency_ns: 10_000,
            preempt_latency_ns: 50_000,
            reserved0: 0,
            reserved1: 0,
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..4], b"SVMG");
        assert_eq!(&b[4..8], &[3, 0, 0, 0]);
        assert_eq!(&b[8..12], &[3, 0, 0, 0]);
        assert_eq!(&b[32..40], &0x0020_1000u64.to_le_bytes());
        assert_eq!(&b[40..44], &48u32.to_le_bytes());
        assert_eq!(&b[52..56], &50_000u32.to_le_bytes());
        assert_eq!(&b[56..64], &[0; 8]);
        assert_eq!(Config::decode(&b), Some(c));
        assert!(c.is_compatible());
        assert_eq!(Config::decode(&b[..63]), None);
        let mut short = [0u8; 63];
        assert_eq!(c.encode(&mut short), None);
    }

    #[test]
    fn control_layouts() {
        assert_eq!(CtrlHeader::SIZE, 16);
        assert_eq!(
            (
                CtrlHeader::OFFSET_OPCODE,
                CtrlHeader::OFFSET_FLAGS,
                CtrlHeader::OFFSET_SEQNO
            ),
            (0, 4, 8)
        );
        assert_eq!(RespHeader::SIZE, 16);
        assert_eq!(
            (
                RespHeader::OFFSET_STATUS,
                RespHeader::OFFSET_RESERVED,
                RespHeader::OFFSET_SEQNO
            ),
            (0, 4, 8)
        );
        assert_eq!(GetInfoResp::SIZE, 40);
        assert_eq!(RespHeader::SIZE + GetInfoResp::SIZE, 56);
        assert_eq!(GetInfoResp::OFFSET_SPEC_VERSION, 0);
        assert_eq!(GetInfoResp::OFFSET_DEVICE_INDEX, 4);
        assert_eq!(GetInfoResp::OFFSET_NUM_ENGINES, 8);
        assert_eq!(GetInfoResp::OFFSET_NUM_ASIDS, 12);
        assert_eq!(GetInfoResp::OFFSET_MAX_CONTEXTS, 16);
        assert_eq!(GetInfoResp::OFFSET_TLB_ENTRIES, 20);
        assert_eq!(GetInfoResp::OFFSET_TLB_WAYS, 24);
        assert_eq!(GetInfoResp::OFFSET_RESERVED, 28);
        assert_eq!(GetInfoResp::OFFSET_COMMANDS_COMPLETED, 32);

        assert_eq!(ResetReq::SIZE, 8);
        assert_eq!(CtxCreateReq::SIZE, 16);
        assert_eq!(
            (
                CtxCreateReq::OFFSET_CTX_ID,
                CtxCreateReq::OFFSET_ASID,
                CtxCreateReq::OFFSET_FLAGS,
                CtxCreateReq::OFFSET_RESERVED
            ),
            (0, 4, 8, 12)
        );
        assert_eq!(CtxReq::SIZE, 8);
        assert_eq!((CtxReq::OFFSET_CTX_ID, CtxReq::OFFSET_FLAGS), (0, 4));
        assert_eq!(AsidBindReq::SIZE, 16);
        assert_eq!(
            (
                AsidBindReq::OFFSET_ASID,
                AsidBindReq::OFFSET_FLAGS,
                AsidBindReq::OFFSET_PT_ROOT
            ),
            (0, 4, 8)
        );
        assert_eq!(AsidUnbindReq::SIZE, 8);
        assert_eq!(TlbInvalidateReq::SIZE, 24);
        assert_eq!(
            (
                TlbInvalidateReq::OFFSET_ASID,
                TlbInvalidateReq::OFFSET_FLAGS,
                TlbInvalidateReq::OFFSET_VA,
                TlbInvalidateReq::OFFSET_SIZE
            ),
            (0, 4, 8, 16)
        );
        assert_eq!(JobSubmitReq::SIZE, 24);
        assert_eq!(
            (
                JobSubmitReq::OFFSET_CTX_ID,
                JobSubmitReq::OFFSET_FLAGS,
                JobSubmitReq::OFFSET_BATCH_VA,
                JobSubmitReq::OFFSET_BATCH_LEN,
                JobSubmitReq::OFFSET_RESERVED
            ),
            (0, 4, 8, 16, 20)
        );
        assert_eq!(FaultReplyReq::SIZE, 16);
        assert_eq!(
            (
                FaultReplyReq::OFFSET_FAULT_ID,
                FaultReplyReq::OFFSET_ACTION,
                FaultReplyReq::OFFSET_FLAGS
            ),
            (0, 8, 12)
        );
        assert_eq!(StatsResp::SIZE, 29 * 8);
        assert_eq!(STATS_V0_1_SIZE, 24 * 8);
        assert_eq!(StatsResp::OFFSET_COMMANDS_COMPLETED, 0);
        assert_eq!(StatsResp::OFFSET_PAGE_FAULTS, 48);
        assert_eq!(StatsResp::OFFSET_TLB_HITS, 72);
        assert_eq!(StatsResp::OFFSET_RESETS, 160);
        assert_eq!(StatsResp::OFFSET_AUDIT_CHECKS, 184);
        assert_eq!(StatsResp::OFFSET_UNFLUSHED_ENTRIES, 192);
        assert_eq!(StatsResp::OFFSET_NARROW_FLUSH_ENTRIES, 200);
        assert_eq!(StatsResp::OFFSET_FAULTS_RETRIED, 208);
        assert_eq!(StatsResp::OFFSET_FAULT_RETRY_NS, 216);
        assert_eq!(StatsResp::OFFSET_FAULT_DRIVER_NS, 224);
    }

    #[test]
    fn opcodes_and_status() {
        assert_eq!(
            (JOB_QUEUE_DEPTH, FENCE_BACKLOG, MAX_ASYNC_OUTSTANDING),
            (64, 64, 256)
        );
        let ops = [
            (Opcode::GetInfo, 0x0001),
            (Opcode::GetStats, 0x0002),
            (Opcode::Reset, 0x0003),
            (Opcode::CtxCreate, 0x0010),
            (Opcode::CtxDestroy, 0x0011),
            (Opcode::CtxPreempt, 0x0012),
            (Opcode::CtxResume, 0x0013),
            (Opcode::AsidBind, 0x0020),
            (Opcode::AsidUnbind, 0x0021),
            (Opcode::TlbInvalidate, 0x0030),
            (Opcode::JobSubmit, 0x0040),
            (Opcode::FaultReply, 0x0050),
        ];
        assert_eq!(Opcode::ALL.len(), ops.len());
        for (op, v) in ops {
            assert_eq!(op.as_u32(), v);
            assert_eq!(Opcode::from_u32(v), Some(op));
        }
        assert_eq!(Opcode::from_u32(0), None);
        assert_eq!(Opcode::from_u32(0xffff_ffff), None);
        assert!(Opcode::TlbInvalidate.is_async());
        assert!(Opcode::CtxPreempt.is_async());
        assert!(Opcode::CtxResume.is_async());
        assert!(!Opcode::JobSubmit.is_async());
        assert_eq!(Opcode::GetInfo.request_body_size(), 0);
        assert_eq!(Opcode::GetInfo.response_body_size(), 40);
        assert_eq!(Opcode::TlbInvalidate.request_body_size(), 24);
        assert_eq!(Opcode::GetStats.response_body_size(), 232);
        assert_eq!(Opcode::GetStats.min_response_body_size(), 192);
        assert_eq!(Opcode::GetInfo.min_response_body_size(), 40);

        let st = [
            (Status::Ok, 0),
            (Status::Unsupported, 1),
            (Status::BadLength, 2),
            (Status::InvalidArgument, 3),
            (Status::BadAddress, 4),
            (Status::NoResources, 5),
            (Status::NotFound, 6),
            (Status::AlreadyExists, 7),
            (Status::BadState, 8),
            (Status::Busy, 9),
            (Status::Resetting, 10),
            (Status::Internal, 11),
            (Status::Timeout, 12),
            (Status::Canceled, 13),
            (Status::JobFault, 0x100),
            (Status::JobInvalidInstruction, 0x101),
            (Status::JobMisaligned, 0x102),
            (Status::JobBatchOverrun, 0x103),
            (Status::JobSemaphoreTimeout, 0x104),
            (Status::JobHang, 0x105),
            (Status::JobSkipped, 0x106),
            (Status::JobLoopOverflow, 0x107),
            (Status::JobTimeout, 0x108),
        ];
        assert_eq!(Status::ALL.len(), st.len());
        for (s, v) in st {
            assert_eq!(s.as_u32(), v);
            assert_eq!(Status::from_u32(v), Some(s));
        }
        assert_eq!(Status::from_u32(14), None);
    }

    #[test]
    fn header_roundtrip() {
        let h = CtrlHeader {
            opcode: 1,
            flags: 0,
            seqno: 0x1122_3344_5566_7788,
        };
        let b = h.to_bytes();
        assert_eq!(
            b,
            [1, 0, 0, 0, 0, 0, 0, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(CtrlHeader::decode(&b), Some(h));
        // decode reads a prefix; trailing bytes are the caller's business.
        let mut long = [0xffu8; 20];
        long[..16].copy_from_slice(&b);
        assert_eq!(CtrlHeader::decode(&long), Some(h));
        assert_eq!(CtrlHeader::decode(&b[..15]), None);
        assert_eq!(CtrlHeader::decode(&[]), None);
        assert_eq!(read_u32(&b, 0), Some(1));
        assert_eq!(read_u32(&b, 13), None);
        assert_eq!(read_u64(&b, usize::MAX), None);
    }

    #[test]
    fn event_layouts() {
        assert_eq!(EVENT_SIZE, 64);
        assert_eq!(EventHeader::SIZE, EVENT_BODY_OFFSET);
        assert_eq!(
            (
                EventHeader::OFFSET_EVENT_TYPE,
                EventHeader::OFFSET_FLAGS,
                EventHeader::OFFSET_EVENT_SEQ
            ),
            (0, 4, 8)
        );
        for size in [
            PageFaultEvent::SIZE,
            ContextErrorEvent::SIZE,
            EngineHangEvent::SIZE,
            DeviceResetEvent::SIZE,
            EventsLostEvent::SIZE,
        ] {
            assert_eq!(size + EVENT_BODY_OFFSET, EVENT_SIZE);
        }
        assert_eq!(PageFaultEvent::OFFSET_FAULT_ID, 0);
        assert_eq!(PageFaultEvent::OFFSET_VA, 8);
        assert_eq!(PageFaultEvent::OFFSET_ASID, 16);
        assert_eq!(PageFaultEvent::OFFSET_CTX_ID, 20);
        assert_eq!(PageFaultEvent::OFFSET_ENGINE, 24);
        assert_eq!(PageFaultEvent::OFFSET_ACCESS, 28);
        assert_eq!(PageFaultEvent::OFFSET_REASON, 32);
        assert_eq!(PageFaultEvent::OFFSET_LEVEL, 36);
        assert_eq!(PageFaultEvent::OFFSET_FLAGS, 40);
        assert_eq!(ContextErrorEvent::OFFSET_ERROR, 8);
        assert_eq!(ContextErrorEvent::OFFSET_JOB_SEQNO, 16);
        assert_eq!(ContextErrorEvent::OFFSET_PC, 24);
        assert_eq!(ContextErrorEvent::OFFSET_ADDRESS, 32);
        assert_eq!(EngineHangEvent::OFFSET_STALLED_NS, 24);
        assert_eq!(DeviceResetEvent::OFFSET_RESET_COUNT, 8);
        assert_eq!(EventsLostEvent::OFFSET_LOST, 0);
        assert_eq!(EventType::PageFault.as_u32(), 1);
        assert_eq!(EventType::ContextError.as_u32(), 2);
        assert_eq!(EventType::EngineHang.as_u32(), 3);
        assert_eq!(EventType::DeviceReset.as_u32(), 4);
        assert_eq!(EventType::EventsLost.as_u32(), 5);
        assert_eq!(AccessKind::Read.as_u32(), 1);
        assert_eq!(AccessKind::Exec.as_u32(), 4);
        assert_eq!(FaultReason::NotPresent.as_u32(), 1);
        assert_eq!(FaultReason::VaRange.as_u32(), 7);
        assert_eq!(FaultReason::from_u32(8), None);
        assert_eq!(FaultAction::Resume.as_u32(), 1);
        assert_eq!(FaultAction::Cancel.as_u32(), 2);
    }

    #[test]
    fn event_roundtrip() {
        let pf = PageFaultEvent {
            fault_id: 7,
            va: 0x7fff_0000_1234,
            asid: 3,
            ctx_id: 9,
            engine: 1,
            access: AccessKind::Write.as_u32(),
            reason: FaultReason::WriteProtect.as_u32(),
            level: 0,
            flags: 0,
            reserved: 0,
        };
        let mut buf = [0xaau8; 80];
        assert_eq!(Event::PageFault(pf).encode(42, &mut buf), Some(64));
        assert_eq!(&buf[0..4], &1u32.to_le_bytes());
        assert_eq!(&buf[8..16], &42u64.to_le_bytes());
        assert_eq!(&buf[16..24], &7u64.to_le_bytes());
        assert_eq!(buf[64], 0xaa);
        assert_eq!(Event::decode(&buf), Some((42, Event::PageFault(pf))));
        assert_eq!(Event::decode(&buf[..63]), None);
        buf[0] = 99;
        assert_eq!(Event::decode(&buf), None);
        let mut short = [0u8; 63];
        assert_eq!(Event::PageFault(pf).encode(1, &mut short), None);
    }

    #[test]
    fn completion_layout() {
        assert_eq!(Completion::SIZE, COMPLETION_SIZE);
        assert_eq!(Completion::SIZE, 32);
        assert_eq!(
            (
                Completion::OFFSET_KIND,
                Completion::OFFSET_STATUS,
                Completion::OFFSET_SEQNO,
                Completion::OFFSET_CTX_ID,
                Completion::OFFSET_OPCODE,
                Completion::OFFSET_VALUE
            ),
            (0, 4, 8, 16, 20, 24)
        );
        assert_eq!(CompletionKind::CommandDone.as_u32(), 1);
        assert_eq!(CompletionKind::JobDone.as_u32(), 2);
        assert_eq!(CompletionKind::Fence.as_u32(), 3);
        let c = Completion {
            kind: 1,
            status: 0,
            seqno: 5,
            ctx_id: CTX_NONE,
            opcode: Opcode::TlbInvalidate.as_u32(),
            value: 3,
        };
        assert_eq!(Completion::decode(&c.to_bytes()), Some(c));
    }

    #[test]
    fn pte_format() {
        assert_eq!(RESERVED_MASK & (PRESENT | WRITABLE | NO_EXEC | HUGE), 0);
        assert_eq!(RESERVED_MASK & ADDR_MASK, 0);
        assert_eq!(RESERVED_MASK & SW_MASK, 0);
        assert_eq!(
            RESERVED_MASK | ADDR_MASK | SW_MASK | PRESENT | WRITABLE | NO_EXEC | HUGE,
            u64::MAX
        );
        assert_eq!(ADDR_MASK_2M | RESERVED_MASK_2M, ADDR_MASK);

        let rw = Perms {
            writable: true,
            no_exec: true,
        };
        let e = page_4k(0x1234_5000, rw).unwrap();
        assert_eq!(e, 0x1234_5000 | 0b111);
        assert_eq!(
            decode(e, 0),
            PteKind::Leaf {
                pa: 0x1234_5000,
                size: PAGE_SIZE_4K,
                writable: true,
                executable: false
            }
        );
        // The same bits at a table level are a table pointer (W/NX ignored).
        assert_eq!(decode(e, 2), PteKind::Table { pa: 0x1234_5000 });
        assert_eq!(page_4k(0x1234_5008, rw), None);
        assert_eq!(page_4k(1 << 52, rw), None);

        let h = page_2m(0x4020_0000, Perms::default()).unwrap();
        assert_eq!(
            decode(h, 1),
            PteKind::Leaf {
                pa: 0x4020_0000,
                size: PAGE_SIZE_2M,
                writable: false,
                executable: true
            }
        );
        assert_eq!(decode(h, 0), PteKind::Reserved);
        assert_eq!(decode(h, 2), PteKind::Reserved);
        assert_eq!(decode(h, 3), PteKind::Reserved);
        assert_eq!(decode(h | 0x1000, 1), PteKind::Reserved);
        assert_eq!(page_2m(0x4020_1000, Perms::default()), None);

        assert_eq!(decode(0, 0), PteKind::NotPresent);
        assert_eq!(decode(!PRESENT, 1), PteKind::NotPresent);
        assert_eq!(decode(PRESENT | (1 << 3), 0), PteKind::Reserved);
        assert_eq!(decode(PRESENT | (1 << 63), 3), PteKind::Reserved);
        assert_eq!(
            decode(PRESENT | SW_MASK | 0x5000, 3),
            PteKind::Table { pa: 0x5000 }
        );
        assert_eq!(decode(PRESENT, 4), PteKind::BadLevel);
        assert_eq!(table(0x7000), Some(0x7001));
        assert_eq!(table(0x7001), None);

        let va = 0x0000_7f12_3456_7000u64;
        assert_eq!(index(va, 3), Some(((va >> 39) & 511) as usize));
        assert_eq!(index(va, 2), Some(((va >> 30) & 511) as usize));
        assert_eq!(index(va, 1), Some(((va >> 21) & 511) as usize));
        assert_eq!(index(va, 0), Some(((va >> 12) & 511) as usize));
        assert_eq!(index(1 << 48, 0), None);
        assert_eq!(index(va, 4), None);
        assert_eq!(entry_address(0x10_0000, 0x3000, 0), Some(0x10_0018));
        assert_eq!(entry_address(0x10_0008, 0x3000, 0), None);
        assert_eq!(level_span(0), Some(4096));
        assert_eq!(level_span(1), Some(2 << 20));
        assert_eq!(level_span(3), Some(512 << 30));
        assert_eq!(level_span(4), None);
        // Exhaustive-ish: decode is total over odd bit patterns.
        for level in 0..6 {
            for i in 0..64 {
                let _ = decode(1u64.rotate_left(i) | PRESENT, level);
                let _ = decode(u64::MAX.rotate_left(i), level);
            }
        }
    }

    #[test]
    fn isa_encoding() {
        assert_eq!(header(OP_STORE, FLAG_SIZE64, 0, 0), 0x0103);
        assert_eq!(header(OP_FILL, 0, 0, 0xdead_beef), 0xdead_beef_0000_0004);
        assert_eq!(header(OP_WAIT, 1, 2, 5), 0x0000_0005_0002_0107);
        let all = [
            Insn::Nop,
            Insn::End,
            Insn::Store {
                size64: true,
                va: 0x1000,
                value: u64::MAX,
            },
            Insn::Store {
                size64: false,
                va: 0x1004,
                value: 7,
            },
            Insn::Fill {
                va: 0x2000,
                len: 4096,
                pattern: 0xa5a5_a5a5,
            },
            Insn::Copy {
                dst: 0x3001,
                src: 0x4003,
                len: 17,
            },
            Insn::AtomicAdd {
                size64: false,
                va: 0x5000,
                value: 1,
            },
            Insn::Wait {
                size64: true,
                op: CompareOp::Ge,
                timeout_us: 1000,
                va: 0x6000,
                value: 3,
            },
            Insn::Loop {
                count: 10,
                offset: -24,
            },
            Insn::Delay { ns: 5000 },
            Insn::Checksum {
                src: 0x7000,
                len: 64,
                dst: 0x8000,
            },
            Insn::Fence {
                notify: true,
                va: 0x9000,
                value: 42,
            },
        ];
        let lens = [1, 1, 3, 3, 3, 4, 3, 3, 2, 1, 4, 3];
        for (insn, len) in all.iter().zip(lens) {
            let (w, n) = insn.encode();
            assert_eq!(n, len, "{insn:?}");
            assert_eq!(insn_qwords(w[0]), Some(n));
            assert_eq!(Insn::decode(&w[..n]), Ok(*insn));
            assert_eq!(Insn::decode(&w[..n - 1]), Err(IsaError::Truncated));
            let mut bytes = [0u8; 32];
            assert_eq!(insn.encode_bytes(&mut bytes), Some(n * 8));
            assert_eq!(&bytes[..8], &w[0].to_le_bytes());
        }
        assert_eq!(Insn::decode(&[]), Err(IsaError::Truncated));
        assert_eq!(Insn::decode(&[0]), Err(IsaError::BadOpcode));
        assert_eq!(Insn::decode(&[0xff]), Err(IsaError::BadOpcode));
        assert_eq!(
            Insn::decode(&[header(OP_NOP, 0, 0, 0) | 0x0100_0000]),
            Err(IsaError::ReservedBits)
        );
        assert_eq!(
            Insn::decode(&[header(OP_NOP, 1, 0, 0)]),
            Err(IsaError::ReservedBits)
        );
        assert_eq!(
            Insn::decode(&[header(OP_END, 0, 0, 1)]),
            Err(IsaError::ReservedBits)
        );
        assert_eq!(
            Insn::decode(&[header(OP_STORE, 0, 0, 0), 0x1002, 0]),
            Err(IsaError::Misaligned)
        );
        assert_eq!(
            Insn::decode(&[header(OP_STORE, 0, 0, 0), 0x1000, 1 << 32]),
            Err(IsaError::ReservedBits)
        );
        assert_eq!(
            Insn::decode(&[header(OP_FILL, 0, 0, 0), 0x1000, 6]),
            Err(IsaError::BadOperand)
        );
        assert_eq!(
            Insn::decode(&[header(OP_FILL, 0, 0, 0), 0x1000, MAX_BULK_LEN + 4]),
            Err(IsaError::BadOperand)
        );
        assert_eq!(
            Insn::decode(&[header(OP_WAIT, 0, 6, 0), 0x1000, 0]),
            Err(IsaError::BadOperand)
        );
        assert_eq!(
            Insn::decode(&[header(OP_LOOP, 0, 0, 0), (-8i64) as u64]),
            Err(IsaError::BadOperand)
        );
        assert_eq!(
            Insn::decode(&[header(OP_LOOP, 0, 0, 2), 8]),
            Err(IsaError::BadOperand)
        );
        assert_eq!(
            Insn::decode(&[header(OP_LOOP, 0, 0, 2), (-4i64) as u64]),
            Err(IsaError::BadOperand)
        );
        assert_eq!(
            Insn::decode(&[header(OP_FENCE, 2, 0, 0), 0, 0]),
            Err(IsaError::ReservedBits)
        );
        assert_eq!(
            Insn::decode(&[header(OP_CHECKSUM, 0, 0, 0), 0, 8, 4]),
            Err(IsaError::Misaligned)
        );
        assert_eq!(IsaError::Truncated.job_status(), Status::JobBatchOverrun);
        assert_eq!(IsaError::Misaligned.job_status(), Status::JobMisaligned);
        assert_eq!(
            IsaError::BadOpcode.job_status(),
            Status::JobInvalidInstruction
        );
        // Total over arbitrary headers.
        for i in 0..64 {
            for op in 0..16u64 {
                let h = op | (1u64.rotate_left(i));
                let _ = Insn::decode(&[h, u64::MAX, 1, 2]);
            }
        }
    }

    #[test]
    fn fnv() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fnv1a64_update(fnv1a64(b"foo"), b"bar"), fnv1a64(b"foobar"));
    }
}
