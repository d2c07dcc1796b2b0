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
use crate::{Gpa, Vm};

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
    pub gpa: Gpa,
    /// Length in bytes (a non-zero multiple of the page size).
    pub size: u64,
    /// Private (true) or shared (false).
    pub to_private: bool,
}

impl ConvertRequest {
    /// Decodes `KVM_HC_MAP_GPA_RANGE(gpa, npages, attrs)` (docs/series.md §1.5): `npages` counts
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
            gpa: Gpa(gpa),
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
            gpa: Gpa(gpa_aligned),
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
        if req.gpa.raw() % PAGE_SIZE != 0 || req.size % PAGE_SIZE != 0 || req.size == 0 {
            return Err(Errno::EINVAL);
        }
        let handler = self
            .conversion_handler
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(h) = handler {
            return h(req, fallocate);
        }
        let segs = self.segments(req.gpa.raw(), req.size)?;
        let pieces: Vec<ConvertPiece<Arc<dyn GuestBacking>>> = segs
            .iter()
            .map(|(file, offset, gpa, len)| ConvertPiece {
                target: Arc::clone(file),
                offset: *offset,
                gpa: Gpa(*gpa),
                len: *len,
            })
            .collect();
        convert_pieces(&pieces, req.to_private, &mut |gpa, len| {
            let dropped = self.drop_pins(gpa.raw(), len) > 0;
            if dropped {
                self.counters.eagain_retries.fetch_add(1, Ordering::Relaxed);
            }
            dropped
        })
        .map_err(|f| f.errno)?;
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

    /// Routes every conversion request this VM receives (`KVM_HC_MAP_GPA_RANGE`,
    /// `KVM_EXIT_MEMORY_FAULT`, the port request, [`Vm::convert`]) to `handler` instead of
    /// converting the memslots' memory itself, once the request is checked aligned and
    /// non-empty; `None` restores the built-in conversion. For a VMM that owns its memory
    /// elsewhere (e.g. `gmem-vm-memory`'s guest memory, which must see every conversion).
    pub fn set_conversion_handler(&self, handler: Option<ConversionHandler>) {
        *self
            .conversion_handler
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = handler;
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
    pub fn punch_hole(&self, gpa: Gpa, size: u64) -> KernelResult<()> {
        let gpa = gpa.raw();
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
    pub fn pin(&self, gpa: Gpa, len: u64) -> KernelResult<()> {
        let gpa = gpa.raw();
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
    /// default, QEMU's and Cloud Hypervisor's policy) or reported as [`crate::vcpu::Stop::MemoryFault`].
    pub fn set_memory_fault_conversion(&self, convert: bool) {
        self.memory_fault_conversion
            .store(convert, Ordering::SeqCst);
    }

    pub(crate) fn memory_fault_conversion(&self) -> bool {
        self.memory_fault_conversion.load(Ordering::SeqCst)
    }
}

/// A conversion handler ([`Vm::set_conversion_handler`]): `(request, fallocate)`.
pub type ConversionHandler = Arc<dyn Fn(ConvertRequest, bool) -> KernelResult<()> + Send + Sync>;

/// What one piece of a conversion converts: anything with `KVM_SET_MEMORY_ATTRIBUTES2`
/// semantics (on failure `error_offset` is written and nothing changed).
pub trait ConvertTarget {
    /// `KVM_SET_MEMORY_ATTRIBUTES2` on this target.
    fn set_attributes(&self, attrs: &mut kvm_memory_attributes2) -> KernelResult<()>;
    /// The runs of equal attributes covering `[offset, offset + len)`.
    fn attribute_runs(&self, offset: u64, len: u64) -> KernelResult<Vec<AttributeRun>>;
}

impl ConvertTarget for Arc<dyn GuestBacking> {
    fn set_attributes(&self, attrs: &mut kvm_memory_attributes2) -> KernelResult<()> {
        GuestBacking::set_attributes(self.as_ref(), attrs)
    }
    fn attribute_runs(&self, offset: u64, len: u64) -> KernelResult<Vec<AttributeRun>> {
        GuestBacking::attribute_runs(self.as_ref(), offset, len)
    }
}

/// One piece of a guest physical range, inside one memory: `[offset, offset + len)` of
/// `target` is guest physical `[gpa, gpa + len)`.
#[derive(Debug, Clone)]
pub struct ConvertPiece<T> {
    /// The memory converted.
    pub target: T,
    /// Offset in it.
    pub offset: u64,
    /// Guest physical address of `offset`.
    pub gpa: Gpa,
    /// Length in bytes.
    pub len: u64,
}

/// Why [`convert_pieces`] failed: the errno, and for EAGAIN/ENOMEM the guest physical address
/// `error_offset` named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvertFailure {
    /// The failing piece's errno.
    pub errno: Errno,
    /// `error_offset` of the failing piece as a guest physical address (EAGAIN, ENOMEM).
    pub error_gpa: Option<Gpa>,
}

/// Converts every piece, in order, to private or shared, with the VMM's policy (shared by
/// [`Vm::convert`] and other guest memories): a piece failing with EAGAIN is retried once if
/// `drop_own_refs(gpa, len)` says it dropped references the VMM itself held on the piece; if
/// a piece still fails, the pieces already converted get back the attributes they had before
/// (best effort) and the failure is returned.
pub fn convert_pieces<T: ConvertTarget>(
    pieces: &[ConvertPiece<T>],
    to_private: bool,
    drop_own_refs: &mut dyn FnMut(Gpa, u64) -> bool,
) -> Result<(), ConvertFailure> {
    let attributes = if to_private {
        KVM_MEMORY_ATTRIBUTE_PRIVATE
    } else {
        0
    };
    let fail = |errno| ConvertFailure {
        errno,
        error_gpa: None,
    };
    // The attributes before, to restore them if a later piece fails.
    let mut before: Vec<(&T, Vec<AttributeRun>)> = Vec::new();
    let rollback = |before: &[(&T, Vec<AttributeRun>)]| {
        for (target, runs) in before.iter().rev() {
            restore_runs(*target, runs);
        }
    };
    for p in pieces {
        let runs = match p.target.attribute_runs(p.offset, p.len) {
            Ok(runs) => runs,
            Err(errno) => {
                rollback(&before);
                return Err(fail(errno));
            }
        };
        let mut a = kvm_memory_attributes2::new(p.offset, p.len, attributes);
        let mut r = p.target.set_attributes(&mut a);
        if r == Err(Errno::EAGAIN) && drop_own_refs(p.gpa, p.len) {
            a = kvm_memory_attributes2::new(p.offset, p.len, attributes);
            r = p.target.set_attributes(&mut a);
        }
        if let Err(errno) = r {
            rollback(&before);
            let error_gpa = (errno == Errno::EAGAIN || errno == Errno::ENOMEM)
                .then(|| p.gpa.add(a.error_offset.saturating_sub(p.offset)));
            return Err(ConvertFailure { errno, error_gpa });
        }
        before.push((&p.target, runs));
    }
    Ok(())
}

/// Puts back the attributes recorded before a conversion that failed part-way.
fn restore_runs<T: ConvertTarget>(file: &T, runs: &[AttributeRun]) {
    for &(off, len, attrs) in runs {
        let mut a = kvm_memory_attributes2::new(off, len, attrs);
        let _ = file.set_attributes(&mut a);
    }
}
