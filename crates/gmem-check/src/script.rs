//! `gmem io`: guest_memfd operations one command a line, in the manner of `xfs_io`.
//!
//! A [`Session`] holds at most one file, its host mapping and its pins, on one backend. Each
//! command prints one stable line, `COMMAND -> OUTCOME`, where COMMAND is the command with its
//! numbers normalised to hex and OUTCOME is one of:
//!
//! - `ok`;
//! - an errno name (`EINVAL`), with `error_offset=0x...` for `EAGAIN`/`ENOMEM` of `convert`
//!   (the only errors for which the kernel writes it);
//! - `SIGBUS at 0x...` (file offset of the faulting byte) for a host access through the mapping,
//!   run with [`HostMapping::probe_read`] / [`HostMapping::probe_write`] so the fault is reported,
//!   not fatal;
//! - `data V=[S,E)+[S,E) ...`: the bytes read, as their distinct values and the ranges holding
//!   each;
//! - `error: ...` for a bad command or argument (naming the bad value and the allowed ones), or a
//!   command that needs state the session lacks (no file, no mapping, no guest).
//!
//! The same script run on two backends prints the same lines wherever the backends agree;
//! [`crate::conformance::differential`] relies on that.
//!
//! Commands (sizes and offsets: decimal or `0x` hex, with an optional `k`/`m`/`g` suffix):
//!
//! | command | does |
//! |---|---|
//! | `create SIZE [FLAGS]` | `KVM_CREATE_GUEST_MEMFD`; FLAGS by name (`mmap`, `init_shared`, `no_direct_map`) joined by `,` or `\|`, or a number; replaces the current file |
//! | `mmap [LEN]` | `MAP_SHARED` mapping of LEN bytes (default: the file size) at offset 0 |
//! | `munmap` | drops the mapping |
//! | `mread OFF LEN` | host read through the mapping |
//! | `mwrite OFF LEN [BYTE]` | host write of BYTE (default 0xcd) through the mapping |
//! | `falloc OFF LEN` | `fallocate(FALLOC_FL_KEEP_SIZE)` |
//! | `fpunch OFF LEN` | `fallocate(FALLOC_FL_PUNCH_HOLE \| FALLOC_FL_KEEP_SIZE)` |
//! | `convert private\|shared OFF LEN` | `KVM_SET_MEMORY_ATTRIBUTES2` |
//! | `attrs OFF LEN` | the attributes as gmem tracks them, as runs |
//! | `pin OFF LEN` / `unpin OFF LEN` | take / release a long-term pin (GUP-like) |
//! | `stat` | `fstat`: `st_size` and `st_blksize` |
//! | `gread OFF LEN` / `gwrite OFF LEN [BYTE]` | guest access (where something plays the guest) |
//! | `close` | drops the file, its mapping and its pins |
//!
//! A data command (`mread`, `mwrite`, `gread`, `gwrite`) is checked against the mapping or the
//! file first, then against [`MAX_ACCESS`] (`error: LEN ... is too large`), before any buffer is
//! allocated: a length the range allows may still be far more memory than the process has.

use std::fmt;
use std::sync::Arc;

use crate::conformance::{GuestPort, InternalGuest};
use gmem::error::Errno;
use gmem::file::{GuestMemfd, GuestMemfdBackend, PinGuard};
use gmem::mapping::{HostMapping, MapKind, Probe};
use gmem::uapi::{
    flag_names, kvm_memory_attributes2, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_NAMES, KVM_MEMORY_ATTRIBUTE_PRIVATE,
};

/// The commands and their usage, in the order `help` would list them.
pub const COMMANDS: [(&str, &str); 16] = [
    ("create", "create SIZE [FLAGS]"),
    ("mmap", "mmap [LEN]"),
    ("munmap", "munmap"),
    ("mread", "mread OFF LEN"),
    ("mwrite", "mwrite OFF LEN [BYTE]"),
    ("falloc", "falloc OFF LEN"),
    ("fpunch", "fpunch OFF LEN"),
    ("convert", "convert private|shared OFF LEN"),
    ("attrs", "attrs OFF LEN"),
    ("pin", "pin OFF LEN"),
    ("unpin", "unpin OFF LEN"),
    ("stat", "stat"),
    ("gread", "gread OFF LEN"),
    ("gwrite", "gwrite OFF LEN [BYTE]"),
    ("close", "close"),
    ("help", "help"),
];

/// The byte `mwrite` and `gwrite` write when none is given (as `xfs_io pwrite`).
pub const DEFAULT_BYTE: u8 = 0xcd;

/// A bad command line, or a command the session cannot run in its state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// The first word is no command.
    #[error("unknown command {0:?}; allowed: {allowed}", allowed = command_names())]
    UnknownCommand(String),
    /// Too few or too many arguments.
    #[error("{command}: expected {usage:?}, got {got} argument(s)")]
    Arguments {
        /// The command.
        command: &'static str,
        /// Its usage.
        usage: &'static str,
        /// How many arguments were given.
        got: usize,
    },
    /// A size or offset that does not parse.
    #[error(
        "bad {what} {value:?}: expected a number, decimal or 0x hex, with an optional k, m or g suffix"
    )]
    Number {
        /// Which argument (`SIZE`, `OFF`, `LEN`).
        what: &'static str,
        /// The text given.
        value: String,
    },
    /// A byte value that does not parse or exceeds 0xff.
    #[error("bad BYTE {0:?}: expected 0..=255 (decimal or 0x hex)")]
    Byte(String),
    /// A flag name that is not known.
    #[error(
        "unknown flag {0:?}; allowed: {allowed} (joined by , or |), or a number",
        allowed = flag_list()
    )]
    Flag(String),
    /// `convert` with neither `private` nor `shared`.
    #[error("bad conversion target {0:?}; allowed: private, shared")]
    Target(String),
    /// A command that needs a file before `create`.
    #[error("no file: run `create SIZE [FLAGS]` first")]
    NoFile,
    /// A host access before `mmap`.
    #[error("no mapping: run `mmap` first (the file needs the mmap flag)")]
    NoMapping,
    /// An access outside the mapping.
    #[error("range [{offset:#x}, {end:#x}) is outside the mapping [0x0, {len:#x})", end = offset.saturating_add(*len_access))]
    OutsideMapping {
        /// Start of the access.
        offset: u64,
        /// Length of the access.
        len_access: u64,
        /// Length of the mapping.
        len: u64,
    },
    /// `unpin` of a range no pin covers exactly.
    #[error("no pin on [{offset:#x}, +{len:#x}); held: {held}")]
    NoPin {
        /// Start given.
        offset: u64,
        /// Length given.
        len: u64,
        /// The pins held, as `[offset, +len)`.
        held: String,
    },
    /// A guest access on a backend where nothing plays the guest.
    #[error("no guest on this backend: gread/gwrite need one (the emulated backend has one)")]
    NoGuest,
    /// An access too large for this process's address space.
    #[error("LEN {0:#x} is too large for one access")]
    TooLarge(u64),
}

/// The largest access one data command makes (bytes read or written, and the buffer for them).
pub const MAX_ACCESS: u64 = 256 << 20;

/// Refuses an access longer than [`MAX_ACCESS`].
fn bounded(len: u64) -> Result<usize, IoError> {
    usize::try_from(len)
        .ok()
        .filter(|_| len <= MAX_ACCESS)
        .ok_or(IoError::TooLarge(len))
}

/// A guest access outside the file: the command's output line, not an error of the script.
#[derive(Debug, thiserror::Error)]
#[error("guest access [{off:#x}, +{len:#x}) is outside the file (size {size:#x})")]
struct OutsideFile {
    off: u64,
    len: u64,
    size: u64,
}

/// Refuses a guest access outside the file (before any buffer for it is allocated).
fn in_file(f: &dyn GuestMemfd, off: u64, len: u64) -> Result<(), OutsideFile> {
    match off.checked_add(len) {
        Some(end) if end <= f.size() => Ok(()),
        _ => Err(OutsideFile {
            off,
            len,
            size: f.size(),
        }),
    }
}

fn command_names() -> String {
    COMMANDS.map(|(n, _)| n).join(", ")
}

fn flag_list() -> String {
    GUEST_MEMFD_FLAG_NAMES.map(|(_, n)| n).join(", ")
}

/// Parses a size or offset: decimal or `0x` hex, optionally followed by `k`, `m` or `g`
/// (binary multiples).
pub fn parse_size(what: &'static str, s: &str) -> Result<u64, IoError> {
    let bad = || IoError::Number {
        what,
        value: s.to_string(),
    };
    let lower = s.to_ascii_lowercase();
    let (digits, shift) = match lower.as_bytes().last() {
        Some(b'k') => (&lower[..lower.len() - 1], 10),
        Some(b'm') => (&lower[..lower.len() - 1], 20),
        Some(b'g') => (&lower[..lower.len() - 1], 30),
        _ => (lower.as_str(), 0),
    };
    let n = match digits.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => digits.parse::<u64>(),
    }
    .map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

fn parse_byte(s: &str) -> Result<u8, IoError> {
    let n = match s.to_ascii_lowercase().strip_prefix("0x") {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => s.parse::<u8>(),
    };
    n.map_err(|_| IoError::Byte(s.to_string()))
}

/// Parses creation flags: names joined by `,` or `|`, or a number (`0`, `0x3`).
pub fn parse_flags(s: &str) -> Result<u64, IoError> {
    let mut flags = 0;
    for part in s.split([',', '|']).map(str::trim) {
        if part.is_empty() {
            return Err(IoError::Flag(s.to_string()));
        }
        let lower = part.to_ascii_lowercase();
        if let Some((bit, _)) = GUEST_MEMFD_FLAG_NAMES.iter().find(|(_, n)| *n == lower) {
            flags |= bit;
        } else if let Ok(n) = parse_size("FLAGS", part) {
            flags |= n;
        } else {
            return Err(IoError::Flag(part.to_string()));
        }
    }
    Ok(flags)
}

/// One parsed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `create SIZE [FLAGS]`.
    Create {
        /// Size in bytes.
        size: u64,
        /// `GUEST_MEMFD_FLAG_*`.
        flags: u64,
    },
    /// `mmap [LEN]`.
    Mmap {
        /// Length (default: the file size).
        len: Option<u64>,
    },
    /// `munmap`.
    Munmap,
    /// `mread OFF LEN`.
    Mread {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// `mwrite OFF LEN [BYTE]`.
    Mwrite {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
        /// Byte written.
        byte: u8,
    },
    /// `falloc OFF LEN`.
    Falloc {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// `fpunch OFF LEN`.
    Fpunch {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// `convert private|shared OFF LEN`.
    Convert {
        /// To private (else shared).
        private: bool,
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// `attrs OFF LEN`.
    Attrs {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// `pin OFF LEN`.
    Pin {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// `unpin OFF LEN`.
    Unpin {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// `stat`.
    Stat,
    /// `gread OFF LEN`.
    Gread {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// `gwrite OFF LEN [BYTE]`.
    Gwrite {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
        /// Byte written.
        byte: u8,
    },
    /// `close`.
    Close,
    /// `help`.
    Help,
}

impl Command {
    /// Parses one line. `Ok(None)` for a blank line or a `#` comment.
    pub fn parse(line: &str) -> Result<Option<Command>, IoError> {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        let Some(name) = words.next() else {
            return Ok(None);
        };
        let args: Vec<&str> = words.collect();
        let lower = name.to_ascii_lowercase();
        let Some(&(cmd, usage)) = COMMANDS.iter().find(|(n, _)| *n == lower) else {
            return Err(IoError::UnknownCommand(name.to_string()));
        };
        let count = |min: usize, max: usize| {
            if args.len() < min || args.len() > max {
                Err(IoError::Arguments {
                    command: cmd,
                    usage,
                    got: args.len(),
                })
            } else {
                Ok(())
            }
        };
        let off_len = |i: usize| -> Result<(u64, u64), IoError> {
            Ok((parse_size("OFF", args[i])?, parse_size("LEN", args[i + 1])?))
        };
        let byte = |i: usize| args.get(i).map_or(Ok(DEFAULT_BYTE), |b| parse_byte(b));
        let c = match cmd {
            "create" => {
                count(1, 2)?;
                Command::Create {
                    size: parse_size("SIZE", args[0])?,
                    flags: args.get(1).map_or(Ok(0), |f| parse_flags(f))?,
                }
            }
            "mmap" => {
                count(0, 1)?;
                Command::Mmap {
                    len: args.first().map(|l| parse_size("LEN", l)).transpose()?,
                }
            }
            "munmap" => {
                count(0, 0)?;
                Command::Munmap
            }
            "stat" => {
                count(0, 0)?;
                Command::Stat
            }
            "close" => {
                count(0, 0)?;
                Command::Close
            }
            "help" => {
                count(0, 0)?;
                Command::Help
            }
            "convert" => {
                count(3, 3)?;
                let private = match args[0].to_ascii_lowercase().as_str() {
                    "private" => true,
                    "shared" => false,
                    _ => return Err(IoError::Target(args[0].to_string())),
                };
                let (off, len) = (parse_size("OFF", args[1])?, parse_size("LEN", args[2])?);
                Command::Convert { private, off, len }
            }
            "mwrite" | "gwrite" => {
                count(2, 3)?;
                let (off, len) = off_len(0)?;
                let byte = byte(2)?;
                if cmd == "mwrite" {
                    Command::Mwrite { off, len, byte }
                } else {
                    Command::Gwrite { off, len, byte }
                }
            }
            _ => {
                count(2, 2)?;
                let (off, len) = off_len(0)?;
                match cmd {
                    "mread" => Command::Mread { off, len },
                    "falloc" => Command::Falloc { off, len },
                    "fpunch" => Command::Fpunch { off, len },
                    "attrs" => Command::Attrs { off, len },
                    "pin" => Command::Pin { off, len },
                    "unpin" => Command::Unpin { off, len },
                    _ => Command::Gread { off, len },
                }
            }
        };
        Ok(Some(c))
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Command::Create { size, flags } => write!(f, "create {size:#x} {}", flag_names(flags)),
            Command::Mmap { len: None } => f.write_str("mmap"),
            Command::Mmap { len: Some(l) } => write!(f, "mmap {l:#x}"),
            Command::Munmap => f.write_str("munmap"),
            Command::Mread { off, len } => write!(f, "mread {off:#x} {len:#x}"),
            Command::Mwrite { off, len, byte } => write!(f, "mwrite {off:#x} {len:#x} {byte:#04x}"),
            Command::Falloc { off, len } => write!(f, "falloc {off:#x} {len:#x}"),
            Command::Fpunch { off, len } => write!(f, "fpunch {off:#x} {len:#x}"),
            Command::Convert { private, off, len } => write!(
                f,
                "convert {} {off:#x} {len:#x}",
                if private { "private" } else { "shared" }
            ),
            Command::Attrs { off, len } => write!(f, "attrs {off:#x} {len:#x}"),
            Command::Pin { off, len } => write!(f, "pin {off:#x} {len:#x}"),
            Command::Unpin { off, len } => write!(f, "unpin {off:#x} {len:#x}"),
            Command::Stat => f.write_str("stat"),
            Command::Gread { off, len } => write!(f, "gread {off:#x} {len:#x}"),
            Command::Gwrite { off, len, byte } => write!(f, "gwrite {off:#x} {len:#x} {byte:#04x}"),
            Command::Close => f.write_str("close"),
            Command::Help => f.write_str("help"),
        }
    }
}

/// What one command printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The command, normalised (or as typed, when it did not parse).
    pub command: String,
    /// The outcome.
    pub outcome: String,
    /// Whether the outcome is a usage error (`error: ...`) rather than the backend's answer.
    pub usage_error: bool,
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.command, self.outcome)
    }
}

/// Summarises bytes read at file offset `base`: each distinct value with the ranges holding
/// it, in order of first appearance (`0xaa=[0x0,0x1000)+[0x2000,0x3000) 0x00=[0x1000,0x2000)`).
/// At most 8 values and 4 ranges per value are listed; the rest are counted.
pub fn summarize(base: u64, bytes: &[u8]) -> String {
    const MAX_VALUES: usize = 8;
    const MAX_RANGES: usize = 4;
    if bytes.is_empty() {
        return "data (none)".to_string();
    }
    let mut by_value: Vec<(u8, Vec<(u64, u64)>)> = Vec::new();
    let mut start = 0usize;
    for i in 1..=bytes.len() {
        if i == bytes.len() || bytes[i] != bytes[start] {
            let v = bytes[start];
            let range = (base + start as u64, base + i as u64);
            match by_value.iter_mut().find(|(b, _)| *b == v) {
                Some((_, ranges)) => ranges.push(range),
                None => by_value.push((v, vec![range])),
            }
            start = i;
        }
    }
    let mut parts = vec!["data".to_string()];
    for (v, ranges) in by_value.iter().take(MAX_VALUES) {
        let mut s = format!("{v:#04x}=");
        let shown: Vec<String> = ranges
            .iter()
            .take(MAX_RANGES)
            .map(|(a, b)| format!("[{a:#x},{b:#x})"))
            .collect();
        s.push_str(&shown.join("+"));
        if ranges.len() > MAX_RANGES {
            s.push_str(&format!("+({} more)", ranges.len() - MAX_RANGES));
        }
        parts.push(s);
    }
    if by_value.len() > MAX_VALUES {
        parts.push(format!("({} more values)", by_value.len() - MAX_VALUES));
    }
    parts.join(" ")
}

/// Renders a probe's fault as `SIGBUS at 0x...` (file offset).
fn fault_line(f: gmem::mapping::Fault, base: u64) -> String {
    let name = if f.is_sigbus() {
        "SIGBUS".to_string()
    } else if f.signal == libc::SIGSEGV {
        "SIGSEGV".to_string()
    } else {
        format!("signal {}", f.signal)
    };
    format!("{name} at {:#x}", base.wrapping_add(f.addr))
}

/// One file on one backend, its host mapping and its pins.
#[derive(Debug)]
pub struct Session {
    backend: Arc<dyn GuestMemfdBackend>,
    guest: Option<Arc<dyn GuestPort>>,
    file: Option<Arc<dyn GuestMemfd>>,
    map: Option<HostMapping>,
    pins: Vec<PinGuard>,
}

impl Session {
    /// A session on `backend`; `guest`, if any, serves `gread`/`gwrite`.
    pub fn new(backend: Arc<dyn GuestMemfdBackend>, guest: Option<Arc<dyn GuestPort>>) -> Self {
        Session {
            backend,
            guest,
            file: None,
            map: None,
            pins: Vec::new(),
        }
    }

    /// A session on the emulated backend with default options, the guest played internally.
    pub fn emulated() -> Self {
        Session::new(
            Arc::new(gmem::emulated::EmulatedBackend::default()),
            Some(Arc::new(InternalGuest)),
        )
    }

    /// Runs every line of `script` (blank lines and `#` comments print nothing).
    pub fn run_script(&mut self, script: &str) -> Vec<Line> {
        script.lines().filter_map(|l| self.exec(l)).collect()
    }

    /// Runs one line; `None` for a blank line or a comment.
    pub fn exec(&mut self, line: &str) -> Option<Line> {
        match Command::parse(line) {
            Ok(None) => None,
            Ok(Some(cmd)) => Some(match self.run(cmd) {
                Ok(outcome) => Line {
                    command: cmd.to_string(),
                    outcome,
                    usage_error: false,
                },
                Err(e) => Line {
                    command: cmd.to_string(),
                    outcome: format!("error: {e}"),
                    usage_error: true,
                },
            }),
            Err(e) => Some(Line {
                command: line.trim().to_string(),
                outcome: format!("error: {e}"),
                usage_error: true,
            }),
        }
    }

    fn file(&self) -> Result<&Arc<dyn GuestMemfd>, IoError> {
        self.file.as_ref().ok_or(IoError::NoFile)
    }

    fn map_range(&self, off: u64, len: u64) -> Result<(&HostMapping, usize, usize), IoError> {
        self.file()?;
        let m = self.map.as_ref().ok_or(IoError::NoMapping)?;
        let outside = IoError::OutsideMapping {
            offset: off,
            len_access: len,
            len: m.len() as u64,
        };
        match off.checked_add(len) {
            Some(end) if end <= m.len() as u64 => {}
            _ => return Err(outside),
        }
        // Both are bounded by the mapping's length, a usize.
        #[allow(clippy::cast_possible_truncation)]
        Ok((m, off as usize, len as usize))
    }

    fn guest(&self) -> Result<&dyn GuestPort, IoError> {
        self.guest.as_deref().ok_or(IoError::NoGuest)
    }

    fn run(&mut self, cmd: Command) -> Result<String, IoError> {
        let errno = |e: Errno| e.name();
        let done = |r: Result<(), Errno>| r.map_or_else(errno, |()| "ok".to_string());
        Ok(match cmd {
            Command::Help => COMMANDS.map(|(_, u)| u).join("; "),
            Command::Create { size, flags } => {
                self.close();
                match self.backend.create(size, flags) {
                    Ok(f) => {
                        self.file = Some(f);
                        "ok".to_string()
                    }
                    Err(e) => e.name(),
                }
            }
            Command::Close => {
                self.file()?;
                self.close();
                "ok".to_string()
            }
            Command::Mmap { len } => {
                let f = self.file()?.clone();
                let len = len.unwrap_or(f.size());
                let len = usize::try_from(len).map_err(|_| IoError::TooLarge(len))?;
                self.map = None;
                match f.mmap(0, len, MapKind::Shared) {
                    Ok(m) => {
                        self.map = Some(m);
                        "ok".to_string()
                    }
                    Err(e) => e.name(),
                }
            }
            Command::Munmap => {
                self.map.take().ok_or(IoError::NoMapping)?;
                "ok".to_string()
            }
            Command::Mread { off, len } => {
                let (m, o, l) = self.map_range(off, len)?;
                bounded(len)?;
                match m.probe_read(o, l) {
                    Ok(Probe::Done(bytes)) => summarize(m.file_offset() + o as u64, &bytes),
                    Ok(Probe::Fault(f)) => fault_line(f, m.file_offset()),
                    Err(e) => e.name(),
                }
            }
            Command::Mwrite { off, len, byte } => {
                let (m, o, l) = self.map_range(off, len)?;
                bounded(len)?;
                match m.probe_write(o, l, byte) {
                    Ok(Probe::Done(())) => "ok".to_string(),
                    Ok(Probe::Fault(f)) => fault_line(f, m.file_offset()),
                    Err(e) => e.name(),
                }
            }
            Command::Falloc { off, len } => {
                done(self.file()?.fallocate(FALLOC_FL_KEEP_SIZE, off, len))
            }
            Command::Fpunch { off, len } => done(self.file()?.fallocate(
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )),
            Command::Convert { private, off, len } => {
                let attributes = if private {
                    KVM_MEMORY_ATTRIBUTE_PRIVATE
                } else {
                    0
                };
                let mut a = kvm_memory_attributes2::new(off, len, attributes);
                match self.file()?.set_attributes(&mut a) {
                    Ok(()) => "ok".to_string(),
                    Err(e) if e == Errno::EAGAIN || e == Errno::ENOMEM => {
                        format!("{} error_offset={:#x}", e.name(), a.error_offset)
                    }
                    Err(e) => e.name(),
                }
            }
            Command::Attrs { off, len } => match self.file()?.attribute_runs(off, len) {
                Ok(runs) => {
                    let parts: Vec<String> = runs
                        .iter()
                        .map(|&(s, l, a)| {
                            let what = if a & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0 {
                                "private"
                            } else {
                                "shared"
                            };
                            format!("{what}=[{s:#x},{:#x})", s + l)
                        })
                        .collect();
                    if parts.is_empty() {
                        "(none)".to_string()
                    } else {
                        parts.join(" ")
                    }
                }
                Err(e) => e.name(),
            },
            Command::Pin { off, len } => match self.file()?.pin(off, len) {
                Ok(p) => {
                    self.pins.push(p);
                    "ok".to_string()
                }
                Err(e) => e.name(),
            },
            Command::Unpin { off, len } => {
                self.file()?;
                let Some(i) = self
                    .pins
                    .iter()
                    .position(|p| p.offset() == off && p.len() == len)
                else {
                    let held: Vec<String> = self
                        .pins
                        .iter()
                        .map(|p| format!("[{:#x}, +{:#x})", p.offset(), p.len()))
                        .collect();
                    return Err(IoError::NoPin {
                        offset: off,
                        len,
                        held: if held.is_empty() {
                            "none".to_string()
                        } else {
                            held.join(", ")
                        },
                    });
                };
                drop(self.pins.remove(i));
                "ok".to_string()
            }
            Command::Stat => match self.file()?.stat() {
                Ok(st) => format!("size={:#x} blksize={:#x}", st.size, st.blksize),
                Err(e) => e.name(),
            },
            Command::Gread { off, len } => {
                let f = self.file()?;
                let guest = self.guest()?;
                if let Err(e) = in_file(&**f, off, len) {
                    return Ok(format!("guest error: {e}"));
                }
                let l = bounded(len)?;
                match guest.read(&**f, off, l) {
                    Ok(bytes) => summarize(off, &bytes),
                    Err(e) => format!("guest error: {e}"),
                }
            }
            Command::Gwrite { off, len, byte } => {
                let f = self.file()?;
                let guest = self.guest()?;
                if let Err(e) = in_file(&**f, off, len) {
                    return Ok(format!("guest error: {e}"));
                }
                let l = bounded(len)?;
                match guest.write(&**f, off, &vec![byte; l]) {
                    Ok(()) => "ok".to_string(),
                    Err(e) => format!("guest error: {e}"),
                }
            }
        })
    }

    /// Drops the mapping, the pins and the file, in that order.
    fn close(&mut self) {
        self.map = None;
        self.pins.clear();
        self.file = None;
    }
}
