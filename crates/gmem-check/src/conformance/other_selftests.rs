//! Cases from the series' other selftests (docs/series.md §4.5): `gmem_convert_fault_race.c` and
//! `pre_fault_memory_test.c`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ensure, Case, CaseFailure, CaseResult, Ctx, GuestPort, InternalGuest, Need};
use gmem::error::Errno;
use gmem::file::BackendKind;
use gmem::os::PAGE_SIZE;
use gmem::uapi::{
    kvm_memory_attributes2, kvm_pre_fault_memory, GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE,
};

const PS: u64 = PAGE_SIZE;
const SHARED: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

pub(super) fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "gmem_convert_fault_race",
            source: "gmem_convert_fault_race.c",
            needs: &[Need::Mmap, Need::InitShared, Need::Conversion, Need::Guest],
            run: convert_fault_race,
        },
        Case {
            name: "pre_fault_memory",
            source: "pre_fault_memory_test.c",
            needs: &[Need::Vm],
            run: pre_fault_memory,
        },
    ]
}

/// Pages the racing accessors fault, as the selftest.
const RACE_PAGES: u64 = 512;
/// Accessor threads (the selftest's vCPUs).
const RACE_THREADS: u64 = 4;
/// Conversions tried at most, as the selftest.
const RACE_TRIES: u64 = 10_000;
/// A bound on the wall time of the case.
const RACE_LIMIT: Duration = Duration::from_secs(20);

/// `gmem_convert_fault_race`: accessors fault the range while the host converts it to
/// private; at least one conversion must answer EAGAIN within 10,000 tries, each with a
/// page-aligned `error_offset` inside the range (pre-set to a sentinel that no answer can
/// hold) and nothing changed. On the emulated backend the accessors are guest-access threads
/// through the file's guest accessors (the model of KVM's transient folio references: a
/// vCPU's access through a memslot takes none there); elsewhere they are the case's guest.
fn convert_fault_race(ctx: &Ctx) -> CaseResult {
    // Under `gmem exec` the "kernel" is gmem's emulated file behind the KVM uAPI, and a vCPU's
    // faults through its memslots go straight to the guest view: they take no reference
    // there (DESIGN.md, "Transient references"), so the race cannot be seen that way.
    if ctx.backend.kind() != BackendKind::Emulated && std::env::var_os("GMEM_EXEC_SERIES").is_some()
    {
        return Err(CaseFailure::Unsupported(
            "under gmem exec a vCPU's faults through a guest_memfd memslot take no page \
             reference in the emulated file, so no conversion can meet one"
                .to_string(),
        ));
    }
    let f = ctx.create(RACE_PAGES, SHARED)?;
    let size = RACE_PAGES * PS;
    let guest: Arc<dyn GuestPort> = match (ctx.backend.kind(), &ctx.guest) {
        (BackendKind::Emulated, _) => Arc::new(InternalGuest),
        (_, Some(g)) => Arc::clone(g),
        (_, None) => return Err("no guest".into()),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..RACE_THREADS)
        .map(|t| {
            let (f, stop, guest) = (Arc::clone(&f), Arc::clone(&stop), Arc::clone(&guest));
            std::thread::spawn(move || {
                let mut p = t;
                // A whole page per access, as a vCPU's fault covers one: the reference is
                // held for the copy, so the conversions meet it often enough.
                let mut page = vec![0u8; PS as usize];
                while !stop.load(Ordering::Relaxed) {
                    page[0] = p as u8;
                    // A private page is as good as a shared one for the guest.
                    let _ = guest.write(f.as_ref(), (p % RACE_PAGES) * PS, &page);
                    p += RACE_THREADS;
                }
            })
        })
        .collect();
    let result = (|| {
        let (mut tries, mut eagain) = (0u64, 0u64);
        let start = Instant::now();
        while tries < RACE_TRIES && eagain < 3 && start.elapsed() < RACE_LIMIT {
            tries += 1;
            // Let the accessors run between tries: on a loaded machine the converter could
            // otherwise use up its tries while they wait for a CPU.
            std::thread::yield_now();
            let mut a = kvm_memory_attributes2::new(0, size, KVM_MEMORY_ATTRIBUTE_PRIVATE);
            a.error_offset = size + 1;
            match f.set_attributes(&mut a) {
                Ok(()) => f
                    .set_shared(0, size)
                    .map_err(|e| format!("back to shared: {e}"))?,
                Err(Errno::EAGAIN) => {
                    eagain += 1;
                    ensure(a.error_offset % PS == 0 && a.error_offset < size, || {
                        format!(
                            "EAGAIN with error_offset {:#x}: not a page of [0, {size:#x})",
                            a.error_offset
                        )
                    })?;
                    let runs = f
                        .attribute_runs(0, size)
                        .map_err(CaseFailure::call("attribute_runs"))?;
                    ensure(runs.iter().all(|r| r.2 == 0), || {
                        format!("a failed conversion changed attributes: {runs:?}")
                    })?;
                }
                Err(e) => {
                    return Err(format!("conversion {tries}: expected 0 or EAGAIN, got {e}").into())
                }
            }
        }
        ensure(eagain >= 1, || {
            format!(
                "no EAGAIN in {tries} conversions raced against {RACE_THREADS} accessors ({:.1} s)",
                start.elapsed().as_secs_f64()
            )
        })
    })();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    result
}

/// The selftest's memslot: 2 MiB and a page, at 4 GiB.
const PF_GPA: u64 = 4 << 30;
const PF_SIZE: u64 = (2 << 20) + PS;

/// `pre_fault_memory_test` on guest_memfd memslots, shared (INIT_SHARED) and private (private
/// by default): the full 2 MiB maps with nothing left; from 2 MiB, two pages map one and end
/// with ENOENT and a page left; past the memslot, ENOENT with the page left; `size` shrinks
/// exactly on success (retrying until done, as the selftest). Content is unchanged and an
/// invalid range is EINVAL. A kernel that answers EOPNOTSUPP makes the case a skip naming it.
fn pre_fault_memory(ctx: &Ctx) -> CaseResult {
    let vm = ctx.guest.as_ref().and_then(|g| g.vm()).ok_or("no VM")?;
    let supported = ctx.backend.supported_flags();
    let mut sets = vec![("private", supported & GUEST_MEMFD_FLAG_MMAP)];
    if supported & SHARED == SHARED {
        sets.push(("shared", SHARED));
    }
    for (what, flags) in sets {
        let f = ctx.create(PF_SIZE / PS, flags)?;
        if flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0 {
            f.write_at(0, &[0x5a])
                .map_err(|e| format!("host write before pre-faulting: {e}"))?;
        }
        let slot = vm.bind(&f, PF_GPA, 0, PF_SIZE)?;
        let r = (|| {
            pre_fault(vm, 0, 2 << 20, 0)?;
            pre_fault(vm, 2 << 20, 2 * PS, PS)?;
            pre_fault(vm, PF_SIZE, PS, PS)?;
            let mut bad = kvm_pre_fault_memory {
                gpa: PF_GPA,
                size: PS,
                flags: 1,
                ..Default::default()
            };
            let r = vm.pre_fault_memory(&mut bad);
            ensure(r == Err(Errno::EINVAL), || {
                format!("flags 1: expected EINVAL, got {r:?}")
            })?;
            let mut empty = kvm_pre_fault_memory {
                gpa: PF_GPA,
                ..Default::default()
            };
            let r = vm.pre_fault_memory(&mut empty);
            ensure(r == Err(Errno::EINVAL), || {
                format!("size 0: expected EINVAL, got {r:?}")
            })?;
            if flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0 {
                let mut b = [0u8; 1];
                f.read_at(0, &mut b)
                    .map_err(|e| format!("host read after pre-faulting: {e}"))?;
                ensure(b[0] == 0x5a, || {
                    format!("pre-faulting changed the content: {:#x}", b[0])
                })?;
            }
            Ok(())
        })();
        vm.unbind(slot)?;
        r.map_err(|e| match e {
            CaseFailure::Unsupported(_) => e,
            e => format!("{what} memslot: {e}").into(),
        })?;
    }
    Ok(())
}

/// The selftest's `pre_fault_memory()`: retries until done (or an error other than EINTR);
/// `size` must shrink exactly when a call succeeds; `left` bytes remain at the end, with
/// ENOENT if any.
fn pre_fault(vm: &dyn super::VmPort, offset: u64, size: u64, left: u64) -> CaseResult {
    let mut range = kvm_pre_fault_memory {
        gpa: PF_GPA + offset,
        size,
        ..Default::default()
    };
    let last = loop {
        let prev = range.size;
        let r = vm.pre_fault_memory(&mut range);
        ensure(
            (range.size < prev) == r.is_ok() || r == Err(Errno::EOPNOTSUPP),
            || {
                format!(
                "[{offset:#x}, +{size:#x}): size {prev:#x} -> {:#x} on {r:?}: it must shrink exactly on success",
                range.size
            )
            },
        )?;
        match r {
            Err(Errno::EOPNOTSUPP) => {
                return Err(CaseFailure::Unsupported(
                    "KVM_PRE_FAULT_MEMORY answered EOPNOTSUPP on this kernel (KVM_CAP_PRE_FAULT_MEMORY = 0)"
                        .to_string(),
                ))
            }
            Ok(()) if range.size > 0 => continue,
            Err(Errno::EINTR) => continue,
            r => break r,
        }
    };
    ensure(range.size == left, || {
        format!(
            "[{offset:#x}, +{size:#x}): {:#x} left, expected {left:#x}",
            range.size
        )
    })?;
    let want = if left > 0 { Err(Errno::ENOENT) } else { Ok(()) };
    ensure(last == want, || {
        format!("[{offset:#x}, +{size:#x}): ended with {last:?}, expected {want:?}")
    })
}
