//! Running the suite: every case on one backend ([`run_cases`]), the differential check between
//! two ([`super::differential::run`]), and their reports, as `gmem conformance` prints them;
//! the [`Summary`] of a run and its kselftest exit status ([`KselftestExit`]); the check that a
//! `--filter` selects something ([`check_filter`]).

use std::fmt;

use super::{cases, differential, Ctx, Outcome};

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

    /// Passed, failed and skipped counts of this report.
    pub fn summary(&self) -> Summary {
        Summary {
            passed: self.passed(),
            failed: self.failed(),
            skipped: self.skipped(),
        }
    }
}

/// The exit status of a kselftest (`tools/testing/selftests/kselftest.h`): `KSFT_PASS`,
/// `KSFT_FAIL`, `KSFT_SKIP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KselftestExit {
    /// `KSFT_PASS` (0): every case ran and passed, or some were skipped and at least one passed.
    Pass,
    /// `KSFT_FAIL` (1): at least one case failed.
    Fail,
    /// `KSFT_SKIP` (4): nothing failed and nothing passed: every case was skipped.
    Skip,
}

impl KselftestExit {
    /// The process exit status: 0, 1 or 4.
    pub fn code(self) -> u8 {
        match self {
            KselftestExit::Pass => 0,
            KselftestExit::Fail => 1,
            KselftestExit::Skip => 4,
        }
    }
}

impl From<KselftestExit> for std::process::ExitCode {
    fn from(e: KselftestExit) -> Self {
        std::process::ExitCode::from(e.code())
    }
}

/// Passed, failed and skipped counts over one or more reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Cases that passed.
    pub passed: usize,
    /// Cases that failed.
    pub failed: usize,
    /// Cases that were skipped.
    pub skipped: usize,
}

impl Summary {
    /// The counts summed over `reports`.
    pub fn of<'a>(reports: impl IntoIterator<Item = &'a BackendReport>) -> Summary {
        reports
            .into_iter()
            .map(BackendReport::summary)
            .fold(Summary::default(), |a, b| Summary {
                passed: a.passed + b.passed,
                failed: a.failed + b.failed,
                skipped: a.skipped + b.skipped,
            })
    }

    /// Every case counted.
    pub fn total(&self) -> usize {
        self.passed + self.failed + self.skipped
    }

    /// The kselftest exit status: [`KselftestExit::Fail`] if any case failed, else
    /// [`KselftestExit::Pass`] if at least one passed, else (everything skipped, or nothing
    /// counted) [`KselftestExit::Skip`].
    pub fn kselftest_exit(&self) -> KselftestExit {
        if self.failed > 0 {
            KselftestExit::Fail
        } else if self.passed > 0 {
            KselftestExit::Pass
        } else {
            KselftestExit::Skip
        }
    }
}

impl fmt::Display for Summary {
    /// `N passed, N failed, N skipped`, as `gmem conformance` prints its last line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }
}

/// A `--filter` that selects no conformance case and no differential script.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "--filter {filter:?} matches no conformance case and no differential script (diff/<script>)"
)]
pub struct NoCaseMatches {
    /// The filter as given.
    pub filter: String,
}

/// `Ok` if `filter` is absent or selects at least one case or differential script (by the
/// rule of [`matches()`]); otherwise the error naming the filter.
pub fn check_filter(filter: Option<&str>) -> Result<(), NoCaseMatches> {
    let Some(f) = filter else {
        return Ok(());
    };
    let any_case = cases().iter().any(|c| matches(c.name, filter));
    let any_script = differential::scripts()
        .iter()
        .any(|s| matches(&format!("diff/{}", s.name), filter));
    if any_case || any_script {
        Ok(())
    } else {
        Err(NoCaseMatches {
            filter: f.to_string(),
        })
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
    run_cases_observed(ctx, filter, &mut |_, _| {})
}

/// [`run_cases`], calling `on_case(backend, report)` as each case ends (a harness printing
/// results as they come, as kselftest does).
pub fn run_cases_observed(
    ctx: &Ctx,
    filter: Option<&str>,
    on_case: &mut dyn FnMut(&str, &CaseReport),
) -> BackendReport {
    let backend = ctx.backend.kind().name().to_string();
    let cases = cases()
        .iter()
        .filter(|c| matches(c.name, filter))
        .map(|c| {
            let report = CaseReport {
                name: c.name.to_string(),
                outcome: ctx.run(c),
            };
            on_case(&backend, &report);
            report
        })
        .collect();
    BackendReport { backend, cases }
}

/// How many cases `filter` selects (what [`run_cases`] runs).
pub fn count_cases(filter: Option<&str>) -> usize {
    cases().iter().filter(|c| matches(c.name, filter)).count()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn report(outcomes: &[Outcome]) -> BackendReport {
        BackendReport {
            backend: "emulated".to_string(),
            cases: outcomes
                .iter()
                .enumerate()
                .map(|(i, o)| CaseReport {
                    name: format!("case{i}"),
                    outcome: o.clone(),
                })
                .collect(),
        }
    }

    fn skip() -> Outcome {
        Outcome::Skip("no conversion".to_string())
    }

    fn fail() -> Outcome {
        Outcome::Fail("expected 0xaa".to_string())
    }

    #[test]
    fn kselftest_exit_follows_ksft_pass_fail_skip() {
        let exit = |r: &[BackendReport]| Summary::of(r).kselftest_exit();
        // All ran and passed.
        assert_eq!(
            exit(&[report(&[Outcome::Pass, Outcome::Pass])]),
            KselftestExit::Pass
        );
        // Skips are allowed when at least one case passed.
        assert_eq!(
            exit(&[report(&[Outcome::Pass, skip()])]),
            KselftestExit::Pass
        );
        assert_eq!(
            exit(&[report(&[Outcome::Pass]), report(&[skip(), skip()])]),
            KselftestExit::Pass
        );
        // Any failure is a failure, whatever else happened.
        assert_eq!(
            exit(&[report(&[Outcome::Pass, fail(), skip()])]),
            KselftestExit::Fail
        );
        assert_eq!(
            exit(&[report(&[skip()]), report(&[fail()])]),
            KselftestExit::Fail
        );
        // Everything skipped (or nothing counted) is a skip.
        assert_eq!(exit(&[report(&[skip(), skip()])]), KselftestExit::Skip);
        assert_eq!(exit(&[report(&[])]), KselftestExit::Skip);
        assert_eq!(exit(&[]), KselftestExit::Skip);
        assert_eq!(
            [
                KselftestExit::Pass,
                KselftestExit::Fail,
                KselftestExit::Skip
            ]
            .map(KselftestExit::code),
            [0, 1, 4]
        );
    }

    #[test]
    fn summary_counts_and_prints_like_the_table() {
        let s = Summary::of(&[report(&[Outcome::Pass, fail()]), report(&[skip(), skip()])]);
        assert_eq!(
            s,
            Summary {
                passed: 1,
                failed: 1,
                skipped: 2
            }
        );
        assert_eq!(s.total(), 4);
        assert_eq!(s.to_string(), "1 passed, 1 failed, 2 skipped");
        assert_eq!(report(&[Outcome::Pass, skip()]).summary().skipped, 1);
    }

    #[test]
    fn a_filter_matching_nothing_is_an_error_naming_it() {
        assert_eq!(check_filter(None), Ok(()));
        assert_eq!(check_filter(Some("punch_hole")), Ok(()));
        assert_eq!(check_filter(Some("diff/")), Ok(()));
        assert_eq!(check_filter(Some("fall*cate")), Ok(()));
        let e = check_filter(Some("no_such_case")).unwrap_err();
        assert_eq!(e.filter, "no_such_case");
        assert!(e.to_string().contains("\"no_such_case\""), "{e}");
    }
}
