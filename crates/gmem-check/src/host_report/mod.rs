//! What this host offers: `/dev/kvm` and its flavour, the KVM capabilities guest_memfd
//! depends on, userfaultfd, the memory settings gmem's emulation cares about, and for every gmem
//! feature which backend can provide it here and why not otherwise.
//!
//! By concern: [`kvm`] (the device, its VM types and capabilities, guest_memfd creation and
//! in-place conversion), [`userfaultfd`], and the feature table derived from both
//! (`features`). The `gmem probe` subcommand renders the report.
//!
//! [`collect`] never panics and never fails as a whole: whatever cannot be read is reported as
//! such (a host without `/dev/kvm` is a valid answer).

mod features;
pub mod kvm;
pub mod userfaultfd;

use std::path::Path;

pub use kvm::{
    Capability, ConversionCapability, Flavour, KvmFeatures, KvmReport, KvmUnavailable, Missing,
    VmTypeCheck, CAPABILITIES, VM_TYPE_NAMES,
};
pub use userfaultfd::{uffd_feature_names, UserfaultfdReport, UFFD_FEATURE_NAMES};

/// Whether one backend provides one feature, with the evidence or the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Availability {
    /// Available on this host.
    pub available: bool,
    /// How it is provided, or why not (naming the missing capability or setting).
    pub detail: String,
}

impl Availability {
    fn yes(detail: impl Into<String>) -> Self {
        Availability {
            available: true,
            detail: detail.into(),
        }
    }

    fn no(detail: impl Into<String>) -> Self {
        Availability {
            available: false,
            detail: detail.into(),
        }
    }
}

/// One gmem feature and what each backend can do about it here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureRow {
    /// Short identifier (`create`, `mmap`, ...).
    pub feature: &'static str,
    /// What it is.
    pub description: &'static str,
    /// The emulated backend.
    pub emulated: Availability,
    /// The kernel backend.
    pub kernel: Availability,
}

/// Everything the host report found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    /// `uname -r`.
    pub kernel_release: Option<String>,
    /// `/dev/kvm`.
    pub kvm: KvmReport,
    /// userfaultfd.
    pub userfaultfd: UserfaultfdReport,
    /// The selected mode of `/sys/kernel/mm/transparent_hugepage/shmem_enabled`.
    pub shmem_thp: Option<String>,
    /// `/proc/sys/vm/nr_hugepages`.
    pub nr_hugepages: Option<u64>,
    /// `/proc/sys/vm/max_map_count`.
    pub max_map_count: Option<u64>,
    /// Every gmem feature, in a fixed order: `create`, `mmap`, `init_shared`, `conversion`,
    /// `sigbus_on_private`, `punch_hole`, `pins_eagain`, `no_direct_map`, `guest_memslots`,
    /// `map_gpa_range_exit`, `memory_fault_exit`.
    pub features: Vec<FeatureRow>,
}

impl HostReport {
    /// The row of `feature`.
    pub fn feature(&self, feature: &str) -> Option<&FeatureRow> {
        self.features.iter().find(|f| f.feature == feature)
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn read_u64(path: &str) -> Option<u64> {
    read_trimmed(path).and_then(|s| s.parse().ok())
}

/// The bracketed choice of a sysfs selector such as `always [never] advise`.
fn selected(s: &str) -> Option<String> {
    let start = s.find('[')?;
    let end = s[start..].find(']')? + start;
    Some(s[start + 1..end].to_string())
}

fn kernel_release() -> Option<String> {
    // SAFETY: an all-zero utsname is a valid value of this plain C struct.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname for the duration of the call.
    if unsafe { libc::uname(&mut u) } != 0 {
        return read_trimmed("/proc/sys/kernel/osrelease");
    }
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c.to_ne_bytes()[0])
        .collect();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Collects the host report. Never panics; what cannot be read is reported.
pub fn collect() -> HostReport {
    collect_with_kvm_device(&gmem::host::kvm_device())
}

/// [`collect`] with the KVM device at `dev_kvm` (a missing path reports a host without KVM).
pub fn collect_with_kvm_device(dev_kvm: &Path) -> HostReport {
    let mut report = HostReport {
        kernel_release: kernel_release(),
        kvm: kvm::collect(dev_kvm),
        userfaultfd: userfaultfd::collect(),
        shmem_thp: read_trimmed("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
            .and_then(|s| selected(&s)),
        nr_hugepages: read_u64("/proc/sys/vm/nr_hugepages"),
        max_map_count: read_u64("/proc/sys/vm/max_map_count"),
        features: Vec::new(),
    };
    report.features = features::features(&report);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector() {
        assert_eq!(
            selected("always within_size advise [never] deny force").as_deref(),
            Some("never")
        );
        assert_eq!(selected("no brackets"), None);
    }

    #[test]
    fn collect_without_kvm_reports_it() {
        let r = collect_with_kvm_device(Path::new("/nonexistent/kvm"));
        assert!(!r.kvm.dev_kvm);
        assert_eq!(r.kvm.flavour, None);
        assert!(r.kvm.capabilities.is_empty());
        assert_eq!(
            r.kvm.conversion_support,
            Err(Missing::Kvm(KvmUnavailable::Missing {
                path: "/nonexistent/kvm".into(),
                errno: gmem::Errno::ENOENT
            }))
        );
        assert_eq!(r.features.len(), 11);
        for f in &r.features {
            assert!(!f.kernel.available, "{f:?}");
            assert!(
                f.kernel.detail.contains("no /nonexistent/kvm on this host"),
                "{f:?}"
            );
        }
        assert!(r
            .feature("conversion")
            .is_some_and(|f| f.emulated.available));
        assert!(r
            .feature("guest_memslots")
            .is_some_and(|f| !f.emulated.available));
    }

    #[test]
    fn collect_runs_and_lists_every_feature() {
        let r = collect();
        let names: Vec<&str> = r.features.iter().map(|f| f.feature).collect();
        assert_eq!(
            names,
            [
                "create",
                "mmap",
                "init_shared",
                "conversion",
                "sigbus_on_private",
                "punch_hole",
                "pins_eagain",
                "no_direct_map",
                "guest_memslots",
                "map_gpa_range_exit",
                "memory_fault_exit"
            ]
        );
        for f in &r.features {
            assert!(
                !f.emulated.detail.is_empty() && !f.kernel.detail.is_empty(),
                "{f:?}"
            );
        }
        assert!(r
            .feature("conversion")
            .is_some_and(|f| f.emulated.available));
        // The conversion row says what the one probe says, word for word.
        let kernel = &r.feature("conversion").expect("a conversion row").kernel;
        match gmem::host::require(gmem::host::Feature::Conversion) {
            Ok(()) => assert!(kernel.available, "{}", kernel.detail),
            Err(why) => {
                assert!(!kernel.available);
                assert_eq!(kernel.detail, why.to_string());
            }
        }
    }
}
