//! The workload's guest script: the operations a vCPU performs ([`Op`]), what the host does at
//! each of its syncs ([`HostStep`]), the private_mem_conversions flows written in them
//! ([`script`]), and their compiler to guest programs ([`compile`]).

use gmem::os::PAGE_SIZE;
use gmem::platform::ContentRule;
use gmem_vmm::{GuestProgram, RequestPath, VmError, REQUEST_FLAG_FALLOCATE};

use super::checks::Rules;
use super::{RANGES, WINDOW_SIZE};

const INIT: u8 = 0xaa;
const DEF: u8 = 0xcc;
const P1: u8 = 0x11;
const P2: u8 = 0x22;
const P3: u8 = 0x33;
const P4: u8 = 0x44;
/// A guest operation, compiled to machine code (KVM) or executed by the host (no KVM).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Op {
    Fill(u64, u64, u8),
    Verify(u64, u64, u8),
    Convert {
        gpa: u64,
        len: u64,
        private: bool,
        fallocate: bool,
    },
    Punch(u64, u64),
    Sync(u32),
    NopLoop(u64),
    ConversionLoop(u64, u64),
}

/// What the host does at a sync.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum HostStep {
    Shared {
        gpa: u64,
        len: u64,
        expect: u8,
        write: Option<u8>,
    },
    Private {
        gpa: u64,
    },
    /// What the guest reads of `[gpa, +len)` (through the guest path, i.e. after its guest
    /// fault) must follow `rule` from `before`.
    GuestSees {
        gpa: u64,
        len: u64,
        before: u8,
        rule: ContentRule,
    },
    /// What the host reads of `[gpa, +len)` through its mapping must follow `rule` from
    /// `before`.
    HostSees {
        gpa: u64,
        len: u64,
        before: u8,
        rule: ContentRule,
    },
}

/// One vCPU's guest operations and the host's side of its syncs.
pub(super) struct Script {
    /// The guest's operations, in order.
    pub(super) ops: Vec<Op>,
    /// What the host does at each sync, by sync id.
    pub(super) steps: Vec<HostStep>,
}

impl Script {
    fn sync(&mut self, step: HostStep) {
        self.ops.push(Op::Sync(self.steps.len() as u32));
        self.steps.push(step);
    }
}

/// The PMCT guest flows for the window at `base`, with content checks after each conversion and
/// punch-hole that follow the content rules (to private, to shared) (docs/series.md §2.8): the
/// selftest assumes the software-protected rule (preserved both ways) and writes after each
/// conversion, so these checks are added, and the one check it makes across a transition (a punched
/// private page reads zeros) is made by the host through the guest path where the rule scrambles.
pub(super) fn script(base: u64, samples: u64, rules: Rules) -> Script {
    let Rules {
        to_private,
        to_shared,
        untouched,
    } = rules;
    let mut s = Script {
        ops: Vec::new(),
        steps: Vec::new(),
    };
    for fallocate in [false, true] {
        // guest_test_explicit_conversion
        s.ops.push(Op::Fill(base, WINDOW_SIZE, INIT));
        s.sync(HostStep::Shared {
            gpa: base,
            len: WINDOW_SIZE,
            expect: INIT,
            write: Some(DEF),
        });
        s.ops.push(Op::Verify(base, WINDOW_SIZE, DEF));
        for (off, size) in RANGES {
            let gpa = base + off;
            s.ops.push(Op::Fill(gpa, size, P1));
            s.ops.push(Op::Convert {
                gpa,
                len: size,
                private: true,
                fallocate,
            });
            // The guest's first read after the conversion: the rule of to-private.
            s.sync(HostStep::GuestSees {
                gpa,
                len: size,
                before: P1,
                rule: to_private,
            });
            if size <= PAGE_SIZE {
                s.ops.push(Op::Fill(gpa, size, P2));
                s.sync(HostStep::Private { gpa });
                s.ops.push(Op::Verify(gpa, size, P2));
                if off > 0 {
                    s.ops.push(Op::Verify(base, off, DEF));
                }
                let rest = off + size;
                if rest < WINDOW_SIZE {
                    s.ops.push(Op::Verify(base + rest, WINDOW_SIZE - rest, DEF));
                }
            } else {
                s.ops.push(Op::Fill(gpa, PAGE_SIZE, P2));
                s.sync(HostStep::Private { gpa });
            }
            s.ops.push(Op::Convert {
                gpa,
                len: size,
                private: false,
                fallocate,
            });
            // The host's first read of the page the guest wrote while private: the rule of
            // to-shared, or zeros after the punch that the fallocate variant adds.
            s.sync(HostStep::HostSees {
                gpa,
                len: PAGE_SIZE,
                before: P2,
                rule: if fallocate {
                    ContentRule::Zeroed
                } else {
                    to_shared
                },
            });
            s.ops.push(Op::Fill(gpa, size, P3));
            s.sync(HostStep::Shared {
                gpa,
                len: size,
                expect: P3,
                write: Some(P4),
            });
            s.ops.push(Op::Verify(gpa, size, P4));
            s.ops.push(Op::Punch(base, WINDOW_SIZE));
            s.ops.push(Op::Fill(base, WINDOW_SIZE, DEF));
        }
    }
    for precise in [false, true] {
        // guest_test_punch_hole
        s.ops.push(Op::Convert {
            gpa: base,
            len: WINDOW_SIZE,
            private: true,
            fallocate: false,
        });
        for (off, size) in RANGES {
            let gpa = base + off;
            s.ops.push(Op::Punch(base, WINDOW_SIZE));
            if precise {
                s.ops.push(Op::Fill(gpa, size, DEF));
                s.ops.push(Op::Verify(gpa, size, DEF));
            } else {
                s.ops.push(Op::Fill(base, WINDOW_SIZE, DEF));
                s.ops.push(Op::Verify(base, WINDOW_SIZE, DEF));
            }
            s.ops.push(Op::Punch(gpa, size));
            // A punched private page is a fresh zero page, which the guest sees through the
            // to-private rule (zeros, except under SNP's key).
            if to_private == ContentRule::Scrambled {
                s.sync(HostStep::GuestSees {
                    gpa,
                    len: size,
                    before: 0,
                    rule: to_private,
                });
            } else {
                s.ops.push(Op::Verify(gpa, size, 0));
            }
        }
        s.sync(HostStep::Private { gpa: base });
        s.ops.push(Op::Convert {
            gpa: base,
            len: WINDOW_SIZE,
            private: false,
            fallocate: false,
        });
    }
    // Timing: bare exits, then 4 KiB conversions (an even count: the page ends shared).
    s.ops.push(Op::Fill(base, PAGE_SIZE, DEF));
    s.ops.push(Op::NopLoop(samples + 1));
    s.ops.push(Op::ConversionLoop(base, 2 * (samples / 2 + 1)));
    // Round trips with no access in between leave the page as `untouched` says.
    match untouched {
        ContentRule::Preserved => s.sync(HostStep::Shared {
            gpa: base,
            len: PAGE_SIZE,
            expect: DEF,
            write: None,
        }),
        rule => s.sync(HostStep::HostSees {
            gpa: base,
            len: PAGE_SIZE,
            before: DEF,
            rule,
        }),
    }
    s
}

/// The guest program of vCPU `vcpu` running `ops` (requests through the port).
pub(super) fn compile(vcpu: usize, ops: &[Op]) -> Result<gmem_vmm::Program, VmError> {
    let mut p = GuestProgram::new(vcpu, RequestPath::Port);
    for op in ops {
        match *op {
            Op::Fill(g, l, b) => p.fill(g, l, b),
            Op::Verify(g, l, b) => p.verify(g, l, b),
            Op::Convert {
                gpa,
                len,
                private,
                fallocate,
            } => p.convert(
                gpa,
                len,
                private,
                if fallocate { REQUEST_FLAG_FALLOCATE } else { 0 },
            ),
            Op::Punch(g, l) => p.punch_hole(g, l),
            Op::Sync(id) => p.sync(id),
            Op::NopLoop(n) => p.nop_loop(n),
            Op::ConversionLoop(g, n) => p.conversion_loop(g, n),
        }
    }
    p.done();
    p.finish()
}

/// Bytes the guest verifies when it runs `ops`.
pub(super) fn guest_verified(ops: &[Op]) -> u64 {
    ops.iter()
        .map(|op| match op {
            Op::Verify(_, l, _) => *l,
            _ => 0,
        })
        .sum()
}
