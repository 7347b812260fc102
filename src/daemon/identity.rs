//! Who is asking (issue 18): the caller of every control-socket request is what the kernel
//! says about the peer (SO_PEERCRED, SO_PEERGROUPS), never a field of the request. Root, the
//! daemon's own uid and members of the admin group (`aither-admin`) act on everything; a
//! member of group `aither` acts only on what it owns.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

/// The group whose members may use the control socket.
pub const MEMBER_GROUP: &str = "aither";
/// The group whose members act on every user's agents (created by install.sh).
pub const ADMIN_GROUP: &str = "aither-admin";

/// SO_PEERGROUPS (asm-generic/socket.h; the same on x86-64 and arm64): the peer's
/// supplementary groups as they were at connect(2).
const SO_PEERGROUPS: libc::c_int = 59;

/// The groups that decide access, by gid (resolved once at start from /etc/group).
#[derive(Clone, Debug, Default)]
pub struct Groups {
    /// Members may connect; None: root only.
    pub member: Option<u32>,
    /// Members are admins; None: root (and the daemon's uid) only.
    pub admin: Option<u32>,
}

impl Groups {
    /// Resolves the two group names in /etc/group.
    pub fn lookup(member: &str, admin: &str) -> Groups {
        Groups {
            member: group_gid(member),
            admin: group_gid(admin),
        }
    }
}

/// The gid of a group in /etc/group.
pub fn group_gid(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(name)).then(|| f.nth(1)?.parse().ok())?
    })
}

/// The kernel's word on the peer of a control connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups at connect time.
    pub groups: Vec<u32>,
    pub pid: Option<i32>,
    /// May connect at all.
    pub allowed: bool,
    /// Acts on everything (root, aitherd's uid, the admin group).
    pub admin: bool,
    /// The front end the connection declared (`Request::Via`), named in its audit records.
    pub via: Option<aither_proto::Via>,
}

impl Caller {
    /// Decides from credentials.
    pub fn classify(uid: u32, gid: u32, groups: Vec<u32>, pid: Option<i32>, g: &Groups) -> Caller {
        let me = nix::unistd::geteuid().as_raw();
        let in_group = |want: Option<u32>| want.is_some_and(|w| gid == w || groups.contains(&w));
        let admin = uid == 0 || uid == me || in_group(g.admin);
        let allowed = admin || in_group(g.member);
        Caller {
            uid,
            gid,
            groups,
            pid,
            allowed,
            admin,
            via: None,
        }
    }

    /// Reads SO_PEERCRED and SO_PEERGROUPS of a connected unix socket.
    pub fn of_socket(fd: BorrowedFd<'_>, g: &Groups) -> io::Result<Caller> {
        let cred = getsockopt(&fd, PeerCredentials)?;
        let groups = peer_groups(fd)?;
        let pid = (cred.pid() > 0).then_some(cred.pid());
        Ok(Caller::classify(cred.uid(), cred.gid(), groups, pid, g))
    }

    /// Whether this caller may see and act on something `owner` owns.
    pub fn may_act_on(&self, owner: u32) -> bool {
        self.admin || self.uid == owner
    }

    /// The audit stream's actor text.
    pub fn actor(&self) -> String {
        format!("uid {}", self.uid)
    }

    /// The front end's name for audit records (`Entry::via`).
    pub fn via_name(&self) -> Option<&'static str> {
        self.via.map(aither_proto::Via::as_str)
    }
}

/// SO_PEERGROUPS: ERANGE first tells the size needed.
fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut buf: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..4 {
        let mut len = (buf.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // Raw: neither nix 0.30 nor rustix 1 has SO_PEERGROUPS.
        // SAFETY: a live socket and a writable buffer of `len` bytes.
        let r = Errno::result(unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                buf.as_mut_ptr() as *mut libc::c_void,
                &mut len,
            )
        });
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        match r {
            Ok(_) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::ERANGE) => buf.resize(n.max(buf.len() * 2), 0),
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::from_raw_os_error(libc::ERANGE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admins_act_on_everything_members_on_their_own() {
        let g = Groups {
            member: Some(900),
            admin: Some(901),
        };
        let member = Caller::classify(5000, 5000, vec![900], None, &g);
        assert!(member.allowed && !member.admin);
        assert!(member.may_act_on(5000) && !member.may_act_on(5001) && !member.may_act_on(0));
        let admin = Caller::classify(5001, 5001, vec![901], None, &g);
        assert!(admin.allowed && admin.admin && admin.may_act_on(5000));
        let stranger = Caller::classify(5002, 5002, vec![], None, &g);
        assert!(!stranger.allowed && !stranger.admin);
        let root = Caller::classify(0, 0, vec![], None, &Groups::default());
        assert!(root.allowed && root.admin);
    }

    #[test]
    fn peer_credentials_come_from_the_kernel() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsFd;
        let c = Caller::of_socket(a.as_fd(), &Groups::default()).unwrap();
        assert_eq!(c.uid, nix::unistd::getuid().as_raw());
        assert_eq!(c.pid, Some(std::process::id() as i32));
    }
}
