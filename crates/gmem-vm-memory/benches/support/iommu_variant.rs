//! The alternative the issue asked to measure: vm-memory's own `IommuMemory` with identity
//! translation over the same mapping, its IOTLB holding read/write permission exactly on the
//! shared pages (a private page is unmapped: `IommuError::CannotResolve`, never SIGBUS).
//!
//! Minimal on purpose: what a VMM would need to keep the IOTLB in sync with conversions
//! (`set_private`/`set_shared` below: invalidate before the file revokes, map after it
//! shares) and nothing else. The IOTLB's read guard lives as long as the slice iterator, so a
//! conversion (write lock) waits for in-flight accesses; slices kept after the iterator are
//! unprotected, as on `GmemMemory` without a guard.

use std::sync::{RwLock, RwLockReadGuard};

use vm_memory::iommu::{Error as IommuError, Iommu, IommuMemory, Iotlb, IotlbIterator};
use vm_memory::{GuestAddress, GuestMemoryMmap, Permissions};

/// An IOMMU whose only state is the IOTLB: identity mappings of the shared pages.
#[derive(Debug, Default)]
pub struct AttributeIommu {
    iotlb: RwLock<Iotlb>,
}

impl AttributeIommu {
    /// Every page of `[gpa, gpa + len)` shared (identity, read/write).
    pub fn with_shared(gpa: u64, len: usize) -> Self {
        let me = AttributeIommu::default();
        me.set_shared(gpa, len);
        me
    }

    /// A conversion to private, before the file revokes the pages: unmap them.
    pub fn set_private(&self, gpa: u64, len: usize) {
        self.iotlb
            .write()
            .unwrap()
            .invalidate_mapping(GuestAddress(gpa), len);
    }

    /// A conversion to shared, after the file made them usable: map them (identity).
    pub fn set_shared(&self, gpa: u64, len: usize) {
        self.iotlb
            .write()
            .unwrap()
            .set_mapping(
                GuestAddress(gpa),
                GuestAddress(gpa),
                len,
                Permissions::ReadWrite,
            )
            .unwrap();
    }
}

impl Iommu for AttributeIommu {
    type IotlbGuard<'a> = RwLockReadGuard<'a, Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        Iotlb::lookup(self.iotlb.read().unwrap(), iova, length, access).map_err(|fails| {
            let first = fails
                .misses
                .iter()
                .chain(&fails.access_fails)
                .map(|r| r.base)
                .min()
                .unwrap_or(iova);
            IommuError::CannotResolve {
                iova_range: vm_memory::iommu::IovaRange {
                    base: first,
                    length,
                },
                reason: "private (guest_memfd): host access refused".into(),
            }
        })
    }
}

/// `IommuMemory` over `backend` (plain vm-memory over the gmem file's host mapping), IOMMU on.
pub fn iommu_memory(
    backend: GuestMemoryMmap<()>,
    iommu: AttributeIommu,
) -> IommuMemory<GuestMemoryMmap<()>, AttributeIommu> {
    IommuMemory::new(backend, iommu, true, ())
}
