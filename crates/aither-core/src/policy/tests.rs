use super::*;

fn strict_src() -> &'static str {
    BUILTIN_POLICIES
        .iter()
        .find(|(n, _)| *n == "strict")
        .unwrap()
        .1
}

#[test]
fn every_shipped_policy_parses() {
    for (name, src) in BUILTIN_POLICIES {
        let p = Policy::parse(src, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&p.name, name);
    }
}

#[test]
fn strict_is_what_the_design_says() {
    let p = Policy::parse(strict_src(), "strict.toml").unwrap();
    assert_eq!(p.network.mode, NetworkMode::None);
    assert!(p.namespaces.net && p.namespaces.ipc && p.namespaces.uts && p.namespaces.cgroup);
    assert_eq!(p.resources.memory, Size(512 << 20));
    assert_eq!(p.resources.swap, Some(Size(0)));
    assert_eq!(p.resources.cpus, 1.0);
    assert_eq!(p.resources.pids, 128);
    assert_eq!(p.rlimits.nofile, 1024);
    assert_eq!(p.rlimits.core, 0);
    assert!(p.landlock.enabled);
    assert_eq!(p.seccomp.profile, "agent");
    assert!(p.best_effort.is_empty(), "strict never degrades silently");
    assert_ne!(p.process.uid, 0);
    assert!(!p.filesystem.etc.iter().any(|e| e.contains("shadow")));
}

fn bad(src: &str) -> (usize, usize, String, String) {
    match Policy::parse(src, "bad.toml") {
        Err(PolicyError::Invalid {
            path,
            line,
            column,
            field,
            message,
        }) => {
            assert_eq!(path, "bad.toml");
            (line, column, field, message)
        }
        other => panic!("expected an Invalid error, got {other:?}"),
    }
}

#[test]
fn a_bad_value_names_file_line_column_and_field() {
    let src = strict_src().replace("memory = \"512M\"", "memory = \"12 parsecs\"");
    let line = src.lines().position(|l| l.starts_with("memory =")).unwrap() + 1;
    let (l, c, field, msg) = bad(&src);
    assert_eq!((l, field.as_str()), (line, "resources.memory"));
    assert!(c > 1, "column points at the value, got {c}");
    assert!(msg.contains("12 parsecs"), "{msg}");
}

#[test]
fn an_unknown_field_is_refused_by_name() {
    let src = strict_src().replace("[resources]\n", "[resources]\nmemroy = \"1G\"\n");
    let line = src.lines().position(|l| l.starts_with("memroy")).unwrap() + 1;
    let (l, c, field, msg) = bad(&src);
    assert_eq!((l, c), (line, 1));
    assert_eq!(field, "resources.memroy");
    assert!(msg.contains("unknown field"), "{msg}");
}

#[test]
fn a_missing_field_is_named() {
    let src = strict_src().replace("pids = 128\n", "");
    let (_, _, field, msg) = bad(&src);
    assert_eq!(field, "resources.pids");
    assert!(msg.contains("missing field"), "{msg}");
}

#[test]
fn a_syntax_error_has_a_position() {
    let src = strict_src().replace("[network]\nmode = \"none\"", "[network]\nmode = none\"");
    let line = src
        .lines()
        .position(|l| l.starts_with("mode = none"))
        .unwrap()
        + 1;
    let (l, _, field, _) = bad(&src);
    assert_eq!(l, line);
    assert_eq!(field, "network.mode");
}

#[test]
fn semantic_errors_point_at_the_key() {
    let cases: &[(&str, &str, &str)] = &[
        ("uid = 1000", "uid = 0", "process.uid"),
        ("cpus = 1.0", "cpus = 0.0", "resources.cpus"),
        ("pids = 128", "pids = 1", "resources.pids"),
        (
            "pids = 128",
            "pids = 128\nworkspace_disk = \"1M\"",
            "resources.workspace_disk",
        ),
        (
            "profile = \"agent\"",
            "profile = \"lenient\"",
            "seccomp.profile",
        ),
        ("\"alternatives\",", "\"shadow\",", "filesystem.etc"),
        ("mode = \"none\"", "mode = \"host\"", "network.mode"),
        ("enabled = true", "enabled = false", "warning"),
    ];
    for (from, to, field) in cases {
        let src = strict_src().replace(from, to);
        assert_ne!(src, strict_src(), "{from} not found");
        let (line, _, f, msg) = bad(&src);
        assert_eq!(&f, field, "{to}: {msg}");
        if *field != "warning" {
            let key = field.rsplit('.').next().unwrap();
            let text = src.lines().nth(line - 1).unwrap();
            assert!(
                text.contains(key) || text.contains("shadow"),
                "line {line} = {text:?} for {field}"
            );
        }
    }
}

#[test]
fn load_by_name_prefers_installed_files_and_reports_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("strict.toml"),
        strict_src().replace("pids = 128", "pids = 64"),
    )
    .unwrap();
    // SAFETY-free: env var manipulation is confined to this test's policy lookup.
    let p = Policy::load(&dir.path().join("strict.toml").display().to_string()).unwrap();
    assert_eq!(p.policy.resources.pids, 64);
    let e = Policy::load("no-such-policy").unwrap_err();
    assert!(
        e.to_string()
            .contains("/etc/aither/policies/no-such-policy.toml"),
        "{e}"
    );
}

#[test]
fn stand_ins_are_exactly_the_defence_map_and_never_for_cgroup_limits() {
    let base = strict_src();
    let cases: &[(&str, &str, &str)] = &[
        // A stand-in that covers only part of the threat.
        (
            "landlock-scope = [\"net-namespace\", \"pid-namespace\"]",
            "landlock-scope = [\"net-namespace\"]",
            "all of [\"net-namespace\", \"pid-namespace\"]",
        ),
        // A layer that stops something else.
        (
            "landlock = [\"read-only-view\"]",
            "landlock = [\"net-namespace\"]",
            "all of [\"read-only-view\"]",
        ),
        // cgroup limits are never compensated.
        (
            "landlock = [\"read-only-view\"]",
            "landlock = [\"read-only-view\"]\ncgroup-memory = [\"pid-namespace\"]",
            "never compensated",
        ),
        // A stand-in the policy itself turns off.
        (
            "profile = \"agent\"\n",
            "profile = \"none\"\n",
            "seccomp-ioctl cannot stand in",
        ),
    ];
    for (from, to, want) in cases {
        let mut src = base.replace(from, to);
        if to.contains("\"none\"") {
            src = src.replace(
                "best_effort = []",
                "warning = \"no seccomp\"\nbest_effort = []",
            );
        }
        assert_ne!(src, base, "{from} not found");
        let (line, _, field, msg) = bad(&src);
        assert!(field.starts_with("compensated."), "{to}: {field}: {msg}");
        assert!(msg.contains(want), "{to}: {msg}");
        let key = field.trim_start_matches("compensated.");
        assert!(
            src.lines().nth(line - 1).unwrap().contains(key),
            "line {line} for {field}"
        );
    }
    // A layer may not both stand in and be skipped.
    let src = base.replace("best_effort = []", "best_effort = [\"landlock-net\"]");
    let (_, _, field, msg) = bad(&src);
    assert_eq!(field, "compensated.landlock-net", "{msg}");
}

#[test]
fn strict_full_is_strict_without_stand_ins() {
    let full = crate::policy::BUILTIN_POLICIES
        .iter()
        .find(|(n, _)| *n == "strict-full")
        .unwrap()
        .1;
    let full = Policy::parse(full, "strict-full").unwrap();
    let mut strict = Policy::parse(strict_src(), "strict").unwrap();
    assert_eq!(strict.compensated.len(), 4);
    assert!(full.compensated.is_empty());
    strict.compensated.clear();
    strict.name = full.name.clone();
    strict.description = full.description.clone();
    assert_eq!(
        strict, full,
        "strict-full must differ from strict only in its stand-ins"
    );
}

/// Issue 20: every validation error is reported in one pass, in file order, each with its own
/// file:line:column and field (only the first was).
#[test]
fn every_validation_error_is_reported_in_one_pass() {
    let src = strict_src()
        .replace("memory = \"512M\"", "memory = \"1M\"")
        .replace("pids = 128", "pids = 1");
    let line_of = |prefix: &str| src.lines().position(|l| l.starts_with(prefix)).unwrap() + 1;
    let errors = match Policy::parse(&src, "bad.toml") {
        Err(PolicyError::Several { errors }) => errors,
        other => panic!("expected several errors, got {other:?}"),
    };
    let got: Vec<(usize, String)> = errors
        .iter()
        .map(|e| match e {
            PolicyError::Invalid {
                path, line, field, ..
            } => {
                assert_eq!(path, "bad.toml");
                (*line, field.clone())
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (line_of("memory ="), "resources.memory".to_string()),
            (line_of("pids ="), "resources.pids".to_string()),
        ]
    );
    let text = Policy::parse(&src, "bad.toml").unwrap_err().to_string();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.lines().all(|l| l.starts_with("bad.toml:")), "{text}");
}

/// A field missing from a table points at that table's header, not at 1:1.
#[test]
fn a_missing_field_points_at_its_table() {
    let src: String = strict_src()
        .lines()
        .filter(|l| !l.starts_with("profile"))
        .map(|l| format!("{l}\n"))
        .collect();
    let header = src.lines().position(|l| l == "[seccomp]").unwrap() + 1;
    let (l, c, field, msg) = bad(&src);
    assert_eq!((l, c, field.as_str()), (header, 1, "seccomp.profile"));
    assert!(msg.contains("missing field `profile`"), "{msg}");
}

/// `src` parsed with `dirs` as the policy directories.
fn extended(src: &str, dirs: &[PathBuf]) -> Result<(Policy, Vec<Parent>), PolicyError> {
    Policy::parse_extended_in(src, "child.toml", dirs)
}

#[test]
fn extends_merges_tables_key_by_key_and_replaces_scalars_and_arrays() {
    let src = r#"
name = "strict-1g"
extends = "strict"
[resources]
memory = "1G"
[filesystem]
read_only = ["/usr"]
"#;
    let (p, parents) = extended(src, &[]).unwrap();
    let strict = Policy::parse(strict_src(), "strict").unwrap();
    assert_eq!(
        parents,
        [Parent {
            name: "strict".into(),
            source: "built-in".into()
        }]
    );
    assert_eq!(p.name, "strict-1g");
    assert_eq!(p.resources.memory, Size(1 << 30));
    // The rest of [resources] is strict's: the table merged key by key.
    assert_eq!(p.resources.pids, strict.resources.pids);
    assert_eq!(p.resources.swap, strict.resources.swap);
    // An array replaces the parent's whole.
    assert_eq!(p.filesystem.read_only, ["/usr"]);
    assert_eq!(p.filesystem.etc, strict.filesystem.etc);
    // Everything not written is strict's.
    assert_eq!(p.description, strict.description);
    assert_eq!(p.network, strict.network);
    assert_eq!(p.seccomp, strict.seccomp);
    assert_eq!(p.landlock, strict.landlock);
    assert_eq!(p.compensated, strict.compensated);
    assert_eq!(p.process, strict.process);

    let mut base = toml::Table::new();
    base.insert("a".into(), toml::Value::Integer(1));
    let over: toml::Table = "b = [1]\n[t]\nx = 1".parse().unwrap();
    extends::merge(&mut base, &over);
    let over2: toml::Table = "[t]\ny = 2".parse().unwrap();
    extends::merge(&mut base, &over2);
    assert_eq!(base.to_string(), "a = 1\nb = [1]\n\n[t]\nx = 1\ny = 2\n");
}

#[test]
fn a_chain_of_files_in_the_policy_directory_resolves_nearest_last() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("team.toml"),
        "name = \"team\"\nextends = \"standard\"\n[resources]\npids = 64\n",
    )
    .unwrap();
    let src = "name = \"mine\"\nextends = \"team\"\n[resources]\ncpus = 2.0\n";
    let (p, parents) = extended(src, &[dir.path().to_path_buf()]).unwrap();
    let names: Vec<&str> = parents.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["team", "standard"]);
    assert!(parents[0].source.ends_with("team.toml"));
    assert_eq!((p.resources.pids, p.resources.cpus), (64, 2.0));
    let standard = Policy::load("standard").unwrap().policy;
    assert_eq!(p.network, standard.network);
}

#[test]
fn unknown_parents_cycles_depth_and_a_missing_name_are_errors_at_the_extends_line() {
    let dir = tempfile::tempdir().unwrap();
    let dirs = [dir.path().to_path_buf()];
    let err = |src: &str| match extended(src, &dirs) {
        Err(PolicyError::Invalid {
            path,
            line,
            field,
            message,
            ..
        }) => (path, line, field, message),
        other => panic!("expected Invalid, got {other:?}"),
    };
    let (path, line, field, msg) = err("# mine\nname = \"x\"\nextends = \"nope\"\n");
    assert_eq!(
        (path.as_str(), line, field.as_str()),
        ("child.toml", 3, "extends")
    );
    assert!(msg.contains("no policy named \"nope\""), "{msg}");
    let (_, _, field, msg) = err("extends = \"strict\"\n");
    assert_eq!(field, "name");
    assert!(msg.contains("names itself"), "{msg}");
    let (_, _, _, msg) = err("name = \"x\"\nextends = 3\n");
    assert!(msg.contains("as a string"), "{msg}");
    // a -> b -> a, in the directory: the error names the file where the cycle closes.
    std::fs::write(dir.path().join("a.toml"), "name = \"a\"\nextends = \"b\"\n").unwrap();
    std::fs::write(
        dir.path().join("b.toml"),
        "name = \"b\"\n\nextends = \"a\"\n",
    )
    .unwrap();
    let a_src = std::fs::read_to_string(dir.path().join("a.toml")).unwrap();
    let a_path = dir.path().join("a.toml").display().to_string();
    match Policy::parse_extended_in(&a_src, &a_path, &dirs) {
        Err(PolicyError::Invalid {
            path,
            line,
            field,
            message,
            ..
        }) => {
            assert!(path.ends_with("b.toml"), "{path}");
            assert_eq!((line, field.as_str()), (3, "extends"));
            assert!(message.contains("cycle"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // A file that extends its own name finds itself first: a cycle, not the built-in.
    std::fs::write(
        dir.path().join("strict.toml"),
        "name = \"strict\"\nextends = \"strict\"\n",
    )
    .unwrap();
    let own = dir.path().join("strict.toml");
    let e = Policy::parse_extended_in(
        &std::fs::read_to_string(&own).unwrap(),
        &own.display().to_string(),
        &dirs,
    )
    .unwrap_err();
    assert!(e.to_string().contains("cycle"), "{e}");
    // Depth: l0 -> l1 -> ... -> l9.
    for i in 0..10 {
        std::fs::write(
            dir.path().join(format!("l{i}.toml")),
            format!("name = \"l{i}\"\nextends = \"l{}\"\n", i + 1),
        )
        .unwrap();
    }
    let (_, _, field, msg) = err("name = \"top\"\nextends = \"l0\"\n");
    assert_eq!(field, "extends");
    assert!(
        msg.contains(&format!("more than {}", extends::MAX_DEPTH)),
        "{msg}"
    );
}

#[test]
fn errors_of_an_extended_policy_are_all_reported_each_in_its_own_file() {
    let dir = tempfile::tempdir().unwrap();
    // The parent's bad value that the child does not override is the parent's error.
    let parent = strict_src()
        .replace("name = \"strict\"", "name = \"base\"")
        .replace("profile = \"agent\"", "profile = \"nonsense\"");
    std::fs::write(dir.path().join("base.toml"), parent).unwrap();
    let src = "name = \"child\"\nextends = \"base\"\n\n[resources]\npids = 0\n";
    match extended(src, &[dir.path().to_path_buf()]) {
        Err(PolicyError::Several { errors }) => {
            let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
            assert_eq!(errors.len(), 2, "{text:#?}");
            assert!(
                text.iter()
                    .any(|e| e.starts_with("child.toml:5:") && e.contains("resources.pids")),
                "{text:#?}"
            );
            assert!(
                text.iter()
                    .any(|e| e.contains("base.toml:") && e.contains("seccomp.profile")),
                "{text:#?}"
            );
        }
        other => panic!("expected both errors, got {other:?}"),
    }
    // A wrong type in the child is located in the child.
    match extended(
        "name = \"c\"\nextends = \"strict\"\n[resources]\nmemory = 5\n",
        &[],
    ) {
        Err(PolicyError::Invalid {
            path, line, field, ..
        }) => assert_eq!(
            (path.as_str(), line, field.as_str()),
            ("child.toml", 4, "resources.memory")
        ),
        other => panic!("{other:?}"),
    }
}
