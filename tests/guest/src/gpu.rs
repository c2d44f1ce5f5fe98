//! GPU test cases through the DRM uAPI: bind / exec / verify, invalid arguments, GPU page
//! faults, userptr invalidation (munmap, mprotect, madvise, fork) with jobs idle and
//! running, long-running queues, many VMs and queues, several devices on one buffer,
//! removal while busy, and the invalidation timing of single- vs two-pass notifiers.
//!
//! They mirror the intent of IGT's xe_exec_basic, the userptr cases of xe_vm and
//! xe_exec_fault_mode's userptr-invalidate(-race), written for this device.

use crate::{
    ktap::Outcome,
    tests::{Env, K},
    util::*,
};
use svmgpu::{fnv1a64, spec::isa::Insn, uapi, Device, Mapping};

const EFAULT: i32 = -libc::EFAULT;

fn outcome(r: TResult) -> Outcome {
    match r {
        Ok(()) => Outcome::Pass,
        Err(e) => Outcome::Fail(e),
    }
}

/// Runs `f` on every device, as a suite with one case per device.
fn per_device(k: &mut K, name: &str, f: impl Fn(&Device, &mut Vec<String>) -> TResult) {
    let Some(devs) = devices(k, name) else { return };
    let mut cases = Vec::new();
    for (i, d) in devs.iter().enumerate() {
        let mut diags = Vec::new();
        let o = outcome(f(d, &mut diags));
        for m in diags {
            k.diag(&format!("device_{i}: {m}"));
        }
        cases.push((format!("device_{i}"), o));
    }
    k.suite(name, cases);
}

/// Named sub-checks on the first device, as a suite.
fn checks(k: &mut K, name: &str, list: Vec<(&str, TResult)>) {
    let cases = list
        .into_iter()
        .map(|(n, r)| (n.to_string(), outcome(r)))
        .collect();
    k.suite(name, cases);
}

// ---- basic execution -------------------------------------------------------------------

pub fn exec_fill_checksum(_env: &Env, name: &str, k: &mut K) {
    per_device(k, name, |d, diags| {
        for (n, size) in [4096usize, 64 << 10, 1 << 20].into_iter().enumerate() {
            let pattern = 0xa5a5_0000 | n as u32;
            let r = ctx(
                "fill_and_checksum",
                svmgpu::fill_and_checksum(d, size, pattern, DATA_VA),
            )?;
            ensure(r.outcome.error == 0, || {
                format!("{size} bytes: job failed {:?}", r.outcome)
            })?;
            ensure(r.pattern_ok, || {
                format!("{size} bytes: the CPU does not see the pattern")
            })?;
            ensure(r.gpu_sum == r.cpu_sum, || {
                format!(
                    "{size} bytes: GPU checksum {:#x} != CPU {:#x}",
                    r.gpu_sum, r.cpu_sum
                )
            })?;
            diags.push(format!(
                "{size} bytes: checksum {:#018x} (fence {})",
                r.gpu_sum, r.fence
            ));
        }
        Ok(())
    });
}

pub fn exec_jobs_complete_in_order(_env: &Env, name: &str, k: &mut K) {
    per_device(k, name, |d, _| {
        let mut s = Setup::new(d, false, false)?;
        s.bind_data(4096)?;
        let b = batch(&[
            Insn::AtomicAdd {
                size64: false,
                va: DATA_VA,
                value: 1,
            },
            Insn::Delay { ns: 10_000 },
        ]);
        let mut fences = Vec::new();
        for _ in 0..100 {
            fences.push(ctx("EXEC", s.submit(&b))?);
        }
        ensure(fences.windows(2).all(|w| w[0] < w[1]), || {
            format!("fences not increasing: {fences:?}")
        })?;
        let last = *fences.last().unwrap_or(&0);
        let o = ctx("WAIT", s.wait(last))?;
        ensure(o.error == 0, || format!("last job: {o:?}"))?;
        for f in &fences {
            let o = ctx("WAIT(0)", d.wait(s.q, *f, 0))?;
            ensure(o.error == 0, || format!("fence {f}: {o:?}"))?;
        }
        let n = s.data().read_u32(0);
        ensure(n == 100, || format!("counter {n}, want 100"))
    });
}

// ---- invalid arguments -------------------------------------------------------------------

pub fn vm_bind_rejects_bad_arguments(_env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else { return };
    let d = &devs[0];
    let s = match Setup::new(d, false, false) {
        Ok(s) => s,
        Err(e) => return k.result(name, &Outcome::Fail(e)),
    };
    let m = match Mapping::anon(4 * 4096) {
        Ok(m) => m,
        Err(e) => return k.result(name, &Outcome::Fail(e.to_string())),
    };
    let bind = |vm: u32, op: u32, flags: u32, pad: u32, va: u64, size: u64, userptr: u64| {
        d.vm_bind_raw(&mut uapi::VmBind {
            vm_id: vm,
            op,
            flags,
            pad,
            va,
            size,
            userptr,
        })
    };
    let map = uapi::SVMGPU_VM_BIND_OP_MAP_USERPTR;
    let unmap = uapi::SVMGPU_VM_BIND_OP_UNMAP;
    let (vm, a) = (s.vm, m.addr());
    let mut list = vec![
        (
            "unaligned_va_is_einval",
            expect_errno(
                "bind",
                bind(vm, map, 0, 0, DATA_VA + 1, 4096, a),
                libc::EINVAL,
            ),
        ),
        (
            "unaligned_size_is_einval",
            expect_errno("bind", bind(vm, map, 0, 0, DATA_VA, 4097, a), libc::EINVAL),
        ),
        (
            "zero_size_is_einval",
            expect_errno("bind", bind(vm, map, 0, 0, DATA_VA, 0, a), libc::EINVAL),
        ),
        (
            "oversized_is_einval",
            expect_errno(
                "bind",
                bind(vm, map, 0, 0, DATA_VA, 2 << 30, a),
                libc::EINVAL,
            ),
        ),
        (
            "va_beyond_48_bits_is_einval",
            expect_errno("bind", bind(vm, map, 0, 0, 1 << 48, 4096, a), libc::EINVAL),
        ),
        (
            "va_end_beyond_48_bits_is_einval",
            expect_errno(
                "bind",
                bind(vm, map, 0, 0, (1 << 48) - 4096, 8192, a),
                libc::EINVAL,
            ),
        ),
        (
            "wrapping_va_is_einval",
            expect_errno("bind", bind(vm, map, 0, 0, !0xfff, 8192, a), libc::EINVAL),
        ),
        (
            "unaligned_userptr_is_einval",
            expect_errno(
                "bind",
                bind(vm, map, 0, 0, DATA_VA, 4096, a + 8),
                libc::EINVAL,
            ),
        ),
        (
            "undefined_op_is_einval",
            expect_errno("bind", bind(vm, 7, 0, 0, DATA_VA, 4096, a), libc::EINVAL),
        ),
        (
            "undefined_flag_is_einval",
            expect_errno(
                "bind",
                bind(vm, map, 0x10, 0, DATA_VA, 4096, a),
                libc::EINVAL,
            ),
        ),
        (
            "nonzero_pad_is_einval",
            expect_errno("bind", bind(vm, map, 0, 1, DATA_VA, 4096, a), libc::EINVAL),
        ),
        (
            "unknown_vm_is_enoent",
            expect_errno(
                "bind",
                bind(9999, map, 0, 0, DATA_VA, 4096, a),
                libc::ENOENT,
            ),
        ),
        (
            "unmap_with_userptr_is_einval",
            expect_errno(
                "unbind",
                bind(vm, unmap, 0, 0, DATA_VA, 4096, a),
                libc::EINVAL,
            ),
        ),
        (
            "unmap_with_flag_is_einval",
            expect_errno(
                "unbind",
                bind(vm, unmap, 1, 0, DATA_VA, 4096, 0),
                libc::EINVAL,
            ),
        ),
        (
            "unmap_of_nothing_is_enoent",
            expect_errno("unbind", d.unbind(vm, DATA_VA, 4096), libc::ENOENT),
        ),
    ];
    // Overlaps.
    let overlap = (|| {
        ctx("bind 2 pages", d.bind_userptr(vm, DATA_VA, 8192, a, false))?;
        expect_errno(
            "overlapping bind",
            d.bind_userptr(vm, DATA_VA + 4096, 8192, a, false),
            libc::EEXIST,
        )?;
        expect_errno(
            "same-range bind",
            d.bind_userptr(vm, DATA_VA, 8192, a, false),
            libc::EEXIST,
        )?;
        expect_errno(
            "batch-overlapping bind",
            d.bind_userptr(vm, BATCH_VA, 4096, a, false),
            libc::EEXIST,
        )?;
        expect_errno("partial unbind", d.unbind(vm, DATA_VA, 4096), libc::ENOENT)?;
        expect_errno(
            "unbind at the wrong va",
            d.unbind(vm, DATA_VA + 4096, 4096),
            libc::ENOENT,
        )?;
        ctx("unbind", d.unbind(vm, DATA_VA, 8192))?;
        expect_errno("second unbind", d.unbind(vm, DATA_VA, 8192), libc::ENOENT)?;
        // The same CPU range may be bound twice at different VAs.
        ctx("bind at va 1", d.bind_userptr(vm, DATA_VA, 8192, a, false))?;
        ctx(
            "bind at va 2",
            d.bind_userptr(vm, DATA_VA + 0x10_0000, 8192, a, false),
        )?;
        ctx("unbind 1", d.unbind(vm, DATA_VA, 8192))?;
        ctx("unbind 2", d.unbind(vm, DATA_VA + 0x10_0000, 8192))
    })();
    list.push(("overlapping_bind_is_eexist", overlap));
    // CPU memory that is not there, or not writable.
    let hole = (|| {
        let h = ctx("mmap", Mapping::anon(4 * 4096))?;
        let addr = h.addr();
        drop(h);
        expect_errno(
            "bind of a hole",
            d.bind_userptr(vm, DATA_VA, 4 * 4096, addr, false),
            libc::EFAULT,
        )?;
        // Half mapped, half hole.
        let half = ctx("mmap", Mapping::anon(8 * 4096))?;
        ensure(
            // SAFETY: Unmaps the upper half of our own mapping.
            unsafe { libc::munmap((half.addr() + 4 * 4096) as *mut _, 4 * 4096) } == 0,
            || "munmap".into(),
        )?;
        expect_errno(
            "bind over the end",
            d.bind_userptr(vm, DATA_VA, 8 * 4096, half.addr(), false),
            libc::EFAULT,
        )
    })();
    list.push(("unmapped_userptr_is_efault", hole));
    let ro = (|| {
        // SAFETY: A fresh read-only anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        ensure(p != libc::MAP_FAILED, || "mmap".into())?;
        let r = (|| {
            expect_errno(
                "writable bind of read-only memory",
                d.bind_userptr(vm, DATA_VA, 4096, p as u64, false),
                libc::EFAULT,
            )?;
            ctx(
                "read-only bind",
                d.bind_userptr(vm, DATA_VA, 4096, p as u64, true),
            )?;
            ctx("unbind", d.unbind(vm, DATA_VA, 4096))
        })();
        // SAFETY: Unmaps the mapping created above.
        unsafe { libc::munmap(p, 4096) };
        r
    })();
    list.push(("writable_bind_of_readonly_memory_is_efault", ro));
    checks(k, name, list);
}

pub fn exec_and_wait_reject_bad_arguments(_env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else { return };
    let d = &devs[0];
    let mut s = match Setup::new(d, false, false) {
        Ok(s) => s,
        Err(e) => return k.result(name, &Outcome::Fail(e)),
    };
    let q = s.q;
    let exec = |queue_id: u32, flags: u32, batch_va: u64, batch_len: u32, pad: u32| {
        d.exec_raw(&mut uapi::Exec {
            queue_id,
            flags,
            batch_va,
            batch_len,
            pad,
            ..Default::default()
        })
    };
    let wait = |queue_id: u32, flags: u32, fence: u64, timeout_ns: i64| {
        d.wait_raw(&mut uapi::Wait {
            queue_id,
            flags,
            fence,
            timeout_ns,
            ..Default::default()
        })
    };
    let mut list = vec![
        (
            "exec_unknown_queue_is_enoent",
            expect_errno("exec", exec(9999, 0, BATCH_VA, 8, 0), libc::ENOENT),
        ),
        (
            "exec_unaligned_batch_is_einval",
            expect_errno("exec", exec(q, 0, BATCH_VA + 4, 8, 0), libc::EINVAL),
        ),
        (
            "exec_empty_batch_is_einval",
            expect_errno("exec", exec(q, 0, BATCH_VA, 0, 0), libc::EINVAL),
        ),
        (
            "exec_odd_length_is_einval",
            expect_errno("exec", exec(q, 0, BATCH_VA, 12, 0), libc::EINVAL),
        ),
        (
            "exec_oversized_batch_is_einval",
            expect_errno(
                "exec",
                exec(q, 0, BATCH_VA, (16 << 20) + 8, 0),
                libc::EINVAL,
            ),
        ),
        (
            "exec_batch_beyond_48_bits_is_einval",
            expect_errno("exec", exec(q, 0, (1 << 48) - 8, 16, 0), libc::EINVAL),
        ),
        (
            "exec_undefined_flag_is_einval",
            expect_errno("exec", exec(q, 1, BATCH_VA, 8, 0), libc::EINVAL),
        ),
        (
            "exec_nonzero_pad_is_einval",
            expect_errno("exec", exec(q, 0, BATCH_VA, 8, 1), libc::EINVAL),
        ),
        (
            "wait_fence_zero_is_einval",
            expect_errno("wait", wait(q, 0, 0, 0), libc::EINVAL),
        ),
        (
            "wait_unknown_fence_is_einval",
            expect_errno("wait", wait(q, 0, u64::MAX, 0), libc::EINVAL),
        ),
        (
            "wait_negative_timeout_is_einval",
            expect_errno("wait", wait(q, 0, 1, -1), libc::EINVAL),
        ),
        (
            "wait_undefined_flag_is_einval",
            expect_errno("wait", wait(q, 4, 1, 0), libc::EINVAL),
        ),
        (
            "wait_unknown_queue_is_enoent",
            expect_errno("wait", wait(9999, 0, 1, 0), libc::ENOENT),
        ),
        (
            "queue_create_unknown_vm_is_enoent",
            expect_errno(
                "queue_create",
                d.exec_queue_create(9999, false),
                libc::ENOENT,
            ),
        ),
        (
            "vm_destroy_unknown_is_enoent",
            expect_errno("vm_destroy", d.vm_destroy(9999), libc::ENOENT),
        ),
        (
            "vm_destroy_with_queues_is_ebusy",
            expect_errno("vm_destroy", d.vm_destroy(s.vm), libc::EBUSY),
        ),
        (
            "queue_destroy_unknown_is_enoent",
            expect_errno("queue_destroy", d.exec_queue_destroy(9999), libc::ENOENT),
        ),
    ];
    let mut raw_vm = uapi::VmCreate {
        flags: 0x100,
        ..Default::default()
    };
    // SAFETY: `raw_vm` has the size the command encodes.
    let r = unsafe {
        d.raw_ioctl(
            uapi::DRM_IOCTL_SVMGPU_VM_CREATE,
            (&mut raw_vm as *mut uapi::VmCreate).cast(),
        )
    };
    list.push((
        "vm_create_undefined_flag_is_einval",
        expect_errno("vm_create", r, libc::EINVAL),
    ));
    let mut raw_q = uapi::ExecQueueCreate {
        vm_id: s.vm,
        flags: 0x100,
        ..Default::default()
    };
    // SAFETY: `raw_q` has the size the command encodes.
    let r = unsafe {
        d.raw_ioctl(
            uapi::DRM_IOCTL_SVMGPU_EXEC_QUEUE_CREATE,
            (&mut raw_q as *mut uapi::ExecQueueCreate).cast(),
        )
    };
    list.push((
        "queue_create_undefined_flag_is_einval",
        expect_errno("queue_create", r, libc::EINVAL),
    ));
    // No extension is defined: a chain pointer must be zero.
    let mut raw_vm = uapi::VmCreate {
        extensions: 0x1000,
        ..Default::default()
    };
    // SAFETY: `raw_vm` has the size the command encodes; the kernel must not follow the
    // pointer.
    let r = unsafe {
        d.raw_ioctl(
            uapi::DRM_IOCTL_SVMGPU_VM_CREATE,
            (&mut raw_vm as *mut uapi::VmCreate).cast(),
        )
    };
    list.push((
        "vm_create_extensions_is_einval",
        expect_errno("vm_create", r, libc::EINVAL),
    ));
    let mut raw_q = uapi::ExecQueueCreate {
        extensions: 0x1000,
        vm_id: s.vm,
        ..Default::default()
    };
    // SAFETY: As above.
    let r = unsafe {
        d.raw_ioctl(
            uapi::DRM_IOCTL_SVMGPU_EXEC_QUEUE_CREATE,
            (&mut raw_q as *mut uapi::ExecQueueCreate).cast(),
        )
    };
    list.push((
        "queue_create_extensions_is_einval",
        expect_errno("queue_create", r, libc::EINVAL),
    ));
    // A timeout: a job that runs for 300 ms, waited for 1 ms.
    let timeout = (|| {
        let f = ctx("exec", s.submit(&batch(&[Insn::Delay { ns: 300_000_000 }])))?;
        expect_errno("short wait", d.wait(s.q, f, 1_000_000), libc::ETIME)?;
        expect_errno("poll", d.wait(s.q, f, 0), libc::ETIME)?;
        let o = ctx("wait", s.wait(f))?;
        ensure(o.error == 0, || format!("{o:?}"))
    })();
    list.push(("wait_times_out_with_etime", timeout));
    checks(k, name, list);
}

// ---- GPU faults ----------------------------------------------------------------------------

pub fn gpu_access_to_unbound_va_is_efault(_env: &Env, name: &str, k: &mut K) {
    per_device(k, name, |d, _| {
        let before = ctx("query", d.query(false))?;
        let mut s = Setup::new(d, false, false)?;
        let o = s.run(&batch(&[Insn::Store {
            size64: false,
            va: 0x7000_0000,
            value: 1,
        }]))?;
        ensure(o.error == EFAULT && o.job_status == 0x100, || {
            format!("want -EFAULT / JOB_FAULT, got {o:?}")
        })?;
        // The queue is in the error state now.
        expect_errno("exec after the fault", s.submit(&batch(&[])), libc::EIO)?;
        let after = ctx("query", d.query(false))?;
        ensure(after.gpu_faults_failed > before.gpu_faults_failed, || {
            "the driver counted no failed fault".into()
        })
    });
}

pub fn readonly_binding_rejects_gpu_writes(_env: &Env, name: &str, k: &mut K) {
    per_device(k, name, |d, _| {
        let mut s = Setup::new(d, false, false)?;
        let mut ro = ctx("mmap", Mapping::anon(8192))?;
        for (i, b) in ro.as_mut_slice().iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        let ro_va = DATA_VA + 0x10_0000;
        ctx(
            "bind readonly",
            d.bind_userptr(s.vm, ro_va, 8192, ro.addr(), true),
        )?;
        s.bind_data(4096)?;
        s.run_ok(&batch(&[Insn::Checksum {
            src: ro_va,
            len: 8192,
            dst: DATA_VA,
        }]))?;
        let want = fnv1a64(ro.as_slice());
        let got = s.data().read_u64(0);
        ensure(got == want, || format!("checksum {got:#x}, want {want:#x}"))?;
        let o = s.run(&batch(&[Insn::Store {
            size64: false,
            va: ro_va,
            value: 1,
        }]))?;
        ensure(o.error == EFAULT, || {
            format!("write to a read-only binding: {o:?}")
        })?;
        ensure(ro.read_u32(0) == u32::from_le_bytes([0, 7, 14, 21]), || {
            "the read-only memory changed".into()
        })
    });
}

pub fn fault_mode_populates_on_gpu_fault(_env: &Env, name: &str, k: &mut K) {
    per_device(k, name, |d, diags| {
        let before = ctx("query", d.query(false))?;
        let mut s = Setup::new(d, true, false)?;
        s.bind_data(64 << 10)?;
        s.run_ok(&batch(&[
            Insn::Fill {
                va: DATA_VA,
                len: 60 << 10,
                pattern: 0x1234_5678,
            },
            Insn::Checksum {
                src: DATA_VA,
                len: 60 << 10,
                dst: DATA_VA + (62 << 10),
            },
        ]))?;
        let data = &s.data().as_slice()[..60 << 10];
        ensure(
            data.chunks_exact(4)
                .all(|c| c == 0x1234_5678u32.to_le_bytes()),
            || "pattern not visible to the CPU".into(),
        )?;
        let got = s.data().read_u64(62 << 10);
        ensure(got == fnv1a64(data), || "checksum mismatch".into())?;
        let after = ctx("query", d.query(false))?;
        diags.push(format!(
            "GPU faults handled: {}",
            after.gpu_faults - before.gpu_faults
        ));
        ensure(after.gpu_faults > before.gpu_faults, || {
            "no GPU fault was handled".into()
        })
    });
}

pub fn fault_mode_unmapped_userptr_is_efault(_env: &Env, name: &str, k: &mut K) {
    per_device(k, name, |d, _| {
        let mut s = Setup::new(d, true, false)?;
        let h = ctx("mmap", Mapping::anon(4 * 4096))?;
        let addr = h.addr();
        drop(h);
        ctx(
            "lazy bind of a hole",
            d.bind_userptr(s.vm, DATA_VA, 4 * 4096, addr, false),
        )?;
        let o = s.run(&batch(&[Insn::Store {
            size64: false,
            va: DATA_VA + 4096,
            value: 1,
        }]))?;
        ensure(o.error == EFAULT, || format!("want -EFAULT, got {o:?}"))
    });
}

// ---- userptr invalidation --------------------------------------------------------------------

fn store(va: u64, value: u32) -> svmgpu::Batch {
    batch(&[Insn::Store {
        size64: false,
        va,
        value: u64::from(value),
    }])
}

pub fn userptr_invalidate_munmap(_env: &Env, name: &str, k: &mut K) {
    per_device(k, name, |d, _| {
        let mut s = Setup::new(d, false, false)?;
        s.bind_data(4 * 4096)?;
        s.run_ok(&store(DATA_VA + 4, 11))?;
        ensure(s.data().read_u32(4) == 11, || "store not visible".into())?;
        let m = s.data.take().unwrap_or_else(|| unreachable!());
        drop(m); // munmap
        expect_errno(
            "exec after munmap",
            s.submit(&store(BATCH_VA + 4096, 1)),
            libc::EFAULT,
        )?;
        ctx("unbind after munmap", d.unbind(s.vm, DATA_VA, 4 * 4096))?;
        // The queue is usable again without the dead binding.
        s.run_ok(&store(BATCH_VA + 8192, 3))
    });
}

pub fn userptr_invalidate_mprotect(_env: &Env, name: &str, k: &mut K) {
    per_device(k, name, |d, _| {
        let mut s = Setup::new(d, false, false)?;
        s.bind_data(4 * 4096)?;
        s.run_ok(&store(DATA_VA, 1))?;
        let (addr, len) = (s.data().addr(), s.data().len());
        ensure(
            // SAFETY: Changes the protection of our own mapping.
            unsafe { libc::mprotect(addr as *mut _, len, libc::PROT_READ) } == 0,
            || "mprotect".into(),
        )?;
        expect_errno(
            "exec with read-only CPU pages",
            s.submit(&store(DATA_VA, 2)),
            libc::EFAULT,
        )?;
        ensure(
            // SAFETY: Changes the protection of our own mapping.
            unsafe { libc::mprotect(addr as *mut _, len, libc::PROT_READ | libc::PROT_WRITE) } == 0,
            || "mprotect".into(),
        )?;
        s.run_ok(&store(DATA_VA, 3))?;
        ensure(s.data().read_u32(0) == 3, || {
            format!("read {}, want 3", s.data().read_u32(0))
        })
    });
}

pub fn userptr_invalidate_madvise_dontneed(_env: &Env, name: &str, k: &mut K) {
    per_device(k, name, |d, _| {
        let mut s = Setup::new(d, false, false)?;
        s.bind_data(4 * 4096)?;
        s.run_ok(&batch(&[Insn::Fill {
            va: DATA_VA,
            len: 4 * 4096,
            pattern: 0xaaaa_aaaa,
        }]))?;
        ensure(s.data().read_u32(100) == 0xaaaa_aaaa, || {
            "fill not visible".into()
        })?;
        let (addr, len) = (s.data().addr(), s.data().len());
        ensure(
            // SAFETY: Discards the contents of our own mapping.
            unsafe { libc::madvise(addr as *mut _, len, libc::MADV_DONTNEED) } == 0,
            || "madvise".into(),
        )?;
        ensure(s.data().read_u32(100) == 0, || {
            "DONTNEED did not zero the pages".into()
        })?;
        // The GPU must read the new (zero) pages, not the old ones.
        s.run_ok(&batch(&[Insn::Checksum {
            src: DATA_VA,
            len: 4 * 4096,
            dst: BATCH_VA + 8192,
        }]))?;
        let want = fnv1a64(&[0u8; 4 * 4096]);
        let got = s.batch_buf.read_u64(8192);
        ensure(got == want, || {
            format!("the GPU read stale pages: checksum {got:#x}, want {want:#x}")
        })?;
        s.run_ok(&batch(&[Insn::Fill {
            va: DATA_VA,
            len: 4 * 4096,
            pattern: 0xbbbb_bbbb,
        }]))?;
        ensure(s.data().read_u32(100) == 0xbbbb_bbbb, || {
            "fill after DONTNEED not visible".into()
        })
    });
}

pub fn userptr_invalidate_fork_cow(_env: &Env, name: &str, k: &mut K) {
    per_device(k, name, |d, _| {
        let mut s = Setup::new(d, false, false)?;
        s.bind_data(4 * 4096)?;
        s.run_ok(&batch(&[Insn::Fill {
            va: DATA_VA,
            len: 4 * 4096,
            pattern: 0x1111_1111,
        }]))?;
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for two descriptors.
        ensure(unsafe { libc::pipe(fds.as_mut_ptr()) } == 0, || {
            "pipe".into()
        })?;
        let data_addr = s.data().addr() as *const u32;
        // SAFETY: The runner is single-threaded; the child only reads memory and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut b = [0u8; 1];
            // SAFETY: Child: wait for the parent, check its copy, exit without cleanup.
            unsafe {
                libc::read(fds[0], b.as_mut_ptr().cast(), 1);
                let v = std::ptr::read_volatile(data_addr.add(10));
                libc::_exit(if v == 0x1111_1111 { 0 } else { 1 });
            }
        }
        ensure(pid > 0, || "fork".into())?;
        // The parent's pages are COW-shared now; the GPU write must go to the parent's
        // own copy (the exec breaks COW when it faults the pages in for writing).
        let r = s.run_ok(&batch(&[Insn::Fill {
            va: DATA_VA,
            len: 4 * 4096,
            pattern: 0x2222_2222,
        }]));
        // SAFETY: Wake the child, then reap it.
        let status = unsafe {
            libc::write(fds[1], b"x".as_ptr().cast(), 1);
            let mut st = 0;
            libc::waitpid(pid, &mut st, 0);
            libc::close(fds[0]);
            libc::close(fds[1]);
            st
        };
        r?;
        ensure(s.data().read_u32(40) == 0x2222_2222, || {
            "the parent does not see the GPU write".into()
        })?;
        ensure(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            || format!("the child saw the GPU write (or died): status {status:#x}"),
        )
    });
}

/// A long job writes the data buffer while the CPU invalidates it with `invalidate` (30
/// times, 3 ms apart); then the CPU lets the job finish (a semaphore in the batch buffer,
/// which is not invalidated) and the job's final store must land in the CPU's current
/// pages.
fn invalidate_during_job(
    d: &Device,
    fault_mode: bool,
    long_running: bool,
    invalidate: &dyn Fn(&Mapping) -> TResult,
) -> Result<String, String> {
    let mut s = Setup::new(d, fault_mode, long_running)?;
    s.bind_data(4 * 4096)?;
    let go_off = 3 * 4096;
    s.batch_buf.write_u32(go_off, 0);
    let mut job = svmgpu::Batch::new();
    job.push(Insn::AtomicAdd {
        size64: false,
        va: DATA_VA,
        value: 1,
    })
    .push(Insn::Delay { ns: 40_000 });
    let body = i64::try_from(job.len_bytes()).expect("batch length fits i64");
    job.push(Insn::Loop {
        count: 1500,
        offset: -body,
    })
    .push(Insn::Wait {
        size64: false,
        op: svmgpu::spec::isa::CompareOp::Eq,
        timeout_us: 0,
        va: BATCH_VA + go_off as u64,
        value: 1,
    })
    .push(Insn::Store {
        size64: false,
        va: DATA_VA + 8,
        value: 0xfeed_beef,
    })
    .end();
    let f = ctx("EXEC", s.submit(&job))?;
    for n in 0..30 {
        match d.wait(s.q, f, 0) {
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Ok(o) => return Err(format!("job ended early after {n} invalidations: {o:?}")),
            Err(e) => return Err(format!("WAIT: {e}")),
        }
        invalidate(s.data())?;
        sleep_ms(3);
    }
    let counter = s.data().read_u32(0);
    s.batch_buf.write_u32(go_off, 1);
    let o = ctx("WAIT", s.wait(f))?;
    ensure(o.error == 0, || format!("job failed: {o:?}"))?;
    let magic = s.data().read_u32(8);
    ensure(magic == 0xfeed_beef, || {
        format!("final store not visible: {magic:#x}")
    })?;
    Ok(format!(
        "30 invalidations while the job ran (counter {counter} after the last)"
    ))
}

fn dontneed(m: &Mapping) -> TResult {
    // SAFETY: Discards the contents of our own mapping.
    ensure(
        unsafe { libc::madvise(m.addr() as *mut _, m.len(), libc::MADV_DONTNEED) } == 0,
        || "madvise".into(),
    )
}

/// Changes the protection and back without ever making the memory read-only (RW → RWX →
/// RW): each change invalidates, and the GPU may keep writing.
fn mprotect_cycle(m: &Mapping) -> TResult {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: Changes the protection of our own mapping, back and forth.
    let ok = unsafe {
        libc::mprotect(m.addr() as *mut _, m.len(), rw | libc::PROT_EXEC) == 0
            && libc::mprotect(m.addr() as *mut _, m.len(), rw) == 0
    };
    ensure(ok, || "mprotect".into())
}

fn remap(m: &Mapping) -> TResult {
    // SAFETY: Replaces our own mapping with fresh anonymous memory at the same address.
    let p = unsafe {
        libc::mmap(
            m.addr() as *mut _,
            m.len(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    ensure(p as u64 == m.addr(), || "mmap(MAP_FIXED)".into())
}

pub fn userptr_invalidate_while_job_runs(_env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else { return };
    let d = &devs[0];
    let mut cases = Vec::new();
    for (case, inv) in [
        (
            "madvise_dontneed",
            &dontneed as &dyn Fn(&Mapping) -> TResult,
        ),
        ("mprotect", &mprotect_cycle),
    ] {
        let r = invalidate_during_job(d, false, false, inv);
        if let Ok(m) = &r {
            k.diag(&format!("{case}: {m}"));
        }
        cases.push((case.to_string(), outcome(r.map(|_| ()))));
    }
    // The memory becomes read-only for a moment while the job writes: the job may see it
    // (a GPU write to read-only memory is -EFAULT) or not.
    let readonly = (|| {
        let mut s = Setup::new(d, false, false)?;
        s.bind_data(4 * 4096)?;
        let f = ctx(
            "EXEC",
            s.submit(&counting_job(DATA_VA, 1000, 40_000, DATA_VA + 8, 1)),
        )?;
        sleep_ms(5);
        let m = s.data();
        // SAFETY: Changes the protection of our own mapping, back and forth.
        unsafe {
            libc::mprotect(m.addr() as *mut _, m.len(), libc::PROT_READ);
            sleep_ms(5);
            libc::mprotect(
                m.addr() as *mut _,
                m.len(),
                libc::PROT_READ | libc::PROT_WRITE,
            );
        }
        let o = ctx("WAIT", s.wait(f))?;
        k.diag(&format!("mprotect_readonly: job outcome {o:?}"));
        ensure(o.error == 0 || o.error == EFAULT, || format!("{o:?}"))
    })();
    cases.push(("mprotect_readonly".to_string(), outcome(readonly)));
    // munmap while the job writes: the job may finish first, or take -EFAULT; it must
    // never write the freed pages (no_stale_tlb_accesses checks the device's audit).
    let munmap = (|| {
        let mut s = Setup::new(d, false, false)?;
        s.bind_data(4 * 4096)?;
        let f = ctx(
            "EXEC",
            s.submit(&counting_job(DATA_VA, 1000, 40_000, DATA_VA + 8, 1)),
        )?;
        sleep_ms(5);
        drop(s.data.take());
        let o = ctx("WAIT", s.wait(f))?;
        k.diag(&format!("munmap: job outcome {o:?}"));
        ensure(o.error == 0 || o.error == EFAULT, || format!("{o:?}"))
    })();
    cases.push(("munmap".to_string(), outcome(munmap)));
    k.suite(name, cases);
}

pub fn userptr_invalidate_race_fault_mode(_env: &Env, name: &str, k: &mut K) {
    per_device(k, name, |d, diags| {
        for (case, inv) in [
            ("remap", &remap as &dyn Fn(&Mapping) -> TResult),
            ("madvise_dontneed", &dontneed),
        ] {
            let m =
                invalidate_during_job(d, true, false, inv).map_err(|e| format!("{case}: {e}"))?;
            diags.push(format!("{case}: {m}"));
        }
        Ok(())
    });
}

pub fn long_running_preempted_on_invalidation(_env: &Env, name: &str, k: &mut K) {
    per_device(k, name, |d, diags| {
        let before = ctx("query", d.query(true))?;
        for (case, inv) in [
            (
                "madvise_dontneed",
                &dontneed as &dyn Fn(&Mapping) -> TResult,
            ),
            ("mprotect", &mprotect_cycle),
        ] {
            let m =
                invalidate_during_job(d, false, true, inv).map_err(|e| format!("{case}: {e}"))?;
            diags.push(format!("{case}: {m}"));
        }
        let after = ctx("query", d.query(true))?;
        let preemptions = after.stats[15] - before.stats[15];
        diags.push(format!("device preemptions: {preemptions}"));
        ensure(preemptions > 0, || "no preemption happened".into())
    });
}

// ---- scale, several devices ---------------------------------------------------------------

pub fn many_vms_and_queues(_env: &Env, name: &str, k: &mut K) {
    per_device(k, name, |d, diags| {
        const VMS: usize = 16;
        const QUEUES: usize = 4;
        let mut setups = Vec::new();
        for _ in 0..VMS {
            let mut s = Setup::new(d, false, false)?;
            s.bind_data(4096)?;
            setups.push(s);
        }
        let mut extra = Vec::new();
        let mut fences = Vec::new();
        for (v, s) in setups.iter_mut().enumerate() {
            let mut queues = vec![s.q];
            for _ in 1..QUEUES {
                let q = ctx("EXEC_QUEUE_CREATE", d.exec_queue_create(s.vm, false))?;
                extra.push(q);
                queues.push(q);
            }
            for (i, q) in queues.iter().enumerate() {
                let b = store(DATA_VA + 4 * i as u64, (v * 100 + i) as u32 + 1);
                let off = i * 4096;
                b.write_to(&mut s.batch_buf.as_mut_slice()[off..off + 4096]);
                let f = ctx(
                    "EXEC",
                    d.exec(*q, BATCH_VA + off as u64, b.len_bytes() as u32),
                )?;
                fences.push((*q, f));
            }
        }
        for (q, f) in &fences {
            let o = ctx("WAIT", d.wait(*q, *f, 20_000_000_000))?;
            ensure(o.error == 0, || format!("queue {q}: {o:?}"))?;
        }
        for (v, s) in setups.iter().enumerate() {
            for i in 0..QUEUES {
                let got = s.data().read_u32(4 * i);
                let want = (v * 100 + i) as u32 + 1;
                ensure(got == want, || {
                    format!("vm {v} queue {i}: {got}, want {want}")
                })?;
            }
        }
        for q in extra {
            ctx("EXEC_QUEUE_DESTROY", d.exec_queue_destroy(q))?;
        }
        diags.push(format!(
            "{VMS} VMs x {QUEUES} queues, {} jobs",
            fences.len()
        ));
        Ok(())
    });
}

pub fn devices_share_one_buffer(env: &Env, name: &str, k: &mut K) {
    if env.gpus < 2 {
        return k.result(name, &Outcome::Skip("needs 2 vGPUs".into()));
    }
    let Some(devs) = devices(k, name) else { return };
    let r = (|| {
        let n = devs.len();
        let chunk = 16 * 4096usize;
        let buf = ctx("mmap", Mapping::anon(n * chunk))?;
        let mut setups = Vec::new();
        for d in &devs {
            let s = Setup::new(d, false, false)?;
            ctx(
                "bind shared",
                d.bind_userptr(s.vm, DATA_VA, buf.len() as u64, buf.addr(), false),
            )?;
            setups.push(s);
        }
        for round in 0..3u32 {
            let mut fences = Vec::new();
            for (i, s) in setups.iter_mut().enumerate() {
                let b = batch(&[Insn::Fill {
                    va: DATA_VA + (i * chunk) as u64,
                    len: chunk as u64,
                    pattern: 0x5000_0000 | (round << 8) | i as u32,
                }]);
                fences.push(ctx("EXEC", s.submit(&b))?);
            }
            for (s, f) in setups.iter().zip(fences) {
                let o = ctx("WAIT", s.wait(f))?;
                ensure(o.error == 0, || format!("{o:?}"))?;
            }
            for i in 0..n {
                let want = 0x5000_0000 | (round << 8) | i as u32;
                let got = buf.read_u32(i * chunk + 64);
                ensure(got == want, || {
                    format!("round {round} device {i}: {got:#x}, want {want:#x}")
                })?;
            }
            // Invalidate the buffer on every device at once, then go again.
            dontneed(&buf)?;
        }
        Ok(())
    })();
    k.result(name, &outcome(r));
}

pub fn no_stale_tlb_accesses(_env: &Env, name: &str, k: &mut K) {
    per_device(k, name, |d, diags| {
        let q = ctx("query", d.query(true))?;
        diags.push(format!(
            "features {:#x}, audit checks {}, stale accesses {}, unflushed entries {}, narrow-flush entries {}, TLB invalidations {}, preemptions {}, page faults {}; driver: {} invalidations ({} ns total), {} GPU faults ({} failed)",
            q.features,
            q.audit_checks(),
            q.stale_accesses(),
            q.unflushed_entries(),
            q.narrow_flush_entries(),
            q.stats[11],
            q.stats[15],
            q.stats[6],
            q.invalidations,
            q.invalidation_ns,
            q.gpu_faults,
            q.gpu_faults_failed
        ));
        ensure(q.features & 1 != 0, || {
            "the AUDIT feature is not negotiated".into()
        })?;
        crate::coherence::audit_clean(std::slice::from_ref(d))
    });
}

// ---- removal while busy --------------------------------------------------------------------

pub fn device_unbind_while_busy(env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else { return };
    let r = (|| {
        let d = &devs[0];
        let bus = ctx("query", d.query(false))?.bus_index;
        let dev_name = format!("virtio{bus}");
        let mut s = Setup::new(d, false, false)?;
        s.bind_data(4 * 4096)?;
        let f = ctx(
            "EXEC",
            s.submit(&counting_job(DATA_VA, 5000, 100_000, DATA_VA + 8, 1)),
        )?;
        sleep_ms(20);
        ctx(
            "unbind",
            std::fs::write(format!("{DRIVER_DIR}/unbind"), &dev_name),
        )?;
        // The open file only fails now.
        expect_errno("query after unbind", d.query(false), libc::ENODEV)?;
        expect_errno(
            "exec after unbind",
            s.submit(&store(DATA_VA, 1)),
            libc::ENODEV,
        )?;
        expect_errno("wait after unbind", s.wait(f), libc::ENODEV)?;
        drop(s);
        ctx(
            "bind",
            std::fs::write(format!("{DRIVER_DIR}/bind"), &dev_name),
        )?;
        every_device_serves(env, "rebind", 7)
    })();
    drop(devs);
    k.result(name, &outcome(r));
}

pub fn module_unload_while_busy(env: &Env, name: &str, k: &mut K) {
    let r = (|| {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for two descriptors.
        ensure(unsafe { libc::pipe(fds.as_mut_ptr()) } == 0, || {
            "pipe".into()
        })?;
        // SAFETY: The runner is single-threaded; the child exits with `_exit`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // Child: long jobs on every device, then wait to be killed.
            let devs = Device::enumerate().unwrap_or_default();
            let mut setups = Vec::new();
            for d in &devs {
                if let Ok(mut s) = Setup::new(d, false, false) {
                    if s.bind_data(4 * 4096).is_ok() {
                        for _ in 0..4 {
                            let _ = s.submit(&counting_job(DATA_VA, 2000, 200_000, DATA_VA + 8, 1));
                        }
                    }
                    setups.push(s);
                }
            }
            // SAFETY: Tell the parent, then sleep until killed.
            unsafe {
                libc::write(fds[1], b"r".as_ptr().cast(), 1);
                loop {
                    libc::pause();
                }
            }
        }
        ensure(pid > 0, || "fork".into())?;
        let mut b = [0u8; 1];
        // SAFETY: Wait for the child's jobs, kill it and reap it.
        unsafe {
            libc::read(fds[0], b.as_mut_ptr().cast(), 1);
            libc::close(fds[0]);
            libc::close(fds[1]);
            libc::kill(pid, libc::SIGKILL);
        }
        // Unload as soon as the module is free (the dying child closes its files).
        let t0 = now_ns();
        let mut unloaded = false;
        while now_ns() - t0 < 10_000_000_000 {
            if run("rmmod", &["svmgpu"]).is_ok() {
                unloaded = true;
                break;
            }
            sleep_ms(5);
        }
        // SAFETY: Reap the child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        ensure(unloaded, || "rmmod did not succeed in 10 s".into())?;
        k.diag(&format!(
            "{name}: unloaded {} ms after killing the busy client",
            (now_ns() - t0) / 1_000_000
        ));
        run("insmod", &[MODULE_PATH])?;
        every_device_serves(env, "reload", 9)
    })();
    k.result(name, &outcome(r));
}

// ---- timing ----------------------------------------------------------------------------------

/// Reloads the module with each notifier mode and times CPU invalidations of one buffer
/// bound on every device (`svmgpu bench-invalidate`); the figures go to the KTAP log.
/// The driver's per-device counter `key` (debugfs `recovery`), summed over the devices.
fn driver_counter(key: &str) -> Result<u64, String> {
    let mut sum = 0;
    for d in ctx("enumerate", Device::enumerate())? {
        let bus = ctx("DEVICE_QUERY", d.query(false))?.bus_index;
        let path = format!("/sys/kernel/debug/svmgpu/virtio{bus}/recovery");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        sum += text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} ")))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| format!("no {key} in {path}"))?;
    }
    Ok(sum)
}

/// `svmgpu bench-invalidate` in each notifier mode (figures as diagnostics; speed is the
/// benchmark's business, scripts/bench.sh). What each mode causes is asserted: in
/// `twopass` the invalidations go through the core's two passes, in `single` through one.
pub fn invalidation_timing(env: &Env, name: &str, k: &mut K) {
    let mut cases = Vec::new();
    for mode in ["single", "twopass"] {
        let r = (|| {
            run("rmmod", &["svmgpu"])?;
            run("insmod", &[MODULE_PATH, &format!("notifier_mode={mode}")])?;
            let p = ctx(
                "parameter",
                std::fs::read_to_string("/sys/module/svmgpu/parameters/notifier_mode"),
            )?;
            ensure(p.trim() == mode, || format!("notifier_mode reads {p:?}"))?;
            for lr in [false, true] {
                let mut args = vec!["bench-invalidate", "--iters", "100", "--size", "65536"];
                if lr {
                    args.push("--long-running");
                }
                let out = std::process::Command::new("/bin/svmgpu")
                    .args(&args)
                    .output()
                    .map_err(|e| format!("svmgpu: {e}"))?;
                ensure(out.status.success(), || {
                    format!(
                        "svmgpu bench-invalidate: {}",
                        String::from_utf8_lossy(&out.stderr)
                    )
                })?;
                k.diag(&format!(
                    "{} vGPU(s): {}",
                    env.gpus,
                    String::from_utf8_lossy(&out.stdout).trim()
                ));
            }
            let two = driver_counter("invalidations_two_pass")?;
            let one = driver_counter("invalidations_single_pass")?;
            k.diag(&format!(
                "{mode}: {two} two-pass and {one} single-pass invalidations"
            ));
            match mode {
                "single" => ensure(two == 0 && one >= 100, || {
                    format!("notifier_mode=single: {two} two-pass, {one} single-pass invalidations")
                }),
                _ => {
                    ensure(two >= 200, || {
                        format!("notifier_mode=twopass: only {two} two-pass invalidations ({one} single)")
                    })
                }
            }
        })();
        cases.push((mode.to_string(), outcome(r)));
    }
    // Back to the default.
    let r = run("rmmod", &["svmgpu"]).and_then(|()| run("insmod", &[MODULE_PATH]));
    cases.push(("reload_default".to_string(), outcome(r)));
    k.suite(name, cases);
}

/// After a rebind or reload (`what`): all `env.gpus` devices are back and each runs a
/// fill job whose GPU checksum matches the CPU's.
fn every_device_serves(env: &Env, what: &str, pattern: u32) -> TResult {
    let devs = ctx("enumerate", Device::enumerate())?;
    ensure(devs.len() == env.gpus as usize, || {
        format!("{} devices after {what}", devs.len())
    })?;
    for d in &devs {
        let r = ctx("fill", svmgpu::fill_and_checksum(d, 4096, pattern, DATA_VA))?;
        ensure(r.outcome.error == 0 && r.gpu_sum == r.cpu_sum, || {
            format!("after {what}: {r:?}")
        })?;
    }
    Ok(())
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// WAIT's relative timeout survives signals: a thread interrupts a WAIT on a job that
/// never ends with a signal every 20 ms (no SA_RESTART: the ioctl returns EINTR, and the
/// library calls it again with the argument the kernel wrote back). The WAIT must still
/// time out after its 1 s, not restart its full timeout on every signal.
pub fn wait_timeout_survives_signals(_env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else { return };
    let r = (|| {
        let mut s = Setup::new(&devs[0], false, false)?;
        s.bind_data(4096)?;
        s.data().write_u32(0, 0);
        // Blocks on a semaphore nobody sets.
        let f = ctx(
            "EXEC",
            s.submit(&batch(&[Insn::Wait {
                size64: false,
                op: svmgpu::spec::isa::CompareOp::Eq,
                timeout_us: 0,
                va: DATA_VA,
                value: 1,
            }])),
        )?;
        // SAFETY: A handler that does nothing, without SA_RESTART.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = ignore_signal as *const () as usize;
            libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
        }
        // SAFETY: The calling thread's id.
        let me = unsafe { libc::pthread_self() };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let t = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let t0 = now_ns();
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && now_ns() - t0 < 6_000_000_000
                {
                    // SAFETY: `me` is alive (it joins this thread before it ends).
                    unsafe { libc::pthread_kill(me, libc::SIGUSR1) };
                    sleep_ms(20);
                }
            }
        });
        let t0 = now_ns();
        let w = s.dev.wait(s.q, f, 1_000_000_000);
        let ms = (now_ns() - t0) / 1_000_000;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = t.join();
        k.diag(&format!(
            "WAIT(1 s) interrupted every 20 ms returned after {ms} ms: {w:?}"
        ));
        ensure(errno(w) == Some(libc::ETIME), || {
            "WAIT did not time out".into()
        })?;
        ensure(ms < 3000, || {
            format!(
                "WAIT(1 s) took {ms} ms under signals: each restart waited the whole timeout again"
            )
        })
    })();
    k.result(name, &outcome(r));
}

/// The value of `key` in `d`'s fdinfo, as a number (its unit, if any, after a space).
fn fdinfo_num(info: &[(String, String)], key: &str) -> Result<u64, String> {
    let v = info
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
        .ok_or_else(|| format!("fdinfo has no {key}: {info:?}"))?;
    v.split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("fdinfo {key}: {v:?} is not a number"))
}

/// `fdinfo_reports_client_usage`: `/proc/self/fdinfo` of a render node shows the DRM
/// core's keys and the driver's per-client usage (Documentation/gpu/drm-usage-stats.rst):
/// a 50 ms job adds at least 50 ms to `drm-engine-render` and one completed job; the VM
/// and queue counts follow the file's objects; another open file of the same device has
/// its own client id and none of this usage.
pub fn fdinfo_reports_client_usage(_env: &Env, name: &str, k: &mut K) {
    per_device(k, name, |d, diags| {
        let other = ctx("open", Device::open(d.path()))?;
        let engines = ctx("DEVICE_QUERY", d.query(false))?.config.num_engines;
        let info = ctx("fdinfo", d.fdinfo())?;
        let value = |info: &[(String, String)], key: &str| {
            info.iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        ensure(value(&info, "drm-driver") == "svmgpu", || {
            format!("drm-driver: {info:?}")
        })?;
        let id = fdinfo_num(&info, "drm-client-id")?;
        ensure(
            fdinfo_num(&info, "drm-engine-capacity-render")? == u64::from(engines),
            || format!("engine capacity is not the device's {engines} engines: {info:?}"),
        )?;
        let busy0 = fdinfo_num(&info, "drm-engine-render")?;
        let jobs0 = fdinfo_num(&info, "svmgpu-jobs-completed")?;
        let mut s = Setup::new(d, false, false)?;
        let during = ctx("fdinfo", d.fdinfo())?;
        ensure(
            fdinfo_num(&during, "svmgpu-vms")? == 1
                && fdinfo_num(&during, "svmgpu-exec-queues")? == 1,
            || format!("one VM and one queue expected: {during:?}"),
        )?;
        s.run_ok(&batch(&[Insn::Delay { ns: 50_000_000 }]))?;
        let after = ctx("fdinfo", d.fdinfo())?;
        let busy = fdinfo_num(&after, "drm-engine-render")? - busy0;
        ensure(busy >= 50_000_000, || {
            format!("a 50 ms job added {busy} ns of engine time")
        })?;
        ensure(
            fdinfo_num(&after, "svmgpu-jobs-completed")? == jobs0 + 1,
            || format!("one completed job expected: {after:?}"),
        )?;
        let theirs = ctx("fdinfo", other.fdinfo())?;
        ensure(fdinfo_num(&theirs, "drm-client-id")? != id, || {
            "two files share a client id".into()
        })?;
        ensure(
            fdinfo_num(&theirs, "drm-engine-render")? == 0
                && fdinfo_num(&theirs, "svmgpu-jobs-completed")? == 0
                && fdinfo_num(&theirs, "svmgpu-vms")? == 0,
            || format!("another file shows this one's usage: {theirs:?}"),
        )?;
        drop(s);
        let gone = ctx("fdinfo", d.fdinfo())?;
        ensure(
            fdinfo_num(&gone, "svmgpu-vms")? == 0 && fdinfo_num(&gone, "svmgpu-exec-queues")? == 0,
            || format!("objects still counted after their destruction: {gone:?}"),
        )?;
        diags.push(format!("a 50 ms job: drm-engine-render +{busy} ns"));
        Ok(())
    })
}
