// SPDX-License-Identifier: GPL-2.0

//! One svmgpu device: probe, config space, control commands, removal.
//!
//! Every bound device is listed in [`GPUS`] (in probe order) so the control node can find
//! it by slot; the list holds `Arc`s, so a command in flight keeps its device's state alive
//! across a concurrent removal (it then fails with `ENODEV`).

use crate::{ctrl::CtrlQueue, virtio, wire};
use kernel::{bindings, prelude::*, sync::Arc};

/// How long a control command may take before the driver gives up on it.
pub(crate) const CTRL_TIMEOUT_MS: u32 = 5000;
/// Most devices one guest binds.
pub(crate) const MAX_GPUS: usize = 16;

kernel::sync::global_lock! {
    // SAFETY: `init` is called in the module initialiser, before any device can probe.
    pub(crate) unsafe(uninit) static GPUS: Mutex<[Option<Arc<Gpu>>; MAX_GPUS]> =
        [const { None }; MAX_GPUS];
}

/// The driver's state of one device.
#[pin_data]
pub(crate) struct Gpu {
    /// `virtioN` bus index, for messages.
    pub(crate) bus_index: u32,
    /// The config space as read at probe.
    pub(crate) config: wire::Config,
    /// The raw config bytes, as handed to user space.
    pub(crate) config_raw: [u8; wire::Config::SIZE],
    #[pin]
    pub(crate) ctrl: CtrlQueue,
}

impl Gpu {
    /// Sends GET_INFO and returns the raw response body.
    pub(crate) fn get_info(&self, seqno: u64) -> Result<[u8; wire::GetInfoResp::SIZE]> {
        let mut req = [0u8; wire::CtrlHeader::SIZE];
        wire::CtrlHeader {
            opcode: wire::Opcode::GetInfo.as_u32(),
            flags: 0,
            seqno,
        }
        .encode(&mut req)
        .ok_or(EINVAL)?;
        let mut resp = [0u8; wire::RespHeader::SIZE + wire::GetInfoResp::SIZE];
        let len = self.ctrl.call(&req, &mut resp, CTRL_TIMEOUT_MS)?;
        let hdr = wire::RespHeader::decode(&resp[..len]).ok_or(EIO)?;
        if hdr.status != wire::Status::Ok.as_u32() || hdr.seqno != seqno {
            return Err(EIO);
        }
        if len < resp.len() {
            return Err(EIO);
        }
        let mut body = [0u8; wire::GetInfoResp::SIZE];
        body.copy_from_slice(&resp[wire::RespHeader::SIZE..]);
        Ok(body)
    }

    /// The device in slot `slot` of [`GPUS`], if any.
    pub(crate) fn get(slot: usize) -> Option<Arc<Gpu>> {
        GPUS.lock().get(slot)?.clone()
    }

    /// How many devices are bound.
    pub(crate) fn count() -> usize {
        GPUS.lock().iter().filter(|g| g.is_some()).count()
    }
}

/// The virtio driver of svmgpu devices.
pub(crate) struct GpuDriver;

/// What the driver keeps per bound device: its state and its slot in [`GPUS`].
pub(crate) struct Bound {
    gpu: Arc<Gpu>,
    slot: usize,
}

static ID_TABLE: virtio::IdTable = virtio::IdTable::new(wire::VIRTIO_ID_SVMGPU);

unsafe extern "C" fn ctrl_callback(vq: *mut bindings::virtqueue) {
    // SAFETY: Called by the virtio core for a queue of a device whose callback context is
    // the `Gpu` set in `probe`, valid until the queues are deleted in `remove`.
    let gpu = unsafe { &*virtio::callback_context(vq).cast::<Gpu>() };
    gpu.ctrl.complete();
}

impl virtio::Driver for GpuDriver {
    type Data = Bound;
    const ID_TABLE: &'static virtio::IdTable = &ID_TABLE;

    fn probe(dev: &virtio::Device) -> Result<Pin<KBox<Bound>>> {
        let mut raw = [0u8; wire::Config::SIZE];
        dev.read_config(0, &mut raw);
        let config = wire::Config::decode(&raw).ok_or(EINVAL)?;
        if config.magic != wire::CONFIG_MAGIC {
            dev_err!(dev.as_dev(), "bad config magic {:#x}\n", config.magic);
            return Err(ENODEV);
        }
        if config.version >> 16 != wire::SPEC_VERSION >> 16 {
            dev_err!(
                dev.as_dev(),
                "unsupported spec version {:#x}\n",
                config.version
            );
            return Err(ENODEV);
        }
        dev_info!(
            dev.as_dev(),
            "config: version {}.{} index {} engines {} asids {} contexts {} tlb {}x{} pages {:#x} va_bits {} faults {} inval {} ns preempt {} ns\n",
            config.version >> 16,
            config.version & 0xffff,
            config.device_index,
            config.num_engines,
            config.num_asids,
            config.max_contexts,
            config.tlb_entries,
            config.tlb_ways,
            config.page_size_mask,
            config.va_bits,
            config.max_outstanding_faults,
            config.tlb_inval_latency_ns,
            config.preempt_latency_ns
        );

        let gpu = Arc::pin_init(
            try_pin_init!(Gpu {
                bus_index: dev.index(),
                config,
                config_raw: raw,
                ctrl <- CtrlQueue::new()?,
            }),
            GFP_KERNEL,
        )?;
        // SAFETY: `gpu` is kept alive by `Bound` until `remove`, which resets the device and
        // deletes the queues before dropping it.
        unsafe { dev.set_callback_context(Arc::as_ptr(&gpu).cast()) };
        let [ctrlq, _eventq, _complq] = dev.find_vqs(&[
            (c"control", Some(ctrl_callback as virtio::Callback)),
            (c"event", None),
            (c"complete", None),
        ])?;
        gpu.ctrl.attach(ctrlq);
        dev.ready();

        let fail = |e: Error| {
            dev.reset();
            gpu.ctrl.detach();
            dev.del_vqs();
            e
        };
        let info = gpu.get_info(1).map_err(fail)?;
        let info = wire::GetInfoResp::decode(&info).ok_or(EIO).map_err(fail)?;
        dev_info!(
            dev.as_dev(),
            "GET_INFO: spec {:#x} index {} engines {} commands completed {}\n",
            info.spec_version,
            info.device_index,
            info.num_engines,
            info.commands_completed
        );

        let slot = {
            let mut gpus = GPUS.lock();
            let slot = gpus
                .iter()
                .position(|g| g.is_none())
                .ok_or(ENOSPC)
                .map_err(fail)?;
            gpus[slot] = Some(gpu.clone());
            slot
        };
        KBox::pin(
            Bound {
                gpu: gpu.clone(),
                slot,
            },
            GFP_KERNEL,
        )
        .map_err(|e| {
            GPUS.lock()[slot] = None;
            fail(e.into())
        })
    }

    fn remove(dev: &virtio::Device, data: Pin<KBox<Bound>>) {
        GPUS.lock()[data.slot] = None;
        // Reset first: afterwards the device touches no buffer and raises no interrupt.
        dev.reset();
        data.gpu.ctrl.detach();
        dev.del_vqs();
        dev_info!(dev.as_dev(), "removed\n");
    }
}
