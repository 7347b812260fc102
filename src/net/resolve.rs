//! Name resolution for the gateway, behind a trait: the host's resolver (getaddrinfo, so
//! /etc/hosts and DNS as nsswitch.conf says). There is no test-only resolver: the egress
//! suite runs the gateway in a private network and mount namespace whose /etc/hosts names
//! its upstreams (tests/egress.rs).

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;

/// The addresses of a name, as the host's resolver sees them.
pub type Resolved<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>>;

pub trait Resolve: Send + Sync {
    fn resolve<'a>(&'a self, host: &'a str) -> Resolved<'a>;
}

/// The host's resolver (getaddrinfo, via tokio's blocking pool).
#[derive(Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> Resolved<'a> {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host, 0)).await?;
            let mut out: Vec<IpAddr> = Vec::new();
            for a in addrs {
                if !out.contains(&a.ip()) {
                    out.push(a.ip());
                }
            }
            Ok(out)
        })
    }
}
