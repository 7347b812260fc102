//! `aitherctl token mint|inspect|verify|attenuate|revoke|revoked|pubkey`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aither::audit::{Entry, Verdict};
use aither::policy::{NetworkMode, Policy};
use aither::token::{
    self, claims, format::MAX_TEXT, keys::encode_public_key, Attenuation, Claims, HostKey,
    RevocationStore, Token, TokenError, Verified,
};
use aither::units::Size;
use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};
use ed25519_dalek::VerifyingKey;
use serde_json::json;

/// Mint, inspect, verify, attenuate and revoke capability tokens (see docs/tokens.md).
///
/// A token is signed claims from which `aitherctl run --token` builds the sandbox. Anyone
/// holding a token can attenuate it (append a narrower block) without the host key; only the
/// host key can mint. TOKEN arguments are the token text, a file holding it, or - for stdin.
#[derive(Subcommand)]
#[command(verbatim_doc_comment)]
pub enum TokenCmd {
    /// Mint a token from a policy, signed with the host key (created at first use).
    Mint {
        /// Policy name (installed or built-in) or path to a policy file.
        #[arg(long, short = 'p', value_name = "NAME|PATH")]
        policy: String,
        /// The agent the token is for (its name: cgroup, AITHER_AGENT).
        #[arg(long, value_name = "NAME")]
        subject: String,
        /// Lifetime (e.g. 30m, 1h, 7d).
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = crate::parse_duration)]
        ttl: Duration,
        /// Grant read access to another agent's memory tier (repeatable), e.g.
        /// `--memory-grant agent-b:knowledge` (docs/memory.md).
        #[arg(long = "memory-grant", value_name = "OWNER:TIER")]
        memory_grants: Vec<String>,
        /// The host user the token is for (a name or uid): a member of group `aither` who is
        /// not an admin may spawn only with tokens minted for them. Without it, only root and
        /// members of aither-admin may use the token.
        #[arg(long = "for-user", value_name = "USER|UID")]
        for_user: Option<String>,
        /// Write the token to FILE (mode 0600) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Show a token's claims, expiry, chain of attenuations and verification status.
    ///
    /// Exit 0 when the token is valid, 1 when not (the claims are shown either way, marked
    /// unverified).
    Inspect {
        /// The token: its text, a file holding it, or - for stdin.
        #[arg(value_name = "TOKEN|FILE|-")]
        token: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Public key to verify with (file, hex or base64url; default: this host's key).
        #[arg(long, value_name = "FILE|KEY", allow_hyphen_values = true)]
        pubkey: Option<String>,
    },
    /// Verify a token: exit 0 when valid, 1 with the reason on stderr when not.
    Verify {
        /// The token: its text, a file holding it, or - for stdin.
        #[arg(value_name = "TOKEN|FILE|-")]
        token: String,
        /// Public key to verify with (file, hex or base64url; default: this host's key).
        #[arg(long, value_name = "FILE|KEY", allow_hyphen_values = true)]
        pubkey: Option<String>,
    },
    /// Append a block that narrows the token; a widening request is refused naming the field
    ///
    /// Needs no host key. The token is verified first with --pubkey or this host's key when
    /// one is available; without either, only its structure and proof are checked here (the
    /// host verifies everything at use).
    #[command(verbatim_doc_comment)]
    Attenuate {
        /// The token: its text, a file holding it, or - for stdin.
        #[arg(value_name = "TOKEN|FILE|-")]
        token: String,
        /// Memory limit (e.g. 64M).
        #[arg(long, value_name = "SIZE", value_parser = crate::parse_size)]
        memory: Option<Size>,
        /// CPU limit in CPUs (e.g. 0.5).
        #[arg(long, value_name = "N")]
        cpus: Option<f64>,
        /// Maximum number of processes and threads.
        #[arg(long, value_name = "N")]
        pids: Option<u64>,
        /// A layered workspace's disk quota (e.g. 1G): its agent's writes past it fail with
        /// ENOSPC (docs/workspaces.md "Disk quota"). At most the token's own.
        #[arg(long, value_name = "SIZE", value_parser = crate::parse_size)]
        workspace_disk: Option<Size>,
        /// Network: none (no TCP at all) or loopback.
        #[arg(long, value_name = "MODE")]
        net: Option<NetArg>,
        /// Replace the read-only paths with these (repeatable); each must lie under one the
        /// token already grants.
        #[arg(long = "read", value_name = "PATH")]
        read: Vec<String>,
        /// The workspace must be PATH or a directory below it.
        #[arg(long = "write", value_name = "PATH")]
        write: Option<String>,
        /// The new block expires this long from now (at most the token's own expiry).
        #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
        ttl: Option<Duration>,
        /// Wall-clock limit of the agent.
        #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
        timeout: Option<Duration>,
        /// Take a memory tier away entirely (repeatable).
        #[arg(long = "mem-drop", value_name = "TIER")]
        mem_drop: Vec<String>,
        /// Make a memory tier read-only (repeatable).
        #[arg(long = "mem-read-only", value_name = "TIER")]
        mem_read_only: Vec<String>,
        /// Lower a memory tier's quotas: TIER=SIZE[,ENTRIES] (repeatable), e.g. knowledge=8M,1000.
        #[arg(long = "mem-quota", value_name = "TIER=SIZE[,N]", value_parser = aither::token::attenuate::parse_mem_quota)]
        mem_quota: Vec<(String, Option<Size>, Option<u64>)>,
        /// Take away every grant to read other agents' memory.
        #[arg(long)]
        no_memory_grants: bool,
        /// Take away an egress grant (repeatable): egress[N] (the token's rule N), service:NAME,
        /// route:NAME, or all (docs/network.md).
        #[arg(long = "net-drop", value_name = "GRANT")]
        net_drop: Vec<String>,
        /// Write the token to FILE (mode 0600) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Public key to verify the token with before attenuating it.
        #[arg(long, value_name = "FILE|KEY", allow_hyphen_values = true)]
        pubkey: Option<String>,
    },
    /// Revoke a token id (every attenuation of it too) or a block id.
    Revoke {
        /// The id (`aitherctl token inspect` shows it).
        id: String,
        /// Why (shown when the token is refused).
        #[arg(long, value_name = "TEXT", default_value = "")]
        reason: String,
    },
    /// List revoked ids.
    Revoked {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print this host's public key (creating the host key at first use).
    Pubkey {
        /// Print hex instead of base64url.
        #[arg(long)]
        hex: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum NetArg {
    None,
    Loopback,
}

pub fn run(cmd: TokenCmd) -> i32 {
    let r = match cmd {
        TokenCmd::Mint {
            policy,
            subject,
            ttl,
            memory_grants,
            for_user,
            out,
        } => mint(
            &policy,
            &subject,
            ttl,
            &memory_grants,
            for_user.as_deref(),
            out.as_deref(),
        ),
        TokenCmd::Inspect {
            token,
            json,
            pubkey,
        } => inspect(&token, json, pubkey.as_deref()),
        TokenCmd::Verify { token, pubkey } => verify_cmd(&token, pubkey.as_deref()),
        TokenCmd::Attenuate {
            token,
            memory,
            cpus,
            pids,
            workspace_disk,
            net,
            read,
            write,
            ttl,
            timeout,
            mem_drop,
            mem_read_only,
            mem_quota,
            no_memory_grants,
            net_drop,
            out,
            pubkey,
        } => {
            let req = Attenuation {
                mem_drop,
                mem_read_only,
                mem_quota,
                no_memory_grants,
                net_drop,
                memory,
                cpus,
                pids,
                workspace_disk,
                net: net.map(|n| match n {
                    NetArg::None => NetworkMode::None,
                    NetArg::Loopback => NetworkMode::Loopback,
                }),
                read,
                write,
                ttl,
                timeout,
            };
            attenuate(&token, &req, out.as_deref(), pubkey.as_deref())
        }
        TokenCmd::Revoke { id, reason } => revoke(&id, &reason),
        TokenCmd::Revoked { json } => revoked(json),
        TokenCmd::Pubkey { hex } => pubkey(hex),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            crate::print_error(&e);
            1
        }
    }
}

/// Reads a TOKEN|FILE|- argument: "-" is stdin, an existing file is read, anything else is
/// the token text itself.
pub fn read_token_arg(arg: &str) -> anyhow::Result<Token> {
    let text = if arg == "-" {
        let mut s = String::new();
        std::io::stdin()
            .take(MAX_TEXT as u64 + 1)
            .read_to_string(&mut s)
            .context("read the token from stdin")?;
        s
    } else if !arg.starts_with(token::TEXT_PREFIX) && Path::new(arg).is_file() {
        let mut s = String::new();
        std::fs::File::open(arg)
            .and_then(|f| f.take(MAX_TEXT as u64 + 1).read_to_string(&mut s))
            .with_context(|| format!("read the token file {arg}"))?;
        s
    } else if arg.starts_with("aither") {
        arg.to_string()
    } else {
        bail!(
            "{:?} is neither a token (text starting with {:?}) nor a readable file",
            arg.chars().take(80).collect::<String>(),
            token::TEXT_PREFIX
        );
    };
    Ok(Token::decode(&text)?)
}

/// The key to verify with: --pubkey, else this host's.
fn verifying_key(arg: Option<&str>) -> anyhow::Result<VerifyingKey> {
    match arg {
        Some(k) => Ok(token::parse_public_key(k)?),
        None => Ok(HostKey::load(&token::state_dir())?.public()),
    }
}

/// Verifies against the key and the host's revocation list (if there is a state database).
fn verify_token(t: &Token, key: &VerifyingKey) -> Result<Verified, TokenError> {
    let store = RevocationStore::open_existing(&token::state_dir())?;
    token::verify(t, key, token::now_unix(), &store)
}

/// Writes a token to `out` (mode 0600, replacing the file) or prints it.
fn emit(t: &Token, out: Option<&Path>, what: &str) -> anyhow::Result<()> {
    let text = t.encode();
    match out {
        Some(p) => {
            // No link followed anywhere in the path (crates/aither-core/src/hostpath.rs); 0600.
            let mut f = aither::hostpath::open_output_file_mode(p, 0o600)
                .with_context(|| format!("create {}", p.display()))?;
            f.write_all(format!("{text}\n").as_bytes())
                .with_context(|| format!("write {}", p.display()))?;
            eprintln!("aither: wrote {what} to {}", p.display());
        }
        None => {
            guard_stdout_secret(what)?;
            println!("{text}");
        }
    }
    Ok(())
}

/// A bearer token printed to stdout that is a regular file (`token attenuate A > B`, the
/// README's form) would otherwise keep the shell's umask mode (0644). As `ssh-keygen` leaves a
/// private key at 0600, the file is set to 0600 on the fd itself (no path is resolved again)
/// when the caller owns it; a file someone else owns that others could read is refused before a
/// byte is written (fail closed: the caller cannot tighten it). Pipes and terminals are left as
/// they are.
fn guard_stdout_secret(what: &str) -> anyhow::Result<()> {
    use rustix::fs::{FileType, Mode};
    use std::os::fd::AsFd;
    let out = std::io::stdout();
    let st = rustix::fs::fstat(out.as_fd()).context("fstat stdout")?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Ok(());
    }
    let perm = st.st_mode & 0o7777;
    if perm & 0o077 == 0 {
        return Ok(());
    }
    if st.st_uid != rustix::process::geteuid().as_raw() {
        anyhow::bail!(
            "stdout is a file owned by uid {} with mode {perm:04o}: the {what} (a bearer token) \
             would be readable by others and this caller cannot make the file private; write it \
             with --out FILE (mode 0600) or to a file you own",
            st.st_uid
        );
    }
    rustix::fs::fchmod(out.as_fd(), Mode::from_raw_mode(0o600)).context("fchmod stdout 0600")?;
    eprintln!("aither: stdout is a file: set its mode to 0600 (it holds a bearer token)");
    Ok(())
}

fn mint(
    policy: &str,
    subject: &str,
    ttl: Duration,
    grants: &[String],
    for_user: Option<&str>,
    out: Option<&Path>,
) -> anyhow::Result<i32> {
    let loaded = Policy::load(policy)?;
    let key = HostKey::load_or_create(&token::state_dir())?;
    let mut c = Claims::from_policy(&loaded.policy, subject, ttl)?;
    c.owner = match for_user {
        None => None,
        Some(u) => Some(match u.parse::<u32>() {
            Ok(uid) => uid,
            Err(_) => aither::daemon::users::uid_of(u)
                .with_context(|| format!("--for-user {u:?}: no such user"))?,
        }),
    };
    for g in grants {
        let (owner, tier) = g.split_once(':').unwrap_or((g.as_str(), ""));
        if claims::check_subject(owner).is_err() || tier.parse::<aither::memory::Tier>().is_err() {
            bail!("--memory-grant {g:?}: expected OWNER:TIER, e.g. agent-b:knowledge (tiers: working, active, spirit, codegraph, knowledge)");
        }
        let grant = token::MemoryGrant {
            owner: owner.to_string(),
            tier: tier.to_string(),
        };
        if !c.memory_grants.contains(&grant) {
            c.memory_grants.push(grant);
        }
    }
    c.memory_grants.sort();
    let t = token::mint(key.signing_key(), &c)?;
    aither::audit::record(
        Entry::new(
            "token_mint",
            Verdict::Allow,
            format!("policy {}", c.policy),
        )
        .agent(subject)
        .actor(actor())
        .data(serde_json::json!({"token_id": c.id, "exp": c.exp, "source": loaded.source, "owner": c.owner})),
    );
    emit(
        &t,
        out,
        &format!(
            "token {} (subject {subject}, policy {}, expires {})",
            c.id,
            c.policy,
            token::format_time(c.exp)
        ),
    )?;
    Ok(0)
}

fn verify_cmd(arg: &str, pubkey: Option<&str>) -> anyhow::Result<i32> {
    let key = verifying_key(pubkey)?;
    let checked = read_token_arg(arg).and_then(|t| Ok(verify_token(&t, &key)?));
    match checked {
        Ok(v) => {
            let e = v.effective();
            println!(
                "valid: token {} for {} (policy {}, {} block{}), expires {}",
                v.id(),
                e.subject,
                e.policy,
                v.blocks.len(),
                if v.blocks.len() == 1 { "" } else { "s" },
                token::format_time(e.exp)
            );
            Ok(0)
        }
        Err(e) => {
            aither::audit::record(
                Entry::new("token_verify", Verdict::Deny, e.to_string()).actor(actor()),
            );
            eprintln!("aither: token invalid: {e}");
            Ok(1)
        }
    }
}

fn attenuate(
    arg: &str,
    req: &Attenuation,
    out: Option<&Path>,
    pubkey: Option<&str>,
) -> anyhow::Result<i32> {
    let t = read_token_arg(arg)?;
    // Verify when a key is at hand; a holder elsewhere attenuates offline.
    let key = match pubkey {
        Some(k) => Some(token::parse_public_key(k)?),
        None => HostKey::load(&token::state_dir()).ok().map(|k| k.public()),
    };
    let parent = match &key {
        Some(k) => verify_token(&t, k)?.effective().clone(),
        None => {
            eprintln!("aither: note: no public key here (--pubkey); attenuating without verifying the token's signatures (the host verifies at use)");
            Claims::from_payload(&t.blocks[t.blocks.len() - 1].payload).map_err(|e| {
                TokenError::InvalidClaims {
                    block: t.blocks.len() - 1,
                    reason: e.to_string(),
                }
            })?
        }
    };
    let child = match req.apply(&parent, token::now_unix()) {
        Ok(c) => c,
        Err(e) => {
            aither::audit::record(
                Entry::new("token_attenuate", Verdict::Deny, e.to_string())
                    .agent(&parent.subject)
                    .actor(actor()),
            );
            return Err(e.into());
        }
    };
    let t2 = t.append(&child)?;
    aither::audit::record(
        Entry::new(
            "token_attenuate",
            Verdict::Allow,
            "narrows the parent block",
        )
        .agent(&child.subject)
        .actor(actor())
        .data(serde_json::json!({"blocks": t2.blocks.len(), "block_id": child.id})),
    );
    let changed: Vec<String> = claims::changes(&parent, &child)
        .into_iter()
        .map(|(f, a, b)| format!("{f} {a} -> {b}"))
        .collect();
    emit(
        &t2,
        out,
        &format!(
            "attenuated token (block {} id {}{}{})",
            t2.blocks.len() - 1,
            child.id,
            if changed.is_empty() { "" } else { ": " },
            changed.join(", ")
        ),
    )?;
    Ok(0)
}

fn revoke(id: &str, reason: &str) -> anyhow::Result<i32> {
    let store = RevocationStore::open(&token::state_dir())?;
    let r = store.revoke(id, reason, token::now_unix())?;
    aither::audit::record(
        Entry::new("token_revoke", Verdict::Allow, "operator")
            .actor(actor())
            .data(serde_json::json!({"id": r.id, "reason": r.reason})),
    );
    println!(
        "revoked {} at {}{}",
        r.id,
        token::format_time(r.at),
        if r.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.reason)
        }
    );
    Ok(0)
}

fn revoked(as_json: bool) -> anyhow::Result<i32> {
    let list = match RevocationStore::open_existing(&token::state_dir())? {
        Some(s) => s.list()?,
        None => Vec::new(),
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    println!("{:<32}  {:<20}  REASON", "ID", "REVOKED AT");
    for r in &list {
        println!(
            "{:<32}  {:<20}  {}",
            r.id,
            token::format_time(r.at),
            r.reason
        );
    }
    Ok(0)
}

fn pubkey(as_hex: bool) -> anyhow::Result<i32> {
    let key = HostKey::load_or_create(&token::state_dir())?.public();
    if as_hex {
        println!("{}", token::hex(key.as_bytes()));
    } else {
        println!("{}", encode_public_key(&key));
    }
    Ok(0)
}

fn inspect(arg: &str, as_json: bool, pubkey: Option<&str>) -> anyhow::Result<i32> {
    let t = read_token_arg(arg)?;
    let status = verifying_key(pubkey).and_then(|k| Ok(verify_token(&t, &k)?));
    let parsed = t.unverified_claims();
    let now = token::now_unix();
    if as_json {
        let mut blocks = Vec::new();
        for (i, c) in parsed.iter().enumerate() {
            let changes = match (i.checked_sub(1).and_then(|p| parsed[p].as_ref().ok()), c) {
                (Some(p), Ok(c)) => claims::changes(p, c)
                    .into_iter()
                    .map(|(f, a, b)| json!({"field": f, "from": a, "to": b}))
                    .collect(),
                _ => Vec::new(),
            };
            blocks.push(match c {
                Ok(c) => json!({"index": i, "claims": c, "changes": changes}),
                Err(e) => json!({"index": i, "claims": null, "error": e.to_string()}),
            });
        }
        let v = json!({
            "valid": status.is_ok(),
            "error": status.as_ref().err().map(|e| e.to_string()),
            "id": parsed.first().and_then(|c| c.as_ref().ok()).map(|c| c.id.clone()),
            "root_key_id": token::hex(&t.root_key_id),
            "bytes": t.to_bytes().len(),
            "blocks": blocks,
            "effective": parsed.last().and_then(|c| c.as_ref().ok()),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(if status.is_ok() { 0 } else { 1 });
    }

    let root = parsed.first().and_then(|c| c.as_ref().ok());
    let last = parsed.last().and_then(|c| c.as_ref().ok());
    println!(
        "token       {} ({} block{}, {} bytes, root key {})",
        root.map(|c| c.id.as_str()).unwrap_or("?"),
        t.blocks.len(),
        if t.blocks.len() == 1 { "" } else { "s" },
        t.to_bytes().len(),
        token::hex(&t.root_key_id)
    );
    match &status {
        Ok(_) => println!("status      valid"),
        Err(e) => println!("status      INVALID: {e:#}  (the claims below are unverified)"),
    }
    if let Some(c) = last {
        println!("subject     {}", c.subject);
        println!("issuer      {}", c.issuer);
        println!("policy      {}", c.policy);
        let exp = parsed
            .iter()
            .filter_map(|c| c.as_ref().ok().map(|c| c.exp))
            .min()
            .unwrap_or(c.exp);
        println!(
            "expires     {} ({})",
            token::format_time(exp),
            relative(exp, now)
        );
    }
    println!("chain");
    for (i, c) in parsed.iter().enumerate() {
        match c {
            Err(e) => println!("  block {i}   unparsable claims: {e}"),
            Ok(c) => {
                let who = if i == 0 {
                    "minted by the host key".to_string()
                } else {
                    "attenuation".to_string()
                };
                println!(
                    "  block {i}   id {}  issued {}  expires {}  ({who})",
                    c.id,
                    token::format_time(c.iat),
                    token::format_time(c.exp)
                );
                if let Some(Ok(p)) = i.checked_sub(1).map(|p| &parsed[p]) {
                    let ch = claims::changes(p, c);
                    if ch.is_empty() {
                        println!("              (no change)");
                    }
                    for (f, a, b) in ch {
                        println!("              {f}: {a} -> {b}");
                    }
                }
            }
        }
    }
    if let Some(c) = last {
        print_effective(c);
    }
    Ok(if status.is_ok() { 0 } else { 1 })
}

fn relative(exp: u64, now: u64) -> String {
    if exp > now {
        format!("in {}", human(exp - now))
    } else {
        format!("EXPIRED {} ago", human(now - exp))
    }
}

/// "45s", "59m59s", "3h0m", "2d4h": the two largest units.
fn human(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

fn print_effective(c: &Claims) {
    let r = &c.rules;
    println!("effective");
    println!(
        "  resources   memory {} (swap {}), {} CPUs, {} pids, nofile {}",
        r.resources.memory,
        r.resources
            .swap
            .map(|s| s.to_string())
            .unwrap_or_else(|| "host default".into()),
        r.resources.cpus,
        r.resources.pids,
        r.rlimits.nofile
    );
    println!("  network     {}", claims::kebab(&r.network.mode));
    println!("  read-only   {}", r.filesystem.read_only.join(" "));
    println!(
        "  workspace   {} in {}, exec {}",
        claims::kebab(&r.filesystem.workspace),
        c.workspace_root.as_deref().unwrap_or("any directory"),
        r.filesystem.exec_workspace
    );
    if let Some(d) = r.resources.workspace_disk {
        println!("  disk quota  {d} (a layered workspace's writes)");
    }
    println!(
        "  timeout     {}",
        r.process
            .timeout
            .map(|t| t.to_string())
            .unwrap_or_else(|| "none".into())
    );
    println!(
        "  seccomp     {}; landlock {}",
        r.seccomp.profile,
        if r.landlock.enabled { "on" } else { "OFF" }
    );
    println!(
        "  gpu         {} device(s), {} MB VRAM, priority {}",
        c.gpu.count, c.gpu.vram_mb, c.gpu.priority
    );
    println!(
        "  bus         publish {:?}, subscribe {:?}",
        c.bus.publish, c.bus.subscribe
    );
    println!(
        "  memory      {}",
        if c.memory_tiers.is_empty() {
            "no tiers".to_string()
        } else {
            c.memory_tiers
                .iter()
                .map(|(k, t)| {
                    format!(
                        "{k} ({}{}, quota {} / {} entries)",
                        if t.read { "r" } else { "-" },
                        if t.write { "w" } else { "-" },
                        Size(t.quota_bytes),
                        t.quota_entries
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    if !c.memory_grants.is_empty() {
        println!(
            "  grants      read {}",
            c.memory_grants
                .iter()
                .map(|g| format!("{}:{}", g.owner, g.tier))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!("  may_spawn   {}", c.may_spawn);
}

/// Who is acting, for the audit stream.
pub fn actor() -> String {
    format!("uid {} (aitherctl)", nix::unistd::getuid().as_raw())
}
