//! Shell completions and man pages generated from the CLI's definition (issue 20): what a user
//! gets from `aitherctl completions SHELL` in a real bash, and from `aitherctl man --out DIR`
//! read with `man -l`.

mod common;

use std::os::unix::fs::symlink;
use std::process::{Command, Output};

use common::AITHERCTL;

fn ctl(args: &[&str]) -> Output {
    Command::new(AITHERCTL)
        .args(args)
        .output()
        .expect("aitherctl")
}

/// What bash completes after `words` (the last one being completed), with the script loaded.
fn bash_completes(words: &[&str]) -> Vec<String> {
    let script = format!(
        "source <({AITHERCTL} completions bash); COMP_WORDS=({words}); COMP_CWORD={cword}; \
         _aitherctl aitherctl {cur} {prev}; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        words = words.join(" "),
        cword = words.len() - 1,
        cur = words[words.len() - 1],
        prev = words[words.len() - 2],
    );
    let o = Command::new("bash")
        .args(["-c", &script])
        .output()
        .expect("bash");
    assert!(o.status.success(), "{o:?}");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn bash_completes_subcommands_and_their_flags() {
    assert_eq!(bash_completes(&["aitherctl", "sp"]), vec!["spawn"]);
    let sub = bash_completes(&["aitherctl", "st"]);
    assert!(
        sub.contains(&"stats".to_string()) && sub.contains(&"stop".to_string()),
        "{sub:?}"
    );
    assert_eq!(
        bash_completes(&["aitherctl", "logs", "--ti"]),
        vec!["--timestamps"]
    );
    assert!(bash_completes(&["aitherctl", "mem", "se"]).contains(&"search".to_string()));
}

#[test]
fn every_shell_gets_a_script_and_a_bad_shell_is_a_usage_error() {
    for (shell, marker) in [
        ("bash", "complete -F _aitherctl"),
        ("zsh", "#compdef aitherctl"),
        ("fish", "complete -c aitherctl"),
    ] {
        let o = ctl(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {o:?}");
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains(marker), "{shell}: no {marker:?}");
        assert!(text.contains("spawn") && text.contains("exec"), "{shell}");
    }
    let o = ctl(&["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("possible values"));
}

#[test]
fn man_writes_a_page_per_command_that_man_renders() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let o = ctl(&["man", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    for page in [
        "aitherctl.1",
        "aitherctl-spawn.1",
        "aitherctl-logs.1",
        "aitherctl-mem-put.1",
        "aitherctl-mem-graph-neighbors.1",
        "aitherctl-completions.1",
    ] {
        assert!(out.join(page).is_file(), "no {page}");
    }
    let spawn = std::fs::read_to_string(out.join("aitherctl-spawn.1")).unwrap();
    assert!(spawn.contains(".TH AITHERCTL-SPAWN 1"), "{spawn}");
    // Rendered as a user reads it.
    let o = Command::new("man")
        .args(["-P", "cat", "-l"])
        .arg(out.join("aitherctl-spawn.1"))
        .env("MANWIDTH", "100")
        .output()
        .expect("man");
    assert!(o.status.success(), "{o:?}");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("aitherctl spawn"), "{text}");
    assert!(text.contains("--policy"), "{text}");
    let top = Command::new("man")
        .args(["-P", "cat", "-l"])
        .arg(out.join("aitherctl.1"))
        .output()
        .expect("man");
    assert!(
        String::from_utf8_lossy(&top.stdout).contains("fail-closed Linux sandboxes"),
        "{top:?}"
    );
}

/// A link planted at a page's name is replaced by the page; its target is never written.
#[test]
fn man_replaces_a_link_at_a_pages_name_and_never_writes_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "keep me\n").unwrap();
    let out = dir.path().join("man1");
    std::fs::create_dir(&out).unwrap();
    symlink(&victim, out.join("aitherctl-run.1")).unwrap();
    let o = ctl(&["man", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me\n");
    let meta = std::fs::symlink_metadata(out.join("aitherctl-run.1")).unwrap();
    assert!(meta.file_type().is_file(), "still a link");
}
