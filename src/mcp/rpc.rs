//! The JSON-RPC 2.0 session of the MCP stdio transport: one JSON message per line on stdin,
//! one per line on stdout (never a newline inside a message: serde_json's compact form escapes
//! them), nothing else on stdout.
//!
//! Lifecycle (MCP "Lifecycle"): `initialize` negotiates the protocol version (the client's if
//! this server speaks it, else the newest it speaks; the client decides whether to go on), then
//! `notifications/initialized`; `ping` is answered at any time. Before `initialize`, any other
//! request is refused. Tool failures are results with `isError: true` (the model can read and
//! correct them); protocol errors (unknown method, unknown tool, malformed message) are
//! JSON-RPC errors.

use std::io::{self, BufRead, Write};

use serde_json::{json, Map, Value};

use super::tools::TOOLS;
use super::ToolError;

/// The protocol revisions reachable through `initialize` that this server speaks, oldest first.
/// The tools, their schemas and their results are the same in each.
pub const PROTOCOL_VERSIONS: [&str; 4] = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];

/// JSON-RPC error codes.
pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;

/// The most a line may be; a longer one is answered with a parse error and skipped.
pub const MAX_LINE: usize = 4 << 20;

/// What carries out a tool call.
pub trait Tools {
    /// Runs tool `name` (one of [`TOOLS`]) with its arguments.
    fn call(&mut self, name: &str, args: &Map<String, Value>) -> Result<Outcome, ToolError>;
}

/// A successful call's result: text for the model, and the same as structured content.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub text: String,
    pub structured: Value,
    /// The call ran but what it ran failed (a command's exit status 125: Aither refused it).
    pub is_error: bool,
}

impl Outcome {
    /// A result whose text is the structured content as JSON.
    pub fn json(v: Value) -> Outcome {
        Outcome {
            text: serde_json::to_string_pretty(&v).unwrap_or_default(),
            structured: v,
            is_error: false,
        }
    }
}

/// One session's state.
pub struct Session<T: Tools> {
    tools: T,
    version: String,
}

impl<T: Tools> Session<T> {
    pub fn new(tools: T) -> Self {
        Session {
            tools,
            version: String::new(),
        }
    }

    /// The negotiated protocol version (empty before `initialize`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Serves messages from `input` until it ends.
    pub fn serve(&mut self, input: impl BufRead, mut output: impl Write) -> io::Result<()> {
        let mut input = input.take(MAX_LINE as u64 + 1);
        let mut line = Vec::new();
        loop {
            line.clear();
            input.set_limit(MAX_LINE as u64 + 1);
            if input.read_until(b'\n', &mut line)? == 0 {
                return Ok(());
            }
            if line.len() > MAX_LINE && line.last() != Some(&b'\n') {
                // Skip the rest of the oversized line without keeping it.
                input.set_limit(u64::MAX);
                skip_line(&mut input)?;
                write_msg(
                    &mut output,
                    &error(Value::Null, PARSE_ERROR, "message too long"),
                )?;
                continue;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if let Some(reply) = self.handle_line(&line) {
                write_msg(&mut output, &reply)?;
            }
        }
    }

    /// One message in, the reply out (none for notifications and responses).
    pub fn handle_line(&mut self, line: &[u8]) -> Option<Value> {
        let msg: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => return Some(error(Value::Null, PARSE_ERROR, &format!("not JSON: {e}"))),
        };
        let Value::Object(msg) = msg else {
            let what = if msg.is_array() {
                "batches are not supported: send one message per line"
            } else {
                "a message is a JSON object"
            };
            return Some(error(Value::Null, INVALID_REQUEST, what));
        };
        let id = msg.get("id").cloned();
        if msg.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Some(error(
                id.unwrap_or(Value::Null),
                INVALID_REQUEST,
                "\"jsonrpc\" must be \"2.0\"",
            ));
        }
        let Some(method) = msg.get("method").and_then(Value::as_str) else {
            // A response to a request of ours (we send none) or garbage: nothing to answer.
            return None;
        };
        let params = msg.get("params").cloned().unwrap_or(json!({}));
        // Without an id, a notification: never answered. `notifications/initialized` ends the
        // handshake (nothing waits for it: the server sends no requests); cancellations have
        // nothing to cancel (calls are answered in order, each before the next is read).
        id.map(|id| match self.request(method, &params) {
            Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
            Err((code, message)) => error(id, code, &message),
        })
    }

    fn request(&mut self, method: &str, params: &Value) -> Result<Value, (i64, String)> {
        match method {
            "initialize" => Ok(self.initialize(params)),
            "ping" => Ok(json!({})),
            _ if self.version.is_empty() => Err((
                INVALID_REQUEST,
                format!("{method}: the session is not initialized (send `initialize` first)"),
            )),
            "tools/list" => Ok(json!({"tools": super::tools::list()})),
            "tools/call" => self.call(params),
            _ => Err((METHOD_NOT_FOUND, format!("unknown method {method:?}"))),
        }
    }

    fn initialize(&mut self, params: &Value) -> Value {
        let asked = params.get("protocolVersion").and_then(Value::as_str);
        let newest = PROTOCOL_VERSIONS[PROTOCOL_VERSIONS.len() - 1];
        self.version = asked
            .filter(|v| PROTOCOL_VERSIONS.contains(v))
            .unwrap_or(newest)
            .to_string();
        json!({
            "protocolVersion": self.version,
            "capabilities": {"tools": {"listChanged": false}},
            "serverInfo": {"name": "aither", "version": env!("CARGO_PKG_VERSION")},
            "instructions": "Aither runs commands and agents in Linux sandboxes. `run` runs one \
                command under a named policy; `spawn` starts a supervised agent; `logs`, `exec`, \
                `read`, `write`, `list`, `mem_*` act on a running agent; every call is audited.",
        })
    }

    fn call(&mut self, params: &Value) -> Result<Value, (i64, String)> {
        let Some(name) = params.get("name").and_then(Value::as_str) else {
            return Err((
                INVALID_PARAMS,
                "tools/call: `name` (a string) is required".into(),
            ));
        };
        if !TOOLS.iter().any(|t| t.name == name) {
            return Err((INVALID_PARAMS, format!("unknown tool {name:?}")));
        }
        let empty = Map::new();
        let args = match params.get("arguments") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(m)) => m,
            Some(_) => {
                return Ok(tool_error(&ToolError::arg(
                    "arguments",
                    "must be an object",
                )))
            }
        };
        if let Err(e) = super::tools::check_known(name, args) {
            return Ok(tool_error(&e));
        }
        Ok(match self.tools.call(name, args) {
            Ok(o) => json!({
                "content": [{"type": "text", "text": o.text}],
                "structuredContent": o.structured,
                "isError": o.is_error,
            }),
            Err(e) => tool_error(&e),
        })
    }
}

/// Consumes input up to and including the next newline (or the end), holding no more than
/// one buffer of it.
fn skip_line(input: &mut impl BufRead) -> io::Result<()> {
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        match buf.iter().position(|b| *b == b'\n') {
            Some(i) => {
                input.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = buf.len();
                input.consume(n);
            }
        }
    }
}

/// A tool failure as a result the model reads.
fn tool_error(e: &ToolError) -> Value {
    json!({"content": [{"type": "text", "text": e.to_string()}], "isError": true})
}

fn error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn write_msg(out: &mut impl Write, v: &Value) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(v)?;
    bytes.push(b'\n');
    out.write_all(&bytes)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Tools for Echo {
        fn call(&mut self, name: &str, args: &Map<String, Value>) -> Result<Outcome, ToolError> {
            match name {
                "ps" => Ok(Outcome::json(json!({"agents": []}))),
                _ => Err(ToolError::Failed(format!("{name} {}", args.len()))),
            }
        }
    }

    fn run(lines: &str) -> Vec<Value> {
        let mut out = Vec::new();
        Session::new(Echo)
            .serve(lines.as_bytes(), &mut out)
            .unwrap();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}"#;

    #[test]
    fn initialize_echoes_a_known_version_and_offers_the_newest_otherwise() {
        let r = run(&format!("{INIT}\n"));
        assert_eq!(r[0]["result"]["protocolVersion"], "2025-06-18");
        assert_eq!(r[0]["result"]["serverInfo"]["name"], "aither");
        let r = run(
            r#"{"jsonrpc":"2.0","id":"a","method":"initialize","params":{"protocolVersion":"1999-01-01"}}"#,
        );
        assert_eq!(r[0]["id"], "a");
        assert_eq!(r[0]["result"]["protocolVersion"], "2025-11-25");
    }

    #[test]
    fn requests_before_initialize_are_refused_but_ping_is_answered() {
        let r = run("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\"}\n{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"ping\"}\n");
        assert_eq!(r[0]["error"]["code"], INVALID_REQUEST);
        assert_eq!(r[1]["result"], json!({}));
    }

    #[test]
    fn notifications_get_no_reply_and_errors_are_json_rpc_errors() {
        let r = run(&format!(
            "{INIT}\n{}\n\nnot json\n[1]\n{}\n{}\n{}\n",
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            r#"{"jsonrpc":"2.0","id":3,"method":"nope"}"#,
            r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"nope"}}"#,
            r#"{"jsonrpc":"1.0","id":5,"method":"ping"}"#,
        ));
        let codes: Vec<_> = r[1..].iter().map(|m| m["error"]["code"].clone()).collect();
        assert_eq!(
            codes,
            vec![
                json!(PARSE_ERROR),
                json!(INVALID_REQUEST),
                json!(METHOD_NOT_FOUND),
                json!(INVALID_PARAMS),
                json!(INVALID_REQUEST)
            ]
        );
    }

    #[test]
    fn an_oversized_line_is_refused_and_skipped_and_the_next_is_served() {
        let big = format!("{{\"x\":\"{}\"}}", "a".repeat(MAX_LINE + 10));
        let r = run(&format!(
            "{big}\n{}\n",
            r#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#
        ));
        assert_eq!(r.len(), 2);
        assert_eq!(r[0]["error"]["code"], PARSE_ERROR);
        assert_eq!(r[1]["id"], 9);
    }

    #[test]
    fn tools_are_listed_and_called_with_failures_as_results() {
        let r = run(&format!(
            "{INIT}\n{}\n{}\n{}\n{}\n",
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#,
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"ps","arguments":{}}}"#,
            r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"logs","arguments":{"agent":"a"}}}"#,
            r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"logs","arguments":{"agnet":"a"}}}"#,
        ));
        let names: Vec<_> = r[1]["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect();
        assert!(names.contains(&"run".to_string()) && names.contains(&"bus_publish".to_string()));
        assert_eq!(r[2]["result"]["isError"], false);
        assert_eq!(r[2]["result"]["structuredContent"]["agents"], json!([]));
        assert_eq!(r[3]["result"]["isError"], true);
        assert_eq!(r[3]["result"]["content"][0]["text"], "logs 1");
        assert_eq!(r[4]["result"]["isError"], true);
        let text = r[4]["result"]["content"][0]["text"].as_str().unwrap();
        assert!(text.contains("`agnet`"), "{text}");
    }
}
