//! Accessors over shared and private memory, dirty tracking, references against conversions,
//! listeners, the conversion entry point.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{EmulatedGuestMemfd, GuestMemfd};
use gmem_vm_memory::{
    private_address, ConvertError, GmemMemory, GmemRegion, IommuTracker, RecordingListener,
    VhostUserTable,
};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
    Permissions,
};

const PAGE: u64 = 4096;
const BASE: u64 = 0x1_0000_0000;

fn file(pages: u64) -> Arc<dyn GuestMemfd> {
    Arc::new(
        EmulatedGuestMemfd::create(
            pages * PAGE,
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        )
        .expect("emulated file"),
    )
}

fn memory(pages: u64) -> GmemMemory {
    let r = GmemRegion::new(file(pages), 0, pages * PAGE, GuestAddress(BASE)).expect("region");
    GmemMemory::new(vec![r]).expect("memory")
}

/// Asserts `e` is vm-memory's refusal of private memory at `gpa`.
fn assert_private<T: std::fmt::Debug>(r: Result<T, vm_memory::GuestMemoryError>, gpa: u64) {
    match r {
        Err(e) => {
            assert_eq!(private_address(&e), Some(gpa), "{e}");
            assert!(e.to_string().contains(&format!("{gpa:#x}")), "{e}");
        }
        Ok(v) => panic!("access to private memory at {gpa:#x} succeeded: {v:?}"),
    }
}

#[test]
fn shared_memory_works_through_every_accessor() {
    let mem = memory(4);
    let a = GuestAddress(BASE + 100);
    assert_eq!(mem.write(b"hello", a).unwrap(), 5);
    let mut b = [0u8; 5];
    assert_eq!(mem.read(&mut b, a).unwrap(), 5);
    assert_eq!(&b, b"hello");
    mem.write_slice(&[7u8; 8192], GuestAddress(BASE + 0x800))
        .unwrap();
    let mut big = [0u8; 8192];
    mem.read_slice(&mut big, GuestAddress(BASE + 0x800))
        .unwrap();
    assert_eq!(big, [7u8; 8192]);
    mem.write_obj(0xdead_beef_u32, GuestAddress(BASE + 0x1ffe))
        .unwrap(); // straddles pages
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(BASE + 0x1ffe)).unwrap(),
        0xdead_beef
    );
    assert!(mem.check_range(
        GuestAddress(BASE),
        4 * PAGE as usize,
        Permissions::ReadWrite
    ));
    let total: usize = mem
        .get_slices(GuestAddress(BASE), 3 * PAGE as usize, Permissions::Read)
        .unwrap()
        .map(|s| s.unwrap().len())
        .sum();
    assert_eq!(total, 3 * PAGE as usize);
    // Past the end: vm-memory's ordinary errors, no panic.
    assert!(!mem.check_range(
        GuestAddress(BASE + 3 * PAGE),
        2 * PAGE as usize,
        Permissions::Read
    ));
    assert!(mem.read_obj::<u64>(GuestAddress(BASE + 4 * PAGE)).is_err());
    // The same through a guard, which holds the references until it drops.
    let g = mem.access();
    assert_eq!(
        g.read_obj::<u32>(GuestAddress(BASE + 0x1ffe)).unwrap(),
        0xdead_beef
    );
    assert!(g.held_ranges() > 0);
    assert_eq!(
        mem.regions()
            .find_region(GuestAddress(BASE))
            .unwrap()
            .references_at(0x1000),
        1
    );
    drop(g);
    assert_eq!(
        mem.regions()
            .find_region(GuestAddress(BASE))
            .unwrap()
            .references_at(0x1000),
        0
    );
}

#[test]
fn private_memory_is_an_error_on_every_accessor() {
    let mem = memory(4);
    mem.write_slice(&[0x5a; 4096], GuestAddress(BASE + PAGE))
        .unwrap();
    mem.convert(BASE + PAGE, PAGE, true).unwrap();
    let p = BASE + PAGE;
    let a = GuestAddress(p);
    let mut buf = [0u8; 16];
    assert_private(mem.read(&mut buf, a), p);
    assert_private(mem.write(&buf, a), p);
    assert_private(mem.read_slice(&mut buf, a), p);
    assert_private(mem.write_slice(&buf, a), p);
    assert_private(mem.read_obj::<u64>(a), p);
    assert_private(mem.write_obj(1u64, a), p);
    assert_private(mem.store(1u32, a, Ordering::SeqCst), p);
    assert_private(mem.load::<u32>(a, Ordering::SeqCst), p);
    // Starting in the shared page before: the error names the first private page.
    assert_private(mem.read_slice(&mut [0u8; 8], GuestAddress(p - 4)), p);
    assert_private(mem.read_obj::<u64>(GuestAddress(p + 8)), p + 8);
    assert!(!mem.check_range(GuestAddress(BASE), 2 * PAGE as usize, Permissions::Read));
    assert!(!mem.check_range(a, 1, Permissions::Write));
    // get_slices yields one slice per region piece: a piece with a private page is refused
    // whole (a shared prefix would make `read` a silent partial read).
    let mut it = mem
        .get_slices(GuestAddress(BASE), 2 * PAGE as usize, Permissions::Read)
        .unwrap();
    assert_private(it.next().unwrap(), p);
    assert!(it.next().is_none());
    drop(it);
    assert_eq!(
        mem.get_slices(GuestAddress(BASE), PAGE as usize, Permissions::Read)
            .unwrap()
            .map(|s| s.unwrap().len())
            .sum::<usize>(),
        PAGE as usize
    );
    // Through a guard.
    let g = mem.access();
    assert_private(g.read_obj::<u32>(a), p);
    assert!(!g.check_range(a, 4, Permissions::Read));
    assert_eq!(g.held_ranges(), 0);
    drop(g);
    // The region's own vm-memory methods refuse too (they hold no reference).
    let r = mem.regions().find_region(a).unwrap();
    assert_private(r.get_slice(MemoryRegionAddress(PAGE), 8), p);
    assert_private(r.read_obj::<u64>(MemoryRegionAddress(PAGE)), p);
    assert_private(mem.regions().get_slice(a, 8), p);
    // The SIGBUS the checks avoid is real: the raw mapping faults.
    let probe = r.host_mapping().probe_read(PAGE as usize, 1).unwrap();
    assert!(probe.is_sigbus());
    // Back to shared: content preserved, accessors work again.
    mem.convert(p, PAGE, false).unwrap();
    assert_eq!(mem.read_obj::<u64>(a).unwrap(), 0x5a5a_5a5a_5a5a_5a5a);
}

#[test]
fn dirty_bitmap_tracks_writes() {
    let r: GmemRegion<AtomicBitmap> =
        GmemRegion::new(file(8), 0, 8 * PAGE, GuestAddress(BASE)).unwrap();
    let mem = GmemMemory::new(vec![r]).unwrap();
    let region = mem.regions().find_region(GuestAddress(BASE)).unwrap();
    assert!(!region.bitmap().dirty_at(0));
    mem.read_obj::<u64>(GuestAddress(BASE + 2 * PAGE)).unwrap();
    assert!(
        !region.bitmap().dirty_at(2 * PAGE as usize),
        "a read does not dirty"
    );
    mem.write_obj(1u64, GuestAddress(BASE + 2 * PAGE + 8))
        .unwrap();
    mem.write_slice(&[1u8; 2 * 4096], GuestAddress(BASE + 5 * PAGE))
        .unwrap();
    let dirty: Vec<u64> = (0..8)
        .filter(|&p| region.bitmap().dirty_at((p * PAGE) as usize))
        .collect();
    assert_eq!(dirty, vec![2, 5, 6]);
    // Writes through a guard's slices dirty too; refused writes to private pages do not.
    mem.convert(BASE + 7 * PAGE, PAGE, true).unwrap();
    let g = mem.access();
    for s in g
        .get_slices(GuestAddress(BASE), 8, Permissions::Write)
        .unwrap()
    {
        s.unwrap().write_obj(9u64, 0).unwrap();
    }
    assert!(g.write_obj(9u64, GuestAddress(BASE + 7 * PAGE)).is_err());
    drop(g);
    assert!(region.bitmap().dirty_at(0));
    assert!(!region.bitmap().dirty_at(7 * PAGE as usize));
}

#[test]
fn a_held_slice_blocks_conversion_until_dropped() {
    let mem = memory(4);
    mem.set_busy_wait(Duration::ZERO);
    let g = mem.access();
    let slices: Vec<_> = g
        .get_slices(GuestAddress(BASE + 2 * PAGE), 16, Permissions::Write)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    // The slice outlives its iterator; the guard still holds the page.
    assert_eq!(
        mem.convert(BASE, 4 * PAGE, true),
        Err(ConvertError::Busy {
            error_gpa: BASE + 2 * PAGE
        })
    );
    assert!(!mem.is_private(BASE), "nothing changed");
    slices[0].write_obj(3u64, 0).unwrap(); // still shared: no SIGBUS
    drop(slices);
    drop(g);
    // A waiting conversion goes through once the guard drops.
    mem.set_busy_wait(Duration::from_secs(5));
    std::thread::scope(|s| {
        let g = mem.access();
        let slice = g
            .get_slices(GuestAddress(BASE), 8, Permissions::Read)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let t = s.spawn(|| mem.convert(BASE, 4 * PAGE, true));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!t.is_finished(), "the conversion waits for the guard");
        // Accessors refuse the pages while it waits: no new reference can start.
        assert!(
            private_address(&mem.read_obj::<u64>(GuestAddress(BASE + PAGE)).unwrap_err()).is_some()
        );
        let _ = slice.read_obj::<u64>(0).unwrap(); // still held: no SIGBUS
        drop(g);
        assert_eq!(t.join().unwrap(), Ok(()));
    });
    assert!(mem.is_private(BASE + 3 * PAGE));
}

#[test]
fn vmm_pins_are_dropped_on_eagain_and_foreign_pins_fail_with_error_gpa() {
    let mem = memory(4);
    mem.pin(BASE + PAGE, PAGE).unwrap();
    assert_eq!(mem.pins_held(), 1);
    mem.convert(BASE, 4 * PAGE, true).unwrap();
    assert_eq!(
        mem.pins_held(),
        0,
        "the VMM's own pin was dropped and the conversion retried"
    );
    mem.convert(BASE, 4 * PAGE, false).unwrap();
    // A pin the VMM does not own (a device's GUP): EAGAIN at its page, nothing changed.
    let f = mem
        .regions()
        .find_region(GuestAddress(BASE))
        .unwrap()
        .file()
        .clone();
    let pin = f.pin(3 * PAGE, PAGE).unwrap();
    mem.set_busy_wait(Duration::ZERO);
    let e = mem.convert(BASE, 4 * PAGE, true).unwrap_err();
    assert_eq!(
        e,
        ConvertError::Busy {
            error_gpa: BASE + 3 * PAGE
        }
    );
    assert_eq!(e.errno(), gmem::Errno::EAGAIN);
    assert!(!mem.is_private(BASE));
    drop(pin);
    mem.convert(BASE, 4 * PAGE, true).unwrap();
}

fn two_regions_with_hole() -> GmemMemory {
    // [BASE, +4 pages) file A, hole of 2 pages (MMIO), [BASE + 6 pages, +4 pages) file B.
    let a = GmemRegion::new(file(4), 0, 4 * PAGE, GuestAddress(BASE)).unwrap();
    let b = GmemRegion::new(file(8), 4 * PAGE, 4 * PAGE, GuestAddress(BASE + 6 * PAGE)).unwrap();
    GmemMemory::new(vec![b, a]).unwrap()
}

#[test]
fn conversion_entry_point_splits_skips_holes_and_checks_alignment() {
    let mem = two_regions_with_hole();
    let rec = Arc::new(RecordingListener::new("rec"));
    mem.add_listener(rec.clone());
    // Across both regions and the hole.
    mem.convert(BASE + 2 * PAGE, 6 * PAGE, true).unwrap();
    let ev: Vec<(u64, u64, bool, usize, u64)> = rec
        .events()
        .iter()
        .map(|e| (e.gpa, e.len, e.to_private, e.region, e.file_offset))
        .collect();
    assert_eq!(
        ev,
        vec![
            (BASE + 2 * PAGE, 2 * PAGE, true, 0, 2 * PAGE),
            (BASE + 6 * PAGE, 2 * PAGE, true, 1, 4 * PAGE),
        ]
    );
    assert!(mem.is_private(BASE + 7 * PAGE) && !mem.is_private(BASE + 8 * PAGE));
    let fb = mem
        .regions()
        .find_region(GuestAddress(BASE + 6 * PAGE))
        .unwrap()
        .file()
        .clone();
    assert_ne!(
        fb.attributes(5 * PAGE).unwrap(),
        0,
        "file B converted at its own offset"
    );
    // Only pages that change are told: converting again tells nothing.
    mem.convert(BASE + 2 * PAGE, 6 * PAGE, true).unwrap();
    assert_eq!(rec.events().len(), 2);
    for (gpa, size, why) in [
        (BASE + 1, PAGE, "not page-aligned"),
        (BASE, PAGE + 1, "not page-aligned"),
        (BASE, 0, "empty"),
        (
            BASE + 4 * PAGE,
            2 * PAGE,
            "no guest memory region backs any of it",
        ),
        (u64::MAX - PAGE + 1, 2 * PAGE, "overflows"),
    ] {
        let e = mem.convert(gpa, size, true).unwrap_err();
        assert_eq!(e, ConvertError::Invalid { gpa, size, why });
        assert_eq!(e.errno(), gmem::Errno::EINVAL);
    }
}

#[test]
fn listeners_see_every_conversion_in_order_and_a_refusal_rolls_back() {
    let mem = two_regions_with_hole();
    let l1 = Arc::new(RecordingListener::new("first"));
    let l2 = Arc::new(RecordingListener::new("second"));
    mem.add_listener(l1.clone());
    mem.add_listener(l2.clone());
    let steps = [
        (BASE, PAGE, true),
        (BASE + PAGE, 2 * PAGE, true),
        (BASE, 2 * PAGE, false),
        (BASE + 6 * PAGE, 4 * PAGE, true),
        (BASE + 6 * PAGE, PAGE, false),
    ];
    for (g, s, p) in steps {
        mem.convert(g, s, p).unwrap();
    }
    let want = vec![
        (BASE, PAGE, true),
        (BASE + PAGE, 2 * PAGE, true),
        (BASE, 2 * PAGE, false),
        (BASE + 6 * PAGE, 4 * PAGE, true),
        (BASE + 6 * PAGE, PAGE, false),
    ];
    let seen = |l: &RecordingListener| -> Vec<(u64, u64, bool)> {
        l.events()
            .iter()
            .map(|e| (e.gpa, e.len, e.to_private))
            .collect()
    };
    assert_eq!(seen(&l1), want);
    assert_eq!(seen(&l2), want);

    // The second listener refuses a conversion to shared of the second region's piece: the
    // first region's piece is put back, every listener is told the reverse.
    let before1 = l1.events().len();
    l2.refuse_nth(false, 1);
    let e = mem.convert(BASE + 2 * PAGE, 7 * PAGE, false).unwrap_err();
    assert!(
        matches!(e, ConvertError::Listener { ref listener, .. } if listener == "second"),
        "{e}"
    );
    assert!(
        mem.is_private(BASE + 2 * PAGE),
        "first region's piece rolled back"
    );
    assert!(mem.is_private(BASE + 7 * PAGE));
    let f1: Vec<_> = seen(&l1)[before1..].to_vec();
    assert_eq!(
        f1,
        vec![
            (BASE + 2 * PAGE, PAGE, false),     // region A piece: to shared
            (BASE + 7 * PAGE, 2 * PAGE, false), // region B: told, then l2 refused
            (BASE + 7 * PAGE, 2 * PAGE, true),  // undone in reverse
            (BASE + 2 * PAGE, PAGE, true),      // rollback of region A's piece
        ]
    );
    let fa = mem
        .regions()
        .find_region(GuestAddress(BASE))
        .unwrap()
        .file()
        .clone();
    assert_ne!(
        fa.attributes(2 * PAGE).unwrap(),
        0,
        "the file is private again"
    );
    // A refusal to private leaves the pages shared and accessible.
    l1.refuse_next(true);
    assert!(
        mem.convert(BASE + 9 * PAGE, PAGE, true).is_ok(),
        "already private: nobody told"
    );
    assert!(matches!(
        mem.convert(BASE + 3 * PAGE, PAGE, true),
        Err(ConvertError::Listener { .. })
    ));
    assert!(!mem.is_private(BASE + 3 * PAGE));
    mem.read_obj::<u64>(GuestAddress(BASE + 3 * PAGE)).unwrap();
}

/// Device threads read and write a page while another thread converts it back and forth:
/// no SIGBUS (the process would die), no access succeeds on a page that was private for the
/// whole access, and conversions may fail with EAGAIN (in-flight accesses).
#[test]
fn conversions_race_with_device_accesses() {
    let mem = Arc::new(memory(4));
    mem.set_busy_wait(Duration::ZERO);
    let target = BASE + PAGE;
    // Odd while the page is private for sure: set after convert(private) returned, cleared
    // before convert(shared) starts.
    let epoch = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let run_for = Duration::from_millis(700);
    // Under load a side can be starved: keep going (up to 20 s) until both sides have done
    // enough for the race to mean something.
    let hard_limit = Duration::from_secs(20);
    let progress = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let (mut ok, mut refused, mut violations) = (0u64, 0u64, 0u64);
    let mut eagain = 0u64;
    let mut conversions = 0u64;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let mem = &mem;
                let epoch = &epoch;
                let stop = &stop;
                let progress = &progress;
                s.spawn(move || {
                    let (mut ok, mut refused, mut bad) = (0u64, 0u64, 0u64);
                    let mut buf = [0u8; 4096];
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let e1 = epoch.load(Ordering::SeqCst);
                        let r = match (w + i) % 3 {
                            0 => mem.read_slice(&mut buf, GuestAddress(target)).map(|_| ()),
                            1 => mem.write_slice(&buf, GuestAddress(target)).map(|_| ()),
                            _ => {
                                // A guard's slices, used after the iterator is gone.
                                let g = mem.access();
                                let v: Result<Vec<_>, _> = g
                                    .get_slices(GuestAddress(target - 8), 16, Permissions::Write)
                                    .unwrap()
                                    .collect();
                                v.map(|v| {
                                    for s in v {
                                        s.write_obj(i, 0).unwrap();
                                    }
                                })
                            }
                        };
                        let e2 = epoch.load(Ordering::SeqCst);
                        match r {
                            Ok(()) => {
                                ok += 1;
                                progress.0.fetch_add(1, Ordering::Relaxed);
                                if e1 == e2 && e1 % 2 == 1 {
                                    bad += 1;
                                }
                            }
                            Err(e) => {
                                assert_eq!(private_address(&e), Some(target), "{e}");
                                refused += 1;
                                progress.1.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    (ok, refused, bad)
                })
            })
            .collect();
        let t0 = Instant::now();
        let enough = |conversions: u64| {
            conversions > 10
                && progress.0.load(Ordering::Relaxed) > 10
                && progress.1.load(Ordering::Relaxed) > 0
        };
        while t0.elapsed() < run_for || (!enough(conversions) && t0.elapsed() < hard_limit) {
            match mem.convert(target, PAGE, true) {
                Ok(()) => {
                    epoch.fetch_add(1, Ordering::SeqCst);
                    std::thread::yield_now();
                    epoch.fetch_add(1, Ordering::SeqCst);
                    mem.convert(target, PAGE, false).unwrap();
                    conversions += 2;
                }
                Err(ConvertError::Busy { error_gpa }) => {
                    assert_eq!(error_gpa, target);
                    assert!(!mem.is_private(target), "EAGAIN changed nothing");
                    eagain += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
        stop.store(true, Ordering::SeqCst);
        for w in workers {
            let (o, r, b) = w.join().unwrap();
            ok += o;
            refused += r;
            violations += b;
        }
    });
    eprintln!(
        "race: {conversions} conversions, {eagain} EAGAIN, {ok} accesses succeeded, {refused} refused"
    );
    assert_eq!(violations, 0);
    assert!(
        conversions > 10 && ok > 10 && refused > 0,
        "the race was exercised"
    );
    let r = mem.regions().find_region(GuestAddress(BASE)).unwrap();
    assert_eq!(r.references_at(PAGE), 0, "every reference released");
    assert_eq!(r.references_at(0), 0);
}

#[test]
fn iommu_tracker_maps_only_shared_pages_and_vhost_table_follows() {
    let mem = memory(16);
    let f = mem
        .regions()
        .find_region(GuestAddress(BASE))
        .unwrap()
        .file()
        .clone();
    let iommu = Arc::new(IommuTracker::new(true));
    iommu.map_initial(BASE, 16 * PAGE, &f, 0).unwrap();
    let vhost = Arc::new(VhostUserTable::with_shared(&[(BASE, 16 * PAGE)]));
    mem.add_listener(iommu.clone());
    mem.add_listener(vhost.clone());
    // The tracker's DMA pins would block the conversion; it unmaps before the revocation.
    mem.set_busy_wait(Duration::ZERO);
    mem.convert(BASE + 4 * PAGE, 4 * PAGE, true).unwrap();
    assert_eq!(
        iommu.mapped(),
        vec![(BASE, 4 * PAGE), (BASE + 8 * PAGE, 8 * PAGE)]
    );
    assert_eq!(vhost.table(), iommu.mapped());
    mem.convert(BASE + 4 * PAGE, 2 * PAGE, false).unwrap();
    assert_eq!(
        iommu.mapped(),
        vec![(BASE, 6 * PAGE), (BASE + 8 * PAGE, 8 * PAGE)]
    );
    assert_eq!(vhost.table(), iommu.mapped());
    assert_eq!(
        vhost.messages(),
        vec![
            format!("REM_MEM_REG {:#x}+{:#x}", BASE + 4 * PAGE, 4 * PAGE),
            format!("ADD_MEM_REG {:#x}+{:#x}", BASE + 4 * PAGE, 2 * PAGE),
        ]
    );
    // The tracker's mappings are real pins: a conversion behind the memory's back fails.
    let mut a =
        gmem::uapi::kvm_memory_attributes2::new(0, PAGE, gmem::uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE);
    assert_eq!(f.set_attributes(&mut a), Err(gmem::Errno::EAGAIN));
    // A failing IOMMU map rolls the conversion to shared back.
    iommu.fail_next();
    assert!(matches!(
        mem.convert(BASE + 6 * PAGE, 2 * PAGE, false),
        Err(ConvertError::Listener { .. })
    ));
    assert!(mem.is_private(BASE + 6 * PAGE));
    assert!(!iommu.is_mapped(BASE + 6 * PAGE));
    assert_eq!(vhost.table(), iommu.mapped());
    assert!(mem.read_obj::<u8>(GuestAddress(BASE + 6 * PAGE)).is_err());
}
