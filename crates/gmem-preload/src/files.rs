//! The file and memory calls on emulated files: mmap/munmap/madvise, fallocate, the calls the
//! kernel's guest_memfd refuses (read, write, lseek, ftruncate, ...), descriptor bookkeeping,
//! and page references (`vmsplice`, the emulated `gup_test`).

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::Arc;

use gmem::os::Placement;

use gmem::{Errno, GuestMemfd, MapKind, PinGuard, PAGE_SIZE};

use crate::fdtable::{self, Gmem, MapEntry, Object, Pins};
use crate::real;
use crate::trace::{self, trace};
use crate::user::{errno, set_errno};

/// The emulated file behind `fd`, if `fd` is one.
pub(crate) fn gmem_of(fd: c_int) -> Option<Arc<Gmem>> {
    match fdtable::lookup(fd) {
        Some(Object::Gmem(g)) => Some(g),
        _ => None,
    }
}

/// `mmap` of an emulated file: the file's own host mapping (private pages raise SIGBUS in
/// it), kept in the registry until the program unmaps it. With `MAP_FIXED` it goes at `addr`,
/// replacing what is there, as a VMM maps guest memory into a range it reserved;
/// `MAP_FIXED_NOREPLACE` refuses an occupied range (EEXIST). A fixed range that overlaps a
/// mapping of an emulated file is EINVAL (documented limit: that mapping would unmap it when
/// it goes). `None`: not an emulated file.
pub(crate) fn mmap(
    addr: usize,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off_t,
) -> Option<Result<*mut c_void, Errno>> {
    let g = gmem_of(fd)?;
    let result = (|| {
        let _layout = fdtable::layout();
        let kind = if matches!(
            flags & libc::MAP_TYPE,
            libc::MAP_SHARED | libc::MAP_SHARED_VALIDATE
        ) {
            MapKind::Shared
        } else {
            MapKind::Private
        };
        let offset = u64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let mapping = if flags & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE) != 0 {
            let noreplace = flags & libc::MAP_FIXED_NOREPLACE != 0;
            // The kernel's generic checks come before the overlap's answer.
            let span = gmem::os::mmap_checks(Some(addr), len, offset)?;
            if !fdtable::overlapping(&fdtable::registry(), addr, span).is_empty() {
                // Over an emulated file's mapping: the kernel's answer with NOREPLACE, the
                // documented limit without.
                return Err(if noreplace {
                    Errno(libc::EEXIST)
                } else {
                    Errno::EINVAL
                });
            }
            let at = if noreplace {
                Placement::vacant(addr, len)
            } else {
                // SAFETY: the program asked mmap(2) to replace `[addr, addr + len)`
                // (MAP_FIXED), which is what the kernel would do; none of it is an emulated
                // file's mapping (checked above), so nothing of the interposer's is replaced.
                unsafe { Placement::replacing(addr, len) }
            };
            g.file.mmap_fixed(at, offset, kind)?
        } else {
            g.file.mmap(offset, len, kind)?
        };
        let addr = mapping.as_ptr();
        if prot != libc::PROT_READ | libc::PROT_WRITE {
            // SAFETY: changes the protection of the mapping just made, which nothing else
            // references yet.
            if unsafe { libc::mprotect(addr.cast(), mapping.len(), prot) } != 0 {
                return Err(Errno::last());
            }
        }
        let mut reg = fdtable::registry();
        fdtable::add_mapping(
            &mut reg,
            MapEntry {
                mapping,
                file: g.clone(),
                unmapped: 0,
            },
        );
        Ok(addr.cast::<c_void>())
    })();
    trace!(
        "mmap(len={len:#x}, prot={prot:#x}, flags={flags:#x}, fd={fd}, offset={offset:#x}) -> {}",
        match &result {
            Ok(p) => format!("{:p}", *p),
            Err(e) => format!("MAP_FAILED {}", e.name()),
        }
    );
    Some(result)
}

/// `munmap`: the parts that are mappings of emulated files are released through the file
/// (a partial unmap leaves an inaccessible reservation until the rest goes); the rest goes to
/// the kernel.
pub(crate) fn munmap(addr: usize, len: usize) -> c_int {
    let len_pages = len.div_ceil(PAGE_SIZE as usize) * PAGE_SIZE as usize;
    if fdtable::overlapping(&fdtable::registry(), addr, len_pages).is_empty() {
        // Nothing of an emulated file's: the program's own munmap (and gmem's, from its
        // threads), without the layout lock.
        // SAFETY: the program's own munmap of memory that is not an emulated file's.
        return unsafe { real::munmap()(addr as *mut c_void, len) };
    }
    let _layout = fdtable::layout();
    let end = addr.saturating_add(len_pages);
    let mut dropped = Vec::new();
    let mut ours = Vec::new();
    {
        let mut reg = fdtable::registry();
        for start in fdtable::overlapping(&reg, addr, len_pages) {
            let Some(m) = reg.maps.get_mut(&start) else {
                continue;
            };
            let (s, e) = (start.max(addr), m.end().min(end));
            ours.push((s, e));
            if s == m.start() && e == m.end() || m.unmapped + (e - s) >= m.mapping.len() {
                dropped.extend(fdtable::remove_mapping(&mut reg, start));
            } else {
                // SAFETY: replaces part of the file's mapping with an inaccessible anonymous
                // reservation, which the program asked to unmap; the addresses stay the
                // mapping's until it is dropped as a whole.
                let p = unsafe {
                    libc::mmap(
                        s as *mut c_void,
                        e - s,
                        libc::PROT_NONE,
                        libc::MAP_PRIVATE
                            | libc::MAP_ANONYMOUS
                            | libc::MAP_FIXED
                            | libc::MAP_NORESERVE,
                        -1,
                        0,
                    )
                };
                if p != libc::MAP_FAILED {
                    m.unmapped += e - s;
                }
            }
        }
    }
    let n = dropped.len();
    drop(dropped); // unmaps, outside the registry lock
                   // The parts that are not ours.
    ours.sort_unstable();
    let mut ret = 0;
    let mut cur = addr;
    for (s, e) in ours.iter().copied().chain(std::iter::once((end, end))) {
        if s > cur {
            // SAFETY: the program's own munmap of memory that is not an emulated file's.
            ret |= unsafe { real::munmap()(cur as *mut c_void, s - cur) };
        }
        cur = cur.max(e);
    }
    trace!("munmap({addr:#x}, {len:#x}) -> {ret} ({n} emulated mappings released)");
    ret
}

/// `mremap` of a mapping of an emulated file, through the library's `HostMapping::mremap`,
/// so the guard follows it (nothing at the old address is touched afterwards). The whole
/// mapping, as it was mapped, moves or changes length; `MREMAP_MAYMOVE` and `MREMAP_FIXED`
/// are the kernel's. Documented limits, EINVAL: part of a mapping or a partly unmapped one, a
/// duplicate (old length 0), `MREMAP_DONTUNMAP`, a fixed target over another emulated
/// file's mapping. `None`: nothing of an emulated file's.
pub(crate) fn mremap(
    addr: usize,
    old_len: usize,
    new_len: usize,
    flags: c_int,
    new_addr: usize,
) -> Option<Result<*mut c_void, Errno>> {
    let span = old_len.max(1).div_ceil(PAGE_SIZE as usize) * PAGE_SIZE as usize;
    if fdtable::overlapping(&fdtable::registry(), addr, span).is_empty() {
        return None;
    }
    let result = (|| {
        let _layout = fdtable::layout();
        if flags & !(libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) != 0 || old_len == 0 {
            return Err(Errno::EINVAL);
        }
        let fixed = flags & libc::MREMAP_FIXED != 0;
        if fixed && !fdtable::overlapping(&fdtable::registry(), new_addr, new_len.max(1)).is_empty()
        {
            return Err(Errno::EINVAL);
        }
        let mut entry = {
            let mut reg = fdtable::registry();
            match reg.maps.get(&addr) {
                Some(m) if m.unmapped == 0 && m.end() - m.start() == span => {}
                _ => return Err(Errno::EINVAL),
            }
            fdtable::remove_mapping(&mut reg, addr).ok_or(Errno::EINVAL)?
        };
        let at = fixed.then(|| {
            // SAFETY: the program asked mremap(2) to replace `[new_addr, new_addr + new_len)`
            // (MREMAP_FIXED), as the kernel would; no emulated file's mapping is there
            // (checked above).
            unsafe { Placement::replacing(new_addr, new_len) }
        });
        let moved = entry
            .mapping
            .mremap(new_len, flags & libc::MREMAP_MAYMOVE != 0, at);
        let addr = entry.mapping.as_ptr();
        fdtable::add_mapping(&mut fdtable::registry(), entry);
        moved.map(|()| addr.cast::<c_void>())
    })();
    trace!(
        "mremap({addr:#x}, {old_len:#x}, {new_len:#x}, {flags:#x}) -> {}",
        match &result {
            Ok(p) => format!("{:p}", *p),
            Err(e) => format!("MAP_FAILED {}", e.name()),
        }
    );
    Some(result)
}

/// `madvise` on mappings of emulated files: `MADV_COLLAPSE` is EINVAL (no huge page may
/// expose private neighbours), `MADV_REMOVE` punches the file; everything else goes through.
pub(crate) fn madvise(addr: usize, len: usize, advice: c_int) -> Option<c_int> {
    let hits: Vec<(Arc<Gmem>, u64, u64)> = {
        let reg = fdtable::registry();
        fdtable::overlapping(&reg, addr, len)
            .into_iter()
            .filter_map(|s| reg.maps.get(&s))
            .map(|m| {
                let (s, e) = (m.start().max(addr), m.end().min(addr.saturating_add(len)));
                let off = m.mapping.file_offset() + (s - m.start()) as u64;
                (m.file.clone(), off, (e - s) as u64)
            })
            .collect()
    };
    if hits.is_empty() {
        return None;
    }
    let result = match advice {
        libc::MADV_COLLAPSE => Err(Errno::EINVAL),
        libc::MADV_REMOVE => hits
            .iter()
            .try_for_each(|(g, off, n)| g.file.punch_hole(*off, *n)),
        // A private page answers EFAULT, as the kernel's fault handler refuses it (the
        // guard's marker would say EHWPOISON).
        libc::MADV_POPULATE_READ | libc::MADV_POPULATE_WRITE => {
            // SAFETY: the program's own madvise, forwarded.
            match unsafe { real::madvise()(addr as *mut c_void, len, advice) } {
                0 => Ok(()),
                _ => match Errno::last() {
                    e if e == Errno(libc::EHWPOISON) => Err(Errno::EFAULT),
                    e => Err(e),
                },
            }
        }
        // SAFETY: the program's own madvise, forwarded.
        _ => match unsafe { real::madvise()(addr as *mut c_void, len, advice) } {
            0 => Ok(()),
            _ => Err(Errno::last()),
        },
    };
    trace!(
        "madvise({addr:#x}, {len:#x}, {advice}) -> {}",
        match result {
            Ok(()) => "0".to_string(),
            Err(e) => format!("-1 {}", e.name()),
        }
    );
    Some(match result {
        Ok(()) => 0,
        Err(e) => {
            set_errno(e.0);
            -1
        }
    })
}

/// `fallocate` on an emulated file.
pub(crate) fn fallocate(
    g: &Gmem,
    fd: c_int,
    mode: c_int,
    off: libc::off_t,
    len: libc::off_t,
) -> c_int {
    let result = match (u64::try_from(off), u64::try_from(len)) {
        (Ok(o), Ok(l)) => g.file.fallocate(mode as u32, o, l),
        _ => Err(Errno::EINVAL),
    };
    trace!(
        "fallocate({fd}, {mode:#x}, {off:#x}, {len:#x}) -> {}",
        match result {
            Ok(()) => "0".to_string(),
            Err(e) => format!("-1 {}", e.name()),
        }
    );
    match result {
        Ok(()) => 0,
        Err(e) => {
            set_errno(e.0);
            -1
        }
    }
}

/// A call the kernel's guest_memfd refuses with `e`.
pub(crate) fn refuse(call: &str, fd: c_int, e: Errno) -> isize {
    trace!("{call}({fd}) guest_memfd -> -1 {}", e.name());
    set_errno(e.0);
    -1
}

/// Long-term pins on the emulated-file pages of `[addr, addr + len)`, as GUP would take them
/// (EFAULT on a private page). Memory that is not an emulated file's is not pinned.
pub(crate) fn pin_user_range(addr: usize, len: usize) -> Result<Vec<PinGuard>, Errno> {
    let parts: Vec<(Arc<Gmem>, u64, u64)> = {
        let reg = fdtable::registry();
        fdtable::overlapping(&reg, addr, len)
            .into_iter()
            .filter_map(|s| reg.maps.get(&s))
            .map(|m| {
                let (s, e) = (m.start().max(addr), m.end().min(addr.saturating_add(len)));
                (
                    m.file.clone(),
                    m.mapping.file_offset() + (s - m.start()) as u64,
                    (e - s) as u64,
                )
            })
            .collect()
    };
    parts
        .iter()
        .map(|(g, off, n)| g.file.pin(*off, *n))
        .collect()
}

/// `vmsplice` of emulated-file pages into a pipe: the pipe holds page references (the v7
/// selftests' way to pin a page) until the descriptor written to is closed.
pub(crate) fn vmsplice_pins(fd: c_int, iov: &[libc::iovec]) {
    let mut pins = Vec::new();
    for v in iov {
        let start = (v.iov_base as usize) & !(PAGE_SIZE as usize - 1);
        let end = (v.iov_base as usize + v.iov_len).next_multiple_of(PAGE_SIZE as usize);
        if let Ok(p) = pin_user_range(start, end - start) {
            pins.extend(p);
        }
    }
    if pins.is_empty() {
        return;
    }
    trace!(
        "vmsplice({fd}) -> {} emulated page ranges referenced",
        pins.len()
    );
    match fdtable::lookup(fd) {
        Some(Object::Pipe(p)) => p.0.lock().unwrap_or_else(|e| e.into_inner()).extend(pins),
        _ => fdtable::register(
            fd,
            Object::Pipe(Arc::new(Pins(std::sync::Mutex::new(pins)))),
        ),
    }
}

/// `close`: forgets the descriptor (the object goes when its last descriptor does).
pub(crate) fn close(fd: c_int) -> c_int {
    let object = fdtable::forget(fd);
    // SAFETY: the program's own close.
    let r = unsafe { real::close()(fd) };
    let e = errno();
    if let Some(o) = &object {
        trace!("close({fd}) {} -> {}", o.kind(), trace::ret(r.into(), e));
    }
    drop(object);
    set_errno(e);
    r
}

/// After a successful `dup*`/`F_DUPFD*` from `old` to `new`.
pub(crate) fn duplicated(call: &str, old: c_int, new: c_int) {
    fdtable::duplicate(old, new);
    trace!("{call}({old}) -> {new}");
}

const GUP_TEST: &CStr = c"/sys/kernel/debug/gup_test";

/// `open` of `/sys/kernel/debug/gup_test`: an emulated one, whose pins the emulated files see.
pub(crate) fn open_gup_test(path: *const c_char, flags: c_int) -> Option<c_int> {
    if path.is_null() {
        return None;
    }
    // SAFETY: the program passed a NUL-terminated path to open.
    let p = unsafe { CStr::from_ptr(path) };
    if p != GUP_TEST {
        return None;
    }
    let cloexec = if flags & libc::O_CLOEXEC != 0 {
        libc::MFD_CLOEXEC
    } else {
        0
    };
    // SAFETY: creates a new descriptor.
    let fd = unsafe { libc::memfd_create(c"gup_test".as_ptr(), cloexec as c_uint) };
    if fd >= 0 {
        fdtable::register(fd, Object::GupTest(Arc::default()));
    }
    trace!("open(\"/sys/kernel/debug/gup_test\") -> {fd} (emulated)");
    Some(fd)
}
