//! `KVM_PRE_FAULT_MEMORY` (docs/series.md §1.6; `kvm_vcpu_pre_fault_memory` in virt/kvm/kvm_main.c
//! and x86's `kvm_arch_vcpu_pre_fault_memory`): map `[gpa, gpa + size)` ahead of the guest.
//!
//! On a VM of the kernel backend the vCPU ioctl is issued and its answer returned (EOPNOTSUPP
//! under this host's PVM). On memslots of the emulated backend the VMM serves it with the
//! kernel's semantics:
//! - `flags != 0`, an unaligned `gpa` or `size`, or a range that wraps (size 0 included):
//!   EINVAL, nothing done;
//! - page by page: a GPA with no memslot ends the walk with ENOENT (the x86 fault path
//!   answers "emulate" there); otherwise the page is allocated in the file and faulted into
//!   the guest's view, private or shared as its attribute says (the mapping follows the
//!   current state; content is never changed);
//! - after every page `gpa` advances and `size` shrinks by a page; the call returns 0 if at
//!   least one page was mapped, else the error: so `size` shrinks exactly when the call
//!   succeeds, and a range reaching past the memslot ends with ENOENT and the rest in `size`.

use gmem::error::{Errno, KernelResult};
use gmem::os::PAGE_SIZE;
use gmem::uapi::{kvm_pre_fault_memory, KVM_PRE_FAULT_MEMORY};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use crate::vm::VmHandle;
use crate::{Vcpu, Vm};

impl Vcpu {
    /// `KVM_PRE_FAULT_MEMORY` on this vCPU of `vm` (module documentation): `range.gpa` and
    /// `range.size` are updated as the kernel updates them.
    pub fn pre_fault_memory(&self, vm: &Vm, range: &mut kvm_pre_fault_memory) -> KernelResult<()> {
        if matches!(vm.handle, VmHandle::Kernel(_)) {
            // SAFETY: KVM_PRE_FAULT_MEMORY reads and writes exactly one kvm_pre_fault_memory,
            // which `range` is, on this vCPU's fd.
            let r = unsafe { ioctl_with_mut_ref(&self.fd, KVM_PRE_FAULT_MEMORY(), range) };
            return if r < 0 { Err(Errno::last()) } else { Ok(()) };
        }
        vm.pre_fault_emulated(range)
    }
}

impl Vm {
    /// The emulated backend's `KVM_PRE_FAULT_MEMORY` (module documentation).
    pub(crate) fn pre_fault_emulated(&self, range: &mut kvm_pre_fault_memory) -> KernelResult<()> {
        gmem::pre_fault::walk(range, |gpa| self.pre_fault_page(gpa))
    }

    fn pre_fault_page(&self, gpa: u64) -> KernelResult<()> {
        let (backing, offset) = self.gpa_to_file(crate::Gpa(gpa)).ok_or(Errno::ENOENT)?;
        backing.allocate(offset, PAGE_SIZE)?;
        let mut b = [0u8; 1];
        backing.guest_read(offset, &mut b)
    }
}
