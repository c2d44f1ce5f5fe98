// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//
// svmgpu wire definitions, spec v0.3.
//
// The normative contract is spec/svmgpu.md; this file follows it. Every number here must
// match a number there.
//
// This file is compiled in two ways: as the `svmgpu-spec` crate (spec/src/lib.rs does
// `mod wire; pub use wire::*;`) and directly by the guest kernel module through
// `#[path = "../../spec/src/wire.rs"] mod wire;` under the kernel's rustc flags. So it holds
// only items: no inner attributes, no inner doc comments, no `crate::` paths, no
// dependencies, no std/alloc, no unsafe, no floating point, and no panicking operation on
// any input (every decoder returns Option/Result, every slice access is checked).

// ---------------------------------------------------------------------------------------
// Identity and transport
// ---------------------------------------------------------------------------------------

/// Virtio device ID of svmgpu (0x3e; unassigned upstream).
pub const VIRTIO_ID_SVMGPU: u32 = 62;
/// PCI vendor ID (the virtio vendor).
pub const PCI_VENDOR_ID: u16 = 0x1af4;
/// PCI device ID: 0x1040 + the virtio device ID (modern-only virtio PCI device).
pub const PCI_DEVICE_ID: u16 = 0x107e;

/// Major version of this spec.
pub const SPEC_VERSION_MAJOR: u16 = 0;
/// Minor version of this spec.
pub const SPEC_VERSION_MINOR: u16 = 3;
/// `(major << 16) | minor`, as found in the config space `version` field and in GET_INFO.
pub const SPEC_VERSION: u32 = spec_version(SPEC_VERSION_MAJOR, SPEC_VERSION_MINOR);

/// Packs a spec version as `(major << 16) | minor`.
pub const fn spec_version(major: u16, minor: u16) -> u32 {
    ((major as u32) << 16) | (minor as u32)
}

/// Major part of a packed spec version.
pub const fn spec_version_major(v: u32) -> u16 {
    (v >> 16) as u16
}

/// Minor part of a packed spec version.
pub const fn spec_version_minor(v: u32) -> u16 {
    (v & 0xffff) as u16
}

/// Index of the control queue (driver -> device requests with a response).
pub const QUEUE_CONTROL: u16 = 0;
/// Index of the event queue (device -> driver events in driver-posted buffers).
pub const QUEUE_EVENT: u16 = 1;
/// Index of the completion queue (device -> driver completion records).
pub const QUEUE_COMPLETION: u16 = 2;
/// Number of virtqueues.
pub const NUM_QUEUES: u16 = 3;
/// Largest queue size the device accepts.
pub const MAX_QUEUE_SIZE: u16 = 1024;

// ---------------------------------------------------------------------------------------
// Feature bits
// ---------------------------------------------------------------------------------------

/// Virtio feature bit VIRTIO_F_VERSION_1 (bit number). Required.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device feature bit 0 (bit number): audit mode. The device checks its TLBs against the
/// page tables in memory and counts what it finds wrong in GET_STATS: `stale_accesses`,
/// `unflushed_entries`, `narrow_flush_entries` (spec section 6.10.4).
pub const SVMGPU_F_AUDIT: u32 = 0;
/// Device feature bit 1 (bit number): fault coalescing. Stalled accesses of any contexts to
/// the same ASID and 4 KiB page share one page-fault event and one fault id.
pub const SVMGPU_F_FAULT_COALESCE: u32 = 1;
/// Device feature bit 2 (bit number): fault injection is configured on this device.
/// Informational: it changes no layout, it tells the driver its recovery paths will run.
pub const SVMGPU_F_FAULT_INJECT: u32 = 2;
/// Mask of every device feature bit defined by this spec version.
pub const SVMGPU_FEATURES_MASK: u64 =
    (1 << SVMGPU_F_AUDIT) | (1 << SVMGPU_F_FAULT_COALESCE) | (1 << SVMGPU_F_FAULT_INJECT);

// ---------------------------------------------------------------------------------------
// Limits and special values
// ---------------------------------------------------------------------------------------

/// Magic value of config space offset 0: the bytes 'S','V','M','G' read little-endian.
pub const CONFIG_MAGIC: u32 = 0x474d_5653;
/// Size of the config space in bytes.
pub const CONFIG_SIZE: usize = 64;
/// Largest control request (header + body) the device reads; longer ones get BAD_LENGTH.
pub const MAX_REQUEST_SIZE: usize = 4096;
/// Size of every event record written to the event queue.
pub const EVENT_SIZE: usize = 64;
/// Offset of the event body in an event record (after [`EventHeader`]).
pub const EVENT_BODY_OFFSET: usize = 16;
/// Size of every completion record written to the completion queue.
pub const COMPLETION_SIZE: usize = 32;
/// Jobs a context may have queued (submitted, not yet completed) at once.
pub const JOB_QUEUE_DEPTH: u32 = 64;
/// FENCE completions the device holds (for want of complq buffers) before a FENCE with
/// NOTIFY waits for the driver to post buffers.
pub const FENCE_BACKLOG: u32 = 64;
/// Asynchronous commands (TLB_INVALIDATE, CTX_PREEMPT, CTX_RESUME) accepted and not yet
/// completed, per device; one more is answered BUSY.
pub const MAX_ASYNC_OUTSTANDING: u32 = 256;
/// Largest byte length of a FILL, COPY or CHECKSUM instruction.
pub const MAX_BULK_LEN: u64 = 1 << 20;
/// Deepest nesting of LOOP instructions.
pub const LOOP_MAX_DEPTH: usize = 4;
/// The event backlog holds at least `max_outstanding_faults` + this many records.
pub const EVENT_BACKLOG_EXTRA: u32 = 64;
/// Largest batch length in bytes.
pub const MAX_BATCH_LEN: u32 = 1 << 24;
/// "No context" in context-id fields.
pub const CTX_NONE: u32 = u32::MAX;
/// "No engine" in engine fields.
pub const ENGINE_NONE: u32 = u32::MAX;
/// All ASIDs (TLB_INVALIDATE with [`TLB_INVAL_F_WHOLE_ASID`]).
pub const ASID_ALL: u32 = u32::MAX;
/// Number of virtual-address bits.
pub const VA_BITS: u32 = 48;
/// 4 KiB page size.
pub const PAGE_SIZE_4K: u64 = 1 << 12;
/// 2 MiB page size.
pub const PAGE_SIZE_2M: u64 = 1 << 21;

// ---------------------------------------------------------------------------------------
// Little-endian field access (private helpers; never panic)
// ---------------------------------------------------------------------------------------

/// A fixed-width little-endian integer that can be read from and written to a byte slice.
trait LeField: Sized + Copy {
    /// Reads the value at `off`; `None` if `b` is too short.
    fn rd(b: &[u8], off: usize) -> Option<Self>;
    /// Writes the value at `off`; `None` if `b` is too short.
    fn wr(self, b: &mut [u8], off: usize) -> Option<()>;
}

macro_rules! impl_le_field {
    ($($t:ty),*) => {$(
        impl LeField for $t {
            fn rd(b: &[u8], off: usize) -> Option<Self> {
                let end = off.checked_add(core::mem::size_of::<$t>())?;
                let s = b.get(off..end)?;
                let a = <[u8; core::mem::size_of::<$t>()]>::try_from(s).ok()?;
                Some(<$t>::from_le_bytes(a))
            }
            fn wr(self, b: &mut [u8], off: usize) -> Option<()> {
                let end = off.checked_add(core::mem::size_of::<$t>())?;
                let s = b.get_mut(off..end)?;
                s.copy_from_slice(&self.to_le_bytes());
                Some(())
            }
        }
    )*};
}
impl_le_field!(u8, u16, u32, u64);

/// Reads a little-endian `u32` at `off`, `None` if out of bounds.
pub fn read_u32(b: &[u8], off: usize) -> Option<u32> {
    <u32 as LeField>::rd(b, off)
}

/// Reads a little-endian `u64` at `off`, `None` if out of bounds.
pub fn read_u64(b: &[u8], off: usize) -> Option<u64> {
    <u64 as LeField>::rd(b, off)
}

/// Defines a fixed-layout little-endian wire struct with `SIZE`, one `OFFSET_*` constant per
/// field, `decode` (reads a prefix of at least `SIZE` bytes) and `encode`/`to_bytes`.
macro_rules! wire_struct {
    (
        $(#[$meta:meta])*
        $name:ident, $size:expr, {
            $(
                $(#[$fmeta:meta])*
                $field:ident : $ty:ty = $off_name:ident @ $off:expr
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name {
            $(
                $(#[$fmeta])*
                pub $field: $ty,
            )*
        }

        impl $name {
            /// Encoded size in bytes.
            pub const SIZE: usize = $size;
            $(
                /// Byte offset of the field of the same name.
                pub const $off_name: usize = $off;
            )*

            /// Decodes from the first `SIZE` bytes of `b`; `None` if `b` is shorter.
            pub fn decode(b: &[u8]) -> Option<Self> {
                if b.len() < Self::SIZE {
                    return None;
                }
                Some(Self {
                    $( $field: <$ty as LeField>::rd(b, $off)?, )*
                })
            }

            /// Encodes into the first `SIZE` bytes of `out` and returns `SIZE`; `None` (and
            /// nothing written) if `out` is shorter.
            pub fn encode(&self, out: &mut [u8]) -> Option<usize> {
                let dst = out.get_mut(..Self::SIZE)?;
                dst.fill(0);
                $( <$ty as LeField>::wr(self.$field, dst, $off)?; )*
                Some(Self::SIZE)
            }

            /// Encodes into a new array.
            pub fn to_bytes(&self) -> [u8; $size] {
                let mut out = [0u8; $size];
                // Cannot fail: the array is exactly SIZE bytes and every field lies inside it
                // (pinned by the crate's tests).
                let _ = self.encode(&mut out);
                out
            }
        }
    };
}

/// Defines a `#[repr(u32)]` enum with `from_u32` and `as_u32`.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $name:ident : $repr:ty {
            $(
                $(#[$vmeta:meta])*
                $var:ident = $val:expr
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr($repr)]
        pub enum $name {
            $(
                $(#[$vmeta])*
                $var = $val,
            )*
        }

        impl $name {
            /// Every value, in definition order.
            pub const ALL: &'static [$name] = &[$($name::$var),*];

            /// The enum value for a raw wire value, `None` if undefined.
            pub const fn from_u32(v: $repr) -> Option<Self> {
                match v {
                    $( x if x == $val => Some($name::$var), )*
                    _ => None,
                }
            }

            /// The raw wire value.
            pub const fn as_u32(self) -> $repr {
                self as $repr
            }
        }
    };
}

// ---------------------------------------------------------------------------------------
// Config space
// ---------------------------------------------------------------------------------------

wire_struct! {
    /// Device config space (64 bytes, little-endian, read-only to the driver).
    Config, 64, {
        /// [`CONFIG_MAGIC`].
        magic: u32 = OFFSET_MAGIC @ 0,
        /// Spec version, `(major << 16) | minor`; this version is [`SPEC_VERSION`].
        version: u32 = OFFSET_VERSION @ 4,
        /// The backend's socket index, 0..N-1.
        device_index: u32 = OFFSET_DEVICE_INDEX @ 8,
        /// Number of engines.
        num_engines: u32 = OFFSET_NUM_ENGINES @ 12,
        /// Number of ASIDs (valid ASIDs are 0..num_asids-1).
        num_asids: u32 = OFFSET_NUM_ASIDS @ 16,
        /// Number of contexts (valid context ids are 0..max_contexts-1).
        max_contexts: u32 = OFFSET_MAX_CONTEXTS @ 20,
        /// TLB entries per engine.
        tlb_entries: u32 = OFFSET_TLB_ENTRIES @ 24,
        /// TLB associativity (ways); tlb_entries is a multiple of it.
        tlb_ways: u32 = OFFSET_TLB_WAYS @ 28,
        /// Supported page sizes: bit n set = 2^n bytes (bit 12 = 4 KiB, bit 21 = 2 MiB).
        page_size_mask: u64 = OFFSET_PAGE_SIZE_MASK @ 32,
        /// Virtual-address bits ([`VA_BITS`]).
        va_bits: u32 = OFFSET_VA_BITS @ 40,
        /// Page faults that may be outstanding (reported, not yet replied) at once.
        max_outstanding_faults: u32 = OFFSET_MAX_OUTSTANDING_FAULTS @ 44,
        /// Nominal TLB invalidation latency in nanoseconds.
        tlb_inval_latency_ns: u32 = OFFSET_TLB_INVAL_LATENCY_NS @ 48,
        /// Nominal preemption latency in nanoseconds.
        preempt_latency_ns: u32 = OFFSET_PREEMPT_LATENCY_NS @ 52,
        /// Reserved, zero.
        reserved0: u32 = OFFSET_RESERVED0 @ 56,
        /// Reserved, zero.
        reserved1: u32 = OFFSET_RESERVED1 @ 60,
    }
}

impl Config {
    /// True if `magic` and the major version match this spec.
    pub fn is_compatible(&self) -> bool {
        self.magic == CONFIG_MAGIC && spec_version_major(self.version) == SPEC_VERSION_MAJOR
    }
}

// ---------------------------------------------------------------------------------------
// Control queue: headers, opcodes, status codes
// ---------------------------------------------------------------------------------------

wire_enum! {
    /// Control request opcodes.
    Opcode: u32 {
        /// Device identity and a round-trip counter. Synchronous.
        GetInfo = 0x0001,
        /// Statistics counters. Synchronous.
        GetStats = 0x0002,
        /// Reset all device state except statistics. Synchronous.
        Reset = 0x0003,
        /// Create a context on a bound ASID. Synchronous.
        CtxCreate = 0x0010,
        /// Destroy a context. Synchronous.
        CtxDestroy = 0x0011,
        /// Preempt a context. Asynchronous (completion on complq).
        CtxPreempt = 0x0012,
        /// Resume a preempted context. Asynchronous (completion on complq).
        CtxResume = 0x0013,
        /// Bind an ASID to a page-table root. Synchronous.
        AsidBind = 0x0020,
        /// Unbind an ASID. Synchronous.
        AsidUnbind = 0x0021,
        /// Invalidate TLB entries by ASID and VA range, or a whole ASID. Asynchronous.
        TlbInvalidate = 0x0030,
        /// Queue a job (batch) on a context. Job completion on complq.
        JobSubmit = 0x0040,
        /// Reply to a page fault: resume (retry) or cancel. Synchronous.
        FaultReply = 0x0050,
    }
}

impl Opcode {
    /// True for commands whose effect completes later with a COMMAND_DONE completion.
    pub const fn is_async(self) -> bool {
        matches!(
            self,
            Opcode::CtxPreempt | Opcode::CtxResume | Opcode::TlbInvalidate
        )
    }

    /// Size of the request body (after the 16-byte header).
    pub const fn request_body_size(self) -> usize {
        match self {
            Opcode::GetInfo | Opcode::GetStats => 0,
            Opcode::Reset => ResetReq::SIZE,
            Opcode::CtxCreate => CtxCreateReq::SIZE,
            Opcode::CtxDestroy | Opcode::CtxPreempt | Opcode::CtxResume => CtxReq::SIZE,
            Opcode::AsidBind => AsidBindReq::SIZE,
            Opcode::AsidUnbind => AsidUnbindReq::SIZE,
            Opcode::TlbInvalidate => TlbInvalidateReq::SIZE,
            Opcode::JobSubmit => JobSubmitReq::SIZE,
            Opcode::FaultReply => FaultReplyReq::SIZE,
        }
    }

    /// Size of the response body (after the 16-byte header) when the status is OK.
    pub const fn response_body_size(self) -> usize {
        match self {
            Opcode::GetInfo => GetInfoResp::SIZE,
            Opcode::GetStats => StatsResp::SIZE,
            _ => 0,
        }
    }

    /// Smallest response body the device serves (after the 16-byte header): the full body
    /// but for GET_STATS, which fills a shorter buffer with as many whole counters as fit,
    /// down to the 24 counters of v0.1 (spec section 6.4.2).
    pub const fn min_response_body_size(self) -> usize {
        match self {
            Opcode::GetStats => STATS_V0_1_SIZE,
            _ => self.response_body_size(),
        }
    }
}

wire_enum! {
    /// Status codes: control responses, completion records, job results, context errors.
    Status: u32 {
        /// Success (for asynchronous commands in the control response: accepted).
        Ok = 0,
        /// Unknown opcode, or an opcode this device does not implement.
        Unsupported = 1,
        /// Request length wrong for the opcode, response buffer too small, or the chain is
        /// not `[readable...][writable...]`.
        BadLength = 2,
        /// A field is out of range, misaligned, or a reserved field/flag is nonzero.
        InvalidArgument = 3,
        /// A guest-physical address is not readable/writable guest RAM.
        BadAddress = 4,
        /// The device cannot allocate what the command needs (a full job queue or too many
        /// outstanding asynchronous commands is BUSY instead).
        NoResources = 5,
        /// The object (context, ASID binding, fault id) does not exist.
        NotFound = 6,
        /// The object already exists.
        AlreadyExists = 7,
        /// The object is in a state that does not allow the command.
        BadState = 8,
        /// Temporarily unable (queue full, too many outstanding commands); retry later.
        Busy = 9,
        /// The device is resetting; retry after the DEVICE_RESET event.
        Resetting = 10,
        /// Internal device error (a device bug or an injected failure).
        Internal = 11,
        /// The operation did not finish in time (e.g. injected invalidation/preempt timeout).
        Timeout = 12,
        /// The operation was abandoned (its context was destroyed or the device reset).
        Canceled = 13,
        /// Job/context: a page fault was answered CANCEL.
        JobFault = 0x100,
        /// Job/context: undefined opcode, reserved bits set, or a bad operand.
        JobInvalidInstruction = 0x101,
        /// Job/context: a memory operand is not naturally aligned.
        JobMisaligned = 0x102,
        /// Job/context: execution ran past the end of the batch without END.
        JobBatchOverrun = 0x103,
        /// Job/context: a WAIT timed out.
        JobSemaphoreTimeout = 0x104,
        /// Job/context: the engine running the job hung.
        JobHang = 0x105,
        /// Job: not run because its context is in the error state.
        JobSkipped = 0x106,
        /// Job/context: LOOP nesting deeper than [`LOOP_MAX_DEPTH`].
        JobLoopOverflow = 0x107,
        /// Job/context: the job ran longer than the device's job timeout (never for a
        /// `CTX_F_LONG_RUNNING` context). Since v0.2.
        JobTimeout = 0x108,
    }
}

wire_struct! {
    /// Control request header (16 bytes); the command body follows it.
    CtrlHeader, 16, {
        /// [`Opcode`].
        opcode: u32 = OFFSET_OPCODE @ 0,
        /// Request flags; none are defined in v0, must be zero.
        flags: u32 = OFFSET_FLAGS @ 4,
        /// Chosen by the driver, echoed in the response and in asynchronous completions.
        seqno: u64 = OFFSET_SEQNO @ 8,
    }
}

wire_struct! {
    /// Control response header (16 bytes); the response body follows it.
    RespHeader, 16, {
        /// [`Status`].
        status: u32 = OFFSET_STATUS @ 0,
        /// Reserved, zero.
        reserved: u32 = OFFSET_RESERVED @ 4,
        /// Echo of the request's seqno (0 if the device did not read a complete header).
        seqno: u64 = OFFSET_SEQNO @ 8,
    }
}

wire_struct! {
    /// GET_INFO response body (40 bytes).
    GetInfoResp, 40, {
        /// [`SPEC_VERSION`] implemented by the device.
        spec_version: u32 = OFFSET_SPEC_VERSION @ 0,
        /// As config space `device_index`.
        device_index: u32 = OFFSET_DEVICE_INDEX @ 4,
        /// As config space `num_engines`.
        num_engines: u32 = OFFSET_NUM_ENGINES @ 8,
        /// As config space `num_asids`.
        num_asids: u32 = OFFSET_NUM_ASIDS @ 12,
        /// As config space `max_contexts`.
        max_contexts: u32 = OFFSET_MAX_CONTEXTS @ 16,
        /// As config space `tlb_entries`.
        tlb_entries: u32 = OFFSET_TLB_ENTRIES @ 20,
        /// As config space `tlb_ways`.
        tlb_ways: u32 = OFFSET_TLB_WAYS @ 24,
        /// Reserved, zero.
        reserved: u32 = OFFSET_RESERVED @ 28,
        /// Control requests this device answered before this one.
        commands_completed: u64 = OFFSET_COMMANDS_COMPLETED @ 32,
    }
}

wire_struct! {
    /// RESET request body (8 bytes).
    ResetReq, 8, {
        /// Must be zero.
        flags: u32 = OFFSET_FLAGS @ 0,
        /// Reserved, zero.
        reserved: u32 = OFFSET_RESERVED @ 4,
    }
}

/// CTX_CREATE flag: the context runs in long-running (preempt-fence) mode; the device's
/// job watchdog does not apply to it.
pub const CTX_F_LONG_RUNNING: u32 = 1 << 0;
/// Every CTX_CREATE flag defined in v0.
pub const CTX_CREATE_FLAGS_MASK: u32 = CTX_F_LONG_RUNNING;

wire_struct! {
    /// CTX_CREATE request body (16 bytes).
    CtxCreateReq, 16, {
        /// Context id chosen by the driver, `< max_contexts`.
        ctx_id: u32 = OFFSET_CTX_ID @ 0,
        /// A bound ASID, `< num_asids`.
        asid: u32 = OFFSET_ASID @ 4,
        /// [`CTX_F_LONG_RUNNING`]; other bits zero.
        flags: u32 = OFFSET_FLAGS @ 8,
        /// Reserved, zero.
        reserved: u32 = OFFSET_RESERVED @ 12,
    }
}

wire_struct! {
    /// Body of CTX_DESTROY, CTX_PREEMPT and CTX_RESUME (8 bytes).
    CtxReq, 8, {
        /// Context id.
        ctx_id: u32 = OFFSET_CTX_ID @ 0,
        /// Must be zero.
        flags: u32 = OFFSET_FLAGS @ 4,
    }
}

wire_struct! {
    /// ASID_BIND request body (16 bytes).
    AsidBindReq, 16, {
        /// ASID, `< num_asids`.
        asid: u32 = OFFSET_ASID @ 0,
        /// Must be zero.
        flags: u32 = OFFSET_FLAGS @ 4,
        /// Guest-physical address of the level-3 (root) table, 4 KiB aligned.
        pt_root: u64 = OFFSET_PT_ROOT @ 8,
    }
}

wire_struct! {
    /// ASID_UNBIND request body (8 bytes).
    AsidUnbindReq, 8, {
        /// ASID.
        asid: u32 = OFFSET_ASID @ 0,
        /// Must be zero.
        flags: u32 = OFFSET_FLAGS @ 4,
    }
}

/// TLB_INVALIDATE flag: invalidate the whole ASID (`va` and `size` must be zero); with
/// `asid == ASID_ALL`, every ASID.
pub const TLB_INVAL_F_WHOLE_ASID: u32 = 1 << 0;
/// Every TLB_INVALIDATE flag defined in v0.
pub const TLB_INVAL_FLAGS_MASK: u32 = TLB_INVAL_F_WHOLE_ASID;

wire_struct! {
    /// TLB_INVALIDATE request body (24 bytes).
    TlbInvalidateReq, 24, {
        /// ASID (or [`ASID_ALL`] with [`TLB_INVAL_F_WHOLE_ASID`]).
        asid: u32 = OFFSET_ASID @ 0,
        /// [`TLB_INVAL_F_WHOLE_ASID`]; other bits zero.
        flags: u32 = OFFSET_FLAGS @ 4,
        /// First byte of the range, 4 KiB aligned, `< 2^48`.
        va: u64 = OFFSET_VA @ 8,
        /// Length in bytes, nonzero multiple of 4 KiB, `va + size <= 2^48`.
        size: u64 = OFFSET_SIZE @ 16,
    }
}

wire_struct! {
    /// JOB_SUBMIT request body (24 bytes).
    JobSubmitReq, 24, {
        /// Context id.
        ctx_id: u32 = OFFSET_CTX_ID @ 0,
        /// Must be zero.
        flags: u32 = OFFSET_FLAGS @ 4,
        /// GPU virtual address of the batch, 8-byte aligned.
        batch_va: u64 = OFFSET_BATCH_VA @ 8,
        /// Batch length in bytes: nonzero multiple of 8, at most [`MAX_BATCH_LEN`].
        batch_len: u32 = OFFSET_BATCH_LEN @ 16,
        /// Reserved, zero.
        reserved: u32 = OFFSET_RESERVED @ 20,
    }
}

wire_enum! {
    /// FAULT_REPLY actions.
    FaultAction: u32 {
        /// Retry the stalled access(es): the device walks the page table again.
        Resume = 1,
        /// Fail the stalled access(es): the context takes a JOB_FAULT error.
        Cancel = 2,
    }
}

wire_struct! {
    /// FAULT_REPLY request body (16 bytes).
    FaultReplyReq, 16, {
        /// The fault id from the PAGE_FAULT event.
        fault_id: u64 = OFFSET_FAULT_ID @ 0,
        /// [`FaultAction`].
        action: u32 = OFFSET_ACTION @ 8,
        /// Must be zero.
        flags: u32 = OFFSET_FLAGS @ 12,
    }
}

/// Size of the GET_STATS response body of spec v0.1 (24 counters): the smallest response
/// buffer body GET_STATS accepts.
pub const STATS_V0_1_SIZE: usize = 192;

wire_struct! {
    /// GET_STATS response body (29 counters, 232 bytes). Counters are monotonic from
    /// backend start; neither RESET nor a virtio reset clears them. Append-only: a newer
    /// minor version adds counters at the end.
    StatsResp, 232, {
        /// Control requests answered (any status).
        commands_completed: u64 = OFFSET_COMMANDS_COMPLETED @ 0,
        /// Control requests answered with a status other than OK.
        commands_failed: u64 = OFFSET_COMMANDS_FAILED @ 8,
        /// Malformed chains returned unanswered (no room for a response header).
        malformed_chains: u64 = OFFSET_MALFORMED_CHAINS @ 16,
        /// Event records posted.
        events_posted: u64 = OFFSET_EVENTS_POSTED @ 24,
        /// Events dropped because the event backlog overflowed.
        events_lost: u64 = OFFSET_EVENTS_LOST @ 32,
        /// Completion records posted.
        completions_posted: u64 = OFFSET_COMPLETIONS_POSTED @ 40,
        /// Page-fault events raised.
        page_faults: u64 = OFFSET_PAGE_FAULTS @ 48,
        /// Faults answered RESUME.
        faults_resumed: u64 = OFFSET_FAULTS_RESUMED @ 56,
        /// Faults answered CANCEL.
        faults_canceled: u64 = OFFSET_FAULTS_CANCELED @ 64,
        /// Engine accesses translated by a TLB hit.
        tlb_hits: u64 = OFFSET_TLB_HITS @ 72,
        /// Engine accesses that needed a page walk.
        tlb_misses: u64 = OFFSET_TLB_MISSES @ 80,
        /// TLB_INVALIDATE commands completed.
        tlb_invalidations: u64 = OFFSET_TLB_INVALIDATIONS @ 88,
        /// TLB entries dropped by invalidations.
        tlb_entries_invalidated: u64 = OFFSET_TLB_ENTRIES_INVALIDATED @ 96,
        /// Page walks performed.
        page_walks: u64 = OFFSET_PAGE_WALKS @ 104,
        /// Walks that hit a reserved bit or an unreadable table address.
        pte_errors: u64 = OFFSET_PTE_ERRORS @ 112,
        /// Preemptions completed.
        preemptions: u64 = OFFSET_PREEMPTIONS @ 120,
        /// Jobs completed with status OK.
        jobs_completed: u64 = OFFSET_JOBS_COMPLETED @ 128,
        /// Jobs completed with an error status.
        jobs_failed: u64 = OFFSET_JOBS_FAILED @ 136,
        /// Instructions executed.
        instructions: u64 = OFFSET_INSTRUCTIONS @ 144,
        /// Engine hangs (ENGINE_HANG events).
        engine_hangs: u64 = OFFSET_ENGINE_HANGS @ 152,
        /// Device resets (RESET commands, device-initiated resets, virtio resets).
        resets: u64 = OFFSET_RESETS @ 160,
        /// Faults injected by the device's fault-injection machinery.
        injected_faults: u64 = OFFSET_INJECTED_FAULTS @ 168,
        /// Audit mode: accesses through a translation a completed invalidation covered
        /// (a device fault).
        stale_accesses: u64 = OFFSET_STALE_ACCESSES @ 176,
        /// Audit mode: accesses checked.
        audit_checks: u64 = OFFSET_AUDIT_CHECKS @ 184,
        /// Audit mode: TLB entries that stayed ahead of their page table (granting what it
        /// no longer grants) longer than the audit grace period with no invalidation
        /// covering them accepted: PTEs changed and never invalidated. Since v0.2.
        unflushed_entries: u64 = OFFSET_UNFLUSHED_ENTRIES @ 192,
        /// Audit mode: of `unflushed_entries`, those an invalidation of their ASID left
        /// behind (it did not cover them although they were already ahead of memory when it
        /// was accepted, and it completed OK): a flush narrower than the PTE change. Since
        /// v0.2.
        narrow_flush_entries: u64 = OFFSET_NARROW_FLUSH_ENTRIES @ 200,
        /// Accesses retried after a RESUME: an engine took up a context again whose access
        /// waited on a fault answered RESUME. Since v0.3.
        faults_retried: u64 = OFFSET_FAULTS_RETRIED @ 208,
        /// Of `faults_retried`, the total time in ns from the raising of each fault (the
        /// failed access) to its retry: the end-to-end service time of a fault as the
        /// device sees it. Since v0.3.
        fault_retry_ns: u64 = OFFSET_FAULT_RETRY_NS @ 216,
        /// Of `fault_retry_ns`, the part from the delivery of each fault's PAGE_FAULT event
        /// to the acceptance of its FAULT_REPLY: the time the fault spent with the driver.
        /// Since v0.3.
        fault_driver_ns: u64 = OFFSET_FAULT_DRIVER_NS @ 224,
    }
}

// ---------------------------------------------------------------------------------------
// Event queue
// ---------------------------------------------------------------------------------------

wire_enum! {
    /// Event types (EventHeader::event_type).
    EventType: u32 {
        /// A recoverable page fault stalled one or more accesses ([`PageFaultEvent`]).
        PageFault = 1,
        /// A context took an error and entered the error state ([`ContextErrorEvent`]).
        ContextError = 2,
        /// An engine stopped making progress ([`EngineHangEvent`]).
        EngineHang = 3,
        /// The device reset itself, or finished a RESET ([`DeviceResetEvent`]).
        DeviceReset = 4,
        /// Events were dropped ([`EventsLostEvent`]).
        EventsLost = 5,
    }
}

wire_struct! {
    /// Header of every event record (16 bytes); the body follows at [`EVENT_BODY_OFFSET`].
    EventHeader, 16, {
        /// [`EventType`].
        event_type: u32 = OFFSET_EVENT_TYPE @ 0,
        /// Reserved, zero.
        flags: u32 = OFFSET_FLAGS @ 4,
        /// 1 for the first event after a virtio reset, +1 per event posted.
        event_seq: u64 = OFFSET_EVENT_SEQ @ 8,
    }
}

wire_enum! {
    /// Kind of access that faulted.
    AccessKind: u32 {
        /// Data read (COPY/CHECKSUM source, WAIT poll).
        Read = 1,
        /// Data write (STORE, FILL, COPY destination, CHECKSUM result, FENCE).
        Write = 2,
        /// Atomic read-modify-write (ATOMIC_ADD); needs a writable page.
        Atomic = 3,
        /// Instruction fetch from the batch; needs a page without NO_EXEC.
        Exec = 4,
    }
}

wire_enum! {
    /// Why a translation failed.
    FaultReason: u32 {
        /// An entry on the walk has PRESENT clear.
        NotPresent = 1,
        /// Write or atomic access to a page without WRITABLE.
        WriteProtect = 2,
        /// Instruction fetch from a NO_EXEC page.
        ExecProtect = 3,
        /// A reserved bit is set in an entry on the walk.
        ReservedBit = 4,
        /// A table address on the walk is not readable guest RAM.
        BadTableAddress = 5,
        /// The final page address is not guest RAM.
        BadPageAddress = 6,
        /// The virtual address is `>= 2^48`.
        VaRange = 7,
    }
}

wire_struct! {
    /// PAGE_FAULT event body (48 bytes, at [`EVENT_BODY_OFFSET`]).
    PageFaultEvent, 48, {
        /// Nonzero, unique per device until a reset; the FAULT_REPLY key.
        fault_id: u64 = OFFSET_FAULT_ID @ 0,
        /// Faulting virtual address (exact byte address of the access).
        va: u64 = OFFSET_VA @ 8,
        /// ASID of the context.
        asid: u32 = OFFSET_ASID @ 16,
        /// Context whose access stalled.
        ctx_id: u32 = OFFSET_CTX_ID @ 20,
        /// Engine the context ran on.
        engine: u32 = OFFSET_ENGINE @ 24,
        /// [`AccessKind`].
        access: u32 = OFFSET_ACCESS @ 28,
        /// [`FaultReason`].
        reason: u32 = OFFSET_REASON @ 32,
        /// Page-table level (3..0) of the entry that stopped the walk.
        level: u32 = OFFSET_LEVEL @ 36,
        /// Reserved, zero.
        flags: u32 = OFFSET_FLAGS @ 40,
        /// Reserved, zero.
        reserved: u32 = OFFSET_RESERVED @ 44,
    }
}

wire_struct! {
    /// CONTEXT_ERROR event body (48 bytes).
    ContextErrorEvent, 48, {
        /// Context that took the error.
        ctx_id: u32 = OFFSET_CTX_ID @ 0,
        /// Its ASID.
        asid: u32 = OFFSET_ASID @ 4,
        /// The error, a job [`Status`] (0x100..).
        error: u32 = OFFSET_ERROR @ 8,
        /// Engine, or [`ENGINE_NONE`].
        engine: u32 = OFFSET_ENGINE @ 12,
        /// Seqno of the JOB_SUBMIT of the failing job.
        job_seqno: u64 = OFFSET_JOB_SEQNO @ 16,
        /// GPU VA of the failing instruction.
        pc: u64 = OFFSET_PC @ 24,
        /// Data address involved, or 0.
        address: u64 = OFFSET_ADDRESS @ 32,
        /// Reserved, zero.
        reserved: u64 = OFFSET_RESERVED @ 40,
    }
}

wire_struct! {
    /// ENGINE_HANG event body (48 bytes).
    EngineHangEvent, 48, {
        /// Engine that hung.
        engine: u32 = OFFSET_ENGINE @ 0,
        /// Context on it, or [`CTX_NONE`].
        ctx_id: u32 = OFFSET_CTX_ID @ 4,
        /// Seqno of the JOB_SUBMIT of the job on it, or 0.
        job_seqno: u64 = OFFSET_JOB_SEQNO @ 8,
        /// GPU VA of the instruction it is stuck at.
        pc: u64 = OFFSET_PC @ 16,
        /// How long it has made no progress, in nanoseconds.
        stalled_ns: u64 = OFFSET_STALLED_NS @ 24,
        /// Reserved, zero.
        reserved0: u64 = OFFSET_RESERVED0 @ 32,
        /// Reserved, zero.
        reserved1: u64 = OFFSET_RESERVED1 @ 40,
    }
}

wire_enum! {
    /// Why the device reset.
    ResetReason: u32 {
        /// A RESET command.
        DriverRequest = 1,
        /// The device reset itself (internal error or fault injection).
        DeviceInitiated = 2,
    }
}

wire_struct! {
    /// DEVICE_RESET event body (48 bytes).
    DeviceResetEvent, 48, {
        /// [`ResetReason`].
        reason: u32 = OFFSET_REASON @ 0,
        /// Reserved, zero.
        reserved0: u32 = OFFSET_RESERVED0 @ 4,
        /// Resets of this device since the backend started (including this one).
        reset_count: u64 = OFFSET_RESET_COUNT @ 8,
        /// Reserved, zero.
        reserved1: u64 = OFFSET_RESERVED1 @ 16,
        /// Reserved, zero.
        reserved2: u64 = OFFSET_RESERVED2 @ 24,
        /// Reserved, zero.
        reserved3: u64 = OFFSET_RESERVED3 @ 32,
        /// Reserved, zero.
        reserved4: u64 = OFFSET_RESERVED4 @ 40,
    }
}

wire_struct! {
    /// EVENTS_LOST event body (48 bytes).
    EventsLostEvent, 48, {
        /// Events dropped since the previous EVENTS_LOST event.
        lost: u64 = OFFSET_LOST @ 0,
        /// Reserved, zero.
        reserved0: u64 = OFFSET_RESERVED0 @ 8,
        /// Reserved, zero.
        reserved1: u64 = OFFSET_RESERVED1 @ 16,
        /// Reserved, zero.
        reserved2: u64 = OFFSET_RESERVED2 @ 24,
        /// Reserved, zero.
        reserved3: u64 = OFFSET_RESERVED3 @ 32,
        /// Reserved, zero.
        reserved4: u64 = OFFSET_RESERVED4 @ 40,
    }
}

/// A decoded event record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// PAGE_FAULT.
    PageFault(PageFaultEvent),
    /// CONTEXT_ERROR.
    ContextError(ContextErrorEvent),
    /// ENGINE_HANG.
    EngineHang(EngineHangEvent),
    /// DEVICE_RESET.
    DeviceReset(DeviceResetEvent),
    /// EVENTS_LOST.
    EventsLost(EventsLostEvent),
}

impl Event {
    /// The event type.
    pub fn event_type(&self) -> EventType {
        match self {
            Event::PageFault(_) => EventType::PageFault,
            Event::ContextError(_) => EventType::ContextError,
            Event::EngineHang(_) => EventType::EngineHang,
            Event::DeviceReset(_) => EventType::DeviceReset,
            Event::EventsLost(_) => EventType::EventsLost,
        }
    }

    /// Decodes an event record (header + body, at least [`EVENT_SIZE`] bytes). Returns the
    /// header's `event_seq` and the event; `None` if short or of an unknown type.
    pub fn decode(b: &[u8]) -> Option<(u64, Event)> {
        if b.len() < EVENT_SIZE {
            return None;
        }
        let h = EventHeader::decode(b)?;
        let body = b.get(EVENT_BODY_OFFSET..EVENT_SIZE)?;
        let ev = match EventType::from_u32(h.event_type)? {
            EventType::PageFault => Event::PageFault(PageFaultEvent::decode(body)?),
            EventType::ContextError => Event::ContextError(ContextErrorEvent::decode(body)?),
            EventType::EngineHang => Event::EngineHang(EngineHangEvent::decode(body)?),
            EventType::DeviceReset => Event::DeviceReset(DeviceResetEvent::decode(body)?),
            EventType::EventsLost => Event::EventsLost(EventsLostEvent::decode(body)?),
        };
        Some((h.event_seq, ev))
    }

    /// Encodes a full event record into `out[..EVENT_SIZE]`; `None` if `out` is short.
    pub fn encode(&self, event_seq: u64, out: &mut [u8]) -> Option<usize> {
        let rec = out.get_mut(..EVENT_SIZE)?;
        rec.fill(0);
        let h = EventHeader {
            event_type: self.event_type().as_u32(),
            flags: 0,
            event_seq,
        };
        h.encode(rec)?;
        let body = rec.get_mut(EVENT_BODY_OFFSET..)?;
        match self {
            Event::PageFault(e) => e.encode(body)?,
            Event::ContextError(e) => e.encode(body)?,
            Event::EngineHang(e) => e.encode(body)?,
            Event::DeviceReset(e) => e.encode(body)?,
            Event::EventsLost(e) => e.encode(body)?,
        };
        Some(EVENT_SIZE)
    }
}

// ---------------------------------------------------------------------------------------
// Completion queue
// ---------------------------------------------------------------------------------------

wire_enum! {
    /// Kind of a completion record.
    CompletionKind: u32 {
        /// An asynchronous control command finished; `seqno`/`opcode` identify it.
        CommandDone = 1,
        /// A job finished (END, or error); `seqno` is its JOB_SUBMIT seqno.
        JobDone = 2,
        /// A FENCE instruction with NOTIFY executed; `value` is the fence value.
        Fence = 3,
    }
}

wire_struct! {
    /// Completion record (32 bytes).
    Completion, 32, {
        /// [`CompletionKind`].
        kind: u32 = OFFSET_KIND @ 0,
        /// [`Status`] of the command or job (Ok for Fence).
        status: u32 = OFFSET_STATUS @ 4,
        /// Seqno of the control request (the JOB_SUBMIT for JobDone and Fence).
        seqno: u64 = OFFSET_SEQNO @ 8,
        /// Context, or [`CTX_NONE`] (TLB_INVALIDATE).
        ctx_id: u32 = OFFSET_CTX_ID @ 16,
        /// [`Opcode`] of that request.
        opcode: u32 = OFFSET_OPCODE @ 20,
        /// TlbInvalidate: entries dropped; Fence: fence value; otherwise 0.
        value: u64 = OFFSET_VALUE @ 24,
    }
}

// ---------------------------------------------------------------------------------------
// Page tables
// ---------------------------------------------------------------------------------------

/// Page-table entry format and walk helpers (see spec section "Page tables").
pub mod pte {
    /// Entries per 4 KiB table.
    pub const ENTRIES_PER_TABLE: usize = 512;
    /// Bytes per entry.
    pub const ENTRY_SIZE: u64 = 8;
    /// Level of the root table.
    pub const ROOT_LEVEL: u32 = 3;
    /// Number of levels.
    pub const LEVELS: u32 = 4;

    /// Bit 0: the entry is valid.
    pub const PRESENT: u64 = 1 << 0;
    /// Bit 1 (leaf): writes and atomics allowed; clear = read-only. Ignored in tables.
    pub const WRITABLE: u64 = 1 << 1;
    /// Bit 2 (leaf): instruction fetch forbidden. Ignored in tables.
    pub const NO_EXEC: u64 = 1 << 2;
    /// Bit 7: in a level-1 entry, a 2 MiB leaf. Reserved (must be 0) at levels 0, 2, 3.
    pub const HUGE: u64 = 1 << 7;
    /// Bits 51:12: physical address of the next table or of a 4 KiB page.
    pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
    /// Bits 51:21: physical address of a 2 MiB page (bits 20:12 of a 2 MiB leaf are
    /// reserved).
    pub const ADDR_MASK_2M: u64 = 0x000f_ffff_ffe0_0000;
    /// Bits 62:52: ignored by the device, free for software.
    pub const SW_MASK: u64 = 0x7ff0_0000_0000_0000;
    /// Bits that must be zero in every present entry: 6:3, 11:8 and 63.
    pub const RESERVED_MASK: u64 = 0x8000_0000_0000_0f78;
    /// Additional reserved bits of a 2 MiB leaf: 20:12.
    pub const RESERVED_MASK_2M: u64 = 0x0000_0000_001f_f000;

    /// Meaning of one entry at one level.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum PteKind {
        /// PRESENT clear (all other bits ignored).
        NotPresent,
        /// A pointer to the next-level table.
        Table {
            /// Physical address of the table (4 KiB aligned).
            pa: u64,
        },
        /// A leaf mapping.
        Leaf {
            /// Physical address of the page (aligned to `size`).
            pa: u64,
            /// Page size, [`super::PAGE_SIZE_4K`] or [`super::PAGE_SIZE_2M`].
            size: u64,
            /// WRITABLE.
            writable: bool,
            /// Not NO_EXEC.
            executable: bool,
        },
        /// Present with a reserved bit set (the access faults with RESERVED_BIT).
        Reserved,
        /// `level` is not 0..=3.
        BadLevel,
    }

    /// Decodes `raw` as an entry of a table at `level` (3 = root, 0 = last).
    pub const fn decode(raw: u64, level: u32) -> PteKind {
        if level > ROOT_LEVEL {
            return PteKind::BadLevel;
        }
        if raw & PRESENT == 0 {
            return PteKind::NotPresent;
        }
        if raw & RESERVED_MASK != 0 {
            return PteKind::Reserved;
        }
        let huge = raw & HUGE != 0;
        match level {
            0 => {
                if huge {
                    PteKind::Reserved
                } else {
                    PteKind::Leaf {
                        pa: raw & ADDR_MASK,
                        size: super::PAGE_SIZE_4K,
                        writable: raw & WRITABLE != 0,
                        executable: raw & NO_EXEC == 0,
                    }
                }
            }
            1 if huge => {
                if raw & RESERVED_MASK_2M != 0 {
                    PteKind::Reserved
                } else {
                    PteKind::Leaf {
                        pa: raw & ADDR_MASK_2M,
                        size: super::PAGE_SIZE_2M,
                        writable: raw & WRITABLE != 0,
                        executable: raw & NO_EXEC == 0,
                    }
                }
            }
            _ => {
                if huge {
                    PteKind::Reserved
                } else {
                    PteKind::Table {
                        pa: raw & ADDR_MASK,
                    }
                }
            }
        }
    }

    /// Leaf permission bits for [`page_4k`] and [`page_2m`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct Perms {
        /// Set WRITABLE.
        pub writable: bool,
        /// Set NO_EXEC.
        pub no_exec: bool,
    }

    const fn perm_bits(p: Perms) -> u64 {
        let mut v = PRESENT;
        if p.writable {
            v |= WRITABLE;
        }
        if p.no_exec {
            v |= NO_EXEC;
        }
        v
    }

    /// A table-pointer entry (levels 3, 2, 1); `None` if `pa` is unaligned or too wide.
    pub const fn table(pa: u64) -> Option<u64> {
        if pa & !ADDR_MASK != 0 {
            return None;
        }
        Some(pa | PRESENT)
    }

    /// A 4 KiB leaf (level 0); `None` if `pa` is unaligned or too wide.
    pub const fn page_4k(pa: u64, p: Perms) -> Option<u64> {
        if pa & !ADDR_MASK != 0 {
            return None;
        }
        Some(pa | perm_bits(p))
    }

    /// A 2 MiB leaf (level 1); `None` if `pa` is unaligned or too wide.
    pub const fn page_2m(pa: u64, p: Perms) -> Option<u64> {
        if pa & !ADDR_MASK_2M != 0 {
            return None;
        }
        Some(pa | perm_bits(p) | HUGE)
    }

    /// Index into the table at `level` for `va`; `None` if `level > 3` or `va >= 2^48`.
    pub const fn index(va: u64, level: u32) -> Option<usize> {
        if level > ROOT_LEVEL || va >> super::VA_BITS != 0 {
            return None;
        }
        Some(((va >> (12 + 9 * level)) & 0x1ff) as usize)
    }

    /// Guest-physical address of the entry for `va` in the table at `table_pa`, `level`.
    pub const fn entry_address(table_pa: u64, va: u64, level: u32) -> Option<u64> {
        match index(va, level) {
            Some(i) => {
                if table_pa & !ADDR_MASK != 0 {
                    return None;
                }
                Some(table_pa + (i as u64) * ENTRY_SIZE)
            }
            None => None,
        }
    }

    /// Bytes of VA mapped by one entry at `level` (4 KiB, 2 MiB, 1 GiB, 512 GiB).
    pub const fn level_span(level: u32) -> Option<u64> {
        if level > ROOT_LEVEL {
            return None;
        }
        Some(1u64 << (12 + 9 * level))
    }
}

// ---------------------------------------------------------------------------------------
// Command-stream ISA
// ---------------------------------------------------------------------------------------

/// The job batch instruction set (see spec section "Command-stream ISA").
pub mod isa {
    /// Opcode 0x00 is never valid, so that executing zeroed memory fails fast.
    pub const OP_INVALID: u8 = 0x00;
    /// NOP (1 qword).
    pub const OP_NOP: u8 = 0x01;
    /// END (1 qword).
    pub const OP_END: u8 = 0x02;
    /// STORE (3 qwords).
    pub const OP_STORE: u8 = 0x03;
    /// FILL (3 qwords).
    pub const OP_FILL: u8 = 0x04;
    /// COPY (4 qwords).
    pub const OP_COPY: u8 = 0x05;
    /// ATOMIC_ADD (3 qwords).
    pub const OP_ATOMIC_ADD: u8 = 0x06;
    /// WAIT (3 qwords).
    pub const OP_WAIT: u8 = 0x07;
    /// LOOP (2 qwords).
    pub const OP_LOOP: u8 = 0x08;
    /// DELAY (1 qword).
    pub const OP_DELAY: u8 = 0x09;
    /// CHECKSUM (4 qwords).
    pub const OP_CHECKSUM: u8 = 0x0a;
    /// FENCE (3 qwords).
    pub const OP_FENCE: u8 = 0x0b;

    /// Flag (STORE, ATOMIC_ADD, WAIT): 64-bit operand; clear = 32-bit.
    pub const FLAG_SIZE64: u8 = 1 << 0;
    /// Flag (FENCE): post a FENCE completion after the write.
    pub const FLAG_NOTIFY: u8 = 1 << 0;

    /// Longest instruction, in qwords.
    pub const MAX_INSN_QWORDS: usize = 4;

    /// Header qword: bits 7:0 opcode.
    pub const HDR_OPCODE_SHIFT: u32 = 0;
    /// Header qword: bits 15:8 flags.
    pub const HDR_FLAGS_SHIFT: u32 = 8;
    /// Header qword: bits 23:16 sub-op (WAIT compare op).
    pub const HDR_SUB_SHIFT: u32 = 16;
    /// Header qword: bits 31:24 reserved, must be zero.
    pub const HDR_RESERVED_MASK: u64 = 0xff00_0000;
    /// Header qword: bits 63:32 imm32.
    pub const HDR_IMM_SHIFT: u32 = 32;

    /// Builds a header qword.
    pub const fn header(opcode: u8, flags: u8, sub: u8, imm: u32) -> u64 {
        (opcode as u64)
            | ((flags as u64) << HDR_FLAGS_SHIFT)
            | ((sub as u64) << HDR_SUB_SHIFT)
            | ((imm as u64) << HDR_IMM_SHIFT)
    }

    /// Length in qwords of the instruction whose header is `hdr`; `None` for an undefined
    /// opcode.
    pub const fn insn_qwords(hdr: u64) -> Option<usize> {
        match (hdr & 0xff) as u8 {
            OP_NOP | OP_END | OP_DELAY => Some(1),
            OP_LOOP => Some(2),
            OP_STORE | OP_FILL | OP_ATOMIC_ADD | OP_WAIT | OP_FENCE => Some(3),
            OP_COPY | OP_CHECKSUM => Some(4),
            _ => None,
        }
    }

    /// WAIT comparison: `(memory value) OP (operand)`, unsigned.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    #[repr(u8)]
    pub enum CompareOp {
        /// Equal.
        Eq = 0,
        /// Not equal.
        Ne = 1,
        /// Greater or equal.
        Ge = 2,
        /// Greater.
        Gt = 3,
        /// Less or equal.
        Le = 4,
        /// Less.
        Lt = 5,
    }

    impl CompareOp {
        /// From the header sub-op field.
        pub const fn from_u8(v: u8) -> Option<Self> {
            match v {
                0 => Some(CompareOp::Eq),
                1 => Some(CompareOp::Ne),
                2 => Some(CompareOp::Ge),
                3 => Some(CompareOp::Gt),
                4 => Some(CompareOp::Le),
                5 => Some(CompareOp::Lt),
                _ => None,
            }
        }

        /// Evaluates `mem OP operand`.
        pub const fn eval(self, mem: u64, operand: u64) -> bool {
            match self {
                CompareOp::Eq => mem == operand,
                CompareOp::Ne => mem != operand,
                CompareOp::Ge => mem >= operand,
                CompareOp::Gt => mem > operand,
                CompareOp::Le => mem <= operand,
                CompareOp::Lt => mem < operand,
            }
        }
    }

    /// Why an instruction does not decode.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum IsaError {
        /// Fewer qwords than the instruction needs (the batch ends inside it).
        Truncated,
        /// Undefined opcode (including 0x00).
        BadOpcode,
        /// Reserved header bits, an undefined flag, or a nonzero unused field.
        ReservedBits,
        /// An operand is out of range (length too big or not a multiple of the unit, LOOP
        /// count 0 or forward offset, undefined compare op).
        BadOperand,
        /// A memory operand is not naturally aligned.
        Misaligned,
    }

    impl IsaError {
        /// The job status this error ends a job with.
        pub const fn job_status(self) -> super::Status {
            match self {
                IsaError::Truncated => super::Status::JobBatchOverrun,
                IsaError::Misaligned => super::Status::JobMisaligned,
                _ => super::Status::JobInvalidInstruction,
            }
        }
    }

    /// One decoded instruction.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Insn {
        /// Do nothing.
        Nop,
        /// End the job successfully.
        End,
        /// Write `value` (low 32 bits unless `size64`) at `va`, naturally aligned.
        Store {
            /// 64-bit store.
            size64: bool,
            /// Destination.
            va: u64,
            /// Value.
            value: u64,
        },
        /// Write the 32-bit `pattern` repeatedly over `len` bytes at `va`.
        Fill {
            /// Destination, 4-byte aligned.
            va: u64,
            /// Bytes, a multiple of 4, at most [`super::MAX_BULK_LEN`].
            len: u64,
            /// Pattern.
            pattern: u32,
        },
        /// Copy `len` bytes from `src` to `dst`.
        Copy {
            /// Destination.
            dst: u64,
            /// Source.
            src: u64,
            /// Bytes, at most [`super::MAX_BULK_LEN`].
            len: u64,
        },
        /// Atomically add `value` (wrapping) to the 32- or 64-bit word at `va`.
        AtomicAdd {
            /// 64-bit operand.
            size64: bool,
            /// Address, naturally aligned.
            va: u64,
            /// Addend.
            value: u64,
        },
        /// Poll the word at `va` until `mem OP value` holds, or time out.
        Wait {
            /// 64-bit operand.
            size64: bool,
            /// Comparison.
            op: CompareOp,
            /// Timeout in microseconds of running time; 0 = none.
            timeout_us: u32,
            /// Address, naturally aligned.
            va: u64,
            /// Operand.
            value: u64,
        },
        /// Jump back by `offset` bytes until the body ran `count` times.
        Loop {
            /// Total executions of the body, at least 1.
            count: u32,
            /// Byte offset of the body start relative to this instruction: `<= 0`, multiple
            /// of 8.
            offset: i64,
        },
        /// Busy the engine for `ns` nanoseconds.
        Delay {
            /// Nanoseconds.
            ns: u32,
        },
        /// Store the FNV-1a-64 of `len` bytes at `src` as a 64-bit value at `dst`.
        Checksum {
            /// Source.
            src: u64,
            /// Bytes, at most [`super::MAX_BULK_LEN`].
            len: u64,
            /// Destination, 8-byte aligned.
            dst: u64,
        },
        /// Store the 64-bit `value` at `va` after all earlier writes of the job; with
        /// `notify`, then post a FENCE completion.
        Fence {
            /// Post a completion.
            notify: bool,
            /// Address, 8-byte aligned.
            va: u64,
            /// Value.
            value: u64,
        },
    }

    const fn sz(size64: bool) -> u8 {
        if size64 {
            FLAG_SIZE64
        } else {
            0
        }
    }

    const fn aligned(va: u64, size64: bool) -> bool {
        if size64 {
            va & 7 == 0
        } else {
            va & 3 == 0
        }
    }

    impl Insn {
        /// Length of this instruction in qwords.
        pub const fn qwords(&self) -> usize {
            match self {
                Insn::Nop | Insn::End | Insn::Delay { .. } => 1,
                Insn::Loop { .. } => 2,
                Insn::Store { .. }
                | Insn::Fill { .. }
                | Insn::AtomicAdd { .. }
                | Insn::Wait { .. }
                | Insn::Fence { .. } => 3,
                Insn::Copy { .. } | Insn::Checksum { .. } => 4,
            }
        }

        /// Decodes the instruction at the start of `w` (qwords as read little-endian from the
        /// batch). Checks everything that does not depend on the batch position (LOOP's
        /// target must additionally lie inside the batch: the engine checks that).
        pub fn decode(w: &[u64]) -> Result<Insn, IsaError> {
            let hdr = match w.first() {
                Some(h) => *h,
                None => return Err(IsaError::Truncated),
            };
            let n = match insn_qwords(hdr) {
                Some(n) => n,
                None => return Err(IsaError::BadOpcode),
            };
            if w.len() < n {
                return Err(IsaError::Truncated);
            }
            if hdr & HDR_RESERVED_MASK != 0 {
                return Err(IsaError::ReservedBits);
            }
            let op = (hdr & 0xff) as u8;
            let flags = ((hdr >> HDR_FLAGS_SHIFT) & 0xff) as u8;
            let sub = ((hdr >> HDR_SUB_SHIFT) & 0xff) as u8;
            let imm = (hdr >> HDR_IMM_SHIFT) as u32;
            let a = w.get(1).copied().unwrap_or(0);
            let b = w.get(2).copied().unwrap_or(0);
            let c = w.get(3).copied().unwrap_or(0);

            // Which header fields each opcode may use.
            let (flags_ok, sub_ok, imm_ok) = match op {
                OP_NOP | OP_END => (0u8, false, false),
                OP_STORE | OP_ATOMIC_ADD => (FLAG_SIZE64, false, false),
                OP_FILL => (0, false, true),
                OP_COPY | OP_CHECKSUM => (0, false, false),
                OP_WAIT => (FLAG_SIZE64, true, true),
                OP_LOOP | OP_DELAY => (0, false, true),
                OP_FENCE => (FLAG_NOTIFY, false, false),
                _ => return Err(IsaError::BadOpcode),
            };
            if flags & !flags_ok != 0 || (!sub_ok && sub != 0) || (!imm_ok && imm != 0) {
                return Err(IsaError::ReservedBits);
            }
            let size64 = flags & FLAG_SIZE64 != 0;

            let insn = match op {
                OP_NOP => Insn::Nop,
                OP_END => Insn::End,
                OP_STORE | OP_ATOMIC_ADD => {
                    if !size64 && b >> 32 != 0 {
                        return Err(IsaError::ReservedBits);
                    }
                    if !aligned(a, size64) {
                        return Err(IsaError::Misaligned);
                    }
                    if op == OP_STORE {
                        Insn::Store {
                            size64,
                            va: a,
                            value: b,
                        }
                    } else {
                        Insn::AtomicAdd {
                            size64,
                            va: a,
                            value: b,
                        }
                    }
                }
                OP_FILL => {
                    if b > super::MAX_BULK_LEN || b & 3 != 0 {
                        return Err(IsaError::BadOperand);
                    }
                    if a & 3 != 0 {
                        return Err(IsaError::Misaligned);
                    }
                    Insn::Fill {
                        va: a,
                        len: b,
                        pattern: imm,
                    }
                }
                OP_COPY => {
                    if c > super::MAX_BULK_LEN {
                        return Err(IsaError::BadOperand);
                    }
                    Insn::Copy {
                        dst: a,
                        src: b,
                        len: c,
                    }
                }
                OP_WAIT => {
                    let cmp = match CompareOp::from_u8(sub) {
                        Some(c) => c,
                        None => return Err(IsaError::BadOperand),
                    };
                    if !size64 && b >> 32 != 0 {
                        return Err(IsaError::ReservedBits);
                    }
                    if !aligned(a, size64) {
                        return Err(IsaError::Misaligned);
                    }
                    Insn::Wait {
                        size64,
                        op: cmp,
                        timeout_us: imm,
                        va: a,
                        value: b,
                    }
                }
                OP_LOOP => {
                    // The operand is a two's-complement i64: reinterpret its bits.
                    let offset = i64::from_le_bytes(a.to_le_bytes());
                    if imm == 0 || offset > 0 || offset & 7 != 0 {
                        return Err(IsaError::BadOperand);
                    }
                    Insn::Loop { count: imm, offset }
                }
                OP_DELAY => Insn::Delay { ns: imm },
                OP_CHECKSUM => {
                    if b > super::MAX_BULK_LEN {
                        return Err(IsaError::BadOperand);
                    }
                    if c & 7 != 0 {
                        return Err(IsaError::Misaligned);
                    }
                    Insn::Checksum {
                        src: a,
                        len: b,
                        dst: c,
                    }
                }
                OP_FENCE => {
                    if a & 7 != 0 {
                        return Err(IsaError::Misaligned);
                    }
                    Insn::Fence {
                        notify: flags & FLAG_NOTIFY != 0,
                        va: a,
                        value: b,
                    }
                }
                _ => return Err(IsaError::BadOpcode),
            };
            Ok(insn)
        }

        /// Encodes into qwords; returns the array and the number of qwords used. Encoding
        /// does not validate (decode does): tests build invalid batches on purpose.
        pub const fn encode(&self) -> ([u64; MAX_INSN_QWORDS], usize) {
            let w = match *self {
                Insn::Nop => [header(OP_NOP, 0, 0, 0), 0, 0, 0],
                Insn::End => [header(OP_END, 0, 0, 0), 0, 0, 0],
                Insn::Store { size64, va, value } => {
                    [header(OP_STORE, sz(size64), 0, 0), va, value, 0]
                }
                Insn::Fill { va, len, pattern } => [header(OP_FILL, 0, 0, pattern), va, len, 0],
                Insn::Copy { dst, src, len } => [header(OP_COPY, 0, 0, 0), dst, src, len],
                Insn::AtomicAdd { size64, va, value } => {
                    [header(OP_ATOMIC_ADD, sz(size64), 0, 0), va, value, 0]
                }
                Insn::Wait {
                    size64,
                    op,
                    timeout_us,
                    va,
                    value,
                } => [
                    header(OP_WAIT, sz(size64), op as u8, timeout_us),
                    va,
                    value,
                    0,
                ],
                Insn::Loop { count, offset } => [header(OP_LOOP, 0, 0, count), offset as u64, 0, 0],
                Insn::Delay { ns } => [header(OP_DELAY, 0, 0, ns), 0, 0, 0],
                Insn::Checksum { src, len, dst } => [header(OP_CHECKSUM, 0, 0, 0), src, len, dst],
                Insn::Fence { notify, va, value } => [
                    header(OP_FENCE, if notify { FLAG_NOTIFY } else { 0 }, 0, 0),
                    va,
                    value,
                    0,
                ],
            };
            (w, self.qwords())
        }

        /// Encodes little-endian bytes into `out`; returns bytes written, `None` if short.
        pub fn encode_bytes(&self, out: &mut [u8]) -> Option<usize> {
            let (w, n) = self.encode();
            let len = n.checked_mul(8)?;
            let dst = out.get_mut(..len)?;
            for (chunk, q) in dst.chunks_exact_mut(8).zip(w.iter()) {
                chunk.copy_from_slice(&q.to_le_bytes());
            }
            Some(len)
        }
    }

    /// FNV-1a 64-bit offset basis (CHECKSUM of zero bytes).
    pub const FNV1A64_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    /// FNV-1a 64-bit prime.
    pub const FNV1A64_PRIME: u64 = 0x0000_0100_0000_01b3;

    /// Continues an FNV-1a-64 hash `h` over `bytes` (start with [`FNV1A64_OFFSET`]).
    pub fn fnv1a64_update(mut h: u64, bytes: &[u8]) -> u64 {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(FNV1A64_PRIME);
        }
        h
    }

    /// FNV-1a-64 of `bytes`: what CHECKSUM stores.
    pub fn fnv1a64(bytes: &[u8]) -> u64 {
        fnv1a64_update(FNV1A64_OFFSET, bytes)
    }
}
