//! The virtio-blk device with a real vCPU: the guest (gmem-vmm's `GuestProgram`, run on a KVM
//! vCPU) writes its buffers and asks for conversions with real exits; the host plays the
//! driver side of the queue ([`crate::blk::Driver`], writing descriptors into guest memory at
//! the guest's sync points) and serves it with [`crate::blk::BlockDevice`]. The guest's
//! conversion requests reach [`GmemMemory::convert`] through
//! `gmem_vmm::Vm::set_conversion_handler`, with an IOMMU tracker listening.

use std::sync::Arc;
use std::time::Duration;

use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{EmulatedGuestMemfd, GuestMemfd};
use gmem_vmm::guest::DATA_GPA;
use gmem_vmm::{Event, GuestProgram, RequestPath, Vm};
use vm_memory::{Bytes, GuestAddress};

use crate::blk::{
    BlockDevice, Driver, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use crate::{private_address, GmemMemory, GmemRegion, IommuTracker};

const PAGE: u64 = 4096;
const RINGS: u64 = DATA_GPA;
const HDR: u64 = DATA_GPA + PAGE;
const STATUS: u64 = DATA_GPA + PAGE + 0x800;
const PAYLOAD: u64 = DATA_GPA + 2 * PAGE;
const BUFFER: u64 = DATA_GPA + 4 * PAGE;

/// What the run showed, step by step.
#[derive(Debug, Default)]
pub struct VcpuDemo {
    /// One line per step.
    pub log: Vec<String>,
    /// The device's counters at the end.
    pub stats: crate::blk::BlkStats,
    /// VM exits handled.
    pub exits: u64,
    /// Conversions the guest asked for (served by the handler).
    pub conversions: u64,
}

/// How the scenario failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuDemoError {
    /// A step's call failed.
    #[error("{step}: {error}")]
    Call {
        /// The step.
        step: &'static str,
        /// The call's error, as it prints.
        error: String,
    },
    /// The guest ran past the scenario's time limit.
    #[error("the guest did not finish in {0:?}")]
    Timeout(Duration),
    /// The device or the guest did not do what the scenario expects.
    #[error("{0}")]
    Unexpected(String),
}

/// The error of `step`'s call.
fn call<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> VcpuDemoError {
    move |e| VcpuDemoError::Call {
        step,
        error: e.to_string(),
    }
}

/// Runs the scenario; `Err` says what went wrong (a missing `/dev/kvm` is the caller's
/// check: [`gmem_vmm::kvm_available`]).
pub fn run() -> Result<VcpuDemo, VcpuDemoError> {
    let mut out = VcpuDemo::default();
    let file: Arc<dyn GuestMemfd> = Arc::new(
        EmulatedGuestMemfd::create(
            16 * PAGE,
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        )
        .map_err(call("create the file"))?,
    );
    let region = GmemRegion::new(file.clone(), 0, 16 * PAGE, GuestAddress(DATA_GPA))
        .map_err(call("make the region"))?;
    let slot = region.memslot(1).map_err(call("describe the memslot"))?;
    out.log.push(format!(
        "memslot: gpa {:#x} size {:#x} flags {} userspace_addr {:#x} (emulated file's guest view)",
        slot.guest_phys_addr, slot.memory_size, slot.flags, slot.userspace_addr
    ));
    let mem: Arc<GmemMemory> =
        Arc::new(GmemMemory::new(vec![region]).map_err(call("build the guest memory"))?);
    let iommu = Arc::new(IommuTracker::new(true));
    iommu
        .map_initial(DATA_GPA, 16 * PAGE, &file, 0)
        .map_err(call("map the IOMMU"))?;
    mem.add_listener(iommu.clone());

    let vm = Vm::new(1).map_err(call("create the VM"))?;
    let backing = gmem_vmm::backing::in_place(file.clone()).map_err(call("wrap the file"))?;
    vm.bind(gmem_vmm::Gpa(DATA_GPA), &backing, 0, 16 * PAGE)
        .map_err(call("bind the memory"))?;
    let handler_mem = Arc::clone(&mem);
    vm.set_conversion_handler(Some(Arc::new(move |req, _fallocate| {
        handler_mem
            .convert(req.gpa.raw(), req.size, req.to_private)
            .map_err(|e| e.errno())
    })));

    let mut p = GuestProgram::new(0, RequestPath::Port);
    p.fill(PAYLOAD, PAGE, 0xab);
    p.sync(1);
    p.convert(BUFFER, PAGE, true, 0);
    p.fill(BUFFER, PAGE, 0xcd);
    p.sync(2);
    p.convert(BUFFER, PAGE, false, 0);
    p.sync(3);
    p.verify(BUFFER, PAGE, 0xab);
    p.done();
    let program = p.finish().map_err(call("assemble the guest program"))?;
    let mut vcpu = vm
        .create_vcpu(0, program)
        .map_err(call("create the vCPU"))?;

    let mut drv = Driver::new(RINGS, 16);
    drv.init(&mem).map_err(call("initialise the queue"))?;
    let mut dev = BlockDevice::new(drv.device_queue(), 64);
    let status = |mem: &GmemMemory| {
        mem.read_obj::<u8>(GuestAddress(STATUS))
            .map_err(call("read the request status"))
    };
    const LIMIT: Duration = Duration::from_secs(20);
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        if std::time::Instant::now() > deadline {
            return Err(VcpuDemoError::Timeout(LIMIT));
        }
        match vcpu.run(&vm).map_err(call("run the vCPU"))? {
            Event::Sync(1) => {
                drv.request(
                    &mem,
                    HDR,
                    VIRTIO_BLK_T_OUT,
                    0,
                    &[(PAYLOAD, PAGE as u32)],
                    STATUS,
                )
                .map_err(call("queue the OUT request"))?;
                dev.process(&mem);
                let s = status(&mem)?;
                out.log.push(format!(
                    "sync 1: guest wrote 0xab into {PAYLOAD:#x}; OUT request from it: status {s}"
                ));
                if s != VIRTIO_BLK_S_OK {
                    return Err(VcpuDemoError::Unexpected(format!(
                        "OUT from shared memory answered status {s}"
                    )));
                }
            }
            Event::Sync(2) => {
                let refused = mem.read_obj::<u8>(GuestAddress(BUFFER));
                let named = refused.as_ref().err().and_then(private_address);
                drv.request(
                    &mem,
                    HDR,
                    VIRTIO_BLK_T_IN,
                    0,
                    &[(BUFFER, PAGE as u32)],
                    STATUS,
                )
                .map_err(call("queue the IN request into private memory"))?;
                dev.process(&mem);
                let s = status(&mem)?;
                out.log.push(format!(
                    "sync 2: guest made {BUFFER:#x} private (IOMMU mapped: {}) and wrote 0xcd; host read refused at {}; IN request into it: status {s} ({})",
                    iommu.is_mapped(BUFFER),
                    named.map_or("-".to_string(), |g| format!("{g:#x}")),
                    dev.last_error().unwrap_or("")
                ));
                if s != VIRTIO_BLK_S_IOERR || named != Some(BUFFER) || iommu.is_mapped(BUFFER) {
                    return Err(VcpuDemoError::Unexpected(
                        "a request into private memory was not refused".into(),
                    ));
                }
            }
            Event::Sync(3) => {
                drv.request(
                    &mem,
                    HDR,
                    VIRTIO_BLK_T_IN,
                    0,
                    &[(BUFFER, PAGE as u32)],
                    STATUS,
                )
                .map_err(call("queue the IN request into shared memory"))?;
                dev.process(&mem);
                let s = status(&mem)?;
                out.log.push(format!(
                    "sync 3: guest made {BUFFER:#x} shared again (IOMMU mapped: {}); IN request into it: status {s}",
                    iommu.is_mapped(BUFFER)
                ));
                if s != VIRTIO_BLK_S_OK {
                    return Err(VcpuDemoError::Unexpected(format!(
                        "IN into shared memory answered status {s}"
                    )));
                }
            }
            Event::Done => {
                out.log
                    .push("done: the guest read back 0xab from the disk into its buffer".into());
                break;
            }
            Event::Fail { id, rdi } => {
                return Err(VcpuDemoError::Unexpected(format!(
                    "guest check {id} failed at {rdi:#x}: {:?}",
                    vcpu.checks().get(id as usize)
                )));
            }
            other => {
                return Err(VcpuDemoError::Unexpected(format!(
                    "unexpected guest event {other:?}"
                )))
            }
        }
    }
    let st = vm.stats();
    out.exits = st.exits;
    out.conversions = st.conversions_to_private + st.conversions_to_shared;
    out.stats = dev.stats();
    Ok(out)
}
