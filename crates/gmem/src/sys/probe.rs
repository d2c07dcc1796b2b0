//! The faulting-access probe: one access run in a child process that shares this process's
//! memory (`clone(CLONE_VM | CLONE_VFORK)`) but not its signal handlers, so that a SIGBUS or
//! SIGSEGV is reported with its address and code instead of being fatal (see
//! [`crate::mapping`]).

use super::Mmap;
use crate::error::{Errno, KernelResult};
use crate::mapping::{Fault, Probe, ProbeOp};

/// The fd number the probe child reports a fault on, in its own fd table (a copy: the child
/// is created without CLONE_FILES, so replacing its stdin leaves the parent's alone). 0 is
/// below any descriptor limit a process can run with (a fixed high number such as 1000 is not:
/// under `ulimit -n 1000` the `dup2` failed, the report was lost and probes gave ECHILD).
const PROBE_REPORT_FD: libc::c_int = 0;

#[repr(C)]
struct ProbeArgs {
    addr: *mut u8,
    len: usize,
    op: ProbeOp,
    out: *mut u8,
    report_fd: libc::c_int,
    /// Where `close_range` failed before: one past the highest descriptor open at the probe
    /// (0: not known, the child falls back to the descriptor limit).
    close_upto: libc::c_int,
}

/// Set by a probe child when `close_range` failed (before Linux 5.9, or refused by a seccomp
/// profile): the next probes read the highest open descriptor first, so the child closes only
/// those (the child shares this memory, so it can say so).
static CLOSE_RANGE_FAILED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// One past the highest descriptor open in this process (from `/proc/self/fd`), if known.
fn close_upto() -> libc::c_int {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<libc::c_int>().ok())
                .max()
                .map_or(0, |m| m.saturating_add(1))
        })
        .unwrap_or(0)
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
        // A no-op if the pipe already is fd 0; a failure would lose the report: say so.
        if libc::dup2(a.report_fd, PROBE_REPORT_FD) != PROBE_REPORT_FD {
            libc::syscall(libc::SYS_exit, 2);
        }
        // Every other descriptor is a copy of the parent's that this child does not need and
        // must not keep alive: a probe that waits on a fault (a userfaultfd the parent serves)
        // while holding the peer end of a channel made for a concurrent fork kept that channel
        // open after the forked process exited, and the parent's next conversion waited the
        // full peer timeout for an EOF that only came when the probe ended (EAGAIN under
        // stress). The child would close them all when it exits anyway (flushes included);
        // this only does it first. close_range(2) is Linux 5.9+; where it fails each is closed
        // alone: up to the highest descriptor the parent found open (from the second such
        // probe on), else up to the hard descriptor limit (the soft one may have been lowered
        // below open descriptors), at most 2^20. These calls set `errno`, which this child
        // shares with the suspended parent thread; the parent reads it only when `clone`
        // itself failed, when no child ran.
        if libc::syscall(libc::SYS_close_range, 1u32, u32::MAX, 0u32) != 0 {
            CLOSE_RANGE_FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
            let mut lim: libc::rlimit = std::mem::zeroed();
            let max = if a.close_upto > 0 {
                a.close_upto
            } else if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_max.max(lim.rlim_cur).min(1 << 20) as libc::c_int
            } else {
                1 << 16
            };
            for fd in 1..max {
                libc::close(fd);
            }
        }
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
        // is the point) and that `out` has room for `len` bytes for a read.
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

/// Performs `op` on `[off, off + len)` of `map` in a child process that shares this address
/// space, and reports whether it faulted (the fault address is absolute). EFAULT outside the
/// mapping.
pub fn probe(map: &Mmap, off: usize, len: usize, op: ProbeOp) -> KernelResult<Probe<Vec<u8>>> {
    map.check_access(off, len)?;
    // SAFETY: inside the mapping (checked), which `map` keeps mapped for the whole call.
    let addr = unsafe { map.as_ptr().add(off) };
    const STACK: usize = 256 * 1024;
    let stack = Mmap::new(
        None,
        0,
        STACK,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
    )?;
    // Fallible: a length the mapping allows may still be more memory than there is (ENOMEM,
    // not an abort). Not filled up front: the child writes the bytes it reads, and the length
    // is set only once it read them all, so a read that faults early touches little memory.
    let mut out: Vec<u8> = Vec::new();
    if op == ProbeOp::Read {
        out.try_reserve_exact(len).map_err(|_| Errno::ENOMEM)?;
    }
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
        close_upto: if CLOSE_RANGE_FAILED.load(std::sync::atomic::Ordering::Relaxed) {
            close_upto()
        } else {
            0
        },
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
        if op == ProbeOp::Read {
            // SAFETY: the child exited normally, so it wrote all `len` bytes into `out`'s
            // reserved capacity (same address space, CLONE_VM).
            unsafe { out.set_len(len) };
        }
        Ok(Probe::Done(out))
    } else {
        Err(Errno(libc::ECHILD))
    }
}
