//! Real servers, not fixtures: nginx (a master and two workers sharing one listening
//! socket, with a socketpair channel to each worker and an epoll in each) and redis (an
//! epoll, a listener, and background threads sharing its fd table). Each runs in a
//! network namespace the test makes (loopback only), and is:
//! - listed: every fd of every process the kernel shows is in `crd ls`, the listener is
//!   named as lsof names it, and BPF and /proc give the same listing;
//! - checkpointed without harm: afterwards it still answers, untraced, with the same
//!   fd table as before;
//! - restored: a checkpoint of the restored stubs is the same graph as the original's.
use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use crd::Source;
use crd_tests::{
    assert_round_trip, assert_running_untraced, checkpoint, crd, harvests_agree_on_every_kind, kernel,
    proc_fds,
    programs::{Program, own_network_namespace, start, stderr},
    require_root, require_tool,
};

/// Sends `request` to 127.0.0.1:`port` and returns what comes back until the server
/// closes or stops talking; None while nothing listens.
fn ask(port: u16, request: &[u8]) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(request).ok()?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    // Reads until the reply holds `want` or the server closes: redis keeps the
    // connection open, nginx closes it.
    while let Ok(n) = stream.read(&mut chunk) {
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&chunk[..n]);
        if reply.ends_with(b"\r\n") && !reply.starts_with(b"HTTP") {
            break;
        }
    }
    Some(String::from_utf8_lossy(&reply).into_owned())
}

/// Waits until `ready` holds, panicking with `what` after 20 s.
fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The children of `pid`, by its main thread's `children` file.
fn children(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect()
}

/// Starts `program` with `args` under a shell that prints its PID first (the program
/// keeps it: `exec`).
fn start_server(program: &str, args: &[String]) -> (Program, u32) {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new("sh");
    command.arg("-c").arg("echo $$; exec \"$@\"").arg("sh").arg(program).args(args);
    // As a service manager starts a server: with no fd beyond 0-2 (the test runner's
    // own, such as cargo's jobserver pipe, would be external to the image).
    // SAFETY: close_range (the raw system call: musl's libc has no wrapper) is
    // async-signal-safe and touches only the child's fds.
    unsafe {
        command.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        })
    };
    let (server, line) = start(command);
    let pid = line.trim().parse().unwrap_or_else(|e| panic!("{program}'s PID {line:?}: {e}"));
    (server, pid)
}

/// `crd ls PIDS --json --source SOURCE`.
fn listing(pids: &[u32], source: &str) -> serde_json::Value {
    let mut args = vec!["ls".to_string(), "--json".into(), "--source".into(), source.into()];
    args.extend(pids.iter().map(u32::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = crd(&args);
    assert!(out.status.success(), "crd ls --source {source}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every fd the kernel shows for each of `pids` is listed (none dropped), and the
/// listing names `listener` for the fds in `listener_at`. Returns the BPF listing.
fn assert_listed(pids: &[u32], listener: &str, listener_at: &[u32]) -> serde_json::Value {
    let json = listing(pids, "bpf");
    for &pid in pids {
        let process = json["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pid"] == pid)
            .unwrap_or_else(|| panic!("PID {pid} not listed: {json}"));
        let listed: Vec<u32> =
            process["fds"].as_array().unwrap().iter().map(|f| f["fd"].as_u64().unwrap() as u32).collect();
        assert_eq!(listed, proc_fds(pid), "PID {pid}: the fds crd lists are the kernel's");
        let names: Vec<&str> =
            process["fds"].as_array().unwrap().iter().filter_map(|f| f["name"].as_str()).collect();
        assert_eq!(
            names.contains(&listener),
            listener_at.contains(&pid),
            "PID {pid} and {listener}: {names:?}"
        );
    }
    // /proc gives the same listing where this kernel's /proc shows every kind.
    if harvests_agree_on_every_kind() {
        assert_eq!(json, listing(pids, "procfs"), "BPF and /proc list the same");
    }
    json
}

/// Checkpoints the tree at `root` (BPF, and /proc where they agree), checks the server
/// is unharmed (`answers` still holds, every process untraced and with the fd table it
/// had), then writes the image, stops the server and restores it.
fn checkpoint_and_restore(server: Program, root: u32, pids: &[u32], answers: impl Fn() -> bool) {
    let before: Vec<_> = pids.iter().map(|&pid| kernel::fd_table(pid)).collect();
    let body = checkpoint(root, true, Source::Bpf);
    if harvests_agree_on_every_kind() {
        let by_procfs = checkpoint(root, true, Source::Procfs);
        if let Err(difference) = body.graph.same_shape(&by_procfs.graph) {
            panic!("BPF and /proc graphs differ: {difference}");
        }
    }
    assert_eq!(
        body.graph.tasks.iter().map(|t| t.tgid.0).collect::<std::collections::BTreeSet<_>>().len(),
        pids.len()
    );
    for (&pid, before) in pids.iter().zip(&before) {
        assert_running_untraced(pid);
        assert_eq!(&kernel::fd_table(pid), before, "PID {pid}'s fd table after the checkpoint");
    }
    assert!(answers(), "the server answers after the checkpoint");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("server.crd");
    crd::image::write(&image, &body).expect("image written");
    drop(server);
    assert_round_trip(&body, &image);
}

#[test]
fn nginx_master_and_workers_are_listed_checkpointed_and_restored() {
    require_root!();
    require_tool!("nginx");
    own_network_namespace();
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().display().to_string();
    let conf = format!(
        "daemon off; master_process on; worker_processes 2; user root;\n\
         pid {prefix}/nginx.pid; error_log {prefix}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n\
           access_log {prefix}/access.log;\n\
           client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;\n\
           fastcgi_temp_path {prefix}/fastcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;\n\
           server {{ listen 127.0.0.1:8080; location / {{ return 200 \"crd\\n\"; }} }}\n\
         }}\n"
    );
    fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let args = ["-p", &prefix, "-e", &format!("{prefix}/error.log"), "-c", &format!("{prefix}/nginx.conf")];
    let (server, master) = start_server("nginx", &args.map(String::from));
    let answers = || ask(8080, b"GET / HTTP/1.0\r\n\r\n").is_some_and(|r| r.ends_with("\r\n\r\ncrd\n"));
    wait_until("nginx answers with its two workers", || answers() && children(master).len() == 2);
    let workers = children(master);
    let pids = [master, workers[0], workers[1]];

    let json = assert_listed(&pids, "TCP 127.0.0.1:8080 (LISTEN)", &pids);
    // The listener is one description, inherited by the workers at fork.
    let listener = json["shared_descriptions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "TCP 127.0.0.1:8080 (LISTEN)")
        .unwrap_or_else(|| panic!("the listener is shared: {json}"));
    let holders: std::collections::BTreeSet<u64> =
        listener["holders"].as_array().unwrap().iter().map(|h| h["pid"].as_u64().unwrap()).collect();
    assert_eq!(holders, pids.iter().map(|&p| p as u64).collect());
    // Each worker talks to the master over a socketpair, and waits in an epoll.
    for worker in workers {
        let process = json["processes"].as_array().unwrap().iter().find(|p| p["pid"] == worker).unwrap();
        let kinds: Vec<&str> =
            process["fds"].as_array().unwrap().iter().filter_map(|f| f["kind"].as_str()).collect();
        assert!(kinds.contains(&"Epoll") && kinds.contains(&"Unix"), "worker {worker}: {kinds:?}");
    }
    assert!(!json["socket_pairs"].as_array().unwrap().is_empty(), "the master's channels: {json}");

    checkpoint_and_restore(server, master, &pids, answers);
}

#[test]
fn redis_and_its_threads_are_listed_checkpointed_and_restored() {
    require_root!();
    require_tool!("redis-server");
    own_network_namespace();
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--port",
        "6380",
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        &dir.path().display().to_string(),
        "--logfile",
        &format!("{}/redis.log", dir.path().display()),
    ];
    let (server, pid) = start_server("redis-server", &args.map(String::from));
    wait_until("redis answers PING", || ask(6380, b"PING\r\n").is_some_and(|r| r == "+PONG\r\n"));
    assert_eq!(ask(6380, b"SET crd checkpointed\r\n").as_deref(), Some("+OK\r\n"));
    let threads = fs::read_dir(format!("/proc/{pid}/task")).unwrap().count();
    assert!(threads > 1, "redis runs background threads");

    let json = assert_listed(&[pid], "TCP 127.0.0.1:6380 (LISTEN)", &[pid]);
    let process = &json["processes"][0];
    assert_eq!(process["threads"].as_array().unwrap().len(), threads, "one table, every thread: {process}");
    let kinds: Vec<&str> =
        process["fds"].as_array().unwrap().iter().filter_map(|f| f["kind"].as_str()).collect();
    assert!(kinds.contains(&"Epoll"), "{kinds:?}");

    let answers = || ask(6380, b"GET crd\r\n").as_deref() == Some("$12\r\ncheckpointed\r\n");
    checkpoint_and_restore(server, pid, &[pid], answers);
}
