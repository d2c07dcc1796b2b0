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

mod common;
use common::faults_in_child;

const PS: u64 = PAGE_SIZE;

/// Held by each case of this binary while it runs ([`main`]).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
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

/// Whether the VMA holding `addr` is a released block (`/proc/self/smaps`: not inherited
/// by children, `dc`; registered for write-protect alone, `uw` without `ui` or `um`): its
/// faults are the kernel's, which maps a huge folio there with one PMD when it can.
fn released_at(addr: usize) -> bool {
    let f = vm_flags_at(addr);
    f.iter().any(|f| f == "dc")
        && f.iter().any(|f| f == "uw")
        && !f.iter().any(|f| f == "ui" || f == "um")
}

/// The `VmFlags` of this process's VMA holding `addr` (`/proc/self/smaps`; empty if none).
fn vm_flags_at(addr: usize) -> Vec<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let head = line.split(' ').next().unwrap_or("");
        if let Some((s, e)) = head.split_once('-') {
            if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) {
                inside = s <= addr && addr < e;
                continue;
            }
        }
        if inside {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.split_whitespace().map(str::to_string).collect();
            }
        }
    }
    Vec::new()
}

/// Waits (at most 2 s) until the block at `addr` is released: the guard releases it while
/// the faulting thread, woken by the release's unregistration, may already run on.
fn wait_released(addr: usize) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(2) {
        if released_at(addr) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    false
}

/// Whether page `p` of `m` refuses a read and a write (SIGBUS at that page).
fn refused(m: &gmem::HostMapping, p: u64) -> bool {
    let r = matches!(m.probe_read((p * PS) as usize, 1).unwrap(),
        Probe::Fault(x) if x.is_sigbus() && x.addr == p * PS);
    let w = matches!(m.probe_write((p * PS) as usize, 1, 0xEE).unwrap(),
        Probe::Fault(x) if x.is_sigbus() && x.addr == p * PS);
    r && w
}

fn read_page(m: &gmem::HostMapping, p: u64) -> u8 {
    let mut b = [0u8];
    m.read_volatile((p * PS) as usize, &mut b).unwrap();
    b[0]
}

/// Issue 22: a wholly shared block of a host mapping is released to the kernel's faults,
/// which map its folio with one PMD; a conversion to private of one page of it guards it again first, so the page refuses the
/// host (SIGBUS exact to the page, read and write), its neighbours stay readable, and the
/// guest's content is kept; shared again, the block is released again at the host's next
/// fault in it.
fn a_wholly_shared_block_is_mapped_huge_on_the_host(rev: Revocation) {
    let f = huge(2, SHARED, rev);
    let m = f.mmap_all().unwrap();
    let block = (BLOCK * PS) as usize;
    assert_eq!(
        m.as_ptr() as usize % block,
        0,
        "a huge file's mapping is 2 MiB-aligned"
    );
    for p in 0..2 * BLOCK {
        m.write_volatile((p * PS) as usize, &[p as u8; 8]).unwrap();
    }
    let at = m.as_ptr() as usize;
    assert!(
        wait_released(at) && wait_released(at + block),
        "both blocks released"
    );
    for p in (0..2 * BLOCK).step_by(64) {
        assert_eq!(read_page(&m, p), p as u8, "page {p}");
    }
    assert!(
        m.mmap().is_huge_mapped(0, 2 * block).unwrap(),
        "each block: one PMD"
    );
    f.set_private(5 * PS, PS).unwrap();
    assert!(refused(&m, 5), "page 5, made private");
    assert_eq!(byte(&f, 5), 5, "the guest's content");
    for p in [4u64, 6, 511, 512, 700] {
        assert_eq!(read_page(&m, p), p as u8, "page {p}");
    }
    assert!(!released_at(at), "a mixed block is guarded");
    assert!(
        !m.mmap().is_huge_mapped(0, block).unwrap(),
        "a mixed block: 4 KiB"
    );
    f.set_shared(5 * PS, PS).unwrap();
    assert_eq!(read_page(&m, 5), 5, "page 5, shared again");
    // Whole again: released at the host's next fault in the block (the entries mapped at
    // 4 KiB meanwhile stay until something zaps them, as a host's balloon or reclaim does).
    m.mmap().madvise(0, block, libc::MADV_DONTNEED).unwrap();
    assert_eq!(read_page(&m, 300), 300u64 as u8);
    assert!(wait_released(at), "whole again: released");
    assert_eq!(read_page(&m, 301), 301u64 as u8);
    assert!(
        m.mmap().is_huge_mapped(0, block).unwrap(),
        "whole again: one PMD"
    );
    // The whole block private and back: the same.
    f.set_private(0, BLOCK * PS).unwrap();
    assert!(refused(&m, 0) && refused(&m, 511), "the block, private");
    assert_eq!(read_page(&m, 512), 0, "page 512 (written 512 as u8)");
    f.set_shared(0, BLOCK * PS).unwrap();
    assert_eq!(read_page(&m, 9), 9);
    assert!(wait_released(at), "shared again: released");
    assert_eq!(read_page(&m, 10), 10);
    assert!(
        m.mmap().is_huge_mapped(0, block).unwrap(),
        "shared again: one PMD"
    );
}

/// The host's working set at 2 MiB: a conversion back to shared releases at once the first
/// block of the run that the host had mapped huge when the run was made private (its next
/// touch is the kernel's PMD fault, no guard fault), and only that one: the others are
/// released at their first guard fault, and a block the host had not mapped is not released.
/// Made private again, each refuses the host at once, exact to the page.
fn a_block_mapped_huge_is_released_at_the_conversion_back(rev: Revocation) {
    let f = huge(3, SHARED, rev);
    let m = f.mmap_all().unwrap();
    let block = (BLOCK * PS) as usize;
    let at = m.as_ptr() as usize;
    // Blocks 1 and 2 mapped huge by the host; block 0 not touched.
    for p in BLOCK..3 * BLOCK {
        m.write_volatile((p * PS) as usize, &[(p % 251) as u8; 8])
            .unwrap();
    }
    assert!(wait_released(at + block) && wait_released(at + 2 * block));
    assert!(!released_at(at), "block 0, never touched");
    f.set_private(0, 3 * BLOCK * PS).unwrap();
    assert!(
        !released_at(at + block) && !released_at(at + 2 * block),
        "private: guarded"
    );
    assert!(refused(&m, BLOCK + 3) && refused(&m, 2 * BLOCK + 7));
    f.set_shared(0, 3 * BLOCK * PS).unwrap();
    assert!(
        released_at(at + block),
        "the run's first block the host had mapped huge: released by the conversion"
    );
    assert!(
        !released_at(at + 2 * block),
        "the run's second one: not yet"
    );
    assert!(!released_at(at), "block 0: the host had not mapped it");
    assert_eq!(read_page(&m, BLOCK + 9), ((BLOCK + 9) % 251) as u8);
    assert!(
        m.mmap().is_huge_mapped(block, block).unwrap(),
        "block 1: one PMD, from the kernel's fault"
    );
    assert_eq!(read_page(&m, 2 * BLOCK + 9), ((2 * BLOCK + 9) % 251) as u8);
    assert!(wait_released(at + 2 * block), "block 2: at its guard fault");
    // Private again, one page of the block released by the conversion: guarded first.
    f.set_private((BLOCK + 5) * PS, PS).unwrap();
    assert!(
        refused(&m, BLOCK + 5),
        "made private after an eager release"
    );
    assert_eq!(
        byte(&f, BLOCK + 5),
        ((BLOCK + 5) % 251) as u8,
        "the guest's content"
    );
    assert_eq!(read_page(&m, BLOCK + 6), ((BLOCK + 6) % 251) as u8);
}

/// gmem's own views of a file (the guest view here) map it as a host mapping does, same
/// inode and offsets, but are never taken for one: after a fork, whose event makes the
/// guard's record what the kernel's maps say, a conversion of a file that released a block
/// registers its host mappings over the run (the fail-closed step), and registered the guest
/// view too — gmem's own access to the private page through it then raised SIGBUS and killed
/// the process (found by the stress test of huge folios, two files converting at once).
fn gmem_views_are_never_taken_for_host_mappings(rev: Revocation) {
    let f = huge(1, SHARED, rev);
    let m = f.mmap_all().unwrap();
    let at = m.as_ptr() as usize;
    for p in 0..BLOCK {
        m.write_volatile((p * PS) as usize, &[p as u8; 8]).unwrap();
    }
    assert!(wait_released(at), "the block released");
    let view = f.guest_view().unwrap().as_ptr() as usize;
    // A fork (the child exits at once): its event rebuilds the record from the kernel's maps.
    // SAFETY: the child calls only _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(0) };
    }
    assert!(pid > 0);
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    f.set_private(5 * PS, PS).unwrap();
    let flags = vm_flags_at(view + (5 * PS) as usize);
    assert!(
        !flags.iter().any(|f| f.starts_with('u')),
        "the guest view is registered with a userfaultfd: {flags:?}"
    );
    assert_eq!(byte(&f, 5), 5, "the guest reads its private page");
    assert!(refused(&m, 5), "the host does not");
}

/// A mapping with a released block is resized (and possibly moved) by `HostMapping::mremap`:
/// the block is guarded again first, so the mapping is one VMA again (`mremap` refuses a range
/// of several: EFAULT), and the guard follows it: a page made private afterwards refuses the
/// host at the mapping's new address, and the part past the file's end raises SIGBUS.
fn a_mapping_with_a_released_block_moves(rev: Revocation) {
    let f = huge(2, SHARED, rev);
    let mut m = f.mmap_all().unwrap();
    let block = (BLOCK * PS) as usize;
    for p in 0..BLOCK {
        m.write_volatile((p * PS) as usize, &[p as u8; 8]).unwrap();
    }
    assert!(wait_released(m.as_ptr() as usize), "block 0 released");
    m.mremap(3 * block, true, None).unwrap();
    f.set_private(7 * PS, PS).unwrap();
    assert!(refused(&m, 7), "page 7 after the move");
    assert_eq!(read_page(&m, 8), 8);
    assert_eq!(byte(&f, 7), 7);
    assert!(refused(&m, 2 * BLOCK), "past the file's end");
}

/// A released block moved by a raw `mremap` (not through the library) is guarded again at
/// its new address when its event is handled: a page made private afterwards refuses a fork
/// child there (which inherits the block again), and a shared one reads. Without that, the
/// moved block would be the kernel's, unseen, and read the private page.
fn a_raw_mremap_of_a_released_block_is_guarded(rev: Revocation) {
    let f = huge(1, SHARED, rev);
    let m = f.mmap_all().unwrap();
    let block = (BLOCK * PS) as usize;
    for p in 0..BLOCK {
        m.write_volatile((p * PS) as usize, &[p as u8; 8]).unwrap();
    }
    assert!(wait_released(m.as_ptr() as usize), "released");
    let old = m.as_ptr();
    let (room, room_len, target) = reserve(block);
    // SAFETY: moves the live mapping `m` (one VMA: the whole mapping is the released block)
    // into the reservation made above, 2 MiB-aligned; `m` is not used at its old address
    // afterwards, where this test puts memory of its own at once.
    let new = unsafe {
        libc::mremap(
            old.cast(),
            block,
            block,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            target as *mut libc::c_void,
        )
    };
    assert_eq!(new as usize, target, "moved");
    let new = new.cast::<u8>();
    let mine = anon_at(old.cast(), block);
    f.set_private(7 * PS, PS).unwrap();
    // SAFETY: page 7 of the moved mapping.
    let at = |p: u64| unsafe { new.add((p * PS) as usize) };
    assert!(
        faults_in_child(at(7), false) && faults_in_child(at(7), true),
        "page 7, moved"
    );
    assert!(!faults_in_child(at(8), false), "page 8, shared");
    // SAFETY: page 8 of the moved mapping, shared.
    assert_eq!(unsafe { std::ptr::read_volatile(at(8)) }, 8);
    assert_eq!(byte(&f, 7), 7);
    // SAFETY: the reservation goes with the moved mapping in it; the memory put at the old
    // address goes too (if it was made), and `m`, which no longer owns its range, is
    // forgotten.
    unsafe {
        libc::munmap(room, room_len);
        if mine != libc::MAP_FAILED {
            libc::munmap(mine, block);
        }
    }
    std::mem::forget(m);
}

/// A fork child inherits a released block guarded (the fork's prepare handler registers it
/// again): it reads the shared pages, and a page made private after the fork — one it had
/// read, and one it had not — refuses it (SIGBUS), as it refuses the parent; without the
/// re-registration the child would have nothing there (SIGSEGV), or the page unguarded.
fn a_fork_child_inherits_a_released_block_guarded(rev: Revocation) {
    for split in [false, true] {
        fork_child_of_a_released_block(rev, split);
    }
}

/// A fork child reads the byte at `addr` (reported back), waits while this process runs
/// `between`, and reads it again (a fault kills it): returns the first byte and the child's
/// wait status.
fn read_in_child_around(addr: *mut u8, between: impl FnOnce()) -> (u8, libc::c_int) {
    let (mut to_child, mut from_child) = ([0; 2], [0; 2]);
    // SAFETY: two pipes, their descriptors written into the arrays.
    unsafe {
        assert_eq!(libc::pipe(to_child.as_mut_ptr()), 0);
        assert_eq!(libc::pipe(from_child.as_mut_ptr()), 0);
    }
    // SAFETY: fork(2); the child reads `addr`, says what it read, waits for the parent,
    // reads `addr` again (a fault kills it) and leaves with _exit: system calls and volatile
    // reads only.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            let first = std::ptr::read_volatile(addr);
            libc::write(from_child[1], [first].as_ptr().cast(), 1);
            let mut b = [0u8];
            libc::read(to_child[0], b.as_mut_ptr().cast(), 1);
            std::ptr::read_volatile(addr);
            libc::_exit(0);
        }
    }
    let mut b = [0u8];
    // SAFETY: reads one byte from the child's pipe into `b`.
    let n = unsafe { libc::read(from_child[0], b.as_mut_ptr().cast(), 1) };
    assert_eq!(n, 1);
    between();
    // SAFETY: tells the child to read again; reaps it; closes the pipes made above.
    let status = unsafe {
        libc::write(to_child[1], [1u8].as_ptr().cast(), 1);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        for fd in to_child.into_iter().chain(from_child) {
            libc::close(fd);
        }
        status
    };
    (b[0], status)
}

/// One run of [`a_fork_child_inherits_a_released_block_guarded`]; `split`: part of the
/// block was punched first, so its folio is 4 KiB pages and the kernel maps the block with
/// 4 KiB entries, which the fork copies into the child (a child that got them so, not
/// through its own faults, must lose them at the conversion all the same).
fn fork_child_of_a_released_block(rev: Revocation, split: bool) {
    let f = huge(1, SHARED, rev);
    let m = f.mmap_all().unwrap();
    for p in 0..BLOCK {
        m.write_volatile((p * PS) as usize, &[p as u8; 8]).unwrap();
    }
    let base = m.as_ptr();
    assert!(wait_released(base as usize), "released");
    if split {
        f.punch_hole(100 * PS, PS).unwrap();
        m.write_volatile((100 * PS) as usize, &[100; 8]).unwrap();
        for p in 0..BLOCK {
            assert_eq!(read_page(&m, p), p as u8, "page {p} after the split");
        }
        assert_eq!(f.folio_order(9).unwrap(), 0, "split");
    }
    // SAFETY: pages of the live mapping `m`.
    let at = |p: u64| unsafe { base.add((p * PS) as usize) };
    assert!(
        !faults_in_child(at(7), false),
        "a shared page, in a fork child"
    );
    let (first, status) = read_in_child_around(at(9), || {
        f.set_private(9 * PS, 2 * PS).unwrap();
    });
    assert_eq!(first, 9, "the child read the shared page 9");
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
        "split {split}: the child read page 9 after it became private (status {status:#x})"
    );
    assert!(
        faults_in_child(at(10), false) && faults_in_child(at(9), true),
        "pages 9 and 10, private, in a new child"
    );
    assert!(refused(&m, 9) && refused(&m, 10), "and in this process");
    assert_eq!(byte(&f, 9), 9, "split {split}");
}

/// Released blocks under racing conversions: accessor threads read random pages of a host
/// mapping (each read in a child sharing this memory, so a fault is reported) while a
/// converter makes random pages private and shared again, with periods in which the whole
/// block is shared (so the guard releases it at the next fault and the kernel maps it). A read
/// made while its page was private for the whole read must fault (SIGBUS at the page), one
/// made while it was shared for the whole read must succeed; and the block was seen released
/// (the check is not vacuous). A per-page generation, odd while a conversion of the page is in
/// flight, decides "for the whole read".
fn released_blocks_race_conversions(rev: Revocation) {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    const PAGES: usize = 32;
    let f = Arc::new(huge(1, SHARED, rev));
    let m = Arc::new(f.mmap_all().unwrap());
    for p in 0..BLOCK {
        m.write_volatile((p * PS) as usize, &[0x5A; 8]).unwrap();
    }
    let gen: Arc<Vec<AtomicU64>> = Arc::new((0..PAGES).map(|_| AtomicU64::new(0)).collect());
    let private: Arc<Vec<AtomicBool>> =
        Arc::new((0..PAGES).map(|_| AtomicBool::new(false)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let checked = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let mut accessors = Vec::new();
    for t in 0..2u64 {
        let (m, gen, private, stop, checked) = (
            m.clone(),
            gen.clone(),
            private.clone(),
            stop.clone(),
            checked.clone(),
        );
        accessors.push(std::thread::spawn(move || {
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ t;
            while !stop.load(SeqCst) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let p = (x % PAGES as u64) as usize;
                let g1 = gen[p].load(SeqCst);
                let was_private = private[p].load(SeqCst);
                let r = m.probe_read(p * PS as usize, 1).unwrap();
                let g2 = gen[p].load(SeqCst);
                if g1 != g2 || g1 % 2 == 1 {
                    continue;
                }
                match r {
                    Probe::Fault(x) => {
                        assert!(was_private, "page {p}, shared for the whole read: {x:?}");
                        assert!(x.is_sigbus() && x.addr == p as u64 * PS, "{x:?}");
                        checked[0].fetch_add(1, SeqCst);
                    }
                    Probe::Done(b) => {
                        assert!(
                            !was_private,
                            "page {p}, private for the whole read, read {b:?}"
                        );
                        checked[1].fetch_add(1, SeqCst);
                    }
                }
            }
        }));
    }
    let start = std::time::Instant::now();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let (mut seen_released, mut round) = (0, 0u64);
    while start.elapsed() < std::time::Duration::from_millis(1500) {
        round += 1;
        if round % 8 == 0 {
            // A period with the whole block shared: released at the next fault in it.
            let _ = m
                .mmap()
                .madvise(0, (BLOCK * PS) as usize, libc::MADV_DONTNEED);
            assert_eq!(read_page(&m, 100), 0x5A);
            if wait_released(m.as_ptr() as usize) {
                seen_released += 1;
            }
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = (x % PAGES as u64) as usize;
        gen[p].fetch_add(1, SeqCst);
        f.set_private(p as u64 * PS, PS).unwrap();
        private[p].store(true, SeqCst);
        gen[p].fetch_add(1, SeqCst);
        std::thread::sleep(std::time::Duration::from_micros(500));
        gen[p].fetch_add(1, SeqCst);
        f.set_shared(p as u64 * PS, PS).unwrap();
        private[p].store(false, SeqCst);
        gen[p].fetch_add(1, SeqCst);
    }
    stop.store(true, SeqCst);
    for a in accessors {
        a.join().unwrap();
    }
    let (faults, reads) = (checked[0].load(SeqCst), checked[1].load(SeqCst));
    assert!(
        faults > 0 && reads > 0 && seen_released > 0,
        "vacuous: {faults} faults, {reads} reads checked, released {seen_released} times"
    );
}

/// Anonymous memory of this test's own at `addr` (`MAP_FIXED_NOREPLACE`: if another thread
/// took the range, nothing is mapped, the range stays theirs, and `MAP_FAILED` is returned),
/// where a moved mapping was: what a program would put there next.
fn anon_at(addr: *mut libc::c_void, len: usize) -> *mut libc::c_void {
    // SAFETY: NOREPLACE maps nothing over anything mapped; the result is the caller's.
    unsafe {
        libc::mmap(
            addr,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    }
}

/// An inaccessible anonymous reservation of `len` bytes, its address 2 MiB-aligned (the
/// reservation is `len + 2 MiB` long; the caller unmaps `(base, total)`).
fn reserve(len: usize) -> (*mut libc::c_void, usize, usize) {
    let block = (BLOCK * PS) as usize;
    let total = len + block;
    // SAFETY: a fresh inaccessible anonymous mapping.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    (base, total, (base as usize).next_multiple_of(block))
}

/// Found in review: a mapping made from a released block by a raw `mremap` — a duplicate
/// (old length 0, which also maps the next block), `MREMAP_DONTUNMAP` (the old mapping stays),
/// two moves in a row before the first event is handled — inherits its write-protect-only
/// registration, so the kernel would serve it unchecked. Each is registered again in the
/// guard's modes (when its event is handled, and, failing that, by the next conversion's
/// fail-closed step): a page private there faults in a fork child, a shared one reads.
fn mappings_made_from_a_released_block_are_guarded(rev: Revocation) {
    let block = (BLOCK * PS) as usize;
    // SAFETY (for the closures): pages of mappings this test made and still holds.
    let at = |base: usize, p: u64| (base + (p * PS) as usize) as *mut u8;
    // A duplicate reaching past the released block into a block with a private page.
    {
        let f = huge(2, SHARED, rev);
        let m = f.mmap(0, block, MapKind::Shared).unwrap();
        for p in 0..BLOCK {
            m.write_volatile((p * PS) as usize, &[p as u8; 8]).unwrap();
        }
        assert!(wait_released(m.as_ptr() as usize), "released");
        f.set_private(BLOCK * PS, PS).unwrap();
        // SAFETY: a duplicate (old length 0) of the live shared mapping `m`, twice as long,
        // at an address the kernel picks; unmapped below.
        let dup = unsafe { libc::mremap(m.as_ptr().cast(), 0, 2 * block, libc::MREMAP_MAYMOVE) };
        assert_ne!(dup, libc::MAP_FAILED);
        let dup = dup as usize;
        // Any conversion first handles every event read (the duplicate's).
        f.set_private(BLOCK * PS + PS, PS).unwrap();
        assert!(
            faults_in_child(at(dup, BLOCK), false),
            "duplicate: private page 512"
        );
        assert!(
            faults_in_child(at(dup, BLOCK + 1), true),
            "duplicate: private page 513"
        );
        assert!(
            !faults_in_child(at(dup, 5), false),
            "duplicate: shared page 5"
        );
        assert_eq!(byte(&f, BLOCK), 0);
        // SAFETY: the duplicate made above.
        unsafe { libc::munmap(dup as *mut libc::c_void, 2 * block) };
    }
    // MREMAP_DONTUNMAP: the old mapping stays where it was.
    {
        let f = huge(1, SHARED, rev);
        let m = f.mmap_all().unwrap();
        for p in 0..BLOCK {
            m.write_volatile((p * PS) as usize, &[p as u8; 8]).unwrap();
        }
        assert!(wait_released(m.as_ptr() as usize), "released");
        let (base, total, target) = reserve(block);
        // SAFETY: moves the live mapping `m` into the reservation, leaving the old range
        // mapped (DONTUNMAP), so `m` still owns a mapping at its address.
        let new = unsafe {
            libc::mremap(
                m.as_ptr().cast(),
                block,
                block,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP,
                target as *mut libc::c_void,
            )
        };
        assert_eq!(new as usize, target, "moved");
        f.set_private(7 * PS, PS).unwrap();
        assert!(
            refused(&m, 7),
            "DONTUNMAP: page 7 at the old address, in this process"
        );
        assert!(
            faults_in_child(at(m.as_ptr() as usize, 7), false),
            "old address, child"
        );
        assert!(faults_in_child(at(target, 7), false), "new address, child");
        assert!(
            !faults_in_child(at(target, 8), false),
            "new address: shared page 8"
        );
        // SAFETY: the reservation, with the moved mapping in it.
        unsafe { libc::munmap(base, total) };
    }
    // Two moves in a row.
    {
        let f = huge(1, SHARED, rev);
        let m = f.mmap_all().unwrap();
        for p in 0..BLOCK {
            m.write_volatile((p * PS) as usize, &[p as u8; 8]).unwrap();
        }
        assert!(wait_released(m.as_ptr() as usize), "released");
        let old = m.as_ptr();
        let (b1, t1, first) = reserve(block);
        let (b2, t2, second) = reserve(block);
        // SAFETY: moves the live mapping `m` into the first reservation, then into the
        // second; `m` is not used at its old address afterwards (forgotten below), where this
        // test puts memory of its own at once.
        unsafe {
            let r = libc::mremap(
                old.cast(),
                block,
                block,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                first as *mut libc::c_void,
            );
            assert_eq!(r as usize, first);
            let r = libc::mremap(
                first as *mut libc::c_void,
                block,
                block,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                second as *mut libc::c_void,
            );
            assert_eq!(r as usize, second);
        }
        let mine = anon_at(old.cast(), block);
        f.set_private(7 * PS, PS).unwrap();
        assert!(faults_in_child(at(second, 7), false), "moved twice: page 7");
        assert!(
            !faults_in_child(at(second, 8), false),
            "moved twice: shared page 8"
        );
        assert_eq!(byte(&f, 7), 7);
        // SAFETY: the reservations (one holds the moved mapping) and the memory put at the
        // old address; `m` no longer owns its range.
        unsafe {
            libc::munmap(b1, t1);
            libc::munmap(b2, t2);
            if mine != libc::MAP_FAILED {
                libc::munmap(mine, block);
            }
        }
        std::mem::forget(m);
    }
}

/// Found in the second review: a raw `mremap` that grows a mapping in place makes no event,
/// and a released block at its end gives the new part write-protect-only registration (the
/// kernel's, unchecked, and `MADV_DONTFORK`). The next conversion of the file asks the kernel
/// where its mappings end, records the growth and registers it: a page private there faults
/// in a fork child (without it the child has nothing there: SIGSEGV, and this process reads
/// the page).
fn a_released_block_grown_in_place_is_guarded(rev: Revocation) {
    let block = (BLOCK * PS) as usize;
    let f = huge(2, SHARED, rev);
    let (base, total, at) = reserve(2 * block);
    // SAFETY: `[at, at + block)` lies in the reservation made above, which nothing else uses.
    let place = unsafe { gmem::os::Placement::replacing(at, block) };
    let m = f.mmap_fixed(place, 0, MapKind::Shared).unwrap();
    assert_eq!(m.as_ptr() as usize, at);
    for p in 0..BLOCK {
        m.write_volatile((p * PS) as usize, &[p as u8; 8]).unwrap();
    }
    assert!(wait_released(at), "released");
    f.set_private(BLOCK * PS, PS).unwrap();
    // SAFETY: frees the reservation's part after the mapping (ours), then grows the live
    // mapping `m` into it in place (no MREMAP_MAYMOVE: the address stays); the whole range
    // is unmapped below and `m` forgotten.
    let grown = unsafe {
        libc::munmap((at + block) as *mut libc::c_void, block);
        libc::mremap(at as *mut libc::c_void, block, 2 * block, 0)
    };
    assert_eq!(grown as usize, at, "grown in place");
    f.set_private(BLOCK * PS + PS, PS).unwrap();
    let page = |p: u64| (at + (p * PS) as usize) as *mut u8;
    assert!(
        faults_in_child(page(BLOCK), false),
        "grown part: private page 512"
    );
    assert!(
        faults_in_child(page(BLOCK + 1), true),
        "grown part: private page 513"
    );
    assert!(
        !faults_in_child(page(BLOCK + 2), false),
        "grown part: shared page 514"
    );
    assert_eq!(byte(&f, BLOCK + 1), 0);
    // SAFETY: the reservation, with the grown mapping in it; `m` no longer owns its range.
    unsafe { libc::munmap(base, total) };
    std::mem::forget(m);
}

/// Found in the third review: releasing a block cleared the count of pages mapped in this
/// process for the whole block, although another host mapping of the file still mapped some
/// of them at 4 KiB; a fork child copies those entries, and a conversion to private then left
/// it its copy. Here a small mapping of part of the block maps page 3 before the block is
/// released through the whole mapping; the whole mapping is then split (`mprotect` of one
/// page), so the fork's prepare handler cannot guard the block again; the child reads page 3
/// through the small mapping, and after page 3 is made private it must fault there.
fn a_release_keeps_what_another_mapping_maps(rev: Revocation) {
    let f = huge(1, SHARED, rev);
    let small = f.mmap(0, (16 * PS) as usize, MapKind::Shared).unwrap();
    assert_eq!(
        read_page(&small, 3),
        0,
        "page 3 mapped through the small mapping"
    );
    let m = f.mmap_all().unwrap();
    for p in 0..BLOCK {
        m.write_volatile((p * PS) as usize, &[p as u8; 8]).unwrap();
    }
    assert!(wait_released(m.as_ptr() as usize), "released");
    // SAFETY: changes the protection of one page of the live mapping `m` (read-only; this
    // test does not write there again): the mapping is split, the block no longer one VMA.
    let r = unsafe {
        libc::mprotect(
            m.as_ptr().add((100 * PS) as usize).cast(),
            PS as usize,
            libc::PROT_READ,
        )
    };
    assert_eq!(r, 0);
    let at3 = small.as_ptr().wrapping_add((3 * PS) as usize);
    let (first, status) = read_in_child_around(at3, || {
        f.set_private(3 * PS, PS).unwrap();
    });
    assert_eq!(first, 3, "the child read the shared page 3");
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
        "the child read page 3 after it became private (status {status:#x})"
    );
    assert!(refused(&small, 3), "and this process");
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

/// Why no file is hugetlb-backed (`gmem::host::HUGETLB_NOT_OFFERED`): in a mapping of a
/// hugetlb file the kernel maps, guards, zaps and protects only whole huge pages — the
/// guard's `UFFDIO_CONTINUE` and `MADV_DONTNEED`, and `mprotect`, of 4 KiB inside one answer
/// EINVAL — so the shared pages of a mixed folio could not stay mapped while its private
/// ones raise SIGBUS. If a kernel ever accepts these, this fails: the decision is to be
/// revisited.
fn hugetlb_mappings_are_guarded_only_whole() {
    const HUGE: usize = 2 << 20;
    const MFD_HUGE_2MB: libc::c_uint = 21 << 26;
    // SAFETY: a valid NUL-terminated name and flags; the result is checked.
    let fd =
        unsafe { libc::memfd_create(c"gmem-hugetlb".as_ptr(), libc::MFD_HUGETLB | MFD_HUGE_2MB) };
    assert!(
        fd >= 0,
        "memfd_create(MFD_HUGETLB): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: our own descriptor, owned from here.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: our descriptor; the size is one huge page.
    assert_eq!(unsafe { libc::ftruncate(raw, HUGE as libc::off_t) }, 0);
    // SAFETY: a new shared mapping of our file, unmapped at the end of this function.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            HUGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            raw,
            0,
        )
    };
    assert_ne!(at, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    let page = (at as usize + PS as usize) as *mut libc::c_void;
    // SAFETY: the mapping is ours; the huge page is the pool page reserved for this run.
    unsafe { at.cast::<u8>().write_volatile(1) };
    let einval = |rc: libc::c_int, what: &str| {
        let e = std::io::Error::last_os_error();
        assert_eq!(
            (rc, e.raw_os_error()),
            (-1, Some(libc::EINVAL)),
            "{what}: {e}"
        );
    };
    // SAFETY: 4 KiB inside our own mapping; the kernel refuses it (the point of the test).
    einval(
        unsafe { libc::madvise(page, PS as usize, libc::MADV_DONTNEED) },
        "MADV_DONTNEED of 4 KiB",
    );
    // SAFETY: as above.
    einval(
        unsafe { libc::mprotect(page, PS as usize, libc::PROT_NONE) },
        "mprotect of 4 KiB",
    );
    // The guard's operation: minor-mode registration, then a 4 KiB UFFDIO_CONTINUE.
    // SAFETY: the userfaultfd system call with flags only; the result is checked.
    let u = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if u >= 0 {
        // SAFETY: a new descriptor of ours.
        let u = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(u as i32) };
        let u = std::os::fd::AsRawFd::as_raw_fd(&u);
        const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
        const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
        const UFFDIO_CONTINUE: libc::c_ulong = 0xC020_AA07;
        const FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
        const MODE_MINOR: u64 = 1 << 2;
        let mut api = [0xAAu64, FEATURE_MINOR_HUGETLBFS, 0];
        // SAFETY: UFFDIO_API with a struct uffdio_api of ours (api, features, ioctls).
        let rc = unsafe { libc::ioctl(u, UFFDIO_API, api.as_mut_ptr()) };
        assert_eq!(rc, 0, "UFFDIO_API");
        let mut reg = [at as u64, HUGE as u64, MODE_MINOR, 0];
        // SAFETY: UFFDIO_REGISTER with a struct uffdio_register of ours over our mapping.
        let rc = unsafe { libc::ioctl(u, UFFDIO_REGISTER, reg.as_mut_ptr()) };
        assert_eq!(rc, 0, "UFFDIO_REGISTER");
        let mut cont = [page as u64, PS, 0, 0];
        // SAFETY: UFFDIO_CONTINUE with a struct uffdio_continue of ours inside our mapping.
        einval(
            unsafe { libc::ioctl(u, UFFDIO_CONTINUE, cont.as_mut_ptr()) },
            "UFFDIO_CONTINUE of 4 KiB",
        );
    }
    // SAFETY: our mapping, not used after.
    assert_eq!(unsafe { libc::munmap(at, HUGE) }, 0);
}

/// One 2 MiB hugetlb page for this run: there already, free, or reserved here as root and
/// given back when dropped (said on standard error); `Err(why)` where none can be had.
struct HugetlbPage {
    gave: Option<String>,
}

impl HugetlbPage {
    const POOL: &'static str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

    fn for_this_run() -> Result<HugetlbPage, String> {
        let pool = gmem::host::hugetlb_pages();
        if pool.free.is_some_and(|f| f > 0) {
            return Ok(HugetlbPage { gave: None });
        }
        let was = std::fs::read_to_string(Self::POOL)
            .map_err(|e| format!("no 2 MiB hugetlb pool ({}: {e})", Self::POOL))?;
        let n: u64 = was
            .trim()
            .parse()
            .map_err(|_| format!("{}: {was:?}", Self::POOL))?;
        if std::fs::write(Self::POOL, (n + 1).to_string()).is_err() {
            return Err("no free 2 MiB hugetlb page, and not root to reserve one".into());
        }
        let page = HugetlbPage {
            gave: Some(was.trim().to_string()),
        };
        if gmem::host::hugetlb_pages().free.is_some_and(|f| f > 0) {
            eprintln!("huge_folios: one 2 MiB hugetlb page reserved for this run (root), given back at its end");
            Ok(page)
        } else {
            Err("the kernel reserved no 2 MiB hugetlb page (memory too fragmented)".into())
        }
    }
}

impl Drop for HugetlbPage {
    fn drop(&mut self) {
        if let Some(was) = &self.gave {
            let _ = std::fs::write(Self::POOL, was);
            eprintln!("huge_folios: the hugetlb pool put back to {was} pages");
        }
    }
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
    let per_rev: [Case; 17] = [
        (
            "gmem_views_are_never_taken_for_host_mappings",
            gmem_views_are_never_taken_for_host_mappings,
        ),
        (
            "a_block_mapped_huge_is_released_at_the_conversion_back",
            a_block_mapped_huge_is_released_at_the_conversion_back,
        ),
        (
            "a_release_keeps_what_another_mapping_maps",
            a_release_keeps_what_another_mapping_maps,
        ),
        (
            "a_released_block_grown_in_place_is_guarded",
            a_released_block_grown_in_place_is_guarded,
        ),
        (
            "mappings_made_from_a_released_block_are_guarded",
            mappings_made_from_a_released_block_are_guarded,
        ),
        (
            "released_blocks_race_conversions",
            released_blocks_race_conversions,
        ),
        (
            "a_fork_child_inherits_a_released_block_guarded",
            a_fork_child_inherits_a_released_block_guarded,
        ),
        (
            "a_wholly_shared_block_is_mapped_huge_on_the_host",
            a_wholly_shared_block_is_mapped_huge_on_the_host,
        ),
        (
            "a_mapping_with_a_released_block_moves",
            a_mapping_with_a_released_block_moves,
        ),
        (
            "a_raw_mremap_of_a_released_block_is_guarded",
            a_raw_mremap_of_a_released_block_is_guarded,
        ),
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
        trials.push(test_unless(name, why.clone(), move || {
            // One case at a time: a fork anywhere in the process guards every released block
            // again (so the child inherits them), and several cases fork.
            let _one = ONE_AT_A_TIME
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f(Revocation::Guard)
        }));
    }
    trials.push(test("remap_is_eopnotsupp", remap_is_eopnotsupp));
    let hugetlb = HugetlbPage::for_this_run();
    trials.push(test_unless(
        "hugetlb_mappings_are_guarded_only_whole",
        hugetlb.as_ref().err().cloned(),
        hugetlb_mappings_are_guarded_only_whole,
    ));
    gmem_testkit::run_then(trials, move || {
        drop(hugetlb);
        drop(switch)
    })
}
