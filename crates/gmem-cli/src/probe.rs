//! `gmem probe`: what this host offers guest_memfd, and which backend provides each feature.
//!
//! `--json` prints one object with the keys `version`, `kernel_release`, `kvm`,
//! `kvm_access`, `userfaultfd`, `shmem_thp`, `huge_folios`, `hugetlb`, `nr_hugepages`, `max_map_count` and
//! `features`;
//! see [`to_json`] and docs/json.md. `GMEM_KVM_DEV` probes another device path than
//! `/dev/kvm`.

use std::process::ExitCode;

use gmem_check::host_report::{Availability, HostReport};
use serde_json::{json, Value};

use crate::kvm_access::{self, KvmProblem};

/// Arguments of `gmem probe`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let dev = kvm_access::kvm_device();
    let report = gmem_check::host_report::collect_with_kvm_device(&dev);
    let access = kvm_access::check(&dev);
    if args.json {
        let mut v = to_json(&report);
        v["version"] = json!(crate::JSON_VERSION);
        v["kvm_access"] = access_json(&dev, &access);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_text(&report, &dev, &access);
    }
    Ok(ExitCode::SUCCESS)
}

/// `{"device", "usable", "problem", "message"}`: whether this user can use KVM for
/// guest_memfd, and if not why (`missing`, `no_permission`, `security_module`, `other`).
fn access_json(dev: &std::path::Path, access: &Result<(), KvmProblem>) -> Value {
    json!({
        "device": dev.display().to_string(),
        "usable": access.is_ok(),
        "problem": access.as_ref().err().map(KvmProblem::kind),
        "message": access.as_ref().err().map(ToString::to_string),
    })
}

fn availability(a: &Availability) -> Value {
    json!({ "available": a.available, "detail": a.detail })
}

/// The report as JSON:
///
/// - `kvm`: `dev_kvm`, `error`, `flavour` (`VMX`/`SVM`/`PVM`/`unknown`/null), `modules`,
///   `cpu_flags`, `api_version`, `vm_types` (`mask`, `names`), `vm_type_checks` (per type:
///   `vm_type`, `name`, `advertised`, `create_error`), `capability_scope` (`vm`/`system`),
///   `capabilities` (array of `number`, `name`, `value`, `decoded`), `conversion` (per series
///   revision: `revision`, `capability`, `value`, `private`), `conversion_support` (null when
///   supported, else the reason), `guest_memfd_create_error`;
/// - `userfaultfd`: `available`, `error`, `features`, `feature_names`, `dev_userfaultfd`,
///   `unprivileged_userfaultfd`;
/// - `features`: array of `feature`, `description`, `emulated` and `kernel` (each `available`,
///   `detail`).
pub fn to_json(r: &HostReport) -> Value {
    let k = &r.kvm;
    let u = &r.userfaultfd;
    json!({
        "kernel_release": r.kernel_release,
        "kvm": {
            "dev_kvm": k.dev_kvm,
            "error": k.error.as_ref().map(ToString::to_string),
            "flavour": k.flavour.map(|f| f.name()),
            "modules": k.modules,
            "cpu_flags": k.cpu_flags,
            "api_version": k.api_version,
            "vm_types": k.vm_types.map(|mask| json!({
                "mask": mask,
                "names": gmem_check::host_report::VM_TYPE_NAMES
                    .iter()
                    .filter(|(t, _)| mask & (1u64 << t) != 0)
                    .map(|(_, n)| *n)
                    .collect::<Vec<_>>(),
            })),
            "vm_type_checks": k.vm_type_checks.iter().map(|c| json!({
                "vm_type": c.vm_type,
                "name": c.name,
                "advertised": c.advertised,
                "create_error": c.create_error.map(|e| e.name()),
            })).collect::<Vec<_>>(),
            "capability_scope": k.capability_scope,
            "capabilities": k.capabilities.iter().map(|c| json!({
                "number": c.number,
                "name": c.name,
                "value": c.value,
                "decoded": c.decoded,
            })).collect::<Vec<_>>(),
            "conversion": k.conversion.iter().map(|c| json!({
                "revision": c.revision.name(),
                "capability": c.number,
                "value": c.value,
                "private": c.private,
            })).collect::<Vec<_>>(),
            "conversion_support": k.conversion_support.as_ref().err().map(ToString::to_string),
            "guest_memfd_create_error": k.guest_memfd_create_error,
        },
        "userfaultfd": {
            "available": u.available,
            "error": u.error,
            "features": u.features,
            "feature_names": u.feature_names,
            "dev_userfaultfd": u.dev_userfaultfd,
            "unprivileged_userfaultfd": u.unprivileged_userfaultfd,
        },
        "shmem_thp": r.shmem_thp,
        "huge_folios": match gmem::host::huge_folios() {
            Ok(setting) => json!({"available": true, "setting": setting}),
            Err(why) => json!({"available": false, "error": why.to_string()}),
        },
        "hugetlb": {
            "offered": false,
            "reason": gmem::host::HUGETLB_NOT_OFFERED,
            "reserved_2m": gmem::host::hugetlb_pages().reserved,
            "free_2m": gmem::host::hugetlb_pages().free,
        },
        "nr_hugepages": r.nr_hugepages,
        "max_map_count": r.max_map_count,
        "features": r.features.iter().map(|f| json!({
            "feature": f.feature,
            "description": f.description,
            "emulated": availability(&f.emulated),
            "kernel": availability(&f.kernel),
        })).collect::<Vec<_>>(),
    })
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "unreadable".to_string(), |v| v.to_string())
}

fn print_text(r: &HostReport, dev: &std::path::Path, access: &Result<(), KvmProblem>) {
    let k = &r.kvm;
    println!("kernel            {}", opt(r.kernel_release.as_deref()));
    println!(
        "{:<17} {}",
        dev.display(),
        if k.dev_kvm { "present" } else { "missing" }
    );
    if let Err(why) = access {
        println!("kvm access        {why}");
    }
    if let Some(f) = k.flavour {
        println!(
            "flavour           {} (modules: {}; cpu flags: {})",
            f.name(),
            join_or_none(&k.modules),
            join_or_none(&k.cpu_flags)
        );
    }
    if let Some(e) = &k.error {
        println!("kvm error         {e}");
    }
    if let Some(v) = k.api_version {
        println!("api version       {v}");
    }
    for c in &k.vm_type_checks {
        println!(
            "vm type {}         {:<24} advertised {:<5} KVM_CREATE_VM {}",
            c.vm_type,
            c.name,
            c.advertised,
            c.create_error.map_or("ok".to_string(), |e| e.name())
        );
    }
    if !k.capabilities.is_empty() {
        println!("\ncapabilities (checked on the {}):", k.capability_scope);
        for c in &k.capabilities {
            println!(
                "  {:>3} {:<28} {:>6}  {}",
                c.number,
                c.name,
                c.value,
                c.decoded.as_deref().unwrap_or("")
            );
        }
        for c in &k.conversion {
            println!(
                "  {:>3} {:<28} {:>6}  series {}{}",
                c.number,
                "GUEST_MEMFD_MEMORY_ATTRIBUTES",
                c.value,
                c.revision.name(),
                if c.private { ", PRIVATE" } else { "" }
            );
        }
    }
    match &k.conversion_support {
        Ok(()) => println!("kernel conversion supported"),
        Err(why) => println!("kernel conversion: {why}"),
    }
    let u = &r.userfaultfd;
    println!();
    if u.available {
        println!(
            "userfaultfd       available, features {:#x}: {}",
            u.features,
            u.feature_names.join(" ")
        );
    } else {
        println!(
            "userfaultfd       unavailable: {}",
            u.error.as_deref().unwrap_or("?")
        );
    }
    println!(
        "/dev/userfaultfd  {}; vm.unprivileged_userfaultfd = {}",
        if u.dev_userfaultfd {
            "present"
        } else {
            "missing"
        },
        opt(u.unprivileged_userfaultfd)
    );
    println!("shmem THP         {}", opt(r.shmem_thp.as_deref()));
    match gmem::host::huge_folios() {
        Ok(setting) => println!(
            "huge folios       available ({setting}): EmulatedOptions::folio_size = Huge, --folio-size 2m"
        ),
        Err(why) => println!("huge folios       unavailable: {why}"),
    }
    let pool = gmem::host::hugetlb_pages();
    println!(
        "hugetlb folios    not offered (host: {} of 2048 kB reserved, {} free): {}",
        opt(pool.reserved),
        opt(pool.free),
        gmem::host::HUGETLB_NOT_OFFERED
    );
    // The filter the first emulated file installs: one is made (and dropped) to see it.
    let _ = gmem::EmulatedGuestMemfd::create(
        gmem::PAGE_SIZE,
        gmem::uapi::GUEST_MEMFD_FLAG_MMAP | gmem::uapi::GUEST_MEMFD_FLAG_INIT_SHARED,
    );
    match gmem::os::remap_file_pages_refused() {
        Some(gmem::os::RemapFilePages::Refused) => println!(
            "seccomp filter    in place: remap_file_pages and shmat(SHM_REMAP) answer EPERM in every thread"
        ),
        Some(gmem::os::RemapFilePages::RefusedFromThisThread { tid }) => println!(
            "seccomp filter    in place from the first file's thread on (thread {tid} had a filter of its own)"
        ),
        Some(gmem::os::RemapFilePages::NotRefused(e)) => println!(
            "seccomp filter    NOT in place ({e}): remap_file_pages could map a private page unguarded"
        ),
        None => println!(
            "seccomp filter    not installed in this process yet (it is with the first emulated file)"
        ),
    }
    println!("nr_hugepages      {}", opt(r.nr_hugepages));
    println!("max_map_count     {}", opt(r.max_map_count));
    println!("\nfeature             emulated  kernel");
    for f in &r.features {
        println!(
            "{:<19} {:<9} {}",
            f.feature,
            yes_no(&f.emulated),
            yes_no(&f.kernel)
        );
    }
    println!("\nwhy:");
    for f in &r.features {
        println!("  {} ({})", f.feature, f.description);
        println!("    emulated: {}", f.emulated.detail);
        println!("    kernel:   {}", f.kernel.detail);
    }
}

fn yes_no(a: &Availability) -> &'static str {
    if a.available {
        "yes"
    } else {
        "no"
    }
}

fn join_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}
