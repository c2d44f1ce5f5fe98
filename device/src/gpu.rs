// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! [`Gpu`]: one emulated svmgpu device as the rest of the backend sees it — the
//! [`crate::device::Device`] its threads share, and those threads (one per engine, one
//! timer), started on creation and joined on drop.

use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use serde::Serialize;
use svmgpu_spec::{Config, CONFIG_SIZE};
use thiserror::Error;

use crate::config::{read_config, DeviceOptions, OptionsError};
use crate::control::{handle_request, reject, ControlError, Response};
use crate::device::Device;
pub use crate::device::{Deferred, Memory};
use crate::inject::{InjectedByKind, Injector};
use crate::stats::Stats;

/// Errors creating a GPU.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GpuError {
    /// Invalid options.
    #[error("invalid device options: {0}")]
    Options(#[from] OptionsError),
    /// A thread could not be started.
    #[error("cannot start a device thread: {0}")]
    Thread(String),
}

/// One emulated svmgpu device.
#[derive(Debug)]
pub struct Gpu {
    shared: Arc<Device>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Gpu {
    /// A device with socket index `index`; starts its engine and timer threads.
    pub fn new(index: u32, options: &DeviceOptions) -> Result<Self, GpuError> {
        let shared = Arc::new(Device::new(index, options)?);
        let gpu = Gpu {
            shared: shared.clone(),
            threads: Mutex::new(Vec::new()),
        };
        let mut threads = Vec::new();
        for e in 0..options.engines as usize {
            let sh = shared.clone();
            threads.push(
                thread::Builder::new()
                    .name(format!("svmgpu{index}-engine{e}"))
                    .spawn(move || crate::engine::run(&sh, e))
                    .map_err(|e| GpuError::Thread(e.to_string()))?,
            );
        }
        let sh = shared.clone();
        threads.push(
            thread::Builder::new()
                .name(format!("svmgpu{index}-timer"))
                .spawn(move || crate::timer::run(&sh))
                .map_err(|e| GpuError::Thread(e.to_string()))?,
        );
        *gpu.threads.lock().unwrap_or_else(|p| p.into_inner()) = threads;
        Ok(gpu)
    }

    /// Handles one control request (see [`crate::control::handle_request`]).
    pub fn handle_request(&self, req: &[u8], resp_cap: usize) -> (Response, Option<Deferred>) {
        handle_request(&self.shared, req, resp_cap)
    }

    /// Answers a request rejected before it was read (see [`crate::control::reject`]).
    pub fn reject(&self, err: ControlError, seqno: u64) -> Response {
        reject(&self.shared, err, seqno)
    }

    /// Socket index.
    pub fn index(&self) -> u32 {
        self.shared.index()
    }

    /// Options it was created with.
    pub fn options(&self) -> &DeviceOptions {
        self.shared.options()
    }

    /// Config space.
    pub fn config(&self) -> &Config {
        self.shared.config()
    }

    /// Config space bytes.
    pub fn config_bytes(&self) -> &[u8; CONFIG_SIZE] {
        self.shared.config_bytes()
    }

    /// A vhost-user GET_CONFIG answer: exactly `size` bytes.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        read_config(self.shared.config_bytes(), offset, size)
    }

    /// Statistics.
    pub fn stats(&self) -> &Stats {
        self.shared.stats()
    }

    /// Fault-injection rules (spec section 6.16).
    pub fn injector(&self) -> &Injector {
        self.shared.injector()
    }

    /// True while a device-initiated reset is in progress.
    pub fn resetting(&self) -> bool {
        self.shared.resetting()
    }

    /// Uses this guest memory from now on (SET_MEM_TABLE).
    pub fn set_memory(&self, mem: Option<Memory>) {
        self.shared.set_memory(mem);
    }

    /// The device feature bits the driver accepted.
    pub fn set_features(&self, features: u64) {
        self.shared.set_features(features);
    }

    /// Delivers held events and completions into the connection's rings.
    pub fn attach_and_flush(
        &self,
        eventq: &vhost_user_backend::VringRwLock,
        complq: &vhost_user_backend::VringRwLock,
    ) {
        self.shared.outbox().attach(eventq, complq);
        self.shared.flush();
    }

    /// Starts the work of an accepted command whose response is in the used ring.
    pub fn start(&self, d: Deferred) {
        self.shared.start(d);
    }

    /// Gives back the slot of accepted work whose response could not be written.
    pub fn cancel(&self, d: Deferred) {
        self.shared.cancel(d);
    }

    /// A virtio reset or a frontend disconnect (spec section 6.14.2, Appendix A.3).
    pub fn virtio_reset(&self) {
        self.shared.reset(None);
    }

    /// The VMM stopped the rings: pause, keeping every state (spec section 6.14.4).
    pub fn pause(&self) {
        self.shared.pause();
    }

    /// The rings run again: continue after a pause.
    pub fn resume(&self) {
        self.shared.resume();
    }

    /// True while paused.
    pub fn paused(&self) -> bool {
        self.shared.paused()
    }

    /// Records held for the driver (events, completions).
    pub fn held_records(&self) -> (usize, usize) {
        self.shared.outbox().held()
    }

    /// The device's statistics as JSON: `{"device_index":N, <every counter>, "engines":[...],
    /// "injected":{<kind>:N,...}}` (device/README.md, "Statistics").
    pub fn stats_value(&self) -> serde_json::Value {
        #[derive(Serialize)]
        struct Report<'a> {
            device_index: u32,
            #[serde(flatten)]
            stats: &'a Stats,
            injected: InjectedByKind<'a>,
        }
        let r = Report {
            device_index: self.index(),
            stats: self.stats(),
            injected: self.injector().injected_by_kind(),
        };
        // Maps of strings to numbers always serialise.
        serde_json::to_value(r).unwrap_or_default()
    }

    /// [`Gpu::stats_value`] as one line of JSON.
    pub fn stats_json(&self) -> String {
        self.stats_value().to_string()
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        self.shared.shut_down();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmu::walker::tests::{ram, Pt};
    use crate::stats::Counter;
    use std::time::{Duration, Instant};
    use svmgpu_spec::isa::Insn;
    use svmgpu_spec::pte::Perms;
    use svmgpu_spec::Opcode;
    use svmgpu_spec::{
        AsidBindReq, CtrlHeader, CtxCreateReq, JobSubmitReq, RespHeader, TlbInvalidateReq,
    };
    use vm_memory::GuestMemoryAtomic;
    use vm_memory::{Bytes, GuestAddress};

    fn send(g: &Gpu, op: Opcode, body: &[u8]) -> u32 {
        let mut req = CtrlHeader {
            opcode: op.as_u32(),
            flags: 0,
            seqno: 9,
        }
        .to_bytes()
        .to_vec();
        req.extend_from_slice(body);
        let (resp, d) = g.handle_request(&req, 256);
        if let Some(d) = d {
            g.start(d);
        }
        RespHeader::decode(resp.bytes()).unwrap().status
    }

    fn wait_held(g: &Gpu, completions: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while g.held_records().1 < completions {
            assert!(Instant::now() < deadline, "{:?}", g.held_records());
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn jobs_and_invalidations_without_a_connection() {
        let o = DeviceOptions {
            engines: 1,
            tlb_inval_latency_ns: 0,
            walk_latency_ns: 0,
            insn_cost_ns: 0,
            ..Default::default()
        };
        let g = Gpu::new(0, &o).unwrap();
        let mem = ram();
        let mut pt = Pt::new();
        let rw = Perms {
            writable: true,
            no_exec: false,
        };
        pt.map_4k(&mem, 0x1000, 0x40_0000, rw);
        pt.map_4k(&mem, 0x2000, 0x41_0000, rw);
        g.set_memory(Some(GuestMemoryAtomic::new(mem.clone())));
        let bind = AsidBindReq {
            asid: 1,
            flags: 0,
            pt_root: pt.root,
        };
        assert_eq!(send(&g, Opcode::AsidBind, &bind.to_bytes()), 0);
        let create = CtxCreateReq {
            ctx_id: 3,
            asid: 1,
            flags: 0,
            reserved: 0,
        };
        assert_eq!(send(&g, Opcode::CtxCreate, &create.to_bytes()), 0);
        let mut batch = [0u8; 32];
        let n = Insn::Store {
            size64: true,
            va: 0x2008,
            value: 77,
        }
        .encode_bytes(&mut batch)
        .unwrap();
        Insn::End.encode_bytes(&mut batch[n..]).unwrap();
        mem.write_slice(&batch, GuestAddress(0x40_0000)).unwrap();
        let job = JobSubmitReq {
            ctx_id: 3,
            flags: 0,
            batch_va: 0x1000,
            batch_len: 32,
            reserved: 0,
        };
        assert_eq!(send(&g, Opcode::JobSubmit, &job.to_bytes()), 0);
        // No rings: the JOB_DONE is held, the store is done.
        wait_held(&g, 1);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x41_0008)).unwrap(), 77);
        let inv = TlbInvalidateReq {
            asid: 1,
            flags: 0,
            va: 0x1000,
            size: 0x2000,
        };
        assert_eq!(send(&g, Opcode::TlbInvalidate, &inv.to_bytes()), 0);
        wait_held(&g, 2);
        assert_eq!(g.stats().get(Counter::TlbInvalidations), 1);
        assert_eq!(g.stats().get(Counter::TlbEntriesInvalidated), 2);
        // A virtio reset discards what is held.
        g.virtio_reset();
        assert_eq!(g.held_records(), (0, 0));
        assert_eq!(g.stats().get(Counter::Resets), 1);
    }

    #[test]
    fn new_validates_and_stops() {
        let bad = DeviceOptions {
            tlb_ways: 3,
            ..Default::default()
        };
        assert!(matches!(Gpu::new(0, &bad), Err(GpuError::Options(_))));
        let g = Gpu::new(2, &DeviceOptions::default()).unwrap();
        assert_eq!(g.index(), 2);
        assert_eq!(g.config().device_index, 2);
        assert_eq!(g.read_config(8, 4), vec![2, 0, 0, 0]);
        drop(g); // joins its threads
    }

    #[test]
    fn a_failing_engine_is_contained_as_a_device_reset() {
        let o = DeviceOptions {
            engines: 1,
            tlb_inval_latency_ns: 0,
            walk_latency_ns: 0,
            insn_cost_ns: 0,
            ..Default::default()
        };
        let g = Gpu::new(0, &o).unwrap();
        let mem = ram();
        let mut pt = Pt::new();
        pt.map_4k(
            &mem,
            0x1000,
            0x40_0000,
            Perms {
                writable: true,
                no_exec: false,
            },
        );
        let mut end = [0u8; 8];
        Insn::End.encode_bytes(&mut end).unwrap();
        mem.write_slice(&end, GuestAddress(0x40_0000)).unwrap();
        g.set_memory(Some(GuestMemoryAtomic::new(mem.clone())));
        let setup = |g: &Gpu| {
            let bind = AsidBindReq {
                asid: 1,
                flags: 0,
                pt_root: pt.root,
            };
            assert_eq!(send(g, Opcode::AsidBind, &bind.to_bytes()), 0);
            let create = CtxCreateReq {
                ctx_id: 3,
                asid: 1,
                flags: 0,
                reserved: 0,
            };
            assert_eq!(send(g, Opcode::CtxCreate, &create.to_bytes()), 0);
        };
        let job = JobSubmitReq {
            ctx_id: 3,
            flags: 0,
            batch_va: 0x1000,
            batch_len: 8,
            reserved: 0,
        };
        setup(&g);
        g.shared.fail_next_slice();
        assert_eq!(send(&g, Opcode::JobSubmit, &job.to_bytes()), 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while g.stats().get(Counter::Resets) == 0 || g.resetting() {
            assert!(Instant::now() < deadline, "no device-initiated reset");
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(g.held_records().0, 1, "DEVICE_RESET");
        // The engine thread lives on and serves new work.
        setup(&g);
        assert_eq!(send(&g, Opcode::JobSubmit, &job.to_bytes()), 0);
        wait_held(&g, 1);
        assert_eq!(g.stats().get(Counter::JobsCompleted), 1);
    }
}
