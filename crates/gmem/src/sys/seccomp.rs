//! The one system call that makes a new mapping of a file out of an existing mapping, with no
//! descriptor and no `UFFD_EVENT_*`: `remap_file_pages(2)`. Since Linux 3.16 it is emulated by
//! a fresh `mmap(MAP_FIXED)` of the mapping's own file at any offset (`MAP_POPULATE`), and that
//! new mapping inherits no userfaultfd registration. Called on a host mapping of an emulated
//! file, it gave an unguarded mapping of any page of the memory file, private ones included,
//! in the owner and in every fork child (found in review, December 2026). The kernel's
//! guest_memfd needs no such rule: its fault handler checks every mapping however it was made.
//! gmem's guard is registration per mapping, so the call is refused instead, from the first
//! emulated file a process makes or receives, by a seccomp filter that every thread and every
//! child of the process inherits and none can remove
//! (EPERM, for every mapping: the filter cannot tell which file a range maps).
//!
//! Installing a filter needs `CAP_SYS_ADMIN` or `no_new_privs`; without the capability gmem
//! sets `no_new_privs` (process-wide through `SECCOMP_FILTER_FLAG_TSYNC`: a setuid program the
//! process executes later runs without its privileges). If another thread already has a
//! filter of its own (a VMM that filters per thread), `TSYNC` is refused and the filter is
//! installed on the calling thread only, which covers every thread it creates afterwards;
//! [`RemapFilePages`] says which.

use std::sync::OnceLock;

use crate::error::Errno;

/// How `remap_file_pages(2)` is refused in this process.
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
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
/// Offsets in `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;

/// The native architecture, its number of the call, and the compat ABI's (x32 shares the
/// native architecture with `__X32_SYSCALL_BIT` set).
#[cfg(target_arch = "x86_64")]
const NATIVE: (u32, u32, u32) = (0xC000_003E, 216, 0x4000_0000 | 216);
#[cfg(target_arch = "x86_64")]
const COMPAT: (u32, u32) = (0x4000_0003, 257);
#[cfg(target_arch = "aarch64")]
const NATIVE: (u32, u32, u32) = (0xC000_00B7, 234, 234);
#[cfg(target_arch = "aarch64")]
const COMPAT: (u32, u32) = (0x4000_0028, 253);

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: JEQ_K,
        jt,
        jf,
        k,
    }
}

/// The classic BPF program: EPERM for `remap_file_pages` in the native ABI, x32 and the
/// 32-bit compat ABI; everything else allowed.
fn program() -> [libc::sock_filter; 11] {
    let deny = libc::SECCOMP_RET_ERRNO | (libc::EPERM as u32 & libc::SECCOMP_RET_DATA);
    [
        stmt(LD_W_ABS, ARCH),
        jeq(NATIVE.0, 0, 4),                  // 1: native → 2, else → 6
        stmt(LD_W_ABS, NR),                   // 2
        jeq(NATIVE.1, 6, 0),                  // 3: → 10 (deny)
        jeq(NATIVE.2, 5, 0),                  // 4: → 10 (deny)
        stmt(RET_K, libc::SECCOMP_RET_ALLOW), // 5
        jeq(COMPAT.0, 0, 2),                  // 6: compat → 7, else → 9
        stmt(LD_W_ABS, NR),                   // 7
        jeq(COMPAT.1, 1, 0),                  // 8: → 10 (deny)
        stmt(RET_K, libc::SECCOMP_RET_ALLOW), // 9
        stmt(RET_K, deny),                    // 10
    ]
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, flags, prog)`: the raw return value.
fn set_filter(flags: libc::c_ulong) -> Result<i64, Errno> {
    let prog = program();
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
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

fn install() -> RemapFilePages {
    let mut r = set_filter(libc::SECCOMP_FILTER_FLAG_TSYNC);
    if r == Err(Errno(libc::EACCES)) {
        // Neither CAP_SYS_ADMIN nor no_new_privs: set the latter (TSYNC then sets it in
        // every thread).
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } == 0 {
            r = set_filter(libc::SECCOMP_FILTER_FLAG_TSYNC);
        }
    }
    match r {
        Ok(0) => RemapFilePages::Refused,
        Ok(tid) => match set_filter(0) {
            Ok(_) => RemapFilePages::RefusedFromThisThread { tid },
            Err(e) => RemapFilePages::NotRefused(e),
        },
        Err(e) => RemapFilePages::NotRefused(e),
    }
}

/// Refuses `remap_file_pages(2)` in this process from now on (once; a fork child inherits the
/// filter and the answer), and says how.
pub(crate) fn refuse_remap_file_pages() -> RemapFilePages {
    static DONE: OnceLock<RemapFilePages> = OnceLock::new();
    *DONE.get_or_init(install)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_jumps_stay_inside_it() {
        let p = program();
        for (i, ins) in p.iter().enumerate() {
            if ins.code == JEQ_K {
                assert!(i + 1 + usize::from(ins.jt) < p.len());
                assert!(i + 1 + usize::from(ins.jf) < p.len());
                let t = &p[i + 1 + usize::from(ins.jt)];
                assert!(t.code == LD_W_ABS || t.code == RET_K || t.code == JEQ_K);
            }
        }
        assert_eq!(p[p.len() - 1].code, RET_K);
    }
}
