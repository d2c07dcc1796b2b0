//! The file operations: `KVM_SET_MEMORY_ATTRIBUTES2`, `fallocate`, `mmap`, pins and the safe
//! accessors.

use std::os::fd::AsFd;
use std::sync::Arc;

use super::{AttributeTracking, EmulatedGuestMemfd, Inner};

/// A revocation or restore of one run in one mapping (Remap mode).
use crate::attributes::{check_host_access, pages_of};
use crate::error::{AccessError, Errno, KernelResult};
use crate::file::{BackendKind, GuestMemfd, GuestMemfdStat, PinGuard};
use crate::mapping::{HostMapping, MapKind, MappingRegistry};
use crate::sys::{self, Mmap, Placement, PAGE_SIZE};
use crate::uapi::{
    kvm_memory_attributes2, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_MMAP,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
};

impl EmulatedGuestMemfd {
    pub(super) fn validate_attributes(&self, a: &kvm_memory_attributes2) -> KernelResult<()> {
        // docs/series.md §2.3, in order. Step 1 (ENOTTY) is the caller's; step 2 (EFAULT) cannot
        // happen here.
        if a.flags != 0 || a.reserved.iter().any(|&r| r != 0) {
            return Err(Errno::EINVAL);
        }
        // v8: EINVAL if the VM has no private memory at all (even for attributes 0), or for
        // any bit but PRIVATE (§2.1).
        if !self.inner.options.vm_private_mem || a.attributes & !KVM_MEMORY_ATTRIBUTE_PRIVATE != 0 {
            return Err(Errno::EINVAL);
        }
        let end = match a.offset.checked_add(a.size) {
            Some(end) if a.size != 0 => end,
            _ => return Err(Errno::EINVAL),
        };
        if a.offset % PAGE_SIZE != 0 || a.size % PAGE_SIZE != 0 {
            return Err(Errno::EINVAL);
        }
        if a.offset >= self.inner.size || end > self.inner.size {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }
}

/// A pin or a transient reference: an entry of the file's pins, removed on drop.
pub(super) struct PinHold {
    inner: Arc<Inner>,
    id: super::pins::PinId,
}

impl PinHold {
    pub(super) fn new(inner: Arc<Inner>, id: super::pins::PinId) -> Self {
        PinHold { inner, id }
    }
}

impl Drop for PinHold {
    fn drop(&mut self) {
        let _fork = super::fork::shared();
        self.inner.pins.release(self.id);
    }
}

impl GuestMemfd for EmulatedGuestMemfd {
    fn backend(&self) -> BackendKind {
        BackendKind::Emulated
    }

    fn guest_read(&self, offset: u64, buf: &mut [u8]) -> KernelResult<()> {
        EmulatedGuestMemfd::guest_read(self, offset, buf)
    }

    fn guest_write(&self, offset: u64, data: &[u8]) -> KernelResult<()> {
        EmulatedGuestMemfd::guest_write(self, offset, data)
    }

    fn guest_touch(&self, offset: u64, len: u64, value: u8) -> KernelResult<()> {
        EmulatedGuestMemfd::guest_touch(self, offset, len, value)
    }

    fn clone_arc(&self) -> Arc<dyn GuestMemfd> {
        Arc::new(self.clone())
    }

    fn memslot_source(&self) -> KernelResult<crate::file::MemslotSource<'_>> {
        let view = self.guest_view()?;
        // A vCPU maps what it touches there, unseen by gmem: every conversion zaps from now.
        self.inner.guest_view.expose();
        Ok(crate::file::MemslotSource::GuestView {
            userspace_addr: view.as_ptr() as u64,
            len: self.inner.size,
        })
    }

    fn allocated_bytes(&self) -> KernelResult<u64> {
        sys::allocated_bytes(self.inner.memfd.as_fd())
    }

    fn metadata_bytes(&self) -> u64 {
        self.read_state().attrs.metadata_bytes() as u64
    }

    fn size(&self) -> u64 {
        self.inner.size
    }

    fn flags(&self) -> u64 {
        self.inner.flags
    }

    fn stat(&self) -> KernelResult<GuestMemfdStat> {
        Ok(GuestMemfdStat {
            size: self.inner.size,
            blksize: PAGE_SIZE,
            ino: self.inner.ino,
        })
    }

    fn set_attributes(&self, a: &mut kvm_memory_attributes2) -> KernelResult<()> {
        // §2.3 step 1: with per-VM tracking the guest_memfd ioctl is off.
        if self.inner.options.attribute_tracking == AttributeTracking::PerVm {
            return Err(Errno::ENOTTY);
        }
        let r = self.convert(a);
        self.log_conversion(a, r);
        r
    }

    fn set_vm_attributes(&self, a: &mut kvm_memory_attributes2) -> KernelResult<()> {
        EmulatedGuestMemfd::set_vm_attributes(self, a)
    }

    fn fallocate(&self, mode: u32, offset: u64, len: u64) -> KernelResult<()> {
        self.owner_only()?;
        // vfs_fallocate's own checks, then guest_memfd's (docs/series.md §2.5).
        if i64::try_from(offset).is_err() || len == 0 || i64::try_from(len).is_err() {
            return Err(Errno::EINVAL);
        }
        if mode & !(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE) != 0
            || mode & FALLOC_FL_KEEP_SIZE == 0
        {
            return Err(Errno::EOPNOTSUPP);
        }
        if offset
            .checked_add(len)
            .and_then(|e| i64::try_from(e).ok())
            .is_none()
        {
            return Err(Errno(libc::EFBIG));
        }
        if offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(Errno::EINVAL);
        }
        let size = self.inner.size;
        if mode & FALLOC_FL_PUNCH_HOLE != 0 {
            let st = self.write_state();
            let end = (offset + len).min(size);
            if offset >= end {
                return Ok(());
            }
            // The pages leave the file: restore the direct map, reclaim, forget "up to date".
            let (first, last) = pages_of(offset, end - offset);
            self.inner.free_pages(&st.attrs, first, last);
            // NO_DIRECT_MAP: a failed host hand-out left a SIGBUS marker on a shared page; the
            // page leaves the file, so the next access faults afresh.
            self.inner.clear_failure_markers(first, last);
            self.inner.forget_mapped(first, last);
            sys::fallocate(
                self.inner.memfd.as_fd(),
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                offset,
                end - offset,
            )?;
            // The punched pages leave the file: pins on them no longer hold file pages.
            let (first, last) = pages_of(offset, end - offset);
            self.inner.pins.detach(first, last);
            Ok(())
        } else {
            if offset + len > size {
                return Err(Errno::EINVAL);
            }
            let _st = self.read_state();
            // With huge folios, each empty 2 MiB block is allocated whole first (fallocate
            // alone allocates 4 KiB folios under `advise`); fallocate then has nothing left
            // to do there.
            let (first, last) = pages_of(offset, len);
            self.inner.allocate_blocks(first, last)?;
            sys::fallocate(self.inner.memfd.as_fd(), FALLOC_FL_KEEP_SIZE, offset, len)
        }
    }

    fn mmap(&self, offset: u64, len: usize, kind: MapKind) -> KernelResult<HostMapping> {
        self.map_placed(Err(len), offset, kind)
    }

    fn mmap_fixed(&self, at: Placement, offset: u64, kind: MapKind) -> KernelResult<HostMapping> {
        self.map_placed(Ok(at), offset, kind)
    }

    fn pin(&self, offset: u64, len: u64) -> KernelResult<PinGuard> {
        self.owner_only()?;
        let end = offset.checked_add(len).ok_or(Errno::EFAULT)?;
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        if self.inner.flags & GUEST_MEMFD_FLAG_MMAP == 0 || end > self.inner.size {
            return Err(Errno::EFAULT);
        }
        // GUP refuses AS_NO_DIRECT_MAP mappings (docs/series.md §3.2).
        if self.inner.no_direct_map() {
            return Err(Errno::EFAULT);
        }
        let (first, last) = pages_of(offset, len);
        let st = self.read_state();
        if st.attrs.first_with(first, last, true).is_some() {
            return Err(Errno::EFAULT);
        }
        // GUP faults the pages in (with huge folios, a block at a time).
        self.inner.allocate_blocks(first, last)?;
        sys::fallocate(
            self.inner.memfd.as_fd(),
            FALLOC_FL_KEEP_SIZE,
            first * PAGE_SIZE,
            (last - first) * PAGE_SIZE,
        )?;
        let id = self.inner.pins.take_long_term(first, last)?;
        drop(st);
        let hold = PinHold {
            inner: self.inner.clone(),
            id,
        };
        Ok(PinGuard::new(Box::new(hold), offset, len))
    }

    fn attributes(&self, offset: u64) -> KernelResult<u64> {
        if offset >= self.inner.size {
            return Err(Errno::EINVAL);
        }
        Ok(self.read_state().attrs.get(offset / PAGE_SIZE))
    }

    fn attribute_runs(&self, offset: u64, len: u64) -> KernelResult<Vec<(u64, u64, u64)>> {
        self.read_state()
            .attrs
            .byte_runs(offset, len, self.inner.size)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let st = self.check_access(offset, buf.len())?;
        self.inner.hand_out(offset, buf.len() as u64)?;
        // In flight: the pages hold a transient reference (a conversion to private answers
        // EAGAIN meanwhile), not the lock.
        let _ref =
            self.transient_ref(offset, buf.len() as u64)
                .map_err(|_| AccessError::OutOfBounds {
                    offset,
                    len: buf.len() as u64,
                    size: self.inner.size,
                })?;
        let _fork = st.into_fork_hold();
        sys::pread_exact(self.inner.memfd.as_fd(), buf, offset).map_err(|_| {
            AccessError::OutOfBounds {
                offset,
                len: buf.len() as u64,
                size: self.inner.size,
            }
        })?;
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        let st = self.check_access(offset, data.len())?;
        self.inner.hand_out(offset, data.len() as u64)?;
        // With huge folios, a write into an empty 2 MiB block allocates the block whole
        // (`pwrite` alone would allocate 4 KiB). Best effort: without it the write still
        // lands, in 4 KiB folios.
        let (first, last) = pages_of(offset, data.len() as u64);
        let _ = self.inner.allocate_blocks(first, last);
        // In flight: the pages hold a transient reference (a conversion to private answers
        // EAGAIN meanwhile), not the lock.
        let _ref = self.transient_ref(offset, data.len() as u64).map_err(|_| {
            AccessError::OutOfBounds {
                offset,
                len: data.len() as u64,
                size: self.inner.size,
            }
        })?;
        let _fork = st.into_fork_hold();
        sys::pwrite_all(self.inner.memfd.as_fd(), data, offset).map_err(|_| {
            AccessError::OutOfBounds {
                offset,
                len: data.len() as u64,
                size: self.inner.size,
            }
        })?;
        Ok(())
    }
}

/// Changing runs a file keeps room for between conversions (16 KiB).
const KEPT_RUNS: usize = 1024;

impl EmulatedGuestMemfd {
    /// `KVM_SET_MEMORY_ATTRIBUTES` on the VM that owns the file, in per-VM tracking mode
    /// ([`AttributeTracking::PerVm`]; the VMM applies the VM's request to the files behind its
    /// memslots): the same conversion as `KVM_SET_MEMORY_ATTRIBUTES2` in the other mode.
    /// ENOTTY with per-file tracking (the VM ioctl is off when in-place conversion is on).
    pub fn set_vm_attributes(&self, a: &mut kvm_memory_attributes2) -> KernelResult<()> {
        if self.inner.options.attribute_tracking != AttributeTracking::PerVm {
            return Err(Errno::ENOTTY);
        }
        self.convert(a)
    }

    /// Where the file's PRIVATE attribute is tracked.
    pub fn attribute_tracking(&self) -> AttributeTracking {
        self.inner.options.attribute_tracking
    }

    /// The conversion of `KVM_SET_MEMORY_ATTRIBUTES2` (§2.3 steps 2-8, §2.4).
    fn convert(&self, a: &mut kvm_memory_attributes2) -> KernelResult<()> {
        // A receiver converts through its owner, who runs this same sequence.
        if self.inner.owner_link.is_some() {
            return self.convert_through_owner(a);
        }
        // So does a fork (or clone) child, over the fork link.
        if !self.inner.in_own_space() {
            return self.convert_through_fork_link(a);
        }
        self.owner_only()?;
        self.validate_attributes(a)?;
        let to_private = a.attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0;
        let (first, end) = pages_of(a.offset, a.size);
        let mut st = self.write_state();
        // The runs whose attribute changes; only they are revoked or restored, which keeps
        // rollback exact for mixed ranges. None: the whole range already has the attributes,
        // and the request returns at once (§2.4 step 1). Into the file's kept list, grown
        // fallibly: ENOMEM with nothing changed, never an abort (issue 11 item 5).
        let mut changing = std::mem::take(&mut st.changing);
        let result = self.convert_locked(&mut st, a, &mut changing, first, end, to_private);
        // A long list (a fragmented range) is not kept: the next one is allocated again.
        if changing.capacity() <= KEPT_RUNS {
            st.changing = changing;
        }
        result
    }

    /// [`EmulatedGuestMemfd::convert`] under the file's state lock, with the list the
    /// changing runs go into.
    fn convert_locked(
        &self,
        st: &mut super::StateWrite<'_>,
        a: &mut kvm_memory_attributes2,
        changing: &mut Vec<(u64, u64)>,
        first: u64,
        end: u64,
        to_private: bool,
    ) -> KernelResult<()> {
        if st
            .attrs
            .try_runs_unlike(first, end, to_private, changing)
            .is_err()
        {
            a.error_offset = a.offset;
            return Err(Errno::ENOMEM);
        }
        let changing: &[(u64, u64)] = changing;
        if changing.is_empty() {
            return Ok(());
        }
        if to_private {
            // Safety check (§2.4 step 3b): an outstanding pin anywhere in the range, already
            // private pages included, fails the whole request.
            if let Some(page) = self.first_pinned(first, end) {
                a.error_offset = a.offset.max(page * PAGE_SIZE);
                return Err(Errno::EAGAIN);
            }
        }
        // The attributes are recorded past the point of no return: the nodes that needs are
        // reserved now (ENOMEM with nothing changed); the host side reserves its copy's under
        // its own lock, before it changes anything.
        if st.attrs.try_reserve().is_err() {
            a.error_offset = a.offset;
            return Err(Errno::ENOMEM);
        }
        // §2.4 step 4b: the platform takes back each present page of a range made shared.
        // Platforms without the hook do no per-page work. Run by the host side past its last
        // failure and before a host access can see the range shared (the kernel holds the
        // invalidate lock across the arch hook).
        let inner = &self.inner;
        let mut platform_to_shared = || {
            if to_private || !inner.hooks.make_shared {
                return;
            }
            if inner
                .options
                .hook_placement
                .private_filter(inner.platform.kind())
            {
                // v8 TDX: the invalidation's private filter reaches the pages that were
                // private, i.e. the changing runs.
                for &(s, e) in changing {
                    inner.make_shared_range(s / PAGE_SIZE, e / PAGE_SIZE);
                }
            } else {
                inner.make_shared_range(first, end);
            }
        };
        // Host access (§2.4 step 3a): one call to the host side ([`super::host`]).
        let host = self.host_convert(st, changing, to_private, &mut platform_to_shared);
        if let Err(e) = host {
            a.error_offset = a.offset;
            return Err(if e == Errno::EAGAIN {
                Errno::EAGAIN
            } else {
                Errno::ENOMEM
            });
        }
        // Point of no return: record the new attributes.
        st.attrs.set_range(first, end, to_private);
        // The guest's mappings of the changed pages go, as the kernel invalidates KVM's
        // (stage-2) mappings of a converted range: a guest view bound as a memslot has
        // KVM's MMU notifier zap its entries, and the guest's next access faults again.
        self.inner.guest_view.zap_changed(changing);
        // Failure markers of the changed pages go (the pages change hands).
        self.inner.clear_failure_markers(first, end);
        Ok(())
    }
}

impl EmulatedGuestMemfd {
    /// [`GuestMemfd::mmap`] of `Err(len)` bytes, or [`GuestMemfd::mmap_fixed`] at `Ok(at)`.
    fn map_placed(
        &self,
        at: Result<Placement, usize>,
        offset: u64,
        kind: MapKind,
    ) -> KernelResult<HostMapping> {
        let len = match &at {
            Ok(p) => p.len(),
            Err(len) => *len,
        };
        // The kernel's generic checks answer before guest_memfd's own (docs/series.md §2.5):
        // `sys::mmap_checks`, then for a fixed address one below `mmap_min_addr` is EPERM
        // (unprivileged) and an occupied range with MAP_FIXED_NOREPLACE EEXIST; only then
        // ENODEV without MMAP, then EINVAL for a private mapping.
        let len = sys::mmap_checks(at.as_ref().ok().map(Placement::addr), len, offset)?;
        // A fork child (of the owner or of a receiver) keeps the host mappings it inherited
        // (the owner's guard serves them through the child's userfaultfd) but makes none:
        // the userfaultfd this copy of the file knows acts on its parent's address space.
        if !self.inner.in_own_space() {
            return Err(Errno::EOPNOTSUPP);
        }
        let refused = if self.inner.flags & GUEST_MEMFD_FLAG_MMAP == 0 {
            Some(Errno::ENODEV)
        } else if kind == MapKind::Private {
            Some(Errno::EINVAL)
        } else {
            None
        };
        if let Some(errno) = refused {
            if let Ok(p) = &at {
                // The kernel's answers about the address itself (EPERM, EEXIST for a vacant
                // placement) come first: ask it with an inaccessible anonymous placeholder,
                // which replaces nothing and goes at once. An occupied range is what a
                // replacing placement expects.
                match Mmap::new_at(
                    Placement::vacant(p.addr(), len),
                    None,
                    0,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    libc::PROT_NONE,
                ) {
                    Ok(placeholder) => drop(placeholder),
                    Err(e) if e == Errno(libc::EEXIST) && p.replaces() => {}
                    Err(e) => return Err(e),
                }
            }
            return Err(errno);
        }
        // Mapped inaccessible, and made accessible only once its private pages are revoked
        // (`register_mapping`): an access at an address known in advance (a fixed one, or the
        // kernel's predictable next choice), from another thread or through
        // `process_vm_readv`, once read a private page in between.
        // Made and registered under the state lock, which holds the fork lock: a fork child
        // never inherits it unregistered (found in review: a fork between the two gave the
        // child a mapping no check saw, which it could make readable).
        let mut st = self.write_state();
        let fd = Some(self.inner.memfd.as_fd());
        let map = match at {
            // A file of huge folios: each whole 2 MiB block inside the mapping is 2 MiB-aligned
            // in memory, so the host may map it with one PMD ([`super::host`]'s released blocks).
            Err(_) if self.inner.options.folio_size == super::FolioSize::Huge => {
                Mmap::new_inaccessible_aligned(
                    fd,
                    offset,
                    len,
                    libc::MAP_SHARED,
                    super::HUGE_SIZE as usize,
                )?
            }
            Err(_) => Mmap::new_inaccessible(fd, offset, len, libc::MAP_SHARED)?,
            Ok(p) => Mmap::new_at(p, fd, offset, libc::MAP_SHARED, libc::PROT_NONE)?,
        };
        let map = Arc::new(map);
        let id = self.register_mapping(&mut st, &map, offset)?;
        drop(st);
        let registry: Arc<dyn MappingRegistry> = Arc::new(EmulatedGuestMemfd {
            inner: self.inner.clone(),
        });
        Ok(HostMapping::new(map, offset, Some((registry, id))))
    }

    /// Checks a host access and returns the shared lock that keeps it valid.
    pub(super) fn check_access(
        &self,
        offset: u64,
        len: usize,
    ) -> Result<super::StateRead<'_>, AccessError> {
        check_host_access(offset, len, self.inner.size, self.inner.flags)?;
        // A follower's attributes are a copy (a fork child's, as of the fork) or a guess (a
        // receiver's): the owner's guard is the only check that holds there.
        if self.inner.is_follower() {
            return Err(AccessError::Follower);
        }
        let st = self.read_state();
        st.attrs.check_shared(offset, len as u64)?;
        Ok(st)
    }
}
