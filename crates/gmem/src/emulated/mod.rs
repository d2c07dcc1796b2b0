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
//! punch-hole take it exclusively; safe accessors, guest accesses and pins take it shared,
//! only to check the pages and take a transient reference (the copy itself runs unlocked).
//! Every holder of a state lock first holds [`fork::FORK_LOCK`] shared.
//!
//! Other processes that map the file (fork children, processes it was handed to) are
//! [`peers`]: a conversion returns only once every one of them has applied it.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::attributes::AttributeStore;
use crate::error::{Errno, KernelResult};
use crate::file::{BackendKind, GuestMemfd, GuestMemfdBackend};
use crate::mapping::FileView;
use crate::platform::{
    HookCall, HookPlacement, HookSet, HookSite, Platform, PlatformKind, PlatformReport,
};
use crate::sys::{self, Mmap, PoisonFd, PAGE_SIZE};
use crate::uapi::{
    flag_names, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
};

mod fault_injection;
mod fault_service;
mod fork;
mod guest_memfd;
mod handoff;
mod page_state;
mod peers;
mod populate;
mod revocation;
mod vma_budget;

use crate::host::Feature;
use fault_injection::FaultInjection;
use fault_service::FaultService;
use page_state::PageBits;
use revocation::{MappingEntry, Mechanism};
pub use vma_budget::{
    process_vma_budget, reserve_vmas, set_process_vma_limit, VmaBudget, RESERVE_VMAS,
};

/// How gmem's internal views (guest view, direct map) are mapped.
const GUEST_VIEW_FLAGS: libc::c_int = libc::MAP_SHARED | libc::MAP_NORESERVE;

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

    /// What the kernel must offer for this mode on a file with `flags`, if anything:
    /// [`Revocation::Poison`] needs a userfaultfd with poison markers, and on a
    /// `NO_DIRECT_MAP` file also its missing and minor faults (the host-fault service).
    /// [`Revocation::Auto`] and [`Revocation::Remap`] work on any Linux (Auto falls back to
    /// Remap; a `NO_DIRECT_MAP` file then has a fault service only where
    /// [`FAULT_SERVICE_NEEDS`] is met).
    pub fn needs(self, flags: u64) -> Option<Feature> {
        match self {
            Revocation::Poison if flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP != 0 => {
                Some(FAULT_SERVICE_NEEDS)
            }
            Revocation::Poison => Some(Feature::Userfaultfd(sys::uffd::POISON_FEATURES)),
            Revocation::Auto | Revocation::Remap => None,
        }
    }
}

/// What a `NO_DIRECT_MAP` file's host-fault service needs: a userfaultfd with poison markers
/// and missing and minor faults on shmem. Without it the file is served by remapping alone
/// and host-mapping faults stay unseen (DESIGN.md, NO_DIRECT_MAP).
pub const FAULT_SERVICE_NEEDS: Feature = Feature::Userfaultfd(sys::uffd::FAULT_EVENT_FEATURES);

/// Options of the emulated backend.
#[derive(Debug, Clone, Copy)]
pub struct EmulatedOptions {
    /// Revocation mechanism for private pages in host mappings.
    pub revocation: Revocation,
    /// With [`Revocation::Poison`]: private runs of at least this many bytes are revoked by
    /// a hole mapping (one VMA, constant cost) instead of per-page markers (~0.1 µs a page).
    /// `u64::MAX` disables holes. Also the granule (at most 2 MiB) of the neighbourhood a
    /// partial restore of a hole rebuilds with markers.
    pub hole_min_bytes: u64,
    /// With [`Revocation::Poison`]: the most hole mappings one host mapping may hold; past
    /// it (or past the process's VMA budget, [`process_vma_budget`]), further private runs get
    /// markers, and a partial restore rebuilds the whole hole as markers instead of splitting
    /// it, so a mapping never has more holes than this (each at most two VMAs).
    pub hole_budget: usize,
    /// The platform model under the file (hooks, content rules, NO_DIRECT_MAP support).
    pub platform: PlatformKind,
    /// Where the platform's hooks come from: v8 (default) or the later split.
    pub hook_placement: HookPlacement,
    /// Whether the owning VM's type has private memory (SW_PROTECTED, SNP, TDX; default).
    /// Without it, v8 answers `KVM_SET_MEMORY_ATTRIBUTES2` with EINVAL even for attributes 0
    /// (kernel-spec §2.1).
    pub vm_private_mem: bool,
    /// Where PRIVATE is tracked: in the file (in-place conversion, default) or per VM (the
    /// module-parameter mode, v8 `gmem_in_place_conversion=0`, v7 `vm_memory_attributes=1`):
    /// then the file's `KVM_SET_MEMORY_ATTRIBUTES2` is ENOTTY and the VM's
    /// `KVM_SET_MEMORY_ATTRIBUTES` sets the attributes ([`EmulatedGuestMemfd::set_vm_attributes`]).
    pub attribute_tracking: AttributeTracking,
}

/// Where PRIVATE is tracked (kernel-spec §2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttributeTracking {
    /// Per guest_memfd: `KVM_SET_MEMORY_ATTRIBUTES2` on the file.
    #[default]
    PerFile,
    /// Per VM: `KVM_SET_MEMORY_ATTRIBUTES` on the VM; the file's ioctl is ENOTTY.
    PerVm,
}

impl Default for EmulatedOptions {
    fn default() -> Self {
        EmulatedOptions {
            revocation: Revocation::Auto,
            hole_min_bytes: DEFAULT_HOLE_MIN_BYTES,
            hole_budget: DEFAULT_HOLE_BUDGET,
            platform: PlatformKind::SoftwareProtected,
            hook_placement: HookPlacement::V8,
            vm_private_mem: true,
            attribute_tracking: AttributeTracking::PerFile,
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
    guest_view: FileView,
    /// Fault injection ([`EmulatedGuestMemfd::inject_mapping_failure`]).
    fail_after: FaultInjection,
    /// The platform model and the hooks it implements.
    platform: Box<dyn Platform>,
    hooks: HookSet,
    /// Per-page bits (up to date, removed from the direct map). Taken after `state`.
    pages: Mutex<PageBits>,
    /// gmem's own view of the file (the "direct map"): zeroing, populate copies and the hooks'
    /// [`PageRef`]s go through it; with NO_DIRECT_MAP, handed-out pages are removed from it.
    direct_map: FileView,
    /// Hook calls, when recording ([`EmulatedGuestMemfd::record_hooks`]).
    hook_log: OnceLock<Arc<Mutex<Vec<HookCall>>>>,
    /// NO_DIRECT_MAP files only: the thread that serves host-mapping faults (hand-out).
    faults: OnceLock<FaultService>,
    /// The other processes that map the file and follow its conversions.
    peers: peers::Peers,
    /// This process's copy follows another process's (a fork child, or a process the file
    /// was handed to): conversions, allocation, punch-hole, pins and populate are the
    /// owner's; the state here mirrors the owner's as its agent applies each change.
    follower: AtomicBool,
}

/// A shared hold on a file's state (and on the fork lock, taken first, released last).
struct StateRead<'a> {
    guard: RwLockReadGuard<'a, State>,
    _fork: RwLockReadGuard<'static, ()>,
}

impl StateRead<'_> {
    /// Lets go of the file's state but keeps the fork lock: for an access that copies after
    /// checking (its pages hold a transient reference), so that no fork happens while it
    /// holds a lock of the file's views (a fork child would inherit it held).
    fn into_fork_hold(self) -> RwLockReadGuard<'static, ()> {
        let StateRead { guard, _fork } = self;
        drop(guard);
        _fork
    }
}

impl std::ops::Deref for StateRead<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.guard
    }
}

/// An exclusive hold on a file's state (and a shared one on the fork lock).
struct StateWrite<'a> {
    guard: RwLockWriteGuard<'a, State>,
    _fork: RwLockReadGuard<'static, ()>,
}

impl std::ops::Deref for StateWrite<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.guard
    }
}

impl std::ops::DerefMut for StateWrite<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.guard
    }
}

impl Inner {
    /// What the hook log records for the platform's call at `site` on page `index`.
    fn hook_call(&self, site: HookSite, index: u64) -> HookCall {
        self.options
            .hook_placement
            .call(self.platform.kind(), site, index)
    }

    /// The host-fault service, in the process that created the file (a follower has none:
    /// a fork child inherits its data but not its thread).
    fn fault_service(&self) -> Option<&FaultService> {
        if self.is_follower() {
            None
        } else {
            self.faults.get()
        }
    }

    fn is_follower(&self) -> bool {
        self.follower.load(Ordering::SeqCst)
    }
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
        Self::with_memfd(memfd, size, flags, options)
    }

    /// The file over `memfd` (of `size` bytes), initially all shared with `INIT_SHARED` in
    /// `flags`, all private otherwise.
    fn with_memfd(
        memfd: OwnedFd,
        size: u64,
        flags: u64,
        options: EmulatedOptions,
    ) -> KernelResult<Self> {
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
            guest_view: FileView::default(),
            fail_after: FaultInjection::off(),
            platform: options.platform.model(vm_key),
            hooks: options.platform.hooks(),
            pages: Mutex::new(PageBits::default()),
            direct_map: FileView::default(),
            hook_log: OnceLock::new(),
            faults: OnceLock::new(),
            peers: peers::Peers::default(),
            follower: AtomicBool::new(false),
        });
        fork::register(&inner);
        if let Some(uffd) = fault_uffd {
            let attrs = AttributeStore::new(size / PAGE_SIZE, private);
            let service = FaultService::start(Arc::downgrade(&inner), uffd, attrs)?;
            let _ = inner.faults.set(service);
        }
        Ok(EmulatedGuestMemfd { inner })
    }

    /// Whether the file has a host-fault service thread (NO_DIRECT_MAP files with
    /// userfaultfd; every other file has none).
    #[doc(hidden)]
    pub fn has_fault_service(&self) -> bool {
        self.inner.fault_service().is_some()
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
        self.inner.fail_after.arm(ops);
    }

    /// The guest's view: a full mapping of the file in which private pages are accessible.
    /// Created on first use; once it exists, every conversion zaps its PTEs of the range.
    pub fn create_guest_view(&self) -> KernelResult<()> {
        self.guest_view().map(|_| ())
    }

    /// The whole guest view (a memslot needs one range; ENOMEM for a file too large to map
    /// whole). gmem's own guest accesses go through [`EmulatedGuestMemfd::guest_pieces`].
    /// Public for tests that watch the view's page tables without handing it out as a
    /// memslot (which would make every conversion zap its whole runs).
    #[doc(hidden)]
    pub fn guest_view(&self) -> KernelResult<&Mmap> {
        self.inner
            .guest_view
            .whole(self.inner.memfd.as_fd(), self.inner.size, GUEST_VIEW_FLAGS)
    }

    /// Calls `f(view, offset in it, offset in the range, length)` for each piece of
    /// `[offset, offset + len)` of the guest view (windows of a very large file). The range is
    /// noted as accessed while the access is in flight (see [`crate::mapping::FileView::zap_changed`]).
    fn guest_pieces(
        &self,
        offset: u64,
        len: u64,
        f: impl FnMut(&Mmap, usize, usize, usize) -> KernelResult<()>,
    ) -> KernelResult<()> {
        let inner = &self.inner;
        let _access = inner.guest_view.begin_access(offset, len, inner.size);
        inner.guest_view.pieces(
            inner.memfd.as_fd(),
            inner.size,
            GUEST_VIEW_FLAGS,
            offset,
            len,
            f,
        )
    }

    /// A guest read through the guest's view (private and shared pages alike). Each page
    /// touched is a guest fault first ([`EmulatedGuestMemfd::guest_fault`]).
    pub(crate) fn guest_read(&self, offset: u64, buf: &mut [u8]) -> KernelResult<()> {
        self.guest_range(offset, buf.len())?;
        let lock = self.read_state();
        self.inner.fault_range(&lock, offset, buf.len() as u64)?;
        // In flight: the pages hold a transient reference, not the lock.
        let _ref = self.transient_ref(offset, buf.len() as u64)?;
        let _fork = lock.into_fork_hold();
        // The range is inside the file (checked); each piece inside its view.
        self.guest_pieces(offset, buf.len() as u64, |v, o, p, n| {
            v.read_volatile(o, &mut buf[p..p + n])
        })
    }

    /// A guest write through the guest's view, after a guest fault of each page touched.
    pub(crate) fn guest_write(&self, offset: u64, data: &[u8]) -> KernelResult<()> {
        self.guest_range(offset, data.len())?;
        let lock = self.read_state();
        self.inner.fault_range(&lock, offset, data.len() as u64)?;
        let _ref = self.transient_ref(offset, data.len() as u64)?;
        let _fork = lock.into_fork_hold();
        // As in `guest_read`.
        self.guest_pieces(offset, data.len() as u64, |v, o, p, n| {
            v.write_volatile(o, &data[p..p + n])
        })
    }

    /// The guest writes `value` to the first byte of every page of `[offset, offset + len)`
    /// through its view, after a guest fault of the range.
    pub(crate) fn guest_touch(&self, offset: u64, len: u64, value: u8) -> KernelResult<()> {
        let n = usize::try_from(len).map_err(|_| Errno::EFAULT)?;
        self.guest_range(offset, n)?;
        let lock = self.read_state();
        self.inner.fault_range(&lock, offset, len)?;
        let _ref = self.transient_ref(offset, len)?;
        let _fork = lock.into_fork_hold();
        // Inside the file (checked); the guest view maps every page of it, private or shared.
        self.guest_pieces(offset, len, |v, o, _, n| {
            v.touch_pages(o as u64, n as u64, value)
        })
    }

    fn guest_range(&self, offset: u64, len: usize) -> KernelResult<usize> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.inner.size => {
                usize::try_from(offset).map_err(|_| Errno::EFAULT)
            }
            _ => Err(Errno::EFAULT),
        }
    }

    fn read_state(&self) -> StateRead<'_> {
        let fork = fork::shared();
        StateRead {
            guard: self
                .inner
                .state
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            _fork: fork,
        }
    }

    fn write_state(&self) -> StateWrite<'_> {
        let fork = fork::shared();
        StateWrite {
            guard: self
                .inner
                .state
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            _fork: fork,
        }
    }

    /// EOPNOTSUPP in a follower: the operation is the owner's.
    fn owner_only(&self) -> KernelResult<()> {
        if self.inner.is_follower() {
            Err(Errno::EOPNOTSUPP)
        } else {
            Ok(())
        }
    }

    /// Whether this copy of the file follows another process's (a fork child, or a process
    /// the file was handed to).
    pub fn is_follower(&self) -> bool {
        self.inner.is_follower()
    }

    /// How many other processes currently follow this file's conversions.
    pub fn peer_count(&self) -> usize {
        self.inner.peers.count()
    }

    /// Takes a transient reference on the pages of `[offset, offset + len)`: what an in-flight
    /// access holds, as the kernel's GUP or guest fault holds a folio reference for the
    /// duration of the access. While it lives, converting the pages to private fails with
    /// EAGAIN and `error_offset` at the first of them, as for a pin (kernel-spec §2.4 step
    /// 3b). Taken under the state lock the caller holds, so a conversion either sees it or
    /// completed before the access checked the pages.
    fn transient_ref(&self, offset: u64, len: u64) -> KernelResult<Option<guest_memfd::PinHold>> {
        if len == 0 {
            return Ok(None);
        }
        let (first, last) = crate::attributes::pages_of(offset, len);
        let id = u64::try_from(
            self.inner
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        )
        .map_err(|_| Errno::ENOMEM)?;
        self.inner
            .pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, vec![(first, last)]);
        Ok(Some(guest_memfd::PinHold::new(self.inner.clone(), id)))
    }

    /// The first pinned page in `[first, end)` (long-term pins and transient references).
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

    /// The platform model under the file.
    pub fn platform(&self) -> PlatformKind {
        self.inner.platform.kind()
    }

    /// The platform model's state and counters (SNP: guest-assigned pages and refused gmem
    /// writes to them).
    pub fn platform_report(&self) -> PlatformReport {
        self.inner.platform.report()
    }

    /// Where the file's platform hooks come from ([`EmulatedOptions::hook_placement`]).
    pub fn hook_placement(&self) -> HookPlacement {
        self.inner.options.hook_placement
    }

    /// Starts recording hook calls (and gmem's zeroing and direct-map changes) in the
    /// returned log, which outlives the file (release is recorded too).
    pub fn record_hooks(&self) -> Arc<Mutex<Vec<HookCall>>> {
        self.inner
            .hook_log
            .get_or_init(|| Arc::new(Mutex::new(Vec::new())))
            .clone()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Stop and join the fault service first (no mapping is left: each holds the file).
        drop(self.faults.take());
        // Release: the memory leaves with the last reference to the file.
        if self.no_direct_map() || self.hooks.reclaim {
            let st = self
                .state
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.free_pages(&st.attrs, 0, self.size / PAGE_SIZE);
        }
    }
}
