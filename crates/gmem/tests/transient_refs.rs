//! In-flight accesses hold transient references (docs/series.md §2.4 step 3b: any extra
//! reference fails a conversion to private with EAGAIN): a conversion raced against guest
//! accesses and the safe accessors sees EAGAIN at least once, with a page-aligned
//! `error_offset` inside the range and nothing changed; once the accesses stop, it succeeds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{EmulatedGuestMemfd, Errno, GuestMemfd, PAGE_SIZE};

const PAGES: u64 = 16;

/// Races `set_private` on the whole file against `access` in two threads, for at most
/// `limit`; returns (conversions tried, EAGAINs seen). Every failure must be EAGAIN with a
/// page-aligned offset in the range and the file still all shared.
fn race(access: fn(&EmulatedGuestMemfd, u64) -> bool, limit: Duration) -> (u64, u64) {
    let f = Arc::new(
        EmulatedGuestMemfd::create(
            PAGES * PAGE_SIZE,
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        )
        .unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..2)
        .map(|t| {
            let (f, stop) = (Arc::clone(&f), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    access(&f, (i % PAGES) * PAGE_SIZE);
                    i += 1;
                }
            })
        })
        .collect();
    let (mut tries, mut eagain) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < limit && (eagain < 20 || tries < 200) {
        tries += 1;
        match f.set_private(0, PAGES * PAGE_SIZE) {
            Ok(()) => f.set_shared(0, PAGES * PAGE_SIZE).unwrap(),
            Err(e) => {
                assert_eq!(e.errno, Errno::EAGAIN, "{e}");
                assert_eq!(e.error_offset % PAGE_SIZE, 0, "{e}");
                assert!(e.error_offset < PAGES * PAGE_SIZE, "{e}");
                // Nothing changed: every page is still shared.
                let runs = f.attribute_runs(0, PAGES * PAGE_SIZE).unwrap();
                assert!(runs.iter().all(|r| r.2 == 0), "{runs:?}");
                eagain += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    // With nothing in flight the conversion goes through.
    f.set_private(0, PAGES * PAGE_SIZE).unwrap();
    (tries, eagain)
}

#[test]
fn guest_accesses_in_flight_make_a_conversion_to_private_eagain() {
    let (tries, eagain) = race(
        |f, off| {
            let mut b = [0u8; 4096];
            // A private page is fine for the guest; only the conversion may fail.
            f.guest_read(off, &mut b).is_ok()
        },
        Duration::from_secs(5),
    );
    println!("guest accesses: {eagain} EAGAIN in {tries} conversions");
    assert!(eagain >= 1, "no EAGAIN in {tries} conversions");
}

#[test]
fn accessor_reads_in_flight_make_a_conversion_to_private_eagain() {
    let (tries, eagain) = race(
        |f, off| {
            let mut b = [0u8; 4096];
            // Refused (Private) while the page is private: that is not a failure here.
            f.read_at(off, &mut b).is_ok()
        },
        Duration::from_secs(5),
    );
    println!("read_at: {eagain} EAGAIN in {tries} conversions");
    assert!(eagain >= 1, "no EAGAIN in {tries} conversions");
}
