//! `gmem run`: boot vCPUs on gmem memory and run the private_mem_conversions workload.

use std::process::ExitCode;

use clap::ValueEnum;
use serde_json::{json, Value};

use gmem::BackendKind;
use gmem_check::workload::{self, Config, Report, TARGET_RATIO};
use gmem_vmm::backing::BackingKind;

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

/// `gmem run` options.
#[derive(Debug, clap::Args)]
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
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn to_json(r: &Report) -> Value {
    json!({
        "backend": r.backend(),
        "model": r.model(),
        "platform": r.platform.to_string(),
        "content_checks": r.content_checks,
        "mode": r.mode.name(),
        "request_path": r.request_path.to_string(),
        "hypercall_probe": r.hypercall_check.to_string(),
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
        "samples": r.samples,
        "elapsed_us": r.elapsed_us,
    })
}

fn print_summary(r: &Report) {
    println!(
        "gmem run: private_mem_conversions on {} vCPU(s), {} MiB, {} model, {} backend, {} \
         memslot(s)",
        r.vcpus,
        r.mem_mib,
        r.model(),
        r.backend(),
        r.memslots
    );
    println!("  platform              {}", r.platform);
    println!("  mode                  {}", r.mode);
    println!("  conversion requests   {}", r.request_path);
    println!("  MAP_GPA_RANGE probe   {}", r.hypercall_check);
    println!("  exits                 {}", r.exits);
    println!(
        "  conversions           {} to private, {} to shared ({} pages)",
        r.conversions_to_private, r.conversions_to_shared, r.pages_converted
    );
    println!("  punch-hole requests   {}", r.punches);
    println!(
        "  verified bytes        {} (host {}, guest {}); {} private-page {}",
        r.host_verified_bytes + r.guest_verified_bytes,
        r.host_verified_bytes,
        r.guest_verified_bytes,
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
    match (r.exit_round_trip_us, r.ratio) {
        (Some(exit), Some(ratio)) => {
            println!("  round trips (median of {} samples, same run)", r.samples);
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
            "  4 KiB conversion      {:.2} µs (host-driven; no exit round trip without /dev/kvm)",
            r.conversion_4k_us
        ),
    }
}

/// The memory `--backend` and `--model` select.
fn memory(args: &Args) -> Result<BackingKind, Box<dyn std::error::Error>> {
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
        return Err(format!(
            "--backend {backend} with --model {memory}: the two-backing model is two memfds, \
             not a guest_memfd; use --backend emulated (the default)"
        )
        .into());
    }
    Ok(memory)
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
    };
    let report = workload::run(&config)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&report))?);
    } else {
        if report.mode != workload::Mode::Kvm {
            println!("no /dev/kvm: running the same workload with host-driven conversions");
        }
        print_summary(&report);
    }
    Ok(if report.mismatches == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
