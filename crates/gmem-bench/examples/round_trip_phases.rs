//! Where the round trip's time goes, per model: to private, guest touches every page, to
//! shared, host touches every page (medians of 30 repetitions after 3 warm-ups; of 1,000 for
//! ranges up to 64 KiB). It is the evidence behind DESIGN.md's "what limits the 2 MiB round
//! trip". `cargo run --release -p gmem-bench --example round_trip_phases [-- BYTES]` (default
//! 2 MiB; a multiple of 4 KiB up to 1 GiB).

use std::time::Instant;

use gmem_bench::comparison::create_backing;
use gmem_vmm::backing::BackingKind;
use gmem_vmm::stats::median;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let len = match std::env::args().nth(1) {
        None => 2u64 << 20,
        Some(a) => a
            .parse::<u64>()
            .ok()
            .filter(|&n| n > 0 && n % 4096 == 0 && n <= 1 << 30)
            .ok_or_else(|| format!("BYTES: {a:?} is not a multiple of 4096 in 4096..=2^30"))?,
    };
    let reps: usize = if len <= 64 << 10 { 1000 } else { 30 };
    let kinds = BackingKind::ALL;
    println!("{len}-byte round trip, µs (median of {reps})");
    println!(
        "{:<18} {:>10} {:>12} {:>10} {:>11} {:>8}",
        "model", "to private", "guest touch", "to shared", "host touch", "total"
    );
    for kind in kinds {
        let m = create_backing(kind, len, false)?;
        m.host_touch(0, len, 0)?;
        let mut s: [Vec<f64>; 4] = Default::default();
        for rep in 0..reps + 3 {
            let v = (rep % 250) as u8 + 1;
            let t0 = Instant::now();
            m.set_private(0, len)?;
            let t1 = Instant::now();
            m.guest_touch(0, len, v)?;
            let t2 = Instant::now();
            m.set_shared(0, len)?;
            let t3 = Instant::now();
            m.host_touch(0, len, v)?;
            let t4 = Instant::now();
            if rep >= 3 {
                for (i, (a, b)) in [(t0, t1), (t1, t2), (t2, t3), (t3, t4)]
                    .into_iter()
                    .enumerate()
                {
                    s[i].push((b - a).as_secs_f64() * 1e6);
                }
            }
        }
        let [a, b, c, d] = s.map(|mut v| median(&mut v));
        println!(
            "{:<18} {a:>10.2} {b:>12.2} {c:>10.2} {d:>11.2} {:>8.2}",
            kind.name(),
            a + b + c + d
        );
    }
    Ok(())
}
