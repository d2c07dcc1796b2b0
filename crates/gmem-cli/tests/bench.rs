//! `gmem bench --quick --json --plot`: the documented JSON shape, every section the issue
//! lists, both models on every line, and the plot. Structure only: speed is the benchmark's
//! own output, never a test's.

//!
//! Without /dev/kvm the vCPU lines are absent (the output says why); the test then checks the
//! rest and is reported as ignored with that reason.

mod common;

use std::process::Command;

use serde_json::Value;

fn bench_json_has_every_section_and_both_models() -> Option<String> {
    let dir = common::TempDir::new("gmem-bench-test").expect("temp dir");
    let svg = dir.join("conv.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(["bench", "--quick", "--json", "--plot"])
        .arg(&svg)
        .output()
        .expect("gmem runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["version"], 1);
    let results = v["results"].as_array().expect("results");
    let skipped: Vec<&str> = v["skipped"]
        .as_array()
        .expect("skipped")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for r in results {
        for key in [
            "name",
            "median_us",
            "baseline",
            "baseline_median_us",
            "ratio",
        ] {
            assert!(r.get(key).is_some(), "missing {key} in {r}");
        }
        let (m, b) = (
            r["median_us"].as_f64().unwrap(),
            r["baseline_median_us"].as_f64().unwrap(),
        );
        assert!(m > 0.0 && b > 0.0, "{r}");
        let ratio = r["ratio"].as_f64().expect("a ratio");
        assert!((ratio - m / b).abs() <= 1e-9 * ratio.max(1.0), "{r}");
        let n = r["samples"].as_u64().unwrap();
        if r["group"] != "footprint" {
            assert!(n >= 5, "fewer than five repetitions: {r}");
        }
    }
    let has = |group: &str, name: &str, baseline: &str| {
        results
            .iter()
            .any(|r| r["group"] == group && r["name"] == name && r["baseline"] == baseline)
    };
    // 1. conversion latency, every size, populated and not, against both two-backing kinds.
    for size in ["4KiB", "64KiB", "2MiB", "64MiB"] {
        for what in ["to_private", "to_shared"] {
            for pop in ["populated", "unpopulated"] {
                for b in ["two-backing", "two-backing+copy"] {
                    let name = format!("in-place {what} {pop} {size}");
                    assert!(has("conversion", &name, b), "missing {name} vs {b}");
                }
            }
        }
    }
    // 2. round trips, with their floor.
    for size in ["4KiB", "2MiB"] {
        let name = format!("in-place round trip {size}, every page touched");
        assert!(has("round-trip", &name, "two-backing+copy"), "{name}");
        assert!(has("round-trip", &name, "two-backing"), "{name}");
        let floor = format!(
            "floor round trip {size}, every page touched (zaps + re-faults, no conversion)"
        );
        assert!(has("round-trip", &floor, "two-backing+copy"), "{floor}");
    }
    // 3. and 6. need /dev/kvm: present, or said why not.
    let kvm = std::path::Path::new("/dev/kvm").exists();
    let vcpu = results.iter().any(|r| r["group"] == "vcpu");
    assert!(
        vcpu || skipped.iter().any(|s| s.starts_with("vCPU round trips")),
        "no vCPU lines and no reason"
    );
    let no_vcpu = (!vcpu).then(|| format!("no vCPU lines: {skipped:?}"));
    // 4. gmem run end to end on both models (host-driven without /dev/kvm).
    let workload: Vec<&Value> = results
        .iter()
        .filter(|r| r["group"] == "workload")
        .collect();
    assert_eq!(workload.len(), 2, "{workload:?}");
    assert!(workload.iter().all(|r| r["name"]
        .as_str()
        .unwrap()
        .starts_with("in-place gmem run end to end")));
    // 5. footprint in both fragmentations (deterministic, so its targets are asserted), or
    // said why not (4 KiB fragments without poison markers: more mappings than the budget).
    let mut footprint_skipped = Vec::new();
    for (frag, size) in [("2MiB", "2 MiB"), ("4KiB", "4 KiB")] {
        let name = format!("in-place footprint 1GiB, half shared in {frag} fragments");
        if let Some(why) = skipped
            .iter()
            .find(|s| s.starts_with(&format!("footprint, half shared in {frag} fragments")))
        {
            footprint_skipped.push(size);
            assert!(!has("footprint", &name, "two-backing+copy"), "{why}");
            continue;
        }
        assert!(has("footprint", &name, "two-backing+copy"), "{name}");
    }
    if kvm && !results.iter().any(|r| r["group"] == "kernel") {
        assert!(skipped.iter().any(|s| s.starts_with("kernel vs emulated")));
    }
    let targets = v["targets"].as_array().expect("targets");
    // Two footprint targets per fragmentation measured.
    assert_eq!(
        targets.len(),
        8 - 2 * footprint_skipped.len(),
        "{targets:?}"
    );
    for t in targets {
        let what = t["target"].as_str().unwrap();
        assert_eq!(
            t["floor_ratio"].is_f64(),
            what.contains("round trip"),
            "floor_ratio of {what}"
        );
        if what.starts_with("footprint") {
            assert_eq!(t["met"], true, "{t}");
        }
    }
    let plot = std::fs::read_to_string(&svg).expect("the plot was written");
    assert!(plot.contains("<svg") && plot.trim_end().ends_with("</svg>"));
    assert!(plot.contains("in-place") && plot.contains("two-backing+copy"));
    no_vcpu.or_else(|| {
        (!footprint_skipped.is_empty()).then(|| format!("footprint not measured: {skipped:?}"))
    })
}

fn main() {
    common::run(vec![common::test_partly(
        "bench_json_has_every_section_and_both_models",
        bench_json_has_every_section_and_both_models,
    )])
}
