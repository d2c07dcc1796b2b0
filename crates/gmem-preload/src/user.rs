//! Copies between the program's memory and the interposer's, failing with EFAULT on a bad
//! address as the kernel's `copy_from_user` does, instead of crashing in the interposer.

use std::ffi::c_void;
use std::mem::{size_of, MaybeUninit};

use gmem::Errno;

/// Sets the calling thread's `errno`.
pub(crate) fn set_errno(e: i32) {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() = e };
}

/// The calling thread's `errno`.
pub(crate) fn errno() -> i32 {
    // SAFETY: as in `set_errno`.
    unsafe { *libc::__errno_location() }
}

fn own_pid() -> libc::pid_t {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

/// Reads a `T` from the program's address `addr`.
pub(crate) fn copy_from<T: Copy>(addr: *const c_void) -> Result<T, Errno> {
    if addr.is_null() {
        return Err(Errno::EFAULT);
    }
    let mut v = MaybeUninit::<T>::zeroed();
    let local = libc::iovec {
        iov_base: v.as_mut_ptr().cast(),
        iov_len: size_of::<T>(),
    };
    let remote = libc::iovec {
        iov_base: addr.cast_mut(),
        iov_len: size_of::<T>(),
    };
    // SAFETY: process_vm_readv on this process writes at most size_of::<T>() bytes into `v`
    // and reports a bad `addr` as an error instead of faulting.
    let n = unsafe { libc::process_vm_readv(own_pid(), &local, 1, &remote, 1, 0) };
    if n != size_of::<T>() as isize {
        return Err(Errno::EFAULT);
    }
    // SAFETY: every byte was written, and T is plain data (the uAPI structs: any bit
    // pattern is valid).
    Ok(unsafe { v.assume_init() })
}

/// Writes `value` to the program's address `addr`.
pub(crate) fn copy_to<T: Copy>(addr: *mut c_void, value: &T) -> Result<(), Errno> {
    if addr.is_null() {
        return Err(Errno::EFAULT);
    }
    let local = libc::iovec {
        iov_base: (value as *const T).cast_mut().cast(),
        iov_len: size_of::<T>(),
    };
    let remote = libc::iovec {
        iov_base: addr,
        iov_len: size_of::<T>(),
    };
    // SAFETY: process_vm_writev reads size_of::<T>() bytes from `value` and reports a bad
    // `addr` as an error.
    let n = unsafe { libc::process_vm_writev(own_pid(), &local, 1, &remote, 1, 0) };
    if n != size_of::<T>() as isize {
        return Err(Errno::EFAULT);
    }
    Ok(())
}
