//! `gmem conformance` and `gmem io` as a user runs them. The comparison with this host's
//! kernel is reported as ignored with the reason where the kernel lacks what a script needs
//! (guest_memfd, a flag, conversion), as gmem's probe finds it.

mod common;

use std::process::{Command, Output};

use common::{needs, test_unless, tests, Feature, TempDir, Trial};

use gmem_check::conformance::differential::{scripts, KNOWN_DEVIATIONS};
use serde_json::Value;

fn gmem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(args)
        .output()
        .expect("gmem runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn conformance_table_ends_with_the_totals_and_passes_on_emulated() {
    let out = gmem(&["conformance", "--backend", "emulated"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    // The totals, then each reason shared by several rows, once (`[N] backend: reason`).
    let last = text
        .lines()
        .find(|l| l.contains(" passed, "))
        .expect("totals");
    let notes: Vec<&str> = text.lines().filter(|l| l.starts_with('[')).collect();
    for n in &notes {
        let reason = n.split_once(": ").expect("[N] backend: reason").1;
        assert_eq!(text.matches(reason).count(), 1, "{reason} repeats");
        let tag = n.split(' ').next().unwrap();
        assert!(text.contains(&format!("see {tag}")), "{n} not referenced");
    }
    let nums: Vec<usize> = last
        .split(", ")
        .map(|part| part.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        last,
        format!("{} passed, 0 failed, {} skipped", nums[0], nums[2])
    );
    assert!(nums[0] >= 25, "{last}");
    // Skips carry their reason in the table, or a reference to it.
    // (forked_accesses passes on the emulated backend since its fork support.)
    assert!(text.contains("file_read_write") && text.contains("no guest_memfd descriptor"));
}

fn conformance_json_per_backend_and_filter() {
    let out = gmem(&[
        "conformance",
        "--backend",
        "emulated",
        "--json",
        "--filter",
        "punch",
    ]);
    assert!(out.status.success());
    let top: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(top["version"], 1);
    let backends = top["backends"].as_array().expect("backends");
    assert_eq!(backends.len(), 1, "{top}");
    let v = &backends[0];
    assert_eq!(v["backend"], "emulated");
    let cases = v["cases"].as_array().expect("cases");
    assert!(cases.len() >= 3, "{v}");
    for c in cases {
        assert!(c["name"].as_str().unwrap().contains("punch"), "{c}");
        assert!(c["result"] == "pass" || c["result"] == "skip", "{c}");
        assert!(c["reason"].is_string());
    }
    assert_eq!(
        v["passed"].as_u64().unwrap() + v["skipped"].as_u64().unwrap(),
        cases.len() as u64
    );
    assert_eq!(v["failed"], 0);

    let all = gmem(&[
        "conformance",
        "--backend",
        "all",
        "--json",
        "--filter",
        "fault_*",
    ]);
    let top: Value = serde_json::from_slice(&all.stdout).expect("JSON");
    assert_eq!(top["version"], 1);
    let v = &top["backends"];
    let backends: Vec<&str> = v
        .as_array()
        .expect("backends, three for all")
        .iter()
        .map(|b| b["backend"].as_str().unwrap())
        .collect();
    assert_eq!(backends, ["emulated", "kernel", "differential"]);
    // Without /dev/kvm every kernel case is a skip naming it; with it they pass here.
    for b in v.as_array().unwrap() {
        for c in b["cases"].as_array().unwrap() {
            if c["result"] == "skip" {
                assert!(!c["reason"].as_str().unwrap().is_empty(), "{c}");
            }
        }
    }
    assert!(all.status.success(), "{}", stdout(&all));
}

/// `--format ktap`: KTAP version 1 as kselftest prints it, exit 0 when everything passed or
/// skipped with at least one pass.
fn conformance_ktap_is_ktap_v1_with_totals() {
    let out = gmem(&["conformance", "--backend", "emulated", "--format", "ktap"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "KTAP version 1");
    assert!(
        lines.iter().any(|l| l.starts_with("# host: kernel ")),
        "{text}"
    );
    let plan = lines
        .iter()
        .find_map(|l| l.strip_prefix("1.."))
        .expect("plan");
    let n: usize = plan.parse().expect("1..N");
    let results: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("ok ") || l.starts_with("not ok "))
        .collect();
    assert_eq!(results.len(), n, "{text}");
    for (i, l) in results.iter().enumerate() {
        let want = format!("ok {} emulated/", i + 1);
        assert!(l.starts_with(&want), "{l} (wanted {want}...)");
    }
    let skips = results.iter().filter(|l| l.contains(" # SKIP ")).count();
    assert!(skips >= 1, "{text}");
    // Every skip carries its own reason: KTAP readers do not follow references.
    for l in results.iter().filter(|l| l.contains(" # SKIP ")) {
        let reason = l.split_once(" # SKIP ").expect("a skip").1;
        assert!(
            !reason.is_empty() && !reason.starts_with("see ["),
            "{l}: a skip without its own reason"
        );
    }
    assert_eq!(
        *lines.last().unwrap(),
        format!(
            "# Totals: pass:{} fail:0 xfail:0 xpass:0 skip:{skips} error:0",
            n - skips
        )
    );
}

/// `--format ktap` prints each result line as its case ends: the first line arrives while
/// the run is still going (before, every line came at the end of the run).
fn conformance_ktap_streams_each_result_as_the_case_ends() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(["conformance", "--backend", "emulated", "--format", "ktap"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("gmem runs");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("ok ") || l.starts_with("not ok "))
        .expect("a result line");
    let running = child.try_wait().expect("wait").is_none();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().expect("wait");
    assert!(first.starts_with("ok 1 emulated/"), "{first}");
    assert!(
        running,
        "the first result line came only after the run ended"
    );
    assert!(rest.iter().filter(|l| l.starts_with("ok ")).count() >= 25);
    assert_eq!(status.code(), Some(0));
}

/// The exit status follows what the kernel offers: `--backend all` passes on any host (the
/// emulated backend runs everything), and `--backend kernel` is a skip (4) with one reason for
/// every case where the kernel has no guest_memfd, a pass (0) where it has one.
fn conformance_exit_status_follows_the_kernel() {
    let all = gmem(&["conformance", "--backend", "all", "--format", "ktap"]);
    assert_eq!(all.status.code(), Some(0), "{}", stdout(&all));
    let kernel = gmem(&["conformance", "--backend", "kernel", "--format", "ktap"]);
    let text = stdout(&kernel);
    match needs(&[Feature::GuestMemfd]) {
        Some(why) => {
            assert_eq!(kernel.status.code(), Some(4), "{text}");
            let results: Vec<&str> = text.lines().filter(|l| l.starts_with("ok ")).collect();
            assert!(results.len() >= 40, "{text}");
            for l in results {
                let reason = l.split_once(" # SKIP ").map(|(_, r)| r);
                assert!(
                    reason.is_some_and(|r| r.contains(&why)),
                    "{l}: not skipped with the probe's reason ({why})"
                );
            }
        }
        None => assert_eq!(kernel.status.code(), Some(0), "{text}"),
    }
}

/// Exit status 4 (KSFT_SKIP) when a filter leaves only skips; 2 when it selects nothing.
fn conformance_exit_status_is_kselftest() {
    // file_read_write skips on the emulated backend (no descriptor).
    let out = gmem(&[
        "conformance",
        "--backend",
        "emulated",
        "--filter",
        "file_read_write",
        "--format",
        "ktap",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        text.contains("ok 1 emulated/file_read_write # SKIP "),
        "{text}"
    );
    assert!(text.contains("# Totals: pass:0 fail:0 xfail:0 xpass:0 skip:1 error:0"));
    let out = gmem(&[
        "conformance",
        "--backend",
        "emulated",
        "--filter",
        "nothing_like_this",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing_like_this"),
        "{out:?}"
    );
}

/// `--json`: one object with the list of runs whatever the selection, the exit status and the
/// shared reasons once.
fn conformance_json_has_one_shape() {
    for backend in ["emulated", "kernel", "all"] {
        let out = gmem(&[
            "conformance",
            "--backend",
            backend,
            "--json",
            "--filter",
            "init_",
        ]);
        let top: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        assert_eq!(top["version"], 1);
        assert_eq!(
            top["exit_status"].as_i64(),
            out.status.code().map(i64::from)
        );
        assert!(top["backends"].is_array(), "{top}");
        assert!(top["notes"].is_array(), "{top}");
        let total: u64 = ["passed", "failed", "skipped"]
            .iter()
            .map(|k| top[k].as_u64().unwrap())
            .sum();
        let cases: usize = top["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["cases"].as_array().unwrap().len())
            .sum();
        assert_eq!(total, cases as u64, "{top}");
    }
}

fn bad_arguments_are_errors_naming_the_allowed_values() {
    let out = gmem(&["conformance", "--backend", "qemu"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("emulated") && err.contains("kernel") && err.contains("all"),
        "{err}"
    );
    let out = gmem(&[
        "io",
        "-c",
        "create 4k mmap",
        "-c",
        "mread 0 1",
        "-c",
        "frob",
    ]);
    assert_eq!(out.status.code(), Some(2));
    // Usage errors go to stderr, each with the place it came from.
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("gmem io: -c #3: frob -> error: unknown command \"frob\"; allowed: create"),
        "{text}"
    );
    assert!(
        text.contains("gmem io: -c #2: mread 0x0 0x1 -> error: no mapping"),
        "{text}"
    );
    assert_eq!(stdout(&out), "create 0x1000 mmap -> ok\n");
    let out = gmem(&["io", "--vm-type", "tdx", "-c", "stat"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sw_protected"));
}

/// The same script through `gmem io` on both backends prints the same lines, up to the known
/// deviations of DESIGN.md: one test per script
/// (`io_prints_the_same_lines_on_emulated_and_kernel::<script>`); a script needing what the
/// kernel lacks (guest_memfd, a flag, conversion) is ignored, with the reason.
fn io_prints_the_same_lines_on_emulated_and_kernel() -> Vec<Trial> {
    const NAME: &str = "io_prints_the_same_lines_on_emulated_and_kernel";
    scripts()
        .into_iter()
        .map(|s| {
            let mut features = vec![Feature::GuestMemfd];
            features.extend(s.needs.iter().filter_map(|n| n.kernel_feature()));
            test_unless(format!("{NAME}::{}", s.name), needs(&features), move || {
                let dir = TempDir::new("gmem-io").unwrap();
                let path = dir.join(s.name);
                std::fs::write(&path, &s.text).unwrap();
                let p = path.to_str().unwrap();
                let emu = stdout(&gmem(&["io", "--backend", "emulated", "-f", p]));
                let ker = stdout(&gmem(&["io", "--backend", "kernel", "-f", p]));
                let (e, k): (Vec<&str>, Vec<&str>) = (emu.lines().collect(), ker.lines().collect());
                assert_eq!(e.len(), k.len(), "{}", s.name);
                for (a, b) in e.iter().zip(&k) {
                    if a == b {
                        continue;
                    }
                    let known = KNOWN_DEVIATIONS.iter().any(|d| {
                        d.script == s.name
                            && *a == format!("{} -> {}", d.command, d.emulated)
                            && *b == format!("{} -> {}", d.command, d.kernel)
                    });
                    assert!(known, "{}: emulated `{a}`, kernel `{b}`", s.name);
                }
            })
        })
        .collect()
}

fn main() {
    let mut trials = tests!(
        conformance_table_ends_with_the_totals_and_passes_on_emulated,
        conformance_json_per_backend_and_filter,
        conformance_ktap_is_ktap_v1_with_totals,
        conformance_ktap_streams_each_result_as_the_case_ends,
        conformance_exit_status_follows_the_kernel,
        conformance_exit_status_is_kselftest,
        conformance_json_has_one_shape,
        bad_arguments_are_errors_naming_the_allowed_values,
    );
    trials.extend(io_prints_the_same_lines_on_emulated_and_kernel());
    common::run(trials)
}
