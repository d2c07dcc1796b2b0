//! What the `gmem exec` interposer adds to calls it does not handle: compiles
//! `crates/gmem-preload/tests/c/overhead.c` with the system C compiler and runs it twice,
//! without the interposer (both columns are then the same function: the host's noise floor
//! at that moment) and with it (`LD_PRELOAD`, as `gmem exec` sets it). Each run measures, in
//! one process and interleaved round by round, the program's `ioctl` against the C library's
//! own `ioctl`, for a non-KVM ioctl, a KVM ioctl passed through, and a KVM_RUN round trip.
//!
//! `cargo run --release -p gmem-cli --example exec_overhead` (targets: under 50 ns added per
//! pass-through call, under 1% on KVM_RUN).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn preload() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile = exe.parent()?.parent()?; // target/<profile>/examples/..
    [
        profile.join("libgmem_preload.so"),
        profile.join("deps/libgmem_preload.so"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

fn run(bin: &Path, preload: Option<&Path>) -> Result<String, String> {
    let mut cmd = Command::new(bin);
    if let Some(p) = preload {
        cmd.env("LD_PRELOAD", p);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `(name, interposed, direct, added, added %, median diff)` per line.
fn parse(text: &str) -> Vec<(String, [f64; 5])> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?.to_string();
            let v: Vec<f64> = it.filter_map(|x| x.parse().ok()).collect();
            Some((name, v.try_into().ok()?))
        })
        .collect()
}

fn main() -> ExitCode {
    let Some(preload) = preload() else {
        eprintln!("libgmem_preload.so not built: cargo build --release");
        return ExitCode::FAILURE;
    };
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gmem-preload/tests/c/overhead.c");
    let bin = std::env::temp_dir().join(format!("gmem-overhead-{}", std::process::id()));
    let cc = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .arg("-ldl")
        .status();
    if !matches!(cc, Ok(s) if s.success()) {
        eprintln!("cc {} failed (a C compiler is needed)", src.display());
        return ExitCode::FAILURE;
    }
    let (plain, with) = match (run(&bin, None), run(&bin, Some(&preload))) {
        (Ok(a), Ok(b)) => (parse(&a), parse(&b)),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("overhead: {e} (needs /dev/kvm)");
            return ExitCode::FAILURE;
        }
    };
    let _ = std::fs::remove_file(&bin);
    println!("interposer: {}", preload.display());
    println!(
        "{:<28} {:>12} {:>12} {:>10} {:>9} {:>12}   {:>14}   target",
        "call", "interposed", "libc", "added", "added", "median diff", "noise floor"
    );
    for ((name, w), (_, p)) in with.iter().zip(&plain) {
        let (target, met) = if name.starts_with("kvm_run") {
            ("< 1%", w[3] < 1.0 && w[4] / w[1] * 100.0 < 1.0)
        } else {
            ("< 50 ns", w[2] < 50.0 && w[4] < 50.0)
        };
        println!(
            "{:<28} {:>9.1} ns {:>9.1} ns {:>7.1} ns {:>8.3}% {:>9.1} ns   {:>11.1} ns   {} {}",
            name,
            w[0],
            w[1],
            w[2],
            w[3],
            w[4],
            p[4],
            target,
            if met { "[met]" } else { "[NOT met]" }
        );
    }
    println!("(times: minimum over rounds of the mean per call; added: their difference; median diff: median over rounds of the per-round difference; noise floor: the median diff of the same run without the interposer)");
    ExitCode::SUCCESS
}
