//! Thin, safe wrappers over the few syscalls nix does not cover: pidfds and kcmp(2).
//! Every failure names the call, so an error says what the kernel refused.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

use crate::types::{Fd, Pid};

/// A syscall that failed, and how.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {source}")]
pub struct SyscallError {
    pub call: &'static str,
    #[source]
    pub source: io::Error,
}

impl SyscallError {
    pub fn last(call: &'static str) -> Self {
        Self { call, source: io::Error::last_os_error() }
    }

    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

fn owned_fd(call: &'static str, ret: libc::c_long) -> Result<OwnedFd, SyscallError> {
    if ret < 0 {
        return Err(SyscallError::last(call));
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// `pidfd_open(2)`: a handle on the process that can never name a recycled PID.
pub fn pidfd_open(pid: Pid) -> Result<OwnedFd, SyscallError> {
    // SAFETY: plain syscall with integer arguments.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.0 as libc::pid_t, 0) };
    owned_fd("pidfd_open", ret)
}

/// `pidfd_getfd(2)`: a new fd in crd for the *same* open file description as `fd` in
/// the target. Anything done to the description (flags, offset, pipe size) is seen by
/// the target.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: Fd) -> Result<OwnedFd, SyscallError> {
    // SAFETY: plain syscall; pidfd is a live fd borrowed for the call.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd.0 as i32, 0) };
    owned_fd("pidfd_getfd", ret)
}

/// A BPF iterator link over the tasks (threads) of process `pid` only, as
/// `BPF_LINK_CREATE` makes it with `bpf_iter_link_info.task.pid` (6.1+), then the
/// iterator fd that runs it (`BPF_ITER_CREATE`): reading it runs `program` over that
/// process alone, where an unfiltered link visits every task on the machine. (aya 0.14's
/// `Iter::attach` takes no link info.) The link lives as long as the iterator fd.
pub fn bpf_task_iterator(program: BorrowedFd<'_>, pid: u32) -> Result<std::fs::File, SyscallError> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_ITER_CREATE: libc::c_long = 33;
    const BPF_TRACE_ITER: u32 = 28;
    // `union bpf_iter_link_info`: its `task` member is { tid, pid, pid_fd }; the union
    // is 16 bytes (its `cgroup` member).
    let mut info = [0u32; 4];
    info[1] = pid;
    // `union bpf_attr` for BPF_LINK_CREATE: prog_fd, target_fd, attach_type, flags,
    // then iter_info (a u64 address) and iter_info_len; the rest zero.
    let mut attr = [0u8; 64];
    attr[0..4].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&BPF_TRACE_ITER.to_ne_bytes());
    attr[16..24].copy_from_slice(&(info.as_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&(std::mem::size_of_val(&info) as u32).to_ne_bytes());
    // SAFETY: bpf(2) reads `attr` (its size passed) and, through it, the 16 bytes of
    // `info`; both outlive the call. It returns a new fd or -1.
    let link = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, attr.as_ptr(), attr.len()) };
    let link = owned_fd("bpf(BPF_LINK_CREATE)", link)?;
    let mut attr = [0u8; 16];
    attr[0..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: as above; BPF_ITER_CREATE reads link_fd and flags.
    let iter = unsafe { libc::syscall(libc::SYS_bpf, BPF_ITER_CREATE, attr.as_ptr(), attr.len()) };
    Ok(std::fs::File::from(owned_fd("bpf(BPF_ITER_CREATE)", iter)?))
}

/// Whether the process behind `pidfd` has exited (its pidfd polls readable).
pub fn pidfd_exited(pidfd: BorrowedFd<'_>) -> bool {
    let mut poll = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut poll, 1, 0) };
    n > 0
}

/// kcmp(2) resource types.
#[derive(Clone, Copy)]
pub enum Kcmp {
    /// Do `fd1` of `pid1` and `fd2` of `pid2` name one open file description?
    File(Fd, Fd),
    /// Do the two tasks share one fd table?
    Files,
}

/// `kcmp(2)`: whether two tasks share a kernel object.
pub fn kcmp_same(pid1: Pid, pid2: Pid, what: Kcmp) -> Result<bool, SyscallError> {
    const KCMP_FILE: libc::c_long = 0;
    const KCMP_FILES: libc::c_long = 2;
    let (kind, a, b) = match what {
        Kcmp::File(a, b) => (KCMP_FILE, a.0 as libc::c_long, b.0 as libc::c_long),
        Kcmp::Files => (KCMP_FILES, 0, 0),
    };
    // SAFETY: plain syscall with integer arguments.
    let ret =
        unsafe { libc::syscall(libc::SYS_kcmp, pid1.0 as libc::pid_t, pid2.0 as libc::pid_t, kind, a, b) };
    if ret < 0 {
        return Err(SyscallError::last("kcmp"));
    }
    Ok(ret == 0)
}

/// `kcmp(pid1, pid2, KCMP_EPOLL_TFD, fd1, {efd, tfd, toff})`: whether `fd1` of `pid1`
/// is the very file the epoll `efd` of `pid2` watches as its `toff`-th item registered
/// under fd number `tfd` (an epoll keys its items by file and fd number, so one number
/// may name several). Ok(false) when `fd1` is not open in `pid1` (EBADF): the number
/// the target was registered under may be closed since.
pub fn kcmp_epoll_tfd(
    pid1: Pid,
    fd1: Fd,
    pid2: Pid,
    efd: Fd,
    tfd: u32,
    toff: u32,
) -> Result<bool, SyscallError> {
    /// `KCMP_EPOLL_TFD` (include/uapi/linux/kcmp.h).
    const KCMP_EPOLL_TFD: libc::c_long = 7;
    /// `struct kcmp_epoll_slot` (include/uapi/linux/kcmp.h).
    #[repr(C)]
    struct KcmpEpollSlot {
        efd: u32,
        tfd: u32,
        toff: u32,
    }
    let slot = KcmpEpollSlot { efd: efd.0, tfd, toff };
    // SAFETY: the kernel only reads one `kcmp_epoll_slot` through the pointer, which
    // points at a live, properly laid out struct for the whole call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid1.0 as libc::pid_t,
            pid2.0 as libc::pid_t,
            KCMP_EPOLL_TFD,
            fd1.0 as libc::c_long,
            &raw const slot as libc::c_long,
        )
    };
    if ret < 0 {
        let err = SyscallError::last("kcmp(KCMP_EPOLL_TFD)");
        if err.errno() == Some(libc::EBADF) {
            return Ok(false);
        }
        return Err(err);
    }
    Ok(ret == 0)
}

/// Bytes queued in a pipe or ready in a socket (`FIONREAD`); reads nothing.
pub fn pipe_queued(fd: impl AsFd) -> Result<usize, SyscallError> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer we pass.
    let ret = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::FIONREAD, &mut n) };
    if ret < 0 {
        return Err(SyscallError::last("ioctl(FIONREAD)"));
    }
    Ok(n.max(0) as usize)
}

/// `pidfd_send_signal(2)`: signals exactly the process behind the pidfd.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> Result<(), SyscallError> {
    // SAFETY: plain syscall; no siginfo is passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if ret < 0 {
        return Err(SyscallError::last("pidfd_send_signal"));
    }
    Ok(())
}

/// Raises the soft limit on open fds to the hard limit (children inherit it): crd may
/// hold one fd per restored description, and fd numbers in an image may be high.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// `close_range(2)` through the raw syscall (musl's libc has no wrapper). Async-signal
/// safe: usable between fork and exec.
pub fn close_range(first: u32, last: u32) {
    if first > last {
        return;
    }
    // SAFETY: close_range closes fds of this process only; callers own that range.
    unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
}
