//! `aitherctl completions SHELL` and `aitherctl man --out DIR`: shell completions and man
//! pages generated from this CLI's own definition (clap_complete, clap_mangen), so that they
//! never drift from the commands and flags. install.sh installs both.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory};

/// Print a shell completion script for aitherctl.
///
/// Load it for the current shell, or install it where the shell looks (install.sh does this
/// for bash, zsh and fish):
///
///   source <(aitherctl completions bash)
///
///   aitherctl completions bash > /usr/share/bash-completion/completions/aitherctl
///
///   aitherctl completions zsh > /usr/local/share/zsh/site-functions/_aitherctl
///
///   aitherctl completions fish > /usr/share/fish/vendor_completions.d/aitherctl.fish
#[derive(Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_name = "SHELL")]
    shell: clap_complete::Shell,
}

/// Write man pages for aitherctl and each of its subcommands into a directory.
///
/// One page per command: aitherctl.1, aitherctl-spawn.1, aitherctl-mem-put.1, … Read one
/// with `man -l DIR/aitherctl-spawn.1`, or write them into a directory of MANPATH
/// (install.sh uses /usr/local/share/man/man1). Existing pages of the same names are
/// replaced; nothing else in DIR is touched.
#[derive(Args)]
pub struct ManArgs {
    /// Where to write the pages (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

pub fn completions(a: CompletionsArgs) -> i32 {
    let mut cmd = crate::Cli::command();
    // Into a buffer first: clap_complete panics on a write error (`| head` closing the pipe).
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "aitherctl", &mut script);
    let mut out = std::io::stdout().lock();
    match out.write_all(&script).and_then(|()| out.flush()) {
        Ok(()) => 0,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("aither: error: writing the completion script: {e}");
            1
        }
    }
}

pub fn man(a: ManArgs) -> i32 {
    match write_pages(&a.out) {
        Ok(n) => {
            println!("{n} man pages written to {}", a.out.display());
            0
        }
        Err(e) => {
            crate::print_error(&e);
            1
        }
    }
}

/// Every page, the top command's first; the number written. Through descriptors, as `export
/// --out` writes (crates/aither-core/src/hostpath.rs): the directory made or opened one
/// component at a time following no link, each page replaced by a rename inside it (a link
/// planted at a page's name is replaced, never written through).
fn write_pages(dir: &Path) -> anyhow::Result<usize> {
    use aither::hostpath;
    use anyhow::Context;
    use std::os::fd::AsFd;
    let abs = hostpath::normalise(dir)?;
    let root = hostpath::open_dir_nofollow(Path::new("/"))?;
    let d = hostpath::mkdirs_at(root.as_fd(), abs.strip_prefix("/")?, 0o755)?;
    let mut cmd = crate::Cli::command();
    // Subcommands get their full names ("aitherctl mem put") in usage lines.
    cmd.build();
    let mut pages = Vec::new();
    collect(&cmd, "aitherctl", &mut pages);
    for (name, page) in &pages {
        let mut buf = Vec::new();
        clap_mangen::Man::new(page.clone())
            .title(name.to_uppercase())
            .section("1")
            .manual("Aither")
            .render(&mut buf)
            .with_context(|| format!("rendering {name}.1"))?;
        let file = format!("{name}.1");
        hostpath::replace_file_at(d.as_fd(), file.as_ref(), &buf, 0o644)
            .with_context(|| format!("writing {}", dir.join(&file).display()))?;
    }
    Ok(pages.len())
}

/// `cmd` as page `name`, then its subcommands as `name-sub`, depth first.
fn collect(cmd: &clap::Command, name: &str, pages: &mut Vec<(String, clap::Command)>) {
    pages.push((name.to_string(), cmd.clone().name(name.to_string())));
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        collect(sub, &format!("{name}-{}", sub.get_name()), pages);
    }
}
