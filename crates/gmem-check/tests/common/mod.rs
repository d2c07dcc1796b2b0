//! The libtest-mimic harness shared by the test files with runtime skips: a test this host
//! cannot run is reported as ignored with its reason (`test x ... ignored (reason)`, counted in
//! the summary's `ignored`), never as passed. Skip reasons come from [`gmem_check::skip`] and
//! are decided when the list of tests is built, before anything runs.
#![allow(dead_code, unused_macros, unused_imports)] // each test file uses a part

use libtest_mimic::{Arguments, Completion, Trial};

/// A test that runs `f`.
pub fn test(name: impl Into<String>, f: impl FnOnce() + Send + 'static) -> Trial {
    Trial::test(name, move || {
        f();
        Ok(())
    })
}

/// A test that runs `f` unless `why` says why this host cannot run it; then it is ignored
/// with that reason (and `f` does not run).
pub fn test_unless(
    name: impl Into<String>,
    why: Option<String>,
    f: impl FnOnce() + Send + 'static,
) -> Trial {
    match why {
        None => test(name, f),
        Some(why) => Trial::ignorable_test(name, move || Ok(Completion::ignored_with(why))),
    }
}

/// A test that runs `f` and is reported as ignored with the reason `f` returns, if it returns
/// one: for a test that checks what it can and learns only by running that a part could not
/// run here (its assertions still fail the test).
pub fn test_partly(
    name: impl Into<String>,
    f: impl FnOnce() -> Option<String> + Send + 'static,
) -> Trial {
    Trial::ignorable_test(name, move || {
        Ok(match f() {
            None => Completion::Completed,
            Some(why) => Completion::ignored_with(why),
        })
    })
}

/// Runs `trials` with the command line's arguments (`--list`, filters, `--test-threads`, ...)
/// and exits with libtest's status and summary line.
pub fn run(trials: Vec<Trial>) -> ! {
    libtest_mimic::run(&Arguments::from_args(), trials).exit()
}

/// `tests!(f, g, ...)`: one test per function, named after it.
macro_rules! tests {
    ($($f:ident),* $(,)?) => {
        vec![$(crate::common::test(stringify!($f), $f)),*]
    };
}

/// `tests_unless!(why, f, g, ...)`: one test per function, each ignored with `why` if set.
macro_rules! tests_unless {
    ($why:expr; $($f:ident),* $(,)?) => {{
        let why: &Option<String> = &$why;
        vec![$(crate::common::test_unless(stringify!($f), why.clone(), $f)),*]
    }};
}

pub(crate) use {tests, tests_unless};
