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
//!
//! # Example (the README's)
//!
//! ```
//! use std::sync::Arc;
//! use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
//! use gmem::{EmulatedGuestMemfd, GuestMemfd};
//! use gmem_vm_memory::{private_address, GmemMemory, GmemRegion, IommuTracker};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let file: Arc<dyn GuestMemfd> = Arc::new(EmulatedGuestMemfd::create(
//!     1 << 20, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)?);
//! // A region: the file, its offset, the host mapping, a dirty bitmap (here none: `()`).
//! let region = GmemRegion::new(file.clone(), 0, 1 << 20, GuestAddress(0x1_0000_0000))?;
//! let slot = region.memslot(1)?;            // kvm_userspace_memory_region2 to bind it
//! let mem: GmemMemory = GmemMemory::new(vec![region])?;   // a GuestRegionCollection inside
//! mem.add_listener(Arc::new(IommuTracker::new(true)));    // told of every conversion
//!
//! mem.write_obj(7u64, GuestAddress(0x1_0000_0000))?;       // shared: plain vm-memory
//! mem.convert(0x1_0000_0000, 4096, true)?;                 // the one conversion entry point
//! let e = mem.read_obj::<u64>(GuestAddress(0x1_0000_0000)).unwrap_err();
//! assert_eq!(private_address(&e), Some(0x1_0000_0000));     // vm-memory's error, naming the GPA
//!
//! let access = mem.access();   // one per request: its slices keep their pages referenced
//! // queue.pop_descriptor_chain(&access), Reader/Writer, get_slices ... then drop(access)
//! # let _ = (slot, access);
//! # Ok(())
//! # }
//! ```

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
