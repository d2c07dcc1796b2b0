//! rust-vmm's `vm-memory` over gmem files: guest memory whose private pages are an error,
//! not a SIGBUS, for device emulation in a VMM using in-place shared/private conversion.
//!
//! - [`GmemRegion`]: one range of a gmem file (emulated or kernel) as a vm-memory region,
//!   carrying the file, its offset, the VMM's host mapping and a dirty [`vm_memory::bitmap::Bitmap`];
//!   [`GmemRegion::memslot`] gives the `kvm_userspace_memory_region2` to bind it.
//! - [`GmemMemory`]: the regions (a `GuestRegionCollection`) as a [`vm_memory::GuestMemory`]:
//!   `check_range` is false over private pages, every access (`Bytes`, `get_slices`) refuses
//!   them with vm-memory's error naming the address ([`private_address`]), and holds a
//!   reference on its pages that a conversion to private waits for or fails on (EAGAIN);
//!   [`GmemAccess`] keeps references as long as its slices live.
//! - [`GmemMemory::convert`]: the one conversion entry point `(gpa, size, to_private)`, with
//!   [`ConversionListener`]s (QEMU's `RamDiscardListener` shape; [`IommuTracker`],
//!   [`VhostUserTable`]).
//! - [`blk::BlockDevice`]: a virtio-blk-like device on virtio-queue 0.18 whose requests into
//!   private memory fail with `VIRTIO_BLK_S_IOERR` while the VMM stays up.

pub mod blk;
mod error;
mod listener;
mod memory;
mod region;
pub mod vcpu_demo;

pub use error::{private_address, ConvertError, PrivateMemory, RegionError};
pub use listener::{
    ConversionEvent, ConversionListener, IommuTracker, ListenerContext, ListenerError,
    RecordingListener, VhostUserTable,
};
pub use memory::{GmemAccess, GmemMemory, GmemSliceIter, DEFAULT_BUSY_WAIT};
pub use region::GmemRegion;
