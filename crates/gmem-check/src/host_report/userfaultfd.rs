//! userfaultfd: whether an unprivileged process can have one, and its features (the emulated
//! backend's poison-marker revocation needs `UFFD_FEATURE_POISON` and
//! `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`). The handshake is gmem's own
//! ([`gmem::os::userfaultfd_features`]); this module only names what it answers.

use std::path::Path;

use super::read_u64;

pub use gmem::uapi::{uffd_feature_names, UFFD_FEATURE_NAMES};

/// userfaultfd availability and features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserfaultfdReport {
    /// Whether `userfaultfd(UFFD_USER_MODE_ONLY)` and `UFFDIO_API` succeeded.
    pub available: bool,
    /// Why not.
    pub error: Option<String>,
    /// `uffdio_api.features` as returned for a request of 0 (every supported feature).
    pub features: u64,
    /// The features by name.
    pub feature_names: Vec<String>,
    /// Whether `/dev/userfaultfd` exists.
    pub dev_userfaultfd: bool,
    /// `vm.unprivileged_userfaultfd`.
    pub unprivileged_userfaultfd: Option<u64>,
}

/// Asks the kernel for its userfaultfd features.
pub(super) fn collect() -> UserfaultfdReport {
    let mut r = UserfaultfdReport {
        available: false,
        error: None,
        features: 0,
        feature_names: Vec::new(),
        dev_userfaultfd: Path::new("/dev/userfaultfd").exists(),
        unprivileged_userfaultfd: read_u64("/proc/sys/vm/unprivileged_userfaultfd"),
    };
    match gmem::os::userfaultfd_features() {
        Ok(features) => {
            r.available = true;
            r.features = features;
            r.feature_names = uffd_feature_names(features);
        }
        // gmem's handshake answers one errno for both calls: which of the two failed is not
        // known here.
        Err(e) => {
            r.error = Some(format!(
                "userfaultfd(UFFD_USER_MODE_ONLY) or UFFDIO_API failed: {e}"
            ));
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_names() {
        assert_eq!(
            uffd_feature_names(
                (1 << 10) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 16) | (1 << 20)
            ),
            [
                "MINOR_SHMEM",
                "WP_HUGETLBFS_SHMEM",
                "WP_UNPOPULATED",
                "POISON",
                "MOVE",
                "0x100000"
            ]
        );
    }
}
