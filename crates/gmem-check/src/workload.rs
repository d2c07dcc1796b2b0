//! The private_mem_conversions workload (kernel-spec §4.3) on real vCPUs.
//!
//! Each vCPU owns a window of 2 MiB + 4 KiB (spaced 4 MiB apart, `align_up(2M + 4K, 2M)` as in
//! the selftest) and runs, as guest code generated at run time and executed at CPL3:
//!
//! 1. `guest_test_explicit_conversion(do_fallocate = false, then true)`;
//! 2. `guest_test_punch_hole(precise = false, then true)`;
//! 3. the timing phase: bare exits, then timed 4 KiB conversions, in the same run.
//!
//! The host checks shared content at every shared sync and that private pages are not
//! accessible from its mapping (a SIGBUS probe) at every private sync. Without `/dev/kvm`
//! the same operations run with host-driven conversions: the guest's reads and writes go
//! through the emulated file's guest view.
//!
//! [`Config::model`] runs the same flows on the two-backing model instead (a private store
//! and a shared memfd, the inactive copy discarded), for comparison: its content rule is its
//! own (zeroed, or preserved when it copies), and since it has no SIGBUS a private sync checks
//! that the VMM's accessor refuses the page and that the shared memfd no longer holds it.

use std::sync::Arc;
use std::time::Instant;

use gmem::emulated::EmulatedGuestMemfd;
use gmem::error::Errno;
use gmem::file::BackendKind;
use gmem::kernel::KernelBackend;
use gmem::os::PAGE_SIZE;
use gmem::platform::{ContentRule, Direction, PlatformKind};
use gmem::uapi::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE,
};
use gmem_vmm::backing::{in_place, BackingKind, GuestBacking};
use gmem_vmm::guest::DATA_GPA;
use gmem_vmm::stats::median_ns_as_us;
use gmem_vmm::two_backing::{TwoBacking, TwoBackingOptions};
use gmem_vmm::{
    ConvertRequest, Event, GuestProgram, RequestPath, Vm, VmError, REQUEST_FLAG_FALLOCATE,
};

/// Bytes of a vCPU's window.
pub const WINDOW_SIZE: u64 = (2 << 20) + 4096;
/// Distance between windows.
pub const WINDOW_STRIDE: u64 = 4 << 20;
/// The selftest's ranges, (offset, size) in the window.
pub const RANGES: [(u64, u64); 5] = [
    (0, 4096),
    (0, 2 << 20),
    (4096, 4096),
    (4096, 2 << 20),
    (2 << 20, 4096),
];
const INIT: u8 = 0xaa;
const DEF: u8 = 0xcc;
const P1: u8 = 0x11;
const P2: u8 = 0x22;
const P3: u8 = 0x33;
const P4: u8 = 0x44;

/// Options of [`run`].
#[derive(Debug, Clone)]
pub struct Config {
    /// vCPUs (one window each).
    pub vcpus: usize,
    /// gmem memory in MiB.
    pub mem_mib: u64,
    /// Memslots the file is split into.
    pub memslots: u64,
    /// Samples per round-trip measurement.
    pub samples: u64,
    /// Limit on the vCPUs' run time; vCPUs still running are stopped with an error.
    pub timeout: std::time::Duration,
    /// The platform model of the (emulated) file; the content checks follow its rules.
    pub platform: PlatformKind,
    /// The platform whose content rules the checks assume, if not `platform` (or the
    /// model's): a negative control (a run whose memory does not follow these rules must
    /// report mismatches).
    pub expect_rules_of: Option<PlatformKind>,
    /// The guest memory: gmem's in-place file on a backend, or the two-backing layout
    /// production VMMs ship, destructive or content-preserving (its content rule is its own:
    /// zeroed, or preserved).
    pub memory: BackingKind,
    /// Whether to probe, before the workload, if the MAP_GPA_RANGE hypercall reaches
    /// userspace here (up to 300 ms on a host where it does not).
    pub probe_hypercall: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            vcpus: 2,
            mem_mib: 64,
            memslots: 1,
            samples: 400,
            timeout: std::time::Duration::from_secs(120),
            platform: PlatformKind::SoftwareProtected,
            expect_rules_of: None,
            memory: BackingKind::InPlace(BackendKind::Emulated),
            probe_hypercall: true,
        }
    }
}

/// Why the workload could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// The kernel backend cannot convert on this host.
    #[error(
        "the kernel backend cannot run the conversion workload on this host: {0}. \
         Use --backend emulated (the default), which converts in userspace"
    )]
    KernelCannotConvert(String),
    /// A VM-level failure.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A kernel call failed.
    #[error("{op} failed: {errno}")]
    Kernel {
        /// What was attempted.
        op: &'static str,
        /// The answer.
        errno: Errno,
    },
}

/// What the workload measured and found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// `emulated` or `kernel` (the in-place model's backend), or the two-backing model's
    /// name (its two memfds are no guest_memfd backend).
    pub backend: String,
    /// `in-place`, `two-backing` or `two-backing+copy`.
    pub model: String,
    /// The platform model (`sw`, `snp`, `tdx`, `pkvm`) and its content rules.
    pub platform: String,
    /// Content-rule checks made across conversions and punch-holes.
    pub content_checks: u64,
    /// `kvm` (real vCPUs) or `host-driven` (no /dev/kvm).
    pub mode: String,
    /// How guests asked for conversions (`port`), and why.
    pub request_path: String,
    /// Whether the MAP_GPA_RANGE hypercall reaches userspace here, and what happened.
    pub hypercall_probe: String,
    /// vCPUs.
    pub vcpus: usize,
    /// Memory in MiB.
    pub mem_mib: u64,
    /// Memslots.
    pub memslots: u64,
    /// vCPU exits.
    pub exits: u64,
    /// Conversions to private.
    pub conversions_to_private: u64,
    /// Conversions to shared.
    pub conversions_to_shared: u64,
    /// Pages converted.
    pub pages_converted: u64,
    /// Punch-hole requests served.
    pub punches: u64,
    /// Bytes the host verified.
    pub host_verified_bytes: u64,
    /// Bytes the guest verified.
    pub guest_verified_bytes: u64,
    /// Private pages the host checked: in place, each must SIGBUS from the host mapping; in
    /// the two-backing model (no SIGBUS), each must be refused by the VMM's bookkeeping and
    /// have no shared copy left.
    pub private_probes: u64,
    /// Mismatches (host or guest).
    pub mismatches: u64,
    /// The first mismatches, described.
    pub mismatch_details: Vec<String>,
    /// Median bare exit round trip (µs).
    pub exit_round_trip_us: Option<f64>,
    /// Median conversion round trip: exit → convert 4 KiB → re-enter (µs).
    pub conversion_round_trip_us: f64,
    /// Median 4 KiB conversion alone (µs).
    pub conversion_4k_us: f64,
    /// conversion_rt / (exit_rt + conversion_4k).
    pub ratio: Option<f64>,
    /// Samples behind each median.
    pub samples: usize,
    /// Wall time of the whole workload in µs: memory creation, binding, every guest flow
    /// and host check, the timing phase; not the hypercall probe.
    pub elapsed_us: f64,
}

/// The ratio target.
pub const TARGET_RATIO: f64 = 1.5;

/// A guest operation, compiled to machine code (KVM) or executed by the host (no KVM).
#[derive(Debug, Clone, PartialEq)]
enum Op {
    Fill(u64, u64, u8),
    Verify(u64, u64, u8),
    Convert {
        gpa: u64,
        len: u64,
        private: bool,
        fallocate: bool,
    },
    Punch(u64, u64),
    Sync(u32),
    NopLoop(u64),
    ConversionLoop(u64, u64),
}

/// What the host does at a sync.
#[derive(Debug, Clone, Copy, PartialEq)]
enum HostStep {
    Shared {
        gpa: u64,
        len: u64,
        expect: u8,
        write: Option<u8>,
    },
    Private {
        gpa: u64,
    },
    /// What the guest reads of `[gpa, +len)` (through the guest path, i.e. after its guest
    /// fault) must follow `rule` from `before`.
    GuestSees {
        gpa: u64,
        len: u64,
        before: u8,
        rule: ContentRule,
    },
    /// What the host reads of `[gpa, +len)` through its mapping must follow `rule` from
    /// `before`.
    HostSees {
        gpa: u64,
        len: u64,
        before: u8,
        rule: ContentRule,
    },
}

struct Script {
    ops: Vec<Op>,
    steps: Vec<HostStep>,
}

impl Script {
    fn sync(&mut self, step: HostStep) {
        self.ops.push(Op::Sync(self.steps.len() as u32));
        self.steps.push(step);
    }
}

/// The content rules the checks assume.
#[derive(Debug, Clone, Copy)]
struct Rules {
    /// What the guest reads first after a conversion to private.
    to_private: ContentRule,
    /// What the host reads first after a conversion to shared.
    to_shared: ContentRule,
    /// What round trips with no access in between leave: in place, the platform's rules act
    /// when the page is next used (acceptance, the key it is read under), so such round trips
    /// preserve it; the two-backing model discards at each conversion.
    untouched: ContentRule,
}

/// The PMCT guest flows for the window at `base`, with content checks after each conversion
/// and punch-hole that follow the content rules (to private, to shared) (kernel-spec §2.8): the selftest assumes
/// the software-protected rule (preserved both ways) and writes after each conversion, so
/// these checks are added, and the one check it makes across a transition (a punched private
/// page reads zeros) is made by the host through the guest path where the rule scrambles.
fn script(base: u64, samples: u64, rules: Rules) -> Script {
    let Rules {
        to_private,
        to_shared,
        untouched,
    } = rules;
    let mut s = Script {
        ops: Vec::new(),
        steps: Vec::new(),
    };
    for fallocate in [false, true] {
        // guest_test_explicit_conversion
        s.ops.push(Op::Fill(base, WINDOW_SIZE, INIT));
        s.sync(HostStep::Shared {
            gpa: base,
            len: WINDOW_SIZE,
            expect: INIT,
            write: Some(DEF),
        });
        s.ops.push(Op::Verify(base, WINDOW_SIZE, DEF));
        for (off, size) in RANGES {
            let gpa = base + off;
            s.ops.push(Op::Fill(gpa, size, P1));
            s.ops.push(Op::Convert {
                gpa,
                len: size,
                private: true,
                fallocate,
            });
            // The guest's first read after the conversion: the rule of to-private.
            s.sync(HostStep::GuestSees {
                gpa,
                len: size,
                before: P1,
                rule: to_private,
            });
            if size <= PAGE_SIZE {
                s.ops.push(Op::Fill(gpa, size, P2));
                s.sync(HostStep::Private { gpa });
                s.ops.push(Op::Verify(gpa, size, P2));
                if off > 0 {
                    s.ops.push(Op::Verify(base, off, DEF));
                }
                let rest = off + size;
                if rest < WINDOW_SIZE {
                    s.ops.push(Op::Verify(base + rest, WINDOW_SIZE - rest, DEF));
                }
            } else {
                s.ops.push(Op::Fill(gpa, PAGE_SIZE, P2));
                s.sync(HostStep::Private { gpa });
            }
            s.ops.push(Op::Convert {
                gpa,
                len: size,
                private: false,
                fallocate,
            });
            // The host's first read of the page the guest wrote while private: the rule of
            // to-shared, or zeros after the punch that the fallocate variant adds.
            s.sync(HostStep::HostSees {
                gpa,
                len: PAGE_SIZE,
                before: P2,
                rule: if fallocate {
                    ContentRule::Zeroed
                } else {
                    to_shared
                },
            });
            s.ops.push(Op::Fill(gpa, size, P3));
            s.sync(HostStep::Shared {
                gpa,
                len: size,
                expect: P3,
                write: Some(P4),
            });
            s.ops.push(Op::Verify(gpa, size, P4));
            s.ops.push(Op::Punch(base, WINDOW_SIZE));
            s.ops.push(Op::Fill(base, WINDOW_SIZE, DEF));
        }
    }
    for precise in [false, true] {
        // guest_test_punch_hole
        s.ops.push(Op::Convert {
            gpa: base,
            len: WINDOW_SIZE,
            private: true,
            fallocate: false,
        });
        for (off, size) in RANGES {
            let gpa = base + off;
            s.ops.push(Op::Punch(base, WINDOW_SIZE));
            if precise {
                s.ops.push(Op::Fill(gpa, size, DEF));
                s.ops.push(Op::Verify(gpa, size, DEF));
            } else {
                s.ops.push(Op::Fill(base, WINDOW_SIZE, DEF));
                s.ops.push(Op::Verify(base, WINDOW_SIZE, DEF));
            }
            s.ops.push(Op::Punch(gpa, size));
            // A punched private page is a fresh zero page, which the guest sees through the
            // to-private rule (zeros, except under SNP's key).
            if to_private == ContentRule::Scrambled {
                s.sync(HostStep::GuestSees {
                    gpa,
                    len: size,
                    before: 0,
                    rule: to_private,
                });
            } else {
                s.ops.push(Op::Verify(gpa, size, 0));
            }
        }
        s.sync(HostStep::Private { gpa: base });
        s.ops.push(Op::Convert {
            gpa: base,
            len: WINDOW_SIZE,
            private: false,
            fallocate: false,
        });
    }
    // Timing: bare exits, then 4 KiB conversions (an even count: the page ends shared).
    s.ops.push(Op::Fill(base, PAGE_SIZE, DEF));
    s.ops.push(Op::NopLoop(samples + 1));
    s.ops.push(Op::ConversionLoop(base, 2 * (samples / 2 + 1)));
    // Round trips with no access in between leave the page as `untouched` says.
    match untouched {
        ContentRule::Preserved => s.sync(HostStep::Shared {
            gpa: base,
            len: PAGE_SIZE,
            expect: DEF,
            write: None,
        }),
        rule => s.sync(HostStep::HostSees {
            gpa: base,
            len: PAGE_SIZE,
            before: DEF,
            rule,
        }),
    }
    s
}

fn compile(vcpu: usize, ops: &[Op]) -> Result<gmem_vmm::Program, VmError> {
    let mut p = GuestProgram::new(vcpu, RequestPath::Port);
    for op in ops {
        match *op {
            Op::Fill(g, l, b) => p.fill(g, l, b),
            Op::Verify(g, l, b) => p.verify(g, l, b),
            Op::Convert {
                gpa,
                len,
                private,
                fallocate,
            } => p.convert(
                gpa,
                len,
                private,
                if fallocate { REQUEST_FLAG_FALLOCATE } else { 0 },
            ),
            Op::Punch(g, l) => p.punch_hole(g, l),
            Op::Sync(id) => p.sync(id),
            Op::NopLoop(n) => p.nop_loop(n),
            Op::ConversionLoop(g, n) => p.conversion_loop(g, n),
        }
    }
    p.done();
    p.finish()
}

fn guest_verified(ops: &[Op]) -> u64 {
    ops.iter()
        .map(|op| match op {
            Op::Verify(_, l, _) => *l,
            _ => 0,
        })
        .sum()
}

/// Per-vCPU host results.
#[derive(Debug, Default)]
struct Tally {
    host_verified: u64,
    guest_verified: u64,
    probes: u64,
    content_checks: u64,
    mismatches: Vec<String>,
    exit_rt: Vec<u64>,
    conv_rt: Vec<u64>,
    conv: Vec<u64>,
}

/// The host's side of a sync, on the memory at offset `gpa - DATA_GPA`.
fn host_step(file: &dyn GuestBacking, step: HostStep, t: &mut Tally) {
    match step {
        HostStep::Shared {
            gpa,
            len,
            expect,
            write,
        } => {
            let off = gpa - DATA_GPA;
            match file.attribute_runs(off, len) {
                Ok(runs) if runs.iter().all(|r| r.2 & KVM_MEMORY_ATTRIBUTE_PRIVATE == 0) => {}
                other => {
                    t.mismatches.push(format!(
                        "host: [{gpa:#x}, +{len:#x}) should be shared, attributes {other:?}"
                    ));
                    return;
                }
            }
            let mut buf = vec![0u8; len as usize];
            if let Err(e) = file.host_read(off, &mut buf) {
                t.mismatches
                    .push(format!("host: read of [{gpa:#x}, +{len:#x}) failed: {e}"));
                return;
            }
            t.host_verified += len;
            if let Some(i) = buf.iter().position(|&b| b != expect) {
                t.mismatches.push(format!(
                    "host: {:#x} holds {:#04x}, expected {expect:#04x}",
                    gpa + i as u64,
                    buf[i]
                ));
            }
            if let Some(w) = write {
                if let Err(e) = file.host_write(off, &vec![w; len as usize]) {
                    t.mismatches
                        .push(format!("host: write of [{gpa:#x}, +{len:#x}) failed: {e}"));
                }
            }
        }
        HostStep::Private { gpa } => {
            t.probes += 1;
            if let Err(e) = file.check_host_revoked(gpa - DATA_GPA) {
                t.mismatches
                    .push(format!("host: private page at {gpa:#x} {e}"));
            }
        }
        HostStep::GuestSees {
            gpa,
            len,
            before,
            rule,
        } => {
            // The guest path exists on the emulated backend and the two-backing model (the
            // kernel backend runs the software-protected rule, which the guest's own checks
            // cover).
            if file.kind() == BackingKind::InPlace(BackendKind::Kernel) {
                return;
            }
            let mut buf = vec![0u8; len as usize];
            if let Err(e) = file.guest_read(gpa - DATA_GPA, &mut buf) {
                t.mismatches
                    .push(format!("guest: read of [{gpa:#x}, +{len:#x}) failed: {e}"));
                return;
            }
            t.content_checks += 1;
            t.guest_verified += len;
            if let Err(e) = rule.check(&vec![before; len as usize], &buf) {
                t.mismatches.push(format!(
                    "guest: [{gpa:#x}, +{len:#x}) after to-private: {e}"
                ));
            }
        }
        HostStep::HostSees {
            gpa,
            len,
            before,
            rule,
        } => {
            let mut buf = vec![0u8; len as usize];
            if let Err(e) = file.host_read(gpa - DATA_GPA, &mut buf) {
                t.mismatches
                    .push(format!("host: read of [{gpa:#x}, +{len:#x}) failed: {e}"));
                return;
            }
            t.content_checks += 1;
            t.host_verified += len;
            if let Err(e) = rule.check(&vec![before; len as usize], &buf) {
                t.mismatches
                    .push(format!("host: [{gpa:#x}, +{len:#x}) after to-shared: {e}"));
            }
        }
    }
}

/// Runs the workload.
pub fn run(config: &Config) -> Result<Report, WorkloadError> {
    let start = Instant::now();
    let mut r = run_inner(config)?;
    r.elapsed_us = start.elapsed().as_secs_f64() * 1e6 - r.elapsed_us;
    r.backend = match config.memory {
        BackingKind::InPlace(backend) => backend.name(),
        m => m.name(),
    }
    .into();
    r.model = config.memory.name().into();
    r.platform = memory_label(config);
    Ok(r)
}

/// The most samples ([`Config::samples`]) `config`'s guest programs have room for: the
/// timing phase's conversion loop is unrolled (two conversions per pair of samples), so the
/// program grows linearly with the samples until it exceeds its code area
/// ([`gmem_vmm::guest::CODE_SIZE`]). For checking `--samples` before any work starts.
pub fn max_samples(config: &Config) -> Result<u64, VmError> {
    let rules = content_rules(config);
    let mut max = u64::MAX;
    for i in [0, config.vcpus.max(1) - 1] {
        let base = DATA_GPA + WINDOW_STRIDE * i as u64;
        let len = |samples| compile(i, &script(base, samples, rules).ops).map(|p| p.code.len());
        let (fixed, two) = (len(0)? as u64, len(2)? as u64);
        // Samples 2k and 2k + 1 run the same 2(k + 1) conversions.
        let per_pair = two.saturating_sub(fixed).max(1);
        let room = gmem_vmm::guest::CODE_SIZE.saturating_sub(fixed);
        max = max.min(2 * (room / per_pair) + 1);
    }
    Ok(max)
}

/// [`run`] without the labels `run` adds (backend, model, platform), and with the hypercall
/// probe's own time in `elapsed_us`.
fn run_inner(config: &Config) -> Result<Report, WorkloadError> {
    let need = WINDOW_STRIDE * config.vcpus as u64;
    let size = config.mem_mib << 20;
    if config.vcpus == 0 || config.vcpus > gmem_vmm::guest::MAX_VCPUS {
        return Err(WorkloadError::Config(format!(
            "--vcpus {}: allowed 1..={}",
            config.vcpus,
            gmem_vmm::guest::MAX_VCPUS
        )));
    }
    if size < need || size > gmem_vmm::guest::MAX_DATA_SIZE {
        return Err(WorkloadError::Config(format!(
            "--mem-mib {}: {} vCPUs need at least {} MiB (4 MiB per vCPU window); at most {} MiB",
            config.mem_mib,
            config.vcpus,
            need >> 20,
            gmem_vmm::guest::MAX_DATA_SIZE >> 20
        )));
    }
    if config.memslots == 0 || size % (config.memslots * (2 << 20)) != 0 {
        return Err(WorkloadError::Config(format!(
            "--memslots {}: must divide the memory into whole 2 MiB pieces",
            config.memslots
        )));
    }
    if config.memory == BackingKind::InPlace(BackendKind::Kernel)
        && config.platform != PlatformKind::SoftwareProtected
    {
        return Err(WorkloadError::Config(format!(
            "--platform {}: platform models exist on the emulated backend only; the kernel \
             backend runs this host's VM type (use --platform sw, or --backend emulated)",
            config.platform
        )));
    }
    if let BackingKind::TwoBacking { .. } = config.memory {
        if config.platform != PlatformKind::SoftwareProtected {
            return Err(WorkloadError::Config(format!(
                "--platform {} with --model {}: platform models are hooks of gmem's in-place \
                 file; the two-backing model's content rule is its own (two-backing: zeroed, \
                 two-backing+copy: preserved); use --platform sw (the default)",
                config.platform, config.memory
            )));
        }
    }
    let kvm = gmem_vmm::kvm_available();
    let flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    match config.memory {
        BackingKind::TwoBacking { preserve_content } => {
            let m = TwoBacking::new(size, false, TwoBackingOptions { preserve_content })
                .map_err(|e| WorkloadError::Config(e.to_string()))?;
            let file: Arc<dyn GuestBacking> = Arc::new(m);
            match kvm {
                Ok(()) => {
                    let vm = Vm::new(config.vcpus)?;
                    run_kvm(config, &vm, file, kvm_probe(config))
                }
                Err(why) => run_host_driven(config, &file, why.to_string()),
            }
        }
        BackingKind::InPlace(BackendKind::Kernel) => {
            let backend = KernelBackend::new().map_err(|errno| WorkloadError::Kernel {
                op: "opening /dev/kvm for the kernel backend",
                errno,
            })?;
            if let Some(why) = backend.conversion_unsupported() {
                return Err(WorkloadError::KernelCannotConvert(why.to_string()));
            }
            let file =
                backend
                    .create_guest_memfd(size, flags)
                    .map_err(|errno| WorkloadError::Kernel {
                        op: "KVM_CREATE_GUEST_MEMFD",
                        errno,
                    })?;
            let vm = Vm::on_kernel_backend(&backend, config.vcpus)?;
            let file = in_place(Arc::new(file)).map_err(|errno| WorkloadError::Kernel {
                op: "mmap of the gmem file",
                errno,
            })?;
            run_kvm(config, &vm, file, kvm_probe(config))
        }
        BackingKind::InPlace(BackendKind::Emulated) => {
            let file = EmulatedGuestMemfd::create_with(
                size,
                flags,
                gmem::emulated::EmulatedOptions::with_platform(config.platform),
            )
            .map_err(|errno| WorkloadError::Kernel {
                op: "creating the emulated guest_memfd",
                errno,
            })?;
            let file = in_place(Arc::new(file)).map_err(|errno| WorkloadError::Kernel {
                op: "mmap of the gmem file",
                errno,
            })?;
            match kvm {
                Ok(()) => {
                    let vm = Vm::new(config.vcpus)?;
                    run_kvm(config, &vm, file, kvm_probe(config))
                }
                Err(why) => run_host_driven(config, &file, why.to_string()),
            }
        }
    }
}

/// The content rules of a platform's in-place file.
fn platform_rules(p: PlatformKind) -> Rules {
    Rules {
        to_private: p.content_rule(Direction::ToPrivate),
        to_shared: p.content_rule(Direction::ToShared),
        untouched: ContentRule::Preserved,
    }
}

/// The memory's own content rules: the platform's in place; the two-backing model's.
fn own_rules(config: &Config) -> Rules {
    match config.memory {
        BackingKind::InPlace(_) => platform_rules(config.platform),
        BackingKind::TwoBacking { preserve_content } => {
            let r = if preserve_content {
                ContentRule::Preserved
            } else {
                ContentRule::Zeroed
            };
            Rules {
                to_private: r,
                to_shared: r,
                untouched: r,
            }
        }
    }
}

/// The content rules the checks assume: the negative control's platform if set, else the
/// memory's own.
fn content_rules(config: &Config) -> Rules {
    config
        .expect_rules_of
        .map_or_else(|| own_rules(config), platform_rules)
}

/// What the report says of the memory's platform and content rules.
fn memory_label(config: &Config) -> String {
    let Rules {
        to_private: p,
        to_shared: s,
        ..
    } = own_rules(config);
    match config.memory {
        BackingKind::InPlace(_) => format!(
            "{} (content to private: {p:?}, to shared: {s:?})",
            config.platform
        ),
        m => format!("none: {m} model (content to private: {p:?}, to shared: {s:?})"),
    }
}

/// Whether the MAP_GPA_RANGE hypercall reaches userspace, what happened, and the µs the
/// probe took.
fn kvm_probe(config: &Config) -> (bool, String, f64) {
    if !config.probe_hypercall {
        return (false, "not run".into(), 0.0);
    }
    let start = Instant::now();
    let (works, what) = match Vm::probe_hypercall_exit(std::time::Duration::from_millis(300)) {
        Ok(()) => (
            true,
            "KVM_HC_MAP_GPA_RANGE reaches userspace as KVM_EXIT_HYPERCALL".into(),
        ),
        Err(why) => (
            false,
            format!("KVM_HC_MAP_GPA_RANGE does not reach userspace: {why}"),
        ),
    };
    (works, what, start.elapsed().as_secs_f64() * 1e6)
}

fn run_kvm(
    config: &Config,
    vm: &Vm,
    file: Arc<dyn GuestBacking>,
    (hypercall_works, probe, probe_us): (bool, String, f64),
) -> Result<Report, WorkloadError> {
    let size = config.mem_mib << 20;
    let piece = size / config.memslots;
    for i in 0..config.memslots {
        vm.bind(DATA_GPA + i * piece, &file, i * piece, piece)?;
    }
    let rules = content_rules(config);
    let mut vcpus = Vec::new();
    let mut scripts = Vec::new();
    for i in 0..config.vcpus {
        let sc = script(DATA_GPA + WINDOW_STRIDE * i as u64, config.samples, rules);
        vcpus.push(vm.create_vcpu(i, compile(i, &sc.ops)?)?);
        scripts.push(sc);
    }
    let scripts = Arc::new(scripts);
    let results = vm.run_vcpus(vcpus, config.timeout, |vm, mut vcpu| {
        let sc = &scripts[vcpu.index()];
        let mut t = Tally {
            guest_verified: guest_verified(&sc.ops),
            ..Tally::default()
        };
        loop {
            match vcpu.run(vm)? {
                Event::Sync(id) => match sc.steps.get(id as usize) {
                    Some(step) => host_step(file.as_ref(), *step, &mut t),
                    None => t
                        .mismatches
                        .push(format!("guest synced with unknown id {id}")),
                },
                Event::Fail { id, rdi } => {
                    let what = vcpu.checks().get(id as usize).cloned().unwrap_or_default();
                    t.mismatches.push(format!(
                        "vCPU {}: {what} failed (rdi {rdi:#x})",
                        vcpu.index()
                    ));
                }
                Event::Done => break,
            }
        }
        let tm = vcpu.timings();
        t.exit_rt = tm.exit_rt_ns.clone();
        t.conv_rt = tm.conversion_rt_ns.clone();
        t.conv = tm.conversion_ns.clone();
        Ok(t)
    });
    let mut all = Tally::default();
    for r in results {
        let t = r?;
        all.host_verified += t.host_verified;
        all.guest_verified += t.guest_verified;
        all.probes += t.probes;
        all.content_checks += t.content_checks;
        all.mismatches.extend(t.mismatches);
        all.exit_rt.extend(t.exit_rt);
        all.conv_rt.extend(t.conv_rt);
        all.conv.extend(t.conv);
    }
    let stats = vm.stats();
    let exit_rt = median_ns_as_us(&all.exit_rt);
    let conv_rt = median_ns_as_us(&all.conv_rt);
    let conv = median_ns_as_us(&all.conv);
    Ok(Report {
        content_checks: all.content_checks,
        mode: "kvm".into(),
        request_path: format!(
            "port: out to {:#x} with the MAP_GPA_RANGE arguments in the vCPU mailbox, one exit \
             per request{}",
            gmem_vmm::guest::PORT_MAP_GPA_RANGE,
            if hypercall_works {
                " (the hypercall also works here but costs two more exits, to enter and leave CPL0)"
            } else {
                "; the MAP_GPA_RANGE hypercall does not reach userspace on this host"
            }
        ),
        hypercall_probe: probe,
        vcpus: config.vcpus,
        mem_mib: config.mem_mib,
        memslots: config.memslots,
        exits: stats.exits,
        conversions_to_private: stats.conversions_to_private,
        conversions_to_shared: stats.conversions_to_shared,
        pages_converted: stats.pages_converted,
        punches: stats.punches,
        host_verified_bytes: all.host_verified,
        guest_verified_bytes: all.guest_verified,
        private_probes: all.probes,
        mismatches: all.mismatches.len() as u64,
        mismatch_details: all.mismatches.into_iter().take(20).collect(),
        exit_round_trip_us: Some(exit_rt),
        conversion_round_trip_us: conv_rt,
        conversion_4k_us: conv,
        ratio: Some(conv_rt / (exit_rt + conv)),
        samples: all.conv_rt.len().min(all.exit_rt.len()),
        // The probe's time, which `run` takes off the wall time.
        elapsed_us: probe_us,
        ..Report::default()
    })
}

/// No /dev/kvm: the same operations, with the guest's accesses through the guest view and
/// conversions called by the host.
fn run_host_driven(
    config: &Config,
    file: &Arc<dyn GuestBacking>,
    why: String,
) -> Result<Report, WorkloadError> {
    let rules = content_rules(config);
    let mut t = Tally::default();
    let (mut to_private, mut to_shared, mut pages, mut punches) = (0u64, 0u64, 0u64, 0u64);
    let kerr = |op: &'static str| move |errno: Errno| WorkloadError::Kernel { op, errno };
    for i in 0..config.vcpus {
        let sc = script(DATA_GPA + WINDOW_STRIDE * i as u64, config.samples, rules);
        for op in &sc.ops {
            match *op {
                Op::Fill(g, l, b) => file
                    .guest_write(g - DATA_GPA, &vec![b; l as usize])
                    .map_err(kerr("guest write"))?,
                Op::Verify(g, l, b) => {
                    let mut buf = vec![0u8; l as usize];
                    file.guest_read(g - DATA_GPA, &mut buf)
                        .map_err(kerr("guest read"))?;
                    t.guest_verified += l;
                    if let Some(k) = buf.iter().position(|&x| x != b) {
                        t.mismatches.push(format!(
                            "guest: {:#x} holds {:#04x}, expected {b:#04x}",
                            g + k as u64,
                            buf[k]
                        ));
                    }
                }
                Op::Convert {
                    gpa,
                    len,
                    private,
                    fallocate,
                } => {
                    let req = ConvertRequest {
                        gpa,
                        size: len,
                        to_private: private,
                    };
                    let off = req.gpa - DATA_GPA;
                    let mut a = gmem::uapi::kvm_memory_attributes2::new(
                        off,
                        len,
                        if private {
                            KVM_MEMORY_ATTRIBUTE_PRIVATE
                        } else {
                            0
                        },
                    );
                    file.set_attributes(&mut a)
                        .map_err(kerr("KVM_SET_MEMORY_ATTRIBUTES2"))?;
                    if fallocate {
                        if private {
                            file.allocate(off, len).map_err(kerr("fallocate"))?;
                        } else {
                            file.punch_hole(off, len).map_err(kerr("punch hole"))?;
                        }
                    }
                    if private {
                        to_private += 1;
                    } else {
                        to_shared += 1;
                    }
                    pages += len / PAGE_SIZE;
                }
                Op::Punch(g, l) => {
                    file.punch_hole(g - DATA_GPA, l)
                        .map_err(kerr("punch hole"))?;
                    punches += 1;
                }
                Op::Sync(id) => host_step(file.as_ref(), sc.steps[id as usize], &mut t),
                Op::NopLoop(_) => {}
                Op::ConversionLoop(g, n) => {
                    for k in 0..n {
                        let attrs = if k % 2 == 0 {
                            KVM_MEMORY_ATTRIBUTE_PRIVATE
                        } else {
                            0
                        };
                        let mut a =
                            gmem::uapi::kvm_memory_attributes2::new(g - DATA_GPA, PAGE_SIZE, attrs);
                        let start = Instant::now();
                        file.set_attributes(&mut a)
                            .map_err(kerr("KVM_SET_MEMORY_ATTRIBUTES2"))?;
                        t.conv
                            .push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
                        if k % 2 == 0 {
                            to_private += 1;
                        } else {
                            to_shared += 1;
                        }
                        pages += 1;
                    }
                }
            }
        }
    }
    let conv = median_ns_as_us(&t.conv);
    Ok(Report {
        content_checks: t.content_checks,
        mode: "host-driven".into(),
        request_path: format!("none: {why}; conversions are called by the host"),
        hypercall_probe: "not run (no /dev/kvm)".into(),
        vcpus: config.vcpus,
        mem_mib: config.mem_mib,
        memslots: config.memslots,
        exits: 0,
        conversions_to_private: to_private,
        conversions_to_shared: to_shared,
        pages_converted: pages,
        punches,
        host_verified_bytes: t.host_verified,
        guest_verified_bytes: t.guest_verified,
        private_probes: t.probes,
        mismatches: t.mismatches.len() as u64,
        mismatch_details: t.mismatches.into_iter().take(20).collect(),
        exit_round_trip_us: None,
        conversion_round_trip_us: conv,
        conversion_4k_us: conv,
        ratio: None,
        samples: t.conv.len(),
        elapsed_us: 0.0,
        ..Report::default()
    })
}

#[cfg(test)]
mod platform_tests {
    use super::*;

    fn host_driven(platform: PlatformKind, expect: Option<PlatformKind>) -> Report {
        let config = Config {
            vcpus: 1,
            mem_mib: 4,
            samples: 4,
            platform,
            expect_rules_of: expect,
            ..Config::default()
        };
        let file = EmulatedGuestMemfd::create_with(
            4 << 20,
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            gmem::emulated::EmulatedOptions::with_platform(platform),
        )
        .unwrap();
        run_host_driven(&config, &in_place(Arc::new(file)).unwrap(), "test".into()).unwrap()
    }

    /// Host-driven mode (no /dev/kvm): the checks follow the platform, and fail on another
    /// platform's rules.
    #[test]
    fn host_driven_checks_follow_the_platform() {
        // tests/platforms.rs runs all four through `run` (real vCPUs where /dev/kvm works);
        // here the host-driven path, on the platform with the most hooks, and a negative
        // control.
        let r = host_driven(PlatformKind::Snp, None);
        assert_eq!(r.mismatches, 0, "{:?}", r.mismatch_details);
        assert!(r.content_checks >= 20, "{}", r.content_checks);
        let r = host_driven(PlatformKind::Snp, Some(PlatformKind::SoftwareProtected));
        assert!(r.mismatches > 0, "SNP checked with SW rules passed");
    }

    /// Host-driven mode on the two-backing model: its own rule passes, the other fails.
    #[test]
    fn host_driven_two_backing_follows_its_rule() {
        for preserve_content in [false, true] {
            let config = Config {
                vcpus: 1,
                mem_mib: 4,
                samples: 4,
                memory: BackingKind::TwoBacking { preserve_content },
                ..Config::default()
            };
            let file = || -> Arc<dyn GuestBacking> {
                Arc::new(
                    TwoBacking::new(4 << 20, false, TwoBackingOptions { preserve_content })
                        .unwrap(),
                )
            };
            let r = run_host_driven(&config, &file(), "test".into()).unwrap();
            assert_eq!(
                r.mismatches, 0,
                "{preserve_content}: {:?}",
                r.mismatch_details
            );
            assert!(r.private_probes > 0 && r.content_checks >= 20);
            let other = Config {
                expect_rules_of: Some(if preserve_content {
                    PlatformKind::Tdx
                } else {
                    PlatformKind::SoftwareProtected
                }),
                ..config
            };
            let r = run_host_driven(&other, &file(), "test".into()).unwrap();
            assert!(
                r.mismatches > 0,
                "{preserve_content}: the other rule passed"
            );
        }
    }
}

#[cfg(test)]
mod max_samples_tests {
    use super::*;

    /// `max_samples` is exact: its programs fit, one more sample does not.
    #[test]
    fn max_samples_is_the_last_count_that_fits() {
        for vcpus in [1, 2, 64] {
            let config = Config {
                vcpus,
                ..Config::default()
            };
            let max = max_samples(&config).unwrap();
            assert!(max > 1000, "{max}");
            let i = vcpus - 1;
            let base = DATA_GPA + WINDOW_STRIDE * i as u64;
            let rules = content_rules(&config);
            assert!(compile(i, &script(base, max, rules).ops).is_ok());
            assert!(matches!(
                compile(i, &script(base, max + 1, rules).ops),
                Err(VmError::ProgramTooLarge { .. })
            ));
        }
    }
}
