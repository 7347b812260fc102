//! Network egress (docs/network.md): the `net` claims, and the gateway in the manager that is
//! the sandbox's only way out.
//!
//! The sandbox keeps its own network namespace with loopback only. For an agent whose token
//! grants egress, the launcher binds a listening socket on 127.0.0.1:[`GATEWAY_PORT`] *inside*
//! that namespace before the agent exists and hands the descriptor to the manager's gateway
//! (in-process for `aitherctl run`, shared in aitherd), which accepts the agent's connections
//! directly: nothing extra runs inside and no route or veth exists. The agent's environment
//! points HTTP_PROXY, HTTPS_PROXY and ALL_PROXY at that address.

pub mod addr;
pub mod config;
pub mod gateway;
pub mod inprocess;
pub mod inspect;
pub mod resolve;
pub use crate::policy::net_rules as rules;
pub mod secrets;
mod socks;
pub mod usage;

pub use gateway::{AgentNet, Gateway, GatewayConfig, NetEvent, RuleStats};
pub use inprocess::InProcessGateway;
pub use resolve::{Resolve, SystemResolver};
pub use rules::{
    EgressRule, NameError, NetGrants, NetQuota, RouteGrant, RuleError, ServiceApi, ServiceGrant,
};

use crate::sandbox::SandboxSpec;

/// The gateway's port on the sandbox's own loopback (its netns is private: no clash with the
/// host or another sandbox).
pub const GATEWAY_PORT: u16 = 3128;

/// Prepares `spec` for egress through the gateway when `grants` grants anything and the sandbox
/// has its own network namespace: the listening port the launcher creates inside, the proxy
/// variables, and (for a Landlock-confined `none` network) the one TCP port the agent may
/// connect to. Returns whether a gateway is needed.
pub fn attach(spec: &mut SandboxSpec, grants: &NetGrants) -> bool {
    if grants.is_empty() || !spec.new_net_ns {
        return false;
    }
    spec.egress_port = Some(GATEWAY_PORT);
    let url = format!("http://127.0.0.1:{GATEWAY_PORT}");
    let socks = format!("socks5h://127.0.0.1:{GATEWAY_PORT}");
    let mut vars: Vec<(String, String)> = vec![
        ("HTTP_PROXY".into(), url.clone()),
        ("HTTPS_PROXY".into(), url.clone()),
        ("ALL_PROXY".into(), socks.clone()),
        // curl and others read only the lower-case http_proxy.
        ("http_proxy".into(), url.clone()),
        ("https_proxy".into(), url.clone()),
        ("all_proxy".into(), socks),
        ("NO_PROXY".into(), "localhost,127.0.0.1,::1".into()),
        ("no_proxy".into(), "localhost,127.0.0.1,::1".into()),
        ("AITHER_EGRESS".into(), url.clone()),
    ];
    for r in &grants.routes {
        vars.push((
            format!("AITHER_ROUTE_{}", env_name(&r.name)),
            format!("{url}/{}", r.name),
        ));
    }
    for (k, v) in vars {
        spec.env.retain(|(ek, _)| *ek != k);
        spec.env.push((k, v));
    }
    true
}

fn env_name(n: &str) -> String {
    n.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}
