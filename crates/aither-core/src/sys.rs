//! Thin, documented wrappers over the Linux system calls the sandbox uses. Each returns
//! `io::Result` and owns every descriptor it creates (`OwnedFd`). They call nix where nix has
//! the call; the raw ones left say why on the line above (mostly: nix 0.30 lacks the call).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;

/// Converts a path to a C string (paths with NUL bytes are refused).
pub fn cstr(p: impl AsRef<Path>) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_ref().as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// The result of a raw system call: the errno on -1 (nix's own check).
fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    Ok(Errno::result(r)?)
}

/// Takes ownership of a descriptor returned by a successful system call.
fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: `fd` was just returned by the kernel as a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// The result of a fork-like clone.
pub enum Forked {
    Child,
    Parent { pid: libc::pid_t, pidfd: OwnedFd },
}

/// `clone(flags | CLONE_PIDFD | SIGCHLD)` with fork semantics (no new stack): the child
/// continues from here with a copy of the address space.
///
/// # Safety
/// The caller must be single-threaded: after a fork-like clone only the calling thread exists
/// in the child, and locks held by other threads would never be released.
pub unsafe fn clone_fork(flags: libc::c_int) -> io::Result<Forked> {
    let mut pidfd: libc::c_int = -1;
    // Raw: nix's clone needs a stack and returns no pidfd.
    // SAFETY: raw clone with a null stack behaves like fork; CLONE_PIDFD writes the new pidfd
    // into `pidfd`, which outlives the call. The caller guarantees single-threadedness.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::CLONE_PIDFD | libc::SIGCHLD) as libc::c_ulong,
            std::ptr::null_mut::<libc::c_void>(),
            &mut pidfd as *mut libc::c_int,
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    match check(r)? {
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent {
            pid: pid as libc::pid_t,
            pidfd: owned(pidfd as libc::c_long),
        }),
    }
}

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
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// clone3 with fork semantics, a pidfd and, when `cgroup` is given, CLONE_INTO_CGROUP: the
/// child starts life inside that cgroup2 directory (no migration, no global lock).
///
/// # Safety
/// As `clone_fork`: the caller must be single-threaded.
pub unsafe fn clone3_fork(
    flags: libc::c_int,
    cgroup: Option<BorrowedFd<'_>>,
) -> io::Result<Forked> {
    let mut pidfd: libc::c_int = -1;
    let mut args = CloneArgs {
        flags: (flags as u32 as u64) | libc::CLONE_PIDFD as u64,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    if let Some(cg) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = cg.as_raw_fd() as u64;
    }
    // Raw: nix 0.30 has no clone3.
    // SAFETY: clone3 with a zero stack behaves like fork; `args` and `pidfd` outlive the call.
    // The caller guarantees single-threadedness.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match check(r)? {
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent {
            pid: pid as libc::pid_t,
            pidfd: owned(pidfd as libc::c_long),
        }),
    }
}

/// Sends a signal through a pidfd (no pid-reuse race).
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: libc::c_int) -> io::Result<()> {
    // Raw: nix 0.30 has no pidfd_send_signal, and rustix's takes its Signal, which for a
    // realtime signal needs an unsafe from_raw_unchecked anyway.
    // SAFETY: plain syscall on a valid pidfd with a null siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    check(r).map(drop)
}

/// pidfd_open(2): a descriptor that pins process `pid` (no pid-reuse race from here on).
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // rustix: nix 0.30 has no pidfd_open. Its Pid is positive; the kernel's answer for the
    // rest is EINVAL.
    let pid = rustix::process::Pid::from_raw(pid.max(0)).ok_or(Errno::EINVAL)?;
    Ok(rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// pidfd_getfd(2): a close-on-exec copy of descriptor `target` of the process (≥ 5.6; needs
/// ptrace access to it).
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target: RawFd) -> io::Result<OwnedFd> {
    // rustix: nix 0.30 has no pidfd_getfd.
    Ok(rustix::process::pidfd_getfd(
        pidfd,
        target,
        rustix::process::PidfdGetfdFlags::empty(),
    )?)
}

/// setns(2) with a pidfd: joins every namespace in `flags` of that process at once (≥ 5.8).
pub fn setns(fd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<()> {
    Ok(nix::sched::setns(
        fd,
        nix::sched::CloneFlags::from_bits_retain(flags),
    )?)
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl ExitStatus {
    /// The shell convention: the code, or 128 + the signal.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(c) => c,
            ExitStatus::Signaled(s) => 128 + s,
        }
    }

    pub fn from_wait_status(st: libc::c_int) -> ExitStatus {
        if libc::WIFSIGNALED(st) {
            ExitStatus::Signaled(libc::WTERMSIG(st))
        } else {
            ExitStatus::Exited(libc::WEXITSTATUS(st))
        }
    }
}

/// Waits for (and reaps) the process behind a pidfd.
pub fn wait_pidfd(pidfd: BorrowedFd<'_>) -> io::Result<ExitStatus> {
    loop {
        // SAFETY: zeroed siginfo_t is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // Raw: nix's waitid maps the signal into its Signal enum and fails with EINVAL, after
        // the child is reaped, when a realtime signal killed it.
        // SAFETY: waitid(P_PIDFD) on a pidfd we own, writing into `info`.
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED,
            )
        };
        match Errno::result(r) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        // SAFETY: after a successful WEXITED wait, si_status and si_code are set.
        let (code, status) = unsafe { (info.si_code, info.si_status()) };
        return Ok(if code == libc::CLD_EXITED {
            ExitStatus::Exited(status)
        } else {
            ExitStatus::Signaled(status)
        });
    }
}

/// A connected pair of SOCK_SEQPACKET sockets (message boundaries kept), close-on-exec.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    unix_pair(nix::sys::socket::SockType::SeqPacket)
}

/// A connected, close-on-exec unix stream socket pair (the agent channel).
pub fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    unix_pair(nix::sys::socket::SockType::Stream)
}

fn unix_pair(kind: nix::sys::socket::SockType) -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag};
    Ok(nix::sys::socket::socketpair(
        AddressFamily::Unix,
        kind,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// A close-on-exec pipe (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

/// Opens a path with flags (always O_CLOEXEC).
pub fn open(path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    use nix::fcntl::OFlag;
    let c = cstr(path)?;
    Ok(nix::fcntl::open(
        c.as_c_str(),
        OFlag::from_bits_retain(flags) | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )?)
}

/// write(2) of the whole buffer in one call (cgroup and /proc files need single writes).
pub fn write_all_once(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<()> {
    let n = nix::unistd::write(fd, data)?;
    if n != data.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
    }
    Ok(())
}

/// Writes a small file in one write(2), as kernel interfaces want.
pub fn write_file(path: &Path, data: &str) -> io::Result<()> {
    let fd = open(path, libc::O_WRONLY)?;
    write_all_once(fd.as_fd_ref(), data.as_bytes())
}

trait AsFdRef {
    fn as_fd_ref(&self) -> BorrowedFd<'_>;
}
impl AsFdRef for OwnedFd {
    fn as_fd_ref(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }
}

/// mount(2).
pub fn mount(
    source: Option<&CStr>,
    target: &Path,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let t = cstr(target)?;
    Ok(nix::mount::mount(
        source,
        t.as_c_str(),
        fstype,
        nix::mount::MsFlags::from_bits_retain(flags),
        data,
    )?)
}

/// umount2(2).
pub fn umount2(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let t = cstr(target)?;
    Ok(nix::mount::umount2(
        t.as_c_str(),
        nix::mount::MntFlags::from_bits_retain(flags),
    )?)
}

/// pivot_root(2).
pub fn pivot_root(new_root: &Path, put_old: &Path) -> io::Result<()> {
    let (a, b) = (cstr(new_root)?, cstr(put_old)?);
    Ok(nix::unistd::pivot_root(a.as_c_str(), b.as_c_str())?)
}

pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;
pub const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// mount_setattr(2) on a mount fd (or a path when `fd` is AT_FDCWD-relative).
pub fn mount_setattr(
    dirfd: RawFd,
    path: &Path,
    recursive: bool,
    set: u64,
    clear: u64,
    userns: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let c = cstr(path)?;
    let mut flags = if recursive {
        libc::AT_RECURSIVE as libc::c_uint
    } else {
        0
    };
    if path.as_os_str().is_empty() {
        flags |= libc::AT_EMPTY_PATH as libc::c_uint;
    }
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: userns.map_or(0, |f| f.as_raw_fd() as u64),
    };
    // Raw: nix 0.30 has no mount_setattr.
    // SAFETY: `attr` is a correctly laid out struct mount_attr that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            c.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    check(r).map(drop)
}

/// move_mount(2) of a detached mount fd onto a path.
pub fn move_mount_fd(from: BorrowedFd<'_>, to: &Path) -> io::Result<()> {
    let t = cstr(to)?;
    // rustix: nix 0.30 has no move_mount.
    Ok(rustix::mount::move_mount(
        from,
        c"",
        rustix::fs::CWD,
        t.as_c_str(),
        rustix::mount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )?)
}

/// close_range(2) over [first, last].
pub fn close_range(first: u32, last: u32, flags: u32) -> io::Result<()> {
    if first > last {
        return Ok(());
    }
    // Raw: nix 0.30 has no close_range.
    // SAFETY: closes descriptors in the range; callers only pass ranges they own.
    check(unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) }).map(drop)
}

/// A close-on-exec duplicate of `fd` at the lowest free number ≥ `min`.
pub fn dup_above(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    let r = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min))?;
    Ok(owned(r as libc::c_long))
}

/// Moves `fd` to the number `target`, not close-on-exec (so that an exec'd program inherits
/// it), replacing whatever `target` held. Returns the descriptor at `target`.
pub fn place_fd(fd: OwnedFd, target: RawFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() == target {
        // dup3 refuses equal numbers: clear close-on-exec in place instead.
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )?;
        return Ok(fd);
    }
    // Raw: nix's dup3 wants the target as an OwnedFd, and nothing here owns that number yet.
    // SAFETY: dup3 onto `target`; any descriptor there is closed atomically, and the caller
    // owns that number from now on through the returned OwnedFd.
    Errno::result(unsafe { libc::dup3(fd.as_raw_fd(), target, 0) })?;
    Ok(owned(target as libc::c_long))
}

/// prctl with integer arguments.
pub fn prctl(option: libc::c_int, arg2: libc::c_ulong) -> io::Result<()> {
    // Raw: nix has one typed function per prctl option and none for the capability ones.
    // SAFETY: prctl options used here take integer arguments only.
    Errno::result(unsafe {
        libc::prctl(
            option,
            arg2,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })?;
    Ok(())
}

/// The errno of an io::Error (EIO when it carries none).
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// The symbolic name of an errno value (e.g. "EPERM").
pub fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::E2BIG => "E2BIG",
        libc::ENOEXEC => "ENOEXEC",
        libc::EBADF => "EBADF",
        libc::ECHILD => "ECHILD",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::ETXTBSY => "ETXTBSY",
        libc::ENXIO => "ENXIO",
        libc::EFBIG => "EFBIG",
        libc::ESPIPE => "ESPIPE",
        libc::EMLINK => "EMLINK",
        libc::EPIPE => "EPIPE",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOTSOCK => "ENOTSOCK",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::ESOCKTNOSUPPORT => "ESOCKTNOSUPPORT",
        libc::EPFNOSUPPORT => "EPFNOSUPPORT",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETDOWN => "ENETDOWN",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EHOSTDOWN => "EHOSTDOWN",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::ENOKEY => "ENOKEY",
        libc::EDQUOT => "EDQUOT",
        _ => "E?",
    }
}

/// CPU time of the calling thread, in ns.
pub fn thread_cpu_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        Err(_) => 0,
    }
}
