//! State-machine property test: random sequences of create, convert, pin/unpin, punch,
//! allocate, host read/write (through `HostMapping::probe_*`, so SIGBUS is observed) and guest
//! read/write (`conformance::InternalGuest`) run against the emulated backend and against a
//! plain in-memory reference model of the spec (docs/series.md §2.3-§2.5: page → attribute and
//! content, plus pins), comparing every result: errno, `error_offset`, SIGBUS offset, bytes.
//!
//! `PROPTEST_CASES` sets the number of sequences (default 128, about a second), one property
//! test per revocation configuration (ignored where the host lacks what it needs). Nothing is
//! written to the source tree: a shrunk failure is printed, and a fixed bug gets an explicit
//! `regression_*` test below.

use std::sync::Arc;

use gmem::uapi::{
    kvm_memory_attributes2, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
};
use gmem::{
    EmulatedBackend, EmulatedOptions, Errno, GuestMemfd, GuestMemfdBackend, HostMapping, PinGuard,
    Probe, Revocation, PAGE_SIZE,
};
use gmem_check::conformance::{GuestPort, InternalGuest};
use proptest::prelude::*;

const PS: u64 = PAGE_SIZE;
const MAX_PAGES: u64 = 6;
/// What `error_offset` holds before each conversion: the kernel leaves it alone except on
/// EAGAIN/ENOMEM.
const SENTINEL: u64 = 0xdead_beef;

#[derive(Debug, Clone)]
enum Op {
    Create { pages: u64, flags: u64 },
    Remap,
    Convert { private: bool, off: u64, len: u64 },
    Pin { off: u64, len: u64 },
    Unpin { idx: usize },
    Punch { off: u64, len: u64 },
    Allocate { off: u64, len: u64 },
    HostRead { off: u64, len: u64 },
    HostWrite { off: u64, len: u64, byte: u8 },
    GuestRead { off: u64, len: u64 },
    GuestWrite { off: u64, len: u64, byte: u8 },
}

/// What an operation returned, in a form both sides produce.
#[derive(Debug, Clone, PartialEq, Eq)]
enum R {
    Ok,
    Err(Errno),
    /// A failed conversion: errno and `error_offset` after the call.
    ConvErr(Errno, u64),
    Data(Vec<u8>),
    Sigbus(u64),
    /// Not applicable in this state (no mapping; access outside the file).
    Skipped,
}

#[derive(Debug, Clone, Copy)]
enum Config {
    Guard,
    Remap,
}

/// Every configuration.
const CONFIGS: [Config; 2] = [Config::Guard, Config::Remap];

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::Guard => "guard",
            Config::Remap => "remap",
        }
    }

    /// Why this host cannot run sequences in this configuration (any of the flags the
    /// sequences create files with), if it cannot.
    fn missing(self) -> Option<String> {
        let flags =
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP;
        let need = self.options().revocation.needs(flags);
        need.and_then(|n| gmem_testkit::needs(&[n]))
    }

    fn options(self) -> EmulatedOptions {
        match self {
            Config::Guard => EmulatedOptions::with_revocation(Revocation::Guard),
            Config::Remap => EmulatedOptions::with_revocation(Revocation::Remap),
        }
    }
}

// ---------------------------------------------------------------- the reference model

#[derive(Debug, Default)]
struct Model {
    size: u64,
    flags: u64,
    private: Vec<bool>,
    data: Vec<u8>,
    /// Each pin's pages still attached to the file (punch-hole detaches them).
    pins: Vec<Vec<u64>>,
    mapped: bool,
}

fn page_span(off: u64, len: u64) -> (u64, u64) {
    (off / PS, (off + len).div_ceil(PS))
}

impl Model {
    fn create(&mut self, pages: u64, flags: u64) -> R {
        let size = pages * PS;
        // NO_DIRECT_MAP is accepted: the emulated backend's default (software-protected)
        // platform offers it (DESIGN.md, Platforms).
        let known =
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP;
        if flags & !known != 0 || size == 0 {
            return R::Err(Errno::EINVAL);
        }
        *self = Model {
            size,
            flags,
            private: vec![flags & GUEST_MEMFD_FLAG_INIT_SHARED == 0; pages as usize],
            data: vec![0; size as usize],
            pins: Vec::new(),
            mapped: false,
        };
        self.remap()
    }

    fn remap(&mut self) -> R {
        self.mapped = self.flags & GUEST_MEMFD_FLAG_MMAP != 0;
        if self.mapped {
            R::Ok
        } else {
            R::Err(Errno::ENODEV)
        }
    }

    /// §2.3 validation, §2.4 early return, safety check, then the new attributes.
    fn convert(&mut self, private: bool, off: u64, len: u64) -> R {
        let einval = R::ConvErr(Errno::EINVAL, SENTINEL);
        let Some(end) = off.checked_add(len) else {
            return einval;
        };
        if len == 0 || off % PS != 0 || len % PS != 0 || off >= self.size || end > self.size {
            return einval;
        }
        let (first, last) = page_span(off, len);
        let range = first as usize..last as usize;
        if self.private[range.clone()].iter().all(|&p| p == private) {
            return R::Ok;
        }
        if private {
            let pinned = self
                .pins
                .iter()
                .flatten()
                .filter(|&&p| p >= first && p < last)
                .min();
            if let Some(&p) = pinned {
                return R::ConvErr(Errno::EAGAIN, off.max(p * PS));
            }
        }
        self.private[range].fill(private);
        R::Ok
    }

    fn pin(&mut self, off: u64, len: u64) -> R {
        if len == 0 {
            return R::Err(Errno::EINVAL);
        }
        if self.flags & GUEST_MEMFD_FLAG_MMAP == 0 || off + len > self.size {
            return R::Err(Errno::EFAULT);
        }
        let (first, last) = page_span(off, len);
        if self.private[first as usize..last as usize]
            .iter()
            .any(|&p| p)
        {
            return R::Err(Errno::EFAULT);
        }
        self.pins.push((first..last).collect());
        R::Ok
    }

    fn unpin(&mut self, idx: usize) -> R {
        if idx < self.pins.len() {
            self.pins.remove(idx);
            R::Ok
        } else {
            R::Skipped
        }
    }

    /// vfs_fallocate's checks, then guest_memfd's (§2.5).
    fn fallocate(&mut self, punch: bool, off: u64, len: u64) -> R {
        if off > i64::MAX as u64 || len == 0 || len > i64::MAX as u64 {
            return R::Err(Errno::EINVAL);
        }
        if off + len > i64::MAX as u64 {
            return R::Err(Errno(libc::EFBIG));
        }
        if off % PS != 0 || len % PS != 0 {
            return R::Err(Errno::EINVAL);
        }
        if !punch {
            return if off + len > self.size {
                R::Err(Errno::EINVAL)
            } else {
                R::Ok
            };
        }
        let end = (off + len).min(self.size);
        if off < end {
            self.data[off as usize..end as usize].fill(0);
            let (first, last) = page_span(off, end - off);
            for pin in &mut self.pins {
                pin.retain(|&p| p < first || p >= last);
            }
        }
        R::Ok
    }

    /// The first byte of `[off, off + len)` on a private page.
    fn first_private_byte(&self, off: u64, len: u64) -> Option<u64> {
        let (first, last) = page_span(off, len);
        (first..last)
            .find(|&p| self.private[p as usize])
            .map(|p| off.max(p * PS))
    }

    fn host_read(&self, off: u64, len: u64) -> R {
        if !self.mapped || off + len > self.size {
            return R::Skipped;
        }
        match self.first_private_byte(off, len) {
            Some(at) => R::Sigbus(at),
            None => R::Data(self.data[off as usize..(off + len) as usize].to_vec()),
        }
    }

    fn host_write(&mut self, off: u64, len: u64, byte: u8) -> R {
        if !self.mapped || off + len > self.size {
            return R::Skipped;
        }
        let fault = self.first_private_byte(off, len);
        let stop = fault.unwrap_or(off + len);
        self.data[off as usize..stop as usize].fill(byte);
        fault.map_or(R::Ok, R::Sigbus)
    }

    fn guest_read(&self, off: u64, len: u64) -> R {
        if off + len > self.size {
            return R::Skipped;
        }
        R::Data(self.data[off as usize..(off + len) as usize].to_vec())
    }

    fn guest_write(&mut self, off: u64, len: u64, byte: u8) -> R {
        if off + len > self.size {
            return R::Skipped;
        }
        self.data[off as usize..(off + len) as usize].fill(byte);
        R::Ok
    }

    fn apply(&mut self, op: &Op) -> R {
        if self.size == 0 && !matches!(op, Op::Create { .. }) {
            return R::Skipped; // no file yet
        }
        match *op {
            Op::Create { pages, flags } => self.create(pages, flags),
            Op::Remap => self.remap(),
            Op::Convert { private, off, len } => self.convert(private, off, len),
            Op::Pin { off, len } => self.pin(off, len),
            Op::Unpin { idx } => self.unpin(idx),
            Op::Punch { off, len } => self.fallocate(true, off, len),
            Op::Allocate { off, len } => self.fallocate(false, off, len),
            Op::HostRead { off, len } => self.host_read(off, len),
            Op::HostWrite { off, len, byte } => self.host_write(off, len, byte),
            Op::GuestRead { off, len } => self.guest_read(off, len),
            Op::GuestWrite { off, len, byte } => self.guest_write(off, len, byte),
        }
    }
}

// ---------------------------------------------------------------- the emulated backend

struct Real {
    backend: EmulatedBackend,
    file: Option<Arc<dyn GuestMemfd>>,
    map: Option<HostMapping>,
    pins: Vec<PinGuard>,
}

fn errno(r: Result<(), Errno>) -> R {
    r.map_or_else(R::Err, |()| R::Ok)
}

fn probe<T>(p: Result<Probe<T>, Errno>, done: impl FnOnce(T) -> R) -> R {
    match p {
        Ok(Probe::Done(v)) => done(v),
        Ok(Probe::Fault(f)) if f.is_sigbus() => R::Sigbus(f.addr),
        Ok(Probe::Fault(f)) => panic!("a host access raised {f:?}, not SIGBUS"),
        Err(e) => R::Err(e),
    }
}

impl Real {
    fn new(config: Config) -> Self {
        Real {
            backend: EmulatedBackend::new(config.options()),
            file: None,
            map: None,
            pins: Vec::new(),
        }
    }

    fn remap(&mut self, f: &Arc<dyn GuestMemfd>) -> R {
        self.map = None;
        match f.mmap_all() {
            Ok(m) => {
                self.map = Some(m);
                R::Ok
            }
            Err(e) => R::Err(e),
        }
    }

    fn apply(&mut self, op: &Op) -> R {
        if let Op::Create { pages, flags } = *op {
            return match self.backend.create(pages * PS, flags) {
                Ok(f) => {
                    self.map = None;
                    self.pins.clear();
                    self.file = Some(f.clone());
                    self.remap(&f)
                }
                Err(e) => R::Err(e),
            };
        }
        let Some(f) = self.file.clone() else {
            return R::Skipped;
        };
        let size = f.size();
        let inside = |off: u64, len: u64| off + len <= size;
        match *op {
            Op::Create { .. } => unreachable!(),
            Op::Remap => self.remap(&f),
            Op::Convert { private, off, len } => {
                let attrs = if private {
                    KVM_MEMORY_ATTRIBUTE_PRIVATE
                } else {
                    0
                };
                let mut a = kvm_memory_attributes2::new(off, len, attrs);
                a.error_offset = SENTINEL;
                match f.set_attributes(&mut a) {
                    Ok(()) => R::Ok,
                    Err(e) => R::ConvErr(e, a.error_offset),
                }
            }
            Op::Pin { off, len } => match f.pin(off, len) {
                Ok(p) => {
                    self.pins.push(p);
                    R::Ok
                }
                Err(e) => R::Err(e),
            },
            Op::Unpin { idx } => {
                if idx < self.pins.len() {
                    drop(self.pins.remove(idx));
                    R::Ok
                } else {
                    R::Skipped
                }
            }
            Op::Punch { off, len } => {
                errno(f.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len))
            }
            Op::Allocate { off, len } => errno(f.fallocate(FALLOC_FL_KEEP_SIZE, off, len)),
            Op::HostRead { off, len } => match &self.map {
                Some(m) if inside(off, len) => {
                    probe(m.probe_read(off as usize, len as usize), R::Data)
                }
                _ => R::Skipped,
            },
            Op::HostWrite { off, len, byte } => match &self.map {
                Some(m) if inside(off, len) => {
                    probe(m.probe_write(off as usize, len as usize, byte), |()| R::Ok)
                }
                _ => R::Skipped,
            },
            Op::GuestRead { off, len } if inside(off, len) => {
                match InternalGuest.read(&*f, off, len as usize) {
                    Ok(b) => R::Data(b),
                    Err(e) => panic!("guest read: {e}"),
                }
            }
            Op::GuestWrite { off, len, byte } if inside(off, len) => {
                match InternalGuest.write(&*f, off, &vec![byte; len as usize]) {
                    Ok(()) => R::Ok,
                    Err(e) => panic!("guest write: {e}"),
                }
            }
            Op::GuestRead { .. } | Op::GuestWrite { .. } => R::Skipped,
        }
    }
}

/// Runs `ops` on both; the first disagreement is the error.
fn check(config: Config, ops: &[Op]) -> Result<(), String> {
    let mut model = Model::default();
    let mut real = Real::new(config);
    for (i, op) in ops.iter().enumerate() {
        let want = model.apply(op);
        let got = real.apply(op);
        if want != got {
            let show = |r: &R| match r {
                R::Data(d) => gmem_check::script::summarize(0, d),
                other => format!("{other:?}"),
            };
            return Err(format!(
                "op {i} {op:?} ({config:?}): model {}, emulated {}",
                show(&want),
                show(&got)
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- strategies

fn offset() -> impl Strategy<Value = u64> {
    (
        0..=MAX_PAGES,
        prop_oneof![8 => Just(0u64), 1 => Just(1), 1 => Just(PS / 2)],
    )
        .prop_map(|(p, d)| p * PS + d)
}

fn length() -> impl Strategy<Value = u64> {
    (
        0..=3u64,
        prop_oneof![8 => Just(0u64), 1 => Just(1), 1 => Just(PS - 1)],
    )
        .prop_map(|(p, d)| p * PS + d)
}

/// Byte-granular accesses that may straddle pages.
fn access() -> impl Strategy<Value = (u64, u64)> {
    (
        0..MAX_PAGES,
        prop_oneof![Just(0u64), Just(100), Just(PS - 2)],
        prop_oneof![Just(1u64), Just(4), Just(PS), Just(2 * PS + 3)],
    )
        .prop_map(|(p, d, l)| (p * PS + d, l))
}

fn flags() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => Just(GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED),
        2 => Just(GUEST_MEMFD_FLAG_MMAP),
        1 => Just(0),
        1 => Just(GUEST_MEMFD_FLAG_INIT_SHARED),
        1 => Just(GUEST_MEMFD_FLAG_NO_DIRECT_MAP),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (1..=MAX_PAGES, flags()).prop_map(|(pages, flags)| Op::Create { pages, flags }),
        1 => Just(Op::Remap),
        6 => (any::<bool>(), offset(), length())
            .prop_map(|(private, off, len)| Op::Convert { private, off, len }),
        2 => (offset(), length()).prop_map(|(off, len)| Op::Pin { off, len }),
        2 => (0..3usize).prop_map(|idx| Op::Unpin { idx }),
        2 => (offset(), length()).prop_map(|(off, len)| Op::Punch { off, len }),
        1 => (offset(), length()).prop_map(|(off, len)| Op::Allocate { off, len }),
        4 => access().prop_map(|(off, len)| Op::HostRead { off, len }),
        3 => (access(), any::<u8>()).prop_map(|((off, len), byte)| Op::HostWrite { off, len, byte }),
        2 => access().prop_map(|(off, len)| Op::GuestRead { off, len }),
        2 => (access(), any::<u8>()).prop_map(|((off, len), byte)| Op::GuestWrite { off, len, byte }),
    ]
}

fn sequence() -> impl Strategy<Value = Vec<Op>> {
    ((1..=MAX_PAGES, flags()), prop::collection::vec(op(), 1..40)).prop_map(
        |((pages, flags), mut ops)| {
            ops.insert(0, Op::Create { pages, flags });
            ops
        },
    )
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128)
}

/// Random sequences in `config` follow the reference model. A failure is shrunk and printed
/// (no file is written).
fn emulated_backend_follows_the_reference_model(config: Config) {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&sequence(), |ops| {
        check(config, &ops).map_err(proptest::test_runner::TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{config:?}: {e}");
    }
}

// ---------------------------------------------------------------- fixed sequences

fn run(config: Config, ops: &[Op]) {
    check(config, ops).unwrap_or_else(|e| panic!("{e}"));
}

/// The model itself can fail: a wrong expectation is caught (the comparison is not vacuous).
fn a_wrong_model_is_caught(config: Config) {
    let mut model = Model::default();
    let mut real = Real::new(config);
    let create = Op::Create {
        pages: 2,
        flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    };
    assert_eq!(model.apply(&create), real.apply(&create));
    let conv = Op::Convert {
        private: true,
        off: PS,
        len: PS,
    };
    assert_eq!(model.apply(&conv), real.apply(&conv));
    let read = Op::HostRead {
        off: 0,
        len: 2 * PS,
    };
    assert_eq!(real.apply(&read), R::Sigbus(PS));
    // A model that forgot the conversion would expect the data.
    model.private[1] = false;
    assert_ne!(model.apply(&read), real.apply(&read));
}

/// A pin taken before a punch no longer holds the punched page: converting it succeeds, while
/// a pinned neighbour still fails with its own offset.
fn regression_pin_detached_by_punch(config: Config) {
    run(
        config,
        &[
            Op::Create {
                pages: 3,
                flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            },
            Op::Pin {
                off: 0,
                len: 2 * PS,
            },
            Op::Punch { off: 0, len: PS },
            Op::Convert {
                private: true,
                off: 0,
                len: PS,
            },
            Op::Convert {
                private: true,
                off: 0,
                len: 3 * PS,
            },
            Op::Unpin { idx: 0 },
            Op::Convert {
                private: true,
                off: 0,
                len: 3 * PS,
            },
            Op::HostRead { off: 100, len: 4 },
        ],
    );
}

/// A host write that runs into a private page lands up to the page and faults there; a new
/// mapping made afterwards revokes the private page too (hole mappings with a tiny budget).
fn regression_partial_write_and_fresh_mapping(config: Config) {
    {
        run(
            config,
            &[
                Op::Create {
                    pages: 4,
                    flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                },
                Op::Convert {
                    private: true,
                    off: PS,
                    len: PS,
                },
                Op::Convert {
                    private: true,
                    off: 3 * PS,
                    len: PS,
                },
                Op::HostWrite {
                    off: PS - 2,
                    len: 4,
                    byte: 9,
                },
                Op::Remap,
                Op::HostRead { off: 0, len: PS },
                Op::HostRead {
                    off: 2 * PS,
                    len: 2 * PS,
                },
                Op::GuestRead {
                    off: PS - 2,
                    len: 4,
                },
                Op::Convert {
                    private: false,
                    off: 0,
                    len: 4 * PS,
                },
                Op::HostRead {
                    off: 0,
                    len: 4 * PS,
                },
            ],
        );
    }
}

/// A zero-length conversion of a NO_DIRECT_MAP file is EINVAL like any other (a shrunk failure
/// proptest once recorded).
fn regression_zero_length_conversion_of_a_no_direct_map_file(config: Config) {
    run(
        config,
        &[
            Op::Create {
                pages: 1,
                flags: GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
            },
            Op::Convert {
                private: false,
                off: 0,
                len: 0,
            },
        ],
    );
}

/// A test run once per configuration.
type PerConfig = (&'static str, fn(Config));

fn main() {
    let tests: [PerConfig; 5] = [
        (
            "emulated_backend_follows_the_reference_model",
            emulated_backend_follows_the_reference_model,
        ),
        ("a_wrong_model_is_caught", a_wrong_model_is_caught),
        (
            "regression_pin_detached_by_punch",
            regression_pin_detached_by_punch,
        ),
        (
            "regression_partial_write_and_fresh_mapping",
            regression_partial_write_and_fresh_mapping,
        ),
        (
            "regression_zero_length_conversion_of_a_no_direct_map_file",
            regression_zero_length_conversion_of_a_no_direct_map_file,
        ),
    ];
    let mut trials = Vec::new();
    for (name, f) in tests {
        for config in CONFIGS {
            trials.push(gmem_testkit::test_unless(
                format!("{name}::{}", config.name()),
                config.missing(),
                move || f(config),
            ));
        }
    }
    gmem_testkit::run(trials)
}
