//! `gmem run`: boot vCPUs on gmem memory and run the private_mem_conversions workload.

use std::process::ExitCode;

use clap::ValueEnum;
use serde_json::{json, Value};

use gmem::platform::{ContentRule, Direction};
use gmem::BackendKind;
use gmem_check::workload::{self, Config, HypercallCheck, Mode, Report, TARGET_RATIO};
use gmem_vmm::backing::BackingKind;

use crate::kvm_access::{self, KvmProblem};
use crate::progress::Ticker;

use crate::usage::{in_range, UsageError};

/// Backends `gmem run` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// gmem's userspace emulation (converts on any Linux).
    Emulated,
    /// The kernel's guest_memfd (needs the in-place conversion capability).
    Kernel,
}

/// Conversion models `gmem run` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Model {
    /// gmem's in-place guest_memfd (on --backend).
    #[value(name = "in-place")]
    InPlace,
    /// A private store and a shared memfd, the inactive copy discarded (content zeroed).
    #[value(name = "two-backing")]
    TwoBacking,
    /// The same, with the content copied across before the discard (content preserved).
    #[value(name = "two-backing+copy")]
    TwoBackingCopy,
}

/// `gmem run` options. Negative numbers are taken as values, so `--samples -1` is refused
/// as an invalid number rather than as an unknown flag.
#[derive(Debug, clap::Args)]
#[command(allow_negative_numbers = true)]
pub struct Args {
    /// vCPUs, one 2 MiB + 4 KiB window each.
    #[arg(long, default_value_t = 2)]
    vcpus: usize,
    /// gmem memory in MiB (4 MiB per vCPU at least).
    #[arg(long = "mem-mib", default_value_t = 64)]
    mem_mib: u64,
    /// Backend of the gmem file.
    #[arg(long, value_enum, default_value_t = Backend::Emulated)]
    backend: Backend,
    /// Memslots the file is split into (conversions are split across them).
    #[arg(long, default_value_t = 1)]
    memslots: u64,
    /// Samples per round-trip measurement.
    #[arg(long, default_value_t = 400)]
    samples: u64,
    /// Stop the vCPUs with an error after this many seconds.
    #[arg(long = "timeout-secs", default_value_t = 120)]
    timeout_secs: u64,
    /// Platform model of the emulated file: sw, snp, tdx or pkvm. The content checks across
    /// conversions follow its rules (preserved, zeroed or scrambled).
    #[arg(long, default_value = "sw")]
    platform: gmem::platform::PlatformKind,
    /// Conversion model: gmem's in-place file, or the two-backing model every production
    /// VMM ships (emulated backend and --platform sw only; its content rule is its own).
    #[arg(long, value_enum, default_value_t = Model::InPlace)]
    model: Model,
    /// Print one JSON object (docs/json.md); no progress line.
    #[arg(long)]
    json: bool,
    /// Also print how guests request conversions and what the MAP_GPA_RANGE hypercall probe
    /// found.
    #[arg(long, short)]
    verbose: bool,
    /// Draw the file's memory over time (shared and private pages, every conversion, the
    /// memslots) to FILE.svg, as `gmem map` draws a trace (emulated backend, in-place model).
    #[arg(long, value_name = "FILE.svg")]
    map: Option<std::path::PathBuf>,
    /// Folios of the emulated file: 4k, or 2m (2 MiB shmem THP where the host offers it:
    /// `gmem probe` says; emulated backend, in-place model, --mem-mib even).
    #[arg(long = "folio-size", value_name = "SIZE", default_value = "4k", value_parser = parse_folio_size)]
    folio_size: gmem::FolioSize,
}

/// `4k` or `2m`.
pub(crate) fn parse_folio_size(s: &str) -> Result<gmem::FolioSize, String> {
    gmem::FolioSize::from_name(s).ok_or_else(|| format!("{s:?}: allowed 4k or 2m"))
}

/// The content rule of each direction, as data: `preserved`, `zeroed` or `scrambled`.
fn content_rules(args: &Args) -> (ContentRule, ContentRule) {
    match args.model {
        Model::InPlace => (
            args.platform.content_rule(Direction::ToPrivate),
            args.platform.content_rule(Direction::ToShared),
        ),
        Model::TwoBacking => (ContentRule::Zeroed, ContentRule::Zeroed),
        Model::TwoBackingCopy => (ContentRule::Preserved, ContentRule::Preserved),
    }
}

fn rule_name(r: ContentRule) -> &'static str {
    match r {
        ContentRule::Preserved => "preserved",
        ContentRule::Zeroed => "zeroed",
        ContentRule::Scrambled => "scrambled",
    }
}

/// Samples behind each median, per vCPU (every vCPU runs the same timing loop).
fn samples_per_vcpu(r: &Report) -> usize {
    r.samples / r.vcpus.max(1)
}

/// Whether the MAP_GPA_RANGE hypercall reached userspace (`None`: not probed).
fn hypercall_reaches_userspace(r: &Report) -> Option<bool> {
    match r.hypercall_check {
        HypercallCheck::NotRun | HypercallCheck::NoKvm => None,
        ref c => Some(c.reaches_userspace()),
    }
}

/// The report as one JSON object (docs/json.md): data in the fields, prose under `notes`.
fn to_json(args: &Args, r: &Report, kvm: Option<&KvmProblem>) -> Value {
    let (to_private, to_shared) = content_rules(args);
    json!({
        "version": crate::JSON_VERSION,
        "backend": r.backend(),
        "model": r.model(),
        "platform": (args.model == Model::InPlace).then(|| args.platform.name()),
        "folio_size": args.folio_size.name(),
        "content_rules": { "to_private": rule_name(to_private), "to_shared": rule_name(to_shared) },
        "content_checks": r.content_checks,
        "mode": r.mode.name(),
        "request_path": if r.mode == Mode::Kvm { Some("port") } else { None },
        "hypercall_reaches_userspace": hypercall_reaches_userspace(r),
        "kvm_problem": kvm.map(KvmProblem::kind),
        "vcpus": r.vcpus,
        "mem_mib": r.mem_mib,
        "memslots": r.memslots,
        "exits": r.exits,
        "conversions_to_private": r.conversions_to_private,
        "conversions_to_shared": r.conversions_to_shared,
        "pages_converted": r.pages_converted,
        "punches": r.punches,
        "host_verified_bytes": r.host_verified_bytes,
        "guest_verified_bytes": r.guest_verified_bytes,
        "verified_bytes": r.host_verified_bytes + r.guest_verified_bytes,
        "private_probes": r.private_probes,
        "mismatches": r.mismatches,
        "mismatch_details": r.mismatch_details,
        "exit_round_trip_us": r.exit_round_trip_us,
        "conversion_round_trip_us": r.conversion_round_trip_us,
        "conversion_4k_us": r.conversion_4k_us,
        "ratio": r.ratio,
        "target_ratio": TARGET_RATIO,
        "ratio_ok": r.ratio.map(|x| x <= TARGET_RATIO),
        "samples_per_vcpu": samples_per_vcpu(r),
        "samples_total": r.samples,
        "elapsed_us": r.elapsed_us,
        "notes": {
            "platform": r.platform.to_string(),
            "request_path": r.request_path.to_string(),
            "hypercall_probe": r.hypercall_check.to_string(),
            "kvm_problem": kvm.map(ToString::to_string),
        },
    })
}

/// Bytes in MiB (or KiB below one MiB).
fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", b / f64::from(1u32 << 20))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

fn plural(n: impl Into<u64>, what: &str) -> String {
    let n = n.into();
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn print_summary(args: &Args, r: &Report) {
    let (to_private, to_shared) = content_rules(args);
    println!(
        "gmem run: private_mem_conversions on {}, {} MiB, {} model{}, {}",
        plural(r.vcpus as u64, "vCPU"),
        r.mem_mib,
        r.model(),
        if args.model == Model::InPlace {
            format!(" on the {} backend", r.backend())
        } else {
            String::new()
        },
        plural(r.memslots, "memslot")
    );
    println!(
        "  platform              {} (content to private: {}, to shared: {})",
        if args.model == Model::InPlace {
            args.platform.name()
        } else {
            "none"
        },
        rule_name(to_private),
        rule_name(to_shared)
    );
    println!(
        "  mode                  {}",
        if r.mode == Mode::Kvm {
            "kvm (real vCPUs, conversions requested by the guests)"
        } else {
            "host-driven (no usable /dev/kvm: the host calls the conversions)"
        }
    );
    if args.verbose {
        println!("  conversion requests   {}", r.request_path);
        println!("  MAP_GPA_RANGE probe   {}", r.hypercall_check);
    }
    println!("  exits                 {}", r.exits);
    println!(
        "  conversions           {} to private, {} to shared ({} pages, {})",
        r.conversions_to_private,
        r.conversions_to_shared,
        r.pages_converted,
        human(r.pages_converted * gmem::PAGE_SIZE)
    );
    println!("  punch-hole requests   {}", r.punches);
    println!(
        "  verified              {} (host {}, guest {}); {} private-page {}",
        human(r.host_verified_bytes + r.guest_verified_bytes),
        human(r.host_verified_bytes),
        human(r.guest_verified_bytes),
        r.private_probes,
        if matches!(r.memory, BackingKind::InPlace(_)) {
            "SIGBUS probes"
        } else {
            "checks (refused to the host, shared copy discarded)"
        }
    );
    println!(
        "  content-rule checks   {} (across conversions and punch-holes)",
        r.content_checks
    );
    println!("  mismatches            {}", r.mismatches);
    println!(
        "  wall time             {:.1} ms (the whole workload, not the probe)",
        r.elapsed_us / 1000.0
    );
    for m in &r.mismatch_details {
        println!("    {m}");
    }
    let samples = if r.vcpus > 1 {
        format!(
            "median of {} per vCPU, {} in all",
            plural(samples_per_vcpu(r) as u64, "sample"),
            r.samples
        )
    } else {
        format!("median of {}", plural(r.samples as u64, "sample"))
    };
    match (r.exit_round_trip_us, r.ratio) {
        (Some(exit), Some(ratio)) => {
            println!("  round trips ({samples}, same run)");
            println!("    bare exit           {exit:8.2} µs   (guest out -> host -> re-enter)");
            println!(
                "    4 KiB conversion    {:8.2} µs   (host call alone)",
                r.conversion_4k_us
            );
            println!(
                "    conversion          {:8.2} µs   (exit -> convert 4 KiB -> re-enter)",
                r.conversion_round_trip_us
            );
            println!(
                "    ratio               {ratio:8.2}      conversion / (exit + 4 KiB conversion), \
                 target <= {TARGET_RATIO}: {}",
                if ratio <= TARGET_RATIO {
                    "met"
                } else {
                    "MISSED"
                }
            );
        }
        _ => println!(
            "  4 KiB conversion      {:.2} µs ({samples}; host-driven, so no exit round trip)",
            r.conversion_4k_us
        ),
    }
    if !args.verbose && r.mode == Mode::Kvm {
        println!("  (--verbose: how guests request conversions, and the MAP_GPA_RANGE probe)");
    }
}

/// Most seconds `--timeout-secs` accepts (a day).
const MAX_TIMEOUT_SECS: u64 = 86_400;

/// Checks every argument before any work starts; the message names the flag, the value and
/// what is allowed.
fn validate(args: &Args, config: &Config) -> Result<(), Box<dyn std::error::Error>> {
    let max_vcpus = gmem_vmm::guest::MAX_VCPUS as u64;
    in_range("--vcpus", args.vcpus as u64, 1, max_vcpus, "")?;
    let max_mib = gmem_vmm::guest::MAX_DATA_SIZE >> 20;
    let need = 4 * args.vcpus as u64;
    in_range(
        "--mem-mib",
        args.mem_mib,
        need,
        max_mib,
        &format!("{} vCPU(s) need 4 MiB each", args.vcpus),
    )?;
    if args.memslots == 0 || args.mem_mib % (2 * args.memslots) != 0 {
        return Err(UsageError::value(
            "--memslots",
            args.memslots,
            format!(
                "must split --mem-mib {} into whole 2 MiB pieces (a divisor of {})",
                args.mem_mib,
                args.mem_mib / 2
            ),
        )
        .into());
    }
    in_range("--timeout-secs", args.timeout_secs, 1, MAX_TIMEOUT_SECS, "")?;
    // Options that cannot go together (a platform model on the kernel backend, or with the
    // two-backing model) are usage errors, like the others.
    if let Err(workload::WorkloadError::Config(why)) = config.validate() {
        return Err(UsageError::Conflict(why).into());
    }
    let max = workload::max_samples(config)?;
    in_range(
        "--samples",
        args.samples,
        1,
        max,
        &format!(
            "the timing loop is unrolled in each vCPU's guest program, whose code area of {} \
             KiB holds at most {max}",
            gmem_vmm::guest::CODE_SIZE >> 10
        ),
    )?;
    Ok(())
}

/// The memory `--backend` and `--model` select; the two-backing layout is two memfds, not a
/// guest_memfd, so it exists on the emulated side only.
fn memory(args: &Args) -> Result<BackingKind, UsageError> {
    let backend = match args.backend {
        Backend::Emulated => BackendKind::Emulated,
        Backend::Kernel => BackendKind::Kernel,
    };
    let preserve_content = match args.model {
        Model::InPlace => return Ok(BackingKind::InPlace(backend)),
        Model::TwoBacking => false,
        Model::TwoBackingCopy => true,
    };
    let memory = BackingKind::TwoBacking { preserve_content };
    if backend != BackendKind::Emulated {
        return Err(UsageError::value(
            "--backend",
            backend,
            format!(
                "--model {memory} is two memfds, not a guest_memfd; use --backend emulated \
                 (the default)"
            ),
        ));
    }
    Ok(memory)
}

/// `--map`: the file's conversions as `gmem map` draws them; the memslots where the run had
/// a VM (host-driven runs bind none).
fn write_map(
    path: &std::path::Path,
    config: &Config,
    report: &Report,
    log: &gmem::ConversionLog,
) -> Result<(), UsageError> {
    let size = config.mem_mib << 20;
    let piece = size / config.memslots.max(1);
    let memslots = if report.mode == Mode::Kvm {
        (0..config.memslots)
            .map(|i| crate::map::Binding {
                slot: i,
                gpa: gmem_vmm::guest::DATA_GPA + i * piece,
                size: piece,
                offset: i * piece,
            })
            .collect()
    } else {
        Vec::new()
    };
    let (records, dropped) = log.records();
    let mut label = format!(
        "gmem run: {} vCPU(s), {} MiB, platform {}",
        config.vcpus,
        config.mem_mib,
        config.platform.name()
    );
    if dropped > 0 {
        label.push_str(&format!(" (the last {dropped} conversions not recorded)"));
    }
    let file = crate::map::from_log(label, size, memslots, &records);
    let title = format!("gmem run --map ({:?} mode)", report.mode);
    std::fs::write(path, crate::map::render(&[file], &title)).map_err(|source| {
        UsageError::Unwritable {
            flag: "--map",
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Runs `gmem run`.
pub fn run(args: &Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let config = Config {
        vcpus: args.vcpus,
        mem_mib: args.mem_mib,
        memslots: args.memslots,
        samples: args.samples,
        timeout: std::time::Duration::from_secs(args.timeout_secs),
        platform: args.platform,
        expect_rules_of: None,
        check_hypercall: true,
        memory: memory(args)?,
        conversion_log: args.map.as_ref().map(|_| gmem::ConversionLog::default()),
        folio_size: args.folio_size,
    };
    if args.map.is_some() && config.memory != BackingKind::InPlace(BackendKind::Emulated) {
        return Err(UsageError::value(
            "--map",
            "",
            "draws the emulated backend's in-place file only (--backend emulated --model in-place)",
        )
        .into());
    }
    validate(args, &config)?;
    let ticker = (!args.json).then(|| {
        Ticker::start(format!(
            "gmem run: {} vCPU(s), {} MiB",
            args.vcpus, args.mem_mib
        ))
    });
    let result = workload::run(&config);
    drop(ticker);
    let report = match result {
        Ok(r) => r,
        // The kernel backend could not be opened: say precisely why, if it is access.
        Err(e) if args.backend == Backend::Kernel => {
            return Err(match kvm_access::check(&kvm_access::kvm_device()) {
                Err(why) => format!("{e}\n  {why}").into(),
                Ok(()) => e.into(),
            })
        }
        Err(e) => return Err(e.into()),
    };
    if let (Some(path), Some(log)) = (&args.map, &config.conversion_log) {
        write_map(path, &config, &report, log)?;
    }
    // Host-driven: the workload found no usable /dev/kvm; say why, precisely.
    let kvm = (report.mode != Mode::Kvm)
        .then(|| kvm_access::check(&kvm_access::kvm_device()).err())
        .flatten();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(args, &report, kvm.as_ref()))?
        );
    } else {
        if report.mode != Mode::Kvm {
            match &kvm {
                Some(why) => println!("{why}"),
                None => println!("/dev/kvm unusable: {}", report.request_path),
            }
            println!("running the same workload with host-driven conversions\n");
        }
        print_summary(args, &report);
    }
    Ok(if report.mismatches == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
