//! Helpers shared by the CLI tests: the harness (gmem-testkit: a test this host cannot run is
//! ignored with its reason) and running the `gmem` binary.
#![allow(dead_code, unused_imports)] // each test file uses a part

pub use gmem_testkit::{
    needs, run, test, test_needing, test_partly, test_unless, tests, tests_needing, tests_unless,
    Feature, TempDir, Trial,
};

// Running the `gmem` binary.

use std::process::{Command, Output};

/// Runs `gmem args` and collects its output.
pub fn gmem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(args)
        .output()
        .expect("gmem runs")
}

/// `gmem args` with extra environment variables.
pub fn gmem_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("gmem runs")
}

/// Stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
