//! The kernel backend against the real guest_memfd of this host.
//!
//! Every test needs guest_memfd, most of them `MMAP | INIT_SHARED`: where the kernel lacks what
//! a test needs (no `/dev/kvm`, no guest_memfd, a flag missing from
//! `KVM_CAP_GUEST_MEMFD_FLAGS`) the test is reported as ignored with the reason gmem's probe
//! gives, and so is each conformance case whose capability (conversion, a guest, ...) this
//! host's kernel lacks.

mod common;

use std::sync::Arc;

use common::Trial;
use common::{needs, test_partly, test_unless, tests_needing, Feature};
use gmem::uapi::*;
use gmem::*;
use gmem_check::conformance::{cases, Ctx, Outcome};

const PAGE: u64 = PAGE_SIZE;
const RW: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

/// The flags most tests need.
const MMAP_INIT_SHARED: Feature = Feature::GuestMemfdFlags(RW);

/// The kernel backend (the tests run only where the probe found guest_memfd).
fn backend() -> KernelBackend {
    KernelBackend::new().expect("the kernel backend was available when the tests were listed")
}

fn errno<T: std::fmt::Debug>(r: KernelResult<T>) -> Errno {
    r.expect_err("the kernel accepted the call")
}

fn flags_mask_and_unknown_flags() {
    let b = backend();
    let supported = b.supported_flags();
    // Every combination inside the mask is accepted.
    for flags in 0..=supported {
        if flags & !supported == 0 {
            let f = b.create(PAGE, flags).unwrap();
            assert_eq!(f.flags(), flags);
            assert_eq!(f.backend(), BackendKind::Kernel);
        }
    }
    // Every bit outside it is EINVAL, NO_DIRECT_MAP included when not advertised.
    for bit in 0..64 {
        let flag = 1u64 << bit;
        if supported & flag == 0 {
            assert_eq!(errno(b.create(PAGE, flag)), Errno::EINVAL, "flag bit {bit}");
        }
    }
}

fn invalid_sizes_are_einval() {
    let b = backend();
    assert_eq!(errno(b.create(0, 0)), Errno::EINVAL, "size 0");
    for size in 1..PAGE {
        assert_eq!(errno(b.create(size, 0)), Errno::EINVAL, "size {size}");
    }
    assert_eq!(errno(b.create(PAGE + 1, 0)), Errno::EINVAL);
    assert_eq!(b.create(PAGE, 0).unwrap().size(), PAGE);
}

fn mmap_errnos() {
    let b = backend();
    let no_mmap = b.create(PAGE, 0).unwrap();
    assert_eq!(errno(no_mmap.mmap_all()), Errno::ENODEV);
    let f = b.create(2 * PAGE, RW).unwrap();
    assert_eq!(
        errno(f.mmap(0, PAGE as usize, MapKind::Private)),
        Errno::EINVAL,
        "MAP_PRIVATE"
    );
    let m = f.mmap(PAGE, PAGE as usize, MapKind::Shared).unwrap();
    assert_eq!(m.file_offset(), PAGE);
}

/// Issue 11 item 11: the kernel's generic mmap checks answer before guest_memfd's ENODEV
/// (EINVAL for a zero length or an unaligned offset, ENOMEM for a length that overflows or
/// exceeds the address space), a mapping's length is whole pages, and the emulated backend
/// answers the same.
fn mmap_generic_checks_and_page_rounding_match_the_emulated_backend() {
    let b = backend();
    let emulated = EmulatedBackend::default();
    for backend in [&b as &dyn GuestMemfdBackend, &emulated] {
        let kind = backend.kind();
        let no_mmap = backend.create(4 * PAGE, 0).unwrap();
        let cases = [
            (0, 0, MapKind::Shared, Errno::EINVAL),
            (1, PAGE as usize, MapKind::Shared, Errno::EINVAL),
            (0, usize::MAX, MapKind::Shared, Errno::ENOMEM),
            (0, usize::MAX - 100, MapKind::Private, Errno::ENOMEM),
            (0, 1 << 47, MapKind::Shared, Errno::ENOMEM),
            (0, PAGE as usize, MapKind::Shared, Errno::ENODEV),
            (0, PAGE as usize, MapKind::Private, Errno::ENODEV),
        ];
        for (off, len, map, want) in cases {
            assert_eq!(
                errno(no_mmap.mmap(off, len, map)),
                want,
                "{kind:?}: mmap({off:#x}, {len:#x}, {map:?}) without MMAP"
            );
        }
        let f = backend.create(4 * PAGE, RW).unwrap();
        for (len, want) in [(1, PAGE), (PAGE + 1, 2 * PAGE), (3 * PAGE, 3 * PAGE)] {
            let m = f.mmap(0, len as usize, MapKind::Shared).unwrap();
            assert_eq!(m.len() as u64, want, "{kind:?}: mmap of {len:#x} bytes");
            assert_eq!(
                m.probe_write(want as usize - 1, 1, 3).unwrap(),
                Probe::Done(())
            );
        }
        assert_eq!(errno(f.mmap(0, usize::MAX, MapKind::Shared)), Errno::ENOMEM);
    }
}

/// Issue 11 item 11: a pin maps only the pinned pages, so it works on a file too large to map
/// whole (2^50 bytes, sparse: one page touched).
fn pin_on_a_huge_file_maps_only_the_pinned_range() {
    let b = backend();
    let f = b.create(1 << 50, RW).unwrap();
    let at = 1u64 << 49;
    let pin = f.pin(at, PAGE).unwrap();
    assert_eq!((pin.offset(), pin.len()), (at, PAGE));
    let m = f.mmap(at, PAGE as usize, MapKind::Shared).unwrap();
    assert_eq!(m.probe_write(0, 1, 9).unwrap(), Probe::Done(()));
    drop(pin);
    assert!(f.allocated_bytes().unwrap() <= 2 * PAGE);
}

fn fault_on_private_is_sigbus_at_the_exact_address() {
    let b = backend();
    // MMAP without INIT_SHARED: every page is private, every touch is the kernel's SIGBUS.
    let f = b.create(4 * PAGE, GUEST_MEMFD_FLAG_MMAP).unwrap();
    let m = f.mmap_all().unwrap();
    let off = PAGE as usize + 17;
    let p = m.probe_read(off, 1).unwrap();
    let fault = p.fault().expect("a private page was readable");
    assert!(fault.is_sigbus(), "{fault:?}");
    assert_eq!(fault.code, libc::BUS_ADRERR, "{fault:?}");
    assert_eq!(fault.addr, off as u64);
    let w = m.probe_write(0, 8, 0xaa).unwrap();
    assert!(w.is_sigbus(), "{w:?}");
    // The mirror agrees, and the safe accessors refuse with a typed error.
    assert_eq!(f.attributes(0).unwrap(), KVM_MEMORY_ATTRIBUTE_PRIVATE);
    assert_eq!(
        f.read_at(PAGE + 5, &mut [0u8; 4]),
        Err(AccessError::Private { offset: PAGE + 5 })
    );
    assert_eq!(
        f.attribute_runs(0, 4 * PAGE).unwrap(),
        vec![(0, 4 * PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE)]
    );
}

fn shared_pages_are_coherent_and_accessors_are_typed() {
    let b = backend();
    let f = b.create(4 * PAGE, RW).unwrap();
    let m = f.mmap_all().unwrap();
    m.write_volatile(100, &[0xaa; 8]).unwrap();
    let mut buf = [0u8; 8];
    f.read_at(100, &mut buf).unwrap();
    assert_eq!(buf, [0xaa; 8]);
    f.write_at(3 * PAGE + 10, &[0x11; 4]).unwrap();
    assert_eq!(
        m.probe_read(3 * PAGE as usize + 10, 4).unwrap(),
        Probe::Done(vec![0x11; 4])
    );
    assert_eq!(
        f.read_at(4 * PAGE - 2, &mut buf),
        Err(AccessError::OutOfBounds {
            offset: 4 * PAGE - 2,
            len: 8,
            size: 4 * PAGE
        })
    );
    let no_mmap = b.create(PAGE, 0).unwrap();
    assert!(matches!(
        no_mmap.write_at(0, &[1]),
        Err(AccessError::NotMappable { .. })
    ));
    // A mapping longer than the file: past the end is SIGBUS, the rest keeps its data.
    let long = f.mmap(0, 8 * PAGE as usize, MapKind::Shared).unwrap();
    assert!(long.probe_read(4 * PAGE as usize, 1).unwrap().is_sigbus());
    assert_eq!(long.probe_read(100, 1).unwrap(), Probe::Done(vec![0xaa]));
}

fn fallocate_errnos_and_punch_hole() {
    let b = backend();
    let f = b.create(4 * PAGE, RW).unwrap();
    const ZERO_RANGE: u32 = 0x10;
    assert_eq!(errno(f.fallocate(0, 0, PAGE)), Errno::EOPNOTSUPP, "mode 0");
    assert_eq!(
        errno(f.fallocate(FALLOC_FL_PUNCH_HOLE, 0, PAGE)),
        Errno::EOPNOTSUPP,
        "PUNCH_HOLE without KEEP_SIZE"
    );
    assert_eq!(
        errno(f.fallocate(ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, PAGE)),
        Errno::EOPNOTSUPP,
        "ZERO_RANGE"
    );
    for (off, len) in [
        (0, 1),
        (0, PAGE - 1),
        (1, PAGE),
        (0, PAGE + 1),
        (PAGE / 2, PAGE),
    ] {
        assert_eq!(
            errno(f.punch_hole(off, len)),
            Errno::EINVAL,
            "punch {off} {len}"
        );
        assert_eq!(
            errno(f.allocate(off, len)),
            Errno::EINVAL,
            "alloc {off} {len}"
        );
    }
    assert_eq!(
        errno(f.allocate(4 * PAGE, PAGE)),
        Errno::EINVAL,
        "alloc at the end"
    );
    assert_eq!(
        errno(f.allocate(3 * PAGE, 2 * PAGE)),
        Errno::EINVAL,
        "alloc past the end"
    );
    f.punch_hole(4 * PAGE, PAGE).unwrap();
    f.allocate(0, 4 * PAGE).unwrap();

    let m = f.mmap_all().unwrap();
    m.write_volatile(0, &[0xcc; 2 * PAGE as usize]).unwrap();
    f.punch_hole(PAGE, PAGE).unwrap();
    let mut page = vec![0u8; PAGE as usize];
    m.read_volatile(PAGE as usize, &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0), "punched page reads 0");
    f.read_at(0, &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0xcc), "neighbour kept");
    // Punch-hole keeps the attributes (they belong to the file).
    assert_eq!(f.attributes(PAGE).unwrap(), 0);
}

fn stat_reports_size_blksize_and_distinct_inodes() {
    let b = backend();
    let f = b.create(3 * PAGE, 0).unwrap();
    let g = b.create(PAGE, RW).unwrap();
    let (sf, sg) = (f.stat().unwrap(), g.stat().unwrap());
    assert_eq!(sf.size, 3 * PAGE);
    assert_eq!(sf.blksize, PAGE);
    assert_eq!(sg.size, PAGE);
    assert_ne!(sf.ino, sg.ino);
}

fn conversion_returns_the_kernels_answer() {
    let b = backend();
    let f = b.create(2 * PAGE, RW).unwrap();
    let support = b.conversion_support();
    if b.conversion_revision().is_some() {
        // A kernel with the series: a real round trip.
        assert!(support.is_ok(), "{support:?}");
        f.set_private(0, PAGE).unwrap();
        assert_eq!(f.attributes(0).unwrap(), KVM_MEMORY_ATTRIBUTE_PRIVATE);
        assert!(f.mmap_all().unwrap().probe_read(0, 1).unwrap().is_sigbus());
        f.set_shared(0, PAGE).unwrap();
        return;
    }
    // This host: no conversion ioctl. The kernel's answer comes back, nothing is emulated.
    let e = f.set_private(0, PAGE).unwrap_err();
    assert_eq!(e.errno, Errno::ENOTTY);
    assert_eq!(e.error_offset, 0);
    assert_eq!(f.attributes(0).unwrap(), 0, "the mirror did not change");
    assert_eq!(f.set_shared(0, PAGE).unwrap_err().errno, Errno::ENOTTY);
    let why = support.unwrap_err().to_string();
    for needle in [
        "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES",
        "249 in v7",
        "250 in v8",
        "ENOTTY",
    ] {
        assert!(why.contains(needle), "{needle:?} missing from {why:?}");
    }
    let u = b.conversion_unsupported().unwrap();
    assert_eq!(u.cap_values.len(), SeriesRevision::ALL.len());
}

fn pins_are_real_vmsplice_references() {
    let b = backend();
    let f = b.create(1024 * PAGE, RW).unwrap();
    f.write_at(PAGE, &[0x5a; 16]).unwrap();
    // One page, and 4 MiB (more than one default-sized pipe holds).
    let pin = f.pin(PAGE, PAGE).unwrap();
    assert_eq!((pin.offset(), pin.len()), (PAGE, PAGE));
    let big = f.pin(0, 1024 * PAGE).unwrap();
    assert_eq!(big.len(), 1024 * PAGE);
    // Here a pin blocks nothing: conversion is ENOTTY either way, punch-hole works.
    if b.conversion_revision().is_none() {
        assert_eq!(f.set_private(PAGE, PAGE).unwrap_err().errno, Errno::ENOTTY);
    } else {
        let e = f.set_private(0, 2 * PAGE).unwrap_err();
        assert_eq!((e.errno, e.error_offset), (Errno::EAGAIN, 0));
    }
    f.write_at(PAGE, &[0x77; 4]).unwrap();
    f.punch_hole(2 * PAGE, PAGE).unwrap();
    drop(pin);
    drop(big);

    // GUP on a private page fails: the kernel answers EFAULT.
    let private = b.create(2 * PAGE, GUEST_MEMFD_FLAG_MMAP).unwrap();
    assert_eq!(errno(private.pin(0, PAGE)), Errno::EFAULT);
    // Without MMAP there is no address to pin.
    let no_mmap = b.create(PAGE, 0).unwrap();
    assert_eq!(errno(no_mmap.pin(0, PAGE)), Errno::EFAULT);
    assert_eq!(
        errno(f.pin(1024 * PAGE, PAGE)),
        Errno::EFAULT,
        "past the end"
    );
    assert_eq!(errno(f.pin(0, 0)), Errno::EINVAL);
}

fn files_belong_to_their_vm_and_keep_it_alive() {
    let b = backend();
    let other = KernelBackend::new().unwrap();
    let f = b.create_guest_memfd(PAGE, RW).unwrap();
    assert!(f.belongs_to(&b));
    assert!(!f.belongs_to(&other));
    let dynf: std::sync::Arc<dyn GuestMemfd> = b.create(PAGE, RW).unwrap();
    match dynf.memslot_source().unwrap() {
        gmem::MemslotSource::GuestMemfd { vm, .. } => assert!(std::ptr::eq(vm, b.vm_fd())),
        other => panic!("a kernel file binds as {other:?}"),
    }
    drop(b);
    f.write_at(0, &[1, 2, 3]).unwrap();
    let mut buf = [0u8; 3];
    f.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [1, 2, 3]);
}

/// The backend-generic conformance cases on the real guest_memfd, one test each
/// (`conformance_cases_pass_or_skip_with_the_missing_capability::<case>`): a case passes, or is
/// ignored for a capability this host lacks (conversion, a guest) with the reason; none fails.
/// `...::at_least_11_cases_run` checks that the guest_memfd_test cases needing neither
/// conversion nor a guest are not among the skipped.
fn conformance_cases_pass_or_skip_with_the_missing_capability() -> Vec<Trial> {
    let why = &needs(&[Feature::GuestMemfd]);
    const NAME: &str = "conformance_cases_pass_or_skip_with_the_missing_capability";
    let ctx = why.is_none().then(|| Ctx {
        backend: Arc::new(backend()),
        guest: None,
    });
    let mut trials: Vec<Trial> = cases()
        .into_iter()
        .map(|case| {
            let name = format!("{NAME}::{}", case.name);
            let Some(ctx) = ctx.clone() else {
                return test_unless(name, why.clone(), || {});
            };
            if let Some(missing) = case.needs.iter().find_map(|&n| ctx.missing(n)) {
                return test_unless(name, Some(missing), || {});
            }
            // A case may find by running that this host cannot run it (one NUMA node, an
            // ioctl answering EOPNOTSUPP): ignored with that reason, never a pass.
            test_partly(name, move || match ctx.run(&case) {
                Outcome::Pass => None,
                Outcome::Skip(why) => Some(why),
                Outcome::Fail(why) => panic!("{} failed on the kernel backend: {why}", case.name),
            })
        })
        .collect();
    trials.push(test_unless(
        format!("{NAME}::at_least_11_cases_run"),
        why.clone(),
        move || {
            let ctx = ctx.expect("listed only with a kernel backend");
            let runnable = cases()
                .iter()
                .filter(|c| c.needs.iter().all(|&n| ctx.missing(n).is_none()))
                .count();
            assert!(runnable >= 11, "only {runnable} cases can run");
        },
    ));
    trials
}

/// The accessors are what a memslot needs: KVM accepts the guest_memfd and its host mapping
/// in KVM_SET_USER_MEMORY_REGION2 with KVM_MEM_GUEST_MEMFD. Also checks the fd-level errnos
/// of the file calls (read EINVAL; pread, pwrite, lseek ESPIPE; ftruncate EINVAL).
fn accessors_bind_a_memslot_and_the_fd_refuses_file_io() {
    let b = backend();
    let f = b.create(16 * PAGE, RW).unwrap();
    let gmem::MemslotSource::GuestMemfd {
        fd,
        vm,
        userspace_addr,
    } = f.memslot_source().unwrap()
    else {
        panic!("a kernel file binds as a guest_memfd");
    };
    assert!(std::ptr::eq(vm, b.vm_fd()));
    let fd = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let region = kvm_bindings::kvm_userspace_memory_region2 {
        slot: 0,
        flags: KVM_MEM_GUEST_MEMFD,
        guest_phys_addr: 0x10_0000,
        memory_size: 16 * PAGE,
        userspace_addr,
        guest_memfd_offset: 0,
        guest_memfd: u32::try_from(fd).unwrap(),
        ..Default::default()
    };
    // SAFETY: the region is the file's own shared mapping, which lives as long as the file;
    // the slot is deleted below, before `f` is dropped.
    unsafe { vm.set_user_memory_region2(region) }.unwrap();
    let delete = kvm_bindings::kvm_userspace_memory_region2 {
        memory_size: 0,
        ..region
    };
    // SAFETY: deleting the slot created above.
    unsafe { vm.set_user_memory_region2(delete) }.unwrap();

    let mut buf = [0u8; 8];
    let last = || Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    // SAFETY: plain system calls on the file's descriptor with a valid 8-byte buffer.
    let (read, pread, pwrite, lseek, ftruncate) = unsafe {
        (
            (libc::read(fd, buf.as_mut_ptr().cast(), 8), last()),
            (libc::pread(fd, buf.as_mut_ptr().cast(), 8, 0), last()),
            (libc::pwrite(fd, buf.as_ptr().cast(), 8, 0), last()),
            (libc::lseek(fd, 0, libc::SEEK_SET), last()),
            (libc::ftruncate(fd, 0), last()),
        )
    };
    assert_eq!(read, (-1, Errno::EINVAL));
    assert_eq!(pread, (-1, Errno::ESPIPE));
    assert_eq!(pwrite, (-1, Errno::ESPIPE));
    assert_eq!(lseek, (-1, Errno::ESPIPE));
    assert_eq!(ftruncate, (-1, Errno::EINVAL));
}

fn main() {
    let mut trials = tests_needing!([Feature::GuestMemfd];
        flags_mask_and_unknown_flags,
        invalid_sizes_are_einval,
    );
    trials.extend(tests_needing!([MMAP_INIT_SHARED];
        mmap_errnos,
        mmap_generic_checks_and_page_rounding_match_the_emulated_backend,
        pin_on_a_huge_file_maps_only_the_pinned_range,
        shared_pages_are_coherent_and_accessors_are_typed,
        fallocate_errnos_and_punch_hole,
        stat_reports_size_blksize_and_distinct_inodes,
        conversion_returns_the_kernels_answer,
        pins_are_real_vmsplice_references,
        files_belong_to_their_vm_and_keep_it_alive,
        accessors_bind_a_memslot_and_the_fd_refuses_file_io,
    ));
    trials.extend(
        tests_needing!([Feature::GuestMemfdFlags(GUEST_MEMFD_FLAG_MMAP)];
            fault_on_private_is_sigbus_at_the_exact_address,
        ),
    );
    trials.extend(conformance_cases_pass_or_skip_with_the_missing_capability());
    common::run(trials)
}
