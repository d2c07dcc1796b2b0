//! The private_mem_conversions workload (docs/series.md §4.3) on real vCPUs.
//!
//! Each vCPU owns a window of 2 MiB + 4 KiB (spaced 4 MiB apart, `align_up(2M + 4K, 2M)` as in
//! the selftest) and runs, as guest code generated at run time and executed at CPL3:
//!
//! 1. `guest_test_explicit_conversion(do_fallocate = false, then true)`;
//! 2. `guest_test_punch_hole(precise = false, then true)`;
//! 3. the timing phase: bare exits, then timed 4 KiB conversions, in the same run.
//!
//! The host checks shared content at every shared sync and that private pages are not
//! accessible from its mapping (a SIGBUS probe) at every private sync. Without `/dev/kvm`
//! the same operations run with host-driven conversions: the guest's reads and writes go
//! through the emulated file's guest view.
//!
//! [`Config::memory`] runs the same flows on the two-backing model instead (a private store
//! and a shared memfd, the inactive copy discarded), for comparison: its content rule is its
//! own (zeroed, or preserved when it copies), and since it has no SIGBUS a private sync checks
//! that the VMM's accessor refuses the page and that the shared memfd no longer holds it.
//!
//! The module by concern: [`Config`] (`config`), the guest script and its compiler
//! (`guest_script`), the content checks (`checks`), the two engines (`kvm`, `host_driven`) and
//! the [`Report`] (`report`).

mod checks;
mod config;
mod guest_script;
mod host_driven;
mod kvm;
mod report;

use std::sync::Arc;
use std::time::Instant;

use gmem::emulated::EmulatedGuestMemfd;
use gmem::error::Errno;
use gmem::file::BackendKind;
use gmem::kernel::KernelBackend;
use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem_vmm::backing::{in_place, BackingKind, GuestBacking};
use gmem_vmm::two_backing::{TwoBacking, TwoBackingOptions};
use gmem_vmm::{Vm, VmError};

pub use config::Config;
pub use report::{ConversionRequests, HypercallCheck, Mode, PlatformLabel, Report};

/// Bytes of a vCPU's window.
pub const WINDOW_SIZE: u64 = (2 << 20) + 4096;
/// Distance between windows.
pub const WINDOW_STRIDE: u64 = 4 << 20;
/// The selftest's ranges, (offset, size) in the window.
pub const RANGES: [(u64, u64); 5] = [
    (0, 4096),
    (0, 2 << 20),
    (4096, 4096),
    (4096, 2 << 20),
    (2 << 20, 4096),
];
/// Why the workload could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// The kernel backend cannot convert on this host.
    #[error(
        "the kernel backend cannot run the conversion workload on this host: {0}. \
         Use --backend emulated (the default), which converts in userspace"
    )]
    KernelCannotConvert(String),
    /// A VM-level failure.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A kernel call failed.
    #[error("{op} failed: {errno}")]
    Kernel {
        /// What was attempted.
        op: &'static str,
        /// The answer.
        errno: Errno,
    },
}

/// The ratio target.
pub const TARGET_RATIO: f64 = 1.5;

/// Runs the workload.
pub fn run(config: &Config) -> Result<Report, WorkloadError> {
    let start = Instant::now();
    let mut r = run_inner(config)?;
    r.elapsed_us = start.elapsed().as_secs_f64() * 1e6 - r.elapsed_us;
    Ok(r)
}

/// [`run`], with the hypercall check's own time in `elapsed_us`.
/// The most samples ([`Config::samples`]) `config`'s guest programs have room for: the
/// timing phase's conversion loop is unrolled (two conversions per pair of samples), so the
/// program grows linearly with the samples until it exceeds its code area
/// ([`gmem_vmm::guest::CODE_SIZE`]). For checking `--samples` before any work starts.
pub fn max_samples(config: &Config) -> Result<u64, VmError> {
    let rules = checks::content_rules(config);
    let mut max = u64::MAX;
    for i in [0, config.vcpus.max(1) - 1] {
        let base = gmem_vmm::guest::DATA_GPA + WINDOW_STRIDE * i as u64;
        let len = |samples| {
            guest_script::compile(i, &guest_script::script(base, samples, rules).ops)
                .map(|p| p.code.len())
        };
        let (fixed, two) = (len(0)? as u64, len(2)? as u64);
        // Samples 2k and 2k + 1 run the same 2(k + 1) conversions.
        let per_pair = two.saturating_sub(fixed).max(1);
        let room = gmem_vmm::guest::CODE_SIZE.saturating_sub(fixed);
        max = max.min(2 * (room / per_pair) + 1);
    }
    Ok(max)
}

fn run_inner(config: &Config) -> Result<Report, WorkloadError> {
    config.validate()?;
    let size = config.mem_mib << 20;
    let kvm = gmem_vmm::kvm_available();
    let flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    match config.memory {
        BackingKind::TwoBacking { preserve_content } => {
            let m = TwoBacking::new(size, false, TwoBackingOptions { preserve_content })
                .map_err(|e| WorkloadError::Config(e.to_string()))?;
            let file: Arc<dyn GuestBacking> = Arc::new(m);
            match kvm {
                Ok(()) => {
                    let vm = Vm::new(config.vcpus)?;
                    kvm::run_kvm(config, &vm, file, kvm::hypercall_check(config))
                }
                Err(why) => host_driven::run_host_driven(config, &file, why.to_string()),
            }
        }
        BackingKind::InPlace(BackendKind::Kernel) => {
            let backend = KernelBackend::new().map_err(|errno| WorkloadError::Kernel {
                op: "opening /dev/kvm for the kernel backend",
                errno,
            })?;
            if let Some(why) = backend.conversion_unsupported() {
                return Err(WorkloadError::KernelCannotConvert(why.to_string()));
            }
            let file =
                backend
                    .create_guest_memfd(size, flags)
                    .map_err(|errno| WorkloadError::Kernel {
                        op: "KVM_CREATE_GUEST_MEMFD",
                        errno,
                    })?;
            let vm = Vm::on_kernel_backend(&backend, config.vcpus)?;
            let file = in_place(Arc::new(file)).map_err(|errno| WorkloadError::Kernel {
                op: "mmap of the gmem file",
                errno,
            })?;
            kvm::run_kvm(config, &vm, file, kvm::hypercall_check(config))
        }
        BackingKind::InPlace(BackendKind::Emulated) => {
            let file = EmulatedGuestMemfd::create_with(
                size,
                flags,
                gmem::emulated::EmulatedOptions {
                    folio_size: config.folio_size,
                    ..gmem::emulated::EmulatedOptions::with_platform(config.platform)
                },
            )
            .map_err(|errno| WorkloadError::Kernel {
                op: "creating the emulated guest_memfd",
                errno,
            })?;
            if let Some(log) = &config.conversion_log {
                file.log_conversions_to(log.clone());
            }
            let file = in_place(Arc::new(file)).map_err(|errno| WorkloadError::Kernel {
                op: "mmap of the gmem file",
                errno,
            })?;
            match kvm {
                Ok(()) => {
                    let vm = Vm::new(config.vcpus)?;
                    kvm::run_kvm(config, &vm, file, kvm::hypercall_check(config))
                }
                Err(why) => host_driven::run_host_driven(config, &file, why.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod max_samples_tests {
    use super::guest_script::{compile, script};
    use super::*;

    /// `max_samples` is exact: its programs fit, one more sample does not.
    #[test]
    fn max_samples_is_the_last_count_that_fits() {
        for vcpus in [1, 2, 64] {
            let config = Config {
                vcpus,
                ..Config::default()
            };
            let max = max_samples(&config).unwrap();
            assert!(max > 1000, "{max}");
            let i = vcpus - 1;
            let base = gmem_vmm::guest::DATA_GPA + WINDOW_STRIDE * i as u64;
            let rules = checks::content_rules(&config);
            assert!(compile(i, &script(base, max, rules).ops).is_ok());
            assert!(matches!(
                compile(i, &script(base, max + 1, rules).ops),
                Err(VmError::ProgramTooLarge { .. })
            ));
        }
    }
}
