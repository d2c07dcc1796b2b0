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

/// `gmem io`: an errno answer is a result (stdout, status 0); a script line that cannot run
/// goes to stderr with its script line number, and the status is 2.
fn io_errno_answers_are_results_and_parse_errors_name_the_script_line() {
    let out = gmem(&[
        "io",
        "-c",
        "create 16k mmap|init_shared",
        "-c",
        "mmap",
        "-c",
        "convert private 0 4k",
        "-c",
        "mread 0 4k",
        "-c",
        "falloc 0 3",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = common::stdout(&out);
    assert!(text.contains("mread 0x0 0x1000 -> SIGBUS at 0x0"), "{text}");
    assert!(text.contains("-> EINVAL"), "{text}");

    let script = std::env::temp_dir().join(format!("gmem-cli-io-{}.io", std::process::id()));
    std::fs::write(&script, "create 16k mmap\n# comment\n\nfrob 1 2\nstat\n").unwrap();
    let out = gmem(&["io", "-f", script.to_str().unwrap()]);
    let _ = std::fs::remove_file(&script);
    assert_eq!(out.status.code(), Some(2));
    let err = common::stderr(&out);
    assert!(
        err.contains(&format!(
            "{}:4: frob 1 2 -> error: unknown command",
            script.display()
        )),
        "{err}"
    );
    let text = common::stdout(&out);
    assert!(!text.contains("frob"), "{text}");
    assert!(
        text.contains("stat"),
        "the lines after a bad one still run: {text}"
    );
}

/// `gmem bench --fail-on-unmet` is offered and documented.
fn bench_documents_fail_on_unmet() {
    let out = gmem(&["bench", "--help"]);
    let text = common::stdout(&out);
    assert!(text.contains("--fail-on-unmet"), "{text}");
    assert!(text.contains("Exit with status 1"), "{text}");
}

/// Why a user without access to /dev/kvm cannot be had here, if it cannot: the test runs
/// `gmem` as user nobody (uid/gid 65534, no groups) when it runs as root, else as itself.
fn no_kvm_access_unavailable() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::path::Path::new("/dev/kvm");
    let Ok(meta) = dev.metadata() else {
        return Some("/dev/kvm does not exist: there is no access to lose".to_string());
    };
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .is_ok();
    if root && meta.mode() & 0o006 == 0o006 {
        Some("/dev/kvm is readable and writable by every user: nobody may use it".to_string())
    } else if !root && usable {
        Some("this user (not root) may use /dev/kvm, so it cannot lose access".to_string())
    } else {
        None
    }
}

/// Runs `gmem args` as a user without access to /dev/kvm ([`no_kvm_access_unavailable`]).
fn gmem_without_kvm_access(args: &[&str]) -> Option<std::process::Output> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gmem"));
    cmd.args(args);
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.uid(65534).gid(65534);
    }
    Some(cmd.output().expect("gmem runs"))
}

/// No device (ENOENT) is told as such (`GMEM_KVM_DEV` points the probe elsewhere).
fn probe_says_enoent_when_there_is_no_kvm_device() {
    let out = common::gmem_env(&["probe"], &[("GMEM_KVM_DEV", "/nonexistent/kvm")]);
    assert!(out.status.success());
    let text = common::stdout(&out);
    assert!(
        text.contains("/nonexistent/kvm does not exist (ENOENT)"),
        "{text}"
    );
    let out = common::gmem_env(
        &["probe", "--json"],
        &[("GMEM_KVM_DEV", "/nonexistent/kvm")],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kvm_access"]["problem"], "missing");
    assert_eq!(v["kvm_access"]["usable"], false);
}

/// A user who may not open /dev/kvm is told EACCES and how to join the kvm group, in `probe`,
/// `run` (which then runs host-driven) and `run --backend kernel` (which fails).
fn no_permission_on_dev_kvm_is_told_precisely() {
    let out = gmem_without_kvm_access(&["probe"]).expect("gmem runs");
    let text = common::stdout(&out);
    assert!(
        text.contains("/dev/kvm exists but cannot be opened (EACCES)"),
        "{text}"
    );
    assert!(text.contains("usermod -aG kvm"), "{text}");
    assert!(!text.contains("/dev/kvm          missing"), "{text}");

    let out = gmem_without_kvm_access(&["run", "--vcpus", "1", "--mem-mib", "4", "--samples", "4"])
        .expect("as above");
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = common::stdout(&out);
    assert!(text.contains("cannot be opened (EACCES)"), "{text}");
    assert!(text.contains("usermod -aG kvm"), "{text}");
    assert!(!text.contains("no /dev/kvm"), "{text}");

    let out = gmem_without_kvm_access(&["run", "--json", "--vcpus", "1", "--mem-mib", "4"])
        .expect("as above");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kvm_problem"], "no_permission");
    assert_eq!(v["mode"], "host-driven");

    let out = gmem_without_kvm_access(&["run", "--backend", "kernel"]).expect("as above");
    assert_eq!(out.status.code(), Some(1));
    let err = common::stderr(&out);
    assert!(err.contains("cannot be opened (EACCES)"), "{err}");
}

/// `run` output: no hypervisor internals without --verbose, human units, samples per vCPU,
/// no progress when piped; `--json` is one versioned object whose platform is a name.
fn run_output_is_short_human_and_json_is_data() {
    let out = gmem(&["run", "--samples", "20"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = common::stdout(&out);
    assert!(!text.contains("conversion requests   "), "{text}");
    assert!(text.contains(" MiB (host "), "{text}");
    if text.contains("round trips") {
        assert!(
            text.contains("median of 20 samples per vCPU, 40 in all"),
            "{text}"
        );
    }
    assert!(common::stderr(&out).is_empty(), "progress when piped");

    let out = gmem(&["run", "--samples", "20", "--verbose"]);
    let text = common::stdout(&out);
    assert!(text.contains("conversion requests"), "{text}");

    let out = gmem(&["run", "--samples", "20", "--json", "--platform", "snp"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(common::stderr(&out).is_empty());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one object");
    assert_eq!(v["version"], 1);
    assert_eq!(v["platform"], "snp");
    assert_eq!(v["model"], "in-place");
    assert!(v["content_rules"]["to_private"].is_string());
    assert!(v["notes"]["request_path"].is_string());
    if v["mode"] == "kvm" {
        assert_eq!(v["samples_per_vcpu"], 20);
        assert_eq!(v["samples_total"], 40);
    }
}

/// Every `--json` output is an object with `"version"`.
fn every_json_output_is_a_versioned_object() {
    for args in [
        &["probe", "--json"][..],
        &["conformance", "--json", "--filter", "fault_*"],
        &["run", "--json", "--samples", "4"],
    ] {
        let out = gmem(args);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert!(v.is_object(), "gmem {args:?}");
        assert_eq!(v["version"], 1, "gmem {args:?}");
    }
}

/// `gmem demo` names signals and prints no `Debug` dump.
fn demo_says_sigbus_and_prints_no_debug_dump() {
    let out = gmem(&["demo", "--pages", "2"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = common::stdout(&out);
    assert!(text.contains("SIGBUS at offset 0x0"), "{text}");
    assert!(!text.contains("signal 7"), "{text}");
    assert!(
        !text.contains('{') && !text.contains("EmulatedGuestMemfd"),
        "{text}"
    );
}

/// A `--filter` that matches no case is a usage error, not "0 passed".
fn conformance_filter_matching_nothing_is_refused() {
    let out = gmem(&[
        "conformance",
        "--backend",
        "emulated",
        "--filter",
        "no_such_case",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        common::stderr(&out).contains("--filter no_such_case: matches no case"),
        "{}",
        common::stderr(&out)
    );
}

/// On a terminal `gmem run` draws a progress line on stderr (`script` gives it a pty).
fn run_shows_progress_on_a_terminal() {
    let out = Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "{} run --vcpus 1 --mem-mib 4 --samples 4",
            env!("CARGO_BIN_EXE_gmem")
        ))
        .arg("/dev/null")
        .output()
        .expect("script(1) runs");
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = common::stdout(&out);
    assert!(
        text.contains("\r\x1b[2Kgmem run: 1 vCPU(s), 4 MiB: 0 s"),
        "{text:?}"
    );
    assert!(text.contains("private_mem_conversions"), "{text}");
}

/// Why script(1), which gives a command a terminal, cannot be run here, if it cannot.
fn no_script() -> Option<String> {
    match Command::new("script").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("no script(1) on PATH to give gmem a terminal".to_string()),
    }
}

/// `gmem exec` exits as `env` does for a program it cannot start (127 not found, 126 not
/// executable), refuses a `GMEM_PRELOAD` that is not the interposer (the loader would ignore
/// it and run the program against the real kernel), a write error on standard output is
/// reported with status 1 (not a panic), and the usage slips exit 2 naming the problem.
fn exits_and_errors_as_unix_tools_do() {
    let status = |o: &std::process::Output| o.status.code();
    let err = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let o = common::gmem(&["exec", "--", "gmem-no-such-program"]);
    assert_eq!(status(&o), Some(127), "{}", err(&o));
    assert!(
        err(&o).starts_with("error: gmem-no-such-program: No such file"),
        "{}",
        err(&o)
    );
    let dir = common::TempDir::new("gmem-cli-exec").unwrap();
    let plain = dir.join("plain");
    std::fs::write(&plain, b"#!/bin/sh\n").unwrap();
    let o = common::gmem(&["exec", "--", plain.to_str().unwrap()]);
    assert_eq!(status(&o), Some(126), "{}", err(&o));
    for bad in [dir.join("missing"), plain.clone(), "/bin/sh".into()] {
        let o = common::gmem_env(
            &["exec", "--", "/bin/true"],
            &[("GMEM_PRELOAD", bad.to_str().unwrap())],
        );
        assert_eq!(status(&o), Some(1), "{bad:?}: {}", err(&o));
        assert!(err(&o).contains("refusing to run"), "{bad:?}: {}", err(&o));
    }
    if let Ok(full) = std::fs::File::create("/dev/full") {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_gmem"))
            .arg("probe")
            .stdout(full)
            .output()
            .unwrap();
        assert_eq!(status(&o), Some(1), "{}", err(&o));
        assert!(
            err(&o).starts_with("error: standard output:"),
            "{}",
            err(&o)
        );
    }
    let o = common::gmem(&["run", "--samples", "-1"]);
    assert_eq!(status(&o), Some(2));
    assert!(
        err(&o).contains("invalid value '-1' for '--samples"),
        "{}",
        err(&o)
    );
    let o = common::gmem(&["run", "--backend", "kernel", "--platform", "snp"]);
    assert_eq!(status(&o), Some(2), "{}", err(&o));
    let o = common::gmem(&["conformance", "--json", "--format", "ktap"]);
    assert_eq!(status(&o), Some(2));
    assert!(err(&o).contains("cannot be used with"), "{}", err(&o));
}

/// `gmem map` draws a trace as an SVG; an unreadable trace is a usage error (2).
fn map_draws_a_trace() {
    let dir = common::TempDir::new("gmem-map").unwrap();
    let trace = dir.join("t.trace");
    std::fs::write(
        &trace,
        "# gmem exec -- prog\n\
         1 1 ioctl(vm1, KVM_CREATE_GUEST_MEMFD, size=0x4000 flags=mmap|init_shared) -> 11 (guard revocation)\n\
         1 1 ioctl(11, KVM_SET_MEMORY_ATTRIBUTES2, offset=0x1000 size=0x1000 attributes=0x8) -> 0\n",
    )
    .unwrap();
    let svg = dir.join("m.svg");
    let o = common::gmem(&["map", trace.to_str().unwrap(), "-o", svg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 guest_memfd(s), 1 changes"));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.starts_with("<svg")
            && text.contains("guest_memfd 1 (vm1, fd 11, flags mmap|init_shared)")
    );
    let o = common::gmem(&["map", "/nonexistent/trace", "-o", svg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let o = common::gmem(&["run", "--backend", "kernel", "--map", svg.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn main() {
    let mut trials = common::tests!(
        a_closed_pipe_ends_every_command_quietly,
        top_level_help_says_what_gmem_is_and_lists_the_subcommands,
        bad_arguments_are_refused_up_front_naming_flag_value_and_limit,
        the_samples_limit_is_accepted,
        io_errno_answers_are_results_and_parse_errors_name_the_script_line,
        bench_documents_fail_on_unmet,
        probe_says_enoent_when_there_is_no_kvm_device,
        run_output_is_short_human_and_json_is_data,
        every_json_output_is_a_versioned_object,
        demo_says_sigbus_and_prints_no_debug_dump,
        conformance_filter_matching_nothing_is_refused,
        exits_and_errors_as_unix_tools_do,
        map_draws_a_trace,
    );
    trials.push(common::test_unless(
        "no_permission_on_dev_kvm_is_told_precisely",
        no_kvm_access_unavailable(),
        no_permission_on_dev_kvm_is_told_precisely,
    ));
    trials.push(common::test_unless(
        "run_shows_progress_on_a_terminal",
        no_script(),
        run_shows_progress_on_a_terminal,
    ));
    common::run(trials)
}
