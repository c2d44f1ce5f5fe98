// SPDX-License-Identifier: GPL-2.0

//! A safe abstraction over `struct mmu_interval_notifier`, including the two-pass
//! (`invalidate_start` / `invalidate_finish`) operations of Linux 7.3.
//!
//! C header: [`include/linux/mmu_notifier.h`](srctree/include/linux/mmu_notifier.h)
//!
//! An [`IntervalNotifier<T>`] embeds the C notifier and the user's data `T`, is inserted
//! into an mm when it is initialised (it must be pinned: the core keeps a pointer to it)
//! and removed when it is dropped (`mmu_interval_notifier_remove` waits for invalidations
//! in progress, so `T` is never used after the drop). `T` implements [`IntervalOps`]:
//!
//! - single pass: [`IntervalOps::invalidate`]; on return the device must no longer use the
//!   pages of the range;
//! - two passes: [`IntervalOps::invalidate_start`] starts what must be started (TLB
//!   invalidation, preemption) and may return a [`FinishItem`], which the core passes to
//!   [`IntervalOps::invalidate_finish`] after the first pass of *every* notifier of the
//!   invalidation ran, so waits on several devices overlap. Returning no finish item
//!   means the first pass did all the work (the fallback when a preallocated pool of
//!   finish items is empty).
//!
//! Which one the core calls is chosen per notifier at insertion ([`Passes`]).
//!
//! The read side of the collision-retry "lock" is [`IntervalNotifier::read_begin`] and
//! [`IntervalNotifier::read_retry`]; the write side, [`Invalidation::set_seq`], must be
//! called under the same driver lock (the "notifier lock") that the reader holds when it
//! checks [`IntervalNotifier::read_retry`] before making the device use the pages.
//!
//! Rules the callbacks must follow (enforced by the C core only partly): they may be
//! called from reclaim, so they must not allocate with `GFP_KERNEL` or take a lock that
//! is held around such an allocation; when [`Invalidation::blockable`] is false they must
//! not sleep and return `false` (or [`Start::Retry`]) if they would have to.

use core::{marker::PhantomPinned, ptr::NonNull};
use kernel::{bindings, error::to_result, mm::MmWithUser, prelude::*, types::Opaque};

/// Runs `f` as if in memory reclaim, for lockdep: every lock `f` takes is recorded as
/// taken in reclaim, so that PROVE_LOCKING reports any `GFP_KERNEL` allocation (or other
/// wait on reclaim) made while holding one of them, on every path, also those the tests
/// never take. Notifier callbacks may run from reclaim, so a driver primes its notifier
/// locks this way once they exist (as xe and amdgpu do). Without lockdep, just runs `f`.
pub(crate) fn as_in_reclaim<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(CONFIG_LOCKDEP)]
    // SAFETY: Only a lockdep annotation (the acquire of the `fs_reclaim` pseudo lock),
    // released below.
    unsafe {
        bindings::fs_reclaim_acquire(bindings::GFP_KERNEL)
    };
    let r = f();
    #[cfg(CONFIG_LOCKDEP)]
    // SAFETY: Releases the annotation taken above.
    unsafe {
        bindings::fs_reclaim_release(bindings::GFP_KERNEL)
    };
    r
}

/// One invalidation, as passed to the callbacks.
pub(crate) struct Invalidation<'a> {
    sub: *mut bindings::mmu_interval_notifier,
    range: &'a bindings::mmu_notifier_range,
    cur_seq: kernel::ffi::c_ulong,
}

impl Invalidation<'_> {
    /// Whether the range is being unmapped (`MMU_NOTIFY_UNMAP`: munmap, mremap's source).
    pub(crate) fn is_unmap(&self) -> bool {
        self.event() == bindings::mmu_notifier_event_MMU_NOTIFY_UNMAP
    }

    /// First byte of the invalidated CPU range.
    #[allow(dead_code)]
    pub(crate) fn start(&self) -> usize {
        self.range.start
    }

    /// End (exclusive) of the invalidated CPU range.
    #[allow(dead_code)]
    pub(crate) fn end(&self) -> usize {
        self.range.end
    }

    /// Whether the callback may sleep. If not, it must return `false` / [`Start::Retry`]
    /// instead of sleeping, and the core retries (or fails, e.g. the OOM reaper skips).
    pub(crate) fn blockable(&self) -> bool {
        // SAFETY: `range` is valid for the duration of the callback.
        unsafe { bindings::mmu_notifier_range_blockable(self.range) }
    }

    /// The `enum mmu_notifier_event` of the invalidation (unmap, protection change...).
    pub(crate) fn event(&self) -> u32 {
        self.range.event
    }

    /// Publishes the invalidation's sequence number: afterwards
    /// [`IntervalNotifier::read_retry`] with any earlier sequence returns true. Call it
    /// under the driver's notifier lock.
    pub(crate) fn set_seq(&self) {
        // SAFETY: `sub` is the notifier this invalidation is for, live during the callback.
        unsafe { bindings::mmu_interval_set_seq(self.sub, self.cur_seq) };
    }
}

/// What the first pass of a two-pass invalidation did.
pub(crate) enum Start<F> {
    /// The callback could not proceed without sleeping in a non-blockable invalidation:
    /// the core gets `false`.
    Retry,
    /// Done: the device no longer uses the pages; no second pass.
    Done,
    /// Started: `F` is passed to [`IntervalOps::invalidate_finish`], which finishes.
    Finish(F),
}

/// The C link of a second-pass state (`struct mmu_interval_notifier_finish`), which a
/// [`FinishItem`] embeds and hands to the core.
pub(crate) type FinishLink = bindings::mmu_interval_notifier_finish;

/// An object that carries the state between the two passes.
///
/// # Safety
///
/// [`FinishItem::into_link`] must return a pointer to a `struct mmu_interval_notifier_finish`
/// that stays valid (and is not used otherwise) until [`FinishItem::from_link`] is called
/// on it, which must return the same object.
pub(crate) unsafe trait FinishItem: Sized {
    /// Hands the object to the core.
    fn into_link(self) -> NonNull<FinishLink>;

    /// Takes the object back.
    ///
    /// # Safety
    ///
    /// `link` must come from [`FinishItem::into_link`] of this type, and be used once.
    unsafe fn from_link(link: NonNull<FinishLink>) -> Self;
}

/// The callbacks of an [`IntervalNotifier`].
pub(crate) trait IntervalOps: Send + Sync + Sized {
    /// The second-pass state.
    type Finish: FinishItem;

    /// Single pass: stop the device from using the pages in the range before returning.
    /// Returns false only if it would have to sleep and the invalidation is not blockable.
    fn invalidate(this: &IntervalNotifier<Self>, inv: &Invalidation<'_>) -> bool;

    /// First pass: start stopping the device from using the pages.
    fn invalidate_start(
        this: &IntervalNotifier<Self>,
        inv: &Invalidation<'_>,
    ) -> Start<Self::Finish>;

    /// Second pass: wait until the device no longer uses the pages.
    fn invalidate_finish(this: &IntervalNotifier<Self>, finish: Self::Finish);
}

/// Which callbacks the core calls.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Passes {
    /// `invalidate` only.
    Single,
    /// `invalidate_start`, then `invalidate_finish` for the items it returned.
    Two,
}

/// Sets `mm` up for interval notifiers (`mmu_notifier_register(NULL, mm)`: the notifier
/// subscriptions and their interval tree), if that was not done yet. Their first insertion
/// would otherwise do it, under `mm_take_all_locks`: call this where the caller holds none
/// of the driver's locks (an ioctl creating a VM or a binding), so that later insertions
/// (from the fault worker, under the driver's locks) never take every VMA lock of the mm.
pub(crate) fn prepare_interval_notifiers(mm: &MmWithUser) -> Result {
    // SAFETY: `mm` has `mm_users > 0` while the reference lives; a NULL subscription only
    // allocates the mm's notifier state (the core takes the mmap lock itself).
    to_result(unsafe { bindings::mmu_notifier_register(core::ptr::null_mut(), mm.as_raw()) })
}

/// An MMU interval notifier with the user's data `T`.
///
/// # Invariants
///
/// `raw` is inserted in the mm of [`IntervalNotifier::mm`] from initialisation until drop.
#[pin_data(PinnedDrop)]
pub(crate) struct IntervalNotifier<T: IntervalOps> {
    data: T,
    #[pin]
    raw: Opaque<bindings::mmu_interval_notifier>,
    #[pin]
    _pin: PhantomPinned,
}

// SAFETY: The C notifier is used by the core from any thread; `T` is `Send + Sync`.
unsafe impl<T: IntervalOps> Send for IntervalNotifier<T> {}
// SAFETY: See `Send`.
unsafe impl<T: IntervalOps> Sync for IntervalNotifier<T> {}

impl<T: IntervalOps> IntervalNotifier<T> {
    const OPS_SINGLE: bindings::mmu_interval_notifier_ops = bindings::mmu_interval_notifier_ops {
        invalidate: Some(Self::invalidate_cb),
        invalidate_start: None,
        invalidate_finish: None,
    };
    const OPS_TWO: bindings::mmu_interval_notifier_ops = bindings::mmu_interval_notifier_ops {
        invalidate: None,
        invalidate_start: Some(Self::invalidate_start_cb),
        invalidate_finish: Some(Self::invalidate_finish_cb),
    };

    /// A notifier for `[start, start + length)` of `mm`, with `data`; inserted at once
    /// (callbacks may run before the initialiser returns).
    pub(crate) fn new(
        mm: &MmWithUser,
        start: usize,
        length: usize,
        passes: Passes,
        data: T,
    ) -> impl PinInit<Self, Error> + '_
    where
        T: 'static,
    {
        let ops: &'static bindings::mmu_interval_notifier_ops = match passes {
            Passes::Single => const { &Self::OPS_SINGLE },
            Passes::Two => const { &Self::OPS_TWO },
        };
        try_pin_init!(Self {
            data,
            raw <- Opaque::try_ffi_init(move |raw: *mut bindings::mmu_interval_notifier| {
                // SAFETY: `raw` is pinned memory for a notifier (the core initialises every
                // field it uses); `mm` is alive; `ops` is 'static; `data` is initialised
                // already (fields are initialised in order), so callbacks may run.
                kernel::error::to_result(unsafe {
                    bindings::mmu_interval_notifier_insert(raw, mm.as_raw(), start, length, ops)
                })
            }),
            _pin: PhantomPinned,
        })
    }

    /// The user's data.
    pub(crate) fn data(&self) -> &T {
        &self.data
    }

    /// The C notifier.
    pub(crate) fn as_raw(&self) -> *mut bindings::mmu_interval_notifier {
        self.raw.get()
    }

    /// The mm the notifier is inserted in (the core holds a `mmgrab` reference on it).
    pub(crate) fn mm(&self) -> *mut bindings::mm_struct {
        // SAFETY: `mm` is set by the insertion and constant until removal.
        unsafe { (*self.as_raw()).mm }
    }

    /// Begins a read-side critical section: returns the sequence to check with
    /// [`IntervalNotifier::read_retry`]. Sleeps while an invalidation is in progress.
    pub(crate) fn read_begin(&self) -> u64 {
        // SAFETY: The notifier is inserted (type invariant).
        unsafe { bindings::mmu_interval_read_begin(self.as_raw()) as u64 }
    }

    /// Whether an invalidation started since `seq` was read: the pages obtained under
    /// `seq` must not be used. Call it under the notifier lock.
    pub(crate) fn read_retry(&self, seq: u64) -> bool {
        // SAFETY: The notifier is inserted (type invariant).
        unsafe { bindings::mmu_interval_read_retry(self.as_raw(), seq as usize) }
    }

    /// Like [`IntervalNotifier::read_retry`], without the lock (an early, racy check).
    #[allow(dead_code)]
    pub(crate) fn check_retry(&self, seq: u64) -> bool {
        // SAFETY: The notifier is inserted (type invariant).
        unsafe { bindings::mmu_interval_check_retry(self.as_raw(), seq as usize) }
    }

    /// # Safety
    ///
    /// `sub` must be the `raw` field of a live `IntervalNotifier<T>`.
    unsafe fn from_raw<'a>(sub: *mut bindings::mmu_interval_notifier) -> &'a Self {
        // SAFETY: Per the function's contract, `sub` is the `raw` field of a `Self`.
        unsafe { &*kernel::container_of!(Opaque::cast_from(sub), Self, raw) }
    }

    /// `mmu_interval_notifier_ops::invalidate` (single pass).
    ///
    /// # Safety
    ///
    /// Called by the core only: `sub` is an inserted notifier whose ops table is ours (so
    /// it is the `raw` field of a live `Self`), `range` is valid for the call.
    unsafe extern "C" fn invalidate_cb(
        sub: *mut bindings::mmu_interval_notifier,
        range: *const bindings::mmu_notifier_range,
        cur_seq: kernel::ffi::c_ulong,
    ) -> bool {
        // SAFETY: The core calls this for an inserted notifier, i.e. one of ours (only our
        // ops tables point here), which is not removed before the callback returns.
        let this = unsafe { Self::from_raw(sub) };
        let inv = Invalidation {
            sub,
            // SAFETY: `range` is valid for the duration of the callback.
            range: unsafe { &*range },
            cur_seq,
        };
        T::invalidate(this, &inv)
    }

    /// `mmu_interval_notifier_ops::invalidate_start` (first pass).
    ///
    /// # Safety
    ///
    /// As for [`Self::invalidate_cb`]; `finish` points to the core's output pointer.
    unsafe extern "C" fn invalidate_start_cb(
        sub: *mut bindings::mmu_interval_notifier,
        range: *const bindings::mmu_notifier_range,
        cur_seq: kernel::ffi::c_ulong,
        finish: *mut *mut bindings::mmu_interval_notifier_finish,
    ) -> bool {
        // SAFETY: As in `invalidate_cb`.
        let this = unsafe { Self::from_raw(sub) };
        let inv = Invalidation {
            sub,
            // SAFETY: `range` is valid for the duration of the callback.
            range: unsafe { &*range },
            cur_seq,
        };
        // SAFETY: `finish` points to the core's (NULL-initialised) output pointer.
        unsafe { *finish = core::ptr::null_mut() };
        match T::invalidate_start(this, &inv) {
            Start::Retry => false,
            Start::Done => true,
            Start::Finish(f) => {
                // SAFETY: As above; the core links the item and passes it back to
                // `invalidate_finish_cb` (the notifier field is set by the core).
                unsafe { *finish = f.into_link().as_ptr() };
                true
            }
        }
    }

    /// `mmu_interval_notifier_ops::invalidate_finish` (second pass).
    ///
    /// # Safety
    ///
    /// Called by the core only, with an item [`Self::invalidate_start_cb`] returned (its
    /// `notifier` field set by the core), once.
    unsafe extern "C" fn invalidate_finish_cb(finish: *mut bindings::mmu_interval_notifier_finish) {
        // SAFETY: The core passes back an item returned by `invalidate_start_cb`, with its
        // `notifier` set to our notifier.
        let (this, item) = unsafe {
            let this = Self::from_raw((*finish).notifier);
            (this, T::Finish::from_link(NonNull::new_unchecked(finish)))
        };
        T::invalidate_finish(this, item);
    }
}

#[pinned_drop]
impl<T: IntervalOps> PinnedDrop for IntervalNotifier<T> {
    fn drop(self: Pin<&mut Self>) {
        // SAFETY: The notifier was inserted at initialisation (type invariant); removal
        // waits for running invalidations, so no callback uses `self` afterwards.
        unsafe { bindings::mmu_interval_notifier_remove(self.as_raw()) };
    }
}
