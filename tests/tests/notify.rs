//! pidfds and inotify round-trip through an image, compared with the originals through
//! the kernel (the restored stubs' fdinfo, a signal sent through a restored pidfd, an
//! event read from a restored inotify), never through crd's own output.
use std::{
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use crd_tests::programs::{Program, grab, stderr};
use crd_tests::{crd, require_root, restore_with};

/// [`programs::python`], with its first line split in words.
fn python(script: &str, args: &[&str]) -> (Program, Vec<String>) {
    let (program, line) = crd_tests::programs::python(script, args);
    (program, line.split_whitespace().map(String::from).collect())
}

fn fdinfo(pid: u32, fd: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap()
}

fn fdinfo_field(pid: u32, fd: u32, name: &str) -> String {
    let info = fdinfo(pid, fd);
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {name} in {info}"))
}

fn gone_or_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "))
}

/// A parent holding a pidfd (O_NONBLOCK) to its child.
const PIDFD_SCRIPT: &str = r#"
import os, time
os.closerange(3, 4096)
child = os.fork()
if child == 0:
    while True: time.sleep(3600)
fd = os.pidfd_open(child, os.O_NONBLOCK)
print(os.getpid(), child, fd, flush=True)
while True: time.sleep(3600)
"#;

#[test]
fn a_pidfd_to_a_child_in_the_image_refers_to_the_restored_child() {
    require_root!();
    crd_tests::require_tool!("python3");
    let (program, words) = python(PIDFD_SCRIPT, &[]);
    let [parent, child, fd]: [u32; 3] = std::array::from_fn(|i| words[i].parse().unwrap());
    // Both harvesters read the process it refers to.
    for source in [crd::Source::Bpf, crd::Source::Procfs] {
        let body = crd_tests::checkpoint(parent, true, source);
        let object = crd_tests::Index::new(&body.graph).inode(parent, fd);
        assert_eq!(object.state.detail(), Some(format!("pid={child}")), "{source}");
        assert!(!object.held_outside, "{source}");
    }
    let listed = crd(&["ls", &parent.to_string()]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    let row =
        listed.lines().find(|l| l.contains(&format!(" {fd}u pidfd "))).unwrap_or_else(|| panic!("{listed}"));
    assert!(row.ends_with(&format!("anon_inode:[pidfd] pid={child}")), "{listed}");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("pidfd.crd");
    let out = crd(&["checkpoint", &parent.to_string(), "--tree", "-o", image.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    drop(program);
    let restored =
        restore_with(&["restore", image.to_str().unwrap()]).unwrap_or_else(|e| panic!("restore: {e}"));
    let new = |old: u32| restored.tasks.iter().find(|t| t.0 == old).map(|t| t.1).unwrap();
    let (new_parent, new_child) = (new(parent), new(child));
    assert_eq!(fdinfo_field(new_parent, fd, "Pid"), new_child.to_string(), "it refers to the restored child");
    let flags = u32::from_str_radix(&fdinfo_field(new_parent, fd, "flags"), 8).unwrap();
    assert_ne!(flags & libc::O_NONBLOCK as u32, 0, "PIDFD_NONBLOCK kept");
    // A signal sent through a copy of the restored pidfd reaches the child stub.
    let pidfd = grab(new_parent, fd);
    // SAFETY: pidfd_send_signal with a null siginfo on a pidfd we own.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<u8>(),
            0,
        )
    };
    assert_eq!(sent, 0, "{}", std::io::Error::last_os_error());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gone_or_zombie(new_child) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(gone_or_zombie(new_child), "the child stub got the signal");
    assert!(!gone_or_zombie(new_parent), "and only it");
}

#[test]
fn a_pidfd_to_a_process_outside_the_image_is_refused_naming_it() {
    require_root!();
    crd_tests::require_tool!("python3");
    let (_program, words) = python(PIDFD_SCRIPT, &[]);
    let [parent, child, fd]: [u32; 3] = std::array::from_fn(|i| words[i].parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("outside.crd");
    // Only the parent: its child is outside.
    let out = crd(&["checkpoint", &parent.to_string(), "-o", image.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    for extra in [&[][..], &["--allow-external"][..]] {
        let mut args = vec!["restore"];
        args.extend_from_slice(extra);
        args.push(image.to_str().unwrap());
        let refused = crd(&args);
        let err = stderr(&refused);
        assert_eq!(refused.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(&format!("PID {parent} fd {fd} (pidfd")), "{err}");
        assert!(err.contains(&format!("refers to PID {child}")), "{err}");
    }
}

/// An inotify (non-blocking) with two watches: IN_CREATE|IN_DELETE on A, IN_MODIFY on B.
const INOTIFY_SCRIPT: &str = r#"
import ctypes, os, sys, time
os.closerange(3, 4096)
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(os.O_NONBLOCK)
assert libc.inotify_add_watch(fd, sys.argv[1].encode(), 0x100 | 0x200) == 1
assert libc.inotify_add_watch(fd, sys.argv[2].encode(), 0x2) == 2
print(os.getpid(), fd, flush=True)
while True: time.sleep(3600)
"#;

/// The `inotify wd:...` lines of an fd's fdinfo, sorted.
fn watch_lines(pid: u32, fd: u32) -> Vec<String> {
    let mut lines: Vec<String> =
        fdinfo(pid, fd).lines().filter(|l| l.starts_with("inotify ")).map(String::from).collect();
    lines.sort();
    lines
}

fn inotify_image(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, u32, Vec<String>, std::path::PathBuf) {
    let (a, b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    let (program, words) = python(INOTIFY_SCRIPT, &[a.to_str().unwrap(), b.to_str().unwrap()]);
    let [pid, fd]: [u32; 2] = std::array::from_fn(|i| words[i].parse().unwrap());
    let original = watch_lines(pid, fd);
    assert_eq!(original.len(), 2, "{original:?}");
    let image = dir.join("inotify.crd");
    let out = crd(&["checkpoint", &pid.to_string(), "-o", image.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = crd(&["ls", &pid.to_string()]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains(&format!("wd=1 {} IN_CREATE|IN_DELETE, wd=2 {} IN_MODIFY", a.display(), b.display())),
        "{listed}"
    );
    drop(program);
    (a, b, fd, original, image)
}

#[test]
fn an_inotify_comes_back_with_its_watches_and_reports_new_events() {
    require_root!();
    crd_tests::require_tool!("python3");
    let dir = tempfile::tempdir().unwrap();
    let (a, _b, fd, original, image) = inotify_image(dir.path());
    let restored =
        restore_with(&["restore", image.to_str().unwrap()]).unwrap_or_else(|e| panic!("restore: {e}"));
    assert_eq!(watch_lines(restored.root, fd), original, "wd, inode, device, mask and handle of each watch");
    // A file created in A after the restore is reported on wd 1.
    let copy = grab(restored.root, fd);
    std::fs::write(a.join("new"), b"").unwrap();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    let n = loop {
        match nix::unistd::read(&copy, &mut buf) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("read(inotify): {e}"),
        }
    };
    assert!(n >= 16, "{n} bytes");
    let word = |i: usize| u32::from_ne_bytes(buf[i * 4..i * 4 + 4].try_into().unwrap());
    let len = word(3) as usize;
    let name = String::from_utf8_lossy(&buf[16..16 + len]).trim_end_matches('\0').to_string();
    assert_eq!((word(0), word(1) & libc::IN_CREATE, name.as_str()), (1, libc::IN_CREATE, "new"));
}

#[test]
fn a_watched_path_deleted_before_restore_fails_it_naming_the_path() {
    require_root!();
    crd_tests::require_tool!("python3");
    let dir = tempfile::tempdir().unwrap();
    let (_a, b, _fd, _original, image) = inotify_image(dir.path());
    std::fs::remove_dir(&b).unwrap();
    let refused = crd(&["restore", image.to_str().unwrap()]);
    let err = stderr(&refused);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&format!("{} no longer exists", b.display())), "{err}");
}

/// `fanotify flags:F event-flags:E` of an fdinfo, as numbers.
fn fanotify_flags(pid: u32, fd: u32) -> (u32, u32) {
    let info = fdinfo(pid, fd);
    let line =
        info.lines().find_map(|l| l.strip_prefix("fanotify flags:")).unwrap_or_else(|| panic!("{info}"));
    let (flags, events) = line.split_once(" event-flags:").unwrap();
    (u32::from_str_radix(flags.trim(), 16).unwrap(), u32::from_str_radix(events.trim(), 16).unwrap())
}

/// The `detail` `crd ls --json` gives fd `fd` of `pid` from `source`.
fn listed_detail(pid: u32, fd: u32, source: &str) -> (String, String) {
    let out = crd(&["ls", &pid.to_string(), "--json", "--source", source]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entry = json["processes"][0]["fds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["fd"] == fd)
        .unwrap_or_else(|| panic!("no fd {fd}: {json}"))
        .clone();
    (entry["kind"].as_str().unwrap().to_string(), entry["detail"].as_str().unwrap_or_default().to_string())
}

#[test]
fn a_fanotify_group_is_listed_with_its_flags_by_both_sources_and_refused_at_restore() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let watched = dir.path().join("watched");
    std::fs::write(&watched, b"x").unwrap();
    // FAN_CLASS_NOTIF | FAN_UNLIMITED_QUEUE, a mark for FAN_OPEN | FAN_CLOSE_WRITE.
    let fixture = crd_tests::spawn(&[&format!("fanotify:3:10:28:{}", watched.display())], 1);
    let pid = fixture.root();
    let (flags, event_flags) = fanotify_flags(pid, 3);
    assert_eq!(flags, 0x10, "the kernel shows the init flags");
    for source in ["bpf", "procfs"] {
        let (kind, detail) = listed_detail(pid, 3, source);
        assert_eq!(kind, "Fanotify", "{source}");
        assert_eq!(
            detail,
            format!("flags=FAN_CLASS_NOTIF|FAN_UNLIMITED_QUEUE event-flags={event_flags:#o} marks=1"),
            "{source}"
        );
    }
    let image = dir.path().join("fanotify.crd");
    let out = crd(&["checkpoint", &pid.to_string(), "-o", image.to_str().unwrap()]);
    let refused = if out.status.success() {
        drop(fixture);
        crd(&["restore", image.to_str().unwrap()])
    } else {
        out
    };
    let err = stderr(&refused);
    assert!(!refused.status.success(), "{err}");
    assert!(err.contains("fd 3") && err.contains("fanotify"), "{err}");
}

#[test]
fn an_inotify_with_unread_events_lists_how_many_bytes_wait_and_the_checkpoint_warns() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    // IN_CREATE on the directory, then two files created in it: two events queued.
    let fixture = crd_tests::spawn(&[&format!("inotify:3:100:{}", dir.path().display())], 1);
    let pid = fixture.root();
    std::fs::write(dir.path().join("one"), b"").unwrap();
    std::fs::write(dir.path().join("two"), b"").unwrap();
    let mut queued: libc::c_int = 0;
    let copy = grab(pid, 3);
    // SAFETY: FIONREAD writes one int into our local.
    assert_eq!(unsafe { libc::ioctl(copy.as_raw_fd(), libc::FIONREAD as libc::Ioctl, &mut queued) }, 0);
    assert!(queued > 0, "events wait");
    for source in ["bpf", "procfs"] {
        let (kind, detail) = listed_detail(pid, 3, source);
        assert_eq!(kind, "Inotify", "{source}");
        assert!(detail.ends_with(&format!(" queued={queued}")), "{source}: {detail}");
    }
    // The image goes elsewhere: its creation in the watched directory would be an event.
    let elsewhere = tempfile::tempdir().unwrap();
    let image = elsewhere.path().join("inotify.crd");
    let out = crd(&["checkpoint", &pid.to_string(), "-o", image.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("{queued} bytes of events queued and not read are not saved")),
        "{}",
        stderr(&out)
    );
    // Listing and checkpointing read nothing: the events still wait.
    let mut after: libc::c_int = 0;
    // SAFETY: as above.
    assert_eq!(unsafe { libc::ioctl(copy.as_raw_fd(), libc::FIONREAD as libc::Ioctl, &mut after) }, 0);
    assert_eq!(after, queued);
    drop(fixture);
}
