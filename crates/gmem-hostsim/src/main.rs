//! `gmem-hostsim HOST -- COMMAND [ARGS...]`: runs COMMAND as if the kernel lacked a feature,
//! with the kernel itself giving the answers, so that gmem's tests and `gmem conformance` can
//! be checked on one machine against every kind of host they must be right on (DESIGN.md
//! "Hosts").
//!
//! Two kernel mechanisms do it, and nothing in gmem knows they are there:
//! - a **seccomp filter** (inherited by every process COMMAND starts) answers chosen calls
//!   without running them: `KVM_CHECK_EXTENSION` of a guest_memfd capability returns 0 (a
//!   filter can answer errno 0), `KVM_CREATE_GUEST_MEMFD` and `KVM_SET_MEMORY_ATTRIBUTES2`
//!   fail with ENOTTY, `userfaultfd(2)` with ENOSYS, or EPERM unless it asks for user-mode
//!   faults only;
//! - a **private mount namespace** (root only) hides a device node (a tmpfs over `/dev` with
//!   every other entry bound back: `open` answers ENOENT) or binds it onto itself on a `nodev`
//!   mount (`open` answers EACCES, as for a user outside the device's group).
//!
//! The filter can only take features away: a host that has less than this one is simulated
//! exactly; a host with more (a kernel carrying the conversion series) cannot be.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `KVM_CHECK_EXTENSION`.
const KVM_CHECK_EXTENSION: u32 = 0xAE03;
/// `KVM_CREATE_GUEST_MEMFD`: `_IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)`.
const KVM_CREATE_GUEST_MEMFD: u32 = 0xC040_AED4;
/// `KVM_SET_MEMORY_ATTRIBUTES2`: `_IOWR(KVMIO, 0xd2, struct kvm_memory_attributes2)`.
const KVM_SET_MEMORY_ATTRIBUTES2: u32 = 0xC080_AED2;
/// `KVM_CAP_GUEST_MEMFD`.
const KVM_CAP_GUEST_MEMFD: u32 = 234;
/// `KVM_CAP_GUEST_MEMFD_FLAGS`.
const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;
/// `KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES` in series v7 and v8.
const KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES: [u32; 2] = [249, 250];
/// `UFFD_USER_MODE_ONLY`.
const UFFD_USER_MODE_ONLY: u32 = 1;

/// One call the filter answers without running it.
#[derive(Debug, Clone)]
struct Rule {
    /// The system call number (x86_64).
    nr: i64,
    /// `(argument index, mask, value)`: the rule applies when `arg & mask == value` for each
    /// (the low 32 bits of the argument).
    args: Vec<(u8, u32, u32)>,
    /// The errno to answer (0: the call returns 0).
    errno: i32,
}

/// `ioctl(_, request, _)` answers `errno`.
fn ioctl(request: u32, errno: i32) -> Rule {
    Rule {
        nr: libc::SYS_ioctl,
        args: vec![(1, u32::MAX, request)],
        errno,
    }
}

/// `KVM_CHECK_EXTENSION(cap)` answers 0.
fn cap_absent(cap: u32) -> Rule {
    Rule {
        nr: libc::SYS_ioctl,
        args: vec![(1, u32::MAX, KVM_CHECK_EXTENSION), (2, u32::MAX, cap)],
        errno: 0,
    }
}

/// The kernel feature a host lacks, as filter rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lacks {
    /// In-place conversion.
    Conversion,
    /// guest_memfd's creation flags (and conversion).
    GuestMemfdFlags,
    /// guest_memfd itself (and all of the above).
    GuestMemfd,
    /// userfaultfd.
    Userfaultfd,
    /// userfaultfd for kernel-mode faults.
    UserfaultfdKernelFaults,
}

impl Lacks {
    fn rules(self) -> Vec<Rule> {
        match self {
            Lacks::Conversion => {
                let mut r: Vec<Rule> = KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES
                    .iter()
                    .map(|&c| cap_absent(c))
                    .collect();
                r.push(ioctl(KVM_SET_MEMORY_ATTRIBUTES2, libc::ENOTTY));
                r
            }
            Lacks::GuestMemfdFlags => {
                let mut r = vec![cap_absent(KVM_CAP_GUEST_MEMFD_FLAGS)];
                r.extend(Lacks::Conversion.rules());
                r
            }
            Lacks::GuestMemfd => {
                let mut r = vec![
                    cap_absent(KVM_CAP_GUEST_MEMFD),
                    ioctl(KVM_CREATE_GUEST_MEMFD, libc::ENOTTY),
                ];
                r.extend(Lacks::GuestMemfdFlags.rules());
                r
            }
            Lacks::Userfaultfd => vec![Rule {
                nr: libc::SYS_userfaultfd,
                args: Vec::new(),
                errno: libc::ENOSYS,
            }],
            Lacks::UserfaultfdKernelFaults => vec![Rule {
                nr: libc::SYS_userfaultfd,
                args: vec![(0, UFFD_USER_MODE_ONLY, 0)],
                errno: libc::EPERM,
            }],
        }
    }
}

/// What happens to a device node in the private mount namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Device {
    /// Gone: `open` answers ENOENT.
    Hidden(&'static str),
    /// On a `nodev` mount: `open` answers EACCES.
    NoAccess(&'static str),
}

/// A kind of host.
#[derive(Debug, Clone, Copy)]
struct Host {
    name: &'static str,
    what: &'static str,
    lacks: Option<Lacks>,
    devices: &'static [Device],
}

const HOSTS: [Host; 8] = [
    Host {
        name: "real",
        what: "this kernel as it is",
        lacks: None,
        devices: &[],
    },
    Host {
        name: "no-kvm",
        what: "no /dev/kvm (open answers ENOENT)",
        lacks: None,
        devices: &[Device::Hidden("kvm")],
    },
    Host {
        name: "kvm-eacces",
        what: "/dev/kvm this user may not open (EACCES)",
        lacks: None,
        devices: &[Device::NoAccess("kvm")],
    },
    Host {
        name: "no-guest-memfd",
        what: "KVM without guest_memfd: KVM_CAP_GUEST_MEMFD, _FLAGS and the conversion \
               capabilities read 0, KVM_CREATE_GUEST_MEMFD answers ENOTTY",
        lacks: Some(Lacks::GuestMemfd),
        devices: &[],
    },
    Host {
        name: "guest-memfd-flags-0",
        what: "guest_memfd without MMAP or INIT_SHARED (6.8-6.17): KVM_CAP_GUEST_MEMFD_FLAGS \
               and the conversion capabilities read 0",
        lacks: Some(Lacks::GuestMemfdFlags),
        devices: &[],
    },
    Host {
        name: "no-conversion",
        what: "guest_memfd without in-place conversion (stock 6.18): \
               KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES (249, 250) reads 0, \
               KVM_SET_MEMORY_ATTRIBUTES2 answers ENOTTY",
        lacks: Some(Lacks::Conversion),
        devices: &[],
    },
    Host {
        name: "no-userfaultfd",
        what: "no userfaultfd: userfaultfd(2) answers ENOSYS, no /dev/userfaultfd",
        lacks: Some(Lacks::Userfaultfd),
        devices: &[Device::Hidden("userfaultfd")],
    },
    Host {
        name: "userfaultfd-user-mode-only",
        what: "an unprivileged user with vm.unprivileged_userfaultfd = 0: userfaultfd(2) \
               answers EPERM unless UFFD_USER_MODE_ONLY, /dev/userfaultfd EACCES",
        lacks: Some(Lacks::UserfaultfdKernelFaults),
        devices: &[Device::NoAccess("userfaultfd")],
    },
];

/// Why the simulated host could not be set up.
#[derive(Debug, thiserror::Error)]
enum HostsimError {
    #[error("unknown host '{0}'; the hosts are: {hosts}", hosts = host_names())]
    UnknownHost(String),
    #[error("usage: gmem-hostsim HOST -- COMMAND [ARGS...] (or --list); the hosts are: {hosts}", hosts = host_names())]
    Usage,
    #[error("{what}: {source}")]
    Os {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "hiding a device needs a private mount namespace, which needs root (CAP_SYS_ADMIN): {0}"
    )]
    NotRoot(std::io::Error),
    #[error("the filter has {0} instructions, more than seccomp takes")]
    FilterTooLong(usize),
}

fn host_names() -> String {
    HOSTS.iter().map(|h| h.name).collect::<Vec<_>>().join(", ")
}

fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HostsimError {
    let what = what.into();
    move |source| HostsimError::Os { what, source }
}

/// `Ok` when a libc call returned 0, the OS error otherwise.
fn check(ret: libc::c_int) -> std::io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn cstr(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
) -> std::io::Result<()> {
    let src = src.map(cstr).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype
        .map(|t| CString::new(t).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL)))
        .transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that lives across the call;
    // no data argument is passed.
    check(unsafe {
        libc::mount(
            ptr(&src),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            std::ptr::null(),
        )
    })
}

/// A private mount namespace in which the devices are hidden or made inaccessible.
fn set_up_devices(devices: &[Device]) -> Result<(), HostsimError> {
    if devices.is_empty() {
        return Ok(());
    }
    // SAFETY: unshare takes flags only and affects this (single-threaded) process.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) }).map_err(HostsimError::NotRoot)?;
    let root = Path::new("/");
    mount(None, root, None, libc::MS_REC | libc::MS_PRIVATE).map_err(os("make / private"))?;
    let dev = Path::new("/dev");
    for d in devices {
        if let Device::NoAccess(name) = d {
            let node = dev.join(name);
            mount(Some(&node), &node, None, libc::MS_BIND)
                .map_err(os(format!("bind {}", node.display())))?;
            mount(
                None,
                &node,
                None,
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NODEV | libc::MS_NOSUID,
            )
            .map_err(os(format!("remount {} nodev", node.display())))?;
        }
    }
    let hidden: Vec<&str> = devices
        .iter()
        .filter_map(|d| match d {
            Device::Hidden(n) => Some(*n),
            Device::NoAccess(_) => None,
        })
        .collect();
    if hidden.is_empty() {
        return Ok(());
    }
    // The old /dev stays reachable at a staging point while a tmpfs takes its place; every
    // entry but the hidden ones is bound (or, for a symbolic link, copied) back.
    let stage = std::env::temp_dir().join(format!("gmem-hostsim-dev.{}", std::process::id()));
    std::fs::create_dir_all(&stage).map_err(os(format!("mkdir {}", stage.display())))?;
    mount(Some(dev), &stage, None, libc::MS_BIND | libc::MS_REC)
        .map_err(os("bind /dev to the staging point"))?;
    mount(
        Some(Path::new("tmpfs")),
        dev,
        Some("tmpfs"),
        libc::MS_NOSUID,
    )
    .map_err(os("mount a tmpfs on /dev"))?;
    let entries = std::fs::read_dir(&stage).map_err(os("list /dev"))?;
    for entry in entries {
        let entry = entry.map_err(os("list /dev"))?;
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| hidden.contains(&n)) {
            continue;
        }
        let (from, to) = (entry.path(), dev.join(&name));
        if name == "ptmx" {
            // A bound /dev/ptmx opens no terminal (the kernel finds the devpts instance next
            // to the node it was opened through): link it into pts/, as containers do.
            std::os::unix::fs::symlink("pts/ptmx", &to)
                .map_err(os(format!("symlink {}", to.display())))?;
            continue;
        }
        let kind = entry
            .file_type()
            .map_err(os(format!("stat {}", from.display())))?;
        if kind.is_symlink() {
            let target =
                std::fs::read_link(&from).map_err(os(format!("readlink {}", from.display())))?;
            std::os::unix::fs::symlink(target, &to)
                .map_err(os(format!("symlink {}", to.display())))?;
            continue;
        }
        if kind.is_dir() {
            std::fs::create_dir(&to).map_err(os(format!("mkdir {}", to.display())))?;
        } else {
            std::fs::File::create(&to).map_err(os(format!("create {}", to.display())))?;
        }
        mount(Some(&from), &to, None, libc::MS_BIND | libc::MS_REC)
            .map_err(os(format!("bind {}", to.display())))?;
    }
    let stage_c = cstr(&stage).map_err(os("staging path"))?;
    // SAFETY: a NUL-terminated path that lives across the call.
    check(unsafe { libc::umount2(stage_c.as_ptr(), libc::MNT_DETACH) })
        .map_err(os("detach the staging point"))?;
    std::fs::remove_dir(&stage).map_err(os(format!("rmdir {}", stage.display())))?;
    Ok(())
}

/// The classic BPF program of `rules`: each rule is one block that falls through to the next
/// when the call does not match; the last instruction allows the call.
fn filter(rules: &[Rule]) -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    const ARGS: u32 = 16;
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    let stmt = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let mut prog = vec![
        stmt(LD_W_ABS, ARCH),
        // Another architecture's calls (x32, i386) pass untouched.
        libc::sock_filter {
            code: JEQ_K,
            jt: 1,
            jf: 0,
            k: AUDIT_ARCH_X86_64,
        },
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
    ];
    for rule in rules {
        let mut block = vec![stmt(LD_W_ABS, NR)];
        let mut jumps = vec![block.len()];
        block.push(stmt(JEQ_K, rule.nr as u32));
        for &(i, mask, value) in &rule.args {
            block.push(stmt(LD_W_ABS, ARGS + 8 * u32::from(i)));
            if mask != u32::MAX {
                block.push(stmt(AND_K, mask));
            }
            jumps.push(block.len());
            block.push(stmt(JEQ_K, value));
        }
        let errno = u32::try_from(rule.errno).unwrap_or(0) & libc::SECCOMP_RET_DATA;
        block.push(stmt(RET_K, libc::SECCOMP_RET_ERRNO | errno));
        let end = block.len();
        for j in jumps {
            // On a mismatch, jump past the block's RET.
            block[j].jf = u8::try_from(end - j - 1).unwrap_or(u8::MAX);
        }
        prog.extend(block);
    }
    prog.push(stmt(RET_K, libc::SECCOMP_RET_ALLOW));
    prog
}

/// Installs the filter of `rules` on this process (and so on everything it executes).
fn install_filter(rules: &[Rule]) -> Result<(), HostsimError> {
    if rules.is_empty() {
        return Ok(());
    }
    let prog = filter(rules);
    let len = u16::try_from(prog.len()).map_err(|_| HostsimError::FilterTooLong(prog.len()))?;
    let fprog = libc::sock_fprog {
        len,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
        .map_err(os("PR_SET_NO_NEW_PRIVS"))?;
    // SAFETY: `fprog` points at `prog`, a valid classic BPF program that lives across the
    // call; the kernel copies it.
    check(unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            std::ptr::from_ref(&fprog),
            0,
            0,
        )
    })
    .map_err(os("PR_SET_SECCOMP"))
}

fn run() -> Result<std::convert::Infallible, HostsimError> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == "--list") {
        for h in HOSTS {
            println!("{:<28}{}", h.name, h.what);
        }
        std::process::exit(0);
    }
    let (name, rest) = args.split_first().ok_or(HostsimError::Usage)?;
    let command = match rest.split_first() {
        Some((dashes, command)) if dashes == "--" && !command.is_empty() => command,
        _ => return Err(HostsimError::Usage),
    };
    let host = HOSTS
        .iter()
        .find(|h| name == h.name)
        .ok_or_else(|| HostsimError::UnknownHost(name.to_string_lossy().into_owned()))?;
    set_up_devices(host.devices)?;
    install_filter(&host.lacks.map(Lacks::rules).unwrap_or_default())?;
    let program = PathBuf::from(&command[0]);
    let err = std::process::Command::new(&program)
        .args(&command[1..])
        .env("GMEM_HOSTSIM", host.name)
        .exec();
    Err(os(format!("exec {}", program.display()))(err))
}

fn main() -> ExitCode {
    match run() {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("gmem-hostsim: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a child with the filter of `rules` installed; the child's exit status is
    /// what `f` returns.
    fn in_child(rules: &[Rule], f: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child only installs the filter, runs `f` (plain system calls) and
        // leaves with _exit; the parent waits for it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let code = if install_filter(rules).is_ok() {
                f()
            } else {
                100
            };
            // SAFETY: leaving the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn the_filter_answers_matching_calls_and_runs_the_others() {
        // userfaultfd without UFFD_USER_MODE_ONLY: EPERM; with it: the kernel's answer.
        let code = in_child(&Lacks::UserfaultfdKernelFaults.rules(), || {
            // SAFETY: plain syscalls; any descriptor returned is left to _exit.
            let full = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
            if full != -1 || errno() != libc::EPERM {
                return 1;
            }
            // SAFETY: as above.
            let user = unsafe {
                libc::syscall(
                    libc::SYS_userfaultfd,
                    libc::O_CLOEXEC | UFFD_USER_MODE_ONLY as i32,
                )
            };
            if user == -1 && errno() == libc::EPERM {
                return 2;
            }
            0
        });
        assert_eq!(code, 0);
        // An ioctl answered 0 without running: KVM_CHECK_EXTENSION on a descriptor that is
        // not KVM's would otherwise be ENOTTY; another request still reaches the kernel.
        let code = in_child(&Lacks::GuestMemfd.rules(), || {
            // SAFETY: ioctls on stdin's descriptor number with integer arguments.
            let cap = unsafe {
                libc::ioctl(
                    0,
                    libc::c_ulong::from(KVM_CHECK_EXTENSION),
                    KVM_CAP_GUEST_MEMFD,
                )
            };
            if cap != 0 {
                return 1;
            }
            // SAFETY: as above.
            let other = unsafe { libc::ioctl(0, libc::c_ulong::from(KVM_CHECK_EXTENSION), 1) };
            if other == 0 {
                return 2;
            }
            // SAFETY: as above; the struct is never read, the filter answers first.
            let create =
                unsafe { libc::ioctl(0, libc::c_ulong::from(KVM_CREATE_GUEST_MEMFD), 0usize) };
            if create != -1 || errno() != libc::ENOTTY {
                return 3;
            }
            0
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn every_host_has_a_distinct_name_and_a_filter_seccomp_takes() {
        for (i, h) in HOSTS.iter().enumerate() {
            assert!(HOSTS[..i].iter().all(|o| o.name != h.name), "{}", h.name);
            assert!(filter(&h.lacks.map(Lacks::rules).unwrap_or_default()).len() < 4096);
        }
    }
}
