//! Platform models: what the confidential-computing platform under a guest_memfd does to its
//! pages, on one hook contract (docs/series.md §2.4–§2.9; seeds 001, 000, 003).
//!
//! The kernel's single `kvm_arch_gmem_invalidate` hook serves two callers (conversion to shared
//! and folio free) that pKVM needs to behave oppositely (seed 001). The [`Platform`] trait has
//! the distinct hooks of the split that the later revision takes (§2.9, "LATER"), each called
//! at one documented place by [`crate::emulated`]; [`HookPlacement`] says which kernel
//! mechanism drives each call (v8, the default: SNP's prepare/invalidate and TDX's KVM MMU; or
//! the split) and so what the hook log records, with the same content effects:
//!
//! | hook | called | on |
//! |---|---|---|
//! | [`Platform::make_private`] | guest fault (`get_pfn`), after zeroing, **private** pages only, every fault (idempotent) | §2.6 |
//! | [`Platform::make_shared`] | conversion to shared, after the point of no return, each present page of the range | §2.4 step 4b |
//! | [`Platform::reclaim`] | the page leaves the file: punch-hole, release (after the direct map is restored) | §2.5, §3.2 |
//! | [`Platform::post_populate`] | populate, after zeroing (and the copy, if any), private pages only | §2.7 |
//!
//! Each model keeps its own state (SNP's RMP table, TDX's Secure-EPT) and changes page contents
//! the way its hardware or firmware would, through a [`PageRef`]: a narrow handle on gmem's
//! internal "direct map" view of one page. Those changes are the platform's, not gmem's; gmem's
//! own writes (zeroing, populate copies) go through [`Platform::gmem_write`], which SNP and TDX
//! refuse (and count) for a guest-owned page.

mod measurement;
mod pkvm;
mod snp;
mod software_protected;
mod tdx;

pub use measurement::{LaunchMeasurement, PageType};
pub use pkvm::Pkvm;
pub use snp::{keystream, RmpState, Snp};
pub use software_protected::SoftwareProtected;
pub use tdx::Tdx;

use std::fmt;
use std::str::FromStr;

use crate::error::KernelResult;
use crate::mapping::ViewRef;
use crate::sys::PAGE_SIZE;

/// Bytes in a page, as a `usize`.
pub const PAGE: usize = PAGE_SIZE as usize;

/// The platforms gmem models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PlatformKind {
    /// `KVM_X86_SW_PROTECTED_VM`: no hooks, content preserved both ways.
    #[default]
    SoftwareProtected,
    /// AMD SEV-SNP: RMP table, destructive conversions, LAUNCH_UPDATE.
    Snp,
    /// Intel TDX: Secure-EPT, zeroing on removal, INIT_MEM_REGION.
    Tdx,
    /// arm64 pKVM: no conversion hooks, scrub on reclaim.
    Pkvm,
}

/// A `--platform` value that names no platform.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown platform {value:?}; allowed: sw, snp, tdx, pkvm")]
pub struct PlatformParseError {
    /// The value given.
    pub value: String,
}

impl FromStr for PlatformKind {
    type Err = PlatformParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sw" => Ok(PlatformKind::SoftwareProtected),
            "snp" => Ok(PlatformKind::Snp),
            "tdx" => Ok(PlatformKind::Tdx),
            "pkvm" => Ok(PlatformKind::Pkvm),
            _ => Err(PlatformParseError {
                value: s.to_string(),
            }),
        }
    }
}

impl fmt::Display for PlatformKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which way a conversion goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Shared → private: what the guest then reads of what the host wrote.
    ToPrivate,
    /// Private → shared: what the host then reads of what the guest wrote.
    ToShared,
}

/// What the other side reads after a conversion (docs/series.md §2.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentRule {
    /// The bytes written before the conversion.
    Preserved,
    /// Zeros.
    Zeroed,
    /// Neither the old plaintext nor zeros: data under another key.
    Scrambled,
}

impl ContentRule {
    /// The rule of this conversion followed by `next` (e.g. a private→shared→private cycle).
    pub fn then(self, next: ContentRule) -> ContentRule {
        match (self, next) {
            (r, ContentRule::Preserved) => r,
            (_, ContentRule::Zeroed) => ContentRule::Zeroed,
            (_, ContentRule::Scrambled) => ContentRule::Scrambled,
        }
    }

    /// Checks that `after` follows this rule from `before` (same length). Scrambled: not all
    /// zeros, and at most 1/16 of the bytes equal to `before` (one transition changes every
    /// byte; several change each byte with probability 255/256).
    pub fn check(self, before: &[u8], after: &[u8]) -> Result<(), ContentMismatch> {
        const ZEROS: [u8; PAGE] = [0; PAGE];
        let all_zero = |v: &[u8]| v.chunks(PAGE).all(|c| c == &ZEROS[..c.len()]);
        // Fast paths (slice equality is memcmp).
        match self {
            ContentRule::Preserved if after == before => return Ok(()),
            ContentRule::Zeroed if all_zero(after) => return Ok(()),
            _ => {}
        }
        let first_diff = |want: &dyn Fn(usize) -> u8| {
            after
                .iter()
                .enumerate()
                .find(|&(i, &b)| b != want(i))
                .map(|(i, &b)| (i, b, want(i)))
        };
        match self {
            ContentRule::Preserved => match first_diff(&|i| before[i]) {
                None => Ok(()),
                Some((offset, got, want)) => {
                    Err(ContentMismatch::NotPreserved { offset, got, want })
                }
            },
            ContentRule::Zeroed => match first_diff(&|_| 0) {
                None => Ok(()),
                Some((offset, got, _)) => Err(ContentMismatch::NotZeroed { offset, got }),
            },
            ContentRule::Scrambled => {
                if all_zero(after) {
                    return Err(ContentMismatch::ReadsAsZeros);
                }
                // Every 8th byte is enough to tell.
                let sampled = after.len().div_ceil(8);
                let same = after
                    .iter()
                    .step_by(8)
                    .zip(before.iter().step_by(8))
                    .filter(|(a, b)| a == b)
                    .count();
                if same * 16 > sampled {
                    return Err(ContentMismatch::NotScrambled { same, sampled });
                }
                Ok(())
            }
        }
    }
}

/// How the bytes read after a conversion break its [`ContentRule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ContentMismatch {
    /// [`ContentRule::Preserved`]: a byte changed.
    #[error("content should be preserved: byte {offset:#x} holds {got:#04x}, was {want:#04x}")]
    NotPreserved {
        /// Offset of the first changed byte.
        offset: usize,
        /// What it holds.
        got: u8,
        /// What it held before.
        want: u8,
    },
    /// [`ContentRule::Zeroed`]: a byte is not zero.
    #[error("content should be zeroed: byte {offset:#x} holds {got:#04x}")]
    NotZeroed {
        /// Offset of the first non-zero byte.
        offset: usize,
        /// What it holds.
        got: u8,
    },
    /// [`ContentRule::Scrambled`]: the bytes read as zeros.
    #[error("content should be scrambled, reads as zeros")]
    ReadsAsZeros,
    /// [`ContentRule::Scrambled`]: too many bytes kept the old plaintext.
    #[error(
        "content should be scrambled, {same} of {sampled} sampled bytes still hold the old \
         plaintext"
    )]
    NotScrambled {
        /// Sampled bytes equal to the old plaintext.
        same: usize,
        /// Bytes sampled.
        sampled: usize,
    },
}

/// Which hooks a platform implements (the others are never called; conversions of a platform
/// without `make_shared` do no per-page work).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookSet {
    /// [`Platform::make_private`].
    pub make_private: bool,
    /// [`Platform::make_shared`].
    pub make_shared: bool,
    /// [`Platform::reclaim`].
    pub reclaim: bool,
    /// [`Platform::post_populate`].
    pub post_populate: bool,
}

impl PlatformKind {
    /// Every platform.
    pub const ALL: [PlatformKind; 4] = [
        PlatformKind::SoftwareProtected,
        PlatformKind::Snp,
        PlatformKind::Tdx,
        PlatformKind::Pkvm,
    ];

    /// `sw`, `snp`, `tdx` or `pkvm` (what `--platform` takes).
    pub fn name(self) -> &'static str {
        match self {
            PlatformKind::SoftwareProtected => "sw",
            PlatformKind::Snp => "snp",
            PlatformKind::Tdx => "tdx",
            PlatformKind::Pkvm => "pkvm",
        }
    }

    /// The hooks this platform implements.
    pub fn hooks(self) -> HookSet {
        match self {
            PlatformKind::SoftwareProtected => HookSet {
                make_private: false,
                make_shared: false,
                reclaim: false,
                post_populate: false,
            },
            PlatformKind::Snp | PlatformKind::Tdx => HookSet {
                make_private: true,
                make_shared: true,
                reclaim: true,
                post_populate: true,
            },
            PlatformKind::Pkvm => HookSet {
                make_private: false,
                make_shared: false,
                reclaim: true,
                post_populate: false,
            },
        }
    }

    /// What the other side reads after a runtime conversion in `dir` (docs/series.md §2.8).
    pub fn content_rule(self, dir: Direction) -> ContentRule {
        match (self, dir) {
            (PlatformKind::SoftwareProtected | PlatformKind::Pkvm, _) => ContentRule::Preserved,
            (PlatformKind::Snp, _) => ContentRule::Scrambled,
            // Accepted pages read zero; removal from the Secure-EPT zeroes.
            (PlatformKind::Tdx, _) => ContentRule::Zeroed,
        }
    }

    /// Whether `GUEST_MEMFD_FLAG_NO_DIRECT_MAP` is offered (§3.1: not TDX, and not SNP in the
    /// later revision).
    pub fn supports_no_direct_map(self) -> bool {
        matches!(self, PlatformKind::SoftwareProtected | PlatformKind::Pkvm)
    }

    /// Whether populate has a launch ioctl on top (SNP_LAUNCH_UPDATE, TDX_INIT_MEM_REGION).
    pub fn has_launch_populate(self) -> bool {
        matches!(self, PlatformKind::Snp | PlatformKind::Tdx)
    }

    /// A fresh model of this platform for one VM; `vm_key` seeds SNP's per-VM key.
    pub fn model(self, vm_key: u64) -> Box<dyn Platform> {
        match self {
            PlatformKind::SoftwareProtected => Box::new(SoftwareProtected),
            PlatformKind::Snp => Box::new(Snp::new(vm_key)),
            PlatformKind::Tdx => Box::new(Tdx::default()),
            PlatformKind::Pkvm => Box::new(Pkvm::default()),
        }
    }
}

/// A handle on one page of gmem's internal direct-map view, given to a hook for the duration
/// of the call. It never refers to a page removed from the direct map (gmem checks the mark
/// before it builds one).
pub struct PageRef<'a> {
    index: u64,
    view: ViewRef<'a>,
    off: usize,
}

impl fmt::Debug for PageRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageRef")
            .field("index", &self.index)
            .finish()
    }
}

impl<'a> PageRef<'a> {
    /// Page `index`, at `off` in `view`: a page-sized, page-aligned range of the view that is
    /// mapped (not removed) while the handle lives.
    pub(crate) fn new(index: u64, view: ViewRef<'a>, off: usize) -> Self {
        PageRef { index, view, off }
    }

    /// The page's index in the file.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Copies the page out.
    pub fn read(&self) -> Vec<u8> {
        let mut buf = vec![0u8; PAGE];
        // Inside the view (constructor contract), so this cannot fail.
        let _ = self.view.read_volatile(self.off, &mut buf);
        buf
    }

    /// Overwrites the page with `data` (at most a page).
    pub fn write(&self, data: &[u8]) {
        let n = data.len().min(PAGE);
        // As in `read`; at most a page is written.
        let _ = self.view.write_volatile(self.off, &data[..n]);
    }

    /// Zeroes the page.
    pub fn zero(&self) {
        self.write(&[0u8; PAGE]);
    }

    /// XORs `stream` (a page) into the page.
    pub fn xor(&self, stream: &[u8]) {
        self.xor_words(stream.chunks_exact(8).map(|k| {
            let mut x = [0u8; 8];
            x.copy_from_slice(k);
            u64::from_le_bytes(x)
        }));
    }

    /// XORs the page's little-endian words with `words` (a page's worth; fewer leave the rest
    /// as it is). Allocates nothing (a conversion's make-shared hook calls it past the
    /// point of no return).
    pub fn xor_words(&self, words: impl Iterator<Item = u64>) {
        let mut buf = [0u8; PAGE];
        // Inside the view (constructor contract), so neither access can fail.
        let _ = self.view.read_volatile(self.off, &mut buf);
        for (b, k) in buf.chunks_exact_mut(8).zip(words) {
            let mut w = [0u8; 8];
            w.copy_from_slice(b);
            b.copy_from_slice(&(u64::from_le_bytes(w) ^ k).to_le_bytes());
        }
        let _ = self.view.write_volatile(self.off, &buf);
    }
}

/// Counters and state a model exposes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlatformReport {
    /// Pages the platform holds for the guest (SNP: guest-assigned in the RMP; TDX: in the
    /// Secure-EPT).
    pub guest_owned: u64,
    /// gmem writes to a guest-owned page that the model refused (must stay 0).
    pub violations: u64,
    /// make_private calls that changed state.
    pub assigned: u64,
    /// make_shared / reclaim calls that changed state.
    pub returned: u64,
    /// Pages scrubbed on reclaim (pKVM).
    pub scrubbed: u64,
}

/// One platform model: its hooks and state. See the module documentation for where each hook
/// is called.
pub trait Platform: Send + Sync + fmt::Debug {
    /// Which platform this is.
    fn kind(&self) -> PlatformKind;

    /// A guest fault on a private page (`kvm_arch_gmem_make_private`, formerly prepare).
    /// Called on every private fault, after zeroing: it must be idempotent.
    fn make_private(&self, _page: &PageRef<'_>) -> KernelResult<()> {
        Ok(())
    }

    /// A present page of a range converted to shared, after the point of no return
    /// (`kvm_arch_gmem_make_shared`). Cannot fail.
    fn make_shared(&self, _page: &PageRef<'_>) {}

    /// The page leaves the file: punch-hole or release (`kvm_arch_gmem_reclaim`). Cannot fail.
    fn reclaim(&self, _page: &PageRef<'_>) {}

    /// Populate of a private page, after zeroing and the copy of the source, if any. `copied`
    /// says whether a source was copied in (legacy flow) or the page is its own source
    /// (in-place flow).
    fn post_populate(&self, _page: &PageRef<'_>, _copied: bool) -> KernelResult<()> {
        Ok(())
    }

    /// gmem is about to write page `index` through the direct map (zeroing, a populate copy).
    /// `Err` (counted as a violation) if the platform owns the page for the guest.
    fn gmem_write(&self, _index: u64) -> KernelResult<()> {
        Ok(())
    }

    /// State and counters.
    fn report(&self) -> PlatformReport {
        PlatformReport::default()
    }
}

/// Where a platform's page-state changes come from (docs/series.md §2.9; seed 001). The models'
/// methods and their content effects are the same in both placements; what differs is which
/// kernel mechanism drives them at each call site, and so what the hook log records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HookPlacement {
    /// v7/v8 (the default): only SEV-SNP has guest_memfd arch hooks, `kvm_arch_gmem_prepare`
    /// on a private guest fault and one `kvm_arch_gmem_invalidate` called both on conversion
    /// to shared and when a folio is freed ([`HookCall::Prepare`], [`HookCall::Invalidate`]).
    /// TDX has none: its Secure-EPT add comes from the KVM MMU's private fault
    /// ([`HookCall::MmuMapPrivate`]) and its removal from the MMU invalidation with the
    /// private filter, on conversion to shared, punch-hole and release
    /// ([`HookCall::MmuZapPrivate`], private pages only on punch-hole and release). pKVM is
    /// not in v8; its model keeps the split's reclaim.
    #[default]
    V8,
    /// The later split (seed 001's outcome, §2.9 "LATER"): `make_private`, `make_shared` and
    /// `reclaim` as distinct guest_memfd hooks, for SNP and TDX alike.
    Split,
}

/// A call site of the emulated file where the platform's page state may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookSite {
    /// A guest fault (`kvm_gmem_get_pfn`) of a private page.
    Fault,
    /// A present page of a range converted to shared, after the point of no return.
    ToShared,
    /// The page leaves the file: punch-hole or release.
    Free,
}

impl HookPlacement {
    /// `v8` or `split`.
    pub fn name(self) -> &'static str {
        match self {
            HookPlacement::V8 => "v8",
            HookPlacement::Split => "split",
        }
    }

    /// What the hook log records for `platform`'s call at `site` on page `index`.
    pub fn call(self, platform: PlatformKind, site: HookSite, index: u64) -> HookCall {
        use HookSite::*;
        match (self, platform, site) {
            (HookPlacement::V8, PlatformKind::Snp, Fault) => HookCall::Prepare(index),
            (HookPlacement::V8, PlatformKind::Snp, ToShared | Free) => HookCall::Invalidate(index),
            (HookPlacement::V8, PlatformKind::Tdx, Fault) => HookCall::MmuMapPrivate(index),
            (HookPlacement::V8, PlatformKind::Tdx, ToShared | Free) => {
                HookCall::MmuZapPrivate(index)
            }
            (_, _, Fault) => HookCall::MakePrivate(index),
            (_, _, ToShared) => HookCall::MakeShared(index),
            (_, _, Free) => HookCall::Reclaim(index),
        }
    }

    /// Whether the page-state change on conversion to shared and on free visits only pages
    /// that are (were, before the conversion) private: v8 TDX, where it is the MMU
    /// invalidation with the private filter (a shared page has no S-EPT entry).
    pub fn private_filter(self, platform: PlatformKind) -> bool {
        self == HookPlacement::V8 && platform == PlatformKind::Tdx
    }
}

/// A hook call, as recorded by [`crate::EmulatedGuestMemfd::record_hooks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookCall {
    /// gmem zeroed a page that was not up to date.
    Zero(u64),
    /// [`Platform::make_private`].
    MakePrivate(u64),
    /// [`Platform::make_shared`].
    MakeShared(u64),
    /// [`Platform::reclaim`].
    Reclaim(u64),
    /// [`Platform::post_populate`].
    PostPopulate(u64),
    /// v8 SNP: `kvm_arch_gmem_prepare` ([`Platform::make_private`]).
    Prepare(u64),
    /// v8 SNP: `kvm_arch_gmem_invalidate`, from conversion to shared ([`Platform::make_shared`])
    /// or folio free ([`Platform::reclaim`]): one hook, two callers.
    Invalidate(u64),
    /// v8 TDX: the KVM MMU maps a private page on a guest fault (S-EPT add,
    /// [`Platform::make_private`]).
    MmuMapPrivate(u64),
    /// v8 TDX: the KVM MMU invalidation with the private filter zaps the page (S-EPT remove,
    /// [`Platform::make_shared`] on conversion, [`Platform::reclaim`] on punch-hole/release).
    MmuZapPrivate(u64),
    /// The page was removed from the direct map (NO_DIRECT_MAP).
    DirectMapRemove(u64),
    /// The page was restored to the direct map.
    DirectMapRestore(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        for k in PlatformKind::ALL {
            assert_eq!(k.name().parse::<PlatformKind>(), Ok(k));
        }
        let e = "sev".parse::<PlatformKind>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown platform \"sev\"; allowed: sw, snp, tdx, pkvm"
        );
    }

    #[test]
    fn rules() {
        let before = vec![0x11u8; 64];
        assert!(ContentRule::Preserved.check(&before, &before).is_ok());
        assert!(ContentRule::Zeroed.check(&before, &[0; 64]).is_ok());
        assert_eq!(
            ContentRule::Zeroed.check(&before, &before),
            Err(ContentMismatch::NotZeroed {
                offset: 0,
                got: 0x11
            })
        );
        assert_eq!(
            ContentMismatch::NotScrambled {
                same: 8,
                sampled: 8
            }
            .to_string(),
            "content should be scrambled, 8 of 8 sampled bytes still hold the old plaintext"
        );
        assert!(ContentRule::Scrambled.check(&before, &before).is_err());
        assert!(ContentRule::Scrambled.check(&before, &[0; 64]).is_err());
        let s: Vec<u8> = before
            .iter()
            .zip(keystream(9, 9, 1))
            .map(|(a, b)| a ^ b)
            .collect();
        assert!(ContentRule::Scrambled.check(&before, &s).is_ok());
        assert_eq!(
            ContentRule::Scrambled.then(ContentRule::Zeroed),
            ContentRule::Zeroed
        );
        assert_eq!(
            ContentRule::Zeroed.then(ContentRule::Preserved),
            ContentRule::Zeroed
        );
    }
}
