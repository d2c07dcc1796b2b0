//! The central principle across processes: a page private for the whole access raises SIGBUS
//! in every process that maps the file — a child forked before or after the page became
//! private, and a separate process the file was handed to over a Unix socket — and shared
//! writes are seen by all of them. Each scenario runs for every revocation mode.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{EmulatedGuestMemfd, EmulatedOptions, GuestMemfd, HostMapping, Revocation, PAGE_SIZE};
use gmem_testkit::per_mode;

const PAGES: u64 = 8;
const PS: usize = PAGE_SIZE as usize;

const FLAGS: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

/// The mechanisms under which other processes share the file: only the guard serves them
/// (without it, host mappings are not inherited and the file is not handed on).
fn modes() -> [(&'static str, EmulatedOptions); 1] {
    [("guard", EmulatedOptions::with_revocation(Revocation::Guard))]
}

fn file(opts: EmulatedOptions) -> EmulatedGuestMemfd {
    EmulatedGuestMemfd::create_with(PAGES * PAGE_SIZE, FLAGS, opts).unwrap()
}

/// What the page at `page` of `m` answers to a read: `None` for SIGBUS, else its first byte.
fn look(m: &HostMapping, page: u64) -> Option<u8> {
    match m.probe_read(page as usize * PS, 1).unwrap() {
        gmem::Probe::Done(v) => Some(v[0]),
        p => {
            assert!(p.is_sigbus(), "a fault other than SIGBUS: {p:?}");
            None
        }
    }
}

/// Whether a write of `byte` to the page at `page` of `m` raised SIGBUS.
fn write_faults(m: &HostMapping, page: u64, byte: u8) -> bool {
    m.probe_write(page as usize * PS, 1, byte)
        .unwrap()
        .is_sigbus()
}

/// One request from the test to the other process, and its answer: look at a page (`L`, the
/// answer is 0xff00 for SIGBUS or the byte), write a byte (`W`, 1 if it faulted), quit (`Q`).
fn ask(s: &mut UnixStream, op: u8, page: u8, byte: u8) -> u16 {
    s.write_all(&[op, page, byte]).unwrap();
    let mut a = [0u8; 2];
    s.read_exact(&mut a).unwrap();
    u16::from_le_bytes(a)
}

/// The other process's side: answers requests about mapping `m` until told to quit.
fn serve(s: &mut UnixStream, m: &HostMapping) {
    loop {
        let mut q = [0u8; 3];
        if s.read_exact(&mut q).is_err() {
            return;
        }
        let a: u16 = match q[0] {
            b'L' => look(m, u64::from(q[1])).map_or(0xff00, u16::from),
            b'W' => u16::from(write_faults(m, u64::from(q[1]), q[2])),
            _ => return,
        };
        if s.write_all(&a.to_le_bytes()).is_err() {
            return;
        }
    }
}

const SIGBUS: u16 = 0xff00;

/// The checks both kinds of other process must pass, driven from the owner.
fn check_follower(f: &EmulatedGuestMemfd, m: &HostMapping, s: &mut UnixStream) {
    // Page 0 was made private before the other process existed.
    assert_eq!(ask(s, b'L', 0, 0), SIGBUS, "private before: readable there");
    assert_eq!(ask(s, b'L', 1, 0), 0xaa, "shared page");
    // Shared writes are seen both ways.
    assert_eq!(ask(s, b'W', 2, 0x55), 0);
    assert_eq!(look(m, 2), Some(0x55), "its write not seen here");
    m.write_volatile(3 * PS, &[0x66]).unwrap();
    assert_eq!(ask(s, b'L', 3, 0), 0x66, "our write not seen there");
    // Made private after: page 1 was touched there (a present PTE), page 4 was not.
    f.set_private(PAGE_SIZE, PAGE_SIZE).unwrap();
    f.set_private(4 * PAGE_SIZE, PAGE_SIZE).unwrap();
    assert_eq!(ask(s, b'L', 1, 0), SIGBUS, "private after: readable there");
    assert_eq!(ask(s, b'W', 1, 0x77), 1, "private after: writable there");
    assert_eq!(
        ask(s, b'L', 4, 0),
        SIGBUS,
        "untouched page made private: readable there"
    );
    // A whole-file conversion and back (hole mappings for long runs).
    f.set_private(0, PAGES * PAGE_SIZE).unwrap();
    for p in 0..PAGES as u8 {
        assert_eq!(
            ask(s, b'L', p, 0),
            SIGBUS,
            "page {p} after the whole-file conversion"
        );
    }
    f.set_shared(0, PAGES * PAGE_SIZE).unwrap();
    // Back to shared: readable there again, contents kept in place (no write was lost).
    assert_eq!(ask(s, b'L', 0, 0), 0xaa);
    assert_eq!(ask(s, b'L', 1, 0), 0xaa);
    assert_eq!(ask(s, b'L', 2, 0), 0x55);
    assert_eq!(
        look(m, 1),
        Some(0xaa),
        "a faulting write there changed memory"
    );
}

fn prepare(opts: EmulatedOptions) -> (EmulatedGuestMemfd, HostMapping) {
    let f = file(opts);
    let m = f.mmap_all().unwrap();
    m.write_volatile(0, &vec![0xaa; PAGES as usize * PS])
        .unwrap();
    f.set_private(0, PAGE_SIZE).unwrap();
    (f, m)
}

fn a_fork_child_faults_on_private_pages_and_sees_shared_writes(opts: EmulatedOptions) {
    let (f, m) = prepare(opts);
    let (mut mine, mut theirs) = UnixStream::pair().unwrap();
    // SAFETY: fork(2). The child only uses the mapping, the probe (a CLONE_VFORK child)
    // and the socket, then leaves with _exit without unwinding or running destructors.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        drop(mine);
        serve(&mut theirs, &m);
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(0) };
    }
    drop(theirs);
    assert!(
        f.wait_for_peers(1, Duration::from_secs(5)) >= 1,
        "{opts:?}: the child is not served"
    );
    check_follower(&f, &m, &mut mine);
    mine.write_all(b"Q\0\0").unwrap();
    let mut status = 0;
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status),
        "{opts:?}: child status {status:#x}"
    );
    // The child is gone: conversions go on without it.
    f.set_private(0, PAGE_SIZE).unwrap();
    f.set_shared(0, PAGE_SIZE).unwrap();
}

/// The kernel lets any holder of a guest_memfd convert it, and a fork child holds the
/// owner's descriptors: its copy of the file converts through the owner (the fork link), with
/// the owner's validation and answers, and the conversion holds in both processes.
fn a_fork_child_converts_through_the_owner(opts: EmulatedOptions) {
    let (f, m) = prepare(opts);
    let (mut mine, mut theirs) = UnixStream::pair().unwrap();
    // SAFETY: fork(2). The child only converts, probes its mapping and uses the socket, then
    // leaves with _exit without unwinding or running destructors.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        drop(mine);
        let code = (|| {
            if f.set_private(2 * PAGE_SIZE, PAGE_SIZE).is_err() {
                return 10;
            }
            if look(&m, 2).is_some() {
                return 11;
            }
            if f.set_private(PAGE_SIZE + 1, PAGE_SIZE).map_err(|e| e.errno)
                != Err(gmem::Errno::EINVAL)
            {
                return 12;
            }
            let mut b = [0u8];
            if theirs.write_all(&[1]).is_err() || theirs.read_exact(&mut b).is_err() {
                return 13;
            }
            if f.set_shared(2 * PAGE_SIZE, PAGE_SIZE).is_err() {
                return 14;
            }
            if look(&m, 2) != Some(0xb2) {
                return 15;
            }
            0
        })();
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(code) };
    }
    drop(theirs);
    let mut b = [0u8];
    mine.read_exact(&mut b).unwrap();
    assert_eq!(look(&m, 2), None, "the child's conversion to private");
    f.guest_write(2 * PAGE_SIZE, &[0xb2]).unwrap();
    mine.write_all(&[1]).unwrap();
    let mut status = 0;
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{opts:?}: child status {status:#x} (10-15: which step failed)"
    );
    assert_eq!(look(&m, 2), Some(0xb2), "the child's conversion to shared");
}

fn a_grandchild_follows_too() {
    let (f, m) = prepare(EmulatedOptions::default());
    let (mut mine, mut theirs) = UnixStream::pair().unwrap();
    // SAFETY: fork(2) twice; each child only uses the mapping, the probe and the socket, and
    // leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        drop(mine);
        // SAFETY: as above.
        let pid2 = unsafe { libc::fork() };
        if pid2 == 0 {
            serve(&mut theirs, &m);
            // SAFETY: ends the grandchild.
            unsafe { libc::_exit(0) };
        }
        drop(theirs);
        let mut status = 0;
        // SAFETY: reaps the grandchild, then ends the child.
        unsafe {
            libc::waitpid(pid2, &mut status, 0);
            libc::_exit(0)
        };
    }
    drop(theirs);
    check_follower(&f, &m, &mut mine);
    mine.write_all(b"Q\0\0").unwrap();
    let mut status = 0;
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

/// The environment variable that makes this test binary the second process of
/// [`a_second_process_follows_over_a_unix_socket`], naming the socket.
const SECOND_PROCESS: &str = "GMEM_SECOND_PROCESS";

/// The second process of [`a_second_process_follows_over_a_unix_socket`]: this test binary
/// started with [`SECOND_PROCESS`] set (not a test of its own).
fn second_process(path: &std::ffi::OsStr) {
    let mut s = UnixStream::connect(path).unwrap();
    let f = EmulatedGuestMemfd::receive(&s).unwrap();
    assert!(f.is_follower());
    let m = f.mmap_all().unwrap();
    // Conversions go to the owner, which runs its one conversion sequence for them (the
    // kernel lets any holder convert): the last page private here, refused to this process's
    // host mapping, and shared again with its content; the owner's validation answers.
    let last = (PAGES - 1) * PAGE_SIZE;
    f.set_private(last, PAGE_SIZE).unwrap();
    assert!(m.probe_read(last as usize, 1).unwrap().is_sigbus());
    f.set_shared(last, PAGE_SIZE).unwrap();
    assert_eq!(look(&m, PAGES - 1), Some(0xaa));
    assert_eq!(
        f.set_private(1, PAGE_SIZE).unwrap_err().errno,
        gmem::Errno::EINVAL
    );
    s.write_all(b"R").unwrap();
    serve(&mut s, &m);
}

/// The connection of `child`, which must come within 30 s (a child that died first fails the
/// test instead of hanging it).
fn accept_bounded(listener: &UnixListener, child: &mut std::process::Child) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let started = std::time::Instant::now();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(st) = child.try_wait().unwrap() {
                    panic!("second process exited before connecting: {st}");
                }
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "second process never connected"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Starts the second process (this test binary with [`SECOND_PROCESS`] set), hands it `f`
/// and waits until it has mapped the file.
fn hand_to_second_process(f: &EmulatedGuestMemfd) -> (std::process::Child, UnixStream) {
    // A directory of its own: the variants run in parallel.
    let dir = gmem_testkit::TempDir::new("gmem-proc").unwrap();
    let path = dir.join("sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .env(SECOND_PROCESS, &path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut s = accept_bounded(&listener, &mut child);
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    f.send_to(&s).unwrap();
    let mut ready = [0u8; 1];
    s.read_exact(&mut ready).unwrap();
    (child, s)
}

fn a_second_process_follows_over_a_unix_socket(opts: EmulatedOptions) {
    let (f, m) = prepare(opts);
    let (mut child, mut s) = hand_to_second_process(&f);
    assert!(f.wait_for_peers(1, Duration::from_secs(5)) >= 1);
    check_follower(&f, &m, &mut s);
    s.write_all(b"Q\0\0").unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{opts:?}: second process: {status}");
    // It has exited: conversions go on without it (other tests' fork children may be
    // peers for a moment too, so the count is not checked here).
    f.set_private(0, PAGE_SIZE).unwrap();
    f.set_shared(0, PAGE_SIZE).unwrap();
}

/// A process the file was handed to, stopped (SIGSTOP) after it mapped a page, delays a
/// conversion of that page by at most 1 ms against the same conversion while it runs, the
/// conversion succeeds, and once continued the process gets SIGBUS there.
fn a_stopped_second_process_delays_nothing(opts: EmulatedOptions) {
    let (f, m) = prepare(opts);
    let (mut child, mut s) = hand_to_second_process(&f);
    // The baseline: page 5 mapped there (it reads it), converted while the process runs.
    let mut base = Duration::MAX;
    for _ in 0..5 {
        assert_eq!(ask(&mut s, b'L', 5, 0), 0xaa);
        let t = std::time::Instant::now();
        f.set_private(5 * PAGE_SIZE, PAGE_SIZE).unwrap();
        base = base.min(t.elapsed());
        f.set_shared(5 * PAGE_SIZE, PAGE_SIZE).unwrap();
    }
    assert_eq!(ask(&mut s, b'L', 5, 0), 0xaa);
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let mut status = 0;
    // SAFETY: signals our own child and waits until it has stopped (not reaped).
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
        libc::waitpid(pid, &mut status, libc::WUNTRACED);
    }
    assert!(
        libc::WIFSTOPPED(status),
        "second process status {status:#x}"
    );
    let t = std::time::Instant::now();
    f.set_private(5 * PAGE_SIZE, PAGE_SIZE).unwrap();
    let stopped = t.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(ask(&mut s, b'L', 5, 0), SIGBUS, "read there after SIGCONT");
    assert_eq!(ask(&mut s, b'W', 5, 0x11), 1, "written there after SIGCONT");
    s.write_all(b"Q\0\0").unwrap();
    assert!(child.wait().unwrap().success());
    assert!(
        stopped <= base + Duration::from_millis(1),
        "with a stopped process {stopped:?}, while it runs {base:?}"
    );
    f.set_shared(5 * PAGE_SIZE, PAGE_SIZE).unwrap();
    assert_eq!(look(&m, 5), Some(0xaa), "the page's content");
}

/// The environment variable that makes this test binary the process of
/// [`the_spaces_of_children_that_exited_are_dropped`].
const REAPER_PROCESS: &str = "GMEM_REAPER_PROCESS";

/// Found in review: the guard's check that an address space has gone always said "alive", so
/// every fork child ever made kept a slot, a descriptor and the file for good, and once the
/// slots ran out the guard closed live children's userfaultfds (which unregisters their
/// mappings). In a process of its own: 40 fork children that exit at once; within two
/// sweeps the guard serves no other space and holds one userfaultfd, its own.
fn the_spaces_of_children_that_exited_are_dropped() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env(REAPER_PROCESS, "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn reaper_process() {
    let f = file(EmulatedOptions::with_revocation(gmem::Revocation::Guard));
    let _m = f.mmap_all().unwrap();
    for _ in 0..40 {
        // SAFETY: fork(2); the child exits at once.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: reaps the child made above.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
    let uffds = || {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|l| l.to_string_lossy().contains("userfaultfd"))
            })
            .count()
    };
    let started = std::time::Instant::now();
    while (f.peer_count() > 0 || uffds() > 1) && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(f.peer_count(), 0, "spaces of exited children still served");
    assert_eq!(uffds(), 1, "userfaultfds of exited children still held");
}

/// The environment variable that makes this test binary the owner of
/// [`a_fork_child_does_not_outlive_the_owner`].
const DYING_OWNER: &str = "GMEM_DYING_OWNER";

/// The owner of [`a_fork_child_does_not_outlive_the_owner`]: makes a file with a private page,
/// maps it, forks a child that sleeps (it would read the page once the owner's guard is gone),
/// prints the child's pid and exits without waiting for it.
fn dying_owner() {
    let f = file(EmulatedOptions::with_revocation(gmem::Revocation::Guard));
    let m = f.mmap_all().unwrap();
    f.set_private(PAGE_SIZE, PAGE_SIZE).unwrap();
    // SAFETY: fork(2); the child only sleeps and then reads its own mapping by system call.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: sleeps, then reads one byte of the inherited mapping into a pipe (a
        // kernel-mode read: EFAULT while guarded), and leaves with _exit.
        unsafe {
            // Its standard output is the test's pipe: closed, so the test sees the end of it
            // when the owner exits, not when this child does.
            libc::close(1);
            libc::sleep(3);
            let mut p = [0i32; 2];
            libc::pipe(p.as_mut_ptr());
            let n = libc::write(p[1], m.mmap().as_ptr().add(PS).cast(), 1);
            libc::_exit(if n == 1 { 1 } else { 0 });
        }
    }
    println!("{pid}");
    std::mem::forget(m);
    std::mem::forget(f);
    std::process::exit(0);
}

/// Found in review: when the owner exits, the userfaultfds of its fork children's address
/// spaces close with it, the kernel unregisters their host mappings, and a child that
/// outlived it read every page, private ones included. A fork child of a process with host
/// mappings dies with the thread that forked it (`PR_SET_PDEATHSIG`): here it is gone within
/// two seconds of its owner's exit, long before it would have read.
fn a_fork_child_does_not_outlive_the_owner() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env(DYING_OWNER, "1")
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "the owner failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let pid: i32 = text
        .lines()
        .find_map(|l| l.trim().parse().ok())
        .expect("the owner printed its child's pid");
    let started = std::time::Instant::now();
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
    };
    while alive() && started.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(), "the fork child {pid} outlived its owner");
}

fn main() {
    if std::env::var_os(DYING_OWNER).is_some() {
        dying_owner();
        return;
    }
    if let Some(path) = std::env::var_os(SECOND_PROCESS) {
        second_process(&path);
        return;
    }
    if std::env::var_os(REAPER_PROCESS).is_some() {
        reaper_process();
        return;
    }
    let mut trials = per_mode(
        "a_fork_child_faults_on_private_pages_and_sees_shared_writes",
        &modes(),
        FLAGS,
        a_fork_child_faults_on_private_pages_and_sees_shared_writes,
    );
    trials.extend(per_mode(
        "a_second_process_follows_over_a_unix_socket",
        &modes(),
        FLAGS,
        a_second_process_follows_over_a_unix_socket,
    ));
    trials.extend(per_mode(
        "a_fork_child_converts_through_the_owner",
        &modes(),
        FLAGS,
        a_fork_child_converts_through_the_owner,
    ));
    trials.extend(per_mode(
        "a_stopped_second_process_delays_nothing",
        &modes(),
        FLAGS,
        a_stopped_second_process_delays_nothing,
    ));
    trials.push(gmem_testkit::test_needing(
        "the_spaces_of_children_that_exited_are_dropped",
        &[gmem::emulated::GUARD_NEEDS],
        the_spaces_of_children_that_exited_are_dropped,
    ));
    trials.push(gmem_testkit::test_needing(
        "a_fork_child_does_not_outlive_the_owner",
        &[gmem::emulated::GUARD_NEEDS],
        a_fork_child_does_not_outlive_the_owner,
    ));
    trials.push(gmem_testkit::test_needing(
        "a_grandchild_follows_too",
        &[gmem::emulated::GUARD_NEEDS],
        a_grandchild_follows_too,
    ));
    gmem_testkit::run(trials)
}
