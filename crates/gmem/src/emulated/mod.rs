//! The emulated guest_memfd: in-place shared/private conversion on any Linux.
//!
//! Memory is one sparse memfd. The attributes belong to the file ([`AttributeStore`]), so
//! they survive punch-hole and outlive any mapping. Host mappings are `MAP_SHARED` views of
//! the memfd in which private pages are *revoked*: any access raises a real SIGBUS, delivered by
//! the kernel, with no signal handler installed by gmem. Two revocation mechanisms exist (see
//! DESIGN.md for the measurements that chose between them):
//!
//! - [`Revocation::Poison`] (default): every mapping is registered with the file's userfaultfd
//!   in write-protect mode, which produces no missing/minor events (so there is no service
//!   thread and a fresh or re-shared page faults in like any shmem page). NO_DIRECT_MAP files
//!   are the exception: their mappings are also registered in missing + minor mode and one
//!   service thread per file hands each host-faulted page out (`FaultService`). To-private
//!   zaps the PTEs (`MADV_DONTNEED`) and installs `UFFDIO_POISON` markers; to-shared zaps the
//!   markers (`MADV_DONTNEED`). Markers survive punch-hole and split no VMA, so the worst-case
//!   alternating pattern over 1 GiB costs no `vm.max_map_count` entries.
//! - [`Revocation::Remap`] (fallback when userfaultfd is unavailable): private runs are
//!   replaced by `MAP_FIXED` mappings of an empty memfd (an access past its end is SIGBUS) and
//!   re-mapped to the memory file when shared. One VMA per run, so bounded by
//!   `vm.max_map_count`.
//!
//! The guest's view is an internal full mapping of the memfd that sees private and shared pages
//! alike; it is reachable only inside the crate (memslots, the conformance suite's guest).
//!
//! Locking: [`State`] sits behind one `RwLock`, the kernel's invalidate lock. Conversion and
//! punch-hole take it exclusively; safe accessors, guest accesses and pins take it shared.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use crate::attributes::{check_host_access, pages_of, AttributeStore};
use crate::error::{AccessError, Errno, KernelResult};
use crate::file::{BackendKind, GuestMemfd, GuestMemfdBackend, GuestMemfdStat, PinGuard};
use crate::mapping::{HostMapping, MapKind, MappingRegistry};
use crate::platform::{
    HookCall, HookSet, LaunchMeasurement, PageRef, PageType, Platform, PlatformKind,
    PlatformReport, PAGE,
};
use crate::sys::{self, EventFd, Mmap, PoisonError, PoisonFd, PAGE_SIZE};
use crate::uapi::{
    flag_names, kvm_memory_attributes2, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
};

/// The flags the emulated backend accepts on every platform.
pub const EMULATED_SUPPORTED_FLAGS: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

/// The flags the emulated backend accepts for files of `platform`: NO_DIRECT_MAP only where
/// the platform offers it (kernel-spec §3.1).
pub fn supported_flags(platform: PlatformKind) -> u64 {
    if platform.supports_no_direct_map() {
        EMULATED_SUPPORTED_FLAGS | GUEST_MEMFD_FLAG_NO_DIRECT_MAP
    } else {
        EMULATED_SUPPORTED_FLAGS
    }
}

/// How private pages are made inaccessible in host mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Revocation {
    /// Poison markers if userfaultfd is available, else remapping.
    #[default]
    Auto,
    /// userfaultfd (write-protect registration) + `UFFDIO_POISON`.
    Poison,
    /// `MAP_FIXED` of an empty memfd over private runs.
    Remap,
}

impl Revocation {
    /// The mechanism's name.
    pub fn name(self) -> &'static str {
        match self {
            Revocation::Auto => "auto",
            Revocation::Poison => "poison",
            Revocation::Remap => "remap",
        }
    }
}

/// Options of the emulated backend.
#[derive(Debug, Clone, Copy)]
pub struct EmulatedOptions {
    /// Revocation mechanism for private pages in host mappings.
    pub revocation: Revocation,
    /// With [`Revocation::Poison`]: private runs of at least this many bytes are revoked by
    /// a hole mapping (one VMA, constant cost) instead of per-page markers (~0.1 µs a page).
    /// `u64::MAX` disables holes.
    pub hole_min_bytes: u64,
    /// With [`Revocation::Poison`]: the most hole mappings one host mapping may hold; past
    /// it, further private runs get markers. Holes are never split (a partial restore
    /// rebuilds the hole as markers), so a mapping never has more hole VMAs than this.
    pub hole_budget: usize,
    /// The platform model under the file (hooks, content rules, NO_DIRECT_MAP support).
    pub platform: PlatformKind,
}

impl Default for EmulatedOptions {
    fn default() -> Self {
        EmulatedOptions {
            revocation: Revocation::Auto,
            hole_min_bytes: DEFAULT_HOLE_MIN_BYTES,
            hole_budget: DEFAULT_HOLE_BUDGET,
            platform: PlatformKind::SoftwareProtected,
        }
    }
}

/// Default [`EmulatedOptions::hole_min_bytes`]: where a hole mapping becomes cheaper than
/// markers (measured; DESIGN.md).
pub const DEFAULT_HOLE_MIN_BYTES: u64 = 128 * 1024;
/// Default [`EmulatedOptions::hole_budget`].
pub const DEFAULT_HOLE_BUDGET: usize = 1024;

impl EmulatedOptions {
    /// Default options with this revocation mechanism.
    pub fn with_revocation(revocation: Revocation) -> Self {
        EmulatedOptions {
            revocation,
            ..Self::default()
        }
    }

    /// Default options on this platform.
    pub fn with_platform(platform: PlatformKind) -> Self {
        EmulatedOptions {
            platform,
            ..Self::default()
        }
    }
}

/// The emulated backend: creates [`EmulatedGuestMemfd`] files.
#[derive(Debug, Clone, Default)]
pub struct EmulatedBackend {
    options: EmulatedOptions,
}

impl EmulatedBackend {
    /// A backend with these options.
    pub fn new(options: EmulatedOptions) -> Self {
        EmulatedBackend { options }
    }
}

impl GuestMemfdBackend for EmulatedBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Emulated
    }

    fn supported_flags(&self) -> u64 {
        supported_flags(self.options.platform)
    }

    fn conversion_support(&self) -> Result<(), crate::error::ConversionUnsupported> {
        Ok(())
    }

    fn create(&self, size: u64, flags: u64) -> KernelResult<Arc<dyn GuestMemfd>> {
        Ok(Arc::new(EmulatedGuestMemfd::create_with(
            size,
            flags,
            self.options,
        )?))
    }
}

enum Mechanism {
    Poison(PoisonFd),
    Remap,
}

#[derive(Debug)]
struct MappingEntry {
    id: u64,
    addr: usize,
    len: usize,
    file_offset: u64,
    /// File ranges `[start, end)` currently replaced by the hole file (coalesced; adjacent
    /// holes are one VMA because the hole file is mapped at the same offset).
    holes: BTreeMap<u64, u64>,
    /// Whether the last optimistic revocation in this mapping found present PTEs: if so,
    /// the next ones zap before poisoning instead of trying the marker first. A zap-first
    /// revocation cannot tell whether PTEs were there, so every 8th one is optimistic again
    /// to re-learn. A wrong guess costs one extra system call.
    expect_populated: bool,
    /// Zap-first revocations since the last optimistic one.
    zap_first_streak: u8,
}

impl MappingEntry {
    /// The part of file range `[start, end)` this mapping covers, as (address, length).
    fn window(&self, start: u64, end: u64) -> Option<(*mut u8, usize)> {
        let m_end = self.file_offset + self.len as u64;
        let (s, e) = (start.max(self.file_offset), end.min(m_end));
        if s >= e {
            return None;
        }
        // Both differences are below `self.len`, a usize.
        #[allow(clippy::cast_possible_truncation)]
        let (off, len) = ((s - self.file_offset) as usize, (e - s) as usize);
        Some(((self.addr + off) as *mut u8, len))
    }

    /// The hole pieces overlapping `[start, end)`, clipped to it.
    fn holes_in(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        self.holes
            .range(..end)
            .filter(|(_, &e)| e > start)
            .map(|(&s, &e)| (s.max(start), e.min(end)))
            .collect()
    }

    /// Records `[start, end)` as a hole, merging neighbours.
    fn add_hole(&mut self, mut start: u64, mut end: u64) {
        let overlapping: Vec<(u64, u64)> = self
            .holes
            .range(..=end)
            .filter(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in overlapping {
            self.holes.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.holes.insert(start, end);
    }

    /// Forgets `[start, end)` as a hole, splitting entries.
    fn remove_hole(&mut self, start: u64, end: u64) {
        for (s, e) in self.holes_in(start, end) {
            let (full_s, full_e) = self
                .holes
                .range(..=s)
                .next_back()
                .map_or((s, e), |(&a, &b)| (a, b));
            self.holes.remove(&full_s);
            if full_s < s {
                self.holes.insert(full_s, s);
            }
            if e < full_e {
                self.holes.insert(e, full_e);
            }
        }
    }
}

struct State {
    attrs: AttributeStore,
    mappings: Vec<MappingEntry>,
}

/// Pins: id → page ranges still attached to the file (punch-hole detaches pages).
type Pins = BTreeMap<u64, Vec<(u64, u64)>>;

struct Inner {
    memfd: OwnedFd,
    /// The empty file whose mappings stand in for private runs.
    hole: OwnedFd,
    size: u64,
    flags: u64,
    ino: u64,
    mechanism: Mechanism,
    options: EmulatedOptions,
    state: RwLock<State>,
    pins: Mutex<Pins>,
    next_id: AtomicI64,
    guest_view: OnceLock<Result<Mmap, Errno>>,
    /// Fault injection: the number of mapping operations that may still succeed (< 0: off).
    fail_after: AtomicI64,
    /// The platform model and the hooks it implements.
    platform: Box<dyn Platform>,
    hooks: HookSet,
    /// Per-page bits (up to date, removed from the direct map). Taken after `state`.
    pages: Mutex<PageBits>,
    /// gmem's own view of the file (the "direct map"): zeroing, populate copies and the hooks'
    /// [`PageRef`]s go through it; with NO_DIRECT_MAP, handed-out pages are removed from it.
    direct_map: OnceLock<Result<Mmap, Errno>>,
    /// Hook calls, when recording ([`EmulatedGuestMemfd::record_hooks`]).
    hook_log: OnceLock<Arc<Mutex<Vec<HookCall>>>>,
    /// NO_DIRECT_MAP files only: the thread that serves host-mapping faults (hand-out).
    faults: OnceLock<FaultService>,
}

/// A host mapping as the fault service sees it: (id, address, length, file offset).
type MapWindow = (u64, usize, usize, u64);

/// The host-fault service of a NO_DIRECT_MAP file: its host mappings are registered with the
/// file's userfaultfd in missing + minor (+ write-protect) mode, so every host fault on a page
/// without a PTE is an event; one thread per file reads them and runs the host hand-out
/// (zero if not up to date, remove from the direct map, mark) before mapping the page
/// (`UFFDIO_CONTINUE`). A failed removal installs a poison marker instead: the faulting access
/// raises SIGBUS and nothing is marked. Private pages carry markers or holes, which raise
/// SIGBUS with no event. The thread holds only a `Weak` on the file and is stopped (eventfd)
/// and joined when the file is dropped.
struct FaultService {
    /// The userfaultfd the mappings are registered with (a `dup` of the mechanism's).
    uffd: PoisonFd,
    /// Host mappings of the file. A separate small lock (not `state`), so serving a fault
    /// never waits for a conversion or punch-hole, nor for a thread that holds `state` while
    /// it faults on a host mapping.
    maps: Mutex<Vec<MapWindow>>,
    /// (page, mapping id) of poison markers left by failed hand-outs on shared pages: zapped
    /// by punch-hole and dropped by conversion (which zaps or re-poisons them itself).
    sigbus: Mutex<BTreeSet<(u64, u64)>>,
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultService {
    fn start(file: Weak<Inner>, uffd: PoisonFd) -> KernelResult<FaultService> {
        let stop = Arc::new(EventFd::new()?);
        let events = uffd.try_clone()?;
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("gmem-faults".into())
            .spawn(move || serve_faults(&file, &events, &stop2))
            .map_err(|_| Errno::EAGAIN)?;
        Ok(FaultService {
            uffd,
            maps: Mutex::new(Vec::new()),
            sigbus: Mutex::new(BTreeSet::new()),
            stop,
            thread: Some(thread),
        })
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Vec<MapWindow>> {
        self.maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn sigbus(&self) -> std::sync::MutexGuard<'_, BTreeSet<(u64, u64)>> {
        self.sigbus
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The mapping holding `addr` and the file offset of its page.
    fn lookup(&self, addr: u64) -> Option<(u64, u64)> {
        self.maps().iter().find_map(|&(id, start, len, off)| {
            let a = usize::try_from(addr).ok()?;
            (a >= start && a < start + len).then(|| (id, off + (a - start) as u64))
        })
    }

    /// Forgets the failure markers of pages `[first, end)`, returning them.
    fn take_sigbus(&self, first: u64, end: u64) -> Vec<(u64, u64)> {
        let mut set = self.sigbus();
        let taken: Vec<(u64, u64)> = set.range((first, 0)..(end, 0)).copied().collect();
        for k in &taken {
            set.remove(k);
        }
        taken
    }
}

impl Drop for FaultService {
    fn drop(&mut self) {
        let _ = self.stop.signal();
        if let Some(t) = self.thread.take() {
            // The service thread itself may drop the last handle on the file: it then leaves
            // its loop at the next poll (the eventfd is readable) instead of joining itself.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// The service thread: waits for fault events or the stop signal (no timeout, no busy loop).
fn serve_faults(file: &Weak<Inner>, uffd: &PoisonFd, stop: &EventFd) {
    loop {
        let Ok((events, stopped)) = sys::poll_two(uffd.as_fd(), stop.as_fd()) else {
            return;
        };
        if stopped {
            return;
        }
        if !events {
            continue;
        }
        loop {
            match uffd.read_fault() {
                Ok(Some(ev)) => {
                    let page = ev.address & !(PAGE_SIZE - 1);
                    match file.upgrade() {
                        Some(inner) => inner.serve_fault(uffd, page),
                        None => {
                            let _ = uffd.wake(page, PAGE_SIZE);
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

/// A sparse set of page indices (64-page words; only non-empty words are stored), so a
/// sparse 1 TiB file costs nothing.
#[derive(Debug, Default)]
struct PageSet {
    words: BTreeMap<u64, u64>,
}

impl PageSet {
    fn contains(&self, page: u64) -> bool {
        self.words
            .get(&(page / 64))
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    fn insert(&mut self, page: u64) {
        *self.words.entry(page / 64).or_insert(0) |= 1 << (page % 64);
    }

    /// Removes and returns the members of `[first, end)`.
    fn take_range(&mut self, first: u64, end: u64) -> Vec<u64> {
        let mut out = Vec::new();
        if first >= end {
            return out;
        }
        let keys: Vec<u64> = self
            .words
            .range(first / 64..=(end - 1) / 64)
            .map(|(&k, _)| k)
            .collect();
        for k in keys {
            let Some(w) = self.words.get_mut(&k) else {
                continue;
            };
            for bit in 0..64 {
                let p = k * 64 + bit;
                if p >= first && p < end && *w & (1 << bit) != 0 {
                    *w &= !(1 << bit);
                    out.push(p);
                }
            }
            if *w == 0 {
                self.words.remove(&k);
            }
        }
        out
    }
}

#[derive(Debug, Default)]
struct PageBits {
    /// Zeroed once (or known to hold zero-filled or host-written data); cleared by punch-hole.
    uptodate: PageSet,
    /// Removed from the direct map (NO_DIRECT_MAP); set only after the removal succeeded.
    removed: PageSet,
}

/// One emulated guest_memfd file. Cloning gives another handle to the same file.
#[derive(Clone)]
pub struct EmulatedGuestMemfd {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmulatedGuestMemfd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatedGuestMemfd")
            .field("size", &self.inner.size)
            .field("flags", &flag_names(self.inner.flags))
            .field("revocation", &self.revocation())
            .finish()
    }
}

/// `UFFDIO_POISON` over a range that may span several VMAs (one call must stay inside one
/// VMA, else ENOENT; adjacent VMAs of the memory file do not always merge after remaps):
/// halves the range at each ENOENT, so a boundary costs O(log n) calls.
fn poison_split(uffd: &PoisonFd, addr: *mut u8, len: usize) -> Result<(), PoisonError> {
    match uffd.poison(addr, len) {
        Err(PoisonError::Failed(Errno::ENOENT)) if len > PAGE_SIZE as usize => {
            let half = (len / 2) & !(PAGE_SIZE as usize - 1);
            let half = half.max(PAGE_SIZE as usize);
            poison_split(uffd, addr, half)?;
            // SAFETY: `half < len`: still inside the caller's range.
            let rest = unsafe { addr.add(half) };
            poison_split(uffd, rest, len - half).map_err(|e| match e {
                PoisonError::Exists { done } => PoisonError::Exists {
                    done: done + half as u64,
                },
                other => other,
            })
        }
        other => other,
    }
}

impl EmulatedGuestMemfd {
    /// `KVM_CREATE_GUEST_MEMFD(size, flags)` with default options.
    pub fn create(size: u64, flags: u64) -> KernelResult<Self> {
        Self::create_with(size, flags, EmulatedOptions::default())
    }

    /// `KVM_CREATE_GUEST_MEMFD(size, flags)`: EINVAL for a zero, unaligned or negative size
    /// and for any flag outside [`supported_flags`] of the options' platform.
    pub fn create_with(size: u64, flags: u64, options: EmulatedOptions) -> KernelResult<Self> {
        if flags & !supported_flags(options.platform) != 0 {
            return Err(Errno::EINVAL);
        }
        if size == 0 || size % PAGE_SIZE != 0 || i64::try_from(size).is_err() {
            return Err(Errno::EINVAL);
        }
        let memfd = sys::memfd_create(c"gmem")?;
        sys::ftruncate(memfd.as_fd(), size).map_err(|e| {
            if e == Errno(libc::EFBIG) {
                Errno::EINVAL
            } else {
                e
            }
        })?;
        let ino = sys::fstat(memfd.as_fd())?.st_ino;
        // NO_DIRECT_MAP: the userfaultfd also delivers missing and minor faults, served by
        // the file's fault service (host-fault hand-out); other files have no service thread.
        let no_direct_map = flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP != 0;
        let open_uffd = || {
            if no_direct_map {
                PoisonFd::with_fault_events()
            } else {
                PoisonFd::new()
            }
        };
        let mechanism = match options.revocation {
            Revocation::Poison => Mechanism::Poison(open_uffd()?),
            Revocation::Remap => Mechanism::Remap,
            Revocation::Auto => open_uffd().map_or(Mechanism::Remap, Mechanism::Poison),
        };
        let fault_uffd = match (&mechanism, no_direct_map) {
            (_, false) => None,
            (Mechanism::Poison(uffd), true) => Some(uffd.try_clone()?),
            // Without userfaultfd at all, host-mapping faults stay unseen (see DESIGN.md).
            (Mechanism::Remap, true) => PoisonFd::with_fault_events().ok(),
        };
        // An empty file: every access to a mapping of it is past its end, i.e. SIGBUS.
        let hole = sys::memfd_create(c"gmem-hole")?;
        let private = flags & GUEST_MEMFD_FLAG_INIT_SHARED == 0;
        // A per-VM key for models that encrypt (SNP); only needs to differ between files.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let vm_key = ino.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ u64::from(std::process::id()) << 32
            ^ u64::from(nanos);
        let inner = Arc::new(Inner {
            memfd,
            hole,
            size,
            flags,
            ino,
            mechanism,
            options,
            state: RwLock::new(State {
                attrs: AttributeStore::new(size / PAGE_SIZE, private),
                mappings: Vec::new(),
            }),
            pins: Mutex::new(BTreeMap::new()),
            next_id: AtomicI64::new(1),
            guest_view: OnceLock::new(),
            fail_after: AtomicI64::new(-1),
            platform: options.platform.model(vm_key),
            hooks: options.platform.hooks(),
            pages: Mutex::new(PageBits::default()),
            direct_map: OnceLock::new(),
            hook_log: OnceLock::new(),
            faults: OnceLock::new(),
        });
        if let Some(uffd) = fault_uffd {
            let service = FaultService::start(Arc::downgrade(&inner), uffd)?;
            let _ = inner.faults.set(service);
        }
        Ok(EmulatedGuestMemfd { inner })
    }

    /// Whether the file has a host-fault service thread (NO_DIRECT_MAP files with
    /// userfaultfd; every other file has none).
    #[doc(hidden)]
    pub fn has_fault_service(&self) -> bool {
        self.inner.faults.get().is_some()
    }

    /// The revocation mechanism in use.
    pub fn revocation(&self) -> Revocation {
        match self.inner.mechanism {
            Mechanism::Poison(_) => Revocation::Poison,
            Mechanism::Remap => Revocation::Remap,
        }
    }

    /// Number of runs of equal attributes.
    pub fn fragments(&self) -> usize {
        self.read_state().attrs.fragments()
    }

    /// Testing hook: after `ops` more successful host-mapping operations (revoke or restore
    /// of one run in one mapping), the next one fails with ENOMEM, as if the kernel refused
    /// the mapping change. Lets a test drive the ENOMEM path of `set_attributes`.
    #[doc(hidden)]
    pub fn inject_mapping_failure(&self, ops: u32) {
        self.inner
            .fail_after
            .store(i64::from(ops), Ordering::SeqCst);
    }

    /// The guest's view: a full mapping of the file in which private pages are accessible.
    /// Created on first use; once it exists, every conversion zaps its PTEs of the range.
    pub fn create_guest_view(&self) -> KernelResult<()> {
        self.guest_view().map(|_| ())
    }

    pub(crate) fn guest_view(&self) -> KernelResult<&Mmap> {
        let view = self.inner.guest_view.get_or_init(|| {
            let len = usize::try_from(self.inner.size).map_err(|_| Errno::ENOMEM)?;
            Mmap::new(
                Some(self.inner.memfd.as_fd()),
                0,
                len,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            )
        });
        view.as_ref().map_err(|e| *e)
    }

    /// A guest read through the guest's view (private and shared pages alike). Each page
    /// touched is a guest fault first ([`EmulatedGuestMemfd::guest_fault`]).
    pub(crate) fn guest_read(&self, offset: u64, buf: &mut [u8]) -> KernelResult<()> {
        let view = self.guest_view()?;
        let off = self.guest_range(offset, buf.len())?;
        let lock = self.read_state();
        self.inner.fault_range(&lock, offset, buf.len() as u64)?;
        // SAFETY: the range is inside the guest view (checked), which lives as long as self.
        unsafe {
            crate::mapping::volatile_copy(view.as_ptr().add(off), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// A guest write through the guest's view, after a guest fault of each page touched.
    pub(crate) fn guest_write(&self, offset: u64, data: &[u8]) -> KernelResult<()> {
        let view = self.guest_view()?;
        let off = self.guest_range(offset, data.len())?;
        let lock = self.read_state();
        self.inner.fault_range(&lock, offset, data.len() as u64)?;
        // SAFETY: as in `guest_read`.
        unsafe { crate::mapping::volatile_copy(data.as_ptr(), view.as_ptr().add(off), data.len()) };
        Ok(())
    }

    /// The guest writes `value` to the first byte of every page of `[offset, offset + len)`
    /// through its view, after a guest fault of the range.
    pub(crate) fn guest_touch(&self, offset: u64, len: u64, value: u8) -> KernelResult<()> {
        let view = self.guest_view()?;
        let n = usize::try_from(len).map_err(|_| Errno::EFAULT)?;
        let off = self.guest_range(offset, n)?;
        let lock = self.read_state();
        self.inner.fault_range(&lock, offset, len)?;
        let mut p = 0usize;
        while p < n {
            // SAFETY: inside the guest view (checked), which maps every page of the file,
            // private or shared, and lives as long as self; volatile so it is not elided.
            unsafe { view.as_ptr().add(off + p).write_volatile(value) };
            p += PAGE_SIZE as usize;
        }
        Ok(())
    }

    fn guest_range(&self, offset: u64, len: usize) -> KernelResult<usize> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.inner.size => {
                usize::try_from(offset).map_err(|_| Errno::EFAULT)
            }
            _ => Err(Errno::EFAULT),
        }
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.inner
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.inner
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The first pinned page in `[first, end)`.
    fn first_pinned(&self, first: u64, end: u64) -> Option<u64> {
        let pins = self
            .inner
            .pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        pins.values()
            .flatten()
            .filter(|(s, e)| *s < end && *e > first)
            .map(|(s, _)| (*s).max(first))
            .min()
    }

    fn injected_failure(&self) -> KernelResult<()> {
        let left = self.inner.fail_after.load(Ordering::SeqCst);
        if left < 0 {
            return Ok(());
        }
        if left == 0 {
            self.inner.fail_after.store(-1, Ordering::SeqCst);
            return Err(Errno::ENOMEM);
        }
        self.inner.fail_after.store(left - 1, Ordering::SeqCst);
        Ok(())
    }

    /// Makes file range `[start, end)` (bytes), currently shared, inaccessible in mapping
    /// `m`: a hole mapping for a long run (or always, with [`Revocation::Remap`]; or when
    /// `force_hole`), poison markers otherwise.
    fn revoke_with(
        &self,
        m: &mut MappingEntry,
        start: u64,
        end: u64,
        force_hole: bool,
    ) -> KernelResult<()> {
        let Some((addr, len)) = m.window(start, end) else {
            return Ok(());
        };
        self.injected_failure()?;
        let opts = &self.inner.options;
        let uffd = match &self.inner.mechanism {
            Mechanism::Poison(uffd)
                if !force_hole
                    && ((len as u64) < opts.hole_min_bytes
                        || m.holes.len() >= opts.hole_budget) =>
            {
                uffd
            }
            Mechanism::Poison(_) | Mechanism::Remap => {
                let s = start.max(m.file_offset);
                // SAFETY: the window lies inside a live registered mapping (entries are
                // removed before unmap, under the lock we hold). The hole file is empty, so
                // every access to the new mapping is past its end: SIGBUS.
                unsafe { sys::mmap_fixed_raw(addr, len, self.inner.hole.as_fd(), s)? };
                m.add_hole(s, s + len as u64);
                return Ok(());
            }
        };
        // Markers go only on empty PTEs. Unless the last revocation here found the mapping
        // populated, poison optimistically (an unpopulated range needs this one call); at the
        // first present PTE, zap from there and retry. A concurrent access can re-fault a page
        // between the zap and the marker; the loop then zaps again from that page.
        let mut done = 0usize;
        let mut zaps = 0u32;
        let zap_first = m.expect_populated && m.zap_first_streak < 8;
        if zap_first {
            m.zap_first_streak += 1;
            // SAFETY: the window lies inside a live registered mapping (entries are removed
            // before unmap, under the lock we hold).
            unsafe { sys::madvise_raw(addr, len, libc::MADV_DONTNEED)? };
        } else {
            m.zap_first_streak = 0;
        }
        let mut found_present = false;
        let mut registered = false;
        while done < len {
            // SAFETY: as above.
            let at = unsafe { addr.add(done) };
            match poison_split(uffd, at, len - done) {
                Ok(()) => break,
                Err(PoisonError::Exists { done: d }) => {
                    found_present = true;
                    done += usize::try_from(d).map_err(|_| Errno::EFAULT)?;
                    zaps += 1;
                    if zaps > 10_000 {
                        return Err(Errno::EAGAIN);
                    }
                    // SAFETY: as above.
                    unsafe { sys::madvise_raw(addr.add(done), len - done, libc::MADV_DONTNEED)? };
                }
                // Part of the mapping is not registered (memory-file VMAs are registered
                // lazily, see `reregister`): register it all and try again, once.
                Err(PoisonError::Failed(Errno::ENOENT)) if !registered => {
                    registered = true;
                    self.reregister(m)?;
                }
                Err(PoisonError::Failed(e)) => return Err(e),
            }
        }
        if !zap_first {
            m.expect_populated = found_present;
        }
        Ok(())
    }

    fn revoke(&self, m: &mut MappingEntry, start: u64, end: u64) -> KernelResult<()> {
        self.revoke_with(m, start, end, false)
    }

    /// Undoes a partial restore: a hole over the whole run works whatever mix of holes,
    /// markers and restored pages it holds.
    fn revoke_forced(&self, m: &mut MappingEntry, start: u64, end: u64) -> KernelResult<()> {
        self.revoke_with(m, start, end, true)
    }

    /// Makes file range `[start, end)` (bytes), currently private, accessible again in
    /// mapping `m`: markers are zapped; a hole inside the range is replaced by the memory
    /// file; a hole that reaches beyond the range is rebuilt as markers (never split, so
    /// restores add no VMA).
    fn restore(&self, m: &mut MappingEntry, start: u64, end: u64) -> KernelResult<()> {
        let Some((addr, len)) = m.window(start, end) else {
            return Ok(());
        };
        self.injected_failure()?;
        let s = start.max(m.file_offset);
        let e = s + len as u64;
        let holes = m.holes_in(s, e);
        let covered: u64 = holes.iter().map(|(a, b)| b - a).sum();
        if let Mechanism::Poison(_) = self.inner.mechanism {
            if covered < e - s {
                // SAFETY: the window lies inside a live registered mapping; DONTNEED on a
                // shared mapping drops PTEs and markers only, never file contents.
                unsafe { sys::madvise_raw(addr, len, libc::MADV_DONTNEED)? };
            }
        }
        for (ps, pe) in holes {
            let (hs, he) = m
                .holes
                .range(..=ps)
                .next_back()
                .map_or((ps, pe), |(&a, &b)| (a, b));
            match &self.inner.mechanism {
                Mechanism::Poison(uffd) if hs < ps || pe < he => {
                    self.rebuild_hole(uffd, m, (hs, he), (ps, pe))?
                }
                _ => self.unhole(m, ps, pe)?,
            }
        }
        // NO_DIRECT_MAP: a memory-file VMA mapped over a hole, or moved by `rebuild_hole`,
        // starts unregistered and its faults would not be seen: register the mapping again
        // now (not lazily), so the host hand-out covers every shared page.
        if let Some(service) = self.inner.faults.get() {
            service.uffd.register(m.addr as *mut u8, m.len)?;
        }
        Ok(())
    }

    /// Maps the memory file over hole piece `[hs, he)` of `m` (and registers it).
    fn unhole(&self, m: &mut MappingEntry, hs: u64, he: u64) -> KernelResult<()> {
        let Some((addr, len)) = m.window(hs, he) else {
            return Ok(());
        };
        // SAFETY: the window lies inside a live registered mapping.
        unsafe { sys::mmap_fixed_raw(addr, len, self.inner.memfd.as_fd(), hs)? };
        // Not registered yet: the next poison here registers the mapping (`reregister`).
        m.remove_hole(hs, he);
        Ok(())
    }

    /// Registers the whole of mapping `m` with the userfaultfd again. Registration is only
    /// needed by `UFFDIO_POISON` (markers act without it), and layout changes lose it: a
    /// memory-file VMA mapped over a hole starts unregistered, and `mremap` merges the moved
    /// VMA with an equal registered neighbour first and only then drops the userfaultfd
    /// context of the (merged) result, neighbour included (seen on 6.18). So registration is
    /// lazy: a poison that fails with ENOENT registers the mapping and retries. Registering a
    /// registered range with the same userfaultfd is allowed; hole VMAs (shmem too) are
    /// registered harmlessly.
    fn reregister(&self, m: &MappingEntry) -> KernelResult<()> {
        match &self.inner.mechanism {
            Mechanism::Poison(uffd) => uffd.register(m.addr as *mut u8, m.len),
            Mechanism::Remap => Ok(()),
        }
    }

    /// Replaces hole `[hs, he)` of `m` by the memory file with markers on every page but
    /// `[ps, pe)`, atomically: the replacement is built at a fresh address and moved over the
    /// hole with `mremap`, so no access ever sees a private page of it exposed.
    fn rebuild_hole(
        &self,
        uffd: &PoisonFd,
        m: &mut MappingEntry,
        (hs, he): (u64, u64),
        (ps, pe): (u64, u64),
    ) -> KernelResult<()> {
        let Some((dest, len)) = m.window(hs, he) else {
            return Ok(());
        };
        let fresh = Mmap::new(Some(self.inner.memfd.as_fd()), hs, len, libc::MAP_SHARED)?;
        uffd.register(fresh.as_ptr(), len)?;
        for (a, b) in [(hs, ps), (pe, he)] {
            if a < b {
                // Both differences are below `len`, a usize.
                #[allow(clippy::cast_possible_truncation)]
                let (off, n) = ((a - hs) as usize, (b - a) as usize);
                // SAFETY: inside `fresh`, which nothing else knows of: its PTEs are all none.
                let at = unsafe { fresh.as_ptr().add(off) };
                poison_split(uffd, at, n).map_err(|p| match p {
                    PoisonError::Failed(e) => e,
                    PoisonError::Exists { .. } => Errno::EAGAIN,
                })?;
            }
        }
        // SAFETY: `fresh` is ours and `dest` is inside a live registered mapping; after the
        // move `fresh`'s range is gone, so it is released without unmapping.
        unsafe { sys::mremap_fixed_raw(fresh.as_ptr(), dest, len)? };
        let _ = fresh.into_raw();
        // The move drops the userfaultfd registration (the markers stay, and a marker raises
        // SIGBUS with or without it); the next poison here registers the mapping again.
        m.remove_hole(hs, he);
        Ok(())
    }

    /// Applies `op` to every run in every mapping; on failure, undoes what was done with
    /// `undo` and returns the error.
    fn apply_all(
        &self,
        st: &mut State,
        runs: &[(u64, u64)],
        op: fn(&Self, &mut MappingEntry, u64, u64) -> KernelResult<()>,
        undo: fn(&Self, &mut MappingEntry, u64, u64) -> KernelResult<()>,
    ) -> KernelResult<()> {
        for i in 0..st.mappings.len() {
            for (j, &(s, e)) in runs.iter().enumerate() {
                if let Err(err) = op(self, &mut st.mappings[i], s, e) {
                    // Roll back: every run of the mappings before this one, and this
                    // mapping's runs up to and including the failed one (which may be half
                    // done). Best effort: a failing undo of a to-private conversion leaves a
                    // page revoked, never exposed.
                    for done in &mut st.mappings[..i] {
                        for &(s, e) in runs {
                            let _ = undo(self, done, s, e);
                        }
                    }
                    for &(s, e) in &runs[..=j] {
                        let _ = undo(self, &mut st.mappings[i], s, e);
                    }
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    fn validate_attributes(&self, a: &kvm_memory_attributes2) -> KernelResult<()> {
        // kernel-spec §2.3, in order. Steps 1 (ENOTTY) and 2 (EFAULT) cannot happen here.
        if a.flags != 0 || a.reserved.iter().any(|&r| r != 0) {
            return Err(Errno::EINVAL);
        }
        if a.attributes & !KVM_MEMORY_ATTRIBUTE_PRIVATE != 0 {
            return Err(Errno::EINVAL);
        }
        let end = match a.offset.checked_add(a.size) {
            Some(end) if a.size != 0 => end,
            _ => return Err(Errno::EINVAL),
        };
        if a.offset % PAGE_SIZE != 0 || a.size % PAGE_SIZE != 0 {
            return Err(Errno::EINVAL);
        }
        if a.offset >= self.inner.size || end > self.inner.size {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }

    fn register_mapping(&self, map: &Mmap, file_offset: u64) -> KernelResult<u64> {
        let mut st = self.write_state();
        let id = u64::try_from(self.inner.next_id.fetch_add(1, Ordering::Relaxed))
            .map_err(|_| Errno::ENOMEM)?;
        let mut entry = MappingEntry {
            id,
            addr: map.as_ptr() as usize,
            len: map.len(),
            file_offset,
            holes: BTreeMap::new(),
            expect_populated: false,
            zap_first_streak: 0,
        };
        if let Mechanism::Poison(uffd) = &self.inner.mechanism {
            uffd.register(map.as_ptr(), map.len())?;
        }
        if let Some(service) = self.inner.faults.get() {
            // NO_DIRECT_MAP: host faults become events (a no-op re-registration when the
            // mechanism's userfaultfd is the service's).
            service.uffd.register(map.as_ptr(), map.len())?;
            service
                .maps()
                .push((id, entry.addr, entry.len, entry.file_offset));
        }
        let file_end = file_offset
            .saturating_add(map.len() as u64)
            .min(self.inner.size);
        let (first, end) = pages_of(file_offset, file_end.saturating_sub(file_offset));
        for (s, e, private) in st.attrs.runs(first, end) {
            if private {
                if let Err(e) = self.revoke(&mut entry, s * PAGE_SIZE, e * PAGE_SIZE) {
                    self.inner.forget_mapping(id);
                    return Err(e);
                }
            }
        }
        st.mappings.push(entry);
        Ok(id)
    }
}

impl MappingRegistry for Inner {
    fn unregister(&self, id: u64) {
        let mut st = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st.mappings.retain(|m| m.id != id);
        drop(st);
        self.forget_mapping(id);
    }
}

struct PinHold {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for PinHold {
    fn drop(&mut self) {
        let mut pins = self
            .inner
            .pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        pins.remove(&self.id);
    }
}

impl GuestMemfd for EmulatedGuestMemfd {
    fn backend(&self) -> BackendKind {
        BackendKind::Emulated
    }

    fn guest_read(&self, offset: u64, buf: &mut [u8]) -> KernelResult<()> {
        EmulatedGuestMemfd::guest_read(self, offset, buf)
    }

    fn guest_write(&self, offset: u64, data: &[u8]) -> KernelResult<()> {
        EmulatedGuestMemfd::guest_write(self, offset, data)
    }

    fn guest_touch(&self, offset: u64, len: u64, value: u8) -> KernelResult<()> {
        EmulatedGuestMemfd::guest_touch(self, offset, len, value)
    }

    fn clone_arc(&self) -> Arc<dyn GuestMemfd> {
        Arc::new(self.clone())
    }

    fn memslot_source(&self) -> KernelResult<crate::file::MemslotSource<'_>> {
        let view = self.guest_view()?;
        Ok(crate::file::MemslotSource::GuestView {
            userspace_addr: view.as_ptr() as u64,
            len: self.inner.size,
        })
    }

    fn allocated_bytes(&self) -> KernelResult<u64> {
        sys::allocated_bytes(self.inner.memfd.as_fd())
    }

    fn metadata_bytes(&self) -> u64 {
        self.read_state().attrs.metadata_bytes() as u64
    }

    fn size(&self) -> u64 {
        self.inner.size
    }

    fn flags(&self) -> u64 {
        self.inner.flags
    }

    fn stat(&self) -> KernelResult<GuestMemfdStat> {
        Ok(GuestMemfdStat {
            size: self.inner.size,
            blksize: PAGE_SIZE,
            ino: self.inner.ino,
        })
    }

    fn set_attributes(&self, a: &mut kvm_memory_attributes2) -> KernelResult<()> {
        self.validate_attributes(a)?;
        let to_private = a.attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0;
        let (first, end) = pages_of(a.offset, a.size);
        let mut st = self.write_state();
        // The runs whose attribute changes; only they are revoked or restored, which keeps
        // rollback exact for mixed ranges. None: the whole range already has the attributes,
        // and the request returns at once (§2.4 step 1).
        let changing: Vec<(u64, u64)> = st
            .attrs
            .runs(first, end)
            .into_iter()
            .filter(|r| r.2 != to_private)
            .map(|(s, e, _)| (s * PAGE_SIZE, e * PAGE_SIZE))
            .collect();
        if changing.is_empty() {
            return Ok(());
        }
        if to_private {
            // Safety check (§2.4 step 3b): an outstanding pin anywhere in the range, already
            // private pages included, fails the whole request.
            if let Some(page) = self.first_pinned(first, end) {
                a.error_offset = a.offset.max(page * PAGE_SIZE);
                return Err(Errno::EAGAIN);
            }
            if let Err(e) = self.apply_all(&mut st, &changing, Self::revoke, Self::restore) {
                a.error_offset = a.offset;
                return Err(if e == Errno::EAGAIN {
                    Errno::EAGAIN
                } else {
                    Errno::ENOMEM
                });
            }
        } else if self
            .apply_all(&mut st, &changing, Self::restore, Self::revoke_forced)
            .is_err()
        {
            a.error_offset = a.offset;
            return Err(Errno::ENOMEM);
        }
        // Point of no return: record the new attributes.
        st.attrs.set_range(first, end, to_private);
        // The guest's mappings of the changed pages go, as the kernel invalidates KVM's
        // (stage-2) mappings of a converted range: a guest view bound as a memslot has
        // KVM's MMU notifier zap its entries, and the guest's next access faults again.
        if let Some(Ok(view)) = self.inner.guest_view.get() {
            for &(s, e) in &changing {
                // Within the view (the runs are inside the file it maps whole). Zapping
                // PTEs of a valid range of our own shared mapping does not fail; if it did,
                // the guest would keep a mapping of the same page, which holds the same data.
                if let (Ok(off), Ok(len)) = (usize::try_from(s), usize::try_from(e - s)) {
                    let _ = view.madvise(off, len, libc::MADV_DONTNEED);
                }
            }
        }
        // Failure markers of the changed pages were zapped (to shared) or are private
        // markers now (to private).
        if let Some(service) = self.inner.faults.get() {
            for &(s, e) in &changing {
                service.take_sigbus(s / PAGE_SIZE, e / PAGE_SIZE);
            }
        }
        // §2.4 step 4b: the platform takes back each present page of a range made shared.
        // Platforms without the hook do no per-page work here.
        if !to_private && self.inner.hooks.make_shared {
            self.inner.make_shared_range(first, end);
        }
        Ok(())
    }

    fn fallocate(&self, mode: u32, offset: u64, len: u64) -> KernelResult<()> {
        // vfs_fallocate's own checks, then guest_memfd's (kernel-spec §2.5).
        if i64::try_from(offset).is_err() || len == 0 || i64::try_from(len).is_err() {
            return Err(Errno::EINVAL);
        }
        if mode & !(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE) != 0
            || mode & FALLOC_FL_KEEP_SIZE == 0
        {
            return Err(Errno::EOPNOTSUPP);
        }
        if offset
            .checked_add(len)
            .and_then(|e| i64::try_from(e).ok())
            .is_none()
        {
            return Err(Errno(libc::EFBIG));
        }
        if offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(Errno::EINVAL);
        }
        let size = self.inner.size;
        if mode & FALLOC_FL_PUNCH_HOLE != 0 {
            let st = self.write_state();
            let end = (offset + len).min(size);
            if offset >= end {
                return Ok(());
            }
            // The pages leave the file: restore the direct map, reclaim, forget "up to date".
            let (first, last) = pages_of(offset, end - offset);
            self.inner.free_pages(first, last);
            // NO_DIRECT_MAP: a failed host-fault hand-out left a SIGBUS marker on a shared
            // page; the page leaves the file, so the next access faults afresh.
            if let Some(service) = self.inner.faults.get() {
                for (page, id) in service.take_sigbus(first, last) {
                    let shared = st.attrs.get(page) & KVM_MEMORY_ATTRIBUTE_PRIVATE == 0;
                    let window = st
                        .mappings
                        .iter()
                        .find(|m| m.id == id)
                        .and_then(|m| m.window(page * PAGE_SIZE, (page + 1) * PAGE_SIZE));
                    if let (true, Some((addr, len))) = (shared, window) {
                        // SAFETY: one page of a live registered mapping (entries are removed
                        // before unmap, under the lock we hold); DONTNEED on a shared mapping
                        // drops PTEs and markers only.
                        let _ = unsafe { sys::madvise_raw(addr, len, libc::MADV_DONTNEED) };
                    }
                }
            }
            sys::fallocate(
                self.inner.memfd.as_fd(),
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                offset,
                end - offset,
            )?;
            // The punched pages leave the file: pins on them no longer hold file pages.
            let (first, last) = pages_of(offset, end - offset);
            let mut pins = self
                .inner
                .pins
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for ranges in pins.values_mut() {
                *ranges = ranges
                    .iter()
                    .flat_map(|&(s, e)| [(s, e.min(first)), (s.max(last), e)])
                    .filter(|(s, e)| s < e)
                    .collect();
            }
            Ok(())
        } else {
            if offset + len > size {
                return Err(Errno::EINVAL);
            }
            let _st = self.read_state();
            sys::fallocate(self.inner.memfd.as_fd(), FALLOC_FL_KEEP_SIZE, offset, len)
        }
    }

    fn mmap(&self, offset: u64, len: usize, kind: MapKind) -> KernelResult<HostMapping> {
        if self.inner.flags & GUEST_MEMFD_FLAG_MMAP == 0 {
            return Err(Errno::ENODEV);
        }
        if kind == MapKind::Private || len == 0 || offset % PAGE_SIZE != 0 {
            return Err(Errno::EINVAL);
        }
        // mmap(2) maps whole pages: a length is rounded up, as the kernel does.
        let len = len
            .checked_next_multiple_of(PAGE_SIZE as usize)
            .ok_or(Errno::ENOMEM)?;
        let map = Mmap::new(
            Some(self.inner.memfd.as_fd()),
            offset,
            len,
            libc::MAP_SHARED,
        )?;
        let id = self.register_mapping(&map, offset)?;
        let registry: Arc<dyn MappingRegistry> = self.inner.clone();
        Ok(HostMapping::new(map, offset, Some((registry, id))))
    }

    fn pin(&self, offset: u64, len: u64) -> KernelResult<PinGuard> {
        let end = offset.checked_add(len).ok_or(Errno::EFAULT)?;
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        if self.inner.flags & GUEST_MEMFD_FLAG_MMAP == 0 || end > self.inner.size {
            return Err(Errno::EFAULT);
        }
        // GUP refuses AS_NO_DIRECT_MAP mappings (kernel-spec §3.2).
        if self.inner.no_direct_map() {
            return Err(Errno::EFAULT);
        }
        let (first, last) = pages_of(offset, len);
        let st = self.read_state();
        if st.attrs.first_with(first, last, true).is_some() {
            return Err(Errno::EFAULT);
        }
        // GUP faults the pages in.
        sys::fallocate(
            self.inner.memfd.as_fd(),
            FALLOC_FL_KEEP_SIZE,
            first * PAGE_SIZE,
            (last - first) * PAGE_SIZE,
        )?;
        let id = u64::try_from(self.inner.next_id.fetch_add(1, Ordering::Relaxed))
            .map_err(|_| Errno::ENOMEM)?;
        self.inner
            .pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, vec![(first, last)]);
        drop(st);
        let hold = PinHold {
            inner: self.inner.clone(),
            id,
        };
        Ok(PinGuard::new(Box::new(hold), offset, len))
    }

    fn attributes(&self, offset: u64) -> KernelResult<u64> {
        if offset >= self.inner.size {
            return Err(Errno::EINVAL);
        }
        Ok(self.read_state().attrs.get(offset / PAGE_SIZE))
    }

    fn attribute_runs(&self, offset: u64, len: u64) -> KernelResult<Vec<(u64, u64, u64)>> {
        self.read_state()
            .attrs
            .byte_runs(offset, len, self.inner.size)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let st = self.check_access(offset, buf.len())?;
        self.inner.hand_out(offset, buf.len() as u64)?;
        sys::pread_exact(self.inner.memfd.as_fd(), buf, offset).map_err(|_| {
            AccessError::OutOfBounds {
                offset,
                len: buf.len() as u64,
                size: self.inner.size,
            }
        })?;
        drop(st);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        let st = self.check_access(offset, data.len())?;
        self.inner.hand_out(offset, data.len() as u64)?;
        sys::pwrite_all(self.inner.memfd.as_fd(), data, offset).map_err(|_| {
            AccessError::OutOfBounds {
                offset,
                len: data.len() as u64,
                size: self.inner.size,
            }
        })?;
        drop(st);
        Ok(())
    }
}

impl EmulatedGuestMemfd {
    /// Checks a host access and returns the shared lock that keeps it valid.
    fn check_access(
        &self,
        offset: u64,
        len: usize,
    ) -> Result<RwLockReadGuard<'_, State>, AccessError> {
        check_host_access(offset, len, self.inner.size, self.inner.flags)?;
        let st = self.read_state();
        st.attrs.check_shared(offset, len as u64)?;
        Ok(st)
    }
}

/// Why [`EmulatedGuestMemfd::populate`] and the launch calls refuse a source buffer.
fn source_page(source: Option<&[u8]>, i: u64) -> KernelResult<Option<&[u8]>> {
    match source {
        None => Ok(None),
        Some(src) => {
            let at = usize::try_from(i).map_err(|_| Errno::EFAULT)? * PAGE;
            src.get(at..at + PAGE).map(Some).ok_or(Errno::EFAULT)
        }
    }
}

impl EmulatedGuestMemfd {
    /// The platform model under the file.
    pub fn platform(&self) -> PlatformKind {
        self.inner.platform.kind()
    }

    /// The platform model's state and counters (SNP: guest-assigned pages and refused gmem
    /// writes to them).
    pub fn platform_report(&self) -> PlatformReport {
        self.inner.platform.report()
    }

    /// Starts recording hook calls (and gmem's zeroing and direct-map changes) in the
    /// returned log, which outlives the file (release is recorded too).
    pub fn record_hooks(&self) -> Arc<Mutex<Vec<HookCall>>> {
        self.inner
            .hook_log
            .get_or_init(|| Arc::new(Mutex::new(Vec::new())))
            .clone()
    }

    /// Whether page `index` is currently removed from the direct map (NO_DIRECT_MAP).
    pub fn direct_map_removed(&self, index: u64) -> bool {
        self.inner.bits().removed.contains(index)
    }

    /// Whether page `index` is up to date (zeroed once since it was last freed).
    pub fn page_uptodate(&self, index: u64) -> bool {
        self.inner.bits().uptodate.contains(index)
    }

    /// A guest fault (`kvm_gmem_get_pfn`) on every page of `[offset, offset + len)`, as a vCPU
    /// touching them would cause: the VMM calls it for pages its vCPUs access through a
    /// memslot, which the emulated backend does not see (like `KVM_PRE_FAULT_MEMORY`).
    pub fn guest_fault(&self, offset: u64, len: u64) -> KernelResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.size => {}
            _ => return Err(Errno::EFAULT),
        }
        let st = self.read_state();
        self.inner.fault_range(&st, offset, len)
    }

    /// `kvm_gmem_populate` (kernel-spec §2.7) over `npages` pages from `offset`: each page
    /// must be private (EINVAL otherwise); a page not up to date is zeroed first; with a
    /// `source` (`npages` pages) its page is copied in (the legacy flow), without one the
    /// page is its own source (the in-place flow of seed 000); then the platform's
    /// post-populate hook runs. `cancel` is polled before each page (a pending signal).
    /// Returns the pages done if any, else the error (EINTR when cancelled).
    pub fn populate(
        &self,
        offset: u64,
        source: Option<&[u8]>,
        npages: u64,
        cancel: &dyn Fn() -> bool,
    ) -> KernelResult<u64> {
        self.populate_each(offset, source, npages, cancel, &mut |_, _| Ok(()))
    }

    /// `KVM_SEV_SNP_LAUNCH_UPDATE` / `KVM_TDX_INIT_MEM_REGION`: [`Self::populate`] of pages
    /// at guest physical `gpa`, each extending `measurement` with (gpa, type, contents).
    /// ENOTTY on a platform without a launch flow.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_populate(
        &self,
        gpa: u64,
        offset: u64,
        source: Option<&[u8]>,
        npages: u64,
        ty: PageType,
        measurement: &mut LaunchMeasurement,
        cancel: &dyn Fn() -> bool,
    ) -> KernelResult<u64> {
        if !self.platform().has_launch_populate() {
            return Err(Errno::ENOTTY);
        }
        let first = offset / PAGE_SIZE;
        self.populate_each(offset, source, npages, cancel, &mut |index, page| {
            measurement.extend(gpa + (index - first) * PAGE_SIZE, ty, &page.read());
            Ok(())
        })
    }

    fn populate_each(
        &self,
        offset: u64,
        source: Option<&[u8]>,
        npages: u64,
        cancel: &dyn Fn() -> bool,
        each: &mut dyn FnMut(u64, &PageRef<'_>) -> KernelResult<()>,
    ) -> KernelResult<u64> {
        let end = npages
            .checked_mul(PAGE_SIZE)
            .and_then(|l| offset.checked_add(l));
        if npages == 0 || offset % PAGE_SIZE != 0 || end.is_none_or(|e| e > self.inner.size) {
            return Err(Errno::EINVAL);
        }
        if source.is_some_and(|s| (s.len() as u64) < npages * PAGE_SIZE) {
            return Err(Errno::EFAULT);
        }
        let first = offset / PAGE_SIZE;
        let mut done = 0u64;
        // The source page is read before any lock is taken, as the kernel GUPs it before
        // taking the invalidate lock (§2.7): a source that is itself an unfaulted page of a
        // host mapping (of this very file, with NO_DIRECT_MAP: served by the fault service,
        // which needs the page bits) then faults in without waiting on us.
        let mut staged = vec![0u8; PAGE];
        let result = (|| {
            for i in 0..npages {
                if cancel() {
                    return Err(Errno::EINTR);
                }
                let src = match source_page(source, i)? {
                    Some(page) => {
                        // SAFETY: both ranges are PAGE bytes long and valid (`source_page`
                        // checked the source slice; `staged` is ours); volatile reads make no
                        // assumption about concurrent writers of a shared source.
                        unsafe {
                            crate::mapping::volatile_copy(page.as_ptr(), staged.as_mut_ptr(), PAGE)
                        };
                        Some(staged.as_slice())
                    }
                    None => None,
                };
                let index = first + i;
                // The invalidate lock, exclusively, per page (§2.7).
                let st = self.write_state();
                if st.attrs.get(index) & KVM_MEMORY_ATTRIBUTE_PRIVATE == 0 {
                    return Err(Errno::EINVAL);
                }
                let mut bits = self.inner.bits();
                self.inner.make_uptodate(&mut bits, index)?;
                if let Some(src) = src {
                    self.inner.gmem_write(&bits, index, Some(src))?;
                }
                let page = self.inner.page_ref(&bits, index)?;
                if self.inner.hooks.post_populate {
                    self.inner.log(HookCall::PostPopulate(index));
                    self.inner.platform.post_populate(&page, src.is_some())?;
                }
                each(index, &page)?;
                drop(bits);
                drop(st);
                done += 1;
            }
            Ok(())
        })();
        match result {
            Err(e) if done == 0 => Err(e),
            _ => Ok(done),
        }
    }
}

impl Inner {
    fn bits(&self) -> std::sync::MutexGuard<'_, PageBits> {
        self.pages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn no_direct_map(&self) -> bool {
        self.flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP != 0
    }

    fn log(&self, call: HookCall) {
        if let Some(log) = self.hook_log.get() {
            log.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(call);
        }
    }

    fn direct_map(&self) -> KernelResult<&Mmap> {
        let view = self.direct_map.get_or_init(|| {
            let len = usize::try_from(self.size).map_err(|_| Errno::ENOMEM)?;
            Mmap::new(
                Some(self.memfd.as_fd()),
                0,
                len,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            )
        });
        view.as_ref().map_err(|e| *e)
    }

    /// Address of page `index` in the direct map.
    fn dm_page(&self, index: u64) -> KernelResult<*mut u8> {
        let dm = self.direct_map()?;
        let off = usize::try_from(index * PAGE_SIZE).map_err(|_| Errno::EFAULT)?;
        if off >= dm.len() {
            return Err(Errno::EFAULT);
        }
        // SAFETY: `off` is inside the direct map (checked).
        Ok(unsafe { dm.as_ptr().add(off) })
    }

    /// A hook's handle on page `index`; EFAULT if the page is removed from the direct map
    /// (gmem never touches a removed page).
    fn page_ref(&self, bits: &PageBits, index: u64) -> KernelResult<PageRef<'_>> {
        if bits.removed.contains(index) {
            return Err(Errno::EFAULT);
        }
        let ptr = self.dm_page(index)?;
        // SAFETY: a page of the direct map, which lives as long as `self`, and is mapped: its
        // removed mark is clear, and marks change only under the `pages` lock the caller holds.
        Ok(unsafe { PageRef::new(index, ptr) })
    }

    /// gmem's own write of page `index` (`None`: zeroes) through the direct map: refused
    /// for a removed page, and checked with the platform (SNP, TDX: never a guest-owned page).
    fn gmem_write(&self, bits: &PageBits, index: u64, data: Option<&[u8]>) -> KernelResult<()> {
        if bits.removed.contains(index) {
            return Err(Errno::EFAULT);
        }
        self.platform.gmem_write(index)?;
        let ptr = self.dm_page(index)?;
        let zeros = [0u8; PAGE];
        let data = data.unwrap_or(&zeros);
        // SAFETY: a mapped page of the direct map (not removed, checked under the lock);
        // at most a page is written.
        unsafe { crate::mapping::volatile_copy(data.as_ptr(), ptr, data.len().min(PAGE)) };
        Ok(())
    }

    fn page_present(&self, index: u64) -> KernelResult<bool> {
        let off = index * PAGE_SIZE;
        Ok(!sys::data_runs(self.memfd.as_fd(), off, off + PAGE_SIZE)?.is_empty())
    }

    /// Present pages of `[first, end)`.
    fn present_pages(&self, first: u64, end: u64) -> Vec<u64> {
        let runs = sys::data_runs(self.memfd.as_fd(), first * PAGE_SIZE, end * PAGE_SIZE)
            .unwrap_or_default();
        runs.into_iter()
            .flat_map(|(s, e)| s / PAGE_SIZE..e.div_ceil(PAGE_SIZE))
            .collect()
    }

    /// Zero-once (§2.6): a page not up to date is zeroed through the direct map and marked.
    /// A page the memfd already holds is only marked: shmem zero-filled it when it was
    /// allocated, by fallocate or by a host or vCPU fault the emulated backend does not see
    /// (host faults are seen on NO_DIRECT_MAP files only), which in the kernel would have
    /// zeroed and marked it then.
    fn make_uptodate(&self, bits: &mut PageBits, index: u64) -> KernelResult<()> {
        if bits.uptodate.contains(index) {
            return Ok(());
        }
        if !self.page_present(index)? {
            self.gmem_write(bits, index, None)?;
            self.log(HookCall::Zero(index));
        }
        bits.uptodate.insert(index);
        Ok(())
    }

    /// The guest fault (`kvm_gmem_get_pfn`, §2.6, §3.2) of every page of
    /// `[offset, offset + len)`, under the shared lock `st`, page by page: zero if not up to
    /// date; make-private if the page is private (every time: the hook is idempotent); with
    /// NO_DIRECT_MAP, remove it from the direct map, marking it only once that succeeded.
    fn fault_range(&self, st: &State, offset: u64, len: u64) -> KernelResult<()> {
        let (first, end) = pages_of(offset, len);
        let mut bits = self.bits();
        // Pages not up to date: one presence scan (SEEK_DATA) for all of them.
        let stale: Vec<u64> = (first..end)
            .filter(|&i| !bits.uptodate.contains(i))
            .collect();
        let present = match (stale.first(), stale.last()) {
            (Some(&lo), Some(&hi)) => self.present_pages(lo, hi + 1),
            _ => Vec::new(),
        };
        let mut stale = stale.into_iter().peekable();
        for index in first..end {
            if stale.next_if_eq(&index).is_some() {
                if present.binary_search(&index).is_err() {
                    self.gmem_write(&bits, index, None)?;
                    self.log(HookCall::Zero(index));
                }
                bits.uptodate.insert(index);
            }
            self.fault_page(st, &mut bits, index)?;
        }
        Ok(())
    }

    /// The rest of the guest fault of one page, once it is up to date.
    fn fault_page(&self, st: &State, bits: &mut PageBits, index: u64) -> KernelResult<()> {
        if self.hooks.make_private && st.attrs.get(index) & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0 {
            let page = self.page_ref(bits, index)?;
            self.log(HookCall::MakePrivate(index));
            self.platform.make_private(&page)?;
        }
        if self.no_direct_map() && !bits.removed.contains(index) {
            self.remove_from_direct_map(index)?;
            bits.removed.insert(index);
            self.log(HookCall::DirectMapRemove(index));
        }
        Ok(())
    }

    /// A host hand-out (the safe accessors; a host-mapping fault, served by the fault
    /// service): with NO_DIRECT_MAP, each page is made up to date and removed from the direct
    /// map. A failed removal marks nothing.
    fn hand_out(&self, offset: u64, len: u64) -> Result<(), AccessError> {
        if !self.no_direct_map() || len == 0 {
            return Ok(());
        }
        let (first, end) = pages_of(offset, len);
        let mut bits = self.bits();
        for index in first..end {
            let err = |errno| AccessError::DirectMap {
                offset: index * PAGE_SIZE,
                errno,
            };
            if bits.removed.contains(index) {
                continue;
            }
            self.make_uptodate(&mut bits, index).map_err(err)?;
            self.remove_from_direct_map(index).map_err(err)?;
            bits.removed.insert(index);
            self.log(HookCall::DirectMapRemove(index));
        }
        Ok(())
    }

    /// Serves one host fault at page address `addr` (service thread): the host hand-out of
    /// the page, then `UFFDIO_CONTINUE` (the hand-out leaves the page in the page cache, so a
    /// missing fault is resolved the same way: `UFFDIO_ZEROPAGE` would fail with EEXIST).
    /// Any other outcome (EEXIST: a PTE or marker is already there, e.g. a conversion to
    /// private raced; EFAULT: a concurrent punch-hole took the page) wakes the faulter, whose
    /// retry faults again or hits the marker. A failed hand-out (e.g. the direct-map removal
    /// failed) installs a poison marker and wakes the faulter: its access raises SIGBUS and
    /// nothing is marked.
    fn serve_fault(&self, uffd: &PoisonFd, addr: u64) {
        let Some(service) = self.faults.get() else {
            let _ = uffd.wake(addr, PAGE_SIZE);
            return;
        };
        let Some((id, offset)) = service.lookup(addr) else {
            // The mapping is going away: the retry finds it unmapped.
            let _ = uffd.wake(addr, PAGE_SIZE);
            return;
        };
        if offset < self.size && self.hand_out(offset, PAGE_SIZE).is_err() {
            service.sigbus().insert((offset / PAGE_SIZE, id));
            // A pointer for the ioctl only; the kernel checks the range is registered.
            let _ = uffd.poison(addr as *mut u8, PAGE);
            let _ = uffd.wake(addr, PAGE_SIZE);
            return;
        }
        if uffd.continue_page(addr, PAGE_SIZE).is_err() {
            let _ = uffd.wake(addr, PAGE_SIZE);
        }
    }

    /// The fault service forgets mapping `id` (unregistered or never completed).
    fn forget_mapping(&self, id: u64) {
        if let Some(service) = self.faults.get() {
            service.maps().retain(|m| m.0 != id);
            service.sigbus().retain(|k| k.1 != id);
        }
    }

    fn injected_failure(&self) -> KernelResult<()> {
        let left = self.fail_after.load(Ordering::SeqCst);
        if left < 0 {
            return Ok(());
        }
        if left == 0 {
            self.fail_after.store(-1, Ordering::SeqCst);
            return Err(Errno::ENOMEM);
        }
        self.fail_after.store(left - 1, Ordering::SeqCst);
        Ok(())
    }

    /// Makes page `index` inaccessible in the direct map: the empty hole file is mapped over
    /// it, so a stray access raises SIGBUS (a backstop: gmem checks the mark first).
    fn remove_from_direct_map(&self, index: u64) -> KernelResult<()> {
        self.injected_failure()?;
        let addr = self.dm_page(index)?;
        // SAFETY: one page inside the direct map, which only gmem accesses, always under the
        // `pages` lock the caller holds.
        unsafe { sys::mmap_fixed_raw(addr, PAGE, self.hole.as_fd(), index * PAGE_SIZE) }
    }

    /// Maps the memory file back at page `index` of the direct map.
    fn restore_direct_map(&self, index: u64) -> KernelResult<()> {
        let addr = self.dm_page(index)?;
        // SAFETY: as in `remove_from_direct_map`.
        unsafe { sys::mmap_fixed_raw(addr, PAGE, self.memfd.as_fd(), index * PAGE_SIZE) }
    }

    /// §2.4 step 4b: make-shared on every present page of `[first, end)`.
    fn make_shared_range(&self, first: u64, end: u64) {
        let bits = self.bits();
        for index in self.present_pages(first, end) {
            // A removed page cannot occur: platforms with make-shared do not offer
            // NO_DIRECT_MAP.
            if let Ok(page) = self.page_ref(&bits, index) {
                self.log(HookCall::MakeShared(index));
                self.platform.make_shared(&page);
            }
        }
    }

    /// Pages `[first, end)` leave the file (punch-hole, release): restore the direct map of
    /// removed pages, then reclaim present pages (the kernel's `free_folio` order, §3.2),
    /// and forget that they were up to date. No per-page work without NO_DIRECT_MAP or a
    /// reclaim hook.
    fn free_pages(&self, first: u64, end: u64) {
        let mut bits = self.bits();
        if self.no_direct_map() {
            for index in bits.removed.take_range(first, end) {
                if self.restore_direct_map(index).is_ok() {
                    self.log(HookCall::DirectMapRestore(index));
                } else {
                    // The kernel WARNs; the page stays marked and is never touched.
                    bits.removed.insert(index);
                }
            }
        }
        if self.hooks.reclaim {
            for index in self.present_pages(first, end) {
                if let Ok(page) = self.page_ref(&bits, index) {
                    self.log(HookCall::Reclaim(index));
                    self.platform.reclaim(&page);
                }
            }
        }
        bits.uptodate.take_range(first, end);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Stop and join the fault service first (no mapping is left: each holds the file).
        drop(self.faults.take());
        // Release: the memory leaves with the last reference to the file.
        if self.no_direct_map() || self.hooks.reclaim {
            self.free_pages(0, self.size / PAGE_SIZE);
        }
    }
}
