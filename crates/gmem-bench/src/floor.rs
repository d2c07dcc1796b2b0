//! Conversion-latency measurements of the emulated backend against the single-syscall floor,
//! all measured in the same run (medians of several repetitions). Used by
//! `cargo bench --bench conversion` and `gmem bench`.
//!
//! A to-private conversion must remove the page from every host page table, so its floor is
//! one `madvise(MADV_DONTNEED)` of the same range on a plain memfd mapping (the primary
//! baseline); `mprotect(PROT_NONE)`, which changes protection bits without zapping, is
//! reported beside it. A to-shared conversion's floor is the same DONTNEED on an unpopulated
//! range.

use gmem::emulated::{EmulatedGuestMemfd, EmulatedOptions};
use gmem::error::KernelResult;
use gmem::file::GuestMemfd;
use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::PAGE_SIZE;
use gmem_vmm::stats::{median, time_us};

use crate::sys;

/// One measured figure beside its baseline.
#[derive(Debug, Clone)]
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// Median, microseconds.
    pub median_us: f64,
    /// What it is compared against.
    pub baseline: String,
    /// The baseline's median, microseconds, same run.
    pub baseline_median_us: f64,
}

impl Figure {
    /// `name` at `median_us`, against `baseline` at `baseline_median_us`.
    pub fn new(
        name: impl Into<String>,
        median_us: f64,
        baseline: impl Into<String>,
        baseline_median_us: f64,
    ) -> Figure {
        Figure {
            name: name.into(),
            median_us,
            baseline: baseline.into(),
            baseline_median_us,
        }
    }

    /// `median / baseline`.
    pub fn ratio(&self) -> f64 {
        if self.baseline_median_us > 0.0 {
            self.median_us / self.baseline_median_us
        } else {
            f64::INFINITY
        }
    }
}

/// Sizes measured: (label, bytes, samples).
pub fn sizes(quick: bool) -> Vec<(&'static str, u64, usize)> {
    let mut v = vec![
        ("4KiB", PAGE_SIZE, if quick { 51 } else { 401 }),
        ("2MiB", 2 << 20, if quick { 11 } else { 51 }),
    ];
    v.push(("1GiB", 1 << 30, if quick { 3 } else { 5 }));
    v
}

/// Floor figures for `len` bytes, medians in µs: (madvise DONTNEED populated, mprotect
/// populated, DONTNEED unpopulated, mprotect unpopulated).
fn floors(len: u64, samples: usize) -> KernelResult<(f64, f64, f64, f64)> {
    let fd = sys::memfd(len)?;
    let map = sys::map_shared(&fd, len, 0)?;
    let n = map.len();
    let mut v: [Vec<f64>; 4] = Default::default();
    for _ in 0..samples {
        map.madvise(0, n, libc::MADV_POPULATE_WRITE)?;
        v[0].push(time_us(|| map.madvise(0, n, libc::MADV_DONTNEED))?);
        v[2].push(time_us(|| map.madvise(0, n, libc::MADV_DONTNEED))?);
        v[3].push(sys::protect_none_us(&map)?);
        map.madvise(0, n, libc::MADV_POPULATE_WRITE)?;
        v[1].push(sys::protect_none_us(&map)?);
    }
    let [a, b, c, d] = v.map(|mut x| median(&mut x));
    Ok((a, b, c, d))
}

/// Median latencies of one `set_attributes` to private and back, for `len` bytes, with the
/// pages populated (allocated and mapped in the host mapping) or not: returns
/// (to_private_populated, to_shared_populated, to_private_unpopulated, to_shared_unpopulated).
fn conversions(len: u64, samples: usize, options: EmulatedOptions) -> KernelResult<[f64; 4]> {
    let f = EmulatedGuestMemfd::create_with(
        len,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        options,
    )?;
    let m = f.mmap_all()?;
    let n = m.len();
    let mut out: [Vec<f64>; 4] = Default::default();
    let err = |e: gmem::error::ConversionError| e.errno;
    // Populated: the pages stay allocated across samples, as in the floor measurement.
    for _ in 0..samples {
        m.mmap().madvise(0, n, libc::MADV_POPULATE_WRITE)?;
        out[0].push(time_us(|| f.set_private(0, len).map_err(err))?);
        out[1].push(time_us(|| f.set_shared(0, len).map_err(err))?);
    }
    f.punch_hole(0, len)?;
    for _ in 0..samples {
        out[2].push(time_us(|| f.set_private(0, len).map_err(err))?);
        out[3].push(time_us(|| f.set_shared(0, len).map_err(err))?);
    }
    Ok(out.map(|mut v| median(&mut v)))
}

/// The conversion-latency figures of the emulated backend (issue: conversion within 2x of
/// the single-syscall floor for 4 KiB and 2 MiB).
pub fn conversion_latency(
    quick: bool,
    options: EmulatedOptions,
    mut progress: impl FnMut(&str),
) -> KernelResult<Vec<Figure>> {
    let mut figures = Vec::new();
    for (label, len, samples) in sizes(quick) {
        progress(label);
        let (dontneed, mprotect, empty, mprotect_empty) = floors(len, samples)?;
        let [pp, sp, pu, su] = conversions(len, samples, options)?;
        let fig = Figure::new;
        figures.push(fig(
            format!("to_private {label} populated"),
            pp,
            "madvise(DONTNEED) populated",
            dontneed,
        ));
        figures.push(fig(
            format!("to_private {label} populated"),
            pp,
            "mprotect(PROT_NONE) populated",
            mprotect,
        ));
        for (name, v) in [
            (format!("to_shared {label} populated"), sp),
            (format!("to_private {label} unpopulated"), pu),
            (format!("to_shared {label} unpopulated"), su),
        ] {
            figures.push(fig(name.clone(), v, "madvise(DONTNEED) unpopulated", empty));
            figures.push(fig(
                name,
                v,
                "mprotect(PROT_NONE) unpopulated",
                mprotect_empty,
            ));
        }
    }
    Ok(figures)
}

/// Metadata of the worst case (every other page private over 1 GiB): (bytes, fragments,
/// bytes as a fraction of the memory tracked).
pub fn worst_case_metadata() -> (usize, usize, f64) {
    let npages = (1u64 << 30) / PAGE_SIZE;
    let mut store = gmem::attributes::AttributeStore::new(npages, false);
    for p in (0..npages).step_by(2) {
        store.set_range(p, p + 1, true);
    }
    let bytes = store.metadata_bytes();
    (bytes, store.fragments(), bytes as f64 / (1u64 << 30) as f64)
}

/// Median latencies of a conversion to private of `len` bytes (the default options) with
/// `followers` fork children that have every page of it mapped: before each sample each child
/// reads every page (so the conversion must take the pages out of its address space too),
/// then waits. With no follower the owner's own mapping is populated instead. Returns the
/// median in µs.
fn with_followers(len: u64, samples: usize, followers: usize) -> KernelResult<f64> {
    let f = EmulatedGuestMemfd::create_with(
        len,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        EmulatedOptions::default(),
    )?;
    let m = f.mmap_all()?;
    let n = m.len();
    let mut children = Vec::new();
    for _ in 0..followers {
        children.push(sys::Follower::fork(m.as_ptr(), n)?);
    }
    let err = |e: gmem::error::ConversionError| e.errno;
    let mut v = Vec::with_capacity(samples);
    for _ in 0..samples {
        if children.is_empty() {
            m.mmap().madvise(0, n, libc::MADV_POPULATE_READ)?;
        }
        for c in &mut children {
            c.touch_all()?;
        }
        v.push(time_us(|| f.set_private(0, len).map_err(err))?);
        f.set_shared(0, len).map_err(err)?;
    }
    drop(children);
    Ok(median(&mut v))
}

/// Conversion to private of 4 KiB and 2 MiB with 1, 4 and 16 fork children that have the
/// pages mapped, against the same conversion without any.
pub fn follower_conversions(
    quick: bool,
    mut progress: impl FnMut(&str),
) -> KernelResult<Vec<Figure>> {
    let mut figures = Vec::new();
    for (label, len, samples) in [
        ("4KiB", PAGE_SIZE, if quick { 21 } else { 101 }),
        ("2MiB", 2 << 20, if quick { 7 } else { 21 }),
    ] {
        progress(label);
        let base = with_followers(len, samples, 0)?;
        for n in [1, 4, 16] {
            figures.push(Figure::new(
                format!("to_private {label}, {n} followers"),
                with_followers(len, samples, n)?,
                "the same, no follower",
                base,
            ));
        }
    }
    Ok(figures)
}
