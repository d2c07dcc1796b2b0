//! Cases from `tools/testing/selftests/kvm/guest_memfd_test.c` (kernel-spec §4.1).

use super::{ensure, Case, CaseFailure, CaseResult, Ctx, Need};
use gmem::error::Errno;
use gmem::mapping::{MapKind, Probe};
use gmem::os::PAGE_SIZE;
use gmem::uapi::{
    flag_names, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
};

const PS: u64 = PAGE_SIZE;
const SHARED: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

pub(super) fn cases() -> Vec<Case> {
    const SRC: &str = "guest_memfd_test.c";
    vec![
        Case {
            name: "flags",
            source: SRC,
            needs: &[],
            run: flags,
        },
        Case {
            name: "create_multiple",
            source: SRC,
            needs: &[],
            run: create_multiple,
        },
        Case {
            name: "invalid_sizes",
            source: SRC,
            needs: &[],
            run: invalid_sizes,
        },
        Case {
            name: "file_size",
            source: SRC,
            needs: &[],
            run: file_size,
        },
        Case {
            name: "mmap_supported",
            source: SRC,
            needs: &[Need::Mmap, Need::InitShared],
            run: mmap_supported,
        },
        Case {
            name: "mmap_not_supported",
            source: SRC,
            needs: &[],
            run: mmap_not_supported,
        },
        Case {
            name: "mmap_cow",
            source: SRC,
            needs: &[Need::Mmap],
            run: mmap_cow,
        },
        Case {
            name: "fault_overflow",
            source: SRC,
            needs: &[Need::Mmap, Need::InitShared],
            run: fault_overflow,
        },
        Case {
            name: "fault_private",
            source: SRC,
            needs: &[Need::Mmap],
            run: fault_private,
        },
        Case {
            name: "fallocate",
            source: SRC,
            needs: &[],
            run: fallocate,
        },
        Case {
            name: "invalid_punch_hole",
            source: SRC,
            needs: &[],
            run: invalid_punch_hole,
        },
    ]
}

fn expect_errno<T>(what: &str, r: Result<T, Errno>, want: Errno) -> CaseResult {
    match r {
        Err(e) if e == want => Ok(()),
        Err(e) => Err(format!("{what}: expected {}, got {}", want.name(), e.name()).into()),
        Ok(_) => Err(format!("{what}: expected {}, got success", want.name()).into()),
    }
}

fn expect_ok<T>(what: &str, r: Result<T, Errno>) -> Result<T, CaseFailure> {
    r.map_err(|e| format!("{what}: expected success, got {}", e.name()).into())
}

/// `test_guest_memfd_flags`: every single bit creates iff it is supported, else EINVAL.
fn flags(ctx: &Ctx) -> CaseResult {
    let supported = ctx.backend.supported_flags();
    for bit in 0..64 {
        let flag = 1u64 << bit;
        let r = ctx.backend.create(PS, flag);
        if supported & flag != 0 {
            expect_ok(
                &format!("create with supported flag {}", flag_names(flag)),
                r,
            )?;
        } else {
            expect_errno(
                &format!("create with unsupported flag {}", flag_names(flag)),
                r,
                Errno::EINVAL,
            )?;
        }
    }
    Ok(())
}

/// `test_create_guest_memfd_multiple`.
fn create_multiple(ctx: &Ctx) -> CaseResult {
    let a = ctx.create(1, 0)?;
    let sa = expect_ok("fstat", a.stat())?;
    ensure(sa.size == PS, || format!("st_size {} != {PS}", sa.size))?;
    let b = ctx.create(2, 0)?;
    let sb = expect_ok("fstat", b.stat())?;
    ensure(sb.size == 2 * PS, || {
        format!("st_size {} != {}", sb.size, 2 * PS)
    })?;
    ensure(sa.ino != sb.ino, || {
        format!("both files have inode {}", sa.ino)
    })?;
    let sa2 = expect_ok("fstat", a.stat())?;
    ensure(sa2.size == PS, || "first file's size changed".to_string())
}

/// `test_create_guest_memfd_invalid_sizes`, for every supported flag combination.
fn invalid_sizes(ctx: &Ctx) -> CaseResult {
    let supported = ctx.backend.supported_flags();
    for flags in [0, GUEST_MEMFD_FLAG_MMAP, SHARED] {
        if flags & !supported != 0 {
            continue;
        }
        for size in 1..PS {
            expect_errno(
                &format!("create(size {size}, {})", flag_names(flags)),
                ctx.backend.create(size, flags),
                Errno::EINVAL,
            )?;
        }
        expect_errno(
            "create(size 0)",
            ctx.backend.create(0, flags),
            Errno::EINVAL,
        )?;
    }
    Ok(())
}

/// `test_file_size`.
fn file_size(ctx: &Ctx) -> CaseResult {
    let f = ctx.create(4, 0)?;
    let st = expect_ok("fstat", f.stat())?;
    ensure(st.size == 4 * PS, || {
        format!("st_size {} != {}", st.size, 4 * PS)
    })?;
    ensure(st.blksize == PS, || {
        format!("st_blksize {} != {PS}", st.blksize)
    })
}

/// `test_mmap_supported`: write/read 0xaa, punch page 0, rewrite.
fn mmap_supported(ctx: &Ctx) -> CaseResult {
    let f = ctx.create(4, SHARED)?;
    let m = expect_ok("mmap", f.mmap_all())?;
    let len = m.len();
    ensure(
        m.probe_write(0, len, 0xaa)
            .map_err(CaseFailure::SigbusProbe)?
            == Probe::Done(()),
        || "write of a shared mapping faulted".into(),
    )?;
    let all = |v: u8| Probe::Done(vec![v; len]);
    ensure(
        m.probe_read(0, len).map_err(CaseFailure::SigbusProbe)? == all(0xaa),
        || "did not read back 0xaa".into(),
    )?;
    expect_ok("punch page 0", f.punch_hole(0, PS))?;
    let got = m.probe_read(0, len).map_err(CaseFailure::SigbusProbe)?;
    let mut want = vec![0xaa; len];
    want[..PS as usize].fill(0);
    ensure(got == Probe::Done(want), || {
        "after punching page 0: expected 0x00 there and 0xaa elsewhere".into()
    })?;
    ensure(
        m.probe_write(0, PS as usize, 0xaa)
            .map_err(CaseFailure::SigbusProbe)?
            == Probe::Done(()),
        || "rewrite faulted".into(),
    )?;
    ensure(
        m.probe_read(0, len).map_err(CaseFailure::SigbusProbe)? == all(0xaa),
        || "did not read back 0xaa after the rewrite".into(),
    )
}

/// `test_mmap_not_supported`: no MMAP flag, no mapping.
fn mmap_not_supported(ctx: &Ctx) -> CaseResult {
    let f = ctx.create(4, 0)?;
    expect_errno(
        "mmap of one page",
        f.mmap(0, PS as usize, MapKind::Shared),
        Errno::ENODEV,
    )?;
    expect_errno("mmap of the file", f.mmap_all(), Errno::ENODEV)
}

/// `test_mmap_cow`: MAP_PRIVATE is refused.
fn mmap_cow(ctx: &Ctx) -> CaseResult {
    let f = ctx.create(4, GUEST_MEMFD_FLAG_MMAP)?;
    expect_errno(
        "MAP_PRIVATE mmap",
        f.mmap(0, 4 * PS as usize, MapKind::Private),
        Errno::EINVAL,
    )
}

/// `test_fault_overflow`: a mapping 4x the file faults exactly at the file's end.
fn fault_overflow(ctx: &Ctx) -> CaseResult {
    let f = ctx.create(4, SHARED)?;
    let size = f.size();
    let m = expect_ok("mmap 4x", f.mmap(0, 4 * size as usize, MapKind::Shared))?;
    let w = m
        .probe_write(0, m.len(), 0xaa)
        .map_err(CaseFailure::SigbusProbe)?;
    ensure(
        w.is_sigbus() && w.fault().map(|x| x.addr) == Some(size),
        || format!("memset over 4x the file: expected SIGBUS at {size:#x}, got {w:?}"),
    )?;
    let r = m
        .probe_read(size as usize, 1)
        .map_err(CaseFailure::SigbusProbe)?;
    ensure(
        r.is_sigbus() && r.fault().map(|x| x.addr) == Some(size),
        || format!("read at the file's end: expected SIGBUS, got {r:?}"),
    )?;
    let head = m
        .probe_read(0, size as usize)
        .map_err(CaseFailure::SigbusProbe)?;
    ensure(head == Probe::Done(vec![0xaa; size as usize]), || {
        "the file's bytes do not all hold 0xaa".into()
    })
}

/// `test_fault_private`: without INIT_SHARED every page is private: no byte is accessible.
fn fault_private(ctx: &Ctx) -> CaseResult {
    let f = ctx.create(4, GUEST_MEMFD_FLAG_MMAP)?;
    let m = expect_ok("mmap", f.mmap_all())?;
    let r = m.probe_read(0, m.len()).map_err(CaseFailure::SigbusProbe)?;
    ensure(
        r.is_sigbus() && r.fault().map(|x| x.addr) == Some(0),
        || format!("read: expected SIGBUS at 0, got {r:?}"),
    )?;
    let w = m
        .probe_write(0, m.len(), 0xaa)
        .map_err(CaseFailure::SigbusProbe)?;
    ensure(
        w.is_sigbus() && w.fault().map(|x| x.addr) == Some(0),
        || format!("write: expected SIGBUS at 0, got {w:?}"),
    )
}

/// `test_fallocate`, plus the mode checks of kernel-spec §2.5.
fn fallocate(ctx: &Ctx) -> CaseResult {
    let f = ctx.create(4, 0)?;
    let total = f.size();
    let punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
    let keep = FALLOC_FL_KEEP_SIZE;
    expect_ok("allocate the whole file", f.fallocate(keep, 0, total))?;
    expect_errno(
        "punch at an unaligned offset",
        f.fallocate(punch, PS - 1, PS),
        Errno::EINVAL,
    )?;
    expect_errno(
        "allocate at the size",
        f.fallocate(keep, total, PS),
        Errno::EINVAL,
    )?;
    expect_ok("punch at the size", f.fallocate(punch, total, PS))?;
    expect_errno(
        "allocate past the size",
        f.fallocate(keep, total + PS, PS),
        Errno::EINVAL,
    )?;
    expect_ok("punch past the size", f.fallocate(punch, total + PS, PS))?;
    expect_errno(
        "punch an unaligned length",
        f.fallocate(punch, PS, PS - 1),
        Errno::EINVAL,
    )?;
    expect_ok("aligned punch", f.fallocate(punch, PS, PS))?;
    expect_ok("re-allocate the punched page", f.fallocate(keep, PS, PS))?;
    expect_errno(
        "mode 0 (no KEEP_SIZE)",
        f.fallocate(0, 0, PS),
        Errno::EOPNOTSUPP,
    )?;
    expect_errno(
        "PUNCH_HOLE without KEEP_SIZE",
        f.fallocate(FALLOC_FL_PUNCH_HOLE, 0, PS),
        Errno::EOPNOTSUPP,
    )?;
    // FALLOC_FL_ZERO_RANGE | KEEP_SIZE.
    expect_errno(
        "ZERO_RANGE",
        f.fallocate(0x10 | keep, 0, PS),
        Errno::EOPNOTSUPP,
    )
}

/// The (offset, len) pairs of `test_invalid_punch_hole`: every one is EINVAL.
pub(super) const INVALID_PUNCH_HOLES: [(u64, u64); 10] = [
    (0, 1),
    (0, PS - 1),
    (0, PS + 1),
    (1, 1),
    (1, PS - 1),
    (1, PS),
    (1, PS + 1),
    (PS, 1),
    (PS, PS - 1),
    (PS, PS + 1),
];

/// `test_invalid_punch_hole`.
fn invalid_punch_hole(ctx: &Ctx) -> CaseResult {
    let f = ctx.create(4, 0)?;
    for (off, len) in INVALID_PUNCH_HOLES {
        expect_errno(
            &format!("punch ({off}, {len})"),
            f.punch_hole(off, len),
            Errno::EINVAL,
        )?;
    }
    Ok(())
}
