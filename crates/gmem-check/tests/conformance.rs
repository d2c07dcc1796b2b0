//! The conformance cases (`gmem_check::conformance`) against the emulated backend, one test
//! per case and revocation mechanism (`<case>::guard`, `::remap`). A mechanism this host
//! cannot run (the guard without userfaultfd) is ignored with the
//! reason, and so is a case that finds by running that the host lacks what it needs (one NUMA
//! node); neither counts as a pass.

use gmem::uapi::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
};
use gmem::{EmulatedOptions, Revocation};
use gmem_check::conformance::{cases, Case, Ctx, Outcome};
use gmem_testkit::{needs, test, test_partly, test_unless, Trial};

/// The revocation configurations every case runs in: both mechanisms.
fn configs() -> [(&'static str, EmulatedOptions); 2] {
    [
        ("guard", EmulatedOptions::with_revocation(Revocation::Guard)),
        ("remap", EmulatedOptions::with_revocation(Revocation::Remap)),
    ]
}

/// Every flag a case may create a file with (NO_DIRECT_MAP included).
const ANY_FLAGS: u64 =
    GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP;

/// The cases that need a VM: run in tests/vm.rs with a vCPU guest (and below, with the
/// internal guest and a VM where /dev/kvm makes one).
const VCPU_CASES: [&str; 3] = [
    "memslots_1_vcpus_1",
    "memslots_1_vcpus_4",
    "memslots_4_vcpus_4",
];

/// The cases that need what an emulated file has not (a guest_memfd descriptor): each must
/// skip, naming it.
const SKIPPED_ON_EMULATED: [(&str, &str); 1] = [("file_read_write", "no guest_memfd descriptor")];

/// The cases that run with the default options and the internal guest with a VM where
/// /dev/kvm makes one, passing or skipping with the reason.
const DEFAULT_CONTEXT_CASES: [&str; 5] = [
    "private_access_memslot_deleted",
    "pre_fault_memory",
    // Per-VM attribute tracking, on a VM of its own (vm_attributes.rs in gmem-vmm).
    "private_access_memslot_not_private",
    "post_vm_free",
    "numa_allocation",
];

/// `case` in `ctx`: passes, or is ignored with the reason the case gave for a skip.
fn run_case(ctx: Ctx, case: Case) -> Option<String> {
    match ctx.run(&case) {
        Outcome::Pass => None,
        Outcome::Skip(reason) => Some(reason),
        Outcome::Fail(reason) => panic!("{} failed: {reason}", case.name),
    }
}

fn main() {
    // The huge-folio cases need shmem THP: as root, switched on for this run and put back.
    let switch = gmem_testkit::ThpSwitch::for_this_run("conformance");
    let mut trials: Vec<Trial> = Vec::new();
    for case in cases() {
        let name = case.name;
        if VCPU_CASES.contains(&name) {
            continue;
        }
        if let Some(&(_, why)) = SKIPPED_ON_EMULATED.iter().find(|(n, _)| *n == name) {
            trials.push(test(name, move || {
                let out = Ctx::emulated().run(&case);
                assert!(
                    matches!(&out, Outcome::Skip(r) if r.contains(why)),
                    "{name}: {out:?}"
                );
            }));
            continue;
        }
        if DEFAULT_CONTEXT_CASES.contains(&name) {
            trials.push(test_partly(name, move || run_case(Ctx::emulated(), case)));
            continue;
        }
        for (label, opts) in configs() {
            let why = opts.revocation.needs(ANY_FLAGS).and_then(|n| needs(&[n]));
            trials.push(match why {
                Some(why) => test_unless(format!("{name}::{label}"), Some(why), || {}),
                None => test_partly(format!("{name}::{label}"), move || {
                    run_case(Ctx::emulated_with(opts), case)
                }),
            });
        }
    }
    gmem_testkit::run_then(trials, move || drop(switch))
}
