//! Benchmarks of gmem, each printing ratios against a baseline measured in the same run
//! (medians of several repetitions):
//!
//! - [`floor`]: conversion latency of the emulated file against the single-syscall floor;
//! - [`comparison`]: `gmem bench`, in-place conversion against the two-backing layout every
//!   production VMM ships, and the kernel backend against the emulated one.

pub mod comparison;
pub mod floor;
