//! The virtio-blk device driven by a real vCPU (skips without /dev/kvm).

#[test]
fn virtio_blk_with_a_real_vcpu() {
    if let Err(why) = gmem_vmm::kvm_available() {
        eprintln!("skipped: {why}");
        return;
    }
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
