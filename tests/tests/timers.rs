//! timerfd and signalfd as kinds: harvested by BPF and by /proc alike, saved, restored
//! and compared through the kernel (fdinfo of the restored stub, `timerfd_gettime` and
//! poll on a `pidfd_getfd` copy of its fd), and a restored signalfd that receives a
//! signal sent to the restored process.
use std::{
    fs,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    time::Duration,
};

use crd::{
    Source,
    kinds::{Kind, Saved, signalfd::SignalfdState, timerfd::TimerfdState},
    sys::{pidfd_getfd, pidfd_open},
    types::{Fd, Pid},
};
use crd_tests::{Index, checkpoint, crd, image_of_stopped, require_root, restore_with, spawn};

const NS: u64 = 1_000_000_000;

/// A copy of fd `fd` of process `pid` (the very same description).
fn fd_of(pid: u32, fd: u32) -> OwnedFd {
    let pidfd = pidfd_open(Pid(pid)).expect("pidfd");
    pidfd_getfd(pidfd.as_fd(), Fd(fd)).expect("pidfd_getfd")
}

/// The value of a `/proc/PID/fdinfo/FD` line.
fn fdinfo(pid: u32, fd: u32, field: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':').map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {field} in fdinfo of {pid}:{fd}"))
}

/// `timerfd_gettime`: (remaining, interval) in ns.
fn gettime(fd: &OwnedFd) -> (u64, u64) {
    let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    let mut v = libc::itimerspec { it_interval: zero, it_value: zero };
    // SAFETY: writes one itimerspec to a valid pointer; fd is live.
    assert_eq!(unsafe { libc::timerfd_gettime(fd.as_raw_fd(), &mut v) }, 0, "timerfd_gettime");
    let ns = |t: libc::timespec| t.tv_sec as u64 * NS + t.tv_nsec as u64;
    (ns(v.it_value), ns(v.it_interval))
}

fn now_on(clock: i32) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes one timespec to a valid pointer.
    assert_eq!(unsafe { libc::clock_gettime(clock, &mut ts) }, 0);
    ts.tv_sec as u64 * NS + ts.tv_nsec as u64
}

/// Whether `fd` becomes readable within a generous minute.
fn becomes_readable(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 60_000) == 1 && p.revents & libc::POLLIN != 0 }
}

fn timer(body: &crd::image::ImageBody, pid: u32, fd: u32) -> TimerfdState {
    match &Index::new(&body.graph).inode(pid, fd).state {
        Saved::Timerfd(t) => t.clone(),
        other => panic!("PID {pid} fd {fd} is not a timerfd: {other:?}"),
    }
}

fn signals(body: &crd::image::ImageBody, pid: u32, fd: u32) -> SignalfdState {
    match &Index::new(&body.graph).inode(pid, fd).state {
        Saved::Signalfd(s) => s.clone(),
        other => panic!("PID {pid} fd {fd} is not a signalfd: {other:?}"),
    }
}

const STEPS: [&str; 6] = [
    // A relative one-shot timer, 8 s from now.
    "timerfd:3:monotonic:8000:0:",
    // An absolute CLOCK_REALTIME timer an hour away, cancelled if the clock is set.
    "timerfd:4:realtime:3600000:0:ac",
    // An interval timer every 50 ms, never read: its expirations pile up.
    "timerfd:5:monotonic:50:50:n",
    // A disarmed timer on CLOCK_BOOTTIME.
    "timerfd:6:boottime",
    // A signalfd for SIGINT and SIGUSR2 (the fixture blocks both).
    "signalfd:7:INT,USR2",
    "dup:7:8",
];

#[test]
fn timers_and_signalfds_keep_their_state_through_a_restore() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let fixture = spawn(&STEPS, 1);
    let pid = fixture.root();
    std::thread::sleep(Duration::from_millis(300));
    // Both harvesters see the same kinds and settings; ls shows them.
    let bpf = checkpoint(pid, false, Source::Bpf);
    let proc = checkpoint(pid, false, Source::Procfs);
    for fd in [3, 4, 5, 6] {
        let (a, b) = (timer(&bpf, pid, fd), timer(&proc, pid, fd));
        assert_eq!(
            (a.clock, a.abstime, a.cancel_on_set, a.interval_ns, a.value_ns == 0),
            (b.clock, b.abstime, b.cancel_on_set, b.interval_ns, b.value_ns == 0),
            "fd {fd}: BPF vs /proc"
        );
    }
    assert_eq!(signals(&bpf, pid, 7), signals(&proc, pid, 7));
    let g = Index::new(&bpf.graph);
    assert_eq!(g.inode(pid, 7).kind(), Kind::Signalfd);
    assert_eq!(g.inode_ref(pid, 8), g.inode_ref(pid, 7), "a dup is the same signalfd");
    assert_ne!(g.inode_ref(pid, 3), g.inode_ref(pid, 5), "two timerfds, two objects");
    let listed = String::from_utf8_lossy(&crd(&["ls", &pid.to_string()]).stdout).into_owned();
    assert!(listed.contains("anon_inode:[timerfd] clock=MONOTONIC next="), "{listed}");
    assert!(listed.contains("clock=REALTIME next=") && listed.contains("abstime cancel-on-set"), "{listed}");
    assert!(listed.contains("clock=BOOTTIME disarmed ticks=0"), "{listed}");
    assert!(listed.contains("anon_inode:[signalfd] SIGINT,SIGUSR2"), "{listed}");

    // The image: a lapsed interval timer counts every missed expiration, not just the
    // first (fdinfo says 1 until the timer is forwarded).
    let (image, path, _log) = image_of_stopped(fixture, dir.path());
    let (relative, absolute, interval) =
        (timer(&image, pid, 3), timer(&image, pid, 4), timer(&image, pid, 5));
    assert!(interval.ticks >= 2, "{interval:?}");
    assert_eq!(interval.interval_ns, 50_000_000);
    assert!(absolute.abstime && absolute.cancel_on_set, "{absolute:?}");
    // A pause: a relative re-arm of the absolute timer would now be a second late.
    std::thread::sleep(Duration::from_secs(1));

    let restored = restore_with(&["restore", path.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e}"));
    let stub = restored.root;
    // Through the kernel: each timer's clock, settime flags and interval.
    for (fd, clock, flags, interval) in [
        (3, "1", "00", "(0, 0)"),
        (4, "0", "03", "(0, 0)"),
        (5, "1", "00", "(0, 50000000)"),
        (6, "7", "00", "(0, 0)"),
    ] {
        assert_eq!(fdinfo(stub, fd, "clockid"), clock, "fd {fd}");
        assert_eq!(fdinfo(stub, fd, "settime flags"), flags, "fd {fd}");
        assert_eq!(fdinfo(stub, fd, "it_interval"), interval, "fd {fd}");
    }
    // The unread expirations are back (the timer may have added one since).
    let ticks: u64 = fdinfo(stub, 5, "ticks").parse().unwrap();
    assert!(ticks >= interval.ticks, "{ticks} < {}", interval.ticks);
    assert_eq!(fdinfo(stub, 6, "it_value"), "(0, 0)", "still disarmed");
    // The absolute timer kept its deadline on CLOCK_REALTIME.
    let (left, _) = gettime(&fd_of(stub, 4));
    let deadline = now_on(libc::CLOCK_REALTIME) + left;
    assert!(deadline.abs_diff(absolute.value_ns) < NS / 2, "deadline {deadline} vs {}", absolute.value_ns);
    // The relative timer resumed with no more than what remained, and then expires.
    let copy = fd_of(stub, 3);
    let (left, _) = gettime(&copy);
    assert!(left <= relative.remaining_ns, "{left} > {}", relative.remaining_ns);
    assert!(becomes_readable(&copy), "the restored relative timer never expired");
    let mut count = [0u8; 8];
    nix::unistd::read(copy.as_fd(), &mut count).unwrap();
    assert_eq!(u64::from_ne_bytes(count), 1);
    // The signalfd's mask; its dup is the same description.
    assert_eq!(
        fdinfo(stub, 7, "sigmask"),
        format!("{:016x}", (1u64 << (libc::SIGINT - 1)) | (1 << (libc::SIGUSR2 - 1)))
    );
    let again = checkpoint(stub, false, Source::Bpf);
    assert_eq!(Index::new(&again.graph).file_ref(stub, 8), Index::new(&again.graph).file_ref(stub, 7));
}

/// The harvests of `pid` by BPF and by /proc, made while it is frozen.
fn both_harvests(pid: u32) -> (crd::harvest::Harvest, crd::harvest::Harvest) {
    use crd::harvest::{Harvester, Scope, bpf::BpfHarvester, procfs::ProcfsHarvester};
    let tgids = [crd::types::Tgid(pid)];
    let mut bpf = BpfHarvester::load(false, &Default::default()).expect("BPF loads");
    let frozen = crd::freeze::Frozen::freeze(tgids[0], false, &|| false).expect("frozen");
    let (by_bpf, _) = bpf.harvest(Scope::Processes(&tgids), &|| false).expect("BPF harvest");
    let (by_proc, _) = ProcfsHarvester.harvest(Scope::Processes(&tgids), &|| false).expect("/proc harvest");
    drop(frozen);
    (by_bpf, by_proc)
}

fn live_of(harvest: &crd::harvest::Harvest, pid: u32, fd: u32) -> crd::kinds::Live {
    harvest
        .fds
        .iter()
        .find(|f| f.tgid.0 == pid && f.fd.0 == fd)
        .unwrap_or_else(|| panic!("PID {pid} fd {fd} not harvested"))
        .file
        .object
        .live
        .clone()
}

/// BPF reads `timerfd_ctx` and `signalfd_ctx` itself (no fdinfo): what it reads must be
/// what fdinfo shows. The time left is read at two moments, so only bounds are compared:
/// both at most what was set, both zero or both not.
#[test]
fn bpf_reads_timers_and_signal_masks_as_fdinfo_shows_them() {
    require_root!();
    use crd::kinds::{Live, timerfd::TimerfdLive};
    let fixture = spawn(
        &[
            "timerfd:3:monotonic:8000:0:",
            "timerfd:4:realtime:3600000:0:ac",
            "timerfd:5:monotonic:50:50:n",
            "timerfd:6:boottime",
            "timerfd:9:boottime:600000:1000:",
            "signalfd:7:INT,USR2",
            "dup:7:8",
        ],
        1,
    );
    let pid = fixture.root();
    // The interval timer lapses: its first expiration counted, not yet forwarded.
    std::thread::sleep(Duration::from_millis(300));
    let (bpf, proc) = both_harvests(pid);
    let timer = |harvest, fd| match live_of(harvest, pid, fd) {
        Live::Timerfd(t) => t,
        other => panic!("fd {fd} is not a timerfd: {other:?}"),
    };
    for (fd, set_ms) in [(3, 8000u64), (4, 3_600_000), (5, 50), (6, 0), (9, 600_000)] {
        let (a, b): (TimerfdLive, TimerfdLive) = (timer(&bpf, fd), timer(&proc, fd));
        let settings = |t: &TimerfdLive| (t.clock, t.settime_flags, t.interval_ns, t.ticks);
        assert_eq!(settings(&a), settings(&b), "fd {fd}: BPF {a:?} vs /proc {b:?}");
        for t in [&a, &b] {
            assert!(t.remaining_ns <= set_ms * 1_000_000, "fd {fd}: {t:?}");
        }
        assert_eq!(a.remaining_ns == 0, b.remaining_ns == 0, "fd {fd}: BPF {a:?} vs /proc {b:?}");
    }
    assert!(timer(&bpf, 3).remaining_ns > 0 && timer(&bpf, 4).remaining_ns > 0);
    assert_eq!(timer(&bpf, 4).settime_flags, 3, "TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET");
    assert_eq!((timer(&bpf, 5).ticks, timer(&bpf, 5).remaining_ns), (1, 0), "lapsed, not forwarded");
    assert_eq!(timer(&bpf, 9).interval_ns, NS);
    let mask = (1u64 << (libc::SIGINT - 1)) | (1 << (libc::SIGUSR2 - 1));
    for fd in [7, 8] {
        assert_eq!(live_of(&bpf, pid, fd), Live::Signalfd(SignalfdState { mask }), "fd {fd}");
        assert_eq!(live_of(&proc, pid, fd), live_of(&bpf, pid, fd), "fd {fd}");
    }
}

/// An alarm timerfd keeps its timer in `timerfd_ctx::t.alarm`, not `t.tmr`: BPF reads
/// the other member for it.
#[test]
fn bpf_reads_an_alarm_timerfd_as_fdinfo_shows_it() {
    require_root!();
    use crd::kinds::Live;
    let Ok(fixture) = crd::fixture::spawn(&crd_tests::crd_bin(), &["timerfd:3:boottime_alarm:900000:0:"], 1)
    else {
        eprintln!("no alarm timers on this machine (CLOCK_BOOTTIME_ALARM refused); skipped");
        return;
    };
    let pid = fixture.root();
    let (bpf, proc) = both_harvests(pid);
    let (Live::Timerfd(a), Live::Timerfd(b)) = (live_of(&bpf, pid, 3), live_of(&proc, pid, 3)) else {
        panic!("not a timerfd");
    };
    assert_eq!(
        (a.clock, a.settime_flags, a.interval_ns, a.ticks),
        (b.clock, b.settime_flags, b.interval_ns, b.ticks)
    );
    assert_eq!(a.clock, libc::CLOCK_BOOTTIME_ALARM);
    for t in [&a, &b] {
        assert!(t.remaining_ns > 0 && t.remaining_ns <= 900 * NS, "{t:?}");
    }
}

#[test]
fn a_restored_signalfd_reads_a_signal_sent_to_the_restored_process() {
    require_root!();
    crd_tests::require_tool!("python3");
    let dir = tempfile::tempdir().unwrap();
    let fixture = spawn(&["signalfd:7:INT,USR2"], 1);
    let (_image, path, _log) = image_of_stopped(fixture, dir.path());
    // crd restores no signal mask (a stub blocks only its commit signal, and the program
    // starts with crd's mask): the program blocks what it reads through the signalfd, as
    // the original did.
    let ready = dir.path().join("ready");
    let got = dir.path().join("got");
    let program = format!(
        "import os, signal, struct\n\
         signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGUSR2}})\n\
         open({ready:?}, 'w').close()\n\
         data = os.read(7, 128)\n\
         open({got:?}, 'w').write(str(struct.unpack_from('I', data)[0]))\n"
    );
    let restored =
        restore_with(&["restore", path.to_str().unwrap(), "--exec", "--", "python3", "-c", &program])
            .unwrap_or_else(|e| panic!("{e}"));
    let waited = |p: &std::path::Path| {
        (0..600).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            p.exists()
        })
    };
    assert!(waited(&ready), "the program never started");
    // SAFETY: plain kill(2) of the restored process.
    assert_eq!(unsafe { libc::kill(restored.root as i32, libc::SIGUSR2) }, 0);
    assert!(waited(&got), "the signalfd never reported the signal");
    assert_eq!(fs::read_to_string(&got).unwrap(), libc::SIGUSR2.to_string());
}

/// A timer on a clock the restoring kernel refuses (here: an alarm clock, for a crd
/// without CAP_WAKE_ALARM) is a one-line error naming the fd and the clock, with
/// nothing left running.
#[test]
fn a_timer_on_a_clock_the_kernel_refuses_is_a_one_line_error_naming_it() {
    require_root!();
    crd_tests::require_tool!("setpriv");
    let dir = tempfile::tempdir().unwrap();
    let fixture = spawn(&["timerfd:3:boottime_alarm:600000:0:"], 1);
    let pid = fixture.root();
    let (image, path, _log) = image_of_stopped(fixture, dir.path());
    assert_eq!(timer(&image, pid, 3).clock, libc::CLOCK_BOOTTIME_ALARM);
    // setpriv drops CAP_WAKE_ALARM from the bounding set: crd, root, runs without it.
    let out = std::process::Command::new("setpriv")
        .args(["--bounding-set=-wake_alarm", "--"])
        .arg(crd_tests::crd_bin())
        .args(["restore", path.to_str().unwrap()])
        .output()
        .expect("setpriv runs");
    assert!(!out.status.success(), "restored without CAP_WAKE_ALARM");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("fd 3") && lines[0].contains("CLOCK_BOOTTIME_ALARM"), "{err}");
    assert!(lines[0].contains("CAP_WAKE_ALARM"), "says what is missing: {err}");
    assert!(out.stdout.is_empty(), "no partial output: {}", String::from_utf8_lossy(&out.stdout));
}
