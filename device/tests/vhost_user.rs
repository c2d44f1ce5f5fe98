// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The backend driven over a real vhost-user socket by the test frontend (in-process).

#[allow(dead_code)]
mod harness;

use harness::{Buf, InProcessBackend, TestFrontend, F_VERSION_1};
use svmgpu_device::config::DeviceOptions;
use svmgpu_device::stats::Counter;
use svmgpu_spec::{
    Config, GetInfoResp, Opcode, RespHeader, StatsResp, Status, CONFIG_MAGIC, QUEUE_CONTROL,
    SPEC_VERSION,
};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};

const RAM: u64 = 16 << 20;
const CTRL: usize = QUEUE_CONTROL as usize;

fn options() -> DeviceOptions {
    DeviceOptions {
        engines: 3,
        asids: 16,
        max_contexts: 32,
        tlb_entries: 128,
        tlb_ways: 8,
        max_faults: 9,
        tlb_inval_latency_ns: 1234,
        preempt_latency_ns: 5678,
        ..Default::default()
    }
}

fn get_info(fe: &mut TestFrontend) -> (RespHeader, GetInfoResp, u64) {
    let (h, body, seqno) = fe.control(Opcode::GetInfo.as_u32(), &[], 40);
    assert_eq!(body.len(), 40);
    (h, GetInfoResp::decode(&body).unwrap(), seqno)
}

#[test]
fn handshake_and_config_space() {
    let be = InProcessBackend::start(2, &options());
    let mut fe = TestFrontend::connect(&be.path, RAM);
    assert_eq!(
        fe.offered_features,
        F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | 0b11
    );
    assert!(fe
        .offered_protocol_features
        .contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
    assert_eq!(fe.queue_num(), 3);

    let raw = fe.get_config(0, 64);
    assert_eq!(raw.len(), 64);
    let c = Config::decode(&raw).unwrap();
    assert_eq!(
        c,
        Config {
            magic: CONFIG_MAGIC,
            version: SPEC_VERSION,
            device_index: 2,
            num_engines: 3,
            num_asids: 16,
            max_contexts: 32,
            tlb_entries: 128,
            tlb_ways: 8,
            page_size_mask: (1 << 12) | (1 << 21),
            va_bits: 48,
            max_outstanding_faults: 9,
            tlb_inval_latency_ns: 1234,
            preempt_latency_ns: 5678,
            reserved0: 0,
            reserved1: 0,
        }
    );
    assert_eq!(&raw[0..4], b"SVMG");
    // Partial reads, as a guest's config accessors do.
    assert_eq!(
        fe.get_config(Config::OFFSET_DEVICE_INDEX as u32, 4),
        vec![2, 0, 0, 0]
    );
    assert_eq!(
        fe.get_config(32, 8),
        ((1u64 << 12) | (1 << 21)).to_le_bytes().to_vec()
    );

    // A guest config write is ignored and does not end the connection.
    fe.set_config(0, &[0xff; 4]);
    assert_eq!(fe.get_config(0, 4), b"SVMG".to_vec());
}

#[test]
fn get_info_round_trip() {
    let be = InProcessBackend::start(0, &options());
    let mut fe = TestFrontend::connect(&be.path, RAM);
    fe.start(256);

    let (h, info, seqno) = get_info(&mut fe);
    assert_eq!(h.status, Status::Ok.as_u32());
    assert_eq!(h.seqno, seqno);
    assert_eq!(h.reserved, 0);
    assert_eq!(
        info,
        GetInfoResp {
            spec_version: SPEC_VERSION,
            device_index: 0,
            num_engines: 3,
            num_asids: 16,
            max_contexts: 32,
            tlb_entries: 128,
            tlb_ways: 8,
            reserved: 0,
            commands_completed: 0,
        }
    );
    // Each round trip is seen by the next.
    for n in 1..=5 {
        let (h, info, _) = get_info(&mut fe);
        assert_eq!(h.status, 0);
        assert_eq!(info.commands_completed, n);
    }
    // Exactly 56 bytes used, even with a bigger response buffer.
    let req = svmgpu_spec::CtrlHeader {
        opcode: 1,
        flags: 0,
        seqno: 99,
    }
    .to_bytes();
    assert_eq!(fe.control_bytes(&req, 4096).len(), 56);

    let (h, body, _) = fe.control(Opcode::GetStats.as_u32(), &[], StatsResp::SIZE as u32);
    assert_eq!(h.status, 0);
    let s = StatsResp::decode(&body).unwrap();
    assert_eq!(s.commands_completed, 7);
    assert_eq!(s.commands_failed, 0);
    assert_eq!(be.gpu.stats().get(Counter::CommandsCompleted), 8);
    // A v0.1 driver's 192-byte buffer gets the 24 counters it knows (spec 6.4.2).
    let (h, body, _) = fe.control(Opcode::GetStats.as_u32(), &[], 192);
    assert_eq!((h.status, body.len()), (0, 192));
    assert_eq!(u64::from_le_bytes(body[..8].try_into().unwrap()), 8);
}

#[test]
fn malformed_requests_get_errors_and_the_device_keeps_serving() {
    let be = InProcessBackend::start(0, &options());
    let mut fe = TestFrontend::connect(&be.path, RAM);
    fe.start(256);

    // Unknown opcode: UNSUPPORTED, seqno echoed, header only.
    let (h, body, seqno) = fe.control(0x7777, &[], 40);
    assert_eq!((h.status, h.seqno), (Status::Unsupported.as_u32(), seqno));
    assert!(body.is_empty());

    // Every opcode with an all-zero body: an error status (context 0 / ASID 0 do not exist
    // or the body is invalid), never a crash. RESET with a zero body succeeds, and so do
    // binding ASID 0 to a root table at GPA 0 (guest RAM) and unbinding it.
    for op in Opcode::ALL {
        if !matches!(op, Opcode::GetInfo | Opcode::GetStats) {
            let (h, _, _) = fe.control(op.as_u32(), &vec![0; op.request_body_size()], 0);
            let ok = matches!(op, Opcode::Reset | Opcode::AsidBind | Opcode::AsidUnbind);
            assert_eq!(h.status == Status::Ok.as_u32(), ok, "{op:?}: {}", h.status);
        }
    }

    // Too short for a header.
    let resp = fe.control_bytes(&[1, 0, 0, 0, 0, 0, 0, 0], 64);
    let h = RespHeader::decode(&resp).unwrap();
    assert_eq!(
        (h.status, h.seqno, resp.len()),
        (Status::BadLength.as_u32(), 0, 16)
    );

    // No request at all (only a writable buffer).
    let resp = fe.control_bytes(&[], 64);
    assert_eq!(
        RespHeader::decode(&resp).unwrap().status,
        Status::BadLength.as_u32()
    );

    // GET_INFO with a trailing byte, with nonzero flags, with a short response buffer.
    let (h, _, _) = fe.control(Opcode::GetInfo.as_u32(), &[0], 40);
    assert_eq!(h.status, Status::BadLength.as_u32());
    let mut req = svmgpu_spec::CtrlHeader {
        opcode: 1,
        flags: 4,
        seqno: 5,
    }
    .to_bytes();
    let resp = fe.control_bytes(&req, 56);
    let h = RespHeader::decode(&resp).unwrap();
    assert_eq!((h.status, h.seqno), (Status::InvalidArgument.as_u32(), 5));
    req[4] = 0;
    let resp = fe.control_bytes(&req, 40);
    assert_eq!(resp.len(), 16);
    assert_eq!(
        RespHeader::decode(&resp).unwrap().status,
        Status::BadLength.as_u32()
    );

    // Request buffer outside guest RAM: BAD_ADDRESS.
    let resp_gpa = fe.ram.alloc(64, 64);
    let used = fe.round_trip(CTRL, &[Buf::r(RAM + 0x1000, 16), Buf::w(resp_gpa, 64)]);
    assert_eq!(used.len, 16);
    let h = RespHeader::decode(&fe.ram.read(resp_gpa, 16)).unwrap();
    assert_eq!(h.status, Status::BadAddress.as_u32());

    // Readable after writable: BAD_LENGTH.
    let req_gpa = fe.ram.alloc(16, 16);
    fe.ram.write(req_gpa, &req);
    let used = fe.round_trip(
        CTRL,
        &[
            Buf::r(req_gpa, 8),
            Buf::w(resp_gpa, 64),
            Buf::r(req_gpa + 8, 8),
        ],
    );
    assert_eq!(used.len, 16);
    let h = RespHeader::decode(&fe.ram.read(resp_gpa, 16)).unwrap();
    assert_eq!(h.status, Status::BadLength.as_u32());

    // Nowhere to answer: returned with used length 0 and counted.
    let malformed = be.gpu.stats().get(Counter::MalformedChains);
    let used = fe.round_trip(CTRL, &[Buf::r(req_gpa, 16)]);
    assert_eq!(used.len, 0);
    let used = fe.round_trip(CTRL, &[Buf::r(req_gpa, 16), Buf::w(resp_gpa, 8)]);
    assert_eq!(used.len, 0);
    let used = fe.round_trip(CTRL, &[Buf::r(req_gpa, 16), Buf::w(RAM - 8, 64)]);
    assert_eq!(used.len, 0);
    assert_eq!(be.gpu.stats().get(Counter::MalformedChains), malformed + 3);

    // Still serving, and every answered request was counted.
    let (h, info, _) = get_info(&mut fe);
    assert_eq!(h.status, 0);
    let answered = 1 + (Opcode::ALL.len() as u64 - 2) + 2 + 3 + 2;
    assert_eq!(info.commands_completed, answered);
    let (_, body, _) = fe.control(Opcode::GetStats.as_u32(), &[], StatsResp::SIZE as u32);
    let s = StatsResp::decode(&body).unwrap();
    assert_eq!(s.commands_failed, answered - 3, "all but three failed");
    assert_eq!(s.malformed_chains, 3);
}

#[test]
fn pipelined_requests_complete_in_order() {
    let be = InProcessBackend::start(0, &options());
    let mut fe = TestFrontend::connect(&be.path, RAM);
    fe.start(256);
    let mut slots = Vec::new();
    for i in 0..100u64 {
        let req = fe.ram.alloc(16, 16);
        let resp = fe.ram.alloc(56, 8);
        fe.ram.write(
            req,
            &svmgpu_spec::CtrlHeader {
                opcode: 1,
                flags: 0,
                seqno: 1000 + i,
            }
            .to_bytes(),
        );
        let head = fe.queues[CTRL].add_chain(&fe.ram, &[Buf::r(req, 16), Buf::w(resp, 56)]);
        slots.push((head, resp));
    }
    fe.queues[CTRL].kick();
    for (i, (head, resp)) in slots.into_iter().enumerate() {
        let used = fe.queues[CTRL].wait_used(&fe.ram);
        assert_eq!((used.id, used.len), (head, 56));
        let bytes = fe.ram.read(resp, 56);
        let h = RespHeader::decode(&bytes).unwrap();
        assert_eq!((h.status, h.seqno), (0, 1000 + i as u64));
        let info = GetInfoResp::decode(&bytes[16..]).unwrap();
        assert_eq!(info.commands_completed, i as u64);
    }
    assert_eq!(fe.queues[CTRL].free_descriptors(), 256);
}

#[test]
fn reconnect_after_frontend_disconnects() {
    let be = InProcessBackend::start(1, &options());
    {
        let mut fe = TestFrontend::connect(&be.path, RAM);
        fe.start(64);
        let (h, info, _) = get_info(&mut fe);
        assert_eq!((h.status, info.commands_completed), (0, 0));
        // Dropping the frontend closes the connection.
    }
    for round in 1..=2u64 {
        let mut fe = TestFrontend::connect(&be.path, RAM);
        assert_eq!(
            Config::decode(&fe.get_config(0, 64)).unwrap().device_index,
            1
        );
        fe.start(128);
        let (h, info, _) = get_info(&mut fe);
        assert_eq!(h.status, 0);
        // The device outlives connections; its counter is monotonic.
        assert_eq!(info.commands_completed, round);
    }
}
