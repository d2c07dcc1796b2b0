//! The C library functions the interposer defines. Each one is the fast path (owned
//! descriptor? KVM request? any emulated mapping?) and a call to the module that handles the
//! rest. The prototypes are glibc's on x86_64; the variadic ones (`ioctl`, `fcntl`, `open`)
//! take their optional argument as one register-sized value, which the SysV calling
//! convention passes in the same register either way.

use std::ffi::{c_char, c_int, c_uint, c_ulong, c_void};

use libc::{iovec, off_t, size_t, ssize_t};

use crate::fdtable::{owned, tracked};
use crate::{fdtable, files, kvm, real};
use gmem::Errno;

/// The requests the interposer answers on descriptors that are not emulated files: on
/// `/dev/kvm` and on VMs.
#[inline(always)]
fn kvm_request(req: c_ulong) -> bool {
    matches!(
        req as u32,
        kvm::KVM_CHECK_EXTENSION
            | kvm::KVM_CREATE_VM
            | kvm::KVM_CREATE_GUEST_MEMFD
            | kvm::KVM_SET_USER_MEMORY_REGION2
            | kvm::KVM_SET_USER_MEMORY_REGION
            | kvm::KVM_PRE_FAULT_MEMORY
            | kvm::KVM_CREATE_VCPU
    )
}

#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int {
    if !owned(fd) && !kvm_request(req) {
        // SAFETY: the program's call, forwarded unchanged.
        return unsafe { real::ioctl()(fd, req, arg) };
    }
    let _inside = fdtable::Inside::enter();
    kvm::ioctl(fd, req, arg)
}

#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if !tracked(fd) || !fdtable::table_is_ours() {
        // SAFETY: forwarded.
        return unsafe { real::close()(fd) };
    }
    let _inside = fdtable::Inside::enter();
    files::close(fd)
}

#[no_mangle]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    if flags as c_uint & libc::CLOSE_RANGE_CLOEXEC == 0 && fdtable::table_is_ours() {
        let hi = last.min(c_int::MAX as c_uint) as c_int;
        for fd in first as c_int..=hi {
            if tracked(fd) {
                drop(fdtable::forget(fd));
            }
            if fd >= 1 << 16 {
                break; // beyond the bitmap, forget() is per descriptor: leave to lookup()
            }
        }
    }
    // SAFETY: forwarded.
    unsafe { real::close_range()(first, last, flags) }
}

#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    // SAFETY: forwarded.
    let new = unsafe { real::dup()(fd) };
    if new >= 0 && tracked(fd) && fdtable::table_is_ours() {
        files::duplicated("dup", fd, new);
    }
    new
}

#[no_mangle]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    if !tracked(old) && !tracked(new) || !fdtable::table_is_ours() {
        // SAFETY: forwarded.
        return unsafe { real::dup2()(old, new) };
    }
    if old != new {
        drop(fdtable::forget(new));
    }
    // SAFETY: forwarded.
    let r = unsafe { real::dup2()(old, new) };
    if r >= 0 && old != new {
        files::duplicated("dup2", old, r);
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    if !tracked(old) && !tracked(new) || !fdtable::table_is_ours() {
        // SAFETY: forwarded.
        return unsafe { real::dup3()(old, new, flags) };
    }
    if old != new {
        drop(fdtable::forget(new));
    }
    // SAFETY: forwarded.
    let r = unsafe { real::dup3()(old, new, flags) };
    if r >= 0 {
        files::duplicated("dup3", old, r);
    }
    r
}

fn fcntl_common(
    f: unsafe extern "C" fn(c_int, c_int, c_ulong) -> c_int,
    fd: c_int,
    cmd: c_int,
    arg: c_ulong,
) -> c_int {
    // SAFETY: forwarded.
    let r = unsafe { f(fd, cmd, arg) };
    if r >= 0
        && (cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC)
        && tracked(fd)
        && fdtable::table_is_ours()
    {
        files::duplicated("fcntl(F_DUPFD)", fd, r);
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    fcntl_common(real::fcntl(), fd, cmd, arg)
}

#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    fcntl_common(real::fcntl64(), fd, cmd, arg)
}

fn mmap_common(
    f: unsafe extern "C" fn(*mut c_void, size_t, c_int, c_int, c_int, off_t) -> *mut c_void,
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    if owned(fd) {
        let _inside = fdtable::Inside::enter();
        if let Some(r) = files::mmap(addr as usize, len, prot, flags, fd, off) {
            return r.unwrap_or_else(|e| {
                crate::user::set_errno(e.0);
                libc::MAP_FAILED
            });
        }
    }
    // SAFETY: forwarded.
    unsafe { f(addr, len, prot, flags, fd, off) }
}

#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    mmap_common(real::mmap(), addr, len, prot, flags, fd, off)
}

#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    mmap_common(real::mmap64(), addr, len, prot, flags, fd, off)
}

#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: size_t) -> c_int {
    if !fdtable::any_mapping() || fdtable::inside() {
        // SAFETY: forwarded.
        return unsafe { real::munmap()(addr, len) };
    }
    let _inside = fdtable::Inside::enter();
    files::munmap(addr as usize, len)
}

/// `mremap(old, old_len, new_len, flags, ... /* new_address */)`: C's variadic fifth argument
/// is read as a fixed one (the x86_64 SysV convention passes both in the same register), and
/// used only with `MREMAP_FIXED`, when the caller passed it.
#[no_mangle]
pub unsafe extern "C" fn mremap(
    addr: *mut c_void,
    old_len: size_t,
    new_len: size_t,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    if fdtable::any_mapping() && !fdtable::inside() {
        let _inside = fdtable::Inside::enter();
        if let Some(r) = files::mremap(addr as usize, old_len, new_len, flags, new_addr as usize) {
            return match r {
                Ok(p) => p,
                Err(e) => {
                    crate::user::set_errno(e.0);
                    libc::MAP_FAILED
                }
            };
        }
    }
    // SAFETY: forwarded.
    unsafe { real::mremap()(addr, old_len, new_len, flags, new_addr) }
}

#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: size_t, advice: c_int) -> c_int {
    if fdtable::any_mapping() && !fdtable::inside() {
        let _inside = fdtable::Inside::enter();
        if let Some(r) = files::madvise(addr as usize, len, advice) {
            return r;
        }
    }
    // SAFETY: forwarded.
    unsafe { real::madvise()(addr, len, advice) }
}

fn fallocate_common(
    f: unsafe extern "C" fn(c_int, c_int, off_t, off_t) -> c_int,
    fd: c_int,
    mode: c_int,
    off: off_t,
    len: off_t,
) -> c_int {
    if owned(fd) {
        let _inside = fdtable::Inside::enter();
        if let Some(g) = files::gmem_of(fd) {
            return files::fallocate(&g, fd, mode, off, len);
        }
    }
    // SAFETY: forwarded.
    unsafe { f(fd, mode, off, len) }
}

#[no_mangle]
pub unsafe extern "C" fn fallocate(fd: c_int, mode: c_int, off: off_t, len: off_t) -> c_int {
    fallocate_common(real::fallocate(), fd, mode, off, len)
}

#[no_mangle]
pub unsafe extern "C" fn fallocate64(fd: c_int, mode: c_int, off: off_t, len: off_t) -> c_int {
    fallocate_common(real::fallocate64(), fd, mode, off, len)
}

/// Whether `fd` is an emulated file (then the call is refused with the kernel's errno).
fn is_gmem(fd: c_int) -> bool {
    owned(fd) && files::gmem_of(fd).is_some()
}

macro_rules! refused {
    ($name:ident, $errno:expr, fn($fd:ident: c_int $(, $a:ident: $t:ty)*) -> $ret:ty) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name($fd: c_int $(, $a: $t)*) -> $ret {
            if is_gmem($fd) {
                return files::refuse(stringify!($name), $fd, $errno) as $ret;
            }
            // SAFETY: forwarded.
            unsafe { real::$name()($fd $(, $a)*) }
        }
    };
}

// guest_memfd has no read/write file operations (EINVAL), is not seekable (ESPIPE for the
// positioned calls), and refuses setattr (EINVAL).
refused!(
    read,
    Errno::EINVAL,
    fn(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t
);
refused!(
    write,
    Errno::EINVAL,
    fn(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t
);
refused!(
    readv,
    Errno::EINVAL,
    fn(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t
);
refused!(
    writev,
    Errno::EINVAL,
    fn(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t
);
refused!(
    pread,
    Errno::ESPIPE,
    fn(fd: c_int, buf: *mut c_void, n: size_t, off: off_t) -> ssize_t
);
refused!(
    pread64,
    Errno::ESPIPE,
    fn(fd: c_int, buf: *mut c_void, n: size_t, off: off_t) -> ssize_t
);
refused!(
    pwrite,
    Errno::ESPIPE,
    fn(fd: c_int, buf: *const c_void, n: size_t, off: off_t) -> ssize_t
);
refused!(
    pwrite64,
    Errno::ESPIPE,
    fn(fd: c_int, buf: *const c_void, n: size_t, off: off_t) -> ssize_t
);
refused!(
    lseek,
    Errno::ESPIPE,
    fn(fd: c_int, off: off_t, whence: c_int) -> off_t
);
refused!(
    lseek64,
    Errno::ESPIPE,
    fn(fd: c_int, off: off_t, whence: c_int) -> off_t
);
refused!(ftruncate, Errno::EINVAL, fn(fd: c_int, len: off_t) -> c_int);
refused!(
    ftruncate64,
    Errno::EINVAL,
    fn(fd: c_int, len: off_t) -> c_int
);

#[no_mangle]
pub unsafe extern "C" fn vmsplice(
    fd: c_int,
    iov: *const iovec,
    n: size_t,
    flags: c_uint,
) -> ssize_t {
    // SAFETY: forwarded.
    let r = unsafe { real::vmsplice()(fd, iov, n, flags) };
    if r > 0 && fdtable::any_mapping() && !iov.is_null() {
        // SAFETY: the kernel just read `n` iovecs from `iov`.
        let v = unsafe { std::slice::from_raw_parts(iov, n) };
        files::vmsplice_pins(fd, v);
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    if let Some(fd) = files::open_gup_test(path, flags) {
        return fd;
    }
    // SAFETY: forwarded.
    unsafe { real::open()(path, flags, mode) }
}

#[no_mangle]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    if let Some(fd) = files::open_gup_test(path, flags) {
        return fd;
    }
    // SAFETY: forwarded.
    unsafe { real::open64()(path, flags, mode) }
}

#[no_mangle]
pub unsafe extern "C" fn openat(
    dir: c_int,
    path: *const c_char,
    flags: c_int,
    mode: c_uint,
) -> c_int {
    if let Some(fd) = files::open_gup_test(path, flags) {
        return fd;
    }
    // SAFETY: forwarded.
    unsafe { real::openat()(dir, path, flags, mode) }
}

#[no_mangle]
pub unsafe extern "C" fn openat64(
    dir: c_int,
    path: *const c_char,
    flags: c_int,
    mode: c_uint,
) -> c_int {
    if let Some(fd) = files::open_gup_test(path, flags) {
        return fd;
    }
    // SAFETY: forwarded.
    unsafe { real::openat64()(dir, path, flags, mode) }
}
