//! Cases from `tools/testing/selftests/kvm/x86/private_mem_kvm_exits_test.c` (kernel-spec
//! §4.4, §2.6), in their per-guest_memfd (in-place conversion) form. Both need a VM that runs
//! guest code ([`Need::Vm`]); a backend without one skips them.

use super::{ensure, Case, CaseResult, Ctx, Need, VmAccess};
use gmem::os::PAGE_SIZE;
use gmem::uapi::GUEST_MEMFD_FLAG_MMAP;

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

/// The file is private by default (no INIT_SHARED, no conversion): the guest reads it through
/// the memslot; once the memslot is deleted the GPA has no guest_memfd, so it counts as shared
/// and the read becomes emulated MMIO (`KVM_EXIT_MMIO`, phys_addr = GPA, len 8, a read), not
/// `KVM_EXIT_MEMORY_FAULT` as with per-VM attributes.
fn private_access_memslot_deleted(ctx: &Ctx) -> CaseResult {
    let vm = ctx.guest.as_ref().and_then(|g| g.vm()).ok_or("no VM")?;
    let f = ctx.create(1, ctx.backend.supported_flags() & GUEST_MEMFD_FLAG_MMAP)?;
    let slot = vm
        .bind(&f, TEST_GPA, 0, PAGE_SIZE)
        .map_err(|e| e.to_string())?;
    let before = vm.guest_read_u64(TEST_GPA).map_err(|e| e.to_string())?;
    ensure(before == VmAccess::Value(0), || {
        format!("private read through the memslot: expected the value 0, got {before:?}")
    })?;
    vm.unbind(slot).map_err(|e| e.to_string())?;
    let after = vm.guest_read_u64(TEST_GPA).map_err(|e| e.to_string())?;
    let want = VmAccess::Mmio {
        phys_addr: TEST_GPA,
        len: 8,
        is_write: false,
    };
    ensure(after == want, || {
        format!("read after the memslot was deleted: expected {want:?}, got {after:?}")
    })
}

/// Per-VM mode only: a memslot without guest_memfd plus the PRIVATE attribute; a guest access
/// gives `KVM_EXIT_MEMORY_FAULT` with PRIVATE. With per-guest_memfd attributes the state cannot
/// be reached, so the case always skips ([`Need::VmAttributes`]); were it reached it would fail
/// rather than pass.
fn private_access_memslot_not_private(_ctx: &Ctx) -> CaseResult {
    Err("per-VM attributes are not modelled".into())
}
