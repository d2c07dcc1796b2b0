//! The `gmem` command: one subcommand per module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod conformance;
mod demo;
mod io;
mod probe;
mod run;

/// gmem: the shared/private memory model of Linux guest_memfd with in-place conversion.
#[derive(Debug, Parser)]
#[command(name = "gmem", version, about)]
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
    /// Report what this host offers guest_memfd and which backend provides each feature.
    Probe(probe::Args),
    /// Run the conformance suite on a backend (or both, and the differential check).
    Conformance(conformance::Args),
    /// Run guest_memfd operations one command a line, in the manner of xfs_io.
    Io(io::Args),
    /// Boot vCPUs on gmem memory and run the private_mem_conversions workload.
    Run(run::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Probe(args) => probe::run(&args),
        Command::Conformance(args) => conformance::run(&args),
        Command::Io(args) => io::run(&args),
        Command::Run(args) => run::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gmem: {e}");
            ExitCode::FAILURE
        }
    }
}
