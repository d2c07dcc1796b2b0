//! The guest_memfd uAPI, under its upstream names.
//!
//! What `kvm-bindings` 0.14 already has is re-exported from it; what it lacks (the
//! `GUEST_MEMFD_FLAG_*` flags, `KVM_CAP_GUEST_MEMFD_FLAGS`, and everything from the unmerged
//! in-place conversion series such as `struct kvm_memory_attributes2`) is defined here with the
//! upstream name and value. Sources: docs/series.md §1 (v7 with the v8 deltas).
//!
//! Capability numbers of unmerged series move between revisions, so they are not loose
//! constants: [`SeriesRevision`] is the one table that maps a revision to its numbers.

#![allow(non_camel_case_types)]

use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

pub use kvm_bindings::{
    kvm_create_guest_memfd, kvm_memory_attributes, kvm_pre_fault_memory,
    kvm_userspace_memory_region2, KVM_CAP_EXIT_HYPERCALL, KVM_CAP_GUEST_MEMFD,
    KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_MEMORY_FAULT_INFO, KVM_CAP_PRE_FAULT_MEMORY,
    KVM_CAP_USER_MEMORY2, KVM_CAP_VM_TYPES, KVM_EXIT_HYPERCALL, KVM_EXIT_MEMORY_FAULT,
    KVM_EXIT_MMIO, KVM_MEM_GUEST_MEMFD, KVM_X86_DEFAULT_VM, KVM_X86_SEV_ES_VM, KVM_X86_SEV_VM,
    KVM_X86_SNP_VM, KVM_X86_SW_PROTECTED_VM, KVM_X86_TDX_VM,
};

/// The KVM ioctl type byte.
pub const KVMIO: u32 = 0xAE;

/// `KVM_CAP_GUEST_MEMFD_FLAGS`: the mask of flags `KVM_CREATE_GUEST_MEMFD` accepts (upstream).
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;
/// `KVM_CAP_NR_MEMSLOTS`.
pub const KVM_CAP_NR_MEMSLOTS: u32 = 10;

/// The only memory attribute: the page is private to the guest.
pub const KVM_MEMORY_ATTRIBUTE_PRIVATE: u64 = 1 << 3;

/// The file may be mmap()ed by host userspace.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// Every page starts shared (otherwise private).
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
/// Remove the file's pages from the host kernel's direct map (series v8–v12 value).
pub const GUEST_MEMFD_FLAG_NO_DIRECT_MAP: u64 = 1 << 2;

/// `KVM_MEMORY_EXIT_FLAG_PRIVATE`: the faulting access was private.
pub const KVM_MEMORY_EXIT_FLAG_PRIVATE: u64 = 1 << 3;

/// x86 hypercall number of `KVM_HC_MAP_GPA_RANGE`.
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;
/// `KVM_MAP_GPA_RANGE_PAGE_SZ_4K`.
pub const KVM_MAP_GPA_RANGE_PAGE_SZ_4K: u64 = 0;
/// `KVM_MAP_GPA_RANGE_PAGE_SZ_2M`.
pub const KVM_MAP_GPA_RANGE_PAGE_SZ_2M: u64 = 1 << 0;
/// `KVM_MAP_GPA_RANGE_PAGE_SZ_1G`.
pub const KVM_MAP_GPA_RANGE_PAGE_SZ_1G: u64 = 1 << 1;
/// `KVM_MAP_GPA_RANGE_ENCRYPTED`: map the range private.
pub const KVM_MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;
/// `KVM_MAP_GPA_RANGE_DECRYPTED`: map the range shared.
pub const KVM_MAP_GPA_RANGE_DECRYPTED: u64 = 0;

/// `FALLOC_FL_KEEP_SIZE`.
pub const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
/// `FALLOC_FL_PUNCH_HOLE`.
pub const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;

/// `struct kvm_memory_attributes2`: the guest_memfd ioctl's argument (v7 09/42 + 10/42).
///
/// The first four fields share their layout with [`kvm_memory_attributes`]; the kernel asserts
/// that at build time and so does [`tests`](self#tests) here.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct kvm_memory_attributes2 {
    /// Byte offset into the guest_memfd (`address` in the VM-ioctl layout).
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
    /// 0 (shared) or [`KVM_MEMORY_ATTRIBUTE_PRIVATE`].
    pub attributes: u64,
    /// Must be 0.
    pub flags: u64,
    /// Out: the offending offset when the ioctl fails with EAGAIN or ENOMEM.
    pub error_offset: u64,
    /// Must be 0.
    pub reserved: [u64; 11],
}

impl kvm_memory_attributes2 {
    /// A request to give `[offset, offset + size)` the attributes `attributes`.
    pub fn new(offset: u64, size: u64, attributes: u64) -> Self {
        Self {
            offset,
            size,
            attributes,
            ..Self::default()
        }
    }
}

// The ioctl numbers, encoded by vmm-sys-util's `_IOC` macros (each defines a function that
// returns the number). KVM's:

// `KVM_CREATE_GUEST_MEMFD` (VM ioctl).
ioctl_iowr_nr!(KVM_CREATE_GUEST_MEMFD, KVMIO, 0xd4, kvm_create_guest_memfd);
// `KVM_SET_USER_MEMORY_REGION2` (VM ioctl).
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION2,
    KVMIO,
    0x49,
    kvm_userspace_memory_region2
);
// `KVM_SET_MEMORY_ATTRIBUTES` (VM ioctl).
ioctl_iow_nr!(
    KVM_SET_MEMORY_ATTRIBUTES,
    KVMIO,
    0xd2,
    kvm_memory_attributes
);
// `KVM_SET_MEMORY_ATTRIBUTES2` (guest_memfd ioctl, new in the in-place series).
ioctl_iowr_nr!(
    KVM_SET_MEMORY_ATTRIBUTES2,
    KVMIO,
    0xd2,
    kvm_memory_attributes2
);
// `KVM_PRE_FAULT_MEMORY` (vCPU ioctl).
ioctl_iowr_nr!(KVM_PRE_FAULT_MEMORY, KVMIO, 0xd5, kvm_pre_fault_memory);

// userfaultfd (include/uapi/linux/userfaultfd.h; libc lacks most of it).

/// The userfaultfd ioctl type byte.
pub const UFFDIO: u32 = 0xAA;
/// `UFFD_API`: the API version `UFFDIO_API` asks for.
pub const UFFD_API: u64 = 0xAA;
/// `UFFD_USER_MODE_ONLY`: a `userfaultfd()` flag; only user-mode faults are reported.
pub const UFFD_USER_MODE_ONLY: i32 = 1;
/// `UFFD_EVENT_PAGEFAULT`.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_EVENT_FORK`: a registered address space was copied by `fork` (or `clone` without
/// `CLONE_VM`); the message carries a new userfaultfd for the child's.
pub const UFFD_EVENT_FORK: u8 = 0x13;
/// `UFFD_EVENT_REMAP`: `mremap` moved (or, with an old length of 0, duplicated) a registered
/// range.
pub const UFFD_EVENT_REMAP: u8 = 0x14;
/// `UFFD_EVENT_UNMAP`: `munmap` (or an `mremap` that shrank or replaced) removed part of a
/// registered range.
pub const UFFD_EVENT_UNMAP: u8 = 0x16;
/// `UFFD_FEATURE_EVENT_UNMAP`.
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// `UFFD_FEATURE_EVENT_FORK`.
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
/// `UFFD_FEATURE_EVENT_REMAP`.
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// `UFFD_FEATURE_THREAD_ID`: a fault message names the faulting thread.
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// `UFFD_PAGEFAULT_FLAG_MINOR`.
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;
/// `UFFD_FEATURE_MISSING_SHMEM`.
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_MINOR_SHMEM`.
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`.
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_POISON`.
pub const UFFD_FEATURE_POISON: u64 = 1 << 14;
/// `UFFDIO_REGISTER_MODE_MISSING`.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_WP`.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_REGISTER_MODE_MINOR`.
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct uffdio_api {
    /// `UFFD_API`.
    pub api: u64,
    /// In: the features asked for; out: the features offered.
    pub features: u64,
    /// Out: the ioctls available.
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct uffdio_range {
    /// Start address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct uffdio_register {
    /// The range to register.
    pub range: uffdio_range,
    /// `UFFDIO_REGISTER_MODE_*`.
    pub mode: u64,
    /// Out: the ioctls available on the range.
    pub ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct uffdio_writeprotect {
    /// The range.
    pub range: uffdio_range,
    /// `UFFDIO_WRITEPROTECT_MODE_*` (0: resolve, i.e. not protected).
    pub mode: u64,
}

/// `struct uffdio_continue`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct uffdio_continue {
    /// The range to map.
    pub range: uffdio_range,
    /// `UFFDIO_CONTINUE_MODE_*`.
    pub mode: u64,
    /// Out: bytes mapped, or a negative errno.
    pub mapped: i64,
}

/// `struct uffdio_poison`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct uffdio_poison {
    /// The range to poison.
    pub range: uffdio_range,
    /// `UFFDIO_POISON_MODE_*`.
    pub mode: u64,
    /// Out: bytes poisoned, or a negative errno.
    pub updated: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct uffdio_zeropage {
    /// The range to fill with zeroed pages.
    pub range: uffdio_range,
    /// `UFFDIO_ZEROPAGE_MODE_*`.
    pub mode: u64,
    /// Out: bytes mapped, or a negative errno.
    pub zeropage: i64,
}

/// `struct uffd_msg` (packed, 32 bytes): the event byte, then for a page fault the flags at
/// byte 8 and the address at byte 16; for `UFFD_EVENT_FORK` the child's userfaultfd in the
/// low half of byte 8; for `UFFD_EVENT_REMAP` from, to and the old length at bytes 8, 16, 24.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct uffd_msg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    /// Reserved.
    pub reserved: [u8; 7],
    /// For a page fault: `UFFD_PAGEFAULT_FLAG_*`.
    pub flags: u64,
    /// For a page fault: the faulting address.
    pub address: u64,
    /// For a page fault: the thread id, with `UFFD_FEATURE_THREAD_ID`.
    pub feat: u64,
}

// `UFFDIO_REGISTER`.
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, uffdio_register);
// `UFFDIO_UNREGISTER`.
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, uffdio_range);
// `UFFDIO_ZEROPAGE`.
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, uffdio_zeropage);
// `UFFDIO_WAKE`.
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, uffdio_range);
// `UFFDIO_CONTINUE`.
ioctl_iowr_nr!(UFFDIO_CONTINUE, UFFDIO, 0x07, uffdio_continue);
// `UFFDIO_WRITEPROTECT`.
ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, UFFDIO, 0x06, uffdio_writeprotect);
// `UFFDIO_POISON`.
ioctl_iowr_nr!(UFFDIO_POISON, UFFDIO, 0x08, uffdio_poison);
// `UFFDIO_API`.
ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, uffdio_api);

/// A revision of the unmerged "guest_memfd: In-place conversion support" series, and the
/// numbers it assigns. One table, so that a new revision is one new row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SeriesRevision {
    /// v7, posted 2026-05-22 (42 patches).
    V7,
    /// v8, posted 2026-06-18 (46 patches).
    V8,
}

impl SeriesRevision {
    /// Every known revision, oldest first.
    pub const ALL: [SeriesRevision; 2] = [SeriesRevision::V7, SeriesRevision::V8];

    /// `KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES` in this revision.
    pub const fn cap_guest_memfd_memory_attributes(self) -> u32 {
        match self {
            SeriesRevision::V7 => 249,
            SeriesRevision::V8 => 250,
        }
    }

    /// The kvm module parameter that switches in-place conversion on.
    pub const fn module_parameter(self) -> &'static str {
        match self {
            // Inverted sense: in-place when false.
            SeriesRevision::V7 => "vm_memory_attributes",
            SeriesRevision::V8 => "gmem_in_place_conversion",
        }
    }

    /// The revision's short name.
    pub const fn name(self) -> &'static str {
        match self {
            SeriesRevision::V7 => "v7",
            SeriesRevision::V8 => "v8",
        }
    }
}

/// The guest_memfd creation flags by name, in bit order.
pub const GUEST_MEMFD_FLAG_NAMES: [(u64, &str); 3] = [
    (GUEST_MEMFD_FLAG_MMAP, "mmap"),
    (GUEST_MEMFD_FLAG_INIT_SHARED, "init_shared"),
    (GUEST_MEMFD_FLAG_NO_DIRECT_MAP, "no_direct_map"),
];

/// Renders a flag mask as `mmap|init_shared` (unknown bits as hex; `0` for none).
pub fn flag_names(flags: u64) -> String {
    let mut parts = Vec::new();
    let mut rest = flags;
    for (bit, name) in GUEST_MEMFD_FLAG_NAMES {
        if flags & bit != 0 {
            parts.push(name.to_string());
            rest &= !bit;
        }
    }
    if rest != 0 {
        parts.push(format!("{rest:#x}"));
    }
    if parts.is_empty() {
        "0".to_string()
    } else {
        parts.join("|")
    }
}

/// userfaultfd feature bits by name (`UFFD_FEATURE_*` without the prefix,
/// include/uapi/linux/userfaultfd.h, Linux 6.8), for rendering a feature mask.
pub const UFFD_FEATURE_NAMES: [(u64, &str); 17] = [
    (1 << 0, "PAGEFAULT_FLAG_WP"),
    (1 << 1, "EVENT_FORK"),
    (1 << 2, "EVENT_REMAP"),
    (1 << 3, "EVENT_REMOVE"),
    (1 << 4, "MISSING_HUGETLBFS"),
    (UFFD_FEATURE_MISSING_SHMEM, "MISSING_SHMEM"),
    (UFFD_FEATURE_EVENT_UNMAP, "EVENT_UNMAP"),
    (1 << 7, "SIGBUS"),
    (1 << 8, "THREAD_ID"),
    (1 << 9, "MINOR_HUGETLBFS"),
    (UFFD_FEATURE_MINOR_SHMEM, "MINOR_SHMEM"),
    (1 << 11, "EXACT_ADDRESS"),
    (UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
    (1 << 13, "WP_UNPOPULATED"),
    (UFFD_FEATURE_POISON, "POISON"),
    (1 << 15, "WP_ASYNC"),
    (1 << 16, "MOVE"),
];

/// Renders a `UFFD_FEATURE_*` mask as names without the prefix (unknown bits as hex).
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn struct_sizes_match_the_kernel() {
        assert_eq!(size_of::<kvm_create_guest_memfd>(), 64);
        assert_eq!(size_of::<kvm_userspace_memory_region2>(), 160);
        assert_eq!(size_of::<kvm_memory_attributes>(), 32);
        assert_eq!(size_of::<kvm_memory_attributes2>(), 128);
        assert_eq!(size_of::<kvm_pre_fault_memory>(), 64);
    }

    #[test]
    fn attributes2_prefix_matches_attributes() {
        assert_eq!(
            offset_of!(kvm_memory_attributes2, offset),
            offset_of!(kvm_memory_attributes, address)
        );
        assert_eq!(
            offset_of!(kvm_memory_attributes2, size),
            offset_of!(kvm_memory_attributes, size)
        );
        assert_eq!(
            offset_of!(kvm_memory_attributes2, attributes),
            offset_of!(kvm_memory_attributes, attributes)
        );
        assert_eq!(
            offset_of!(kvm_memory_attributes2, flags),
            offset_of!(kvm_memory_attributes, flags)
        );
        assert_eq!(offset_of!(kvm_memory_attributes2, error_offset), 32);
        assert_eq!(offset_of!(kvm_memory_attributes2, reserved), 40);
    }

    #[test]
    fn ioctl_numbers_match_the_spec() {
        assert_eq!(KVM_CREATE_GUEST_MEMFD(), 0xC040_AED4);
        assert_eq!(KVM_SET_USER_MEMORY_REGION2(), 0x40A0_AE49);
        assert_eq!(KVM_SET_MEMORY_ATTRIBUTES(), 0x4020_AED2);
        assert_eq!(KVM_SET_MEMORY_ATTRIBUTES2(), 0xC080_AED2);
        assert_eq!(KVM_PRE_FAULT_MEMORY(), 0xC040_AED5);
    }

    #[test]
    fn userfaultfd_numbers_match_the_kernel() {
        assert_eq!(size_of::<uffd_msg>(), 32);
        assert_eq!(UFFDIO_API(), 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER(), 0xC020_AA00);
        assert_eq!(UFFDIO_WAKE(), 0x8010_AA02);
        assert_eq!(UFFDIO_CONTINUE(), 0xC020_AA07);
        assert_eq!(UFFDIO_POISON(), 0xC020_AA08);
    }

    #[test]
    fn constants_agree_with_kvm_bindings() {
        assert_eq!(
            KVM_MEMORY_ATTRIBUTE_PRIVATE,
            u64::from(kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE)
        );
        assert_eq!(
            KVM_MEMORY_EXIT_FLAG_PRIVATE,
            u64::from(kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE)
        );
        assert_eq!(KVM_MEM_GUEST_MEMFD, 4);
        assert_eq!(KVM_EXIT_MEMORY_FAULT, 39);
        assert_eq!(KVM_X86_SW_PROTECTED_VM, 1);
    }

    #[test]
    fn series_table() {
        assert_eq!(SeriesRevision::V7.cap_guest_memfd_memory_attributes(), 249);
        assert_eq!(SeriesRevision::V8.cap_guest_memfd_memory_attributes(), 250);
        assert_eq!(flag_names(3), "mmap|init_shared");
        assert_eq!(flag_names(0), "0");
        assert_eq!(flag_names(1 << 9), "0x200");
    }
}
