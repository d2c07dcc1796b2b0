//! Platform models: what the confidential-computing platform under a guest_memfd does to its
//! pages, on one hook contract (kernel-spec §2.4–§2.9; seeds 001, 000, 003).
//!
//! The kernel's single `kvm_arch_gmem_invalidate` hook serves two callers (conversion to shared
//! and folio free) that pKVM needs to behave oppositely (seed 001). gmem follows the split that
//! the later revision of the series takes (§2.9, "LATER"): distinct hooks, each called at one
//! documented place by [`crate::emulated`]:
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

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha384};

use crate::error::{Errno, KernelResult};
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

/// What the other side reads after a conversion (kernel-spec §2.8).
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
    pub fn check(self, before: &[u8], after: &[u8]) -> Result<(), String> {
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
                Some((i, got, want)) => Err(format!(
                    "content should be preserved: byte {i:#x} holds {got:#04x}, was {want:#04x}"
                )),
            },
            ContentRule::Zeroed => match first_diff(&|_| 0) {
                None => Ok(()),
                Some((i, got, _)) => Err(format!(
                    "content should be zeroed: byte {i:#x} holds {got:#04x}"
                )),
            },
            ContentRule::Scrambled => {
                if all_zero(after) {
                    return Err("content should be scrambled, reads as zeros".into());
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
                    return Err(format!(
                        "content should be scrambled, {same} of {sampled} sampled bytes still \
                         hold the old plaintext"
                    ));
                }
                Ok(())
            }
        }
    }
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

    /// What the other side reads after a runtime conversion in `dir` (kernel-spec §2.8).
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
    ptr: *mut u8,
    _view: PhantomData<&'a ()>,
}

impl fmt::Debug for PageRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageRef")
            .field("index", &self.index)
            .finish()
    }
}

impl PageRef<'_> {
    /// # Safety
    /// `ptr` must point to a page-sized, page-aligned range of a live shared mapping that is
    /// mapped (not removed) for the lifetime `'a`.
    pub(crate) unsafe fn new(index: u64, ptr: *mut u8) -> Self {
        PageRef {
            index,
            ptr,
            _view: PhantomData,
        }
    }

    /// The page's index in the file.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Copies the page out.
    pub fn read(&self) -> Vec<u8> {
        let mut buf = vec![0u8; PAGE];
        // SAFETY: `ptr` is a mapped page for our lifetime (constructor contract).
        unsafe { crate::mapping::volatile_copy(self.ptr, buf.as_mut_ptr(), PAGE) };
        buf
    }

    /// Overwrites the page with `data` (at most a page).
    pub fn write(&self, data: &[u8]) {
        let n = data.len().min(PAGE);
        // SAFETY: as in `read`; at most a page is written.
        unsafe { crate::mapping::volatile_copy(data.as_ptr(), self.ptr, n) };
    }

    /// Zeroes the page.
    pub fn zero(&self) {
        self.write(&[0u8; PAGE]);
    }

    /// XORs `stream` (a page) into the page.
    pub fn xor(&self, stream: &[u8]) {
        let mut buf = self.read();
        for (b, k) in buf.chunks_exact_mut(8).zip(stream.chunks_exact(8)) {
            let mut w = [0u8; 8];
            w.copy_from_slice(b);
            let mut x = [0u8; 8];
            x.copy_from_slice(k);
            b.copy_from_slice(&(u64::from_ne_bytes(w) ^ u64::from_ne_bytes(x)).to_ne_bytes());
        }
        self.write(&buf);
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

/// `KVM_X86_SW_PROTECTED_VM`: no hooks.
#[derive(Debug, Default)]
pub struct SoftwareProtected;

impl Platform for SoftwareProtected {
    fn kind(&self) -> PlatformKind {
        PlatformKind::SoftwareProtected
    }
}

/// A page's RMP state (SEV-SNP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RmpState {
    /// Owned by the hypervisor: host-accessible.
    HypervisorOwned,
    /// Assigned to the guest: encrypted under the VM's key.
    GuestAssigned,
}

#[derive(Debug, Default)]
struct Rmp {
    assigned: BTreeSet<u64>,
    /// Per page, the number of key transitions so far (each uses a fresh keystream).
    transitions: HashMap<u64, u64>,
    report: PlatformReport,
}

/// SEV-SNP: an RMP entry per page. make_private assigns the page to the guest, make_shared and
/// reclaim return it. A runtime transition is destructive: the reader on the other side sees
/// the page through another key, modelled as XOR with a keystream derived from (VM key, page,
/// transition number) whose bytes are never zero, so every byte differs from the old
/// plaintext. LAUNCH_UPDATE (populate) assigns without scrambling: in-place encryption at
/// launch keeps the guest-visible plaintext.
#[derive(Debug)]
pub struct Snp {
    key: u64,
    rmp: Mutex<Rmp>,
}

impl Snp {
    /// A model with VM key `key`.
    pub fn new(key: u64) -> Self {
        Snp {
            key,
            rmp: Mutex::new(Rmp::default()),
        }
    }

    fn rmp(&self) -> std::sync::MutexGuard<'_, Rmp> {
        self.rmp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The RMP state of page `index`.
    pub fn state(&self, index: u64) -> RmpState {
        if self.rmp().assigned.contains(&index) {
            RmpState::GuestAssigned
        } else {
            RmpState::HypervisorOwned
        }
    }

    fn scramble(&self, rmp: &mut Rmp, page: &PageRef<'_>) {
        let n = rmp.transitions.entry(page.index()).or_insert(0);
        *n += 1;
        page.xor(&keystream(self.key, page.index(), *n));
    }
}

/// A page of keystream with no zero byte (splitmix64).
pub fn keystream(key: u64, index: u64, transition: u64) -> Vec<u8> {
    let mut s = key
        ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ transition.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    let mut out = Vec::with_capacity(PAGE);
    while out.len() < PAGE {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // Low bit of every byte set: no zero byte.
        out.extend_from_slice(&(z | 0x0101_0101_0101_0101).to_le_bytes());
    }
    out
}

impl Platform for Snp {
    fn kind(&self) -> PlatformKind {
        PlatformKind::Snp
    }

    fn make_private(&self, page: &PageRef<'_>) -> KernelResult<()> {
        let mut rmp = self.rmp();
        // Idempotent: the RMP state is checked first (V5R).
        if rmp.assigned.contains(&page.index()) {
            return Ok(());
        }
        self.scramble(&mut rmp, page);
        rmp.assigned.insert(page.index());
        rmp.report.assigned += 1;
        Ok(())
    }

    fn make_shared(&self, page: &PageRef<'_>) {
        let mut rmp = self.rmp();
        if rmp.assigned.remove(&page.index()) {
            self.scramble(&mut rmp, page);
            rmp.report.returned += 1;
        }
    }

    fn reclaim(&self, page: &PageRef<'_>) {
        let mut rmp = self.rmp();
        if rmp.assigned.remove(&page.index()) {
            rmp.report.returned += 1;
        }
    }

    fn post_populate(&self, page: &PageRef<'_>, _copied: bool) -> KernelResult<()> {
        let mut rmp = self.rmp();
        // LAUNCH_UPDATE of a page already assigned is refused by the firmware.
        if !rmp.assigned.insert(page.index()) {
            return Err(Errno::EINVAL);
        }
        rmp.report.assigned += 1;
        Ok(())
    }

    fn gmem_write(&self, index: u64) -> KernelResult<()> {
        let mut rmp = self.rmp();
        if rmp.assigned.contains(&index) {
            rmp.report.violations += 1;
            return Err(Errno::EFAULT);
        }
        Ok(())
    }

    fn report(&self) -> PlatformReport {
        let rmp = self.rmp();
        PlatformReport {
            guest_owned: rmp.assigned.len() as u64,
            ..rmp.report.clone()
        }
    }
}

#[derive(Debug, Default)]
struct Sept {
    pages: BTreeSet<u64>,
    report: PlatformReport,
}

/// TDX: a Secure-EPT model. A guest fault of a private page adds it (the guest accepts it,
/// which zeroes it); conversion to shared and reclaim remove it, and removal zeroes it;
/// INIT_MEM_REGION (populate) adds it with its content.
#[derive(Debug, Default)]
pub struct Tdx {
    sept: Mutex<Sept>,
}

impl Tdx {
    fn sept(&self) -> std::sync::MutexGuard<'_, Sept> {
        self.sept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether page `index` is in the Secure-EPT.
    pub fn mapped(&self, index: u64) -> bool {
        self.sept().pages.contains(&index)
    }
}

impl Platform for Tdx {
    fn kind(&self) -> PlatformKind {
        PlatformKind::Tdx
    }

    fn make_private(&self, page: &PageRef<'_>) -> KernelResult<()> {
        let mut s = self.sept();
        if s.pages.insert(page.index()) {
            page.zero();
            s.report.assigned += 1;
        }
        Ok(())
    }

    fn make_shared(&self, page: &PageRef<'_>) {
        let mut s = self.sept();
        if s.pages.remove(&page.index()) {
            page.zero();
            s.report.returned += 1;
        }
    }

    fn reclaim(&self, page: &PageRef<'_>) {
        let mut s = self.sept();
        if s.pages.remove(&page.index()) {
            page.zero();
            s.report.returned += 1;
        }
    }

    fn post_populate(&self, page: &PageRef<'_>, _copied: bool) -> KernelResult<()> {
        let mut s = self.sept();
        // TDH.MEM.PAGE.ADD of a page already mapped fails.
        if !s.pages.insert(page.index()) {
            return Err(Errno::EINVAL);
        }
        s.report.assigned += 1;
        Ok(())
    }

    fn gmem_write(&self, index: u64) -> KernelResult<()> {
        let mut s = self.sept();
        if s.pages.contains(&index) {
            s.report.violations += 1;
            return Err(Errno::EFAULT);
        }
        Ok(())
    }

    fn report(&self) -> PlatformReport {
        let s = self.sept();
        PlatformReport {
            guest_owned: s.pages.len() as u64,
            ..s.report.clone()
        }
    }
}

/// pKVM: EL2 changes stage-2 ownership on the guest's share/unshare hypercalls, so conversions
/// need no hook and preserve the page in place; reclaim scrubs the page before it returns to
/// the host (seed 001).
#[derive(Debug, Default)]
pub struct Pkvm {
    scrubbed: AtomicU64,
}

impl Platform for Pkvm {
    fn kind(&self) -> PlatformKind {
        PlatformKind::Pkvm
    }

    fn reclaim(&self, page: &PageRef<'_>) {
        page.zero();
        self.scrubbed.fetch_add(1, Ordering::Relaxed);
    }

    fn report(&self) -> PlatformReport {
        PlatformReport {
            scrubbed: self.scrubbed.load(Ordering::Relaxed),
            ..PlatformReport::default()
        }
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
    /// The page was removed from the direct map (NO_DIRECT_MAP).
    DirectMapRemove(u64),
    /// The page was restored to the direct map.
    DirectMapRestore(u64),
}

/// The page type a launch measurement records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageType {
    /// A normal page with measured contents.
    Normal = 1,
    /// A zero page.
    Zero = 3,
}

/// A launch measurement: SHA-384 chained over (gpa, page type, contents) of every populated
/// page, as SNP's LAUNCH_DIGEST and TDX's MRTD are extended page by page.
#[derive(Clone)]
pub struct LaunchMeasurement {
    digest: [u8; 48],
    pages: u64,
}

impl fmt::Debug for LaunchMeasurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LaunchMeasurement({} pages, {})", self.pages, self.hex())
    }
}

impl Default for LaunchMeasurement {
    fn default() -> Self {
        LaunchMeasurement {
            digest: [0; 48],
            pages: 0,
        }
    }
}

impl LaunchMeasurement {
    /// An empty measurement.
    pub fn new() -> Self {
        Self::default()
    }

    /// Extends the measurement with one page.
    pub fn extend(&mut self, gpa: u64, ty: PageType, contents: &[u8]) {
        let mut h = Sha384::new();
        h.update(self.digest);
        h.update(gpa.to_le_bytes());
        h.update([ty as u8]);
        h.update(Sha384::digest(contents));
        self.digest.copy_from_slice(&h.finalize());
        self.pages += 1;
    }

    /// The digest.
    pub fn digest(&self) -> [u8; 48] {
        self.digest
    }

    /// Pages measured.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The digest in hex.
    pub fn hex(&self) -> String {
        self.digest.iter().map(|b| format!("{b:02x}")).collect()
    }
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
    fn keystream_has_no_zero_byte_and_differs() {
        let a = keystream(1, 2, 1);
        assert_eq!(a.len(), PAGE);
        assert!(a.iter().all(|&b| b != 0));
        assert_ne!(a, keystream(1, 2, 2));
        assert_ne!(a, keystream(1, 3, 1));
        assert_ne!(a, keystream(2, 2, 1));
    }

    #[test]
    fn rules() {
        let before = vec![0x11u8; 64];
        assert!(ContentRule::Preserved.check(&before, &before).is_ok());
        assert!(ContentRule::Zeroed.check(&before, &[0; 64]).is_ok());
        assert!(ContentRule::Zeroed.check(&before, &before).is_err());
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

    #[test]
    fn measurement_depends_on_gpa_type_and_contents() {
        let page = vec![7u8; PAGE];
        let mut a = LaunchMeasurement::new();
        a.extend(0x1000, PageType::Normal, &page);
        let mut b = LaunchMeasurement::new();
        b.extend(0x2000, PageType::Normal, &page);
        let mut c = LaunchMeasurement::new();
        c.extend(0x1000, PageType::Zero, &page);
        let mut d = LaunchMeasurement::new();
        d.extend(0x1000, PageType::Normal, &[8u8; PAGE]);
        assert_ne!(a.digest(), b.digest());
        assert_ne!(a.digest(), c.digest());
        assert_ne!(a.digest(), d.digest());
        let mut a2 = LaunchMeasurement::new();
        a2.extend(0x1000, PageType::Normal, &page);
        assert_eq!(a.digest(), a2.digest());
    }
}
