//! Cases from `tools/testing/selftests/kvm/x86/guest_memfd_conversions_test.c` (docs/series.md
//! §4.2), and the validation rules of `KVM_SET_MEMORY_ATTRIBUTES2` (§2.3–§2.4).

use super::{ensure, host_read, host_rmw, host_write, Case, CaseFailure, CaseResult, Ctx, Need};
use gmem::error::{ConversionError, Errno};
use gmem::file::GuestMemfd;
use gmem::mapping::HostMapping;
use gmem::os::PAGE_SIZE;
use gmem::uapi::{
    kvm_memory_attributes2, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
};

const PS: u64 = PAGE_SIZE;
const SHARED: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
const CONV: &[Need] = &[Need::Mmap, Need::Conversion, Need::Guest];
const CONV_SHARED: &[Need] = &[Need::Mmap, Need::InitShared, Need::Conversion, Need::Guest];

pub(super) fn cases() -> Vec<Case> {
    const SRC: &str = "guest_memfd_conversions_test.c";
    const SPEC: &str = "docs/series.md §2.3-§2.4";
    vec![
        Case {
            name: "init_private",
            source: SRC,
            needs: CONV,
            run: init_private,
        },
        Case {
            name: "init_shared",
            source: SRC,
            needs: CONV_SHARED,
            run: init_shared,
        },
        Case {
            name: "indexing",
            source: SRC,
            needs: CONV_SHARED,
            run: indexing,
        },
        Case {
            name: "before_allocation_shared",
            source: SRC,
            needs: CONV_SHARED,
            run: before_allocation_shared,
        },
        Case {
            name: "before_allocation_private",
            source: SRC,
            needs: CONV,
            run: before_allocation_private,
        },
        Case {
            name: "unallocated_folios",
            source: SRC,
            needs: CONV_SHARED,
            run: unallocated_folios,
        },
        Case {
            name: "truncate",
            source: SRC,
            needs: CONV_SHARED,
            run: truncate,
        },
        Case {
            name: "elevated_refcount",
            source: SRC,
            needs: CONV_SHARED,
            run: elevated_refcount,
        },
        Case {
            name: "forked_accesses",
            source: SRC,
            needs: &[
                Need::Mmap,
                Need::InitShared,
                Need::Conversion,
                Need::Guest,
                Need::CrossProcess,
            ],
            run: forked_accesses,
        },
        Case {
            name: "set_attributes_invalid",
            source: SPEC,
            needs: &[Need::Conversion],
            run: set_attributes_invalid,
        },
        Case {
            name: "early_return",
            source: SPEC,
            needs: CONV_SHARED,
            run: early_return,
        },
    ]
}

/// One file with its host mapping.
struct Fixture<'a> {
    ctx: &'a Ctx,
    f: std::sync::Arc<dyn GuestMemfd>,
    m: HostMapping,
}

impl<'a> Fixture<'a> {
    fn new(ctx: &'a Ctx, npages: u64, flags: u64) -> Result<Self, CaseFailure> {
        let f = ctx.create(npages, flags)?;
        let m = f.mmap_all().map_err(CaseFailure::call("mmap"))?;
        Ok(Fixture { ctx, f, m })
    }

    /// Host write → SIGBUS; guest reads `s`, writes `w`; host read → SIGBUS.
    fn test_private(&self, p: u64, s: u8, w: u8) -> CaseResult {
        ensure(!host_write(&self.m, p, 0xfe)?, || {
            format!("host write to private page {p} did not SIGBUS")
        })?;
        self.ctx.guest_rmw(&*self.f, p, s, w)?;
        let r = host_read(&self.m, p)?;
        ensure(r.is_none(), || {
            format!("host read of private page {p} did not SIGBUS (read {r:?})")
        })
    }

    fn convert_to_private(&self, p: u64, s: u8, w: u8) -> CaseResult {
        self.f
            .set_private(p * PS, PS)
            .map_err(|e| format!("convert page {p} to private: {e}"))?;
        self.test_private(p, s, w)
    }

    /// Host reads `s`, writes `hw`; guest reads `hw`, writes `w`; host reads `w`.
    fn test_shared(&self, p: u64, s: u8, hw: u8, w: u8) -> CaseResult {
        host_rmw(&self.m, p, s, hw)?;
        self.ctx.guest_rmw(&*self.f, p, hw, w)?;
        let r = host_read(&self.m, p)?;
        ensure(r == Some(w), || {
            format!("host read of shared page {p}: expected {w:#x}, got {r:?}")
        })
    }

    fn convert_to_shared(&self, p: u64, s: u8, hw: u8, w: u8) -> CaseResult {
        self.f
            .set_shared(p * PS, PS)
            .map_err(|e| format!("convert page {p} to shared: {e}"))?;
        self.test_shared(p, s, hw, w)
    }
}

fn init_private(ctx: &Ctx) -> CaseResult {
    let t = Fixture::new(ctx, 1, GUEST_MEMFD_FLAG_MMAP)?;
    t.test_private(0, 0, b'A')?;
    t.convert_to_shared(0, b'A', b'B', b'C')?;
    t.convert_to_private(0, b'C', b'E')
}

fn init_shared(ctx: &Ctx) -> CaseResult {
    let t = Fixture::new(ctx, 1, SHARED)?;
    t.test_shared(0, 0, b'A', b'B')?;
    t.convert_to_private(0, b'B', b'C')?;
    t.convert_to_shared(0, b'C', b'D', b'E')
}

fn v(i: u64, n: u8) -> u8 {
    // i < 4: fits in the high nibble.
    #[allow(clippy::cast_possible_truncation)]
    let hi = (i as u8) << 4;
    hi + n
}

fn indexing(ctx: &Ctx) -> CaseResult {
    const N: u64 = 4;
    for test_page in 0..N {
        let t = Fixture::new(ctx, N, SHARED)?;
        for i in (0..N).rev() {
            t.test_shared(i, 0, v(i, 0), v(i, 2))?;
        }
        t.convert_to_private(test_page, v(test_page, 2), v(test_page, 3))?;
        for i in 0..N {
            if i == test_page {
                t.test_private(i, v(i, 3), v(i, 4))?;
            } else {
                t.test_shared(i, v(i, 2), v(i, 3), v(i, 4))?;
            }
        }
        t.convert_to_shared(test_page, v(test_page, 4), v(test_page, 5), v(test_page, 6))?;
        for i in 0..N {
            let s = if i == test_page { v(i, 6) } else { v(i, 4) };
            t.test_shared(i, s, v(i, 7), v(i, 8))?;
        }
    }
    Ok(())
}

fn before_allocation_shared(ctx: &Ctx) -> CaseResult {
    let t = Fixture::new(ctx, 1, SHARED)?;
    t.convert_to_private(0, 0, b'A')
}

fn before_allocation_private(ctx: &Ctx) -> CaseResult {
    let t = Fixture::new(ctx, 1, GUEST_MEMFD_FLAG_MMAP)?;
    t.convert_to_shared(0, 0, b'A', b'B')
}

fn unallocated_folios(ctx: &Ctx) -> CaseResult {
    const N: u64 = 8;
    const SECOND: u64 = 4;
    for test_page in 0..N {
        let t = Fixture::new(ctx, N, SHARED)?;
        host_rmw(&t.m, test_page, 0, b'A')?;
        if test_page != SECOND {
            host_rmw(&t.m, SECOND, 0, b'A')?;
        }
        t.f.set_private(0, N * PS).map_err(|e| {
            format!("bulk private over a mix of allocated and unallocated pages: {e}")
        })?;
        for i in 0..N {
            let s = if i == test_page || i == SECOND {
                b'A'
            } else {
                0
            };
            t.test_private(i, s, b'B')?;
        }
        for i in 0..N {
            t.convert_to_shared(i, b'B', b'C', b'D')?;
        }
    }
    Ok(())
}

fn truncate(ctx: &Ctx) -> CaseResult {
    let t = Fixture::new(ctx, 1, SHARED)?;
    host_rmw(&t.m, 0, 0, b'A')?;
    t.f.punch_hole(0, PS).map_err(CaseFailure::call("punch"))?;
    host_rmw(&t.m, 0, 0, b'A')?;
    t.convert_to_private(0, b'A', b'B')?;
    t.f.punch_hole(0, PS).map_err(CaseFailure::call("punch"))?;
    t.test_private(0, 0, b'A')
}

fn elevated_refcount(ctx: &Ctx) -> CaseResult {
    const N: u64 = 4;
    for test_page in 0..N {
        let t = Fixture::new(ctx, N, SHARED)?;
        let pin =
            t.f.pin(test_page * PS, PS)
                .map_err(|e| format!("pin page {test_page}: {e}"))?;
        for i in 0..N {
            t.test_shared(i, 0, b'A', b'B')?;
        }
        let mut a = kvm_memory_attributes2::new(0, N * PS, KVM_MEMORY_ATTRIBUTE_PRIVATE);
        a.error_offset = test_page * PS + 1;
        let r = t.f.set_attributes(&mut a);
        ensure(r == Err(Errno::EAGAIN), || {
            format!("bulk private with page {test_page} pinned: expected EAGAIN, got {r:?}")
        })?;
        ensure(a.error_offset == test_page * PS, || {
            format!(
                "error_offset {:#x}, expected {:#x}",
                a.error_offset,
                test_page * PS
            )
        })?;
        for i in 0..N {
            if i == test_page {
                let mut a = kvm_memory_attributes2::new(i * PS, PS, KVM_MEMORY_ATTRIBUTE_PRIVATE);
                // A sentinel no answer can hold, so an error_offset never written is caught
                // (for page 0 it would otherwise read as the right answer, 0).
                a.error_offset = i * PS + 1;
                let r = t.f.set_attributes(&mut a);
                ensure(r == Err(Errno::EAGAIN) && a.error_offset == i * PS, || {
                    format!("single-page private of the pinned page: expected EAGAIN at {:#x}, got {r:?} at {:#x}", i * PS, a.error_offset)
                })?;
                // A failed conversion changes nothing: still shared for the host.
                let still = host_read(&t.m, i)?;
                ensure(still == Some(b'B'), || {
                    format!("pinned page after failed conversion: {still:?}")
                })?;
            } else {
                t.convert_to_private(i, b'B', b'C')?;
            }
        }
        drop(pin);
        t.f.set_private(0, N * PS)
            .map_err(|e| format!("bulk private after unpin: {e}"))?;
        for i in 0..N {
            t.test_private(i, if i == test_page { b'B' } else { b'C' }, b'D')?;
        }
    }
    Ok(())
}

/// Conversion revokes the page in a forked child's copy of the mapping too. The child only
/// makes raw memory accesses and system calls (it is forked from a multi-threaded process);
/// the SIGBUS handler is installed in the child alone.
fn forked_accesses(ctx: &Ctx) -> CaseResult {
    let t = Fixture::new(ctx, 1, SHARED)?;
    t.test_shared(0, 0, 0xA, 0xB)?;
    let (to_child, from_child) = (pipe()?, pipe()?);
    let addr = t.m.as_ptr();
    // SAFETY: fork(2); the child below only touches raw memory and makes system calls.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(CaseFailure::call("fork")(Errno::last()));
    }
    if pid == 0 {
        // SAFETY: child side: `addr` is mapped in the child (inherited MAP_SHARED mapping);
        // the handler and the calls are async-signal-safe.
        unsafe { forked_child(addr, to_child[0], from_child[1]) }
    }
    // The child's ends: closed here, so a child that dies is an end of file, not a wait.
    // SAFETY: closes our own copies of the child's pipe ends, once.
    unsafe {
        libc::close(to_child[0]);
        libc::close(from_child[1]);
    }
    let result = (|| {
        wait_byte(from_child[0])?; // the child wrote 0xC
        t.convert_to_private(0, 0xC, 0xD)?;
        send_byte(to_child[1])?;
        let mut status = 0;
        // SAFETY: reaps our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        ensure(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            || {
                format!("child: read and write of the converted page must both SIGBUS (status {status:#x})")
            },
        )
    })();
    for fd in [to_child[1], from_child[0]] {
        // SAFETY: closes our own pipe ends once.
        unsafe { libc::close(fd) };
    }
    result
}

fn pipe() -> Result<[libc::c_int; 2], CaseFailure> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two descriptors.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(CaseFailure::call("pipe")(Errno::last()));
    }
    Ok(fds)
}

fn send_byte(fd: libc::c_int) -> CaseResult {
    // SAFETY: writes one byte from a valid buffer.
    if unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) } != 1 {
        return Err(CaseFailure::call("pipe write")(Errno::last()));
    }
    Ok(())
}

fn wait_byte(fd: libc::c_int) -> CaseResult {
    let mut b = [0u8];
    // SAFETY: reads one byte into a valid buffer.
    if unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) } != 1 {
        return Err("the forked child died before reporting".into());
    }
    Ok(())
}

/// SIGBUS handler of the grandchildren in `forked_child`: exit status 3 means "faulted".
extern "C" fn forked_sigbus(_: libc::c_int) {
    // SAFETY: _exit(2) is async-signal-safe.
    unsafe { libc::_exit(3) };
}

/// The child of `forked_accesses`: host_rmw(0, 0xB, 0xC), report, wait, then a read and a
/// write of the page must each raise SIGBUS. Each faulting access runs in a grandchild so
/// that the SIGBUS ends only that process. Exits 0 on success.
///
/// # Safety
/// Call only in a freshly forked child; `addr` must be the inherited mapping of the page.
unsafe fn forked_child(addr: *mut u8, from_parent: libc::c_int, to_parent: libc::c_int) -> ! {
    // SAFETY: raw accesses to the inherited shared mapping; system calls only.
    unsafe {
        if addr.read_volatile() != 0xB {
            libc::_exit(10);
        }
        addr.write_volatile(0xC);
        if libc::write(to_parent, [1u8].as_ptr().cast(), 1) != 1 {
            libc::_exit(11);
        }
        let mut b = [0u8];
        if libc::read(from_parent, b.as_mut_ptr().cast(), 1) != 1 {
            libc::_exit(12);
        }
        for write in [false, true] {
            let pid = libc::fork();
            if pid == 0 {
                libc::signal(
                    libc::SIGBUS,
                    forked_sigbus as *const () as libc::sighandler_t,
                );
                if write {
                    addr.write_volatile(0xEE);
                } else {
                    let _ = addr.read_volatile();
                }
                libc::_exit(0);
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 3) {
                libc::_exit(if write { 21 } else { 20 });
            }
        }
        libc::_exit(0)
    }
}

/// §2.3: every invalid request is EINVAL, leaves `error_offset` alone and changes nothing.
fn set_attributes_invalid(ctx: &Ctx) -> CaseResult {
    let f = ctx.create(4, ctx.backend.supported_flags() & SHARED)?;
    let size = f.size();
    let before = f.attribute_runs(0, size).map_err(|e| e.to_string())?;
    let private = KVM_MEMORY_ATTRIBUTE_PRIVATE;
    let mut bad: Vec<(&str, kvm_memory_attributes2)> = vec![
        (
            "flags != 0",
            kvm_memory_attributes2 {
                flags: 1,
                ..kvm_memory_attributes2::new(0, PS, private)
            },
        ),
        (
            "attributes with an unknown bit",
            kvm_memory_attributes2::new(0, PS, private | 1),
        ),
        ("attributes bit 0", kvm_memory_attributes2::new(0, PS, 1)),
        ("size 0", kvm_memory_attributes2::new(0, 0, private)),
        (
            "offset + size wraps",
            kvm_memory_attributes2::new(PS, u64::MAX - PS + 2, private),
        ),
        (
            "unaligned offset",
            kvm_memory_attributes2::new(1, PS, private),
        ),
        (
            "unaligned size",
            kvm_memory_attributes2::new(0, PS + 1, private),
        ),
        (
            "offset at the size",
            kvm_memory_attributes2::new(size, PS, private),
        ),
        (
            "offset + size past the size",
            kvm_memory_attributes2::new(PS, size, private),
        ),
    ];
    for i in 0..11 {
        let mut a = kvm_memory_attributes2::new(0, PS, private);
        a.reserved[i] = 1;
        bad.push(("reserved != 0", a));
    }
    for (what, mut a) in bad {
        a.error_offset = 0x1234;
        let r = f.set_attributes(&mut a);
        ensure(r == Err(Errno::EINVAL), || {
            format!("{what}: expected EINVAL, got {r:?}")
        })?;
        ensure(a.error_offset == 0x1234, || {
            format!("{what}: error_offset was written ({:#x})", a.error_offset)
        })?;
    }
    // error_offset is not checked on input.
    let mut a = kvm_memory_attributes2::new(0, PS, private);
    a.error_offset = 77;
    let r = f.set_attributes(&mut a);
    ensure(r.is_ok(), || {
        format!("a non-zero error_offset on input must be ignored, got {r:?}")
    })?;
    f.set_attributes(&mut kvm_memory_attributes2::new(0, PS, before[0].2))
        .map_err(|e| format!("restore: {e}"))?;
    let after = f.attribute_runs(0, size).map_err(|e| e.to_string())?;
    ensure(after == before, || {
        format!("attributes changed: {before:?} -> {after:?}")
    })
}

/// §2.4 step 1: a range that already has the attributes returns 0 at once, before the safety
/// check (so even a pinned page does not fail it); a partly matching range goes through the
/// whole algorithm, including the safety check.
fn early_return(ctx: &Ctx) -> CaseResult {
    let t = Fixture::new(ctx, 2, SHARED)?;
    let pin = t.f.pin(0, PS).map_err(|e| format!("pin: {e}"))?;
    t.f.set_shared(0, 2 * PS)
        .map_err(|e| format!("to shared on an all-shared, pinned range: {e}"))?;
    t.f.set_private(PS, PS)
        .map_err(|e| format!("page 1 to private: {e}"))?;
    t.f.set_private(PS, PS)
        .map_err(|e| format!("page 1 to private again (already private): {e}"))?;
    let r = t.f.set_private(0, 2 * PS);
    ensure(
        matches!(r, Err(ConversionError { errno: Errno::EAGAIN, error_offset: eo }) if eo == 0),
        || format!("partly private range with pinned page 0: expected EAGAIN at 0, got {r:?}"),
    )?;
    drop(pin);
    Ok(())
}
