//! What one 4 KiB conversion costs beside the system calls it makes, in one run (medians of
//! 20,000): `set_private` of a populated page (zap + `UFFDIO_POISON`) and `set_shared` (zap of
//! the marker) on a file with one host mapping; the same conversions on a file with no
//! mapping (gmem's bookkeeping alone); and `MADV_DONTNEED` of a populated and of an empty page
//! of another file's host mapping (the same kind of VMA) that no conversion touches. It is the evidence behind DESIGN.md's "what limits the 4 KiB
//! round trip". `cargo run --release -p gmem-bench --example conversion_steps`

use std::time::Instant;

use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{EmulatedGuestMemfd, GuestMemfd};
use gmem_vmm::stats::median;

const PS: u64 = 4096;
const REPS: usize = 20_000;

fn us(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    let f = EmulatedGuestMemfd::create(16 * PS, flags)?;
    let host = f.mmap_all()?;
    let bare = EmulatedGuestMemfd::create(16 * PS, flags)?;
    // Another file's host mapping (the same kind of VMA), for the system calls alone.
    let plain = EmulatedGuestMemfd::create(16 * PS, flags)?;
    let plain_map = plain.mmap_all()?;
    let mut s: [Vec<f64>; 6] = Default::default();
    for _ in 0..REPS {
        host.write_volatile(0, &[1])?;
        let t = Instant::now();
        f.set_private(0, PS)?;
        s[0].push(us(t));
        let t = Instant::now();
        f.set_shared(0, PS)?;
        s[1].push(us(t));
        let t = Instant::now();
        bare.set_private(0, PS)?;
        s[2].push(us(t));
        let t = Instant::now();
        bare.set_shared(0, PS)?;
        s[3].push(us(t));
        // Page 1 of that mapping is never converted: a zap there is one madvise.
        plain_map.write_volatile(PS as usize, &[1])?;
        let t = Instant::now();
        plain_map
            .mmap()
            .madvise(PS as usize, PS as usize, libc::MADV_DONTNEED)?;
        s[4].push(us(t));
        let t = Instant::now();
        plain_map
            .mmap()
            .madvise(PS as usize, PS as usize, libc::MADV_DONTNEED)?;
        s[5].push(us(t));
    }
    let [a, b, c, d, e, g] = s.map(|mut v| median(&mut v));
    println!("4 KiB, µs (median of {REPS})");
    println!("set_private, populated, one mapping   {a:>6.2}");
    println!("set_shared, one mapping               {b:>6.2}");
    println!("set_private, no mapping (bookkeeping) {c:>6.2}");
    println!("set_shared, no mapping (bookkeeping)  {d:>6.2}");
    println!("madvise(DONTNEED) populated           {e:>6.2}");
    println!("madvise(DONTNEED) empty               {g:>6.2}");
    Ok(())
}
