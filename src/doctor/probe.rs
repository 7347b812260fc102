//! Facts only a system call can tell, probed cheaply on the running kernel. Each probe has no
//! lasting effect: a refused call, a descriptor closed at once, or a throwaway child.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

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
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP;
    // SAFETY: the child only calls unshare and _exit, both async-signal-safe, so forking a
    // multi-threaded process (a test harness) is sound.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Probe::unknown(format!("fork: {}", errno_text(&io::Error::last_os_error())));
    }
    if pid == 0 {
        // SAFETY: see above; the child never returns.
        unsafe {
            let code = if libc::unshare(flags) == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            libc::_exit(code.clamp(0, 255));
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waiting for the child forked above.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Probe::unknown(format!("waitpid: {}", errno_text(&e)));
        }
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Probe::yes("created user, pid, mount, net, ipc, uts and cgroup namespaces")
    } else if libc::WIFEXITED(status) {
        let e = io::Error::from_raw_os_error(libc::WEXITSTATUS(status));
        Probe::no(format!("unshare: {}", errno_text(&e)))
    } else {
        Probe::unknown("the probe child was killed")
    }
}

/// clone3(2) with a size below the smallest argument struct: a kernel that has it answers
/// EINVAL before doing anything; ENOSYS means no clone3 (old kernel, or a seccomp filter such
/// as Docker's default profile).
pub(super) fn clone3() -> Probe {
    // SAFETY: a null argument pointer with size 0 is refused by the kernel before any use.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::null_mut::<libc::c_void>(),
            0usize,
        )
    };
    if r >= 0 {
        // Cannot happen (size 0 is always refused); a child would run here otherwise.
        if r == 0 {
            // SAFETY: in a child that must not continue.
            unsafe { libc::_exit(0) };
        }
        return Probe::yes("clone3 answered");
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::E2BIG) => Probe::yes("clone3 is available"),
        _ => Probe::no(format!("clone3: {}", errno_text(&e))),
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
    // SAFETY: BPF_PROG_LOAD with an attribute struct of the stated size whose pointers (the
    // instructions, the license) outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Probe::no(format!("BPF_PROG_LOAD (cgroup device): {}", errno_text(&e)));
    }
    // SAFETY: the kernel returned a new program descriptor that nothing else owns.
    drop(unsafe { OwnedFd::from_raw_fd(r as i32) });
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
