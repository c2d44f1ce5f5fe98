//! Shared virtual memory (issue 6): fault-mode VMs that use the process's own CPU addresses
//! with no bind, on one or several devices, in each `svm_mode`.
//!
//! Each mode is one KTAP test (`svm_mode_single`, `svm_mode_per_device`, `svm_mode_shared`)
//! that reloads the module with `svm_mode=<mode>` and runs every case below as a nested
//! suite. The cases cover what IGT `xe_exec_system_allocator`, kfdtest's SVM tests and the
//! kernel's `hmm-tests` check (malloc, mmap, huge pages, shared and file mappings, mremap,
//! free, fork and COW, mlock, partial munmap, CPU/GPU races, many threads, strides, invalid
//! addresses, read-only memory, several GPUs on one range, teardown, mixed bind + SVM,
//! prefetch). Every case checks data through checksums written by the GPU and computed by
//! the CPU, and afterwards the devices' audit must count no violation.
//! Multi-GPU cases skip with a reason on fewer than 2 vGPUs.

use crate::{
    ktap::Outcome,
    tests::{Env, K},
    util::*,
};
use std::sync::atomic::{AtomicBool, Ordering};
use svmgpu::{fnv1a64, spec::isa::Insn, Batch, Device, FenceOutcome, Mapping};

const EFAULT: i32 = -libc::EFAULT;
const EACCES: i32 = -libc::EACCES;
const MIB: usize = 1 << 20;
const CHUNK: usize = MIB;
const WAIT_NS: i64 = 30_000_000_000;

/// A case: `Ok`, `Err(reason)`, or a skip (`Ok` with `Some(reason)`).
type CResult = Result<Option<String>, String>;
type Case = fn(&[Device]) -> CResult;

const CASES: &[(&str, Case)] = &[
    ("malloc_buffer_gpu_fill_cpu_verify", malloc_buffer),
    ("mmap_anon_cpu_writes_gpu_checksums", mmap_anon),
    ("stack_memory_gpu_store", stack_memory),
    ("mmap_huge_thp_2m_ranges", mmap_huge),
    ("mmap_shared_seen_by_child", mmap_shared_child),
    ("mmap_file_gpu_write_read_back", mmap_file),
    ("mremap_moves_mirror_old_address_faults", mremap_moves),
    ("munmap_then_gpu_access_is_efault", munmap_then_access),
    ("notifier_removed_with_its_last_range", notifier_removed),
    ("fork_child_reads_parent_gpu_data", fork_child_reads),
    ("fork_cow_gpu_write_stays_in_parent", fork_cow),
    ("mlock_buffer_gpu_fill", mlock_buffer),
    ("partial_munmap_front_and_middle_splits", partial_munmap),
    ("cpu_gpu_race_on_one_buffer", cpu_gpu_race),
    ("many_threads_many_contexts", many_threads),
    ("stride_every_other_page", stride),
    ("invalid_address_cancels_with_efault", invalid_address),
    ("readonly_mapping_gpu_write_is_eacces", readonly_mapping),
    ("multiple_gpu_reads_after_cpu_updates", multiple_reads),
    ("migration_churn_threads_dontneed", churn_dontneed),
    (
        "unpaced_mprotect_churn_checksum_every_gpu",
        unpaced_mprotect_churn,
    ),
    ("mixed_bind_and_svm_in_one_vm", mixed_bind_svm),
    ("prefetch_populates_ahead_of_use", prefetch),
    ("teardown_with_live_ranges", teardown),
    ("multi_gpu_one_range_fill_and_checksum", multi_gpu_one_range),
    ("multi_gpu_invalidation_on_cpu_write", multi_gpu_invalidate),
];

/// The cases `svmgpu-ktap --cases` keeps in every mode's suite (all when unset).
static SELECTED: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();

/// Restricts the mode suites to the cases named in `list` (comma separated). `Err` names
/// one that does not exist, so that a typo cannot pass an empty suite.
pub fn select_cases(list: &str) -> Result<(), String> {
    let mut sel = Vec::new();
    for name in list.split(',') {
        match CASES.iter().find(|c| c.0 == name) {
            Some(c) => sel.push(c.0),
            None => return Err(format!("no SVM case named {name:?}")),
        }
    }
    let _ = SELECTED.set(sel);
    Ok(())
}

/// The names of every case, for `--help`.
pub fn case_names() -> impl Iterator<Item = &'static str> {
    CASES.iter().map(|c| c.0)
}

/// One KTAP test per mode: reload with `svm_mode=<mode>` and run every case (or those
/// [`select_cases`] kept).
pub fn mode_single(env: &Env, name: &str, k: &mut K) {
    run_mode(env, name, k, "single")
}
pub fn mode_per_device(env: &Env, name: &str, k: &mut K) {
    run_mode(env, name, k, "per_device")
}
pub fn mode_shared(env: &Env, name: &str, k: &mut K) {
    run_mode(env, name, k, "shared")
}

fn reload(mode: &str) -> TResult {
    run("rmmod", &["svmgpu"])?;
    // A name the parameter does not know is refused, and the module stays unloaded.
    for bad in [
        "svm_mode=bogus",
        "svm_mode=Shared",
        "notifier_mode=two",
        "svm_impl=drm",
    ] {
        ensure(run("insmod", &[MODULE_PATH, bad]).is_err(), || {
            format!("insmod svmgpu.ko {bad} succeeded")
        })?;
        ensure(!std::path::Path::new("/sys/module/svmgpu").exists(), || {
            format!("svmgpu is loaded after insmod {bad}")
        })?;
    }
    run("insmod", &[MODULE_PATH, &format!("svm_mode={mode}")])?;
    let p = ctx(
        "parameter",
        std::fs::read_to_string("/sys/module/svmgpu/parameters/svm_mode"),
    )?;
    ensure(p.trim() == mode, || format!("svm_mode reads {p:?}"))
}

fn run_mode(env: &Env, name: &str, k: &mut K, mode: &str) {
    if let Err(e) = reload(mode) {
        return k.result(name, &Outcome::Fail(format!("reload: {e}")));
    }
    let devs = match Device::enumerate() {
        Ok(d) if d.len() == env.gpus as usize && !d.is_empty() => d,
        Ok(d) => {
            return k.result(
                name,
                &Outcome::Fail(format!("{} devices after reload", d.len())),
            )
        }
        Err(e) => return k.result(name, &Outcome::Fail(format!("enumerate: {e}"))),
    };
    let mut cases = Vec::new();
    let selected = |case: &str| SELECTED.get().is_none_or(|s| s.contains(&case));
    for (case, f) in CASES.iter().filter(|c| selected(c.0)) {
        let t0 = now_ns();
        let r = f(&devs);
        let r = match r {
            Ok(skip) => crate::coherence::audit_clean(&devs).map(|()| skip),
            Err(e) => Err(e),
        };
        let o = match r {
            Ok(None) => Outcome::Pass,
            Ok(Some(why)) => Outcome::Skip(why),
            Err(e) => Outcome::Fail(e),
        };
        k.diag(&format!(
            "{mode}/{case}: {} ms",
            (now_ns() - t0) / 1_000_000
        ));
        cases.push((case.to_string(), o));
    }
    if let Ok(q) = devs[0].query(false) {
        k.diag(&format!(
            "{mode}: device 0: {} GPU faults ({} SVM, {} failed), mean service {} us; {} invalidations; pages objects now {}, ranges collected {}",
            q.gpu_faults,
            q.svm_faults,
            q.gpu_faults_failed,
            q.fault_service_ns / q.gpu_faults.max(1) / 1000,
            q.invalidations,
            q.svm_pages,
            q.svm_ranges_collected
        ));
    }
    drop(devs);
    // Back to the default module parameters.
    if mode != "shared" {
        if let Err(e) = run("rmmod", &["svmgpu"]).and_then(|()| run("insmod", &[MODULE_PATH])) {
            cases.push(("reload_default".into(), Outcome::Fail(e)));
        }
    }
    k.suite(name, cases);
}

// ---- helpers ---------------------------------------------------------------------------------

/// A fault-mode VM with one exec queue and a batch buffer, on one device. No binding:
/// batches run from CPU memory at their CPU address.
struct Svm<'a> {
    dev: &'a Device,
    vm: u32,
    q: u32,
    batch: Mapping,
}

impl<'a> Svm<'a> {
    fn new(dev: &'a Device) -> Result<Self, String> {
        let vm = ctx("VM_CREATE(fault mode)", dev.vm_create(true))?;
        let q = match dev.exec_queue_create(vm, false) {
            Ok(q) => q,
            Err(e) => {
                let _ = dev.vm_destroy(vm);
                return Err(format!("EXEC_QUEUE_CREATE: {e}"));
            }
        };
        let batch = match Mapping::anon(64 * 1024) {
            Ok(m) => m,
            Err(e) => {
                let _ = dev.exec_queue_destroy(q);
                let _ = dev.vm_destroy(vm);
                return Err(format!("mmap: {e}"));
            }
        };
        Ok(Svm { dev, vm, q, batch })
    }

    /// Submits `b` (written at slot `slot` of the batch buffer).
    fn submit_at(&mut self, slot: usize, b: &Batch) -> Result<u64, String> {
        let off = slot * 4096;
        b.write_to(&mut self.batch.as_mut_slice()[off..off + 4096]);
        ctx(
            "EXEC",
            self.dev
                .exec_retry(self.q, self.batch.addr() + off as u64, b.len_bytes() as u32),
        )
    }

    fn wait(&self, f: u64) -> Result<FenceOutcome, String> {
        ctx("WAIT", self.dev.wait(self.q, f, WAIT_NS))
    }

    fn run(&mut self, insns: &[Insn]) -> Result<FenceOutcome, String> {
        let f = self.submit_at(0, &batch(insns))?;
        self.wait(f)
    }

    fn run_ok(&mut self, insns: &[Insn]) -> TResult {
        let o = self.run(insns)?;
        ensure(o.error == 0, || format!("job failed: {o:?}"))
    }

    /// A new queue after a failed job (the queue is in the error state).
    fn renew_queue(&mut self) -> TResult {
        let _ = self.dev.exec_queue_destroy(self.q);
        self.q = ctx(
            "EXEC_QUEUE_CREATE",
            self.dev.exec_queue_create(self.vm, false),
        )?;
        Ok(())
    }

    /// GPU checksum of `[va, va + len)` (chunked, combined by the CPU as a list).
    fn gpu_sums(&mut self, va: u64, len: usize) -> Result<Vec<u64>, String> {
        let res = self.batch.addr() + 32 * 1024;
        let mut out = Vec::new();
        let mut off = 0;
        while off < len {
            let n = (len - off).min(CHUNK);
            self.run_ok(&[Insn::Checksum {
                src: va + off as u64,
                len: n as u64,
                dst: res,
            }])?;
            out.push(self.batch.read_u64(32 * 1024));
            off += n;
        }
        Ok(out)
    }

    /// GPU fill of `[va, va + len)` with `pattern`.
    fn gpu_fill(&mut self, va: u64, len: usize, pattern: u32) -> TResult {
        let mut insns = Vec::new();
        let mut off = 0;
        while off < len {
            let n = (len - off).min(CHUNK);
            insns.push(Insn::Fill {
                va: va + off as u64,
                len: n as u64,
                pattern,
            });
            off += n;
        }
        for part in insns.chunks(100) {
            self.run_ok(part)?;
        }
        Ok(())
    }
}

impl Drop for Svm<'_> {
    fn drop(&mut self) {
        let _ = self.dev.exec_queue_destroy(self.q);
        let _ = self.dev.vm_destroy(self.vm);
    }
}

/// CPU checksums of `bytes`, chunked as [`Svm::gpu_sums`] does.
fn cpu_sums(bytes: &[u8]) -> Vec<u64> {
    bytes.chunks(CHUNK).map(fnv1a64).collect()
}

fn check_sums(what: &str, gpu: &[u64], bytes: &[u8]) -> TResult {
    let cpu = cpu_sums(bytes);
    ensure(gpu == cpu.as_slice(), || {
        format!("{what}: GPU checksums {gpu:x?} != CPU {cpu:x?}")
    })
}

fn all_words(bytes: &[u8], pattern: u32) -> bool {
    bytes
        .chunks_exact(4)
        .all(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) == pattern)
}

fn fill_cpu(bytes: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for c in bytes.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
}

/// `len` bytes of memory mapped with `prot`/`flags` (and `fd`), aligned to `align`.
struct Mem {
    ptr: *mut u8,
    len: usize,
    /// The whole reservation, unmapped on drop.
    base: *mut u8,
    base_len: usize,
}

impl Mem {
    fn map(len: usize, align: usize, prot: i32, flags: i32, fd: i32) -> Result<Mem, String> {
        // SAFETY: A fresh reservation, then a fixed mapping inside it.
        unsafe {
            let base_len = len + align;
            let base = libc::mmap(
                std::ptr::null_mut(),
                base_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(format!("mmap: {}", std::io::Error::last_os_error()));
            }
            let a = (base as usize).div_ceil(align) * align;
            let p = libc::mmap(a as *mut _, len, prot, flags | libc::MAP_FIXED, fd, 0);
            if p == libc::MAP_FAILED {
                libc::munmap(base, base_len);
                return Err(format!("mmap fixed: {}", std::io::Error::last_os_error()));
            }
            Ok(Mem {
                ptr: p.cast(),
                len,
                base: base.cast(),
                base_len,
            })
        }
    }

    fn anon(len: usize) -> Result<Mem, String> {
        Self::map(
            len,
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
        )
    }

    fn addr(&self) -> u64 {
        self.ptr as u64
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: Mapped readable for `len` bytes while `self` lives (callers only read
        // mappings they made readable).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: As in `bytes`, for writable mappings.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn read_u32(&self, off: usize) -> u32 {
        // SAFETY: In bounds and aligned (callers pass multiples of 4).
        unsafe { std::ptr::read_volatile(self.ptr.add(off).cast::<u32>()) }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: The reservation was made by `map`.
        unsafe { libc::munmap(self.base.cast(), self.base_len) };
    }
}

fn sys(what: &str, rc: i32) -> TResult {
    ensure(rc == 0, || {
        format!("{what}: {}", std::io::Error::last_os_error())
    })
}

fn dontneed(addr: u64, len: usize) -> TResult {
    // SAFETY: The range is a mapping of the caller's.
    sys("madvise(DONTNEED)", unsafe {
        libc::madvise(addr as *mut _, len, libc::MADV_DONTNEED)
    })
}

fn faults(d: &Device) -> Result<(u64, u64), String> {
    let q = ctx("query", d.query(false))?;
    Ok((q.gpu_faults, q.svm_faults))
}

/// Forks; the child runs `f` and exits with its result (0 = success); returns the code.
fn in_child(f: impl FnOnce() -> bool) -> Result<i32, String> {
    // SAFETY: No other thread of the runner is alive here; the child exits with `_exit`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err("fork failed".into());
    }
    if pid == 0 {
        let ok = f();
        // SAFETY: Leave the child without running the parent's destructors.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut st = 0;
    // SAFETY: Reap our child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    Ok(if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st)
    } else {
        -1
    })
}

fn need_gpus(devs: &[Device], n: usize) -> Option<String> {
    (devs.len() < n).then(|| format!("needs {n} vGPUs, have {}", devs.len()))
}

// ---- cases -----------------------------------------------------------------------------------

/// IGT malloc, hmm-tests write: a heap buffer, filled by the GPU, verified by the CPU.
fn malloc_buffer(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    let mut v: Vec<u32> = vec![0; 300 * 1024 / 4];
    let va = v.as_mut_ptr() as u64;
    let len = v.len() * 4;
    let (f0, s0) = faults(&devs[0])?;
    s.gpu_fill(va, len, 0xa110_c8ed)?;
    let gpu = s.gpu_sums(va, len)?;
    // SAFETY: `v` is a live buffer of `len` bytes.
    let bytes = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), len) };
    ensure(all_words(bytes, 0xa110_c8ed), || {
        "pattern not visible to the CPU".into()
    })?;
    check_sums("malloc", &gpu, bytes)?;
    let (f1, s1) = faults(&devs[0])?;
    ensure(f1 > f0 && s1 > s0, || {
        format!("no SVM fault was handled ({f0}->{f1}, svm {s0}->{s1})")
    })?;
    Ok(None)
}

/// IGT mmap, hmm-tests read: the CPU writes, the GPU checksums.
fn mmap_anon(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    let mut m = Mem::anon(3 * MIB + 8192)?;
    fill_cpu(m.bytes_mut(), 0x5eed);
    let gpu = s.gpu_sums(m.addr(), m.len)?;
    check_sums("mmap", &gpu, m.bytes())?;
    Ok(None)
}

/// The stack is process memory too.
fn stack_memory(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    let mut local = [0u32; 1024];
    let va = local.as_mut_ptr() as u64;
    s.run_ok(&[Insn::Store {
        size64: false,
        va: va + 40,
        value: 0x57ac,
    }])?;
    // SAFETY: `local` is alive; the GPU wrote it behind the compiler's back.
    let got = unsafe { std::ptr::read_volatile(local.as_ptr().add(10)) };
    ensure(got == 0x57ac, || format!("stack word {got:#x}"))?;
    std::hint::black_box(&mut local);
    Ok(None)
}

/// IGT mmap-huge, hmm-tests huge pages: a 2 MiB-aligned THP region is mirrored in 2 MiB
/// ranges.
fn mmap_huge(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    let mut m = Mem::map(
        4 * MIB,
        2 * MIB,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
    )?;
    // SAFETY: Our mapping.
    unsafe { libc::madvise(m.ptr.cast(), m.len, libc::MADV_HUGEPAGE) };
    fill_cpu(m.bytes_mut(), 0x2b16);
    let (_, s0) = faults(&devs[0])?;
    let gpu = s.gpu_sums(m.addr(), m.len)?;
    check_sums("huge", &gpu, m.bytes())?;
    let (_, s1) = faults(&devs[0])?;
    // 4 MiB in 2 MiB ranges: one fault per range populates it whole (64 KiB chunks
    // would take 64 faults); allow a retry or two for racing THP collapses.
    ensure(s1 - s0 >= 2 && s1 - s0 <= 4, || {
        format!(
            "{} SVM faults for 4 MiB of 2 MiB-aligned memory, want 2",
            s1 - s0
        )
    })?;
    s.gpu_fill(m.addr(), m.len, 0x4e4e_4e4e)?;
    ensure(all_words(m.bytes(), 0x4e4e_4e4e), || {
        "GPU fill not visible".into()
    })?;
    Ok(None)
}

/// IGT mmap-shared, hmm-tests shared child: a MAP_SHARED buffer written by the GPU is
/// seen by a child, and the child's CPU writes are seen by the parent's GPU.
fn mmap_shared_child(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    let mut m = Mem::map(
        256 * 1024,
        4096,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED | libc::MAP_ANONYMOUS,
        -1,
    )?;
    s.gpu_fill(m.addr(), m.len, 0x5a5a_0001)?;
    let want = fnv1a64(m.bytes());
    let gpu = s.gpu_sums(m.addr(), m.len)?;
    check_sums("shared", &gpu, m.bytes())?;
    let mp = m.ptr as usize;
    let len = m.len;
    let code = in_child(|| {
        // SAFETY: The shared mapping is inherited.
        let b = unsafe { std::slice::from_raw_parts_mut(mp as *mut u8, len) };
        let ok = fnv1a64(b) == want;
        fill_cpu(b, 0xc41d);
        ok
    })?;
    ensure(code == 0, || format!("child saw other data (exit {code})"))?;
    let gpu = s.gpu_sums(m.addr(), m.len)?;
    check_sums("after the child's writes", &gpu, m.bytes())?;
    let _ = m.bytes_mut();
    Ok(None)
}

/// IGT mmap-file, kfdtest file-backed range, hmm-tests file read/write: a shared file
/// mapping written by the GPU reaches the file.
fn mmap_file(devs: &[Device]) -> CResult {
    use std::io::{Read, Seek, Write};
    let mut s = Svm::new(&devs[0])?;
    let path = "/tmp/svmgpu-svm-file";
    let mut f = ctx(
        "create",
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path),
    )?;
    let len = 512 * 1024;
    let mut init = vec![0u8; len];
    fill_cpu(&mut init, 0xf11e);
    ctx("write", f.write_all(&init))?;
    use std::os::fd::AsRawFd;
    let m = Mem::map(
        len,
        4096,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
        f.as_raw_fd(),
    )?;
    let gpu = s.gpu_sums(m.addr(), len)?;
    check_sums("file read", &gpu, &init)?;
    s.gpu_fill(m.addr() + 4096, 64 * 1024, 0xf11e_0f11)?;
    // SAFETY: Our mapping.
    sys("msync", unsafe {
        libc::msync(m.ptr.cast(), len, libc::MS_SYNC)
    })?;
    let mut back = vec![0u8; len];
    ctx("seek", f.seek(std::io::SeekFrom::Start(0)))?;
    ctx("read", f.read_exact(&mut back))?;
    ensure(
        all_words(&back[4096..4096 + 64 * 1024], 0xf11e_0f11),
        || "GPU writes not in the file".into(),
    )?;
    ensure(back[..4096] == init[..4096], || {
        "bytes before the fill changed".into()
    })?;
    check_sums("file", &s.gpu_sums(m.addr(), len)?, &back)?;
    drop(m);
    let _ = std::fs::remove_file(path);
    Ok(None)
}

/// IGT mmap-remap: after mremap the GPU sees the data at the new address; the old one
/// faults.
fn mremap_moves(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    let len = 256 * 1024;
    let dst = Mem::anon(len)?;
    let mut src = Mem::anon(len)?;
    fill_cpu(src.bytes_mut(), 0x3e3a);
    let want = cpu_sums(src.bytes());
    ensure(s.gpu_sums(src.addr(), len)? == want, || {
        "before mremap".into()
    })?;
    // SAFETY: Move `src`'s pages over `dst`'s reservation (both ours).
    let p = unsafe {
        libc::mremap(
            src.ptr.cast(),
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dst.ptr.cast::<libc::c_void>(),
        )
    };
    ensure(std::ptr::eq(p.cast::<u8>(), dst.ptr), || {
        "mremap failed".into()
    })?;
    ensure(s.gpu_sums(dst.addr(), len)? == want, || {
        "GPU checksum at the new address".into()
    })?;
    let o = s.run(&[Insn::Store {
        size64: false,
        va: src.addr() + 64,
        value: 1,
    }])?;
    ensure(o.error == EFAULT, || {
        format!("old address: want -EFAULT, got {o:?}")
    })?;
    // `src`'s reservation is unmapped by its drop; the moved pages belong to `dst`.
    Ok(None)
}

/// IGT free, kfdtest invalid range: after munmap a GPU access is -EFAULT, and the range is
/// garbage collected.
fn munmap_then_access(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    let m = Mem::anon(128 * 1024)?;
    s.gpu_fill(m.addr(), m.len, 7)?;
    ensure(all_words(m.bytes(), 7), || "fill".into())?;
    let c0 = ctx("query", devs[0].query(false))?.svm_ranges_collected;
    let a = m.addr();
    drop(m);
    let o = s.run(&[Insn::Store {
        size64: false,
        va: a + 4096,
        value: 1,
    }])?;
    ensure(o.error == EFAULT, || format!("want -EFAULT, got {o:?}"))?;
    s.renew_queue()?;
    // The collector is a worker: give it a moment.
    let t0 = now_ns();
    let mut c1 = c0;
    while c1 == c0 && now_ns() - t0 < 2_000_000_000 {
        sleep_ms(5);
        c1 = ctx("query", devs[0].query(false))?.svm_ranges_collected;
    }
    ensure(c1 > c0, || {
        "no range was garbage collected after munmap".into()
    })?;
    // The queue works again for mapped memory.
    let m2 = Mem::anon(4096)?;
    s.gpu_fill(m2.addr(), 4096, 9)?;
    ensure(all_words(m2.bytes(), 9), || "after renew".into())?;
    Ok(None)
}

/// The module-wide SVM figures of debugfs `svmgpu/svm_ranges`, by name.
fn svm_figure(name: &str) -> Result<u64, String> {
    let path = "/sys/kernel/debug/svmgpu/svm_ranges";
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.trim().parse().ok())
        .ok_or_else(|| format!("{path} has no {name}: {text:?}"))
}

/// drm_gpusvm removes a notifier with its last range: a buffer alone in its 512 MiB
/// notifier interval gets a notifier on its first GPU access, and loses it once munmap's
/// garbage collection removed its ranges, while the VM lives on (not only at teardown).
/// Catches a driver that keeps notifiers until the VM goes (every interval a process
/// ever touched stays in the mm's interval tree, and every invalidation there runs it).
fn notifier_removed(devs: &[Device]) -> CResult {
    const INTERVAL: usize = 512 * MIB;
    let mut s = Svm::new(&devs[0])?;
    // A whole notifier interval of our own (only 2 MiB of it is touched).
    let m = Mem::map(
        INTERVAL,
        INTERVAL,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        -1,
    )?;
    // A first job: the notifiers of the memory every job uses (its batch) exist.
    let warm = Mem::anon(4096)?;
    s.gpu_fill(warm.addr(), warm.len, 4)?;
    let n0 = svm_figure("notifiers")?;
    s.gpu_fill(m.addr(), 2 * MIB, 5)?;
    ensure(all_words(&m.bytes()[..2 * MIB], 5), || "fill".into())?;
    let n1 = svm_figure("notifiers")?;
    ensure(n1 == n0 + 1, || {
        format!("notifiers {n0} before the first access to a new interval, {n1} after")
    })?;
    let p0 = svm_figure("notifiers_pruned")?;
    drop(m);
    let t0 = now_ns();
    let mut n2 = svm_figure("notifiers")?;
    while n2 >= n1 && now_ns() - t0 < 2_000_000_000 {
        sleep_ms(5);
        n2 = svm_figure("notifiers")?;
    }
    let p1 = svm_figure("notifiers_pruned")?;
    ensure(n2 == n0 && p1 == p0 + 1, || {
        format!(
            "after munmap of its only range: notifiers {n1} -> {n2} (want {n0}), \
             notifiers_pruned {p0} -> {p1}"
        )
    })?;
    // The VM still serves new faults (in a new notifier).
    let m2 = Mem::anon(64 * 1024)?;
    s.gpu_fill(m2.addr(), m2.len, 6)?;
    ensure(all_words(m2.bytes(), 6), || "fill after the prune".into())?;
    Ok(None)
}

/// IGT fork-read, hmm-tests child after fork: a child opens the device, creates its own
/// fault-mode VM (its own mm) and GPU-checksums memory the parent filled by GPU.
fn fork_child_reads(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    let m = Mem::anon(192 * 1024)?;
    s.gpu_fill(m.addr(), m.len, 0xf0f0_1234)?;
    let want = cpu_sums(m.bytes());
    let (addr, len) = (m.addr(), m.len);
    let path = devs[0].path().to_path_buf();
    let code = in_child(|| {
        let Ok(d) = Device::open(&path) else {
            return false;
        };
        let Ok(mut c) = Svm::new(&d) else {
            return false;
        };
        c.gpu_sums(addr, len).is_ok_and(|g| g == want)
    })?;
    ensure(code == 0, || {
        format!("child GPU checksum differs (exit {code})")
    })?;
    // The parent's mirror is still coherent after the fork (COW write-protected it).
    s.gpu_fill(m.addr(), m.len, 0x0f0f_4321)?;
    ensure(all_words(m.bytes(), 0x0f0f_4321), || {
        "parent after fork".into()
    })?;
    Ok(None)
}

/// kfdtest evict range with fork COW: after fork, GPU writes of the parent land in the
/// parent's (COW-broken) pages, never in the child's.
fn fork_cow(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    let mut m = Mem::anon(128 * 1024)?;
    fill_cpu(m.bytes_mut(), 0xc0c0);
    ensure(s.gpu_sums(m.addr(), m.len)? == cpu_sums(m.bytes()), || {
        "before fork".into()
    })?;
    let before = fnv1a64(m.bytes());
    let mut fds = [0; 2];
    // SAFETY: Two descriptors.
    sys("pipe", unsafe { libc::pipe(fds.as_mut_ptr()) })?;
    let (mp, len) = (m.ptr as usize, m.len);
    // SAFETY: Single-threaded here; the child exits with `_exit`.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let mut b = [0u8; 1];
        // SAFETY: Wait for the parent's signal, then check our copy is untouched.
        unsafe {
            libc::read(fds[0], b.as_mut_ptr().cast(), 1);
            let mine = std::slice::from_raw_parts(mp as *const u8, len);
            libc::_exit(if fnv1a64(mine) == before { 0 } else { 1 });
        }
    }
    ensure(pid > 0, || "fork".into())?;
    let r = s.gpu_fill(m.addr(), m.len, 0xdead_beef);
    let mut st = 0;
    // SAFETY: Tell the child, reap it: our own pipe and child.
    unsafe {
        libc::write(fds[1], b"g".as_ptr().cast(), 1);
        libc::waitpid(pid, &mut st, 0);
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    r?;
    ensure(all_words(m.bytes(), 0xdead_beef), || {
        "parent does not see its GPU write".into()
    })?;
    ensure(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0, || {
        "the child's COW copy changed".into()
    })?;
    check_sums("after COW", &s.gpu_sums(m.addr(), m.len)?, m.bytes())?;
    Ok(None)
}

/// IGT mlock: locked memory is mirrored (not pinned by the driver) like any other.
fn mlock_buffer(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    let m = Mem::anon(256 * 1024)?;
    // SAFETY: Our mapping.
    sys("mlock", unsafe { libc::mlock(m.ptr.cast(), m.len) })?;
    s.gpu_fill(m.addr(), m.len, 0x10c4_10c4)?;
    ensure(all_words(m.bytes(), 0x10c4_10c4), || "fill".into())?;
    check_sums("mlock", &s.gpu_sums(m.addr(), m.len)?, m.bytes())?;
    // SAFETY: As above.
    unsafe { libc::munlock(m.ptr.cast(), m.len) };
    Ok(None)
}

/// IGT partial munmap front/middle, kfdtest split range / partial unmap: unmapping parts
/// of a mirrored 2 MiB range faults there, the rest stays usable (new, smaller ranges).
fn partial_munmap(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    let m = Mem::map(
        4 * MIB,
        2 * MIB,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
    )?;
    s.gpu_fill(m.addr(), m.len, 0x11)?;
    let c0 = ctx("query", devs[0].query(false))?.svm_ranges_collected;
    let a = m.addr() as usize;
    // Front of the first range, middle of the second.
    let holes = [(a, 64 * 1024), (a + 3 * MIB, 128 * 1024)];
    for &(h, l) in &holes {
        // SAFETY: Inside our mapping.
        sys("munmap", unsafe { libc::munmap(h as *mut _, l) })?;
    }
    for &(h, l) in &holes {
        let o = s.run(&[Insn::Store {
            size64: false,
            va: (h + l / 2) as u64,
            value: 1,
        }])?;
        ensure(o.error == EFAULT, || {
            format!("hole {h:#x}: want -EFAULT, got {o:?}")
        })?;
        s.renew_queue()?;
    }
    // The rest: GPU fill and checksum, CPU verify.
    let parts = [
        (a + 64 * 1024, 3 * MIB - 64 * 1024),
        (a + 3 * MIB + 128 * 1024, MIB - 128 * 1024),
    ];
    for (i, &(p, l)) in parts.iter().enumerate() {
        s.gpu_fill(p as u64, l, 0x2200 + i as u32)?;
        // SAFETY: Still mapped.
        let b = unsafe { std::slice::from_raw_parts(p as *const u8, l) };
        ensure(all_words(b, 0x2200 + i as u32), || format!("part {i}"))?;
        check_sums("part", &s.gpu_sums(p as u64, l)?, b)?;
    }
    let t0 = now_ns();
    let mut c1 = c0;
    while c1 < c0 + 2 && now_ns() - t0 < 2_000_000_000 {
        sleep_ms(5);
        c1 = ctx("query", devs[0].query(false))?.svm_ranges_collected;
    }
    ensure(c1 >= c0 + 2, || {
        format!(
            "{} ranges collected, want the 2 partly unmapped ones",
            c1 - c0
        )
    })?;
    Ok(None)
}

/// IGT race, hmm-tests: CPU and GPU work on one buffer at once: the CPU keeps writing its
/// half and now and then drops it (DONTNEED) or write-protects it (mprotect), while the GPU
/// keeps filling its half and reading the whole; in the end the data is right.
fn cpu_gpu_race(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    let m = Mem::map(
        512 * 1024,
        64 * 1024,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
    )?;
    let half = m.len / 2;
    let stop = AtomicBool::new(false);
    let base = m.addr();
    let res_va = s.batch.addr() + 40 * 1024;
    let r = std::thread::scope(|sc| {
        let t = sc.spawn(|| -> TResult {
            let mut i = 0u64;
            let p = (base + half as u64) as *mut u8;
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: The CPU's half of our mapping (writable outside the mprotect).
                unsafe {
                    for w in 0..half / 4096 {
                        std::ptr::write_volatile(p.add(w * 4096).cast::<u64>(), i);
                    }
                }
                match i % 8 {
                    3 => dontneed(base + half as u64, half)?,
                    7 => {
                        // SAFETY: Our mapping; protection changes force invalidations.
                        unsafe {
                            libc::mprotect(p.cast(), half, libc::PROT_READ);
                            libc::mprotect(p.cast(), half, libc::PROT_READ | libc::PROT_WRITE);
                        }
                    }
                    _ => {}
                }
                // No pacing: the GPU must make progress against a CPU that never rests
                // (restartable bulk instructions, spec 6.13.3).
                i += 1;
            }
            Ok(())
        });
        let mut res = Ok(());
        for round in 0..20u32 {
            // 64 KiB per instruction: each needs all its pages at once.
            let mut insns = Vec::new();
            for off in (0..m.len).step_by(64 * 1024) {
                if off < half {
                    insns.push(Insn::Fill {
                        va: base + off as u64,
                        len: 64 * 1024,
                        pattern: round,
                    });
                }
                insns.push(Insn::Checksum {
                    src: base + off as u64,
                    len: 64 * 1024,
                    dst: res_va + (off / 8192) as u64,
                });
            }
            if let Err(e) = s.run_ok(&insns) {
                res = Err(e);
                break;
            }
            // The GPU's half is stable: its checksums are exact.
            for off in (0..half).step_by(64 * 1024) {
                let got = s.batch.read_u64(40 * 1024 + off / 8192);
                let want = fnv1a64(&m.bytes()[off..off + 64 * 1024]);
                if got != want {
                    res = Err(format!("round {round}: GPU checksum at +{off:#x} differs"));
                }
            }
            if res.is_err() {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let t = t.join().unwrap_or(Err("CPU thread panicked".into()));
        res.and(t)
    });
    r?;
    s.gpu_fill(base, m.len, 0x4ace)?;
    ensure(all_words(m.bytes(), 0x4ace), || "final fill".into())?;
    check_sums("race", &s.gpu_sums(base, m.len)?, m.bytes())?;
    Ok(None)
}

/// IGT many threads, kfdtest multithreaded: 8 threads, each with its own VM and queue on
/// the devices in turn and its own buffer, all faulting at once.
fn many_threads(devs: &[Device]) -> CResult {
    let errors: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8usize)
            .map(|t| {
                let d = &devs[t % devs.len()];
                sc.spawn(move || -> TResult {
                    let mut s = Svm::new(d)?;
                    let mut m = Mem::anon(128 * 1024 + t * 4096)?;
                    for round in 0..4u32 {
                        let pat = (t as u32) << 16 | round;
                        s.gpu_fill(m.addr(), m.len, pat)?;
                        ensure(all_words(m.bytes(), pat), || {
                            format!("thread {t} round {round}")
                        })?;
                        fill_cpu(m.bytes_mut(), u64::from(pat));
                        check_sums("thread", &s.gpu_sums(m.addr(), m.len)?, m.bytes())?;
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter()
            .filter_map(|h| h.join().unwrap_or(Err("panicked".into())).err())
            .collect()
    });
    ensure(errors.is_empty(), || errors.join("; "))?;
    Ok(None)
}

/// IGT stride: GPU stores to every other page of a buffer; the CPU sees exactly those.
fn stride(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    let m = Mem::anon(64 * 4096)?;
    let mut insns = Vec::new();
    for p in (0..64).step_by(2) {
        insns.push(Insn::Store {
            size64: false,
            va: m.addr() + p * 4096 + 4 * p,
            value: 0x5700 + p,
        });
    }
    s.run_ok(&insns)?;
    for p in 0..64usize {
        let got = m.read_u32(p * 4096 + 4 * p);
        let want = if p % 2 == 0 { 0x5700 + p as u32 } else { 0 };
        ensure(got == want, || {
            format!("page {p}: {got:#x}, want {want:#x}")
        })?;
    }
    check_sums("stride", &s.gpu_sums(m.addr(), m.len)?, m.bytes())?;
    Ok(None)
}

/// IGT invalid fault address, kfdtest invalid range: an address the process does not map
/// cancels the job with -EFAULT; the VM keeps working on a new queue.
fn invalid_address(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    for va in [0x1000u64, 0x7fff_0000_0000, 1 << 46] {
        let o = s.run(&[Insn::Store {
            size64: false,
            va,
            value: 1,
        }])?;
        ensure(o.error == EFAULT, || {
            format!("{va:#x}: want -EFAULT, got {o:?}")
        })?;
        s.renew_queue()?;
    }
    let m = Mem::anon(4096)?;
    s.gpu_fill(m.addr(), 4096, 3)?;
    ensure(all_words(m.bytes(), 3), || {
        "after the invalid accesses".into()
    })?;
    Ok(None)
}

/// kfdtest read-only range → GPU write fault reported, hmm-tests read-only protection: the
/// GPU reads PROT_READ memory, its write fails with -EACCES and changes nothing.
fn readonly_mapping(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    let mut m = Mem::anon(64 * 1024)?;
    fill_cpu(m.bytes_mut(), 0x40);
    // SAFETY: Our mapping.
    sys("mprotect", unsafe {
        libc::mprotect(m.ptr.cast(), m.len, libc::PROT_READ)
    })?;
    check_sums("read-only read", &s.gpu_sums(m.addr(), m.len)?, m.bytes())?;
    let before = fnv1a64(m.bytes());
    let f0 = ctx("query", devs[0].query(false))?.gpu_faults_failed;
    let o = s.run(&[Insn::Store {
        size64: false,
        va: m.addr() + 128,
        value: 1,
    }])?;
    ensure(o.error == EACCES, || {
        format!("write: want -EACCES, got {o:?}")
    })?;
    s.renew_queue()?;
    let o = s.run(&[Insn::AtomicAdd {
        size64: false,
        va: m.addr() + 256,
        value: 1,
    }])?;
    ensure(o.error == EACCES, || {
        format!("atomic: want -EACCES, got {o:?}")
    })?;
    s.renew_queue()?;
    let f1 = ctx("query", devs[0].query(false))?.gpu_faults_failed;
    ensure(f1 >= f0 + 2, || "the write faults were not reported".into())?;
    ensure(fnv1a64(m.bytes()) == before, || {
        "read-only memory changed".into()
    })?;
    // Writable again: the GPU may write.
    // SAFETY: Our mapping.
    sys("mprotect", unsafe {
        libc::mprotect(m.ptr.cast(), m.len, libc::PROT_READ | libc::PROT_WRITE)
    })?;
    s.gpu_fill(m.addr(), m.len, 0x77)?;
    ensure(all_words(m.bytes(), 0x77), || "after PROT_WRITE".into())?;
    Ok(None)
}

/// hmm-tests multiple reads: CPU updates between GPU reads are always seen.
fn multiple_reads(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    let mut m = Mem::anon(96 * 1024)?;
    for round in 0..6u64 {
        if round % 2 == 1 {
            // Fresh pages: the old ones are dropped (invalidation).
            dontneed(m.addr(), m.len)?;
        }
        fill_cpu(m.bytes_mut(), 0x1000 + round);
        check_sums("read", &s.gpu_sums(m.addr(), m.len)?, m.bytes())?;
    }
    Ok(None)
}

/// kfdtest multithreaded migration-style churn: threads drop the pages (DONTNEED) of one
/// buffer over and over while the GPU writes and reads it.
fn churn_dontneed(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    let m = Mem::anon(256 * 1024)?;
    let stop = AtomicBool::new(false);
    let base = m.addr();
    let len = m.len;
    let r: TResult = std::thread::scope(|sc| {
        let ts: Vec<_> = (0..2u64)
            .map(|t| {
                let stop = &stop;
                sc.spawn(move || -> TResult {
                    let part = len / 2;
                    // No pacing: the pages go away again as fast as the CPU can drop them.
                    while !stop.load(Ordering::Relaxed) {
                        dontneed(base + t * part as u64, part)?;
                    }
                    Ok(())
                })
            })
            .collect();
        let mut res = Ok(());
        for round in 0..16u32 {
            let mut insns = Vec::new();
            for off in (0..len).step_by(16 * 1024) {
                insns.push(Insn::Fill {
                    va: base + off as u64,
                    len: 16 * 1024,
                    pattern: round,
                });
                insns.push(Insn::Checksum {
                    src: base + off as u64,
                    len: 16 * 1024,
                    dst: base + off as u64,
                });
            }
            let r = s.run_ok(&insns);
            if let Err(e) = r {
                res = Err(e);
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        for t in ts {
            let r = t.join().unwrap_or(Err("panicked".into()));
            res = res.and(r);
        }
        res
    });
    r?;
    s.gpu_fill(base, len, 0xcc)?;
    ensure(all_words(m.bytes(), 0xcc), || "after churn".into())?;
    check_sums("churn", &s.gpu_sums(base, len)?, m.bytes())?;
    Ok(None)
}

/// Forward progress under CPU churn (issue 12): a CPU thread toggles `mprotect` on a 1 MiB
/// buffer with no pause at all while every GPU at once runs jobs that checksum 256 KiB of
/// it, and then all of it, in one instruction each (each toggle invalidates the range on
/// every device that mirrors it). Every job must finish with the right checksum: a bulk
/// instruction continues from the page that faulted (spec 6.13.3) instead of needing all
/// its pages (64, then 256: 4 and 16 SVM ranges) mapped at once, which the churn never
/// allows for long. The churn must really have happened while the jobs ran (toggles and GPU
/// faults counted), or the case proves nothing.
fn unpaced_mprotect_churn(devs: &[Device]) -> CResult {
    const LEN: usize = MIB;
    /// Bytes checksummed by each job, in order.
    const JOBS: [usize; 4] = [256 * 1024, 256 * 1024, 256 * 1024, MIB];
    let mut m = Mem::map(
        LEN,
        LEN,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
    )?;
    fill_cpu(m.bytes_mut(), 0xc4u64);
    let bytes = m.bytes();
    let base = m.addr();
    let faults0: u64 = devs
        .iter()
        .map(|d| faults(d).map(|f| f.0))
        .sum::<Result<u64, String>>()?;
    let stop = AtomicBool::new(false);
    let toggles = std::sync::atomic::AtomicU64::new(0);
    let r: TResult = std::thread::scope(|sc| {
        let churn = sc.spawn(|| -> TResult {
            let p = base as *mut libc::c_void;
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: Our mapping; only its protection changes (the data stays).
                sys("mprotect", unsafe {
                    libc::mprotect(p, LEN, libc::PROT_READ)
                })?;
                // SAFETY: As above.
                sys("mprotect", unsafe {
                    libc::mprotect(p, LEN, libc::PROT_READ | libc::PROT_WRITE)
                })?;
                toggles.fetch_add(2, Ordering::Relaxed);
            }
            Ok(())
        });
        let gpus: Vec<_> = devs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                sc.spawn(move || -> TResult {
                    let mut s = Svm::new(d)?;
                    let res = s.batch.addr() + 32 * 1024;
                    for (job, &len) in JOBS.iter().enumerate() {
                        s.run_ok(&[Insn::Checksum {
                            src: base,
                            len: len as u64,
                            dst: res,
                        }])
                        .map_err(|e| format!("gpu {i} job {job} ({len} bytes): {e}"))?;
                        let got = s.batch.read_u64(32 * 1024);
                        let want = fnv1a64(&bytes[..len]);
                        ensure(got == want, || {
                            format!("gpu {i} job {job}: checksum {got:#x}, want {want:#x}")
                        })?;
                    }
                    Ok(())
                })
            })
            .collect();
        let mut res = Ok(());
        for g in gpus {
            res = res.and(g.join().unwrap_or(Err("GPU thread panicked".into())));
        }
        stop.store(true, Ordering::Relaxed);
        res.and(churn.join().unwrap_or(Err("CPU thread panicked".into())))
    });
    r?;
    let faults1: u64 = devs
        .iter()
        .map(|d| faults(d).map(|f| f.0))
        .sum::<Result<u64, String>>()?;
    let toggles = toggles.load(Ordering::Relaxed);
    // Each job faults at least once (its first access to memory the churn keeps
    // invalidating), and the CPU toggled many times while they ran.
    let jobs = (JOBS.len() * devs.len()) as u64;
    ensure(faults1 - faults0 >= jobs && toggles >= 2 * jobs, || {
        format!(
            "no churn to speak of: {toggles} toggles, {} GPU faults for {jobs} jobs",
            faults1 - faults0
        )
    })?;
    Ok(None)
}

/// hmm-tests mixed map: one fault-mode VM uses a binding (at a GPU VA unrelated to its
/// CPU address) and SVM memory in the same job.
fn mixed_bind_svm(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    let mut bound = Mem::anon(64 * 1024)?;
    fill_cpu(bound.bytes_mut(), 0xb1d);
    let gva = 0x100_0000u64;
    ctx(
        "bind",
        devs[0].bind_userptr(s.vm, gva, bound.len as u64, bound.addr(), false),
    )?;
    let svm_mem = Mem::anon(64 * 1024)?;
    s.run_ok(&[Insn::Copy {
        dst: svm_mem.addr(),
        src: gva,
        len: 64 * 1024,
    }])?;
    ensure(svm_mem.bytes() == bound.bytes(), || {
        "copy bound -> SVM".into()
    })?;
    check_sums("via binding", &s.gpu_sums(gva, bound.len)?, bound.bytes())?;
    check_sums(
        "via SVM",
        &s.gpu_sums(svm_mem.addr(), svm_mem.len)?,
        svm_mem.bytes(),
    )?;
    ctx("unbind", devs[0].unbind(s.vm, gva, bound.len as u64))?;
    Ok(None)
}

/// Prefetch (VM_PREFETCH): populated memory is used without GPU faults; bad input is
/// rejected with the documented errors.
fn prefetch(devs: &[Device]) -> CResult {
    let mut s = Svm::new(&devs[0])?;
    let m = Mem::anon(512 * 1024)?;
    // The batch buffer and the data, ahead of use.
    ctx(
        "prefetch batch",
        devs[0].vm_prefetch(s.vm, s.batch.addr(), s.batch.len() as u64, false),
    )?;
    ctx(
        "prefetch data",
        devs[0].vm_prefetch(s.vm, m.addr(), m.len as u64, true),
    )?;
    let (f0, _) = faults(&devs[0])?;
    s.run_ok(&[Insn::Fill {
        va: m.addr(),
        len: m.len as u64,
        pattern: 0x9e,
    }])?;
    let (f1, _) = faults(&devs[0])?;
    ensure(f1 == f0, || {
        format!("{} GPU faults after prefetch", f1 - f0)
    })?;
    ensure(all_words(m.bytes(), 0x9e), || "fill".into())?;
    check_sums("prefetch", &s.gpu_sums(m.addr(), m.len)?, m.bytes())?;
    // Errors.
    let e = |r: std::io::Result<()>| errno(r);
    ensure(
        e(devs[0].vm_prefetch(s.vm, 0x1000, 4096, false)) == Some(libc::EFAULT),
        || "unmapped: want EFAULT".into(),
    )?;
    ensure(
        e(devs[0].vm_prefetch(s.vm, m.addr() + 1, 4096, false)) == Some(libc::EINVAL),
        || "misaligned: want EINVAL".into(),
    )?;
    ensure(
        e(devs[0].vm_prefetch(s.vm, m.addr(), 0, false)) == Some(libc::EINVAL),
        || "size 0: want EINVAL".into(),
    )?;
    ensure(
        e(devs[0].vm_prefetch(0xdead, m.addr(), 4096, false)) == Some(libc::ENOENT),
        || "no VM: want ENOENT".into(),
    )?;
    let mut a = svmgpu::uapi::VmPrefetch {
        vm_id: s.vm,
        flags: 0x80,
        start: m.addr(),
        size: 4096,
    };
    ensure(
        errno(devs[0].vm_prefetch_raw(&mut a)) == Some(libc::EINVAL),
        || "bad flag: want EINVAL".into(),
    )?;
    let ro = Mem::map(
        4096,
        4096,
        libc::PROT_READ,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
    )?;
    ensure(
        e(devs[0].vm_prefetch(s.vm, ro.addr(), 4096, true)) == Some(libc::EFAULT),
        || "read-only with F_WRITE: want EFAULT".into(),
    )?;
    ctx(
        "read-only prefetch",
        devs[0].vm_prefetch(s.vm, ro.addr(), 4096, false),
    )?;
    let nf = ctx("VM_CREATE", devs[0].vm_create(false))?;
    let r = e(devs[0].vm_prefetch(nf, m.addr(), 4096, false));
    let _ = devs[0].vm_destroy(nf);
    ensure(r == Some(libc::EINVAL), || {
        "not fault mode: want EINVAL".into()
    })?;
    Ok(None)
}

/// hmm-tests teardown: VMs destroyed (and a child process exiting) with ranges still
/// mirrored; the memory is then unmapped; new VMs work.
fn teardown(devs: &[Device]) -> CResult {
    for round in 0..3u32 {
        let mut s = Svm::new(&devs[0])?;
        let m = Mem::anon(256 * 1024)?;
        s.gpu_fill(m.addr(), m.len, round)?;
        drop(s); // VM destroyed while mirrored
        ensure(all_words(m.bytes(), round), || "data after destroy".into())?;
        drop(m);
    }
    let path = devs[0].path().to_path_buf();
    let code = in_child(|| {
        let Ok(d) = Device::open(&path) else {
            return false;
        };
        let Ok(mut s) = Svm::new(&d) else {
            return false;
        };
        let Ok(m) = Mem::anon(128 * 1024) else {
            return false;
        };
        let ok = s.gpu_fill(m.addr(), m.len, 5).is_ok();
        std::mem::forget(m);
        std::mem::forget(s);
        std::mem::forget(d);
        ok // exits with everything still mapped and open
    })?;
    ensure(code == 0, || format!("child failed (exit {code})"))?;
    let mut s = Svm::new(&devs[0])?;
    let m = Mem::anon(64 * 1024)?;
    s.gpu_fill(m.addr(), m.len, 0x7d)?;
    ensure(all_words(m.bytes(), 0x7d), || "after teardown".into())?;
    Ok(None)
}

/// kfdtest multi-GPU access to one range, hmm-tests two devices on one range: every GPU
/// fills its own slice of one 2 MiB range, then every GPU checksums the whole.
fn multi_gpu_one_range(devs: &[Device]) -> CResult {
    if let Some(why) = need_gpus(devs, 2) {
        return Ok(Some(why));
    }
    let m = Mem::map(
        2 * MIB,
        2 * MIB,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
    )?;
    let mut ss = devs.iter().map(Svm::new).collect::<Result<Vec<_>, _>>()?;
    let n = ss.len();
    let slice = m.len / n / 4096 * 4096;
    for round in 0..3u32 {
        let mut fences = Vec::new();
        for (i, s) in ss.iter_mut().enumerate() {
            let b = batch(&[Insn::Fill {
                va: m.addr() + (i * slice) as u64,
                len: slice.min(CHUNK) as u64,
                pattern: 0x6000_0000 | round << 8 | i as u32,
            }]);
            fences.push(s.submit_at(0, &b)?);
        }
        for (s, f) in ss.iter().zip(fences) {
            let o = s.wait(f)?;
            ensure(o.error == 0, || format!("round {round}: {o:?}"))?;
        }
        for i in 0..n {
            let want = 0x6000_0000 | round << 8 | i as u32;
            let got = m.read_u32(i * slice);
            ensure(got == want, || format!("round {round} gpu {i}: {got:#x}"))?;
        }
        for (i, s) in ss.iter_mut().enumerate() {
            check_sums(
                &format!("gpu {i}"),
                &s.gpu_sums(m.addr(), m.len)?,
                m.bytes(),
            )?;
        }
        // Invalidate on every device at once.
        dontneed(m.addr(), m.len)?;
    }
    Ok(None)
}

/// Multi-GPU coherence: the CPU writes memory mirrored on every GPU (an invalidation on
/// all of them); every GPU then sees the new data, and GPU writes are seen by the others.
fn multi_gpu_invalidate(devs: &[Device]) -> CResult {
    if let Some(why) = need_gpus(devs, 2) {
        return Ok(Some(why));
    }
    let mut m = Mem::anon(256 * 1024)?;
    let mut ss = devs.iter().map(Svm::new).collect::<Result<Vec<_>, _>>()?;
    let inv0: u64 = devs
        .iter()
        .map(|d| d.query(false).map(|q| q.invalidations).unwrap_or(0))
        .sum();
    for round in 0..4u64 {
        fill_cpu(m.bytes_mut(), 0x900 + round);
        for s in ss.iter_mut() {
            check_sums("after CPU write", &s.gpu_sums(m.addr(), m.len)?, m.bytes())?;
        }
        // mprotect: one CPU invalidation of memory mirrored on every device.
        // SAFETY: Our mapping.
        unsafe {
            libc::mprotect(m.ptr.cast(), m.len, libc::PROT_READ);
            libc::mprotect(m.ptr.cast(), m.len, libc::PROT_READ | libc::PROT_WRITE);
        }
        let w = (round as usize) % ss.len();
        ss[w].gpu_fill(m.addr(), m.len, 0xab00 + round as u32)?;
        for s in ss.iter_mut() {
            check_sums("after GPU write", &s.gpu_sums(m.addr(), m.len)?, m.bytes())?;
        }
    }
    let inv1: u64 = devs
        .iter()
        .map(|d| d.query(false).map(|q| q.invalidations).unwrap_or(0))
        .sum();
    ensure(inv1 >= inv0 + 2 * devs.len() as u64, || {
        format!("only {} device invalidations", inv1 - inv0)
    })?;
    Ok(None)
}
