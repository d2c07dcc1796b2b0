//! The KVM ioctls the interposer answers: capabilities, `KVM_CREATE_VM`,
//! `KVM_CREATE_GUEST_MEMFD`, memslots, `KVM_SET_MEMORY_ATTRIBUTES2`, and
//! `KVM_PRE_FAULT_MEMORY` where the kernel cannot. Everything else (`KVM_RUN` first of all)
//! goes to the kernel untouched.

use std::ffi::{c_int, c_ulong, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use gmem::uapi::{
    kvm_create_guest_memfd, kvm_memory_attributes2, kvm_pre_fault_memory,
    kvm_userspace_memory_region2, KVM_CAP_GUEST_MEMFD, KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_PRE_FAULT_MEMORY, KVM_CAP_VM_TYPES,
    KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEM_GUEST_MEMFD,
};
use gmem::{EmulatedGuestMemfd, EmulatedOptions, Errno, GuestMemfd, MemslotSource, PAGE_SIZE};

use crate::config;
use crate::fdtable::{self, Binding, Gmem, Object, Pins, Slot, Vm};
use crate::real;
use crate::trace::{self, trace};
use crate::user::{copy_from, copy_to, errno, set_errno};

/// `_IO(KVMIO, 0x01)`.
pub(crate) const KVM_CREATE_VM: u32 = 0xAE01;
/// `_IO(KVMIO, 0x03)`.
pub(crate) const KVM_CHECK_EXTENSION: u32 = 0xAE03;
/// `_IO(KVMIO, 0x41)`.
pub(crate) const KVM_CREATE_VCPU: u32 = 0xAE41;
/// `_IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)` (a vCPU ioctl).
pub(crate) const KVM_PRE_FAULT_MEMORY: u32 = 0xC040_AED5;
/// `_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)`.
pub(crate) const KVM_SET_USER_MEMORY_REGION: u32 = 0x4020_AE46;
/// `_IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)`.
pub(crate) const KVM_SET_USER_MEMORY_REGION2: u32 = 0x40A0_AE49;
/// `_IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)`.
pub(crate) const KVM_CREATE_GUEST_MEMFD: u32 = 0xC040_AED4;
/// `_IOWR(KVMIO, 0xd2, struct kvm_memory_attributes2)` (guest_memfd ioctl).
pub(crate) const KVM_SET_MEMORY_ATTRIBUTES2: u32 = 0xC080_AED2;
/// `_IOW('g', 7, struct pin_longterm_test)` of `/sys/kernel/debug/gup_test`.
pub(crate) const PIN_LONGTERM_TEST_START: u32 = 0x4018_6707;
/// `_IO('g', 8)`.
pub(crate) const PIN_LONGTERM_TEST_STOP: u32 = 0x6708;
const PIN_LONGTERM_TEST_FLAG_USE_WRITE: u32 = 1;
const PIN_LONGTERM_TEST_FLAG_USE_FAST: u32 = 2;
/// `KVM_MEM_READONLY`.
const KVM_MEM_READONLY: u32 = 1 << 1;
use gmem::os::TASK_SIZE;

/// `struct pin_longterm_test` (tools/testing/selftests/mm/gup_test.h).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct PinLongtermTest {
    addr: u64,
    size: u64,
    flags: u32,
}

/// `struct kvm_userspace_memory_region` (the v1 memslot ioctl).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Region1 {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
}

static NEXT_VM: AtomicU64 = AtomicU64::new(1);

fn fail(e: Errno) -> c_int {
    set_errno(e.0);
    -1
}

fn pass(fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int {
    // SAFETY: the program's own call, forwarded unchanged.
    unsafe { real::ioctl()(fd, req, arg) }
}

/// Every `ioctl` that is a KVM request or names an owned descriptor.
#[cold]
pub(crate) fn ioctl(fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int {
    let nr = req as u32;
    match nr {
        KVM_CHECK_EXTENSION => return check_extension(fd, req, arg as c_ulong),
        KVM_CREATE_VM => return create_vm(fd, req, arg as u64),
        KVM_PRE_FAULT_MEMORY => return pre_fault_memory(fd, req, arg),
        _ => {}
    }
    let object = if fdtable::tracked(fd) {
        fdtable::lookup(fd)
    } else {
        None
    };
    match object {
        Some(Object::Vm(vm)) => match nr {
            KVM_CREATE_GUEST_MEMFD => create_guest_memfd(&vm, arg),
            KVM_SET_USER_MEMORY_REGION2 => set_region2(&vm, fd, req, arg),
            KVM_SET_USER_MEMORY_REGION => set_region1(&vm, fd, req, arg),
            KVM_CREATE_VCPU => create_vcpu(&vm, fd, req, arg),
            _ => pass(fd, req, arg),
        },
        Some(Object::Gmem(g)) => match nr {
            KVM_SET_MEMORY_ATTRIBUTES2 => set_attributes(&g, fd, arg),
            _ => {
                // guest_memfd answers no other ioctl.
                trace!("ioctl({fd}, {req:#x}) guest_memfd -> -1 ENOTTY");
                fail(Errno::ENOTTY)
            }
        },
        Some(Object::GupTest(pins)) => gup_test(&pins, fd, nr, arg),
        Some(Object::Pipe(_) | Object::Vcpu(_)) | None => pass(fd, req, arg),
    }
}

/// `KVM_CHECK_EXTENSION` on `/dev/kvm` or a VM: the kernel's answer, except for what the
/// series with per-guest_memfd attributes answers differently.
fn check_extension(fd: c_int, req: c_ulong, cap: c_ulong) -> c_int {
    let real = pass(fd, req, cap as *mut c_void);
    if real < 0 {
        return real; // not a KVM descriptor
    }
    let cfg = config::get();
    let vm = match fdtable::lookup(fd) {
        Some(Object::Vm(vm)) => Some(vm),
        _ => None,
    };
    let Ok(cap32) = u32::try_from(cap) else {
        return real;
    };
    let gmem_attrs_cap = cfg.series.cap_guest_memfd_memory_attributes();
    let answer: i64 = if cap32 == KVM_CAP_VM_TYPES {
        i64::from(real) | cfg.protected_types() as i64
    } else if cap32 == KVM_CAP_GUEST_MEMFD {
        1
    } else if cap32 == KVM_CAP_GUEST_MEMFD_FLAGS {
        gmem::emulated::supported_flags(cfg.platform) as i64
    } else if cap32 == gmem_attrs_cap {
        // PRIVATE on VM types with private memory; the system-wide query (no VM) answers
        // what such a VM would get (v7: kvm_supported_mem_attributes(NULL)).
        match &vm {
            Some(vm) if !vm.protected => 0,
            _ => KVM_MEMORY_ATTRIBUTE_PRIVATE as i64,
        }
    } else if cap32 == KVM_CAP_MEMORY_ATTRIBUTES {
        // Per-guest_memfd mode: the VM ioctl supports no attribute.
        0
    } else if cap32 == KVM_CAP_PRE_FAULT_MEMORY && real == 0 {
        // The interposer answers the vCPU ioctl where the kernel cannot (`pre_fault_memory`).
        1
    } else {
        return real;
    };
    let answer = answer as c_int;
    trace!(
        "ioctl({fd}, KVM_CHECK_EXTENSION, {cap}) {} -> {answer} (kernel {real})",
        vm.map_or("system".to_string(), |v| format!(
            "vm{} (type {})",
            v.id, v.vm_type
        ))
    );
    answer
}

/// `KVM_CREATE_VM`: an emulated protected type becomes a default VM the host can run.
fn create_vm(fd: c_int, req: c_ulong, vm_type: u64) -> c_int {
    let cfg = config::get();
    let protected = cfg.is_protected(vm_type);
    let kernel_type = if protected { 0 } else { vm_type };
    let r = pass(fd, req, kernel_type as *mut c_void);
    let e = errno();
    if r >= 0 {
        let vm = Arc::new(Vm {
            id: NEXT_VM.fetch_add(1, Ordering::Relaxed),
            vm_type,
            protected,
            slots: Default::default(),
        });
        trace!(
            "ioctl({fd}, KVM_CREATE_VM, {vm_type}) -> {r} (vm{}, kernel type {kernel_type}{})",
            vm.id,
            if protected {
                ", emulated protected"
            } else {
                ""
            }
        );
        fdtable::register(r, Object::Vm(vm));
    } else {
        trace!(
            "ioctl({fd}, KVM_CREATE_VM, {vm_type}) -> {}",
            trace::ret(r.into(), e)
        );
        set_errno(e);
    }
    r
}

/// A descriptor that stands for an emulated file: a sealed, sparse memfd of the file's size,
/// so `fstat` gives a distinct inode, `st_size` and `st_blksize` as the kernel's file does,
/// and a call that bypasses the interposer (a raw syscall) fails instead of reaching memory.
fn placeholder(size: u64) -> Result<c_int, Errno> {
    // SAFETY: plain system calls on a new descriptor.
    unsafe {
        let fd = libc::memfd_create(c"kvm-guest_memfd".as_ptr(), libc::MFD_ALLOW_SEALING);
        if fd < 0 {
            return Err(Errno::last());
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
        if real::ftruncate()(fd, size as libc::off_t) != 0
            || real::fcntl()(fd, libc::F_ADD_SEALS, seals as c_ulong) != 0
        {
            let e = Errno::last();
            real::close()(fd);
            return Err(e);
        }
        Ok(fd)
    }
}

/// `KVM_CREATE_GUEST_MEMFD` on a VM: an emulated file (for every VM type: the kernel's own
/// guest_memfd is never used).
fn create_guest_memfd(vm: &Arc<Vm>, arg: *mut c_void) -> c_int {
    let args: kvm_create_guest_memfd = match copy_from(arg) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let cfg = config::get();
    let created = EmulatedGuestMemfd::create_with(
        args.size,
        args.flags,
        EmulatedOptions::with_platform(cfg.platform),
    )
    .and_then(|file| {
        let fd = placeholder(args.size)?;
        Ok((file, fd))
    });
    match created {
        Ok((file, fd)) => {
            trace!(
                "ioctl(vm{}, KVM_CREATE_GUEST_MEMFD, size={:#x} flags={}) -> {fd} ({} revocation)",
                vm.id,
                args.size,
                gmem::uapi::flag_names(args.flags),
                file.revocation().name()
            );
            let g = Arc::new(Gmem {
                file,
                vm_id: vm.id,
                vm_protected: vm.protected,
            });
            fdtable::register(fd, Object::Gmem(g));
            fdtable::install_fork_handlers();
            fd
        }
        Err(e) => {
            trace!(
                "ioctl(vm{}, KVM_CREATE_GUEST_MEMFD, size={:#x} flags={:#x}) -> -1 {}",
                vm.id,
                args.size,
                args.flags,
                e.name()
            );
            fail(e)
        }
    }
}

/// The kernel's checks of a guest_memfd memslot that the kernel cannot make itself once the
/// slot is rewritten as a plain one (`kvm_set_memory_region`, `kvm_gmem_bind`).
fn check_gmem_region(
    vm: &Vm,
    slots: &std::collections::BTreeMap<u32, Slot>,
    r: &kvm_userspace_memory_region2,
) -> Result<Arc<Gmem>, Errno> {
    if r.flags & !(KVM_MEM_GUEST_MEMFD | KVM_MEM_READONLY) != 0 {
        return Err(Errno::EINVAL); // dirty logging of guest_memfd slots is not supported
    }
    let page = PAGE_SIZE;
    if r.memory_size % page != 0 || r.guest_phys_addr % page != 0 || r.userspace_addr % page != 0 {
        return Err(Errno::EINVAL);
    }
    match r.userspace_addr.checked_add(r.memory_size) {
        Some(end) if end <= TASK_SIZE => {}
        _ => return Err(Errno::EINVAL),
    }
    if r.guest_memfd_offset % page != 0 || r.guest_memfd_offset.checked_add(r.memory_size).is_none()
    {
        return Err(Errno::EINVAL);
    }
    if slots.contains_key(&r.slot) {
        return Err(Errno::EINVAL); // guest_memfd memslots are immutable: delete, then create
    }
    let gfd = r.guest_memfd as c_int;
    let g = match fdtable::lookup(gfd) {
        Some(Object::Gmem(g)) => g,
        _ => {
            // SAFETY: F_GETFD only tests that the descriptor is open.
            let open = unsafe { real::fcntl()(gfd, libc::F_GETFD, 0) } >= 0;
            return Err(if open { Errno::EINVAL } else { Errno::EBADF });
        }
    };
    if g.vm_id != vm.id {
        return Err(Errno::EINVAL);
    }
    let end = r.guest_memfd_offset + r.memory_size;
    if end > g.file.size() {
        return Err(Errno::EINVAL);
    }
    let overlaps = slots.values().filter_map(|s| s.binding.as_ref()).any(|b| {
        Arc::ptr_eq(&b.file, &g) && b.offset < end && r.guest_memfd_offset < b.offset + b.size
    });
    if overlaps {
        return Err(Errno::EEXIST);
    }
    Ok(g)
}

/// `KVM_SET_USER_MEMORY_REGION2`: a guest_memfd slot naming an emulated file is validated as
/// the kernel does, then created as a plain slot over the file's guest view (in which private
/// pages stay reachable, as they are to a guest).
fn set_region2(vm: &Arc<Vm>, fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int {
    let r: kvm_userspace_memory_region2 = match copy_from(arg) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let mut slots = vm.slots.lock().unwrap_or_else(|e| e.into_inner());
    if r.memory_size == 0 {
        let mut plain = r;
        plain.flags &= !KVM_MEM_GUEST_MEMFD;
        let ret = pass(fd, req, (&raw mut plain).cast());
        let e = errno();
        if ret == 0 {
            slots.remove(&r.slot);
        }
        trace!(
            "ioctl(vm{}, KVM_SET_USER_MEMORY_REGION2, slot={:#x} delete) -> {}",
            vm.id,
            r.slot,
            trace::ret(ret.into(), e)
        );
        set_errno(e);
        return ret;
    }
    if r.flags & KVM_MEM_GUEST_MEMFD == 0 {
        let ret = pass(fd, req, arg);
        if ret == 0 {
            slots.insert(
                r.slot,
                Slot::plain(r.guest_phys_addr, r.memory_size, r.userspace_addr),
            );
        }
        return ret;
    }
    let g = match check_gmem_region(vm, &slots, &r) {
        Ok(g) => g,
        Err(e) => {
            trace!(
                "ioctl(vm{}, KVM_SET_USER_MEMORY_REGION2, slot={:#x} gpa={:#x} size={:#x} gmem fd={} offset={:#x}) -> -1 {}",
                vm.id, r.slot, r.guest_phys_addr, r.memory_size, r.guest_memfd, r.guest_memfd_offset, e.name()
            );
            return fail(e);
        }
    };
    let view = match g.file.memslot_source() {
        Ok(MemslotSource::GuestView { userspace_addr, .. }) => userspace_addr,
        Ok(MemslotSource::GuestMemfd { .. }) => return fail(Errno::EINVAL),
        Err(e) => return fail(e),
    };
    let mut plain = r;
    plain.flags &= !KVM_MEM_GUEST_MEMFD;
    plain.userspace_addr = view + r.guest_memfd_offset;
    plain.guest_memfd = 0;
    plain.guest_memfd_offset = 0;
    let ret = pass(fd, req, (&raw mut plain).cast());
    let e = errno();
    if ret == 0 {
        slots.insert(
            r.slot,
            Slot {
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                userspace_addr: plain.userspace_addr,
                binding: Some(Binding {
                    file: g,
                    offset: r.guest_memfd_offset,
                    size: r.memory_size,
                }),
            },
        );
    }
    trace!(
        "ioctl(vm{}, KVM_SET_USER_MEMORY_REGION2, slot={:#x} gpa={:#x} size={:#x} gmem fd={} offset={:#x}) -> {} (plain slot over the guest view at {:#x})",
        vm.id, r.slot, r.guest_phys_addr, r.memory_size, r.guest_memfd, r.guest_memfd_offset,
        trace::ret(ret.into(), e), plain.userspace_addr
    );
    set_errno(e);
    ret
}

/// `KVM_SET_USER_MEMORY_REGION` (v1): keeps the slot table current; a guest_memfd slot can
/// only be deleted.
fn set_region1(vm: &Arc<Vm>, fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int {
    let r: Region1 = match copy_from(arg) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let mut slots = vm.slots.lock().unwrap_or_else(|e| e.into_inner());
    if r.memory_size != 0 && slots.get(&r.slot).is_some_and(|s| s.binding.is_some()) {
        return fail(Errno::EINVAL);
    }
    let ret = pass(fd, req, arg);
    if ret == 0 {
        if r.memory_size == 0 {
            slots.remove(&r.slot);
        } else {
            slots.insert(
                r.slot,
                Slot::plain(r.guest_phys_addr, r.memory_size, r.userspace_addr),
            );
        }
    }
    ret
}

/// `KVM_CREATE_VCPU`: the kernel's vCPU, recorded as the VM's (for `KVM_PRE_FAULT_MEMORY`).
fn create_vcpu(vm: &Arc<Vm>, fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int {
    let ret = pass(fd, req, arg);
    let e = errno();
    if ret >= 0 {
        fdtable::register(ret, Object::Vcpu(vm.clone()));
    }
    set_errno(e);
    ret
}

/// The VM of vCPU descriptor `fd`, if it is still a vCPU created through the interposer.
fn vcpu_vm(fd: c_int) -> Option<Arc<Vm>> {
    let Some(Object::Vcpu(vm)) = fdtable::lookup(fd) else {
        return None;
    };
    // Every anonymous-inode file shares one inode: the link names the kind.
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    link.to_string_lossy()
        .starts_with("anon_inode:kvm-vcpu")
        .then_some(vm)
}

/// `KVM_PRE_FAULT_MEMORY` on a vCPU: the kernel's answer where it has one. Where it cannot
/// (EOPNOTSUPP: no two-dimensional paging, as under PVM; ENOTTY: a kernel without the
/// ioctl), the interposer answers for a vCPU of a VM it created, with the kernel's semantics
/// (`kvm_vcpu_pre_fault_memory`): flags, alignment and wrap-around (size 0 included) are
/// EINVAL; then page by page, a GPA in no memslot of address space 0 ends the walk with
/// ENOENT; a page of a guest_memfd slot takes the guest fault of its file (allocated,
/// prepared, private or shared as its attribute says); a page of another slot is faulted in
/// at its host address (EFAULT if nothing is mapped there). `gpa` and `size` advance per
/// page; the call succeeds if at least one page was done, else fails with the error,
/// `range` unchanged.
fn pre_fault_memory(fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int {
    let ret = pass(fd, req, arg);
    let kernel = errno();
    if ret >= 0 || !(kernel == libc::EOPNOTSUPP || kernel == libc::ENOTTY) {
        return ret;
    }
    let Some(vm) = vcpu_vm(fd) else {
        set_errno(kernel);
        return ret;
    };
    let mut range: kvm_pre_fault_memory = match copy_from(arg) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let (gpa, size) = (range.gpa, range.size);
    let result = gmem::pre_fault::walk(&mut range, |gpa| pre_fault_page(&vm, gpa));
    let ret = match result {
        Ok(()) => match copy_to(arg, &range) {
            Ok(()) => 0,
            Err(e) => fail(e),
        },
        Err(e) => fail(e),
    };
    let e = errno();
    trace!(
        "ioctl({fd}, KVM_PRE_FAULT_MEMORY, gpa={gpa:#x} size={size:#x}) vcpu of vm{} -> {} (left {:#x}; emulated: kernel {})",
        vm.id,
        trace::ret(ret.into(), e),
        range.size,
        Errno(kernel).name()
    );
    set_errno(e);
    ret
}

/// One page of [`pre_fault_memory`]'s walk, under the VM's memslot lock (a concurrent delete waits).
fn pre_fault_page(vm: &Vm, gpa: u64) -> Result<(), Errno> {
    let slots = vm.slots.lock().unwrap_or_else(|e| e.into_inner());
    let slot = slots
        .iter()
        .find(|(&id, s)| id >> 16 == 0 && gpa >= s.gpa && gpa - s.gpa < s.size)
        .map(|(_, s)| s)
        .ok_or(Errno::ENOENT)?;
    let delta = gpa - slot.gpa;
    match &slot.binding {
        Some(b) => b.file.file.guest_fault(b.offset + delta, PAGE_SIZE),
        None => {
            let addr = slot
                .userspace_addr
                .checked_add(delta)
                .ok_or(Errno::EFAULT)?;
            copy_from::<u8>(addr as *const c_void).map(|_| ())
        }
    }
}

/// `KVM_SET_MEMORY_ATTRIBUTES2` on an emulated file: the kernel's validation order, the
/// emulated conversion, and on failure the whole struct copied back (with `error_offset`).
fn set_attributes(g: &Gmem, fd: c_int, arg: *mut c_void) -> c_int {
    let mut a: kvm_memory_attributes2 = match copy_from(arg) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let series = config::get().series;
    let result = if a.flags != 0 || a.reserved.iter().any(|&r| r != 0) {
        Err(Errno::EINVAL)
    } else if !g.vm_protected && (series == gmem::uapi::SeriesRevision::V8 || a.attributes != 0) {
        // v8: a VM without private memory refuses any request; v7 checks the bits against
        // what the VM supports (nothing), so 0 passes.
        Err(Errno::EINVAL)
    } else {
        g.file.set_attributes(&mut a)
    };
    let ret = match result {
        Ok(()) => 0,
        Err(e) => {
            // The kernel copies the whole struct back on failure.
            if let Err(fault) = copy_to(arg, &a) {
                return fail(fault);
            }
            set_errno(e.0);
            -1
        }
    };
    trace!(
        "ioctl({fd}, KVM_SET_MEMORY_ATTRIBUTES2, offset={:#x} size={:#x} attributes={:#x}) -> {}{}",
        a.offset,
        a.size,
        a.attributes,
        match result {
            Ok(()) => "0".to_string(),
            Err(e) => format!("-1 {}", e.name()),
        },
        if ret < 0 {
            format!(" error_offset={:#x}", a.error_offset)
        } else {
            String::new()
        }
    );
    if let Err(e) = result {
        set_errno(e.0);
    }
    ret
}

/// The emulated `/sys/kernel/debug/gup_test`: `PIN_LONGTERM_TEST_START` takes long-term pins
/// on the pages of emulated files in the range (other memory is not pinned), `STOP` and
/// `close` release them.
fn gup_test(pins: &Pins, fd: c_int, nr: u32, arg: *mut c_void) -> c_int {
    let mut held = pins.0.lock().unwrap_or_else(|e| e.into_inner());
    let result = match nr {
        PIN_LONGTERM_TEST_START => {
            let t: PinLongtermTest = match copy_from(arg) {
                Ok(t) => t,
                Err(e) => return fail(e),
            };
            if !held.is_empty()
                || t.flags & !(PIN_LONGTERM_TEST_FLAG_USE_WRITE | PIN_LONGTERM_TEST_FLAG_USE_FAST)
                    != 0
                || (t.addr | t.size) % PAGE_SIZE != 0
                || t.size == 0
            {
                Err(Errno::EINVAL)
            } else {
                crate::files::pin_user_range(t.addr as usize, t.size as usize).map(|p| {
                    *held = p;
                })
            }
        }
        PIN_LONGTERM_TEST_STOP => {
            held.clear();
            Ok(())
        }
        _ => Err(Errno::EINVAL),
    };
    trace!(
        "ioctl({fd}, gup_test {nr:#x}) -> {} ({} pins held)",
        match result {
            Ok(()) => "0".to_string(),
            Err(e) => format!("-1 {}", e.name()),
        },
        held.len()
    );
    match result {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_gmem_uapi() {
        assert_eq!(
            KVM_CREATE_GUEST_MEMFD as c_ulong,
            gmem::uapi::KVM_CREATE_GUEST_MEMFD()
        );
        assert_eq!(
            KVM_SET_USER_MEMORY_REGION2 as c_ulong,
            gmem::uapi::KVM_SET_USER_MEMORY_REGION2()
        );
        assert_eq!(
            KVM_SET_MEMORY_ATTRIBUTES2 as c_ulong,
            gmem::uapi::KVM_SET_MEMORY_ATTRIBUTES2()
        );
        assert_eq!(
            KVM_PRE_FAULT_MEMORY as c_ulong,
            gmem::uapi::KVM_PRE_FAULT_MEMORY()
        );
        assert_eq!(std::mem::size_of::<Region1>(), 32);
        assert_eq!(std::mem::size_of::<PinLongtermTest>(), 24);
    }
}
