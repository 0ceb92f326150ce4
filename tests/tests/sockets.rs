//! Sockets round-trip through an image, compared with the originals through the kernel
//! (socket options, getsockname/getpeername, the queues read with MSG_PEEK, the files in
//! flight received for real), never through crd's own output.
//!
//! The processes are Python programs (real sockets, as a server opens them); TCP and UDP
//! run in a network namespace the test makes for itself.
use std::{
    io::{BufRead, BufReader, IoSliceMut},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    os::unix::process::CommandExt,
    process::{Command, Stdio},
};

use crd_tests::programs::{Program, grab, int_opt, own_network_namespace, python_json, set_int_opt, stderr};
use crd_tests::{crd, require_root, restore_with};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

/// The raw bytes getsockname or getpeername give (`ENOTCONN` for no peer).
fn name(fd: BorrowedFd<'_>, peer: bool) -> String {
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
    if ret < 0 {
        return format!("error {}", std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    format!("{:?}", &addr[..len as usize])
}

/// What the kernel says of one socket: type, listening, both names, and its receive
/// queue read with MSG_PEEK (stepping SO_PEEK_OFF, put back after): each message's
/// bytes and what each file in flight is (its /proc link's kind).
fn describe(pid: u32, fd: u32) -> String {
    let sock = grab(pid, fd);
    let s = sock.as_fd();
    let sock_type = int_opt(s, libc::SOL_SOCKET, libc::SO_TYPE);
    let listening = int_opt(s, libc::SOL_SOCKET, libc::SO_ACCEPTCONN);
    let mut out =
        format!("type {sock_type} listening {listening} name {} peer {}", name(s, false), name(s, true));
    if listening == 0 {
        out.push_str(&format!(" queue {:?}", peek_all(s, sock_type)));
    }
    out
}

fn peek_all(s: BorrowedFd<'_>, sock_type: i32) -> Vec<(Vec<u8>, Vec<String>)> {
    let old = int_opt(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF);
    set_int_opt(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0);
    let mut total = 0;
    if sock_type == libc::SOCK_STREAM {
        // SAFETY: FIONREAD writes one int into our local.
        assert_eq!(unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut total) }, 0);
    }
    let mut messages = Vec::new();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if sock_type == libc::SOCK_STREAM && got >= total as usize {
            break;
        }
        let len = if sock_type == libc::SOCK_STREAM { total as usize - got } else { buf.len() };
        let mut space = nix::cmsg_space!([RawFd; 16]);
        let mut iov = [IoSliceMut::new(&mut buf[..len])];
        let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
        let Ok(msg) = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), flags) else { break };
        let mut files = Vec::new();
        for cmsg in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                for fd in fds {
                    // SAFETY: the kernel installed this fd in the test for this peek.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
                    files.push(link.to_string_lossy().split(':').next().unwrap_or("").to_string());
                }
            }
        }
        let n = msg.bytes;
        got += n;
        messages.push((buf[..n].to_vec(), files));
        if sock_type == libc::SOCK_STREAM && n == 0 {
            break;
        }
    }
    set_int_opt(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF, old);
    // A stream's chunks split wherever a peek stopped: join those that carry no file.
    if sock_type == libc::SOCK_STREAM {
        let mut joined: Vec<(Vec<u8>, Vec<String>)> = Vec::new();
        for (data, files) in messages {
            match joined.last_mut() {
                Some(last) if last.1.is_empty() && files.is_empty() => last.0.extend(data),
                _ => joined.push((data, files)),
            }
        }
        return joined;
    }
    messages
}

/// Receives one message for real: its bytes and the files it carries.
fn receive(s: BorrowedFd<'_>) -> (Vec<u8>, Vec<OwnedFd>) {
    let mut buf = vec![0u8; 1 << 20];
    let mut space = nix::cmsg_space!([RawFd; 16]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        s.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .expect("a message is queued");
    let n = msg.bytes;
    let mut files = Vec::new();
    for cmsg in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            // SAFETY: the kernel installed these fds in the test for this message.
            files.extend(fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    (buf[..n].to_vec(), files)
}

/// Two unix processes: pairs of every type split between them with data queued both
/// ways, a pipe's read end in flight (its only holder is the message), a path listener
/// and an abstract one each with an accepted and a waiting connection, and a named
/// datagram socket with datagrams from a client connected to it.
const UNIX_SCENARIO: &str = r#"
import array, json, os, socket, sys, time
os.closerange(3, 4096)  # what the test runner leaked (its jobserver pipe) is not ours
d, tag = sys.argv[1], sys.argv[2]
U = socket.AF_UNIX
sa, sb = socket.socketpair(U, socket.SOCK_STREAM)
sa.sendall(b"to-b " * 1000); sb.sendall(b"to-a")
da, db = socket.socketpair(U, socket.SOCK_DGRAM)
for m in [b"one", b"two", b"three" * 100]: da.send(m)
qa, qb = socket.socketpair(U, socket.SOCK_SEQPACKET)
qb.send(b"first"); qb.send(b"second")
r, w = os.pipe()
os.write(w, b"pipe bytes")
sa.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
os.close(r)
sa.sendall(b"after")
lp = socket.socket(U, socket.SOCK_STREAM); lp.bind(d + "/listen.sock"); lp.listen(7)
cp = socket.socket(U, socket.SOCK_STREAM); cp.connect(d + "/listen.sock"); ap, _ = lp.accept()
ap.sendall(b"hello client")
wp = socket.socket(U, socket.SOCK_STREAM); wp.connect(d + "/listen.sock")
abstract = "\0crd-test-" + tag
la = socket.socket(U, socket.SOCK_SEQPACKET); la.bind(abstract); la.listen(3)
ca = socket.socket(U, socket.SOCK_SEQPACKET); ca.connect(abstract); aa, _ = la.accept()
ca.send(b"to server")
wa = socket.socket(U, socket.SOCK_SEQPACKET); wa.connect(abstract)
ds = socket.socket(U, socket.SOCK_DGRAM); ds.bind(d + "/dgram.sock")
dc = socket.socket(U, socket.SOCK_DGRAM); dc.connect(d + "/dgram.sock"); dc.send(b"dg1"); dc.send(b"dg2")
mine = dict(sa=sa, da=da, qa=qa, lp=lp, ap=ap, la=la, aa=aa, ds=ds)
theirs = dict(sb=sb, db=db, qb=qb, cp=cp, wp=wp, ca=ca, wa=wa, dc=dc)
fds = {k: s.fileno() for k, s in {**mine, **theirs}.items()}
fds["w"] = w
child = os.fork()
if child == 0:
    for s in mine.values(): s.close()
    os.close(w)
    while True: time.sleep(3600)
for s in theirs.values(): s.close()
print(json.dumps(dict(parent=os.getpid(), child=child, fds=fds)), flush=True)
while True: time.sleep(3600)
"#;

#[test]
fn unix_sockets_round_trip_with_queues_listeners_and_fds_in_flight() {
    require_root!();
    crd_tests::require_tool!("python3");
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("{}", std::process::id());
    let (program, info) = python_json(UNIX_SCENARIO, &[dir.path().to_str().unwrap(), &tag]);
    let parent = info["parent"].as_u64().unwrap() as u32;
    let child = info["child"].as_u64().unwrap() as u32;
    let fd = |name: &str| info["fds"][name].as_u64().unwrap() as u32;
    let parent_fds = ["sa", "da", "qa", "lp", "ap", "la", "aa", "ds"];
    let child_fds = ["sb", "db", "qb", "cp", "wp", "ca", "wa", "dc"];
    let before: Vec<String> = parent_fds
        .iter()
        .map(|n| describe(parent, fd(n)))
        .chain(child_fds.iter().map(|n| describe(child, fd(n))))
        .collect();
    let sb_before = &before[parent_fds.len()];
    assert!(sb_before.contains("\"pipe\""), "the pipe in flight is seen: {sb_before}");

    // Both harvesters give the same graph (sock_diag and BPF agree on every socket).
    let by_bpf = crd_tests::checkpoint(parent, true, crd::Source::Bpf);
    let by_procfs = crd_tests::checkpoint(parent, true, crd::Source::Procfs);
    if let Err(difference) = by_bpf.graph.same_shape(&by_procfs.graph) {
        panic!("BPF and /proc graphs differ: {difference}");
    }
    let image = dir.path().join("unix.crd");
    let out = crd(&["checkpoint", &parent.to_string(), "--tree", "-o", image.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The checkpoint consumed nothing: the originals' queues are as they were.
    assert_eq!(describe(parent, fd("sa")), before[0]);
    assert_eq!(describe(child, fd("sb")), before[parent_fds.len()]);
    drop(program);
    // The names are free again once the original is gone: its socket files are the
    // user's to remove (crd says so when one is left).
    let refused = crd(&["restore", image.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("listen.sock is in use"), "{}", stderr(&refused));
    std::fs::remove_file(dir.path().join("listen.sock")).unwrap();
    std::fs::remove_file(dir.path().join("dgram.sock")).unwrap();

    let restored =
        restore_with(&["restore", image.to_str().unwrap()]).unwrap_or_else(|e| panic!("restore: {e}"));
    let new_parent = restored.root;
    let new_child = restored.tasks.iter().find(|(old, _)| *old == child).map(|t| t.1).expect("the child");
    let after: Vec<String> = parent_fds
        .iter()
        .map(|n| describe(new_parent, fd(n)))
        .chain(child_fds.iter().map(|n| describe(new_child, fd(n))))
        .collect();
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        let which = parent_fds.iter().chain(&child_fds).nth(i).unwrap();
        assert_eq!(a, b, "{which}: the restored socket differs");
    }

    // The pipe end in flight arrives, and its pipe holds its bytes.
    let sb = grab(new_child, fd("sb"));
    // A stream read stops after the message that carries files, so the bytes before it
    // come with it, as they would have to the original.
    let (data, files) = receive(sb.as_fd());
    assert_eq!(data.len(), 5001);
    assert!(data.starts_with(b"to-b ") && data.ends_with(b"F"));
    assert_eq!(files.len(), 1, "one file in flight");
    assert_eq!(receive(sb.as_fd()).0, b"after");
    let files2 = files;
    let mut bytes = [0u8; 64];
    let n = nix::unistd::read(&files2[0], &mut bytes).unwrap();
    assert_eq!(&bytes[..n], b"pipe bytes");
    // ...and the restored parent's write end is the same pipe.
    let w = grab(new_parent, fd("w"));
    nix::unistd::write(&w, b"more").unwrap();
    let n = nix::unistd::read(&files2[0], &mut bytes).unwrap();
    assert_eq!(&bytes[..n], b"more");

    // Each pair is a pair: bytes written at one end arrive at the other.
    for (a, b) in [("qa", "qb"), ("da", "db")] {
        let (x, y) = (grab(new_parent, fd(a)), grab(new_child, fd(b)));
        while recvmsg::<()>(
            y.as_raw_fd(),
            &mut [IoSliceMut::new(&mut [0u8; 4096])],
            None,
            MsgFlags::MSG_DONTWAIT,
        )
        .is_ok()
        {}
        nix::unistd::write(&x, b"ping").unwrap();
        assert_eq!(receive(y.as_fd()).0, b"ping", "{a} -> {b}");
    }
    // The waiting connections were waiting on their restored listeners: accepting one
    // there connects it.
    for (listener, waiting) in [("lp", "wp"), ("la", "wa")] {
        let l = grab(new_parent, fd(listener));
        // SAFETY: accept4 on a listening socket copy.
        let accepted = unsafe {
            libc::accept4(l.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
        };
        assert!(accepted >= 0, "{listener}: {}", std::io::Error::last_os_error());
        // SAFETY: the kernel just returned this fd.
        let accepted = unsafe { OwnedFd::from_raw_fd(accepted) };
        let w = grab(new_child, fd(waiting));
        nix::unistd::write(&w, b"late").unwrap();
        assert_eq!(receive(accepted.as_fd()).0, b"late", "{waiting} waited on {listener}");
    }
}

#[test]
fn a_socket_whose_peer_is_outside_is_refused_unless_allowed() {
    require_root!();
    crd_tests::require_tool!("python3");
    // The peer stays in the parent, which is not checkpointed: only the child is.
    let script = r#"
import json, os, socket, time
os.closerange(3, 4096)
a, b = socket.socketpair()
fd = b.fileno()
child = os.fork()
if child == 0:
    a.close()
    while True: time.sleep(3600)
b.close()
print(json.dumps(dict(child=child, fd=fd)), flush=True)
while True: time.sleep(3600)
"#;
    let (_program, info) = python_json(script, &[]);
    let child = info["child"].as_u64().unwrap() as u32;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ext.crd");
    let out = crd(&["checkpoint", &child.to_string(), "-o", image.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let refused = crd(&["restore", image.to_str().unwrap()]);
    let err = stderr(&refused);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("unix") && err.contains("--allow-external"), "{err}");
    let restored = restore_with(&["restore", "--allow-external", image.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("restore --allow-external: {e}"));
    // Made unconnected.
    let fd = info["fd"].as_u64().unwrap() as u32;
    let s = grab(restored.root, fd);
    assert_eq!(name(s.as_fd(), true), format!("error {}", libc::ENOTCONN));
}

/// TCP and UDP in a network namespace of the test's own: a TCP listener (IPv4) and an
/// IPv6 one, a UDP socket with datagrams queued from another, and a connected UDP
/// client.
const INET_SCENARIO: &str = r#"
import json, os, socket, time
os.closerange(3, 4096)
t4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t4.bind(("127.0.0.1", 0)); t4.listen(9)
t6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
t6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
t6.bind(("::1", 0)); t6.listen(4)
us = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); us.bind(("127.0.0.1", 0))
uc = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); uc.bind(("127.0.0.1", 0))
uc.sendto(b"dg1", us.getsockname()); uc.sendto(b"dg2" * 100, us.getsockname())
ucc = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); ucc.connect(us.getsockname())
socks = dict(t4=t4, t6=t6, us=us, uc=uc, ucc=ucc)
time.sleep(0.1)
print(json.dumps(dict(pid=os.getpid(), fds={k: s.fileno() for k, s in socks.items()},
    ports={k: s.getsockname()[1] for k, s in socks.items()})), flush=True)
while True: time.sleep(3600)
"#;

#[test]
fn tcp_listeners_and_udp_sockets_come_back_on_their_ports_with_their_datagrams() {
    require_root!();
    crd_tests::require_tool!("python3");
    crd_tests::require_tool!("ip");
    own_network_namespace();
    let (program, info) = python_json(INET_SCENARIO, &[]);
    let pid = info["pid"].as_u64().unwrap() as u32;
    let fd = |name: &str| info["fds"][name].as_u64().unwrap() as u32;
    let port = |name: &str| info["ports"][name].as_u64().unwrap() as u16;
    let names = ["t4", "t6", "us", "uc", "ucc"];
    let opts = |p: u32, n: &str| {
        let s = grab(p, fd(n));
        let f = s.as_fd();
        let v6only = if n == "t6" { int_opt(f, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) } else { -1 };
        (int_opt(f, libc::SOL_SOCKET, libc::SO_REUSEADDR), v6only)
    };
    let before: Vec<(String, (i32, i32))> =
        names.iter().map(|n| (describe(pid, fd(n)), opts(pid, n))).collect();
    let by_bpf = crd_tests::checkpoint(pid, false, crd::Source::Bpf);
    let by_procfs = crd_tests::checkpoint(pid, false, crd::Source::Procfs);
    if let Err(difference) = by_bpf.graph.same_shape(&by_procfs.graph) {
        panic!("BPF and /proc graphs differ: {difference}");
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("inet.crd");
    let out = crd(&["checkpoint", &pid.to_string(), "-o", image.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    // While the original holds its ports, a restore cannot have them: one line says so.
    let refused = crd(&["restore", image.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("is in use"), "{}", stderr(&refused));
    drop(program);
    let restored =
        restore_with(&["restore", image.to_str().unwrap()]).unwrap_or_else(|e| panic!("restore: {e}"));
    for (n, (b, o)) in names.iter().zip(&before) {
        assert_eq!(&describe(restored.root, fd(n)), b, "{n}: the restored socket differs");
        assert_eq!(&opts(restored.root, n), o, "{n}: options differ");
    }
    // The restored listener takes connections on the same port.
    let client = std::net::TcpStream::connect(("127.0.0.1", port("t4"))).expect("connects");
    let listener = grab(restored.root, fd("t4"));
    // SAFETY: accept4 on a listening socket copy.
    let accepted = unsafe {
        libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
    };
    assert!(accepted >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: the kernel just returned this fd.
    drop(unsafe { OwnedFd::from_raw_fd(accepted) });
    drop(client);
    // The datagrams come from where they came from: the restored client's port.
    let server = grab(restored.root, fd("us"));
    let mut buf = [0u8; 512];
    let (n, from) =
        nix::sys::socket::recvfrom::<nix::sys::socket::SockaddrIn>(server.as_raw_fd(), &mut buf).unwrap();
    assert_eq!(&buf[..n], b"dg1");
    assert_eq!(from.map(|a| a.port()), Some(port("uc")), "the sender's port is kept");
}

/// A socket of a family crd does not make (netlink): listed, never dropped; refused by
/// name at restore, or at checkpoint with `--strict`, leaving nothing behind.
#[test]
fn a_netlink_socket_is_refused_by_name_at_restore_or_with_strict_at_checkpoint() {
    require_root!();
    crd_tests::require_tool!("python3");
    let script = r#"
import json, os, socket, time
os.closerange(3, 4096)
n = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
a, b = socket.socketpair()
print(json.dumps(dict(pid=os.getpid(), fd=n.fileno())), flush=True)
while True: time.sleep(3600)
"#;
    let (_program, info) = python_json(script, &[]);
    let pid = info["pid"].as_u64().unwrap().to_string();
    let netlink = info["fd"].as_u64().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("nl.crd");
    let strict = crd(&["checkpoint", &pid, "--strict", "-o", image.to_str().unwrap()]);
    let err = stderr(&strict);
    assert_eq!(strict.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&format!("fd {netlink} (socket")) && err.contains("netlink sockets"), "{err}");
    assert!(!image.exists(), "--strict wrote no image");
    crd_tests::assert_running_untraced(pid.parse().unwrap());
    let out = crd(&["checkpoint", &pid, "-o", image.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let refused = crd(&["restore", image.to_str().unwrap()]);
    let err = stderr(&refused);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&format!("fd {netlink} (socket")) && err.contains("netlink sockets"), "{err}");
}

/// A real program: Python's http.server (a TCP listener on its port, served with poll)
/// is checkpointed, stopped, and its image restored with `--exec --listen-fds` into a
/// socket-activated program, which answers on the original's port.
#[test]
fn a_python_http_server_listener_is_restored_and_handed_to_a_new_program() {
    require_root!();
    crd_tests::require_tool!("python3");
    crd_tests::require_tool!("ip");
    own_network_namespace();
    let mut command = Command::new("python3");
    command
        .args(["-u", "-m", "http.server", "0", "--bind", "127.0.0.1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
    // What the test runner leaks (its jobserver pipe) is not the server's.
    // SAFETY: close_range is async-signal-safe and touches only the child's fds.
    unsafe {
        command.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        })
    };
    let mut child = command.spawn().expect("python3 runs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port: u16 = line
        .split_whitespace()
        .skip_while(|w| *w != "port")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    let pid = child.id();
    let program = Program(child);
    let get = |port: u16| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connects");
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply
    };
    assert!(get(port).starts_with("HTTP/1.0 200"), "the original serves");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("http.crd");
    let out = crd(&["checkpoint", &pid.to_string(), "--strict", "-o", image.to_str().unwrap()]);
    assert!(out.status.success(), "every fd of http.server restores: {}", stderr(&out));
    assert!(get(port).starts_with("HTTP/1.0 200"), "the original still serves after the checkpoint");
    drop(program);
    let serve = r#"
import os, socket
assert os.environ["LISTEN_PID"] == str(os.getpid()) and os.environ["LISTEN_FDS"] == "1"
s = socket.socket(fileno=3)
c, _ = s.accept()
c.recv(4096)
c.sendall(b"HTTP/1.0 200 OK\r\n\r\nrestored listener")
c.close()
"#;
    let restored = restore_with(&[
        "restore",
        image.to_str().unwrap(),
        "--exec",
        "--listen-fds",
        "--",
        "python3",
        "-c",
        serve,
    ])
    .unwrap_or_else(|e| panic!("restore: {e}"));
    let reply = get(port);
    assert!(reply.ends_with("restored listener"), "{reply}");
    drop(restored);
}

/// A process with queues of every unix type, each carrying a pipe's read end in flight,
/// where it peeks on its own with SO_PEEK_OFF on two of them (its offsets moved past
/// the first message); and a child with empty datagrams queued (datagram and seqpacket).
const QUEUES_SCENARIO: &str = r#"
import array, json, os, socket, time
os.closerange(3, 4096)  # what the test runner leaked (its jobserver pipe) is not ours
U = socket.AF_UNIX
SO_PEEK_OFF = 42
def rights(fd): return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
fds = {}
for t, name in [(socket.SOCK_STREAM, "s"), (socket.SOCK_DGRAM, "d"), (socket.SOCK_SEQPACKET, "q")]:
    a, b = socket.socketpair(U, t)
    r, w = os.pipe()
    os.write(w, b"in flight " + name.encode())
    a.send(name.encode() + b"1 " * 300)
    a.sendmsg([name.encode() + b"F"], rights(r))
    os.close(r); os.close(w)
    a.send(name.encode() + b"3")
    fds[name + "a"], fds[name + "b"] = a.detach(), b.detach()
# The program's own peeking: the stream at offset 5, the datagrams past the first.
sb = socket.socket(fileno=os.dup(fds["sb"]))
sb.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
assert sb.recv(5, socket.MSG_PEEK) == b"s1 1 "
db = socket.socket(fileno=os.dup(fds["db"]))
db.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
assert db.recv(4096, socket.MSG_PEEK) == b"d" + b"1 " * 300
qb = socket.socket(fileno=os.dup(fds["qb"]))
qb.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 7)
for s in (sb, db, qb): s.close()
ea, eb = socket.socketpair(U, socket.SOCK_DGRAM)
za, zb = socket.socketpair(U, socket.SOCK_SEQPACKET)
for m in [b"e1", b"", b"e3"]: ea.send(m)
for m in [b"", b"z2", b""]: za.send(m)
empty = dict(eb=eb.fileno(), zb=zb.fileno())
child = os.fork()
if child == 0:
    while True: time.sleep(3600)
for s in (ea, eb, za, zb): s.close()
print(json.dumps(dict(pid=os.getpid(), child=child, fds=fds, empty=empty)), flush=True)
while True: time.sleep(3600)
"#;

/// Receives messages for real until the queue is empty: each one's bytes, and the
/// bytes of the pipe whose read end it carries (if it carries one).
fn receive_all(s: BorrowedFd<'_>, sock_type: i32) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    loop {
        let mut pending = 0;
        // SAFETY: FIONREAD writes one int into our local.
        assert_eq!(unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut pending) }, 0);
        // A datagram queue's FIONREAD is the first datagram's length, 0 for an empty
        // one: receive until EAGAIN there instead.
        if sock_type == libc::SOCK_STREAM && pending == 0 {
            return out;
        }
        let mut buf = vec![0u8; 1 << 16];
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
        let Ok(msg) = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), flags) else { return out };
        let n = msg.bytes;
        let mut pipe = None;
        for cmsg in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                for fd in fds {
                    // SAFETY: the kernel installed this fd in the test for this message.
                    let r = unsafe { OwnedFd::from_raw_fd(fd) };
                    let mut bytes = [0u8; 64];
                    let got = nix::unistd::read(&r, &mut bytes).unwrap();
                    pipe = Some(bytes[..got].to_vec());
                }
            }
        }
        out.push((buf[..n].to_vec(), pipe));
    }
}

fn peek_off(pid: u32, fd: u32) -> i32 {
    int_opt(grab(pid, fd).as_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF)
}

/// A checkpoint reads queues in place and changes nothing the process reads: after two
/// checkpoints of a process with messages queued in stream, datagram and seqpacket
/// sockets (with files in flight, and its own SO_PEEK_OFF set and moved), its peek
/// offsets are where it left them, its next peeks go on from there, and it receives
/// what was written, in order, with its files. Both checkpoints saved the same queues.
/// An empty datagram is received too; but the kernel marks it once peeked and every
/// later peek at an offset skips it, so a second checkpoint of it refuses (it cannot
/// place the datagram) rather than saving a queue without it.
#[test]
fn two_checkpoints_leave_every_unix_queue_as_the_process_reads_it() {
    require_root!();
    crd_tests::require_tool!("python3");
    let (program, info) = python_json(QUEUES_SCENARIO, &[]);
    let pid = info["pid"].as_u64().unwrap() as u32;
    let fd = |name: &str| info["fds"][name].as_u64().unwrap() as u32;
    let offsets = || ["sb", "db", "qb"].map(|n| peek_off(pid, fd(n)));
    let before = offsets();
    assert_eq!(before, [5, 601, 7], "the program's own peek offsets");

    let first = crd_tests::checkpoint(pid, false, crd::Source::Bpf);
    let second = crd_tests::checkpoint(pid, false, crd::Source::Bpf);
    if let Err(difference) = first.graph.same_shape(&second.graph) {
        panic!("two checkpoints of one unchanged process differ: {difference}");
    }
    let by_procfs = crd_tests::checkpoint(pid, false, crd::Source::Procfs);
    if let Err(difference) = first.graph.same_shape(&by_procfs.graph) {
        panic!("BPF and /proc graphs differ: {difference}");
    }
    assert_eq!(offsets(), before, "the peek offsets are the program's own again");

    // The program's next peeks go on where its offsets were.
    let peek = |name: &str, len: usize| {
        let s = grab(pid, fd(name));
        let mut buf = vec![0u8; len];
        // SAFETY: recv writes at most `len` bytes into our buffer.
        let n = unsafe {
            libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), len, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        };
        assert!(n >= 0, "{name}: {}", std::io::Error::last_os_error());
        buf.truncate(n as usize);
        buf
    };
    assert_eq!(peek("sb", 4), b"1 1 ", "the stream's next peek");
    assert_eq!(peek("db", 64), b"dF", "the datagrams' next peek");
    assert_eq!(offsets(), [9, 603, 7]);

    for (name, sock_type, letter) in
        [("sb", libc::SOCK_STREAM, "s"), ("db", libc::SOCK_DGRAM, "d"), ("qb", libc::SOCK_SEQPACKET, "q")]
    {
        let s = grab(pid, fd(name));
        let got = receive_all(s.as_fd(), sock_type);
        let first = format!("{letter}{}", "1 ".repeat(300)).into_bytes();
        let carrier = format!("{letter}F").into_bytes();
        let flight = Some(format!("in flight {letter}").into_bytes());
        let last = format!("{letter}3").into_bytes();
        let want: Vec<(Vec<u8>, Option<Vec<u8>>)> = if sock_type == libc::SOCK_STREAM {
            // A stream read stops after the message that carries files.
            vec![([first, carrier].concat(), flight), (last, None)]
        } else {
            vec![(first, None), (carrier, flight), (last, None)]
        };
        assert_eq!(got, want, "{name}: what the process receives after two checkpoints");
    }

    // Empty datagrams: the first checkpoint reads them...
    let child = info["child"].as_u64().unwrap() as u32;
    let empty = |name: &str| info["empty"][name].as_u64().unwrap() as u32;
    let saved = crd_tests::checkpoint(child, false, crd::Source::Bpf);
    let index = crd_tests::Index::new(&saved.graph);
    for (name, want) in [("eb", [&b"e1"[..], b"", b"e3"]), ("zb", [&b""[..], b"z2", b""])] {
        let crd::kinds::Saved::Unix(state) = &index.inode(child, empty(name)).state else {
            panic!("{name} is saved as a unix socket")
        };
        let queue: Vec<&[u8]> = state.queue.iter().map(|m| &m.data[..]).collect();
        assert_eq!(queue, want, "{name}: the first checkpoint's queue");
    }
    // ...a second refuses, by the kernel's count of datagrams (BPF)...
    let again =
        crd::checkpoint(crd::Options::new(crd::types::Tgid(child), false, crd::Source::Bpf), &|| false);
    let refusal = again.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(refusal.contains("empty datagram"), "a second checkpoint refuses: {refusal:?}");
    // ...and the process receives every one of them.
    for (name, sock_type, want) in [
        ("eb", libc::SOCK_DGRAM, [&b"e1"[..], b"", b"e3"]),
        ("zb", libc::SOCK_SEQPACKET, [&b""[..], b"z2", b""]),
    ] {
        let s = grab(child, empty(name));
        let got: Vec<Vec<u8>> = receive_all(s.as_fd(), sock_type).into_iter().map(|m| m.0).collect();
        assert_eq!(got, want, "{name}: what the process receives after the checkpoints");
    }
    drop(program);
}
