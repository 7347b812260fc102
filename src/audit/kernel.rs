//! The kernel's own denials: Landlock (and seccomp kill) records from the audit subsystem,
//! read from the audit netlink socket's read-only multicast group (AUDIT_NLGRP_READLOG: no
//! need to be, or to displace, auditd), grouped by event serial, and joined to an agent by the
//! denied process's pid (its cgroup) or the Landlock domain's creator (the sandbox's pid 1).
//!
//! What the kernel reports, and so what this can show (docs/audit.md):
//! - only while audit is enabled (`auditctl -e 1`, or `audit=1` at boot): aitherd reads, it
//!   does not turn the host's audit on;
//! - Landlock denials from ABI 7 (Linux 6.15) on: the sandbox asks for them after exec
//!   (`LANDLOCK_RESTRICT_SELF_LOG_NEW_EXEC_ON`);
//! - seccomp: kills are logged; the allowlist's ERRNO answers are not (they would need
//!   SECCOMP_FILTER_FLAG_LOG and would log every ENOSYS probe of every program).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use serde::Serialize;

const AUDIT_GET: u16 = 1000;
const AUDIT_SET: u16 = 1001;
const AUDIT_NLGRP_READLOG: u32 = 1;
const AUDIT_STATUS_ENABLED: u32 = 1;
/// Record types.
pub const AUDIT_SYSCALL: u16 = 1300;
pub const AUDIT_EOE: u16 = 1320;
pub const AUDIT_SECCOMP: u16 = 1326;
pub const AUDIT_LANDLOCK_ACCESS: u16 = 1423;
pub const AUDIT_LANDLOCK_DOMAIN: u16 = 1424;

fn socket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkAudit,
    )?)
}

fn bind(fd: &OwnedFd, groups: u32) -> io::Result<()> {
    Ok(socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?)
}

fn request(fd: &OwnedFd, ty: u16, body: &[u8]) -> io::Result<Vec<u8>> {
    let mut msg = Vec::with_capacity(16 + body.len());
    msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&ty.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(body);
    socket::send(fd.as_raw_fd(), &msg, MsgFlags::empty())?;
    let mut out = Vec::new();
    // The ACK (an NLMSG_ERROR with 0) and, for AUDIT_GET, the status, in either order.
    for _ in 0..2 {
        let mut buf = vec![0u8; 8192];
        let n = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        buf.truncate(n);
        if buf.len() < 20 {
            break;
        }
        let t = u16::from_ne_bytes([buf[4], buf[5]]);
        if t == libc::NLMSG_ERROR as u16 {
            let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            if err != 0 {
                return Err(io::Error::from_raw_os_error(-err));
            }
            if ty != AUDIT_GET || !out.is_empty() {
                break;
            }
        } else if t == ty {
            out = buf[16..].to_vec();
            break;
        }
    }
    Ok(out)
}

/// Whether the kernel's audit is enabled (AUDIT_GET: `enabled` of struct audit_status).
pub fn enabled() -> io::Result<bool> {
    let fd = socket()?;
    bind(&fd, 0)?;
    let st = request(&fd, AUDIT_GET, &[])?;
    if st.len() < 8 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short audit_status",
        ));
    }
    Ok(u32::from_ne_bytes([st[4], st[5], st[6], st[7]]) != 0)
}

/// Turns the kernel's audit on or off (AUDIT_SET). Host-wide: aitherd never calls it; tests
/// do, and put the old value back.
pub fn set_enabled(on: bool) -> io::Result<()> {
    let fd = socket()?;
    bind(&fd, 0)?;
    let mut body = [0u8; 48];
    body[0..4].copy_from_slice(&AUDIT_STATUS_ENABLED.to_ne_bytes());
    body[4..8].copy_from_slice(&(on as u32).to_ne_bytes());
    request(&fd, AUDIT_SET, &body).map(|_| ())
}

/// One audit record.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelRecord {
    pub ty: u16,
    pub serial: u64,
    pub text: String,
}

/// A subscriber to the audit log's read-only multicast group.
pub struct Reader {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl Reader {
    /// Needs CAP_AUDIT_READ (root has it) and a kernel with audit.
    pub fn open() -> io::Result<Reader> {
        let fd = socket()?;
        bind(&fd, AUDIT_NLGRP_READLOG)?;
        Ok(Reader {
            fd,
            buf: vec![0u8; 65536],
        })
    }

    /// The next datagram's records (blocks).
    pub fn read(&mut self) -> io::Result<Vec<KernelRecord>> {
        let n = socket::recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty())?;
        Ok(parse_datagram(&self.buf[..n]))
    }
}

/// Netlink messages of one datagram → records (`audit(SECONDS.MILLIS:SERIAL): TEXT`).
pub fn parse_datagram(mut b: &[u8]) -> Vec<KernelRecord> {
    let mut out = Vec::new();
    while b.len() >= 16 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let ty = u16::from_ne_bytes([b[4], b[5]]);
        let len = len.clamp(16, b.len());
        let text = String::from_utf8_lossy(&b[16..len])
            .trim_end_matches('\0')
            .to_string();
        if let Some(r) = parse_record(ty, &text) {
            out.push(r);
        }
        // NLMSG_ALIGN: messages are 4-byte aligned.
        let next = (len + 3) & !3;
        if next >= b.len() {
            break;
        }
        b = &b[next..];
    }
    out
}

fn parse_record(ty: u16, text: &str) -> Option<KernelRecord> {
    let rest = text.strip_prefix("audit(")?;
    let (stamp, body) = rest.split_once("): ")?;
    let serial = stamp.split_once(':')?.1.parse().ok()?;
    Some(KernelRecord {
        ty,
        serial,
        text: body.to_string(),
    })
}

/// `key=value` of a record (values may be quoted).
pub fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = text;
    while !rest.is_empty() {
        rest = rest.trim_start();
        let (k, after) = rest.split_once('=')?;
        let (v, tail) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        if k == key {
            return Some(v);
        }
        rest = tail;
    }
    None
}

/// A denial the kernel reported, with what identifies the process.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Denial {
    /// "landlock" or "seccomp".
    pub layer: &'static str,
    /// Landlock's blockers (`fs.write_file`, `net.connect_tcp` …) or the seccomp action.
    pub rule: String,
    /// The rest of the access record (path, daddr, dest …) or the syscall.
    pub detail: String,
    pub pid: Option<i32>,
    /// The Landlock domain's creator (the sandbox's pid 1), when the event names it.
    pub domain_pid: Option<i32>,
    pub domain: Option<String>,
    pub syscall: Option<String>,
    pub comm: Option<String>,
    pub exe: Option<String>,
}

/// Groups records of one event (same serial) into denials; an event ends with its EOE record
/// or when a record of a later serial arrives.
#[derive(Default)]
pub struct Joiner {
    serial: Option<u64>,
    records: Vec<KernelRecord>,
}

impl Joiner {
    /// Feeds one record; returns the denials of an event it completes.
    pub fn push(&mut self, r: KernelRecord) -> Vec<Denial> {
        let mut out = Vec::new();
        if self.serial.is_some_and(|s| s != r.serial) {
            out = self.flush();
        }
        self.serial = Some(r.serial);
        if r.ty == AUDIT_EOE {
            out.extend(self.flush());
        } else {
            self.records.push(r);
        }
        out
    }

    pub fn flush(&mut self) -> Vec<Denial> {
        let records = std::mem::take(&mut self.records);
        self.serial = None;
        let by = |t: u16| records.iter().find(|r| r.ty == t).map(|r| r.text.as_str());
        let syscall = by(AUDIT_SYSCALL);
        let domain = by(AUDIT_LANDLOCK_DOMAIN);
        let num =
            |t: Option<&str>, k: &str| t.and_then(|t| field(t, k)).and_then(|v| v.parse().ok());
        let s = |t: Option<&str>, k: &str| t.and_then(|t| field(t, k)).map(str::to_string);
        let mut out = Vec::new();
        for r in &records {
            match r.ty {
                AUDIT_LANDLOCK_ACCESS => {
                    let blockers = field(&r.text, "blockers").unwrap_or("?").to_string();
                    let detail = r
                        .text
                        .split_whitespace()
                        .filter(|kv| !kv.starts_with("domain=") && !kv.starts_with("blockers="))
                        .collect::<Vec<_>>()
                        .join(" ");
                    out.push(Denial {
                        layer: "landlock",
                        rule: blockers,
                        detail,
                        pid: num(syscall, "pid"),
                        domain_pid: num(domain, "pid"),
                        domain: field(&r.text, "domain").map(str::to_string),
                        syscall: s(syscall, "syscall"),
                        comm: s(syscall, "comm").or_else(|| s(domain, "comm")),
                        exe: s(syscall, "exe").or_else(|| s(domain, "exe")),
                    });
                }
                AUDIT_SECCOMP => out.push(Denial {
                    layer: "seccomp",
                    rule: format!("action {}", field(&r.text, "code").unwrap_or("?")),
                    detail: format!("syscall {}", field(&r.text, "syscall").unwrap_or("?")),
                    pid: field(&r.text, "pid").and_then(|v| v.parse().ok()),
                    domain_pid: None,
                    domain: None,
                    syscall: field(&r.text, "syscall").map(str::to_string),
                    comm: field(&r.text, "comm").map(str::to_string),
                    exe: field(&r.text, "exe").map(str::to_string),
                }),
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ty: u16, text: &str) -> KernelRecord {
        parse_record(ty, text).unwrap()
    }

    #[test]
    fn a_landlock_event_becomes_one_denial_with_its_pids() {
        let mut j = Joiner::default();
        assert!(j
            .push(rec(AUDIT_LANDLOCK_ACCESS, "audit(1795635292.999:4): domain=10351e946 blockers=net.connect_tcp daddr=127.0.0.1 dest=9"))
            .is_empty());
        j.push(rec(AUDIT_LANDLOCK_DOMAIN, "audit(1795635292.999:4): domain=10351e946 status=allocated mode=enforcing pid=10820 uid=1879069831 exe=\"/usr/local/bin/aitherctl\" comm=\"aither-init\""));
        j.push(rec(AUDIT_SYSCALL, "audit(1795635292.999:4): arch=c000003e syscall=42 success=no exit=-13 ppid=10820 pid=10822 comm=\"python3\" exe=\"/usr/bin/python3.11\" key=(null)"));
        let d = j.push(rec(AUDIT_EOE, "audit(1795635292.999:4): "));
        assert_eq!(d.len(), 1);
        let d = &d[0];
        assert_eq!(d.layer, "landlock");
        assert_eq!(d.rule, "net.connect_tcp");
        assert_eq!(d.detail, "daddr=127.0.0.1 dest=9");
        assert_eq!((d.pid, d.domain_pid), (Some(10822), Some(10820)));
        assert_eq!(d.comm.as_deref(), Some("python3"));
        assert_eq!(d.syscall.as_deref(), Some("42"));
    }

    #[test]
    fn events_end_at_a_new_serial_and_seccomp_kills_are_read() {
        let mut j = Joiner::default();
        j.push(rec(AUDIT_SECCOMP, "audit(1.2:7): auid=4294967295 uid=1000 gid=1000 ses=4294967295 pid=55 comm=\"x\" exe=\"/bin/x\" sig=31 arch=c000003e syscall=101 compat=0 ip=0x0 code=0x80000000"));
        let d = j.push(rec(AUDIT_SYSCALL, "audit(1.3:8): syscall=1 pid=9"));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].layer, "seccomp");
        assert_eq!(d[0].pid, Some(55));
        assert_eq!(d[0].rule, "action 0x80000000");
        assert!(j.flush().is_empty(), "a plain syscall record is no denial");
    }

    #[test]
    fn fields_and_garbage() {
        assert_eq!(field("a=1 b=\"x y\" c=3", "b"), Some("x y"));
        assert_eq!(field("a=1 b=\"x y\" c=3", "c"), Some("3"));
        assert_eq!(field("a=1", "z"), None);
        assert!(parse_record(1300, "no stamp").is_none());
        assert!(parse_datagram(&[1, 2, 3]).is_empty());
        let mut msg = Vec::new();
        let text = b"audit(1.0:3): pid=1\0";
        msg.extend_from_slice(&((16 + text.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&AUDIT_SYSCALL.to_ne_bytes());
        msg.extend_from_slice(&[0u8; 10]);
        msg.extend_from_slice(text);
        assert_eq!(parse_datagram(&msg)[0].serial, 3);
    }
}
