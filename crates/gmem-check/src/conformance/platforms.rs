//! Platform-model cases (docs/series.md §2.4–§2.9, §3; seeds 000, 001, 003): each platform's
//! hooks run where the spec says and change contents as its hardware would.
//!
//! The platform models exist on the emulated backend only ([`Need::PlatformModels`]). The
//! guest is played through the emulated file's guest path (each access a guest fault, where
//! make-private runs), whatever guest the context has: a vCPU's own accesses through a memslot
//! are not seen by the emulated backend.

use std::sync::{Arc, Mutex};

use super::{ensure, Case, CaseFailure, CaseResult, Ctx, GuestPort, InternalGuest, Need};
use gmem::emulated::{EmulatedGuestMemfd, EmulatedOptions};
use gmem::error::Errno;
use gmem::file::GuestMemfd;
use gmem::os::PAGE_SIZE;
use gmem::platform::{
    Direction, HookCall, HookPlacement, LaunchMeasurement, PageType, PlatformKind, PAGE,
};
use gmem::uapi::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
};

const PS: u64 = PAGE_SIZE;
const SHARED: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
const NEEDS: &[Need] = &[Need::PlatformModels];

pub(super) fn cases() -> Vec<Case> {
    const SPEC: &str = "docs/series.md §2.4-§2.9, §3; seeds 000, 001, 003";
    vec![
        Case {
            name: "pkvm_preserves_on_conversion_scrubs_on_punch",
            source: SPEC,
            needs: NEEDS,
            run: pkvm_preserves_on_conversion_scrubs_on_punch,
        },
        Case {
            name: "snp_never_writes_assigned_make_shared_only_to_shared",
            source: SPEC,
            needs: NEEDS,
            run: snp_never_writes_assigned_make_shared_only_to_shared,
        },
        Case {
            name: "tdx_zeroes_on_conversion_to_shared",
            source: SPEC,
            needs: NEEDS,
            run: tdx_zeroes_on_conversion_to_shared,
        },
        Case {
            name: "populate_in_place_and_copying",
            source: SPEC,
            needs: NEEDS,
            run: populate_in_place_and_copying,
        },
        Case {
            name: "no_direct_map_removal_and_restore",
            source: SPEC,
            needs: NEEDS,
            run: no_direct_map_removal_and_restore,
        },
    ]
}

/// A file of platform `p` with the split hooks (the cases below name them).
fn create(p: PlatformKind, npages: u64, flags: u64) -> Result<EmulatedGuestMemfd, CaseFailure> {
    let options = EmulatedOptions {
        hook_placement: HookPlacement::Split,
        ..EmulatedOptions::with_platform(p)
    };
    EmulatedGuestMemfd::create_with(npages * PS, flags, options)
        .map_err(CaseFailure::call(format!("create({npages} pages) on {p}")))
}

fn e<T>(what: &str, r: Result<T, impl std::fmt::Display>) -> Result<T, CaseFailure> {
    r.map_err(|err| format!("{what}: {err}").into())
}

fn guest_read(f: &EmulatedGuestMemfd, page: u64) -> Result<Vec<u8>, CaseFailure> {
    Ok(InternalGuest.read(f, page * PS, PAGE)?)
}

fn guest_write(f: &EmulatedGuestMemfd, page: u64, byte: u8) -> CaseResult {
    InternalGuest
        .write(f, page * PS, &[byte; PAGE])
        .map_err(CaseFailure::from)
}

fn host_read(f: &EmulatedGuestMemfd, page: u64) -> Result<Vec<u8>, CaseFailure> {
    let mut b = vec![0u8; PAGE];
    e("host read", f.read_at(page * PS, &mut b))?;
    Ok(b)
}

fn host_write(f: &EmulatedGuestMemfd, page: u64, byte: u8) -> CaseResult {
    e("host write", f.write_at(page * PS, &[byte; PAGE]))
}

fn take(log: &Arc<Mutex<Vec<HookCall>>>) -> Vec<HookCall> {
    std::mem::take(
        &mut *log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
}

fn rule(p: PlatformKind, dir: Direction, before: u8, after: &[u8]) -> CaseResult {
    p.content_rule(dir)
        .check(&vec![before; after.len()], after)
        .map_err(|err| format!("{p} {dir:?}: {err}").into())
}

/// pKVM: no hook on either conversion, content preserved in place both ways; punch-hole
/// reclaims and scrubs the page before it returns to the host (seed 001).
fn pkvm_preserves_on_conversion_scrubs_on_punch(_: &Ctx) -> CaseResult {
    let p = PlatformKind::Pkvm;
    let f = create(p, 2, SHARED)?;
    let log = f.record_hooks();
    host_write(&f, 0, 0x11)?;
    e("to private", f.set_private(0, 2 * PS))?;
    let got = guest_read(&f, 0)?;
    ensure(got == vec![0x11; PAGE], || {
        "pKVM to private: the guest does not read the host's bytes".into()
    })?;
    guest_write(&f, 0, 0x22)?;
    e("to shared", f.set_shared(0, 2 * PS))?;
    ensure(host_read(&f, 0)? == vec![0x22; PAGE], || {
        "pKVM to shared: the host does not read the guest's bytes".into()
    })?;
    let calls = take(&log);
    ensure(
        calls
            .iter()
            .all(|c| matches!(c, HookCall::Zero(_) | HookCall::DirectMapRemove(_))),
        || format!("pKVM conversions called hooks: {calls:?}"),
    )?;
    e("punch", f.punch_hole(0, PS))?;
    let calls = take(&log);
    ensure(calls == vec![HookCall::Reclaim(0)], || {
        format!("punch of page 0: calls {calls:?}, expected [Reclaim(0)]")
    })?;
    ensure(f.platform_report().scrubbed == 1, || {
        format!("scrubbed {}, expected 1", f.platform_report().scrubbed)
    })?;
    ensure(host_read(&f, 0)? == vec![0; PAGE], || {
        "punched page does not read zeros".into()
    })
}

/// SNP: make-shared runs on conversion to shared only (present pages), never on conversion
/// to private or punch; gmem never writes a guest-assigned page (no refused write over a
/// scenario that faults, converts, punches, populates and releases); runtime conversions
/// scramble both ways.
fn snp_never_writes_assigned_make_shared_only_to_shared(_: &Ctx) -> CaseResult {
    let p = PlatformKind::Snp;
    let f = create(p, 4, SHARED)?;
    let log = f.record_hooks();
    let no_make_shared = |what: &str, calls: &[HookCall]| {
        ensure(
            !calls.iter().any(|c| matches!(c, HookCall::MakeShared(_))),
            || format!("{what}: make-shared called: {calls:?}"),
        )
    };
    host_write(&f, 0, 0x11)?;
    host_write(&f, 1, 0x11)?;
    e("to private", f.set_private(0, 4 * PS))?;
    no_make_shared("to private", &take(&log))?;
    let got = guest_read(&f, 0)?;
    rule(p, Direction::ToPrivate, 0x11, &got)?;
    guest_write(&f, 0, 0x22)?;
    guest_write(&f, 2, 0x22)?;
    no_make_shared("guest faults", &take(&log))?;
    ensure(f.platform_report().guest_owned == 2, || {
        format!(
            "{} guest-assigned pages, expected 2",
            f.platform_report().guest_owned
        )
    })?;
    e("to shared", f.set_shared(0, 2 * PS))?;
    // Pages 0 (assigned) and 1 (present, never faulted by the guest): both get the hook, in
    // order; only page 0 changes state.
    let calls = take(&log);
    ensure(
        calls == vec![HookCall::MakeShared(0), HookCall::MakeShared(1)],
        || format!("to shared: calls {calls:?}"),
    )?;
    rule(p, Direction::ToShared, 0x22, &host_read(&f, 0)?)?;
    ensure(host_read(&f, 1)? == vec![0x11; PAGE], || {
        "a page the guest never faulted changed on to-shared".into()
    })?;
    e("punch", f.punch_hole(2 * PS, PS))?;
    no_make_shared("punch", &take(&log))?;
    // In-place populate of the punched page, then guest faults of it: no gmem write.
    let n = e("populate", f.populate(2 * PS, None, 1, &|| false))?;
    ensure(n == 1, || format!("populate did {n} pages"))?;
    guest_write(&f, 2, 0x33)?;
    guest_write(&f, 3, 0x33)?;
    no_make_shared("populate and faults", &take(&log))?;
    let r = f.platform_report();
    ensure(r.violations == 0, || {
        format!("{} gmem writes to guest-assigned pages", r.violations)
    })?;
    drop(f);
    let calls = take(&log);
    no_make_shared("release", &calls)?;
    ensure(
        calls.contains(&HookCall::Reclaim(2)) && calls.contains(&HookCall::Reclaim(3)),
        || format!("release: calls {calls:?}"),
    )
}

/// TDX: a guest fault adds the page to the Secure-EPT (accepted pages read zero); conversion
/// to shared removes it, and removal zeroes it. A page never added keeps its content.
fn tdx_zeroes_on_conversion_to_shared(_: &Ctx) -> CaseResult {
    let p = PlatformKind::Tdx;
    let f = create(p, 2, SHARED)?;
    host_write(&f, 0, 0x11)?;
    host_write(&f, 1, 0x11)?;
    e("to private", f.set_private(0, 2 * PS))?;
    rule(p, Direction::ToPrivate, 0x11, &guest_read(&f, 0)?)?;
    guest_write(&f, 0, 0x22)?;
    e("to shared", f.set_shared(0, 2 * PS))?;
    let got = host_read(&f, 0)?;
    ensure(got == vec![0; PAGE], || {
        "TDX to shared: the page removed from the Secure-EPT is not zeroed".into()
    })?;
    ensure(host_read(&f, 1)? == vec![0x11; PAGE], || {
        "TDX: a page never in the Secure-EPT changed".into()
    })?;
    ensure(f.platform_report().violations == 0, || {
        "gmem wrote a Secure-EPT page".into()
    })
}

/// Populate (§2.7, seed 000) on SNP and TDX: the in-place flow (INIT_SHARED, write while
/// shared, convert, populate with no source) and the copying flow give the same launch
/// measurement and the same guest-visible pages; a shared destination fails with EINVAL.
fn populate_in_place_and_copying(_: &Ctx) -> CaseResult {
    for p in [PlatformKind::Snp, PlatformKind::Tdx] {
        let image: Vec<u8> = (0..2 * PAGE).map(|i| (i * 7 % 253) as u8).collect();
        let a = create(p, 2, SHARED)?;
        e("write image", a.write_at(0, &image))?;
        let shared = a.populate(0, None, 1, &|| false);
        ensure(shared == Err(Errno::EINVAL), || {
            format!("{p}: populate of a shared page returned {shared:?}, expected EINVAL")
        })?;
        e("to private", a.set_private(0, 2 * PS))?;
        let mut ma = LaunchMeasurement::new();
        let gpa = 0x8000_0000;
        let na = e(
            "in-place populate",
            a.launch_populate(gpa, 0, None, 2, PageType::Normal, &mut ma, &|| false),
        )?;
        let b = create(p, 2, GUEST_MEMFD_FLAG_MMAP)?;
        let mut mb = LaunchMeasurement::new();
        let nb = e(
            "copying populate",
            b.launch_populate(gpa, 0, Some(&image), 2, PageType::Normal, &mut mb, &|| {
                false
            }),
        )?;
        ensure(na == 2 && nb == 2, || {
            format!("{p}: populated {na} and {nb} pages")
        })?;
        ensure(ma.digest() == mb.digest(), || {
            format!(
                "{p}: in-place measurement {} != copying {}",
                ma.hex(),
                mb.hex()
            )
        })?;
        for i in 0..2u64 {
            let want = &image[i as usize * PAGE..][..PAGE];
            ensure(
                guest_read(&a, i)? == want && guest_read(&b, i)? == want,
                || format!("{p}: page {i} does not hold the image after populate"),
            )?;
        }
        ensure(
            a.platform_report().violations == 0 && b.platform_report().violations == 0,
            || format!("{p}: gmem wrote a guest-owned page"),
        )?;
    }
    Ok(())
}

/// NO_DIRECT_MAP (§3, seed 003) on the platforms that offer it: a page is removed from the
/// direct map when handed out (guest fault, host accessor) and restored when freed; a failed
/// removal marks nothing and fails the hand-out; SNP and TDX refuse the flag.
fn no_direct_map_removal_and_restore(_: &Ctx) -> CaseResult {
    for p in PlatformKind::ALL {
        let flags = SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP;
        if !p.supports_no_direct_map() {
            let r = EmulatedGuestMemfd::create_with(PS, flags, EmulatedOptions::with_platform(p));
            ensure(r.as_ref().err() == Some(&Errno::EINVAL), || {
                format!("{p}: NO_DIRECT_MAP create returned {r:?}, expected EINVAL")
            })?;
            continue;
        }
        let f = create(p, 3, flags)?;
        guest_write(&f, 0, 0x44)?;
        host_write(&f, 1, 0x45)?;
        ensure(f.direct_map_removed(0) && f.direct_map_removed(1), || {
            format!("{p}: handed-out pages are still in the direct map")
        })?;
        ensure(!f.direct_map_removed(2), || {
            format!("{p}: a page never handed out was removed")
        })?;
        e("to private", f.set_private(0, 2 * PS))?;
        e("to shared", f.set_shared(0, 2 * PS))?;
        ensure(f.direct_map_removed(0) && f.direct_map_removed(1), || {
            format!("{p}: a conversion restored the direct map")
        })?;
        ensure(host_read(&f, 0)? == vec![0x44; PAGE], || {
            format!("{p}: content lost while removed from the direct map")
        })?;
        e("punch", f.punch_hole(0, PS))?;
        ensure(!f.direct_map_removed(0), || {
            format!("{p}: punch-hole did not restore the direct map")
        })?;
        f.inject_mapping_failure(0);
        let r = f.guest_fault(2 * PS, PS);
        ensure(r == Err(Errno::ENOMEM), || {
            format!("{p}: guest fault with a failing removal returned {r:?}")
        })?;
        ensure(!f.direct_map_removed(2), || {
            format!("{p}: a failed removal left the page marked")
        })?;
        e("guest fault", f.guest_fault(2 * PS, PS))?;
        ensure(f.direct_map_removed(2), || {
            format!("{p}: the retried guest fault did not remove the page")
        })?;
    }
    Ok(())
}
