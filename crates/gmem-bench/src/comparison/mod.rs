//! `gmem bench`: in-place conversion against the two-backing model, and the kernel backend
//! against the emulated one, measured side by side in one run (medians of at least five
//! repetitions, models interleaved within each repetition so that machine noise hits both).
//! One file per section:
//!
//! 1. [`conversion`](conversion_sizes): conversion latency for 4 KiB … 1 GiB, populated and
//!    unpopulated, in-place against two-backing with and without content preservation;
//! 2. `round_trip`: the full round trip (to private, guest touches, to shared, host touches),
//!    beside its floor on this host (zaps and re-faults alone);
//! 3. `vcpu`: guest-driven round trips through a real vCPU for both models (the guest exits,
//!    the VMM converts, the guest writes the range, the VMM converts back and touches it):
//!    in-place binds the emulated file with [`gmem_vmm::Vm::bind`], two-backing binds its
//!    composite guest view as a plain memslot;
//! 4. `workload`: the `gmem run` workload end to end on each model (`workload::Config::memory`),
//!    and its 4 KiB guest-driven conversion round trip;
//! 5. `footprint`: memory footprint of a 1 GiB guest half shared in 2 MiB and in 4 KiB
//!    fragments;
//! 6. `kernel`: operations both backends have, kernel against emulated (needs `/dev/kvm`).
//!
//! The conversion curves are drawn by [`svg`].
//!
//! "Touch" means one write to the first byte of every page: it measures faults and
//! conversion work, not memset bandwidth (which both models pay equally).

use std::sync::Arc;

use gmem::file::BackendKind;
use gmem_vmm::backing::{BackingKind, GuestBacking, InPlace};
use gmem_vmm::two_backing::{TwoBacking, TwoBackingOptions};

use crate::floor::Figure;

mod conversion;
mod folios;
mod footprint;
mod kernel;
mod plot;
mod round_trip;
mod target;
mod vcpu;
mod workload;

pub use crate::error::BenchError;
pub use conversion::conversion_sizes;
pub use plot::svg;
pub use target::{targets, Target, TargetOutcome, TARGETS};

/// Unit of a measurement's two figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Microseconds (a median).
    Micros,
    /// Mebibytes (footprint; deterministic, measured once).
    Mebibytes,
    /// Kibibytes (page tables and metadata; measured once).
    Kibibytes,
}

impl Unit {
    /// `us` or `MiB`.
    pub fn name(self) -> &'static str {
        match self {
            Unit::Micros => "us",
            Unit::Mebibytes => "MiB",
            Unit::Kibibytes => "KiB",
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
    /// What the line measures, typed, for the lines a [`Target`] reads (`None` for the
    /// others).
    pub key: Option<LineKey>,
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
    /// The host's shmem THP setting the huge-folio section ran with.
    pub huge_folios_setting: Option<String>,
}

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Fewer repetitions and no 1 GiB conversion (about a minute on a 2-core machine).
    pub quick: bool,
}

/// Progress: (steps done, total steps, what runs now).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, &str);

/// The in-place layout every section measures: the emulated file.
const IN_PLACE_KIND: BackingKind = BackingKind::InPlace(BackendKind::Emulated);

/// Where the in-place layout's figure stands among figures measured per layout of
/// [`BackingKind::ALL`].
const IN_PLACE: usize = 0;
const _: () = assert!(matches!(
    BackingKind::ALL[IN_PLACE],
    BackingKind::InPlace(BackendKind::Emulated)
));

/// The two-backing layouts in-place is compared against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// Two-backing, contents discarded on conversion (SNP/TDX-style).
    Destructive,
    /// Two-backing, contents copied across before the discard (pKVM-style).
    Preserving,
}

impl Baseline {
    /// Its layout.
    pub fn kind(self) -> BackingKind {
        BackingKind::TwoBacking {
            preserve_content: self == Baseline::Preserving,
        }
    }

    /// How the report names it: `two-backing destructive` or `two-backing preserving`.
    pub fn label(self) -> &'static str {
        match self {
            Baseline::Destructive => "two-backing destructive",
            Baseline::Preserving => "two-backing preserving",
        }
    }

    /// Where its figure stands among figures measured per layout of [`BackingKind::ALL`].
    fn index(self) -> usize {
        let kind = self.kind();
        BackingKind::ALL
            .iter()
            .position(|&k| k == kind)
            .expect("BackingKind::ALL holds both two-backing layouts")
    }
}

/// How much of its range a round trip touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    /// Every page.
    EveryPage,
    /// Only the first page.
    FirstPage,
}

impl Touch {
    /// `every page touched` or `first page touched`.
    pub fn label(self) -> &'static str {
        match self {
            Touch::EveryPage => "every page touched",
            Touch::FirstPage => "first page touched",
        }
    }
}

/// What a line measures, typed: a [`Target`] finds the line it reads by this key, never by
/// the line's printed name (which [`LineKey::name`] derives from the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKey {
    /// The in-place round trip of `bytes`, against `baseline`.
    RoundTrip {
        /// Range size.
        bytes: u64,
        /// What the round trip touches.
        touch: Touch,
        /// What it is compared against.
        baseline: Baseline,
    },
    /// The same round trip with zaps and re-faults only (the floor of any in-place round
    /// trip on this host), against `baseline`.
    RoundTripFloor {
        /// Range size.
        bytes: u64,
        /// What the round trip touches.
        touch: Touch,
        /// What it is compared against.
        baseline: Baseline,
    },
    /// The in-place footprint of a 1 GiB guest half shared in `fragment`-byte pieces,
    /// against `baseline`.
    Footprint {
        /// Fragment size.
        fragment: u64,
        /// What it is compared against.
        baseline: Baseline,
    },
}

impl LineKey {
    /// The line's name in the report.
    pub fn name(self) -> String {
        match self {
            LineKey::RoundTrip { bytes, touch, .. } => {
                format!(
                    "in-place round trip {}, {}",
                    size_label(bytes),
                    touch.label()
                )
            }
            LineKey::RoundTripFloor { bytes, touch, .. } => format!(
                "floor round trip {}, {} (zaps + re-faults, no conversion)",
                size_label(bytes),
                touch.label()
            ),
            LineKey::Footprint { fragment, .. } => format!(
                "in-place footprint 1GiB, half shared in {} fragments",
                size_label(fragment)
            ),
        }
    }

    /// What the line is compared against.
    pub fn baseline(self) -> Baseline {
        match self {
            LineKey::RoundTrip { baseline, .. }
            | LineKey::RoundTripFloor { baseline, .. }
            | LineKey::Footprint { baseline, .. } => baseline,
        }
    }

    /// The floor line of a round trip (the same round trip, zaps and re-faults alone,
    /// against the same baseline): the smallest ratio any in-place implementation could reach
    /// on this host. `None` for other lines.
    pub fn floor(self) -> Option<LineKey> {
        match self {
            LineKey::RoundTrip {
                bytes,
                touch,
                baseline,
            } => Some(LineKey::RoundTripFloor {
                bytes,
                touch,
                baseline,
            }),
            _ => None,
        }
    }

    /// The line: this key's name and baseline with their figures.
    fn measurement(
        self,
        group: &'static str,
        value: f64,
        baseline_value: f64,
        unit: Unit,
        samples: usize,
    ) -> Measurement {
        Measurement {
            group,
            figure: Figure::new(self.name(), value, self.baseline().label(), baseline_value),
            unit,
            samples,
            key: Some(self),
        }
    }
}

/// `4KiB`, `64KiB`, `2MiB`, `1GiB`: a power-of-two size as the report names it.
pub fn size_label(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => format!("{b}B"),
    }
}

/// A guest of `size` bytes in layout `kind` (in place: an emulated file with default
/// options and its guest view), all shared or all private.
pub fn create_backing(
    kind: BackingKind,
    size: u64,
    private: bool,
) -> Result<Arc<dyn GuestBacking>, BenchError> {
    Ok(match kind {
        BackingKind::InPlace(_) => Arc::new(InPlace::emulated(
            size,
            private,
            gmem::EmulatedOptions::default(),
        )?),
        BackingKind::TwoBacking { preserve_content } => Arc::new(TwoBacking::new(
            size,
            private,
            TwoBackingOptions { preserve_content },
        )?),
    })
}

/// Number of progress steps [`run`] reports.
pub fn steps(options: Options) -> usize {
    conversion_sizes(options.quick).len()
        + round_trip::round_trip_sizes(options.quick).len()
        + 2
        + 2
        + 4
        + 2
}

/// Runs every section.
pub fn run(options: Options, progress: Progress<'_>) -> Result<Report, BenchError> {
    let quick = options.quick;
    let total = steps(options);
    let mut done = 0usize;
    let mut step = |what: &str| {
        progress(done, total, what);
        done += 1;
    };
    let mut report = Report::default();
    conversion::measure(quick, &mut step, &mut report)?;
    round_trip::measure(quick, &mut step, &mut report.lines)?;
    step("vCPU round trips");
    match vcpu::round_trips(quick) {
        Ok(lines) => report.lines.extend(lines),
        Err(why) => report.skipped.push(format!("vCPU round trips: {why}")),
    }
    match workload::lines(quick) {
        Ok(lines) => report.lines.extend(lines),
        Err(why) => report.skipped.push(format!("gmem run workload: {why}")),
    }
    step("workload end to end");
    footprint::measure(&mut step, &mut report.lines, &mut report.skipped)?;
    let mut kernel_lines = Vec::new();
    if let Err(why) = kernel::measure(quick, &mut kernel_lines, &mut step) {
        report.skipped.push(format!("kernel vs emulated: {why}"));
    }
    report.lines.extend(kernel_lines);
    let mut huge_lines = Vec::new();
    match folios::measure(quick, &mut step, &mut huge_lines) {
        Ok(setting) => {
            report.huge_folios_setting = Some(setting);
            report.lines.extend(huge_lines);
        }
        Err(why) => report.skipped.push(format!("huge folios: {why}")),
    }
    Ok(report)
}
