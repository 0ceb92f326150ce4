//! Fixture: a process tree wired with pipes and files from a list of steps, for the
//! integration tests (`crd fixture STEP...`, hidden; only in builds with the `testing`
//! feature — `crd demo` builds its own tree, see [`crate::demo`]).
//!
//! Steps run in order; `fork` splits the list: the child runs the remaining steps, the
//! parent stops there. Every process then writes "DEPTH PID" (DEPTH: forks before it)
//! as one line to the fd named by `$CRD_FIXTURE_READY` (if set), closes it, and waits
//! for a signal. Every process
//! dies with its parent (PR_SET_PDEATHSIG), so nothing outlives the test that made it.
//!
//! | step                  | effect                                                      |
//! |-----------------------|-------------------------------------------------------------|
//! | `pipe:R:W`            | pipe2, read end at fd R, write end at fd W                  |
//! | `dup:A:B`             | dup2(A, B)                                                  |
//! | `open:FD:MODE:PATH`   | open PATH at fd FD; MODE letters r w a(ppend) c(reate) t(runc) n(onblock) |
//! | `mkfifo:PATH`         | mkfifo PATH (mode 0600)                                     |
//! | `seek:FD:N`           | lseek(FD, N, SEEK_SET)                                      |
//! | `write:FD:TEXT`       | write TEXT to FD                                            |
//! | `fill:FD:N`           | write N bytes (a repeating pattern) to FD                   |
//! | `pipesz:FD:N`         | F_SETPIPE_SZ                                                |
//! | `cloexec:FD`          | set FD_CLOEXEC                                              |
//! | `nonblock:FD`         | set O_NONBLOCK on the description                           |
//! | `close:FD`            | close FD                                                    |
//! | `threads:N`           | start N threads that sleep                                  |
//! | `threadchurn`         | start a thread that creates short-lived threads, without end |
//! | `fdchurn`             | start a thread that opens and closes pipes and /dev/null, without end |
//! | `pipes:N`             | N more pipes at the lowest free fds (for size tests)        |
//! | `nodump`              | PR_SET_DUMPABLE 0: only CAP_SYS_PTRACE may trace it or take its fds |
//! | `comm:NAME`           | set the process name (comm)                                 |
//! | `socketpair:A:B[:T]`  | a connected pair of Unix sockets at fds A and B; T: `s`tream (default), `d`gram, se`q`packet |
//! | `shutdown:S:HOW`      | shutdown(2) socket S; HOW: `r`, `w` or `rw`                 |
//! | `sendfd:S:FD`         | send one byte (`F`) with FD attached (SCM_RIGHTS) on socket S: FD is in flight in S's peer's queue |
//! | `eventfd:FD:N:FLAGS`  | eventfd with counter N at FD; FLAGS letters s(emaphore) n(onblock) (may be empty) |
//! | `memfd:FD:NAME:N:SEALS` | memfd NAME at FD holding N pattern bytes, then seals: letters s(hrink) g(row) w(rite) S(eal) |
//! | `epoll:FD`            | epoll_create1 at FD                                          |
//! | `epollctl:EP:FD:EVENTS:DATA` | EPOLL_CTL_ADD of FD to epoll EP with EVENTS (`EPOLL*` bits, hex) and all 64 bits of DATA (decimal, or hex with `0x`) |
//! | `timerfd:FD[:CLOCK:VALUE_MS:INTERVAL_MS:FLAGS]` | timerfd_create at FD (CLOCK: monotonic (default), realtime, boottime, realtime_alarm, boottime_alarm or a number), armed with VALUE_MS (from now) and INTERVAL_MS; FLAGS letters a(bstime: the deadline is now + VALUE_MS) c(ancel on set) n(onblock) |
//! | `signalfd:FD:SIGNALS` | signalfd at FD for SIGNALS (`INT,USR2`), which the process blocks |
//! | `pty:M:S`             | a pty: master (/dev/ptmx) at M, its slave at S               |
//! | `setsid`              | setsid(): lead a new session                                 |
//! | `setpgid`             | setpgid(0, 0): lead a new process group                      |
//! | `ctty:FD`             | TIOCSCTTY: the terminal at FD becomes the session's controlling terminal |
//! | `foreground:FD`       | tcsetpgrp(FD, own group): put this process's group in the terminal's foreground |
//! | `winsize:FD:ROWS:COLS` | TIOCSWINSZ                                                  |
//! | `raw:FD`              | clear ECHO, ICANON and ICRNL on the terminal at FD           |
//! | `packet:FD`           | TIOCPKT on the pty master at FD                              |
//! | `inotify:FD:MASK:PATH` | inotify at FD watching PATH for MASK (`IN_*` bits, hex)     |
//! | `fanotify:FD:FLAGS:MASK:PATH` | fanotify group at FD (`fanotify_init` FLAGS, hex; its events' fds O_RDONLY) with an inode mark on PATH for MASK (hex) |
//! | `pidfd:FD[:p]`        | a pidfd of this process at FD (`p`: of its parent)           |
//! | `tcplisten:FD`        | a TCP socket at FD listening on 127.0.0.1, port chosen by the kernel |
//! | `fork`                | fork; the child runs the rest                               |
//! | `clonefiles`          | a child *process* sharing this fd table (CLONE_FILES); it only waits, and reports no readiness (its table is the parent's) |
use std::{
    io::{BufRead, BufReader},
    os::{
        fd::{AsRawFd, BorrowedFd, IntoRawFd, RawFd},
        unix::process::CommandExt,
    },
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use nix::{
    fcntl::{self, FcntlArg, FdFlag, OFlag},
    sys::stat::Mode,
    unistd::{self, ForkResult},
};

/// The environment variable naming the fd on which each process reports readiness.
pub const READY_ENV: &str = "CRD_FIXTURE_READY";

#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("bad fixture step {0:?}")]
    BadStep(String),
    #[error("fixture step {step:?} failed: {source}")]
    Failed { step: String, source: nix::Error },
}

/// The pattern `fill` writes: byte i is `(i % 251) as u8`, so order errors show.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn num<T: std::str::FromStr>(step: &str, s: Option<&str>) -> Result<T, FixtureError> {
    s.and_then(|s| s.parse().ok()).ok_or_else(|| FixtureError::BadStep(step.to_string()))
}

fn move_fd(from: RawFd, to: RawFd, step: &str) -> Result<(), FixtureError> {
    if from != to {
        let failed = |source| FixtureError::Failed { step: step.to_string(), source };
        // SAFETY: `from` is an fd this process just created and owns; dup2 onto `to`
        // deliberately replaces whatever was there, as the step asks.
        let ret = unsafe { libc::dup2(from, to) };
        if ret < 0 {
            return Err(failed(nix::Error::last()));
        }
        // SAFETY: `from` is owned by us and no longer needed.
        unsafe { libc::close(from) };
    }
    Ok(())
}

fn borrowed(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: the fixture names fds that its own earlier steps opened and keeps them
    // open for its whole life; a wrong number only makes the syscall fail with EBADF.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// Runs the steps, reports readiness, and waits forever (until killed).
pub fn run(steps: &[String]) -> Result<(), FixtureError> {
    die_with_parent();
    crate::sys::raise_fd_limit();
    let mut i = 0;
    let mut depth = 0;
    while i < steps.len() {
        let step = steps[i].as_str();
        i += 1;
        let mut parts = step.splitn(4, ':');
        let op = parts.next().unwrap_or_default();
        let failed = |source| FixtureError::Failed { step: step.to_string(), source };
        match op {
            "pipe" => {
                let (r, w): (RawFd, RawFd) = (num(step, parts.next())?, num(step, parts.next())?);
                let (pr, pw) = unistd::pipe().map_err(failed)?;
                let (pr, pw) = (pr.into_raw_fd(), pw.into_raw_fd());
                // Park both ends above the requested numbers first, so moving one
                // cannot clobber the other.
                let high_r = fcntl::fcntl(borrowed(pr), FcntlArg::F_DUPFD(1000)).map_err(failed)?;
                let high_w = fcntl::fcntl(borrowed(pw), FcntlArg::F_DUPFD(1000)).map_err(failed)?;
                // SAFETY: pr and pw are ours and replaced by their high copies.
                unsafe {
                    libc::close(pr);
                    libc::close(pw);
                }
                move_fd(high_r, r, step)?;
                move_fd(high_w, w, step)?;
            }
            "dup" => {
                let (a, b): (RawFd, RawFd) = (num(step, parts.next())?, num(step, parts.next())?);
                // SAFETY: dup2 of an fd we hold onto the requested number.
                if unsafe { libc::dup2(a, b) } < 0 {
                    return Err(failed(nix::Error::last()));
                }
            }
            "open" => {
                let fd: RawFd = num(step, parts.next())?;
                let mode = parts.next().unwrap_or_default();
                let path = parts.next().ok_or_else(|| FixtureError::BadStep(step.to_string()))?;
                let mut flags = match (mode.contains('r'), mode.contains('w')) {
                    (true, true) => OFlag::O_RDWR,
                    (false, true) => OFlag::O_WRONLY,
                    _ => OFlag::O_RDONLY,
                };
                for (letter, flag) in [
                    ('a', OFlag::O_APPEND),
                    ('c', OFlag::O_CREAT),
                    ('t', OFlag::O_TRUNC),
                    ('n', OFlag::O_NONBLOCK),
                ] {
                    if mode.contains(letter) {
                        flags |= flag;
                    }
                }
                let opened = fcntl::open(path, flags, Mode::from_bits_truncate(0o600)).map_err(failed)?;
                move_fd(opened.into_raw_fd(), fd, step)?;
            }
            "mkfifo" => {
                let path = parts.next().ok_or_else(|| FixtureError::BadStep(step.to_string()))?;
                unistd::mkfifo(path, Mode::from_bits_truncate(0o600)).map_err(failed)?;
            }
            "seek" => {
                let (fd, to): (RawFd, i64) = (num(step, parts.next())?, num(step, parts.next())?);
                unistd::lseek(borrowed(fd), to, unistd::Whence::SeekSet).map_err(failed)?;
            }
            "write" | "fill" => {
                let fd: RawFd = num(step, parts.next())?;
                let data = if op == "write" {
                    parts.collect::<Vec<_>>().join(":").into_bytes()
                } else {
                    pattern(num(step, parts.next())?)
                };
                let mut done = 0;
                while done < data.len() {
                    done += unistd::write(borrowed(fd), &data[done..]).map_err(failed)?;
                }
            }
            "pipesz" => {
                let (fd, size): (RawFd, i32) = (num(step, parts.next())?, num(step, parts.next())?);
                fcntl::fcntl(borrowed(fd), FcntlArg::F_SETPIPE_SZ(size)).map_err(failed)?;
            }
            "cloexec" => {
                let fd: RawFd = num(step, parts.next())?;
                fcntl::fcntl(borrowed(fd), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(failed)?;
            }
            "nonblock" => {
                let fd: RawFd = num(step, parts.next())?;
                let flags = fcntl::fcntl(borrowed(fd), FcntlArg::F_GETFL).map_err(failed)?;
                let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
                fcntl::fcntl(borrowed(fd), FcntlArg::F_SETFL(flags)).map_err(failed)?;
            }
            "close" => {
                let fd: RawFd = num(step, parts.next())?;
                unistd::close(fd).map_err(failed)?;
            }
            "setsid" => {
                unistd::setsid().map_err(failed)?;
            }
            "setpgid" => {
                unistd::setpgid(unistd::Pid::from_raw(0), unistd::Pid::from_raw(0)).map_err(failed)?;
            }
            "ctty" | "packet" => {
                let fd: RawFd = num(step, parts.next())?;
                let (request, arg) = if op == "ctty" { (libc::TIOCSCTTY, 0) } else { (libc::TIOCPKT, 1) };
                let arg: libc::c_int = arg;
                // SAFETY: TIOCSCTTY takes an int argument; TIOCPKT reads one int.
                let ret = unsafe {
                    if op == "ctty" { libc::ioctl(fd, request, arg) } else { libc::ioctl(fd, request, &arg) }
                };
                if ret < 0 {
                    return Err(failed(nix::Error::last()));
                }
            }
            "foreground" => {
                let fd: RawFd = num(step, parts.next())?;
                // A background group asking for the foreground gets SIGTTOU unless it
                // blocks it.
                let mut ttou = nix::sys::signal::SigSet::empty();
                ttou.add(nix::sys::signal::Signal::SIGTTOU);
                ttou.thread_block().map_err(failed)?;
                let done = unistd::tcsetpgrp(borrowed(fd), unistd::getpgrp());
                ttou.thread_unblock().map_err(failed)?;
                done.map_err(failed)?;
            }
            "winsize" => {
                let fd: RawFd = num(step, parts.next())?;
                let rows: u16 = num(step, parts.next())?;
                let cols: u16 = num(step, parts.next())?;
                let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
                // SAFETY: TIOCSWINSZ reads one winsize.
                if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } < 0 {
                    return Err(failed(nix::Error::last()));
                }
            }
            "raw" => {
                use nix::sys::termios::{self, InputFlags, LocalFlags, SetArg};
                let fd: RawFd = num(step, parts.next())?;
                let mut t = termios::tcgetattr(borrowed(fd)).map_err(failed)?;
                t.local_flags.remove(LocalFlags::ECHO | LocalFlags::ICANON);
                t.input_flags.remove(InputFlags::ICRNL);
                termios::tcsetattr(borrowed(fd), SetArg::TCSANOW, &t).map_err(failed)?;
            }
            "pipes" => {
                let n: usize = num(step, parts.next())?;
                for _ in 0..n {
                    let (r, w) = unistd::pipe().map_err(failed)?;
                    // Kept open for the fixture's life.
                    let _ = (r.into_raw_fd(), w.into_raw_fd());
                }
            }
            "threads" => {
                let n: usize = num(step, parts.next())?;
                for _ in 0..n {
                    std::thread::spawn(|| {
                        loop {
                            std::thread::sleep(Duration::from_secs(3600));
                        }
                    });
                }
            }
            "threadchurn" => {
                std::thread::spawn(|| {
                    loop {
                        let _ = std::thread::spawn(|| {}).join();
                    }
                });
            }
            "fdchurn" => {
                std::thread::spawn(|| {
                    loop {
                        // Dropping the OwnedFds closes them.
                        drop(unistd::pipe());
                        drop(fcntl::open("/dev/null", OFlag::O_RDWR, Mode::empty()));
                    }
                });
            }
            "nodump" => {
                // SAFETY: PR_SET_DUMPABLE only sets a flag on this process.
                unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0) };
            }
            "comm" => {
                let name = parts.next().unwrap_or_default();
                let name =
                    std::ffi::CString::new(name).map_err(|_| FixtureError::BadStep(step.to_string()))?;
                // SAFETY: PR_SET_NAME reads a NUL-terminated string (truncated to 16 bytes).
                unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
            }
            "socketpair" => {
                let (a, b): (RawFd, RawFd) = (num(step, parts.next())?, num(step, parts.next())?);
                let sock_type = match parts.next().unwrap_or("s") {
                    "s" => libc::SOCK_STREAM,
                    "d" => libc::SOCK_DGRAM,
                    "q" => libc::SOCK_SEQPACKET,
                    _ => return Err(FixtureError::BadStep(step.to_string())),
                };
                let mut pair = [0; 2];
                // SAFETY: socketpair writes two fds into the array we pass.
                if unsafe { libc::socketpair(libc::AF_UNIX, sock_type, 0, pair.as_mut_ptr()) } < 0 {
                    return Err(failed(nix::Error::last()));
                }
                let high_a = fcntl::fcntl(borrowed(pair[0]), FcntlArg::F_DUPFD(1000)).map_err(failed)?;
                let high_b = fcntl::fcntl(borrowed(pair[1]), FcntlArg::F_DUPFD(1000)).map_err(failed)?;
                // SAFETY: the originals are ours and replaced by their high copies.
                unsafe {
                    libc::close(pair[0]);
                    libc::close(pair[1]);
                }
                move_fd(high_a, a, step)?;
                move_fd(high_b, b, step)?;
            }
            "shutdown" => {
                let sock: RawFd = num(step, parts.next())?;
                let how = match parts.next() {
                    Some("r") => libc::SHUT_RD,
                    Some("w") => libc::SHUT_WR,
                    Some("rw") => libc::SHUT_RDWR,
                    _ => return Err(FixtureError::BadStep(step.to_string())),
                };
                // SAFETY: plain syscall with integer arguments.
                if unsafe { libc::shutdown(sock, how) } < 0 {
                    return Err(failed(nix::Error::last()));
                }
            }
            "sendfd" => {
                let (sock, fd): (RawFd, RawFd) = (num(step, parts.next())?, num(step, parts.next())?);
                let fds = [fd];
                let rights = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
                let iov = [std::io::IoSlice::new(b"F")];
                // MSG_NOSIGNAL: a peer that is gone is an error to report, not a SIGPIPE.
                nix::sys::socket::sendmsg::<()>(
                    sock,
                    &iov,
                    &rights,
                    nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(failed)?;
            }
            "eventfd" => {
                let fd: RawFd = num(step, parts.next())?;
                let count: u32 = num(step, parts.next())?;
                let letters = parts.next().unwrap_or_default();
                let mut flags = 0;
                if letters.contains('s') {
                    flags |= libc::EFD_SEMAPHORE;
                }
                if letters.contains('n') {
                    flags |= libc::EFD_NONBLOCK;
                }
                // SAFETY: plain syscall with integer arguments.
                let made = unsafe { libc::eventfd(count, flags) };
                if made < 0 {
                    return Err(failed(nix::Error::last()));
                }
                move_fd(made, fd, step)?;
            }
            "memfd" => {
                let mut parts = step.splitn(5, ':').skip(1);
                let fd: RawFd = num(step, parts.next())?;
                let name = parts.next().unwrap_or_default();
                let len: usize = num(step, parts.next())?;
                let letters = parts.next().unwrap_or_default();
                let name =
                    std::ffi::CString::new(name).map_err(|_| FixtureError::BadStep(step.to_string()))?;
                let made = nix::sys::memfd::memfd_create(
                    name.as_c_str(),
                    nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
                )
                .map_err(failed)?;
                let data = pattern(len.min(1 << 20));
                let mut written = 0;
                while written < len {
                    let chunk = &data[..(len - written).min(data.len())];
                    written += unistd::write(&made, chunk).map_err(failed)?;
                }
                let mut seals = 0;
                for (letter, seal) in [
                    ('s', libc::F_SEAL_SHRINK),
                    ('g', libc::F_SEAL_GROW),
                    ('w', libc::F_SEAL_WRITE),
                    ('S', libc::F_SEAL_SEAL),
                ] {
                    if letters.contains(letter) {
                        seals |= seal;
                    }
                }
                if seals != 0 {
                    fcntl::fcntl(&made, FcntlArg::F_ADD_SEALS(fcntl::SealFlag::from_bits_retain(seals)))
                        .map_err(failed)?;
                }
                move_fd(made.into_raw_fd(), fd, step)?;
            }
            "epoll" => {
                let fd: RawFd = num(step, parts.next())?;
                // SAFETY: plain syscall with an integer argument.
                let made = unsafe { libc::epoll_create1(0) };
                if made < 0 {
                    return Err(failed(nix::Error::last()));
                }
                move_fd(made, fd, step)?;
            }
            "epollctl" => {
                let mut parts = step.splitn(5, ':').skip(1);
                let (ep, fd): (RawFd, RawFd) = (num(step, parts.next())?, num(step, parts.next())?);
                let events = parts
                    .next()
                    .and_then(|e| u32::from_str_radix(e.trim_start_matches("0x"), 16).ok())
                    .ok_or_else(|| FixtureError::BadStep(step.to_string()))?;
                let data = parts
                    .next()
                    .and_then(|d| match d.strip_prefix("0x") {
                        Some(hex) => u64::from_str_radix(hex, 16).ok(),
                        None => d.parse().ok(),
                    })
                    .ok_or_else(|| FixtureError::BadStep(step.to_string()))?;
                let mut event = libc::epoll_event { events, u64: data };
                // SAFETY: epoll_ctl reads one epoll_event from a valid pointer.
                if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut event) } != 0 {
                    return Err(failed(nix::Error::last()));
                }
            }
            "timerfd" => {
                let mut parts = step.splitn(6, ':').skip(1);
                let fd: RawFd = num(step, parts.next())?;
                let clock = match parts.next().unwrap_or("monotonic") {
                    "monotonic" => libc::CLOCK_MONOTONIC,
                    "realtime" => libc::CLOCK_REALTIME,
                    "boottime" => libc::CLOCK_BOOTTIME,
                    "realtime_alarm" => libc::CLOCK_REALTIME_ALARM,
                    "boottime_alarm" => libc::CLOCK_BOOTTIME_ALARM,
                    other => num(step, Some(other))?,
                };
                let value_ms: u64 = parts.next().map_or(Ok(0), |v| num(step, Some(v)))?;
                let interval_ms: u64 = parts.next().map_or(Ok(0), |v| num(step, Some(v)))?;
                let letters = parts.next().unwrap_or_default();
                let flags = if letters.contains('n') { libc::TFD_NONBLOCK } else { 0 };
                // SAFETY: plain syscall with integer arguments.
                let made = unsafe { libc::timerfd_create(clock, flags) };
                if made < 0 {
                    return Err(failed(nix::Error::last()));
                }
                if value_ms != 0 || interval_ms != 0 || !letters.is_empty() {
                    let ms = |ms: u64| libc::timespec {
                        tv_sec: (ms / 1000) as _,
                        tv_nsec: (ms % 1000 * 1_000_000) as libc::c_long,
                    };
                    let mut value = libc::itimerspec { it_interval: ms(interval_ms), it_value: ms(value_ms) };
                    let mut set = 0;
                    if letters.contains('a') {
                        set |= libc::TFD_TIMER_ABSTIME;
                        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
                        // SAFETY: clock_gettime writes one timespec to a valid pointer.
                        unsafe { libc::clock_gettime(clock, &mut now) };
                        let ns = now.tv_nsec as u64 + value_ms % 1000 * 1_000_000;
                        value.it_value = libc::timespec {
                            tv_sec: now.tv_sec + ((value_ms / 1000) + (ns / 1_000_000_000)) as i64,
                            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
                        };
                    }
                    if letters.contains('c') {
                        set |= libc::TFD_TIMER_CANCEL_ON_SET;
                    }
                    // SAFETY: `made` is our live timerfd and `value` a valid itimerspec.
                    if unsafe { libc::timerfd_settime(made, set, &value, std::ptr::null_mut()) } != 0 {
                        return Err(failed(nix::Error::last()));
                    }
                }
                move_fd(made, fd, step)?;
            }
            "signalfd" => {
                let fd: RawFd = num(step, parts.next())?;
                let mut mask = nix::sys::signal::SigSet::empty();
                for name in parts.next().unwrap_or_default().split(',').filter(|n| !n.is_empty()) {
                    let signal: nix::sys::signal::Signal =
                        format!("SIG{name}").parse().map_err(|_| FixtureError::BadStep(step.to_string()))?;
                    mask.add(signal);
                }
                // A signalfd reports only signals its reader blocks: block them, as a
                // program reading them through a signalfd does.
                mask.thread_block().map_err(failed)?;
                // SAFETY: signalfd reads one sigset_t from a valid pointer; -1 asks for a
                // new fd.
                let made = unsafe { libc::signalfd(-1, mask.as_ref(), 0) };
                if made < 0 {
                    return Err(failed(nix::Error::last()));
                }
                move_fd(made, fd, step)?;
            }
            "pty" => {
                let (m, s): (RawFd, RawFd) = (num(step, parts.next())?, num(step, parts.next())?);
                let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY).map_err(failed)?;
                nix::pty::grantpt(&master).map_err(failed)?;
                nix::pty::unlockpt(&master).map_err(failed)?;
                // SAFETY: ptsname is not thread-safe; the fixture runs its steps on one
                // thread (a `threads` step only starts sleepers).
                let name = unsafe { nix::pty::ptsname(&master) }.map_err(failed)?;
                let slave = fcntl::open(name.as_str(), OFlag::O_RDWR | OFlag::O_NOCTTY, Mode::empty())
                    .map_err(failed)?;
                let high_m = fcntl::fcntl(&master, FcntlArg::F_DUPFD(1000)).map_err(failed)?;
                let high_s = fcntl::fcntl(&slave, FcntlArg::F_DUPFD(1000)).map_err(failed)?;
                drop((master, slave));
                move_fd(high_m, m, step)?;
                move_fd(high_s, s, step)?;
            }
            "inotify" => {
                let fd: RawFd = num(step, parts.next())?;
                let mask = parts
                    .next()
                    .and_then(|m| u32::from_str_radix(m, 16).ok())
                    .ok_or_else(|| FixtureError::BadStep(step.to_string()))?;
                let path = parts.next().ok_or_else(|| FixtureError::BadStep(step.to_string()))?;
                let path =
                    std::ffi::CString::new(path).map_err(|_| FixtureError::BadStep(step.to_string()))?;
                // SAFETY: plain syscall with an integer argument.
                let made = unsafe { libc::inotify_init1(0) };
                if made < 0 {
                    return Err(failed(nix::Error::last()));
                }
                // SAFETY: `path` is a NUL-terminated string alive for the call.
                if unsafe { libc::inotify_add_watch(made, path.as_ptr(), mask) } < 0 {
                    return Err(failed(nix::Error::last()));
                }
                move_fd(made, fd, step)?;
            }
            "fanotify" => {
                let mut parts = step.splitn(5, ':').skip(1);
                let fd: RawFd = num(step, parts.next())?;
                let hex = |s: Option<&str>| {
                    s.and_then(|v| u64::from_str_radix(v, 16).ok())
                        .ok_or_else(|| FixtureError::BadStep(step.to_string()))
                };
                let (flags, mask) = (hex(parts.next())?, hex(parts.next())?);
                let path = parts.next().ok_or_else(|| FixtureError::BadStep(step.to_string()))?;
                let path =
                    std::ffi::CString::new(path).map_err(|_| FixtureError::BadStep(step.to_string()))?;
                // SAFETY: plain syscall with integer arguments.
                let made =
                    unsafe { libc::syscall(libc::SYS_fanotify_init, flags as libc::c_uint, libc::O_RDONLY) };
                if made < 0 {
                    return Err(failed(nix::Error::last()));
                }
                // SAFETY: `path` is a NUL-terminated string alive for the call;
                // FAN_MARK_ADD (1) of an inode mark.
                let marked = unsafe {
                    libc::syscall(
                        libc::SYS_fanotify_mark,
                        made,
                        1 as libc::c_uint,
                        mask,
                        libc::AT_FDCWD,
                        path.as_ptr(),
                    )
                };
                if marked < 0 {
                    return Err(failed(nix::Error::last()));
                }
                move_fd(made as RawFd, fd, step)?;
            }
            "pidfd" => {
                let fd: RawFd = num(step, parts.next())?;
                let pid = if parts.next() == Some("p") { unistd::getppid() } else { unistd::getpid() };
                // SAFETY: plain syscall with integer arguments.
                let made = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
                if made < 0 {
                    return Err(failed(nix::Error::last()));
                }
                move_fd(made as RawFd, fd, step)?;
            }
            "tcplisten" => {
                let fd: RawFd = num(step, parts.next())?;
                let listener = std::net::TcpListener::bind("127.0.0.1:0")
                    .map_err(|e| failed(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
                move_fd(listener.into_raw_fd(), fd, step)?;
            }
            "clonefiles" => {
                let stack: &'static mut [u8] = Box::leak(vec![0u8; 256 * 1024].into_boxed_slice());
                let child: Box<dyn FnMut() -> isize> = Box::new(|| {
                    die_with_parent();
                    loop {
                        // SAFETY: pause has no preconditions.
                        unsafe { libc::pause() };
                    }
                });
                // SAFETY: the child runs on its own leaked stack and only calls prctl and
                // pause; it shares the fd table (CLONE_FILES) but not the address space.
                unsafe {
                    nix::sched::clone(child, stack, nix::sched::CloneFlags::CLONE_FILES, Some(libc::SIGCHLD))
                }
                .map_err(failed)?;
            }
            "fork" => {
                // SAFETY: the fixture is single-threaded at a fork unless a `threads`
                // step came first; the child only runs the step interpreter, which does
                // plain syscalls and small allocations.
                match unsafe { unistd::fork() }.map_err(failed)? {
                    ForkResult::Child => {
                        die_with_parent();
                        depth += 1;
                        continue;
                    }
                    ForkResult::Parent { .. } => break,
                }
            }
            _ => return Err(FixtureError::BadStep(step.to_string())),
        }
    }
    report_ready(depth);
    loop {
        // SAFETY: pause has no preconditions; the process waits for a signal.
        unsafe { libc::pause() };
    }
}

fn die_with_parent() {
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on this process.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
}

fn report_ready(depth: u32) {
    let Some(fd) = std::env::var(READY_ENV).ok().and_then(|v| v.parse::<RawFd>().ok()) else {
        return;
    };
    let line = format!("{depth} {}\n", std::process::id());
    let _ = unistd::write(borrowed(fd), line.as_bytes());
    let _ = unistd::close(fd);
}

/// Where a spawned fixture reports readiness: high enough that no step uses it.
const READY_FD: RawFd = 900;

/// A running fixture tree, killed (with every descendant) when dropped.
pub struct Spawned {
    child: Child,
    /// The fixture's stderr: a private file, so that no fd of the fixture is shared with
    /// the caller (whose own stderr may be anything).
    log: Option<tempfile::NamedTempFile>,
    /// PIDs of the fixture's processes, by depth (forks made before it), then PID.
    pub pids: Vec<u32>,
}

impl Spawned {
    /// The root process's PID.
    pub fn root(&self) -> u32 {
        self.child.id()
    }

    /// Kills the tree but keeps its stderr file (an image of the tree refers to it).
    pub fn stop(mut self) -> tempfile::NamedTempFile {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Descendants die with their parent; wait until they are gone.
        for pid in &self.pids {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::path::Path::new(&format!("/proc/{pid}/fd")).exists()
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        self.log.take().expect("the log lives until stop")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // Descendants die with their parent (PR_SET_PDEATHSIG).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `EXE fixture STEPS...` (EXE is a crd binary) and waits until its `processes`
/// processes are all set up.
pub fn spawn(exe: &Path, steps: &[&str], processes: usize) -> std::io::Result<Spawned> {
    let (ready_r, ready_w) = unistd::pipe2(OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
    let log = tempfile::NamedTempFile::new()?;
    let ready_w_raw = ready_w.as_raw_fd();
    let mut command = Command::new(exe);
    command
        .arg("fixture")
        .args(steps)
        .env(READY_ENV, READY_FD.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen()?);
    // SAFETY: the closure runs in the forked child before exec and only calls dup2 and
    // close_range, which are async-signal-safe; dup2 clears close-on-exec on the copy, so exactly the
    // ready fd survives the exec.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(ready_w_raw, READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Start from a clean table: only 0-2 and the ready fd, whatever the
            // caller had open.
            crate::sys::close_range(3, READY_FD as u32 - 1);
            crate::sys::close_range(READY_FD as u32 + 1, u32::MAX);
            Ok(())
        });
    }
    let child = command.spawn()?;
    drop(ready_w);
    let mut spawned = Spawned { child, log: Some(log), pids: Vec::new() };
    // Read to EOF, not just N lines: EOF means every process has also *closed* its copy
    // of the ready fd, so none is left in the tables the caller is about to inspect.
    let mut ready: Vec<(u32, u32)> = BufReader::new(std::fs::File::from(ready_r))
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| {
            let (depth, pid) = l.trim().split_once(' ')?;
            Some((depth.parse().ok()?, pid.parse().ok()?))
        })
        .collect();
    ready.sort_unstable();
    spawned.pids = ready.into_iter().map(|(_, pid)| pid).collect();
    if spawned.pids.len() != processes {
        return Err(std::io::Error::other(format!(
            "fixture {steps:?}: {} of {processes} processes became ready: {}",
            spawned.pids.len(),
            spawned
                .log
                .as_ref()
                .and_then(|l| std::fs::read_to_string(l.path()).ok())
                .unwrap_or_default()
                .trim()
        )));
    }
    Ok(spawned)
}
