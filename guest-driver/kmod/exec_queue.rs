// SPDX-License-Identifier: GPL-2.0

//! Exec queues: a device context on a VM, with its job fences.

use crate::{
    fence::{Client, Fences},
    vm::Vm,
    wire,
};
use kernel::{prelude::*, sync::Arc};

/// An exec queue.
pub(crate) struct ExecQueue {
    pub(crate) vm: Arc<Vm>,
    pub(crate) ctx_id: u32,
    pub(crate) fences: Arc<Fences>,
}

impl ExecQueue {
    /// Creates a context on `vm`'s ASID for a queue of `client` (`ECANCELED` if the
    /// client is banned after repeated hangs).
    pub(crate) fn create(
        vm: &Arc<Vm>,
        long_running: bool,
        client: &Arc<Client>,
    ) -> Result<Arc<Self>> {
        if client.banned() {
            return Err(ECANCELED);
        }
        let gpu = &vm.gpu;
        gpu.recover_initiated();
        let fences = Arc::pin_init(
            Fences::new(gpu.ctrl.last_seqno(), client.clone()),
            GFP_KERNEL,
        )?;
        let ctx_id = gpu.alloc_ctx(fences.clone())?;
        let q = match Arc::new(
            Self {
                vm: vm.clone(),
                ctx_id,
                fences,
            },
            GFP_KERNEL,
        ) {
            Ok(q) => q,
            Err(e) => {
                gpu.free_ctx(ctx_id);
                return Err(e.into());
            }
        };
        if let Err(e) = vm.add_queue(ctx_id, long_running) {
            gpu.free_ctx(ctx_id);
            return Err(e);
        }
        let body = wire::CtxCreateReq {
            ctx_id,
            asid: vm.asid,
            flags: if long_running {
                wire::CTX_F_LONG_RUNNING
            } else {
                0
            },
            reserved: 0,
        }
        .to_bytes();
        if let Err(e) = gpu
            .ctrl
            .call(wire::Opcode::CtxCreate, &body, &mut [])
            .and_then(|r| r.ok())
        {
            vm.remove_queue(ctx_id);
            gpu.free_ctx(ctx_id);
            return Err(e);
        }
        Ok(q)
    }

    /// Destroys the context: its jobs are discarded (their fences fail with
    /// `-ECANCELED`).
    pub(crate) fn destroy(&self) {
        let gpu = &self.vm.gpu;
        self.vm.remove_queue(self.ctx_id);
        let body = wire::CtxReq {
            ctx_id: self.ctx_id,
            flags: 0,
        }
        .to_bytes();
        // NOT_FOUND after a reset, ENODEV after removal: the context is gone either way.
        let r = gpu.ctrl.call(wire::Opcode::CtxDestroy, &body, &mut []);
        if let Err(e) = r {
            if e != ENODEV {
                gpu.reset_and_recover(gpu.ctrl.last_seqno(), "CTX_DESTROY did not answer");
            }
        }
        self.fences.lose(ECANCELED.to_errno());
        gpu.free_ctx(self.ctx_id);
    }
}
