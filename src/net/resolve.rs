//! Name resolution for the gateway, behind a trait: the host's resolver in production, a fixed
//! table in tests (there is no DNS here) — `AITHER_EGRESS_HOSTS`, docs/network.md.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;

/// The addresses of a name, as the host's resolver sees them.
pub type Resolved<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>>;

pub trait Resolve: Send + Sync {
    fn resolve<'a>(&'a self, host: &'a str) -> Resolved<'a>;
    /// Addresses that count as external although they are in an internal range (a test's
    /// stand-in upstreams on 127.0.0.x). Empty for the host's resolver.
    fn treat_as_external(&self, _ip: IpAddr) -> bool {
        false
    }
}

/// The host's resolver (getaddrinfo, via tokio's blocking pool).
#[derive(Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> Resolved<'a> {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host, 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// A fixed table: name → addresses. Addresses listed after `external` in the file are treated
/// as external (tests map public-looking names to 127.0.0.x this way).
#[derive(Default, Debug)]
pub struct StaticResolver {
    names: HashMap<String, Vec<IpAddr>>,
    external: Vec<IpAddr>,
}

impl StaticResolver {
    /// Lines `ADDRESS NAME…` (hosts(5) form); `ADDRESS NAME… # external` marks the address
    /// as external. `#` starts a comment otherwise.
    pub fn parse(text: &str) -> Result<StaticResolver, String> {
        let mut r = StaticResolver::default();
        for (n, line) in text.lines().enumerate() {
            let (body, comment) = line.split_once('#').unwrap_or((line, ""));
            let mut words = body.split_whitespace();
            let Some(addr) = words.next() else { continue };
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| format!("line {}: {addr:?} is not an IP address", n + 1))?;
            for name in words {
                r.names
                    .entry(name.to_ascii_lowercase())
                    .or_default()
                    .push(ip);
            }
            if comment.trim() == "external" && !r.external.contains(&ip) {
                r.external.push(ip);
            }
        }
        Ok(r)
    }

    pub fn load(path: &Path) -> Result<StaticResolver, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

impl Resolve for StaticResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> Resolved<'a> {
        let found = self.names.get(&host.to_ascii_lowercase()).cloned();
        Box::pin(async move {
            found.ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "name not in the resolver's table")
            })
        })
    }

    fn treat_as_external(&self, ip: IpAddr) -> bool {
        self.external.contains(&ip)
    }
}

/// The resolver a manager uses: `AITHER_EGRESS_HOSTS=FILE` (testing: a fixed table) or the
/// host's.
pub fn from_env() -> Result<Box<dyn Resolve>, String> {
    match std::env::var_os("AITHER_EGRESS_HOSTS").filter(|v| !v.is_empty()) {
        Some(p) => Ok(Box::new(StaticResolver::load(Path::new(&p))?)),
        None => Ok(Box::new(SystemResolver)),
    }
}
