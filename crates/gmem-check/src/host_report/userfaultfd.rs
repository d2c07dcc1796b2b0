//! userfaultfd: whether an unprivileged process can have one, and its features (the emulated
//! backend's poison-marker revocation needs `UFFD_FEATURE_POISON` and
//! `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`). The handshake is gmem's own
//! ([`gmem::os::userfaultfd_features`]); this module only names what it answers.

use std::path::Path;

use gmem::uapi::{
    UFFD_FEATURE_MINOR_SHMEM, UFFD_FEATURE_MISSING_SHMEM, UFFD_FEATURE_POISON,
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
};

use super::read_u64;

/// userfaultfd feature bits by name (`UFFD_FEATURE_*` without the prefix,
/// include/uapi/linux/userfaultfd.h, Linux 6.8), for rendering a feature mask.
pub const UFFD_FEATURE_NAMES: [(u64, &str); 17] = [
    (1 << 0, "PAGEFAULT_FLAG_WP"),
    (1 << 1, "EVENT_FORK"),
    (1 << 2, "EVENT_REMAP"),
    (1 << 3, "EVENT_REMOVE"),
    (1 << 4, "MISSING_HUGETLBFS"),
    (UFFD_FEATURE_MISSING_SHMEM, "MISSING_SHMEM"),
    (1 << 6, "EVENT_UNMAP"),
    (1 << 7, "SIGBUS"),
    (1 << 8, "THREAD_ID"),
    (1 << 9, "MINOR_HUGETLBFS"),
    (UFFD_FEATURE_MINOR_SHMEM, "MINOR_SHMEM"),
    (1 << 11, "EXACT_ADDRESS"),
    (UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
    (1 << 13, "WP_UNPOPULATED"),
    (UFFD_FEATURE_POISON, "POISON"),
    (1 << 15, "WP_ASYNC"),
    (1 << 16, "MOVE"),
];

/// Renders a `UFFD_FEATURE_*` mask as names (unknown bits as hex).
pub fn uffd_feature_names(features: u64) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = features;
    for (bit, name) in UFFD_FEATURE_NAMES {
        if features & bit != 0 {
            out.push(name.to_string());
            rest &= !bit;
        }
    }
    if rest != 0 {
        out.push(format!("{rest:#x}"));
    }
    out
}

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

impl UserfaultfdReport {
    /// Whether the emulated backend can revoke with poison markers (`UFFD_FEATURE_POISON`
    /// and `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`).
    pub fn poison_markers(&self) -> bool {
        self.available
            && self.features & UFFD_FEATURE_POISON != 0
            && self.features & UFFD_FEATURE_WP_HUGETLBFS_SHMEM != 0
    }
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
