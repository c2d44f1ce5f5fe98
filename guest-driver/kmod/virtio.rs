// SPDX-License-Identifier: GPL-2.0

//! A virtio bus abstraction over the C virtio core.
//!
//! The kernel's Rust tree has no virtio abstraction yet; this one follows the shape of the
//! in-tree bus abstractions (`auxiliary`, `pci`): an [`Adapter`] registered through
//! [`kernel::driver::Registration`] calls a [`Driver`]'s `probe` with a
//! `&Device<Core<'_>>` and stores the returned data as the device's driver data (dropped
//! by the driver core after `remove`, once `unbind` has run). [`Device`] is a transparent
//! wrapper of `struct virtio_device` typed by its [`DeviceContext`], so it can be the
//! parent of a DRM device ([`device::AsBusDevice`]).
//!
//! [`Virtqueue`]s carry buffer submission and completion. The virtio core requires callers
//! to serialise `add`, `kick` and `get_buf` on one queue; every operation therefore takes
//! `&mut self`, and the owner keeps the queue under a lock that the queue's interrupt
//! callback takes too. Adding buffers uses `GFP_ATOMIC` and never sleeps, so it may be
//! called under spinlocks and from MMU-notifier context.
//!
//! The queues' memory is freed by [`Device::del_vqs`], which the types make safe: it takes
//! the [`Reset`] that only [`Device::reset`] returns (the device no longer uses the rings),
//! and the [`Queues`] set that every [`Virtqueue`] holds a reference to, so it frees the
//! rings only when no handle is left that could touch them.

use core::{
    ffi::{c_int, c_uint, c_void},
    marker::PhantomData,
    mem::offset_of,
    ptr::NonNull,
};
use kernel::{
    bindings,
    device::{self, Bound, Core, CoreInternal, DeviceContext, Normal},
    driver,
    error::{from_result, to_result},
    prelude::*,
    sync::Arc,
    types::Opaque,
    ThisModule,
};

/// A table matching one virtio device ID (any vendor), as the virtio core wants it.
#[repr(transparent)]
pub(crate) struct IdTable([bindings::virtio_device_id; 2]);

// SAFETY: The table is immutable plain data.
unsafe impl Sync for IdTable {}

impl IdTable {
    /// A table for `device`, terminated by the zero entry the core expects.
    pub(crate) const fn new(device: u32) -> Self {
        Self([
            bindings::virtio_device_id {
                device,
                vendor: u32::MAX,
            },
            bindings::virtio_device_id {
                device: 0,
                vendor: 0,
            },
        ])
    }
}

/// A virtio driver: what the bus calls for each matching device.
pub(crate) trait Driver: Send + 'static {
    /// Per-device data kept from `probe` until the device is unbound.
    type Data<'bound>: Send + 'bound;
    /// The devices this driver binds.
    const ID_TABLE: &'static IdTable;

    /// The device feature bits the driver accepts (besides the transport's, e.g.
    /// `VIRTIO_F_VERSION_1`). Read once, at registration.
    fn features() -> &'static [c_uint];

    /// Called for each matching device; features are negotiated, queues not yet found.
    fn probe<'bound>(
        dev: &'bound Device<Core<'_>>,
    ) -> impl PinInit<Self::Data<'bound>, Error> + 'bound;

    /// Called when the device is unbound (removal or driver unload). The driver must reset
    /// the device here (the virtio core checks that the status is 0 afterwards) and delete
    /// its queues; `this` is dropped afterwards by the driver core.
    fn unbind<'bound>(dev: &'bound Device<Core<'_>>, this: Pin<&Self::Data<'bound>>);
}

/// The registration adapter of a [`Driver`]: register it with
/// `kernel::driver::Registration::<Adapter<T>>::new(name, module)`.
pub(crate) struct Adapter<T: Driver>(T);

// SAFETY:
// - `bindings::virtio_driver` is a C type declared `repr(C)` and embeds a `device_driver`.
// - `T::Data` is the type of the driver's bus device private data, stored by
//   `probe_callback` with `set_drvdata`.
// - `DEVICE_DRIVER_OFFSET` is the offset of that embedded `struct device_driver`.
unsafe impl<T: Driver> driver::DriverLayout for Adapter<T> {
    type DriverType = bindings::virtio_driver;
    type DriverData<'bound> = T::Data<'bound>;
    const DEVICE_DRIVER_OFFSET: usize = offset_of!(bindings::virtio_driver, driver);
}

// SAFETY: `unregister` is only called for a driver `register` registered successfully.
unsafe impl<T: Driver> driver::RegistrationOps for Adapter<T> {
    unsafe fn register(
        vdrv: &Opaque<Self::DriverType>,
        name: &'static CStr,
        module: &'static ThisModule,
    ) -> Result {
        let features = T::features();
        // SAFETY: The fields of a `virtio_driver` that is not registered yet may be set; the
        // ID and feature tables are `'static`.
        unsafe {
            let d = vdrv.get();
            (*d).driver.name = name.as_char_ptr();
            (*d).id_table = T::ID_TABLE.0.as_ptr();
            (*d).feature_table = features.as_ptr();
            (*d).feature_table_size = features.len() as c_uint;
            (*d).probe = Some(Self::probe_callback);
            (*d).remove = Some(Self::remove_callback);
        }
        // SAFETY: `vdrv` is a valid, pinned `virtio_driver` that stays alive until
        // `unregister`; `module` outlives it.
        to_result(unsafe { bindings::__register_virtio_driver(vdrv.get(), module.as_ptr()) })
    }

    unsafe fn unregister(vdrv: &Opaque<Self::DriverType>) {
        // SAFETY: The driver was registered by `register` (the caller's promise).
        unsafe { bindings::unregister_virtio_driver(vdrv.get()) };
    }
}

impl<T: Driver> Adapter<T> {
    extern "C" fn probe_callback(vdev: *mut bindings::virtio_device) -> c_int {
        // SAFETY: The virtio core calls probe with a valid device that stays valid for the
        // duration of the callback.
        //
        // INVARIANT: `vdev` is valid for the duration of `probe_callback()`.
        let dev = unsafe { &*vdev.cast::<Device<CoreInternal<'_>>>() };
        from_result(|| {
            let data = T::probe(dev);
            dev.as_ref().set_drvdata(data)?;
            Ok(0)
        })
    }

    extern "C" fn remove_callback(vdev: *mut bindings::virtio_device) {
        // SAFETY: The virtio core calls remove with a valid device.
        //
        // INVARIANT: `vdev` is valid for the duration of `remove_callback()`.
        let dev = unsafe { &*vdev.cast::<Device<CoreInternal<'_>>>() };
        // SAFETY: `remove` is only called after a successful `probe_callback`, which stored a
        // `Pin<KBox<T::Data<'_>>>` with `set_drvdata`; the driver core drops it only after
        // this callback returned.
        let data = unsafe { dev.as_ref().drvdata_borrow::<T::Data<'_>>() };
        T::unbind(dev, data);
    }
}

/// A virtio device, typed by the context it is known to be in.
///
/// # Invariants
///
/// `self.0` is a valid `struct virtio_device` created by the virtio core.
#[repr(transparent)]
pub(crate) struct Device<Ctx: DeviceContext = Normal>(
    Opaque<bindings::virtio_device>,
    PhantomData<Ctx>,
);

impl<Ctx: DeviceContext> Device<Ctx> {
    pub(crate) fn as_raw(&self) -> *mut bindings::virtio_device {
        self.0.get()
    }

    /// The bus index of this device (`virtioN`).
    pub(crate) fn index(&self) -> u32 {
        // SAFETY: `index` is set by the core before the device is registered and never
        // changes.
        unsafe { (*self.as_raw()).index as u32 }
    }

    /// Reads `buf.len()` bytes of the device's config space at `offset`, retrying until the
    /// config generation is stable, as the virtio core does.
    pub(crate) fn read_config(&self, offset: u32, buf: &mut [u8]) {
        // SAFETY: `buf` is valid for writes of its length; callers pass offsets within the
        // device's config size (the transport bounds-checks against it too).
        unsafe {
            bindings::virtio_cread_bytes(self.as_raw(), offset, buf.as_mut_ptr().cast(), buf.len())
        };
    }

    /// The device features the driver and the device agreed on (a bit mask).
    pub(crate) fn features(&self) -> u64 {
        // SAFETY: `features` is written by the core during probe, before the driver runs.
        unsafe { (*self.as_raw()).__bindgen_anon_1.features }
    }
}

impl Device<Bound> {
    /// The device that performs DMA for this virtio device: its transport's (PCI) device,
    /// as for the virtio rings (`vring_dma_dev`). The device has no IOMMU in front of it
    /// (no `VIRTIO_F_ACCESS_PLATFORM`), so DMA addresses are guest-physical addresses.
    pub(crate) fn dma_device(&self) -> &device::Device<Bound> {
        // SAFETY: The virtio device holds a reference on its parent, which is set at
        // creation and never changes.
        let parent = unsafe { (*self.as_raw()).dev.parent };
        // SAFETY: A virtio device always has a transport parent; it is valid while `self`
        // is.
        let parent: &device::Device = unsafe { device::Device::from_raw(parent) };
        // SAFETY: The transport device is bound (its driver created this device and removes
        // it before unbinding) for as long as this device is bound.
        unsafe { parent.as_bound() }
    }
}

impl<'a> Device<Core<'a>> {
    /// Sets the pointer the queue callbacks receive as their context.
    ///
    /// # Safety
    ///
    /// `ctx` must stay valid until [`Device::del_vqs`] returned.
    pub(crate) unsafe fn set_callback_context(&self, ctx: *const c_void) {
        // SAFETY: `priv_` is the driver's field of a live device; the core never reads it.
        unsafe { (*self.as_raw()).priv_ = ctx.cast_mut() };
    }

    /// Finds the device's queues. Each entry is a name and an optional callback, which runs
    /// in hard-interrupt context with the queue; [`callback_context`] gives the context of
    /// [`Device::set_callback_context`]. The [`Queues`] set is what [`Device::del_vqs`]
    /// takes back.
    pub(crate) fn find_vqs<const N: usize>(
        &self,
        specs: &[(&'static CStr, Option<Callback>); N],
    ) -> Result<(Queues, [Virtqueue; N])> {
        let set = Arc::new(QueueSet, GFP_KERNEL)?;
        let mut infos: [bindings::virtqueue_info; N] = [bindings::virtqueue_info {
            name: core::ptr::null(),
            callback: None,
            ctx: false,
        }; N];
        for (info, (name, cb)) in infos.iter_mut().zip(specs.iter()) {
            info.name = name.as_char_ptr();
            info.callback = *cb;
        }
        let mut vqs = [core::ptr::null_mut::<bindings::virtqueue>(); N];
        // SAFETY: Both arrays hold `N` entries; names are 'static.
        to_result(unsafe {
            bindings::virtio_find_vqs(
                self.as_raw(),
                N as u32,
                vqs.as_mut_ptr(),
                infos.as_mut_ptr(),
                core::ptr::null_mut(),
            )
        })?;
        let mut out = [const { None }; N];
        for (slot, vq) in out.iter_mut().zip(vqs) {
            *slot = NonNull::new(vq).map(|vq| Virtqueue {
                vq,
                _set: set.clone(),
            });
        }
        if out.iter().any(Option::is_none) {
            drop(out);
            let reset = self.reset();
            self.del_vqs(reset, Queues(set))?;
            return Err(ENODEV);
        }
        Ok((
            Queues(set),
            out.map(|v| v.expect("all queues were just checked")),
        ))
    }

    /// Tells the device the driver is ready (DRIVER_OK); queues may run from now on.
    pub(crate) fn ready(&self) {
        // SAFETY: Called from probe, once, after the queues were found.
        unsafe { bindings::virtio_device_ready(self.as_raw()) };
    }

    /// Resets the device: afterwards it touches no buffer and raises no interrupt. The
    /// returned proof is what [`Device::del_vqs`] asks for.
    pub(crate) fn reset(&self) -> Reset<'_> {
        // SAFETY: The device is live; a reset is allowed at any point in probe and unbind.
        unsafe { bindings::virtio_reset_device(self.as_raw()) };
        Reset(PhantomData)
    }

    /// Deletes the queues found by [`Device::find_vqs`] after the device was reset.
    ///
    /// Fails with `EBUSY`, and leaves the queues allocated, if a [`Virtqueue`] handle is
    /// still alive: freeing the rings under it would let safe code touch freed memory.
    pub(crate) fn del_vqs(&self, _reset: Reset<'_>, queues: Queues) -> Result {
        if Arc::into_unique_or_drop(queues.0).is_none() {
            dev_err!(
                self,
                "a virtqueue handle outlives its device; queues not deleted\n"
            );
            return Err(EBUSY);
        }
        // SAFETY: The device was reset (the `Reset` proof), so no callback runs and the
        // device no longer reads the rings; no `Virtqueue` is left (the set was unique).
        unsafe { bindings::virtio_del_vqs(self.as_raw()) };
        Ok(())
    }
}

/// Proof that a device was reset by [`Device::reset`] since the proof was made: the device
/// touches no buffer and raises no interrupt.
#[must_use = "the proof is needed to delete the queues"]
pub(crate) struct Reset<'a>(PhantomData<&'a ()>);

/// The set of a device's queues, as [`Device::find_vqs`] found them.
///
/// # Invariants
///
/// Every [`Virtqueue`] of the set holds a reference to the same `Arc`, so the set's
/// reference is unique only when no queue handle is left.
pub(crate) struct Queues(Arc<QueueSet>);

/// What a [`Queues`] set and its handles share.
struct QueueSet;

// SAFETY: `Device` is a transparent wrapper of a type that doesn't depend on its generic
// argument.
kernel::impl_device_context_deref!(unsafe { Device });
kernel::impl_device_context_into_aref!(Device);

// SAFETY: Instances of `Device` are always reference-counted through their `struct device`.
unsafe impl kernel::sync::aref::AlwaysRefCounted for Device {
    fn inc_ref(&self) {
        // SAFETY: The existence of a shared reference means the refcount is nonzero.
        unsafe { bindings::get_device(&raw mut (*self.as_raw()).dev) };
    }

    unsafe fn dec_ref(obj: NonNull<Self>) {
        let vdev: *mut bindings::virtio_device = obj.cast().as_ptr();
        // SAFETY: The caller promises the refcount is nonzero; `vdev` is valid.
        unsafe { bindings::put_device(&raw mut (*vdev).dev) };
    }
}

impl<Ctx: DeviceContext> AsRef<device::Device<Ctx>> for Device<Ctx> {
    fn as_ref(&self) -> &device::Device<Ctx> {
        // SAFETY: By the type invariant `self.as_raw()` is a valid `virtio_device`, whose
        // embedded `struct device` is valid as long as `self` is.
        unsafe { device::Device::from_raw(&raw mut (*self.as_raw()).dev) }
    }
}

// SAFETY: `Device` is a transparent wrapper of `struct virtio_device`, whose base
// `struct device` is the `dev` field.
unsafe impl<Ctx: DeviceContext> device::AsBusDevice<Ctx> for Device<Ctx> {
    const OFFSET: usize = offset_of!(bindings::virtio_device, dev);
}

// SAFETY: A `virtio_device` can be used from any thread; its mutable state is owned by the
// virtio core and the driver's own locking.
unsafe impl Send for Device {}
// SAFETY: See `Send`.
unsafe impl Sync for Device {}
// SAFETY: See `Send`.
unsafe impl Sync for Device<Bound> {}

/// A queue interrupt callback.
/// The C virtqueue a [`Callback`] is called with.
pub(crate) type RawVirtqueue = bindings::virtqueue;

/// A virtqueue callback (interrupt context).
pub(crate) type Callback = unsafe extern "C" fn(*mut RawVirtqueue);

/// A handle that can reset a bound virtio device from any context that may sleep, e.g. a
/// work item an MMU notifier waits for (the driver's reset of last resort).
///
/// # Invariants
///
/// `self.0` is a virtio device that stays bound while the handle is used (the owner only
/// resets through it while the device is bound: removal waits for its users).
pub(crate) struct ResetHandle(NonNull<bindings::virtio_device>);

// SAFETY: A virtio reset may be requested from any thread; the virtio core serialises it.
unsafe impl Send for ResetHandle {}
// SAFETY: See `Send`.
unsafe impl Sync for ResetHandle {}

impl ResetHandle {
    /// A handle for `dev`.
    ///
    /// # Safety
    ///
    /// The handle must only be used ([`ResetHandle::reset`]) while `dev` is bound.
    pub(crate) unsafe fn new<Ctx: DeviceContext>(dev: &Device<Ctx>) -> Self {
        // SAFETY: `dev.as_raw()` is a valid device pointer (type invariant of `Device`).
        Self(unsafe { NonNull::new_unchecked(dev.as_raw()) })
    }

    /// Resets the device: afterwards it touches no memory and raises no interrupt.
    pub(crate) fn reset(&self) {
        // SAFETY: By the type invariant the device is bound; a reset is allowed at any time.
        unsafe { bindings::virtio_reset_device(self.0.as_ptr()) };
    }
}

/// Returns the callback context set with [`Device::set_callback_context`] for `vq`.
///
/// # Safety
///
/// `vq` must be the argument of a queue callback.
pub(crate) unsafe fn callback_context(vq: *mut RawVirtqueue) -> *const c_void {
    // SAFETY: A callback's queue and its device are live while the callback runs.
    unsafe { (*(*vq).vdev).priv_ }
}

/// One virtqueue. Not `Clone`: whoever owns it serialises its use.
///
/// # Invariants
///
/// `vq` is a queue of a device whose queues are not deleted while `_set` lives (see
/// [`Queues`]).
pub(crate) struct Virtqueue {
    vq: NonNull<bindings::virtqueue>,
    _set: Arc<QueueSet>,
}

// SAFETY: A virtqueue may be used from any thread as long as uses are serialised, which
// `&mut self` on every operation guarantees.
unsafe impl Send for Virtqueue {}

impl Virtqueue {
    /// Queues one chain: `out` is read by the device, `inb` written by it. `token` (not
    /// zero) comes back from [`Virtqueue::get_buf`].
    ///
    /// # Safety
    ///
    /// Both buffers must be in the kernel's linear map (kmalloc) and stay valid, unmoved
    /// and unused by the CPU until the chain comes back from [`Virtqueue::get_buf`] or the
    /// device is reset.
    pub(crate) unsafe fn add_chain(&mut self, out: &[u8], inb: &mut [u8], token: usize) -> Result {
        if token == 0 {
            return Err(EINVAL);
        }
        // SAFETY: `scatterlist` is plain data; all-zero is its initial state.
        let mut sg_out: bindings::scatterlist = unsafe { core::mem::zeroed() };
        // SAFETY: As above.
        let mut sg_in: bindings::scatterlist = unsafe { core::mem::zeroed() };
        // SAFETY: The buffers are in the linear map and live as long as the chain, per this
        // function's contract.
        unsafe {
            bindings::sg_init_one(&mut sg_out, out.as_ptr().cast(), out.len() as u32);
            bindings::sg_init_one(&mut sg_in, inb.as_mut_ptr().cast(), inb.len() as u32);
        }
        let mut sgs = [&raw mut sg_out, &raw mut sg_in];
        // SAFETY: The queue is live (type invariant: its set is not deleted) and we hold
        // `&mut self`; GFP_ATOMIC never sleeps.
        to_result(unsafe {
            bindings::virtqueue_add_sgs(
                self.vq.as_ptr(),
                sgs.as_mut_ptr(),
                1,
                1,
                token as *mut c_void,
                bindings::GFP_ATOMIC,
            )
        })
    }

    /// Queues one device-writable buffer (eventq, complq).
    ///
    /// # Safety
    ///
    /// As for [`Virtqueue::add_chain`].
    pub(crate) unsafe fn add_inbuf(&mut self, inb: &mut [u8], token: usize) -> Result {
        if token == 0 {
            return Err(EINVAL);
        }
        // SAFETY: `scatterlist` is plain data; all-zero is its initial state.
        let mut sg: bindings::scatterlist = unsafe { core::mem::zeroed() };
        // SAFETY: The buffer is in the linear map and lives as long as the chain.
        unsafe { bindings::sg_init_one(&mut sg, inb.as_mut_ptr().cast(), inb.len() as u32) };
        // SAFETY: The queue is live (type invariant: its set is not deleted) and we hold
        // `&mut self`; GFP_ATOMIC never sleeps.
        to_result(unsafe {
            bindings::virtqueue_add_inbuf(
                self.vq.as_ptr(),
                &mut sg,
                1,
                token as *mut c_void,
                bindings::GFP_ATOMIC,
            )
        })
    }

    /// Notifies the device of new chains.
    pub(crate) fn kick(&mut self) {
        // SAFETY: The queue is live (type invariant: its set is not deleted) and we hold
        // `&mut self`.
        unsafe { bindings::virtqueue_kick(self.vq.as_ptr()) };
    }

    /// Takes the next used chain: its token and how many bytes the device wrote.
    pub(crate) fn get_buf(&mut self) -> Option<(usize, u32)> {
        let mut len = 0u32;
        // SAFETY: The queue is live (type invariant: its set is not deleted) and we hold
        // `&mut self`.
        let token = unsafe { bindings::virtqueue_get_buf(self.vq.as_ptr(), &mut len) };
        (!token.is_null()).then_some((token as usize, len))
    }

    /// Disables callbacks while draining.
    pub(crate) fn disable_cb(&mut self) {
        // SAFETY: The queue is live (type invariant: its set is not deleted) and we hold
        // `&mut self`.
        unsafe { bindings::virtqueue_disable_cb(self.vq.as_ptr()) };
    }

    /// Re-enables callbacks; `false` if chains arrived meanwhile (drain again).
    pub(crate) fn enable_cb(&mut self) -> bool {
        // SAFETY: The queue is live (type invariant: its set is not deleted) and we hold
        // `&mut self`.
        unsafe { bindings::virtqueue_enable_cb(self.vq.as_ptr()) }
    }
}
