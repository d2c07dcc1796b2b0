//! `gmem exec`: the project's C test programs (crates/gmem-preload/tests/c), compiled here with
//! the system C compiler, and the kvm-ioctls example, run under the interposer; `--trace`;
//! the refusal of a static binary; `gmem conformance` through the interposer. Tests that need
//! /dev/kvm or a C compiler are reported as ignored with the reason where this host lacks them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{needs, test_partly, test_unless, Feature};

const TIMEOUT: Duration = Duration::from_secs(120);

fn c_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../gmem-preload/tests/c")
}

/// The directory the compiled programs and traces go to: a temporary one that `main` removes
/// once every test has ended.
static OUT_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn out_dir() -> PathBuf {
    OUT_DIR.get().expect("set by main").clone()
}

/// Why the C programs cannot be built here, if they cannot.
fn no_cc() -> Option<String> {
    match Command::new("cc").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("no C compiler (`cc`) on PATH".into()),
    }
}

fn why_not() -> Option<String> {
    needs(&[Feature::Kvm]).or_else(no_cc)
}

/// Compiles `name.c` (with `extra` flags) and returns the binary.
fn compile(name: &str, extra: &[&str]) -> PathBuf {
    let bin = out_dir().join(format!("{name}{}", extra.join("").replace(['-', '='], "_")));
    let out = Command::new("cc")
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&bin)
        .arg(c_dir().join(format!("{name}.c")))
        .args(extra)
        .output()
        .expect("cc runs");
    assert!(
        out.status.success(),
        "cc {name}.c: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// Runs `cmd`, killed after [`TIMEOUT`].
fn run_bounded(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn gmem_exec(args: &[&str], program: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gmem"));
    cmd.arg("exec").args(args).arg("--").arg(program);
    run_bounded(cmd)
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn c_program(
    name: &'static str,
    extra: &'static [&'static str],
    args: &'static [&'static str],
) -> impl FnOnce() {
    move || {
        let bin = compile(name, extra);
        let out = gmem_exec(args, &bin);
        assert_ok(&out, name);
        assert!(String::from_utf8_lossy(&out.stdout).contains(": ok ("));
    }
}

fn uapi_without_interposer_is_refused_by_this_kernel() {
    // The same program without gmem exec: this host's kernel lacks the series, so it fails
    // (a check that the answers above came from the interposer). On a kernel with the series
    // it may pass; either way it must not hang or crash.
    let bin = compile("uapi", &[]);
    let out = run_bounded(Command::new(&bin));
    assert!(
        out.status.code().is_some(),
        "uapi killed by a signal: {:?}",
        out.status
    );
}

fn fork() {
    // The child sees the parent's shared writes, and private pages raise SIGBUS in it,
    // including pages converted after the fork (the emulated backend's fork handlers).
    let bin = compile("fork", &[]);
    let out = gmem_exec(&[], &bin);
    assert_ok(&out, "fork");
}

fn trace_logs_each_intercepted_call() {
    let bin = compile("conversion", &[]);
    let trace = out_dir().join("conversion.trace");
    let out = gmem_exec(&["--trace", trace.to_str().expect("utf-8")], &bin);
    assert_ok(&out, "conversion --trace");
    let text = std::fs::read_to_string(&trace).expect("trace written");
    assert!(text.starts_with("# gmem exec --platform sw --series v8 -- "));
    for needle in [
        "KVM_CREATE_VM, 1) -> ",
        "KVM_CREATE_GUEST_MEMFD, size=0x4000 flags=mmap|init_shared",
        "KVM_SET_MEMORY_ATTRIBUTES2, offset=0x0 size=0x4000 attributes=0x8) -> -1 EAGAIN error_offset=0x2000",
        "open(\"/sys/kernel/debug/gup_test\")",
        "madvise(",
        "close(",
    ] {
        assert!(text.contains(needle), "trace lacks {needle:?}:\n{text}");
    }
}

fn static_binary_is_refused() -> Option<String> {
    let bin = out_dir().join("static_true");
    let src = out_dir().join("static_true.c");
    std::fs::write(&src, "int main(void) { return 0; }\n").expect("write");
    let cc = Command::new("cc")
        .args(["-static", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("cc");
    if !cc.status.success() {
        return Some("cc -static cannot link here (no static C library)".into());
    }
    let out = gmem_exec(&[], &bin);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("statically linked"), "{err}");
    None
}

fn kvm_ioctls_flow() -> Option<String> {
    // Built by `cargo test` with this package's examples.
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_gmem"));
    let flow = exe
        .parent()
        .expect("target dir")
        .join("examples/kvm_ioctls_flow");
    if !flow.is_file() {
        return Some(format!(
            "{} not built (cargo test builds examples)",
            flow.display()
        ));
    }
    let out = gmem_exec(&[], &flow);
    assert_ok(&out, "kvm_ioctls_flow");
    None
}

/// `gmem exec -- gmem conformance --backend all --vm-type sw_protected`: the kernel backend,
/// unaware, runs its cases through the interposer, and the differential check between the
/// emulated backend and "the kernel" is clean.
fn conformance_kernel_backend_through_the_interposer() {
    let gmem = env!("CARGO_BIN_EXE_gmem");
    let mut cmd = Command::new(gmem);
    cmd.args([
        "exec",
        "--",
        gmem,
        "conformance",
        "--backend",
        "all",
        "--vm-type",
        "sw_protected",
    ]);
    let out = run_bounded(cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    let failures: Vec<&str> = text
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("fail"))
        .collect();
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
    assert_ok(&out, "gmem exec -- gmem conformance");
    let count = |backend: &str| {
        text.lines()
            .filter(|l| {
                let c: Vec<&str> = l.split_whitespace().collect();
                c.first() == Some(&backend) && c.get(2) == Some(&"pass")
            })
            .count()
    };
    // Counts on this host (PVM, no series): kernel 28, differential 25 (every script).
    assert!(
        count("kernel") >= 28,
        "kernel cases passed: {}\n{text}",
        count("kernel")
    );
    assert!(
        count("differential") >= 25,
        "differential: {}\n{text}",
        count("differential")
    );
}

fn main() {
    let dir = common::TempDir::new("gmem-exec-tests").expect("temp dir");
    let _ = OUT_DIR.set(dir.path().to_path_buf());
    let why = why_not();
    let mut trials = vec![
        test_unless("uapi", why.clone(), c_program("uapi", &[], &[])),
        test_unless(
            "uapi_series_v7",
            why.clone(),
            c_program("uapi", &["-DGMEM_SERIES_V7"], &["--series", "v7"]),
        ),
        test_unless("conversion", why.clone(), c_program("conversion", &[], &[])),
        test_unless("vcpu", why.clone(), c_program("vcpu", &[], &[])),
        test_unless("prefault", why.clone(), c_program("prefault", &[], &[])),
        // Fork children share the emulated files only under the guard.
        test_unless(
            "fork",
            why.clone()
                .or_else(|| needs(&[gmem::emulated::GUARD_NEEDS])),
            fork,
        ),
        // Forks racing mappings in another thread: no child hangs on the interposer's locks
        // or inherits a mapping the guard does not see.
        test_unless(
            "fork_race",
            why.clone()
                .or_else(|| needs(&[gmem::emulated::GUARD_NEEDS])),
            c_program("fork_race", &[], &[]),
        ),
        // The attacks of the guard's trust boundary, on the platforms' kinds of file.
        test_unless(
            "attacks",
            why.clone()
                .or_else(|| needs(&[gmem::emulated::GUARD_NEEDS])),
            c_program("attacks", &[], &[]),
        ),
        test_unless(
            "attacks_no_direct_map",
            why.clone()
                .or_else(|| needs(&[gmem::emulated::GUARD_NEEDS])),
            c_program("attacks", &["-DGMEM_NDM"], &[]),
        ),
        test_unless(
            "attacks_pkvm",
            why.clone()
                .or_else(|| needs(&[gmem::emulated::GUARD_NEEDS])),
            c_program("attacks", &[], &["--platform", "pkvm"]),
        ),
        test_unless(
            "threads",
            why.clone(),
            c_program("threads", &["-pthread"], &[]),
        ),
        test_unless(
            "trace_logs_each_intercepted_call",
            why.clone(),
            trace_logs_each_intercepted_call,
        ),
        test_unless(
            "uapi_without_interposer_is_refused_by_this_kernel",
            why.clone(),
            uapi_without_interposer_is_refused_by_this_kernel,
        ),
    ];
    let skip = no_cc();
    trials.push(test_partly("static_binary_is_refused", move || {
        skip.or_else(static_binary_is_refused)
    }));
    let skip = needs(&[Feature::Kvm]);
    trials.push(test_partly("kvm_ioctls_flow", move || {
        skip.or_else(kvm_ioctls_flow)
    }));
    // The suite forks (forked_accesses): through the interposer the "kernel" files are the
    // emulated ones, shared with fork children only under the guard.
    trials.push(test_unless(
        "conformance_kernel_backend_through_the_interposer",
        needs(&[Feature::Kvm, gmem::emulated::GUARD_NEEDS]),
        conformance_kernel_backend_through_the_interposer,
    ));
    gmem_testkit::run_keeping(trials, dir)
}
