//! `gmem bench`: in-place conversion against the two-backing model (and the kernel backend
//! against the emulated one), side by side in one run. See `gmem_bench::comparison`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use gmem_bench::comparison::{self, targets, Measurement, Options, Report, TargetOutcome, Unit};
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
    if let Some(setting) = &r.huge_folios_setting {
        println!("huge folios: shmem THP {setting:?} (the host's setting for this run)");
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
            "huge_folios_setting": report.huge_folios_setting,
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
            target: &comparison::TARGETS[0],
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
        for t in &comparison::TARGETS {
            let v = vocab(t.what);
            assert!(
                !v.contains("preserving)") && !v.contains("destructive"),
                "{v}"
            );
        }
    }
}
