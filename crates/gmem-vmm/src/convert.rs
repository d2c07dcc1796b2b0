//! Conversion requests: whatever asked for it (`KVM_HC_MAP_GPA_RANGE`, `KVM_EXIT_MEMORY_FAULT`,
//! the port request), one [`ConvertRequest`], split across the memslots it covers, retried
//! once on EAGAIN after dropping the VMM's own pins, rolled back on a later failure.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use gmem::error::{Errno, KernelResult};
use gmem::file::PinGuard;
use gmem::os::PAGE_SIZE;
use gmem::uapi::{
    kvm_memory_attributes2, KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MAP_GPA_RANGE_PAGE_SZ_1G,
    KVM_MAP_GPA_RANGE_PAGE_SZ_2M, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE,
};

use crate::backing::{AttributeRun, GuestBacking};
use crate::Vm;

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

pub(crate) struct VmmPin {
    pub(crate) gpa: u64,
    pub(crate) len: u64,
    pub(crate) _guard: PinGuard,
}

impl Vm {
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

    /// Whether `KVM_EXIT_MEMORY_FAULT` is served by converting to the access's type (the
    /// default, QEMU's and Cloud Hypervisor's policy) or reported as [`Stop::MemoryFault`].
    pub fn set_memory_fault_conversion(&self, convert: bool) {
        self.memory_fault_conversion
            .store(convert, Ordering::SeqCst);
    }

    pub(crate) fn memory_fault_conversion(&self) -> bool {
        self.memory_fault_conversion.load(Ordering::SeqCst)
    }
}

/// Puts back the attributes recorded before a conversion that failed part-way.
fn restore_runs(file: &dyn GuestBacking, runs: &[AttributeRun]) {
    for &(off, len, attrs) in runs {
        let mut a = kvm_memory_attributes2::new(off, len, attrs);
        let _ = file.set_attributes(&mut a);
    }
}
