//! Stress: accessors read and write random pages through host mappings while the owner's
//! converter thread converts random ranges (and makes the guest fault some of the pages it made
//! private), for a bounded time per variant (GMEM_STRESS_SECS, seconds, fractions allowed;
//! default 1.5).
//!
//! The accessors are in three processes: threads of the owner, a child forked from the owner
//! (a follower through the fork handlers, using the inherited mapping), and a second process —
//! this test binary run again with `GMEM_STRESS_SOCK` set — that receives the file over a Unix
//! socket (`EmulatedGuestMemfd::receive`) and maps it. They share the per-page state
//! (generation, attribute, model of the content) through a `MAP_SHARED` mapping of a memfd,
//! whose atomics work across processes; the children report failures through their exit status
//! (the fork child catches panics and leaves with `_exit(1)`).
//!
//! Variants: every revocation mechanism (the guard; Remap, where only the owner's threads
//! access, since without the guard other processes do not share the file) × every file kind
//! (plain and NO_DIRECT_MAP files on the software-protected and pKVM platforms, plain files on
//! SNP and TDX, which refuse NO_DIRECT_MAP), and files of 2 MiB folios under the guard on every
//! platform (each tracked page stands for 16 file pages; whole blocks are made shared at times,
//! so the owner's host mapping releases them to the kernel's PMD faults and the next conversion
//! to private must guard them again). As root, where `shmem_enabled` is `never`, the binary sets
//! `advise` for its run and puts it back (`gmem_testkit::ThpSwitch`); without 2 MiB folios those
//! variants are ignored with the reason.
//!
//! Invariants checked, in every process:
//! - an access made while its page was private for the whole access faults (SIGBUS at the
//!   page), one made while it was shared for the whole access succeeds; every fault is a SIGBUS
//!   at the page accessed (under Remap on SNP and TDX, an access that overlapped a conversion
//!   of its page may instead get SIGSEGV there: the range stays inaccessible until the
//!   make-shared hook has run);
//! - no write is lost: each page has one writer (an accessor thread of one process), which
//!   keeps a model of the page's content and checks every successful read of it, and at the end
//!   every page equals the model. On SNP and TDX a conversion to shared of a page the guest
//!   faulted while private changes its content (scrambled / zeroed, `platform::content_rule`),
//!   so there only writes made after the page's last such conversion are checked: the converter
//!   records the generation at which that conversion ends (`epoch`) before it starts, and a
//!   write is checked if it started at or after that generation. On sw and pKVM content is
//!   preserved and every write is checked.
//! - none of it is vacuous: each process made strict checks of both kinds and saw faults. A run
//!   on a loaded machine, where a process may be starved, is lengthened until that is so (by
//!   at most 20 s) rather than failed.
//!
//! "For the whole access" is decided with a per-page generation counter that the converter
//! makes odd while a conversion of the page is in flight.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gmem::platform::PlatformKind;
use gmem::uapi::*;
use gmem::*;

const PS: u64 = PAGE_SIZE;
const NPAGES: u64 = 64;
const N: usize = NPAGES as usize;
/// Accessor threads in the owner; writer ids `0..OWNER_THREADS`.
const OWNER_THREADS: u64 = 2;
/// Writer id of the forked child.
const CHILD: u64 = OWNER_THREADS;
/// Writer id of the second process.
const SECOND: u64 = OWNER_THREADS + 1;
const WRITERS: u64 = OWNER_THREADS + 2;
/// How long a child waits beyond the run before it gives up on the owner (bounds a failed run).
const GRACE: Duration = Duration::from_secs(30);
/// The most a run is lengthened past its time until enough happened in every process (a
/// loaded machine starves some of them); within [`GRACE`], so the children still run.
const MAX_EXTENSION: Duration = Duration::from_secs(20);

/// `si_code` of a SIGSEGV on a mapping without the access's permission (`SEGV_ACCERR`, which
/// the libc crate does not name).
const SEGV_ACCERR: i32 = 2;

/// One accessor's counts.
#[repr(C)]
struct Counts {
    accesses: AtomicU64,
    /// Accesses to a page shared for the whole access (each succeeded).
    strict_shared: AtomicU64,
    /// Accesses to a page private for the whole access (each faulted).
    strict_private: AtomicU64,
    faults: AtomicU64,
    /// Successful reads of an own page compared with the model.
    model_checks: AtomicU64,
}

/// The state every process shares, in a `MAP_SHARED` mapping (all zeroes is the initial state).
#[repr(C)]
struct State {
    gen: [AtomicU64; N],
    private: [AtomicBool; N],
    /// Last byte the page's writer wrote successfully (0 = never written).
    model: [AtomicU8; N],
    /// The generation at which that write started.
    wgen: [AtomicU64; N],
    /// The generation at the end of the last conversion that may have changed the content.
    epoch: [AtomicU64; N],
    go: AtomicBool,
    stop: AtomicBool,
    counts: [Counts; WRITERS as usize],
    /// How many writers the run has (the owner's threads alone without other processes):
    /// page `p` is written by writer `p % writers`.
    writers: AtomicU64,
    /// File pages per tracked page (0 read as 1): tracked page `p` stands for the file's
    /// pages `[p * stride, (p + 1) * stride)`, which are converted together; 16 for files of
    /// 2 MiB folios (64 tracked pages: two blocks).
    stride: AtomicU64,
    /// Remap mode on a platform with a make-shared hook: an access that overlaps a
    /// conversion of its page may get SIGSEGV (the range is restored inaccessible until the
    /// hook has run).
    closed_window: AtomicBool,
}

impl State {
    /// A fresh state in a new memfd (close-on-exec; the second process gets it explicitly).
    fn create() -> (&'static State, OwnedFd) {
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"gmem-stress-state".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a descriptor we just created and own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = std::mem::size_of::<State>() as libc::off_t;
        // SAFETY: ftruncate on our memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }, 0);
        (Self::map(fd.as_raw_fd()), fd)
    }

    /// Maps the state memfd `fd` shared, for the life of the process.
    fn map(fd: RawFd) -> &'static State {
        // SAFETY: a fresh shared mapping of the whole memfd, never unmapped; all zeroes is a
        // valid `State` (atomics only) and every access goes through atomics.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                std::mem::size_of::<State>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
            &*(p as *const State)
        }
    }
}

/// Sets `stop` when dropped, so the other processes end even if the owner panics.
struct StopOnDrop(&'static State);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.store(true, SeqCst);
    }
}

fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut x = seed | 1;
    move |m| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    }
}

fn run_time() -> Duration {
    let secs: f64 = std::env::var("GMEM_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.5);
    Duration::from_secs_f64(secs)
}

/// The accessor loop of writer `w` over mapping `m`, in any process: waits for `go`, then runs
/// until `stop` (or `bound` has passed). Panics on a violated invariant.
fn access_loop(m: &HostMapping, s: &State, w: u64, bound: Duration) {
    let started = Instant::now();
    while !s.go.load(SeqCst) {
        if started.elapsed() > bound || s.stop.load(SeqCst) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let c = &s.counts[w as usize];
    let writers = s.writers.load(SeqCst).max(1);
    let stride = s.stride.load(SeqCst).max(1);
    let mut r = rng(w * 7919 + 11);
    let mut counter = 0u8;
    while !s.stop.load(SeqCst) && started.elapsed() < bound {
        let write = r(2) == 1;
        // Writers write only their own pages; anyone reads anything.
        let p = if write {
            r(NPAGES / writers) * writers + w
        } else {
            r(NPAGES)
        };
        let pi = p as usize;
        // Writes (and the model) at the stripe's first page; reads anywhere in it.
        let within = if write { 0 } else { r(stride) };
        let own = p % writers == w && within == 0;
        let g0 = s.gen[pi].load(SeqCst);
        let was_private = s.private[pi].load(SeqCst);
        let off = ((p * stride + within) * PS) as usize;
        let fault = if write {
            counter = counter.wrapping_add(1).max(1);
            m.probe_write(off, 1, counter).unwrap().fault()
        } else {
            match m.probe_read(off, 1).unwrap() {
                Probe::Done(b) => {
                    // Loaded after the read: a conversion that may have changed the content
                    // before the read ended has stored its epoch before it began.
                    if own && s.epoch[pi].load(SeqCst) <= s.wgen[pi].load(SeqCst) {
                        let want = s.model[pi].load(SeqCst);
                        c.model_checks.fetch_add(1, SeqCst);
                        assert_eq!(
                            b[0], want,
                            "writer {w}: page {p}: read {:#x}, last write was {want:#x}",
                            b[0]
                        );
                    }
                    None
                }
                Probe::Fault(f) => Some(f),
            }
        };
        c.accesses.fetch_add(1, SeqCst);
        let g1 = s.gen[pi].load(SeqCst);
        if let Some(f) = &fault {
            // Under Remap, a conversion to shared with a make-shared hook keeps the range
            // inaccessible (PROT_NONE) until the hook has run: an access that overlapped a
            // conversion of its page may get SIGSEGV there; any other fault is a SIGBUS.
            let in_flight = !(g0 == g1 && g0 % 2 == 0);
            let closed = s.closed_window.load(SeqCst)
                && in_flight
                && f.signal == libc::SIGSEGV
                && f.code == SEGV_ACCERR;
            assert!(
                (f.is_sigbus() || closed) && f.addr == off as u64,
                "writer {w}: page {p}: unexpected fault {f:?}"
            );
            c.faults.fetch_add(1, SeqCst);
        } else if write {
            s.wgen[pi].store(g0, SeqCst);
            s.model[pi].store(counter, SeqCst);
        }
        let faulted = fault.is_some();
        if g0 == g1 && g0 % 2 == 0 {
            if was_private {
                c.strict_private.fetch_add(1, SeqCst);
            } else {
                c.strict_shared.fetch_add(1, SeqCst);
            }
            assert_eq!(
                faulted,
                was_private,
                "writer {w}: page {p} was {} for the whole {}, yet it {}",
                if was_private { "private" } else { "shared" },
                if write { "write" } else { "read" },
                if faulted { "faulted" } else { "succeeded" }
            );
        }
    }
}

/// Writes `msg` to stderr without taking any lock (a fork child of a threaded process).
fn raw_eprint(msg: &str) {
    // SAFETY: write(2) of a valid buffer.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

/// Waits for our child `pid` at most `bound`, killing it after that; its wait status.
fn wait_bounded(pid: libc::pid_t, bound: Duration) -> i32 {
    let started = Instant::now();
    let mut status = 0;
    loop {
        // SAFETY: reaps our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(r >= 0, "waitpid: {}", std::io::Error::last_os_error());
        if r == pid {
            return status;
        }
        if started.elapsed() > bound {
            // SAFETY: kills and reaps our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("child {pid} still running after {bound:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// With [`STATE_FD`], makes this test binary the second process of a variant (not a test of
/// its own), naming its socket.
const SOCK: &str = "GMEM_STRESS_SOCK";
/// The descriptor of the shared state, in the second process.
const STATE_FD: &str = "GMEM_STRESS_STATE_FD";

/// The second process: this test binary started by [`stress_file`] with [`SOCK`] and
/// [`STATE_FD`] set.
fn stress_second_process(path: &str, fd: &str) {
    let s = State::map(fd.parse().unwrap());
    let bound = run_time() + GRACE;
    let mut sock = UnixStream::connect(path).unwrap();
    let f = EmulatedGuestMemfd::receive(&sock).unwrap();
    assert!(f.is_follower());
    // This process converts nothing (its conversions would go to the owner: processes.rs
    // checks them); the model's converter is the owner's thread alone.
    let m = f.mmap_all().unwrap();
    sock.write_all(b"R").unwrap();
    access_loop(&m, s, SECOND, bound);
}

/// Starts the second process and hands it the file; returns it once it has mapped the file.
fn start_second_process(
    f: &EmulatedGuestMemfd,
    state_fd: RawFd,
    dir: &std::path::Path,
) -> std::process::Child {
    let path = dir.join("sock");
    let listener = UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.env(SOCK, &path)
        .env(STATE_FD, state_fd.to_string())
        .stdout(std::process::Stdio::null());
    // The state memfd survives the exec: its close-on-exec flag is cleared around the spawn
    // (not in a `pre_exec` hook, which makes the child by `fork`: a fork child of a process
    // with host mappings may make no userfaultfd, so the second process could not receive
    // the file; without the hook it is made by `posix_spawn`, which runs no fork handler).
    // SAFETY: fcntl(2) on this test's own descriptor.
    assert!(unsafe { libc::fcntl(state_fd, libc::F_SETFD, 0) } >= 0);
    let spawned = cmd.spawn();
    // SAFETY: as above.
    unsafe { libc::fcntl(state_fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    let mut child = spawned.unwrap();
    let started = Instant::now();
    let mut sock = loop {
        match listener.accept() {
            Ok((sock, _)) => break sock,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(st) = child.try_wait().unwrap() {
                    panic!("second process exited before connecting: {st}");
                }
                assert!(started.elapsed() < GRACE, "second process never connected");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    sock.set_nonblocking(false).unwrap();
    sock.set_read_timeout(Some(GRACE)).unwrap();
    f.send_to(&sock).unwrap();
    let mut ready = [0u8; 1];
    sock.read_exact(&mut ready).unwrap();
    assert_eq!(&ready, b"R");
    child
}

/// What the converter did.
struct Converted {
    conversions: u64,
    guest_faults: u64,
    /// Pages the guest faulted since they became private (their next conversion to shared
    /// may change their content).
    assigned: Vec<bool>,
}

/// Whether enough happened for the run's checks to mean anything: the thresholds
/// [`stress_file`] asserts at the end.
fn enough(s: &State, conv: &Converted, others: bool) -> bool {
    let per_process = groups(others).iter().all(|(_, ws)| {
        let sum = |get: fn(&Counts) -> &AtomicU64| -> u64 {
            ws.clone()
                .map(|w| get(&s.counts[w as usize]).load(SeqCst))
                .sum()
        };
        sum(|c| &c.strict_shared) > MIN_STRICT
            && sum(|c| &c.strict_private) > MIN_STRICT
            && sum(|c| &c.faults) > MIN_FAULTS
            && sum(|c| &c.model_checks) > MIN_MODEL_CHECKS
    });
    per_process && conv.conversions > MIN_CONVERSIONS && conv.guest_faults > MIN_GUEST_FAULTS
}

/// The accessors of each process, by writer id.
const WRITER_GROUPS: [(&str, std::ops::Range<u64>); 3] = [
    ("owner", 0..OWNER_THREADS),
    ("fork child", CHILD..CHILD + 1),
    ("second process", SECOND..SECOND + 1),
];
/// Strict checks of each kind (shared, private) each process must have made.
const MIN_STRICT: u64 = 20;
/// Faults each process must have seen.
const MIN_FAULTS: u64 = 10;
/// Model checks each process must have made.
const MIN_MODEL_CHECKS: u64 = 5;
/// Conversions and guest faults the run must have made.
const MIN_CONVERSIONS: u64 = 100;
const MIN_GUEST_FAULTS: u64 = 10;

/// Converts until `deadline`, and past it until [`enough`] happened (at most
/// [`MAX_EXTENSION`] more).
fn converter(
    f: &EmulatedGuestMemfd,
    s: &State,
    deadline: Instant,
    destructive: bool,
    others: bool,
) -> Converted {
    let mut r = rng(0x5eed);
    let mut out = Converted {
        conversions: 0,
        guest_faults: 0,
        assigned: vec![false; N],
    };
    let bound = deadline + MAX_EXTENSION;
    loop {
        let now = Instant::now();
        if now >= bound || (now >= deadline && enough(s, &out, others)) {
            break;
        }
        let stride = s.stride.load(SeqCst).max(1);
        let per_block = (512 / stride).max(1);
        let (first, n, to_private) = if stride > 1 && r(8) == 0 {
            // A 2 MiB block wholly shared (its host mapping may then be released to the
            // kernel's PMD faults, and guarded again by the next conversion to private).
            (r(NPAGES / per_block) * per_block, per_block, false)
        } else {
            let first = r(NPAGES);
            (first, (r(8) + 1).min(NPAGES - first), r(2) == 1)
        };
        let pages = first as usize..(first + n) as usize;
        for p in pages.clone() {
            let odd = s.gen[p].fetch_add(1, SeqCst) + 1;
            if !to_private && destructive && out.assigned[p] {
                // Before the conversion can touch the content.
                s.epoch[p].store(odd + 1, SeqCst);
            }
        }
        let mut a = kvm_memory_attributes2::new(
            first * stride * PS,
            n * stride * PS,
            if to_private {
                KVM_MEMORY_ATTRIBUTE_PRIVATE
            } else {
                0
            },
        );
        match f.set_attributes(&mut a) {
            Ok(()) => {}
            // No pins here: nothing may fail. EAGAIN would mean a peer process (the fork
            // child, the second process) did not acknowledge within the peer timeout (10 s);
            // a probe child holding a copy of a forked peer's channel once caused exactly
            // that (fixed: probes close every other descriptor).
            Err(e) => panic!("conversion failed with {e} (no pins, live peers: none may fail)"),
        }
        for p in pages.clone() {
            s.private[p].store(to_private, SeqCst);
            s.gen[p].fetch_add(1, SeqCst);
            if !to_private {
                out.assigned[p] = false;
            }
        }
        out.conversions += 1;
        // The guest touches half of what became private (assigns it on SNP, accepts it on
        // TDX, removes it from the direct map on NO_DIRECT_MAP files).
        if to_private && r(2) == 0 {
            f.guest_fault(first * stride * PS, n * stride * PS).unwrap();
            out.guest_faults += 1;
            for p in pages {
                out.assigned[p] = true;
            }
        }
    }
    out
}

/// The writer groups of a run: the owner's threads, and with `others` the fork child and the
/// second process.
fn groups(others: bool) -> &'static [(&'static str, std::ops::Range<u64>)] {
    if others {
        &WRITER_GROUPS
    } else {
        &WRITER_GROUPS[..1]
    }
}

fn stress_file(name: &str, opts: EmulatedOptions, extra_flags: u64) {
    // Other processes share a file only under the guard (without it, host mappings are not
    // inherited and the file is not handed on).
    let others = opts.revocation != Revocation::Remap;
    let run = run_time();
    let stride = if opts.folio_size == FolioSize::Huge {
        HUGE_STRIDE
    } else {
        1
    };
    let f = Arc::new(
        EmulatedGuestMemfd::create_with(
            NPAGES * stride * PS,
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | extra_flags,
            opts,
        )
        .unwrap(),
    );
    let destructive = !matches!(
        opts.platform
            .content_rule(gmem::platform::Direction::ToShared),
        gmem::platform::ContentRule::Preserved
    );
    let m = Arc::new(f.mmap_all().unwrap());
    let (s, state_fd) = State::create();
    let _stop = StopOnDrop(s);
    s.writers
        .store(if others { WRITERS } else { OWNER_THREADS }, SeqCst);
    s.stride.store(stride, SeqCst);
    s.closed_window
        .store(opts.revocation == Revocation::Remap && destructive, SeqCst);

    // The second process, which receives the file over a Unix socket.
    let dir = gmem_testkit::TempDir::new(&format!("gmem-stress-{name}")).unwrap();
    let mut second = others.then(|| start_second_process(&f, state_fd.as_raw_fd(), dir.path()));

    // The fork child, a follower served by the guard, with the inherited mapping.
    // SAFETY: fork(2). The child only runs the accessor loop over the inherited mapping and
    // the shared state (probes are CLONE_VFORK children), then leaves with _exit without
    // unwinding across the fork or running destructors.
    let pid = if others { unsafe { libc::fork() } } else { 1 };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            access_loop(&m, s, CHILD, run + GRACE)
        }));
        let code = match r {
            Ok(()) => 0,
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|m| m.to_string()))
                    .unwrap_or_default();
                raw_eprint(&format!("stress fork child: {msg}\n"));
                1
            }
        };
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(code) };
    }
    if others {
        // The guard reads the fork event before fork returns, and the second process's
        // userfaultfd before `send_to` returns.
        assert!(
            f.wait_for_peers(2, Duration::from_secs(5)) >= 2,
            "{name}: the children are not served"
        );
    }

    let accessors: Vec<_> = (0..OWNER_THREADS)
        .map(|w| {
            let m = m.clone();
            std::thread::spawn(move || access_loop(&m, s, w, run + GRACE))
        })
        .collect();
    let deadline = Instant::now() + run;
    s.go.store(true, SeqCst);
    let conv = {
        let f = f.clone();
        let r = std::thread::spawn(move || converter(&f, s, deadline, destructive, others)).join();
        s.stop.store(true, SeqCst);
        r.unwrap()
    };
    for a in accessors {
        a.join().unwrap();
    }
    if let Some(second) = second.as_mut() {
        let status = wait_bounded(pid, GRACE);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{name}: fork child failed: status {status:#x}"
        );
        let started = Instant::now();
        let st = loop {
            if let Some(st) = second.try_wait().unwrap() {
                break st;
            }
            if started.elapsed() > GRACE {
                let _ = second.kill();
                panic!("{name}: second process still running: killed");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(st.success(), "{name}: second process failed: {st}");
    }

    // Every write that landed (since the last conversion that may have changed its page's
    // content) is still there; the final conversion to shared may change guest-faulted pages.
    for (p, &assigned) in conv.assigned.iter().enumerate() {
        if destructive && assigned {
            s.epoch[p].store(u64::MAX, SeqCst);
        }
    }
    f.set_shared(0, NPAGES * stride * PS).unwrap();
    let (mut checked, mut changed) = (0, 0);
    for p in 0..N {
        let mut b = [0u8];
        f.read_at(p as u64 * stride * PS, &mut b).unwrap();
        let want = s.model[p].load(SeqCst);
        if s.epoch[p].load(SeqCst) <= s.wgen[p].load(SeqCst) {
            assert_eq!(b[0], want, "{name}: page {p}: a write was lost");
            checked += 1;
        } else if b[0] != want {
            changed += 1;
        }
    }

    let sum = |ws: std::ops::Range<u64>, get: fn(&Counts) -> &AtomicU64| -> u64 {
        ws.map(|w| get(&s.counts[w as usize]).load(SeqCst)).sum()
    };
    let mut strict_total = 0;
    let mut line = format!(
        "{name}: {} conversions, {} guest faults; final: \
         {checked} pages checked, {changed} changed by the platform",
        conv.conversions, conv.guest_faults
    );
    for (who, ws) in groups(others).iter().cloned() {
        let accesses = sum(ws.clone(), |c| &c.accesses);
        let shared = sum(ws.clone(), |c| &c.strict_shared);
        let private = sum(ws.clone(), |c| &c.strict_private);
        let faults = sum(ws.clone(), |c| &c.faults);
        let model = sum(ws, |c| &c.model_checks);
        line += &format!(
            "; {who}: {accesses} accesses, {} strict ({shared} shared, {private} private), \
             {faults} faults, {model} model checks",
            shared + private
        );
        strict_total += shared + private;
        assert!(
            shared > MIN_STRICT
                && private > MIN_STRICT
                && faults > MIN_FAULTS
                && model > MIN_MODEL_CHECKS,
            "{name}: too little happened in the {who} to mean anything, even with the run \
             lengthened by up to {MAX_EXTENSION:?}: {line}"
        );
    }
    println!("{line}");
    assert!(
        conv.conversions > MIN_CONVERSIONS
            && strict_total > 100
            && conv.guest_faults > MIN_GUEST_FAULTS
            // On a platform whose conversions change content, every page may have been
            // converted since its last write (nothing left to compare exactly; seen on TDX).
            && (checked > 0 || (destructive && changed > 0)),
        "{name}: too little happened to mean anything: {line}"
    );
    if destructive {
        assert!(changed > 0, "{name}: no conversion changed content: {line}");
    }
}

fn mode(revocation: &str) -> EmulatedOptions {
    match revocation {
        "guard" => EmulatedOptions::with_revocation(Revocation::Guard),
        "remap" => EmulatedOptions::with_revocation(Revocation::Remap),
        _ => unreachable!(),
    }
}

fn variant(name: &str, platform: PlatformKind, no_direct_map: bool, revocation: &str) {
    let opts = EmulatedOptions {
        platform,
        ..mode(revocation)
    };
    stress_file(name, opts, flags(no_direct_map));
}

/// File pages per tracked page in a file of 2 MiB folios: 64 tracked pages are two blocks.
const HUGE_STRIDE: u64 = 16;

/// A file of 2 MiB folios (`FolioSize::Huge`, under the guard: Remap refuses them) on
/// `platform`: besides conversions of a few tracked pages (16 file pages each: parts of a
/// folio), whole blocks are made shared at times, so the owner's host mapping releases them
/// to the kernel's PMD faults and each later conversion to private must guard them again.
fn huge_variant(name: &str, platform: PlatformKind, no_direct_map: bool) {
    let opts = EmulatedOptions {
        platform,
        folio_size: FolioSize::Huge,
        ..mode("guard")
    };
    stress_file(name, opts, flags(no_direct_map));
}

/// Every variant of 2 MiB folios: `(name, platform, NO_DIRECT_MAP)`.
const HUGE_VARIANTS: [(&str, PlatformKind, bool); 5] = [
    (
        "stress_sw_huge_guard",
        PlatformKind::SoftwareProtected,
        false,
    ),
    (
        "stress_sw_huge_no_direct_map_guard",
        PlatformKind::SoftwareProtected,
        true,
    ),
    ("stress_pkvm_huge_guard", PlatformKind::Pkvm, false),
    ("stress_snp_huge_guard", PlatformKind::Snp, false),
    ("stress_tdx_huge_guard", PlatformKind::Tdx, false),
];

fn flags(no_direct_map: bool) -> u64 {
    if no_direct_map {
        GUEST_MEMFD_FLAG_NO_DIRECT_MAP
    } else {
        0
    }
}

/// Every variant: `(name, platform, NO_DIRECT_MAP, revocation mode)`.
const VARIANTS: [(&str, PlatformKind, bool, &str); 12] = [
    (
        "stress_sw_guard",
        PlatformKind::SoftwareProtected,
        false,
        "guard",
    ),
    (
        "stress_sw_remap",
        PlatformKind::SoftwareProtected,
        false,
        "remap",
    ),
    (
        "stress_sw_no_direct_map_guard",
        PlatformKind::SoftwareProtected,
        true,
        "guard",
    ),
    (
        "stress_sw_no_direct_map_remap",
        PlatformKind::SoftwareProtected,
        true,
        "remap",
    ),
    ("stress_pkvm_guard", PlatformKind::Pkvm, false, "guard"),
    ("stress_pkvm_remap", PlatformKind::Pkvm, false, "remap"),
    (
        "stress_pkvm_no_direct_map_guard",
        PlatformKind::Pkvm,
        true,
        "guard",
    ),
    (
        "stress_pkvm_no_direct_map_remap",
        PlatformKind::Pkvm,
        true,
        "remap",
    ),
    ("stress_snp_guard", PlatformKind::Snp, false, "guard"),
    ("stress_snp_remap", PlatformKind::Snp, false, "remap"),
    ("stress_tdx_guard", PlatformKind::Tdx, false, "guard"),
    ("stress_tdx_remap", PlatformKind::Tdx, false, "remap"),
];

fn main() {
    if let (Ok(path), Ok(fd)) = (std::env::var(SOCK), std::env::var(STATE_FD)) {
        stress_second_process(&path, &fd);
        return;
    }
    let switch = gmem_testkit::ThpSwitch::for_this_run("stress");
    let mut trials: Vec<_> = VARIANTS
        .iter()
        .map(|&(name, platform, ndm, revocation)| {
            let needs = mode(revocation).revocation.needs(flags(ndm));
            gmem_testkit::test_unless(
                name,
                needs.and_then(|n| gmem_testkit::needs(&[n])),
                move || variant(name, platform, ndm, revocation),
            )
        })
        .collect();
    for &(name, platform, ndm) in &HUGE_VARIANTS {
        let needs = mode("guard").revocation.needs(flags(ndm));
        let why = needs
            .and_then(|n| gmem_testkit::needs(&[n]))
            .or_else(|| gmem_testkit::needs(&[gmem::host::Feature::HugeFolios]));
        trials.push(gmem_testkit::test_unless(name, why, move || {
            huge_variant(name, platform, ndm)
        }));
    }
    gmem_testkit::run_then(trials, move || drop(switch))
}
