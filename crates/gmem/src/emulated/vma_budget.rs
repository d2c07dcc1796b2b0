//! One VMA budget for the whole process: every hole mapping of every host mapping of every
//! emulated file draws on it, with headroom below `vm.max_map_count`.
//!
//! A hole splits the memory-file VMA it lands in, so it is charged [`VMAS_PER_HOLE`] (the hole
//! and the piece of the host mapping it cuts off). Two limits below the process total
//! (`vm.max_map_count`, read once, or the test override):
//!
//! - **soft** (total − 25%): optional holes (Poison mode prefers a hole for a long run; past
//!   the soft limit it uses poison markers, which add no VMA) and Remap-mode revocations (which
//!   then fail with ENOMEM, nothing changed);
//! - **hard** (total − 12.5%): layout changes a conversion *to shared* cannot do without
//!   (Remap mode restoring part of a hole splits it), so that private memory can be given back
//!   after the soft limit refused more private runs.
//!
//! Should the process reach the kernel's limit anyway (its other mappings are not charged),
//! a **reserve** of [`RESERVE_VMAS`] small mappings held by gmem is given up one at a time to
//! let a conversion to shared (or a rollback) complete: replacing a hole by the memory file is
//! an `mmap(MAP_FIXED)` that the kernel refuses at the limit even though it adds no VMA
//! (measured: ENOMEM). The reserve is refilled at the next conversion that finds room.
//!
//! The rest (12.5%, 8,191 VMAs at the default 65,530) is left to the rest of the process:
//! libraries, heap, thread stacks, the host mappings themselves, the transient mapping of a
//! hole rebuild, NO_DIRECT_MAP direct-map removals (not charged). The charge is an estimate
//! (kept per mapping as `VMAS_PER_HOLE` × its recorded holes): adjacent holes that the kernel
//! has not merged yet (a fresh hole is unregistered, its registered neighbour is not equal)
//! count as one, which the headroom absorbs.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::error::{Errno, KernelResult};
use crate::sys::{self, Mmap, PAGE_SIZE};

/// VMAs charged per recorded hole.
pub(super) const VMAS_PER_HOLE: usize = 2;

/// VMAs charged by every live host mapping's holes, all files together.
static USED: AtomicUsize = AtomicUsize::new(0);
/// A test override of the process total (0: none).
static LIMIT_OVERRIDE: AtomicUsize = AtomicUsize::new(0);
static MAX_MAP_COUNT: OnceLock<usize> = OnceLock::new();

/// The kernel's per-process VMA limit (`vm.max_map_count`; its default if unreadable).
fn max_map_count() -> usize {
    *MAX_MAP_COUNT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(65_530)
    })
}

/// The process's VMA budget: what the holes of all emulated files charge, and the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmaBudget {
    /// VMAs charged by the holes of every live host mapping.
    pub used: usize,
    /// Past this, revocation uses markers (Poison) or fails with ENOMEM (Remap).
    pub soft: usize,
    /// Past this, even a conversion to shared that must split a hole fails with ENOMEM.
    pub hard: usize,
    /// The process total the limits derive from (`vm.max_map_count` or the test override).
    pub total: usize,
}

/// The budget now.
pub fn process_vma_budget() -> VmaBudget {
    let total = match LIMIT_OVERRIDE.load(Ordering::Relaxed) {
        0 => max_map_count(),
        n => n,
    };
    VmaBudget {
        used: USED.load(Ordering::Relaxed),
        soft: total - total / 4,
        hard: total - total / 8,
        total,
    }
}

/// Testing hook: derive the limits from `total` VMAs instead of `vm.max_map_count` (`None`
/// restores it). Process-wide.
#[doc(hidden)]
pub fn set_process_vma_limit(total: Option<usize>) {
    LIMIT_OVERRIDE.store(total.unwrap_or(0), Ordering::Relaxed);
}

/// Whether `extra` more holes (negative: fewer) fit under the soft limit (`required`: the
/// hard one). A change that frees VMAs always fits.
pub(super) fn room(extra_holes: isize, required: bool) -> bool {
    if extra_holes <= 0 {
        return true;
    }
    let b = process_vma_budget();
    let limit = if required { b.hard } else { b.soft };
    b.used + extra_holes.unsigned_abs() * VMAS_PER_HOLE <= limit
}

/// Sets a mapping's charge to `holes` holes, updating the process total.
pub(super) fn charge(charged: &mut usize, holes: usize) {
    let now = holes * VMAS_PER_HOLE;
    if now > *charged {
        USED.fetch_add(now - *charged, Ordering::Relaxed);
    } else {
        USED.fetch_sub(*charged - now, Ordering::Relaxed);
    }
    *charged = now;
}

/// VMAs gmem holds in reserve for conversions to shared at the kernel's limit.
pub const RESERVE_VMAS: usize = 8;

/// The reserve: an empty memfd and one-page mappings of it at non-contiguous offsets (so they
/// never merge into one VMA).
struct Reserve {
    file: Option<OwnedFd>,
    maps: Vec<Mmap>,
    next_offset: u64,
}

static RESERVE: Mutex<Reserve> = Mutex::new(Reserve {
    file: None,
    maps: Vec::new(),
    next_offset: 0,
});

fn reserve() -> std::sync::MutexGuard<'static, Reserve> {
    RESERVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Tops the reserve up to [`RESERVE_VMAS`] mappings, as far as the kernel allows (cheap when
/// it is full). Best effort.
pub(super) fn refill() {
    let mut r = reserve();
    if r.maps.len() >= RESERVE_VMAS {
        return;
    }
    if r.file.is_none() {
        r.file = sys::memfd_create(c"gmem-vma-reserve").ok();
    }
    while r.maps.len() < RESERVE_VMAS {
        let Some(fd) = r.file.as_ref().map(AsFd::as_fd) else {
            return;
        };
        // Every other page of the (empty) file: never contiguous with a neighbour.
        let off = r.next_offset;
        match Mmap::new(Some(fd), off, PAGE_SIZE as usize, libc::MAP_SHARED) {
            Ok(m) => {
                r.next_offset = (off + 2 * PAGE_SIZE) % (1 << 40);
                r.maps.push(m);
            }
            Err(_) => return,
        }
    }
}

/// Runs `op`; if it fails with ENOMEM (the kernel's VMA limit), gives up reserve mappings one
/// at a time and retries, until it succeeds or the reserve is empty.
pub(super) fn with_reserve<T>(mut op: impl FnMut() -> KernelResult<T>) -> KernelResult<T> {
    loop {
        match op() {
            Err(e) if e == Errno::ENOMEM => {
                if reserve().maps.pop().is_none() {
                    return Err(e);
                }
            }
            r => return r,
        }
    }
}

/// The mappings in reserve now.
#[doc(hidden)]
pub fn reserve_vmas() -> usize {
    reserve().maps.len()
}
