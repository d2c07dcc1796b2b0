//! The vCPU engine: each vCPU runs its window's guest script as guest code, the host answering
//! its syncs; the MAP_GPA_RANGE hypercall check that precedes it.

use std::sync::Arc;
use std::time::Instant;

use gmem_vmm::backing::GuestBacking;
use gmem_vmm::guest::DATA_GPA;
use gmem_vmm::stats::median_ns_as_us;
use gmem_vmm::{Event, RequestPath, Vm};

use super::checks::{content_rules, host_step, Tally};
use super::guest_script::{compile, guest_verified, script};
use super::report::{ConversionRequests, HypercallCheck, Mode, PlatformLabel, Report};
use super::{Config, WorkloadError, WINDOW_STRIDE};

/// Whether the MAP_GPA_RANGE hypercall reaches userspace (if `config` asks to check), and the
/// µs the check took.
pub(super) fn hypercall_check(config: &Config) -> (HypercallCheck, f64) {
    if !config.check_hypercall {
        return (HypercallCheck::NotRun, 0.0);
    }
    let start = Instant::now();
    let check = match Vm::check_hypercall_exit(std::time::Duration::from_millis(300)) {
        Ok(()) => HypercallCheck::Reaches,
        Err(why) => HypercallCheck::DoesNotReach(why.to_string()),
    };
    (check, start.elapsed().as_secs_f64() * 1e6)
}

/// Runs the workload on real vCPUs of `vm`, on `file` bound in `config.memslots` memslots.
pub(super) fn run_kvm(
    config: &Config,
    vm: &Vm,
    file: Arc<dyn GuestBacking>,
    (hypercall, check_us): (HypercallCheck, f64),
) -> Result<Report, WorkloadError> {
    let size = config.mem_mib << 20;
    let piece = size / config.memslots;
    for i in 0..config.memslots {
        vm.bind(gmem_vmm::Gpa(DATA_GPA + i * piece), &file, i * piece, piece)?;
    }
    let rules = content_rules(config);
    let mut vcpus = Vec::new();
    let mut scripts = Vec::new();
    for i in 0..config.vcpus {
        let sc = script(DATA_GPA + WINDOW_STRIDE * i as u64, config.samples, rules);
        vcpus.push(vm.create_vcpu(i, compile(i, &sc.ops)?)?);
        scripts.push(sc);
    }
    let scripts = Arc::new(scripts);
    let results = vm.run_vcpus(vcpus, config.timeout, |vm, mut vcpu| {
        let sc = &scripts[vcpu.index()];
        let mut t = Tally {
            guest_verified: guest_verified(&sc.ops),
            ..Tally::default()
        };
        loop {
            match vcpu.run(vm)? {
                Event::Sync(id) => match sc.steps.get(id as usize) {
                    Some(step) => host_step(file.as_ref(), *step, &mut t),
                    None => t
                        .mismatches
                        .push(format!("guest synced with unknown id {id}")),
                },
                Event::Fail { id, rdi } => {
                    let what = vcpu.checks().get(id as usize).cloned().unwrap_or_default();
                    t.mismatches.push(format!(
                        "vCPU {}: {what} failed (rdi {rdi:#x})",
                        vcpu.index()
                    ));
                }
                Event::Done => break,
            }
        }
        let tm = vcpu.timings();
        t.exit_rt = tm.exit_rt_ns.clone();
        t.conv_rt = tm.conversion_rt_ns.clone();
        t.conv = tm.conversion_ns.clone();
        Ok(t)
    });
    let mut all = Tally::default();
    for r in results {
        let t = r?;
        all.host_verified += t.host_verified;
        all.guest_verified += t.guest_verified;
        all.probes += t.probes;
        all.content_checks += t.content_checks;
        all.mismatches.extend(t.mismatches);
        all.exit_rt.extend(t.exit_rt);
        all.conv_rt.extend(t.conv_rt);
        all.conv.extend(t.conv);
    }
    let stats = vm.stats();
    let exit_rt = median_ns_as_us(&all.exit_rt);
    let conv_rt = median_ns_as_us(&all.conv_rt);
    let conv = median_ns_as_us(&all.conv);
    Ok(Report {
        memory: config.memory,
        platform: PlatformLabel::of(config),
        content_checks: all.content_checks,
        mode: Mode::Kvm,
        request_path: ConversionRequests::Guest {
            path: RequestPath::Port,
            hypercall_reaches_userspace: hypercall.reaches_userspace(),
        },
        hypercall_check: hypercall,
        vcpus: config.vcpus,
        mem_mib: config.mem_mib,
        memslots: config.memslots,
        exits: stats.exits,
        conversions_to_private: stats.conversions_to_private,
        conversions_to_shared: stats.conversions_to_shared,
        pages_converted: stats.pages_converted,
        punches: stats.punches,
        host_verified_bytes: all.host_verified,
        guest_verified_bytes: all.guest_verified,
        private_probes: all.probes,
        mismatches: all.mismatches.len() as u64,
        mismatch_details: all.mismatches.into_iter().take(20).collect(),
        exit_round_trip_us: Some(exit_rt),
        conversion_round_trip_us: conv_rt,
        conversion_4k_us: conv,
        ratio: Some(conv_rt / (exit_rt + conv)),
        samples: all.conv_rt.len().min(all.exit_rt.len()),
        // The hypercall check's time, which `run` takes off the wall time.
        elapsed_us: check_us,
    })
}
