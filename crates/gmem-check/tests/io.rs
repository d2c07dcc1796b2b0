//! `gmem io` (`gmem_check::script`): parsing, the printed lines, and the differential check built on it.

//!
//! The tests against this host's kernel are reported as ignored with the reason where the
//! kernel backend is unavailable, and so is each differential script whose capability
//! (conversion) the kernel lacks.

mod common;

use common::Trial;
use common::{needs, test_unless, tests, tests_needing, Feature};
use gmem_check::conformance::differential::{self, compare, scripts, KNOWN_DEVIATIONS};
use gmem_check::conformance::{Ctx, Outcome};
use gmem_check::script::{parse_flags, parse_size, summarize, Command, IoError, Line, Session};
use proptest::prelude::*;

fn sizes_take_suffixes_and_hex() {
    assert_eq!(parse_size("LEN", "4096"), Ok(4096));
    assert_eq!(parse_size("LEN", "4k"), Ok(4096));
    assert_eq!(parse_size("LEN", "4K"), Ok(4096));
    assert_eq!(parse_size("LEN", "2m"), Ok(2 << 20));
    assert_eq!(parse_size("LEN", "1g"), Ok(1 << 30));
    assert_eq!(parse_size("LEN", "0x1000"), Ok(4096));
    assert_eq!(parse_size("LEN", "0x10k"), Ok(16 << 10));
    assert_eq!(parse_size("LEN", "0xffffffffffffffff"), Ok(u64::MAX));
    for bad in [
        "",
        "k",
        "4q",
        "-1",
        "0x",
        "1.5k",
        "99999999999999999999",
        "0xfffffffffffffg",
    ] {
        let e = parse_size("LEN", bad).expect_err(bad);
        assert!(
            e.to_string().contains(&format!("{bad:?}")),
            "the error names the bad value: {e}"
        );
    }
    // Overflow through the suffix is an error, not a wrap.
    assert!(parse_size("LEN", "0xffffffffffffffffk").is_err());
    assert!(parse_size("LEN", "17179869184g").is_err());
}

fn flags_by_name_or_number() {
    assert_eq!(parse_flags("mmap"), Ok(1));
    assert_eq!(parse_flags("mmap,init_shared"), Ok(3));
    assert_eq!(parse_flags("mmap|init_shared"), Ok(3));
    assert_eq!(parse_flags("INIT_SHARED|no_direct_map"), Ok(6));
    assert_eq!(parse_flags("0"), Ok(0));
    assert_eq!(parse_flags("0x8|mmap"), Ok(9));
    let e = parse_flags("mmap|shared").unwrap_err();
    assert_eq!(e, IoError::Flag("shared".into()));
    let msg = e.to_string();
    assert!(msg.contains("mmap, init_shared, no_direct_map"), "{msg}");
    assert!(parse_flags("mmap||init_shared").is_err());
}

fn commands_parse_and_print_normalised() {
    let p = |s: &str| Command::parse(s).unwrap().unwrap().to_string();
    assert_eq!(
        p("create 16k mmap,init_shared"),
        "create 0x4000 mmap|init_shared"
    );
    assert_eq!(p("  CREATE 4096  "), "create 0x1000 0");
    assert_eq!(p("mwrite 0 4k"), "mwrite 0x0 0x1000 0xcd");
    assert_eq!(p("mwrite 0 4k 170"), "mwrite 0x0 0x1000 0xaa");
    assert_eq!(
        p("convert Private 0 2m # a comment"),
        "convert private 0x0 0x200000"
    );
    assert_eq!(p("mmap"), "mmap");
    assert_eq!(p("mmap 64k"), "mmap 0x10000");
    assert_eq!(Command::parse("   # only a comment").unwrap(), None);
    assert_eq!(Command::parse("").unwrap(), None);
    let err = |s: &str| Command::parse(s).unwrap_err().to_string();
    assert!(err("frob 1").contains("unknown command \"frob\"; allowed: create, mmap"));
    assert!(err("convert both 0 4k").contains("allowed: private, shared"));
    assert!(err("mread 0").contains("expected \"mread OFF LEN\", got 1"));
    assert!(err("stat 1").contains("expected \"stat\""));
    assert!(err("mwrite 0 1 256").contains("bad BYTE \"256\""));
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]
    /// No input line panics the interpreter; every line prints exactly one result.
        fn no_line_panics(line in "[a-z_ 0-9xkmg|,#.-]{0,40}") {
        let mut s = Session::emulated();
        if let Some(out) = s.exec(&line) {
            prop_assert!(!out.to_string().is_empty());
        }
    }
}

fn summary_lists_values_and_ranges() {
    let mut b = vec![0xaau8; 0x3000];
    b[0x1000..0x2000].fill(0);
    assert_eq!(
        summarize(0x4000, &b),
        "data 0xaa=[0x4000,0x5000)+[0x6000,0x7000) 0x00=[0x5000,0x6000)"
    );
    let noisy: Vec<u8> = (0..=255u8).cycle().take(2000).collect();
    let s = summarize(0, &noisy);
    assert!(s.contains("(248 more values)"), "{s}");
    assert!(s.contains("+(") && s.contains("more)"), "{s}");
}

/// The lines of the emulated backend for the §4.1 flows, in full: the format is stable.
fn emulated_lines_for_the_selftest_flows() {
    let mut s = Session::emulated();
    let out: Vec<String> = s
        .run_script(
            "create 16k mmap|init_shared\nmmap 64k\nmwrite 0 64k 0xaa\nmread 0 16k\nfpunch 4k 4k\n\
             mread 0 16k\nstat\nattrs 0 16k\npin 0 4k\nconvert private 0 8k\nunpin 0 4k\n\
             convert private 4k 4k\nmread 0 8k\nmwrite 8k 8k 1\nattrs 0 16k\ngwrite 4k 4 0x77\ngread 4k 8\n\
             convert shared 4k 4k\nmread 4k 8\nfalloc 16k 4k\nfpunch 1 4k\ncreate 4095\nmread 0 1",
        )
        .iter()
        .map(Line::to_string)
        .collect();
    let want = [
        "create 0x4000 mmap|init_shared -> ok",
        "mmap 0x10000 -> ok",
        "mwrite 0x0 0x10000 0xaa -> SIGBUS at 0x4000",
        "mread 0x0 0x4000 -> data 0xaa=[0x0,0x4000)",
        "fpunch 0x1000 0x1000 -> ok",
        "mread 0x0 0x4000 -> data 0xaa=[0x0,0x1000)+[0x2000,0x4000) 0x00=[0x1000,0x2000)",
        "stat -> size=0x4000 blksize=0x1000",
        "attrs 0x0 0x4000 -> shared=[0x0,0x4000)",
        "pin 0x0 0x1000 -> ok",
        "convert private 0x0 0x2000 -> EAGAIN error_offset=0x0",
        "unpin 0x0 0x1000 -> ok",
        "convert private 0x1000 0x1000 -> ok",
        "mread 0x0 0x2000 -> SIGBUS at 0x1000",
        "mwrite 0x2000 0x2000 0x01 -> ok",
        "attrs 0x0 0x4000 -> shared=[0x0,0x1000) private=[0x1000,0x2000) shared=[0x2000,0x4000)",
        "gwrite 0x1000 0x4 0x77 -> ok",
        "gread 0x1000 0x8 -> data 0x77=[0x1000,0x1004) 0x00=[0x1004,0x1008)",
        "convert shared 0x1000 0x1000 -> ok",
        "mread 0x1000 0x8 -> data 0x77=[0x1000,0x1004) 0x00=[0x1004,0x1008)",
        "falloc 0x4000 0x1000 -> EINVAL",
        "fpunch 0x1 0x1000 -> EINVAL",
        "create 0xfff 0 -> EINVAL",
        "mread 0x0 0x1 -> error: no file: run `create SIZE [FLAGS]` first",
    ];
    assert_eq!(out, want);
}

fn line(command: &str, outcome: &str) -> Line {
    Line {
        command: command.to_string(),
        outcome: outcome.to_string(),
        usage_error: outcome.starts_with("error:"),
    }
}

fn a_difference_fails_unless_it_is_a_known_deviation() {
    let a = [line("create 0x1000 0", "ok"), line("mmap", "ENODEV")];
    assert_eq!(compare("x", &a, &a), Outcome::Pass);
    let b = [line("create 0x1000 0", "ok"), line("mmap", "EINVAL")];
    assert!(matches!(compare("x", &a, &b), Outcome::Fail(r) if r.contains("line 2")));
    assert!(matches!(compare("x", &a, &a[..1]), Outcome::Fail(_)));
    let bad = [line("frob", "error: unknown command")];
    assert!(matches!(compare("x", &bad, &bad), Outcome::Fail(r) if r.contains("script error")));
    for d in KNOWN_DEVIATIONS {
        let e = [line(d.command, d.emulated)];
        let k = [line(d.command, d.kernel)];
        assert_eq!(compare(d.script, &e, &k), Outcome::Pass, "{d:?}");
        // Only in its script, and only with exactly these outcomes.
        assert!(matches!(
            compare("another_script", &e, &k),
            Outcome::Fail(_)
        ));
        let other = [line(d.command, "EPERM")];
        assert!(matches!(compare(d.script, &e, &other), Outcome::Fail(_)));
    }
}

/// Every known deviation is a row of the one table in DESIGN.md, and every row is one of them.
fn known_deviations_match_the_design_table() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../DESIGN.md");
    let design = std::fs::read_to_string(path).expect("DESIGN.md exists");
    let heading = "## Known deviations (differential check)";
    let section = design
        .split_once(heading)
        .map(|(_, s)| s)
        .expect("DESIGN.md has the known-deviations section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let rows: Vec<Vec<String>> = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().trim_matches('`').to_string())
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), KNOWN_DEVIATIONS.len(), "rows: {rows:?}");
    for d in KNOWN_DEVIATIONS {
        assert!(
            rows.iter().any(|r| r.len() >= 5
                && r[0] == d.script
                && r[1] == d.command
                && r[2] == d.emulated
                && r[3] == d.kernel),
            "{d:?} is not in DESIGN.md's table"
        );
    }
}

/// The differential check on this host, one test per script
/// (`io_scripts_print_the_same_lines_on_emulated_and_kernel::<script>`): every script both
/// backends can run prints the same lines on both, up to the known deviations; a script needing
/// what the kernel lacks (guest_memfd, a flag, conversion) is ignored with the reason. The
/// emulated backend must run every script.
fn io_scripts_print_the_same_lines_on_emulated_and_kernel() -> Vec<Trial> {
    const NAME: &str = "io_scripts_print_the_same_lines_on_emulated_and_kernel";
    let why = &needs(&[Feature::GuestMemfd]);
    let kernel = why
        .is_none()
        .then(|| Ctx::kernel(0).expect("listed with a kernel backend"));
    scripts()
        .into_iter()
        .map(|script| {
            let name = format!("{NAME}::{}", script.name);
            let Some(kernel) = kernel.clone() else {
                return test_unless(name, why.clone(), || {});
            };
            let emulated = Ctx::emulated();
            let on_emulated = script.needs.iter().find_map(|&n| emulated.missing(n));
            let on_kernel = script.needs.iter().find_map(|&n| {
                kernel
                    .missing(n)
                    .map(|why| format!("needs {n:?} of the kernel: {why}"))
            });
            match on_emulated {
                // The emulated backend offers everything a script may need.
                Some(why) => {
                    common::test(name, move || panic!("{}: does not run: {why}", script.name))
                }
                None => test_unless(name, on_kernel, move || {
                    let (e, k) = (
                        differential::run_script(&emulated, &script),
                        differential::run_script(&kernel, &script),
                    );
                    match compare(script.name, &e, &k) {
                        Outcome::Pass => {}
                        other => panic!("{}: {other:?}", script.name),
                    }
                }),
            }
        })
        .collect()
}

/// Every script runs without a usage error on the emulated backend (a typo in a script would
/// otherwise only show where the kernel can run it too).
fn every_script_is_well_formed() {
    for s in scripts() {
        let lines = differential::run_script(&Ctx::emulated(), &s);
        assert!(!lines.is_empty(), "{} is empty", s.name);
        if let Some(l) = lines.iter().find(|l| l.usage_error) {
            panic!("{}: {l}", s.name);
        }
    }
}

/// A random `gmem io` command without conversion (this host's kernel cannot convert):
/// offsets and lengths around page boundaries and the file's end.
fn random_command() -> impl Strategy<Value = String> {
    let off = prop_oneof![
        Just("0".to_string()),
        Just("4k".to_string()),
        Just("8k".to_string()),
        Just("12k".to_string()),
        Just("16k".to_string()),
        Just("1".to_string()),
        Just("4095".to_string()),
        Just("0x7ffffffffffff000".to_string()),
    ];
    let len = prop_oneof![
        Just("1".to_string()),
        Just("4k".to_string()),
        Just("8k".to_string()),
        Just("16k".to_string()),
        Just("0".to_string()),
        Just("4097".to_string()),
    ];
    let byte = any::<u8>().prop_map(|b| b.to_string());
    prop_oneof![
        1 => prop_oneof![
            Just("mmap|init_shared"),
            Just("mmap"),
            Just("0"),
            Just("init_shared")
        ]
        .prop_map(|f| format!("create 16k {f}")),
        1 => Just("mmap".to_string()),
        1 => Just("mmap 32k".to_string()),
        3 => (0..16u64, 1..8192u64).prop_map(|(o, l)| format!("mread {} {l}", o * 1024)),
        2 => (0..16u64, 1..8192u64, byte).prop_map(|(o, l, b)| format!("mwrite {} {l} {b}", o * 1024)),
        2 => (off.clone(), len.clone()).prop_map(|(o, l)| format!("falloc {o} {l}")),
        2 => (off.clone(), len.clone()).prop_map(|(o, l)| format!("fpunch {o} {l}")),
        1 => (off.clone(), len.clone()).prop_map(|(o, l)| format!("pin {o} {l}")),
        1 => (off, len).prop_map(|(o, l)| format!("attrs {o} {l}")),
        1 => Just("stat".to_string()),
    ]
}

fn random_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: random_cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random scripts print the same lines on the emulated backend and on this host's kernel,
    /// up to the known deviations (usage errors, e.g. an access outside the mapping, must
    /// agree too). Needs guest_memfd with MMAP and INIT_SHARED.
        fn random_scripts_agree_with_the_kernel(
        create in prop_oneof![Just("mmap|init_shared"), Just("mmap"), Just("0")],
        cmds in prop::collection::vec(random_command(), 1..24),
    ) {
        let kernel = Ctx::kernel(0).expect("listed with a kernel backend");
        let script = format!("create 16k {create}\nmmap\n{}", cmds.join("\n"));
        let run = |ctx: &Ctx| Session::new(ctx.backend.clone(), None).run_script(&script);
        let (e, k) = (run(&Ctx::emulated()), run(&kernel));
        prop_assert_eq!(e.len(), k.len());
        for (a, b) in e.iter().zip(&k) {
            let ok = a == b || differential::known("*", a, b).is_some();
            prop_assert!(ok, "emulated `{}`, kernel `{}`\nscript:\n{}", a, b, script);
        }
    }
}

/// Issue 11 item 7: a length far past memory is an error, never an abort: guest accesses are
/// checked against the file before a buffer exists, data commands are bounded by
/// `MAX_ACCESS`, and a probe allocates its buffer fallibly. Page 0 of the large file is
/// private, so an access that got past the checks would fault at its first byte instead of
/// touching memory.
fn huge_lengths_are_errors_not_aborts() {
    let mut s = Session::emulated();
    let mut run = |l: &str| s.exec(l).unwrap().to_string();
    assert_eq!(
        run("create 4k mmap|init_shared"),
        "create 0x1000 mmap|init_shared -> ok"
    );
    for cmd in ["gread 0 0x7fffffffffff", "gwrite 0 0x7fffffffffff"] {
        let out = run(cmd);
        assert!(out.contains("outside the file (size 0x1000)"), "{out}");
    }
    let huge = 1u64 << 44; // 16 TiB, sparse
    assert_eq!(
        run(&format!("create {huge:#x} mmap|init_shared")),
        format!("create {huge:#x} mmap|init_shared -> ok")
    );
    assert_eq!(run("mmap"), "mmap -> ok");
    assert_eq!(
        run("convert private 0 4k"),
        "convert private 0x0 0x1000 -> ok"
    );
    for cmd in ["mread", "mwrite", "gread", "gwrite"] {
        let out = run(&format!("{cmd} 0 {huge:#x}"));
        assert!(
            out.ends_with(&format!("error: LEN {huge:#x} is too large for one access")),
            "{out}"
        );
    }
    let max = gmem_check::script::MAX_ACCESS;
    assert!(run(&format!("mread 0 {:#x}", max + 1)).contains("too large"));
    assert_eq!(run("mread 0 4k"), "mread 0x0 0x1000 -> SIGBUS at 0x0");
    // The library's probe: ENOMEM for a buffer the allocator refuses, or (where memory is
    // overcommitted without limit) the fault at the first byte; the buffer is never filled
    // up front.
    let f = gmem::EmulatedGuestMemfd::create(
        huge,
        gmem::uapi::GUEST_MEMFD_FLAG_MMAP | gmem::uapi::GUEST_MEMFD_FLAG_INIT_SHARED,
    )
    .unwrap();
    use gmem::GuestMemfd;
    let m = f.mmap_all().unwrap();
    f.set_private(0, 4096).unwrap();
    match m.probe_read(0, m.len()) {
        Err(e) => assert_eq!(e, gmem::Errno::ENOMEM),
        Ok(p) => assert!(p.is_sigbus(), "{p:?}"),
    }
}

fn main() {
    let mut trials = tests!(
        sizes_take_suffixes_and_hex,
        flags_by_name_or_number,
        commands_parse_and_print_normalised,
        no_line_panics,
        summary_lists_values_and_ranges,
        emulated_lines_for_the_selftest_flows,
        a_difference_fails_unless_it_is_a_known_deviation,
        known_deviations_match_the_design_table,
        every_script_is_well_formed,
        huge_lengths_are_errors_not_aborts,
    );
    trials.extend(io_scripts_print_the_same_lines_on_emulated_and_kernel());
    // The random scripts create files with MMAP and INIT_SHARED.
    trials.extend(tests_needing!([Feature::GuestMemfdFlags(
        gmem::uapi::GUEST_MEMFD_FLAG_MMAP | gmem::uapi::GUEST_MEMFD_FLAG_INIT_SHARED
    )]; random_scripts_agree_with_the_kernel));
    common::run(trials)
}
