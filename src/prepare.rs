//! One path from a launch request to a sandbox spec (issue 18, "one path"): `run`, `spawn`
//! and `export` all call [`prepare`], so a check cannot live in one front door only.
//!
//! In order: the name; the token's source (a given token, verified against the host key and
//! the revocations; or a policy, from which a token is minted for the caller and verified the
//! same way); the owner (a non-admin uses only installed policies and tokens minted for
//! them); the subject (the token is for this name); the spec from the effective claims; the
//! workspace (inside the token's `workspace_root`, opened without following links and checked
//! as a descriptor, the caller's own unless an admin); the egress port.

use std::path::Path;
use std::time::Duration;

use crate::agent_name::AgentName;
use crate::net::NetGrants;
use crate::policy::{Policy, PolicyError};
use crate::sandbox::spec::WorkspaceOwner;
use crate::sandbox::workspace::{self, WorkspaceError};
use crate::sandbox::{RunOptions, SandboxSpec, SpecError};
use crate::token::{
    self, Claims, HostKey, NoRevocations, RevocationStore, Token, TokenError, Verified,
};
use crate::trace;

/// Who a launch is for: the uid the workspace and the agent's files belong to, and whether
/// they act for everyone (root, aitherd's uid, `aither-admin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Principal {
    pub uid: u32,
    pub gid: u32,
    pub admin: bool,
}

impl Principal {
    /// The process itself (`aitherctl run` and `export`): an admin when it is root.
    pub fn current() -> Principal {
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        Principal {
            uid,
            gid,
            admin: uid == 0,
        }
    }
}

/// Where the token comes from.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    /// A token's text.
    Token(&'a str),
    /// A policy name (or, for admins, a path): a token is minted from it.
    Policy(&'a str),
}

impl<'a> Source<'a> {
    /// A request's token if it gives one, else its policy (`strict` when it names none), as
    /// `spawn` and `run` take them.
    pub fn of(token: Option<&'a str>, policy: Option<&'a str>) -> Source<'a> {
        match token {
            Some(t) => Source::Token(t),
            None => Source::Policy(policy.unwrap_or("strict")),
        }
    }
}

/// Signs and verifies tokens: the host key and its revocations (aitherd, or `--token` on the
/// command line), or a key of one launch (`run --policy`, whose token never leaves the
/// process).
pub trait Authority {
    fn verify(&self, text: &str) -> Result<Verified, TokenError>;
    fn sign(&self, claims: &Claims) -> Result<String, TokenError>;
    /// A policy's claims made into verified claims: minted, then verified as any token is.
    /// Returns the token's text too, or None where it never exists (`OneLaunch`).
    fn mint_verified(&self, claims: &Claims) -> Result<(Option<String>, Verified), TokenError> {
        let text = self.sign(claims)?;
        let v = self.verify(&text)?;
        Ok((Some(text), v))
    }
}

/// The authority of one launch whose token never leaves the process (`run --policy`,
/// `export --policy`): its claims are checked as a token's are but signed by nobody
/// (`token::verified_here`: a signature by a key made for the launch, checked by the same
/// process, would prove only that this process made them). `sign` and `verify` still work,
/// with a key made for this launch on first use; nothing it signs can be revoked or used
/// elsewhere.
#[derive(Default)]
pub struct OneLaunch {
    key: std::sync::OnceLock<ed25519_dalek::SigningKey>,
}

impl OneLaunch {
    pub fn new() -> OneLaunch {
        OneLaunch::default()
    }

    fn key(&self) -> Result<&ed25519_dalek::SigningKey, TokenError> {
        if let Some(k) = self.key.get() {
            return Ok(k);
        }
        let k = token::fresh_key()?;
        Ok(self.key.get_or_init(|| k))
    }
}

impl Authority for OneLaunch {
    fn verify(&self, text: &str) -> Result<Verified, TokenError> {
        // The id was drawn from the kernel's random source a moment ago: no revocation list
        // can hold it.
        token::verify(
            &Token::decode(text)?,
            &self.key()?.verifying_key(),
            token::now_unix(),
            &NoRevocations,
        )
    }

    fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        Ok(token::mint(self.key()?, claims)?.encode())
    }

    fn mint_verified(&self, claims: &Claims) -> Result<(Option<String>, Verified), TokenError> {
        Ok((None, token::verified_here(claims, token::now_unix())?))
    }
}

/// The host key (or another host's public key) and this host's revocation list, as read now.
pub struct HostAuthority {
    public: ed25519_dalek::VerifyingKey,
    /// None: verification only (a token minted on another host).
    key: Option<HostKey>,
    revocations: Option<RevocationStore>,
}

impl HostAuthority {
    pub fn load(state_dir: &Path) -> Result<HostAuthority, TokenError> {
        let key = HostKey::load(state_dir)?;
        Ok(HostAuthority {
            public: key.public(),
            key: Some(key),
            revocations: RevocationStore::open_existing(state_dir)?,
        })
    }

    /// Verifies with another host's public key (this host's revocations still apply);
    /// mints nothing.
    pub fn verify_only(
        public: ed25519_dalek::VerifyingKey,
        state_dir: &Path,
    ) -> Result<HostAuthority, TokenError> {
        Ok(HostAuthority {
            public,
            key: None,
            revocations: RevocationStore::open_existing(state_dir)?,
        })
    }
}

impl Authority for HostAuthority {
    fn verify(&self, text: &str) -> Result<Verified, TokenError> {
        token::verify(
            &Token::decode(text)?,
            &self.public,
            token::now_unix(),
            &self.revocations,
        )
    }

    fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        let Some(key) = &self.key else {
            return Err(TokenError::BadRequest {
                field: "key",
                reason: "a verification-only key (--pubkey) mints nothing".into(),
            });
        };
        Ok(token::mint(key.signing_key(), claims)?.encode())
    }
}

/// Whether the workspace is a host directory (checked and mounted) or a placeholder (a
/// Kubernetes Pod's emptyDir, where no host directory is involved).
#[derive(Clone, Copy, Debug)]
pub enum WorkspaceKind<'a> {
    /// A host directory named by path, for a caller who may name any (root, admins).
    Host,
    /// A host directory the caller opened with their own rights and passed (SCM_RIGHTS):
    /// required of non-admins, so aitherd never reaches a directory the caller could not.
    Presented(std::os::fd::BorrowedFd<'a>),
    Placeholder,
}

impl<'a> WorkspaceKind<'a> {
    /// The directory a request presented, else the path it names (aitherd's `spawn` and
    /// `run`; `prepare` refuses a path from a non-admin).
    pub fn presented_or_host(presented: Option<std::os::fd::BorrowedFd<'a>>) -> WorkspaceKind<'a> {
        presented.map_or(WorkspaceKind::Host, WorkspaceKind::Presented)
    }
}

/// The value of `key` among a request's passed environment (`pass_env` of `spawn` and `run`).
pub fn passed_env(pass: &[(String, String)], key: &str) -> Option<String> {
    pass.iter().find(|(n, _)| n == key).map(|(_, v)| v.clone())
}

/// Whether a gateway will serve the agent's egress (`run` starts one in-process, aitherd has
/// its own) or none exists (an export: its runtime has no Aither gateway).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Egress {
    Gateway,
    NoGateway,
}

/// What a front door asks for.
pub struct LaunchRequest<'a> {
    /// The agent's name; None with a token: the token's subject.
    pub name: Option<&'a str>,
    pub source: Source<'a>,
    /// Lifetime of a token minted from a policy.
    pub ttl: Duration,
    /// Bus subjects granted on top of a policy's (only with `Source::Policy`).
    pub bus_publish: &'a [String],
    pub bus_subscribe: &'a [String],
    /// Flags that narrow the claims (`name` in it is ignored: see `name`).
    pub opts: RunOptions,
    /// The caller's working directory (the default workspace, the base of a relative one).
    pub cwd: &'a Path,
    /// The caller's environment, for the policy's `pass_env`.
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub workspace: WorkspaceKind<'a>,
    pub egress: Egress,
}

/// A launch ready to start.
#[derive(Debug)]
pub struct PreparedLaunch {
    pub spec: SandboxSpec,
    pub verified: Verified,
    /// The token's text (given or minted); None for a `OneLaunch`, whose token never exists
    /// outside the process.
    pub token: Option<String>,
    /// Set when the token was minted here: the policy's name and where it was loaded from.
    pub minted: Option<(String, String)>,
    /// The egress grants; `spec.egress_port` is set when they need the gateway.
    pub net: NetGrants,
    pub egress: bool,
}

/// Why a launch was refused.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Name(#[from] crate::agent_name::NameError),
    #[error("--bus-publish/--bus-subscribe add to a token minted from a policy; a given token already says what it grants (mint it with those subjects)")]
    BusWithToken,
    #[error("only root and aither-admin may launch from a policy file ({0}); name an installed policy (`aitherctl policy ls`)")]
    PolicyFile(String),
    #[error("token {id} was not minted for uid {uid} (root mints with `aitherctl token mint --for-user`)")]
    NotOwner { id: String, uid: u32 },
    #[error("the token is for {token:?}, not {name:?}")]
    Subject { token: String, name: String },
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Workspace(#[from] WorkspaceError),
}

impl PrepareError {
    /// The control protocol's error code.
    pub fn code(&self) -> aither_proto::ErrorCode {
        use aither_proto::ErrorCode;
        match self {
            PrepareError::PolicyFile(_)
            | PrepareError::NotOwner { .. }
            | PrepareError::Subject { .. }
            | PrepareError::Workspace(_) => ErrorCode::Denied,
            PrepareError::Token(t) if t.is_refusal() => ErrorCode::Denied,
            _ => ErrorCode::Invalid,
        }
    }
}

/// A policy named, not given as a file: what a non-admin may use (root installed it).
fn is_installed_name(p: &str) -> bool {
    !p.is_empty()
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The one path from a request to a spec (see the module's documentation for the order).
pub fn prepare(
    req: &LaunchRequest<'_>,
    caller: &Principal,
    auth: &dyn Authority,
) -> Result<PreparedLaunch, PrepareError> {
    if let Some(n) = req.name {
        AgentName::parse("name", n)?;
    }
    let (text, verified, minted) = match req.source {
        Source::Token(t) => {
            if !req.bus_publish.is_empty() || !req.bus_subscribe.is_empty() {
                return Err(PrepareError::BusWithToken);
            }
            let v = auth.verify(t)?;
            trace::mark("ctl", "token verify");
            // A token is the authority of whoever it was minted for (block 0's owner).
            if !caller.admin && v.root().owner != Some(caller.uid) {
                return Err(PrepareError::NotOwner {
                    id: v.id().into(),
                    uid: caller.uid,
                });
            }
            (Some(t.to_string()), v, None)
        }
        Source::Policy(p) => {
            // A policy decides what root sets up: a non-admin picks only installed ones.
            if !caller.admin && !is_installed_name(p) {
                return Err(PrepareError::PolicyFile(p.into()));
            }
            trace::mark("ctl", "policy named");
            let loaded = Policy::load(p)?;
            trace::mark("ctl", "policy load+parse");
            let name = req.name.unwrap_or("run");
            let mut claims = Claims::from_policy(&loaded.policy, name, req.ttl)?;
            claims.owner = Some(caller.uid);
            claims.grant_bus(req.bus_publish, req.bus_subscribe)?;
            trace::mark("ctl", "claims");
            let (text, v) = auth.mint_verified(&claims)?;
            trace::mark("ctl", "token mint+verify");
            (text, v, Some((loaded.policy.name.clone(), loaded.source)))
        }
    };
    let claims = verified.effective();
    let name = req.name.unwrap_or(&claims.subject);
    if claims.subject != name {
        return Err(PrepareError::Subject {
            token: claims.subject.clone(),
            name: name.into(),
        });
    }
    AgentName::parse("name", name)?;
    let opts = RunOptions {
        name: Some(name.into()),
        ..req.opts.clone()
    };
    let mut spec = SandboxSpec::derive(&claims.to_policy(), &opts, req.env, req.cwd)?;
    trace::mark("ctl", "spec");
    if let Some(w) = &mut spec.workspace {
        let presented = match req.workspace {
            WorkspaceKind::Placeholder => None,
            WorkspaceKind::Host => Some(None),
            WorkspaceKind::Presented(fd) => Some(Some(fd)),
        };
        if let Some(presented) = presented {
            verified.check_workspace(&w.path)?;
            // An early, clear refusal; the launcher opens the path again without following
            // links and checks that descriptor (the one it mounts) against the identity
            // pinned here.
            let owner = (!caller.admin).then_some(caller.uid);
            let opened = workspace::open_checked(&w.path, owner)?;
            match presented {
                Some(fd) => workspace::check_presented(&opened, fd)?,
                None if !caller.admin => {
                    return Err(WorkspaceError::NotPresented {
                        path: w.path.clone(),
                    }
                    .into())
                }
                None => {}
            }
            w.pinned = Some(opened.id.identity());
            if !caller.admin {
                // Nowhere they could not write themselves, and the files land as them.
                w.owner = Some(WorkspaceOwner {
                    uid: caller.uid,
                    gid: caller.gid,
                });
            }
        }
    }
    trace::mark("ctl", "workspace checked");
    // Egress through a gateway (aitherd's, or the one `run` starts in-process).
    let egress = req.egress == Egress::Gateway && crate::net::attach(&mut spec, &claims.net);
    let net = claims.net.clone();
    Ok(PreparedLaunch {
        spec,
        verified,
        token: text,
        minted,
        net,
        egress,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(
        name: Option<&'a str>,
        source: Source<'a>,
        cwd: &'a Path,
        env: &'a dyn Fn(&str) -> Option<String>,
    ) -> LaunchRequest<'a> {
        LaunchRequest {
            name,
            source,
            ttl: Duration::from_secs(60),
            bus_publish: &[],
            bus_subscribe: &[],
            opts: RunOptions {
                argv: vec!["/bin/true".into()],
                ..Default::default()
            },
            cwd,
            env,
            workspace: WorkspaceKind::Host,
            egress: Egress::Gateway,
        }
    }

    const MEMBER: Principal = Principal {
        uid: 4242,
        gid: 4242,
        admin: false,
    };
    const ROOT: Principal = Principal {
        uid: 0,
        gid: 0,
        admin: true,
    };

    #[test]
    fn every_front_door_gets_the_same_refusals() {
        let ws = tempfile::tempdir_in("/var/tmp").unwrap();
        let env = |_: &str| None;
        let auth = OneLaunch::new();
        // Names are refused, never rewritten.
        let e = prepare(
            &req(Some("a b"), Source::Policy("strict"), ws.path(), &env),
            &ROOT,
            &auth,
        )
        .unwrap_err();
        assert!(matches!(e, PrepareError::Name(_)), "{e}");
        // A policy file is for admins.
        let e = prepare(
            &req(Some("a"), Source::Policy("/tmp/p.toml"), ws.path(), &env),
            &MEMBER,
            &auth,
        )
        .unwrap_err();
        assert!(matches!(e, PrepareError::PolicyFile(_)), "{e}");
        // A token for another name, or not minted for the caller.
        let mut c = Claims::from_policy(
            &Policy::load("strict").unwrap().policy,
            "other",
            Duration::from_secs(60),
        )
        .unwrap();
        let t = auth.sign(&c).unwrap();
        let e = prepare(
            &req(Some("a"), Source::Token(&t), ws.path(), &env),
            &ROOT,
            &auth,
        )
        .unwrap_err();
        assert!(matches!(e, PrepareError::Subject { .. }), "{e}");
        let e = prepare(
            &req(None, Source::Token(&t), ws.path(), &env),
            &MEMBER,
            &auth,
        )
        .unwrap_err();
        assert!(matches!(e, PrepareError::NotOwner { uid: 4242, .. }), "{e}");
        // Minted for them: the owner check passes and the workspace check decides (a root
        // directory is not theirs).
        c.owner = Some(4242);
        let t = auth.sign(&c).unwrap();
        let e = prepare(
            &req(None, Source::Token(&t), ws.path(), &env),
            &MEMBER,
            &auth,
        )
        .unwrap_err();
        assert!(
            matches!(e, PrepareError::Workspace(WorkspaceError::NotOwner { .. })),
            "{e}"
        );
        // Root: the directory's owner stays the id-map target.
        let p = prepare(&req(None, Source::Token(&t), ws.path(), &env), &ROOT, &auth).unwrap();
        assert_eq!(p.spec.name, "other");
        assert_eq!(p.spec.workspace.unwrap().owner, None);
    }

    #[test]
    fn a_member_s_workspace_is_mapped_to_them() {
        let ws = tempfile::tempdir_in("/var/tmp").unwrap();
        std::os::unix::fs::chown(ws.path(), Some(4242), Some(4242)).unwrap();
        let env = |_: &str| None;
        let auth = OneLaunch::new();
        // Named only: aitherd does not open a member's directory on their behalf.
        let e = prepare(
            &req(Some("mine"), Source::Policy("strict"), ws.path(), &env),
            &MEMBER,
            &auth,
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                PrepareError::Workspace(WorkspaceError::NotPresented { .. })
            ),
            "{e}"
        );
        // Presented as they opened it.
        let dir = std::fs::File::open(ws.path()).unwrap();
        let mut r = req(Some("mine"), Source::Policy("strict"), ws.path(), &env);
        r.workspace = WorkspaceKind::Presented(std::os::fd::AsFd::as_fd(&dir));
        let p = prepare(&r, &MEMBER, &auth).unwrap();
        let w = p.spec.workspace.unwrap();
        assert_eq!(
            w.owner,
            Some(WorkspaceOwner {
                uid: 4242,
                gid: 4242
            })
        );
        assert!(w.pinned.is_some());
        assert_eq!(p.verified.root().owner, Some(4242));
    }
}
