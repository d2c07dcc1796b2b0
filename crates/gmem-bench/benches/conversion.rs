//! `cargo bench --bench conversion [-- --quick]`: median conversion latency of the emulated
//! backend for 4 KiB, 2 MiB and 1 GiB (populated and unpopulated) beside the single-syscall
//! floor measured in the same run, the same with 1, 4 and 16 follower processes that have the
//! pages mapped, and the worst-case metadata size.

use gmem::{EmulatedOptions, HostPages, Revocation};
use gmem_bench::floor::{conversion_latency, follower_conversions, worst_case_metadata};

/// One line per figure: name, median, baseline, its median, ratio.
fn print_figures(figures: &[gmem_bench::floor::Figure]) {
    for f in figures {
        println!(
            "{:<32} {:>12.2} {:<34} {:>12.2} {:>7.2}",
            f.name,
            f.median_us,
            f.baseline,
            f.baseline_median_us,
            f.ratio()
        );
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let configs = [
        (
            "guard (host pages zapped, the default)",
            Revocation::Guard,
            HostPages::Zap,
        ),
        (
            "guard (host pages replaced, HostPages::Replace)",
            Revocation::Guard,
            HostPages::Replace,
        ),
        ("remap", Revocation::Remap, HostPages::Zap),
    ];
    for (name, revocation, host_pages) in configs {
        println!("revocation: {name}");
        let options = EmulatedOptions {
            host_pages,
            ..EmulatedOptions::with_revocation(revocation)
        };
        println!(
            "{:<32} {:>12} {:<34} {:>12} {:>7}",
            "conversion", "median_us", "baseline", "median_us", "ratio"
        );
        let figures = match conversion_latency(quick, options, |l| eprintln!("  measuring {l} ..."))
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("benchmark failed: {e}");
                std::process::exit(1);
            }
        };
        print_figures(&figures);
        println!();
    }
    println!(
        "followers (fork children that read every page before each conversion; default options)"
    );
    match follower_conversions(quick, |l| eprintln!("  measuring {l} with followers ...")) {
        Ok(figures) => print_figures(&figures),
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            std::process::exit(1);
        }
    }
    println!();
    let (bytes, fragments, frac) = worst_case_metadata();
    println!("worst-case metadata (every other page private over 1 GiB): {bytes} bytes for {fragments} fragments = {:.4}% of the memory tracked (target <= 0.05%)", frac * 100.0);
}
