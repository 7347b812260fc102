//! `spawn --publish-host HOSTADDR:HOSTPORT=AGENTPORT` (docs/network.md "Publishing an agent's
//! port on the host's loopback"): what podman's `-p 127.0.0.1:8080:8000` is, in Aither's
//! spelling. Parsed and checked the same way by aitherctl (early, for a clear message) and
//! aitherd (the request is what it acts on).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// One published port: aitherd listens on `host` (a loopback address of the host) and relays
/// each connection to 127.0.0.1:`agent_port` inside the agent's network namespace.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct HostPublish {
    pub host: SocketAddr,
    pub agent_port: u16,
}

/// Why a `--publish-host` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPublishError {
    #[error(
        "{0:?}: expected HOSTADDR:HOSTPORT=AGENTPORT (e.g. 127.0.0.1:8080=8000 or [::1]:8080=8000)"
    )]
    Syntax(String),
    #[error("{0:?}: {1} must be 1 to 65535")]
    Port(String, &'static str),
    #[error("{spec:?}: {addr} is not a loopback address; aitherd publishes only on the host's loopback (127.0.0.0/8 or ::1), never on a network other hosts can reach")]
    NotLoopback { spec: String, addr: IpAddr },
    #[error("{0} is published twice")]
    Duplicate(SocketAddr),
    #[error("at most {max} ports may be published per agent ({asked} asked)")]
    TooMany { asked: usize, max: usize },
}

/// Published ports one agent may ask for (each holds a listener in aitherd).
pub const MAX_HOST_PUBLISH: usize = 16;

impl HostPublish {
    /// Parses `HOSTADDR:HOSTPORT=AGENTPORT` and checks that HOSTADDR is a loopback address.
    pub fn parse(s: &str) -> Result<HostPublish, HostPublishError> {
        let syntax = || HostPublishError::Syntax(s.to_string());
        let (host, agent) = s.rsplit_once('=').ok_or_else(syntax)?;
        let host: SocketAddr = host.trim().parse().map_err(|_| syntax())?;
        let agent_port = agent
            .trim()
            .parse::<u16>()
            .map_err(|_| HostPublishError::Port(s.to_string(), "AGENTPORT"))?;
        if agent_port == 0 {
            return Err(HostPublishError::Port(s.to_string(), "AGENTPORT"));
        }
        if host.port() == 0 {
            return Err(HostPublishError::Port(s.to_string(), "HOSTPORT"));
        }
        let p = HostPublish { host, agent_port };
        p.check().map_err(|e| match e {
            HostPublishError::NotLoopback { addr, .. } => HostPublishError::NotLoopback {
                spec: s.to_string(),
                addr,
            },
            other => other,
        })?;
        Ok(p)
    }

    /// The address must be loopback (127.0.0.0/8, ::1) and neither port 0: checked again by
    /// aitherd on every request, whoever built it.
    pub fn check(&self) -> Result<(), HostPublishError> {
        let ip = self.host.ip();
        // An IPv4-mapped ::ffff:127.0.0.1 is refused too: say 127.0.0.1.
        if !ip.is_loopback() {
            return Err(HostPublishError::NotLoopback {
                spec: self.to_string(),
                addr: ip,
            });
        }
        if self.host.port() == 0 {
            return Err(HostPublishError::Port(self.to_string(), "HOSTPORT"));
        }
        if self.agent_port == 0 {
            return Err(HostPublishError::Port(self.to_string(), "AGENTPORT"));
        }
        Ok(())
    }

    /// Whether binding the host port needs root (below 1024, as for any Linux process without
    /// CAP_NET_BIND_SERVICE).
    pub fn privileged(&self) -> bool {
        self.host.port() < 1024
    }

    /// Checks a whole request's list: each entry, no host address twice, at most
    /// [`MAX_HOST_PUBLISH`].
    pub fn check_all(list: &[HostPublish]) -> Result<(), HostPublishError> {
        if list.len() > MAX_HOST_PUBLISH {
            return Err(HostPublishError::TooMany {
                asked: list.len(),
                max: MAX_HOST_PUBLISH,
            });
        }
        for (i, p) in list.iter().enumerate() {
            p.check()?;
            if list[..i].iter().any(|q| q.host == p.host) {
                return Err(HostPublishError::Duplicate(p.host));
            }
        }
        Ok(())
    }
}

/// `127.0.0.1:8080=8000`, `[::1]:8080=8000`: the form `--publish-host` takes.
impl fmt::Display for HostPublish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.host, self.agent_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_v4_and_v6_parse_and_print_back() {
        for s in [
            "127.0.0.1:8080=8000",
            "127.3.4.5:1=65535",
            "[::1]:8080=8000",
        ] {
            assert_eq!(HostPublish::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn other_addresses_and_bad_ports_are_refused() {
        for s in [
            "0.0.0.0:8080=8000",
            "10.0.0.1:8080=8000",
            "[::]:8080=8000",
            "[::ffff:127.0.0.1]:8080=8000",
        ] {
            assert!(
                matches!(
                    HostPublish::parse(s),
                    Err(HostPublishError::NotLoopback { .. })
                ),
                "{s}"
            );
        }
        for s in [
            "127.0.0.1:0=8000",
            "127.0.0.1:8080=0",
            "127.0.0.1:8080=70000",
        ] {
            assert!(
                matches!(HostPublish::parse(s), Err(HostPublishError::Port(..))),
                "{s}"
            );
        }
        for s in ["8080=8000", "127.0.0.1:8080", "localhost:8080=8000", ""] {
            assert!(
                matches!(HostPublish::parse(s), Err(HostPublishError::Syntax(_))),
                "{s}"
            );
        }
    }

    #[test]
    fn a_list_is_refused_with_a_duplicate_or_too_many() {
        let a = HostPublish::parse("127.0.0.1:8080=8000").unwrap();
        let b = HostPublish::parse("127.0.0.1:8080=9000").unwrap();
        assert_eq!(
            HostPublish::check_all(&[a, b]),
            Err(HostPublishError::Duplicate(a.host))
        );
        let many: Vec<HostPublish> = (0..17)
            .map(|i| HostPublish::parse(&format!("127.0.0.1:{}=80", 9000 + i)).unwrap())
            .collect();
        assert!(matches!(
            HostPublish::check_all(&many),
            Err(HostPublishError::TooMany { .. })
        ));
        assert!(HostPublish::check_all(&many[..16]).is_ok());
        assert!(!a.privileged());
        assert!(HostPublish::parse("127.0.0.1:80=8000")
            .unwrap()
            .privileged());
    }
}
