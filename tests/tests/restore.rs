//! `crd restore` and `crd graft` on real processes: the round trip (checkpoint of the
//! restored stubs gives the same graph), the data, the errors.
use std::{
    fs,
    io::{Read, Write},
    os::fd::AsFd,
};

use crd::{
    Source,
    fixture::pattern,
    sys::{pidfd_getfd, pidfd_open},
    types::{Fd, Pid},
};
use crd_tests::{
    Index, assert_round_trip, assert_running_untraced, checkpoint, comm_exists, crd, image_of_stopped,
    require_root, restore_with, spawn,
};

fn owned(steps: &[String]) -> Vec<&str> {
    steps.iter().map(String::as_str).collect()
}

#[test]
fn every_kind_round_trips_with_its_sharing() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let steps = [
        "pipe:3:4".to_string(),
        "write:4:queued bytes".into(),
        "dup:3:5".into(),
        "cloexec:5".into(),
        format!("mkfifo:{d}/fifo"),
        format!("open:6:rw:{d}/fifo"),
        "write:6:in the fifo".into(),
        format!("open:7:rwc:{d}/file"),
        "write:7:0123456789".into(),
        "seek:7:3".into(),
        format!("open:8:r:{d}"),
        "open:9:w:/dev/null".into(),
        format!("open:10:wac:{d}/log"),
        "pipe:11:12".into(),
        "nonblock:12".into(),
        "fork".into(),
        "close:4".into(),
        format!("open:13:r:{d}/file"),
        "seek:13:5".into(),
    ];
    let fixture = spawn(&owned(&steps), 2);
    let (original, image, _log) = image_of_stopped(fixture, dir.path());
    let restored = assert_round_trip(&original, &image);
    assert_eq!(restored.tasks.len(), 2);
}

#[test]
fn a_deep_tree_with_threads_and_a_pipe_shared_by_four_processes_round_trips() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let steps = [
        "pipe:3:4",
        "threads:2",
        "fork",
        "dup:4:7",
        "fork",
        "threads:1",
        "close:3",
        "fork",
        "pipe:5:6",
        "fork",
    ];
    let fixture = spawn(&steps, 5);
    let (original, image, _log) = image_of_stopped(fixture, dir.path());
    assert_eq!(original.graph.tasks.len(), 5 + 3);
    assert_round_trip(&original, &image);
}

#[test]
fn pipes_holding_64_kib_and_1_mib_round_trip_byte_for_byte() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let steps = ["pipe:3:4", "fill:4:65536", "pipe:5:6", "pipesz:6:1048576", "fill:6:1048576", "fork"];
    let fixture = spawn(&steps, 2);
    let (original, image, _log) = image_of_stopped(fixture, dir.path());
    let restored = assert_round_trip(&original, &image);
    // The stub's read ends give the very bytes, in order.
    let pidfd = pidfd_open(Pid(restored.root)).unwrap();
    for (fd, len) in [(3, 65536), (5, 1 << 20)] {
        let end = pidfd_getfd(pidfd.as_fd(), Fd(fd)).unwrap();
        let mut data = vec![0; len];
        fs::File::from(end).read_exact(&mut data).unwrap();
        assert!(data == pattern(len), "fd {fd}: restored bytes differ");
    }
}

#[test]
fn restored_pipes_carry_data_between_stubs_and_end_in_eof() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    // Parent keeps the read end, child the write end.
    let fixture = spawn(&["pipe:3:4", "fork", "close:3"], 2);
    let (_original, image, _log) = image_of_stopped(fixture, dir.path());
    let restored = restore_with(&["restore", image.to_str().unwrap()]).unwrap();
    let (parent, child) = (restored.tasks[0].1, restored.tasks[1].1);
    let reader = pidfd_getfd(pidfd_open(Pid(parent)).unwrap().as_fd(), Fd(3)).unwrap();
    let mut parent_writer =
        pidfd_getfd(pidfd_open(Pid(parent)).unwrap().as_fd(), Fd(4)).map(fs::File::from).unwrap();
    let mut writer = pidfd_getfd(pidfd_open(Pid(child)).unwrap().as_fd(), Fd(4)).map(fs::File::from).unwrap();
    writer.write_all(b"through the restored pipe").unwrap();
    let mut reader = fs::File::from(reader);
    let mut got = [0u8; 25];
    reader.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"through the restored pipe");
    // Close every write end: ours, and the stubs' (by ending them).
    drop(writer);
    parent_writer.flush().unwrap();
    drop(parent_writer);
    drop(restored);
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "EOF once the restored writers are gone");
}

#[test]
fn exec_runs_a_program_on_the_restored_fds() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cat.out");
    // fd 0: a pipe with data whose write end (fd 4) is close-on-exec; fd 1: a file.
    // --keep-cloexec: cat sees EOF only because the exec closes that write end (by
    // default the program would inherit it, and wait for more).
    let steps = [
        "pipe:3:4".to_string(),
        "write:4:restored stdin\n".into(),
        "cloexec:4".into(),
        "dup:3:0".into(),
        "close:3".into(),
        format!("open:1:wc:{}", out.display()),
    ];
    let fixture = spawn(&owned(&steps), 1);
    let (_original, image, _log) = image_of_stopped(fixture, dir.path());
    fs::write(&out, b"").unwrap();
    let restored =
        restore_with(&["restore", image.to_str().unwrap(), "--exec", "--keep-cloexec", "--", "cat"]).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fs::read(&out).unwrap() != b"restored stdin\n" {
        assert!(
            std::time::Instant::now() < deadline,
            "cat did not copy the queued bytes: {:?}",
            fs::read(&out)
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // cat saw EOF (no writer left) and exited.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fs::read_to_string(format!("/proc/{}/stat", restored.root)).is_ok_and(|s| !s.contains(") Z ")) {
        assert!(std::time::Instant::now() < deadline, "cat is still running");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn graft_hands_the_same_pipe_to_a_new_process() {
    require_root!();
    // The fixture's parent reads a pipe whose write end its child holds; graft the child.
    let fixture = spawn(&["pipe:3:4", "fork", "close:3"], 2);
    let (parent, child) = (fixture.pids[0], fixture.pids[1]);
    let grafted = restore_with(&["graft", &child.to_string()]).unwrap();
    assert_running_untraced(child);
    assert_eq!(grafted.tasks, vec![(child, grafted.root)]);
    let new_writer =
        pidfd_getfd(pidfd_open(Pid(grafted.root)).unwrap().as_fd(), Fd(4)).map(fs::File::from).unwrap();
    (&new_writer).write_all(b"from the graft").unwrap();
    let reader = pidfd_getfd(pidfd_open(Pid(parent)).unwrap().as_fd(), Fd(3)).map(fs::File::from).unwrap();
    let mut got = [0u8; 14];
    (&reader).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"from the graft", "the original's peer reads what the graft wrote");
    // The very same description: one objref in a joint checkpoint.
    let body = checkpoint(grafted.root, false, Source::Bpf);
    let g = Index::new(&body.graph);
    assert!(g.file(grafted.root, 4).held_outside, "shared with the original child");
}

#[test]
fn refused_images_are_one_line_errors_and_leave_nothing_running() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // A file that will be gone, a pty slave whose master stays outside the image, and
    // a good image to damage.
    let gone = spawn(&owned(&[format!("open:3:rwc:{d}/gone"), "comm:crdtest-gone".into()]), 1);
    let (_, gone_image, _log1) = image_of_stopped(gone, dir.path());
    let gone_image =
        fs::rename(&gone_image, dir.path().join("gone.crd")).map(|_| dir.path().join("gone.crd")).unwrap();
    fs::remove_file(dir.path().join("gone")).unwrap();
    let socket = spawn(&["pty:3:4", "fork", "close:3", "comm:crdtest-sock"], 2);
    let body = crd_tests::checkpoint(socket.pids[1], false, crd::Source::Bpf);
    let socket_image = dir.path().join("pty.crd");
    crd::image::write(&socket_image, &body).expect("image written");
    let _log2 = socket.stop();
    let bytes = fs::read(&socket_image).unwrap();
    let truncated = dir.path().join("truncated.crd");
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let newer = dir.path().join("newer.crd");
    let mut b = bytes.clone();
    b[8..12].copy_from_slice(&(crd::image::FORMAT_VERSION + 1).to_le_bytes());
    fs::write(&newer, &b).unwrap();
    let cases = [
        (gone_image.clone(), "gone: no longer exists"),
        (socket_image.clone(), "PID"),
        (truncated, "truncated image"),
        (newer, "newer than this crd supports"),
    ];
    for (image, expected) in cases {
        let out = crd(&["restore", image.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {err}", image.display());
        assert_eq!(err.lines().count(), 1, "{err}");
        let expected = expected.replace("gone: ", &format!("{d}/gone "));
        assert!(err.contains(&expected), "{err} lacks {expected:?}");
        assert!(out.stdout.is_empty());
    }
    let out = crd(&["restore", socket_image.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fd 4 (pty #"), "names the fd and the object: {err}");
    assert!(!comm_exists("crdtest-gone") && !comm_exists("crdtest-sock"), "no stub left");
}

#[test]
fn a_stub_that_fails_takes_every_stub_with_it() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let fixture = spawn(&["comm:crdtest-fail", "pipe:3:4", "fork", "fork", "threads:1"], 3);
    let (_, image, _log) = image_of_stopped(fixture, dir.path());
    for failing in ["0", "1", "2"] {
        let out = std::process::Command::new(crd_tests::crd_bin())
            .args(["restore", image.to_str().unwrap()])
            .env(crd::restore::FAIL_STUB_ENV, failing)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("every stub was killed") && err.contains("failing on purpose"), "{err}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while comm_exists("crdtest-fail") {
            assert!(
                std::time::Instant::now() < deadline,
                "a stub outlived the failed restore (stub {failing})"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

#[test]
fn external_pipes_are_refused_unless_allowed() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let fixture = spawn(&["pipe:3:4", "fork", "close:3", "comm:crdtest-ext"], 2);
    // Checkpoint only the child: its write end's reader is outside.
    let body = checkpoint(fixture.pids[1], false, Source::Bpf);
    let image = dir.path().join("ext.crd");
    crd::image::write(&image, &body).unwrap();
    let _log = fixture.stop();
    let out = crd(&["restore", image.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("fd 4 (pipe #") && err.contains("--allow-external"), "{err}");
    assert!(!comm_exists("crdtest-ext"));
    let restored = restore_with(&["restore", image.to_str().unwrap(), "--allow-external"]).unwrap();
    assert_eq!(restored.tasks.len(), 1);
}

#[test]
fn a_clone_files_sibling_shares_the_restored_table() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let fixture = spawn(&["pipe:3:4", "write:4:shared", "clonefiles", "pipe:5:6"], 1);
    let (original, image, _log) = image_of_stopped(fixture, dir.path());
    assert_eq!(original.graph.tasks.len(), 2);
    let restored = assert_round_trip(&original, &image);
    let (a, b) = (restored.tasks[0].1, restored.tasks[1].1);
    assert_ne!(crd_tests::status_field(a, "Tgid:"), crd_tests::status_field(b, "Tgid:"), "two processes");
    assert_eq!(crd_tests::proc_fds(a), crd_tests::proc_fds(b), "one table");
}

#[test]
fn graft_exec_hands_the_live_fds_to_a_new_program() {
    require_root!();
    // A seamless upgrade: the child's write end goes to a new program, which writes into
    // the pipe the original parent reads.
    let fixture = spawn(&["pipe:3:4", "fork", "close:3"], 2);
    let (parent, child) = (fixture.pids[0], fixture.pids[1]);
    let _grafted =
        restore_with(&["graft", &child.to_string(), "--exec", "--", "sh", "-c", "echo upgraded >&4"])
            .unwrap();
    let reader = pidfd_getfd(pidfd_open(Pid(parent)).unwrap().as_fd(), Fd(3)).map(fs::File::from).unwrap();
    let mut got = [0u8; 9];
    (&reader).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"upgraded\n");
}

#[test]
fn high_fd_numbers_round_trip() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    // As high as this machine's hard fd limit allows (crd raises its soft limit to it).
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let top = (hard.min(10_000) - 1) as u32;
    let mid = top / 2;
    let steps = [
        "pipe:3:4".to_string(),
        format!("dup:3:{mid}"),
        format!("dup:4:{top}"),
        format!("write:{top}:far"),
        "close:4".into(),
    ];
    let fixture = spawn(&steps.iter().map(String::as_str).collect::<Vec<_>>(), 1);
    let (original, image, _log) = image_of_stopped(fixture, dir.path());
    let restored = assert_round_trip(&original, &image);
    assert_eq!(crd_tests::proc_fds(restored.root), [0, 1, 2, 3, mid, top]);
}

#[test]
fn a_process_filling_nine_tenths_of_the_fd_limit_with_pipes_restores() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    // crd holds one fd per description while the stubs pull them, and no more: a process
    // whose pipe ends fill 90% of the hard limit (18,000 of 20,000 here) must restore.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let pipes = (hard.min(20_000) * 9 / 10 / 2) as usize;
    let steps = [format!("pipes:{pipes}"), "write:4:first pipe".into()];
    let fixture = spawn(&owned(&steps), 1);
    let (original, image, _log) = image_of_stopped(fixture, dir.path());
    let restored = assert_round_trip(&original, &image);
    assert_eq!(crd_tests::proc_fds(restored.root).len(), 3 + 2 * pipes);
}
