//! Job completion as a standard `dma_fence`, through DRM syncobjs (issue 15 item 3): EXEC's
//! out-syncobjs (binary and timeline) signal when the job completed, in-syncobjs hold a
//! job back until their fence signalled (across queues and devices), the fence exports as
//! a sync_file that poll() sees and whose status carries the job's error, and EXEC's
//! sync arguments are validated without side effects.
//!
//! Every job whose fence must not be signalled yet waits on a *gate*, a word of its batch
//! buffer the CPU sets when the test has checked the unsignalled state: the checks do not
//! depend on how fast the guest runs. Each test says which broken driver it catches.

use crate::{
    ktap::Outcome,
    tests::{Env, K},
    util::*,
};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use svmgpu::{
    deadline_ns, poll_readable, spec::isa::CompareOp, spec::isa::Insn, sync_file_info, uapi, Batch,
    Device, Mapping,
};

/// Batch slot (4 KiB page of the batch buffer) that holds the gate words.
const GATE_SLOT: usize = 15;
/// Generous timeout of the waits that must succeed.
const LONG_NS: i64 = 10_000_000_000;
const MAGIC: u32 = 0x5eed_f00d;

fn out(handle: u32) -> uapi::Sync {
    out_at(handle, 0)
}

fn out_at(handle: u32, point: u64) -> uapi::Sync {
    uapi::Sync {
        handle,
        flags: uapi::SVMGPU_SYNC_SIGNAL,
        point,
    }
}

fn in_(handle: u32) -> uapi::Sync {
    in_at(handle, 0)
}

fn in_at(handle: u32, point: u64) -> uapi::Sync {
    uapi::Sync {
        handle,
        flags: 0,
        point,
    }
}

/// Syncobjs of one file, destroyed on drop.
struct Syncobjs<'a> {
    dev: &'a Device,
    handles: Vec<u32>,
}

impl<'a> Syncobjs<'a> {
    fn new(dev: &'a Device) -> Self {
        Syncobjs {
            dev,
            handles: Vec::new(),
        }
    }

    fn create(&mut self) -> Result<u32, String> {
        let h = ctx("SYNCOBJ_CREATE", self.dev.syncobj_create(false))?;
        self.handles.push(h);
        Ok(h)
    }
}

impl Drop for Syncobjs<'_> {
    fn drop(&mut self) {
        for h in &self.handles {
            let _ = self.dev.syncobj_destroy(*h);
        }
    }
}

/// A second exec queue on a [`Setup`]'s VM (another device context: it may run on
/// another engine, and is time-sliced with the first). Destroyed on drop, so declare it
/// after the `Setup`.
struct Queue<'a> {
    dev: &'a Device,
    q: u32,
}

impl<'a> Queue<'a> {
    fn new(s: &Setup<'a>) -> Result<Self, String> {
        let q = ctx("EXEC_QUEUE_CREATE", s.dev.exec_queue_create(s.vm, false))?;
        Ok(Queue { dev: s.dev, q })
    }
}

impl Drop for Queue<'_> {
    fn drop(&mut self) {
        let _ = self.dev.exec_queue_destroy(self.q);
    }
}

/// Writes `b` into batch slot `slot` of `s` and submits it on queue `q` with `syncs`.
fn submit(
    s: &mut Setup,
    q: u32,
    slot: usize,
    b: &Batch,
    syncs: &[uapi::Sync],
) -> std::io::Result<u64> {
    assert!(slot < GATE_SLOT);
    let off = slot * 4096;
    b.write_to(&mut s.batch_buf.as_mut_slice()[off..off + 4096]);
    s.dev
        .exec_with_syncs(q, BATCH_VA + off as u64, b.len_bytes() as u32, syncs)
}

/// The GPU VA of gate `n`.
fn gate_va(n: usize) -> u64 {
    BATCH_VA + (GATE_SLOT * 4096 + n * 4) as u64
}

/// Closes gate `n` (before the job is submitted).
fn close_gate(s: &Setup, n: usize) {
    s.batch_buf.write_u32(GATE_SLOT * 4096 + n * 4, 0);
}

/// Opens gate `n`: the job waiting on it goes on.
fn open_gate(s: &Setup, n: usize) {
    s.batch_buf.write_u32(GATE_SLOT * 4096 + n * 4, 1);
}

/// WAIT until gate `n` is open (no timeout: the test opens it within a second).
fn wait_gate(n: usize) -> Insn {
    Insn::Wait {
        size64: false,
        op: CompareOp::Eq,
        timeout_us: 0,
        va: gate_va(n),
        value: 1,
    }
}

fn store(va: u64, value: u32) -> Insn {
    Insn::Store {
        size64: false,
        va,
        value: u64::from(value),
    }
}

/// SYNCOBJ_WAIT(timeout 0) on `h` must answer ETIME: it has a fence, not signalled.
fn expect_unsignalled(d: &Device, h: u32, what: &str) -> TResult {
    match d.syncobj_wait(&[h], 0, 0) {
        Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(()),
        Ok(_) => Err(format!("{what}: the syncobj is already signalled")),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Err(format!(
            "{what}: the syncobj has no fence (SYNCOBJ_WAIT EINVAL)"
        )),
        Err(e) => Err(format!("{what}: SYNCOBJ_WAIT: {e}")),
    }
}

/// SYNCOBJ_WAIT(timeout 0) on `h` must answer EINVAL: it has no fence at all.
fn expect_no_fence(d: &Device, h: u32, what: &str) -> TResult {
    match d.syncobj_wait(&[h], 0, 0) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Ok(_) => Err(format!("{what}: the syncobj got a signalled fence")),
        Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
            Err(format!("{what}: the syncobj got an unsignalled fence"))
        }
        Err(e) => Err(format!("{what}: SYNCOBJ_WAIT: {e}")),
    }
}

/// A sync_file's status must be `want` (1 signalled, 0 active, < 0 an error), for the
/// file and for its one fence.
fn expect_sync_file_status(fd: &OwnedFd, want: i32, what: &str) -> Result<String, String> {
    let info = ctx(&format!("{what}: SYNC_IOC_FILE_INFO"), sync_file_info(fd))?;
    ensure(info.fences.len() == 1, || {
        format!(
            "{what}: sync_file with {} fences, want 1",
            info.fences.len()
        )
    })?;
    let f = &info.fences[0];
    ensure(info.status == want && f.status == want, || {
        format!(
            "{what}: sync_file status {}, its fence's {} ({f:?}), want {want}",
            info.status, f.status
        )
    })?;
    Ok(format!("fence of {} on {}", f.driver, f.timeline))
}

fn first_device(k: &mut K, name: &str, f: impl FnOnce(&Device, &mut K) -> TResult) {
    let Some(devs) = devices(k, name) else { return };
    let r = f(&devs[0], k);
    k.result(name, &Outcome::from(r));
}

// ---- out-syncobjs ---------------------------------------------------------------------------

/// An out-syncobj (binary) gets the job's fence at EXEC, unsignalled while the job runs,
/// signalled once it completed, with its writes visible; a second EXEC replaces the
/// fence. On every device; DRM_CAP_SYNCOBJ and DRM_CAP_SYNCOBJ_TIMELINE are 1.
///
/// Catches a driver without DRIVER_SYNCOBJ(_TIMELINE), one that ignores out-syncobjs (no
/// fence: SYNCOBJ_WAIT EINVAL), installs an already signalled fence or signals it when the
/// job is queued or starts (the 0-timeout wait succeeds; the job's STORE comes 200 ms
/// after its start, so an early signal shows as a missing STORE), never signals it (the
/// 10 s wait times out), signals it with an error for a job that succeeded (sync_file
/// status), or adds the fence only to a syncobj that had none (the second EXEC leaves the
/// signalled one).
pub fn out_syncobj_binary_signals_on_completion(_env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else { return };
    let mut cases = Vec::new();
    for (i, d) in devs.iter().enumerate() {
        let r = (|| {
            for (cap, what) in [
                (uapi::DRM_CAP_SYNCOBJ, "DRM_CAP_SYNCOBJ"),
                (uapi::DRM_CAP_SYNCOBJ_TIMELINE, "DRM_CAP_SYNCOBJ_TIMELINE"),
            ] {
                let v = ctx(what, d.get_cap(cap))?;
                ensure(v == 1, || format!("{what} is {v}, want 1"))?;
            }
            let mut s = Setup::new(d, false, false)?;
            s.bind_data(4096)?;
            let mut so = Syncobjs::new(d);
            let h = so.create()?;
            expect_no_fence(d, h, "new syncobj")?;
            close_gate(&s, 0);
            let job = batch(&[
                wait_gate(0),
                Insn::Delay { ns: 200_000_000 },
                store(DATA_VA, MAGIC),
            ]);
            let q = s.q;
            let f = ctx("EXEC", submit(&mut s, q, 0, &job, &[out(h)]))?;
            expect_unsignalled(d, h, "right after EXEC")?;
            sleep_ms(50);
            expect_unsignalled(d, h, "50 ms after EXEC, job held by its gate")?;
            open_gate(&s, 0);
            let t0 = now_ns();
            ctx(
                "SYNCOBJ_WAIT (10 s)",
                d.syncobj_wait(&[h], deadline_ns(LONG_NS), 0),
            )?;
            let ms = (now_ns() - t0) / 1_000_000;
            let v = s.data().read_u32(0);
            ensure(v == MAGIC, || {
                format!("syncobj signalled ({ms} ms after the gate opened) before the job's STORE landed: {v:#x}")
            })?;
            let o = ctx("WAIT", s.wait(f))?;
            ensure(o.error == 0, || format!("job failed: {o:?}"))?;
            let fd = ctx("export sync_file", d.syncobj_export_sync_file(h))?;
            expect_sync_file_status(&fd, 1, "completed job")?;
            k.diag(&format!(
                "device_{i}: signalled {ms} ms after the gate opened (job: 200 ms DELAY)"
            ));
            // A second EXEC replaces the (signalled) fence with its own.
            close_gate(&s, 1);
            let f2 = ctx(
                "second EXEC",
                submit(&mut s, q, 1, &batch(&[wait_gate(1)]), &[out(h)]),
            )?;
            let r = expect_unsignalled(d, h, "after a second EXEC with the same out-syncobj");
            open_gate(&s, 1);
            r?;
            ctx(
                "SYNCOBJ_WAIT after the second job",
                d.syncobj_wait(&[h], deadline_ns(LONG_NS), 0),
            )?;
            let o = ctx("WAIT second job", s.wait(f2))?;
            ensure(o.error == 0, || format!("second job failed: {o:?}"))
        })();
        cases.push((format!("device_{i}"), Outcome::from(r)));
    }
    k.suite(name, cases);
}

/// Two jobs add points 1 and 2 to one timeline syncobj: both are submitted (QUERY with
/// LAST_SUBMITTED is 2), none signalled (QUERY 0, TIMELINE_WAIT with timeout 0 ETIME)
/// while the first waits on its gate; then TIMELINE_WAIT on point 2 succeeds, both jobs'
/// STOREs are visible and QUERY is 2.
///
/// Catches a driver that treats a timeline sync as binary (replaces the syncobj's fence:
/// point 2 does not exist, TIMELINE_WAIT EINVAL, QUERY 0), adds the points with the wrong
/// value, or signals them early or never.
pub fn out_syncobj_timeline_point(_env: &Env, name: &str, k: &mut K) {
    first_device(k, name, |d, k| {
        let mut s = Setup::new(d, false, false)?;
        s.bind_data(4096)?;
        let mut so = Syncobjs::new(d);
        let t = so.create()?;
        let q = s.q;
        close_gate(&s, 0);
        let j1 = batch(&[wait_gate(0), store(DATA_VA, 1)]);
        let j2 = batch(&[Insn::Delay { ns: 100_000_000 }, store(DATA_VA + 4, 2)]);
        let r = (|| {
            ctx("EXEC point 1", submit(&mut s, q, 0, &j1, &[out_at(t, 1)]))?;
            ctx("EXEC point 2", submit(&mut s, q, 1, &j2, &[out_at(t, 2)]))?;
            let last = ctx(
                "QUERY(LAST_SUBMITTED)",
                d.syncobj_query(t, uapi::DRM_SYNCOBJ_QUERY_FLAGS_LAST_SUBMITTED),
            )?;
            ensure(last == 2, || format!("last submitted point {last}, want 2"))?;
            let now = ctx("QUERY", d.syncobj_query(t, 0))?;
            ensure(now == 0, || {
                format!("signalled point {now} while the first job waits, want 0")
            })?;
            for p in [1, 2] {
                match d.syncobj_timeline_wait(&[(t, p)], 0, 0) {
                    Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
                    other => {
                        return Err(format!(
                            "TIMELINE_WAIT(point {p}, timeout 0) before the jobs ran: {other:?}, want ETIME"
                        ))
                    }
                }
            }
            Ok(())
        })();
        open_gate(&s, 0);
        r?;
        ctx(
            "TIMELINE_WAIT point 2 (10 s)",
            d.syncobj_timeline_wait(&[(t, 2)], deadline_ns(LONG_NS), 0),
        )?;
        let (a, b) = (s.data().read_u32(0), s.data().read_u32(4));
        ensure(a == 1 && b == 2, || {
            format!("point 2 signalled but the STOREs read {a}, {b} (want 1, 2)")
        })?;
        ctx(
            "TIMELINE_WAIT point 1",
            d.syncobj_timeline_wait(&[(t, 1)], 0, 0),
        )?;
        let now = ctx("QUERY after", d.syncobj_query(t, 0))?;
        ensure(now == 2, || format!("QUERY {now} after both jobs, want 2"))?;
        // A point past the last one has not been submitted.
        let p3 =
            d.syncobj_timeline_wait(&[(t, 3)], 0, uapi::DRM_SYNCOBJ_WAIT_FLAGS_WAIT_FOR_SUBMIT);
        ensure(errno(p3) == Some(libc::ETIME), || {
            "point 3 (never submitted) is signalled".into()
        })?;
        k.diag("points 1 and 2 signalled in order, QUERY 2");
        Ok(())
    });
}

// ---- in-syncobjs ----------------------------------------------------------------------------

/// One ordering round: queue A runs DELAY 500 ms then STORE `x` = 1 and signals `sig`;
/// queue B (same VM) copies `x` to `y` after waiting for `wait` (None: no in-sync, the
/// broken case). Returns how long B's EXEC took and the value B copied.
fn order_round(
    s: &mut Setup,
    qb: u32,
    x: u64,
    y: u64,
    sig: uapi::Sync,
    wait: Option<uapi::Sync>,
) -> Result<(u64, u32), String> {
    let qa = s.q;
    let a = batch(&[Insn::Delay { ns: 500_000_000 }, store(x, 1)]);
    let b = batch(&[Insn::Copy {
        dst: y,
        src: x,
        len: 4,
    }]);
    let fa = ctx("EXEC A", submit(s, qa, 0, &a, &[sig]))?;
    let t0 = now_ns();
    let fb = ctx("EXEC B", submit(s, qb, 1, &b, wait.as_slice()))?;
    let exec_ms = (now_ns() - t0) / 1_000_000;
    let ob = ctx("WAIT B", s.dev.wait(qb, fb, 20_000_000_000))?;
    let oa = ctx("WAIT A", s.wait(fa))?;
    ensure(oa.error == 0 && ob.error == 0, || {
        format!("jobs failed: A {oa:?}, B {ob:?}")
    })?;
    let off = usize::try_from(y - DATA_VA).expect("offset");
    Ok((exec_ms, s.data().read_u32(off)))
}

/// A job with an in-syncobj runs only after the fence it holds signalled, across two exec
/// queues of one VM (two device contexts, which run concurrently otherwise): queue A
/// DELAYs 500 ms then STOREs X = 1, signalling S; queue B waits for S and COPYs X to Y.
/// Y must be 1. Once with a binary syncobj, once with timeline point 5.
///
/// Catches a driver that ignores in-syncobjs (B copies 0 while A still delays), waits for
/// the wrong timeline point or for a binary syncobj's old fence, or signals A's fence
/// before A's STORE.
pub fn in_syncobj_orders_jobs_across_queues(_env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else { return };
    let d = &devs[0];
    let mut cases = Vec::new();
    let r = (|| {
        let mut s = Setup::new(d, false, false)?;
        s.bind_data(4096)?;
        let b = Queue::new(&s)?;
        let mut so = Syncobjs::new(d);
        let bin = so.create()?;
        let tl = so.create()?;
        let (ms, y) = order_round(&mut s, b.q, DATA_VA, DATA_VA + 4, out(bin), Some(in_(bin)))?;
        k.diag(&format!(
            "binary: EXEC B (in-fence: A, 500 ms) took {ms} ms; B copied {y}"
        ));
        let binary = ensure(y == 1, || {
            format!("B ran before A's STORE: copied {y}, want 1")
        });
        let (ms, y) = order_round(
            &mut s,
            b.q,
            DATA_VA + 8,
            DATA_VA + 12,
            out_at(tl, 5),
            Some(in_at(tl, 5)),
        )?;
        k.diag(&format!(
            "timeline point 5: EXEC B took {ms} ms; B copied {y}"
        ));
        let timeline = ensure(y == 1, || {
            format!("B ran before A's STORE: copied {y}, want 1")
        });
        Ok::<_, String>((binary, timeline))
    })();
    match r {
        Ok((binary, timeline)) => {
            cases.push(("binary".to_string(), Outcome::from(binary)));
            cases.push(("timeline_point".to_string(), Outcome::from(timeline)));
        }
        Err(e) => cases.push(("setup".to_string(), Outcome::Fail(e))),
    }
    k.suite(name, cases);
}

/// The fence of a job on device 0, exported as a sync_file and imported into a syncobj of
/// device 1 (DRM_SYNCOBJ_FD_TO_HANDLE with IMPORT_SYNC_FILE), holds back a job on device 1
/// that copies what device 0's job stores (one buffer bound in both VMs). Needs 2 vGPUs.
///
/// Catches a driver whose fences only order its own queues of one file (no real
/// dma_fence: the import fails or B does not wait, and copies 0).
pub fn in_sync_file_orders_jobs_across_devices(env: &Env, name: &str, k: &mut K) {
    if env.gpus < 2 {
        return k.result(name, &Outcome::Skip("needs 2 vGPUs".into()));
    }
    let Some(devs) = devices(k, name) else { return };
    let r = (|| {
        let (d0, d1) = (&devs[0], &devs[1]);
        let buf = ctx("mmap", Mapping::anon(4096))?;
        let mut s0 = Setup::new(d0, false, false)?;
        let mut s1 = Setup::new(d1, false, false)?;
        for s in [&s0, &s1] {
            ctx(
                "bind shared",
                s.dev.bind_userptr(s.vm, DATA_VA, 4096, buf.addr(), false),
            )?;
        }
        let mut so0 = Syncobjs::new(d0);
        let mut so1 = Syncobjs::new(d1);
        let h0 = so0.create()?;
        let h1 = so1.create()?;
        let q0 = s0.q;
        let a = batch(&[Insn::Delay { ns: 500_000_000 }, store(DATA_VA, 1)]);
        let fa = ctx("EXEC on device 0", submit(&mut s0, q0, 0, &a, &[out(h0)]))?;
        let sf = ctx("export sync_file", d0.syncobj_export_sync_file(h0))?;
        ctx(
            "import sync_file on device 1",
            d1.syncobj_import_sync_file(h1, &sf),
        )?;
        expect_unsignalled(d1, h1, "device 1's syncobj, device 0's job running")?;
        let q1 = s1.q;
        let b = batch(&[Insn::Copy {
            dst: DATA_VA + 4,
            src: DATA_VA,
            len: 4,
        }]);
        let fb = ctx("EXEC on device 1", submit(&mut s1, q1, 0, &b, &[in_(h1)]))?;
        let ob = ctx("WAIT device 1", s1.wait(fb))?;
        let oa = ctx("WAIT device 0", s0.wait(fa))?;
        ensure(oa.error == 0 && ob.error == 0, || {
            format!("jobs failed: {oa:?}, {ob:?}")
        })?;
        let y = buf.read_u32(4);
        k.diag(&format!("device 1 copied {y}"));
        ensure(y == 1, || {
            format!("device 1's job ran before device 0's STORE: copied {y}, want 1")
        })
    })();
    k.result(name, &Outcome::from(r));
}

// ---- sync_file, errors ----------------------------------------------------------------------

/// The out-syncobj's fence, exported as a sync_file, polls not readable (status 0) while
/// the job is held by its gate, and readable (status 1) once it completed.
///
/// Catches a driver whose fence never signals through the dma_fence machinery (poll and
/// the sync_file never see it: no `dma_fence_signal`, or no callback run) or signals it
/// early.
pub fn sync_file_export_polls(_env: &Env, name: &str, k: &mut K) {
    first_device(k, name, |d, k| {
        let mut s = Setup::new(d, false, false)?;
        s.bind_data(4096)?;
        let mut so = Syncobjs::new(d);
        let h = so.create()?;
        let q = s.q;
        close_gate(&s, 0);
        let job = batch(&[wait_gate(0), store(DATA_VA, MAGIC)]);
        let f = ctx("EXEC", submit(&mut s, q, 0, &job, &[out(h)]))?;
        let r = (|| {
            let fd = ctx("export sync_file", d.syncobj_export_sync_file(h))?;
            let early = ctx("poll", poll_readable(&fd, 0))?;
            ensure(!early, || "sync_file readable right after EXEC".into())?;
            let early = ctx("poll 100 ms", poll_readable(&fd, 100))?;
            ensure(!early, || {
                "sync_file readable while the job waits on its gate".into()
            })?;
            let running = expect_sync_file_status(&fd, 0, "running job")?;
            Ok::<_, String>((fd, running))
        })();
        open_gate(&s, 0);
        let (fd, running) = r?;
        let t0 = now_ns();
        let ready = ctx("poll 10 s", poll_readable(&fd, 10_000))?;
        let ms = (now_ns() - t0) / 1_000_000;
        ensure(ready, || {
            "sync_file not readable 10 s after the gate opened".into()
        })?;
        let v = s.data().read_u32(0);
        ensure(v == MAGIC, || {
            format!("sync_file readable before the job's STORE landed: {v:#x}")
        })?;
        expect_sync_file_status(&fd, 1, "completed job")?;
        let o = ctx("WAIT", s.wait(f))?;
        ensure(o.error == 0, || format!("job failed: {o:?}"))?;
        // (Once signalled, the kernel names a fence's driver "detached-driver".)
        k.diag(&format!(
            "poll readable {ms} ms after the gate opened; while running: {running}"
        ));
        Ok(())
    });
}

/// A job that faults (no fault mode, STORE to an unbound address: outcome -EFAULT)
/// signals its out-syncobj (SYNCOBJ_WAIT succeeds) and the fence carries the error: the
/// exported sync_file's status and its fence's are -EFAULT, as WAIT's outcome. A job on
/// another queue waiting for that fence still runs (an in-fence's outcome does not
/// matter). The next EXEC on the failed queue is EIO and leaves its out-syncobj without a
/// fence.
///
/// Catches a driver that signals the fence of a failed job without setting its error
/// (status 1), never signals it (the wait times out), fails or skips the jobs waiting for
/// it, or touches out-syncobjs in an EXEC that fails.
pub fn failed_job_fence_carries_error(_env: &Env, name: &str, k: &mut K) {
    first_device(k, name, |d, k| {
        let mut s = Setup::new(d, false, false)?;
        s.bind_data(4096)?;
        let b = Queue::new(&s)?;
        let mut so = Syncobjs::new(d);
        let h = so.create()?;
        let h2 = so.create()?;
        let q = s.q;
        let bad = batch(&[Insn::Delay { ns: 100_000_000 }, store(0x7000_0000, 1)]);
        let f = ctx("EXEC", submit(&mut s, q, 0, &bad, &[out(h)]))?;
        let after = batch(&[store(DATA_VA, MAGIC)]);
        let fb = ctx(
            "EXEC on queue B waiting for the failing job",
            submit(&mut s, b.q, 1, &after, &[in_(h)]),
        )?;
        ctx(
            "SYNCOBJ_WAIT (10 s)",
            d.syncobj_wait(&[h], deadline_ns(LONG_NS), 0),
        )?;
        let o = ctx("WAIT", s.wait(f))?;
        ensure(o.error == -libc::EFAULT, || {
            format!("job outcome {o:?}, want -EFAULT")
        })?;
        let fd = ctx("export sync_file", d.syncobj_export_sync_file(h))?;
        expect_sync_file_status(&fd, -libc::EFAULT, "faulted job")?;
        let ob = ctx("WAIT queue B", d.wait(b.q, fb, 20_000_000_000))?;
        ensure(ob.error == 0 && s.data().read_u32(0) == MAGIC, || {
            format!(
                "the job waiting for the failed one did not run: {ob:?}, word {:#x}",
                s.data().read_u32(0)
            )
        })?;
        expect_errno(
            "EXEC on the failed queue",
            submit(&mut s, q, 2, &batch(&[]), &[out(h2)]),
            libc::EIO,
        )?;
        expect_no_fence(d, h2, "out-syncobj of the EXEC that failed with EIO")?;
        k.diag("sync_file status -EFAULT, as WAIT's outcome");
        Ok(())
    });
}

/// EXEC's sync arguments are validated before anything happens: an unknown syncobj
/// handle is ENOENT, an in-syncobj without a fence (binary) or at a point not submitted
/// (timeline) EINVAL, undefined sync flags EINVAL, more than SVMGPU_MAX_SYNCS EINVAL,
/// nonzero pad2 EINVAL, an unreadable syncs pointer EFAULT, an unknown queue ENOENT. In
/// every case the out-syncobjs of the same call keep no fence (binary) and no point
/// (timeline), and no job ran; a correct EXEC afterwards works.
///
/// Catches a driver that accepts any of these, or installs out-fences (or queues the job)
/// before it finished validating (the out-syncobj given first gets a fence).
pub fn exec_syncs_reject_bad_arguments(_env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else { return };
    let d = &devs[0];
    let r = (|| {
        let mut s = Setup::new(d, false, false)?;
        s.bind_data(4096)?;
        let mut so = Syncobjs::new(d);
        let o = so.create()?;
        let ot = so.create()?;
        let empty = so.create()?;
        let tl = so.create()?;
        // Timeline `tl` has point 1 (signalled from the CPU), not point 3.
        ctx("TIMELINE_SIGNAL", d.syncobj_timeline_signal(&[(tl, 1)]))?;
        let many: Vec<u32> = (0..uapi::SVMGPU_MAX_SYNCS)
            .map(|_| so.create())
            .collect::<Result<_, _>>()?;
        // The job would mark that it ran.
        let job = batch(&[Insn::AtomicAdd {
            size64: false,
            va: DATA_VA,
            value: 1,
        }]);
        job.write_to(&mut s.batch_buf.as_mut_slice()[..4096]);
        let len = job.len_bytes() as u32;
        let q = s.q;
        let outs = [out(o), out_at(ot, 1)];
        let with = |extra: uapi::Sync| {
            let mut v = outs.to_vec();
            v.push(extra);
            v
        };
        let exec =
            |queue_id: u32, syncs: &[uapi::Sync], num: Option<u32>, ptr: Option<u64>, pad2: u32| {
                d.exec_raw(&mut uapi::Exec {
                    queue_id,
                    batch_va: BATCH_VA,
                    batch_len: len,
                    syncs: ptr.unwrap_or(syncs.as_ptr() as u64),
                    num_syncs: num.unwrap_or(syncs.len() as u32),
                    pad2,
                    ..Default::default()
                })
            };
        let mut over: Vec<uapi::Sync> = outs.to_vec();
        over.extend(many.iter().map(|&h| out(h)));
        let cases: Vec<(&str, std::io::Result<u64>, i32)> = vec![
            (
                "unknown_in_handle_is_enoent",
                exec(q, &with(in_(0xdead)), None, None, 0),
                libc::ENOENT,
            ),
            (
                "unknown_out_handle_is_enoent",
                exec(q, &with(out(0xdead)), None, None, 0),
                libc::ENOENT,
            ),
            (
                "handle_zero_is_enoent",
                exec(q, &with(in_(0)), None, None, 0),
                libc::ENOENT,
            ),
            (
                "in_binary_without_fence_is_einval",
                exec(q, &with(in_(empty)), None, None, 0),
                libc::EINVAL,
            ),
            (
                "in_timeline_point_not_submitted_is_einval",
                exec(q, &with(in_at(tl, 3)), None, None, 0),
                libc::EINVAL,
            ),
            (
                "undefined_sync_flag_is_einval",
                exec(
                    q,
                    &with(uapi::Sync {
                        handle: tl,
                        flags: 1 << 1,
                        point: 1,
                    }),
                    None,
                    None,
                    0,
                ),
                libc::EINVAL,
            ),
            (
                "too_many_syncs_is_einval",
                exec(q, &over, None, None, 0),
                libc::EINVAL,
            ),
            (
                "nonzero_pad2_is_einval",
                exec(q, &outs, None, None, 1),
                libc::EINVAL,
            ),
            (
                "unknown_queue_is_enoent",
                exec(0xdead, &outs, None, None, 0),
                libc::ENOENT,
            ),
            (
                "unreadable_syncs_is_efault",
                exec(q, &outs, Some(1), Some(0x10), 0),
                libc::EFAULT,
            ),
            (
                "syncs_past_the_readable_array_is_efault",
                // The array's end runs into an unmapped page (the readable part has the
                // out-syncobjs first).
                {
                    let m = Mapping::anon(8192).map_err(|e| e.to_string())?;
                    // SAFETY: Unmaps the second page of our own mapping.
                    unsafe { libc::munmap((m.addr() + 4096) as *mut libc::c_void, 4096) };
                    let at = m.addr() + 4096 - 2 * 16;
                    // SAFETY: Writes the two out-syncs in the first, still mapped page.
                    unsafe {
                        std::ptr::copy_nonoverlapping(outs.as_ptr(), at as *mut uapi::Sync, 2)
                    };
                    let r = exec(q, &outs, Some(4), Some(at), 0);
                    // Unmap the rest ourselves; the second page is gone already.
                    // SAFETY: The first page of the mapping, which nothing uses any more.
                    unsafe { libc::munmap(m.addr() as *mut libc::c_void, 4096) };
                    m.leak();
                    r
                },
                libc::EFAULT,
            ),
            (
                "null_syncs_with_count_is_efault",
                exec(q, &outs, Some(1), Some(0), 0),
                libc::EFAULT,
            ),
        ];
        let mut results = Vec::new();
        for (case, r, want) in cases {
            let mut res = expect_errno(case, r, want);
            if res.is_ok() {
                res =
                    expect_no_fence(d, o, "binary out-syncobj of the failed EXEC").and_then(|()| {
                        let p = ctx(
                            "QUERY",
                            d.syncobj_query(ot, uapi::DRM_SYNCOBJ_QUERY_FLAGS_LAST_SUBMITTED),
                        )?;
                        ensure(p == 0, || {
                            format!("timeline out-syncobj of the failed EXEC has point {p}")
                        })
                    });
            }
            results.push((case.to_string(), Outcome::from(res)));
        }
        // Nothing ran; a correct EXEC now runs once and signals both out-syncobjs.
        let ran = s.data().read_u32(0);
        let good = (|| {
            ensure(ran == 0, || {
                format!("a failed EXEC ran its job ({ran} times)")
            })?;
            let f = ctx("EXEC", exec(q, &with(in_at(tl, 1)), None, None, 0))?;
            let w = ctx("WAIT", s.wait(f))?;
            ensure(w.error == 0, || format!("job failed: {w:?}"))?;
            ctx(
                "SYNCOBJ_WAIT",
                d.syncobj_wait(&[o], deadline_ns(LONG_NS), 0),
            )?;
            ctx(
                "TIMELINE_WAIT",
                d.syncobj_timeline_wait(&[(ot, 1)], deadline_ns(LONG_NS), 0),
            )?;
            let n = s.data().read_u32(0);
            ensure(n == 1, || format!("the job ran {n} times, want 1"))
        })();
        results.push(("then_a_correct_exec_works".to_string(), Outcome::from(good)));
        Ok::<_, String>(results)
    })();
    match r {
        Ok(cases) => k.suite(name, cases),
        Err(e) => k.result(name, &Outcome::Fail(e)),
    }
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// EXEC waiting for an in-fence is interruptible and then has no effect: queue B's EXEC
/// (in: S, which queue A's job signals once the test opens its gate; out: O) is hit by a
/// signal without SA_RESTART after 200 ms and returns EINTR; O has no fence, and once A
/// completed and the EXEC is repeated, B's job ran exactly once.
///
/// Catches a driver that waits uninterruptibly (the EXEC returns only when the gate
/// opens, 1 s later, and succeeds), or that queues the job or installs the out-fence
/// before the wait and leaves them behind when interrupted (O gets a fence, or the job
/// runs twice).
pub fn exec_interrupted_in_fence_wait_has_no_effect(_env: &Env, name: &str, k: &mut K) {
    first_device(k, name, |d, k| {
        let mut s = Setup::new(d, false, false)?;
        s.bind_data(4096)?;
        let b = Queue::new(&s)?;
        let mut so = Syncobjs::new(d);
        let sig = so.create()?;
        let o = so.create()?;
        let qa = s.q;
        close_gate(&s, 0);
        let a = batch(&[wait_gate(0)]);
        let fa = ctx("EXEC A", submit(&mut s, qa, 0, &a, &[out(sig)]))?;
        let bj = batch(&[Insn::AtomicAdd {
            size64: false,
            va: DATA_VA,
            value: 1,
        }]);
        bj.write_to(&mut s.batch_buf.as_mut_slice()[4096..8192]);
        let syncs = [in_(sig), out(o)];
        let mut x = uapi::Exec {
            queue_id: b.q,
            batch_va: BATCH_VA + 4096,
            batch_len: bj.len_bytes() as u32,
            syncs: syncs.as_ptr() as u64,
            num_syncs: 2,
            ..Default::default()
        };
        // SAFETY: A handler that does nothing, without SA_RESTART.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = ignore_signal as *const () as usize;
            libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
        }
        // SAFETY: The calling thread's id.
        let me = unsafe { libc::pthread_self() };
        let t = std::thread::spawn(move || {
            sleep_ms(200);
            // SAFETY: `me` is alive (it joins this thread before it ends).
            unsafe { libc::pthread_kill(me, libc::SIGUSR1) };
        });
        let t0 = now_ns();
        // A bare ioctl: the library would restart it on EINTR.
        // SAFETY: `x` is a `struct drm_svmgpu_exec`, `syncs` outlives the call.
        let rc = unsafe {
            libc::ioctl(
                d.as_fd().as_raw_fd(),
                uapi::DRM_IOCTL_SVMGPU_EXEC as libc::Ioctl,
                std::ptr::from_mut(&mut x),
            )
        };
        let err = std::io::Error::last_os_error();
        let ms = (now_ns() - t0) / 1_000_000;
        let _ = t.join();
        let first = (|| {
            ensure(rc == -1 && err.raw_os_error() == Some(libc::EINTR), || {
                if rc == 0 {
                    format!("EXEC waiting for an in-fence returned 0 after {ms} ms, not EINTR on the signal")
                } else {
                    format!("EXEC interrupted after {ms} ms: {err}, want EINTR")
                }
            })?;
            expect_no_fence(d, o, "out-syncobj of the interrupted EXEC")
        })();
        open_gate(&s, 0);
        first?;
        let oa = ctx("WAIT A", s.wait(fa))?;
        ensure(oa.error == 0, || format!("A failed: {oa:?}"))?;
        let fb = ctx(
            "EXEC B again",
            d.exec_with_syncs(b.q, BATCH_VA + 4096, bj.len_bytes() as u32, &syncs),
        )?;
        let ob = ctx("WAIT B", d.wait(b.q, fb, 20_000_000_000))?;
        ensure(ob.error == 0, || format!("B failed: {ob:?}"))?;
        ctx(
            "SYNCOBJ_WAIT O",
            d.syncobj_wait(&[o], deadline_ns(LONG_NS), 0),
        )?;
        let n = s.data().read_u32(0);
        ensure(n == 1, || {
            format!("B's job ran {n} times (the interrupted EXEC queued it too)")
        })?;
        k.diag(&format!("EXEC interrupted after {ms} ms with EINTR"));
        Ok(())
    });
}
