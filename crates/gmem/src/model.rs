//! Conversion models: the same conversion, guest and host entry points over gmem's in-place
//! file ([`InPlaceModel`], on [`EmulatedGuestMemfd`]) and over the two-backing model every
//! production VMM ships today ([`crate::twobacking::TwoBackingGuestMemfd`]), so that
//! `gmem bench` and workloads run unchanged on either.
//!
//! "Guest" accesses go through the memory the guest would see for the page's current
//! attribute; "host" accesses go through the VMM's ordinary mapping and fault like any access
//! to it. Both kinds of access are refused with a typed error where the model would fault
//! fatally (a private page on the host side of the in-place model).

use std::fmt;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::backend::GuestMemfd;
use crate::emulated::{EmulatedGuestMemfd, EmulatedOptions};
use crate::error::{AccessError, ConversionError, Errno, KernelResult};
use crate::mapping::HostMapping;
use crate::sys::{self, PAGE_SIZE};
use crate::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};

/// Which conversion model a [`ConversionModel`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// One file; pages change attribute in place and keep their contents.
    InPlace,
    /// A private store and a separate shared memfd; the inactive copy is discarded.
    TwoBacking {
        /// Whether contents are copied across before the discard (pKVM, software-protected
        /// guests), or lost (SNP/TDX-style destructive conversion).
        preserve_content: bool,
    },
}

impl ModelKind {
    /// Every model, in-place first: the order `gmem bench` measures and reports them in.
    pub const ALL: [ModelKind; 3] = [
        ModelKind::InPlace,
        ModelKind::TwoBacking {
            preserve_content: false,
        },
        ModelKind::TwoBacking {
            preserve_content: true,
        },
    ];

    /// `in-place`, `two-backing` or `two-backing+copy`.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::InPlace => "in-place",
            ModelKind::TwoBacking {
                preserve_content: false,
            } => "two-backing",
            ModelKind::TwoBacking {
                preserve_content: true,
            } => "two-backing+copy",
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a model's memory costs: backing-file pages and the model's own metadata.
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

/// The conversion entry points both models share.
pub trait ConversionModel: Send + Sync + fmt::Debug {
    /// Which model this is.
    fn kind(&self) -> ModelKind;

    /// The guest memory size in bytes.
    fn size(&self) -> u64;

    /// Converts `[offset, offset + len)` to private.
    fn set_private(&self, offset: u64, len: u64) -> Result<(), ConversionError>;

    /// Converts `[offset, offset + len)` to shared.
    fn set_shared(&self, offset: u64, len: u64) -> Result<(), ConversionError>;

    /// Whether the page at `offset` is private (past the end: shared, as a GFN with no file).
    fn is_private(&self, offset: u64) -> bool;

    /// A guest write: each page goes to the memory the guest sees for its attribute.
    fn guest_write(&self, offset: u64, data: &[u8]) -> KernelResult<()>;

    /// A guest read, as [`ConversionModel::guest_write`].
    fn guest_read(&self, offset: u64, buf: &mut [u8]) -> KernelResult<()>;

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

    /// Frees the memory of `[offset, offset + len)` (every copy); attributes are kept.
    fn punch_hole(&self, offset: u64, len: u64) -> KernelResult<()>;

    /// Backing pages and metadata in use now.
    fn footprint(&self) -> KernelResult<Footprint>;
}

/// Checks `[offset, offset + len)` against a file of `size` bytes for an access.
pub(crate) fn check_bounds(offset: u64, len: u64, size: u64) -> Result<(), AccessError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(AccessError::OutOfBounds { offset, len, size }),
    }
}

/// Writes `value` at the first byte of every page of `[off, off + len)` of the mapping at
/// `base`.
///
/// # Safety
/// `[base + off, base + off + len)` must lie inside a live mapping whose pages are all
/// accessible (no SIGBUS) for the duration of the call.
pub(crate) unsafe fn touch_pages(base: *mut u8, off: u64, len: u64, value: u8) {
    let mut p = off;
    while p < off + len {
        // The caller vouches for the range, which is addressable, so it fits in usize.
        #[allow(clippy::cast_possible_truncation)]
        // SAFETY: inside the caller's range; volatile so the touch is not elided.
        unsafe {
            base.add(p as usize).write_volatile(value)
        };
        p += PAGE_SIZE;
    }
}

/// gmem's in-place model: an [`EmulatedGuestMemfd`] with one host mapping of the whole file
/// (the VMM's), in which private pages raise SIGBUS. The guest reaches every page through the
/// file's guest view.
///
/// Each conversion also zaps the guest view's PTEs of the range (the emulated file does this
/// for every conversion once a guest view exists), standing for KVM's invalidation of its own
/// mappings (stage-2/shadow) that both models pay on a real host: the guest's next touch
/// re-faults the same page, as a stage-2 fault would.
///
/// A model-wide lock orders conversions (exclusive) against guest and host accesses
/// (shared), so a host access checked as shared cannot meet a page revoked under it.
pub struct InPlaceModel {
    file: EmulatedGuestMemfd,
    host: HostMapping,
    lock: RwLock<()>,
}

impl fmt::Debug for InPlaceModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InPlaceModel")
            .field("file", &self.file)
            .field("host", &self.host)
            .finish()
    }
}

impl InPlaceModel {
    /// A new guest of `size` bytes, all shared or all private, with default emulation options.
    pub fn new(size: u64, private: bool) -> KernelResult<Self> {
        Self::with_options(size, private, EmulatedOptions::default())
    }

    /// As [`InPlaceModel::new`] with these emulation options.
    pub fn with_options(size: u64, private: bool, options: EmulatedOptions) -> KernelResult<Self> {
        let flags = if private {
            GUEST_MEMFD_FLAG_MMAP
        } else {
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
        };
        let file = EmulatedGuestMemfd::create_with(size, flags, options)?;
        let host = file.mmap_all()?;
        // The guest view exists from the start, so every conversion pays its invalidation.
        file.guest_view()?;
        Ok(InPlaceModel {
            file,
            host,
            lock: RwLock::new(()),
        })
    }

    /// The file.
    pub fn file(&self) -> &EmulatedGuestMemfd {
        &self.file
    }

    /// The VMM's host mapping of the whole file.
    pub fn host_mapping(&self) -> &HostMapping {
        &self.host
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

    fn check_host(&self, offset: u64, len: u64) -> Result<(), AccessError> {
        check_bounds(offset, len, self.file.size())?;
        if len == 0 {
            return Ok(());
        }
        let runs = self
            .file
            .attribute_runs(offset, len)
            .map_err(|_| AccessError::OutOfBounds {
                offset,
                len,
                size: self.file.size(),
            })?;
        match runs.iter().find(|r| r.2 != 0) {
            Some(&(s, _, _)) => Err(AccessError::Private {
                offset: s.max(offset),
            }),
            None => Ok(()),
        }
    }
}

impl ConversionModel for InPlaceModel {
    fn kind(&self) -> ModelKind {
        ModelKind::InPlace
    }

    fn size(&self) -> u64 {
        self.file.size()
    }

    fn set_private(&self, offset: u64, len: u64) -> Result<(), ConversionError> {
        let _g = self.write();
        self.file.set_private(offset, len)
    }

    fn set_shared(&self, offset: u64, len: u64) -> Result<(), ConversionError> {
        let _g = self.write();
        self.file.set_shared(offset, len)
    }

    fn is_private(&self, offset: u64) -> bool {
        self.file.attributes(offset).is_ok_and(|a| a != 0)
    }

    fn guest_write(&self, offset: u64, data: &[u8]) -> KernelResult<()> {
        let _g = self.read();
        self.file.guest_write(offset, data)
    }

    fn guest_read(&self, offset: u64, buf: &mut [u8]) -> KernelResult<()> {
        let _g = self.read();
        self.file.guest_read(offset, buf)
    }

    fn guest_touch(&self, offset: u64, len: u64, value: u8) -> KernelResult<()> {
        check_bounds(offset, len, self.file.size()).map_err(|_| Errno::EFAULT)?;
        let _g = self.read();
        let view = self.file.guest_view()?;
        // SAFETY: in bounds (checked); the guest view maps every page of the file, private
        // or shared, and lives as long as the file.
        unsafe { touch_pages(view.as_ptr(), offset, len, value) };
        Ok(())
    }

    fn host_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let _g = self.read();
        self.check_host(offset, buf.len() as u64)?;
        let off = usize::try_from(offset).map_err(|_| AccessError::OutOfBounds {
            offset,
            len: buf.len() as u64,
            size: self.file.size(),
        })?;
        // Checked shared under the lock: no SIGBUS, and the range is inside the mapping.
        self.host
            .read_volatile(off, buf)
            .map_err(|_| AccessError::OutOfBounds {
                offset,
                len: buf.len() as u64,
                size: self.file.size(),
            })
    }

    fn host_write(&self, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        let _g = self.read();
        self.check_host(offset, data.len() as u64)?;
        let oob = AccessError::OutOfBounds {
            offset,
            len: data.len() as u64,
            size: self.file.size(),
        };
        let off = usize::try_from(offset).map_err(|_| oob.clone())?;
        self.host.write_volatile(off, data).map_err(|_| oob)
    }

    fn host_touch(&self, offset: u64, len: u64, value: u8) -> Result<(), AccessError> {
        let _g = self.read();
        self.check_host(offset, len)?;
        // SAFETY: in bounds and every page shared (checked under the model lock, which
        // conversions take exclusively), so the host mapping raises no SIGBUS.
        unsafe { touch_pages(self.host.as_ptr(), offset, len, value) };
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> KernelResult<()> {
        let _g = self.write();
        self.file.punch_hole(offset, len)
    }

    fn footprint(&self) -> KernelResult<Footprint> {
        Ok(Footprint {
            file_bytes: self.file.allocated_bytes()?,
            metadata_bytes: self.file.metadata_bytes() as u64,
        })
    }
}

/// Bytes of file pages allocated to `fd` (`st_blocks` × 512).
pub(crate) fn allocated_bytes(fd: std::os::fd::BorrowedFd<'_>) -> KernelResult<u64> {
    let st = sys::fstat(fd)?;
    Ok(u64::try_from(st.st_blocks).unwrap_or(0) * 512)
}
