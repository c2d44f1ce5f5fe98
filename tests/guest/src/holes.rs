//! The coherence holes a read of the driver found (issue "Coherence you can prove",
//! section 1): one test each that failed on the driver at f5648d7 and passes since the
//! fix. Each says which mistake it catches.

use crate::{
    coherence::audit_clean,
    ktap::Outcome,
    tests::{Env, K},
    util::*,
};
use svmgpu::{spec::isa::Insn, Device, Mapping};

const MIB: u64 = 1 << 20;

fn outcome(r: TResult) -> Outcome {
    match r {
        Ok(()) => Outcome::Pass,
        Err(e) => Outcome::Fail(e),
    }
}

/// `len` bytes of private anonymous memory at an address aligned to `align`; unmapped
/// on drop.
struct Aligned {
    base: u64,
    base_len: usize,
    addr: u64,
}

impl Aligned {
    fn new(len: usize, align: usize) -> Result<Self, String> {
        let base_len = len + align;
        // SAFETY: A fresh reservation, then a fixed mapping inside it.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                base_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err("mmap".into());
            }
            let a = (base as usize).div_ceil(align) * align;
            let p = libc::mmap(
                a as *mut _,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                libc::munmap(base, base_len);
                return Err("mmap fixed".into());
            }
            // No transparent huge pages: the GPU mapping is made of 4 KiB pages either way,
            // and the CPU side stays simple to reason about.
            libc::madvise(p, len, libc::MADV_NOHUGEPAGE);
            Ok(Aligned {
                base: base as u64,
                base_len,
                addr: p as u64,
            })
        }
    }

    fn read_u32(&self, off: u64) -> u32 {
        // SAFETY: Inside the mapping (callers pass offsets below its length).
        unsafe { std::ptr::read_volatile((self.addr + off) as *const u32) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: The reservation made by `new`.
        unsafe { libc::munmap(self.base as *mut _, self.base_len) };
    }
}

/// A fault-mode VM with a queue, and batches in CPU memory (SVM).
struct FaultVm<'a> {
    dev: &'a Device,
    vm: u32,
    q: u32,
    batch: Mapping,
}

impl<'a> FaultVm<'a> {
    fn new(dev: &'a Device) -> Result<Self, String> {
        let vm = ctx("VM_CREATE(fault mode)", dev.vm_create(true))?;
        let mut s = FaultVm {
            dev,
            vm,
            q: 0,
            batch: ctx("mmap", Mapping::anon(16 * 4096))?,
        };
        s.q = ctx("EXEC_QUEUE_CREATE", dev.exec_queue_create(vm, false))?;
        Ok(s)
    }

    /// Submits `b` at batch slot `slot` (4 KiB each).
    fn submit(&mut self, slot: usize, b: &svmgpu::Batch) -> Result<u64, String> {
        let off = slot * 4096;
        b.write_to(&mut self.batch.as_mut_slice()[off..off + 4096]);
        ctx(
            "EXEC",
            self.dev
                .exec_retry(self.q, self.batch.addr() + off as u64, b.len_bytes() as u32),
        )
    }

    fn run(&mut self, slot: usize, insns: &[Insn]) -> Result<svmgpu::FenceOutcome, String> {
        let f = self.submit(slot, &batch(insns))?;
        ctx("WAIT", self.dev.wait(self.q, f, 30_000_000_000))
    }

    /// `None` while the job of fence `f` runs, else its error.
    fn ended(&self, f: u64) -> Result<Option<i32>, String> {
        match self.dev.wait(self.q, f, 0) {
            Ok(o) => Ok(Some(o.error)),
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(None),
            Err(e) => Err(format!("WAIT: {e}")),
        }
    }
}

impl Drop for FaultVm<'_> {
    fn drop(&mut self) {
        if self.q != 0 {
            let _ = self.dev.exec_queue_destroy(self.q);
        }
        let _ = self.dev.vm_destroy(self.vm);
    }
}

/// Polls until the u32 at `read()` moved twice, or fails.
fn wait_moving(read: impl Fn() -> u32, ended: impl Fn() -> Result<Option<i32>, String>) -> TResult {
    let t0 = now_ns();
    let first = read();
    while read() < first + 2 {
        if let Some(e) = ended()? {
            return Err(format!("the job ended ({e}) before the change"));
        }
        ensure(now_ns() - t0 < 20_000_000_000, || {
            format!("the job does not run (counter {first})")
        })?;
        sleep_ms(1);
    }
    Ok(())
}

/// Hole 1, narrow flush after clearing wide PTEs: a fault-mode VM mirrors a 2 MiB range
/// while a job keeps incrementing a counter in it; VM_BIND of 4 KiB inside the range
/// drops the VM's SVM pages of the whole range (PTEs cleared) — the driver must
/// invalidate the TLB for all of it, not just for the 4 KiB bound. Then `mprotect`
/// makes the buffer read-only: with a stale TLB entry left behind, the notifier finds no
/// pages of the VM, returns at once, and the GPU keeps writing the read-only page.
pub fn svm_bind_inside_mirrored_range(_env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else { return };
    let r = (|| {
        let d = &devs[0];
        let mem = Aligned::new(4 * MIB as usize, 2 * MIB as usize)?;
        let counter = mem.addr + MIB;
        let mut s = FaultVm::new(d)?;
        let f = s.submit(0, &counting_job(counter, 40_000, 100_000, counter + 8, 1))?;
        wait_moving(|| mem.read_u32(MIB), || s.ended(f))?;
        let small = ctx("mmap", Mapping::anon(4096))?;
        ctx(
            "VM_BIND 4 KiB inside the mirrored range",
            d.bind_userptr(s.vm, mem.addr + 512 * 1024, 4096, small.addr(), false),
        )?;
        // SAFETY: Our own mapping.
        let rc = unsafe { libc::mprotect(mem.addr as *mut _, 4 * MIB as usize, libc::PROT_READ) };
        ensure(rc == 0, || "mprotect".into())?;
        let a = mem.read_u32(MIB);
        sleep_ms(100);
        let b = mem.read_u32(MIB);
        ensure(a == b, || {
            format!(
                "the GPU wrote the read-only page after mprotect returned (counter {a} -> {b} in 100 ms): a stale TLB entry outlived the bind"
            )
        })?;
        match s.ended(f)? {
            None => {}
            Some(e) if e == -libc::EACCES || e == -libc::EFAULT => {}
            Some(e) => return Err(format!("job ended with {e}, want running or EACCES")),
        }
        drop(s);
        audit_clean(&devs)
    })();
    k.result(name, &outcome(r));
}

/// Hole 5, SVM next to a binding: a 4 MiB buffer (2 MiB aligned) with a VM_BIND of its
/// first 64 KiB; a GPU access at +1 MiB must fault in through SVM (the SVM chunk is
/// bounded by the binding), now and on every later access — not fail with EFAULT
/// because a 2 MiB chunk would overlap the binding.
pub fn svm_next_to_binding(_env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else { return };
    let r = (|| {
        let d = &devs[0];
        let mem = Aligned::new(4 * MIB as usize, 2 * MIB as usize)?;
        let mut s = FaultVm::new(d)?;
        ctx(
            "VM_BIND of the first 64 KiB",
            d.bind_userptr(s.vm, mem.addr, 64 * 1024, mem.addr, false),
        )?;
        for (slot, off) in [(0, MIB), (1, MIB + 4096), (2, 2 * MIB - 4096), (3, 4096)] {
            let o = s.run(
                slot,
                &[Insn::Store {
                    size64: false,
                    va: mem.addr + off,
                    value: 0x5eed_0000 | off >> 12,
                }],
            )?;
            ensure(o.error == 0, || {
                format!("GPU store at +{off:#x} next to the binding: {o:?}")
            })?;
            let got = mem.read_u32(off);
            ensure(got == (0x5eed_0000 | off >> 12) as u32, || {
                format!("+{off:#x}: the CPU reads {got:#x}")
            })?;
        }
        drop(s);
        audit_clean(&devs)
    })();
    k.result(name, &outcome(r));
}

/// The device's reset count (driver debugfs `recovery`).
fn resets(d: &Device) -> Result<u64, String> {
    let bus = ctx("DEVICE_QUERY", d.query(false))?.bus_index;
    let path = format!("/sys/kernel/debug/svmgpu/virtio{bus}/recovery");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("resets "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no resets line in {path}"))
}

/// Hole 3, exhausting a resource is back-pressure, never a device reset: one VM with 16
/// long-running queues and 16 small userptr bindings in one buffer; `mprotect` of the
/// buffer makes 16 notifiers each stop the VM (a TLB invalidation, and a preemption of
/// every long-running queue): more asynchronous commands than the device takes at once.
/// Another client's job on the same device must complete untouched, and the device must
/// not be reset.
pub fn invalidation_flood_is_back_pressure(_env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else { return };
    let r = (|| {
        let d = &devs[0];
        let other_file = ctx("open", Device::open(d.path()))?;
        let mut other = Setup::new(&other_file, false, false)?;
        other.bind_data(4096)?;
        let before = resets(d)?;
        let flood = Setup::new(d, false, false)?;
        let mut lr = Vec::new();
        for _ in 0..16 {
            lr.push(ctx(
                "EXEC_QUEUE_CREATE(long-running)",
                d.exec_queue_create(flood.vm, true),
            )?);
        }
        let buf = ctx("mmap", Mapping::anon(16 * 4096))?;
        for i in 0..16u64 {
            ctx(
                "bind",
                d.bind_userptr(
                    flood.vm,
                    DATA_VA + i * 4096,
                    4096,
                    buf.addr() + i * 4096,
                    false,
                ),
            )?;
        }
        // The other client's job runs through the flood (≈ 1 s).
        let f = ctx(
            "EXEC",
            other.submit(&counting_job(DATA_VA, 5000, 200_000, DATA_VA + 8, 0xd0e)),
        )?;
        wait_moving(
            || other.data().read_u32(0),
            || match other.dev.wait(other.q, f, 0) {
                Ok(o) => Ok(Some(o.error)),
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(None),
                Err(e) => Err(format!("WAIT: {e}")),
            },
        )?;
        for _ in 0..4 {
            for prot in [libc::PROT_READ, libc::PROT_READ | libc::PROT_WRITE] {
                // SAFETY: Our own mapping.
                let rc = unsafe { libc::mprotect(buf.addr() as *mut _, buf.len(), prot) };
                ensure(rc == 0, || "mprotect".into())?;
            }
        }
        let o = ctx("WAIT", other.wait(f))?;
        ensure(o.error == 0, || {
            format!("the other client's job failed during the flood: {o:?}")
        })?;
        ensure(other.data().read_u32(8) == 0xd0e, || {
            "the other client's job did not finish its work".into()
        })?;
        let after = resets(d)?;
        ensure(after == before, || {
            format!("the flood reset the device ({before} -> {after} resets)")
        })?;
        for q in lr {
            ctx("EXEC_QUEUE_DESTROY", d.exec_queue_destroy(q))?;
        }
        drop(flood);
        drop(other);
        audit_clean(&devs)
    })();
    k.result(name, &outcome(r));
}

/// Reads `n` counters (64 bytes apart) at `addr` without allocating (safe in a child
/// forked from a multi-threaded process).
fn counters_at(addr: u64, out: &mut [u32; 8], n: usize) {
    for (i, o) in out.iter_mut().enumerate().take(n) {
        // SAFETY: The caller names a mapped page.
        *o = unsafe { std::ptr::read_volatile((addr + 64 * i as u64) as *const u32) };
    }
}

/// Forks a child that watches its copy of the counter at `addr` for `ms`; the child
/// exits 1 if it changed. Allocation-free in the child (another thread may hold the
/// allocator's lock at fork time).
fn fork_watch(addr: u64, ms: u64) -> Result<libc::pid_t, String> {
    // SAFETY: The child only reads memory, sleeps and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err("fork failed".into());
    }
    if pid == 0 {
        let (mut a, mut b) = ([0u32; 8], [0u32; 8]);
        counters_at(addr, &mut a, 1);
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: i64::try_from(ms * 1_000_000).unwrap_or(i64::MAX),
        };
        // SAFETY: Sleeps, then leaves without running destructors.
        unsafe {
            libc::nanosleep(&ts, std::ptr::null_mut());
            counters_at(addr, &mut b, 1);
            libc::_exit(i32::from(a[0] != b[0]));
        }
    }
    Ok(pid)
}

fn reap(pid: libc::pid_t) -> i32 {
    let mut st = 0;
    // SAFETY: Our child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st)
    } else {
        -1
    }
}

/// Hole 2, the unbind window: a job keeps writing a userptr buffer while the device is
/// unbound from the driver, and the process forks as soon as the device refuses new work
/// (`DEVICE_QUERY` fails: removal has started). The fork write-protects the buffer (COW),
/// so its notifier must not return before the device stopped writing it: a forked child's
/// copy of the buffer must never change. A driver that fails the waiters before it stops
/// the device lets the fork return while the GPU still writes through its TLB (the test
/// hook `race_delay_us`, 200 ms here, holds removal in that state); one that resets the
/// device first has nothing running by then. Several rounds of unbind/bind.
pub fn unbind_stops_device_before_notifiers_return(env: &Env, name: &str, k: &mut K) {
    let mut diags = Vec::new();
    let r = (|| {
        let mut violations = Vec::new();
        for round in 0..8u64 {
            let devs = ctx("enumerate", Device::enumerate())?;
            let d = devs.last().ok_or("no device")?;
            let bus = ctx("DEVICE_QUERY", d.query(false))?.bus_index;
            let dev_name = format!("virtio{bus}");
            let mut s = Setup::new(d, false, false)?;
            s.bind_data(4 * 4096)?;
            let f = ctx(
                "EXEC",
                s.submit(&counting_job(DATA_VA, 40_000, 100_000, DATA_VA + 8, 1)),
            )?;
            let addr = s.data().addr();
            wait_moving(
                || s.data().read_u32(0),
                || match s.dev.wait(s.q, f, 0) {
                    Ok(o) => Ok(Some(o.error)),
                    Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(None),
                    Err(e) => Err(format!("WAIT: {e}")),
                },
            )?;
            crate::coherence::set_race_delay(d, 200_000)?;
            let unbind_path = format!("{DRIVER_DIR}/unbind");
            let t = std::thread::spawn({
                let dev_name = dev_name.clone();
                move || std::fs::write(unbind_path, dev_name)
            });
            // Removal has started once the device refuses work; fork right then.
            let t0 = now_ns();
            let mut queries = 0u32;
            while d.query(false).is_ok() {
                queries += 1;
                ensure(now_ns() - t0 < 10_000_000_000, || {
                    "the device still answers 10 s after the unbind started".into()
                })?;
            }
            let refused = now_ns();
            let child = fork_watch(addr, 60)?;
            let forked = now_ns();
            ctx(
                "unbind",
                t.join()
                    .map_err(|_| std::io::Error::other("thread"))
                    .and_then(|r| r),
            )?;
            let ms = |a: u64, b: u64| (b as f64 - a as f64) / 1e6;
            diags.push(format!(
                "round {round}: the device refused work after {queries} queries, {:.1} ms; the fork returned {:.1} ms later; the unbind took {:.1} ms",
                ms(t0, refused),
                ms(refused, forked),
                ms(t0, now_ns())
            ));
            if reap(child) != 0 {
                violations.push(format!(
                    "round {round}: a forked child's copy changed after fork returned"
                ));
            }
            drop(s);
            drop(devs);
            ctx(
                "bind",
                std::fs::write(format!("{DRIVER_DIR}/bind"), &dev_name),
            )?;
        }
        ensure(violations.is_empty(), || violations.join("; "))?;
        let devs = ctx("enumerate", Device::enumerate())?;
        ensure(devs.len() == env.gpus as usize, || {
            format!("{} devices after the rounds", devs.len())
        })?;
        audit_clean(&devs)
    })();
    for m in diags {
        k.diag(&m);
    }
    k.result(name, &outcome(r));
}
