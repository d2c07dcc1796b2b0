//! `gmem conformance`: the conformance suite on one backend or both, and the differential
//! check between them.
//!
//! Three output formats (`--format`):
//! - `text`: a table (backend, case, result, reason) and the closing line
//!   `N passed, N failed, N skipped`, then each reason shared by several rows of a backend
//!   once (the rows say `see [N]`);
//! - `ktap`: KTAP version 1 as kselftest prints it: `KTAP version 1`, `#` diagnostics (host,
//!   kernel, capabilities), the plan `1..N`, then one `ok N backend/case`, `not ok N
//!   backend/case` or `ok N backend/case # SKIP reason` line per case, printed as the case
//!   ends, each skip with its own reason (KTAP readers do not follow references), and
//!   `# Totals: pass:P fail:F xfail:0 xpass:0 skip:S error:0`;
//! - `json` (also `--json`): one object `{"version", "exit_status", "passed", "failed",
//!   "skipped", "notes", "backends": [...]}` whatever the backend selection (docs/json.md).
//!
//! The exit status is kselftest's ([`KselftestExit`]): 0 when every case ran and passed (skips
//! allowed when something passed), 1 when any case failed, 4 when everything was skipped. A
//! `--filter` that selects no case is a usage error (status 2) naming the filter.

use std::process::ExitCode;

use gmem_check::conformance::runner::{
    check_filter, count_cases, run_cases_observed, unavailable, BackendReport, CaseReport,
    KselftestExit, Summary,
};
use gmem_check::conformance::{differential, Ctx};
use gmem_check::host_report;
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
    /// Output format: `text` (a table), `ktap` (KTAP version 1, as kselftest), `json`.
    #[arg(long, value_enum, default_value = "text")]
    format: FormatArg,
    /// Print JSON instead of the table (the same as `--format json`; not with another
    /// `--format`).
    #[arg(long, conflicts_with = "format")]
    json: bool,
}

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// A table and the totals.
    Text,
    /// KTAP version 1 (kselftest's output).
    Ktap,
    /// One JSON object (docs/json.md).
    Json,
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

/// A `--vm-type` that is neither a known name nor a number.
#[derive(Debug, thiserror::Error)]
#[error("bad VM type {0:?}: expected default, sw_protected (KVM_X86_SW_PROTECTED_VM) or a number")]
pub struct BadVmType(pub String);

/// Parses `--vm-type`: a name or a number.
pub fn parse_vm_type(s: &str) -> Result<u64, BadVmType> {
    if let Some((_, v)) = VM_TYPES.iter().find(|(n, _)| n.eq_ignore_ascii_case(s)) {
        return Ok(*v);
    }
    s.parse::<u64>().map_err(|_| BadVmType(s.to_string()))
}

pub fn run(args: &Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let filter = args.filter.as_deref();
    if let Err(e) = check_filter(filter) {
        return Err(UsageError::value(
            "--filter",
            e.filter,
            "matches no case (`gmem conformance` lists them; `*` matches any run of \
             characters; differential scripts are diff/<script>)",
        )
        .into());
    }
    let format = if args.json {
        FormatArg::Json
    } else {
        args.format
    };
    // What will run, known before anything runs: KTAP's plan comes first.
    let planned = match args.backend {
        BackendArg::Emulated | BackendArg::Kernel => count_cases(filter),
        BackendArg::All => 2 * count_cases(filter) + differential::count_scripts(filter),
    };
    // A filter may select cases only where this selection does not run them (a differential
    // script with `--backend emulated`).
    if let (Some(pattern), 0) = (filter, planned) {
        return Err(UsageError::value(
            "--filter",
            pattern,
            "matches no case of the backends selected (differential scripts, \
             diff/<script>, run with --backend all)",
        )
        .into());
    }
    let mut ktap = (format == FormatArg::Ktap).then(|| {
        print_ktap_header(planned, vm_type_note(args));
        KtapLines::default()
    });
    let mut on_case = |backend: &str, case: &CaseReport| {
        if let Some(k) = &mut ktap {
            k.print(backend, case);
        }
    };
    let mut reports = Vec::new();
    if args.backend != BackendArg::Kernel {
        let emulated = match args.guest {
            GuestArg::Vcpu => Ctx::emulated_with_vcpu()?,
            GuestArg::Auto | GuestArg::Internal => Ctx::emulated(),
        };
        reports.push(run_cases_observed(&emulated, filter, &mut on_case));
    }
    if args.backend != BackendArg::Emulated {
        let kernel = match args.guest {
            GuestArg::Internal => Ctx::kernel(args.vm_type).map_err(|e| e.to_string()),
            GuestArg::Auto | GuestArg::Vcpu => Ctx::kernel_with_vcpu(args.vm_type)
                .map_err(|e| e.to_string())
                .and_then(|(ctx, no_vcpu)| match no_vcpu {
                    Some(why) if args.guest == GuestArg::Vcpu => Err(why.to_string()),
                    Some(why) => {
                        eprintln!("gmem conformance: {why}; cases needing a guest skip");
                        Ok(ctx)
                    }
                    None => Ok(ctx),
                }),
        };
        match kernel {
            Ok(k) => {
                reports.push(run_cases_observed(&k, filter, &mut on_case));
                if args.backend == BackendArg::All {
                    reports.push(differential::run_observed(
                        &Ctx::emulated(),
                        &k,
                        filter,
                        &mut on_case,
                    ));
                }
            }
            Err(why) => {
                if let Err(access) = kvm_access::check(&kvm_access::kvm_device()) {
                    eprintln!("gmem conformance: {access}");
                }
                let mut skipped = vec![unavailable("kernel", &why, filter)];
                if args.backend == BackendArg::All {
                    skipped.push(differential::unavailable(&why, filter));
                }
                for r in &skipped {
                    for c in &r.cases {
                        on_case(&r.backend, c);
                    }
                }
                reports.extend(skipped);
            }
        }
    }
    let summary = Summary::of(&reports);
    let exit = summary.kselftest_exit();
    let notes = shared_reasons(&reports);
    match format {
        FormatArg::Json => println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&reports, &notes, summary, exit))?
        ),
        FormatArg::Ktap => println!(
            "# Totals: pass:{} fail:{} xfail:0 xpass:0 skip:{} error:0",
            summary.passed, summary.failed, summary.skipped
        ),
        FormatArg::Text => print_table(&reports, &notes, summary),
    }
    Ok(exit.into())
}

/// The kernel VM type, for the KTAP diagnostics, when the kernel backend runs.
fn vm_type_note(args: &Args) -> Option<String> {
    (args.backend != BackendArg::Emulated).then(|| {
        format!(
            "kernel backend VM type: {} ({})",
            BackendArg::vm_type_name(args.vm_type),
            args.vm_type
        )
    })
}

/// A reason shared by several rows of one backend: printed once, referenced as `see [N]`.
#[derive(Debug, PartialEq, Eq)]
struct Note<'a> {
    backend: &'a str,
    reason: &'a str,
}

/// The reasons that repeat within a backend, in first-seen order.
fn shared_reasons(reports: &[BackendReport]) -> Vec<Note<'_>> {
    let mut notes: Vec<Note<'_>> = Vec::new();
    for r in reports {
        for c in &r.cases {
            let note = Note {
                backend: &r.backend,
                reason: c.outcome.reason(),
            };
            if note.reason.is_empty() || notes.contains(&note) {
                continue;
            }
            let n = r
                .cases
                .iter()
                .filter(|d| d.outcome.reason() == note.reason)
                .count();
            if n > 1 {
                notes.push(note);
            }
        }
    }
    notes
}

/// `see [N]` for a shared reason, else the reason itself.
fn reason_or_ref(notes: &[Note<'_>], backend: &str, reason: &str) -> String {
    match notes
        .iter()
        .position(|n| n.backend == backend && n.reason == reason)
    {
        Some(i) => format!("see [{}]", i + 1),
        None => reason.to_string(),
    }
}

fn to_json(
    reports: &[BackendReport],
    notes: &[Note<'_>],
    summary: Summary,
    exit: KselftestExit,
) -> Value {
    json!({
        "version": crate::JSON_VERSION,
        "exit_status": exit.code(),
        "passed": summary.passed,
        "failed": summary.failed,
        "skipped": summary.skipped,
        "notes": notes.iter().enumerate().map(|(i, n)| json!({
            "ref": format!("[{}]", i + 1),
            "backend": n.backend,
            "reason": n.reason,
        })).collect::<Vec<_>>(),
        "backends": reports.iter().map(|r| json!({
            "backend": r.backend,
            "passed": r.passed(),
            "failed": r.failed(),
            "skipped": r.skipped(),
            "cases": r.cases.iter().map(|c| json!({
                "name": c.name,
                "result": c.outcome.label(),
                "reason": c.outcome.reason(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<Value>>(),
    })
}

/// KTAP version 1, as kselftest prints it (Documentation/dev-tools/ktap.rst): the header, the
/// host diagnostics and the plan, before any case runs.
fn print_ktap_header(planned: usize, vm_type: Option<String>) {
    println!("KTAP version 1");
    for line in host_diagnostics() {
        println!("# {line}");
    }
    if let Some(v) = vm_type {
        println!("# {v}");
    }
    println!("1..{planned}");
    flush();
}

/// The KTAP result lines, numbered, printed (and flushed) as each case ends.
#[derive(Debug, Default)]
struct KtapLines {
    n: usize,
}

impl KtapLines {
    fn print(&mut self, backend: &str, case: &CaseReport) {
        self.n += 1;
        let n = self.n;
        let name = format!("{backend}/{}", case.name);
        let reason = one_line(case.outcome.reason());
        match case.outcome.label() {
            "pass" => println!("ok {n} {name}"),
            "skip" => println!("ok {n} {name} # SKIP {reason}"),
            _ => {
                println!("# {name}: {reason}");
                println!("not ok {n} {name}");
            }
        }
        flush();
    }
}

/// Flushes stdout so that a harness reading the pipe sees each line as it is printed.
fn flush() {
    use std::io::Write;
    // A closed pipe shows at the next println, which reports it.
    let _ = std::io::stdout().flush();
}

/// A reason on one line (KTAP lines cannot carry a newline).
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The host, its kernel and the capabilities the suite depends on, as `#` diagnostic lines.
fn host_diagnostics() -> Vec<String> {
    let h = host_report::collect();
    let mut out = vec![format!(
        "host: kernel {}, /dev/kvm {}",
        h.kernel_release.as_deref().unwrap_or("unknown"),
        match (h.kvm.dev_kvm, h.kvm.flavour) {
            (false, _) => "missing".to_string(),
            (true, Some(f)) => format!("present ({})", f.name()),
            (true, None) => "present".to_string(),
        }
    )];
    if h.kvm.dev_kvm {
        let caps: Vec<String> = h
            .kvm
            .capabilities
            .iter()
            .map(|c| format!("{}={}", c.name, c.value))
            .chain(
                h.kvm
                    .conversion
                    .iter()
                    .map(|c| format!("{}({})={}", c.number, c.revision.name(), c.value)),
            )
            .collect();
        out.push(format!("capabilities: {}", caps.join(" ")));
        out.push(match &h.kvm.conversion_support {
            Ok(()) => "kernel conversion: in place (KVM_SET_MEMORY_ATTRIBUTES2)".to_string(),
            Err(why) => format!("kernel conversion: {}", one_line(&why.to_string())),
        });
    }
    out
}

fn print_table(reports: &[BackendReport], notes: &[Note<'_>], summary: Summary) {
    let name_w = reports
        .iter()
        .flat_map(|r| r.cases.iter().map(|c| c.name.len()))
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<12} {:<name_w$} {:<6} reason",
        "backend", "case", "result"
    );
    for r in reports {
        for c in &r.cases {
            println!(
                "{:<12} {:<name_w$} {:<6} {}",
                r.backend,
                c.name,
                c.outcome.label(),
                reason_or_ref(notes, &r.backend, c.outcome.reason()),
            );
        }
    }
    println!("{summary}");
    if !notes.is_empty() {
        println!();
        for (i, n) in notes.iter().enumerate() {
            println!("[{}] {}: {}", i + 1, n.backend, n.reason);
        }
    }
}
