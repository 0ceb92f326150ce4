//! What the benchmark measured, the targets judged against it, and the
//! markdown page (`docs/benchmarks.md`) that shows both.
//!
//! Pure data and formatting, so the verdicts and the page are unit-tested without
//! running anything.
use std::fmt::Write as _;

use super::stats::{median, median_ratio};

/// Where the numbers were taken: they mean little without it.
#[derive(Clone, Debug)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub date: String,
    pub commit: String,
}

/// One harvest workload: P processes × F pipe fds, each harvester run on the very same
/// processes, repetition by repetition (index i of every vector is repetition i).
#[derive(Clone, Debug, Default)]
pub struct Harvest {
    pub processes: usize,
    pub fds_per_process: usize,
    /// fds crd found (all of them pipe ends).
    pub fds: u64,
    pub bpf_ms: Vec<f64>,
    pub procfs_ms: Vec<f64>,
    pub lsof_ms: Vec<f64>,
    /// Loading and attaching the BPF programs, once per crd run.
    pub load_ms: Vec<f64>,
    /// The floor: the fd program run over the same fds with no process asked for (it
    /// returns at its first check), median per repetition.
    pub floor_ms: Vec<f64>,
    /// Peak RSS of the `crd bench-harvest --source bpf` processes.
    pub rss_bytes: Vec<u64>,
    /// Whole commands over the whole machine (fork to exit): `crd ls --all`, with
    /// `--json`, with `--source procfs`, and `lsof -n -P`.
    pub ls_all_ms: Vec<f64>,
    pub ls_all_json_ms: Vec<f64>,
    pub ls_all_procfs_ms: Vec<f64>,
    pub lsof_all_ms: Vec<f64>,
    /// Peak RSS of the two BPF `crd ls --all` commands.
    pub ls_all_rss: Vec<u64>,
    /// Median ms of each phase of `crd ls --all` (the table), as crd reports them.
    pub ls_all_phases: Vec<(String, f64)>,
}

impl Harvest {
    /// lsof's whole command over crd's (`ls --all`, the slower of table and JSON),
    /// repetition by repetition.
    fn ls_lsof_ratio(&self) -> Option<f64> {
        let crd: Vec<f64> = self.ls_all_ms.iter().zip(&self.ls_all_json_ms).map(|(a, b)| a.max(*b)).collect();
        median(&self.lsof_all_ms.iter().zip(&crd).map(|(l, c)| l / c).collect::<Vec<_>>())
    }
    fn ls_procfs_ratio(&self) -> Option<f64> {
        let crd: Vec<f64> = self.ls_all_ms.iter().zip(&self.ls_all_json_ms).map(|(a, b)| a.max(*b)).collect();
        median(&self.ls_all_procfs_ms.iter().zip(&crd).map(|(p, c)| p / c).collect::<Vec<_>>())
    }

    pub fn label(&self) -> String {
        format!("{} × {}", thousands(self.processes as u64), thousands(self.fds_per_process as u64))
    }

    fn ns_per_fd(&self, ms: Option<f64>) -> Option<f64> {
        ms.filter(|_| self.fds > 0).map(|ms| ms * 1e6 / self.fds as f64)
    }

    pub fn bpf(&self) -> Option<f64> {
        median(&self.bpf_ms)
    }
    pub fn procfs(&self) -> Option<f64> {
        median(&self.procfs_ms)
    }
    pub fn lsof(&self) -> Option<f64> {
        median(&self.lsof_ms)
    }
    pub fn bpf_ns_per_fd(&self) -> Option<f64> {
        self.ns_per_fd(self.bpf())
    }
    /// How many times slower crd's /proc harvester was, paired by repetition.
    pub fn procfs_ratio(&self) -> Option<f64> {
        median_ratio(&self.procfs_ms, &self.bpf_ms)
    }
    pub fn lsof_ratio(&self) -> Option<f64> {
        median_ratio(&self.lsof_ms, &self.bpf_ms)
    }
}

/// CRIU 4.2's times for the same workload (from the issue), for reference.
#[derive(Clone, Copy, Debug)]
pub struct Criu {
    pub dump_s: f64,
    pub restore_s: f64,
}

/// `crd checkpoint` (and `crd restore` of its image) of one workload.
#[derive(Clone, Debug, Default)]
pub struct Checkpoint {
    pub name: String,
    pub fds: u64,
    /// Bytes queued in the workload's pipes (they are in the image, byte for byte).
    pub queued_bytes: u64,
    pub image_bytes: u64,
    /// The whole `crd checkpoint` command, fork to exit.
    pub checkpoint_ms: Vec<f64>,
    /// crd's own total minus its BPF load: the work a long-lived crd would do.
    pub checkpoint_work_ms: Vec<f64>,
    /// The whole `crd restore` command, until every stub holds its fds. Empty when
    /// the workload is not restored.
    pub restore_ms: Vec<f64>,
    pub checkpoint_rss: Vec<u64>,
    pub restore_rss: Vec<u64>,
    /// Median milliseconds per phase, as crd reported them (`CRD_TIMINGS_FILE`).
    pub checkpoint_phases: Vec<(String, f64)>,
    pub restore_phases: Vec<(String, f64)>,
    /// Why a restore failed: the page says so rather than losing every other row.
    pub restore_error: Option<String>,
    pub criu: Option<Criu>,
}

impl Checkpoint {
    /// Image bytes per fd, not counting the queued pipe data the image carries.
    pub fn bytes_per_fd(&self) -> Option<f64> {
        (self.fds > 0 && self.image_bytes > 0)
            .then(|| self.image_bytes.saturating_sub(self.queued_bytes) as f64 / self.fds as f64)
    }
    fn peak_rss(&self) -> Option<u64> {
        self.checkpoint_rss.iter().chain(&self.restore_rss).copied().max()
    }
}

/// One process holding pipes, unix socketpairs or TCP connections (both ends of each):
/// the BPF harvest, `crd ls` and `crd checkpoint` (and `crd restore`) of it.
#[derive(Clone, Debug, Default)]
pub struct SocketRow {
    pub name: String,
    pub fds: u64,
    /// Median of each repetition's BPF harvests.
    pub harvest_ms: Vec<f64>,
    /// Median of each repetition's floor runs (see [`Harvest::floor_ms`]).
    pub floor_ms: Vec<f64>,
    /// The whole `crd ls PID` command.
    pub ls_ms: Vec<f64>,
    pub ls_rss: Vec<u64>,
    pub checkpoint: Checkpoint,
    /// Why restore is not measured (None: it is).
    pub no_restore: Option<&'static str>,
}

impl SocketRow {
    pub fn ns_per_fd(&self) -> Option<f64> {
        median(&self.harvest_ms).filter(|_| self.fds > 0).map(|ms| ms * 1e6 / self.fds as f64)
    }
    fn floor_ns_per_fd(&self) -> Option<f64> {
        median(&self.floor_ms).filter(|_| self.fds > 0).map(|ms| ms * 1e6 / self.fds as f64)
    }
    fn peak_rss(&self) -> Option<u64> {
        self.ls_rss.iter().copied().chain(self.checkpoint.peak_rss()).max()
    }
}

/// The pipe row the socket rows are compared with (shared with the driver).
pub const SOCKET_BASELINE: &str = "pipes";

/// Which checkpoint rows the targets read: names are shared with the driver.
/// One request through `crd serve` against crd alone.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceRow {
    pub name: String,
    pub fds: u64,
    /// Request line sent to final reply read.
    pub served_ms: Vec<f64>,
    /// The same command by crd alone: fork to exit, BPF load included.
    pub alone_ms: Vec<f64>,
}

/// The service targets: checkpoint of 9,000 pipes < 15 ms, ls --all at 100,000
/// fds < 60 ms, request to reply.
pub fn service_verdicts(rows: &[ServiceRow]) -> Vec<Verdict> {
    rows.iter()
        .filter_map(|r| {
            let limit = if r.name.starts_with("checkpoint") {
                15.0
            } else if r.name.starts_with("ls --all") {
                60.0
            } else {
                return None;
            };
            Some(verdict(
                format!("{} through the service < {limit:.0} ms, request to reply", r.name),
                median(&r.served_ms),
                |v| format!("{v:.1} ms"),
                |v| v < limit,
            ))
        })
        .collect()
}

fn service_table(w: &mut String, rows: &[ServiceRow]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(w, "\n## Service\n");
    let _ = writeln!(
        w,
        "Requests to `crd serve` (docs/service.md), timed from the request line sent to the \
         reply read, on one connection to a service that loaded its BPF programs when it \
         started; against the same command by crd alone (fork to exit, BPF load included).\n"
    );
    let _ = writeln!(w, "| request | fds | through the service ms | crd alone ms | alone/service |");
    let _ = writeln!(w, "|---|--:|--:|--:|--:|");
    for r in rows {
        let (served, alone) = (median(&r.served_ms), median(&r.alone_ms));
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} |",
            r.name,
            thousands(r.fds),
            ms(served),
            ms(alone),
            ratio(alone.zip(served).map(|(a, s)| a / s)),
        );
    }
}

pub const PIPES_9000: &str = "1 process × 9,000 pipes";
pub const TREE_50: &str = "tree of 50 × 100 pipes";
pub const TREE_100K: &str = "tree of 100 × 500 pipes";

/// One target of the issue and how this run did against it.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub target: String,
    pub measured: String,
    /// `None`: the run has no measurement for it (a row failed or was skipped).
    pub met: Option<bool>,
}

fn verdict(
    target: String,
    value: Option<f64>,
    show: impl Fn(f64) -> String,
    ok: impl Fn(f64) -> bool,
) -> Verdict {
    Verdict { target, measured: value.map(&show).unwrap_or_else(|| "—".into()), met: value.map(ok) }
}

/// Socket harvests against pipes': ns per fd within 1.5× of the pipe row's.
pub fn socket_verdicts(rows: &[SocketRow]) -> Vec<Verdict> {
    let pipes = rows.iter().find(|r| r.name.starts_with(SOCKET_BASELINE)).and_then(SocketRow::ns_per_fd);
    rows.iter()
        .filter(|r| !r.name.starts_with(SOCKET_BASELINE))
        .map(|r| {
            verdict(
                format!("BPF harvest ns/fd of the {} within 1.5× of pipes'", r.name),
                r.ns_per_fd().zip(pipes).map(|(s, p)| s / p),
                |x| format!("{x:.2}×"),
                |x| x <= 1.5,
            )
        })
        .collect()
}

/// The targets, judged on this run.
pub fn verdicts(harvests: &[Harvest], checkpoints: &[Checkpoint]) -> Vec<Verdict> {
    let mut out = Vec::new();
    let at_100k: Vec<&Harvest> = harvests.iter().filter(|h| h.fds >= 90_000).collect();
    for h in &at_100k {
        let label = h.label();
        out.push(verdict(
            format!("BPF harvest ≥ 20× faster than procfs ({label})"),
            h.procfs_ratio(),
            |r| format!("{r:.1}×"),
            |r| r >= 20.0,
        ));
        out.push(verdict(
            format!("BPF harvest ≥ 20× faster than lsof ({label})"),
            h.lsof_ratio(),
            |r| format!("{r:.1}×"),
            |r| r >= 20.0,
        ));
        out.push(verdict(
            format!("`crd ls --all` (and `--json`) ≥ 20× faster than `lsof -n -P`, whole commands ({label})"),
            h.ls_lsof_ratio(),
            |r| format!("{r:.1}×"),
            |r| r >= 20.0,
        ));
        out.push(verdict(
            format!("`crd ls --all` ≥ 20× faster than `crd ls --all --source procfs` ({label})"),
            h.ls_procfs_ratio(),
            |r| format!("{r:.1}×"),
            |r| r >= 20.0,
        ));
        out.push(verdict(
            format!("`crd ls --all` peak RSS < 64 MiB ({label})"),
            h.ls_all_rss.iter().copied().max().map(|b| b as f64),
            |b| format!("{:.1} MiB", b / (1024.0 * 1024.0)),
            |b| b < 64.0 * 1024.0 * 1024.0,
        ));
        out.push(verdict(
            format!("BPF harvest < 300 ns per fd ({label})"),
            h.bpf_ns_per_fd(),
            |ns| format!("{ns:.0} ns/fd"),
            |ns| ns < 300.0,
        ));
    }
    // Linear growth: the same shape of process (1,000 fds), 10 times as many.
    let per_fd = |p: usize| {
        harvests
            .iter()
            .find(|h| h.processes == p && h.fds_per_process == 1000)
            .and_then(Harvest::bpf_ns_per_fd)
    };
    let growth = per_fd(100).zip(per_fd(10)).map(|(big, small)| big / small);
    out.push(verdict(
        "BPF ns/fd at 100,000 fds within 1.5× of ns/fd at 10,000 (100 × 1,000 vs 10 × 1,000)".into(),
        growth,
        |g| format!("{g:.2}×"),
        |g| g <= 1.5,
    ));
    for name in [PIPES_9000, TREE_50] {
        let row = checkpoints.iter().find(|c| c.name == name);
        out.push(verdict(
            format!("checkpoint of the {name} < 50 ms (whole command)"),
            row.and_then(|c| median(&c.checkpoint_ms)),
            |ms| format!("{ms:.1} ms"),
            |ms| ms < 50.0,
        ));
        let restore = format!("restore of the {name} < 100 ms (whole command)");
        match row.filter(|c| c.restore_error.is_some()) {
            Some(_) => out.push(Verdict { target: restore, measured: "failed".into(), met: Some(false) }),
            None => out.push(verdict(
                restore,
                row.and_then(|c| median(&c.restore_ms)),
                |ms| format!("{ms:.1} ms"),
                |ms| ms < 100.0,
            )),
        }
    }
    let big = checkpoints.iter().find(|c| c.name == TREE_100K);
    out.push(verdict(
        format!("peak RSS < 64 MiB at 100,000 fds (checkpoint of the {TREE_100K})"),
        big.and_then(Checkpoint::peak_rss).map(|b| b as f64),
        |b| mib(b as u64),
        |b| b < 64.0 * 1024.0 * 1024.0,
    ));
    for c in checkpoints {
        out.push(verdict(
            format!("image ≤ 64 bytes per fd plus queued bytes ({})", c.name),
            c.bytes_per_fd(),
            |b| format!("{b:.1} B/fd"),
            |b| b <= 64.0,
        ));
    }
    out
}

/// `12345` → `12,345`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Milliseconds with as many decimals as carry meaning at that size.
pub fn ms(value: Option<f64>) -> String {
    match value {
        None => "—".into(),
        Some(v) if v < 10.0 => format!("{v:.2}"),
        Some(v) if v < 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
    }
}

fn ns(value: Option<f64>) -> String {
    value.map_or("—".into(), |v| format!("{v:.0}"))
}

fn ratio(value: Option<f64>) -> String {
    value.map_or("—".into(), |v| format!("{v:.1}×"))
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn mib_of(samples: &[u64]) -> String {
    samples.iter().copied().max().map_or("—".into(), mib)
}

/// The page: machine, harvest table, checkpoint/restore tables, targets.
pub fn render(
    machine: &Machine,
    harvests: &[Harvest],
    checkpoints: &[Checkpoint],
    sockets: &[SocketRow],
    service: &[ServiceRow],
    repetitions: &str,
) -> String {
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Written by `cargo xtask bench` (release build); rerun it to refresh this page. What has \
         been tried to make these faster, and where the floors are: [performance.md](performance.md).\n"
    );
    let _ = writeln!(
        w,
        "Machine: {} cores ({}), {:.0} GiB, kernel {}; {}; crd {}.\n",
        machine.cores, machine.cpu, machine.memory_gib, machine.kernel, machine.date, machine.commit
    );
    let _ = writeln!(
        w,
        "Every workload is made of real processes the bench forks and wires itself (pipes, \
         never files); each figure is the median of {repetitions}. Ratios are taken within each \
         repetition (BPF and the other harvester on the same processes, seconds apart), then \
         their median.\n"
    );
    let _ = writeln!(w, "## Harvest\n");
    let _ = writeln!(
        w,
        "P processes × F pipe fds, read without freezing them. **BPF**: `crd bench-harvest \
         --source bpf`, the iterator programs loaded once (load time in its own column); \
         **procfs**: crd's /proc harvester (`--source procfs`); **lsof**: the whole \
         `lsof -n -P -p PID,...` command. Peak RSS is that of the BPF crd process. \
         *Floor*: crd's fd program run over the same fds with no process asked for, so \
         that it returns at its first check: the kernel's walk (a reference taken and \
         dropped on each file), a program call and one map look-up per fd, what a harvest \
         costs before it reads anything. From 6.2 on the fd program is the walk of each fd \
         table from the task iterator (`crd_task_walk`), which returns before its walk: \
         the column is then ~0 (the walk's own floor, ~15 ns per fd, is in \
         [performance.md](performance.md)). Up to 64 processes are iterated each alone \
         (6.1+); more, in one run over every task on the machine.\n"
    );
    let _ = writeln!(w, "![harvest time per workload size](benchmarks.svg)\n");
    let _ = writeln!(
        w,
        "| workload | fds | BPF ms | ns/fd | floor ns/fd | procfs ms | ns/fd | lsof ms | ns/fd | procfs/BPF | lsof/BPF | BPF load ms | crd peak RSS |"
    );
    let _ = writeln!(w, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for h in harvests {
        let per_fd = |v: Option<f64>| ns(h.ns_per_fd(v));
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            h.label(),
            thousands(h.fds),
            ms(h.bpf()),
            per_fd(h.bpf()),
            per_fd(median(&h.floor_ms)),
            ms(h.procfs()),
            per_fd(h.procfs()),
            ms(h.lsof()),
            per_fd(h.lsof()),
            ratio(h.procfs_ratio()),
            ratio(h.lsof_ratio()),
            ms(median(&h.load_ms)),
            mib_of(&h.rss_bytes),
        );
    }
    if harvests.iter().any(|h| !h.ls_all_ms.is_empty()) {
        let _ = writeln!(
            w,
            "\nWhole commands over the whole machine, fork to exit, as a user runs them (BPF load, \
             graph and output included): `crd ls --all` (the table and `--json`), \
             `crd ls --all --source procfs`, and `lsof -n -P`. The ratios take the slower of crd's \
             table and JSON. Peak RSS is that of crd's BPF commands.\n"
        );
        let _ = writeln!(
            w,
            "| workload | ls --all ms | ls --all --json ms | peak RSS | --source procfs ms | lsof -n -P ms | lsof/crd | procfs/crd |"
        );
        let _ = writeln!(w, "|---|--:|--:|--:|--:|--:|--:|--:|");
        for h in harvests.iter().filter(|h| !h.ls_all_ms.is_empty()) {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                h.label(),
                ms(median(&h.ls_all_ms)),
                ms(median(&h.ls_all_json_ms)),
                mib_of(&h.ls_all_rss),
                ms(median(&h.ls_all_procfs_ms)),
                ms(median(&h.lsof_all_ms)),
                ratio(h.ls_lsof_ratio()),
                ratio(h.ls_procfs_ratio()),
            );
        }
        phase_table(
            w,
            "Where `crd ls --all` (the table) spends its time (median ms per phase; *listing*: \
             the rows and sections built from the graph, *write*: formatted and written)",
            harvests,
            Harvest::label,
            |h| &h.ls_all_phases,
        );
    }
    let _ = writeln!(w, "\n## Checkpoint and restore\n");
    let _ = writeln!(
        w,
        "`crd checkpoint --tree` and `crd restore` of its image (until every stub holds its \
         fds). The targets are judged on the whole command (fork to exit, BPF load \
         included); *without load* is crd's own total minus loading the BPF programs. \
         The tree's pipes link neighbours (process c holds the read ends of its 100 pipes \
         and the write ends of process c+1's), one in ten holds 4 KiB of queued data. \
         Peak RSS is the larger of checkpoint and restore.\n"
    );
    let _ = writeln!(
        w,
        "| workload | fds | checkpoint ms | without load ms | restore ms | peak RSS | image bytes | bytes/fd (excl. queued) | CRIU 4.2 dump / restore |"
    );
    let _ = writeln!(w, "|---|--:|--:|--:|--:|--:|--:|--:|--:|");
    for c in checkpoints {
        let criu = c.criu.map_or("—".into(), |c| format!("{:.2} s / {:.1} s", c.dump_s, c.restore_s));
        let restore = match (&c.restore_error, c.restore_ms.is_empty()) {
            (Some(_), _) => "**failed**".into(),
            (None, true) => "not run".into(),
            (None, false) => ms(median(&c.restore_ms)),
        };
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.name,
            thousands(c.fds),
            ms(median(&c.checkpoint_ms)),
            ms(median(&c.checkpoint_work_ms)),
            restore,
            c.peak_rss().map_or("—".into(), mib),
            thousands(c.image_bytes),
            c.bytes_per_fd().map_or("—".into(), |b| format!("{b:.1}")),
            criu,
        );
    }
    for c in checkpoints {
        if let Some(error) = &c.restore_error {
            let _ = writeln!(w, "\nRestore of the {} failed: `{}`", c.name, error.replace('`', "'"));
        }
    }
    phase_table(w, "Where `crd checkpoint` spends its time (median ms per phase)", checkpoints, name, |c| {
        &c.checkpoint_phases
    });
    phase_table(w, "Where `crd restore` spends its time (median ms per phase)", checkpoints, name, |c| {
        &c.restore_phases
    });
    socket_table(w, sockets);
    service_table(w, service);
    let _ = writeln!(w, "\n## Targets\n");
    let _ = writeln!(w, "| target | measured | verdict |");
    let _ = writeln!(w, "|---|--:|---|");
    for v in verdicts(harvests, checkpoints)
        .into_iter()
        .chain(socket_verdicts(sockets))
        .chain(service_verdicts(service))
    {
        let verdict = match v.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not measured",
        };
        let _ = writeln!(w, "| {} | {} | {} |", v.target, v.measured, verdict);
    }
    md
}

fn socket_table(w: &mut String, rows: &[SocketRow]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(w, "\n## Sockets\n");
    let _ = writeln!(
        w,
        "One process holding both ends of N unix stream socketpairs, or of N TCP connections \
         over 127.0.0.1 (in a network namespace the bench makes, loopback up), against one \
         holding N pipes: the same 2N fds. N is 10,000 where the hard `RLIMIT_NOFILE` leaves \
         room for 2N fds and 2,000 more for crd (the bench raises it when it may: root with \
         CAP_SYS_RESOURCE), else the largest whole thousand that fits. *Harvest* is `crd bench-harvest --source bpf` \
         (programs loaded once); *ls*, *checkpoint* and *restore* are whole commands (fork \
         to exit, BPF load included). A socket costs more than a pipe at checkpoint: crd \
         copies each one into itself (`pidfd_getfd`) to read its options, names and queue \
         while the target is frozen. Restore of established TCP connections is refused \
         unless checkpointed with `--tcp-established` (the bench does not), so the TCP row has none. Peak RSS \
         is the largest of ls, checkpoint and restore. *Floor* as in the harvest table: \
         the same for a socket as for a pipe; what a socket adds above it is reading its \
         `struct socket` and three or four cache lines of its `sock` (family and state; type \
         and shutdown; a unix socket's bound address and peer), each a miss on a socket \
         not touched since it was made.\n"
    );
    let _ = writeln!(
        w,
        "| workload | fds | harvest ms | ns/fd | floor ns/fd | vs pipes | ls ms | checkpoint ms | restore ms | peak RSS | image bytes/fd |"
    );
    let _ = writeln!(w, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let pipes = rows.iter().find(|r| r.name.starts_with(SOCKET_BASELINE)).and_then(SocketRow::ns_per_fd);
    for r in rows {
        let c = &r.checkpoint;
        let restore = match (r.no_restore, &c.restore_error) {
            (Some(why), _) => why.to_string(),
            (None, Some(_)) => "**failed**".into(),
            (None, None) => ms(median(&c.restore_ms)),
        };
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            thousands(r.fds),
            ms(median(&r.harvest_ms)),
            ns(r.ns_per_fd()),
            ns(r.floor_ns_per_fd()),
            r.ns_per_fd().zip(pipes).map_or("—".into(), |(s, p)| format!("{:.2}×", s / p)),
            ms(median(&r.ls_ms)),
            ms(median(&c.checkpoint_ms)),
            restore,
            r.peak_rss().map_or("—".into(), mib),
            c.bytes_per_fd().map_or("—".into(), |b| format!("{b:.1}")),
        );
    }
    for r in rows {
        if let Some(error) = &r.checkpoint.restore_error {
            let _ = writeln!(w, "\nRestore of the {} failed: `{}`", r.name, error.replace('`', "'"));
        }
    }
    let named: Vec<Checkpoint> =
        rows.iter().map(|r| Checkpoint { name: r.name.clone(), ..r.checkpoint.clone() }).collect();
    phase_table(
        w,
        "Where `crd checkpoint` spends its time on them (median ms per phase)",
        &named,
        name,
        |c| &c.checkpoint_phases,
    );
}

/// A checkpoint row's workload name.
fn name(c: &Checkpoint) -> String {
    c.name.clone()
}

/// One column per phase name, in the order crd first reported them.
fn phase_table<T>(
    w: &mut String,
    title: &str,
    rows: &[T],
    label: impl Fn(&T) -> String,
    phases: impl Fn(&T) -> &Vec<(String, f64)>,
) {
    let mut names: Vec<&str> = Vec::new();
    for row in rows {
        for (name, _) in phases(row) {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    if names.is_empty() {
        return;
    }
    let _ = writeln!(w, "\n{title}:\n");
    let header: Vec<String> = names.iter().map(|n| n.trim_end_matches("_ms").replace('_', " ")).collect();
    let _ = writeln!(w, "| workload | {} |", header.join(" | "));
    let _ = writeln!(w, "|---|{}", "--:|".repeat(names.len()));
    for row in rows.iter().filter(|r| !phases(r).is_empty()) {
        let cells: Vec<String> = names
            .iter()
            .map(|n| ms(phases(row).iter().find(|(name, _)| name == n).map(|(_, v)| *v)))
            .collect();
        let _ = writeln!(w, "| {} | {} |", label(row), cells.join(" | "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn harvest(processes: usize, per: usize, bpf: f64, procfs: f64, lsof: f64) -> Harvest {
        Harvest {
            processes,
            fds_per_process: per,
            fds: (processes * per) as u64,
            bpf_ms: vec![bpf; 3],
            procfs_ms: vec![procfs; 3],
            lsof_ms: vec![lsof; 3],
            load_ms: vec![20.0; 3],
            floor_ms: vec![bpf / 4.0; 3],
            rss_bytes: vec![10 << 20, 12 << 20, 11 << 20],
            ls_all_ms: vec![bpf * 4.0; 3],
            ls_all_json_ms: vec![bpf * 5.0; 3],
            ls_all_procfs_ms: vec![procfs * 2.0; 3],
            lsof_all_ms: vec![lsof * 2.0; 3],
            ls_all_rss: vec![50 << 20, 70 << 20, 60 << 20],
            ls_all_phases: vec![("load_ms".into(), 40.0), ("listing_ms".into(), 12.5)],
        }
    }

    fn checkpoint(name: &str, ckpt: f64, restore: f64, image: u64) -> Checkpoint {
        Checkpoint {
            name: name.into(),
            fds: 10_000,
            queued_bytes: 100_000,
            image_bytes: image,
            checkpoint_ms: vec![ckpt],
            checkpoint_work_ms: vec![ckpt / 2.0],
            restore_ms: vec![restore],
            checkpoint_rss: vec![30 << 20],
            restore_rss: vec![40 << 20],
            checkpoint_phases: vec![("load_ms".into(), 20.0), ("harvest_ms".into(), 3.0)],
            restore_phases: vec![("read_ms".into(), 1.0)],
            restore_error: None,
            criu: None,
        }
    }

    fn find<'a>(verdicts: &'a [Verdict], prefix: &str) -> &'a Verdict {
        verdicts.iter().find(|v| v.target.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix}"))
    }

    #[test]
    fn socket_rows_are_judged_against_the_pipe_row() {
        let row = |name: &str, ms: f64| SocketRow {
            name: name.into(),
            fds: 20_000,
            harvest_ms: vec![ms],
            floor_ms: vec![2.0],
            checkpoint: checkpoint(name, 100.0, 50.0, 1_000_000),
            ..SocketRow::default()
        };
        let mut tcp = row("TCP connections", 40.0);
        tcp.no_restore = Some("refused");
        let rows = [row("pipes", 20.0), row("unix socketpairs", 29.0), tcp];
        let v = socket_verdicts(&rows);
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].met, v[0].measured.as_str()), (Some(true), "1.45×"));
        assert_eq!((v[1].met, v[1].measured.as_str()), (Some(false), "2.00×"));
        let page = render(
            &Machine {
                cores: 1,
                cpu: String::new(),
                memory_gib: 1.0,
                kernel: String::new(),
                date: String::new(),
                commit: String::new(),
            },
            &[],
            &[],
            &rows,
            &[],
            "1",
        );
        assert!(
            page.contains("| unix socketpairs | 20,000 | 29.0 | 1450 | 100 | 1.45× | — | 100 | 50.0 |"),
            "{page}"
        );
        assert!(
            page.contains("| TCP connections | 20,000 | 40.0 | 2000 | 100 | 2.00× | — | 100 | refused |"),
            "{page}"
        );
        assert!(page.contains(
            "| BPF harvest ns/fd of the TCP connections within 1.5× of pipes' | 2.00× | **missed** |"
        ));
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(100_000), "100,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn harvest_targets_met_and_missed() {
        // 100,000 fds: BPF 20 ms = 200 ns/fd; procfs 30× slower, lsof only 10×.
        let rows = [harvest(10, 1000, 1.5, 30.0, 20.0), harvest(100, 1000, 20.0, 600.0, 200.0)];
        let v = verdicts(&rows, &[]);
        assert_eq!(find(&v, "BPF harvest ≥ 20× faster than procfs").met, Some(true));
        assert_eq!(find(&v, "BPF harvest ≥ 20× faster than procfs").measured, "30.0×");
        assert_eq!(find(&v, "BPF harvest ≥ 20× faster than lsof").met, Some(false));
        assert_eq!(find(&v, "BPF harvest < 300 ns").met, Some(true));
        assert_eq!(find(&v, "BPF harvest < 300 ns").measured, "200 ns/fd");
        // 200 ns/fd vs 150 ns/fd: 1.33×, linear enough.
        assert_eq!(find(&v, "BPF ns/fd at 100,000").met, Some(true));
        let worse = [harvest(10, 1000, 1.0, 30.0, 20.0), harvest(100, 1000, 20.0, 600.0, 200.0)];
        assert_eq!(find(&verdicts(&worse, &[]), "BPF ns/fd at 100,000").met, Some(false));
        // Nothing measured at 100,000 fds for the checkpoint targets.
        assert_eq!(find(&v, "peak RSS").met, None);
        assert_eq!(find(&v, "checkpoint of the 1 process").met, None);
    }

    #[test]
    fn checkpoint_targets_on_whole_command_time_and_image_size() {
        let rows = [
            checkpoint(PIPES_9000, 49.0, 101.0, 100_000 + 64 * 10_000),
            checkpoint(TREE_50, 51.0, 99.0, 100_000 + 65 * 10_000),
            checkpoint(TREE_100K, 300.0, 0.0, 1),
        ];
        let v = verdicts(&[], &rows);
        assert_eq!(find(&v, &format!("checkpoint of the {PIPES_9000}")).met, Some(true));
        assert_eq!(find(&v, &format!("restore of the {PIPES_9000}")).met, Some(false));
        assert_eq!(find(&v, &format!("checkpoint of the {TREE_50}")).met, Some(false));
        assert_eq!(find(&v, &format!("restore of the {TREE_50}")).met, Some(true));
        assert_eq!(
            find(&v, &format!("image ≤ 64 bytes per fd plus queued bytes ({PIPES_9000})")).met,
            Some(true)
        );
        assert_eq!(
            find(&v, &format!("image ≤ 64 bytes per fd plus queued bytes ({TREE_50})")).met,
            Some(false)
        );
        let mut failed = rows[1].clone();
        failed.restore_error = Some("pipe2: Too many open files".into());
        let v2 = verdicts(&[], &[failed.clone()]);
        let restore = find(&v2, &format!("restore of the {TREE_50}"));
        assert_eq!((restore.met, restore.measured.as_str()), (Some(false), "failed"));
        let page = render(
            &Machine {
                cores: 1,
                cpu: String::new(),
                memory_gib: 1.0,
                kernel: String::new(),
                date: String::new(),
                commit: String::new(),
            },
            &[],
            &[failed],
            &[],
            &[],
            "1",
        );
        assert!(page.contains("| 51.0 | 25.5 | **failed** |"), "{page}");
        assert!(page.contains(&format!("Restore of the {TREE_50} failed: `pipe2: Too many open files`")));
        let rss = find(&v, "peak RSS");
        assert_eq!((rss.met, rss.measured.as_str()), (Some(true), "40.0 MiB"));
    }

    #[test]
    fn page_has_machine_rows_phases_and_verdicts() {
        let machine = Machine {
            cores: 2,
            cpu: "Test CPU".into(),
            memory_gib: 24.0,
            kernel: "6.18.0".into(),
            date: "2026-01-01".into(),
            commit: "abc1234".into(),
        };
        let page = render(
            &machine,
            &[harvest(100, 1000, 20.0, 600.0, 200.0)],
            &[checkpoint(TREE_50, 51.0, 99.0, 740_000)],
            &[],
            &[
                ServiceRow {
                    name: "checkpoint of 1 process × 9,000 pipes".into(),
                    fds: 18_000,
                    served_ms: vec![12.0, 11.0, 13.0],
                    alone_ms: vec![60.0, 66.0, 55.0],
                },
                ServiceRow {
                    name: "ls --all, 100 × 500 pipes".into(),
                    fds: 100_000,
                    served_ms: vec![70.0],
                    alone_ms: vec![140.0],
                },
            ],
            "5 repetitions",
        );
        assert!(
            page.contains("| checkpoint of 1 process × 9,000 pipes | 18,000 | 12.0 | 60.0 | 5.0× |"),
            "{page}"
        );
        assert!(page.contains("| checkpoint of 1 process × 9,000 pipes through the service < 15 ms, request to reply | 12.0 ms | met |"), "{page}");
        assert!(page.contains("| ls --all, 100 × 500 pipes through the service < 60 ms, request to reply | 70.0 ms | **missed** |"), "{page}");
        assert!(
            page.contains("Machine: 2 cores (Test CPU), 24 GiB, kernel 6.18.0; 2026-01-01; crd abc1234.")
        );
        assert!(page.contains("](benchmarks.svg)"));
        assert!(
            page.contains("| workload | load | listing |\n|---|--:|--:|\n| 100 × 1,000 | 40.0 | 12.5 |"),
            "{page}"
        );
        assert!(
            page.contains(
                "| 100 × 1,000 | 100,000 | 20.0 | 200 | 50 | 600 | 6000 | 200 | 2000 | 30.0× | 10.0× | 20.0 | 12.0 MiB |"
            ),
            "{page}"
        );
        assert!(
            page.contains(&format!(
                "| {TREE_50} | 10,000 | 51.0 | 25.5 | 99.0 | 40.0 MiB | 740,000 | 64.0 | — |"
            )),
            "{page}"
        );
        assert!(page.contains("| workload | load | harvest |"), "{page}");
        assert!(page.contains(&format!("| {TREE_50} | 20.0 | 3.00 |")), "{page}");
        assert!(page.contains(&format!(
            "| checkpoint of the {TREE_50} < 50 ms (whole command) | 51.0 ms | **missed** |"
        )));
        assert!(page.contains("| BPF harvest ≥ 20× faster than lsof (100 × 1,000) | 10.0× | **missed** |"));
        // Whole commands: the slower of table (80) and JSON (100) against lsof (400) and
        // procfs (1,200); the larger peak RSS.
        assert!(
            page.contains("| 100 × 1,000 | 80.0 | 100 | 70.0 MiB | 1200 | 400 | 4.0× | 12.0× |"),
            "{page}"
        );
        assert!(page.contains(
            "| `crd ls --all` (and `--json`) ≥ 20× faster than `lsof -n -P`, whole commands (100 × 1,000) | 4.0× | **missed** |"
        ));
        assert!(
            page.contains("| `crd ls --all` peak RSS < 64 MiB (100 × 1,000) | 70.0 MiB | **missed** |"),
            "{page}"
        );
    }
}
