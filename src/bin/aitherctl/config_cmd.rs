//! `aitherctl daemon`: aitherd's own configuration (docs/daemon.md "Configuration file").

use aither::daemon::proto::Request;
use clap::{Args, Subcommand};

use crate::daemon_cmd::{call, print_json};

/// aitherd's configuration: reload it, show it (root and aither-admin only).
#[derive(Subcommand)]
pub enum DaemonCmd {
    Reload(ReloadArgs),
    Config(ConfigArgs),
}

/// Make aitherd read its configuration file again (as SIGHUP does): limits, retention,
/// per-user limits, the metrics listener and the GPU poll interval change now (for new work);
/// other changes are listed as needing a restart. A bad file changes nothing: the error names
/// the line and the field, and the exit status is 1.
#[derive(Args)]
pub struct ReloadArgs {
    /// Print the report as JSON (`changed`, `restart_required`, `errors`).
    #[arg(long)]
    json: bool,
}

/// Show the configuration in force, each value with its source (default, file, env, flag).
#[derive(Args)]
pub struct ConfigArgs {
    /// Print JSON (`path`, `file_present`, `config`, `sources`).
    #[arg(long)]
    json: bool,
}

pub fn run(c: DaemonCmd) -> i32 {
    match c {
        DaemonCmd::Reload(a) => reload(a),
        DaemonCmd::Config(a) => config(a),
    }
}

fn change_line(c: &serde_json::Value) -> String {
    format!(
        "  {}: {} -> {}",
        c["field"].as_str().unwrap_or("?"),
        c["old"],
        c["new"]
    )
}

fn reload(a: ReloadArgs) -> i32 {
    let v = match call(&Request::DaemonReload) {
        Ok(v) => v,
        Err(c) => return c,
    };
    if a.json {
        print_json(&v);
        return 0;
    }
    println!("reloaded {}", v["path"].as_str().unwrap_or("?"));
    let list = |k: &str| v[k].as_array().cloned().unwrap_or_default();
    let (changed, restart) = (list("changed"), list("restart_required"));
    if changed.is_empty() && restart.is_empty() {
        println!("no change");
    }
    if !changed.is_empty() {
        println!("changed now:");
        changed.iter().for_each(|c| println!("{}", change_line(c)));
    }
    if !restart.is_empty() {
        println!("need a restart of aitherd (the running values are kept until then):");
        restart.iter().for_each(|c| println!("{}", change_line(c)));
    }
    0
}

fn config(a: ConfigArgs) -> i32 {
    let v = match call(&Request::DaemonConfig) {
        Ok(v) => v,
        Err(c) => return c,
    };
    if a.json {
        print_json(&v);
        return 0;
    }
    println!(
        "# {} ({})",
        v["path"].as_str().unwrap_or("?"),
        if v["file_present"] == true {
            "present"
        } else {
            "absent: built-in defaults"
        }
    );
    if let Some(sources) = v["sources"].as_object() {
        for (field, source) in sources {
            let value = field.split('.').fold(&v["config"], |node, k| &node[k]);
            println!("{field} = {value}  # {}", source.as_str().unwrap_or("?"));
        }
    }
    0
}
