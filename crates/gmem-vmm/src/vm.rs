//! The VM: a KVM VM (its own, or the kernel backend's), its system memory, its vCPUs' thread
//! pool, and its counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};

use gmem::error::Errno;
use gmem::kernel::KernelBackend;
use gmem::os::Mmap;
use gmem::uapi::{KVM_CAP_EXIT_HYPERCALL, KVM_HC_MAP_GPA_RANGE};

use crate::convert::VmmPin;
use crate::error::{HypercallExitError, KvmUnavailable};
use crate::memslot::Memslot;
use crate::{guest, vcpu, Vcpu, VmError};

/// Counters of a VM's exits and conversions (all vCPUs).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) exits: AtomicU64,
    pub(crate) to_private: AtomicU64,
    pub(crate) to_shared: AtomicU64,
    pub(crate) pages_converted: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) eagain_retries: AtomicU64,
    pub(crate) pins_dropped: AtomicU64,
    pub(crate) punches: AtomicU64,
}

/// A snapshot of a VM's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmStats {
    /// vCPU exits handled.
    pub exits: u64,
    /// Successful conversions to private (requests, not segments).
    pub conversions_to_private: u64,
    /// Successful conversions to shared.
    pub conversions_to_shared: u64,
    /// Pages whose attributes a successful request covered.
    pub pages_converted: u64,
    /// Requests answered with an error.
    pub requests_rejected: u64,
    /// Conversions retried after EAGAIN.
    pub eagain_retries: u64,
    /// VMM pins dropped to let a conversion through.
    pub pins_dropped: u64,
    /// Punch-hole requests served.
    pub punches: u64,
}

pub(crate) enum VmHandle {
    Own { _kvm: Kvm, vm: VmFd },
    Kernel(KernelBackend),
}

impl VmHandle {
    fn fd(&self) -> &VmFd {
        match self {
            VmHandle::Own { vm, .. } => vm,
            VmHandle::Kernel(b) => b.vm_fd(),
        }
    }
}

/// A KVM VM whose data memory is gmem files.
pub struct Vm {
    pub(crate) handle: VmHandle,
    pub(crate) system: Mmap,
    pub(crate) vcpus: usize,
    pub(crate) slots: RwLock<Vec<Memslot>>,
    pub(crate) pins: Mutex<Vec<VmmPin>>,
    pub(crate) counters: Counters,
    pub(crate) hypercall_exit: Result<(), Errno>,
    pub(crate) stop: std::sync::atomic::AtomicBool,
    pub(crate) timeout_ms: AtomicU64,
    pub(crate) memory_fault_conversion: std::sync::atomic::AtomicBool,
    pub(crate) vcpu_id_base: u64,
    pub(crate) conversion_handler: RwLock<Option<crate::ConversionHandler>>,
    /// Attribute tracking, per-VM private ranges and anonymous memslots.
    pub(crate) vm_attrs: crate::vm_attributes::VmAttributes,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.vcpus)
            .field("system_size", &self.system.len())
            .field("slots", &self.slots.read().map(|s| s.len()).unwrap_or(0))
            .finish()
    }
}

/// Whether `/dev/kvm` opens and makes a VM; `Err` says why not (missing, permission, no VM),
/// as gmem's one probe ([`gmem::host`]) found it for this process.
pub fn kvm_available() -> Result<(), KvmUnavailable> {
    gmem::host::HostFeatures::get().kvm.usable.clone()
}

impl Vm {
    /// Files of the emulated backend bind to it.
    pub fn new(vcpus: usize) -> Result<Vm, VmError> {
        let dev = gmem::host::kvm_device();
        let path = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dev.as_os_str()))
            .map_err(|_| {
                VmError::kvm("open the KVM device")(kvm_ioctls::Error::new(libc::EINVAL))
            })?;
        let kvm = Kvm::new_with_path(path.as_c_str()).map_err(VmError::kvm("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(VmError::kvm("KVM_CREATE_VM(0)"))?;
        Self::with_handle(VmHandle::Own { _kvm: kvm, vm }, vcpus)
    }

    /// A VM on the kernel backend's VM, so that its guest_memfd files can be bound.
    pub fn on_kernel_backend(backend: &KernelBackend, vcpus: usize) -> Result<Vm, VmError> {
        Self::with_handle(VmHandle::Kernel(backend.clone()), vcpus)
    }

    fn with_handle(handle: VmHandle, vcpus: usize) -> Result<Vm, VmError> {
        if vcpus == 0 || vcpus > guest::MAX_VCPUS {
            return Err(VmError::Vcpus {
                vcpus,
                max: guest::MAX_VCPUS,
            });
        }
        let size = guest::system_size(vcpus);
        let system = Mmap::new(
            None,
            0,
            usize::try_from(size).map_err(|_| VmError::Vcpus {
                vcpus,
                max: guest::MAX_VCPUS,
            })?,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        )
        .map_err(|errno| VmError::Kvm {
            op: "mmap of system memory",
            errno,
        })?;
        // Private anonymous memory that KVM maps must not become copy-on-write when the
        // process forks (as QEMU marks guest RAM): otherwise the parent's next write breaks
        // the sharing, the host and the vCPU (through a stale shadow/stage-2 entry) see two
        // different pages, and a bounce buffer or a page table silently loses writes.
        system
            .madvise(0, system.len(), libc::MADV_DONTFORK)
            .map_err(|errno| VmError::Kvm {
                op: "madvise(MADV_DONTFORK) of system memory",
                errno,
            })?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: system.as_ptr() as u64,
        };
        // SAFETY: the region is `system`, owned by the Vm, which deletes its slots before the
        // mapping is dropped (Drop below; fields drop after `drop` runs).
        unsafe { handle.fd().set_user_memory_region(region) }
            .map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION (system memory)"))?;
        let cap = kvm_enable_cap {
            cap: KVM_CAP_EXIT_HYPERCALL,
            args: [1 << KVM_HC_MAP_GPA_RANGE, 0, 0, 0],
            ..Default::default()
        };
        let hypercall_exit = handle.fd().enable_cap(&cap).map_err(|e| Errno(e.errno()));
        // KVM cannot destroy a vCPU before its VM, and the kernel backend's VM outlives this
        // Vm: give each Vm on it fresh vCPU ids.
        let vcpu_id_base = match handle {
            VmHandle::Own { .. } => 0,
            VmHandle::Kernel(_) => {
                static NEXT: AtomicU64 = AtomicU64::new(0);
                NEXT.fetch_add(vcpus as u64, Ordering::Relaxed)
            }
        };
        let vm = Vm {
            handle,
            system,
            vcpus,
            slots: RwLock::new(Vec::new()),
            pins: Mutex::new(Vec::new()),
            counters: Counters::default(),
            hypercall_exit,
            stop: std::sync::atomic::AtomicBool::new(false),
            timeout_ms: AtomicU64::new(0),
            memory_fault_conversion: std::sync::atomic::AtomicBool::new(true),
            vcpu_id_base,
            conversion_handler: RwLock::new(None),
            vm_attrs: Default::default(),
        };
        guest::write_page_tables(&vm)?;
        Ok(vm)
    }

    /// Whether `KVM_CAP_EXIT_HYPERCALL` with `1 << KVM_HC_MAP_GPA_RANGE` was enabled.
    pub fn hypercall_exit_enabled(&self) -> Result<(), Errno> {
        self.hypercall_exit
    }

    /// The number of vCPUs the VM was laid out for.
    pub fn vcpus(&self) -> usize {
        self.vcpus
    }

    /// The KVM vCPU id of vCPU `index`.
    pub(crate) fn vcpu_id(&self, index: usize) -> u64 {
        self.vcpu_id_base + index as u64
    }

    pub(crate) fn vm_fd(&self) -> &VmFd {
        self.handle.fd()
    }

    /// Writes `data` into system memory at guest physical `gpa`.
    pub(crate) fn write_system(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        let off = self.system_range(gpa, data.len())?;
        // The range is inside the system mapping (checked); the guest may run, so volatile
        // byte copies are used.
        self.system
            .write_volatile(off, data)
            .map_err(|e| VmError::Binding {
                gpa,
                size: data.len() as u64,
                offset: 0,
                why: e.to_string(),
            })?;
        Ok(())
    }

    /// Reads system memory at guest physical `gpa` into `buf`.
    pub(crate) fn read_system(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        let off = self.system_range(gpa, buf.len())?;
        // The range is inside the system mapping (checked); volatile because the guest
        // writes it.
        self.system
            .read_volatile(off, buf)
            .map_err(|e| VmError::Binding {
                gpa,
                size: buf.len() as u64,
                offset: 0,
                why: e.to_string(),
            })?;
        Ok(())
    }

    /// Reads a u64 of system memory at guest physical `gpa`.
    pub(crate) fn read_system_u64(&self, gpa: u64) -> Result<u64, VmError> {
        let off = self.system_range(gpa, 8)?;
        // SAFETY: in bounds (checked), 8-aligned by every caller's layout; volatile because
        // the guest writes it.
        Ok(unsafe { self.system.as_ptr().add(off).cast::<u64>().read_volatile() })
    }

    /// Writes a u64 of system memory at guest physical `gpa`.
    pub(crate) fn write_system_u64(&self, gpa: u64, v: u64) -> Result<(), VmError> {
        self.write_system(gpa, &v.to_le_bytes())
    }

    pub(crate) fn system_range(&self, gpa: u64, len: usize) -> Result<usize, VmError> {
        let bad = || VmError::Binding {
            gpa,
            size: len as u64,
            offset: 0,
            why: format!("outside system memory of {:#x} bytes", self.system.len()),
        };
        let off = usize::try_from(gpa).map_err(|_| bad())?;
        match off.checked_add(len) {
            Some(end) if end <= self.system.len() => Ok(off),
            _ => Err(bad()),
        }
    }

    pub(crate) fn count_exit(&self) {
        self.counters.exits.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters so far.
    pub fn stats(&self) -> VmStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VmStats {
            exits: l(&c.exits),
            conversions_to_private: l(&c.to_private),
            conversions_to_shared: l(&c.to_shared),
            pages_converted: l(&c.pages_converted),
            requests_rejected: l(&c.rejected),
            eagain_retries: l(&c.eagain_retries),
            pins_dropped: l(&c.pins_dropped),
            punches: l(&c.punches),
        }
    }

    /// Runs one thread per vCPU, each calling `f` with its vCPU; returns the results in vCPU
    /// order. After `timeout`, vCPUs still running are kicked out of `KVM_RUN` (a signal with
    /// a no-op handler) and their next [`Vcpu::run`] fails with [`VmError::Timeout`].
    pub fn run_vcpus<T, F>(
        &self,
        vcpus: Vec<Vcpu>,
        timeout: Duration,
        f: F,
    ) -> Vec<Result<T, VmError>>
    where
        T: Send,
        F: Fn(&Vm, Vcpu) -> Result<T, VmError> + Sync,
    {
        vcpu::install_kick_handler();
        self.stop.store(false, Ordering::SeqCst);
        self.timeout_ms.store(
            u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
        let deadline = std::time::Instant::now() + timeout;
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            let n = vcpus.len();
            let handles: Vec<_> = vcpus
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    let f = &f;
                    let tx = tx.clone();
                    s.spawn(move || {
                        // SAFETY: pthread_self has no preconditions.
                        let _ = tx.send((i, unsafe { libc::pthread_self() }));
                        drop(tx);
                        f(self, v)
                    })
                })
                .collect();
            drop(tx);
            let mut tids: Vec<(usize, libc::pthread_t)> = rx.iter().take(n).collect();
            tids.sort_by_key(|t| t.0);
            let tids: Vec<libc::pthread_t> = tids.into_iter().map(|t| t.1).collect();
            while handles.iter().any(|h| !h.is_finished()) {
                if std::time::Instant::now() >= deadline {
                    self.stop.store(true, Ordering::SeqCst);
                    for (h, &t) in handles.iter().zip(&tids) {
                        if !h.is_finished() {
                            // SAFETY: the thread is not joined yet (joining happens below),
                            // so its id is valid; the signal has a no-op handler.
                            unsafe { libc::pthread_kill(t, vcpu::kick_signal()) };
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            handles
                .into_iter()
                .enumerate()
                .map(|(i, h)| {
                    h.join().unwrap_or_else(|_| {
                        Err(VmError::UnexpectedExit {
                            vcpu: i,
                            what: "vCPU thread panicked".into(),
                        })
                    })
                })
                .collect()
        })
    }

    /// Whether [`Vm::run_vcpus`] ran out of time.
    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The limit [`Vm::run_vcpus`] was given.
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::SeqCst))
    }

    /// Whether a `KVM_HC_MAP_GPA_RANGE` hypercall issued by the guest at CPL0 reaches
    /// userspace as `KVM_EXIT_HYPERCALL` within `timeout`. `Err` says what happened instead.
    /// On PVM the `vmcall` is emulated and never exits: the vCPU is kicked out with a signal.
    pub fn check_hypercall_exit(timeout: Duration) -> Result<(), HypercallExitError> {
        vcpu::check_hypercall_exit(timeout)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Delete every memslot before the mappings they point at can go (the kernel
        // backend's VM outlives this Vm).
        let slots = self
            .slots
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for s in slots.iter() {
            let region = kvm_userspace_memory_region {
                slot: s.slot,
                flags: 0,
                guest_phys_addr: s.gpa.raw(),
                memory_size: 0,
                userspace_addr: 0,
            };
            // SAFETY: deleting a slot this Vm created; no memory is handed to KVM.
            let _ = unsafe { self.handle.fd().set_user_memory_region(region) };
        }
        self.vm_attrs.delete_all(self.handle.fd());
        let region = kvm_userspace_memory_region {
            slot: 0,
            ..Default::default()
        };
        // SAFETY: as above, for the system memory slot.
        let _ = unsafe { self.handle.fd().set_user_memory_region(region) };
    }
}
