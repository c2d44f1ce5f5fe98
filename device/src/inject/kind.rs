// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The kinds of fault injection (spec/svmgpu.md section 6.16.1): names and bits. A leaf, so
//! that the statistics can count injections per kind without depending on the injector.

use std::fmt;

macro_rules! kinds {
    ($($var:ident => $name:literal, $doc:literal;)*) => {
        /// An injection kind.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Kind {
            $(#[doc = $doc] $var,)*
        }

        impl Kind {
            /// Every kind, in statistics order.
            pub const ALL: &'static [Kind] = &[$(Kind::$var),*];

            /// Its name in the grammar, the log and the statistics.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Kind::$var => $name,)*
                }
            }
        }
    };
}

kinds! {
    TlbInvalDelay => "tlb-inval-delay", "A TLB invalidation completes `delay_us` later than nominal.";
    TlbInvalDrop => "tlb-inval-drop", "A TLB invalidation is accepted and never completes.";
    TlbInvalError => "tlb-inval-error", "A TLB invalidation completes with `TIMEOUT`/`INTERNAL` and drops nothing.";
    PreemptDelay => "preempt-delay", "A CTX_PREEMPT takes effect `delay_us` later than nominal.";
    PreemptDrop => "preempt-drop", "A CTX_PREEMPT is accepted and never takes effect.";
    PreemptError => "preempt-error", "A CTX_PREEMPT completes with `TIMEOUT`/`INTERNAL` without preempting.";
    EngineHang => "engine-hang", "A job's engine hangs when the job starts (ENGINE_HANG, no JOB_DONE).";
    FaultSpurious => "fault-spurious", "After an instruction, its context faults on its (mapped) pc.";
    FaultDuplicate => "fault-duplicate", "A PAGE_FAULT event is posted twice (same fault id).";
    FaultPhantom => "fault-phantom", "A PAGE_FAULT for an address no job touched, with an id never outstanding.";
    CompletionCorrupt => "completion-corrupt", "A completion record is corrupted (seqno, kind or status).";
    CompletionDuplicate => "completion-duplicate", "A completion record is posted twice.";
    CompletionReorder => "completion-reorder", "A completion record is held back behind the next one.";
    DeviceReset => "device-reset", "A control request starts a device-initiated reset.";
    WalkReadError => "walk-read-error", "A page-table read of a walk fails (BAD_TABLE_ADDRESS fault).";
    EventOverflow => "event-overflow", "A droppable event is dropped as if the backlog were full.";
}

/// Number of kinds.
pub const KIND_COUNT: usize = Kind::ALL.len();

impl Kind {
    /// Looks a kind up by its grammar name.
    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| k.name() == s)
    }

    /// Its bit in an activity mask.
    pub const fn bit(self) -> u32 {
        1 << self as u32
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
