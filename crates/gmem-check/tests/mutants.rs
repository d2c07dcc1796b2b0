//! The suite and the differential check catch a backend that gets things wrong: a wrapper
//! around the emulated backend with one deliberate defect must fail the cases that cover it.

use std::sync::Arc;

use gmem::mapping::MapKind;
use gmem::uapi::{kvm_memory_attributes2, FALLOC_FL_PUNCH_HOLE};
use gmem::{
    AccessError, BackendKind, EmulatedBackend, EmulatedGuestMemfd, GuestMemfd, GuestMemfdBackend,
    GuestMemfdStat, HostMapping, KernelResult, PinGuard,
};
use gmem_check::conformance::differential;
use gmem_check::conformance::runner::run_cases;
use gmem_check::conformance::{Ctx, InternalGuest, Outcome};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Defect {
    /// Punch-hole succeeds without freeing anything.
    PunchKeepsData,
    /// Conversions to private skip the pin check.
    IgnorePins,
}

#[derive(Debug)]
struct Broken {
    inner: EmulatedBackend,
    defect: Defect,
}

#[derive(Debug, Clone)]
struct BrokenFile {
    f: Arc<dyn GuestMemfd>,
    defect: Defect,
}

impl GuestMemfdBackend for Broken {
    fn kind(&self) -> BackendKind {
        BackendKind::Emulated
    }
    fn supported_flags(&self) -> u64 {
        self.inner.supported_flags()
    }
    fn conversion_support(&self) -> Result<(), gmem::ConversionUnsupported> {
        Ok(())
    }
    fn create(&self, size: u64, flags: u64) -> KernelResult<Arc<dyn GuestMemfd>> {
        Ok(Arc::new(BrokenFile {
            f: self.inner.create(size, flags)?,
            defect: self.defect,
        }))
    }
}

impl GuestMemfd for BrokenFile {
    fn backend(&self) -> BackendKind {
        BackendKind::Emulated
    }
    fn size(&self) -> u64 {
        self.f.size()
    }
    fn flags(&self) -> u64 {
        self.f.flags()
    }
    fn stat(&self) -> KernelResult<GuestMemfdStat> {
        self.f.stat()
    }
    fn set_attributes(&self, a: &mut kvm_memory_attributes2) -> KernelResult<()> {
        self.f.set_attributes(a)
    }
    fn fallocate(&self, mode: u32, offset: u64, len: u64) -> KernelResult<()> {
        if self.defect == Defect::PunchKeepsData && mode & FALLOC_FL_PUNCH_HOLE != 0 {
            return self
                .f
                .fallocate(mode & !FALLOC_FL_PUNCH_HOLE, 0, 0)
                .or(Ok(()));
        }
        self.f.fallocate(mode, offset, len)
    }
    fn mmap(&self, offset: u64, len: usize, kind: MapKind) -> KernelResult<HostMapping> {
        self.f.mmap(offset, len, kind)
    }
    fn pin(&self, offset: u64, len: u64) -> KernelResult<PinGuard> {
        if self.defect == Defect::IgnorePins {
            // The same checks, but the pin is taken on a scratch file: this one is never
            // pinned, so conversions never see it.
            let scratch = EmulatedGuestMemfd::create(self.size(), self.flags() | 2)?;
            if self
                .f
                .attribute_runs(offset, len)
                .is_ok_and(|r| r.iter().any(|x| x.2 != 0))
            {
                return Err(gmem::Errno::EFAULT);
            }
            return scratch.pin(offset, len);
        }
        self.f.pin(offset, len)
    }
    fn attributes(&self, offset: u64) -> KernelResult<u64> {
        self.f.attributes(offset)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        self.f.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        self.f.write_at(offset, data)
    }
    fn attribute_runs(&self, offset: u64, len: u64) -> KernelResult<Vec<(u64, u64, u64)>> {
        self.f.attribute_runs(offset, len)
    }
    fn guest_read(&self, offset: u64, buf: &mut [u8]) -> KernelResult<()> {
        self.f.guest_read(offset, buf)
    }
    fn guest_write(&self, offset: u64, data: &[u8]) -> KernelResult<()> {
        self.f.guest_write(offset, data)
    }
    fn guest_touch(&self, offset: u64, len: u64, value: u8) -> KernelResult<()> {
        self.f.guest_touch(offset, len, value)
    }
    fn clone_arc(&self) -> Arc<dyn GuestMemfd> {
        Arc::new(self.clone())
    }
    fn memslot_source(&self) -> KernelResult<gmem::MemslotSource<'_>> {
        self.f.memslot_source()
    }
    fn allocated_bytes(&self) -> KernelResult<u64> {
        self.f.allocated_bytes()
    }
}

fn broken(defect: Defect) -> Ctx {
    Ctx {
        backend: Arc::new(Broken {
            inner: EmulatedBackend::default(),
            defect,
        }),
        guest: Some(Arc::new(InternalGuest)),
    }
}

fn outcome<'a>(
    report: &'a gmem_check::conformance::runner::BackendReport,
    name: &str,
) -> &'a Outcome {
    &report
        .cases
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .outcome
}

#[test]
fn a_punch_that_keeps_data_fails_the_cases_and_the_differential() {
    let ctx = broken(Defect::PunchKeepsData);
    let report = run_cases(&ctx, None);
    for name in [
        "mmap_supported",
        "truncate",
        "explicit_conversion",
        "punch_hole",
        "punch_hole_precise",
    ] {
        assert!(
            matches!(outcome(&report, name), Outcome::Fail(_)),
            "{name}: {:?}",
            outcome(&report, name)
        );
    }
    assert_eq!(outcome(&report, "init_shared"), &Outcome::Pass);
    let diff = differential::run(&Ctx::emulated(), &ctx, Some("diff/mmap_supported"));
    assert!(
        matches!(&diff.cases[0].outcome, Outcome::Fail(r) if r.contains("mread 0x0 0x4000")),
        "{diff:?}"
    );
}

#[test]
fn conversions_that_ignore_pins_fail_the_cases_and_the_differential() {
    let ctx = broken(Defect::IgnorePins);
    let report = run_cases(&ctx, Some("e*_re*"));
    for name in ["elevated_refcount", "early_return"] {
        assert!(
            matches!(outcome(&report, name), Outcome::Fail(_)),
            "{name}: {:?}",
            outcome(&report, name)
        );
    }
    let diff = differential::run(&Ctx::emulated(), &ctx, Some("diff/elevated_refcount"));
    assert!(
        matches!(&diff.cases[0].outcome, Outcome::Fail(r) if r.contains("EAGAIN error_offset=0x2000")),
        "{diff:?}"
    );
}
