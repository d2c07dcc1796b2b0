//! The harness of the test files with runtime skips: gmem-testkit (a test this host cannot run
//! is reported as ignored with the reason gmem's probe gives, never as passed).
#![allow(unused_imports)] // each test file uses a part

pub use gmem_testkit::{
    needs, run, test, test_needing, test_partly, test_unless, tests, tests_needing, tests_unless,
    Feature, TempDir, Trial,
};
