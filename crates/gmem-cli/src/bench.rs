//! `gmem bench`: in-place conversion against the two-backing model (and the kernel backend
//! against the emulated one), side by side in one run. See `gmem_bench::comparison`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use gmem_bench::comparison::{self, targets, Measurement, Options, Report, Unit};
use serde_json::{json, Value};

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
    if let Some(path) = &args.plot {
        std::fs::write(path, comparison::svg(&report.curves))
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
