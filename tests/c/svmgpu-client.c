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
 * EBUSY, job -EFAULT) are checked. Prints KTAP v1 (stdout, or --out FILE); exits 1 on any
 * failure.
 *
 *   svmgpu-client [--gpus N] [--out FILE]     N: the number of render nodes expected
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "svmgpu_drm.h"

/* Command-stream ISA (spec/svmgpu.md, section 6.13). */
#define OP_END 0x02
#define OP_STORE 0x03
#define OP_FILL 0x04
#define OP_ATOMIC_ADD 0x06
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
