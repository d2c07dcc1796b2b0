//! Checks of gmem against the kernel's behaviour:
//!
//! - [`conformance`]: the cases of the kernel selftests (`guest_memfd_test`,
//!   `guest_memfd_conversions_test`, `private_mem_conversions_test`,
//!   `private_mem_kvm_exits_test`) over any backend, and the differential check;
//! - [`script`]: the `gmem io` interpreter, one stable line per guest_memfd operation;
//! - [`workload`]: the private_mem_conversions workload behind `gmem run`;
//! - [`host_report`]: what the host offers, per feature and backend (`gmem probe`); why a
//!   check cannot run on this host is `gmem::host`'s probe, asked before it runs.

pub mod conformance;
pub mod host_report;
pub mod script;
pub mod workload;
