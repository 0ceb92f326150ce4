//! The `crd` command line: parses it, and runs the command here or, with `--service`
//! (or `CRD_SERVICE`), through the service (docs/service.md). The commands themselves
//! are `crd::commands`, which the service runs too.
//!
//! The hidden test commands (`fixture`, `stress`, `bench-harvest`) exist only in builds
//! with the `testing` feature: a product build does not know them at all.
use std::{
    io::Write,
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use clap::{Parser, Subcommand};
use crd::{
    commands::{
        self, AsThisProcess, CheckpointArgs, CommandError, Context, GraftArgs, Harvesters, LsArgs, Output,
        RestoreArgs, SourceArg, WatchArgs,
    },
    harvest::LoadOptions,
    inspect::Format,
    serve::{self, Request},
};

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
    /// Run the command through the crd service listening at PATH (`crd serve`), with
    /// the same output and exit code; `ls`, `checkpoint`, `restore`, `graft` and
    /// `watch` go through it, the others run here [env: CRD_SERVICE].
    #[arg(long, global = true, value_name = "PATH")]
    service: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Checkpoint a process's fds, pipes and their sharing into an image.
    Checkpoint(CheckpointArgs),
    /// Rebuild an image's processes as stubs holding the same fds, sharing and pipe data.
    Restore(RestoreArgs),
    /// Hand the live open files of a process (tree) to new stubs: the very same pipes
    /// and files, so peers stay connected.
    Graft(GraftArgs),
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
        #[arg(long, value_enum, default_value_t = SourceArg::Auto)]
        source: SourceArg,
    },
    /// List open files like lsof, with their sharing: fd tables, open file descriptions,
    /// and which processes hold which ends of each pipe. Nothing is frozen.
    Ls(LsArgs),
    /// List open files every interval, as one JSON line each (or only what changed), for
    /// dashboards. Nothing is frozen.
    Watch(WatchArgs),
    /// Run the crd service: keep the BPF programs loaded and run commands for clients
    /// on a unix socket (see docs/service.md). SIGTERM stops it cleanly.
    Serve {
        /// Where to listen (unless systemd passes the socket: LISTEN_FDS).
        #[arg(long, value_name = "PATH", default_value = serve::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Let this group connect too (socket mode 0660; default 0600, root only).
        #[arg(long)]
        group: Option<String>,
        /// How long a request may run unless it sets its own deadline (a watch: no
        /// limit); past it, it is cancelled and its targets resumed.
        #[arg(long, value_name = "MS", default_value_t = 120_000)]
        deadline_ms: u64,
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
        #[arg(long, value_enum, default_value_t = SourceArg::Bpf)]
        source: SourceArg,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(required = true)]
        pids: Vec<u32>,
    },
}

impl Command {
    /// The service request this command is, if it goes through the service.
    fn request(&self) -> Option<Request> {
        Some(match self {
            Command::Checkpoint(args) => Request::Checkpoint(args.clone()),
            Command::Restore(args) => Request::Restore(args.clone()),
            Command::Graft(args) => Request::Graft(args.clone()),
            Command::Ls(args) => Request::Ls(args.clone()),
            Command::Watch(args) => Request::Watch(args.clone()),
            _ => return None,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Diagnostics, including those of the BPF programs: warnings by default,
    // RUST_LOG=debug for more (e.g. every ring-buffer pause).
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format(|buf, record| {
            writeln!(buf, "crd: {}: {}", record.level().as_str().to_lowercase(), record.args())
        })
        .init();
    let load = LoadOptions { btf: cli.btf };
    let service =
        cli.service.or_else(|| std::env::var_os("CRD_SERVICE").filter(|s| !s.is_empty()).map(PathBuf::from));
    if let (Some(path), Some(request)) = (service, cli.command.request()) {
        if load.btf.is_some() {
            eprintln!("crd: --btf is the service's: give it to `crd serve`");
            return ExitCode::from(2);
        }
        return through_service(&path, request);
    }
    // crd holds one fd per restored description, and stubs need the image's fd numbers.
    crd::sys::raise_fd_limit();
    if let Command::Serve { socket, group, deadline_ms } = cli.command {
        let options =
            serve::ServeOptions { socket, group, deadline: Duration::from_millis(deadline_ms), load };
        return match serve::run(options) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("crd: {}", commands::one_line(&e));
                ExitCode::FAILURE
            }
        };
    }
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
    let mut harvesters = Harvesters::new(load);
    let mut cx = Context {
        harvesters: &mut harvesters,
        interrupted: &is_interrupted,
        admission: Default::default(),
        images: &AsThisProcess,
        cwd: None,
        caller: None,
    };
    let (mut stdout, mut stderr) = (std::io::stdout().lock(), std::io::stderr());
    let mut out = Output { stdout: &mut stdout, stderr: &mut stderr };
    let result = match cli.command {
        Command::Checkpoint(args) => commands::checkpoint(&args, &mut cx, &mut out),
        Command::Restore(args) => commands::restore(&args, &mut cx, &mut out),
        Command::Graft(args) => commands::graft(&args, &mut cx, &mut out),
        Command::Inspect { image, format } => commands::inspect(&image, format, &cx, &mut out),
        Command::Demo { output, source } => commands::demo(output, source, &mut cx, &mut out),
        Command::Ls(args) => commands::ls(&args, &mut cx, &mut out),
        Command::Watch(args) => commands::watch(&args, &mut cx, &mut out),
        Command::Serve { .. } => unreachable!("served above"),
        #[cfg(feature = "testing")]
        testing => return run_testing(testing, cx.harvesters.load_options(), &is_interrupted),
    };
    let _ = out.stdout.flush();
    exit(result)
}

/// The exit status of a command, its error said on stderr as its last line.
fn exit(result: Result<(), CommandError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crd: {}", commands::one_line(&e));
            ExitCode::from(commands::exit_code(&e))
        }
    }
}

/// Runs `request` through the service at `path`, printing what it prints.
fn through_service(path: &std::path::Path, request: Request) -> ExitCode {
    let (mut stdout, mut stderr) = (std::io::stdout().lock(), std::io::stderr());
    let mut out = Output { stdout: &mut stdout, stderr: &mut stderr };
    let ran = serve::Client::connect(path).and_then(|mut client| client.run(request, &mut out));
    let _ = out.stdout.flush();
    match ran {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("crd: {}", commands::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The hidden test commands (testing builds only).
#[cfg(feature = "testing")]
fn run_testing(command: Command, load: &LoadOptions, interrupted: &dyn Fn() -> bool) -> ExitCode {
    use crd::types::Tgid;
    let result: anyhow::Result<()> = (|| {
        match command {
            Command::Fixture { steps } => crd::fixture::run(&steps)?,
            Command::Stress { pid, tree, cycles } => println!(
                "{}",
                serde_json::to_string(&crd::stress::run(
                    Tgid(pid),
                    tree,
                    cycles,
                    load.btf.as_deref(),
                    interrupted
                )?)?
            ),
            Command::BenchHarvest { source, runs, pids } => {
                bench_harvest(source, runs, &pids, load, interrupted)?
            }
            _ => unreachable!("only the test commands come here"),
        }
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crd: {}", commands::one_line(e.as_ref()));
            ExitCode::from(commands::exit_code(e.as_ref()))
        }
    }
}

#[cfg(feature = "testing")]
fn bench_harvest(
    source: SourceArg,
    runs: usize,
    pids: &[u32],
    load: &LoadOptions,
    interrupted: &dyn Fn() -> bool,
) -> anyhow::Result<()> {
    use crd::{
        harvest::{self as harvesting, Scope},
        ls::Targets,
    };
    use std::time::Instant;

    let Targets::Processes(tgids) = Targets::new(pids, false)? else {
        anyhow::bail!("name the processes to harvest");
    };
    // The floor under the BPF harvest: the same fds visited with nothing read (measured
    // first, with a harvester of its own, gone before the measured one loads).
    let mut floor_ns = Vec::new();
    if matches!(source, SourceArg::Bpf) {
        let mut bpf = crd::harvest::bpf::BpfHarvester::load(false, load)?;
        for _ in 0..runs {
            floor_ns.push(bpf.time_visit_only(Scope::Processes(&tgids), interrupted)?.as_nanos() as u64);
        }
        // With the floor programs loaded (crd-ebpf's `floor` module): each one's time over
        // the same fds, as JSON on stderr: `visit` (the loaded fd program's floor, as
        // above), `null`, `emit`, `walk0`...`walk3` (see the module; `walk3` sends
        // records it does not resume, so it needs a ring that holds them all:
        // CRD_RING_BYTES=4194304 for 18,000 fds).
        if std::env::var_os(crd::harvest::bpf::FLOOR_PROGRAMS_ENV).is_some() {
            let mut floors = serde_json::Map::new();
            for _ in 0..runs {
                let scope = Scope::Processes(&tgids);
                let mut push = |key: &str, ns: u128| {
                    if let Some(runs) =
                        floors.entry(key).or_insert_with(|| serde_json::json!([])).as_array_mut()
                    {
                        runs.push((ns as u64).into());
                    }
                };
                push("visit", bpf.time_visit_only(scope, interrupted)?.as_nanos());
                push(
                    "null",
                    bpf.time_floor("crd_floor_null", "task_file", 0, scope, interrupted)?.as_nanos(),
                );
                push(
                    "emit",
                    bpf.time_floor("crd_floor_emit", "task_file", 0, scope, interrupted)?.as_nanos(),
                );
                for mode in 0..4 {
                    let ns = bpf.time_floor("crd_floor_walk", "task", mode, scope, interrupted)?.as_nanos();
                    push(&format!("walk{mode}"), ns);
                }
            }
            eprintln!("{}", serde_json::Value::Object(floors));
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
        // The last run's harvest is freed before the clock starts: freeing it is no part
        // of the next harvest (and costs a socket's boxed facts, not a pipe's).
        drop(std::mem::take(&mut last));
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
