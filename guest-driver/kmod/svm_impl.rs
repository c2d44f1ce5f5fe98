// SPDX-License-Identifier: GPL-2.0

//! Which SVM implementation fault-mode VMs use (module parameter `svm_impl`): the driver's
//! own ([`crate::svm`], `native`, the default) or the kernel's `drm_gpusvm`
//! ([`crate::gpusvm_svm`], `gpusvm`). Both implement the same three `svm_mode`s and the
//! same uAPI behaviour; a VM holds an [`SvmRef`] and calls it without knowing which.

use crate::{
    choice_param::{choice_param, Choice, ChoiceParam},
    drm_driver::SvmgpuDevice,
    gpu::{Gpu, GpuAccess},
    gpusvm_svm::{self, GSvm},
    svm::{self, Svm},
    vm::Vm,
};
use kernel::{
    prelude::*,
    sync::{aref::ARef, Arc},
};

/// An SVM implementation (module parameter `svm_impl`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum SvmImpl {
    /// The driver's own SVM layer (`svm.rs`, `svm_pages.rs`).
    Native,
    /// The kernel's `drm_gpusvm` (`gpusvm_svm.rs`).
    Gpusvm,
}

impl Choice for SvmImpl {
    const NAMES: &'static [&'static str] = &["native", "gpusvm"];

    fn from_index(index: usize) -> Self {
        match index {
            0 => SvmImpl::Native,
            _ => SvmImpl::Gpusvm,
        }
    }
}

impl SvmImpl {
    pub(crate) fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

static SVM_IMPL: ChoiceParam<SvmImpl> = ChoiceParam::new(SvmImpl::Native as usize);
choice_param!(
    "svmgpu",
    "svm_impl",
    SVM_IMPL: SvmImpl,
    "Which SVM implementation fault-mode VMs use: native (default) or gpusvm (drm_gpusvm)"
);

/// The SVM implementation in effect (fixed while the module is loaded: the parameter is
/// read-only).
pub(crate) fn svm_impl() -> SvmImpl {
    SVM_IMPL.get()
}

/// Initialises both implementations' registries (module init, once).
pub(crate) fn init() {
    svm::init();
    gpusvm_svm::init();
}

/// Module-wide SVM figures of both implementations (debugfs `svmgpu/svm_ranges`).
pub(crate) fn stats() -> svm::Stats {
    let (a, b) = (svm::stats(), gpusvm_svm::stats());
    svm::Stats {
        ranges: a.ranges + b.ranges,
        ranges_collected: a.ranges_collected + b.ranges_collected,
        notifiers: a.notifiers + b.notifiers,
        notifiers_pruned: a.notifiers_pruned + b.notifiers_pruned,
    }
}

/// A fault-mode VM's SVM object (one user reference of it).
#[derive(Clone)]
pub(crate) enum SvmRef {
    /// The driver's own.
    Native(Arc<Svm>),
    /// The kernel's `drm_gpusvm`, and the DRM device the VM's pages are mapped for.
    Gpusvm(Arc<GSvm>, ARef<SvmgpuDevice>),
}

impl SvmRef {
    /// The SVM object of the calling process for a new fault-mode VM on `gpu`, of the
    /// implementation `svm_impl` selects; the caller owns one user reference
    /// ([`SvmRef::release`]).
    pub(crate) fn attach(gpu: &Arc<Gpu>, drm: &SvmgpuDevice) -> Result<Self> {
        let key = Arc::as_ptr(gpu) as usize;
        Ok(match svm_impl() {
            SvmImpl::Native => SvmRef::Native(svm::attach(key, gpu.svm_mode)?),
            SvmImpl::Gpusvm => SvmRef::Gpusvm(gpusvm_svm::attach(key, gpu.svm_mode)?, drm.into()),
        })
    }

    /// Gives back the user reference from [`SvmRef::attach`].
    pub(crate) fn release(self) {
        match self {
            SvmRef::Native(s) => svm::release(s),
            SvmRef::Gpusvm(s, _) => gpusvm_svm::release(s),
        }
    }

    /// Whether the calling task's mm is the mirrored one.
    pub(crate) fn is_current_mm(&self) -> bool {
        match self {
            SvmRef::Native(s) => s.is_current_mm(),
            SvmRef::Gpusvm(s, _) => s.is_current_mm(),
        }
    }

    /// Takes the SVM notifier lock once, for lockdep (see [`Svm::prime_lockdep`]).
    pub(crate) fn prime_lockdep(&self) {
        match self {
            SvmRef::Native(s) => s.prime_lockdep(),
            SvmRef::Gpusvm(s, _) => s.prime_lockdep(),
        }
    }

    /// See [`Svm::detach_vm`].
    pub(crate) fn detach_vm(&self, vm: &Vm, only: Option<(u64, u64)>, flush: bool) {
        match self {
            SvmRef::Native(s) => s.detach_vm(vm, only, flush),
            SvmRef::Gpusvm(s, _) => s.detach_vm(vm, only, flush),
        }
    }

    /// See [`Svm::is_mapped`].
    pub(crate) fn is_mapped(&self, vm: &Vm, addr: usize, write: bool) -> bool {
        match self {
            SvmRef::Native(s) => s.is_mapped(vm, addr, write),
            SvmRef::Gpusvm(s, _) => s.is_mapped(vm, addr, write),
        }
    }

    /// See [`Svm::fault`].
    pub(crate) fn fault(
        &self,
        vm: &Arc<Vm>,
        acc: &GpuAccess<'_>,
        addr: usize,
        write: bool,
        in_binding: impl Fn(u64, u64) -> bool,
    ) -> Result<usize> {
        match self {
            SvmRef::Native(s) => s.fault(vm, acc, addr, write, in_binding),
            SvmRef::Gpusvm(s, drm) => s.fault(vm, drm, acc, addr, write, in_binding),
        }
    }
}
