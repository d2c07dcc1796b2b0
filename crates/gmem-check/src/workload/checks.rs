//! The workload's checks: the content rules they assume ([`Rules`]: the platform's, the
//! two-backing model's, or a negative control's), and the host's side of a sync
//! ([`host_step`]), tallied per vCPU ([`Tally`]).

use gmem::file::BackendKind;
use gmem::platform::{ContentRule, Direction, PlatformKind};
use gmem::uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE;
use gmem_vmm::backing::{BackingKind, GuestBacking};
use gmem_vmm::guest::DATA_GPA;

use super::guest_script::HostStep;
use super::Config;

/// The content rules the checks assume.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rules {
    /// What the guest reads first after a conversion to private.
    pub(super) to_private: ContentRule,
    /// What the host reads first after a conversion to shared.
    pub(super) to_shared: ContentRule,
    /// What round trips with no access in between leave: in place, the platform's rules act
    /// when the page is next used (acceptance, the key it is read under), so such round trips
    /// preserve it; the two-backing model discards at each conversion.
    pub(super) untouched: ContentRule,
}

/// Per-vCPU host results.
#[derive(Debug, Default)]
pub(super) struct Tally {
    pub(super) host_verified: u64,
    pub(super) guest_verified: u64,
    pub(super) probes: u64,
    pub(super) content_checks: u64,
    pub(super) mismatches: Vec<String>,
    pub(super) exit_rt: Vec<u64>,
    pub(super) conv_rt: Vec<u64>,
    pub(super) conv: Vec<u64>,
}

/// The host's side of a sync, on the memory at offset `gpa - DATA_GPA`.
pub(super) fn host_step(file: &dyn GuestBacking, step: HostStep, t: &mut Tally) {
    match step {
        HostStep::Shared {
            gpa,
            len,
            expect,
            write,
        } => {
            let off = gpa - DATA_GPA;
            match file.attribute_runs(off, len) {
                Ok(runs) if runs.iter().all(|r| r.2 & KVM_MEMORY_ATTRIBUTE_PRIVATE == 0) => {}
                other => {
                    t.mismatches.push(format!(
                        "host: [{gpa:#x}, +{len:#x}) should be shared, attributes {other:?}"
                    ));
                    return;
                }
            }
            let mut buf = vec![0u8; len as usize];
            if let Err(e) = file.host_read(off, &mut buf) {
                t.mismatches
                    .push(format!("host: read of [{gpa:#x}, +{len:#x}) failed: {e}"));
                return;
            }
            t.host_verified += len;
            if let Some(i) = buf.iter().position(|&b| b != expect) {
                t.mismatches.push(format!(
                    "host: {:#x} holds {:#04x}, expected {expect:#04x}",
                    gpa + i as u64,
                    buf[i]
                ));
            }
            if let Some(w) = write {
                if let Err(e) = file.host_write(off, &vec![w; len as usize]) {
                    t.mismatches
                        .push(format!("host: write of [{gpa:#x}, +{len:#x}) failed: {e}"));
                }
            }
        }
        HostStep::Private { gpa } => {
            t.probes += 1;
            if let Err(e) = file.check_host_revoked(gpa - DATA_GPA) {
                t.mismatches
                    .push(format!("host: private page at {gpa:#x} {e}"));
            }
        }
        HostStep::GuestSees {
            gpa,
            len,
            before,
            rule,
        } => {
            // The guest path exists on the emulated backend and the two-backing model (the
            // kernel backend runs the software-protected rule, which the guest's own checks
            // cover).
            if file.kind() == BackingKind::InPlace(BackendKind::Kernel) {
                return;
            }
            let mut buf = vec![0u8; len as usize];
            if let Err(e) = file.guest_read(gpa - DATA_GPA, &mut buf) {
                t.mismatches
                    .push(format!("guest: read of [{gpa:#x}, +{len:#x}) failed: {e}"));
                return;
            }
            t.content_checks += 1;
            t.guest_verified += len;
            if let Err(e) = rule.check(&vec![before; len as usize], &buf) {
                t.mismatches.push(format!(
                    "guest: [{gpa:#x}, +{len:#x}) after to-private: {e}"
                ));
            }
        }
        HostStep::HostSees {
            gpa,
            len,
            before,
            rule,
        } => {
            let mut buf = vec![0u8; len as usize];
            if let Err(e) = file.host_read(gpa - DATA_GPA, &mut buf) {
                t.mismatches
                    .push(format!("host: read of [{gpa:#x}, +{len:#x}) failed: {e}"));
                return;
            }
            t.content_checks += 1;
            t.host_verified += len;
            if let Err(e) = rule.check(&vec![before; len as usize], &buf) {
                t.mismatches
                    .push(format!("host: [{gpa:#x}, +{len:#x}) after to-shared: {e}"));
            }
        }
    }
}

/// The content rules of a platform's in-place file.
pub(super) fn platform_rules(p: PlatformKind) -> Rules {
    Rules {
        to_private: p.content_rule(Direction::ToPrivate),
        to_shared: p.content_rule(Direction::ToShared),
        untouched: ContentRule::Preserved,
    }
}

/// The memory's own content rules: the platform's in place; the two-backing model's.
pub(super) fn own_rules(config: &Config) -> Rules {
    match config.memory {
        BackingKind::InPlace(_) => platform_rules(config.platform),
        BackingKind::TwoBacking { preserve_content } => {
            let r = if preserve_content {
                ContentRule::Preserved
            } else {
                ContentRule::Zeroed
            };
            Rules {
                to_private: r,
                to_shared: r,
                untouched: r,
            }
        }
    }
}

/// The content rules the checks assume: the negative control's platform if set, else the
/// memory's own.
pub(super) fn content_rules(config: &Config) -> Rules {
    config
        .expect_rules_of
        .map_or_else(|| own_rules(config), platform_rules)
}
