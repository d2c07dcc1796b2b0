//! The backend-neutral guest_memfd interface.
//!
//! [`GuestMemfd`] is one guest_memfd file, whatever provides it: the emulated backend
//! ([`crate::emulated`]) or the kernel's. Methods are named after the kernel operation they
//! mirror and fail with the kernel's errno, so the same test case runs against both.

use std::fmt;
use std::sync::Arc;

use crate::error::{AccessError, ConversionError, KernelResult};
use crate::mapping::{HostMapping, MapKind};
use crate::uapi::{
    kvm_memory_attributes2, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_MMAP,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
};

/// Which implementation backs a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// gmem's emulation on a memfd: works on any Linux.
    Emulated,
    /// The kernel's guest_memfd on `/dev/kvm`.
    Kernel,
}

impl BackendKind {
    /// `emulated` or `kernel`.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Emulated => "emulated",
            BackendKind::Kernel => "kernel",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What `fstat()` reports for a guest_memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestMemfdStat {
    /// `st_size`: the creation size.
    pub size: u64,
    /// `st_blksize`: the page size.
    pub blksize: u64,
    /// `st_ino`: distinct for distinct files.
    pub ino: u64,
}

/// A held reference on pages (a GUP/IOMMU pin). While it lives, converting the pages to
/// private fails with EAGAIN. Released on drop.
pub struct PinGuard {
    _hold: Box<dyn Send + Sync>,
    offset: u64,
    len: u64,
}

impl PinGuard {
    pub(crate) fn new(hold: Box<dyn Send + Sync>, offset: u64, len: u64) -> Self {
        PinGuard {
            _hold: hold,
            offset,
            len,
        }
    }

    /// Start of the pinned range.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length of the pinned range.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the pin covers nothing (never: a pin covers at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for PinGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinGuard")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

/// One guest_memfd file.
pub trait GuestMemfd: Send + Sync + fmt::Debug {
    /// The backend that provides this file.
    fn backend(&self) -> BackendKind;

    /// The creation size in bytes.
    fn size(&self) -> u64;

    /// The creation flags (`GUEST_MEMFD_FLAG_*`).
    fn flags(&self) -> u64;

    /// `fstat()`.
    fn stat(&self) -> KernelResult<GuestMemfdStat>;

    /// `KVM_SET_MEMORY_ATTRIBUTES2`: converts `[attrs.offset, +attrs.size)` to
    /// `attrs.attributes`. On EAGAIN or ENOMEM, `attrs.error_offset` is written; on any
    /// failure nothing changed.
    fn set_attributes(&self, attrs: &mut kvm_memory_attributes2) -> KernelResult<()>;

    /// The owning VM's `KVM_SET_MEMORY_ATTRIBUTES`, applied to this file's range under a
    /// memslot, where the VM tracks attributes ([`crate::AttributeTracking::PerVm`], the
    /// module-parameter mode). ENOTTY where the file's attributes are its own (the default:
    /// the VM ioctl is off with in-place conversion).
    fn set_vm_attributes(&self, _attrs: &mut kvm_memory_attributes2) -> KernelResult<()> {
        Err(crate::Errno::ENOTTY)
    }

    /// `fallocate(mode, offset, len)`: allocation with `FALLOC_FL_KEEP_SIZE`, or
    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`.
    fn fallocate(&self, mode: u32, offset: u64, len: u64) -> KernelResult<()>;

    /// `mmap(len, PROT_READ|PROT_WRITE, kind, offset)`.
    fn mmap(&self, offset: u64, len: usize, kind: MapKind) -> KernelResult<HostMapping>;

    /// `mmap(addr, len, PROT_READ|PROT_WRITE, kind | MAP_FIXED, offset)` at `at` (with
    /// `MAP_FIXED_NOREPLACE` for a vacant placement: EEXIST if anything is mapped there): the
    /// mapping at an address the caller chose, as a VMM maps guest memory into a range it
    /// reserved. The errnos are `mmap(2)`'s and guest_memfd's, in the kernel's order (EINVAL
    /// for an address that is not page-aligned, EEXIST for an occupied vacant placement,
    /// before ENODEV). EOPNOTSUPP where the implementation cannot place mappings.
    fn mmap_fixed(
        &self,
        at: crate::os::Placement,
        offset: u64,
        kind: MapKind,
    ) -> KernelResult<HostMapping> {
        let _ = (at, offset, kind);
        Err(crate::Errno::EOPNOTSUPP)
    }

    /// Takes a long-term pin on the pages of `[offset, offset + len)`, as GUP or an IOMMU
    /// mapping would. The pages must be shared (EFAULT otherwise, as GUP on a private page).
    fn pin(&self, offset: u64, len: u64) -> KernelResult<PinGuard>;

    /// The attributes of the page at `offset` as gmem tracks them (the kernel has no query;
    /// the kernel backend reports what its successful `set_attributes` calls recorded).
    fn attributes(&self, offset: u64) -> KernelResult<u64>;

    /// Reads shared memory at `offset` without risking SIGBUS: a private page or a range past
    /// the end gives a typed error naming the offset.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), AccessError>;

    /// Writes shared memory at `offset`; refused like [`GuestMemfd::read_at`].
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), AccessError>;

    /// The attributes of every page of `[offset, offset + len)` as runs
    /// `(offset, len, attributes)`.
    fn attribute_runs(&self, offset: u64, len: u64) -> KernelResult<Vec<(u64, u64, u64)>>;

    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`.
    fn punch_hole(&self, offset: u64, len: u64) -> KernelResult<()> {
        self.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len)
    }

    /// `fallocate(KEEP_SIZE)`.
    fn allocate(&self, offset: u64, len: u64) -> KernelResult<()> {
        self.fallocate(FALLOC_FL_KEEP_SIZE, offset, len)
    }

    /// `mmap` of the whole file, shared.
    fn mmap_all(&self) -> KernelResult<HostMapping> {
        let len = usize::try_from(self.size()).map_err(|_| crate::Errno::ENOMEM)?;
        self.mmap(0, len, MapKind::Shared)
    }

    /// Converts `[offset, offset + len)` to private.
    fn set_private(&self, offset: u64, len: u64) -> Result<(), ConversionError> {
        let mut a = kvm_memory_attributes2::new(offset, len, KVM_MEMORY_ATTRIBUTE_PRIVATE);
        self.set_attributes(&mut a)
            .map_err(|errno| ConversionError {
                errno,
                error_offset: a.error_offset,
            })
    }

    /// Converts `[offset, offset + len)` to shared.
    fn set_shared(&self, offset: u64, len: u64) -> Result<(), ConversionError> {
        let mut a = kvm_memory_attributes2::new(offset, len, 0);
        self.set_attributes(&mut a)
            .map_err(|errno| ConversionError {
                errno,
                error_offset: a.error_offset,
            })
    }

    /// Whether host userspace may mmap the file.
    fn mmappable(&self) -> bool {
        self.flags() & GUEST_MEMFD_FLAG_MMAP != 0
    }

    /// A guest read of `[offset, +buf.len())`: what the guest sees through its memslot,
    /// private and shared pages alike (the emulated file's guest view, the analogue of
    /// `kvm_gmem_get_pfn`). ENOTTY on the kernel backend, whose private pages only a vCPU
    /// reaches.
    fn guest_read(&self, offset: u64, buf: &mut [u8]) -> KernelResult<()> {
        let _ = (offset, buf);
        Err(crate::Errno::ENOTTY)
    }

    /// A guest write, as [`GuestMemfd::guest_read`].
    fn guest_write(&self, offset: u64, data: &[u8]) -> KernelResult<()> {
        let _ = (offset, data);
        Err(crate::Errno::ENOTTY)
    }

    /// The guest writes `value` to the first byte of every page of `[offset, offset + len)`,
    /// faulting pages in as a vCPU would (EFAULT out of bounds; ENOTTY as
    /// [`GuestMemfd::guest_read`]).
    fn guest_touch(&self, offset: u64, len: u64, value: u8) -> KernelResult<()> {
        let _ = (offset, len, value);
        Err(crate::Errno::ENOTTY)
    }

    /// Another handle to this same file (a reference on the open file, as the kernel's
    /// `get_file`, not a new descriptor).
    fn clone_arc(&self) -> Arc<dyn GuestMemfd>;

    /// The kernel's guest_memfd descriptor, if this file is one; `None` for the emulated
    /// file, which a program reaches only through this interface.
    fn guest_memfd_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }

    /// How a KVM memslot reaches this file's memory.
    fn memslot_source(&self) -> KernelResult<MemslotSource<'_>>;

    /// Bytes of file pages allocated (`fstat` `st_blocks` × 512).
    fn allocated_bytes(&self) -> KernelResult<u64>;

    /// Bytes of gmem's own bookkeeping for this file (attribute store and page state); 0 for
    /// the kernel's file, whose metadata gmem cannot see.
    fn metadata_bytes(&self) -> u64 {
        0
    }
}

/// How a KVM memslot reaches a file's memory ([`GuestMemfd::memslot_source`]).
#[derive(Debug)]
pub enum MemslotSource<'a> {
    /// The kernel's guest_memfd: `KVM_SET_USER_MEMORY_REGION2` with `KVM_MEM_GUEST_MEMFD`,
    /// this descriptor and the file offset, on the VM that created the file;
    /// `userspace_addr` is the file's own shared mapping (docs/host-facts.md: emulated accesses go
    /// through it).
    GuestMemfd {
        /// The guest_memfd.
        fd: std::os::fd::BorrowedFd<'a>,
        /// The VM the file belongs to (binding it in another VM is EINVAL).
        vm: &'a kvm_ioctls::VmFd,
        /// Start of a shared mapping of the whole file.
        userspace_addr: u64,
    },
    /// An ordinary memslot (`KVM_SET_USER_MEMORY_REGION`) over a mapping of the whole file in
    /// which private pages stay accessible: the emulated file's guest view. The mapping
    /// lives as long as the file.
    GuestView {
        /// Start of the view (file offset 0).
        userspace_addr: u64,
        /// Its length (the file size).
        len: u64,
    },
}

/// Something that creates guest_memfd files: one per backend (and, for the kernel backend,
/// per VM).
pub trait GuestMemfdBackend: Send + Sync + fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// The flags `create` accepts (`KVM_CAP_GUEST_MEMFD_FLAGS`).
    fn supported_flags(&self) -> u64;

    /// Whether `set_attributes` can convert (the kernel backend needs
    /// `KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES`); `Err` names what is missing.
    fn conversion_support(&self) -> Result<(), crate::ConversionUnsupported>;

    /// Why the files' host mappings are not shared with fork children (and the files cannot
    /// be handed to another process), if they are not: the emulated backend without its guard.
    /// `None` where another process that maps a file is bound by its rules (the kernel's
    /// files, the guard).
    fn not_shared_across_processes(&self) -> Option<String> {
        None
    }

    /// `KVM_CREATE_GUEST_MEMFD(size, flags)`.
    fn create(&self, size: u64, flags: u64) -> KernelResult<Arc<dyn GuestMemfd>>;
}
