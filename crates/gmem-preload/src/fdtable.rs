//! Which descriptors and mappings are the interposer's, and what they stand for.
//!
//! The fast path of every interposed call is [`owned`] (or, for `close` and `dup*`,
//! [`tracked`]): one relaxed load from a bitmap indexed by descriptor number. Only a set bit
//! leads to the [`Registry`] (one mutex), where the entry says which object the descriptor
//! refers to. There are two bitmaps: descriptors every call of which the interposer answers
//! (emulated files, the emulated gup_test, pipes holding page references), and VM descriptors,
//! on which only a handful of ioctls are the interposer's (so `KVM_IRQ_LINE` and the other VM
//! ioctls of a running VMM keep the fast path); both count for `close` and `dup*`. State belongs to the open file, not to the
//! number: `dup` and friends add the same object under the new number, and each entry
//! remembers the (device, inode) of the descriptor, so a number closed behind the interposer's
//! back (a raw syscall, `close_range` by a library) and reused for another file is recognised
//! and forgotten instead of misrouted.

use std::collections::BTreeMap;
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use gmem::{EmulatedGuestMemfd, HostMapping, PinGuard};

/// Descriptors below this are tracked in the bitmap; above it, one flag sends every call on
/// a high descriptor to the registry once the interposer owns any such descriptor.
const BITMAP_FDS: usize = 1 << 16;
static BITMAP: [AtomicU64; BITMAP_FDS / 64] = [const { AtomicU64::new(0) }; BITMAP_FDS / 64];
static VM_BITMAP: [AtomicU64; BITMAP_FDS / 64] = [const { AtomicU64::new(0) }; BITMAP_FDS / 64];
static HIGH_FDS: AtomicBool = AtomicBool::new(false);
/// Number of live entries in [`Registry::maps`]: `munmap`/`madvise` skip the registry at 0.
static MAPPINGS: AtomicUsize = AtomicUsize::new(0);

#[inline(always)]
fn bit(map: &[AtomicU64; BITMAP_FDS / 64], fd: c_int) -> bool {
    if fd < 0 {
        return false;
    }
    let fd = fd as usize;
    if fd < BITMAP_FDS {
        map[fd / 64].load(Ordering::Relaxed) & (1 << (fd % 64)) != 0
    } else {
        HIGH_FDS.load(Ordering::Relaxed)
    }
}

/// Whether `fd` may be a descriptor every call of which the interposer answers (an emulated
/// file, the emulated gup_test, a pipe holding references). No lock, no syscall.
#[inline(always)]
pub(crate) fn owned(fd: c_int) -> bool {
    bit(&BITMAP, fd)
}

/// Whether `fd` may be any descriptor of the interposer's, VMs included (`close`, `dup*`).
#[inline(always)]
pub(crate) fn tracked(fd: c_int) -> bool {
    bit(&BITMAP, fd) || bit(&VM_BITMAP, fd)
}

/// The process whose descriptor table the interposer's records describe (0: none yet).
static TABLE_OWNER: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Whether the calling process's descriptor table is the one the records describe, so a
/// `close` or `dup2` here may change them. A child made by `vfork` or `clone(CLONE_VM)`
/// shares the interposer's memory with its parent but has a table of its own: its changes
/// to descriptors are its own (CPython's `subprocess` closes every descriptor before `exec`)
/// and leave the records alone. A copy of the memory (`fork`, `clone` without `CLONE_VM`)
/// has its own copy of the records and takes them over.
pub(crate) fn table_is_ours() -> bool {
    // SAFETY: getpid cannot fail (glibc does not cache it).
    let me = unsafe { libc::getpid() };
    let owner = TABLE_OWNER.load(Ordering::Relaxed);
    if owner == me {
        return true;
    }
    if owner != 0 {
        // SAFETY: kcmp compares two processes' address spaces; it reads nothing of ours.
        let same_vm = unsafe {
            libc::syscall(libc::SYS_kcmp, me, owner, 0 /* KCMP_VM */, 0, 0)
        };
        let gone = same_vm < 0 && crate::user::errno() == libc::ESRCH;
        if same_vm == 0 || (same_vm < 0 && !gone) {
            // The owner's memory (or no way to tell: leave the records alone).
            return false;
        }
    }
    TABLE_OWNER.store(me, Ordering::Relaxed);
    true
}

/// Whether the program has any mapping of an emulated file.
#[inline(always)]
pub(crate) fn any_mapping() -> bool {
    MAPPINGS.load(Ordering::Relaxed) != 0
}

/// Sets (for `object`) or clears (`None`: in both bitmaps) the bit of `fd`.
fn set_bit(fd: c_int, object: Option<&Object>) {
    let Ok(fd) = usize::try_from(fd) else { return };
    if fd < BITMAP_FDS {
        let bit = 1u64 << (fd % 64);
        match object {
            Some(Object::Vcpu(_)) => {}
            Some(Object::Vm(_)) => {
                VM_BITMAP[fd / 64].fetch_or(bit, Ordering::Relaxed);
            }
            Some(_) => {
                BITMAP[fd / 64].fetch_or(bit, Ordering::Relaxed);
            }
            None => {
                BITMAP[fd / 64].fetch_and(!bit, Ordering::Relaxed);
                VM_BITMAP[fd / 64].fetch_and(!bit, Ordering::Relaxed);
            }
        }
    } else if object.is_some() {
        HIGH_FDS.store(true, Ordering::Relaxed);
    }
}

/// A VM created through the interposer (every `KVM_CREATE_VM`).
#[derive(Debug)]
pub(crate) struct Vm {
    /// Distinguishes VMs (a file bound in another VM is EINVAL).
    pub(crate) id: u64,
    /// The type the program asked for.
    pub(crate) vm_type: u64,
    /// Whether it is one of the emulated protected types (has private memory).
    pub(crate) protected: bool,
    /// Memslots by `slot` (address space in the high 16 bits). Its lock serialises memslot
    /// changes of the VM.
    pub(crate) slots: Mutex<BTreeMap<u32, Slot>>,
}

/// A memslot as the program made it: where it is in guest physical memory, the host address
/// the kernel's slot maps (for a guest_memfd slot, the file's guest view), and the binding.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) gpa: u64,
    pub(crate) size: u64,
    pub(crate) userspace_addr: u64,
    /// `Some` for a guest_memfd slot.
    pub(crate) binding: Option<Binding>,
}

impl Slot {
    /// A slot of ordinary memory (no guest_memfd).
    pub(crate) fn plain(gpa: u64, size: u64, userspace_addr: u64) -> Slot {
        Slot {
            gpa,
            size,
            userspace_addr,
            binding: None,
        }
    }
}

/// A guest_memfd binding of a memslot: it keeps the file (and its guest view, which the
/// memslot maps) alive until the slot is deleted.
#[derive(Debug)]
pub(crate) struct Binding {
    pub(crate) file: Arc<Gmem>,
    pub(crate) offset: u64,
    pub(crate) size: u64,
}

/// An emulated guest_memfd, as one open file.
#[derive(Debug)]
pub(crate) struct Gmem {
    pub(crate) file: EmulatedGuestMemfd,
    /// The VM that created it.
    pub(crate) vm_id: u64,
    /// Whether that VM has private memory.
    pub(crate) vm_protected: bool,
}

/// Page references the program holds on emulated files (an emulated `gup_test` session, or
/// pages `vmsplice`d into a pipe): held until the descriptor closes (or `PIN_LONGTERM_TEST_STOP`).
#[derive(Debug, Default)]
pub(crate) struct Pins(pub(crate) Mutex<Vec<PinGuard>>);

/// What an owned descriptor refers to.
#[derive(Debug, Clone)]
pub(crate) enum Object {
    Vm(Arc<Vm>),
    Gmem(Arc<Gmem>),
    /// The emulated `/sys/kernel/debug/gup_test`.
    GupTest(Arc<Pins>),
    /// A pipe holding `vmsplice`d pages of an emulated file.
    Pipe(Arc<Pins>),
    /// A vCPU of a VM created through the interposer: recorded for `KVM_PRE_FAULT_MEMORY`
    /// only, in neither bitmap, so its other calls (`KVM_RUN`) stay on the fast path.
    Vcpu(Arc<Vm>),
}

impl Object {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Object::Vm(_) => "vm",
            Object::Gmem(_) => "guest_memfd",
            Object::GupTest(_) => "gup_test",
            Object::Pipe(_) => "pipe",
            Object::Vcpu(_) => "vcpu",
        }
    }
}

#[derive(Debug)]
struct Entry {
    object: Object,
    dev: u64,
    ino: u64,
}

/// A host mapping of an emulated file, kept until the program unmaps all of it.
#[derive(Debug)]
pub(crate) struct MapEntry {
    pub(crate) mapping: HostMapping,
    pub(crate) file: Arc<Gmem>,
    /// Bytes of it the program has unmapped (replaced by an inaccessible reservation, so the
    /// addresses stay the mapping's until it goes as a whole).
    pub(crate) unmapped: usize,
}

impl MapEntry {
    pub(crate) fn start(&self) -> usize {
        self.mapping.as_ptr() as usize
    }
    pub(crate) fn end(&self) -> usize {
        self.start() + self.mapping.len()
    }
}

/// The interposer's tables.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    fds: BTreeMap<c_int, Entry>,
    /// Host mappings by start address.
    pub(crate) maps: BTreeMap<usize, MapEntry>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    fds: BTreeMap::new(),
    maps: BTreeMap::new(),
});

/// The registry, locked (never held across a call into the program or a blocking syscall).
/// Held across every layout change that involves an emulated file's mapping: an emulated
/// file's `mmap` (mapping and registering it, or checking a fixed range and placing it) and a
/// `munmap` that reaches one (removing, unmapping, unmapping the rest). Without it a check
/// could go stale: a fixed mapping placed where a concurrent `munmap` was still releasing
/// another, or where a concurrent `mmap` of an emulated file had just landed, and a mapping
/// dropped later unmapped the other's range (found in review). Taken before the registry's
/// lock; never by gmem's own calls (they are inside the slow path or reach no registered
/// range).
static LAYOUT: Mutex<()> = Mutex::new(());

pub(crate) fn layout() -> MutexGuard<'static, ()> {
    LAYOUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The locks a fork takes, in the interposer's order, so a child never inherits one held by
/// another thread (found in review: a thread waiting in gmem's `mmap` under [`LAYOUT`] while
/// another forked left the child's first `munmap` waiting for ever).
type ForkHeld = (MutexGuard<'static, ()>, MutexGuard<'static, Registry>);

thread_local! {
    static FORK_HELD: std::cell::RefCell<Option<ForkHeld>> =
        const { std::cell::RefCell::new(None) };
}

extern "C" fn fork_prepare() {
    let held = (layout(), registry());
    FORK_HELD.with(|h| *h.borrow_mut() = Some(held));
}

extern "C" fn fork_release() {
    FORK_HELD.with(|h| drop(h.borrow_mut().take()));
}

/// Installs the interposer's fork handlers once, after gmem's (called once gmem has made a
/// file, which installs gmem's): *prepare* handlers run in the reverse order of their
/// installation, so these take [`LAYOUT`] and [`REGISTRY`] before gmem takes its fork lock —
/// the order every other path takes them in (`LAYOUT`, then gmem).
pub(crate) fn install_fork_handlers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: pthread_atfork stores three function pointers to functions of this library,
        // which is never unloaded while the program runs.
        unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_release), Some(fork_release)) };
    });
}

fn dev_ino(fd: c_int) -> Option<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstat writes a `struct stat` into the buffer, which is large enough.
    let r = unsafe { libc::fstat(fd, st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: fstat succeeded, so the struct is initialised.
    let st = unsafe { st.assume_init() };
    Some((st.st_dev, st.st_ino))
}

/// Records that `fd` refers to `object`.
pub(crate) fn register(fd: c_int, object: Object) {
    // The records now describe this process's table (a new one in a CLONE_VM child is not
    // supported: it would be the parent's records).
    let _ = TABLE_OWNER.compare_exchange(
        0,
        // SAFETY: getpid cannot fail.
        unsafe { libc::getpid() },
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let (dev, ino) = dev_ino(fd).unwrap_or((0, 0));
    let mut reg = registry();
    set_bit(fd, Some(&object));
    reg.fds.insert(fd, Entry { object, dev, ino });
}

/// The object behind `fd`, if it is still the descriptor that was registered.
pub(crate) fn lookup(fd: c_int) -> Option<Object> {
    let (object, dev, ino) = {
        let reg = registry();
        let e = reg.fds.get(&fd)?;
        (e.object.clone(), e.dev, e.ino)
    };
    if dev_ino(fd) == Some((dev, ino)) {
        Some(object)
    } else {
        // Closed and reused behind the interposer's back: forget it.
        forget(fd);
        None
    }
}

/// Forgets `fd` (it is being closed or replaced). Returns what it referred to.
pub(crate) fn forget(fd: c_int) -> Option<Object> {
    let mut reg = registry();
    set_bit(fd, None);
    reg.fds.remove(&fd).map(|e| e.object)
}

/// `new` is a duplicate of `old` (same open file): it refers to the same object.
pub(crate) fn duplicate(old: c_int, new: c_int) {
    let mut reg = registry();
    if let Some(e) = reg.fds.get(&old) {
        let entry = Entry {
            object: e.object.clone(),
            dev: e.dev,
            ino: e.ino,
        };
        set_bit(new, Some(&entry.object));
        reg.fds.insert(new, entry);
    }
}

/// Adds a host mapping.
pub(crate) fn add_mapping(reg: &mut Registry, entry: MapEntry) {
    reg.maps.insert(entry.start(), entry);
    MAPPINGS.store(reg.maps.len(), Ordering::Relaxed);
}

/// Removes the mapping starting at `start`.
pub(crate) fn remove_mapping(reg: &mut Registry, start: usize) -> Option<MapEntry> {
    let e = reg.maps.remove(&start);
    MAPPINGS.store(reg.maps.len(), Ordering::Relaxed);
    e
}

/// Start addresses of the mappings that overlap `[addr, addr + len)`.
pub(crate) fn overlapping(reg: &Registry, addr: usize, len: usize) -> Vec<usize> {
    let end = addr.saturating_add(len);
    reg.maps
        .range(..end)
        .filter(|(_, m)| m.end() > addr)
        .map(|(s, _)| *s)
        .collect()
}

thread_local! {
    static INSIDE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is inside the interposer's slow path: gmem's own calls from there
/// (revoking pages with `madvise`, unmapping a dropped mapping) go straight to the C library,
/// unseen by the registry and the trace.
pub(crate) fn inside() -> bool {
    INSIDE.with(|c| c.get())
}

/// Marks this thread as inside the slow path until dropped.
#[derive(Debug)]
pub(crate) struct Inside(bool);

impl Inside {
    pub(crate) fn enter() -> Self {
        Inside(INSIDE.with(|c| c.replace(true)))
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        let prev = self.0;
        INSIDE.with(|c| c.set(prev));
    }
}
