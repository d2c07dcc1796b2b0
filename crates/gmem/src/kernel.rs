//! The kernel backend: guest_memfd files created by KVM on `/dev/kvm`.
//!
//! [`KernelBackend`] owns `/dev/kvm` and one VM (type [`KVM_X86_DEFAULT_VM`] unless another is
//! chosen); every [`KernelGuestMemfd`] it creates belongs to that VM and keeps it alive.
//! Every operation is the kernel's own: `KVM_CREATE_GUEST_MEMFD`, `mmap` (private pages raise
//! the kernel's SIGBUS), `fallocate`, `fstat`, and `KVM_SET_MEMORY_ATTRIBUTES2` on the
//! guest_memfd for conversion. Errnos are whatever the kernel answered.
//!
//! Conversion needs `KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES` (249 in series v7, 250 in v8,
//! [`SeriesRevision`]) advertising [`KVM_MEMORY_ATTRIBUTE_PRIVATE`]. Without it the ioctl is
//! still issued and its answer (ENOTTY on kernels without the series) is returned: there is
//! never a silent fallback to emulation. [`GuestMemfdBackend::conversion_support`] then names
//! the missing capability and what the kernel answered ([`ConversionUnsupported`]).
//!
//! The kernel has no attribute query, so each file keeps a mirror ([`AttributeStore`]) updated
//! by its successful `set_attributes` calls; [`GuestMemfd::attributes`], `attribute_runs`,
//! `read_at` and `write_at` use it.
//!
//! Pins are real: [`GuestMemfd::pin`] vmsplices the pages of the file's host view into a pipe
//! that is never read (as the v7 selftest did), so the kernel holds a reference on each page
//! until the [`PinGuard`] is dropped and the pipe closed.

use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use kvm_ioctls::{Kvm, VmFd};

use crate::attributes::{check_host_access, pages_of, AttributeStore};
use crate::error::{AccessError, ConversionUnsupported, Errno, KernelResult};
use crate::file::{BackendKind, GuestMemfd, GuestMemfdBackend, GuestMemfdStat, PinGuard};
use crate::mapping::{HostMapping, MapKind, WholeFileView};
use crate::sys::{self, Mmap, PAGE_SIZE};
use crate::uapi::{
    flag_names, kvm_create_guest_memfd, kvm_memory_attributes2, SeriesRevision,
    GUEST_MEMFD_FLAG_INIT_SHARED, KVM_CAP_GUEST_MEMFD_FLAGS, KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_X86_DEFAULT_VM,
};

/// The VM that the backend and all its files share.
struct KernelVm {
    kvm: Kvm,
    vm: VmFd,
    vm_type: u64,
    supported_flags: u64,
    /// The revision whose capability advertises PRIVATE, if any.
    revision: Option<SeriesRevision>,
    /// Filled on first use when `revision` is `None`.
    unsupported: OnceLock<ConversionUnsupported>,
}

/// The kernel backend: `/dev/kvm` and one VM whose guest_memfd files it creates.
///
/// Cloning gives another handle to the same VM.
#[derive(Clone)]
pub struct KernelBackend {
    vm: Arc<KernelVm>,
}

impl fmt::Debug for KernelBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelBackend")
            .field("vm_type", &self.vm.vm_type)
            .field("supported_flags", &flag_names(self.vm.supported_flags))
            .field("revision", &self.vm.revision.map(SeriesRevision::name))
            .finish()
    }
}

/// `KVM_CHECK_EXTENSION` on the VM; negative answers (errors) count as 0.
fn vm_cap(vm: &VmFd, cap: u32) -> i32 {
    vm.check_extension_raw(libc::c_ulong::from(cap)).max(0)
}

impl KernelBackend {
    /// Opens `/dev/kvm` and creates a VM of type [`KVM_X86_DEFAULT_VM`]. Fails with the
    /// kernel's errno (ENOENT without `/dev/kvm`, EACCES without permission).
    pub fn new() -> KernelResult<Self> {
        Self::with_vm_type(u64::from(KVM_X86_DEFAULT_VM))
    }

    /// Opens the KVM device ([`crate::host::kvm_device`]) and creates a VM of type
    /// `vm_type` (`KVM_X86_*_VM`).
    pub fn with_vm_type(vm_type: u64) -> KernelResult<Self> {
        Self::open(&crate::host::kvm_device(), vm_type)
    }

    /// Opens the KVM device at `path` (normally `/dev/kvm`) and creates a VM of type
    /// `vm_type`.
    pub fn open(path: &Path, vm_type: u64) -> KernelResult<Self> {
        let path = CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
        let kvm = Kvm::new_with_path(path.as_c_str())?;
        let vm = kvm.create_vm_with_type(vm_type)?;
        let supported_flags = u64::try_from(vm_cap(&vm, KVM_CAP_GUEST_MEMFD_FLAGS)).unwrap_or(0);
        let revision = SeriesRevision::ALL.into_iter().find(|rev| {
            let v = vm_cap(&vm, rev.cap_guest_memfd_memory_attributes());
            u64::try_from(v).is_ok_and(|v| v & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0)
        });
        Ok(KernelBackend {
            vm: Arc::new(KernelVm {
                kvm,
                vm,
                vm_type,
                supported_flags,
                revision,
                unsupported: OnceLock::new(),
            }),
        })
    }

    /// `/dev/kvm`.
    pub fn kvm(&self) -> &Kvm {
        &self.vm.kvm
    }

    /// The VM the files belong to: bind their ranges with `KVM_SET_USER_MEMORY_REGION2` on
    /// it, and create vCPUs from it. Keep a clone of the backend to keep the VM alive.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm.vm
    }

    /// `KVM_CHECK_EXTENSION(cap)` on the backend's VM (negative answers count as 0).
    pub fn check_extension(&self, cap: u32) -> i32 {
        vm_cap(&self.vm.vm, cap)
    }

    /// The VM type the backend was created with.
    pub fn vm_type(&self) -> u64 {
        self.vm.vm_type
    }

    /// The series revision whose `KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES` advertises PRIVATE
    /// on this VM, if any.
    pub fn conversion_revision(&self) -> Option<SeriesRevision> {
        self.vm.revision
    }

    /// Why conversion is unsupported, or `None` when it is. The first call issues
    /// `KVM_SET_MEMORY_ATTRIBUTES2` on a scratch one-page guest_memfd to record the kernel's
    /// answer.
    pub fn conversion_unsupported(&self) -> Option<&ConversionUnsupported> {
        if self.vm.revision.is_some() {
            return None;
        }
        Some(self.vm.unsupported.get_or_init(|| {
            let cap_values = SeriesRevision::ALL
                .iter()
                .map(|rev| {
                    let cap = rev.cap_guest_memfd_memory_attributes();
                    (*rev, cap, vm_cap(&self.vm.vm, cap))
                })
                .collect();
            ConversionUnsupported {
                vm_type: self.vm.vm_type,
                cap_values,
                answer: self.scratch_conversion_answer(),
            }
        }))
    }

    /// Issues a no-op conversion (a private page to private) on a fresh file and renders the
    /// answer.
    fn scratch_conversion_answer(&self) -> String {
        let file = match self.create_guest_memfd(PAGE_SIZE, 0) {
            Ok(f) => f,
            Err(e) => return format!("nothing: KVM_CREATE_GUEST_MEMFD failed with {e}"),
        };
        let mut a = kvm_memory_attributes2::new(0, PAGE_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE);
        match file.attributes2_ioctl(&mut a) {
            Ok(()) => "success".to_string(),
            Err(e) => e.to_string(),
        }
    }

    /// `KVM_CREATE_GUEST_MEMFD(size, flags)` on this backend's VM, as the concrete type (the
    /// VM code needs its fd and host view to bind memslots).
    pub fn create_guest_memfd(&self, size: u64, flags: u64) -> KernelResult<KernelGuestMemfd> {
        let fd = sys::kvm::create_guest_memfd(
            &self.vm.vm,
            kvm_create_guest_memfd {
                size,
                flags,
                reserved: [0; 6],
            },
        )?;
        let private = flags & GUEST_MEMFD_FLAG_INIT_SHARED == 0;
        Ok(KernelGuestMemfd {
            inner: Arc::new(Inner {
                fd,
                size,
                flags,
                vm: self.vm.clone(),
                attrs: RwLock::new(AttributeStore::new(size / PAGE_SIZE, private)),
                host_view: WholeFileView::default(),
            }),
        })
    }
}

impl GuestMemfdBackend for KernelBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Kernel
    }

    fn supported_flags(&self) -> u64 {
        self.vm.supported_flags
    }

    fn conversion_support(&self) -> Result<(), ConversionUnsupported> {
        match self.conversion_unsupported() {
            None => Ok(()),
            Some(why) => Err(why.clone()),
        }
    }

    fn create(&self, size: u64, flags: u64) -> KernelResult<Arc<dyn GuestMemfd>> {
        Ok(Arc::new(self.create_guest_memfd(size, flags)?))
    }
}

struct Inner {
    fd: OwnedFd,
    size: u64,
    flags: u64,
    vm: Arc<KernelVm>,
    /// Mirror of the attributes the kernel holds, updated after each successful conversion.
    /// Held exclusively across the conversion ioctl, shared across host accesses.
    attrs: RwLock<AttributeStore>,
    host_view: WholeFileView,
}

/// One guest_memfd file created by KVM. Cloning gives another handle to the same file.
#[derive(Clone)]
pub struct KernelGuestMemfd {
    inner: Arc<Inner>,
}

impl fmt::Debug for KernelGuestMemfd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelGuestMemfd")
            .field("fd", &self.inner.fd.as_raw_fd())
            .field("size", &self.inner.size)
            .field("flags", &flag_names(self.inner.flags))
            .finish()
    }
}

impl KernelGuestMemfd {
    /// A full `MAP_SHARED` mapping of the file (offset 0, `size` bytes), made on first use and kept
    /// for the file's lifetime. Its address is the `userspace_addr` to bind a memslot with (the
    /// kernel routes emulated guest accesses through `userspace_addr`, so it must be this mapping,
    /// docs/host-facts.md). Private pages in it raise SIGBUS, like any host mapping; the safe
    /// accessors check the attribute mirror first. Fails with the kernel's mmap errno (ENODEV for a
    /// file created without `GUEST_MEMFD_FLAG_MMAP`).
    pub(crate) fn host_view(&self) -> KernelResult<&Mmap> {
        self.inner
            .host_view
            .get_or_map(self.inner.fd.as_fd(), self.inner.size, libc::MAP_SHARED)
    }

    /// Whether this file was created by `backend`'s VM.
    pub fn belongs_to(&self, backend: &KernelBackend) -> bool {
        Arc::ptr_eq(&self.inner.vm, &backend.vm)
    }

    /// `KVM_SET_MEMORY_ATTRIBUTES2` as is: no validation, no mirror update. The kernel writes
    /// the struct back (`error_offset`).
    fn attributes2_ioctl(&self, a: &mut kvm_memory_attributes2) -> KernelResult<()> {
        sys::kvm::set_memory_attributes2(self.inner.fd.as_fd(), a)
    }

    fn read_attrs(&self) -> RwLockReadGuard<'_, AttributeStore> {
        self.inner
            .attrs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_attrs(&self) -> RwLockWriteGuard<'_, AttributeStore> {
        self.inner
            .attrs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Checks a host access and returns the host view's offset, the view and the shared lock
    /// that keeps the pages shared during the copy.
    fn check_access(
        &self,
        offset: u64,
        len: usize,
    ) -> Result<(&Mmap, RwLockReadGuard<'_, AttributeStore>), AccessError> {
        check_host_access(offset, len, self.inner.size, self.inner.flags)?;
        let attrs = self.read_attrs();
        attrs.check_shared(offset, len as u64)?;
        // The mapping exists for any MMAP file unless the kernel refuses it; a refusal is
        // reported as the access being impossible.
        let view = self.host_view().map_err(|_| AccessError::OutOfBounds {
            offset,
            len: len as u64,
            size: self.inner.size,
        })?;
        Ok((view, attrs))
    }
}

/// The pipes a [`PinGuard`] of the kernel backend holds: each has the pinned pages spliced in
/// and is never read, so the kernel keeps a reference on every page until they are closed.
struct PipePin {
    _pipes: Vec<(OwnedFd, OwnedFd)>,
}

impl GuestMemfd for KernelGuestMemfd {
    fn backend(&self) -> BackendKind {
        BackendKind::Kernel
    }

    fn clone_arc(&self) -> Arc<dyn GuestMemfd> {
        Arc::new(self.clone())
    }

    fn memslot_source(&self) -> KernelResult<crate::file::MemslotSource<'_>> {
        let view = self.host_view()?;
        Ok(crate::file::MemslotSource::GuestMemfd {
            fd: self.inner.fd.as_fd(),
            vm: &self.inner.vm.vm,
            userspace_addr: view.as_ptr() as u64,
        })
    }

    fn allocated_bytes(&self) -> KernelResult<u64> {
        sys::allocated_bytes(self.inner.fd.as_fd())
    }

    fn guest_memfd_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(self.inner.fd.as_fd())
    }

    fn size(&self) -> u64 {
        self.inner.size
    }

    fn flags(&self) -> u64 {
        self.inner.flags
    }

    fn stat(&self) -> KernelResult<GuestMemfdStat> {
        let st = sys::fstat(self.inner.fd.as_fd())?;
        Ok(GuestMemfdStat {
            size: u64::try_from(st.st_size).map_err(|_| Errno(libc::EOVERFLOW))?,
            blksize: u64::try_from(st.st_blksize).map_err(|_| Errno(libc::EOVERFLOW))?,
            ino: st.st_ino,
        })
    }

    fn set_attributes(&self, a: &mut kvm_memory_attributes2) -> KernelResult<()> {
        // Exclusive across the ioctl so that the mirror changes atomically with the kernel's
        // state as far as this process's accessors can tell.
        let mut attrs = self.write_attrs();
        // The mirror is updated after the kernel changed: its nodes are reserved first, so
        // that update cannot fail (ENOMEM before the ioctl, nothing changed).
        if attrs.try_reserve().is_err() {
            a.error_offset = a.offset;
            return Err(Errno::ENOMEM);
        }
        self.attributes2_ioctl(a)?;
        let (first, end) = pages_of(a.offset, a.size);
        attrs.set_range(first, end, a.attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0);
        Ok(())
    }

    fn fallocate(&self, mode: u32, offset: u64, len: u64) -> KernelResult<()> {
        sys::fallocate(self.inner.fd.as_fd(), mode, offset, len)
    }

    fn mmap(&self, offset: u64, len: usize, kind: MapKind) -> KernelResult<HostMapping> {
        let flags = kind.mmap_flag();
        // mmap(2) maps whole pages: the mapping's length is rounded up, as the kernel does
        // (and as the emulated backend reports it); a length that overflows is ENOMEM.
        let len = len
            .checked_next_multiple_of(PAGE_SIZE as usize)
            .ok_or(Errno::ENOMEM)?;
        let map = Mmap::new(Some(self.inner.fd.as_fd()), offset, len, flags)?;
        Ok(HostMapping::new(Arc::new(map), offset, None))
    }

    fn mmap_fixed(
        &self,
        at: crate::os::Placement,
        offset: u64,
        kind: MapKind,
    ) -> KernelResult<HostMapping> {
        let flags = kind.mmap_flag();
        // The kernel checks everything, in its own order (address 0 aside: EPERM).
        let map = Mmap::new_at(
            at,
            Some(self.inner.fd.as_fd()),
            offset,
            flags,
            libc::PROT_READ | libc::PROT_WRITE,
        )?;
        Ok(HostMapping::new(Arc::new(map), offset, None))
    }

    fn pin(&self, offset: u64, len: u64) -> KernelResult<PinGuard> {
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.size => {}
            _ => return Err(Errno::EFAULT),
        }
        let (first, end) = pages_of(offset, len);
        let span = usize::try_from((end - first) * PAGE_SIZE).map_err(|_| Errno::EFAULT)?;
        // A mapping of the pinned pages only (not the whole file, which may be too large to
        // map): the pipes keep their page references after it is unmapped. Without a host
        // mapping there is nothing GUP could pin: the kernel's answer to vmsplice of an
        // unmapped address is EFAULT.
        let map = Mmap::new(
            Some(self.inner.fd.as_fd()),
            first * PAGE_SIZE,
            span,
            libc::MAP_SHARED,
        )
        .map_err(|_| Errno::EFAULT)?;
        // Held shared so that no conversion of ours runs while the pages are taken.
        let _attrs = self.read_attrs();
        let pipes = sys::vmsplice_pin(&map, 0, span)?;
        Ok(PinGuard::new(
            Box::new(PipePin { _pipes: pipes }),
            offset,
            len,
        ))
    }

    fn attributes(&self, offset: u64) -> KernelResult<u64> {
        if offset >= self.inner.size {
            return Err(Errno::EINVAL);
        }
        Ok(self.read_attrs().get(offset / PAGE_SIZE))
    }

    fn attribute_runs(&self, offset: u64, len: u64) -> KernelResult<Vec<(u64, u64, u64)>> {
        self.read_attrs().byte_runs(offset, len, self.inner.size)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let (view, attrs) = self.check_access(offset, buf.len())?;
        // `check_access` bounded the range by the file size, which is the view's length.
        #[allow(clippy::cast_possible_truncation)]
        let off = offset as usize;
        // `[off, off + len)` is inside the view and every page of it is shared (the mirror says
        // so and no conversion can run while `attrs` is held), so the copy cannot fault;
        // volatile copies tolerate a concurrent guest.
        view.read_volatile(off, buf)
            .map_err(|_| AccessError::OutOfBounds {
                offset,
                len: buf.len() as u64,
                size: self.inner.size,
            })?;
        drop(attrs);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        let (view, attrs) = self.check_access(offset, data.len())?;
        // As in `read_at`.
        #[allow(clippy::cast_possible_truncation)]
        let off = offset as usize;
        // As in `read_at`; the destination pages are shared and inside the view.
        view.write_volatile(off, data)
            .map_err(|_| AccessError::OutOfBounds {
                offset,
                len: data.len() as u64,
                size: self.inner.size,
            })?;
        drop(attrs);
        Ok(())
    }
}
