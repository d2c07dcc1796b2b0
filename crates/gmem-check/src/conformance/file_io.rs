//! `test_file_read_write` of `guest_memfd_test.c` (docs/series.md §4.1, §2.5): file I/O on the
//! guest_memfd descriptor fails, and so does changing its size.

use std::os::fd::AsRawFd;

use super::{ensure, Case, CaseFailure, CaseResult, Ctx, Need};
use gmem::error::Errno;
use gmem::os::PAGE_SIZE;

pub(super) fn cases() -> Vec<Case> {
    vec![Case {
        name: "file_read_write",
        source: "guest_memfd_test.c",
        needs: &[Need::Fd],
        run: file_read_write,
    }]
}

/// `read`, `write`, `pread` and `pwrite` on the descriptor all fail (the selftest asserts
/// only `< 0`); `ftruncate` fails with EINVAL (§2.5: setting file attributes).
fn file_read_write(ctx: &Ctx) -> CaseResult {
    let f = ctx.create(1, 0)?;
    let fd = f
        .guest_memfd_fd()
        .ok_or("the file has no guest_memfd descriptor")?
        .as_raw_fd();
    let mut buf = [0u8; PAGE_SIZE as usize];
    let len = buf.len();
    // SAFETY: plain syscalls on a descriptor the file owns, with a valid buffer of `len` bytes.
    let results = unsafe {
        [
            ("read", libc::read(fd, buf.as_mut_ptr().cast(), len)),
            ("write", libc::write(fd, buf.as_ptr().cast(), len)),
            ("pread", libc::pread(fd, buf.as_mut_ptr().cast(), len, 0)),
            ("pwrite", libc::pwrite(fd, buf.as_ptr().cast(), len, 0)),
        ]
    };
    for (what, ret) in results {
        ensure(ret < 0, || {
            format!("{what} on the guest_memfd returned {ret}; expected failure")
        })?;
    }
    // SAFETY: ftruncate on the file's own descriptor.
    let (ret, errno) = unsafe { (libc::ftruncate(fd, 0), Errno::last()) };
    ensure(ret < 0 && errno == Errno::EINVAL, || {
        format!(
            "ftruncate on the guest_memfd: expected EINVAL, got {ret} ({})",
            errno.name()
        )
    })?;
    let st = f.stat().map_err(CaseFailure::call("fstat"))?;
    ensure(st.size == PAGE_SIZE, || {
        format!("size changed to {:#x} after failed file I/O", st.size)
    })
}
