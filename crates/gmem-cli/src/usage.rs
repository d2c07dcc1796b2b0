//! Usage errors: an argument refused before any work starts. `main` prints them as
//! `gmem: <message>` and exits with status 2, as clap does for its own parse errors.

use std::path::PathBuf;

/// An argument that cannot be used, found before any work starts.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// A value outside what the flag allows.
    #[error("{flag} {value}: {allowed}")]
    Value {
        /// The flag, with its dashes (`--samples`).
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is allowed, and why.
        allowed: String,
    },
    /// Options that cannot be used together.
    #[error("{0}")]
    Conflict(String),
    /// An input file that cannot be read.
    #[error("{flag} {}: cannot be read ({source})", path.display())]
    Unreadable {
        /// The argument.
        flag: &'static str,
        /// The path given.
        path: PathBuf,
        /// Why it cannot be read.
        source: std::io::Error,
    },
    /// An output file that cannot be written.
    #[error("{flag} {}: cannot be written ({source}); the directory must exist and be writable", path.display())]
    Unwritable {
        /// The flag.
        flag: &'static str,
        /// The path given.
        path: PathBuf,
        /// Why it cannot be written.
        source: std::io::Error,
    },
}

impl UsageError {
    /// `flag value: allowed`.
    pub fn value(flag: &'static str, value: impl ToString, allowed: impl Into<String>) -> Self {
        UsageError::Value {
            flag,
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }
}

/// `Ok` if `lo <= v <= hi`, else the usage error naming `flag`, `v` and the range (`why`
/// appended when given).
pub fn in_range(flag: &'static str, v: u64, lo: u64, hi: u64, why: &str) -> Result<(), UsageError> {
    if (lo..=hi).contains(&v) {
        return Ok(());
    }
    let sep = if why.is_empty() { "" } else { "; " };
    Err(UsageError::value(
        flag,
        v,
        format!("allowed {lo}..={hi}{sep}{why}"),
    ))
}
