// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Moving control requests and responses between a descriptor chain and the dispatcher,
//! treating every descriptor as untrusted (spec/svmgpu.md section 5.2).

use log::warn;
use svmgpu_spec::{CtrlHeader, RespHeader, MAX_REQUEST_SIZE};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::control::{handle_request, reject, ControlError, Response};
use crate::gpu::{Deferred, Gpu};
use crate::stats::Counter;

/// One descriptor of a chain as the device sees it (indirect tables already resolved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub writable: bool,
}

impl Desc {
    /// A device-readable descriptor.
    pub fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: false,
        }
    }

    /// A device-writable descriptor.
    pub fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: true,
        }
    }
}

/// Chains that cannot be answered at all.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// Fewer writable bytes than a response header.
    #[error("chain has {0} device-writable bytes, fewer than a response header")]
    NoRoomForResponse(u64),
    /// A writable descriptor is not guest RAM.
    #[error("response descriptor {addr:#x}+{len:#x} is not writable guest RAM")]
    ResponseNotInRam {
        /// Address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Writing the response failed after the range check (guest memory changed under us).
    #[error("writing the response failed")]
    ResponseWrite,
}

fn in_ram<M: GuestMemory>(mem: &M, d: &Desc, access: Permissions) -> bool {
    d.len == 0 || mem.check_range(GuestAddress(d.addr), d.len as usize, access)
}

/// Serves one controlq chain: returns the used length to report (0 if the chain could not
/// be answered; then it is logged and counted as malformed) and the work to start once the
/// chain is in the used ring. Never panics on guest input.
pub fn serve_control_chain<M: GuestMemory>(
    gpu: &Gpu,
    mem: &M,
    descs: &[Desc],
) -> (u32, Option<Deferred>) {
    match process_control_chain(gpu, mem, descs) {
        Ok(r) => r,
        Err(e) => {
            gpu.stats().inc(Counter::MalformedChains);
            warn!("svmgpu{}: dropped a control chain: {e}", gpu.index());
            (0, None)
        }
    }
}

/// Serves one controlq chain; `Err` if there is nowhere to write a response.
pub fn process_control_chain<M: GuestMemory>(
    gpu: &Gpu,
    mem: &M,
    descs: &[Desc],
) -> Result<(u32, Option<Deferred>), ChainError> {
    let first_w = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    let (readable, rest) = descs.split_at(first_w);
    let layout_ok = rest.iter().all(|d| d.writable);

    // 1. Somewhere to answer?
    let mut cap: u64 = 0;
    for d in rest.iter().filter(|d| d.writable) {
        if !in_ram(mem, d, Permissions::Write) {
            return Err(ChainError::ResponseNotInRam {
                addr: d.addr,
                len: d.len,
            });
        }
        cap = cap.saturating_add(u64::from(d.len));
    }
    if cap < RespHeader::SIZE as u64 {
        return Err(ChainError::NoRoomForResponse(cap));
    }
    let cap = usize::try_from(cap).unwrap_or(usize::MAX);

    // 2..4. Layout, readability, then the request bytes (at most MAX + 1, so that an
    // over-long request is seen as such by the dispatcher).
    let (response, deferred) = if !layout_ok {
        (reject(gpu, ControlError::ChainLayout, 0), None)
    } else if !readable.iter().all(|d| in_ram(mem, d, Permissions::Read)) {
        (reject(gpu, ControlError::RequestNotInRam, 0), None)
    } else {
        match gather(mem, readable, MAX_REQUEST_SIZE + 1) {
            Some(req) => handle_request(gpu, &req, cap),
            None => (reject(gpu, ControlError::RequestNotInRam, 0), None),
        }
    };
    Ok((scatter(mem, rest, &response)?, deferred))
}

/// Reads up to `limit` bytes from the readable descriptors.
fn gather<M: GuestMemory>(mem: &M, readable: &[Desc], limit: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for d in readable {
        let room = limit - out.len();
        if room == 0 {
            break;
        }
        let n = (d.len as usize).min(room);
        let start = out.len();
        out.resize(start + n, 0);
        mem.read_slice(&mut out[start..], GuestAddress(d.addr))
            .ok()?;
    }
    Some(out)
}

/// Writes the response across the writable descriptors; returns the bytes written.
fn scatter<M: GuestMemory>(
    mem: &M,
    descs: &[Desc],
    response: &Response,
) -> Result<u32, ChainError> {
    let mut bytes = response.bytes();
    let mut written = 0u32;
    for d in descs.iter().filter(|d| d.writable) {
        if bytes.is_empty() {
            break;
        }
        let n = (d.len as usize).min(bytes.len());
        mem.write_slice(&bytes[..n], GuestAddress(d.addr))
            .map_err(|_| ChainError::ResponseWrite)?;
        bytes = &bytes[n..];
        // n <= response size, far below u32::MAX.
        written += n as u32;
    }
    Ok(written)
}

/// Writes a device → driver record (event or completion) at the start of a chain's
/// device-writable descriptors, which are treated as one buffer (readable ones are ignored).
/// Returns the used length, or `None` if the writable part is shorter than the record or not
/// writable guest RAM (spec/svmgpu.md section 4).
pub fn write_record<M: GuestMemory>(mem: &M, descs: &[Desc], record: &[u8]) -> Option<u32> {
    let mut room: u64 = 0;
    for d in descs.iter().filter(|d| d.writable) {
        if !in_ram(mem, d, Permissions::Write) {
            return None;
        }
        room = room.saturating_add(u64::from(d.len));
    }
    if room < record.len() as u64 {
        return None;
    }
    let mut bytes = record;
    for d in descs.iter().filter(|d| d.writable) {
        if bytes.is_empty() {
            break;
        }
        let n = (d.len as usize).min(bytes.len());
        mem.write_slice(&bytes[..n], GuestAddress(d.addr)).ok()?;
        bytes = &bytes[n..];
    }
    u32::try_from(record.len()).ok()
}

/// The seqno of a request, if its header is complete (for log lines).
pub fn request_seqno(req: &[u8]) -> Option<u64> {
    CtrlHeader::decode(req).map(|h| h.seqno)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DeviceOptions;
    use svmgpu_spec::{GetInfoResp, Status, SPEC_VERSION};
    use vm_memory::GuestMemoryMmap;

    const BASE: u64 = 0x1_0000;
    const SIZE: usize = 0x1_0000;

    fn setup() -> (Gpu, GuestMemoryMmap) {
        let gpu = Gpu::new(0, &DeviceOptions::default()).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(BASE), SIZE)]).unwrap();
        (gpu, mem)
    }

    fn put(mem: &GuestMemoryMmap, addr: u64, b: &[u8]) {
        mem.write_slice(b, GuestAddress(addr)).unwrap();
    }

    fn get(mem: &GuestMemoryMmap, addr: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn get_info(seqno: u64) -> [u8; 16] {
        CtrlHeader {
            opcode: 1,
            flags: 0,
            seqno,
        }
        .to_bytes()
    }

    fn status_at(mem: &GuestMemoryMmap, addr: u64) -> (Status, u64) {
        let h = RespHeader::decode(&get(mem, addr, 16)).unwrap();
        (Status::from_u32(h.status).unwrap(), h.seqno)
    }

    #[test]
    fn get_info_simple_chain() {
        let (gpu, mem) = setup();
        put(&mem, BASE, &get_info(77));
        let n = process_control_chain(
            &gpu,
            &mem,
            &[Desc::readable(BASE, 16), Desc::writable(BASE + 0x100, 64)],
        )
        .unwrap()
        .0;
        assert_eq!(n, 56);
        assert_eq!(status_at(&mem, BASE + 0x100), (Status::Ok, 77));
        let info = GetInfoResp::decode(&get(&mem, BASE + 0x110, 40)).unwrap();
        assert_eq!(info.spec_version, SPEC_VERSION);
        assert_eq!(info.num_engines, 2);
    }

    #[test]
    fn split_request_and_response() {
        let (gpu, mem) = setup();
        let r = get_info(5);
        put(&mem, BASE, &r[..3]);
        put(&mem, BASE + 0x40, &r[3..]);
        // Response split 10 + 100 bytes.
        let n = process_control_chain(
            &gpu,
            &mem,
            &[
                Desc::readable(BASE, 3),
                Desc::readable(BASE + 0x40, 13),
                Desc::writable(BASE + 0x200, 10),
                Desc::writable(BASE + 0x300, 100),
            ],
        )
        .unwrap()
        .0;
        assert_eq!(n, 56);
        let mut resp = get(&mem, BASE + 0x200, 10);
        resp.extend(get(&mem, BASE + 0x300, 46));
        let h = RespHeader::decode(&resp).unwrap();
        assert_eq!((h.status, h.seqno), (0, 5));
    }

    #[test]
    fn records_into_split_buffers() {
        let (_, mem) = setup();
        let rec: Vec<u8> = (0..32).collect();
        let d = [
            Desc::readable(BASE, 8),
            Desc::writable(BASE + 0x100, 10),
            Desc::writable(BASE + 0x200, 30),
        ];
        assert_eq!(write_record(&mem, &d, &rec), Some(32));
        let mut got = get(&mem, BASE + 0x100, 10);
        got.extend(get(&mem, BASE + 0x200, 22));
        assert_eq!(got, rec);
        assert_eq!(write_record(&mem, &d[..2], &rec), None, "too short");
        assert_eq!(write_record(&mem, &[Desc::writable(0x10, 64)], &rec), None);
        assert_eq!(write_record(&mem, &[Desc::readable(BASE, 64)], &rec), None);
    }

    #[test]
    fn random_chains_never_panic() {
        let (gpu, mem) = setup();
        put(&mem, BASE, &get_info(1));
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let addrs = [
            0,
            BASE,
            BASE + 0x800,
            BASE + SIZE as u64 - 16,
            u64::MAX - 8,
            0xdead_0000,
        ];
        let lens = [0, 1, 15, 16, 56, 4097, 0x8000, u32::MAX];
        for _ in 0..3000 {
            let n = (next() % 5) as usize;
            let descs: Vec<Desc> = (0..n)
                .map(|_| {
                    let r = next();
                    Desc {
                        addr: addrs[(r % addrs.len() as u64) as usize],
                        len: lens[((r >> 8) % lens.len() as u64) as usize],
                        writable: (r >> 16) & 1 == 1,
                    }
                })
                .collect();
            if let Ok((len, _)) = process_control_chain(&gpu, &mem, &descs) {
                assert!(
                    len as usize >= RespHeader::SIZE
                        && len as usize <= crate::control::MAX_RESPONSE_SIZE,
                    "{descs:?}"
                );
            }
        }
    }

    #[test]
    fn malformed_chains() {
        let (gpu, mem) = setup();
        put(&mem, BASE, &get_info(9));
        let w = BASE + 0x800;

        // No writable part, or too small, or outside RAM: dropped and counted.
        assert_eq!(
            process_control_chain(&gpu, &mem, &[Desc::readable(BASE, 16)]),
            Err(ChainError::NoRoomForResponse(0))
        );
        assert_eq!(
            process_control_chain(
                &gpu,
                &mem,
                &[Desc::readable(BASE, 16), Desc::writable(w, 15)]
            ),
            Err(ChainError::NoRoomForResponse(15))
        );
        assert!(matches!(
            process_control_chain(
                &gpu,
                &mem,
                &[Desc::readable(BASE, 16), Desc::writable(0x10, 64)]
            ),
            Err(ChainError::ResponseNotInRam { .. })
        ));
        assert!(matches!(
            process_control_chain(
                &gpu,
                &mem,
                &[
                    Desc::readable(BASE, 16),
                    Desc::writable(BASE + SIZE as u64 - 8, 64)
                ]
            ),
            Err(ChainError::ResponseNotInRam { .. })
        ));
        assert_eq!(serve_control_chain(&gpu, &mem, &[]).0, 0);
        assert_eq!(gpu.stats().get(Counter::MalformedChains), 1);
        assert_eq!(gpu.stats().get(Counter::CommandsCompleted), 0);

        // Only writable: an empty request.
        let n = process_control_chain(&gpu, &mem, &[Desc::writable(w, 64)])
            .unwrap()
            .0;
        assert_eq!(n, 16);
        assert_eq!(status_at(&mem, w), (Status::BadLength, 0));

        // Readable after writable.
        let n = process_control_chain(
            &gpu,
            &mem,
            &[
                Desc::readable(BASE, 8),
                Desc::writable(w, 64),
                Desc::readable(BASE + 8, 8),
            ],
        )
        .unwrap()
        .0;
        assert_eq!(n, 16);
        assert_eq!(status_at(&mem, w), (Status::BadLength, 0));

        // Request outside RAM.
        let n = process_control_chain(
            &gpu,
            &mem,
            &[Desc::readable(0xdead_0000, 16), Desc::writable(w, 64)],
        )
        .unwrap()
        .0;
        assert_eq!(n, 16);
        assert_eq!(status_at(&mem, w), (Status::BadAddress, 0));

        // Response buffer holds the header but not the body.
        let n = process_control_chain(
            &gpu,
            &mem,
            &[Desc::readable(BASE, 16), Desc::writable(w, 20)],
        )
        .unwrap()
        .0;
        assert_eq!(n, 16);
        assert_eq!(status_at(&mem, w), (Status::BadLength, 9));

        // A huge readable descriptor is read only up to the limit.
        let n = process_control_chain(
            &gpu,
            &mem,
            &[Desc::readable(BASE, 0x8000), Desc::writable(w, 64)],
        )
        .unwrap()
        .0;
        assert_eq!(n, 16);
        assert_eq!(status_at(&mem, w), (Status::BadLength, 9));

        // Descriptor lengths that would overflow a sum.
        let n = process_control_chain(
            &gpu,
            &mem,
            &[
                Desc::readable(BASE, 16),
                Desc::writable(w, 64),
                Desc::writable(w, 0),
            ],
        )
        .unwrap()
        .0;
        assert_eq!(n, 56);
        assert_eq!(request_seqno(&get_info(3)), Some(3));
        assert_eq!(request_seqno(&[0; 4]), None);
    }
}
