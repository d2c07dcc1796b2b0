//! What this host offers: `/dev/kvm` and its flavour, the KVM capabilities guest_memfd
//! depends on, userfaultfd, the memory settings gmem's emulation cares about, and for every gmem
//! feature which backend can provide it here and why not otherwise.
//!
//! [`probe`] never panics and never fails as a whole: whatever cannot be read is reported as
//! such (a host without `/dev/kvm` is a valid answer).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use gmem::error::Errno;
use gmem::file::GuestMemfdBackend;
use gmem::kernel::KernelBackend;
use gmem::uapi::{
    flag_names, SeriesRevision, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP, KVM_CAP_EXIT_HYPERCALL, KVM_CAP_GUEST_MEMFD,
    KVM_CAP_GUEST_MEMFD_FLAGS, KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_MEMORY_FAULT_INFO,
    KVM_CAP_NR_MEMSLOTS, KVM_CAP_PRE_FAULT_MEMORY, KVM_CAP_USER_MEMORY2, KVM_CAP_VM_TYPES,
    KVM_HC_MAP_GPA_RANGE, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_DEFAULT_VM, KVM_X86_SEV_ES_VM,
    KVM_X86_SEV_VM, KVM_X86_SNP_VM, KVM_X86_SW_PROTECTED_VM, KVM_X86_TDX_VM,
};

/// The x86 VM types by upstream name.
pub const VM_TYPE_NAMES: [(u32, &str); 6] = [
    (KVM_X86_DEFAULT_VM, "KVM_X86_DEFAULT_VM"),
    (KVM_X86_SW_PROTECTED_VM, "KVM_X86_SW_PROTECTED_VM"),
    (KVM_X86_SEV_VM, "KVM_X86_SEV_VM"),
    (KVM_X86_SEV_ES_VM, "KVM_X86_SEV_ES_VM"),
    (KVM_X86_SNP_VM, "KVM_X86_SNP_VM"),
    (KVM_X86_TDX_VM, "KVM_X86_TDX_VM"),
];

/// The capabilities the probe reports, by upstream name, in report order. The in-place
/// conversion capability is not here: its number depends on the series revision
/// ([`SeriesRevision`]) and is reported per revision.
pub const CAPABILITIES: [(u32, &str); 9] = [
    (KVM_CAP_USER_MEMORY2, "KVM_CAP_USER_MEMORY2"),
    (KVM_CAP_MEMORY_FAULT_INFO, "KVM_CAP_MEMORY_FAULT_INFO"),
    (KVM_CAP_MEMORY_ATTRIBUTES, "KVM_CAP_MEMORY_ATTRIBUTES"),
    (KVM_CAP_GUEST_MEMFD, "KVM_CAP_GUEST_MEMFD"),
    (KVM_CAP_VM_TYPES, "KVM_CAP_VM_TYPES"),
    (KVM_CAP_PRE_FAULT_MEMORY, "KVM_CAP_PRE_FAULT_MEMORY"),
    (KVM_CAP_EXIT_HYPERCALL, "KVM_CAP_EXIT_HYPERCALL"),
    (KVM_CAP_GUEST_MEMFD_FLAGS, "KVM_CAP_GUEST_MEMFD_FLAGS"),
    (KVM_CAP_NR_MEMSLOTS, "KVM_CAP_NR_MEMSLOTS"),
];

/// userfaultfd feature bits (`UFFD_FEATURE_*`, include/uapi/linux/userfaultfd.h, Linux 6.8).
pub const UFFD_FEATURE_NAMES: [(u64, &str); 17] = [
    (1 << 0, "PAGEFAULT_FLAG_WP"),
    (1 << 1, "EVENT_FORK"),
    (1 << 2, "EVENT_REMAP"),
    (1 << 3, "EVENT_REMOVE"),
    (1 << 4, "MISSING_HUGETLBFS"),
    (1 << 5, "MISSING_SHMEM"),
    (1 << 6, "EVENT_UNMAP"),
    (1 << 7, "SIGBUS"),
    (1 << 8, "THREAD_ID"),
    (1 << 9, "MINOR_HUGETLBFS"),
    (1 << 10, "MINOR_SHMEM"),
    (1 << 11, "EXACT_ADDRESS"),
    (1 << 12, "WP_HUGETLBFS_SHMEM"),
    (1 << 13, "WP_UNPOPULATED"),
    (1 << 14, "POISON"),
    (1 << 15, "WP_ASYNC"),
    (1 << 16, "MOVE"),
];
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`.
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_POISON`.
pub const UFFD_FEATURE_POISON: u64 = 1 << 14;
const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
/// `UFFDIO_API`: `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = (3 << 30) | (24 << 16) | (0xAA << 8) | 0x3F;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// Renders a `UFFD_FEATURE_*` mask as names (unknown bits as hex).
pub fn uffd_feature_names(features: u64) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = features;
    for (bit, name) in UFFD_FEATURE_NAMES {
        if features & bit != 0 {
            out.push(name.to_string());
            rest &= !bit;
        }
    }
    if rest != 0 {
        out.push(format!("{rest:#x}"));
    }
    out
}

/// Which KVM implementation serves `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// Intel VT-x (`kvm_intel`, CPU flag `vmx`).
    Vmx,
    /// AMD-V (`kvm_amd`, CPU flag `svm`).
    Svm,
    /// Pagetable-based virtualization (`kvm_pvm`): shadow paging, no hardware extension.
    Pvm,
    /// `/dev/kvm` exists but neither modules nor CPU flags say which.
    Unknown,
}

impl Flavour {
    /// `VMX`, `SVM`, `PVM` or `unknown`.
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Vmx => "VMX",
            Flavour::Svm => "SVM",
            Flavour::Pvm => "PVM",
            Flavour::Unknown => "unknown",
        }
    }
}

/// One `KVM_CHECK_EXTENSION` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// Capability number.
    pub number: u32,
    /// Upstream name.
    pub name: &'static str,
    /// The value `KVM_CHECK_EXTENSION` returned (0: absent; negative: the ioctl failed).
    pub value: i32,
    /// The value decoded where it is a mask (VM types, hypercalls, flags, attributes).
    pub decoded: Option<String>,
}

/// The in-place conversion capability of one series revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversionCapability {
    /// The series revision.
    pub revision: SeriesRevision,
    /// `KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES` in that revision.
    pub number: u32,
    /// The value `KVM_CHECK_EXTENSION` returned on the VM.
    pub value: i32,
    /// Whether the value advertises `KVM_MEMORY_ATTRIBUTE_PRIVATE`.
    pub private: bool,
}

/// `KVM_CREATE_VM` of one VM type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmTypeCheck {
    /// The type number.
    pub vm_type: u32,
    /// Its upstream name (`KVM_X86_*_VM`).
    pub name: &'static str,
    /// Whether `KVM_CAP_VM_TYPES` advertises it.
    pub advertised: bool,
    /// What `KVM_CREATE_VM` answered: `None` when it succeeded.
    pub create_error: Option<Errno>,
}

/// `/dev/kvm` and what it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmReport {
    /// Whether `/dev/kvm` exists.
    pub dev_kvm: bool,
    /// Why `/dev/kvm` could not be used (open or `KVM_CREATE_VM` of the default type failed).
    pub error: Option<String>,
    /// The implementation, when `/dev/kvm` exists.
    pub flavour: Option<Flavour>,
    /// Loaded KVM modules (`kvm`, `kvm_intel`, `kvm_amd`, `kvm_pvm`).
    pub modules: Vec<String>,
    /// Relevant CPU flags present (`vmx`, `svm`, `hypervisor`).
    pub cpu_flags: Vec<String>,
    /// `KVM_GET_API_VERSION`.
    pub api_version: Option<i32>,
    /// `KVM_CAP_VM_TYPES` (system-wide).
    pub vm_types: Option<u64>,
    /// Every known x86 VM type: advertised, and whether `KVM_CREATE_VM` accepts it.
    pub vm_type_checks: Vec<VmTypeCheck>,
    /// `vm` when the capabilities were read on a default VM, `system` when on `/dev/kvm`.
    pub capability_scope: &'static str,
    /// The capabilities of [`CAPABILITIES`], in order.
    pub capabilities: Vec<Capability>,
    /// The in-place conversion capability of every [`SeriesRevision`].
    pub conversion: Vec<ConversionCapability>,
    /// `Ok` when the kernel backend can convert; otherwise what is missing and what the
    /// kernel answered.
    pub conversion_support: Result<(), String>,
    /// Creating a one-page guest_memfd with every supported flag: `None` when it worked.
    pub guest_memfd_create_error: Option<String>,
}

impl KvmReport {
    /// The value of capability `number`, if it was read.
    pub fn capability(&self, number: u32) -> Option<i32> {
        self.capabilities
            .iter()
            .find(|c| c.number == number)
            .map(|c| c.value)
    }
}

/// userfaultfd availability and features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserfaultfdReport {
    /// Whether `userfaultfd(UFFD_USER_MODE_ONLY)` and `UFFDIO_API` succeeded.
    pub available: bool,
    /// Why not.
    pub error: Option<String>,
    /// `uffdio_api.features` as returned for a request of 0 (every supported feature).
    pub features: u64,
    /// The features by name.
    pub feature_names: Vec<String>,
    /// Whether `/dev/userfaultfd` exists.
    pub dev_userfaultfd: bool,
    /// `vm.unprivileged_userfaultfd`.
    pub unprivileged_userfaultfd: Option<u64>,
}

/// Whether one backend provides one feature, with the evidence or the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Availability {
    /// Available on this host.
    pub available: bool,
    /// How it is provided, or why not (naming the missing capability or setting).
    pub detail: String,
}

impl Availability {
    fn yes(detail: impl Into<String>) -> Self {
        Availability {
            available: true,
            detail: detail.into(),
        }
    }

    fn no(detail: impl Into<String>) -> Self {
        Availability {
            available: false,
            detail: detail.into(),
        }
    }
}

/// One gmem feature and what each backend can do about it here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureRow {
    /// Short identifier (`create`, `mmap`, ...).
    pub feature: &'static str,
    /// What it is.
    pub description: &'static str,
    /// The emulated backend.
    pub emulated: Availability,
    /// The kernel backend.
    pub kernel: Availability,
}

/// Everything the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    /// `uname -r`.
    pub kernel_release: Option<String>,
    /// `/dev/kvm`.
    pub kvm: KvmReport,
    /// userfaultfd.
    pub userfaultfd: UserfaultfdReport,
    /// The selected mode of `/sys/kernel/mm/transparent_hugepage/shmem_enabled`.
    pub shmem_thp: Option<String>,
    /// `/proc/sys/vm/nr_hugepages`.
    pub nr_hugepages: Option<u64>,
    /// `/proc/sys/vm/max_map_count`.
    pub max_map_count: Option<u64>,
    /// Every gmem feature, in a fixed order: `create`, `mmap`, `init_shared`, `conversion`,
    /// `sigbus_on_private`, `punch_hole`, `pins_eagain`, `no_direct_map`, `guest_memslots`,
    /// `map_gpa_range_exit`, `memory_fault_exit`.
    pub features: Vec<FeatureRow>,
}

impl HostReport {
    /// The row of `feature`.
    pub fn feature(&self, feature: &str) -> Option<&FeatureRow> {
        self.features.iter().find(|f| f.feature == feature)
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn read_u64(path: &str) -> Option<u64> {
    read_trimmed(path).and_then(|s| s.parse().ok())
}

/// The bracketed choice of a sysfs selector such as `always [never] advise`.
fn selected(s: &str) -> Option<String> {
    let start = s.find('[')?;
    let end = s[start..].find(']')? + start;
    Some(s[start + 1..end].to_string())
}

fn kernel_release() -> Option<String> {
    // SAFETY: an all-zero utsname is a valid value of this plain C struct.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname for the duration of the call.
    if unsafe { libc::uname(&mut u) } != 0 {
        return read_trimmed("/proc/sys/kernel/osrelease");
    }
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c.to_ne_bytes()[0])
        .collect();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

fn kvm_modules() -> Vec<String> {
    let listed = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    ["kvm", "kvm_intel", "kvm_amd", "kvm_pvm"]
        .iter()
        .filter(|m| {
            listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(**m))
                || Path::new("/sys/module").join(m).exists()
        })
        .map(|m| (*m).to_string())
        .collect()
}

fn cpu_flags() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    ["vmx", "svm", "hypervisor"]
        .iter()
        .filter(|f| flags.contains(f))
        .map(|f| (*f).to_string())
        .collect()
}

fn flavour(modules: &[String], flags: &[String]) -> Flavour {
    let has = |list: &[String], x: &str| list.iter().any(|m| m == x);
    if has(modules, "kvm_pvm") {
        Flavour::Pvm
    } else if has(modules, "kvm_intel") {
        Flavour::Vmx
    } else if has(modules, "kvm_amd") {
        Flavour::Svm
    } else if has(flags, "vmx") {
        Flavour::Vmx
    } else if has(flags, "svm") {
        Flavour::Svm
    } else {
        Flavour::Unknown
    }
}

fn vm_type_names(mask: u64) -> String {
    let names: Vec<&str> = VM_TYPE_NAMES
        .iter()
        .filter(|(t, _)| mask & (1u64 << t) != 0)
        .map(|(_, n)| *n)
        .collect();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join("|")
    }
}

fn decode(number: u32, value: i32) -> Option<String> {
    let v = u64::try_from(value).ok()?;
    match number {
        KVM_CAP_VM_TYPES => Some(vm_type_names(v)),
        KVM_CAP_EXIT_HYPERCALL => {
            let bit = 1u64 << KVM_HC_MAP_GPA_RANGE;
            let mut parts = Vec::new();
            if v & bit != 0 {
                parts.push("KVM_HC_MAP_GPA_RANGE".to_string());
            }
            if v & !bit != 0 {
                parts.push(format!("{:#x}", v & !bit));
            }
            Some(if parts.is_empty() {
                "none".to_string()
            } else {
                parts.join("|")
            })
        }
        KVM_CAP_GUEST_MEMFD_FLAGS => Some(flag_names(v)),
        KVM_CAP_MEMORY_ATTRIBUTES => Some(attribute_names(v)),
        _ => None,
    }
}

fn attribute_names(v: u64) -> String {
    let mut parts = Vec::new();
    if v & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0 {
        parts.push("KVM_MEMORY_ATTRIBUTE_PRIVATE".to_string());
    }
    let rest = v & !KVM_MEMORY_ATTRIBUTE_PRIVATE;
    if rest != 0 {
        parts.push(format!("{rest:#x}"));
    }
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join("|")
    }
}

fn probe_kvm(dev_kvm_path: &Path) -> KvmReport {
    let dev_kvm = dev_kvm_path.exists();
    let modules = kvm_modules();
    let cpu_flags = cpu_flags();
    let mut r = KvmReport {
        dev_kvm,
        error: None,
        flavour: dev_kvm.then(|| flavour(&modules, &cpu_flags)),
        modules,
        cpu_flags,
        api_version: None,
        vm_types: None,
        vm_type_checks: Vec::new(),
        capability_scope: "system",
        capabilities: Vec::new(),
        conversion: Vec::new(),
        conversion_support: Err("/dev/kvm is missing".to_string()),
        guest_memfd_create_error: None,
    };
    if !dev_kvm {
        let why = format!("{} is missing", dev_kvm_path.display());
        r.error = Some(why.clone());
        r.conversion_support = Err(why);
        return r;
    }
    let opened = std::ffi::CString::new(dev_kvm_path.as_os_str().as_bytes())
        .map_err(|_| Errno::EINVAL)
        .and_then(|p| kvm_ioctls::Kvm::new_with_path(p.as_c_str()).map_err(Errno::from));
    let kvm = match opened {
        Ok(k) => k,
        Err(e) => {
            let why = format!("cannot open {}: {e}", dev_kvm_path.display());
            r.error = Some(why.clone());
            r.conversion_support = Err(why);
            return r;
        }
    };
    r.api_version = Some(kvm.get_api_version());
    let sys_cap = |cap: u32| kvm.check_extension_raw(libc::c_ulong::from(cap));
    let types = u64::try_from(sys_cap(KVM_CAP_VM_TYPES)).unwrap_or(0);
    r.vm_types = Some(types);
    r.vm_type_checks = VM_TYPE_NAMES
        .iter()
        .map(|&(t, name)| VmTypeCheck {
            vm_type: t,
            name,
            advertised: types & (1u64 << t) != 0,
            create_error: kvm.create_vm_with_type(u64::from(t)).err().map(Errno::from),
        })
        .collect();
    let backend = match KernelBackend::open(dev_kvm_path, u64::from(KVM_X86_DEFAULT_VM)) {
        Ok(b) => Some(b),
        Err(e) => {
            r.error = Some(format!("KVM_CREATE_VM(KVM_X86_DEFAULT_VM) failed: {e}"));
            None
        }
    };
    let cap = |number: u32| match &backend {
        Some(b) => b.vm_fd().check_extension_raw(libc::c_ulong::from(number)),
        None => sys_cap(number),
    };
    r.capability_scope = if backend.is_some() { "vm" } else { "system" };
    r.capabilities = CAPABILITIES
        .iter()
        .map(|&(number, name)| {
            // KVM_CAP_VM_TYPES is a system capability.
            let value = if number == KVM_CAP_VM_TYPES {
                sys_cap(number)
            } else {
                cap(number)
            };
            Capability {
                number,
                name,
                value,
                decoded: decode(number, value),
            }
        })
        .collect();
    r.conversion = SeriesRevision::ALL
        .iter()
        .map(|&revision| {
            let number = revision.cap_guest_memfd_memory_attributes();
            let value = cap(number);
            ConversionCapability {
                revision,
                number,
                value,
                private: u64::try_from(value).is_ok_and(|v| v & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0),
            }
        })
        .collect();
    match &backend {
        Some(b) => {
            r.conversion_support = b.conversion_support().map_err(|e| e.to_string());
            r.guest_memfd_create_error = match b.create(gmem::PAGE_SIZE, b.supported_flags()) {
                Ok(f) => f.stat().err().map(|e| format!("fstat failed: {e}")),
                Err(e) => Some(format!(
                    "KVM_CREATE_GUEST_MEMFD(4096, {}) failed: {e}",
                    flag_names(b.supported_flags())
                )),
            };
        }
        None => {
            r.conversion_support = Err(r.error.clone().unwrap_or_default());
        }
    }
    r
}

fn probe_userfaultfd() -> UserfaultfdReport {
    let mut r = UserfaultfdReport {
        available: false,
        error: None,
        features: 0,
        feature_names: Vec::new(),
        dev_userfaultfd: Path::new("/dev/userfaultfd").exists(),
        unprivileged_userfaultfd: read_u64("/proc/sys/vm/unprivileged_userfaultfd"),
    };
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
        )
    };
    let Ok(fd) = libc::c_int::try_from(fd) else {
        r.error = Some("userfaultfd returned an out-of-range descriptor".to_string());
        return r;
    };
    if fd < 0 {
        r.error = Some(format!(
            "userfaultfd(UFFD_USER_MODE_ONLY) failed: {}",
            Errno::last()
        ));
        return r;
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which `api` is.
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
        r.error = Some(format!("UFFDIO_API failed: {}", Errno::last()));
        return r;
    }
    r.available = true;
    r.features = api.features;
    r.feature_names = uffd_feature_names(api.features);
    r
}

/// Probes the host. Never panics; what cannot be read is reported.
pub fn probe() -> HostReport {
    probe_with_kvm_device(Path::new("/dev/kvm"))
}

/// [`probe`] with the KVM device at `dev_kvm` (a missing path reports a host without KVM).
pub fn probe_with_kvm_device(dev_kvm: &Path) -> HostReport {
    let kvm = probe_kvm(dev_kvm);
    let userfaultfd = probe_userfaultfd();
    let mut report = HostReport {
        kernel_release: kernel_release(),
        kvm,
        userfaultfd,
        shmem_thp: read_trimmed("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
            .and_then(|s| selected(&s)),
        nr_hugepages: read_u64("/proc/sys/vm/nr_hugepages"),
        max_map_count: read_u64("/proc/sys/vm/max_map_count"),
        features: Vec::new(),
    };
    report.features = features(&report);
    report
}

fn cap_text(number: u32, name: &str, value: Option<i32>) -> String {
    match value {
        Some(v) => format!("{name} ({number}) = {v}"),
        None => format!("{name} ({number}) unread"),
    }
}

/// The feature table, derived from what was probed.
fn features(r: &HostReport) -> Vec<FeatureRow> {
    let k = &r.kvm;
    // Why no VM at all, if so.
    let no_vm: Option<String> = if !k.dev_kvm {
        Some(
            k.error
                .clone()
                .unwrap_or_else(|| "/dev/kvm is missing".to_string()),
        )
    } else if k.capability_scope != "vm" {
        Some(
            k.error
                .clone()
                .unwrap_or_else(|| "no VM could be created".to_string()),
        )
    } else {
        None
    };
    let capv = |n: u32| k.capability(n).filter(|&v| v > 0);
    let flags = capv(KVM_CAP_GUEST_MEMFD_FLAGS)
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(0);
    let flags_text = format!(
        "KVM_CAP_GUEST_MEMFD_FLAGS ({KVM_CAP_GUEST_MEMFD_FLAGS}) = {flags:#x} ({})",
        flag_names(flags)
    );
    let gmem = capv(KVM_CAP_GUEST_MEMFD).is_some() && k.guest_memfd_create_error.is_none();
    let gmem_why = || -> String {
        if let Some(why) = &no_vm {
            return why.clone();
        }
        if let Some(e) = &k.guest_memfd_create_error {
            return e.clone();
        }
        format!(
            "{} not advertised",
            cap_text(
                KVM_CAP_GUEST_MEMFD,
                "KVM_CAP_GUEST_MEMFD",
                k.capability(KVM_CAP_GUEST_MEMFD)
            )
        )
    };
    let kernel_flag = |bit: u64, what: &str| -> Availability {
        if !gmem {
            Availability::no(gmem_why())
        } else if flags & bit != 0 {
            Availability::yes(format!("{what}; {flags_text}"))
        } else {
            Availability::no(format!("{flags_text} lacks {}", flag_names(bit)))
        }
    };
    let conversion_caps = k
        .conversion
        .iter()
        .map(|c| format!("{} in {}", c.number, c.revision.name()))
        .collect::<Vec<_>>()
        .join(", ");
    let kernel_conversion = match (&no_vm, &k.conversion_support) {
        (Some(why), _) => Availability::no(why.clone()),
        (None, Ok(())) => {
            let rev = k
                .conversion
                .iter()
                .find(|c| c.private)
                .map_or("?", |c| c.revision.name());
            Availability::yes(format!(
                "KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd (series {rev})"
            ))
        }
        (None, Err(why)) => Availability::no(why.clone()),
    };
    let uffd = &r.userfaultfd;
    let poison = uffd.available
        && uffd.features & UFFD_FEATURE_POISON != 0
        && uffd.features & UFFD_FEATURE_WP_HUGETLBFS_SHMEM != 0;
    let revocation = if poison {
        "userfaultfd poison markers (UFFD_FEATURE_POISON, WP_HUGETLBFS_SHMEM)".to_string()
    } else {
        format!(
            "MAP_FIXED remapping of private runs (userfaultfd poison unavailable: {}), bounded \
             by vm.max_map_count = {}",
            uffd.error
                .clone()
                .unwrap_or_else(|| "POISON or WP_HUGETLBFS_SHMEM missing".to_string()),
            r.max_map_count
                .map_or_else(|| "?".to_string(), |v| v.to_string())
        )
    };
    let vm_feature = |what: &str| -> Availability {
        match &no_vm {
            Some(why) => Availability::no(why.clone()),
            None => Availability::yes(what.to_string()),
        }
    };
    let hypercall = capv(KVM_CAP_EXIT_HYPERCALL)
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(0);
    // Whether the hypercall really reaches userspace: a guest issues it (once, ~0.3 s at most).
    let delivered = if no_vm.is_none() && hypercall & (1 << KVM_HC_MAP_GPA_RANGE) != 0 {
        Some(gmem_vmm::Vm::probe_hypercall_exit(
            std::time::Duration::from_millis(300),
        ))
    } else {
        None
    };
    let map_gpa = |backend: &str| -> Availability {
        if let Some(why) = &no_vm {
            return Availability::no(why.clone());
        }
        if let Some(Err(why)) = &delivered {
            return Availability::no(format!(
                "KVM_CAP_EXIT_HYPERCALL ({KVM_CAP_EXIT_HYPERCALL}) = {hypercall:#x} advertises \
                 KVM_HC_MAP_GPA_RANGE, but {why}; gmem's VMM takes conversion requests by port \
                 I/O instead"
            ));
        }
        if hypercall & (1 << KVM_HC_MAP_GPA_RANGE) == 0 {
            return Availability::no(format!(
                "KVM_CAP_EXIT_HYPERCALL ({KVM_CAP_EXIT_HYPERCALL}) = {hypercall:#x} lacks bit \
                 {KVM_HC_MAP_GPA_RANGE} (KVM_HC_MAP_GPA_RANGE)"
            ));
        }
        let mut d = format!(
            "KVM_CAP_EXIT_HYPERCALL ({KVM_CAP_EXIT_HYPERCALL}) = {hypercall:#x} has \
             KVM_HC_MAP_GPA_RANGE; the VMM turns the exit into a conversion on the {backend} backend"
        );
        if delivered.as_ref().is_some_and(Result::is_ok) {
            d.push_str(" (a guest's hypercall reached userspace in this probe)");
        }
        Availability::yes(d)
    };
    let attrs233 = capv(KVM_CAP_MEMORY_ATTRIBUTES)
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(0);
    let fault_info = capv(KVM_CAP_MEMORY_FAULT_INFO).is_some();
    let kernel_memory_fault = if let Some(why) = &no_vm {
        Availability::no(why.clone())
    } else if !fault_info {
        Availability::no(format!(
            "{} not advertised",
            cap_text(
                KVM_CAP_MEMORY_FAULT_INFO,
                "KVM_CAP_MEMORY_FAULT_INFO",
                k.capability(KVM_CAP_MEMORY_FAULT_INFO)
            )
        ))
    } else if attrs233 & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0 || k.conversion.iter().any(|c| c.private)
    {
        Availability::yes(
            "KVM_EXIT_MEMORY_FAULT on a shared/private mismatch (KVM_CAP_MEMORY_FAULT_INFO)",
        )
    } else {
        Availability::no(format!(
            "KVM_CAP_MEMORY_FAULT_INFO ({KVM_CAP_MEMORY_FAULT_INFO}) is advertised, but neither \
             KVM_CAP_MEMORY_ATTRIBUTES ({KVM_CAP_MEMORY_ATTRIBUTES}) = {attrs233:#x} nor \
             KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES ({conversion_caps}) advertises \
             KVM_MEMORY_ATTRIBUTE_PRIVATE: KVM has no private attribute for a fault to mismatch"
        ))
    };
    let memslots_kernel = if let Some(why) = &no_vm {
        Availability::no(why.clone())
    } else if capv(KVM_CAP_USER_MEMORY2).is_none() {
        Availability::no(format!(
            "{} not advertised",
            cap_text(
                KVM_CAP_USER_MEMORY2,
                "KVM_CAP_USER_MEMORY2",
                k.capability(KVM_CAP_USER_MEMORY2)
            )
        ))
    } else if !gmem {
        Availability::no(gmem_why())
    } else {
        Availability::yes(
            "KVM_SET_USER_MEMORY_REGION2 with KVM_MEM_GUEST_MEMFD, userspace_addr = the file's \
             mapping",
        )
    };
    let pins_kernel = if !gmem {
        Availability::no(gmem_why())
    } else if flags & GUEST_MEMFD_FLAG_MMAP == 0 {
        Availability::no(format!(
            "{flags_text} lacks mmap: there is no host address to pin"
        ))
    } else {
        match &kernel_conversion {
            a if a.available => Availability::yes(
                "real pins (vmsplice into a pipe); a pinned page makes to-private fail with \
                 EAGAIN",
            ),
            a => Availability::no(format!(
                "pins are real (vmsplice into a pipe) but block nothing: {}",
                a.detail
            )),
        }
    };
    vec![
        FeatureRow {
            feature: "create",
            description: "KVM_CREATE_GUEST_MEMFD",
            emulated: Availability::yes("memfd_create"),
            kernel: if gmem {
                Availability::yes(cap_text(
                    KVM_CAP_GUEST_MEMFD,
                    "KVM_CAP_GUEST_MEMFD",
                    k.capability(KVM_CAP_GUEST_MEMFD),
                ))
            } else {
                Availability::no(gmem_why())
            },
        },
        FeatureRow {
            feature: "mmap",
            description: "GUEST_MEMFD_FLAG_MMAP: host userspace maps the file",
            emulated: Availability::yes("MAP_SHARED mappings of the memfd"),
            kernel: kernel_flag(GUEST_MEMFD_FLAG_MMAP, "mmap of the guest_memfd"),
        },
        FeatureRow {
            feature: "init_shared",
            description: "GUEST_MEMFD_FLAG_INIT_SHARED: every page starts shared",
            emulated: Availability::yes("attribute store starts shared"),
            kernel: kernel_flag(GUEST_MEMFD_FLAG_INIT_SHARED, "pages start shared"),
        },
        FeatureRow {
            feature: "conversion",
            description: "in-place shared<->private conversion (KVM_SET_MEMORY_ATTRIBUTES2)",
            emulated: Availability::yes(format!("attribute store + {revocation}")),
            kernel: kernel_conversion.clone(),
        },
        FeatureRow {
            feature: "sigbus_on_private",
            description: "host access to a private page raises SIGBUS",
            emulated: Availability::yes(revocation.clone()),
            kernel: if gmem && flags & GUEST_MEMFD_FLAG_MMAP != 0 {
                if kernel_conversion.available {
                    Availability::yes("the kernel's fault handler, after conversion")
                } else {
                    Availability::yes(
                        "the kernel's fault handler; without conversion a page is private only \
                         in a file created without INIT_SHARED",
                    )
                }
            } else {
                kernel_flag(GUEST_MEMFD_FLAG_MMAP, "")
            },
        },
        FeatureRow {
            feature: "punch_hole",
            description: "fallocate(PUNCH_HOLE|KEEP_SIZE) frees pages, which read 0 after",
            emulated: Availability::yes("fallocate on the memfd"),
            kernel: if gmem {
                Availability::yes("fallocate on the guest_memfd")
            } else {
                Availability::no(gmem_why())
            },
        },
        FeatureRow {
            feature: "pins_eagain",
            description: "a pinned page makes to-private fail with EAGAIN and error_offset",
            emulated: Availability::yes("pin registry checked by every to-private conversion"),
            kernel: pins_kernel,
        },
        FeatureRow {
            feature: "no_direct_map",
            description: "GUEST_MEMFD_FLAG_NO_DIRECT_MAP: pages leave the kernel direct map",
            emulated: Availability::yes(
                "modelled on the software-protected and pKVM platforms: a page leaves gmem's \
                 internal direct-map view when handed out and returns when freed (the memfd's \
                 pages stay in the real kernel direct map; SNP and TDX models refuse the flag)",
            ),
            kernel: kernel_flag(GUEST_MEMFD_FLAG_NO_DIRECT_MAP, "direct-map removal"),
        },
        FeatureRow {
            feature: "guest_memslots",
            description: "guest memory backed by the file, run by a vCPU",
            emulated: vm_feature(
                "ordinary memslot over the file's guest view (KVM_SET_USER_MEMORY_REGION)",
            ),
            kernel: memslots_kernel,
        },
        FeatureRow {
            feature: "map_gpa_range_exit",
            description: "KVM_HC_MAP_GPA_RANGE reaches the VMM as KVM_EXIT_HYPERCALL",
            emulated: map_gpa("emulated"),
            kernel: if kernel_conversion.available {
                map_gpa("kernel")
            } else {
                match map_gpa("kernel") {
                    a if a.available => Availability::no(format!(
                        "the exit is advertised but the kernel backend cannot convert: {}",
                        kernel_conversion.detail
                    )),
                    a => a,
                }
            },
        },
        FeatureRow {
            feature: "memory_fault_exit",
            description: "KVM_EXIT_MEMORY_FAULT on a shared/private mismatch",
            emulated: Availability::no(
                "the guest view maps private and shared pages alike: KVM sees an ordinary \
                 memslot and never faults on a mismatch (conversions arrive by hypercall or \
                 port I/O)",
            ),
            kernel: kernel_memory_fault,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(
            selected("always within_size advise [never] deny force").as_deref(),
            Some("never")
        );
        assert_eq!(selected("no brackets"), None);
        assert_eq!(vm_type_names(1), "KVM_X86_DEFAULT_VM");
        assert_eq!(
            vm_type_names(0b11),
            "KVM_X86_DEFAULT_VM|KVM_X86_SW_PROTECTED_VM"
        );
        assert_eq!(
            decode(KVM_CAP_EXIT_HYPERCALL, 4096).as_deref(),
            Some("KVM_HC_MAP_GPA_RANGE")
        );
        assert_eq!(
            decode(KVM_CAP_GUEST_MEMFD_FLAGS, 3).as_deref(),
            Some("mmap|init_shared")
        );
        assert_eq!(
            uffd_feature_names(
                (1 << 10) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 16) | (1 << 20)
            ),
            [
                "MINOR_SHMEM",
                "WP_HUGETLBFS_SHMEM",
                "WP_UNPOPULATED",
                "POISON",
                "MOVE",
                "0x100000"
            ]
        );
        assert_eq!(
            flavour(&["kvm".into(), "kvm_pvm".into()], &["vmx".into()]),
            Flavour::Pvm
        );
        assert_eq!(flavour(&[], &["svm".into()]), Flavour::Svm);
    }

    #[test]
    fn probe_without_kvm_reports_it() {
        let r = probe_with_kvm_device(Path::new("/nonexistent/kvm"));
        assert!(!r.kvm.dev_kvm);
        assert_eq!(r.kvm.flavour, None);
        assert!(r.kvm.capabilities.is_empty());
        assert_eq!(r.features.len(), 11);
        for f in &r.features {
            assert!(!f.kernel.available, "{f:?}");
            assert!(
                f.kernel.detail.contains("/nonexistent/kvm is missing"),
                "{f:?}"
            );
        }
        assert!(r
            .feature("conversion")
            .is_some_and(|f| f.emulated.available));
        assert!(r
            .feature("guest_memslots")
            .is_some_and(|f| !f.emulated.available));
    }

    #[test]
    fn probe_runs_and_lists_every_feature() {
        let r = probe();
        let names: Vec<&str> = r.features.iter().map(|f| f.feature).collect();
        assert_eq!(
            names,
            [
                "create",
                "mmap",
                "init_shared",
                "conversion",
                "sigbus_on_private",
                "punch_hole",
                "pins_eagain",
                "no_direct_map",
                "guest_memslots",
                "map_gpa_range_exit",
                "memory_fault_exit"
            ]
        );
        for f in &r.features {
            assert!(
                !f.emulated.detail.is_empty() && !f.kernel.detail.is_empty(),
                "{f:?}"
            );
        }
        assert!(r
            .feature("conversion")
            .is_some_and(|f| f.emulated.available));
        if r.kvm.capability_scope == "vm" && r.kvm.conversion_support.is_err() {
            let kernel = &r.feature("conversion").unwrap().kernel;
            assert!(!kernel.available);
            assert!(kernel.detail.contains("249 in v7"), "{}", kernel.detail);
        }
    }
}
