//! Running the suite: every case on one backend ([`run_cases`]), the differential check between
//! two ([`super::differential::run`]), and their reports, as `gmem conformance` prints them.

use super::{cases, Ctx, Outcome};

/// The result of one case (or differential script) on one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseReport {
    /// Case name (`diff/<script>` for a differential script).
    pub name: String,
    /// Pass, fail or skip, with the reason.
    pub outcome: Outcome,
}

/// Every result on one backend (or, for the differential check, one pair of backends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendReport {
    /// `emulated`, `kernel`, or `differential`.
    pub backend: String,
    /// One entry per case, in suite order.
    pub cases: Vec<CaseReport>,
}

impl BackendReport {
    fn count(&self, label: &str) -> usize {
        self.cases
            .iter()
            .filter(|c| c.outcome.label() == label)
            .count()
    }

    /// Cases that passed.
    pub fn passed(&self) -> usize {
        self.count("pass")
    }

    /// Cases that failed.
    pub fn failed(&self) -> usize {
        self.count("fail")
    }

    /// Cases that were skipped.
    pub fn skipped(&self) -> usize {
        self.count("skip")
    }
}

/// Whether `name` is selected by `filter`: no filter selects everything; otherwise the filter
/// must occur in the name (a `*` in it matches any run of characters).
pub fn matches(name: &str, filter: Option<&str>) -> bool {
    let Some(filter) = filter else {
        return true;
    };
    let mut rest = name;
    for part in filter.split('*').filter(|p| !p.is_empty()) {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// Runs every case selected by `filter` on `ctx`.
pub fn run_cases(ctx: &Ctx, filter: Option<&str>) -> BackendReport {
    BackendReport {
        backend: ctx.backend.kind().name().to_string(),
        cases: cases()
            .iter()
            .filter(|c| matches(c.name, filter))
            .map(|c| CaseReport {
                name: c.name.to_string(),
                outcome: ctx.run(c),
            })
            .collect(),
    }
}

/// The report for a backend that could not be set up: every selected case skips with `reason`.
pub fn unavailable(backend: &str, reason: &str, filter: Option<&str>) -> BackendReport {
    BackendReport {
        backend: backend.to_string(),
        cases: cases()
            .iter()
            .filter(|c| matches(c.name, filter))
            .map(|c| CaseReport {
                name: c.name.to_string(),
                outcome: Outcome::Skip(reason.to_string()),
            })
            .collect(),
    }
}
