//! Helpers shared by the guest test cases.

use std::{io, process::Command};
use svmgpu::{spec::isa::Insn, Batch, Device, FenceOutcome, Mapping};

pub const DRIVER_DIR: &str = "/sys/bus/virtio/drivers/svmgpu";
pub const MODULE_PATH: &str = "/lib/modules/svmgpu.ko";

/// GPU VA of the batch buffer of a [`Setup`].
pub const BATCH_VA: u64 = 0x10_0000;
/// Size of the batch buffer.
pub const BATCH_SIZE: usize = 16 * 4096;
/// GPU VA of the data buffer of a [`Setup`].
pub const DATA_VA: u64 = 0x100_0000;

/// A test result: `Err` carries the reason.
pub type TResult = Result<(), String>;

/// `Err(msg)` unless `cond`.
pub fn ensure(cond: bool, msg: impl FnOnce() -> String) -> TResult {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

/// The errno of a failed call, or `None` if it succeeded.
pub fn errno<T>(r: io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// Checks that `r` failed with `want`.
pub fn expect_errno<T: std::fmt::Debug>(what: &str, r: io::Result<T>, want: i32) -> TResult {
    match r {
        Ok(v) => Err(format!("{what}: succeeded ({v:?}), want errno {want}")),
        Err(e) if e.raw_os_error() == Some(want) => Ok(()),
        Err(e) => Err(format!("{what}: {e}, want errno {want}")),
    }
}

/// Adds context to an io error.
pub fn ctx<T>(what: &str, r: io::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Module parameters every `insmod` of the driver gets in addition to its own
/// (`svmgpu-ktap --module-args`, e.g. `svm_impl=gpusvm`: every test that reloads the
/// module keeps the SVM implementation under test).
static MODULE_ARGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Sets the extra module parameters (once, before any test).
pub fn set_module_args(args: Vec<String>) {
    let _ = MODULE_ARGS.set(args);
}

/// The extra module parameters.
pub fn module_args() -> &'static [String] {
    MODULE_ARGS.get().map_or(&[], Vec::as_slice)
}

/// Runs a command; `Err` with its stderr if it fails. `insmod` of the driver also gets
/// the parameters of [`set_module_args`] that the call does not set itself.
pub fn run(cmd: &str, args: &[&str]) -> TResult {
    let mut args: Vec<&str> = args.to_vec();
    if cmd == "insmod" && args.first() == Some(&MODULE_PATH) {
        for extra in module_args() {
            let name = extra.split('=').next().unwrap_or_default();
            if !args.iter().any(|a| a.split('=').next() == Some(name)) {
                args.push(extra);
            }
        }
    }
    let out = Command::new(cmd)
        .args(&args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {args:?}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Devices bound to the driver, per sysfs.
pub fn bound_devices() -> usize {
    std::fs::read_dir(DRIVER_DIR)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("virtio"))
                .count()
        })
        .unwrap_or(0)
}

/// One VM and exec queue on a device, a bound batch buffer at [`BATCH_VA`] and (after
/// [`Setup::bind_data`]) a data buffer at [`DATA_VA`]. Destroyed on drop.
pub struct Setup<'a> {
    pub dev: &'a Device,
    pub vm: u32,
    pub q: u32,
    pub batch_buf: Mapping,
    pub data: Option<Mapping>,
}

impl<'a> Setup<'a> {
    pub fn new(dev: &'a Device, fault_mode: bool, long_running: bool) -> Result<Self, String> {
        let vm = ctx("VM_CREATE", dev.vm_create(fault_mode))?;
        let q = match dev.exec_queue_create(vm, long_running) {
            Ok(q) => q,
            Err(e) => {
                let _ = dev.vm_destroy(vm);
                return Err(format!("EXEC_QUEUE_CREATE: {e}"));
            }
        };
        let s = Setup {
            dev,
            vm,
            q,
            batch_buf: ctx("mmap", Mapping::anon(BATCH_SIZE))?,
            data: None,
        };
        ctx(
            "bind batch",
            dev.bind_userptr(vm, BATCH_VA, BATCH_SIZE as u64, s.batch_buf.addr(), false),
        )?;
        Ok(s)
    }

    /// Maps `len` bytes of anonymous memory and binds it at [`DATA_VA`].
    pub fn bind_data(&mut self, len: usize) -> Result<&Mapping, String> {
        let m = ctx("mmap", Mapping::anon(len))?;
        ctx(
            "bind data",
            self.dev
                .bind_userptr(self.vm, DATA_VA, m.len() as u64, m.addr(), false),
        )?;
        self.data = Some(m);
        Ok(self.data.as_ref().unwrap_or_else(|| unreachable!()))
    }

    pub fn data(&self) -> &Mapping {
        self.data.as_ref().expect("bind_data first")
    }

    /// Writes `b` at the start of the batch buffer (offset `slot` * 4 KiB) and submits it.
    pub fn submit_at(&mut self, slot: usize, b: &Batch) -> io::Result<u64> {
        let off = slot * 4096;
        b.write_to(&mut self.batch_buf.as_mut_slice()[off..off + 4096]);
        self.dev
            .exec_retry(self.q, BATCH_VA + off as u64, b.len_bytes() as u32)
    }

    pub fn submit(&mut self, b: &Batch) -> io::Result<u64> {
        self.submit_at(0, b)
    }

    pub fn wait(&self, fence: u64) -> io::Result<FenceOutcome> {
        self.dev.wait(self.q, fence, 20_000_000_000)
    }

    /// Submits and waits; `Err` if the ioctls fail.
    pub fn run(&mut self, b: &Batch) -> Result<FenceOutcome, String> {
        let f = ctx("EXEC", self.submit(b))?;
        ctx("WAIT", self.wait(f))
    }

    /// Submits, waits and requires success.
    pub fn run_ok(&mut self, b: &Batch) -> TResult {
        let o = self.run(b)?;
        ensure(o.error == 0, || format!("job failed: {o:?}"))
    }
}

impl Drop for Setup<'_> {
    fn drop(&mut self) {
        let _ = self.dev.exec_queue_destroy(self.q);
        let _ = self.dev.vm_destroy(self.vm);
    }
}

/// A batch: `insns`, then END.
pub fn batch(insns: &[Insn]) -> Batch {
    let mut b = Batch::new();
    for i in insns {
        b.push(*i);
    }
    b.end();
    b
}

/// A long job: `count` times { ATOMIC_ADD 1 at `counter`; DELAY `delay_ns` }, then STORE
/// `magic` at `done`.
pub fn counting_job(counter: u64, count: u32, delay_ns: u32, done: u64, magic: u32) -> Batch {
    let mut b = Batch::new();
    b.push(Insn::AtomicAdd {
        size64: false,
        va: counter,
        value: 1,
    })
    .push(Insn::Delay { ns: delay_ns });
    let body = i64::try_from(b.len_bytes()).expect("batch length fits i64");
    b.push(Insn::Loop {
        count,
        offset: -body,
    })
    .push(Insn::Store {
        size64: false,
        va: done,
        value: u64::from(magic),
    })
    .end();
    b
}

/// Current monotonic time in nanoseconds.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn sleep_ms(ms: u64) {
    std::thread::sleep(std::time::Duration::from_millis(ms));
}

/// The svmgpu render nodes; when there are none (or they cannot be listed) reports `name`
/// as failed and returns `None`.
pub fn devices(k: &mut crate::tests::K, name: &str) -> Option<Vec<Device>> {
    match Device::enumerate() {
        Ok(d) if !d.is_empty() => Some(d),
        Ok(_) => {
            k.result(
                name,
                &crate::ktap::Outcome::Fail("no svmgpu render node".into()),
            );
            None
        }
        Err(e) => {
            k.result(name, &crate::ktap::Outcome::Fail(format!("enumerate: {e}")));
            None
        }
    }
}
