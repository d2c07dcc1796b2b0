//! `KVM_PRE_FAULT_MEMORY`'s walk (docs/series.md §1.6; `kvm_vcpu_pre_fault_memory` in
//! virt/kvm/kvm_main.c), for VMMs that answer the vCPU ioctl themselves where the kernel
//! cannot (gmem-vmm's emulated backend, `gmem exec`'s interposer): the argument checks and the
//! page-by-page progress, around the caller's fault of one page.

use crate::error::{Errno, KernelResult};
use crate::sys::PAGE_SIZE;
use crate::uapi::kvm_pre_fault_memory;

/// Walks `range` as the kernel does: `flags != 0`, an unaligned `gpa` or `size`, or a range
/// that wraps (size 0 included) is EINVAL with nothing done; then `fault_page(gpa)` page by
/// page, `gpa` advancing and `size` shrinking after each page done, until the range is done or
/// a page fails. `Ok` if at least one page was done (the rest, if any, left in `range`), else
/// that page's error with `range` unchanged: so `size` shrinks exactly when the call succeeds.
pub fn walk(
    range: &mut kvm_pre_fault_memory,
    mut fault_page: impl FnMut(u64) -> KernelResult<()>,
) -> KernelResult<()> {
    if range.flags != 0
        || range.gpa % PAGE_SIZE != 0
        || range.size % PAGE_SIZE != 0
        || range
            .gpa
            .checked_add(range.size)
            .is_none_or(|end| end <= range.gpa)
    {
        return Err(Errno::EINVAL);
    }
    let full = range.size;
    let mut result = Ok(());
    while range.size > 0 {
        if let Err(e) = fault_page(range.gpa) {
            result = Err(e);
            break;
        }
        range.gpa += PAGE_SIZE;
        range.size -= PAGE_SIZE;
    }
    if range.size < full {
        Ok(())
    } else {
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(gpa: u64, size: u64, flags: u64) -> kvm_pre_fault_memory {
        kvm_pre_fault_memory {
            gpa,
            size,
            flags,
            ..Default::default()
        }
    }

    /// Progress is success, no progress is the page's error with the range unchanged, and a
    /// bad argument is EINVAL before any page.
    #[test]
    fn walk_advances_only_on_progress() {
        let below_2 = |gpa: u64| {
            if gpa < 2 * PAGE_SIZE {
                Ok(())
            } else {
                Err(Errno::ENOENT)
            }
        };
        let mut r = range(PAGE_SIZE, 3 * PAGE_SIZE, 0);
        assert_eq!(walk(&mut r, below_2), Ok(()));
        assert_eq!((r.gpa, r.size), (2 * PAGE_SIZE, 2 * PAGE_SIZE));
        assert_eq!(walk(&mut r, below_2), Err(Errno::ENOENT));
        assert_eq!((r.gpa, r.size), (2 * PAGE_SIZE, 2 * PAGE_SIZE));
        for mut bad in [
            range(0, PAGE_SIZE, 1),
            range(1, PAGE_SIZE, 0),
            range(0, 1, 0),
            range(0, 0, 0),
            range(PAGE_SIZE.wrapping_neg(), 2 * PAGE_SIZE, 0),
        ] {
            let before = (bad.gpa, bad.size);
            assert_eq!(
                walk(&mut bad, |_| panic!("a page of a bad range")),
                Err(Errno::EINVAL)
            );
            assert_eq!((bad.gpa, bad.size), before);
        }
    }
}
