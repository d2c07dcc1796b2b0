//! The conformance cases (`gmem_check::conformance`) against the emulated backend, one test per
//! case. A case the backend cannot run is `#[ignore]`d with its reason (and, were it reached,
//! would fail the test rather than pass it).

use gmem::{EmulatedOptions, Revocation};
use gmem_check::conformance::{cases, Ctx, Outcome};

/// Runs case `name` with both revocation mechanisms, and with poison markers replaced by
/// hole mappings for every run.
fn run(name: &str) {
    let case = cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case named {name}"));
    let holes = EmulatedOptions {
        hole_min_bytes: gmem::PAGE_SIZE,
        ..EmulatedOptions::with_revocation(Revocation::Poison)
    };
    let configs = [
        EmulatedOptions::with_revocation(Revocation::Poison),
        EmulatedOptions::with_revocation(Revocation::Remap),
        holes,
    ];
    for opts in configs {
        match Ctx::emulated_with(opts).run(&case) {
            Outcome::Pass => {}
            Outcome::Skip(reason) => {
                panic!("{name} ({opts:?}) skipped ({reason}); skips must not count as passes")
            }
            Outcome::Fail(reason) => panic!("{name} ({opts:?}) failed: {reason}"),
        }
    }
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { run(stringify!($name)); })*

        #[test]
        fn every_case_has_a_test() {
            let listed = [$(stringify!($name)),*, "forked_accesses", "file_read_write",
                "private_access_memslot_deleted", "private_access_memslot_not_private",
                "pre_fault_memory", "numa_allocation", "post_vm_free",
                // Need a VM: run in tests/vm.rs with a vCPU guest.
                "memslots_1_vcpus_1", "memslots_1_vcpus_4", "memslots_4_vcpus_4"];
            for c in cases() {
                assert!(listed.contains(&c.name), "case {} has no test", c.name);
            }
        }
    };
}

cases!(
    flags,
    create_multiple,
    invalid_sizes,
    file_size,
    mmap_supported,
    mmap_not_supported,
    mmap_cow,
    fault_overflow,
    fault_private,
    fallocate,
    invalid_punch_hole,
    collapse,
    mbind,
    guest_memfd_guest,
    gmem_convert_fault_race,
    init_private,
    init_shared,
    indexing,
    before_allocation_shared,
    before_allocation_private,
    unallocated_folios,
    truncate,
    elevated_refcount,
    set_attributes_invalid,
    early_return,
    explicit_conversion,
    explicit_conversion_fallocate,
    punch_hole,
    punch_hole_precise,
    pkvm_preserves_on_conversion_scrubs_on_punch,
    snp_never_writes_assigned_make_shared_only_to_shared,
    tdx_zeroes_on_conversion_to_shared,
    populate_in_place_and_copying,
    no_direct_map_removal_and_restore,
);

/// A forked child's copy of the mapping is revoked too: read and write of the page the
/// parent converts after the fork both raise SIGBUS in the child (the fork handlers).
#[test]
fn forked_accesses() {
    run("forked_accesses");
}

/// Cases the emulated backend cannot run are skips naming what is missing, never passes.
#[test]
fn cases_without_their_capability_skip_on_emulated() {
    let (name, why) = ("file_read_write", "no guest_memfd descriptor");
    let case = cases()
        .into_iter()
        .find(|c| c.name == name)
        .expect("case exists");
    let out = Ctx::emulated().run(&case);
    assert!(
        matches!(&out, Outcome::Skip(r) if r.contains(why)),
        "{name}: {out:?}"
    );
    println!(
        "{name} skips on the emulated backend, as it must: {}",
        out.reason()
    );
}

/// The cases that need a VM pass on the emulated backend wherever `/dev/kvm` makes one, and
/// otherwise skip naming the missing VM; `numa_allocation` passes on two nodes or more and
/// otherwise skips naming the one node.
#[test]
fn vm_and_numa_cases_pass_or_skip_naming_why() {
    for (name, why) in [
        ("private_access_memslot_deleted", "no VM"),
        ("pre_fault_memory", "no VM"),
        // Per-VM attribute tracking, on a VM of its own (vm_attributes.rs in gmem-vmm).
        ("private_access_memslot_not_private", "no VM"),
        ("post_vm_free", "no VM"),
        ("numa_allocation", "NUMA node"),
    ] {
        let case = cases()
            .into_iter()
            .find(|c| c.name == name)
            .expect("case exists");
        let out = Ctx::emulated().run(&case);
        match &out {
            Outcome::Pass => println!("{name}: pass"),
            Outcome::Skip(r) if r.contains(why) => println!("{name}: skip: {r}"),
            _ => panic!("{name}: {out:?}"),
        }
    }
}
