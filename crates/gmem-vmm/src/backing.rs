//! The guest memory a [`crate::Vm`] binds: one trait, [`GuestBacking`], for everything that can
//! stand behind a range of guest physical memory.
//!
//! - [`InPlace`]: a guest_memfd file (emulated or kernel) with the VMM's shared mapping of it.
//!   Pages change attribute in place and keep their contents; private pages raise SIGBUS in
//!   the VMM's mapping, so its host accessors check the attribute first.
//! - [`crate::two_backing::TwoBacking`]: the layout every production VMM ships today, a
//!   private store and a separate shared memfd, the inactive copy discarded on conversion.
//!
//! "Guest" accesses go through the memory the guest sees for each page's attribute; "host"
//! accesses go through the VMM's mapping and are refused with a typed error where the page
//! is private ([`AccessError::Private`]). Everything a memslot, a conversion request, the
//! workload or the benchmark needs dispatches through this trait.

use std::fmt;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use gmem::error::{AccessError, ConversionError, KernelResult};
use gmem::file::{BackendKind, GuestMemfd, MemslotSource, PinGuard};
use gmem::mapping::{HostMapping, MapKind};
use gmem::uapi::{
    kvm_memory_attributes2, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
};
use gmem::{EmulatedGuestMemfd, EmulatedOptions};

/// `(offset, len, attributes)`: a run of pages with equal attributes.
pub type AttributeRun = (u64, u64, u64);

/// Which layout a [`GuestBacking`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackingKind {
    /// One guest_memfd; pages change attribute in place and keep their contents.
    InPlace(BackendKind),
    /// A private store and a separate shared memfd; the inactive copy is discarded.
    TwoBacking {
        /// Whether contents are copied across before the discard (pKVM, software-protected
        /// guests), or lost (SNP/TDX-style destructive conversion).
        preserve_content: bool,
    },
}

impl BackingKind {
    /// Every layout `gmem bench` compares, in-place (emulated) first: the order it measures
    /// and reports them in.
    pub const ALL: [BackingKind; 3] = [
        BackingKind::InPlace(BackendKind::Emulated),
        BackingKind::TwoBacking {
            preserve_content: false,
        },
        BackingKind::TwoBacking {
            preserve_content: true,
        },
    ];

    /// `in-place`, `two-backing` or `two-backing+copy`: the layout's name in every output.
    pub fn name(self) -> &'static str {
        match self {
            BackingKind::InPlace(_) => "in-place",
            BackingKind::TwoBacking {
                preserve_content: false,
            } => "two-backing",
            BackingKind::TwoBacking {
                preserve_content: true,
            } => "two-backing+copy",
        }
    }

    /// Whether a page's contents survive a conversion in this layout (before any platform
    /// rule applies).
    pub fn preserves_content(self) -> bool {
        match self {
            BackingKind::InPlace(_) => true,
            BackingKind::TwoBacking { preserve_content } => preserve_content,
        }
    }
}

impl fmt::Display for BackingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a layout's memory costs: backing-file pages and its own metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footprint {
    /// Bytes of file pages allocated in every backing file (`fstat` `st_blocks` × 512).
    pub file_bytes: u64,
    /// Bytes of attribute metadata.
    pub metadata_bytes: u64,
}

impl Footprint {
    /// The total.
    pub fn total(&self) -> u64 {
        self.file_bytes + self.metadata_bytes
    }
}

/// Guest memory: what stands behind a memslot's range, whatever its layout.
pub trait GuestBacking: Send + Sync + fmt::Debug {
    /// Which layout this is.
    fn kind(&self) -> BackingKind;

    /// The guest memory size in bytes.
    fn size(&self) -> u64;

    /// The guest_memfd behind this memory, if it is one (pins, conformance cases); `None`
    /// for the two-backing layout, which is not a guest_memfd.
    fn guest_memfd(&self) -> Option<&dyn GuestMemfd>;

    /// How a memslot reaches this memory.
    fn memslot_source(&self) -> KernelResult<MemslotSource<'_>>;

    /// `KVM_SET_MEMORY_ATTRIBUTES2` semantics: on failure `attrs.error_offset` is written and
    /// nothing changed.
    fn set_attributes(&self, attrs: &mut kvm_memory_attributes2) -> KernelResult<()>;

    /// The runs of equal attributes covering `[offset, offset + len)`.
    fn attribute_runs(&self, offset: u64, len: u64) -> KernelResult<Vec<AttributeRun>>;

    /// Whether the page at `offset` is private (past the end: shared, as a GFN with no file).
    fn is_private(&self, offset: u64) -> bool;

    /// `fallocate(KEEP_SIZE)` (in the two-backing layout: of each page's active side).
    fn allocate(&self, offset: u64, len: u64) -> KernelResult<()>;

    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)` (in the two-backing layout: of both sides);
    /// attributes are kept.
    fn punch_hole(&self, offset: u64, len: u64) -> KernelResult<()>;

    /// A long-term pin (EFAULT on private pages); ENOTTY where the layout has no pins that
    /// block conversion.
    fn pin(&self, offset: u64, len: u64) -> KernelResult<PinGuard>;

    /// A guest read: each page through the memory the guest sees for its attribute.
    fn guest_read(&self, offset: u64, buf: &mut [u8]) -> KernelResult<()>;

    /// A guest write, as [`GuestBacking::guest_read`].
    fn guest_write(&self, offset: u64, data: &[u8]) -> KernelResult<()>;

    /// The guest writes `value` to the first byte of every page of `[offset, offset + len)`
    /// (faulting pages in as needed).
    fn guest_touch(&self, offset: u64, len: u64, value: u8) -> KernelResult<()>;

    /// A host read through the VMM's mapping; private pages are refused.
    fn host_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), AccessError>;

    /// A host write through the VMM's mapping; private pages are refused.
    fn host_write(&self, offset: u64, data: &[u8]) -> Result<(), AccessError>;

    /// The host writes `value` to the first byte of every page of `[offset, offset + len)`
    /// through its mapping (faulting pages in as needed); private pages are refused.
    fn host_touch(&self, offset: u64, len: u64, value: u8) -> Result<(), AccessError>;

    /// What the memory costs now.
    fn footprint(&self) -> KernelResult<Footprint>;

    /// Checks, the hard way, that the host cannot reach the page at `offset` (which should be
    /// private): the VMM's accessor refuses it, and then in place a read of a host mapping
    /// raises SIGBUS (in a probe child), in the two-backing layout the shared memfd holds no
    /// copy of it.
    fn check_host_revoked(&self, offset: u64) -> Result<(), HostReachable>;

    /// Converts `[offset, offset + len)` to private.
    fn set_private(&self, offset: u64, len: u64) -> Result<(), ConversionError> {
        convert(self, offset, len, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    }

    /// Converts `[offset, offset + len)` to shared.
    fn set_shared(&self, offset: u64, len: u64) -> Result<(), ConversionError> {
        convert(self, offset, len, 0)
    }
}

fn convert<B: GuestBacking + ?Sized>(
    b: &B,
    offset: u64,
    len: u64,
    attributes: u64,
) -> Result<(), ConversionError> {
    let mut a = kvm_memory_attributes2::new(offset, len, attributes);
    b.set_attributes(&mut a).map_err(|errno| ConversionError {
        errno,
        error_offset: a.error_offset,
    })
}

/// How the host could still reach a page that should be private
/// ([`GuestBacking::check_host_revoked`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostReachable {
    /// The VMM's accessor did not refuse the page.
    #[error("was not refused to the host ({0})")]
    NotRefused(String),
    /// A host mapping read the page without SIGBUS.
    #[error("did not SIGBUS from the host mapping ({0})")]
    NoSigbus(String),
    /// The shared memfd still holds a copy of the page (two-backing layout).
    #[error("still has a shared copy")]
    SharedCopy,
    /// The check itself failed.
    #[error("could not be checked: {0}")]
    Unchecked(gmem::Errno),
}

/// The first half of every layout's [`GuestBacking::check_host_revoked`]: the accessor refuses
/// the page at `offset`, naming it.
pub(crate) fn check_refused<B: GuestBacking + ?Sized>(
    b: &B,
    offset: u64,
) -> Result<(), HostReachable> {
    let mut byte = [0u8; 1];
    match b.host_read(offset, &mut byte) {
        Err(AccessError::Private { offset: o }) if o == offset => Ok(()),
        other => Err(HostReachable::NotRefused(format!("{other:?}"))),
    }
}

/// EFAULT-style bounds check shared by the layouts' accessors.
pub(crate) fn check_bounds(offset: u64, len: u64, size: u64) -> Result<(), AccessError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(AccessError::OutOfBounds { offset, len, size }),
    }
}

/// In-place conversion: one guest_memfd file (emulated or kernel) and the VMM's shared
/// mapping of it, in which private pages raise SIGBUS. The guest reaches every page through
/// the file ([`GuestMemfd::guest_read`], or a vCPU through the memslot).
///
/// A lock orders conversions and punches (exclusive) against guest and host accesses
/// (shared), so a host access checked as shared cannot meet a page revoked under it.
pub struct InPlace {
    file: Arc<dyn GuestMemfd>,
    host: Option<HostMapping>,
    lock: RwLock<()>,
}

impl fmt::Debug for InPlace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InPlace")
            .field("file", &self.file)
            .field("host", &self.host)
            .finish()
    }
}

impl InPlace {
    /// `file` with the VMM's shared mapping of the whole file (none when the file was created
    /// without `GUEST_MEMFD_FLAG_MMAP`: host accesses are then refused).
    pub fn new(file: Arc<dyn GuestMemfd>) -> KernelResult<Self> {
        let host = if file.mmappable() {
            Some(file.mmap_all()?)
        } else {
            None
        };
        Ok(InPlace {
            file,
            host,
            lock: RwLock::new(()),
        })
    }

    /// A new emulated file of `size` bytes, all shared or all private, mappable, with its
    /// guest view made at once so that every conversion pays the guest view's invalidation
    /// (the stand-in for KVM's stage-2 invalidation).
    pub fn emulated(size: u64, private: bool, options: EmulatedOptions) -> KernelResult<Self> {
        let flags = if private {
            GUEST_MEMFD_FLAG_MMAP
        } else {
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
        };
        let file = EmulatedGuestMemfd::create_with(size, flags, options)?;
        file.create_guest_view()?;
        Self::new(Arc::new(file))
    }

    /// The file.
    pub fn file(&self) -> &Arc<dyn GuestMemfd> {
        &self.file
    }

    /// The VMM's host mapping of the whole file, if the file is mappable.
    pub fn host_mapping(&self) -> Option<&HostMapping> {
        self.host.as_ref()
    }

    fn read(&self) -> RwLockReadGuard<'_, ()> {
        self.lock
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The host mapping and the offset as an index into it, once `[offset, +len)` is checked
    /// in bounds and entirely shared.
    fn check_host(&self, offset: u64, len: u64) -> Result<(&HostMapping, usize), AccessError> {
        let size = self.file.size();
        let oob = AccessError::OutOfBounds { offset, len, size };
        check_bounds(offset, len, size)?;
        let host = self.host.as_ref().ok_or_else(|| AccessError::NotMappable {
            flags: gmem::uapi::flag_names(self.file.flags()),
        })?;
        if len != 0 {
            let runs = self
                .file
                .attribute_runs(offset, len)
                .map_err(|_| oob.clone())?;
            if let Some(&(s, _, _)) = runs.iter().find(|r| r.2 != 0) {
                return Err(AccessError::Private {
                    offset: s.max(offset),
                });
            }
        }
        let off = usize::try_from(offset).map_err(|_| oob)?;
        Ok((host, off))
    }
}

impl GuestBacking for InPlace {
    fn kind(&self) -> BackingKind {
        BackingKind::InPlace(self.file.backend())
    }

    fn size(&self) -> u64 {
        self.file.size()
    }

    fn guest_memfd(&self) -> Option<&dyn GuestMemfd> {
        Some(self.file.as_ref())
    }

    fn memslot_source(&self) -> KernelResult<MemslotSource<'_>> {
        self.file.memslot_source()
    }

    fn set_attributes(&self, attrs: &mut kvm_memory_attributes2) -> KernelResult<()> {
        let _g = self.write();
        self.file.set_attributes(attrs)
    }

    fn attribute_runs(&self, offset: u64, len: u64) -> KernelResult<Vec<AttributeRun>> {
        self.file.attribute_runs(offset, len)
    }

    fn is_private(&self, offset: u64) -> bool {
        self.file.attributes(offset).is_ok_and(|a| a != 0)
    }

    fn allocate(&self, offset: u64, len: u64) -> KernelResult<()> {
        self.file.allocate(offset, len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> KernelResult<()> {
        let _g = self.write();
        self.file.punch_hole(offset, len)
    }

    fn pin(&self, offset: u64, len: u64) -> KernelResult<PinGuard> {
        self.file.pin(offset, len)
    }

    fn guest_read(&self, offset: u64, buf: &mut [u8]) -> KernelResult<()> {
        let _g = self.read();
        self.file.guest_read(offset, buf)
    }

    fn guest_write(&self, offset: u64, data: &[u8]) -> KernelResult<()> {
        let _g = self.read();
        self.file.guest_write(offset, data)
    }

    fn guest_touch(&self, offset: u64, len: u64, value: u8) -> KernelResult<()> {
        let _g = self.read();
        self.file.guest_touch(offset, len, value)
    }

    fn host_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let _g = self.read();
        let (host, off) = self.check_host(offset, buf.len() as u64)?;
        // Checked shared under the lock: no SIGBUS, and the range is inside the mapping.
        host.read_volatile(off, buf)
            .map_err(|_| self.oob(offset, buf.len()))
    }

    fn host_write(&self, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        let _g = self.read();
        let (host, off) = self.check_host(offset, data.len() as u64)?;
        host.write_volatile(off, data)
            .map_err(|_| self.oob(offset, data.len()))
    }

    fn host_touch(&self, offset: u64, len: u64, value: u8) -> Result<(), AccessError> {
        let _g = self.read();
        let (host, off) = self.check_host(offset, len)?;
        let n = usize::try_from(len).map_err(|_| self.oob(offset, usize::MAX))?;
        host.touch_pages(off, n, value)
            .map_err(|_| self.oob(offset, n))
    }

    fn check_host_revoked(&self, offset: u64) -> Result<(), HostReachable> {
        check_refused(self, offset)?;
        let page = offset - offset % gmem::os::PAGE_SIZE;
        let map = self
            .file
            .mmap(page, gmem::os::PAGE_SIZE as usize, MapKind::Shared)
            .map_err(HostReachable::Unchecked)?;
        match map.probe_read((offset - page) as usize, 1) {
            Ok(p) if p.is_sigbus() => Ok(()),
            other => Err(HostReachable::NoSigbus(format!("{other:?}"))),
        }
    }

    fn footprint(&self) -> KernelResult<Footprint> {
        Ok(Footprint {
            file_bytes: self.file.allocated_bytes()?,
            metadata_bytes: self.file.metadata_bytes(),
        })
    }
}

impl InPlace {
    fn oob(&self, offset: u64, len: usize) -> AccessError {
        AccessError::OutOfBounds {
            offset,
            len: len as u64,
            size: self.file.size(),
        }
    }
}

/// A guest_memfd file as guest memory, with the VMM's mapping of it.
pub fn in_place(file: Arc<dyn GuestMemfd>) -> KernelResult<Arc<dyn GuestBacking>> {
    Ok(Arc::new(InPlace::new(file)?))
}
