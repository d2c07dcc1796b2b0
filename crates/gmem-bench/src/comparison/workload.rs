//! Section 4: the `gmem run` workload end to end on each layout
//! (`workload::Config::memory`), and its 4 KiB guest-driven conversion round trip.

use gmem_check::workload::{run, Config, Report};
use gmem_vmm::backing::BackingKind;
use gmem_vmm::stats::median;

use super::{Baseline, Measurement, Unit, IN_PLACE, IN_PLACE_KIND};
use crate::error::BenchError;
use crate::floor::Figure;

/// `gmem run` on each layout, interleaved, five times: its end-to-end wall time, and (on
/// real vCPUs) its 4 KiB guest-driven conversion round trip, in-place against both
/// two-backing layouts and against a bare exit plus a 4 KiB conversion.
pub(super) fn lines(quick: bool) -> Result<Vec<Measurement>, BenchError> {
    let reps = 5;
    let config = |memory| Config {
        samples: if quick { 100 } else { 400 },
        check_hypercall: false,
        memory,
        ..Config::default()
    };
    let mut runs: [Vec<Report>; 3] = Default::default();
    for _ in 0..reps {
        for (&model, v) in BackingKind::ALL.iter().zip(runs.iter_mut()) {
            let r = run(&config(model)).map_err(|source| BenchError::Workload { model, source })?;
            if r.mismatches != 0 {
                return Err(BenchError::Mismatches {
                    model,
                    count: r.mismatches,
                    details: r.mismatch_details,
                });
            }
            v.push(r);
        }
    }
    let med = |v: &[Report], f: &dyn Fn(&Report) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        median(&mut x)
    };
    let c = config(IN_PLACE_KIND);
    let in_place = &runs[IN_PLACE];
    let mode = in_place.first().map_or("", |r| r.mode.name()).to_string();
    let baselines = [Baseline::Preserving, Baseline::Destructive];
    let mut out = Vec::new();
    for b in baselines {
        out.push(Measurement {
            group: "workload",
            figure: Figure::new(
                format!(
                    "in-place gmem run end to end ({mode}, {} vCPUs, {} MiB, {} samples)",
                    c.vcpus, c.mem_mib, c.samples
                ),
                med(in_place, &|r| r.elapsed_us),
                b.label(),
                med(&runs[b.index()], &|r| r.elapsed_us),
            ),
            unit: Unit::Micros,
            samples: reps,
            key: None,
        });
    }
    if mode != "kvm" {
        return Ok(out);
    }
    let rt = |r: &Report| r.conversion_round_trip_us;
    out.push(Measurement {
        group: "vcpu",
        figure: Figure::new(
            "in-place gmem run vCPU 4KiB conversion round trip",
            med(in_place, &rt),
            "bare exit round trip + 4KiB conversion",
            med(in_place, &|r| {
                r.exit_round_trip_us.unwrap_or(0.0) + r.conversion_4k_us
            }),
        ),
        unit: Unit::Micros,
        samples: reps,
        key: None,
    });
    for b in baselines {
        out.push(Measurement {
            group: "vcpu",
            figure: Figure::new(
                "in-place gmem run vCPU 4KiB conversion round trip",
                med(in_place, &rt),
                b.label(),
                med(&runs[b.index()], &rt),
            ),
            unit: Unit::Micros,
            samples: reps,
            key: None,
        });
    }
    Ok(out)
}
