//! `crd serve`: the protocol (every request, bad lines), the same output and exit codes
//! as crd alone, cancellation (a client gone, a deadline, SIGTERM: the target resumed),
//! the access rule with an unprivileged client, and many clients at once without leaks.
use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::{fs::MetadataExt, fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crd_tests::{assert_running_untraced, crd, crd_bin, require_root, spawn, status_field};
use serde_json::Value;

/// A `crd serve` on a socket in a directory of its own, stopped (SIGTERM) when dropped.
/// Its stderr goes to `serve.log` there, not into the test's output (libtest's
/// `test NAME ... ok` lines must stay whole: the VM matrix reads them).
struct Service {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Service {
    fn start(env: &[(&str, &str)], args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("crd.sock");
        let log = fs::File::create(dir.path().join("serve.log")).unwrap();
        let mut command = Command::new(crd_bin());
        command
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("crd serve starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "the service listens within 20 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        Service { child, dir, socket }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `crd --service SOCKET ARGS`.
    fn crd(&self, args: &[&str]) -> Output {
        Command::new(crd_bin()).arg("--service").arg(&self.socket).args(args).output().expect("crd runs")
    }

    fn connect(&self) -> Conn {
        Conn::new(UnixStream::connect(&self.socket).expect("connects"))
    }

    /// SIGTERM, then the service's exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) of the service this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the service stops within 30 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

/// A raw protocol connection.
struct Conn {
    stream: UnixStream,
    replies: BufReader<UnixStream>,
}

impl Conn {
    fn new(stream: UnixStream) -> Self {
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let replies = BufReader::new(stream.try_clone().unwrap());
        Conn { stream, replies }
    }

    fn send(&mut self, line: &str) {
        self.stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    }

    fn reply(&mut self) -> Value {
        let mut line = String::new();
        self.replies.read_line(&mut line).expect("a reply");
        assert!(line.ends_with('\n'), "a whole reply line: {line:?}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    /// Sends `line` and returns its final reply (the events before it are skipped).
    fn ask(&mut self, line: &str) -> Value {
        self.send(line);
        loop {
            let reply = self.reply();
            if reply.get("exit").is_some() {
                return reply;
            }
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits until `pid` is traced (frozen by crd).
fn wait_traced(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while status_field(pid, "TracerPid:") == "0" {
        assert!(Instant::now() < deadline, "PID {pid} is frozen within 20 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits (up to `within`) until `pid` runs untraced again, then checks it. Running
/// means sleeping or running: a thread just detached may still show its tracing stop
/// for a moment.
fn wait_resumed(pid: u32, within: Duration) {
    let deadline = Instant::now() + within;
    let resumed = || {
        let state = status_field(pid, "State:");
        status_field(pid, "TracerPid:") == "0" && (state.starts_with('S') || state.starts_with('R'))
    };
    while !resumed() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_running_untraced(pid);
}

#[test]
fn every_command_through_the_service_prints_and_exits_as_crd_alone() {
    require_root!();
    let service = Service::start(&[], &[]);
    let fixture = spawn(&["pipe:3:4", "write:4:hello", "dup:3:5", "fork"], 2);
    let pid = fixture.root().to_string();

    // ls: the same table, the same JSON, the same error and exit code.
    for args in [vec!["ls", &pid], vec!["ls", &pid, "--json"], vec!["ls", &pid, "--pipes"]] {
        let (alone, served) = (crd(&args), service.crd(&args));
        assert_eq!(served.status.code(), Some(0), "{args:?}: {}", text(&served.stderr));
        assert_eq!(text(&served.stdout), text(&alone.stdout), "{args:?}");
        assert_eq!(text(&served.stderr), text(&alone.stderr), "{args:?}");
    }
    let gone = ["ls", "4194305"];
    let (alone, served) = (crd(&gone), service.crd(&gone));
    assert_eq!(served.status.code(), alone.status.code());
    assert_eq!(served.status.code(), Some(1));
    assert_eq!(text(&served.stderr), text(&alone.stderr));
    assert_eq!(text(&served.stderr).lines().count(), 1);

    // checkpoint: a relative output is the client's directory's, and named as given.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(crd_bin())
        .current_dir(dir.path())
        .args(["--service", service.socket.to_str().unwrap(), "checkpoint", &pid, "--tree", "-o", "app.img"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let said = text(&out.stderr);
    assert!(said.contains("checkpointed 2 process(es)") && said.contains(" to app.img in "), "{said}");
    let image = dir.path().join("app.img");
    assert_eq!(fs::metadata(&image).unwrap().permissions().mode() & 0o777, 0o600);
    for pid in &fixture.pids {
        assert_running_untraced(*pid);
    }
    let inspected = text(&crd(&["inspect", image.to_str().unwrap()]).stdout);
    assert!(inspected.contains("queued 5"), "{inspected}");

    // graft (the fixture runs on) and restore (after it is gone): stubs, PID maps.
    let pid_file = dir.path().join("graft.pid");
    let graft = service.crd(&["graft", &pid, "--tree", "--pid-file", pid_file.to_str().unwrap()]);
    assert_eq!(graft.status.code(), Some(0), "{}", text(&graft.stderr));
    let grafted = restored_stubs(&graft);
    assert_eq!(grafted.len(), 2, "{}", text(&graft.stdout));
    assert_eq!(fs::read_to_string(&pid_file).unwrap().trim(), grafted[0].to_string());
    kill_all(&grafted);
    let _log = fixture.stop();
    let restore = service.crd(&["restore", image.to_str().unwrap()]);
    assert_eq!(restore.status.code(), Some(0), "{}", text(&restore.stderr));
    let restored = restored_stubs(&restore);
    assert_eq!(restored.len(), 2, "{}", text(&restore.stdout));
    // The stubs are not the service's children (a restore runs as a crd of its own).
    let parent = status_field(restored[0], "PPid:");
    assert_ne!(parent, service.pid().to_string(), "a stub is not the service's child");
    kill_all(&restored);
    let refused = service.crd(&["restore", "/nonexistent.img"]);
    let alone = crd(&["restore", "/nonexistent.img"]);
    assert_eq!(refused.status.code(), alone.status.code());
    assert_eq!(text(&refused.stderr), text(&alone.stderr));
}

/// The new PIDs of a restore's or graft's `old -> new` lines.
fn restored_stubs(out: &Output) -> Vec<u32> {
    text(&out.stdout).lines().filter_map(|l| l.split_once(" -> ")?.1.trim().parse().ok()).collect()
}

fn kill_all(pids: &[u32]) {
    for pid in pids {
        // SAFETY: plain kill(2) of a stub this test made.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
}

#[test]
fn a_watch_streams_one_line_per_listing_and_then_only_changes() {
    require_root!();
    let service = Service::start(&[], &[]);
    let fixture = spawn(&["pipe:3:4"], 1);
    let pid = fixture.root().to_string();
    let out = service.crd(&["watch", &pid, "--interval-ms", "20", "--count", "3"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines: Vec<Value> =
        text(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.len(), 3);
    for (n, line) in lines.iter().enumerate() {
        assert_eq!(line["seq"], n as u64 + 1);
        assert_eq!(line["listing"]["processes"][0]["pid"], fixture.root());
    }
    // With --changes: the first listing, then nothing while nothing changes.
    let out = service.crd(&["watch", &pid, "--interval-ms", "20", "--count", "3", "--changes"]);
    assert_eq!(text(&out.stdout).lines().count(), 1, "{}", text(&out.stdout));
    // The protocol's events: each its own reply, before the final one.
    let mut conn = service.connect();
    conn.send(&format!(r#"{{"id": 9, "request": "watch", "pids": [{pid}], "interval_ms": 10, "count": 2}}"#));
    for seq in 1..=2 {
        let event = conn.reply();
        assert_eq!(event["id"], 9);
        assert_eq!(event["event"]["seq"], seq);
    }
    assert_eq!(conn.reply()["exit"], 0);
}

#[test]
fn a_bad_line_gets_a_one_line_reply_and_the_connection_goes_on() {
    require_root!();
    let service = Service::start(&[], &[]);
    let mut conn = service.connect();
    let cases = [
        ("{not json", Value::Null, "malformed request: "),
        (r#"{"id": 4}"#, 4.into(), "malformed request: no \"request\" field"),
        (r#"{"id": 5, "request": "reboot"}"#, 5.into(), "unknown request \"reboot\""),
        (
            r#"{"id": 6, "request": "ls", "pids": [1], "colour": 1}"#,
            6.into(),
            "bad request: unknown field `colour`",
        ),
        (r#"{"id": 7, "request": "checkpoint"}"#, 7.into(), "no process with PID 0"),
    ];
    for (line, id, start) in cases {
        let reply = conn.ask(line);
        assert_eq!(reply["id"], id, "{line}");
        let error = reply["error"].as_str().unwrap_or_else(|| panic!("{line}: {reply}"));
        assert!(error.contains(start), "{line}: {error}");
        assert!(!error.contains('\n'));
        assert_ne!(reply["exit"], 0, "{line}");
    }
    // Still serving, on this connection and others.
    let me = std::process::id();
    let reply = conn.ask(&format!(r#"{{"id": 8, "request": "ls", "pids": [{me}]}}"#));
    assert_eq!(reply["exit"], 0, "{reply}");
    assert!(reply["stdout"].as_str().unwrap().contains(&me.to_string()));
    // A line longer than the limit is refused and the connection closed; the service lives.
    let mut long = service.connect();
    long.send(&"x".repeat(crd::serve::protocol::MAX_REQUEST_BYTES + 10));
    let reply = long.reply();
    assert!(reply["error"].as_str().unwrap().contains("longer than"), "{reply}");
    assert_eq!(service.connect().ask(r#"{"request": "ls", "all": true}"#)["exit"], 0);
}

#[test]
fn a_client_gone_mid_checkpoint_leaves_its_target_running_and_no_image() {
    require_root!();
    let service = Service::start(&[(crd::checkpoint::HOLD_FROZEN_ENV, "20000")], &[]);
    let fixture = spawn(&["pipe:3:4", "threads:2"], 1);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("never.img");
    let mut conn = service.connect();
    conn.send(&format!(
        r#"{{"request": "checkpoint", "pid": {}, "output": "{}"}}"#,
        fixture.root(),
        image.display()
    ));
    wait_traced(fixture.root());
    drop(conn);
    let gone = Instant::now();
    // Every thread, not only the leader: crd detaches them one by one, so the leader
    // running again says nothing yet of the others.
    let threads: Vec<u32> = fs::read_dir(format!("/proc/{}/task", fixture.root()))
        .unwrap()
        .map(|task| task.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    assert!(threads.len() >= 3, "the fixture's leader and its two threads: {threads:?}");
    for &tid in &threads {
        wait_resumed(tid, Duration::from_secs(2).saturating_sub(gone.elapsed()));
    }
    assert!(gone.elapsed() < Duration::from_secs(2), "resumed at once: {:?}", gone.elapsed());
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "no image, no temporary file");
    // A client that only closed its write side is still there: it gets its reply.
    let me = std::process::id();
    let mut half = service.connect();
    half.send(&format!(r#"{{"id": 2, "request": "ls", "pids": [{me}]}}"#));
    half.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(half.reply()["exit"], 0);
}

#[test]
fn a_deadline_cancels_a_checkpoint_and_resumes_its_target() {
    require_root!();
    let service = Service::start(&[(crd::checkpoint::HOLD_FROZEN_ENV, "20000")], &[]);
    let fixture = spawn(&["pipe:3:4"], 1);
    let dir = tempfile::tempdir().unwrap();
    let mut conn = service.connect();
    let started = Instant::now();
    let reply = conn.ask(&format!(
        r#"{{"id": 1, "deadline_ms": 300, "request": "checkpoint", "pid": {}, "output": "{}"}}"#,
        fixture.root(),
        dir.path().join("late.img").display()
    ));
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(reply["exit"], 124, "{reply}");
    let error = reply["error"].as_str().unwrap();
    assert!(error.starts_with("deadline of 300 ms passed: interrupted; the target was resumed"), "{error}");
    // Resumed before the reply was sent.
    assert_running_untraced(fixture.root());
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn sigterm_during_a_checkpoint_resumes_the_target_and_removes_the_socket() {
    require_root!();
    let mut service = Service::start(&[(crd::checkpoint::HOLD_FROZEN_ENV, "20000")], &[]);
    let fixture = spawn(&["pipe:3:4"], 1);
    let dir = tempfile::tempdir().unwrap();
    let mut conn = service.connect();
    conn.send(&format!(
        r#"{{"id": 1, "request": "checkpoint", "pid": {}, "output": "{}"}}"#,
        fixture.root(),
        dir.path().join("x.img").display()
    ));
    wait_traced(fixture.root());
    let status = service.stop();
    assert!(status.success(), "the service exits 0 on SIGTERM: {status}");
    assert_running_untraced(fixture.root());
    let reply = conn.reply();
    assert_eq!(reply["exit"], 130, "{reply}");
    assert!(reply["error"].as_str().unwrap().starts_with("interrupted; the target was resumed"), "{reply}");
    assert!(!service.socket.exists(), "the socket file is removed");
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// gid 65534's name, if the system has one (`nogroup` on Debian).
fn group_65534() -> Option<String> {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(65534)).ok().flatten().map(|g| g.name)
}

/// `crd --service SOCKET ARGS` as uid/gid 65534, without supplementary groups.
fn as_nobody(service: &Service, cwd: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(crd_bin())
        .arg("--service")
        .arg(&service.socket)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("setpriv runs")
}

#[test]
fn an_unprivileged_client_reaches_only_what_its_own_crd_could() {
    require_root!();
    crd_tests::require_tool!("setpriv");
    let group = group_65534();
    let service =
        Service::start(&[], group.as_deref().map(|g| vec!["--group", g]).unwrap_or_default().as_slice());
    let meta = fs::metadata(&service.socket).unwrap();
    match &group {
        // The socket: the group may connect, no one else.
        Some(_) => assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, 65534)),
        None => {
            assert_eq!(meta.mode() & 0o777, 0o600, "root only by default");
            fs::set_permissions(&service.socket, fs::Permissions::from_mode(0o666)).unwrap();
        }
    }
    fs::set_permissions(service.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    // A directory nobody may write into, and one it may.
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let open = dir.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();

    // Root's process: refused on one line, and never frozen.
    let root_owned = spawn(&["pipe:3:4"], 1);
    let pid = root_owned.root().to_string();
    for args in [vec!["checkpoint", &pid, "-o", "x.img"], vec!["ls", &pid], vec!["graft", &pid]] {
        let out = as_nobody(&service, &open, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(
            err.starts_with(&format!(
                "crd: access denied: uid 65534 may not trace PID {pid} (owned by uid 0)"
            )),
            "{err}"
        );
        assert!(out.stdout.is_empty());
        assert_running_untraced(root_owned.root());
    }
    assert_eq!(fs::read_dir(&open).unwrap().count(), 0, "nothing written");

    // nobody's own process: checkpointed, the image nobody's, only where nobody may write.
    let mut own = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "1000"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_field(own.id(), "Uid:").split_whitespace().next() != Some("65534") {
        assert!(Instant::now() < deadline, "sleep runs as nobody");
        std::thread::sleep(Duration::from_millis(5));
    }
    let own_pid = own.id().to_string();
    let out = as_nobody(&service, &open, &["checkpoint", &own_pid, "-o", "own.img"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(fs::metadata(open.join("own.img")).unwrap().uid(), 65534, "the image is the client's");
    let closed = dir.path().join("closed.img");
    let out = as_nobody(&service, &open, &["checkpoint", &own_pid, "-o", closed.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("Permission denied"), "{}", text(&out.stderr));
    assert!(!closed.exists());
    assert_running_untraced(own.id());

    // ls --all: only nobody's processes.
    let out = as_nobody(&service, &open, &["ls", "--all", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listing: Value = serde_json::from_slice(&out.stdout).unwrap();
    let pids: Vec<u64> =
        listing["processes"].as_array().unwrap().iter().map(|p| p["pid"].as_u64().unwrap()).collect();
    assert!(pids.contains(&(own.id() as u64)), "{pids:?}");
    for pid in pids {
        assert_eq!(status_field(pid as u32, "Uid:").split_whitespace().next(), Some("65534"), "PID {pid}");
    }

    // restore: only the client's own images.
    let root_image = dir.path().join("root.img");
    let made = crd(&["checkpoint", &pid, "-o", root_image.to_str().unwrap()]);
    assert!(made.status.success());
    fs::set_permissions(&root_image, fs::Permissions::from_mode(0o644)).unwrap();
    let out = as_nobody(&service, &open, &["restore", root_image.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("crd: access denied: the image"), "{err}");
    // An image in a directory the client cannot enter: the service looks as the client,
    // so its answer says nothing of the file (not whose it is).
    let private = dir.path().join("private");
    fs::create_dir(&private).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    fs::copy(&root_image, private.join("root.img")).unwrap();
    let out = as_nobody(&service, &open, &["restore", private.join("root.img").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("Permission denied") && !err.contains("uid 0"), "{err}");
    let _ = own.kill();
    let _ = own.wait();
}

/// Entries in /proc/PID/fd, and the BPF programs among them.
fn fds_and_programs(pid: u32) -> (usize, usize) {
    let mut fds = 0;
    let mut programs = 0;
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap().flatten() {
        fds += 1;
        if fs::read_to_string(entry.path()).unwrap_or_default().lines().any(|l| l.starts_with("prog_id:")) {
            programs += 1;
        }
    }
    (fds, programs)
}

fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS:").split_whitespace().next().unwrap_or("0").parse().unwrap()
}

#[test]
fn fifty_clients_listing_in_a_loop_get_no_error_and_leak_nothing() {
    require_root!();
    // CRD_TEST_SERVICE_SECONDS=60 for the issue's full run.
    let seconds: u64 =
        std::env::var("CRD_TEST_SERVICE_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    let service = Service::start(&[], &[]);
    let fixture = spawn(&["pipe:3:4", "write:4:abc", "fork"], 2);
    let request =
        crd::serve::Request::Ls(crd::commands::LsArgs { pids: fixture.pids.clone(), ..Default::default() });
    // Warm up (the first replies grow the service's buffers), then take the baseline.
    let mut warm = crd::serve::Client::connect(&service.socket).unwrap();
    for _ in 0..20 {
        warm.send(request.clone(), None, None).unwrap();
        assert_eq!(warm.reply().unwrap().exit, Some(0));
    }
    drop(warm);
    std::thread::sleep(Duration::from_millis(200));
    let (fds_before, programs_before) = fds_and_programs(service.pid());
    let rss_before = rss_kib(service.pid());
    let until = Instant::now() + Duration::from_secs(seconds);
    let counts: Vec<usize> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..50)
            .map(|_| {
                s.spawn(|| {
                    let mut client = crd::serve::Client::connect(&service.socket).unwrap();
                    let mut done = 0;
                    while Instant::now() < until {
                        client.send(request.clone(), None, None).unwrap();
                        let reply = client.reply().unwrap();
                        assert_eq!(reply.exit, Some(0), "{:?}", reply.error);
                        assert!(reply.stdout.unwrap().contains(&fixture.root().to_string()));
                        done += 1;
                    }
                    done
                })
            })
            .collect();
        clients.into_iter().map(|c| c.join().expect("no client failed")).collect()
    });
    assert!(counts.iter().all(|&n| n > 0), "every client was served: {counts:?}");
    std::thread::sleep(Duration::from_millis(300));
    let (fds_after, programs_after) = fds_and_programs(service.pid());
    let rss_after = rss_kib(service.pid());
    eprintln!(
        "{} requests in {seconds} s; service fds {fds_before} -> {fds_after}, BPF programs {programs_before} -> {programs_after}, RSS {rss_before} -> {rss_after} KiB",
        counts.iter().sum::<usize>()
    );
    assert_eq!(fds_after, fds_before, "no fd leaked");
    assert_eq!(programs_after, programs_before, "no BPF program leaked or reloaded");
    assert!(rss_after < rss_before + 16 * 1024, "RSS flat: {rss_before} -> {rss_after} KiB");
}

#[test]
fn a_socket_activated_service_serves_systemds_socket_and_leaves_it_in_place() {
    require_root!();
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let fd = listener.as_raw_fd();
    let mut command = Command::new("sh");
    // LISTEN_PID must be the service's own PID: the shell's, which exec keeps.
    command
        .args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" serve --socket /nonexistent/unused.sock"])
        .arg(crd_bin())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: dup2 and fcntl are async-signal-safe; they put the listening socket at
    // fd 3, as systemd does, without close-on-exec (dup2 of fd 3 onto itself would
    // leave the flag set).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            let placed = if fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(fd, 3) };
            if placed < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    drop(listener);
    let me = std::process::id().to_string();
    let out = Command::new(crd_bin()).env("CRD_SERVICE", &socket).args(["ls", &me]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&me));
    // SAFETY: plain kill(2) of the service this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(socket.exists(), "systemd's socket file is systemd's to remove");
}
