//! What the workload measured and found ([`Report`]), with typed labels whose `Display` is what
//! `gmem run` prints: the run's [`Mode`], how guests asked for conversions
//! ([`ConversionRequests`]), the MAP_GPA_RANGE [`HypercallCheck`], and the memory's platform and
//! content rules ([`PlatformLabel`]).

use std::fmt;

use gmem::platform::{ContentRule, PlatformKind};
use gmem_vmm::backing::BackingKind;
use gmem_vmm::RequestPath;

use super::checks::{own_rules, Rules};
use super::Config;

/// How the workload ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Real vCPUs run the guest code (`kvm`).
    Kvm,
    /// No /dev/kvm: the host performs the guest's operations (`host-driven`).
    HostDriven,
}

impl Mode {
    /// `kvm` or `host-driven`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Kvm => "kvm",
            Mode::HostDriven => "host-driven",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How guests asked for conversions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConversionRequests {
    /// Each vCPU asked through `path`; whether the MAP_GPA_RANGE hypercall also reaches
    /// userspace here.
    Guest {
        /// The request path the guest programs use.
        path: RequestPath,
        /// Whether the hypercall reaches userspace on this host.
        hypercall_reaches_userspace: bool,
    },
    /// No guest asked: the host called the conversions itself, for this reason (no /dev/kvm).
    Host {
        /// Why no guest ran.
        why: String,
    },
}

impl fmt::Display for ConversionRequests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConversionRequests::Guest {
                path,
                hypercall_reaches_userspace,
            } => {
                match path {
                    RequestPath::Port => write!(
                        f,
                        "port: out to {:#x} with the MAP_GPA_RANGE arguments in the vCPU \
                         mailbox, one exit per request",
                        gmem_vmm::guest::PORT_MAP_GPA_RANGE
                    )?,
                    RequestPath::Hypercall => write!(
                        f,
                        "hypercall: vmcall KVM_HC_MAP_GPA_RANGE at CPL0, one exit per request"
                    )?,
                }
                match (path, hypercall_reaches_userspace) {
                    (RequestPath::Port, true) => f.write_str(
                        " (the hypercall also works here but costs two more exits, to enter and \
                         leave CPL0)",
                    ),
                    (RequestPath::Port, false) => f.write_str(
                        "; the MAP_GPA_RANGE hypercall does not reach userspace on this host",
                    ),
                    (RequestPath::Hypercall, _) => Ok(()),
                }
            }
            ConversionRequests::Host { why } => {
                write!(f, "none: {why}; conversions are called by the host")
            }
        }
    }
}

/// Whether the MAP_GPA_RANGE hypercall reaches userspace here, as checked before the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HypercallCheck {
    /// Not checked ([`Config::check_hypercall`] off).
    NotRun,
    /// Not checked: no /dev/kvm.
    NoKvm,
    /// `KVM_HC_MAP_GPA_RANGE` reaches userspace as `KVM_EXIT_HYPERCALL`.
    Reaches,
    /// It does not, and what happened instead.
    DoesNotReach(String),
}

impl HypercallCheck {
    /// Whether the hypercall reaches userspace.
    pub fn reaches_userspace(&self) -> bool {
        *self == HypercallCheck::Reaches
    }
}

impl fmt::Display for HypercallCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HypercallCheck::NotRun => f.write_str("not run"),
            HypercallCheck::NoKvm => f.write_str("not run (no /dev/kvm)"),
            HypercallCheck::Reaches => {
                f.write_str("KVM_HC_MAP_GPA_RANGE reaches userspace as KVM_EXIT_HYPERCALL")
            }
            HypercallCheck::DoesNotReach(why) => {
                write!(f, "KVM_HC_MAP_GPA_RANGE does not reach userspace: {why}")
            }
        }
    }
}

/// The memory's platform and its content rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlatformLabel {
    /// The platform model of the in-place file; `None` for the two-backing model, whose
    /// content rule is its own.
    pub platform: Option<PlatformKind>,
    /// The memory.
    pub memory: BackingKind,
    /// The content rule of a conversion to private.
    pub to_private: ContentRule,
    /// The content rule of a conversion to shared.
    pub to_shared: ContentRule,
}

impl PlatformLabel {
    /// The label of `config`'s memory: its platform (in place) and its own content rules.
    pub(super) fn of(config: &Config) -> PlatformLabel {
        let Rules {
            to_private,
            to_shared,
            ..
        } = own_rules(config);
        PlatformLabel {
            platform: match config.memory {
                BackingKind::InPlace(_) => Some(config.platform),
                BackingKind::TwoBacking { .. } => None,
            },
            memory: config.memory,
            to_private,
            to_shared,
        }
    }
}

impl fmt::Display for PlatformLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (p, s) = (self.to_private, self.to_shared);
        match self.platform {
            Some(platform) => write!(
                f,
                "{platform} (content to private: {p:?}, to shared: {s:?})"
            ),
            None => write!(
                f,
                "none: {} model (content to private: {p:?}, to shared: {s:?})",
                self.memory
            ),
        }
    }
}

/// What the workload measured and found.
#[derive(Debug, Clone)]
pub struct Report {
    /// The guest memory: the in-place file on its backend, or the two-backing model.
    pub memory: BackingKind,
    /// The platform model and its content rules.
    pub platform: PlatformLabel,
    /// Content-rule checks made across conversions and punch-holes.
    pub content_checks: u64,
    /// Real vCPUs, or host-driven (no /dev/kvm).
    pub mode: Mode,
    /// How guests asked for conversions, and why.
    pub request_path: ConversionRequests,
    /// Whether the MAP_GPA_RANGE hypercall reaches userspace here, and what happened.
    pub hypercall_check: HypercallCheck,
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
    /// and host check, the timing phase; not the hypercall check.
    pub elapsed_us: f64,
}

impl Report {
    /// The backend: `emulated` or `kernel` (the in-place file's), or the two-backing model's
    /// name (its two memfds are no guest_memfd backend).
    pub fn backend(&self) -> &'static str {
        match self.memory {
            BackingKind::InPlace(backend) => backend.name(),
            m => m.name(),
        }
    }

    /// The conversion model: `in-place`, `two-backing` or `two-backing+copy`.
    pub fn model(&self) -> &'static str {
        self.memory.name()
    }
}
