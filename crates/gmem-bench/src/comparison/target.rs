//! The targets `gmem bench` checks: each names the line it reads by its typed [`LineKey`]
//! (which carries the baseline) and the largest ratio that meets it.

use gmem::PAGE_SIZE;

use super::{Baseline, LineKey, Report, Touch};

/// A target: the line it reads (and so its baseline), and the largest ratio that meets it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    /// The target in words.
    pub what: &'static str,
    /// The line whose ratio it judges.
    pub line: LineKey,
    /// The largest `figure / baseline` ratio that meets it.
    pub max_ratio: f64,
}

const MIB2: u64 = 2 << 20;

const fn round_trip(bytes: u64, touch: Touch) -> LineKey {
    LineKey::RoundTrip {
        bytes,
        touch,
        baseline: Baseline::Preserving,
    }
}

const fn footprint(fragment: u64, baseline: Baseline) -> LineKey {
    LineKey::Footprint { fragment, baseline }
}

/// Every target, in the order they are reported.
pub const TARGETS: [Target; 8] = [
    Target {
        what: "content-preserving 2 MiB round trip, every page touched: in-place >= 10x faster",
        line: round_trip(MIB2, Touch::EveryPage),
        max_ratio: 0.1,
    },
    Target {
        what: "content-preserving 2 MiB round trip, first page touched: in-place >= 10x faster",
        line: round_trip(MIB2, Touch::FirstPage),
        max_ratio: 0.1,
    },
    Target {
        what: "content-preserving 4 KiB round trip, every page touched: in-place >= 2x faster",
        line: round_trip(PAGE_SIZE, Touch::EveryPage),
        max_ratio: 0.5,
    },
    Target {
        what: "content-preserving 4 KiB round trip, first page touched: in-place >= 2x faster",
        line: round_trip(PAGE_SIZE, Touch::FirstPage),
        max_ratio: 0.5,
    },
    Target {
        what: "footprint, 2 MiB fragments: in-place <= two-backing (destructive)",
        line: footprint(MIB2, Baseline::Destructive),
        max_ratio: 1.0,
    },
    Target {
        what: "footprint, 2 MiB fragments: in-place <= two-backing (preserving)",
        line: footprint(MIB2, Baseline::Preserving),
        max_ratio: 1.0,
    },
    Target {
        what: "footprint, 4 KiB fragments: in-place <= two-backing (destructive)",
        line: footprint(PAGE_SIZE, Baseline::Destructive),
        max_ratio: 1.0,
    },
    Target {
        what: "footprint, 4 KiB fragments: in-place <= two-backing (preserving)",
        line: footprint(PAGE_SIZE, Baseline::Preserving),
        max_ratio: 1.0,
    },
];

/// One target's outcome.
#[derive(Debug, Clone, Copy)]
pub struct TargetOutcome {
    /// The target.
    pub target: &'static Target,
    /// The target in words (`target.what`).
    pub what: &'static str,
    /// The ratio of its line.
    pub ratio: f64,
    /// Whether the ratio meets it.
    pub met: bool,
    /// The floor's ratio against the same baseline, for round trips.
    pub floor: Option<f64>,
}

/// The outcome of every target whose line the report holds.
pub fn targets(r: &Report) -> Vec<TargetOutcome> {
    let ratio_of = |key: LineKey| {
        r.lines
            .iter()
            .find(|m| m.key == Some(key))
            .map(|m| m.figure.ratio())
    };
    TARGETS
        .iter()
        .filter_map(|t| {
            ratio_of(t.line).map(|ratio| TargetOutcome {
                target: t,
                what: t.what,
                ratio,
                met: ratio <= t.max_ratio,
                floor: t.line.floor().and_then(ratio_of),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::{size_label, Measurement, Unit};
    use super::*;

    #[test]
    fn targets_read_their_lines_by_key() {
        assert_eq!(size_label(PAGE_SIZE), "4KiB");
        assert_eq!(size_label(64 << 10), "64KiB");
        assert_eq!(size_label(MIB2), "2MiB");
        assert_eq!(size_label(1 << 30), "1GiB");
        let line = |key: LineKey, v: f64| key.measurement("round-trip", v, 10.0, Unit::Micros, 5);
        let rt = round_trip(MIB2, Touch::EveryPage);
        let lines: Vec<Measurement> = vec![
            line(rt, 2.0),
            line(rt.floor().unwrap(), 0.5),
            line(footprint(PAGE_SIZE, Baseline::Destructive), 20.0),
        ];
        assert_eq!(
            lines[0].figure.name,
            "in-place round trip 2MiB, every page touched"
        );
        assert_eq!(lines[0].figure.baseline, "two-backing preserving");
        assert_eq!(
            lines[1].figure.name,
            "floor round trip 2MiB, every page touched (zaps + re-faults, no conversion)"
        );
        assert_eq!(
            lines[2].figure.name,
            "in-place footprint 1GiB, half shared in 4KiB fragments"
        );
        let out = targets(&Report {
            lines,
            ..Report::default()
        });
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].what, TARGETS[0].what);
        assert!((out[0].ratio - 0.2).abs() < 1e-12 && !out[0].met);
        assert_eq!(out[0].floor, Some(0.05));
        assert_eq!(
            out[1].target.line,
            footprint(PAGE_SIZE, Baseline::Destructive)
        );
        assert!(!out[1].met && out[1].floor.is_none());
    }
}
