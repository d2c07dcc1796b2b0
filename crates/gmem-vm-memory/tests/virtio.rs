//! The virtio-blk-like device: chains in shared memory work, chains into private memory fail
//! that request with a status and the device carries on.

use std::sync::Arc;

use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{EmulatedGuestMemfd, GuestMemfd};
use gmem_vm_memory::blk::{
    BlockDevice, Driver, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use gmem_vm_memory::{GmemMemory, GmemRegion};
use vm_memory::{Bytes, GuestAddress};

const PAGE: u64 = 4096;
const BASE: u64 = 0x1_0000_0000;
const RINGS: u64 = BASE;
const HDR: u64 = BASE + PAGE;
const STATUS: u64 = BASE + PAGE + 0x800;
const DATA: u64 = BASE + 2 * PAGE;

fn setup() -> (GmemMemory, Driver, BlockDevice) {
    let f: Arc<dyn GuestMemfd> = Arc::new(
        EmulatedGuestMemfd::create(
            16 * PAGE,
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        )
        .unwrap(),
    );
    let mem = GmemMemory::new(vec![
        GmemRegion::new(f, 0, 16 * PAGE, GuestAddress(BASE)).unwrap()
    ])
    .unwrap();
    let drv = Driver::new(RINGS, 16);
    drv.init(&mem).unwrap();
    let dev = BlockDevice::new(drv.device_queue(), 64);
    (mem, drv, dev)
}

fn status(mem: &GmemMemory) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

#[test]
fn chains_in_shared_memory_work() {
    let (mem, mut drv, mut dev) = setup();
    mem.write_slice(&[0xab; 4096], GuestAddress(DATA)).unwrap();
    let h = drv
        .request(&mem, HDR, VIRTIO_BLK_T_OUT, 8, &[(DATA, 4096)], STATUS)
        .unwrap();
    assert_eq!(dev.process(&mem), 1);
    assert_eq!(drv.used(&mem).unwrap(), vec![(u32::from(h), 1)]);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    assert_eq!(&dev.disk()[8 * 512..8 * 512 + 4096], &[0xab; 4096][..]);
    // Read it back into two buffers spanning a page boundary.
    let h = drv
        .request(
            &mem,
            HDR,
            VIRTIO_BLK_T_IN,
            8,
            &[(DATA + PAGE + 0x800, 2048), (DATA + 2 * PAGE, 2048)],
            STATUS,
        )
        .unwrap();
    assert_eq!(dev.process(&mem), 1);
    assert_eq!(drv.used(&mem).unwrap(), vec![(u32::from(h), 4097)]);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    let mut back = [0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(DATA + PAGE + 0x800))
        .unwrap();
    assert_eq!(back, [0xab; 4096]);
    drv.request(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20)], STATUS)
        .unwrap();
    drv.request(&mem, HDR + 0x100, 77, 0, &[], STATUS + 1)
        .unwrap();
    assert_eq!(dev.process(&mem), 2);
    let mut id = [0u8; 8];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"gmem-blk");
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS + 1)).unwrap(),
        VIRTIO_BLK_S_UNSUPP
    );
    assert_eq!(dev.stats().ok, 3);
}

#[test]
fn chains_into_private_memory_fail_the_request_and_the_device_carries_on() {
    let (mem, mut drv, mut dev) = setup();
    let private_data = DATA + 4 * PAGE;
    mem.convert(private_data, PAGE, true).unwrap();
    // IN into a private buffer (the device would write it): IOERR, nothing written.
    let h = drv
        .request(
            &mem,
            HDR,
            VIRTIO_BLK_T_IN,
            0,
            &[(private_data, 4096)],
            STATUS,
        )
        .unwrap();
    assert_eq!(dev.process(&mem), 1);
    assert_eq!(drv.used(&mem).unwrap(), vec![(u32::from(h), 1)]);
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
    assert!(
        dev.last_error()
            .unwrap()
            .contains(&format!("{private_data:#x}")),
        "{:?}",
        dev.last_error()
    );
    // OUT from a buffer whose second half is private: IOERR, the disk keeps its old data.
    mem.write_slice(&[0x11; 2048], GuestAddress(private_data - 2048))
        .unwrap();
    drv.request(
        &mem,
        HDR,
        VIRTIO_BLK_T_OUT,
        0,
        &[(private_data - 2048, 4096)],
        STATUS,
    )
    .unwrap();
    assert_eq!(dev.process(&mem), 1);
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
    assert!(dev.disk()[..4096].iter().all(|&b| b == 0));
    // A header in private memory.
    let private_hdr = DATA + 5 * PAGE;
    mem.convert(private_hdr, PAGE, true).unwrap();
    drv.submit(
        &mem,
        &[
            (private_hdr, 16, false),
            (DATA, 512, true),
            (STATUS, 1, true),
        ],
    )
    .unwrap();
    assert_eq!(dev.process(&mem), 1);
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
    // The status byte itself private: used length 0, no status.
    let h = drv
        .submit(
            &mem,
            &[
                (HDR, 16, false),
                (DATA, 512, true),
                (private_hdr + 8, 1, true),
            ],
        )
        .unwrap();
    mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HDR)).unwrap();
    assert_eq!(dev.process(&mem), 1);
    assert_eq!(drv.used(&mem).unwrap().last(), Some(&(u32::from(h), 0)));
    let s = dev.stats();
    assert_eq!((s.ioerr, s.private_refused), (3, 3));
    assert_eq!(s.no_status, 1);
    // The device and the memory are fine: the same buffer works once shared again.
    mem.convert(private_data, PAGE, false).unwrap();
    let h = drv
        .request(
            &mem,
            HDR,
            VIRTIO_BLK_T_IN,
            0,
            &[(private_data, 4096)],
            STATUS,
        )
        .unwrap();
    assert_eq!(dev.process(&mem), 1);
    assert_eq!(drv.used(&mem).unwrap(), vec![(u32::from(h), 4097)]);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
}

#[test]
fn private_rings_stop_the_batch_not_the_device() {
    let (mem, mut drv, mut dev) = setup();
    drv.request(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20)], STATUS)
        .unwrap();
    mem.convert(RINGS, PAGE, true).unwrap();
    assert_eq!(
        dev.process(&mem),
        0,
        "rings unreachable: nothing served, no crash"
    );
    mem.convert(RINGS, PAGE, false).unwrap();
    assert_eq!(
        dev.process(&mem),
        1,
        "the pending chain is served once the rings are shared"
    );
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
}
