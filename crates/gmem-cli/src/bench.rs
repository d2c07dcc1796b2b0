//! `gmem bench`: in-place conversion against the two-backing model (and the kernel backend
//! against the emulated one), side by side in one run. See `gmem_bench::comparison`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use gmem_bench::comparison::{self, Measurement, Options, Report, Unit};
use serde_json::{json, Value};

use crate::progress;
use crate::usage::UsageError;

/// Arguments of `gmem bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Fewer repetitions and no 1 GiB conversion (about a minute).
    #[arg(long)]
    quick: bool,
    /// Print one JSON object: `version`, `quick`, `results` (`name`, `median_us`, `baseline`,
    /// `baseline_median_us`, `ratio`, `unit`, `group`, `samples`), `targets`, `skipped`
    /// (docs/json.md).
    #[arg(long)]
    json: bool,
    /// Also write an SVG of conversion latency against range size (log-log) to this file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Exit with status 1 if any target is not met (for CI); without it an unmet target is
    /// reported ("[NOT met]") and the exit status stays 0.
    #[arg(long)]
    fail_on_unmet: bool,
}

/// The model names gmem uses everywhere (`in-place`, `two-backing`, `two-backing+copy`) in
/// place of the library's baseline labels.
fn vocab(name: &str) -> String {
    name.replace("two-backing preserving", "two-backing+copy")
        .replace("two-backing destructive", "two-backing")
        .replace("two-backing (destructive)", "two-backing")
        .replace("two-backing (preserving)", "two-backing+copy")
}

/// A value in its unit, times scaled to µs, ms or s.
fn human(v: f64, unit: Unit) -> String {
    match unit {
        Unit::Micros if v >= 1e6 => format!("{:.2} s", v / 1e6),
        Unit::Micros if v >= 1e3 => format!("{:.2} ms", v / 1e3),
        Unit::Micros => format!("{v:.2} µs"),
        u => format!("{v:.2} {}", u.name()),
    }
}

/// The exit status: 1 if `fail_on_unmet` and a target is not met.
fn exit_code(outcomes: &[TargetOutcome], fail_on_unmet: bool) -> ExitCode {
    let unmet = outcomes.iter().filter(|t| !t.met).count();
    if fail_on_unmet && unmet > 0 {
        eprintln!("gmem bench: {unmet} target(s) not met (--fail-on-unmet)");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
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
        "name": vocab(&f.name),
        "median_us": f.median_us,
        "baseline": vocab(&f.baseline),
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
    // One section per group, in first-seen order, columns sized to their widest entry.
    let mut groups: Vec<&str> = Vec::new();
    for m in &r.lines {
        if !groups.contains(&m.group) {
            groups.push(m.group);
        }
    }
    let name_w = r
        .lines
        .iter()
        .map(|m| vocab(&m.figure.name).len())
        .max()
        .unwrap_or(6)
        .max(6);
    let base_w = r
        .lines
        .iter()
        .map(|m| vocab(&m.figure.baseline).len())
        .max()
        .unwrap_or(8)
        .max(8);
    for group in groups {
        println!();
        println!("[{group}]");
        println!(
            "  {:<name_w$} {:>14} {:<base_w$} {:>14} {:>7} {:>8} {:>4}",
            "figure", "value", "baseline", "value", "ratio", "speed-up", "n"
        );
        for m in r.lines.iter().filter(|m| m.group == group) {
            let f = &m.figure;
            let ratio = f.ratio();
            let ratio = if ratio.is_finite() {
                format!("{ratio:.3}")
            } else {
                "-".to_string()
            };
            let speed = if m.unit == Unit::Micros && f.median_us > 0.0 && f.baseline_median_us > 0.0
            {
                format!("{:.1}x", f.baseline_median_us / f.median_us)
            } else {
                "-".to_string()
            };
            println!(
                "  {:<name_w$} {:>14} {:<base_w$} {:>14} {ratio:>7} {speed:>8} {:>4}",
                vocab(&f.name),
                human(f.median_us, m.unit),
                vocab(&f.baseline),
                human(f.baseline_median_us, m.unit),
                m.samples
            );
        }
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
            vocab(t.what),
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
    let tty = progress::enabled();
    let mut progress = |done: usize, total: usize, what: &str| {
        if tty {
            progress::bar(done, total, what);
        }
    };
    let report = comparison::run(options, &mut progress);
    if tty {
        progress::clear();
    }
    let report = report?;
    if let Some((path, file)) = &mut plot {
        file.write_all(comparison::svg(&report.curves).as_bytes())
            .map_err(|e| format!("writing the plot to {}: {e}", path.display()))?;
    }
    if args.json {
        let v = json!({
            "version": crate::JSON_VERSION,
            "quick": args.quick,
            "results": report.lines.iter().map(line_json).collect::<Vec<_>>(),
            "targets": targets(&report).iter().map(|t| json!({
                "target": vocab(t.what), "ratio": t.ratio, "met": t.met, "floor_ratio": t.floor,
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
    Ok(exit_code(&targets(&report), args.fail_on_unmet))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(met: bool) -> TargetOutcome {
        TargetOutcome {
            what: "t",
            ratio: 1.0,
            met,
            floor: None,
        }
    }

    #[test]
    fn an_unmet_target_fails_only_with_fail_on_unmet() {
        let unmet = [outcome(true), outcome(false)];
        assert_eq!(exit_code(&unmet, false), ExitCode::SUCCESS);
        assert_eq!(exit_code(&unmet, true), ExitCode::FAILURE);
        assert_eq!(exit_code(&[outcome(true)], true), ExitCode::SUCCESS);
    }

    #[test]
    fn values_in_human_units() {
        assert_eq!(human(6.861, Unit::Micros), "6.86 µs");
        assert_eq!(human(6886.42, Unit::Micros), "6.89 ms");
        assert_eq!(human(847_944.69, Unit::Micros), "847.94 ms");
        assert_eq!(human(2_500_000.0, Unit::Micros), "2.50 s");
        assert_eq!(human(1024.03, Unit::Mebibytes), "1024.03 MiB");
    }

    #[test]
    fn one_vocabulary_for_the_models() {
        assert_eq!(vocab("two-backing preserving"), "two-backing+copy");
        assert_eq!(vocab("two-backing destructive"), "two-backing");
        for t in &TARGETS {
            let v = vocab(t.what);
            assert!(
                !v.contains("preserving)") && !v.contains("destructive"),
                "{v}"
            );
        }
    }
}
