//! `cargo xtask bench`: crd's harvesters, checkpoint and restore measured on real
//! workloads, with the targets judged, written to `docs/benchmarks.md` and
//! `docs/benchmarks.svg`.
//!
//! xtask forks the workloads itself ([`workload`]), runs the release `crd` and `lsof`
//! against them ([`measure`]), and renders the page ([`report`]) and the plot
//! ([`plot`]). Harvesters are interleaved repetition by repetition, so each BPF/procfs
//! and BPF/lsof ratio compares runs made seconds apart on the same processes.
use std::{fs, path::Path, process::Command, time::Instant};

use anyhow::{Context, Result, bail};

mod measure;
mod plot;
mod report;
mod service;
mod stats;
mod workload;

use measure::{Scratch, check_interrupted};
use report::{Checkpoint, Criu, Harvest, Machine, SocketRow};
use stats::median;
use workload::{Wiring, Workload, kill_and_reap};

/// How many times each thing is measured.
#[derive(Clone, Copy)]
pub struct Repetitions {
    /// Repetitions of each harvester on each workload (each a fresh crd process).
    harvest: usize,
    /// Harvests inside one `crd bench-harvest --source bpf` run (the median is kept).
    bpf_runs: usize,
    /// The same for procfs, slower: fewer.
    procfs_runs: usize,
    /// Checkpoints (and restores) of each checkpoint workload.
    checkpoint: usize,
    /// Socketpairs, TCP connections and pipes of the socket workloads (each 2× as many
    /// fds).
    sockets: usize,
}

impl Repetitions {
    pub fn new(quick: bool) -> Repetitions {
        if quick {
            Repetitions { harvest: 2, bpf_runs: 3, procfs_runs: 1, checkpoint: 2, sockets: 2_000 }
        } else {
            Repetitions { harvest: 5, bpf_runs: 5, procfs_runs: 1, checkpoint: 5, sockets: 10_000 }
        }
    }
}

/// Harvest workloads: (processes, pipes per process).
const HARVESTS: [(usize, usize); 4] = [(10, 500), (1, 9_000), (100, 500), (1_000, 50)];

/// Runs the whole benchmark with the `crd` at `crd`; writes the page and the plot
/// under `root/docs`.
pub fn run(crd: &Path, root: &Path, reps: Repetitions) -> Result<()> {
    let started = Instant::now();
    measure::catch_interrupts();
    workload::become_subreaper();
    let fd_limit = workload::raise_hard_fd_limit();
    let scratch = Scratch::new(root.join("target/bench"))?;
    let machine = machine(root);
    let mut harvests = Vec::new();
    for (processes, pipes) in HARVESTS {
        eprintln!("bench: harvest of {processes} × {} fds", 2 * pipes);
        harvests.push(harvest(crd, &scratch, processes, Wiring::Private { pipes }, reps)?);
    }
    let ring = Wiring::Ring { pipes: 100, every: 10, bytes: 4096 };
    let checkpoints = [
        (
            report::PIPES_9000,
            1,
            Wiring::Private { pipes: 9_000 },
            true,
            Some(Criu { dump_s: 0.80, restore_s: 2.0 }),
        ),
        (report::TREE_50, 50, ring, true, Some(Criu { dump_s: 0.94, restore_s: 2.6 })),
        // 100,000 fds for the RSS and image-size targets. Not restored: crd holds one
        // fd per description while it restores, and 50,000 pipes exceed its fd limit.
        (report::TREE_100K, 100, Wiring::Private { pipes: 500 }, false, None),
    ];
    let mut results = Vec::new();
    for (name, processes, wiring, restore, criu) in checkpoints {
        eprintln!("bench: checkpoint of the {name}");
        let mut row = checkpoint(crd, &scratch, processes, wiring, restore, reps.checkpoint)?;
        row.name = name.into();
        row.criu = criu;
        results.push(row);
    }
    let n = workload::pairs_within(fd_limit, reps.sockets);
    let mut sockets = Vec::new();
    for (name, wiring, no_restore) in [
        (
            format!("{} {}", report::SOCKET_BASELINE, report::thousands(n as u64)),
            Wiring::Private { pipes: n },
            None,
        ),
        (format!("unix socketpairs {}", report::thousands(n as u64)), Wiring::UnixPairs { pairs: n }, None),
        (
            format!("TCP connections {}", report::thousands(n as u64)),
            Wiring::Tcp { connections: n },
            Some("refused (checkpointed without --tcp-established)"),
        ),
    ] {
        eprintln!("bench: {name}");
        sockets.push(socket_row(crd, &scratch, name, wiring, no_restore, reps)?);
    }
    let service = service::measure(crd, &scratch, reps.checkpoint)?;
    let repetitions = format!(
        "{} repetitions (BPF: the median of {} harvests in each), {} for checkpoint and restore",
        reps.harvest, reps.bpf_runs, reps.checkpoint
    );
    let page = report::render(&machine, &harvests, &results, &sockets, &service, &repetitions);
    let docs = root.join("docs");
    fs::create_dir_all(&docs)?;
    fs::write(docs.join("benchmarks.md"), &page).context("writing docs/benchmarks.md")?;
    plot::write_svg(&docs.join("benchmarks.svg"), &series(&harvests))?;
    println!("{page}");
    eprintln!(
        "bench: wrote docs/benchmarks.md and docs/benchmarks.svg in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn series(harvests: &[Harvest]) -> Vec<plot::Series> {
    let points = |ms: fn(&Harvest) -> Option<f64>| -> Vec<(f64, f64)> {
        harvests.iter().filter_map(|h| Some((h.fds as f64, ms(h)?))).collect()
    };
    vec![
        plot::Series { name: "BPF (crd)", color: plot::BPF, points: points(Harvest::bpf) },
        plot::Series { name: "procfs (crd)", color: plot::PROCFS, points: points(Harvest::procfs) },
        plot::Series { name: "lsof -n -P", color: plot::LSOF, points: points(Harvest::lsof) },
    ]
}

/// One harvest workload: in each repetition BPF, procfs and lsof, one after the other.
fn harvest(
    crd: &Path,
    scratch: &Scratch,
    processes: usize,
    wiring: Wiring,
    reps: Repetitions,
) -> Result<Harvest> {
    let workload = Workload::spawn(processes, wiring)?;
    let pids: Vec<String> = workload.pids.iter().map(i32::to_string).collect();
    let mut row = Harvest { processes, fds_per_process: wiring.fds_per_process(), ..Harvest::default() };
    let mut ls_phases = Vec::new();
    let expected = (processes * wiring.fds_per_process()) as u64;
    for _ in 0..reps.harvest {
        for (source, runs) in [("bpf", reps.bpf_runs), ("procfs", reps.procfs_runs)] {
            let measured = scratch.run(
                Command::new(crd)
                    .args(["bench-harvest", "--source", source, "--runs"])
                    .arg(runs.to_string())
                    .args(&pids),
                &[0],
            )?;
            let runs = measure::parse_harvest(&measured.stdout).with_context(|| {
                format!("crd bench-harvest --source {source} printed {:?}", measured.stdout)
            })?;
            if runs.fds < expected || runs.processes != processes as u64 {
                bail!(
                    "crd bench-harvest --source {source} saw {} processes and {} fds, not {processes} and {expected}",
                    runs.processes,
                    runs.fds
                );
            }
            row.fds = runs.fds;
            let ms = median(&runs.runs_ms).unwrap_or(f64::NAN);
            if source == "bpf" {
                row.bpf_ms.push(ms);
                row.load_ms.push(runs.load_ms);
                if let Some(floor) = median(&runs.floor_ms) {
                    row.floor_ms.push(floor);
                }
                row.rss_bytes.push(measured.max_rss);
            } else {
                row.procfs_ms.push(ms);
            }
        }
        let lsof = scratch.run(Command::new("lsof").args(["-n", "-P", "-p", &pids.join(",")]), &[0, 1])?;
        // One line per fd (plus cwd, txt, maps and the header): fewer means lsof missed some.
        let lines = lsof.lines;
        if lines < expected {
            bail!("lsof listed {lines} lines for {expected} fds");
        }
        row.lsof_ms.push(lsof.wall_ms());
        // Whole commands over the whole machine, as a user runs them.
        let ls = |args: &[&str]| scratch.run(Command::new(crd).arg("ls").arg("--all").args(args), &[0]);
        let table = ls(&[])?;
        let json = ls(&["--json"])?;
        if table.lines < expected {
            bail!("crd ls --all listed {} lines for {expected} fds", table.lines);
        }
        row.ls_all_ms.push(table.wall_ms());
        ls_phases.push(table.timings);
        row.ls_all_json_ms.push(json.wall_ms());
        row.ls_all_rss.push(table.max_rss.max(json.max_rss));
        row.ls_all_procfs_ms.push(ls(&["--source", "procfs"])?.wall_ms());
        row.lsof_all_ms.push(scratch.run(Command::new("lsof").args(["-n", "-P"]), &[0, 1])?.wall_ms());
    }
    drop(workload);
    check_interrupted()?;
    row.ls_all_phases = phase_medians(&ls_phases);
    Ok(row)
}

/// One process of pipes or sockets: its BPF harvest and `crd ls` (on one workload),
/// then `crd checkpoint` and, unless `no_restore` says why not, `crd restore` (on
/// another).
fn socket_row(
    crd: &Path,
    scratch: &Scratch,
    name: String,
    wiring: Wiring,
    no_restore: Option<&'static str>,
    reps: Repetitions,
) -> Result<SocketRow> {
    let workload = Workload::spawn(1, wiring)?;
    let pid = workload.root().to_string();
    let expected = wiring.fds_per_process() as u64;
    let mut row = SocketRow { name, fds: expected, no_restore, ..SocketRow::default() };
    for _ in 0..reps.harvest {
        let measured = scratch.run(
            Command::new(crd)
                .args(["bench-harvest", "--source", "bpf", "--runs"])
                .arg(reps.bpf_runs.to_string())
                .arg(&pid),
            &[0],
        )?;
        let runs = measure::parse_harvest(&measured.stdout)
            .with_context(|| format!("crd bench-harvest printed {:?}", measured.stdout))?;
        if runs.fds < expected {
            bail!("crd bench-harvest saw {} fds, not {expected}", runs.fds);
        }
        row.harvest_ms.push(median(&runs.runs_ms).unwrap_or(f64::NAN));
        if let Some(floor) = median(&runs.floor_ms) {
            row.floor_ms.push(floor);
        }
        let ls = scratch.run(Command::new(crd).arg("ls").arg(&pid), &[0])?;
        // One line per fd, and a header: fewer means ls missed some.
        if ls.lines < expected {
            bail!("crd ls listed {} lines for {expected} fds", ls.lines);
        }
        row.ls_ms.push(ls.wall_ms());
        row.ls_rss.push(ls.max_rss);
    }
    drop(workload);
    check_interrupted()?;
    row.checkpoint = checkpoint(crd, scratch, 1, wiring, no_restore.is_none(), reps.checkpoint)?;
    Ok(row)
}

/// Checkpoints (and restores) one workload `repetitions` times.
fn checkpoint(
    crd: &Path,
    scratch: &Scratch,
    processes: usize,
    wiring: Wiring,
    mut restore: bool,
    repetitions: usize,
) -> Result<Checkpoint> {
    let workload = Workload::spawn(processes, wiring)?;
    let image = scratch.path("bench.img");
    let mut row = Checkpoint {
        fds: (processes * wiring.fds_per_process()) as u64,
        queued_bytes: wiring.queued_bytes(processes),
        ..Checkpoint::default()
    };
    let (mut checkpoint_phases, mut restore_phases) = (Vec::new(), Vec::new());
    for _ in 0..repetitions {
        let _ = fs::remove_file(&image);
        let done = scratch.run(
            Command::new(crd)
                .arg("checkpoint")
                .arg(workload.root().to_string())
                .arg("--tree")
                .arg("-o")
                .arg(&image),
            &[0],
        )?;
        row.checkpoint_ms.push(done.wall_ms());
        let load = done.timings.get("load_ms").copied().unwrap_or(0.0);
        if let Some(total) = done.timings.get("total_ms") {
            row.checkpoint_work_ms.push(total - load);
        }
        row.checkpoint_rss.push(done.max_rss);
        row.image_bytes = measure::size(&image);
        checkpoint_phases.push(done.timings);
        if restore {
            let pid_file = scratch.path("restore.pid");
            let restored = scratch
                .run(Command::new(crd).arg("restore").arg(&image).arg("--pid-file").arg(&pid_file), &[0]);
            // The stubs outlive crd: kill them whatever happened, before the next run.
            let stubs = restored.as_ref().map(|r| measure::parse_restored(&r.stdout)).unwrap_or_default();
            let stub_root = fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<i32>().ok());
            let _ = fs::remove_file(&pid_file);
            kill_and_reap(&stubs.iter().copied().chain(stub_root).collect::<Vec<_>>());
            let restored = match restored {
                Ok(r) if stubs.len() >= processes => r,
                Ok(_) => bail!("crd restore reported {} stubs for {processes} processes", stubs.len()),
                Err(e) => {
                    check_interrupted()?;
                    eprintln!("bench: {e:#}");
                    let said = e.downcast_ref::<measure::Failed>().map(|f| f.stderr.clone());
                    row.restore_error = Some(said.unwrap_or_else(|| format!("{e:#}")));
                    restore = false;
                    continue;
                }
            };
            row.restore_ms.push(restored.wall_ms());
            row.restore_rss.push(restored.max_rss);
            restore_phases.push(restored.timings);
        }
    }
    drop(workload);
    check_interrupted()?;
    row.checkpoint_phases = phase_medians(&checkpoint_phases);
    row.restore_phases = phase_medians(&restore_phases);
    Ok(row)
}

/// The median of each phase over the runs, in crd's own (alphabetical: a JSON map)
/// order with `total_ms` last.
fn phase_medians(runs: &[std::collections::BTreeMap<String, f64>]) -> Vec<(String, f64)> {
    let mut names: Vec<&String> = runs.iter().flat_map(|r| r.keys()).collect();
    names.sort_by_key(|n| (n.as_str() == "total_ms", phase_rank(n), n.as_str()));
    names.dedup();
    names
        .into_iter()
        .filter_map(|name| {
            let samples: Vec<f64> = runs.iter().filter_map(|r| r.get(name).copied()).collect();
            Some((name.clone(), median(&samples)?))
        })
        .collect()
}

/// The order phases happen in, for the known ones; unknown ones go after them.
fn phase_rank(name: &str) -> usize {
    const ORDER: [&str; 10] = [
        "load_ms",
        "freeze_ms",
        "harvest_ms",
        "extras_ms",
        "graph_ms",
        "listing_ms",
        "write_ms",
        "read_ms",
        "plan_ms",
        "restore_ms",
    ];
    ORDER.iter().position(|n| *n == name).unwrap_or(ORDER.len())
}

fn machine(root: &Path) -> Machine {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory_kib: f64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let git = |args: &[&str]| {
        crate::output(Command::new("git").args(args).current_dir(root))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let mut commit = git(&["rev-parse", "--short", "HEAD"]);
    if !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty() {
        commit.push_str(" with uncommitted changes");
    }
    let date = crate::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu,
        memory_gib: memory_kib / (1024.0 * 1024.0),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        date,
        commit,
    }
}

/// Refuses to start a bench that could not finish: it needs root (BPF, ptrace).
pub fn preflight() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("cargo xtask bench needs root (crd loads BPF programs and freezes processes)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn phases_in_pipeline_order_with_total_last() {
        let run = |load: f64| {
            BTreeMap::from([
                ("write_ms".to_string(), 1.0),
                ("total_ms".to_string(), 10.0 + load),
                ("load_ms".to_string(), load),
                ("zeta_ms".to_string(), 0.5),
                ("harvest_ms".to_string(), 2.0),
            ])
        };
        let phases = phase_medians(&[run(1.0), run(3.0), run(2.0)]);
        let names: Vec<&str> = phases.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["load_ms", "harvest_ms", "write_ms", "zeta_ms", "total_ms"]);
        assert_eq!(phases[0].1, 2.0);
        assert_eq!(phases[4].1, 12.0);
    }
}
