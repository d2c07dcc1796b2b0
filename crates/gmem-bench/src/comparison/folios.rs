//! Section `huge-folios`: the round trips of the round-trip section with 2 MiB folios
//! (`FolioSize::Huge`, shmem THP) beside the same with 4 KiB folios, two-backing with copy,
//! and a floor on 2 MiB folios; a 1 GiB populated round trip; the conversion of one 4 KiB page
//! inside a 2 MiB folio (split) and back (merge) against the same in a 4 KiB file; page tables
//! and metadata of a 1 GiB guest all huge against all 4 KiB. Skipped, with the reason, where
//! the host offers no shmem THP.

use std::sync::Arc;

use crate::floor::Figure;
use gmem::{FolioSize, PAGE_SIZE};
use gmem_vmm::backing::{GuestBacking, InPlace};
use gmem_vmm::stats::{median, time_us};

use super::round_trip::RoundTripFloor;
use super::{create_backing, Baseline, Measurement, Touch, Unit};
use crate::error::BenchError;

const GROUP: &str = "huge-folios";
const HUGE: usize = 2 << 20;

fn in_place(size: u64, folio_size: FolioSize) -> Result<Arc<InPlace>, BenchError> {
    Ok(Arc::new(InPlace::emulated(
        size,
        false,
        gmem::EmulatedOptions {
            folio_size,
            ..gmem::EmulatedOptions::default()
        },
    )?))
}

fn line(name: String, value: f64, baseline: &str, base: f64, samples: usize) -> Measurement {
    Measurement {
        group: GROUP,
        figure: Figure::new(name, value, baseline, base),
        unit: Unit::Micros,
        samples,
        key: None,
    }
}

/// One in-place round trip of `len` bytes touching `touched` of them with value `v`.
fn round_trip(m: &dyn GuestBacking, len: u64, touched: u64, v: u8) -> Result<(), BenchError> {
    m.set_private(0, len)?;
    m.guest_touch(0, touched, v)?;
    m.set_shared(0, len)?;
    m.host_touch(0, touched, v)?;
    Ok(())
}

/// The 2 MiB round trips, both touch patterns: huge, small, two-backing with copy, floor.
fn round_trips(reps: usize, lines: &mut Vec<Measurement>) -> Result<(), BenchError> {
    let len = HUGE as u64;
    let huge = in_place(len, FolioSize::Huge)?;
    let small = in_place(len, FolioSize::Small)?;
    let copy = create_backing(Baseline::Preserving.kind(), len, false)?;
    let floor = RoundTripFloor::new_huge(len)?;
    for m in [&*huge as &dyn GuestBacking, &*small, &*copy] {
        m.host_touch(0, len, 1)?;
    }
    floor.round_trip(len, 1)?;
    for touch in [Touch::EveryPage, Touch::FirstPage] {
        let touched = match touch {
            Touch::EveryPage => len,
            Touch::FirstPage => PAGE_SIZE,
        };
        let mut s: [Vec<f64>; 4] = Default::default();
        for rep in 0..reps + 2 {
            let v = (rep % 250) as u8 + 1;
            let t = [
                time_us(|| round_trip(&*huge, len, touched, v))?,
                time_us(|| round_trip(&*small, len, touched, v))?,
                time_us(|| round_trip(&*copy, len, touched, v))?,
                time_us(|| floor.round_trip(touched, v).map_err(BenchError::from))?,
            ];
            if rep >= 2 {
                for (s, t) in s.iter_mut().zip(t) {
                    s.push(t);
                }
            }
        }
        let [h, sm, cp, fl] = s.map(|mut v| median(&mut v));
        let name = format!("in-place round trip 2MiB, {}, 2 MiB folios", touch.label());
        lines.push(line(name.clone(), h, "two-backing+copy", cp, reps));
        lines.push(line(name.clone(), h, "the same, 4 KiB folios", sm, reps));
        lines.push(line(
            name,
            h,
            "floor on 2 MiB folios (both mappings PMD)",
            fl,
            reps,
        ));
        lines.push(line(
            format!("floor round trip 2MiB, {}, 2 MiB folios", touch.label()),
            fl,
            "two-backing+copy",
            cp,
            reps,
        ));
    }
    Ok(())
}

/// 1 GiB, every page populated (host-touched), to private and back: huge against small.
fn gib_round_trip(reps: usize, lines: &mut Vec<Measurement>) -> Result<(), BenchError> {
    let len = 1u64 << 30;
    let mut med = Vec::new();
    for folio_size in [FolioSize::Huge, FolioSize::Small] {
        let m = in_place(len, folio_size)?;
        m.host_touch(0, len, 1)?;
        let mut s = Vec::new();
        for _ in 0..reps {
            s.push(time_us(|| -> Result<(), BenchError> {
                m.set_private(0, len)?;
                m.set_shared(0, len)?;
                Ok(())
            })?);
            // Populated again for the next sample.
            m.host_touch(0, len, 2)?;
        }
        med.push(median(&mut s));
    }
    lines.push(line(
        "in-place 1GiB populated, to private and back, 2 MiB folios".to_string(),
        med[0],
        "the same, 4 KiB folios",
        med[1],
        reps,
    ));
    Ok(())
}

/// One page converted inside an allocated 2 MiB folio (split) and back (merge), against the
/// same conversions in a file of 4 KiB folios.
fn split_merge(reps: usize, lines: &mut Vec<Measurement>) -> Result<(), BenchError> {
    let len = HUGE as u64;
    let mut med = Vec::new();
    for folio_size in [FolioSize::Huge, FolioSize::Small] {
        let m = in_place(len, folio_size)?;
        m.host_touch(0, len, 1)?;
        let (mut to_p, mut to_s) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            m.host_touch(5 * PAGE_SIZE, PAGE_SIZE, 3)?;
            to_p.push(time_us(|| m.set_private(5 * PAGE_SIZE, PAGE_SIZE))?);
            to_s.push(time_us(|| m.set_shared(5 * PAGE_SIZE, PAGE_SIZE))?);
        }
        med.push((median(&mut to_p), median(&mut to_s)));
    }
    lines.push(line(
        "4KiB to private inside a 2 MiB folio (split)".to_string(),
        med[0].0,
        "the same in a 4 KiB file",
        med[1].0,
        reps,
    ));
    lines.push(line(
        "4KiB to shared, the folio whole again (merge)".to_string(),
        med[0].1,
        "the same in a 4 KiB file",
        med[1].1,
        reps,
    ));
    Ok(())
}

/// This process's page tables (`VmPTE`, KiB).
fn vm_pte_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmPTE:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Page tables of a 1 GiB guest all mapped by the guest and all mapped by the host, and
/// gmem's metadata, huge against small (KiB; measured once).
fn tables(lines: &mut Vec<Measurement>) -> Result<(), BenchError> {
    let len = 1u64 << 30;
    let mut got = Vec::new();
    for folio_size in [FolioSize::Huge, FolioSize::Small] {
        let m = in_place(len, folio_size)?;
        let before = vm_pte_kib();
        m.guest_touch(0, len, 1)?;
        let guest = vm_pte_kib().saturating_sub(before);
        m.host_touch(0, len, 1)?;
        let host = vm_pte_kib().saturating_sub(before + guest);
        let meta = m.file().metadata_bytes() as f64 / 1024.0;
        got.push((guest as f64, host as f64, meta));
    }
    let mk = |name: &str, v: f64, base: f64| Measurement {
        group: GROUP,
        figure: Figure::new(name.to_string(), v, "the same, 4 KiB folios", base),
        unit: Unit::Kibibytes,
        samples: 1,
        key: None,
    };
    lines.push(mk(
        "page tables of the guest's view, 1GiB all touched, 2 MiB folios",
        got[0].0,
        got[1].0,
    ));
    lines.push(mk(
        "page tables of the host mapping, 1GiB all touched, 2 MiB folios",
        got[0].1,
        got[1].1,
    ));
    lines.push(mk("gmem metadata, 1GiB, 2 MiB folios", got[0].2, got[1].2));
    Ok(())
}

/// Runs the section: its lines into `lines`; `Err(why)` when the host has no shmem THP.
pub(super) fn measure(
    quick: bool,
    step: &mut dyn FnMut(&str),
    lines: &mut Vec<Measurement>,
) -> Result<String, String> {
    let setting = gmem::host::huge_folios().map_err(|e| e.to_string())?;
    let run = |lines: &mut Vec<Measurement>, step: &mut dyn FnMut(&str)| {
        step("huge folios: round trips");
        round_trips(if quick { 15 } else { 51 }, lines)?;
        step("huge folios: 1 GiB");
        gib_round_trip(if quick { 3 } else { 5 }, lines)?;
        split_merge(if quick { 101 } else { 401 }, lines)?;
        tables(lines)
    };
    run(lines, step).map_err(|e: BenchError| e.to_string())?;
    Ok(setting)
}
