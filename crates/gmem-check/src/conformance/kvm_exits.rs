//! Cases from `tools/testing/selftests/kvm/x86/private_mem_kvm_exits_test.c` (kernel-spec
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

/// Per-VM mode only: a memslot without guest_memfd plus the PRIVATE attribute; a guest access
/// gives `KVM_EXIT_MEMORY_FAULT` with PRIVATE. With per-guest_memfd attributes the state cannot
/// be reached, so the case always skips ([`Need::VmAttributes`]); were it reached it would fail
/// rather than pass.
fn private_access_memslot_not_private(_ctx: &Ctx) -> CaseResult {
    Err("per-VM attributes are not modelled".into())
}
