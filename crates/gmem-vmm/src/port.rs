//! How a check drives a guest: [`GuestPort`] (the guest's reads and writes of a file) and
//! [`VmPort`] (memslots and a vCPU's loads), played by the emulated file's guest view
//! ([`InternalGuest`]) or by a real vCPU ([`VcpuGuest`]).
//!
//! [`VcpuGuest`] owns a one-vCPU [`Vm`]. A guest read or write of a file binds the file (once)
//! in the upper half of the data window and runs a short program at CPL3 that copies between
//! the file's pages and a bounce buffer in system memory (`rep movsb`), so every guest access
//! of a case goes through KVM's memslot and the vCPU's page tables. [`VmPort`] binds at the
//! GPAs the case chooses and reports how a vCPU's load ended (value, MMIO, memory fault).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::backing::in_place;
use crate::guest::{self, GuestProgram, RequestPath};
use crate::{Event, PortError, Stop, Vcpu, Vm, VmError};
use gmem::error::Errno;
use gmem::file::{BackendKind, GuestMemfd};
use gmem::kernel::KernelBackend;
use gmem::os::PAGE_SIZE;
use gmem::uapi::kvm_pre_fault_memory;

/// Plays the guest's part of a case: accesses that the guest makes, which see private pages.
pub trait GuestPort: Send + Sync + fmt::Debug {
    /// Reads `len` bytes at file offset `offset` as the guest.
    fn read(&self, file: &dyn GuestMemfd, offset: u64, len: usize) -> Result<Vec<u8>, PortError>;
    /// Writes `data` at file offset `offset` as the guest.
    fn write(&self, file: &dyn GuestMemfd, offset: u64, data: &[u8]) -> Result<(), PortError>;

    /// A VM that runs real guest code on the files, if this guest has one (cases that need
    /// `Need::Vm`).
    fn vm(&self) -> Option<&dyn VmPort> {
        None
    }
}

/// What a vCPU's access ended with ([`VmPort::guest_read_u64`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmAccess {
    /// The access completed and read this value.
    Value(u64),
    /// `KVM_EXIT_MEMORY_FAULT` (KVM_RUN returned -1/EFAULT).
    MemoryFault {
        /// `memory_fault.flags` (`KVM_MEMORY_EXIT_FLAG_PRIVATE`).
        flags: u64,
        /// `memory_fault.gpa`.
        gpa: u64,
        /// `memory_fault.size`.
        size: u64,
    },
    /// `KVM_EXIT_MMIO`: the access was emulated as MMIO.
    Mmio {
        /// `mmio.phys_addr`.
        phys_addr: u64,
        /// `mmio.len`.
        len: u32,
        /// `mmio.is_write`.
        is_write: bool,
    },
    /// Any other exit, described.
    Other(String),
}

/// A VM with memslots over guest_memfd files and a vCPU that runs guest code (docs/series.md
/// §4.4). Provided by a [`GuestPort`] through [`GuestPort::vm`].
pub trait VmPort: Send + Sync + fmt::Debug {
    /// Binds `[offset, offset + size)` of `file` at guest physical address `gpa`; returns the
    /// memslot.
    fn bind(
        &self,
        file: &Arc<dyn GuestMemfd>,
        gpa: u64,
        offset: u64,
        size: u64,
    ) -> Result<u32, PortError>;
    /// Deletes memslot `slot`.
    fn unbind(&self, slot: u32) -> Result<(), PortError>;
    /// Runs a vCPU that loads 8 bytes at `gpa` (a private access where the page is private),
    /// and reports how the access ended.
    fn guest_read_u64(&self, gpa: u64) -> Result<VmAccess, PortError>;
    /// Runs a vCPU that loads 8 bytes at `gpa` in an endless loop and, once it is looping,
    /// calls `during` on this thread (deleting the memslot under the guest, as
    /// `private_mem_kvm_exits_test` does); reports the exit that ended the loop (MMIO, a
    /// memory fault, ...). A loop still running `timeout` after `during` returned is kicked
    /// out of `KVM_RUN`: [`VmError::Timeout`]. `during` may bind and unbind, not make guest
    /// accesses through this port (its vCPU is busy).
    fn guest_read_u64_while(
        &self,
        gpa: u64,
        during: &dyn Fn() -> Result<(), PortError>,
        timeout: std::time::Duration,
    ) -> Result<VmAccess, PortError>;
    /// The vCPU reads `len` bytes at `gpa` (through the memslots the case bound).
    fn guest_read(&self, gpa: u64, len: usize) -> Result<Vec<u8>, PortError>;
    /// The vCPU writes `data` at `gpa`.
    fn guest_write(&self, gpa: u64, data: &[u8]) -> Result<(), PortError>;
    /// A conversion request of `[gpa, gpa + size)` to private or shared, as the VMM serves
    /// `KVM_HC_MAP_GPA_RANGE` ([`Vm::convert`]): split into one conversion per memslot, EAGAIN
    /// retried once, rolled back on failure; with `fallocate`, shared pieces are punched and
    /// private ones allocated.
    fn convert(&self, gpa: u64, size: u64, to_private: bool, fallocate: bool) -> Result<(), Errno>;
    /// `KVM_PRE_FAULT_MEMORY` on a vCPU ([`Vcpu::pre_fault_memory`]): the kernel's answer,
    /// with `range` updated as the kernel updates it.
    fn pre_fault_memory(&self, range: &mut kvm_pre_fault_memory) -> Result<(), Errno>;
}

/// The guest played through the emulated file's internal guest view (no vCPU).
#[derive(Debug, Default, Clone, Copy)]
pub struct InternalGuest;

impl GuestPort for InternalGuest {
    fn read(&self, file: &dyn GuestMemfd, offset: u64, len: usize) -> Result<Vec<u8>, PortError> {
        // The range first, then a fallible allocation: a bad length is an error, not an abort.
        let access = |errno| PortError::Access {
            op: "read",
            offset,
            errno,
        };
        match offset.checked_add(len as u64) {
            Some(end) if end <= file.size() => {}
            _ => return Err(access(Errno::EFAULT)),
        }
        let mut buf = Vec::new();
        buf.try_reserve_exact(len)
            .map_err(|_| access(Errno::ENOMEM))?;
        buf.resize(len, 0);
        file.guest_read(offset, &mut buf)
            .map_err(|errno| PortError::Access {
                op: "read",
                offset,
                errno,
            })?;
        Ok(buf)
    }

    fn write(&self, file: &dyn GuestMemfd, offset: u64, data: &[u8]) -> Result<(), PortError> {
        file.guest_write(offset, data)
            .map_err(|errno| PortError::Access {
                op: "write",
                offset,
                errno,
            })
    }
}

/// Where [`GuestPort`] accesses bind files: the upper half of the data window, clear of the
/// GPAs cases choose for [`VmPort::bind`].
const AUTO_BASE: u64 = guest::DATA_GPA + guest::MAX_DATA_SIZE / 2;
const AUTO_END: u64 = guest::DATA_GPA + guest::MAX_DATA_SIZE;

struct State {
    vcpu: Vcpu,
    /// (backend, inode) → (slot, gpa) of files bound for guest accesses.
    auto: HashMap<(BackendKind, u64), (u32, u64)>,
    next_gpa: u64,
}

/// The guest of the conformance cases, played by a real vCPU.
pub struct VcpuGuest {
    vm: Vm,
    state: Mutex<State>,
}

impl std::fmt::Debug for VcpuGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuGuest").field("vm", &self.vm).finish()
    }
}

impl VcpuGuest {
    /// A vCPU guest for emulated files.
    pub fn emulated() -> Result<Arc<VcpuGuest>, VmError> {
        Self::with_vm(Vm::new(1)?)
    }

    /// A vCPU guest for emulated files on a VM that tracks attributes per VM
    /// ([`gmem::AttributeTracking::PerVm`]: `Vm::set_memory_attributes`, the module-parameter
    /// mode).
    pub fn emulated_per_vm() -> Result<Arc<VcpuGuest>, VmError> {
        let vm = Vm::new(1)?;
        vm.set_attribute_tracking(gmem::AttributeTracking::PerVm)?;
        Self::with_vm(vm)
    }

    /// A vCPU guest for the kernel backend's files (bound in its VM).
    pub fn kernel(backend: &KernelBackend) -> Result<Arc<VcpuGuest>, VmError> {
        Self::with_vm(Vm::on_kernel_backend(backend, 1)?)
    }

    fn with_vm(vm: Vm) -> Result<Arc<VcpuGuest>, VmError> {
        // Cases observe memory faults; they are not served behind their back.
        vm.set_memory_fault_conversion(false);
        let mut p = GuestProgram::new(0, RequestPath::Port);
        p.done();
        let vcpu = vm.create_vcpu(0, p.finish()?)?;
        Ok(Arc::new(VcpuGuest {
            vm,
            state: Mutex::new(State {
                vcpu,
                auto: HashMap::new(),
                next_gpa: AUTO_BASE,
            }),
        }))
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The GPA of `file`'s offset 0, binding the file first if needed.
    fn gpa_of(&self, st: &mut State, file: &dyn GuestMemfd) -> Result<u64, PortError> {
        let ino = file
            .stat()
            .map_err(|e| PortError::Binding(format!("fstat: {e}")))?
            .ino;
        let key = (file.backend(), ino);
        if let Some(&(_, gpa)) = st.auto.get(&key) {
            return Ok(gpa);
        }
        let gf = in_place(file.clone_arc())
            .map_err(|e| PortError::Binding(format!("mapping the file: {e}")))?;
        let size = file.size().div_ceil(PAGE_SIZE) * PAGE_SIZE;
        if st.next_gpa + size > AUTO_END {
            // Out of room: release every automatic binding and start over.
            for (_, (slot, _)) in st.auto.drain() {
                self.vm.unbind(slot).map_err(PortError::from)?;
            }
            st.next_gpa = AUTO_BASE;
            if st.next_gpa + size > AUTO_END {
                return Err(PortError::Binding(format!(
                    "a file of {size:#x} bytes does not fit the vCPU guest's window of {:#x}",
                    AUTO_END - AUTO_BASE
                )));
            }
        }
        let gpa = st.next_gpa;
        let slot = self
            .vm
            .bind(crate::Gpa(gpa), &gf, 0, size)
            .map_err(PortError::from)?;
        st.next_gpa += size;
        st.auto.insert(key, (slot, gpa));
        Ok(gpa)
    }

    fn run_program(&self, st: &mut State, p: GuestProgram) -> Result<Stop, PortError> {
        let program = p.finish().map_err(PortError::from)?;
        st.vcpu.load(&self.vm, program).map_err(PortError::from)?;
        st.vcpu.run_until_stop(&self.vm).map_err(PortError::from)
    }

    fn copy(
        &self,
        file: &dyn GuestMemfd,
        offset: u64,
        len: usize,
        to_file: Option<&[u8]>,
    ) -> Result<Vec<u8>, PortError> {
        offset
            .checked_add(len as u64)
            .filter(|&e| e <= file.size())
            .ok_or(PortError::OutOfBounds {
                offset,
                len: len as u64,
                size: file.size(),
            })?;
        let mut st = self.lock();
        let base = self.gpa_of(&mut st, file)?;
        self.copy_at(&mut st, base + offset, len, to_file)
    }

    /// The vCPU copies `len` bytes between `gpa` and the bounce buffer, a chunk at a time:
    /// from `to_file` into guest memory, or out of it (returned).
    fn copy_at(
        &self,
        st: &mut State,
        gpa: u64,
        len: usize,
        to_file: Option<&[u8]>,
    ) -> Result<Vec<u8>, PortError> {
        let bounce = guest::bounce_gpa(0);
        let mut out = Vec::with_capacity(if to_file.is_some() { 0 } else { len });
        let end = gpa + len as u64;
        let mut at = gpa;
        while at < end {
            let n = (end - at).min(guest::BOUNCE_SIZE);
            let done = (at - gpa) as usize;
            let chunk = n as usize;
            let mut p = GuestProgram::new(0, RequestPath::Port);
            if let Some(data) = to_file {
                self.vm
                    .write_system(bounce, &data[done..done + chunk])
                    .map_err(PortError::from)?;
                p.copy(bounce, at, n);
            } else {
                p.copy(at, bounce, n);
            }
            p.done();
            match self.run_program(st, p)? {
                Stop::Event(Event::Done) => {}
                other => {
                    return Err(PortError::UnexpectedStop {
                        op: if to_file.is_some() { "write" } else { "read" },
                        gpa: at,
                        len: n,
                        stop: format!("{other:?}"),
                    })
                }
            }
            if to_file.is_none() {
                let mut buf = vec![0u8; chunk];
                self.vm
                    .read_system(bounce, &mut buf)
                    .map_err(PortError::from)?;
                out.extend_from_slice(&buf);
            }
            at += n;
        }
        Ok(out)
    }
}

impl GuestPort for VcpuGuest {
    fn read(&self, file: &dyn GuestMemfd, offset: u64, len: usize) -> Result<Vec<u8>, PortError> {
        self.copy(file, offset, len, None)
    }

    fn write(&self, file: &dyn GuestMemfd, offset: u64, data: &[u8]) -> Result<(), PortError> {
        self.copy(file, offset, data.len(), Some(data)).map(|_| ())
    }

    fn vm(&self) -> Option<&dyn VmPort> {
        Some(self)
    }
}

impl VmPort for VcpuGuest {
    fn guest_read(&self, gpa: u64, len: usize) -> Result<Vec<u8>, PortError> {
        let mut st = self.lock();
        self.copy_at(&mut st, gpa, len, None)
    }

    fn guest_write(&self, gpa: u64, data: &[u8]) -> Result<(), PortError> {
        let mut st = self.lock();
        self.copy_at(&mut st, gpa, data.len(), Some(data))
            .map(|_| ())
    }

    fn convert(&self, gpa: u64, size: u64, to_private: bool, fallocate: bool) -> Result<(), Errno> {
        let req = crate::ConvertRequest {
            gpa: crate::Gpa(gpa),
            size,
            to_private,
        };
        self.vm.convert(req, fallocate)
    }

    fn pre_fault_memory(&self, range: &mut kvm_pre_fault_memory) -> Result<(), Errno> {
        let st = self.lock();
        st.vcpu.pre_fault_memory(&self.vm, range)
    }

    fn bind(
        &self,
        file: &Arc<dyn GuestMemfd>,
        gpa: u64,
        offset: u64,
        size: u64,
    ) -> Result<u32, PortError> {
        let gf = in_place(Arc::clone(file))
            .map_err(|e| PortError::Binding(format!("mapping the file: {e}")))?;
        self.vm
            .bind(crate::Gpa(gpa), &gf, offset, size)
            .map_err(PortError::from)
    }

    fn unbind(&self, slot: u32) -> Result<(), PortError> {
        self.vm.unbind(slot).map_err(PortError::from)
    }

    fn guest_read_u64(&self, gpa: u64) -> Result<VmAccess, PortError> {
        let mut st = self.lock();
        let mut p = GuestProgram::new(0, RequestPath::Port);
        p.load_u64(gpa);
        p.done();
        Ok(match self.run_program(&mut st, p)? {
            Stop::Event(Event::Done) => {
                VmAccess::Value(st.vcpu.regs().map_err(PortError::from)?.rax)
            }
            other => access_of(other),
        })
    }

    fn guest_read_u64_while(
        &self,
        gpa: u64,
        during: &dyn Fn() -> Result<(), PortError>,
        timeout: std::time::Duration,
    ) -> Result<VmAccess, PortError> {
        use std::sync::atomic::Ordering;
        use std::time::{Duration, Instant};
        let mut st = self.lock();
        let mut p = GuestProgram::new(0, RequestPath::Port);
        let top = p.asm().label();
        p.asm().bind(top);
        p.load_u64(gpa);
        p.asm().jmp(top);
        let program = p.finish().map_err(PortError::from)?;
        st.vcpu.load(&self.vm, program).map_err(PortError::from)?;
        crate::vcpu::install_kick_handler();
        self.vm.stop.store(false, Ordering::SeqCst);
        self.vm.timeout_ms.store(
            u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
        let vcpu = &mut st.vcpu;
        let vm = &self.vm;
        let (stop, during_result) = std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            let h = s.spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                let _ = tx.send(unsafe { libc::pthread_self() });
                vcpu.run_until_stop(vm)
            });
            let tid = rx.recv().ok();
            // Let the vCPU enter KVM_RUN and loop on the load; a loop that ended already
            // (the load exited with the memslot still there) is reported as it ended.
            std::thread::sleep(Duration::from_millis(20));
            let during_result = if h.is_finished() { Ok(()) } else { during() };
            let deadline = Instant::now()
                + if during_result.is_ok() {
                    timeout
                } else {
                    Duration::ZERO
                };
            while !h.is_finished() {
                if Instant::now() >= deadline {
                    vm.stop.store(true, Ordering::SeqCst);
                    if let Some(t) = tid {
                        // SAFETY: the thread has not finished and is joined only below, so
                        // its id is valid; the signal has a no-op handler.
                        unsafe { libc::pthread_kill(t, crate::vcpu::kick_signal()) };
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            let stop = h.join().unwrap_or_else(|_| {
                Err(VmError::UnexpectedExit {
                    vcpu: 0,
                    what: "vCPU thread panicked".into(),
                })
            });
            (stop, during_result)
        });
        self.vm.stop.store(false, Ordering::SeqCst);
        during_result?;
        Ok(access_of(stop.map_err(PortError::from)?))
    }
}

/// How a vCPU's access ended, from the stop it caused.
fn access_of(stop: Stop) -> VmAccess {
    match stop {
        Stop::Mmio {
            phys_addr,
            len,
            is_write,
        } => VmAccess::Mmio {
            phys_addr,
            len,
            is_write,
        },
        Stop::MemoryFault { flags, gpa, size } => VmAccess::MemoryFault { flags, gpa, size },
        other => VmAccess::Other(format!("{other:?}")),
    }
}
