//! Device access rules for a sandbox's cgroup: the v1 devices controller's allow list and the
//! same list as a BPF_PROG_TYPE_CGROUP_DEVICE program for cgroup2 (docs/cgroups.md, "Device
//! rules").
//!
//! The program is assembled here (a rule is eight instructions) rather than with aya or
//! libbpf-rs: no toolchain, no object file, nothing to verify but these bytes, and the kernel's
//! verifier checks them at load.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

/// One allowed device (a character device unless `block`), a whole major when `minor` is None.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceRule {
    #[serde(default)]
    pub block: bool,
    pub major: u32,
    pub minor: Option<u32>,
    /// Any of "r", "w", "m" (mknod).
    pub access: String,
}

impl DeviceRule {
    pub fn char(major: u32, minor: u32, access: &str) -> DeviceRule {
        DeviceRule {
            block: false,
            major,
            minor: Some(minor),
            access: access.into(),
        }
    }

    /// The v1 `devices.allow` line: `c 195:0 rw`.
    pub fn v1_line(&self) -> String {
        let minor = self
            .minor
            .map(|m| m.to_string())
            .unwrap_or_else(|| "*".into());
        format!(
            "{} {}:{} {}",
            if self.block { 'b' } else { 'c' },
            self.major,
            minor,
            self.access
        )
    }

    fn access_mask(&self) -> u32 {
        let mut m = 0;
        for c in self.access.chars() {
            m |= match c {
                'm' => BPF_DEVCG_ACC_MKNOD,
                'r' => BPF_DEVCG_ACC_READ,
                'w' => BPF_DEVCG_ACC_WRITE,
                _ => 0,
            };
        }
        m
    }
}

/// What every sandbox's /dev holds (src/sandbox/mounts.rs) and so every device list allows:
/// null, zero, full, random, urandom, tty, the private devpts (ptmx and its pts).
pub fn base_rules() -> Vec<DeviceRule> {
    let mut v: Vec<DeviceRule> = [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2)]
        .into_iter()
        .map(|(ma, mi)| DeviceRule::char(ma, mi, "rw"))
        .collect();
    // Unix98 pty slaves: major 136-143.
    for major in 136..=143 {
        v.push(DeviceRule {
            block: false,
            major,
            minor: None,
            access: "rw".into(),
        });
    }
    v
}

/// A device node granted to a sandbox that is not one (or cannot be read).
#[derive(Debug, thiserror::Error)]
#[error("GPU device node {path}: {source}")]
pub struct NodeError {
    pub path: std::path::PathBuf,
    #[source]
    pub source: io::Error,
}

/// The (major, minor) of a device node.
pub fn node_numbers(path: &std::path::Path) -> io::Result<(bool, u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = std::fs::metadata(path)?;
    let ft = md.file_type();
    if !ft.is_char_device() && !ft.is_block_device() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a character or block device",
        ));
    }
    let rdev = md.rdev();
    Ok((
        ft.is_block_device(),
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    ))
}

// <linux/bpf.h>
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;
const BPF_DEVCG_ACC_MKNOD: u32 = 1;
const BPF_DEVCG_ACC_READ: u32 = 2;
const BPF_DEVCG_ACC_WRITE: u32 = 4;
const BPF_DEVCG_DEV_BLOCK: u32 = 1;
const BPF_DEVCG_DEV_CHAR: u32 = 2;

/// One eBPF instruction (struct bpf_insn).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0xf),
        off,
        imm,
    }
}

const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const AND64_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
const RSH64_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

/// The program: allow (return 1) when a rule matches type, major, minor and covers every access
/// asked; deny (return 0) otherwise. Registers: r2 access, r3 type, r4 major, r5 minor.
pub fn program(rules: &[DeviceRule]) -> Vec<Insn> {
    // struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),
        insn(MOV64_X, 3, 2, 0, 0),
        insn(AND64_K, 3, 0, 0, 0xffff),
        insn(RSH64_K, 2, 0, 0, 16),
        insn(LDX_W, 4, 1, 4, 0),
        insn(LDX_W, 5, 1, 8, 0),
    ];
    for r in rules {
        let mut block: Vec<(u8, u8, i32)> = Vec::new(); // (jne reg, _, imm) checks
        let ty = if r.block {
            BPF_DEVCG_DEV_BLOCK
        } else {
            BPF_DEVCG_DEV_CHAR
        };
        block.push((3, 0, ty as i32));
        block.push((4, 0, r.major as i32));
        if let Some(m) = r.minor {
            block.push((5, 0, m as i32));
        }
        // checks, then: r6 = r2; r6 &= !mask; if r6 != 0 next; r0 = 1; exit
        let len = block.len() + 5;
        for (k, (reg, _, imm)) in block.iter().enumerate() {
            let remaining = (len - k - 1) as i16;
            p.push(insn(JNE_K, *reg, 0, remaining, *imm));
        }
        p.push(insn(MOV64_X, 6, 2, 0, 0));
        p.push(insn(AND64_K, 6, 0, 0, !(r.access_mask() as i32) & 0x7));
        p.push(insn(JNE_K, 6, 0, 2, 0));
        p.push(insn(MOV64_K, 0, 0, 0, 1));
        p.push(insn(EXIT, 0, 0, 0, 0));
    }
    p.push(insn(MOV64_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// Loads the program for `rules` and attaches it to the cgroup2 directory `cgroup`
/// (BPF_F_ALLOW_MULTI: an ancestor's program still runs too; the kernel allows an access only
/// if every attached program does). The program stays attached for the cgroup's life.
pub fn attach(cgroup: &OwnedFd, rules: &[DeviceRule]) -> io::Result<()> {
    let prog_fd = match load(&program(rules), 0) {
        Ok(fd) => fd,
        // Load again with the verifier's log only to explain a failure.
        Err(_) => load(&program(rules), 1)?,
    };
    attach_prog(cgroup, &prog_fd)
}

fn put32(a: &mut [u8; 128], off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes())
}

fn put64(a: &mut [u8; 128], off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes())
}

fn load(prog: &[Insn], log_level: u32) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; if log_level > 0 { 1 << 20 } else { 0 }];
    let mut attr = [0u8; 128];
    // union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, log_level,
    // log_size, log_buf, ..., prog_name at 48.
    put32(&mut attr, 0, BPF_PROG_TYPE_CGROUP_DEVICE);
    put32(&mut attr, 4, prog.len() as u32);
    put64(&mut attr, 8, prog.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    if log_level > 0 {
        put32(&mut attr, 24, log_level);
        put32(&mut attr, 28, log.len() as u32);
        put64(&mut attr, 32, log.as_mut_ptr() as u64);
    }
    attr[48..48 + 12].copy_from_slice(b"aither_devcg");
    // Raw: nix 0.30 and rustix 1 have no bpf.
    // SAFETY: attr is a zeroed bpf_attr with valid pointers to prog, license and log, which
    // outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            attr.as_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        let end = log.iter().position(|b| *b == 0).unwrap_or(0);
        let msg = String::from_utf8_lossy(&log[..end]).trim().to_string();
        return Err(io::Error::new(
            e.kind(),
            format!("BPF_PROG_LOAD (device program): {e}; verifier: {msg}"),
        ));
    }
    // SAFETY: the kernel just returned this new descriptor; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn attach_prog(cgroup: &OwnedFd, prog_fd: &OwnedFd) -> io::Result<()> {
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, cgroup.as_raw_fd() as u32);
    put32(&mut attr, 4, prog_fd.as_raw_fd() as u32);
    put32(&mut attr, 8, BPF_CGROUP_DEVICE);
    put32(&mut attr, 12, BPF_F_ALLOW_MULTI);
    // Raw: nix 0.30 and rustix 1 have no bpf.
    // SAFETY: attr is a zeroed bpf_attr for BPF_PROG_ATTACH with two valid descriptors.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            attr.as_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("BPF_PROG_ATTACH (cgroup device): {e}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program over a context in a tiny interpreter of the instructions it uses, so
    /// the encoding is checked without the kernel.
    fn run(p: &[Insn], ty: u32, acc: u32, major: u32, minor: u32) -> u64 {
        let ctx = [(acc << 16) | ty, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_W => r[dst] = ctx[i.off as usize / 4] as u64,
                MOV64_X => r[dst] = r[src],
                MOV64_K => r[dst] = i.imm as i64 as u64,
                AND64_K => r[dst] &= i.imm as i64 as u64,
                RSH64_K => r[dst] >>= i.imm,
                JNE_K => {
                    if r[dst] != i.imm as i64 as u64 {
                        pc = (pc as i64 + i.off as i64) as usize;
                    }
                }
                EXIT => return r[0],
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn program_allows_exactly_the_rules() {
        let mut rules = base_rules();
        rules.push(DeviceRule::char(195, 0, "rw"));
        let p = program(&rules);
        let c = BPF_DEVCG_DEV_CHAR;
        let rw = BPF_DEVCG_ACC_READ | BPF_DEVCG_ACC_WRITE;
        assert_eq!(run(&p, c, rw, 195, 0), 1);
        assert_eq!(run(&p, c, BPF_DEVCG_ACC_READ, 195, 0), 1);
        assert_eq!(run(&p, c, rw, 195, 1), 0, "another GPU");
        assert_eq!(run(&p, c, BPF_DEVCG_ACC_MKNOD, 195, 0), 0, "mknod");
        assert_eq!(run(&p, BPF_DEVCG_DEV_BLOCK, rw, 195, 0), 0, "block");
        assert_eq!(run(&p, c, rw, 1, 3), 1, "/dev/null");
        assert_eq!(run(&p, c, rw, 136, 7), 1, "a pty");
        assert_eq!(run(&p, c, rw, 10, 229), 0, "/dev/fuse");
        assert_eq!(run(&program(&[]), c, rw, 1, 3), 0, "empty list denies all");
    }

    #[test]
    fn v1_lines() {
        assert_eq!(DeviceRule::char(195, 3, "rw").v1_line(), "c 195:3 rw");
        assert_eq!(base_rules().last().unwrap().v1_line(), "c 143:* rw");
    }
}
