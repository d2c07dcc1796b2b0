//! The KVM ioctls gmem issues itself (kvm-ioctls covers the others): creating a guest_memfd as
//! an owned descriptor, and `KVM_SET_MEMORY_ATTRIBUTES2` on it.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use kvm_ioctls::VmFd;

use crate::error::{Errno, KernelResult};
use crate::uapi::{kvm_create_guest_memfd, kvm_memory_attributes2, KVM_SET_MEMORY_ATTRIBUTES2};

/// `KVM_CREATE_GUEST_MEMFD` on `vm`, as an owned descriptor.
pub fn create_guest_memfd(vm: &VmFd, args: kvm_create_guest_memfd) -> KernelResult<OwnedFd> {
    let raw = vm.create_guest_memfd(args)?;
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `KVM_SET_MEMORY_ATTRIBUTES2` on guest_memfd `fd` as is; the kernel writes the struct back
/// (`error_offset`).
pub fn set_memory_attributes2(
    fd: BorrowedFd<'_>,
    a: &mut kvm_memory_attributes2,
) -> KernelResult<()> {
    // SAFETY: the ioctl reads and writes one `struct kvm_memory_attributes2` (its size is
    // encoded in the request number), which `a` is, exclusively borrowed for the call.
    let ret = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            KVM_SET_MEMORY_ATTRIBUTES2(),
            std::ptr::from_mut(a),
        )
    };
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, AsRawFd};

    use crate::sys::{ftruncate, memfd_create, Mmap, PAGE_SIZE};

    /// The pipes of a pin really hold the pages: FIONREAD counts every pinned byte (the kernel
    /// backend pins its files' pages this way; any shared file mapping shows it).
    #[test]
    fn vmsplice_pin_fills_pipes_with_the_pages() {
        let len = 512 * PAGE_SIZE as usize;
        let fd = memfd_create(c"pin").expect("memfd");
        ftruncate(fd.as_fd(), len as u64).expect("ftruncate");
        let view = Mmap::new(Some(fd.as_fd()), 0, len, libc::MAP_SHARED).expect("mmap");
        let pipes = crate::sys::vmsplice_pin(&view, 0, len).expect("pin");
        let mut queued = 0usize;
        for (r, _) in &pipes {
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD on our own pipe writes one int, `n`.
            let ret = unsafe { libc::ioctl(r.as_raw_fd(), libc::FIONREAD, &mut n) };
            assert_eq!(ret, 0);
            queued += usize::try_from(n).expect("a byte count");
        }
        assert_eq!(queued, len, "{} pipes", pipes.len());
    }
}
