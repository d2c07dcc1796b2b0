//! `gmem-preload`: an `LD_PRELOAD` interposer that presents gmem's emulated guest_memfd
//! through the KVM uAPI, as a kernel with the in-place conversion series presents it on x86
//! with `KVM_X86_SW_PROTECTED_VM` and per-guest_memfd attributes. `gmem exec` runs a program
//! with it; see README.md ("Run your VMM on in-place conversion without the kernel series")
//! and DESIGN.md ("The interposer") for what it answers and its limits.
//!
//! Design, in short:
//!
//! - **Fast path.** Every interposed function first asks `fdtable::owned`, one relaxed
//!   load from a bitmap of descriptor numbers; `ioctl` also looks at the request's type byte
//!   (KVM's is `0xAE`). A call on a descriptor that is not the interposer's, with a non-KVM
//!   request, goes straight to the C library's function (`dlsym(RTLD_NEXT)`, cached).
//!   `KVM_RUN` is passed through after one comparison.
//! - **Objects.** `KVM_CREATE_VM` registers a VM (a protected type becomes a default VM the
//!   host can run); `KVM_CREATE_GUEST_MEMFD` creates a [`gmem::EmulatedGuestMemfd`] and hands
//!   out a sealed, sparse memfd of the file's size as its descriptor (distinct inode,
//!   `st_size`, `st_blksize` for `fstat`; a raw syscall that bypasses the interposer fails
//!   instead of reaching the memory). State belongs to the open file: `dup*`/`F_DUPFD*` add
//!   the same object under the new number.
//! - **Memory.** `mmap` of an emulated file returns the file's own host mapping (private pages
//!   raise a real SIGBUS in it); a guest_memfd memslot becomes a plain memslot over the file's
//!   guest view, in which private pages stay reachable to the guest.
//! - No signal handler is installed; nothing runs before the first interposed call.

// An `LD_PRELOAD` object is FFI through and through: every export is `unsafe extern "C"`.
#![allow(unsafe_code)]
#![allow(clippy::missing_safety_doc)]
// The unit tests build without the exports (they would interpose the test binary itself).
#![cfg_attr(test, allow(dead_code))]

mod config;
mod fdtable;
mod files;
mod kvm;
mod real;
mod trace;
mod user;

#[cfg(not(test))]
mod exports;
