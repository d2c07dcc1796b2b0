//! `gmem probe` runs on any host and `--json` prints one object with the documented keys.

//! The KVM capability checks are reported as ignored with the reason where the host has no
//! kernel backend (no /dev/kvm, or no VM).

mod common;

use std::process::Command;

use common::{test_unless, tests};
use serde_json::Value;

fn gmem(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(args)
        .output()
        .expect("gmem runs")
}

fn probe_json_has_the_documented_keys() {
    let out = gmem(&["probe", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in [
        "kernel_release",
        "kvm",
        "userfaultfd",
        "shmem_thp",
        "hugetlb",
        "nr_hugepages",
        "max_map_count",
        "features",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    let kvm = &v["kvm"];
    for key in [
        "dev_kvm",
        "error",
        "flavour",
        "modules",
        "cpu_flags",
        "api_version",
        "vm_types",
        "vm_type_checks",
        "capability_scope",
        "capabilities",
        "conversion",
        "conversion_support",
        "guest_memfd_create_error",
    ] {
        assert!(kvm.get(key).is_some(), "missing kvm.{key}");
    }
    for key in [
        "available",
        "error",
        "features",
        "feature_names",
        "dev_userfaultfd",
        "unprivileged_userfaultfd",
    ] {
        assert!(
            v["userfaultfd"].get(key).is_some(),
            "missing userfaultfd.{key}"
        );
    }
    let features = v["features"].as_array().expect("features is an array");
    let names: Vec<&str> = features
        .iter()
        .map(|f| f["feature"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "create",
            "mmap",
            "init_shared",
            "conversion",
            "sigbus_on_private",
            "punch_hole",
            "pins_eagain",
            "no_direct_map",
            "guest_memslots",
            "map_gpa_range_exit",
            "memory_fault_exit"
        ]
    );
    for f in features {
        for backend in ["emulated", "kernel"] {
            assert!(f[backend]["available"].is_boolean(), "{f}");
            assert!(f[backend]["detail"].is_string(), "{f}");
        }
    }
}

/// With a VM on /dev/kvm, `gmem probe --json` reports every capability the issue names at VM
/// scope, and each series revision's in-place conversion capability.
fn probe_json_reports_kvm_capabilities() {
    let out = gmem(&["probe", "--json"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let kvm = &v["kvm"];
    assert_eq!(kvm["dev_kvm"], Value::Bool(true), "{kvm}");
    assert_eq!(kvm["capability_scope"], "vm", "{kvm}");
    {
        // Every capability the issue names is reported, and each series revision's
        // in-place conversion capability.
        let caps: Vec<u64> = kvm["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["number"].as_u64().unwrap())
            .collect();
        for n in [231, 232, 233, 234, 235, 236, 201, 244, 10] {
            assert!(caps.contains(&n), "capability {n} missing: {caps:?}");
        }
        let conv: Vec<u64> = kvm["conversion"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["capability"].as_u64().unwrap())
            .collect();
        assert_eq!(conv, [249, 250]);
    }
}

fn probe_text_runs() {
    let out = gmem(&["probe"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/dev/kvm"), "{text}");
    assert!(text.contains("feature"), "{text}");
}

fn main() {
    let mut trials = tests!(probe_json_has_the_documented_keys, probe_text_runs);
    trials.push(test_unless(
        "probe_json_reports_kvm_capabilities",
        common::needs(&[common::Feature::Kvm]),
        probe_json_reports_kvm_capabilities,
    ));
    common::run(trials)
}
