//! The commands, as the `crd` binary and the service ([`crate::serve`]) both run them.
//!
//! Each command's body writes what it has to say into an [`Output`] (stdout and stderr)
//! and returns a [`CommandError`] whose [`exit_code`] is crd's exit status. `main` runs
//! them with the terminal as output; the service runs the very same functions with
//! buffers and sends the buffers and the exit code back, so `crd --service PATH CMD`
//! prints what `crd CMD` prints and exits as it does, by construction.
//!
//! The arguments are one type per command, read by clap from a command line and by
//! serde from a service request: one definition, one set of defaults.
use std::{
    io::{self, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    Interrupted,
    admission::Admission,
    checkpoint::{CheckpointError, ImageSink, Options, checkpoint_with},
    graft::GraftError,
    harvest::{self, HarvestError, Harvester, LoadOptions},
    image::{self, ImageBody, ImageError},
    inspect::{self, Format},
    ls::{self, Listing, LsError, Targets},
    restore::{ExecRequest, RestoreError, Restored},
    timings::Phases,
    types::{Fd, Tgid},
};

/// Where to read fd state from (`--source`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceArg {
    /// BPF task/task_file iterators.
    Bpf,
    /// /proc/PID/{fd,fdinfo,task} and kcmp(2): slower, needs no BPF.
    Procfs,
    /// BPF, or /proc (with a warning saying why) where this kernel cannot run crd's BPF
    /// programs.
    #[default]
    Auto,
}

impl From<SourceArg> for harvest::Source {
    fn from(source: SourceArg) -> Self {
        match source {
            SourceArg::Bpf => harvest::Source::Bpf,
            SourceArg::Procfs => harvest::Source::Procfs,
            SourceArg::Auto => harvest::Source::Auto,
        }
    }
}

/// `crd checkpoint`.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointArgs {
    /// The process to checkpoint (all its threads).
    pub pid: u32,
    /// Also checkpoint all its descendants.
    #[arg(long)]
    pub tree: bool,
    /// Where to write the image [default: crd-PID.img].
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Where to read fd state from.
    #[arg(long, value_enum, default_value_t = SourceArg::Auto)]
    pub source: SourceArg,
    /// Write no image if restore could not recreate every fd (a kind crd does not
    /// make, such as a netlink socket or an epoll): name each such fd instead.
    #[arg(long)]
    pub strict: bool,
    /// Also save established TCP connections (sequence numbers, unread and
    /// unacknowledged bytes, options), each read by putting it briefly into repair
    /// mode (TCP_REPAIR; needs CAP_NET_ADMIN), so `crd restore` can rebuild them once
    /// the originals are gone. Without it restore refuses them.
    #[arg(long)]
    pub tcp_established: bool,
}

/// `crd restore`.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(default)]
pub struct RestoreArgs {
    pub image: PathBuf,
    /// Write the root stub's PID here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Recreate pipes (and ptys) whose other end was outside the checkpoint as fresh,
    /// disconnected ones (by default such an image is refused).
    #[arg(long)]
    pub allow_external: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub exec: ExecArgs,
}

/// `crd graft`.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(default)]
pub struct GraftArgs {
    /// The process whose open files to hand over (it keeps running).
    pub pid: u32,
    /// Also graft all its descendants, as a tree of stubs.
    #[arg(long)]
    pub tree: bool,
    /// Write the root stub's PID (or the exec'd program's: the same) here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Where to read fd state from.
    #[arg(long, value_enum, default_value_t = SourceArg::Auto)]
    pub source: SourceArg,
    #[command(flatten)]
    #[serde(flatten)]
    pub exec: ExecArgs,
}

/// `--exec` and how the program gets its fds (restore and graft alike).
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecArgs {
    /// The root stub execs CMD instead of waiting: `--exec -- CMD ARGS`. The program
    /// inherits every fd the root stub holds: close-on-exec is cleared on each, since
    /// programs open nearly everything close-on-exec and would otherwise pass nothing on.
    #[arg(long, requires = "command")]
    pub exec: bool,
    /// With --exec: keep each fd's close-on-exec bit as the original had it, so the
    /// program receives only the fds the original would have passed to a program it
    /// exec'd.
    #[arg(long, requires = "exec")]
    pub keep_cloexec: bool,
    /// With --exec: hand the listening sockets over as systemd socket activation does:
    /// moved to fds 3, 4, ... (in their original order), with LISTEN_FDS=N,
    /// LISTEN_PID=<the program's PID> and LISTEN_FDNAMES=fdA:fdB (A, B: their original
    /// numbers) in the program's environment. Another fd on one of those numbers moves
    /// to the lowest number above them that is free; crd prints every move. Listening
    /// sockets are handed over even with --keep-cloexec.
    #[arg(long, requires = "exec")]
    pub listen_fds: bool,
    /// The program to exec and its arguments, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

impl ExecArgs {
    fn request(&self) -> Option<ExecRequest<'_>> {
        self.exec.then_some(ExecRequest {
            command: &self.command,
            keep_cloexec: self.keep_cloexec,
            listen_fds: self.listen_fds,
        })
    }

    /// These options as command-line arguments (the service runs restore and graft as a
    /// `crd` of the client's own: see [`crate::serve`]).
    fn push_args(&self, args: &mut Vec<std::ffi::OsString>) {
        for (on, flag) in
            [(self.exec, "--exec"), (self.keep_cloexec, "--keep-cloexec"), (self.listen_fds, "--listen-fds")]
        {
            if on {
                args.push(flag.into());
            }
        }
        if !self.command.is_empty() {
            args.push("--".into());
            args.extend(self.command.iter().map(Into::into));
        }
    }
}

impl RestoreArgs {
    /// The command line of `crd restore` with these arguments.
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut args = vec!["restore".into(), self.image.clone().into()];
        if let Some(pid_file) = &self.pid_file {
            args.extend(["--pid-file".into(), pid_file.clone().into()]);
        }
        if self.allow_external {
            args.push("--allow-external".into());
        }
        self.exec.push_args(&mut args);
        args
    }
}

impl GraftArgs {
    /// The command line of `crd graft` with these arguments.
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut args = vec!["graft".into(), self.pid.to_string().into()];
        if self.tree {
            args.push("--tree".into());
        }
        if let Some(pid_file) = &self.pid_file {
            args.extend(["--pid-file".into(), pid_file.clone().into()]);
        }
        args.extend(["--source".into(), source_name(self.source).into()]);
        self.exec.push_args(&mut args);
        args
    }
}

fn source_name(source: SourceArg) -> &'static str {
    match source {
        SourceArg::Bpf => "bpf",
        SourceArg::Procfs => "procfs",
        SourceArg::Auto => "auto",
    }
}

/// `crd ls`.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LsArgs {
    /// Processes to list (all their threads).
    pub pids: Vec<u32>,
    /// List every process on the machine.
    #[arg(long, conflicts_with = "pids")]
    pub all: bool,
    /// Only pipes and FIFOs.
    #[arg(long)]
    pub pipes: bool,
    /// One JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum, default_value_t = SourceArg::Auto)]
    pub source: SourceArg,
}

/// `crd watch`.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchArgs {
    /// Processes to watch (all their threads).
    pub pids: Vec<u32>,
    /// Watch every process on the machine.
    #[arg(long, conflicts_with = "pids")]
    pub all: bool,
    /// Only pipes and FIFOs.
    #[arg(long)]
    pub pipes: bool,
    /// Milliseconds between two listings.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// After the first listing, print only what changed (fds opened and closed,
    /// processes started and gone), and nothing when nothing did.
    #[arg(long)]
    pub changes: bool,
    /// Stop after this many listings [default: never].
    #[arg(long)]
    pub count: Option<u64>,
    #[arg(long, value_enum, default_value_t = SourceArg::Auto)]
    pub source: SourceArg,
}

impl Default for WatchArgs {
    fn default() -> Self {
        Self {
            pids: Vec::new(),
            all: false,
            pipes: false,
            interval_ms: 1000,
            changes: false,
            count: None,
            source: SourceArg::Auto,
        }
    }
}

impl WatchArgs {
    /// What each listing of the watch lists.
    pub fn ls(&self) -> LsArgs {
        LsArgs { pids: self.pids.clone(), all: self.all, pipes: self.pipes, json: true, source: self.source }
    }
}

/// Where a command writes what it says: the terminal for the CLI, buffers in the service.
pub struct Output<'a> {
    pub stdout: &'a mut dyn Write,
    pub stderr: &'a mut dyn Write,
}

/// How an image is written: as crd's own user (the CLI), or with the file-system identity
/// of the service's client.
pub trait ImageWriter {
    fn write(&self, path: &Path, body: &ImageBody) -> Result<(), ImageError>;
}

/// Writes images as this process is.
pub struct AsThisProcess;

impl ImageWriter for AsThisProcess {
    fn write(&self, path: &Path, body: &ImageBody) -> Result<(), ImageError> {
        image::write(path, body)
    }
}

/// An [`ImageWriter`] bound to one path, as a checkpoint takes it.
struct SinkAt<'a> {
    path: &'a Path,
    writer: &'a dyn ImageWriter,
}

impl ImageSink for SinkAt<'_> {
    fn write(&self, body: &ImageBody) -> Result<(), ImageError> {
        self.writer.write(self.path, body)
    }
}

/// Loaded harvesters, kept for the next command: the service loads them once, the CLI
/// loads what its one command needs. BPF programs loaded to list every process
/// (`match_all`) ignore the PID filter, so each (source, match_all) pair has its own.
pub struct Harvesters {
    load: LoadOptions,
    /// By the source each resolved to (never `Auto`) and `match_all`.
    loaded: Vec<((harvest::Source, bool), Box<dyn Harvester>)>,
    /// `auto` fell back to /proc here (this kernel cannot run the BPF programs).
    auto_is_procfs: bool,
}

impl Harvesters {
    pub fn new(load: LoadOptions) -> Self {
        Self { load, loaded: Vec::new(), auto_is_procfs: false }
    }

    pub fn load_options(&self) -> &LoadOptions {
        &self.load
    }

    /// The harvester for `source` (`match_all`: for `--all`), loaded on first use.
    pub fn get(
        &mut self,
        source: harvest::Source,
        match_all: bool,
    ) -> Result<&mut dyn Harvester, HarvestError> {
        if self.find(source, match_all).is_none() {
            let loaded = harvest::harvester(source, match_all, &self.load)?;
            if source == harvest::Source::Auto && loaded.source() == harvest::Source::Procfs {
                self.auto_is_procfs = true;
            }
            self.loaded.push(((loaded.source(), match_all), loaded));
        }
        let at = self.find(source, match_all).unwrap_or(self.loaded.len() - 1);
        Ok(self.loaded[at].1.as_mut())
    }

    /// The harvester for `source` if one is loaded already.
    pub fn loaded(&mut self, source: harvest::Source, match_all: bool) -> Option<&mut dyn Harvester> {
        let at = self.find(source, match_all)?;
        Some(self.loaded[at].1.as_mut())
    }

    /// Where the harvester `source` resolves to is kept: `auto` is BPF once BPF loaded,
    /// /proc once BPF could not.
    fn find(&self, source: harvest::Source, match_all: bool) -> Option<usize> {
        let resolved = match source {
            harvest::Source::Auto if self.auto_is_procfs => harvest::Source::Procfs,
            harvest::Source::Auto => harvest::Source::Bpf,
            source => source,
        };
        self.loaded.iter().position(|(key, _)| *key == (resolved, match_all))
    }
}

/// What a command runs with besides its arguments.
pub struct Context<'a> {
    pub harvesters: &'a mut Harvesters,
    /// Polled between steps: Ctrl-C for the CLI, a client gone or a deadline for the
    /// service.
    pub interrupted: &'a dyn Fn() -> bool,
    /// Which processes may be frozen or listed.
    pub admission: Admission,
    pub images: &'a dyn ImageWriter,
    /// What relative paths are relative to (the client's directory, for the service);
    /// None: this process's.
    pub cwd: Option<&'a Path>,
    /// The process that asked, when it is not this one (the service's client): `--all`
    /// leaves it out, as crd leaves itself out.
    pub caller: Option<Tgid>,
}

impl Context<'_> {
    fn resolve(&self, path: &Path) -> PathBuf {
        match self.cwd {
            Some(cwd) if path.is_relative() => cwd.join(path),
            _ => path.to_path_buf(),
        }
    }
}

/// Why a command failed: its one line is crd's last, and [`exit_code`] its status.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Graft(#[from] GraftError),
    #[error(transparent)]
    Ls(#[from] LsError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("cannot write the PID file {path}")]
    PidFile { path: String, source: io::Error },
    #[error("cannot write the output")]
    Output(#[from] io::Error),
    #[error("cannot create a scratch directory")]
    Scratch(#[source] io::Error),
    #[error("cannot start the demo processes")]
    Demo(#[source] crate::demo::DemoError),
    #[error("the restored tree differs from the image: {0}")]
    Differs(String),
}

/// crd's exit status for a failed command: 130 (128 + SIGINT, as a shell reports a
/// program Ctrl-C ended) for an interruption however it is wrapped, else 1.
pub fn exit_code(error: &(dyn std::error::Error + 'static)) -> u8 {
    if Interrupted::caused(error) { 130 } else { 1 }
}

pub use crate::error_text::one_line;

/// `crd checkpoint`.
pub fn checkpoint(
    args: &CheckpointArgs,
    cx: &mut Context<'_>,
    out: &mut Output<'_>,
) -> Result<(), CommandError> {
    let shown = args.output.clone().unwrap_or_else(|| PathBuf::from(format!("crd-{}.img", args.pid)));
    let mut options = Options {
        load: cx.harvesters.load_options().clone(),
        admission: cx.admission.clone(),
        strict: args.strict,
        ..Options::new(Tgid(args.pid), args.tree, args.source.into())
    };
    options.save.tcp_established = args.tcp_established;
    checkpoint_to(options, &shown, cx, out)
}

/// Checkpoints into `shown` (resolved against the context's directory) and says what
/// it did, naming the image as the caller named it.
fn checkpoint_to(
    options: Options,
    shown: &Path,
    cx: &mut Context<'_>,
    out: &mut Output<'_>,
) -> Result<(), CommandError> {
    let path = cx.resolve(shown);
    let sink = SinkAt { path: &path, writer: cx.images };
    // A harvester loaded already (the service's) is used; else the checkpoint loads one,
    // timed as its `load` phase.
    let harvester = cx.harvesters.loaded(options.source, false);
    let done = checkpoint_with(options, harvester, Some(&sink), cx.interrupted)?;
    #[cfg(feature = "testing")]
    done.phases.write_if_requested();
    let graph = &done.body.graph;
    for warning in graph.held_outside() {
        writeln!(out.stderr, "crd: warning: {warning}")?;
    }
    let processes = graph.tasks.iter().filter(|t| t.pid.0 == t.tgid.0).count();
    writeln!(
        out.stderr,
        "crd: checkpointed {processes} process(es), {} thread(s), {} fd(s) to {} in {:.1} ms",
        graph.tasks.len(),
        graph.slots().count(),
        shown.display(),
        done.phases.total().as_secs_f64() * 1e3
    )?;
    Ok(())
}

/// `crd restore`.
pub fn restore(args: &RestoreArgs, cx: &mut Context<'_>, out: &mut Output<'_>) -> Result<(), CommandError> {
    let mut phases = Phases::start();
    let body = image::read_private(&cx.resolve(&args.image))?;
    phases.lap("read");
    let restored =
        crate::restore::restore_image(&body.graph, args.allow_external, args.exec.request(), cx.interrupted)?;
    phases.lap("restore");
    report_restored(
        &restored,
        args.pid_file.as_deref().map(|p| cx.resolve(p)).as_deref(),
        args.exec.listen_fds,
        out,
    )?;
    #[cfg(feature = "testing")]
    phases.write_if_requested();
    Ok(())
}

/// `crd graft`.
pub fn graft(args: &GraftArgs, cx: &mut Context<'_>, out: &mut Output<'_>) -> Result<(), CommandError> {
    let options = Options {
        load: cx.harvesters.load_options().clone(),
        admission: cx.admission.clone(),
        ..Options::new(Tgid(args.pid), args.tree, args.source.into())
    };
    let restored = crate::graft::graft(options, args.exec.request(), cx.interrupted)?;
    report_restored(
        &restored,
        args.pid_file.as_deref().map(|p| cx.resolve(p)).as_deref(),
        args.exec.listen_fds,
        out,
    )
}

/// Prints the PID map (and writes the PID file); with `listen_fds`, where the program's
/// fds went.
fn report_restored(
    restored: &Restored,
    pid_file: Option<&Path>,
    listen_fds: bool,
    out: &mut Output<'_>,
) -> Result<(), CommandError> {
    if let Some(path) = pid_file {
        std::fs::write(path, format!("{}\n", restored.root))
            .map_err(|source| CommandError::PidFile { path: path.display().to_string(), source })?;
    }
    for (old, new) in &restored.tasks {
        writeln!(out.stdout, "{old} -> {new}")?;
    }
    // Where --listen-fds put the program's fds (on stderr: stdout is the PID map).
    let listeners: Vec<String> = restored
        .moved
        .iter()
        .filter(|m| m.listener)
        .map(|m| format!("fd {} (was {})", m.to, m.from))
        .collect();
    if listen_fds {
        let listed =
            if listeners.is_empty() { "no listening socket".to_string() } else { listeners.join(", ") };
        writeln!(out.stderr, "crd: LISTEN_FDS={}: {listed}", listeners.len())?;
    }
    for m in restored.moved.iter().filter(|m| !m.listener) {
        writeln!(out.stderr, "crd: fd {} is now fd {}: its number went to a listening socket", m.from, m.to)?;
    }
    Ok(())
}

/// `crd inspect`.
pub fn inspect(
    image: &Path,
    format: Format,
    cx: &Context<'_>,
    out: &mut Output<'_>,
) -> Result<(), CommandError> {
    let body = image::read(&cx.resolve(image))?;
    write!(out.stdout, "{}", inspect::render(&body, format))?;
    Ok(())
}

/// One listing of what `args` names, as `ls` and each step of `watch` make it.
pub fn listing(args: &LsArgs, cx: &mut Context<'_>) -> Result<Listing, CommandError> {
    listing_timed(args, cx, &mut Phases::start())
}

/// [`listing`], its phases timed (`load`, `harvest`, `graph`, `listing`).
fn listing_timed(args: &LsArgs, cx: &mut Context<'_>, phases: &mut Phases) -> Result<Listing, CommandError> {
    let targets = Targets::new(&args.pids, args.all)?;
    let harvester = cx.harvesters.get(args.source.into(), targets == Targets::All).map_err(LsError::from)?;
    phases.lap("load");
    let (harvest, unix_queues) =
        ls::harvest_with(harvester, &targets, &cx.admission, cx.caller, cx.interrupted)?;
    phases.lap("harvest");
    let listing = Listing::timed(harvest, &unix_queues, phases);
    Ok(if args.pipes { listing.only_pipes() } else { listing })
}

/// `crd ls`.
pub fn ls(args: &LsArgs, cx: &mut Context<'_>, out: &mut Output<'_>) -> Result<(), CommandError> {
    let mut phases = Phases::start();
    let listing = listing_timed(args, cx, &mut phases)?;
    let written = match listing.write(&mut *out.stdout, args.json) {
        // A reader that stopped reading (`crd ls | head`) is not an error.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        written => written,
    };
    phases.lap("write");
    #[cfg(feature = "testing")]
    phases.write_if_requested();
    Ok(written?)
}

/// `crd watch`: a listing every `interval_ms`, one JSON line each (see [`Watcher`]).
pub fn watch(args: &WatchArgs, cx: &mut Context<'_>, out: &mut Output<'_>) -> Result<(), CommandError> {
    let mut watcher = Watcher::new(args);
    let ls = args.ls();
    loop {
        let step = Instant::now();
        if let Some(line) = watcher.event(listing(&ls, cx)?) {
            writeln!(out.stdout, "{line}")?;
            out.stdout.flush()?;
        }
        if watcher.done() {
            return Ok(());
        }
        let next = step + watcher.interval();
        while Instant::now() < next {
            if (cx.interrupted)() {
                return Err(LsError::Interrupted(Interrupted).into());
            }
            std::thread::sleep((next - Instant::now()).min(Duration::from_millis(20)));
        }
    }
}

/// The state of a watch: what it last saw, turned into one JSON line per listing.
///
/// `{"seq":N,"elapsed_ms":T,"listing":{...}}` (the listing as `ls --json` gives it),
/// or with `--changes`, after the first, `{"seq":N,"elapsed_ms":T,"changes":{...}}`
/// only when something changed. The CLI and the service share it, so both stream the
/// same lines.
pub struct Watcher {
    changes: bool,
    count: Option<u64>,
    interval: Duration,
    started: Instant,
    seq: u64,
    previous: Option<Listing>,
}

/// What changed between two listings.
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct Changes {
    pub started: Vec<Tgid>,
    pub exited: Vec<Tgid>,
    pub opened: Vec<FdChange>,
    pub closed: Vec<FdChange>,
}

/// One fd opened or closed (or that now names another file: closed, then opened).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct FdChange {
    pub pid: Tgid,
    pub fd: Fd,
    pub kind: crate::kinds::Kind,
    pub name: ls::Name,
}

impl Changes {
    pub fn between(before: &Listing, after: &Listing) -> Self {
        use std::collections::BTreeSet;
        let pids = |l: &Listing| l.processes.iter().map(|p| p.pid).collect::<BTreeSet<Tgid>>();
        let fds = |l: &Listing| {
            l.processes
                .iter()
                .flat_map(|p| {
                    p.fds.iter().map(|f| FdChange {
                        pid: p.pid,
                        fd: f.fd,
                        kind: f.kind,
                        name: f.name.clone(),
                    })
                })
                .collect::<BTreeSet<FdChange>>()
        };
        let (pids_before, pids_after) = (pids(before), pids(after));
        let (fds_before, fds_after) = (fds(before), fds(after));
        Changes {
            started: pids_after.difference(&pids_before).copied().collect(),
            exited: pids_before.difference(&pids_after).copied().collect(),
            opened: fds_after.difference(&fds_before).cloned().collect(),
            closed: fds_before.difference(&fds_after).cloned().collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

impl Watcher {
    pub fn new(args: &WatchArgs) -> Self {
        Self {
            changes: args.changes,
            count: args.count,
            interval: Duration::from_millis(args.interval_ms),
            started: Instant::now(),
            seq: 0,
            previous: None,
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Whether the watch has made all the listings it was asked for.
    pub fn done(&self) -> bool {
        self.count.is_some_and(|count| self.seq >= count)
    }

    /// The line to print for this listing, if any.
    pub fn event(&mut self, listing: Listing) -> Option<String> {
        self.seq += 1;
        let elapsed_ms = self.started.elapsed().as_millis() as u64;
        let line = match &self.previous {
            Some(previous) if self.changes => {
                let changes = Changes::between(previous, &listing);
                (!changes.is_empty()).then(|| {
                    serde_json::json!({ "seq": self.seq, "elapsed_ms": elapsed_ms, "changes": changes })
                        .to_string()
                })
            }
            _ => Some(
                serde_json::json!({ "seq": self.seq, "elapsed_ms": elapsed_ms, "listing": listing })
                    .to_string(),
            ),
        };
        if self.changes {
            self.previous = Some(listing);
        }
        line
    }
}

/// `crd demo`: `options(root)` says how to checkpoint the tree at `root` (the demo's,
/// then the stubs').
pub fn demo(
    output: Option<PathBuf>,
    source: SourceArg,
    cx: &mut Context<'_>,
    out: &mut Output<'_>,
) -> Result<(), CommandError> {
    let options = |root: u32, load: &LoadOptions| Options {
        load: load.clone(),
        ..Options::new(Tgid(root), true, source.into())
    };
    let scratch = tempfile::tempdir().map_err(CommandError::Scratch)?;
    let tree = crate::demo::spawn(&scratch.path().join("demo.fifo"), &scratch.path().join("demo.txt"))
        .map_err(CommandError::Demo)?;
    writeln!(
        out.stdout,
        "demo: PID {} (and a child) hold: a pipe with both ends (fds 3, 4) and data queued,",
        tree.root()
    )?;
    writeln!(
        out.stdout,
        "      a dup of its read end (fd 5), a FIFO (fd 6), a file at offset 4 (fd 7), and"
    )?;
    writeln!(out.stdout, "      a second pipe (8, 9; 9 close-on-exec). The child shares them across fork")?;
    writeln!(out.stdout, "      and has closed fd 4.\n")?;
    let path = output.unwrap_or_else(|| scratch.path().join("demo.img"));
    let load = cx.harvesters.load_options().clone();
    checkpoint_to(options(tree.root(), &load), &path, cx, out)?;
    let body = image::read(&cx.resolve(&path))?;
    writeln!(out.stdout, "{}", inspect::render(&body, Format::Text))?;

    // Restore it once the originals are gone, and check the stubs against the image.
    let _log = tree.stop();
    let restored = crate::restore::restore_image(&body.graph, false, None, cx.interrupted)?;
    let stubs = Stubs(restored.tasks.iter().map(|(_, new)| *new).collect());
    writeln!(out.stdout, "restored as stubs:")?;
    for (old, new) in &restored.tasks {
        writeln!(out.stdout, "  {old} -> {new}")?;
    }
    let again = crate::checkpoint(options(restored.root.0, &load), cx.interrupted)?;
    match body.graph.same_shape(&again.body.graph) {
        Ok(()) => writeln!(
            out.stdout,
            "a checkpoint of the stubs gives the same graph: same tree, fds, sharing, offsets and queued bytes."
        )?,
        Err(difference) => return Err(CommandError::Differs(difference.to_string())),
    }
    drop(stubs);
    Ok(())
}

/// The demo's stubs, ended when the demo ends.
struct Stubs(Vec<crate::types::Pid>);

impl Drop for Stubs {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid.0 as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    enum Cli {
        Restore(RestoreArgs),
        Graft(GraftArgs),
    }

    #[test]
    fn restore_and_graft_arguments_read_back_as_they_were() {
        let restore = RestoreArgs {
            image: "app.img".into(),
            pid_file: Some("app.pid".into()),
            allow_external: true,
            exec: ExecArgs {
                exec: true,
                keep_cloexec: true,
                listen_fds: true,
                command: vec!["cat".into(), "--".into(), "-x".into()],
            },
        };
        let mut argv = vec![std::ffi::OsString::from("crd")];
        argv.extend(restore.to_args());
        let Ok(Cli::Restore(back)) = Cli::try_parse_from(argv) else { panic!("restore parses") };
        assert_eq!(back, restore);

        let graft = GraftArgs {
            pid: 42,
            tree: true,
            pid_file: None,
            source: SourceArg::Procfs,
            exec: ExecArgs::default(),
        };
        let mut argv = vec![std::ffi::OsString::from("crd")];
        argv.extend(graft.to_args());
        let Ok(Cli::Graft(back)) = Cli::try_parse_from(argv) else { panic!("graft parses") };
        assert_eq!(back, graft);
    }

    #[test]
    fn a_request_names_only_what_differs_from_the_defaults() {
        let args: CheckpointArgs = serde_json::from_str(r#"{"pid": 7, "source": "procfs"}"#).unwrap();
        assert_eq!(args, CheckpointArgs { pid: 7, source: SourceArg::Procfs, ..Default::default() });
        let watch: WatchArgs = serde_json::from_str(r#"{"all": true}"#).unwrap();
        assert_eq!(watch.interval_ms, 1000);
        assert!(serde_json::from_str::<LsArgs>(r#"{"pids": [1], "colour": true}"#).is_err());
    }

    #[test]
    fn one_line_skips_causes_the_message_quotes() {
        let error = CommandError::PidFile { path: "/x".into(), source: io::Error::other("denied") };
        assert_eq!(one_line(&error), "cannot write the PID file /x: denied");
        assert_eq!(exit_code(&error), 1);
        let interrupted = CommandError::Ls(LsError::Interrupted(Interrupted));
        assert_eq!(exit_code(&interrupted), 130);
    }
}
