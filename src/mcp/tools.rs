//! The tools `aitherctl mcp` offers: names, descriptions, input schemas (JSON Schema, as
//! `tools/list` shows them), and the typed reading of a call's arguments, whose errors name
//! the argument.

use serde_json::{json, Map, Value};

use super::ToolError;

/// One tool as listed.
pub struct Tool {
    pub name: &'static str,
    pub description: &'static str,
    /// (argument, JSON type, description), in order.
    pub args: &'static [(&'static str, &'static str, &'static str)],
    pub required: &'static [&'static str],
}

const AGENT: (&str, &str, &str) = ("agent", "string", "The agent's name.");
const ARGV: (&str, &str, &str) = (
    "argv",
    "array",
    "The command and its arguments, e.g. [\"sh\", \"-c\", \"echo hi\"].",
);
const MAX_OUTPUT: (&str, &str, &str) = (
    "max_output",
    "integer",
    "Most bytes of stdout and of stderr returned (default 65536, at most 1048576); the rest is counted and dropped.",
);
const TIER: (&str, &str, &str) = (
    "tier",
    "string",
    "Memory tier: working, active, spirit, codegraph or knowledge.",
);

/// Every tool, in the order `tools/list` gives them.
pub const TOOLS: &[Tool] = &[
    Tool {
        name: "run",
        description: "Run one command in a new sandbox under a named policy (default strict) and return its exit status and output. Nothing of the host is visible but what the policy allows.",
        args: &[
            ARGV,
            ("policy", "string", "Policy name (aitherctl policy ls); under a token, the token's own."),
            ("workspace", "string", "Absolute host directory mounted as the sandbox's workspace."),
            ("timeout_s", "integer", "Kill the command after this many seconds."),
            MAX_OUTPUT,
        ],
        required: &["argv"],
    },
    Tool {
        name: "spawn",
        description: "Start a supervised agent under aitherd, from a policy (default strict) or the token given to the server. Its output goes to its logs.",
        args: &[
            AGENT,
            ARGV,
            ("policy", "string", "Policy name; under a token, the token's own."),
            ("workspace", "string", "Absolute host directory mounted read-write as the agent's workspace (default: the server's working directory)."),
            ("env", "array", "KEY=VALUE strings set inside."),
            ("restart", "string", "never, on-failure (default) or always."),
            ("replace", "boolean", "Replace an agent of the same name that is not running."),
        ],
        required: &["agent", "argv"],
    },
    Tool {
        name: "ps",
        description: "List the agents the caller may see: name, state, pid, policy, restarts.",
        args: &[],
        required: &[],
    },
    Tool {
        name: "logs",
        description: "An agent's output (stdout and stderr as it wrote them), its last lines.",
        args: &[
            AGENT,
            ("tail", "integer", "How many last lines (default 100, at most 10000)."),
            ("stream", "string", "stdout or stderr only."),
        ],
        required: &["agent"],
    },
    Tool {
        name: "exec",
        description: "Run a command inside a running agent's sandbox, confined as the agent, and return its exit status and output.",
        args: &[
            AGENT,
            ARGV,
            ("cwd", "string", "Working directory inside the sandbox."),
            MAX_OUTPUT,
        ],
        required: &["agent", "argv"],
    },
    Tool {
        name: "stop",
        description: "Stop an agent: SIGTERM, then the whole sandbox killed after the timeout.",
        args: &[AGENT, ("timeout_s", "integer", "Seconds between SIGTERM and the kill (default 10).")],
        required: &["agent"],
    },
    Tool {
        name: "rm",
        description: "Remove an agent (its memory is kept). A running agent needs force.",
        args: &[AGENT, ("force", "boolean", "Stop it first if it runs.")],
        required: &["agent"],
    },
    Tool {
        name: "read",
        description: "Read a file in a running agent's sandbox (as the agent sees it; a symbolic link is reported, never followed on the host).",
        args: &[
            AGENT,
            ("path", "string", "Path in the sandbox (relative: to the agent's working directory)."),
            ("max_bytes", "integer", "Most bytes returned (default 1048576)."),
        ],
        required: &["agent", "path"],
    },
    Tool {
        name: "write",
        description: "Write a file (UTF-8 text) in a running agent's sandbox, as the agent: only where the agent may write. Its directory must exist.",
        args: &[
            AGENT,
            ("path", "string", "Path in the sandbox (relative: to the agent's working directory)."),
            ("content", "string", "The file's text."),
            ("mode", "integer", "Permission bits (default 420 = 0644)."),
        ],
        required: &["agent", "path", "content"],
    },
    Tool {
        name: "list",
        description: "List a directory in a running agent's sandbox: names, kinds (file, dir, symlink, …), sizes, link targets.",
        args: &[
            AGENT,
            ("path", "string", "Directory in the sandbox (default: the agent's working directory)."),
        ],
        required: &["agent"],
    },
    Tool {
        name: "mem_get",
        description: "Read one key of an agent's memory tier.",
        args: &[AGENT, TIER, ("key", "string", "The key.")],
        required: &["agent", "tier", "key"],
    },
    Tool {
        name: "mem_put",
        description: "Write one key of an agent's memory tier.",
        args: &[
            AGENT,
            TIER,
            ("key", "string", "The key."),
            ("value", "any", "Any JSON value."),
            ("ttl_s", "integer", "Expire after this many seconds."),
        ],
        required: &["agent", "tier", "key", "value"],
    },
    Tool {
        name: "mem_search",
        description: "Full-text search of an agent's knowledge tier (ranked by relevance).",
        args: &[
            AGENT,
            ("query", "string", "Words to search for."),
            ("tier", "string", "knowledge (the one searchable tier; the default)."),
            ("limit", "integer", "Most results (default 10)."),
        ],
        required: &["agent", "query"],
    },
    Tool {
        name: "bus_publish",
        description: "Publish a message on the bus (NATS-style subject).",
        args: &[
            ("subject", "string", "The subject, e.g. agent.NAME.inbox."),
            ("data", "any", "Any JSON value."),
            ("durable", "boolean", "Keep it in the durable log."),
        ],
        required: &["subject", "data"],
    },
];

/// The tools as `tools/list` shows them.
pub fn list() -> Vec<Value> {
    TOOLS
        .iter()
        .map(|t| {
            let props: Map<String, Value> = t
                .args
                .iter()
                .map(|(name, ty, desc)| {
                    let schema = match *ty {
                        "any" => json!({"description": desc}),
                        "array" => json!({"type": "array", "items": {"type": "string"}, "description": desc}),
                        "integer" => json!({"type": "integer", "minimum": 0, "description": desc}),
                        _ => json!({"type": ty, "description": desc}),
                    };
                    (name.to_string(), schema)
                })
                .collect();
            json!({
                "name": t.name,
                "description": t.description,
                "inputSchema": {
                    "type": "object",
                    "properties": props,
                    "required": t.required,
                    "additionalProperties": false,
                },
            })
        })
        .collect()
}

/// Refuses an argument the tool does not take (a misspelt optional one would otherwise be
/// silently ignored).
pub fn check_known(tool: &str, args: &Map<String, Value>) -> Result<(), ToolError> {
    let Some(t) = TOOLS.iter().find(|t| t.name == tool) else {
        return Ok(());
    };
    for k in args.keys() {
        if !t.args.iter().any(|(n, _, _)| n == k) {
            let known: Vec<&str> = t.args.iter().map(|a| a.0).collect();
            return Err(ToolError::arg(
                k,
                format!(
                    "{tool} takes no such argument (it takes: {})",
                    known.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// A call's arguments, read with errors that name the argument.
pub struct Args<'a>(pub &'a Map<String, Value>);

impl Args<'_> {
    pub fn opt_str(&self, field: &str) -> Result<Option<&str>, ToolError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ToolError::arg(field, "must be a string")),
        }
    }

    pub fn str(&self, field: &str) -> Result<&str, ToolError> {
        match self.opt_str(field)? {
            Some(s) if !s.is_empty() => Ok(s),
            Some(_) => Err(ToolError::arg(field, "must not be empty")),
            None => Err(ToolError::arg(field, "is required")),
        }
    }

    pub fn opt_u64(&self, field: &str, max: u64) -> Result<Option<u64>, ToolError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= max => Ok(Some(n)),
                Some(_) => Err(ToolError::arg(field, format!("must be at most {max}"))),
                None => Err(ToolError::arg(field, "must be a non-negative integer")),
            },
        }
    }

    pub fn opt_bool(&self, field: &str) -> Result<bool, ToolError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ToolError::arg(field, "must be true or false")),
        }
    }

    pub fn strings(&self, field: &str) -> Result<Vec<String>, ToolError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| ToolError::arg(field, "must be an array of strings"))
                })
                .collect(),
            Some(_) => Err(ToolError::arg(field, "must be an array of strings")),
        }
    }

    /// A non-empty command line.
    pub fn argv(&self, field: &str) -> Result<Vec<String>, ToolError> {
        let v = self.strings(field)?;
        if v.is_empty() {
            return Err(ToolError::arg(
                field,
                "is required: the command and its arguments",
            ));
        }
        Ok(v)
    }

    pub fn value(&self, field: &str) -> Result<Value, ToolError> {
        self.0
            .get(field)
            .cloned()
            .ok_or_else(|| ToolError::arg(field, "is required"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_has_an_object_schema_whose_required_fields_are_its_arguments() {
        for t in list() {
            let s = &t["inputSchema"];
            assert_eq!(s["type"], "object");
            for r in s["required"].as_array().unwrap() {
                assert!(s["properties"].get(r.as_str().unwrap()).is_some(), "{t}");
            }
        }
        assert_eq!(list().len(), 14);
    }

    #[test]
    fn argument_errors_name_the_field() {
        let m: Map<String, Value> =
            serde_json::from_str(r#"{"agent": 3, "argv": [], "tail": -1, "force": "y"}"#).unwrap();
        let a = Args(&m);
        assert_eq!(
            a.str("agent").unwrap_err().to_string(),
            "argument `agent`: must be a string"
        );
        assert!(a.argv("argv").unwrap_err().to_string().contains("`argv`"));
        assert!(a
            .opt_u64("tail", 10)
            .unwrap_err()
            .to_string()
            .contains("`tail`"));
        assert!(a
            .opt_bool("force")
            .unwrap_err()
            .to_string()
            .contains("`force`"));
        assert!(a
            .str("key")
            .unwrap_err()
            .to_string()
            .contains("`key`: is required"));
        assert!(check_known("logs", &m)
            .unwrap_err()
            .to_string()
            .contains("`argv`"));
    }
}
