//! Faults during a checkpoint or restore: the target exits, threads and fds churn, the
//! PID is reused, crd is interrupted or killed, the disk is full, the ring buffer tiny.
//! Each must end in a consistent image or a clear one-line error, with the target left
//! running (or gone) as it was, and nothing of crd's left behind.
use std::{
    fs,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crd::{
    Options, Source, checkpoint::checkpoint_with, freeze::list_threads, harvest::bpf::BpfHarvester,
    types::Tgid,
};
use crd_tests::{
    Index, assert_running_untraced, crd, crd_bin, image_of_stopped, proc_fds, require_root, spawn,
    status_field,
};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn bpf() -> BpfHarvester {
    BpfHarvester::load(false, &Default::default()).expect("the BPF harvester loads")
}

fn options(root: u32, tree: bool) -> Options {
    Options::new(Tgid(root), tree, Source::Bpf)
}

/// Every thread of `pid` runs free: not traced, not stopped.
fn assert_all_threads_free(pid: u32) {
    for tid in list_threads(Tgid(pid)) {
        let traced = status_field(tid.0, "TracerPid:");
        let state = status_field(tid.0, "State:");
        // A thread may exit between the listing and the read: then both are empty.
        assert!(traced == "0" || traced.is_empty(), "thread {} of {pid} is still traced", tid.0);
        assert!(!state.starts_with('t') && !state.starts_with('T'), "thread {} of {pid} is {state}", tid.0);
    }
}

/// Waits for a child with a deadline: a child left stopped would never exit. None if
/// the child was already reaped: this test process is its parent *and*, during an
/// in-process checkpoint, its tracer, and the freeze's waitpid may collect the exit of
/// a target that dies while being seized (it then reports the target gone).
fn wait_exit(child: &mut std::process::Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                assert!(!std::path::Path::new(&format!("/proc/{}", child.id())).exists(), "reaped, so gone");
                return None;
            }
            Err(e) => panic!("waitpid: {e}"),
        }
        if Instant::now() > deadline {
            let state = status_field(child.id(), "State:");
            let _ = child.kill();
            let _ = child.wait();
            panic!("PID {} did not exit in time (state {state}): left stopped?", child.id());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_target_that_exits_mid_checkpoint_gives_an_image_or_a_clear_error() {
    require_root!();
    let mut harvester = bpf();
    let (mut images, mut errors) = (0, 0);
    for i in 0..40u32 {
        // A process (and for --tree, children) exiting somewhere in the checkpoint.
        let scripts = ["exit 0", "true & true & wait", "sleep 0 & sleep 0.001; wait", "sleep 0.002"];
        let script = scripts[i as usize % scripts.len()];
        let mut target = Command::new("sh").args(["-c", script]).stdin(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_micros(150 * u64::from(i % 11)));
        let pid = target.id();
        match checkpoint_with(options(pid, i % 2 == 0), Some(&mut harvester), None, &|| false) {
            Ok(done) => {
                images += 1;
                let graph = &done.body.graph;
                assert_eq!(graph.root, Tgid(pid));
                assert!(graph.tasks.iter().any(|t| t.tgid == Tgid(pid)), "the root is in its image");
                // A consistent image round-trips through the encoder.
                let bytes = crd::image::encode(&done.body).unwrap();
                assert_eq!(crd::image::decode(&bytes, "x").unwrap(), done.body);
            }
            Err(e) => {
                errors += 1;
                let text = e.to_string();
                assert_eq!(text.lines().count(), 1, "{text}");
                assert!(
                    text.contains(&format!("no process with PID {pid}"))
                        || text.contains("exited during the checkpoint"),
                    "an unexpected error for an exiting target: {text}"
                );
            }
        }
        if let Some(status) = wait_exit(&mut target, Duration::from_secs(5)) {
            assert!(status.success(), "the target was disturbed: {status}");
        }
    }
    eprintln!("{images} images, {errors} clean errors");
    assert!(images > 0, "some checkpoints caught the target alive");
}

#[test]
fn a_zombie_or_reaped_target_is_a_one_line_error() {
    require_root!();
    let mut harvester = bpf();
    let mut zombie = Command::new("true").spawn().unwrap();
    let pid = zombie.id();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !status_field(pid, "State:").starts_with('Z') {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(2));
    }
    let err =
        checkpoint_with(options(pid, false), Some(&mut harvester), None, &|| false).err().expect("refused");
    assert!(err.to_string().contains("exited"), "{err}");
    zombie.wait().unwrap();
    let err =
        checkpoint_with(options(pid, false), Some(&mut harvester), None, &|| false).err().expect("refused");
    assert!(err.to_string().contains("no process with PID"), "{err}");
}

#[test]
fn threads_created_and_exiting_during_checkpoints_give_consistent_images() {
    require_root!();
    let fixture = spawn(&["pipe:3:4", "write:4:abc", "threads:2", "threadchurn"], 1);
    let pid = fixture.root();
    let mut harvester = bpf();
    for _ in 0..25 {
        let done = checkpoint_with(options(pid, false), Some(&mut harvester), None, &|| false)
            .unwrap_or_else(|e| panic!("checkpoint under thread churn: {e}"));
        let graph = &done.body.graph;
        // The main thread, two sleepers and the churner, and whatever short-lived
        // threads were alive: all of one process, sharing its one table.
        assert!(graph.tasks.len() >= 4, "{} tasks", graph.tasks.len());
        assert!(graph.tasks.iter().all(|t| t.tgid == Tgid(pid)));
        let table = graph.tasks[0].fd_table.objref();
        assert!(graph.tasks.iter().all(|t| t.fd_table.objref() == table), "one table for every thread");
        let g = Index::new(graph);
        assert_eq!(g.pipe(pid, 3).data, b"abc");
        assert_all_threads_free(pid);
    }
    assert_running_untraced(pid);
}

#[test]
fn fds_opened_and_closed_in_a_tight_loop_give_consistent_images() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let fixture = spawn(&["pipe:3:4", "write:4:abc", "fdchurn"], 1);
    let pid = fixture.root();
    let mut harvester = bpf();
    let mut bodies = Vec::new();
    for _ in 0..25 {
        let done = checkpoint_with(options(pid, false), Some(&mut harvester), None, &|| false)
            .unwrap_or_else(|e| panic!("checkpoint under fd churn: {e}"));
        let g = Index::new(&done.body.graph);
        assert_eq!(g.pipe(pid, 3).data, b"abc", "the queued bytes, unconsumed");
        assert_eq!(g.inode_ref(pid, 3), g.inode_ref(pid, 4));
        // Every fd the image holds has its description and inode (no half-seen fd).
        for slot in &g.table(pid).fds {
            let _ = g.inode(pid, slot.fd.0);
        }
        assert_all_threads_free(pid);
        bodies.push(done.body);
    }
    assert_running_untraced(pid);
    // The images are whole: a few of them restore to the same shape.
    let log = fixture.stop();
    for (i, body) in bodies.iter().enumerate().step_by(8) {
        let path = dir.path().join(format!("churn{i}.img"));
        crd::image::write(&path, body).unwrap();
        crd_tests::assert_round_trip(body, &path);
    }
    drop(log);
}

/// Forks a child whose PID is exactly `pid` (clone3 with set_tid) running `sleep 60`.
fn spawn_with_pid(pid: u32) -> Option<u32> {
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    let tids = [pid as libc::pid_t];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tids.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    let sleep = c"/bin/sleep";
    let argv = [sleep.as_ptr(), c"60".as_ptr(), std::ptr::null()];
    // SAFETY: clone3 without CLONE_VM is a fork; the child only calls prctl, execv and
    // _exit (async-signal-safe) with data prepared before the fork.
    let ret = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, size_of::<CloneArgs>()) };
    if ret == 0 {
        // SAFETY: see above.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::execv(sleep.as_ptr(), argv.as_ptr());
            libc::_exit(127);
        }
    }
    (ret > 0).then_some(ret as u32)
}

/// Whether crd (PID `crd`) holds a pidfd of `pid`.
fn holds_pidfd_of(crd: u32, pid: u32) -> bool {
    let Ok(dir) = fs::read_dir(format!("/proc/{crd}/fdinfo")) else { return false };
    dir.flatten().any(|e| {
        fs::read_to_string(e.path()).is_ok_and(|info| info.lines().any(|l| l == format!("Pid:\t{pid}")))
    })
}

#[test]
fn a_pid_reused_mid_checkpoint_is_never_touched() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("reused.img");
    let mut target = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = target.id();
    let crd = Command::new(crd_bin())
        .args(["checkpoint", &pid.to_string(), "-o", image.to_str().unwrap(), "--source", "bpf"])
        .env(crd::freeze::PAUSE_AFTER_PIDFD_ENV, "1500")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !holds_pidfd_of(crd.id(), pid) {
        assert!(Instant::now() < deadline, "crd never opened a pidfd of {pid}");
        std::thread::sleep(Duration::from_millis(2));
    }
    // The target dies and its PID goes to a newcomer while crd holds the old pidfd.
    target.kill().unwrap();
    target.wait().unwrap();
    let newcomer = spawn_with_pid(pid).expect("clone3 with set_tid gives the same PID");
    let out = crd.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&format!("PID {pid} exited during the checkpoint")), "{err}");
    assert!(!image.exists(), "no image of the newcomer");
    assert_running_untraced(newcomer);
    // SAFETY: kill and waitpid of our own child.
    unsafe {
        libc::kill(newcomer as i32, libc::SIGKILL);
        libc::waitpid(newcomer as i32, std::ptr::null_mut(), 0);
    }
}

#[test]
fn a_full_disk_is_a_clean_error_and_leaves_no_file() {
    require_root!();
    let disk = crd_tests::SmallDisk::new("64k");
    let fixture = spawn(&["pipe:3:4", "pipesz:4:1048576", "fill:4:1000000"], 1);
    let pid = fixture.root();
    let image = disk.0.path().join("full.img");
    let out = crd(&["checkpoint", &pid.to_string(), "-o", image.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("No space left on device") && err.contains("full.img"), "{err}");
    assert_eq!(fs::read_dir(disk.0.path()).unwrap().count(), 0, "no image, no temporary file");
    assert_running_untraced(pid);
    // The target lost nothing: its pipe still holds every byte.
    let body = crd_tests::checkpoint(pid, false, Source::Bpf);
    assert_eq!(Index::new(&body.graph).pipe(pid, 3).data.len(), 1_000_000);
}

#[test]
fn a_tiny_ring_buffer_on_a_thousand_fds_loses_nothing() {
    require_root!();
    let fixture = spawn(&["pipes:300", "fork", "pipes:200"], 2);
    let mut harvester =
        BpfHarvester::load_with_ring(false, &Default::default(), 4096).expect("BPF loads with a 4 KiB ring");
    let done = checkpoint_with(options(fixture.root(), true), Some(&mut harvester), None, &|| false).unwrap();
    assert!(done.stats.ring_full > 10, "the ring filled and was drained: {:?}", done.stats);
    let g = Index::new(&done.body.graph);
    let mut total = 0;
    for pid in &fixture.pids {
        assert_eq!(g.fds(*pid), proc_fds(*pid), "every fd of {pid}, none lost");
        total += g.fds(*pid).len();
    }
    assert!(total > 1000, "{total} fds");
    // The same through the command line, with the ring forced tiny by the test hook.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("tiny.img");
    let out = Command::new(crd_bin())
        .args(["checkpoint", &fixture.root().to_string(), "--tree", "-o", image.to_str().unwrap()])
        .env(crd::harvest::bpf::RING_BYTES_ENV, "4096")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let body = crd::image::read(&image).unwrap();
    assert_eq!(body.graph.slots().count(), total);
}

/// Processes whose comm is `comm`, zombies excluded.
fn with_comm(comm: &str) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm))
        .filter(|pid| !status_field(*pid, "State:").starts_with('Z'))
        .collect()
}

/// Starts `crd restore` of a three-process image whose processes are named `comm`, held
/// before the commit, and waits until all three stubs are set up.
fn restore_held(comm: &str, dir: &std::path::Path) -> std::process::Child {
    let fixture =
        spawn(&[&format!("comm:{comm}"), "pipe:3:4", "write:4:held", "threads:2", "fork", "fork"], 3);
    let (_body, image, _log) = image_of_stopped(fixture, dir);
    let crd = Command::new(crd_bin())
        .args(["restore", image.to_str().unwrap()])
        .env(crd::restore::HOLD_RESTORE_ENV, "20000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while with_comm(comm).len() < 3 {
        assert!(Instant::now() < deadline, "the stubs never came up");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Set up means reported; give the last report a moment to reach crd.
    std::thread::sleep(Duration::from_millis(100));
    crd
}

fn assert_gone_soon(comm: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !with_comm(comm).is_empty() {
        assert!(Instant::now() < deadline, "stubs left running: {:?}", with_comm(comm));
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn sigkill_to_crd_restore_mid_way_leaves_no_stub() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let mut crd = restore_held("crdkilled", dir.path());
    crd.kill().unwrap();
    crd.wait().unwrap();
    assert_gone_soon("crdkilled");
}

#[test]
fn ctrl_c_to_crd_restore_mid_way_kills_every_stub() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    for (signal, comm) in [(libc::SIGINT, "crdint"), (libc::SIGTERM, "crdterm")] {
        let crd = restore_held(comm, dir.path());
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(crd.id() as i32, signal) };
        let out = crd.wait_with_output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(130), "{err}");
        assert_eq!(err.trim(), "crd: interrupted; every stub was killed");
        assert!(out.stdout.is_empty(), "no PIDs printed for a restore that did not happen");
        assert_gone_soon(comm);
    }
}

#[test]
fn a_restore_that_completes_after_a_hold_still_works() {
    // The hold hook itself changes nothing: the stubs commit afterwards.
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let fixture = spawn(&["pipe:3:4", "write:4:xyz", "fork"], 2);
    let (body, image, _log) = image_of_stopped(fixture, dir.path());
    let out = Command::new(crd_bin())
        .args(["restore", image.to_str().unwrap()])
        .env(crd::restore::HOLD_RESTORE_ENV, "200")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let tasks: Vec<(u32, u32)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (a, b) = l.split_once(" -> ")?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    let restored = crd_tests::RestoredTree { root: tasks[0].1, tasks };
    let again = crd_tests::checkpoint(restored.root, true, Source::Bpf);
    body.graph.same_shape(&again.graph).unwrap();
}

#[test]
fn a_target_another_crd_holds_is_refused_and_left_to_it() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let fixture = spawn(&["pipe:3:4", "threads:1"], 1);
    let pid = fixture.root();
    let first_image = dir.path().join("first.img");
    let first = Command::new(crd_bin())
        .args(["checkpoint", &pid.to_string(), "-o", first_image.to_str().unwrap()])
        .env(crd::checkpoint::HOLD_FROZEN_ENV, "20000")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while status_field(pid, "TracerPid:") == "0" {
        assert!(Instant::now() < deadline, "the first crd never froze {pid}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let second = dir.path().join("second.img");
    let out = crd(&["checkpoint", &pid.to_string(), "-o", second.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.trim(),
        format!("crd: PID {pid} is already being traced (by a debugger or another crd): detach it first")
    );
    assert!(!second.exists());
    // The first crd still holds the target; its Ctrl-C lets it go.
    assert_ne!(status_field(pid, "TracerPid:"), "0", "the first crd still holds {pid}");
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(first.id() as i32, libc::SIGINT) };
    let out = first.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(!first_image.exists());
    assert_all_threads_free(pid);
    assert_running_untraced(pid);
}
