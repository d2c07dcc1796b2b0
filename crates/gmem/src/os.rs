//! The operating-system interface gmem's users share: the page size, owned mappings with safe,
//! bounds-checked accesses, and the file calls the VMM and the benchmarks need. A safe facade
//! over gmem's crate-private system-call layer, where all of gmem's `unsafe` lives.

pub use crate::sys::seccomp::{remap_file_pages_refused, RemapFilePages};
pub use crate::sys::{
    allocated_bytes, fallocate, fstat, ftruncate, memfd_create, mmap_checks, userfaultfd_features,
    FaultEvent, Mmap, Placement, PoisonFd, PAGE_SIZE, TASK_SIZE,
};
