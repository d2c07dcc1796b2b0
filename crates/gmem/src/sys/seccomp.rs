//! Seccomp filters: the calls that would take a mapping of an emulated file out of the guard's
//! sight, which the kernel's guest_memfd needs no rule for (its fault handler checks every
//! mapping however it was made, and a process cannot impersonate another to it) and gmem's
//! guard — a userfaultfd registration per mapping, looked up through `/proc/<tid>/maps` —
//! does.
//!
//! **In every process with an emulated file** ([`refuse_remap_file_pages`], from the first
//! file a process makes or receives; every thread through `SECCOMP_FILTER_FLAG_TSYNC`,
//! inherited by every child, kept across `exec`, removable by none):
//! - `remap_file_pages(2)`, emulated since Linux 3.16 by a fresh `mmap(MAP_FIXED)` of the
//!   mapping's own file at any offset, which inherits no registration and makes no event: on
//!   a host mapping it mapped any page of the memory file, private ones included (found in
//!   review, December 2026). EPERM, for every mapping (the filter cannot tell which file a
//!   range maps).
//! - `shmat(2)` with `SHM_REMAP`, which replaces whatever is mapped at an address with no
//!   unmap event, so the guard's record of what an address maps could go stale (found in
//!   review). EPERM; `shmat` without it is untouched.
//!
//! **In fork children of a process with host mappings** ([`restrict_fork_child`], from the
//! fork child handler, by system calls only):
//! - userfaultfds: `userfaultfd(2)`, `USERFAULTFD_IOC_NEW`, and the calls that install a
//!   page with one — `UFFDIO_CONTINUE`, `UFFDIO_COPY`, `UFFDIO_ZEROPAGE`. With a userfaultfd
//!   of its own (any user may make one, in user mode) a child could `UFFDIO_CONTINUE` a
//!   private page into the host mapping it inherited, or have a process it sends the
//!   descriptor to do it (a userfaultfd acts on the address space it was made for, from
//!   anywhere: found in review, twice) — the kernel checks that the mapping is registered,
//!   not with which userfaultfd. EPERM. A program the child executes can therefore not
//!   receive a file, and its own emulated files use the Remap mechanism; spawn such programs
//!   with `posix_spawn` or `vfork` (Rust's `Command` without `pre_exec`), which run no fork
//!   handler.
//! - `mremap` to another length (a growth, a duplicate of old length 0, a shrink): the
//!   kernel's event tells only the old length, so a grown part, which may cover an address
//!   the child's record still names, would map a page of the file unseen, and a shrinking
//!   move's event, sent before the tail is unmapped, moves the tail's record over whatever
//!   lies beyond the new end. EPERM (the C library's `realloc` falls back to copying; a
//!   shrink is an `munmap`).
//! - `prctl(PR_SET_PDEATHSIG)` to anything but SIGKILL: the child dies with the thread that
//!   forked it (once the owner has gone nothing guards its mappings) and may not cancel that.
//!   EPERM.
//! - new pid (and user) namespaces — `clone`/`unshare` with `CLONE_NEWPID` or
//!   `CLONE_NEWUSER`, `setns`, and `clone3`, whose flags a filter cannot read (ENOSYS: the C
//!   library falls back to `clone`): the thread id a fault reports is counted in the faulting
//!   thread's pid namespace, so a thread of a grandchild in a new one could name another
//!   process, whose maps the guard would then read (found in review). EPERM.
//! - every call of another ABI: x32 (numbers of its own, off in common kernels) and the
//!   32-bit compat ABI, whose calls take the low halves of the registers the filter sees
//!   whole (found in review: an `int 0x80` `mremap` passed the growth check).
//!
//! Installing a filter needs `CAP_SYS_ADMIN` or `no_new_privs`; without the capability gmem
//! sets `no_new_privs` (a set-user-ID program the process executes later gains no
//! privileges). If another thread already has a filter of its own (a VMM that filters per
//! thread), `TSYNC` is refused and the process-wide filter is installed on the calling thread
//! only, which covers every thread and child it creates afterwards; [`RemapFilePages`] says
//! which.

use std::sync::OnceLock;

use crate::error::Errno;

/// How `remap_file_pages(2)` (and `shmat` with `SHM_REMAP`) is refused in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemapFilePages {
    /// In every thread and every child (EPERM).
    Refused,
    /// In the thread that made the first emulated file and every thread and child it creates
    /// since; thread `tid`, which had a filter of its own, and its siblings of that time are
    /// not covered.
    RefusedFromThisThread {
        /// The thread whose own filter refused the synchronisation.
        tid: i64,
    },
    /// Not refused: the kernel offers no seccomp filter (the errno of the attempt).
    NotRefused(Errno),
}

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
const AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const ST: u16 = libc::BPF_ST as u16;
const LDX_MEM: u16 = (libc::BPF_LDX | libc::BPF_W | libc::BPF_MEM) as u16;
const JEQ_X: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_X) as u16;
/// Offsets in `struct seccomp_data`: the call's number, the architecture, the arguments (the
/// low 32 bits of argument `i` at `ARGS + 8 * i`, little-endian).
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARGS: u32 = 16;

const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

/// The system call numbers the filters name, per ABI.
struct Abi {
    arch: u32,
    remap_file_pages: u32,
    /// `shmat`, and the argument holding its flags.
    shmat: (u32, u32),
    /// i386's `ipc` multiplexer (call `SHMAT` = 21 in argument 0, flags in argument 2).
    ipc: Option<u32>,
    ioctl: u32,
    userfaultfd: u32,
    mremap: u32,
    prctl: u32,
    unshare: u32,
    clone: u32,
    clone3: u32,
    setns: u32,
}

#[cfg(target_arch = "x86_64")]
const NATIVE: Abi = Abi {
    arch: 0xC000_003E,
    remap_file_pages: 216,
    shmat: (30, 2),
    ipc: None,
    ioctl: 16,
    userfaultfd: 323,
    mremap: 25,
    prctl: 157,
    unshare: 272,
    clone: 56,
    clone3: 435,
    setns: 308,
};
#[cfg(target_arch = "x86_64")]
const COMPAT: Abi = Abi {
    arch: 0x4000_0003,
    remap_file_pages: 257,
    shmat: (397, 2),
    ipc: Some(117),
    ioctl: 54,
    userfaultfd: 374,
    mremap: 163,
    prctl: 172,
    unshare: 310,
    clone: 120,
    clone3: 435,
    setns: 346,
};
/// x32 calls carry this bit on the native architecture.
#[cfg(target_arch = "x86_64")]
const X32: Option<u32> = Some(0x4000_0000);

#[cfg(target_arch = "aarch64")]
const NATIVE: Abi = Abi {
    arch: 0xC000_00B7,
    remap_file_pages: 234,
    shmat: (196, 2),
    ipc: None,
    ioctl: 29,
    userfaultfd: 282,
    mremap: 216,
    prctl: 167,
    unshare: 97,
    clone: 220,
    clone3: 435,
    setns: 268,
};
#[cfg(target_arch = "aarch64")]
const COMPAT: Abi = Abi {
    arch: 0x4000_0028,
    remap_file_pages: 253,
    shmat: (305, 2),
    ipc: None,
    ioctl: 54,
    userfaultfd: 388,
    mremap: 163,
    prctl: 172,
    unshare: 337,
    clone: 120,
    clone3: 435,
    setns: 375,
};
#[cfg(target_arch = "aarch64")]
const X32: Option<u32> = None;

/// `SHM_REMAP`.
const SHM_REMAP: u32 = 0o40000;
/// `UFFDIO_CONTINUE`, `UFFDIO_COPY`, `UFFDIO_ZEROPAGE` (`_IOWR(0xAA, n, struct)`; the
/// structures have the same size in every ABI).
const UFFDIO_CONTINUE: u32 = 0xC020_AA07;
const UFFDIO_COPY: u32 = 0xC028_AA03;
const UFFDIO_ZEROPAGE: u32 = 0xC020_AA04;
/// `USERFAULTFD_IOC_NEW` (`/dev/userfaultfd`): `_IO(0xAA, 0x00)`.
const USERFAULTFD_IOC_NEW: u32 = 0xAA00;

const NEW_NAMESPACES: u32 = (libc::CLONE_NEWPID | libc::CLONE_NEWUSER) as u32;

/// One instruction of a filter before its jumps are resolved: jumps name a label; a jump not
/// taken falls through.
#[derive(Clone, Copy)]
enum Op {
    Ld(u32),
    /// `A &= k`.
    And(u32),
    /// `M[k] = A`.
    St(u32),
    /// `X = M[k]`.
    LdxMem(u32),
    /// Jump to the label if `A == X`.
    JeqX(usize),
    /// Jump to the label if the accumulator equals the constant.
    Jeq(u32, usize),
    /// Jump to the label if the accumulator has a bit of the constant.
    Jset(u32, usize),
    Ret(u32),
    Label(usize),
}

/// Resolves the labels of `ops` into a classic BPF program. Panics only on a program this
/// module wrote wrongly (a label used but never placed, a jump of more than 255): the tests
/// build both programs.
fn assemble(ops: &[Op]) -> Vec<libc::sock_filter> {
    let mut at = std::collections::BTreeMap::new();
    let mut n = 0usize;
    for op in ops {
        match op {
            Op::Label(l) => {
                at.insert(*l, n);
            }
            _ => n += 1,
        }
    }
    let mut prog = Vec::with_capacity(n);
    for op in ops {
        let here = prog.len();
        let jump = |l: &usize| -> u8 {
            let to = at[l];
            assert!(to > here, "a filter jump goes forward");
            u8::try_from(to - here - 1).expect("a filter jump fits in 8 bits")
        };
        let (code, jt, k) = match op {
            Op::Label(_) => continue,
            Op::Ld(off) => (LD_W_ABS, 0, *off),
            Op::And(k) => (AND_K, 0, *k),
            Op::St(k) => (ST, 0, *k),
            Op::LdxMem(k) => (LDX_MEM, 0, *k),
            Op::JeqX(l) => (JEQ_X, jump(l), 0),
            Op::Jeq(k, l) => (JEQ_K, jump(l), *k),
            Op::Jset(k, l) => (JSET_K, jump(l), *k),
            Op::Ret(k) => (RET_K, 0, *k),
        };
        prog.push(libc::sock_filter { code, jt, jf: 0, k });
    }
    prog
}

/// The process-wide filter: EPERM for `remap_file_pages` and `shmat(…, SHM_REMAP)` in the
/// native ABI, x32 and the compat ABI.
fn process_program() -> Vec<libc::sock_filter> {
    const COMPAT_L: usize = 1;
    const SHMAT: usize = 2;
    const IPC: usize = 3;
    const DENY: usize = 4;
    let mut ops = vec![
        Op::Ld(ARCH),
        Op::Jeq(COMPAT.arch, COMPAT_L),
        Op::Jeq(NATIVE.arch, 10),
        Op::Ret(ALLOW),
        Op::Label(10),
        Op::Ld(NR),
        Op::Jeq(NATIVE.remap_file_pages, DENY),
        Op::Jeq(NATIVE.shmat.0, SHMAT),
    ];
    if let Some(bit) = X32 {
        ops.push(Op::Jeq(bit | NATIVE.remap_file_pages, DENY));
        ops.push(Op::Jeq(bit | NATIVE.shmat.0, SHMAT));
    }
    ops.extend([
        Op::Ret(ALLOW),
        Op::Label(COMPAT_L),
        Op::Ld(NR),
        Op::Jeq(COMPAT.remap_file_pages, DENY),
        Op::Jeq(COMPAT.shmat.0, SHMAT),
    ]);
    if let Some(ipc) = COMPAT.ipc {
        ops.push(Op::Jeq(ipc, IPC));
    }
    ops.extend([
        Op::Ret(ALLOW),
        Op::Label(IPC),
        Op::Ld(ARGS),
        // The kernel reads the call from the low 16 bits (the rest is a version: found in
        // review, `21 | 2 << 16` went past a whole-word compare).
        Op::And(0xffff),
        Op::Jeq(21, 11),
        Op::Ret(ALLOW),
        Op::Label(11),
        Op::Label(SHMAT),
        Op::Ld(ARGS + 8 * NATIVE.shmat.1),
        Op::Jset(SHM_REMAP, DENY),
        Op::Ret(ALLOW),
        Op::Label(DENY),
        Op::Ret(EPERM),
    ]);
    assemble(&ops)
}

/// The fork child's filter (see the module documentation).
fn fork_child_program() -> Vec<libc::sock_filter> {
    const IOCTL: usize = 2;
    const NS: usize = 3;
    const DENY: usize = 4;
    const NOSYS: usize = 5;
    const NATIVE_L: usize = 6;
    const MREMAP: usize = 7;
    const MREMAP_LOW: usize = 8;
    const PRCTL: usize = 9;
    const PDEATHSIG: usize = 10;
    const ALLOW_L: usize = 11;
    const SAME_LENGTH: usize = 12;
    let calls = |abi: &Abi| {
        [
            Op::Ld(NR),
            Op::Jeq(abi.userfaultfd, DENY),
            Op::Jeq(abi.mremap, MREMAP),
            Op::Jeq(abi.prctl, PRCTL),
            Op::Jeq(abi.setns, DENY),
            Op::Jeq(abi.clone3, NOSYS),
            Op::Jeq(abi.ioctl, IOCTL),
            Op::Jeq(abi.unshare, NS),
            Op::Jeq(abi.clone, NS),
        ]
    };
    // Every call of another ABI is refused: the 32-bit compat calls take the low halves of
    // the registers the filter sees whole (found in review: an `int 0x80` mremap whose old
    // length had bit 32 set passed the growth check and grew the mapping), and x32 has
    // numbers of its own.
    let mut ops = vec![
        Op::Ld(ARCH),
        Op::Jeq(NATIVE.arch, NATIVE_L),
        Op::Ret(EPERM),
        Op::Label(NATIVE_L),
    ];
    ops.extend(calls(&NATIVE));
    if let Some(bit) = X32 {
        ops.push(Op::Jset(bit, DENY));
    }
    ops.extend([
        Op::Ret(ALLOW),
        Op::Label(IOCTL),
        Op::Ld(ARGS + 8),
        Op::Jeq(UFFDIO_CONTINUE, DENY),
        Op::Jeq(UFFDIO_COPY, DENY),
        Op::Jeq(UFFDIO_ZEROPAGE, DENY),
        Op::Jeq(USERFAULTFD_IOC_NEW, DENY),
        Op::Ret(ALLOW),
        // mremap to another length (new length, argument 2, not the old, argument 1): a
        // growth or a duplicate (old length 0) maps more than its event says, a shrinking
        // move reports the old length and unmaps the tail only after it (found in review).
        // Moves of the same length pass. High words, then low.
        Op::Label(MREMAP),
        Op::Ld(ARGS + 8 + 4),
        Op::St(0),
        Op::LdxMem(0),
        Op::Ld(ARGS + 16 + 4),
        Op::JeqX(MREMAP_LOW),
        Op::Ret(EPERM),
        // prctl(PR_SET_PDEATHSIG) to anything but SIGKILL: the child may not cancel dying
        // with its parent (its own children, which inherit this filter, set SIGKILL).
        Op::Label(PRCTL),
        Op::Ld(ARGS),
        Op::Jeq(libc::PR_SET_PDEATHSIG as u32, PDEATHSIG),
        Op::Ret(ALLOW),
        Op::Label(PDEATHSIG),
        Op::Ld(ARGS + 8),
        Op::Jeq(libc::SIGKILL as u32, ALLOW_L),
        Op::Ret(EPERM),
        Op::Label(ALLOW_L),
        Op::Ret(ALLOW),
        Op::Label(MREMAP_LOW),
        Op::Ld(ARGS + 8),
        Op::St(0),
        Op::LdxMem(0),
        Op::Ld(ARGS + 16),
        Op::JeqX(SAME_LENGTH),
        Op::Ret(EPERM),
        Op::Label(SAME_LENGTH),
        Op::Ret(ALLOW),
        Op::Label(NS),
        Op::Ld(ARGS),
        Op::Jset(NEW_NAMESPACES, DENY),
        Op::Ret(ALLOW),
        Op::Label(DENY),
        Op::Ret(EPERM),
        Op::Label(NOSYS),
        Op::Ret(ENOSYS),
    ]);
    assemble(&ops)
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, flags, prog)` by system call (no allocation, no lock: a
/// fork child handler may call it): the raw return value.
fn set_filter(prog: &[libc::sock_filter], flags: libc::c_ulong) -> Result<i64, Errno> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).map_err(|_| Errno::EINVAL)?,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points at `prog`, a valid classic BPF program that lives across the
    // call; the kernel copies it and keeps no pointer.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            std::ptr::from_ref(&fprog),
        )
    };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

/// `set_filter`, setting `no_new_privs` first where the kernel asks for it (no
/// `CAP_SYS_ADMIN`).
fn set_filter_as_allowed(prog: &[libc::sock_filter], flags: libc::c_ulong) -> Result<i64, Errno> {
    match set_filter(prog, flags) {
        Err(e) if e == Errno(libc::EACCES) => {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return Err(e);
            }
            set_filter(prog, flags)
        }
        r => r,
    }
}

fn install() -> RemapFilePages {
    let prog = process_program();
    let mut r = set_filter_as_allowed(&prog, libc::SECCOMP_FILTER_FLAG_TSYNC);
    // TSYNC answers EAGAIN while another thread is being created or is exiting: retried.
    for _ in 0..100 {
        if r != Err(Errno::EAGAIN) && r != Err(Errno::EINTR) {
            break;
        }
        std::thread::yield_now();
        r = set_filter_as_allowed(&prog, libc::SECCOMP_FILTER_FLAG_TSYNC);
    }
    match r {
        Ok(0) => RemapFilePages::Refused,
        Ok(tid) => match set_filter(&prog, 0) {
            Ok(_) => RemapFilePages::RefusedFromThisThread { tid },
            Err(e) => RemapFilePages::NotRefused(e),
        },
        Err(e) => RemapFilePages::NotRefused(e),
    }
}

/// The answer once the filter is in place (a fork child inherits filter and answer).
static INSTALLED: OnceLock<RemapFilePages> = OnceLock::new();

/// Refuses `remap_file_pages(2)` and `shmat(…, SHM_REMAP)` in this process from now on, and
/// says how. Once in place it is not installed again; a failure is tried again at the next
/// call.
pub(crate) fn refuse_remap_file_pages() -> RemapFilePages {
    /// One install at a time (two threads making their first files at once would stack
    /// two filters).
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Some(done) = INSTALLED.get() {
        return *done;
    }
    let _one = INSTALLING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(done) = INSTALLED.get() {
        return *done;
    }
    let r = install();
    if matches!(r, RemapFilePages::NotRefused(_)) {
        return r;
    }
    *INSTALLED.get_or_init(|| r)
}

/// How the process-wide filter stands in this process: `None` if no emulated file installed
/// it yet.
pub fn remap_file_pages_refused() -> Option<RemapFilePages> {
    INSTALLED.get().copied()
}

/// The fork child's filter, assembled in the parent (the child handler may not allocate).
static FORK_CHILD: OnceLock<Vec<libc::sock_filter>> = OnceLock::new();

/// Prepares [`restrict_fork_child`] (in the parent, before any fork that needs it).
pub(crate) fn prepare_fork_child_filter() {
    let _ = FORK_CHILD.get_or_init(fork_child_program);
}

/// Installs the fork child's filter in this (child) process: system calls only, no lock, no
/// allocation. False if it could not be installed (the child handler then ends the child).
pub(crate) fn restrict_fork_child() -> bool {
    let Some(prog) = FORK_CHILD.get() else {
        return false;
    };
    set_filter_as_allowed(prog, 0).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(p: &[libc::sock_filter]) {
        for (i, ins) in p.iter().enumerate() {
            if [JEQ_K, JSET_K, JEQ_X].contains(&ins.code) {
                let t = i + 1 + usize::from(ins.jt);
                assert!(t < p.len() && i + 1 < p.len(), "instruction {i} jumps out");
            }
        }
        assert_eq!(p[p.len() - 1].code, RET_K, "the program ends in a return");
        assert!(p.len() < 100);
    }

    #[test]
    fn both_programs_jump_inside_themselves_and_end_in_a_return() {
        check(&process_program());
        check(&fork_child_program());
    }
}
