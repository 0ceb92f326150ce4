//! The `crd` command line.
//!
//! The hidden test commands (`fixture`, `stress`, `bench-harvest`) exist only in builds
//! with the `testing` feature: a product build does not know them at all.
use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use crd::{
    Interrupted, Options,
    checkpoint::checkpoint_to_file,
    harvest::{self as harvesting, LoadOptions},
    image,
    inspect::{self, Format},
    ls::{self, Listing, Targets},
    timings::Phases,
    types::Tgid,
};

/// Where to read fd state from (`--source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Source {
    /// BPF task/task_file iterators.
    Bpf,
    /// /proc/PID/{fd,fdinfo,task} and kcmp(2): slower, needs no BPF.
    Procfs,
    /// BPF, or /proc (with a warning saying why) where this kernel cannot run crd's BPF
    /// programs.
    Auto,
}

impl From<Source> for harvesting::Source {
    fn from(source: Source) -> Self {
        match source {
            Source::Bpf => harvesting::Source::Bpf,
            Source::Procfs => harvesting::Source::Procfs,
            Source::Auto => harvesting::Source::Auto,
        }
    }
}

#[derive(Parser)]
#[command(
    name = "crd",
    version,
    about = "Checkpoint the open-file state of Linux processes with BPF iterators"
)]
struct Cli {
    /// The kernel BTF to read struct offsets from, for the commands that load BPF: for
    /// a kernel without /sys/kernel/btf/vmlinux, e.g. its file from BTFHub
    /// [default: /sys/kernel/btf/vmlinux].
    #[arg(long, global = true, value_name = "FILE")]
    btf: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Checkpoint a process's fds, pipes and their sharing into an image.
    Checkpoint {
        /// The process to checkpoint (all its threads).
        pid: u32,
        /// Also checkpoint all its descendants.
        #[arg(long)]
        tree: bool,
        /// Where to write the image [default: crd-PID.img].
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Where to read fd state from.
        #[arg(long, value_enum, default_value_t = Source::Auto)]
        source: Source,
        /// Write no image if restore could not recreate every fd (a kind crd does not
        /// make, such as a netlink socket or an epoll): name each such fd instead.
        #[arg(long)]
        strict: bool,
        /// Also save established TCP connections (sequence numbers, unread and
        /// unacknowledged bytes, options), each read by putting it briefly into repair
        /// mode (TCP_REPAIR; needs CAP_NET_ADMIN), so `crd restore` can rebuild them once
        /// the originals are gone. Without it restore refuses them.
        #[arg(long)]
        tcp_established: bool,
    },
    /// Rebuild an image's processes as stubs holding the same fds, sharing and pipe data.
    Restore {
        image: PathBuf,
        /// Write the root stub's PID here.
        #[arg(long)]
        pid_file: Option<PathBuf>,
        /// Recreate pipes (and ptys) whose other end was outside the checkpoint as fresh,
        /// disconnected ones (by default such an image is refused).
        #[arg(long)]
        allow_external: bool,
        #[command(flatten)]
        exec: ExecArgs,
    },
    /// Hand the live open files of a process (tree) to new stubs: the very same pipes
    /// and files, so peers stay connected.
    Graft {
        /// The process whose open files to hand over (it keeps running).
        pid: u32,
        /// Also graft all its descendants, as a tree of stubs.
        #[arg(long)]
        tree: bool,
        /// Write the root stub's PID (or the exec'd program's: the same) here.
        #[arg(long)]
        pid_file: Option<PathBuf>,
        /// Where to read fd state from.
        #[arg(long, value_enum, default_value_t = Source::Auto)]
        source: Source,
        #[command(flatten)]
        exec: ExecArgs,
    },
    /// Show what an image holds.
    Inspect {
        image: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Spawn a small process tree wired with pipes, checkpoint it and show the image.
    Demo {
        /// Keep the image here [default: a temporary file].
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Source::Auto)]
        source: Source,
    },
    /// List open files like lsof, with their sharing: fd tables, open file descriptions,
    /// and which processes hold which ends of each pipe. Nothing is frozen.
    Ls {
        /// Processes to list (all their threads).
        pids: Vec<u32>,
        /// List every process on the machine.
        #[arg(long, conflicts_with = "pids")]
        all: bool,
        /// Only pipes and FIFOs.
        #[arg(long)]
        pipes: bool,
        /// One JSON document instead of the table.
        #[arg(long)]
        json: bool,
        #[arg(long, value_enum, default_value_t = Source::Auto)]
        source: Source,
    },
    /// Build a process tree from steps (for tests).
    #[cfg(feature = "testing")]
    #[command(hide = true)]
    Fixture { steps: Vec<String> },
    /// Checkpoint, encode, decode, restore and kill PID CYCLES times with BPF loaded
    /// once; print crd's own fd count and RSS per cycle as JSON (for the load test).
    #[cfg(feature = "testing")]
    #[command(hide = true)]
    Stress {
        pid: u32,
        #[arg(long)]
        tree: bool,
        #[arg(long, default_value_t = 100)]
        cycles: usize,
    },
    /// Time harvests for `cargo xtask bench`: load once, harvest the processes RUNS
    /// times without freezing them, print one JSON line.
    #[cfg(feature = "testing")]
    #[command(hide = true)]
    BenchHarvest {
        #[arg(long, value_enum, default_value_t = Source::Bpf)]
        source: Source,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(required = true)]
        pids: Vec<u32>,
    },
}

/// `--exec` and how the program gets its fds (restore and graft alike).
#[derive(clap::Args)]
struct ExecArgs {
    /// The root stub execs CMD instead of waiting: `--exec -- CMD ARGS`. The program
    /// inherits every fd the root stub holds: close-on-exec is cleared on each, since
    /// programs open nearly everything close-on-exec and would otherwise pass nothing on.
    #[arg(long, requires = "command")]
    exec: bool,
    /// With --exec: keep each fd's close-on-exec bit as the original had it, so the
    /// program receives only the fds the original would have passed to a program it
    /// exec'd.
    #[arg(long, requires = "exec")]
    keep_cloexec: bool,
    /// With --exec: hand the listening sockets over as systemd socket activation does:
    /// moved to fds 3, 4, ... (in their original order), with LISTEN_FDS=N,
    /// LISTEN_PID=<the program's PID> and LISTEN_FDNAMES=fdA:fdB (A, B: their original
    /// numbers) in the program's environment. Another fd on one of those numbers moves
    /// to the lowest number above them that is free; crd prints every move. Listening
    /// sockets are handed over even with --keep-cloexec.
    #[arg(long, requires = "exec")]
    listen_fds: bool,
    /// The program to exec and its arguments, after `--`.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

impl ExecArgs {
    fn request(&self) -> Option<crd::restore::ExecRequest<'_>> {
        self.exec.then_some(crd::restore::ExecRequest {
            command: &self.command,
            keep_cloexec: self.keep_cloexec,
            listen_fds: self.listen_fds,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Diagnostics, including those of the BPF programs: warnings by default,
    // RUST_LOG=debug for more (e.g. every ring-buffer pause).
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format(|buf, record| {
            use std::io::Write;
            writeln!(buf, "crd: {}: {}", record.level().as_str().to_lowercase(), record.args())
        })
        .init();
    // crd holds one fd per restored description, and stubs need the image's fd numbers.
    crd::sys::raise_fd_limit();
    let interrupted = Arc::new(AtomicBool::new(false));
    // A fixture process is a stand-in for a user's program: SIGTERM and Ctrl-C end it.
    #[cfg(feature = "testing")]
    let handles_signals = !matches!(cli.command, Command::Fixture { .. });
    #[cfg(not(feature = "testing"))]
    let handles_signals = true;
    if handles_signals {
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            // Ctrl-C only raises a flag: crd then resumes its targets and cleans up.
            let _ = signal_hook::flag::register(signal, Arc::clone(&interrupted));
        }
    }
    let is_interrupted = move || interrupted.load(Ordering::Relaxed);
    let load = LoadOptions { btf: cli.btf };
    match run(cli.command, &load, &is_interrupted) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crd: {}", one_line(&e));
            // 128 + SIGINT, as a shell reports a program Ctrl-C ended, for every command:
            // the interruption is found however the command's error wraps it.
            ExitCode::from(if Interrupted::caused(e.as_ref()) { 130 } else { 1 })
        }
    }
}

fn run(command: Command, load: &LoadOptions, interrupted: &dyn Fn() -> bool) -> anyhow::Result<()> {
    let options = |root: u32, tree: bool, source: Source| Options {
        load: load.clone(),
        ..Options::new(Tgid(root), tree, source.into())
    };
    match command {
        Command::Checkpoint { pid, tree, output, source, strict, tcp_established } => {
            let output = output.unwrap_or_else(|| PathBuf::from(format!("crd-{pid}.img")));
            let mut options = options(pid, tree, source);
            options.save.tcp_established = tcp_established;
            options.strict = strict;
            checkpoint(options, &output, interrupted)?;
        }
        Command::Restore { image, pid_file, allow_external, exec } => {
            let mut phases = Phases::start();
            let body = image::read_private(&image)?;
            phases.lap("read");
            let restored =
                crd::restore::restore_image(&body.graph, allow_external, exec.request(), interrupted)?;
            phases.lap("restore");
            report_restored(&restored, pid_file.as_deref(), exec.listen_fds)?;
            #[cfg(feature = "testing")]
            phases.write_if_requested();
        }
        Command::Graft { pid, tree, pid_file, source, exec } => {
            let restored = crd::graft::graft(options(pid, tree, source), exec.request(), interrupted)?;
            report_restored(&restored, pid_file.as_deref(), exec.listen_fds)?;
        }
        Command::Inspect { image, format } => {
            let body = image::read(&image)?;
            print!("{}", inspect::render(&body, format));
        }
        Command::Demo { output, source } => demo(output, &|root| options(root, true, source), interrupted)?,
        Command::Ls { pids, all, pipes, json, source } => {
            let targets = Targets::new(&pids, all)?;
            let (_, harvest, unix_queues) = ls::harvest(source.into(), load, &targets, interrupted)?;
            let mut listing = Listing::new(harvest, &unix_queues);
            if pipes {
                listing = listing.only_pipes();
            }
            // What is no longer needed goes before the output is written.
            drop(unix_queues);
            match listing.write(std::io::stdout().lock(), json) {
                // A reader that stopped reading (`crd ls | head`) is not an error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                written => written.context("cannot write the listing")?,
            }
        }
        #[cfg(feature = "testing")]
        Command::Fixture { steps } => crd::fixture::run(&steps)?,
        #[cfg(feature = "testing")]
        Command::Stress { pid, tree, cycles } => {
            println!(
                "{}",
                serde_json::to_string(&crd::stress::run(
                    Tgid(pid),
                    tree,
                    cycles,
                    load.btf.as_deref(),
                    interrupted
                )?)?
            )
        }
        #[cfg(feature = "testing")]
        Command::BenchHarvest { source, runs, pids } => {
            bench_harvest(source, runs, &pids, load, interrupted)?
        }
    }
    Ok(())
}

/// Prints the PID map (and writes the PID file); with `listen_fds`, where the program's
/// fds went.
fn report_restored(
    restored: &crd::restore::Restored,
    pid_file: Option<&std::path::Path>,
    listen_fds: bool,
) -> anyhow::Result<()> {
    if let Some(path) = pid_file {
        std::fs::write(path, format!("{}\n", restored.root))
            .with_context(|| format!("cannot write the PID file {}", path.display()))?;
    }
    for (old, new) in &restored.tasks {
        println!("{old} -> {new}");
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
        eprintln!("crd: LISTEN_FDS={}: {listed}", listeners.len());
    }
    for m in restored.moved.iter().filter(|m| !m.listener) {
        eprintln!("crd: fd {} is now fd {}: its number went to a listening socket", m.from, m.to);
    }
    Ok(())
}

fn checkpoint(
    options: Options,
    output: &std::path::Path,
    interrupted: &dyn Fn() -> bool,
) -> anyhow::Result<()> {
    let done = checkpoint_to_file(options, output, interrupted)?;
    #[cfg(feature = "testing")]
    done.phases.write_if_requested();
    let graph = &done.body.graph;
    for warning in graph.held_outside() {
        eprintln!("crd: warning: {warning}");
    }
    let processes = graph.tasks.iter().filter(|t| t.pid.0 == t.tgid.0).count();
    eprintln!(
        "crd: checkpointed {processes} process(es), {} thread(s), {} fd(s) to {} in {:.1} ms",
        graph.tasks.len(),
        graph.slots().count(),
        output.display(),
        done.phases.total().as_secs_f64() * 1e3
    );
    Ok(())
}

/// `options(root)`: how to checkpoint the tree at `root` (the demo's, then the stubs').
fn demo(
    output: Option<PathBuf>,
    options: &dyn Fn(u32) -> Options,
    interrupted: &dyn Fn() -> bool,
) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let tree = crd::demo::spawn(&scratch.path().join("demo.fifo"), &scratch.path().join("demo.txt"))
        .context("cannot start the demo processes")?;
    println!(
        "demo: PID {} (and a child) hold: a pipe with both ends (fds 3, 4) and data queued,",
        tree.root()
    );
    println!("      a dup of its read end (fd 5), a FIFO (fd 6), a file at offset 4 (fd 7), and");
    println!("      a second pipe (8, 9; 9 close-on-exec). The child shares them across fork");
    println!("      and has closed fd 4.\n");
    let path = output.unwrap_or_else(|| scratch.path().join("demo.img"));
    checkpoint(options(tree.root()), &path, interrupted)?;
    let body = image::read(&path)?;
    println!("{}", inspect::render(&body, Format::Text));

    // Restore it once the originals are gone, and check the stubs against the image.
    let _log = tree.stop();
    let restored = crd::restore::restore_image(&body.graph, false, None, interrupted)?;
    let stubs = Stubs(restored.tasks.iter().map(|(_, new)| *new).collect());
    println!("restored as stubs:");
    for (old, new) in &restored.tasks {
        println!("  {old} -> {new}");
    }
    let again = crd::checkpoint(options(restored.root.0), interrupted)?;
    match body.graph.same_shape(&again.body.graph) {
        Ok(()) => println!(
            "a checkpoint of the stubs gives the same graph: same tree, fds, sharing, offsets and queued bytes."
        ),
        Err(difference) => anyhow::bail!("the restored tree differs from the image: {difference}"),
    }
    drop(stubs);
    Ok(())
}

#[cfg(feature = "testing")]
fn bench_harvest(
    source: Source,
    runs: usize,
    pids: &[u32],
    load: &LoadOptions,
    interrupted: &dyn Fn() -> bool,
) -> anyhow::Result<()> {
    use crd::harvest::Scope;
    use std::time::Instant;

    let Targets::Processes(tgids) = Targets::new(pids, false)? else {
        anyhow::bail!("name the processes to harvest");
    };
    // The floor under the BPF harvest: the same fds visited with nothing read (measured
    // first, with a harvester of its own, gone before the measured one loads).
    let mut floor_ns = Vec::new();
    if matches!(source, Source::Bpf) {
        let mut bpf = crd::harvest::bpf::BpfHarvester::load(false, load)?;
        for _ in 0..runs {
            floor_ns.push(bpf.time_visit_only(Scope::Processes(&tgids), interrupted)?.as_nanos() as u64);
        }
    }
    let started = Instant::now();
    let mut harvester = harvesting::harvester(source.into(), false, load)?;
    let source = harvester.source();
    let load_ns = started.elapsed().as_nanos() as u64;
    let mut runs_ns = Vec::with_capacity(runs);
    let mut kernel_ns = Vec::with_capacity(runs);
    let mut last = crd::harvest::Harvest::default();
    for _ in 0..runs {
        let started = Instant::now();
        let stats;
        (last, stats) = harvester.harvest(Scope::Processes(&tgids), interrupted)?;
        runs_ns.push(started.elapsed().as_nanos() as u64);
        kernel_ns.push(stats.kernel_time.as_nanos() as u64);
    }
    let started = Instant::now();
    let graph = crd::Graph::build(tgids[0], &last, Default::default());
    let graph_ns = started.elapsed().as_nanos() as u64;
    let report = serde_json::json!({
        "source": source.to_string(),
        "processes": tgids.len(),
        "tasks": graph.tasks.len(),
        "fds": last.fds.len(),
        "load_ns": load_ns,
        "runs_ns": runs_ns,
        "kernel_ns": kernel_ns,
        "floor_ns": floor_ns,
        "graph_ns": graph_ns,
    });
    println!("{report}");
    Ok(())
}

/// The demo's stubs, ended when the demo ends.
struct Stubs(Vec<crd::types::Pid>);

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

/// The error and its causes on one line, skipping causes the message already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line = format!("{line}: {cause}");
        }
    }
    line
}
