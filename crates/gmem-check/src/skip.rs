//! Why a check cannot run on this host: one function per condition, each `None` when the
//! condition holds and `Some(reason)` otherwise. Test harnesses decide their skips with these
//! before running anything, and report the reason (`cargo test` shows such a test as ignored).

use gmem::file::GuestMemfdBackend;

use crate::conformance::Ctx;

/// Why `/dev/kvm` cannot be opened, if it cannot.
pub fn kvm() -> Option<String> {
    gmem_vmm::kvm_available().err().map(|e| e.to_string())
}

/// Why the kernel backend (a VM of type 0 on `/dev/kvm`) is unavailable, if it is.
pub fn kernel_backend() -> Option<String> {
    Ctx::kernel(0).err().map(|e| e.to_string())
}

/// Why the kernel backend cannot create files with all of `flags`, if it cannot (including
/// when the backend itself is unavailable).
pub fn kernel_flags(flags: u64) -> Option<String> {
    match gmem::kernel::KernelBackend::new() {
        Err(e) => Some(format!("the kernel backend cannot open a VM ({e})")),
        Ok(b) if b.supported_flags() & flags != flags => Some(format!(
            "KVM_CAP_GUEST_MEMFD_FLAGS ({}) lacks {}",
            gmem::uapi::flag_names(b.supported_flags()),
            gmem::uapi::flag_names(flags)
        )),
        Ok(_) => None,
    }
}

/// Why the kernel backend cannot convert in place, if it cannot (including when the backend
/// itself is unavailable).
pub fn kernel_conversion() -> Option<String> {
    match Ctx::kernel(0) {
        Err(why) => Some(why.to_string()),
        Ok(ctx) => ctx
            .backend
            .conversion_support()
            .err()
            .map(|e| e.to_string()),
    }
}
