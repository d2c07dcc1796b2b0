//! Errors: what an accessor reports for a private page (inside vm-memory's own error type), a
//! region that cannot be built, a conversion that failed.

use std::io;

use gmem::error::Errno;
use vm_memory::GuestMemoryError;

/// The access touched a private page: host access needs it shared. Carried inside
/// vm-memory's [`GuestMemoryError::IOError`] (kind `PermissionDenied`), so device code sees
/// vm-memory's error type and can still get the address back with [`private_address`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "guest physical address {gpa:#x} is private (guest_memfd): host access of {len} bytes refused"
)]
pub struct PrivateMemory {
    /// The first private byte the access would have touched (page-aligned, or the access's
    /// start if it began inside the page).
    pub gpa: u64,
    /// Length of the refused access.
    pub len: usize,
}

// Cold and out of line: building the boxed `io::Error` inline makes the accessors' slice
// iterator too large for the compiler to inline vm-memory's `Peekable` around it.
#[cold]
#[inline(never)]
pub(crate) fn private_error(gpa: u64, len: usize) -> GuestMemoryError {
    GuestMemoryError::IOError(io::Error::new(
        io::ErrorKind::PermissionDenied,
        PrivateMemory { gpa, len },
    ))
}

/// The private address a vm-memory error names, if it is a refusal of private memory.
pub fn private_address(e: &GuestMemoryError) -> Option<u64> {
    match e {
        GuestMemoryError::IOError(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<PrivateMemory>())
            .map(|p| p.gpa),
        _ => None,
    }
}

/// A region that cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// Bad geometry or file.
    #[error("region [{gpa:#x}, +{len:#x}) at file offset {file_offset:#x}: {why}")]
    Invalid {
        /// Guest physical address.
        gpa: u64,
        /// Length.
        len: u64,
        /// Offset in the file.
        file_offset: u64,
        /// What is wrong.
        why: String,
    },
    /// A gmem call failed.
    #[error("{op} failed: {errno}")]
    Kernel {
        /// The operation.
        op: &'static str,
        /// Its errno.
        errno: Errno,
    },
    /// vm-memory refused the collection (overlap).
    #[error("vm-memory refused the regions: {0}")]
    Collection(#[from] vm_memory::GuestRegionCollectionError),
}

/// A conversion that did not happen (nothing changed: pieces already converted were put
/// back and every listener told).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// Unaligned, empty, overflowing, or covering no guest memory region at all (EINVAL).
    #[error("conversion [{gpa:#x}, +{size:#x}): {why} (EINVAL)")]
    Invalid {
        /// Requested start.
        gpa: u64,
        /// Requested size.
        size: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// A page is referenced (an in-flight access, a held guard or slice, a pin): EAGAIN at
    /// `error_gpa`, as `KVM_SET_MEMORY_ATTRIBUTES2` reports it.
    #[error("page at {error_gpa:#x} is in use (EAGAIN); retry after the access ends")]
    Busy {
        /// `error_offset` as a guest physical address.
        error_gpa: u64,
    },
    /// A conversion listener refused.
    #[error("listener {listener} refused the conversion of [{gpa:#x}, +{len:#x}): {why}")]
    Listener {
        /// The listener's name.
        listener: String,
        /// The run it was told of.
        gpa: u64,
        /// Its length.
        len: u64,
        /// Its reason.
        why: String,
    },
    /// The file refused (any other errno; `error_gpa` for ENOMEM).
    #[error("KVM_SET_MEMORY_ATTRIBUTES2 failed: {errno}{}", error_gpa.map(|g| format!(" at {g:#x}")).unwrap_or_default())]
    Kernel {
        /// The errno.
        errno: Errno,
        /// `error_offset` as a guest physical address, when the kernel sets it.
        error_gpa: Option<u64>,
    },
}

impl ConvertError {
    /// The errno a VMM answers the guest with (`KVM_HC_MAP_GPA_RANGE`'s return value).
    pub fn errno(&self) -> Errno {
        match self {
            ConvertError::Invalid { .. } => Errno::EINVAL,
            ConvertError::Busy { .. } => Errno::EAGAIN,
            ConvertError::Listener { .. } => Errno(libc::EIO),
            ConvertError::Kernel { errno, .. } => *errno,
        }
    }
}
