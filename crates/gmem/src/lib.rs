//! gmem: the shared/private memory model of Linux `guest_memfd` with in-place conversion
//! (series "guest_memfd: In-place conversion support" v7/v8, and "Direct Map Removal Support
//! for guest_memfd" v10), for VMM authors and for kernel engineers who test confidential-VM
//! memory without special hardware.
//!
//! This crate is the model: one guest_memfd file ([`GuestMemfd`]), created by a backend
//! ([`GuestMemfdBackend`]): the [`emulated`] file, which works on any Linux, or the
//! [`kernel`]'s own guest_memfd on `/dev/kvm`. Every method is named after the kernel
//! operation it mirrors and fails with the kernel's errno ([`Errno`]), so the same code runs,
//! and the same test passes or fails, on either.
//!
//! # A VMM's use, step by step
//!
//! 1. **Create** a file: [`EmulatedGuestMemfd::create`] (or
//!    [`GuestMemfdBackend::create`] on a [`KernelBackend`], which is
//!    `KVM_CREATE_GUEST_MEMFD`), with [`uapi::GUEST_MEMFD_FLAG_MMAP`] if the host must map it
//!    and [`uapi::GUEST_MEMFD_FLAG_INIT_SHARED`] to start shared.
//! 2. **Map** it for the VMM and its devices: [`GuestMemfd::mmap_all`] gives a
//!    [`HostMapping`]. A page that is private raises a real SIGBUS in every mapping, so device
//!    code either checks first or uses the safe accessors [`GuestMemfd::read_at`] /
//!    [`GuestMemfd::write_at`], which answer [`AccessError::Private`] naming the offset.
//! 3. **Bind** it to the guest: [`GuestMemfd::memslot_source`] says how a KVM memslot reaches
//!    the memory — a `KVM_MEM_GUEST_MEMFD` memslot on the kernel's file, an ordinary memslot
//!    over the emulated file's guest view (in which private pages stay reachable, as they are
//!    to the guest). The `gmem-vmm` crate does this for you (`Vm::bind`).
//! 4. **Convert** when the guest asks (`KVM_HC_MAP_GPA_RANGE`, `KVM_EXIT_MEMORY_FAULT`):
//!    [`GuestMemfd::set_attributes`] is `KVM_SET_MEMORY_ATTRIBUTES2`, with the kernel's
//!    validation, EAGAIN and `error_offset` while a page is pinned ([`GuestMemfd::pin`]), and
//!    nothing changed on any failure; [`GuestMemfd::set_private`] / [`GuestMemfd::set_shared`]
//!    wrap it. Contents are kept in place (the platform models in [`platform`] change that
//!    where the hardware does).
//! 5. **Free** memory with [`GuestMemfd::punch_hole`]; attributes survive it, and the next use
//!    of a punched page reads zeros.
//!
//! ```
//! use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
//! use gmem::{AccessError, EmulatedGuestMemfd, GuestMemfd, MemslotSource, PAGE_SIZE};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // 1. A 1 MiB file, mappable, all shared.
//! let file = EmulatedGuestMemfd::create(1 << 20, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)?;
//! // 2. The VMM's mapping: shared pages are plain memory.
//! let host = file.mmap_all()?;
//! host.write_volatile(0, b"boot")?;
//! // 3. What a memslot binds: here the emulated file's guest view.
//! let (addr, len) = match file.memslot_source()? {
//!     MemslotSource::GuestView { userspace_addr, len } => (userspace_addr, len),
//!     MemslotSource::GuestMemfd { .. } => unreachable!("an emulated file has a guest view"),
//! };
//! let region = kvm_bindings::kvm_userspace_memory_region {
//!     slot: 0,
//!     flags: 0,
//!     guest_phys_addr: 1 << 32,
//!     memory_size: len,
//!     userspace_addr: addr,
//! };
//! assert_eq!(region.memory_size, 1 << 20);
//! // 4. The guest makes its first page private: the host is refused, the guest still reads it.
//! file.set_private(0, PAGE_SIZE)?;
//! assert!(host.probe_read(0, 1)?.is_sigbus()); // a real SIGBUS, seen from a child process
//! assert!(matches!(file.read_at(0, &mut [0u8; 4]), Err(AccessError::Private { offset: 0 })));
//! let mut seen = [0u8; 4];
//! file.guest_read(0, &mut seen)?;
//! assert_eq!(&seen, b"boot"); // converted in place: the content is kept
//! // Back to shared, then free it: attributes survive the punch, the content does not.
//! file.set_shared(0, PAGE_SIZE)?;
//! file.punch_hole(0, PAGE_SIZE)?;
//! let mut after = [0xffu8; 4];
//! file.read_at(0, &mut after)?;
//! assert_eq!(after, [0; 4]);
//! # Ok(())
//! # }
//! ```
//!
//! # Where things are
//!
//! - [`uapi`]: every number and struct of the kernel interface under its upstream name;
//! - [`mod@file`]: the [`GuestMemfd`] and [`GuestMemfdBackend`] traits;
//! - [`attributes`]: the per-file shared/private store;
//! - [`emulated`]: the emulated backend (revocation of private pages from host mappings,
//!   per-page state, the direct map, the fault service, populate);
//! - [`kernel`]: the kernel backend, which says what the running kernel lacks;
//! - [`host`]: what the running kernel offers (`/dev/kvm`, guest_memfd, its flags, conversion,
//!   userfaultfd): the one probe behind `gmem probe` and every test's skip;
//! - [`mapping`]: host mappings ([`HostMapping`]) and the SIGBUS probe ([`Probe`]);
//! - [`platform`]: the software-protected, SEV-SNP, TDX and pKVM models on one hook contract;
//! - [`error`]: [`Errno`] for calls that mirror the kernel, typed errors for the rest.
//!
//! Above this crate: `gmem-vmm` (a VMM: memslots, vCPUs, conversion requests), `gmem-check`
//! (the conformance suite after the kernel selftests), `gmem-bench` and the `gmem` command.
//! DESIGN.md has the state machines and the choices made where the series is silent.

#![deny(unsafe_code)]

pub mod attributes;
pub mod emulated;
pub mod error;
pub mod file;
pub mod host;
pub mod kernel;
pub mod mapping;
pub mod os;
pub mod platform;
pub mod pre_fault;
#[allow(unsafe_code)]
mod sys;
pub mod uapi;

pub use emulated::{
    AttributeTracking, ConversionLog, ConversionRecord, EmulatedBackend, EmulatedGuestMemfd,
    EmulatedOptions, FolioSize, HostPages, Revocation,
};
pub use error::{AccessError, ConversionError, ConversionUnsupported, Errno, KernelResult};
pub use file::{
    BackendKind, GuestMemfd, GuestMemfdBackend, GuestMemfdStat, MemslotSource, PinGuard,
};
pub use kernel::{KernelBackend, KernelGuestMemfd};
pub use mapping::{HostMapping, MapKind, Probe};
pub use sys::PAGE_SIZE;

/// The library example of the README, compiled and run as a doctest.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
