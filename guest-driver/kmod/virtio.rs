// SPDX-License-Identifier: GPL-2.0

//! Thin safe wrappers over the C virtio core.
//!
//! The kernel's Rust tree has no virtio abstraction yet; this module is the smallest one
//! the driver needs: a [`Registration`] of a [`Driver`] for one virtio device ID, a
//! [`Device`] reference with config-space reads, readiness and reset, and [`Virtqueue`]s
//! with buffer submission and completion.
//!
//! Locking: the virtio core requires callers to serialise `add`, `kick` and `get_buf` on
//! one queue; [`Virtqueue`] is therefore only reachable through `&mut`, and its owner keeps
//! it under a lock that is also taken by the queue's interrupt callback.

use core::{
    ffi::{c_int, c_void},
    marker::PhantomData,
    ptr::NonNull,
};
use kernel::{bindings, error::to_result, prelude::*, types::Opaque};

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

/// A virtio driver: what the core calls for each matching device.
pub(crate) trait Driver {
    /// Per-device data kept between `probe` and `remove`.
    type Data: Send + Sync;
    /// The devices this driver binds.
    const ID_TABLE: &'static IdTable;

    /// Called for each matching device; the device is reset and features are negotiated.
    /// Returns the device's data, or an error to refuse the device.
    fn probe(dev: &Device) -> Result<Pin<KBox<Self::Data>>>;

    /// Called when the device goes away or the driver is unloaded.
    fn remove(dev: &Device, data: Pin<KBox<Self::Data>>);
}

/// A registered virtio driver; unregistered (removing every bound device) on drop.
#[pin_data(PinnedDrop)]
pub(crate) struct Registration<T: Driver> {
    #[pin]
    drv: Opaque<bindings::virtio_driver>,
    _p: PhantomData<T>,
}

// SAFETY: The registration is only touched by `new` and `drop`, which the module core
// serialises; the C structure inside is read-only to the virtio core once registered.
unsafe impl<T: Driver> Sync for Registration<T> {}
// SAFETY: See `Sync`; nothing in the registration is tied to a thread.
unsafe impl<T: Driver> Send for Registration<T> {}

impl<T: Driver + 'static> Registration<T> {
    /// Registers the driver `name` on behalf of `module`.
    pub(crate) fn new(
        name: &'static CStr,
        module: &'static ThisModule,
    ) -> impl PinInit<Self, Error> {
        try_pin_init!(Self {
            drv <- Opaque::try_ffi_init(|drv: *mut bindings::virtio_driver| {
                // SAFETY: `drv` points to uninitialised memory of the right type; all-zero is a
                // valid `virtio_driver` (no callbacks, no tables).
                unsafe { drv.write(core::mem::zeroed()) };
                // SAFETY: `drv` was just initialised and is ours until registration.
                let d = unsafe { &mut *drv };
                d.driver.name = name.as_char_ptr();
                d.id_table = T::ID_TABLE.0.as_ptr();
                d.probe = Some(Self::probe_callback);
                d.remove = Some(Self::remove_callback);
                // SAFETY: `drv` is fully initialised and pinned; `module` outlives it.
                to_result(unsafe { bindings::__register_virtio_driver(drv, module.as_ptr()) })
            }),
            _p: PhantomData,
        })
    }

    unsafe extern "C" fn probe_callback(vdev: *mut bindings::virtio_device) -> c_int {
        // SAFETY: The virtio core passes a valid device that stays alive until `remove`.
        let dev = unsafe { Device::from_raw(vdev) };
        match T::probe(dev) {
            Ok(data) => {
                // SAFETY: `Pin<KBox<_>>` is turned into a raw pointer only to be turned back
                // into the same type in `remove_callback`; the data is never moved.
                let ptr = KBox::into_raw(unsafe { Pin::into_inner_unchecked(data) });
                dev.set_drvdata(ptr.cast());
                0
            }
            Err(e) => e.to_errno(),
        }
    }

    unsafe extern "C" fn remove_callback(vdev: *mut bindings::virtio_device) {
        // SAFETY: The virtio core passes the device it probed successfully.
        let dev = unsafe { Device::from_raw(vdev) };
        let ptr = dev.drvdata().cast::<T::Data>();
        dev.set_drvdata(core::ptr::null_mut());
        if ptr.is_null() {
            return;
        }
        // SAFETY: `ptr` came from `KBox::into_raw` of a pinned box in `probe_callback` and is
        // reclaimed exactly once, here.
        let data = unsafe { Pin::new_unchecked(KBox::from_raw(ptr)) };
        T::remove(dev, data);
    }
}

#[pinned_drop]
impl<T: Driver> PinnedDrop for Registration<T> {
    fn drop(self: Pin<&mut Self>) {
        // SAFETY: The driver was registered in `new` (a failed registration never produces
        // `Self`), so it is unregistered exactly once here.
        unsafe { bindings::unregister_virtio_driver(self.drv.get()) };
    }
}

/// A virtio device, borrowed from the virtio core for the duration of a callback.
#[repr(transparent)]
pub(crate) struct Device(Opaque<bindings::virtio_device>);

impl Device {
    /// # Safety
    /// `ptr` must point to a live `virtio_device` for the lifetime `'a`.
    pub(crate) unsafe fn from_raw<'a>(ptr: *mut bindings::virtio_device) -> &'a Self {
        // SAFETY: `Device` is a transparent wrapper of `virtio_device`; validity is the
        // caller's promise.
        unsafe { &*ptr.cast() }
    }

    fn as_raw(&self) -> *mut bindings::virtio_device {
        self.0.get()
    }

    /// The generic device, for logging and DMA.
    pub(crate) fn as_dev(&self) -> &kernel::device::Device {
        // SAFETY: `dev` is embedded in a live `virtio_device`.
        unsafe { kernel::device::Device::from_raw(&raw mut (*self.as_raw()).dev) }
    }

    /// The bus index of this device (`virtioN`).
    pub(crate) fn index(&self) -> u32 {
        // SAFETY: `index` is set by the core before probe and never changes.
        unsafe { (*self.as_raw()).index as u32 }
    }

    /// Reads `buf.len()` bytes of the device's config space at `offset`, retrying until the
    /// config generation is stable, as the virtio core does.
    pub(crate) fn read_config(&self, offset: u32, buf: &mut [u8]) {
        // SAFETY: `buf` is valid for writes of its length; the core bounds-checks nothing,
        // so callers pass offsets within the device's config size.
        unsafe {
            bindings::virtio_cread_bytes(self.as_raw(), offset, buf.as_mut_ptr().cast(), buf.len())
        };
    }

    /// Tells the device the driver is ready (DRIVER_OK); queues may run from now on.
    pub(crate) fn ready(&self) {
        // SAFETY: Called from probe, once, after the queues were found.
        unsafe { bindings::virtio_device_ready(self.as_raw()) };
    }

    /// Resets the device: it stops all processing and raises no more interrupts.
    pub(crate) fn reset(&self) {
        // SAFETY: The device is live; reset is allowed at any point after probe started.
        unsafe { bindings::virtio_reset_device(self.as_raw()) };
    }

    fn drvdata(&self) -> *mut c_void {
        // SAFETY: `dev` is embedded in a live `virtio_device`.
        unsafe { bindings::dev_get_drvdata(&raw const (*self.as_raw()).dev) }
    }

    fn set_drvdata(&self, data: *mut c_void) {
        // SAFETY: `dev` is embedded in a live `virtio_device`.
        unsafe { bindings::dev_set_drvdata(&raw mut (*self.as_raw()).dev, data) };
    }

    /// Sets the pointer the queue callbacks receive as their context.
    ///
    /// # Safety
    /// `ctx` must stay valid until [`Device::del_vqs`] returned (after a [`Device::reset`]).
    pub(crate) unsafe fn set_callback_context(&self, ctx: *const c_void) {
        // SAFETY: `priv_` is the driver's field of a live device.
        unsafe { (*self.as_raw()).priv_ = ctx.cast_mut() };
    }

    /// Finds the device's queues. Each entry is a name and an optional callback, which runs
    /// in interrupt context with the queue and the context of
    /// [`Device::set_callback_context`].
    pub(crate) fn find_vqs<const N: usize>(
        &self,
        specs: &[(&'static CStr, Option<Callback>); N],
    ) -> Result<[Virtqueue; N]> {
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
            *slot = Some(Virtqueue(NonNull::new(vq).ok_or(ENODEV)?));
        }
        Ok(out.map(|v| v.expect("all queues were just set")))
    }

    /// Deletes the queues found by [`Device::find_vqs`]; only after [`Device::reset`].
    pub(crate) fn del_vqs(&self) {
        // SAFETY: The device was reset, so no callback runs and the queues are idle.
        unsafe { bindings::virtio_del_vqs(self.as_raw()) };
    }
}

/// A queue interrupt callback.
pub(crate) type Callback = unsafe extern "C" fn(*mut bindings::virtqueue);

/// Returns the callback context set with [`Device::set_callback_context`] for `vq`.
///
/// # Safety
/// `vq` must be the argument of a queue callback.
pub(crate) unsafe fn callback_context(vq: *mut bindings::virtqueue) -> *const c_void {
    // SAFETY: A callback's queue and its device are live while the callback runs.
    unsafe { (*(*vq).vdev).priv_ }
}

/// One virtqueue. Not `Clone`: whoever owns it serialises its use.
pub(crate) struct Virtqueue(NonNull<bindings::virtqueue>);

// SAFETY: A virtqueue may be used from any thread as long as uses are serialised, which
// `&mut self` on every operation guarantees.
unsafe impl Send for Virtqueue {}

impl Virtqueue {
    /// Queues one chain: `out` is read by the device, `inb` written by it. `token` (not
    /// zero) comes back from [`Virtqueue::get_buf`].
    ///
    /// # Safety
    /// Both buffers must stay valid, unmoved and unused by the CPU until the chain comes
    /// back from [`Virtqueue::get_buf`] or the device is reset.
    pub(crate) unsafe fn add_chain(&mut self, out: &[u8], inb: &mut [u8], token: usize) -> Result {
        if token == 0 {
            return Err(EINVAL);
        }
        // SAFETY: `scatterlist` is plain data; all-zero is its initial state.
        let mut sg_out: bindings::scatterlist = unsafe { core::mem::zeroed() };
        // SAFETY: As above.
        let mut sg_in: bindings::scatterlist = unsafe { core::mem::zeroed() };
        // SAFETY: The buffers are in the kernel's linear map (the caller allocates them with
        // kmalloc) and live as long as the chain, per this function's contract.
        unsafe {
            bindings::sg_init_one(&mut sg_out, out.as_ptr().cast(), out.len() as u32);
            bindings::sg_init_one(&mut sg_in, inb.as_mut_ptr().cast(), inb.len() as u32);
        }
        let mut sgs = [&raw mut sg_out, &raw mut sg_in];
        // SAFETY: The queue is live and we hold `&mut self`; GFP_ATOMIC never sleeps, so
        // this may be called under spinlocks and from notifier context.
        to_result(unsafe {
            bindings::virtqueue_add_sgs(
                self.0.as_ptr(),
                sgs.as_mut_ptr(),
                1,
                1,
                token as *mut c_void,
                bindings::GFP_ATOMIC,
            )
        })
    }

    /// Notifies the device of new chains.
    pub(crate) fn kick(&mut self) {
        // SAFETY: The queue is live and we hold `&mut self`.
        unsafe { bindings::virtqueue_kick(self.0.as_ptr()) };
    }

    /// Takes the next used chain: its token and how many bytes the device wrote.
    pub(crate) fn get_buf(&mut self) -> Option<(usize, u32)> {
        let mut len = 0u32;
        // SAFETY: The queue is live and we hold `&mut self`.
        let token = unsafe { bindings::virtqueue_get_buf(self.0.as_ptr(), &mut len) };
        (!token.is_null()).then_some((token as usize, len))
    }

    /// Disables callbacks while draining.
    pub(crate) fn disable_cb(&mut self) {
        // SAFETY: The queue is live and we hold `&mut self`.
        unsafe { bindings::virtqueue_disable_cb(self.0.as_ptr()) };
    }

    /// Re-enables callbacks; `false` if chains arrived meanwhile (drain again).
    pub(crate) fn enable_cb(&mut self) -> bool {
        // SAFETY: The queue is live and we hold `&mut self`.
        unsafe { bindings::virtqueue_enable_cb(self.0.as_ptr()) }
    }
}
