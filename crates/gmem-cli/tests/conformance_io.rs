//! `gmem conformance` and `gmem io` as a user runs them.

use std::process::{Command, Output};

use gmem_check::conformance::differential::{scripts, KNOWN_DEVIATIONS};
use gmem_check::conformance::Need;
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

#[test]
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
    assert!(text.contains("forked_accesses") && text.contains("forked child"));
}

#[test]
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

#[test]
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

/// The same script through `gmem io` on both backends prints the same lines, for every command
/// this host's kernel supports (no conversion here: those scripts are left out where the kernel
/// cannot convert), up to the known deviations of DESIGN.md.
#[test]
fn io_prints_the_same_lines_on_emulated_and_kernel() {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("skipped: /dev/kvm is missing");
        return;
    }
    let probe = gmem(&[
        "io",
        "--backend",
        "kernel",
        "-c",
        "create 4k mmap|init_shared",
    ]);
    if !probe.status.success() {
        println!(
            "skipped: the kernel backend is unusable: {}",
            String::from_utf8_lossy(&probe.stderr)
        );
        return;
    }
    let converts = stdout(&gmem(&[
        "io",
        "--backend",
        "kernel",
        "-c",
        "create 4k mmap|init_shared",
        "-c",
        "convert private 0 4k",
    ]))
    .contains("convert private 0x0 0x1000 -> ok");
    let dir = std::env::temp_dir().join(format!("gmem-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut compared = 0;
    for s in scripts() {
        if s.needs.contains(&Need::Conversion) && !converts {
            println!(
                "skipped: script {} (the kernel cannot convert here)",
                s.name
            );
            continue;
        }
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
        compared += 1;
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(compared >= 10, "only {compared} scripts compared");
}
