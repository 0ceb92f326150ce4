//! A small tokio program for the event-loop round trip (tests/tests/event_loops.rs): a
//! current-thread runtime (its epoll and the eventfd that wakes it), a connected
//! `UnixStream` pair, an eventfd and a timerfd of its own registered with the runtime
//! through `AsyncFd`, and a TCP listener on 127.0.0.1 — the fd table of a real async
//! server, made by the library real servers use rather than by hand.
//!
//! Prints one JSON line (its PID and which fd is which), then waits in the runtime's
//! `epoll_wait` for any of them. Whatever wakes it ends the program: a test that sees it
//! exit knows its state moved under it.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::{
    io::unix::AsyncFd,
    net::{TcpListener, UnixStream},
};

/// The eventfd's starting count (nothing reads it: the runtime only waits for it).
const EVENTFD_COUNT: u32 = 41;
/// The timer: first expiry in an hour, then every 90.25 s; far enough that it never
/// fires while a test runs.
const TIMER_VALUE_S: i64 = 3600;
const TIMER_INTERVAL: (i64, i64) = (90, 250_000_000);

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let raw = unsafe { libc::eventfd(EVENTFD_COUNT, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn timerfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let spec = libc::itimerspec {
        it_interval: libc::timespec { tv_sec: TIMER_INTERVAL.0 as _, tv_nsec: TIMER_INTERVAL.1 as _ },
        it_value: libc::timespec { tv_sec: TIMER_VALUE_S as _, tv_nsec: 0 },
    };
    // SAFETY: `fd` is our live timerfd and `spec` a valid itimerspec for the call.
    if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The fd of this process that is an anon inode named `name` and not one of `ours`: the
/// runtime's own epoll and waker, which tokio does not expose.
fn runtime_fd(name: &str, ours: &[i32]) -> Option<i32> {
    let mut found: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(e.path()).ok()?;
            (link.to_str() == Some(name) && !ours.contains(&fd)).then_some(fd)
        })
        .collect();
    found.sort_unstable();
    found.first().copied()
}

fn main() -> io::Result<()> {
    // What the test runner leaked is not ours (close_range: 5.9, older than any kernel
    // crd runs on).
    // SAFETY: nothing in this process holds an fd above stderr yet.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
    runtime.block_on(async {
        let (a, b) = UnixStream::pair()?;
        // SAFETY: each AsyncFd owns its OwnedFd, which stays open, at one number, until
        // the AsyncFd is dropped.
        let event = unsafe { AsyncFd::register(eventfd()?) }?;
        // SAFETY: as above.
        let timer = unsafe { AsyncFd::register(timerfd()?) }?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let ours = [a.as_raw_fd(), b.as_raw_fd(), event.as_raw_fd(), timer.as_raw_fd(), listener.as_raw_fd()];
        // Arm the runtime's timer before printing: its first deadline wakes the runtime
        // through its eventfd (the waker's count goes up), which must happen before the
        // test reads the fd table, not after.
        let sleep = tokio::time::sleep(std::time::Duration::from_secs(24 * 3600));
        tokio::pin!(sleep);
        tokio::select! {
            biased;
            () = &mut sleep => {}
            () = std::future::ready(()) => {}
        }
        tokio::task::yield_now().await;
        let epoll = runtime_fd("anon_inode:[eventpoll]", &ours).unwrap_or(-1);
        let waker = runtime_fd("anon_inode:[eventfd]", &ours).unwrap_or(-1);
        println!(
            "{{\"pid\":{},\"epoll\":{epoll},\"waker\":{waker},\"a\":{},\"b\":{},\"eventfd\":{},\"timerfd\":{},\"listener\":{},\"port\":{}}}",
            std::process::id(),
            a.as_raw_fd(),
            b.as_raw_fd(),
            event.as_raw_fd(),
            timer.as_raw_fd(),
            listener.as_raw_fd(),
            listener.local_addr()?.port(),
        );
        // The eventfd stays registered but is not waited on: its count is not zero, so
        // it is ready from the start.
        tokio::select! {
            accepted = listener.accept() => { accepted?; }
            ready = a.readable() => { ready?; }
            ready = b.readable() => { ready?; }
            ready = timer.readable() => { ready?.retain_ready(); }
            () = &mut sleep => {}
        }
        drop(event);
        Ok(())
    })
}
