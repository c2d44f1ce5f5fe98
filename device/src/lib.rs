// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! # svmgpu-device
//!
//! The svmgpu virtual GPU as a vhost-user backend (spec: `spec/svmgpu.md`). Each device is
//! served on its own Unix socket; QEMU attaches it as a virtio device with ID 62.
//!
//! Layout, in rust-vmm vhost-device style:
//! - [`config`]: device options and the config space they produce;
//! - [`gpu`]: the device state that outlives connections (identity, statistics);
//! - [`control`]: the control-request dispatcher (bytes in, bytes out);
//! - [`chain`]: descriptor chains ↔ dispatcher, with every descriptor untrusted;
//! - [`vhu_svmgpu`]: the `VhostUserBackend` implementation;
//! - [`daemon`]: sockets, connections, signals;
//! - [`stats`]: per-device counters.
//!
//! This step is the walking skeleton: the config space, GET_INFO and GET_STATS are served;
//! every other opcode of the spec is answered `UNSUPPORTED`.

pub mod chain;
pub mod config;
pub mod control;
pub mod daemon;
pub mod gpu;
pub mod stats;
pub mod vhu_svmgpu;
