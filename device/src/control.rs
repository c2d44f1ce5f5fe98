// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The control-request dispatcher: request bytes in, response bytes out
//! (spec/svmgpu.md sections 6.3 and 6.4). Pure with respect to guest memory, so it is tested by
//! feeding bytes and checking bytes; `chain` moves the bytes between descriptors and here.

use log::debug;
use svmgpu_spec::{
    AsidBindReq, AsidUnbindReq, CtrlHeader, CtxCreateReq, CtxReq, FaultAction, FaultReplyReq,
    GetInfoResp, JobSubmitReq, Opcode, ResetReason, ResetReq, RespHeader, StatsResp, Status,
    TlbInvalidateReq, ASID_ALL, CTX_CREATE_FLAGS_MASK, MAX_BATCH_LEN, MAX_REQUEST_SIZE,
    PAGE_SIZE_4K, SPEC_VERSION, TLB_INVAL_FLAGS_MASK, TLB_INVAL_F_WHOLE_ASID, VA_BITS,
};
use thiserror::Error;

use crate::context::Job;
use crate::device::{Deferred, Device, Refusal};
use crate::inject::{Kind, Subject};
use crate::mmu::Scope;
use crate::stats::Counter;

/// Largest response (GET_STATS).
pub const MAX_RESPONSE_SIZE: usize = RespHeader::SIZE + StatsResp::SIZE;

/// Why a control request failed; each maps to a spec status code.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum ControlError {
    /// Shorter than the request header.
    #[error("request is {0} bytes, shorter than the 16-byte header")]
    ShortRequest(usize),
    /// Longer than `MAX_REQUEST_SIZE`.
    #[error("request is longer than {MAX_REQUEST_SIZE} bytes")]
    LongRequest,
    /// Opcode not defined by the spec.
    #[error("unknown opcode {0:#06x}")]
    UnknownOpcode(u32),
    /// Nonzero header flags.
    #[error("header flags {0:#x} must be zero")]
    HeaderFlags(u32),
    /// Request length does not match the opcode.
    #[error("{op:?} request is {got} bytes, expected {want}")]
    RequestLength {
        /// Opcode.
        op: Opcode,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// Response buffer too small for the opcode's response.
    #[error("{op:?} needs a {want}-byte response buffer, got {got}")]
    ResponseBuffer {
        /// Opcode.
        op: Opcode,
        /// Buffer size.
        got: usize,
        /// Bytes needed.
        want: usize,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("chain has a device-readable descriptor after a device-writable one")]
    ChainLayout,
    /// A request descriptor is not guest RAM.
    #[error("request buffer is not guest RAM")]
    RequestNotInRam,
    /// The command's own checks failed (section 6.4).
    #[error("{op:?}: {why} ({status:?})")]
    Rejected {
        /// Opcode.
        op: Opcode,
        /// Status returned.
        status: Status,
        /// What was wrong.
        why: &'static str,
    },
}

impl ControlError {
    /// The status code the driver sees.
    pub fn status(self) -> Status {
        match self {
            ControlError::ShortRequest(_)
            | ControlError::LongRequest
            | ControlError::RequestLength { .. }
            | ControlError::ResponseBuffer { .. }
            | ControlError::ChainLayout => Status::BadLength,
            ControlError::UnknownOpcode(_) => Status::Unsupported,
            ControlError::HeaderFlags(_) => Status::InvalidArgument,
            ControlError::RequestNotInRam => Status::BadAddress,
            ControlError::Rejected { status, .. } => status,
        }
    }
}

/// A response: header plus body, at most [`MAX_RESPONSE_SIZE`] bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    buf: [u8; MAX_RESPONSE_SIZE],
    len: usize,
}

impl Response {
    fn new(status: Status, seqno: u64, body: &[u8]) -> Self {
        let mut buf = [0u8; MAX_RESPONSE_SIZE];
        let hdr = RespHeader {
            status: status.as_u32(),
            reserved: 0,
            seqno,
        };
        let body = &body[..body.len().min(MAX_RESPONSE_SIZE - RespHeader::SIZE)];
        buf[..RespHeader::SIZE].copy_from_slice(&hdr.to_bytes());
        buf[RespHeader::SIZE..RespHeader::SIZE + body.len()].copy_from_slice(body);
        Self {
            buf,
            len: RespHeader::SIZE + body.len(),
        }
    }

    /// An error response (header only).
    pub fn error(status: Status, seqno: u64) -> Self {
        Self::new(status, seqno, &[])
    }

    /// The bytes to write into the response buffer.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The status in the header.
    pub fn status(&self) -> u32 {
        // The header is always present.
        u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
    }
}

/// Handles one control request. `req` holds the request bytes (the chain layer reads at most
/// `MAX_REQUEST_SIZE + 1` bytes, so that an over-long request is detected); `resp_cap` is
/// the size of the response buffer, at least 16. The request counts as completed.
///
/// The returned [`Deferred`] work must be started with [`crate::gpu::Gpu::start`] once the response is in
/// the used ring (spec section 6.3.3: no completion before its command's response).
pub(crate) fn handle_request(
    dev: &Device,
    req: &[u8],
    resp_cap: usize,
) -> (Response, Option<Deferred>) {
    let before = dev.stats().inc(Counter::CommandsCompleted);
    let seqno = CtrlHeader::decode(req).map_or(0, |h| h.seqno);
    match execute(dev, req, resp_cap, before) {
        Ok(r) => r,
        Err(e) => (fail(dev, e, seqno), None),
    }
}

/// Answers a request that the chain layer rejected before reading it (bad layout, request
/// not in guest RAM). The request counts as completed.
pub(crate) fn reject(dev: &Device, err: ControlError, seqno: u64) -> Response {
    dev.stats().inc(Counter::CommandsCompleted);
    fail(dev, err, seqno)
}

fn fail(dev: &Device, err: ControlError, seqno: u64) -> Response {
    dev.stats().inc(Counter::CommandsFailed);
    debug!(
        "svmgpu{}: control request seqno {seqno} failed: {err} ({:?})",
        dev.index(),
        err.status()
    );
    Response::error(err.status(), seqno)
}

fn execute(
    dev: &Device,
    req: &[u8],
    resp_cap: usize,
    before: u64,
) -> Result<(Response, Option<Deferred>), ControlError> {
    let hdr = CtrlHeader::decode(req).ok_or(ControlError::ShortRequest(req.len()))?;
    if req.len() > MAX_REQUEST_SIZE {
        return Err(ControlError::LongRequest);
    }
    let op = Opcode::from_u32(hdr.opcode).ok_or(ControlError::UnknownOpcode(hdr.opcode))?;
    if hdr.flags != 0 {
        return Err(ControlError::HeaderFlags(hdr.flags));
    }
    let want = CtrlHeader::SIZE + op.request_body_size();
    if req.len() != want {
        return Err(ControlError::RequestLength {
            op,
            got: req.len(),
            want,
        });
    }
    let want = RespHeader::SIZE + op.min_response_body_size();
    if resp_cap < want {
        return Err(ControlError::ResponseBuffer {
            op,
            got: resp_cap,
            want,
        });
    }
    let c = Cmd { dev, op };
    // Check 8: a device-initiated reset in progress; and the `device-reset` injection, which
    // starts one at a request (that request is the first to see RESETTING).
    if !matches!(op, Opcode::GetInfo | Opcode::GetStats) {
        if dev.resetting() {
            return Err(c.reject(Status::Resetting, "device-initiated reset in progress"));
        }
        if dev.injector().active(Kind::DeviceReset) {
            let subject = Subject {
                seqno: Some(hdr.seqno),
                ..Subject::default()
            };
            if let Some(hit) = dev
                .injector()
                .check(Kind::DeviceReset, &subject, dev.stats())
            {
                dev.begin_device_reset(hit.delay);
                return Err(c.reject(Status::Resetting, "device-initiated reset (injected)"));
            }
        }
    }
    let body = &req[CtrlHeader::SIZE..];
    let ok = |body: &[u8], d: Option<Deferred>| Ok((Response::new(Status::Ok, hdr.seqno, body), d));
    match op {
        Opcode::GetInfo => ok(&get_info(dev, before).to_bytes(), None),
        Opcode::GetStats => {
            let mut s = dev.stats().snapshot();
            s.commands_completed = before;
            // As many whole counters as the buffer holds (spec 6.4.2): at least those of v0.1.
            let fit = (resp_cap - RespHeader::SIZE) / 8 * 8;
            let bytes = s.to_bytes();
            ok(&bytes[..fit.min(bytes.len())], None)
        }
        Opcode::Reset => {
            let r = ResetReq::decode(body).ok_or(c.bad("short body"))?;
            c.check(r.flags == 0 && r.reserved == 0, "flags or reserved nonzero")?;
            dev.reset(Some(ResetReason::DriverRequest));
            ok(&[], None)
        }
        Opcode::CtxCreate => {
            c.ctx_create(CtxCreateReq::decode(body).ok_or(c.bad("short body"))?)?;
            ok(&[], None)
        }
        Opcode::CtxDestroy => {
            let r = c.ctx_req(body)?;
            c.device(dev.destroy_context(r.ctx_id))?;
            ok(&[], None)
        }
        Opcode::CtxPreempt | Opcode::CtxResume => {
            let r = c.ctx_req(body)?;
            let preempt = op == Opcode::CtxPreempt;
            let d = c.device(dev.accept_ctx_op(r.ctx_id, preempt, hdr.seqno))?;
            ok(&[], Some(d))
        }
        Opcode::AsidBind => {
            c.asid_bind(AsidBindReq::decode(body).ok_or(c.bad("short body"))?)?;
            ok(&[], None)
        }
        Opcode::AsidUnbind => {
            c.asid_unbind(AsidUnbindReq::decode(body).ok_or(c.bad("short body"))?)?;
            ok(&[], None)
        }
        Opcode::TlbInvalidate => {
            let scope =
                c.inval_scope(TlbInvalidateReq::decode(body).ok_or(c.bad("short body"))?)?;
            let d = c.device(dev.accept_invalidation(hdr.seqno, scope))?;
            ok(&[], Some(d))
        }
        Opcode::JobSubmit => {
            let r = JobSubmitReq::decode(body).ok_or(c.bad("short body"))?;
            let d = c.job_submit(r, hdr.seqno)?;
            ok(&[], Some(d))
        }
        Opcode::FaultReply => {
            let r = FaultReplyReq::decode(body).ok_or(c.bad("short body"))?;
            c.check(r.flags == 0, "flags nonzero")?;
            let action = FaultAction::from_u32(r.action).ok_or(c.bad("undefined action"))?;
            c.device(dev.answer_fault(r.fault_id, action == FaultAction::Resume))?;
            ok(&[], None)
        }
    }
}

/// One command's checks and effects (section 6.4).
struct Cmd<'a> {
    dev: &'a Device,
    op: Opcode,
}

impl Cmd<'_> {
    fn reject(&self, status: Status, why: &'static str) -> ControlError {
        ControlError::Rejected {
            op: self.op,
            status,
            why,
        }
    }

    /// The device's answer, its refusal as this command's error.
    fn device<T>(&self, r: Result<T, Refusal>) -> Result<T, ControlError> {
        r.map_err(|r| self.reject(r.status, r.why))
    }

    fn bad(&self, why: &'static str) -> ControlError {
        self.reject(Status::InvalidArgument, why)
    }

    fn check(&self, cond: bool, why: &'static str) -> Result<(), ControlError> {
        if cond {
            Ok(())
        } else {
            Err(self.bad(why))
        }
    }

    fn check_ctx_id(&self, id: u32) -> Result<(), ControlError> {
        self.check(
            id < self.dev.config().max_contexts,
            "context id out of range",
        )
    }

    fn check_asid(&self, asid: u32) -> Result<(), ControlError> {
        self.check(asid < self.dev.config().num_asids, "ASID out of range")
    }

    fn ctx_req(&self, body: &[u8]) -> Result<CtxReq, ControlError> {
        let r = CtxReq::decode(body).ok_or(self.bad("short body"))?;
        self.check(r.flags == 0, "flags nonzero")?;
        self.check_ctx_id(r.ctx_id)?;
        Ok(r)
    }

    fn ctx_create(&self, r: CtxCreateReq) -> Result<(), ControlError> {
        self.check_ctx_id(r.ctx_id)?;
        self.check_asid(r.asid)?;
        self.check(r.flags & !CTX_CREATE_FLAGS_MASK == 0, "undefined flag")?;
        self.check(r.reserved == 0, "reserved nonzero")?;
        self.device(self.dev.create_context(r.ctx_id, r.asid, r.flags))
    }

    fn asid_bind(&self, r: AsidBindReq) -> Result<(), ControlError> {
        self.check_asid(r.asid)?;
        self.check(r.flags == 0, "flags nonzero")?;
        self.check(
            r.pt_root % PAGE_SIZE_4K == 0 && r.pt_root < 1 << 52,
            "root unaligned or too wide",
        )?;
        self.device(self.dev.bind_asid(r.asid, r.pt_root))
    }

    fn asid_unbind(&self, r: AsidUnbindReq) -> Result<(), ControlError> {
        self.check_asid(r.asid)?;
        self.check(r.flags == 0, "flags nonzero")?;
        self.device(self.dev.unbind_asid(r.asid))
    }

    fn inval_scope(&self, r: TlbInvalidateReq) -> Result<Scope, ControlError> {
        self.check(r.flags & !TLB_INVAL_FLAGS_MASK == 0, "undefined flag")?;
        if r.flags & TLB_INVAL_F_WHOLE_ASID != 0 {
            self.check(r.va == 0 && r.size == 0, "WHOLE_ASID with a range")?;
            if r.asid == ASID_ALL {
                return Ok(Scope::All);
            }
            self.check_asid(r.asid)?;
            return Ok(Scope::Asid(r.asid));
        }
        self.check_asid(r.asid)?;
        let end = r.va.checked_add(r.size);
        self.check(
            r.va % PAGE_SIZE_4K == 0
                && r.size != 0
                && r.size % PAGE_SIZE_4K == 0
                && end.is_some_and(|e| e <= 1 << VA_BITS),
            "range unaligned, empty or beyond 2^48",
        )?;
        Ok(Scope::Range {
            asid: r.asid,
            start: r.va,
            end: r.va + r.size,
        })
    }

    fn job_submit(&self, r: JobSubmitReq, seqno: u64) -> Result<Deferred, ControlError> {
        self.check(r.flags == 0 && r.reserved == 0, "flags or reserved nonzero")?;
        self.check_ctx_id(r.ctx_id)?;
        self.check(
            r.batch_va % 8 == 0
                && r.batch_len != 0
                && r.batch_len % 8 == 0
                && r.batch_len <= MAX_BATCH_LEN
                && r.batch_va
                    .checked_add(u64::from(r.batch_len))
                    .is_some_and(|e| e <= 1 << VA_BITS),
            "batch unaligned, empty, too long or beyond 2^48",
        )?;
        let job = Job {
            seqno,
            batch_va: r.batch_va,
            batch_len: r.batch_len,
        };
        self.device(self.dev.accept_job(r.ctx_id, job))
    }
}

fn get_info(dev: &Device, commands_completed: u64) -> GetInfoResp {
    let c = dev.config();
    GetInfoResp {
        spec_version: SPEC_VERSION,
        device_index: c.device_index,
        num_engines: c.num_engines,
        num_asids: c.num_asids,
        max_contexts: c.max_contexts,
        tlb_entries: c.tlb_entries,
        tlb_ways: c.tlb_ways,
        reserved: 0,
        commands_completed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DeviceOptions;
    use crate::gpu::Gpu;

    fn gpu() -> Gpu {
        Gpu::new(
            1,
            &DeviceOptions {
                engines: 4,
                asids: 8,
                max_contexts: 16,
                tlb_entries: 32,
                tlb_ways: 2,
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn req(opcode: u32, flags: u32, seqno: u64, body: &[u8]) -> Vec<u8> {
        let mut v = CtrlHeader {
            opcode,
            flags,
            seqno,
        }
        .to_bytes()
        .to_vec();
        v.extend_from_slice(body);
        v
    }

    fn header(r: &Response) -> RespHeader {
        RespHeader::decode(r.bytes()).unwrap()
    }

    #[test]
    fn get_info_bytes() {
        let g = gpu();
        let r = g.handle_request(&req(1, 0, 0xabcd, &[]), 56).0;
        let expect_hdr = [0, 0, 0, 0, 0, 0, 0, 0, 0xcd, 0xab, 0, 0, 0, 0, 0, 0];
        assert_eq!(&r.bytes()[..16], &expect_hdr);
        assert_eq!(r.bytes().len(), 56);
        let body = &r.bytes()[16..];
        let words: Vec<u32> = body[..32]
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(words, [0x0000_0003, 1, 4, 8, 16, 32, 2, 0]);
        assert_eq!(&body[32..40], &0u64.to_le_bytes());

        // The next one sees one completed command; errors count as completed too.
        let r = g.handle_request(&req(0x9999, 0, 1, &[]), 56).0;
        assert_eq!(header(&r).status, Status::Unsupported.as_u32());
        let r = g.handle_request(&req(1, 0, 2, &[]), 100).0;
        assert_eq!(r.bytes().len(), 56);
        let info = GetInfoResp::decode(&r.bytes()[16..]).unwrap();
        assert_eq!(info.commands_completed, 2);
        assert_eq!(g.stats().get(Counter::CommandsCompleted), 3);
        assert_eq!(g.stats().get(Counter::CommandsFailed), 1);
    }

    #[test]
    fn get_stats() {
        let g = gpu();
        g.handle_request(&req(0x77, 0, 0, &[]), 16);
        let r = g.handle_request(&req(2, 0, 9, &[]), 16 + 232).0;
        assert_eq!(header(&r).status, 0);
        assert_eq!(header(&r).seqno, 9);
        assert_eq!(r.bytes().len(), 16 + StatsResp::SIZE);
        let s = StatsResp::decode(&r.bytes()[16..]).unwrap();
        assert_eq!(s.commands_completed, 1);
        assert_eq!(s.commands_failed, 1);
        // A driver of an older minor version gets the counters it knows (spec 6.4.2): whole
        // counters only, as many as fit, never fewer than v0.1's 24.
        for (cap, body) in [
            (192, 192),
            (199, 192),
            (200, 200),
            (208, 208),
            (232, 232),
            (4096, 232),
        ] {
            let r = g.handle_request(&req(2, 0, 10, &[]), 16 + cap).0;
            assert_eq!(header(&r).status, 0, "{cap}");
            assert_eq!(r.bytes().len(), 16 + body, "{cap}");
            assert_eq!(
                u64::from_le_bytes(r.bytes()[24..32].try_into().unwrap()),
                1,
                "commands_failed at offset 8"
            );
        }
        let r = g.handle_request(&req(2, 0, 11, &[]), 16 + 191).0;
        assert_eq!(header(&r).status, Status::BadLength.as_u32());
    }

    #[test]
    fn errors() {
        let g = gpu();
        let check = |request: &[u8], cap: usize, status: Status, seqno: u64| {
            let r = g.handle_request(request, cap).0;
            assert_eq!(r.bytes().len(), 16, "{request:?}");
            let h = header(&r);
            assert_eq!(h.status, status.as_u32(), "{request:?}");
            assert_eq!(h.seqno, seqno);
            assert_eq!(h.reserved, 0);
        };
        // Too short for a header: seqno unknown.
        check(&[1, 0, 0, 0, 0, 0, 0, 0], 56, Status::BadLength, 0);
        check(&[], 56, Status::BadLength, 0);
        // Unknown opcode.
        check(&req(0, 0, 5, &[]), 56, Status::Unsupported, 5);
        check(&req(0xffff_ffff, 0, 6, &[]), 56, Status::Unsupported, 6);
        // Flags must be zero.
        check(&req(1, 1, 8, &[]), 56, Status::InvalidArgument, 8);
        // Exact length.
        check(&req(1, 0, 9, &[0]), 56, Status::BadLength, 9);
        // Response buffer too small for the body.
        check(&req(1, 0, 10, &[]), 55, Status::BadLength, 10);
        check(&req(2, 0, 11, &[]), 200, Status::BadLength, 11);
        // Over-long request (the chain layer hands over MAX+1 bytes).
        check(
            &req(1, 0, 12, &vec![0u8; MAX_REQUEST_SIZE]),
            56,
            Status::BadLength,
            12,
        );
    }

    #[test]
    fn reject_counts() {
        let g = gpu();
        let r = g.reject(ControlError::RequestNotInRam, 0);
        assert_eq!(header(&r).status, Status::BadAddress.as_u32());
        let r = g.reject(ControlError::ChainLayout, 3);
        assert_eq!(header(&r).status, Status::BadLength.as_u32());
        assert_eq!(header(&r).seqno, 3);
        assert_eq!(g.stats().get(Counter::CommandsCompleted), 2);
        assert_eq!(g.stats().get(Counter::CommandsFailed), 2);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let g = gpu();
        let mut x: u64 = 0x1234_5678_9abc_def1;
        for n in 0..2000usize {
            // xorshift
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x as usize) % 64;
            let mut b: Vec<u8> = (0..len).map(|i| (x >> (i % 56)) as u8).collect();
            if n % 3 == 0 && b.len() >= 4 {
                b[..4].copy_from_slice(&((x % 4) as u32).to_le_bytes());
            }
            let cap = 16 + (x as usize >> 8) % 300;
            let r = g.handle_request(&b, cap).0;
            assert!(r.bytes().len() >= 16 && r.bytes().len() <= cap);
        }
    }
}
