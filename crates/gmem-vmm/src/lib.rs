//! Real KVM guests on gmem memory.
//!
//! A [`Vm`] owns a KVM VM (type 0, `KVM_X86_DEFAULT_VM`) and binds guest_memfd file ranges at
//! guest physical addresses:
//!
//! - emulated backend: an ordinary memslot (`KVM_SET_USER_MEMORY_REGION`) over the file's guest
//!   view, a full `MAP_SHARED` mapping of the memfd in which private pages stay accessible;
//! - kernel backend: `KVM_SET_USER_MEMORY_REGION2` with `KVM_MEM_GUEST_MEMFD`, the guest_memfd and
//!   its offset, and `userspace_addr` equal to the file's own mapping (docs/host-facts.md: emulated
//!   accesses go through `userspace_addr`, so it must be that mapping);
//! - the two-backing layout ([`two_backing::TwoBacking`], for comparison): an ordinary memslot over
//!   its composite view, in which each page maps the private store or the shared memfd as its
//!   attribute selects.
//!
//! Guest memory below 4 GiB is the VM's *system* memory (page tables, mailboxes, code), an
//! anonymous mapping bound at GPA 0. gmem memory starts at [`guest::DATA_GPA`] (4 GiB), as in the
//! kernel selftests.
//!
//! Conversion requests reach the VMM three ways and all become one [`ConvertRequest`]:
//! `KVM_EXIT_HYPERCALL` for `KVM_HC_MAP_GPA_RANGE`, `KVM_EXIT_MEMORY_FAULT` (converted to the
//! faulting access's type, the QEMU / Cloud Hypervisor policy), and the port-I/O request of
//! [`guest::PORT_MAP_GPA_RANGE`] (same arguments, in the vCPU's mailbox). On this machine's PVM
//! the hypercall never reaches userspace (see [`Vm::check_hypercall_exit`]), so the port is the
//! path the workload uses; the hypercall path is kept and unit-tested on synthetic exits.
//!
//! # Privilege levels
//!
//! vCPUs start in long mode at CPL3 (flat CS/SS with DPL 3 set directly in `KVM_SET_SREGS`,
//! no GDT, identity page tables with the U bit, RFLAGS.IOPL = 3 so that `out` is allowed):
//! under PVM only CPL3 code runs natively. Nothing runs at CPL0 except the hypercall path's
//! `vmcall`: the guest writes [`guest::PORT_ENTER_CPL0`] and the VMM rewrites CS/SS to ring 0
//! between two `KVM_RUN`s, then [`guest::PORT_ENTER_CPL3`] switches back. KVM refuses
//! hypercalls from CPL > 0, hence the detour.
//!
//! # What this host does (PVM, measured)
//!
//! - `vmcall` at CPL3 raises #UD (`KVM_EXIT_SHUTDOWN` without an IDT).
//! - `vmcall` (or `vmmcall`, which gets rewritten to `vmcall`) at CPL0 never leaves the kernel:
//!   CPL0 code is run by KVM's instruction emulator, which treats the instruction as a
//!   hypercall instruction to patch and re-execute. The vCPU spins until kicked by a signal.
//!   So `KVM_EXIT_HYPERCALL` is never seen, although `KVM_CAP_EXIT_HYPERCALL` is enabled.
//! - Round trips (release build, medians): bare `out` exit from CPL3 ≈ 18.5 µs; exit →
//!   4 KiB conversion → re-enter ≈ 24.5 µs, with the conversion call itself ≈ 5 µs right after
//!   an exit (≈ 1.4 µs in a hot host loop); the CPL0 detour alone (two exits and two
//!   `KVM_SET_SREGS`) ≈ 30 µs, so even where the hypercall works the port request is cheaper.

pub mod asm;
pub mod backing;
mod convert;
mod error;
pub mod gpa;
pub mod guest;
mod memslot;
pub mod port;
mod pre_fault;
pub mod stats;
pub mod two_backing;
mod vcpu;
mod vm;
mod vm_attributes;

pub use asm::{Asm, AsmError, Cond, Label, Reg};
pub use convert::{
    convert_pieces, hypercall_ret, ConversionHandler, ConvertFailure, ConvertPiece, ConvertRequest,
    ConvertTarget, REQUEST_FLAG_FALLOCATE, REQUEST_FLAG_TIMED,
};
pub use error::{HypercallExitError, KvmUnavailable, PortError, VmError};
pub use gpa::Gpa;
pub use guest::{GuestProgram, Program, RequestPath};
pub use memslot::Memslot;
pub use vcpu::{Event, Stop, Vcpu, VcpuTimings};
pub use vm::{kvm_available, Vm, VmStats};
