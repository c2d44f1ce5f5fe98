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
//! - [`chain`]: descriptor chains, every descriptor untrusted (a leaf);
//! - [`controlq`]: control-queue chains ↔ the dispatcher;
//! - [`vhu_svmgpu`]: the `VhostUserBackend` implementation;
//! - [`daemon`]: sockets, connections, signals;
//! - [`stats`]: per-device counters;
//! - [`mmu`]: page walker, TLBs and the audit of stale accesses;
//! - [`context`], [`fault`]: contexts and outstanding page faults;
//! - [`isa`]: the command-stream executor;
//! - [`engine`], [`timer`]: the engine threads and the latency timer;
//! - [`outbox`]: events and completions, and their delivery;
//! - [`timing`]: the timing model;
//! - [`inject`]: fault injection (rules, matcher, seeded RNG);
//! - [`ctl`]: the runtime control socket and its line-oriented JSON protocol;

pub mod budget;
pub mod chain;
pub mod config;
pub mod context;
pub mod control;
pub mod controlq;
pub mod ctl;
pub mod daemon;
mod device;
mod engine;
pub mod fault;
pub mod gpu;
pub mod inject;
pub mod isa;
pub mod mmu;
pub mod outbox;
pub mod ratelimit;
mod records;
pub mod stats;
mod timer;
pub mod timing;
pub mod vhu_svmgpu;
