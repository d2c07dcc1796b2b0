//! The `gmem` command as a shell user meets it (issue 15): closed pipes, bad arguments,
//! exit codes, help. Every case here is bounded (debug build, a few seconds at most).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use common::gmem;

/// Runs `gmem args` with its stdout on a pipe whose read end is already closed, as in
/// `gmem ARGS | true` when `true` has exited first.
fn into_closed_pipe(args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
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
