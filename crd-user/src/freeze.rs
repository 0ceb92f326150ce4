//! Freeze: hold the target's threads still for the harvest, invisibly, and always let
//! them go.
//!
//! Every thread is attached with `PTRACE_SEIZE` and stopped with `PTRACE_INTERRUPT`.
//! Unlike SIGSTOP this sends no signal the target or its parent can see, and unlike a
//! cgroup freezer it needs no set-up. [`Frozen`] detaches every thread when dropped —
//! on success, on error, on Ctrl-C — and the kernel detaches them too if crd dies, so a
//! target is never left stopped.
//!
//! ptrace binds a tracee to the tracer *thread*: a [`Frozen`] must be used and dropped
//! on the thread that made it.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::fd::{AsFd, OwnedFd},
    thread,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::{
        ptrace,
        signal::Signal,
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid as NixPid,
};

use crate::{
    admission::{Admission, Refused},
    privilege::PtraceRefusal,
    sys::{self, SyscallError},
    types::{Pid, Tgid},
};

/// How long a thread may take to report its stop before crd gives up.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("no process with PID {0}: check the PID (it may have exited)")]
    NoSuchProcess(Tgid),
    /// crd lacks CAP_SYS_PTRACE and the kernel's ptrace check refused: the message says
    /// why (whose process, Yama's setting), diagnosed when the refusal happened.
    #[error("{0}")]
    NotPermitted(PtraceRefusal),
    #[error(
        "the kernel refuses to trace PID {0} even for root: it is init, a kernel thread, or protected by a security module"
    )]
    Untraceable(Tgid),
    #[error("PID {0} exited during the checkpoint; nothing was written")]
    Exited(Tgid),
    #[error("thread {0} did not stop within {STOP_TIMEOUT:?}; it was resumed, nothing was written")]
    StopTimeout(Pid),
    #[error("PID {0} is already being traced (by a debugger or another crd): detach it first")]
    AlreadyTraced(Tgid),
    #[error("interrupted; every task was resumed")]
    Interrupted(#[source] crate::interrupt::Interrupted),
    /// The admission rule refused a process before crd seized it (see
    /// [`crate::admission`]); every task already seized was resumed.
    #[error("{0}; nothing was frozen or written")]
    Refused(#[from] Refused),
    #[error(transparent)]
    Syscall(#[from] SyscallError),
}

/// The frozen set: every thread of every process, stopped, with a pidfd per process.
pub struct Frozen {
    root: Tgid,
    /// Process → its pidfd, in ascending PID order.
    processes: BTreeMap<Tgid, OwnedFd>,
    /// Thread → the signal to hand back on detach (a signal that arrived while it was
    /// stopping and would otherwise be lost).
    threads: BTreeMap<Pid, Option<Signal>>,
}

impl Frozen {
    /// Freezes `root` (all threads) and, with `tree`, all its descendants. Repeats until
    /// the set stops growing: a thread or child created while crd was attaching is
    /// caught on the next round, and once every member is stopped none can be created.
    pub fn freeze(root: Tgid, tree: bool, interrupted: &dyn Fn() -> bool) -> Result<Self, FreezeError> {
        Self::freeze_admitting(root, tree, &Admission::Kernel, interrupted)
    }

    /// As [`freeze`](Self::freeze), seizing only processes `admission` admits: each is
    /// checked before any of its threads is seized, so a refused process is never
    /// stopped, even for a moment.
    pub fn freeze_admitting(
        root: Tgid,
        tree: bool,
        admission: &Admission,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<Self, FreezeError> {
        admission.check(root)?;
        let pidfd = sys::pidfd_open(Pid(root.0)).map_err(|e| match e.errno() {
            Some(libc::ESRCH) | Some(libc::EINVAL) => FreezeError::NoSuchProcess(root),
            _ => FreezeError::Syscall(e),
        })?;
        pause_for_tests();
        let mut frozen =
            Frozen { root, processes: BTreeMap::from([(root, pidfd)]), threads: BTreeMap::new() };
        loop {
            if interrupted() {
                return Err(FreezeError::Interrupted(crate::interrupt::Interrupted));
            }
            let mut grew = false;
            let processes: Vec<Tgid> = frozen.processes.keys().copied().collect();
            for tgid in &processes {
                for tid in list_threads(*tgid) {
                    if !frozen.threads.contains_key(&tid) {
                        grew |= frozen.seize(*tgid, tid)?;
                    }
                }
            }
            if tree {
                for tgid in &processes {
                    for child in list_children(*tgid) {
                        if frozen.processes.contains_key(&child) || is_zombie(child) {
                            continue;
                        }
                        admission.check(child)?;
                        // A frozen parent cannot reap, so the child's PID cannot be
                        // recycled between the listing and this pidfd.
                        if let Ok(pidfd) = sys::pidfd_open(Pid(child.0)) {
                            frozen.processes.insert(child, pidfd);
                            grew = true;
                        }
                    }
                }
            }
            if !grew {
                break;
            }
        }
        // The pidfds were opened before the threads were seized: if a process is gone
        // now, the PIDs seized may belong to a newcomer. Refuse rather than guess.
        for (tgid, pidfd) in &frozen.processes {
            if sys::pidfd_exited(pidfd.as_fd()) {
                return Err(FreezeError::Exited(*tgid));
            }
        }
        if !frozen.threads.keys().any(|t| t.0 == root.0) {
            return Err(FreezeError::Exited(root));
        }
        Ok(frozen)
    }

    /// Seizes and stops one thread. Returns false if it vanished first.
    fn seize(&mut self, tgid: Tgid, tid: Pid) -> Result<bool, FreezeError> {
        let pid = NixPid::from_raw(tid.0 as i32);
        match ptrace::seize(pid, ptrace::Options::empty()) {
            Ok(()) => {}
            Err(Errno::ESRCH) => return Ok(false),
            Err(Errno::EPERM) if is_traced(tid) => return Err(FreezeError::AlreadyTraced(tgid)),
            Err(Errno::EPERM) => {
                if is_zombie(tgid) || !std::path::Path::new(&format!("/proc/{}", tid.0)).exists() {
                    return Ok(false);
                }
                // Root without CAP_SYS_PTRACE is refused like anyone else: say so.
                if crate::privilege::missing(&[crate::privilege::Cap::SysPtrace]).is_empty() {
                    return Err(FreezeError::Untraceable(tgid));
                }
                return Err(FreezeError::NotPermitted(PtraceRefusal::of(tgid)));
            }
            Err(e) => {
                return Err(SyscallError { call: "ptrace(PTRACE_SEIZE)", source: e.into() }.into());
            }
        }
        self.threads.insert(tid, None);
        if let Err(e) = ptrace::interrupt(pid) {
            if e == Errno::ESRCH {
                self.threads.remove(&tid);
                return Ok(false);
            }
            return Err(SyscallError { call: "ptrace(PTRACE_INTERRUPT)", source: e.into() }.into());
        }
        self.wait_stopped(tid)
    }

    /// Waits for the stop `PTRACE_INTERRUPT` asked for. A signal that arrives first
    /// stops the thread too (signal-delivery-stop); it is kept and re-delivered on detach.
    fn wait_stopped(&mut self, tid: Pid) -> Result<bool, FreezeError> {
        let pid = NixPid::from_raw(tid.0 as i32);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match waitpid(pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {
                    if Instant::now() > deadline {
                        return Err(FreezeError::StopTimeout(tid));
                    }
                    thread::sleep(Duration::from_micros(50));
                }
                Ok(WaitStatus::PtraceEvent(..)) => return Ok(true),
                Ok(WaitStatus::Stopped(_, signal)) => {
                    self.threads.insert(tid, Some(signal));
                    return Ok(true);
                }
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(Errno::ECHILD) => {
                    self.threads.remove(&tid);
                    return Ok(false);
                }
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(SyscallError { call: "waitpid", source: e.into() }.into());
                }
            }
        }
    }

    pub fn root(&self) -> Tgid {
        self.root
    }

    /// The frozen processes, in ascending PID order.
    pub fn processes(&self) -> impl Iterator<Item = Tgid> + '_ {
        self.processes.keys().copied()
    }

    /// The pidfd of a frozen process.
    pub fn pidfd(&self, tgid: Tgid) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.processes.get(&tgid).map(|fd| fd.as_fd())
    }

    /// Resumes every thread now (dropping does the same).
    pub fn thaw(self) {}
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for (tid, signal) in std::mem::take(&mut self.threads) {
            let pid = NixPid::from_raw(tid.0 as i32);
            if ptrace::detach(pid, signal) == Err(Errno::ESRCH) {
                // Not in a ptrace-stop (still stopping): stop it, then detach.
                let _ = ptrace::interrupt(pid);
                let _ = self.wait_stopped(tid);
                let _ = ptrace::detach(pid, signal);
            }
        }
    }
}

/// Test hook (testing builds only): `CRD_TEST_PAUSE_AFTER_PIDFD_MS=N` sleeps N ms between
/// opening the root's pidfd and attaching to its threads, so a test can make its PID be
/// reused right there.
#[cfg(feature = "testing")]
pub const PAUSE_AFTER_PIDFD_ENV: &str = "CRD_TEST_PAUSE_AFTER_PIDFD_MS";

fn pause_for_tests() {
    #[cfg(feature = "testing")]
    if let Some(ms) = std::env::var(PAUSE_AFTER_PIDFD_ENV).ok().and_then(|v| v.parse().ok()) {
        thread::sleep(Duration::from_millis(ms));
    }
}

fn read_ids<T>(dir: &str, wrap: impl Fn(u32) -> T) -> Vec<T> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut ids: Vec<u32> = entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    ids.sort_unstable();
    ids.into_iter().map(wrap).collect()
}

/// Threads of a process, from /proc/PID/task.
pub fn list_threads(tgid: Tgid) -> Vec<Pid> {
    read_ids(&format!("/proc/{}/task", tgid.0), Pid)
}

/// Children of a process, from /proc/PID/task/TID/children (every thread's, since a
/// child belongs to the thread that forked it).
pub fn list_children(tgid: Tgid) -> BTreeSet<Tgid> {
    let mut children = BTreeSet::new();
    for tid in list_threads(tgid) {
        let path = format!("/proc/{}/task/{}/children", tgid.0, tid.0);
        if let Ok(text) = fs::read_to_string(path) {
            children.extend(text.split_whitespace().filter_map(|s| s.parse().ok()).map(Tgid));
        }
    }
    children
}

fn proc_status_field(pid: u32, field: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
}

fn is_zombie(tgid: Tgid) -> bool {
    proc_status_field(tgid.0, "State:").is_some_and(|s| s.starts_with('Z') || s.starts_with('X'))
}

fn is_traced(tid: Pid) -> bool {
    proc_status_field(tid.0, "TracerPid:").is_some_and(|s| s != "0")
}
