//! Section 1: conversion latency for 4 KiB … 1 GiB, populated and unpopulated, in-place
//! against two-backing with and without content preservation; its medians are also the
//! plot's curves.

use gmem::PAGE_SIZE;
use gmem_vmm::backing::BackingKind;
use gmem_vmm::stats::{median, time_us};

use super::{create_backing, Baseline, Curve, Measurement, Report, Unit, IN_PLACE};
use crate::error::BenchError;
use crate::floor::Figure;

/// What each conversion median measures, in the order [`conversion_medians`] returns them;
/// the first two are plotted.
const WHAT: [&str; 4] = [
    "to_private populated",
    "to_shared populated",
    "to_private unpopulated",
    "to_shared unpopulated",
];

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

/// Medians per layout of [`BackingKind::ALL`], each in the order of [`WHAT`].
fn conversion_medians(len: u64, reps: usize) -> Result<Vec<[f64; 4]>, BenchError> {
    let models = BackingKind::ALL
        .iter()
        .map(|&k| create_backing(k, len, false))
        .collect::<Result<Vec<_>, _>>()?;
    let mut samples: Vec<[Vec<f64>; 4]> = models.iter().map(|_| Default::default()).collect();
    // One untimed warm-up repetition: the first touch of fresh machine memory costs extra
    // (the outer hypervisor backs it lazily, docs/host-facts.md).
    for rep in 0..=reps {
        for (m, s) in models.iter().zip(samples.iter_mut()) {
            let mut t = [0.0; 4];
            // Populated: the host wrote every page while shared; the guest every page
            // while private.
            m.host_touch(0, len, 1)?;
            t[0] = time_us(|| m.set_private(0, len))?;
            m.guest_touch(0, len, 2)?;
            t[1] = time_us(|| m.set_shared(0, len))?;
            // Unpopulated: no page allocated on either side.
            m.punch_hole(0, len)?;
            t[2] = time_us(|| m.set_private(0, len))?;
            m.punch_hole(0, len)?;
            t[3] = time_us(|| m.set_shared(0, len))?;
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

/// Runs the section: its lines and the plot's curves into `report`.
pub(super) fn measure(
    quick: bool,
    step: &mut dyn FnMut(&str),
    report: &mut Report,
) -> Result<(), BenchError> {
    let mut curves: Vec<Curve> = Vec::new();
    for kind in BackingKind::ALL {
        for what in &WHAT[..2] {
            curves.push(Curve {
                label: format!("{kind} {what}"),
                points: Vec::new(),
            });
        }
    }
    for (label, len, reps) in conversion_sizes(quick) {
        step(&format!("conversion {label}"));
        let med = conversion_medians(len, reps)
            .map_err(|e| e.within(|| format!("conversion {label}")))?;
        for (j, w) in WHAT.iter().enumerate() {
            for b in [Baseline::Destructive, Baseline::Preserving] {
                report.lines.push(Measurement {
                    group: "conversion",
                    figure: Figure::new(
                        format!("in-place {w} {label}"),
                        med[IN_PLACE][j],
                        b.label(),
                        med[b.index()][j],
                    ),
                    unit: Unit::Micros,
                    samples: reps,
                    key: None,
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
    Ok(())
}
