//! Cases from `tools/testing/selftests/kvm/x86/private_mem_conversions_test.c` with the
//! in-place changes (docs/series.md §4.3), host-driven: the guest's part is played by the
//! context's [`GuestPort`](super::GuestPort), the hypercall handler's part (fallocate, then
//! `KVM_SET_MEMORY_ATTRIBUTES2`) is called directly, and the host syncs read the file's
//! `MMAP|INIT_SHARED` mapping (a private page must SIGBUS).
//!
//! As in the selftest, each "vCPU" works on its own window of 2 MiB + 4 KiB, the windows 4 MiB
//! apart in one guest_memfd; the vCPUs run concurrently, one thread and one host mapping each.
//!
//! The memslot × vCPU matrix of `private_mem_conversions_test.sh` (`-m 1 -n 1`, `-m 1 -n 4`,
//! `-m 4 -n 4`) runs the selftest's four guest flows in sequence per window, with the file
//! bound in `-m` equal memslots of the context's VM ([`VmPort`]): the guest's accesses are the
//! VM's vCPU loading and storing through those memslots (one vCPU runs every window's
//! accesses, one at a time; the windows' threads and conversions run concurrently), and every
//! conversion is a request to the VMM by GPA ([`VmPort::convert`]), split into one
//! conversion per memslot. A last request spans the whole file, every memslot.

use std::sync::Arc;

use super::{ensure, Case, CaseFailure, CaseResult, Ctx, Need, VmPort};
use gmem::file::{GuestMemfd, GuestMemfdBackend};
use gmem::mapping::{HostMapping, Probe};
use gmem::os::PAGE_SIZE;
use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};

const PS: u64 = PAGE_SIZE;
const MIB2: u64 = 2 << 20;
/// `PER_CPU_DATA_SIZE`: what each vCPU tests.
const WINDOW: u64 = MIB2 + PS;
/// Window stride: `align_up(PER_CPU_DATA_SIZE, 2 MiB)`.
const STRIDE: u64 = 2 * MIB2;
/// vCPUs (the selftest's `-n`).
const VCPUS: u64 = 2;
/// `test_ranges`: (offset, size) inside a window.
const RANGES: [(u64, u64); 5] = [(0, PS), (0, MIB2), (PS, PS), (PS, MIB2), (MIB2, PS)];
const NEEDS: &[Need] = &[Need::Mmap, Need::InitShared, Need::Conversion, Need::Guest];
const MATRIX_NEEDS: &[Need] = &[Need::Mmap, Need::InitShared, Need::Conversion, Need::Vm];
/// Where the matrix binds its memslots: clear of the other cases' GPAs.
const MATRIX_GPA: u64 = gmem_vmm::guest::DATA_GPA + (256 << 20);
/// The selftest's guest flows, in its order.
const FLOWS: [fn(&Window<'_>) -> CaseResult; 4] = [
    |w| w.explicit_conversion(false),
    |w| w.explicit_conversion(true),
    |w| w.punch_hole(false),
    |w| w.punch_hole(true),
];

pub(super) fn cases() -> Vec<Case> {
    const SRC: &str = "private_mem_conversions_test.c";
    vec![
        Case {
            name: "post_vm_free",
            source: SRC,
            needs: &[Need::Vm],
            run: post_vm_free,
        },
        Case {
            name: "explicit_conversion",
            source: SRC,
            needs: NEEDS,
            run: |ctx| per_vcpu(ctx, |w| w.explicit_conversion(false)),
        },
        Case {
            name: "explicit_conversion_fallocate",
            source: SRC,
            needs: NEEDS,
            run: |ctx| per_vcpu(ctx, |w| w.explicit_conversion(true)),
        },
        Case {
            name: "punch_hole",
            source: SRC,
            needs: NEEDS,
            run: |ctx| per_vcpu(ctx, |w| w.punch_hole(false)),
        },
        Case {
            name: "punch_hole_precise",
            source: SRC,
            needs: NEEDS,
            run: |ctx| per_vcpu(ctx, |w| w.punch_hole(true)),
        },
        Case {
            name: "memslots_1_vcpus_1",
            source: "private_mem_conversions_test.sh",
            needs: MATRIX_NEEDS,
            run: |ctx| matrix(ctx, 1, 1),
        },
        Case {
            name: "memslots_1_vcpus_4",
            source: "private_mem_conversions_test.sh",
            needs: MATRIX_NEEDS,
            run: |ctx| matrix(ctx, 1, 4),
        },
        Case {
            name: "memslots_4_vcpus_4",
            source: "private_mem_conversions_test.sh",
            needs: MATRIX_NEEDS,
            run: |ctx| matrix(ctx, 4, 4),
        },
    ]
}

/// How a window's guest accesses and conversions reach the file.
#[derive(Clone, Copy)]
enum Route<'a> {
    /// By file offset: the context's [`GuestPort`](super::GuestPort) plays the guest, the
    /// hypercall handler converts the file directly.
    File,
    /// By GPA: the file (offset 0) is bound at `gpa` in memslots of `vm`, whose vCPU plays the
    /// guest; conversions are requests to its VMM.
    Vm { vm: &'a dyn VmPort, gpa: u64 },
}

/// One vCPU's window: its base offset in the file and its own host mapping of the file.
struct Window<'a> {
    ctx: &'a Ctx,
    route: Route<'a>,
    f: &'a Arc<dyn GuestMemfd>,
    m: HostMapping,
    base: u64,
    vcpu: u64,
}

/// Creates the file, runs `flow` on every window concurrently, then (as the selftest does once
/// the VM is gone) punches and re-allocates the whole file.
fn per_vcpu(ctx: &Ctx, flow: fn(&Window<'_>) -> CaseResult) -> CaseResult {
    let f = create(ctx, VCPUS)?;
    windows(ctx, &f, VCPUS, Route::File, &[flow])?;
    punch_and_reallocate(&f)
}

/// The file of `vcpus` windows.
fn create(ctx: &Ctx, vcpus: u64) -> Result<Arc<dyn GuestMemfd>, CaseFailure> {
    ctx.create(
        STRIDE / PS * vcpus,
        GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
    )
}

/// Runs `flows`, in order, on each of `vcpus` windows, the windows concurrently.
fn windows(
    ctx: &Ctx,
    f: &Arc<dyn GuestMemfd>,
    vcpus: u64,
    route: Route<'_>,
    flows: &[fn(&Window<'_>) -> CaseResult],
) -> CaseResult {
    let results: Vec<CaseResult> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..vcpus)
            .map(|vcpu| {
                s.spawn(move || {
                    let m = f
                        .mmap_all()
                        .map_err(|e| format!("vCPU {vcpu}: mmap: {e}"))?;
                    let w = Window {
                        ctx,
                        route,
                        f,
                        m,
                        base: vcpu * STRIDE,
                        vcpu,
                    };
                    flows.iter().try_for_each(|flow| flow(&w))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a vCPU thread panicked".into()))
            })
            .collect()
    });
    results.into_iter().collect()
}

fn punch_and_reallocate(f: &Arc<dyn GuestMemfd>) -> CaseResult {
    let size = f.size();
    f.punch_hole(0, size)
        .map_err(|e| format!("final punch of the whole file: {e}"))?;
    f.allocate(0, size)
        .map_err(CaseFailure::call("final re-allocation of the whole file"))
}

/// `private_mem_conversions_test -m memslots -n vcpus`: the file bound in `memslots` equal
/// memslots of the context's VM, the selftest's flows on every window through them, then one
/// request over the whole file (every memslot) to private and back.
fn matrix(ctx: &Ctx, memslots: u64, vcpus: u64) -> CaseResult {
    // Under `gmem exec` every guest access of the "kernel" backend is a vCPU's KVM_RUN through
    // the interposer: the three matrix cases pass there but take over two minutes together,
    // beyond `gmem exec -- gmem conformance`'s budget.
    if ctx.backend.kind() != gmem::file::BackendKind::Emulated
        && std::env::var_os("GMEM_EXEC_SERIES").is_some()
    {
        return Err(CaseFailure::Unsupported(
            "under gmem exec the matrix's vCPU accesses through the interposer take over 40 s a \
             case (they pass); run it on the emulated backend or a kernel with the series"
                .to_string(),
        ));
    }
    let vm = ctx.guest.as_ref().and_then(|g| g.vm()).ok_or("no VM")?;
    let f = create(ctx, vcpus)?;
    let size = f.size();
    let slot_size = size / memslots;
    let mut slots = Vec::new();
    let mut r: CaseResult = (0..memslots).try_for_each(|i| {
        slots.push(vm.bind(&f, MATRIX_GPA + i * slot_size, i * slot_size, slot_size)?);
        Ok(())
    });
    if r.is_ok() {
        let route = Route::Vm {
            vm,
            gpa: MATRIX_GPA,
        };
        r = windows(ctx, &f, vcpus, route, &FLOWS)
            .and_then(|()| whole_file_request(vm, &f, memslots, slot_size));
    }
    for slot in slots {
        let unbound = vm.unbind(slot).map_err(CaseFailure::from);
        r = r.and(unbound);
    }
    r?;
    punch_and_reallocate(&f)
}

/// One request over every memslot: to private (each memslot's first and last page SIGBUS for
/// the host), then to shared (they read again).
fn whole_file_request(
    vm: &dyn VmPort,
    f: &Arc<dyn GuestMemfd>,
    memslots: u64,
    slot_size: u64,
) -> CaseResult {
    let size = f.size();
    let m = f
        .mmap_all()
        .map_err(CaseFailure::call("mmap of the whole file"))?;
    let pages = |i: u64| [i * slot_size, (i + 1) * slot_size - PS];
    for to_private in [true, false] {
        vm.convert(MATRIX_GPA, size, to_private, false)
            .map_err(CaseFailure::call(format!(
                "one request of the whole file [{MATRIX_GPA:#x}, +{size:#x}) over {memslots} \
                 memslot(s) to {}",
                if to_private { "private" } else { "shared" }
            )))?;
        for off in (0..memslots).flat_map(pages) {
            let r = m
                .probe_read(usize_of(off)?, 1)
                .map_err(CaseFailure::SigbusProbe)?;
            ensure(r.is_sigbus() == to_private, || {
                format!(
                    "after one request of the whole file to {}, the host read at {off:#x} \
                     (memslot {}) gave {r:?}",
                    if to_private { "private" } else { "shared" },
                    off / slot_size
                )
            })?;
        }
    }
    Ok(())
}

fn usize_of(n: u64) -> Result<usize, CaseFailure> {
    usize::try_from(n).map_err(|_| format!("{n:#x} does not fit in usize").into())
}

impl Window<'_> {
    fn err(&self, what: &str) -> CaseFailure {
        CaseFailure::Expectation(format!(
            "vCPU {} (window {:#x}): {what}",
            self.vcpu, self.base
        ))
    }

    fn guest_fill(&self, off: u64, len: u64, byte: u8) -> CaseResult {
        let data = vec![byte; usize_of(len)?];
        match self.route {
            Route::File => {
                let g = self.ctx.guest.as_deref().ok_or("no guest")?;
                g.write(&**self.f, self.base + off, &data)
            }
            Route::Vm { vm, gpa } => vm.guest_write(gpa + self.base + off, &data),
        }
        .map_err(|e| self.err(&e.to_string()))
    }

    fn guest_check(&self, off: u64, len: u64, byte: u8) -> CaseResult {
        if len == 0 {
            return Ok(());
        }
        let n = usize_of(len)?;
        let got = match self.route {
            Route::File => {
                let g = self.ctx.guest.as_deref().ok_or("no guest")?;
                g.read(&**self.f, self.base + off, n)
            }
            Route::Vm { vm, gpa } => vm.guest_read(gpa + self.base + off, n),
        }
        .map_err(|e| self.err(&e.to_string()))?;
        // Slice equality is a memcmp even in debug builds; look for the culprit only on failure.
        if got == vec![byte; got.len()] {
            return Ok(());
        }
        match got.iter().position(|&b| b != byte) {
            None => Ok(()),
            Some(i) => Err(self.err(&format!(
                "guest read of [{off:#x}, +{len:#x}): expected {byte:#04x}, got {:#04x} at {:#x}",
                got[i],
                off + i as u64
            ))),
        }
    }

    /// The host sync of a shared range: reads `expect` everywhere, then writes `write`.
    fn host_sync_shared(&self, off: u64, len: u64, expect: u8, write: u8) -> CaseResult {
        let at = usize_of(self.base + off)?;
        let n = usize_of(len)?;
        match self
            .m
            .probe_read(at, n)
            .map_err(|e| self.err(&e.to_string()))?
        {
            Probe::Done(got) => {
                let same = got == vec![expect; got.len()];
                if let Some(i) = (!same)
                    .then(|| got.iter().position(|&b| b != expect))
                    .flatten()
                {
                    return Err(self.err(&format!(
                        "host read of shared [{off:#x}, +{len:#x}): expected {expect:#04x}, got {:#04x} at {:#x}",
                        got[i],
                        off + i as u64
                    )));
                }
            }
            Probe::Fault(f) => {
                return Err(self.err(&format!(
                    "host read of shared [{off:#x}, +{len:#x}) faulted: {f:?}"
                )))
            }
        }
        let w = self
            .m
            .probe_write(at, n, write)
            .map_err(|e| self.err(&e.to_string()))?;
        ensure(w == Probe::Done(()), || {
            self.err(&format!(
                "host write of shared [{off:#x}, +{len:#x}): {w:?}"
            ))
            .to_string()
        })
    }

    /// The host sync of a private range: with per-guest_memfd attributes the host read must
    /// SIGBUS at the range's first byte.
    fn host_sync_private(&self, off: u64, len: u64) -> CaseResult {
        let at = usize_of(self.base + off)?;
        let r = self
            .m
            .probe_read(at, usize_of(len)?)
            .map_err(|e| self.err(&e.to_string()))?;
        ensure(
            r.is_sigbus() && r.fault().map(|f| f.addr) == Some(self.base + off),
            || {
                self.err(&format!(
                    "host read of private [{off:#x}, +{len:#x}): expected SIGBUS at its start, got {}",
                    match &r {
                        Probe::Done(_) => "the data".to_string(),
                        Probe::Fault(f) => format!("{f:?}"),
                    }
                ))
                .to_string()
            },
        )
    }

    /// The hypercall handler for a private mapping: allocate if asked, then convert.
    fn map_private(&self, off: u64, len: u64, fallocate: bool) -> CaseResult {
        let at = self.base + off;
        if let Route::Vm { vm, gpa } = self.route {
            return vm
                .convert(gpa + at, len, true, fallocate)
                .map_err(|e| self.err(&format!("request [{off:#x}, +{len:#x}) to private: {e}")));
        }
        if fallocate {
            self.f
                .allocate(at, len)
                .map_err(|e| self.err(&format!("fallocate [{off:#x}, +{len:#x}): {e}")))?;
        }
        self.f
            .set_private(at, len)
            .map_err(|e| self.err(&format!("to private [{off:#x}, +{len:#x}): {e}")))
    }

    /// The hypercall handler for a shared mapping: punch a hole if asked, then convert.
    fn map_shared(&self, off: u64, len: u64, fallocate: bool) -> CaseResult {
        let at = self.base + off;
        if let Route::Vm { vm, gpa } = self.route {
            return vm
                .convert(gpa + at, len, false, fallocate)
                .map_err(|e| self.err(&format!("request [{off:#x}, +{len:#x}) to shared: {e}")));
        }
        if fallocate {
            self.f
                .punch_hole(at, len)
                .map_err(|e| self.err(&format!("punch [{off:#x}, +{len:#x}): {e}")))?;
        }
        self.f
            .set_shared(at, len)
            .map_err(|e| self.err(&format!("to shared [{off:#x}, +{len:#x}): {e}")))
    }

    /// `guest_test_explicit_conversion(do_fallocate)`.
    fn explicit_conversion(&self, fallocate: bool) -> CaseResult {
        const DEF: u8 = 0xaa;
        const INIT: u8 = 0xcc;
        let (p1, p2, p3, p4) = (0x11, 0x22, 0x33, 0x44);
        // Memory is shared by default.
        self.guest_fill(0, WINDOW, DEF)?;
        self.guest_check(0, WINDOW, DEF)?;
        self.host_sync_shared(0, WINDOW, DEF, INIT)?;
        self.guest_check(0, WINDOW, INIT)?;
        for (off, size) in RANGES {
            self.guest_fill(off, size, p1)?;
            self.map_private(off, size, fallocate)?;
            if size > PS {
                self.guest_fill(off, PS, p2)?;
            } else {
                self.guest_fill(off, size, p2)?;
                self.host_sync_private(off, size)?;
                self.guest_check(off, size, p2)?;
                self.guest_check(0, off, INIT)?;
                self.guest_check(off + size, WINDOW - off - size, INIT)?;
                // The odd-page loop: with these ranges only page 0 (even) is visited, which is
                // synced as private again.
                self.host_sync_private(off, PS)?;
            }
            self.map_shared(off, size, fallocate)?;
            self.guest_fill(off, size, p3)?;
            self.host_sync_shared(off, size, p3, p4)?;
            self.guest_check(off, size, p4)?;
            // Free all memory so the next range starts clean; with in-place conversion the
            // punch zeroes the shared pages too, so the initial pattern is written after it.
            self.map_shared(0, WINDOW, true)?;
            self.guest_check(0, WINDOW, 0)?;
            self.guest_fill(0, WINDOW, INIT)?;
        }
        Ok(())
    }

    /// `guest_test_punch_hole(precise)`: punching private memory frees it, and the guest's
    /// next read sees zeroes; the pages stay private throughout.
    fn punch_hole(&self, precise: bool) -> CaseResult {
        const INIT: u8 = 0xcc;
        self.map_private(0, WINDOW, false)?;
        for (off, size) in RANGES {
            let punch = |o: u64, l: u64| {
                self.f
                    .punch_hole(self.base + o, l)
                    .map_err(|e| self.err(&format!("punch [{o:#x}, +{l:#x}): {e}")))
            };
            punch(0, WINDOW)?;
            let (fo, fl) = if precise { (off, size) } else { (0, WINDOW) };
            self.guest_fill(fo, fl, INIT)?;
            self.guest_check(fo, fl, INIT)?;
            punch(off, size)?;
            self.guest_check(off, size, 0)?;
            // The attribute survives the punch: still private for the host.
            self.host_sync_private(off, size)?;
        }
        Ok(())
    }
}

/// The end of `private_mem_conversions_test`: after `kvm_vm_free` the guest_memfd keeps
/// working (it holds its VM): a punch of the whole file, then an allocation of it, succeed.
/// The file is bound in a VM of its own (on the kernel backend, a fresh default VM whose
/// guest_memfd the file is), a vCPU reads it, and the VM is dropped before the punch.
fn post_vm_free(ctx: &Ctx) -> CaseResult {
    let size = 2 * WINDOW.next_multiple_of(MIB2);
    let gpa = gmem_vmm::guest::DATA_GPA;
    let (f, vm): (Arc<dyn GuestMemfd>, gmem_vmm::Vm) = match ctx.backend.kind() {
        gmem::file::BackendKind::Emulated => (
            ctx.create(size / PS, GUEST_MEMFD_FLAG_MMAP)?,
            gmem_vmm::Vm::new(1).map_err(|e| CaseFailure::Guest(e.to_string()))?,
        ),
        _ => {
            let backend =
                gmem::kernel::KernelBackend::new().map_err(CaseFailure::call("KVM_CREATE_VM"))?;
            let f = backend
                .create(size, ctx.backend.supported_flags() & GUEST_MEMFD_FLAG_MMAP)
                .map_err(CaseFailure::call("KVM_CREATE_GUEST_MEMFD"))?;
            let vm = gmem_vmm::Vm::on_kernel_backend(&backend, 1)
                .map_err(|e| CaseFailure::Guest(e.to_string()))?;
            (f, vm)
        }
    };
    let backing = gmem_vmm::backing::in_place(Arc::clone(&f))
        .map_err(CaseFailure::call("mapping the file for its memslot"))?;
    vm.bind(gmem_vmm::Gpa(gpa), &backing, 0, size)
        .map_err(|e| CaseFailure::Guest(e.to_string()))?;
    let mut p = gmem_vmm::GuestProgram::new(0, gmem_vmm::RequestPath::Port);
    p.verify(gpa, PS, 0);
    p.done();
    let program = p.finish().map_err(|e| CaseFailure::Guest(e.to_string()))?;
    let mut vcpu = vm
        .create_vcpu(0, program)
        .map_err(|e| CaseFailure::Guest(e.to_string()))?;
    let stop = vcpu
        .run_until_stop(&vm)
        .map_err(|e| CaseFailure::Guest(e.to_string()))?;
    ensure(
        matches!(stop, gmem_vmm::Stop::Event(gmem_vmm::Event::Done)),
        || format!("the guest's read of the file ended with {stop:?}"),
    )?;
    drop(vcpu);
    drop(vm);
    drop(backing);
    f.punch_hole(0, size).map_err(CaseFailure::call(
        "punch the whole file after the VM is freed",
    ))?;
    f.allocate(0, size).map_err(CaseFailure::call(
        "allocate the whole file after the VM is freed",
    ))
}
