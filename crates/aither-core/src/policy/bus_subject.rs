//! Subjects and patterns (NATS semantics): dot-separated tokens; in patterns `*` stands for
//! exactly one token and `>` (last token only) for one or more.

/// A subject or pattern that is not one (the bus answers it as its `invalid` error).
#[derive(Debug, thiserror::Error)]
pub enum SubjectError {
    #[error("field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Longest subject or pattern, in bytes.
pub const MAX_SUBJECT: usize = 256;
/// Most tokens in a subject or pattern.
pub const MAX_TOKENS: usize = 32;

fn token_char(c: char) -> bool {
    c.is_ascii_graphic() && !matches!(c, '.' | '*' | '>')
}

fn split<'a>(field: &'static str, s: &'a str) -> Result<Vec<&'a str>, SubjectError> {
    let bad = |reason: String| SubjectError::Invalid {
        field,
        reason: format!("{s:?}: {reason}"),
    };
    if s.is_empty() {
        return Err(bad("empty".into()));
    }
    if s.len() > MAX_SUBJECT {
        return Err(bad(format!("longer than {MAX_SUBJECT} bytes")));
    }
    let toks: Vec<&str> = s.split('.').collect();
    if toks.len() > MAX_TOKENS {
        return Err(bad(format!("more than {MAX_TOKENS} tokens")));
    }
    if toks.iter().any(|t| t.is_empty()) {
        return Err(bad("empty token (leading, trailing or double '.')".into()));
    }
    Ok(toks)
}

/// Checks a subject a message is published on: tokens of printable ASCII, no wildcards.
pub fn check_subject(field: &'static str, s: &str) -> Result<(), SubjectError> {
    for t in split(field, s)? {
        if !t.chars().all(token_char) {
            return Err(SubjectError::Invalid {
                field,
                reason: format!(
                    "{s:?}: token {t:?} may use only printable ASCII other than '.', '*' and '>' (wildcards are for patterns)"
                ),
            });
        }
    }
    Ok(())
}

/// A validated subscription or permission pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    toks: Vec<String>,
}

impl Pattern {
    /// Parses a pattern: literal tokens, `*`, and `>` as the last token only.
    pub fn parse(field: &'static str, s: &str) -> Result<Pattern, SubjectError> {
        let toks = split(field, s)?;
        let n = toks.len();
        for (i, t) in toks.iter().enumerate() {
            let ok = match *t {
                "*" => true,
                ">" => i + 1 == n,
                lit => lit.chars().all(token_char),
            };
            if !ok {
                return Err(SubjectError::Invalid {
                    field,
                    reason: if *t == ">" {
                        format!("{s:?}: '>' may only be the last token")
                    } else {
                        format!("{s:?}: token {t:?}: wildcards must be whole tokens ('*' or '>'); other tokens use printable ASCII without '.'")
                    },
                });
            }
        }
        Ok(Pattern {
            text: s.to_string(),
            toks: toks.into_iter().map(str::to_string).collect(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the (valid) subject matches.
    pub fn matches(&self, subject: &str) -> bool {
        let mut it = subject.split('.');
        for (i, p) in self.toks.iter().enumerate() {
            match p.as_str() {
                ">" => {
                    // One or more tokens left.
                    let _ = i;
                    return it.next().is_some();
                }
                "*" => {
                    if it.next().is_none() {
                        return false;
                    }
                }
                lit => {
                    if it.next() != Some(lit) {
                        return false;
                    }
                }
            }
        }
        it.next().is_none()
    }

    /// Whether every subject `inner` matches is also matched by `self`.
    pub fn contains(&self, inner: &Pattern) -> bool {
        fn go(o: &[String], i: &[String]) -> bool {
            match (o.first().map(String::as_str), i.first().map(String::as_str)) {
                (Some(">"), _) => !i.is_empty(),
                (None, None) => true,
                (None, _) | (_, None) => false,
                (Some(_), Some(">")) => false,
                (Some("*"), Some(_)) => go(&o[1..], &i[1..]),
                (Some(a), Some(b)) => a == b && b != "*" && go(&o[1..], &i[1..]),
            }
        }
        go(&self.toks, &inner.toks)
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// The placeholder in policy patterns that becomes the agent's name when a token is minted.
pub const SELF_TOKEN: &str = "$self";

/// Checks a policy pattern (which may use `$self` as a whole token).
pub fn check_policy_pattern(field: &'static str, s: &str) -> Result<(), SubjectError> {
    Pattern::parse(field, &s.replace(SELF_TOKEN, "x")).map(|_| ())?;
    if s.split('.')
        .any(|t| t.contains(SELF_TOKEN) && t != SELF_TOKEN)
    {
        return Err(SubjectError::Invalid {
            field,
            reason: format!("{s:?}: {SELF_TOKEN} must be a whole token"),
        });
    }
    Ok(())
}

/// Replaces `$self` tokens with the agent's name, which must itself be one valid token.
pub fn expand_self(field: &'static str, s: &str, name: &str) -> Result<String, SubjectError> {
    if !s.split('.').any(|t| t == SELF_TOKEN) {
        Pattern::parse(field, s)?;
        return Ok(s.to_string());
    }
    if name.is_empty() || !name.chars().all(token_char) {
        return Err(SubjectError::Invalid {
            field,
            reason: format!("the name {name:?} cannot stand for {SELF_TOKEN} in {s:?} (it must be one subject token: no '.', '*', '>' or spaces)"),
        });
    }
    let out = s
        .split('.')
        .map(|t| if t == SELF_TOKEN { name } else { t })
        .collect::<Vec<_>>()
        .join(".");
    Pattern::parse(field, &out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse("pattern", s).unwrap()
    }

    /// (pattern, subject, matches)
    pub const MATCHES: &[(&str, &str, bool)] = &[
        ("a", "a", true),
        ("a", "b", false),
        ("a", "a.b", false),
        ("a.b", "a", false),
        ("a.b.c", "a.b.c", true),
        ("*", "a", true),
        ("*", "a.b", false),
        ("a.*", "a.b", true),
        ("a.*", "a", false),
        ("a.*", "a.b.c", false),
        ("*.b", "a.b", true),
        ("*.b", "a.c", false),
        ("a.*.c", "a.x.c", true),
        ("a.*.c", "a.x.d", false),
        (">", "a", true),
        (">", "a.b.c", true),
        ("a.>", "a", false),
        ("a.>", "a.b", true),
        ("a.>", "a.b.c.d", true),
        ("a.>", "b.a", false),
        ("*.>", "a.b", true),
        ("*.>", "a", false),
        ("a.*.>", "a.b.c", true),
        ("a.*.>", "a.b", false),
        ("agent.w1.>", "agent.w1.out", true),
        ("agent.w1.>", "agent.w10.out", false),
        ("aither.agent.*.exited", "aither.agent.w1.exited", true),
        ("aither.agent.*.exited", "aither.agent.w1.started", false),
    ];

    #[test]
    fn the_match_table() {
        for (pat, subj, want) in MATCHES {
            check_subject("subject", subj).unwrap();
            assert_eq!(p(pat).matches(subj), *want, "{pat} ~ {subj}");
        }
    }

    #[test]
    fn containment() {
        let table: &[(&str, &str, bool)] = &[
            (">", "a", true),
            (">", "a.>", true),
            (">", ">", true),
            (">", "*", true),
            ("a.>", "a.b", true),
            ("a.>", "a.*", true),
            ("a.>", "a.>", true),
            ("a.>", "a.b.>", true),
            ("a.>", "a", false),
            ("a.>", ">", false),
            ("a.>", "*.b", false),
            ("a.*", "a.b", true),
            ("a.*", "a.*", true),
            ("a.*", "a.>", false),
            ("a.*", "a.b.c", false),
            ("a.b", "a.*", false),
            ("a.b", "a.b", true),
            ("*.b", "a.b", true),
            ("*.b", "*.b", true),
            ("*.b", "*.*", false),
            ("*.>", "a.b.c", true),
            ("*.>", "a", false),
            ("agent.w1.>", "agent.*.>", false),
        ];
        for (o, i, want) in table {
            assert_eq!(p(o).contains(&p(i)), *want, "{o} ⊇ {i}");
        }
        // Containment agrees with matching on the match table's subjects.
        for (o, i, want) in table {
            if *want {
                for (_, s, _) in MATCHES {
                    if p(i).matches(s) {
                        assert!(p(o).matches(s), "{o} ⊇ {i} but not on {s}");
                    }
                }
            }
        }
    }

    #[test]
    fn malformed_subjects_and_patterns_are_refused() {
        for s in [
            "", ".", "a.", ".a", "a..b", "a b", "a.*", "a.>", "a\tb", "é",
        ] {
            assert!(check_subject("subject", s).is_err(), "{s:?}");
        }
        for s in ["", "a.>.b", ">.a", "a*", "a.b>", "a..b", "a. b"] {
            assert!(Pattern::parse("pattern", s).is_err(), "{s:?}");
        }
        let long = "a.".repeat(200) + "a";
        assert!(check_subject("subject", &long).is_err());
        let e = check_subject("subject", "a..b").unwrap_err().to_string();
        assert!(e.contains("subject"), "{e}");
    }

    #[test]
    fn self_expands_to_one_token() {
        assert_eq!(
            expand_self("bus.publish", "agent.$self.>", "w1").unwrap(),
            "agent.w1.>"
        );
        assert!(expand_self("bus.publish", "agent.$self.>", "a.b").is_err());
        assert!(check_policy_pattern("bus.publish", "agent.x$self.>").is_err());
        assert!(check_policy_pattern("bus.publish", "agent.$self.>").is_ok());
    }
}
