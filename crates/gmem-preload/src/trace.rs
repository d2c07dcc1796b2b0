//! `--trace FILE`: one line per intercepted call and its answer, appended with one `write`
//! each so that threads and forked children do not interleave within a line.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::sync::OnceLock;

use crate::config::ENV_TRACE;

fn file() -> Option<&'static File> {
    static FILE: OnceLock<Option<File>> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = std::env::var_os(ENV_TRACE)?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
    })
    .as_ref()
}

/// Whether tracing is on (so callers can skip formatting).
pub(crate) fn enabled() -> bool {
    file().is_some()
}

/// Appends `pid tid message` as one line.
pub(crate) fn line(args: fmt::Arguments<'_>) {
    if let Some(mut f) = file() {
        let s = format!(
            "{} {} {}\n",
            std::process::id(),
            crate::real::gettid(),
            args
        );
        let _ = f.write_all(s.as_bytes());
    }
}

/// Logs a call and its answer when tracing is on.
macro_rules! trace {
    ($($arg:tt)*) => {
        if $crate::trace::enabled() {
            $crate::trace::line(format_args!($($arg)*));
        }
    };
}
pub(crate) use trace;

/// Renders a C return value with errno: `0`, `5`, or `-1 EINVAL`.
pub(crate) fn ret(r: i64, errno: i32) -> String {
    if r < 0 {
        format!("-1 {}", gmem::Errno(errno).name())
    } else {
        r.to_string()
    }
}
