//! The feature table: for every gmem feature, whether each backend provides it on this host,
//! derived from what [`super::kvm`] and [`super::userfaultfd`] found. [`Evidence`] gathers the
//! facts once; each row's kernel column is one small function over it.

use gmem::uapi::{
    flag_names, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP, KVM_CAP_EXIT_HYPERCALL, KVM_CAP_GUEST_MEMFD,
    KVM_CAP_GUEST_MEMFD_FLAGS, KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_MEMORY_FAULT_INFO,
    KVM_CAP_USER_MEMORY2, KVM_HC_MAP_GPA_RANGE, KVM_MEMORY_ATTRIBUTE_PRIVATE,
};

use super::{Availability, FeatureRow, HostReport, KvmReport};
use gmem::host::Feature;
use gmem_vmm::HypercallExitError;

fn cap_text(number: u32, name: &str, value: Option<i32>) -> String {
    match value {
        Some(v) => format!("{name} ({number}) = {v}"),
        None => format!("{name} ({number}) unread"),
    }
}

/// What the rows are derived from.
struct Evidence<'a> {
    k: &'a KvmReport,
    /// Why no VM at all, if so.
    no_vm: Option<String>,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS`.
    flags: u64,
    /// The flags capability, rendered.
    flags_text: String,
    /// Whether the kernel creates guest_memfds here.
    gmem: bool,
    /// The kernel backend's in-place conversion.
    conversion: Availability,
    /// `KVM_CAP_EXIT_HYPERCALL`.
    hypercall: u64,
    /// Whether a guest's `KVM_HC_MAP_GPA_RANGE` reached userspace (checked only where the
    /// exit is advertised).
    delivered: Option<Result<(), HypercallExitError>>,
}

impl<'a> Evidence<'a> {
    fn gather(k: &'a KvmReport) -> Evidence<'a> {
        let features = &k.features;
        let no_vm = features.require(Feature::Kvm).err().map(|e| e.to_string());
        let flags = features.guest_memfd_flags;
        let flags_text = format!(
            "KVM_CAP_GUEST_MEMFD_FLAGS ({KVM_CAP_GUEST_MEMFD_FLAGS}) = {flags:#x} ({})",
            flag_names(flags)
        );
        let gmem = features.require(Feature::GuestMemfd).is_ok();
        let conversion = match features.require(Feature::Conversion) {
            Ok(()) => {
                let rev = k
                    .conversion
                    .iter()
                    .find(|c| c.private)
                    .map_or("?", |c| c.revision.name());
                Availability::yes(format!(
                    "KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd (series {rev})"
                ))
            }
            Err(why) => Availability::no(why.to_string()),
        };
        let hypercall = k
            .capability(KVM_CAP_EXIT_HYPERCALL)
            .filter(|&v| v > 0)
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(0);
        // Whether the hypercall really reaches userspace: a guest issues it (once, ~0.3 s at
        // most).
        let delivered = (no_vm.is_none() && hypercall & (1 << KVM_HC_MAP_GPA_RANGE) != 0)
            .then(|| gmem_vmm::Vm::check_hypercall_exit(std::time::Duration::from_millis(300)));
        Evidence {
            k,
            no_vm,
            flags,
            flags_text,
            gmem,
            conversion,
            hypercall,
            delivered,
        }
    }

    /// `KVM_CHECK_EXTENSION(number)` where positive.
    fn capv(&self, number: u32) -> Option<i32> {
        self.k.capability(number).filter(|&v| v > 0)
    }

    fn cap_text(&self, number: u32, name: &str) -> String {
        cap_text(number, name, self.k.capability(number))
    }

    /// Why the kernel creates no guest_memfd here.
    fn gmem_why(&self) -> String {
        match self.k.features.require(Feature::GuestMemfd) {
            Err(why) => why.to_string(),
            Ok(()) => "guest_memfd is available".to_string(),
        }
    }

    /// Available when guest_memfd is, else why not.
    fn with_gmem(&self, what: &str) -> Availability {
        if self.gmem {
            Availability::yes(what)
        } else {
            Availability::no(self.gmem_why())
        }
    }

    /// A guest_memfd flag of the kernel backend.
    fn kernel_flag(&self, bit: u64, what: &str) -> Availability {
        match self.k.features.require(Feature::GuestMemfdFlags(bit)) {
            Ok(()) => Availability::yes(format!("{what}; {}", self.flags_text)),
            Err(why) => Availability::no(why.to_string()),
        }
    }

    /// Something every VM offers.
    fn vm_feature(&self, what: &str) -> Availability {
        match &self.no_vm {
            Some(why) => Availability::no(why.clone()),
            None => Availability::yes(what),
        }
    }

    fn create(&self) -> Availability {
        self.with_gmem(&self.cap_text(KVM_CAP_GUEST_MEMFD, "KVM_CAP_GUEST_MEMFD"))
    }

    fn sigbus_on_private(&self) -> Availability {
        if !(self.gmem && self.flags & GUEST_MEMFD_FLAG_MMAP != 0) {
            self.kernel_flag(GUEST_MEMFD_FLAG_MMAP, "")
        } else if self.conversion.available {
            Availability::yes("the kernel's fault handler, after conversion")
        } else {
            Availability::yes(
                "the kernel's fault handler; without conversion a page is private only in a \
                 file created without INIT_SHARED",
            )
        }
    }

    fn pins_eagain(&self) -> Availability {
        if !self.gmem {
            Availability::no(self.gmem_why())
        } else if self.flags & GUEST_MEMFD_FLAG_MMAP == 0 {
            Availability::no(format!(
                "{} lacks mmap: there is no host address to pin",
                self.flags_text
            ))
        } else if self.conversion.available {
            Availability::yes(
                "real pins (vmsplice into a pipe); a pinned page makes to-private fail with \
                 EAGAIN",
            )
        } else {
            Availability::no(format!(
                "pins are real (vmsplice into a pipe) but block nothing: {}",
                self.conversion.detail
            ))
        }
    }

    fn guest_memslots(&self) -> Availability {
        if let Some(why) = &self.no_vm {
            Availability::no(why.clone())
        } else if self.capv(KVM_CAP_USER_MEMORY2).is_none() {
            Availability::no(format!(
                "{} not advertised",
                self.cap_text(KVM_CAP_USER_MEMORY2, "KVM_CAP_USER_MEMORY2")
            ))
        } else {
            self.with_gmem(
                "KVM_SET_USER_MEMORY_REGION2 with KVM_MEM_GUEST_MEMFD, userspace_addr = the \
                 file's mapping",
            )
        }
    }

    /// `KVM_HC_MAP_GPA_RANGE` as an exit, turned into a conversion on `backend`.
    fn map_gpa(&self, backend: &str) -> Availability {
        let hypercall = self.hypercall;
        if let Some(why) = &self.no_vm {
            return Availability::no(why.clone());
        }
        if let Some(Err(why)) = &self.delivered {
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
        if self.delivered.as_ref().is_some_and(Result::is_ok) {
            d.push_str(" (a guest's hypercall reached userspace in this probe)");
        }
        Availability::yes(d)
    }

    fn kernel_map_gpa(&self) -> Availability {
        match self.map_gpa("kernel") {
            a if a.available && !self.conversion.available => Availability::no(format!(
                "the exit is advertised but the kernel backend cannot convert: {}",
                self.conversion.detail
            )),
            a => a,
        }
    }

    fn memory_fault(&self) -> Availability {
        let attrs233 = self
            .capv(KVM_CAP_MEMORY_ATTRIBUTES)
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(0);
        if let Some(why) = &self.no_vm {
            return Availability::no(why.clone());
        }
        if self.capv(KVM_CAP_MEMORY_FAULT_INFO).is_none() {
            return Availability::no(format!(
                "{} not advertised",
                self.cap_text(KVM_CAP_MEMORY_FAULT_INFO, "KVM_CAP_MEMORY_FAULT_INFO")
            ));
        }
        if attrs233 & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0
            || self.k.conversion.iter().any(|c| c.private)
        {
            return Availability::yes(
                "KVM_EXIT_MEMORY_FAULT on a shared/private mismatch (KVM_CAP_MEMORY_FAULT_INFO)",
            );
        }
        let conversion_caps = self
            .k
            .conversion
            .iter()
            .map(|c| format!("{} in {}", c.number, c.revision.name()))
            .collect::<Vec<_>>()
            .join(", ");
        Availability::no(format!(
            "KVM_CAP_MEMORY_FAULT_INFO ({KVM_CAP_MEMORY_FAULT_INFO}) is advertised, but neither \
             KVM_CAP_MEMORY_ATTRIBUTES ({KVM_CAP_MEMORY_ATTRIBUTES}) = {attrs233:#x} nor \
             KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES ({conversion_caps}) advertises \
             KVM_MEMORY_ATTRIBUTE_PRIVATE: KVM has no private attribute for a fault to mismatch"
        ))
    }
}

/// How the emulated backend revokes host access to private pages here: poison markers where
/// userfaultfd offers them ([`gmem::Revocation::needs`], asked of gmem's probe), else the
/// remapping fallback, saying why.
fn revocation(r: &HostReport) -> String {
    let poison = gmem::Revocation::Guard
        .needs(0)
        .and_then(|need| gmem::host::require(need).err());
    match poison {
        None => "userfaultfd poison markers (UFFD_FEATURE_POISON, WP_HUGETLBFS_SHMEM)".to_string(),
        Some(why) => format!(
            "MAP_FIXED remapping of private runs, the fallback ({why}), bounded by \
             vm.max_map_count = {}",
            r.max_map_count
                .map_or_else(|| "?".to_string(), |v| v.to_string())
        ),
    }
}

fn row(
    feature: &'static str,
    description: &'static str,
    emulated: Availability,
    kernel: Availability,
) -> FeatureRow {
    FeatureRow {
        feature,
        description,
        emulated,
        kernel,
    }
}

/// The feature table, derived from what was collected.
pub(super) fn features(r: &HostReport) -> Vec<FeatureRow> {
    let e = Evidence::gather(&r.kvm);
    let revocation = revocation(r);
    let yes = |d: &str| Availability::yes(d);
    vec![
        row(
            "create",
            "KVM_CREATE_GUEST_MEMFD",
            yes("memfd_create"),
            e.create(),
        ),
        row(
            "mmap",
            "GUEST_MEMFD_FLAG_MMAP: host userspace maps the file",
            yes("MAP_SHARED mappings of the memfd"),
            e.kernel_flag(GUEST_MEMFD_FLAG_MMAP, "mmap of the guest_memfd"),
        ),
        row(
            "init_shared",
            "GUEST_MEMFD_FLAG_INIT_SHARED: every page starts shared",
            yes("attribute store starts shared"),
            e.kernel_flag(GUEST_MEMFD_FLAG_INIT_SHARED, "pages start shared"),
        ),
        row(
            "conversion",
            "in-place shared<->private conversion (KVM_SET_MEMORY_ATTRIBUTES2)",
            yes(&format!("attribute store + {revocation}")),
            e.conversion.clone(),
        ),
        row(
            "sigbus_on_private",
            "host access to a private page raises SIGBUS",
            yes(&revocation),
            e.sigbus_on_private(),
        ),
        row(
            "punch_hole",
            "fallocate(PUNCH_HOLE|KEEP_SIZE) frees pages, which read 0 after",
            yes("fallocate on the memfd"),
            e.with_gmem("fallocate on the guest_memfd"),
        ),
        row(
            "pins_eagain",
            "a pinned page makes to-private fail with EAGAIN and error_offset",
            yes("pin registry checked by every to-private conversion"),
            e.pins_eagain(),
        ),
        row(
            "no_direct_map",
            "GUEST_MEMFD_FLAG_NO_DIRECT_MAP: pages leave the kernel direct map",
            yes(
                "modelled on the software-protected and pKVM platforms: a page leaves gmem's \
                 internal direct-map view when handed out and returns when freed (the memfd's \
                 pages stay in the real kernel direct map; SNP and TDX models refuse the flag)",
            ),
            e.kernel_flag(GUEST_MEMFD_FLAG_NO_DIRECT_MAP, "direct-map removal"),
        ),
        row(
            "guest_memslots",
            "guest memory backed by the file, run by a vCPU",
            e.vm_feature(
                "ordinary memslot over the file's guest view (KVM_SET_USER_MEMORY_REGION)",
            ),
            e.guest_memslots(),
        ),
        row(
            "map_gpa_range_exit",
            "KVM_HC_MAP_GPA_RANGE reaches the VMM as KVM_EXIT_HYPERCALL",
            e.map_gpa("emulated"),
            e.kernel_map_gpa(),
        ),
        row(
            "memory_fault_exit",
            "KVM_EXIT_MEMORY_FAULT on a shared/private mismatch",
            Availability::no(
                "the guest view maps private and shared pages alike: KVM sees an ordinary \
                 memslot and never faults on a mismatch (conversions arrive by hypercall or \
                 port I/O)",
            ),
            e.memory_fault(),
        ),
    ]
}
