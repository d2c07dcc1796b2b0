//! Real vCPUs on gmem memory. Tests that need /dev/kvm (or the kernel backend, or a
//! hypercall exit to userspace) are reported as ignored with the reason where the host lacks
//! it; so is each conformance case whose capability the backend lacks.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Trial;
use gmem::uapi::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_MAP_GPA_RANGE_ENCRYPTED,
};
use gmem::{EmulatedGuestMemfd, GuestMemfd, PAGE_SIZE};
use gmem_vmm::backing::{in_place, GuestBacking};
use gmem_vmm::guest::DATA_GPA;
use gmem_vmm::{Event, Gpa, GuestProgram, RequestPath, Vm};

use common::{needs, test_partly, test_unless, tests, tests_unless, Feature};

const PS: u64 = PAGE_SIZE;

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
fn init_shared_flow_with_a_real_vcpu() {
    let (f, g) = emulated(1);
    let vm = Vm::new(1).unwrap();
    vm.bind(Gpa(DATA_GPA), &g, 0, PS).unwrap();
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
fn bad_requests_answer_einval_and_the_vm_keeps_running() {
    let (f, g) = emulated(4);
    let vm = Vm::new(1).unwrap();
    vm.bind(Gpa(DATA_GPA), &g, 0, 4 * PS).unwrap();
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
fn eagain_is_retried_after_dropping_vmm_pins() {
    let (f, g) = emulated(4);
    let vm = Vm::new(1).unwrap();
    vm.bind(Gpa(DATA_GPA), &g, 0, 4 * PS).unwrap();
    vm.pin(Gpa(DATA_GPA + PS), PS).unwrap();
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
fn a_request_is_split_across_memslots_and_files() {
    let (f1, g1) = emulated(2);
    let (f2, g2) = emulated(2);
    let vm = Vm::new(1).unwrap();
    vm.bind(Gpa(DATA_GPA), &g1, 0, 2 * PS).unwrap();
    vm.bind(Gpa(DATA_GPA + 2 * PS), &g2, 0, 2 * PS).unwrap();
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

/// The MAP_GPA_RANGE hypercall and the memory-fault exit: decoding into conversion requests,
/// and the hypercall's answer for an error.
fn map_gpa_range_hypercall_decoding() {
    use gmem_vmm::ConvertRequest;
    let enc = KVM_MAP_GPA_RANGE_ENCRYPTED;
    assert_eq!(
        ConvertRequest::from_map_gpa_range(DATA_GPA, 2, enc | 1),
        Ok(ConvertRequest {
            gpa: Gpa(DATA_GPA),
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
            gpa: Gpa(DATA_GPA),
            size: PS,
            to_private: true
        })
    );
    assert!(ConvertRequest::from_memory_fault(1 << 40, DATA_GPA, PS).is_err());
    assert_eq!(
        gmem_vmm::hypercall_ret(Err(gmem::Errno::EINVAL)),
        (-22i64) as u64
    );
}

/// The MAP_GPA_RANGE hypercall and the memory-fault exit through the VMM's handler, on
/// synthetic exits (this host's PVM never exits to userspace for the hypercall).
fn map_gpa_range_synthetic_exits() {
    let enc = KVM_MAP_GPA_RANGE_ENCRYPTED;
    // Synthetic hypercall exits through the VMM's handler.
    let (f, g) = emulated(2);
    let vm = Vm::new(1).unwrap();
    vm.bind(Gpa(DATA_GPA), &g, 0, 2 * PS).unwrap();
    assert_eq!(vm.map_gpa_range(DATA_GPA, 2, enc, false), 0);
    assert_eq!(vm.map_gpa_range(DATA_GPA, 3, enc, false), (-22i64) as u64);
    assert!(vm.memory_fault(0, DATA_GPA + PS, PS).is_ok());
    assert_eq!(
        f.attribute_runs(0, 2 * PS).unwrap(),
        vec![(0, PS, 8), (PS, PS, 0)]
    );
}

/// The MAP_GPA_RANGE hypercall issued by a guest's vmcall, where it reaches userspace
/// (decided before the test runs by `Vm::check_hypercall_exit`).
fn map_gpa_range_hypercall_from_a_guest() {
    let (f, g) = emulated(2);
    let vm = Vm::new(1).unwrap();
    vm.bind(Gpa(DATA_GPA), &g, 0, 2 * PS).unwrap();
    let mut p = GuestProgram::new(0, RequestPath::Hypercall);
    p.map_gpa_range(DATA_GPA + PS, 1, KVM_MAP_GPA_RANGE_ENCRYPTED, 0, 0);
    p.done();
    let mut vcpu = vm.create_vcpu(0, p.finish().unwrap()).unwrap();
    assert_eq!(next(&vm, &mut vcpu), Event::Done);
    assert_eq!(f.attributes(PS).unwrap(), 8);
}

/// guest_memfd_test's `test_guest_memfd_guest` on the kernel backend: a one-page guest_memfd
/// at 4 GiB; the host writes 0xaa, the guest checks it and writes 0xff, the host reads 0xff.
fn test_guest_memfd_guest_on_the_kernel_backend() {
    let backend = gmem::KernelBackend::new().unwrap();
    let flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    let file = backend.create_guest_memfd(PS, flags).unwrap();
    let vm = Vm::on_kernel_backend(&backend, 1).unwrap();
    vm.bind(
        Gpa(DATA_GPA),
        &in_place(Arc::new(file.clone())).unwrap(),
        0,
        PS,
    )
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
    vm.bind(
        Gpa(DATA_GPA),
        &in_place(Arc::new(file.clone())).unwrap(),
        0,
        PS,
    )
    .unwrap();
    let mut p = GuestProgram::new(0, RequestPath::Port);
    p.verify(DATA_GPA, PS, 0xff);
    p.done();
    let mut vcpu = vm.create_vcpu(0, p.finish().unwrap()).unwrap();
    assert_eq!(next(&vm, &mut vcpu), Event::Done);
}

/// `gmem run`'s workload, small: no mismatches, conversions in both directions. Without
/// /dev/kvm the workload runs host-driven; the test then checks that run and is reported as
/// ignored, since the vCPU engine did not run.
fn private_mem_conversions_workload() -> Option<String> {
    let config = gmem_check::workload::Config {
        vcpus: 2,
        mem_mib: 8,
        samples: 20,
        memslots: 2,
        ..Default::default()
    };
    let r = gmem_check::workload::run(&config).unwrap();
    assert_eq!(r.mismatches, 0, "{:#?}", r.mismatch_details);
    assert!(r.conversions_to_private > 0 && r.conversions_to_shared > 0);
    assert!(r.private_probes > 0);
    host_driven(&r)
}

/// Why the workload report `r` did not come from vCPUs, if it did not.
fn host_driven(r: &gmem_check::workload::Report) -> Option<String> {
    (r.mode != gmem_check::workload::Mode::Kvm).then(|| {
        format!(
            "no /dev/kvm: the vCPU engine did not run; checked host-driven ({})",
            r.request_path
        )
    })
}

/// `gmem run --model two-backing[+copy]`: the same workload on the two-backing model, its
/// checks following the model's own content rule (zeroed, preserved); checked against the
/// other rule, it must report mismatches. Configurations the model cannot take are refused
/// naming the option. Ignored (after checking the host-driven run) without /dev/kvm.
fn private_mem_conversions_workload_on_the_two_backing_model() -> Option<String> {
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
    let mut skipped = None;
    for preserve in [false, true] {
        let r = run(&config(preserve, None)).unwrap();
        skipped = skipped.or(host_driven(&r));
        assert_eq!(r.mismatches, 0, "{preserve}: {:#?}", r.mismatch_details);
        assert_eq!(
            r.memory,
            BackingKind::TwoBacking {
                preserve_content: preserve
            }
        );
        assert_eq!(r.model(), r.memory.name());
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
    skipped
}

/// A guest check that fails is reported with its description and the guest continues; a
/// guest that never exits is stopped at the deadline with a timeout error.
fn guest_failures_are_reported_and_hung_guests_time_out() {
    let (f, g) = emulated(1);
    let vm = Vm::new(2).unwrap();
    vm.bind(Gpa(DATA_GPA), &g, 0, PS).unwrap();
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

/// `VmPort::guest_read_u64_while`: a reading loop ends with the memslot's deletion (MMIO at
/// the GPA), and a loop that nothing ends is kicked out after its timeout instead of hanging;
/// an error of `during` is returned after the loop is stopped.
fn a_reading_loop_ends_by_deletion_or_by_timeout() {
    use gmem_vmm::port::{VcpuGuest, VmAccess, VmPort};
    use gmem_vmm::{PortError, VmError};
    const GPA: u64 = 4 << 30;
    let guest = VcpuGuest::emulated().unwrap();
    let f: Arc<dyn GuestMemfd> = Arc::new(emulated(1).0);
    let slot = guest.bind(&f, GPA, 0, PS).unwrap();
    let start = std::time::Instant::now();
    let r = guest.guest_read_u64_while(GPA, &|| Ok(()), Duration::from_millis(100));
    assert!(
        matches!(r, Err(PortError::Vm(VmError::Timeout { .. }))),
        "{r:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    let r = guest.guest_read_u64_while(
        GPA,
        &|| Err(PortError::Binding("during failed".into())),
        Duration::from_secs(5),
    );
    assert!(matches!(r, Err(PortError::Binding(_))), "{r:?}");
    let ended = guest
        .guest_read_u64_while(GPA, &|| guest.unbind(slot), Duration::from_secs(5))
        .unwrap();
    assert_eq!(
        ended,
        VmAccess::Mmio {
            phys_addr: GPA,
            len: 8,
            is_write: false
        }
    );
}

/// A program loaded after the vCPU stopped at an MMIO read runs from its first instruction:
/// `load` lets KVM complete the pending read first, which would otherwise finish the old
/// instruction on the next `KVM_RUN` over the new registers (the conformance cases' vCPU
/// guest lost the write that followed `private_access_memslot_deleted`'s MMIO stop).
fn a_program_loaded_after_an_mmio_stop_runs_from_its_start() {
    use gmem_vmm::port::{GuestPort, VcpuGuest, VmAccess, VmPort};
    use gmem_vmm::Stop;
    let (f, g) = emulated(1);
    let vm = Vm::new(1).unwrap();
    vm.bind(Gpa(DATA_GPA), &g, 0, PS).unwrap();
    let unbound = DATA_GPA + (2 << 20);
    let mut p = GuestProgram::new(0, RequestPath::Port);
    p.done();
    let mut vcpu = vm.create_vcpu(0, p.finish().unwrap()).unwrap();
    for round in 0..10u8 {
        let mut p = GuestProgram::new(0, RequestPath::Port);
        p.load_u64(unbound);
        p.done();
        vcpu.load(&vm, p.finish().unwrap()).unwrap();
        match vcpu.run_until_stop(&vm).unwrap() {
            Stop::Mmio { phys_addr, .. } => assert_eq!(phys_addr, unbound),
            s => panic!("expected an MMIO stop, got {s:?}"),
        }
        let byte = 0x40 + round;
        let mut p = GuestProgram::new(0, RequestPath::Port);
        p.fill(DATA_GPA, PS, byte);
        p.done();
        vcpu.load(&vm, p.finish().unwrap()).unwrap();
        assert_eq!(next(&vm, &mut vcpu), Event::Done, "round {round}");
        assert_eq!(
            vcpu.regs().unwrap().rdi,
            DATA_GPA + PS,
            "round {round}: rep stosq ran"
        );
        assert_eq!(host_read(&f, PS - 1), byte, "round {round}");
    }

    // The same through the conformance cases' vCPU guest.
    let guest = VcpuGuest::emulated().unwrap();
    let file: Arc<dyn GuestMemfd> = Arc::new(emulated(1).0);
    for round in 0..10u8 {
        let a = guest.guest_read_u64(unbound).unwrap();
        assert!(matches!(a, VmAccess::Mmio { .. }), "round {round}: {a:?}");
        let byte = 0x80 + round;
        guest.write(&*file, 0, &[byte; PS as usize]).unwrap();
        let got = guest.read(&*file, 0, PS as usize).unwrap();
        assert!(
            got.iter().all(|&b| b == byte),
            "round {round}: read {:#x}",
            got[0]
        );
    }
}

/// Every conformance case (guest_memfd_test, guest_memfd_conversions_test,
/// private_mem_conversions_test, private_mem_kvm_exits_test) with the guest's part played by a
/// real vCPU, one test per case and backend
/// (`conformance_cases_with_a_real_vcpu_as_the_guest::{emulated,kernel}::<case>`): on the
/// emulated backend every case passes, on the kernel backend none fails; a case whose
/// capability the backend lacks is ignored with the reason. Each backend's cases share one
/// vCPU guest, so they run one at a time.
fn conformance_cases_with_a_real_vcpu_as_the_guest(why: &Option<String>) -> Vec<Trial> {
    use gmem_check::conformance::{cases, Ctx, Outcome};
    use gmem_vmm::port::VcpuGuest;
    const NAME: &str = "conformance_cases_with_a_real_vcpu_as_the_guest";
    let emulated = || -> Result<Ctx, String> {
        Ok(Ctx {
            backend: Arc::new(gmem::EmulatedBackend::default()),
            guest: Some(VcpuGuest::emulated().map_err(|e| e.to_string())?),
        })
    };
    let kernel = || -> Result<Ctx, String> {
        gmem::host::require(Feature::GuestMemfd).map_err(|e| e.to_string())?;
        let backend = gmem::KernelBackend::new().map_err(|e| e.to_string())?;
        Ok(Ctx {
            guest: Some(VcpuGuest::kernel(&backend).map_err(|e| e.to_string())?),
            backend: Arc::new(backend),
        })
    };
    let mut trials = Vec::new();
    for (label, ctx) in [("emulated", emulated as fn() -> _), ("kernel", kernel)] {
        let ctx = match why {
            Some(why) => Err(why.clone()),
            None => ctx(),
        };
        let ctx = ctx.map(|c| Arc::new(Mutex::new(c)));
        for case in cases() {
            let name = format!("{NAME}::{label}::{}", case.name);
            let ctx = match &ctx {
                Err(why) => {
                    trials.push(test_unless(name, Some(why.clone()), || {}));
                    continue;
                }
                Ok(ctx) => ctx.clone(),
            };
            let missing = {
                let c = ctx.lock().unwrap();
                case.needs.iter().find_map(|&n| c.missing(n))
            };
            if missing.is_some() {
                trials.push(test_unless(name, missing, || {}));
                continue;
            }
            // A case may find by running that this host cannot run it (one NUMA node, an
            // ioctl answering EOPNOTSUPP): ignored with that reason, never a pass.
            trials.push(test_partly(name, move || {
                let o = ctx.lock().unwrap_or_else(|e| e.into_inner()).run(&case);
                match o {
                    Outcome::Pass => None,
                    Outcome::Skip(why) => Some(why),
                    Outcome::Fail(why) => {
                        panic!(
                            "{} failed on the {label} backend with a vCPU guest: {why}",
                            case.name
                        )
                    }
                }
            }));
        }
    }
    trials
}

/// Per-VM attribute tracking (the module-parameter mode): the VM's `KVM_SET_MEMORY_ATTRIBUTES`
/// converts the files behind the memslots it covers (whose own ioctl is ENOTTY), and a private
/// GPA without a guest_memfd (an anonymous memslot, or no memslot) faults as
/// `KVM_EXIT_MEMORY_FAULT(PRIVATE)`; a default VM answers the VM ioctl with ENOTTY.
fn per_vm_attribute_tracking() {
    use gmem::uapi::{kvm_memory_attributes2, KVM_MEMORY_ATTRIBUTE_PRIVATE as P};
    use gmem::{AttributeTracking, EmulatedOptions, Errno};
    use gmem_check::conformance::{VmAccess, VmPort};
    let plain = Vm::new(1).unwrap();
    assert_eq!(plain.attribute_tracking(), AttributeTracking::PerFile);
    assert_eq!(
        plain.set_memory_attributes(DATA_GPA, PS, P),
        Err(Errno::ENOTTY)
    );
    drop(plain);

    let g = gmem_vmm::port::VcpuGuest::emulated_per_vm().unwrap();
    let vm = g.vm();
    let opts = EmulatedOptions {
        attribute_tracking: AttributeTracking::PerVm,
        ..EmulatedOptions::default()
    };
    let f = EmulatedGuestMemfd::create_with(
        2 * PS,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        opts,
    )
    .unwrap();
    let mut a = kvm_memory_attributes2::new(0, PS, P);
    assert_eq!(f.set_attributes(&mut a), Err(Errno::ENOTTY));
    vm.bind(
        Gpa(DATA_GPA),
        &in_place(Arc::new(f.clone())).unwrap(),
        0,
        2 * PS,
    )
    .unwrap();
    vm.bind_anonymous(Gpa(DATA_GPA + 2 * PS), PS).unwrap();
    // Bad requests: EINVAL.
    assert_eq!(vm.set_memory_attributes(DATA_GPA, 1, P), Err(Errno::EINVAL));
    assert_eq!(
        vm.set_memory_attributes(DATA_GPA, PS, 2),
        Err(Errno::EINVAL)
    );
    // One request over the file's second page, the anonymous page and an unbound page.
    vm.set_memory_attributes(DATA_GPA + PS, 3 * PS, P).unwrap();
    assert_eq!(f.attributes(0), Ok(0));
    assert_eq!(f.attributes(PS), Ok(P));
    assert!(host_sigbus(&f, PS));
    // The guest reads the private file page; the private GPAs without a guest_memfd fault.
    let read = |gpa| VmPort::guest_read_u64(&*g, gpa).unwrap();
    assert_eq!(read(DATA_GPA + PS), VmAccess::Value(0));
    for gpa in [DATA_GPA + 2 * PS + 8, DATA_GPA + 3 * PS] {
        assert_eq!(
            read(gpa),
            VmAccess::MemoryFault {
                flags: gmem::uapi::KVM_MEMORY_EXIT_FLAG_PRIVATE,
                gpa: gpa & !(PS - 1),
                size: PS
            }
        );
    }
    // Back to shared: the anonymous memslot is mapped again, the unbound GPA is MMIO.
    vm.set_memory_attributes(DATA_GPA, 4 * PS, 0).unwrap();
    assert_eq!(f.attributes(PS), Ok(0));
    assert_eq!(read(DATA_GPA + 2 * PS), VmAccess::Value(0));
    assert!(matches!(read(DATA_GPA + 3 * PS), VmAccess::Mmio { .. }));
}

fn main() {
    let kvm = needs(&[Feature::Kvm]);
    let mut trials = tests!(map_gpa_range_hypercall_decoding);
    trials.extend(tests_unless!(kvm;
        init_shared_flow_with_a_real_vcpu,
        bad_requests_answer_einval_and_the_vm_keeps_running,
        eagain_is_retried_after_dropping_vmm_pins,
        a_request_is_split_across_memslots_and_files,
        map_gpa_range_synthetic_exits,
        guest_failures_are_reported_and_hung_guests_time_out,
        per_vm_attribute_tracking,
        a_reading_loop_ends_by_deletion_or_by_timeout,
        a_program_loaded_after_an_mmio_stop_runs_from_its_start,
    ));
    let hypercall_exit = kvm.clone().or_else(|| {
        Vm::check_hypercall_exit(Duration::from_millis(200))
            .err()
            .map(|why| {
                format!("the MAP_GPA_RANGE hypercall does not exit to userspace here: {why}")
            })
    });
    trials.push(test_unless(
        "map_gpa_range_hypercall_from_a_guest",
        hypercall_exit,
        map_gpa_range_hypercall_from_a_guest,
    ));
    trials.push(test_unless(
        "test_guest_memfd_guest_on_the_kernel_backend",
        needs(&[Feature::GuestMemfdFlags(
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        )]),
        test_guest_memfd_guest_on_the_kernel_backend,
    ));
    trials.push(test_partly(
        "private_mem_conversions_workload",
        private_mem_conversions_workload,
    ));
    trials.push(test_partly(
        "private_mem_conversions_workload_on_the_two_backing_model",
        private_mem_conversions_workload_on_the_two_backing_model,
    ));
    trials.extend(conformance_cases_with_a_real_vcpu_as_the_guest(&kvm));
    common::run(trials)
}
