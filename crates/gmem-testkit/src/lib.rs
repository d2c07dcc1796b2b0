//! The harness of gmem's test files (each a `harness = false` target on libtest-mimic): a test
//! this host cannot run is reported as **ignored, with its reason** (`test x ... ignored,
//! reason`, counted in the summary's `ignored`), never as passed.
//!
//! Reasons come from gmem's one probe of the running kernel ([`gmem::host`]): a test names the
//! [`Feature`]s it needs ([`test_needing`], [`tests_needing!`]) and is skipped with the words
//! `gmem probe` prints when one is missing. They are decided when the list of tests is built,
//! before anything runs. A test that learns only by running that part of it could not run
//! here uses [`test_partly`].
//!
//! [`TempDir`] is a temporary directory that is removed when the test ends, pass or fail.

#![deny(unsafe_code)]

use std::path::{Path, PathBuf};

pub use gmem::host::Feature;
pub use libtest_mimic::Trial;
use libtest_mimic::{Arguments, Completion};

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

/// Why this host lacks the first of `features` it lacks, if any (gmem's probe, once per
/// process).
pub fn needs(features: &[Feature]) -> Option<String> {
    gmem::host::missing(features).map(|m| m.to_string())
}

/// A test that runs `f` where this host offers every one of `features`; elsewhere it is
/// ignored, naming the missing one.
pub fn test_needing(
    name: impl Into<String>,
    features: &[Feature],
    f: impl FnOnce() + Send + 'static,
) -> Trial {
    test_unless(name, needs(features), f)
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

/// [`run`], then `after` (a clean-up that must run whatever the result), then exit.
pub fn run_then(trials: Vec<Trial>, after: impl FnOnce()) -> ! {
    let conclusion = libtest_mimic::run(&Arguments::from_args(), trials);
    after();
    conclusion.exit()
}

/// `tests!(f, g, ...)`: one test per function, named after it.
#[macro_export]
macro_rules! tests {
    ($($f:ident),* $(,)?) => {
        vec![$($crate::test(stringify!($f), $f)),*]
    };
}

/// `tests_unless!(why; f, g, ...)`: one test per function, each ignored with `why` if set.
#[macro_export]
macro_rules! tests_unless {
    ($why:expr; $($f:ident),* $(,)?) => {{
        let why: &Option<String> = &$why;
        vec![$($crate::test_unless(stringify!($f), why.clone(), $f)),*]
    }};
}

/// `tests_needing!([features]; f, g, ...)`: one test per function, each ignored where this host
/// lacks one of `features`.
#[macro_export]
macro_rules! tests_needing {
    ($features:expr; $($f:ident),* $(,)?) => {{
        let why = $crate::needs(&$features);
        vec![$($crate::test_unless(stringify!($f), why.clone(), $f)),*]
    }};
}

/// A temporary directory under `$TMPDIR`, named after its purpose and this process, removed
/// with everything in it when dropped (also when the test panics).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/<prefix>-<pid>-<n>` (n counts the directories this process made).
    pub fn new(prefix: &str) -> std::io::Result<TempDir> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside it.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// One test per revocation mode of `modes`, named `name::<mode>`, each ignored where this
/// host lacks what the mode needs for a file with `flags` ([`gmem::Revocation::needs`]).
pub fn per_revocation(
    name: &str,
    modes: &[gmem::Revocation],
    flags: u64,
    f: impl Fn(gmem::Revocation) + Clone + Send + 'static,
) -> Vec<Trial> {
    modes
        .iter()
        .map(|&mode| {
            let f = f.clone();
            let why = mode.needs(flags).and_then(|n| needs(&[n]));
            test_unless(format!("{name}::{}", mode.name()), why, move || f(mode))
        })
        .collect()
}

/// One test per labelled set of emulated-file options, named `name::<label>`, each ignored
/// where this host lacks what its revocation mode needs for a file with `flags`.
pub fn per_mode(
    name: &str,
    modes: &[(&'static str, gmem::EmulatedOptions)],
    flags: u64,
    f: impl Fn(gmem::EmulatedOptions) + Clone + Send + 'static,
) -> Vec<Trial> {
    modes
        .iter()
        .map(|&(label, opts)| {
            let f = f.clone();
            let why = opts.revocation.needs(flags).and_then(|n| needs(&[n]));
            test_unless(format!("{name}::{label}"), why, move || f(opts))
        })
        .collect()
}

/// [`run`], keeping `keep` (a [`TempDir`] the tests share, say) alive until every test has
/// ended and dropping it before the process exits.
pub fn run_keeping<T>(trials: Vec<Trial>, keep: T) -> ! {
    let conclusion = libtest_mimic::run(&Arguments::from_args(), trials);
    drop(keep);
    conclusion.exit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temporary_directory_goes_with_its_guard() {
        let kept;
        {
            let d = TempDir::new("gmem-testkit").expect("mkdir");
            std::fs::write(d.join("f"), b"x").expect("write");
            kept = d.path().to_path_buf();
            assert!(kept.join("f").exists());
        }
        assert!(!kept.exists());
    }
}

/// The host's shmem THP setting, switched from `never` to `advise` for one test binary's run
/// (as root, where no 2 MiB shmem folios are offered), and put back when dropped; both said
/// on standard error. `GMEM_THP_SWITCH=0` leaves the host alone (the tests needing huge
/// folios are then ignored with the reason).
#[derive(Debug)]
pub struct ThpSwitch {
    path: &'static str,
    was: String,
    who: &'static str,
}

impl ThpSwitch {
    const PATH: &'static str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

    /// Switches for the run of the test binary `who`, if it may and needs to.
    pub fn for_this_run(who: &'static str) -> Option<ThpSwitch> {
        // The arguments are read first: a bad one (or `--help`) ends the process there, and
        // must not leave the host switched (found: `-- a b` exited with the setting left at
        // "advise").
        let _ = Arguments::from_args();
        if gmem::host::huge_folios().is_ok()
            || std::env::var("GMEM_THP_SWITCH").as_deref() == Ok("0")
        {
            return None;
        }
        let text = std::fs::read_to_string(Self::PATH).ok()?;
        let was = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))?
            .to_string();
        if was != "never" {
            return None;
        }
        // Refused unless root: then nothing changes.
        std::fs::write(Self::PATH, "advise").ok()?;
        eprintln!(
            "{who}: {} was {was:?}; set to \"advise\" for this run (root), put back at its end \
             (GMEM_THP_SWITCH=0 leaves it alone)",
            Self::PATH
        );
        Some(ThpSwitch {
            path: Self::PATH,
            was,
            who,
        })
    }
}

impl Drop for ThpSwitch {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, &self.was);
        eprintln!("{}: {} put back to {:?}", self.who, self.path, self.was);
    }
}
