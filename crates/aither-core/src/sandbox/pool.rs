//! `aither-init pool --control-fd N`: one prepared sandbox (`launch::prepare`) waiting for its
//! caller, driven by aitherd over a SOCK_SEQPACKET socket (one JSON message per packet). The
//! contract (docs/architecture.md, "Warm start"):
//!
//! - the pool launcher reads the template spec on stdin, prepares, then sends
//!   `{"ready":{"pid1":P,"cgroup":"ID"}}` (or `{"refused":"WHY"}` and exits 125 when the
//!   template cannot be prepared: not poolable, or a launch error);
//! - it waits for ONE message: the final spec's JSON with SCM_RIGHTS descriptors [stdin,
//!   stdout, stderr] and optionally the workspace directory the caller opened. EOF first (or
//!   SIGTERM, SIGINT, SIGHUP, SIGQUIT): the sandbox is torn down (pid 1 killed, the cgroup
//!   removed), exit 0. pid 1 dying while it waits: `{"refused":...}`, exit 125;
//! - a final spec with another `prepared_key`, a malformed message, or one the prepared
//!   sandbox cannot take (a layered workspace, `--workspace-as-owner`): `{"refused":"WHY"}`,
//!   torn down, exit 125;
//! - accepted: `{"started":{"agent_pid":N}}` when the agent has exec'ed (its host pid; null in
//!   the rare case it had already gone), then `{"exited":{"code":N,"timed_out":B,
//!   "oom_killed":B}}`, and the launcher exits with that code (plain `aither-init`'s: the
//!   agent's status, 128+signal, 124 at the timeout). `exited` is sent as soon as no process
//!   of the sandbox is left (pid 1 killed and reaped the rest of its pid namespace and has the
//!   agent's status), the agent's streams are drained to the caller's descriptors and those
//!   are closed; the teardown (pid 1's exit, its empty namespaces, the empty cgroup's removal)
//!   follows, and the launcher's exit marks its end. When the run ends otherwise (pid 1 killed
//!   at the timeout's grace, a process that joined from outside the namespace), `exited`
//!   comes once the sandbox is gone and its cgroup removed. A launch error after acceptance (the
//!   workspace, a setup stage, 126/127 for the command) is `{"failed":{"code":N,
//!   "error":"..."}}` (the text also goes to the caller's stderr, as plain `aither-init`
//!   writes it to its own), exit N;
//! - nothing more is read from the socket after the final spec: each prepared sandbox runs
//!   once.
//!
//! A supervised spawn (aitherd's `aitherctl spawn`, src/daemon/shim.rs `launch_warm`) sends
//! instead `{"shim":ShimConfig}` with SCM_RIGHTS [the agent's end of its channel, aitherd's
//! end, the shim's stderr (shim.log)]: the pool launcher then *becomes that agent's shim*
//! (sandbox/shim.rs `run_prepared`: the same contract as `aither-init shim` from its launch
//! on), the two channel ends at `shim::HANDED_FDS` (3 and 4, held free since the start for
//! them), and its one report is the shim's event (`ShimEvent` JSON, `started` or `failed`)
//! as one packet on the control socket instead of a line on stdout. From then on it no longer
//! depends on aitherd: it outlives it, as a shim does.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::MsgFlags;
use serde::{Deserialize, Serialize};

use super::channel::{self, now_ns, MAX_LARGE_FRAME};
use super::launch::{self, LaunchError};
use super::shim::{ShimConfig, ShimError, ShimEvent, HANDED_FDS};
use super::spec::SandboxSpec;

/// A message of the pool launcher to aitherd.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PoolMsg {
    Ready {
        pid1: i32,
        cgroup: String,
    },
    Refused(String),
    Started {
        agent_pid: Option<i32>,
    },
    Exited {
        code: i32,
        timed_out: bool,
        oom_killed: bool,
    },
    Failed {
        code: i32,
        error: String,
    },
}

/// Sends one message (MSG_NOSIGNAL: a peer that went away is EPIPE).
pub fn send(fd: BorrowedFd<'_>, msg: &PoolMsg) -> io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
    nix::sys::socket::send(fd.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL)?;
    Ok(())
}

/// Receives one message; `None` at EOF.
pub fn recv(fd: BorrowedFd<'_>) -> io::Result<Option<PoolMsg>> {
    let mut buf = [0u8; channel::MAX_FRAME];
    let (bytes, _fds) = loop {
        match channel::recv_bytes_with_fds(fd, &mut buf) {
            // The launcher exited with a message of ours unread (a second final spec): the
            // kernel reports ECONNRESET once, ahead of what it had sent; read on.
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => continue,
            r => break r?,
        }
    };
    bytes
        .map(|b| {
            serde_json::from_slice(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        })
        .transpose()
}

/// aitherd's side: the final spec, the caller's stdin, stdout and stderr, and the workspace
/// directory the caller opened, in one message.
pub fn send_final(
    fd: BorrowedFd<'_>,
    spec: &SandboxSpec,
    stdio: [BorrowedFd<'_>; 3],
    workspace: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let bytes = serde_json::to_vec(spec).map_err(io::Error::other)?;
    let mut raw: Vec<i32> = stdio.iter().map(|f| f.as_raw_fd()).collect();
    raw.extend(workspace.map(|f| f.as_raw_fd()));
    send_final_bytes(fd, &bytes, &raw)
}

/// One final message (at most `MAX_LARGE_FRAME` bytes) with its descriptors.
fn send_final_bytes(fd: BorrowedFd<'_>, bytes: &[u8], raw: &[i32]) -> io::Result<()> {
    if bytes.len() > MAX_LARGE_FRAME {
        return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    nix::sys::socket::sendmsg::<()>(
        fd.as_raw_fd(),
        &[io::IoSlice::new(bytes)],
        &[nix::sys::socket::ControlMessage::ScmRights(raw)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// How a shim final message starts (`ShimFinal` serialised: its one field first), which tells
/// it from a final spec without parsing twice.
const SHIM_FINAL_PREFIX: &[u8] = br#"{"shim":"#;

/// aitherd's final message for a supervised spawn: the pool launcher becomes its shim.
#[derive(Serialize, Deserialize)]
struct ShimFinal {
    shim: ShimConfig,
}

/// aitherd's side of a supervised spawn: the shim's config, then [the agent's end of the
/// channel, aitherd's end (kept for pidfd_getfd after a restart), the shim's stderr].
pub fn send_final_shim(
    fd: BorrowedFd<'_>,
    cfg: &ShimConfig,
    channel: BorrowedFd<'_>,
    keep: BorrowedFd<'_>,
    stderr: BorrowedFd<'_>,
) -> io::Result<()> {
    let bytes = serde_json::to_vec(&ShimFinalRef { shim: cfg }).map_err(io::Error::other)?;
    debug_assert!(bytes.starts_with(SHIM_FINAL_PREFIX));
    let raw = [channel.as_raw_fd(), keep.as_raw_fd(), stderr.as_raw_fd()];
    send_final_bytes(fd, &bytes, &raw)
}

#[derive(Serialize)]
struct ShimFinalRef<'a> {
    shim: &'a ShimConfig,
}

/// The shim's event after a shim final message (aitherd's side): `None` at EOF (the launcher
/// died without a word).
pub fn recv_shim_event(fd: BorrowedFd<'_>) -> io::Result<Option<Vec<u8>>> {
    let len = channel::next_len(fd)?;
    let mut buf = vec![0u8; len.min(MAX_LARGE_FRAME) + 1];
    let (bytes, _fds) = channel::recv_bytes_with_fds(fd, &mut buf)?;
    Ok(bytes.map(<[u8]>::to_vec))
}

/// Descriptors 3 and 4 held (on /dev/null, close-on-exec) from the start, so that nothing of
/// the prepared sandbox takes them: a spawn's channel ends go there (`HANDED_FDS`). Called
/// once the control socket is above them: whatever else is at 3 or 4 is a stray aitherd
/// inherited without close-on-exec and passed on (as `shim::receive_handed_fds` finds),
/// owned by nothing here, and replaced. None when /dev/null cannot be opened (the shim final
/// is then refused).
fn hold_handed_fds() -> Option<[OwnedFd; 2]> {
    let hold = |at: i32| -> Option<OwnedFd> {
        let null = crate::sys::open(std::path::Path::new("/dev/null"), libc::O_RDWR).ok()?;
        if null.as_raw_fd() == at {
            // It took the free number itself.
            return Some(null);
        }
        // Raw: nix's dup3 wants the target as an OwnedFd, and nothing here owns that number.
        // SAFETY: dup3 onto a number nothing in this process owns (see above), closing a
        // stray there atomically; the new descriptor is owned below.
        let r = unsafe { libc::dup3(null.as_raw_fd(), at, libc::O_CLOEXEC) };
        // SAFETY: `r` is the descriptor dup3 just created; nothing else owns it.
        (r == at).then(|| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(r) })
    };
    Some([hold(HANDED_FDS[0])?, hold(HANDED_FDS[1])?])
}

/// A spawn's final message taken: the pool launcher becomes the agent's shim. Returns the
/// shim's exit status.
fn become_shim(
    control: BorrowedFd<'_>,
    prepared: launch::Prepared,
    mut cfg: ShimConfig,
    fds: [OwnedFd; 3],
    held: Option<[OwnedFd; 2]>,
) -> i32 {
    let report = |e: &ShimEvent| {
        if let Ok(bytes) = serde_json::to_vec(e) {
            let _ = nix::sys::socket::send(control.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL);
        }
    };
    let [chan, keep, stderr] = fds;
    // The shim's stderr is shim.log, as aitherd gives a cold shim.
    let _ = nix::unistd::dup2_stderr(&stderr);
    drop(stderr);
    let bad = |fd: i32, reason: String| ShimError::BadFd {
        what: "agent channel",
        fd,
        reason,
    };
    let Some(held) = held else {
        let e = bad(HANDED_FDS[0], "not held free in the pool launcher".into());
        return super::shim::failed(&cfg, &report, e);
    };
    // Onto the numbers held for them since the start; the placeholders' numbers are
    // replaced in place (dup3), so they are released without closing.
    for (fd, (ph, at)) in [chan, keep]
        .into_iter()
        .zip(held.into_iter().zip(HANDED_FDS))
    {
        let _ = std::os::fd::IntoRawFd::into_raw_fd(ph);
        match crate::sys::place_fd(fd, at) {
            // `shim::run_prepared` takes it by number, as a shim takes its inherited ones.
            Ok(placed) => {
                let _ = std::os::fd::IntoRawFd::into_raw_fd(placed);
            }
            Err(e) => return super::shim::failed(&cfg, &report, bad(at, e.to_string())),
        }
    }
    cfg.channel_fd = Some(HANDED_FDS[0]);
    cfg.keep_fd = Some(HANDED_FDS[1]);
    super::shim::run_prepared(cfg, prepared, &report)
}

/// Signals that dismiss a prepared sandbox that has no agent yet (the others wait, and reach
/// the agent once it runs).
const DISMISS: &[i32] = &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// What ended the wait for the final spec.
enum Waited {
    Readable,
    Dismissed,
    Pid1Died,
}

fn wait_final(control: BorrowedFd<'_>, p: &launch::Prepared) -> Waited {
    loop {
        let mut fds = [control, p.signal_fd(), p.pidfd()].map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // Raw: three fixed entries; nix's PollFd adds nothing here.
        // SAFETY: three valid pollfd entries.
        if unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) } < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            while let Some(sig) = p.take_signal() {
                if DISMISS.contains(&sig) {
                    return Waited::Dismissed;
                }
            }
        }
        // The final spec (or EOF) before pid 1's state: a message that arrived is read.
        if fds[0].revents != 0 {
            return Waited::Readable;
        }
        if fds[2].revents != 0 {
            return Waited::Pid1Died;
        }
    }
}

/// The final message, checked: the spec and the descriptors.
type Final = (SandboxSpec, [OwnedFd; 3], Option<OwnedFd>);

/// A supervised spawn's final message, checked: the shim's config and its three descriptors.
type FinalShim = (Box<ShimConfig>, [OwnedFd; 3]);

/// Reads the final message: `Ok(None)` at EOF, `Err(why)` for a malformed one. A spawn's
/// (`{"shim":...}`) is put in `shim`, and `Ok(None)` returned.
fn read_final(
    control: BorrowedFd<'_>,
    shim: &mut Option<FinalShim>,
) -> Result<Option<Final>, String> {
    let len = channel::next_len(control).map_err(|e| format!("reading the final spec: {e}"))?;
    let mut buf = vec![0u8; len.min(MAX_LARGE_FRAME) + 1];
    let (bytes, mut fds) = channel::recv_bytes_with_fds(control, &mut buf)
        .map_err(|e| format!("reading the final spec: {e}"))?;
    let Some(bytes) = bytes else {
        return Ok(None);
    };
    if bytes.len() > MAX_LARGE_FRAME {
        return Err(format!(
            "the final spec is larger than {MAX_LARGE_FRAME} bytes"
        ));
    }
    if bytes.starts_with(SHIM_FINAL_PREFIX) {
        let f: ShimFinal = serde_json::from_slice(bytes)
            .map_err(|e| format!("the shim's final message is not a ShimConfig: {e}"))?;
        let got: [OwnedFd; 3] = fds.try_into().map_err(|v: Vec<OwnedFd>| {
            format!(
                "the shim's final message came with {} descriptors; expected 3 (the agent's channel, aitherd's end, stderr)",
                v.len()
            )
        })?;
        *shim = Some((Box::new(f.shim), got));
        return Ok(None);
    }
    let spec: SandboxSpec = serde_json::from_slice(bytes)
        .map_err(|e| format!("the final message is not a SandboxSpec: {e}"))?;
    if !(3..=4).contains(&fds.len()) {
        return Err(format!(
            "the final spec came with {} descriptors; expected 3 (stdin, stdout, stderr) or 4 (and the workspace)",
            fds.len()
        ));
    }
    let ws = (fds.len() == 4).then(|| fds.pop()).flatten();
    let [a, b, c]: [OwnedFd; 3] = fds
        .try_into()
        .map_err(|_| "three stdio descriptors".to_string())?;
    Ok(Some((spec, [a, b, c], ws)))
}

/// `aither-init pool`: prepares `template`, serves one final spec on `control`, returns the
/// exit code (see the module docs).
pub fn serve(control: OwnedFd, template: &SandboxSpec) -> i32 {
    // Out of the way of `HANDED_FDS`, held for a spawn's channel (`become_shim`) before the
    // prepared sandbox opens anything.
    let (control, held) = match crate::sys::dup_above(control.as_fd(), 10) {
        Ok(high) => {
            drop(control);
            (high, hold_handed_fds())
        }
        Err(_) => (control, None),
    };
    let ctl = control.as_fd();
    let prepared = match launch::prepare(template) {
        Ok(p) => p,
        Err(e) => {
            let _ = send(ctl, &PoolMsg::Refused(e.to_string()));
            eprintln!("aither-init pool: {e}");
            return e.exit_code();
        }
    };
    let ready = PoolMsg::Ready {
        pid1: prepared.pid1(),
        cgroup: prepared.cgroup().to_string(),
    };
    if send(ctl, &ready).is_err() {
        // aitherd is gone: nobody will ever send a final spec.
        return 0;
    }
    match wait_final(ctl, &prepared) {
        Waited::Readable => {}
        Waited::Dismissed => return 0,
        Waited::Pid1Died => {
            let _ = send(
                ctl,
                &PoolMsg::Refused("the prepared sandbox's pid 1 died while waiting".into()),
            );
            return 125;
        }
    }
    let received = now_ns();
    let mut shim = None;
    let (spec, stdio, workspace) = match read_final(ctl, &mut shim) {
        Ok(Some(f)) => f,
        Ok(None) => {
            if let Some((cfg, fds)) = shim {
                return become_shim(ctl, prepared, *cfg, fds, held);
            }
            // EOF: dismissed; `prepared` drops here (pid 1 killed and reaped, the cgroup
            // removed).
            return 0;
        }
        Err(why) => {
            let _ = send(ctl, &PoolMsg::Refused(why.clone()));
            eprintln!("aither-init pool: refused: {why}");
            return 125;
        }
    };
    // The caller's stderr, for a launch error's text (plain aither-init writes it to its own
    // stderr, which is the caller's).
    // Given back (closed) when the agent is done, with the caller's other descriptors.
    let caller_err = std::cell::Cell::new(crate::sys::dup_above(stdio[2].as_fd(), 3).ok());
    if crate::trace::enabled() {
        eprintln!(
            "aither-trace: pool     final-read+parsed      {:>9.0}",
            (now_ns() - received) as f64 / 1000.0
        );
    }
    let on_started: launch::OnStarted<'_> = Box::new(|st: &launch::Started| {
        let _ = send(
            ctl,
            &PoolMsg::Started {
                agent_pid: st.agent_pid,
            },
        );
    });
    // `exited` as soon as the agent is done (no process of the sandbox left, the streams
    // drained and the caller's descriptors closed): the teardown follows off the caller's
    // path. Otherwise (pid 1 killed, a process that joined from outside) once it is over.
    let sent = std::cell::Cell::new(false);
    let report = |out: &launch::Outcome| {
        if !sent.replace(true) {
            let _ = send(ctl, &exited_msg(out));
        }
    };
    let on_exited: launch::OnExited<'_> = Box::new(|out: &launch::Outcome| {
        // What plain `aither-init --config-fd` prints for its caller (the timeout, an OOM
        // kill, skipped protections), on the caller's stderr, then it is closed.
        if let Some(fd) = caller_err.take() {
            notes_to(fd.as_fd(), &spec, out);
        }
        report(out);
    });
    match prepared.finish_reporting(&spec, stdio, workspace, Some(on_started), Some(on_exited)) {
        Ok(out) => {
            if let Some(fd) = caller_err.take() {
                notes_to(fd.as_fd(), &spec, &out);
            }
            report(&out);
            out.code()
        }
        Err(e @ (LaunchError::KeyMismatch { .. } | LaunchError::NotPoolable(_))) => {
            let _ = send(ctl, &PoolMsg::Refused(e.to_string()));
            eprintln!("aither-init pool: refused: {e}");
            125
        }
        Err(e) => {
            let code = e.exit_code();
            if let Some(fd) = caller_err.take() {
                let _ = crate::sys::write_all_once(
                    fd.as_fd(),
                    format!("aither-init: {e}\n").as_bytes(),
                );
            }
            let _ = send(
                ctl,
                &PoolMsg::Failed {
                    code,
                    error: e.to_string(),
                },
            );
            code
        }
    }
}

/// `Outcome::notes` written to the caller's stderr `fd`.
fn notes_to(fd: BorrowedFd<'_>, spec: &SandboxSpec, out: &launch::Outcome) {
    let text: String = out.notes(spec).into_iter().map(|l| l + "\n").collect();
    if !text.is_empty() {
        let _ = crate::sys::write_all_once(fd, text.as_bytes());
    }
}

fn exited_msg(out: &launch::Outcome) -> PoolMsg {
    PoolMsg::Exited {
        code: out.code(),
        timed_out: out.timed_out,
        oom_killed: out.oom_killed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shim_config() -> ShimConfig {
        use crate::policy::{Policy, BUILTIN_POLICIES};
        let src = BUILTIN_POLICIES
            .iter()
            .find(|(n, _)| *n == "strict")
            .unwrap()
            .1;
        let ws = tempfile::tempdir().unwrap();
        let opts = crate::sandbox::spec::RunOptions {
            argv: vec!["true".into()],
            ..Default::default()
        };
        let spec = SandboxSpec::derive(
            &Policy::parse(src, "strict").unwrap(),
            &opts,
            &|_| None,
            ws.path(),
        )
        .unwrap();
        ShimConfig {
            spec,
            log_dir: "/var/lib/aither/agents/a".into(),
            log_max_bytes: 1 << 20,
            log_keep: 3,
            channel_fd: Some(3),
            keep_fd: Some(4),
        }
    }

    #[test]
    fn a_shim_final_is_told_from_a_final_spec_and_needs_its_three_descriptors() {
        let cfg = shim_config();
        let null = || crate::sys::open(std::path::Path::new("/dev/null"), libc::O_RDWR).unwrap();
        let (a, b) = crate::sys::seqpacket_pair().unwrap();
        let (x, y, z) = (null(), null(), null());
        send_final_shim(a.as_fd(), &cfg, x.as_fd(), y.as_fd(), z.as_fd()).unwrap();
        let mut shim = None;
        assert!(matches!(read_final(b.as_fd(), &mut shim), Ok(None)));
        let (got, fds) = shim.expect("a shim final");
        assert_eq!(*got, cfg);
        assert_eq!(fds.len(), 3);
        // Two descriptors: refused, naming what was expected.
        let bytes = serde_json::to_vec(&ShimFinalRef { shim: &cfg }).unwrap();
        assert!(bytes.starts_with(SHIM_FINAL_PREFIX));
        nix::sys::socket::sendmsg::<()>(
            a.as_raw_fd(),
            &[io::IoSlice::new(&bytes)],
            &[nix::sys::socket::ControlMessage::ScmRights(&[
                x.as_raw_fd(),
                y.as_raw_fd(),
            ])],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut shim = None;
        let e = read_final(b.as_fd(), &mut shim).unwrap_err();
        assert!(e.contains("2 descriptors; expected 3"), "{e}");
        assert!(shim.is_none());
    }

    #[test]
    fn messages_are_the_contracts_json() {
        let j = |m: &PoolMsg| serde_json::to_string(m).unwrap();
        assert_eq!(
            j(&PoolMsg::Ready {
                pid1: 7,
                cgroup: "a-1".into()
            }),
            r#"{"ready":{"pid1":7,"cgroup":"a-1"}}"#
        );
        assert_eq!(j(&PoolMsg::Refused("x".into())), r#"{"refused":"x"}"#);
        assert_eq!(
            j(&PoolMsg::Started { agent_pid: Some(9) }),
            r#"{"started":{"agent_pid":9}}"#
        );
        assert_eq!(
            j(&PoolMsg::Exited {
                code: 3,
                timed_out: false,
                oom_killed: false
            }),
            r#"{"exited":{"code":3,"timed_out":false,"oom_killed":false}}"#
        );
    }
}
