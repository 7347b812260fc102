//! The caller's stdin, stdout and stderr as aitherd receives them (`exec`, `run` through
//! aitherd): a pipe, a regular file, /dev/null or an allowed terminal is sent as it is;
//! anything else (a socket, a directory, a pseudo-file) through a pipe of ours, copied by a
//! thread here, so that aitherd never gets a descriptor that could lead elsewhere.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aither::daemon::exec::{check_stream, Terminals};

/// How long the output relays may go on after the command ended (a background process that
/// kept the command's stdout open would hold them for ever).
pub const DRAIN: Duration = Duration::from_secs(2);

/// What one of the command's streams is.
pub enum Stream {
    /// Sent as it is.
    Pass(OwnedFd),
    /// A pipe's end sent; a thread here copies between it and ours (and, for stdout and
    /// stderr, says when it is done on the channel it was given).
    Relay(OwnedFd),
}

impl Stream {
    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Pass(f) | Stream::Relay(f) => f.as_fd(),
        }
    }
}

/// The command's stream for our fd `n` (0, 1 or 2), a terminal allowed as `terminals` says. A
/// stdin relay starts reading at once without `go`, or when `go` says so (never when it is
/// dropped unsent: a refused request leaves stdin as it was); an output relay says on `done`
/// when it has copied everything.
pub fn stream(
    n: i32,
    terminals: Terminals,
    go: Option<mpsc::Receiver<()>>,
    done: Option<mpsc::Sender<()>>,
) -> io::Result<Stream> {
    // Raw: the number may be closed, and nix's fcntl needs an open BorrowedFd.
    // SAFETY: F_GETFD only queries the number.
    if unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
        // Closed here: the command gets /dev/null.
        let flags = if n == 0 {
            libc::O_RDONLY
        } else {
            libc::O_WRONLY
        };
        return Ok(Stream::Pass(aither::sys::open(
            Path::new("/dev/null"),
            flags,
        )?));
    }
    // SAFETY: checked open just above; 0–2 stay open for the life of the process.
    let ours = unsafe { BorrowedFd::borrow_raw(n) };
    if check_stream(ours, "stdio", terminals).is_ok() {
        return Ok(Stream::Pass(ours.try_clone_to_owned()?));
    }
    let (r, w) = aither::sys::pipe()?;
    let mine = ours.try_clone_to_owned()?;
    Ok(if n == 0 {
        std::thread::spawn(move || {
            if go.is_none_or(|g| g.recv().is_ok()) {
                copy(File::from(mine), File::from(w));
            }
        });
        Stream::Relay(r)
    } else {
        std::thread::spawn(move || {
            copy(File::from(r), File::from(mine));
            if let Some(d) = done {
                let _ = d.send(());
            }
        });
        Stream::Relay(w)
    })
}

/// Copies until EOF or an error on either side, each chunk as it comes.
fn copy(mut from: File, mut to: File) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Waits for the `n` output relays to copy what the command wrote, at most `DRAIN`; a stdin
/// relay is left blocked on its read (the process exits next).
pub fn wait_relays(done: &mpsc::Receiver<()>, n: usize) {
    let until = Instant::now() + DRAIN;
    for _ in 0..n {
        if done
            .recv_timeout(until.saturating_duration_since(Instant::now()))
            .is_err()
        {
            return;
        }
    }
}
