// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `cargo bench -p svmgpu-device --bench svmgpu` (criterion): the device's speed figures
//! (see device/README.md, "Benchmarks"):
//! - `mmu/tlb_hit`: translations that hit the TLB (per element: one translation);
//! - `mmu/page_walk`: translations that miss (a 4-level walk and a TLB fill each);
//! - `bulk_1MiB/*`: COPY and FILL of 1 MiB through the MMU (2 MiB pages, and 4 KiB pages
//!   scattered so that each is its own segment) next to plain host `memcpy`/`fill` of the
//!   same size, in the same run (throughput in bytes);
//! - `round_trip/*`: a GET_INFO through the device against a bare virtqueue round trip (a
//!   backend that only returns the buffer), both through the same vhost-user frontend
//!   harness spinning on the used index.
//!
//! All modelled latencies are zero here: these are the host costs of the emulation.

#[allow(dead_code)]
#[path = "../tests/harness/mod.rs"]
mod harness;

use std::hint::black_box;
use std::io;
use std::sync::{Arc, RwLock};
use std::thread;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use harness::{Buf, InProcessBackend, TestFrontend};
use svmgpu_device::config::DeviceOptions;
use svmgpu_device::context::{ExecState, Job};
use svmgpu_device::isa::{Executor, Step};
use svmgpu_device::mmu::audit::InvalLog;
use svmgpu_device::mmu::{Mmu, Space};
use svmgpu_spec::isa::Insn;
use svmgpu_spec::pte::{self, Perms};
use svmgpu_spec::{AccessKind, CtrlHeader, Opcode, QUEUE_CONTROL};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

const MIB: u64 = 1 << 20;
const RW: Perms = Perms {
    writable: true,
    no_exec: false,
};

/// Guest RAM with a bump allocator and a page-table builder.
struct Ram {
    mem: GuestMemoryMmap<()>,
    next: u64,
    root: u64,
}

impl Ram {
    fn new(size: u64) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let mut r = Self {
            mem,
            next: 2 * MIB,
            root: 0,
        };
        r.root = r.alloc(4096, 4096);
        r
    }

    fn alloc(&mut self, size: u64, align: u64) -> u64 {
        let a = self.next.div_ceil(align) * align;
        self.next = a + size;
        a
    }

    fn set(&mut self, va: u64, stop: u32, raw: u64) {
        let mut t = self.root;
        for level in (stop + 1..=3).rev() {
            let e = pte::entry_address(t, va, level).unwrap();
            let cur: u64 = self.mem.read_obj(GuestAddress(e)).unwrap();
            t = if cur & pte::PRESENT != 0 {
                cur & pte::ADDR_MASK
            } else {
                let n = self.alloc(4096, 4096);
                self.mem
                    .write_obj(pte::table(n).unwrap(), GuestAddress(e))
                    .unwrap();
                n
            };
        }
        let e = pte::entry_address(t, va, stop).unwrap();
        self.mem.write_obj(raw, GuestAddress(e)).unwrap();
    }

    fn map_4k(&mut self, va: u64, pa: u64) {
        self.set(va, 0, pte::page_4k(pa, RW).unwrap());
    }

    fn map_2m(&mut self, va: u64, pa: u64) {
        self.set(va, 1, pte::page_2m(pa, RW).unwrap());
    }
}

fn space<'a>(ram: &'a Ram, log: &'a InvalLog) -> Space<'a> {
    Space {
        mem: &ram.mem,
        asid: 1,
        root: ram.root,
        log,
        audit: false,
        audit_grace: std::time::Duration::ZERO,
        hook: None,
    }
}

fn mmu(c: &mut Criterion) {
    let mut ram = Ram::new(64 * MIB);
    let log = InvalLog::new();
    // 32 pages resident in a 64-entry 4-way TLB.
    let hits = 0x10_0000_0000u64;
    for i in 0..32 {
        let pa = ram.alloc(4096, 4096);
        ram.map_4k(hits + i * 4096, pa);
    }
    // 8192 pages: every access misses.
    let misses = 0x20_0000_0000u64;
    let pages = 8192u64;
    for i in 0..pages {
        let pa = ram.alloc(4096, 4096);
        ram.map_4k(misses + i * 4096, pa);
    }
    let sp = space(&ram, &log);
    let mut g = c.benchmark_group("mmu");
    let vas: Vec<u64> = (0..1024u64)
        .map(|i| hits + ((i * 7) % 32) * 4096 + (i * 8) % 4096)
        .collect();
    let mut m = Mmu::new(64, 4).unwrap();
    for &va in &vas {
        m.translate(&sp, va, AccessKind::Read).unwrap();
    }
    g.throughput(Throughput::Elements(vas.len() as u64));
    g.bench_function("tlb_hit", |b| {
        b.iter(|| {
            for &va in &vas {
                black_box(m.translate(&sp, black_box(va), AccessKind::Read).unwrap());
            }
        })
    });
    assert_eq!(m.counters.misses, 32, "every access of the loop hit");
    let mut m = Mmu::new(64, 4).unwrap();
    g.throughput(Throughput::Elements(pages));
    g.bench_function("page_walk", |b| {
        b.iter(|| {
            for i in 0..pages {
                black_box(
                    m.translate(&sp, misses + i * 4096, AccessKind::Read)
                        .unwrap(),
                );
            }
        })
    });
    g.finish();
}

/// Runs `insn`, written at the batch page, through the executor once per iteration.
fn through_mmu(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    ram: &Ram,
    bpa: u64,
    insn: Insn,
) {
    let mut b = [0u8; 32];
    let n = insn.encode_bytes(&mut b).unwrap();
    ram.mem.write_slice(&b[..n], GuestAddress(bpa)).unwrap();
    let log = InvalLog::new();
    let sp = space(ram, &log);
    let mut mmu = Mmu::new(1024, 8).unwrap();
    let mut exec = Executor::new();
    let job = Job {
        seqno: 1,
        batch_va: 0x30_0000_0000,
        batch_len: n as u32,
    };
    g.bench_function(name, |b| {
        b.iter(|| {
            let mut st = ExecState::start(job);
            assert_eq!(exec.step(&mut mmu, &sp, &mut st, true), Step::Next);
        })
    });
}

fn bulk(c: &mut Criterion) {
    let mut ram = Ram::new(64 * MIB);
    let len = MIB;
    // The batch page.
    let bpa = ram.alloc(4096, 4096);
    ram.map_4k(0x30_0000_0000, bpa);
    // 2 MiB pages: source and destination.
    let (s2, d2) = (0x40_0000_0000u64, 0x40_4000_0000u64);
    let ps = ram.alloc(2 * MIB, 2 * MIB);
    let pd = ram.alloc(2 * MIB, 2 * MIB);
    ram.map_2m(s2, ps);
    ram.map_2m(d2, pd);
    // 4 KiB pages, physically scattered (no two neighbours adjacent), so that every page is
    // its own copy segment.
    let (s4, d4) = (0x50_0000_0000u64, 0x50_4000_0000u64);
    let pool = ram.alloc(2 * len + 4096 * 2, 4096);
    let npages = len / 4096;
    for i in 0..npages {
        let j = (i * 97) % npages; // a permutation (97 is odd, npages a power of two)
        ram.map_4k(s4 + i * 4096, pool + 2 * j * 4096);
        ram.map_4k(d4 + i * 4096, pool + (2 * j + 1) * 4096);
    }
    let mut g = c.benchmark_group("bulk_1MiB");
    g.throughput(Throughput::Bytes(len));
    through_mmu(
        &mut g,
        "copy_2MiB_pages",
        &ram,
        bpa,
        Insn::Copy {
            dst: d2,
            src: s2,
            len,
        },
    );
    through_mmu(
        &mut g,
        "copy_4KiB_pages",
        &ram,
        bpa,
        Insn::Copy {
            dst: d4,
            src: s4,
            len,
        },
    );
    let pattern = 0x1234_5678;
    through_mmu(
        &mut g,
        "fill_2MiB_pages",
        &ram,
        bpa,
        Insn::Fill {
            va: d2,
            len,
            pattern,
        },
    );
    through_mmu(
        &mut g,
        "fill_4KiB_pages",
        &ram,
        bpa,
        Insn::Fill {
            va: d4,
            len,
            pattern,
        },
    );
    // Plain host copies of the same size, same run.
    let src = vec![1u8; len as usize];
    let mut dst = vec![0u8; len as usize];
    g.bench_function("host_memcpy", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&src)))
    });
    g.bench_function("host_fill", |b| b.iter(|| black_box(&mut dst).fill(0x78)));
    g.finish();
}

/// A backend that returns every controlq buffer at once: the bare virtqueue round trip.
struct Echo {
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap<()>>>>,
}

impl VhostUserBackend for Echo {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        3
    }
    fn max_queue_size(&self) -> usize {
        1024
    }
    fn features(&self) -> u64 {
        (1 << 32) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn get_config(&self, _offset: u32, size: u32) -> Vec<u8> {
        vec![0; size as usize]
    }
    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap<()>>) -> io::Result<()> {
        *self.mem.write().unwrap() = Some(mem);
        Ok(())
    }
    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let Some(mem) = self.mem.read().unwrap().as_ref().map(|m| m.memory()) else {
            return Ok(());
        };
        let vring = &vrings[device_event as usize];
        let heads: Vec<u16> = vring
            .get_mut()
            .get_queue_mut()
            .iter(mem)
            .map(|it| it.map(|c| c.head_index()).collect())
            .unwrap_or_default();
        for h in heads {
            vring.add_used(h, 16).unwrap();
        }
        vring.signal_used_queue()
    }
}

fn spin_round_trip(fe: &mut TestFrontend, bufs: &[Buf]) {
    let q = usize::from(QUEUE_CONTROL);
    fe.queues[q].add_chain(&fe.ram, bufs);
    fe.queues[q].kick();
    while fe.queues[q].poll_used(&fe.ram).is_none() {
        std::hint::spin_loop();
    }
}

fn round_trips(c: &mut Criterion) {
    // The device: GET_INFO.
    let be = InProcessBackend::start(0, &DeviceOptions::default());
    let mut fe = TestFrontend::connect(&be.path, 16 * MIB);
    fe.start(256);
    let req = fe.ram.alloc(16, 16);
    let resp = fe.ram.alloc(64, 64);
    fe.ram.write(
        req,
        &CtrlHeader {
            opcode: Opcode::GetInfo.as_u32(),
            flags: 0,
            seqno: 1,
        }
        .to_bytes(),
    );
    let bufs = [Buf::r(req, 16), Buf::w(resp, 64)];

    // The bare virtqueue.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    let mut listener = Listener::new(&path, true).unwrap();
    let echo = Arc::new(Echo {
        mem: RwLock::new(None),
    });
    thread::spawn(move || {
        let mut d = VhostUserDaemon::new(
            "echo".into(),
            echo,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .unwrap();
        d.start(&mut listener).unwrap();
        let _ = d.wait();
    });
    let mut fe2 = TestFrontend::connect(&path, 16 * MIB);
    fe2.start(256);
    let req2 = fe2.ram.alloc(16, 16);
    let resp2 = fe2.ram.alloc(64, 64);
    let bufs2 = [Buf::r(req2, 16), Buf::w(resp2, 64)];

    let mut g = c.benchmark_group("round_trip");
    g.bench_function("get_info_through_the_device", |b| {
        b.iter(|| spin_round_trip(&mut fe, &bufs))
    });
    g.bench_function("bare_virtqueue", |b| {
        b.iter(|| spin_round_trip(&mut fe2, &bufs2))
    });
    g.finish();
}

criterion_group!(benches, mmu, bulk, round_trips);
criterion_main!(benches);
