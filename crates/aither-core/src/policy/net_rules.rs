//! The `net` claims: what an agent may reach outside its sandbox (docs/network.md).
//!
//! The same value is a policy's `[net]` table (the template) and a token's `net` claim (the
//! grant). Default deny: an empty value grants nothing, and a token without the field (minted
//! before egress existed) decodes to the empty value.

use serde::{Deserialize, Serialize};

/// Suffix of the names under which granted services appear inside the sandbox.
pub const SERVICE_DOMAIN: &str = "aither.internal";

/// Errors of a `net` value (policy validation and token narrowing both use them).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("field `{field}`: {reason}")]
    Invalid { field: String, reason: String },
    #[error("field `{field}`: {detail}")]
    Widening { field: String, detail: String },
}

/// Why a host pattern, host name, service/route/secret name, service target or upstream is
/// not accepted (the text follows the field's name in a [`RuleError`]).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("an IP address; rules name hosts (addresses are checked after resolution)")]
    IpAddress,
    #[error("a host name of 1 to 253 characters")]
    HostLength,
    #[error("label {0:?}: lower-case letters, digits and '-' (not at either end)")]
    Label(String),
    #[error("the last label is all digits (an address, not a name)")]
    NumericLastLabel,
    /// A host pattern or upstream whose host name is not one.
    #[error("{0:?}: {1}")]
    Host(String, #[source] Box<NameError>),
    #[error("{0:?}: a wildcard needs at least two labels after it")]
    ShortWildcard(String),
    #[error("{0:?}: names under {SERVICE_DOMAIN} are services (`services`), not egress")]
    ServiceDomain(String),
    #[error("{0:?}: 1 to 32 of lower-case letters, digits, '-' and '_'")]
    Name(String),
    #[error("{0:?}: unix:/absolute/path")]
    RelativeUnixPath(String),
    #[error("{0:?}: ADDRESS:PORT (127.0.0.1:11434, [::1]:8080) or unix:/path")]
    Target(String, #[source] std::net::AddrParseError),
    #[error("{0:?}: must start with https:// (the secret travels over TLS only)")]
    NotHttps(String),
    #[error("{0:?}: bad port {1:?}")]
    Port(String, String),
    #[error("{0:?}: no query or fragment")]
    QueryOrFragment(String),
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> RuleError {
    RuleError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn widening(field: impl Into<String>, detail: impl Into<String>) -> RuleError {
    RuleError::Widening {
        field: field.into(),
        detail: detail.into(),
    }
}

/// One egress rule: host-name patterns, ports and (optionally) HTTP methods.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EgressRule {
    /// `api.example.com` (exactly that name) or `*.example.com` (any name below it, not the
    /// name itself). Lower case; never an IP address.
    pub hosts: Vec<String>,
    /// TCP ports (at least one).
    pub ports: Vec<u16>,
    /// HTTP methods allowed in plain-HTTP requests (`GET`, `POST`, …); empty: any. A rule
    /// with methods allows no tunnel (CONNECT, SOCKS5): inside TLS the gateway cannot see them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

/// A named host service the agent may reach as `NAME.aither.internal`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceGrant {
    /// 1 to 32 of lower-case letters, digits and '-'.
    pub name: String,
    /// Where it is on the host: `127.0.0.1:11434`, `[::1]:8080` or `unix:/run/llm.sock`.
    /// None: a service an agent publishes through aitherd (`aitherctl spawn --publish`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Requests (or connections, for tunnels) per minute this agent may make to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// What the service speaks, when the gateway should understand it: `"openai"` (an
    /// OpenAI-compatible inference API) makes the gateway count each response's `usage`
    /// tokens for this agent, answer quota refusals as OpenAI error objects, and take plain
    /// HTTP only (docs/agents.md "Local inference as a service"). None: bytes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<ServiceApi>,
    /// Tokens (the responses' `usage.total_tokens`) this agent may use per minute (sliding
    /// 60 s); needs `api`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Tokens this agent may use per day (a sliding 24 h, in 10-minute steps); needs `api`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
}

/// A service protocol the gateway understands (`net.services[].api`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ServiceApi {
    /// OpenAI-compatible: `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings` with a
    /// `usage` object in the response (in the last SSE chunk when streaming).
    Openai,
}

impl ServiceGrant {
    /// Whether the gateway counts this service's tokens (it speaks an API the gateway reads).
    pub fn metered(&self) -> bool {
        self.api.is_some()
    }
}

/// A credential route: plain HTTP to `http://127.0.0.1:PORT/NAME/…` inside the sandbox goes to
/// `upstream` + `…` over TLS, with the secret added as a header on the way out.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteGrant {
    /// The first path segment inside (`openai` → `/openai/`).
    pub name: String,
    /// `https://api.openai.com/v1` (https only).
    pub upstream: String,
    /// The secret's name in the host's secret store (`aitherctl secret set NAME`): the agent
    /// owner's secret NAME, or root's with `root:NAME`.
    pub secret: String,
    /// The header that carries it [default: Authorization].
    #[serde(default = "default_header")]
    pub header: String,
    /// Put before the secret in the header [default: "Bearer "].
    #[serde(default = "default_scheme")]
    pub prefix: String,
    /// HTTP methods the route forwards; empty: [`ROUTE_DEFAULT_METHODS`]. TRACE, TRACK and
    /// CONNECT are never allowed (an upstream that echoes the request hands the secret back).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

/// The methods a route forwards when it lists none.
pub const ROUTE_DEFAULT_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"];
/// Methods no route forwards: they reflect the request (and its credential) or open tunnels.
pub const ROUTE_FORBIDDEN_METHODS: &[&str] = &["TRACE", "TRACK", "CONNECT", "DEBUG"];

impl RouteGrant {
    /// Whether the route forwards `method`.
    pub fn allows_method(&self, method: &str) -> bool {
        if ROUTE_FORBIDDEN_METHODS.contains(&method) {
            return false;
        }
        if self.methods.is_empty() {
            ROUTE_DEFAULT_METHODS.contains(&method)
        } else {
            self.methods.iter().any(|m| m == method)
        }
    }
}

fn default_header() -> String {
    "Authorization".into()
}

fn default_scheme() -> String {
    "Bearer ".into()
}

/// Per-agent quotas over all of its egress.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetQuota {
    /// Requests (plain HTTP) and connections (tunnels) per minute, sliding window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Bytes in both directions over the agent's run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

impl NetQuota {
    fn is_empty(&self) -> bool {
        self.requests_per_minute.is_none() && self.bytes.is_none()
    }
}

/// The `net` claim (and a policy's `[net]` table).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetGrants {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceGrant>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteGrant>,
    #[serde(default, skip_serializing_if = "NetQuota::is_empty")]
    pub quota: NetQuota,
}

impl NetGrants {
    /// Grants nothing (no gateway is set up for the agent).
    pub fn is_empty(&self) -> bool {
        self.egress.is_empty() && self.services.is_empty() && self.routes.is_empty()
    }

    /// Checks every field; errors name the field (`egress[0].hosts`).
    pub fn validate(&self) -> Result<(), RuleError> {
        for (i, r) in self.egress.iter().enumerate() {
            if r.hosts.is_empty() {
                return Err(invalid(format!("egress[{i}].hosts"), "at least one host"));
            }
            for h in &r.hosts {
                check_pattern(h)
                    .map_err(|e| invalid(format!("egress[{i}].hosts"), e.to_string()))?;
            }
            if r.ports.is_empty() || r.ports.contains(&0) {
                return Err(invalid(
                    format!("egress[{i}].ports"),
                    "at least one port, each 1 to 65535",
                ));
            }
            for m in &r.methods {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) || m == "CONNECT" {
                    return Err(invalid(
                        format!("egress[{i}].methods"),
                        format!("{m:?}: an upper-case HTTP method other than CONNECT"),
                    ));
                }
            }
        }
        for (i, s) in self.services.iter().enumerate() {
            check_name(&s.name)
                .map_err(|e| invalid(format!("services[{i}].name"), e.to_string()))?;
            if let Some(t) = &s.target {
                ServiceTarget::parse(t)
                    .map_err(|e| invalid(format!("services[{i}].target"), e.to_string()))?;
            }
            if self.services[..i].iter().any(|o| o.name == s.name) {
                return Err(invalid(
                    format!("services[{i}].name"),
                    format!("{:?} is granted twice", s.name),
                ));
            }
            for (field, v) in [
                ("tokens_per_minute", s.tokens_per_minute),
                ("tokens_per_day", s.tokens_per_day),
            ] {
                if v.is_some() && s.api.is_none() {
                    return Err(invalid(
                        format!("services[{i}].{field}"),
                        "token quotas need `api = \"openai\"` (the gateway counts tokens only in an API it reads)",
                    ));
                }
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            check_name(&r.name).map_err(|e| invalid(format!("routes[{i}].name"), e.to_string()))?;
            // NAME: the agent owner's secret; root:NAME: root's (net::secrets::SecretRef).
            let secret = r
                .secret
                .strip_prefix(ROOT_SECRET_PREFIX)
                .unwrap_or(&r.secret);
            check_name(secret)
                .map_err(|e| invalid(format!("routes[{i}].secret"), e.to_string()))?;
            Upstream::parse(&r.upstream)
                .map_err(|e| invalid(format!("routes[{i}].upstream"), e.to_string()))?;
            if r.header.is_empty()
                || !r
                    .header
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(invalid(
                    format!("routes[{i}].header"),
                    "a header name (letters, digits, '-')",
                ));
            }
            if r.prefix.bytes().any(|b| b.is_ascii_control()) {
                return Err(invalid(
                    format!("routes[{i}].prefix"),
                    "no control characters",
                ));
            }
            for m in &r.methods {
                if m.is_empty()
                    || !m.bytes().all(|b| b.is_ascii_uppercase())
                    || ROUTE_FORBIDDEN_METHODS.contains(&m.as_str())
                {
                    return Err(invalid(
                        format!("routes[{i}].methods"),
                        format!(
                            "{m:?}: an upper-case HTTP method other than {}",
                            ROUTE_FORBIDDEN_METHODS.join(", ")
                        ),
                    ));
                }
            }
            if self.routes[..i].iter().any(|o| o.name == r.name) {
                return Err(invalid(
                    format!("routes[{i}].name"),
                    format!("{:?} is granted twice", r.name),
                ));
            }
        }
        Ok(())
    }

    /// `self` (a child block) grants nothing `parent` does not: every rule is covered by one of
    /// the parent's rules, every service and route is one of the parent's (a service's quota
    /// at most the parent's), and the quotas are at most the parent's.
    pub fn narrows(&self, parent: &NetGrants) -> Result<(), RuleError> {
        self.validate()
            .map_err(|e| widening("net", format!("invalid: {e}")))?;
        for (i, r) in self.egress.iter().enumerate() {
            if !parent.egress.iter().any(|p| rule_within(r, p)) {
                return Err(widening(
                    format!("net.egress[{i}]"),
                    format!(
                        "hosts {:?} ports {:?} methods {:?} is not inside any of the parent's rules",
                        r.hosts, r.ports, r.methods
                    ),
                ));
            }
        }
        for s in &self.services {
            let Some(p) = parent.services.iter().find(|p| p.name == s.name) else {
                return Err(widening(
                    format!("net.services.{}", s.name),
                    "service not granted by the parent",
                ));
            };
            if s.target != p.target {
                return Err(widening(
                    format!("net.services.{}.target", s.name),
                    format!("{:?} differs from the parent's {:?}", s.target, p.target),
                ));
            }
            at_most_opt(
                &format!("net.services.{}.requests_per_minute", s.name),
                s.requests_per_minute,
                p.requests_per_minute,
            )?;
            if s.api != p.api {
                return Err(widening(
                    format!("net.services.{}.api", s.name),
                    format!("{:?} differs from the parent's {:?}", s.api, p.api),
                ));
            }
            at_most_opt(
                &format!("net.services.{}.tokens_per_minute", s.name),
                s.tokens_per_minute,
                p.tokens_per_minute,
            )?;
            at_most_opt(
                &format!("net.services.{}.tokens_per_day", s.name),
                s.tokens_per_day,
                p.tokens_per_day,
            )?;
        }
        for r in &self.routes {
            if !parent.routes.contains(r) {
                return Err(widening(
                    format!("net.routes.{}", r.name),
                    "route not granted by the parent (routes can only be removed)",
                ));
            }
        }
        at_most_opt(
            "net.quota.requests_per_minute",
            self.quota.requests_per_minute,
            parent.quota.requests_per_minute,
        )?;
        at_most_opt("net.quota.bytes", self.quota.bytes, parent.quota.bytes)
    }

    /// The first egress rule that allows `host:port` (with `method` for plain HTTP, None for a
    /// tunnel), as its index.
    pub fn find_rule(&self, host: &str, port: u16, method: Option<&str>) -> Option<usize> {
        self.egress.iter().position(|r| {
            r.ports.contains(&port)
                && r.hosts.iter().any(|p| host_matches(p, host))
                && match method {
                    None => r.methods.is_empty(),
                    Some(m) => r.methods.is_empty() || r.methods.iter().any(|x| x == m),
                }
        })
    }
}

/// None is unlimited (the widest).
fn at_most_opt(field: &str, child: Option<u64>, parent: Option<u64>) -> Result<(), RuleError> {
    match (child, parent) {
        (_, None) => Ok(()),
        (None, Some(p)) => Err(widening(
            field,
            format!("unlimited exceeds the parent's {p}"),
        )),
        (Some(c), Some(p)) if c > p => {
            Err(widening(field, format!("{c} exceeds the parent's {p}")))
        }
        _ => Ok(()),
    }
}

fn rule_within(c: &EgressRule, p: &EgressRule) -> bool {
    c.hosts
        .iter()
        .all(|h| p.hosts.iter().any(|ph| pattern_within(h, ph)))
        && c.ports.iter().all(|x| p.ports.contains(x))
        && (p.methods.is_empty()
            || (!c.methods.is_empty() && c.methods.iter().all(|m| p.methods.contains(m))))
}

/// Every name `child` matches is matched by `parent`.
pub fn pattern_within(child: &str, parent: &str) -> bool {
    match (child.strip_prefix("*."), parent.strip_prefix("*.")) {
        (None, None) => child == parent,
        (None, Some(ps)) => is_below(child, ps),
        (Some(_), None) => false,
        (Some(cs), Some(ps)) => cs == ps || is_below(cs, ps),
    }
}

/// `name` lies strictly below `suffix` (`a.b.c` below `b.c`).
fn is_below(name: &str, suffix: &str) -> bool {
    name.len() > suffix.len() + 1
        && name.ends_with(suffix)
        && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
}

/// Whether `host` (a name as the agent asked for it) matches `pattern`; case-insensitive, a
/// trailing dot ignored.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => is_below(&host, suffix),
        None => host == pattern,
    }
}

/// A host pattern: a lower-case DNS name, or `*.` and one (with at least two labels, so that
/// `*.com` cannot be written).
fn check_pattern(p: &str) -> Result<(), NameError> {
    let name = p.strip_prefix("*.").unwrap_or(p);
    check_dns_name(name).map_err(|e| NameError::Host(p.to_string(), Box::new(e)))?;
    if p.starts_with("*.") && !name.contains('.') {
        return Err(NameError::ShortWildcard(p.to_string()));
    }
    if name.ends_with(SERVICE_DOMAIN) {
        return Err(NameError::ServiceDomain(p.to_string()));
    }
    Ok(())
}

/// A lower-case DNS name that is not an IP address.
pub fn check_dns_name(name: &str) -> Result<(), NameError> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err(NameError::IpAddress);
    }
    if name.is_empty() || name.len() > 253 {
        return Err(NameError::HostLength);
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(NameError::Label(label.to_string()));
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|t| t.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(NameError::NumericLastLabel);
    }
    Ok(())
}

/// The prefix of a route's `secret` that names root's secret rather than the agent owner's
/// (`root:NAME`; net::secrets::SecretRef).
pub const ROOT_SECRET_PREFIX: &str = "root:";

/// A service, route or secret name: 1 to 32 of lower-case letters, digits, '-' and '_'.
pub fn check_name(n: &str) -> Result<(), NameError> {
    let ok = !n.is_empty()
        && n.len() <= 32
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !n.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(NameError::Name(n.to_string()))
    }
}

/// Where a service is on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceTarget {
    Tcp(std::net::SocketAddr),
    Unix(std::path::PathBuf),
}

impl ServiceTarget {
    pub fn parse(s: &str) -> Result<ServiceTarget, NameError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if !p.starts_with('/') {
                return Err(NameError::RelativeUnixPath(s.to_string()));
            }
            return Ok(ServiceTarget::Unix(p.into()));
        }
        s.parse::<std::net::SocketAddr>()
            .map(ServiceTarget::Tcp)
            .map_err(|e| NameError::Target(s.to_string(), e))
    }
}

/// A credential route's upstream: `https://HOST[:PORT][/PATH]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    /// Without a trailing '/' ("" for none).
    pub path: String,
}

impl Upstream {
    pub fn parse(s: &str) -> Result<Upstream, NameError> {
        let rest = s
            .strip_prefix("https://")
            .ok_or_else(|| NameError::NotHttps(s.to_string()))?;
        let (auth, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = match auth.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| NameError::Port(s.to_string(), p.to_string()))?,
            ),
            None => (auth, 443),
        };
        check_dns_name(host).map_err(|e| NameError::Host(s.to_string(), Box::new(e)))?;
        if path.contains(['?', '#', ' ']) {
            return Err(NameError::QueryOrFragment(s.to_string()));
        }
        Ok(Upstream {
            host: host.to_string(),
            port,
            path: path.trim_end_matches('/').to_string(),
        })
    }
}

impl NetGrants {
    /// Equal to the default (grants and quotas all absent): left out of tokens and policies.
    pub fn is_default(&self) -> bool {
        *self == NetGrants::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(hosts: &[&str], ports: &[u16], methods: &[&str]) -> EgressRule {
        EgressRule {
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
            ports: ports.to_vec(),
            methods: methods.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn patterns_match_exact_names_and_strict_subdomains() {
        assert!(host_matches("api.example.com", "API.example.com."));
        assert!(!host_matches("api.example.com", "xapi.example.com"));
        assert!(host_matches("*.example.com", "a.b.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "badexample.com"));
        assert!(!host_matches("*.example.com", "example.com.evil.net"));
    }

    #[test]
    fn rules_are_found_by_host_port_and_method() {
        let g = NetGrants {
            egress: vec![
                rule(&["api.example.com"], &[443], &[]),
                rule(&["*.docs.org"], &[80], &["GET"]),
            ],
            ..Default::default()
        };
        assert_eq!(g.find_rule("api.example.com", 443, None), Some(0));
        assert_eq!(g.find_rule("api.example.com", 80, None), None);
        assert_eq!(g.find_rule("x.docs.org", 80, Some("GET")), Some(1));
        assert_eq!(g.find_rule("x.docs.org", 80, Some("POST")), None);
        // A tunnel hides the method: a rule that limits methods allows none.
        assert_eq!(g.find_rule("x.docs.org", 80, None), None);
    }

    #[test]
    fn narrowing_only_removes_or_shrinks_rules() {
        let parent = NetGrants {
            egress: vec![rule(&["*.example.com"], &[443, 80], &[])],
            services: vec![ServiceGrant {
                name: "llm".into(),
                target: Some("127.0.0.1:11434".into()),
                requests_per_minute: Some(60),
                api: Some(ServiceApi::Openai),
                tokens_per_minute: Some(1000),
                tokens_per_day: Some(100_000),
            }],
            quota: NetQuota {
                requests_per_minute: Some(100),
                bytes: None,
            },
            ..Default::default()
        };
        // Dropping every rule narrows; dropping the quota (unlimited) does not.
        let none = NetGrants {
            quota: parent.quota.clone(),
            ..Default::default()
        };
        assert!(none.narrows(&parent).is_ok());
        assert!(NetGrants::default().narrows(&parent).is_err());
        let mut c = parent.clone();
        c.egress = vec![rule(&["api.example.com"], &[443], &["GET"])];
        assert!(c.narrows(&parent).is_ok());
        for bad in [
            rule(&["example.com"], &[443], &[]),
            rule(&["*.example.com"], &[8443], &[]),
            rule(&["api.other.com"], &[443], &[]),
        ] {
            let mut c = parent.clone();
            c.egress.push(bad.clone());
            assert!(c.narrows(&parent).is_err(), "{bad:?}");
        }
        let mut c = parent.clone();
        c.services[0].requests_per_minute = None;
        assert!(c.narrows(&parent).is_err());
        let mut c = parent.clone();
        c.services[0].target = Some("127.0.0.1:22".into());
        assert!(c.narrows(&parent).is_err());
        // Token quotas: lower narrows; higher, none (unlimited) or another api widens.
        let mut c = parent.clone();
        c.services[0].tokens_per_minute = Some(10);
        c.services[0].tokens_per_day = Some(500);
        assert!(c.narrows(&parent).is_ok());
        for f in [
            |c: &mut ServiceGrant| c.tokens_per_minute = Some(1001),
            |c: &mut ServiceGrant| c.tokens_per_day = None,
            |c: &mut ServiceGrant| {
                c.api = None;
                c.tokens_per_minute = None;
                c.tokens_per_day = None
            },
        ] {
            let mut c = parent.clone();
            f(&mut c.services[0]);
            assert!(c.narrows(&parent).is_err(), "{:?}", c.services[0]);
        }
        let mut c = parent.clone();
        c.services[0].api = None;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("services[0].tokens_per_minute"), "{e}");
        let mut c = parent.clone();
        c.quota.requests_per_minute = Some(101);
        assert!(c.narrows(&parent).is_err());
        // A method-limited parent rule cannot become an any-method child rule.
        let p2 = NetGrants {
            egress: vec![rule(&["a.example.com"], &[80], &["GET"])],
            ..Default::default()
        };
        let c2 = NetGrants {
            egress: vec![rule(&["a.example.com"], &[80], &[])],
            ..Default::default()
        };
        assert!(c2.narrows(&p2).is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let g = NetGrants {
            egress: vec![rule(&["10.0.0.1"], &[443], &[])],
            ..Default::default()
        };
        let e = g.validate().unwrap_err().to_string();
        assert!(
            e.contains("egress[0].hosts") && e.contains("IP address"),
            "{e}"
        );
        let g = NetGrants {
            egress: vec![rule(&["*.com"], &[443], &[])],
            ..Default::default()
        };
        assert!(g.validate().is_err());
        let g = NetGrants {
            routes: vec![RouteGrant {
                name: "openai".into(),
                upstream: "http://api.openai.com".into(),
                secret: "openai".into(),
                header: default_header(),
                prefix: default_scheme(),
                methods: Vec::new(),
            }],
            ..Default::default()
        };
        assert!(g.validate().unwrap_err().to_string().contains("https://"));
    }

    #[test]
    fn upstreams_parse() {
        let u = Upstream::parse("https://api.openai.com/v1/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("api.openai.com", 443, "/v1")
        );
        let u = Upstream::parse("https://x.example.com:8443").unwrap();
        assert_eq!((u.port, u.path.as_str()), (8443, ""));
    }

    #[test]
    fn name_errors_are_typed_and_keep_their_text() {
        assert_eq!(
            check_pattern("*.com"),
            Err(NameError::ShortWildcard("*.com".into()))
        );
        let e = check_pattern("Bad.example.com").unwrap_err();
        assert_eq!(
            e,
            NameError::Host(
                "Bad.example.com".into(),
                Box::new(NameError::Label("Bad".into()))
            )
        );
        assert_eq!(
            e.to_string(),
            "\"Bad.example.com\": label \"Bad\": lower-case letters, digits and '-' (not at either end)"
        );
        let src = std::error::Error::source(&e).map(ToString::to_string);
        assert_eq!(
            src.as_deref(),
            Some("label \"Bad\": lower-case letters, digits and '-' (not at either end)")
        );
        assert!(matches!(
            ServiceTarget::parse("localhost:80"),
            Err(NameError::Target(t, _)) if t == "localhost:80"
        ));
        assert_eq!(
            Upstream::parse("https://a.example.com:0"),
            Err(NameError::Port(
                "https://a.example.com:0".into(),
                "0".into()
            ))
        );
    }
}
