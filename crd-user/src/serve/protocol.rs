//! The service's protocol: one JSON object per line each way (docs/service.md).
//!
//! A request names its command in `request` and carries the command's arguments as the
//! CLI's own types ([`crate::commands`]), so a field means what its flag means. Each
//! request gets one final [`Reply`] (with `exit`), preceded, for a watch, by one reply
//! per event.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::commands::{CheckpointArgs, GraftArgs, LsArgs, RestoreArgs, WatchArgs};

/// Longest request line the service reads; a longer one is refused and the connection
/// closed (a request is a few hundred bytes).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Exit code of a reply to a request that could not be read (malformed JSON, unknown
/// request, a bad field): 2, as for a command line clap refuses.
pub const EXIT_BAD_REQUEST: u8 = 2;

/// Exit code of a request that ran past its deadline (its targets were resumed), as
/// `timeout(1)` reports it.
pub const EXIT_DEADLINE: u8 = 124;

/// One request line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Echoed in every reply to this request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// How long the request may run before it is cancelled (its targets resumed);
    /// None: the service's default (`crd serve --deadline-ms`), and no limit for a watch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// The client's working directory: what relative paths are relative to. None: the
    /// service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    #[serde(flatten)]
    pub request: Request,
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum Request {
    Ls(LsArgs),
    Checkpoint(CheckpointArgs),
    Restore(RestoreArgs),
    Graft(GraftArgs),
    Watch(WatchArgs),
}

impl Request {
    /// The command's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Ls(_) => "ls",
            Request::Checkpoint(_) => "checkpoint",
            Request::Restore(_) => "restore",
            Request::Graft(_) => "graft",
            Request::Watch(_) => "watch",
        }
    }
}

/// One reply line.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    /// The request's `id` (None for a line that was not a request).
    pub id: Option<u64>,
    /// A watch's event: one line `crd watch` prints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<Box<RawValue>>,
    /// The final reply's: the command's exit code, as `crd` would exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<u8>,
    /// What the command printed on stdout and stderr (final reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    /// Why it failed, on one line (also the last line of `stderr`, when there is one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// The final reply of a request that could not be read or was refused as a whole.
    pub fn refusal(id: Option<u64>, error: String, exit: u8) -> Self {
        Reply { id, exit: Some(exit), error: Some(error), ..Reply::default() }
    }

    /// Whether this reply ends its request.
    pub fn is_final(&self) -> bool {
        self.exit.is_some()
    }

    /// The reply as one line, without its newline.
    pub fn to_line(&self) -> String {
        // A Reply holds strings, numbers and already-valid JSON: it always serializes.
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(
                r#"{{"id":null,"exit":1,"error":"cannot encode the reply: {}"}}"#,
                e.to_string().replace('"', "'")
            )
        })
    }
}

/// A line that is not a request: the reply says why, on one line.
#[derive(Debug, PartialEq, Eq)]
pub struct BadRequest {
    /// The request's id, if the line was an object with one.
    pub id: Option<u64>,
    pub message: String,
}

/// Reads one request line.
pub fn parse(line: &str) -> Result<Envelope, BadRequest> {
    let value: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| BadRequest { id: None, message: format!("malformed request: {e}") })?;
    let id = value.get("id").and_then(serde_json::Value::as_u64);
    let Some(name) = value.get("request") else {
        return Err(BadRequest { id, message: "malformed request: no \"request\" field".into() });
    };
    // serde would take a number as the variant's index: a request is named, by name.
    let Some(name) = name.as_str() else {
        return Err(BadRequest { id, message: "malformed request: \"request\" is not a name".into() });
    };
    let known = ["ls", "checkpoint", "restore", "graft", "watch"];
    if !known.contains(&name) {
        return Err(BadRequest {
            id,
            message: format!("unknown request {name:?}: expected one of {}", known.join(", ")),
        });
    }
    serde_json::from_value(value).map_err(|e| BadRequest { id, message: format!("bad request: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::SourceArg;

    #[test]
    fn a_request_reads_as_the_command_line_would() {
        let envelope =
            parse(r#"{"id": 3, "request": "checkpoint", "pid": 42, "tree": true, "output": "a.img"}"#)
                .expect("a checkpoint request");
        assert_eq!(envelope.id, Some(3));
        assert_eq!(
            envelope.request,
            Request::Checkpoint(CheckpointArgs {
                pid: 42,
                tree: true,
                output: Some("a.img".into()),
                source: SourceArg::Auto,
                ..Default::default()
            })
        );
        let restore = parse(r#"{"request": "restore", "image": "a.img", "exec": true, "command": ["cat"]}"#)
            .expect("a restore request");
        let Request::Restore(args) = restore.request else { panic!("restore") };
        assert!(args.exec.exec);
        assert_eq!(args.exec.command, ["cat"]);
    }

    #[test]
    fn bad_lines_are_refused_on_one_line_with_their_id() {
        let cases = [
            ("{not json", None, "malformed request: "),
            (r#"[1, 2]"#, None, "malformed request: no \"request\" field"),
            (
                r#"{"id": 5, "request": "reboot"}"#,
                Some(5),
                "unknown request \"reboot\": expected one of ls, ",
            ),
            (r#"{"id": 6, "request": "ls", "pids": "all"}"#, Some(6), "bad request: "),
            (r#"{"id": 7, "request": "ls", "colour": true}"#, Some(7), "bad request: unknown field `colour`"),
            (r#"{"id": 8, "request": 3}"#, Some(8), "malformed request: \"request\" is not a name"),
        ];
        for (line, id, prefix) in cases {
            let bad = parse(line).expect_err(line);
            assert_eq!(bad.id, id, "{line}");
            assert!(bad.message.starts_with(prefix), "{line}: {}", bad.message);
            assert!(!bad.message.contains('\n'), "{line}: one line");
        }
    }

    #[test]
    fn a_reply_is_one_line_and_reads_back() {
        let reply = Reply {
            id: Some(1),
            exit: Some(0),
            stdout: Some("a\nb\n".into()),
            stderr: Some(String::new()),
            ..Reply::default()
        };
        let line = reply.to_line();
        assert!(!line.contains('\n'));
        let back: Reply = serde_json::from_str(&line).expect("reads back");
        assert_eq!(back.stdout.as_deref(), Some("a\nb\n"));
        assert!(back.is_final());
    }
}
