//! The differential check: the same `gmem io` scripts ([`crate::script`]) on two backends, line by
//! line.
//!
//! Every script lists the capabilities it needs; it runs only if both backends have them (else
//! it is a skip naming the backend and the capability). Each printed line carries the
//! observable result of one operation (return value and errno, `error_offset`, SIGBUS and its
//! offset, the bytes read), so equal lines mean equal behaviour. A differing line fails the
//! script unless it is one of [`KNOWN_DEVIATIONS`], which mirrors the table "Known deviations
//! (differential check)" in DESIGN.md (a test keeps the two in step).
//!
//! The scripts follow the cases of `guest_memfd_test.c` (§4.1) and the host-observable half of
//! `guest_memfd_conversions_test.c` (§4.2), plus errno corner cases of §2.3 and §2.5.

use std::sync::Arc;

use super::runner::{matches, BackendReport, CaseReport};
use super::{Ctx, Need, Outcome};
use crate::script::{Line, Session};

/// One script.
#[derive(Debug, Clone)]
pub struct Script {
    /// Name; the report calls it `diff/<name>`.
    pub name: &'static str,
    /// What it follows.
    pub source: &'static str,
    /// What both backends must offer.
    pub needs: &'static [Need],
    /// The `gmem io` commands, one a line.
    pub text: String,
}

/// A difference between the emulated backend and the kernel that is accepted, with why.
#[derive(Debug, Clone, Copy)]
pub struct Deviation {
    /// The script (`*`: any).
    pub script: &'static str,
    /// The normalised command, as printed.
    pub command: &'static str,
    /// The emulated backend's outcome.
    pub emulated: &'static str,
    /// The kernel's outcome.
    pub kernel: &'static str,
    /// The justification (as in DESIGN.md).
    pub why: &'static str,
}

/// The accepted deviations; DESIGN.md, "Known deviations (differential check)", lists the
/// same rows.
pub const KNOWN_DEVIATIONS: &[Deviation] = &[Deviation {
    script: "flags",
    command: "create 0x1000 no_direct_map",
    emulated: "ok",
    kernel: "EINVAL",
    why: NO_DIRECT_MAP,
}];

const NO_DIRECT_MAP: &str = "The emulated backend's default platform (software-protected) offers \
     GUEST_MEMFD_FLAG_NO_DIRECT_MAP as the v10 series does for x86 VMs other than TDX \
     (docs/series.md §3.1); a kernel without that series does not advertise it in \
     KVM_CAP_GUEST_MEMFD_FLAGS and refuses it. The emulated SNP and TDX platforms refuse it too.";

const PS: u64 = gmem::os::PAGE_SIZE;
const CONV: &[Need] = &[Need::Mmap, Need::InitShared, Need::Conversion];

fn s(name: &'static str, source: &'static str, needs: &'static [Need], text: &str) -> Script {
    Script {
        name,
        source,
        needs,
        text: text.to_string(),
    }
}

/// All scripts, in order.
pub fn scripts() -> Vec<Script> {
    const GMT: &str = "guest_memfd_test.c";
    const GMCT: &str = "guest_memfd_conversions_test.c";
    const SPEC25: &str = "docs/series.md §2.5";
    const SPEC23: &str = "docs/series.md §2.3-§2.4";
    let flags = (0..64)
        .map(|b| format!("create 4k {:#x}\n", 1u64 << b))
        .collect::<String>();
    let mut invalid_sizes = String::new();
    for flags in ["0", "mmap", "mmap|init_shared"] {
        for size in (1..PS).step_by(1).filter(|s| flags == "0" || s % 256 == 1) {
            invalid_sizes.push_str(&format!("create {size} {flags}\n"));
        }
        invalid_sizes.push_str(&format!("create 0 {flags}\ncreate {} {flags}\n", PS + 1));
    }
    let punch = super::guest_memfd_test::INVALID_PUNCH_HOLES
        .iter()
        .map(|(o, l)| format!("fpunch {o} {l}\n"))
        .collect::<String>();
    vec![
        Script {
            name: "flags",
            source: GMT,
            needs: &[],
            text: flags,
        },
        s(
            "create_multiple",
            GMT,
            &[],
            "create 4k\nstat\ncreate 8k mmap\nstat\ncreate 16k mmap|init_shared\nstat\nclose",
        ),
        Script {
            name: "invalid_sizes",
            source: GMT,
            needs: &[],
            text: invalid_sizes,
        },
        s(
            "create_sizes",
            SPEC25,
            &[],
            "create 0x7ffffffffffff000\ncreate 0x8000000000000000\ncreate 0xfffffffffffff000\n\
             create 0xffffffffffffffff\ncreate 1g\nstat\ncreate 64g\nstat\ncreate 1 0x4\ncreate 4k 0x8000000000000000",
        ),
        s(
            "mmap_supported",
            GMT,
            &[Need::Mmap, Need::InitShared],
            "create 16k mmap,init_shared\nmmap\nmwrite 0 16k 0xaa\nmread 0 16k\nfpunch 0 4k\n\
             mread 0 16k\nmwrite 0 4k 0xaa\nmread 0 16k\nmwrite 1 2 0x5\nmread 0 8\nmunmap\nmmap\nmread 0 8",
        ),
        s(
            "mmap_not_supported",
            GMT,
            &[],
            "create 16k\nmmap\nmmap 4k\nmmap 64k\nmmap 0\nmmap 0xffffffffffffffff\nmmap 0x800000000000",
        ),
        s(
            "mmap_rounding",
            SPEC25,
            &[Need::Mmap, Need::InitShared],
            "create 16k mmap|init_shared\nmmap 1\nmwrite 0 4k 0x11\nmread 4095 1\n\
             mmap 4097\nmread 0 8k\nmmap 0xffffffffffffffff",
        ),
        s(
            "mmap_lengths",
            SPEC25,
            &[Need::Mmap],
            "create 16k mmap\nmmap 0\nmmap 1\nmmap 4097\nmmap 64k",
        ),
        s(
            "fault_overflow",
            GMT,
            &[Need::Mmap, Need::InitShared],
            "create 16k mmap|init_shared\nmmap 64k\nmwrite 0 64k 0xaa\nmread 0x4000 1\nmread 0x3fff 2\n\
             mread 0 16k\nmread 0x8000 4k",
        ),
        s(
            "fault_private",
            GMT,
            &[Need::Mmap],
            "create 16k mmap\nmmap\nmread 0 16k\nmwrite 0 16k 0xaa\nmread 0x2001 1\nmwrite 0x3fff 1\nattrs 0 16k",
        ),
        s(
            "fallocate",
            GMT,
            &[],
            "create 16k\nfalloc 0 16k\nfpunch 4095 4k\nfalloc 16k 4k\nfpunch 16k 4k\nfalloc 20k 4k\n\
             fpunch 20k 4k\nfpunch 4k 4095\nfpunch 4k 4k\nfalloc 4k 4k",
        ),
        Script {
            name: "invalid_punch_hole",
            source: GMT,
            needs: &[],
            text: format!("create 16k\n{punch}"),
        },
        s(
            "fallocate_corners",
            SPEC25,
            &[],
            "create 16k\nfalloc 0 0\nfpunch 0 0\nfalloc 12k 8k\nfpunch 12k 8k\nfpunch 1m 4k\n\
             falloc 0x7ffffffffffff000 4k\nfpunch 0x7ffffffffffff000 4k\nfalloc 0x8000000000000000 4k\n\
             fpunch 0x8000000000000000 4k\nfalloc 0 0x8000000000000000\nfpunch 0 0x8000000000000000\n\
             falloc 4k 0x7ffffffffffff000\nfpunch 4k 0x7ffffffffffff000\nfalloc 0xfffffffffffff000 4k\n\
             fpunch 0 0xfffffffffffff000\nfalloc 0 16k\nfpunch 0 16k",
        ),
        s(
            "punch_shared_pages",
            SPEC25,
            &[Need::Mmap, Need::InitShared],
            "create 32k mmap|init_shared\nmmap\nmwrite 0 32k 0x11\nfpunch 8k 8k\nmread 0 32k\n\
             falloc 0 32k\nmread 0 32k\nmwrite 12k 1 0x22\nfpunch 0 32k\nmread 0 32k",
        ),
        s(
            "pins",
            "docs/series.md §4.2 (elevated_refcount setup)",
            &[Need::Mmap, Need::InitShared],
            "create 16k mmap|init_shared\nmmap\npin 0 0\npin 0 20k\npin 16k 4k\npin 4k 4k\npin 0 16k\n\
             mwrite 4k 4k 0x33\nmread 0 16k\nfpunch 4k 4k\nmread 4k 4k\nunpin 4k 4k\nunpin 0 16k\n\
             create 16k\npin 0 4k\ncreate 16k mmap\npin 0 4k\npin 0 16k",
        ),
        s(
            "attrs",
            SPEC25,
            &[Need::Mmap],
            "create 16k\nattrs 0 16k\nattrs 4k 4k\nattrs 0 20k\nattrs 16k 0\n\
             create 16k mmap|init_shared\nattrs 0 16k\ncreate 16k mmap\nattrs 0 16k",
        ),
        // Conversions (§4.2), host-observable half: only where both backends convert.
        s(
            "init_private",
            GMCT,
            &[Need::Mmap, Need::Conversion],
            "create 4k mmap\nmmap\nmread 0 1\nmwrite 0 1 0x41\nconvert shared 0 4k\nmread 0 4k\n\
             mwrite 0 1 0x42\nconvert private 0 4k\nmread 0 1\nconvert shared 0 4k\nmread 0 2\nattrs 0 4k",
        ),
        s(
            "init_shared",
            GMCT,
            CONV,
            "create 4k mmap|init_shared\nmmap\nmwrite 0 1 0x41\nconvert private 0 4k\nmwrite 0 1\n\
             mread 0 1\nconvert shared 0 4k\nmread 0 2\nattrs 0 4k",
        ),
        s(
            "indexing",
            GMCT,
            CONV,
            "create 16k mmap|init_shared\nmmap\nmwrite 0 16k 0x5\nconvert private 8k 4k\nmread 0 16k\n\
             attrs 0 16k\nmwrite 0 16k 0x6\nmread 0 8k\nmread 12k 4k\nconvert shared 8k 4k\nmread 0 16k\n\
             convert private 0 4k\nconvert private 12k 4k\nmread 4k 8k\nattrs 0 16k",
        ),
        s(
            "unallocated_folios",
            GMCT,
            CONV,
            "create 32k mmap|init_shared\nmmap\nmwrite 4k 1 0x41\nmwrite 16k 1 0x41\nconvert private 0 32k\n\
             mread 0 32k\nattrs 0 32k\nconvert shared 16k 4k\nmread 16k 2\nconvert shared 0 32k\nmread 0 32k",
        ),
        s(
            "truncate",
            GMCT,
            CONV,
            "create 4k mmap|init_shared\nmmap\nmwrite 0 1 0x41\nfpunch 0 4k\nmread 0 1\nmwrite 0 1 0x41\n\
             convert private 0 4k\nfpunch 0 4k\nmread 0 1\nattrs 0 4k\nconvert shared 0 4k\nmread 0 4k",
        ),
        s(
            "elevated_refcount",
            GMCT,
            CONV,
            "create 16k mmap|init_shared\nmmap\nmwrite 0 16k 0x42\npin 8k 4k\nconvert private 0 16k\n\
             attrs 0 16k\nconvert private 8k 4k\nconvert private 0 4k\nconvert private 12k 4k\n\
             convert private 0 16k\nmread 8k 4k\nunpin 8k 4k\nconvert private 0 16k\nmread 0 16k\n\
             attrs 0 16k\nconvert shared 0 16k\nmread 0 16k",
        ),
        s(
            "early_return",
            SPEC23,
            CONV,
            "create 8k mmap|init_shared\nmmap\npin 0 4k\nconvert shared 0 8k\nconvert private 4k 4k\n\
             convert private 4k 4k\nconvert private 0 8k\nunpin 0 4k\nconvert private 0 8k\nattrs 0 8k",
        ),
        s(
            "set_attributes_invalid",
            SPEC23,
            CONV,
            "create 16k mmap|init_shared\nconvert private 0 0\nconvert private 1 4k\nconvert private 0 4097\n\
             convert private 16k 4k\nconvert private 4k 16k\nconvert private 4k 0xfffffffffffff000\n\
             convert shared 0 0\nconvert shared 20k 4k\nattrs 0 16k",
        ),
        s(
            "pin_private",
            "docs/series.md §2.5, §4.2",
            CONV,
            "create 16k mmap|init_shared\nmmap\nconvert private 4k 4k\npin 4k 4k\npin 0 8k\npin 0 4k\n\
             convert private 0 4k\nunpin 0 4k\nconvert private 0 4k\nattrs 0 16k",
        ),
        s(
            "mapping_after_conversion",
            "docs/series.md §2.5",
            CONV,
            "create 16k mmap|init_shared\nmmap\nmwrite 0 16k 0x3\nmunmap\nconvert private 4k 8k\nmmap\nmread 0 16k\nmwrite 0 4k 0x7\n\
             mread 0 4k\nmread 12k 4k\nmunmap\nconvert shared 8k 4k\nmmap\nmread 0 16k\nmread 8k 4k",
        ),
    ]
}

/// Runs `script` on `ctx` in a fresh session.
pub fn run_script(ctx: &Ctx, script: &Script) -> Vec<Line> {
    Session::new(Arc::clone(&ctx.backend), ctx.guest.clone()).run_script(&script.text)
}

/// The deviation that accepts this pair of lines, if any.
pub fn known(script: &str, emulated: &Line, kernel: &Line) -> Option<&'static Deviation> {
    KNOWN_DEVIATIONS.iter().find(|d| {
        (d.script == "*" || d.script == script)
            && d.command == emulated.command
            && emulated.command == kernel.command
            && d.emulated == emulated.outcome
            && d.kernel == kernel.outcome
    })
}

/// Compares the lines of one script on the emulated backend (`a`) and the kernel (`b`).
pub fn compare(script: &str, a: &[Line], b: &[Line]) -> Outcome {
    if let Some(l) = a.iter().chain(b).find(|l| l.usage_error) {
        return Outcome::Fail(format!("script error: {l}"));
    }
    if a.len() != b.len() {
        return Outcome::Fail(format!(
            "{} lines on one backend, {} on the other",
            a.len(),
            b.len()
        ));
    }
    let mut accepted = 0;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x == y {
            continue;
        }
        if known(script, x, y).is_some() {
            accepted += 1;
            continue;
        }
        return Outcome::Fail(format!(
            "line {}: emulated `{x}`, kernel `{y}` (not a known deviation)",
            i + 1
        ));
    }
    let _ = accepted;
    Outcome::Pass
}

/// Runs every selected script on both contexts and compares them. `a` is the emulated
/// backend, `b` the kernel.
pub fn run(a: &Ctx, b: &Ctx, filter: Option<&str>) -> BackendReport {
    run_observed(a, b, filter, &mut |_, _| {})
}

/// How many scripts `filter` selects (what [`run`] runs).
pub fn count_scripts(filter: Option<&str>) -> usize {
    scripts()
        .iter()
        .filter(|s| matches(&format!("diff/{}", s.name), filter))
        .count()
}

/// [`run`], calling `on_case("differential", report)` as each script's comparison ends.
pub fn run_observed(
    a: &Ctx,
    b: &Ctx,
    filter: Option<&str>,
    on_case: &mut dyn FnMut(&str, &CaseReport),
) -> BackendReport {
    let cases = scripts()
        .into_iter()
        .filter(|s| matches(&format!("diff/{}", s.name), filter))
        .map(|script| {
            let missing = script.needs.iter().find_map(|&n| {
                a.missing(n)
                    .or_else(|| b.missing(n))
                    .map(|why| format!("needs {n:?} on both backends: {why}"))
            });
            let outcome = match missing {
                Some(why) => Outcome::Skip(why),
                None => compare(
                    script.name,
                    &run_script(a, &script),
                    &run_script(b, &script),
                ),
            };
            let report = CaseReport {
                name: format!("diff/{}", script.name),
                outcome,
            };
            on_case("differential", &report);
            report
        })
        .collect();
    BackendReport {
        backend: "differential".to_string(),
        cases,
    }
}

/// The report when the second backend is unavailable: every selected script skips.
pub fn unavailable(reason: &str, filter: Option<&str>) -> BackendReport {
    BackendReport {
        backend: "differential".to_string(),
        cases: scripts()
            .into_iter()
            .map(|s| format!("diff/{}", s.name))
            .filter(|n| matches(n, filter))
            .map(|name| CaseReport {
                name,
                outcome: Outcome::Skip(reason.to_string()),
            })
            .collect(),
    }
}
