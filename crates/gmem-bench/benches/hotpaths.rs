//! `cargo bench --bench hotpaths [-- --quick]`: the hot paths, with medians.
//!
//! - `AttributeStore::is_private` on a 1 GiB file (262,144 pages) holding 1, 1,000 and
//!   100,000 fragments (runs of equal attributes), looked up at pseudo-random pages (so the
//!   walk is not served from one cache line); target: < 50 ns median at 100,000 fragments;
//! - one 4 KiB conversion (to private, then to shared) of a populated page, in-place
//!   against two-backing with and without content preservation.
//!
//! A criterion-free harness (`harness = false`): each sample times a batch of lookups and
//! divides, and the median of the samples is printed.

use std::hint::black_box;
use std::time::Instant;

use gmem::attributes::AttributeStore;
use gmem::PAGE_SIZE;
use gmem_bench::comparison::create_backing;
use gmem_bench::BenchError;
use gmem_vmm::backing::BackingKind;
use gmem_vmm::stats::median;

/// A store of `npages` pages with exactly `fragments` runs.
fn store_with_fragments(npages: u64, fragments: u64) -> AttributeStore {
    let mut s = AttributeStore::new(npages, false);
    // `fragments` runs: every other run of length npages / fragments is private.
    let run = npages / fragments;
    let mut p = run;
    while p < npages && p / run < fragments {
        let end = if p / run + 1 == fragments {
            npages
        } else {
            p + run
        };
        s.set_range(p, end, true);
        p += 2 * run;
    }
    s
}

fn lookups(store: &AttributeStore, samples: usize, batch: usize) -> f64 {
    let npages = store.npages();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let idx: Vec<u64> = (0..batch)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % npages
        })
        .collect();
    let mut v = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        let mut hits = 0u32;
        for &p in &idx {
            hits += u32::from(store.is_private(black_box(p)));
        }
        black_box(hits);
        v.push(t.elapsed().as_secs_f64() * 1e9 / batch as f64);
    }
    median(&mut v)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let npages = (1u64 << 30) / PAGE_SIZE;
    let (samples, batch) = if quick { (51, 10_000) } else { (201, 100_000) };
    println!("attribute lookup (AttributeStore::is_private), 1 GiB file, random pages:");
    for fragments in [1u64, 1_000, 100_000] {
        let s = store_with_fragments(npages, fragments);
        let got = s.fragments() as u64;
        let ns = lookups(&s, samples, batch);
        println!(
            "  {fragments:>7} fragments ({got} runs, {} bytes of metadata): {ns:6.2} ns median{}",
            s.metadata_bytes(),
            if fragments == 100_000 {
                if ns < 50.0 {
                    "  (target < 50 ns: met)"
                } else {
                    "  (target < 50 ns: NOT met)"
                }
            } else {
                ""
            }
        );
    }

    println!("4 KiB conversion of a populated page (to private + to shared), median:");
    let reps = if quick { 201 } else { 2001 };
    let kinds = BackingKind::ALL;
    let models: Vec<_> = match kinds
        .iter()
        .map(|&k| create_backing(k, 16 * PAGE_SIZE, false))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!("creating the models failed: {e}");
            std::process::exit(1);
        }
    };
    let mut t: Vec<[Vec<f64>; 2]> = models.iter().map(|_| Default::default()).collect();
    for rep in 0..reps + 10 {
        for (m, v) in models.iter().zip(t.iter_mut()) {
            let r = (|| -> Result<[f64; 2], BenchError> {
                m.host_touch(0, PAGE_SIZE, 1)?;
                let a = Instant::now();
                m.set_private(0, PAGE_SIZE)?;
                let to_private = a.elapsed().as_secs_f64() * 1e6;
                m.guest_touch(0, PAGE_SIZE, 2)?;
                let a = Instant::now();
                m.set_shared(0, PAGE_SIZE)?;
                Ok([to_private, a.elapsed().as_secs_f64() * 1e6])
            })();
            match r {
                Ok(x) if rep >= 10 => {
                    v[0].push(x[0]);
                    v[1].push(x[1]);
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("{}: {e}", m.kind());
                    std::process::exit(1);
                }
            }
        }
    }
    for (m, mut v) in models.iter().zip(t) {
        let (p, s) = (median(&mut v[0]), median(&mut v[1]));
        println!(
            "  {:<18} to_private {p:7.2} us   to_shared {s:7.2} us",
            m.kind().name()
        );
    }
}
