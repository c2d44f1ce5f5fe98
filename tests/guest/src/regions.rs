//! Guest RAM of two regions (issue 14, section 3): `qemu-configs/svmgpu-2-numa.cfg` gives
//! the guest 1 GiB in two memory backends (two NUMA nodes of QEMU's), which meet at
//! guest-physical [`BOUNDARY`] (512 MiB); vhost-user hands the device one memory region
//! per backend, and a bulk instruction must access each part of its range in its own
//! region (spec 6.13.6, rule 3).
//!
//! The guest kernel is built without `CONFIG_NUMA` (one node, so `mbind`/`set_mempolicy`
//! cannot place pages), and a process cannot choose the physical pages it gets; what it
//! can do is look at them: `/proc/self/pagemap` gives each page's frame (the runner is
//! root). `bulk_instructions_across_ram_regions` collects pages on both sides of the
//! boundary, moves them with `mremap` (which keeps the physical page) into one buffer where
//! they alternate — every page next to one of the other region — and, when it finds them,
//! puts the frames just below and just at the boundary next to each other: guest-physically
//! contiguous across the two regions, the case that once made a FILL fail with
//! BAD_PAGE_ADDRESS forever. Then every device FILLs, CHECKSUMs and COPYs the whole buffer
//! in single instructions, through a userptr binding and through SVM, and the CPU checks
//! the bytes. The frames are read back afterwards: the test fails if the layout it claims
//! was not the one the GPU saw.

use crate::{
    ktap::Outcome,
    tests::{Env, K},
    util::*,
};
use std::io::{Read, Seek, SeekFrom};
use svmgpu::{fnv1a64, spec::isa::Insn, Device};

/// Where the two memory backends of `qemu-configs/svmgpu-2-numa.cfg` meet (its `ram0` is
/// 512 MiB): guest-physical addresses below are in one vhost-user region, above in the
/// other.
pub const BOUNDARY: u64 = 512 << 20;
/// Pages taken from each side.
const PER_SIDE: usize = 64;
/// Collected in chunks of this size.
const CHUNK: usize = 16 << 20;

/// See the module documentation.
pub fn bulk_instructions_across_ram_regions(_env: &Env, name: &str, k: &mut K) {
    let Some(devs) = devices(k, name) else { return };
    let buf = match Layout::build() {
        Ok(b) => b,
        Err(e) => return k.result(name, &Outcome::Fail(e)),
    };
    k.diag(&format!(
        "{} pages alternate below/above guest-physical {:#x} ({} MiB of memory touched to find them); boundary pair (frames {:#x}, {:#x}) {}",
        2 * PER_SIDE,
        BOUNDARY,
        buf.touched >> 20,
        BOUNDARY / 4096 - 1,
        BOUNDARY / 4096,
        if buf.pair { "found and placed last, guest-physically contiguous" } else { "not owned by this process: not placed" }
    ));
    let mut cases = Vec::new();
    for (i, d) in devs.iter().enumerate() {
        cases.push((
            format!("device_{i}_userptr_binding"),
            Outcome::from(run(d, &buf, false)),
        ));
        cases.push((format!("device_{i}_svm"), Outcome::from(run(d, &buf, true))));
    }
    // The layout the GPU worked on is still the one described.
    cases.push((
        "pages_stayed_where_they_were".into(),
        Outcome::from(buf.check()),
    ));
    k.suite(name, cases);
}

/// The test buffer: pages alternating between the regions, and maybe the boundary pair.
struct Layout {
    /// The buffer's reservation.
    base: *mut libc::c_void,
    len: usize,
    /// Expected frame of each page of the buffer.
    frames: Vec<u64>,
    /// The boundary pair is the last two pages.
    pair: bool,
    /// Memory touched to collect the pages (kept mapped until drop: the pages not moved
    /// into the buffer stay allocated, so that the ones moved are not freed and reused).
    touched: usize,
    chunks: Vec<(*mut libc::c_void, usize)>,
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: Mappings made by `build`.
        unsafe {
            libc::munmap(self.base, self.len);
            for &(p, l) in &self.chunks {
                libc::munmap(p, l);
            }
        }
    }
}

/// The frame (guest-physical page number) of the page at `va`, from `/proc/self/pagemap`.
fn frame(pagemap: &mut std::fs::File, va: u64) -> Result<Option<u64>, String> {
    let mut e = [0u8; 8];
    pagemap
        .seek(SeekFrom::Start(va / 4096 * 8))
        .and_then(|_| pagemap.read_exact(&mut e))
        .map_err(|err| format!("pagemap: {err}"))?;
    let e = u64::from_le_bytes(e);
    // Bit 63: present; bits 54:0: the frame (zero without CAP_SYS_ADMIN).
    Ok((e >> 63 == 1).then_some(e & ((1 << 55) - 1)))
}

impl Layout {
    fn build() -> Result<Layout, String> {
        let mut pm = ctx("open pagemap", std::fs::File::open("/proc/self/pagemap"))?;
        let avail = meminfo("MemAvailable")?;
        let total = meminfo("MemTotal")?;
        ensure(total > BOUNDARY, || {
            format!("{} MiB of guest RAM: nothing above 512 MiB (boot with qemu-configs/svmgpu-2-numa.cfg)", total >> 20)
        })?;
        let (mut below, mut above) = (Vec::new(), Vec::new());
        let (mut lo, mut hi) = (None, None);
        let mut chunks = Vec::new();
        let mut touched = 0usize;
        // Collect until both sides have enough pages and the boundary pair is found, or 60 %
        // of the available memory is touched.
        while (below.len() < PER_SIDE || above.len() < PER_SIDE || lo.is_none() || hi.is_none())
            && touched + CHUNK < avail as usize * 6 / 10
        {
            // SAFETY: A fresh anonymous mapping.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    CHUNK,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            ensure(p != libc::MAP_FAILED, || "mmap".into())?;
            chunks.push((p, CHUNK));
            touched += CHUNK;
            // 4 KiB pages only (a huge page could not be moved page by page), each touched.
            // SAFETY: Our mapping.
            unsafe {
                libc::madvise(p, CHUNK, libc::MADV_NOHUGEPAGE);
                for off in (0..CHUNK).step_by(4096) {
                    std::ptr::write_volatile(p.cast::<u8>().add(off), 1);
                }
            }
            for off in (0..CHUNK).step_by(4096) {
                let va = p as u64 + off as u64;
                let Some(f) = frame(&mut pm, va)? else {
                    continue;
                };
                ensure(f != 0, || "pagemap shows no frames (not root?)".into())?;
                match f {
                    f if f == BOUNDARY / 4096 - 1 => lo = Some(va),
                    f if f == BOUNDARY / 4096 => hi = Some(va),
                    f if f < BOUNDARY / 4096 && below.len() < PER_SIDE => below.push(va),
                    f if f > BOUNDARY / 4096 && above.len() < PER_SIDE => above.push(va),
                    _ => {}
                }
            }
        }
        ensure(below.len() == PER_SIDE && above.len() == PER_SIDE, || {
            format!(
                "after touching {} MiB: {} pages below 512 MiB, {} above: the guest does not use both regions",
                touched >> 20,
                below.len(),
                above.len()
            )
        })?;
        let pair = lo.is_some() && hi.is_some();
        let pages = 2 * PER_SIDE + if pair { 2 } else { 0 };
        let len = pages * 4096;
        // SAFETY: A fresh reservation; pages are moved into it below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        ensure(base != libc::MAP_FAILED, || "mmap".into())?;
        let mut order = Vec::new();
        for k in 0..PER_SIDE {
            order.push(below[k]);
            order.push(above[k]);
        }
        if let (Some(lo), Some(hi)) = (lo, hi) {
            order.push(lo);
            order.push(hi);
        }
        let mut frames = Vec::new();
        for (slot, &va) in order.iter().enumerate() {
            frames.push(frame(&mut pm, va)?.unwrap_or(0));
            let to = base as usize + slot * 4096;
            // SAFETY: Moves one page of ours onto one page of our reservation.
            let r = unsafe {
                libc::mremap(
                    va as *mut libc::c_void,
                    4096,
                    4096,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    to as *mut libc::c_void,
                )
            };
            ensure(r as usize == to, || {
                format!("mremap: {}", std::io::Error::last_os_error())
            })?;
        }
        let l = Layout {
            base,
            len,
            frames,
            pair,
            touched,
            chunks,
        };
        l.check()?;
        Ok(l)
    }

    fn addr(&self) -> u64 {
        self.base as u64
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: Mapped read-write (moved pages) for `len` bytes while `self` lives.
        unsafe { std::slice::from_raw_parts(self.base.cast::<u8>(), self.len) }
    }

    /// The buffer's pages still have the frames `build` placed there.
    fn check(&self) -> TResult {
        let mut pm = ctx("open pagemap", std::fs::File::open("/proc/self/pagemap"))?;
        for (slot, &want) in self.frames.iter().enumerate() {
            let got = frame(&mut pm, self.addr() + slot as u64 * 4096)?;
            ensure(got == Some(want), || {
                format!("page {slot}: frame {got:x?}, want {want:#x} (moved by the kernel?)")
            })?;
        }
        Ok(())
    }
}

fn meminfo(key: &str) -> Result<u64, String> {
    let text = ctx("/proc/meminfo", std::fs::read_to_string("/proc/meminfo"))?;
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .map(|kb| kb * 1024)
        .ok_or_else(|| format!("no {key} in /proc/meminfo"))
}

/// On device `d`, through a userptr binding (a non-fault VM, the buffer bound at a GPU VA)
/// or through SVM (a fault-mode VM using the CPU address): FILL the whole buffer, CHECKSUM
/// it, COPY its first half onto its second half (every page of either half next to one of
/// the other region), CHECKSUM again, each one instruction over the whole range; the CPU
/// checks the bytes and both checksums.
fn run(d: &Device, buf: &Layout, svm: bool) -> TResult {
    let mut s = Setup::new(d, svm, false)?;
    let va = if svm {
        buf.addr()
    } else {
        let gva = 0x4000_0000u64;
        ctx(
            "bind",
            d.bind_userptr(s.vm, gva, buf.len as u64, buf.addr(), false),
        )?;
        gva
    };
    let len = buf.len as u64;
    let half = len / 2;
    let pattern = 0x5eed_0000 | u32::from(svm);
    s.run_ok(&batch(&[
        Insn::Fill { va, len, pattern },
        Insn::Checksum {
            src: va,
            len,
            dst: BATCH_VA + 8192,
        },
    ]))?;
    ensure(
        buf.bytes()
            .chunks_exact(4)
            .all(|w| w == pattern.to_le_bytes()),
        || "FILL: the pattern is not on every page".into(),
    )?;
    let sum = s.batch_buf.read_u64(8192);
    ensure(sum == fnv1a64(buf.bytes()), || {
        "CHECKSUM after FILL differs from the CPU's".into()
    })?;
    // Distinct bytes in the first half, then COPY it onto the second.
    // SAFETY: The buffer is ours and mapped read-write.
    let first = unsafe { std::slice::from_raw_parts_mut(buf.base.cast::<u8>(), half as usize) };
    for (i, b) in first.iter_mut().enumerate() {
        *b = (i * 31 + (i >> 12) * 7 + usize::from(svm)) as u8;
    }
    s.run_ok(&batch(&[
        Insn::Copy {
            dst: va + half,
            src: va,
            len: half,
        },
        Insn::Checksum {
            src: va,
            len,
            dst: BATCH_VA + 8192,
        },
    ]))?;
    let bytes = buf.bytes();
    ensure(bytes[..half as usize] == bytes[half as usize..], || {
        "COPY: the second half differs from the first".into()
    })?;
    let sum = s.batch_buf.read_u64(8192);
    ensure(sum == fnv1a64(bytes), || {
        "CHECKSUM after COPY differs from the CPU's".into()
    })?;
    if !svm {
        ctx("unbind", d.unbind(s.vm, 0x4000_0000, len))?;
    }
    Ok(())
}
