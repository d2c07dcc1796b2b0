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
    use std::os::fd::AsRawFd;

    use crate::error::Errno;
    use crate::file::GuestMemfd;
    use crate::kernel::KernelBackend;
    use crate::sys::PAGE_SIZE;
    use crate::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};

    /// The pipes of a pin really hold the pages: FIONREAD counts every pinned byte.
    #[test]
    fn vmsplice_pin_fills_pipes_with_the_pages() {
        let backend = match KernelBackend::new() {
            Ok(b) => b,
            Err(e) => {
                println!("skipped: /dev/kvm is unusable: {e}");
                return;
            }
        };
        let f = backend
            .create_guest_memfd(
                512 * PAGE_SIZE,
                GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            )
            .unwrap();
        let view = f.host_view().unwrap();
        let len = view.len();
        let pipes = crate::sys::vmsplice_pin(view, 0, len).unwrap();
        let mut queued = 0usize;
        for (r, _) in &pipes {
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD on our own pipe writes one int, `n`.
            let ret = unsafe { libc::ioctl(r.as_raw_fd(), libc::FIONREAD, &mut n) };
            assert_eq!(ret, 0);
            queued += usize::try_from(n).unwrap();
        }
        assert_eq!(queued, len, "{} pipes", pipes.len());
    }

    /// The crate-internal accessors are what a memslot needs: KVM accepts the guest_memfd and
    /// its host view in KVM_SET_USER_MEMORY_REGION2 with KVM_MEM_GUEST_MEMFD. Also checks
    /// the fd-level errnos host.md lists.
    #[test]
    fn accessors_bind_a_memslot_and_the_fd_refuses_file_io() {
        let backend = match KernelBackend::new() {
            Ok(b) => b,
            Err(e) => {
                println!("skipped: /dev/kvm is unusable: {e}");
                return;
            }
        };
        let f = backend
            .create_guest_memfd(
                16 * PAGE_SIZE,
                GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            )
            .unwrap();
        let fd = f.guest_memfd_fd().unwrap().as_raw_fd();
        let view = f.host_view().unwrap();
        assert!(
            std::ptr::eq(view, f.host_view().unwrap()),
            "one view per file"
        );
        assert_eq!(view.len() as u64, 16 * PAGE_SIZE);
        let region = kvm_bindings::kvm_userspace_memory_region2 {
            slot: 0,
            flags: crate::uapi::KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: 0x10_0000,
            memory_size: 16 * PAGE_SIZE,
            userspace_addr: view.as_ptr() as u64,
            guest_memfd_offset: 0,
            guest_memfd: u32::try_from(fd).unwrap(),
            ..Default::default()
        };
        match f.memslot_source().unwrap() {
            crate::MemslotSource::GuestMemfd { vm, .. } => {
                assert!(std::ptr::eq(vm, backend.vm_fd()))
            }
            other => panic!("a kernel file binds as {other:?}"),
        }
        // SAFETY: the region is the file's host view, which outlives the VM's use of it here
        // (the slot is deleted below, before `f` is dropped).
        unsafe { backend.vm_fd().set_user_memory_region2(region) }.unwrap();
        let delete = kvm_bindings::kvm_userspace_memory_region2 {
            memory_size: 0,
            ..region
        };
        // SAFETY: deleting the slot created above.
        unsafe { backend.vm_fd().set_user_memory_region2(delete) }.unwrap();

        let mut b = [0u8; 8];
        // SAFETY: plain syscalls on our own descriptor with a valid 8-byte buffer.
        let (read, pread, pwrite, lseek, ftruncate) = unsafe {
            (
                (libc::read(fd, b.as_mut_ptr().cast(), 8), Errno::last()),
                (libc::pread(fd, b.as_mut_ptr().cast(), 8, 0), Errno::last()),
                (libc::pwrite(fd, b.as_ptr().cast(), 8, 0), Errno::last()),
                (libc::lseek(fd, 0, libc::SEEK_SET), Errno::last()),
                (libc::ftruncate(fd, 0), Errno::last()),
            )
        };
        assert_eq!(read, (-1, Errno::EINVAL));
        assert_eq!(pread, (-1, Errno::ESPIPE));
        assert_eq!(pwrite, (-1, Errno::ESPIPE));
        assert_eq!(lseek, (-1, Errno::ESPIPE));
        assert_eq!(ftruncate, (-1, Errno::EINVAL));
    }
}
