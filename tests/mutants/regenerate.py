#!/usr/bin/env python3
"""Regenerates tests/mutants/NN-name.patch from the mutations below (each a list of
exact search/replace edits of guest-driver/kmod) against the checkout's current driver.

The patches are what scripts/mutants.sh applies; this script only rewrites them when the
driver moved and a patch no longer applies (or a mutant is added here). An edit whose
search text is not found exactly once is an error: update the mutation, keep its intent.

Usage: tests/mutants/regenerate.py [--check]
  --check   only verify that every mutation still applies (exit 1 if one does not)
"""
import os, shutil, subprocess, sys, tempfile, textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, 'tests', 'mutants')
K = 'guest-driver/kmod/'
M = []


def mut(name, title, why, kills, edits):
    M.append((name, title, why, kills, edits))

LAT='gpus=2 device-args=--tlb-inval-latency-ns=20000000,--preempt-latency-ns=20000000,--tlb-no-evict,--tlb-entries=256'
mut('userptr-second-pass-no-wait','The userptr notifier does not wait for the device',
 'complete() drops the TLB_INVALIDATE / CTX_PREEMPT tickets instead of waiting: the notifier returns while the device still translates through the cleared PTEs.',
 [LAT+' only=coherence_after_syscall'],
 [('userptr.rs','''        for t in p.tickets.iter_mut() {
            if let Some(t) = t.take() {
                match ctrl.wait(t) {''','''        for t in p.tickets.iter_mut() {
            if let Some(t) = t.take() {
                core::mem::forget(t);
                continue;
                #[allow(unreachable_code)]
                match ctrl.wait(t) {''')])
mut('svm-second-pass-no-wait','The SVM notifier does not wait for the devices',
 'complete() of the SVM notifier takes the tickets and forgets them: the invalidation returns before any device finished its TLB invalidation.',
 [LAT+' only=coherence_after_syscall'],
 [('svm.rs','''            let ok = !t.failed
                && t.ticket
                    .take()
                    .map(|tk| {
                        after = tk.seqno();
                        ctrl.wait(tk)
                    })
                    .is_some_and(|d| d.is_ok_and(|d| d.succeeded()));''','''            let ok = !t.failed
                && t.ticket
                    .take()
                    .map(|tk| {
                        after = tk.seqno();
                        core::mem::forget(tk);
                    })
                    .is_some();''')])
mut('svm-one-device-skipped','One device of N is not invalidated',
 'The shared SVM notifier starts (and waits for) the TLB invalidation of the first device it tracks only; the others keep their stale translations.',
 [LAT+' only=coherence_after_syscall'],
 [('svm.rs','''        // Start every device before anyone waits (without sleeping under the lock).
        for t in p.targets.iter_mut().flatten() {''','''        // Start every device before anyone waits (without sleeping under the lock).
        for t in p.targets.iter_mut().flatten().take(1) {''')])
mut('svm-ptes-cleared-no-flush','PTEs cleared, TLB never invalidated',
 'The SVM notifier clears the PTEs and marks the pages invalid but starts no TLB_INVALIDATE: whatever the TLBs hold stays usable.',
 [LAT+' only=coherence_after_syscall'],
 [('svm.rs','''            match start_tlb_invalidate(&t.vm, t.start, t.end, false) {
                Ok(tk) => t.ticket = Some(tk),
                Err(e) if e == EBUSY => t.deferred = true,
                Err(_) => t.failed = true,
            }
        }
        drop(ns);''','''            let _ = t;
        }
        drop(ns);''')])
mut('userptr-flush-one-page-short','The TLB invalidation is one page short',
 'The userptr notifier invalidates [va, va + size - 4 KiB): the last page of every binding keeps its translation.',
 [LAT+' only=coherence_after_syscall'],
 [('userptr.rs','''            va: self.va,
            size: self.size,
        }
        .to_bytes()''','''            va: self.va,
            size: self.size - 4096,
        }
        .to_bytes()''')])
mut('userptr-read-retry-skipped','Userptr revalidation commits without mmu_interval_read_retry',
 'revalidate() writes the PTEs from pages that hmm_range_fault returned even when an invalidation ran since mmu_interval_read_begin (they may be stale or freed).',
 ['gpus=1 only=revalidation_races_invalidation', 'gpus=2 only=userptr_invalidate_while_job_runs', LAT+' only=coherence_after_syscall'],
 [('userptr.rs','''        if up.read_retry(seq) {
            // An invalidation ran since `read_begin`: these pages may be stale (or freed).''','''        if false && up.read_retry(seq) {
            // An invalidation ran since `read_begin`: these pages may be stale (or freed).''')])
mut('svm-readonly-mapped-writable','A read-only (or COW-shared) page is mapped writable',
 'SVM faults read-only memory in without write access (hmm_range_fault keeps COW pages shared) but writes writable PTEs: the GPU writes memory the CPU protects, or a page a forked child shares.',
 ['gpus=1 only=svm_mode_shared'],
 [('svm.rs','''            let res = p.commit(start as u64, &pfns, &mut addrs, writable, &mut pre, seq);''','''            let res = p.commit(start as u64, &pfns, &mut addrs, true, &mut pre, seq);'''),
  ('svm.rs','''        let writable = fl & vmf::WRITE != 0;
        if write && !writable {
            return Err(EACCES);
        }''','''        let writable = fl & vmf::WRITE != 0;''')])
mut('fork-protection-ignored',"fork's COW protection is ignored",
 'Both notifiers return at once on MMU_NOTIFY_PROTECTION_PAGE (the event of copy_page_range): after fork the GPU keeps writing the page that is now the child\'s COW copy.',
 [LAT+' only=coherence_after_syscall'],
 [('svm.rs','''        if ns.dead || this.data().pruned.load(Relaxed) != 0 {
            return Begin::Nothing;
        }''','''        if ns.dead
            || this.data().pruned.load(Relaxed) != 0
            || inv.event() == kernel::bindings::mmu_notifier_event_MMU_NOTIFY_PROTECTION_PAGE
        {
            return Begin::Nothing;
        }'''),
  ('userptr.rs','''        let dead = ns.dead;
        let un = d.n.access_mut(&mut ns);
        if dead || !(un.valid || un.inflight > 0) {''','''        let dead = ns.dead
            || inv.event() == kernel::bindings::mmu_notifier_event_MMU_NOTIFY_PROTECTION_PAGE;
        let un = d.n.access_mut(&mut ns);
        if dead || !(un.valid || un.inflight > 0) {''')])
mut('svm-unmap-left-to-gc','The garbage collector drops unmapped ranges without invalidating',
 'On MMU_NOTIFY_UNMAP the SVM notifier only marks the ranges unmapped and queues the garbage collector, which removes them without clearing PTEs or invalidating TLBs: the GPU keeps writing the unmapped pages.',
 [LAT+' only=coherence_after_syscall'],
 [('svm.rs','''            if unmap {
                r.unmapped = true;
                gc = true;
            }''','''            if unmap {
                r.unmapped = true;
                gc = true;
                continue;
            }''')])
mut('finish-pool-fallback-no-wait','The single-pass fallback does not wait',
 'When the finish pool is empty, the userptr notifier returns Done without completing the invalidation it started. The run delays the TLB invalidations of the 16 bindings that find the pool empty (GPU VAs 0x1040000-0x1050000 of coherence_many_bindings) by 300 ms: otherwise they finish with the 64 the second passes wait for, and the mutant is not observable.',
 [LAT+' inject=tlb-inval-delay:delay_us=300000,va=0x1040000-0x1050000 only=coherence_many_bindings'],
 [('userptr.rs','''                    // No finish item free: fall back to single pass.
                    Err(p) => {
                        gpu.stats.invalidations_single_pass.add(1, Relaxed);
                        Self::complete(this, p);
                        Start::Done
                    }''','''                    // No finish item free: fall back to single pass.
                    Err(p) => {
                        gpu.stats.invalidations_single_pass.add(1, Relaxed);
                        core::mem::forget(p);
                        Start::Done
                    }''')])
mut('svm-populate-no-sequence-check','SVM fault and prefetch commit without the sequence check',
 'populate() (GPU faults and VM_PREFETCH) writes the PTEs without checking that no invalidation hit the range since mmu_interval_read_begin.',
 ['gpus=1 only=revalidation_races_invalidation', 'gpus=2 only=svm_mode_shared'],
 [('svm.rs','''            if r.gen != gen0 && r.notifier.read_retry(seq) {''','''            if false && r.gen != gen0 && r.notifier.read_retry(seq) {''')])
mut('hole1-narrow-flush','Hole 1: the flush after a bind covers the binding only',
 'detach_vm() clears the PTEs of every SVM range overlapping a new binding but invalidates the TLB for the binding\'s range only (the driver at f5648d7).',
 ['gpus=1 only=svm_bind_inside_mirrored_range'],
 [('svm.rs','''            if let Some((start, end)) = cleared {
                let _ = vm.invalidate_tlb(start, end - start);
            }''','''            if let (Some(_), Some((va, size))) = (cleared, only) {
                let _ = vm.invalidate_tlb(va, size);
            }''')])
mut('hole2-close-before-reset','Hole 2: removal closes the control queue before the reset',
 'unbind() fails every waiter first and resets the device afterwards (the driver at f5648d7): a notifier in that window returns while the device still runs jobs.',
 [LAT+' only=unbind_stops_device_before_notifiers_return'],
 [('gpu/probe.rs','''        let reset = dev.reset();
        // 2. Refuse new work; retire the device's buffers; fail every fence and waiter.
        gpu.shutdown();
        //    (The test hook `race_delay_us` widens the window after this step: whatever
        //    waited for the device returns now, which is only sound because step 1 ran.)
        gpu.race_delay();
        // 3. Unregister the render node: waits for ioctls in flight (which now fail fast).
        drop(this.drm.lock().take());
        // 4. Wait for workers and remaining users of the device.
        gpu.wait_users();''','''        gpu.shutdown();
        gpu.race_delay();
        drop(this.drm.lock().take());
        gpu.wait_users();
        let reset = dev.reset();''')])
mut('hole3-exhaustion-resets','Hole 3: running out of asynchronous entries resets the device',
 'The userptr notifier starts a preemption per binding (no joining) and treats a full command table (EBUSY) as a failure, which resets the device (the driver at f5648d7).',
 ['gpus=1 only=invalidation_flood_is_back_pressure'],
 [('userptr.rs','''            let joined = if lr.preempted {
                lr.preempt.and_then(|id| ctrl.join(id))
            } else {
                None
            };''','''            let joined = None;'''),
  ('userptr.rs','''                Err(e) if e == EBUSY => p.deferred_preempts[k] = Some(lr.ctx_id),
                Err(_) => p.failed = true,''','''                Err(_) => p.failed = true,'''),
  ('userptr.rs','''            Ok(t) => p.push(t),
            Err(e) if e == EBUSY => p.deferred_tlb = true,
            Err(_) => p.failed = true,
        }
        Begin::Started(p)''','''            Ok(t) => p.push(t),
            Err(_) => p.failed = true,
        }
        Begin::Started(p)''')])
mut('hole4-streaming-dma','Hole 4: SVM pages reach the device as streaming DMA addresses',
 'Pages::commit hands the device dma_map_page() addresses instead of guest-physical ones (as the driver at f5648d7 did): under bounce buffering (swiotlb=force) the GPU reads and writes a bounce buffer, not the CPU\'s page.',
 ['gpus=2 kernel-args=swiotlb=force only=svm_mode_shared'],
 [('svm_pages.rs','''        hmm::page_addresses(pfns, addrs)?;''','''        hmm::page_addresses(pfns, addrs)?;
        let dev = core::ptr::from_ref::<kernel::device::Device>(self.vm.gpu.dma_device())
            .cast::<kernel::bindings::device>()
            .cast_mut();
        for (a, &p) in addrs.iter_mut().zip(pfns) {
            // SAFETY: A mutant: maps a valid page of `hmm_range_fault` for the device.
            *a = unsafe {
                kernel::bindings::dma_map_page_attrs(
                    dev,
                    kernel::bindings::hmm_pfn_to_page(p),
                    0,
                    4096,
                    kernel::bindings::dma_data_direction::DMA_BIDIRECTIONAL,
                    0,
                )
            };
        }'''),
  ('gpu/mod.rs','''impl Gpu {
    /// The test hook''','''impl Gpu {
    pub(crate) fn dma_device(&self) -> &device::Device {
        &self.dma_dev
    }

    /// The test hook''')])
mut('hole5-chunk-over-binding','Hole 5: SVM chunks ignore the VM\'s bindings',
 'A GPU fault next to a binding makes a 2 MiB chunk that overlaps it and fails with EFAULT, for good (the driver at f5648d7).',
 ['gpus=1 only=svm_next_to_binding'],
 [('svm.rs','''        .find(|&(s, e)| s >= lo && e <= hi && !avoid(s as u64, (e - s) as u64))''','''        .find(|&(s, e)| s >= lo && e <= hi && (true || !avoid(s as u64, (e - s) as u64)))'''),
  ('svm.rs','''                self.evict(start)?;
                continue;
            }
            match self.populate''','''                if in_binding(start as u64, (end - start) as u64) {
                    return Err(EFAULT);
                }
                self.evict(start)?;
                continue;
            }
            match self.populate''')])
mut('userptr-unbind-no-wait','VM_BIND unmap does not wait for the TLB invalidation',
 'unbind() starts the TLB_INVALIDATE and returns at once (the pages are the process\'s to free again while the device still translates to them).',
 [LAT+' only=coherence_after_syscall'],
 [('vm.rs','''            .and_then(|t| {
                after = t.seqno();
                ctrl.wait(t)
            });''','''            .map(|t| {
                after = t.seqno();
                core::mem::forget(t);
                crate::ctrl::AsyncDone {
                    status: wire::Status::Ok.as_u32(),
                    value: 0,
                }
            });''')])
mut('exec-skips-revalidation','EXEC submits without revalidating userptr bindings',
 'exec() neither revalidates invalidated bindings nor checks their notifier sequence before queueing the job.',
 ['gpus=1 only=userptr_invalidate_mprotect'],
 [('vm.rs','''            if !self.fault_mode {
                for e in vs.entries.iter_mut() {''','''            if false {
                for e in vs.entries.iter_mut() {'''),
  ('vm.rs','''            if !self.fault_mode
                && vs.entries.iter().any(|e| {''','''            if false
                && vs.entries.iter().any(|e| {''')])

mut('svm-notifiers-never-pruned','SVM notifiers stay until teardown',
 'The garbage collector removes unmapped ranges but never the notifiers left without a range: every interval the process ever touched keeps a notifier until its last fault-mode VM goes.',
 ['gpus=1 only=svm_mode_shared'],
 [('svm.rs','''        if collected {
            self.prune_notifiers();
        }''','''        if collected && false {
            self.prune_notifiers();
        }''')])

# The second SVM implementation (svm_impl=gpusvm, gpusvm_svm.rs on the kernel's
# drm_gpusvm): the same bugs where it has them, killed by the same tests run against it.
G='module-args=svm_impl=gpusvm'
mut('gpusvm-second-pass-no-wait','gpusvm: the second pass does not wait for the devices',
 'complete() of the drm_gpusvm notifier takes the tickets and forgets them: the invalidation returns before any device finished its TLB invalidation.',
 [LAT+' '+G+' only=coherence_after_syscall'],
 [('gpusvm_svm.rs','''        let ticket = if t.failed { None } else { t.ticket.take() };
        finish_tlb_invalidate(&t.vm, ticket);''','''        let ticket = if t.failed { None } else { t.ticket.take() };
        core::mem::forget(ticket);''')])
mut('gpusvm-one-device-skipped','gpusvm: one device of N is not invalidated',
 'The first pass of the shared drm_gpusvm notifier starts (and the second waits for) the TLB invalidation of the first device it tracks only; the others keep their stale translations.',
 [LAT+' '+G+' only=coherence_after_syscall'],
 [('gpusvm_svm.rs','''    // Start every device before anyone waits (without sleeping under the lock).
    for t in p.targets.iter_mut().flatten() {''','''    // Start every device before anyone waits (without sleeping under the lock).
    for t in p.targets.iter_mut().flatten().take(1) {''')])
mut('gpusvm-ptes-cleared-no-flush','gpusvm: PTEs cleared, TLB never invalidated',
 'The first pass invalidates the drm_gpusvm pages and clears the PTEs but starts no TLB_INVALIDATE: whatever the TLBs hold stays usable.',
 [LAT+' '+G+' only=coherence_after_syscall'],
 [('gpusvm_svm.rs','''        match start_tlb_invalidate(&t.vm, t.start, t.end, false) {
            Ok(tk) => t.ticket = Some(tk),
            Err(e) if e == EBUSY => t.deferred = true,
            Err(_) => t.failed = true,
        }
    }
    if gc {''','''        let _ = t;
    }
    if gc {''')])
mut('gpusvm-readonly-mapped-writable','gpusvm: a read-only (or COW-shared) page is mapped writable',
 'Pages got without write access (drm_gpusvm_get_pages with read_only: COW pages stay shared) are committed into writable PTEs: the GPU writes memory the CPU protects, or a page a forked child shares.',
 ['gpus=1 '+G+' only=svm_mode_shared'],
 [('gpusvm_svm.rs','''                    let r = pt.map(start as u64, &addrs, writable, &mut pre);''','''                    let r = pt.map(start as u64, &addrs, true, &mut pre);'''),
  ('gpusvm_svm.rs','''        let writable = fl & vmf::WRITE != 0;
        if write && !writable {
            return Err(EACCES);
        }''','''        let writable = fl & vmf::WRITE != 0;''')])
mut('gpusvm-unmapped-pages-stay-valid','gpusvm: pages got but not yet committed survive an invalidation',
 'The first pass skips the pages whose device has no PTEs for them (got by drm_gpusvm_get_pages, not committed yet) instead of unmapping them: they stay valid, and the fault commits the addresses of pages the CPU just freed.',
 ['gpus=1 '+G+' only=revalidation_races_invalidation', 'gpus=2 '+G+' only=svm_mode_shared'],
 [('gpusvm_svm.rs','''            if !d.busy() {
                // The device never mapped these pages: no need to stop it.
                pg.unmap_locked(g);
                continue;
            }''','''            if !d.busy() {
                continue;
            }''')])
mut('gpusvm-unmap-left-to-gc','gpusvm: the garbage collector drops unmapped ranges without invalidating',
 'On MMU_NOTIFY_UNMAP the first pass only marks the ranges unmapped (drm_gpusvm_range_set_unmapped) and queues the garbage collector, which removes them without clearing PTEs or invalidating TLBs: the GPU keeps writing the unmapped pages.',
 [LAT+' '+G+' only=coherence_after_syscall'],
 [('gpusvm_svm.rs','''        if unmap {
            inv.set_unmapped(r);
            gc = true;
        }''','''        if unmap {
            inv.set_unmapped(r);
            gc = true;
            continue;
        }''')])
mut('gpusvm-chunk-over-binding','gpusvm: ranges ignore the VM\'s bindings',
 'The GPU VA range given to drm_gpusvm_range_find_or_insert is always the 2 MiB chunk around the fault: a fault next to a binding makes a range that overlaps it and fails with EFAULT, for good.',
 ['gpus=1 '+G+' only=svm_next_to_binding'],
 [('gpusvm_svm.rs','''        .find(|r| !avoid(r.start as u64, (r.end - r.start) as u64))''','''        .find(|r| true || !avoid(r.start as u64, (r.end - r.start) as u64))'''),
  ('gpusvm_svm.rs','''                self.evict(&range)?;
                continue;''','''                if in_binding(start as u64, (end - start) as u64) {
                    return Err(EFAULT);
                }
                self.evict(&range)?;
                continue;''')])

mut('exec-ignores-in-syncobjs','EXEC does not wait for its in-syncobjs',
 'The in-fences are looked up but never waited for: a job that should run after another queue\'s job (its out-syncobj given as the in-syncobj) runs at once, and reads what the earlier job has not written yet.',
 ['gpus=2 only=in_syncobj_orders_jobs_across_queues'],
 [('drm_driver.rs','''        syncs.wait()?;
''','''        let _ = &syncs;
''')])
mut('job-fence-error-dropped','A failed job\'s dma_fence signals success',
 'The job fence is signalled when the job\'s outcome is known, but without its error: WAIT still reports -EFAULT, while the out-syncobj, its sync_file and every other waiter of the dma_fence see a job that succeeded.',
 ['gpus=1 only=failed_job_fence_carries_error', 'gpus=1 only=kunit_suites_pass'],
 [('fence.rs','''            fence.signal(o.result());''','''            let _ = o;
            fence.signal(Ok(()));''')])
mut('job-fence-signalled-on-acceptance','A job\'s dma_fence signals when the device accepts the job',
 'end_submit() signals the job\'s dma_fence as soon as JOB_SUBMIT is answered, not when the job completes: syncobj waits return, and jobs waiting for it start, while the job is still running.',
 ['gpus=1 only=out_syncobj_binary_signals_on_completion', 'gpus=2 only=in_syncobj_orders_jobs_across_queues'],
 [('fence.rs','''        if accepted {
            s.submitted = s.submitted.max(seqno);
            return;''','''        if accepted {
            s.submitted = s.submitted.max(seqno);
            let n = s.npending;
            if let Some(j) = s.pending[..n].iter_mut().find(|j| j.seqno == seqno) {
                if let Some(f) = j.fence.take() {
                    f.signal(Ok(()));
                }
            }
            return;''')])

def main():
    check = '--check' in sys.argv[1:]
    src = os.path.join(ROOT, K)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, title, why, kills, edits) in enumerate(M, 1):
            a = os.path.join(tmp, 'a', K)
            b = os.path.join(tmp, 'b', K)
            for d in (a, b):
                shutil.rmtree(os.path.join(tmp, d.split(os.sep)[-4]), ignore_errors=True)
            shutil.copytree(src, a, ignore=shutil.ignore_patterns('*.o', '*.ko', '.*', '*.mod*', 'modules.order', 'Module.symvers'))
            shutil.copytree(a, b)
            ok = True
            for f, old, new in edits:
                p = os.path.join(b, f)
                text = open(p).read()
                if text.count(old) != 1:
                    print(f'{i:02d}-{name}: the search text in {f} is found {text.count(old)} times, not once', file=sys.stderr)
                    ok = False
                    continue
                open(p, 'w').write(text.replace(old, new))
            if not ok:
                bad += 1
                continue
            if check:
                continue
            diff = subprocess.run(['git', 'diff', '--no-index', '--no-prefix', '--', 'a/' + K, 'b/' + K],
                                  cwd=tmp, capture_output=True, text=True).stdout
            hdr = f"Mutant: {title}\n" + "\n".join(textwrap.wrap(why, 88)) + "\n" \
                + "".join(f"Kills: {k}\n" for k in kills) + "\n"
            open(os.path.join(OUT, f"{i:02d}-{name}.patch"), 'w').write(hdr + diff)
    print(f'{len(M)} mutants, {bad} that no longer apply' + ('' if check else ', patches written'))
    sys.exit(1 if bad else 0)


if __name__ == '__main__':
    main()
