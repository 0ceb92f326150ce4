//! The /proc harvester's sockets (sock_diag, per network namespace) against what the
//! kernel says through /proc and the sockets' own addresses: unix pairs, path and
//! abstract listeners with accepted and pending connections, TCP and UDP on loopback, a
//! netlink socket, and a TCP listener in a network namespace the test makes.
//!
//! Note: this checks `--source procfs` against the kernel only. When the BPF harvester
//! reads sockets too (branch sock-bpf), add `--source bpf` here and require the two
//! listings to be equal, except a unix socket's `queued N` for a non-listener (sock_diag
//! counts bytes there, not messages: see crd-user/src/harvest/sockets.rs).
use std::{
    collections::BTreeMap,
    io::BufRead,
    os::unix::fs::MetadataExt,
    process::{Child, Command, Stdio},
};

use crd_tests::{crd, proc_fds, require_root};
use serde_json::Value;

/// A child killed when the test ends, however it ends.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd`, which prints one JSON line when its sockets are ready.
fn start(cmd: &mut Command) -> (Kill, Value) {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).spawn().expect("the holder starts");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("a line");
    let child = Kill(child);
    let ready: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    (child, ready)
}

const HOLDER: &str = r#"
import json, os, socket, sys, time
def unix_listener(addr):
    l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); l.bind(addr); l.listen(8)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); client.connect(addr)
    accepted, _ = l.accept()
    pending = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); pending.connect(addr)
    return [l, client, accepted, pending]
a, b = socket.socketpair()
path = unix_listener(os.path.join(sys.argv[1], "crd.sock"))
abstract = unix_listener("\0crd-test-%d" % os.getpid())
tcp = socket.socket(); tcp.bind(("127.0.0.1", 0)); tcp.listen(5)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("127.0.0.1", 0))
client = socket.create_connection(tcp.getsockname()); server, _ = tcp.accept()
waiting = socket.create_connection(tcp.getsockname())
nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
fds = lambda socks: [s.fileno() for s in socks]
print(json.dumps({"pid": os.getpid(), "pair": fds([a, b]), "path": fds(path), "abstract": fds(abstract),
    "tcp": tcp.fileno(), "port": tcp.getsockname()[1], "udp": udp.fileno(), "udp_port": udp.getsockname()[1],
    "client": client.fileno(), "client_port": client.getsockname()[1], "server": server.fileno(),
    "netlink": nl.fileno()}), flush=True)
time.sleep(3600)
"#;

const NETNS_HOLDER: &str = r#"
import json, os, socket, time
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(3)
print(json.dumps({"pid": os.getpid(), "fd": l.fileno(), "port": l.getsockname()[1]}), flush=True)
time.sleep(3600)
"#;

fn num(v: &Value) -> u32 {
    v.as_u64().and_then(|n| u32::try_from(n).ok()).unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The inode of the socket at PID's fd, from /proc.
fn ino(pid: u32, fd: u32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).expect("the fd exists").ino()
}

fn entries(listing: &Value, pid: u32) -> BTreeMap<u32, Value> {
    let process = listing["processes"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["pid"] == pid))
        .unwrap_or_else(|| panic!("PID {pid} missing from {listing:#}"));
    process["fds"].as_array().expect("fds").iter().map(|f| (num(&f["fd"]), f.clone())).collect()
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

#[test]
fn procfs_reads_sockets_with_sock_diag_in_each_network_namespace() {
    require_root!();
    crd_tests::require_tool!("python3");
    crd_tests::require_tool!("unshare");
    crd_tests::require_tool!("ip");
    let dir = tempfile::tempdir().unwrap();
    // The namespace's holder first: if crd did not come back from its namespace, the
    // other process's sockets (in crd's own namespace) would be unknown.
    let (_ns_child, ns) = start(Command::new("unshare").args([
        "--net",
        "sh",
        "-c",
        &format!("ip link set lo up && exec python3 -c '{NETNS_HOLDER}'"),
    ]));
    let (_child, held) = start(Command::new("python3").args(["-c", HOLDER]).arg(dir.path()));
    let (pid, ns_pid) = (num(&held["pid"]), num(&ns["pid"]));
    let port = num(&held["port"]);

    // The TCP connection not yet accepted reaches the accept queue on loopback at once,
    // but give the kernel a moment rather than a flaky test.
    let mut listing = Value::Null;
    for _ in 0..40 {
        let out = crd(&["ls", &ns_pid.to_string(), &pid.to_string(), "--json", "--source", "procfs"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stderr.is_empty(), "no warning: {}", String::from_utf8_lossy(&out.stderr));
        listing = serde_json::from_slice(&out.stdout).expect("JSON");
        let listener = &entries(&listing, pid)[&num(&held["tcp"])];
        if text(&listener["detail"]).ends_with("pending 1") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let fds = entries(&listing, pid);
    let fd = |v: &Value| -> &Value { fds.get(&num(v)).unwrap_or_else(|| panic!("fd {v} not listed")) };

    // Never drop an fd: every fd of both processes is listed.
    assert_eq!(fds.keys().copied().collect::<Vec<_>>(), proc_fds(pid));
    assert_eq!(entries(&listing, ns_pid).keys().copied().collect::<Vec<_>>(), proc_fds(ns_pid));

    // The socketpair: each end's peer is the other end's inode, and the fd holding it.
    let peer = |other: &Value| serde_json::json!([{"pid": pid, "fd": num(other)}]);
    let (a, b) = (&held["pair"][0], &held["pair"][1]);
    for (end, other) in [(a, b), (b, a)] {
        assert_eq!(fd(end)["kind"], "Unix");
        assert_eq!(
            text(&fd(end)["detail"]),
            format!("type=STREAM (CONNECTED) ->INO={} ->{pid}:{other}", ino(pid, num(other))),
            "pair end {end}"
        );
        assert_eq!(fd(end)["peer"], peer(other), "pair end {end}");
    }

    // Listeners by path and abstract name, each with one accepted and one pending client.
    let path = dir.path().join("crd.sock").display().to_string();
    let abstract_name = format!("@crd-test-{pid}");
    for (group, name) in [("path", path.as_str()), ("abstract", abstract_name.as_str())] {
        let [listener, client, accepted, pending] = [0, 1, 2, 3].map(|i| &held[group][i]);
        assert_eq!(text(&fd(listener)["name"]), name);
        // backlog 8; one connection waits to be accepted (one skb in its queue).
        assert_eq!(text(&fd(listener)["detail"]), "type=STREAM (LISTEN) backlog 8 pending 1", "{group}");
        // An accepted connection carries its listener's name; its peer is the client.
        assert_eq!(text(&fd(accepted)["name"]), name);
        assert_eq!(
            text(&fd(accepted)["detail"]),
            format!("type=STREAM (CONNECTED) ->INO={} ->{pid}:{client}", ino(pid, num(client)))
        );
        assert_eq!(
            text(&fd(client)["detail"]),
            format!("type=STREAM (CONNECTED) ->INO={} ->{pid}:{accepted}", ino(pid, num(accepted)))
        );
        // Its peer not yet accepted has no inode: connected, no peer to show.
        assert_eq!(text(&fd(pending)["detail"]), "type=STREAM (CONNECTED)", "{group}");
        assert!(fd(pending).get("peer").is_none(), "{group}: {}", fd(pending));
    }

    // TCP and UDP on loopback.
    assert_eq!(fd(&held["tcp"])["kind"], "Inet");
    assert_eq!(text(&fd(&held["tcp"])["name"]), format!("TCP 127.0.0.1:{port} (LISTEN)"));
    assert_eq!(text(&fd(&held["tcp"])["detail"]), "IPv4 backlog 5 pending 1");
    assert_eq!(text(&fd(&held["udp"])["name"]), format!("UDP 127.0.0.1:{}", num(&held["udp_port"])));
    let client_port = num(&held["client_port"]);
    assert_eq!(
        text(&fd(&held["client"])["name"]),
        format!("TCP 127.0.0.1:{client_port}->127.0.0.1:{port} (ESTABLISHED)")
    );
    assert_eq!(
        text(&fd(&held["server"])["name"]),
        format!("TCP 127.0.0.1:{port}->127.0.0.1:{client_port} (ESTABLISHED)")
    );
    // Both ends of the loopback connection are listed: each names the other's fd.
    assert_eq!(fd(&held["client"])["peer"], peer(&held["server"]));
    assert_eq!(fd(&held["server"])["peer"], peer(&held["client"]));
    assert_eq!(text(&fd(&held["client"])["detail"]), format!("IPv4 ->{pid}:{}", held["server"]));

    // A family sock_diag is not asked about: an opaque socket named by its family.
    assert_eq!(fd(&held["netlink"])["kind"], "Socket");
    assert_eq!(text(&fd(&held["netlink"])["detail"]), "netlink raw protocol 0");

    // The listener in the other namespace is only known to that namespace's sock_diag.
    let ns_fds = entries(&listing, ns_pid);
    let ns_listener = &ns_fds[&num(&ns["fd"])];
    assert_eq!(ns_listener["kind"], "Inet");
    assert_eq!(text(&ns_listener["name"]), format!("TCP 127.0.0.1:{} (LISTEN)", num(&ns["port"])));
    assert_eq!(text(&ns_listener["detail"]), "IPv4 backlog 3 pending 0");
}
