//! Every system call of gmem-bench that needs `unsafe`, behind safe functions, and the plain
//! memfd mappings the floors measure. The only module of the crate allowed `unsafe`
//! (`#![deny(unsafe_code)]` at the crate root).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use gmem::error::{Errno, KernelResult};
pub(crate) use gmem::os::Mmap;
use gmem::uapi::KVM_MEM_GUEST_MEMFD;
use gmem::MemslotSource;
use gmem_vmm::stats::time_us;
use kvm_ioctls::VmFd;

use crate::error::BenchError;

/// A memfd of `len` bytes.
pub(crate) fn memfd(len: u64) -> KernelResult<OwnedFd> {
    let fd = gmem::os::memfd_create(c"gmem-floor")?;
    gmem::os::ftruncate(fd.as_fd(), len)?;
    Ok(fd)
}

/// A `MAP_SHARED | flags` mapping of the first `len` bytes of `fd`.
pub(crate) fn map_shared(fd: &OwnedFd, len: u64, flags: libc::c_int) -> KernelResult<Mmap> {
    let n = usize::try_from(len).map_err(|_| Errno::ENOMEM)?;
    Mmap::new(Some(fd.as_fd()), 0, n, libc::MAP_SHARED | flags)
}

fn mprotect(map: &Mmap, prot: libc::c_int) -> KernelResult<()> {
    // SAFETY: the range is exactly the live mapping `map` borrows, so no other memory changes
    // protection; the only caller restores PROT_READ | PROT_WRITE before anything can access
    // the mapping again.
    match unsafe { libc::mprotect(map.as_ptr().cast(), map.len(), prot) } {
        0 => Ok(()),
        _ => Err(Errno::last()),
    }
}

/// The time of one `mprotect(PROT_NONE)` of all of `map`, microseconds; the mapping is
/// readable and writable again when this returns (the restore is not timed).
pub(crate) fn protect_none_us(map: &Mmap) -> KernelResult<f64> {
    let t = time_us(|| mprotect(map, libc::PROT_NONE));
    mprotect(map, libc::PROT_READ | libc::PROT_WRITE)?;
    t
}

/// Adds memslot `slot` at `gpa` over the first `len` bytes of `source`, then deletes it:
/// `KVM_SET_USER_MEMORY_REGION2` with `KVM_MEM_GUEST_MEMFD` for a guest_memfd, plain
/// `KVM_SET_USER_MEMORY_REGION` for a guest view. Returns the two times, microseconds.
pub(crate) fn memslot_add_remove_us(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    len: u64,
    source: &MemslotSource<'_>,
) -> Result<[f64; 2], BenchError> {
    let call = |what: &'static str| {
        move |e: kvm_ioctls::Error| BenchError::Call {
            what,
            errno: Errno(e.errno()),
        }
    };
    match *source {
        MemslotSource::GuestMemfd {
            ref fd,
            userspace_addr,
            ..
        } => {
            let guest_memfd = u32::try_from(fd.as_raw_fd())?;
            let region = |memory_size: u64| kvm_bindings::kvm_userspace_memory_region2 {
                slot,
                flags: KVM_MEM_GUEST_MEMFD,
                guest_phys_addr: gpa,
                memory_size,
                userspace_addr,
                guest_memfd_offset: 0,
                guest_memfd,
                ..Default::default()
            };
            // SAFETY: the file's mapping at `userspace_addr` lives as long as `source`
            // borrows the file, past the deletion of the slot just below.
            let add = time_us(|| unsafe { vm.set_user_memory_region2(region(len)) })
                .map_err(call("KVM_SET_USER_MEMORY_REGION2"))?;
            // SAFETY: deleting the slot added above.
            let remove = time_us(|| unsafe { vm.set_user_memory_region2(region(0)) })
                .map_err(call("delete REGION2"))?;
            Ok([add, remove])
        }
        MemslotSource::GuestView { userspace_addr, .. } => {
            let region = |memory_size: u64| kvm_bindings::kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: gpa,
                memory_size,
                userspace_addr,
            };
            // SAFETY: the guest view at `userspace_addr` lives as long as `source` borrows
            // the file, past the deletion of the slot just below.
            let add = time_us(|| unsafe { vm.set_user_memory_region(region(len)) })
                .map_err(call("KVM_SET_USER_MEMORY_REGION"))?;
            // SAFETY: deleting the slot added above.
            let remove = time_us(|| unsafe { vm.set_user_memory_region(region(0)) })
                .map_err(call("delete REGION"))?;
            Ok([add, remove])
        }
    }
}

/// A fork child that reads every page of a mapping of the parent's each time it is asked
/// (one byte over a socket pair), answers, and waits; it exits when the socket closes. The
/// child runs only `read`, `write`, volatile loads and `_exit` (async-signal-safe: the parent
/// has other threads).
pub(crate) struct Follower {
    pid: libc::pid_t,
    sock: std::os::unix::net::UnixStream,
}

impl Follower {
    /// Forks a follower reading `[at, at + len)` (a live host mapping of the parent, inherited
    /// by the child at the same address).
    pub(crate) fn fork(at: *mut u8, len: usize) -> KernelResult<Follower> {
        let (mine, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| io_errno(&e))?;
        let (at, fd) = (at as usize, theirs.as_raw_fd());
        // SAFETY: fork(2). The child touches only the inherited mapping (volatile reads of
        // its pages) and its end of the socket, and leaves with _exit without running the
        // parent's destructors.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(Errno::last());
        }
        if pid == 0 {
            let mut b = 0u8;
            loop {
                // SAFETY: one byte into a local, on a descriptor this child owns.
                if unsafe { libc::read(fd, (&raw mut b).cast(), 1) } != 1 {
                    // SAFETY: ends the child at once.
                    unsafe { libc::_exit(0) };
                }
                for off in (0..len).step_by(gmem::PAGE_SIZE as usize) {
                    // SAFETY: a page of the mapping the parent made before the fork and
                    // keeps alive while this child lives (it waits for the child first).
                    unsafe { std::ptr::read_volatile((at + off) as *const u8) };
                }
                // SAFETY: one byte from a local.
                unsafe { libc::write(fd, (&raw const b).cast(), 1) };
            }
        }
        drop(theirs);
        Ok(Follower { pid, sock: mine })
    }

    /// Has the follower read every page, and waits until it has.
    pub(crate) fn touch_all(&mut self) -> KernelResult<()> {
        use std::io::{Read, Write};
        let mut b = [1u8];
        self.sock.write_all(&b).map_err(|e| io_errno(&e))?;
        self.sock.read_exact(&mut b).map_err(|e| io_errno(&e))
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        let mut status = 0;
        // SAFETY: reaps our own child, which exits once its socket is closed.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno(e.raw_os_error().unwrap_or(libc::EIO))
}
