//! Token accounting for services that speak an inference API (`api = "openai"`,
//! docs/agents.md "Local inference as a service"): the `usage` object of each response, read
//! as the bytes pass through the gateway, and the per-agent ledgers the token quotas charge.
//!
//! Nothing here buffers a response: [`UsageScanner`] is a byte-at-a-time JSON tokenizer that
//! keeps its depth, string state and at most [`MAX_USAGE_OBJECT`] bytes of one `usage`
//! object; an SSE stream (`text/event-stream`) is read line by line, each event's `data:` is
//! scanned as one JSON value. A server that sends no usage, a malformed one or a huge one is
//! charged an estimate or a clamped figure ([`Charge`]); the ledgers hold a fixed number of
//! buckets per (agent, service), whatever the request rate.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Largest `usage` object kept for parsing; a larger one is malformed (and charged the
/// estimate).
pub const MAX_USAGE_OBJECT: usize = 4096;
/// Most tokens one response may be charged, whatever the server says: a lying or broken
/// server cannot put a figure near `u64::MAX` into a ledger (2²¹, above the largest context
/// windows served today).
pub const MAX_TOKENS_PER_RESPONSE: u64 = 1 << 21;
/// Bytes per token of the estimate charged for a response without a usable `usage` (the
/// usual rule of thumb for English text with BPE tokenizers).
pub const BYTES_PER_ESTIMATED_TOKEN: u64 = 4;
/// Deepest nesting the scanner follows; deeper values are skipped, not parsed.
const MAX_DEPTH: u32 = 64;

/// A response's `usage`, as the server reported it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

impl Usage {
    /// The figure charged: `total_tokens`, but never less than prompt + completion (a server
    /// cannot report a small total beside large parts).
    fn total(&self) -> u64 {
        self.total_tokens
            .max(self.prompt_tokens.saturating_add(self.completion_tokens))
    }
}

/// What one response is charged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Charge {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Charged to the quotas.
    pub total_tokens: u64,
    /// No usable `usage`: `total_tokens` is the estimate from the bytes.
    pub estimated: bool,
    /// The server's figure was above [`MAX_TOKENS_PER_RESPONSE`] and was cut to it.
    pub clamped: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Json,
    Sse,
}

/// Reads a response's bytes as they pass and keeps the largest `usage` it saw.
#[derive(Debug)]
pub struct UsageScanner {
    mode: Mode,
    json: JsonScan,
    /// SSE: where in the current line we are.
    line: SseLine,
    /// SSE: the field name read so far at the start of a line (at most 5 bytes: `data:`).
    field: Vec<u8>,
    last_cr: bool,
    best: Option<Usage>,
    bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SseLine {
    /// Reading the field name.
    Start,
    /// After `data:`: the optional space.
    DataSpace,
    /// In the value of a `data:` line.
    Data,
    /// Another field or a comment: skipped to the end of the line.
    Skip,
}

impl UsageScanner {
    /// A scanner for a response of `content_type` (`text/event-stream`: SSE; anything else
    /// is scanned as JSON).
    pub fn new(content_type: Option<&str>) -> UsageScanner {
        let sse = content_type.is_some_and(|c| {
            c.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
        });
        UsageScanner {
            mode: if sse { Mode::Sse } else { Mode::Json },
            json: JsonScan::default(),
            line: SseLine::Start,
            field: Vec::with_capacity(5),
            last_cr: false,
            best: None,
            bytes: 0,
        }
    }

    /// Bytes seen so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The largest usage seen so far (cumulative usage in every chunk, as some servers send,
    /// and one final usage alike).
    pub fn usage(&self) -> Option<Usage> {
        self.best
    }

    pub fn feed(&mut self, data: &[u8]) {
        self.bytes = self.bytes.saturating_add(data.len() as u64);
        match self.mode {
            Mode::Json => {
                for &b in data {
                    if let Some(u) = self.json.byte(b) {
                        self.found(u);
                    }
                }
            }
            Mode::Sse => {
                for &b in data {
                    self.sse_byte(b);
                }
            }
        }
    }

    fn found(&mut self, u: Usage) {
        if self.best.is_none_or(|b| u.total() >= b.total()) {
            self.best = Some(u);
        }
    }

    fn sse_byte(&mut self, b: u8) {
        let cr = self.last_cr;
        self.last_cr = b == b'\r';
        if b == b'\n' && cr {
            return; // the LF of a CRLF
        }
        if b == b'\n' || b == b'\r' {
            if self.line == SseLine::Start && self.field.is_empty() {
                // A blank line ends the event: its data was one JSON value.
                self.json = JsonScan::default();
            } else if self.line == SseLine::Data {
                // Data lines of one event are joined by a newline (whitespace to JSON).
                if let Some(u) = self.json.byte(b'\n') {
                    self.found(u);
                }
            }
            self.line = SseLine::Start;
            self.field.clear();
            return;
        }
        match self.line {
            SseLine::Start => {
                self.field.push(b);
                if self.field == b"data:" {
                    self.line = SseLine::DataSpace;
                } else if !b"data:".starts_with(&self.field) {
                    self.line = SseLine::Skip;
                }
            }
            SseLine::DataSpace => {
                self.line = SseLine::Data;
                if b != b' ' {
                    if let Some(u) = self.json.byte(b) {
                        self.found(u);
                    }
                }
            }
            SseLine::Data => {
                if let Some(u) = self.json.byte(b) {
                    self.found(u);
                }
            }
            SseLine::Skip => {}
        }
    }

    /// The charge for the response: its usage (clamped), or the estimate from
    /// `request_bytes` and the response's bytes when it had none.
    pub fn charge(&self, request_bytes: u64) -> Charge {
        match self.best {
            Some(u) => {
                let total = u.total();
                let clamp = |v: u64| v.min(MAX_TOKENS_PER_RESPONSE);
                Charge {
                    prompt_tokens: clamp(u.prompt_tokens),
                    completion_tokens: clamp(u.completion_tokens),
                    total_tokens: clamp(total),
                    estimated: false,
                    clamped: total > MAX_TOKENS_PER_RESPONSE,
                }
            }
            None => {
                let bytes = request_bytes.saturating_add(self.bytes);
                let t = bytes.div_ceil(BYTES_PER_ESTIMATED_TOKEN);
                Charge {
                    total_tokens: t.min(MAX_TOKENS_PER_RESPONSE),
                    estimated: true,
                    clamped: t > MAX_TOKENS_PER_RESPONSE,
                    ..Charge::default()
                }
            }
        }
    }
}

/// A streaming JSON tokenizer that finds `"usage": {...}` among the keys of a top-level
/// object. Strings are followed with their escapes, so text inside a string (a model's output
/// that says `"usage": {"total_tokens": 0}`) is never taken for a key.
#[derive(Debug, Default)]
struct JsonScan {
    depth: u32,
    /// The top-level value is an object (its keys are looked at).
    top_object: bool,
    in_string: bool,
    escape: bool,
    /// At depth 1, a key is expected (after `{` or `,`).
    expect_key: bool,
    /// At depth 1: reading a key; `key` holds its first bytes (up to 6).
    in_key: bool,
    key: Vec<u8>,
    /// The last key read at depth 1 was `usage` and its `:` has been seen.
    usage_value: bool,
    key_is_usage: bool,
    /// Capturing the usage object's bytes (None: not capturing, or overflowed).
    capture: Option<Vec<u8>>,
    capturing: bool,
}

impl JsonScan {
    /// Feeds one byte; returns a usage object that has just ended.
    fn byte(&mut self, b: u8) -> Option<Usage> {
        if self.capturing {
            match &mut self.capture {
                Some(buf) if buf.len() < MAX_USAGE_OBJECT => buf.push(b),
                _ => self.capture = None,
            }
        }
        if self.in_string {
            if self.escape {
                self.escape = false;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.in_key {
                    self.in_key = false;
                    self.key_is_usage = self.key == b"usage";
                }
            } else if self.in_key && self.key.len() < 6 {
                self.key.push(b);
            }
            return None;
        }
        match b {
            b'"' => {
                self.in_string = true;
                if self.depth == 1 && self.top_object && self.expect_key {
                    self.expect_key = false;
                    self.in_key = true;
                    self.key.clear();
                }
                self.usage_value = false;
            }
            b'{' | b'[' => {
                if self.depth == 0 {
                    self.top_object = b == b'{';
                    self.expect_key = true;
                } else if self.depth == 1 && self.usage_value && b == b'{' {
                    self.capturing = true;
                    self.capture = Some(vec![b'{']);
                }
                self.usage_value = false;
                self.depth = self.depth.saturating_add(1).min(MAX_DEPTH + 1);
            }
            b'}' | b']' => {
                self.depth = self.depth.saturating_sub(1);
                if self.depth == 1 && self.capturing {
                    self.capturing = false;
                    let parsed = self
                        .capture
                        .take()
                        .and_then(|buf| serde_json::from_slice::<Usage>(&buf).ok());
                    return parsed;
                }
                if self.depth == 0 {
                    self.top_object = false;
                }
            }
            b':' if self.depth == 1 => {
                self.usage_value = self.key_is_usage;
                self.key_is_usage = false;
            }
            b',' if self.depth == 1 => {
                self.expect_key = true;
                self.usage_value = false;
            }
            b' ' | b'\t' | b'\n' | b'\r' => {}
            _ => self.usage_value = false,
        }
        None
    }
}

/// Width of the day ledger's buckets, seconds.
pub const DAY_BUCKET_S: u64 = 600;
const DAY_S: u64 = 24 * 3600;

/// The tokens one agent used on one service: per second over the last minute and per
/// 10 minutes over the last day, plus totals. At most 60 + 145 buckets, whatever the rate
/// (charges in the same second or bucket are added together). Times are Unix seconds, so
/// the ledger is stored and restored as it is (aitherd keeps it with the egress quota state).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenLedger {
    /// (Unix second, tokens), oldest first, the last 60 s.
    pub seconds: VecDeque<(u64, u64)>,
    /// (Unix time / 600, tokens), oldest first, the last 24 h.
    pub buckets: VecDeque<(u64, u64)>,
    /// Every token charged under this (agent, token), for the Prometheus counter.
    pub total: u64,
    /// Responses charged.
    pub responses: u64,
    /// Responses charged an estimate (no usable usage).
    pub estimated: u64,
    /// Responses whose figure was clamped.
    pub clamped: u64,
}

impl TokenLedger {
    fn prune(&mut self, now_s: u64) {
        while self
            .seconds
            .front()
            .is_some_and(|(s, _)| now_s.saturating_sub(*s) >= 60)
        {
            self.seconds.pop_front();
        }
        let oldest = (now_s.saturating_sub(DAY_S)) / DAY_BUCKET_S;
        while self.buckets.front().is_some_and(|(b, _)| *b <= oldest) {
            self.buckets.pop_front();
        }
        // A ledger read back from storage may be anything: keep the bounds.
        while self.seconds.len() > 60 {
            self.seconds.pop_front();
        }
        while self.buckets.len() > (DAY_S / DAY_BUCKET_S) as usize + 1 {
            self.buckets.pop_front();
        }
    }

    /// Charges `c` at Unix second `now_s`.
    pub fn charge(&mut self, now_s: u64, c: &Charge) {
        self.prune(now_s);
        let t = c.total_tokens;
        match self.seconds.back_mut() {
            Some((s, v)) if *s == now_s => *v = v.saturating_add(t),
            _ => self.seconds.push_back((now_s, t)),
        }
        let b = now_s / DAY_BUCKET_S;
        match self.buckets.back_mut() {
            Some((x, v)) if *x == b => *v = v.saturating_add(t),
            _ => self.buckets.push_back((b, t)),
        }
        self.total = self.total.saturating_add(t);
        self.responses += 1;
        self.estimated += u64::from(c.estimated);
        self.clamped += u64::from(c.clamped);
        self.prune(now_s);
    }

    /// Tokens of the last 60 s.
    pub fn minute(&self, now_s: u64) -> u64 {
        self.seconds
            .iter()
            .filter(|(s, _)| now_s.saturating_sub(*s) < 60)
            .fold(0u64, |a, (_, v)| a.saturating_add(*v))
    }

    /// Tokens of the last 24 h: the current 10-minute bucket and the 143 before it.
    pub fn day(&self, now_s: u64) -> u64 {
        let oldest = (now_s.saturating_sub(DAY_S)) / DAY_BUCKET_S;
        self.buckets
            .iter()
            .filter(|(b, _)| *b > oldest)
            .fold(0u64, |a, (_, v)| a.saturating_add(*v))
    }

    /// Seconds until the minute window has room below `limit` again (at least 1).
    pub fn minute_retry_after(&self, now_s: u64, limit: u64) -> u64 {
        let mut used = self.minute(now_s);
        for (s, v) in &self.seconds {
            if used < limit {
                break;
            }
            used = used.saturating_sub(*v);
            if used < limit {
                return (s + 60).saturating_sub(now_s).max(1);
            }
        }
        1
    }
}

pub fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(ct: &str, chunks: &[&[u8]]) -> UsageScanner {
        let mut s = UsageScanner::new(Some(ct));
        for c in chunks {
            s.feed(c);
        }
        s
    }

    #[test]
    fn a_json_response_usage_is_found_across_chunk_boundaries() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"hi \"usage\": {\"total_tokens\": 1}"}}],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
        for split in 0..body.len() {
            let s = scan("application/json", &[&body[..split], &body[split..]]);
            let c = s.charge(0);
            assert_eq!((c.total_tokens, c.estimated), (42, false), "split {split}");
            assert_eq!((c.prompt_tokens, c.completion_tokens), (12, 30));
        }
    }

    #[test]
    fn text_that_looks_like_usage_is_not_taken() {
        // A key inside a nested object, and a string value that reads like the key.
        let body =
            br#"{"a":{"usage":{"total_tokens":999}},"b":"usage","c":["usage",{"usage":{"total_tokens":5}}]}"#;
        let s = scan("application/json", &[body]);
        assert_eq!(s.usage(), None);
        assert!(s.charge(0).estimated);
    }

    #[test]
    fn an_sse_stream_is_charged_its_final_usage_chunk() {
        let stream =
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\r\n\r\n\
: a comment\n\
data: {\"choices\":[],\n\
data:  \"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\n\
data: [DONE]\n\n";
        for split in 0..stream.len() {
            let s = scan(
                "text/event-stream; charset=utf-8",
                &[&stream[..split], &stream[split..]],
            );
            assert_eq!(s.charge(0).total_tokens, 12, "split {split}");
        }
    }

    #[test]
    fn no_or_malformed_usage_is_charged_the_byte_estimate() {
        for body in [
            &br#"{"choices":[]}"#[..],
            br#"{"usage":{"total_tokens":-5}}"#,
            br#"{"usage":{"total_tokens":"many"}}"#,
            br#"{"usage":"lots"}"#,
            b"not json at all",
        ] {
            let s = scan("application/json", &[body]);
            let c = s.charge(100);
            assert!(c.estimated, "{}", String::from_utf8_lossy(body));
            assert_eq!(c.total_tokens, (100 + body.len() as u64).div_ceil(4));
        }
        // A usage object over the bound is malformed too.
        let mut big = br#"{"usage":{"total_tokens":1,"pad":""#.to_vec();
        big.extend(std::iter::repeat_n(b'x', 2 * MAX_USAGE_OBJECT));
        big.extend(br#""}}"#);
        assert!(scan("application/json", &[&big]).charge(0).estimated);
    }

    #[test]
    fn a_lying_huge_figure_is_clamped_and_a_small_total_is_not_believed() {
        let s = scan(
            "application/json",
            &[br#"{"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":18446744073709551615}}"#],
        );
        let c = s.charge(0);
        assert_eq!((c.total_tokens, c.clamped), (MAX_TOKENS_PER_RESPONSE, true));
        let s = scan(
            "application/json",
            &[br#"{"usage":{"prompt_tokens":100,"completion_tokens":50,"total_tokens":0}}"#],
        );
        assert_eq!(s.charge(0).total_tokens, 150);
    }

    #[test]
    fn the_ledger_slides_and_stays_bounded() {
        let mut l = TokenLedger::default();
        let c = |t| Charge {
            total_tokens: t,
            ..Charge::default()
        };
        let t0 = 1_000_000_000;
        l.charge(t0, &c(10));
        l.charge(t0, &c(5));
        l.charge(t0 + 30, &c(1));
        assert_eq!(l.minute(t0 + 30), 16);
        assert_eq!(l.minute(t0 + 60), 1);
        assert_eq!(l.minute_retry_after(t0 + 30, 10), 30);
        assert_eq!(l.day(t0 + 3600), 16);
        assert_eq!(l.day(t0 + DAY_S + DAY_BUCKET_S), 0);
        // A charge every second for two days: the buckets stay within their bounds.
        for s in 0..2 * DAY_S {
            l.charge(t0 + s, &c(1));
        }
        assert!(
            l.seconds.len() <= 60 && l.buckets.len() <= 145,
            "{}",
            l.buckets.len()
        );
        assert_eq!(l.minute(t0 + 2 * DAY_S - 1), 60);
        let day = l.day(t0 + 2 * DAY_S - 1);
        assert!((DAY_S - DAY_BUCKET_S..=DAY_S).contains(&day), "{day}");
        assert_eq!(l.responses, 2 * DAY_S + 3);
    }
}
