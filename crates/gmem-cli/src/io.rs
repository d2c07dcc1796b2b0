//! `gmem io`: guest_memfd operations one command a line, in the manner of `xfs_io`.
//!
//! The interpreter is [`gmem_check::script::Session`]; this module only feeds it the `-c` commands and
//! the `-f` script lines, in that order, and prints one line per command on stdout.
//!
//! Exit status, as `xfs_io`'s: an operation that answers an errno (`convert ... -> EAGAIN
//! error_offset=0x2000`, `mread ... -> SIGBUS at 0x0`) is a result, printed on stdout, not a
//! failure: the status stays 0. A line that cannot run (unknown command, bad argument, no
//! file or mapping yet) is a usage error: it goes to stderr, prefixed with where it came from
//! (`-c #2` or `SCRIPT:LINE`), the following lines still run, and the status is 2. A backend
//! that cannot be opened, or an unreadable script, is status 1.

use std::process::ExitCode;
use std::sync::Arc;

use gmem::{EmulatedBackend, KernelBackend};
use gmem_check::conformance::InternalGuest;
use gmem_check::script::Session;

use crate::conformance::{parse_vm_type, BackendArg};

/// Arguments of `gmem io`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backend that provides the file.
    #[arg(long, value_enum, default_value = "emulated")]
    backend: IoBackend,
    /// VM type of the kernel backend's VM: `default` (0), `sw_protected` (1), or a number.
    #[arg(long, default_value = "default", value_parser = parse_vm_type)]
    vm_type: u64,
    /// A command to run (repeatable; run in order, before the script). `-c help` lists them.
    #[arg(short = 'c', value_name = "CMD ARGS")]
    commands: Vec<String>,
    /// A script: one command a line; blank lines and `#` comments are skipped.
    #[arg(short = 'f', value_name = "SCRIPT")]
    script: Option<std::path::PathBuf>,
    /// Folios of the files `create` makes (emulated backend): 4k, or 2m (2 MiB shmem THP
    /// where the host offers it; sizes a multiple of 2 MiB, else `create` answers EINVAL).
    #[arg(long = "folio-size", value_name = "SIZE", default_value = "4k", value_parser = crate::run::parse_folio_size)]
    folio_size: gmem::FolioSize,
}

/// `--backend` of `gmem io` (one backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum IoBackend {
    /// gmem's emulated guest_memfd.
    Emulated,
    /// The kernel's guest_memfd on /dev/kvm.
    Kernel,
}

pub fn run(args: &Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if args.backend == IoBackend::Kernel && args.folio_size != gmem::FolioSize::Small {
        return Err(crate::usage::UsageError::value(
            "--folio-size",
            args.folio_size.name(),
            "4k with --backend kernel (the kernel's folios are its own)",
        )
        .into());
    }
    let mut session = match args.backend {
        IoBackend::Emulated => Session::new(
            Arc::new(EmulatedBackend::new(gmem::EmulatedOptions {
                folio_size: args.folio_size,
                ..gmem::EmulatedOptions::default()
            })),
            Some(Arc::new(InternalGuest)),
        ),
        IoBackend::Kernel => {
            let b = KernelBackend::with_vm_type(args.vm_type).map_err(|e| {
                let access = crate::kvm_access::check(&crate::kvm_access::kvm_device())
                    .err()
                    .map_or_else(String::new, |why| format!("\n  {why}"));
                format!(
                    "kernel backend unavailable: {} VM (type {}) on {}: {e}{access}",
                    BackendArg::vm_type_name(args.vm_type),
                    args.vm_type,
                    crate::kvm_access::kvm_device().display()
                )
            })?;
            Session::new(Arc::new(b), None)
        }
    };
    let script = match &args.script {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read script {}: {e}", path.display()))?,
        None => String::new(),
    };
    if args.commands.is_empty() && args.script.is_none() {
        return Err("nothing to do: give commands with -c \"CMD ARGS\" or a script with -f SCRIPT (-c help lists the commands)".into());
    }
    let mut usage_errors = 0;
    let script_name = args
        .script
        .as_ref()
        .map_or_else(String::new, |p| p.display().to_string());
    let commands = args
        .commands
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("-c #{}", i + 1), c.as_str()));
    let lines = script
        .lines()
        .enumerate()
        .map(|(i, l)| (format!("{script_name}:{}", i + 1), l));
    for (place, line) in commands.chain(lines) {
        if let Some(out) = session.exec(line) {
            if out.usage_error {
                usage_errors += 1;
                eprintln!("gmem io: {place}: {out}");
            } else {
                println!("{out}");
            }
        }
    }
    Ok(if usage_errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
