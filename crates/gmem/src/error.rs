//! Errors.
//!
//! Calls that mirror a kernel interface (create, `set_attributes`, fallocate, mmap, pin) fail
//! with the kernel's errno, as [`Errno`], so that a result can be compared with the real
//! kernel's case by case. gmem-only APIs (safe accessors, configuration) have typed errors
//! whose messages name the bad value and the allowed ones.

use std::fmt;

/// A Linux errno value, as the kernel would return it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// Operation not permitted.
    pub const EPERM: Errno = Errno(libc::EPERM);
    /// No such file or directory.
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    /// Interrupted system call.
    pub const EINTR: Errno = Errno(libc::EINTR);
    /// Try again.
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    /// Out of memory.
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);
    /// Bad address.
    pub const EFAULT: Errno = Errno(libc::EFAULT);
    /// File exists.
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    /// No such device.
    pub const ENODEV: Errno = Errno(libc::ENODEV);
    /// Invalid argument.
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    /// Inappropriate ioctl for device.
    pub const ENOTTY: Errno = Errno(libc::ENOTTY);
    /// Illegal seek.
    pub const ESPIPE: Errno = Errno(libc::ESPIPE);
    /// Operation not supported.
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
    /// Memory page has hardware error.
    pub const EHWPOISON: Errno = Errno(libc::EHWPOISON);
    /// Bad file descriptor.
    pub const EBADF: Errno = Errno(libc::EBADF);

    /// The errno left by the last failing libc call.
    pub fn last() -> Errno {
        Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    /// The raw value.
    pub fn raw(self) -> i32 {
        self.0
    }

    /// The symbolic name (`EINVAL`), or `E<number>` for one not listed here.
    pub fn name(self) -> String {
        let known = [
            (libc::EPERM, "EPERM"),
            (libc::ENOENT, "ENOENT"),
            (libc::EINTR, "EINTR"),
            (libc::EIO, "EIO"),
            (libc::EBADF, "EBADF"),
            (libc::EAGAIN, "EAGAIN"),
            (libc::ENOMEM, "ENOMEM"),
            (libc::EACCES, "EACCES"),
            (libc::EFAULT, "EFAULT"),
            (libc::EBUSY, "EBUSY"),
            (libc::EEXIST, "EEXIST"),
            (libc::ENODEV, "ENODEV"),
            (libc::EINVAL, "EINVAL"),
            (libc::ENOSPC, "ENOSPC"),
            (libc::ESPIPE, "ESPIPE"),
            (libc::ENOTTY, "ENOTTY"),
            (libc::ENOSYS, "ENOSYS"),
            (libc::E2BIG, "E2BIG"),
            (libc::EOPNOTSUPP, "EOPNOTSUPP"),
            (libc::EHWPOISON, "EHWPOISON"),
            (libc::ENXIO, "ENXIO"),
        ];
        known
            .iter()
            .find(|(v, _)| *v == self.0)
            .map_or_else(|| format!("E{}", self.0), |(_, n)| (*n).to_string())
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({})",
            self.name(),
            std::io::Error::from_raw_os_error(self.0)
        )
    }
}

impl std::error::Error for Errno {}

impl From<Errno> for std::io::Error {
    fn from(e: Errno) -> Self {
        std::io::Error::from_raw_os_error(e.0)
    }
}

impl From<vmm_sys_util::errno::Error> for Errno {
    fn from(e: vmm_sys_util::errno::Error) -> Self {
        Errno(e.errno())
    }
}

/// A result whose error is a kernel errno.
pub type KernelResult<T> = std::result::Result<T, Errno>;

/// Why a safe host access ([`GuestMemfd::read_at`](crate::GuestMemfd::read_at) and friends)
/// was refused instead of raising SIGBUS.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The page at `offset` is private: the host may not touch it.
    #[error("page at offset {offset:#x} is private; host access needs it shared")]
    Private {
        /// Byte offset of the first private page in the access.
        offset: u64,
    },
    /// The access runs past the end of the file.
    #[error("access [{offset:#x}, +{len:#x}) is outside the file (size {size:#x})")]
    OutOfBounds {
        /// Start of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Size of the file.
        size: u64,
    },
    /// The file was created without `GUEST_MEMFD_FLAG_MMAP`: the host has no access at all.
    #[error(
        "file was created without GUEST_MEMFD_FLAG_MMAP (flags {flags}); host access needs mmap"
    )]
    NotMappable {
        /// The file's flags, by name.
        flags: String,
    },
    /// This process follows the file's owner (a fork child's copy of the file, or a file
    /// received from another process): its copy of the attributes is not the owner's, so it
    /// reaches the pages only through host mappings, whose faults the owner's guard checks.
    #[error("this copy of the file follows its owner's (a fork child or a receiver); host access is through host mappings only")]
    Follower,
    /// With `GUEST_MEMFD_FLAG_NO_DIRECT_MAP`: the page could not be removed from the direct
    /// map when it was handed out (nothing was accessed or marked).
    #[error("removing the page at offset {offset:#x} from the direct map failed: {errno}")]
    DirectMap {
        /// Byte offset of the page.
        offset: u64,
        /// The failure.
        errno: Errno,
    },
}

/// A failed conversion through [`GuestMemfd::set_private`](crate::GuestMemfd::set_private) /
/// [`GuestMemfd::set_shared`](crate::GuestMemfd::set_shared): the errno and, for EAGAIN and
/// ENOMEM, the `error_offset` the kernel reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("conversion failed: {errno} (error_offset {error_offset:#x})")]
pub struct ConversionError {
    /// What `KVM_SET_MEMORY_ATTRIBUTES2` returned.
    pub errno: Errno,
    /// `error_offset` after the call (meaningful for EAGAIN and ENOMEM).
    pub error_offset: u64,
}

/// Why the kernel backend cannot convert: no revision of
/// `KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES` advertises `KVM_MEMORY_ATTRIBUTE_PRIVATE`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "in-place conversion unsupported: KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES ({caps}) does not \
     advertise KVM_MEMORY_ATTRIBUTE_PRIVATE ({private:#x}) on this VM (type {vm_type}); \
     KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd answered {answer}",
    caps = render_caps(.cap_values),
    private = crate::uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE
)]
pub struct ConversionUnsupported {
    /// The VM type the capability was checked on.
    pub vm_type: u64,
    /// `(revision, capability number, KVM_CHECK_EXTENSION value)` for every known revision.
    pub cap_values: Vec<(crate::uapi::SeriesRevision, u32, i32)>,
    /// What `KVM_SET_MEMORY_ATTRIBUTES2` answered on a scratch guest_memfd (`Ok` would mean
    /// the ioctl exists without its capability).
    pub answer: String,
}

fn render_caps(values: &[(crate::uapi::SeriesRevision, u32, i32)]) -> String {
    values
        .iter()
        .map(|(rev, cap, v)| format!("{cap} in {} = {v}", rev.name()))
        .collect::<Vec<_>>()
        .join(", ")
}
