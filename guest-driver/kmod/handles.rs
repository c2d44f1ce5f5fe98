// SPDX-License-Identifier: GPL-2.0

//! Per-file handle tables: the ids by which user space names its VMs and exec queues.
//!
//! A table is a maple tree in allocation mode (`MT_FLAGS_ALLOC_RANGE`): a new handle is
//! the lowest free id in `1..=u32::MAX` (0 is never a handle), as xe's `xa_alloc`ed
//! per-file tables; allocation and lookup are O(log n). The kernel's Rust `XArray` (Linux
//! 7.3) has neither an allocating insert nor iteration, which file close needs; its
//! `MapleTreeAlloc` has both.
//!
//! A handle owns its object's *use* by the file: the object is destroyed (its
//! [`Destroy::destroy`], which tells the device) when its handle is removed, or when the
//! table is dropped with the file. Others may still hold references (`Arc`); those only
//! keep memory alive.

use kernel::{
    maple_tree::{AllocErrorKind, MapleTreeAlloc},
    prelude::*,
    sync::Arc,
};

/// An object a handle can own.
pub(crate) trait Destroy: Send + Sync + 'static {
    /// Ends the object's use (called once, when its handle goes; may sleep).
    fn destroy(&self);
}

/// The entry of one handle; destroys its object when dropped.
pub(crate) struct Handle<T: Destroy>(Arc<T>);

impl<T: Destroy> Drop for Handle<T> {
    fn drop(&mut self) {
        self.0.destroy();
    }
}

/// A handle table.
///
/// Entries are dropped (objects destroyed) outside the tree's lock: by the caller of
/// [`Handles::remove`], or by the tree's destructor, which frees entries without it.
#[pin_data]
pub(crate) struct Handles<T: Destroy> {
    #[pin]
    tree: MapleTreeAlloc<KBox<Handle<T>>>,
}

impl<T: Destroy> Handles<T> {
    /// An empty table.
    pub(crate) fn new() -> impl PinInit<Self> {
        pin_init!(Self {
            tree <- MapleTreeAlloc::new(),
        })
    }

    /// The object of handle `id` (`ENOENT` if there is none).
    pub(crate) fn get(&self, id: u32) -> Result<Arc<T>> {
        self.tree
            .lock()
            .load(id as usize)
            .map(|h| h.0.clone())
            .ok_or(ENOENT)
    }

    /// Gives `obj` a new handle. On failure `obj` is destroyed (`ENOMEM`; `ENOSPC` if every
    /// id is taken).
    pub(crate) fn insert(&self, obj: Arc<T>) -> Result<u32> {
        // On failure the entry is dropped, which destroys the object.
        let entry = KBox::new(Handle(obj), GFP_KERNEL)?;
        match self
            .tree
            .alloc_range(1, entry, 1..=u32::MAX as usize, GFP_KERNEL)
        {
            // Within the range asked for.
            Ok(id) => Ok(id as u32),
            Err(e) => {
                drop(e.value);
                Err(match e.cause {
                    AllocErrorKind::Busy => ENOSPC,
                    AllocErrorKind::AllocError(_) => ENOMEM,
                    _ => EINVAL,
                })
            }
        }
    }

    /// Removes handle `id`; its object is destroyed when the returned entry is dropped
    /// (by the caller, after releasing its own locks).
    pub(crate) fn remove(&self, id: u32) -> Option<KBox<Handle<T>>> {
        self.tree.erase(id as usize)
    }

    /// Folds `f` over the objects of every handle (called under the tree's spinlock: it
    /// must not sleep).
    pub(crate) fn fold<A>(&self, init: A, mut f: impl FnMut(A, &T) -> A) -> A {
        let mut guard = self.tree.lock();
        let mut it = guard.ma_state(0, usize::MAX);
        let mut acc = init;
        while let Some(h) = it.find(usize::MAX) {
            acc = f(acc, &h.0);
        }
        acc
    }

    /// Whether the object of some handle satisfies `f` (called under the tree's
    /// spinlock: it must not sleep).
    pub(crate) fn any(&self, f: impl Fn(&T) -> bool) -> bool {
        let mut guard = self.tree.lock();
        let mut it = guard.ma_state(0, usize::MAX);
        while let Some(h) = it.find(usize::MAX) {
            if f(&h.0) {
                return true;
            }
        }
        false
    }
}
