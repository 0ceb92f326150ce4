//! Restore: graph → stub processes.
//!
//! 1. [`plan`]: which stubs, in which tree, with which fds — checked before anything is
//!    made (unsupported kinds, pipes with an end outside).
//! 2. [`stub`]: crd forks the root stub; each stub drops what it inherited and forks its
//!    children, then waits for the hand-over.
//! 3. [`objects`]: meanwhile crd makes every open file description itself, walking the
//!    graph in order (each through its kind: pipe2 on a pipe's first encounter, the other
//!    end deposited for later), or, for a graft ([`crate::graft`]), takes the live ones
//!    with `pidfd_getfd`, and publishes where they are ([`handover`]: stubs forked first copy an almost empty fd table).
//!    Each stub pulls its descriptions out of crd with `pidfd_getfd`, moves them to
//!    their numbers, starts its threads and reports.
//! 4. All or nothing: if any stub fails, every stub is killed (they die with their
//!    parent until the commit). Otherwise crd closes its own copies and commits (SIGUSR1):
//!    the stubs then outlive crd and wait for SIGTERM/SIGINT, or the root execs `--exec`
//!    ([`exec`]: with its fds inherited, and with `--listen-fds` as systemd socket
//!    activation).
//!
//! Threads: a process's threads all shared one fd table, so each stub is one process
//! with as many threads as the original (they only wait). A process that shared its
//! parent's table (CLONE_FILES) is recreated with CLONE_FILES.
pub mod exec;
mod handover;
pub mod objects;
pub mod plan;
mod stub;

#[cfg(feature = "testing")]
pub use stub::FAIL_STUB_ENV;

use std::{
    io::{BufRead, BufReader},
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    time::{Duration, Instant},
};

use nix::{
    fcntl::OFlag,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::{
        signal::{SigSet, SigmaskHow, Signal, sigprocmask},
        wait::{WaitPidFlag, waitpid},
    },
    unistd::{self, ForkResult},
};

pub use self::exec::{ExecRequest, FdMove};
use self::{
    exec::Exec,
    handover::Handover,
    objects::{ObjectError, ObjectTable},
    plan::{Mode, Plan, PlanError},
};
use crate::{
    graph::Graph,
    kinds::Stubs,
    sys::{self as crd_sys, SyscallError},
    types::{ObjRef, Pid},
};

/// How long the stubs may take to set up before the restore is abandoned.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error("restore failed at {0}; every stub was killed")]
    Stub(String),
    #[error("cannot run {0}; every stub was killed")]
    Exec(String),
    #[error("the stubs did not report within {SETUP_TIMEOUT:?}; every stub was killed")]
    Timeout,
    #[error("interrupted; every stub was killed")]
    Interrupted(#[source] crate::interrupt::Interrupted),
    #[error(transparent)]
    Syscall(#[from] SyscallError),
    #[error("--exec needs a command")]
    NoCommand,
    #[error("the command contains a NUL byte")]
    BadCommand,
}

/// A restored tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// The root stub (or the program it exec'd).
    pub root: Pid,
    /// Every task, old TID → new TID, in the graph's order.
    pub tasks: Vec<(Pid, Pid)>,
    /// With `--exec --listen-fds`: the listening sockets the root stub handed over at
    /// 3, 4, ..., then the fds it moved out of their way; otherwise empty.
    pub moved: Vec<FdMove>,
}

/// Restores an image's graph into stubs.
pub fn restore_image(
    graph: &Graph,
    allow_external: bool,
    exec: Option<ExecRequest<'_>>,
    interrupted: &dyn Fn() -> bool,
) -> Result<Restored, RestoreError> {
    let plan = plan::plan(graph, Mode::Image { allow_external })?;
    let exec = Exec::new(exec)?;
    run(&plan, |publish, stubs| Ok(ObjectTable::recreate(graph, publish, stubs)?), exec.as_ref(), interrupted)
}

/// One stub's report.
struct Report {
    pid: Pid,
    threads: Vec<Pid>,
}

/// Forks the stubs, makes the descriptions (`objects`) and hands them over, waits for
/// the stubs' reports, commits or kills them all.
///
/// Every stub is forked before crd makes any description, and writes its PID into the
/// hand-over as the first thing it does, before its children and its fds: so `objects`
/// can open a pidfd on the stub standing for a task ([`Stubs`]) at that pidfd's place in
/// the walk, waiting at most for that stub to start, never for anything it pulls.
pub(crate) fn run(
    plan: &Plan,
    objects: impl FnOnce(&mut dyn FnMut(ObjRef, RawFd), Stubs<'_>) -> Result<ObjectTable, RestoreError>,
    exec: Option<&Exec>,
    interrupted: &dyn Fn() -> bool,
) -> Result<Restored, RestoreError> {
    for warning in &plan.warnings {
        log::warn!("{warning}");
    }
    let me = unistd::getpid();
    let crd_pidfd = crd_sys::pidfd_open(Pid(me.as_raw() as u32))?;
    let (status_r, status_w) =
        unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| SyscallError { call: "pipe2", source: e.into() })?;
    let handover = Handover::new(plan.max_objref(), plan.processes.len())?;
    // Stubs wait for the commit signal with sigwait: it must be blocked before they exist.
    let mut commit = SigSet::empty();
    commit.add(Signal::SIGUSR1);
    let mut old_mask = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&commit), Some(&mut old_mask))
        .map_err(|e| SyscallError { call: "sigprocmask", source: e.into() })?;
    let args = stub::StubArgs {
        plan,
        handover: &handover,
        crd_pidfd: crd_pidfd.as_raw_fd(),
        status: status_w.as_raw_fd(),
        exec,
        old_mask,
    };
    // SAFETY: crd is single-threaded here (the CLI runs the restore on its only thread),
    // and the child only runs the stub code, which makes plain syscalls.
    let forked = unsafe { unistd::fork() };
    if let Ok(ForkResult::Child) = forked {
        stub::run(args, 0, me);
    }
    // crd itself does not wait for the commit signal.
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None);
    let root = match forked.map_err(|e| SyscallError { call: "fork", source: e.into() })? {
        ForkResult::Child => unreachable!("the child runs the stub"),
        ForkResult::Parent { child } => child,
    };
    drop(status_w);
    // The stubs exist (and are dropping what they inherited) while crd makes the
    // descriptions they will pull.
    let stub_of = |old: Pid| stub_pid(plan, &handover, old);
    let objects = match objects(&mut |objref, fd| handover.publish(objref, fd), Stubs(&stub_of)) {
        Ok(objects) => objects,
        Err(e) => {
            kill_all(root, &[]);
            return Err(e);
        }
    };
    handover.finish();
    let mut lines = Lines::new(status_r);
    let reports = match collect_reports(plan, &mut lines, interrupted) {
        Ok(reports) => reports,
        Err(e) => {
            kill_all(root, &[]);
            return Err(e);
        }
    };
    let stub_pids: Vec<Pid> = reports.iter().map(|r| r.pid).collect();
    if let Err(e) = hold_for_tests(interrupted) {
        kill_all(root, &stub_pids);
        return Err(e);
    }
    // The stubs hold their own references now: crd's copies (and every deposited pipe
    // end) go, so no stray end keeps a pipe open.
    drop(objects);
    drop(crd_pidfd);
    for pid in &stub_pids {
        if let Err(e) = signal(*pid, Signal::SIGUSR1) {
            kill_all(root, &stub_pids);
            return Err(e.into());
        }
    }
    // Every stub closes its report fd after the commit (the root's closes on exec):
    // EOF means the tree is committed. Before it, the root stub reports the fds it
    // moved for the exec; any other line is a failed exec.
    let mut moved = Vec::new();
    while let Some(line) = lines.rest(Duration::from_secs(10)) {
        match FdMove::parse(&line) {
            Some(m) => moved.push(m),
            None => {
                kill_all(root, &stub_pids);
                return Err(RestoreError::Exec(line.trim_start_matches("execfail ").to_string()));
            }
        }
    }
    let mut tasks = Vec::new();
    for (p, report) in plan.processes.iter().zip(&reports) {
        let new = std::iter::once(report.pid).chain(report.threads.iter().copied());
        tasks.extend(p.threads.iter().map(|(old, _)| *old).zip(new));
    }
    Ok(Restored { root: Pid(root.as_raw() as u32), tasks, moved })
}

/// The new PID of the stub restored for task `old`, once it has started.
fn stub_pid(plan: &Plan, handover: &Handover, old: Pid) -> Result<Pid, String> {
    let (index, process) = plan
        .processes
        .iter()
        .enumerate()
        .find(|(_, p)| p.threads.iter().any(|(tid, _)| *tid == old))
        .ok_or_else(|| format!("PID {old} is not a task of the image"))?;
    if process.threads[0].0 != old {
        return Err(format!(
            "it refers to thread {old} of PID {}: a stub's threads start only once its fds are in place",
            process.old_tgid
        ));
    }
    handover
        .pid_of(index, SETUP_TIMEOUT)
        .ok_or_else(|| format!("the stub for PID {old} did not start within {SETUP_TIMEOUT:?}"))
}

fn collect_reports(
    plan: &Plan,
    lines: &mut Lines,
    interrupted: &dyn Fn() -> bool,
) -> Result<Vec<Report>, RestoreError> {
    let mut reports: Vec<Option<Report>> = (0..plan.processes.len()).map(|_| None).collect();
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut pending = plan.processes.len();
    while pending > 0 {
        if interrupted() {
            return Err(RestoreError::Interrupted(crate::interrupt::Interrupted));
        }
        if Instant::now() > deadline {
            return Err(RestoreError::Timeout);
        }
        let Some(line) = lines.next(Duration::from_millis(100))? else { continue };
        let mut words = line.split_whitespace();
        match words.next() {
            Some("ok") => {
                let index: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(usize::MAX);
                let mut ids = words.filter_map(|w| w.parse::<u32>().ok()).map(Pid);
                let (Some(slot), Some(pid)) = (reports.get_mut(index), ids.next()) else {
                    return Err(RestoreError::Stub(format!("a stub sent a bad report: {line}")));
                };
                *slot = Some(Report { pid, threads: ids.collect() });
                pending -= 1;
            }
            Some("err") => {
                let message = line.splitn(3, ' ').nth(2).unwrap_or_default().to_string();
                return Err(RestoreError::Stub(message));
            }
            _ => return Err(RestoreError::Stub(format!("a stub sent a bad report: {line}"))),
        }
    }
    Ok(reports.into_iter().flatten().collect())
}

/// Test hook (testing builds only): `CRD_TEST_HOLD_RESTORE_MS=N` holds every stub, set up
/// but uncommitted, for N ms, so tests can kill or interrupt crd mid-restore. Ctrl-C
/// still ends the wait.
#[cfg(feature = "testing")]
pub const HOLD_RESTORE_ENV: &str = "CRD_TEST_HOLD_RESTORE_MS";

fn hold_for_tests(interrupted: &dyn Fn() -> bool) -> Result<(), RestoreError> {
    #[cfg(feature = "testing")]
    if !crate::test_hooks::hold(HOLD_RESTORE_ENV, interrupted) {
        return Err(RestoreError::Interrupted(crate::interrupt::Interrupted));
    }
    #[cfg(not(feature = "testing"))]
    let _ = interrupted;
    Ok(())
}

fn signal(pid: Pid, signal: Signal) -> Result<(), SyscallError> {
    let pidfd = crd_sys::pidfd_open(pid)?;
    crd_sys::pidfd_send_signal(pidfd.as_fd(), signal as i32)
}

/// Kills every stub: the root (its descendants die with it: PR_SET_PDEATHSIG) and
/// every stub that reported, then reaps the root.
fn kill_all(root: unistd::Pid, stubs: &[Pid]) {
    for pid in stubs {
        let _ = signal(*pid, Signal::SIGKILL);
    }
    let _ = nix::sys::signal::kill(root, Signal::SIGKILL);
    let _ = waitpid(root, Some(WaitPidFlag::__WALL));
}

/// Lines from the stubs' report pipe, with timeouts.
struct Lines {
    reader: BufReader<std::fs::File>,
}

impl Lines {
    fn new(fd: OwnedFd) -> Self {
        Self { reader: BufReader::new(std::fs::File::from(fd)) }
    }

    /// The next line, None if none came within `timeout`; an error at EOF (every stub
    /// is gone).
    fn next(&mut self, timeout: Duration) -> Result<Option<String>, RestoreError> {
        if self.reader.buffer().is_empty() && !readable(self.reader.get_ref(), timeout) {
            return Ok(None);
        }
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(RestoreError::Stub("every stub exited before reporting".into())),
            Ok(_) => Ok(Some(line.trim_end().to_string())),
            Err(e) => Err(SyscallError { call: "read", source: e }.into()),
        }
    }

    /// Waits (up to `timeout`) for the next line; None at EOF.
    fn rest(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.reader.buffer().is_empty() && !readable(self.reader.get_ref(), Duration::from_millis(100))
            {
                continue;
            }
            let mut line = String::new();
            return match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => None,
                Ok(_) => Some(line.trim_end().to_string()),
            };
        }
        None
    }
}

fn readable(file: &std::fs::File, timeout: Duration) -> bool {
    let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(timeout.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::NONE);
    poll(&mut fds, ms).is_ok_and(|n| n > 0)
}
