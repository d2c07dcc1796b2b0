//! The host-driven engine (no /dev/kvm): the same guest scripts, the guest's reads and writes
//! made through the memory's guest view and its conversions called by the host.

use std::sync::Arc;
use std::time::Instant;

use gmem::error::Errno;
use gmem::os::PAGE_SIZE;
use gmem::uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE;
use gmem_vmm::backing::GuestBacking;
use gmem_vmm::guest::DATA_GPA;
use gmem_vmm::stats::median_ns_as_us;
use gmem_vmm::ConvertRequest;

use super::checks::{content_rules, host_step, Tally};
use super::guest_script::{script, Op};
use super::report::{ConversionRequests, HypercallCheck, Mode, PlatformLabel, Report};
use super::{Config, WorkloadError, WINDOW_STRIDE};

/// No /dev/kvm: the same operations, with the guest's accesses through the guest view and
/// conversions called by the host.
pub(super) fn run_host_driven(
    config: &Config,
    file: &Arc<dyn GuestBacking>,
    why: String,
) -> Result<Report, WorkloadError> {
    let rules = content_rules(config);
    let mut t = Tally::default();
    let (mut to_private, mut to_shared, mut pages, mut punches) = (0u64, 0u64, 0u64, 0u64);
    let kerr = |op: &'static str| move |errno: Errno| WorkloadError::Kernel { op, errno };
    for i in 0..config.vcpus {
        let sc = script(DATA_GPA + WINDOW_STRIDE * i as u64, config.samples, rules);
        for op in &sc.ops {
            match *op {
                Op::Fill(g, l, b) => file
                    .guest_write(g - DATA_GPA, &vec![b; l as usize])
                    .map_err(kerr("guest write"))?,
                Op::Verify(g, l, b) => {
                    let mut buf = vec![0u8; l as usize];
                    file.guest_read(g - DATA_GPA, &mut buf)
                        .map_err(kerr("guest read"))?;
                    t.guest_verified += l;
                    if let Some(k) = buf.iter().position(|&x| x != b) {
                        t.mismatches.push(format!(
                            "guest: {:#x} holds {:#04x}, expected {b:#04x}",
                            g + k as u64,
                            buf[k]
                        ));
                    }
                }
                Op::Convert {
                    gpa,
                    len,
                    private,
                    fallocate,
                } => {
                    let req = ConvertRequest {
                        gpa: gmem_vmm::Gpa(gpa),
                        size: len,
                        to_private: private,
                    };
                    let off = req.gpa.raw() - DATA_GPA;
                    let mut a = gmem::uapi::kvm_memory_attributes2::new(
                        off,
                        len,
                        if private {
                            KVM_MEMORY_ATTRIBUTE_PRIVATE
                        } else {
                            0
                        },
                    );
                    file.set_attributes(&mut a)
                        .map_err(kerr("KVM_SET_MEMORY_ATTRIBUTES2"))?;
                    if fallocate {
                        if private {
                            file.allocate(off, len).map_err(kerr("fallocate"))?;
                        } else {
                            file.punch_hole(off, len).map_err(kerr("punch hole"))?;
                        }
                    }
                    if private {
                        to_private += 1;
                    } else {
                        to_shared += 1;
                    }
                    pages += len / PAGE_SIZE;
                }
                Op::Punch(g, l) => {
                    file.punch_hole(g - DATA_GPA, l)
                        .map_err(kerr("punch hole"))?;
                    punches += 1;
                }
                Op::Sync(id) => host_step(file.as_ref(), sc.steps[id as usize], &mut t),
                Op::NopLoop(_) => {}
                Op::ConversionLoop(g, n) => {
                    for k in 0..n {
                        let attrs = if k % 2 == 0 {
                            KVM_MEMORY_ATTRIBUTE_PRIVATE
                        } else {
                            0
                        };
                        let mut a =
                            gmem::uapi::kvm_memory_attributes2::new(g - DATA_GPA, PAGE_SIZE, attrs);
                        let start = Instant::now();
                        file.set_attributes(&mut a)
                            .map_err(kerr("KVM_SET_MEMORY_ATTRIBUTES2"))?;
                        t.conv
                            .push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
                        if k % 2 == 0 {
                            to_private += 1;
                        } else {
                            to_shared += 1;
                        }
                        pages += 1;
                    }
                }
            }
        }
    }
    let conv = median_ns_as_us(&t.conv);
    Ok(Report {
        memory: config.memory,
        platform: PlatformLabel::of(config),
        content_checks: t.content_checks,
        mode: Mode::HostDriven,
        request_path: ConversionRequests::Host { why },
        hypercall_check: HypercallCheck::NoKvm,
        vcpus: config.vcpus,
        mem_mib: config.mem_mib,
        memslots: config.memslots,
        exits: 0,
        conversions_to_private: to_private,
        conversions_to_shared: to_shared,
        pages_converted: pages,
        punches,
        host_verified_bytes: t.host_verified,
        guest_verified_bytes: t.guest_verified,
        private_probes: t.probes,
        mismatches: t.mismatches.len() as u64,
        mismatch_details: t.mismatches.into_iter().take(20).collect(),
        exit_round_trip_us: None,
        conversion_round_trip_us: conv,
        conversion_4k_us: conv,
        ratio: None,
        samples: t.conv.len(),
        elapsed_us: 0.0,
    })
}

#[cfg(test)]
mod platform_tests {
    use std::sync::Arc;

    use gmem::emulated::EmulatedGuestMemfd;
    use gmem::platform::PlatformKind;
    use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
    use gmem_vmm::backing::{in_place, BackingKind, GuestBacking};
    use gmem_vmm::two_backing::{TwoBacking, TwoBackingOptions};

    use super::super::{Config, Report};
    use super::*;

    fn host_driven(platform: PlatformKind, expect: Option<PlatformKind>) -> Report {
        let config = Config {
            vcpus: 1,
            mem_mib: 4,
            samples: 4,
            platform,
            expect_rules_of: expect,
            ..Config::default()
        };
        let file = EmulatedGuestMemfd::create_with(
            4 << 20,
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            gmem::emulated::EmulatedOptions::with_platform(platform),
        )
        .unwrap();
        run_host_driven(&config, &in_place(Arc::new(file)).unwrap(), "test".into()).unwrap()
    }

    /// Host-driven mode (no /dev/kvm): the checks follow the platform, and fail on another
    /// platform's rules.
    #[test]
    fn host_driven_checks_follow_the_platform() {
        // tests/platforms.rs runs all four through `run` (real vCPUs where /dev/kvm works);
        // here the host-driven path, on the platform with the most hooks, and a negative
        // control.
        let r = host_driven(PlatformKind::Snp, None);
        assert_eq!(r.mismatches, 0, "{:?}", r.mismatch_details);
        assert!(r.content_checks >= 20, "{}", r.content_checks);
        let r = host_driven(PlatformKind::Snp, Some(PlatformKind::SoftwareProtected));
        assert!(r.mismatches > 0, "SNP checked with SW rules passed");
    }

    /// Host-driven mode on the two-backing model: its own rule passes, the other fails.
    #[test]
    fn host_driven_two_backing_follows_its_rule() {
        for preserve_content in [false, true] {
            let config = Config {
                vcpus: 1,
                mem_mib: 4,
                samples: 4,
                memory: BackingKind::TwoBacking { preserve_content },
                ..Config::default()
            };
            let file = || -> Arc<dyn GuestBacking> {
                Arc::new(
                    TwoBacking::new(4 << 20, false, TwoBackingOptions { preserve_content })
                        .unwrap(),
                )
            };
            let r = run_host_driven(&config, &file(), "test".into()).unwrap();
            assert_eq!(
                r.mismatches, 0,
                "{preserve_content}: {:?}",
                r.mismatch_details
            );
            assert!(r.private_probes > 0 && r.content_checks >= 20);
            let other = Config {
                expect_rules_of: Some(if preserve_content {
                    PlatformKind::Tdx
                } else {
                    PlatformKind::SoftwareProtected
                }),
                ..config
            };
            let r = run_host_driven(&other, &file(), "test".into()).unwrap();
            assert!(
                r.mismatches > 0,
                "{preserve_content}: the other rule passed"
            );
        }
    }
}
