//! The guest side: memory layout, page tables, and programs generated at run time.
//!
//! Layout (guest physical = guest virtual, identity-mapped with 2 MiB pages, all with the
//! U bit so that CPL3 code reaches everything):
//!
//! | GPA | what |
//! |---|---|
//! | `0x1000` | PML4 |
//! | `0x2000` | PDPT |
//! | `0x3000` | page directory for system memory (GPA 0..1 GiB) |
//! | `0x4000` | page directory for the data window (GPA 4 GiB..5 GiB) |
//! | `0x10000 + 0x100·i` | vCPU i's mailbox |
//! | `0x100000 + CODE_SIZE·i` | vCPU i's code |
//! | `4 GiB` | gmem data ([`DATA_GPA`]) |
//!
//! Guests run at CPL3 (native speed under PVM) with IOPL 3, and talk to the VMM with `out`:
//! see the `PORT_*` constants. A conversion request stores `gpa`, `npages`, `attrs` and
//! `flags` in the mailbox and writes [`PORT_MAP_GPA_RANGE`]; the VMM answers in the mailbox's
//! `ret` (0 or the negative errno), as it would in `hypercall.ret`.

use crate::asm::{Asm, Cond, Reg};
use crate::{Vm, VmError};
use gmem::uapi::{KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED};

/// First GPA of gmem data.
pub const DATA_GPA: u64 = 1 << 32;
/// Size of the data window the page tables map (one page directory of 2 MiB pages).
pub const MAX_DATA_SIZE: u64 = 1 << 30;
/// Most vCPUs the layout has room for.
pub const MAX_VCPUS: usize = 64;

const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD_SYSTEM: u64 = 0x3000;
const PD_DATA: u64 = 0x4000;
const MAILBOX_BASE: u64 = 0x10000;
const MAILBOX_SIZE: u64 = 0x100;
const CODE_BASE: u64 = 0x10_0000;
/// Room for one vCPU's code.
pub const CODE_SIZE: u64 = 0x4_0000;
const HUGE: u64 = 2 << 20;

/// Sync point: `eax` = the sync id the program chose. The host checks memory and resumes.
pub const PORT_SYNC: u8 = 0xE0;
/// A guest check failed: `eax` = the check id ([`Program::checks`]).
pub const PORT_FAIL: u8 = 0xE1;
/// The program is done.
pub const PORT_DONE: u8 = 0xE2;
/// A bare exit (round-trip measurement): the VMM does nothing.
pub const PORT_NOP: u8 = 0xE3;
/// Conversion request: the mailbox holds `gpa`, `npages`, `attrs` (MAP_GPA_RANGE layout) and
/// `flags` (`REQUEST_FLAG_*`); the answer goes to the mailbox's `ret`.
pub const PORT_MAP_GPA_RANGE: u8 = 0xE4;
/// Punch-hole request: the mailbox holds `gpa` and `npages`; the answer goes to `ret`.
pub const PORT_PUNCH_HOLE: u8 = 0xE5;
/// Switch to CPL0 (the VMM rewrites CS/SS; execution continues at the next instruction).
pub const PORT_ENTER_CPL0: u8 = 0xE6;
/// Switch back to CPL3.
pub const PORT_ENTER_CPL3: u8 = 0xE7;

/// Mailbox field offsets.
pub(crate) const MB_GPA: u64 = 0;
pub(crate) const MB_NPAGES: u64 = 8;
pub(crate) const MB_ATTRS: u64 = 16;
pub(crate) const MB_FLAGS: u64 = 24;
pub(crate) const MB_RET: u64 = 32;

/// Size of system memory for `vcpus` vCPUs.
pub fn system_size(vcpus: usize) -> u64 {
    (CODE_BASE + CODE_SIZE * vcpus as u64).div_ceil(HUGE) * HUGE
}

/// GPA of vCPU `i`'s mailbox.
pub fn mailbox_gpa(i: usize) -> u64 {
    MAILBOX_BASE + MAILBOX_SIZE * i as u64
}

/// GPA of vCPU `i`'s bounce buffer (the upper half of its code area), for copies between
/// the host and gmem memory made by the guest.
pub fn bounce_gpa(i: usize) -> u64 {
    code_gpa(i) + CODE_SIZE / 2
}

/// Size of a bounce buffer.
pub const BOUNCE_SIZE: u64 = CODE_SIZE / 2;

/// GPA of vCPU `i`'s code.
pub fn code_gpa(i: usize) -> u64 {
    CODE_BASE + CODE_SIZE * i as u64
}

/// `pml4`, `pdpt` and two page directories mapping system memory and the data window.
pub(crate) fn write_page_tables(vm: &Vm) -> Result<(), VmError> {
    const P_RW_US: u64 = 0x7;
    const PS: u64 = 0x80;
    vm.write_system_u64(PML4, PDPT | P_RW_US)?;
    vm.write_system_u64(PDPT, PD_SYSTEM | P_RW_US)?;
    vm.write_system_u64(PDPT + 8 * (DATA_GPA >> 30), PD_DATA | P_RW_US)?;
    let sys_pages = system_size(vm.vcpus()) / HUGE;
    for i in 0..sys_pages {
        vm.write_system_u64(PD_SYSTEM + 8 * i, (i * HUGE) | P_RW_US | PS)?;
    }
    for i in 0..MAX_DATA_SIZE / HUGE {
        vm.write_system_u64(PD_DATA + 8 * i, (DATA_GPA + i * HUGE) | P_RW_US | PS)?;
    }
    Ok(())
}

pub(crate) const PML4_GPA: u64 = PML4;

/// How a program asks for conversions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestPath {
    /// `out` to [`PORT_MAP_GPA_RANGE`] with the arguments in the mailbox (works on PVM).
    Port,
    /// `vmcall` with `KVM_HC_MAP_GPA_RANGE` at CPL0 (entered via [`PORT_ENTER_CPL0`]).
    Hypercall,
}

impl RequestPath {
    /// `port` or `hypercall`.
    pub fn name(self) -> &'static str {
        match self {
            RequestPath::Port => "port",
            RequestPath::Hypercall => "hypercall",
        }
    }
}

/// A finished guest program.
#[derive(Debug, Clone)]
pub struct Program {
    /// Machine code, loaded at [`code_gpa`].
    pub code: Vec<u8>,
    /// What each check id verifies (index = id).
    pub checks: Vec<String>,
}

/// Builds a guest program for vCPU `vcpu`: straight-line code, memory loops at CPL3.
#[derive(Debug)]
pub struct GuestProgram {
    asm: Asm,
    vcpu: usize,
    checks: Vec<String>,
    path: RequestPath,
}

fn replicate(byte: u8) -> u64 {
    u64::from(byte) * 0x0101_0101_0101_0101
}

impl GuestProgram {
    /// An empty program for vCPU `vcpu` that asks for conversions through `path`.
    pub fn new(vcpu: usize, path: RequestPath) -> Self {
        GuestProgram {
            asm: Asm::new(),
            vcpu,
            checks: Vec::new(),
            path,
        }
    }

    /// The raw assembler, for custom code.
    pub fn asm(&mut self) -> &mut Asm {
        &mut self.asm
    }

    /// Fills `[gpa, gpa + len)` with `byte` (`rep stosq`; len a multiple of 8).
    pub fn fill(&mut self, gpa: u64, len: u64, byte: u8) {
        let a = &mut self.asm;
        a.mov_imm(Reg::Rdi, gpa);
        a.mov_imm(Reg::Rcx, len / 8);
        a.mov_imm(Reg::Rax, replicate(byte));
        a.rep_stosq();
    }

    fn fail_unless(&mut self, cond_ok: Cond, what: String) {
        let id = self.checks.len() as u64;
        self.checks.push(what);
        let a = &mut self.asm;
        let ok = a.label();
        a.jcc(cond_ok, ok);
        a.mov_imm(Reg::Rax, id);
        a.out_eax(PORT_FAIL);
        a.bind(ok);
    }

    /// Checks that `[gpa, gpa + len)` holds `byte` (`repe scasq`); exits to
    /// [`PORT_FAIL`] otherwise (`rdi` then points past the first differing word).
    pub fn verify(&mut self, gpa: u64, len: u64, byte: u8) {
        let a = &mut self.asm;
        a.mov_imm(Reg::Rdi, gpa);
        a.mov_imm(Reg::Rcx, len / 8);
        a.mov_imm(Reg::Rax, replicate(byte));
        a.repe_scasq();
        self.fail_unless(
            Cond::Equal,
            format!("guest: [{gpa:#x}, +{len:#x}) holds {byte:#04x}"),
        );
    }

    /// Copies `len` bytes from `src` to `dst` (`rep movsb`).
    pub fn copy(&mut self, src: u64, dst: u64, len: u64) {
        let a = &mut self.asm;
        a.mov_imm(Reg::Rsi, src);
        a.mov_imm(Reg::Rdi, dst);
        a.mov_imm(Reg::Rcx, len);
        a.rep_movsb();
    }

    /// Loads the 8 bytes at `gpa` into rax.
    pub fn load_u64(&mut self, gpa: u64) {
        self.asm.mov_imm(Reg::Rdi, gpa);
        self.asm.load(Reg::Rax, Reg::Rdi, 0);
    }

    /// Exits to the host with sync id `id`.
    pub fn sync(&mut self, id: u32) {
        self.asm.mov_imm(Reg::Rax, u64::from(id));
        self.asm.out_eax(PORT_SYNC);
    }

    /// A bare exit.
    pub fn nop(&mut self) {
        self.asm.out_eax(PORT_NOP);
    }

    /// `n` bare exits in a loop.
    pub fn nop_loop(&mut self, n: u64) {
        let a = &mut self.asm;
        a.mov_imm(Reg::Rbx, n);
        let top = a.label();
        a.bind(top);
        a.out_eax(PORT_NOP);
        a.dec(Reg::Rbx);
        a.jcc(Cond::NotEqual, top);
    }

    /// The end.
    pub fn done(&mut self) {
        self.asm.out_eax(PORT_DONE);
        self.asm.hlt();
    }

    /// Requests `MAP_GPA_RANGE(gpa, npages, attrs)` with `flags` (`REQUEST_FLAG_*`, port path
    /// only) and checks the answer equals `expect` (0 or a negative errno).
    pub fn map_gpa_range(&mut self, gpa: u64, npages: u64, attrs: u64, flags: u64, expect: i32) {
        self.emit_request(gpa, npages, attrs, flags);
        self.asm.cmp_rax_imm(expect);
        self.fail_unless(
            Cond::Equal,
            format!("guest: MAP_GPA_RANGE({gpa:#x}, {npages}, {attrs:#x}) answers {expect}"),
        );
    }

    fn emit_request(&mut self, gpa: u64, npages: u64, attrs: u64, flags: u64) {
        let a = &mut self.asm;
        match self.path {
            RequestPath::Port => {
                a.mov_imm(Reg::Rdi, mailbox_gpa(self.vcpu));
                for (off, v) in [
                    (MB_GPA, gpa),
                    (MB_NPAGES, npages),
                    (MB_ATTRS, attrs),
                    (MB_FLAGS, flags),
                ] {
                    a.mov_imm(Reg::Rax, v);
                    // Mailbox offsets are below 128.
                    a.store(Reg::Rdi, off as i8, Reg::Rax);
                }
                a.out_eax(PORT_MAP_GPA_RANGE);
                a.load(Reg::Rax, Reg::Rdi, MB_RET as i8);
            }
            RequestPath::Hypercall => {
                // KVM hypercall ABI: nr in rax, arguments in rbx, rcx, rdx. KVM refuses
                // hypercalls from CPL > 0, so the vmcall alone runs at CPL0.
                a.mov_imm(Reg::Rbx, gpa);
                a.mov_imm(Reg::Rcx, npages);
                a.mov_imm(Reg::Rdx, attrs);
                a.mov_imm(Reg::Rax, KVM_HC_MAP_GPA_RANGE);
                a.out_eax(PORT_ENTER_CPL0);
                a.vmcall();
                a.out_eax(PORT_ENTER_CPL3);
            }
        }
    }

    /// Converts `[gpa, gpa + len)` to private or shared and checks success.
    pub fn convert(&mut self, gpa: u64, len: u64, to_private: bool, flags: u64) {
        let attrs = if to_private {
            KVM_MAP_GPA_RANGE_ENCRYPTED
        } else {
            0
        };
        self.map_gpa_range(gpa, len / gmem::PAGE_SIZE, attrs, flags, 0);
    }

    /// `n` timed 4 KiB conversions of the page at `gpa`, alternating private and shared
    /// (n even leaves it as it was, if it was shared).
    pub fn conversion_loop(&mut self, gpa: u64, n: u64) {
        for i in 0..n {
            let attrs = if i % 2 == 0 {
                KVM_MAP_GPA_RANGE_ENCRYPTED
            } else {
                0
            };
            self.emit_request(gpa, 1, attrs, crate::REQUEST_FLAG_TIMED);
        }
    }

    /// Asks the VMM to punch `[gpa, gpa + len)`; checks success.
    pub fn punch_hole(&mut self, gpa: u64, len: u64) {
        let a = &mut self.asm;
        a.mov_imm(Reg::Rdi, mailbox_gpa(self.vcpu));
        a.mov_imm(Reg::Rax, gpa);
        a.store(Reg::Rdi, MB_GPA as i8, Reg::Rax);
        a.mov_imm(Reg::Rax, len / gmem::PAGE_SIZE);
        a.store(Reg::Rdi, MB_NPAGES as i8, Reg::Rax);
        a.out_eax(PORT_PUNCH_HOLE);
        a.load(Reg::Rax, Reg::Rdi, MB_RET as i8);
        a.cmp_rax_imm(0);
        self.fail_unless(
            Cond::Equal,
            format!("guest: punch hole [{gpa:#x}, +{len:#x}) succeeds"),
        );
    }

    /// Assembles the program.
    pub fn finish(self) -> Result<Program, VmError> {
        let code = self.asm.finish()?;
        if code.len() as u64 > CODE_SIZE {
            return Err(VmError::ProgramTooLarge {
                len: code.len(),
                max: CODE_SIZE as usize,
            });
        }
        Ok(Program {
            code,
            checks: self.checks,
        })
    }
}
