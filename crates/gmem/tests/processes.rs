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

/// The environment variables that make this test binary the owner and the receiver of
/// [`a_receiver_outlives_its_owner`], naming the socket.
const ORPHAN_OWNER: &str = "GMEM_ORPHAN_OWNER";
const ORPHAN_RECEIVER: &str = "GMEM_ORPHAN_RECEIVER";

/// The owner of [`a_receiver_outlives_its_owner`]: makes a file (page 1 private), hands it to
/// the process that connects, answers once that process and its fork child are served, and
/// waits to be stopped and killed by the test.
fn orphan_owner(path: &std::ffi::OsStr) {
    let f = file(EmulatedOptions::with_revocation(gmem::Revocation::Guard));
    let m = f.mmap_all().unwrap();
    m.write_volatile(0, &vec![0xaa; PAGES as usize * PS])
        .unwrap();
    f.set_private(PAGE_SIZE, PAGE_SIZE).unwrap();
    let listener = UnixListener::bind(path).unwrap();
    let (mut s, _) = listener.accept().unwrap();
    f.send_to(&s).unwrap();
    // The receiver forked and converted page 3 through this process: both spaces served.
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert!(f.wait_for_peers(2, Duration::from_secs(5)) >= 2);
    s.write_all(b"K").unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A line to the test on standard output and its answer on standard input, by system call
/// (no allocation: a fork in another thread may hold the allocator's locks meanwhile).
fn orphan_ask(line: &[u8]) {
    let mut b = [0u8; 1];
    // SAFETY: write(2) and read(2) of valid buffers.
    unsafe {
        libc::write(1, line.as_ptr().cast(), line.len());
        libc::read(0, b.as_mut_ptr().cast(), 1);
    }
}

/// In a fork child: reads the byte at `addr` by system call (into a pipe) and leaves with
/// exit code 0 if the kernel refused it with EFAULT, 1 if it read it, 2 without a pipe. Raw
/// system calls only.
fn efault_exit(addr: usize) -> ! {
    // SAFETY: a pipe of this process's own; write(2) copies one byte from `addr` (EFAULT if it
    // cannot, never a fault of this thread); then _exit.
    unsafe {
        let mut p = [0i32; 2];
        if libc::pipe(p.as_mut_ptr()) != 0 {
            libc::_exit(2);
        }
        let n = libc::write(p[1], addr as *const libc::c_void, 1);
        let efault = n < 0 && *libc::__errno_location() == libc::EFAULT;
        libc::_exit(if efault { 0 } else { 1 })
    }
}

/// The receiver of [`a_receiver_outlives_its_owner`]; each step prints its outcome, and a
/// failed one exits with its number.
fn orphan_receiver(path: &std::ffi::OsStr) {
    let started = std::time::Instant::now();
    let mut s = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("connect: {e}"),
        }
    };
    let f = EmulatedGuestMemfd::receive(&s).unwrap();
    let m = f.mmap_all().unwrap();
    let other = f.mmap_all().unwrap();
    let step = |n: i32, ok: bool, what: &str| {
        println!("{n} {what}: {}", if ok { "ok" } else { "FAILED" });
        if !ok {
            std::process::exit(n);
        }
    };
    step(
        1,
        look(&m, 0) == Some(0xaa),
        "page 0 read while the owner lives",
    );
    step(2, look(&m, 1).is_none(), "private page 1 refused");
    // A fork child that reads page 3 (made private after the fork) by system call once told:
    // exit 0 if refused with EFAULT.
    let (mut go_r, mut go_w) = UnixStream::pair().unwrap();
    // SAFETY: fork(2); the child only reads a byte, reads its mapping by system call into a
    // pipe and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        drop(go_w);
        let mut b = [0u8; 1];
        let _ = go_r.read_exact(&mut b);
        // A kernel-mode read of one byte of the inherited mapping (EFAULT while refused).
        efault_exit(m.mmap().as_ptr() as usize + 3 * PS)
    }
    drop(go_r);
    step(
        3,
        f.set_private(3 * PAGE_SIZE, PAGE_SIZE).is_ok(),
        "page 3 made private",
    );
    s.write_all(b"F").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    // A descendant forked while this process cannot take hand-overs (stopped by the test):
    // a fork child forks children that exit, 100 more than the custody stream holds (about
    // 766 bytes a record of the socket's buffer: 278 here; the owner keeps the rest and
    // sends them again), and then one that stays, D, which reads private page 3 by system
    // call once told (after the owner's death).
    let fill = std::fs::read_to_string("/proc/sys/net/core/wmem_default")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(212_992)
        / 766
        + 100;
    let (mut probe_r, mut probe_w) = UnixStream::pair().unwrap();
    let (mut done_r, mut done_w) = UnixStream::pair().unwrap();
    // SAFETY: fork(2); the child only forks, uses its sockets and standard streams by system
    // call, and leaves with _exit.
    let cpid = unsafe { libc::fork() };
    assert!(cpid >= 0);
    if cpid == 0 {
        drop(probe_w);
        drop(done_r);
        orphan_ask(b"stop the receiver\n");
        // SAFETY: fork(2) and waitpid(2) of our own children, which leave at once or probe
        // and leave; the rest is system calls on valid buffers.
        unsafe {
            for _ in 0..fill.min(3000) {
                let p = libc::fork();
                if p == 0 {
                    libc::_exit(0);
                }
                libc::waitpid(p, std::ptr::null_mut(), 0);
            }
            let d = libc::fork();
            if d == 0 {
                let mut b = [0u8; 1];
                let _ = probe_r.read_exact(&mut b);
                efault_exit(m.mmap().as_ptr() as usize + 3 * PS);
            }
            let line = b"continue the receiver\n";
            libc::write(1, line.as_ptr().cast(), line.len());
            let _ = done_w.write_all(&[1]);
            let mut status = 0;
            libc::waitpid(d, &mut status, 0);
            libc::_exit(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                3
            });
        }
    }
    drop(probe_r);
    drop(done_w);
    done_r.read_exact(&mut b).unwrap();
    // The owner's server tries the kept hand-overs again every 10 ms, as this process's
    // thread drains the stream: a second is ample.
    step(31, look(&m, 4) == Some(0xaa), "shared page 4 read");
    std::thread::sleep(Duration::from_secs(1));
    // The owner is stopped: a fork here waits in the kernel for its event to be read, holding
    // the fork handlers' and the allocator's locks; the owner is then killed, and only this
    // process can read it.
    orphan_ask(b"stop the owner\n");
    let forked = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
    let at3 = m.mmap().as_ptr() as usize + 3 * PS;
    let forker = {
        let forked = forked.clone();
        std::thread::spawn(move || {
            // SAFETY: fork(2); the child reads private page 3 (never mapped here) by system
            // call, exits 0 if refused with EFAULT, and leaves with _exit.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                efault_exit(at3)
            }
            forked.store(pid, std::sync::atomic::Ordering::SeqCst);
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    orphan_ask(b"kill the owner\n");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while forked.load(std::sync::atomic::Ordering::SeqCst) == 0
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid2 = forked.load(std::sync::atomic::Ordering::SeqCst);
    step(
        4,
        pid2 > 0,
        "a fork waiting on the owner when it died returned",
    );
    let _ = forker.join();
    let mut status = 0;
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(pid2, &mut status, 0) };
    step(
        5,
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "its child was refused private page 3 (EFAULT)",
    );
    step(
        6,
        matches!(s.read(&mut b), Ok(0) | Err(_)),
        "the owner has gone",
    );
    step(
        7,
        look(&m, 0) == Some(0xaa),
        "page 0, mapped before, still read",
    );
    step(8, look(&m, 1).is_none(), "private page 1 still refused");
    step(9, look(&m, 3).is_none(), "private page 3 refused");
    // No one knows the attributes any more: a page not mapped here before is refused too,
    // and the access returns (it waited for ever on the owner's guard before).
    step(
        10,
        look(&m, 2).is_none(),
        "page 2, never mapped here, refused",
    );
    step(
        11,
        f.set_shared(PAGE_SIZE, PAGE_SIZE).map_err(|e| e.errno) == Err(gmem::Errno::EOPNOTSUPP),
        "a conversion answers EOPNOTSUPP",
    );
    probe_w.write_all(&[1]).unwrap();
    let mut status = 0;
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(cpid, &mut status, 0) };
    step(
        32,
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "a descendant forked while this process was stopped was refused page 3 (EFAULT)",
    );
    go_w.write_all(&[1]).unwrap();
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    step(
        12,
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the fork child was refused page 3 (EFAULT)",
    );
    // munmap and fork are events the owner's guard used to read: they return, and a child
    // forked now is refused a page it had not mapped.
    drop(other);
    step(13, true, "munmap returned");
    // SAFETY: fork(2); the child reads page 5 by system call and leaves.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        efault_exit(m.mmap().as_ptr() as usize + 5 * PS)
    }
    // SAFETY: reaps it.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    step(
        14,
        pid > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "fork returned, and its child was refused page 5 (EFAULT)",
    );
}

/// Found when a stress run's owner crashed: the processes it had handed the file to waited
/// for ever — at their next fault on a page not mapped yet, their `munmap`, their `fork` —
/// on a userfaultfd only the dead owner's guard had read, and a fork child of theirs, whose
/// userfaultfd only the owner held, read the private pages once the owner's death closed it.
/// Here the owner is stopped while the receiver forks (the fork waits in the kernel for its
/// event to be read, holding the fork handlers' and the allocator's locks) and then killed:
/// within 30 s the fork has returned, the receiver has read what it had mapped and been
/// refused everything else (no one knows the attributes any more: fail closed), its `munmap`
/// and another `fork` have returned, and its fork children were refused a page made private
/// after their fork and a page never mapped.
fn a_receiver_outlives_its_owner() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let dir = gmem_testkit::TempDir::new("gmem-orphan").unwrap();
    let path = dir.join("sock");
    let exe = std::env::current_exe().unwrap();
    let mut owner = std::process::Command::new(&exe)
        .env(ORPHAN_OWNER, &path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut receiver = std::process::Command::new(&exe)
        .env(ORPHAN_RECEIVER, &path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let owner_pid = libc::pid_t::try_from(owner.id()).unwrap();
    let mut input = receiver.stdin.take().unwrap();
    let output = receiver.stdout.take().unwrap();
    // The receiver's lines, read by a thread (the test bounds the whole run).
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = std::time::Instant::now();
    let mut out = String::new();
    let status = loop {
        while let Ok(line) = rx.try_recv() {
            if line == "stop the receiver" {
                let pid = libc::pid_t::try_from(receiver.id()).unwrap();
                // SAFETY: stops our own child and waits until it has stopped.
                unsafe {
                    libc::kill(pid, libc::SIGSTOP);
                    libc::waitpid(pid, std::ptr::null_mut(), libc::WUNTRACED);
                }
                let _ = input.write_all(b"g");
            } else if line == "continue the receiver" {
                let pid = libc::pid_t::try_from(receiver.id()).unwrap();
                // SAFETY: continues our own child.
                unsafe { libc::kill(pid, libc::SIGCONT) };
            } else if line == "stop the owner" {
                // SAFETY: stops our own child and waits until it has stopped.
                unsafe {
                    libc::kill(owner_pid, libc::SIGSTOP);
                    libc::waitpid(owner_pid, std::ptr::null_mut(), libc::WUNTRACED);
                }
                let _ = input.write_all(b"g");
            } else if line == "kill the owner" {
                let _ = owner.kill();
                let _ = owner.wait();
                let _ = input.write_all(b"g");
            }
            out.push_str(&line);
            out.push('\n');
        }
        if let Some(st) = receiver.try_wait().unwrap() {
            break Some(st);
        }
        if started.elapsed() > Duration::from_secs(30) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let pgid = libc::pid_t::try_from(receiver.id()).unwrap();
    if status.is_none() {
        // SAFETY: kills the receiver's process group (its probes and fork children too).
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = receiver.wait();
    }
    let _ = owner.kill();
    let _ = owner.wait();
    std::thread::sleep(Duration::from_millis(50));
    while let Ok(line) = rx.try_recv() {
        out.push_str(&line);
        out.push('\n');
    }
    let status = status.unwrap_or_else(|| panic!("the receiver hung after:\n{out}"));
    assert!(status.success(), "the receiver failed ({status}):\n{out}");
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
    if let Some(path) = std::env::var_os(ORPHAN_OWNER) {
        orphan_owner(&path);
        return;
    }
    if let Some(path) = std::env::var_os(ORPHAN_RECEIVER) {
        orphan_receiver(&path);
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
        "a_receiver_outlives_its_owner",
        &[gmem::emulated::GUARD_NEEDS],
        a_receiver_outlives_its_owner,
    ));
    trials.push(gmem_testkit::test_needing(
        "a_grandchild_follows_too",
        &[gmem::emulated::GUARD_NEEDS],
        a_grandchild_follows_too,
    ));
    gmem_testkit::run(trials)
}
