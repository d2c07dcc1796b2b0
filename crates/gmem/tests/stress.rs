//! Stress: threads read and write random pages through a host mapping while another thread
//! converts random ranges, for a bounded time (GMEM_STRESS_SECS, default 3). Plain files and
//! NO_DIRECT_MAP files (whose host faults a service thread resolves with `UFFDIO_CONTINUE`).
//!
//! Invariants checked:
//! - an access made while its page was private for the whole access faults (SIGBUS), one made
//!   while it was shared for the whole access succeeds;
//! - no write to a shared page is lost: each page has one writer thread, which keeps a model
//!   of the page's content and checks every successful read of it, and at the end every page
//!   equals the model (conversions preserve content on this platform).
//!
//! "For the whole access" is decided with a per-page generation counter that the converter
//! makes odd while a conversion of the page is in flight.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gmem::platform::PlatformKind;
use gmem::uapi::*;
use gmem::*;

const PS: u64 = PAGE_SIZE;
const NPAGES: u64 = 64;
const WRITERS: u64 = 3;

struct Shared {
    gen: Vec<AtomicU64>,
    private: Vec<AtomicBool>,
    /// Last byte each page's owner wrote successfully (0 = never written).
    model: Vec<AtomicU8>,
    stop: AtomicBool,
    strict_checks: AtomicU64,
    faults_seen: AtomicU64,
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

fn stress(revocation: Revocation) {
    stress_with(EmulatedOptions::with_revocation(revocation));
}

fn stress_with(opts: EmulatedOptions) {
    stress_file(opts, 0);
}

fn stress_file(opts: EmulatedOptions, extra_flags: u64) {
    let secs: u64 = std::env::var("GMEM_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let f = Arc::new(
        EmulatedGuestMemfd::create_with(
            NPAGES * PS,
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | extra_flags,
            opts,
        )
        .unwrap(),
    );
    let m = Arc::new(f.mmap_all().unwrap());
    let s = Arc::new(Shared {
        gen: (0..NPAGES).map(|_| AtomicU64::new(0)).collect(),
        private: (0..NPAGES).map(|_| AtomicBool::new(false)).collect(),
        model: (0..NPAGES).map(|_| AtomicU8::new(0)).collect(),
        stop: AtomicBool::new(false),
        strict_checks: AtomicU64::new(0),
        faults_seen: AtomicU64::new(0),
    });
    let deadline = Instant::now() + Duration::from_secs(secs);

    let converter = {
        let (f, s) = (f.clone(), s.clone());
        std::thread::spawn(move || {
            let mut r = rng(0x5eed);
            let mut conversions = 0u64;
            while Instant::now() < deadline {
                let first = r(NPAGES);
                let n = (r(8) + 1).min(NPAGES - first);
                let to_private = r(2) == 1;
                for p in first..first + n {
                    s.gen[p as usize].fetch_add(1, SeqCst);
                }
                let mut a = kvm_memory_attributes2::new(
                    first * PS,
                    n * PS,
                    if to_private {
                        KVM_MEMORY_ATTRIBUTE_PRIVATE
                    } else {
                        0
                    },
                );
                f.set_attributes(&mut a)
                    .expect("no pins: every conversion must succeed");
                for p in first..first + n {
                    s.private[p as usize].store(to_private, SeqCst);
                    s.gen[p as usize].fetch_add(1, SeqCst);
                }
                conversions += 1;
            }
            s.stop.store(true, SeqCst);
            conversions
        })
    };

    let accessors: Vec<_> = (0..WRITERS)
        .map(|tid| {
            let (m, s) = (m.clone(), s.clone());
            std::thread::spawn(move || {
                let mut r = rng(tid * 7919 + 11);
                let mut counter = 0u8;
                while !s.stop.load(SeqCst) {
                    let write = r(2) == 1;
                    // Writers write only their own pages; anyone reads anything.
                    let p = if write {
                        r(NPAGES / WRITERS) * WRITERS + tid
                    } else {
                        r(NPAGES)
                    };
                    let own = p % WRITERS == tid;
                    let g0 = s.gen[p as usize].load(SeqCst);
                    let was_private = s.private[p as usize].load(SeqCst);
                    let off = (p * PS) as usize;
                    let outcome = if write {
                        counter = counter.wrapping_add(1).max(1);
                        m.probe_write(off, 1, counter).unwrap().fault().map(|_| ())
                    } else {
                        match m.probe_read(off, 1).unwrap() {
                            Probe::Done(b) => {
                                if own {
                                    let want = s.model[p as usize].load(SeqCst);
                                    assert_eq!(
                                        b[0], want,
                                        "page {p}: read {:#x}, last write was {want:#x}",
                                        b[0]
                                    );
                                }
                                None
                            }
                            Probe::Fault(f) => {
                                assert!(
                                    f.is_sigbus() && f.addr == off as u64,
                                    "unexpected fault {f:?}"
                                );
                                Some(())
                            }
                        }
                    };
                    let faulted = outcome.is_some();
                    if faulted {
                        s.faults_seen.fetch_add(1, SeqCst);
                    }
                    if write && !faulted {
                        s.model[p as usize].store(counter, SeqCst);
                    }
                    let g1 = s.gen[p as usize].load(SeqCst);
                    if g0 == g1 && g0 % 2 == 0 {
                        s.strict_checks.fetch_add(1, SeqCst);
                        assert_eq!(
                            faulted,
                            was_private,
                            "page {p} was {} for the whole access, yet the access {}",
                            if was_private { "private" } else { "shared" },
                            if faulted { "faulted" } else { "succeeded" }
                        );
                    }
                }
            })
        })
        .collect();

    let conversions = converter.join().unwrap();
    for a in accessors {
        a.join().unwrap();
    }
    // Every write that landed is still there.
    f.set_shared(0, NPAGES * PS).unwrap();
    for p in 0..NPAGES {
        let mut b = [0u8];
        f.read_at(p * PS, &mut b).unwrap();
        assert_eq!(
            b[0],
            s.model[p as usize].load(SeqCst),
            "page {p}: a write was lost"
        );
    }
    let strict = s.strict_checks.load(SeqCst);
    let faults = s.faults_seen.load(SeqCst);
    println!(
        "{opts:?} flags {extra_flags:#x}: {conversions} conversions, {strict} strictly checked \
         accesses, {faults} faults"
    );
    assert!(
        conversions > 100 && strict > 100 && faults > 10,
        "too little happened to mean anything"
    );
}

#[test]
fn stress_poison() {
    stress(Revocation::Poison);
}

#[test]
fn stress_remap() {
    stress(Revocation::Remap);
}

#[test]
fn stress_poison_with_holes() {
    // Every run becomes a hole, and a budget of 4 forces constant demotion to markers.
    stress_with(EmulatedOptions {
        revocation: Revocation::Poison,
        hole_min_bytes: PS,
        hole_budget: 4,
        ..EmulatedOptions::default()
    });
}

#[test]
fn stress_no_direct_map_poison() {
    let opts = EmulatedOptions::with_revocation(Revocation::Poison);
    stress_file(opts, GUEST_MEMFD_FLAG_NO_DIRECT_MAP);
}

#[test]
fn stress_no_direct_map_remap() {
    let opts = EmulatedOptions::with_revocation(Revocation::Remap);
    stress_file(opts, GUEST_MEMFD_FLAG_NO_DIRECT_MAP);
}

#[test]
fn stress_no_direct_map_pkvm_with_holes() {
    // The other platform that offers NO_DIRECT_MAP, with holes and constant demotion.
    stress_file(
        EmulatedOptions {
            revocation: Revocation::Poison,
            hole_min_bytes: PS,
            hole_budget: 4,
            ..EmulatedOptions::with_platform(PlatformKind::Pkvm)
        },
        GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    );
}
