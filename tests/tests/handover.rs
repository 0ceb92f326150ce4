//! `--exec`: handing fds to a new program. The program inherits every fd, even those
//! the original opened close-on-exec (as Python, Go and Rust open nearly all), unless
//! `--keep-cloexec`; `--listen-fds` hands the listening sockets over as systemd socket
//! activation does (fds 3.., LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES).
use std::{
    fs,
    io::{BufRead, BufReader, Read},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crd_tests::{crd, image_of_stopped, proc_fds, require_root, restore_with, spawn};

/// The environment of a process, as `NAME=value` strings.
fn environ(pid: u32) -> Vec<String> {
    let raw = fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|&b| b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

fn listen_vars(pid: u32) -> Vec<String> {
    environ(pid).into_iter().filter(|v| v.starts_with("LISTEN_")).collect()
}

/// Waits until `pid` runs `comm` (the exec has happened) and has settled, and returns
/// its fd numbers. Settled: sleeping, with the same fds twice 20 ms apart: right after
/// the exec the dynamic loader opens the libraries (fd 3 for a moment), and that fd is
/// the program's, not one handed over.
fn fds_once_running(pid: u32, comm: &str) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last: Option<Vec<u32>> = None;
    loop {
        assert!(Instant::now() < deadline, "PID {pid} does not run {comm} and settle");
        std::thread::sleep(Duration::from_millis(20));
        if fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim() != comm
            || !crd_tests::status_field(pid, "State:").starts_with('S')
        {
            last = None;
            continue;
        }
        let fds = proc_fds(pid);
        if last.as_ref() == Some(&fds) {
            return fds;
        }
        last = Some(fds);
    }
}

/// A child killed (and reaped) when dropped; a stopped one is continued first.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        // SAFETY: plain kill(2) of our own child, so a stopped one can die and be reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGCONT) };
        let _ = self.0.wait();
    }
}

#[test]
fn graft_listen_fds_hands_a_python_listener_to_a_new_program_at_fd_3() {
    require_root!();
    crd_tests::require_tool!("python3");
    // Python opens everything close-on-exec. A pipe first (fds 3, 4), so the listener
    // (fd 5) must move to 3 and the pipe's read end out of its way.
    let server = r#"
import os, socket, time
r, w = os.pipe()
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
print(os.getpid(), s.getsockname()[1], r, w, s.fileno(), flush=True)
time.sleep(3600)
"#;
    let mut child = Command::new("python3")
        .args(["-c", server])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let original = Killed(child);
    let words: Vec<u32> = line.split_whitespace().map(|w| w.parse().unwrap()).collect();
    let (pid, port) = (words[0], words[1]);
    assert_eq!(words[2..], [3, 4, 5], "the server's pipe and listener");
    // The new program: the systemd protocol as sd_listen_fds(3) reads it, then one
    // answer on the inherited listener, saying what it found.
    let program = r#"
import fcntl, os, socket, stat
def kind(fd):
    mode = os.fstat(fd).st_mode
    access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    return ("pipe" if stat.S_ISFIFO(mode) else "sock" if stat.S_ISSOCK(mode) else "?") + "rw"[access]
env = os.environ
s = socket.socket(fileno=3)
conn, _ = s.accept()
answer = [os.getpid(), env.get("LISTEN_PID"), env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES"),
          s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN), kind(4), kind(5)]
conn.sendall((" ".join(map(str, answer)) + "\n").encode())
"#;
    let out = crd(&["graft", &pid.to_string(), "--exec", "--listen-fds", "--", "python3", "-c", program]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let new: u32 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.split_once(" -> ")?.1.trim().parse().ok())
        .expect("crd prints the new PID");
    struct KillNew(u32);
    impl Drop for KillNew {
        fn drop(&mut self) {
            // SAFETY: plain kill(2) of the program crd started; ESRCH if it has exited.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let _new = KillNew(new);
    assert!(stderr.contains("LISTEN_FDS=1: fd 3 (was 5)"), "{stderr}");
    assert!(stderr.contains("fd 3 is now fd 5"), "{stderr}");
    // Only the new program can answer: the original, which shares the listener, is
    // stopped.
    // SAFETY: plain kill(2) of our own child (continued and killed by `original`).
    assert_eq!(unsafe { libc::kill(original.0.id() as i32, libc::SIGSTOP) }, 0);
    let mut conn = TcpStream::connect(("127.0.0.1", port as u16)).expect("the handed listener accepts");
    conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("the new program answers");
    // Its own PID in LISTEN_PID, one listener named after its old number, at fd 3;
    // the pipe's write end kept its number (4), its read end moved to 5.
    assert_eq!(answer, format!("{new} {new} 1 fd5 1 pipew piper\n"));
}

#[test]
fn graft_exec_hands_close_on_exec_fds_unless_keep_cloexec() {
    require_root!();
    // A close-on-exec pipe (3, 4) and socket (5); 6, the socket's peer, is not.
    let fixture = spawn(&["pipe:3:4", "cloexec:3", "cloexec:4", "socketpair:5:6", "cloexec:5"], 1);
    let pid = fixture.root().to_string();
    let grafted = restore_with(&["graft", &pid, "--exec", "--", "sleep", "60"]).unwrap();
    let fds = fds_once_running(grafted.root, "sleep");
    assert!([3, 4, 5, 6].iter().all(|fd| fds.contains(fd)), "every fd reaches the program: {fds:?}");
    assert!(listen_vars(grafted.root).is_empty(), "no LISTEN_* without --listen-fds");
    let kept = restore_with(&["graft", &pid, "--exec", "--keep-cloexec", "--", "sleep", "60"]).unwrap();
    let fds = fds_once_running(kept.root, "sleep");
    assert!(fds.contains(&6), "{fds:?}");
    assert!(
        ![3, 4, 5].iter().any(|fd| fds.contains(fd)),
        "close-on-exec fds are closed by the exec: {fds:?}"
    );
}

#[test]
fn restore_exec_hands_close_on_exec_fds_of_an_image() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("head.out");
    let steps = ["pipe:3:4", "write:4:queued", "cloexec:3", "cloexec:4"];
    let (_original, image, _log) = image_of_stopped(spawn(&steps, 1), dir.path());
    // The program reads the restored pipe's bytes through fd 3, then holds its fds.
    let script = format!("head -c 6 <&3 > {}; exec sleep 60", out.display());
    let image = image.to_str().unwrap();
    let restored =
        restore_with(&["restore", image, "--exec", "--listen-fds", "--", "sh", "-c", &script]).unwrap();
    let fds = fds_once_running(restored.root, "sleep");
    assert!(fds.contains(&3) && fds.contains(&4), "{fds:?}");
    assert_eq!(fs::read_to_string(&out).unwrap(), "queued");
    // --listen-fds with no listening socket: the protocol says so, for this program.
    let mut vars = listen_vars(restored.root);
    vars.sort();
    assert_eq!(
        vars,
        ["LISTEN_FDNAMES=".to_string(), "LISTEN_FDS=0".into(), format!("LISTEN_PID={}", restored.root)]
    );
}

#[test]
fn the_exec_leaves_a_clone_files_sibling_its_table_as_it_was() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    // A close-on-exec pipe end in a table the root shares with a CLONE_FILES child.
    let steps = ["pipe:3:4", "cloexec:3", "clonefiles"];
    let (original, image, _log) = image_of_stopped(spawn(&steps, 1), dir.path());
    assert_eq!(original.graph.tasks.len(), 2);
    let restored =
        restore_with(&["restore", image.to_str().unwrap(), "--exec", "--", "sleep", "60"]).unwrap();
    assert!(fds_once_running(restored.root, "sleep").contains(&3));
    // The root cleared close-on-exec in its own copy of the table, not in the one its
    // sibling still holds.
    let sibling = restored.tasks[1].1;
    let fdinfo = fs::read_to_string(format!("/proc/{sibling}/fdinfo/3")).unwrap();
    let flags = fdinfo.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim();
    let flags = u32::from_str_radix(flags, 8).unwrap();
    assert_ne!(flags & libc::O_CLOEXEC as u32, 0, "{fdinfo}");
    // And the table holds the image's fds only: crd's handles (its pidfd, the report
    // pipe, whose EOF tells crd the exec happened) were closed in it too.
    let image_fds = crd_tests::Index::new(&original.graph).fds(original.graph.tasks[0].tgid.0);
    assert_eq!(proc_fds(sibling), image_fds);
}
