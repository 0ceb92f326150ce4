//! The client: sends one request to the service and prints its replies as `crd` would
//! have printed them (`crd --service PATH CMD`), or hands the replies to a program.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use super::protocol::{Envelope, Reply, Request};
use crate::commands::Output;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the crd service at {path}")]
    Connect { path: String, source: std::io::Error },
    #[error("lost the crd service")]
    Io(#[from] std::io::Error),
    #[error("the crd service closed the connection before its reply")]
    Closed,
    #[error("the crd service sent a line that is not a reply: {0}")]
    BadReply(String),
}

/// A connection to the service.
pub struct Client {
    stream: UnixStream,
    replies: BufReader<UnixStream>,
    next_id: u64,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)
            .map_err(|source| ClientError::Connect { path: path.display().to_string(), source })?;
        let replies = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, replies, next_id: 1 })
    }

    /// Sends `request` (relative paths relative to `cwd`) and returns its id.
    pub fn send(
        &mut self,
        request: Request,
        cwd: Option<PathBuf>,
        deadline_ms: Option<u64>,
    ) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let envelope = Envelope { id: Some(id), deadline_ms, cwd, request };
        let mut line = serde_json::to_string(&envelope).map_err(std::io::Error::other)?;
        line.push('\n');
        self.stream.write_all(line.as_bytes())?;
        Ok(id)
    }

    /// The next reply.
    pub fn reply(&mut self) -> Result<Reply, ClientError> {
        let mut line = String::new();
        if self.replies.read_line(&mut line)? == 0 {
            return Err(ClientError::Closed);
        }
        serde_json::from_str(&line).map_err(|_| ClientError::BadReply(line.trim_end().to_string()))
    }

    /// Runs `request` to its end, writing what it prints to `out` (a watch's events on
    /// stdout, one line each, as they come), and returns its exit code.
    pub fn run(&mut self, request: Request, out: &mut Output<'_>) -> Result<u8, ClientError> {
        let cwd = std::env::current_dir().ok();
        self.send(request, cwd, None)?;
        loop {
            let reply = self.reply()?;
            if let Some(event) = &reply.event {
                writeln!(out.stdout, "{}", event.get())?;
                out.stdout.flush()?;
            }
            let Some(exit) = reply.exit else { continue };
            out.stdout.write_all(reply.stdout.unwrap_or_default().as_bytes())?;
            match (reply.stderr, reply.error) {
                (Some(stderr), _) => out.stderr.write_all(stderr.as_bytes())?,
                (None, Some(error)) => writeln!(out.stderr, "crd: {error}")?,
                (None, None) => {}
            }
            return Ok(exit);
        }
    }
}
