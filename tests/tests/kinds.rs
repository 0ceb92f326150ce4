//! File kinds as modules: eventfd and memfd harvested by BPF and by /proc, saved,
//! restored and compared through the kernel; anon-inode files as objects of their own;
//! ptys restored as one pty; images with unknown kinds and images of format 1.
use std::{
    fs,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::fs::{FileExt, PermissionsExt},
    },
    process::Command,
};

use crd::{
    Source,
    fixture::pattern,
    graph::Encounter,
    kinds::{Kind, Saved},
    sys::{pidfd_getfd, pidfd_open},
    types::{Fd, Pid},
};
use crd_tests::{
    Index, assert_round_trip, assert_running_untraced, checkpoint, crd, crd_bin, image_of_stopped,
    require_root, restore_with, spawn,
};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A copy of fd `fd` of process `pid` (the very same description).
fn fd_of(pid: u32, fd: u32) -> OwnedFd {
    let pidfd = pidfd_open(Pid(pid)).expect("pidfd");
    pidfd_getfd(pidfd.as_fd(), Fd(fd)).expect("pidfd_getfd")
}

/// The value of a `/proc/PID/fdinfo/FD` line.
fn fdinfo(pid: u32, fd: u32, field: &str) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':').map(|v| v.trim().to_string()))
}

/// Whether this kernel's /proc shows an eventfd's EFD_SEMAPHORE (6.5+): where it does
/// not, crd's /proc harvester saves every eventfd as non-semaphore (and says so).
fn proc_shows_eventfd_semaphore() -> bool {
    // SAFETY: plain eventfd(2); the fd is owned (and closed) below.
    let raw = unsafe { libc::eventfd(0, libc::EFD_SEMAPHORE | libc::EFD_CLOEXEC) };
    assert!(raw >= 0, "eventfd");
    // SAFETY: `raw` is a fresh fd nothing else owns.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    fdinfo(std::process::id(), fd.as_raw_fd() as u32, "eventfd-semaphore").is_some()
}

fn eventfd_state(body: &crd::image::ImageBody, pid: u32, fd: u32) -> (u64, bool) {
    match &Index::new(&body.graph).inode(pid, fd).state {
        Saved::Eventfd(e) => (e.count, e.semaphore),
        other => panic!("PID {pid} fd {fd} is not an eventfd: {other:?}"),
    }
}

#[test]
fn eventfds_keep_counter_semaphore_flag_and_sharing_through_a_restore() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let steps = ["eventfd:3:7:s", "eventfd:5:3:n", "dup:3:6", "cloexec:6", "fork"];
    let fixture = spawn(&steps, 2);
    let (parent, child) = (fixture.pids[0], fixture.pids[1]);
    for source in [Source::Bpf, Source::Procfs] {
        let body = checkpoint(parent, true, source);
        let g = Index::new(&body.graph);
        assert_eq!(g.inode(parent, 3).kind(), Kind::Eventfd, "{source}");
        let semaphore = source == Source::Bpf || proc_shows_eventfd_semaphore();
        assert_eq!(eventfd_state(&body, parent, 3), (7, semaphore), "{source}: counter and EFD_SEMAPHORE");
        assert_eq!(eventfd_state(&body, parent, 5), (3, false), "{source}");
        assert_eq!(g.file_ref(parent, 3), g.file_ref(parent, 6), "{source}: dup shares the description");
        assert_eq!(g.file_ref(child, 3), g.file_ref(parent, 3), "{source}: fork shares it too");
        assert_ne!(g.inode_ref(parent, 3), g.inode_ref(parent, 5), "{source}: two eventfds, two objects");
        assert!(g.file(parent, 5).flags & libc::O_NONBLOCK as u32 != 0, "{source}: EFD_NONBLOCK");
    }
    assert_running_untraced(parent);
    let (original, image, _log) = image_of_stopped(fixture, dir.path());
    let restored = assert_round_trip(&original, &image);
    // Through the kernel: the restored eventfd counts 7 and is a semaphore (each read
    // takes 1), the other counts 3 and is non-blocking.
    let stub = restored.root;
    assert_eq!(fdinfo(stub, 3, "eventfd-count").map(|c| u64::from_str_radix(&c, 16).unwrap()), Some(7));
    if let Some(semaphore) = fdinfo(stub, 3, "eventfd-semaphore") {
        assert_eq!(semaphore, "1");
    }
    let copy = fd_of(stub, 3);
    let mut value = [0u8; 8];
    nix::unistd::read(&copy, &mut value).unwrap();
    assert_eq!(u64::from_ne_bytes(value), 1, "a semaphore read takes one");
    assert_eq!(fdinfo(stub, 6, "eventfd-count").map(|c| u64::from_str_radix(&c, 16).unwrap()), Some(6));
    let flags = u32::from_str_radix(&fdinfo(stub, 5, "flags").unwrap(), 8).unwrap();
    assert!(flags & libc::O_NONBLOCK as u32 != 0);
}

#[test]
fn bpf_and_procfs_agree_on_new_kinds() {
    require_root!();
    let steps = [
        "eventfd:3:9:",
        "memfd:4:agree:5000:sg",
        "epoll:5",
        "timerfd:6",
        // EFD_SEMAPHORE only where /proc can show it.
        if proc_shows_eventfd_semaphore() { "eventfd:7:1:sn" } else { "eventfd:7:1:n" },
        "dup:4:8",
        "fork",
        "close:5",
    ];
    let fixture = spawn(&steps, 2);
    for tree in [false, true] {
        let bpf = checkpoint(fixture.root(), tree, Source::Bpf);
        let procfs = checkpoint(fixture.root(), tree, Source::Procfs);
        if let Err(difference) = bpf.graph.same_shape(&procfs.graph) {
            panic!("BPF and /proc graphs differ (tree = {tree}): {difference}");
        }
        assert!(bpf.graph == procfs.graph, "BPF and /proc graphs differ (tree = {tree})");
    }
    // `crd ls` gives the same listing from either source.
    let pids = [fixture.pids[0].to_string(), fixture.pids[1].to_string()];
    let by_bpf = crd(&["ls", &pids[0], &pids[1], "--source", "bpf"]);
    let by_procfs = crd(&["ls", &pids[0], &pids[1], "--source", "procfs"]);
    assert!(by_bpf.status.success(), "{}", stderr(&by_bpf));
    assert_eq!(String::from_utf8_lossy(&by_bpf.stdout), String::from_utf8_lossy(&by_procfs.stdout));
}

/// `crd ls --json --source SOURCE PIDS`, with these `KIND_*` bits cleared from the BPF
/// programs' configuration (the testing build's `CRD_TEST_CLEAR_KINDS`), as on a kernel
/// whose BTF lacks those fields.
fn listing_without(source: &str, pids: &[String], clear: u32) -> String {
    let out = Command::new(crd_bin())
        .args(["ls", "--json", "--source", source])
        .args(pids)
        .env("CRD_TEST_CLEAR_KINDS", clear.to_string())
        .output()
        .expect("crd runs");
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bpf_lists_timers_signalfds_and_epolls_as_proc_does_with_or_without_their_fields() {
    require_root!();
    use crd_common::{KIND_BPF_LOOP, KIND_EPOLL, KIND_SIGNALFD, KIND_TIMERFD};
    // Settings `ls` shows the same at any moment: a disarmed timer, a lapsed interval
    // timer (its next expiry an interval away until read), a mask, an empty epoll.
    let fixture = spawn(&["epoll:5", "timerfd:6", "timerfd:3:monotonic:50:50:n", "signalfd:7:INT,USR2"], 1);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pids = [fixture.root().to_string()];
    let by_procfs = listing_without("procfs", &pids, 0);
    assert!(by_procfs.contains("SIGINT,SIGUSR2") && by_procfs.contains("interval=0.050s"), "{by_procfs}");
    // BPF's own reads; fdinfo where the kernel lacks the fields; the program without
    // bpf_loop.
    for clear in [0, KIND_EPOLL | KIND_TIMERFD | KIND_SIGNALFD, KIND_BPF_LOOP] {
        assert_eq!(listing_without("bpf", &pids, clear), by_procfs, "KIND_* bits {clear:#x} cleared");
    }
}

#[test]
fn iterators_run_over_each_process_alone_list_what_one_run_over_every_task_lists() {
    require_root!();
    use crd_common::KIND_ITER_TASK_FILTER;
    // Threads, a CLONE_FILES child sharing its table, a forked child with a table of
    // its own, an epoll walked in BPF: what a per-process run (6.1+) must find as the
    // unfiltered run does.
    let steps = [
        "pipe:3:4",
        "epoll:5",
        "epollctl:5:3:1:7",
        "threads:2",
        "clonefiles",
        "fork",
        "pipes:5",
        "threads:1",
    ];
    let fixture = spawn(&steps, 2);
    let mut pids: Vec<String> = fixture.pids.iter().map(u32::to_string).collect();
    // The CLONE_FILES child reports no readiness: its PID is among the root's children.
    let root = fixture.root();
    let children = std::fs::read_to_string(format!("/proc/{root}/task/{root}/children")).unwrap();
    let others: Vec<String> =
        children.split_whitespace().map(str::to_string).filter(|c| !pids.contains(c)).collect();
    pids.extend(others);
    assert_eq!(pids.len(), 3, "{pids:?}");
    let everywhere = listing_without("bpf", &pids, KIND_ITER_TASK_FILTER);
    assert!(everywhere.contains("Epoll") && everywhere.matches("\"pid\"").count() >= 3, "{everywhere}");
    assert_eq!(listing_without("bpf", &pids, 0), everywhere);
    // A process gone by the time its iterators run (a PID above pid_max has never
    // been one) has nothing to report, and the others are harvested all the same.
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    let mut harvester = crd::harvest::bpf::BpfHarvester::load(false, &Default::default()).expect("BPF loads");
    let tgids = [crd::types::Tgid(fixture.root()), crd::types::Tgid(max + 1)];
    let (harvest, _) =
        harvester.harvest_bpf(crd::harvest::Scope::Processes(&tgids), &|| false).expect("harvested");
    assert!(harvest.tasks.iter().all(|t| t.tgid.0 == fixture.root()), "{:?}", harvest.tasks);
    assert!(!harvest.fds.is_empty());
}

/// `crd ls --json --source bpf PIDS` with the `KIND_*` bits `clear` cleared and a ring
/// of `ring_bytes`, and its debug log.
fn bpf_listing(pids: &[String], clear: u32, ring_bytes: u32) -> (String, String) {
    let out = Command::new(crd_bin())
        .args(["ls", "--json", "--source", "bpf"])
        .args(pids)
        .env("CRD_TEST_CLEAR_KINDS", clear.to_string())
        .env("CRD_RING_BYTES", ring_bytes.to_string())
        .env("RUST_LOG", "debug")
        .output()
        .expect("crd runs");
    assert!(out.status.success(), "{}", stderr(&out));
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr(&out))
}

#[test]
fn the_fd_walk_from_the_task_iterator_lists_what_the_task_file_program_lists() {
    require_root!();
    use crd_common::KIND_FD_WALK;
    // Every kind the programs read, close-on-exec fds past the first bitmap word, a
    // pipe holding data, threads (their table walked once), a CLONE_FILES child (its
    // table walked again, as task_file does), a forked child with a table of its own.
    let steps = [
        "pipe:3:4",
        "write:4:queued",
        "cloexec:3",
        "socketpair:5:6",
        "sendfd:5:3",
        "socketpair:7:8:d",
        "eventfd:9:3:s",
        "memfd:10:walk:100:sg",
        "epoll:11",
        "epollctl:11:3:1:7",
        "epollctl:11:9:4:0x1234",
        "timerfd:12",
        "signalfd:13:INT,USR2",
        "tcplisten:14",
        "pidfd:15",
        "open:16:r:/dev/null",
        "inotify:17:2:/",
        "pipes:120",
        "cloexec:200",
        "threads:2",
        "clonefiles",
        "fork",
        "pipe:3:4",
        "socketpair:20:21:q",
        "threads:1",
    ];
    let fixture = spawn(&steps, 2);
    let mut pids: Vec<String> = fixture.pids.iter().map(u32::to_string).collect();
    let root = fixture.root();
    let children = std::fs::read_to_string(format!("/proc/{root}/task/{root}/children")).unwrap();
    pids.extend(
        children.split_whitespace().map(str::to_string).filter(|c| !pids.contains(c)).collect::<Vec<_>>(),
    );
    assert_eq!(pids.len(), 3, "{pids:?}");
    // What each path harvests, decoded: every field of every record (references to each
    // description among them: the fd sent over a socket is held by the message too).
    let tgids: Vec<crd::types::Tgid> = pids.iter().map(|p| crd::types::Tgid(p.parse().unwrap())).collect();
    let harvest = |clear: u32, ring_bytes: u32| {
        let mut harvester = crd::harvest::bpf::BpfHarvester::load_clearing_kinds(
            false,
            &Default::default(),
            ring_bytes,
            clear,
        )
        .expect("BPF loads");
        let (mut harvest, stats) =
            harvester.harvest_bpf(crd::harvest::Scope::Processes(&tgids), &|| false).expect("harvested");
        harvest.fds.sort_by_key(|f| (f.tgid, f.fd_table, f.fd));
        (harvest, stats, harvester.fd_program_name())
    };
    let (by_task_file, _, program) = harvest(KIND_FD_WALK, 256 * 1024);
    assert!(program.starts_with("crd_task_file"), "{program}");
    assert!(by_task_file.fds.len() > 250, "{}", by_task_file.fds.len());
    let (by_walk, _, program) = harvest(0, 256 * 1024);
    // The walk wherever the kernel has it (6.2+); the task_file program on older ones
    // (the VM matrix's 5.10 and 6.1), where the harvests are the same trivially.
    let walks = program == "crd_task_walk";
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let (major, minor) = release.split_once('.').map(|(a, b)| (a.to_string(), b.to_string())).unwrap();
    let minor: u32 = minor.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap();
    let modern = (major.parse::<u32>().unwrap(), minor) >= (6, 2);
    assert_eq!(walks, modern, "{release}: {program}");
    assert_eq!((by_walk.tasks, by_walk.fds), (by_task_file.tasks.clone(), by_task_file.fds.clone()));
    // A ring of a page fills many times in one table: each walk cut short resumes at
    // the fd that did not fit, sending none twice and skipping none.
    let (small, stats, _) = harvest(0, 4096);
    assert!(stats.ring_full > 10, "{stats:?}");
    assert_eq!((small.tasks, small.fds), (by_task_file.tasks, by_task_file.fds));
    // And through the command, as `ls` shows it.
    let (listed_by_task_file, log) = bpf_listing(&pids, KIND_FD_WALK, 256 * 1024);
    assert!(log.contains("crd_task_file") && !log.contains("crd_task_walk: the verifier"), "{log}");
    for kind in ["Epoll", "Eventfd", "Memfd", "Timerfd", "Signalfd", "Inotify", "Pidfd", "Unix", "Inet"] {
        assert!(listed_by_task_file.contains(kind), "{kind}: {listed_by_task_file}");
    }
    let (listed, log) = bpf_listing(&pids, 0, 4096);
    assert_eq!(log.contains("crd_task_walk: ring buffer full"), walks, "{log}");
    assert_eq!(listed, listed_by_task_file);
}

#[test]
fn anon_inode_files_are_objects_of_their_own_named_by_their_kind() {
    require_root!();
    // Every anon file sits on the kernel's one anon inode: an eventfd, an epoll, another
    // eventfd and a timerfd are four objects, not one.
    let steps = ["eventfd:3:1:", "epoll:4", "eventfd:5:2:", "timerfd:6", "dup:3:7", "fork"];
    let fixture = spawn(&steps, 2);
    let (parent, child) = (fixture.pids[0], fixture.pids[1]);
    for source in [Source::Bpf, Source::Procfs] {
        let body = checkpoint(parent, true, source);
        let g = Index::new(&body.graph);
        let objects: Vec<_> = [3, 4, 5, 6].iter().map(|&fd| g.inode_ref(parent, fd)).collect();
        let mut distinct = objects.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 4, "{source}: {objects:?}");
        assert_eq!(g.inode_ref(parent, 7), g.inode_ref(parent, 3), "{source}: a dup is the same object");
        assert_eq!(g.inode_ref(child, 3), g.inode_ref(parent, 3), "{source}: so is a fork's");
        assert!(matches!(g.slot(child, 3).file, Encounter::Again(_)));
        let names: Vec<_> =
            [3, 4, 5, 6].iter().map(|&fd| g.inode(parent, fd).path.clone().unwrap_or_default()).collect();
        assert_eq!(
            names,
            [
                "anon_inode:[eventfd]",
                "anon_inode:[eventpoll]",
                "anon_inode:[eventfd]",
                "anon_inode:[timerfd]"
            ],
            "{source}"
        );
        let kinds: Vec<_> = [3, 4, 5, 6].iter().map(|&fd| g.inode(parent, fd).kind()).collect();
        assert_eq!(kinds, [Kind::Eventfd, Kind::Epoll, Kind::Eventfd, Kind::Timerfd], "{source}");
    }
    // `ls` names each by its own kind, `inspect` too.
    let out = crd(&["ls", &parent.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    let row = |fd: u32| {
        text.lines()
            .find(|l| {
                l.split_whitespace()
                    .nth(2)
                    .is_some_and(|f| f.trim_end_matches(['r', 'w', 'u']) == fd.to_string())
            })
            .unwrap_or_else(|| panic!("no row for fd {fd}:\n{text}"))
            .to_string()
    };
    assert!(row(3).contains("eventfd") && row(3).contains("anon_inode:[eventfd] count=1"), "{}", row(3));
    assert!(row(4).contains("anon_inode:[eventpoll]") && !row(4).contains("eventfd"), "{}", row(4));
    assert!(row(5).contains("anon_inode:[eventfd] count=2"), "{}", row(5));
    assert!(row(6).contains("anon_inode:[timerfd]"), "{}", row(6));
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("anon.crd");
    let done = crd(&["checkpoint", &parent.to_string(), "-o", image.to_str().unwrap()]);
    assert!(done.status.success(), "{}", stderr(&done));
    let shown = crd(&["inspect", image.to_str().unwrap()]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("anon_inode:[eventpoll]") && shown.contains("anon_inode:[timerfd]"), "{shown}");
    assert!(shown.contains("eventfd anon_inode:[eventfd] count=2"), "{shown}");
    // Every one of them is a kind crd makes: the image restores, with the same sharing
    // (the dup of fd 3 across the fork) and the same kinds.
    let original = crd::image::read(&image).unwrap();
    crd_tests::assert_round_trip(&original, &image);
    drop(fixture);
}

#[test]
fn a_64_mib_memfd_with_seals_streams_into_the_image_and_restores_byte_for_byte() {
    require_root!();
    const SIZE: usize = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let steps = [format!("memfd:3:big:{SIZE}:sgw"), "seek:3:100".into(), "dup:3:4".into()];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let fixture = spawn(&steps, 1);
    let pid = fixture.root();
    // The whole command, as a user runs it: its peak memory stays below the memfd's
    // size, so the contents were never held in crd's memory in one piece.
    let image = dir.path().join("memfd.crd");
    let mut child = Command::new(crd_bin())
        .args(["checkpoint", &pid.to_string(), "-o", image.to_str().unwrap()])
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child with valid pointers.
    let waited = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(waited, child.id() as i32);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "checkpoint failed");
    let _ = child.try_wait();
    let peak_mib = usage.ru_maxrss as usize / 1024;
    assert!(peak_mib < SIZE >> 20, "crd peaked at {peak_mib} MiB for a {} MiB memfd", SIZE >> 20);
    assert!(fs::metadata(&image).unwrap().len() > SIZE as u64);
    // The target's offset did not move, its contents are untouched.
    assert_eq!(fdinfo(pid, 3, "pos").as_deref(), Some("100"));
    assert_running_untraced(pid);
    let body = crd::image::read(&image).unwrap();
    let g = Index::new(&body.graph);
    let Saved::Memfd(state) = &g.inode(pid, 3).state else { panic!("fd 3 is not a memfd") };
    let seals = (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE) as u32;
    assert_eq!((state.size, state.seals), (SIZE as u64, seals));
    assert_eq!(g.file_ref(pid, 3), g.file_ref(pid, 4));
    let _log = fixture.stop();
    let restored = restore_with(&["restore", image.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e}"));
    let stub = restored.root;
    let link = fs::read_link(format!("/proc/{stub}/fd/3")).unwrap();
    assert_eq!(link.to_str(), Some("/memfd:big (deleted)"));
    assert_eq!(fdinfo(stub, 3, "pos").as_deref(), Some("100"));
    let copy = fd_of(stub, 3);
    let got = nix::fcntl::fcntl(copy.as_fd(), nix::fcntl::FcntlArg::F_GET_SEALS).unwrap() as u32;
    assert_eq!(got, seals, "the same seals");
    let file = fs::File::from(copy);
    assert_eq!(file.metadata().unwrap().len(), SIZE as u64);
    let want = pattern(1 << 20);
    let mut chunk = vec![0u8; 1 << 20];
    for at in (0..SIZE).step_by(1 << 20) {
        file.read_exact_at(&mut chunk, at as u64).unwrap();
        // The fixture wrote the 1 MiB pattern over and over.
        assert!(chunk == want, "bytes differ in the MiB at {at}");
    }
    // The seals hold in the restored memfd: it cannot grow.
    assert!(file.set_len(SIZE as u64 + 1).is_err());
    assert_eq!(fdinfo(stub, 4, "pos").as_deref(), Some("100"), "fd 4 shares fd 3's description");
    assert!(crd::sys::kcmp_same(Pid(stub), Pid(stub), crd::sys::Kcmp::File(Fd(3), Fd(4))).unwrap());
    let again = checkpoint(stub, true, Source::Bpf);
    body.graph.same_shape(&again.graph).unwrap_or_else(|d| panic!("the restored tree differs: {d}"));
}

#[test]
fn memfds_round_trip_with_their_sharing() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let steps = ["memfd:3:first:4096:", "memfd:5:second:10:S", "seek:3:17", "fork", "dup:3:6"];
    let fixture = spawn(&steps, 2);
    let (original, image, _log) = image_of_stopped(fixture, dir.path());
    let restored = assert_round_trip(&original, &image);
    let child = restored.tasks[1].1;
    assert_eq!(
        fs::read_link(format!("/proc/{child}/fd/6")).unwrap().to_str(),
        Some("/memfd:first (deleted)")
    );
    assert_eq!(fdinfo(child, 6, "pos").as_deref(), Some("17"), "the shared offset");
    let sealed = fd_of(restored.root, 5);
    assert_eq!(
        nix::fcntl::fcntl(sealed.as_fd(), nix::fcntl::FcntlArg::F_GET_SEALS).unwrap(),
        libc::F_SEAL_SEAL,
        "sealing sealed, as the original"
    );
}

#[test]
fn a_memfd_larger_than_the_free_disk_fails_cleanly_and_leaves_nothing() {
    require_root!();
    let disk = crd_tests::SmallDisk::new("4m");
    let fixture = spawn(&["memfd:3:huge:16777216:", "seek:3:5"], 1);
    let pid = fixture.root();
    let image = disk.0.path().join("full.img");
    let out = crd(&["checkpoint", &pid.to_string(), "-o", image.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("No space left on device") && err.contains("full.img"), "{err}");
    assert_eq!(fs::read_dir(disk.0.path()).unwrap().count(), 0, "no image, no temporary file");
    assert_running_untraced(pid);
    assert_eq!(fdinfo(pid, 3, "pos").as_deref(), Some("5"), "the target's offset is untouched");
}

#[test]
fn a_pty_pair_is_restored_as_one_pty_whose_ends_talk() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let fixture = spawn(&["pty:3:4"], 1);
    let pid = fixture.root();
    let body = checkpoint(pid, false, Source::Bpf);
    let g = Index::new(&body.graph);
    assert_eq!((g.inode(pid, 3).kind(), g.inode(pid, 4).kind()), (Kind::Terminal, Kind::Terminal));
    let (original, image, _log) = image_of_stopped(fixture, dir.path());
    let restored = assert_round_trip(&original, &image);
    // Through the kernel: what the restored master writes, its slave reads.
    let (master, slave) = (fd_of(restored.root, 3), fd_of(restored.root, 4));
    nix::unistd::write(&master, b"hi\n").unwrap();
    let mut buf = [0u8; 16];
    let n = nix::unistd::read(&slave, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"hi\n");
}

#[test]
fn an_image_with_a_kind_this_crd_does_not_know_is_refused_naming_kind_and_fd() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let fixture = spawn(&["eventfd:5:1:"], 1);
    let pid = fixture.root();
    let (_, image, _log) = image_of_stopped(fixture, dir.path());
    // A newer crd's kind: rename "eventfd" (same length) and seal the body again.
    let mut bytes = fs::read(&image).unwrap();
    let body_at = 24;
    let mut i = body_at;
    while let Some(at) = bytes[i..].windows(7).position(|w| w == b"eventfd") {
        bytes[i + at..i + at + 7].copy_from_slice(b"futurfd");
        i += at + 7;
    }
    let crc = crc32fast::hash(&bytes[body_at..]);
    bytes[20..24].copy_from_slice(&crc.to_le_bytes());
    fs::write(&image, &bytes).unwrap();
    fs::set_permissions(&image, fs::Permissions::from_mode(0o600)).unwrap();
    for command in ["inspect", "restore"] {
        let out = crd(&[command, image.to_str().unwrap()]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{command}: {err}");
        assert_eq!(err.lines().count(), 1, "{command}: {err}");
        assert!(err.contains(&format!("PID {pid} fd 5")) && err.contains("`futurfd`"), "{command}: {err}");
        assert!(err.contains("a kind this crd does not know"), "{command}: {err}");
        assert!(out.stdout.is_empty(), "{command}: no partial output");
    }
}

#[test]
fn a_version_1_image_still_inspects_and_restores() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    // Made by crd 0.1 (format 1): a parent and a child sharing a pipe with 12 bytes
    // queued (fds 3, 5 read, 4 write), a second pipe (6, 7 close-on-exec), /dev/null at
    // 0-2 and 8, and fd 251, the write end of a pipe to a process outside.
    let image = dir.path().join("v1.crd");
    fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/data/v1-pipes.crd"), &image).unwrap();
    fs::set_permissions(&image, fs::Permissions::from_mode(0o600)).unwrap();
    let bytes = fs::read(&image).unwrap();
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1, "a format-1 image");
    let body = crd::image::read(&image).expect("format 1 decodes");
    let (root, child) = (body.graph.tasks[0].tgid.0, body.graph.tasks[1].tgid.0);
    let g = Index::new(&body.graph);
    assert_eq!(g.pipe(root, 3).data, b"queued-in-v1");
    assert!(g.inode(root, 251).held_outside);
    let shown = crd(&["inspect", image.to_str().unwrap()]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    assert!(String::from_utf8_lossy(&shown.stdout).contains("capacity 65536 queued 12"));
    let refused = crd(&["restore", image.to_str().unwrap()]);
    assert!(stderr(&refused).contains("fd 251"), "the external pipe is refused: {}", stderr(&refused));
    let restored = restore_with(&["restore", "--allow-external", image.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("restore: {e}"));
    let again = checkpoint(restored.root, true, Source::Bpf);
    let h = Index::new(&again.graph);
    let stub_child = restored.tasks[1].1;
    assert_eq!(h.pipe(restored.root, 3).data, b"queued-in-v1");
    assert_eq!(h.file_ref(restored.root, 3), h.file_ref(restored.root, 5));
    assert_eq!(h.file_ref(stub_child, 3), h.file_ref(restored.root, 3));
    assert_eq!(h.inode_ref(restored.root, 4), h.inode_ref(restored.root, 3));
    assert!(h.slot(restored.root, 7).close_on_exec);
    assert_eq!(h.fds(stub_child), g.fds(child));
}
