//! Terminals: a pty restored as one pty (its master and slave connected, with its
//! termios, window size and packet mode), the sessions, process groups and controlling
//! terminal of the stubs, an interactive bash that answers on its restored pty, both
//! harvesters agreeing, and a pty whose other end is outside refused by fd. Everything
//! is compared through the kernel (copies of the stubs' fds, /proc/PID/stat), not
//! through crd's own view.
use std::{
    fs,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
        unix::{fs::MetadataExt, process::CommandExt},
    },
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crd::{
    Source,
    kinds::{Kind, Saved, terminal::End},
};
use crd_tests::{
    Index, assert_round_trip, checkpoint, crd, image_of_stopped, programs::grab, require_root, require_tool,
    restore_with, spawn,
};

/// Held by every test of this suite that makes or frees a pty: the restored pty takes
/// its old index only where it is free when crd makes it, and the test that checks this
/// must not see another test free that index meanwhile (libtest runs tests in parallel).
fn pty_numbers() -> std::sync::MutexGuard<'static, ()> {
    static PTY_NUMBERS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    PTY_NUMBERS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Fields 5–8 of /proc/PID/stat: (pgrp, session, tty_nr, tpgid).
fn stat(pid: u32) -> (u32, u32, u64, i64) {
    let line = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &line[line.rfind(')').unwrap() + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    (f[2].parse().unwrap(), f[3].parse().unwrap(), f[4].parse::<i64>().unwrap() as u64, f[5].parse().unwrap())
}

/// The device number (as /proc/PID/stat's tty_nr encodes it) of the terminal at `fd`.
fn tty_nr(fd: BorrowedFd<'_>) -> u64 {
    let rdev = fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap().rdev();
    let (major, minor) = (libc::major(rdev) as u64, libc::minor(rdev) as u64);
    (major << 8) | (minor & 0xff) | ((minor & !0xff) << 12)
}

/// The termios the kernel keeps (TCGETS: the four flag words, the line discipline and
/// 19 control characters); what libc's larger struct holds past them (musl's speeds and
/// spare control characters) is whatever was in memory before, and not compared.
fn termios(fd: BorrowedFd<'_>) -> (u32, u32, u32, u32, u8, [u8; 19]) {
    // SAFETY: termios is plain old data; all zeroes is valid.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr fills the termios we pass.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0, "tcgetattr");
    let mut cc = [0u8; 19];
    cc.copy_from_slice(&t.c_cc[..19]);
    (t.c_iflag, t.c_oflag, t.c_cflag, t.c_lflag, t.c_line, cc)
}

fn winsize(fd: BorrowedFd<'_>) -> (u16, u16) {
    // SAFETY: winsize is plain old data; TIOCGWINSZ fills it.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    assert_eq!(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) }, 0);
    (ws.ws_row, ws.ws_col)
}

fn get_int(fd: BorrowedFd<'_>, request: libc::Ioctl) -> i32 {
    let mut value: libc::c_int = 0;
    // SAFETY: the request writes one int.
    assert_eq!(
        unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut value) },
        0,
        "{}",
        std::io::Error::last_os_error()
    );
    value
}

/// Reads what arrives on `fd` until `want` is in it (or `within` passes); returns all
/// that was read.
fn read_until(fd: BorrowedFd<'_>, want: &[u8], within: Duration) -> Vec<u8> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while Instant::now() < deadline && !got.windows(want.len()).any(|w| w == want) {
        let mut poll = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll, 1, 100) } <= 0 {
            continue;
        }
        let mut buf = [0u8; 4096];
        match nix::unistd::read(fd, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

/// Reads whatever is waiting on `fd` until it has been quiet for `quiet`.
fn drain(fd: BorrowedFd<'_>, quiet: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    loop {
        let mut poll = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll, 1, quiet.as_millis() as i32) } <= 0 {
            return got;
        }
        let mut buf = [0u8; 4096];
        match nix::unistd::read(fd, &mut buf) {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A pty held by a root (master at 3, slave at 4, 33x111, packet mode, raw) whose child
/// leads a session with the slave as controlling terminal, and whose grandchild leads
/// the foreground process group.
const SESSION_STEPS: [&str; 10] = [
    "pty:3:4",
    "winsize:3:33:111",
    "raw:4",
    "packet:3",
    "fork",
    "setsid",
    "ctty:4",
    "fork",
    "setpgid",
    "foreground:4",
];

#[test]
fn a_pty_comes_back_connected_with_its_settings_and_its_session() {
    require_root!();
    let _ptys = pty_numbers();
    let dir = tempfile::tempdir().unwrap();
    let fixture = spawn(&SESSION_STEPS, 3);
    let [root, leader, member] = [fixture.pids[0], fixture.pids[1], fixture.pids[2]];
    let old_name = fs::read_link(format!("/proc/{root}/fd/4")).unwrap();
    let (old_termios, old_winsize) = {
        let slave = grab(root, 4);
        (termios(slave.as_fd()), winsize(slave.as_fd()))
    };
    // What the kernel says of the original, so the test checks what it thinks it does.
    let (_, sid, tty, fg) = stat(leader);
    assert_eq!((sid, fg), (leader, member as i64));
    assert_eq!(tty, tty_nr(grab(root, 4).as_fd()));
    let (original, image, _log) = image_of_stopped(fixture, dir.path());
    let g = Index::new(&original.graph);
    assert_eq!(g.inode(root, 3).kind(), Kind::Terminal);
    assert_ne!(g.inode_ref(root, 3), g.inode_ref(root, 4), "master and slave: two tied objects");
    assert_eq!(g.inode_ref(root, 4), g.inode_ref(leader, 4), "every slave description: one object");
    let restored = assert_round_trip(&original, &image);
    let new = |old: u32| restored.tasks.iter().find(|(o, _)| *o == old).map(|(_, n)| *n).unwrap();
    let (new_root, new_leader, new_member) = (new(root), new(leader), new(member));
    let master = grab(new_root, 3);
    let slave = grab(new_root, 4);
    // The old index where it is free (the original is gone; another program may have
    // taken its number meanwhile).
    let new_name = fs::read_link(format!("/proc/{new_root}/fd/4")).unwrap();
    assert!(new_name == old_name || old_name.exists(), "{new_name:?} instead of the free {old_name:?}");
    // The settings, through the kernel.
    assert_eq!(termios(slave.as_fd()), old_termios, "termios");
    assert_eq!(winsize(slave.as_fd()), old_winsize, "window size");
    assert_eq!(old_winsize, (33, 111));
    assert_eq!(get_int(master.as_fd(), libc::TIOCGPKT), 1, "packet mode");
    // One pty: bytes written into the master are read from the slave, and back.
    nix::unistd::write(&master, b"ping\n").unwrap();
    assert_eq!(read_until(slave.as_fd(), b"ping\n", Duration::from_secs(5)), b"ping\n");
    nix::unistd::write(&slave, b"pong\n").unwrap();
    let back = read_until(master.as_fd(), b"pong", Duration::from_secs(5));
    assert_eq!(back.first(), Some(&0), "packet mode: a data packet starts with TIOCPKT_DATA ({back:?})");
    assert!(back.windows(4).any(|w| w == b"pong"), "{back:?}");
    // The session: its leader has the restored slave as controlling terminal, with the
    // member's group in the foreground.
    let (leader_pgid, leader_sid, leader_tty, fg) = stat(new_leader);
    assert_eq!((leader_pgid, leader_sid), (new_leader, new_leader), "the leader leads its session and group");
    assert_eq!(leader_tty, tty_nr(slave.as_fd()), "the restored slave controls the session");
    let (member_pgid, member_sid, member_tty, _) = stat(new_member);
    assert_eq!((member_pgid, member_sid, member_tty), (new_member, new_leader, leader_tty));
    assert_eq!(fg, new_member as i64, "the member's group is in the foreground");
}

/// A group made by a process that leads no session comes back made by the same stub and
/// joined by the same member, in whatever session the original was: on a host that is
/// the test's session; under an init that never called `setsid` (the VM matrix's
/// guests, some containers) it is session 0, which crd once took for "no session known"
/// and so left every stub in the root's group.
#[test]
fn a_group_made_outside_any_session_leader_comes_back() {
    require_root!();
    let _ptys = pty_numbers();
    let dir = tempfile::tempdir().unwrap();
    let fixture = spawn(&["fork", "setpgid", "fork"], 3);
    let [root, maker, member] = [fixture.pids[0], fixture.pids[1], fixture.pids[2]];
    // What the kernel says of the original, so the test checks what it thinks it does.
    let ((root_pgid, root_sid, ..), (maker_pgid, maker_sid, ..)) = (stat(root), stat(maker));
    assert_eq!((maker_pgid, maker_sid), (maker, root_sid), "the maker leads a group in the root's session");
    assert_ne!(root_pgid, maker);
    assert_eq!(stat(member).0, maker, "the member is in the maker's group");
    let (original, image, _log) = image_of_stopped(fixture, dir.path());
    let restored = assert_round_trip(&original, &image);
    let new = |old: u32| restored.tasks.iter().find(|(o, _)| *o == old).map(|(_, n)| *n).unwrap();
    let (new_root, new_maker, new_member) = (new(root), new(maker), new(member));
    assert_eq!(stat(new_maker).0, new_maker, "the restored maker leads its group");
    assert_eq!(stat(new_member).0, new_maker, "the restored member is in the maker's group");
    assert_ne!(stat(new_root).0, new_maker, "the root is not");
}

#[test]
fn bpf_and_procfs_agree_on_ptys_and_sessions() {
    require_root!();
    let _ptys = pty_numbers();
    let fixture = spawn(&SESSION_STEPS, 3);
    let bpf = checkpoint(fixture.root(), true, Source::Bpf);
    let procfs = checkpoint(fixture.root(), true, Source::Procfs);
    if let Err(difference) = bpf.graph.same_shape(&procfs.graph) {
        panic!("BPF and /proc graphs differ: {difference}");
    }
    assert!(bpf.graph == procfs.graph, "BPF and /proc graphs differ");
    let g = Index::new(&bpf.graph);
    let Saved::Terminal(master) = &g.inode(fixture.root(), 3).state else { panic!("not a pty") };
    assert_eq!(master.end, End::Master);
    let index: u32 = fs::read_link(format!("/proc/{}/fd/4", fixture.root()))
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("/dev/pts/")
        .parse()
        .unwrap();
    assert_eq!(master.index, Some(index), "the master's index is its slave's");
    let pids: Vec<String> = fixture.pids.iter().map(u32::to_string).collect();
    let mut args: Vec<&str> = vec!["ls"];
    args.extend(pids.iter().map(String::as_str));
    let by_bpf = crd(&[&args[..], &["--source", "bpf"]].concat());
    let by_procfs = crd(&[&args[..], &["--source", "procfs"]].concat());
    assert!(by_bpf.status.success(), "{}", String::from_utf8_lossy(&by_bpf.stderr));
    let listing = String::from_utf8_lossy(&by_bpf.stdout);
    assert_eq!(listing, String::from_utf8_lossy(&by_procfs.stdout));
    // `ls` reads a master's index from fdinfo (`tty-index:`), where this kernel shows it.
    let shows_index = fs::read_to_string(format!("/proc/{}/fdinfo/3", fixture.root()))
        .is_ok_and(|info| info.contains("tty-index:"));
    let master = if shows_index { format!("pty {index} master") } else { "pty ? master".into() };
    assert!(listing.contains(&master), "{listing}");
    let (leader, member) = (fixture.pids[1], fixture.pids[2]);
    let ctty = format!("PID {leader} (crd): /dev/pts/{index}, session {leader}, foreground group {member}");
    assert!(listing.contains(&ctty), "lacks {ctty:?}: {listing}");
}

#[test]
fn a_pty_whose_master_is_outside_is_refused_by_fd_unless_allowed() {
    require_root!();
    let _ptys = pty_numbers();
    let dir = tempfile::tempdir().unwrap();
    // The child keeps only the slave, its session's terminal; its parent, not
    // checkpointed, holds the master (a shell whose terminal emulator is not in the
    // image).
    let fixture = spawn(&["pty:3:4", "fork", "close:3", "setsid", "ctty:4"], 2);
    let child = fixture.pids[1];
    let body = checkpoint(child, false, Source::Bpf);
    let path = dir.path().join("child.crd");
    crd::image::write(&path, &body).unwrap();
    let out = crd(&["restore", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&format!("PID {child} fd 4 (pty")) && err.contains("--allow-external"), "{err}");
    // Allowed: a slave of a new pty whose master is gone (like a pipe without writer),
    // in a session of its own without terminal (a hung-up terminal controls nothing).
    let restored = restore_with(&["restore", path.to_str().unwrap(), "--allow-external"]).unwrap();
    let (_, sid, tty, _) = stat(restored.root);
    assert_eq!((sid, tty), (restored.root, 0));
    let slave = grab(restored.root, 4);
    let rdev = fs::metadata(format!("/proc/self/fd/{}", slave.as_raw_fd())).unwrap().rdev();
    assert!((136..=143).contains(&libc::major(rdev)), "a pty slave");
    drop(fixture);
}

#[test]
fn a_pty_end_whose_other_end_is_closed_everywhere_comes_back_so_and_is_no_external() {
    require_root!();
    let _ptys = pty_numbers();
    let dir = tempfile::tempdir().unwrap();
    // A slave whose master was closed (hung up), and a master whose slave was closed.
    let fixture = spawn(&["pty:3:4", "close:3", "pty:5:6", "close:6"], 1);
    let pid = fixture.root();
    let hup = |fd: &OwnedFd| {
        let mut poll = libc::pollfd { fd: fd.as_raw_fd(), events: 0, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        assert!(unsafe { libc::poll(&mut poll, 1, 0) } >= 0);
        poll.revents & libc::POLLHUP != 0
    };
    assert!(hup(&grab(pid, 4)) && hup(&grab(pid, 5)), "the kernel says both other ends are closed");
    let (original, image, _log) = image_of_stopped(fixture, dir.path());
    // No --allow-external: nothing outside holds the other ends.
    let restored = assert_round_trip(&original, &image);
    let (slave, master) = (grab(restored.root, 4), grab(restored.root, 5));
    assert!(hup(&slave) && hup(&master), "restored with their other ends closed");
    let mut buf = [0u8; 8];
    assert!(
        matches!(nix::unistd::read(&slave, &mut buf), Ok(0) | Err(nix::Error::EIO)),
        "a hung-up slave reads nothing"
    );
}

#[test]
fn dev_tty_is_external_refused_by_fd() {
    require_root!();
    let _ptys = pty_numbers();
    let dir = tempfile::tempdir().unwrap();
    // A session leader with a pty as terminal opens /dev/tty (which stands for it).
    let fixture = spawn(&["pty:3:4", "fork", "setsid", "ctty:4", "open:5:rw:/dev/tty"], 2);
    let child = fixture.pids[1];
    let tty = fs::metadata(format!("/proc/{child}/fd/5")).unwrap().rdev();
    assert_eq!((libc::major(tty), libc::minor(tty)), (5, 0), "the child holds /dev/tty itself");
    let (_, image, _log) = image_of_stopped(fixture, dir.path());
    let out = crd(&["restore", image.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&format!("PID {child} fd 5 (pty")) && err.contains("--allow-external"), "{err}");
}

#[test]
fn a_graft_hands_the_live_pty_over_and_leaves_the_session_its_terminal() {
    require_root!();
    let _ptys = pty_numbers();
    let fixture = spawn(&SESSION_STEPS, 3);
    let [root, leader] = [fixture.pids[0], fixture.pids[1]];
    let grafted =
        restore_with(&["graft", &root.to_string(), "--tree"]).unwrap_or_else(|e| panic!("graft: {e}"));
    let new = |old: u32| grafted.tasks.iter().find(|(o, _)| *o == old).map(|(_, n)| *n).unwrap();
    // The very same pty: what the stub's master writes, the original's slave reads.
    let (stub_master, original_slave) = (grab(new(root), 3), grab(root, 4));
    nix::unistd::write(&stub_master, b"same\n").unwrap();
    assert_eq!(read_until(original_slave.as_fd(), b"same\n", Duration::from_secs(5)), b"same\n");
    // The original's session keeps its terminal; the stub leads a session without one.
    let (_, sid, tty, _) = stat(leader);
    assert_eq!((sid, tty), (leader, tty_nr(original_slave.as_fd())));
    let (_, new_sid, new_tty, _) = stat(new(leader));
    assert_eq!((new_sid, new_tty), (new(leader), 0));
    drop(fixture);
}

/// A bash on a pty it has as controlling terminal, holding the master at fd 10 too.
struct Bash(u32);

impl Drop for Bash {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of the process group (bash leads its own session).
        unsafe { libc::kill(-(self.0 as i32), libc::SIGKILL) };
    }
}

fn start_bash() -> Bash {
    let master = nix::pty::posix_openpt(nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY).unwrap();
    nix::pty::grantpt(&master).unwrap();
    nix::pty::unlockpt(&master).unwrap();
    // SAFETY: the test thread is the only one calling ptsname here.
    let name = unsafe { nix::pty::ptsname(&master) }.unwrap();
    let slave = fs::OpenOptions::new().read(true).write(true).open(&name).unwrap();
    let master_raw: RawFd = master.as_raw_fd();
    let mut command = Command::new("bash");
    command
        .args(["--norc", "--noprofile", "-i"])
        .env("PS1", "$ ")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // SAFETY: between fork and exec only async-signal-safe calls: setsid, ioctl, dup2,
    // close_range (by syscall: musl has no wrapper). Whatever else the test process held
    // without close-on-exec (another test's pipe) is not bash's: closed.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0
                || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0
                || libc::dup2(master_raw, 10) < 0
                || libc::syscall(libc::SYS_close_range, 3, 9, 0) < 0
                || libc::syscall(libc::SYS_close_range, 11, u32::MAX, 0) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().expect("bash starts");
    let pid = child.id();
    // Reaped by nobody but the test's end: bash is killed by its session group.
    std::mem::forget(child);
    drop(master);
    Bash(pid)
}

/// Sends a command to the shell on `master` and returns what it printed until `want`.
fn ask(master: &OwnedFd, command: &str, want: &str) -> String {
    nix::unistd::write(master, command.as_bytes()).unwrap();
    String::from_utf8_lossy(&read_until(master.as_fd(), want.as_bytes(), Duration::from_secs(10)))
        .into_owned()
}

#[test]
fn an_interactive_bash_answers_on_its_restored_pty_with_job_control() {
    require_root!();
    let _ptys = pty_numbers();
    require_tool!("bash");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("bash.crd");
    let bash = start_bash();
    let pid = bash.0;
    // Job control on (`m` in $-) only where bash got its terminal.
    let probe = "case $- in *m*) echo JOB$((6*7));; *) echo NOJOB$((6*7));; esac\n";
    {
        let master = grab(pid, 10);
        let said = ask(&master, probe, "JOB42");
        assert!(said.contains("\nJOB42") || said.contains("\rJOB42"), "the original: {said:?}");
        // Nothing unread in the pty when it is checkpointed.
        drain(master.as_fd(), Duration::from_millis(300));
    }
    let out = crd(&["checkpoint", &pid.to_string(), "-o", image.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    drop(bash);
    let restored = restore_with(&[
        "restore",
        image.to_str().unwrap(),
        "--exec",
        "--",
        "bash",
        "--norc",
        "--noprofile",
        "-i",
    ])
    .unwrap_or_else(|e| panic!("restore: {e}"));
    let new = restored.root;
    let _restored_bash = Bash(new);
    let master = grab(new, 10);
    let said = ask(&master, probe, "JOB42");
    assert!(
        said.contains("JOB42") && !said.contains("NOJOB42"),
        "the restored shell has job control: {said:?}"
    );
    assert!(!said.contains("no job control"), "{said:?}");
    // Through the kernel: the shell leads its session, whose terminal is the restored
    // slave at its fd 0, with the shell's group in the foreground.
    let slave = grab(new, 0);
    let (pgid, sid, tty, fg) = stat(new);
    assert_eq!((pgid, sid, fg), (new, new, new as i64));
    assert_eq!(tty, tty_nr(slave.as_fd()));
    // And it answers what is typed into the restored master.
    let said = ask(&master, "echo o''k\n", "\nok");
    assert!(said.contains("\nok"), "{said:?}");
}
