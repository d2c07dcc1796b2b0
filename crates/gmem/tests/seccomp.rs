//! `remap_file_pages(2)` is refused in every process that maps an emulated file, by a seccomp
//! filter installed at its first host mapping (DESIGN.md "The guard", `sys/seccomp.rs`): with
//! `CAP_SYS_ADMIN` it needs nothing else; without it gmem sets `no_new_privs` first. A test
//! binary of its own: the filter is installed once per process, so this one must start
//! without it.

use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{EmulatedGuestMemfd, EmulatedOptions, GuestMemfd, PAGE_SIZE};
use gmem_testkit::test;

const PAGE: usize = PAGE_SIZE as usize;

/// Maps a file of 4 pages with page 1 private and tries `remap_file_pages` of page 1 at page
/// 3's address: 0 when refused with EPERM and nothing else changed, else a code naming what.
fn map_and_try() -> i32 {
    let Ok(f) = EmulatedGuestMemfd::create_with(
        4 * PAGE_SIZE,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        EmulatedOptions::default(),
    ) else {
        return 20;
    };
    if f.write_at(3 * PAGE_SIZE, &[0x43; PAGE]).is_err()
        || f.set_private(PAGE_SIZE, PAGE_SIZE).is_err()
    {
        return 21;
    }
    let Ok(m) = f.mmap_all() else {
        return 22;
    };
    let addr = m.mmap().as_ptr() as usize + 3 * PAGE;
    // SAFETY: replaces (or is refused to replace) one page of this function's own mapping;
    // nothing holds a reference into it.
    let r = unsafe { libc::syscall(libc::SYS_remap_file_pages, addr, PAGE, 0, 1usize, 0) };
    if r != -1 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return 23;
    }
    match m.probe_read(3 * PAGE, 1) {
        Ok(gmem::Probe::Done(b)) if b[0] == 0x43 => 0,
        _ => 24,
    }
}

fn no_new_privs() -> bool {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1 }
}

fn refused_with_and_without_cap_sys_admin() {
    // Under a simulated host (`gmem-hostsim`, which filters calls itself) the process starts
    // with no_new_privs set.
    let had_no_new_privs = no_new_privs();
    // SAFETY: fork(2); the child drops its privileges, maps, and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: drops this child's privileges (root only), then leaves with _exit.
        unsafe {
            if libc::geteuid() == 0 && (libc::setgid(65534) != 0 || libc::setuid(65534) != 0) {
                libc::_exit(10);
            }
            let code = match map_and_try() {
                0 if no_new_privs() => 0,
                0 => 11,
                c => c,
            };
            libc::_exit(code);
        }
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "unprivileged child: {status:#x} (11: no_new_privs not set, 2x: see map_and_try)"
    );
    assert_eq!(map_and_try(), 0, "this process");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && !had_no_new_privs {
        assert!(!no_new_privs(), "root needs no no_new_privs");
    }
}

fn main() {
    let trials = vec![test(
        "refused_with_and_without_cap_sys_admin",
        refused_with_and_without_cap_sys_admin,
    )];
    gmem_testkit::run(trials);
}
