//! The compiled programs are run through a small classic-BPF interpreter for every syscall
//! number, so the tree layout and the argument checks are tested as the kernel would run them.

use super::*;

fn run(prog: &[libc::sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&nr.to_le_bytes());
    data[4..8].copy_from_slice(&arch.to_le_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
    }
    let (mut acc, mut pc) = (0u32, 0usize);
    loop {
        let f = prog[pc];
        pc += 1;
        match f.code {
            LD_W_ABS => {
                acc = u32::from_le_bytes(data[f.k as usize..f.k as usize + 4].try_into().unwrap())
            }
            AND_K => acc &= f.k,
            JA => pc += f.k as usize,
            JEQ_K => pc += if acc == f.k { f.jt } else { f.jf } as usize,
            JGT_K => pc += if acc > f.k { f.jt } else { f.jf } as usize,
            JGE_K => pc += if acc >= f.k { f.jt } else { f.jf } as usize,
            RET_K => return f.k,
            c => panic!("unexpected opcode {c:#x}"),
        }
    }
}

/// Both programs, most restrictive wins; for equal actions the later (args) program's value.
pub(super) fn decide(f: &Filter, name: &str, args: [u64; 6]) -> u32 {
    let x = Sysno::from_str(name).unwrap().id() as u32;
    let a = run(&f.allowlist, x, AUDIT_ARCH, args);
    let b = run(&f.args, x, AUDIT_ARCH, args);
    let rank = |r: u32| r & 0xffff_0000;
    if rank(b) == RET_ERRNO && rank(a) == RET_ERRNO {
        b
    } else if (rank(a) as i32) < (rank(b) as i32) || rank(a) == RET_KILL_PROCESS {
        a
    } else {
        b
    }
}

const EPERM: u32 = RET_ERRNO | libc::EPERM as u32;
const ENOSYS: u32 = RET_ERRNO | libc::ENOSYS as u32;

fn agent() -> Filter {
    let dir = tempfile::tempdir().unwrap();
    load_from("agent", dir.path()).unwrap()
}

#[test]
fn every_syscall_number_gets_exactly_the_profiles_answer() {
    let f = agent();
    let (allowed, never) = profile_names("agent").unwrap();
    assert!(f.rules > 250, "{} rules", f.rules);
    assert!(
        f.allowlist.len() < 260,
        "compact program: {} instructions",
        f.allowlist.len()
    );
    for s in Sysno::iter() {
        let name = s.name();
        let want = if name == "clone3" || name == "openat2" {
            ENOSYS
        } else if allowed.contains(name) {
            RET_ALLOW
        } else {
            EPERM
        };
        // Arguments that pass every argument check (clone without flags, socket AF_UNIX...).
        let args = match name {
            "socket" => [1, 1, 0, 0, 0, 0],
            "openat" => [0, 0, 0o102, 0o644, 0, 0],
            "open" | "fchmodat" | "fchmodat2" | "mkdirat" | "mknodat" => [0, 0, 0o755, 0, 0, 0],
            "chmod" | "fchmod" | "creat" | "mkdir" | "mknod" => [0, 0o755, 0, 0, 0, 0],
            "personality" => [0xffff_ffff, 0, 0, 0, 0, 0],
            _ => [0; 6],
        };
        assert_eq!(decide(&f, name, args), want, "{name}");
    }
    for n in &never {
        assert_ne!(
            decide(&f, n, [0; 6]),
            RET_ALLOW,
            "{n} must never be allowed"
        );
    }
}

#[test]
fn argument_checks() {
    let f = agent();
    // clone: plain fork/thread flags pass, any namespace flag is refused.
    assert_eq!(
        decide(
            &f,
            "clone",
            [0x0001_1200 | libc::SIGCHLD as u64, 0, 0, 0, 0, 0]
        ),
        RET_ALLOW
    );
    for ns in [
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWNS,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWCGROUP,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUTS,
        0x80,
    ] {
        assert_eq!(
            decide(&f, "clone", [ns as u32 as u64 | 0x11, 0, 0, 0, 0, 0]),
            EPERM,
            "{ns:#x}"
        );
    }
    // TIOCSTI and TIOCLINUX, also with garbage in the high word, are refused; TCGETS passes.
    assert_eq!(decide(&f, "ioctl", [0, 0x5401, 0, 0, 0, 0]), RET_ALLOW);
    assert_eq!(decide(&f, "ioctl", [0, 0x5412, 0, 0, 0, 0]), EPERM);
    assert_eq!(decide(&f, "ioctl", [0, 0x1_0000_5412, 0, 0, 0, 0]), EPERM);
    assert_eq!(decide(&f, "ioctl", [0, 0x541C, 0, 0, 0, 0]), EPERM);
    // socket: unix, inet, inet6, netlink only; never vsock or packet.
    for fam in [1u64, 2, 10, 16] {
        assert_eq!(
            decide(&f, "socket", [fam, 1, 0, 0, 0, 0]),
            RET_ALLOW,
            "family {fam}"
        );
    }
    for fam in [40u64, 17, 0x1_0000_0002 & 0xffff, 5] {
        if fam == 2 {
            continue;
        }
        assert_eq!(
            decide(&f, "socket", [fam, 1, 0, 0, 0, 0]),
            EPERM,
            "family {fam}"
        );
    }
    assert_eq!(
        decide(&f, "personality", [0x0040_0000, 0, 0, 0, 0, 0]),
        EPERM
    ); // READ_IMPLIES_EXEC
       // Another ABI is killed; newer-than-known numbers get ENOSYS so libc falls back.
    assert_eq!(run(&f.allowlist, 0, 0x4000_0003, [0; 6]), RET_KILL_PROCESS);
    assert_eq!(
        run(&f.args, Sysno::last().id() as u32 + 1, AUDIT_ARCH, [0; 6]),
        ENOSYS
    );
    assert_eq!(
        run(&f.allowlist, X32_SYSCALL_BIT | 1, AUDIT_ARCH, [0; 6]),
        EPERM
    );
}

#[test]
fn the_cache_round_trips_and_survives_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let a = load_from("agent", dir.path()).unwrap();
    let b = load_from("agent", dir.path()).unwrap();
    assert_eq!(to_bytes(&a.allowlist), to_bytes(&b.allowlist));
    assert_eq!(to_bytes(&a.args), to_bytes(&b.args));
    let file = std::fs::read_dir(dir.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0xff; // an edited jump offset
    std::fs::write(&file, &bytes).unwrap();
    let c = load_from("agent", dir.path()).unwrap();
    assert_eq!(to_bytes(&a.args), to_bytes(&c.args));
}

#[test]
fn unknown_profiles_and_names_are_refused() {
    assert!(matches!(
        load("lenient"),
        Err(SeccompError::UnknownProfile(_))
    ));
    assert!(nr("agent", "not_a_syscall").is_err());
}
