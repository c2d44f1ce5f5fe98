// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
/*
 * svmgpu-client: a small IGT-style C client of the svmgpu DRM uAPI, written only against
 * guest-driver/uapi/svmgpu_drm.h and libdrm's drm.h (Debian's libdrm-dev), so that every
 * change of the header is proven usable from C. Built statically by scripts/build-guest.sh
 * (in the initramfs as /bin/svmgpu-client) and run by scripts/test.sh on 2 vGPUs.
 *
 * For every render node: DRM_IOCTL_VERSION names "svmgpu"; DEVICE_QUERY answers; a
 * fault-mode VM runs a batch (itself in malloc'ed memory, no bind) that fills malloc'ed
 * memory and checksums an mmap'ed buffer the CPU wrote; a second VM (not fault mode) uses
 * userptr bindings for its batch and data; documented errors (EINVAL, ENOENT, EEXIST,
 * EBUSY, job -EFAULT) are checked; job completion through DRM syncobjs (the core's
 * DRM_IOCTL_SYNCOBJ_* ioctls, raw: no libdrm call): a binary out-syncobj and
 * DRM_IOCTL_SYNCOBJ_WAIT, a timeline point and DRM_IOCTL_SYNCOBJ_TIMELINE_WAIT, the fence
 * exported as a sync_file and poll()ed, an in-syncobj ordering two queues, a failed job's
 * fence error (SYNC_IOC_FILE_INFO). Prints KTAP v1 (stdout, or --out FILE); exits 1 on any
 * failure.
 *
 *   svmgpu-client [--gpus N] [--out FILE]     N: the number of render nodes expected
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/sync_file.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "svmgpu_drm.h"

/* Command-stream ISA (spec/svmgpu.md, section 6.13). */
#define OP_END 0x02
#define OP_STORE 0x03
#define OP_FILL 0x04
#define OP_COPY 0x05
#define OP_ATOMIC_ADD 0x06
#define OP_WAIT 0x07 /* sub-op (bits 23:16) 0: EQ */
#define OP_DELAY 0x09
#define OP_CHECKSUM 0x0a
#define F_SIZE64 (1u << 8)
#define HDR(op, imm) ((uint64_t)(op) | ((uint64_t)(uint32_t)(imm) << 32))

#define WAIT_NS 30000000000LL
#define MAX_NODES 64

static FILE *out;
static int failures;

/* ---- KTAP ------------------------------------------------------------------------------ */

static int case_no, case_failed;

static void diag(const char *fmt, ...)
{
	va_list ap;
	fprintf(out, "    # ");
	va_start(ap, fmt);
	vfprintf(out, fmt, ap);
	va_end(ap);
	fprintf(out, "\n");
}

/* One nested case: ok when cond, else not ok with the reason. */
static int check(int cond, const char *name, const char *fmt, ...)
{
	va_list ap;
	case_no++;
	if (!cond) {
		fprintf(out, "    # ");
		va_start(ap, fmt);
		vfprintf(out, fmt, ap);
		va_end(ap);
		fprintf(out, "\n    not ok %d %s\n", case_no, name);
		case_failed++;
	} else {
		fprintf(out, "    ok %d %s\n", case_no, name);
	}
	fflush(out);
	return cond;
}

/* ---- ioctls ---------------------------------------------------------------------------- */

/* The ioctl's errno, 0 on success (EINTR retried). */
static int io(int fd, unsigned long req, void *arg)
{
	int r;
	do {
		r = ioctl(fd, req, arg);
	} while (r == -1 && errno == EINTR);
	return r == 0 ? 0 : errno;
}

static int vm_create(int fd, uint32_t flags, uint32_t *vm)
{
	struct drm_svmgpu_vm_create a = { .flags = flags };
	int e = io(fd, DRM_IOCTL_SVMGPU_VM_CREATE, &a);
	*vm = a.vm_id;
	return e;
}

static int vm_destroy(int fd, uint32_t vm)
{
	struct drm_svmgpu_vm_destroy a = { .vm_id = vm };
	return io(fd, DRM_IOCTL_SVMGPU_VM_DESTROY, &a);
}

static int queue_create(int fd, uint32_t vm, uint32_t pad, uint32_t *q)
{
	struct drm_svmgpu_exec_queue_create a = { .vm_id = vm, .pad = pad };
	int e = io(fd, DRM_IOCTL_SVMGPU_EXEC_QUEUE_CREATE, &a);
	*q = a.queue_id;
	return e;
}

static int queue_destroy(int fd, uint32_t q)
{
	struct drm_svmgpu_exec_queue_destroy a = { .queue_id = q };
	return io(fd, DRM_IOCTL_SVMGPU_EXEC_QUEUE_DESTROY, &a);
}

static int bind(int fd, uint32_t vm, uint32_t op, uint64_t va, uint64_t size, void *ptr)
{
	struct drm_svmgpu_vm_bind a = {
		.vm_id = vm, .op = op, .va = va, .size = size, .userptr = (uint64_t)(uintptr_t)ptr,
	};
	return io(fd, DRM_IOCTL_SVMGPU_VM_BIND, &a);
}

/* EXEC (EAGAIN retried) then WAIT; returns the ioctl errno, the job's outcome in *error. */
static int run_job(int fd, uint32_t q, uint64_t batch_va, uint32_t len, int32_t *error)
{
	struct drm_svmgpu_exec x = { .queue_id = q, .batch_va = batch_va, .batch_len = len };
	struct drm_svmgpu_wait w = { .queue_id = q, .timeout_ns = WAIT_NS };
	int e, tries = 0;
	while ((e = io(fd, DRM_IOCTL_SVMGPU_EXEC, &x)) == EAGAIN && ++tries < 100)
		usleep(10000);
	if (e)
		return e;
	w.fence = x.fence;
	e = io(fd, DRM_IOCTL_SVMGPU_WAIT, &w);
	*error = w.error;
	return e;
}

static uint64_t fnv1a64(const uint8_t *p, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ull;
	while (n--)
		h = (h ^ *p++) * 0x100000001b3ull;
	return h;
}

/* ---- one device ------------------------------------------------------------------------ */

#define FILL_LEN (256 * 1024)
#define SRC_LEN (64 * 1024)
#define PATTERN 0xc0ffee11u

/* A fault-mode VM: no bind at all; the batch, the filled memory (malloc) and the
 * checksummed memory (mmap) are plain process memory. */
static void fault_mode_fill_checksum(int fd)
{
	uint32_t vm = 0, q = 0;
	int32_t err = 0;
	int e = vm_create(fd, SVMGPU_VM_CREATE_FAULT_MODE, &vm);
	if (!check(e == 0 && vm != 0, "fault_mode_vm_create", "VM_CREATE(FAULT_MODE): %s", strerror(e)))
		return;
	e = queue_create(fd, vm, 0, &q);
	if (check(e == 0 && q != 0, "exec_queue_create", "EXEC_QUEUE_CREATE: %s", strerror(e))) {
		uint32_t *dst = malloc(FILL_LEN);
		uint64_t *sum = malloc(sizeof(*sum));
		uint64_t *batch = aligned_alloc(4096, 4096);
		uint8_t *src = mmap(NULL, SRC_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		size_t i, n = 0, bad = 0;
		if (!dst || !sum || !batch || src == MAP_FAILED) {
			check(0, "fill_and_checksum", "out of memory");
			goto out;
		}
		memset(dst, 0, FILL_LEN);
		*sum = 0;
		for (i = 0; i < SRC_LEN; i++)
			src[i] = (uint8_t)(i * 7 + (i >> 8));
		batch[n++] = HDR(OP_FILL, PATTERN);
		batch[n++] = (uint64_t)(uintptr_t)dst;
		batch[n++] = FILL_LEN;
		batch[n++] = HDR(OP_CHECKSUM, 0);
		batch[n++] = (uint64_t)(uintptr_t)src;
		batch[n++] = SRC_LEN;
		batch[n++] = (uint64_t)(uintptr_t)sum;
		batch[n++] = HDR(OP_END, 0);
		e = run_job(fd, q, (uint64_t)(uintptr_t)batch, n * 8, &err);
		for (i = 0; i < FILL_LEN / 4; i++)
			bad += dst[i] != PATTERN;
		check(e == 0 && err == 0 && bad == 0 && *sum == fnv1a64(src, SRC_LEN),
		      "fill_malloc_checksum_mmap",
		      "EXEC/WAIT %s, job error %d, %zu words without the pattern, GPU sum %#llx, CPU %#llx",
		      strerror(e), err, bad, (unsigned long long)*sum,
		      (unsigned long long)fnv1a64(src, SRC_LEN));

		/* A GPU access to memory the process no longer maps fails the job with -EFAULT. */
		munmap(src, SRC_LEN);
		n = 0;
		batch[n++] = HDR(OP_STORE, 0);
		batch[n++] = (uint64_t)(uintptr_t)src;
		batch[n++] = 1;
		batch[n++] = HDR(OP_END, 0);
		err = 0;
		e = run_job(fd, q, (uint64_t)(uintptr_t)batch, n * 8, &err);
		check(e == 0 && err == -EFAULT, "store_to_unmapped_memory_is_efault",
		      "EXEC/WAIT %s, job error %d (want %d)", strerror(e), err, -EFAULT);
out:
		free(dst);
		free(sum);
		free(batch);
		e = vm_destroy(fd, vm);
		check(e == EBUSY, "vm_destroy_with_queue_is_ebusy", "VM_DESTROY: %s", strerror(e));
		e = queue_destroy(fd, q);
		check(e == 0, "exec_queue_destroy", "EXEC_QUEUE_DESTROY: %s", strerror(e));
	}
	e = vm_destroy(fd, vm);
	check(e == 0, "fault_mode_vm_destroy", "VM_DESTROY: %s", strerror(e));
}

#define BATCH_VA 0x100000ull
#define DATA_VA 0x200000ull
#define DATA_LEN (16 * 1024)

/* A VM not in fault mode: the GPU sees only what VM_BIND maps (userptr bindings). */
static void userptr_bindings(int fd)
{
	uint32_t vm = 0, q = 0;
	int32_t err = 0;
	uint64_t *batch = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint32_t *data = mmap(NULL, DATA_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	size_t n = 0, i, bad = 0;
	int e;
	if (batch == MAP_FAILED || data == MAP_FAILED) {
		check(0, "userptr_vm", "mmap failed");
		return;
	}
	memset(batch, 0, 4096);
	memset(data, 0, DATA_LEN);
	e = vm_create(fd, 0, &vm);
	if (!check(e == 0 && vm != 0, "userptr_vm_create", "VM_CREATE: %s", strerror(e)))
		goto unmap;
	e = bind(fd, vm, SVMGPU_VM_BIND_OP_MAP_USERPTR, BATCH_VA, 4096, batch);
	e = e ? e : bind(fd, vm, SVMGPU_VM_BIND_OP_MAP_USERPTR, DATA_VA, DATA_LEN, data);
	if (!check(e == 0, "vm_bind_userptr", "VM_BIND(MAP_USERPTR): %s", strerror(e)))
		goto destroy_vm;
	e = bind(fd, vm, SVMGPU_VM_BIND_OP_MAP_USERPTR, DATA_VA + 4096, 4096, data);
	check(e == EEXIST, "vm_bind_overlap_is_eexist", "overlapping VM_BIND: %s", strerror(e));
	e = bind(fd, vm, SVMGPU_VM_BIND_OP_MAP_USERPTR, DATA_VA + 0x100001, 4096, data);
	check(e == EINVAL, "vm_bind_misaligned_is_einval", "misaligned VM_BIND: %s", strerror(e));
	e = queue_create(fd, vm, 0, &q);
	if (!check(e == 0, "userptr_exec_queue_create", "EXEC_QUEUE_CREATE: %s", strerror(e)))
		goto destroy_vm;
	batch[n++] = HDR(OP_STORE, 0) | F_SIZE64;
	batch[n++] = DATA_VA;
	batch[n++] = 0x5eed5eed12345678ull;
	batch[n++] = HDR(OP_ATOMIC_ADD, 0);
	batch[n++] = DATA_VA + 4;
	batch[n++] = 2;
	batch[n++] = HDR(OP_FILL, PATTERN);
	batch[n++] = DATA_VA + 4096;
	batch[n++] = DATA_LEN - 4096;
	batch[n++] = HDR(OP_END, 0);
	e = run_job(fd, q, BATCH_VA, n * 8, &err);
	for (i = 4096 / 4; i < DATA_LEN / 4; i++)
		bad += data[i] != PATTERN;
	check(e == 0 && err == 0 && data[0] == 0x12345678u && data[1] == 0x5eed5eed + 2 && bad == 0,
	      "gpu_writes_through_userptr",
	      "EXEC/WAIT %s, job error %d, words %#x %#x, %zu without the pattern", strerror(e), err,
	      data[0], data[1], bad);
	e = bind(fd, vm, SVMGPU_VM_BIND_OP_UNMAP, DATA_VA, DATA_LEN, NULL);
	check(e == 0, "vm_unbind", "VM_BIND(UNMAP): %s", strerror(e));
	e = bind(fd, vm, SVMGPU_VM_BIND_OP_UNMAP, DATA_VA, DATA_LEN, NULL);
	check(e == ENOENT, "vm_unbind_twice_is_enoent", "second UNMAP: %s", strerror(e));
	/* The data is no longer bound: the store faults, the job fails with -EFAULT. */
	err = 0;
	e = run_job(fd, q, BATCH_VA, n * 8, &err);
	check(e == 0 && err == -EFAULT, "store_to_unbound_va_is_efault",
	      "EXEC/WAIT %s, job error %d (want %d)", strerror(e), err, -EFAULT);
	e = queue_destroy(fd, q);
	check(e == 0, "userptr_exec_queue_destroy", "EXEC_QUEUE_DESTROY: %s", strerror(e));
destroy_vm:
	e = vm_destroy(fd, vm);
	check(e == 0, "userptr_vm_destroy", "VM_DESTROY: %s", strerror(e));
unmap:
	munmap(batch, 4096);
	munmap(data, DATA_LEN);
}

/* Documented argument errors that need no job. */
static void argument_errors(int fd)
{
	uint32_t vm = 0, q = 0;
	int e = vm_create(fd, 0x80, &vm);
	check(e == EINVAL, "vm_create_undefined_flag_is_einval", "VM_CREATE(0x80): %s", strerror(e));
	e = vm_destroy(fd, 0xdead);
	check(e == ENOENT, "vm_destroy_unknown_is_enoent", "VM_DESTROY(0xdead): %s", strerror(e));
	e = queue_create(fd, 0xdead, 0, &q);
	check(e == ENOENT, "exec_queue_create_unknown_vm_is_enoent", "EXEC_QUEUE_CREATE: %s", strerror(e));
	if (vm_create(fd, 0, &vm) == 0) {
		e = queue_create(fd, vm, 1, &q);
		check(e == EINVAL, "exec_queue_create_pad_is_einval", "EXEC_QUEUE_CREATE(pad 1): %s",
		      strerror(e));
		vm_destroy(fd, vm);
	}
	{
		struct drm_svmgpu_exec x = { .queue_id = 0xdead, .batch_va = 0x1000, .batch_len = 8 };
		e = io(fd, DRM_IOCTL_SVMGPU_EXEC, &x);
		check(e == ENOENT, "exec_unknown_queue_is_enoent", "EXEC: %s", strerror(e));
	}
	{
		struct drm_svmgpu_device_query dq = { .flags = 0x80000000u };
		e = io(fd, DRM_IOCTL_SVMGPU_DEVICE_QUERY, &dq);
		check(e == EINVAL, "device_query_undefined_flag_is_einval", "DEVICE_QUERY: %s", strerror(e));
	}
}

/* ---- syncobjs: job completion as a dma_fence ------------------------------------------- */

#define SYNC_BATCH_VA 0x400000ull
#define SYNC_DATA_VA 0x500000ull
#define MAGIC 0x5eedf00du

static int syncobj_create(int fd, uint32_t *h)
{
	struct drm_syncobj_create a = { 0 };
	int e = io(fd, DRM_IOCTL_SYNCOBJ_CREATE, &a);
	*h = a.handle;
	return e;
}

static void syncobj_destroy(int fd, uint32_t h)
{
	struct drm_syncobj_destroy a = { .handle = h };
	io(fd, DRM_IOCTL_SYNCOBJ_DESTROY, &a);
}

/* DRM syncobj timeouts are absolute CLOCK_MONOTONIC nanoseconds (0: poll only). */
static int64_t deadline(int64_t rel_ns)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec + rel_ns;
}

static int syncobj_wait(int fd, uint32_t h, int64_t abs_ns)
{
	struct drm_syncobj_wait a = {
		.handles = (uint64_t)(uintptr_t)&h, .count_handles = 1, .timeout_nsec = abs_ns,
	};
	return io(fd, DRM_IOCTL_SYNCOBJ_WAIT, &a);
}

static int syncobj_timeline_wait(int fd, uint32_t h, uint64_t point, int64_t abs_ns)
{
	struct drm_syncobj_timeline_wait a = {
		.handles = (uint64_t)(uintptr_t)&h, .points = (uint64_t)(uintptr_t)&point,
		.count_handles = 1, .timeout_nsec = abs_ns,
	};
	return io(fd, DRM_IOCTL_SYNCOBJ_TIMELINE_WAIT, &a);
}

static int exec_syncs(int fd, uint32_t q, uint64_t batch_va, uint32_t len,
		      struct drm_svmgpu_sync *syncs, uint32_t n, uint64_t *fence)
{
	struct drm_svmgpu_exec x = {
		.queue_id = q, .batch_va = batch_va, .batch_len = len,
		.syncs = (uint64_t)(uintptr_t)syncs, .num_syncs = n,
	};
	int e, tries = 0;
	while ((e = io(fd, DRM_IOCTL_SVMGPU_EXEC, &x)) == EAGAIN && ++tries < 100)
		usleep(10000);
	*fence = x.fence;
	return e;
}

static int wait_fence(int fd, uint32_t q, uint64_t fence, int32_t *error)
{
	struct drm_svmgpu_wait w = { .queue_id = q, .fence = fence, .timeout_ns = WAIT_NS };
	int e = io(fd, DRM_IOCTL_SVMGPU_WAIT, &w);
	*error = w.error;
	return e;
}

/* The syncobj's fence as a sync_file (-1 and errno on failure). */
static int export_sync_file(int fd, uint32_t h)
{
	struct drm_syncobj_handle a = {
		.handle = h, .flags = DRM_SYNCOBJ_HANDLE_TO_FD_FLAGS_EXPORT_SYNC_FILE, .fd = -1,
	};
	int e = io(fd, DRM_IOCTL_SYNCOBJ_HANDLE_TO_FD, &a);
	if (e) {
		errno = e;
		return -1;
	}
	return a.fd;
}

static int readable(int sf, int timeout_ms)
{
	struct pollfd p = { .fd = sf, .events = POLLIN };
	return poll(&p, 1, timeout_ms) == 1 && (p.revents & POLLIN);
}

/*
 * Jobs that must still be running when a check runs wait on a gate word (WAIT EQ 1) that
 * the client sets afterwards, so no check depends on the guest's speed.
 */
static void syncobjs(int fd)
{
	uint32_t vm = 0, qa = 0, qb = 0, s_bin = 0, s_tl = 0, s_in = 0, s_err = 0;
	uint64_t *batch = mmap(NULL, 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint32_t *data = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	volatile uint32_t *gate = (volatile uint32_t *)(batch + 3 * 512);
	const uint64_t gate_va = SYNC_BATCH_VA + 3 * 4096;
	struct drm_svmgpu_sync sy[SVMGPU_MAX_SYNCS + 1];
	uint64_t f = 0, fb = 0, *b;
	int32_t err = 0, errb = 0;
	int e, e2, sf;
	size_t n;
	if (batch == MAP_FAILED || data == MAP_FAILED) {
		check(0, "syncobj_vm", "mmap failed");
		return;
	}
	memset(data, 0, 4096);
	e = vm_create(fd, 0, &vm);
	e = e ? e : bind(fd, vm, SVMGPU_VM_BIND_OP_MAP_USERPTR, SYNC_BATCH_VA, 4 * 4096, batch);
	e = e ? e : bind(fd, vm, SVMGPU_VM_BIND_OP_MAP_USERPTR, SYNC_DATA_VA, 4096, data);
	e = e ? e : queue_create(fd, vm, 0, &qa);
	e = e ? e : queue_create(fd, vm, 0, &qb);
	e = e ? e : syncobj_create(fd, &s_bin);
	e = e ? e : syncobj_create(fd, &s_tl);
	e = e ? e : syncobj_create(fd, &s_in);
	e = e ? e : syncobj_create(fd, &s_err);
	if (!check(e == 0, "syncobj_setup", "VM, bindings, 2 queues, 4 syncobjs: %s", strerror(e)))
		goto out;

	/* A binary out-syncobj: unsignalled while the job waits on its gate, signalled once
	 * the job completed (its STORE comes after a 100 ms DELAY: an early signal shows). */
	*gate = 0;
	b = batch, n = 0;
	b[n++] = HDR(OP_WAIT, 0);
	b[n++] = gate_va;
	b[n++] = 1;
	b[n++] = HDR(OP_DELAY, 100000000);
	b[n++] = HDR(OP_STORE, 0);
	b[n++] = SYNC_DATA_VA;
	b[n++] = MAGIC;
	b[n++] = HDR(OP_END, 0);
	sy[0] = (struct drm_svmgpu_sync){ .handle = s_bin, .flags = SVMGPU_SYNC_SIGNAL };
	e = exec_syncs(fd, qa, SYNC_BATCH_VA, n * 8, sy, 1, &f);
	if (check(e == 0, "exec_with_out_syncobj", "EXEC with an out-syncobj: %s", strerror(e))) {
		e = syncobj_wait(fd, s_bin, 0);
		check(e == ETIME, "syncobj_wait_unsignalled_is_etime",
		      "DRM_IOCTL_SYNCOBJ_WAIT(timeout 0) while the job waits: %s (want ETIME)", strerror(e));
		sf = export_sync_file(fd, s_bin);
		check(sf >= 0 && !readable(sf, 0), "sync_file_not_readable_while_running",
		      "export: %s, or the sync_file polls readable", sf < 0 ? strerror(errno) : "ok");
		if (sf >= 0) {
			struct sync_fence_info fi = { 0 };
			struct sync_file_info info = {
				.num_fences = 1, .sync_fence_info = (uint64_t)(uintptr_t)&fi,
			};
			if (io(sf, SYNC_IOC_FILE_INFO, &info) == 0)
				diag("running job: fence of %s on %s, status %d", fi.driver_name,
				     fi.obj_name, fi.status);
		}
		*gate = 1;
		e = syncobj_wait(fd, s_bin, deadline(10000000000ll));
		check(e == 0 && data[0] == MAGIC, "syncobj_wait_signals_after_job",
		      "DRM_IOCTL_SYNCOBJ_WAIT(10 s): %s, word %#x (want %#x)", strerror(e), data[0], MAGIC);
		check(sf >= 0 && readable(sf, 10000), "sync_file_poll_readable_after_job",
		      "the sync_file does not poll readable after the job");
		if (sf >= 0)
			close(sf);
		e = wait_fence(fd, qa, f, &err);
		check(e == 0 && err == 0, "wait_agrees", "WAIT: %s, job error %d", strerror(e), err);
	}
	*gate = 1;

	/* A timeline syncobj: the job adds point 1. */
	b = batch + 512, n = 0;
	b[n++] = HDR(OP_DELAY, 50000000);
	b[n++] = HDR(OP_STORE, 0);
	b[n++] = SYNC_DATA_VA + 4;
	b[n++] = 2;
	b[n++] = HDR(OP_END, 0);
	sy[0] = (struct drm_svmgpu_sync){ .handle = s_tl, .flags = SVMGPU_SYNC_SIGNAL, .point = 1 };
	e = exec_syncs(fd, qa, SYNC_BATCH_VA + 4096, n * 8, sy, 1, &f);
	e = e ? e : syncobj_timeline_wait(fd, s_tl, 1, deadline(10000000000ll));
	{
		uint64_t point = 0;
		struct drm_syncobj_timeline_array qa_ = {
			.handles = (uint64_t)(uintptr_t)&s_tl, .points = (uint64_t)(uintptr_t)&point,
			.count_handles = 1,
		};
		e2 = io(fd, DRM_IOCTL_SYNCOBJ_QUERY, &qa_);
		check(e == 0 && data[1] == 2 && e2 == 0 && point == 1, "syncobj_timeline_wait_point_1",
		      "EXEC + DRM_IOCTL_SYNCOBJ_TIMELINE_WAIT(point 1): %s, word %u (want 2), QUERY %s: %llu",
		      strerror(e), data[1], strerror(e2), (unsigned long long)point);
	}

	/* An in-syncobj orders two queues: A delays 300 ms then stores 1, B copies it. */
	b = batch, n = 0;
	b[n++] = HDR(OP_DELAY, 300000000);
	b[n++] = HDR(OP_STORE, 0);
	b[n++] = SYNC_DATA_VA + 8;
	b[n++] = 1;
	b[n++] = HDR(OP_END, 0);
	b = batch + 512, n = 0;
	b[n++] = HDR(OP_COPY, 0);
	b[n++] = SYNC_DATA_VA + 12;
	b[n++] = SYNC_DATA_VA + 8;
	b[n++] = 4;
	b[n++] = HDR(OP_END, 0);
	sy[0] = (struct drm_svmgpu_sync){ .handle = s_in, .flags = SVMGPU_SYNC_SIGNAL };
	e = exec_syncs(fd, qa, SYNC_BATCH_VA, 5 * 8, sy, 1, &f);
	sy[0].flags = 0;
	e = e ? e : exec_syncs(fd, qb, SYNC_BATCH_VA + 4096, n * 8, sy, 1, &fb);
	e = e ? e : wait_fence(fd, qb, fb, &errb);
	e = e ? e : wait_fence(fd, qa, f, &err);
	check(e == 0 && err == 0 && errb == 0 && data[3] == 1, "in_syncobj_orders_queues",
	      "EXEC/WAIT %s, jobs %d %d, queue B copied %u (want 1)", strerror(e), err, errb, data[3]);

	/* Errors: an unknown handle, too many syncs; neither touches the out-syncobj. */
	sy[0] = (struct drm_svmgpu_sync){ .handle = s_err, .flags = SVMGPU_SYNC_SIGNAL };
	sy[1] = (struct drm_svmgpu_sync){ .handle = 0xdead };
	e = exec_syncs(fd, qa, SYNC_BATCH_VA + 4096, n * 8, sy, 2, &f);
	e2 = syncobj_wait(fd, s_err, 0);
	check(e == ENOENT && e2 == EINVAL, "exec_unknown_syncobj_is_enoent",
	      "EXEC: %s (want ENOENT); then the out-syncobj's wait: %s (want EINVAL: no fence)",
	      strerror(e), strerror(e2));
	for (n = 1; n <= SVMGPU_MAX_SYNCS; n++)
		sy[n] = (struct drm_svmgpu_sync){ .handle = s_tl, .flags = SVMGPU_SYNC_SIGNAL, .point = 10 + n };
	e = exec_syncs(fd, qa, SYNC_BATCH_VA + 4096, 5 * 8, sy, SVMGPU_MAX_SYNCS + 1, &f);
	e2 = syncobj_wait(fd, s_err, 0);
	check(e == EINVAL && e2 == EINVAL, "exec_too_many_syncs_is_einval",
	      "EXEC with %d syncs: %s (want EINVAL); then the out-syncobj's wait: %s (want EINVAL)",
	      SVMGPU_MAX_SYNCS + 1, strerror(e), strerror(e2));

	/* A job that faults signals its out-syncobj with the job's error. */
	b = batch, n = 0;
	b[n++] = HDR(OP_STORE, 0);
	b[n++] = 0x70000000;
	b[n++] = 1;
	b[n++] = HDR(OP_END, 0);
	e = exec_syncs(fd, qa, SYNC_BATCH_VA, n * 8, sy, 1, &f);
	e = e ? e : syncobj_wait(fd, s_err, deadline(10000000000ll));
	sf = e ? -1 : export_sync_file(fd, s_err);
	{
		struct sync_fence_info fi = { 0 };
		struct sync_file_info info = { .num_fences = 1, .sync_fence_info = (uint64_t)(uintptr_t)&fi };
		e2 = sf < 0 ? errno : io(sf, SYNC_IOC_FILE_INFO, &info);
		check(e == 0 && e2 == 0 && info.status == -EFAULT && fi.status == -EFAULT,
		      "failed_job_fence_error_is_efault",
		      "EXEC + DRM_IOCTL_SYNCOBJ_WAIT: %s, sync_file info: %s, status %d, fence %d (want %d)",
		      strerror(e), strerror(e2), info.status, fi.status, -EFAULT);
	}
	if (sf >= 0)
		close(sf);
out:
	*gate = 1;
	if (s_bin)
		syncobj_destroy(fd, s_bin);
	if (s_tl)
		syncobj_destroy(fd, s_tl);
	if (s_in)
		syncobj_destroy(fd, s_in);
	if (s_err)
		syncobj_destroy(fd, s_err);
	if (qb)
		queue_destroy(fd, qb);
	if (qa)
		queue_destroy(fd, qa);
	if (vm)
		vm_destroy(fd, vm);
	munmap(batch, 4 * 4096);
	munmap(data, 4096);
}

static void one_device(int fd, const char *path, int index)
{
	char name[64] = { 0 };
	drm_version_t v = { .name_len = sizeof(name) - 1, .name = name };
	struct drm_svmgpu_device_query dq = { 0 };
	int e;
	case_no = 0;
	case_failed = 0;
	fprintf(out, "    KTAP version 1\n    # Subtest: %s\n", path);
	e = io(fd, DRM_IOCTL_VERSION, &v);
	if (check(e == 0 && strcmp(name, "svmgpu") == 0, "drm_version_is_svmgpu",
		  "DRM_IOCTL_VERSION: %s, name \"%s\"", strerror(e), name))
		diag("driver %s %d.%d.%d", name, v.version_major, v.version_minor, v.version_patchlevel);
	e = io(fd, DRM_IOCTL_SVMGPU_DEVICE_QUERY, &dq);
	if (check(e == 0, "device_query", "DEVICE_QUERY: %s", strerror(e)))
		diag("virtio%u, GET_INFO round trip %llu ns, svm_mode %u", dq.bus_index,
		     (unsigned long long)dq.round_trip_ns, dq.svm_mode);
	fault_mode_fill_checksum(fd);
	userptr_bindings(fd);
	argument_errors(fd);
	syncobjs(fd);
	fprintf(out, "    1..%d\n", case_no);
	fprintf(out, "%s %d %s\n", case_failed ? "not ok" : "ok", index, path);
	fflush(out);
	failures += case_failed != 0;
}

static int cmp(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(int argc, char **argv)
{
	char *nodes[MAX_NODES];
	int n = 0, expect = -1, i;
	DIR *d;
	struct dirent *de;
	out = stdout;
	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--gpus") && i + 1 < argc) {
			char *end;
			expect = (int)strtol(argv[++i], &end, 10);
			if (*end || expect < 1) {
				fprintf(stderr, "svmgpu-client: --gpus needs a number >= 1, not '%s'\n", argv[i]);
				return 2;
			}
		} else if (!strcmp(argv[i], "--out") && i + 1 < argc) {
			out = fopen(argv[++i], "a");
			if (!out) {
				fprintf(stderr, "svmgpu-client: %s: %s\n", argv[i], strerror(errno));
				return 2;
			}
		} else {
			fprintf(stderr, "usage: svmgpu-client [--gpus N] [--out FILE]\n");
			return strcmp(argv[i], "--help") && strcmp(argv[i], "-h") ? 2 : 0;
		}
	}
	d = opendir("/dev/dri");
	while (d && (de = readdir(d)) && n < MAX_NODES)
		if (!strncmp(de->d_name, "renderD", 7) && asprintf(&nodes[n], "/dev/dri/%s", de->d_name) > 0)
			n++;
	if (d)
		closedir(d);
	qsort(nodes, n, sizeof(nodes[0]), cmp);

	fprintf(out, "KTAP version 1\n1..%d\n", n + 1);
	fprintf(out, "# %d render node(s) in /dev/dri\n", n);
	if (expect >= 0 ? n == expect : n > 0)
		fprintf(out, "ok 1 render_nodes\n");
	else {
		if (expect >= 0)
			fprintf(out, "# expected %d\n", expect);
		fprintf(out, "not ok 1 render_nodes\n");
		failures++;
	}
	fflush(out);
	for (i = 0; i < n; i++) {
		int fd = open(nodes[i], O_RDWR | O_CLOEXEC);
		if (fd < 0) {
			fprintf(out, "# open %s: %s\nnot ok %d %s\n", nodes[i], strerror(errno), i + 2, nodes[i]);
			failures++;
			continue;
		}
		one_device(fd, nodes[i], i + 2);
		close(fd);
	}
	fprintf(out, "# svmgpu-client: %d of %d test(s) failed\n", failures, n + 1);
	return failures ? 1 : 0;
}
