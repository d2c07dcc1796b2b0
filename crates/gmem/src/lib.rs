//! gmem: the shared/private memory model of Linux `guest_memfd` with in-place conversion.
//!
//! - [`uapi`]: the kernel interface under its upstream names;
//! - [`attributes`]: the per-file shared/private store;
//! - [`GuestMemfd`]: one file, whatever backs it; [`emulated`] is the backend that works on
//!   any Linux;
//! - [`mapping`]: host mappings, on which private pages raise a real SIGBUS.
//!
//! See DESIGN.md for the state machines and the choices made where the kernel series is silent.

pub mod attributes;
pub mod backend;
pub mod bench;
pub mod comparison;
pub mod conformance;
pub mod emulated;
pub mod error;
pub mod io;
pub mod kernel;
pub mod mapping;
pub mod model;
pub mod platform;
pub mod probe;
pub mod sys;
pub mod twobacking;
pub mod uapi;
pub mod vm;
pub mod workload;

pub use backend::{BackendKind, GuestMemfd, GuestMemfdBackend, GuestMemfdStat, PinGuard};
pub use emulated::{EmulatedBackend, EmulatedGuestMemfd, EmulatedOptions, Revocation};
pub use error::{AccessError, ConversionError, Errno, KernelResult};
pub use kernel::{ConversionUnsupported, KernelBackend, KernelGuestMemfd};
pub use mapping::{HostMapping, MapKind, Probe};
pub use sys::PAGE_SIZE;
