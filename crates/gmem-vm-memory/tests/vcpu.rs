//! The virtio-blk device driven by a real vCPU (ignored, with the reason, without a usable
//! /dev/kvm).

fn virtio_blk_with_a_real_vcpu() {
    let d = gmem_vm_memory::vcpu_demo::run().unwrap_or_else(|e| panic!("{e}"));
    for l in &d.log {
        eprintln!("{l}");
    }
    assert_eq!(d.conversions, 2);
    assert_eq!(
        (d.stats.ok, d.stats.ioerr, d.stats.private_refused),
        (2, 1, 1)
    );
}

fn main() {
    gmem_testkit::run(gmem_testkit::tests_needing!([gmem_testkit::Feature::Kvm];
        virtio_blk_with_a_real_vcpu,
    ))
}
