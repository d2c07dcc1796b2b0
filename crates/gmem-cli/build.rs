//! Build script of the `gmem` command. In a release build (what `cargo install` makes), the
//! interposer `gmem exec` preloads (`libgmem_preload.so`, the gmem-preload crate) is built
//! too, stripped, and carried inside the binary, so that an installed `gmem` needs nothing
//! next to it and no environment variable. Debug builds carry nothing: the workspace build
//! puts the interposer next to the executable, where `gmem exec` looks first.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rustc-check-cfg=cfg(gmem_embedded_preload)");
    if std::env::var("PROFILE").as_deref() != Ok("release") {
        return;
    }
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let preload = manifest_dir.join("../gmem-preload");
    let gmem = manifest_dir.join("../gmem");
    for dir in [preload.join("src"), gmem.join("src")] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    for file in [preload.join("Cargo.toml"), gmem.join("Cargo.toml")] {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    // A target directory of its own: the outer build holds its own one locked.
    let target_dir = out.join("preload-target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "gmem-preload",
            "--manifest-path",
        ])
        .arg(preload.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("CARGO_TARGET_DIR")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true")
        .status();
    match status {
        Ok(s) if s.success() => {}
        other => panic!(
            "building the interposer (gmem-preload) to carry in the gmem binary failed: {other:?}"
        ),
    }
    let so = target_dir.join("release/libgmem_preload.so");
    assert!(so.is_file(), "{} was not built", so.display());
    println!("cargo:rustc-env=GMEM_EMBEDDED_PRELOAD={}", so.display());
    println!("cargo:rustc-cfg=gmem_embedded_preload");
}
