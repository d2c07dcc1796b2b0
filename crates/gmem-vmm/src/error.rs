//! Errors of the VMM layer.

use std::time::Duration;

use gmem::Errno;

use crate::asm::AsmError;

/// Errors of the VM layer (gmem-only API).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM or host call failed.
    #[error("{op} failed: {errno}")]
    Kvm {
        /// What was attempted.
        op: &'static str,
        /// The kernel's answer.
        errno: Errno,
    },
    /// The vCPU count is outside what the guest layout supports.
    #[error("vcpus = {vcpus}: the guest layout supports 1..={max} vCPUs")]
    Vcpus {
        /// Requested.
        vcpus: usize,
        /// Maximum.
        max: usize,
    },
    /// A binding is not page-aligned, empty, past the file, or overlaps another binding.
    #[error(
        "cannot bind [{gpa:#x}, +{size:#x}) at file offset {offset:#x}: {why} \
         (bindings must be page-aligned, non-empty, inside the file and the data window, \
         and must not overlap)"
    )]
    Binding {
        /// Guest physical address.
        gpa: u64,
        /// Size.
        size: u64,
        /// File offset.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// The program does not fit in its code area.
    #[error("guest program of {len} bytes exceeds its code area of {max} bytes")]
    ProgramTooLarge {
        /// Program length.
        len: usize,
        /// Room.
        max: usize,
    },
    /// Guest code could not be assembled.
    #[error(transparent)]
    Asm(#[from] AsmError),
    /// The vCPU stopped in a way the VMM does not handle.
    #[error("vCPU {vcpu}: {what}")]
    UnexpectedExit {
        /// vCPU index.
        vcpu: usize,
        /// The exit and state, rendered.
        what: String,
    },
    /// A vCPU did not reach its next exit in time.
    #[error("vCPU {vcpu} did not exit within {timeout:?}")]
    Timeout {
        /// vCPU index.
        vcpu: usize,
        /// The limit.
        timeout: Duration,
    },
    /// A file of the wrong backend or VM.
    #[error("{0}")]
    WrongFile(String),
}

impl VmError {
    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
        move |e| VmError::Kvm {
            op,
            errno: Errno(e.errno()),
        }
    }
}

/// Why `/dev/kvm` cannot be used ([`crate::kvm_available`]), from gmem's one probe.
pub use gmem::host::KvmUnavailable;

/// Why the `KVM_HC_MAP_GPA_RANGE` hypercall does not reach userspace
/// ([`crate::Vm::check_hypercall_exit`]).
#[derive(Debug, thiserror::Error)]
pub enum HypercallExitError {
    /// The VM or its vCPU could not be set up.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// `KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)` failed.
    #[error("KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL) failed: {0}")]
    NotEnabled(Errno),
    /// The guest's hypercall never exited (what was seen instead, rendered).
    #[error("{0}")]
    NotDelivered(String),
}

/// Why a [`crate::port::GuestPort`] or [`crate::port::VmPort`] operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A guest access of the file failed with this errno.
    #[error("guest {op} at {offset:#x}: {errno}")]
    Access {
        /// `read` or `write`.
        op: &'static str,
        /// File offset.
        offset: u64,
        /// The answer.
        errno: Errno,
    },
    /// The access is outside the file.
    #[error("guest access [{offset:#x}, +{len:#x}) is outside the file (size {size:#x})")]
    OutOfBounds {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// File size.
        size: u64,
    },
    /// The file could not be bound in the guest's VM (mapped, or placed in its window).
    #[error("binding the file in the vCPU guest: {0}")]
    Binding(String),
    /// The guest program did not end as expected (the stop, rendered).
    #[error("guest {op} of [{gpa:#x}, +{len:#x}) ended with {stop}")]
    UnexpectedStop {
        /// `read` or `write`.
        op: &'static str,
        /// Guest physical address.
        gpa: u64,
        /// Length.
        len: u64,
        /// How the vCPU stopped.
        stop: String,
    },
}
