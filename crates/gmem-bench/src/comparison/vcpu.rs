//! Section 3: guest-driven round trips through a real vCPU for each layout (the guest exits,
//! the VMM converts, the guest writes the range, the VMM converts back and touches it):
//! in-place binds the emulated file with [`gmem_vmm::Vm::bind`], two-backing binds its
//! composite guest view as a plain memslot.

use std::time::Instant;

use gmem::PAGE_SIZE;
use gmem_vmm::backing::BackingKind;
use gmem_vmm::guest::DATA_GPA;
use gmem_vmm::stats::median;
use gmem_vmm::{Event, GuestProgram, RequestPath, Vm};

use super::{create_backing, Baseline, Measurement, Unit, IN_PLACE_KIND};
use crate::error::BenchError;
use crate::floor::Figure;

/// Median guest-driven round trip through a real vCPU: the guest exits (sync), the VMM
/// converts the range to private, the guest writes all of it (`rep stosq`) and exits, the VMM
/// converts it to shared and the host touches every page, the guest exits again.
fn vcpu_round_trip(kind: BackingKind, len: u64, reps: usize) -> Result<f64, BenchError> {
    let vm = Vm::new(1)?;
    let model = create_backing(kind, len, false)?;
    vm.bind(gmem_vmm::Gpa(DATA_GPA), &model, 0, len)?;
    model.host_touch(0, len, 0)?;
    let mut p = GuestProgram::new(0, RequestPath::Port);
    for r in 0..=reps {
        let id = u32::try_from(2 * r)?;
        p.sync(id);
        p.fill(DATA_GPA, len, (r % 250) as u8 + 1);
        p.sync(id + 1);
    }
    p.sync(u32::MAX);
    p.done();
    let mut vcpu = vm.create_vcpu(0, p.finish()?)?;
    let mut run = |expect: Event| -> Result<(), BenchError> {
        match vcpu.run(&vm)? {
            ev if ev == expect => Ok(()),
            got => Err(BenchError::UnexpectedEvent {
                expected: format!("{expect:?}"),
                got,
            }),
        }
    };
    run(Event::Sync(0))?;
    let mut v = Vec::new();
    for r in 0..=reps {
        let id = u32::try_from(2 * r)?;
        let t = Instant::now();
        model.set_private(0, len)?;
        run(Event::Sync(id + 1))?;
        model.set_shared(0, len)?;
        model.host_touch(0, len, 7)?;
        run(Event::Sync(if r == reps { u32::MAX } else { id + 2 }))?;
        if r > 0 {
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    run(Event::Done)?;
    Ok(median(&mut v))
}

/// The guest-driven round trips, in-place against both two-backing layouts; `Err` says why
/// they cannot run here.
pub(super) fn round_trips(quick: bool) -> Result<Vec<Measurement>, BenchError> {
    gmem_vmm::kvm_available().map_err(|why| BenchError::NoKvm(why.to_string()))?;
    let mut out = Vec::new();
    let sizes: [(&str, u64, usize); 2] = [
        ("4KiB", PAGE_SIZE, if quick { 51 } else { 201 }),
        ("2MiB", 2 << 20, if quick { 7 } else { 21 }),
    ];
    for (label, len, reps) in sizes {
        // One vCPU per layout, run back to back: in-place runs first and last (bracketing
        // the two-backing runs in time) and the mean of its two medians is reported.
        let a = vcpu_round_trip(IN_PLACE_KIND, len, reps)?;
        let d = vcpu_round_trip(Baseline::Destructive.kind(), len, reps)?;
        let c = vcpu_round_trip(Baseline::Preserving.kind(), len, reps)?;
        let b = vcpu_round_trip(IN_PLACE_KIND, len, reps)?;
        let inplace = (a + b) / 2.0;
        for (x, baseline) in [(c, Baseline::Preserving), (d, Baseline::Destructive)] {
            out.push(Measurement {
                group: "vcpu",
                figure: Figure::new(
                    format!("in-place vCPU round trip {label} (guest writes all)"),
                    inplace,
                    baseline.label(),
                    x,
                ),
                unit: Unit::Micros,
                samples: reps,
                key: None,
            });
        }
    }
    Ok(out)
}
