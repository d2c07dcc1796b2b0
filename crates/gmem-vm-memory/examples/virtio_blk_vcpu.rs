//! A virtio-blk device on gmem memory with a real vCPU: shared buffers work, a request into
//! memory the guest made private fails with VIRTIO_BLK_S_IOERR, the VMM stays up.
//!
//! `cargo run --release -p gmem-vm-memory --example virtio_blk_vcpu`

fn main() {
    if let Err(why) = gmem_vmm::kvm_available() {
        println!("skipped: {why}");
        return;
    }
    match gmem_vm_memory::vcpu_demo::run() {
        Ok(d) => {
            for l in &d.log {
                println!("{l}");
            }
            println!(
                "exits {}, guest conversions {}, device: {:?}",
                d.exits, d.conversions, d.stats
            );
        }
        Err(e) => {
            eprintln!("virtio_blk_vcpu: {e}");
            std::process::exit(1);
        }
    }
}
