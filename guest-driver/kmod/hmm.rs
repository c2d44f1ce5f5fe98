// SPDX-License-Identifier: GPL-2.0

//! A safe abstraction over `hmm_range_fault`.
//!
//! C header: [`include/linux/hmm.h`](srctree/include/linux/hmm.h)
//!
//! [`fault_range`] fills a caller-provided array with the PFNs of a CPU range of the
//! notifier's mm, faulting the pages in (and, if asked, making them writable: COW is
//! broken), inside the `mmu_interval_read_begin` / retry loop the core requires: it
//! returns the notifier sequence the PFNs are valid for. The caller then takes its
//! notifier lock, checks [`IntervalNotifier::read_retry`] with that sequence, and only if
//! it is unchanged lets the device use the pages. No page is pinned: the PFNs are only
//! valid until the notifier's next invalidation.

use crate::mmu_notifier::{IntervalNotifier, IntervalOps};
use kernel::ffi::c_ulong;
use kernel::{
    bindings,
    prelude::*,
    time::{Instant, Monotonic},
};

/// PFN entries of [`fault_range`], in the kernel's `hmm_pfn` encoding.
pub(crate) type HmmPfn = c_ulong;

/// Whether the entry is a valid page.
pub(crate) fn pfn_valid(p: HmmPfn) -> bool {
    p & bindings::hmm_pfn_flags_HMM_PFN_VALID as HmmPfn != 0
}

/// The physical address of a valid entry's page (`hmm_pfn_to_phys`).
pub(crate) fn pfn_to_phys(p: HmmPfn) -> u64 {
    let pfn = p & !(bindings::hmm_pfn_flags_HMM_PFN_FLAGS as HmmPfn);
    (pfn as u64) << bindings::PAGE_SHIFT
}

/// The guest-physical addresses of the pages of `pfns` (spec: the device addresses
/// guest memory by guest-physical address). `EFAULT` if an entry is not a valid page.
///
/// The result is only meaningful while the notifier sequence `pfns` was obtained under
/// is current: call it under the notifier lock, after `read_retry` said so, and let the
/// device use the addresses only until the next invalidation, like `drm_gpusvm_get_pages`
/// maps the pages. Nothing is mapped, so nothing has to be unmapped.
pub(crate) fn page_addresses(pfns: &[HmmPfn], out: &mut [u64]) -> Result {
    if pfns.len() != out.len() {
        return Err(EINVAL);
    }
    for (&p, o) in pfns.iter().zip(out.iter_mut()) {
        if !pfn_valid(p) {
            return Err(EFAULT);
        }
        *o = pfn_to_phys(p);
    }
    Ok(())
}

/// How long [`fault_range`] keeps retrying against concurrent invalidations.
const RETRY_MS: i64 = 5000;

/// Faults `[start, start + pfns.len() * PAGE_SIZE)` of the notifier's mm in and fills
/// `pfns`; with `write`, every page must be (made) writable. Returns the notifier sequence
/// the result is valid for. Errors: `EFAULT` (no mapping, or not writable when `write`:
/// `hmm_range_fault`'s own errors otherwise), `ESRCH` (the mm's process exited),
/// `ETIMEDOUT` (invalidations kept racing for 5 s).
///
/// Must be called without the driver's notifier lock (it sleeps, takes the mmap lock and
/// waits for invalidations in progress).
pub(crate) fn fault_range<T: IntervalOps>(
    notifier: &IntervalNotifier<T>,
    start: usize,
    pfns: &mut [HmmPfn],
    write: bool,
) -> Result<u64> {
    let mm = notifier.mm();
    let mut flags = bindings::hmm_pfn_flags_HMM_PFN_REQ_FAULT as c_ulong;
    if write {
        flags |= bindings::hmm_pfn_flags_HMM_PFN_REQ_WRITE as c_ulong;
    }
    let t0 = Instant::<Monotonic>::now();
    loop {
        let seq = notifier.read_begin();
        let mut range = bindings::hmm_range {
            notifier: core::ptr::null_mut(),
            notifier_seq: seq as c_ulong,
            start: start as c_ulong,
            end: (start + pfns.len() * bindings::PAGE_SIZE) as c_ulong,
            hmm_pfns: pfns.as_mut_ptr(),
            default_flags: flags,
            pfn_flags_mask: 0,
            dev_private_owner: core::ptr::null_mut(),
        };
        // The C core reads the notifier through `range.notifier` to check the sequence.
        range.notifier = notifier_ptr(notifier);
        // SAFETY: `mm` is kept allocated by the notifier (mmgrab); `mmget_not_zero` makes
        // sure its address space is still alive while we use it.
        if !unsafe { bindings::mmget_not_zero(mm) } {
            return Err(ESRCH);
        }
        // SAFETY: We hold an mm_users reference; `range` describes `pfns`, which is valid
        // for `pfns.len()` entries, and the notifier is inserted in `mm`.
        let ret = unsafe {
            bindings::mmap_read_lock(mm);
            let ret = bindings::hmm_range_fault(&mut range);
            bindings::mmap_read_unlock(mm);
            // Never the last reference from here in the common case (the task using the
            // mm is alive); if it is, exit_mmap runs from a workqueue, not under our locks.
            bindings::mmput_async(mm);
            ret
        };
        match ret {
            0 => return Ok(seq),
            e if e == -(bindings::EBUSY as i32) => {
                if t0.elapsed().as_millis() > RETRY_MS {
                    return Err(ETIMEDOUT);
                }
            }
            e => return Err(Error::from_errno(e)),
        }
    }
}

fn notifier_ptr<T: IntervalOps>(n: &IntervalNotifier<T>) -> *mut bindings::mmu_interval_notifier {
    n.as_raw()
}
