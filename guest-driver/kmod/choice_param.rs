// SPDX-License-Identifier: GPL-2.0

//! Module parameters that take one of a fixed set of names (`svm_mode=shared`).
//!
//! C header: [`include/linux/moduleparam.h`](srctree/include/linux/moduleparam.h)
//!
//! The `module!` macro of this kernel offers integer and `bool` parameters only, and makes
//! none of them readable in sysfs. A mode is better named than numbered on the command
//! line (`modprobe svmgpu svm_mode=per_device`), and a test or a user reads back which one
//! a loaded module runs from `/sys/module/<module>/parameters/<name>`. This is the missing
//! piece, shaped like `kernel::module_param` so that it could be proposed as one: a
//! [`ChoiceParam`] holds the value, [`choice_param!`] registers it in the module's
//! `__param` section (as the macro registers its own) with its `modinfo` description.
//!
//! The value is read-only once the module is loaded (sysfs mode 0444): only the module
//! loader calls the setter, before the module's init runs.

use core::marker::PhantomData;
use kernel::{
    bindings,
    ffi::{c_char, c_int},
    prelude::*,
    sync::atomic::{Atomic, Relaxed},
};

/// A type whose values a [`ChoiceParam`] names.
pub(crate) trait Choice: Copy + 'static {
    /// Every value's name, by index: what the parameter accepts and what sysfs shows.
    const NAMES: &'static [&'static str];

    /// The value of the name at `index` (`index < NAMES.len()`).
    fn from_index(index: usize) -> Self;
}

/// A module parameter whose value is one of `T::NAMES`.
///
/// # Invariants
///
/// `index` is below `T::NAMES.len()`.
pub(crate) struct ChoiceParam<T: Choice> {
    index: Atomic<u32>,
    _t: PhantomData<fn() -> T>,
}

impl<T: Choice> ChoiceParam<T> {
    /// A parameter whose value is `T::NAMES[default]` until the loader sets it.
    pub(crate) const fn new(default: usize) -> Self {
        assert!(default < T::NAMES.len());
        // INVARIANT: Checked above (at compile time: the callers are statics).
        Self {
            index: Atomic::new(default as u32),
            _t: PhantomData,
        }
    }

    /// The current value.
    pub(crate) fn get(&self) -> T {
        T::from_index(self.index.load(Relaxed) as usize)
    }

    /// The current value's name.
    pub(crate) fn name(&self) -> &'static str {
        T::NAMES[self.index.load(Relaxed) as usize]
    }

    /// Parses `arg` (a trailing newline, as sysfs writes pass, is ignored).
    fn set(&self, arg: &[u8]) -> Result {
        let arg = arg.strip_suffix(b"\n").unwrap_or(arg);
        let i = T::NAMES
            .iter()
            .position(|n| n.as_bytes() == arg)
            .ok_or(EINVAL)?;
        // INVARIANT: `i` indexes `T::NAMES`.
        self.index.store(i as u32, Relaxed);
        Ok(())
    }

    /// `kernel_param_ops::set`.
    ///
    /// # Safety
    ///
    /// `kp` must be a parameter registered by [`choice_param!`] for a `ChoiceParam<T>`;
    /// `val` is null or a NUL-terminated string valid for the call.
    unsafe extern "C" fn set_cb(val: *const c_char, kp: *const bindings::kernel_param) -> c_int {
        if val.is_null() {
            return EINVAL.to_errno();
        }
        // SAFETY: Per the function's contract, `kp` is ours: its `arg` is the address of a
        // `static ChoiceParam<T>`.
        let this = unsafe { &*(*kp).__bindgen_anon_1.arg.cast::<Self>() };
        // SAFETY: Per the function's contract, `val` is a NUL-terminated string.
        let arg = unsafe { CStr::from_char_ptr(val) }.to_bytes();
        match this.set(arg) {
            Ok(()) => 0,
            Err(e) => e.to_errno(),
        }
    }

    /// `kernel_param_ops::get`.
    ///
    /// # Safety
    ///
    /// `kp` as for [`Self::set_cb`]; `buf` must be writable for `PAGE_SIZE` bytes (what
    /// sysfs passes).
    unsafe extern "C" fn get_cb(buf: *mut c_char, kp: *const bindings::kernel_param) -> c_int {
        // SAFETY: As in `set_cb`.
        let this = unsafe { &*(*kp).__bindgen_anon_1.arg.cast::<Self>() };
        let name = this.name().as_bytes();
        // The longest name, a newline and a NUL fit in a page.
        let n = name.len().min(kernel::page::PAGE_SIZE - 2);
        // SAFETY: `buf` is writable for `PAGE_SIZE` bytes (the function's contract) and
        // `n + 2` is at most that.
        unsafe {
            core::ptr::copy_nonoverlapping(name.as_ptr(), buf.cast::<u8>(), n);
            *buf.add(n) = b'\n' as c_char;
            *buf.add(n + 1) = 0;
        }
        (n + 1) as c_int
    }

    /// The parameter's operations (for [`choice_param!`]).
    pub(crate) const OPS: bindings::kernel_param_ops = bindings::kernel_param_ops {
        flags: 0,
        set: Some(Self::set_cb),
        get: Some(Self::get_cb),
        free: None,
    };
}

/// Copies a string into an array of its length (for `.modinfo` entries).
pub(crate) const fn modinfo_bytes<const N: usize>(s: &str) -> [u8; N] {
    let b = s.as_bytes();
    assert!(b.len() == N);
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = b[i];
        i += 1;
    }
    out
}

/// Registers `static $param: ChoiceParam<$ty>` as the module parameter `$name` of the
/// module `$module` (readable in sysfs, mode 0444), with `$desc` as its `modinfo`
/// description.
macro_rules! choice_param {
    ($module:literal, $name:literal, $param:ident: $ty:ty, $desc:literal) => {
        const _: () = {
            #[link_section = "__param"]
            #[used(compiler)]
            static PARAM: kernel::module_param::KernelParam =
                kernel::module_param::KernelParam::new(kernel::bindings::kernel_param {
                    name: kernel::str::as_char_ptr_in_const_context(
                        // Built in, the name carries the module's prefix.
                        if cfg!(MODULE) {
                            kernel::c_str!($name)
                        } else {
                            kernel::c_str!(concat!($module, ".", $name))
                        },
                    ),
                    // `__this_module` is constructed by the kernel at load time and lives
                    // until the module is unloaded.
                    #[cfg(MODULE)]
                    mod_: (&raw const kernel::bindings::__this_module).cast_mut(),
                    #[cfg(not(MODULE))]
                    mod_: core::ptr::null_mut(),
                    ops: &$crate::choice_param::ChoiceParam::<$ty>::OPS,
                    perm: 0o444,
                    level: -1,
                    flags: 0,
                    __bindgen_anon_1: kernel::bindings::kernel_param__bindgen_ty_1 {
                        // The callbacks cast it back (`ChoiceParam::set_cb`); never written.
                        arg: core::ptr::from_ref(&$param).cast_mut().cast(),
                    },
                });

            const TYPE: &str = concat!("parmtype=", $name, ":string\0");
            const DESC: &str = concat!("parm=", $name, ":", $desc, "\0");
            #[cfg(MODULE)]
            #[link_section = ".modinfo"]
            #[used(compiler)]
            static MODINFO_TYPE: [u8; TYPE.len()] =
                $crate::choice_param::modinfo_bytes::<{ TYPE.len() }>(TYPE);
            #[cfg(MODULE)]
            #[link_section = ".modinfo"]
            #[used(compiler)]
            static MODINFO_DESC: [u8; DESC.len()] =
                $crate::choice_param::modinfo_bytes::<{ DESC.len() }>(DESC);
        };
    };
}
pub(crate) use choice_param;
