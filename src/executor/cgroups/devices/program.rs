//! A [`Filter`] assembled into a `BPF_PROG_TYPE_CGROUP_DEVICE` program.
//!
//! The kernel calls the program with a `struct bpf_cgroup_dev_ctx`:
//!
//! ```text
//! offset 0  u32 access_type   BPF_DEVCG_DEV_* (block 1, char 2) in the low 16 bits,
//!                             BPF_DEVCG_ACC_* (mknod 1, read 2, write 4) in the high 16
//! offset 4  u32 major
//! offset 8  u32 minor
//! ```
//!
//! and takes a return value of 1 as allow, 0 as deny. The program is the
//! one runc and crun generate: load the four fields into r2..r5, then one
//! block per exception that jumps to the next block on the first field
//! that does not match and returns the exception's answer otherwise, then
//! the default:
//!
//! ```text
//!     r2 = type; r3 = access; r4 = major; r5 = minor
//! block:
//!     if r2 != TYPE goto next
//!     r1 = r3; r1 &= ACCESS; if r1 != r3 goto next     allow: asked ⊆ ACCESS
//!     r1 = r3; r1 &= ACCESS; if r1 == 0 goto next      deny: asked ∩ ACCESS ≠ ∅
//!     if r4 != MAJOR goto next                         unless the major is *
//!     if r5 != MINOR goto next                         unless the minor is *
//!     r0 = ANSWER; exit
//! next: ...
//!     r0 = DEFAULT; exit
//! ```
//!
//! The access test differs by answer as the v1 kernel's does: an allow
//! exception must cover every access asked for, a deny exception denies if
//! it shares any (runc tests both as allow, so `deny c 1:3 w` lets an
//! `O_RDWR` open through there). A block skips its access test when the
//! exception has all of `rwm`.

use super::{Access, Filter};

/// One instruction, `struct bpf_insn`: opcode, destination and source
/// registers in one byte, a jump offset, an immediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u8,
    /// `dst_reg:4, src_reg:4` as C bitfields lay them out on this machine.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// Registers: r0 the return value, r1 the context on entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    R0 = 0,
    R1 = 1,
    R2 = 2,
    R3 = 3,
    R4 = 4,
    R5 = 5,
}

// Opcode = class | operation | source (uapi linux/bpf_common.h, bpf.h).
const CLASS_LDX: u8 = 0x01;
const CLASS_ALU32: u8 = 0x04;
const CLASS_JMP: u8 = 0x05;
const SIZE_W: u8 = 0x00;
const MODE_MEM: u8 = 0x60;
const SRC_K: u8 = 0x00;
const SRC_X: u8 = 0x08;
const ALU_AND: u8 = 0x50;
const ALU_RSH: u8 = 0x70;
const ALU_MOV: u8 = 0xb0;
const JMP_JEQ: u8 = 0x10;
const JMP_JNE: u8 = 0x50;
const JMP_EXIT: u8 = 0x90;

impl Insn {
    fn new(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> Insn {
        let (dst, src) = (dst as u8, src as u8);
        // C fills bitfields from the least significant bit on little-endian
        // targets and from the most significant on big-endian ones.
        let regs = if cfg!(target_endian = "little") {
            dst | (src << 4)
        } else {
            (dst << 4) | src
        };
        Insn {
            code,
            regs,
            off,
            imm,
        }
    }

    pub fn dst(&self) -> u8 {
        if cfg!(target_endian = "little") {
            self.regs & 0xf
        } else {
            self.regs >> 4
        }
    }

    pub fn src(&self) -> u8 {
        if cfg!(target_endian = "little") {
            self.regs >> 4
        } else {
            self.regs & 0xf
        }
    }
}

/// `dst = *(u32 *)(src + off)`
fn load_word(dst: Reg, src: Reg, off: i16) -> Insn {
    Insn::new(CLASS_LDX | MODE_MEM | SIZE_W, dst, src, off, 0)
}

/// `dst = (u32)dst & imm`
fn and_imm(dst: Reg, imm: i32) -> Insn {
    Insn::new(CLASS_ALU32 | ALU_AND | SRC_K, dst, Reg::R0, 0, imm)
}

/// `dst = (u32)dst >> imm`
fn rsh_imm(dst: Reg, imm: i32) -> Insn {
    Insn::new(CLASS_ALU32 | ALU_RSH | SRC_K, dst, Reg::R0, 0, imm)
}

/// `dst = (u32)src`
fn mov_reg(dst: Reg, src: Reg) -> Insn {
    Insn::new(CLASS_ALU32 | ALU_MOV | SRC_X, dst, src, 0, 0)
}

/// `dst = (u32)imm`
fn mov_imm(dst: Reg, imm: i32) -> Insn {
    Insn::new(CLASS_ALU32 | ALU_MOV | SRC_K, dst, Reg::R0, 0, imm)
}

fn exit() -> Insn {
    Insn::new(CLASS_JMP | JMP_EXIT, Reg::R0, Reg::R0, 0, 0)
}

/// The assembled program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    insns: Vec<Insn>,
}

/// Where the registers hold the context's fields.
const TYPE: Reg = Reg::R2;
const ACCESS: Reg = Reg::R3;
const MAJOR: Reg = Reg::R4;
const MINOR: Reg = Reg::R5;
const SCRATCH: Reg = Reg::R1;

impl Program {
    pub fn build(filter: &Filter) -> Program {
        let mut p = Program {
            insns: vec![
                load_word(TYPE, Reg::R1, 0),
                and_imm(TYPE, 0xffff),
                load_word(ACCESS, Reg::R1, 0),
                rsh_imm(ACCESS, 16),
                load_word(MAJOR, Reg::R1, 4),
                load_word(MINOR, Reg::R1, 8),
            ],
        };
        let answer = i32::from(!filter.default_allow());
        for (device, access) in filter.exceptions() {
            let mut block = Block::default();
            block.jump_unless(
                JMP_JNE,
                SRC_K,
                TYPE,
                Reg::R0,
                bpf_imm(device.node.bpf_type()),
            );
            if access != Access::ALL {
                block.push(mov_reg(SCRATCH, ACCESS));
                block.push(and_imm(SCRATCH, bpf_imm(access.bits())));
                if answer == 1 {
                    block.jump_unless(JMP_JNE, SRC_X, SCRATCH, ACCESS, 0);
                } else {
                    block.jump_unless(JMP_JEQ, SRC_K, SCRATCH, Reg::R0, 0);
                }
            }
            if let Some(major) = device.major {
                block.jump_unless(JMP_JNE, SRC_K, MAJOR, Reg::R0, bpf_imm(major));
            }
            if let Some(minor) = device.minor {
                block.jump_unless(JMP_JNE, SRC_K, MINOR, Reg::R0, bpf_imm(minor));
            }
            block.push(mov_imm(Reg::R0, answer));
            block.push(exit());
            p.insns.extend(block.finish());
        }
        p.insns
            .push(mov_imm(Reg::R0, i32::from(filter.default_allow())));
        p.insns.push(exit());
        p
    }

    pub fn insns(&self) -> &[Insn] {
        &self.insns
    }
}

/// A 64-bit `JNE`/`JEQ` with an immediate compares the zero-extended
/// register with the sign-extended immediate, so a number of 2^31 or more
/// never matches. No device has one (majors have 12 bits, minors 20): a rule
/// naming one stays a rule about no device, which is what it is.
fn bpf_imm(n: u32) -> i32 {
    n as i32
}

/// One exception's instructions; its jumps go to the end of the block.
#[derive(Default)]
struct Block {
    insns: Vec<Insn>,
    jumps: Vec<usize>,
}

impl Block {
    fn push(&mut self, insn: Insn) {
        self.insns.push(insn);
    }

    /// `if !(dst OP src/imm) goto next`: a conditional jump out of the block,
    /// its offset set by [`Block::finish`].
    fn jump_unless(&mut self, op: u8, source: u8, dst: Reg, src: Reg, imm: i32) {
        self.jumps.push(self.insns.len());
        self.insns
            .push(Insn::new(CLASS_JMP | op | source, dst, src, 0, imm));
    }

    fn finish(mut self) -> Vec<Insn> {
        let end = self.insns.len();
        for at in self.jumps {
            // Offsets count from the instruction after the jump.
            self.insns[at].off =
                i16::try_from(end - at - 1).expect("a block has 8 instructions at most");
        }
        self.insns
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::super::{DeviceRule, DeviceType, Node};
    use super::*;

    /// Runs the program the way the kernel would, for the opcodes the
    /// builder emits; panics on anything else, a jump out of the program,
    /// or an exit with r0 unset, which the verifier would refuse.
    pub(crate) fn run(p: &Program, node: Node, major: u32, minor: u32, access: Access) -> bool {
        let ctx = [(access.bits() << 16) | node.bpf_type(), major, minor];
        let mut reg: [Option<u64>; 11] = [None; 11];
        reg[1] = Some(0); // the context's address
        let mut pc = 0usize;
        for _ in 0..=p.insns().len() {
            let i = p.insns()[pc];
            let (dst, src) = (usize::from(i.dst()), usize::from(i.src()));
            let at = pc;
            let get = |r: usize| reg[r].unwrap_or_else(|| panic!("r{r} read before set at {at}"));
            let imm32 = i.imm as u32;
            let imm64 = i64::from(i.imm) as u64;
            pc += 1;
            match i.code {
                0x61 => {
                    assert_eq!((get(src), i.off % 4), (0, 0), "load from the context only");
                    let field = usize::try_from(i.off / 4).expect("offset");
                    reg[dst] = Some(u64::from(ctx[field]));
                }
                0x54 => reg[dst] = Some(u64::from(get(dst) as u32 & imm32)),
                0x74 => reg[dst] = Some(u64::from(get(dst) as u32 >> imm32)),
                0xbc => reg[dst] = Some(u64::from(get(src) as u32)),
                0xb4 => reg[dst] = Some(u64::from(imm32)),
                0x55 | 0x5d | 0x15 => {
                    let other = if i.code == 0x5d { get(src) } else { imm64 };
                    let taken = if i.code == 0x15 {
                        get(dst) == other
                    } else {
                        get(dst) != other
                    };
                    if taken {
                        pc = usize::try_from(pc as i64 + i64::from(i.off)).expect("jump");
                    }
                }
                0x95 => {
                    let r0 = get(0);
                    assert!(r0 <= 1, "return value {r0}");
                    return r0 == 1;
                }
                code => panic!("opcode {code:#x} at {at}"),
            }
            assert!(pc < p.insns().len(), "ran off the end");
        }
        panic!("loop in the program");
    }

    /// `(allow, type, major, minor, access)`
    type RuleSpec<'a> = (bool, DeviceType, Option<u32>, Option<u32>, &'a str);

    fn filter(rules: &[RuleSpec<'_>]) -> Filter {
        let rules: Vec<DeviceRule> = rules
            .iter()
            .map(|&(allow, typ, major, minor, access)| DeviceRule {
                allow,
                typ,
                major,
                minor,
                access: Access::parse(access).expect("access"),
            })
            .collect();
        Filter::from_rules(&rules).expect("filter")
    }

    #[test]
    fn allow_all_and_deny_all_are_two_instructions_after_the_loads() {
        for (allow, r0) in [(true, 1), (false, 0)] {
            let p = Program::build(&filter(&[(allow, DeviceType::All, None, None, "rwm")]));
            assert_eq!(p.insns().len(), 8);
            assert_eq!(p.insns()[6], mov_imm(Reg::R0, r0));
            assert_eq!(p.insns()[7], exit());
        }
    }

    #[test]
    fn encoding_of_the_prologue_and_one_block() {
        // deny all; allow c 1:3 rwm
        let p = Program::build(&filter(&[
            (false, DeviceType::All, None, None, "rwm"),
            (true, DeviceType::Char, Some(1), Some(3), "rwm"),
        ]));
        let raw: Vec<(u8, u8, i16, i32)> = p
            .insns()
            .iter()
            .map(|i| (i.code, i.dst() | (i.src() << 4), i.off, i.imm))
            .collect();
        assert_eq!(
            raw,
            vec![
                (0x61, 0x12, 0, 0),      // r2 = *(u32 *)(r1 + 0)
                (0x54, 0x02, 0, 0xffff), // w2 &= 0xffff
                (0x61, 0x13, 0, 0),      // r3 = *(u32 *)(r1 + 0)
                (0x74, 0x03, 0, 16),     // w3 >>= 16
                (0x61, 0x14, 4, 0),      // r4 = *(u32 *)(r1 + 4)
                (0x61, 0x15, 8, 0),      // r5 = *(u32 *)(r1 + 8)
                (0x55, 0x02, 4, 2),      // if r2 != 2 (char) goto +4
                (0x55, 0x04, 3, 1),      // if r4 != 1 goto +3
                (0x55, 0x05, 2, 3),      // if r5 != 3 goto +2
                (0xb4, 0x00, 0, 1),      // w0 = 1
                (0x95, 0x00, 0, 0),      // exit
                (0xb4, 0x00, 0, 0),      // w0 = 0
                (0x95, 0x00, 0, 0),      // exit
            ]
        );
        if cfg!(target_endian = "little") {
            assert_eq!(p.insns()[0].regs, 0x12, "dst in the low nibble");
        }
    }

    #[test]
    fn wildcards_and_access_subsets_change_the_block() {
        // deny all; allow c 136:* rw — no minor test, an access test.
        let p = Program::build(&filter(&[
            (false, DeviceType::All, None, None, ""),
            (true, DeviceType::Char, Some(136), None, "rw"),
        ]));
        let codes: Vec<u8> = p.insns()[6..].iter().map(|i| i.code).collect();
        assert_eq!(
            codes,
            [0x55, 0xbc, 0x54, 0x5d, 0x55, 0xb4, 0x95, 0xb4, 0x95]
        );
        assert_eq!(p.insns()[8].imm, 6, "rw");
        assert_eq!(p.insns()[9].off, 3);
        // allow all; deny b *:* w — the deny tests for shared access.
        let p = Program::build(&filter(&[
            (true, DeviceType::All, None, None, "rwm"),
            (false, DeviceType::Block, None, None, "w"),
        ]));
        let codes: Vec<u8> = p.insns()[6..].iter().map(|i| i.code).collect();
        assert_eq!(codes, [0x55, 0xbc, 0x54, 0x15, 0xb4, 0x95, 0xb4, 0x95]);
        assert_eq!(p.insns()[6].imm, 1, "block");
        assert_eq!(p.insns()[10].imm, 0, "the exception denies");
        assert_eq!(p.insns()[12].imm, 1, "the default allows");
    }

    #[test]
    fn answers_for_a_container() {
        // containerd's default rules, trimmed.
        let f = filter(&[
            (false, DeviceType::All, None, None, "rwm"),
            (true, DeviceType::Char, None, None, "m"),
            (true, DeviceType::Block, None, None, "m"),
            (true, DeviceType::Char, Some(1), Some(3), "rwm"),
            (true, DeviceType::Char, Some(136), None, "rwm"),
            (true, DeviceType::Char, Some(10), Some(200), "rw"),
        ]);
        let p = Program::build(&f);
        let rw = Access::READ.union(Access::WRITE);
        let cases = [
            (Node::Char, 1, 3, rw, true),            // /dev/null
            (Node::Char, 1, 5, Access::READ, false), // /dev/zero
            (Node::Char, 1, 5, Access::MKNOD, true), // mknod of any char
            (Node::Block, 8, 0, Access::MKNOD, true),
            (Node::Block, 8, 0, Access::READ, false),
            (Node::Char, 136, 7, rw, true), // a pty
            (Node::Block, 136, 7, rw, false),
            (Node::Char, 10, 200, rw, true), // /dev/net/tun
            (Node::Char, 10, 200, Access::MKNOD, true),
            (Node::Char, 10, 201, Access::READ, false),
        ];
        for (node, major, minor, access, want) in cases {
            assert_eq!(
                run(&p, node, major, minor, access),
                want,
                "{node:?} {major}:{minor} {access}"
            );
            assert_eq!(f.allows(node, major, minor, access), want);
        }
    }

    #[test]
    fn a_deny_exception_denies_any_shared_access() {
        let p = Program::build(&filter(&[
            (true, DeviceType::All, None, None, "rwm"),
            (false, DeviceType::Char, Some(1), Some(3), "w"),
        ]));
        let rw = Access::READ.union(Access::WRITE);
        assert!(run(&p, Node::Char, 1, 3, Access::READ));
        assert!(!run(&p, Node::Char, 1, 3, Access::WRITE));
        assert!(!run(&p, Node::Char, 1, 3, rw), "O_RDWR shares w");
        assert!(run(&p, Node::Char, 1, 4, rw));
    }

    #[test]
    fn numbers_past_31_bits_match_no_device() {
        let p = Program::build(&filter(&[
            (true, DeviceType::All, None, None, "rwm"),
            (false, DeviceType::Char, Some(u32::MAX), None, "rwm"),
        ]));
        assert_eq!(p.insns()[7].imm, -1);
        assert!(run(&p, Node::Char, 4095, 0, Access::READ));
    }

    fn rule_strategy() -> impl Strategy<Value = DeviceRule> {
        (
            any::<bool>(),
            prop_oneof![
                1 => Just(DeviceType::All),
                3 => Just(DeviceType::Block),
                4 => Just(DeviceType::Char),
            ],
            prop::option::of(1u32..=3),
            prop::option::of(0u32..=2),
            1u8..=7,
        )
            .prop_map(|(allow, typ, major, minor, bits)| DeviceRule {
                allow,
                typ,
                major,
                minor,
                access: Access(bits),
            })
    }

    proptest! {
        /// For any rules the emulator accepts, the program answers every
        /// request as the v1 kernel would with the emulated state.
        #[test]
        fn program_agrees_with_the_emulated_kernel(rules in prop::collection::vec(rule_strategy(), 0..8)) {
            let Ok(f) = Filter::from_rules(&rules) else {
                return Ok(());
            };
            let p = Program::build(&f);
            for node in [Node::Block, Node::Char] {
                for major in 0..=4 {
                    for minor in 0..=3 {
                        for bits in 1..=7 {
                            let access = Access(bits);
                            prop_assert_eq!(
                                run(&p, node, major, minor, access),
                                f.allows(node, major, minor, access),
                                "{} asked {:?} {}:{} {}", f, node, major, minor, access
                            );
                        }
                    }
                }
            }
        }
    }
}
