//! The guard: one chokepoint for every host access to a page of an emulated file, in every
//! process that maps it, after the kernel's `kvm_gmem_fault_user_mapping`.
//!
//! Every host mapping of every emulated file is registered with a userfaultfd in missing and
//! minor mode, so any access to a page without a PTE is a fault event (fault-around is off for
//! such mappings: one PTE per event). One thread per process, `gmem-guard`, serves them: it
//! looks up the file and offset of the address, checks the page's attribute under the file's
//! gate ([`super::host::Gate`]) and either maps the page (`UFFDIO_CONTINUE`, or
//! `UFFDIO_ZEROPAGE` for a page the file does not hold yet) or, for a private page, installs a
//! poison marker and wakes the faulting thread, whose retry raises SIGBUS at the exact address
//! (EFAULT for a system call). A zap of any kind — `MADV_DONTNEED`, `MADV_PAGEOUT`, punch-hole,
//! a conversion — leaves a mapping that faults through the check again; markers only spare a
//! second event.
//!
//! An address space is a [`Space`]: this process's own, and every address space the kernel
//! hands the guard: a child made by `fork` or by `clone` without `CLONE_VM` (atfork handlers or
//! not) comes as `UFFD_EVENT_FORK` with its own userfaultfd, registered where the parent's
//! mappings were, and a process the file was handed to sends its userfaultfd over the socket
//! ([`super::handoff`]). The guard holds those descriptors and serves their faults from here:
//! the other process needs no thread, cannot close the guard away (the descriptor is ours),
//! and does not take part in conversions, which act on its address space through its
//! userfaultfd or through the file ([`super::host`]). `mremap` comes as `UFFD_EVENT_REMAP`:
//! the registration follows the moved mapping and so does the lookup.
//!
//! Two threads: the *reader* only moves messages from the userfaultfds into a queue allocated
//! up front — it calls nothing that allocates or takes a C library lock — and the *server*
//! serves them. `fork` needs it: glibc's `fork` takes the allocator's locks before the system
//! call, and the kernel then waits, inside `fork`, until `UFFD_EVENT_FORK` is read; a thread
//! that must allocate before it reads (the server does, to record what it mapped) would wait
//! for `fork` while `fork` waits for it.
//!
//! The lookup of an address: this process's mappings are registered by gmem, which records
//! them ([`Guard::register`]); a fork child's space has a record of its own, copied from its
//! parent's at the fork event and kept by its unmap and remap events; a space of a process the
//! file was handed to is looked up in `/proc/<tid>/maps` of the faulting thread (the memory
//! file's inode and the mapping's offset) at every fault. An address no record or file claims
//! is never mapped: it gets a marker.

use super::chunk_map::ChunkMap;
use super::page_state::NoMemory;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::Inner;
use crate::error::{Errno, KernelResult};
use crate::sys::{self, Epoll, FaultEvent, Mmap, PoisonFd, UffdEvent, PAGE_SIZE};

/// The id of this process's own address space.
pub(super) const OWN_SPACE: u64 = 0;

/// How often the server looks for address spaces that have gone (ms).
const SWEEP_MS: u64 = 1000;

/// How often the server sends again the hand-overs it keeps (ms).
const RETRY_MS: u64 = 10;

/// Address spaces served at once at most (a slot each; a slot is reused once its space has
/// gone). A child beyond it is not served: its first access to a host mapping waits for
/// ever (refused, never granted).
const MAX_SPACES: usize = 4096;

/// Messages the queue between the reader and the server holds. A faulting thread has at most
/// one message queued; beyond this the reader waits for room.
const QUEUE: usize = 1 << 16;

/// The slots of the served address spaces: the raw userfaultfd of each (-1: free), which the
/// reader reads. A space's token (its id) is its slot and a generation, so a reused slot never
/// answers for a space that has gone.
struct Slots {
    fds: Vec<libc::c_int>,
    generation: Vec<u32>,
    /// Events (not faults) read from each slot's userfaultfd since it was taken.
    read: Vec<u64>,
    /// Holds on the slot's events ([`Guard::hold`]): not read while any is held.
    held: Vec<u32>,
    /// The raw custody stream of each slot's space (-1: none): a received file's process and
    /// its descendants, to which the reader hands each fork child's userfaultfd as it reads
    /// the fork event (`orphan`). Valid while the slot is: the space holds the stream, and
    /// the slot is emptied before the space goes.
    custody: Vec<libc::c_int>,
    /// Hand-overs the reader could not send (the custody stream full: a receiver that does
    /// not read, stopped or slow), retried by the server ([`Guard::retry_custody`]). Never
    /// grows past the [`PENDING`] reserved at the start: beyond it a hand-over is lost.
    pending: Vec<Pending>,
}

/// A hand-over to send again: the token of the space whose stream it goes to (the forking
/// space's until the server serves the child, then the child's own: a child outlives its
/// parent), the child's userfaultfd as the read installed it (which names it until then),
/// and a private duplicate of it, which the entry owns.
#[derive(Clone, Copy)]
struct Pending {
    token: u64,
    child: libc::c_int,
    dup: libc::c_int,
}

/// Whether a failed hand-over is worth sending again: the stream full, too many descriptors
/// in flight, or the kernel short of memory for the moment.
fn retryable(e: Errno) -> bool {
    e == Errno::EAGAIN
        || e == Errno(libc::ETOOMANYREFS)
        || e == Errno(libc::ENOBUFS)
        || e == Errno::ENOMEM
}

/// Failed hand-overs kept for another try at most.
const PENDING: usize = 256;

/// The events of one address space held unread ([`Guard::hold`]); let go on drop. Holds
/// count (the server and a conversion may hold the same space at once: found in review, a
/// flag let the first to finish clear the other's) and name their slot's generation.
pub(super) struct Hold<'a> {
    guard: &'a Guard,
    slot: usize,
    generation: u32,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut slots = lock(&self.guard.slots);
        if slots.generation.get(self.slot) == Some(&self.generation) {
            slots.held[self.slot] = slots.held[self.slot].saturating_sub(1);
        }
    }
}

/// The queue from the reader to the server: (token, message).
struct Queue {
    items: std::collections::VecDeque<(u64, sys::RawUffdMsg)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One registered range of host mapping: its length, the file and the file offset at its
/// start.
#[derive(Clone)]
struct Range {
    len: usize,
    file: Weak<Inner>,
    offset: u64,
}

/// An address space whose host mappings the guard serves.
pub(super) struct Space {
    /// Names the space in the files' records of markers.
    pub(super) id: u64,
    /// The userfaultfd made for this address space (possibly another process's).
    pub(super) uffd: PoisonFd,
    /// This process's own address space.
    pub(super) own: bool,
    /// Whether `ranges` is the space's exact record, kept by its events: this process's own
    /// (made by gmem), and a fork child's of a recorded space (copied at the fork and kept by
    /// the child's unmap and remap events; a fork child can make no mapping of the file and
    /// no `MADV_DONTFORK`). Otherwise (a process the file was handed to, which registers its
    /// own mappings) faults are looked up in `/proc/<tid>/maps`.
    recorded: bool,
    /// Registered ranges by start address: the record (see `recorded`), or what
    /// `/proc/<tid>/maps` said (not used for lookups; it names the files a fork child of the
    /// space keeps alive).
    ranges: Mutex<BTreeMap<usize, Range>>,
    /// In another process's space: the files it maps, kept alive while it does (their pages'
    /// attributes decide its faults after this process let go of them).
    keep: Mutex<Vec<Arc<Inner>>>,
    /// The address space has gone (its process exited or executed another program).
    dead: AtomicBool,
    /// Events (not faults) of this space the server has handled: with the slot's count of
    /// those read, whether a change of the space's mappings is read but not yet reflected in
    /// the records ([`Guard::settled`]).
    handled: std::sync::atomic::AtomicU64,
    /// A received file's process and its descendants: this process's end of that process's
    /// custody stream, over which the userfaultfds of its descendants' spaces are handed to
    /// it as they come (it serves them once this process has gone: `orphan`).
    custody: std::sync::OnceLock<Arc<super::fork::PrivateStream>>,
}

impl std::fmt::Debug for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Space")
            .field("id", &self.id)
            .field("own", &self.own)
            .finish()
    }
}

impl Space {
    fn new(id: u64, uffd: PoisonFd, own: bool, recorded: bool) -> Space {
        Space {
            id,
            uffd,
            own,
            recorded,
            ranges: Mutex::new(BTreeMap::new()),
            keep: Mutex::new(Vec::new()),
            dead: AtomicBool::new(false),
            handled: std::sync::atomic::AtomicU64::new(0),
            custody: std::sync::OnceLock::new(),
        }
    }

    /// The file and offset behind `addr`, if a recorded range holds it, and the bytes of the
    /// range from `addr` to its end.
    fn lookup(&self, addr: usize) -> Option<(Arc<Inner>, u64, u64)> {
        let ranges = lock(&self.ranges);
        let (&start, r) = ranges.range(..=addr).next_back()?;
        if addr >= start + r.len {
            return None;
        }
        let room = (start + r.len - addr) as u64;
        Some((r.file.upgrade()?, r.offset + (addr - start) as u64, room))
    }

    /// Keeps `file` alive while this (other) space lives.
    fn keep(&self, file: &Arc<Inner>) {
        if self.own {
            return;
        }
        let mut keep = lock(&self.keep);
        if !keep.iter().any(|f| Arc::ptr_eq(f, file)) {
            keep.push(file.clone());
        }
    }

    /// Whether the address space still exists (marks it dead once it has gone).
    pub(super) fn alive(&self) -> bool {
        if self.dead.load(Ordering::Relaxed) {
            return false;
        }
        if self.own || self.uffd.space_alive() {
            return true;
        }
        self.dead.store(true, Ordering::Relaxed);
        false
    }
}

/// The blocks of this process's host mappings released to the kernel's faults
/// ([`Guard::release_own_block`]), by address: `false` while released, `true` once the fork
/// *prepare* handler guarded them again ([`reguard_for_fork`]) — the file's gate, which knows
/// them as released, learns it at its next look ([`released_state`]). Process-wide and
/// outside the gates because the prepare handler may take no file's lock.
static RELEASED: Mutex<ChunkMap<usize, Released>> = Mutex::new(ChunkMap::new());

/// A released block in [`RELEASED`]: the file's inode and the block's offset (checked against
/// what is mapped at the address before it is registered again), and whether the fork
/// *prepare* handler guarded it again.
#[derive(Clone, Copy)]
pub(super) struct Released {
    inode: u64,
    offset: u64,
    guarded: bool,
}

/// The guard's own userfaultfd (-1 until the guard starts), for [`reguard_for_fork`].
static OWN_UFFD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Whether the block of the file with inode `inode` at `addr` is released (`Some(false)`),
/// was guarded again by a fork (`Some(true)`), or is not known as released (`None`).
pub(super) fn released_state(addr: usize, inode: u64) -> Option<bool> {
    lock(&RELEASED)
        .get(&addr)
        .filter(|r| r.inode == inode)
        .map(|r| r.guarded)
}

/// Records the block at `addr` (of the file with inode `inode`, at `offset`) as released,
/// returning the record it replaces (for [`restore_released`]); `Err`, with nothing
/// recorded, without memory for it.
pub(super) fn note_released(
    addr: usize,
    inode: u64,
    offset: u64,
) -> Result<Option<Released>, NoMemory> {
    lock(&RELEASED)
        .try_insert(
            addr,
            Released {
                inode,
                offset,
                guarded: false,
            },
        )
        .map_err(|_| NoMemory)
}

/// Undoes [`note_released`] (the release failed): the record it replaced comes back, or
/// none is left (no allocation: the key is there).
pub(super) fn restore_released(addr: usize, old: Option<Released>) {
    let mut t = lock(&RELEASED);
    match old {
        Some(r) => {
            if let Some(v) = t.get_mut(&addr) {
                *v = r;
            }
        }
        None => {
            t.remove(&addr);
        }
    }
}

/// Forgets the released block of the file with inode `inode` at `addr` (guarded again, or
/// unmapped); another file's block recorded at that address since stays.
pub(super) fn note_guarded(addr: usize, inode: u64) {
    let mut t = lock(&RELEASED);
    if t.get(&addr).is_some_and(|r| r.inode == inode) {
        t.remove(&addr);
    }
}

/// In a fork child (its *child* handler): the guard's descriptor is not the child's (its
/// number is the hole file there), and the child has no guard: its own forks guard nothing
/// and take no lock the parent's guard may have held at the fork (found in review: the child
/// could inherit [`RELEASED`] locked by the parent's server thread, and its first `fork`
/// waited for ever).
pub(super) fn forget_own_uffd() {
    OWN_UFFD.store(-1, Ordering::Relaxed);
}

/// From the fork *prepare* handler (the fork lock held exclusively: no conversion, no
/// mapping change of gmem's runs): guards every released block again, so that the child
/// inherits it registered where the kernel gives the child the parent's mappings (a released
/// block is `MADV_DONTFORK`: the child would have nothing there). System calls only, no
/// allocation. A block that cannot be registered stays released and the child does not
/// inherit it (SIGSEGV there, never an unguarded page).
pub(super) fn reguard_for_fork(views: &BTreeMap<usize, usize>) {
    let fd = OWN_UFFD.load(Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    let mut t = lock(&RELEASED);
    for (&addr, r) in t.iter_mut() {
        if r.guarded {
            continue;
        }
        // What is mapped there is checked first (`PROCMAP_QUERY`, system calls only): an
        // unmap whose event is not handled yet leaves the address recorded, and whatever was
        // mapped there since must not be registered with the guard (found in review). Where
        // the kernel cannot say (before 6.11), the block is registered again as recorded.
        let len = super::HUGE_SIZE;
        // One of gmem's own views made there since maps the file alike: never registered.
        if sys::is_own_view(views, addr, addr + len as usize) {
            continue;
        }
        let ours = match sys::vma_at(addr as u64) {
            Ok(Some(v)) => {
                v.start <= addr as u64
                    && v.end >= addr as u64 + len
                    && v.inode == r.inode
                    && v.offset + (addr as u64 - v.start) == r.offset
            }
            Ok(None) => false,
            // The kernel cannot say (before 6.11): registered as recorded. Any other failure
            // (no descriptor left): not registered — the block stays `MADV_DONTFORK`, so the
            // child has nothing there (found in review).
            Err(e) => e == Errno(libc::ENOTTY) || e == Errno(libc::EINVAL),
        };
        // SAFETY: a released block of a host mapping of this process (a `MAP_SHARED` shmem
        // mapping of the file recorded with it, just checked where the kernel can say so).
        #[allow(unsafe_code)]
        if ours && unsafe { sys::uffd::reguard_raw(fd, addr as u64, len) } {
            r.guarded = true;
        }
    }
}

/// The guard of this process: its userfaultfd, the address spaces it serves, and the thread.
pub(super) struct Guard {
    /// The address space the guard belongs to ([`sys::peer::address_space`]; a fork child
    /// inherits the object, not the thread).
    space: u64,
    /// Whether faults of kernel-mode accesses are events (else such an access to a page
    /// without a PTE fails with EFAULT).
    pub(super) kernel_faults: bool,
    epoll: Epoll,
    slots: Mutex<Slots>,
    /// Events other than faults (fork, remap, unmap) the reader queued (counted under
    /// `slots`, with the read) and the server handled: [`Guard::flush`] waits until the
    /// second reaches the first. Faults are not counted: they change no record a zap relies
    /// on (a fault found through `/proc` records its range before the page is mapped).
    events_queued: std::sync::atomic::AtomicU64,
    events_handled: std::sync::atomic::AtomicU64,
    /// Whether [`Slots::pending`] holds a hand-over to try again.
    pending_custody: AtomicBool,
    queue: Mutex<Queue>,
    /// Signalled when the queue gains a message (the server waits) or room (the reader).
    queued: std::sync::Condvar,
    room: std::sync::Condvar,
    /// This process's own address space.
    pub(super) own: Arc<Space>,
    /// Every space served, by id (the own one included).
    spaces: Mutex<BTreeMap<u64, Arc<Space>>>,
    /// The live files of this process by inode, for the lookup in another address space.
    files: Mutex<BTreeMap<u64, Weak<Inner>>>,
    /// The end of the fork link that fork (and clone) children inherit and send their
    /// conversion requests on ([`super::handoff`]); the other end is private, served by the
    /// `gmem-fork-link` thread.
    fork_link: std::os::unix::net::UnixDatagram,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("space", &self.space)
            .field("kernel_faults", &self.kernel_faults)
            .finish()
    }
}

/// This process's guard, made with the first file that needs one.
static GUARD: Mutex<Option<Arc<Guard>>> = Mutex::new(None);

/// The guard of this process, started on first use. In a fork child the parent's guard object
/// is inherited without its thread (and its descriptors serve the parent's address space): the
/// child gets a guard of its own if it creates files.
pub(super) fn guard() -> KernelResult<Arc<Guard>> {
    let mut g = lock(&GUARD);
    let me = sys::peer::address_space();
    if let Some(existing) = g.as_ref() {
        if existing.space == me {
            return Ok(existing.clone());
        }
        // The parent's: never used, never dropped here (its Drop is a no-op in a child,
        // but its descriptors belong to the parent's address space).
        if let Some(old) = g.take() {
            std::mem::forget(old);
        }
    }
    let new = Guard::start()?;
    *g = Some(new.clone());
    Ok(new)
}

impl Guard {
    fn start() -> KernelResult<Arc<Guard>> {
        // The guard's descriptors are private: a fork child gets the hole file in their place
        // (found in review: a child could UFFDIO_CONTINUE over a marker in this process's
        // host mapping through the inherited userfaultfd, or take the guard's epoll apart).
        let mut fds = Vec::new();
        fds.try_reserve_exact(MAX_SPACES)
            .map_err(|_| Errno::ENOMEM)?;
        fds.resize(MAX_SPACES, -1);
        let mut items = std::collections::VecDeque::new();
        items.try_reserve_exact(QUEUE).map_err(|_| Errno::ENOMEM)?;
        let mut pending = Vec::new();
        pending
            .try_reserve_exact(PENDING)
            .map_err(|_| Errno::ENOMEM)?;
        let quiet = super::fork::quiet();
        let (uffd, kernel_faults) = PoisonFd::guard()?;
        let epoll = Epoll::new()?;
        super::fork::track_fd(uffd.raw_fd());
        OWN_UFFD.store(uffd.raw_fd(), Ordering::Relaxed);
        // The kernel's answer to "what is mapped here" for released blocks, one `ioctl` a
        // question (best effort: without it each question opens the file).
        if let Ok(maps) = sys::keep_maps_fd() {
            super::fork::track_fd(maps);
        }
        super::fork::track_fd(epoll.raw_fd());
        // The fork link: the serving end is private (recorded), the asking end is what
        // children inherit.
        let (fork_link, serve_link) = match std::os::unix::net::UnixDatagram::pair() {
            Ok((ask, serve)) => {
                super::fork::track_fd(std::os::fd::AsRawFd::as_raw_fd(&serve));
                (ask, serve)
            }
            Err(e) => {
                drop(quiet);
                std::mem::forget(uffd);
                std::mem::forget(epoll);
                return Err(Errno(e.raw_os_error().unwrap_or(libc::EMFILE)));
            }
        };
        drop(quiet);
        // Once recorded, the two are kept for the life of the process whatever follows: a
        // guard that fails to start leaks them (closed while recorded, a number would replace
        // an unrelated descriptor in fork children: found in review).
        let raw = std::os::fd::AsRawFd::as_raw_fd(&uffd.as_fd());
        fds[0] = raw;
        if let Err(e) = epoll.add(uffd.as_fd(), 0) {
            std::mem::forget(uffd);
            std::mem::forget(epoll);
            return Err(e);
        }
        let own = Arc::new(Space::new(OWN_SPACE, uffd, true, true));
        let guard = Arc::new(Guard {
            space: sys::peer::address_space(),
            kernel_faults,
            epoll,
            slots: Mutex::new(Slots {
                fds,
                generation: vec![0; MAX_SPACES],
                read: vec![0; MAX_SPACES],
                held: vec![0; MAX_SPACES],
                custody: vec![-1; MAX_SPACES],
                pending,
            }),
            events_queued: std::sync::atomic::AtomicU64::new(0),
            events_handled: std::sync::atomic::AtomicU64::new(0),
            pending_custody: AtomicBool::new(false),
            queue: Mutex::new(Queue { items }),
            queued: std::sync::Condvar::new(),
            room: std::sync::Condvar::new(),
            own: own.clone(),
            spaces: Mutex::new(BTreeMap::from([(OWN_SPACE, own)])),
            files: Mutex::new(BTreeMap::new()),
            fork_link,
        });
        // The threads hold the guard for the life of the process: a guard is never stopped
        // (fork children and receivers may depend on it after every file here is gone).
        let g = guard.clone();
        if std::thread::Builder::new()
            .name("gmem-guard".into())
            .spawn(move || g.serve())
            .is_err()
        {
            // Its descriptors stay open (and recorded) with it.
            std::mem::forget(guard);
            return Err(Errno::EAGAIN);
        }
        // The guard is handed out (and a mapping registered, so a fork can wait for the
        // reader) only once the reader runs its loop: a thread's start allocates (its signal
        // stack, its thread-locals), and a fork in another thread at that moment, holding the
        // allocator's locks, would wait for a reader waiting for the allocator.
        let started = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let (g, s) = (guard.clone(), started.clone());
        std::thread::Builder::new()
            .name("gmem-guard-rd".into())
            .spawn(move || {
                *lock(&s.0) = true;
                s.1.notify_all();
                drop(s);
                g.read_all();
            })
            .map_err(|_| Errno::EAGAIN)?;
        let mut up = lock(&started.0);
        while !*up {
            up = started
                .1
                .wait(up)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        drop(up);
        // Without its thread nobody would answer a child's request: the guard fails to
        // start, as without the server (the serving end stays open and recorded with it).
        let g = guard.clone();
        std::thread::Builder::new()
            .name("gmem-fork-link".into())
            .spawn(move || super::handoff::serve_fork_link(&g, &serve_link))
            .map_err(|_| Errno::EAGAIN)?;
        Ok(guard)
    }

    /// The asking end of the fork link ([`super::handoff`]).
    pub(super) fn fork_link(&self) -> &std::os::unix::net::UnixDatagram {
        &self.fork_link
    }

    /// The live file of this process with inode `ino`.
    pub(super) fn file(&self, ino: u64) -> Option<Arc<Inner>> {
        lock(&self.files).get(&ino).and_then(Weak::upgrade)
    }

    /// Records `file` for the lookup by inode in other address spaces.
    pub(super) fn add_file(&self, ino: u64, file: &Arc<Inner>) {
        let mut files = lock(&self.files);
        files.retain(|_, w| w.strong_count() > 0);
        files.insert(ino, Arc::downgrade(file));
    }

    /// Registers host mapping `map` of `file` (from `offset`) in this process's address space:
    /// from now on every fault there is checked.
    pub(super) fn register(&self, map: &Mmap, file: &Arc<Inner>, offset: u64) -> KernelResult<()> {
        // An unmap of an earlier mapping at these addresses is handled first: handled later,
        // it would cut the new record.
        self.flush();
        self.own.uffd.register(map)?;
        lock(&self.own.ranges).insert(
            map.as_ptr() as usize,
            Range {
                len: map.len(),
                file: Arc::downgrade(file),
                offset,
            },
        );
        Ok(())
    }

    /// Forgets the host mapping at `addr` (about to be unmapped).
    pub(super) fn unregister(&self, addr: usize) {
        let gone = lock(&self.own.ranges).remove(&addr);
        // Its released blocks are forgotten now, not at the unmap's event: a fork before the
        // event is handled would register whatever is mapped there by then (found in review).
        if let Some(r) = gone {
            if let Some(file) = r.file.upgrade() {
                file.released_unmapped_now(addr, r.len);
            }
        }
    }

    /// Serves another address space from now on: a process the file was handed to sent its
    /// userfaultfd.
    pub(super) fn add_space(
        &self,
        uffd: PoisonFd,
        recorded: bool,
        custody: Option<Arc<super::fork::PrivateStream>>,
    ) -> KernelResult<Arc<Space>> {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&uffd.as_fd());
        let custody_fd = custody
            .as_ref()
            .and_then(|c| c.get())
            .map_or(-1, std::os::fd::AsRawFd::as_raw_fd);
        let id = {
            let mut slots = lock(&self.slots);
            let Some(slot) = (1..MAX_SPACES).find(|&i| slots.fds[i] < 0) else {
                // No room to serve it. Its descriptor is kept open, never closed: closing the
                // last descriptor of a userfaultfd unregisters every mapping of that address
                // space, and the process would read private pages freely (found in review).
                // Unserved, its faults wait: refused, never granted.
                std::mem::forget(uffd);
                return Err(Errno::ENOMEM);
            };
            slots.generation[slot] = slots.generation[slot].wrapping_add(1);
            slots.fds[slot] = raw;
            slots.read[slot] = 0;
            slots.held[slot] = 0;
            slots.custody[slot] = custody_fd;
            (u64::from(slots.generation[slot]) << 32) | slot as u64
        };
        let space = Arc::new(Space::new(id, uffd, false, recorded));
        if let Some(c) = custody {
            let _ = space.custody.set(c);
        }
        lock(&self.spaces).insert(id, space.clone());
        if let Err(e) = self.epoll.add(space.uffd.as_fd(), id) {
            // Not served: its slot and record go, its descriptor stays open and recorded
            // (closing a live space's userfaultfd unregisters its mappings: found in review).
            lock(&self.spaces).remove(&id);
            {
                let mut slots = lock(&self.slots);
                #[allow(clippy::cast_possible_truncation)]
                let slot = (id & 0xffff_ffff) as usize;
                if let Some(fd) = slots.fds.get_mut(slot) {
                    *fd = -1;
                }
                if let Some(fd) = slots.custody.get_mut(slot) {
                    *fd = -1;
                }
            }
            std::mem::forget(space);
            return Err(e);
        }
        Ok(space)
    }

    /// [`Guard::add_space`] for a process `file` was handed to: the file stays alive while
    /// that process's address space does; `custody`, this process's end of its custody
    /// stream.
    pub(super) fn add_space_keeping(
        &self,
        uffd: PoisonFd,
        file: &Arc<Inner>,
        custody: super::fork::PrivateStream,
    ) -> KernelResult<()> {
        let space = self.add_space(uffd, false, Some(Arc::new(custody)))?;
        space.keep(file);
        Ok(())
    }

    /// The space `id`, if it is still served.
    pub(super) fn space(&self, id: u64) -> Option<Arc<Space>> {
        lock(&self.spaces).get(&id).cloned()
    }

    /// How many address spaces other than this process's are served (live or not yet found
    /// gone).
    pub(super) fn other_spaces(&self) -> usize {
        lock(&self.spaces).len().saturating_sub(1)
    }

    /// The reader: moves every message of every served userfaultfd into the queue. It
    /// allocates nothing and takes no C library lock (see the module documentation): epoll,
    /// `read(2)`, and std's futex-based mutex and condition variables.
    fn read_all(&self) {
        let mut ready = [0u64; 64];
        loop {
            let Ok(n) = self.epoll.wait_into(&mut ready, -1) else {
                return;
            };
            let mut held = false;
            for &token in &ready[..n] {
                held |= self.read_space(token);
            }
            if held {
                // A held space stays readable (level-triggered): a pause instead of a spin
                // while its hold lasts (microseconds).
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        }
    }

    /// Reads every message queued on the userfaultfd of the space `token`, each under the
    /// slots' lock (a space is dropped, its descriptor closed, held, only under it; an event
    /// is counted with its read), and queues it for the server without the lock (the server
    /// takes it, and the queue may be full). True if the space's events are held (nothing
    /// read).
    fn read_space(&self, token: u64) -> bool {
        #[allow(clippy::cast_possible_truncation)]
        let slot = (token & 0xffff_ffff) as usize;
        loop {
            let mut slots = lock(&self.slots);
            let Some(&fd) = slots.fds.get(slot) else {
                return false;
            };
            if fd < 0 || u64::from(slots.generation[slot]) != token >> 32 {
                return false;
            }
            if slots.held[slot] > 0 {
                return true;
            }
            let msg = match sys::read_uffd_msg(fd) {
                Ok(Some(m)) => m,
                Ok(None) => return false,
                Err(_) => {
                    // The server drops the space if its address space has gone, and keeps
                    // it otherwise (counted as an event, as the server counts it handled).
                    // A pause, so that an error that persists (EMFILE for a fork event)
                    // does not spin.
                    self.events_queued.fetch_add(1, Ordering::SeqCst);
                    slots.read[slot] += 1;
                    drop(slots);
                    self.push(token, sys::RawUffdMsg::default());
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    return false;
                }
            };
            if !msg.is_fault() {
                self.events_queued.fetch_add(1, Ordering::SeqCst);
                slots.read[slot] += 1;
            }
            // A child's userfaultfd is private from the moment the read installed it (an
            // atomic bit: the reader takes no C library lock). A descendant of a received
            // file's process: that process is handed a copy at once (allocation-free, without
            // waiting; one it has no room for is not kept), so that the child is still served
            // once this process has gone (`orphan`).
            if let Some(fd) = msg.fork_fd() {
                super::fork::track_fd(fd);
                if let Some(&c) = slots.custody.get(slot).filter(|&&c| c >= 0) {
                    let sent =
                        sys::peer::send_fd_nonblocking(c, &super::orphan::CUSTODY_RECORD, fd);
                    // Kept for the server to try again (a duplicate: the child's descriptor
                    // is the server's to close with its space).
                    if sent.is_err_and(retryable) && slots.pending.len() < slots.pending.capacity()
                    {
                        // `fd` was installed by the read above and is open until the server
                        // handles the message.
                        if let Ok(dup) = sys::peer::dup_raw(fd) {
                            super::fork::track_fd(dup);
                            slots.pending.push(Pending {
                                token,
                                child: fd,
                                dup,
                            });
                            self.pending_custody.store(true, Ordering::SeqCst);
                        }
                    }
                }
            }
            drop(slots);
            self.push(token, msg);
        }
    }

    /// Waits until the server has handled every event read so far, so that this process's
    /// recorded mappings reflect every `mremap` and `munmap` that has returned (the kernel
    /// lets them go once their event is read, and a read is counted before the reader lets go
    /// of the slots). Without such an event pending it costs a lock and two loads. Called by gmem before it zaps by address or registers a new mapping; never
    /// under a lock the server takes.
    pub(super) fn flush(&self) {
        let target = {
            let _slots = lock(&self.slots);
            self.events_queued.load(Ordering::SeqCst)
        };
        let mut spins = 0u32;
        while self.events_handled.load(Ordering::SeqCst) < target {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Holds `space`'s events unread until the [`Hold`] drops: while held, a change of its
    /// mappings (an `munmap`, `mremap`, `mmap` over a registered range) waits for its event
    /// to be read, and the kernel answers EAGAIN to every `UFFDIO_*` that would install an
    /// entry there. So with a hold, and every event read before it handled ([`Guard::flush`],
    /// or [`Guard::settled`] in the server), what the guard records of the space's mappings
    /// is what they are: an entry installed then lands where the record says (found in
    /// review: a fork child moved a private page under its own marker). Never for this
    /// process's own space.
    pub(super) fn hold(&self, space: &Space) -> Option<Hold<'_>> {
        if space.own {
            return None;
        }
        let mut slots = lock(&self.slots);
        #[allow(clippy::cast_possible_truncation)]
        let slot = (space.id & 0xffff_ffff) as usize;
        let generation = *slots.generation.get(slot)?;
        if u64::from(generation) != space.id >> 32 {
            return None;
        }
        slots.held[slot] += 1;
        Some(Hold {
            guard: self,
            slot,
            generation,
        })
    }

    /// Whether every event of `space` read so far has been handled (for the server, which
    /// handles them, so the answer stays true while it serves one fault under a hold).
    fn settled(&self, space: &Space) -> bool {
        let slots = lock(&self.slots);
        #[allow(clippy::cast_possible_truncation)]
        let slot = (space.id & 0xffff_ffff) as usize;
        if slots.generation.get(slot).map(|&g| u64::from(g)) != Some(space.id >> 32) {
            return false;
        }
        slots.read[slot] == space.handled.load(Ordering::SeqCst)
    }

    /// Queues one message for the server (waiting for room if the queue is full).
    fn push(&self, token: u64, msg: sys::RawUffdMsg) {
        let mut q = lock(&self.queue);
        while q.items.len() >= QUEUE {
            q = self
                .room
                .wait(q)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        q.items.push_back((token, msg));
        drop(q);
        self.queued.notify_one();
    }

    /// The server: serves the queued messages in order and every [`SWEEP_MS`] drops the
    /// spaces that have gone.
    fn serve(&self) {
        let mut last_sweep = std::time::Instant::now();
        let mut last_retry = std::time::Instant::now();
        loop {
            let next = {
                let mut q = lock(&self.queue);
                loop {
                    if let Some(item) = q.items.pop_front() {
                        break Some(item);
                    }
                    // Every 10 ms while a hand-over waits to be sent again.
                    let wait = if self.pending_custody.load(Ordering::SeqCst) {
                        RETRY_MS
                    } else {
                        SWEEP_MS
                    };
                    let (g, timeout) = self
                        .queued
                        .wait_timeout(q, std::time::Duration::from_millis(wait))
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    q = g;
                    if timeout.timed_out() {
                        break None;
                    }
                }
            };
            if let Some((token, msg)) = next {
                self.room.notify_one();
                let event = !msg.is_fault();
                if let Some(space) = self.space(token) {
                    self.handle(&space, msg);
                    if event {
                        space.handled.fetch_add(1, Ordering::SeqCst);
                    }
                } else if let Some(UffdEvent::Fork(child)) = msg.decode() {
                    // A fork in a space no longer served: the child lives, and closing its
                    // descriptor would unregister its mappings; it is served from now on,
                    // with an empty record (its layout is unknown: every access refused).
                    let _ = self.add_space(child, true, None);
                }
                if event {
                    self.events_handled.fetch_add(1, Ordering::SeqCst);
                }
            }
            // By time, not per message: a receiver that stays stopped costs one failing send
            // per round (the stream's first), every 10 ms.
            if self.pending_custody.load(Ordering::SeqCst)
                && last_retry.elapsed().as_millis() >= u128::from(RETRY_MS)
            {
                last_retry = std::time::Instant::now();
                self.retry_custody();
            }
            if last_sweep.elapsed().as_millis() >= u128::from(SWEEP_MS) {
                last_sweep = std::time::Instant::now();
                self.sweep();
            }
        }
    }

    /// Serves one message of `space`'s userfaultfd.
    fn handle(&self, space: &Arc<Space>, msg: sys::RawUffdMsg) {
        match msg.decode() {
            Some(UffdEvent::Fault(ev)) => self.fault(space, ev),
            Some(UffdEvent::Fork(child)) => {
                // The child's mappings are the parent's, at the same addresses, and it keeps
                // their files alive. This process's record is first made what the kernel
                // says (a record of a mapping gone, kept for an address another mapping
                // reuses, would otherwise shadow the live one in the child's record, which
                // has no other source: found by a test, a raw clone child refused a shared
                // page 1 run in 8).
                if space.own {
                    self.reconcile_own(0, usize::MAX);
                }
                let ranges: BTreeMap<usize, Range> = lock(&space.ranges)
                    .iter()
                    .filter(|(_, r)| r.file.strong_count() > 0)
                    .map(|(&a, r)| (a, r.clone()))
                    .collect();
                // The kernel copied the page-table entries of these (write-protect armed)
                // mappings into the child: every page mapped in the parent is mapped in the
                // child too, and a conversion to private must take it from there (replace
                // it). Handled before any later conversion: a conversion first waits until
                // every event read so far is handled (`flush`).
                let mut seen: Vec<*const Inner> = Vec::new();
                for r in ranges.values() {
                    if let Some(f) = r.file.upgrade() {
                        if !seen.contains(&Arc::as_ptr(&f)) {
                            seen.push(Arc::as_ptr(&f));
                            f.forked_from(space.own);
                        }
                    }
                }
                // The child's record: this process's exact record less what the child did
                // not inherit (`MADV_DONTFORK`: it has nothing there, and could put another
                // page of the file there unseen: found in review); a recorded fork child's
                // whole (it can mark nothing `MADV_DONTFORK`); none for the child of a space
                // looked up through `/proc`.
                let dontfork = if space.own {
                    dontfork_ranges()
                } else {
                    Vec::new()
                };
                let mut inherited_ranges: BTreeMap<usize, Range> = BTreeMap::new();
                if space.recorded {
                    for (&a, r) in &ranges {
                        for (s, offset, len) in inherited(a, r.offset, r.len, &dontfork) {
                            inherited_ranges.insert(
                                s,
                                Range {
                                    len,
                                    file: r.file.clone(),
                                    offset,
                                },
                            );
                        }
                    }
                }
                // A descendant of a received file's process: its descendants' userfaultfds
                // go to that process too (the reader handed it this one).
                let custody = space.custody.get().cloned();
                let child_fd = child.raw_fd();
                let kept = custody.is_some();
                if let Ok(new) = self.add_space(child, space.recorded, custody) {
                    if kept {
                        self.rekey_pending(space.id, child_fd, new.id);
                    }
                    for r in ranges.values() {
                        if let Some(f) = r.file.upgrade() {
                            new.keep(&f);
                        }
                    }
                    // The fork copied the parent's poison markers too: they are the child's
                    // now, to be replaced by the page when it is shared again (found in
                    // review: the child kept SIGBUS on pages shared since) — where the
                    // child's record holds the parent's mapping. The child of a space looked
                    // up through `/proc` gets none recorded (it keeps SIGBUS on those pages:
                    // refused, never granted).
                    if space.recorded {
                        for &f in &seen {
                            let Some(file) = ranges
                                .values()
                                .filter_map(|r| r.file.upgrade())
                                .find(|x| Arc::as_ptr(x) == f)
                            else {
                                continue;
                            };
                            let kept: Vec<(usize, u64, usize)> = inherited_ranges
                                .iter()
                                .filter(|(_, r)| r.file.as_ptr() == f)
                                .map(|(&a, r)| (a, r.offset, r.len))
                                .collect();
                            file.markers_forked(space.own, space.id, new.id, &kept);
                        }
                        *lock(&new.ranges) = inherited_ranges;
                    }
                }
            }
            Some(UffdEvent::Remap { from, to, len }) => self.remap(space, from, to, len),
            Some(UffdEvent::Unmap { start, end }) => self.unmap(space, start, end),
            Some(UffdEvent::Other(_)) => {}
            // The reader could not read the descriptor: stop serving the space only if its
            // address space has gone (closing a live one's descriptor would unregister its
            // mappings: found in review).
            None => {
                if !space.alive() {
                    self.drop_space(space);
                }
            }
        }
    }

    /// One fault: the file's check decides; an address no file claims gets a marker.
    fn fault(&self, space: &Arc<Space>, ev: FaultEvent) {
        let page = ev.address & !(PAGE_SIZE - 1);
        let Ok(addr) = usize::try_from(page) else {
            return;
        };
        // In another space, the lookup and what the fault installs must agree with its
        // mappings as they are: its events are held, and a fault served while one of them
        // is read but not handled is not served (the faulting thread faults again, after it).
        let hold = self.hold(space);
        if !space.own && (hold.is_none() || !self.settled(space)) {
            let _ = space.uffd.wake(page, PAGE_SIZE);
            return;
        }
        // A fault in one of gmem's own views: registered by a race (a record made stale by a
        // raw `munmap` whose event is not handled yet, a view mapped into the hole, then a
        // registration at the recorded address). A view is never a host mapping: it is
        // unregistered whole (which wakes the faulting thread, whose retry is the view's
        // plain fault) and the stale record there forgotten — never served or refused by
        // the gate, which gmem's own access may be holding (the platform's make-shared hook
        // works through the views under it: found in review, a deadlock).
        if space.own {
            let view = {
                let views = sys::own_views();
                views
                    .range(..=addr)
                    .next_back()
                    .filter(|&(_, &e)| e > addr)
                    .map(|(&s, &e)| (s, e))
            };
            if let Some((s, e)) = view {
                let _ = space.uffd.unregister(s as u64, (e - s) as u64);
                cut(&mut lock(&space.ranges), s, e);
                let _ = space.uffd.wake(page, PAGE_SIZE);
                return;
            }
        }
        // This process's mappings are gmem's records, and what `/proc/self/maps` says of an
        // address they miss (a duplicate made by a raw `mremap`); a recorded fork child's are
        // its record alone (an address it misses, a part grown in place, is refused: its
        // filter allows no growth); a received file's process is read afresh from the
        // kernel at every fault. Never the maps of the thread the fault names, for a space
        // whose record exists: for a remote access (`process_vm_readv`, `/proc/<pid>/mem`)
        // it is the accessing thread, in another address space (found in review).
        let found = if space.own {
            space.lookup(addr).or_else(|| {
                self.find_in_proc(space, addr, None)
                    .map(|(file, offset)| (file, offset, PAGE_SIZE))
            })
        } else if space.recorded {
            space.lookup(addr)
        } else {
            self.find_in_proc(space, addr, Some(ev.tid))
                .map(|(file, offset)| (file, offset, PAGE_SIZE))
        };
        match found {
            Some((file, offset, room)) => {
                file.serve_host_fault(space, page, offset, room, ev.minor);
            }
            None => {
                let _ = space.uffd.poison(page, PAGE_SIZE as usize);
                let _ = space.uffd.wake(page, PAGE_SIZE);
            }
        }
    }

    /// The file and offset at `addr` of `space`, from `/proc/<tid>/maps` of the faulting
    /// thread (`None`: this process's own, `/proc/self/maps`): the mapping's inode names a
    /// live file of this process, its offset the place in it. Recorded in the space.
    fn find_in_proc(
        &self,
        space: &Space,
        addr: usize,
        tid: Option<u32>,
    ) -> Option<(Arc<Inner>, u64)> {
        let path = match tid {
            None => "/proc/self/maps".to_string(),
            Some(0) => return None,
            Some(t) => format!("/proc/{t}/maps"),
        };
        // (A fault in one of this process's own views never gets here: `fault` unregisters
        // the view first.)
        let maps = std::fs::read_to_string(path).ok()?;
        let (s, e, off, ino) = maps
            .lines()
            .filter_map(maps_line)
            .find(|&(s, e, _, _)| s <= addr && addr < e)?;
        let files = lock(&self.files);
        let file = files.get(&ino)?.upgrade()?;
        space.keep(&file);
        lock(&space.ranges).insert(
            s,
            Range {
                len: e - s,
                file: Arc::downgrade(&file),
                offset: off,
            },
        );
        Some((file, off + (addr - s) as u64))
    }

    /// Makes this process's records of `[lo, hi)` what the kernel says is mapped there now
    /// (`/proc/self/maps`): every mapping of a live file of this process overlapping it is
    /// recorded whole, and nothing else. An event is handled after the change it reports,
    /// possibly after later changes by other threads (a `munmap` lets its range go before
    /// its event is read, so a new mapping can be made and registered there first): applied
    /// blindly, it would cut or move the newer record, and a conversion would then not zap
    /// that mapping. The maps are read under the ranges' lock, so a registration either
    /// comes after (and is kept) or its mapping is seen. If the maps cannot be read the
    /// records stay as the event left them.
    fn reconcile_own(&self, lo: usize, hi: usize) {
        let files = lock(&self.files);
        let mut ranges = lock(&self.own.ranges);
        // gmem's own views map the same files: never host mappings (read under their lock,
        // so no view is made or unmapped while the maps are read).
        let views = sys::own_views();
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
            return;
        };
        let live: Vec<(usize, usize, u64, Weak<Inner>)> = maps
            .lines()
            .filter_map(maps_line)
            .filter(|&(s, e, _, _)| s < hi && e > lo && !sys::is_own_view(&views, s, e))
            .filter_map(|(s, e, off, ino)| {
                let f = files.get(&ino)?;
                (f.strong_count() > 0).then(|| (s, e, off, f.clone()))
            })
            .collect();
        let lo = live.iter().map(|v| v.0).fold(lo, usize::min);
        let hi = live.iter().map(|v| v.1).fold(hi, usize::max);
        cut(&mut ranges, lo, hi);
        for (s, e, offset, file) in live {
            ranges.insert(
                s,
                Range {
                    len: e - s,
                    file,
                    offset,
                },
            );
        }
    }

    /// `mremap` in `space`: this process's ranges move with their mappings (a duplicate is a
    /// new range of the same file, found by its faults through `/proc/self/maps`); a fork
    /// child's record moves the same way (what was at the destination went with its own
    /// unmap event); a receiver's cache is forgotten; the markers recorded there move with
    /// their entries.
    pub(super) fn remap(&self, space: &Space, from: u64, to: u64, len: u64) {
        let (Ok(from), Ok(to), Ok(len)) = (
            usize::try_from(from),
            usize::try_from(to),
            usize::try_from(len),
        ) else {
            return;
        };
        let mut ranges = lock(&space.ranges);
        if !space.own {
            // The markers moved with their page-table entries.
            if space.recorded {
                // The destination was unmapped first (its own event); what was moved
                // starts at `to` now.
                cut(&mut ranges, to, to.saturating_add(len));
                for (lo, r) in cut(&mut ranges, from, from.saturating_add(len)) {
                    ranges.insert(to + (lo - from), r);
                }
            } else {
                ranges.clear();
            }
            drop(ranges);
            for file in self.live_files() {
                file.markers_moved(space.id, from as u64, to as u64, len as u64);
            }
            return;
        }
        if len == 0 {
            // A duplicate: recorded from the kernel's maps, and registered whole where it maps
            // a file whose blocks may be released (a duplicate of a released block inherits its
            // write-protect-only registration: found in review).
            drop(ranges);
            self.reconcile_own(to, to.saturating_add(1));
            self.register_new_extent(to);
            return;
        }
        // Moved: the part of each range inside [from, from + len) now starts at `to`; then
        // both places are checked against the kernel (the event may be late).
        for (lo, r) in cut(&mut ranges, from, from.saturating_add(len)) {
            ranges.insert(to + (lo - from), r);
        }
        drop(ranges);
        self.reconcile_own(from, from.saturating_add(len));
        self.reconcile_own(to, to.saturating_add(len));
        for file in self.live_files() {
            file.released_moved(self, from as u64, len as u64, Some(to as u64));
        }
        // A growth's new part (`len` is the old length) inherits the registration of the
        // mapping it grew from: registered whole again where that could be a released
        // block's write-protect-only one.
        self.register_new_extent(to);
    }

    /// After a duplicate or a move to `to` in this process: the recorded mapping holding `to`,
    /// if it maps a file whose blocks may be released, is guarded again whole
    /// ([`Guard::reguard_own`]; it was recorded by [`Guard::reconcile_own`] from the kernel's
    /// maps): a copy of a released block inherits its write-protect-only registration and its
    /// `MADV_DONTFORK`.
    fn register_new_extent(&self, to: usize) {
        let found = {
            let ranges = lock(&self.own.ranges);
            ranges
                .range(..=to)
                .next_back()
                .filter(|(&s, r)| to < s + r.len)
                .map(|(&s, r)| (s, r.len, r.file.clone(), r.offset))
        };
        let Some((s, len, file, offset)) = found else {
            return;
        };
        let Some(file) = file.upgrade() else {
            return;
        };
        if file.may_release() && self.kernel_maps(s, len, file.ino, offset) {
            let _ = self.reguard_own(s, len);
        }
    }

    /// `munmap` in `space` of `[start, end)`: this process's ranges lose that part (nothing
    /// is touched there afterwards), and so does a fork child's record; a receiver's cache
    /// is forgotten; the markers recorded there go.
    pub(super) fn unmap(&self, space: &Space, start: u64, end: u64) {
        let (Ok(start), Ok(end)) = (usize::try_from(start), usize::try_from(end)) else {
            return;
        };
        let mut ranges = lock(&space.ranges);
        if !space.own {
            if space.recorded {
                cut(&mut ranges, start, end);
            } else {
                ranges.clear();
            }
            drop(ranges);
            // The markers went with the mapping.
            for file in self.live_files() {
                file.markers_unmapped(space.id, start as u64, end as u64);
            }
            return;
        }
        cut(&mut ranges, start, end);
        drop(ranges);
        // A mapping made there since the unmap (and registered before this event) stays.
        self.reconcile_own(start, end);
        for file in self.live_files() {
            file.released_moved(self, start as u64, (end - start) as u64, None);
        }
    }

    /// The files of this process that are alive (whose markers other spaces may hold).
    fn live_files(&self) -> Vec<Arc<Inner>> {
        lock(&self.files)
            .values()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Records that this process's host mapping at `addr` is now `len` bytes long (after
    /// the library's own `mremap`, whose events are handled: an in-place growth has none).
    pub(super) fn resize_range(&self, addr: usize, len: usize) {
        let mut ranges = lock(&self.own.ranges);
        let Some(r) = ranges.get(&addr).cloned() else {
            return;
        };
        cut(&mut ranges, addr, addr.saturating_add(len));
        ranges.insert(addr, Range { len, ..r });
    }

    /// `MADV_DONTNEED` on this process's host mappings of `file` over the file's `[start,
    /// end)`, at the addresses the guard knows them by (moved by `mremap`, cut by `munmap`:
    /// the caller flushes first, before it takes the file's gate, so that every such call
    /// that has returned is accounted for). `each` runs before each zap (fault injection).
    #[allow(unsafe_code)] // The one zap by address outside `sys`: see the SAFETY comment.
    pub(super) fn zap_own(
        &self,
        file: &Inner,
        start: u64,
        end: u64,
        mut each: impl FnMut() -> KernelResult<()>,
    ) -> KernelResult<()> {
        let ranges = lock(&self.own.ranges);
        for (&addr, r) in ranges.iter() {
            if !std::ptr::eq(r.file.as_ptr(), file) {
                continue;
            }
            let (s, e) = (start.max(r.offset), end.min(r.offset + r.len as u64));
            if s >= e {
                continue;
            }
            each()?;
            // Both below `r.len`, a usize.
            #[allow(clippy::cast_possible_truncation)]
            let (at, n) = (addr + (s - r.offset) as usize, (e - s) as usize);
            // SAFETY: `[at, at + n)` is part of a `MAP_SHARED` host mapping of `file` in this
            // process as of every mremap and munmap that has returned (their events are
            // handled; the ranges' lock keeps the server from changing the record meanwhile).
            // DONTNEED there drops page-table entries only; the data stays in the file.
            unsafe { sys::madvise_range(at, n, libc::MADV_DONTNEED)? };
        }
        Ok(())
    }

    /// Maps the file's pages of `[start, end)` (present in the file, shared) in this
    /// process's host mappings of `file` (`UFFDIO_CONTINUE`), under the file's gate. Best
    /// effort: a page with an entry already, or missing from the file, is left to fault.
    pub(super) fn premap_own(&self, file: &Inner, start: u64, end: u64) {
        let ranges = lock(&self.own.ranges);
        for (&addr, r) in ranges.iter() {
            if !std::ptr::eq(r.file.as_ptr(), file) {
                continue;
            }
            let (s, e) = (start.max(r.offset), end.min(r.offset + r.len as u64));
            if s < e {
                let _ = self
                    .own
                    .uffd
                    .continue_page(addr as u64 + (s - r.offset), e - s);
            }
        }
    }

    /// Whether `[addr, addr + len)` lies inside one recorded host mapping of `file` in this
    /// process, mapping file offset `offset` at `addr`.
    pub(super) fn own_maps(&self, file: &Inner, addr: usize, len: usize, offset: u64) -> bool {
        let ranges = lock(&self.own.ranges);
        let Some((&s, r)) = ranges.range(..=addr).next_back() else {
            return false;
        };
        std::ptr::eq(r.file.as_ptr(), file)
            && addr.checked_add(len).is_some_and(|e| e <= s + r.len)
            && r.offset + (addr - s) as u64 == offset
    }

    /// Whether an event (fork, remap, unmap) has been read but not yet handled.
    pub(super) fn events_pending(&self) -> bool {
        // Under the slots' lock, as in `flush`: the reader reads an event and counts it under
        // it, and the read itself lets the forking thread go on (found in review: between the
        // two, a release saw no fork pending).
        let _slots = lock(&self.slots);
        self.events_handled.load(Ordering::SeqCst) < self.events_queued.load(Ordering::SeqCst)
    }

    /// Whether a recorded host mapping of `file` in this process other than the one at
    /// `except` maps any of the file's bytes `[start, end)`.
    pub(super) fn own_maps_elsewhere(
        &self,
        file: &Inner,
        except: usize,
        start: u64,
        end: u64,
    ) -> bool {
        lock(&self.own.ranges).iter().any(|(&addr, r)| {
            addr != except
                && std::ptr::eq(r.file.as_ptr(), file)
                && r.offset < end
                && start < r.offset + r.len as u64
        })
    }

    /// Whether the kernel maps `[addr, addr + len)` of this process as one mapping of the file
    /// with inode `inode`, at file offset `offset` for `addr` (`PROCMAP_QUERY`; before Linux
    /// 6.11, `/proc/self/maps`). The guard's record may be late (an unmap's event not yet
    /// handled, another mapping made there since): a release zaps and re-registers, which
    /// must never reach another mapping (found in review: a late fault released an anonymous
    /// mapping made at a recorded address, and zeroed it).
    pub(super) fn kernel_maps(&self, addr: usize, len: usize, inode: u64, offset: u64) -> bool {
        // One of gmem's own views maps the file with the same inode and offsets: never a host
        // mapping (found in review: a late event's re-registration could take a view made at
        // a host mapping's old address for it, and a fork child then inherited its entries).
        if sys::is_own_view(&sys::own_views(), addr, addr.saturating_add(len)) {
            return false;
        }
        let (a, l) = (addr as u64, len as u64);
        let fits = |s: u64, e: u64, off: u64, ino: u64| {
            s <= a && e >= a + l && ino == inode && off + (a - s) == offset
        };
        match sys::vma_at(a) {
            Ok(Some(v)) => fits(v.start, v.end, v.offset, v.inode),
            Ok(None) => false,
            Err(_) => std::fs::read_to_string("/proc/self/maps").is_ok_and(|maps| {
                maps.lines()
                    .filter_map(maps_line)
                    .any(|(s, e, off, ino)| fits(s as u64, e as u64, off, ino))
            }),
        }
    }

    /// Registers in the guard's modes every part of this process's recorded host mappings of
    /// `file` that maps file bytes `[start, end)`: a conversion's fail-closed step for a file
    /// whose blocks were released, so that whatever the bookkeeping of released blocks might
    /// miss is checked again before the conversion zaps it (the review that found the
    /// mappings made from a released block by `mremap` advised it). A VMA registered already
    /// is skipped by the kernel: one system call per mapping. At the recorded addresses, as
    /// the zap that follows (every event read is handled first). Err: a registration failed.
    pub(super) fn register_own_file(&self, file: &Inner, start: u64, end: u64) -> KernelResult<()> {
        let mut ranges = lock(&self.own.ranges);
        // gmem's own views are never registered, not even where a stale record covers one:
        // their table is held across the registrations (after the records' lock, as
        // everywhere), so no view is made or unmapped in between (found in review: a view
        // registered here would make the platform's make-shared hook, which touches views
        // under the gate, wait for a fault the server cannot serve without the gate).
        let views = sys::own_views();
        // Collected fallibly (a conversion's path, before its point of no return).
        let mut starts: Vec<usize> = Vec::new();
        starts
            .try_reserve_exact(ranges.len())
            .map_err(|_| Errno::ENOMEM)?;
        starts.extend(ranges.keys().copied());
        for (&addr, r) in ranges.iter_mut() {
            if !std::ptr::eq(r.file.as_ptr(), file) {
                continue;
            }
            // The next recorded mapping: a VMA reaching into it is not a growth (adjacent
            // released blocks merge into one VMA across records: found in review).
            let next = starts
                .iter()
                .copied()
                .find(|&a| a > addr)
                .unwrap_or(usize::MAX);
            // A mapping grown in place by a raw `mremap` makes no event (a released block at
            // its end gave the new part write-protect-only registration: found in review): the
            // kernel is asked where the mapping ends now, and the record follows.
            let last = (addr + r.len - 1) as u64;
            if let Ok(Some(v)) = sys::vma_at(last) {
                let at_last = r.offset + r.len as u64 - 1;
                if v.inode == file.ino
                    && v.end > last + 1
                    && v.end <= next as u64
                    && v.offset + (last - v.start) == at_last
                    && !sys::is_own_view(&views, addr + r.len, v.end as usize)
                {
                    #[allow(clippy::cast_possible_truncation)] // An address range: a usize.
                    let grown = (v.end - addr as u64) as usize;
                    // The new part is guarded whole (and inherited by children again: it took
                    // the released block's `MADV_DONTFORK`).
                    self.reguard_own(addr + r.len, grown - r.len)?;
                    r.len = grown;
                }
            }
            let (s, e) = (start.max(r.offset), end.min(r.offset + r.len as u64));
            if s < e {
                // The parts of `[lo, hi)` outside every view, registered.
                let (mut lo, hi) = (
                    addr + (s - r.offset) as usize,
                    addr + (e - r.offset) as usize,
                );
                // A piece with nothing mapped in it (a stale record's, cut by a view made
                // in its hole) is EINVAL to the kernel: nothing there to guard (found in
                // review: the conversion failed).
                let register = |a: usize, b: usize| match self
                    .own
                    .uffd
                    .register_range(a as u64, (b - a) as u64)
                {
                    Err(e)
                        if e == Errno(libc::EINVAL)
                            && match sys::vma_at_or_above(a as u64) {
                                Ok(None) => true,
                                Ok(Some(v)) => v.start >= b as u64,
                                Err(_) => false,
                            } =>
                    {
                        Ok(())
                    }
                    r => r,
                };
                for (&vs, &ve) in views.range(..hi) {
                    if ve <= lo {
                        continue;
                    }
                    if vs > lo {
                        register(lo, vs)?;
                    }
                    lo = lo.max(ve);
                }
                if lo < hi {
                    register(lo, hi)?;
                }
            }
        }
        Ok(())
    }

    /// *Releases* the 2 MiB block of this process's host mapping at `addr` (2 MiB-aligned,
    /// recorded as a mapping of a wholly shared block of a file of huge folios; the caller
    /// holds the file's gate): its faults are the kernel's from now on, which maps the
    /// block's folio with one PMD, until [`Guard::reguard_own`]. In order: `MADV_DONTFORK`
    /// (no child, however made, inherits it: a raw `clone` child would have it unguarded),
    /// `MADV_HUGEPAGE`, `MADV_DONTNEED` of the entries the guard had mapped while every
    /// fault there still waits for the gate (the emptied page table is reclaimed, so the next
    /// fault can map a PMD), then registered in write-protect mode alone (unregistered
    /// first: a registered range keeps its modes; `munmap`, `mremap` and the THP collapse's
    /// refusal still apply). The unregistration wakes the threads waiting there; their
    /// retry is the kernel's fault (found by a test: with the zap after it, a retry in
    /// between mapped 4 KiB and kept the page table). Err: nothing changed (the block is
    /// guarded as before), except if both registrations failed, which leaves it released
    /// (`Ok`) without the write-protect mode's events.
    #[allow(unsafe_code)] // madvise by address: see the SAFETY comments.
    pub(super) fn release_own_block(&self, addr: usize) -> KernelResult<()> {
        let len = super::HUGE_SIZE as usize;
        // SAFETY: `[addr, addr + len)` is a `MAP_SHARED` host mapping of a file of this
        // process (the caller checked the record under the gate, after every event read was
        // handled); DONTFORK and HUGEPAGE change only VMA flags (what a child inherits, what
        // a fault may map), DONTNEED drops page-table entries only (the block is wholly
        // shared: no data is lost).
        unsafe {
            sys::madvise_raw(addr, len, libc::MADV_DONTFORK)?;
            let _ = sys::madvise_raw(addr, len, libc::MADV_HUGEPAGE);
            let _ = sys::madvise_raw(addr, len, libc::MADV_DONTNEED);
        }
        let uffd = &self.own.uffd;
        let undo = |e: Errno| {
            // SAFETY: as above; the block is inherited again, registered as it was.
            unsafe {
                let _ = sys::madvise_raw(addr, len, libc::MADV_DOFORK);
                let _ = sys::madvise_raw(addr, len, libc::MADV_NOHUGEPAGE);
            }
            Err(e)
        };
        if let Err(e) = uffd.unregister(addr as u64, len as u64) {
            return undo(e);
        }
        if let Err(e) = uffd.register_wp_only(addr as u64, len as u64) {
            if uffd.register_range(addr as u64, len as u64).is_ok() {
                return undo(e);
            }
            // Neither registration found the block: another thread moved or unmapped it in
            // the moment it was unregistered, with no event (found in review). It is not
            // recorded as released; the record is made what the kernel maps, so that the next
            // conversion's fail-closed step ([`Guard::register_own_file`]) registers and zaps
            // it wherever it went (its pages are all shared until then).
            self.reconcile_own(0, usize::MAX);
            return Err(e);
        }
        Ok(())
    }

    /// Guards `[addr, addr + len)` of this process's host mappings again after
    /// [`Guard::release_own_block`] (the caller holds the file's gate): registered in the
    /// guard's modes, so every fault on a page without an entry is checked again — the
    /// caller zaps what the kernel mapped — and then inherited by children again, without
    /// `MADV_HUGEPAGE` (as every host mapping is made). Err: the registration failed and the
    /// range is still released.
    #[allow(unsafe_code)] // madvise by address: see the SAFETY comment.
    pub(super) fn reguard_own(&self, addr: usize, len: usize) -> KernelResult<()> {
        self.own.uffd.register_range(addr as u64, len as u64)?;
        // SAFETY: `[addr, addr + len)` is (part of) a released block of a host mapping of
        // this process: a `MAP_SHARED` mapping of a file of the caller's; both advices
        // change only VMA flags.
        unsafe {
            let _ = sys::madvise_raw(addr, len, libc::MADV_DOFORK);
            let _ = sys::madvise_raw(addr, len, libc::MADV_NOHUGEPAGE);
        }
        Ok(())
    }

    /// Clears this process's marker at `addr` if a host mapping of `file` is still there
    /// (flushed first, as for [`Guard::zap_own`]).
    #[allow(unsafe_code)] // As in `zap_own`.
    pub(super) fn zap_own_page(&self, file: &Inner, addr: usize) {
        let ranges = lock(&self.own.ranges);
        let Some((&s, r)) = ranges.range(..=addr).next_back() else {
            return;
        };
        if addr >= s + r.len || !std::ptr::eq(r.file.as_ptr(), file) {
            return;
        }
        // SAFETY: as in `zap_own`: one page of a host mapping of `file` in this process.
        let _ = unsafe { sys::madvise_range(addr, PAGE_SIZE as usize, libc::MADV_DONTNEED) };
    }

    fn drop_space(&self, space: &Space) {
        if space.own {
            return;
        }
        space.dead.store(true, Ordering::Relaxed);
        let _ = self.epoll.remove(space.uffd.as_fd());
        // Its descriptor closes when the last reference to the space goes; the space is
        // gone, so a fork child that still got it could do nothing with it.
        super::fork::untrack_fd(space.uffd.raw_fd());
        {
            let mut slots = lock(&self.slots);
            #[allow(clippy::cast_possible_truncation)]
            let slot = (space.id & 0xffff_ffff) as usize;
            if slots.generation.get(slot).map(|&g| u64::from(g)) == Some(space.id >> 32) {
                slots.fds[slot] = -1;
                slots.custody[slot] = -1;
            }
        }
        lock(&self.spaces).remove(&space.id);
    }

    /// Sends again the hand-overs the reader could not (the custody stream full). An entry
    /// goes once sent, once the slot it is keyed to is gone, or on an error that is not
    /// worth another try; a stream that is still full is not tried again this round (each
    /// costs a failing `sendmsg`, under the slots' lock the reader needs).
    fn retry_custody(&self) {
        let mut slots = lock(&self.slots);
        let mut full = [-1; 8];
        let mut i = 0;
        while i < slots.pending.len() {
            let p = slots.pending[i];
            #[allow(clippy::cast_possible_truncation)]
            let slot = (p.token & 0xffff_ffff) as usize;
            let live = slots.generation.get(slot).map(|&g| u64::from(g)) == Some(p.token >> 32);
            let custody = slots.custody.get(slot).copied().unwrap_or(-1);
            if live && custody >= 0 && full.contains(&custody) {
                i += 1;
                continue;
            }
            let outcome = if live && custody >= 0 {
                sys::peer::send_fd_nonblocking(custody, &super::orphan::CUSTODY_RECORD, p.dup)
            } else {
                Err(Errno(libc::EPIPE))
            };
            match outcome {
                Err(e) if retryable(e) => {
                    match full.iter_mut().find(|c| **c < 0) {
                        Some(c) => *c = custody,
                        None => break,
                    }
                    i += 1;
                }
                _ => {
                    slots.pending.swap_remove(i);
                    Self::close_pending(p);
                }
            }
        }
        self.pending_custody
            .store(!slots.pending.is_empty(), Ordering::SeqCst);
    }

    /// Keys the kept hand-over of `child` (the descriptor a fork event of space `parent`
    /// installed) to the child's own space `new`, which holds the same custody stream: the
    /// child outlives its parent's slot.
    fn rekey_pending(&self, parent: u64, child: libc::c_int, new: u64) {
        let mut slots = lock(&self.slots);
        for p in &mut slots.pending {
            if p.token == parent && p.child == child {
                p.token = new;
            }
        }
    }

    /// Forgets and closes the duplicate a kept hand-over owns (no lock: a fork child that got
    /// it in between has it replaced by kind, as for a dropped space).
    fn close_pending(p: Pending) {
        super::fork::untrack_fd(p.dup);
        sys::peer::close_raw_fd(p.dup);
    }

    /// Drops the kept hand-overs of children that have gone (checked every sweep).
    fn prune_pending(&self) {
        let mut slots = lock(&self.slots);
        let mut i = 0;
        while i < slots.pending.len() {
            let p = slots.pending[i];
            if sys::uffd_space_alive(p.dup) {
                i += 1;
            } else {
                slots.pending.swap_remove(i);
                Self::close_pending(p);
            }
        }
        self.pending_custody
            .store(!slots.pending.is_empty(), Ordering::SeqCst);
    }

    /// Drops the spaces whose address space has gone (their files' references go with them).
    fn sweep(&self) {
        if self.pending_custody.load(Ordering::SeqCst) {
            self.prune_pending();
        }
        let spaces: Vec<Arc<Space>> = lock(&self.spaces).values().cloned().collect();
        for s in spaces {
            // Not while an event read from it waits in the queue (found in review: a fork
            // event of a descendant that had exited then found no space, and its child got
            // no custody stream — nor its kept hand-over, dropped with the parent's slot).
            if !s.alive() && !self.events_unhandled(&s) {
                self.drop_space(&s);
            }
        }
    }

    /// Whether an event read from `space`'s userfaultfd is not handled yet (queued).
    fn events_unhandled(&self, space: &Space) -> bool {
        let slots = lock(&self.slots);
        #[allow(clippy::cast_possible_truncation)]
        let slot = (space.id & 0xffff_ffff) as usize;
        slots.generation.get(slot).map(|&g| u64::from(g)) == Some(space.id >> 32)
            && slots.read[slot] != space.handled.load(Ordering::SeqCst)
    }
}

/// One line of `/proc/<pid>/maps` ("start-end perms offset dev inode path"): start, end,
/// offset and inode.
/// This process's ranges marked `MADV_DONTFORK` (`VmFlags` "dc" in `/proc/self/smaps`),
/// which a fork child does not inherit. If smaps cannot be read, everything counts as not
/// inherited (nothing is recorded for the child).
fn dontfork_ranges() -> Vec<(usize, usize)> {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return vec![(0, usize::MAX)];
    };
    let mut out = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(r) = current {
                if flags.split_whitespace().any(|f| f == "dc") {
                    out.push(r);
                }
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    current = Some((a, b));
                }
            }
        }
    }
    out
}

/// The parts of range `[addr, addr + len)` (of file offset `offset`) a fork child inherited:
/// outside `dontfork`, as (address, offset, length).
fn inherited(
    addr: usize,
    offset: u64,
    len: usize,
    dontfork: &[(usize, usize)],
) -> Vec<(usize, u64, usize)> {
    let mut parts = vec![(addr, addr + len)];
    for &(a, b) in dontfork {
        parts = parts
            .into_iter()
            .flat_map(|(s, e)| {
                if b <= s || a >= e {
                    vec![(s, e)]
                } else {
                    [(s, a.max(s)), (b.min(e), e)]
                        .into_iter()
                        .filter(|(x, y)| x < y)
                        .collect()
                }
            })
            .collect();
    }
    parts
        .into_iter()
        .map(|(s, e)| (s, offset + (s - addr) as u64, e - s))
        .collect()
}

fn maps_line(line: &str) -> Option<(usize, usize, u64, u64)> {
    let mut f = line.split_whitespace();
    let (range, _, off, _, ino) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    let (s, e) = range.split_once('-')?;
    Some((
        usize::from_str_radix(s, 16).ok()?,
        usize::from_str_radix(e, 16).ok()?,
        u64::from_str_radix(off, 16).ok()?,
        ino.parse::<u64>().ok()?,
    ))
}

/// Takes the parts of `ranges` inside `[from, to)` out, returning each as (its start, the
/// range from there); the parts outside stay.
fn cut(ranges: &mut BTreeMap<usize, Range>, from: usize, to: usize) -> Vec<(usize, Range)> {
    let hit: Vec<(usize, Range)> = ranges
        .range(..to)
        .filter(|(&s, r)| s + r.len > from)
        .map(|(&s, r)| (s, r.clone()))
        .collect();
    let mut out = Vec::with_capacity(hit.len());
    for (s, r) in hit {
        ranges.remove(&s);
        let (lo, hi) = (s.max(from), (s + r.len).min(to));
        if s < lo {
            ranges.insert(
                s,
                Range {
                    len: lo - s,
                    ..r.clone()
                },
            );
        }
        if hi < s + r.len {
            ranges.insert(
                hi,
                Range {
                    len: s + r.len - hi,
                    offset: r.offset + (hi - s) as u64,
                    ..r.clone()
                },
            );
        }
        out.push((
            lo,
            Range {
                len: hi - lo,
                offset: r.offset + (lo - s) as u64,
                file: r.file,
            },
        ));
    }
    out
}
