//! Backend-generic conformance cases, after the kernel selftests (docs/series.md §4).
//!
//! Every case is a function over a [`Ctx`]: a backend that creates files, and a [`GuestPort`]
//! that plays the guest's part (reads and writes through the guest's view of the file). A
//! case declares the capabilities it needs ([`Need`]); a backend that lacks one reports
//! [`Outcome::Skip`] with the reason, never a pass.
//!
//! Host accesses that may fault are run with [`HostMapping::probe_read`] /
//! [`HostMapping::probe_write`], in a child process, so SIGBUS is asserted without a signal
//! handler in the test process.

mod conversions;
pub mod differential;
mod file_io;
mod guest_memfd_test;
mod huge_folios;
mod kvm_exits;
mod other_selftests;
mod platforms;
mod private_mem_conversions;
pub mod runner;

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use gmem::error::Errno;
use gmem::file::{BackendKind, GuestMemfd, GuestMemfdBackend};
use gmem::mapping::{HostMapping, Probe};
use gmem::os::PAGE_SIZE;
use gmem::uapi::{flag_names, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
pub use gmem_vmm::port::{GuestPort, InternalGuest, VmAccess, VmPort};

/// A capability a case needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// `GUEST_MEMFD_FLAG_MMAP`.
    Mmap,
    /// `GUEST_MEMFD_FLAG_INIT_SHARED`.
    InitShared,
    /// In-place conversion (`KVM_SET_MEMORY_ATTRIBUTES2`).
    Conversion,
    /// Something that plays the guest: reads and writes private pages.
    Guest,
    /// Revocation of private pages in every process that maps the file (forked children):
    /// the kernel's files, and the emulated backend with its guard.
    CrossProcess,
    /// A VM whose vCPUs run guest code on the file through a memslot ([`VmPort`]).
    Vm,
    /// Per-VM attribute tracking (`KVM_SET_MEMORY_ATTRIBUTES` on the VM, the module-parameter
    /// mode): modelled by the emulated backend's VM (`gmem_vmm::Vm::set_memory_attributes`).
    VmAttributes,
    /// A guest_memfd file descriptor on which `read(2)`, `write(2)`, `pread(2)`, ... can be
    /// tried.
    Fd,
    /// The platform models (SW, SNP, TDX, pKVM) of [`gmem::platform`]: the emulated backend.
    PlatformModels,
    /// Files of 2 MiB folios (`FolioSize::Huge`): the emulated backend, where the host offers
    /// shmem THP (asked afresh: [`gmem::host::huge_folios`]).
    HugeFolios,
}

impl Need {
    /// What the kernel backend needs of the running kernel for this, where it is a kernel
    /// feature (gmem's probe, [`gmem::host`]); `None` for what the kernel backend offers on any
    /// guest_memfd or never (a guest, the platform models).
    pub fn kernel_feature(self) -> Option<gmem::host::Feature> {
        use gmem::host::Feature;
        match self {
            Need::Mmap => Some(Feature::GuestMemfdFlags(GUEST_MEMFD_FLAG_MMAP)),
            Need::InitShared => Some(Feature::GuestMemfdFlags(GUEST_MEMFD_FLAG_INIT_SHARED)),
            Need::Conversion => Some(Feature::Conversion),
            _ => None,
        }
    }
}

/// The result of one case on one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every assertion held.
    Pass,
    /// An assertion failed: what was expected and what happened.
    Fail(String),
    /// The backend lacks a capability the case needs.
    Skip(String),
}

impl Outcome {
    /// `pass`, `fail` or `skip`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail(_) => "fail",
            Outcome::Skip(_) => "skip",
        }
    }

    /// The failure or skip reason ("" for a pass).
    pub fn reason(&self) -> &str {
        match self {
            Outcome::Pass => "",
            Outcome::Fail(r) | Outcome::Skip(r) => r,
        }
    }
}

/// Why a case failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaseFailure {
    /// An expectation did not hold: what was expected and what happened.
    #[error("{0}")]
    Expectation(String),
    /// A call the case makes failed.
    #[error("{op}: {errno}")]
    Call {
        /// The call, with its arguments where they matter.
        op: String,
        /// The answer.
        errno: Errno,
    },
    /// The SIGBUS probe of a host access (a forked child) could not be made.
    #[error("SIGBUS probe: {0}")]
    SigbusProbe(Errno),
    /// The guest (a [`GuestPort`] or its [`VmPort`]) could not do what the case asked.
    #[error("guest: {0}")]
    Guest(String),
    /// An error number from a call the message names around it.
    #[error(transparent)]
    Errno(#[from] Errno),
    /// The case found, by running, that this host cannot run it (one NUMA node, a kernel
    /// that answers EOPNOTSUPP): reported as a skip with the reason, never a pass.
    #[error("{0}")]
    Unsupported(String),
}

impl CaseFailure {
    /// A `map_err` adapter: the call `op` failed.
    pub fn call(op: impl Into<String>) -> impl FnOnce(Errno) -> CaseFailure {
        let op = op.into();
        move |errno| CaseFailure::Call { op, errno }
    }
}

impl From<gmem_vmm::PortError> for CaseFailure {
    fn from(e: gmem_vmm::PortError) -> Self {
        CaseFailure::Guest(e.to_string())
    }
}

impl From<String> for CaseFailure {
    fn from(msg: String) -> Self {
        CaseFailure::Expectation(msg)
    }
}

impl From<&str> for CaseFailure {
    fn from(msg: &str) -> Self {
        CaseFailure::Expectation(msg.to_string())
    }
}

/// What a case returns: `Err` says why it failed.
pub type CaseResult = Result<(), CaseFailure>;

/// One conformance case.
#[derive(Clone, Copy)]
pub struct Case {
    /// Name, as in the selftest where there is one.
    pub name: &'static str,
    /// Where it comes from (selftest file and function).
    pub source: &'static str,
    /// What the backend must offer.
    pub needs: &'static [Need],
    /// The case itself.
    pub run: fn(&Ctx) -> CaseResult,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .field("source", &self.source)
            .finish()
    }
}

/// What a case runs against.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Creates the files.
    pub backend: Arc<dyn GuestMemfdBackend>,
    /// Plays the guest, if anything can on this backend.
    pub guest: Option<Arc<dyn GuestPort>>,
}

/// All cases, in selftest order.
pub fn cases() -> Vec<Case> {
    let mut all = guest_memfd_test::cases();
    all.extend(file_io::cases());
    all.extend(conversions::cases());
    all.extend(private_mem_conversions::cases());
    all.extend(kvm_exits::cases());
    all.extend(other_selftests::cases());
    all.extend(huge_folios::cases());
    all.extend(platforms::cases());
    all
}

impl Ctx {
    /// A context for the emulated backend, the guest's reads and writes played through the
    /// internal view; the cases that need a VM ([`Need::Vm`]) get a one-vCPU VM when
    /// `/dev/kvm` can make one.
    pub fn emulated() -> Ctx {
        let guest: Arc<dyn GuestPort> = match gmem_vmm::port::VcpuGuest::emulated() {
            Ok(vm) => Arc::new(InternalGuestWithVm(vm)),
            Err(_) => Arc::new(InternalGuest),
        };
        Ctx {
            backend: Arc::new(gmem::emulated::EmulatedBackend::default()),
            guest: Some(guest),
        }
    }

    /// A context for the emulated backend with these options.
    pub fn emulated_with(options: gmem::emulated::EmulatedOptions) -> Ctx {
        Ctx {
            backend: Arc::new(gmem::emulated::EmulatedBackend::new(options)),
            guest: Some(Arc::new(InternalGuest)),
        }
    }

    /// A context for the kernel backend: a VM of type `vm_type` on `/dev/kvm`
    /// (`KVM_X86_DEFAULT_VM` = 0, `KVM_X86_SW_PROTECTED_VM` = 1). Nothing plays the guest yet
    /// (cases needing [`Need::Guest`] skip); `Err` says why the backend is unavailable.
    pub fn kernel(vm_type: u64) -> Result<Ctx, CtxError> {
        Ok(Ctx {
            backend: Arc::new(kernel_backend(vm_type)?),
            guest: None,
        })
    }

    /// A context for the kernel backend whose guest is a real vCPU in the backend's VM
    /// ([`gmem_vmm::port::VcpuGuest`]), so the cases needing [`Need::Guest`] or [`Need::Vm`]
    /// run against the kernel too. If no vCPU can be made, the guest is absent and the second
    /// value says why ([`CtxError::NoVcpu`]); `Err` says why the backend itself is
    /// unavailable.
    pub fn kernel_with_vcpu(vm_type: u64) -> Result<(Ctx, Option<CtxError>), CtxError> {
        let backend = kernel_backend(vm_type)?;
        let (guest, why): (Option<Arc<dyn GuestPort>>, _) =
            match gmem_vmm::port::VcpuGuest::kernel(&backend) {
                Ok(g) => (Some(g), None),
                Err(source) => (
                    None,
                    Some(CtxError::NoVcpu {
                        backend: BackendKind::Kernel,
                        source,
                    }),
                ),
            };
        Ok((
            Ctx {
                backend: Arc::new(backend),
                guest,
            },
            why,
        ))
    }

    /// A context for the emulated backend whose guest is a real vCPU
    /// ([`gmem_vmm::port::VcpuGuest`]) instead of the internal view.
    pub fn emulated_with_vcpu() -> Result<Ctx, CtxError> {
        let g = gmem_vmm::port::VcpuGuest::emulated().map_err(|source| CtxError::NoVcpu {
            backend: BackendKind::Emulated,
            source,
        })?;
        Ok(Ctx {
            backend: Arc::new(gmem::emulated::EmulatedBackend::default()),
            guest: Some(g),
        })
    }

    /// Why this context cannot run a case needing `need`, if it cannot.
    pub fn missing(&self, need: Need) -> Option<String> {
        let flags = self.backend.supported_flags();
        match need {
            Need::Mmap if flags & GUEST_MEMFD_FLAG_MMAP == 0 => Some(format!(
                "{} backend does not accept GUEST_MEMFD_FLAG_MMAP (supported flags: {})",
                self.backend.kind(),
                flag_names(flags)
            )),
            Need::InitShared if flags & GUEST_MEMFD_FLAG_INIT_SHARED == 0 => Some(format!(
                "{} backend does not accept GUEST_MEMFD_FLAG_INIT_SHARED (supported flags: {})",
                self.backend.kind(),
                flag_names(flags)
            )),
            Need::Conversion => self.backend.conversion_support().err().map(|e| e.to_string()),
            Need::Guest if self.guest.is_none() => Some(format!("nothing plays the guest on the {} backend", self.backend.kind())),
            Need::Vm if self.guest.as_ref().and_then(|g| g.vm()).is_none() => Some(format!(
                "no VM runs guest code on the {} backend here: the case needs a vCPU and memslots (a GuestPort with a VmPort)",
                self.backend.kind()
            )),
            Need::VmAttributes if self.backend.kind() != BackendKind::Emulated => Some(format!(
                "per-VM attribute tracking (KVM_SET_MEMORY_ATTRIBUTES on the VM, the module-parameter mode) is modelled on the emulated backend's VM only; gmem does not issue it on the {} backend's VM",
                self.backend.kind()
            )),
            Need::CrossProcess => self.backend.not_shared_across_processes(),
            Need::PlatformModels if self.backend.kind() != BackendKind::Emulated => Some(format!(
                "the platform models (sw, snp, tdx, pkvm) exist on the emulated backend; the {} backend runs this host's VM type",
                self.backend.kind()
            )),
            Need::HugeFolios if self.backend.kind() != BackendKind::Emulated => Some(format!(
                "2 MiB folios are an option of the emulated file; the {} backend's folios are the kernel's own",
                self.backend.kind()
            )),
            Need::HugeFolios => gmem::host::huge_folios().err().map(|e| e.to_string()),
            Need::Fd if self.backend.kind() == BackendKind::Emulated => Some(
                "the emulated file exposes no guest_memfd descriptor: read(2)/write(2) cannot reach it"
                    .to_string(),
            ),
            _ => None,
        }
    }

    /// Runs `case`: a skip if a need is missing, a failure if it returns `Err` or panics.
    pub fn run(&self, case: &Case) -> Outcome {
        if let Some(reason) = case.needs.iter().find_map(|&n| self.missing(n)) {
            return Outcome::Skip(reason);
        }
        match std::panic::catch_unwind(AssertUnwindSafe(|| (case.run)(self))) {
            Ok(Ok(())) => Outcome::Pass,
            Ok(Err(CaseFailure::Unsupported(why))) => Outcome::Skip(why),
            Ok(Err(e)) => Outcome::Fail(e.to_string()),
            Err(p) => Outcome::Fail(format!(
                "panicked: {}",
                p.downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("?")
            )),
        }
    }

    /// Creates a file of `npages` pages.
    pub fn create(&self, npages: u64, flags: u64) -> Result<Arc<dyn GuestMemfd>, CaseFailure> {
        self.backend
            .create(npages * PAGE_SIZE, flags)
            .map_err(CaseFailure::call(format!(
                "create({} pages, {})",
                npages,
                flag_names(flags)
            )))
    }

    fn guest(&self) -> Result<&dyn GuestPort, CaseFailure> {
        self.guest
            .as_deref()
            .ok_or_else(|| CaseFailure::Guest("no guest".to_string()))
    }

    /// The guest reads the first byte of page `p`, checks it is `expect` and writes `write`.
    pub fn guest_rmw(&self, f: &dyn GuestMemfd, p: u64, expect: u8, write: u8) -> CaseResult {
        let g = self.guest()?;
        let got = g.read(f, p * PAGE_SIZE, 1).map_err(CaseFailure::from)?;
        ensure(got[0] == expect, || {
            format!(
                "guest read of page {p}: expected {expect:#x}, got {:#x}",
                got[0]
            )
        })?;
        g.write(f, p * PAGE_SIZE, &[write])
            .map_err(CaseFailure::from)
    }
}

/// The internal view for the guest's reads and writes, and a VM for the cases that need one.
#[derive(Debug)]
struct InternalGuestWithVm(Arc<gmem_vmm::port::VcpuGuest>);

impl GuestPort for InternalGuestWithVm {
    fn read(
        &self,
        file: &dyn GuestMemfd,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, gmem_vmm::PortError> {
        InternalGuest.read(file, offset, len)
    }

    fn write(
        &self,
        file: &dyn GuestMemfd,
        offset: u64,
        data: &[u8],
    ) -> Result<(), gmem_vmm::PortError> {
        InternalGuest.write(file, offset, data)
    }

    fn vm(&self) -> Option<&dyn VmPort> {
        Some(self.0.as_ref())
    }
}

/// Why a conformance context ([`Ctx`]) cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum CtxError {
    /// The kernel has no guest_memfd (or no usable `/dev/kvm`), as gmem's probe found it: the
    /// kernel backend skips as a whole, with this one reason.
    #[error("the kernel backend is unavailable: {0}")]
    Unavailable(#[from] gmem::host::Missing),
    /// `/dev/kvm` could not be opened or made no VM of the type asked for.
    #[error("/dev/kvm is unusable: creating a VM of type {vm_type} failed: {errno}")]
    CreateVm {
        /// The VM type.
        vm_type: u64,
        /// What opening `/dev/kvm` or `KVM_CREATE_VM` answered.
        errno: Errno,
    },
    /// No vCPU could be made to play the guest.
    #[error("no vCPU guest on the {backend} backend: {source}")]
    NoVcpu {
        /// The backend the guest was for.
        backend: BackendKind,
        /// Why the VM or its vCPU could not be made.
        source: gmem_vmm::VmError,
    },
}

/// The kernel backend on a VM of type `vm_type`, or why there is none (no guest_memfd is a
/// reason: every case of the kernel backend creates a file).
fn kernel_backend(vm_type: u64) -> Result<gmem::kernel::KernelBackend, CtxError> {
    gmem::host::require(gmem::host::Feature::GuestMemfd)?;
    gmem::kernel::KernelBackend::with_vm_type(vm_type)
        .map_err(|errno| CtxError::CreateVm { vm_type, errno })
}

/// `Err(msg())` unless `cond`.
pub fn ensure(cond: bool, msg: impl FnOnce() -> String) -> CaseResult {
    if cond {
        Ok(())
    } else {
        Err(CaseFailure::Expectation(msg()))
    }
}

/// Host read of the first byte of page `p` through `m`: `Ok(Some(byte))`, or `Ok(None)` on
/// SIGBUS at that byte.
pub fn host_read(m: &HostMapping, p: u64) -> Result<Option<u8>, CaseFailure> {
    let off = page_off(p)?;
    match m.probe_read(off, 1).map_err(CaseFailure::SigbusProbe)? {
        Probe::Done(b) => Ok(Some(b[0])),
        Probe::Fault(f) if f.is_sigbus() && f.addr == off as u64 => Ok(None),
        Probe::Fault(f) => Err(format!("host read of page {p}: unexpected fault {f:?}").into()),
    }
}

/// Host write of `byte` to the first byte of page `p`: `Ok(true)` if it landed, `Ok(false)`
/// on SIGBUS at that byte.
pub fn host_write(m: &HostMapping, p: u64, byte: u8) -> Result<bool, CaseFailure> {
    let off = page_off(p)?;
    match m
        .probe_write(off, 1, byte)
        .map_err(CaseFailure::SigbusProbe)?
    {
        Probe::Done(()) => Ok(true),
        Probe::Fault(f) if f.is_sigbus() && f.addr == off as u64 => Ok(false),
        Probe::Fault(f) => Err(format!("host write of page {p}: unexpected fault {f:?}").into()),
    }
}

fn page_off(p: u64) -> Result<usize, CaseFailure> {
    usize::try_from(p * PAGE_SIZE).map_err(|_| format!("page {p} out of range").into())
}

/// The host reads `expect` at page `p` and writes `write` (both must not fault).
pub fn host_rmw(m: &HostMapping, p: u64, expect: u8, write: u8) -> CaseResult {
    let got = host_read(m, p)?;
    ensure(got == Some(expect), || {
        format!(
            "host read of page {p}: expected {expect:#x}, got {}",
            show(got)
        )
    })?;
    ensure(host_write(m, p, write)?, || {
        format!("host write of page {p}: SIGBUS on a shared page")
    })
}

fn show(b: Option<u8>) -> String {
    b.map_or_else(|| "SIGBUS".to_string(), |v| format!("{v:#x}"))
}
