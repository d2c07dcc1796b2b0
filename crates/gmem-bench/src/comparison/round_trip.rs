//! Section 2: the full round trip (to private, guest touches, to shared, host touches) on
//! each layout, beside [`RoundTripFloor`], the least any in-place round trip can cost here.

use gmem::error::KernelResult;

use gmem::PAGE_SIZE;
use gmem_vmm::backing::BackingKind;
use gmem_vmm::stats::{median, time_us};

use super::{create_backing, Baseline, LineKey, Measurement, Touch, Unit, IN_PLACE};

const GROUP: &str = "round-trip";

/// Where [`RoundTripFloor`]'s median stands in [`round_trip_medians`]: after the layouts.
const FLOOR: usize = BackingKind::ALL.len();
use crate::error::BenchError;
use crate::sys::{self, Mmap};

/// Range sizes of the round-trip section: (label, bytes, repetitions).
pub(super) fn round_trip_sizes(quick: bool) -> Vec<(&'static str, u64, usize)> {
    vec![
        ("4KiB", PAGE_SIZE, if quick { 201 } else { 1001 }),
        ("2MiB", 2 << 20, if quick { 15 } else { 51 }),
    ]
}

/// The floor of any in-place round trip on this host: one memfd with a host and a guest
/// mapping, no attributes and no conversion; "to private" only zaps the range's PTEs in both
/// mappings (the host's must go; KVM's stage-2 entries go), "to shared" only zaps the guest's,
/// and the touches re-fault the same pages. No in-place implementation does less.
pub(super) struct RoundTripFloor {
    _fd: std::os::fd::OwnedFd,
    host: Mmap,
    guest: Mmap,
}

impl RoundTripFloor {
    /// The floor on 2 MiB folios: both mappings 2 MiB-aligned with `MADV_HUGEPAGE`, so each
    /// maps a folio with one PMD (where the host offers shmem THP).
    pub(super) fn new_huge(len: u64) -> KernelResult<Self> {
        const HUGE: usize = 2 << 20;
        let fd = sys::memfd(len)?;
        let n = usize::try_from(len).map_err(|_| gmem::Errno::ENOMEM)?;
        let map = || -> KernelResult<Mmap> {
            let m = Mmap::new_aligned(
                Some(std::os::fd::AsFd::as_fd(&fd)),
                0,
                n,
                libc::MAP_SHARED,
                HUGE,
            )?;
            m.madvise(0, n, libc::MADV_HUGEPAGE)?;
            Ok(m)
        };
        let (host, guest) = (map()?, map()?);
        Ok(RoundTripFloor {
            _fd: fd,
            host,
            guest,
        })
    }

    /// A floor for ranges of `len` bytes.
    fn new(len: u64) -> KernelResult<Self> {
        let fd = sys::memfd(len)?;
        let map = || sys::map_shared(&fd, len, libc::MAP_NORESERVE);
        let (host, guest) = (map()?, map()?);
        Ok(RoundTripFloor {
            _fd: fd,
            host,
            guest,
        })
    }

    /// The host writes `v` to every page (before the first round trip).
    fn host_touch(&self, v: u8) -> KernelResult<()> {
        self.host.touch_pages(0, self.host.len() as u64, v)
    }

    /// One round trip: zaps, the guest touches the first `touched` bytes' pages, zap, the
    /// host touches them.
    pub(super) fn round_trip(&self, touched: u64, v: u8) -> KernelResult<()> {
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

/// Median round trip per layout of [`BackingKind::ALL`]: to private, guest touches, to
/// shared, host touches (every page of the range, or only its first page); then, last, the
/// same for [`RoundTripFloor`].
fn round_trip_medians(len: u64, reps: usize, touch: Touch) -> Result<Vec<f64>, BenchError> {
    let touched = match touch {
        Touch::EveryPage => len,
        Touch::FirstPage => PAGE_SIZE,
    };
    let models = BackingKind::ALL
        .iter()
        .map(|&k| create_backing(k, len, false))
        .collect::<Result<Vec<_>, _>>()?;
    let floor = RoundTripFloor::new(len)?;
    let mut samples: Vec<Vec<f64>> = (0..=models.len()).map(|_| Vec::new()).collect();
    for m in &models {
        m.host_touch(0, len, 0)?;
    }
    floor.host_touch(0)?;
    for rep in 0..reps + 2 {
        let v = (rep % 250) as u8 + 1;
        for (m, s) in models.iter().zip(samples.iter_mut()) {
            let t = time_us(|| -> Result<(), BenchError> {
                m.set_private(0, len)?;
                m.guest_touch(0, touched, v)?;
                m.set_shared(0, len)?;
                m.host_touch(0, touched, v)?;
                Ok(())
            })?;
            if rep >= 2 {
                s.push(t);
            }
        }
        let t = time_us(|| floor.round_trip(touched, v))?;
        if rep >= 2 {
            samples[FLOOR].push(t);
        }
    }
    Ok(samples.into_iter().map(|mut v| median(&mut v)).collect())
}

/// Runs the section: its lines into `lines`.
pub(super) fn measure(
    quick: bool,
    step: &mut dyn FnMut(&str),
    lines: &mut Vec<Measurement>,
) -> Result<(), BenchError> {
    for (label, bytes, reps) in round_trip_sizes(quick) {
        step(&format!("round trip {label}"));
        for touch in [Touch::EveryPage, Touch::FirstPage] {
            let med = round_trip_medians(bytes, reps, touch)
                .map_err(|e| e.within(|| format!("round trip {label}")))?;
            let in_place = |baseline| {
                let key = LineKey::RoundTrip {
                    bytes,
                    touch,
                    baseline,
                };
                (key, med[IN_PLACE])
            };
            // The best any in-place round trip can do here: zaps and re-faults alone.
            let floor = in_place(Baseline::Preserving)
                .0
                .floor()
                .map(|key| (key, med[FLOOR]));
            let keyed = [
                in_place(Baseline::Preserving),
                in_place(Baseline::Destructive),
            ];
            for (key, value) in keyed.into_iter().chain(floor) {
                let baseline = med[key.baseline().index()];
                lines.push(key.measurement(GROUP, value, baseline, Unit::Micros, reps));
            }
        }
    }
    Ok(())
}
