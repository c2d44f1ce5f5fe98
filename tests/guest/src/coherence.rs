//! Coherence you can observe: a GPU job keeps writing while the CPU changes the mapping,
//! and once the syscall returns no GPU write may land in the old pages (the invariant of
//! the design brief, checked end to end rather than through the driver's own counters).
//!
//! Every case runs one job per device, each incrementing its own two counter words
//! (`ATOMIC_ADD` in a loop), one in the first and one in the last page of one shared CPU
//! buffer (so that an invalidation one page short is seen too), reached either through a
//! userptr binding (non-fault-mode VM) or through SVM (fault-mode VM, no bind). Once every
//! counter moves, the CPU changes the mapping with one syscall; after it returned, the
//! counters of the *old* pages are read twice, [`observe_ms`] apart, through a path that
//! does not go through the changed mapping, and must be equal:
//!
//! - `mprotect` (read-only): the buffer itself (still readable);
//! - `munmap`: a second mapping of the same memfd pages;
//! - `fork`: the child's copy (COW: the parent's GPU writes must go to the parent's new
//!   pages); the parent's counters must move again (the GPU faulted and went on);
//! - `madvise_dontneed`: the old page, kept alive by a pipe (`vmsplice`) and read from it;
//! - `mremap`: the pages at their new address (the GPU still uses the old one);
//! - `vm_unbind` (userptr only): the buffer itself, after every VM's `VM_BIND` unmap
//!   returned (the GPU no longer has a mapping there).
//!
//! A driver that returns from the notifier before the device stopped, clears PTEs without
//! invalidating, invalidates too narrow a range or skips a device is caught whenever the
//! device's TLB invalidation takes longer than a GPU write interval, so these tests run
//! with large device latencies (scripts/test.sh starts the device with
//! `--tlb-inval-latency-ns 20000000`): an early return is caught every time, not by luck.
//! Each case also requires the job to be still running (or to have died of the change)
//! when the observation ends, so that a frozen counter means something.

use crate::{
    ktap::Outcome,
    tests::{Env, K},
    util::*,
};
use std::ffi::CString;
use svmgpu::{spec::isa::Insn, Batch, Device, Mapping};

/// Size of the watched buffer (4 pages; the counters are in the first and the last).
const BUF_LEN: usize = 4 * 4096;
/// Offset of the second counter of every device (in the last page).
const LAST: usize = BUF_LEN - 4096;
/// Distance between two devices' counters.
const STRIDE: usize = 64;
/// The writing job: `LOOPS` times { ATOMIC_ADD 1; DELAY `DELAY_NS` } (≈ 4 s; it is
/// destroyed as soon as the case has seen what it needs, well before the driver's 10 s
/// job timeout).
const LOOPS: u32 = 40_000;
const DELAY_NS: u32 = 100_000;

/// How long the old pages are watched after the syscall: three device latencies, at
/// least 60 ms.
fn observe_ms(devs: &[Device]) -> u64 {
    let lat = devs
        .iter()
        .filter_map(|d| d.query(false).ok())
        .map(|q| {
            q.config
                .tlb_inval_latency_ns
                .max(q.config.preempt_latency_ns)
        })
        .max()
        .unwrap_or(0);
    (3 * u64::from(lat) / 1_000_000).max(60)
}

/// How a device reaches the watched buffer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Path {
    /// A userptr binding at [`DATA_VA`] of a VM without fault mode.
    Userptr,
    /// The buffer's own CPU address in a fault-mode VM, no binding (SVM).
    Svm,
}

/// One device's writer: a VM, an exec queue and the running job.
struct Writer<'a> {
    dev: &'a Device,
    vm: u32,
    q: u32,
    /// Batch memory: bound at [`BATCH_VA`] (userptr) or used at its CPU address (SVM).
    batch: Mapping,
    fence: u64,
}

impl<'a> Writer<'a> {
    /// Starts the job of device `i` on `buf` (CPU address `cpu`, `len` bytes).
    fn start(dev: &'a Device, i: usize, path: Path, cpu: u64, len: usize) -> Result<Self, String> {
        let fault_mode = path == Path::Svm;
        let vm = ctx("VM_CREATE", dev.vm_create(fault_mode))?;
        let mut w = Writer {
            dev,
            vm,
            q: 0,
            batch: ctx("mmap", Mapping::anon(BATCH_SIZE))?,
            fence: 0,
        };
        w.q = ctx("EXEC_QUEUE_CREATE", dev.exec_queue_create(vm, false))?;
        let (batch_va, data_va) = match path {
            Path::Userptr => {
                ctx(
                    "bind batch",
                    dev.bind_userptr(vm, BATCH_VA, BATCH_SIZE as u64, w.batch.addr(), false),
                )?;
                ctx(
                    "bind buffer",
                    dev.bind_userptr(vm, DATA_VA, len as u64, cpu, false),
                )?;
                (BATCH_VA, DATA_VA)
            }
            Path::Svm => (w.batch.addr(), cpu),
        };
        let first = data_va + (i * STRIDE) as u64;
        let last = first + LAST as u64;
        let mut b = Batch::new();
        b.push(Insn::AtomicAdd {
            size64: false,
            va: first,
            value: 1,
        })
        .push(Insn::AtomicAdd {
            size64: false,
            va: last,
            value: 1,
        })
        .push(Insn::Delay { ns: DELAY_NS });
        let body = i64::try_from(b.len_bytes()).expect("batch length fits i64");
        b.push(Insn::Loop {
            count: LOOPS,
            offset: -body,
        })
        .end();
        b.write_to(&mut w.batch.as_mut_slice()[..4096]);
        w.fence = ctx("EXEC", dev.exec_retry(w.q, batch_va, b.len_bytes() as u32))?;
        Ok(w)
    }

    /// The job's state: `None` while it runs, else its error (0 = completed).
    fn ended(&self) -> Result<Option<i32>, String> {
        match self.dev.wait(self.q, self.fence, 0) {
            Ok(o) => Ok(Some(o.error)),
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(None),
            Err(e) => Err(format!("WAIT: {e}")),
        }
    }
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        // Destroying the queue stops a job still running.
        if self.q != 0 {
            let _ = self.dev.exec_queue_destroy(self.q);
        }
        let _ = self.dev.vm_destroy(self.vm);
    }
}

/// The counters of `n` devices in `pages` (copies of the buffer's first and last page,
/// one after the other): first-page counters, then last-page counters.
fn counters(pages: &[u8], n: usize) -> Vec<u32> {
    let word = |o: usize| u32::from_le_bytes([pages[o], pages[o + 1], pages[o + 2], pages[o + 3]]);
    (0..n)
        .map(|i| word(i * STRIDE))
        .chain((0..n).map(|i| word(4096 + i * STRIDE)))
        .collect()
}

/// Reads the first and the last page of the buffer at `addr` (volatile: the GPU writes
/// them behind the compiler's back).
fn read_page(addr: u64) -> Vec<u8> {
    [addr, addr + LAST as u64]
        .iter()
        .flat_map(|&p| {
            (0..4096).map(move |o| {
                // SAFETY: The caller names a mapped, readable buffer of `BUF_LEN` bytes.
                unsafe { std::ptr::read_volatile((p as *const u8).add(o)) }
            })
        })
        .collect()
}

/// Polls until every device's counter at `addr` moved at least twice (the jobs run).
fn wait_running(addr: u64, writers: &[Writer<'_>]) -> TResult {
    let t0 = now_ns();
    let first = counters(&read_page(addr), writers.len());
    loop {
        let now = counters(&read_page(addr), writers.len());
        if now.iter().zip(&first).all(|(n, f)| *n >= f.wrapping_add(2)) {
            return Ok(());
        }
        for (i, w) in writers.iter().enumerate() {
            if let Some(e) = w.ended()? {
                return Err(format!("writer {i}: job ended ({e}) before the change"));
            }
        }
        if now_ns() - t0 > 20_000_000_000 {
            return Err(format!(
                "the jobs do not run: counters {first:?} -> {now:?}"
            ));
        }
        sleep_ms(1);
    }
}

/// Compares two observations of the old pages' counters.
fn frozen(what: &str, before: &[u32], after: &[u32], ms: u64) -> TResult {
    let n = before.len() / 2;
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        let page = if i < n { "first" } else { "last" };
        ensure(a == b, || {
            format!(
                "writer {} (on device {} mod the vGPU count): the GPU wrote the old {page} page after {what} returned (counter {b} -> {a} within {ms} ms)",
                i % n,
                i % n
            )
        })?;
    }
    Ok(())
}

/// After the observation: every job is still running or died of the change (`allowed`
/// errors); a job that completed means the observation proved nothing.
fn jobs_outlived(writers: &[Writer<'_>], allowed: &[i32]) -> TResult {
    for (i, w) in writers.iter().enumerate() {
        match w.ended()? {
            None => {}
            Some(e) if e != 0 && allowed.contains(&e) => {}
            Some(e) => {
                return Err(format!(
                    "device {i}: job ended with {e} during the observation (want running or one of {allowed:?})"
                ))
            }
        }
    }
    Ok(())
}

/// A memfd of `len` bytes mapped shared twice: (the mapping the GPU uses, an alias).
fn memfd_pair(len: usize) -> Result<(u64, u64), String> {
    let name = CString::new("svmgpu-coherence").unwrap_or_default();
    // SAFETY: Plain syscalls on our own new file and fresh mappings.
    unsafe {
        let fd = libc::memfd_create(name.as_ptr(), 0);
        if fd < 0 {
            return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
        }
        if libc::ftruncate(fd, libc::off_t::try_from(len).unwrap_or(libc::off_t::MAX)) != 0 {
            libc::close(fd);
            return Err(format!("ftruncate: {}", std::io::Error::last_os_error()));
        }
        let map = || {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        let (a, b) = (map(), map());
        libc::close(fd);
        if a == libc::MAP_FAILED || b == libc::MAP_FAILED {
            return Err(format!("mmap memfd: {}", std::io::Error::last_os_error()));
        }
        Ok((a as u64, b as u64))
    }
}

fn munmap(addr: u64, len: usize) {
    // SAFETY: Only called on mappings this module made and no longer uses.
    unsafe { libc::munmap(addr as *mut _, len) };
}

/// Private anonymous memory (page aligned).
fn anon(len: usize) -> Result<u64, String> {
    // SAFETY: A fresh mapping.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    Ok(p as u64)
}

/// The CPU-side changes.
#[derive(Clone, Copy, Debug)]
enum Op {
    Mprotect,
    Munmap,
    Fork,
    Dontneed,
    Mremap,
    Unbind,
}

const OPS: [(&str, Op); 6] = [
    ("mprotect_readonly", Op::Mprotect),
    ("munmap", Op::Munmap),
    ("fork_cow", Op::Fork),
    ("madvise_dontneed", Op::Dontneed),
    ("mremap", Op::Mremap),
    ("vm_unbind", Op::Unbind),
];

/// Runs one case: start a writer per device on a fresh buffer, change it with `op`, and
/// watch the old pages.
fn case(devs: &[Device], path: Path, op: Op, obs: u64) -> TResult {
    case_with(devs, devs.len(), path, op, obs)
}

/// [`case`] with `writers` VMs, one job each, spread over the devices in turn.
fn case_with(devs: &[Device], writers_count: usize, path: Path, op: Op, obs: u64) -> TResult {
    let n = writers_count;
    // The buffer (and, for munmap, an alias of the same pages).
    let (buf, alias) = match op {
        Op::Munmap => {
            let (a, b) = memfd_pair(BUF_LEN)?;
            (a, Some(b))
        }
        _ => (anon(BUF_LEN)?, None),
    };
    // Unmapped at the end unless `op` moved or removed it.
    let mut owned = vec![buf];
    owned.extend(alias);
    let r = (|| {
        let mut writers = Vec::new();
        for i in 0..n {
            let d = &devs[i % devs.len()];
            writers.push(
                Writer::start(d, i, path, buf, BUF_LEN).map_err(|e| format!("writer {i}: {e}"))?,
            );
        }
        wait_running(buf, &writers)?;
        match op {
            Op::Mprotect => {
                // SAFETY: Our own mapping.
                let rc = unsafe { libc::mprotect(buf as *mut _, BUF_LEN, libc::PROT_READ) };
                ensure(rc == 0, || "mprotect".into())?;
                let a = counters(&read_page(buf), n);
                sleep_ms(obs);
                let b = counters(&read_page(buf), n);
                frozen("mprotect(PROT_READ)", &a, &b, obs)?;
                jobs_outlived(&writers, &[-libc::EFAULT, -libc::EACCES])
            }
            Op::Munmap => {
                munmap(buf, BUF_LEN);
                owned.retain(|&a| a != buf);
                let alias = alias.unwrap_or(buf);
                let a = counters(&read_page(alias), n);
                sleep_ms(obs);
                let b = counters(&read_page(alias), n);
                frozen("munmap", &a, &b, obs)?;
                jobs_outlived(&writers, &[-libc::EFAULT])
            }
            Op::Mremap => {
                let dst = anon(BUF_LEN)?;
                // SAFETY: Moves our own mapping over our own reservation `dst`.
                let p = unsafe {
                    libc::mremap(
                        buf as *mut _,
                        BUF_LEN,
                        BUF_LEN,
                        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                        dst as *mut libc::c_void,
                    )
                };
                if p as u64 != dst {
                    munmap(dst, BUF_LEN);
                    return Err(format!("mremap: {}", std::io::Error::last_os_error()));
                }
                owned.retain(|&a| a != buf);
                owned.push(dst);
                let a = counters(&read_page(dst), n);
                sleep_ms(obs);
                let b = counters(&read_page(dst), n);
                frozen("mremap", &a, &b, obs)?;
                jobs_outlived(&writers, &[-libc::EFAULT])
            }
            Op::Fork => {
                let child = in_child_observing(buf, n, obs)?;
                ensure(child.is_empty(), || child.clone())?;
                // The parent's own pages: the GPU faulted, broke COW and goes on.
                wait_running(buf, &writers).map_err(|e| format!("after fork, in the parent: {e}"))
            }
            Op::Unbind => {
                for (i, w) in writers.iter().enumerate() {
                    ctx(
                        &format!("device {i}: VM_BIND unmap"),
                        w.dev.unbind(w.vm, DATA_VA, BUF_LEN as u64),
                    )?;
                }
                let a = counters(&read_page(buf), n);
                sleep_ms(obs);
                let b = counters(&read_page(buf), n);
                frozen("VM_BIND unmap", &a, &b, obs)?;
                jobs_outlived(&writers, &[-libc::EFAULT])
            }
            Op::Dontneed => {
                let pipe = PinnedPage::pin(buf)?;
                // SAFETY: Our own mapping.
                let rc = unsafe { libc::madvise(buf as *mut _, BUF_LEN, libc::MADV_DONTNEED) };
                ensure(rc == 0, || "madvise".into())?;
                let a = counters(&pipe.read()?, n);
                sleep_ms(obs);
                let b = counters(&pipe.read()?, n);
                frozen("madvise(MADV_DONTNEED)", &a, &b, obs)?;
                wait_running(buf, &writers)
                    .map_err(|e| format!("after madvise, in the new pages: {e}"))
            }
        }
    })();
    for a in owned {
        munmap(a, BUF_LEN);
    }
    r
}

/// Forks a child that watches its (COW) copy of the counters for `obs` ms; returns what
/// it saw wrong ("" if nothing).
fn in_child_observing(buf: u64, n: usize, obs: u64) -> Result<String, String> {
    let mut fds = [0i32; 2];
    // SAFETY: A new pipe.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err("pipe".into());
    }
    // SAFETY: The runner is single-threaded here; the child only reads memory, writes to
    // the pipe and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err("fork failed".into());
    }
    if pid == 0 {
        let a = counters(&read_page(buf), n);
        sleep_ms(obs);
        let b = counters(&read_page(buf), n);
        let msg = frozen("fork", &a, &b, obs)
            .err()
            .map(|e| format!("in the child's copy: {e}"))
            .unwrap_or_default();
        // SAFETY: Our pipe; then leave without running the parent's destructors.
        unsafe {
            libc::write(fds[1], msg.as_ptr().cast(), msg.len());
            libc::_exit(0);
        }
    }
    // SAFETY: Our pipe and our child.
    unsafe {
        libc::close(fds[1]);
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            let r = libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len());
            if r <= 0 {
                break;
            }
            out.extend_from_slice(&buf[..r as usize]);
        }
        libc::close(fds[0]);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// The first and the last page of a buffer, referenced twice by a pipe (`vmsplice`): they
/// stay alive (and readable through the pipe) after the process dropped them.
struct PinnedPage {
    fds: [i32; 2],
}

impl PinnedPage {
    fn pin(addr: u64) -> Result<Self, String> {
        let mut fds = [0i32; 2];
        // SAFETY: A new pipe.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err("pipe".into());
        }
        let p = PinnedPage { fds };
        for _ in 0..2 {
            let iov = [
                libc::iovec {
                    iov_base: addr as *mut _,
                    iov_len: 4096,
                },
                libc::iovec {
                    iov_base: (addr + LAST as u64) as *mut _,
                    iov_len: 4096,
                },
            ];
            // SAFETY: `iov` names two mapped pages of ours; the pipe takes a reference to
            // each page (no copy).
            let r = unsafe { libc::vmsplice(p.fds[1], iov.as_ptr(), 2, 0) };
            ensure(r == 8192, || {
                format!("vmsplice: {r} ({})", std::io::Error::last_os_error())
            })?;
        }
        Ok(p)
    }

    /// The pages' contents now, first then last (consumes one of the two references).
    fn read(&self) -> Result<Vec<u8>, String> {
        let mut pages = vec![0u8; 8192];
        let mut got = 0;
        while got < pages.len() {
            // SAFETY: Reads into our buffer.
            let r = unsafe {
                libc::read(
                    self.fds[0],
                    pages[got..].as_mut_ptr().cast(),
                    pages.len() - got,
                )
            };
            ensure(r > 0, || format!("read pipe: {r}"))?;
            got += r as usize;
        }
        Ok(pages)
    }
}

impl Drop for PinnedPage {
    fn drop(&mut self) {
        // SAFETY: Our pipe.
        unsafe {
            libc::close(self.fds[0]);
            libc::close(self.fds[1]);
        }
    }
}

/// Reloads the module with `params`.
fn reload(params: &[&str]) -> TResult {
    run("rmmod", &["svmgpu"])?;
    let mut args = vec![MODULE_PATH];
    args.extend_from_slice(params);
    run("insmod", &args)
}

/// `coherence_after_syscall`: every op, through userptr bindings in each notifier mode and
/// through SVM in each SVM mode, on every device at once.
pub fn after_syscall(env: &Env, name: &str, k: &mut K) {
    let configs: [(Path, &str, &[&str]); 5] = [
        (Path::Userptr, "userptr_single", &["notifier_mode=single"]),
        (Path::Userptr, "userptr_twopass", &["notifier_mode=twopass"]),
        (Path::Svm, "svm_single", &["svm_mode=single"]),
        (Path::Svm, "svm_per_device", &["svm_mode=per_device"]),
        (Path::Svm, "svm_shared", &["svm_mode=shared"]),
    ];
    let mut cases = Vec::new();
    for (path, label, params) in configs {
        if let Err(e) = reload(params) {
            cases.push((format!("{label}_reload"), Outcome::Fail(e)));
            continue;
        }
        let devs = match Device::enumerate() {
            Ok(d) if d.len() == env.gpus as usize && !d.is_empty() => d,
            other => {
                cases.push((
                    format!("{label}_devices"),
                    Outcome::Fail(format!("after reload: {other:?}")),
                ));
                continue;
            }
        };
        let obs = observe_ms(&devs);
        for (op_name, op) in OPS {
            if path == Path::Svm && matches!(op, Op::Unbind) {
                // SVM memory has no binding to remove.
                continue;
            }
            let t0 = now_ns();
            let r = case(&devs, path, op, obs).and_then(|()| audit_clean(&devs));
            k.diag(&format!(
                "{label}/{op_name}: {} ms ({} devices, watched {obs} ms)",
                (now_ns() - t0) / 1_000_000,
                devs.len()
            ));
            cases.push((
                format!("{label}_{op_name}"),
                match r {
                    Ok(()) => Outcome::Pass,
                    Err(e) => Outcome::Fail(e),
                },
            ));
        }
    }
    if let Err(e) = reload(&[]) {
        cases.push(("reload_default".into(), Outcome::Fail(e)));
    }
    k.suite(name, cases);
}

/// Index of the device's `instructions` counter in GET_STATS.
pub const STAT_INSTRUCTIONS: usize = 18;

/// Every device's audit saw accesses and counted no violation (stale accesses, unflushed
/// TLB entries, entries a narrow flush left behind: spec 6.10.4).
pub fn audit_clean(devs: &[Device]) -> TResult {
    for (i, d) in devs.iter().enumerate() {
        let q = ctx("DEVICE_QUERY", d.query(true))?;
        ensure(q.audit_violations() == 0, || {
            format!(
                "device {i}: audit: {} stale accesses, {} unflushed entries, {} narrow-flush entries",
                q.stale_accesses(),
                q.unflushed_entries(),
                q.narrow_flush_entries()
            )
        })?;
        // A device that ran instructions must have audited them (else the audit is off).
        ensure(
            q.audit_checks() > 0 || q.stats[STAT_INSTRUCTIONS] == 0,
            || format!("device {i}: the device ran instructions but the audit checked nothing"),
        )?;
    }
    Ok(())
}

/// `coherence_many_vms`: 40 fault-mode VMs (spread over the devices) mirror one SVM range,
/// each with a job writing it: more VMs than one invalidation tracks in its first pass
/// (16), so the rest are stopped in its second pass — and more than a range's first room
/// for pages objects (8: it grows). After `mprotect` and after `munmap` no GPU write may
/// land in the old pages.
pub fn many_vms(env: &Env, name: &str, k: &mut K) {
    const VMS: usize = 40;
    let r = (|| {
        reload(&["svm_mode=shared"])?;
        let devs = ctx("enumerate", Device::enumerate())?;
        ensure(devs.len() == env.gpus as usize, || {
            format!("{} devices", devs.len())
        })?;
        let obs = observe_ms(&devs);
        for (op_name, op) in [("mprotect_readonly", Op::Mprotect), ("munmap", Op::Munmap)] {
            let t0 = now_ns();
            case_with(&devs, VMS, Path::Svm, op, obs).map_err(|e| format!("{op_name}: {e}"))?;
            k.diag(&format!(
                "{VMS} VMs on {} devices, {op_name}: {} ms",
                devs.len(),
                (now_ns() - t0) / 1_000_000
            ));
        }
        audit_clean(&devs)
    })();
    k.result(
        name,
        &match r {
            Ok(()) => Outcome::Pass,
            Err(e) => Outcome::Fail(e),
        },
    );
}

/// `coherence_many_bindings`: 80 userptr bindings of one page each (one notifier each)
/// over one buffer, one queue per page whose job keeps incrementing a counter in it, and
/// one `mprotect` of the whole buffer: more two-pass invalidations at once than the finish
/// pool holds (64), so some fall back to a single pass, which must wait for the device as
/// well. A job stops at its first access that faults (its page invalidated), so each page
/// has a job of its own: whichever bindings find the pool empty, their jobs show an early
/// return.
pub fn many_bindings(_env: &Env, name: &str, k: &mut K) {
    const PAGES: usize = 80;
    /// Bytes of the batch buffer per job.
    const SLOT: usize = 256;
    let r = (|| {
        reload(&["notifier_mode=twopass"])?;
        let devs = ctx("enumerate", Device::enumerate())?;
        let d = devs.first().ok_or("no device")?;
        let obs = observe_ms(&devs);
        let mut s = Setup::new(d, false, false)?;
        let buf = anon(PAGES * 4096)?;
        let mut queues = Vec::new();
        let r = (|| {
            for p in 0..PAGES as u64 {
                ctx(
                    "bind",
                    d.bind_userptr(s.vm, DATA_VA + p * 4096, 4096, buf + p * 4096, false),
                )?;
            }
            let mut fences = Vec::new();
            for p in 0..PAGES as u64 {
                let q = ctx("EXEC_QUEUE_CREATE", d.exec_queue_create(s.vm, false))?;
                queues.push(q);
                let mut b = Batch::new();
                b.push(Insn::AtomicAdd {
                    size64: false,
                    va: DATA_VA + p * 4096,
                    value: 1,
                });
                b.push(Insn::Delay { ns: DELAY_NS });
                let body = i64::try_from(b.len_bytes()).expect("batch length fits i64");
                b.push(Insn::Loop {
                    count: 20_000,
                    offset: -body,
                })
                .end();
                ensure(b.len_bytes() <= SLOT, || {
                    "a job's batch outgrew its slot".into()
                })?;
                let off = p as usize * SLOT;
                b.write_to(&mut s.batch_buf.as_mut_slice()[off..off + SLOT]);
                let len = b.len_bytes() as u32;
                fences.push(ctx("EXEC", d.exec_retry(q, BATCH_VA + off as u64, len))?);
            }
            let read = || -> Vec<u32> {
                (0..PAGES as u64)
                    .map(|p| {
                        // SAFETY: Inside our mapping.
                        unsafe { std::ptr::read_volatile((buf + p * 4096) as *const u32) }
                    })
                    .collect()
            };
            let t0 = now_ns();
            let first = read();
            while !read().iter().zip(&first).all(|(n, f)| *n >= f + 2) {
                ensure(now_ns() - t0 < 20_000_000_000, || {
                    "the jobs do not run".into()
                })?;
                sleep_ms(1);
            }
            // SAFETY: Our own mapping.
            let rc = unsafe { libc::mprotect(buf as *mut _, PAGES * 4096, libc::PROT_READ) };
            ensure(rc == 0, || "mprotect".into())?;
            let a = read();
            sleep_ms(obs);
            let b2 = read();
            for (p, (x, y)) in a.iter().zip(&b2).enumerate() {
                ensure(x == y, || {
                    format!("page {p}: the GPU wrote it after mprotect returned ({x} -> {y} within {obs} ms)")
                })?;
            }
            for (q, f) in queues.iter().zip(fences) {
                match d.wait(*q, f, 0) {
                    Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
                    Ok(o) if o.error == -libc::EFAULT => {}
                    other => return Err(format!("job state after the observation: {other:?}")),
                }
            }
            Ok(())
        })();
        for q in queues {
            let _ = d.exec_queue_destroy(q);
        }
        drop(s);
        munmap(buf, PAGES * 4096);
        r?;
        audit_clean(&devs)
    })();
    k.result(
        name,
        &match r {
            Ok(()) => Outcome::Pass,
            Err(e) => Outcome::Fail(e),
        },
    );
}

/// Sets the driver's test hook `race_delay_us` of `d` (debugfs).
pub fn set_race_delay(d: &Device, us: u32) -> TResult {
    let bus = ctx("DEVICE_QUERY", d.query(false))?.bus_index;
    let path = format!("/sys/kernel/debug/svmgpu/virtio{bus}/race_delay_us");
    std::fs::write(&path, format!("{us}\n")).map_err(|e| format!("{path}: {e}"))
}

/// `revalidation_races_invalidation`: a CPU invalidation lands between `hmm_range_fault`
/// and the commit of a GPU fault's pages, every time (the driver's test hook
/// `race_delay_us` widens that window to 100 ms). A job keeps storing a magic value into
/// one page; MADV_DONTNEED makes its next store fault; once the fault is being resolved, a
/// second MADV_DONTNEED frees the page `hmm_range_fault` just returned. The commit must
/// see the invalidation (`mmu_interval_read_retry`) and fault again: the magic value then
/// lands in the page the CPU has, not in the freed one. Through a userptr binding and
/// through SVM.
pub fn revalidation_races_invalidation(_env: &Env, name: &str, k: &mut K) {
    const MAGIC: u32 = 0x0dd_f00d;
    const DELAY_US: u32 = 100_000;
    let Some(devs) = devices(k, name) else { return };
    let d = &devs[0];
    let mut cases = Vec::new();
    for path in [Path::Userptr, Path::Svm] {
        let r = (|| {
            let buf = anon(4096)?;
            let r = (|| {
                let fault_mode = path == Path::Svm;
                let vm = ctx("VM_CREATE", d.vm_create(fault_mode))?;
                let mut w = Writer {
                    dev: d,
                    vm,
                    q: 0,
                    batch: ctx("mmap", Mapping::anon(BATCH_SIZE))?,
                    fence: 0,
                };
                w.q = ctx("EXEC_QUEUE_CREATE", d.exec_queue_create(vm, false))?;
                let (batch_va, va) = match path {
                    Path::Userptr => {
                        ctx(
                            "bind batch",
                            d.bind_userptr(vm, BATCH_VA, BATCH_SIZE as u64, w.batch.addr(), false),
                        )?;
                        ctx("bind", d.bind_userptr(vm, DATA_VA, 4096, buf, false))?;
                        (BATCH_VA, DATA_VA)
                    }
                    Path::Svm => (w.batch.addr(), buf),
                };
                let mut b = Batch::new();
                b.push(Insn::Store {
                    size64: false,
                    va,
                    value: u64::from(MAGIC),
                })
                .push(Insn::Delay { ns: 100_000 });
                let body = i64::try_from(b.len_bytes()).expect("batch length fits i64");
                b.push(Insn::Loop {
                    count: 40_000,
                    offset: -body,
                })
                .end();
                b.write_to(&mut w.batch.as_mut_slice()[..4096]);
                w.fence = ctx("EXEC", d.exec_retry(w.q, batch_va, b.len_bytes() as u32))?;
                let read = || {
                    // SAFETY: `buf` is our mapped page.
                    unsafe { std::ptr::read_volatile(buf as *const u32) }
                };
                let t0 = now_ns();
                while read() != MAGIC {
                    ensure(now_ns() - t0 < 20_000_000_000, || {
                        "the job does not run".into()
                    })?;
                    sleep_ms(1);
                }
                set_race_delay(d, DELAY_US)?;
                let dontneed = || {
                    // SAFETY: Our own page.
                    unsafe { libc::madvise(buf as *mut _, 4096, libc::MADV_DONTNEED) }
                };
                let faults = || d.query(false).map(|q| q.gpu_faults).unwrap_or(0);
                let f0 = faults();
                ensure(dontneed() == 0, || "madvise".into())?;
                // The job's next store faults; wait until the driver handles that fault
                // (it then sleeps in the window), then free the page it just got.
                let t1 = now_ns();
                while faults() == f0 {
                    ensure(now_ns() - t1 < 5_000_000_000, || {
                        "no GPU fault after MADV_DONTNEED".into()
                    })?;
                    std::thread::yield_now();
                }
                sleep_ms(20);
                ensure(dontneed() == 0, || "madvise".into())?;
                let t2 = now_ns();
                while read() != MAGIC {
                    if now_ns() - t2 > 3_000_000_000 {
                        return Err(format!(
                            "3 s after the second MADV_DONTNEED the CPU's page reads {:#x}: the GPU's stores went to the page the invalidation freed (a commit that missed mmu_interval_read_retry)",
                            read()
                        ));
                    }
                    sleep_ms(1);
                }
                k.diag(&format!(
                    "{path:?}: the store reached the CPU's page {} ms after the second MADV_DONTNEED",
                    (now_ns() - t2) / 1_000_000
                ));
                Ok(())
            })();
            let _ = set_race_delay(d, 0);
            munmap(buf, 4096);
            r
        })();
        cases.push((
            format!("{path:?}").to_lowercase(),
            match r {
                Ok(()) => Outcome::Pass,
                Err(e) => Outcome::Fail(e),
            },
        ));
    }
    let r = audit_clean(&devs);
    cases.push((
        "audit".into(),
        match r {
            Ok(()) => Outcome::Pass,
            Err(e) => Outcome::Fail(e),
        },
    ));
    k.suite(name, cases);
}
