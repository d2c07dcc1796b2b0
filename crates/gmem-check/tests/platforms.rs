//! Platform models on the emulated backend: hook call order per platform, content rules,
//! populate and launch measurements, NO_DIRECT_MAP.

use gmem::platform::{
    ContentRule, Direction, HookCall, HookPlacement, HookSite, LaunchMeasurement, PageType,
    PlatformKind,
};
use gmem::uapi::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
};
use gmem::{EmulatedGuestMemfd, EmulatedOptions, Errno, GuestMemfd, PAGE_SIZE};

const PS: u64 = PAGE_SIZE;
const PAGE: usize = PAGE_SIZE as usize;

fn file(p: PlatformKind, npages: u64, flags: u64) -> EmulatedGuestMemfd {
    EmulatedGuestMemfd::create_with(npages * PS, flags, EmulatedOptions::with_platform(p)).unwrap()
}

fn guest_write(f: &EmulatedGuestMemfd, page: u64, byte: u8) {
    gmem_check::conformance::GuestPort::write(
        &gmem_check::conformance::InternalGuest,
        f,
        page * PS,
        &[byte; PAGE],
    )
    .unwrap();
}

fn guest_read(f: &EmulatedGuestMemfd, page: u64) -> Vec<u8> {
    gmem_check::conformance::GuestPort::read(
        &gmem_check::conformance::InternalGuest,
        f,
        page * PS,
        PAGE,
    )
    .unwrap()
}

fn take(log: &std::sync::Mutex<Vec<HookCall>>) -> Vec<HookCall> {
    std::mem::take(&mut *log.lock().unwrap())
}

/// The scripted scenario of the call-order test, with the calls each step must make.
fn placed(p: PlatformKind, pl: HookPlacement, npages: u64, flags: u64) -> EmulatedGuestMemfd {
    let options = EmulatedOptions {
        hook_placement: pl,
        ..EmulatedOptions::with_platform(p)
    };
    EmulatedGuestMemfd::create_with(npages * PS, flags, options).unwrap()
}

/// The split (seed 001's outcome): make_private / make_shared / reclaim, scripted.
fn hook_call_order_per_platform() {
    use HookCall::*;
    for p in PlatformKind::ALL {
        let h = p.hooks();
        let mp = |i| {
            if h.make_private {
                vec![MakePrivate(i)]
            } else {
                vec![]
            }
        };
        let f = placed(p, HookPlacement::Split, 4, GUEST_MEMFD_FLAG_MMAP);
        let log = f.record_hooks();
        let step = |what: &str, want: Vec<HookCall>, log: &std::sync::Mutex<Vec<HookCall>>| {
            assert_eq!(take(log), want, "{p}: {what}");
        };
        // 1. Guest fault of a fresh private page: zeroed before the platform sees it.
        guest_write(&f, 0, 1);
        step("first private fault", [vec![Zero(0)], mp(0)].concat(), &log);
        // 2. Again: no zeroing, make-private again (idempotent).
        guest_write(&f, 0, 2);
        step("second private fault", mp(0), &log);
        // 3. To shared over a present and an absent page: make-shared on the present one only.
        f.set_shared(0, 2 * PS).unwrap();
        let ms = if h.make_shared {
            vec![MakeShared(0)]
        } else {
            vec![]
        };
        step("conversion to shared", ms, &log);
        // 4. Guest fault of a shared page: zeroed, never made private.
        let _ = guest_read(&f, 1);
        step("shared fault", vec![Zero(1)], &log);
        // 5. To private: no hook (preparation is lazy, on the next guest fault).
        f.set_private(0, 2 * PS).unwrap();
        step("conversion to private", vec![], &log);
        // 6. Punch-hole: reclaim each present page.
        f.punch_hole(0, 2 * PS).unwrap();
        let rc = if h.reclaim {
            vec![Reclaim(0), Reclaim(1)]
        } else {
            vec![]
        };
        step("punch-hole", rc, &log);
        assert!(!f.page_uptodate(0) && !f.page_uptodate(1));
        // 7. A punched private page is zeroed again at its next fault.
        guest_write(&f, 0, 3);
        step("fault after punch", [vec![Zero(0)], mp(0)].concat(), &log);
        // 8. Release reclaims what is left.
        drop(f);
        let rc = if h.reclaim { vec![Reclaim(0)] } else { vec![] };
        step("release", rc, &log);
    }
}

/// v8, the default placement: only SNP has guest_memfd hooks (prepare on a private fault, one
/// invalidate from both conversion to shared and free); TDX's S-EPT add and remove come from
/// the KVM MMU (the private fault; invalidation with the private filter on conversion to
/// shared, punch-hole and release, so a shared page is never zapped); SW and pKVM as in the
/// split. Content effects equal the split's.
fn hook_placement_v8_per_platform() {
    use HookCall::*;
    assert_eq!(EmulatedOptions::default().hook_placement, HookPlacement::V8);
    for p in PlatformKind::ALL {
        let f = file(p, 4, GUEST_MEMFD_FLAG_MMAP);
        assert_eq!(f.hook_placement(), HookPlacement::V8);
        let log = f.record_hooks();
        type Calls = Vec<fn(u64) -> HookCall>;
        let (fault, to_shared, free): (Calls, Calls, Calls) = match p {
            PlatformKind::Snp => (vec![Prepare], vec![Invalidate], vec![Invalidate]),
            PlatformKind::Tdx => (
                vec![MmuMapPrivate],
                vec![MmuZapPrivate],
                vec![MmuZapPrivate],
            ),
            PlatformKind::Pkvm => (vec![], vec![], vec![Reclaim]),
            PlatformKind::SoftwareProtected => (vec![], vec![], vec![]),
        };
        let at = |v: &Calls, i: u64| v.iter().map(|c| c(i)).collect::<Vec<_>>();
        // Private fault: zero, then prepare (SNP) or the MMU's S-EPT add (TDX).
        guest_write(&f, 0, 1);
        assert_eq!(take(&log), [vec![Zero(0)], at(&fault, 0)].concat(), "{p}");
        // To shared over a present and an absent page.
        f.set_shared(0, 2 * PS).unwrap();
        assert_eq!(take(&log), at(&to_shared, 0), "{p}: to shared");
        let _ = guest_read(&f, 1);
        assert_eq!(take(&log), vec![Zero(1)], "{p}: shared fault");
        // To shared again over the now shared, present pages 0 and 1: the request returns
        // early (nothing changes), no call anywhere. Over pages 1 (shared) and 2 (private,
        // present): TDX's private filter reaches page 2 only; SNP's hook runs on each present
        // page of the request.
        f.set_shared(0, 2 * PS).unwrap();
        assert_eq!(take(&log), vec![], "{p}: no-op to shared");
        guest_write(&f, 2, 2);
        let _ = take(&log);
        f.set_shared(PS, 2 * PS).unwrap();
        let want = match p {
            PlatformKind::Tdx => vec![MmuZapPrivate(2)],
            _ => [at(&to_shared, 1), at(&to_shared, 2)].concat(),
        };
        assert_eq!(take(&log), want, "{p}: to shared over shared and private");
        f.set_private(2 * PS, PS).unwrap();
        // Punch over a shared present page (1) and a private present page (2): TDX's MMU
        // zap with the private filter skips the shared page; SNP's free_folio invalidates
        // both.
        guest_write(&f, 2, 2);
        let _ = take(&log);
        f.punch_hole(PS, 2 * PS).unwrap();
        let want = match p {
            PlatformKind::Tdx => vec![MmuZapPrivate(2)],
            _ => [at(&free, 1), at(&free, 2)].concat(),
        };
        assert_eq!(take(&log), want, "{p}: punch-hole");
        // Release: page 0 (shared, present) and page 3 (private, faulted).
        guest_write(&f, 3, 3);
        let _ = take(&log);
        drop(f);
        let want = match p {
            PlatformKind::Tdx => vec![MmuZapPrivate(3)],
            _ => [at(&free, 0), at(&free, 3)].concat(),
        };
        assert_eq!(take(&log), want, "{p}: release");
    }
}

/// The same scenario on both placements leaves the same bytes (SNP: the same rule, its key
/// being per file) and the same platform state.
fn hook_placement_keeps_content_effects() {
    for p in PlatformKind::ALL {
        let mut seen = Vec::new();
        for pl in [HookPlacement::V8, HookPlacement::Split] {
            let f = placed(
                p,
                pl,
                3,
                GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            );
            host_write(&f, 0, 0x11);
            host_write(&f, 1, 0x11);
            f.set_private(0, 3 * PS).unwrap();
            let to_private = guest_read(&f, 0);
            guest_write(&f, 0, 0x22);
            guest_write(&f, 2, 0x33);
            f.set_shared(0, 2 * PS).unwrap();
            let to_shared = host_read(&f, 0);
            let untouched = host_read(&f, 1);
            f.punch_hole(2 * PS, PS).unwrap();
            let r = f.platform_report();
            p.content_rule(Direction::ToPrivate)
                .check(&[0x11; PAGE], &to_private)
                .unwrap_or_else(|e| panic!("{p} {pl:?} to private: {e}"));
            p.content_rule(Direction::ToShared)
                .check(&[0x22; PAGE], &to_shared)
                .unwrap_or_else(|e| panic!("{p} {pl:?} to shared: {e}"));
            assert_eq!(untouched, vec![0x11; PAGE], "{p} {pl:?}");
            let bytes = if p == PlatformKind::Snp {
                None
            } else {
                Some((to_private, to_shared))
            };
            seen.push((bytes, r));
        }
        assert_eq!(seen[0], seen[1], "{p}: v8 and split differ");
    }
    // The log names follow the placement; the call sites do not.
    assert_eq!(
        HookPlacement::Split.call(PlatformKind::Tdx, HookSite::Free, 7),
        HookCall::Reclaim(7)
    );
}

fn host_write(f: &EmulatedGuestMemfd, page: u64, byte: u8) {
    f.write_at(page * PS, &[byte; PAGE]).unwrap();
}

fn host_read(f: &EmulatedGuestMemfd, page: u64) -> Vec<u8> {
    let mut b = vec![0u8; PAGE];
    f.read_at(page * PS, &mut b).unwrap();
    b
}

fn content_rules_per_platform() {
    for p in PlatformKind::ALL {
        let f = file(p, 2, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
        host_write(&f, 0, 0x11);
        f.set_private(0, PS).unwrap();
        let got = guest_read(&f, 0);
        p.content_rule(Direction::ToPrivate)
            .check(&[0x11; PAGE], &got)
            .unwrap_or_else(|e| panic!("{p} to private: {e}"));
        guest_write(&f, 0, 0x22);
        f.set_shared(0, PS).unwrap();
        let got = host_read(&f, 0);
        p.content_rule(Direction::ToShared)
            .check(&[0x22; PAGE], &got)
            .unwrap_or_else(|e| panic!("{p} to shared: {e}"));
        // A conversion the guest never faulted in between changes nothing on any platform.
        host_write(&f, 1, 0x33);
        f.set_private(PS, PS).unwrap();
        f.set_shared(PS, PS).unwrap();
        assert_eq!(
            host_read(&f, 1),
            vec![0x33; PAGE],
            "{p}: untouched round trip"
        );
        assert_eq!(f.platform_report().violations, 0, "{p}");
    }
}

fn pkvm_scrubs_on_punch_and_release_sw_does_not() {
    let f = file(PlatformKind::Pkvm, 2, GUEST_MEMFD_FLAG_MMAP);
    guest_write(&f, 0, 0x55);
    guest_write(&f, 1, 0x55);
    f.punch_hole(0, PS).unwrap();
    assert_eq!(f.platform_report().scrubbed, 1);
    assert_eq!(guest_read(&f, 0), vec![0; PAGE]);
    assert_eq!(guest_read(&f, 1), vec![0x55; PAGE]);
    let sw = file(PlatformKind::SoftwareProtected, 1, GUEST_MEMFD_FLAG_MMAP);
    guest_write(&sw, 0, 1);
    sw.punch_hole(0, PS).unwrap();
    assert_eq!(sw.platform_report().scrubbed, 0);
}

fn snp_guards_gmem_writes_to_assigned_pages() {
    let f = file(PlatformKind::Snp, 2, GUEST_MEMFD_FLAG_MMAP);
    guest_write(&f, 0, 1);
    assert_eq!(f.platform_report().guest_owned, 1);
    // A populate copy over the assigned page is refused (and counted) before any write.
    let src = vec![9u8; PAGE];
    assert_eq!(f.populate(0, Some(&src), 1, &|| false), Err(Errno::EFAULT));
    assert_eq!(f.platform_report().violations, 1);
    assert_eq!(guest_read(&f, 0), vec![1; PAGE]);
}

/// kvm_gmem_populate clamps npages to the end of the memslot and GUPs the source page by page
/// (docs/series.md §2.7): a range past the end and a short source both give the pages done.
fn populate_clamps_and_gups_the_source_per_page() {
    for p in [PlatformKind::SoftwareProtected, PlatformKind::Tdx] {
        let f = file(p, 4, GUEST_MEMFD_FLAG_MMAP);
        // 3 pages asked from page 2 of 4: clamped to 2, both done.
        assert_eq!(f.populate(2 * PS, None, 3, &|| false), Ok(2), "{p}");
        // A source of 1.5 pages for 2 pages: page 0 is copied, page 1's GUP fails (EFAULT),
        // and the call returns 1 with page 1 untouched.
        let log = f.record_hooks();
        let mut src = vec![0x5au8; PAGE + PAGE / 2];
        src[PAGE..].fill(0x77);
        assert_eq!(f.populate(0, Some(&src), 2, &|| false), Ok(1), "{p}");
        let got = take(&log);
        let want = if p.hooks().post_populate {
            vec![HookCall::Zero(0), HookCall::PostPopulate(0)]
        } else {
            vec![HookCall::Zero(0)]
        };
        assert_eq!(got, want, "{p}");
        // A source that ends before the first page: EFAULT, nothing done.
        assert_eq!(
            f.populate(PS, Some(&src[..PAGE - 1]), 1, &|| false),
            Err(Errno::EFAULT),
            "{p}"
        );
        assert!(take(&log).is_empty(), "{p}");
        if p == PlatformKind::SoftwareProtected {
            assert_eq!(guest_read(&f, 0), vec![0x5a; PAGE]);
            assert_eq!(guest_read(&f, 1), vec![0; PAGE]);
        }
    }
}

/// The in-place flow (seed 000) and the copying flow give the same measurement.
fn launch_measurement_in_place_equals_copy() {
    for p in [PlatformKind::Snp, PlatformKind::Tdx] {
        let image: Vec<u8> = (0..3 * PAGE).map(|i| (i % 251) as u8).collect();
        // In place: INIT_SHARED, write while shared, convert, populate with no source.
        let a = file(p, 4, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
        a.write_at(PS, &image).unwrap();
        a.set_private(PS, 3 * PS).unwrap();
        let mut ma = LaunchMeasurement::new();
        let n = a
            .launch_populate(0x10_0000, PS, None, 3, PageType::Normal, &mut ma, &|| false)
            .unwrap();
        assert_eq!(n, 3);
        // Copying: private file, populate from a source buffer.
        let b = file(p, 4, GUEST_MEMFD_FLAG_MMAP);
        let mut mb = LaunchMeasurement::new();
        let n = b
            .launch_populate(
                0x10_0000,
                PS,
                Some(&image),
                3,
                PageType::Normal,
                &mut mb,
                &|| false,
            )
            .unwrap();
        assert_eq!(n, 3);
        assert_eq!(ma.digest(), mb.digest(), "{p}");
        assert_eq!(ma.pages(), 3);
        // The guest sees the image (populate does not scramble or zero).
        for i in 0..3u64 {
            let want = &image[i as usize * PAGE..][..PAGE];
            assert_eq!(guest_read(&a, 1 + i), want, "{p} in place page {i}");
            assert_eq!(guest_read(&b, 1 + i), want, "{p} copied page {i}");
        }
        assert_eq!(a.platform_report().violations, 0);
        assert_eq!(b.platform_report().violations, 0);
        // A different image measures differently.
        let c = file(p, 4, GUEST_MEMFD_FLAG_MMAP);
        let mut mc = LaunchMeasurement::new();
        let mut other = image.clone();
        other[5] ^= 1;
        c.launch_populate(
            0x10_0000,
            PS,
            Some(&other),
            3,
            PageType::Normal,
            &mut mc,
            &|| false,
        )
        .unwrap();
        assert_ne!(ma.digest(), mc.digest());
    }
}

fn populate_rules() {
    let f = file(
        PlatformKind::Snp,
        4,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    );
    // Shared destination: EINVAL, nothing done.
    assert_eq!(f.populate(0, None, 1, &|| false), Err(Errno::EINVAL));
    f.set_private(0, 2 * PS).unwrap();
    // Partial progress: page 2 is shared, so two pages are done.
    assert_eq!(f.populate(0, None, 3, &|| false), Ok(2));
    // Populating an already-assigned page: the firmware refuses.
    assert_eq!(f.populate(0, None, 1, &|| false), Err(Errno::EINVAL));
    // Cancellation before the first page: EINTR; after one page: the count.
    f.set_private(2 * PS, 2 * PS).unwrap();
    assert_eq!(f.populate(2 * PS, None, 2, &|| true), Err(Errno::EINTR));
    let calls = std::cell::Cell::new(0);
    let cancel = || {
        calls.set(calls.get() + 1);
        calls.get() > 1
    };
    assert_eq!(f.populate(2 * PS, None, 2, &cancel), Ok(1));
    // Bad arguments.
    assert_eq!(f.populate(0, None, 0, &|| false), Err(Errno::EINVAL));
    assert_eq!(f.populate(1, None, 1, &|| false), Err(Errno::EINVAL));
    assert_eq!(f.populate(4 * PS, None, 1, &|| false), Err(Errno::EINVAL));
    // A short source fails at its first page, before anything is done.
    assert_eq!(
        f.populate(3 * PS, Some(&[0u8; 10]), 1, &|| false),
        Err(Errno::EFAULT)
    );
    // The range is clamped to the end of the file (the memslot): the pages done.
    assert_eq!(f.populate(3 * PS, None, 2, &|| false), Ok(1));
    // A never-written page is zeroed before the platform sees it (no uninitialised load).
    let g = file(PlatformKind::Tdx, 1, GUEST_MEMFD_FLAG_MMAP);
    let log = g.record_hooks();
    assert_eq!(g.populate(0, None, 1, &|| false), Ok(1));
    assert_eq!(
        take(&log),
        vec![HookCall::Zero(0), HookCall::PostPopulate(0)]
    );
    // No launch flow on SW.
    let s = file(PlatformKind::SoftwareProtected, 1, GUEST_MEMFD_FLAG_MMAP);
    let mut m = LaunchMeasurement::new();
    assert_eq!(
        s.launch_populate(0, 0, None, 1, PageType::Normal, &mut m, &|| false),
        Err(Errno::ENOTTY)
    );
}

fn no_direct_map_flag_follows_the_platform() {
    use gmem::GuestMemfdBackend;
    for p in PlatformKind::ALL {
        let r = EmulatedGuestMemfd::create_with(
            PS,
            GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
            EmulatedOptions::with_platform(p),
        );
        let backend = gmem::EmulatedBackend::new(EmulatedOptions::with_platform(p));
        let advertised = backend.supported_flags() & GUEST_MEMFD_FLAG_NO_DIRECT_MAP != 0;
        assert_eq!(advertised, p.supports_no_direct_map(), "{p}");
        if p.supports_no_direct_map() {
            assert!(r.is_ok(), "{p}");
        } else {
            assert_eq!(r.err(), Some(Errno::EINVAL), "{p}");
        }
    }
}

fn no_direct_map_remove_at_hand_out_restore_on_free() {
    use HookCall::*;
    for p in [PlatformKind::SoftwareProtected, PlatformKind::Pkvm] {
        let flags =
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP;
        let f = file(p, 4, flags);
        let log = f.record_hooks();
        // fallocate does not remove.
        f.allocate(0, 4 * PS).unwrap();
        assert!(!f.direct_map_removed(0));
        // Host hand-out (safe accessor) removes; content is intact.
        host_write(&f, 0, 0x42);
        assert!(f.direct_map_removed(0));
        assert_eq!(host_read(&f, 0), vec![0x42; PAGE]);
        // Guest fault removes (after make-private, of which these platforms have none).
        guest_write(&f, 1, 0x43);
        assert!(f.direct_map_removed(1));
        assert_eq!(
            take(&log),
            // fallocate'd pages are not up to date: zeroed at first use, then removed.
            vec![Zero(0), DirectMapRemove(0), Zero(1), DirectMapRemove(1)],
            "{p}"
        );
        // GUP refuses NO_DIRECT_MAP memory.
        assert_eq!(f.pin(0, PS).err(), Some(Errno::EFAULT));
        // Conversions neither remove nor restore (§3.4).
        f.set_private(0, 2 * PS).unwrap();
        f.set_shared(0, 2 * PS).unwrap();
        assert!(take(&log).is_empty());
        assert!(f.direct_map_removed(0) && f.direct_map_removed(1));
        // Punch restores, before reclaim.
        f.punch_hole(0, PS).unwrap();
        let want = if p.hooks().reclaim {
            vec![DirectMapRestore(0), Reclaim(0)]
        } else {
            vec![DirectMapRestore(0)]
        };
        assert_eq!(take(&log), want, "{p}");
        assert!(!f.direct_map_removed(0));
        // A removed page is never written by gmem: populate over it is refused.
        f.set_private(PS, PS).unwrap();
        assert_eq!(
            f.populate(PS, Some(&[1u8; PAGE]), 1, &|| false),
            Err(Errno::EFAULT)
        );
        assert_eq!(guest_read(&f, 1), vec![0x43; PAGE]);
        let _ = take(&log);
        // Release restores what is left.
        drop(f);
        let got = take(&log);
        assert!(got.contains(&DirectMapRestore(1)), "{p}: {got:?}");
    }
}

fn no_direct_map_failed_removal_marks_nothing() {
    let flags =
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP;
    let f = file(PlatformKind::SoftwareProtected, 2, flags);
    // Guest fault.
    f.inject_mapping_failure(0);
    assert_eq!(f.guest_fault(0, PS), Err(Errno::ENOMEM));
    assert!(!f.direct_map_removed(0));
    f.guest_fault(0, PS).unwrap();
    assert!(f.direct_map_removed(0));
    // Host hand-out.
    f.inject_mapping_failure(0);
    let e = f.write_at(PS, &[7u8; 16]).unwrap_err();
    assert!(
        matches!(e, gmem::AccessError::DirectMap { offset, errno } if offset == PS && errno == Errno::ENOMEM),
        "{e}"
    );
    assert!(!f.direct_map_removed(1));
    assert_eq!(
        host_read(&f, 1),
        vec![0u8; PAGE],
        "the failed write did nothing"
    );
    assert!(f.direct_map_removed(1));
}

fn kernel_backend_passes_no_direct_map_through() {
    use gmem::GuestMemfdBackend;
    let k = gmem::KernelBackend::new().expect("a VM (the test needs guest_memfd)");
    let r = k.create(PS, GUEST_MEMFD_FLAG_NO_DIRECT_MAP);
    if k.supported_flags() & GUEST_MEMFD_FLAG_NO_DIRECT_MAP != 0 {
        assert!(r.is_ok());
    } else {
        assert_eq!(r.err(), Some(Errno::EINVAL), "the kernel's answer");
    }
}

fn content_rule_names() {
    assert_eq!(
        PlatformKind::Tdx.content_rule(Direction::ToShared),
        ContentRule::Zeroed
    );
}

/// `gmem run --platform X` as a library call: real vCPUs when /dev/kvm works, else
/// host-driven. Each platform passes its own content rules and fails another platform's.
fn workload_follows_each_platform() {
    use gmem_check::workload::{run, Config};
    let config = |platform, expect| Config {
        vcpus: 1,
        mem_mib: 4,
        samples: 4,
        platform,
        expect_rules_of: expect,
        ..Config::default()
    };
    for p in PlatformKind::ALL {
        let r = run(&config(p, None)).unwrap();
        assert_eq!(r.mismatches, 0, "{p}: {:?}", r.mismatch_details);
        assert!(r.content_checks >= 20, "{p}");
    }
    let r = run(&config(
        PlatformKind::Snp,
        Some(PlatformKind::SoftwareProtected),
    ))
    .unwrap();
    assert!(r.mismatches > 0, "SNP content checked with SW rules passed");
    // Platform models need the emulated backend.
    let k = Config {
        memory: gmem_vmm::backing::BackingKind::InPlace(gmem::BackendKind::Kernel),
        ..config(PlatformKind::Snp, None)
    };
    let e = run(&k).unwrap_err().to_string();
    assert!(e.contains("--platform snp"), "{e}");
}

fn main() {
    let mut trials = gmem_testkit::tests!(
        hook_call_order_per_platform,
        hook_placement_v8_per_platform,
        hook_placement_keeps_content_effects,
        content_rules_per_platform,
        pkvm_scrubs_on_punch_and_release_sw_does_not,
        snp_guards_gmem_writes_to_assigned_pages,
        populate_clamps_and_gups_the_source_per_page,
        launch_measurement_in_place_equals_copy,
        populate_rules,
        no_direct_map_flag_follows_the_platform,
        no_direct_map_remove_at_hand_out_restore_on_free,
        no_direct_map_failed_removal_marks_nothing,
        content_rule_names,
        workload_follows_each_platform,
    );
    trials.extend(
        gmem_testkit::tests_needing!([gmem_testkit::Feature::GuestMemfd];
            kernel_backend_passes_no_direct_map_through,
        ),
    );
    gmem_testkit::run(trials)
}
