//! arm64 pKVM: no conversion hooks, scrub on reclaim.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{PageRef, Platform, PlatformKind, PlatformReport};

/// pKVM: EL2 changes stage-2 ownership on the guest's share/unshare hypercalls, so conversions
/// need no hook and preserve the page in place; reclaim scrubs the page before it returns to
/// the host (seed 001).
#[derive(Debug, Default)]
pub struct Pkvm {
    scrubbed: AtomicU64,
}

impl Platform for Pkvm {
    fn kind(&self) -> PlatformKind {
        PlatformKind::Pkvm
    }

    fn reclaim(&self, page: &PageRef<'_>) {
        page.zero();
        self.scrubbed.fetch_add(1, Ordering::Relaxed);
    }

    fn report(&self) -> PlatformReport {
        PlatformReport {
            scrubbed: self.scrubbed.load(Ordering::Relaxed),
            ..PlatformReport::default()
        }
    }
}
