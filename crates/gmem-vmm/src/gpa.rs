//! Guest physical addresses as their own type (as vm-memory's `GuestAddress`), so that a GPA
//! is never passed where a file offset or a host address is meant.

use std::fmt;

/// A guest physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Gpa(pub u64);

impl Gpa {
    /// The address as a number.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// `self + bytes`, or `None` on overflow.
    pub fn checked_add(self, bytes: u64) -> Option<Gpa> {
        self.0.checked_add(bytes).map(Gpa)
    }

    /// `self + bytes` (the caller knows it does not overflow, as for an offset inside a
    /// memslot that was checked when it was bound).
    pub const fn add(self, bytes: u64) -> Gpa {
        Gpa(self.0 + bytes)
    }

    /// The distance in bytes from `base` up to `self` (`self >= base`).
    pub const fn offset_from(self, base: Gpa) -> u64 {
        self.0 - base.0
    }
}

impl fmt::Display for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::LowerHex for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}
