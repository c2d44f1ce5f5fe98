// SPDX-License-Identifier: GPL-2.0

//! A preallocated pool of second-pass states for two-pass MMU interval notifiers.
//!
//! A two-pass invalidation hands the core an object between `invalidate_start` and
//! `invalidate_finish`. Notifiers may run from reclaim, so that object cannot be
//! allocated there: it comes from a fixed pool of [`POOL`] slots, taken and returned with
//! a compare-and-exchange on a bit mask (never allocating, never sleeping). When the pool
//! is empty the caller completes the invalidation in the first pass (single pass).

use core::{cell::UnsafeCell, ptr::NonNull};

use kernel::{
    bindings,
    prelude::*,
    sync::atomic::{Acquire, Atomic, Relaxed, Release},
    types::Opaque,
};

use crate::mmu_notifier::FinishItem;

/// Slots per pool (one per concurrent two-pass invalidation).
pub(crate) const POOL: usize = 64;

/// One second-pass state `P`, embedding the core's `struct mmu_interval_notifier_finish`.
#[repr(C)]
pub(crate) struct FinishSlot<P> {
    link: Opaque<bindings::mmu_interval_notifier_finish>,
    /// Owned by whoever took the slot from the pool.
    pending: UnsafeCell<Option<P>>,
    idx: usize,
}

/// [`POOL`] preallocated [`FinishSlot`]s.
pub(crate) struct FinishPool<P> {
    slots: KVec<FinishSlot<P>>,
    free: Atomic<u64>,
}

// SAFETY: A slot's `pending` is only accessed by the owner of the slot (between `get` and
// `put`), which the atomic bit mask makes exclusive; the rest is immutable.
unsafe impl<P: Send> Sync for FinishPool<P> {}
// SAFETY: See `Sync`; `P` is `Send`.
unsafe impl<P: Send> Send for FinishPool<P> {}

/// A slot taken from the pool, handed to the core between the two passes.
pub(crate) struct FinishRef<P>(NonNull<FinishSlot<P>>);

// SAFETY: `into_link` returns the `link` field of a slot of a pool, which its owner keeps
// alive for as long as its notifiers can be invalidated (the pool lives in the object the
// notifiers hold a reference to); `from_link` recovers the slot with `container_of!`.
unsafe impl<P> FinishItem for FinishRef<P> {
    fn into_link(self) -> NonNull<bindings::mmu_interval_notifier_finish> {
        // SAFETY: `self.0` points to a live slot.
        let link = unsafe { (*self.0.as_ptr()).link.get() };
        // SAFETY: A field of a live slot is never null.
        unsafe { NonNull::new_unchecked(link) }
    }

    unsafe fn from_link(link: NonNull<bindings::mmu_interval_notifier_finish>) -> Self {
        // SAFETY: Per the contract, `link` is the `link` field of a `FinishSlot<P>`.
        let slot =
            unsafe { kernel::container_of!(Opaque::cast_from(link.as_ptr()), FinishSlot<P>, link) };
        // SAFETY: `slot` is derived from a valid field pointer.
        Self(unsafe { NonNull::new_unchecked(slot.cast_mut()) })
    }
}

impl<P> FinishPool<P> {
    pub(crate) fn new() -> Result<Self> {
        let mut slots = KVec::with_capacity(POOL, GFP_KERNEL)?;
        for idx in 0..POOL {
            slots.push(
                FinishSlot {
                    link: Opaque::uninit(),
                    pending: UnsafeCell::new(None),
                    idx,
                },
                GFP_KERNEL,
            )?;
        }
        Ok(Self {
            slots,
            free: Atomic::new(u64::MAX),
        })
    }

    /// Takes a free slot and stores `p` in it; gives `p` back if none is free.
    pub(crate) fn get(&self, p: P) -> core::result::Result<FinishRef<P>, P> {
        let mut cur = self.free.load(Relaxed);
        loop {
            if cur == 0 {
                return Err(p);
            }
            let bit = cur.trailing_zeros() as usize;
            match self.free.cmpxchg(cur, cur & !(1u64 << bit), Acquire) {
                Ok(_) => {
                    let slot = &self.slots[bit];
                    // SAFETY: The bit was ours to clear: the slot is exclusively ours.
                    unsafe { *slot.pending.get() = Some(p) };
                    return Ok(FinishRef(NonNull::from(slot)));
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Returns a slot, handing back its state (always `Some` for a slot from `get`).
    pub(crate) fn put(&self, f: FinishRef<P>) -> Option<P> {
        // SAFETY: `f` came from `get` of this pool and is returned once.
        let slot = unsafe { f.0.as_ref() };
        // SAFETY: The slot is ours until its bit is set again below.
        let p = unsafe { (*slot.pending.get()).take() };
        let bit = 1u64 << slot.idx;
        let mut cur = self.free.load(Relaxed);
        loop {
            match self.free.cmpxchg(cur, cur | bit, Release) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        p
    }
}
