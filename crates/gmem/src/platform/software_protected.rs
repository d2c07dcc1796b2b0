//! `KVM_X86_SW_PROTECTED_VM`: the platform without hooks.

use super::{Platform, PlatformKind};

/// `KVM_X86_SW_PROTECTED_VM`: no hooks.
#[derive(Debug, Default)]
pub struct SoftwareProtected;

impl Platform for SoftwareProtected {
    fn kind(&self) -> PlatformKind {
        PlatformKind::SoftwareProtected
    }
}
