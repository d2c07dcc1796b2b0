//! Accessor overhead against plain `GuestMemoryMmap` on the same shared memory, and what
//! checks and listeners add to a 4 KiB conversion, measured in one run.
//!
//! `cargo bench -p gmem-vm-memory --bench accessors [-- --quick]`

#[path = "support/iommu_variant.rs"]
mod iommu_variant;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::{EmulatedGuestMemfd, GuestMemfd};
use gmem_vm_memory::{GmemMemory, GmemRegion, IommuTracker, VhostUserTable};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

const PAGE: u64 = 4096;
const BASE: u64 = 0x1_0000_0000;
const PAGES: u64 = 64;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// ns per call of `f` over `ops` calls.
fn per_op(ops: u64, mut f: impl FnMut(u64)) -> f64 {
    let t = Instant::now();
    for i in 0..ops {
        f(i);
    }
    t.elapsed().as_nanos() as f64 / ops as f64
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (reps, ops, conv_samples) = if quick {
        (11, 2_000, 201)
    } else {
        (31, 5_000, 1001)
    };

    let file: Arc<dyn GuestMemfd> = Arc::new(
        EmulatedGuestMemfd::create(
            PAGES * PAGE,
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        )
        .expect("emulated file"),
    );
    let mem = GmemMemory::new(vec![GmemRegion::new(
        file.clone(),
        0,
        PAGES * PAGE,
        GuestAddress(BASE),
    )
    .expect("region")])
    .expect("memory");
    // Plain vm-memory over the very same mapping: the baseline.
    let mmap = mem
        .regions()
        .find_region(GuestAddress(BASE))
        .unwrap()
        .as_mmap_region()
        .get_mmap();
    let plain = GuestMemoryMmap::<()>::from_regions(vec![GuestRegionMmap::with_arc(
        mmap,
        GuestAddress(BASE),
    )
    .unwrap()])
    .unwrap();
    // vm-memory's IommuMemory (identity IOTLB = the shared pages) over the same mapping.
    let iommu_backend = GuestMemoryMmap::<()>::from_regions(vec![GuestRegionMmap::with_arc(
        mem.regions()
            .find_region(GuestAddress(BASE))
            .unwrap()
            .as_mmap_region()
            .get_mmap(),
        GuestAddress(BASE),
    )
    .unwrap()])
    .unwrap();
    let iommu_mem = iommu_variant::iommu_memory(
        iommu_backend,
        iommu_variant::AttributeIommu::with_shared(BASE, (PAGES * PAGE) as usize),
    );
    // Its refusal: a page converted to private is unmapped from the IOTLB, and an access is
    // vm-memory's IommuError, not a SIGBUS (the file is not converted here: the check only).
    iommu_mem
        .iommu()
        .set_private(BASE + 3 * PAGE, PAGE as usize);
    assert!(matches!(
        iommu_mem.read_obj::<u64>(GuestAddress(BASE + 3 * PAGE)),
        Err(vm_memory::GuestMemoryError::IommuError(_))
    ));
    iommu_mem.iommu().set_shared(BASE + 3 * PAGE, PAGE as usize);
    let mut buf = vec![0u8; PAGE as usize];
    let addr = |i: u64| GuestAddress(BASE + (i % PAGES) * PAGE);
    // Warm up: fault every page in.
    plain
        .write_slice(&vec![1u8; (PAGES * PAGE) as usize], GuestAddress(BASE))
        .unwrap();

    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("plain read 4 KiB", vec![]),
        ("gmem read 4 KiB", vec![]),
        ("gmem guard read 4 KiB", vec![]),
        ("plain write 4 KiB", vec![]),
        ("gmem write 4 KiB", vec![]),
        ("gmem guard write 4 KiB", vec![]),
        ("plain read_obj u64", vec![]),
        ("gmem read_obj u64", vec![]),
        ("check only read 4 KiB", vec![]),
        ("reference pair alone", vec![]),
        ("plain read 4 KiB again", vec![]),
        ("plain read + ref pair", vec![]),
        ("plain write + ref pair", vec![]),
        ("IommuMemory read 4 KiB", vec![]),
        ("IommuMemory write 4 KiB", vec![]),
        ("IommuMemory read_obj u64", vec![]),
    ];
    let regions = mem.regions();
    let counter = std::sync::atomic::AtomicU32::new(0);
    for _ in 0..reps {
        rows[0].1.push(per_op(ops, |i| {
            plain.read_slice(black_box(&mut buf), addr(i)).unwrap()
        }));
        rows[1].1.push(per_op(ops, |i| {
            mem.read_slice(black_box(&mut buf), addr(i)).unwrap()
        }));
        rows[2].1.push(per_op(ops, |i| {
            let g = mem.access();
            g.read_slice(black_box(&mut buf), addr(i)).unwrap()
        }));
        rows[3].1.push(per_op(ops, |i| {
            plain.write_slice(black_box(&buf), addr(i)).unwrap()
        }));
        rows[4].1.push(per_op(ops, |i| {
            mem.write_slice(black_box(&buf), addr(i)).unwrap()
        }));
        rows[5].1.push(per_op(ops, |i| {
            let g = mem.access();
            g.write_slice(black_box(&buf), addr(i)).unwrap()
        }));
        rows[6].1.push(per_op(ops, |i| {
            black_box(plain.read_obj::<u64>(addr(i)).unwrap());
        }));
        rows[7].1.push(per_op(ops, |i| {
            black_box(mem.read_obj::<u64>(addr(i)).unwrap());
        }));
        // The region collection's own accessors: the private-page check, no reference.
        rows[8].1.push(per_op(ops, |i| {
            regions.read_slice(black_box(&mut buf), addr(i)).unwrap()
        }));
        // What a reference costs by itself: one locked increment, one locked decrement.
        rows[9].1.push(per_op(ops, |_| {
            use std::sync::atomic::Ordering;
            counter.fetch_add(1, Ordering::SeqCst);
            black_box(&counter);
            counter.fetch_sub(1, Ordering::Release);
        }));
        rows[10].1.push(per_op(ops, |i| {
            plain.read_slice(black_box(&mut buf), addr(i)).unwrap()
        }));
        // The floor of any design that takes a reference around the copy: plain vm-memory
        // with one locked increment before and one locked decrement after (each drains the
        // store buffer, which after a 4 KiB copy is full).
        rows[11].1.push(per_op(ops, |i| {
            use std::sync::atomic::Ordering;
            counter.fetch_add(1, Ordering::SeqCst);
            plain.read_slice(black_box(&mut buf), addr(i)).unwrap();
            counter.fetch_sub(1, Ordering::Release);
        }));
        rows[12].1.push(per_op(ops, |i| {
            use std::sync::atomic::Ordering;
            counter.fetch_add(1, Ordering::SeqCst);
            plain.write_slice(black_box(&buf), addr(i)).unwrap();
            counter.fetch_sub(1, Ordering::Release);
        }));
        rows[13].1.push(per_op(ops, |i| {
            iommu_mem.read_slice(black_box(&mut buf), addr(i)).unwrap()
        }));
        rows[14].1.push(per_op(ops, |i| {
            iommu_mem.write_slice(black_box(&buf), addr(i)).unwrap()
        }));
        rows[15].1.push(per_op(ops, |i| {
            black_box(iommu_mem.read_obj::<u64>(addr(i)).unwrap());
        }));
    }
    let m: Vec<f64> = rows.iter().map(|(_, v)| median(v.clone())).collect();
    println!("accessors on shared memory ({reps} repetitions × {ops} ops, medians, same run):");
    let line = |name: &str, v: f64, base: f64, target: Option<f64>| {
        let ratio = v / base;
        let t = match target {
            Some(t) if ratio <= t => format!("  target ≤ {t}×: met"),
            Some(t) => format!("  target ≤ {t}×: NOT met"),
            None => String::new(),
        };
        println!("  {name:<24} {v:8.1} ns   {ratio:5.2}× plain{t}");
    };
    line(rows[0].0, m[0], m[0], None);
    line(rows[1].0, m[1], m[0], Some(1.2));
    line(rows[2].0, m[2], m[0], None);
    line(rows[3].0, m[3], m[3], None);
    line(rows[4].0, m[4], m[3], Some(1.2));
    line(rows[5].0, m[5], m[3], None);
    line(rows[6].0, m[6], m[6], None);
    line(rows[7].0, m[7], m[6], None);
    line(rows[8].0, m[8], m[0], None);
    println!(
        "  {:<24} {:8.1} ns   (of the overhead above)",
        rows[9].0, m[9]
    );
    line(rows[10].0, m[10], m[0], None);
    line(rows[11].0, m[11], m[0], None);
    line(rows[12].0, m[12], m[3], None);
    line(rows[13].0, m[13], m[0], None);
    line(rows[14].0, m[14], m[3], None);
    line(rows[15].0, m[15], m[6], None);

    // A 4 KiB conversion: the file alone, through the entry point (checks), and with the two
    // listeners (an IOMMU tracker that pins what it maps, a vhost-user table).
    let page = BASE + 7 * PAGE;
    let mut file_p = vec![];
    let mut file_s = vec![];
    let mut chk_p = vec![];
    let mut chk_s = vec![];
    let mut lis_p = vec![];
    let mut lis_s = vec![];
    let iommu = Arc::new(IommuTracker::new(true));
    // The tracker maps (pins) every shared page but the two the file-alone and the
    // checks-only figures convert (its pins would refuse them: it is not listening then).
    let alone = 9 * PAGE;
    let checks = 11 * PAGE;
    for (s, e) in [
        (0, alone),
        (alone + PAGE, checks),
        (checks + PAGE, PAGES * PAGE),
    ] {
        iommu.map_initial(BASE + s, e - s, &file, s).unwrap();
    }
    let vhost = Arc::new(VhostUserTable::with_shared(&[(BASE, PAGES * PAGE)]));
    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed().as_nanos() as f64
    };
    for i in 0..conv_samples + 20 {
        let keep = i >= 20; // warm-up
        let a = time(&mut || file.set_private(alone, PAGE).unwrap());
        let b = time(&mut || file.set_shared(alone, PAGE).unwrap());
        let c = time(&mut || mem.convert(BASE + checks, PAGE, true).unwrap());
        let d = time(&mut || mem.convert(BASE + checks, PAGE, false).unwrap());
        mem.add_listener(iommu.clone());
        mem.add_listener(vhost.clone());
        let e = time(&mut || mem.convert(page, PAGE, true).unwrap());
        let f = time(&mut || mem.convert(page, PAGE, false).unwrap());
        mem.clear_listeners();
        if keep {
            file_p.push(a);
            file_s.push(b);
            chk_p.push(c);
            chk_s.push(d);
            lis_p.push(e);
            lis_s.push(f);
        }
    }
    println!("4 KiB conversion ({conv_samples} samples each, interleaved, medians):");
    for (dir, f, c, l) in [
        ("to private", median(file_p), median(chk_p), median(lis_p)),
        ("to shared", median(file_s), median(chk_s), median(lis_s)),
    ] {
        println!(
            "  {dir:<10}  file alone {:6.2} µs | entry point {:6.2} µs (checks +{:5.2} µs) | + IOMMU tracker & vhost table {:6.2} µs (listeners +{:5.2} µs)",
            f / 1e3,
            c / 1e3,
            (c - f) / 1e3,
            l / 1e3,
            (l - c) / 1e3
        );
    }
}
