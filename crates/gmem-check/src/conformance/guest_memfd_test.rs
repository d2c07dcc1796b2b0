//! Cases from `tools/testing/selftests/kvm/guest_memfd_test.c` (docs/series.md §4.1).

use super::{ensure, Case, CaseFailure, CaseResult, Ctx, Need};
use gmem::error::Errno;
use gmem::mapping::{MapKind, Probe};
use gmem::os::PAGE_SIZE;
use gmem::uapi::{
    flag_names, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
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
        Case {
            name: "collapse",
            source: SRC,
            needs: &[Need::Mmap, Need::InitShared],
            run: collapse,
        },
        Case {
            name: "mbind",
            source: SRC,
            needs: &[Need::Mmap, Need::InitShared],
            run: mbind,
        },
        Case {
            name: "numa_allocation",
            source: SRC,
            needs: &[Need::Mmap, Need::InitShared],
            run: numa_allocation,
        },
        Case {
            name: "guest_memfd_guest",
            source: SRC,
            needs: &[Need::Mmap, Need::InitShared, Need::Guest],
            run: guest_memfd_guest,
        },
    ]
}

/// The flag sets `__test_guest_memfd` runs for (docs/series.md §4.1): 0, MMAP, MMAP|INIT_SHARED,
/// and each of them with NO_DIRECT_MAP, those the backend accepts.
fn flag_sets(supported: u64) -> Vec<u64> {
    [0, GUEST_MEMFD_FLAG_MMAP, SHARED]
        .into_iter()
        .flat_map(|f| [f, f | GUEST_MEMFD_FLAG_NO_DIRECT_MAP])
        .filter(|f| f & !supported == 0)
        .collect()
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

/// `test_file_size`, for every flag set.
fn file_size(ctx: &Ctx) -> CaseResult {
    for flags in flag_sets(ctx.backend.supported_flags()) {
        let f = ctx.create(4, flags)?;
        let st = expect_ok("fstat", f.stat())?;
        let fl = flag_names(flags);
        ensure(st.size == 4 * PS, || {
            format!("{fl}: st_size {} != {}", st.size, 4 * PS)
        })?;
        ensure(st.blksize == PS, || {
            format!("{fl}: st_blksize {} != {PS}", st.blksize)
        })?;
    }
    Ok(())
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

/// `test_mmap_cow`: MAP_PRIVATE is refused, for MMAP and MMAP|INIT_SHARED.
fn mmap_cow(ctx: &Ctx) -> CaseResult {
    for flags in flag_sets(ctx.backend.supported_flags()) {
        if flags & GUEST_MEMFD_FLAG_MMAP == 0 {
            continue;
        }
        let f = ctx.create(4, flags)?;
        expect_errno(
            &format!("MAP_PRIVATE mmap ({})", flag_names(flags)),
            f.mmap(0, 4 * PS as usize, MapKind::Private),
            Errno::EINVAL,
        )?;
    }
    Ok(())
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

/// `test_fallocate` for every flag set, plus the mode checks of docs/series.md §2.5.
fn fallocate(ctx: &Ctx) -> CaseResult {
    for flags in flag_sets(ctx.backend.supported_flags()) {
        fallocate_one(ctx, flags).map_err(|e| format!("{}: {e}", flag_names(flags)))?;
    }
    Ok(())
}

fn fallocate_one(ctx: &Ctx, flags: u64) -> CaseResult {
    let f = ctx.create(4, flags)?;
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

/// `test_invalid_punch_hole`, for every flag set.
fn invalid_punch_hole(ctx: &Ctx) -> CaseResult {
    for flags in flag_sets(ctx.backend.supported_flags()) {
        let f = ctx.create(4, flags)?;
        for (off, len) in INVALID_PUNCH_HOLES {
            expect_errno(
                &format!("{}: punch ({off}, {len})", flag_names(flags)),
                f.punch_hole(off, len),
                Errno::EINVAL,
            )?;
        }
    }
    Ok(())
}

/// The PMD size: 2 MiB on x86-64.
const PMD_SIZE: u64 = 2 << 20;

/// `test_collapse`: at PMD alignment, MADV_HUGEPAGE is accepted, MADV_COLLAPSE fails with
/// EINVAL, and MADV_DONTNEED followed by a re-read works. (The emulated backend's tests run
/// every case in every revocation mode, this one included.)
fn collapse(ctx: &Ctx) -> CaseResult {
    let backend = ctx.backend.as_ref();
    // Two PMDs of file, mapped whole: the PMD-aligned address inside the mapping starts a
    // full PMD, and the file offset there is a multiple of the page size.
    let f = backend
        .create(2 * PMD_SIZE, SHARED)
        .map_err(CaseFailure::call("create(4 MiB, mmap|init_shared)"))?;
    let m = expect_ok("mmap", f.mmap_all())?;
    let base = m.as_ptr() as u64;
    let off = (base.next_multiple_of(PMD_SIZE) - base) as usize;
    let len = PMD_SIZE as usize;
    let mut b = [0u8; 1];
    for p in (off..off + len).step_by(PS as usize) {
        expect_ok("fault in", m.read_volatile(p, &mut b))?;
    }
    expect_ok("MADV_HUGEPAGE", m.madvise(off, len, libc::MADV_HUGEPAGE))?;
    expect_errno(
        "MADV_COLLAPSE",
        m.madvise(off, len, libc::MADV_COLLAPSE),
        Errno::EINVAL,
    )?;
    expect_ok("MADV_DONTNEED", m.madvise(off, len, libc::MADV_DONTNEED))?;
    let r = m.probe_read(off, 1).map_err(CaseFailure::SigbusProbe)?;
    ensure(r == Probe::Done(vec![0]), || {
        format!("re-read after MADV_DONTNEED: {r:?}")
    })
}

/// `MPOL_DEFAULT`, `MPOL_BIND`, `MPOL_INTERLEAVE` (include/uapi/linux/mempolicy.h).
const MPOL_DEFAULT: i32 = 0;
const MPOL_BIND: i32 = 2;
const MPOL_INTERLEAVE: i32 = 3;

/// The NUMA nodes online (`/sys/devices/system/node/online`, e.g. `0` or `0-1`).
fn online_nodes() -> Result<Vec<u32>, CaseFailure> {
    let path = "/sys/devices/system/node/online";
    let text = std::fs::read_to_string(path).map_err(|e| {
        CaseFailure::Unsupported(format!("{path} cannot be read ({e}): no NUMA support"))
    })?;
    let mut nodes = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u32, u32) = a
            .parse()
            .ok()
            .zip(b.parse().ok())
            .ok_or_else(|| format!("{path}: cannot parse {text:?}"))?;
        nodes.extend(a..=b);
    }
    Ok(nodes)
}

/// `test_mbind`: INTERLEAVE, BIND and DEFAULT round-trip through `get_mempolicy`; an invalid
/// policy (999) is EINVAL. Upstream runs it on multi-node systems only, but its assertions
/// name node 0 alone, so it runs wherever node 0 is online.
fn mbind(ctx: &Ctx) -> CaseResult {
    let nodes = online_nodes()?;
    if !nodes.contains(&0) {
        return Err(CaseFailure::Unsupported(format!(
            "NUMA node 0 is not online (online: {nodes:?})"
        )));
    }
    let f = ctx.create(4, SHARED)?;
    let m = expect_ok("mmap", f.mmap_all())?;
    let map = m.mmap();
    let node0 = 1u64;
    let ps = PS as usize;
    expect_ok(
        "mbind INTERLEAVE",
        map.mbind(0, 2 * ps, MPOL_INTERLEAVE, node0),
    )?;
    let got = expect_ok("get_mempolicy", map.mempolicy(0))?;
    ensure(got == (MPOL_INTERLEAVE, node0), || {
        format!("after INTERLEAVE on node 0: policy and mask {got:?}")
    })?;
    expect_ok("mbind BIND", map.mbind(2 * ps, 2 * ps, MPOL_BIND, node0))?;
    let got = expect_ok("get_mempolicy", map.mempolicy(2 * ps))?;
    ensure(got == (MPOL_BIND, node0), || {
        format!("after BIND on node 0: policy and mask {got:?}")
    })?;
    expect_ok("mbind DEFAULT", map.mbind(0, 4 * ps, MPOL_DEFAULT, 0))?;
    let got = expect_ok("get_mempolicy", map.mempolicy(0))?;
    ensure(got == (MPOL_DEFAULT, 0), || {
        format!("after DEFAULT: policy and mask {got:?}")
    })?;
    expect_errno(
        "mbind policy 999",
        map.mbind(0, ps, 999, node0),
        Errno::EINVAL,
    )
}

/// `test_numa_allocation`: pages bound to two nodes land there, before and after allocation,
/// and after a punch and a swapped re-bind they land on the other nodes. Needs two NUMA nodes.
fn numa_allocation(ctx: &Ctx) -> CaseResult {
    let nodes = online_nodes()?;
    let [n0, n1, ..] = nodes[..] else {
        return Err(CaseFailure::Unsupported(format!(
            "one NUMA node online ({nodes:?}, /sys/devices/system/node/online): placement on two \
             nodes cannot be checked"
        )));
    };
    let f = ctx.create(4, SHARED)?;
    let m = expect_ok("mmap", f.mmap_all())?;
    let map = m.mmap();
    let ps = PS as usize;
    let place = |first: u32, second: u32| -> CaseResult {
        expect_ok("mbind BIND", map.mbind(0, 2 * ps, MPOL_BIND, 1 << first))?;
        expect_ok(
            "mbind BIND",
            map.mbind(2 * ps, 2 * ps, MPOL_BIND, 1 << second),
        )?;
        expect_ok("allocate", f.allocate(0, 4 * PS))?;
        expect_ok("touch", m.touch_pages(0, 4 * ps, 1))?;
        for (p, want) in [(0, first), (1, first), (2, second), (3, second)] {
            let got = expect_ok("get_mempolicy(MPOL_F_NODE)", map.page_node(p * ps))?;
            ensure(got == want as i32, || {
                format!("page {p} is on node {got}, bound to node {want}")
            })?;
        }
        Ok(())
    };
    place(n0, n1)?;
    expect_ok("punch the file", f.punch_hole(0, 4 * PS))?;
    place(n1, n0)
}

/// `test_guest_memfd_guest`: the backend offers MMAP and INIT_SHARED; a one-page file bound
/// at GPA 4 GiB: the host writes 0xaa and unmaps, the guest checks 0xaa and writes 0xff, the
/// host maps the file again and reads 0xff.
fn guest_memfd_guest(ctx: &Ctx) -> CaseResult {
    let flags = ctx.backend.supported_flags();
    ensure(flags & SHARED == SHARED, || {
        format!(
            "the backend does not advertise mmap|init_shared: {}",
            flag_names(flags)
        )
    })?;
    let f = ctx.create(1, SHARED)?;
    {
        let m = expect_ok("mmap", f.mmap_all())?;
        expect_ok("host write", m.write_volatile(0, &[0xaa; PS as usize]))?;
    }
    let guest = ctx.guest.as_deref().ok_or("no guest")?;
    if let Some(vm) = guest.vm() {
        const GPA: u64 = 4 << 30;
        let slot = vm.bind(&f, GPA, 0, PS)?;
        let got = vm.guest_read_u64(GPA)?;
        vm.unbind(slot)?;
        ensure(got == super::VmAccess::Value(0xaaaa_aaaa_aaaa_aaaa), || {
            format!("vCPU load at 4 GiB: {got:?}")
        })?;
    }
    let seen = guest.read(f.as_ref(), 0, PS as usize)?;
    ensure(seen.iter().all(|&b| b == 0xaa), || {
        "the guest does not see the host's 0xaa".into()
    })?;
    guest.write(f.as_ref(), 0, &[0xff; PS as usize])?;
    let m = expect_ok("mmap again", f.mmap_all())?;
    let mut buf = vec![0u8; PS as usize];
    expect_ok("host read", m.read_volatile(0, &mut buf))?;
    ensure(buf.iter().all(|&b| b == 0xff), || {
        "the host does not read the guest's 0xff".into()
    })
}
