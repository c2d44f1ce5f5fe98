// SPDX-License-Identifier: GPL-2.0

//! A device's id tables: contexts (by context id) and VMs (by ASID).
//!
//! The ids are dense and bounded by the device's config space (`max_contexts`,
//! `num_asids`, at most 4096 here), and the completion interrupt looks contexts up by id:
//! so the objects live in an array indexed by id (O(1) lookup, no allocation, usable under
//! an IRQ-safe spinlock), and free ids come from the kernel's `IdPool` (a bitmap searched
//! with `find_next_zero_bit`), as binder allocates its handles.
//!
//! An id is *reserved* from allocation until it is released; the object is *published*
//! (found by [`IdTable::get`]) separately, so that a VM can be created on its ASID
//! without the table's lock.

use kernel::{id_pool::IdPool, prelude::*};

/// Objects by id, ids below a fixed limit.
///
/// # Invariants
///
/// `slots.len()` is the limit; a slot is `Some` only if its id is reserved in `ids`.
pub(crate) struct IdTable<T> {
    slots: KVec<Option<T>>,
    ids: IdPool,
}

impl<T> IdTable<T> {
    /// A table of ids `0..limit`.
    pub(crate) fn new(limit: usize) -> Result<Self> {
        let mut slots = KVec::with_capacity(limit, GFP_KERNEL)?;
        for _ in 0..limit {
            // Within the capacity.
            slots.push(None, GFP_KERNEL)?;
        }
        Ok(Self {
            slots,
            ids: IdPool::with_capacity(limit, GFP_KERNEL)?,
        })
    }

    /// Reserves the lowest free id (`ENOSPC` if none is left). Never allocates.
    pub(crate) fn reserve(&mut self) -> Result<u32> {
        let limit = self.slots.len();
        // The pool may be larger than the limit (its smallest size is a machine word).
        let unused = self.ids.find_unused_id(0).ok_or(ENOSPC)?;
        if unused.as_usize() >= limit {
            return Err(ENOSPC);
        }
        // Below the limit, which is at most 4096.
        Ok(unused.acquire() as u32)
    }

    /// Publishes `obj` under the reserved id `id`.
    pub(crate) fn publish(&mut self, id: u32, obj: T) {
        if let Some(s) = self.slots.get_mut(id as usize) {
            *s = Some(obj);
        }
    }

    /// Reserves an id and publishes `obj` under it.
    pub(crate) fn insert(&mut self, obj: T) -> Result<u32> {
        let id = self.reserve()?;
        self.publish(id, obj);
        Ok(id)
    }

    /// Releases `id` and returns its object, if one was published (drop it outside an
    /// IRQ-safe lock).
    pub(crate) fn release(&mut self, id: u32) -> Option<T> {
        let obj = self.slots.get_mut(id as usize)?.take();
        self.ids.release_id(id as usize);
        obj
    }

    /// The object published under `id`.
    pub(crate) fn get(&self, id: u32) -> Option<&T> {
        self.slots.get(id as usize)?.as_ref()
    }

    /// Every published object, by increasing id.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().flatten()
    }

    /// Takes every published object out (their ids stay reserved: the table is retired).
    pub(crate) fn take_all(&mut self) -> impl Iterator<Item = T> + '_ {
        self.slots.iter_mut().filter_map(Option::take)
    }

    /// The limit: ids are below it.
    pub(crate) fn limit(&self) -> usize {
        self.slots.len()
    }
}
