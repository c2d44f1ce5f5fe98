/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR BSD-3-Clause */
/*
 * svmgpu DRM uAPI: one render node (/dev/dri/renderD*) per svmgpu device.
 *
 * This file is the single source of truth: scripts/build-kernel.sh copies it into the
 * guest kernel tree as include/uapi/drm/svmgpu_drm.h, where the kernel's Rust `uapi`
 * crate picks it up (rust/uapi/uapi_helper.h, see guest-driver/kernel/patches), and the
 * Rust userspace crate guest-driver/user mirrors it (its tests pin every size).
 *
 * Model
 * -----
 * - A *VM* is a GPU virtual address space (48-bit VAs) on one device: an ASID with a
 *   4-level page table in guest memory that the driver builds. A VM is created in
 *   *fault mode* or not:
 *   - not fault mode: VM_BIND faults the CPU pages in at bind time (and fails with EFAULT
 *     if they are not there); EXEC revalidates every binding whose CPU pages were
 *     invalidated since (MMU notifier) before the job is queued;
 *   - fault mode: the VM *shares the virtual memory* (SVM) of the process that created
 *     it: with no bind at all, a GPU access at any address is an access to the CPU
 *     address space of that process (malloc, mmap, stack, shared and file mappings),
 *     populated on demand by the device's recoverable page faults and kept coherent with
 *     the CPU page tables; the same memory may be used by several devices at once (one
 *     SVM range, one set of pages per device). VM_BIND still works and records a
 *     binding that takes precedence over SVM for its VA range (populated on the first
 *     GPU access). A GPU access to an address the process does not map (or a binding
 *     whose CPU pages cannot be faulted in) fails the job with -EFAULT; a GPU write or
 *     atomic to memory the process maps read-only (SVM) fails it with -EACCES.
 *     VM_PREFETCH populates an SVM range ahead of use.
 * - An *exec queue* is a device context on one VM. Jobs of one queue run in submission
 *   order. A *long-running* queue is preempted (not waited for) when CPU pages it may use
 *   are invalidated, and resumed once they are bound again.
 * - A *binding* maps [va, va + size) of a VM to the CPU range [userptr, userptr + size)
 *   of the calling process, without pinning: the driver follows the CPU page tables
 *   through an MMU interval notifier (munmap, mprotect, madvise, fork/COW, migration...).
 * - EXEC returns a *fence*: a per-queue sequence number, signalled when the job (and
 *   every earlier job of the queue) completed. WAIT waits for one with a timeout and
 *   reports the job's outcome.
 * - The same completion is a standard dma_fence (one fence context per exec queue, the
 *   fence's seqno is the job's fence, its error the outcome WAIT reports), which EXEC
 *   installs in *out-syncobjs*; EXEC also takes *in-syncobjs* whose fences the job waits
 *   for (struct drm_svmgpu_sync). The DRM core's syncobj ioctls then work as for any
 *   GPU: DRM_IOCTL_SYNCOBJ_WAIT / TIMELINE_WAIT, export as a sync_file
 *   (DRM_IOCTL_SYNCOBJ_HANDLE_TO_FD with DRM_SYNCOBJ_HANDLE_TO_FD_FLAGS_EXPORT_SYNC_FILE)
 *   for poll() or another driver, import, transfer between binary and timeline syncobjs.
 *   DRM_IOCTL_VERSION reports 0.2.0 from this version on (0.1.0: EXEC without syncs;
 *   its shorter struct is still accepted, as the DRM core zero-extends it).
 *
 * Every ioctl validates all its arguments: undefined flags and nonzero padding or
 * reserved fields are EINVAL; so is a nonzero @extensions (the create ioctls carry a
 * chain pointer, as xe's do, so that later versions can extend them: this version
 * defines no extension); unknown VM/queue ids are ENOENT; ENODEV means the device was
 * removed, or the driver gave it up after a failed reset (the file stays usable only
 * for closing); EFAULT means the argument pointer itself is bad (and for VM_BIND also
 * the CPU range, see there); ERESTARTSYS/EINTR a signal arrived. An ioctl that fails
 * has no effect. An ioctl number this header does not define is EINVAL (the DRM core's
 * answer).
 *
 * Recovery (spec/svmgpu.md 6.16.2, guest-driver/README.md "Recovery")
 * ---------------------------------------------------------------------
 * - Device reset: when the device resets itself, or the driver resets it (an invalidation
 *   or preemption that failed or did not complete in 5 s, a hung context that could not be
 *   destroyed), every job without a completion fails with -EIO and every exec queue of the
 *   device is lost: EXEC on it is EIO, destroy it and create a new one. VMs survive (their
 *   bindings and page tables stay valid). While the device resets itself, commands are
 *   retried for up to 5 s before an ioctl fails with EAGAIN.
 * - Hang: a job that makes no progress (the device reports ENGINE_HANG, or the driver's
 *   job timeout expires: 10 s in which no job of the queue completed and none raised or
 *   had resolved a GPU page fault, settable in debugfs svmgpu/virtioN/job_timeout_ms)
 *   fails with -ETIMEDOUT, the jobs queued behind
 *   it with -ECANCELED, and its queue is banned: EXEC on it is ECANCELED.
 * - Ban: after SVMGPU_HANG_BAN_LIMIT hangs of its jobs, an open file is banned:
 *   EXEC_QUEUE_CREATE and EXEC are ECANCELED (open the render node again).
 */
#ifndef _UAPI_SVMGPU_DRM_H_
#define _UAPI_SVMGPU_DRM_H_

#include "drm.h"

#if defined(__cplusplus)
extern "C" {
#endif

/* Size of the device config space and of a GET_INFO response body (spec/svmgpu.md). */
#define SVMGPU_CONFIG_SIZE 64
#define SVMGPU_INFO_SIZE 40
/*
 * Room for GET_STATS counters in DEVICE_QUERY (spec/svmgpu.md, "Statistics"): the
 * device's counters in spec order, then zeros.
 */
#define SVMGPU_NUM_STATS 48

/* Notifier modes (module parameter notifier_mode=single|twopass). */
#define SVMGPU_NOTIFIER_SINGLE 0
#define SVMGPU_NOTIFIER_TWOPASS 1

/*
 * SVM modes (module parameter svm_mode=single|per_device|shared, readable in
 * /sys/module/svmgpu/parameters/svm_mode): how CPU invalidations of SVM memory stop the
 * devices that mirror it.
 * - SINGLE: one SVM object per process and device, single-pass MMU notifiers: each
 *   device is stopped (PTEs cleared, TLB invalidated and waited for) in turn;
 * - PER_DEVICE: one SVM object per process and device, two-pass notifiers: the core
 *   starts every device's invalidation before waiting for any;
 * - SHARED (default): one SVM object per process shared by every device, one notifier
 *   per interval whose first pass starts the invalidation on every device with valid
 *   pages and whose second pass waits for all of them.
 */
#define SVMGPU_SVM_SINGLE 0
#define SVMGPU_SVM_PER_DEVICE 1
#define SVMGPU_SVM_SHARED 2

/* DEVICE_QUERY flags. */
#define SVMGPU_QUERY_F_STATS (1u << 0) /* also fetch the device's GET_STATS counters */

/**
 * struct drm_svmgpu_device_query - DRM_IOCTL_SVMGPU_DEVICE_QUERY
 * @flags: in: SVMGPU_QUERY_F_*.
 * @bus_index: out: N of the device's virtioN name on the virtio bus.
 * @round_trip_ns: out: time of a GET_INFO command this call sent to the device.
 * @features: out: the virtio feature bits the driver negotiated.
 * @notifier_mode: out: SVMGPU_NOTIFIER_* in use (userptr bindings).
 * @svm_mode: out: SVMGPU_SVM_* in use (fault-mode VMs).
 * @invalidations: out: MMU-notifier invalidations that had to stop this device
 *   (TLB invalidation and/or preemption) since the driver bound it.
 * @invalidation_ns: out: total time from the start of those invalidations (first pass)
 *   to the end of their wait (second pass, or the single pass).
 * @gpu_faults: out: GPU page faults the driver handled.
 * @gpu_faults_failed: out: of those, the ones answered CANCEL (the job got -EFAULT).
 * @config: out: the config space, raw (little-endian), as read at probe.
 * @info: out: the body of the GET_INFO response the device sent for this call.
 * @stats: out (with SVMGPU_QUERY_F_STATS, else zero): the GET_STATS counters, in the
 *   order of the spec; entries past the device's counters are zero.
 * @fault_service_ns: out: total time of the @gpu_faults, each from the arrival of its
 *   PAGE_FAULT event to the FAULT_REPLY the driver sent for it (handed to the device).
 * @svm_faults: out: of @gpu_faults, the ones resolved through SVM (no binding).
 * @svm_pages: out: SVM pages objects (one range mirrored by one VM) of this device now.
 * @fault_ack_ns: out: total time of the @gpu_faults' FAULT_REPLYs, each from its hand-over
 *   to the device's answer (the device resumes the context, then answers).
 * @svm_ranges_collected: out: SVM ranges this device mirrored that the garbage collector
 *   removed after a CPU unmap, since the driver bound the device.
 * @reserved: in: zero (EINVAL otherwise); out: zero.
 *
 * Every counter is this device's (module-wide SVM figures are in debugfs,
 * svmgpu/svm_ranges, for root only: they would tell any opener about other processes).
 *
 * Errors: EINVAL (undefined flag, nonzero @reserved), ETIMEDOUT (the device did not
 * answer in 5 s), EIO (it answered with an error or a malformed response), EBUSY (every
 * command slot in use), ENODEV.
 */
struct drm_svmgpu_device_query {
	__u32 flags;
	__u32 bus_index;
	__u64 round_trip_ns;
	__u64 features;
	__u32 notifier_mode;
	__u32 svm_mode;
	__u64 invalidations;
	__u64 invalidation_ns;
	__u64 gpu_faults;
	__u64 gpu_faults_failed;
	__u8 config[SVMGPU_CONFIG_SIZE];
	__u8 info[SVMGPU_INFO_SIZE];
	__u64 stats[SVMGPU_NUM_STATS];
	__u64 fault_service_ns;
	__u64 svm_faults;
	__u64 svm_pages;
	__u64 fault_ack_ns;
	__u64 svm_ranges_collected;
	__u64 reserved[3];
};

/* VM_CREATE flags. */
#define SVMGPU_VM_CREATE_FAULT_MODE (1u << 0)

/**
 * struct drm_svmgpu_vm_create - DRM_IOCTL_SVMGPU_VM_CREATE
 * @extensions: in: zero (a chain of extensions in later versions).
 * @flags: in: SVMGPU_VM_CREATE_*.
 * @vm_id: out: the new VM's id (nonzero, unique within the file).
 *
 * Errors: EINVAL (undefined flag, nonzero @extensions), ENOSPC (every device ASID is in
 * use), ENOMEM, EIO / ETIMEDOUT (the device refused or did not answer ASID_BIND),
 * ENODEV.
 */
struct drm_svmgpu_vm_create {
	__u64 extensions;
	__u32 flags;
	__u32 vm_id;
};

/**
 * struct drm_svmgpu_vm_destroy - DRM_IOCTL_SVMGPU_VM_DESTROY
 * @vm_id: in: the VM.
 * @pad: zero.
 *
 * Unbinds everything still bound (with TLB invalidation), releases the ASID and the page
 * tables. Errors: EINVAL (pad), ENOENT (no such VM), EBUSY (exec queues still use it).
 */
struct drm_svmgpu_vm_destroy {
	__u32 vm_id;
	__u32 pad;
};

/* Hangs of an open file's jobs after which the file is banned (ECANCELED). */
#define SVMGPU_HANG_BAN_LIMIT 3

/* EXEC_QUEUE_CREATE flags. */
#define SVMGPU_EXEC_QUEUE_LONG_RUNNING (1u << 0)

/**
 * struct drm_svmgpu_exec_queue_create - DRM_IOCTL_SVMGPU_EXEC_QUEUE_CREATE
 * @extensions: in: zero (a chain of extensions in later versions).
 * @vm_id: in: the VM the queue's jobs run in.
 * @flags: in: SVMGPU_EXEC_QUEUE_*.
 * @queue_id: out: the new queue's id (nonzero, unique within the file).
 * @pad: zero.
 *
 * Errors: EINVAL (flag, pad, nonzero @extensions), ENOENT (no such VM), ENOSPC (every
 * device context is in use, or the VM has 16 long-running queues already), ENOMEM,
 * EIO/ETIMEDOUT (CTX_CREATE failed), EAGAIN (the device is resetting itself: retry),
 * ECANCELED (the file is banned after SVMGPU_HANG_BAN_LIMIT hangs), ENODEV.
 */
struct drm_svmgpu_exec_queue_create {
	__u64 extensions;
	__u32 vm_id;
	__u32 flags;
	__u32 queue_id;
	__u32 pad;
};

/**
 * struct drm_svmgpu_exec_queue_destroy - DRM_IOCTL_SVMGPU_EXEC_QUEUE_DESTROY
 * @queue_id: in: the queue.
 * @pad: zero.
 *
 * Stops the queue's context (jobs still queued or running are discarded: their fences
 * signal with -ECANCELED). Errors: EINVAL (pad), ENOENT (no such queue).
 */
struct drm_svmgpu_exec_queue_destroy {
	__u32 queue_id;
	__u32 pad;
};

/* VM_BIND operations. */
#define SVMGPU_VM_BIND_OP_MAP_USERPTR 1
#define SVMGPU_VM_BIND_OP_UNMAP 2
/* VM_BIND flags (MAP_USERPTR only). */
#define SVMGPU_VM_BIND_F_READONLY (1u << 0) /* GPU writes and atomics fault (-EFAULT) */

/* Largest single binding. */
#define SVMGPU_MAX_BIND_SIZE (1ull << 30)

/**
 * struct drm_svmgpu_vm_bind - DRM_IOCTL_SVMGPU_VM_BIND
 * @vm_id: in: the VM.
 * @op: in: SVMGPU_VM_BIND_OP_*.
 * @flags: in: SVMGPU_VM_BIND_F_* (zero for UNMAP).
 * @pad: zero.
 * @va: in: GPU virtual address, 4 KiB aligned.
 * @size: in: bytes, a nonzero multiple of 4 KiB, at most SVMGPU_MAX_BIND_SIZE, with
 *   va + size <= 2^48.
 * @userptr: in (MAP_USERPTR): CPU address of the calling process, 4 KiB aligned; zero
 *   for UNMAP.
 *
 * MAP_USERPTR binds [va, va + size) to the CPU range (anonymous, shared or file memory;
 * not pinned). UNMAP removes the binding that starts at @va and has exactly @size
 * (partial unmaps are not supported), clears its PTEs and waits for the TLB
 * invalidation before returning.
 *
 * Errors: EINVAL (op, flag, pad, alignment, zero or oversized size, VA range, nonzero
 * userptr for UNMAP), ENOENT (no such VM; UNMAP: no binding with this @va and @size),
 * EEXIST (MAP: the range overlaps an existing binding), EFAULT (MAP, not fault mode:
 * the CPU range is not entirely mapped with the needed access, e.g. a hole or, without
 * READONLY, a read-only mapping), ENOMEM, ETIMEDOUT/EIO (the device did not complete
 * the TLB invalidation; the device is then reset), EAGAIN (CPU invalidations kept racing
 * with the bind: retry), ENODEV.
 */
struct drm_svmgpu_vm_bind {
	__u32 vm_id;
	__u32 op;
	__u32 flags;
	__u32 pad;
	__u64 va;
	__u64 size;
	__u64 userptr;
};

/* Largest batch (spec: MAX_BATCH_LEN). */
#define SVMGPU_MAX_BATCH_LEN (1u << 24)

/* struct drm_svmgpu_sync flags. */
#define SVMGPU_SYNC_SIGNAL (1u << 0) /* out-syncobj: signalled by the job; else in: waited for */

/* Most syncobjs one EXEC takes (in and out together). */
#define SVMGPU_MAX_SYNCS 64

/**
 * struct drm_svmgpu_sync - a syncobj an EXEC waits for or signals
 * @handle: in: a syncobj handle of the calling file (DRM_IOCTL_SYNCOBJ_CREATE).
 * @flags: in: SVMGPU_SYNC_*.
 * @point: in: a timeline point (nonzero: the syncobj is used as a timeline), or 0 (a
 *   binary syncobj: its one fence).
 *
 * An in-syncobj (no SVMGPU_SYNC_SIGNAL): the job runs only after the fence it holds (at
 * @point) signalled, whatever that fence's outcome. The fence must exist when EXEC is
 * called: a binary syncobj without a fence, or a timeline point not yet submitted, is
 * EINVAL (as in xe and the drm_sched drivers; wait-before-signal is user space's job).
 * An out-syncobj (SVMGPU_SYNC_SIGNAL): once the job is queued, its fence replaces the
 * syncobj's (binary), or is added to the timeline at @point (points should increase: the
 * DRM core accepts an earlier one, but a timeline query may then report 0).
 */
struct drm_svmgpu_sync {
	__u32 handle;
	__u32 flags;
	__u64 point;
};

/**
 * struct drm_svmgpu_exec - DRM_IOCTL_SVMGPU_EXEC
 * @queue_id: in: the exec queue.
 * @flags: in: zero.
 * @batch_va: in: GPU VA of the batch (spec/svmgpu.md, "Command-stream ISA"), 8-byte
 *   aligned; the batch lives in memory the VM binds.
 * @batch_len: in: bytes, a nonzero multiple of 8, at most SVMGPU_MAX_BATCH_LEN.
 * @pad: zero.
 * @fence: out: the job's fence, for WAIT (increasing per queue).
 * @syncs: in: user pointer to @num_syncs struct drm_svmgpu_sync (in- and out-syncobjs),
 *   or 0 with @num_syncs 0.
 * @num_syncs: in: at most SVMGPU_MAX_SYNCS.
 * @pad2: zero.
 *
 * The call first looks up every syncobj (and the fences of the in-syncobjs), then waits
 * (interruptibly, without a timeout, before anything else happens) until every in-fence
 * signalled: the device has no job dependencies, so the driver holds the job back
 * itself. Then, not fault mode: it revalidates every binding of the VM whose CPU pages
 * were invalidated (faulting them in again) and queues the job only if no invalidation
 * raced with that (the VM_BIND locking rules; it retries otherwise). Once the job is
 * queued, its fence is installed in every out-syncobj; nothing can fail after that.
 *
 * Errors: EINVAL (flags, pad, pad2, alignment, length, VA range, @num_syncs, a sync's
 * flags, an in-syncobj without a fence at @point), ENOENT (no such queue, an unknown
 * syncobj handle), EFAULT (@syncs unreadable; not fault mode: a binding's CPU range is no
 * longer mapped, unbind it),
 * EIO (the queue is in the error state after a failed job, or was lost in a device
 * reset: destroy it), ECANCELED (a job of the queue hung: the queue is banned, destroy
 * it; or the file is banned after SVMGPU_HANG_BAN_LIMIT hangs), EBUSY (64 jobs already
 * queued on it: wait for a fence first), EAGAIN (CPU invalidations kept racing with the
 * revalidation, or the device is resetting itself: retry), ETIMEDOUT, ENOMEM, ENODEV,
 * ERESTARTSYS.
 */
struct drm_svmgpu_exec {
	__u32 queue_id;
	__u32 flags;
	__u64 batch_va;
	__u32 batch_len;
	__u32 pad;
	__u64 fence;
	__u64 syncs;
	__u32 num_syncs;
	__u32 pad2;
};

/**
 * struct drm_svmgpu_wait - DRM_IOCTL_SVMGPU_WAIT
 * @queue_id: in: the exec queue the fence belongs to.
 * @flags: in: zero.
 * @fence: in: a fence EXEC returned for this queue.
 * @timeout_ns: in: how long to wait, relative; 0 only polls. out, when the wait was
 *   interrupted by a signal (ERESTARTSYS, seen as EINTR without SA_RESTART): the time
 *   that was left, so that calling again with the same argument (as the kernel's restart
 *   and libdrm's drmIoctl do) waits no longer than the original timeout.
 * @error: out: the fence's outcome when the ioctl returns 0: 0 (the job ran to END),
 *   -EFAULT (a GPU access had no valid CPU mapping: unbound address, munmapped memory,
 *   write to a read-only binding; fault mode: an address the process does not map),
 *   -EACCES (fault mode, SVM: a GPU write or atomic to memory the process maps read-only,
 *   e.g. PROT_READ or a read-only file mapping), -EIO (another job error, @job_status
 *   tells which, or lost in a device reset, @job_status 0), -ETIMEDOUT (the job hung:
 *   ENGINE_HANG or the driver's job timeout), -ECANCELED (not run: an earlier job of the
 *   queue failed or hung, or the queue was destroyed), -ENODEV (the device was removed or
 *   given up).
 * @job_status: out: the device's status code for the job (spec/svmgpu.md, section 6.3.4),
 *   0 if it succeeded or the driver failed it itself.
 *
 * Errors: EINVAL (flags, negative timeout, fence 0 or never returned by this queue),
 * ENOENT (no such queue), ETIME (not signalled within the timeout), ERESTARTSYS.
 */
struct drm_svmgpu_wait {
	__u32 queue_id;
	__u32 flags;
	__u64 fence;
	__s64 timeout_ns;
	__s32 error;
	__u32 job_status;
};

/* VM_PREFETCH flags. */
#define SVMGPU_VM_PREFETCH_F_WRITE (1u << 0) /* also require (and make) the pages writable */

/**
 * struct drm_svmgpu_vm_prefetch - DRM_IOCTL_SVMGPU_VM_PREFETCH
 * @vm_id: in: a fault-mode VM.
 * @flags: in: SVMGPU_VM_PREFETCH_F_*.
 * @start: in: CPU (= GPU) address of the calling process, 4 KiB aligned.
 * @size: in: bytes, a nonzero multiple of 4 KiB, at most SVMGPU_MAX_BIND_SIZE, with
 *   start + size <= 2^48.
 *
 * Populates the VM's SVM ranges covering [start, start + size) as GPU page faults would
 * (CPU pages faulted in, writable where the CPU maps them writable, DMA-mapped for this
 * device, PTEs written), so that later GPU accesses do not fault. The mapping stays
 * coherent with the CPU (a later invalidation simply makes the GPU fault again).
 * Addresses covered by a binding (VM_BIND) are skipped.
 *
 * Errors: EINVAL (flags, alignment, size, VA range, the VM is not in fault mode, or the
 * calling process is not the one that created the VM), ENOENT (no such VM), EFAULT (part
 * of the range is not mapped by the process, or not readable; with F_WRITE, not
 * writable), ENOMEM, EAGAIN (CPU invalidations kept racing: retry), ENODEV.
 */
struct drm_svmgpu_vm_prefetch {
	__u32 vm_id;
	__u32 flags;
	__u64 start;
	__u64 size;
};

#define DRM_SVMGPU_DEVICE_QUERY 0x00
#define DRM_SVMGPU_VM_CREATE 0x01
#define DRM_SVMGPU_VM_DESTROY 0x02
#define DRM_SVMGPU_EXEC_QUEUE_CREATE 0x03
#define DRM_SVMGPU_EXEC_QUEUE_DESTROY 0x04
#define DRM_SVMGPU_VM_BIND 0x05
#define DRM_SVMGPU_EXEC 0x06
#define DRM_SVMGPU_WAIT 0x07
#define DRM_SVMGPU_VM_PREFETCH 0x08

/* Note: an enum so that Rust bindgen can evaluate the ioctl numbers. */
enum {
	DRM_IOCTL_SVMGPU_DEVICE_QUERY = DRM_IOWR(DRM_COMMAND_BASE + DRM_SVMGPU_DEVICE_QUERY,
						 struct drm_svmgpu_device_query),
	DRM_IOCTL_SVMGPU_VM_CREATE = DRM_IOWR(DRM_COMMAND_BASE + DRM_SVMGPU_VM_CREATE,
					      struct drm_svmgpu_vm_create),
	DRM_IOCTL_SVMGPU_VM_DESTROY = DRM_IOW(DRM_COMMAND_BASE + DRM_SVMGPU_VM_DESTROY,
					      struct drm_svmgpu_vm_destroy),
	DRM_IOCTL_SVMGPU_EXEC_QUEUE_CREATE = DRM_IOWR(DRM_COMMAND_BASE + DRM_SVMGPU_EXEC_QUEUE_CREATE,
						      struct drm_svmgpu_exec_queue_create),
	DRM_IOCTL_SVMGPU_EXEC_QUEUE_DESTROY = DRM_IOW(DRM_COMMAND_BASE + DRM_SVMGPU_EXEC_QUEUE_DESTROY,
						      struct drm_svmgpu_exec_queue_destroy),
	DRM_IOCTL_SVMGPU_VM_BIND = DRM_IOW(DRM_COMMAND_BASE + DRM_SVMGPU_VM_BIND,
					   struct drm_svmgpu_vm_bind),
	DRM_IOCTL_SVMGPU_EXEC = DRM_IOWR(DRM_COMMAND_BASE + DRM_SVMGPU_EXEC,
					 struct drm_svmgpu_exec),
	DRM_IOCTL_SVMGPU_WAIT = DRM_IOWR(DRM_COMMAND_BASE + DRM_SVMGPU_WAIT,
					 struct drm_svmgpu_wait),
	DRM_IOCTL_SVMGPU_VM_PREFETCH = DRM_IOW(DRM_COMMAND_BASE + DRM_SVMGPU_VM_PREFETCH,
					       struct drm_svmgpu_vm_prefetch),
};

#if defined(__cplusplus)
}
#endif

#endif /* _UAPI_SVMGPU_DRM_H_ */
