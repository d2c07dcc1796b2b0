//! NO_DIRECT_MAP host-fault hand-out: host faults through a mapping of a NO_DIRECT_MAP file
//! are served by the file's fault service thread, which removes the page from gmem's direct
//! map before mapping it; a failed removal gives SIGBUS with nothing marked. Files without
//! the flag have no service thread.

use gmem::emulated::FAULT_SERVICE_NEEDS;
use gmem::platform::{HookCall, PlatformKind};
use gmem::uapi::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
};
use gmem::{
    EmulatedGuestMemfd, EmulatedOptions, GuestMemfd, MapKind, Probe, Revocation, PAGE_SIZE,
};
use gmem_testkit::{tests_needing, Feature};

const PS: u64 = PAGE_SIZE;
const PAGE: usize = PAGE_SIZE as usize;
const NDM: u64 =
    GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP;

fn file(p: PlatformKind, npages: u64, flags: u64, revocation: Revocation) -> EmulatedGuestMemfd {
    let options = EmulatedOptions {
        revocation,
        ..EmulatedOptions::with_platform(p)
    };
    EmulatedGuestMemfd::create_with(npages * PS, flags, options).unwrap()
}

fn host_fault_hands_out_and_punch_restores() {
    use HookCall::*;
    for (p, rev) in [
        (PlatformKind::SoftwareProtected, Revocation::Guard),
        (PlatformKind::Pkvm, Revocation::Auto),
    ] {
        let f = file(p, 4, NDM, rev);
        assert!(f.has_fault_service(), "{p} {rev:?}");
        let log = f.record_hooks();
        let m = f.mmap(0, 4 * PAGE, MapKind::Shared).unwrap();
        assert!(!f.direct_map_removed(1));
        // A host write (missing fault, in a probe child) zeroes, removes and marks.
        assert_eq!(m.probe_write(PAGE, 16, 0x5a).unwrap(), Probe::Done(()));
        assert!(f.direct_map_removed(1), "{p} {rev:?}");
        assert!(!f.direct_map_removed(0));
        let mut buf = [0u8; 16];
        f.read_at(PS, &mut buf).unwrap();
        assert_eq!(buf, [0x5a; 16]);
        // A host read of a page allocated behind the mapping (minor fault) removes it too.
        f.allocate(2 * PS, PS).unwrap();
        assert_eq!(m.probe_read(2 * PAGE, 8).unwrap(), Probe::Done(vec![0; 8]));
        assert!(f.direct_map_removed(2));
        // A fault in this thread is served as well, and the content is kept.
        let mut got = [0u8; 4];
        m.read_volatile(PAGE, &mut got).unwrap();
        assert_eq!(got, [0x5a; 4]);
        assert_eq!(
            std::mem::take(&mut *log.lock().unwrap()),
            vec![Zero(1), DirectMapRemove(1), Zero(2), DirectMapRemove(2)],
            "{p} {rev:?}"
        );
        // Private pages still raise SIGBUS with no event (a marker or a hole).
        f.set_private(0, PS).unwrap();
        let r = m.probe_read(0, 1).unwrap();
        assert!(r.is_sigbus(), "{p} {rev:?}: {r:?}");
        assert!(!f.direct_map_removed(0));
        // Re-sharing zaps the marker: the next access is an event, served by the thread.
        f.set_shared(0, PS).unwrap();
        assert_eq!(m.probe_write(0, 8, 1).unwrap(), Probe::Done(()));
        assert!(f.direct_map_removed(0), "{p} {rev:?}");
        // Punch restores; the next access hands the fresh page out again.
        f.punch_hole(PS, PS).unwrap();
        assert!(!f.direct_map_removed(1));
        assert_eq!(m.probe_read(PAGE, 8).unwrap(), Probe::Done(vec![0; 8]));
        assert!(f.direct_map_removed(1), "{p} {rev:?}");
        drop(m);
        drop(f);
    }
}

fn host_fault_through_a_large_private_run_and_a_reshare() {
    // A large private run, a partial and a full re-share: every host fault of a shared page
    // is handed out, every one of a private page is SIGBUS.
    let options = EmulatedOptions {
        revocation: Revocation::Guard,
        ..EmulatedOptions::with_platform(PlatformKind::SoftwareProtected)
    };
    let f = EmulatedGuestMemfd::create_with(64 * PS, NDM, options).unwrap();
    let m = f.mmap(0, 64 * PAGE, MapKind::Shared).unwrap();
    f.set_private(8 * PS, 32 * PS).unwrap();
    assert!(m.probe_read(20 * PAGE, 1).unwrap().is_sigbus());
    // A partial restore and a full one.
    f.set_shared(10 * PS, PS).unwrap();
    assert_eq!(m.probe_write(10 * PAGE, 8, 3).unwrap(), Probe::Done(()));
    assert!(f.direct_map_removed(10));
    assert!(m.probe_read(11 * PAGE, 1).unwrap().is_sigbus());
    f.set_shared(8 * PS, 32 * PS).unwrap();
    for page in [8u64, 20, 39] {
        assert_eq!(
            m.probe_write(page as usize * PAGE, 8, 4).unwrap(),
            Probe::Done(())
        );
        assert!(f.direct_map_removed(page), "page {page}");
    }
}

fn host_fault_failed_removal_is_sigbus_and_marks_nothing() {
    let f = file(PlatformKind::SoftwareProtected, 4, NDM, Revocation::Auto);
    let m = f.mmap(0, 4 * PAGE, MapKind::Shared).unwrap();
    f.inject_mapping_failure(0);
    let r = m.probe_write(2 * PAGE + 8, 8, 9).unwrap();
    let fault = r.fault().expect("SIGBUS");
    assert!(fault.is_sigbus(), "{fault:?}");
    assert_eq!(fault.addr, 2 * PS + 8, "{fault:?}");
    assert!(!f.direct_map_removed(2));
    // The marker stays until the page leaves the file or is converted; injection is off now.
    assert!(m.probe_read(2 * PAGE, 1).unwrap().is_sigbus());
    assert!(!f.direct_map_removed(2));
    f.punch_hole(2 * PS, PS).unwrap();
    assert_eq!(m.probe_write(2 * PAGE, 8, 9).unwrap(), Probe::Done(()));
    assert!(f.direct_map_removed(2));
    // Same through a conversion round trip.
    f.inject_mapping_failure(0);
    assert!(m.probe_read(3 * PAGE, 1).unwrap().is_sigbus());
    assert!(!f.direct_map_removed(3));
    f.set_private(3 * PS, PS).unwrap();
    f.set_shared(3 * PS, PS).unwrap();
    assert_eq!(m.probe_read(3 * PAGE, 1).unwrap(), Probe::Done(vec![0]));
    assert!(f.direct_map_removed(3));
}

/// With the guard, every file's host faults are served at fault time by one thread of the
/// process (`gmem-guard`), which hands a page out only on a NO_DIRECT_MAP file; in Remap mode
/// nothing serves them.
fn host_faults_are_served_by_the_guard_thread_of_the_process() {
    let flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    let plain = file(PlatformKind::SoftwareProtected, 2, flags, Revocation::Guard);
    assert!(plain.has_fault_service());
    let m = plain.mmap(0, 2 * PAGE, MapKind::Shared).unwrap();
    assert_eq!(m.probe_write(0, 8, 1).unwrap(), Probe::Done(()));
    // No hand-out at host faults without the flag.
    assert!(!plain.direct_map_removed(0));
    let remap = file(PlatformKind::SoftwareProtected, 2, flags, Revocation::Remap);
    assert!(!remap.has_fault_service());
    let f = file(PlatformKind::SoftwareProtected, 2, NDM, Revocation::Guard);
    assert!(f.has_fault_service());
    let m = f.mmap(0, PAGE, MapKind::Shared).unwrap();
    assert_eq!(m.probe_write(0, 8, 1).unwrap(), Probe::Done(()));
    assert!(f.direct_map_removed(0));
    // One thread for the process, however many files.
    let named = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|c| c.trim() == "gmem-guard")
            .count()
    };
    for _ in 0..3 {
        let g = file(PlatformKind::SoftwareProtected, 2, NDM, Revocation::Guard);
        let m = g.mmap(0, PAGE, MapKind::Shared).unwrap();
        assert_eq!(m.probe_write(0, 8, 1).unwrap(), Probe::Done(()));
    }
    assert_eq!(named(), 1);
}

fn kernel_mode_fault_on_a_host_mapping_is_served() {
    // `read_at` into a buffer that is an unfaulted page of a host mapping of the same file:
    // the copy faults in the kernel while `read_at` holds the invalidate lock (shared); the
    // service does not need that lock, so the fault is served (as root, kernel-mode faults
    // are events where the process may have them; a user-mode-only descriptor would give
    // EFAULT instead, so the test needs them).
    let f = file(PlatformKind::SoftwareProtected, 4, NDM, Revocation::Auto);
    f.write_at(0, &[0x77; PAGE]).unwrap();
    let m = f.mmap(0, 4 * PAGE, MapKind::Shared).unwrap();
    // SAFETY: page 1 of the live mapping `m`, shared, not otherwise referenced while `dst`
    // lives; faulting it is what this test is about.
    let dst = unsafe { std::slice::from_raw_parts_mut(m.as_ptr().add(PAGE), PAGE) };
    f.read_at(0, dst).expect("a kernel-mode fault served");
    assert_eq!(dst, &[0x77; PAGE][..]);
    assert!(f.direct_map_removed(1));
}

fn populate_from_an_unfaulted_page_of_the_same_file_does_not_deadlock() {
    // The source is a shared page of a host mapping of the same NO_DIRECT_MAP file, not yet
    // faulted in that mapping: reading it is a host fault that the file's service thread
    // serves. A detached thread owns the file and the mapping, so a deadlock fails the test
    // (timeout) instead of hanging it.
    let f = std::sync::Arc::new(file(
        PlatformKind::SoftwareProtected,
        4,
        NDM,
        Revocation::Guard,
    ));
    let m = std::sync::Arc::new(f.mmap(0, 4 * PAGE, MapKind::Shared).unwrap());
    f.write_at(2 * PS, &[0x3c; PAGE]).unwrap();
    f.set_private(0, PS).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (f2, m2) = (f.clone(), m.clone());
    std::thread::spawn(move || {
        // SAFETY: page 2 of the mapping (kept alive by `m2`) is shared; the slice is only
        // read, and nothing writes the page while it is borrowed.
        let src = unsafe { std::slice::from_raw_parts(m2.as_ptr().add(2 * PAGE), PAGE) };
        let _ = tx.send(f2.populate(0, Some(src), 1, &|| false));
    });
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("populate deadlocked");
    assert_eq!(r, Ok(1));
    f.set_shared(0, PS).unwrap();
    let mut got = [0u8; 8];
    f.read_at(0, &mut got).unwrap();
    assert_eq!(got, [0x3c; 8]);
}

/// Item 1 of issue 11: a thread keeps accessing page 0 of a NO_DIRECT_MAP file through a host
/// mapping (each access a probe, so a fault is reported) while another converts it private
/// and back and probes it right after each conversion to private. An access made while the
/// page was private for the whole access must fault, and no successful write may be lost.
/// Bounded: GMEM_RACE_SECS seconds per revocation mode (default 2).
fn host_fault_service_never_maps_a_private_page() {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::SeqCst};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let secs: u64 = std::env::var("GMEM_RACE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    for rev in [Revocation::Guard, Revocation::Remap] {
        let f = Arc::new(file(PlatformKind::SoftwareProtected, 2, NDM, rev));
        let m = Arc::new(f.mmap(0, 2 * PAGE, MapKind::Shared).unwrap());
        // Even: no conversion in flight; `private` is valid while it stays the same.
        let gen = Arc::new(AtomicU64::new(0));
        let private = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let model = Arc::new(AtomicU8::new(0));
        let toucher = {
            let (m, gen, private, stop, model) = (
                m.clone(),
                gen.clone(),
                private.clone(),
                stop.clone(),
                model.clone(),
            );
            std::thread::spawn(move || {
                let (mut violations, mut accesses, mut counter) = (0u64, 0u64, 0u8);
                while !stop.load(SeqCst) {
                    let g0 = gen.load(SeqCst);
                    let was_private = private.load(SeqCst);
                    counter = counter.wrapping_add(1).max(1);
                    let write = counter % 2 == 0;
                    let ok = if write {
                        m.probe_write(0, 1, counter).unwrap() == Probe::Done(())
                    } else {
                        !m.probe_read(0, 1).unwrap().is_sigbus()
                    };
                    if write && ok {
                        model.store(counter, SeqCst);
                    }
                    if gen.load(SeqCst) == g0 && g0 % 2 == 0 {
                        accesses += 1;
                        if was_private && ok {
                            violations += 1;
                        }
                    }
                }
                (violations, accesses)
            })
        };
        let deadline = Instant::now() + Duration::from_secs(secs);
        let (mut conversions, mut exposed) = (0u64, 0u64);
        while Instant::now() < deadline {
            gen.fetch_add(1, SeqCst);
            f.set_private(0, PS).unwrap();
            private.store(true, SeqCst);
            gen.fetch_add(1, SeqCst);
            conversions += 1;
            // Private for the whole probe: it must fault.
            if !m.probe_read(0, 1).unwrap().is_sigbus() {
                exposed += 1;
            }
            gen.fetch_add(1, SeqCst);
            f.set_shared(0, PS).unwrap();
            private.store(false, SeqCst);
            gen.fetch_add(1, SeqCst);
        }
        stop.store(true, SeqCst);
        let (violations, accesses) = toucher.join().unwrap();
        let mut last = [0u8];
        f.read_at(0, &mut last).unwrap();
        println!(
            "{rev:?}: {conversions} conversions to private, {exposed} readable right after, \
             {accesses} strictly checked accesses, {violations} succeeded on a private page"
        );
        assert_eq!((exposed, violations), (0, 0), "{rev:?}");
        assert_eq!(last[0], model.load(SeqCst), "{rev:?}: a write was lost");
        assert!(
            conversions > 50 && accesses > 50,
            "{rev:?}: too little happened"
        );
    }
}

/// The conversion gate must not make the service wait for a conversion that waits for the
/// faulting thread: `read_at` into an unfaulted page of a host mapping of the same file
/// faults while it holds the invalidate lock shared, and a conversion queued for that lock
/// meanwhile must not stop the fault from being served. Bounded by a timeout.
fn kernel_mode_fault_with_a_conversion_queued_does_not_deadlock() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::sync::Arc;
    let f = Arc::new(file(
        PlatformKind::SoftwareProtected,
        4,
        NDM,
        Revocation::Guard,
    ));
    f.write_at(0, &[0x42; PAGE]).unwrap();
    let m = Arc::new(f.mmap(0, 4 * PAGE, MapKind::Shared).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let converter = {
        let (f, stop) = (f.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                f.set_private(3 * PS, PS).unwrap();
                f.set_shared(3 * PS, PS).unwrap();
            }
        })
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let (f2, m2) = (f.clone(), m.clone());
    std::thread::spawn(move || {
        for _ in 0..2000 {
            // SAFETY: page 1 of the live mapping `m2`; dropping its PTE keeps the file's data.
            let dst = unsafe { m2.as_ptr().add(PAGE) };
            // SAFETY: as above; DONTNEED on a shared mapping only drops PTEs.
            let r = unsafe { libc::madvise(dst.cast(), PAGE, libc::MADV_DONTNEED) };
            assert_eq!(r, 0);
            // SAFETY: page 1 is shared and nothing else borrows it while `buf` lives.
            let buf = unsafe { std::slice::from_raw_parts_mut(dst, PAGE) };
            f2.read_at(0, buf).unwrap();
        }
        let _ = tx.send(());
    });
    let r = rx.recv_timeout(std::time::Duration::from_secs(20));
    stop.store(true, SeqCst);
    r.expect("read_at into a host mapping deadlocked with a queued conversion");
    converter.join().unwrap();
}

fn main() {
    // Every test here exercises the host-fault service of a NO_DIRECT_MAP file.
    let mut trials = tests_needing!([FAULT_SERVICE_NEEDS];
        host_fault_hands_out_and_punch_restores,
        host_fault_through_a_large_private_run_and_a_reshare,
        host_fault_failed_removal_is_sigbus_and_marks_nothing,
        host_faults_are_served_by_the_guard_thread_of_the_process,
        populate_from_an_unfaulted_page_of_the_same_file_does_not_deadlock,
        host_fault_service_never_maps_a_private_page,
    );
    // A system call faulting on a host mapping is an event only where this process may have
    // kernel-mode faults.
    trials.extend(
        tests_needing!([FAULT_SERVICE_NEEDS, Feature::UserfaultfdKernelFaults];
            kernel_mode_fault_on_a_host_mapping_is_served,
            kernel_mode_fault_with_a_conversion_queued_does_not_deadlock,
        ),
    );
    gmem_testkit::run(trials)
}
