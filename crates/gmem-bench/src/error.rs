//! Why a benchmark stopped, or why a section of it could not run on this host: one error for
//! the bench area, aggregating the errors of the layers below.

use gmem::error::{AccessError, ConversionError, Errno};
use gmem_check::workload::WorkloadError;
use gmem_vmm::backing::BackingKind;
use gmem_vmm::two_backing::TwoBackingError;
use gmem_vmm::{Event, VmError};

/// Why a measurement failed. Sections that fail stop `gmem bench`; sections that need what
/// this host lacks (`/dev/kvm`, the kernel backend) are reported as skipped with this error
/// as the reason.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A section failed: `what` names it.
    #[error("{what} failed: {source}")]
    Section {
        /// What was being measured.
        what: String,
        /// Why.
        source: Box<BenchError>,
    },
    /// A system call failed.
    #[error(transparent)]
    Sys(#[from] Errno),
    /// A named call failed.
    #[error("{what}: {errno}")]
    Call {
        /// Which call.
        what: &'static str,
        /// Its errno.
        errno: Errno,
    },
    /// A conversion failed.
    #[error(transparent)]
    Conversion(#[from] ConversionError),
    /// A host access was refused.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The two-backing layout could not be built.
    #[error(transparent)]
    TwoBacking(#[from] TwoBackingError),
    /// The VMM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A count overflowed its type.
    #[error(transparent)]
    Overflow(#[from] std::num::TryFromIntError),
    /// `/dev/kvm` cannot be used.
    #[error("{0}")]
    NoKvm(String),
    /// The kernel backend cannot be created on this host.
    #[error("no kernel backend: {0}")]
    NoKernelBackend(Errno),
    /// A file's memslot source is not the kind its measurement binds.
    #[error("{file} file bound as {offered}")]
    BoundAs {
        /// `kernel` or `emulated`.
        file: &'static str,
        /// The source it offered (`Debug`).
        offered: String,
    },
    /// The guest-access measurement failed.
    #[error("guest access: {0}")]
    GuestAccess(Box<BenchError>),
    /// A vCPU stopped for something other than what the measurement programmed.
    #[error("expected {expected}, got {got:?}")]
    UnexpectedEvent {
        /// What the program does next.
        expected: String,
        /// What the vCPU reported.
        got: Event,
    },
    /// `gmem run` failed on a layout.
    #[error("gmem run --model {model}: {source}")]
    Workload {
        /// The layout.
        model: BackingKind,
        /// Why.
        source: WorkloadError,
    },
    /// `gmem run` read back data it did not write.
    #[error("gmem run --model {model}: {count} mismatches: {details:?}")]
    Mismatches {
        /// The layout.
        model: BackingKind,
        /// How many.
        count: u64,
        /// The first ones, described.
        details: Vec<String>,
    },
}

impl BenchError {
    /// This error as the reason `what` failed.
    pub(crate) fn within(self, what: impl FnOnce() -> String) -> BenchError {
        BenchError::Section {
            what: what(),
            source: Box::new(self),
        }
    }
}
