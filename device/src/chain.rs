// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Descriptor chains as the device sees them, every descriptor untrusted: reading a
//! request from the device-readable part, writing a response or a record across the
//! device-writable part (spec/svmgpu.md sections 6.2 and 6.3.1). A leaf: it knows bytes and
//! guest RAM, nothing of commands.

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

/// One descriptor of a chain as the device sees it (indirect tables already resolved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub writable: bool,
}

impl Desc {
    /// A device-readable descriptor.
    pub fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: false,
        }
    }

    /// A device-writable descriptor.
    pub fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: true,
        }
    }
}

/// True if the descriptor is guest RAM with `access` (an empty one always is).
pub fn in_ram<M: GuestMemory>(mem: &M, d: &Desc, access: Permissions) -> bool {
    d.len == 0 || mem.check_range(GuestAddress(d.addr), d.len as usize, access)
}

/// Reads up to `limit` bytes from the readable descriptors.
pub fn gather<M: GuestMemory>(mem: &M, readable: &[Desc], limit: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for d in readable {
        let room = limit - out.len();
        if room == 0 {
            break;
        }
        let n = (d.len as usize).min(room);
        let start = out.len();
        out.resize(start + n, 0);
        mem.read_slice(&mut out[start..], GuestAddress(d.addr))
            .ok()?;
    }
    Some(out)
}

/// Writes `bytes` across the writable descriptors; returns the bytes written, `None` if a
/// write failed (guest memory changed under us).
pub fn scatter<M: GuestMemory>(mem: &M, descs: &[Desc], bytes: &[u8]) -> Option<u32> {
    let mut bytes = bytes;
    let mut written = 0u32;
    for d in descs.iter().filter(|d| d.writable) {
        if bytes.is_empty() {
            break;
        }
        let n = (d.len as usize).min(bytes.len());
        mem.write_slice(&bytes[..n], GuestAddress(d.addr)).ok()?;
        bytes = &bytes[n..];
        // n <= the record or response size, far below u32::MAX.
        written += n as u32;
    }
    Some(written)
}

/// Writes a device → driver record (event or completion) at the start of a chain's
/// device-writable descriptors, which are treated as one buffer (readable ones are ignored).
/// Returns the used length, or `None` if the writable part is shorter than the record or not
/// writable guest RAM (spec/svmgpu.md section 6.2).
pub fn write_record<M: GuestMemory>(mem: &M, descs: &[Desc], record: &[u8]) -> Option<u32> {
    let mut room: u64 = 0;
    for d in descs.iter().filter(|d| d.writable) {
        if !in_ram(mem, d, Permissions::Write) {
            return None;
        }
        room = room.saturating_add(u64::from(d.len));
    }
    if room < record.len() as u64 {
        return None;
    }
    let mut bytes = record;
    for d in descs.iter().filter(|d| d.writable) {
        if bytes.is_empty() {
            break;
        }
        let n = (d.len as usize).min(bytes.len());
        mem.write_slice(&bytes[..n], GuestAddress(d.addr)).ok()?;
        bytes = &bytes[n..];
    }
    u32::try_from(record.len()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const BASE: u64 = 0x1_0000;

    fn get(mem: &GuestMemoryMmap, addr: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn records_into_split_buffers() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(BASE), 0x1_0000)]).unwrap();
        let rec: Vec<u8> = (0..32).collect();
        let d = [
            Desc::readable(BASE, 8),
            Desc::writable(BASE + 0x100, 10),
            Desc::writable(BASE + 0x200, 30),
        ];
        assert_eq!(write_record(&mem, &d, &rec), Some(32));
        let mut got = get(&mem, BASE + 0x100, 10);
        got.extend(get(&mem, BASE + 0x200, 22));
        assert_eq!(got, rec);
        assert_eq!(write_record(&mem, &d[..2], &rec), None, "too short");
        assert_eq!(write_record(&mem, &[Desc::writable(0x10, 64)], &rec), None);
        assert_eq!(write_record(&mem, &[Desc::readable(BASE, 64)], &rec), None);
    }

    #[test]
    fn gather_and_scatter() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(BASE), 0x1_0000)]).unwrap();
        let d = [Desc::writable(BASE, 3), Desc::writable(BASE + 0x100, 8)];
        assert_eq!(scatter(&mem, &d, &[1, 2, 3, 4, 5]), Some(5));
        let r = [Desc::readable(BASE, 3), Desc::readable(BASE + 0x100, 8)];
        assert_eq!(gather(&mem, &r, 4), Some(vec![1, 2, 3, 4]));
        assert_eq!(gather(&mem, &r, 100).map(|v| v.len()), Some(11));
        assert_eq!(gather(&mem, &[Desc::readable(0, 4)], 4), None);
        assert_eq!(scatter(&mem, &[Desc::writable(0, 4)], &[1]), None);
        assert!(in_ram(&mem, &Desc::readable(0, 0), Permissions::Read));
    }
}
