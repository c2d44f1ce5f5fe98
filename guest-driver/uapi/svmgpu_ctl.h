/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR BSD-3-Clause */
/*
 * svmgpu control node, /dev/svmgpu: device enumeration and raw queries.
 *
 * A stopgap until the DRM render nodes (one per device) carry the full uAPI: this node
 * lets tests and tools list the bound devices, read each one's config space as the driver
 * read it, and make the driver send a real GET_INFO command to the device.
 */
#ifndef _UAPI_SVMGPU_CTL_H_
#define _UAPI_SVMGPU_CTL_H_

#include <linux/ioctl.h>
#include <linux/types.h>

#define SVMGPU_CTL_MAGIC 'S'

/* Size of the device config space (see spec/, "Config space"). */
#define SVMGPU_CONFIG_SIZE 64
/* Size of the GET_INFO response body (see spec/, "GET_INFO"). */
#define SVMGPU_INFO_SIZE 40

/**
 * struct svmgpu_ctl_query - SVMGPU_CTL_IOCTL_QUERY argument
 * @slot: in: which device, 0 .. SVMGPU_CTL_IOCTL_NUM_DEVICES - 1 (probe order).
 * @bus_index: out: N of the device's virtioN name on the virtio bus.
 * @round_trip_ns: out: time the GET_INFO command took, submission to response.
 * @config: out: the config space, raw, as read at probe (little-endian).
 * @info: out: the body of a GET_INFO response the device sent for this call.
 */
struct svmgpu_ctl_query {
	__u32 slot;
	__u32 bus_index;
	__u64 round_trip_ns;
	__u8 config[SVMGPU_CONFIG_SIZE];
	__u8 info[SVMGPU_INFO_SIZE];
};

/*
 * SVMGPU_CTL_IOCTL_NUM_DEVICES: number of bound devices (a __u32, out).
 * SVMGPU_CTL_IOCTL_QUERY: errors: EFAULT (bad pointer), ENODEV (no device in that slot,
 *   or it was removed meanwhile), ETIMEDOUT (the device did not answer in 5 s), EIO (the
 *   device answered with an error or a malformed response), EBUSY (all command slots in
 *   use), EINTR/ERESTARTSYS (a signal arrived while waiting).
 */
#define SVMGPU_CTL_IOCTL_NUM_DEVICES _IOR(SVMGPU_CTL_MAGIC, 0x00, __u32)
#define SVMGPU_CTL_IOCTL_QUERY _IOWR(SVMGPU_CTL_MAGIC, 0x01, struct svmgpu_ctl_query)

#endif /* _UAPI_SVMGPU_CTL_H_ */
