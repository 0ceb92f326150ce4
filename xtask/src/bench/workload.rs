//! The benchmark's workloads: process trees holding pipes, forked and wired by xtask
//! itself (no exec), so that 1,000 processes come up in well under a second.
//!
//! Every workload process dies with its parent (PR_SET_PDEATHSIG), its root with
//! xtask; [`Workload`] kills them all when dropped (on success, error or Ctrl-C), and
//! xtask, a child subreaper, reaps them, so the next measurement starts on a quiet
//! machine and nothing outlives the bench.
use std::{
    io::Read,
    os::fd::{FromRawFd, RawFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// How a workload's pipes are laid out.
#[derive(Clone, Copy, Debug)]
pub enum Wiring {
    /// Each process makes `pipes` pipes of its own and keeps both ends.
    Private { pipes: usize },
    /// The root makes `processes × pipes` pipes, fills one in `every` with `bytes`
    /// bytes, then forks the others; process c keeps the read ends of block c and the
    /// write ends of block c+1 (mod processes): every pipe links two processes.
    Ring { pipes: usize, every: usize, bytes: usize },
    /// One process holding both ends of `pairs` unix stream socketpairs.
    UnixPairs { pairs: usize },
    /// One process, in a network namespace of its own (loopback up), holding both ends
    /// of `connections` TCP connections over 127.0.0.1 (the listener is closed once
    /// they are accepted): established connections, nothing else in that namespace.
    Tcp { connections: usize },
}

impl Wiring {
    /// fds each process holds.
    pub fn fds_per_process(self) -> usize {
        match self {
            Wiring::Private { pipes } | Wiring::Ring { pipes, .. } => 2 * pipes,
            Wiring::UnixPairs { pairs: n } | Wiring::Tcp { connections: n } => 2 * n,
        }
    }

    /// Bytes queued in all the workload's pipes.
    pub fn queued_bytes(self, processes: usize) -> u64 {
        match self {
            Wiring::Private { .. } | Wiring::UnixPairs { .. } | Wiring::Tcp { .. } => 0,
            Wiring::Ring { pipes, every, bytes } => {
                ((processes * pipes).div_ceil(every.max(1)) * bytes) as u64
            }
        }
    }
}

/// A running workload: a root process (xtask's child) and its children.
pub struct Workload {
    root: i32,
    /// Every process, the root first.
    pub pids: Vec<i32>,
}

/// xtask adopts orphaned descendants (workload children once their root is killed,
/// restored stubs once crd has exited) so it can reap them and know they are gone.
pub fn become_subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only sets a flag on this process.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
}

impl Workload {
    /// Forks the workload and waits until every process holds its pipes.
    pub fn spawn(processes: usize, wiring: Wiring) -> Result<Workload> {
        let mut ready = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        if unsafe { libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(std::io::Error::last_os_error()).context("pipe2");
        }
        // SAFETY: getpid has no preconditions.
        let xtask = unsafe { libc::getpid() };
        // SAFETY: xtask is single-threaded (it runs commands, never threads), so the
        // child may allocate; it only runs `root_process`, which never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("fork");
        }
        if pid == 0 {
            root_process(ready[1], xtask, processes, wiring);
        }
        let mut workload = Workload { root: pid, pids: Vec::new() };
        // SAFETY: ready[1] is ours; the workload holds its own copies.
        unsafe { libc::close(ready[1]) };
        // SAFETY: ready[0] is ours and owned by the File from here on.
        let mut reader = unsafe { std::fs::File::from_raw_fd(ready[0]) };
        // EOF: every process has reported and closed its copy of the ready pipe.
        let mut report = String::new();
        reader.read_to_string(&mut report).context("reading the workload's readiness")?;
        for line in report.lines() {
            match line.strip_prefix('!') {
                Some(error) => bail!("a workload process failed: {error}"),
                None => workload.pids.push(line.trim().parse().context("a workload PID")?),
            }
        }
        if workload.pids.len() != processes {
            bail!("{} of {processes} workload processes became ready", workload.pids.len());
        }
        // The root reports last; put it first.
        if let Some(i) = workload.pids.iter().position(|&p| p == pid) {
            workload.pids.swap(0, i);
        }
        Ok(workload)
    }

    pub fn root(&self) -> i32 {
        self.root
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let mut all = self.pids.clone();
        if !all.contains(&self.root) {
            all.push(self.root);
        }
        kill_and_reap(&all);
    }
}

/// SIGKILLs `pids` and waits (up to 30 s) until xtask has reaped each of them: they are
/// its children or, as a subreaper, its adopted orphans.
pub fn kill_and_reap(pids: &[i32]) {
    for &pid in pids {
        // SAFETY: kill with a PID this bench created; at worst ESRCH.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut left: std::collections::HashSet<i32> = pids.iter().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !left.is_empty() && Instant::now() < deadline {
        // SAFETY: waitpid with a null status pointer reaps any child.
        let reaped = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if reaped > 0 {
            left.remove(&reaped);
            continue;
        }
        if reaped < 0 {
            // ECHILD: what is left is not ours to reap; gone for our purpose if dead.
            // SAFETY: kill(pid, 0) only checks existence.
            left.retain(|&p| unsafe { libc::kill(p, 0) } == 0);
            if left.is_empty() {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The workload's root: never returns.
fn root_process(ready: RawFd, xtask: i32, processes: usize, wiring: Wiring) -> ! {
    let result = (|| -> Result<(), String> {
        die_with(xtask)?;
        only_keep(&[ready]);
        raise_fd_limit();
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        match wiring {
            Wiring::Private { pipes } => {
                // Children first, so they do not inherit the root's pipes.
                for _ in 1..processes {
                    if fork()? == 0 {
                        let result = die_with(me).and_then(|()| make_pipes(pipes).map(drop));
                        finish(ready, result);
                    }
                }
                make_pipes(pipes)?;
            }
            Wiring::Ring { pipes, every, bytes } => {
                let all = make_pipes(processes * pipes)?;
                let data = vec![b'x'; bytes];
                for (i, &[_, write]) in all.iter().enumerate() {
                    if i % every.max(1) == 0 {
                        // SAFETY: write from a live buffer to a pipe we hold.
                        if unsafe { libc::write(write, data.as_ptr().cast(), data.len()) } != bytes as isize {
                            return Err(format!("filling pipe {i}: {}", std::io::Error::last_os_error()));
                        }
                    }
                }
                for c in 1..processes {
                    if fork()? == 0 {
                        let result = die_with(me).map(|()| keep_ring_share(&all, pipes, processes, c));
                        finish(ready, result);
                    }
                }
                keep_ring_share(&all, pipes, processes, 0);
            }
            Wiring::UnixPairs { pairs } => {
                for i in 0..pairs {
                    let mut pair = [0; 2];
                    // SAFETY: socketpair writes two fds into the array.
                    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) } < 0
                    {
                        return Err(format!(
                            "socketpair {i} of {pairs}: {}",
                            std::io::Error::last_os_error()
                        ));
                    }
                }
            }
            Wiring::Tcp { connections } => {
                private_loopback()?;
                tcp_connections(connections)?;
            }
        }
        Ok(())
    })();
    finish(ready, result)
}

/// Process `c` of a ring keeps the read ends of block c and the write ends of block
/// c+1, and closes every other end.
fn keep_ring_share(all: &[[RawFd; 2]], pipes: usize, processes: usize, c: usize) {
    for (i, &[read, write]) in all.iter().enumerate() {
        let block = i / pipes;
        if block != c {
            // SAFETY: closing an fd this process holds and does not keep.
            unsafe { libc::close(read) };
        }
        if block != (c + 1) % processes {
            // SAFETY: as above.
            unsafe { libc::close(write) };
        }
    }
}

/// Reports readiness (or the error) on the ready pipe, closes it, and waits to be
/// killed.
fn finish(ready: RawFd, result: Result<(), String>) -> ! {
    // SAFETY: getpid has no preconditions.
    let line = match result {
        Ok(()) => format!("{}\n", unsafe { libc::getpid() }),
        Err(e) => format!("!{e}\n"),
    };
    // SAFETY: one write of a live buffer (< PIPE_BUF: lines never interleave), then
    // close of our own copy of the ready pipe.
    unsafe {
        libc::write(ready, line.as_ptr().cast(), line.len());
        libc::close(ready);
    }
    if line.starts_with('!') {
        // SAFETY: _exit skips the destructors of xtask's state, which is not ours.
        unsafe { libc::_exit(1) }
    }
    loop {
        // SAFETY: pause has no preconditions; the process waits to be killed.
        unsafe { libc::pause() };
    }
}

fn fork() -> Result<i32, String> {
    // SAFETY: the workload is single-threaded; the child runs plain syscalls.
    let pid = unsafe { libc::fork() };
    if pid < 0 { Err(format!("fork: {}", std::io::Error::last_os_error())) } else { Ok(pid) }
}

/// Dies when `parent` does; fails if it already has (we were orphaned before asking).
fn die_with(parent: i32) -> Result<(), String> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid only touch this process's state.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            return Err("its parent died while it started".into());
        }
    }
    Ok(())
}

/// Closes every fd but `keep` (stdin, stdout, stderr too): the workload's tables hold
/// exactly its pipes, and nothing of xtask's.
fn only_keep(keep: &[RawFd]) {
    let mut keep = keep.to_vec();
    keep.sort_unstable();
    let mut from = 0u32;
    for &fd in &keep {
        if fd as u32 > from {
            close_range(from, fd as u32 - 1);
        }
        from = fd as u32 + 1;
    }
    close_range(from, u32::MAX);
}

/// fds xtask, its workloads and the crd it runs may open: 20,000 sockets, and crd's
/// own copy of each while it restores them, pass the usual hard limit.
const FD_LIMIT: libc::rlim_t = 1 << 16;

/// Lifts xtask's RLIMIT_NOFILE (soft and hard) to [`FD_LIMIT`] if it is lower (root
/// with CAP_SYS_RESOURCE may raise the hard limit): workloads and crd inherit it.
/// Returns the hard limit in force afterwards.
pub fn raise_hard_fd_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_max < FD_LIMIT {
            let raised = libc::rlimit { rlim_cur: FD_LIMIT, rlim_max: FD_LIMIT };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return FD_LIMIT;
            }
            eprintln!(
                "bench: RLIMIT_NOFILE stays at {} (raising it to {FD_LIMIT}: {})",
                limit.rlim_max,
                std::io::Error::last_os_error()
            );
        }
        limit.rlim_max
    }
}

/// How many pairs (2 fds each) fit a process under the hard fd limit `hard`, leaving
/// 2,000 fds for crd's own while it restores them (it holds one per description): at
/// most `wanted`, in whole thousands.
pub fn pairs_within(hard: u64, wanted: usize) -> usize {
    let fit = (hard.saturating_sub(2_000) / 2 / 1_000 * 1_000) as usize;
    wanted.min(fit).max(1_000)
}

fn close_range(first: u32, last: u32) {
    // SAFETY: close_range closes fds of this process only.
    unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
}

/// RLIMIT_NOFILE's soft limit up to the hard one (which [`raise_hard_fd_limit`] lifted
/// for xtask and so for its workloads): 20,000 fds need it.
fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// A network namespace of the workload's own, its loopback up: its connections are
/// the only ones there, and nothing it does reaches the machine's network.
fn private_loopback() -> Result<(), String> {
    let error = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: unshare only moves this (single-threaded) process to a new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
        return Err(error("unshare(CLONE_NEWNET)"));
    }
    // `ip link set lo up`, without depending on iproute2: SIOCSIFFLAGS on any socket.
    // SAFETY: plain syscall; the fd is closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(error("socket"));
    }
    // SAFETY: ifreq is plain old data; all zeroes is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we pass; the flags
    // member of the union is the one these requests use.
    let up = unsafe {
        libc::ioctl(sock, libc::SIOCGIFFLAGS as libc::Ioctl, &mut request) == 0 && {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(sock, libc::SIOCSIFFLAGS as libc::Ioctl, &request) == 0
        }
    };
    let result = if up { Ok(()) } else { Err(error("bringing lo up")) };
    // SAFETY: our own socket.
    unsafe { libc::close(sock) };
    result
}

/// `n` TCP connections to a listener on 127.0.0.1 (an ephemeral port), each accepted
/// right after its connect; both ends stay open, the listener is closed.
fn tcp_connections(n: usize) -> Result<(), String> {
    let error = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    let socket = || {
        // SAFETY: plain syscall with integer arguments.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd < 0 { Err(error("socket")) } else { Ok(fd) }
    };
    let listener = socket()?;
    // SAFETY: sockaddr_in is plain old data; zeroes then the fields we set.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: bind/listen/getsockname read or write the sockaddr_in we pass, `len`
    // bytes at most.
    unsafe {
        if libc::bind(listener, (&raw const addr).cast(), len) < 0 || libc::listen(listener, 128) < 0 {
            return Err(error("listening on 127.0.0.1"));
        }
        if libc::getsockname(listener, (&raw mut addr).cast(), &mut len) < 0 {
            return Err(error("getsockname"));
        }
    }
    for i in 0..n {
        let client = socket()?;
        // SAFETY: connect reads the listener's address; accept4 asks for none.
        unsafe {
            if libc::connect(client, (&raw const addr).cast(), len) < 0 {
                return Err(format!("connection {i} of {n}: {}", std::io::Error::last_os_error()));
            }
            if libc::accept4(listener, std::ptr::null_mut(), std::ptr::null_mut(), 0) < 0 {
                return Err(format!("accepting connection {i} of {n}: {}", std::io::Error::last_os_error()));
            }
        }
    }
    // SAFETY: our own listener; the connections keep their own sockets.
    unsafe { libc::close(listener) };
    Ok(())
}

fn make_pipes(n: usize) -> Result<Vec<[RawFd; 2]>, String> {
    let mut all = Vec::with_capacity(n);
    for i in 0..n {
        let mut pair = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        if unsafe { libc::pipe2(pair.as_mut_ptr(), 0) } < 0 {
            return Err(format!("pipe {i} of {n}: {}", std::io::Error::last_os_error()));
        }
        all.push(pair);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fds_and_queued_bytes() {
        assert_eq!(Wiring::Private { pipes: 500 }.fds_per_process(), 1000);
        assert_eq!(Wiring::Private { pipes: 500 }.queued_bytes(100), 0);
        let ring = Wiring::Ring { pipes: 100, every: 10, bytes: 4096 };
        assert_eq!(ring.fds_per_process(), 200);
        assert_eq!(ring.queued_bytes(50), 500 * 4096);
        // Pipe 0 of every ten is filled: 11 of 101.
        assert_eq!(Wiring::Ring { pipes: 101, every: 10, bytes: 1 }.queued_bytes(1), 11);
        assert_eq!(Wiring::UnixPairs { pairs: 10_000 }.fds_per_process(), 20_000);
        assert_eq!(Wiring::Tcp { connections: 10 }.fds_per_process(), 20);
        assert_eq!(Wiring::Tcp { connections: 10 }.queued_bytes(1), 0);
        // A hard limit of 20,000 fds: 9,000 pairs, not the 10,000 asked for.
        assert_eq!(pairs_within(20_000, 10_000), 9_000);
        assert_eq!(pairs_within(65_536, 10_000), 10_000);
        assert_eq!(pairs_within(65_536, 2_000), 2_000);
    }
}
