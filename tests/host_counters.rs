//! Kernel per-user counters (docs/security-model.md, "Per-sandbox kernel accounting").
//!
//! The kernel charges the per-user counters of every process in a user namespace to the
//! namespace's owner as well, up to the host's limit for that owner. Each test runs a hostile
//! agent (`aither-probe hog-*`) that takes one counter until the kernel refuses, and, while it
//! holds everything it took, asserts that host root can still take one, and so can a second
//! sandbox. Before each sandbox's namespace was owned by its own host id, all of it was
//! root's: the same agent made root's `inotify_init1`, `timer_create` and `mq_open` fail.

mod common;

use std::ffi::CString;
use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::mpsc;

use common::*;
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A sandbox holding what its hog took, until dropped.
struct Hog {
    child: Child,
    line: String,
    stderr_hint: String,
}

impl Hog {
    /// Starts `aither-probe CHECK MAX 600` under strict and waits for its RESULT line.
    fn start(ws: &Workspace, check: &str, max: u64) -> Hog {
        Hog::start_under(ws, "strict", check, max)
    }

    fn start_under(ws: &Workspace, policy: &str, check: &str, max: u64) -> Hog {
        let max = max.to_string();
        let name = unique(check);
        let mut child = ws
            .command(policy, &[], &["./aither-probe", check, &max, "600"], &name)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn aitherctl run");
        let pid = child.id();
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.starts_with("RESULT ") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match rx.recv_timeout(RUN_DEADLINE) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the hog {check} printed no RESULT line");
            }
        };
        Hog {
            child,
            line,
            stderr_hint: format!("hog {check} (aitherctl pid {})", pid),
        }
    }

    /// The number of items the hog took (`n=` in its line).
    fn taken(&self) -> u64 {
        self.line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("n="))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no n= in {:?}", self.line))
    }

    /// Host pid of the sandbox's pid 1 (the launcher's only child).
    fn pid1(&self) -> i32 {
        let l = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{l}/task/{l}/children"))
            .expect("read the launcher's children");
        let kids: Vec<i32> = children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        assert_eq!(
            kids.len(),
            1,
            "the launcher has exactly one child: {kids:?}"
        );
        kids[0]
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        // SIGTERM to the launcher, which forwards it; the sandbox ends with its pid 1.
        // Our own child's pid (not reaped yet, so not reused).
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        wait_with_deadline(&mut self.child, &self.stderr_hint, RUN_DEADLINE);
    }
}

fn sysctl(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("parse {path}: {e}"))
}

fn last_errno() -> String {
    errno_text(Errno::last())
}

fn errno_text(e: Errno) -> String {
    format!(
        "{} ({})",
        std::io::Error::from(e),
        aither::sys::errno_name(e as i32)
    )
}

/// Host root: one inotify instance and one watch.
fn root_inotify() -> Result<(), String> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let fd = Inotify::init(InitFlags::IN_CLOEXEC)
        .map_err(|e| format!("inotify_init1: {}", errno_text(e)))?;
    fd.add_watch("/", AddWatchFlags::IN_CREATE)
        .map_err(|e| format!("inotify_add_watch: {}", errno_text(e)))?;
    Ok(())
}

/// Host root: a POSIX timer, and a queued real-time signal (both are pending-signal slots).
fn root_sigpending() -> Result<(), String> {
    let mut id: libc::timer_t = std::ptr::null_mut();
    // Raw: the hog's own call, a null sigevent (SIGALRM), which nix's Timer (it takes a
    // SigEvent) does not make.
    // SAFETY: a null sigevent (never armed) and a valid out-pointer.
    if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, std::ptr::null_mut(), &mut id) } < 0 {
        return Err(format!("timer_create: {}", last_errno()));
    }
    // Raw: the timer made above is a libc timer_t, not nix's Timer.
    // SAFETY: deleting the timer created above.
    unsafe { libc::timer_delete(id) };
    // A real-time signal queued to this thread only, blocked here, then taken back: the test
    // harness's other threads never see it.
    let sig = libc::SIGRTMIN() + 3;
    // Raw, the block: a realtime signal, which nix's Signal and SigSet cannot hold, and nix
    // has no rt_tgsigqueueinfo or sigtimedwait.
    // SAFETY: zeroed sigset_t initialised by sigemptyset; valid pointers throughout.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut info: libc::siginfo_t = std::mem::zeroed();
        info.si_signo = sig;
        info.si_code = libc::SI_QUEUE;
        let r = libc::syscall(
            libc::SYS_rt_tgsigqueueinfo,
            nix::unistd::getpid().as_raw(),
            nix::unistd::gettid().as_raw(),
            sig,
            &info as *const libc::siginfo_t,
        );
        let res = if r < 0 {
            Err(format!("rt_tgsigqueueinfo: {}", last_errno()))
        } else {
            let ts = libc::timespec {
                tv_sec: 5,
                tv_nsec: 0,
            };
            if libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) != sig {
                Err(format!(
                    "the queued signal did not arrive: {}",
                    last_errno()
                ))
            } else {
                Ok(())
            }
        };
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        res
    }
}

/// Host root: a message queue of 10 × 8 KiB (the size the hog uses), removed again.
fn root_mqueue() -> Result<(), String> {
    let name = CString::new(format!("aither-test-{}-{}", std::process::id(), next_id())).unwrap();
    // SAFETY: mq_attr is plain old data; zero is valid before the fields are set.
    let mut attr: libc::mq_attr = unsafe { std::mem::zeroed() };
    attr.mq_maxmsg = 10;
    attr.mq_msgsize = 8192;
    // Raw: the hog's own call, the system call itself (libc's and nix's mq_open take the name
    // with its leading /).
    // SAFETY: a valid name (without the leading /, as the syscall takes it) and attributes.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_mq_open,
            name.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_CLOEXEC,
            0o600,
            &attr as *const libc::mq_attr,
        )
    };
    if fd < 0 {
        return Err(format!("mq_open: {}", last_errno()));
    }
    // Raw, as mq_open above.
    // SAFETY: removing the queue created above.
    unsafe { libc::syscall(libc::SYS_mq_unlink, name.as_ptr()) };
    let _ = nix::unistd::close(fd as libc::c_int);
    Ok(())
}

#[test]
fn inotify_instances_of_one_agent_are_not_roots_nor_another_sandboxs() {
    let ws = Workspace::new();
    let limit = sysctl("/proc/sys/fs/inotify/max_user_instances");
    let hog = Hog::start(&ws, "hog-inotify", 100_000);
    assert!(
        hog.line.starts_with("RESULT hog-inotify err EMFILE "),
        "the agent is stopped by the per-user limit: {}",
        hog.line
    );
    // The whole host limit, nobody else's share: this sandbox is its own user.
    assert_eq!(hog.taken(), limit, "{}", hog.line);
    root_inotify().expect("host root can still create an inotify instance");
    assert_eq!(
        ws.probe("strict", &[], &["hog-inotify", "1", "0"]),
        "RESULT hog-inotify ok n=1",
        "a second sandbox can still create an inotify instance"
    );
}

#[test]
fn inotify_watches_of_one_agent_are_not_roots_nor_another_sandboxs() {
    let ws = Workspace::new();
    let limit = sysctl("/proc/sys/fs/inotify/max_user_watches");
    let hog = Hog::start(&ws, "hog-inotify-watches", limit * 2);
    assert!(
        hog.line
            .starts_with("RESULT hog-inotify-watches err ENOSPC "),
        "the agent is stopped by the per-user limit: {}",
        hog.line
    );
    assert_eq!(hog.taken(), limit, "{}", hog.line);
    root_inotify().expect("host root can still add an inotify watch");
    assert_eq!(
        ws.probe("strict", &[], &["hog-inotify-watches", "1", "0"]),
        "RESULT hog-inotify-watches ok n=1",
        "a second sandbox can still add a watch"
    );
}

#[test]
fn pending_signals_of_one_agent_are_not_roots_nor_another_sandboxs() {
    let ws = Workspace::new();
    let hog = Hog::start(&ws, "hog-timers", 10_000_000);
    assert!(
        hog.line.starts_with("RESULT hog-timers err EAGAIN "),
        "the agent is stopped by RLIMIT_SIGPENDING: {}",
        hog.line
    );
    assert!(hog.taken() > 0, "{}", hog.line);
    root_sigpending().expect("host root can still create a timer and queue a signal");
    assert_eq!(
        ws.probe("strict", &[], &["hog-timers", "1", "0"]),
        "RESULT hog-timers ok n=1",
        "a second sandbox can still create a timer"
    );
}

/// Under strict (and standard) Landlock already refuses POSIX message queues: the ipc
/// namespace's internal mqueue mount is outside every rule. Under permissive (no Landlock)
/// an agent can fill RLIMIT_MSGQUEUE, and that must be its own.
#[test]
fn mqueue_bytes_of_one_agent_are_not_roots_nor_another_sandboxs() {
    let ws = Workspace::new();
    assert_eq!(
        ws.probe("strict", &[], &["hog-mqueue", "1", "0"]),
        "RESULT hog-mqueue err EACCES n=0",
        "strict: no message queue at all"
    );
    let hog = Hog::start_under(&ws, "permissive", "hog-mqueue", 100_000);
    assert!(
        hog.line.starts_with("RESULT hog-mqueue err EMFILE "),
        "the agent is stopped by RLIMIT_MSGQUEUE: {}",
        hog.line
    );
    assert!(hog.taken() > 0, "{}", hog.line);
    root_mqueue().expect("host root can still create a message queue");
    assert_eq!(
        ws.probe("permissive", &[], &["hog-mqueue", "1", "0"]),
        "RESULT hog-mqueue ok n=1",
        "a second sandbox can still create a message queue"
    );
}

// NS_GET_OWNER_UID (linux/nsfs.h): _IO(0xb7, 0x4), with a pointer to one uid_t.
nix::ioctl_read_bad!(ns_get_owner_uid, 0xb704, libc::uid_t);

/// The user namespace itself (and with it the `user.max_user_namespaces` count and every
/// counter above) is charged to the sandbox's setup id, `0x70000000 + 2·launcher pid`.
#[test]
fn the_sandbox_user_namespace_is_owned_by_its_own_host_id() {
    let ws = Workspace::new();
    let hog = Hog::start(&ws, "hog-inotify", 1);
    let pid1 = hog.pid1();
    let ns = std::fs::File::open(format!("/proc/{pid1}/ns/user")).expect("open ns/user");
    let mut owner: libc::uid_t = u32::MAX;
    // SAFETY: NS_GET_OWNER_UID writes one uid_t through the pointer.
    let r = unsafe { ns_get_owner_uid(std::os::fd::AsRawFd::as_raw_fd(&ns), &mut owner) };
    assert_eq!(r, Ok(0), "NS_GET_OWNER_UID");
    assert_ne!(
        owner, 0,
        "the sandbox's user namespace must not be host root's"
    );
    assert_eq!(
        owner,
        aither::sandbox::userns::UID_BASE + 2 * hog.child.id(),
        "owned by the sandbox's setup id"
    );
    // Nobody else on the host has that id: no process runs as it outside the sandbox.
    let outside: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| {
            let st = std::fs::read_to_string(e.path().join("status")).ok()?;
            let uids = st.lines().find_map(|l| l.strip_prefix("Uid:"))?.to_string();
            let ns = std::fs::read_link(e.path().join("ns/user")).ok()?;
            let ours = std::fs::read_link("/proc/self/ns/user").ok()?;
            (ns == ours && uids.split_whitespace().any(|u| u == owner.to_string()))
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect();
    assert!(
        outside.is_empty(),
        "host processes running as the owner id {owner}: {outside:?}"
    );
}
