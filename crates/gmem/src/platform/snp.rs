//! AMD SEV-SNP: the RMP table, destructive conversions, LAUNCH_UPDATE.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use super::{PageRef, Platform, PlatformKind, PlatformReport, PAGE};
use crate::error::{Errno, KernelResult};

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

    /// Makes room for page `index`'s transition count (ENOMEM otherwise): the paths that
    /// assign a page call it, so the make-shared hook, past a conversion's point of no
    /// return, finds the entry there and allocates nothing.
    fn track(rmp: &mut Rmp, index: u64) -> KernelResult<()> {
        if !rmp.transitions.contains_key(&index) {
            rmp.transitions.try_reserve(1).map_err(|_| Errno::ENOMEM)?;
            rmp.transitions.insert(index, 0);
        }
        Ok(())
    }

    fn scramble(&self, rmp: &mut Rmp, page: &PageRef<'_>) {
        let n = rmp.transitions.entry(page.index()).or_insert(0);
        *n += 1;
        page.xor_words(keystream_words(self.key, page.index(), *n));
    }
}

/// The keystream of (VM key, page, transition) as a page's worth of little-endian words
/// (splitmix64), none with a zero byte; no allocation.
pub fn keystream_words(key: u64, index: u64, transition: u64) -> impl Iterator<Item = u64> {
    let mut s = key
        ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ transition.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    (0..PAGE / 8).map(move |_| {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // Low bit of every byte set: no zero byte.
        z | 0x0101_0101_0101_0101
    })
}

/// A page of keystream with no zero byte (`keystream_words` as bytes).
pub fn keystream(key: u64, index: u64, transition: u64) -> Vec<u8> {
    keystream_words(key, index, transition)
        .flat_map(u64::to_le_bytes)
        .collect()
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
        Self::track(&mut rmp, page.index())?;
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
        if rmp.assigned.contains(&page.index()) {
            return Err(Errno::EINVAL);
        }
        Self::track(&mut rmp, page.index())?;
        rmp.assigned.insert(page.index());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keystream_has_no_zero_byte_and_differs() {
        let a = keystream(1, 2, 1);
        assert_eq!(a.len(), PAGE);
        assert!(a.iter().all(|&b| b != 0));
        assert_ne!(a, keystream(1, 2, 2));
        assert_ne!(a, keystream(1, 3, 1));
        assert_ne!(a, keystream(2, 2, 1));
    }
}
