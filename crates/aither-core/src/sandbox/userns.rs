//! User namespaces: which host ids a sandbox gets, the maps, and the throwaway namespace that
//! id-maps the workspace mount.
//!
//! Each sandbox gets two host ids of its own, `UID_BASE + 2·slot` (the ids of its pid 1 while
//! it sets up, "root" inside but no one on the host) and `UID_BASE + 2·slot + 1` (the agent).
//! The slot is the launcher's pid, unique while the sandbox lives. No host id below
//! `UID_BASE` (and never 0) is ever mapped. The range 0x70000000–0x707FFFFF is outside the
//! ranges systemd, subuid(5) defaults and distributions hand out.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;

use crate::sys;

/// First host id handed to sandboxes.
pub const UID_BASE: u32 = 0x7000_0000;

/// Host ids of one sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostIds {
    /// The setup identity (uid 0 inside).
    pub root: u32,
    /// The agent (the policy's uid inside).
    pub agent: u32,
    /// The agent's gid (the policy's gid inside): `agent` but for the --workspace-as-owner
    /// fallback, where both are the workspace owner's.
    pub agent_gid: u32,
}

impl HostIds {
    pub fn for_slot(slot: u32) -> HostIds {
        let root = UID_BASE + 2 * slot;
        HostIds {
            root,
            agent: root + 1,
            agent_gid: root + 1,
        }
    }
}

/// The uid_map/gid_map text: inside 0 → ids.root, inside `agent_id` → `agent_host`.
pub fn map_text(agent_id: u32, root: u32, agent_host: u32) -> String {
    format!("0 {root} 1\n{agent_id} {agent_host} 1\n")
}

/// Writes the child's maps. `setgroups` is denied first, as the kernel requires before an
/// unprivileged gid_map and so that the agent can never drop a group to gain access.
pub fn write_maps(pid: libc::pid_t, uid: u32, gid: u32, ids: HostIds) -> io::Result<()> {
    let proc = Path::new("/proc").join(pid.to_string());
    sys::write_file(&proc.join("uid_map"), &map_text(uid, ids.root, ids.agent))?;
    sys::write_file(&proc.join("setgroups"), "deny")?;
    sys::write_file(
        &proc.join("gid_map"),
        &map_text(gid, ids.root, ids.agent_gid),
    )
}

/// The launcher acting as the sandbox's setup id while it creates the user namespace: the
/// kernel makes a namespace's owner its creator's effective uid, and charges every per-user
/// counter of the processes inside (inotify instances and watches, pending signals, POSIX
/// message queue bytes, locked memory, processes, namespaces) to that owner at the host level.
/// Created by host root, one agent could exhaust root's (and so every other sandbox's) share;
/// owned by `HostIds::root`, each sandbox spends only its own.
///
/// Only the effective ids change (real and saved stay 0, so the switch back needs no
/// privilege) and the effective capabilities are raised again from the permitted set: the
/// clone still needs CAP_DAC_OVERRIDE for CLONE_INTO_CGROUP and the right to create a user
/// namespace where the host restricts it. The child inherits this identity; it is a user
/// namespace's first process, which switches to the namespace's own ids after the maps.
/// Dropping the guard restores euid/egid 0 (and with it the effective set).
pub struct AsOwner {
    _private: (),
}

impl AsOwner {
    /// Must be called by a single-threaded process (the ids are per thread in the kernel).
    pub fn switch_to(id: u32) -> io::Result<AsOwner> {
        // The group first: changing the egid needs no capability, and it must happen while
        // CAP_SETGID is still effective.
        // -1 (u32::MAX) keeps the real and saved ids.
        use nix::unistd::{Gid, Uid};
        let keep = u32::MAX;
        nix::unistd::setresgid(Gid::from_raw(keep), Gid::from_raw(id), Gid::from_raw(keep))?;
        let guard = AsOwner { _private: () };
        // Empties the effective capability set (euid 0 -> non-zero).
        nix::unistd::setresuid(Uid::from_raw(keep), Uid::from_raw(id), Uid::from_raw(keep))?;
        super::caps::raise_effective()?;
        Ok(guard)
    }
}

impl Drop for AsOwner {
    fn drop(&mut self) {
        use nix::unistd::{Gid, Uid};
        // Back to euid 0 (the saved uid), which restores the effective set from the permitted
        // set; then the group, with CAP_SETGID effective again. -1 keeps the other ids.
        let keep = u32::MAX;
        let back =
            nix::unistd::setresuid(Uid::from_raw(keep), Uid::from_raw(0), Uid::from_raw(keep))
                .and_then(|()| {
                    nix::unistd::setresgid(
                        Gid::from_raw(keep),
                        Gid::from_raw(0),
                        Gid::from_raw(keep),
                    )
                });
        if let Err(e) = back {
            // Cannot happen (the saved ids are 0); a launcher that could not get its ids back
            // must not go on to create cgroups and mounts as someone else.
            eprintln!(
                "aither: cannot restore the launcher's ids: {}",
                io::Error::from(e)
            );
            std::process::abort();
        }
    }
}

extern "C" fn park(_: *mut libc::c_void) -> libc::c_int {
    loop {
        // In the CLONE_VM child: pause(2) only, which allocates nothing.
        nix::unistd::pause();
    }
}

/// The helper process of `idmap_userns`, already sent SIGKILL; reaped on drop. Its exit is
/// left to the kernel while the launch goes on (waiting for it cost 0.1–6 ms here, most of it
/// waiting for a CPU to run the dying child when the host is busy).
pub struct IdmapHelper {
    pid: libc::pid_t,
    _pidfd: OwnedFd,
    /// The child's stack: kept until it is reaped, since it shares our memory.
    _stack: Vec<u8>,
    /// Something the launch holds for as long as the sandbox runs (a layered workspace's
    /// lock: sandbox::layer), handed back by `into_hold` when the helper is reaped.
    hold: Option<OwnedFd>,
}

impl IdmapHelper {
    /// Keeps `fd` with the helper until [`IdmapHelper::into_hold`].
    pub fn holding(mut self, fd: OwnedFd) -> IdmapHelper {
        self.hold = Some(fd);
        self
    }

    /// Reaps the helper (as dropping it does) and returns what it held.
    pub fn into_hold(mut self) -> Option<OwnedFd> {
        self.hold.take()
    }
}

impl Drop for IdmapHelper {
    fn drop(&mut self) {
        // Reaping our own child (killed when this was made); its status is not needed.
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(self.pid),
            Some(nix::sys::wait::WaitPidFlag::__WALL),
        );
    }
}

/// A user namespace that maps the workspace owner (`owner_uid`/`owner_gid` on disk) to the
/// agent's host id, for MOUNT_ATTR_IDMAP: files the agent creates land on disk as the owner's,
/// and the owner's files look like the agent's inside. Costs one CLONE_VM child (no copy of
/// the address space), killed as soon as its namespace is open and reaped when the returned
/// `IdmapHelper` is dropped.
pub fn idmap_userns(
    owner_uid: u32,
    owner_gid: u32,
    agent_host_id: u32,
) -> io::Result<(OwnedFd, IdmapHelper)> {
    idmap_userns_maps(
        &format!("{owner_uid} {agent_host_id} 1\n"),
        &format!("{owner_gid} {agent_host_id} 1\n"),
    )
}

/// [`idmap_userns`] with the maps written as given (`inside outside count` lines: the
/// on-disk id, then the id it is seen as through the mount). A layered workspace's upper
/// layer maps its store ids to the agent and root to root (sandbox::layer).
pub fn idmap_userns_maps(uid_map: &str, gid_map: &str) -> io::Result<(OwnedFd, IdmapHelper)> {
    let mut stack: Vec<u8> = Vec::with_capacity(16 * 1024);
    // SAFETY: the stack grows down from the end of the allocation; it outlives the child: it
    // moves into the IdmapHelper, which reaps the child before dropping it.
    let top = unsafe { stack.as_mut_ptr().add(stack.capacity()) } as *mut libc::c_void;
    let mut pidfd: libc::c_int = -1;
    // Raw: nix's clone returns no pidfd (CLONE_PIDFD's out-parameter).
    // SAFETY: the child runs only `park` (a pause loop) on its own stack, sharing our memory
    // without touching it; CLONE_PIDFD writes into `pidfd`.
    let pid = unsafe {
        libc::clone(
            park,
            top,
            libc::CLONE_VM | libc::CLONE_NEWUSER | libc::CLONE_PIDFD | libc::SIGCHLD,
            std::ptr::null_mut(),
            &mut pidfd as *mut libc::c_int,
        )
    };
    Errno::result(pid)?;
    // SAFETY: CLONE_PIDFD returned a new descriptor we now own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let result = (|| {
        let proc = Path::new("/proc").join(pid.to_string());
        sys::write_file(&proc.join("uid_map"), uid_map)?;
        sys::write_file(&proc.join("setgroups"), "deny")?;
        sys::write_file(&proc.join("gid_map"), gid_map)?;
        sys::open(&proc.join("ns/user"), libc::O_RDONLY)
    })();
    // The namespace lives on through the descriptor; the child is no longer needed.
    let _ = sys::pidfd_send_signal(std::os::fd::AsFd::as_fd(&pidfd), libc::SIGKILL);
    let helper = IdmapHelper {
        pid,
        _pidfd: pidfd,
        _stack: stack,
        hold: None,
    };
    // On failure the helper is reaped here (dropped with the error).
    result.map(|ns| (ns, helper))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_per_slot_and_never_host_root() {
        let a = HostIds::for_slot(1);
        let b = HostIds::for_slot(2);
        assert_ne!(a.agent, b.agent);
        assert_ne!(a.root, b.agent);
        assert!(a.root >= UID_BASE && a.agent > a.root);
        assert_eq!(
            HostIds::for_slot(4_194_304).agent,
            UID_BASE + 2 * 4_194_304 + 1
        );
        assert_eq!(
            map_text(1000, a.root, a.agent),
            format!("0 {} 1\n1000 {} 1\n", a.root, a.agent)
        );
    }
}
