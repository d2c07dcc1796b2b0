//! `gmem io`: guest_memfd operations one command a line, in the manner of `xfs_io`.
//!
//! The interpreter is [`gmem_check::script::Session`]; this module only feeds it the `-c` commands and
//! the `-f` script lines, in that order, and prints one line per command. The exit status is
//! non-zero if any line was a usage error (bad command or argument, missing file or mapping).

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
    let mut session = match args.backend {
        IoBackend::Emulated => Session::new(
            Arc::new(EmulatedBackend::default()),
            Some(Arc::new(InternalGuest)),
        ),
        IoBackend::Kernel => {
            let b = KernelBackend::with_vm_type(args.vm_type).map_err(|e| {
                format!(
                    "kernel backend unavailable: {} VM (type {}) on /dev/kvm: {e}",
                    BackendArg::vm_type_name(args.vm_type),
                    args.vm_type
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
    for line in args
        .commands
        .iter()
        .map(String::as_str)
        .chain(script.lines())
    {
        if let Some(out) = session.exec(line) {
            usage_errors += usize::from(out.usage_error);
            println!("{out}");
        }
    }
    Ok(if usage_errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
