//! Real KVM guests on gmem memory.
//!
//! A [`Vm`] owns a KVM VM (type 0, `KVM_X86_DEFAULT_VM`) and binds guest_memfd file ranges at
//! guest physical addresses:
//!
//! - emulated backend: an ordinary memslot (`KVM_SET_USER_MEMORY_REGION`) over the file's guest
//!   view, a full `MAP_SHARED` mapping of the memfd in which private pages stay accessible;
//! - kernel backend: `KVM_SET_USER_MEMORY_REGION2` with `KVM_MEM_GUEST_MEMFD`, the guest_memfd
//!   and its offset, and `userspace_addr` equal to the file's own mapping (host.md: emulated
//!   accesses go through `userspace_addr`, so it must be that mapping);
//! - the two-backing layout ([`two_backing::TwoBacking`], for comparison): an ordinary memslot over
//!   its composite view, in which each page maps the private store or the shared memfd as its
//!   attribute selects.
//!
//! Guest memory below 4 GiB is the VM's *system* memory (page tables, mailboxes, code), an
//! anonymous mapping bound at GPA 0. gmem memory starts at [`guest::DATA_GPA`] (4 GiB), as in the
//! kernel selftests.
//!
//! Conversion requests reach the VMM three ways and all become one [`ConvertRequest`]:
//! `KVM_EXIT_HYPERCALL` for `KVM_HC_MAP_GPA_RANGE`, `KVM_EXIT_MEMORY_FAULT` (converted to the
//! faulting access's type, the QEMU / Cloud Hypervisor policy), and the port-I/O request of
//! [`guest::PORT_MAP_GPA_RANGE`] (same arguments, in the vCPU's mailbox). On this machine's PVM
//! the hypercall never reaches userspace (see [`Vm::probe_hypercall_exit`]), so the port is the
//! path the workload uses; the hypercall path is kept and unit-tested on synthetic exits.
//!
//! # Privilege levels
//!
//! vCPUs start in long mode at CPL3 (flat CS/SS with DPL 3 set directly in `KVM_SET_SREGS`,
//! no GDT, identity page tables with the U bit, RFLAGS.IOPL = 3 so that `out` is allowed):
//! under PVM only CPL3 code runs natively. Nothing runs at CPL0 except the hypercall path's
//! `vmcall`: the guest writes [`guest::PORT_ENTER_CPL0`] and the VMM rewrites CS/SS to ring 0
//! between two `KVM_RUN`s, then [`guest::PORT_ENTER_CPL3`] switches back. KVM refuses
//! hypercalls from CPL > 0, hence the detour.
//!
//! # What this host does (PVM, measured)
//!
//! - `vmcall` at CPL3 raises #UD (`KVM_EXIT_SHUTDOWN` without an IDT).
//! - `vmcall` (or `vmmcall`, which gets rewritten to `vmcall`) at CPL0 never leaves the kernel:
//!   CPL0 code is run by KVM's instruction emulator, which treats the instruction as a
//!   hypercall instruction to patch and re-execute. The vCPU spins until kicked by a signal.
//!   So `KVM_EXIT_HYPERCALL` is never seen, although `KVM_CAP_EXIT_HYPERCALL` is enabled.
//! - Round trips (release build, medians): bare `out` exit from CPL3 ≈ 18.5 µs; exit →
//!   4 KiB conversion → re-enter ≈ 24.5 µs, with the conversion call itself ≈ 5 µs right after
//!   an exit (≈ 1.4 µs in a hot host loop); the CPL0 detour alone (two exits and two
//!   `KVM_SET_SREGS`) ≈ 30 µs, so even where the hypercall works the port request is cheaper.

pub mod asm;
pub mod backing;
pub mod guest;
pub mod port;
pub mod stats;
pub mod two_backing;
mod vcpu;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, kvm_userspace_memory_region2};
use kvm_ioctls::{Kvm, VmFd};

use crate::backing::{AttributeRun, GuestBacking};
use gmem::error::{Errno, KernelResult};
use gmem::file::{MemslotSource, PinGuard};
use gmem::kernel::KernelBackend;
use gmem::os::{Mmap, PAGE_SIZE};
use gmem::uapi::{
    kvm_memory_attributes2, KVM_CAP_EXIT_HYPERCALL, KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MAP_GPA_RANGE_PAGE_SZ_1G, KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
    KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE, KVM_MEM_GUEST_MEMFD,
};

pub use asm::{Asm, AsmError, Cond, Label, Reg};
pub use guest::{GuestProgram, Program, RequestPath};
pub use vcpu::{Event, Stop, Vcpu, VcpuTimings};

/// `KVM_MAP_GPA_RANGE_PAGE_SZ_*` mask (bits 0-1).
const MAP_GPA_RANGE_PAGE_SZ_MASK: u64 = KVM_MAP_GPA_RANGE_PAGE_SZ_2M | KVM_MAP_GPA_RANGE_PAGE_SZ_1G;

/// Mailbox `flags` bit: punch a hole when converting to shared, allocate when converting to
/// private (the PMCT host handler's fallocate request).
pub const REQUEST_FLAG_FALLOCATE: u64 = 1 << 0;
/// Mailbox `flags` bit: a timed request (its round trip is sampled).
pub const REQUEST_FLAG_TIMED: u64 = 1 << 1;

/// One shared↔private conversion of guest physical memory, whatever asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvertRequest {
    /// First guest physical address (page-aligned).
    pub gpa: u64,
    /// Length in bytes (a non-zero multiple of the page size).
    pub size: u64,
    /// Private (true) or shared (false).
    pub to_private: bool,
}

impl ConvertRequest {
    /// Decodes `KVM_HC_MAP_GPA_RANGE(gpa, npages, attrs)` (kernel-spec §1.5): `npages` counts
    /// 4 KiB pages, attrs bit 4 is ENCRYPTED (private), bits 0-1 the page size hint. EINVAL for
    /// an unaligned gpa, zero or overflowing pages, or unknown attribute bits.
    pub fn from_map_gpa_range(gpa: u64, npages: u64, attrs: u64) -> KernelResult<Self> {
        if attrs & !(KVM_MAP_GPA_RANGE_ENCRYPTED | MAP_GPA_RANGE_PAGE_SZ_MASK) != 0
            || attrs & MAP_GPA_RANGE_PAGE_SZ_MASK == MAP_GPA_RANGE_PAGE_SZ_MASK
        {
            return Err(Errno::EINVAL);
        }
        if gpa % PAGE_SIZE != 0 || npages == 0 {
            return Err(Errno::EINVAL);
        }
        let size = npages.checked_mul(PAGE_SIZE).ok_or(Errno::EINVAL)?;
        gpa.checked_add(size).ok_or(Errno::EINVAL)?;
        Ok(ConvertRequest {
            gpa,
            size,
            to_private: attrs & KVM_MAP_GPA_RANGE_ENCRYPTED != 0,
        })
    }

    /// Decodes `KVM_EXIT_MEMORY_FAULT(flags, gpa, size)`: convert to the faulting access's
    /// type. EINVAL for unknown flag bits (as QEMU and Cloud Hypervisor treat them).
    pub fn from_memory_fault(flags: u64, gpa: u64, size: u64) -> KernelResult<Self> {
        if flags & !KVM_MEMORY_EXIT_FLAG_PRIVATE != 0 {
            return Err(Errno::EINVAL);
        }
        let gpa_aligned = gpa & !(PAGE_SIZE - 1);
        let end = gpa
            .checked_add(size.max(1))
            .ok_or(Errno::EINVAL)?
            .div_ceil(PAGE_SIZE)
            * PAGE_SIZE;
        Ok(ConvertRequest {
            gpa: gpa_aligned,
            size: end - gpa_aligned,
            to_private: flags & KVM_MEMORY_EXIT_FLAG_PRIVATE != 0,
        })
    }
}

/// The hypercall return value for a result: 0, or the negative errno.
pub fn hypercall_ret(r: KernelResult<()>) -> u64 {
    match r {
        Ok(()) => 0,
        Err(e) => (-i64::from(e.raw())) as u64,
    }
}

/// Errors of the VM layer (gmem-only API).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM or host call failed.
    #[error("{op} failed: {errno}")]
    Kvm {
        /// What was attempted.
        op: &'static str,
        /// The kernel's answer.
        errno: Errno,
    },
    /// The vCPU count is outside what the guest layout supports.
    #[error("vcpus = {vcpus}: the guest layout supports 1..={max} vCPUs")]
    Vcpus {
        /// Requested.
        vcpus: usize,
        /// Maximum.
        max: usize,
    },
    /// A binding is not page-aligned, empty, past the file, or overlaps another binding.
    #[error(
        "cannot bind [{gpa:#x}, +{size:#x}) at file offset {offset:#x}: {why} \
         (bindings must be page-aligned, non-empty, inside the file and the data window, \
         and must not overlap)"
    )]
    Binding {
        /// Guest physical address.
        gpa: u64,
        /// Size.
        size: u64,
        /// File offset.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// The program does not fit in its code area.
    #[error("guest program of {len} bytes exceeds its code area of {max} bytes")]
    ProgramTooLarge {
        /// Program length.
        len: usize,
        /// Room.
        max: usize,
    },
    /// Guest code could not be assembled.
    #[error(transparent)]
    Asm(#[from] AsmError),
    /// The vCPU stopped in a way the VMM does not handle.
    #[error("vCPU {vcpu}: {what}")]
    UnexpectedExit {
        /// vCPU index.
        vcpu: usize,
        /// The exit and state, rendered.
        what: String,
    },
    /// A vCPU did not reach its next exit in time.
    #[error("vCPU {vcpu} did not exit within {timeout:?}")]
    Timeout {
        /// vCPU index.
        vcpu: usize,
        /// The limit.
        timeout: Duration,
    },
    /// A file of the wrong backend or VM.
    #[error("{0}")]
    WrongFile(String),
}

impl VmError {
    fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
        move |e| VmError::Kvm {
            op,
            errno: Errno(e.errno()),
        }
    }
}

/// A piece of a guest physical range inside one memslot: `(memory, offset in it, gpa, len)`.
type Segment = (Arc<dyn GuestBacking>, u64, u64, u64);

/// One binding of a file range at a guest physical address.
#[derive(Debug, Clone)]
pub struct Memslot {
    /// KVM slot number.
    pub slot: u32,
    /// First guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// The memory bound.
    pub backing: Arc<dyn GuestBacking>,
    /// Offset in the file of `gpa`.
    pub offset: u64,
}

/// Counters of a VM's exits and conversions (all vCPUs).
#[derive(Debug, Default)]
struct Counters {
    exits: AtomicU64,
    to_private: AtomicU64,
    to_shared: AtomicU64,
    pages_converted: AtomicU64,
    rejected: AtomicU64,
    eagain_retries: AtomicU64,
    pins_dropped: AtomicU64,
    punches: AtomicU64,
}

/// A snapshot of a VM's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmStats {
    /// vCPU exits handled.
    pub exits: u64,
    /// Successful conversions to private (requests, not segments).
    pub conversions_to_private: u64,
    /// Successful conversions to shared.
    pub conversions_to_shared: u64,
    /// Pages whose attributes a successful request covered.
    pub pages_converted: u64,
    /// Requests answered with an error.
    pub requests_rejected: u64,
    /// Conversions retried after EAGAIN.
    pub eagain_retries: u64,
    /// VMM pins dropped to let a conversion through.
    pub pins_dropped: u64,
    /// Punch-hole requests served.
    pub punches: u64,
}

struct VmmPin {
    gpa: u64,
    len: u64,
    _guard: PinGuard,
}

enum VmHandle {
    Own { _kvm: Kvm, vm: VmFd },
    Kernel(KernelBackend),
}

impl VmHandle {
    fn fd(&self) -> &VmFd {
        match self {
            VmHandle::Own { vm, .. } => vm,
            VmHandle::Kernel(b) => b.vm_fd(),
        }
    }
}

/// A KVM VM whose data memory is gmem files.
pub struct Vm {
    handle: VmHandle,
    system: Mmap,
    vcpus: usize,
    slots: RwLock<Vec<Memslot>>,
    pins: Mutex<Vec<VmmPin>>,
    counters: Counters,
    hypercall_exit: Result<(), Errno>,
    stop: std::sync::atomic::AtomicBool,
    timeout_ms: AtomicU64,
    memory_fault_conversion: std::sync::atomic::AtomicBool,
    vcpu_id_base: u64,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.vcpus)
            .field("system_size", &self.system.len())
            .field("slots", &self.slots.read().map(|s| s.len()).unwrap_or(0))
            .finish()
    }
}

/// Whether `/dev/kvm` can be opened; `Err` says why not (for `skipped: <reason>`).
pub fn kvm_available() -> Result<(), String> {
    match Kvm::new() {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("/dev/kvm cannot be opened ({})", Errno(e.errno()))),
    }
}

impl Vm {
    /// A VM of type 0 on `/dev/kvm` for `vcpus` vCPUs, with its system memory bound at GPA 0.
    /// Files of the emulated backend bind to it.
    pub fn new(vcpus: usize) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::kvm("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(VmError::kvm("KVM_CREATE_VM(0)"))?;
        Self::with_handle(VmHandle::Own { _kvm: kvm, vm }, vcpus)
    }

    /// A VM on the kernel backend's VM, so that its guest_memfd files can be bound.
    pub fn on_kernel_backend(backend: &KernelBackend, vcpus: usize) -> Result<Vm, VmError> {
        Self::with_handle(VmHandle::Kernel(backend.clone()), vcpus)
    }

    fn with_handle(handle: VmHandle, vcpus: usize) -> Result<Vm, VmError> {
        if vcpus == 0 || vcpus > guest::MAX_VCPUS {
            return Err(VmError::Vcpus {
                vcpus,
                max: guest::MAX_VCPUS,
            });
        }
        let size = guest::system_size(vcpus);
        let system = Mmap::new(
            None,
            0,
            usize::try_from(size).map_err(|_| VmError::Vcpus {
                vcpus,
                max: guest::MAX_VCPUS,
            })?,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        )
        .map_err(|errno| VmError::Kvm {
            op: "mmap of system memory",
            errno,
        })?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: system.as_ptr() as u64,
        };
        // SAFETY: the region is `system`, owned by the Vm, which deletes its slots before the
        // mapping is dropped (Drop below; fields drop after `drop` runs).
        unsafe { handle.fd().set_user_memory_region(region) }
            .map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION (system memory)"))?;
        let cap = kvm_enable_cap {
            cap: KVM_CAP_EXIT_HYPERCALL,
            args: [1 << KVM_HC_MAP_GPA_RANGE, 0, 0, 0],
            ..Default::default()
        };
        let hypercall_exit = handle.fd().enable_cap(&cap).map_err(|e| Errno(e.errno()));
        // KVM cannot destroy a vCPU before its VM, and the kernel backend's VM outlives this
        // Vm: give each Vm on it fresh vCPU ids.
        let vcpu_id_base = match handle {
            VmHandle::Own { .. } => 0,
            VmHandle::Kernel(_) => {
                static NEXT: AtomicU64 = AtomicU64::new(0);
                NEXT.fetch_add(vcpus as u64, Ordering::Relaxed)
            }
        };
        let vm = Vm {
            handle,
            system,
            vcpus,
            slots: RwLock::new(Vec::new()),
            pins: Mutex::new(Vec::new()),
            counters: Counters::default(),
            hypercall_exit,
            stop: std::sync::atomic::AtomicBool::new(false),
            timeout_ms: AtomicU64::new(0),
            memory_fault_conversion: std::sync::atomic::AtomicBool::new(true),
            vcpu_id_base,
        };
        guest::write_page_tables(&vm)?;
        Ok(vm)
    }

    /// Whether `KVM_CAP_EXIT_HYPERCALL` with `1 << KVM_HC_MAP_GPA_RANGE` was enabled.
    pub fn hypercall_exit_enabled(&self) -> Result<(), Errno> {
        self.hypercall_exit
    }

    /// The number of vCPUs the VM was laid out for.
    pub fn vcpus(&self) -> usize {
        self.vcpus
    }

    /// The KVM vCPU id of vCPU `index`.
    pub(crate) fn vcpu_id(&self, index: usize) -> u64 {
        self.vcpu_id_base + index as u64
    }

    pub(crate) fn vm_fd(&self) -> &VmFd {
        self.handle.fd()
    }

    /// Writes `data` into system memory at guest physical `gpa`.
    pub(crate) fn write_system(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        let off = self.system_range(gpa, data.len())?;
        // The range is inside the system mapping (checked); the guest may run, so volatile
        // byte copies are used.
        self.system
            .write_volatile(off, data)
            .map_err(|e| VmError::Binding {
                gpa,
                size: data.len() as u64,
                offset: 0,
                why: e.to_string(),
            })?;
        Ok(())
    }

    /// Reads system memory at guest physical `gpa` into `buf`.
    pub(crate) fn read_system(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        let off = self.system_range(gpa, buf.len())?;
        // The range is inside the system mapping (checked); volatile because the guest
        // writes it.
        self.system
            .read_volatile(off, buf)
            .map_err(|e| VmError::Binding {
                gpa,
                size: buf.len() as u64,
                offset: 0,
                why: e.to_string(),
            })?;
        Ok(())
    }

    /// Reads a u64 of system memory at guest physical `gpa`.
    pub(crate) fn read_system_u64(&self, gpa: u64) -> Result<u64, VmError> {
        let off = self.system_range(gpa, 8)?;
        // SAFETY: in bounds (checked), 8-aligned by every caller's layout; volatile because
        // the guest writes it.
        Ok(unsafe { self.system.as_ptr().add(off).cast::<u64>().read_volatile() })
    }

    /// Writes a u64 of system memory at guest physical `gpa`.
    pub(crate) fn write_system_u64(&self, gpa: u64, v: u64) -> Result<(), VmError> {
        self.write_system(gpa, &v.to_le_bytes())
    }

    fn system_range(&self, gpa: u64, len: usize) -> Result<usize, VmError> {
        let bad = || VmError::Binding {
            gpa,
            size: len as u64,
            offset: 0,
            why: format!("outside system memory of {:#x} bytes", self.system.len()),
        };
        let off = usize::try_from(gpa).map_err(|_| bad())?;
        match off.checked_add(len) {
            Some(end) if end <= self.system.len() => Ok(off),
            _ => Err(bad()),
        }
    }

    /// Binds `[offset, offset + size)` of `file` at guest physical `gpa` (inside the data
    /// window) as a new memslot; returns its slot number.
    pub fn bind(
        &self,
        gpa: u64,
        file: &Arc<dyn GuestBacking>,
        offset: u64,
        size: u64,
    ) -> Result<u32, VmError> {
        let bad = |why: String| VmError::Binding {
            gpa,
            size,
            offset,
            why,
        };
        if gpa % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 || offset % PAGE_SIZE != 0 || size == 0 {
            return Err(bad("not page-aligned or empty".into()));
        }
        let fsize = file.size();
        if offset.checked_add(size).is_none_or(|e| e > fsize) {
            return Err(bad(format!("past the end of the file (size {fsize:#x})")));
        }
        let end = gpa
            .checked_add(size)
            .ok_or_else(|| bad("overflows".into()))?;
        if gpa < guest::DATA_GPA || end > guest::DATA_GPA + guest::MAX_DATA_SIZE {
            return Err(bad(format!(
                "outside the data window [{:#x}, +{:#x})",
                guest::DATA_GPA,
                guest::MAX_DATA_SIZE
            )));
        }
        let mut slots = self
            .slots
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slots.iter().any(|s| s.gpa < end && gpa < s.gpa + s.size) {
            return Err(bad("overlaps an existing binding".into()));
        }
        let slot = slots.iter().map(|s| s.slot).max().unwrap_or(0) + 1;
        let off_usize = usize::try_from(offset).map_err(|_| bad("offset too large".into()))?;
        // The memslot lives no longer than the memory's views: the entry below holds the
        // backing (an Arc) until the slot is deleted in Drop or `unbind`; conversions zap or
        // re-map parts of a view in place, never unmap it.
        let source = file.memslot_source().map_err(|errno| VmError::Kvm {
            op: "mapping the memory for its memslot",
            errno,
        })?;
        match source {
            MemslotSource::GuestView { userspace_addr, .. } => {
                let region = kvm_userspace_memory_region {
                    slot,
                    flags: 0,
                    guest_phys_addr: gpa,
                    memory_size: size,
                    // In bounds: offset + size <= guest memory size = view length.
                    userspace_addr: userspace_addr + off_usize as u64,
                };
                // SAFETY: the view outlives the slot (see above).
                unsafe { self.vm_fd().set_user_memory_region(region) }
                    .map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;
            }
            MemslotSource::GuestMemfd {
                fd,
                vm,
                userspace_addr,
            } => {
                if vm.as_raw_fd() != self.vm_fd().as_raw_fd() {
                    return Err(VmError::WrongFile(
                        "the kernel guest_memfd belongs to another VM; create the Vm with \
                         Vm::on_kernel_backend on the file's backend"
                            .into(),
                    ));
                }
                let region = kvm_userspace_memory_region2 {
                    slot,
                    flags: KVM_MEM_GUEST_MEMFD,
                    guest_phys_addr: gpa,
                    memory_size: size,
                    userspace_addr: userspace_addr + off_usize as u64,
                    guest_memfd_offset: offset,
                    guest_memfd: u32::try_from(fd.as_raw_fd())
                        .map_err(|_| bad("negative fd".into()))?,
                    ..Default::default()
                };
                // SAFETY: the mapping and the fd live as long as the file, which the memslot
                // entry holds until the slot is deleted in Drop.
                unsafe { self.vm_fd().set_user_memory_region2(region) }.map_err(VmError::kvm(
                    "KVM_SET_USER_MEMORY_REGION2(KVM_MEM_GUEST_MEMFD)",
                ))?;
            }
        }
        slots.push(Memslot {
            slot,
            gpa,
            size,
            backing: Arc::clone(file),
            offset,
        });
        Ok(slot)
    }

    /// The current bindings.
    pub fn memslots(&self) -> Vec<Memslot> {
        self.slots
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The pieces `(file, file offset, gpa, len)` of `[gpa, gpa + size)`; EINVAL unless every
    /// byte is bound.
    fn segments(&self, gpa: u64, size: u64) -> KernelResult<Vec<Segment>> {
        let end = gpa.checked_add(size).ok_or(Errno::EINVAL)?;
        let slots = self
            .slots
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = Vec::new();
        let mut at = gpa;
        while at < end {
            let s = slots
                .iter()
                .find(|s| s.gpa <= at && at < s.gpa + s.size)
                .ok_or(Errno::EINVAL)?;
            let seg_end = end.min(s.gpa + s.size);
            out.push((
                Arc::clone(&s.backing),
                s.offset + (at - s.gpa),
                at,
                seg_end - at,
            ));
            at = seg_end;
        }
        Ok(out)
    }

    /// Translates a guest physical address to (file, offset).
    pub fn gpa_to_file(&self, gpa: u64) -> Option<(Arc<dyn GuestBacking>, u64)> {
        self.segments(gpa, 1)
            .ok()
            .and_then(|v| v.into_iter().next())
            .map(|(f, off, _, _)| (f, off))
    }

    /// Performs a conversion request: split across the memslots (and files) it covers, each
    /// piece through `KVM_SET_MEMORY_ATTRIBUTES2` on its file. EINVAL (and nothing changes)
    /// for a request that is unaligned, empty or not entirely bound. A piece failing with
    /// EAGAIN is retried once after dropping the VMM's own pins on the range; if a piece
    /// still fails, the pieces already converted are restored and the errno is returned.
    /// With `fallocate`, shared pieces are punched and private ones allocated (PMCT).
    pub fn convert(&self, req: ConvertRequest, fallocate: bool) -> KernelResult<()> {
        let r = self.convert_inner(req, fallocate);
        match r {
            Ok(()) => {
                let c = if req.to_private {
                    &self.counters.to_private
                } else {
                    &self.counters.to_shared
                };
                c.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .pages_converted
                    .fetch_add(req.size / PAGE_SIZE, Ordering::Relaxed);
            }
            Err(_) => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    fn convert_inner(&self, req: ConvertRequest, fallocate: bool) -> KernelResult<()> {
        if req.gpa % PAGE_SIZE != 0 || req.size % PAGE_SIZE != 0 || req.size == 0 {
            return Err(Errno::EINVAL);
        }
        let segs = self.segments(req.gpa, req.size)?;
        let attributes = if req.to_private {
            KVM_MEMORY_ATTRIBUTE_PRIVATE
        } else {
            0
        };
        // The attributes before, to restore them if a later piece fails.
        let mut before: Vec<(Arc<dyn GuestBacking>, Vec<AttributeRun>)> = Vec::new();
        for (file, off, gpa, len) in &segs {
            let runs = file.attribute_runs(*off, *len)?;
            let mut a = kvm_memory_attributes2::new(*off, *len, attributes);
            let mut r = file.set_attributes(&mut a);
            if r == Err(Errno::EAGAIN) && self.drop_pins(*gpa, *len) > 0 {
                self.counters.eagain_retries.fetch_add(1, Ordering::Relaxed);
                let mut a = kvm_memory_attributes2::new(*off, *len, attributes);
                r = file.set_attributes(&mut a);
            }
            if let Err(e) = r {
                for (file, runs) in &before {
                    restore_runs(file.as_ref(), runs);
                }
                return Err(e);
            }
            before.push((file.clone(), runs));
        }
        if fallocate {
            for (file, off, _, len) in &segs {
                if req.to_private {
                    file.allocate(*off, *len)?;
                } else {
                    file.punch_hole(*off, *len)?;
                }
            }
        }
        Ok(())
    }

    /// `KVM_HC_MAP_GPA_RANGE(gpa, npages, attrs)`: decode, convert, and return what goes in
    /// `hypercall.ret` (0 or the negative errno).
    pub fn map_gpa_range(&self, gpa: u64, npages: u64, attrs: u64, fallocate: bool) -> u64 {
        let r = ConvertRequest::from_map_gpa_range(gpa, npages, attrs);
        let r = match r {
            Ok(req) => self.convert(req, fallocate),
            Err(e) => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        };
        hypercall_ret(r)
    }

    /// `KVM_EXIT_MEMORY_FAULT(flags, gpa, size)`: converts to the access's type.
    pub fn memory_fault(&self, flags: u64, gpa: u64, size: u64) -> KernelResult<()> {
        let req = ConvertRequest::from_memory_fault(flags, gpa, size)?;
        self.convert(req, false)
    }

    /// Punches `[gpa, gpa + size)` out of the files that back it (split across memslots).
    pub fn punch_hole(&self, gpa: u64, size: u64) -> KernelResult<()> {
        if gpa % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 || size == 0 {
            return Err(Errno::EINVAL);
        }
        for (file, off, _, len) in self.segments(gpa, size)? {
            file.punch_hole(off, len)?;
        }
        self.counters.punches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Takes a VMM-owned pin on `[gpa, gpa + len)` (as a device DMA mapping would); the VMM
    /// drops it when a conversion of the range fails with EAGAIN.
    pub fn pin(&self, gpa: u64, len: u64) -> KernelResult<()> {
        let segs = self.segments(gpa, len)?;
        let mut pins = self
            .pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (file, off, g, l) in segs {
            let guard = file.pin(off, l)?;
            pins.push(VmmPin {
                gpa: g,
                len: l,
                _guard: guard,
            });
        }
        Ok(())
    }

    /// Number of VMM pins held.
    pub fn pins_held(&self) -> usize {
        self.pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Drops the VMM pins that overlap `[gpa, gpa + len)`; returns how many.
    fn drop_pins(&self, gpa: u64, len: u64) -> usize {
        let mut pins = self
            .pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = pins.len();
        pins.retain(|p| !(p.gpa < gpa + len && gpa < p.gpa + p.len));
        let dropped = n - pins.len();
        self.counters
            .pins_dropped
            .fetch_add(dropped as u64, Ordering::Relaxed);
        dropped
    }

    pub(crate) fn count_exit(&self) {
        self.counters.exits.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters so far.
    pub fn stats(&self) -> VmStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VmStats {
            exits: l(&c.exits),
            conversions_to_private: l(&c.to_private),
            conversions_to_shared: l(&c.to_shared),
            pages_converted: l(&c.pages_converted),
            requests_rejected: l(&c.rejected),
            eagain_retries: l(&c.eagain_retries),
            pins_dropped: l(&c.pins_dropped),
            punches: l(&c.punches),
        }
    }

    /// Runs one thread per vCPU, each calling `f` with its vCPU; returns the results in vCPU
    /// order. After `timeout`, vCPUs still running are kicked out of `KVM_RUN` (a signal with
    /// a no-op handler) and their next [`Vcpu::run`] fails with [`VmError::Timeout`].
    pub fn run_vcpus<T, F>(
        &self,
        vcpus: Vec<Vcpu>,
        timeout: Duration,
        f: F,
    ) -> Vec<Result<T, VmError>>
    where
        T: Send,
        F: Fn(&Vm, Vcpu) -> Result<T, VmError> + Sync,
    {
        vcpu::install_kick_handler();
        self.stop.store(false, Ordering::SeqCst);
        self.timeout_ms.store(
            u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
        let deadline = std::time::Instant::now() + timeout;
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            let n = vcpus.len();
            let handles: Vec<_> = vcpus
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    let f = &f;
                    let tx = tx.clone();
                    s.spawn(move || {
                        // SAFETY: pthread_self has no preconditions.
                        let _ = tx.send((i, unsafe { libc::pthread_self() }));
                        drop(tx);
                        f(self, v)
                    })
                })
                .collect();
            drop(tx);
            let mut tids: Vec<(usize, libc::pthread_t)> = rx.iter().take(n).collect();
            tids.sort_by_key(|t| t.0);
            let tids: Vec<libc::pthread_t> = tids.into_iter().map(|t| t.1).collect();
            while handles.iter().any(|h| !h.is_finished()) {
                if std::time::Instant::now() >= deadline {
                    self.stop.store(true, Ordering::SeqCst);
                    for (h, &t) in handles.iter().zip(&tids) {
                        if !h.is_finished() {
                            // SAFETY: the thread is not joined yet (joining happens below),
                            // so its id is valid; the signal has a no-op handler.
                            unsafe { libc::pthread_kill(t, vcpu::kick_signal()) };
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            handles
                .into_iter()
                .enumerate()
                .map(|(i, h)| {
                    h.join().unwrap_or_else(|_| {
                        Err(VmError::UnexpectedExit {
                            vcpu: i,
                            what: "vCPU thread panicked".into(),
                        })
                    })
                })
                .collect()
        })
    }

    /// Whether `KVM_EXIT_MEMORY_FAULT` is served by converting to the access's type (the
    /// default, QEMU's and Cloud Hypervisor's policy) or reported as [`Stop::MemoryFault`].
    pub fn set_memory_fault_conversion(&self, convert: bool) {
        self.memory_fault_conversion
            .store(convert, Ordering::SeqCst);
    }

    pub(crate) fn memory_fault_conversion(&self) -> bool {
        self.memory_fault_conversion.load(Ordering::SeqCst)
    }

    /// Deletes memslot `slot` (the file handle it held is released).
    pub fn unbind(&self, slot: u32) -> Result<(), VmError> {
        let mut slots = self
            .slots
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = slots
            .iter()
            .position(|s| s.slot == slot)
            .ok_or_else(|| VmError::Binding {
                gpa: 0,
                size: 0,
                offset: 0,
                why: format!("memslot {slot} is not bound"),
            })?;
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: slots[i].gpa,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: deleting a slot this Vm created; no memory is handed to KVM.
        unsafe { self.vm_fd().set_user_memory_region(region) }
            .map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION (delete)"))?;
        slots.remove(i);
        Ok(())
    }

    /// Whether [`Vm::run_vcpus`] ran out of time.
    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The limit [`Vm::run_vcpus`] was given.
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::SeqCst))
    }

    /// Whether a `KVM_HC_MAP_GPA_RANGE` hypercall issued by the guest at CPL0 reaches
    /// userspace as `KVM_EXIT_HYPERCALL` within `timeout`. `Err` says what happened instead.
    /// On PVM the `vmcall` is emulated and never exits: the vCPU is kicked out with a signal.
    pub fn probe_hypercall_exit(timeout: Duration) -> Result<(), String> {
        vcpu::probe_hypercall_exit(timeout)
    }
}

/// Puts back the attributes recorded before a conversion that failed part-way.
fn restore_runs(file: &dyn GuestBacking, runs: &[AttributeRun]) {
    for &(off, len, attrs) in runs {
        let mut a = kvm_memory_attributes2::new(off, len, attrs);
        let _ = file.set_attributes(&mut a);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Delete every memslot before the mappings they point at can go (the kernel
        // backend's VM outlives this Vm).
        let slots = self
            .slots
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for s in slots.iter() {
            let region = kvm_userspace_memory_region {
                slot: s.slot,
                flags: 0,
                guest_phys_addr: s.gpa,
                memory_size: 0,
                userspace_addr: 0,
            };
            // SAFETY: deleting a slot this Vm created; no memory is handed to KVM.
            let _ = unsafe { self.handle.fd().set_user_memory_region(region) };
        }
        let region = kvm_userspace_memory_region {
            slot: 0,
            ..Default::default()
        };
        // SAFETY: as above, for the system memory slot.
        let _ = unsafe { self.handle.fd().set_user_memory_region(region) };
    }
}
