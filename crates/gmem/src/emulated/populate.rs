//! Populate (`kvm_gmem_populate`) and the launch flows that measure it.

use super::EmulatedGuestMemfd;
use crate::error::{Errno, KernelResult};

use crate::platform::{HookCall, LaunchMeasurement, PageRef, PageType, PAGE};
use crate::sys::PAGE_SIZE;
use crate::uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE;

/// Source page `i` of `source`, GUP-ed page by page as the kernel does (§2.7): EFAULT for a
/// page past the end of the buffer (an unmapped user address), so a short source ends
/// populate there with the pages done so far.
pub(super) fn source_page(source: Option<&[u8]>, i: u64) -> KernelResult<Option<&[u8]>> {
    match source {
        None => Ok(None),
        Some(src) => {
            let at = usize::try_from(i).map_err(|_| Errno::EFAULT)? * PAGE;
            src.get(at..at + PAGE).map(Some).ok_or(Errno::EFAULT)
        }
    }
}

impl EmulatedGuestMemfd {
    /// `kvm_gmem_populate` (docs/series.md §2.7) over `npages` pages from `offset`, clamped to
    /// the end of the file (the kernel clamps to the end of the memslot; a memslot here is the
    /// whole file): each page must be private (EINVAL otherwise); a page not up to date is
    /// zeroed first; with a `source` its page is copied in (the legacy flow), GUP-ed page by
    /// page, so a source shorter than the range stops at its end (EFAULT for that page);
    /// without one the page is its own source (the in-place flow of seed 000); then the
    /// platform's post-populate hook runs. `cancel` is polled before each page (a pending
    /// signal). Returns the pages done if any, else the error (EINTR when cancelled).
    pub fn populate(
        &self,
        offset: u64,
        source: Option<&[u8]>,
        npages: u64,
        cancel: &dyn Fn() -> bool,
    ) -> KernelResult<u64> {
        self.populate_each(offset, source, npages, cancel, &mut |_, _| Ok(()))
    }

    /// `KVM_SEV_SNP_LAUNCH_UPDATE` / `KVM_TDX_INIT_MEM_REGION`: [`Self::populate`] of pages
    /// at guest physical `gpa`, each extending `measurement` with (gpa, type, contents).
    /// ENOTTY on a platform without a launch flow.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_populate(
        &self,
        gpa: u64,
        offset: u64,
        source: Option<&[u8]>,
        npages: u64,
        ty: PageType,
        measurement: &mut LaunchMeasurement,
        cancel: &dyn Fn() -> bool,
    ) -> KernelResult<u64> {
        if !self.platform().has_launch_populate() {
            return Err(Errno::ENOTTY);
        }
        let first = offset / PAGE_SIZE;
        self.populate_each(offset, source, npages, cancel, &mut |index, page| {
            measurement.extend(gpa + (index - first) * PAGE_SIZE, ty, &page.read());
            Ok(())
        })
    }

    pub(super) fn populate_each(
        &self,
        offset: u64,
        source: Option<&[u8]>,
        npages: u64,
        cancel: &dyn Fn() -> bool,
        each: &mut dyn FnMut(u64, &PageRef<'_>) -> KernelResult<()>,
    ) -> KernelResult<u64> {
        self.owner_only()?;
        // WARN + EINVAL for 0 pages; the start must lie in the memslot (EINVAL otherwise);
        // npages is clamped to the end of the memslot (§2.7).
        if npages == 0 || offset % PAGE_SIZE != 0 || offset >= self.inner.size {
            return Err(Errno::EINVAL);
        }
        let npages = npages.min((self.inner.size - offset) / PAGE_SIZE);
        let first = offset / PAGE_SIZE;
        let mut done = 0u64;
        // The source page is read before any lock is taken, as the kernel GUPs it before
        // taking the invalidate lock (§2.7): a source that is itself an unfaulted page of a
        // host mapping (of this very file, with NO_DIRECT_MAP: served by the fault service,
        // which needs the page bits) then faults in without waiting on us.
        let mut staged = vec![0u8; PAGE];
        let result = (|| {
            for i in 0..npages {
                if cancel() {
                    return Err(Errno::EINTR);
                }
                let src = match source_page(source, i)? {
                    Some(page) => {
                        // Volatile reads make no assumption about concurrent writers of a
                        // shared source.
                        crate::sys::copy_volatile(page, &mut staged);
                        Some(staged.as_slice())
                    }
                    None => None,
                };
                let index = first + i;
                // The invalidate lock, exclusively, per page (§2.7).
                let st = self.write_state();
                if st.attrs.get(index) & KVM_MEMORY_ATTRIBUTE_PRIVATE == 0 {
                    return Err(Errno::EINVAL);
                }
                let mut bits = self.inner.bits();
                self.inner.make_uptodate(&mut bits, index)?;
                if let Some(src) = src {
                    self.inner.gmem_write(&bits, index, Some(src))?;
                }
                let page = self.inner.page_ref(&bits, index)?;
                if self.inner.hooks.post_populate {
                    self.inner.log(HookCall::PostPopulate(index));
                    self.inner.platform.post_populate(&page, src.is_some())?;
                }
                each(index, &page)?;
                drop(bits);
                drop(st);
                done += 1;
            }
            Ok(())
        })();
        match result {
            Err(e) if done == 0 => Err(e),
            _ => Ok(done),
        }
    }
}
