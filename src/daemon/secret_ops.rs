//! Secrets through aitherd (issue 18): each user sets, lists, rotates and removes their own
//! secrets (net::secrets, one namespace per uid under `<state dir>/secrets`); root and
//! aither-admin see and manage everyone's. A member never reads the store's files: aitherd
//! writes and reads them through src/hostpath.rs. Another user's secret is answered as if it
//! did not exist ("no secret named …") and the attempt is an audited denial. Values are never
//! in a reply, a log line or an audit record.

use serde_json::json;

use super::identity::Caller;
use super::proto::{ErrorCode, Reply};
use super::Daemon;
use crate::audit::{Entry, Verdict};
use crate::net::secrets::{SecretError, SecretRef, SecretStore};
use crate::net::NetGrants;

/// What a secret request asks for.
pub enum Op<'a> {
    Set { name: &'a str, value: &'a str },
    Ls,
    Rm { name: &'a str },
}

impl Op<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Op::Set { .. } => "secret_set",
            Op::Ls => "secret_ls",
            Op::Rm { .. } => "secret_rm",
        }
    }

    fn name(&self) -> Option<&str> {
        match self {
            Op::Set { name, .. } | Op::Rm { name } => Some(name),
            Op::Ls => None,
        }
    }
}

fn not_found(name: &str) -> Reply {
    Reply::err(
        ErrorCode::NotFound,
        format!("no secret named {name:?} (`aitherctl secret ls` lists yours)"),
    )
}

fn reply_err(e: &SecretError) -> Reply {
    match e {
        SecretError::NotFound(n) => not_found(n),
        SecretError::BadName(_) | SecretError::BadValue => {
            Reply::err(ErrorCode::Invalid, e.to_string())
        }
        SecretError::Io { .. } => {
            // The path and cause go to aitherd's log; the caller learns that it failed.
            tracing::error!(error = %e, "secret store");
            Reply::err(
                ErrorCode::Internal,
                "the secret store failed (aitherd's log says why)",
            )
        }
    }
}

/// Runs `op` for `caller` on uid `owner`'s secrets (`None`: the caller's own). A non-admin
/// naming anyone else gets "no secret named …" and an audited denial.
pub fn handle(d: &Daemon, caller: &Caller, op: Op<'_>, owner: Option<u32>) -> Reply {
    let store = d.secrets();
    let target = owner.unwrap_or(caller.uid);
    let entry = |decision, rule: &str| {
        let mut e = Entry::new(op.kind(), decision, rule)
            .actor(caller.actor())
            .caller(caller.uid)
            .via(caller.via_name())
            .owner(target);
        if let Some(n) = op.name() {
            e = e.data(json!({"secret": n}));
        }
        e
    };
    if !caller.may_act_on(target) {
        d.audit.record(
            entry(
                Verdict::Deny,
                "owner: only the secret's owner, root or aither-admin",
            )
            .data(json!({"secret": op.name(), "cross_user": true})),
        );
        return match op.name() {
            Some(n) => not_found(n),
            None => Reply::err(
                ErrorCode::Denied,
                "only root and aither-admin list another user's secrets",
            ),
        };
    }
    let result = match &op {
        Op::Set { name, value } => store
            .set(target, name, value)
            .map(|rotated| json!({"name": name, "owner": target, "rotated": rotated})),
        Op::Rm { name } => store
            .remove(target, name)
            .map(|()| json!({"name": name, "owner": target, "removed": true})),
        Op::Ls => {
            // An admin's listing without an owner is everyone's.
            let whose = if caller.admin && owner.is_none() {
                None
            } else {
                Some(target)
            };
            store.list(whose).map(|l| json!({"secrets": l}))
        }
    };
    match result {
        Ok(v) => {
            if !matches!(op, Op::Ls) {
                d.audit
                    .record(entry(Verdict::Allow, "control socket: the secret's owner"));
            }
            Reply::ok(v)
        }
        Err(e) => {
            // Not marked with whether another user holds the name: the caller reads their own
            // records (`aitherctl audit`), which must not tell them who has which secret.
            d.audit.record(entry(Verdict::Deny, &e.to_string()));
            reply_err(&e)
        }
    }
}

/// A member's launch: every route must name a secret the agent's owner has (`NAME`) or root's
/// (`root:NAME`, which only root can have written: routes come from the token's first block,
/// signed with the host key from an installed policy or by root's `token mint`). The refusal
/// names the route and the secret and is an audited denial (which, like the reply, does not
/// say whether another user has a secret of that name).
pub fn check_routes(
    d: &Daemon,
    store: &SecretStore,
    agent: &str,
    caller: &Caller,
    net: &NetGrants,
) -> Result<(), RouteError> {
    for r in &net.routes {
        let s = SecretRef::parse(&r.secret).map_err(|source| RouteError::BadRef {
            route: r.name.clone(),
            source,
        })?;
        let owner = s.owner(caller.uid);
        match store.exists(owner, s.name) {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "secret store");
                return Err(RouteError::Store(r.name.clone()));
            }
        }
        d.audit.record(
            Entry::new(
                "secret_use",
                Verdict::Deny,
                "owner: a route names its agent owner's secret or root:NAME",
            )
            .agent(agent)
            .actor(caller.actor())
            .caller(caller.uid)
            .via(caller.via_name())
            .owner(owner)
            .data(json!({"route": r.name, "secret": r.secret})),
        );
        return Err(RouteError::Missing {
            route: r.name.clone(),
            secret: r.secret.clone(),
            name: s.name.to_string(),
            of: if s.root { " of root's" } else { "" },
        });
    }
    Ok(())
}

/// Why a member's credential routes were refused (`check_routes`).
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("route {route:?}: {source}")]
    BadRef {
        route: String,
        #[source]
        source: crate::net::secrets::SecretError,
    },
    #[error("route {0:?}: the secret store failed (aitherd's log says why)")]
    Store(String),
    #[error("route {route:?} names secret {secret:?}: no secret named {name:?}{of} (aitherctl secret set {name})")]
    Missing {
        route: String,
        secret: String,
        name: String,
        of: &'static str,
    },
}

impl RouteError {
    /// The reply's code: the store's own failure is aitherd's, the rest the caller's.
    pub fn code(&self) -> ErrorCode {
        match self {
            RouteError::Store(_) => ErrorCode::Internal,
            _ => ErrorCode::Denied,
        }
    }
}
