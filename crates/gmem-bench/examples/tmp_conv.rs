use gmem::emulated::{EmulatedGuestMemfd, EmulatedOptions, Revocation};
use gmem::file::GuestMemfd;
use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
fn main() {
    let len = 4096u64;
    let f = EmulatedGuestMemfd::create_with(
        len,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        EmulatedOptions::with_revocation(Revocation::Guard),
    )
    .unwrap();
    let m = f.mmap_all().unwrap();
    let n = m.len();
    let iters: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20000);
    let mut tp = Vec::new();
    for _ in 0..iters {
        m.mmap().madvise(0, n, libc::MADV_POPULATE_WRITE).unwrap();
        let t = std::time::Instant::now();
        f.set_private(0, len).unwrap();
        tp.push(t.elapsed().as_nanos());
        f.set_shared(0, len).unwrap();
    }
    tp.sort();
    eprintln!("median to_private {} ns", tp[tp.len() / 2]);
}
