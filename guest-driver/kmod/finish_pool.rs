// SPDX-License-Identifier: GPL-2.0

//! A preallocated pool of second-pass states for two-pass MMU interval notifiers.
//!
//! A two-pass invalidation hands the core an object between `invalidate_start` and
//! `invalidate_finish`. Notifiers may run from reclaim, so that object cannot be
//! allocated there: it comes from a fixed pool of [`POOL`] slots, taken and returned with
//! a compare-and-exchange on a bit mask (never allocating, never sleeping). When the pool
//! is empty the caller completes the invalidation in the first pass (single pass).
//!
//! A taken slot is a [`FinishRef`]: it owns the slot and holds a reference on the pool's
//! storage, so no safe code can give it back to another pool, return it twice, or keep it
//! beyond the pool's life. Between the passes the core holds it as a bare pointer
//! ([`FinishItem`]); the reference on the pool then stays in the slot itself.

use core::{cell::UnsafeCell, mem::ManuallyDrop, ptr::NonNull};

use kernel::{
    prelude::*,
    sync::{
        atomic::{Acquire, Atomic, Relaxed, Release},
        Arc,
    },
    types::Opaque,
};

use crate::mmu_notifier::{FinishItem, FinishLink};

/// Slots per pool (one per concurrent two-pass invalidation).
pub(crate) const POOL: usize = 64;

/// One second-pass state `P`, embedding the core's `struct mmu_interval_notifier_finish`.
#[repr(C)]
struct FinishSlot<P> {
    link: Opaque<FinishLink>,
    /// The state, and while the core holds the slot the reference on the pool; both owned
    /// by whoever took the slot (between `get` and the `FinishRef`'s drop).
    pending: UnsafeCell<Option<P>>,
    parked: UnsafeCell<Option<Arc<Slots<P>>>>,
    idx: usize,
}

/// The pool's storage (shared by the pool and its taken slots).
///
/// # Invariants
///
/// Bit `i` of `free` is clear exactly while slot `i` is owned by a [`FinishRef`] (or by
/// the core, between [`FinishItem::into_link`] and [`FinishItem::from_link`]).
struct Slots<P> {
    slots: KVec<FinishSlot<P>>,
    free: Atomic<u64>,
}

// SAFETY: A slot's cells are only accessed by the slot's owner, which the bit mask makes
// exclusive (type invariant); the rest is immutable or atomic. `P` moves between threads.
unsafe impl<P: Send> Sync for Slots<P> {}
// SAFETY: See `Sync`.
unsafe impl<P: Send> Send for Slots<P> {}

/// [`POOL`] preallocated slots.
pub(crate) struct FinishPool<P: Send> {
    slots: Arc<Slots<P>>,
}

/// A slot taken from a pool, holding a second-pass state; given back to its pool when
/// dropped.
///
/// # Invariants
///
/// Slot `idx` of `pool` is owned by `self` (its bit is clear).
pub(crate) struct FinishRef<P: Send> {
    pool: Arc<Slots<P>>,
    idx: usize,
}

impl<P: Send> FinishRef<P> {
    fn slot(&self) -> &FinishSlot<P> {
        &self.pool.slots[self.idx]
    }

    /// Gives the slot back and returns its state.
    pub(crate) fn into_inner(self) -> Option<P> {
        // SAFETY: The slot is owned by `self` (type invariant).
        unsafe { (*self.slot().pending.get()).take() }
        // `self` is dropped here: the (now empty) slot goes back to the pool.
    }
}

impl<P: Send> Drop for FinishRef<P> {
    fn drop(&mut self) {
        // SAFETY: The slot is owned by `self` (type invariant) until its bit is set below.
        drop(unsafe { (*self.slot().pending.get()).take() });
        let bit = 1u64 << self.idx;
        let mut cur = self.pool.free.load(Relaxed);
        // INVARIANT: The bit is set once the slot is no longer used.
        while let Err(now) = self.pool.free.cmpxchg(cur, cur | bit, Release) {
            cur = now;
        }
    }
}

// SAFETY: `into_link` returns the `link` field of the slot and parks the reference on the
// pool in the slot, so the slot stays allocated while the core holds the pointer;
// `from_link` recovers the slot with `container_of!` and takes the reference back.
unsafe impl<P: Send> FinishItem for FinishRef<P> {
    fn into_link(self) -> NonNull<FinishLink> {
        let this = ManuallyDrop::new(self);
        // SAFETY: `this.pool` is read once and `this` is never used or dropped again.
        let pool = unsafe { core::ptr::read(&this.pool) };
        let slot = &pool.slots[this.idx];
        let link = slot.link.get();
        // SAFETY: The slot is owned by `this` (type invariant), so its cells are ours.
        unsafe { *slot.parked.get() = Some(pool.clone()) };
        drop(pool);
        // SAFETY: A field of a live slot is never null.
        unsafe { NonNull::new_unchecked(link) }
    }

    unsafe fn from_link(link: NonNull<FinishLink>) -> Self {
        // SAFETY: Per the contract, `link` is the `link` field of a `FinishSlot<P>` that
        // `into_link` handed out and that was not recovered since.
        let slot = unsafe {
            &*kernel::container_of!(Opaque::cast_from(link.as_ptr()), FinishSlot<P>, link)
        };
        // SAFETY: As above: the slot is owned by the caller, and `into_link` (which always
        // parks the reference on its pool in it) ran last.
        let pool = unsafe { (*slot.parked.get()).take().unwrap_unchecked() };
        // INVARIANT: The slot's owner, handed back by the core.
        Self {
            pool,
            idx: slot.idx,
        }
    }
}

impl<P: Send> FinishPool<P> {
    /// A pool of [`POOL`] free slots.
    pub(crate) fn new() -> Result<Self> {
        let mut slots = KVec::with_capacity(POOL, GFP_KERNEL)?;
        for idx in 0..POOL {
            slots.push(
                FinishSlot {
                    link: Opaque::uninit(),
                    pending: UnsafeCell::new(None),
                    parked: UnsafeCell::new(None),
                    idx,
                },
                GFP_KERNEL,
            )?;
        }
        // INVARIANT: Every slot is free.
        let slots = Arc::new(
            Slots {
                slots,
                free: Atomic::new(u64::MAX),
            },
            GFP_KERNEL,
        )?;
        Ok(Self { slots })
    }

    /// Takes a free slot and stores `p` in it; gives `p` back if none is free. Never
    /// allocates or sleeps.
    pub(crate) fn get(&self, p: P) -> core::result::Result<FinishRef<P>, P> {
        let pool = &self.slots;
        let mut cur = pool.free.load(Relaxed);
        loop {
            if cur == 0 {
                return Err(p);
            }
            let bit = cur.trailing_zeros() as usize;
            match pool.free.cmpxchg(cur, cur & !(1u64 << bit), Acquire) {
                Ok(_) => {
                    // INVARIANT: We cleared the bit: the slot is ours.
                    let r = FinishRef {
                        pool: pool.clone(),
                        idx: bit,
                    };
                    // SAFETY: The slot is owned by `r`.
                    unsafe { *r.slot().pending.get() = Some(p) };
                    return Ok(r);
                }
                Err(now) => cur = now,
            }
        }
    }
}

#[kunit_tests(svmgpu_finish_pool)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_holds_its_state_until_given_back() -> Result {
        let pool = FinishPool::<u32>::new()?;
        let r = pool.get(7).map_err(|_| ENOSPC)?;
        assert_eq!(r.into_inner(), Some(7));
        // Given back: the pool is full again.
        let mut all = KVec::with_capacity(POOL, GFP_KERNEL)?;
        for i in 0..POOL as u32 {
            all.push(pool.get(i).map_err(|_| ENOSPC)?, GFP_KERNEL)?;
        }
        assert!(pool.get(99).is_err());
        drop(all);
        assert!(pool.get(1).is_ok());
        Ok(())
    }

    #[test]
    fn a_slot_survives_the_core_and_its_pool() -> Result {
        let pool = FinishPool::<u32>::new()?;
        let link = pool.get(5).map_err(|_| ENOSPC)?.into_link();
        // The core holds the slot; the pool handle goes meanwhile.
        drop(pool);
        // SAFETY: `link` came from `into_link` and is recovered once.
        let r = unsafe { FinishRef::<u32>::from_link(link) };
        assert_eq!(r.into_inner(), Some(5));
        Ok(())
    }
}
