//! What `gmem exec` asked for, read once from the environment it sets.

use std::str::FromStr;
use std::sync::OnceLock;

use gmem::platform::PlatformKind;
use gmem::uapi::{SeriesRevision, KVM_X86_SNP_VM, KVM_X86_SW_PROTECTED_VM, KVM_X86_TDX_VM};

/// `--platform`: the platform model of every emulated file.
pub(crate) const ENV_PLATFORM: &str = "GMEM_EXEC_PLATFORM";
/// `--series`: which revision's capability numbers to answer.
pub(crate) const ENV_SERIES: &str = "GMEM_EXEC_SERIES";
/// `--trace FILE`.
pub(crate) const ENV_TRACE: &str = "GMEM_EXEC_TRACE";

/// The interposer's configuration.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) platform: PlatformKind,
    pub(crate) series: SeriesRevision,
}

impl Config {
    /// The VM types the interposer creates as a default VM and presents as protected:
    /// `KVM_X86_SW_PROTECTED_VM` always, and the platform's own type for `snp` and `tdx`.
    pub(crate) fn protected_types(&self) -> u64 {
        let own = match self.platform {
            PlatformKind::Snp => 1 << KVM_X86_SNP_VM,
            PlatformKind::Tdx => 1 << KVM_X86_TDX_VM,
            PlatformKind::SoftwareProtected | PlatformKind::Pkvm => 0,
        };
        (1 << KVM_X86_SW_PROTECTED_VM) | own
    }

    /// Whether `vm_type` is one the interposer emulates.
    pub(crate) fn is_protected(&self, vm_type: u64) -> bool {
        vm_type < 64 && self.protected_types() & (1 << vm_type) != 0
    }
}

/// The configuration (defaults: `sw`, `v8`; an unknown value falls back to the default).
pub(crate) fn get() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let platform = std::env::var(ENV_PLATFORM)
            .ok()
            .and_then(|s| PlatformKind::from_str(&s).ok())
            .unwrap_or_default();
        let series = match std::env::var(ENV_SERIES).as_deref() {
            Ok("v7") => SeriesRevision::V7,
            _ => SeriesRevision::V8,
        };
        Config { platform, series }
    })
}
