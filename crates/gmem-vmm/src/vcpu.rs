//! vCPUs: long mode at CPL3, the exit loop, and round-trip sampling.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Once};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::error::HypercallExitError;
use crate::guest::{self, Program, PORT_DONE, PORT_ENTER_CPL0, PORT_ENTER_CPL3, PORT_FAIL};
use crate::guest::{PORT_MAP_GPA_RANGE, PORT_NOP, PORT_PUNCH_HOLE, PORT_SYNC};
use crate::{hypercall_ret, Vm, VmError, REQUEST_FLAG_FALLOCATE, REQUEST_FLAG_TIMED};
use gmem::error::Errno;
use gmem::os::PAGE_SIZE;
use gmem::uapi::KVM_HC_MAP_GPA_RANGE;

/// What a vCPU stopped for, when the VMM needs the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The guest reached sync point `id`.
    Sync(u32),
    /// A guest check failed: `id` indexes [`Program::checks`]; `rdi` is where a memory check
    /// stopped.
    Fail {
        /// The check id.
        id: u32,
        /// `rdi` at the failure.
        rdi: u64,
    },
    /// The program ended.
    Done,
}

/// Why [`Vcpu::run_until_stop`] returned: an [`Event`], or an exit the caller observes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// A guest event.
    Event(Event),
    /// An access went to guest physical memory that no memslot backs (`KVM_EXIT_MMIO`);
    /// reads get zeros.
    Mmio {
        /// `mmio.phys_addr`.
        phys_addr: u64,
        /// `mmio.len`.
        len: u32,
        /// `mmio.is_write`.
        is_write: bool,
    },
    /// `KVM_EXIT_MEMORY_FAULT`, reported instead of served when the VM's memory-fault
    /// conversion is off ([`Vm::set_memory_fault_conversion`]).
    MemoryFault {
        /// `memory_fault.flags`.
        flags: u64,
        /// `memory_fault.gpa`.
        gpa: u64,
        /// `memory_fault.size`.
        size: u64,
    },
}

/// Round-trip samples of one vCPU, in nanoseconds.
#[derive(Debug, Clone, Default)]
pub struct VcpuTimings {
    /// Between consecutive bare exits: exit → host → re-enter → next exit.
    pub exit_rt_ns: Vec<u64>,
    /// Between consecutive timed 4 KiB conversion requests: exit → convert → re-enter →
    /// next exit.
    pub conversion_rt_ns: Vec<u64>,
    /// The host's conversion call alone, for timed requests.
    pub conversion_ns: Vec<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Last {
    Other,
    Nop,
    Timed,
}

/// One vCPU, owned by the thread that runs it.
pub struct Vcpu {
    index: usize,
    pub(crate) fd: VcpuFd,
    ring0: kvm_sregs,
    ring3: kvm_sregs,
    program: Program,
    timings: VcpuTimings,
    last: (Instant, Last),
    /// The last `KVM_RUN` returned an exit (I/O, MMIO, hypercall, ...) whose operation KVM
    /// finishes only on the next `KVM_RUN`; [`Vcpu::load`] completes it before it replaces
    /// the program ([`Vcpu::complete_pending_exit`]).
    exit_pending: bool,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("index", &self.index).finish()
    }
}

fn segment(selector: u16, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS: reserved bit 1, IOPL = 3 (so CPL3 code may use `out`), interrupts off.
const RFLAGS: u64 = 0x2 | (3 << 12);

impl Vm {
    /// Creates vCPU `index` running `program` at CPL3 in long mode.
    pub fn create_vcpu(&self, index: usize, program: Program) -> Result<Vcpu, VmError> {
        if index >= self.vcpus() {
            return Err(VmError::Vcpus {
                vcpus: index + 1,
                max: self.vcpus(),
            });
        }
        if program.code.len() as u64 > guest::CODE_SIZE {
            return Err(VmError::ProgramTooLarge {
                len: program.code.len(),
                max: guest::CODE_SIZE as usize,
            });
        }
        self.write_system(guest::code_gpa(index), &program.code)?;
        let fd = self
            .vm_fd()
            .create_vcpu(self.vcpu_id(index))
            .map_err(VmError::kvm("KVM_CREATE_VCPU"))?;
        let mut sregs = fd.get_sregs().map_err(VmError::kvm("KVM_GET_SREGS"))?;
        sregs.cr3 = guest::PML4_GPA;
        sregs.cr4 = CR4_PAE;
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
        sregs.efer = EFER_LME | EFER_LMA;
        let with = |cs: kvm_segment, ss: kvm_segment| {
            let mut s = sregs;
            s.cs = cs;
            s.ss = ss;
            s.ds = ss;
            s.es = ss;
            s.fs = ss;
            s.gs = ss;
            s
        };
        // GDT-less flat segments: index 1/2 for ring 0, 3/4 (RPL 3) for ring 3.
        let ring0 = with(segment(0x08, true, 0), segment(0x10, false, 0));
        let ring3 = with(segment(0x1b, true, 3), segment(0x23, false, 3));
        fd.set_sregs(&ring3)
            .map_err(VmError::kvm("KVM_SET_SREGS"))?;
        let regs = kvm_regs {
            rip: guest::code_gpa(index),
            rflags: RFLAGS,
            rsp: guest::code_gpa(index) + guest::CODE_SIZE,
            ..Default::default()
        };
        fd.set_regs(&regs).map_err(VmError::kvm("KVM_SET_REGS"))?;
        Ok(Vcpu {
            index,
            fd,
            ring0,
            ring3,
            program,
            timings: VcpuTimings::default(),
            last: (Instant::now(), Last::Other),
            exit_pending: false,
        })
    }
}

enum Step {
    Continue,
    Stop(Stop),
}

impl Vcpu {
    /// The vCPU index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The program's check descriptions.
    pub fn checks(&self) -> &[String] {
        &self.program.checks
    }

    /// Samples taken so far.
    pub fn timings(&self) -> &VcpuTimings {
        &self.timings
    }

    /// Replaces the program and restarts the vCPU at its first instruction, at CPL3.
    ///
    /// An exit the previous program stopped at is completed first
    /// ([`Vcpu::complete_pending_exit`]): otherwise KVM would finish it on the next
    /// `KVM_RUN`, over the registers set here.
    pub fn load(&mut self, vm: &Vm, program: Program) -> Result<(), VmError> {
        if program.code.len() as u64 > guest::CODE_SIZE {
            return Err(VmError::ProgramTooLarge {
                len: program.code.len(),
                max: guest::CODE_SIZE as usize,
            });
        }
        self.complete_pending_exit()?;
        vm.write_system(guest::code_gpa(self.index), &program.code)?;
        self.fd
            .set_sregs(&self.ring3)
            .map_err(VmError::kvm("KVM_SET_SREGS"))?;
        let regs = kvm_regs {
            rip: guest::code_gpa(self.index),
            rflags: RFLAGS,
            rsp: guest::code_gpa(self.index) + guest::CODE_SIZE,
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(VmError::kvm("KVM_SET_REGS"))?;
        self.program = program;
        Ok(())
    }

    /// Lets KVM finish the operation of the last exit without running guest code: a
    /// `KVM_RUN` with `immediate_exit` set, as the KVM API asks before the vCPU's state is
    /// changed ("the corresponding operations are complete (and guest state is consistent)
    /// only after userspace has re-entered the kernel with KVM_RUN").
    ///
    /// An MMIO read left pending (a [`Stop::Mmio`] the caller did not resume) is the case
    /// that matters: KVM completes it by finishing the emulated instruction, writing the
    /// emulator's copies of the registers and its next `rip` back over whatever
    /// `KVM_SET_REGS` set since, so the next program would start in the middle of its code
    /// (measured on PVM: a program loaded after such a stop ran no copy at all and came back
    /// with its registers zeroed). Reads are answered with zeros, as in `run_once`.
    pub fn complete_pending_exit(&mut self) -> Result<(), VmError> {
        if !self.exit_pending {
            return Ok(());
        }
        self.fd.set_kvm_immediate_exit(1);
        // Completing one exit may need another (an instruction split across MMIO
        // fragments); a few rounds settle any real case.
        let mut settled = Err(VmError::UnexpectedExit {
            vcpu: self.index,
            what: "the pending exit did not complete with immediate_exit set".into(),
        });
        for _ in 0..16 {
            match self.fd.run() {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    settled = Ok(());
                    break;
                }
                Ok(VcpuExit::MmioRead(_, data)) | Ok(VcpuExit::IoIn(_, data)) => data.fill(0),
                Ok(_) => {}
                Err(e) => {
                    settled = Err(VmError::Kvm {
                        op: "KVM_RUN (immediate_exit, completing the last exit)",
                        errno: Errno(e.errno()),
                    });
                    break;
                }
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        self.exit_pending = settled.is_err();
        settled
    }

    /// `KVM_GET_REGS`.
    pub fn regs(&self) -> Result<kvm_regs, VmError> {
        self.fd.get_regs().map_err(VmError::kvm("KVM_GET_REGS"))
    }

    /// Runs until the guest needs the caller; conversion, punch-hole and CPL-switch requests,
    /// hypercalls and memory faults are served here.
    pub fn run(&mut self, vm: &Vm) -> Result<Event, VmError> {
        match self.run_until_stop(vm)? {
            Stop::Event(e) => Ok(e),
            other => Err(VmError::UnexpectedExit {
                vcpu: self.index,
                what: format!("{other:?}"),
            }),
        }
    }

    /// Runs until a guest event or an MMIO / unserved memory-fault exit.
    pub fn run_until_stop(&mut self, vm: &Vm) -> Result<Stop, VmError> {
        loop {
            match self.run_once(vm)? {
                Step::Continue => {}
                Step::Stop(s) => return Ok(s),
            }
        }
    }

    fn run_once(&mut self, vm: &Vm) -> Result<Step, VmError> {
        let index = self.index;
        let exit = self.fd.run();
        let now = Instant::now();
        // Any exit to userspace may leave an operation for the next KVM_RUN to finish.
        self.exit_pending = exit.is_ok();
        vm.count_exit();
        let mb = guest::mailbox_gpa(index);
        let (port, value) = match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                (port, u32::from_le_bytes(v))
            }
            Ok(VcpuExit::Hypercall(h)) => {
                let ret = if h.nr == KVM_HC_MAP_GPA_RANGE {
                    vm.map_gpa_range(h.args[0], h.args[1], h.args[2], false)
                } else {
                    hypercall_ret(Err(Errno(libc::ENOSYS)))
                };
                *h.ret = ret;
                self.last = (now, Last::Other);
                return Ok(Step::Continue);
            }
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) if !vm.memory_fault_conversion() => {
                self.last = (now, Last::Other);
                return Ok(Step::Stop(Stop::MemoryFault { flags, gpa, size }));
            }
            Ok(VcpuExit::MmioRead(phys_addr, data)) => {
                data.fill(0);
                let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
                self.last = (now, Last::Other);
                // Per-VM tracking: a private GPA without a guest_memfd (vm_attributes.rs).
                if let Some(stop) = vm.vm_attrs.private_fault(phys_addr) {
                    // The MMIO stands for KVM_EXIT_MEMORY_FAULT: complete it now (a failure
                    // leaves it pending, and `load` completes it).
                    let _ = self.complete_pending_exit();
                    return Ok(Step::Stop(stop));
                }
                return Ok(Step::Stop(Stop::Mmio {
                    phys_addr,
                    len,
                    is_write: false,
                }));
            }
            Ok(VcpuExit::MmioWrite(phys_addr, data)) => {
                let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
                self.last = (now, Last::Other);
                if let Some(stop) = vm.vm_attrs.private_fault(phys_addr) {
                    // The MMIO stands for KVM_EXIT_MEMORY_FAULT: complete it now (a failure
                    // leaves it pending, and `load` completes it).
                    let _ = self.complete_pending_exit();
                    return Ok(Step::Stop(stop));
                }
                return Ok(Step::Stop(Stop::Mmio {
                    phys_addr,
                    len,
                    is_write: true,
                }));
            }
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                vm.memory_fault(flags, gpa, size)
                    .map_err(|errno| VmError::UnexpectedExit {
                        vcpu: index,
                        what: format!(
                            "KVM_EXIT_MEMORY_FAULT(flags {flags:#x}, gpa {gpa:#x}, size \
                             {size:#x}) could not be served: {errno}"
                        ),
                    })?;
                self.last = (now, Last::Other);
                return Ok(Step::Continue);
            }
            Ok(other) => {
                let what = format!("unexpected exit {other:?}");
                let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                return Err(VmError::UnexpectedExit {
                    vcpu: index,
                    what: format!("{what} at rip {rip:#x}"),
                });
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                if vm.stopping() {
                    return Err(VmError::Timeout {
                        vcpu: index,
                        timeout: vm.timeout(),
                    });
                }
                return Ok(Step::Continue);
            }
            Err(e) => {
                return Err(VmError::Kvm {
                    op: "KVM_RUN",
                    errno: Errno(e.errno()),
                })
            }
        };
        let Ok(port) = u8::try_from(port) else {
            return Err(VmError::UnexpectedExit {
                vcpu: index,
                what: format!("out to unknown port {port:#x}"),
            });
        };
        let (since, last) = self.last;
        let elapsed = u64::try_from((now - since).as_nanos()).unwrap_or(u64::MAX);
        let mut kind = Last::Other;
        let step = match port {
            PORT_NOP => {
                if last == Last::Nop {
                    self.timings.exit_rt_ns.push(elapsed);
                }
                kind = Last::Nop;
                Step::Continue
            }
            PORT_MAP_GPA_RANGE => {
                let gpa = vm.read_system_u64(mb + guest::MB_GPA)?;
                let npages = vm.read_system_u64(mb + guest::MB_NPAGES)?;
                let attrs = vm.read_system_u64(mb + guest::MB_ATTRS)?;
                let flags = vm.read_system_u64(mb + guest::MB_FLAGS)?;
                let t = Instant::now();
                let ret = vm.map_gpa_range(gpa, npages, attrs, flags & REQUEST_FLAG_FALLOCATE != 0);
                let took = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
                vm.write_system_u64(mb + guest::MB_RET, ret)?;
                if flags & REQUEST_FLAG_TIMED != 0 && npages == 1 {
                    if last == Last::Timed {
                        self.timings.conversion_rt_ns.push(elapsed);
                    }
                    self.timings.conversion_ns.push(took);
                    kind = Last::Timed;
                }
                Step::Continue
            }
            PORT_PUNCH_HOLE => {
                let gpa = vm.read_system_u64(mb + guest::MB_GPA)?;
                let npages = vm.read_system_u64(mb + guest::MB_NPAGES)?;
                let r = npages
                    .checked_mul(PAGE_SIZE)
                    .ok_or(Errno::EINVAL)
                    .and_then(|len| vm.punch_hole(crate::Gpa(gpa), len));
                vm.write_system_u64(mb + guest::MB_RET, hypercall_ret(r))?;
                Step::Continue
            }
            PORT_ENTER_CPL0 => {
                self.fd
                    .set_sregs(&self.ring0)
                    .map_err(VmError::kvm("KVM_SET_SREGS (ring 0)"))?;
                Step::Continue
            }
            PORT_ENTER_CPL3 => {
                self.fd
                    .set_sregs(&self.ring3)
                    .map_err(VmError::kvm("KVM_SET_SREGS (ring 3)"))?;
                Step::Continue
            }
            PORT_SYNC => Step::Stop(Stop::Event(Event::Sync(value))),
            PORT_FAIL => {
                let rdi = self.regs()?.rdi;
                Step::Stop(Stop::Event(Event::Fail { id: value, rdi }))
            }
            PORT_DONE => Step::Stop(Stop::Event(Event::Done)),
            _ => {
                return Err(VmError::UnexpectedExit {
                    vcpu: index,
                    what: format!("out to unknown port {port:#x}"),
                })
            }
        };
        // Stamp after the host's work: the next sample measures re-entry → next exit plus
        // this exit's handling (taken from `now`, the exit time).
        self.last = (now, kind);
        Ok(step)
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN (no-op handler, never SIGBUS).
pub(crate) fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 4
}

extern "C" fn kick_handler(_: libc::c_int) {}

pub(crate) fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs a no-op handler for a real-time signal this module owns; the
        // struct is fully initialised.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = kick_handler as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

pub(crate) fn check_hypercall_exit(timeout: Duration) -> Result<(), HypercallExitError> {
    let vm = Vm::new(1)?;
    vm.hypercall_exit_enabled()
        .map_err(HypercallExitError::NotEnabled)?;
    let mut p = guest::GuestProgram::new(0, guest::RequestPath::Hypercall);
    // A request outside every memslot: the VMM answers -EINVAL, and nothing changes.
    p.map_gpa_range(guest::DATA_GPA, 1, 0, 0, -libc::EINVAL);
    p.done();
    let program = p.finish()?;
    let mut vcpu = vm.create_vcpu(0, program)?;
    install_kick_handler();
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            // SAFETY: pthread_self has no preconditions.
            let _ = tx.send(unsafe { libc::pthread_self() });
            let mut hypercalls = 0u64;
            loop {
                if stop.load(Ordering::SeqCst) {
                    let rip = vcpu.regs().map(|r| r.rip).unwrap_or(0);
                    let code = guest::code_gpa(0);
                    return Err(HypercallExitError::NotDelivered(format!(
                        "the guest's vmcall at CPL0 did not exit to userspace within \
                         {timeout:?} (vCPU stuck at rip {rip:#x}, code starts at {code:#x}; \
                         {hypercalls} KVM_EXIT_HYPERCALL seen). Where CPL0 code is emulated \
                         (PVM), KVM's instruction emulator handles vmcall as a hypercall \
                         instruction to patch and re-execute, never as a hypercall"
                    )));
                }
                let before = vm.stats().exits;
                match vcpu.run_once(&vm) {
                    Ok(Step::Stop(Stop::Event(Event::Done))) => {
                        return if vm.stats().requests_rejected > 0 {
                            Ok(())
                        } else {
                            Err(HypercallExitError::NotDelivered(
                                "the program ended without a hypercall".to_string(),
                            ))
                        }
                    }
                    Ok(Step::Stop(Stop::Event(Event::Fail { .. }))) => {
                        return Err(HypercallExitError::NotDelivered(
                            "the hypercall's answer was not -EINVAL".to_string(),
                        ))
                    }
                    Ok(_) => {
                        if vm.stats().requests_rejected > 0 {
                            hypercalls = 1;
                        }
                        let _ = before;
                    }
                    Err(e) => return Err(HypercallExitError::Vm(e)),
                }
            }
        });
        let tid = rx.recv_timeout(timeout).ok();
        let deadline = Instant::now() + timeout;
        while !h.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !h.is_finished() {
            stop.store(true, Ordering::SeqCst);
            while !h.is_finished() {
                if let Some(t) = tid {
                    // SAFETY: `t` is the live vCPU thread (it has not finished), and the
                    // signal has a no-op handler installed above.
                    unsafe { libc::pthread_kill(t, kick_signal()) };
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        h.join().unwrap_or_else(|_| {
            Err(HypercallExitError::NotDelivered(
                "vCPU thread panicked".to_string(),
            ))
        })
    })
}
