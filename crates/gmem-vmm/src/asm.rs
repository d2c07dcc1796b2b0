//! A tiny x86-64 encoder: exactly the instructions the generated guests use.
//!
//! Guest code is generated at run time (no prebuilt blobs). Jumps are always `rel32` and are
//! resolved when [`Asm::finish`] is called.

/// A general-purpose 64-bit register (the eight legacy ones; no REX.B/R needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Reg {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsp = 4,
    Rbp = 5,
    Rsi = 6,
    Rdi = 7,
}

/// A jump target, created by [`Asm::label`] and placed by [`Asm::bind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label(usize);

/// Condition codes for [`Asm::jcc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    /// ZF = 1 (`je`/`jz`).
    Equal = 0x4,
    /// ZF = 0 (`jne`/`jnz`).
    NotEqual = 0x5,
}

/// Errors from [`Asm::finish`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AsmError {
    /// A jump names a label that was never bound.
    #[error("label {0} is used by a jump but never bound; bind every label before finish()")]
    Unbound(usize),
    /// A jump's displacement does not fit in 32 bits.
    #[error("jump at {at:#x} to {target:#x} does not fit a rel32 displacement")]
    TooFar {
        /// Offset of the jump's displacement.
        at: usize,
        /// Offset of the target.
        target: usize,
    },
}

/// An instruction buffer with labels.
#[derive(Debug, Default, Clone)]
pub struct Asm {
    code: Vec<u8>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label)>,
}

const REX_W: u8 = 0x48;

impl Asm {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes emitted so far.
    pub fn len(&self) -> usize {
        self.code.len()
    }

    /// Whether nothing was emitted.
    pub fn is_empty(&self) -> bool {
        self.code.is_empty()
    }

    /// A new, unbound label.
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Places `l` at the current position.
    pub fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.code.len());
    }

    fn bytes(&mut self, b: &[u8]) {
        self.code.extend_from_slice(b);
    }

    /// `mov r64, imm64` (or the shorter `mov r32, imm32`, zero-extending, when it fits).
    pub fn mov_imm(&mut self, r: Reg, imm: u64) {
        match u32::try_from(imm) {
            Ok(v) => {
                self.bytes(&[0xB8 + r as u8]);
                self.bytes(&v.to_le_bytes());
            }
            Err(_) => {
                self.bytes(&[REX_W, 0xB8 + r as u8]);
                self.bytes(&imm.to_le_bytes());
            }
        }
    }

    /// `mov [base + disp8], src` (64-bit store).
    pub fn store(&mut self, base: Reg, disp: i8, src: Reg) {
        self.mem_op(0x89, base, disp, src);
    }

    /// `mov dst, [base + disp8]` (64-bit load).
    pub fn load(&mut self, dst: Reg, base: Reg, disp: i8) {
        self.mem_op(0x8B, base, disp, dst);
    }

    fn mem_op(&mut self, opcode: u8, base: Reg, disp: i8, reg: Reg) {
        // mod=01 (disp8); rsp as base needs a SIB byte, rbp is fine with mod=01.
        let modrm = 0x40 | ((reg as u8) << 3) | base as u8;
        self.bytes(&[REX_W, opcode, modrm]);
        if base == Reg::Rsp {
            self.bytes(&[0x24]);
        }
        self.bytes(&disp.to_le_bytes());
    }

    /// `cmp rax, imm32` (sign-extended).
    pub fn cmp_rax_imm(&mut self, imm: i32) {
        self.bytes(&[REX_W, 0x3D]);
        self.bytes(&imm.to_le_bytes());
    }

    /// `dec r64`.
    pub fn dec(&mut self, r: Reg) {
        self.bytes(&[REX_W, 0xFF, 0xC8 | r as u8]);
    }

    /// `rep stosq`: stores rax to `[rdi]`, rcx times.
    pub fn rep_stosq(&mut self) {
        self.bytes(&[0xF3, REX_W, 0xAB]);
    }

    /// `rep movsb`: copies rcx bytes from `[rsi]` to `[rdi]`.
    pub fn rep_movsb(&mut self) {
        self.bytes(&[0xF3, 0xA4]);
    }

    /// `repe scasq`: compares rax with `[rdi]` while equal, at most rcx times.
    pub fn repe_scasq(&mut self) {
        self.bytes(&[0xF3, REX_W, 0xAF]);
    }

    /// `out imm8, eax`.
    pub fn out_eax(&mut self, port: u8) {
        self.bytes(&[0xE7, port]);
    }

    /// `vmcall`.
    pub fn vmcall(&mut self) {
        self.bytes(&[0x0F, 0x01, 0xC1]);
    }

    /// `hlt`.
    pub fn hlt(&mut self) {
        self.bytes(&[0xF4]);
    }

    /// `jmp rel32` to `l`.
    pub fn jmp(&mut self, l: Label) {
        self.bytes(&[0xE9]);
        self.rel32(l);
    }

    /// `jcc rel32` to `l`.
    pub fn jcc(&mut self, c: Cond, l: Label) {
        self.bytes(&[0x0F, 0x80 | c as u8]);
        self.rel32(l);
    }

    fn rel32(&mut self, l: Label) {
        self.fixups.push((self.code.len(), l));
        self.bytes(&[0; 4]);
    }

    /// Resolves the jumps and returns the code.
    pub fn finish(mut self) -> Result<Vec<u8>, AsmError> {
        for &(at, l) in &self.fixups {
            let target = self.labels[l.0].ok_or(AsmError::Unbound(l.0))?;
            let rel = i64::try_from(target).unwrap_or(i64::MAX) - (at as i64 + 4);
            let rel = i32::try_from(rel).map_err(|_| AsmError::TooFar { at, target })?;
            self.code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        Ok(self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        let mut a = Asm::new();
        a.mov_imm(Reg::Rcx, 10);
        a.mov_imm(Reg::Rax, 0xaaaa_aaaa_aaaa_aaaa);
        a.store(Reg::Rdi, 8, Reg::Rax);
        a.load(Reg::Rax, Reg::Rdi, 32);
        a.cmp_rax_imm(-22);
        a.dec(Reg::Rbx);
        a.rep_stosq();
        a.repe_scasq();
        a.out_eax(0xe0);
        a.vmcall();
        let l = a.label();
        a.jcc(Cond::NotEqual, l);
        a.bind(l);
        a.jmp(l);
        let code = a.finish().unwrap();
        let want: Vec<u8> = [
            &[0xB9, 10, 0, 0, 0][..],
            &[0x48, 0xB8, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa],
            &[0x48, 0x89, 0x47, 8],
            &[0x48, 0x8B, 0x47, 32],
            &[0x48, 0x3D, 0xEA, 0xFF, 0xFF, 0xFF],
            &[0x48, 0xFF, 0xCB],
            &[0xF3, 0x48, 0xAB],
            &[0xF3, 0x48, 0xAF],
            &[0xE7, 0xE0],
            &[0x0F, 0x01, 0xC1],
            &[0x0F, 0x85, 0, 0, 0, 0],
            &[0xE9, 0xFB, 0xFF, 0xFF, 0xFF],
        ]
        .concat();
        assert_eq!(code, want);
    }

    #[test]
    fn unbound_label_is_an_error() {
        let mut a = Asm::new();
        let l = a.label();
        a.jmp(l);
        assert_eq!(a.finish(), Err(AsmError::Unbound(0)));
    }
}
