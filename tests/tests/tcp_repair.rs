//! Established TCP connections through an image (`crd checkpoint --tcp-established`,
//! TCP_REPAIR), compared through the kernel: names with getsockname/getpeername, queues
//! with MSG_PEEK and by reading them for real on `pidfd_getfd` copies, never through
//! crd's own output.
//!
//! Each test makes a network namespace of its own: `unshare(CLONE_NEWNET)` on its own
//! thread (a network namespace is per thread), `ip link set lo up` as a child, and every
//! process spawned from that thread afterwards (python, crd, crd's stubs) lives in it.
//! A python program holds both ends of a loopback connection with bytes queued both ways,
//! including bytes its peer's full window keeps in the send queue.
use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    time::{Duration, Instant},
};

use crd_tests::programs::{Program, grab, int_opt, own_network_namespace, set_int_opt, stderr};
use crd_tests::{crd, require_root, restore_with};

/// Bytes written but not yet sent (libc declares it for some targets only).
const SIOCOUTQNSD: libc::Ioctl = 0x894B;

/// Both ends of one loopback connection in one process: `c` (the client) has 1500 bytes
/// from `s` unread, then as much of a 1 MiB write as it took before its receive buffer,
/// shrunk after the handshake, made it drop what its advertised window still let `s`
/// send; `s` has 1500 bytes from `c` unread, and the rest of the 1 MiB in its send queue:
/// sent but unacknowledged (what `c` dropped; `s` retransmits it) and unsent (`c`'s window
/// is closed). `s` was accepted from a listener with SO_REUSEADDR (and inherits it); the
/// listener is closed.
const CONNECTION: &str = r#"
import json, os, socket, time
os.closerange(3, 4096)  # what the test runner leaked is not ours
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 0)); l.listen(1)
c = socket.create_connection(l.getsockname())
s, _ = l.accept()
l.close()
c.sendall(b"client->server " * 100)
s.sendall(b"server->client " * 100)
time.sleep(0.1)
c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 262144)
s.setblocking(False)
big = bytes(range(256)) * 4096
sent = 0
try:
    while sent < len(big):
        sent += s.send(big[sent:sent + 65536])
except BlockingIOError:
    pass
time.sleep(0.3)
print(json.dumps(dict(pid=os.getpid(), c=c.fileno(), s=s.fileno(), sent=sent,
                      c_port=c.getsockname()[1], s_port=s.getsockname()[1])), flush=True)
while True: time.sleep(3600)
"#;

struct Connection {
    program: Program,
    pid: u32,
    c: u32,
    s: u32,
    c_port: u64,
    s_port: u64,
    /// Everything `s` wrote, in order: what `c` reads in the end.
    to_c: Vec<u8>,
    /// Everything `c` wrote.
    to_s: Vec<u8>,
}

fn connection() -> Connection {
    let (program, info) = crd_tests::programs::python_json(CONNECTION, &[]);
    let num = |k: &str| info[k].as_u64().unwrap_or_else(|| panic!("{k} in {info}"));
    let big: Vec<u8> = (0..4096).flat_map(|_| 0..=255u8).collect();
    let mut to_c = b"server->client ".repeat(100);
    to_c.extend_from_slice(&big[..num("sent") as usize]);
    Connection {
        program,
        pid: num("pid") as u32,
        c: num("c") as u32,
        s: num("s") as u32,
        c_port: num("c_port"),
        s_port: num("s_port"),
        to_c,
        to_s: b"client->server ".repeat(100),
    }
}

fn ioctl_int(fd: BorrowedFd<'_>, request: libc::Ioctl) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD/TIOCOUTQ write one int into our local.
    assert_eq!(unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut n) }, 0, "ioctl {request:#x}");
    n as usize
}

/// getsockname and getpeername, as the kernel gives them.
fn names(fd: BorrowedFd<'_>) -> (String, String) {
    let name = |peer: bool| {
        let mut addr = [0u8; 128];
        let mut len = addr.len() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into our buffer.
        let ret = unsafe {
            if peer {
                libc::getpeername(fd.as_raw_fd(), addr.as_mut_ptr().cast(), &mut len)
            } else {
                libc::getsockname(fd.as_raw_fd(), addr.as_mut_ptr().cast(), &mut len)
            }
        };
        assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
        format!("{:?}", &addr[..len as usize])
    };
    (name(false), name(true))
}

/// The receive queue, read with MSG_PEEK (not consumed).
fn peek(fd: BorrowedFd<'_>) -> Vec<u8> {
    let len = ioctl_int(fd, libc::FIONREAD);
    let mut buf = vec![0u8; len];
    if len == 0 {
        return buf;
    }
    // SAFETY: recv writes at most len bytes into our buffer.
    let n = unsafe {
        libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), len, libc::MSG_PEEK | libc::MSG_DONTWAIT)
    };
    assert_eq!(n, len as isize, "peek: {}", std::io::Error::last_os_error());
    buf
}

/// Reads `want` bytes for real, waiting up to 30 s for them (bytes a peer dropped come
/// back with its retransmission timer, which backs off).
fn read_exactly(fd: BorrowedFd<'_>, want: usize) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::with_capacity(want);
    let mut buf = vec![0u8; 1 << 16];
    while got.len() < want {
        assert!(Instant::now() < deadline, "only {} of {want} bytes arrived", got.len());
        let room = (want - got.len()).min(buf.len());
        // SAFETY: recv writes at most `room` bytes into our buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), room, libc::MSG_DONTWAIT) };
        if n > 0 {
            got.extend_from_slice(&buf[..n as usize]);
        } else if n == 0 {
            panic!("the connection was closed after {} of {want} bytes", got.len());
        } else {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::EAGAIN), "recv: {e}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    got
}

fn send(fd: BorrowedFd<'_>, bytes: &[u8]) {
    // SAFETY: send reads bytes.len() bytes from our slice.
    let n = unsafe { libc::send(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
    assert_eq!(n, bytes.len() as isize, "send: {}", std::io::Error::last_os_error());
}

/// Closes a connection's original ends without a FIN or RST, as CRIU leaves them after a
/// dump: in repair mode a close just drops the socket, so the 4-tuple is free at once
/// (no TIME_WAIT) and the peer sees nothing.
fn close_silently(ends: Vec<OwnedFd>, program: Program) {
    for end in &ends {
        set_int_opt(end.as_fd(), libc::IPPROTO_TCP, libc::TCP_REPAIR, 1);
    }
    drop(program);
    drop(ends);
}

#[test]
fn an_established_connection_round_trips_with_its_queues_and_keeps_talking() {
    require_root!();
    crd_tests::require_tool!("python3");
    crd_tests::require_tool!("ip");
    own_network_namespace();
    let conn = connection();
    let (pid, c_fd, s_fd) = (conn.pid, conn.c, conn.s);
    let (c0, s0) = (grab(pid, c_fd), grab(pid, s_fd));
    let (c_names, s_names) = (names(c0.as_fd()), names(s0.as_fd()));
    let (c_queue, s_queue) = (peek(c0.as_fd()), peek(s0.as_fd()));
    assert_eq!(s_queue, conn.to_s, "the scenario: c's bytes wait in s's receive queue");
    assert!(
        conn.to_c.starts_with(&c_queue) && c_queue.len() > 1500,
        "the scenario: c's queue holds s's bytes"
    );
    let s_outq = ioctl_int(s0.as_fd(), libc::TIOCOUTQ);
    let s_unsent = ioctl_int(s0.as_fd(), SIOCOUTQNSD);
    assert!(s_unsent > 0, "the scenario: s has bytes its peer's closed window holds back");
    assert!(
        s_outq > s_unsent,
        "the scenario: s has bytes sent but unacknowledged ({s_outq} queued, {s_unsent} unsent)"
    );
    assert_eq!(c_queue.len() + s_outq, conn.to_c.len(), "every byte s wrote is in one queue or the other");

    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("tcp.crd");
    let out = crd(&["checkpoint", &pid.to_string(), "--tcp-established", "-o", image.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));

    // The original is unharmed: the same queues, its SO_REUSEADDR back (leaving repair
    // mode clears it), and it still talks both ways.
    assert_eq!(peek(s0.as_fd()), s_queue);
    assert_eq!(peek(c0.as_fd()), c_queue);
    assert_eq!(ioctl_int(s0.as_fd(), libc::TIOCOUTQ), s_outq);
    assert_eq!(ioctl_int(s0.as_fd(), SIOCOUTQNSD), s_unsent);
    assert_eq!(int_opt(s0.as_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR), 1, "s inherited SO_REUSEADDR");
    assert_eq!(int_opt(c0.as_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR), 0);
    send(c0.as_fd(), b"after the checkpoint");
    let mut expected_s = s_queue.clone();
    expected_s.extend_from_slice(b"after the checkpoint");
    assert_eq!(read_exactly(s0.as_fd(), expected_s.len()), expected_s, "c -> s after the checkpoint");
    assert_eq!(read_exactly(c0.as_fd(), 1000), conn.to_c[..1000], "s -> c after the checkpoint");

    // The image holds the connection's state, and inspect says so.
    let shown = crd(&["inspect", image.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&shown.stdout);
    let connection = format!("TCP 127.0.0.1:{}->127.0.0.1:{} (ESTABLISHED)", conn.c_port, conn.s_port);
    assert!(text.contains(&connection) && text.contains("repair:"), "{text}");

    close_silently(vec![c0, s0], conn.program);
    let restored =
        restore_with(&["restore", image.to_str().unwrap()]).unwrap_or_else(|e| panic!("restore: {e}"));
    let (c1, s1) = (grab(restored.root, c_fd), grab(restored.root, s_fd));
    assert_eq!(names(c1.as_fd()), c_names, "c: the same addresses and ports");
    assert_eq!(names(s1.as_fd()), s_names, "s: the same addresses and ports");
    // The checkpoint's queues, not what the original did afterwards.
    assert_eq!(peek(s1.as_fd()), s_queue, "s's receive queue");
    let c_now = peek(c1.as_fd());
    assert!(c_now.starts_with(&c_queue), "c's receive queue ({} bytes, was {})", c_now.len(), c_queue.len());
    assert_eq!(int_opt(s1.as_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR), 1);
    // Reading c drains s's send queue through the restored connection: every byte s
    // wrote arrives once, in order.
    assert_eq!(
        read_exactly(c1.as_fd(), conn.to_c.len()),
        conn.to_c,
        "everything s wrote, from both of its queues"
    );
    assert_eq!(read_exactly(s1.as_fd(), conn.to_s.len()), conn.to_s);
    // And the restored ends talk both ways.
    send(c1.as_fd(), b"hello s");
    assert_eq!(read_exactly(s1.as_fd(), 7), b"hello s");
    send(s1.as_fd(), b"hello c");
    assert_eq!(read_exactly(c1.as_fd(), 7), b"hello c");
}

#[test]
fn restore_refuses_a_connection_without_its_state_or_with_the_original_alive() {
    require_root!();
    crd_tests::require_tool!("python3");
    crd_tests::require_tool!("ip");
    own_network_namespace();
    let conn = connection();
    let dir = tempfile::tempdir().unwrap();
    let connection = format!("TCP 127.0.0.1:{}->127.0.0.1:{} (ESTABLISHED)", conn.c_port, conn.s_port);

    // Without --tcp-established: one line naming the connection and the flag, and that
    // the original must be gone.
    let plain = dir.path().join("plain.crd");
    let out = crd(&["checkpoint", &conn.pid.to_string(), "-o", plain.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let refused = crd(&["restore", plain.to_str().unwrap()]);
    let err = stderr(&refused);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&connection) && err.contains("--tcp-established") && err.contains("4-tuple"),
        "{err}"
    );

    // With it, but the original still holds the 4-tuple: one line saying it must be gone.
    let repaired = dir.path().join("repaired.crd");
    let out =
        crd(&["checkpoint", &conn.pid.to_string(), "--tcp-established", "-o", repaired.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let refused = crd(&["restore", repaired.to_str().unwrap()]);
    let err = stderr(&refused);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("4-tuple is still in use") && err.contains("original connection must be gone"),
        "{err}"
    );
    // The failed restore left the original alone.
    let (c0, s0) = (grab(conn.pid, conn.c), grab(conn.pid, conn.s));
    let queued = peek(s0.as_fd()).len();
    send(c0.as_fd(), b"still here");
    let got = read_exactly(s0.as_fd(), queued + 10);
    assert!(got.ends_with(b"still here"));
}
