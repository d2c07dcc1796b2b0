//! Firecracker (feature/secret-hiding: guest RAM in a guest_memfd with MMAP | INIT_SHARED |
//! NO_DIRECT_MAP) booting its tiny guest under `gmem exec`, through
//! `examples/firecracker/run.sh`. Ignored unless `GMEM_FIRECRACKER` names the folder of the
//! Firecracker client (its sources, build script, guest and configurations): building it takes
//! minutes and, as root, installs libclang-dev and libseccomp-dev.

mod common;

use std::process::Command;

fn firecracker_boots_under_gmem_exec(client: std::path::PathBuf) -> impl FnOnce() {
    move || {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/firecracker/run.sh"
        );
        let out = Command::new(script)
            .args(["--boots", "3"])
            .arg(&client)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        // Firecracker itself hangs now and then after the guest's last exit, with or without
        // gmem (examples/firecracker/README.md): two of three boots must end.
        let ended = |what: &str| {
            text.lines()
                .find(|l| l.contains(what) && l.ends_with(": ok 1"))
                .and_then(|l| l.split_whitespace().next()?.parse::<u32>().ok())
                .unwrap_or(0)
        };
        assert!(ended("gmem exec, secret_free") >= 2, "{text}");
        assert!(
            !text.contains(": bad"),
            "a boot that did not print the guest's lines: {text}"
        );
    }
}

fn main() {
    let client = std::env::var_os("GMEM_FIRECRACKER").map(std::path::PathBuf::from);
    let why = match &client {
        Some(c) if c.join("build.sh").is_file() => None,
        Some(c) => Some(format!(
            "GMEM_FIRECRACKER={}: no build.sh there",
            c.display()
        )),
        None => Some(
            "set GMEM_FIRECRACKER to the Firecracker client folder (builds Firecracker: minutes)"
                .to_string(),
        ),
    };
    common::run(vec![common::test_unless(
        "firecracker_boots_under_gmem_exec",
        why,
        firecracker_boots_under_gmem_exec(client.unwrap_or_default()),
    )])
}
