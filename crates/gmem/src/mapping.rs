//! Host mappings of a guest_memfd, and faulting accesses run so that SIGBUS is reported
//! instead of fatal.
//!
//! A [`HostMapping`] is what `mmap()` of a guest_memfd returns: the same physical memory the
//! guest uses, shared pages read/write in place, private pages raising a real SIGBUS (the
//! kernel's, on the kernel backend; a userfaultfd poison marker or a hole mapping, on the
//! emulated one).
//!
//! [`probe`] runs one access in a child process that shares this process's memory
//! (`clone(CLONE_VM | CLONE_VFORK)`) but not its signal handlers: the child installs its own
//! SIGBUS/SIGSEGV handlers, so a fault is reported with its address and code, and the calling
//! process never has a process-wide handler installed. A `fork()` child would not do: its
//! copy of a shared mapping starts without the parent's PTEs (and so without poison markers).

use std::fmt;
use std::sync::Arc;

use crate::error::{Errno, KernelResult};
use crate::sys::Mmap;

/// Who must hear of a mapping's end (the emulated file revokes private pages in every live
/// mapping, so it keeps a list).
pub(crate) trait MappingRegistry: Send + Sync {
    /// The mapping `id` is about to be unmapped.
    fn unregister(&self, id: u64);
}

/// How a mapping is shared, as `mmap()`'s `MAP_SHARED` / `MAP_PRIVATE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// `MAP_SHARED`: the only kind guest_memfd accepts.
    Shared,
    /// `MAP_PRIVATE` (copy-on-write): refused with EINVAL.
    Private,
}

/// A host userspace mapping of (part of) a guest_memfd. Unmapped on drop.
pub struct HostMapping {
    map: Mmap,
    file_offset: u64,
    registration: Option<(Arc<dyn MappingRegistry>, u64)>,
}

impl fmt::Debug for HostMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostMapping")
            .field("addr", &self.map.as_ptr())
            .field("len", &self.map.len())
            .field("file_offset", &self.file_offset)
            .finish()
    }
}

impl HostMapping {
    pub(crate) fn new(
        map: Mmap,
        file_offset: u64,
        registration: Option<(Arc<dyn MappingRegistry>, u64)>,
    ) -> Self {
        HostMapping {
            map,
            file_offset,
            registration,
        }
    }

    /// First byte of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// Length in bytes (may exceed the file: accesses past its end raise SIGBUS).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The file offset the mapping starts at.
    pub fn file_offset(&self) -> u64 {
        self.file_offset
    }

    /// The underlying mapping.
    pub fn mmap(&self) -> &Mmap {
        &self.map
    }

    fn check(&self, off: usize, len: usize) -> KernelResult<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(Errno::EFAULT),
        }
    }

    /// Copies `[off, off + buf.len())` of the mapping into `buf`.
    ///
    /// This is a plain memory access: on a private page (or past the end of the file) the
    /// process receives SIGBUS, exactly as with any access to a guest_memfd mapping. Use
    /// [`HostMapping::probe_read`] to have the fault reported, or the file's safe accessors
    /// to get a typed error. Fails with EFAULT only when the range is outside the mapping.
    pub fn read_volatile(&self, off: usize, buf: &mut [u8]) -> KernelResult<()> {
        self.check(off, buf.len())?;
        // SAFETY: the range is inside this live mapping (checked); volatile byte copies make
        // no assumption about concurrent writers (guest, other mappings).
        unsafe { volatile_copy(self.as_ptr().add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into the mapping at `off`. SIGBUS on a private page, as
    /// [`HostMapping::read_volatile`].
    pub fn write_volatile(&self, off: usize, data: &[u8]) -> KernelResult<()> {
        self.check(off, data.len())?;
        // SAFETY: as in `read_volatile`; the destination is inside the live mapping.
        unsafe { volatile_copy(data.as_ptr(), self.as_ptr().add(off), data.len()) };
        Ok(())
    }

    /// Writes `value` to the first byte of every page of `[off, off + len)` (faulting them in).
    /// SIGBUS on a private page, as [`HostMapping::read_volatile`].
    pub fn touch_pages(&self, off: usize, len: usize, value: u8) -> KernelResult<()> {
        self.check(off, len)?;
        let mut p = off;
        while p < off + len {
            // SAFETY: inside this live mapping (checked); volatile so it is not elided.
            unsafe { self.as_ptr().add(p).write_volatile(value) };
            p += crate::sys::PAGE_SIZE as usize;
        }
        Ok(())
    }

    /// Reads `len` bytes at `off` in a child process, so that a fault is reported.
    pub fn probe_read(&self, off: usize, len: usize) -> KernelResult<Probe<Vec<u8>>> {
        self.check(off, len)?;
        // SAFETY: the range is inside this live mapping, which outlives the call.
        unsafe { probe(self.as_ptr().add(off), len, ProbeOp::Read) }
            .map(|p| p.rebase(self.as_ptr()))
    }

    /// Fills `len` bytes at `off` with `byte` in a child process, so that a fault is reported.
    pub fn probe_write(&self, off: usize, len: usize, byte: u8) -> KernelResult<Probe<()>> {
        self.check(off, len)?;
        // SAFETY: the range is inside this live mapping, which outlives the call.
        let p = unsafe { probe(self.as_ptr().add(off), len, ProbeOp::Fill(byte)) }?;
        Ok(match p.rebase(self.as_ptr()) {
            Probe::Done(_) => Probe::Done(()),
            Probe::Fault(f) => Probe::Fault(f),
        })
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // Unregister before the address range is released: once unregistered no conversion
        // touches it, so a later mapping that reuses the address is never revoked by mistake.
        if let Some((registry, id)) = self.registration.take() {
            registry.unregister(id);
        }
    }
}

/// Copies `len` bytes with volatile accesses (u64-wide where both sides are aligned).
///
/// # Safety
/// Both ranges must be valid for `len` bytes and not overlap.
pub unsafe fn volatile_copy(src: *const u8, dst: *mut u8, len: usize) {
    let mut i = 0;
    if (src as usize) % 8 == (dst as usize) % 8 {
        while i < len && (src as usize + i) % 8 != 0 {
            // SAFETY: i < len and both ranges are valid for len bytes (caller).
            unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
            i += 1;
        }
        while i + 8 <= len {
            // SAFETY: in bounds as above, and both pointers are 8-aligned here.
            unsafe {
                dst.add(i)
                    .cast::<u64>()
                    .write_volatile(src.add(i).cast::<u64>().read_volatile());
            }
            i += 8;
        }
    }
    while i < len {
        // SAFETY: i < len and both ranges are valid for len bytes (caller).
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
        i += 1;
    }
}

/// A fault raised by a probed access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// `SIGBUS` or `SIGSEGV`.
    pub signal: i32,
    /// `si_code` (`BUS_ADRERR`, `BUS_MCEERR_AR`, `SEGV_ACCERR`, ...).
    pub code: i32,
    /// Faulting address; after [`HostMapping::probe_read`], the offset into the mapping.
    pub addr: u64,
}

impl Fault {
    /// Whether the fault is a SIGBUS.
    pub fn is_sigbus(&self) -> bool {
        self.signal == libc::SIGBUS
    }
}

/// What a probed access did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe<T> {
    /// The access completed.
    Done(T),
    /// The access faulted.
    Fault(Fault),
}

impl<T> Probe<T> {
    fn rebase(self, base: *mut u8) -> Probe<T> {
        match self {
            Probe::Fault(mut f) => {
                f.addr = f.addr.wrapping_sub(base as u64);
                Probe::Fault(f)
            }
            done => done,
        }
    }

    /// The fault, if the access faulted.
    pub fn fault(&self) -> Option<Fault> {
        match self {
            Probe::Fault(f) => Some(*f),
            Probe::Done(_) => None,
        }
    }

    /// Whether the access raised SIGBUS.
    pub fn is_sigbus(&self) -> bool {
        self.fault().is_some_and(|f| f.is_sigbus())
    }
}

/// The access a probe performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOp {
    /// Read every byte.
    Read,
    /// Write this byte to every byte.
    Fill(u8),
}

/// The fd number the probe child reports a fault on (in its own fd table).
const PROBE_REPORT_FD: libc::c_int = 1000;

#[repr(C)]
struct ProbeArgs {
    addr: *mut u8,
    len: usize,
    op: ProbeOp,
    out: *mut u8,
    report_fd: libc::c_int,
}

extern "C" fn probe_fault_handler(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (addr, code) = unsafe { ((*info).si_addr() as u64, (*info).si_code) };
    let rec: [u64; 3] = [sig as u64, code as u64, addr];
    // SAFETY: write(2) and exit(2) are async-signal-safe; `rec` is a valid 24-byte buffer.
    unsafe {
        libc::write(
            PROBE_REPORT_FD,
            rec.as_ptr().cast(),
            std::mem::size_of_val(&rec),
        );
        libc::syscall(libc::SYS_exit, 1);
    }
}

extern "C" fn probe_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the parent's `ProbeArgs`, alive while the parent waits (vfork).
    let a = unsafe { &*arg.cast::<ProbeArgs>() };
    // SAFETY: this child has its own fd table and signal handlers (no CLONE_FILES, no
    // CLONE_SIGHAND), so changing them does not affect the parent. Each struct passed is
    // fully initialised.
    unsafe {
        libc::dup2(a.report_fd, PROBE_REPORT_FD);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = probe_fault_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGBUS);
        libc::sigaddset(&mut set, libc::SIGSEGV);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    for i in 0..a.len {
        // SAFETY: the parent guaranteed `[addr, addr + len)` is mapped (it may fault, which
        // is the point) and that `out` has `len` bytes for a read.
        unsafe {
            match a.op {
                ProbeOp::Read => a.out.add(i).write(a.addr.add(i).read_volatile()),
                ProbeOp::Fill(b) => a.addr.add(i).write_volatile(b),
            }
        }
    }
    // SAFETY: exit(2) of this child only; it has no Rust state to tear down.
    unsafe { libc::syscall(libc::SYS_exit, 0) };
    0
}

/// Performs `op` on `[addr, addr + len)` in a child process that shares this address space,
/// and reports whether it faulted.
///
/// # Safety
/// `[addr, addr + len)` must belong to a mapping that stays mapped for the duration of the
/// call (faulting is fine: that is what this reports). With [`ProbeOp::Fill`] the caller must
/// be entitled to write those bytes.
pub unsafe fn probe(addr: *mut u8, len: usize, op: ProbeOp) -> KernelResult<Probe<Vec<u8>>> {
    const STACK: usize = 256 * 1024;
    let stack = Mmap::new(
        None,
        0,
        STACK,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
    )?;
    let mut out = vec![0u8; if op == ProbeOp::Read { len } else { 0 }];
    let mut pipe = [0 as libc::c_int; 2];
    // SAFETY: `pipe` has room for the two descriptors.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(Errno::last());
    }
    let mut args = ProbeArgs {
        addr,
        len,
        op,
        out: out.as_mut_ptr(),
        report_fd: pipe[1],
    };
    // SAFETY: the child runs `probe_child` on its own stack (top of `stack`, 16-aligned), in
    // this address space (CLONE_VM); CLONE_VFORK suspends this thread until the child exits,
    // so `args`, `out` and `stack` outlive it.
    let pid = unsafe {
        libc::clone(
            probe_child,
            stack.as_ptr().add(STACK).cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut args as *mut ProbeArgs).cast(),
        )
    };
    let clone_err = Errno::last();
    let mut status = 0;
    if pid > 0 {
        // SAFETY: reaps our own child; `status` is a valid out-pointer.
        unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
    }
    let mut rec = [0u64; 3];
    // SAFETY: reads at most 24 bytes into `rec`; the fds are ours and closed exactly once.
    let n = unsafe {
        let n = libc::read(
            pipe[0],
            rec.as_mut_ptr().cast(),
            std::mem::size_of_val(&rec),
        );
        libc::close(pipe[0]);
        libc::close(pipe[1]);
        n
    };
    if pid <= 0 {
        return Err(clone_err);
    }
    if n == 24 {
        // The values were written from an i32 signal number and si_code.
        #[allow(clippy::cast_possible_truncation)]
        return Ok(Probe::Fault(Fault {
            signal: rec[0] as i32,
            code: rec[1] as i32,
            addr: rec[2],
        }));
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(Probe::Done(out))
    } else {
        Err(Errno(libc::ECHILD))
    }
}
