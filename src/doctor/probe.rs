//! Facts only a system call can tell, probed cheaply on the running kernel. Each probe has no
//! lasting effect: a refused call, a descriptor closed at once, or a throwaway child.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;

use super::Probe;
use crate::sys;

/// "EACCES: Permission denied".
pub(super) fn errno_text(e: &io::Error) -> String {
    let msg = e.to_string();
    let msg = msg.split(" (os error").next().unwrap_or_default();
    format!("{}: {msg}", sys::errno_name(sys::errno_of(e)))
}

/// The kernel release from uname(2).
pub(super) fn uname_release() -> Option<String> {
    let u = nix::sys::utsname::uname().ok()?;
    Some(u.release().to_string_lossy().into_owned())
}

/// The namespaces of every sandbox: unshare(2) of user, pid, mount, net, ipc, uts and cgroup
/// namespaces in a forked child that exits at once.
pub(super) fn namespaces() -> Probe {
    use nix::sched::CloneFlags;
    use nix::sys::wait::WaitStatus;
    use nix::unistd::ForkResult;
    let flags = CloneFlags::CLONE_NEWUSER
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWCGROUP;
    // SAFETY: the child only calls unshare and _exit, both async-signal-safe, so forking a
    // multi-threaded process (a test harness) is sound.
    let pid = match unsafe { nix::unistd::fork() } {
        Err(e) => return Probe::unknown(format!("fork: {}", errno_text(&e.into()))),
        Ok(ForkResult::Child) => {
            let code = match nix::sched::unshare(flags) {
                Ok(()) => 0,
                Err(e) => e as i32,
            };
            // Raw: nix has no _exit (std's exit would run the parent's atexit handlers here).
            // SAFETY: see above; the child never returns.
            unsafe { libc::_exit(code.clamp(0, 255)) }
        }
        Ok(ForkResult::Parent { child }) => child,
    };
    let status = loop {
        match nix::sys::wait::waitpid(pid, None) {
            Ok(st) => break st,
            Err(Errno::EINTR) => continue,
            Err(e) => return Probe::unknown(format!("waitpid: {}", errno_text(&e.into()))),
        }
    };
    match status {
        WaitStatus::Exited(_, 0) => {
            Probe::yes("created user, pid, mount, net, ipc, uts and cgroup namespaces")
        }
        WaitStatus::Exited(_, code) => {
            let e = io::Error::from_raw_os_error(code);
            Probe::no(format!("unshare: {}", errno_text(&e)))
        }
        _ => Probe::unknown("the probe child was killed"),
    }
}

/// clone3(2) with a size below the smallest argument struct: a kernel that has it answers
/// EINVAL before doing anything; ENOSYS means no clone3 (old kernel, or a seccomp filter such
/// as Docker's default profile).
pub(super) fn clone3() -> Probe {
    // Raw: neither nix 0.30 nor rustix 1 has clone3.
    // SAFETY: a null argument pointer with size 0 is refused by the kernel before any use.
    let r = Errno::result(unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::null_mut::<libc::c_void>(),
            0usize,
        )
    });
    match r {
        // Cannot happen (size 0 is always refused); a child would run here otherwise.
        Ok(0) => {
            // Raw: nix has no _exit (std's exit would run the parent's atexit handlers here).
            // SAFETY: in a child that must not continue.
            unsafe { libc::_exit(0) }
        }
        Ok(_) => Probe::yes("clone3 answered"),
        Err(Errno::EINVAL | Errno::E2BIG) => Probe::yes("clone3 is available"),
        Err(e) => Probe::no(format!("clone3: {}", errno_text(&e.into()))),
    }
}

/// pidfd_open(2) of this process, closed at once.
pub(super) fn pidfd_open() -> Probe {
    match sys::pidfd_open(nix::unistd::getpid().as_raw()) {
        Ok(fd) => {
            drop(fd);
            Probe::yes("pidfd_open is available")
        }
        Err(e) => Probe::no(format!("pidfd_open: {}", errno_text(&e))),
    }
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to the fields used (the kernel zero-extends).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;

/// Loads (never attaches) the smallest BPF_PROG_TYPE_CGROUP_DEVICE program, "allow": what
/// device control on cgroup2 needs (root, or CAP_BPF, and a kernel with CONFIG_CGROUP_BPF).
pub(super) fn bpf_cgroup_device(cgroup2: Option<&Path>) -> Probe {
    // r0 = 1; exit
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..ProgLoadAttr::default()
    };
    // Raw: nix 0.30 and rustix 1 have no bpf.
    // SAFETY: BPF_PROG_LOAD with an attribute struct of the stated size whose pointers (the
    // instructions, the license) outlive the call.
    let r = Errno::result(unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    });
    let fd = match r {
        Ok(fd) => fd,
        Err(e) => {
            let e = e.into();
            return Probe::no(format!("BPF_PROG_LOAD (cgroup device): {}", errno_text(&e)));
        }
    };
    // SAFETY: the kernel returned a new program descriptor that nothing else owns.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    match cgroup2 {
        Some(d) => Probe::yes(format!(
            "a cgroup device program loads; it attaches to cgroup2 directories ({})",
            d.display()
        )),
        None => Probe::yes(
            "a cgroup device program loads, but there is no cgroup2 hierarchy to attach it to",
        ),
    }
}
