//! Text that agents wrote (memory keys and values, bus subjects, log output, names in tables),
//! made safe to print on an operator's terminal: control characters would otherwise be
//! interpreted by the terminal (OSC 52 writes the clipboard, `\r` or cursor moves fake lines,
//! a title sequence renames the window). Each is shown as a visible escape instead.
//!
//! Decision (docs/security-model.md, "Text from agents"): tables and listings (`mem ls`,
//! `mem search`, graph listings, `bus sub`, `bus streams`, `ps`) always escape; `mem get` and
//! `logs` print raw bytes to a pipe or file (they are data for the next program) and escape
//! when stdout is a terminal, keeping newlines and tabs there.

use std::borrow::Cow;
use std::io::IsTerminal;

/// A control character: C0 (U+0000–U+001F), DEL, or C1 (U+0080–U+009F, which some terminals
/// take as 8-bit CSI/OSC introducers).
fn is_control(c: char) -> bool {
    c.is_control()
}

fn escape_with(s: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !s.chars().any(|c| is_control(c) && !keep(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if !is_control(c) || keep(c) {
            out.push(c);
            continue;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x1b' => out.push_str("\\e"),
            c if (c as u32) < 0x100 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    Cow::Owned(out)
}

/// One field of a line: every control character escaped (newlines too: one record, one line).
pub fn field(s: &str) -> Cow<'_, str> {
    escape_with(s, |_| false)
}

/// Running text: control characters escaped except newline and tab.
pub fn text(s: &str) -> Cow<'_, str> {
    escape_with(s, |c| c == '\n' || c == '\t')
}

/// Whether aitherctl's stdout is a terminal (then `mem get` and `logs` escape).
pub fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

/// `text` when stdout is a terminal, the bytes unchanged otherwise.
pub fn for_stdout(s: &str) -> Cow<'_, str> {
    if stdout_is_terminal() {
        text(s)
    } else {
        Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn osc52_and_fake_lines_are_shown_not_interpreted() {
        let osc52 = "key\x1b]52;c;ZWNobyBwd25lZA==\x07";
        assert_eq!(field(osc52), "key\\e]52;c;ZWNobyBwd25lZA==\\x07");
        assert_eq!(field("a\nfake line\rX"), "a\\nfake line\\rX");
        assert_eq!(text("a\nb\tc\r\x1b[2K"), "a\nb\tc\\r\\e[2K");
        assert_eq!(field("csi\u{9b}31m"), "csi\\x9b31m");
        assert_eq!(field("del\x7f"), "del\\x7f");
        assert!(matches!(field("plain ünïcode"), Cow::Borrowed(_)));
    }
}
