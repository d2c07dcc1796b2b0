//! `gmem conformance`: the conformance suite on one backend or both, and the differential
//! check between them.
//!
//! Prints a table (backend, case, result, reason) and the closing line
//! `N passed, N failed, N skipped`, then each reason shared by several rows of a backend
//! once (the rows say `see [N]`); exits non-zero if anything failed. `--json` prints one
//! object `{"version", "passed", "failed", "skipped", "backends": [{"backend", "passed",
//! "failed", "skipped", "cases": [{"name", "result", "reason"}]}]}`; with `--backend all` the
//! third backend is the differential check, `differential` (docs/json.md).

use std::process::ExitCode;

use gmem_check::conformance::runner::{run_cases, unavailable, BackendReport};
use gmem_check::conformance::{differential, Ctx};
use serde_json::{json, Value};

use crate::kvm_access;
use crate::usage::UsageError;

/// Arguments of `gmem conformance`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which backend to run the suite on; `all` runs both and the differential check.
    #[arg(long, value_enum, default_value = "all")]
    backend: BackendArg,
    /// VM type of the kernel backend's VM: `default` (0), `sw_protected` (1), or a number.
    #[arg(long, default_value = "default", value_parser = parse_vm_type)]
    vm_type: u64,
    /// Who plays the guest: `auto` (the emulated file's internal view on the emulated backend,
    /// a real vCPU on the kernel backend when one can be made), `internal` (no guest on the
    /// kernel backend), or `vcpu` (a real vCPU on both).
    #[arg(long, value_enum, default_value = "auto")]
    guest: GuestArg,
    /// Run only the cases whose name contains PATTERN (`*` matches any run of characters;
    /// differential scripts are named `diff/<script>`).
    #[arg(long, value_name = "PATTERN")]
    filter: Option<String>,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
}

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// gmem's emulated guest_memfd.
    Emulated,
    /// The kernel's guest_memfd on /dev/kvm.
    Kernel,
    /// Both, and the differential check between them.
    All,
}

/// `--guest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestArg {
    /// Internal view on emulated, a vCPU on kernel when possible.
    Auto,
    /// Internal view on emulated, nothing on kernel.
    Internal,
    /// A real vCPU on both backends.
    Vcpu,
}

/// The VM types `--vm-type` knows by name.
const VM_TYPES: [(&str, u64); 2] = [("default", 0), ("sw_protected", 1)];

impl BackendArg {
    /// The name of a VM type (`default`, `sw_protected`, or `type N`).
    pub fn vm_type_name(t: u64) -> String {
        VM_TYPES
            .iter()
            .find(|(_, v)| *v == t)
            .map_or_else(|| format!("type {t}"), |(n, _)| (*n).to_string())
    }
}

/// Parses `--vm-type`: a name or a number.
pub fn parse_vm_type(s: &str) -> Result<u64, String> {
    if let Some((_, v)) = VM_TYPES.iter().find(|(n, _)| n.eq_ignore_ascii_case(s)) {
        return Ok(*v);
    }
    s.parse::<u64>().map_err(|_| {
        format!(
            "bad VM type {s:?}: expected default, sw_protected (KVM_X86_SW_PROTECTED_VM) or a number"
        )
    })
}

pub fn run(args: &Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let filter = args.filter.as_deref();
    let mut reports = Vec::new();
    if args.backend != BackendArg::Kernel {
        let emulated = match args.guest {
            GuestArg::Vcpu => Ctx::emulated_with_vcpu()?,
            GuestArg::Auto | GuestArg::Internal => Ctx::emulated(),
        };
        reports.push(run_cases(&emulated, filter));
    }
    if args.backend != BackendArg::Emulated {
        let kernel = match args.guest {
            GuestArg::Internal => Ctx::kernel(args.vm_type),
            GuestArg::Auto | GuestArg::Vcpu => {
                Ctx::kernel_with_vcpu(args.vm_type).and_then(|(ctx, no_vcpu)| match no_vcpu {
                    Some(why) if args.guest == GuestArg::Vcpu => Err(why),
                    Some(why) => {
                        eprintln!("gmem conformance: {why}; cases needing a guest skip");
                        Ok(ctx)
                    }
                    None => Ok(ctx),
                })
            }
        };
        match kernel {
            Ok(k) => {
                reports.push(run_cases(&k, filter));
                if args.backend == BackendArg::All {
                    reports.push(differential::run(&Ctx::emulated(), &k, filter));
                }
            }
            Err(why) => {
                if let Err(access) = kvm_access::check(&kvm_access::kvm_device()) {
                    eprintln!("gmem conformance: {access}");
                }
                reports.push(unavailable("kernel", &why, filter));
                if args.backend == BackendArg::All {
                    reports.push(differential::unavailable(&why, filter));
                }
            }
        }
    }
    if let Some(pattern) = filter {
        if reports.iter().all(|r| r.cases.is_empty()) {
            return Err(UsageError::value(
                "--filter",
                pattern,
                "matches no case (`gmem conformance` lists them; `*` matches any run of \
                 characters; differential scripts are diff/<script>)",
            )
            .into());
        }
    }
    if args.json {
        let sum = |f: fn(&BackendReport) -> usize| reports.iter().map(f).sum::<usize>();
        let out = json!({
            "version": crate::JSON_VERSION,
            "passed": sum(BackendReport::passed),
            "failed": sum(BackendReport::failed),
            "skipped": sum(BackendReport::skipped),
            "backends": reports.iter().map(to_json).collect::<Vec<Value>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_table(&reports);
    }
    let failed: usize = reports.iter().map(BackendReport::failed).sum();
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn to_json(r: &BackendReport) -> Value {
    json!({
        "backend": r.backend,
        "passed": r.passed(),
        "failed": r.failed(),
        "skipped": r.skipped(),
        "cases": r.cases.iter().map(|c| json!({
            "name": c.name,
            "result": c.outcome.label(),
            "reason": c.outcome.reason(),
        })).collect::<Vec<_>>(),
    })
}

/// A reason that repeats within a backend is printed once, under the table, and its rows
/// reference it (`see [1]`).
fn print_table(reports: &[BackendReport]) {
    let name_w = reports
        .iter()
        .flat_map(|r| r.cases.iter().map(|c| c.name.len()))
        .max()
        .unwrap_or(4)
        .max(4);
    // (backend, reason) of every reason on two rows or more, in first-seen order.
    let mut notes: Vec<(&str, String)> = Vec::new();
    for r in reports {
        for c in &r.cases {
            let reason = c.outcome.reason();
            let key = (r.backend.as_str(), reason.to_string());
            if reason.is_empty() || notes.contains(&key) {
                continue;
            }
            let n = r
                .cases
                .iter()
                .filter(|d| d.outcome.reason() == reason)
                .count();
            if n > 1 {
                notes.push(key);
            }
        }
    }
    println!(
        "{:<12} {:<name_w$} {:<6} reason",
        "backend", "case", "result"
    );
    for r in reports {
        for c in &r.cases {
            let reason = c.outcome.reason();
            let note = notes
                .iter()
                .position(|(b, n)| *b == r.backend.as_str() && n == reason);
            let reason = match note {
                Some(i) => format!("see [{}]", i + 1),
                None => reason.to_string(),
            };
            println!(
                "{:<12} {:<name_w$} {:<6} {reason}",
                r.backend,
                c.name,
                c.outcome.label(),
            );
        }
    }
    let sum = |f: fn(&BackendReport) -> usize| reports.iter().map(f).sum::<usize>();
    println!(
        "{} passed, {} failed, {} skipped",
        sum(BackendReport::passed),
        sum(BackendReport::failed),
        sum(BackendReport::skipped)
    );
    if !notes.is_empty() {
        println!();
        for (i, (backend, reason)) in notes.iter().enumerate() {
            println!("[{}] {backend}: {reason}", i + 1);
        }
    }
}
