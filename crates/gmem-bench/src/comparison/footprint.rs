//! Section 5: memory footprint of a 1 GiB guest half shared in 2 MiB and in 4 KiB fragments,
//! in-place against both two-backing layouts (deterministic: measured once).

use gmem::PAGE_SIZE;
use gmem_vmm::backing::BackingKind;

use super::{create_backing, size_label, Baseline, LineKey, Measurement, Unit, IN_PLACE};
use crate::error::BenchError;

/// Footprint (MiB) of `kind` for a 1 GiB guest that starts private, is written whole by the
/// guest, then has every other `frag`-byte piece converted to shared and written by the host.
fn footprint_mib(kind: BackingKind, frag: u64) -> Result<f64, BenchError> {
    const SIZE: u64 = 1 << 30;
    let m = create_backing(kind, SIZE, true)?;
    m.guest_touch(0, SIZE, 1)?;
    let mut off = 0;
    while off < SIZE {
        m.set_shared(off, frag)?;
        m.host_touch(off, frag, 2)?;
        off += 2 * frag;
    }
    let fp = m.footprint()?;
    Ok(fp.total() as f64 / f64::from(1u32 << 20))
}

/// Why the emulated file cannot hold a guest half shared in `fragment`-byte pieces here, if it
/// cannot: without userfaultfd poison markers it revokes private runs by remapping, one VMA
/// each, and 1 GiB in 4 KiB pieces is 131,072 runs, more than `vm.max_map_count` allows.
fn cannot_fragment(fragment: u64) -> Option<String> {
    let runs = (1u64 << 30) / fragment / 2;
    let why = gmem::Revocation::Guard
        .needs(0)
        .and_then(|n| gmem::host::require(n).err())?;
    // Each hole is charged two VMAs against the budget.
    let budget = gmem::emulated::process_vma_budget().soft;
    (2 * runs > budget as u64).then(|| {
        format!(
            "footprint, half shared in {} fragments: {runs} private runs, and without poison \
             markers ({why}) each is a mapping, past the process's VMA budget ({budget})",
            size_label(fragment)
        )
    })
}

/// Runs the section: its lines into `lines`, what this host cannot run into `skipped`.
pub(super) fn measure(
    step: &mut dyn FnMut(&str),
    lines: &mut Vec<Measurement>,
    skipped: &mut Vec<String>,
) -> Result<(), BenchError> {
    for fragment in [2u64 << 20, PAGE_SIZE] {
        let label = size_label(fragment);
        step(&format!("footprint, half shared in {label} fragments"));
        if let Some(why) = cannot_fragment(fragment) {
            skipped.push(why);
            continue;
        }
        let mib = BackingKind::ALL
            .iter()
            .map(|&k| footprint_mib(k, fragment))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.within(|| format!("footprint {label}")))?;
        for baseline in [Baseline::Destructive, Baseline::Preserving] {
            let key = LineKey::Footprint { fragment, baseline };
            lines.push(key.measurement(
                "footprint",
                mib[IN_PLACE],
                mib[baseline.index()],
                Unit::Mebibytes,
                1,
            ));
        }
    }
    Ok(())
}
