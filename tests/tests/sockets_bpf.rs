//! Sockets as the BPF harvester reads them (`crd ls --source bpf`), on a real process:
//! unix socketpairs, listeners (path and abstract names) with an accepted and a pending
//! connection, TCP and UDP on loopback, a netlink socket. Checked against what the
//! kernel says elsewhere: the `socket:[N]` links in /proc, `ss -x` for unix peers and
//! queues, and `lsof +E` for names and for the PID:FD at each connection's other end.
//! Last, `crd inspect` of an image of unix sockets: each socket's peer and listener, and
//! the file in flight in a queue, against /proc.
use std::{
    collections::BTreeMap,
    io::BufRead,
    process::{Child, Command, Stdio},
};

use crd_common::{KIND_SOCKET, KIND_SOCKET_TYPED};
use crd_tests::{require_root, require_tool};
use serde_json::Value;

/// Opens the sockets, prints `{name: fd}` as one JSON line, then waits for stdin to close.
const SCRIPT: &str = r#"
import array, json, os, socket, sys
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
# Queued for pair_b: 5 bytes, then 1 byte carrying a pipe's read end (its only holder
# is the message); for a seqpacket and a datagram pair, messages.
r, w = os.pipe()
pair_a.send(b"hello")
pair_a.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
os.close(r)
seq_a, seq_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
keep("seq_a", seq_a); keep("seq_b", seq_b)
seq_a.send(b"one"); seq_a.send(b"three")
dgram_a, dgram_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
keep("dgram_a", dgram_a); keep("dgram_b", dgram_b)
dgram_a.send(b"dg")
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
            // Not the test runner's stderr: a file there (a run's output redirected)
            // grows between two listings, and its offset with it.
            .stderr(Stdio::null())
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

/// `crd ls PID --source bpf`, with `--json` or not.
fn ls_out(pid: u32, json: bool, extra_env: &[(&str, &str)]) -> Vec<u8> {
    let mut command = Command::new(crd_tests::crd_bin());
    command.args(["ls", &pid.to_string(), "--source", "bpf"]);
    if json {
        command.arg("--json");
    }
    for (k, v) in extra_env {
        command.env(k, v);
    }
    let out = command.output().expect("crd runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn ls_json(pid: u32) -> Value {
    serde_json::from_slice(&ls_out(pid, true, &[])).unwrap()
}

fn ls(pid: u32, extra_env: &[(&str, &str)]) -> BTreeMap<u64, Value> {
    let json: Value = serde_json::from_slice(&ls_out(pid, true, extra_env)).unwrap();
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
        // Unnamed: by inode, as /proc/PID/fd/N (the type is in the detail).
        ("pair_a", format!("socket:[{}]", s.ino("pair_a"))),
        ("path_client", format!("socket:[{}]", s.ino("path_client"))),
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

/// (protocol, name, state, endpoints): see [`lsof_plus_e`].
type LsofFd = (String, String, String, Vec<(u64, u64)>);

/// What `lsof +E -F pfnPT -p PID` says of each fd (`f` starts an fd; `P` its protocol,
/// `n` its name, `TST=` its state): fd → (protocol, name, state, the PID:FD endpoints
/// `+E` names at the other end, `PID,COMMAND,FDu` words at the end of the name).
fn lsof_plus_e(pid: u32) -> BTreeMap<u64, LsofFd> {
    let out = Command::new("lsof")
        .args(["+E", "-n", "-P", "-F", "pfnPT", "-a", "-p", &pid.to_string()])
        .output()
        .expect("lsof runs");
    let mut fds = BTreeMap::new();
    let mut current: Option<(u64, LsofFd)> = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(fd) = line.strip_prefix('f') {
            fds.extend(current.take());
            current = fd.parse().ok().map(|fd| (fd, Default::default()));
        } else if let Some((_, (protocol, name, state, ends))) = current.as_mut() {
            if let Some(p) = line.strip_prefix('P') {
                *protocol = p.to_string();
            } else if let Some(n) = line.strip_prefix('n') {
                // `->INO=N PID,COMMAND,FDu` (unix) or `A->B PID,COMMAND,FDu` (inet).
                let mut words: Vec<&str> = n.split(' ').collect();
                while let Some(end) = words.last().and_then(|w| endpoint(w)) {
                    ends.push(end);
                    words.pop();
                }
                ends.sort_unstable();
                *name = words.join(" ");
            } else if let Some(st) = line.strip_prefix("TST=") {
                *state = st.to_string();
            }
        }
    }
    fds.extend(current);
    fds
}

/// `4567,python3,5u` → (4567, 5).
fn endpoint(word: &str) -> Option<(u64, u64)> {
    let mut parts = word.split(',');
    let pid = parts.next()?.parse().ok()?;
    let _command = parts.next()?;
    let fd = parts.next()?.trim_end_matches(['r', 'w', 'u']).parse().ok()?;
    parts.next().is_none().then_some((pid, fd))
}

/// crd's view of an fd as lsof's NAME column would read it: a unix socket's name (if
/// bound) and detail, an inet socket's name; and its peers, (pid, fd) sorted.
fn crd_view(entry: &Value) -> (String, Vec<(u64, u64)>) {
    let name = entry["name"].as_str().unwrap();
    let detail = entry["detail"].as_str().unwrap_or_default();
    let shown = match entry["kind"].as_str() {
        Some("Unix") if name.starts_with("socket:[") => detail.to_string(),
        Some("Unix") => format!("{name} {detail}"),
        _ => name.to_string(),
    };
    let mut peers: Vec<(u64, u64)> = entry["peer"]
        .as_array()
        .map(|p| p.iter().map(|h| (h["pid"].as_u64().unwrap(), h["fd"].as_u64().unwrap())).collect())
        .unwrap_or_default();
    peers.sort_unstable();
    (shown, peers)
}

#[test]
fn ls_names_sockets_and_their_other_ends_as_lsof_plus_e_does() {
    require_root!();
    require_tool!("python3");
    require_tool!("lsof");
    let s = Sockets::start();
    let fds = ls(s.pid, &[]);
    let lsof = lsof_plus_e(s.pid);
    let mut compared = 0;
    for (name, fd) in &s.fds {
        let (protocol, lsof_name, state, lsof_ends) = &lsof[fd];
        let (shown, peers) = crd_view(&fds[fd]);
        match protocol.as_str() {
            // lsof: `/path type=STREAM ->INO=N` with TST=CONNECTED; crd: `/path
            // type=STREAM (CONNECTED) ->INO=N ->PID:FD`.
            _ if lsof_name.contains("type=") => {
                let (named, inode) = match lsof_name.split_once(" ->INO=") {
                    Some((named, ino)) => (named, Some(ino)),
                    None => (lsof_name.as_str(), None),
                };
                let expected =
                    if state.is_empty() { named.to_string() } else { format!("{named} ({state})") };
                assert!(
                    shown.starts_with(&expected),
                    "{name} (fd {fd}): crd {shown:?}, lsof {lsof_name:?} {state}"
                );
                // A listener's `->INO=` in lsof is a connection waiting on it (which no fd
                // holds); crd says `pending N` instead.
                if let Some(ino) = inode.filter(|_| state != "LISTEN") {
                    assert!(
                        shown.contains(&format!(" ->INO={ino}")),
                        "{name}: crd {shown:?}, lsof {lsof_name:?}"
                    );
                }
            }
            "TCP" => assert_eq!(shown, format!("TCP {lsof_name} ({state})"), "{name} (fd {fd})"),
            "UDP" => assert_eq!(shown, format!("UDP {lsof_name}"), "{name} (fd {fd})"),
            _ => continue,
        }
        // The other end's PID:FD: what lsof shows only with +E. For a unix listener lsof
        // names the connection waiting on it; crd names none (it says `pending N`).
        if protocol != "TCP" && state == "LISTEN" {
            let waiting = name.replace("listener", "pending");
            assert_eq!(lsof_ends, &vec![(u64::from(s.pid), s.fd(&waiting))], "{name}: lsof +E");
            assert!(peers.is_empty(), "{name}: {peers:?}");
        } else {
            assert_eq!(&peers, lsof_ends, "{name} (fd {fd}): crd's peer vs lsof +E");
        }
        compared += 1;
    }
    assert!(compared >= 14, "lsof named only {compared} of {:?}", s.fds);
    // Every connection inside the process has its other end named, both ways.
    let pid = u64::from(s.pid);
    for (a, b) in [
        ("pair_a", "pair_b"),
        ("seq_a", "seq_b"),
        ("dgram_a", "dgram_b"),
        ("path_client", "path_accepted"),
        ("abstract_client", "abstract_accepted"),
        ("tcp_client", "tcp_accepted"),
    ] {
        assert_eq!(crd_view(&fds[&s.fd(a)]).1, vec![(pid, s.fd(b))], "{a} -> {b}");
        assert_eq!(crd_view(&fds[&s.fd(b)]).1, vec![(pid, s.fd(a))], "{b} -> {a}");
    }
    for name in ["path_pending", "tcp_listener", "udp", "path_listener"] {
        assert!(crd_view(&fds[&s.fd(name)]).1.is_empty(), "{name}: no other end to name");
    }
}

/// `ss -x`'s receive queue of each unix socket by inode: for a socket that is not
/// listening, the bytes queued (every message's for stream and seqpacket sockets).
fn ss_unix_recv_q() -> BTreeMap<u64, u64> {
    let out = Command::new("ss").args(["-x", "-a", "-n", "-H"]).output().expect("ss runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let n = words.len();
            Some((words.get(n.checked_sub(3)?)?.parse().ok()?, words.get(2)?.parse().ok()?))
        })
        .collect()
}

#[test]
fn ls_shows_each_unix_pair_with_what_is_queued_for_each_end() {
    require_root!();
    require_tool!("python3");
    let s = Sockets::start();
    let pid = u64::from(s.pid);
    let listing = ls_json(s.pid);
    let pairs = listing["socket_pairs"].as_array().expect("socket_pairs");
    let pair_of = |a: &str, b: &str| {
        pairs
            .iter()
            .find(|p| {
                p["ends"][0]["holders"][0]["fd"] == s.fd(a) || p["ends"][1]["holders"][0]["fd"] == s.fd(a)
            })
            .map(|p| {
                let ends = p["ends"].as_array().unwrap();
                let end = |name: &str| ends.iter().find(|e| e["holders"][0]["fd"] == s.fd(name)).cloned();
                (
                    end(a).unwrap_or_else(|| panic!("{a} in {p:#}")),
                    end(b).unwrap_or_else(|| panic!("{b} in {p:#}")),
                )
            })
            .unwrap_or_else(|| panic!("no pair of {a} and {b} in {pairs:#?}"))
    };
    let ss = ss_unix_recv_q();
    // Bytes (checked against ss, the kernel's own count) and fds in flight, each way.
    for (a, b, bytes_to_b, fds_to_b) in [
        ("pair_a", "pair_b", Some(6), 1),
        ("seq_a", "seq_b", Some(8), 0),
        ("path_client", "path_accepted", Some(0), 0),
        ("abstract_client", "abstract_accepted", Some(0), 0),
        // FIONREAD counts a datagram socket's first datagram only: unknown.
        ("dgram_a", "dgram_b", None, 0),
    ] {
        let (end_a, end_b) = pair_of(a, b);
        assert_eq!(end_a["holders"], serde_json::json!([{"pid": pid, "fd": s.fd(a)}]));
        assert_eq!(end_b["holders"], serde_json::json!([{"pid": pid, "fd": s.fd(b)}]));
        assert_eq!(end_b["queued"], serde_json::json!(bytes_to_b), "queued for {b}");
        assert_eq!(end_b["fds_in_flight"], fds_to_b, "fds in flight to {b}");
        assert_eq!(end_a["fds_in_flight"], 0, "fds in flight to {a}");
        if a != "dgram_a" {
            assert_eq!(end_a["queued"], 0, "queued for {a}");
            assert_eq!(end_b["queued"], ss[&s.ino(b)], "{b} against ss -x");
        }
    }
    // A connection no listener accepted yet has no peer socket: no pair.
    for name in ["path_pending", "abstract_pending", "path_listener"] {
        assert!(
            pairs.iter().all(|p| p["ends"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["holders"][0]["fd"] != s.fd(name))),
            "{name} is in no pair"
        );
    }
    let text = String::from_utf8(ls_out(s.pid, false, &[])).unwrap();
    let line = format!(
        "socket:[{}] {pid}:{} <-> socket:[{}] {pid}:{}; to {pid}:{}: 0 bytes, 0 fds in flight; to {pid}:{}: 6 bytes, 1 fd in flight",
        s.ino("pair_a"),
        s.fd("pair_a"),
        s.ino("pair_b"),
        s.fd("pair_b"),
        s.fd("pair_a"),
        s.fd("pair_b"),
    );
    assert!(text.contains("\nunix socket pairs"), "{text}");
    assert!(text.contains(&line), "{line}\n{text}");
    // No socket row shows an offset.
    for row in text.lines().filter(|l| l.contains(" unix ") || l.contains(" inet ") || l.contains(" socket "))
    {
        let words: Vec<&str> = row.split_whitespace().collect();
        assert!(!words[..words.len().min(7)].contains(&"0"), "an offset on {row}");
    }
}

#[test]
fn the_copying_path_of_older_kernels_lists_the_same_and_without_socket_fields_sockets_stay_listed() {
    require_root!();
    require_tool!("python3");
    let s = Sockets::start();
    let full = ls(s.pid, &[]);
    // As on a kernel without `bpf_sock_from_file`/`bpf_skc_to_unix_sock` (5.10): every
    // field copied with bpf_probe_read_kernel instead of loaded through typed pointers.
    // The same listing.
    let clear = crd::harvest::bpf::CLEAR_KINDS_ENV;
    let copied = ls(s.pid, &[(clear, &KIND_SOCKET_TYPED.to_string())]);
    assert_eq!(copied, full);
    // As on a kernel whose BTF lacks a socket field: every socket is still listed, as an
    // opaque socket named by its inode.
    let opaque = ls(s.pid, &[(clear, &KIND_SOCKET.to_string())]);
    assert_eq!(opaque.keys().collect::<Vec<_>>(), full.keys().collect::<Vec<_>>());
    for (name, fd) in &s.fds {
        assert_eq!(opaque[fd]["kind"], "Socket", "{name}");
        assert_eq!(opaque[fd]["name"], format!("socket:[{}]", s.ino(name)), "{name}");
    }
}

/// BPF names a unix peer by its `struct sock`; crd maps it to the peer's inode from the
/// harvest, and asks sock_diag for a peer the harvest does not hold: a socketpair split
/// between a parent and a child, listed one process at a time, shows each end's peer as
/// /proc links it, from both harvesters and both BPF paths.
#[test]
fn a_unix_peer_held_by_another_process_is_found_outside_the_listed_process() {
    require_root!();
    require_tool!("python3");
    let script = r#"
import json, os, socket, sys, time
os.closerange(3, 4096)
a, b = socket.socketpair()
fa, fb = a.fileno(), b.fileno()
child = os.fork()
if child == 0:
    a.close()
    time.sleep(3600)
    os._exit(0)
b.close()
print(json.dumps(dict(child=child, fd=fa, child_fd=fb)), flush=True)
time.sleep(3600)
"#;
    let (program, info) = crd_tests::programs::python_json(script, &[]);
    let parent = program.0.id();
    let child = info["child"].as_u64().unwrap() as u32;
    let (fd, child_fd) = (info["fd"].as_u64().unwrap(), info["child_fd"].as_u64().unwrap());
    let (mine, theirs) = (link_ino(u64::from(parent), fd), link_ino(u64::from(child), child_fd));
    let clear = crd::harvest::bpf::CLEAR_KINDS_ENV;
    for env in [vec![], vec![(clear, KIND_SOCKET_TYPED.to_string())]] {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(peer(&ls(parent, &env)[&fd]), Some(theirs), "{env:?}");
        assert_eq!(peer(&ls(child, &env)[&child_fd]), Some(mine), "{env:?}");
    }
    let procfs = |pid: u32| {
        let out = crd_tests::crd(&["ls", &pid.to_string(), "--json", "--source", "procfs"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    assert_eq!(procfs(parent), ls_json(parent), "BPF and /proc list the parent alike");
}

/// A socketpair whose queue carries a pipe's read end (closed in the process: the message
/// is its only holder), and a path listener with a connection it accepted.
const IN_FLIGHT: &str = r#"
import array, json, os, socket, sys
os.closerange(3, 4096)  # what the test runner leaked is not ours
sa, sb = socket.socketpair()
r, w = os.pipe()
os.write(w, b"pipe bytes")
sa.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
os.close(r)
l = socket.socket(socket.AF_UNIX); l.bind(sys.argv[1] + "/listen.sock"); l.listen(4)
c = socket.socket(socket.AF_UNIX); c.connect(sys.argv[1] + "/listen.sock"); a, _ = l.accept()
print(json.dumps(dict(pid=os.getpid(), sa=sa.fileno(), sb=sb.fileno(), w=w, l=l.fileno(), c=c.fileno(), a=a.fileno())), flush=True)
sys.stdin.read()
"#;

/// The inode number behind /proc/PID/fd/FD (`socket:[N]`, `pipe:[N]`).
fn link_ino(pid: u64, fd: u64) -> u64 {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
    let link = link.to_string_lossy();
    link.split_once(":[").and_then(|(_, n)| n.strip_suffix(']')).unwrap().parse().unwrap()
}

#[test]
fn inspect_shows_each_sockets_peer_listener_and_files_in_flight() {
    require_root!();
    require_tool!("python3");
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new("python3")
        .args(["-c", IN_FLIGHT])
        .arg(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let _child = Kill(child);
    let info: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let n = |k: &str| info[k].as_u64().unwrap();
    let pid = n("pid");
    let image = dir.path().join("unix.crd");
    let out = crd_tests::crd(&["checkpoint", &pid.to_string(), "--tree", "-o", image.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Objrefs, read from the image with crd's own reader; what they are, from /proc.
    let body = crd::image::read(&image).unwrap();
    let graph = crd_tests::Index::new(&body.graph);
    let objref = |fd: &str| graph.inode_ref(pid as u32, n(fd) as u32);
    let sb = graph.inode(pid as u32, n("sb") as u32);
    assert_eq!(sb.carried.len(), 1, "one file in flight in sb's queue");
    let in_flight = sb.carried[0].objref();
    let (_, pipe, _) = graph.index.open(in_flight).expect("the file in flight is in the image");
    assert_eq!(pipe, objref("w"), "the file in flight opens the pipe fd w writes to");
    let pipe_ino = link_ino(pid, n("w"));
    let path = dir.path().join("listen.sock").display().to_string();

    let inspect = |format: &str| {
        let out = crd_tests::crd(&["inspect", image.to_str().unwrap(), "--format", format]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let text = inspect("text");
    let section = text
        .split("\nnesting: what each object is tied to, and the files it carries:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("{text}"));
    // Each object's entry: its header line, then its ties and files, indented.
    let section = format!("\n{section}");
    let entry = |fd: &str| -> String {
        // A header starts its line with two spaces; ties and files are indented more.
        let head = format!("\n  {} unix ", objref(fd));
        let start = section.find(&head).unwrap_or_else(|| panic!("no entry for {fd} ({head:?}) in{section}"));
        let rest = &section[start + head.len()..];
        let end = rest.find("\n  #").unwrap_or(rest.len());
        format!("{head}{}", &rest[..end])
    };
    let socket =
        |fd: &str| format!("{} unix socket:[{}] ({pid}:{})", objref(fd), link_ino(pid, n(fd)), n(fd));
    let sb_entry = entry("sb");
    assert!(sb_entry.contains(&format!("({pid}:{})", n("sb"))), "{sb_entry}");
    assert!(sb_entry.contains(&format!("peer      {}", socket("sa"))), "{sb_entry}");
    assert!(
        sb_entry.contains(&format!("in flight file {in_flight} (r) of {pipe} pipe pipe:[{pipe_ino}]")),
        "{sb_entry}"
    );
    assert!(entry("sa").contains(&format!("peer      {}", socket("sb"))), "{}", entry("sa"));
    let listener = format!("listener  {} unix {path} ({pid}:{})", objref("l"), n("l"));
    for (fd, peer) in [("a", "c"), ("c", "a")] {
        let e = entry(fd);
        assert!(
            e.contains(&format!("peer      {}", socket(peer)))
                || e.contains(&format!("peer      {} unix {path}", objref(peer))),
            "{e}"
        );
        assert!(e.contains(&listener), "{fd}: {e}");
    }

    // JSON: the image as it is, the file in flight nested in sb's record.
    let json: Value = serde_json::from_str(&inspect("json")).unwrap();
    fn carried(v: &Value, found: &mut Vec<Value>) {
        match v {
            Value::Object(map) => {
                if let Some(Value::Array(files)) = map.get("carried") {
                    found.extend(files.iter().cloned());
                }
                map.values().for_each(|v| carried(v, found));
            }
            Value::Array(items) => items.iter().for_each(|v| carried(v, found)),
            _ => {}
        }
    }
    let mut files = Vec::new();
    carried(&json, &mut files);
    assert_eq!(files.len(), 1, "{files:#?}");
    assert_eq!(files[0]["First"]["objref"], serde_json::to_value(in_flight).unwrap(), "{:#}", files[0]);

    // DOT: dashed edges to each tie, an "in flight" edge to the file, which opens the pipe.
    let dot = inspect("dot");
    let o = |r: crd::types::ObjRef| r.0;
    for edge in [
        format!("obj{} -> obj{} [style=dashed,label=\"peer\"];", o(objref("sb")), o(objref("sa"))),
        format!("obj{} -> obj{} [style=dashed,label=\"peer\"];", o(objref("sa")), o(objref("sb"))),
        format!("obj{} -> obj{} [style=dashed,label=\"listener\"];", o(objref("a")), o(objref("l"))),
        format!("obj{} -> obj{} [style=dashed,label=\"listener\"];", o(objref("c")), o(objref("l"))),
        format!("obj{} -> obj{} [color=blue,label=\"in flight\"];", o(objref("sb")), o(in_flight)),
        format!("obj{} -> obj{};", o(in_flight), o(pipe)),
    ] {
        assert!(dot.contains(&edge), "{edge}\n{dot}");
    }
}
