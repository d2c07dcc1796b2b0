//! Cases from `tools/testing/selftests/kvm/x86/private_mem_kvm_exits_test.c` (docs/series.md
//! §4.4, §2.6), in their per-guest_memfd (in-place conversion) form. Both need a VM that runs
//! guest code ([`Need::Vm`]); a backend without one skips them.

use super::{ensure, Case, CaseResult, Ctx, Need, VmAccess};
use gmem::os::PAGE_SIZE;
use gmem::uapi::GUEST_MEMFD_FLAG_MMAP;
use std::time::Duration;

/// Where the selftest binds its memslot: 4 GiB.
const TEST_GPA: u64 = 4 << 30;

pub(super) fn cases() -> Vec<Case> {
    const SRC: &str = "private_mem_kvm_exits_test.c";
    vec![
        Case {
            name: "private_access_memslot_deleted",
            source: SRC,
            needs: &[Need::Vm],
            run: private_access_memslot_deleted,
        },
        Case {
            name: "private_access_memslot_not_private",
            source: SRC,
            needs: &[Need::Vm, Need::VmAttributes],
            run: private_access_memslot_not_private,
        },
    ]
}

/// The file is private by default (no INIT_SHARED, no conversion): a vCPU loops loading 8
/// bytes from the GPA through the memslot while this thread deletes the memslot, as the
/// selftest's `guest_repeatedly_read` does. Once the memslot is gone the GPA has no
/// guest_memfd, so it counts as shared and the load becomes emulated MMIO (`KVM_EXIT_MMIO`,
/// phys_addr = GPA, len 8, a read), not `KVM_EXIT_MEMORY_FAULT` as with per-VM attributes. A
/// loop that never ends is kicked out after [`LOOP_TIMEOUT`] and fails the case.
fn private_access_memslot_deleted(ctx: &Ctx) -> CaseResult {
    let vm = ctx.guest.as_ref().and_then(|g| g.vm()).ok_or("no VM")?;
    let f = ctx.create(1, ctx.backend.supported_flags() & GUEST_MEMFD_FLAG_MMAP)?;
    let slot = vm.bind(&f, TEST_GPA, 0, PAGE_SIZE)?;
    let before = vm.guest_read_u64(TEST_GPA)?;
    ensure(before == VmAccess::Value(0), || {
        format!("private read through the memslot: expected the value 0, got {before:?}")
    })?;
    let ended = vm.guest_read_u64_while(TEST_GPA, &|| vm.unbind(slot), LOOP_TIMEOUT)?;
    let want = VmAccess::Mmio {
        phys_addr: TEST_GPA,
        len: 8,
        is_write: false,
    };
    ensure(ended == want, || {
        format!(
            "a guest reading in a loop while its memslot was deleted: expected the loop to \
             end with {want:?}, got {ended:?}"
        )
    })
}

/// How long the reading loop may run on after its memslot is deleted.
const LOOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Per-VM mode only (v8 `gmem_in_place_conversion=0`, v7 `vm_memory_attributes=1`): a memslot
/// without guest_memfd plus the PRIVATE attribute set with the VM's
/// `KVM_SET_MEMORY_ATTRIBUTES`; a guest access gives `KVM_EXIT_MEMORY_FAULT` with PRIVATE, the
/// page's GPA and size. With per-guest_memfd attributes the state cannot be reached (the
/// selftest skips), so the case runs on a VM of its own in per-VM mode
/// ([`gmem_vmm::port::VcpuGuest::emulated_per_vm`]), where the VM ioctl is on.
fn private_access_memslot_not_private(_ctx: &Ctx) -> CaseResult {
    use gmem::uapi::{KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE};
    use gmem_vmm::port::{VcpuGuest, VmPort};
    let g = VcpuGuest::emulated_per_vm().map_err(|e| e.to_string())?;
    let vm = g.vm();
    vm.bind_anonymous(gmem_vmm::Gpa(TEST_GPA), PAGE_SIZE)
        .map_err(|e| e.to_string())?;
    // Shared: the read reaches the anonymous memory.
    let before = VmPort::guest_read_u64(&*g, TEST_GPA).map_err(|e| e.to_string())?;
    ensure(before == VmAccess::Value(0), || {
        format!("shared read of the anonymous memslot: expected the value 0, got {before:?}")
    })?;
    vm.set_memory_attributes(TEST_GPA, PAGE_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        .map_err(super::CaseFailure::call(
            "KVM_SET_MEMORY_ATTRIBUTES(TEST_GPA, page, PRIVATE)",
        ))?;
    let got = VmPort::guest_read_u64(&*g, TEST_GPA).map_err(|e| e.to_string())?;
    let want = VmAccess::MemoryFault {
        flags: KVM_MEMORY_EXIT_FLAG_PRIVATE,
        gpa: TEST_GPA,
        size: PAGE_SIZE,
    };
    ensure(got == want, || {
        format!("private read of a memslot without guest_memfd: expected {want:?}, got {got:?}")
    })
}
