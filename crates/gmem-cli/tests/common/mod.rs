//! Helpers shared by the CLI tests: the libtest-mimic harness of gmem-check's tests (one
//! file, included from there) and running the `gmem` binary.
#![allow(dead_code, unused_macros, unused_imports)] // each test file uses a part

#[path = "../../../gmem-check/tests/common/mod.rs"]
mod harness;
pub use harness::*;

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
