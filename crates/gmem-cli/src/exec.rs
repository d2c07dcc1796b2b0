//! `gmem exec`: runs a program with the `gmem-preload` interposer, which presents gmem's
//! emulated guest_memfd through the KVM uAPI of a kernel with the in-place conversion series
//! (`KVM_X86_SW_PROTECTED_VM`, per-guest_memfd attributes). The interposer is the
//! `libgmem_preload.so` built with `gmem`: found next to the executable (a workspace build),
//! or carried inside it (a release build, as `cargo install` makes: written once to the
//! user's cache folder); the program replaces this process, so its exit status is `gmem
//! exec`'s.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::usage::UsageError;

/// The interposer's file name.
const PRELOAD: &str = "libgmem_preload.so";

/// Series revisions whose numbers the interposer can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Series {
    /// v7: KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES is 249.
    V7,
    /// v8: KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES is 250.
    V8,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Platform model of every emulated file: sw, snp, tdx or pkvm (its content rules on
    /// conversion; snp and tdx also accept their own VM type as a protected VM).
    #[arg(long, default_value = "sw")]
    platform: gmem::platform::PlatformKind,
    /// Which series revision's capability numbers to answer.
    #[arg(long, value_enum, default_value_t = Series::V8)]
    series: Series,
    /// Log every intercepted call and its answer to FILE, one line each.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Print the system calls gmem makes in the program's threads once its VMs, files and
    /// memslots exist (what a seccomp filter the program installs then must also allow),
    /// one per line with why, and exit.
    #[arg(long, exclusive = true)]
    seccomp_list: bool,
    /// The program and its arguments (after `--`).
    #[arg(
        required_unless_present = "seccomp_list",
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROGRAM"
    )]
    command: Vec<OsString>,
}

/// Why a program cannot run under the interposer.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The carried interposer could not be written where the loader can open it.
    #[error("cannot write the interposer this gmem carries: {source}")]
    Embedded {
        /// Why.
        source: std::io::Error,
    },
    /// The interposer is not where `gmem` looks.
    #[error("{PRELOAD} not found next to {exe} (nor in its deps/): build the workspace with `cargo build` (it is built with `gmem`), or set GMEM_PRELOAD to its path")]
    NoPreload {
        /// This executable.
        exe: String,
    },
    /// `GMEM_PRELOAD` names something that is not the interposer (the loader would print
    /// "ignored" and run the program against the real kernel).
    #[error("GMEM_PRELOAD={path}: {why}; refusing to run the program without the interposer")]
    BadPreload {
        /// As given.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// The program was not found or not readable.
    #[error("{program}: {}", describe(source))]
    Program {
        /// As given.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The dynamic loader would not load the interposer into it.
    #[error("{program}: {why}; the interposer (an LD_PRELOAD object) cannot reach it, so gmem exec refuses to run it rather than let its KVM calls reach the kernel unchanged")]
    Unreachable {
        /// The program.
        program: String,
        /// Why.
        why: &'static str,
    },
    /// exec failed.
    #[error("cannot execute {program}: {source}")]
    Exec {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
}

/// An I/O error as a user reads it ("No such file or directory", not "entity not found").
fn describe(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "No such file or directory (nor on PATH)".into(),
        std::io::ErrorKind::PermissionDenied => "Permission denied".into(),
        _ => e.to_string(),
    }
}

impl ExecError {
    /// The exit status, as `env`'s: 127 for a program not found, 126 for one found but not
    /// runnable, 1 for gmem's own failures and refusals.
    pub fn exit_status(&self) -> u8 {
        let not_found = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        match self {
            ExecError::Program { source, .. } | ExecError::Exec { source, .. } => {
                if not_found(source) {
                    127
                } else {
                    126
                }
            }
            // gmem's refusal, not the program's: as a failure of gmem.
            ExecError::Unreachable { .. }
            | ExecError::NoPreload { .. }
            | ExecError::Embedded { .. }
            | ExecError::BadPreload { .. } => 1,
        }
    }
}

/// A string every build of the interposer holds (the variable it reads its platform from).
const PRELOAD_MARK: &[u8] = b"GMEM_EXEC_PLATFORM";

/// Why `path` is not the interposer, if it is not: missing, not an ELF shared object, or
/// without [`PRELOAD_MARK`].
fn bad_preload(path: &Path) -> Option<String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => return Some(e.to_string()),
    };
    if !bytes.starts_with(b"\x7fELF") || bytes.get(16) != Some(&3) {
        return Some("not an ELF shared object".into());
    }
    if !bytes.windows(PRELOAD_MARK.len()).any(|w| w == PRELOAD_MARK) {
        return Some(format!("not {PRELOAD} (a shared object without its marks)"));
    }
    None
}

/// The interposer carried inside this binary (release builds: see the build script).
#[cfg(gmem_embedded_preload)]
const EMBEDDED: Option<&[u8]> = Some(include_bytes!(env!("GMEM_EMBEDDED_PRELOAD")));
#[cfg(not(gmem_embedded_preload))]
const EMBEDDED: Option<&[u8]> = None;

/// The carried interposer as a file the loader can open: in the user's cache folder
/// (`$XDG_CACHE_HOME/gmem`, else `~/.cache/gmem`), named by its content's hash and written
/// once (a temporary file renamed into place); where that folder cannot be written, a
/// memfd inherited by the program (`/proc/self/fd/N` in it).
fn materialize(bytes: &[u8]) -> Result<PathBuf, ExecError> {
    // FNV-1a: a name per build, not a security measure (the folder is the user's own).
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let dir = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("gmem"));
    if let Some(dir) = dir {
        let path = dir.join(format!("libgmem_preload-{hash:016x}.so"));
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64) {
            return Ok(path);
        }
        let tmp = dir.join(format!(
            ".libgmem_preload-{hash:016x}.{}",
            std::process::id()
        ));
        let written = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if written.is_ok() {
            return Ok(path);
        }
        let _ = std::fs::remove_file(&tmp);
    }
    memfd_preload(bytes)
}

/// The carried interposer in a memfd the program inherits (not close-on-exec).
fn memfd_preload(bytes: &[u8]) -> Result<PathBuf, ExecError> {
    let io = |source| ExecError::Embedded { source };
    // SAFETY: memfd_create with a constant name; the descriptor is owned below.
    let fd = unsafe { libc::memfd_create(c"libgmem_preload.so".as_ptr(), 0) };
    if fd < 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor nothing else owns.
    let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    std::io::Write::write_all(&mut file, bytes).map_err(io)?;
    let path = PathBuf::from(format!("/proc/self/fd/{fd}"));
    // Kept open, to be inherited by the program `exec` replaces this process with.
    std::mem::forget(file);
    Ok(path)
}

/// Finds the interposer: `$GMEM_PRELOAD` (checked: see [`bad_preload`]), else the newer of the one next to this executable
/// and the one in its `deps/` (where cargo leaves it when it is built as a dependency of
/// `gmem`: a later `cargo build -p gmem-cli` updates only that one, so the one next to the
/// executable may be stale).
pub fn find_preload() -> Result<PathBuf, ExecError> {
    if let Some(p) = std::env::var_os("GMEM_PRELOAD") {
        let p = PathBuf::from(p);
        if let Some(why) = bad_preload(&p) {
            return Err(ExecError::BadPreload {
                path: p.display().to_string(),
                why,
            });
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("."));
    [dir.join(PRELOAD), dir.join("deps").join(PRELOAD)]
        .into_iter()
        .filter(|p| p.is_file())
        .max_by_key(|p| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH)
        })
        .map_or_else(
            || match EMBEDDED {
                Some(bytes) => materialize(bytes),
                None => Err(ExecError::NoPreload {
                    exe: exe.display().to_string(),
                }),
            },
            Ok,
        )
}

/// `program` as `execvp` would find it.
fn resolve(program: &Path) -> Option<PathBuf> {
    if program.as_os_str().as_bytes().contains(&b'/') {
        return Some(program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Why the dynamic loader would not preload into the ELF file `bytes`, if it would not.
pub fn unreachable_reason(bytes: &[u8], meta: Option<&std::fs::Metadata>) -> Option<&'static str> {
    if bytes.starts_with(b"#!") {
        return None; // the interpreter is what runs; it is checked when it is exec'd
    }
    if !bytes.starts_with(b"\x7fELF") {
        return Some("not an ELF executable");
    }
    if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Some("not a 64-bit little-endian ELF (the interposer is x86_64)");
    }
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Some("a truncated ELF header");
    };
    let mut has_interp = false;
    for i in 0..usize::from(phnum) {
        let off = phoff as usize + i * usize::from(phentsize);
        match bytes.get(off..off + 4) {
            Some(t) if u32::from_le_bytes([t[0], t[1], t[2], t[3]]) == 3 => has_interp = true,
            Some(_) => {}
            None => return Some("a truncated program header table"),
        }
    }
    if !has_interp {
        return Some(
            "statically linked (no PT_INTERP: no dynamic loader runs, so LD_PRELOAD is ignored)",
        );
    }
    if let Some(m) = meta {
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if m.mode() & 0o6000 != 0 && m.uid() != me {
            return Some(
                "set-user-ID or set-group-ID (the loader ignores LD_PRELOAD in secure mode)",
            );
        }
    }
    None
}

/// The system calls gmem makes in the program's own threads after set-up (the VM, the
/// emulated files and their memslots exist; the guard's threads were started with the first
/// file, before any filter, and are not the program's), by x86_64 name, with why. Measured
/// with `strace -f` on the C tests and Firecracker under `gmem exec`, and read off the code
/// paths of each interposed call.
pub const SECCOMP_AFTER_SETUP: &[(&str, &str)] = &[
    ("ioctl", "userfaultfd ioctls of a conversion (UFFDIO_CONTINUE, UFFDIO_ZEROPAGE) on gmem's own descriptor"),
    ("madvise", "a conversion zaps host page-table entries (MADV_DONTNEED)"),
    ("process_vm_readv", "reading the program's ioctl arguments safely (EFAULT, not a crash)"),
    ("process_vm_writev", "writing ioctl results back (error_offset, KVM_PRE_FAULT_MEMORY)"),
    ("newfstatat", "fstat: a descriptor is still the one recorded"),
    ("fstat", "the same, on older C libraries"),
    ("getpid", "the descriptor table the records describe (vfork/CLONE_VM children)"),
    ("kcmp", "the same, in a child that shares the interposer's memory"),
    ("futex", "gmem's locks"),
    ("sched_yield", "waiting for the guard to handle mapping events"),
    ("nanosleep", "retrying a marker while an unmap's event is in flight"),
    ("clock_nanosleep", "the same, as glibc makes it"),
    ("fallocate", "punch-hole; HostPages::Replace and pages mapped in another process"),
    ("pipe2", "the replacement pipe, made at the first replacement"),
    ("fcntl", "sizing that pipe (F_SETPIPE_SZ)"),
    ("splice", "holding pages by reference during a replacement"),
    ("vmsplice", "the same"),
    ("mmap", "a mapping of an emulated file the program asks for; gmem's views of large files"),
    ("munmap", "unmapping them"),
    ("mremap", "a program's mremap of an emulated mapping"),
    ("readlink", "KVM_PRE_FAULT_MEMORY: the descriptor is a vCPU (/proc/self/fd)"),
    ("write", "--trace lines"),
];

pub fn run(args: &Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if args.seccomp_list {
        for (name, why) in SECCOMP_AFTER_SETUP {
            println!("{name:<18} # {why}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let program = PathBuf::from(&args.command[0]);
    let shown = program.display().to_string();
    let path = resolve(&program).ok_or_else(|| ExecError::Program {
        program: shown.clone(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    let meta = std::fs::metadata(&path).map_err(|source| ExecError::Program {
        program: shown.clone(),
        source,
    })?;
    if meta.is_dir() || meta.mode() & 0o111 == 0 {
        return Err(ExecError::Program {
            program: shown,
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        }
        .into());
    }
    let bytes = std::fs::read(&path).map_err(|source| ExecError::Program {
        program: shown.clone(),
        source,
    })?;
    if let Some(why) = unreachable_reason(&bytes, Some(&meta)) {
        return Err(ExecError::Unreachable {
            program: shown,
            why,
        }
        .into());
    }
    let preload = find_preload()?;
    // An absolute path for the program's children too (a memfd's `/proc/self/fd/N` stays as
    // it is: it names the descriptor the program inherits).
    let preload = if preload.starts_with("/proc/self/fd") {
        preload
    } else {
        std::fs::canonicalize(&preload).unwrap_or(preload)
    };
    let mut ld_preload = preload.into_os_string();
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        ld_preload.push(":");
        ld_preload.push(old);
    }
    let series = match args.series {
        Series::V7 => "v7",
        Series::V8 => "v8",
    };
    let mut cmd = std::process::Command::new(&args.command[0]);
    cmd.args(&args.command[1..])
        .env("LD_PRELOAD", ld_preload)
        .env("GMEM_EXEC_PLATFORM", args.platform.name())
        .env("GMEM_EXEC_SERIES", series);
    if let Some(trace) = &args.trace {
        // Created (truncated) here, so an unwritable path is a usage error, not a silent
        // loss; the interposer appends.
        std::fs::write(
            trace,
            format!(
                "# gmem exec --platform {} --series {series} -- {}\n",
                args.platform.name(),
                args.command
                    .iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        )
        .map_err(|source| UsageError::Unwritable {
            flag: "--trace",
            path: trace.clone(),
            source,
        })?;
        let abs = std::fs::canonicalize(trace).unwrap_or_else(|_| trace.clone());
        cmd.env("GMEM_EXEC_TRACE", abs);
    } else {
        cmd.env_remove("GMEM_EXEC_TRACE");
    }
    let source = cmd.exec();
    Err(ExecError::Exec {
        program: shown,
        source,
    }
    .into())
}
