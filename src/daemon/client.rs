//! The blocking client `aitherctl` uses (no async runtime in the CLI).

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::proto::{self, FrameError, Reply, Request};

/// Errors of talking to aitherd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("aitherd is not running (no socket at {path}).\n  Start it: `aitherd &` (foreground, logs on stderr), `systemctl start aitherd`, or run ./install.sh")]
    NotRunning { path: PathBuf },
    #[error(
        "permission denied on {path}: only root and members of group `aither` may use aitherd"
    )]
    Denied { path: PathBuf },
    #[error("cannot connect to aitherd at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to aitherd: {0}")]
    Frame(#[from] FrameError),
    #[error("aitherd closed the connection without a reply")]
    NoReply,
    #[error("aitherd sent a reply that is not understood: {0}")]
    BadReply(#[source] serde_json::Error),
}

pub struct Client {
    stream: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        match UnixStream::connect(path) {
            Ok(stream) => Ok(Client { stream }),
            Err(e) => Err(match e.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                    ClientError::NotRunning {
                        path: path.to_path_buf(),
                    }
                }
                io::ErrorKind::PermissionDenied => ClientError::Denied {
                    path: path.to_path_buf(),
                },
                _ => ClientError::Connect {
                    path: path.to_path_buf(),
                    source: e,
                },
            }),
        }
    }

    fn read_reply(&mut self) -> Result<Reply, ClientError> {
        let body = proto::read_frame_limit(&mut self.stream, proto::MAX_REPLY)?
            .ok_or(ClientError::NoReply)?;
        serde_json::from_slice(&body).map_err(ClientError::BadReply)
    }

    /// One request, one reply.
    pub fn call(&mut self, req: &Request) -> Result<Reply, ClientError> {
        proto::write_frame(&mut self.stream, req)?;
        self.read_reply()
    }

    /// One request with descriptors attached (SCM_RIGHTS), one reply.
    pub fn call_with_fds(
        &mut self,
        req: &Request,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<Reply, ClientError> {
        proto::write_frame_fds(&self.stream, req, fds)?;
        self.read_reply()
    }

    /// One request, one reply with the descriptors sent with it (SCM_RIGHTS).
    pub fn call_recv_fds(
        &mut self,
        req: &Request,
    ) -> Result<(Reply, Vec<std::os::fd::OwnedFd>), ClientError> {
        use std::os::fd::AsFd;
        proto::write_frame(&mut self.stream, req)?;
        let (body, fds) = proto::read_frame_fds_blocking(self.stream.as_fd(), proto::MAX_REPLY)?
            .ok_or(ClientError::NoReply)?;
        let reply = serde_json::from_slice(&body).map_err(ClientError::BadReply)?;
        Ok((reply, fds))
    }

    /// A request with a streamed answer: `each` gets every reply until one without `more`
    /// (or until it returns false).
    pub fn stream(
        &mut self,
        req: &Request,
        mut each: impl FnMut(&Reply) -> bool,
    ) -> Result<(), ClientError> {
        proto::write_frame(&mut self.stream, req)?;
        loop {
            let r = self.read_reply()?;
            if !each(&r) || !r.more {
                return Ok(());
            }
        }
    }
}
