//! `cargo install` as a new user runs it: the installed `gmem`, alone in its folder, runs
//! `gmem exec` with the interposer it carries (written to the user's cache folder on first
//! use), from any directory, with no environment variable. Builds a release `gmem` into a
//! temporary root (about a minute).

mod common;

use std::process::Command;

fn installed_gmem_carries_the_interposer() {
    let root = common::TempDir::new("gmem-install").unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["install", "--quiet", "--offline", "--path"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR")))
        .arg("--root")
        .arg(root.path())
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gmem = root.join("bin/gmem");
    let bin = std::fs::read_dir(root.join("bin")).unwrap().count();
    assert_eq!(bin, 1, "only the gmem command is installed");
    let home = root.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let run = || {
        Command::new(&gmem)
            .args(["exec", "--", "/bin/sh", "-c", "echo \"$LD_PRELOAD\""])
            .current_dir(&home)
            .env("HOME", &home)
            .env_remove("XDG_CACHE_HOME")
            .env_remove("GMEM_PRELOAD")
            .output()
            .unwrap()
    };
    for _ in 0..2 {
        let o = run();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let preload = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert!(
            preload.starts_with(&*home.join(".cache/gmem/libgmem_preload-").to_string_lossy())
                && preload.ends_with(".so"),
            "LD_PRELOAD={preload}"
        );
        let bytes = std::fs::read(&preload).unwrap();
        assert!(bytes.starts_with(b"\x7fELF"));
    }
}

fn main() {
    common::run(vec![common::test(
        "installed_gmem_carries_the_interposer",
        installed_gmem_carries_the_interposer,
    )])
}
