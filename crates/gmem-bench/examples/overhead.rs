//! Software overhead of one conversion of the emulated backend: `set_attributes` on a file
//! with no host mapping (pure bookkeeping), then with one unpopulated mapping.
//! `cargo run --release --example overhead`

use std::time::Instant;

use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{EmulatedGuestMemfd, GuestMemfd};

fn per_conversion_ns(f: &EmulatedGuestMemfd, n: u64) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        let off = (i % 1000) * 2 * 4096;
        f.set_private(off, 4096).expect("to private");
        f.set_shared(off, 4096).expect("to shared");
    }
    t.elapsed().as_nanos() as f64 / (2 * n) as f64
}

fn main() {
    let f = EmulatedGuestMemfd::create(
        1 << 30,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    )
    .expect("create");
    println!(
        "no mapping: {:.0} ns per 4 KiB conversion",
        per_conversion_ns(&f, 200_000)
    );
    let _m = f.mmap_all().expect("mmap");
    println!(
        "one unpopulated mapping: {:.0} ns per 4 KiB conversion",
        per_conversion_ns(&f, 20_000)
    );
}
