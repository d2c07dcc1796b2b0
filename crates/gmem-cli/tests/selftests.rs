//! The series' own KVM selftests, built unmodified from the v8 patches, run under `gmem exec`
//! and judged by their kselftest results. They are not part of the repository: the tests look
//! for the built programs in `$GMEM_SELFTESTS` (a directory holding `guest_memfd_test`,
//! `x86/guest_memfd_conversions_test`, ...), else in `selftests/bin` of the folder beside the
//! repository named `shared` (where the project's machines keep them), and are ignored with
//! that reason where neither exists.
//!
//! `x86/private_mem_conversions_test` is not run: its guest needs `KVM_HC_MAP_GPA_RANGE` exits,
//! which the PVM host KVM of the project's machines never delivers (DESIGN.md "Which path ran
//! where"); it does not finish there.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{needs, test_unless, Feature};

const TIMEOUT: Duration = Duration::from_secs(300);

/// The folder of the built selftests, or why there is none.
fn selftests() -> Result<PathBuf, String> {
    let dir = match std::env::var_os("GMEM_SELFTESTS") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/selftests/bin"),
    };
    if dir.join("guest_memfd_test").is_file() {
        Ok(dir)
    } else {
        Err(format!(
            "the series' selftests are not built here (no {}; set GMEM_SELFTESTS to their folder)",
            dir.join("guest_memfd_test").display()
        ))
    }
}

/// Runs `program` (relative to the selftests' folder) under `gmem exec`, killed after
/// [`TIMEOUT`].
fn gmem_exec(program: &str) -> Output {
    let dir = selftests().expect("checked before the test runs");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gmem"))
        .arg("exec")
        .arg("--")
        .arg(dir.join(program))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// `program` exits with kselftest's `want` (0 pass, 4 skip) and, if given, prints the KTAP
/// totals line `totals`.
fn expect(program: &'static str, want: i32, totals: Option<&'static str>) -> impl FnOnce() {
    move || {
        let out = gmem_exec(program);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(want), "{program}:\n{text}");
        if let Some(t) = totals {
            assert!(text.contains(t), "{program}: no `{t}` in:\n{text}");
        }
        assert!(
            !text.contains("not ok"),
            "{program}: a failed case:\n{text}"
        );
    }
}

fn main() {
    let why = selftests()
        .err()
        .or_else(|| needs(&[Feature::Kvm, gmem::emulated::GUARD_NEEDS]));
    let trials = vec![
        test_unless(
            "guest_memfd_conversions_test_passes_9_of_9",
            why.clone(),
            expect(
                "x86/guest_memfd_conversions_test",
                0,
                Some("# Totals: pass:9 fail:0 xfail:0 xpass:0 skip:0 error:0"),
            ),
        ),
        test_unless(
            "guest_memfd_test_passes",
            why.clone(),
            expect("guest_memfd_test", 0, None),
        ),
        test_unless(
            "private_mem_kvm_exits_test_passes",
            why.clone(),
            expect("x86/private_mem_kvm_exits_test", 0, None),
        ),
        // KVM_PRE_FAULT_MEMORY: the interposer answers where the host's KVM cannot.
        test_unless(
            "pre_fault_memory_test_passes",
            why.clone(),
            expect("pre_fault_memory_test", 0, None),
        ),
    ];
    common::run(trials)
}
