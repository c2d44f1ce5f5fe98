// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The vhost-user face of one svmgpu device: features, config space, queues. One
//! [`VhostUserSvmgpuBackend`] lives for one frontend connection and borrows the long-lived
//! [`Gpu`]. It implements `VhostUserBackend` (interior locking, served as `Arc<T>`), so the
//! vring worker threads never serialise on one big lock.
//!
//! Pause is not reset (spec/svmgpu.md section 6.14.4): `GET_VRING_BASE` (the VMM stopping the
//! rings: a VM stop, a snapshot, a migration, or the first half of a virtio reset) pauses
//! the device and keeps its state; `RESET_DEVICE` (offered as a protocol feature) resets
//! it. A frontend that resets without `RESET_DEVICE` is recognised when the rings run
//! again: a ring that restarts elsewhere than where it stopped (another available index or
//! address) belongs to a reinitialised driver, and the device is reset before it resumes.
//!
//! The `STATUS` protocol feature is not offered: vhost 0.18's request handler has no
//! `SET_STATUS`/`GET_STATUS`, and a frontend that negotiated it would send them and have
//! its connection ended.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use log::{debug, error, info};
use svmgpu_spec::{
    MAX_QUEUE_SIZE, NUM_QUEUES, QUEUE_COMPLETION, QUEUE_CONTROL, QUEUE_EVENT, SVMGPU_FEATURES_MASK,
    SVMGPU_F_AUDIT, SVMGPU_F_FAULT_COALESCE, SVMGPU_F_FAULT_INJECT,
};
use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::chain::Desc;
use crate::controlq::serve_control_chain;
use crate::gpu::Gpu;

/// Guest memory as the backend sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Errors of the vhost-user layer. Guest-caused problems are never returned to the vhost
/// machinery (that would end the worker thread or the connection): they are logged.
#[derive(Debug, Error)]
pub enum Error {
    /// Creating the exit eventfd failed.
    #[error("cannot create an eventfd: {0}")]
    EventFd(io::Error),
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        io::Error::other(e)
    }
}

/// Where a ring stood when the VMM stopped it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RingMark {
    next_avail: u16,
    desc_table: u64,
}

impl RingMark {
    fn of(vring: &VringRwLock) -> Self {
        let st = vring.get_ref();
        let q = st.get_queue();
        Self {
            next_avail: q.next_avail(),
            desc_table: q.desc_table(),
        }
    }
}

/// The vhost-user backend of one device for one connection.
pub struct VhostUserSvmgpuBackend {
    gpu: Arc<Gpu>,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemory>>>,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    /// The connection's rings (known from the first event on them).
    vrings: OnceLock<Vec<VringRwLock>>,
    /// Set while the VMM has stopped the rings: per ring, `None` while it runs, else where
    /// it stood when it was stopped (`Some(None)`: not known, no event came from it yet).
    stopped: Mutex<Option<[Option<Option<RingMark>>; NUM_QUEUES as usize]>>,
}

impl std::fmt::Debug for VhostUserSvmgpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserSvmgpuBackend")
            .field("gpu", &self.gpu)
            .field("acked_features", &self.acked_features)
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

impl VhostUserSvmgpuBackend {
    /// Virtio features offered: `VIRTIO_F_VERSION_1`, `VHOST_USER_F_PROTOCOL_FEATURES` and
    /// the device bits `SVMGPU_F_AUDIT` and `SVMGPU_F_FAULT_COALESCE`.
    pub const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | (1 << SVMGPU_F_AUDIT)
        | (1 << SVMGPU_F_FAULT_COALESCE);

    /// A backend serving `gpu`.
    pub fn new(gpu: Arc<Gpu>) -> Self {
        Self {
            gpu,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            vrings: OnceLock::new(),
            stopped: Mutex::new(None),
        }
    }

    /// An event on ring `queue`: if that ring was stopped, the rings run again: resume,
    /// unless they restarted elsewhere (a reset the frontend did not announce with
    /// RESET_DEVICE): then reset first. An event on a ring that was not stopped (one
    /// pending from before the VMM began stopping the rings) restarts nothing.
    ///
    /// The other rings may not have been set up again yet; they still stand where they
    /// stopped, since nothing is delivered while the device is paused.
    fn restart(&self, queue: u16, vrings: &[VringRwLock]) {
        let mut stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        let restarted = stopped
            .as_ref()
            .and_then(|marks| marks.get(usize::from(queue)))
            .is_some_and(Option::is_some);
        if !restarted {
            return;
        }
        let Some(marks) = stopped.take() else {
            return;
        };
        let now: Vec<RingMark> = vrings.iter().map(RingMark::of).collect();
        let moved = marks
            .iter()
            .zip(&now)
            .any(|(stopped, now)| matches!(stopped, Some(Some(mark)) if mark != now));
        if moved {
            info!(
                "svmgpu{}: the rings restarted elsewhere ({now:?}, stopped at {marks:?}): \
                 the driver reset the device",
                self.gpu.index()
            );
            self.gpu.virtio_reset();
        }
        self.gpu.resume();
        drop(stopped);
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Features the frontend acknowledged.
    pub fn negotiated_features(&self) -> u64 {
        self.acked_features.load(Ordering::Relaxed)
    }

    fn memory(&self) -> Option<GuestMemoryLoadGuard<GuestMemory>> {
        let mem = self.mem.read().unwrap_or_else(|p| p.into_inner());
        mem.as_ref().map(|m| m.memory())
    }

    /// Takes every available control chain, answers it, returns it to the used ring, and
    /// notifies the driver.
    fn process_controlq(&self, vring: &VringRwLock) {
        let Some(mem) = self.memory() else {
            crate::warn_limited!(
                "svmgpu{}: controlq kick before SET_MEM_TABLE",
                self.gpu.index()
            );
            return;
        };
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                if let Err(e) = vring.disable_notification() {
                    crate::error_limited!("svmgpu{}: controlq: {e}", self.gpu.index());
                    return;
                }
            }
            let chains: Vec<_> = match vring.get_mut().get_queue_mut().iter(mem.clone()) {
                Ok(it) => it.collect(),
                Err(e) => {
                    // The driver put the ring somewhere unusable: nothing to answer.
                    crate::error_limited!("svmgpu{}: controlq unusable: {e}", self.gpu.index());
                    return;
                }
            };
            for chain in chains {
                let head = chain.head_index();
                let descs: Vec<Desc> = chain
                    .map(|d| Desc {
                        addr: d.addr().0,
                        len: d.len(),
                        writable: d.is_write_only(),
                    })
                    .collect();
                let (used, deferred) = serve_control_chain(&self.gpu, &*mem, &descs);
                let returned = vring.add_used(head, used);
                if let Err(e) = &returned {
                    crate::error_limited!("svmgpu{}: controlq add_used: {e}", self.gpu.index());
                }
                // The response is in the used ring: now its command may start (and complete).
                if let Some(d) = deferred {
                    if returned.is_ok() {
                        self.gpu.start(d);
                    } else {
                        self.gpu.cancel(d);
                    }
                }
            }
            if let Err(e) = vring.signal_used_queue() {
                crate::warn_limited!("svmgpu{}: controlq notify: {e}", self.gpu.index());
            }
            if !event_idx {
                return;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    crate::error_limited!("svmgpu{}: controlq: {e}", self.gpu.index());
                    return;
                }
            }
        }
    }
}

impl VhostUserBackend for VhostUserSvmgpuBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES as usize
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE as usize
    }

    fn features(&self) -> u64 {
        if self.gpu.injector().advertised() {
            Self::FEATURES | (1 << SVMGPU_F_FAULT_INJECT)
        } else {
            Self::FEATURES
        }
    }

    fn acked_features(&self, features: u64) {
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            crate::warn_limited!(
                "svmgpu{}: frontend did not accept VIRTIO_F_VERSION_1 (features {features:#x})",
                self.gpu.index()
            );
        }
        self.acked_features.store(features, Ordering::Relaxed);
        self.gpu.set_features(features & SVMGPU_FEATURES_MASK);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        info!("svmgpu{}: device reset by the frontend", self.gpu.index());
        let mut stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        *stopped = None;
        self.gpu.virtio_reset();
        drop(stopped);
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: a pause, not a reset (spec section 6.14.4). The first ring stopped
        // pauses the device, so no engine touches guest memory after the VMM has read where
        // any ring stands.
        // Each ring is marked where it stands when it is stopped (the others may still
        // move until their own stop).
        let mark = self
            .vrings
            .get()
            .and_then(|v| v.get(queue_index as usize))
            .map(RingMark::of);
        let mut stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        let first = stopped.is_none();
        let marks = stopped.get_or_insert([None; NUM_QUEUES as usize]);
        if let Some(m) = marks.get_mut(queue_index as usize) {
            *m = Some(mark);
        }
        if first {
            debug!(
                "svmgpu{}: ring {queue_index} stopped: pausing",
                self.gpu.index()
            );
            // Under the marks' lock, so that a restart cannot resume the device between
            // these marks and the pause.
            self.gpu.pause();
        }
        drop(stopped);
        Ok(())
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.gpu.read_config(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Read-only config space. Returning Err would end the whole connection, and a guest
        // must not be able to kill its device with a config write: ignore it.
        crate::warn_limited!(
            "svmgpu{}: ignored a write of {} bytes at config offset {offset}",
            self.gpu.index(),
            buf.len()
        );
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem.clone());
        self.gpu.set_memory(Some(mem));
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // A fresh eventfd per worker thread and connection, so no stale count can stop the
        // workers of a later connection.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                error!("svmgpu{}: {}", self.gpu.index(), Error::EventFd(e));
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            crate::warn_limited!("svmgpu{}: unexpected event set {evset:?}", self.gpu.index());
            return Ok(());
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            crate::warn_limited!(
                "svmgpu{}: event for unknown queue {device_event}",
                self.gpu.index()
            );
            return Ok(());
        };
        let _ = self.vrings.set(vrings.to_vec());
        self.restart(device_event, vrings);
        if let (Some(eventq), Some(complq)) = (
            vrings.get(usize::from(QUEUE_EVENT)),
            vrings.get(usize::from(QUEUE_COMPLETION)),
        ) {
            self.gpu.attach_and_flush(eventq, complq);
        }
        match device_event {
            QUEUE_CONTROL => self.process_controlq(vring),
            // New empty buffers: held records were delivered above.
            QUEUE_EVENT | QUEUE_COMPLETION => {
                debug!(
                    "svmgpu{}: buffers posted on queue {device_event}",
                    self.gpu.index()
                )
            }
            _ => crate::warn_limited!(
                "svmgpu{}: event for unknown queue {device_event}",
                self.gpu.index()
            ),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DeviceOptions;
    use svmgpu_spec::{CtrlHeader, GetInfoResp, RespHeader, Status};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    fn backend() -> VhostUserSvmgpuBackend {
        let gpu = Arc::new(Gpu::new(0, &DeviceOptions::default()).unwrap());
        VhostUserSvmgpuBackend::new(gpu)
    }

    #[test]
    fn features_and_config() {
        let b = backend();
        assert_eq!(b.num_queues(), 3);
        assert_eq!(b.max_queue_size(), 1024);
        assert_eq!(b.features(), (1 << 32) | (1 << 30) | 0b11);
        assert_eq!(
            b.protocol_features(),
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::RESET_DEVICE
        );
        assert_eq!(b.get_config(0, 64), b.gpu().config_bytes().to_vec());
        assert_eq!(b.get_config(0, 4), b"SVMG".to_vec());
        assert!(b.set_config(0, &[1, 2, 3]).is_ok());
        assert_eq!(b.get_config(0, 4), b"SVMG".to_vec());
        assert!(b.exit_event(0).is_some());
        VhostUserBackend::acked_features(&b, 1 << 32);
        assert_eq!(b.negotiated_features(), 1 << 32);
    }

    #[test]
    fn handle_event_never_fails() {
        let b = backend();
        let mem = GuestMemoryAtomic::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        );
        let vrings: Vec<_> = (0..3)
            .map(|_| VringRwLock::new(mem.clone(), 16).unwrap())
            .collect();
        // No memory yet, unknown queue, odd event set, unready ring.
        assert!(b.handle_event(0, EventSet::IN, &vrings, 0).is_ok());
        assert!(b.handle_event(7, EventSet::IN, &vrings, 0).is_ok());
        assert!(b.handle_event(0, EventSet::OUT, &vrings, 0).is_ok());
        b.update_memory(mem).unwrap();
        assert!(b.handle_event(0, EventSet::IN, &vrings, 0).is_ok());
        assert!(b.handle_event(1, EventSet::IN, &vrings, 0).is_ok());
    }

    #[test]
    fn controlq_round_trip_on_mock_queue() {
        let b = backend();
        let mem = GuestMemoryAtomic::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        );
        let guard = mem.memory();
        let vq = MockSplitQueue::new(&*guard, 16);
        let req_addr = 0x4000u64;
        let resp_addr = 0x5000u64;
        let req = CtrlHeader {
            opcode: 1,
            flags: 0,
            seqno: 42,
        }
        .to_bytes();
        guard.write_slice(&req, GuestAddress(req_addr)).unwrap();
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(
                req_addr,
                16,
                VRING_DESC_F_NEXT as u16,
                1,
            )),
            RawDescriptor::from(SplitDescriptor::new(
                resp_addr,
                64,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ];
        vq.build_desc_chain(&descs).unwrap();
        guard
            .write_obj(0u16, vq.avail_addr().unchecked_add(4))
            .unwrap();
        guard
            .write_obj(1u16, vq.avail_addr().unchecked_add(2))
            .unwrap();

        let vring = VringRwLock::new(mem.clone(), 16).unwrap();
        vring.set_queue_size(16);
        vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap();
        vring.set_queue_ready(true);
        b.update_memory(mem.clone()).unwrap();
        let vrings = [vring.clone(), vring.clone(), vring];
        b.handle_event(0, EventSet::IN, &vrings, 0).unwrap();

        // used.idx == 1, used.ring[0] = (0, 56)
        let used_idx: u16 = guard.read_obj(vq.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used_idx, 1);
        let used_len: u32 = guard.read_obj(vq.used_addr().unchecked_add(8)).unwrap();
        assert_eq!(used_len, 56);
        let mut resp = [0u8; 56];
        guard
            .read_slice(&mut resp, GuestAddress(resp_addr))
            .unwrap();
        let h = RespHeader::decode(&resp).unwrap();
        assert_eq!((h.status, h.seqno), (Status::Ok.as_u32(), 42));
        let info = GetInfoResp::decode(&resp[16..]).unwrap();
        assert_eq!(info.commands_completed, 0);
    }
}
