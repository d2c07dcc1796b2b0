//! Intel TDX: the Secure-EPT, zeroing on removal, INIT_MEM_REGION.

use std::collections::BTreeSet;
use std::sync::Mutex;

use super::{PageRef, Platform, PlatformKind, PlatformReport};
use crate::error::{Errno, KernelResult};

#[derive(Debug, Default)]
struct Sept {
    pages: BTreeSet<u64>,
    report: PlatformReport,
}

/// TDX: a Secure-EPT model. A guest fault of a private page adds it (the guest accepts it,
/// which zeroes it); conversion to shared and reclaim remove it, and removal zeroes it;
/// INIT_MEM_REGION (populate) adds it with its content.
#[derive(Debug, Default)]
pub struct Tdx {
    sept: Mutex<Sept>,
}

impl Tdx {
    fn sept(&self) -> std::sync::MutexGuard<'_, Sept> {
        self.sept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether page `index` is in the Secure-EPT.
    pub fn mapped(&self, index: u64) -> bool {
        self.sept().pages.contains(&index)
    }
}

impl Platform for Tdx {
    fn kind(&self) -> PlatformKind {
        PlatformKind::Tdx
    }

    fn make_private(&self, page: &PageRef<'_>) -> KernelResult<()> {
        let mut s = self.sept();
        if s.pages.insert(page.index()) {
            page.zero();
            s.report.assigned += 1;
        }
        Ok(())
    }

    fn make_shared(&self, page: &PageRef<'_>) {
        let mut s = self.sept();
        if s.pages.remove(&page.index()) {
            page.zero();
            s.report.returned += 1;
        }
    }

    fn reclaim(&self, page: &PageRef<'_>) {
        let mut s = self.sept();
        if s.pages.remove(&page.index()) {
            page.zero();
            s.report.returned += 1;
        }
    }

    fn post_populate(&self, page: &PageRef<'_>, _copied: bool) -> KernelResult<()> {
        let mut s = self.sept();
        // TDH.MEM.PAGE.ADD of a page already mapped fails.
        if !s.pages.insert(page.index()) {
            return Err(Errno::EINVAL);
        }
        s.report.assigned += 1;
        Ok(())
    }

    fn gmem_write(&self, index: u64) -> KernelResult<()> {
        let mut s = self.sept();
        if s.pages.contains(&index) {
            s.report.violations += 1;
            return Err(Errno::EFAULT);
        }
        Ok(())
    }

    fn report(&self) -> PlatformReport {
        let s = self.sept();
        PlatformReport {
            guest_owned: s.pages.len() as u64,
            ..s.report.clone()
        }
    }
}
