//! `aitherctl secret set|ls|rm`: the secrets for credential routes (docs/network.md), one
//! namespace per user. Root works on the store's files directly (no aitherd needed); anyone
//! else goes through aitherd, which acts for them on their own secrets only.

use std::io::Read;

use aither::daemon::client::Client;
use aither::daemon::proto::{Request, SecretValue};
use aither::net::secrets::{SecretError, SecretInfo, SecretStore};
use clap::Subcommand;

/// Manage the secrets the egress gateway adds to credential routes.
///
/// Each user has their own secrets: a route's `secret = "NAME"` is the agent owner's secret
/// NAME, `secret = "root:NAME"` root's (which root shares by writing it in an installed
/// policy). Members of aither set, list, rotate (set again) and remove their own through
/// aitherd and never see anyone else's; root and aither-admin see everyone's (OWNER column)
/// and act on another user's with --owner UID.
///
/// Stored on the host under <state dir>/secrets (/var/lib/aither/secrets, or
/// $AITHER_STATE_DIR/secrets; a user's under .users/UID): directories 0700, one file per
/// secret, mode 0600, root's. A secret never enters a sandbox: the gateway adds it as a
/// header to requests on the route on their way out, over TLS. Values are read from stdin
/// (never from the command line, which other users can read in /proc), and never printed or
/// logged.
///
/// Examples:
///   printf %s "$OPENAI_API_KEY" | aitherctl secret set openai
///   aitherctl secret ls --json
///   aitherctl secret rm openai
#[derive(Subcommand)]
#[command(verbatim_doc_comment)]
pub enum SecretCmd {
    /// Store (or rotate) a secret read from stdin (a trailing newline is dropped). Exit 0
    /// stored, 1 refused.
    Set {
        /// 1 to 32 of lower-case letters, digits, '-' and '_'.
        name: String,
        /// Root and aither-admin: the uid whose secret it is.
        #[arg(long, value_name = "UID")]
        owner: Option<u32>,
    },
    /// List the secrets' owners, names, sizes and times (never the values).
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a secret. Exit 0 removed, 1 not found or refused.
    Rm {
        name: String,
        /// Root and aither-admin: the uid whose secret it is.
        #[arg(long, value_name = "UID")]
        owner: Option<u32>,
    },
}

/// How the command reaches the store: root's own files, or aitherd.
enum Via {
    Files(SecretStore),
    Daemon,
}

pub fn run(cmd: SecretCmd) -> i32 {
    let via = if nix::unistd::geteuid().as_raw() == 0 {
        Via::Files(SecretStore::default_location())
    } else {
        Via::Daemon
    };
    match cmd {
        SecretCmd::Set { name, owner } => {
            let mut v = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut v) {
                eprintln!("aither: error: reading the secret from stdin: {e}");
                return 1;
            }
            let v = v.strip_suffix('\n').unwrap_or(&v);
            let v = v.strip_suffix('\r').unwrap_or(v);
            match via {
                Via::Files(s) => files(s.set(owner.unwrap_or(0), &name, v).map(|_| ())),
                Via::Daemon => daemon(&Request::SecretSet {
                    name,
                    value: SecretValue(v.to_string()),
                    owner,
                })
                .map_or_else(|c| c, |_| 0),
            }
        }
        SecretCmd::Rm { name, owner } => match via {
            Via::Files(s) => files(s.remove(owner.unwrap_or(0), &name)),
            Via::Daemon => daemon(&Request::SecretRm { name, owner }).map_or_else(|c| c, |_| 0),
        },
        SecretCmd::Ls { json } => {
            let list = match via {
                Via::Files(s) => match s.list(None) {
                    Ok(l) => l,
                    Err(e) => return files(Err(e)),
                },
                Via::Daemon => match daemon(&Request::SecretLs) {
                    Ok(v) => serde_json::from_value::<Vec<SecretInfo>>(v["secrets"].clone())
                        .unwrap_or_default(),
                    Err(code) => return code,
                },
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
                return 0;
            }
            if list.is_empty() {
                println!("no secrets");
                return 0;
            }
            println!("{:<8} {:<32} {:>8}", "OWNER", "NAME", "BYTES");
            for s in list {
                println!("{:<8} {:<32} {:>8}", s.owner, s.name, s.bytes);
            }
            0
        }
    }
}

fn files(r: Result<(), SecretError>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            crate::print_error(&e.into());
            1
        }
    }
}

/// One request to aitherd; its data, or the exit code (1 refused, 3 unreachable).
fn daemon(req: &Request) -> Result<serde_json::Value, i32> {
    let mut c = Client::connect(&aither::daemon::socket_path()).map_err(|e| {
        eprintln!("aither: {e}");
        3
    })?;
    match c.call(req) {
        Ok(r) if r.ok => Ok(r.data.unwrap_or_default()),
        Ok(r) => {
            match &r.error {
                Some(e) => eprintln!("aither: error: {} ({})", e.message, e.code),
                None => eprintln!("aither: error: refused"),
            }
            Err(1)
        }
        Err(e) => {
            eprintln!("aither: {e}");
            Err(3)
        }
    }
}
