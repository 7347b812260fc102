//! Maps positions in policy text to line, column and the dotted field name, so that every
//! error names file:line:column and the field.

/// Line and column (1-based) of a byte offset.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
    (line, col)
}

/// The table header in force at a line (e.g. "resources"), "" at top level.
fn table_at(src: &str, line: usize) -> String {
    let mut table = String::new();
    for l in src.lines().take(line) {
        let t = l.trim();
        if t.starts_with('[') && !t.starts_with("[[") {
            if let Some(end) = t.find(']') {
                table = t[1..end].trim().to_string();
            }
        }
    }
    table
}

/// The key assigned on a line, if any.
fn key_on_line(src: &str, line: usize) -> Option<String> {
    let l = src.lines().nth(line.checked_sub(1)?)?;
    let (k, _) = l.split_once('=')?;
    let k = k.trim().trim_matches('"');
    (!k.is_empty() && !k.starts_with('#') && !k.starts_with('[')).then(|| k.to_string())
}

/// Position and field of a toml deserialisation error.
pub fn from_toml_error(src: &str, e: &toml::de::Error) -> (usize, usize, String) {
    let (line, col) = e.span().map(|s| line_col(src, s.start)).unwrap_or((1, 1));
    let table = table_at(src, line);
    let msg = e.message();
    // serde names the field in "unknown field `x`" and "missing field `x`".
    let named = msg
        .split('`')
        .nth(1)
        .filter(|_| msg.starts_with("unknown field") || msg.starts_with("missing field"))
        .map(str::to_string);
    let key = named.or_else(|| key_on_line(src, line));
    let field = match (table.is_empty(), key) {
        (false, Some(k)) => format!("{table}.{k}"),
        (true, Some(k)) => k,
        (false, None) => table,
        (true, None) => "(document)".to_string(),
    };
    (line, col, field)
}

/// Position of `key` inside `[table]` ("" = top level); (1, 1) if absent.
pub fn key(src: &str, table: &str, key: &str) -> (usize, usize) {
    find_key(src, table, key).unwrap_or((1, 1))
}

/// Position of `key` inside `[table]` ("" = top level), if it is written there.
pub fn find_key(src: &str, table: &str, key: &str) -> Option<(usize, usize)> {
    let mut current = String::new();
    for (i, l) in src.lines().enumerate() {
        let t = l.trim_start();
        if t.starts_with('[') {
            if let Some(end) = t.find(']') {
                current = t[1..end].trim().to_string();
            }
            continue;
        }
        if current == table {
            if let Some((k, _)) = t.split_once('=') {
                if k.trim().trim_matches('"') == key {
                    return Some((i + 1, l.len() - t.len() + 1));
                }
            }
        }
    }
    None
}
