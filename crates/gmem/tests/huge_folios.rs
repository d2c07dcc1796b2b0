//! Files of 2 MiB folios (`FolioSize::Huge`, shmem THP): each block allocated whole, the
//! folio order reported as the kernel's `max_order`, split and merge on partial conversion
//! with SIGBUS exact to 4 KiB, populate keeping a 2 MiB image whole, punch-hole splitting a
//! folio. Ignored, with the reason, where the host offers no shmem THP.
//!
//! As root, where `shmem_enabled` is `never`, this test switches it to `advise` for its own
//! run and puts it back when the run ends (and says so on standard error); with
//! `GMEM_THP_SWITCH=0` it leaves the host alone (the tests are then ignored with the reason).

use gmem::host::Feature;
use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{
    EmulatedGuestMemfd, EmulatedOptions, Errno, FolioSize, GuestMemfd, MapKind, Probe, Revocation,
    PAGE_SIZE,
};
use gmem_testkit::{needs, test, test_unless, Trial};

const PS: u64 = PAGE_SIZE;
const BLOCK: u64 = 512;
const SHARED: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

fn opts(revocation: Revocation) -> EmulatedOptions {
    EmulatedOptions {
        folio_size: FolioSize::Huge,
        ..EmulatedOptions::with_revocation(revocation)
    }
}

fn huge(blocks: u64, flags: u64, revocation: Revocation) -> EmulatedGuestMemfd {
    EmulatedGuestMemfd::create_with(blocks * BLOCK * PS, flags, opts(revocation)).unwrap()
}

fn byte(f: &EmulatedGuestMemfd, page: u64) -> u8 {
    let mut b = [0u8];
    f.guest_read(page * PS, &mut b).unwrap();
    b[0]
}

/// Each 2 MiB block is allocated whole at its first use, whoever uses it first — a safe
/// write, a host mapping's fault, fallocate, a guest access — and is one 2 MiB folio (order
/// 9); a block not used yet has no folio (order 0); a file of 4 KiB folios reports 0.
fn a_block_is_allocated_whole_by_any_first_use(rev: Revocation) {
    let f = huge(5, SHARED, rev);
    assert_eq!(f.folio_size(), FolioSize::Huge);
    assert_eq!(f.folio_order(3).unwrap(), 0, "nothing allocated yet");
    f.write_at(3 * PS, &[7; 16]).unwrap();
    for p in [0, 3, 511] {
        assert_eq!(f.folio_order(p).unwrap(), 9, "safe write: page {p}");
    }
    assert_eq!(
        f.folio_order(512).unwrap(),
        0,
        "the next block is untouched"
    );
    let m = f.mmap_all().unwrap();
    let mut b = [0u8; 1];
    m.read_volatile((BLOCK + 100) as usize * PS as usize, &mut b)
        .unwrap();
    assert_eq!(b[0], 0, "a new page reads zero");
    assert_eq!(f.folio_order(BLOCK + 7).unwrap(), 9, "host fault");
    f.fallocate(gmem::uapi::FALLOC_FL_KEEP_SIZE, 2 * BLOCK * PS, BLOCK * PS)
        .unwrap();
    assert_eq!(f.folio_order(2 * BLOCK).unwrap(), 9, "fallocate");
    f.guest_write(3 * BLOCK * PS + 5, &[1]).unwrap();
    assert_eq!(f.folio_order(3 * BLOCK).unwrap(), 9, "guest access");
    assert_eq!(
        f.folio_order(5 * BLOCK),
        Err(Errno::EINVAL),
        "past the file"
    );
    let small =
        EmulatedGuestMemfd::create_with(BLOCK * PS, SHARED, EmulatedOptions::default()).unwrap();
    small.write_at(0, &[1; 16]).unwrap();
    assert_eq!(small.folio_order(0).unwrap(), 0);
}

/// Split and merge: converting one 4 KiB page of a 2 MiB folio leaves the folio whole (the
/// same folio, nothing copied) but mixed, so `max_order` is 0 there and 9 in a block that
/// agrees; SIGBUS stays exact to the page in the host mapping; converting it back makes the
/// block agree again (`max_order` 9) and every byte is where it was; the guest view maps the
/// block with one PMD again after its next access.
fn a_partial_conversion_splits_and_the_way_back_merges(rev: Revocation) {
    let f = huge(2, SHARED, rev);
    let m = f.mmap_all().unwrap();
    for p in 0..2 * BLOCK {
        m.write_volatile((p * PS) as usize, &[(p % 251) as u8; 8])
            .unwrap();
    }
    assert_eq!(f.max_order(5).unwrap(), 9);
    for round in 0..3 {
        f.set_private(5 * PS, PS).unwrap();
        assert_eq!(
            f.folio_order(5).unwrap(),
            9,
            "round {round}: the folio stays whole"
        );
        assert_eq!(
            f.max_order(5).unwrap(),
            0,
            "round {round}: a mixed folio is 4 KiB"
        );
        assert_eq!(
            f.max_order(BLOCK + 5).unwrap(),
            9,
            "round {round}: the other block"
        );
        match m.probe_read(5 * PS as usize, 1).unwrap() {
            Probe::Fault(x) => assert!(x.is_sigbus() && x.addr == 5 * PS, "{x:?}"),
            Probe::Done(_) => panic!("round {round}: private page 5 read"),
        }
        for p in [4, 6, 511] {
            let mut b = [0u8];
            m.read_volatile((p * PS) as usize, &mut b).unwrap();
            assert_eq!(b[0], (p % 251) as u8, "round {round}: shared page {p}");
        }
        f.guest_write(5 * PS + 1, &[0xA5]).unwrap();
        f.set_shared(5 * PS, PS).unwrap();
        assert_eq!(f.max_order(5).unwrap(), 9, "round {round}: merged");
        let mut b = [0u8; 2];
        m.read_volatile((5 * PS) as usize, &mut b).unwrap();
        assert_eq!(b, [5, 0xA5], "round {round}: the content came through");
        // The guest's next access maps the block with one PMD.
        assert_eq!(byte(&f, 7), 7);
        let view = f.guest_view().unwrap();
        assert!(
            view.is_huge_mapped(0, (BLOCK * PS) as usize).unwrap(),
            "round {round}: the guest view maps the block huge again"
        );
    }
    for p in 0..2 * BLOCK {
        let mut b = [0u8];
        m.read_volatile((p * PS) as usize, &mut b).unwrap();
        assert_eq!(b[0], (p % 251) as u8, "page {p} at the end");
    }
}

/// Converting a whole block to private and back keeps it one folio (order 9 throughout, no
/// copy), and the host's view refuses every page of it while it is private.
fn a_whole_block_round_trip_keeps_the_folio(rev: Revocation) {
    let f = huge(1, SHARED, rev);
    let m = f.mmap_all().unwrap();
    m.write_volatile(0, &vec![0x3c; (BLOCK * PS) as usize])
        .unwrap();
    f.set_private(0, BLOCK * PS).unwrap();
    assert_eq!(f.max_order(0).unwrap(), 9);
    for p in [0, 1, 255, 511] {
        assert!(
            matches!(m.probe_read((p * PS) as usize, 1).unwrap(), Probe::Fault(x) if x.is_sigbus()),
            "private page {p} read"
        );
    }
    f.guest_write(100 * PS, &[0x77]).unwrap();
    f.set_shared(0, BLOCK * PS).unwrap();
    assert_eq!(f.folio_order(0).unwrap(), 9);
    let mut b = [0u8; 2];
    m.read_volatile((100 * PS) as usize, &mut b).unwrap();
    assert_eq!(b, [0x77, 0x3c]);
}

/// Populate (seed 000's in-place flow): a 2 MiB launch image written while shared, made
/// private and populated in place, stays one 2 MiB folio, with its content.
fn populate_keeps_a_2mib_image_whole(rev: Revocation) {
    let f = huge(1, SHARED, rev);
    let image: Vec<u8> = (0..BLOCK * PS).map(|i| (i % 253) as u8).collect();
    f.write_at(0, &image).unwrap();
    f.set_private(0, BLOCK * PS).unwrap();
    assert_eq!(f.populate(0, None, BLOCK, &|| false).unwrap(), BLOCK);
    assert_eq!(f.max_order(0).unwrap(), 9, "the image is one folio");
    let mut back = vec![0u8; image.len()];
    f.guest_read(0, &mut back).unwrap();
    assert!(back == image, "the image's content");
}

/// A punch of part of a block splits its folio (the kernel's shmem does): the block is 4 KiB
/// folios once refilled; punched whole and used again, it is one 2 MiB folio again. The
/// punched page reads zero.
fn a_punch_of_part_of_a_block_splits_its_folio(rev: Revocation) {
    let f = huge(1, SHARED, rev);
    f.write_at(0, &[9; 64]).unwrap();
    f.write_at(10 * PS, &[9; 64]).unwrap();
    assert_eq!(f.folio_order(0).unwrap(), 9);
    f.fallocate(
        gmem::uapi::FALLOC_FL_PUNCH_HOLE | gmem::uapi::FALLOC_FL_KEEP_SIZE,
        10 * PS,
        PS,
    )
    .unwrap();
    assert_eq!(f.folio_order(0).unwrap(), 0, "a page is missing");
    let mut b = [1u8; 8];
    f.read_at(10 * PS, &mut b).unwrap();
    assert_eq!(b, [0; 8], "the punched page reads zero");
    f.write_at(10 * PS, &[3; 8]).unwrap();
    assert_eq!(f.folio_order(0).unwrap(), 0, "split: 4 KiB folios");
    let mut b = [0u8; 1];
    f.read_at(0, &mut b).unwrap();
    assert_eq!(b[0], 9, "the rest of the block kept its content");
    f.fallocate(
        gmem::uapi::FALLOC_FL_PUNCH_HOLE | gmem::uapi::FALLOC_FL_KEEP_SIZE,
        0,
        BLOCK * PS,
    )
    .unwrap();
    f.write_at(0, &[4; 8]).unwrap();
    assert_eq!(
        f.folio_order(0).unwrap(),
        9,
        "punched whole, then whole again"
    );
}

/// Found in review: replacing a page of a 2 MiB folio (a page another process had mapped, or
/// any host-mapped page with `HostPages::Replace`) wrote zeros back: the punch of part of a
/// folio the replacement held could not split it and zeroed that part. A fork child maps the
/// pages, the owner makes one private: the guest reads the content; with Replace, the same
/// without a fork.
fn replacing_a_page_of_a_huge_folio_keeps_its_content(rev: Revocation) {
    for host_pages in [gmem::HostPages::Zap, gmem::HostPages::Replace] {
        let o = EmulatedOptions {
            host_pages,
            ..opts(rev)
        };
        let f = EmulatedGuestMemfd::create_with(BLOCK * PS, SHARED, o).unwrap();
        let m = f.mmap_all().unwrap();
        for p in 0..BLOCK {
            m.write_volatile((p * PS) as usize, &[p as u8; 8]).unwrap();
        }
        // SAFETY: fork(2); the child only exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: reaps the child made above.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        f.set_private(5 * PS, PS).unwrap();
        let mut b = [0u8; 8];
        f.guest_read(5 * PS, &mut b).unwrap();
        assert_eq!(b, [5; 8], "{host_pages:?}: page 5 after the conversion");
        f.set_shared(5 * PS, PS).unwrap();
        for p in [0u64, 4, 6, 300, 511] {
            m.read_volatile((p * PS) as usize, &mut b).unwrap();
            assert_eq!(b, [p as u8; 8], "{host_pages:?}: page {p} of the block");
        }
    }
}

/// A file of huge folios needs a size that is a multiple of 2 MiB (EINVAL), checked before
/// anything is asked of the host.
fn the_size_must_be_a_multiple_of_2mib() {
    for size in [PS, (BLOCK + 1) * PS, 3 * BLOCK * PS / 2] {
        assert_eq!(
            EmulatedGuestMemfd::create_with(size, SHARED, opts(Revocation::Auto)).err(),
            Some(Errno::EINVAL),
            "size {size:#x}"
        );
    }
}

/// The host mapping of a huge-folio file stays exact to 4 KiB in a mapping of part of the
/// file, at an offset inside a block.
fn a_mapping_inside_a_block_is_exact(rev: Revocation) {
    let f = huge(1, SHARED, rev);
    f.write_at(0, &vec![0x11; (BLOCK * PS) as usize]).unwrap();
    let m = f.mmap(3 * PS, (4 * PS) as usize, MapKind::Shared).unwrap();
    f.set_private(4 * PS, PS).unwrap();
    assert!(matches!(m.probe_read(PS as usize, 1).unwrap(), Probe::Fault(x) if x.is_sigbus()));
    let mut b = [0u8];
    m.read_volatile(0, &mut b).unwrap();
    assert_eq!(b[0], 0x11);
    m.read_volatile((2 * PS) as usize, &mut b).unwrap();
    assert_eq!(b[0], 0x11);
}

/// Huge folios need the guard: with Remap, creation is EOPNOTSUPP (a host fault on a page not
/// allocated yet would allocate 4 KiB, unseen).
fn remap_is_eopnotsupp() {
    let r = EmulatedGuestMemfd::create_with(BLOCK * PS, SHARED, opts(Revocation::Remap));
    assert_eq!(r.err(), Some(Errno::EOPNOTSUPP));
}

/// A test run under the guard: its name and function.
type Case = (&'static str, fn(Revocation));

fn main() {
    let switch = gmem_testkit::ThpSwitch::for_this_run("huge_folios");
    let why = needs(&[Feature::HugeFolios]);
    let mut trials: Vec<Trial> = vec![test(
        "the_size_must_be_a_multiple_of_2mib",
        the_size_must_be_a_multiple_of_2mib,
    )];
    let guard = needs(&[gmem::emulated::GUARD_NEEDS]);
    let per_rev: [Case; 7] = [
        (
            "replacing_a_page_of_a_huge_folio_keeps_its_content",
            replacing_a_page_of_a_huge_folio_keeps_its_content,
        ),
        (
            "a_block_is_allocated_whole_by_any_first_use",
            a_block_is_allocated_whole_by_any_first_use,
        ),
        (
            "a_partial_conversion_splits_and_the_way_back_merges",
            a_partial_conversion_splits_and_the_way_back_merges,
        ),
        (
            "a_whole_block_round_trip_keeps_the_folio",
            a_whole_block_round_trip_keeps_the_folio,
        ),
        (
            "populate_keeps_a_2mib_image_whole",
            populate_keeps_a_2mib_image_whole,
        ),
        (
            "a_punch_of_part_of_a_block_splits_its_folio",
            a_punch_of_part_of_a_block_splits_its_folio,
        ),
        (
            "a_mapping_inside_a_block_is_exact",
            a_mapping_inside_a_block_is_exact,
        ),
    ];
    let why = why.or(guard);
    for (name, f) in per_rev {
        trials.push(test_unless(name, why.clone(), move || f(Revocation::Guard)));
    }
    trials.push(test("remap_is_eopnotsupp", remap_is_eopnotsupp));
    gmem_testkit::run_then(trials, move || drop(switch))
}
