//! `extends = "NAME"`: a policy written as the overrides of another (docs/policies.md
//! "Extending a policy").
//!
//! The parent is found as `--policy NAME` finds a policy by name: the policy directories
//! first (`AITHER_POLICY_DIR`, /etc/aither/policies), then the built-in ones. It may itself
//! extend another, at most [`MAX_DEPTH`] levels. The merge is the one Kubernetes strategic
//! merges, kustomize patches and podman's containers.conf drop-ins use for plain values:
//! **tables merge key by key, recursively; everything else (strings, numbers, booleans and
//! arrays, arrays of tables included) replaces the parent's value whole**. So a list of
//! paths is the child's own list when it gives one: a policy never widens by concatenation
//! it did not spell out. The merged document is then parsed and validated as any policy,
//! and each error names the file (the child's, or the parent's for a key only the parent
//! has), line, column and field.

use super::{locate, PolicyError, BUILTIN_POLICIES};

/// The most policies a chain of `extends` may have above the one loaded.
pub const MAX_DEPTH: usize = 8;

/// One policy of a chain, as text and as a TOML table.
pub(super) struct Layer {
    /// Shown in errors (a path, or `built-in:NAME.toml`).
    pub origin: String,
    /// The policy's name as it was looked up (the loaded one: its origin).
    pub name: String,
    /// Where it came from, as `LoadedPolicy::source` says it.
    pub source: String,
    /// What identifies it in a cycle (a canonical path, or `built-in:NAME`).
    id: String,
    pub src: String,
    pub table: toml::Table,
}

/// A policy that the one loaded extends, as `policy show` prints it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Parent {
    pub name: String,
    /// A file path, or "built-in".
    pub source: String,
}

/// The texts of a chain, child first: where a field is written.
pub(super) struct Sources<'a> {
    layers: Vec<(&'a str, &'a str)>,
}

impl<'a> Sources<'a> {
    pub fn one(origin: &'a str, src: &'a str) -> Self {
        Sources {
            layers: vec![(origin, src)],
        }
    }

    pub fn of(layers: &'a [Layer]) -> Self {
        Sources {
            layers: layers
                .iter()
                .map(|l| (l.origin.as_str(), l.src.as_str()))
                .collect(),
        }
    }

    /// The file, line and column of `key` in `[table]`: in the first policy of the chain
    /// that writes it (the child's value wins, so its line is the one to fix), else 1:1 of
    /// the child.
    pub fn at(&self, table: &str, key: &str) -> (String, usize, usize) {
        for (origin, src) in &self.layers {
            if let Some((line, col)) = locate::find_key(src, table, key) {
                return (origin.to_string(), line, col);
            }
        }
        (self.layers[0].0.to_string(), 1, 1)
    }

    /// As [`Sources::at`], with a position finder that returns 1:1 for "not here".
    pub fn at_with(&self, find: impl Fn(&str) -> (usize, usize)) -> (String, usize, usize) {
        for (origin, src) in &self.layers {
            let pos = find(src);
            if pos != (1, 1) {
                return (origin.to_string(), pos.0, pos.1);
            }
        }
        (self.layers[0].0.to_string(), 1, 1)
    }
}

/// Parses `src` as a TOML table; a syntax error names file:line:column.
pub(super) fn parse_table(src: &str, origin: &str) -> Result<toml::Table, PolicyError> {
    src.parse::<toml::Table>()
        .map_err(|e| toml_error(src, origin, &e))
}

/// A TOML or serde error of the text `src` of `origin`, at its file:line:column and field.
pub(super) fn toml_error(src: &str, origin: &str, e: &toml::de::Error) -> PolicyError {
    let (line, column, field) = locate::from_toml_error(src, e);
    PolicyError::Invalid {
        path: origin.to_string(),
        line,
        column,
        field,
        message: e.message().trim().to_string(),
    }
}

/// Where a policy named `name` is: (origin, source, id, text). Installed first, then
/// built-in, as `Policy::load` looks.
fn find(
    name: &str,
    dirs: &[std::path::PathBuf],
) -> Result<(String, String, String, String), PolicyError> {
    let mut searched = Vec::new();
    for dir in dirs {
        let p = dir.join(format!("{name}.toml"));
        searched.push(p.display().to_string());
        if p.is_file() {
            let src = std::fs::read_to_string(&p).map_err(|source| PolicyError::Io {
                path: p.clone(),
                source,
            })?;
            let shown = p.display().to_string();
            let id = std::fs::canonicalize(&p)
                .map(|c| c.display().to_string())
                .unwrap_or_else(|_| shown.clone());
            return Ok((shown.clone(), shown, id, src));
        }
    }
    if let Some((_, src)) = BUILTIN_POLICIES.iter().find(|(n, _)| *n == name) {
        return Ok((
            format!("built-in:{name}.toml"),
            "built-in".into(),
            format!("built-in:{name}"),
            src.to_string(),
        ));
    }
    searched.push("built-in".into());
    Err(PolicyError::NotFound {
        name: name.to_string(),
        searched: searched.join(", "),
    })
}

/// What identifies the policy loaded from `origin` in a cycle.
fn id_of(origin: &str) -> String {
    if let Some(name) = origin
        .strip_prefix("built-in:")
        .and_then(|n| n.strip_suffix(".toml"))
    {
        return format!("built-in:{name}");
    }
    std::fs::canonicalize(origin)
        .map(|c| c.display().to_string())
        .unwrap_or_else(|_| origin.to_string())
}

/// The chain of `child` (already parsed as `table`): the child first, then each policy it
/// extends, looked up by name in `dirs` and then among the built-in ones. Errors name the
/// `extends` key that failed.
pub(super) fn chain(
    src: &str,
    origin: &str,
    table: toml::Table,
    dirs: &[std::path::PathBuf],
) -> Result<Vec<Layer>, PolicyError> {
    let mut layers = vec![Layer {
        origin: origin.to_string(),
        name: String::new(),
        source: origin.to_string(),
        id: id_of(origin),
        src: src.to_string(),
        table,
    }];
    loop {
        let cur = layers.last().expect("the child is there");
        let Some(v) = cur.table.get("extends") else {
            return Ok(layers);
        };
        let fail = |message: String| {
            let (line, column) = locate::key(&cur.src, "", "extends");
            PolicyError::Invalid {
                path: cur.origin.clone(),
                line,
                column,
                field: "extends".into(),
                message,
            }
        };
        let Some(name) = v.as_str() else {
            return Err(fail("must be the name of a policy, as a string".into()));
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(fail(format!(
                "{name:?}: a policy name (letters, digits, '-' and '_'), looked up as `--policy NAME` is"
            )));
        }
        if layers.len() > MAX_DEPTH {
            return Err(fail(format!(
                "more than {MAX_DEPTH} policies above this one ({})",
                names(&layers)
            )));
        }
        let (p_origin, p_source, id, p_src) = find(name, dirs).map_err(|e| match e {
            PolicyError::NotFound { searched, .. } => fail(format!(
                "no policy named {name:?} to extend (looked in: {searched})"
            )),
            other => other,
        })?;
        if layers.iter().any(|l| l.id == id) {
            return Err(fail(format!(
                "{name:?} extends, directly or not, this policy: a cycle ({} -> {name}); to \
                 change a policy, give yours a new name and extend it",
                names(&layers)
            )));
        }
        let p_table = parse_table(&p_src, &p_origin)?;
        layers.push(Layer {
            origin: p_origin,
            name: name.to_string(),
            source: p_source,
            id,
            src: p_src,
            table: p_table,
        });
    }
}

/// The chain as `a -> b -> c` (the loaded one by its origin).
fn names(layers: &[Layer]) -> String {
    layers
        .iter()
        .map(|l| {
            if l.name.is_empty() {
                l.origin.as_str()
            } else {
                l.name.as_str()
            }
        })
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// `over` on top of `base`: tables merge key by key, anything else replaces.
pub fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The chain merged, the topmost ancestor first and the child last, without `extends`.
pub(super) fn merged(layers: &[Layer]) -> toml::Table {
    let mut out = toml::Table::new();
    for l in layers.iter().rev() {
        merge(&mut out, &l.table);
    }
    out.remove("extends");
    out
}

/// The parents of a chain, nearest first.
pub(super) fn parents(layers: &[Layer]) -> Vec<Parent> {
    layers[1..]
        .iter()
        .map(|l| Parent {
            name: l.name.clone(),
            source: l.source.clone(),
        })
        .collect()
}
