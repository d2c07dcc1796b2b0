//! gmem: the shared/private memory model of Linux `guest_memfd` with in-place conversion.
//!
//! - [`uapi`]: the kernel interface under its upstream names;
//! - [`attributes`]: the per-file shared/private store;
//! - [`GuestMemfd`]: one file, whatever backs it; [`emulated`] is the backend that works on
//!   any Linux;
//! - [`mapping`]: host mappings, on which private pages raise a real SIGBUS.
//!
//! See DESIGN.md for the state machines and the choices made where the kernel series is silent.

#![deny(unsafe_code)]

pub mod attributes;
pub mod emulated;
pub mod error;
pub mod file;
pub mod kernel;
pub mod mapping;
pub mod os;
pub mod platform;
#[allow(unsafe_code)]
mod sys;
pub mod uapi;

pub use emulated::{EmulatedBackend, EmulatedGuestMemfd, EmulatedOptions, Revocation};
pub use error::{AccessError, ConversionError, ConversionUnsupported, Errno, KernelResult};
pub use file::{
    BackendKind, GuestMemfd, GuestMemfdBackend, GuestMemfdStat, MemslotSource, PinGuard,
};
pub use kernel::{KernelBackend, KernelGuestMemfd};
pub use mapping::{HostMapping, MapKind, Probe};
pub use sys::PAGE_SIZE;
