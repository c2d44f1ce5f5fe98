// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `cargo bench -p svmgpu-device --bench svmgpu`: prints the device's speed figures (see
//! device/README.md, "Benchmarks"):
//! - TLB-hit translations per second on one core;
//! - page-walk cost per TLB miss;
//! - FILL/COPY bandwidth through the MMU (2 MiB and 4 KiB pages) against plain host
//!   `memcpy`/`fill` on the same machine in the same run;
//! - control-command round trip (GET_INFO through the device) against a bare virtqueue
//!   round trip (a backend that only returns the buffer), both through the same vhost-user
//!   frontend harness, in the same run.
//!
//! All modelled latencies are zero here: these are the host costs of the emulation.

#[allow(dead_code)]
#[path = "../tests/harness/mod.rs"]
mod harness;

use std::hint::black_box;
use std::io;
use std::sync::{Arc, RwLock};
use std::thread;
use std::time::{Duration, Instant};

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

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn tlb_hits(ram: &mut Ram) {
    let log = InvalLog::new();
    let base = 0x10_0000_0000u64;
    for i in 0..32 {
        let pa = ram.alloc(4096, 4096);
        ram.map_4k(base + i * 4096, pa);
    }
    let sp = Space {
        mem: &ram.mem,
        asid: 1,
        root: ram.root,
        log: &log,
        audit: false,
        audit_grace: std::time::Duration::ZERO,
        hook: None,
    };
    let mut mmu = Mmu::new(64, 4).unwrap();
    let vas: Vec<u64> = (0..1024u64)
        .map(|i| base + ((i * 7) % 32) * 4096 + (i * 8) % 4096)
        .collect();
    for &va in &vas {
        mmu.translate(&sp, va, AccessKind::Read).unwrap();
    }
    let rounds = 50_000u64;
    let t = Instant::now();
    let mut acc = 0u64;
    for _ in 0..rounds {
        for &va in &vas {
            acc ^= mmu
                .translate(&sp, black_box(va), AccessKind::Read)
                .map_or(0, |t| t.pa);
        }
    }
    let d = t.elapsed();
    black_box(acc);
    let n = rounds * vas.len() as u64;
    assert_eq!(mmu.counters.misses, 32);
    println!(
        "tlb_hit_translations_per_sec_per_core {:.1} M/s ({:.1} ns each; 64-entry 4-way TLB, 32 pages resident)",
        rate(n, d) / 1e6,
        d.as_nanos() as f64 / n as f64
    );
}

fn page_walks(ram: &mut Ram) {
    let log = InvalLog::new();
    let base = 0x20_0000_0000u64;
    let pages = 8192u64;
    for i in 0..pages {
        let pa = ram.alloc(4096, 4096);
        ram.map_4k(base + i * 4096, pa);
    }
    let sp = Space {
        mem: &ram.mem,
        asid: 1,
        root: ram.root,
        log: &log,
        audit: false,
        audit_grace: std::time::Duration::ZERO,
        hook: None,
    };
    let mut mmu = Mmu::new(64, 4).unwrap();
    let rounds = 100u64;
    let t = Instant::now();
    for _ in 0..rounds {
        for i in 0..pages {
            black_box(
                mmu.translate(&sp, base + i * 4096, AccessKind::Read)
                    .unwrap(),
            );
        }
    }
    let d = t.elapsed();
    let n = rounds * pages;
    assert!(mmu.counters.misses >= n - 64);
    println!(
        "page_walk_ns_per_miss {:.1} ns (4-level walk + TLB fill, every access a miss)",
        d.as_nanos() as f64 / n as f64
    );
}

/// Runs one instruction through the executor `reps` times; returns bytes per second.
fn through_mmu(ram: &Ram, insn: Insn, bytes: u64, reps: u32) -> f64 {
    let log = InvalLog::new();
    let sp = Space {
        mem: &ram.mem,
        asid: 1,
        root: ram.root,
        log: &log,
        audit: false,
        audit_grace: std::time::Duration::ZERO,
        hook: None,
    };
    let mut mmu = Mmu::new(1024, 8).unwrap();
    let mut exec = Executor::new();
    // The batch: the instruction, written at a mapped VA.
    let batch_va = 0x30_0000_0000u64;
    let mut b = [0u8; 32];
    let n = insn.encode_bytes(&mut b).unwrap();
    let job = Job {
        seqno: 1,
        batch_va,
        batch_len: n as u32,
    };
    let run = |mmu: &mut Mmu, exec: &mut Executor| {
        let mut st = ExecState::start(job);
        assert_eq!(exec.step(mmu, &sp, &mut st, true), Step::Next);
    };
    run(&mut mmu, &mut exec); // warm the TLB
    let t = Instant::now();
    for _ in 0..reps {
        run(&mut mmu, &mut exec);
    }
    rate(bytes * u64::from(reps), t.elapsed())
}

fn bandwidth(ram: &mut Ram) {
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
    let reps = 300;
    let write = |insn: &Insn| {
        let mut b = [0u8; 32];
        let n = insn.encode_bytes(&mut b).unwrap();
        ram.mem.write_slice(&b[..n], GuestAddress(bpa)).unwrap();
    };
    let copy2 = Insn::Copy {
        dst: d2,
        src: s2,
        len,
    };
    write(&copy2);
    let c2 = through_mmu(ram, copy2, len, reps);
    let copy4 = Insn::Copy {
        dst: d4,
        src: s4,
        len,
    };
    write(&copy4);
    let c4 = through_mmu(ram, copy4, len, reps);
    let fill2 = Insn::Fill {
        va: d2,
        len,
        pattern: 0x1234_5678,
    };
    write(&fill2);
    let f2 = through_mmu(ram, fill2, len, reps);
    let fill4 = Insn::Fill {
        va: d4,
        len,
        pattern: 0x1234_5678,
    };
    write(&fill4);
    let f4 = through_mmu(ram, fill4, len, reps);

    // Plain host copies of the same size, same run.
    let src = vec![1u8; len as usize];
    let mut dst = vec![0u8; len as usize];
    let t = Instant::now();
    for i in 0..reps {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst)[0] = i as u8;
    }
    let memcpy = rate(len * u64::from(reps), t.elapsed());
    let t = Instant::now();
    for i in 0..reps {
        black_box(&mut dst).fill(i as u8);
    }
    let memset = rate(len * u64::from(reps), t.elapsed());
    let gb = |x: f64| x / 1e9;
    println!(
        "host_memcpy_1MiB {:.2} GB/s; host_fill_1MiB {:.2} GB/s",
        gb(memcpy),
        gb(memset)
    );
    println!(
        "copy_through_mmu_2MiB_pages {:.2} GB/s ({:.0} % of memcpy)",
        gb(c2),
        100.0 * c2 / memcpy
    );
    println!(
        "copy_through_mmu_4KiB_pages {:.2} GB/s ({:.0} % of memcpy)",
        gb(c4),
        100.0 * c4 / memcpy
    );
    println!(
        "fill_through_mmu_2MiB_pages {:.2} GB/s ({:.0} % of host fill)",
        gb(f2),
        100.0 * f2 / memset
    );
    println!(
        "fill_through_mmu_4KiB_pages {:.2} GB/s ({:.0} % of host fill)",
        gb(f4),
        100.0 * f4 / memset
    );
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

fn spin_round_trip(fe: &mut TestFrontend, bufs: &[Buf]) -> Duration {
    let q = usize::from(QUEUE_CONTROL);
    let t = Instant::now();
    fe.queues[q].add_chain(&fe.ram, bufs);
    fe.queues[q].kick();
    loop {
        if fe.queues[q].poll_used(&fe.ram).is_some() {
            return t.elapsed();
        }
        std::hint::spin_loop();
    }
}

fn median_and_p99(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

fn round_trips() {
    let n = 20_000;
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
    let dev: Vec<Duration> = (0..n).map(|_| spin_round_trip(&mut fe, &bufs)).collect();

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
    let req = fe2.ram.alloc(16, 16);
    let resp = fe2.ram.alloc(64, 64);
    let bufs = [Buf::r(req, 16), Buf::w(resp, 64)];
    let bare: Vec<Duration> = (0..n).map(|_| spin_round_trip(&mut fe2, &bufs)).collect();

    let (dm, dp) = median_and_p99(dev);
    let (bm, bp) = median_and_p99(bare);
    println!(
        "control_round_trip_get_info median {:.1} us p99 {:.1} us",
        dm.as_secs_f64() * 1e6,
        dp.as_secs_f64() * 1e6
    );
    println!(
        "bare_virtqueue_round_trip median {:.1} us p99 {:.1} us",
        bm.as_secs_f64() * 1e6,
        bp.as_secs_f64() * 1e6
    );
    println!(
        "control_round_trip_ratio {:.2} x bare (median)",
        dm.as_secs_f64() / bm.as_secs_f64()
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful: run quickly
    // only when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        println!("svmgpu bench: run with `cargo bench -p svmgpu-device --bench svmgpu`");
        return;
    }
    let mut ram = Ram::new(256 * MIB);
    tlb_hits(&mut ram);
    page_walks(&mut ram);
    bandwidth(&mut ram);
    round_trips();
}
