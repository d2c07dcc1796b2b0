//! The `gmem` command: one subcommand per module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod conformance;
mod demo;
mod exec;
mod io;
mod kvm_access;
mod map;
mod probe;
mod progress;
mod run;
mod usage;

/// The `"version"` of every `--json` object (docs/json.md); raised when a shape changes
/// incompatibly.
pub const JSON_VERSION: u64 = 1;

/// The top-level `--help` text after the one-line summary.
const LONG_ABOUT: &str = "\
gmem emulates the shared/private memory model of Linux guest_memfd with in-place conversion \
(KVM_SET_MEMORY_ATTRIBUTES2 on the file), runs KVM guests that convert their memory, checks \
backends against the kernel selftests, and measures in-place conversion against the \
two-backing model VMMs ship today.

Without /dev/kvm (or without access to it: add yourself to the kvm group) everything runs on \
the emulated backend, with host-driven conversions in place of guests.";

/// gmem: Linux guest_memfd in-place shared/private conversion, emulated and on KVM.
#[derive(Debug, Parser)]
#[command(
    name = "gmem",
    version,
    about = "gmem: Linux guest_memfd in-place shared/private conversion, emulated and on KVM",
    long_about = LONG_ABOUT,
    after_help = "Writing to a closed pipe (gmem probe | head -1) ends gmem quietly, as SIGPIPE \
                  ends other Unix tools; any other write error is reported and ends gmem with status 1. \
                  Exit status: 0 success, 1 failure, 2 usage error, 4 every conformance case \
                  skipped (kselftest's KSFT_SKIP); `gmem exec` exits with the program's status, \
                  or 127 when the program is not found and 126 when it cannot be run, as env \
                  does."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// In-place conversion against the two-backing model, and kernel against emulated.
    Bench(bench::Args),
    /// Walk through the emulated guest_memfd: conversion, SIGBUS, punch-hole, pins.
    Demo(demo::Args),
    /// Run a program with the KVM uAPI of a kernel with the in-place series: guest_memfd
    /// calls are answered by the emulated file (gmem exec -- PROGRAM [ARGS...]).
    Exec(exec::Args),
    /// Draw guest memory over time (an SVG memory map of each guest_memfd: shared and
    /// private pages, conversions, memslots) from a `gmem exec --trace` file.
    Map(map::Args),
    /// Report what this host offers guest_memfd and which backend provides each feature.
    Probe(probe::Args),
    /// Run the conformance suite on a backend (or both, and the differential check).
    Conformance(conformance::Args),
    /// Run guest_memfd operations one command a line, in the manner of xfs_io (errno answers
    /// are results, exit 0; unusable lines go to stderr with their line, exit 2).
    Io(io::Args),
    /// Boot vCPUs on gmem memory and run the private_mem_conversions workload.
    Run(run::Args),
}

/// Restores the default action of SIGPIPE (the Rust runtime ignores it), so that writing to a
/// closed pipe ends the process quietly, as it does `cat` or `grep`, instead of making every
/// `println!` panic with "failed printing to stdout: Broken pipe".
fn restore_sigpipe() {
    // SAFETY: signal(2) installs the default disposition, no handler code; it runs first in
    // main, before any thread is started. gmem's own pipes (pins, forked children) keep both
    // ends open while they write, so they never raise SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    restore_sigpipe();
    report_write_errors();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Exec(args) => exec::run(&args),
        Command::Map(args) => map::run(&args),
        Command::Probe(args) => probe::run(&args),
        Command::Conformance(args) => conformance::run(&args),
        Command::Io(args) => io::run(&args),
        Command::Run(args) => run::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            if e.downcast_ref::<usage::UsageError>().is_some() {
                ExitCode::from(2)
            } else if let Some(x) = e.downcast_ref::<exec::ExecError>() {
                ExitCode::from(x.exit_status())
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Makes a failed write to standard output (`gmem probe > /dev/full`: ENOSPC) a reported
/// error with status 1, as coreutils do, instead of the panic `println!` raises. A closed
/// pipe never gets here (SIGPIPE ends gmem first, see [`restore_sigpipe`]).
fn report_write_errors() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if let Some(why) = msg.strip_prefix("failed printing to stdout: ") {
            eprintln!("error: standard output: {why}");
            std::process::exit(1);
        }
        default(info);
    }));
}
