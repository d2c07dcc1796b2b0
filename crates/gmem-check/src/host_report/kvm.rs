//! `/dev/kvm`: which implementation serves it, its VM types, the capabilities guest_memfd
//! depends on (read on a default VM where one can be made), guest_memfd creation and the
//! kernel backend's in-place conversion.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use gmem::error::Errno;
use gmem::host::Feature;
use gmem::kernel::KernelBackend;
use gmem::uapi::{
    flag_names, SeriesRevision, KVM_CAP_EXIT_HYPERCALL, KVM_CAP_GUEST_MEMFD,
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

/// The capabilities the report lists, by upstream name, in report order. The in-place
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

pub use gmem::host::{KvmFeatures, KvmUnavailable, Missing};

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
    /// What the one probe of gmem found ([`gmem::host`]): the kernel columns of the feature
    /// table and every test's skip decide from it.
    pub features: KvmFeatures,
    /// Why `/dev/kvm` could not be used (missing, open failed, or `KVM_CREATE_VM` of the
    /// default type failed).
    pub error: Option<KvmUnavailable>,
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
    pub conversion_support: Result<(), Missing>,
    /// Why the kernel creates no guest_memfd here: `None` when it does.
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

/// Reads everything the report says of the KVM device at `dev_kvm_path`.
pub(super) fn collect(dev_kvm_path: &Path) -> KvmReport {
    let features = KvmFeatures::probe(dev_kvm_path);
    let dev_kvm = dev_kvm_path.exists();
    let modules = kvm_modules();
    let cpu_flags = cpu_flags();
    let mut r = KvmReport {
        dev_kvm,
        error: features.usable.clone().err(),
        conversion_support: features.require(Feature::Conversion),
        guest_memfd_create_error: features
            .require(Feature::GuestMemfd)
            .err()
            .map(|e| e.to_string()),
        features,
        flavour: dev_kvm.then(|| flavour(&modules, &cpu_flags)),
        modules,
        cpu_flags,
        api_version: None,
        vm_types: None,
        vm_type_checks: Vec::new(),
        capability_scope: "system",
        capabilities: Vec::new(),
        conversion: Vec::new(),
    };
    if matches!(
        r.error,
        Some(
            KvmUnavailable::Missing { .. }
                | KvmUnavailable::Permission { .. }
                | KvmUnavailable::Other { .. }
        )
    ) {
        return r;
    }
    let opened = std::ffi::CString::new(dev_kvm_path.as_os_str().as_bytes())
        .map_err(|_| Errno::EINVAL)
        .and_then(|p| kvm_ioctls::Kvm::new_with_path(p.as_c_str()).map_err(Errno::from));
    let Ok(kvm) = opened else {
        return r;
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
    let backend = KernelBackend::open(dev_kvm_path, u64::from(KVM_X86_DEFAULT_VM)).ok();
    let cap = |number: u32| match &backend {
        Some(b) => b.check_extension(number),
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
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding() {
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
            flavour(&["kvm".into(), "kvm_pvm".into()], &["vmx".into()]),
            Flavour::Pvm
        );
        assert_eq!(flavour(&[], &["svm".into()]), Flavour::Svm);
    }
}
