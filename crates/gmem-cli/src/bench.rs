//! `gmem bench`: in-place conversion against the two-backing model (and the kernel backend
//! against the emulated one), side by side in one run. See `gmem::comparison`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use gmem::comparison::{self, Measurement, Options, Report, Unit};
use serde_json::{json, Value};

use crate::usage::UsageError;

/// Arguments of `gmem bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Fewer repetitions and no 1 GiB conversion (about a minute).
    #[arg(long)]
    quick: bool,
    /// Print `{"results": [{"name", "median_us", "baseline", "baseline_median_us",
    /// "ratio"}]}` (plus `unit`, `group`, `samples`; and `targets`, `skipped`).
    #[arg(long)]
    json: bool,
    /// Also write an SVG of conversion latency against range size (log-log) to this file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

/// A target of the issue: the line it reads, and the largest ratio that meets it.
struct Target {
    what: &'static str,
    name: &'static str,
    baseline: &'static str,
    max_ratio: f64,
}

/// The floor line of a round-trip target (the same round trip with zaps and re-faults only):
/// the smallest ratio any in-place implementation could reach on this host.
fn floor_name(t: &Target) -> Option<String> {
    t.name
        .strip_prefix("in-place round trip ")
        .map(|rest| format!("floor round trip {rest} (zaps + re-faults, no conversion)"))
}

/// One target's outcome.
struct TargetOutcome {
    what: &'static str,
    ratio: f64,
    met: bool,
    /// The floor's ratio against the same baseline, for round trips.
    floor: Option<f64>,
}

const TARGETS: [Target; 8] = [
    Target {
        what: "content-preserving 2 MiB round trip, every page touched: in-place >= 10x faster",
        name: "in-place round trip 2MiB, every page touched",
        baseline: "two-backing preserving",
        max_ratio: 0.1,
    },
    Target {
        what: "content-preserving 2 MiB round trip, first page touched: in-place >= 10x faster",
        name: "in-place round trip 2MiB, first page touched",
        baseline: "two-backing preserving",
        max_ratio: 0.1,
    },
    Target {
        what: "content-preserving 4 KiB round trip, every page touched: in-place >= 2x faster",
        name: "in-place round trip 4KiB, every page touched",
        baseline: "two-backing preserving",
        max_ratio: 0.5,
    },
    Target {
        what: "content-preserving 4 KiB round trip, first page touched: in-place >= 2x faster",
        name: "in-place round trip 4KiB, first page touched",
        baseline: "two-backing preserving",
        max_ratio: 0.5,
    },
    Target {
        what: "footprint, 2 MiB fragments: in-place <= two-backing (destructive)",
        name: "in-place footprint 1GiB, half shared in 2MiB fragments",
        baseline: "two-backing destructive",
        max_ratio: 1.0,
    },
    Target {
        what: "footprint, 2 MiB fragments: in-place <= two-backing (preserving)",
        name: "in-place footprint 1GiB, half shared in 2MiB fragments",
        baseline: "two-backing preserving",
        max_ratio: 1.0,
    },
    Target {
        what: "footprint, 4 KiB fragments: in-place <= two-backing (destructive)",
        name: "in-place footprint 1GiB, half shared in 4KiB fragments",
        baseline: "two-backing destructive",
        max_ratio: 1.0,
    },
    Target {
        what: "footprint, 4 KiB fragments: in-place <= two-backing (preserving)",
        name: "in-place footprint 1GiB, half shared in 4KiB fragments",
        baseline: "two-backing preserving",
        max_ratio: 1.0,
    },
];

/// The outcome of every target found in the report.
fn targets(r: &Report) -> Vec<TargetOutcome> {
    let ratio_of = |name: &str, baseline: &str| {
        r.lines
            .iter()
            .find(|m| m.figure.name == name && m.figure.baseline == baseline)
            .map(|m| m.figure.ratio())
    };
    TARGETS
        .iter()
        .filter_map(|t| {
            ratio_of(t.name, t.baseline).map(|ratio| TargetOutcome {
                what: t.what,
                ratio,
                met: ratio <= t.max_ratio,
                floor: floor_name(t).and_then(|f| ratio_of(&f, t.baseline)),
            })
        })
        .collect()
}

fn line_json(m: &Measurement) -> Value {
    let f = &m.figure;
    json!({
        "name": f.name,
        "median_us": f.median_us,
        "baseline": f.baseline,
        "baseline_median_us": f.baseline_median_us,
        "ratio": Some(f.ratio()).filter(|r| r.is_finite()),
        "unit": m.unit.name(),
        "group": m.group,
        "samples": m.samples,
    })
}

fn print_text(r: &Report, quick: bool) {
    println!(
        "gmem bench{}: medians, models interleaved in each repetition; ratio = figure / \
         baseline (< 1: the figure is faster or smaller)",
        if quick { " --quick" } else { "" }
    );
    let mut group = "";
    for m in &r.lines {
        if m.group != group {
            group = m.group;
            println!();
            println!(
                "[{group}] {:<58} {:>14} {:<34} {:>14} {:>7} {:>6}",
                "figure", "value", "baseline", "value", "ratio", "n"
            );
        }
        let f = &m.figure;
        let unit = m.unit.name();
        let ratio = f.ratio();
        let ratio = if ratio.is_finite() {
            format!("{ratio:.3}")
        } else {
            "-".to_string()
        };
        let speed = if m.unit == Unit::Micros && f.median_us > 0.0 && f.baseline_median_us > 0.0 {
            format!(" ({:.1}x)", f.baseline_median_us / f.median_us)
        } else {
            String::new()
        };
        println!(
            "  {:<64} {:>10.2} {unit:<3} {:<34} {:>10.2} {unit:<3} {ratio:>7}{speed} {:>5}",
            f.name, f.median_us, f.baseline, f.baseline_median_us, m.samples
        );
    }
    println!();
    println!("targets:");
    for t in targets(r) {
        let floor = t.floor.map_or(String::new(), |f| {
            format!("; floor here {f:.3}: zaps and re-faults alone, no conversion")
        });
        println!(
            "  [{}] {} (ratio {:.3}{floor})",
            if t.met { "met" } else { "NOT met" },
            t.what,
            t.ratio
        );
    }
    for s in &r.skipped {
        println!("skipped: {s}");
    }
}

pub fn run(args: &Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    // Open the plot's file before the benchmark, so that a bad path fails at once.
    let mut plot = match &args.plot {
        Some(path) => Some((
            path,
            std::fs::File::create(path).map_err(|source| UsageError::Unwritable {
                flag: "--plot",
                path: path.clone(),
                source,
            })?,
        )),
        None => None,
    };
    let options = Options { quick: args.quick };
    let tty = std::io::stderr().is_terminal();
    let mut progress = |done: usize, total: usize, what: &str| {
        if !tty {
            return;
        }
        let width = 30;
        let filled = (done * width).checked_div(total).unwrap_or(0).min(width);
        let mut e = std::io::stderr();
        let _ = write!(
            e,
            "\r\x1b[2K[{}{}] {done}/{total} {what}",
            "#".repeat(filled),
            " ".repeat(width - filled)
        );
        let _ = e.flush();
    };
    let report = comparison::run(options, &mut progress);
    if tty {
        eprint!("\r\x1b[2K");
    }
    let report = report?;
    if let Some((path, file)) = &mut plot {
        file.write_all(comparison::svg(&report.curves).as_bytes())
            .map_err(|e| format!("writing the plot to {}: {e}", path.display()))?;
    }
    if args.json {
        let v = json!({
            "results": report.lines.iter().map(line_json).collect::<Vec<_>>(),
            "targets": targets(&report).iter().map(|t| json!({
                "target": t.what, "ratio": t.ratio, "met": t.met, "floor_ratio": t.floor,
            })).collect::<Vec<_>>(),
            "skipped": report.skipped,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_text(&report, args.quick);
        if let Some(path) = &args.plot {
            println!("plot written to {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
