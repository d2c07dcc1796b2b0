//! Helpers shared by this crate's test binaries (each includes it with `mod common;`).

/// Whether a one-byte read (or write) at `addr` of this process faults, tried in a fork
/// child (which the guard serves as it serves this process): true for SIGBUS; any other end
/// of the child (a SIGSEGV where it has nothing mapped) fails the test.
pub fn faults_in_child(addr: *mut u8, write: bool) -> bool {
    // SAFETY: fork(2); the child only touches `addr` and leaves with _exit (or dies of the
    // fault).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: a volatile access to one byte of a mapping of this process; a fault kills
        // the child, which is what is asked.
        unsafe {
            if write {
                std::ptr::write_volatile(addr, 0xEE);
            } else {
                std::ptr::read_volatile(addr);
            }
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFSIGNALED(status) {
        assert_eq!(libc::WTERMSIG(status), libc::SIGBUS, "status {status:#x}");
        true
    } else {
        assert_eq!(status, 0);
        false
    }
}
