//! Section 6: operations both backends have, kernel against emulated (needs `/dev/kvm` and
//! the kernel's guest_memfd): create, faults, punch-hole, memslot bind and guest access
//! through a real vCPU.

use std::sync::Arc;
use std::time::Instant;

use gmem::emulated::EmulatedGuestMemfd;
use gmem::error::{Errno, KernelResult};
use gmem::file::{GuestMemfd, MemslotSource};
use gmem::kernel::KernelBackend;
use gmem::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem::PAGE_SIZE;
use gmem_vmm::backing::in_place;
use gmem_vmm::guest::DATA_GPA;
use gmem_vmm::stats::{median, time_us};
use gmem_vmm::{Event, GuestProgram, RequestPath, Vm};

use super::{Measurement, Unit};
use crate::error::BenchError;
use crate::floor::Figure;
use crate::sys;

const FLAGS: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
const LEN: u64 = 2 << 20;

/// `what` failed with an errno.
fn call(what: &'static str) -> impl Fn(Errno) -> BenchError {
    move |errno| BenchError::Call { what, errno }
}

/// Runs the section, its lines into `out` as they are measured; `Err` names why it cannot
/// (or could no longer) run here.
pub(super) fn measure(
    quick: bool,
    out: &mut Vec<Measurement>,
    step: &mut dyn FnMut(&str),
) -> Result<(), BenchError> {
    let backend = KernelBackend::new().map_err(BenchError::NoKernelBackend)?;
    let reps = if quick { 7 } else { 21 };
    let n = LEN as usize;
    let mut push = |name: &str, k: f64, e: f64, samples: usize| {
        out.push(Measurement {
            group: "kernel",
            figure: Figure::new(format!("kernel {name}"), k, format!("emulated {name}"), e),
            unit: Unit::Micros,
            samples,
            key: None,
        });
    };

    // create
    step("kernel vs emulated: create");
    let (mut k, mut e) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        let f = backend
            .create_guest_memfd(LEN, FLAGS)
            .map_err(call("KVM_CREATE_GUEST_MEMFD"))?;
        k.push(t.elapsed().as_secs_f64() * 1e6);
        drop(f);
        let t = Instant::now();
        let f = EmulatedGuestMemfd::create(LEN, FLAGS).map_err(call("emulated create"))?;
        e.push(t.elapsed().as_secs_f64() * 1e6);
        drop(f);
    }
    push("create 2MiB", median(&mut k), median(&mut e), reps);

    // faults and punch-hole, through each file's host mapping
    step("kernel vs emulated: faults, punch-hole");
    let kf = backend
        .create_guest_memfd(LEN, FLAGS)
        .map_err(call("KVM_CREATE_GUEST_MEMFD"))?;
    let ef = EmulatedGuestMemfd::create(LEN, FLAGS).map_err(call("emulated create"))?;
    let files: [&dyn GuestMemfd; 2] = [&kf, &ef];
    let maps = files
        .iter()
        .map(|f| f.mmap_all())
        .collect::<KernelResult<Vec<_>>>()
        .map_err(call("mmap"))?;
    let mut s: [[Vec<f64>; 4]; 2] = Default::default();
    for rep in 0..=reps {
        for (i, (f, m)) in files.iter().zip(&maps).enumerate() {
            let mut t = [0.0; 4];
            f.punch_hole(0, LEN).map_err(call("punch"))?;
            t[0] = time_us(|| {
                // The file is all shared: its mapping raises no SIGBUS.
                m.touch_pages(0, n, 1)
            })
            .map_err(call("first touch"))?;
            m.mmap()
                .madvise(0, n, libc::MADV_DONTNEED)
                .map_err(call("DONTNEED"))?;
            t[1] = time_us(|| m.touch_pages(0, n, 2)).map_err(call("re-map touch"))?;
            t[2] = time_us(|| f.punch_hole(0, LEN)).map_err(call("punch"))?;
            m.write_volatile(0, &[1]).map_err(call("write"))?;
            t[3] = time_us(|| f.punch_hole(0, PAGE_SIZE)).map_err(call("punch"))?;
            if rep > 0 {
                for (v, x) in s[i].iter_mut().zip(t) {
                    v.push(x);
                }
            }
        }
    }
    let [mut ks, mut es] = s;
    for (j, name) in [
        "first-touch fault 2MiB (512 pages)",
        "re-map fault 2MiB (512 pages)",
        "punch hole 2MiB populated",
        "punch hole 4KiB populated",
    ]
    .iter()
    .enumerate()
    {
        push(name, median(&mut ks[j]), median(&mut es[j]), reps);
    }

    // memslot bind: REGION2 with KVM_MEM_GUEST_MEMFD against a plain memslot of the guest view
    step("kernel vs emulated: memslot bind");
    let vm = backend.vm_fd();
    let ksource = kf.memslot_source().map_err(call("kernel host view"))?;
    if !matches!(ksource, MemslotSource::GuestMemfd { .. }) {
        return Err(BenchError::BoundAs {
            file: "kernel",
            offered: format!("{ksource:?}"),
        });
    }
    let esource = ef.memslot_source().map_err(call("emulated guest view"))?;
    if !matches!(esource, MemslotSource::GuestView { .. }) {
        return Err(BenchError::BoundAs {
            file: "emulated",
            offered: format!("{esource:?}"),
        });
    }
    const SLOT: u32 = 30_000;
    let mut s: [Vec<f64>; 4] = Default::default();
    for _ in 0..reps {
        let [add, remove] = sys::memslot_add_remove_us(vm, SLOT, 1 << 32, LEN, &ksource)?;
        s[0].push(add);
        s[1].push(remove);
        let [add, remove] = sys::memslot_add_remove_us(vm, SLOT + 1, 1 << 33, LEN, &esource)?;
        s[2].push(add);
        s[3].push(remove);
    }
    let [mut a, mut b, mut c, mut d] = s;
    push("memslot add 2MiB", median(&mut a), median(&mut c), reps);
    push("memslot remove 2MiB", median(&mut b), median(&mut d), reps);
    drop(maps);

    // guest access through a real vCPU
    step("kernel vs emulated: guest access");
    let (k, e) =
        guest_access(&backend, reps).map_err(|why| BenchError::GuestAccess(Box::new(why)))?;
    push("guest first-touch 2MiB (vCPU)", k[0], e[0], reps);
    push("guest re-touch 2MiB (vCPU)", k[1], e[1], reps);
    Ok(())
}

/// Medians (first touch, re-touch) of a vCPU filling 2 MiB of gmem, kernel then emulated.
fn guest_access(backend: &KernelBackend, reps: usize) -> Result<([f64; 2], [f64; 2]), BenchError> {
    let mut out = [[0.0; 2]; 2];
    for (i, kernel) in [true, false].into_iter().enumerate() {
        let (vm, file) = if kernel {
            let f = backend.create_guest_memfd(LEN, FLAGS)?;
            (Vm::on_kernel_backend(backend, 1)?, in_place(Arc::new(f))?)
        } else {
            let f = EmulatedGuestMemfd::create(LEN, FLAGS)?;
            (Vm::new(1)?, in_place(Arc::new(f))?)
        };
        vm.bind(gmem_vmm::Gpa(DATA_GPA), &file, 0, LEN)?;
        let mut p = GuestProgram::new(0, RequestPath::Port);
        for r in 0..=reps {
            let id = u32::try_from(r * 3)?;
            p.sync(id);
            p.fill(DATA_GPA, LEN, 1);
            p.sync(id + 1);
            p.fill(DATA_GPA, LEN, 2);
            p.sync(id + 2);
        }
        p.done();
        let mut vcpu = vm.create_vcpu(0, p.finish()?)?;
        let (mut first, mut again) = (Vec::new(), Vec::new());
        for r in 0..=reps {
            // At sync 3r the host punches the range: the next fill faults every page in.
            let ev = vcpu.run(&vm)?;
            if !matches!(ev, Event::Sync(_)) {
                return Err(BenchError::UnexpectedEvent {
                    expected: "a sync".into(),
                    got: ev,
                });
            }
            file.punch_hole(0, LEN)?;
            let t = Instant::now();
            vcpu.run(&vm)?;
            let t1 = t.elapsed().as_secs_f64() * 1e6;
            let t = Instant::now();
            vcpu.run(&vm)?;
            let t2 = t.elapsed().as_secs_f64() * 1e6;
            if r > 0 {
                first.push(t1);
                again.push(t2);
            }
        }
        let ev = vcpu.run(&vm)?;
        if ev != Event::Done {
            return Err(BenchError::UnexpectedEvent {
                expected: "the end".into(),
                got: ev,
            });
        }
        out[i] = [median(&mut first), median(&mut again)];
    }
    Ok((out[0], out[1]))
}
