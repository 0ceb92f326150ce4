//! The stub side of a restore: what each forked stub process does.
//!
//! A stub starts as a fork of crd (or of its parent stub) and drops every fd it
//! inherited, so its table holds exactly what the image says: it forks its own child
//! stubs first (so they start clean too), then pulls each of its descriptions out of
//! crd with `pidfd_getfd` as soon as crd publishes it (see `handover`) and moves it to
//! its fd number (close-on-exec as recorded), starts its threads, reports, and waits for
//! crd's commit (SIGUSR1). Until
//! then it dies with its parent (PR_SET_PDEATHSIG), so a failed or killed restore leaves
//! nothing running. After the commit it holds its fds until SIGTERM or SIGINT, or execs
//! the program given with `--exec`, handing it its fds as [`super::exec`] says.
use std::{
    ffi::CString,
    fmt::Write as _,
    os::fd::{AsRawFd, BorrowedFd, RawFd},
    sync::mpsc,
};

use nix::{
    sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask},
    unistd::{self, ForkResult},
};

use super::{
    exec::{self, Exec},
    handover::Handover,
    plan::{Ctty, Group, Plan, TablePlan},
};
use crate::sys;

/// Test hook (testing builds only): `CRD_TEST_FAIL_STUB=N` makes stub N (in plan order)
/// fail after it has made its children and taken its fds, to prove that a failed restore
/// leaves nothing.
#[cfg(feature = "testing")]
pub const FAIL_STUB_ENV: &str = "CRD_TEST_FAIL_STUB";

/// What every stub needs to know; a stub gets it by being forked from crd.
#[derive(Clone, Copy)]
pub(super) struct StubArgs<'a> {
    pub plan: &'a Plan,
    /// Where crd publishes each description's fd number (in crd), once made.
    pub handover: &'a Handover,
    /// A pidfd of crd, to pull descriptions from (its fd number in this process).
    pub crd_pidfd: RawFd,
    /// Where stubs report, one line each (its fd number in this process).
    pub status: RawFd,
    /// The root stub execs this after the commit.
    pub exec: Option<&'a Exec>,
    /// The signal mask to restore before exec.
    pub old_mask: SigSet,
}

/// Runs stub `index`; never returns.
pub(super) fn run(args: StubArgs<'_>, index: usize, parent: unistd::Pid) -> ! {
    let mut args = args;
    // First of all: crd may be waiting for this PID to open a pidfd on it.
    args.handover.born(index, unistd::getpid().as_raw() as u32);
    match setup(&mut args, index, parent) {
        Ok(line) => report(args.status, &line),
        Err(message) => {
            let old = args.plan.processes[index].old_tgid;
            report(args.status, &format!("err {index} PID {old}: {message}"));
            // SAFETY: _exit ends this process without running crd's destructors, which
            // belong to the parent's copy of the state.
            unsafe { libc::_exit(1) }
        }
    }
    wait_for_commit();
    commit(&args, index)
}

/// Everything before the report: returns the report line. Updates `args` with where
/// crd's handles now live.
fn setup(args: &mut StubArgs<'_>, index: usize, parent: unistd::Pid) -> Result<String, String> {
    let me = &args.plan.processes[index];
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on this process.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if unistd::getppid() != parent {
        return Err("its parent died while it started".into());
    }
    set_comm(&me.threads[0].1);
    if let TablePlan::Own(fds) = &me.table {
        // Park crd's two handles where no fd of the image goes, then drop all the rest.
        let (a, b) = parking(fds.iter().map(|f| f.fd.0))?;
        if args.status != a {
            if args.crd_pidfd == a {
                args.crd_pidfd = dup_cloexec(args.crd_pidfd, None)?;
            }
            args.status = dup_cloexec(args.status, Some(a))?;
        }
        if args.crd_pidfd != b {
            args.crd_pidfd = dup_cloexec(args.crd_pidfd, Some(b))?;
        }
        let (lo, hi) = (b as u32, a as u32);
        // Everything but the two handles: crd's fds, inherited at fork, are not ours.
        crate::sys::close_range(0, lo - 1);
        if hi > lo + 1 {
            crate::sys::close_range(lo + 1, hi - 1);
        }
        crate::sys::close_range(hi + 1, u32::MAX);
    }
    // A session is inherited: it is made before the children, who are born in it.
    if me.job.leads_session {
        unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    } else if index == 0 && args.exec.is_none() {
        // Out of the terminal's reach: a stub waits for an explicit SIGTERM or SIGINT.
        let _ = unistd::setsid();
    }
    match me.job.group {
        Group::Create => unistd::setpgid(unistd::Pid::from_raw(0), unistd::Pid::from_raw(0))
            .map_err(|e| format!("setpgid(0, 0): {e}"))?,
        Group::Keep | Group::Join(_) => {}
    }
    if !matches!(me.job.group, Group::Join(_)) {
        args.handover.grouped(index);
    }
    // A controlling terminal is inherited at fork, never given to processes that exist
    // already: the leader takes it before it forks its children.
    let terminal = match me.job.ctty {
        Some(ctty) => Some(take_terminal(args, ctty)?),
        None => None,
    };
    for &child in &me.children {
        spawn_child(*args, child)?;
    }
    // Joined only now: the stub that makes the group may be one of its own children,
    // forked just above (and a maker never waits, so this cannot deadlock).
    if let Group::Join(maker) = me.job.group {
        let pgid = group_of(args, maker)?;
        unistd::setpgid(unistd::Pid::from_raw(0), pgid).map_err(|e| format!("setpgid(0, {pgid}): {e}"))?;
    }
    if let TablePlan::Own(fds) = &me.table {
        // SAFETY: crd_pidfd is open in this process for as long as the setup runs.
        let pidfd = unsafe { BorrowedFd::borrow_raw(args.crd_pidfd) };
        for f in fds {
            // Waits until crd has made it: crd makes while the stubs pull.
            let source = args.handover.fd_of(f.file).ok_or(format!("fd {}: no object {}", f.fd, f.file))?;
            let pulled = sys::pidfd_getfd(pidfd, crate::types::Fd(source as u32))
                .map_err(|e| format!("fd {} ({}): {e}", f.fd, f.file))?;
            place(pulled, f.fd.0 as RawFd, f.close_on_exec)
                .map_err(|e| format!("fd {} ({}): {e}", f.fd, f.file))?;
        }
    }
    if let (Some(tty), Some(ctty)) = (terminal, me.job.ctty) {
        give_foreground(args, tty, ctty)?;
    }
    #[cfg(feature = "testing")]
    if std::env::var(FAIL_STUB_ENV).ok().and_then(|v| v.parse::<usize>().ok()) == Some(index) {
        return Err(format!("failing on purpose (${FAIL_STUB_ENV})"));
    }
    if index == 0 && args.exec.is_some() {
        // The root will lay its fds out for the program and exec, which gives it a table
        // of its own anyway: it takes its own copy now, filled, before its threads start
        // (they share it) and before the commit, so the CLONE_FILES child stubs keep
        // theirs as it is, and close crd's handles in it after the commit themselves.
        // SAFETY: unshare(CLONE_FILES) only gives this process its own copy of its table.
        if unsafe { libc::unshare(libc::CLONE_FILES) } < 0 {
            return Err(format!("unshare(CLONE_FILES): {}", std::io::Error::last_os_error()));
        }
    }
    let tids = start_threads(&me.threads[1..]);
    let mut line = format!("ok {index} {}", unistd::getpid());
    for tid in tids {
        let _ = write!(line, " {tid}");
    }
    Ok(line)
}

/// The process group stub `maker` is in, once it is in place.
fn group_of(args: &StubArgs<'_>, maker: usize) -> Result<unistd::Pid, String> {
    let old = args.plan.processes[maker].old_tgid;
    if !args.handover.wait_grouped(maker, super::SETUP_TIMEOUT) {
        return Err(format!("the stub for PID {old} did not make its process group in time"));
    }
    let pid = args.handover.pid_of(maker, super::SETUP_TIMEOUT).ok_or(format!("no stub for PID {old}"))?;
    unistd::getpgid(Some(unistd::Pid::from_raw(pid.0 as i32))).map_err(|e| format!("getpgid({pid}): {e}"))
}

/// A session leader takes the restored pty slave as its controlling terminal
/// (TIOCSCTTY). Returns the fd it pulled, moved above every fd number of the image (the
/// stub's own fds are placed after this), for [`give_foreground`].
fn take_terminal(args: &StubArgs<'_>, ctty: Ctty) -> Result<RawFd, String> {
    // SAFETY: crd_pidfd is open in this process for as long as the setup runs.
    let pidfd = unsafe { BorrowedFd::borrow_raw(args.crd_pidfd) };
    let source =
        args.handover.fd_of(ctty.file).ok_or(format!("its terminal {} was never made", ctty.file))?;
    let pulled = sys::pidfd_getfd(pidfd, crate::types::Fd(source as u32))
        .map_err(|e| format!("its terminal ({}): {e}", ctty.file))?;
    // SAFETY: F_DUPFD_CLOEXEC on an fd we own: the copy lands above every fd number the
    // image places (and below crd's parked handles, which are the two highest free).
    let tty =
        unsafe { libc::fcntl(pulled.as_raw_fd(), libc::F_DUPFD_CLOEXEC, args.plan.max_fd as RawFd + 1) };
    if tty < 0 {
        return Err(format!("fcntl(F_DUPFD_CLOEXEC): {}", std::io::Error::last_os_error()));
    }
    drop(pulled);
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal the terminal).
    if unsafe { libc::ioctl(tty, libc::TIOCSCTTY, 0) } < 0 {
        return Err(format!("ioctl(TIOCSCTTY): {}", std::io::Error::last_os_error()));
    }
    Ok(tty)
}

/// The session leader gives its terminal its foreground group (TIOCSPGRP; the leader's
/// own group is in the foreground meanwhile, so this raises no SIGTTOU), once that group
/// exists, then closes its copy of the terminal.
fn give_foreground(args: &StubArgs<'_>, tty: RawFd, ctty: Ctty) -> Result<(), String> {
    // SAFETY: `tty` is the copy take_terminal made; nothing else owns it.
    let tty = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(tty) };
    if let Some(maker) = ctty.foreground {
        let pgid: libc::pid_t = group_of(args, maker)?.as_raw();
        // SAFETY: TIOCSPGRP reads one pid_t through the pointer we pass.
        if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSPGRP, &pgid) } < 0 {
            return Err(format!("ioctl(TIOCSPGRP, {pgid}): {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn spawn_child(args: StubArgs<'_>, child: usize) -> Result<(), String> {
    let parent = unistd::getpid();
    match args.plan.processes[child].table {
        TablePlan::SharedWithParent => {
            let stack: &'static mut [u8] = Box::leak(vec![0u8; 256 * 1024].into_boxed_slice());
            let body: Box<dyn FnMut() -> isize + '_> = Box::new(move || run(args, child, parent));
            // SAFETY: the child runs on its own leaked stack in a copy of this address
            // space (no CLONE_VM); it shares only the fd table, which is the point.
            unsafe {
                nix::sched::clone(
                    std::mem::transmute::<Box<dyn FnMut() -> isize + '_>, Box<dyn FnMut() -> isize>>(body),
                    stack,
                    nix::sched::CloneFlags::CLONE_FILES,
                    Some(libc::SIGCHLD),
                )
            }
            .map_err(|e| format!("clone(CLONE_FILES): {e}"))?;
        }
        TablePlan::Own(_) => {
            // SAFETY: a stub is single-threaded when it forks (threads start later).
            match unsafe { unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
                ForkResult::Child => run(args, child, parent),
                ForkResult::Parent { .. } => {}
            }
        }
    }
    Ok(())
}

/// The two highest fd numbers below the fd limit that the image does not use: where a
/// stub keeps crd's handles while it fills its table.
fn parking(targets: impl Iterator<Item = u32>) -> Result<(RawFd, RawFd), String> {
    let used: std::collections::HashSet<u32> = targets.collect();
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_err(|e| format!("getrlimit: {e}"))?;
    let limit = soft.min(1 << 20) as u32;
    let mut free = (3..limit).rev().filter(|fd| !used.contains(fd));
    match (free.next(), free.next()) {
        (Some(a), Some(b)) => Ok((a as RawFd, b as RawFd)),
        _ => Err(format!("no two fd numbers below the limit of {limit} are free for crd's handles")),
    }
}

/// Duplicates `fd` (close-on-exec) to exactly `to`, or to the lowest free number. The
/// old number is left for the close_range that follows.
fn dup_cloexec(fd: RawFd, to: Option<RawFd>) -> Result<RawFd, String> {
    // SAFETY: dup3/F_DUPFD_CLOEXEC on an fd we own; `to` holds nothing the stub keeps.
    let ret = unsafe {
        match to {
            Some(to) => libc::dup3(fd, to, libc::O_CLOEXEC),
            None => libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0),
        }
    };
    if ret < 0 {
        return Err(format!("dup: {}", std::io::Error::last_os_error()));
    }
    Ok(ret)
}

/// Moves a pulled descriptor to its fd number with the recorded close-on-exec bit.
fn place(pulled: std::os::fd::OwnedFd, target: RawFd, close_on_exec: bool) -> Result<(), String> {
    use std::os::fd::IntoRawFd;
    let raw = pulled.into_raw_fd();
    let cloexec_flag = if close_on_exec { libc::O_CLOEXEC } else { 0 };
    if raw == target {
        if close_on_exec {
            // pidfd_getfd always sets close-on-exec: already as recorded.
            return Ok(());
        }
        let fd_flags = if close_on_exec { libc::FD_CLOEXEC } else { 0 };
        // SAFETY: F_SETFD on an fd we own.
        if unsafe { libc::fcntl(raw, libc::F_SETFD, fd_flags) } < 0 {
            return Err(format!("fcntl(F_SETFD): {}", std::io::Error::last_os_error()));
        }
        return Ok(());
    }
    // SAFETY: dup3 onto the target number, which holds nothing this stub needs (fds
    // are placed once each; crd's handles are parked above every target).
    let ret = unsafe { libc::dup3(raw, target, cloexec_flag) };
    // SAFETY: `raw` is ours; its copy now lives at `target`.
    unsafe { libc::close(raw) };
    if ret < 0 {
        return Err(format!("dup3: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether stub `index` has no table of its own but the root's: CLONE_FILES children of
/// the root, and theirs.
fn fills_root_table(plan: &Plan, index: usize) -> bool {
    let mut i = index;
    while let (TablePlan::SharedWithParent, Some(parent)) =
        (&plan.processes[i].table, plan.processes[i].parent)
    {
        i = parent;
    }
    i == 0
}

fn set_comm(comm: &str) {
    let name: Vec<u8> = comm.bytes().filter(|&b| b != 0).take(15).collect();
    if let Ok(name) = CString::new(name) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    }
}

/// Starts one thread per extra task; returns their TIDs in order.
fn start_threads(threads: &[(crate::types::Pid, String)]) -> Vec<i32> {
    let mut tids = Vec::new();
    for (_, comm) in threads {
        let (tx, rx) = mpsc::channel();
        let comm = comm.clone();
        let spawned = std::thread::Builder::new().stack_size(64 * 1024).spawn(move || {
            set_comm(&comm);
            let _ = tx.send(unistd::gettid().as_raw());
            loop {
                std::thread::park();
            }
        });
        if spawned.is_ok()
            && let Ok(tid) = rx.recv()
        {
            tids.push(tid);
        }
    }
    tids
}

fn report(status: RawFd, line: &str) {
    let line = format!("{line}\n");
    // SAFETY: `status` is the report pipe, open in this process.
    let fd = unsafe { BorrowedFd::borrow_raw(status) };
    // One write of less than PIPE_BUF bytes: lines from several stubs never interleave.
    let _ = unistd::write(fd, line.as_bytes());
}

fn wait_for_commit() {
    let mut commit = SigSet::empty();
    commit.add(Signal::SIGUSR1);
    loop {
        if commit.wait() == Ok(Signal::SIGUSR1) {
            return;
        }
    }
}

/// After crd's commit: outlive crd, drop crd's handles, then exec or wait.
fn commit(args: &StubArgs<'_>, index: usize) -> ! {
    let (status, crd_pidfd) = (args.status, args.crd_pidfd);
    // SAFETY: prctl(PR_SET_PDEATHSIG, 0) only clears a flag on this process.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0) };
    // Each table drops crd's handles once: its owner's stub does it, and with --exec the
    // first of the root's CLONE_FILES children does it for the table the root left them
    // (see `setup`).
    let owns_table = matches!(args.plan.processes[index].table, TablePlan::Own(_))
        || (args.exec.is_some()
            && (1..args.plan.processes.len()).find(|&i| fills_root_table(args.plan, i)) == Some(index));
    if owns_table {
        // SAFETY: crd's pidfd is ours; after the commit nothing pulls from crd.
        unsafe { libc::close(crd_pidfd) };
    }
    if let (0, Some(exec)) = (index, args.exec) {
        let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&args.old_mask), None);
        let argv = &exec.argv;
        let fds = match &args.plan.processes[index].table {
            TablePlan::Own(fds) => fds.as_slice(),
            TablePlan::SharedWithParent => &[],
        };
        let failure = match exec::prepare(exec, fds, status) {
            Ok(prepared) => {
                for m in &prepared.moves {
                    report(status, &m.line());
                }
                // `status` is close-on-exec: crd sees EOF once the exec succeeds.
                let err = match &prepared.env {
                    Some(env) => unistd::execvpe(&argv[0], argv, env),
                    None => unistd::execvp(&argv[0], argv),
                }
                .unwrap_err();
                err.to_string()
            }
            Err(message) => message,
        };
        report(status, &format!("execfail {}: {failure}", argv[0].to_string_lossy()));
        // SAFETY: as in `run`.
        unsafe { libc::_exit(127) }
    }
    if owns_table {
        // SAFETY: the report pipe is ours; crd reads EOF when every stub has closed it.
        unsafe { libc::close(status) };
    }
    loop {
        // SAFETY: pause has no preconditions; SIGTERM and SIGINT keep their default
        // action and end the stub.
        unsafe { libc::pause() };
    }
}
