//! Huge-folio cases (issue 22; the work after the in-place series: THP and hugetlb
//! guest_memfd, which split a folio when part of it is converted and merge it back when the
//! whole folio agrees again): split, merge, populate and punch-hole on 2 MiB folios.
//!
//! An option of the emulated file ([`FolioSize::Huge`], shmem THP), so the cases run on the
//! emulated backend where the host offers shmem THP, and are skipped with the reason
//! elsewhere ([`Need::HugeFolios`]). `max_order` is `kvm_gmem_get_pfn`'s: 9 for a 2 MiB folio
//! whose pages agree, 0 for a mixed or split one.

use super::{ensure, Case, CaseFailure, CaseResult, Ctx, Need};
use gmem::emulated::{EmulatedGuestMemfd, EmulatedOptions};
use gmem::error::Errno;
use gmem::file::GuestMemfd;
use gmem::mapping::Probe;
use gmem::os::PAGE_SIZE;
use gmem::uapi::{
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
};
use gmem::FolioSize;

const PS: u64 = PAGE_SIZE;
const BLOCK: u64 = 512;
const SHARED: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
const NEEDS: &[Need] = &[Need::HugeFolios];
const SOURCE: &str = "issue 22: THP/hugetlb guest_memfd split and merge on conversion";

pub(super) fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "huge_folio_split_keeps_sigbus_exact",
            source: SOURCE,
            needs: NEEDS,
            run: split_keeps_sigbus_exact,
        },
        Case {
            name: "huge_folio_merges_when_whole_again",
            source: SOURCE,
            needs: NEEDS,
            run: merges_when_whole_again,
        },
        Case {
            name: "huge_folio_populate_keeps_the_image_whole",
            source: SOURCE,
            needs: NEEDS,
            run: populate_keeps_the_image_whole,
        },
        Case {
            name: "huge_folio_punch_hole_splits",
            source: SOURCE,
            needs: NEEDS,
            run: punch_hole_splits,
        },
    ]
}

/// A file of `blocks` 2 MiB blocks of huge folios, every page written `page % 251`.
fn create(blocks: u64) -> Result<EmulatedGuestMemfd, CaseFailure> {
    let options = EmulatedOptions {
        folio_size: FolioSize::Huge,
        ..EmulatedOptions::default()
    };
    let f = match EmulatedGuestMemfd::create_with(blocks * BLOCK * PS, SHARED, options) {
        Ok(f) => f,
        // No guard here (no userfaultfd): huge folios need it.
        Err(Errno::EOPNOTSUPP) => {
            return Err(CaseFailure::Unsupported(
                "huge folios need the guard, which this host cannot run".to_string(),
            ))
        }
        Err(e) => return Err(CaseFailure::call("create (huge folios)")(e)),
    };
    let image: Vec<u8> = (0..blocks * BLOCK)
        .flat_map(|p| std::iter::repeat_n((p % 251) as u8, PS as usize))
        .collect();
    f.write_at(0, &image)
        .map_err(|e| format!("write_at: {e}"))?;
    Ok(f)
}

fn order(f: &EmulatedGuestMemfd, page: u64) -> Result<u8, CaseFailure> {
    f.max_order(page)
        .map_err(CaseFailure::call(format!("max_order({page})")))
}

/// Converting one page of a 2 MiB folio splits its mapping unit: `max_order` 0 there, 9 in
/// the other block; the host's SIGBUS is exact to that page; its neighbours keep their
/// content; the folio itself stays one folio.
fn split_keeps_sigbus_exact(_: &Ctx) -> CaseResult {
    let f = create(2)?;
    let m = f.mmap_all().map_err(CaseFailure::call("mmap"))?;
    ensure(order(&f, 5)? == 9, || {
        "a whole block reports order 9".to_string()
    })?;
    f.set_private(5 * PS, PS)
        .map_err(|e| format!("set_private: {e}"))?;
    ensure(order(&f, 5)? == 0, || {
        "a mixed folio reports order 0".to_string()
    })?;
    ensure(order(&f, BLOCK)? == 9, || {
        "the other block still reports 9".to_string()
    })?;
    let folio = f.folio_order(5).map_err(CaseFailure::call("folio_order"))?;
    ensure(folio == 9, || {
        format!("the folio stays whole (order {folio})")
    })?;
    match m
        .probe_read((5 * PS) as usize, 1)
        .map_err(CaseFailure::SigbusProbe)?
    {
        Probe::Fault(x) if x.is_sigbus() && x.addr == 5 * PS => {}
        other => return Err(format!("private page 5: {other:?}").into()),
    }
    for p in [4u64, 6] {
        let mut b = [0u8];
        m.read_volatile((p * PS) as usize, &mut b)
            .map_err(CaseFailure::call("read"))?;
        ensure(b[0] == (p % 251) as u8, || {
            format!("page {p} kept its content")
        })?;
    }
    Ok(())
}

/// Converting the page back makes the block agree again: `max_order` 9 (merge), the guest's
/// write to the page while private comes through, nothing was copied (the same folio).
fn merges_when_whole_again(_: &Ctx) -> CaseResult {
    let f = create(1)?;
    let m = f.mmap_all().map_err(CaseFailure::call("mmap"))?;
    f.set_private(7 * PS, PS)
        .map_err(|e| format!("set_private: {e}"))?;
    f.guest_write(7 * PS + 1, &[0xA7])
        .map_err(CaseFailure::call("guest_write"))?;
    f.set_shared(7 * PS, PS)
        .map_err(|e| format!("set_shared: {e}"))?;
    ensure(order(&f, 7)? == 9, || "whole again: order 9".to_string())?;
    let mut b = [0u8; 2];
    m.read_volatile((7 * PS) as usize, &mut b)
        .map_err(CaseFailure::call("read"))?;
    ensure(b == [7, 0xA7], || {
        format!("the page's content after the round trip: {b:?}")
    })?;
    Ok(())
}

/// seed 000's flow on a 2 MiB image: written shared, made private, populated in place: one
/// 2 MiB folio, its content intact.
fn populate_keeps_the_image_whole(_: &Ctx) -> CaseResult {
    let f = create(1)?;
    f.set_private(0, BLOCK * PS)
        .map_err(|e| format!("set_private: {e}"))?;
    let done = f
        .populate(0, None, BLOCK, &|| false)
        .map_err(CaseFailure::call("populate"))?;
    ensure(done == BLOCK, || {
        format!("populated {done} of {BLOCK} pages")
    })?;
    ensure(order(&f, 0)? == 9, || {
        "the populated image is one 2 MiB folio".to_string()
    })?;
    let mut b = [0u8];
    f.guest_read(300 * PS, &mut b)
        .map_err(CaseFailure::call("guest_read"))?;
    ensure(b[0] == (300 % 251) as u8, || {
        "the image's content".to_string()
    })?;
    Ok(())
}

/// A punch of one page of a 2 MiB folio splits it (shmem's truncation does): the page reads
/// zero, the rest keeps its content, and the refilled block is 4 KiB folios (order 0).
fn punch_hole_splits(_: &Ctx) -> CaseResult {
    let f = create(1)?;
    f.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 9 * PS, PS)
        .map_err(CaseFailure::call("punch page 9"))?;
    let mut b = [1u8];
    f.read_at(9 * PS, &mut b)
        .map_err(|e| format!("read_at: {e}"))?;
    ensure(b[0] == 0, || "the punched page reads zero".to_string())?;
    f.write_at(9 * PS, &[9])
        .map_err(|e| format!("write_at: {e}"))?;
    ensure(order(&f, 0)? == 0, || {
        "a punched folio is split: order 0".to_string()
    })?;
    f.read_at(10 * PS, &mut b)
        .map_err(|e| format!("read_at: {e}"))?;
    ensure(b[0] == 10, || "page 10 kept its content".to_string())?;
    Ok(())
}
