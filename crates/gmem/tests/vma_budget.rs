//! Issue 11 item 5: one VMA budget for the whole process, conversions that never abort, and
//! private memory that can always be given back.
//!
//! Each test re-runs itself in a child process (the budget and the VMA count are the
//! process's), bounded in time: the child lowers the budget with `set_process_vma_limit` or
//! consumes real VMAs up to `vm.max_map_count`, which must never happen in the test process
//! that other tests share.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gmem::emulated::{process_vma_budget, set_process_vma_limit};
use gmem::uapi::*;
use gmem::*;

const PS: u64 = PAGE_SIZE;
const SHARED: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
const CHILD: &str = "GMEM_TEST_VMA_CHILD";

/// Runs test `name` of this binary in a child process (with `CHILD` set), killed after
/// `secs` seconds; panics unless it passed.
fn in_child(name: &str, secs: u64) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name}: child still running after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        status.success(),
        "{name}: child failed ({status:?}):\n{text}"
    );
    assert!(
        text.contains("1 passed"),
        "{name}: child ran nothing:\n{text}"
    );
}

fn is_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

fn sigbus_at(m: &HostMapping, off: u64) -> bool {
    m.probe_read(off as usize, 1).unwrap().is_sigbus()
}

/// Many mappings of one file and many private runs under the guard: a conversion takes no
/// mapping of its own (private pages are refused at fault time), so with the process's budget
/// lowered to 2,048 VMAs, 1,024 private runs in each of 16 mappings charge nothing, add no
/// VMA, and no conversion fails.
fn many_mappings_and_runs_never_fail_a_conversion_to_shared() {
    if !is_child() {
        return in_child(
            "many_mappings_and_runs_never_fail_a_conversion_to_shared",
            120,
        );
    }
    set_process_vma_limit(Some(2048));
    let b = process_vma_budget();
    let size = 256u64 << 20;
    let run = 128 * 1024;
    let opts = EmulatedOptions::with_revocation(Revocation::Guard);
    let f = EmulatedGuestMemfd::create_with(size, SHARED, opts).unwrap();
    let maps: Vec<HostMapping> = (0..16).map(|_| f.mmap_all().unwrap()).collect();
    // 1,024 private runs of 128 KiB in each of 16 mappings: 16,384 hole candidates for a
    // budget of (2,048 − 25%) / 2 = 768 holes.
    let runs = size / (2 * run);
    // The file's mappings (gmem's own views and the host mappings): other VMAs come and go
    // with the allocator and the threads.
    let vmas = || {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter(|l| l.contains("/memfd:gmem"))
            .count()
    };
    let before = vmas();
    for i in 0..runs {
        f.set_private(2 * i * run, run).unwrap();
        assert_eq!(process_vma_budget().used, 0, "run {i}: VMAs charged");
    }
    let full = process_vma_budget().used;
    assert_eq!(vmas(), before, "conversions added mappings");
    // Every mapping: private pages SIGBUS, shared ones do not.
    for m in &maps {
        for off in [0, run - PS, 2 * run - PS, size - 2 * run, size - run - PS] {
            assert_eq!(sigbus_at(m, off), off % (2 * run) < run, "at {off:#x}");
        }
    }
    // To shared: 4 KiB pieces inside runs, then everything.
    for i in (0..runs).step_by(7) {
        f.set_shared(2 * i * run + 5 * PS, PS).unwrap();
    }
    for m in &maps {
        assert!(!sigbus_at(m, 5 * PS) && sigbus_at(m, 4 * PS) && sigbus_at(m, 6 * PS));
    }
    f.set_shared(0, size).unwrap();
    for m in &maps {
        assert!(!sigbus_at(m, 0) && !sigbus_at(m, size - PS));
    }
    assert_eq!(process_vma_budget().used, 0);
    assert_eq!(vmas(), before);
    drop(maps);
    println!("budget {b:?}, {full} VMAs charged at most");
}

/// Remap mode (no userfaultfd): holes are the only mechanism. Alternating private pages reach
/// the budget; from then on a conversion to private fails with ENOMEM and changes nothing
/// (error_offset at the start), never an abort; conversions to shared keep working, including
/// one that splits a hole (it may use the headroom up to the hard limit).
fn remap_mode_at_the_budget_is_enomem_with_nothing_changed() {
    if !is_child() {
        return in_child(
            "remap_mode_at_the_budget_is_enomem_with_nothing_changed",
            120,
        );
    }
    set_process_vma_limit(Some(1024));
    let pages = 2048u64;
    let opts = EmulatedOptions::with_revocation(Revocation::Remap);
    let f = EmulatedGuestMemfd::create_with(pages * PS, SHARED, opts).unwrap();
    let m = f.mmap_all().unwrap();
    m.write_volatile(0, &vec![7u8; (pages * PS) as usize])
        .unwrap();
    let mut refused = None;
    for i in 0..pages / 2 {
        let mut a = kvm_memory_attributes2::new(2 * i * PS, PS, KVM_MEMORY_ATTRIBUTE_PRIVATE);
        if let Err(e) = f.set_attributes(&mut a) {
            refused = Some((i, e, a.error_offset));
            break;
        }
    }
    let (i, e, error_offset) = refused.expect("the budget was never reached");
    assert_eq!((e, error_offset), (Errno::ENOMEM, 2 * i * PS), "at run {i}");
    assert_eq!(f.attributes(2 * i * PS).unwrap(), 0, "nothing changed");
    assert!(!sigbus_at(&m, 2 * i * PS));
    let fragments = f.fragments();
    // A large request with many runs: ENOMEM, nothing changed.
    let mut a = kvm_memory_attributes2::new(2 * i * PS, (pages - 2 * i) * PS, 1 << 3);
    assert_eq!(f.set_attributes(&mut a), Err(Errno::ENOMEM));
    assert_eq!(f.fragments(), fragments);
    // Merging runs frees VMAs: making the gap between two private pages private works even
    // at the budget.
    f.set_private(PS, PS).unwrap();
    assert!(sigbus_at(&m, PS));
    // To shared: the middle of the three-page hole (a split, from the headroom), then all.
    f.set_shared(PS, PS).unwrap();
    assert!(sigbus_at(&m, 0) && !sigbus_at(&m, PS) && sigbus_at(&m, 2 * PS));
    f.set_shared(0, pages * PS).unwrap();
    for p in 0..pages {
        assert!(!sigbus_at(&m, p * PS), "page {p}");
    }
    assert_eq!(m.probe_read(0, 1).unwrap(), Probe::Done(vec![7]));
    println!("Remap: refused at run {i} ({:?})", process_vma_budget());
}

/// The real limit: the child consumes VMAs until `vm.max_map_count` is almost reached (the
/// budget, derived from it, does not know), then converts alternating pages in Remap mode.
/// The kernel refusing a mapping change, and malloc failing for a run list, must give ENOMEM
/// with nothing changed, never an abort; converting everything back to shared works.
fn real_vma_exhaustion_is_enomem_not_an_abort() {
    if !is_child() {
        return in_child("real_vma_exhaustion_is_enomem_not_an_abort", 120);
    }
    let max = max_map_count().expect("vm.max_map_count");
    let pages = 4096u64;
    let opts = EmulatedOptions::with_revocation(Revocation::Remap);
    let f = EmulatedGuestMemfd::create_with(pages * PS, SHARED, opts).unwrap();
    let m = f.mmap_all().unwrap();
    let filler = fill_vmas(max, 600);
    let mut refused = None;
    for i in 0..pages / 2 {
        let mut a = kvm_memory_attributes2::new(2 * i * PS, PS, KVM_MEMORY_ATTRIBUTE_PRIVATE);
        if let Err(e) = f.set_attributes(&mut a) {
            refused = Some((i, e, a.error_offset));
            break;
        }
    }
    let (i, e, error_offset) = refused.expect("the VMA limit was never reached");
    assert_eq!((e, error_offset), (Errno::ENOMEM, 2 * i * PS), "at run {i}");
    assert_eq!(f.attributes(2 * i * PS).unwrap(), 0, "nothing changed");
    let before = f.attributes(0).unwrap();
    let mut outcomes = [Ok(()); 2];
    for (k, attr) in [KVM_MEMORY_ATTRIBUTE_PRIVATE, 0].into_iter().enumerate() {
        let fragments = f.fragments();
        let mut a = kvm_memory_attributes2::new(2 * i * PS, (pages - 2 * i) * PS, attr);
        outcomes[k] = f.set_attributes(&mut a);
        if let Err(e) = outcomes[k] {
            assert_eq!((e, a.error_offset), (Errno::ENOMEM, 2 * i * PS));
            assert_eq!(f.fragments(), fragments, "{attr:#x}: nothing changed");
        }
    }
    assert_eq!(f.attributes(0).unwrap(), before);
    // Every private page back to shared, one by one. Each replaces a hole by the memory file,
    // an mmap(MAP_FIXED) the kernel refuses at its limit (ENOMEM) although it adds no VMA:
    // gmem gives up a reserve mapping for it.
    let reserve = gmem::emulated::reserve_vmas();
    for p in (0..2 * i).step_by(2) {
        f.set_shared(p * PS, PS).unwrap();
    }
    let reserve_after = gmem::emulated::reserve_vmas();
    f.set_shared(0, pages * PS).unwrap();
    assert!(!sigbus_at(&m, 0));
    drop(filler);
    println!(
        "max_map_count {max}: refused at run {i}; then {outcomes:?}; reserve {reserve} before \
         the restores, {reserve_after} after"
    );
}

/// Issue 20 item 11: an emulated file holds one descriptor of its own, as the kernel's does
/// (the memory file; the hole file and the guard's userfaultfd are the process's), and
/// mapping, converting and dropping add none or leave none behind.
fn one_descriptor_per_file() {
    if !is_child() {
        return in_child("one_descriptor_per_file", 60);
    }
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let opts = EmulatedOptions::with_revocation(Revocation::Guard);
    let warm = EmulatedGuestMemfd::create_with(16 * PS, SHARED, opts).unwrap();
    drop(warm.mmap_all().unwrap());
    // A conversion waits until the guard has handled every unmap event (it reads
    // `/proc/self/maps` for each: a descriptor open for a moment).
    let settle = || {
        warm.set_private(0, PS).unwrap();
        warm.set_shared(0, PS).unwrap();
    };
    settle();
    let before = fds();
    let files: Vec<EmulatedGuestMemfd> = (0..64)
        .map(|i| {
            let flags = if i % 2 == 0 {
                SHARED
            } else {
                SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP
            };
            EmulatedGuestMemfd::create_with(16 * PS, flags, opts).unwrap()
        })
        .collect();
    assert_eq!(fds() - before, 64, "descriptors for 64 files");
    let maps: Vec<HostMapping> = files.iter().map(|f| f.mmap_all().unwrap()).collect();
    for (f, m) in files.iter().zip(&maps) {
        f.write_at(0, &[1; 8]).unwrap();
        m.write_volatile(PS as usize, &[2; 8]).unwrap();
        f.set_private(0, 2 * PS).unwrap();
        assert!(sigbus_at(m, PS));
        f.set_shared(0, 2 * PS).unwrap();
    }
    assert_eq!(fds() - before, 64, "after mapping and converting");
    drop(maps);
    drop(files);
    settle();
    assert_eq!(fds(), before, "after dropping");
}

/// Issue 20 item 11: under the guard a conversion takes no VMA, so with the process at
/// `vm.max_map_count` (less a few for the probes) 512 separate private runs all succeed, are
/// refused to the host, and go back to shared.
fn guard_conversions_at_the_vma_limit_succeed() {
    if !is_child() {
        return in_child("guard_conversions_at_the_vma_limit_succeed", 120);
    }
    let max = max_map_count().expect("vm.max_map_count");
    let pages = 1024u64;
    let opts = EmulatedOptions::with_revocation(Revocation::Guard);
    let f = EmulatedGuestMemfd::create_with(pages * PS, SHARED, opts).unwrap();
    let m = f.mmap_all().unwrap();
    m.write_volatile(0, &vec![7u8; (pages * PS) as usize])
        .unwrap();
    let filler = fill_vmas(max, 40);
    let left = max.saturating_sub(map_count());
    for p in (0..pages).step_by(2) {
        f.set_private(p * PS, PS).unwrap();
    }
    assert_eq!(f.fragments(), pages as usize);
    assert!(sigbus_at(&m, 0) && sigbus_at(&m, 510 * PS));
    assert!(!sigbus_at(&m, PS));
    f.set_shared(0, pages * PS).unwrap();
    assert_eq!(
        m.probe_read(510 * PS as usize, 1).unwrap(),
        Probe::Done(vec![7])
    );
    assert_eq!(
        max.saturating_sub(map_count()),
        left,
        "VMAs taken by conversions"
    );
    drop(filler);
    println!("max_map_count {max}: 512 private runs with {left} VMAs left, none taken");
}

/// Issue 20 item 11: under a tight `RLIMIT_AS` (64 MiB above what the process uses), a
/// NO_DIRECT_MAP file is created as the kernel creates one (no address space needed, even for
/// 1 GiB), mapping more than the limit allows is the kernel's ENOMEM with nothing changed, and
/// a fork child keeps every shared page and is refused every private one.
fn a_tight_address_space_limit_changes_nothing_silently() {
    if !is_child() {
        return in_child("a_tight_address_space_limit_changes_nothing_silently", 60);
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let vm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    let limit = (vm_kib << 10) + (64 << 20);
    let rl = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: setrlimit on this (child) process only.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &rl) }, 0);
    let flags = SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP;
    let opts = EmulatedOptions::with_revocation(Revocation::Guard);
    let big = EmulatedGuestMemfd::create_with(1 << 30, flags, opts).unwrap();
    assert_eq!(big.mmap_all().unwrap_err(), Errno::ENOMEM);
    assert_eq!(big.attributes(0).unwrap(), 0, "nothing changed");
    let f = EmulatedGuestMemfd::create_with(16 * PS, flags, opts).unwrap();
    let m = f.mmap_all().unwrap();
    f.write_at(0, &[0x11; 8]).unwrap();
    f.set_private(PS, PS).unwrap();
    // SAFETY: fork(2); the child only probes the mapping and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let ok = m.probe_read(0, 1).map(|p| p == Probe::Done(vec![0x11])) == Ok(true)
            && sigbus_at(&m, PS);
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(i32::from(!ok)) };
    }
    let mut st = 0;
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "child {st:#x}"
    );
}

/// This process's VMAs (lines of `/proc/self/maps`).
fn map_count() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}

/// Anonymous memory that takes this process's VMAs up to `max` less about `spare`: pages
/// with alternating protections cannot merge, one VMA each.
fn fill_vmas(max: usize, spare: usize) -> gmem::os::Mmap {
    let pages = max.saturating_sub(map_count()).saturating_sub(spare);
    let filler = gmem::os::Mmap::new(
        None,
        0,
        pages * PS as usize,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
    )
    .unwrap();
    for p in (0..pages).step_by(2) {
        // SAFETY: a page of our own anonymous mapping, never accessed.
        let r = unsafe {
            libc::mprotect(
                filler.as_ptr().add(p * PS as usize).cast(),
                PS as usize,
                libc::PROT_READ,
            )
        };
        assert_eq!(r, 0, "mprotect at page {p}");
    }
    filler
}

/// `vm.max_map_count`.
fn max_map_count() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Why the real limit cannot be reached quickly here, if it cannot.
fn exhaustion_too_slow() -> Option<String> {
    match max_map_count() {
        None => Some("vm.max_map_count cannot be read".to_string()),
        Some(max) if max > 1 << 20 => Some(format!(
            "vm.max_map_count = {max} is too large to exhaust quickly (at most {})",
            1 << 20
        )),
        Some(_) => None,
    }
}

fn main() {
    let poison = Revocation::Guard.needs(SHARED);
    let trials = vec![
        gmem_testkit::test_needing(
            "many_mappings_and_runs_never_fail_a_conversion_to_shared",
            &poison.into_iter().collect::<Vec<_>>(),
            many_mappings_and_runs_never_fail_a_conversion_to_shared,
        ),
        gmem_testkit::test_needing(
            "one_descriptor_per_file",
            &poison.into_iter().collect::<Vec<_>>(),
            one_descriptor_per_file,
        ),
        gmem_testkit::test_unless(
            "guard_conversions_at_the_vma_limit_succeed",
            exhaustion_too_slow()
                .or_else(|| gmem_testkit::needs(&poison.into_iter().collect::<Vec<_>>())),
            guard_conversions_at_the_vma_limit_succeed,
        ),
        gmem_testkit::test_needing(
            "a_tight_address_space_limit_changes_nothing_silently",
            &poison.into_iter().collect::<Vec<_>>(),
            a_tight_address_space_limit_changes_nothing_silently,
        ),
        gmem_testkit::test(
            "remap_mode_at_the_budget_is_enomem_with_nothing_changed",
            remap_mode_at_the_budget_is_enomem_with_nothing_changed,
        ),
        gmem_testkit::test_unless(
            "real_vma_exhaustion_is_enomem_not_an_abort",
            exhaustion_too_slow(),
            real_vma_exhaustion_is_enomem_not_an_abort,
        ),
    ];
    gmem_testkit::run(trials)
}
