//! Issue 11 item 4: a conversion to shared inside a large private file costs what the range
//! costs, not what the file costs. A private file with one host mapping (the whole file is one
//! hole mapping); 4 KiB and 12 KiB ranges are converted to shared, each in a part of the hole
//! not touched before (so every sample splits the hole and rebuilds a neighbourhood), on a
//! 16 MiB file and on a 1 TiB one (sparse: nothing is populated). Prints the medians, their
//! ratio (target ≤ 2) and the page-table memory after (VmPTE of /proc/self/status).
//!
//! `cargo run --release -p gmem-bench --example large_file_conversion`

use std::time::Instant;

use gmem::uapi::GUEST_MEMFD_FLAG_MMAP;
use gmem::{EmulatedGuestMemfd, GuestMemfd};

const SAMPLES: u64 = 63;

fn vm_pte_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmPTE:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median µs of converting `len` bytes to shared at `SAMPLES` spread offsets of a private
/// file of `size` bytes, after one untimed warm-up conversion; the VmPTE growth in KiB.
fn run(size: u64, len: u64) -> (f64, u64) {
    let f = EmulatedGuestMemfd::create(size, GUEST_MEMFD_FLAG_MMAP).expect("create");
    let pte_before = vm_pte_kib();
    let _m = f.mmap_all().expect("mmap");
    let stride = size / (SAMPLES + 2) / 4096 * 4096;
    f.set_shared(stride / 2 / 4096 * 4096, len)
        .expect("warm-up");
    let mut us = Vec::new();
    for i in 1..=SAMPLES {
        let off = i * stride + 4096 * 5;
        let t = Instant::now();
        f.set_shared(off, len).expect("to shared");
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    (median(us), vm_pte_kib().saturating_sub(pte_before))
}

fn main() {
    println!("conversion to shared inside a private file (one hole), median of {SAMPLES}:");
    for len in [4096u64, 12288] {
        let (small, small_pte) = run(16 << 20, len);
        let (large, large_pte) = run(1 << 40, len);
        println!(
            "  {:>2} KiB: 16 MiB file {small:7.2} µs, 1 TiB file {large:7.2} µs, ratio \
             {:.2} (target <= 2); page tables after: +{small_pte} KiB / +{large_pte} KiB",
            len / 1024,
            large / small
        );
    }
    println!("VmPTE at the end: {} KiB", vm_pte_kib());
}
