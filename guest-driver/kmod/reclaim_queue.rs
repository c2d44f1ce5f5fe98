// SPDX-License-Identifier: GPL-2.0

//! An owned workqueue that may run during memory reclaim.
//!
//! C header: [`include/linux/workqueue.h`](srctree/include/linux/workqueue.h)
//!
//! The kernel's system workqueues may not make progress under memory pressure: their
//! workers are created on demand, which allocates. Work that memory reclaim may end up
//! waiting for — here the GPU fault service (a job blocked on a fault may hold pages
//! reclaim wants) and the device resets an MMU notifier waits for — belongs on a
//! workqueue created with `WQ_MEM_RECLAIM`, which has a rescuer thread of its own.
//! [`ReclaimQueue`] allocates such a queue (`WQ_UNBOUND` too: its items run concurrently,
//! e.g. one fault worker per VM) and destroys it when dropped.

use kernel::{
    bindings,
    prelude::*,
    workqueue::{DelayedWork, Queue, Work},
};

/// Waits until `work` is neither pending nor running (`flush_work`).
pub(crate) fn flush_work<T: ?Sized, const ID: u64>(work: &Work<T, ID>) {
    // SAFETY: `work` is an initialised work item, alive for the call.
    unsafe { bindings::flush_work(Work::raw_get(work)) };
}

/// Waits until the delayed `work` is neither pending nor running (`flush_delayed_work`:
/// a pending timer fires at once).
pub(crate) fn flush_delayed_work<T: ?Sized, const ID: u64>(work: &DelayedWork<T, ID>) {
    // SAFETY: `DelayedWork` is a transparent wrapper of an initialised `struct
    // delayed_work`, alive for the call.
    unsafe {
        bindings::flush_delayed_work(
            core::ptr::from_ref(work)
                .cast::<bindings::delayed_work>()
                .cast_mut(),
        )
    };
}

/// A `WQ_MEM_RECLAIM | WQ_UNBOUND` workqueue, destroyed on drop.
///
/// # Invariants
///
/// `self.0` is a workqueue returned by `alloc_workqueue` and not destroyed yet.
pub(crate) struct ReclaimQueue(core::ptr::NonNull<bindings::workqueue_struct>);

// SAFETY: A workqueue may be used and destroyed from any thread.
unsafe impl Send for ReclaimQueue {}
// SAFETY: Queueing work is thread-safe.
unsafe impl Sync for ReclaimQueue {}

impl ReclaimQueue {
    /// Allocates a queue named `name` (shown by the kernel's workqueue tools).
    pub(crate) fn new(name: &'static CStr) -> Result<Self> {
        let flags = bindings::wq_flags_WQ_MEM_RECLAIM | bindings::wq_flags_WQ_UNBOUND;
        // SAFETY: `"%s"` with one NUL-terminated string argument; max_active 0 = default.
        let wq = unsafe {
            bindings::alloc_workqueue_noprof(c"%s".as_char_ptr(), flags, 0, name.as_char_ptr())
        };
        core::ptr::NonNull::new(wq).map(Self).ok_or(ENOMEM)
    }

    /// The queue, to queue work items on.
    pub(crate) fn queue(&self) -> &Queue {
        // SAFETY: By the type invariant the workqueue lives until `self` is dropped, which
        // the returned borrow cannot outlive.
        unsafe { Queue::from_raw(self.0.as_ptr()) }
    }
}

impl Drop for ReclaimQueue {
    fn drop(&mut self) {
        // SAFETY: By the type invariant the queue is live; destroying it drains what is
        // queued first, and nothing can be queued on it afterwards (it is no longer
        // reachable).
        unsafe { bindings::destroy_workqueue(self.0.as_ptr()) };
    }
}
