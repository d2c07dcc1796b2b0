//! `gmem bench`: in-place conversion against the two-backing model, and the kernel backend
//! against the emulated one, measured side by side in one run (medians of at least five
//! repetitions, models interleaved within each repetition so that machine noise hits both).
//!
//! 1. conversion latency for 4 KiB … 1 GiB, populated and unpopulated, in-place against
//!    two-backing with and without content preservation;
//! 2. the full round trip (to private, guest touches, to shared, host touches);
//! 3. guest-driven round trips through a real vCPU for both models (the guest exits, the VMM
//!    converts, the guest writes the range, the VMM converts back and touches it): in-place
//!    binds the emulated file with [`gmem_vmm::Vm::bind`], two-backing binds its composite
//!    guest view as a plain memslot;
//! 4. the `gmem run` workload end to end on each model (`workload::Config::model`), and its
//!    4 KiB guest-driven conversion round trip;
//! 5. memory footprint of a 1 GiB guest half shared in 2 MiB and in 4 KiB fragments;
//! 6. operations both backends have, kernel against emulated (needs `/dev/kvm`).
//!
//! "Touch" means one write to the first byte of every page: it measures faults and
//! conversion work, not memset bandwidth (which both models pay equally).

use std::time::Instant;

use std::sync::Arc;

use crate::floor::Figure;
use gmem::emulated::EmulatedGuestMemfd;
use gmem::error::{ConversionError, Errno, KernelResult};
use gmem::file::{BackendKind, GuestMemfd};
use gmem::kernel::KernelBackend;
use gmem::sys::PAGE_SIZE;
use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_MEM_GUEST_MEMFD};
use gmem_vmm::backing::{in_place, BackingKind, GuestBacking, InPlace};
use gmem_vmm::stats::{median, time_us};
use gmem_vmm::two_backing::{TwoBacking, TwoBackingOptions};

/// Unit of a measurement's two figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Microseconds (a median).
    Micros,
    /// Mebibytes (footprint; deterministic, measured once).
    Mebibytes,
}

impl Unit {
    /// `us` or `MiB`.
    pub fn name(self) -> &'static str {
        match self {
            Unit::Micros => "us",
            Unit::Mebibytes => "MiB",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// Section: `conversion`, `round-trip`, `vcpu`, `workload`, `footprint`, `kernel`.
    pub group: &'static str,
    /// The figure, against its baseline (`median_us` holds MiB for footprint lines).
    pub figure: Figure,
    /// The unit of both figures.
    pub unit: Unit,
    /// Repetitions behind each median.
    pub samples: usize,
}

/// One curve of the plot: conversion latency against range size.
#[derive(Debug, Clone)]
pub struct Curve {
    /// Legend.
    pub label: String,
    /// (bytes, median µs).
    pub points: Vec<(u64, f64)>,
}

/// Everything `gmem bench` measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The lines, in order.
    pub lines: Vec<Measurement>,
    /// Conversion latency curves for the plot.
    pub curves: Vec<Curve>,
    /// Parts that were skipped, and why.
    pub skipped: Vec<String>,
}

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Fewer repetitions and no 1 GiB conversion (about a minute on a 2-core machine).
    pub quick: bool,
}

/// Progress: (steps done, total steps, what runs now).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, &str);

/// Why the benchmark stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} failed: {errno}")]
pub struct BenchError {
    /// What was being measured.
    pub what: String,
    /// The errno.
    pub errno: Errno,
}

fn ctx<T>(r: KernelResult<T>, what: impl Fn() -> String) -> Result<T, BenchError> {
    r.map_err(|errno| BenchError {
        what: what(),
        errno,
    })
}

fn conv(e: ConversionError) -> Errno {
    e.errno
}

fn acc(e: gmem::error::AccessError) -> Errno {
    match e {
        gmem::error::AccessError::Private { .. } => Errno::EFAULT,
        _ => Errno::EINVAL,
    }
}

/// Range sizes of the conversion-latency section: (label, bytes, repetitions).
pub fn conversion_sizes(quick: bool) -> Vec<(&'static str, u64, usize)> {
    let mut v = vec![
        ("4KiB", PAGE_SIZE, if quick { 31 } else { 201 }),
        ("64KiB", 64 << 10, if quick { 21 } else { 101 }),
        ("2MiB", 2 << 20, if quick { 9 } else { 31 }),
        ("64MiB", 64 << 20, if quick { 5 } else { 9 }),
    ];
    if !quick {
        v.push(("1GiB", 1 << 30, 5));
    }
    v
}

fn round_trip_sizes(quick: bool) -> Vec<(&'static str, u64, usize)> {
    vec![
        ("4KiB", PAGE_SIZE, if quick { 201 } else { 1001 }),
        ("2MiB", 2 << 20, if quick { 15 } else { 51 }),
    ]
}

const KINDS: [BackingKind; 3] = BackingKind::ALL;

/// A guest of `size` bytes in layout `kind` (in place: an emulated file with default
/// options and its guest view), all shared or all private.
pub fn create_backing(
    kind: BackingKind,
    size: u64,
    private: bool,
) -> KernelResult<Arc<dyn GuestBacking>> {
    Ok(match kind {
        BackingKind::InPlace(_) => Arc::new(InPlace::emulated(
            size,
            private,
            gmem::EmulatedOptions::default(),
        )?),
        BackingKind::TwoBacking { preserve_content } => Arc::new(
            TwoBacking::new(size, private, TwoBackingOptions { preserve_content }).map_err(
                |e| match e {
                    gmem_vmm::two_backing::TwoBackingError::Sys { errno, .. } => errno,
                    gmem_vmm::two_backing::TwoBackingError::Size { .. } => Errno::EINVAL,
                },
            )?,
        ),
    })
}

/// Medians per model: [to_private populated, to_shared populated, to_private unpopulated,
/// to_shared unpopulated].
fn conversion_medians(len: u64, reps: usize) -> KernelResult<Vec<[f64; 4]>> {
    let models = KINDS
        .iter()
        .map(|&k| create_backing(k, len, false))
        .collect::<KernelResult<Vec<_>>>()?;
    let mut samples: Vec<[Vec<f64>; 4]> = models.iter().map(|_| Default::default()).collect();
    // One untimed warm-up repetition: the first touch of fresh machine memory costs extra
    // (the outer hypervisor backs it lazily, host.md).
    for rep in 0..=reps {
        for (m, s) in models.iter().zip(samples.iter_mut()) {
            let mut t = [0.0; 4];
            // Populated: the host wrote every page while shared; the guest every page
            // while private.
            m.host_touch(0, len, 1).map_err(acc)?;
            t[0] = time_us(|| m.set_private(0, len).map_err(conv))?;
            m.guest_touch(0, len, 2)?;
            t[1] = time_us(|| m.set_shared(0, len).map_err(conv))?;
            // Unpopulated: no page allocated on either side.
            m.punch_hole(0, len)?;
            t[2] = time_us(|| m.set_private(0, len).map_err(conv))?;
            m.punch_hole(0, len)?;
            t[3] = time_us(|| m.set_shared(0, len).map_err(conv))?;
            if rep > 0 {
                for (v, x) in s.iter_mut().zip(t) {
                    v.push(x);
                }
            }
        }
    }
    Ok(samples
        .into_iter()
        .map(|s| s.map(|mut v| median(&mut v)))
        .collect())
}

/// The floor of any in-place round trip on this host: one memfd with a host and a guest
/// mapping, no attributes and no conversion; "to private" only zaps the range's PTEs in both
/// mappings (the host's must go; KVM's stage-2 entries go), "to shared" only zaps the guest's,
/// and the touches re-fault the same pages. No in-place implementation does less.
struct RoundTripFloor {
    _fd: std::os::fd::OwnedFd,
    host: gmem::sys::Mmap,
    guest: gmem::sys::Mmap,
}

impl RoundTripFloor {
    fn new(len: u64) -> KernelResult<Self> {
        use std::os::fd::AsFd;
        let fd = gmem::sys::memfd_create(c"gmem-floor")?;
        gmem::sys::ftruncate(fd.as_fd(), len)?;
        let n = usize::try_from(len).map_err(|_| Errno::ENOMEM)?;
        let map = || {
            gmem::sys::Mmap::new(
                Some(fd.as_fd()),
                0,
                n,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            )
        };
        let (host, guest) = (map()?, map()?);
        Ok(RoundTripFloor {
            _fd: fd,
            host,
            guest,
        })
    }

    fn round_trip(&self, touched: u64, v: u8) -> KernelResult<()> {
        let n = self.host.len();
        self.host.madvise(0, n, libc::MADV_DONTNEED)?;
        self.guest.madvise(0, n, libc::MADV_DONTNEED)?;
        // Both map a memfd of their length: no SIGBUS.
        self.guest.touch_pages(0, touched, v)?;
        self.guest.madvise(0, n, libc::MADV_DONTNEED)?;
        self.host.touch_pages(0, touched, v)?;
        Ok(())
    }
}

/// Median round trip per model: to private, guest touches, to shared, host touches (every
/// page of the range, or only its first page); then the same for [`RoundTripFloor`].
fn round_trip_medians(len: u64, reps: usize, every_page: bool) -> KernelResult<Vec<f64>> {
    let touched = if every_page { len } else { PAGE_SIZE };
    let models = KINDS
        .iter()
        .map(|&k| create_backing(k, len, false))
        .collect::<KernelResult<Vec<_>>>()?;
    let floor = RoundTripFloor::new(len)?;
    let mut samples: Vec<Vec<f64>> = (0..=models.len()).map(|_| Vec::new()).collect();
    for m in &models {
        m.host_touch(0, len, 0).map_err(acc)?;
    }
    floor.host.touch_pages(0, len, 0)?;
    for rep in 0..reps + 2 {
        let v = (rep % 250) as u8 + 1;
        for (m, s) in models.iter().zip(samples.iter_mut()) {
            let t = time_us(|| {
                m.set_private(0, len).map_err(conv)?;
                m.guest_touch(0, touched, v)?;
                m.set_shared(0, len).map_err(conv)?;
                m.host_touch(0, touched, v).map_err(acc)
            })?;
            if rep >= 2 {
                s.push(t);
            }
        }
        let t = time_us(|| floor.round_trip(touched, v))?;
        if rep >= 2 {
            samples[models.len()].push(t);
        }
    }
    Ok(samples.into_iter().map(|mut v| median(&mut v)).collect())
}

fn fig(name: String, median_us: f64, baseline: String, baseline_median_us: f64) -> Figure {
    Figure {
        name,
        median_us,
        baseline,
        baseline_median_us,
    }
}

/// Footprint (MiB) of `kind` for a 1 GiB guest that starts private, is written whole by the
/// guest, then has every other `frag`-byte piece converted to shared and written by the host.
fn footprint_mib(kind: BackingKind, frag: u64) -> KernelResult<f64> {
    const SIZE: u64 = 1 << 30;
    let m = create_backing(kind, SIZE, true)?;
    m.guest_touch(0, SIZE, 1)?;
    let mut off = 0;
    while off < SIZE {
        m.set_shared(off, frag).map_err(conv)?;
        m.host_touch(off, frag, 2).map_err(acc)?;
        off += 2 * frag;
    }
    let fp = m.footprint()?;
    Ok(fp.total() as f64 / f64::from(1u32 << 20))
}

/// Runs the kernel-against-emulated section; `Err` names why it cannot run here.
fn kernel_section(
    quick: bool,
    out: &mut Vec<Measurement>,
    step: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let backend = KernelBackend::new().map_err(|e| format!("no kernel backend: {e}"))?;
    let flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    let reps = if quick { 7 } else { 21 };
    let len: u64 = 2 << 20;
    let n = len as usize;
    let err = |what: &str| {
        let what = what.to_string();
        move |e: Errno| format!("{what}: {e}")
    };
    let mut push = |name: &str, k: f64, e: f64, samples: usize| {
        out.push(Measurement {
            group: "kernel",
            figure: fig(format!("kernel {name}"), k, format!("emulated {name}"), e),
            unit: Unit::Micros,
            samples,
        });
    };

    // create
    step("kernel vs emulated: create");
    let (mut k, mut e) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        let f = backend
            .create_guest_memfd(len, flags)
            .map_err(err("KVM_CREATE_GUEST_MEMFD"))?;
        k.push(t.elapsed().as_secs_f64() * 1e6);
        drop(f);
        let t = Instant::now();
        let f = EmulatedGuestMemfd::create(len, flags).map_err(err("emulated create"))?;
        e.push(t.elapsed().as_secs_f64() * 1e6);
        drop(f);
    }
    push("create 2MiB", median(&mut k), median(&mut e), reps);

    // faults and punch-hole, through each file's host mapping
    step("kernel vs emulated: faults, punch-hole");
    let kf = backend
        .create_guest_memfd(len, flags)
        .map_err(err("KVM_CREATE_GUEST_MEMFD"))?;
    let ef = EmulatedGuestMemfd::create(len, flags).map_err(err("emulated create"))?;
    let files: [&dyn GuestMemfd; 2] = [&kf, &ef];
    let maps = files
        .iter()
        .map(|f| f.mmap_all())
        .collect::<KernelResult<Vec<_>>>()
        .map_err(err("mmap"))?;
    let mut s: [[Vec<f64>; 4]; 2] = Default::default();
    for rep in 0..=reps {
        for (i, (f, m)) in files.iter().zip(&maps).enumerate() {
            let mut t = [0.0; 4];
            f.punch_hole(0, len).map_err(err("punch"))?;
            t[0] = time_us(|| {
                // The file is all shared: its mapping raises no SIGBUS.
                m.touch_pages(0, n, 1)
            })
            .map_err(err("first touch"))?;
            m.mmap()
                .madvise(0, n, libc::MADV_DONTNEED)
                .map_err(err("DONTNEED"))?;
            t[1] = time_us(|| m.touch_pages(0, n, 2)).map_err(err("re-map touch"))?;
            t[2] = time_us(|| f.punch_hole(0, len)).map_err(err("punch"))?;
            m.write_volatile(0, &[1]).map_err(err("write"))?;
            t[3] = time_us(|| f.punch_hole(0, PAGE_SIZE)).map_err(err("punch"))?;
            if rep > 0 {
                for (v, x) in s[i].iter_mut().zip(t) {
                    v.push(x);
                }
            }
        }
    }
    let [mut ks, mut es] = s;
    for (j, name) in [
        "first-touch fault 2MiB (512 pages)",
        "re-map fault 2MiB (512 pages)",
        "punch hole 2MiB populated",
        "punch hole 4KiB populated",
    ]
    .iter()
    .enumerate()
    {
        push(name, median(&mut ks[j]), median(&mut es[j]), reps);
    }

    // memslot bind: REGION2 with KVM_MEM_GUEST_MEMFD against a plain memslot of the guest view
    step("kernel vs emulated: memslot bind");
    let vm = backend.vm_fd();
    let (kview, gfd) = match kf.memslot_source().map_err(err("kernel host view"))? {
        gmem::MemslotSource::GuestMemfd {
            fd, userspace_addr, ..
        } => {
            use std::os::fd::AsRawFd;
            let fd = u32::try_from(fd.as_raw_fd()).map_err(|_| "negative fd".to_string())?;
            (userspace_addr, fd)
        }
        other => return Err(format!("kernel file bound as {other:?}")),
    };
    let eview = match ef.memslot_source().map_err(err("emulated guest view"))? {
        gmem::MemslotSource::GuestView { userspace_addr, .. } => userspace_addr,
        other => return Err(format!("emulated file bound as {other:?}")),
    };
    const SLOT: u32 = 30_000;
    let mut s: [Vec<f64>; 4] = Default::default();
    for _ in 0..reps {
        let kreg = |size: u64| kvm_bindings::kvm_userspace_memory_region2 {
            slot: SLOT,
            flags: KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: 1 << 32,
            memory_size: size,
            userspace_addr: kview,
            guest_memfd_offset: 0,
            guest_memfd: gfd,
            ..Default::default()
        };
        let ereg = |size: u64| kvm_bindings::kvm_userspace_memory_region {
            slot: SLOT + 1,
            flags: 0,
            guest_phys_addr: 1 << 33,
            memory_size: size,
            userspace_addr: eview,
        };
        let t = Instant::now();
        // SAFETY: the kernel file's mapping lives (in `kf`) until after the slot is deleted
        // just below.
        unsafe { vm.set_user_memory_region2(kreg(len)) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION2: {}", Errno(e.errno())))?;
        s[0].push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        // SAFETY: deleting the slot added above.
        unsafe { vm.set_user_memory_region2(kreg(0)) }
            .map_err(|e| format!("delete REGION2: {}", Errno(e.errno())))?;
        s[1].push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        // SAFETY: the guest view lives (in `ef`) until after the slot is deleted below.
        unsafe { vm.set_user_memory_region(ereg(len)) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {}", Errno(e.errno())))?;
        s[2].push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        // SAFETY: deleting the slot added above.
        unsafe { vm.set_user_memory_region(ereg(0)) }
            .map_err(|e| format!("delete REGION: {}", Errno(e.errno())))?;
        s[3].push(t.elapsed().as_secs_f64() * 1e6);
    }
    let [mut a, mut b, mut c, mut d] = s;
    push("memslot add 2MiB", median(&mut a), median(&mut c), reps);
    push("memslot remove 2MiB", median(&mut b), median(&mut d), reps);
    drop(maps);

    // guest access through a real vCPU
    step("kernel vs emulated: guest access");
    match guest_access(&backend, reps) {
        Ok((k, e)) => {
            push("guest first-touch 2MiB (vCPU)", k[0], e[0], reps);
            push("guest re-touch 2MiB (vCPU)", k[1], e[1], reps);
        }
        Err(why) => return Err(format!("guest access: {why}")),
    }
    Ok(())
}

/// Medians (first touch, re-touch) of a vCPU filling 2 MiB of gmem, kernel then emulated.
fn guest_access(backend: &KernelBackend, reps: usize) -> Result<([f64; 2], [f64; 2]), String> {
    use gmem_vmm::guest::DATA_GPA;
    use gmem_vmm::{Event, GuestProgram, RequestPath, Vm};
    let len: u64 = 2 << 20;
    let flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    let mut out = [[0.0; 2]; 2];
    for (i, kernel) in [true, false].into_iter().enumerate() {
        let (vm, file) = if kernel {
            let f = backend
                .create_guest_memfd(len, flags)
                .map_err(|e| e.to_string())?;
            (
                Vm::on_kernel_backend(backend, 1).map_err(|e| e.to_string())?,
                in_place(Arc::new(f)).map_err(|e| e.to_string())?,
            )
        } else {
            let f = EmulatedGuestMemfd::create(len, flags).map_err(|e| e.to_string())?;
            (
                Vm::new(1).map_err(|e| e.to_string())?,
                in_place(Arc::new(f)).map_err(|e| e.to_string())?,
            )
        };
        vm.bind(DATA_GPA, &file, 0, len)
            .map_err(|e| e.to_string())?;
        let mut p = GuestProgram::new(0, RequestPath::Port);
        for r in 0..=reps {
            let id = u32::try_from(r * 3).map_err(|e| e.to_string())?;
            p.sync(id);
            p.fill(DATA_GPA, len, 1);
            p.sync(id + 1);
            p.fill(DATA_GPA, len, 2);
            p.sync(id + 2);
        }
        p.done();
        let program = p.finish().map_err(|e| e.to_string())?;
        let mut vcpu = vm.create_vcpu(0, program).map_err(|e| e.to_string())?;
        let (mut first, mut again) = (Vec::new(), Vec::new());
        for r in 0..=reps {
            // At sync 3r the host punches the range: the next fill faults every page in.
            let ev = vcpu.run(&vm).map_err(|e| e.to_string())?;
            if !matches!(ev, Event::Sync(_)) {
                return Err(format!("unexpected {ev:?}"));
            }
            file.punch_hole(0, len).map_err(|e| e.to_string())?;
            let t = Instant::now();
            vcpu.run(&vm).map_err(|e| e.to_string())?;
            let t1 = t.elapsed().as_secs_f64() * 1e6;
            let t = Instant::now();
            vcpu.run(&vm).map_err(|e| e.to_string())?;
            let t2 = t.elapsed().as_secs_f64() * 1e6;
            if r > 0 {
                first.push(t1);
                again.push(t2);
            }
        }
        let ev = vcpu.run(&vm).map_err(|e| e.to_string())?;
        if ev != Event::Done {
            return Err(format!("expected the end, got {ev:?}"));
        }
        out[i] = [median(&mut first), median(&mut again)];
    }
    Ok((out[0], out[1]))
}

/// Number of progress steps [`run`] reports.
pub fn steps(options: Options) -> usize {
    conversion_sizes(options.quick).len() + round_trip_sizes(options.quick).len() + 2 + 2 + 4
}

/// Runs every section.
pub fn run(options: Options, progress: Progress<'_>) -> Result<Report, BenchError> {
    let total = steps(options);
    let mut done = 0usize;
    let mut step = |what: &str| {
        progress(done, total, what);
        done += 1;
    };
    let mut report = Report::default();
    let names = ["in-place", "two-backing", "two-backing+copy"];

    // 1. conversion latency
    let mut curves: Vec<Curve> = Vec::new();
    for m in names {
        for what in ["to_private populated", "to_shared populated"] {
            curves.push(Curve {
                label: format!("{m} {what}"),
                points: Vec::new(),
            });
        }
    }
    for (label, len, reps) in conversion_sizes(options.quick) {
        step(&format!("conversion {label}"));
        let med = ctx(conversion_medians(len, reps), || {
            format!("conversion {label}")
        })?;
        let what = [
            "to_private populated",
            "to_shared populated",
            "to_private unpopulated",
            "to_shared unpopulated",
        ];
        for (j, w) in what.iter().enumerate() {
            for (b, preserve) in [(1usize, "destructive"), (2, "preserving")] {
                report.lines.push(Measurement {
                    group: "conversion",
                    figure: fig(
                        format!("in-place {w} {label}"),
                        med[0][j],
                        format!("two-backing {preserve}"),
                        med[b][j],
                    ),
                    unit: Unit::Micros,
                    samples: reps,
                });
            }
        }
        for (mi, m) in med.iter().enumerate() {
            for j in 0..2 {
                curves[mi * 2 + j].points.push((len, m[j]));
            }
        }
    }
    report.curves = curves;

    // 2. round trip
    for (label, len, reps) in round_trip_sizes(options.quick) {
        step(&format!("round trip {label}"));
        for (every, how) in [(true, "every page touched"), (false, "first page touched")] {
            let med = ctx(round_trip_medians(len, reps, every), || {
                format!("round trip {label}")
            })?;
            for (b, preserve) in [(2usize, "preserving"), (1, "destructive")] {
                report.lines.push(Measurement {
                    group: "round-trip",
                    figure: fig(
                        format!("in-place round trip {label}, {how}"),
                        med[0],
                        format!("two-backing {preserve}"),
                        med[b],
                    ),
                    unit: Unit::Micros,
                    samples: reps,
                });
            }
            // The best any in-place round trip can do here: zaps and re-faults alone.
            report.lines.push(Measurement {
                group: "round-trip",
                figure: fig(
                    format!("floor round trip {label}, {how} (zaps + re-faults, no conversion)"),
                    med[3],
                    "two-backing preserving".into(),
                    med[2],
                ),
                unit: Unit::Micros,
                samples: reps,
            });
        }
    }

    // 3. guest-driven round trips through a real vCPU, both models
    step("vCPU round trips");
    match vcpu_round_trips(options.quick) {
        Ok(lines) => report.lines.extend(lines),
        Err(why) => report.skipped.push(format!("vCPU round trips: {why}")),
    }
    // 4. `gmem run` end to end on each model
    match workload_lines(options.quick) {
        Ok(lines) => report.lines.extend(lines),
        Err(why) => report.skipped.push(format!("gmem run workload: {why}")),
    }
    step("workload end to end");

    // 5. footprint
    for (label, frag) in [("2MiB", 2u64 << 20), ("4KiB", PAGE_SIZE)] {
        step(&format!("footprint, half shared in {label} fragments"));
        let mib = KINDS
            .iter()
            .map(|&k| footprint_mib(k, frag))
            .collect::<KernelResult<Vec<_>>>();
        let mib = ctx(mib, || format!("footprint {label}"))?;
        for (b, preserve) in [(1usize, "destructive"), (2, "preserving")] {
            report.lines.push(Measurement {
                group: "footprint",
                figure: fig(
                    format!("in-place footprint 1GiB, half shared in {label} fragments"),
                    mib[0],
                    format!("two-backing {preserve}"),
                    mib[b],
                ),
                unit: Unit::Mebibytes,
                samples: 1,
            });
        }
    }

    // 6. kernel against emulated
    let mut kernel_lines = Vec::new();
    let mut inner_step = |what: &str| step(what);
    if let Err(why) = kernel_section(options.quick, &mut kernel_lines, &mut inner_step) {
        report.skipped.push(format!("kernel vs emulated: {why}"));
    }
    report.lines.extend(kernel_lines);
    Ok(report)
}

/// Median guest-driven round trip through a real vCPU: the guest exits (sync), the VMM
/// converts the range to private, the guest writes all of it (`rep stosq`) and exits, the VMM
/// converts it to shared and the host touches every page, the guest exits again.
fn vcpu_round_trip(kind: BackingKind, len: u64, reps: usize) -> Result<f64, String> {
    use gmem_vmm::guest::DATA_GPA;
    use gmem_vmm::{Event, GuestProgram, RequestPath, Vm};
    let s = |e: &dyn std::fmt::Display| e.to_string();
    let vm = Vm::new(1).map_err(|e| s(&e))?;
    let model = create_backing(kind, len, false).map_err(|e| s(&e))?;
    vm.bind(DATA_GPA, &model, 0, len).map_err(|e| s(&e))?;
    model.host_touch(0, len, 0).map_err(|e| s(&e))?;
    let mut p = GuestProgram::new(0, RequestPath::Port);
    for r in 0..=reps {
        let id = u32::try_from(2 * r).map_err(|e| s(&e))?;
        p.sync(id);
        p.fill(DATA_GPA, len, (r % 250) as u8 + 1);
        p.sync(id + 1);
    }
    p.sync(u32::MAX);
    p.done();
    let mut vcpu = vm
        .create_vcpu(0, p.finish().map_err(|e| s(&e))?)
        .map_err(|e| s(&e))?;
    let mut run = |expect: Event| -> Result<(), String> {
        match vcpu.run(&vm) {
            Ok(ev) if ev == expect => Ok(()),
            Ok(ev) => Err(format!("expected {expect:?}, got {ev:?}")),
            Err(e) => Err(s(&e)),
        }
    };
    run(Event::Sync(0))?;
    let mut v = Vec::new();
    for r in 0..=reps {
        let id = u32::try_from(2 * r).map_err(|e| s(&e))?;
        let t = Instant::now();
        model.set_private(0, len).map_err(|e| s(&e))?;
        run(Event::Sync(id + 1))?;
        model.set_shared(0, len).map_err(|e| s(&e))?;
        model.host_touch(0, len, 7).map_err(|e| s(&e))?;
        run(Event::Sync(if r == reps { u32::MAX } else { id + 2 }))?;
        if r > 0 {
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    run(Event::Done)?;
    Ok(median(&mut v))
}

/// The guest-driven round trips, in-place against both two-backing variants.
fn vcpu_round_trips(quick: bool) -> Result<Vec<Measurement>, String> {
    gmem_vmm::kvm_available()?;
    let mut out = Vec::new();
    let sizes: [(&str, u64, usize); 2] = [
        ("4KiB", PAGE_SIZE, if quick { 51 } else { 201 }),
        ("2MiB", 2 << 20, if quick { 7 } else { 21 }),
    ];
    for (label, len, reps) in sizes {
        // One vCPU per model, run back to back: in-place runs first and last (bracketing the
        // two-backing runs in time) and the mean of its two medians is reported.
        let a = vcpu_round_trip(BackingKind::InPlace(BackendKind::Emulated), len, reps)?;
        let d = vcpu_round_trip(KINDS[1], len, reps)?;
        let c = vcpu_round_trip(KINDS[2], len, reps)?;
        let b = vcpu_round_trip(BackingKind::InPlace(BackendKind::Emulated), len, reps)?;
        let inplace = (a + b) / 2.0;
        for (x, preserve) in [(c, "preserving"), (d, "destructive")] {
            out.push(Measurement {
                group: "vcpu",
                figure: fig(
                    format!("in-place vCPU round trip {label} (guest writes all)"),
                    inplace,
                    format!("two-backing {preserve}"),
                    x,
                ),
                unit: Unit::Micros,
                samples: reps,
            });
        }
    }
    Ok(out)
}

/// `gmem run` on each model, interleaved, five times: its end-to-end wall time, and (on real
/// vCPUs) its 4 KiB guest-driven conversion round trip, in-place against both two-backing
/// variants and against a bare exit plus a 4 KiB conversion.
fn workload_lines(quick: bool) -> Result<Vec<Measurement>, String> {
    use gmem_check::workload::{run, Config, Report};
    let reps = 5;
    let config = |memory| Config {
        samples: if quick { 100 } else { 400 },
        check_hypercall: false,
        memory,
        ..Config::default()
    };
    let mut runs: [Vec<Report>; 3] = Default::default();
    for _ in 0..reps {
        for (k, v) in KINDS.iter().zip(runs.iter_mut()) {
            let r = run(&config(*k)).map_err(|e| format!("gmem run --model {k}: {e}"))?;
            if r.mismatches != 0 {
                return Err(format!(
                    "gmem run --model {k}: {} mismatches: {:?}",
                    r.mismatches, r.mismatch_details
                ));
            }
            v.push(r);
        }
    }
    let med = |v: &[Report], f: &dyn Fn(&Report) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        median(&mut x)
    };
    let c = config(BackingKind::InPlace(BackendKind::Emulated));
    let mode = runs[0].first().map_or("", |r| r.mode.name()).to_string();
    let baselines = [
        (2usize, "two-backing preserving"),
        (1, "two-backing destructive"),
    ];
    let mut out = Vec::new();
    for (b, name) in baselines {
        out.push(Measurement {
            group: "workload",
            figure: fig(
                format!(
                    "in-place gmem run end to end ({mode}, {} vCPUs, {} MiB, {} samples)",
                    c.vcpus, c.mem_mib, c.samples
                ),
                med(&runs[0], &|r| r.elapsed_us),
                name.into(),
                med(&runs[b], &|r| r.elapsed_us),
            ),
            unit: Unit::Micros,
            samples: reps,
        });
    }
    if mode != "kvm" {
        return Ok(out);
    }
    let rt = |r: &Report| r.conversion_round_trip_us;
    out.push(Measurement {
        group: "vcpu",
        figure: fig(
            "in-place gmem run vCPU 4KiB conversion round trip".into(),
            med(&runs[0], &rt),
            "bare exit round trip + 4KiB conversion".into(),
            med(&runs[0], &|r| {
                r.exit_round_trip_us.unwrap_or(0.0) + r.conversion_4k_us
            }),
        ),
        unit: Unit::Micros,
        samples: reps,
    });
    for (b, name) in baselines {
        out.push(Measurement {
            group: "vcpu",
            figure: fig(
                "in-place gmem run vCPU 4KiB conversion round trip".into(),
                med(&runs[0], &rt),
                name.into(),
                med(&runs[b], &rt),
            ),
            unit: Unit::Micros,
            samples: reps,
        });
    }
    Ok(out)
}

/// Conversion latency curves as an SVG (log-log).
pub fn svg(curves: &[Curve]) -> String {
    const W: f64 = 760.0;
    const H: f64 = 480.0;
    const L: f64 = 70.0;
    const R: f64 = 230.0;
    const T: f64 = 30.0;
    const B: f64 = 50.0;
    let pts: Vec<(f64, f64)> = curves
        .iter()
        .flat_map(|c| c.points.iter())
        .filter(|p| p.1 > 0.0)
        .map(|&(x, y)| ((x as f64).log10(), y.log10()))
        .collect();
    if pts.is_empty() {
        return String::from(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"10\" height=\"10\"/>\n",
        );
    }
    let fold = |f: fn(f64, f64) -> f64, init: f64, sel: fn(&(f64, f64)) -> f64| {
        pts.iter().map(sel).fold(init, f)
    };
    let (x0, x1) = (
        fold(f64::min, f64::MAX, |p| p.0) - 0.2,
        fold(f64::max, f64::MIN, |p| p.0) + 0.2,
    );
    let mut xs: Vec<f64> = pts.iter().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
    let (y0, y1) = (
        fold(f64::min, f64::MAX, |p| p.1).floor(),
        fold(f64::max, f64::MIN, |p| p.1).ceil(),
    );
    let (x1, y1) = (x1.max(x0 + 1.0), y1.max(y0 + 1.0));
    let sx = |x: f64| L + (x - x0) / (x1 - x0) * (W - L - R);
    let sy = |y: f64| H - B - (y - y0) / (y1 - y0) * (H - T - B);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"13\">conversion latency \
         (median) against range size, log-log</text>\n",
        (W - R + L) / 2.0
    );
    // Grid and axis labels at powers of ten (y) and of 2^... (x: decades of bytes).
    let mut y = y0;
    while y <= y1 + 1e-9 {
        let py = sy(y);
        s += &format!(
            "<line x1=\"{L}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            W - R,
            L - 6.0,
            py + 4.0,
            human_us(10f64.powf(y))
        );
        y += 1.0;
    }
    for &x in &xs {
        let px = sx(x);
        s += &format!(
            "<line x1=\"{px:.1}\" y1=\"{T}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            H - B,
            H - B + 16.0,
            human_bytes(10f64.powf(x))
        );
    }
    s += &format!(
        "<rect x=\"{L}\" y=\"{T}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"none\" \
         stroke=\"black\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">range \
         size</text>\n<text transform=\"translate(16,{:.1}) rotate(-90)\" \
         text-anchor=\"middle\">latency</text>\n",
        W - L - R,
        H - T - B,
        (W - R + L) / 2.0,
        H - 12.0,
        (H - B + T) / 2.0
    );
    let colors = [
        "#1f77b4", "#aec7e8", "#d62728", "#ff9896", "#2ca02c", "#98df8a", "#9467bd", "#c5b0d5",
    ];
    for (i, c) in curves.iter().enumerate() {
        let color = colors[i % colors.len()];
        let dash = if i % 2 == 1 {
            " stroke-dasharray=\"5,3\""
        } else {
            ""
        };
        let path: Vec<String> = c
            .points
            .iter()
            .filter(|p| p.1 > 0.0)
            .map(|&(x, y)| format!("{:.1},{:.1}", sx((x as f64).log10()), sy(y.log10())))
            .collect();
        s += &format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>\n",
            path.join(" ")
        );
        for p in &path {
            let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
            s += &format!("<circle cx=\"{px}\" cy=\"{py}\" r=\"3\" fill=\"{color}\"/>\n");
        }
        let ly = T + 10.0 + 18.0 * i as f64;
        s += &format!(
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{color}\" \
             stroke-width=\"2\"{dash}/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            W - R + 10.0,
            W - R + 34.0,
            W - R + 40.0,
            ly + 4.0,
            xml_escape(&c.label)
        );
    }
    s += "</svg>\n";
    s
}

fn human_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.0} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.0} ms", us / 1e3)
    } else if us >= 1.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.0} ns", us * 1e3)
    }
}

fn human_bytes(b: f64) -> String {
    let b = b * 1.000_001;
    if b >= f64::from(1u32 << 30) {
        format!("{:.0} GiB", b / f64::from(1u32 << 30))
    } else if b >= f64::from(1u32 << 20) {
        format!("{:.0} MiB", b / f64::from(1u32 << 20))
    } else if b >= 1024.0 {
        format!("{:.0} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_is_well_formed_and_log_scaled() {
        let curves = vec![Curve {
            label: "a <b>".into(),
            points: vec![(4096, 2.0), (1 << 30, 20_000.0)],
        }];
        let s = svg(&curves);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("a &lt;b&gt;"));
        assert_eq!(s.matches("<polyline").count(), 1);
        assert!(svg(&[]).contains("<svg"));
    }
}
