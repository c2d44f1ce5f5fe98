// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Completion records (spec/svmgpu.md section 6.6) as the device builds them.

use svmgpu_spec::{Completion, CompletionKind, Opcode, Status};

/// A JOB_DONE record.
pub fn job_done(seqno: u64, ctx: u32, status: Status) -> Completion {
    Completion {
        kind: CompletionKind::JobDone.as_u32(),
        status: status.as_u32(),
        seqno,
        ctx_id: ctx,
        opcode: Opcode::JobSubmit.as_u32(),
        value: 0,
    }
}

/// A COMMAND_DONE record.
pub fn command_done(seqno: u64, ctx: u32, op: Opcode, status: Status, value: u64) -> Completion {
    Completion {
        kind: CompletionKind::CommandDone.as_u32(),
        status: status.as_u32(),
        seqno,
        ctx_id: ctx,
        opcode: op.as_u32(),
        value,
    }
}

/// A FENCE record.
pub fn fence_done(seqno: u64, ctx: u32, value: u64) -> Completion {
    Completion {
        kind: CompletionKind::Fence.as_u32(),
        status: Status::Ok.as_u32(),
        seqno,
        ctx_id: ctx,
        opcode: Opcode::JobSubmit.as_u32(),
        value,
    }
}
