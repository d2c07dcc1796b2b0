//! Real vCPUs on gmem memory (needs /dev/kvm; prints `skipped: <reason>` otherwise).

use std::sync::Arc;
use std::time::Duration;

use gmem::uapi::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_MAP_GPA_RANGE_ENCRYPTED,
};
use gmem::{EmulatedGuestMemfd, GuestMemfd, PAGE_SIZE};
use gmem_vmm::backing::{in_place, GuestBacking};
use gmem_vmm::guest::DATA_GPA;
use gmem_vmm::{Event, GuestProgram, RequestPath, Vm};

const PS: u64 = PAGE_SIZE;

fn kvm_or_skip() -> bool {
    match gmem_vmm::kvm_available() {
        Ok(()) => true,
        Err(why) => {
            println!("skipped: {why}");
            false
        }
    }
}

fn emulated(pages: u64) -> (EmulatedGuestMemfd, Arc<dyn GuestBacking>) {
    let f = EmulatedGuestMemfd::create(
        pages * PS,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    )
    .unwrap();
    let g = in_place(Arc::new(f.clone())).unwrap();
    (f, g)
}

/// Runs the vCPU to its next event, failing the test on a guest check failure.
fn next(vm: &Vm, vcpu: &mut gmem_vmm::Vcpu) -> Event {
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

/// Bad conversion requests answer -EINVAL, change nothing, and the VM keeps running: unaligned
/// GPA, zero pages, outside every memslot, unknown attribute bits, invalid page-size hint.
#[test]
fn bad_requests_answer_einval_and_the_vm_keeps_running() {
    if !kvm_or_skip() {
        return;
    }
    let (f, g) = emulated(4);
    let vm = Vm::new(1).unwrap();
    vm.bind(DATA_GPA, &g, 0, 4 * PS).unwrap();
    let einval = -libc::EINVAL;
    let enc = KVM_MAP_GPA_RANGE_ENCRYPTED;
    let mut p = GuestProgram::new(0, RequestPath::Port);
    p.map_gpa_range(DATA_GPA + 1, 1, enc, 0, einval); // unaligned
    p.map_gpa_range(DATA_GPA, 0, enc, 0, einval); // zero pages
    p.map_gpa_range(DATA_GPA + 8 * PS, 1, enc, 0, einval); // outside every memslot
    p.map_gpa_range(DATA_GPA + 3 * PS, 2, enc, 0, einval); // runs past the memslot
    p.map_gpa_range(DATA_GPA, 1, enc | (1 << 7), 0, einval); // unknown attribute bit
    p.map_gpa_range(DATA_GPA, 1, enc | 3, 0, einval); // page size 3 does not exist
    p.map_gpa_range(DATA_GPA, u64::MAX / PS, enc, 0, einval); // overflow
    p.sync(1);
    // Still running: a good request works.
    p.map_gpa_range(DATA_GPA, 1, enc, 0, 0);
    p.done();
    let mut vcpu = vm.create_vcpu(0, p.finish().unwrap()).unwrap();
    assert_eq!(next(&vm, &mut vcpu), Event::Sync(1));
    assert!(
        f.attribute_runs(0, 4 * PS)
            .unwrap()
            .iter()
            .all(|r| r.2 == 0),
        "nothing changed"
    );
    assert_eq!(vm.stats().requests_rejected, 7);
    assert_eq!(next(&vm, &mut vcpu), Event::Done);
    assert_eq!(
        f.attributes(0).unwrap(),
        gmem::uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE
    );
}

/// A conversion blocked by a VMM pin (EAGAIN) succeeds after the VMM drops its pins; a pin the
/// VMM does not know about is reported to the guest as -EAGAIN and nothing changes.
#[test]
fn eagain_is_retried_after_dropping_vmm_pins() {
    if !kvm_or_skip() {
        return;
    }
    let (f, g) = emulated(4);
    let vm = Vm::new(1).unwrap();
    vm.bind(DATA_GPA, &g, 0, 4 * PS).unwrap();
    vm.pin(DATA_GPA + PS, PS).unwrap();
    let foreign = f.pin(3 * PS, PS).unwrap();
    let enc = KVM_MAP_GPA_RANGE_ENCRYPTED;
    let mut p = GuestProgram::new(0, RequestPath::Port);
    p.map_gpa_range(DATA_GPA, 2, enc, 0, 0); // pinned by the VMM: retried, succeeds
    p.map_gpa_range(DATA_GPA + 2 * PS, 2, enc, 0, -libc::EAGAIN); // foreign pin
    p.sync(1);
    p.map_gpa_range(DATA_GPA + 2 * PS, 2, enc, 0, 0);
    p.done();
    let mut vcpu = vm.create_vcpu(0, p.finish().unwrap()).unwrap();
    assert_eq!(next(&vm, &mut vcpu), Event::Sync(1));
    let s = vm.stats();
    assert_eq!(
        (s.eagain_retries, s.pins_dropped, vm.pins_held()),
        (1, 1, 0)
    );
    let runs = f.attribute_runs(0, 4 * PS).unwrap();
    assert_eq!(runs, vec![(0, 2 * PS, 8), (2 * PS, 2 * PS, 0)]);
    drop(foreign);
    assert_eq!(next(&vm, &mut vcpu), Event::Done);
    assert!(f
        .attribute_runs(0, 4 * PS)
        .unwrap()
        .iter()
        .all(|r| r.2 == 8));
}

/// One request split across two memslots backed by two files; a request straddling a hole
/// between memslots is refused whole.
#[test]
fn a_request_is_split_across_memslots_and_files() {
    if !kvm_or_skip() {
        return;
    }
    let (f1, g1) = emulated(2);
    let (f2, g2) = emulated(2);
    let vm = Vm::new(1).unwrap();
    vm.bind(DATA_GPA, &g1, 0, 2 * PS).unwrap();
    vm.bind(DATA_GPA + 2 * PS, &g2, 0, 2 * PS).unwrap();
    let enc = KVM_MAP_GPA_RANGE_ENCRYPTED;
    let mut p = GuestProgram::new(0, RequestPath::Port);
    p.fill(DATA_GPA, 4 * PS, 0x5a);
    p.map_gpa_range(DATA_GPA + PS, 2, enc, 0, 0);
    p.sync(1);
    p.verify(DATA_GPA, 4 * PS, 0x5a);
    p.map_gpa_range(DATA_GPA + PS, 2, 0, 0, 0);
    p.done();
    let mut vcpu = vm.create_vcpu(0, p.finish().unwrap()).unwrap();
    assert_eq!(next(&vm, &mut vcpu), Event::Sync(1));
    assert_eq!(
        f1.attribute_runs(0, 2 * PS).unwrap(),
        vec![(0, PS, 0), (PS, PS, 8)]
    );
    assert_eq!(
        f2.attribute_runs(0, 2 * PS).unwrap(),
        vec![(0, PS, 8), (PS, PS, 0)]
    );
    assert!(host_sigbus(&f1, PS) && host_sigbus(&f2, 0));
    assert_eq!(next(&vm, &mut vcpu), Event::Done);
    assert_eq!(host_read(&f2, 0), 0x5a);
    assert_eq!(vm.stats().pages_converted, 4);
}

/// The MAP_GPA_RANGE hypercall: decoding and answers (exercised on synthetic exits, since
/// this host's PVM never exits to userspace for it), and the probe that says so.
#[test]
fn map_gpa_range_hypercall_decoding_and_probe() {
    use gmem_vmm::ConvertRequest;
    let enc = KVM_MAP_GPA_RANGE_ENCRYPTED;
    assert_eq!(
        ConvertRequest::from_map_gpa_range(DATA_GPA, 2, enc | 1),
        Ok(ConvertRequest {
            gpa: DATA_GPA,
            size: 2 * PS,
            to_private: true
        })
    );
    assert!(ConvertRequest::from_map_gpa_range(DATA_GPA + 8, 1, 0).is_err());
    assert!(ConvertRequest::from_map_gpa_range(DATA_GPA, 0, 0).is_err());
    assert!(ConvertRequest::from_map_gpa_range(DATA_GPA, 1, 1 << 5).is_err());
    assert_eq!(
        ConvertRequest::from_memory_fault(8, DATA_GPA + 5, 1),
        Ok(ConvertRequest {
            gpa: DATA_GPA,
            size: PS,
            to_private: true
        })
    );
    assert!(ConvertRequest::from_memory_fault(1 << 40, DATA_GPA, PS).is_err());
    assert_eq!(
        gmem_vmm::hypercall_ret(Err(gmem::Errno::EINVAL)),
        (-22i64) as u64
    );
    if !kvm_or_skip() {
        return;
    }
    // Synthetic hypercall exits through the VMM's handler.
    let (f, g) = emulated(2);
    let vm = Vm::new(1).unwrap();
    vm.bind(DATA_GPA, &g, 0, 2 * PS).unwrap();
    assert_eq!(vm.map_gpa_range(DATA_GPA, 2, enc, false), 0);
    assert_eq!(vm.map_gpa_range(DATA_GPA, 3, enc, false), (-22i64) as u64);
    assert!(vm.memory_fault(0, DATA_GPA + PS, PS).is_ok());
    assert_eq!(
        f.attribute_runs(0, 2 * PS).unwrap(),
        vec![(0, PS, 8), (PS, PS, 0)]
    );
    // Where the hypercall reaches userspace, the guest's vmcall path is used for real.
    match Vm::probe_hypercall_exit(Duration::from_millis(200)) {
        Ok(()) => {
            let mut p = GuestProgram::new(0, RequestPath::Hypercall);
            p.map_gpa_range(DATA_GPA + PS, 1, enc, 0, 0);
            p.done();
            let mut vcpu = vm.create_vcpu(0, p.finish().unwrap()).unwrap();
            assert_eq!(next(&vm, &mut vcpu), Event::Done);
            assert_eq!(f.attributes(PS).unwrap(), 8);
        }
        Err(why) => println!("hypercall path not exercised by a guest here: {why}"),
    }
}

/// guest_memfd_test's `test_guest_memfd_guest` on the kernel backend: a one-page guest_memfd
/// at 4 GiB; the host writes 0xaa, the guest checks it and writes 0xff, the host reads 0xff.
#[test]
fn test_guest_memfd_guest_on_the_kernel_backend() {
    if !kvm_or_skip() {
        return;
    }
    let backend = match gmem::KernelBackend::new() {
        Ok(b) => b,
        Err(e) => {
            println!("skipped: the kernel backend cannot open a VM ({e})");
            return;
        }
    };
    let flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    if backend.supported_flags() & flags != flags {
        println!("skipped: KVM_CAP_GUEST_MEMFD_FLAGS lacks MMAP|INIT_SHARED");
        return;
    }
    use gmem::GuestMemfdBackend;
    let file = backend.create_guest_memfd(PS, flags).unwrap();
    let vm = Vm::on_kernel_backend(&backend, 1).unwrap();
    vm.bind(DATA_GPA, &in_place(Arc::new(file.clone())).unwrap(), 0, PS)
        .unwrap();
    {
        let m = file.mmap_all().unwrap();
        m.write_volatile(0, &[0xaa; PS as usize]).unwrap();
    }
    let mut p = GuestProgram::new(0, RequestPath::Port);
    p.verify(DATA_GPA, PS, 0xaa);
    p.fill(DATA_GPA, PS, 0xff);
    p.done();
    let mut vcpu = vm.create_vcpu(0, p.finish().unwrap()).unwrap();
    assert_eq!(next(&vm, &mut vcpu), Event::Done);
    let m = file.mmap_all().unwrap();
    let mut buf = vec![0u8; PS as usize];
    m.read_volatile(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xff));
    // A second Vm on the same kernel VM (after the first is gone) gets fresh vCPU ids.
    drop(vcpu);
    drop(vm);
    let vm = Vm::on_kernel_backend(&backend, 1).unwrap();
    vm.bind(DATA_GPA, &in_place(Arc::new(file.clone())).unwrap(), 0, PS)
        .unwrap();
    let mut p = GuestProgram::new(0, RequestPath::Port);
    p.verify(DATA_GPA, PS, 0xff);
    p.done();
    let mut vcpu = vm.create_vcpu(0, p.finish().unwrap()).unwrap();
    assert_eq!(next(&vm, &mut vcpu), Event::Done);
}

/// `gmem run`'s workload, small: no mismatches, conversions in both directions.
#[test]
fn private_mem_conversions_workload() {
    let config = gmem_check::workload::Config {
        vcpus: 2,
        mem_mib: 8,
        samples: 20,
        memslots: 2,
        ..Default::default()
    };
    let r = gmem_check::workload::run(&config).unwrap();
    if r.mode != "kvm" {
        println!("skipped: no /dev/kvm; ran host-driven ({})", r.request_path);
    }
    assert_eq!(r.mismatches, 0, "{:#?}", r.mismatch_details);
    assert!(r.conversions_to_private > 0 && r.conversions_to_shared > 0);
    assert!(r.private_probes > 0);
}

/// `gmem run --model two-backing[+copy]`: the same workload on the two-backing model, its
/// checks following the model's own content rule (zeroed, preserved); checked against the
/// other rule, it must report mismatches. Configurations the model cannot take are refused
/// naming the option.
#[test]
fn private_mem_conversions_workload_on_the_two_backing_model() {
    use gmem::platform::PlatformKind;
    use gmem_check::workload::{run, Config};
    use gmem_vmm::backing::BackingKind;
    let config = |preserve_content, expect| Config {
        vcpus: 2,
        mem_mib: 8,
        samples: 20,
        memslots: 2,
        memory: BackingKind::TwoBacking { preserve_content },
        expect_rules_of: expect,
        ..Default::default()
    };
    for preserve in [false, true] {
        let r = run(&config(preserve, None)).unwrap();
        if r.mode != "kvm" {
            println!("skipped: no /dev/kvm; ran host-driven ({})", r.request_path);
        }
        assert_eq!(r.mismatches, 0, "{preserve}: {:#?}", r.mismatch_details);
        assert_eq!(
            r.model,
            BackingKind::TwoBacking {
                preserve_content: preserve
            }
            .name()
        );
        assert!(r.conversions_to_private > 0 && r.conversions_to_shared > 0);
        assert!(r.private_probes > 0 && r.content_checks >= 20);
        // The other rule: preserved content checked as zeroed, zeroed as preserved.
        let other = if preserve {
            PlatformKind::Tdx
        } else {
            PlatformKind::SoftwareProtected
        };
        let r = run(&config(preserve, Some(other))).unwrap();
        assert!(
            r.mismatches > 0,
            "{preserve}: checked with {other}'s rules passed"
        );
    }
    let e = run(&Config {
        platform: PlatformKind::Snp,
        ..config(false, None)
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--platform snp") && e.contains("--platform sw"),
        "{e}"
    );
}

/// A guest check that fails is reported with its description and the guest continues; a
/// guest that never exits is stopped at the deadline with a timeout error.
#[test]
fn guest_failures_are_reported_and_hung_guests_time_out() {
    if !kvm_or_skip() {
        return;
    }
    let (f, g) = emulated(1);
    let vm = Vm::new(2).unwrap();
    vm.bind(DATA_GPA, &g, 0, PS).unwrap();
    host_write(&f, 0, 0x77);
    let mut p = GuestProgram::new(0, RequestPath::Port);
    p.verify(DATA_GPA, PS, 0x78);
    p.done();
    let mut vcpu = vm.create_vcpu(0, p.finish().unwrap()).unwrap();
    match vcpu.run(&vm).unwrap() {
        Event::Fail { id, rdi } => {
            assert!(vcpu.checks()[id as usize].contains("holds 0x78"));
            assert_eq!(rdi, DATA_GPA + 8, "stops past the first differing word");
        }
        e => panic!("expected a failed check, got {e:?}"),
    }
    assert_eq!(vcpu.run(&vm).unwrap(), Event::Done);

    let mut p = GuestProgram::new(1, RequestPath::Port);
    let a = p.asm();
    let top = a.label();
    a.bind(top);
    a.jmp(top);
    let hung = vm.create_vcpu(1, p.finish().unwrap()).unwrap();
    let start = std::time::Instant::now();
    let r = vm.run_vcpus(vec![hung], Duration::from_millis(100), |vm, mut v| {
        v.run(vm)
    });
    assert!(
        matches!(r[0], Err(gmem_vmm::VmError::Timeout { vcpu: 1, .. })),
        "{:?}",
        r[0]
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

/// Every conformance case (guest_memfd_test, guest_memfd_conversions_test,
/// private_mem_conversions_test, private_mem_kvm_exits_test) on the emulated backend with the
/// guest's part played by a real vCPU; on the kernel backend, the cases it can run.
#[test]
fn conformance_cases_with_a_real_vcpu_as_the_guest() {
    use gmem_check::conformance::{cases, Ctx, Outcome};
    use gmem_vmm::port::VcpuGuest;
    use std::sync::Arc;
    if !kvm_or_skip() {
        return;
    }
    let ctx = Ctx {
        backend: Arc::new(gmem::EmulatedBackend::default()),
        guest: Some(VcpuGuest::emulated().unwrap()),
    };
    let mut passed = 0;
    for case in cases() {
        match ctx.run(&case) {
            Outcome::Pass => passed += 1,
            Outcome::Skip(why) => println!("{}: skipped ({why})", case.name),
            Outcome::Fail(why) => panic!("{} failed with a vCPU guest: {why}", case.name),
        }
    }
    println!("emulated backend, vCPU guest: {passed} cases passed");
    let backend = gmem::KernelBackend::new().unwrap();
    let ctx = Ctx {
        backend: Arc::new(backend.clone()),
        guest: Some(VcpuGuest::kernel(&backend).unwrap()),
    };
    for case in cases() {
        let o = ctx.run(&case);
        println!(
            "kernel backend, vCPU guest: {}: {} {}",
            case.name,
            o.label(),
            o.reason()
        );
        assert!(
            !matches!(o, Outcome::Fail(_)),
            "{} failed on the kernel backend: {}",
            case.name,
            o.reason()
        );
    }
}
