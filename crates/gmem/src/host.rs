//! What the running kernel offers gmem, asked of the kernel itself: `/dev/kvm` (a VM,
//! guest_memfd, its creation flags, in-place conversion, `KVM_PRE_FAULT_MEMORY`) and
//! userfaultfd (its features, and whether kernel-mode faults reach this process).
//!
//! [`HostFeatures::probe`] is the one probe. `gmem probe` renders it; the conformance runner,
//! the backends' callers and every test that needs a capability ask
//! [`HostFeatures::require`] (usually through [`require`], which probes once per process), so
//! a test is skipped with the words `gmem probe` prints, decided by what the kernel advertises
//! for the feature it exercises, never by whether some other step (a VM) happened to work.
//!
//! Kernels this distinguishes (DESIGN.md "Hosts" lists what runs on each):
//! no `/dev/kvm`; a `/dev/kvm` this user may not open; KVM without guest_memfd
//! (`KVM_CAP_GUEST_MEMFD` = 0, `KVM_CREATE_GUEST_MEMFD` → ENOTTY); guest_memfd with flags 0
//! only (6.8–6.17); `MMAP | INIT_SHARED` without conversion (stock 6.18); the in-place
//! conversion series (v7 or v8 capability numbers); and userfaultfd absent, restricted to
//! user-mode faults, or without the features the emulated backend uses.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kvm_ioctls::Kvm;

use crate::error::{ConversionUnsupported, Errno};
use crate::file::GuestMemfdBackend;
use crate::kernel::KernelBackend;
use crate::sys::PAGE_SIZE;
use crate::uapi::{
    flag_names, uffd_feature_names, SeriesRevision, KVM_CAP_GUEST_MEMFD, KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_CAP_PRE_FAULT_MEMORY, KVM_X86_DEFAULT_VM,
};

/// The KVM device gmem uses unless [`KVM_DEVICE_ENV`] names another.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// The environment variable naming the KVM device every part of gmem opens in place of
/// [`KVM_DEVICE`] (the probe, the kernel backend, VMs, `gmem probe`/`run`/`io`): a device
/// elsewhere, or a missing path for a host without KVM.
pub const KVM_DEVICE_ENV: &str = "GMEM_KVM_DEV";

/// The KVM device path: `$GMEM_KVM_DEV`, else `/dev/kvm`.
pub fn kvm_device() -> PathBuf {
    std::env::var_os(KVM_DEVICE_ENV).map_or_else(|| PathBuf::from(KVM_DEVICE), PathBuf::from)
}

/// A capability a caller (a test, a conformance case, a subcommand) needs of the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// `/dev/kvm` opens and makes a VM of the default type.
    Kvm,
    /// guest_memfd: `KVM_CAP_GUEST_MEMFD` is advertised and `KVM_CREATE_GUEST_MEMFD` creates a
    /// file (of one page, flags 0) on a VM of the default type.
    GuestMemfd,
    /// guest_memfd accepting every flag of the mask (`KVM_CAP_GUEST_MEMFD_FLAGS`).
    GuestMemfdFlags(u64),
    /// In-place conversion: `KVM_SET_MEMORY_ATTRIBUTES2` on a guest_memfd, advertised by
    /// `KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES` (249 in series v7, 250 in v8).
    Conversion,
    /// `KVM_PRE_FAULT_MEMORY` (`KVM_CAP_PRE_FAULT_MEMORY`).
    PreFaultMemory,
    /// A userfaultfd (user-mode faults, which needs no privilege) offering every
    /// `UFFD_FEATURE_*` of the mask.
    Userfaultfd(u64),
    /// A userfaultfd that also receives the faults of kernel-mode accesses (a system call
    /// reading a registered range): root, `CAP_SYS_PTRACE` or `vm.unprivileged_userfaultfd`.
    UserfaultfdKernelFaults,
    /// 2 MiB shmem folios (shmem THP) for a mapping that asks with `MADV_HUGEPAGE`: the
    /// 2048 kB size's `shmem_enabled` (or the global one it inherits) is `always`,
    /// `within_size`, `advise` or `force`. Read afresh on every question: an administrator
    /// (or a test, as root) may change it under a running process.
    HugeFolios,
}

/// Why `/dev/kvm` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvmUnavailable {
    /// `open` answered ENOENT (or ENODEV, ENXIO): no KVM on this host.
    #[error("no {} on this host ({errno}): KVM is not available here", .path.display())]
    Missing {
        /// The device.
        path: PathBuf,
        /// What `open` answered.
        errno: Errno,
    },
    /// `open` answered EACCES or EPERM: the device exists but this user may not use it.
    #[error(
        "{} exists but this user may not open it ({errno}): add the user to the group that \
         owns it (usually `kvm`: `sudo usermod -aG kvm $USER`, then log in again)",
        .path.display()
    )]
    Permission {
        /// The device.
        path: PathBuf,
        /// What `open` answered.
        errno: Errno,
    },
    /// Any other answer of `open`.
    #[error("{} cannot be opened ({errno})", .path.display())]
    Other {
        /// The device.
        path: PathBuf,
        /// What `open` answered.
        errno: Errno,
    },
    /// The device opened but made no VM of the default type.
    #[error("{} opened, but KVM_CREATE_VM(KVM_X86_DEFAULT_VM) failed: {errno}", .path.display())]
    CreateVm {
        /// The device.
        path: PathBuf,
        /// What `KVM_CREATE_VM` answered.
        errno: Errno,
    },
}

impl KvmUnavailable {
    /// The reason for an errno from opening the device at `path`.
    pub fn from_open_errno(path: &Path, errno: Errno) -> Self {
        let path = path.to_path_buf();
        match errno.0 {
            libc::ENOENT | libc::ENODEV | libc::ENXIO => KvmUnavailable::Missing { path, errno },
            libc::EACCES | libc::EPERM => KvmUnavailable::Permission { path, errno },
            _ => KvmUnavailable::Other { path, errno },
        }
    }
}

/// Why a [`Feature`] is missing here: the kernel's own answer, in words a test report and
/// `gmem probe` share.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Missing {
    /// No usable `/dev/kvm`.
    #[error(transparent)]
    Kvm(#[from] KvmUnavailable),
    /// KVM without guest_memfd.
    #[error(
        "KVM has no guest_memfd: KVM_CAP_GUEST_MEMFD ({KVM_CAP_GUEST_MEMFD}) = {cap}, \
         KVM_CREATE_GUEST_MEMFD answers {answer}"
    )]
    GuestMemfd {
        /// `KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD)`.
        cap: i32,
        /// What creating a one-page file answered ("success" when the capability alone is
        /// missing).
        answer: String,
    },
    /// guest_memfd without some of the flags asked for.
    #[error(
        "KVM_CAP_GUEST_MEMFD_FLAGS ({KVM_CAP_GUEST_MEMFD_FLAGS}) = {supported:#x} ({}) lacks {}",
        flag_names(*.supported),
        flag_names(.wanted & !.supported)
    )]
    GuestMemfdFlags {
        /// The flags the kernel accepts.
        supported: u64,
        /// The flags asked for.
        wanted: u64,
    },
    /// guest_memfd without in-place conversion.
    #[error(transparent)]
    Conversion(#[from] ConversionUnsupported),
    /// No `KVM_PRE_FAULT_MEMORY`.
    #[error("KVM_CAP_PRE_FAULT_MEMORY ({KVM_CAP_PRE_FAULT_MEMORY}) = {0}")]
    PreFaultMemory(i32),
    /// No userfaultfd at all.
    #[error(
        "no userfaultfd: userfaultfd(UFFD_USER_MODE_ONLY) or its UFFDIO_API answered {}",
        .0.name()
    )]
    Userfaultfd(Errno),
    /// userfaultfd without some of the features asked for.
    #[error(
        "userfaultfd lacks UFFD_FEATURE_{} (it offers {})",
        uffd_feature_names(.wanted & !.offered).join("|UFFD_FEATURE_"),
        offered_names(*.offered)
    )]
    UserfaultfdFeatures {
        /// The features the kernel offers.
        offered: u64,
        /// The features asked for.
        wanted: u64,
    },
    /// userfaultfd for user-mode faults only.
    #[error(
        "kernel-mode faults are not userfaultfd events for this process: userfaultfd(0) \
         answered {} (it needs root, CAP_SYS_PTRACE or vm.unprivileged_userfaultfd = 1)",
        .0.name()
    )]
    UserfaultfdKernelFaults(Errno),
    /// No 2 MiB shmem folios for a mapping that asks.
    #[error("no 2 MiB shmem folios (shmem THP): {0}")]
    HugeFolios(String),
}

/// The sysfs directory of transparent huge pages.
const THP_SYSFS: &str = "/sys/kernel/mm/transparent_hugepage";

/// The selected value of a sysfs THP setting (`always [advise] never` → `advise`).
fn thp_setting(path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
        .map(str::to_string)
        .ok_or_else(|| format!("{path}: no selected value in {:?}", text.trim()))
}

/// Whether a mapping that asks (`MADV_HUGEPAGE`, 2 MiB-aligned) gets 2 MiB shmem folios
/// here, read from sysfs now: `Ok(setting)` (e.g. "advise"), or why not.
pub fn huge_folios() -> Result<String, Missing> {
    let global = format!("{THP_SYSFS}/shmem_enabled");
    let per_size = format!("{THP_SYSFS}/hugepages-2048kB/shmem_enabled");
    let (path, value) = match thp_setting(&per_size) {
        Ok(v) if v != "inherit" => (per_size, v),
        // Older kernels have only the global setting.
        _ => (
            global.clone(),
            thp_setting(&global).map_err(Missing::HugeFolios)?,
        ),
    };
    match value.as_str() {
        "always" | "within_size" | "advise" | "force" => Ok(value),
        other => Err(Missing::HugeFolios(format!(
            "{path} is {other:?} (as root: echo advise > {path})"
        ))),
    }
}

/// Why an emulated file is never backed by hugetlb pages, whatever the host reserves
/// (DESIGN.md, "Huge folios": measured on 6.18, and asserted by `tests/huge_folios.rs`).
pub const HUGETLB_NOT_OFFERED: &str =
    "a hugetlbfs mapping is faulted, guarded and zapped only a whole huge page at a time \
     (UFFDIO_CONTINUE, UFFDIO_POISON, MADV_DONTNEED and mprotect of 4 KiB inside it answer \
     EINVAL), so SIGBUS could not stay exact to the 4 KiB page of a mixed folio without the \
     kernel's split; 2 MiB folios are shmem THP";

/// The host's 2 MiB hugetlb pages (`/sys/kernel/mm/hugepages/hugepages-2048kB`), read now;
/// `None` where a count cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HugetlbPages {
    /// `nr_hugepages`: pages reserved in the pool.
    pub reserved: Option<u64>,
    /// `free_hugepages`: pages of the pool not in use.
    pub free: Option<u64>,
}

/// What the host reserves in 2 MiB hugetlb pages (reported by `gmem probe` beside
/// [`HUGETLB_NOT_OFFERED`]).
pub fn hugetlb_pages() -> HugetlbPages {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{name}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    };
    HugetlbPages {
        reserved: read("nr_hugepages"),
        free: read("free_hugepages"),
    }
}

fn offered_names(features: u64) -> String {
    if features == 0 {
        "none".to_string()
    } else {
        uffd_feature_names(features).join("|")
    }
}

/// What `/dev/kvm` offers, as its ioctls answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmFeatures {
    /// The device asked.
    pub device: PathBuf,
    /// `Ok` when the device opened and made a VM of the default type.
    pub usable: Result<(), KvmUnavailable>,
    /// `KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD)` on that VM (0 where there is none).
    pub guest_memfd_cap: i32,
    /// `KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD_FLAGS)` on that VM (0 where there is none).
    pub guest_memfd_flags: u64,
    /// What `KVM_CREATE_GUEST_MEMFD(one page, 0)` answered (`None` where no VM was made).
    pub create_guest_memfd: Option<Result<(), Errno>>,
    /// The series revision whose capability advertises conversion, or why none does
    /// (`None` where no guest_memfd could be made, so the question does not arise).
    pub conversion: Option<Result<SeriesRevision, ConversionUnsupported>>,
    /// `KVM_CHECK_EXTENSION(KVM_CAP_PRE_FAULT_MEMORY)` on that VM.
    pub pre_fault_memory_cap: i32,
}

impl KvmFeatures {
    /// Asks the KVM device at `device`: opens it, makes a VM of the default type, reads the
    /// capabilities, creates a one-page guest_memfd and, where that works, asks whether it
    /// converts (a no-op `KVM_SET_MEMORY_ATTRIBUTES2` on a scratch file when the capability is
    /// absent, to record the kernel's answer).
    pub fn probe(device: &Path) -> KvmFeatures {
        let mut k = KvmFeatures {
            device: device.to_path_buf(),
            usable: Ok(()),
            guest_memfd_cap: 0,
            guest_memfd_flags: 0,
            create_guest_memfd: None,
            conversion: None,
            pre_fault_memory_cap: 0,
        };
        let opened = CString::new(device.as_os_str().as_bytes())
            .map_err(|_| Errno::EINVAL)
            .and_then(|p| Kvm::new_with_path(p.as_c_str()).map_err(Errno::from));
        if let Err(errno) = opened {
            k.usable = Err(KvmUnavailable::from_open_errno(device, errno));
            return k;
        }
        let backend = match KernelBackend::open(device, u64::from(KVM_X86_DEFAULT_VM)) {
            Ok(b) => b,
            Err(errno) => {
                k.usable = Err(KvmUnavailable::CreateVm {
                    path: device.to_path_buf(),
                    errno,
                });
                return k;
            }
        };
        k.guest_memfd_cap = backend.check_extension(KVM_CAP_GUEST_MEMFD);
        k.guest_memfd_flags = backend.supported_flags();
        k.pre_fault_memory_cap = backend.check_extension(KVM_CAP_PRE_FAULT_MEMORY);
        let created = backend.create_guest_memfd(PAGE_SIZE, 0).map(drop);
        if created.is_ok() {
            k.conversion = Some(match backend.conversion_revision() {
                Some(rev) => Ok(rev),
                None => Err(backend.conversion_support().err().unwrap_or_else(|| {
                    ConversionUnsupported {
                        vm_type: backend.vm_type(),
                        cap_values: Vec::new(),
                        answer: "nothing".to_string(),
                    }
                })),
            });
        }
        k.create_guest_memfd = Some(created);
        k
    }

    /// `Ok` if this kernel offers `feature` (a KVM feature; userfaultfd features are
    /// [`UserfaultfdFeatures`]'), else why not. Each feature first requires the ones it
    /// builds on: guest_memfd needs a VM, its flags and conversion need guest_memfd.
    pub fn require(&self, feature: Feature) -> Result<(), Missing> {
        self.usable.clone()?;
        if feature == Feature::Kvm {
            return Ok(());
        }
        if feature == Feature::PreFaultMemory {
            return if self.pre_fault_memory_cap > 0 {
                Ok(())
            } else {
                Err(Missing::PreFaultMemory(self.pre_fault_memory_cap))
            };
        }
        let created = self.create_guest_memfd.unwrap_or(Err(Errno::ENODEV));
        let no_guest_memfd = || Missing::GuestMemfd {
            cap: self.guest_memfd_cap,
            answer: match created {
                Ok(()) => "success".to_string(),
                Err(e) => e.name(),
            },
        };
        if self.guest_memfd_cap <= 0 || created.is_err() {
            return Err(no_guest_memfd());
        }
        match feature {
            Feature::GuestMemfdFlags(wanted) if self.guest_memfd_flags & wanted != wanted => {
                Err(Missing::GuestMemfdFlags {
                    supported: self.guest_memfd_flags,
                    wanted,
                })
            }
            Feature::Conversion => match &self.conversion {
                Some(Ok(_)) => Ok(()),
                Some(Err(why)) => Err(why.clone().into()),
                // Recorded whenever a file was created, which was checked above.
                None => Err(no_guest_memfd()),
            },
            _ => Ok(()),
        }
    }
}

/// What userfaultfd offers this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserfaultfdFeatures {
    /// The `UFFD_FEATURE_*` mask `UFFDIO_API` offers on a user-mode-only userfaultfd, or the
    /// errno of `userfaultfd()` / `UFFDIO_API`.
    pub features: Result<u64, Errno>,
    /// Whether a userfaultfd for kernel-mode faults too (`userfaultfd(0)`) can be had, or
    /// what it answered.
    pub kernel_faults: Result<(), Errno>,
}

impl UserfaultfdFeatures {
    /// Asks the kernel.
    pub fn probe() -> UserfaultfdFeatures {
        UserfaultfdFeatures {
            features: crate::sys::userfaultfd_features(),
            kernel_faults: crate::sys::userfaultfd_kernel_faults(),
        }
    }

    /// `Ok` if userfaultfd offers `feature` (a userfaultfd feature; KVM features are
    /// [`KvmFeatures`]'), else why not.
    pub fn require(&self, feature: Feature) -> Result<(), Missing> {
        let offered = self.features.map_err(Missing::Userfaultfd)?;
        match feature {
            Feature::Userfaultfd(wanted) if offered & wanted != wanted => {
                Err(Missing::UserfaultfdFeatures { offered, wanted })
            }
            Feature::UserfaultfdKernelFaults => {
                self.kernel_faults.map_err(Missing::UserfaultfdKernelFaults)
            }
            _ => Ok(()),
        }
    }
}

/// Everything gmem asks of the running kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFeatures {
    /// `/dev/kvm`.
    pub kvm: KvmFeatures,
    /// userfaultfd.
    pub userfaultfd: UserfaultfdFeatures,
}

impl HostFeatures {
    /// Asks the kernel, with the KVM device at `device`.
    pub fn probe(device: &Path) -> HostFeatures {
        HostFeatures {
            kvm: KvmFeatures::probe(device),
            userfaultfd: UserfaultfdFeatures::probe(),
        }
    }

    /// `Ok` if the kernel offers `feature`, else why not.
    pub fn require(&self, feature: Feature) -> Result<(), Missing> {
        match feature {
            Feature::Userfaultfd(_) | Feature::UserfaultfdKernelFaults => {
                self.userfaultfd.require(feature)
            }
            Feature::HugeFolios => huge_folios().map(drop),
            _ => self.kvm.require(feature),
        }
    }

    /// The features of this host with `/dev/kvm`, probed on first use and kept for the life
    /// of the process (the kernel does not change under a running process).
    pub fn get() -> &'static HostFeatures {
        static HOST: OnceLock<HostFeatures> = OnceLock::new();
        HOST.get_or_init(|| HostFeatures::probe(&kvm_device()))
    }
}

/// `Ok` if this host ([`kvm_device`], probed once per process) offers `feature`, else why not.
pub fn require(feature: Feature) -> Result<(), Missing> {
    HostFeatures::get().require(feature)
}

/// Why this host lacks the first of `features` it lacks, if any: what a test harness reports
/// as the reason to ignore a test.
pub fn missing(features: &[Feature]) -> Option<Missing> {
    features.iter().find_map(|&f| require(f).err())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, UFFD_FEATURE_POISON};

    fn no_kvm() -> KvmFeatures {
        KvmFeatures::probe(Path::new("/nonexistent/kvm"))
    }

    fn kvm(cap: i32, flags: u64, created: Result<(), Errno>) -> KvmFeatures {
        KvmFeatures {
            device: PathBuf::from(KVM_DEVICE),
            usable: Ok(()),
            guest_memfd_cap: cap,
            guest_memfd_flags: flags,
            create_guest_memfd: Some(created),
            conversion: created.is_ok().then(|| {
                Err(ConversionUnsupported {
                    vm_type: 0,
                    cap_values: vec![(SeriesRevision::V8, 250, 0)],
                    answer: "ENOTTY".to_string(),
                })
            }),
            pre_fault_memory_cap: 0,
        }
    }

    #[test]
    fn a_missing_device_is_missing_for_every_kvm_feature() {
        let k = no_kvm();
        for f in [
            Feature::Kvm,
            Feature::GuestMemfd,
            Feature::GuestMemfdFlags(GUEST_MEMFD_FLAG_MMAP),
            Feature::Conversion,
            Feature::PreFaultMemory,
        ] {
            match k.require(f) {
                Err(Missing::Kvm(KvmUnavailable::Missing { errno, .. })) => {
                    assert_eq!(errno, Errno::ENOENT)
                }
                other => panic!("{f:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn kvm_without_guest_memfd_says_so_for_flags_and_conversion() {
        let k = kvm(0, 0, Err(Errno::ENOTTY));
        assert_eq!(k.require(Feature::Kvm), Ok(()));
        for f in [
            Feature::GuestMemfd,
            Feature::GuestMemfdFlags(GUEST_MEMFD_FLAG_MMAP),
            Feature::Conversion,
        ] {
            let why = k.require(f).expect_err("no guest_memfd").to_string();
            assert!(
                why.contains("KVM has no guest_memfd") && why.contains("ENOTTY"),
                "{f:?}: {why}"
            );
        }
    }

    #[test]
    fn flags_and_conversion_are_asked_separately() {
        let k = kvm(1, GUEST_MEMFD_FLAG_MMAP, Ok(()));
        assert_eq!(k.require(Feature::GuestMemfd), Ok(()));
        assert_eq!(
            k.require(Feature::GuestMemfdFlags(GUEST_MEMFD_FLAG_MMAP)),
            Ok(())
        );
        let why = k
            .require(Feature::GuestMemfdFlags(
                GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            ))
            .expect_err("no INIT_SHARED")
            .to_string();
        assert!(why.ends_with("= 0x1 (mmap) lacks init_shared"), "{why}");
        assert!(matches!(
            k.require(Feature::Conversion),
            Err(Missing::Conversion(_))
        ));
    }

    #[test]
    fn userfaultfd_reasons_name_the_missing_feature() {
        let none = UserfaultfdFeatures {
            features: Err(Errno(libc::ENOSYS)),
            kernel_faults: Err(Errno(libc::ENOSYS)),
        };
        assert!(matches!(
            none.require(Feature::Userfaultfd(0)),
            Err(Missing::Userfaultfd(Errno(libc::ENOSYS)))
        ));
        let old = UserfaultfdFeatures {
            features: Ok(1 << 5),
            kernel_faults: Err(Errno::EPERM),
        };
        let why = old
            .require(Feature::Userfaultfd(UFFD_FEATURE_POISON))
            .expect_err("no poison")
            .to_string();
        assert_eq!(
            why,
            "userfaultfd lacks UFFD_FEATURE_POISON (it offers MISSING_SHMEM)"
        );
        assert!(old
            .require(Feature::UserfaultfdKernelFaults)
            .expect_err("user mode only")
            .to_string()
            .contains("EPERM"));
    }
}
