//! Per-VM attribute tracking (docs/series.md §2.1): the module-parameter mode (v8
//! `kvm.gmem_in_place_conversion=0`, v7 `kvm.vm_memory_attributes=1`) in which PRIVATE is set
//! per guest frame with the VM ioctl `KVM_SET_MEMORY_ATTRIBUTES` and the guest_memfd ioctl is
//! off (ENOTTY), and memslots without a guest_memfd ([`Vm::bind_anonymous`]).
//!
//! The VM's attributes are a set of private GPA ranges (the kernel's per-VM xarray). A request
//! is also applied to the guest_memfd files behind the memslots it covers
//! ([`gmem::file::GuestMemfd::set_vm_attributes`]), whose attribute store is what the guest
//! and host paths of the emulated backend consult. A private GPA that has no guest_memfd (no
//! memslot, or an anonymous one) cannot be mapped: as KVM exits with
//! `KVM_EXIT_MEMORY_FAULT(PRIVATE)` for it, the emulated VM keeps such a memslot out of KVM
//! while any page of it is private, and turns the MMIO exit of an access to a private GPA
//! into [`Stop::MemoryFault`] with the page's GPA and size.

use std::collections::BTreeMap;
use std::sync::Mutex;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

use gmem::error::{Errno, KernelResult};
use gmem::os::{Mmap, PAGE_SIZE};
use gmem::uapi::{
    kvm_memory_attributes2, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE,
};
use gmem::AttributeTracking;

use crate::{guest, Gpa, Stop, Vm, VmError};

/// KVM slot numbers of anonymous memslots start here (file memslots count up from 1).
const ANON_SLOT_BASE: u32 = 0x4000;

/// A memslot of anonymous memory (no guest_memfd).
#[derive(Debug)]
struct AnonSlot {
    slot: u32,
    gpa: u64,
    size: u64,
    map: Mmap,
    /// Whether the region is registered with KVM (not while a page of it is private).
    in_kvm: bool,
}

/// A VM's attribute-tracking mode, its private GPA ranges and its anonymous memslots.
#[derive(Debug, Default)]
pub(crate) struct VmAttributes {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    tracking: AttributeTracking,
    /// Private GPA ranges, start → end, disjoint and merged.
    private: BTreeMap<u64, u64>,
    anon: Vec<AnonSlot>,
}

impl Inner {
    fn set_range(&mut self, start: u64, end: u64, private: bool) {
        // Cut [start, end) out of every overlapping range, then add it back if private.
        let overlapping: Vec<(u64, u64)> = self
            .private
            .range(..end)
            .filter(|(_, &e)| e > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        let (mut lo, mut hi) = (start, end);
        for (s, e) in overlapping {
            self.private.remove(&s);
            if private {
                lo = lo.min(s);
                hi = hi.max(e);
            } else {
                if s < start {
                    self.private.insert(s, start);
                }
                if e > end {
                    self.private.insert(end, e);
                }
            }
        }
        if private {
            // Merge with adjacent ranges.
            if let Some((&s, &e)) = self.private.range(..lo).next_back() {
                if e == lo {
                    self.private.remove(&s);
                    lo = s;
                }
            }
            if let Some(e) = self.private.remove(&hi) {
                hi = e;
            }
            self.private.insert(lo, hi);
        }
    }

    fn any_private(&self, start: u64, end: u64) -> bool {
        self.private
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > start)
            || self.private.range(start..end).next().is_some()
    }

    fn region(s: &AnonSlot, present: bool) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: s.slot,
            flags: 0,
            guest_phys_addr: s.gpa,
            memory_size: if present { s.size } else { 0 },
            userspace_addr: if present { s.map.as_ptr() as u64 } else { 0 },
        }
    }

    /// Registers or deletes each anonymous memslot as its pages' attributes require.
    fn sync_anon(&mut self, fd: &VmFd) -> Result<(), Errno> {
        for i in 0..self.anon.len() {
            let s = &self.anon[i];
            let want = !self.any_private(s.gpa, s.gpa + s.size);
            if want != s.in_kvm {
                // SAFETY: the mapping is owned by the slot entry, which deletes the region
                // before it is dropped (`delete_all`, and here when it goes private).
                unsafe { fd.set_user_memory_region(Self::region(s, want)) }
                    .map_err(|e| Errno(e.errno()))?;
                self.anon[i].in_kvm = want;
            }
        }
        Ok(())
    }
}

impl VmAttributes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `[gpa, end)` overlaps an anonymous memslot.
    pub(crate) fn overlaps_anon(&self, gpa: u64, end: u64) -> bool {
        self.lock()
            .anon
            .iter()
            .any(|s| s.gpa < end && gpa < s.gpa + s.size)
    }

    /// Deletes every anonymous memslot from KVM (before the mappings go).
    pub(crate) fn delete_all(&self, fd: &VmFd) {
        let mut inner = self.lock();
        for s in inner.anon.drain(..) {
            if s.in_kvm {
                // SAFETY: deleting a slot this Vm created; no memory is handed to KVM.
                let _ = unsafe { fd.set_user_memory_region(Inner::region(&s, false)) };
            }
        }
    }

    /// The stop an MMIO exit at `gpa` really is: `KVM_EXIT_MEMORY_FAULT(PRIVATE)` where the
    /// VM tracks attributes and `gpa` is private (it has no guest_memfd, or KVM would have
    /// mapped it).
    pub(crate) fn private_fault(&self, gpa: u64) -> Option<Stop> {
        let inner = self.lock();
        (inner.tracking == AttributeTracking::PerVm && inner.any_private(gpa, gpa + 1)).then_some(
            Stop::MemoryFault {
                flags: KVM_MEMORY_EXIT_FLAG_PRIVATE,
                gpa: gpa & !(PAGE_SIZE - 1),
                size: PAGE_SIZE,
            },
        )
    }
}

impl Vm {
    /// Selects where the VM tracks PRIVATE: per guest_memfd (the default: in-place
    /// conversion) or per VM ([`AttributeTracking::PerVm`], the module-parameter mode, which
    /// the kernel fixes at load time). Only before anything is bound; the files bound in a
    /// per-VM VM must be created with [`AttributeTracking::PerVm`] too.
    pub fn set_attribute_tracking(&self, tracking: AttributeTracking) -> Result<(), VmError> {
        let mut inner = self.vm_attrs.lock();
        let bound = !inner.anon.is_empty()
            || !self
                .slots
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_empty();
        if bound {
            return Err(VmError::Binding {
                gpa: 0,
                size: 0,
                offset: 0,
                why: "the attribute-tracking mode is chosen before any memslot is bound".into(),
            });
        }
        inner.tracking = tracking;
        Ok(())
    }

    /// Where the VM tracks PRIVATE.
    pub fn attribute_tracking(&self) -> AttributeTracking {
        self.vm_attrs.lock().tracking
    }

    /// `KVM_SET_MEMORY_ATTRIBUTES(gpa, size, attributes)` on the VM: ENOTTY unless the VM
    /// tracks attributes ([`AttributeTracking::PerVm`]); EINVAL for an unaligned or empty
    /// range or a bit other than PRIVATE. The range's guest_memfd memslots are converted
    /// (their files' errors are returned as they are, ranges done before kept); the rest is
    /// recorded for the GPAs without a guest_memfd.
    pub fn set_memory_attributes(&self, gpa: u64, size: u64, attributes: u64) -> KernelResult<()> {
        if self.attribute_tracking() != AttributeTracking::PerVm {
            return Err(Errno::ENOTTY);
        }
        let end = gpa.checked_add(size).ok_or(Errno::EINVAL)?;
        if size == 0
            || gpa % PAGE_SIZE != 0
            || size % PAGE_SIZE != 0
            || attributes & !KVM_MEMORY_ATTRIBUTE_PRIVATE != 0
        {
            return Err(Errno::EINVAL);
        }
        let slots = self.memslots();
        for s in &slots {
            let (lo, hi) = (gpa.max(s.gpa.raw()), end.min(s.gpa.raw() + s.size));
            if lo >= hi {
                continue;
            }
            let file = s.backing.guest_memfd().ok_or(Errno::EINVAL)?;
            let mut a =
                kvm_memory_attributes2::new(s.offset + (lo - s.gpa.raw()), hi - lo, attributes);
            file.set_vm_attributes(&mut a)?;
        }
        let mut inner = self.vm_attrs.lock();
        inner.set_range(gpa, end, attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0);
        inner.sync_anon(self.vm_fd())
    }

    /// Binds `size` bytes of anonymous memory (zero-filled, not a guest_memfd) at `gpa`
    /// inside the data window as a new memslot, as the selftests' `VM_MEM_SRC_ANONYMOUS`
    /// region without `KVM_MEM_GUEST_MEMFD`; returns its slot number. Deleted with the VM.
    pub fn bind_anonymous(&self, gpa: Gpa, size: u64) -> Result<u32, VmError> {
        let gpa = gpa.raw();
        let bad = |why: String| VmError::Binding {
            gpa,
            size,
            offset: 0,
            why,
        };
        if gpa % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 || size == 0 {
            return Err(bad("not page-aligned or empty".into()));
        }
        let end = gpa
            .checked_add(size)
            .ok_or_else(|| bad("overflows".into()))?;
        if gpa < guest::DATA_GPA || end > guest::DATA_GPA + guest::MAX_DATA_SIZE {
            return Err(bad("outside the data window".into()));
        }
        let slots = self
            .slots
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut inner = self.vm_attrs.lock();
        if slots
            .iter()
            .any(|s| s.gpa.raw() < end && gpa < s.gpa.raw() + s.size)
            || inner
                .anon
                .iter()
                .any(|s| s.gpa < end && gpa < s.gpa + s.size)
        {
            return Err(bad("overlaps an existing binding".into()));
        }
        let len = usize::try_from(size).map_err(|_| bad("too large".into()))?;
        let map = Mmap::new(
            None,
            0,
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        )
        .map_err(|errno| VmError::Kvm {
            op: "mmap of anonymous memslot memory",
            errno,
        })?;
        // As system memory: no copy-on-write under KVM after a fork.
        map.madvise(0, len, libc::MADV_DONTFORK)
            .map_err(|errno| VmError::Kvm {
                op: "madvise(MADV_DONTFORK) of anonymous memslot memory",
                errno,
            })?;
        let slot = ANON_SLOT_BASE
            + inner
                .anon
                .iter()
                .map(|s| s.slot - ANON_SLOT_BASE + 1)
                .max()
                .unwrap_or(0);
        let entry = AnonSlot {
            slot,
            gpa,
            size,
            map,
            in_kvm: false,
        };
        inner.anon.push(entry);
        if let Err(errno) = inner.sync_anon(self.vm_fd()) {
            inner.anon.pop();
            return Err(VmError::Kvm {
                op: "KVM_SET_USER_MEMORY_REGION (anonymous memslot)",
                errno,
            });
        }
        Ok(slot)
    }
}
