//! The cgroup-v2 device filter: a `BPF_PROG_TYPE_CGROUP_DEVICE` program built by hand from a
//! list of device rules, the way runc and youki emit theirs. Pure: this module only emits the
//! instructions; loading and attaching them is the cgroup layer's ([`super::cgroup`]).
//!
//! The kernel calls the program with a `struct bpf_cgroup_dev_ctx` in `r1`:
//! `{ u32 access_type; u32 major; u32 minor; }`, where the low 16 bits of `access_type` are the
//! device type (1 block, 2 char) and the high 16 bits the access asked for (1 mknod, 2 read,
//! 4 write). The program returns 1 to allow the access and 0 to deny it (EPERM).
//!
//! Layout of the emitted program: a prologue loads type into `r2`, access into `r3`, major into
//! `r4` and minor into `r5`; each rule is one block of compare-and-skip jumps ending in
//! `r0 = action; exit`; the first rule that matches decides; the default action closes it.

use serde::{Deserialize, Serialize};

/// Type of a device node as the device cgroup sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeviceKind {
    Block,
    Char,
}

impl DeviceKind {
    /// `BPF_DEVCG_DEV_*`.
    pub fn bpf_type(self) -> u32 {
        match self {
            DeviceKind::Block => 1,
            DeviceKind::Char => 2,
        }
    }

    /// Letter of the v1 `devices.allow`/`devices.deny` syntax.
    pub fn letter(self) -> char {
        match self {
            DeviceKind::Block => 'b',
            DeviceKind::Char => 'c',
        }
    }
}

/// One device node by number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceNode {
    pub kind: DeviceKind,
    pub major: u32,
    pub minor: u32,
}

impl DeviceNode {
    pub fn char(major: u32, minor: u32) -> Self {
        Self {
            kind: DeviceKind::Char,
            major,
            minor,
        }
    }

    /// The v1 device cgroup line that covers every access to this node (`c 195:1 rwm`).
    pub fn v1_rule(&self) -> String {
        format!("{} {}:{} rwm", self.kind.letter(), self.major, self.minor)
    }
}

/// `BPF_DEVCG_ACC_MKNOD`.
pub const ACC_MKNOD: u32 = 1;
/// `BPF_DEVCG_ACC_READ`.
pub const ACC_READ: u32 = 2;
/// `BPF_DEVCG_ACC_WRITE`.
pub const ACC_WRITE: u32 = 4;
/// Every access (`rwm`).
pub const ACC_ALL: u32 = ACC_MKNOD | ACC_READ | ACC_WRITE;

/// One rule of a device filter. `None` fields match anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRule {
    pub allow: bool,
    pub kind: Option<DeviceKind>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// `ACC_*` bits. An allow rule matches when every access asked for is in it; a deny rule
    /// matches when any access asked for is in it (so denying `w` denies `rw`).
    pub access: u32,
}

impl DeviceRule {
    /// Denies every access to `node`.
    pub fn deny(node: DeviceNode) -> Self {
        Self {
            allow: false,
            kind: Some(node.kind),
            major: Some(node.major),
            minor: Some(node.minor),
            access: ACC_ALL,
        }
    }

    fn is_unconditional(&self) -> bool {
        self.kind.is_none()
            && self.major.is_none()
            && self.minor.is_none()
            && self.access & ACC_ALL == ACC_ALL
    }
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    /// The 8 bytes the kernel reads, in this machine's byte order (`dst_reg` is the low nibble
    /// on little-endian machines, the high one on big-endian machines).
    pub fn to_bytes(self) -> [u8; 8] {
        let regs = if cfg!(target_endian = "little") {
            (self.src << 4) | (self.dst & 0x0f)
        } else {
            (self.dst << 4) | (self.src & 0x0f)
        };
        let off = self.off.to_ne_bytes();
        let imm = self.imm.to_ne_bytes();
        [
            self.code, regs, off[0], off[1], imm[0], imm[1], imm[2], imm[3],
        ]
    }
}

// Opcodes: class | operation | source (see linux/bpf_common.h and linux/bpf.h).
/// `BPF_LDX | BPF_MEM | BPF_W`: `dst = *(u32 *)(src + off)`.
pub const LDX_MEM_W: u8 = 0x61;
/// `BPF_ALU | BPF_AND | BPF_K`: `dst = (u32)(dst & imm)`.
pub const ALU32_AND_K: u8 = 0x54;
/// `BPF_ALU | BPF_RSH | BPF_K`: `dst = (u32)dst >> imm`.
pub const ALU32_RSH_K: u8 = 0x74;
/// `BPF_ALU | BPF_MOV | BPF_X`: `dst = (u32)src`.
pub const ALU32_MOV_X: u8 = 0xbc;
/// `BPF_ALU | BPF_MOV | BPF_K`: `dst = (u32)imm`.
pub const ALU32_MOV_K: u8 = 0xb4;
/// `BPF_JMP | BPF_JNE | BPF_K`: `if dst != imm goto pc + 1 + off`.
pub const JMP_JNE_K: u8 = 0x55;
/// `BPF_JMP | BPF_JEQ | BPF_K`: `if dst == imm goto pc + 1 + off`.
pub const JMP_JEQ_K: u8 = 0x15;
/// `BPF_JMP | BPF_JNE | BPF_X`: `if dst != src goto pc + 1 + off`.
pub const JMP_JNE_X: u8 = 0x5d;
/// `BPF_JMP | BPF_EXIT`.
pub const JMP_EXIT: u8 = 0x95;

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R5: u8 = 5;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        dst,
        src,
        off,
        imm,
    }
}

/// Failure to build a device filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DevBpfError {
    /// A number does not fit the 32-bit signed immediate of an eBPF compare.
    #[error("device rule {index}: {what} {value} does not fit a 32-bit immediate")]
    Immediate {
        index: usize,
        what: &'static str,
        value: u32,
    },
    /// A jump would be farther than a 16-bit offset reaches.
    #[error("device filter too long: {rules} rules")]
    TooLong { rules: usize },
}

fn imm(index: usize, what: &'static str, value: u32) -> Result<i32, DevBpfError> {
    i32::try_from(value).map_err(|_| DevBpfError::Immediate { index, what, value })
}

/// Emits the device filter of `rules` (first match wins) with `default_allow` for accesses no
/// rule matches. Rules after one that matches everything are dropped: the verifier refuses
/// unreachable instructions.
pub fn device_filter(rules: &[DeviceRule], default_allow: bool) -> Result<Vec<Insn>, DevBpfError> {
    let mut p = vec![
        // r2 = type (low 16 bits of access_type)
        insn(LDX_MEM_W, R2, R1, 0, 0),
        insn(ALU32_AND_K, R2, 0, 0, 0xffff),
        // r3 = access (high 16 bits of access_type)
        insn(LDX_MEM_W, R3, R1, 0, 0),
        insn(ALU32_RSH_K, R3, 0, 0, 16),
        // r4 = major, r5 = minor
        insn(LDX_MEM_W, R4, R1, 4, 0),
        insn(LDX_MEM_W, R5, R1, 8, 0),
    ];
    let mut closed = false;
    for (i, rule) in rules.iter().enumerate() {
        if rule.is_unconditional() {
            p.push(insn(ALU32_MOV_K, R0, 0, 0, i32::from(rule.allow)));
            p.push(insn(JMP_EXIT, 0, 0, 0, 0));
            closed = true;
            break;
        }
        // Each compare jumps to the next block when the rule does not match; the offsets are
        // patched once the block's length is known.
        let start = p.len();
        if let Some(k) = rule.kind {
            p.push(insn(JMP_JNE_K, R2, 0, 0, imm(i, "type", k.bpf_type())?));
        }
        let access = rule.access & ACC_ALL;
        if access != ACC_ALL {
            // r1 = access asked & rule access
            p.push(insn(ALU32_MOV_X, R1, R3, 0, 0));
            p.push(insn(ALU32_AND_K, R1, 0, 0, access as i32));
            if rule.allow {
                // allow: every bit asked must be in the rule → skip unless r1 == r3
                p.push(insn(JMP_JNE_X, R1, R3, 0, 0));
            } else {
                // deny: any bit asked in the rule → skip when r1 == 0
                p.push(insn(JMP_JEQ_K, R1, 0, 0, 0));
            }
        }
        if let Some(m) = rule.major {
            p.push(insn(JMP_JNE_K, R4, 0, 0, imm(i, "major", m)?));
        }
        if let Some(m) = rule.minor {
            p.push(insn(JMP_JNE_K, R5, 0, 0, imm(i, "minor", m)?));
        }
        p.push(insn(ALU32_MOV_K, R0, 0, 0, i32::from(rule.allow)));
        p.push(insn(JMP_EXIT, 0, 0, 0, 0));
        let next = p.len();
        for (pc, ins) in p.iter_mut().enumerate().take(next - 2).skip(start) {
            if !matches!(ins.code, JMP_JNE_K | JMP_JEQ_K | JMP_JNE_X) {
                continue;
            }
            let off = next - (pc + 1);
            ins.off =
                i16::try_from(off).map_err(|_| DevBpfError::TooLong { rules: rules.len() })?;
        }
    }
    if !closed {
        p.push(insn(ALU32_MOV_K, R0, 0, 0, i32::from(default_allow)));
        p.push(insn(JMP_EXIT, 0, 0, 0, 0));
    }
    Ok(p)
}

/// The filter berth attaches to a worker's cgroup: every access to `denied` is refused, every
/// other device stays as the parent cgroup allows it.
pub fn deny_filter(denied: &[DeviceNode]) -> Result<Vec<Insn>, DevBpfError> {
    let rules: Vec<DeviceRule> = denied.iter().map(|d| DeviceRule::deny(*d)).collect();
    device_filter(&rules, true)
}

/// The instructions as the byte string `BPF_PROG_LOAD` takes.
pub fn to_bytes(prog: &[Insn]) -> Vec<u8> {
    prog.iter().flat_map(|i| i.to_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny interpreter of exactly the instructions this module emits, so tests can run the
    /// programs against device accesses. It refuses anything else, as a verifier would.
    fn run(prog: &[Insn], kind: DeviceKind, access: u32, major: u32, minor: u32) -> u32 {
        let ctx = [(access << 16) | kind.bpf_type(), major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps < 10_000, "no exit");
            let i = prog.get(pc).copied().expect("pc out of program");
            let (d, s) = (i.dst as usize, i.src as usize);
            let mut next = pc + 1;
            let jump = |cond: bool| {
                if cond {
                    let t = pc as i64 + 1 + i64::from(i.off);
                    assert!(t >= 0 && (t as usize) <= prog.len(), "jump out of program");
                    t as usize
                } else {
                    pc + 1
                }
            };
            if matches!(
                i.code,
                ALU32_AND_K | ALU32_RSH_K | ALU32_MOV_X | ALU32_MOV_K | JMP_EXIT
            ) {
                assert_eq!(i.off, 0, "reserved offset field set at {pc}");
            }
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(s, 1, "loads only from the context");
                    assert!(i.off % 4 == 0 && (0..12).contains(&i.off));
                    r[d] = u64::from(ctx[i.off as usize / 4]);
                }
                ALU32_AND_K => r[d] = u64::from((r[d] as u32) & (i.imm as u32)),
                ALU32_RSH_K => r[d] = u64::from((r[d] as u32) >> i.imm),
                ALU32_MOV_X => r[d] = u64::from(r[s] as u32),
                ALU32_MOV_K => r[d] = u64::from(i.imm as u32),
                JMP_JNE_K => next = jump(r[d] != i.imm as i64 as u64),
                JMP_JEQ_K => next = jump(r[d] == i.imm as i64 as u64),
                JMP_JNE_X => next = jump(r[d] != r[s]),
                JMP_EXIT => return r[0] as u32,
                other => panic!("unexpected opcode {other:#x}"),
            }
            pc = next;
        }
    }

    /// Every instruction is reachable (the verifier refuses dead code) and every jump lands
    /// inside the program.
    fn assert_all_reachable(prog: &[Insn]) {
        let mut seen = vec![false; prog.len()];
        let mut todo = vec![0usize];
        while let Some(pc) = todo.pop() {
            if pc >= prog.len() || seen[pc] {
                assert!(pc < prog.len(), "falls off the end");
                continue;
            }
            seen[pc] = true;
            let i = prog[pc];
            match i.code {
                JMP_EXIT => {}
                JMP_JNE_K | JMP_JEQ_K | JMP_JNE_X => {
                    todo.push(pc + 1);
                    todo.push((pc as i64 + 1 + i64::from(i.off)) as usize);
                }
                _ => todo.push(pc + 1),
            }
        }
        assert!(
            seen.iter().all(|s| *s),
            "unreachable instructions: {seen:?}"
        );
    }

    const PROLOGUE: [Insn; 6] = [
        Insn {
            code: LDX_MEM_W,
            dst: 2,
            src: 1,
            off: 0,
            imm: 0,
        },
        Insn {
            code: ALU32_AND_K,
            dst: 2,
            src: 0,
            off: 0,
            imm: 0xffff,
        },
        Insn {
            code: LDX_MEM_W,
            dst: 3,
            src: 1,
            off: 0,
            imm: 0,
        },
        Insn {
            code: ALU32_RSH_K,
            dst: 3,
            src: 0,
            off: 0,
            imm: 16,
        },
        Insn {
            code: LDX_MEM_W,
            dst: 4,
            src: 1,
            off: 4,
            imm: 0,
        },
        Insn {
            code: LDX_MEM_W,
            dst: 5,
            src: 1,
            off: 8,
            imm: 0,
        },
    ];

    #[test]
    fn deny_one_gpu_is_the_expected_bytecode() {
        let p = deny_filter(&[DeviceNode::char(195, 1)]).unwrap();
        let mut want = PROLOGUE.to_vec();
        want.extend([
            insn(JMP_JNE_K, 2, 0, 4, 2),   // not a char device → default
            insn(JMP_JNE_K, 4, 0, 3, 195), // other major → default
            insn(JMP_JNE_K, 5, 0, 2, 1),   // other minor → default
            insn(ALU32_MOV_K, 0, 0, 0, 0), // deny
            insn(JMP_EXIT, 0, 0, 0, 0),
            insn(ALU32_MOV_K, 0, 0, 0, 1), // default: allow
            insn(JMP_EXIT, 0, 0, 0, 0),
        ]);
        assert_eq!(p, want);
        assert_all_reachable(&p);
    }

    #[test]
    fn bytes_follow_struct_bpf_insn() {
        // r5 != 195 → goto +2, little-endian: code, dst | src << 4, off (le16), imm (le32).
        let b = insn(JMP_JNE_K, 5, 0, 2, 195).to_bytes();
        if cfg!(target_endian = "little") {
            assert_eq!(b, [0x55, 0x05, 2, 0, 195, 0, 0, 0]);
            assert_eq!(insn(LDX_MEM_W, 2, 1, 8, 0).to_bytes()[1], 0x12);
        }
        let p = deny_filter(&[DeviceNode::char(195, 0), DeviceNode::char(195, 3)]).unwrap();
        assert_eq!(to_bytes(&p).len(), p.len() * 8);
    }

    #[test]
    fn empty_deny_list_allows_everything() {
        let p = deny_filter(&[]).unwrap();
        assert_eq!(p.len(), PROLOGUE.len() + 2);
        assert_all_reachable(&p);
        assert_eq!(run(&p, DeviceKind::Char, ACC_READ, 195, 0), 1);
    }

    #[test]
    fn deny_filter_decisions() {
        // A worker holding GPU 1 of four: 0, 2, 3 are denied; the control devices are not.
        let denied = [0, 2, 3].map(|m| DeviceNode::char(195, m));
        let p = deny_filter(&denied).unwrap();
        assert_all_reachable(&p);
        let rw = ACC_READ | ACC_WRITE;
        let cases: &[(DeviceKind, u32, u32, u32, u32)] = &[
            (DeviceKind::Char, rw, 195, 0, 0),
            (DeviceKind::Char, rw, 195, 1, 1),
            (DeviceKind::Char, rw, 195, 2, 0),
            (DeviceKind::Char, ACC_READ, 195, 3, 0),
            (DeviceKind::Char, ACC_MKNOD, 195, 3, 0),
            (DeviceKind::Char, rw, 195, 255, 1), // nvidiactl
            (DeviceKind::Char, rw, 195, 254, 1), // nvidia-modeset
            (DeviceKind::Char, rw, 511, 0, 1),   // nvidia-uvm (dynamic major)
            (DeviceKind::Char, rw, 1, 3, 1),     // /dev/null
            (DeviceKind::Block, rw, 195, 0, 1),  // a block device that happens to be 195:0
        ];
        for &(kind, acc, major, minor, want) in cases {
            assert_eq!(
                run(&p, kind, acc, major, minor),
                want,
                "{kind:?} {major}:{minor} access {acc}"
            );
        }
    }

    #[test]
    fn general_rules_first_match_wins() {
        let rules = [
            // allow reading 195:7
            DeviceRule {
                allow: true,
                kind: Some(DeviceKind::Char),
                major: Some(195),
                minor: Some(7),
                access: ACC_READ,
            },
            // deny writes to any char device of major 195
            DeviceRule {
                allow: false,
                kind: Some(DeviceKind::Char),
                major: Some(195),
                minor: None,
                access: ACC_WRITE,
            },
            // allow block devices of major 8
            DeviceRule {
                allow: true,
                kind: Some(DeviceKind::Block),
                major: Some(8),
                minor: None,
                access: ACC_ALL,
            },
        ];
        let p = device_filter(&rules, false).unwrap();
        assert_all_reachable(&p);
        let c = DeviceKind::Char;
        let cases: &[(DeviceKind, u32, u32, u32, u32)] = &[
            (c, ACC_READ, 195, 7, 1),
            // read+write of 195:7 is not within the allow rule's "r"; the deny rule matches "w"
            (c, ACC_READ | ACC_WRITE, 195, 7, 0),
            (c, ACC_WRITE, 195, 1, 0),
            // reading 195:1 matches no rule: default deny
            (c, ACC_READ, 195, 1, 0),
            (DeviceKind::Block, ACC_READ | ACC_WRITE, 8, 1, 1),
            (DeviceKind::Block, ACC_READ, 9, 1, 0),
        ];
        for &(kind, acc, major, minor, want) in cases {
            assert_eq!(
                run(&p, kind, acc, major, minor),
                want,
                "{kind:?} {major}:{minor} access {acc}"
            );
        }
    }

    #[test]
    fn a_catch_all_rule_ends_the_program() {
        let all = DeviceRule {
            allow: false,
            kind: None,
            major: None,
            minor: None,
            access: ACC_ALL,
        };
        let later = DeviceRule::deny(DeviceNode::char(1, 3));
        let p = device_filter(&[all, later], true).unwrap();
        assert_all_reachable(&p);
        assert_eq!(p.len(), PROLOGUE.len() + 2);
        assert_eq!(run(&p, DeviceKind::Char, ACC_READ, 1, 5), 0);
    }

    #[test]
    fn numbers_beyond_i32_are_refused() {
        let e = deny_filter(&[DeviceNode::char(u32::MAX, 0)]).unwrap_err();
        assert!(
            matches!(e, DevBpfError::Immediate { what: "major", .. }),
            "{e}"
        );
    }

    #[test]
    fn v1_lines() {
        assert_eq!(DeviceNode::char(195, 3).v1_rule(), "c 195:3 rwm");
    }
}
