//! Benchmarks of gmem, each printing ratios against a baseline measured in the same run
//! (medians of several repetitions):
//!
//! - [`floor`]: conversion latency of the emulated file against the single-syscall floor;
//! - [`comparison`]: `gmem bench`, in-place conversion against the two-backing layout every
//!   production VMM ships, and the kernel backend against the emulated one.
//!
//! Every `unsafe` block of the crate is in its private `sys` module.

#![deny(unsafe_code)]

pub mod comparison;
pub mod error;
pub mod floor;
#[allow(unsafe_code)]
mod sys;

pub use error::BenchError;
