//! Sockets as the BPF harvester reads them (`crd ls --source bpf`), on a real process:
//! unix socketpairs, listeners (path and abstract names) with an accepted and a pending
//! connection, TCP and UDP on loopback, a netlink socket. Checked against what the
//! kernel says elsewhere: the `socket:[N]` links in /proc, `ss -x` for unix peers, and
//! `lsof` for names.
use std::{
    collections::BTreeMap,
    io::BufRead,
    process::{Child, Command, Stdio},
};

use crd_common::{KIND_SOCKET, KIND_SOCKET_SK_INO};
use crd_tests::{require_root, require_tool};
use serde_json::Value;

/// Opens the sockets, prints `{name: fd}` as one JSON line, then waits for stdin to close.
const SCRIPT: &str = r#"
import json, os, socket, sys
path = os.path.join(sys.argv[1], "listen.sock")
abstract = "\0crd-test-%d" % os.getpid()
fds, kept = {}, []
def keep(name, s):
    # Held to the end: a socket Python collects is closed, and its fd number reused.
    fds[name] = s.fileno()
    kept.append(s)
    return s
pair_a, pair_b = socket.socketpair()
keep("pair_a", pair_a); keep("pair_b", pair_b)
for kind, name in (("path", path), ("abstract", abstract)):
    listener = keep(kind + "_listener", socket.socket(socket.AF_UNIX))
    listener.bind(name)
    listener.listen(8)
    client = keep(kind + "_client", socket.socket(socket.AF_UNIX))
    client.connect(name)
    keep(kind + "_accepted", listener.accept()[0])
    keep(kind + "_pending", socket.socket(socket.AF_UNIX)).connect(name)
tcp = keep("tcp_listener", socket.socket())
tcp.bind(("127.0.0.1", 0))
tcp.listen(4)
keep("tcp_client", socket.create_connection(tcp.getsockname()))
keep("tcp_accepted", tcp.accept()[0])
udp = keep("udp", socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
udp.bind(("127.0.0.1", 0))
keep("netlink", socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
tcp6 = keep("tcp6_listener", socket.socket(socket.AF_INET6))
tcp6.bind(("::1", 0))
tcp6.listen(2)
print(json.dumps(fds), flush=True)
sys.stdin.read()
"#;

/// The python process, killed when dropped.
struct Sockets {
    child: Child,
    pid: u32,
    /// Name in [`SCRIPT`] → fd.
    fds: BTreeMap<String, u64>,
    dir: tempfile::TempDir,
}

impl Drop for Sockets {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sockets {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("python3")
            .args(["-c", SCRIPT])
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let pid = child.id();
        let fds: BTreeMap<String, u64> =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("python printed {line:?}: {e}"));
        Sockets { child, pid, fds, dir }
    }

    fn fd(&self, name: &str) -> u64 {
        self.fds[name]
    }

    /// The socket's inode number, from its /proc link `socket:[N]`.
    fn ino(&self, name: &str) -> u64 {
        let link = std::fs::read_link(format!("/proc/{}/fd/{}", self.pid, self.fd(name))).unwrap();
        let link = link.to_string_lossy();
        link.strip_prefix("socket:[").and_then(|l| l.strip_suffix(']')).unwrap().parse().unwrap()
    }

    fn path(&self) -> String {
        self.dir.path().join("listen.sock").display().to_string()
    }
}

fn ls(pid: u32, extra_env: &[(&str, &str)]) -> BTreeMap<u64, Value> {
    let mut command = Command::new(crd_tests::crd_bin());
    command.args(["ls", &pid.to_string(), "--json", "--source", "bpf"]);
    for (k, v) in extra_env {
        command.env(k, v);
    }
    let out = command.output().expect("crd runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    json["processes"][0]["fds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["fd"].as_u64().unwrap(), f.clone()))
        .collect()
}

/// The unix peer inode `ls` shows in an fd's detail (`->INO=N`).
fn peer(entry: &Value) -> Option<u64> {
    let detail = entry["detail"].as_str()?;
    detail.split_whitespace().find_map(|w| w.strip_prefix("->INO=")).map(|n| n.parse().unwrap())
}

/// `ss -x`'s view: local inode → peer inode (0: none), for every unix socket.
fn ss_unix_peers() -> BTreeMap<u64, u64> {
    let out = Command::new("ss").args(["-x", "-a", "-n", "-H"]).output().expect("ss runs");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // Netid State Recv-Q Send-Q Local-Address Port Peer-Address Port: an empty
            // local name still leaves `*`.
            let words: Vec<&str> = line.split_whitespace().collect();
            let n = words.len();
            Some((words.get(n.checked_sub(3)?)?.parse().ok()?, words[n - 1].parse().ok()?))
        })
        .collect()
}

#[test]
fn bpf_lists_unix_inet_and_netlink_sockets_as_the_kernel_sees_them() {
    require_root!();
    require_tool!("python3");
    let s = Sockets::start();
    let fds = ls(s.pid, &[]);
    let entry = |name: &str| &fds[&s.fd(name)];
    let kind = |name: &str| entry(name)["kind"].as_str().unwrap().to_string();
    let shown = |name: &str| entry(name)["name"].as_str().unwrap().to_string();
    let detail = |name: &str| entry(name)["detail"].as_str().unwrap_or_default().to_string();

    // unix: each end of a pair (and of each accepted connection) names the other's
    // inode; a connection not yet accepted has no peer socket yet.
    for (a, b) in
        [("pair_a", "pair_b"), ("path_client", "path_accepted"), ("abstract_client", "abstract_accepted")]
    {
        assert_eq!((kind(a), kind(b)), ("Unix".into(), "Unix".into()));
        assert_eq!(peer(entry(a)), Some(s.ino(b)), "{a}: {}", detail(a));
        assert_eq!(peer(entry(b)), Some(s.ino(a)), "{b}: {}", detail(b));
    }
    for name in ["path_pending", "abstract_pending"] {
        assert_eq!(detail(name), "type=STREAM (CONNECTED)", "{name}: its peer is not accepted yet");
    }
    // Names: a listener's, and its accepted connection's (the listener's name, as
    // getsockname gives it); abstract names with `@`.
    let abstract_name = format!("@crd-test-{}", s.pid);
    for (name, expected) in [
        ("path_listener", s.path()),
        ("path_accepted", s.path()),
        ("abstract_listener", abstract_name.clone()),
        ("abstract_accepted", abstract_name.clone()),
        ("pair_a", "unix type=STREAM".into()),
        ("path_client", "unix type=STREAM".into()),
    ] {
        assert_eq!(shown(name), expected, "{name}");
    }
    // A unix connection not yet accepted waits as one buffer in its listener's receive
    // queue (what sock_diag reports as the listener's rqueue too).
    assert_eq!(detail("path_listener"), "type=STREAM (LISTEN) backlog 8 pending 1");
    assert_eq!(detail("abstract_listener"), "type=STREAM (LISTEN) backlog 8 pending 1");

    // The kernel's own view of every unix peer (sock_diag, through ss).
    let ss = ss_unix_peers();
    for name in s.fds.keys().filter(|n| kind(n) == "Unix") {
        let ino = s.ino(name);
        assert_eq!(peer(entry(name)).unwrap_or(0), ss[&ino], "{name} (inode {ino}) against ss -x");
    }

    // inet: named as lsof names them.
    let port = |name: &str| -> u16 {
        let shown = shown(name);
        let at = shown.split_whitespace().nth(1).unwrap().split("->").next().unwrap().to_string();
        at.rsplit(':').next().unwrap().parse().unwrap()
    };
    let (server, client) = (port("tcp_listener"), port("tcp_client"));
    assert_eq!(kind("tcp_listener"), "Inet");
    assert_eq!(shown("tcp_listener"), format!("TCP 127.0.0.1:{server} (LISTEN)"));
    assert_eq!(detail("tcp_listener"), "IPv4 backlog 4 pending 0");
    assert_eq!(shown("tcp_client"), format!("TCP 127.0.0.1:{client}->127.0.0.1:{server} (ESTABLISHED)"));
    assert_eq!(shown("tcp_accepted"), format!("TCP 127.0.0.1:{server}->127.0.0.1:{client} (ESTABLISHED)"));
    assert_eq!(shown("udp"), format!("UDP 127.0.0.1:{}", port("udp")));
    assert_ne!(port("udp"), 0);
    assert_eq!(shown("tcp6_listener"), format!("TCP [::1]:{} (LISTEN)", port("tcp6_listener")));
    assert_eq!(detail("tcp6_listener"), "IPv6 backlog 2 pending 0");

    // Other families: an opaque socket named by family.
    assert_eq!(kind("netlink"), "Socket");
    assert!(detail("netlink").starts_with("netlink"), "{}", detail("netlink"));
}

/// lsof's names (`-F`: one field a line; `f` starts an fd, `P` its protocol, `n` its
/// name, `TST=` its TCP state): fd → (protocol, name, state).
fn lsof_names(pid: u32) -> BTreeMap<u64, (String, String, String)> {
    let out =
        Command::new("lsof").args(["-n", "-P", "-F", "-p", &pid.to_string()]).output().expect("lsof runs");
    let mut names = BTreeMap::new();
    let mut current: Option<(u64, (String, String, String))> = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(fd) = line.strip_prefix('f') {
            names.extend(current.take());
            current = fd.parse().ok().map(|fd| (fd, Default::default()));
        } else if let Some((_, (protocol, name, state))) = current.as_mut() {
            if let Some(p) = line.strip_prefix('P') {
                *protocol = p.to_string();
            } else if let Some(n) = line.strip_prefix('n') {
                *name = n.to_string();
            } else if let Some(st) = line.strip_prefix("TST=") {
                *state = st.to_string();
            }
        }
    }
    names.extend(current);
    names
}

#[test]
fn bpf_names_sockets_as_lsof_does() {
    require_root!();
    require_tool!("python3");
    require_tool!("lsof");
    let s = Sockets::start();
    let fds = ls(s.pid, &[]);
    let lsof = lsof_names(s.pid);
    let mut compared = 0;
    for (name, fd) in &s.fds {
        let (protocol, lsof_name, state) = &lsof[fd];
        let crd_name = fds[fd]["name"].as_str().unwrap();
        let expected = match protocol.as_str() {
            "TCP" => format!("TCP {lsof_name} ({state})"),
            "UDP" => format!("UDP {lsof_name}"),
            // unix: lsof adds ` type=STREAM` to the bound name.
            _ if lsof_name.starts_with('/') || lsof_name.starts_with('@') => {
                lsof_name.split(" type=").next().unwrap().to_string()
            }
            _ => continue,
        };
        assert_eq!(crd_name, expected, "{name} (fd {fd})");
        compared += 1;
    }
    assert!(compared >= 8, "lsof named only {compared} of {:?}", s.fds);
}

#[test]
fn without_sk_ino_the_peer_is_found_through_its_socket_and_without_socket_fields_sockets_stay_listed() {
    require_root!();
    require_tool!("python3");
    let s = Sockets::start();
    let full = ls(s.pid, &[]);
    // As on a kernel before 6.18: `sock::sk_ino` missing, the peer's inode is read from
    // its socket's inode. The same listing.
    let clear = crd::harvest::bpf::CLEAR_KINDS_ENV;
    let old = ls(s.pid, &[(clear, &KIND_SOCKET_SK_INO.to_string())]);
    assert_eq!(old, full);
    // As on a kernel whose BTF lacks a socket field: every socket is still listed, as an
    // opaque socket named by its inode.
    let opaque = ls(s.pid, &[(clear, &KIND_SOCKET.to_string())]);
    assert_eq!(opaque.keys().collect::<Vec<_>>(), full.keys().collect::<Vec<_>>());
    for (name, fd) in &s.fds {
        assert_eq!(opaque[fd]["kind"], "Socket", "{name}");
        assert_eq!(opaque[fd]["name"], format!("socket:[{}]", s.ino(name)), "{name}");
    }
}
