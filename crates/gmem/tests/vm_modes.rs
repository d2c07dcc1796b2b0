//! The owning VM's type and attribute-tracking mode on the emulated backend (docs/series.md §2.1,
//! §2.3): a VM type without private memory, and per-VM tracking (the module-parameter mode).

use gmem::uapi::{
    kvm_memory_attributes2, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
};
use gmem::{AttributeTracking, EmulatedGuestMemfd, EmulatedOptions, Errno, GuestMemfd, PAGE_SIZE};

const PS: u64 = PAGE_SIZE;
const FLAGS: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

fn file(options: EmulatedOptions) -> EmulatedGuestMemfd {
    EmulatedGuestMemfd::create_with(2 * PS, FLAGS, options).unwrap()
}

/// v8: on a VM type without private memory, `KVM_SET_MEMORY_ATTRIBUTES2` is EINVAL even for
/// attributes 0 (after the flags/reserved checks, before the range checks); the default VM
/// has private memory.
#[test]
fn no_private_mem_vm_refuses_even_attributes_zero() {
    assert!(EmulatedOptions::default().vm_private_mem);
    let f = file(EmulatedOptions {
        vm_private_mem: false,
        ..EmulatedOptions::default()
    });
    for attrs in [0, KVM_MEMORY_ATTRIBUTE_PRIVATE] {
        let mut a = kvm_memory_attributes2::new(0, PS, attrs);
        a.error_offset = 0xdead;
        assert_eq!(f.set_attributes(&mut a), Err(Errno::EINVAL), "{attrs}");
        // Steps 3-8 do not write error_offset.
        assert_eq!(a.error_offset, 0xdead);
        // Even a range the later steps would refuse.
        let mut a = kvm_memory_attributes2::new(3 * PS, 1, attrs);
        assert_eq!(f.set_attributes(&mut a), Err(Errno::EINVAL));
    }
    assert_eq!(f.attributes(0), Ok(0));
    // The default (private-capable) VM: attributes 0 on a shared page is a no-op success.
    let g = file(EmulatedOptions::default());
    let mut a = kvm_memory_attributes2::new(0, PS, 0);
    assert_eq!(g.set_attributes(&mut a), Ok(()));
}

/// Per-VM tracking (v8 `gmem_in_place_conversion=0`, v7 `vm_memory_attributes=1`): the
/// guest_memfd ioctl is ENOTTY before any other check, and the VM's
/// `KVM_SET_MEMORY_ATTRIBUTES` converts; in per-file mode the VM ioctl is the ENOTTY one.
#[test]
fn per_vm_tracking_turns_the_file_ioctl_off() {
    let f = file(EmulatedOptions {
        attribute_tracking: AttributeTracking::PerVm,
        ..EmulatedOptions::default()
    });
    assert_eq!(f.attribute_tracking(), AttributeTracking::PerVm);
    let mut bad = kvm_memory_attributes2::new(1, 1, 0xff);
    bad.flags = 1;
    assert_eq!(f.set_attributes(&mut bad), Err(Errno::ENOTTY));
    let mut a = kvm_memory_attributes2::new(0, PS, KVM_MEMORY_ATTRIBUTE_PRIVATE);
    assert_eq!(f.set_attributes(&mut a), Err(Errno::ENOTTY));
    assert_eq!(f.attributes(0), Ok(0));
    assert_eq!(f.set_vm_attributes(&mut a), Ok(()));
    assert_eq!(f.attributes(0), Ok(KVM_MEMORY_ATTRIBUTE_PRIVATE));
    assert_eq!(f.attributes(PS), Ok(0));
    // The host loses access to the private page as with the file ioctl.
    let mut buf = [0u8; 8];
    assert!(f.read_at(0, &mut buf).is_err());
    assert!(f.read_at(PS, &mut buf).is_ok());

    let g = file(EmulatedOptions::default());
    assert_eq!(g.attribute_tracking(), AttributeTracking::PerFile);
    let mut a = kvm_memory_attributes2::new(0, PS, KVM_MEMORY_ATTRIBUTE_PRIVATE);
    assert_eq!(g.set_vm_attributes(&mut a), Err(Errno::ENOTTY));
    assert_eq!(g.set_attributes(&mut a), Ok(()));
}
