//! Real vCPUs on gmem memory (needs /dev/kvm; prints `skipped: <reason>` otherwise).

use std::time::Duration;

use gmem::uapi::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_MAP_GPA_RANGE_ENCRYPTED,
};
use gmem::vm::guest::DATA_GPA;
use gmem::vm::{Event, GuestFile, GuestProgram, RequestPath, Vm};
use gmem::{EmulatedGuestMemfd, GuestMemfd, PAGE_SIZE};

const PS: u64 = PAGE_SIZE;

fn kvm_or_skip() -> bool {
    match gmem::vm::kvm_available() {
        Ok(()) => true,
        Err(why) => {
            println!("skipped: {why}");
            false
        }
    }
}

fn emulated(pages: u64) -> (EmulatedGuestMemfd, GuestFile) {
    let f = EmulatedGuestMemfd::create(
        pages * PS,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    )
    .unwrap();
    let g = GuestFile::Emulated(f.clone());
    (f, g)
}

/// Runs the vCPU to its next event, failing the test on a guest check failure.
fn next(vm: &Vm, vcpu: &mut gmem::vm::Vcpu) -> Event {
    let e = vcpu.run(vm).unwrap();
    if let Event::Fail { id, rdi } = &e {
        panic!(
            "guest check failed: {} (rdi {rdi:#x})",
            vcpu.checks()[*id as usize]
        );
    }
    e
}

fn host_read(f: &EmulatedGuestMemfd, off: u64) -> u8 {
    let m = f.mmap_all().unwrap();
    let mut b = [0u8; 1];
    m.read_volatile(off as usize, &mut b).unwrap();
    b[0]
}

fn host_write(f: &EmulatedGuestMemfd, off: u64, v: u8) {
    let m = f.mmap_all().unwrap();
    m.write_volatile(off as usize, &vec![v; PS as usize])
        .unwrap();
}

fn host_sigbus(f: &EmulatedGuestMemfd, off: u64) -> bool {
    let m = f.mmap_all().unwrap();
    m.probe_read(off as usize, 1).unwrap().is_sigbus()
}

/// guest_memfd_conversions_test `init_shared`, with the guest's part done by a real vCPU that
/// converts through its own requests (port path).
#[test]
fn init_shared_flow_with_a_real_vcpu() {
    if !kvm_or_skip() {
        return;
    }
    let (f, g) = emulated(1);
    let vm = Vm::new(1).unwrap();
    vm.bind(DATA_GPA, &g, 0, PS).unwrap();
    let mut p = GuestProgram::new(0, RequestPath::Port);
    // test_shared(0, 0, 'A', 'B'): host writes A; guest checks A, writes B.
    p.sync(1);
    p.verify(DATA_GPA, PS, b'A');
    p.fill(DATA_GPA, PS, b'B');
    p.sync(2);
    // convert_to_private(0, 'B', 'C'): the guest sees B, writes C; host SIGBUS.
    p.convert(DATA_GPA, PS, true, 0);
    p.verify(DATA_GPA, PS, b'B');
    p.fill(DATA_GPA, PS, b'C');
    p.sync(3);
    // convert_to_shared(0, 'C', 'D', 'E'): host sees C, writes D; guest checks D, writes E.
    p.convert(DATA_GPA, PS, false, 0);
    p.sync(4);
    p.verify(DATA_GPA, PS, b'D');
    p.fill(DATA_GPA, PS, b'E');
    p.done();
    let mut vcpu = vm.create_vcpu(0, p.finish().unwrap()).unwrap();
    assert_eq!(host_read(&f, 0), 0);
    assert_eq!(next(&vm, &mut vcpu), Event::Sync(1));
    host_write(&f, 0, b'A');
    assert_eq!(next(&vm, &mut vcpu), Event::Sync(2));
    assert_eq!(host_read(&f, 0), b'B');
    assert_eq!(next(&vm, &mut vcpu), Event::Sync(3));
    assert!(
        host_sigbus(&f, 0),
        "private page readable from the host mapping"
    );
    assert_eq!(
        f.attributes(0).unwrap(),
        gmem::uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE
    );
    assert_eq!(next(&vm, &mut vcpu), Event::Sync(4));
    assert_eq!(host_read(&f, 0), b'C');
    host_write(&f, 0, b'D');
    assert_eq!(next(&vm, &mut vcpu), Event::Done);
    assert_eq!(host_read(&f, 0), b'E');
    let s = vm.stats();
    assert_eq!((s.conversions_to_private, s.conversions_to_shared), (1, 1));
}
