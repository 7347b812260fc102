//! Labels: `key=value` pairs an operator attaches to an agent at spawn (`--label`, an agent
//! file's `labels`), shown by `inspect` and selected by `ps --filter label=…`, as podman and
//! Kubernetes have them. The syntax is Kubernetes' (a key is an optional DNS-subdomain prefix
//! and `/`, then a name of up to 63 characters; a value up to 63 characters), so that labels
//! carry over to an exported Pod unchanged and stay plain text in a table.

use std::collections::BTreeMap;

/// At most this many labels on one agent (each is stored with the agent and shown by `ps`).
pub const MAX_LABELS: usize = 32;

/// A refused label, with the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("at most {MAX_LABELS} labels on an agent ({0} given)")]
    TooMany(usize),
    #[error("invalid label key {0:?}: an optional DNS-subdomain prefix and '/', then 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit")]
    Key(String),
    #[error("invalid value {value:?} of label {key:?}: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (or empty)")]
    Value { key: String, value: String },
    #[error("invalid label {0:?}: write KEY=VALUE")]
    Syntax(String),
}

/// A name or value part: 1-63 (`empty_ok`: 0-63) of `[A-Za-z0-9._-]`, alphanumeric at both ends.
fn segment(s: &str, empty_ok: bool) -> bool {
    if s.is_empty() {
        return empty_ok;
    }
    let b = s.as_bytes();
    s.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Whether `key` is a label key.
pub fn valid_key(key: &str) -> bool {
    match key.split_once('/') {
        // The prefix is a DNS name by the egress rules' one check (lower case, 1-63 a label,
        // 253 in all; an IP literal or an all-digit last label is not one).
        Some((prefix, name)) => {
            crate::policy::net_rules::check_dns_name(prefix).is_ok() && segment(name, false)
        }
        None => segment(key, false),
    }
}

/// Checks a set of labels.
pub fn validate(labels: &BTreeMap<String, String>) -> Result<(), LabelError> {
    if labels.len() > MAX_LABELS {
        return Err(LabelError::TooMany(labels.len()));
    }
    for (k, v) in labels {
        if !valid_key(k) {
            return Err(LabelError::Key(k.clone()));
        }
        if !segment(v, true) {
            return Err(LabelError::Value {
                key: k.clone(),
                value: v.clone(),
            });
        }
    }
    Ok(())
}

/// `KEY=VALUE` (or `KEY`, an empty value), as `--label` takes it.
pub fn parse(s: &str) -> Result<(String, String), LabelError> {
    let (k, v) = s.split_once('=').unwrap_or((s, ""));
    if k.is_empty() {
        return Err(LabelError::Syntax(s.into()));
    }
    let one = BTreeMap::from([(k.to_string(), v.to_string())]);
    validate(&one)?;
    Ok((k.into(), v.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_keys_and_values_are_labels() {
        for k in [
            "team",
            "app.kubernetes.io/name",
            "a",
            "x-y_z.1",
            "example.com/tier",
        ] {
            assert!(valid_key(k), "{k}");
        }
        for k in [
            "",
            "-a",
            "a-",
            "Example.com/x",
            "a/b/c",
            "/x",
            "x/",
            "a b",
            "é",
            &"k".repeat(64),
        ] {
            assert!(!valid_key(k), "{k}");
        }
        assert_eq!(parse("team=a"), Ok(("team".into(), "a".into())));
        assert_eq!(parse("flag"), Ok(("flag".into(), String::new())));
        assert_eq!(parse("=x"), Err(LabelError::Syntax("=x".into())));
        assert!(matches!(parse("team=a b"), Err(LabelError::Value { .. })));
        assert!(matches!(
            parse("team=\u{1b}[2J"),
            Err(LabelError::Value { .. })
        ));
        let many: BTreeMap<String, String> =
            (0..33).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(validate(&many), Err(LabelError::TooMany(33)));
    }
}
