//! The emulated guest_memfd: in-place shared/private conversion on any Linux.
//!
//! Memory is one sparse memfd. The attributes belong to the file ([`AttributeStore`]), so
//! they survive punch-hole and outlive any mapping. Host mappings are `MAP_SHARED` views of
//! the memfd on which a private page raises a real SIGBUS, delivered by the kernel, with no
//! signal handler installed by gmem, in every process that maps the file. Two mechanisms (see
//! DESIGN.md "The guard" for the measurements and the trust boundary):
//!
//! - [`Revocation::Guard`] (default where userfaultfd offers it): every host mapping, in every
//!   process, takes its faults through one check, the process's guard (`guard`): a
//!   userfaultfd in missing and minor mode whose thread maps a shared page and poisons a
//!   private one at fault time, as the kernel's `kvm_gmem_fault_user_mapping` does. A
//!   conversion to private zaps this process's host mappings and replaces the pages another
//!   address space had mapped (`host`); fork and clone children and processes the file was
//!   handed to are served by the guard through their own userfaultfds, with no part in
//!   conversions.
//! - [`Revocation::Remap`] (the fallback without userfaultfd): private runs of every host
//!   mapping are replaced by `MAP_FIXED` mappings of an empty memfd (an access past its end is
//!   SIGBUS) and re-mapped to the memory file when shared; one VMA per run, bounded by
//!   `vm.max_map_count`. No fault is ever seen, so host mappings are not inherited by fork
//!   children (`MADV_DONTFORK`) and the file cannot be handed to another process.
//!
//! The guest's view is an internal full mapping of the memfd that sees private and shared pages
//! alike (stage 2); memslots and the conformance suite's guest use it.
//!
//! Locking: `State` sits behind one `RwLock`, the kernel's invalidate lock for everything but
//! host faults, which take the file's gate (`host::Gate`) instead. Conversion and
//! punch-hole take the lock exclusively; safe accessors, guest accesses and pins take it
//! shared, only to check the pages and take a transient reference (the copy itself runs
//! unlocked). Every holder of a state lock first holds `fork::FORK_LOCK` shared.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::AtomicI64;
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

mod chunk_map;
mod fault_injection;
mod folios;
mod fork;
mod guard;
mod guest_memfd;
mod handoff;
mod host;
mod orphan;
mod page_state;
mod pins;
mod populate;
mod revocation;
mod vma_budget;

use crate::host::Feature;
use fault_injection::FaultInjection;
pub use folios::memslot_max_order;

/// No fork until the guard goes: for gmem's own views, between their mapping and their
/// `MADV_DONTFORK` ([`fork::quiet`]).
pub(crate) fn fork_quiet() -> std::sync::RwLockReadGuard<'static, ()> {
    fork::quiet()
}
use page_state::PageBits;
use revocation::MappingEntry;
pub use vma_budget::{
    process_vma_budget, reserve_vmas, set_process_vma_limit, VmaBudget, RESERVE_VMAS,
};

/// How gmem's internal views (guest view, direct map) are mapped.
const GUEST_VIEW_FLAGS: libc::c_int = libc::MAP_SHARED | libc::MAP_NORESERVE;

/// The flags the emulated backend accepts on every platform.
pub const EMULATED_SUPPORTED_FLAGS: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

/// The flags the emulated backend accepts for files of `platform`: NO_DIRECT_MAP only where
/// the platform offers it (docs/series.md §3.1).
pub fn supported_flags(platform: PlatformKind) -> u64 {
    if platform.supports_no_direct_map() {
        EMULATED_SUPPORTED_FLAGS | GUEST_MEMFD_FLAG_NO_DIRECT_MAP
    } else {
        EMULATED_SUPPORTED_FLAGS
    }
}

/// How private pages are made inaccessible to host userspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Revocation {
    /// The guard where userfaultfd offers it, else remapping.
    #[default]
    Auto,
    /// The guard: every host fault, in every process, is checked against the page's
    /// attribute (`guard`).
    Guard,
    /// `MAP_FIXED` of an empty memfd over private runs (no userfaultfd needed; host mappings
    /// are not inherited by fork children and the file cannot be handed on).
    Remap,
}

impl Revocation {
    /// The mechanism's name.
    pub fn name(self) -> &'static str {
        match self {
            Revocation::Auto => "auto",
            Revocation::Guard => "guard",
            Revocation::Remap => "remap",
        }
    }

    /// What the kernel must offer for this mode, if anything: [`Revocation::Guard`] needs a
    /// userfaultfd with missing and minor faults on shmem, poison markers and the fork and
    /// remap events ([`GUARD_NEEDS`]); [`Revocation::Auto`] and [`Revocation::Remap`] work on
    /// any Linux (Auto falls back to Remap). `flags` does not change the answer (a
    /// NO_DIRECT_MAP file's host hand-out is the guard's).
    pub fn needs(self, _flags: u64) -> Option<Feature> {
        match self {
            Revocation::Guard => Some(GUARD_NEEDS),
            Revocation::Auto | Revocation::Remap => None,
        }
    }
}

/// What the guard needs of the kernel: a userfaultfd with `sys::uffd::GUARD_FEATURES`.
pub const GUARD_NEEDS: Feature = Feature::Userfaultfd(sys::uffd::GUARD_FEATURES);

/// What a `NO_DIRECT_MAP` file's host hand-out at fault time needs: the guard
/// ([`GUARD_NEEDS`]). Without it the file is served by remapping alone and host-mapping faults
/// stay unseen (DESIGN.md, NO_DIRECT_MAP).
pub const FAULT_SERVICE_NEEDS: Feature = GUARD_NEEDS;

/// Options of the emulated backend.
#[derive(Debug, Clone, Copy)]
pub struct EmulatedOptions {
    /// Revocation mechanism for private pages in host mappings.
    pub revocation: Revocation,
    /// The platform model under the file (hooks, content rules, NO_DIRECT_MAP support).
    pub platform: PlatformKind,
    /// Where the platform's hooks come from: v8 (default) or the later split.
    pub hook_placement: HookPlacement,
    /// Whether the owning VM's type has private memory (SW_PROTECTED, SNP, TDX; default).
    /// Without it, v8 answers `KVM_SET_MEMORY_ATTRIBUTES2` with EINVAL even for attributes 0
    /// (docs/series.md §2.1).
    pub vm_private_mem: bool,
    /// Where PRIVATE is tracked: in the file (in-place conversion, default) or per VM (the
    /// module-parameter mode, v8 `gmem_in_place_conversion=0`, v7 `vm_memory_attributes=1`):
    /// then the file's `KVM_SET_MEMORY_ATTRIBUTES2` is ENOTTY and the VM's
    /// `KVM_SET_MEMORY_ATTRIBUTES` sets the attributes ([`EmulatedGuestMemfd::set_vm_attributes`]).
    pub attribute_tracking: AttributeTracking,
    /// What a conversion to private does to pages this process's host mappings had mapped:
    /// their page-table entries go (default), or the pages are replaced ([`HostPages`]).
    pub host_pages: HostPages,
    /// The size of the folios that back the file: 4 KiB pages (default), or 2 MiB huge
    /// folios where the host offers shmem THP ([`FolioSize`]).
    pub folio_size: FolioSize,
}

/// The size of the folios behind an emulated file, as the kernel's guest_memfd has them: one
/// page each (order 0), or one 2 MiB folio (PMD order) per aligned 2 MiB of the file.
///
/// With [`FolioSize::Huge`] the file's memory is shmem THP: each 2 MiB block is allocated
/// whole, at its first use, through gmem's own views (2 MiB-aligned, `MADV_HUGEPAGE`), so the
/// guest's view maps it with one PMD and [`EmulatedGuestMemfd::max_order`] reports order 9
/// for it. The host's view stays exact to 4 KiB: every host mapping takes its faults through
/// the guard, which maps 4 KiB entries of the folio (userfaultfd installs no PMD for shmem).
/// A punch of part of a block splits its folio (the kernel's shmem does), and the block is
/// 4 KiB pages from then until it is punched whole. Creating such a file needs the size to be
/// a multiple of 2 MiB (EINVAL) and the host to offer shmem THP ([`crate::host::huge_folios`];
/// EOPNOTSUPP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FolioSize {
    /// 4 KiB folios (order 0).
    #[default]
    Small,
    /// 2 MiB folios (PMD order, shmem THP).
    Huge,
}

impl FolioSize {
    /// The name used by the CLI and reports: `4k` or `2m`.
    pub fn name(self) -> &'static str {
        match self {
            FolioSize::Small => "4k",
            FolioSize::Huge => "2m",
        }
    }

    /// The folio size by name (`4k`, `2m`), if it is one.
    pub fn from_name(name: &str) -> Option<FolioSize> {
        match name {
            "4k" | "4K" | "small" => Some(FolioSize::Small),
            "2m" | "2M" | "huge" => Some(FolioSize::Huge),
            _ => None,
        }
    }

    /// The folio's order (pages are 2^order).
    pub fn order(self) -> u8 {
        match self {
            FolioSize::Small => 0,
            FolioSize::Huge => HUGE_ORDER,
        }
    }
}

/// The order of a 2 MiB folio.
pub const HUGE_ORDER: u8 = 9;
/// Pages in a 2 MiB folio.
pub const HUGE_PAGES: u64 = 1 << HUGE_ORDER;
/// Bytes in a 2 MiB folio.
pub const HUGE_SIZE: u64 = HUGE_PAGES * PAGE_SIZE;

/// What a conversion to private does to the pages host userspace had mapped in this process.
///
/// The kernel refuses the conversion (EAGAIN) while any reference it counts is held on a
/// page, long-term pins it did not make included (io_uring fixed buffers, RDMA, a raw
/// `vmsplice`). gmem sees the references it makes and those made through its API, not
/// those (userspace cannot read a page's reference count): it cannot refuse for them. It can
/// make them harmless, at a price: a page that left the file takes a holder's reads and
/// writes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostPages {
    /// Only the page-table entries go (`MADV_DONTNEED`), as the kernel does (default): exact
    /// for the guest and the fastest, and exact for the host when every reference to a host
    /// page goes through gmem. A reference gmem did not see, taken while the page was shared,
    /// then still reaches the page after it became private, the guest's later data included
    /// (DESIGN.md, trust boundary).
    #[default]
    Zap,
    /// The pages host userspace mapped are replaced by new ones with the same content (the
    /// old ones leave the file): a reference gmem did not see keeps the old page, with the
    /// content as of the conversion, and never reaches what the guest writes after it; its
    /// writes after the conversion are lost (the kernel would have refused the conversion).
    /// Costs a page allocation and a copy per mapped page (`cargo bench --bench conversion`
    /// prints both), and while a page is being replaced a guest access to it sees it empty
    /// (a vCPU must not touch a page while it converts it).
    Replace,
}

/// Where PRIVATE is tracked (docs/series.md §2.1).
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
            platform: PlatformKind::SoftwareProtected,
            hook_placement: HookPlacement::V8,
            vm_private_mem: true,
            attribute_tracking: AttributeTracking::PerFile,
            host_pages: HostPages::Zap,
            folio_size: FolioSize::Small,
        }
    }
}

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

    fn not_shared_across_processes(&self) -> Option<String> {
        let why = match self.options.revocation {
            Revocation::Guard => return None,
            Revocation::Remap => "the emulated backend runs in Remap mode".to_string(),
            Revocation::Auto => match guard::guard() {
                Ok(_) => return None,
                Err(e) => format!("the emulated backend has no guard here ({})", e.name()),
            },
        };
        Some(format!(
            "{why}: without the guard's userfaultfd no access of another process would be \
             seen, so fork children do not inherit host mappings and files are not handed on"
        ))
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
    /// The changing runs of the conversion in progress (bytes): kept between conversions so
    /// that the conversion path allocates nothing once it has room.
    changing: Vec<(u64, u64)>,
}

/// How host access to private pages is refused, for one file.
enum Mechanism {
    /// The guard of the process that created the file serves every host fault.
    Guard(Arc<guard::Guard>),
    /// A file received from another process: its host mappings here are registered with this
    /// userfaultfd, whose other descriptor the sender's guard holds and serves.
    Served(PoisonFd),
    /// Hole mappings over private runs.
    Remap,
}

/// One conversion of a file ([`EmulatedGuestMemfd::log_conversions_to`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversionRecord {
    /// When, since the log was made.
    pub at: std::time::Duration,
    /// Start of the range, bytes into the file.
    pub offset: u64,
    /// Length of the range, bytes.
    pub size: u64,
    /// The attributes asked for (`KVM_MEMORY_ATTRIBUTE_PRIVATE` or 0).
    pub attributes: u64,
    /// The answer.
    pub result: KernelResult<()>,
}

/// A shared, bounded log of conversions: one or more files append to it.
#[derive(Debug, Clone)]
pub struct ConversionLog {
    started: std::time::Instant,
    records: Arc<Mutex<(Vec<ConversionRecord>, u64)>>,
}

impl Default for ConversionLog {
    fn default() -> Self {
        ConversionLog {
            started: std::time::Instant::now(),
            records: Arc::default(),
        }
    }
}

impl ConversionLog {
    /// Conversions kept; later ones are only counted.
    pub const CAPACITY: usize = 1 << 20;

    fn push(&self, r: ConversionRecord) {
        let mut g = self
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if g.0.len() < Self::CAPACITY && g.0.try_reserve(1).is_ok() {
            g.0.push(r);
        } else {
            g.1 += 1;
        }
    }

    /// The conversions kept, in order, and how many were not kept.
    pub fn records(&self) -> (Vec<ConversionRecord>, u64) {
        let g = self
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (g.0.clone(), g.1)
    }
}

/// The process's empty file: every access to a mapping of it is past its end, i.e. SIGBUS,
/// at any offset, so every emulated file of the process shares it (made with the first).
fn hole() -> KernelResult<BorrowedFd<'static>> {
    static HOLE: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = HOLE.get() {
        return Ok(fd.as_fd());
    }
    let new = sys::memfd_create(c"gmem-hole")?;
    // Another thread may have made one meanwhile: its is kept, this one closed.
    Ok(HOLE.get_or_init(|| new).as_fd())
}

struct Inner {
    /// The memory: the one descriptor of the file's data (a fork child gets the hole file in
    /// its place, [`fork::DataFd`]).
    memfd: fork::DataFd,
    /// The empty file whose mappings stand in for private runs (Remap mode) and for pages
    /// removed from the direct map: one per process ([`hole`]), so a file holds one
    /// descriptor of its own, as the kernel's does.
    hole: BorrowedFd<'static>,
    size: u64,
    flags: u64,
    ino: u64,
    mechanism: Mechanism,
    /// The host side's gate: the attributes host faults are checked against, and what the
    /// guard mapped or poisoned elsewhere ([`host::Gate`]).
    gate: Mutex<host::Gate>,
    options: EmulatedOptions,
    state: RwLock<State>,
    /// Every reference counted on the file's pages: pins and in-flight accesses.
    pins: pins::PinTable,
    /// Ids of this process's host mappings of the file.
    next_mapping_id: AtomicI64,
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
    /// Conversions, when recording ([`EmulatedGuestMemfd::log_conversions_to`]).
    conversion_log: OnceLock<ConversionLog>,
    /// The process that created the file: in any other (a fork or clone child) this copy is
    /// a follower.
    owner_space: u64,
    /// A received file's link to its owner, who runs its conversions ([`handoff`]).
    owner_link: Option<Mutex<fork::PrivateStream>>,
    /// Names the file in a fork child's conversion request to the owner ([`handoff`]): a
    /// child knows the secrets of the files that existed at its fork, as it holds their
    /// descriptors in the kernel's model, and no other.
    fork_secret: [u8; 16],
    /// Whether a failed host hand-out ever left a SIGBUS marker (set under the gate, never
    /// cleared): without one, a conversion skips looking for them.
    failure_markers: std::sync::atomic::AtomicBool,
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

    /// Whether this copy of the file follows another process's: it was received, or this is
    /// a fork (or clone) child of the process that created it. A follower maps the file (a
    /// receiver makes new mappings, a child keeps the ones it inherited) and converts through
    /// the owner ([`handoff`]); everything else is the owner's (EOPNOTSUPP).
    fn is_follower(&self) -> bool {
        matches!(self.mechanism, Mechanism::Served(_)) || !self.in_own_space()
    }

    /// Whether this is the address space the file was made (or received) in: not a fork or
    /// clone child's copy.
    fn in_own_space(&self) -> bool {
        self.owner_space == sys::peer::address_space()
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
        if options.folio_size == FolioSize::Huge {
            if size % HUGE_SIZE != 0 {
                return Err(Errno::EINVAL);
            }
            if crate::host::huge_folios().is_err() {
                return Err(Errno::EOPNOTSUPP);
            }
        }
        let placeholder = hole()?;
        let quiet = fork::quiet();
        let memfd = fork::DataFd::track(sys::memfd_create_sealable(c"gmem")?, placeholder, &quiet)?;
        drop(quiet);
        sys::ftruncate(memfd.as_fd(), size).map_err(|e| {
            if e == Errno(libc::EFBIG) {
                Errno::EINVAL
            } else {
                e
            }
        })?;
        // The size is the file's for good, as the kernel's guest_memfd's is.
        sys::seal_size(memfd.as_fd())?;
        Self::with_memfd(memfd, size, flags, options)
    }

    /// The file over `memfd` (of `size` bytes), initially all shared with `INIT_SHARED` in
    /// `flags`, all private otherwise.
    fn with_memfd(
        memfd: fork::DataFd,
        size: u64,
        flags: u64,
        options: EmulatedOptions,
    ) -> KernelResult<Self> {
        Self::build(memfd, size, flags, options, None)
    }

    /// The file over `memfd`; `received`: the userfaultfd of a file received from another
    /// process (its host mappings are registered with it; that process's guard serves them)
    /// and the link its conversions go to that process through.
    fn build(
        memfd: fork::DataFd,
        size: u64,
        flags: u64,
        options: EmulatedOptions,
        received: Option<(PoisonFd, fork::PrivateStream)>,
    ) -> KernelResult<Self> {
        let (received, link) = match received {
            Some((uffd, link)) => (Some(uffd), Some(link)),
            None => (None, None),
        };
        // A received userfaultfd is recorded as private: on failure it is forgotten as it
        // closes (a number left recorded would replace an unrelated descriptor in fork
        // children: found in review).
        let first = sys::fstat(memfd.as_fd()).and_then(|st| hole().map(|h| (st.st_ino, h)));
        let (ino, hole) = match first {
            Ok(v) => v,
            Err(e) => {
                if let Some(uffd) = received {
                    fork::close_private_uffd(uffd);
                }
                return Err(e);
            }
        };
        let mechanism = match (received, options.revocation) {
            (Some(uffd), _) => Mechanism::Served(uffd),
            // Huge folios need the guard: a host fault on a page not allocated yet must
            // allocate its whole block, and only the guard sees it.
            (None, Revocation::Remap) if options.folio_size == FolioSize::Huge => {
                return Err(Errno::EOPNOTSUPP);
            }
            (None, Revocation::Auto) if options.folio_size == FolioSize::Huge => {
                Mechanism::Guard(guard::guard().map_err(|_| Errno::EOPNOTSUPP)?)
            }
            (None, Revocation::Guard) => Mechanism::Guard(guard::guard()?),
            (None, Revocation::Remap) => Mechanism::Remap,
            (None, Revocation::Auto) => guard::guard().map_or(Mechanism::Remap, Mechanism::Guard),
        };
        // getrandom fails only on a kernel without it (before 3.17): then the time and the
        // inode, which a child could guess — only files made after its fork are at stake.
        let fork_secret = sys::peer::random_secret().unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            (nanos ^ u128::from(ino)).to_le_bytes()
        });
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
            gate: Mutex::new(host::Gate::new(AttributeStore::new(
                size / PAGE_SIZE,
                private,
            ))),
            options,
            state: RwLock::new(State {
                attrs: AttributeStore::new(size / PAGE_SIZE, private),
                mappings: Vec::new(),
                changing: Vec::new(),
            }),
            pins: pins::PinTable::default(),
            next_mapping_id: AtomicI64::new(1),
            guest_view: FileView::new(options.folio_size == FolioSize::Huge),
            fail_after: FaultInjection::off(),
            platform: options.platform.model(vm_key),
            hooks: options.platform.hooks(),
            pages: Mutex::new(PageBits::new(size / sys::PAGE_SIZE)),
            direct_map: FileView::new(options.folio_size == FolioSize::Huge),
            hook_log: OnceLock::new(),
            conversion_log: OnceLock::new(),
            owner_space: sys::peer::address_space(),
            owner_link: link.map(Mutex::new),
            fork_secret,
            failure_markers: std::sync::atomic::AtomicBool::new(false),
        });
        // No mapping of the file can be made out of a host mapping without the guard
        // (`remap_file_pages`), here or in a child, from now on: installed with the first
        // file, before a program's own filters (which `gmem exec --seccomp-list` is for).
        let _ = sys::seccomp::refuse_remap_file_pages();
        fork::register();
        if let Some(g) = inner.guard() {
            g.add_file(ino, &inner);
        }
        Ok(EmulatedGuestMemfd { inner })
    }

    /// Whether the file's host faults are served at fault time (by the guard, which hands a
    /// NO_DIRECT_MAP page out then): the owner's copy of a file in Guard mode.
    #[doc(hidden)]
    pub fn has_fault_service(&self) -> bool {
        self.inner.guard().is_some() && !self.inner.is_follower()
    }

    /// The revocation mechanism in use.
    pub fn revocation(&self) -> Revocation {
        match self.inner.mechanism {
            Mechanism::Guard(_) | Mechanism::Served(_) => Revocation::Guard,
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

    /// Testing hook: the guard handles, now, an unmap event of `[addr, addr + len)` in this
    /// process, or with `to` a move of that range to `to`, as it handles one that arrives
    /// late (a `munmap` lets its range go before its event is read, and another thread's
    /// mapping may be made and registered there first). False without a guard.
    #[doc(hidden)]
    pub fn replay_late_event(&self, addr: usize, len: usize, to: Option<usize>) -> bool {
        let Some(g) = self.inner.guard() else {
            return false;
        };
        let (a, l) = (addr as u64, len as u64);
        match to {
            Some(t) => g.remap(&g.own, a, t as u64, l),
            None => g.unmap(&g.own, a, a.saturating_add(l)),
        }
        true
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
        // The guest is the owner's: a follower has no guest view.
        self.owner_only()?;
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
        // The guest is the owner's: a follower has no guest view.
        self.owner_only()?;
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

    /// How many other address spaces (fork and clone children, processes a file was handed
    /// to) this process's guard serves, the ones whose end it has not noticed yet included. A
    /// child's space is added just after `fork` returns (the kernel lets `fork` go once the
    /// guard read the event; until the space is added the child's faults wait).
    pub fn peer_count(&self) -> usize {
        self.inner.guard().map_or(0, |g| g.other_spaces())
    }

    /// Waits until [`EmulatedGuestMemfd::peer_count`] reaches `n`, at most `timeout`; the
    /// count then.
    pub fn wait_for_peers(&self, n: usize, timeout: std::time::Duration) -> usize {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let count = self.peer_count();
            if count >= n || std::time::Instant::now() >= deadline {
                return count;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Takes a transient reference on the pages of `[offset, offset + len)`: what an in-flight
    /// access holds, as the kernel's GUP or guest fault holds a folio reference for the
    /// duration of the access. While it lives, converting the pages to private fails with
    /// EAGAIN and `error_offset` at the first of them, as for a pin (docs/series.md §2.4 step
    /// 3b). Taken under the state lock the caller holds, so a conversion either sees it or
    /// completed before the access checked the pages.
    fn transient_ref(&self, offset: u64, len: u64) -> KernelResult<Option<guest_memfd::PinHold>> {
        if len == 0 {
            return Ok(None);
        }
        let (first, last) = crate::attributes::pages_of(offset, len);
        let id = self.inner.pins.take_transient(first, last)?;
        Ok(Some(guest_memfd::PinHold::new(self.inner.clone(), id)))
    }

    /// The first pinned page in `[first, end)` (long-term pins and transient references).
    fn first_pinned(&self, first: u64, end: u64) -> Option<u64> {
        self.inner.pins.first_pinned(first, end)
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
    /// Records every conversion of this file from now on (`set_attributes`: range,
    /// attributes, result, time) in `log`, for a picture of the file over time (`gmem run
    /// --map`). False if the file already records into a log. At most
    /// [`ConversionLog::CAPACITY`] conversions are kept; the rest are counted.
    pub fn log_conversions_to(&self, log: ConversionLog) -> bool {
        self.inner.conversion_log.set(log).is_ok()
    }

    /// Appends one conversion to the log, if the file records.
    pub(super) fn log_conversion(
        &self,
        a: &crate::uapi::kvm_memory_attributes2,
        result: KernelResult<()>,
    ) {
        if let Some(log) = self.inner.conversion_log.get() {
            log.push(ConversionRecord {
                at: log.started.elapsed(),
                offset: a.offset,
                size: a.size,
                attributes: a.attributes,
                result,
            });
        }
    }

    pub fn record_hooks(&self) -> Arc<Mutex<Vec<HookCall>>> {
        self.inner
            .hook_log
            .get_or_init(|| Arc::new(Mutex::new(Vec::new())))
            .clone()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A receiver's userfaultfd is private: forgotten and closed together (in a fork child
        // the descriptor is the hole file put in its place, recorded all the same).
        if let Mechanism::Served(_) = &self.mechanism {
            if let Mechanism::Served(uffd) =
                std::mem::replace(&mut self.mechanism, Mechanism::Remap)
            {
                fork::close_private_uffd(uffd);
            }
        }
        // A fork child's copy: the file, its memory and gmem's views are its parent's (the
        // views are not even mapped here); nothing is released or remapped from here.
        if !self.in_own_space() {
            return;
        }
        // Its released blocks are no longer this process's to guard again at a fork (no
        // mapping of it is left: each holds the file).
        self.forget_all_released();
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
