//! The launch measurement that SNP's LAUNCH_UPDATE and TDX's INIT_MEM_REGION extend.

use std::fmt;

use sha2::{Digest, Sha384};

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
    use crate::platform::PAGE;

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
