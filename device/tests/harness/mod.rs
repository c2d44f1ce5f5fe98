// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A guest model for host-side tests: it plays QEMU and the guest driver against an
//! `svmgpu-device` backend over a real vhost-user socket, with memfd-backed guest RAM, split
//! virtqueues, kick/call eventfds and the control protocol of spec/svmgpu.md.
//!
//! Pieces, each usable alone:
//! - [`GuestRam`]: shared guest memory and a bump allocator;
//! - [`VirtQueue`]: the driver side of one split ring;
//! - [`TestFrontend`]: the vhost-user handshake, queue set-up and control requests;
//! - [`InProcessBackend`] / [`DaemonProcess`]: a backend to talk to, in this process or as a
//!   child process of the real binary.
//!
//! - [`driver::Driver`]: a tiny guest driver (page tables, batches, every command, event and
//!   completion consumers).
//!
//! Include with `#[allow(dead_code)] mod harness;` from a test file.

pub mod driver;
pub mod rig;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rustix::fs::{memfd_create, MemfdFlags};
use svmgpu_device::config::DeviceOptions;
use svmgpu_device::daemon::DeviceServer;
use svmgpu_device::gpu::Gpu;
use svmgpu_spec::{CtrlHeader, RespHeader, NUM_QUEUES, QUEUE_CONTROL};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// How long a test waits for anything before failing.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << 32;
/// `VRING_DESC_F_NEXT`.
const DESC_F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
const DESC_F_WRITE: u16 = 2;

/// Guest RAM: one memfd-backed region shared with the backend, with a bump allocator.
pub struct GuestRam {
    mem: GuestMemoryMmap<()>,
    file: File,
    base: u64,
    size: u64,
    next: u64,
}

impl GuestRam {
    /// `size` bytes of RAM at guest-physical `base`. Allocation starts 64 KiB in, so that no
    /// ring ever sits at address 0.
    pub fn new(base: u64, size: u64) -> Self {
        let fd = memfd_create("svmgpu-guest-ram", MemfdFlags::CLOEXEC).expect("memfd_create");
        let file = File::from(fd);
        file.set_len(size).expect("memfd set_len");
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(base),
            size as usize,
            Some(FileOffset::new(file.try_clone().expect("dup memfd"), 0)),
        )])
        .expect("map guest RAM");
        Self {
            mem,
            file,
            base,
            size,
            next: base + 0x1_0000,
        }
    }

    /// First guest-physical address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// One past the last guest-physical address.
    pub fn end(&self) -> u64 {
        self.base + self.size
    }

    /// Allocates `size` bytes aligned to `align` (a power of two), zeroed.
    pub fn alloc(&mut self, size: u64, align: u64) -> u64 {
        let addr = (self.next + align - 1) & !(align - 1);
        assert!(addr + size <= self.end(), "guest RAM exhausted");
        self.next = addr + size;
        self.write(addr, &vec![0u8; size as usize]);
        addr
    }

    /// Writes bytes.
    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(gpa))
            .expect("guest write");
    }

    /// Reads bytes.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(gpa))
            .expect("guest read");
        v
    }

    /// Atomic little-endian u16 store with release ordering (ring indices).
    pub fn store_u16(&self, gpa: u64, v: u16) {
        self.mem
            .store(v, GuestAddress(gpa), Ordering::Release)
            .expect("guest store");
    }

    /// Atomic u16 load with acquire ordering.
    pub fn load_u16(&self, gpa: u64) -> u16 {
        self.mem
            .load(GuestAddress(gpa), Ordering::Acquire)
            .expect("guest load")
    }

    /// This process's virtual address of `gpa` (what vhost-user calls the frontend address).
    pub fn host_addr(&self, gpa: u64) -> u64 {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .expect("host address") as u64
    }

    /// The region for SET_MEM_TABLE.
    pub fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.base,
            memory_size: self.size,
            userspace_addr: self.host_addr(self.base),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }
}

/// A buffer of a descriptor chain.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest-physical address.
    pub gpa: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

impl Buf {
    /// Device-readable.
    pub fn r(gpa: u64, len: u32) -> Self {
        Self {
            gpa,
            len,
            writable: false,
        }
    }

    /// Device-writable.
    pub fn w(gpa: u64, len: u32) -> Self {
        Self {
            gpa,
            len,
            writable: true,
        }
    }
}

/// A used-ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index.
    pub id: u16,
    /// Bytes written by the device.
    pub len: u32,
}

/// The driver side of one split virtqueue.
pub struct VirtQueue {
    /// Queue index.
    pub index: usize,
    /// Queue size.
    pub size: u16,
    /// Descriptor table GPA.
    pub desc: u64,
    /// Available ring GPA.
    pub avail: u64,
    /// Used ring GPA.
    pub used: u64,
    /// Kick eventfd (driver → device).
    pub kick: EventFd,
    /// Call eventfd (device → driver).
    pub call: EventFd,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
}

impl VirtQueue {
    /// Allocates the rings in guest RAM.
    pub fn new(ram: &mut GuestRam, index: usize, size: u16) -> Self {
        assert!(size.is_power_of_two());
        let n = u64::from(size);
        let desc = ram.alloc(16 * n, 4096);
        let avail = ram.alloc(6 + 2 * n, 4096);
        let used = ram.alloc(6 + 8 * n, 4096);
        Self {
            index,
            size,
            desc,
            avail,
            used,
            kick: EventFd::new(0).expect("eventfd"),
            call: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// Descriptors not in use.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Makes a chain available (does not kick). Returns its head.
    pub fn add_chain(&mut self, ram: &GuestRam, bufs: &[Buf]) -> u16 {
        assert!(
            !bufs.is_empty() && bufs.len() <= self.free.len(),
            "no descriptors"
        );
        let ids: Vec<u16> = (0..bufs.len())
            .map(|_| self.free.pop().expect("descriptor"))
            .collect();
        for (i, (b, &id)) in bufs.iter().zip(&ids).enumerate() {
            let mut flags = if b.writable { DESC_F_WRITE } else { 0 };
            let next = if i + 1 < ids.len() {
                flags |= DESC_F_NEXT;
                ids[i + 1]
            } else {
                0
            };
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&b.gpa.to_le_bytes());
            d[8..12].copy_from_slice(&b.len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            ram.write(self.desc + 16 * u64::from(id), &d);
        }
        let head = ids[0];
        let slot = u64::from(self.avail_idx % self.size);
        ram.write(self.avail + 4 + 2 * slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        ram.store_u16(self.avail + 2, self.avail_idx);
        self.chains.insert(head, ids);
        head
    }

    /// Notifies the device.
    pub fn kick(&self) {
        self.kick.write(1).expect("kick");
    }

    /// The next used element, if any; frees its descriptors.
    pub fn poll_used(&mut self, ram: &GuestRam) -> Option<Used> {
        let idx = ram.load_u16(self.used + 2);
        if idx == self.last_used {
            return None;
        }
        let slot = u64::from(self.last_used % self.size);
        let e = ram.read(self.used + 4 + 8 * slot, 8);
        self.last_used = self.last_used.wrapping_add(1);
        let id = u32::from_le_bytes(e[0..4].try_into().unwrap());
        let len = u32::from_le_bytes(e[4..8].try_into().unwrap());
        let id = u16::try_from(id).expect("used id fits u16");
        let ids = self
            .chains
            .remove(&id)
            .expect("used id is an outstanding head");
        self.free.extend(ids);
        Some(Used { id, len })
    }

    /// Waits (polling the used index) for the next used element; panics after [`TIMEOUT`].
    pub fn wait_used(&mut self, ram: &GuestRam) -> Used {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(u) = self.poll_used(ram) {
                // Drain the call eventfd; it is non-blocking.
                let _ = self.call.read();
                return u;
            }
            assert!(
                Instant::now() < deadline,
                "queue {}: no used buffer within {TIMEOUT:?}",
                self.index
            );
            thread::sleep(Duration::from_micros(20));
        }
    }
}

/// A vhost-user frontend plus guest RAM and queues: the test's QEMU and driver.
pub struct TestFrontend {
    /// The vhost-user connection.
    pub frontend: Frontend,
    /// Guest RAM.
    pub ram: GuestRam,
    /// Queues, once started.
    pub queues: Vec<VirtQueue>,
    /// Features offered by the backend.
    pub offered_features: u64,
    /// Protocol features offered by the backend.
    pub offered_protocol_features: VhostUserProtocolFeatures,
    /// Virtio features accepted.
    pub acked_features: u64,
    scratch: u64,
    next_seqno: u64,
}

/// Scratch space for control requests and responses.
const SCRATCH_SIZE: u64 = 0x1_0000;
/// Offset of the response area in the scratch space.
const SCRATCH_RESP: u64 = 0x8000;

impl TestFrontend {
    /// Connects and negotiates features like QEMU's vhost-user-device: VERSION_1 and
    /// PROTOCOL_FEATURES, then CONFIG and MQ. Guest RAM is `ram_size` bytes at GPA 0.
    pub fn connect(path: &Path, ram_size: u64) -> Self {
        Self::connect_with(path, ram_size, 0)
    }

    /// As [`TestFrontend::connect`], also accepting the device feature bits `device_features`.
    pub fn connect_with(path: &Path, ram_size: u64, device_features: u64) -> Self {
        let mut frontend =
            Frontend::connect(path, u64::from(NUM_QUEUES)).expect("connect to the backend");
        frontend.set_owner().expect("SET_OWNER");
        let offered_features = frontend.get_features().expect("GET_FEATURES");
        let wanted =
            F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | device_features;
        assert_eq!(offered_features & wanted, wanted, "backend features");
        frontend.set_features(wanted).expect("SET_FEATURES");
        let offered_protocol_features = frontend
            .get_protocol_features()
            .expect("GET_PROTOCOL_FEATURES");
        let pf = offered_protocol_features
            & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ);
        frontend
            .set_protocol_features(pf)
            .expect("SET_PROTOCOL_FEATURES");
        let mut ram = GuestRam::new(0, ram_size);
        let scratch = ram.alloc(SCRATCH_SIZE, 4096);
        Self {
            frontend,
            ram,
            queues: Vec::new(),
            offered_features,
            offered_protocol_features,
            acked_features: wanted,
            scratch,
            next_seqno: 1,
        }
    }

    /// GET_QUEUE_NUM.
    pub fn queue_num(&mut self) -> u64 {
        self.frontend.get_queue_num().expect("GET_QUEUE_NUM")
    }

    /// GET_CONFIG of `size` bytes at `offset`.
    pub fn get_config(&mut self, offset: u32, size: u32) -> Vec<u8> {
        let buf = vec![0u8; size as usize];
        let (_, data) = self
            .frontend
            .get_config(offset, size, VhostUserConfigFlags::WRITABLE, &buf)
            .expect("GET_CONFIG");
        data
    }

    /// SET_CONFIG (a guest config write).
    pub fn set_config(&mut self, offset: u32, data: &[u8]) {
        self.frontend
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
            .expect("SET_CONFIG");
    }

    /// SET_MEM_TABLE and all three rings of `queue_size`, enabled.
    pub fn start(&mut self, queue_size: u16) {
        self.frontend
            .set_mem_table(&[self.ram.region()])
            .expect("SET_MEM_TABLE");
        for i in 0..usize::from(NUM_QUEUES) {
            let q = VirtQueue::new(&mut self.ram, i, queue_size);
            self.frontend
                .set_vring_num(i, queue_size)
                .expect("SET_VRING_NUM");
            self.frontend.set_vring_base(i, 0).expect("SET_VRING_BASE");
            let cfg = VringConfigData {
                queue_max_size: queue_size,
                queue_size,
                flags: 0,
                desc_table_addr: self.ram.host_addr(q.desc),
                used_ring_addr: self.ram.host_addr(q.used),
                avail_ring_addr: self.ram.host_addr(q.avail),
                log_addr: None,
            };
            self.frontend
                .set_vring_addr(i, &cfg)
                .expect("SET_VRING_ADDR");
            self.frontend
                .set_vring_kick(i, &q.kick)
                .expect("SET_VRING_KICK");
            self.frontend
                .set_vring_call(i, &q.call)
                .expect("SET_VRING_CALL");
            self.frontend
                .set_vring_enable(i, true)
                .expect("SET_VRING_ENABLE");
            self.queues.push(q);
        }
    }

    /// Stops the rings as QEMU does when the VM stops (or before a virtio reset):
    /// SET_VRING_ENABLE 0 then GET_VRING_BASE on each; returns where each stopped.
    pub fn stop_rings(&mut self) -> Vec<u32> {
        for i in 0..self.queues.len() {
            self.frontend
                .set_vring_enable(i, false)
                .expect("SET_VRING_ENABLE");
        }
        (0..self.queues.len())
            .map(|i| self.frontend.get_vring_base(i).expect("GET_VRING_BASE"))
            .collect()
    }

    /// Stops ring `i` alone (SET_VRING_ENABLE 0, GET_VRING_BASE); returns where it stopped.
    pub fn stop_ring(&mut self, i: usize) -> u32 {
        self.frontend
            .set_vring_enable(i, false)
            .expect("SET_VRING_ENABLE");
        self.frontend.get_vring_base(i).expect("GET_VRING_BASE")
    }

    /// Starts the rings again as QEMU does when the VM continues: SET_MEM_TABLE, then each
    /// ring at `bases` with the same addresses, a kick eventfd that is already signalled
    /// (QEMU creates it so), and SET_VRING_ENABLE 1.
    pub fn restart_rings(&mut self, bases: &[u32]) {
        self.frontend
            .set_features(self.acked_features)
            .expect("SET_FEATURES");
        self.frontend
            .set_mem_table(&[self.ram.region()])
            .expect("SET_MEM_TABLE");
        for (i, &base) in bases.iter().enumerate() {
            let (size, desc, used, avail) = {
                let q = &self.queues[i];
                (q.size, q.desc, q.used, q.avail)
            };
            self.frontend.set_vring_num(i, size).expect("SET_VRING_NUM");
            self.frontend
                .set_vring_base(i, u16::try_from(base).expect("base"))
                .expect("SET_VRING_BASE");
            let cfg = VringConfigData {
                queue_max_size: size,
                queue_size: size,
                flags: 0,
                desc_table_addr: self.ram.host_addr(desc),
                used_ring_addr: self.ram.host_addr(used),
                avail_ring_addr: self.ram.host_addr(avail),
                log_addr: None,
            };
            self.frontend
                .set_vring_addr(i, &cfg)
                .expect("SET_VRING_ADDR");
            self.queues[i].kick();
            self.frontend
                .set_vring_kick(i, &self.queues[i].kick)
                .expect("SET_VRING_KICK");
            self.frontend
                .set_vring_call(i, &self.queues[i].call)
                .expect("SET_VRING_CALL");
            self.frontend
                .set_vring_enable(i, true)
                .expect("SET_VRING_ENABLE");
        }
    }

    /// Starts fresh rings (new addresses, index 0), as a driver that reset the device and
    /// initialised it again; kicks each (QEMU's new kick eventfds start signalled).
    pub fn restart_fresh(&mut self, queue_size: u16) {
        self.frontend
            .set_features(self.acked_features)
            .expect("SET_FEATURES");
        self.queues.clear();
        self.start(queue_size);
        for q in &self.queues {
            q.kick();
        }
    }

    /// RESET_DEVICE (the backend must offer, and the frontend have accepted, the protocol
    /// feature).
    pub fn reset_device(&mut self) {
        self.frontend.reset_device().expect("RESET_DEVICE");
    }

    /// Accepts the RESET_DEVICE protocol feature too (before `start`).
    pub fn accept_reset_device(&mut self) {
        let pf = self.offered_protocol_features
            & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::RESET_DEVICE);
        self.frontend
            .set_protocol_features(pf)
            .expect("SET_PROTOCOL_FEATURES");
    }

    /// Posts a chain on queue `q`, kicks, and waits for it to be used.
    pub fn round_trip(&mut self, q: usize, bufs: &[Buf]) -> Used {
        let head = self.queues[q].add_chain(&self.ram, bufs);
        self.queues[q].kick();
        let used = self.queues[q].wait_used(&self.ram);
        assert_eq!(used.id, head, "in-order completion on a synchronous queue");
        used
    }

    /// A fresh seqno.
    pub fn seqno(&mut self) -> u64 {
        let s = self.next_seqno;
        self.next_seqno += 1;
        s
    }

    /// Sends raw request bytes on the controlq with a `resp_cap`-byte response buffer;
    /// returns the bytes the device wrote.
    pub fn control_bytes(&mut self, request: &[u8], resp_cap: u32) -> Vec<u8> {
        assert!(request.len() as u64 <= SCRATCH_RESP);
        assert!(u64::from(resp_cap) <= SCRATCH_SIZE - SCRATCH_RESP);
        let req = self.scratch;
        let resp = self.scratch + SCRATCH_RESP;
        self.ram.write(req, request);
        self.ram.write(resp, &vec![0xee; resp_cap as usize]);
        let mut bufs = Vec::new();
        if !request.is_empty() {
            bufs.push(Buf::r(req, request.len() as u32));
        }
        bufs.push(Buf::w(resp, resp_cap));
        let used = self.round_trip(usize::from(QUEUE_CONTROL), &bufs);
        self.ram.read(resp, used.len as usize)
    }

    /// Sends a request (header with a fresh seqno + body). Returns the response header,
    /// the response body and the seqno used.
    pub fn control(
        &mut self,
        opcode: u32,
        body: &[u8],
        resp_body_cap: u32,
    ) -> (RespHeader, Vec<u8>, u64) {
        let seqno = self.seqno();
        let mut req = CtrlHeader {
            opcode,
            flags: 0,
            seqno,
        }
        .to_bytes()
        .to_vec();
        req.extend_from_slice(body);
        let resp = self.control_bytes(&req, RespHeader::SIZE as u32 + resp_body_cap);
        let hdr = RespHeader::decode(&resp).expect("response header");
        (hdr, resp[RespHeader::SIZE..].to_vec(), seqno)
    }
}

/// A backend served by a thread of this process on a socket in a temporary directory.
pub struct InProcessBackend {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// Socket path.
    pub path: PathBuf,
    /// The device, to inspect its state.
    pub gpu: Arc<Gpu>,
}

impl InProcessBackend {
    /// Binds device `index` with `options` and serves it (connection after connection) on a
    /// background thread. The socket is listening when this returns.
    pub fn start(index: u32, options: &DeviceOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(format!("svmgpu.sock{index}"));
        let server = DeviceServer::bind(&path, index, options).expect("bind");
        let gpu = server.gpu();
        thread::Builder::new()
            .name(format!("test-svmgpu{index}"))
            .spawn(move || {
                if let Err(e) = server.run() {
                    panic!("backend failed: {e}");
                }
            })
            .expect("spawn backend");
        Self { dir, path, gpu }
    }
}

/// The real `svmgpu-device` binary as a child process.
pub struct DaemonProcess {
    /// The child.
    pub child: Child,
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// The socket prefix given with `--socket-path`.
    pub prefix: PathBuf,
}

impl DaemonProcess {
    /// Starts `svmgpu-device --socket-path <tmp>/svmgpu.sock <args...>`.
    pub fn spawn(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = dir.path().join("svmgpu.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_svmgpu-device"))
            .arg("--socket-path")
            .arg(&prefix)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn svmgpu-device");
        Self { child, dir, prefix }
    }

    /// Socket of device `index`.
    pub fn socket(&self, index: u32) -> PathBuf {
        svmgpu_device::daemon::socket_path(&self.prefix, index)
    }

    /// Waits until the sockets of devices `0..count` exist.
    pub fn wait_for_sockets(&mut self, count: u32) {
        let deadline = Instant::now() + TIMEOUT;
        while !(0..count).all(|i| self.socket(i).exists()) {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                panic!("svmgpu-device exited early: {st}");
            }
            assert!(Instant::now() < deadline, "sockets did not appear");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal with kill(1).
    pub fn signal(&self, name: &str) {
        let st = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit; panics after [`TIMEOUT`].
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "svmgpu-device did not exit");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        // Only our own child, by its id.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Installs a panic hook (chained to the previous one) that notes a panic of any device
/// thread (named `svmgpu*`) and returns the flag; a device must never panic on guest input.
pub fn watch_device_panics() -> &'static std::sync::atomic::AtomicBool {
    use std::sync::atomic::{AtomicBool, Ordering};
    static PANICKED: AtomicBool = AtomicBool::new(false);
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if thread::current()
            .name()
            .is_some_and(|n| n.starts_with("svmgpu"))
        {
            PANICKED.store(true, Ordering::SeqCst);
        }
        prev(info);
    }));
    &PANICKED
}
