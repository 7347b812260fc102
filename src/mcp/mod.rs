//! `aitherctl mcp` (docs/mcp.md): the Model Context Protocol over stdio, for agent frameworks.
//!
//! What needs no daemon and no terminal lives here, pure and unit-tested: [`rpc`] the JSON-RPC
//! 2.0 session (lifecycle, version negotiation, dispatch to a [`rpc::Tools`]), [`tools`] the
//! tool list with each tool's input schema and the typed reading of arguments, [`scope`] what a
//! capability token lets the client do. The binary's `mcp_cmd` carries each call out through
//! the same client code as the CLI's subcommands.

pub mod rpc;
pub mod scope;
pub mod tools;

/// A tool call that did not succeed: reported to the client as a result with `isError: true`,
/// never as a protocol error. `field` names the argument at fault when there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolError {
    /// An argument is missing, of the wrong type or out of range.
    #[error("argument `{field}`: {reason}")]
    Argument { field: String, reason: String },
    /// The token given at start does not allow it (nothing was asked of aitherd).
    #[error("refused by the token: {field}: {reason}")]
    Refused { field: String, reason: String },
    /// aitherd (or the sandbox) refused or failed it.
    #[error("{0}")]
    Failed(String),
}

impl ToolError {
    pub fn arg(field: &str, reason: impl Into<String>) -> ToolError {
        ToolError::Argument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn refused(field: &str, reason: impl Into<String>) -> ToolError {
        ToolError::Refused {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
