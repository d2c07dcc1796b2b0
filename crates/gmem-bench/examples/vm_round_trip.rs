//! Benchmark: the conversion round trip beside the bare exit round trip, in the same run,
//! on a real vCPU over an emulated gmem file, and the cost of the CPL0 detour that the
//! MAP_GPA_RANGE hypercall path would add (two more exits with a CS/SS rewrite each).
//!
//! `cargo run --release -p gmem-bench --example vm_round_trip [samples]`; exits 1 if the ratio
//! conversion / (exit + 4 KiB conversion) misses the 1.5 target, 2 without /dev/kvm.

use std::process::ExitCode;
use std::time::Instant;

use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{EmulatedGuestMemfd, GuestMemfd, PAGE_SIZE};
use gmem_check::workload::TARGET_RATIO;
use gmem_vmm::backing::in_place;
use gmem_vmm::guest::{DATA_GPA, PORT_ENTER_CPL0, PORT_ENTER_CPL3};
use gmem_vmm::{Event, GuestProgram, RequestPath, Vm};

fn pct(v: &mut [u64], p: usize) -> f64 {
    v.sort_unstable();
    v[(v.len() * p / 100).min(v.len() - 1)] as f64 / 1000.0
}

fn main() -> ExitCode {
    if let Err(why) = gmem_vmm::kvm_available() {
        println!("skipped: {why}");
        return ExitCode::from(2);
    }
    let samples: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let size = 2 << 20;
    let f = EmulatedGuestMemfd::create(size, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
        .expect("emulated file");
    // The VMM's own mapping, as in `gmem run`: conversions revoke pages in it.
    let host = f.mmap_all().expect("host mapping");
    host.write_volatile(0, &[1u8; 4096]).expect("pre-touch");
    let vm = Vm::new(1).expect("vm");
    let memory = in_place(std::sync::Arc::new(f.clone())).expect("in-place memory");
    vm.bind(gmem_vmm::Gpa(DATA_GPA), &memory, 0, size)
        .expect("bind");
    let mut p = GuestProgram::new(0, RequestPath::Port);
    p.fill(DATA_GPA, PAGE_SIZE, 0xcc);
    p.nop_loop(samples + 1);
    p.conversion_loop(DATA_GPA, 2 * (samples / 2 + 1));
    p.sync(1);
    for _ in 0..samples.min(500) {
        p.asm().out_eax(PORT_ENTER_CPL0);
        p.asm().out_eax(PORT_ENTER_CPL3);
    }
    p.done();
    let mut vcpu = vm
        .create_vcpu(0, p.finish().expect("program"))
        .expect("vcpu");
    assert_eq!(vcpu.run(&vm).expect("run"), Event::Sync(1));
    let t = Instant::now();
    assert_eq!(vcpu.run(&vm).expect("run"), Event::Done);
    let detour_us = t.elapsed().as_secs_f64() * 1e6 / samples.min(500) as f64;
    let tm = vcpu.timings().clone();
    let (mut exit, mut conv_rt, mut conv) = (tm.exit_rt_ns, tm.conversion_rt_ns, tm.conversion_ns);
    let (e50, e90) = (pct(&mut exit, 50), pct(&mut exit, 90));
    let (r50, r90) = (pct(&mut conv_rt, 50), pct(&mut conv_rt, 90));
    let (c50, c90) = (pct(&mut conv, 50), pct(&mut conv, 90));
    let ratio = r50 / (e50 + c50);
    println!(
        "vm_round_trip: {} samples each, one vCPU at CPL3, emulated backend ({:?})",
        exit.len(),
        f.revocation()
    );
    println!("  bare exit round trip        median {e50:7.2} µs  p90 {e90:7.2} µs");
    println!("  4 KiB conversion (host)     median {c50:7.2} µs  p90 {c90:7.2} µs");
    println!("  conversion round trip       median {r50:7.2} µs  p90 {r90:7.2} µs");
    println!(
        "  ratio conversion / (exit + 4 KiB conversion) = {ratio:.2} (target <= {TARGET_RATIO})"
    );
    println!(
        "  CPL0 detour (out CPL0 + out CPL3, two exits and two KVM_SET_SREGS): {detour_us:.2} µs \
         — what the MAP_GPA_RANGE hypercall path would add per request"
    );
    if ratio <= TARGET_RATIO {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
