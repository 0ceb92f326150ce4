//! `crd demo`'s process tree: two processes wired with pipes, a FIFO and a file, made by
//! forking crd itself. The product has no test fixture (`crd fixture` exists only in
//! builds with the `testing` feature), so the demo builds its tree with its own code.
//!
//! The root, a fork of crd, first gives itself a clean fd table — stdin and stdout on
//! /dev/null, stderr a private file, nothing else of crd's or of whoever ran crd, so the
//! image shares nothing with the outside — then sets up:
//!
//! | fd   | what                                                        |
//! |------|-------------------------------------------------------------|
//! | 3, 4 | a pipe, with [`QUEUED`] queued in it                        |
//! | 5    | a dup of 3                                                  |
//! | 6    | the FIFO, read-write                                        |
//! | 7    | the file, read-write, holding `0123456789`, at offset 4     |
//! | 8, 9 | a second pipe; 9 is close-on-exec                           |
//!
//! and forks a child, which inherits them all and closes fd 4. Each process then
//! reports "DEPTH PID" on a pipe and waits for a signal. Both die with their parent
//! (PR_SET_PDEATHSIG), so nothing outlives the demo.
use std::{
    ffi::{CStr, CString},
    fmt::Write as _,
    io::{BufRead, BufReader},
    os::{
        fd::{AsRawFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::OFlag,
    sys::{
        signal::{Signal, kill},
        stat::Mode,
        wait::waitpid,
    },
    unistd::{self, ForkResult, Pid},
};

use crate::{freeze::list_threads, sys::SyscallError, types::Tgid};

/// The bytes queued in the first pipe.
pub const QUEUED: &str = "hello, queued in a pipe";
/// The file's content; it is left open at [`FILE_OFFSET`].
const FILE_TEXT: &str = "0123456789";
const FILE_OFFSET: libc::off_t = 4;
/// Where each process reports readiness: above every fd the demo sets up.
const READY_FD: RawFd = 900;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Syscall(#[from] SyscallError),
    #[error("the demo's scratch path {0} contains a NUL byte")]
    BadPath(String),
    #[error("crd runs {0} threads: the demo forks only from a single-threaded crd")]
    Threaded(usize),
    #[error("the demo processes did not start: {0}")]
    NotReady(String),
}

/// The demo's running processes: killed (both) when dropped.
pub struct Tree {
    root: Pid,
    /// Whether the root was killed and reaped already.
    stopped: bool,
    /// The processes' stderr: a private file (see the module documentation).
    log: Option<tempfile::NamedTempFile>,
    /// PIDs by depth: the root, then its child.
    pub pids: Vec<u32>,
}

impl Tree {
    /// The root process's PID.
    pub fn root(&self) -> u32 {
        self.root.as_raw() as u32
    }

    /// Kills both processes and waits until they are gone, but keeps their stderr file:
    /// an image of the tree refers to it (their fd 2), and a restore reopens it.
    pub fn stop(mut self) -> tempfile::NamedTempFile {
        self.kill();
        // The child dies with the root (PR_SET_PDEATHSIG): wait until it is gone too.
        for pid in &self.pids {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Path::new(&format!("/proc/{pid}/fd")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        self.log.take().unwrap_or_else(|| unreachable!("the log lives until stop"))
    }

    fn kill(&mut self) {
        if !self.stopped {
            let _ = kill(self.root, Signal::SIGKILL);
            let _ = waitpid(self.root, None);
            self.stopped = true;
        }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts the tree, with the FIFO at `fifo` (made here) and the file at `file` (created
/// by the root), and waits until both processes are set up.
pub fn spawn(fifo: &Path, file: &Path) -> Result<Tree, DemoError> {
    let c_path = |p: &Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|_| DemoError::BadPath(p.display().to_string()))
    };
    let (fifo_c, file_c) = (c_path(fifo)?, c_path(file)?);
    unistd::mkfifo(fifo, Mode::from_bits_truncate(0o600))
        .map_err(|e| SyscallError { call: "mkfifo", source: e.into() })?;
    let log = tempfile::NamedTempFile::new().map_err(|e| SyscallError { call: "open(log)", source: e })?;
    // The processes' own open file description of the log: crd's is not shared with them.
    let stderr = log.reopen().map_err(|e| SyscallError { call: "open(log)", source: e })?;
    let (ready_r, ready_w) =
        unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| SyscallError { call: "pipe2", source: e.into() })?;
    let crd = unistd::getpid();
    let threads = list_threads(Tgid(crd.as_raw() as u32)).len();
    if threads != 1 {
        return Err(DemoError::Threaded(threads));
    }
    let setup = Setup {
        fifo: &fifo_c,
        file: &file_c,
        log: stderr.as_raw_fd(),
        ready: ready_w.as_raw_fd(),
        parent: crd,
    };
    // SAFETY: crd has a single thread (checked just above), so no lock can be held by a
    // thread that does not exist in the child; the child only runs `root`, which makes
    // plain syscalls on memory prepared before the fork, allocates nothing, and ends in
    // `_exit` or waits until killed: it never returns into crd's code.
    let root = match unsafe { unistd::fork() }.map_err(|e| SyscallError { call: "fork", source: e.into() })? {
        ForkResult::Child => root(&setup),
        ForkResult::Parent { child } => child,
    };
    drop((ready_w, stderr));
    let mut tree = Tree { root, stopped: false, log: Some(log), pids: Vec::new() };
    // Read to EOF, not just two lines: EOF means both processes have also closed their
    // copy of the ready pipe, so it is in neither table when crd checkpoints them.
    let mut ready: Vec<(u32, u32)> = BufReader::new(std::fs::File::from(ready_r))
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| {
            let (depth, pid) = line.trim().split_once(' ')?;
            Some((depth.parse().ok()?, pid.parse().ok()?))
        })
        .collect();
    ready.sort_unstable();
    tree.pids = ready.into_iter().map(|(_, pid)| pid).collect();
    if tree.pids.len() != 2 {
        let said = tree.log.as_ref().and_then(|l| std::fs::read_to_string(l.path()).ok()).unwrap_or_default();
        return Err(DemoError::NotReady(format!("{} of 2 became ready: {}", tree.pids.len(), said.trim())));
    }
    Ok(tree)
}

/// What the forked root needs, prepared before the fork.
struct Setup<'a> {
    fifo: &'a CStr,
    file: &'a CStr,
    /// The stderr file and the write end of the ready pipe (fd numbers in crd).
    log: RawFd,
    ready: RawFd,
    /// crd.
    parent: Pid,
}

/// A step of the set-up that failed, and why.
type Failed = (&'static str, Errno);

/// The root's life, in the forked child: set up, report, wait. Never returns.
fn root(setup: &Setup<'_>) -> ! {
    let depth = match wire(setup) {
        Ok(depth) => depth,
        Err((step, errno)) => {
            // Said on stderr (the log crd shows when the tree does not come up).
            let mut line = Line::default();
            let _ = writeln!(line, "crd demo: {step}: {}", errno.desc());
            write_all(2, line.bytes());
            // SAFETY: _exit ends this forked process at once, running nothing of crd's.
            unsafe { libc::_exit(1) }
        }
    };
    let mut line = Line::default();
    let _ = writeln!(line, "{depth} {}", unistd::getpid());
    write_all(READY_FD, line.bytes());
    // SAFETY: READY_FD is this process's own copy of the ready pipe, no longer needed.
    unsafe { libc::close(READY_FD) };
    loop {
        // SAFETY: pause has no preconditions; the process waits until a signal ends it.
        unsafe { libc::pause() };
    }
}

/// Sets up the root's fds, forks the child; returns the depth (0 root, 1 child).
fn wire(s: &Setup<'_>) -> Result<u32, Failed> {
    die_with(s.parent)?;
    // crd catches SIGINT and SIGTERM to clean up; the demo's processes stand in for a
    // user's program, which those end.
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: resets a signal to its default action; no handler code is involved.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
    clean_table(s)?;
    // The table holds 0-2 and READY_FD only: each new fd takes the lowest free number,
    // and `at` checks (and if need be moves) it.
    let mut pipe = [0; 2];
    // SAFETY: pipe writes two fds into the array it is given.
    check("pipe", unsafe { libc::pipe(pipe.as_mut_ptr()) })?;
    at("pipe", pipe[0], 3)?;
    at("pipe", pipe[1], 4)?;
    write_fully("write to the pipe", 4, QUEUED.as_bytes())?;
    // SAFETY: dup2 of an fd this process holds onto a free number.
    check("dup", unsafe { libc::dup2(3, 5) })?;
    // SAFETY: open with a NUL-terminated path prepared before the fork.
    let fifo = check("open the FIFO", unsafe { libc::open(s.fifo.as_ptr(), libc::O_RDWR) })?;
    at("open the FIFO", fifo, 6)?;
    // SAFETY: as above; O_CREAT takes the mode as its third argument.
    let file = check("open the file", unsafe {
        libc::open(s.file.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o600 as libc::c_uint)
    })?;
    at("open the file", file, 7)?;
    write_fully("write to the file", 7, FILE_TEXT.as_bytes())?;
    // SAFETY: lseek on an fd this process holds.
    if unsafe { libc::lseek(7, FILE_OFFSET, libc::SEEK_SET) } < 0 {
        return Err(("seek in the file", Errno::last()));
    }
    // SAFETY: as for the first pipe.
    check("pipe", unsafe { libc::pipe(pipe.as_mut_ptr()) })?;
    at("pipe", pipe[0], 8)?;
    at("pipe", pipe[1], 9)?;
    // SAFETY: sets a flag on an fd this process holds.
    check("cloexec", unsafe { libc::fcntl(9, libc::F_SETFD, libc::FD_CLOEXEC) })?;
    let me = unistd::getpid();
    // SAFETY: this process has one thread (a fork of single-threaded crd); the child
    // runs on in this function, making plain syscalls only.
    match unsafe { unistd::fork() }.map_err(|e| ("fork", e))? {
        ForkResult::Child => {
            die_with(me)?;
            // SAFETY: closes the child's own copy of the pipe's write end.
            check("close", unsafe { libc::close(4) })?;
            Ok(1)
        }
        ForkResult::Parent { .. } => Ok(0),
    }
}

/// Dies when `parent` does; if it is gone already, now.
fn die_with(parent: Pid) -> Result<(), Failed> {
    // SAFETY: PR_SET_PDEATHSIG only sets a flag on this process.
    check("prctl(PR_SET_PDEATHSIG)", unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) })?;
    if unistd::getppid() != parent {
        // SAFETY: _exit ends this forked process at once: its parent died before the
        // flag was set.
        unsafe { libc::_exit(1) };
    }
    Ok(())
}

/// Stdin and stdout on /dev/null (read-only and write-only, as a spawned program's),
/// stderr on the log, the ready pipe at READY_FD, and
/// nothing else open.
fn clean_table(s: &Setup<'_>) -> Result<(), Failed> {
    const HIGH: RawFd = READY_FD + 1;
    // SAFETY (this block): dup2, fcntl(F_DUPFD) and open on fds this process holds and
    // a constant path; every fd they return is this process's own. The log and
    // /dev/null are parked above READY_FD first, so that placing one on 0-2 cannot
    // clobber the other, whatever numbers they had.
    unsafe {
        check("ready pipe", libc::dup2(s.ready, READY_FD))?;
        let log = check("log", libc::fcntl(s.log, libc::F_DUPFD, HIGH))?;
        let null_r = check("/dev/null", libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY))?;
        let null_r = check("/dev/null", libc::fcntl(null_r, libc::F_DUPFD, HIGH))?;
        let null_w = check("/dev/null", libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY))?;
        let null_w = check("/dev/null", libc::fcntl(null_w, libc::F_DUPFD, HIGH))?;
        check("stdin", libc::dup2(null_r, 0))?;
        check("stdout", libc::dup2(null_w, 1))?;
        check("stderr", libc::dup2(log, 2))?;
    }
    crate::sys::close_range(3, READY_FD as u32 - 1);
    crate::sys::close_range(HIGH as u32, u32::MAX);
    Ok(())
}

/// `fd`, just made, must be `want`: moved there if the kernel chose another number.
fn at(step: &'static str, fd: RawFd, want: RawFd) -> Result<(), Failed> {
    if fd != want {
        // SAFETY: both numbers are this process's; `want` is free or replaced on purpose.
        check(step, unsafe { libc::dup2(fd, want) })?;
        // SAFETY: closes the original, now duplicated at `want`.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

fn check(step: &'static str, ret: libc::c_int) -> Result<libc::c_int, Failed> {
    if ret < 0 { Err((step, Errno::last())) } else { Ok(ret) }
}

fn write_fully(step: &'static str, fd: RawFd, mut bytes: &[u8]) -> Result<(), Failed> {
    while !bytes.is_empty() {
        // SAFETY: writes from a live slice to an fd this process holds.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n > 0 {
            bytes = &bytes[n as usize..];
        } else if n == 0 {
            return Err((step, Errno::EIO));
        } else if Errno::last() != Errno::EINTR {
            return Err((step, Errno::last()));
        }
    }
    Ok(())
}

fn write_all(fd: RawFd, bytes: &[u8]) {
    let _ = write_fully("report", fd, bytes);
}

/// A line formatted on the stack: the forked processes allocate nothing.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self { buf: [0; 160], len: 0 }
    }
}

impl Line {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end =
            self.len.checked_add(s.len()).filter(|&end| end <= self.buf.len()).ok_or(std::fmt::Error)?;
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}
