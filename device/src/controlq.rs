// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The control queue's chains (spec/svmgpu.md section 6.3.2): the checks that decide whether
//! a chain can be answered at all, then the request bytes to the dispatcher and its
//! response back into the chain.

use svmgpu_spec::{RespHeader, MAX_REQUEST_SIZE};
use thiserror::Error;
use vm_memory::{GuestMemory, Permissions};

use crate::chain::{gather, in_ram, scatter, Desc};
use crate::control::ControlError;
use crate::gpu::{Deferred, Gpu};
use crate::stats::Counter;

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
            crate::warn_limited!("svmgpu{}: dropped a control chain: {e}", gpu.index());
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
        (gpu.reject(ControlError::ChainLayout, 0), None)
    } else if !readable.iter().all(|d| in_ram(mem, d, Permissions::Read)) {
        (gpu.reject(ControlError::RequestNotInRam, 0), None)
    } else {
        match gather(mem, readable, MAX_REQUEST_SIZE + 1) {
            Some(req) => gpu.handle_request(&req, cap),
            None => (gpu.reject(ControlError::RequestNotInRam, 0), None),
        }
    };
    let Some(used) = scatter(mem, rest, response.bytes()) else {
        // The driver will never learn the command was accepted: it must not start, and its
        // slot comes back.
        if let Some(d) = deferred {
            gpu.cancel(d);
        }
        return Err(ChainError::ResponseWrite);
    };
    Ok((used, deferred))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DeviceOptions;
    use svmgpu_spec::{CtrlHeader, GetInfoResp, Status, SPEC_VERSION};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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
    }
}
