//! The seccomp filter: a profile kept as data (`policies/seccomp/*.toml`, every group with its
//! reason), compiled here into classic BPF, cached per profile digest, and installed as the very
//! last step before the agent runs.
//!
//! Two programs are stacked (the kernel applies the most restrictive answer):
//! 1. the allowlist, laid out as a binary search over syscall numbers (mismatch → EPERM). A
//!    linear list of ~330 calls made the kernel's per-syscall action cache, which emulates the
//!    filter once for every syscall number at install time, cost ≈1.2 ms per launch; the tree
//!    costs a few µs to emulate.
//! 2. the argument checks (clone without namespace flags, no TIOCSTI, socket families,
//!    personality values) plus ENOSYS for `clone3` and for syscalls newer than the profile
//!    knows, so that libc falls back (glibc only falls back from clone3 on ENOSYS). When both
//!    programs return ERRNO the kernel keeps the most recently installed one's value, so this
//!    one goes second.
//!
//! Syscall numbers come from the `syscalls` crate's tables; an unknown name fails compilation
//! (fail closed), so a typo can never silently allow or leave out a call.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use syscalls::Sysno;

/// Errors of profile compilation and installation.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("unknown seccomp profile {0:?}")]
    UnknownProfile(String),
    #[error("seccomp profile {profile:?} is malformed: {source}")]
    Profile {
        profile: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("seccomp profile {profile:?}: {detail}")]
    Compile { profile: String, detail: String },
    #[error("installing the seccomp filter failed: {0}")]
    Install(#[source] io::Error),
    #[error("seccomp is not supported on this architecture ({0})")]
    Arch(&'static str),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    allow: Vec<Group>,
    enosys: Never,
    never: Never,
}

/// How much of an argument a condition compares: the low 32 bits (`dword`, what the kernel
/// truncates an `int` argument to) or all 64.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum ArgType {
    Dword,
    Qword,
}

/// A comparison of one argument with `Cond::val`.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Eq,
    Ne,
    MaskedEq(u64),
}

/// One argument condition of the profile.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Cond {
    pub index: u8,
    #[serde(rename = "type")]
    pub ty: ArgType,
    pub op: Op,
    pub val: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Group {
    #[allow(dead_code)]
    why: String,
    names: Vec<String>,
    /// Allowed when any condition holds.
    #[serde(default)]
    any_of: Vec<Cond>,
    /// Allowed when every condition holds.
    #[serde(default)]
    all_of: Vec<Cond>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Never {
    names: Vec<String>,
}

/// One allow group of a profile, as data for other filter formats (the OCI export).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub names: Vec<String>,
    /// Conditions on the arguments; empty: allowed whatever the arguments.
    pub conds: Vec<Cond>,
    /// true: allowed when any condition holds; false: when all hold.
    pub any: bool,
}

/// A profile's rules, checked exactly as `load` checks them before compiling (every name
/// known, nothing both allowed and never allowed): the one syscall set for every format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    pub allow: Vec<Rule>,
    /// Answered with ENOSYS so that libc falls back (clone3, openat2).
    pub enosys: Vec<String>,
    /// Names the profile promises never to allow.
    pub never: Vec<String>,
}

/// The parsed rules of a built-in profile (see [`Rules`]).
pub fn rules(profile: &str) -> Result<Rules, SeccompError> {
    // The same checks as the BPF compiler: a profile that would not compile is no profile.
    compile(profile)?;
    let p = parse(profile)?;
    Ok(Rules {
        allow: p
            .allow
            .into_iter()
            .map(|g| Rule {
                names: g.names,
                any: !g.any_of.is_empty(),
                conds: if g.any_of.is_empty() {
                    g.all_of
                } else {
                    g.any_of
                },
            })
            .collect(),
        enosys: p.enosys.names,
        never: p.never.names,
    })
}

/// The source text of a built-in profile.
pub fn profile_source(name: &str) -> Result<&'static str, SeccompError> {
    match name {
        "agent" => Ok(include_str!("../../../../../policies/seccomp/agent.toml")),
        _ => Err(SeccompError::UnknownProfile(name.to_string())),
    }
}

/// A compiled filter pair, ready to install.
#[derive(Clone, Debug)]
pub struct Filter {
    pub allowlist: Vec<libc::sock_filter>,
    pub args: Vec<libc::sock_filter>,
    /// sha256 of the profile text, the architecture and the compiler version.
    pub digest: String,
    /// Number of syscalls the allowlist names.
    pub rules: usize,
    /// Whether the programs were read from the (root-only) cache rather than compiled now.
    pub from_cache: bool,
}

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGT_K: u16 = 0x25; // BPF_JMP | BPF_JGT | BPF_K
const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const JA: u16 = 0x05; // BPF_JMP | BPF_JA
const AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

fn ins(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

fn parse(profile: &str) -> Result<ProfileFile, SeccompError> {
    toml::from_str(profile_source(profile)?).map_err(|source| SeccompError::Profile {
        profile: profile.into(),
        source,
    })
}

fn nr(profile: &str, name: &str) -> Result<u32, SeccompError> {
    Sysno::from_str(name)
        .map(|s| s.id() as u32)
        .map_err(|_| SeccompError::Compile {
            profile: profile.into(),
            detail: format!(
                "unknown syscall name {name:?} for {}",
                std::env::consts::ARCH
            ),
        })
}

/// Names the profile allows, and the names it promises never to allow.
pub fn profile_names(profile: &str) -> Result<(BTreeSet<String>, BTreeSet<String>), SeccompError> {
    let p = parse(profile)?;
    let allowed = p
        .allow
        .iter()
        .flat_map(|g| g.names.iter().cloned())
        .collect();
    Ok((allowed, p.never.names.into_iter().collect()))
}

/// Consecutive allowed numbers as inclusive ranges (330 calls make ~60 ranges).
fn ranges(nrs: &[u32]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &x in nrs {
        match out.last_mut() {
            Some((_, hi)) if *hi + 1 == x => *hi = x,
            _ => out.push((x, x)),
        }
    }
    out
}

/// The allowlist as a binary search tree over ranges: internal nodes are `JGE pivot` +
/// `JA right`, leaves test up to 4 ranges then return EPERM or ALLOW (all conditional jumps
/// stay within 8-bit offsets). Fewer instructions make the kernel's per-load work (checking,
/// converting and JIT-compiling the program) cheaper.
fn tree(runs: &[(u32, u32)], out: &mut Vec<libc::sock_filter>) {
    const LEAF: usize = 4;
    if runs.len() <= LEAF {
        let size: usize = runs
            .iter()
            .map(|(lo, hi)| if lo == hi { 1 } else { 2 })
            .sum();
        let allow_at = out.len() + size + 1; // after the tests and the EPERM
        for &(lo, hi) in runs {
            if lo == hi {
                let here = out.len();
                out.push(ins(JEQ_K, (allow_at - here - 1) as u8, 0, lo));
            } else {
                // nr < lo: skip to the next range; lo <= nr <= hi: allow.
                out.push(ins(JGE_K, 0, 1, lo));
                let here = out.len();
                out.push(ins(JGT_K, 0, (allow_at - here - 1) as u8, hi));
            }
        }
        out.push(ins(RET_K, 0, 0, RET_ERRNO | libc::EPERM as u32));
        out.push(ins(RET_K, 0, 0, RET_ALLOW));
        return;
    }
    let mid = runs.len() / 2;
    out.push(ins(JGE_K, 0, 1, runs[mid].0));
    let ja = out.len();
    out.push(ins(JA, 0, 0, 0));
    tree(&runs[..mid], out);
    out[ja].k = (out.len() - ja - 1) as u32;
    tree(&runs[mid..], out);
}

fn arg_offset(index: u8) -> u32 {
    16 + 8 * index as u32
}

/// A condition the compiler cannot express: a 64-bit comparison of an argument's high word.
#[derive(Debug, thiserror::Error)]
#[error("qword conditions on the high word are not supported")]
struct HighWordQword;

/// One syscall's argument check: ALLOW when the conditions hold, else EPERM.
fn arg_block(
    conds: &[Cond],
    any: bool,
    out: &mut Vec<libc::sock_filter>,
) -> Result<(), HighWordQword> {
    let deny = RET_ERRNO | libc::EPERM as u32;
    for c in conds {
        if c.ty == ArgType::Qword
            && (c.val >> 32 != 0 || matches!(c.op, Op::MaskedEq(m) if m >> 32 != 0))
        {
            return Err(HighWordQword);
        }
    }
    for c in conds {
        // The low 32 bits (little endian): a dword argument is what the kernel truncates to,
        // so 0x1_0000_5412 cannot pass for something else than TIOCSTI.
        out.push(ins(LD_W_ABS, 0, 0, arg_offset(c.index)));
        let (test, val) = match c.op {
            Op::MaskedEq(m) => {
                out.push(ins(AND_K, 0, 0, m as u32));
                (true, c.val as u32)
            }
            Op::Eq => (true, c.val as u32),
            Op::Ne => (false, c.val as u32),
        };
        match (any, test) {
            // any_of: first satisfied condition allows.
            (true, true) => {
                out.push(ins(JEQ_K, 0, 1, val));
                out.push(ins(RET_K, 0, 0, RET_ALLOW));
            }
            (true, false) => {
                out.push(ins(JEQ_K, 1, 0, val));
                out.push(ins(RET_K, 0, 0, RET_ALLOW));
            }
            // all_of: first failed condition denies.
            (false, true) => {
                out.push(ins(JEQ_K, 1, 0, val));
                out.push(ins(RET_K, 0, 0, deny));
            }
            (false, false) => {
                out.push(ins(JEQ_K, 0, 1, val));
                out.push(ins(RET_K, 0, 0, deny));
            }
        }
    }
    out.push(ins(RET_K, 0, 0, if any { deny } else { RET_ALLOW }));
    Ok(())
}

fn compile(
    profile: &str,
) -> Result<(Vec<libc::sock_filter>, Vec<libc::sock_filter>, usize), SeccompError> {
    let p = parse(profile)?;
    let err = |detail: String| SeccompError::Compile {
        profile: profile.into(),
        detail,
    };
    let never: BTreeSet<u32> = p
        .never
        .names
        .iter()
        .map(|n| nr(profile, n))
        .collect::<Result<_, _>>()?;
    let mut allowed = BTreeSet::new();
    let mut conditional: BTreeMap<u32, (Vec<Cond>, bool)> = BTreeMap::new();
    for g in &p.allow {
        if !g.any_of.is_empty() && !g.all_of.is_empty() {
            return Err(err(format!(
                "group {:?}: any_of and all_of cannot be combined",
                g.names
            )));
        }
        for n in &g.names {
            let x = nr(profile, n)?;
            if never.contains(&x) {
                return Err(err(format!(
                    "{n:?} is both allowed and listed as never allowed"
                )));
            }
            allowed.insert(x);
            if !g.any_of.is_empty() {
                conditional.insert(x, (g.any_of.clone(), true));
            } else if !g.all_of.is_empty() {
                conditional.insert(x, (g.all_of.clone(), false));
            }
        }
    }
    let nrs: Vec<u32> = allowed.iter().copied().collect();
    let mut a = vec![
        ins(LD_W_ABS, 0, 0, OFF_ARCH),
        ins(JEQ_K, 1, 0, AUDIT_ARCH),
        ins(RET_K, 0, 0, RET_KILL_PROCESS), // another ABI (e.g. int 0x80 on x86_64)
        ins(LD_W_ABS, 0, 0, OFF_NR),
    ];
    tree(&ranges(&nrs), &mut a);

    let newest = Sysno::last().id() as u32;
    let mut b = vec![
        ins(LD_W_ABS, 0, 0, OFF_ARCH),
        ins(JEQ_K, 1, 0, AUDIT_ARCH),
        ins(RET_K, 0, 0, RET_ALLOW), // the allowlist kills it
        ins(LD_W_ABS, 0, 0, OFF_NR),
    ];
    for name in &p.enosys.names {
        let x = nr(profile, name)?;
        if allowed.contains(&x) {
            return Err(err(format!(
                "{name:?} is both allowed and answered with ENOSYS"
            )));
        }
        b.push(ins(JEQ_K, 0, 1, x));
        b.push(ins(RET_K, 0, 0, RET_ERRNO | libc::ENOSYS as u32));
    }
    b.extend([
        ins(JGE_K, 0, 1, X32_SYSCALL_BIT),
        ins(RET_K, 0, 0, RET_ALLOW), // x32 numbers: the allowlist denies them
        ins(JGT_K, 0, 1, newest),
        ins(RET_K, 0, 0, RET_ERRNO | libc::ENOSYS as u32),
    ]);
    // Dispatch: JEQ nr → JA block; blocks follow the final ALLOW.
    let mut patches = Vec::new();
    for &x in conditional.keys() {
        b.push(ins(JEQ_K, 0, 1, x));
        patches.push(b.len());
        b.push(ins(JA, 0, 0, 0));
    }
    b.push(ins(RET_K, 0, 0, RET_ALLOW));
    for ((_, (conds, any)), ja) in conditional.iter().zip(patches) {
        b[ja].k = (b.len() - ja - 1) as u32;
        arg_block(conds, *any, &mut b).map_err(|e| err(e.to_string()))?;
    }
    if a.len() > 4096 || b.len() > 4096 {
        return Err(err(
            "program longer than the kernel's 4096 instructions".into()
        ));
    }
    Ok((a, b, nrs.len()))
}

/// Where compiled filters are cached: root-only (0700, owner checked through the fd at every
/// open, docs/security-model.md "The host side").
pub fn cache_dir() -> PathBuf {
    crate::testhooks::var_os("AITHER_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/aither"))
        .join("seccomp")
}

/// The build id a cache entry is keyed by: a digest of what decides the compiled program
/// other than the profile: this compiler's source, the syscall table it was built with, the
/// architecture and the version. Computed by this binary at each load (≈ 0.1 ms), so a filter
/// cached by another build is never taken for this one's.
fn build_id() -> &'static [u8; 32] {
    static ID: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let mut h = Sha256::new();
        h.update(include_str!("mod.rs").as_bytes());
        for s in Sysno::iter() {
            h.update(s.name().as_bytes());
            h.update(s.id().to_le_bytes());
        }
        h.update(std::env::consts::ARCH.as_bytes());
        h.update(env!("CARGO_PKG_VERSION").as_bytes());
        h.finalize().into()
    })
}

/// The cache directory, opened and checked (root-only), or why it is not used.
fn open_cache(dir: &Path) -> Result<std::os::fd::OwnedFd, crate::hostpath::HostPathError> {
    // Only the launcher (root) reads it: 0700.
    crate::hostpath::owned_cache_dir(dir, 0o700)
}

/// Reads a cache entry through `dir`: a regular file with one link, owned by us, mode 0600 at
/// most; anything else is not read.
fn read_entry(dir: std::os::fd::BorrowedFd<'_>, name: &str) -> Option<Vec<u8>> {
    use std::io::Read;
    let p = Path::new(name);
    let fd = crate::hostpath::open_at_nofollow(
        dir,
        p,
        rustix::fs::OFlags::RDONLY,
        rustix::fs::Mode::empty(),
    )
    .ok()?;
    let m = crate::hostpath::check_fd(std::os::fd::AsFd::as_fd(&fd)).ok()?;
    m.expect_kind(p, crate::hostpath::Kind::File)
        .and_then(|m| m.expect_owner(p, rustix::process::geteuid().as_raw()))
        .and_then(|m| m.expect_mode_within(p, 0o600))
        .ok()?;
    if m.nlink != 1 {
        return None;
    }
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(1 << 20)
        .read_to_end(&mut bytes)
        .ok()?;
    Some(bytes)
}

fn to_bytes(p: &[libc::sock_filter]) -> Vec<u8> {
    let mut v = Vec::with_capacity(p.len() * 8);
    for f in p {
        v.extend_from_slice(&f.code.to_le_bytes());
        v.push(f.jt);
        v.push(f.jf);
        v.extend_from_slice(&f.k.to_le_bytes());
    }
    v
}

fn from_bytes(b: &[u8]) -> Option<Vec<libc::sock_filter>> {
    if !b.len().is_multiple_of(8) || b.is_empty() {
        return None;
    }
    Some(
        b.chunks_exact(8)
            .map(|c| {
                ins(
                    u16::from_le_bytes([c[0], c[1]]),
                    c[2],
                    c[3],
                    u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                )
            })
            .collect(),
    )
}

/// Loads the compiled filter for a profile from the cache, compiling and caching it on a miss.
/// A cache that cannot be written is not an error; a torn or edited entry is recompiled.
pub fn load(profile: &str) -> Result<Filter, SeccompError> {
    load_from(profile, &cache_dir())
}

pub fn load_from(profile: &str, dir: &Path) -> Result<Filter, SeccompError> {
    let src = profile_source(profile)?;
    let mut h = Sha256::new();
    h.update(src.as_bytes());
    h.update(std::env::consts::ARCH.as_bytes());
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(b"ranges-v1");
    let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    // The entry's name: the profile digest and this build's id.
    let mut k = Sha256::new();
    k.update(digest.as_bytes());
    k.update(build_id());
    let key: String = k.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let name = format!("{profile}-{key}.bpf");
    // A cache directory that is not root-only (or cannot be made so) is not used at all: the
    // filter is compiled for this run and not written.
    let cache = open_cache(dir).ok();
    // Layout: rule count (u32 LE), allowlist length in instructions (u32 LE), sha256 of both
    // programs, the allowlist, the argument program.
    if let Some(bytes) = cache
        .as_ref()
        .and_then(|d| read_entry(std::os::fd::AsFd::as_fd(d), &name))
    {
        if bytes.len() > 40 && Sha256::digest(&bytes[40..]).as_slice() == &bytes[8..40] {
            let rules = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            let n1 = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize * 8;
            if let (Some(allowlist), Some(args)) = (
                from_bytes(bytes.get(40..40 + n1).unwrap_or(&[])),
                from_bytes(bytes.get(40 + n1..).unwrap_or(&[])),
            ) {
                return Ok(Filter {
                    allowlist,
                    args,
                    digest,
                    rules,
                    from_cache: true,
                });
            }
        }
    }
    let (allowlist, args, rules) = compile(profile)?;
    let mut progs = to_bytes(&allowlist);
    progs.extend(to_bytes(&args));
    let mut bytes = (rules as u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(&(allowlist.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&Sha256::digest(&progs));
    bytes.extend(progs);
    if let Some(d) = &cache {
        // Written beside and renamed over the name inside the checked directory; a failed
        // write only costs the next run a compile.
        let _ = crate::hostpath::replace_file_at(
            std::os::fd::AsFd::as_fd(d),
            std::ffi::OsStr::new(&name),
            &bytes,
            0o600,
        );
    }
    Ok(Filter {
        allowlist,
        args,
        digest,
        rules,
        from_cache: false,
    })
}

impl Filter {
    /// sha256 of the two programs exactly as [`install`] hands them to the kernel (each
    /// instruction as 8 little-endian bytes, the allowlist then the argument program). The
    /// enforcement report states this, whatever the cache held.
    pub fn program_digest(&self) -> String {
        let mut h = Sha256::new();
        h.update(to_bytes(&self.allowlist));
        h.update(to_bytes(&self.args));
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn install_one(prog: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // Raw: nix has no seccomp(2).
    // SAFETY: `fprog` points at a valid BPF program that lives for the duration of the call;
    // the kernel copies it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    nix::errno::Errno::result(r)?;
    Ok(())
}

/// Installs the filter pair. Requires no_new_privs (set before) since we hold no CAP_SYS_ADMIN.
pub fn install(f: &Filter) -> Result<(), SeccompError> {
    install_one(&f.allowlist).map_err(SeccompError::Install)?;
    install_one(&f.args).map_err(SeccompError::Install)
}

/// The pair's answer for one call, as the kernel would give it: 0 (allowed), an errno, or -1
/// (killed). For the export's tests, which compare the OCI rules with this filter.
#[cfg(test)]
pub(crate) fn tests_decide(f: &Filter, name: &str, args: [u64; 6]) -> i64 {
    let r = tests::decide(f, name, args);
    match r & 0xffff_0000 {
        RET_ALLOW => 0,
        RET_ERRNO => i64::from(r & 0xffff),
        _ => -1,
    }
}

#[cfg(test)]
mod tests;
