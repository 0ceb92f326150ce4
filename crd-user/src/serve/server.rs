//! The service: accepts clients on the unix socket, reads their requests, runs each on
//! the freezer ([`super::worker`]) or as the client's own `crd` ([`super::spawn`]), and
//! writes the replies.
//!
//! Each connection is a task: its reader forwards request lines and notices when the
//! client hangs up; its requests run one after the other (a client that wants several
//! at once opens several connections), each under a [`Cancel`] raised when the client
//! goes, when its deadline passes, or when the service stops. A cancelled request is
//! never dropped half-way: its work notices the token at its next check, resumes its
//! targets (a `Frozen` is dropped on the freezer thread that made it) and returns, and
//! only then is the request over.
use std::{
    os::fd::AsFd,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::value::RawValue;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixStream, unix::OwnedReadHalf},
    sync::mpsc,
    task::JoinSet,
};

use super::{
    access::Peer,
    activation::{Listening, SocketError},
    cancel::Cancel,
    identity::AsClient,
    protocol::{self, EXIT_BAD_REQUEST, EXIT_DEADLINE, MAX_REQUEST_BYTES, Reply, Request},
    spawn,
    worker::Worker,
};
use crate::{
    Interrupted,
    admission::Admission,
    commands::{self, CommandError, Context, Harvesters, Output, Watcher},
    harvest::LoadOptions,
    ls::LsError,
    types::Tgid,
};

/// `crd serve`'s options.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub socket: PathBuf,
    /// The group that may connect too (socket mode 0660); None: root only (0600).
    pub group: Option<String>,
    /// How long a request may run when it sets no `deadline_ms` (a watch: no limit).
    pub deadline: Duration,
    pub load: LoadOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("cannot start the service")]
    Start(#[source] std::io::Error),
}

/// How long SIGTERM waits for cancelled requests to resume their targets and reply.
const DRAIN: Duration = Duration::from_secs(30);

/// How often a connection whose client closed its write side checks whether the client
/// is gone altogether (it may only have finished sending: `echo REQUEST | socat`).
const HANGUP_POLL: Duration = Duration::from_millis(10);

struct State {
    worker: Worker,
    shutdown: Cancel,
    deadline: Duration,
}

/// Runs the service until SIGTERM or SIGINT.
pub fn run(options: ServeOptions) -> Result<(), ServeError> {
    let listening = Listening::open(&options.socket, options.group.as_deref())?;
    listening.listener.set_nonblocking(true).map_err(ServeError::Start)?;
    let worker = Worker::start(options.load.clone()).map_err(ServeError::Start)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ServeError::Start)?;
    let state = Arc::new(State { worker, shutdown: Cancel::new(), deadline: options.deadline });
    let result = runtime.block_on(serve(&listening, state));
    listening.remove();
    result
}

async fn serve(listening: &Listening, state: Arc<State>) -> Result<(), ServeError> {
    let std_listener = listening.listener.try_clone().map_err(ServeError::Start)?;
    let listener = tokio::net::UnixListener::from_std(std_listener).map_err(ServeError::Start)?;
    on_signals(state.shutdown.clone()).map_err(ServeError::Start)?;
    eprintln!("crd: serving on {}", listening.describe());
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, Arc::clone(&state)));
                }
                Err(e) => {
                    // Out of fds, say: the clients already in keep being served.
                    log::warn!("cannot accept a client: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = state.shutdown.raised() => break,
        }
    }
    eprintln!("crd: stopping: cancelling {} connection(s)' requests", connections.len());
    // No new client; every request in flight is cancelled and resumes its targets.
    drop(listener);
    listening.remove();
    let drained =
        tokio::time::timeout(DRAIN, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        log::warn!("requests still running after {DRAIN:?}; stopping anyway");
    }
    Ok(())
}

/// SIGTERM and SIGINT raise `shutdown`, from a thread of signal-hook's (see Cargo.toml
/// for why not tokio's signals).
fn on_signals(shutdown: Cancel) -> std::io::Result<()> {
    let mut signals =
        signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])?;
    std::thread::Builder::new().name("crd-signals".into()).spawn(move || {
        if signals.forever().next().is_some() {
            shutdown.raise();
        }
    })?;
    Ok(())
}

/// One client, until it hangs up or the service stops.
async fn connection(stream: UnixStream, state: Arc<State>) {
    let peer = match Peer::of(&stream) {
        Ok(peer) => peer,
        Err(e) => {
            log::warn!("cannot read a client's credentials: {e}");
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    let (replies, mut outbox) = mpsc::channel::<Reply>(64);
    let writer = tokio::spawn(async move {
        while let Some(reply) = outbox.recv().await {
            let mut line = reply.to_line();
            line.push('\n');
            if write.write_all(line.as_bytes()).await.is_err() {
                break;
            }
        }
    });
    let gone = Cancel::new();
    let (lines_tx, mut lines) = mpsc::channel(16);
    let reader = tokio::spawn(read_lines(read, lines_tx, gone.clone()));
    loop {
        let line = tokio::select! {
            line = lines.recv() => line,
            () = state.shutdown.raised() => None,
        };
        match line {
            None => break,
            Some(Line::Request(text)) => handle(&text, &peer, &state, &replies, &gone).await,
            Some(Line::TooLong) => {
                let error = format!("malformed request: longer than {MAX_REQUEST_BYTES} bytes");
                let _ = replies.send(Reply::refusal(None, error, EXIT_BAD_REQUEST)).await;
                break;
            }
        }
    }
    reader.abort();
    drop(replies);
    let _ = writer.await;
}

enum Line {
    Request(String),
    TooLong,
}

/// Forwards request lines; at end of input, watches for the client hanging up.
async fn read_lines(read: OwnedReadHalf, lines: mpsc::Sender<Line>, gone: Cancel) {
    let mut reader = BufReader::new(read);
    loop {
        let mut buf = Vec::new();
        let limit = MAX_REQUEST_BYTES as u64 + 1;
        let read = (&mut reader).take(limit).read_until(b'\n', &mut buf).await;
        let line = match read {
            Ok(0) | Err(_) => break,
            Ok(_) if buf.len() as u64 >= limit && buf.last() != Some(&b'\n') => Line::TooLong,
            Ok(_) => Line::Request(String::from_utf8_lossy(&buf).trim().to_string()),
        };
        let end = matches!(line, Line::TooLong);
        if let Line::Request(text) = &line
            && text.is_empty()
        {
            continue;
        }
        if lines.send(line).await.is_err() || end {
            return;
        }
    }
    drop(lines);
    // The client closed its side: gone altogether (POLLHUP), or only done sending?
    let hangup_fd = reader.get_ref().as_ref().as_fd();
    loop {
        let mut fds = [nix::poll::PollFd::new(hangup_fd, nix::poll::PollFlags::empty())];
        let hung_up = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).is_ok()
            && fds[0]
                .revents()
                .is_some_and(|r| r.intersects(nix::poll::PollFlags::POLLHUP | nix::poll::PollFlags::POLLERR));
        if hung_up {
            gone.raise();
            return;
        }
        tokio::time::sleep(HANGUP_POLL).await;
    }
}

/// What a request ended with: the final reply's fields.
struct Outcome {
    exit: u8,
    stdout: String,
    /// What the command said on stderr before its error line.
    stderr: String,
    /// The error line (without `crd: `).
    error: Option<String>,
}

impl Outcome {
    fn of(result: Result<(), CommandError>, stdout: Vec<u8>, stderr: Vec<u8>) -> Self {
        let (exit, error) = match &result {
            Ok(()) => (0, None),
            Err(e) => (commands::exit_code(e), Some(commands::one_line(e))),
        };
        Outcome {
            exit,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            error,
        }
    }

    fn failed(error: String, exit: u8) -> Self {
        Outcome { exit, stdout: String::new(), stderr: String::new(), error: Some(error) }
    }

    fn reply(self, id: Option<u64>) -> Reply {
        let mut stderr = self.stderr;
        if let Some(error) = &self.error {
            stderr.push_str(&format!("crd: {error}\n"));
        }
        Reply {
            id,
            event: None,
            exit: Some(self.exit),
            stdout: Some(self.stdout),
            stderr: Some(stderr),
            error: self.error,
        }
    }
}

async fn handle(line: &str, peer: &Peer, state: &State, replies: &mpsc::Sender<Reply>, gone: &Cancel) {
    let envelope = match protocol::parse(line) {
        Ok(envelope) => envelope,
        Err(bad) => {
            let _ = replies.send(Reply::refusal(bad.id, bad.message, EXIT_BAD_REQUEST)).await;
            return;
        }
    };
    let id = envelope.id;
    let cancel = Cancel::child_of(&[gone, &state.shutdown]);
    let deadline = match (envelope.deadline_ms, &envelope.request) {
        (Some(ms), _) => Some(Duration::from_millis(ms)),
        (None, Request::Watch(_)) => None,
        (None, _) => Some(state.deadline),
    };
    log::debug!("uid {} (PID {}): {}", peer.uid, peer.pid, envelope.request.name());
    let work = execute(envelope, peer, state, replies, &cancel);
    tokio::pin!(work);
    let outcome = match deadline {
        None => work.await,
        Some(deadline) => match tokio::time::timeout(deadline, work.as_mut()).await {
            Ok(outcome) => outcome,
            Err(_) => {
                // Stop the work and wait for it: its targets are resumed before the reply.
                cancel.raise();
                let mut outcome = work.await;
                if outcome.exit != 0 {
                    outcome.exit = EXIT_DEADLINE;
                    let why = outcome.error.take().unwrap_or_default();
                    outcome.error = Some(format!("deadline of {} ms passed: {why}", deadline.as_millis()));
                }
                outcome
            }
        },
    };
    let _ = replies.send(outcome.reply(id)).await;
}

async fn execute(
    envelope: protocol::Envelope,
    peer: &Peer,
    state: &State,
    replies: &mpsc::Sender<Reply>,
    cancel: &Cancel,
) -> Outcome {
    let cwd = envelope.cwd;
    match envelope.request {
        Request::Ls(args) => {
            on_worker(state, peer, cwd, cancel, move |cx, out| commands::ls(&args, cx, out)).await
        }
        Request::Checkpoint(args) => {
            on_worker(state, peer, cwd, cancel, move |cx, out| commands::checkpoint(&args, cx, out)).await
        }
        Request::Restore(args) => {
            let image = match &cwd {
                Some(dir) if args.image.is_relative() => dir.join(&args.image),
                _ => args.image.clone(),
            };
            if let Err(refused) = peer.may_restore(&image) {
                return Outcome::failed(refused.0, 1);
            }
            as_client(peer, args.to_args(), cwd, cancel).await
        }
        Request::Graft(args) => {
            if let Err(refused) = peer.may_trace(Tgid(args.pid)) {
                return Outcome::failed(refused.0, 1);
            }
            as_client(peer, args.to_args(), cwd, cancel).await
        }
        Request::Watch(args) => watch(args, envelope.id, peer, cwd, state, replies, cancel).await,
    }
}

/// Runs a command's body on the freezer, in the client's context.
async fn on_worker(
    state: &State,
    peer: &Peer,
    cwd: Option<PathBuf>,
    cancel: &Cancel,
    body: impl FnOnce(&mut Context<'_>, &mut Output<'_>) -> Result<(), CommandError> + Send + 'static,
) -> Outcome {
    let (peer, cancel) = (peer.clone(), cancel.clone());
    let ran = state
        .worker
        .run(move |harvesters| {
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            let result = in_context(&peer, cwd.as_deref(), &cancel, harvesters, |cx| {
                body(cx, &mut Output { stdout: &mut stdout, stderr: &mut stderr })
            });
            Outcome::of(result, stdout, stderr)
        })
        .await;
    ran.unwrap_or_else(|e| Outcome::failed(e.to_string(), 1))
}

/// The context a command runs in for `peer`: its admission rule, its file-system
/// identity for images, its directory, and the request's cancellation.
fn in_context<T>(
    peer: &Peer,
    cwd: Option<&std::path::Path>,
    cancel: &Cancel,
    harvesters: &mut Harvesters,
    body: impl FnOnce(&mut Context<'_>) -> T,
) -> T {
    let admission = if peer.privileged {
        Admission::Kernel
    } else {
        let peer = peer.clone();
        Admission::Only(Arc::new(move |tgid| peer.may_trace(tgid)))
    };
    let images = AsClient::new(peer.identity());
    let interrupted = || cancel.is_raised();
    let caller = u32::try_from(peer.pid).ok().map(Tgid);
    let mut cx = Context { harvesters, interrupted: &interrupted, admission, images: &images, cwd, caller };
    body(&mut cx)
}

async fn as_client(
    peer: &Peer,
    args: Vec<std::ffi::OsString>,
    cwd: Option<PathBuf>,
    cancel: &Cancel,
) -> Outcome {
    match spawn::run_as(peer, args, cwd, cancel).await {
        // The subprocess's stderr already ends with its error line.
        Ok(ran) => Outcome { exit: ran.exit, stdout: ran.stdout, stderr: ran.stderr, error: None },
        Err(e) => Outcome::failed(commands::one_line(&e), 1),
    }
}

/// A watch: one listing on the freezer per interval, each event sent as it comes.
async fn watch(
    args: commands::WatchArgs,
    id: Option<u64>,
    peer: &Peer,
    cwd: Option<PathBuf>,
    state: &State,
    replies: &mpsc::Sender<Reply>,
    cancel: &Cancel,
) -> Outcome {
    let mut watcher = Watcher::new(&args);
    loop {
        let step = Instant::now();
        let (ls, peer, cwd, job_cancel) = (args.ls(), peer.clone(), cwd.clone(), cancel.clone());
        let listing = state
            .worker
            .run(move |harvesters| {
                in_context(&peer, cwd.as_deref(), &job_cancel, harvesters, |cx| commands::listing(&ls, cx))
                    .map_err(|e| Outcome::of(Err(e), Vec::new(), Vec::new()))
            })
            .await;
        let listing = match listing {
            Ok(Ok(listing)) => listing,
            Ok(Err(failed)) => return failed,
            Err(e) => return Outcome::failed(e.to_string(), 1),
        };
        if let Some(line) = watcher.event(listing) {
            let Ok(event) = RawValue::from_string(line) else {
                return Outcome::failed("cannot encode a watch event".into(), 1);
            };
            if replies.send(Reply { id, event: Some(event), ..Reply::default() }).await.is_err() {
                return Outcome::of(Ok(()), Vec::new(), Vec::new());
            }
        }
        if watcher.done() {
            return Outcome::of(Ok(()), Vec::new(), Vec::new());
        }
        tokio::select! {
            () = tokio::time::sleep_until((step + watcher.interval()).into()) => {}
            () = cancel.raised() => {
                let interrupted = CommandError::Ls(LsError::Interrupted(Interrupted));
                return Outcome::of(Err(interrupted), Vec::new(), Vec::new());
            }
        }
    }
}
