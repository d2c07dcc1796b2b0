//! Memslots: binding guest memory ([`GuestBacking`]) at guest physical addresses, and the
//! translation of a guest physical range into pieces of the memory behind it.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, kvm_userspace_memory_region2};

use gmem::error::{Errno, KernelResult};
use gmem::file::MemslotSource;
use gmem::os::PAGE_SIZE;
use gmem::uapi::KVM_MEM_GUEST_MEMFD;

use crate::backing::GuestBacking;
use crate::{guest, Gpa, Vm, VmError};

/// A piece of a guest physical range inside one memslot: `(memory, offset in it, gpa, len)`.
pub(crate) type Segment = (Arc<dyn GuestBacking>, u64, u64, u64);

/// One binding of a file range at a guest physical address.
#[derive(Debug, Clone)]
pub struct Memslot {
    /// KVM slot number.
    pub slot: u32,
    /// First guest physical address.
    pub gpa: Gpa,
    /// Size in bytes.
    pub size: u64,
    /// The memory bound.
    pub backing: Arc<dyn GuestBacking>,
    /// Offset in the file of `gpa`.
    pub offset: u64,
}

impl Vm {
    /// Binds `[offset, offset + size)` of `file` at guest physical `gpa` (inside the data
    /// window) as a new memslot; returns its slot number.
    pub fn bind(
        &self,
        gpa: Gpa,
        file: &Arc<dyn GuestBacking>,
        offset: u64,
        size: u64,
    ) -> Result<u32, VmError> {
        let gpa = gpa.raw();
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
        if slots
            .iter()
            .any(|s| s.gpa.raw() < end && gpa < s.gpa.raw() + s.size)
            || self.vm_attrs.overlaps_anon(gpa, end)
        {
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
            gpa: Gpa(gpa),
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
    pub(crate) fn segments(&self, gpa: u64, size: u64) -> KernelResult<Vec<Segment>> {
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
                .find(|s| s.gpa.raw() <= at && at < s.gpa.raw() + s.size)
                .ok_or(Errno::EINVAL)?;
            let seg_end = end.min(s.gpa.raw() + s.size);
            out.push((
                Arc::clone(&s.backing),
                s.offset + (at - s.gpa.raw()),
                at,
                seg_end - at,
            ));
            at = seg_end;
        }
        Ok(out)
    }

    /// Translates a guest physical address to (file, offset).
    pub fn gpa_to_file(&self, gpa: Gpa) -> Option<(Arc<dyn GuestBacking>, u64)> {
        self.segments(gpa.raw(), 1)
            .ok()
            .and_then(|v| v.into_iter().next())
            .map(|(f, off, _, _)| (f, off))
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
            guest_phys_addr: slots[i].gpa.raw(),
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: deleting a slot this Vm created; no memory is handed to KVM.
        unsafe { self.vm_fd().set_user_memory_region(region) }
            .map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION (delete)"))?;
        slots.remove(i);
        Ok(())
    }
}
