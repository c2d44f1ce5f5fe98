// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A ready device for tests: an in-process backend, a connected [`Driver`], one address
//! space ([`ASID`]) with a batch area and a data area mapped, and a batch allocator.

use svmgpu_device::config::DeviceOptions;
use svmgpu_spec::isa::Insn;

use super::driver::{encode, Driver, PageTable, RW, RWX};
use super::{InProcessBackend, TestFrontend};

/// Guest RAM of the rig.
pub const RAM: u64 = 64 << 20;
/// The rig's address space.
pub const ASID: u32 = 1;
/// Where the batch area (64 KiB, RWX) is mapped.
pub const BATCH_VA: u64 = 0x1000_0000;
/// Where the data area (256 KiB, RW) is mapped.
pub const DATA_VA: u64 = 0x2000_0000;
const BATCH_LEN: u64 = 64 << 10;
const DATA_LEN: u64 = 256 << 10;

pub struct Rig {
    pub be: InProcessBackend,
    pub d: Driver,
    pub pt: PageTable,
    /// GPA of the batch area.
    pub batch: u64,
    /// GPA of the data area.
    pub data: u64,
    /// Next free batch offset.
    next: u64,
}

impl Rig {
    /// Starts a backend with `opts`, connects with `features` and maps the areas.
    pub fn new(opts: DeviceOptions, features: u64) -> Self {
        let be = InProcessBackend::start(0, &opts);
        let fe = TestFrontend::connect_with(&be.path, RAM, features);
        Self::with_driver(be, Driver::new(fe, 64))
    }

    /// Maps the areas with a driver the caller has already set up.
    pub fn with_driver(be: InProcessBackend, mut d: Driver) -> Self {
        let pt = d.page_table();
        let batch = d.alloc_mapped(&pt, BATCH_VA, BATCH_LEN, RWX);
        let data = d.alloc_mapped(&pt, DATA_VA, DATA_LEN, RW);
        d.bind(ASID, &pt);
        Self {
            be,
            d,
            pt,
            batch,
            data,
            next: 0,
        }
    }

    /// Writes a batch into the batch area and submits it on `ctx`; returns (job seqno,
    /// batch VA).
    pub fn run_at(&mut self, ctx: u32, insns: &[Insn]) -> (u64, u64) {
        let len = encode(insns).len() as u64;
        if self.next + len > BATCH_LEN {
            self.next = 0;
        }
        let off = self.next;
        self.next = (off + len + 63) & !63;
        let s = self
            .d
            .run_batch(ctx, BATCH_VA + off, self.batch + off, insns);
        (s, BATCH_VA + off)
    }

    /// [`Rig::run_at`] without the batch address.
    pub fn run(&mut self, ctx: u32, insns: &[Insn]) -> u64 {
        self.run_at(ctx, insns).0
    }

    /// Runs a batch and asserts that its job succeeds.
    pub fn run_ok(&mut self, ctx: u32, insns: &[Insn]) {
        let s = self.run(ctx, insns);
        assert_eq!(self.d.wait_job(s), 0, "{insns:?}");
    }
}
