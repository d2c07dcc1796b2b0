//! The workload's options ([`Config`]) and the check that they describe a run that can be made.

use gmem::file::BackendKind;
use gmem::platform::PlatformKind;
use gmem_vmm::backing::BackingKind;

use super::{WorkloadError, WINDOW_STRIDE};

/// Options of [`super::run`].
#[derive(Debug, Clone)]
pub struct Config {
    /// vCPUs (one window each).
    pub vcpus: usize,
    /// gmem memory in MiB.
    pub mem_mib: u64,
    /// Memslots the file is split into.
    pub memslots: u64,
    /// Samples per round-trip measurement.
    pub samples: u64,
    /// Limit on the vCPUs' run time; vCPUs still running are stopped with an error.
    pub timeout: std::time::Duration,
    /// The platform model of the (emulated) file; the content checks follow its rules.
    pub platform: PlatformKind,
    /// The platform whose content rules the checks assume, if not `platform` (or the
    /// model's): a negative control (a run whose memory does not follow these rules must
    /// report mismatches).
    pub expect_rules_of: Option<PlatformKind>,
    /// The guest memory: gmem's in-place file on a backend, or the two-backing layout
    /// production VMMs ship, destructive or content-preserving (its content rule is its own:
    /// zeroed, or preserved).
    pub memory: BackingKind,
    /// Whether to check, before the workload, if the MAP_GPA_RANGE hypercall reaches
    /// userspace here (up to 300 ms on a host where it does not).
    pub check_hypercall: bool,
    /// Where the file's conversions are recorded (`gmem run --map`): the emulated backend's
    /// file only.
    pub conversion_log: Option<gmem::ConversionLog>,
    /// The folios of the emulated file (`--folio-size`): 4 KiB, or 2 MiB where the host
    /// offers shmem THP (emulated backend, in-place model).
    pub folio_size: gmem::FolioSize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            vcpus: 2,
            mem_mib: 64,
            memslots: 1,
            samples: 400,
            timeout: std::time::Duration::from_secs(120),
            platform: PlatformKind::SoftwareProtected,
            expect_rules_of: None,
            memory: BackingKind::InPlace(BackendKind::Emulated),
            check_hypercall: true,
            conversion_log: None,
            folio_size: gmem::FolioSize::Small,
        }
    }
}

impl Config {
    /// `Err` naming the option if this configuration cannot run.
    pub fn validate(&self) -> Result<(), WorkloadError> {
        let config = self;
        if config.folio_size == gmem::FolioSize::Huge {
            if config.memory != BackingKind::InPlace(BackendKind::Emulated) {
                return Err(WorkloadError::Config(format!(
                    "--folio-size 2m: the emulated backend's in-place file only (not {:?})",
                    config.memory
                )));
            }
            if config.mem_mib % 2 != 0 {
                return Err(WorkloadError::Config(format!(
                    "--folio-size 2m --mem-mib {}: allowed a multiple of 2 MiB",
                    config.mem_mib
                )));
            }
            if let Err(why) = gmem::host::huge_folios() {
                return Err(WorkloadError::Config(format!("--folio-size 2m: {why}")));
            }
        }
        let need = WINDOW_STRIDE * config.vcpus as u64;
        let size = config.mem_mib << 20;
        if config.vcpus == 0 || config.vcpus > gmem_vmm::guest::MAX_VCPUS {
            return Err(WorkloadError::Config(format!(
                "--vcpus {}: allowed 1..={}",
                config.vcpus,
                gmem_vmm::guest::MAX_VCPUS
            )));
        }
        if size < need || size > gmem_vmm::guest::MAX_DATA_SIZE {
            return Err(WorkloadError::Config(format!(
                "--mem-mib {}: {} vCPUs need at least {} MiB (4 MiB per vCPU window); at most {} MiB",
                config.mem_mib,
                config.vcpus,
                need >> 20,
                gmem_vmm::guest::MAX_DATA_SIZE >> 20
            )));
        }
        if config.memslots == 0 || size % (config.memslots * (2 << 20)) != 0 {
            return Err(WorkloadError::Config(format!(
                "--memslots {}: must divide the memory into whole 2 MiB pieces",
                config.memslots
            )));
        }
        if config.memory == BackingKind::InPlace(BackendKind::Kernel)
            && config.platform != PlatformKind::SoftwareProtected
        {
            return Err(WorkloadError::Config(format!(
                "--platform {}: platform models exist on the emulated backend only; the kernel \
                 backend runs this host's VM type (use --platform sw, or --backend emulated)",
                config.platform
            )));
        }
        if let BackingKind::TwoBacking { .. } = config.memory {
            if config.platform != PlatformKind::SoftwareProtected {
                return Err(WorkloadError::Config(format!(
                    "--platform {} with --model {}: platform models are hooks of gmem's in-place \
                     file; the two-backing model's content rule is its own (two-backing: zeroed, \
                     two-backing+copy: preserved); use --platform sw (the default)",
                    config.platform, config.memory
                )));
            }
        }
        Ok(())
    }
}
