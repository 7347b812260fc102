//! `aither-probe`: the "hostile agent" of the end-to-end suite.
//!
//! Run inside a sandbox as `aither-probe <check> [args]`, it makes ONE attempt with raw system
//! calls and prints exactly one line on stdout:
//!
//! ```text
//! RESULT <check> ok [detail]
//! RESULT <check> err <ERRNO_NAME> [detail]
//! ```
//!
//! and exits 0 either way: the line carries the result, so that a crash (no line) can never be
//! mistaken for a denial. Usage errors print `RESULT <check> usage <message>` and exit 2.
//! `aither-probe list` prints the checks.
//!
//! Raw libc throughout, on purpose (the reason for every libc call below): the probe plays the
//! hostile agent, so each check makes the very system call an attacker's code would, with
//! exactly the arguments given and no wrapper in between (a wrapper may pick another call,
//! check or fix the arguments, or retry), so that the answer seen is the kernel's and the
//! sandbox's alone.

use std::ffi::CString;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

/// The outcome of one attempt: `Ok(detail)` or `Err((errno, detail))`.
type Outcome = Result<String, (i32, String)>;

/// One check: its name, its argument synopsis and the function that makes the attempt.
struct Check {
    name: &'static str,
    args: &'static str,
    run: fn(&[String]) -> Outcome,
}

const CHECKS: &[Check] = &[
    Check {
        name: "read-file",
        args: "PATH",
        run: read_file,
    },
    Check {
        name: "write-file",
        args: "PATH",
        run: write_file,
    },
    Check {
        name: "mkdir",
        args: "PATH",
        run: mkdir,
    },
    Check {
        name: "tcp-connect",
        args: "ADDR:PORT",
        run: tcp_connect,
    },
    Check {
        name: "tcp-bind-loopback",
        args: "",
        run: tcp_bind_loopback,
    },
    Check {
        name: "udp-send",
        args: "ADDR:PORT",
        run: udp_send,
    },
    Check {
        name: "abstract-connect",
        args: "NAME",
        run: abstract_connect,
    },
    Check {
        name: "mount-tmpfs",
        args: "",
        run: mount_tmpfs,
    },
    Check {
        name: "unshare-user",
        args: "",
        run: unshare_user,
    },
    Check {
        name: "unshare-net",
        args: "",
        run: unshare_net,
    },
    Check {
        name: "clone-newuser",
        args: "",
        run: clone_newuser,
    },
    Check {
        name: "clone3",
        args: "",
        run: clone3,
    },
    Check {
        name: "chroot",
        args: "PATH",
        run: chroot,
    },
    Check {
        name: "ptrace-parent",
        args: "",
        run: ptrace_parent,
    },
    Check {
        name: "bpf",
        args: "",
        run: bpf,
    },
    Check {
        name: "keyctl",
        args: "",
        run: keyctl,
    },
    Check {
        name: "keyctl-join",
        args: "",
        run: keyctl_join,
    },
    Check {
        name: "perf-event-open",
        args: "",
        run: perf_event_open,
    },
    Check {
        name: "userfaultfd",
        args: "",
        run: userfaultfd,
    },
    Check {
        name: "open-by-handle-at",
        args: "",
        run: open_by_handle_at,
    },
    Check {
        name: "io-uring-setup",
        args: "",
        run: io_uring_setup,
    },
    Check {
        name: "kill-pid",
        args: "PID SIG",
        run: kill_pid,
    },
    Check {
        name: "core-pattern",
        args: "",
        run: core_pattern,
    },
    Check {
        name: "list-pids",
        args: "",
        run: list_pids,
    },
    Check {
        name: "fork-bomb",
        args: "N",
        run: fork_bomb,
    },
    Check {
        name: "alloc",
        args: "MIB",
        run: alloc,
    },
    Check {
        name: "burn",
        args: "SECONDS",
        run: burn,
    },
    Check {
        name: "burn-threads",
        args: "SECONDS N",
        run: burn_threads,
    },
    Check {
        name: "tiocsti",
        args: "",
        run: tiocsti,
    },
    Check {
        name: "vsock",
        args: "",
        run: vsock,
    },
    Check {
        name: "packet-socket",
        args: "",
        run: packet_socket,
    },
    Check {
        name: "raw-socket",
        args: "",
        run: raw_socket,
    },
    Check {
        name: "setuid-root",
        args: "",
        run: setuid_root,
    },
    Check {
        name: "sethostname",
        args: "",
        run: sethostname,
    },
    Check {
        name: "mknod-dev",
        args: "PATH",
        run: mknod_dev,
    },
    Check {
        name: "chmod-suid",
        args: "PATH",
        run: chmod_suid,
    },
    Check {
        name: "create-suid",
        args: "PATH",
        run: create_suid,
    },
    Check {
        name: "tiocsti-highbits",
        args: "",
        run: tiocsti_highbits,
    },
    Check {
        name: "vsock-highbits",
        args: "",
        run: vsock_highbits,
    },
    Check {
        name: "status",
        args: "",
        run: status,
    },
    // On fd 0 (tests/host_terminal.rs): the window size seen, then TIOCEXCL, TCSETS (raw),
    // TIOCSWINSZ (5x7), TIOCSTI, TIOCSETD to N_NULL, each one's result (also written to
    // ./tty-attack.out, since the terminal discards output afterwards).
    Check {
        name: "tty-attack",
        args: "",
        run: tty_attack,
    },
    // inotify IN_OPEN on PATH for up to SECONDS: `ok` when an open of it is seen.
    Check {
        name: "watch-open",
        args: "PATH SECONDS",
        run: watch_open,
    },
    // The hogs (tests/host_counters.rs): each takes one kernel per-user counter until the
    // kernel refuses or MAX is reached, prints the line, and then holds what it took for
    // SECONDS. Detail: `n=<how many>`.
    Check {
        name: "hog-inotify",
        args: "MAX SECONDS",
        run: hog_inotify,
    },
    Check {
        name: "hog-inotify-watches",
        args: "MAX SECONDS",
        run: hog_inotify_watches,
    },
    Check {
        name: "hog-timers",
        args: "MAX SECONDS",
        run: hog_timers,
    },
    Check {
        name: "hog-mqueue",
        args: "MAX SECONDS",
        run: hog_mqueue,
    },
];

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(name) = argv.first() else {
        usage_and_exit("?", "no check given (try `aither-probe list`)");
    };
    if name == "list" {
        for c in CHECKS {
            println!("{} {}", c.name, c.args);
        }
        return;
    }
    let Some(check) = CHECKS.iter().find(|c| c.name == name) else {
        usage_and_exit(name, "unknown check (try `aither-probe list`)");
    };
    let args = &argv[1..];
    let want = check.args.split_whitespace().count();
    if args.len() != want {
        usage_and_exit(name, &format!("expects {want} argument(s): {}", check.args));
    }
    let line = match (check.run)(args) {
        Ok(d) if d.is_empty() => format!("RESULT {name} ok"),
        Ok(d) => format!("RESULT {name} ok {d}"),
        Err((e, d)) if d.is_empty() => format!("RESULT {name} err {}", errno_name(e)),
        Err((e, d)) => format!("RESULT {name} err {} {d}", errno_name(e)),
    };
    let mut out = std::io::stdout().lock();
    // Nothing useful can be done if stdout is gone; the missing line is the signal.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    drop(out);
    if name.starts_with("hog-") {
        // Hold what was taken (nothing is released before exit).
        std::thread::sleep(Duration::from_secs(parse(&args[1], "SECONDS")));
    }
}

fn usage_and_exit(name: &str, msg: &str) -> ! {
    println!("RESULT {name} usage {msg}");
    std::process::exit(2);
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// The calling thread's errno.
fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `Err` with the current errno and no detail.
fn fail<T>() -> Result<T, (i32, String)> {
    Err((errno(), String::new()))
}

/// Turns a `-1`-on-error return value into a `Result`, capturing errno.
fn check(ret: libc::c_long) -> Result<libc::c_long, (i32, String)> {
    if ret < 0 {
        fail()
    } else {
        Ok(ret)
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_else(|_| usage_and_exit("?", "argument contains a NUL byte"))
}

fn parse<T: std::str::FromStr>(s: &str, what: &str) -> T {
    s.parse()
        .unwrap_or_else(|_| usage_and_exit("?", &format!("cannot parse {what} {s:?}")))
}

fn close(fd: libc::c_long) {
    // SAFETY: fd is a descriptor this process opened and owns; closing it twice is never done.
    unsafe { libc::close(fd as libc::c_int) };
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = a.port().to_be();
    sa.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    sa
}

fn socket(
    domain: libc::c_int,
    ty: libc::c_int,
    proto: libc::c_int,
) -> Result<libc::c_long, (i32, String)> {
    // SAFETY: socket(2) takes no pointers.
    check(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) } as libc::c_long)
}

/// Waits for a child and returns its raw wait status.
fn reap(pid: libc::pid_t) -> libc::c_int {
    let mut st = 0;
    // SAFETY: st is a valid out-pointer for the duration of the call.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    st
}

/// After a raw clone/fork-like call: in the child, exit at once; in the parent, reap the child.
fn finish_clone(ret: libc::c_long) -> Outcome {
    let pid = check(ret)?;
    if pid == 0 {
        // SAFETY: _exit is async-signal-safe and never returns; the child must not run Rust
        // code of the parent (locks may be held after a raw clone).
        unsafe { libc::_exit(0) };
    }
    reap(pid as libc::pid_t);
    Ok(String::new())
}

// ---------------------------------------------------------------------------------------------
// Files

fn read_file(a: &[String]) -> Outcome {
    let p = cstr(&a[0]);
    // SAFETY: p is a valid NUL-terminated path.
    let fd =
        check(unsafe { libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) } as libc::c_long)?;
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for buf.len() bytes of writes.
    let n = unsafe { libc::read(fd as libc::c_int, buf.as_mut_ptr().cast(), buf.len()) };
    let r = if n < 0 { fail() } else { Ok(String::new()) };
    close(fd);
    r
}

fn write_file(a: &[String]) -> Outcome {
    let p = cstr(&a[0]);
    // SAFETY: p is a valid NUL-terminated path.
    let fd = check(unsafe {
        libc::open(
            p.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
            0o644,
        )
    } as libc::c_long)?;
    let data = b"written by aither-probe\n";
    // SAFETY: data is valid for data.len() bytes of reads.
    let n = unsafe { libc::write(fd as libc::c_int, data.as_ptr().cast(), data.len()) };
    let r = if n < 0 { fail() } else { Ok(String::new()) };
    close(fd);
    r
}

fn mkdir(a: &[String]) -> Outcome {
    let p = cstr(&a[0]);
    // SAFETY: p is a valid NUL-terminated path.
    check(unsafe { libc::mkdir(p.as_ptr(), 0o755) } as libc::c_long)?;
    Ok(String::new())
}

fn core_pattern(_: &[String]) -> Outcome {
    let p = cstr("/proc/sys/kernel/core_pattern");
    // SAFETY: p is a valid NUL-terminated path.
    let fd =
        check(unsafe { libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) } as libc::c_long)?;
    // Harmless even if it got through: it names the default pattern.
    let data = b"core\n";
    // SAFETY: data is valid for data.len() bytes of reads.
    let n = unsafe { libc::write(fd as libc::c_int, data.as_ptr().cast(), data.len()) };
    let r = if n < 0 { fail() } else { Ok(String::new()) };
    close(fd);
    r
}

fn mknod_dev(a: &[String]) -> Outcome {
    let p = cstr(&a[0]);
    // A character device with the numbers of /dev/mem (1, 1).
    // SAFETY: p is a valid NUL-terminated path.
    let r = unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 1)) };
    check(r as libc::c_long)?;
    Ok(String::new())
}

/// Creates PATH (an executable script) if needed, then the attempt: chmod 06755 (set-user-ID
/// and set-group-ID). The test looks at the mode the host sees.
fn chmod_suid(a: &[String]) -> Outcome {
    let p = cstr(&a[0]);
    // SAFETY: p is a valid NUL-terminated path.
    let fd = unsafe {
        libc::open(
            p.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC,
            0o755,
        )
    };
    if fd < 0 {
        return Err((errno(), "create".into()));
    }
    let data = b"#!/bin/sh\nid\n";
    // SAFETY: data is valid for data.len() bytes of reads.
    unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    close(fd as libc::c_long);
    // SAFETY: p is a valid NUL-terminated path.
    check(unsafe { libc::chmod(p.as_ptr(), 0o6755) } as libc::c_long)?;
    Ok(String::new())
}

/// The attempt: create PATH with mode 06755 directly (no chmod).
fn create_suid(a: &[String]) -> Outcome {
    let p = cstr(&a[0]);
    // SAFETY: p is a valid NUL-terminated path.
    let fd = check(unsafe {
        libc::open(
            p.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0o6755,
        )
    } as libc::c_long)?;
    close(fd);
    Ok(String::new())
}

// ---------------------------------------------------------------------------------------------
// Network

fn tcp_connect(a: &[String]) -> Outcome {
    let addr: SocketAddrV4 = parse(&a[0], "ADDR:PORT");
    let fd = socket(libc::AF_INET, libc::SOCK_STREAM, 0)?;
    let sa = sockaddr_in(addr);
    // SAFETY: sa is a valid sockaddr_in and the length matches it.
    let r = unsafe {
        libc::connect(
            fd as libc::c_int,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of_val(&sa) as libc::socklen_t,
        )
    };
    let out = if r < 0 { fail() } else { Ok(String::new()) };
    close(fd);
    out
}

fn tcp_bind_loopback(_: &[String]) -> Outcome {
    let fd = socket(libc::AF_INET, libc::SOCK_STREAM, 0)?;
    let sa = sockaddr_in(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
    // SAFETY: sa is a valid sockaddr_in and the length matches it.
    let r = unsafe {
        libc::bind(
            fd as libc::c_int,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of_val(&sa) as libc::socklen_t,
        )
    };
    let out = if r < 0 { fail() } else { Ok(String::new()) };
    close(fd);
    out
}

/// connect(2) a UDP socket, send one datagram, then wait up to 500 ms for an answer. An ICMP
/// "port unreachable" surfaces as ECONNREFUSED on the receive; silence is `ok`.
fn udp_send(a: &[String]) -> Outcome {
    let addr: SocketAddrV4 = parse(&a[0], "ADDR:PORT");
    let fd = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
    let out = (|| {
        let sa = sockaddr_in(addr);
        // SAFETY: sa is a valid sockaddr_in and the length matches it.
        check(unsafe {
            libc::connect(
                fd as libc::c_int,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of_val(&sa) as libc::socklen_t,
            )
        } as libc::c_long)?;
        let msg = b"aither-probe udp datagram";
        // SAFETY: msg is valid for msg.len() bytes of reads.
        let n = unsafe { libc::send(fd as libc::c_int, msg.as_ptr().cast(), msg.len(), 0) };
        check(n as libc::c_long)?;
        let mut pfd = libc::pollfd {
            fd: fd as libc::c_int,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is one valid pollfd.
        check(unsafe { libc::poll(&mut pfd, 1, 500) } as libc::c_long)?;
        if pfd.revents == 0 {
            return Ok(String::new());
        }
        let mut buf = [0u8; 64];
        // SAFETY: buf is valid for buf.len() bytes of writes.
        let n = check(unsafe {
            libc::recv(
                fd as libc::c_int,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        } as libc::c_long)?;
        Ok(format!("reply={n}"))
    })();
    close(fd);
    out
}

fn abstract_connect(a: &[String]) -> Outcome {
    let fd = socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)?;
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let name = a[0].as_bytes();
    if name.len() + 1 > sa.sun_path.len() {
        usage_and_exit("abstract-connect", "name too long");
    }
    // sun_path[0] stays 0: the abstract namespace.
    for (i, b) in name.iter().enumerate() {
        sa.sun_path[i + 1] = *b as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    // SAFETY: sa is a valid sockaddr_un and len is within it.
    let r = unsafe {
        libc::connect(
            fd as libc::c_int,
            (&sa as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    let out = if r < 0 { fail() } else { Ok(String::new()) };
    close(fd);
    out
}

fn vsock(_: &[String]) -> Outcome {
    const AF_VSOCK: libc::c_int = 40;
    let fd = socket(AF_VSOCK, libc::SOCK_STREAM, 0)?;
    close(fd);
    Ok(String::new())
}

fn packet_socket(_: &[String]) -> Outcome {
    let fd = socket(
        libc::AF_PACKET,
        libc::SOCK_RAW,
        (libc::ETH_P_ALL as u16).to_be() as libc::c_int,
    )?;
    close(fd);
    Ok(String::new())
}

fn raw_socket(_: &[String]) -> Outcome {
    let fd = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP)?;
    close(fd);
    Ok(String::new())
}

// ---------------------------------------------------------------------------------------------
// Namespaces, mounts, privileged calls

fn mount_tmpfs(_: &[String]) -> Outcome {
    let dir = cstr("/tmp/x");
    // EEXIST is fine: only the mount matters.
    // SAFETY: dir is a valid NUL-terminated path.
    unsafe { libc::mkdir(dir.as_ptr(), 0o755) };
    let src = cstr("tmpfs");
    // SAFETY: all strings are valid and NUL-terminated; data may be NULL.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            dir.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    } as libc::c_long)?;
    Ok(String::new())
}

fn unshare_user(_: &[String]) -> Outcome {
    // SAFETY: unshare takes no pointers.
    check(unsafe { libc::unshare(libc::CLONE_NEWUSER) } as libc::c_long)?;
    Ok(String::new())
}

fn unshare_net(_: &[String]) -> Outcome {
    // SAFETY: unshare takes no pointers.
    check(unsafe { libc::unshare(libc::CLONE_NEWNET) } as libc::c_long)?;
    Ok(String::new())
}

fn clone_newuser(_: &[String]) -> Outcome {
    let flags = (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: a fork-like raw clone (no CLONE_VM, NULL stack): the child gets a copy of the
    // address space and only calls _exit (see finish_clone).
    let ret = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    finish_clone(ret)
}

/// `struct clone_args` of clone3(2), version 0 (64 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

fn clone3(_: &[String]) -> Outcome {
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: args is a valid clone_args of the size passed; without CLONE_VM and without a
    // stack the child is a fork-like copy that only calls _exit (see finish_clone).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    finish_clone(ret)
}

fn chroot(a: &[String]) -> Outcome {
    let p = cstr(&a[0]);
    // SAFETY: p is a valid NUL-terminated path.
    check(unsafe { libc::chroot(p.as_ptr()) } as libc::c_long)?;
    Ok(String::new())
}

fn ptrace_parent(_: &[String]) -> Outcome {
    // PTRACE_SEIZE makes the same permission checks as PTRACE_ATTACH but does not stop the
    // tracee: if it ever got through, the parent would not be left stopped when we exit.
    // SAFETY: getppid takes no arguments.
    let ppid = unsafe { libc::getppid() };
    // SAFETY: PTRACE_SEIZE ignores addr; data 0 means no options.
    check(unsafe { libc::ptrace(libc::PTRACE_SEIZE, ppid, 0usize, 0usize) })?;
    Ok(format!("ppid={ppid}"))
}

/// `union bpf_attr` for BPF_MAP_CREATE (first fields; the rest stays zero).
#[repr(C)]
#[derive(Default)]
struct BpfMapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    pad: [u64; 16],
}

fn bpf(_: &[String]) -> Outcome {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr = BpfMapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        ..Default::default()
    };
    // SAFETY: attr is a valid, zero-padded bpf_attr of the size passed.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const BpfMapCreate,
            std::mem::size_of::<BpfMapCreate>(),
        )
    })?;
    close(fd);
    Ok(String::new())
}

fn keyctl(_: &[String]) -> Outcome {
    const KEY_SPEC_SESSION_KEYRING: libc::c_long = -3;
    let ty = cstr("user");
    let desc = cstr("aither-probe");
    let payload = b"secret";
    // SAFETY: strings are valid and NUL-terminated; payload is valid for its length.
    let id = check(unsafe {
        libc::syscall(
            libc::SYS_add_key,
            ty.as_ptr(),
            desc.as_ptr(),
            payload.as_ptr(),
            payload.len(),
            KEY_SPEC_SESSION_KEYRING,
        )
    })?;
    Ok(format!("key={id}"))
}

fn keyctl_join(_: &[String]) -> Outcome {
    const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
    // SAFETY: a NULL name asks for a new anonymous session keyring.
    let id = check(unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<libc::c_char>(),
        )
    })?;
    Ok(format!("keyring={id}"))
}

fn perf_event_open(_: &[String]) -> Outcome {
    // struct perf_event_attr: type (u32) at 0, size (u32) at 4, config (u64) at 8; the flag
    // bits at 40 stay zero. PERF_ATTR_SIZE_VER0 is 64; a larger zeroed buffer is accepted.
    const PERF_TYPE_SOFTWARE: u32 = 1;
    const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;
    let mut attr = [0u64; 16];
    attr[0] = u64::from(PERF_TYPE_SOFTWARE) | (128u64 << 32);
    attr[1] = PERF_COUNT_SW_CPU_CLOCK;
    // SAFETY: attr is 128 readable bytes, the size it declares; pid 0 = self, cpu -1 = any.
    let fd =
        check(unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), 0, -1, -1, 0) })?;
    close(fd);
    Ok(String::new())
}

fn userfaultfd(_: &[String]) -> Outcome {
    // SAFETY: userfaultfd takes only flags.
    let fd = check(unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) })?;
    close(fd);
    Ok(String::new())
}

/// `struct file_handle` with room for the handle bytes.
#[repr(C)]
struct FileHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; 128],
}

fn open_by_handle_at(_: &[String]) -> Outcome {
    // Get a real handle first (name_to_handle_at is allowed), so that the only reason to fail
    // is the refusal of open_by_handle_at itself.
    let mut fh = FileHandle {
        handle_bytes: 128,
        handle_type: 0,
        f_handle: [0; 128],
    };
    let mut mount_id: libc::c_int = 0;
    let path = cstr("/");
    // SAFETY: path is valid; fh has room for handle_bytes bytes; mount_id is an out-pointer.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            path.as_ptr(),
            &mut fh as *mut FileHandle,
            &mut mount_id as *mut libc::c_int,
            0,
        )
    };
    let got_handle = r == 0;
    if !got_handle {
        // Still attempt the call with an empty handle: a filter refuses it before parsing.
        fh.handle_bytes = 8;
    }
    // SAFETY: fh is a valid file_handle; AT_FDCWD stands for the mount.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            libc::AT_FDCWD,
            &fh as *const FileHandle,
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    })
    .map_err(|(e, _)| {
        (
            e,
            if got_handle {
                String::new()
            } else {
                "no-handle".into()
            },
        )
    })?;
    close(fd);
    Ok(String::new())
}

fn io_uring_setup(_: &[String]) -> Outcome {
    // struct io_uring_params is 120 bytes; all zero asks for defaults.
    let mut params = [0u8; 120];
    // SAFETY: params is 120 writable bytes, the size of io_uring_params.
    let fd = check(unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) })?;
    close(fd);
    Ok(String::new())
}

fn setuid_root(_: &[String]) -> Outcome {
    // SAFETY: setuid takes no pointers. (If this ever succeeded the probe would be root in its
    // user namespace; it exits right after printing.)
    check(unsafe { libc::setuid(0) } as libc::c_long)?;
    Ok(String::new())
}

fn sethostname(_: &[String]) -> Outcome {
    let name = b"pwned";
    // SAFETY: name is valid for its length.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } as libc::c_long)?;
    Ok(String::new())
}

fn tiocsti(_: &[String]) -> Outcome {
    let c: libc::c_char = b'x' as libc::c_char;
    // SAFETY: TIOCSTI reads one char through the pointer, which is valid.
    check(unsafe { libc::ioctl(0, libc::TIOCSTI, &c as *const libc::c_char) } as libc::c_long)?;
    Ok(String::new())
}

/// TIOCSTI with bits set above the 32 the kernel reads: a filter comparing all 64 bits of the
/// (unsigned int) command would let it through.
fn tiocsti_highbits(_: &[String]) -> Outcome {
    let c: libc::c_char = b'x' as libc::c_char;
    // The type of libc::TIOCSTI differs between libcs (c_ulong, c_int).
    #[allow(clippy::unnecessary_cast)]
    let cmd: u64 = (1u64 << 32) | (libc::TIOCSTI as u64 & 0xffff_ffff);
    // SAFETY: the kernel truncates cmd to TIOCSTI, which reads one char through the pointer.
    check(unsafe { libc::syscall(libc::SYS_ioctl, 0, cmd, &c as *const libc::c_char) })?;
    Ok(String::new())
}

/// socket(AF_VSOCK) with bits set above the 32 the kernel reads (the family is an int).
fn vsock_highbits(_: &[String]) -> Outcome {
    let family: u64 = (1u64 << 32) | 40;
    // SAFETY: socket takes no pointers.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_socket,
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    close(fd);
    Ok(String::new())
}

// ---------------------------------------------------------------------------------------------
// Processes and signals

fn kill_pid(a: &[String]) -> Outcome {
    let pid: libc::pid_t = parse(&a[0], "PID");
    let sig: libc::c_int = parse(&a[1], "SIG");
    // SAFETY: kill takes no pointers.
    check(unsafe { libc::kill(pid, sig) } as libc::c_long)?;
    Ok(String::new())
}

fn list_pids(_: &[String]) -> Outcome {
    let rd = std::fs::read_dir("/proc")
        .map_err(|e| (e.raw_os_error().unwrap_or(libc::EIO), String::new()))?;
    let mut pids: Vec<u32> = rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    Ok(pids
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(","))
}

/// Forks up to N children that sleep until killed; then kills and reaps them all.
fn fork_bomb(a: &[String]) -> Outcome {
    let n: usize = parse(&a[0], "N");
    let mut kids: Vec<libc::pid_t> = Vec::new();
    let mut err = 0;
    while kids.len() < n {
        // SAFETY: the child only calls async-signal-safe functions (pause, _exit).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            loop {
                // SAFETY: pause has no arguments; the child waits to be killed.
                unsafe { libc::pause() };
            }
        }
        if pid < 0 {
            err = errno();
            break;
        }
        kids.push(pid);
    }
    for &k in &kids {
        // SAFETY: k is our own child, not yet reaped.
        unsafe { libc::kill(k, libc::SIGKILL) };
    }
    for &k in &kids {
        reap(k);
    }
    if err != 0 {
        Err((err, kids.len().to_string()))
    } else {
        Ok(kids.len().to_string())
    }
}

/// Maps MIB MiB and touches every page; prints `ok` only if it survived.
fn alloc(a: &[String]) -> Outcome {
    let mib: usize = parse(&a[0], "MIB");
    let len = mib << 20;
    // SAFETY: an anonymous private mapping, no fixed address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return fail();
    }
    let base = p.cast::<u8>();
    for off in (0..len).step_by(4096) {
        // SAFETY: off < len, inside the mapping; volatile so the store is not optimised out.
        unsafe { std::ptr::write_volatile(base.add(off), 1) };
    }
    // SAFETY: p and len are exactly what mmap returned.
    unsafe { libc::munmap(p, len) };
    Ok(mib.to_string())
}

fn spin_until(deadline: Instant) {
    let mut x: u64 = 0;
    while Instant::now() < deadline {
        for _ in 0..10_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

/// CPU time (user + system) used by this process and its threads, in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: ru is a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn burn_for(secs: f64, threads: usize) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let hs: Vec<_> = (0..threads)
        .map(|_| std::thread::spawn(move || spin_until(deadline)))
        .collect();
    for h in hs {
        let _ = h.join();
    }
    Ok(format!("{:.3}", cpu_seconds()))
}

fn burn(a: &[String]) -> Outcome {
    burn_for(parse(&a[0], "SECONDS"), 1)
}

fn burn_threads(a: &[String]) -> Outcome {
    burn_for(parse(&a[0], "SECONDS"), parse(&a[1], "N"))
}

/// `CapEff=… NoNewPrivs=… Seccomp=…` (and the other capability sets) from /proc/self/status.
fn status(_: &[String]) -> Outcome {
    let s = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| (e.raw_os_error().unwrap_or(libc::EIO), String::new()))?;
    let keys = [
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
        "NoNewPrivs",
        "Seccomp",
    ];
    let mut parts = Vec::new();
    for k in keys {
        let v = s
            .lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
            .map(str::trim)
            .unwrap_or("?");
        parts.push(format!("{k}={v}"));
    }
    Ok(parts.join(" "))
}

// ---------------------------------------------------------------------------------------------
// Terminal

fn tty_attack(_: &[String]) -> Outcome {
    let res = |r: libc::c_int| -> String {
        if r < 0 {
            errno_name(errno())
        } else {
            "ok".into()
        }
    };
    // SAFETY: zeroed winsize is a valid out-parameter.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize.
    let r = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) };
    if r < 0 {
        return fail();
    }
    let size = format!("size={}x{}", ws.ws_row, ws.ws_col);
    // SAFETY: TIOCEXCL takes no argument.
    let excl = res(unsafe { libc::ioctl(0, libc::TIOCEXCL) });
    // SAFETY: zeroed termios, filled by tcgetattr, made raw, written back.
    let tcsets = res(unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        libc::tcgetattr(0, &mut t);
        libc::cfmakeraw(&mut t);
        libc::tcsetattr(0, libc::TCSANOW, &t)
    });
    let small = libc::winsize {
        ws_row: 5,
        ws_col: 7,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize.
    let winsz = res(unsafe { libc::ioctl(0, libc::TIOCSWINSZ, &small) });
    let c: libc::c_char = b'x' as libc::c_char;
    // SAFETY: TIOCSTI reads one char.
    let sti = res(unsafe { libc::ioctl(0, libc::TIOCSTI, &c as *const libc::c_char) });
    let n_null: libc::c_int = 27;
    // SAFETY: TIOCSETD reads one int.
    let setd = res(unsafe { libc::ioctl(0, libc::TIOCSETD, &n_null) });
    let detail = format!("{size} excl={excl} tcsets={tcsets} winsz={winsz} sti={sti} setd={setd}");
    // The terminal now discards output (N_NULL): the result also goes to a file in the
    // working directory.
    let _ = std::fs::write("tty-attack.out", &detail);
    Ok(detail)
}

fn watch_open(a: &[String]) -> Outcome {
    let p = cstr(&a[0]);
    let secs: i32 = parse(&a[1], "SECONDS");
    // SAFETY: inotify_init1 takes no pointers.
    let fd = check(unsafe { libc::inotify_init1(libc::IN_CLOEXEC) } as libc::c_long)? as i32;
    // SAFETY: a valid NUL-terminated path.
    check(unsafe { libc::inotify_add_watch(fd, p.as_ptr(), libc::IN_OPEN) } as libc::c_long)?;
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, secs.saturating_mul(1000)) };
    match n {
        1 => Ok("IN_OPEN".into()),
        0 => Err((libc::ETIMEDOUT, String::new())),
        _ => fail(),
    }
}

// ---------------------------------------------------------------------------------------------
// Hogs

/// Calls `take` until it fails or `max` succeeded: `ok n=max` or `err ERRNO n=<succeeded>`.
fn hog(max: u64, mut take: impl FnMut() -> libc::c_long) -> Outcome {
    let mut n = 0u64;
    while n < max {
        if take() < 0 {
            return Err((errno(), format!("n={n}")));
        }
        n += 1;
    }
    Ok(format!("n={n}"))
}

fn hog_inotify(a: &[String]) -> Outcome {
    // SAFETY: inotify_init1 takes no pointers; the descriptors are kept until exit.
    hog(parse(&a[0], "MAX"), || unsafe {
        libc::inotify_init1(libc::IN_CLOEXEC) as libc::c_long
    })
}

/// Watches need distinct (instance, inode) pairs: up to 64 instances, each watching the same
/// files in a fresh directory of /tmp, as many as needed.
fn hog_inotify_watches(a: &[String]) -> Outcome {
    let max: u64 = parse(&a[0], "MAX");
    const INSTANCES: u64 = 64;
    let files = max.div_ceil(INSTANCES).max(1);
    let dir = format!("/tmp/hog-watches-{}", std::process::id());
    std::fs::create_dir(&dir)
        .map_err(|e| (e.raw_os_error().unwrap_or(libc::EIO), "mkdir".into()))?;
    let mut paths = Vec::new();
    for i in 0..files {
        let p = format!("{dir}/{i}");
        std::fs::write(&p, b"")
            .map_err(|e| (e.raw_os_error().unwrap_or(libc::EIO), "create".into()))?;
        paths.push(cstr(&p));
    }
    let mut fd: libc::c_int = -1;
    let mut next = 0usize;
    hog(max, || {
        if fd < 0 || next == paths.len() {
            // SAFETY: as in hog_inotify.
            fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
            next = 0;
            if fd < 0 {
                return -1;
            }
        }
        // SAFETY: a valid NUL-terminated path.
        let r = unsafe { libc::inotify_add_watch(fd, paths[next].as_ptr(), libc::IN_MODIFY) };
        next += 1;
        r as libc::c_long
    })
}

fn hog_timers(a: &[String]) -> Outcome {
    hog(parse(&a[0], "MAX"), || {
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: a null sigevent (SIGALRM on expiry; the timers are never armed) and a valid
        // out-pointer.
        let r = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, std::ptr::null_mut(), &mut id) };
        r as libc::c_long
    })
}

fn hog_mqueue(a: &[String]) -> Outcome {
    let mut i = 0u64;
    let pid = std::process::id();
    hog(parse(&a[0], "MAX"), || {
        i += 1;
        let name = cstr(&format!("hog-{pid}-{i}"));
        // SAFETY: mq_attr is plain old data; all-zero is valid before the fields are set.
        let mut attr: libc::mq_attr = unsafe { std::mem::zeroed() };
        attr.mq_maxmsg = 10;
        attr.mq_msgsize = 8192;
        // SAFETY: a valid NUL-terminated name (the syscall takes it without the leading /)
        // and a valid attribute block.
        unsafe {
            libc::syscall(
                libc::SYS_mq_open,
                name.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_CLOEXEC,
                0o600,
                &attr as *const libc::mq_attr,
            )
        }
    })
}

// ---------------------------------------------------------------------------------------------

fn errno_name(e: i32) -> String {
    match aither::sys::errno_name(e) {
        "E?" => format!("E{e}"),
        name => name.to_string(),
    }
}
