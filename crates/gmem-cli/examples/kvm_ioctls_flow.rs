//! A VMM written against kvm-ioctls as published (raw ioctls only for what it lacks:
//! `KVM_SET_MEMORY_ATTRIBUTES2`, the series' capability numbers), running the in-place
//! conversion flow. Under `gmem exec` it runs on any kernel; without the interposer it needs a
//! kernel with the series and `KVM_X86_SW_PROTECTED_VM`.
//!
//! `cargo run -p gmem-cli --example kvm_ioctls_flow` builds it;
//! `target/debug/gmem exec -- target/debug/examples/kvm_ioctls_flow` runs it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;

use kvm_bindings::{kvm_create_guest_memfd, kvm_userspace_memory_region2, KVM_MEM_GUEST_MEMFD};
use kvm_ioctls::{Kvm, VcpuExit};

const PAGE: u64 = 4096;
const SIZE: u64 = 16 * PAGE;
const KVM_X86_SW_PROTECTED_VM: u64 = 1;
const KVM_CAP_VM_TYPES: u64 = 235;
const KVM_CAP_GUEST_MEMFD_FLAGS: u64 = 244;
const KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES: u64 = 250; // v8
const GUEST_MEMFD_FLAG_MMAP: u64 = 1;
const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 2;
const KVM_MEMORY_ATTRIBUTE_PRIVATE: u64 = 1 << 3;
/// `_IOWR(KVMIO, 0xd2, struct kvm_memory_attributes2)`.
const KVM_SET_MEMORY_ATTRIBUTES2: libc::c_ulong = 0xC080_AED2;

/// `struct kvm_memory_attributes2` (not in kvm-bindings 0.14).
#[repr(C)]
#[derive(Default)]
struct MemoryAttributes2 {
    offset: u64,
    size: u64,
    attributes: u64,
    flags: u64,
    error_offset: u64,
    reserved: [u64; 11],
}

/// The guest (real mode): reads private 0x2000 and shared 0x4000, reports both with `out`,
/// writes the private 0x3000, halts.
const GUEST: &[u8] = &[
    0xA0, 0x00, 0x20, 0xE6, 0x10, 0xA0, 0x00, 0x40, 0xE6, 0x11, 0xC6, 0x06, 0x00, 0x30, 0x5A, 0xF4,
];

/// `KVM_SET_MEMORY_ATTRIBUTES2`: Ok, or the errno and `error_offset`.
fn set_attributes(
    gmem: &OwnedFd,
    offset: u64,
    size: u64,
    attributes: u64,
) -> Result<(), (i32, u64)> {
    let mut a = MemoryAttributes2 {
        offset,
        size,
        attributes,
        ..Default::default()
    };
    // SAFETY: the ioctl reads and (on failure) writes back the 128-byte struct we own.
    let r = unsafe { libc::ioctl(gmem.as_raw_fd(), KVM_SET_MEMORY_ATTRIBUTES2, &mut a) };
    if r == 0 {
        Ok(())
    } else {
        Err((
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            a.error_offset,
        ))
    }
}

fn check(cond: bool, what: &str) -> Result<(), String> {
    if cond {
        println!("ok: {what}");
        Ok(())
    } else {
        Err(format!("FAILED: {what}"))
    }
}

fn flow() -> Result<(), String> {
    let e = |what: &str| {
        let what = what.to_string();
        move |err: kvm_ioctls::Error| format!("{what}: {err}")
    };
    let kvm = Kvm::new().map_err(e("open /dev/kvm"))?;
    let types = kvm.check_extension_raw(KVM_CAP_VM_TYPES);
    check(
        types & 2 != 0,
        "KVM_CAP_VM_TYPES includes KVM_X86_SW_PROTECTED_VM",
    )?;
    let vm = kvm
        .create_vm_with_type(KVM_X86_SW_PROTECTED_VM)
        .map_err(e("KVM_CREATE_VM(SW_PROTECTED)"))?;
    check(
        vm.check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS) & 3 == 3,
        "KVM_CAP_GUEST_MEMFD_FLAGS has MMAP | INIT_SHARED",
    )?;
    check(
        vm.check_extension_raw(KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES)
            == KVM_MEMORY_ATTRIBUTE_PRIVATE as i32,
        "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES = PRIVATE",
    )?;
    let raw = vm
        .create_guest_memfd(kvm_create_guest_memfd {
            size: SIZE,
            flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            ..Default::default()
        })
        .map_err(e("KVM_CREATE_GUEST_MEMFD"))?;
    // SAFETY: create_guest_memfd returned a new descriptor that nothing else owns.
    let gmem = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = SIZE as usize;
    // SAFETY: a new shared mapping of the guest_memfd; used only through `mem` below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            gmem.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err("mmap of the guest_memfd".into());
    }
    let mem = ptr.cast::<u8>();
    let at = |off: u64| -> *mut u8 { mem.wrapping_add(off as usize) };
    // SAFETY: shared pages of the mapping (all pages start shared: INIT_SHARED).
    unsafe {
        std::ptr::copy_nonoverlapping(GUEST.as_ptr(), at(0x1000), GUEST.len());
        at(0x2000).write_volatile(b'P');
        at(0x4000).write_volatile(b'S');
    }
    set_attributes(&gmem, 0x2000, 2 * PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        .map_err(|(errno, _)| format!("to private: errno {errno}"))?;
    check(true, "pages 2-3 converted to private in place")?;

    let region = kvm_userspace_memory_region2 {
        slot: 0,
        flags: KVM_MEM_GUEST_MEMFD,
        guest_phys_addr: 0,
        memory_size: SIZE,
        userspace_addr: ptr as u64,
        guest_memfd_offset: 0,
        guest_memfd: gmem.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: the region is the guest_memfd's own mapping, alive until the end of `flow`.
    unsafe { vm.set_user_memory_region2(region) }.map_err(e("KVM_SET_USER_MEMORY_REGION2"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(e("KVM_CREATE_VCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(e("KVM_SET_SREGS"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(e("KVM_SET_REGS"))?;
    let mut seen = Vec::new();
    loop {
        match vcpu.run().map_err(e("KVM_RUN"))? {
            VcpuExit::IoOut(port, data) => seen.push((port, data[0])),
            VcpuExit::Hlt => break,
            other => return Err(format!("unexpected exit {other:?}")),
        }
    }
    check(
        seen == [(0x10, b'P'), (0x11, b'S')],
        "the vCPU reads the private page (the host's write, kept) and the shared page",
    )?;
    set_attributes(&gmem, 0x3000, PAGE, 0).map_err(|(errno, _)| format!("to shared: {errno}"))?;
    // SAFETY: page 3 is shared again.
    let v = unsafe { at(0x3000).read_volatile() };
    check(
        v == 0x5a,
        "the guest's private write is kept across to-shared",
    )?;

    // A page reference (vmsplice into a pipe, never read): EAGAIN at that page.
    let mut p = [0; 2];
    // SAFETY: pipe writes two descriptors into `p`.
    if unsafe { libc::pipe(p.as_mut_ptr()) } != 0 {
        return Err("pipe".into());
    }
    let iov = libc::iovec {
        iov_base: at(0x5000).cast(),
        iov_len: PAGE as usize,
    };
    // SAFETY: vmsplice reads one iovec naming a shared page of the mapping.
    let n = unsafe { libc::vmsplice(p[1], &iov, 1, 0) };
    check(n == PAGE as isize, "vmsplice a shared page into a pipe")?;
    let r = set_attributes(&gmem, 0x4000, 4 * PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE);
    check(
        r == Err((libc::EAGAIN, 0x5000)),
        &format!("converting a referenced page: EAGAIN, error_offset 0x5000 (got {r:?})"),
    )?;
    // SAFETY: closes the two pipe descriptors we own.
    unsafe {
        libc::close(p[0]);
        libc::close(p[1]);
    }
    check(
        set_attributes(&gmem, 0x4000, 4 * PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE).is_ok(),
        "after the reference is gone the conversion succeeds",
    )?;
    // Punch-hole keeps the attribute; the page reads zero once shared again.
    // SAFETY: fallocate on the guest_memfd.
    let r = unsafe {
        libc::fallocate(
            gmem.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0x4000,
            PAGE as i64,
        )
    };
    check(r == 0, "punch a private page")?;
    set_attributes(&gmem, 0x4000, PAGE, 0).map_err(|(errno, _)| format!("to shared: {errno}"))?;
    // SAFETY: page 4 is shared.
    let v = unsafe { at(0x4000).read_volatile() };
    check(v == 0, "a punched page reads zero")?;
    Ok(())
}

fn main() -> ExitCode {
    match flow() {
        Ok(()) => {
            println!("kvm_ioctls_flow: ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kvm_ioctls_flow: {e}");
            ExitCode::FAILURE
        }
    }
}
