//! `aitherctl secret set|ls|rm`: the host's secrets for credential routes (docs/network.md).

use std::io::Read;

use aither::net::secrets::{SecretError, SecretStore};
use clap::Subcommand;

/// Manage the secrets the egress gateway adds to credential routes.
///
/// A secret is stored on the host under <state dir>/secrets (/var/lib/aither/secrets, or
/// $AITHER_STATE_DIR/secrets): directory 0700, one file per secret, mode 0600. It never enters
/// a sandbox: a token grants a route (`[[net.routes]]` in a policy) that names the secret, and
/// the gateway adds it as a header to requests on that route on their way out, over TLS.
/// Values are read from stdin (never from the command line, which other users can read in
/// /proc), and never printed or logged.
///
/// Examples:
///   printf %s "$OPENAI_API_KEY" | aitherctl secret set openai
///   aitherctl secret ls --json
///   aitherctl secret rm openai
#[derive(Subcommand)]
#[command(verbatim_doc_comment)]
pub enum SecretCmd {
    /// Store a secret read from stdin (a trailing newline is dropped). Exit 0 stored, 1 refused.
    Set {
        /// 1 to 32 of lower-case letters, digits, '-' and '_'.
        name: String,
    },
    /// List the secrets' names, sizes and times (never the values).
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a secret. Exit 0 removed, 1 not found or refused.
    Rm { name: String },
}

pub fn run(cmd: SecretCmd) -> i32 {
    let store = SecretStore::default_location();
    let done = |r: Result<(), SecretError>| match r {
        Ok(()) => 0,
        Err(e) => {
            crate::print_error(&e.into());
            1
        }
    };
    match cmd {
        SecretCmd::Set { name } => {
            let mut v = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut v) {
                eprintln!("aither: error: reading the secret from stdin: {e}");
                return 1;
            }
            let v = v.strip_suffix('\n').unwrap_or(&v);
            let v = v.strip_suffix('\r').unwrap_or(v);
            done(store.set(&name, v))
        }
        SecretCmd::Rm { name } => done(store.remove(&name)),
        SecretCmd::Ls { json } => match store.list() {
            Ok(list) if json => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
                0
            }
            Ok(list) => {
                if list.is_empty() {
                    println!("no secrets in {}", store.dir().display());
                }
                for s in list {
                    println!("{:<32} {:>6} bytes", s.name, s.bytes);
                }
                0
            }
            Err(e) => {
                crate::print_error(&e.into());
                1
            }
        },
    }
}
