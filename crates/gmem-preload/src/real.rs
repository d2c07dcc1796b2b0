//! The functions the interposer stands in front of, as the next object in the lookup order
//! (`dlsym(RTLD_NEXT)`, normally glibc) defines them. Resolved on first use and cached in an
//! atomic, so a pass-through costs one relaxed load and an indirect call.

use std::ffi::{c_char, c_int, c_long, c_uint, c_ulong, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

use libc::{iovec, off_t, size_t, ssize_t};

/// Resolves `name` (NUL-terminated) with `dlsym(RTLD_NEXT)`, caching it in `slot`. A symbol
/// the C library lacks ends the process with a message: carrying on would call address 0.
#[inline(always)]
fn resolve(slot: &AtomicUsize, name: &'static [u8]) -> usize {
    let p = slot.load(Ordering::Relaxed);
    if p != 0 {
        return p;
    }
    resolve_slow(slot, name)
}

#[cold]
fn resolve_slow(slot: &AtomicUsize, name: &'static [u8]) -> usize {
    // SAFETY: `name` is a NUL-terminated static string (every caller is the macro below).
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast::<c_char>()) } as usize;
    if p == 0 {
        let msg = b"gmem-preload: a C library function the interposer needs is missing\n";
        // SAFETY: writes a static buffer to stderr, then aborts.
        unsafe {
            libc::syscall(libc::SYS_write, 2, msg.as_ptr(), msg.len());
            libc::abort();
        }
    }
    slot.store(p, Ordering::Relaxed);
    p
}

macro_rules! real_fns {
    ($($name:ident : fn($($arg:ty),*) -> $ret:ty;)*) => {
        $(
            /// The next definition of this C function (glibc's).
            #[inline(always)]
            pub(crate) fn $name() -> unsafe extern "C" fn($($arg),*) -> $ret {
                static SLOT: AtomicUsize = AtomicUsize::new(0);
                let p = resolve(&SLOT, concat!(stringify!($name), "\0").as_bytes());
                // SAFETY: `p` is the non-null address dlsym gave for this C function, whose
                // prototype (glibc's, x86_64 SysV) is the one written here.
                unsafe { std::mem::transmute::<usize, unsafe extern "C" fn($($arg),*) -> $ret>(p) }
            }
        )*
    };
}

real_fns! {
    ioctl: fn(c_int, c_ulong, *mut c_void) -> c_int;
    close: fn(c_int) -> c_int;
    close_range: fn(c_uint, c_uint, c_int) -> c_int;
    dup: fn(c_int) -> c_int;
    dup2: fn(c_int, c_int) -> c_int;
    dup3: fn(c_int, c_int, c_int) -> c_int;
    fcntl: fn(c_int, c_int, c_ulong) -> c_int;
    fcntl64: fn(c_int, c_int, c_ulong) -> c_int;
    mmap: fn(*mut c_void, size_t, c_int, c_int, c_int, off_t) -> *mut c_void;
    mmap64: fn(*mut c_void, size_t, c_int, c_int, c_int, off_t) -> *mut c_void;
    munmap: fn(*mut c_void, size_t) -> c_int;
    madvise: fn(*mut c_void, size_t, c_int) -> c_int;
    mremap: fn(*mut c_void, size_t, size_t, c_int, *mut c_void) -> *mut c_void;
    fallocate: fn(c_int, c_int, off_t, off_t) -> c_int;
    fallocate64: fn(c_int, c_int, off_t, off_t) -> c_int;
    read: fn(c_int, *mut c_void, size_t) -> ssize_t;
    write: fn(c_int, *const c_void, size_t) -> ssize_t;
    readv: fn(c_int, *const iovec, c_int) -> ssize_t;
    writev: fn(c_int, *const iovec, c_int) -> ssize_t;
    pread: fn(c_int, *mut c_void, size_t, off_t) -> ssize_t;
    pread64: fn(c_int, *mut c_void, size_t, off_t) -> ssize_t;
    pwrite: fn(c_int, *const c_void, size_t, off_t) -> ssize_t;
    pwrite64: fn(c_int, *const c_void, size_t, off_t) -> ssize_t;
    lseek: fn(c_int, off_t, c_int) -> off_t;
    lseek64: fn(c_int, off_t, c_int) -> off_t;
    ftruncate: fn(c_int, off_t) -> c_int;
    ftruncate64: fn(c_int, off_t) -> c_int;
    vmsplice: fn(c_int, *const iovec, size_t, c_uint) -> ssize_t;
    open: fn(*const c_char, c_int, c_uint) -> c_int;
    open64: fn(*const c_char, c_int, c_uint) -> c_int;
    openat: fn(c_int, *const c_char, c_int, c_uint) -> c_int;
    openat64: fn(c_int, *const c_char, c_int, c_uint) -> c_int;
}

/// `syscall(SYS_gettid)`, for the trace.
pub(crate) fn gettid() -> c_long {
    // SAFETY: gettid takes no argument and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) }
}
