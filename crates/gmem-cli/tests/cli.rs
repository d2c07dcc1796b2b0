//! The `gmem` command as a shell user meets it (issue 15): closed pipes, bad arguments,
//! exit codes, help. Every case here is bounded (debug build, a few seconds at most).

mod common;

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use common::gmem;

/// Runs `gmem args` with its stdout on a pipe whose read end is already closed, as in
/// `gmem ARGS | true` when `true` has exited first.
fn into_closed_pipe(args: &[&str]) -> std::process::Output {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) writes two descriptors into `fds`, which has room for them.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: both descriptors are new and owned by nothing else.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(args)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("gmem runs")
}

#[test]
fn a_closed_pipe_ends_every_command_quietly() {
    for args in [
        &["probe"][..],
        &["probe", "--json"],
        &[
            "conformance",
            "--backend",
            "emulated",
            "--filter",
            "init_shared",
        ],
        &["demo"],
        &["io", "-c", "help"],
        &["run", "--samples", "4"],
        &["--help"],
    ] {
        let out = into_closed_pipe(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "gmem {args:?}: {stderr}"
        );
        // Killed by SIGPIPE, as `cat` or `grep` would be (the shell shows 141).
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "gmem {args:?}: {:?} {stderr}",
            out.status
        );
    }
}

#[test]
fn top_level_help_says_what_gmem_is_and_lists_the_subcommands() {
    let out = gmem(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("guest_memfd"), "{text}");
    assert!(!text.contains("The gmem command\n"), "{text}");
    for sub in ["bench", "demo", "probe", "conformance", "io", "run"] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(sub)),
            "no line for {sub}: {text}"
        );
    }
}

/// Each bad argument is refused before any work, with status 2 and a message naming the
/// flag, the value and what is allowed.
#[test]
fn bad_arguments_are_refused_up_front_naming_flag_value_and_limit() {
    for (args, expect) in [
        (&["run", "--samples", "0"][..], "--samples 0: allowed 1..="),
        (
            &["run", "--samples", "4906"],
            "--samples 4906: allowed 1..=4905",
        ),
        (
            &["run", "--samples", "100000000"],
            "--samples 100000000: allowed 1..=",
        ),
        (&["run", "--vcpus", "0"], "--vcpus 0: allowed 1..=64"),
        (&["run", "--vcpus", "65"], "--vcpus 65: allowed 1..=64"),
        (&["run", "--mem-mib", "6"], "--mem-mib 6: allowed 8..=1024"),
        (&["run", "--memslots", "0"], "--memslots 0:"),
        (&["run", "--memslots", "3"], "--memslots 3:"),
        (
            &["run", "--timeout-secs", "0"],
            "--timeout-secs 0: allowed 1..=",
        ),
        (&["demo", "--pages", "0"], "--pages 0: allowed 2..="),
        (&["demo", "--pages", "1"], "--pages 1: allowed 2..="),
        (
            &["bench", "--plot", "/nonexistent/dir/p.svg"],
            "--plot /nonexistent/dir/p.svg: cannot be written",
        ),
    ] {
        let start = std::time::Instant::now();
        let out = gmem(args);
        let err = common::stderr(&out);
        assert_eq!(out.status.code(), Some(2), "gmem {args:?}: {err}");
        assert!(err.contains(expect), "gmem {args:?}: {err}");
        assert!(out.stdout.is_empty(), "gmem {args:?} printed results");
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "gmem {args:?} worked before refusing"
        );
    }
}

/// The largest `--samples` the limit names is accepted (the limit is the real one).
#[test]
fn the_samples_limit_is_accepted() {
    let out = gmem(&[
        "run",
        "--samples",
        "4905",
        "--vcpus",
        "1",
        "--mem-mib",
        "4",
        "--json",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
}
