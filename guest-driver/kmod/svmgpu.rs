// SPDX-License-Identifier: GPL-2.0

//! svmgpu: driver for the svmgpu virtual GPU (virtio device ID 62).
//!
//! DOC: Overview
//!
//! svmgpu is a virtual GPU served by a vhost-user backend; its contract is the Markdown
//! spec in `spec/` of the svmgpu repository, whose wire structs this module compiles
//! directly (`wire.rs`). The driver binds every svmgpu virtio device:
//!
//! - [`virtio`]: thin safe wrappers over the C virtio core (no Rust abstraction exists
//!   upstream), relying on the bindings and helpers added by the project's kernel patch.
//! - [`ctrl`]: the control queue, with preallocated command slots so that commands can be
//!   sent from any context without allocating, and waits that time out.
//! - [`gpu`]: per-device probe and removal, config space, and the list of bound devices.
//! - [`ctl_node`]: `/dev/svmgpu`, a small control node for enumeration and queries (a
//!   stopgap until per-device DRM render nodes carry the full uAPI).
//!
//! Locking: the list of devices is a mutex taken only in probe, remove and ioctls; each
//! control queue has one IRQ-safe spinlock shared with its interrupt callback; no lock is
//! held across a sleep except through a condition variable wait, which releases it.

use kernel::{
    miscdevice::{MiscDeviceOptions, MiscDeviceRegistration},
    prelude::*,
};

mod ctl_node;
mod ctrl;
mod gpu;
mod virtio;
#[path = "../../spec/src/wire.rs"]
#[allow(dead_code, unreachable_pub, missing_docs)]
mod wire;

module! {
    type: SvmgpuModule,
    name: "svmgpu",
    authors: ["svmgpu developers"],
    description: "Driver for the svmgpu virtual GPU",
    license: "GPL",
}

#[pin_data]
struct SvmgpuModule {
    // Dropped first: unregistering the driver removes every device.
    #[pin]
    driver: virtio::Registration<gpu::GpuDriver>,
    #[pin]
    ctl: MiscDeviceRegistration<ctl_node::CtlNode>,
}

impl kernel::InPlaceModule for SvmgpuModule {
    fn init(module: &'static ThisModule) -> impl PinInit<Self, Error> {
        // SAFETY: The module initialiser runs once, before any device can probe or any
        // ioctl can run, which are the only users of `GPUS`.
        unsafe { gpu::GPUS.init() };
        try_pin_init!(Self {
            ctl <- MiscDeviceRegistration::register(MiscDeviceOptions { name: c"svmgpu" }),
            driver <- virtio::Registration::new(c"svmgpu", module),
        })
    }
}
