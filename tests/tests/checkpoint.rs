//! `crd checkpoint` on real processes, checked against the truth: what the fixture
//! built, and what /proc says.
use std::{fs, os::fd::AsFd};

use crd::{
    Source,
    fixture::pattern,
    graph::Encounter,
    kinds::Kind as InodeKind,
    sys::{self, pidfd_getfd, pidfd_open},
    types::{Access, Fd, Pid},
};
use crd_tests::{Index, assert_running_untraced, checkpoint, proc_fds, require_root, spawn};

const O_APPEND: u32 = libc::O_APPEND as u32;
const O_NONBLOCK: u32 = libc::O_NONBLOCK as u32;

#[test]
fn fd_numbers_kinds_flags_offsets_and_cloexec_match_the_process() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    let log = dir.path().join("log");
    let fifo = dir.path().join("fifo");
    let steps = [
        format!("open:5:rwc:{}", file.display()),
        "write:5:0123456789".into(),
        "seek:5:7".into(),
        "open:6:w:/dev/null".into(),
        format!("open:7:r:{}", dir.path().display()),
        "pipe:8:9".into(),
        "nonblock:9".into(),
        "cloexec:8".into(),
        format!("open:10:wac:{}", log.display()),
        format!("mkfifo:{}", fifo.display()),
        format!("open:11:rw:{}", fifo.display()),
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let fixture = spawn(&steps, 1);
    let pid = fixture.root();
    let body = checkpoint(pid, false, Source::Bpf);
    let g = Index::new(&body.graph);

    assert_eq!(g.fds(pid), proc_fds(pid), "the same fd numbers as /proc");
    assert_eq!(g.fds(pid), [0, 1, 2, 5, 6, 7, 8, 9, 10, 11]);
    let kind = |fd| g.inode(pid, fd).kind();
    assert_eq!(
        [kind(5), kind(6), kind(7), kind(8), kind(9), kind(11)],
        [
            InodeKind::Regular,
            InodeKind::CharDevice,
            InodeKind::Directory,
            InodeKind::Pipe,
            InodeKind::Pipe,
            InodeKind::Fifo
        ]
    );
    assert_eq!(g.file(pid, 5).pos, 7, "offset of the regular file");
    assert_eq!(g.file(pid, 5).access, Access { read: true, write: true });
    assert_eq!(g.file(pid, 6).access, Access { read: false, write: true });
    assert_eq!(g.inode(pid, 5).path.as_deref(), Some(file.to_str().unwrap()));
    assert_eq!(g.inode(pid, 6).path.as_deref(), Some("/dev/null"));
    assert_eq!(g.inode(pid, 6).rdev, crd::types::DeviceId { major: 1, minor: 3 });
    assert_eq!(g.inode(pid, 7).path.as_deref(), Some(dir.path().to_str().unwrap()));
    assert_eq!(g.inode(pid, 11).path.as_deref(), Some(fifo.to_str().unwrap()));
    assert!(g.file(pid, 9).flags & O_NONBLOCK != 0, "O_NONBLOCK on the write end");
    assert!(g.file(pid, 8).flags & O_NONBLOCK == 0);
    assert!(g.file(pid, 10).flags & O_APPEND != 0, "O_APPEND on the log");
    let cloexec: Vec<u32> = g.table(pid).fds.iter().filter(|s| s.close_on_exec).map(|s| s.fd.0).collect();
    assert_eq!(cloexec, [8], "only fd 8 is close-on-exec");
    assert_eq!(g.inode(pid, 5).ino, fs::metadata(&file).unwrap().ino_of());
    assert_running_untraced(pid);
}

trait Ino {
    fn ino_of(&self) -> u64;
}
impl Ino for fs::Metadata {
    fn ino_of(&self) -> u64 {
        std::os::unix::fs::MetadataExt::ino(self)
    }
}

#[test]
fn dups_share_a_description_and_pipe_ends_share_an_inode_across_fork() {
    require_root!();
    let fixture = spawn(&["pipe:3:4", "dup:3:5", "open:6:r:/dev/null", "fork", "close:4"], 2);
    let (parent, child) = (fixture.pids[0], fixture.pids[1]);
    assert_eq!(parent, fixture.root());
    let body = checkpoint(parent, true, Source::Bpf);
    let g = Index::new(&body.graph);
    // dup: one description, saved once.
    assert_eq!(g.file_ref(parent, 3), g.file_ref(parent, 5));
    assert!(g.slot(parent, 3).file.first().is_some(), "first encounter carries the object");
    assert_eq!(g.slot(parent, 5).file, Encounter::Again(g.file_ref(parent, 3)));
    // Both ends: two descriptions, one pipe inode.
    assert_ne!(g.file_ref(parent, 3), g.file_ref(parent, 4));
    assert_eq!(g.inode_ref(parent, 3), g.inode_ref(parent, 4));
    // Across fork: the child's fds are the parent's descriptions, referenced.
    for fd in [3, 5, 6] {
        assert_eq!(g.file_ref(child, fd), g.file_ref(parent, fd), "fd {fd}");
        assert!(matches!(g.slot(child, fd).file, Encounter::Again(_)));
    }
    assert_eq!(g.fds(child), [0, 1, 2, 3, 5, 6], "the child closed fd 4");
    // Separate processes, separate tables.
    assert_ne!(body.graph.tasks[0].fd_table.objref(), body.graph.tasks[1].fd_table.objref());
    // Nothing in this tree is held from outside (the fixture's stdio is its own).
    let pipe = g.inode(parent, 3);
    assert!(!pipe.held_outside, "both ends are inside the tree");
    assert!(!g.file(parent, 3).held_outside);
    assert_eq!(body.graph.held_outside(), Vec::<String>::new());
}

#[test]
fn a_pipe_shared_by_three_processes_is_one_object() {
    require_root!();
    let fixture = spawn(&["pipe:3:4", "fork", "fork"], 3);
    let body = checkpoint(fixture.root(), true, Source::Bpf);
    let g = Index::new(&body.graph);
    let pids: Vec<u32> = body.graph.tasks.iter().map(|t| t.tgid.0).collect();
    assert_eq!(pids, fixture.pids, "tree order: parent, child, grandchild");
    let parents: Vec<u32> = body.graph.tasks.iter().map(|t| t.parent.0).collect();
    assert_eq!(parents[1..], [fixture.pids[0], fixture.pids[1]]);
    let inode = g.inode_ref(pids[0], 3);
    for pid in &pids {
        assert_eq!(g.inode_ref(*pid, 3), inode);
        assert_eq!(g.inode_ref(*pid, 4), inode);
    }
    let pipes: std::collections::BTreeSet<_> = pids
        .iter()
        .flat_map(|pid| g.table(*pid).fds.iter().filter(|s| s.fd.0 >= 3).map(|s| g.inode_ref(*pid, s.fd.0)))
        .collect();
    assert_eq!(pipes.len(), 1, "one pipe object behind fds 3 and 4 of all three");
}

#[test]
fn threads_share_one_fd_table_saved_once() {
    require_root!();
    let fixture = spawn(&["pipe:3:4", "threads:3"], 1);
    let pid = fixture.root();
    let body = checkpoint(pid, false, Source::Bpf);
    let tasks = &body.graph.tasks;
    assert_eq!(tasks.len(), 4, "leader and three threads");
    assert!(tasks.iter().all(|t| t.tgid.0 == pid));
    assert_eq!(tasks[0].pid.0, pid, "the leader comes first");
    assert!(tasks[0].fd_table.first().is_some());
    for t in &tasks[1..] {
        assert_eq!(t.fd_table, Encounter::Again(tasks[0].fd_table.objref()), "thread {}", t.pid);
    }
    let threads = crd::freeze::list_threads(crd::types::Tgid(pid));
    assert_eq!(tasks.iter().map(|t| t.pid).collect::<Vec<Pid>>(), threads);
    for t in threads {
        assert_eq!(crd_tests::status_field(t.0, "TracerPid:"), "0", "thread {t} resumed");
    }
}

#[test]
fn tree_flag_decides_whether_descendants_are_included() {
    require_root!();
    let fixture = spawn(&["fork", "fork"], 3);
    let alone = checkpoint(fixture.root(), false, Source::Bpf);
    assert_eq!(alone.graph.tasks.len(), 1);
    let tree = checkpoint(fixture.root(), true, Source::Bpf);
    let mut pids: Vec<u32> = tree.graph.tasks.iter().map(|t| t.pid.0).collect();
    pids.sort();
    let mut expected = fixture.pids.clone();
    expected.sort();
    assert_eq!(pids, expected);
    for pid in &fixture.pids {
        assert_running_untraced(*pid);
    }
}

/// Reads exactly `n` bytes from the target's own read end, through pidfd_getfd: what the
/// target itself would read next.
fn read_what_the_target_would(pid: u32, fd: u32, n: usize) -> Vec<u8> {
    let pidfd = pidfd_open(Pid(pid)).unwrap();
    let end = pidfd_getfd(pidfd.as_fd(), Fd(fd)).unwrap();
    assert_eq!(sys::pipe_queued(end.as_fd()).unwrap(), n, "bytes still queued for the target");
    let mut data = vec![0; n];
    let mut got = 0;
    while got < n {
        got += nix::unistd::read(end.as_fd(), &mut data[got..]).unwrap();
    }
    data
}

#[test]
fn queued_pipe_bytes_are_saved_without_being_consumed() {
    require_root!();
    let big = 300_000;
    let steps = ["pipe:3:4", "pipesz:4:1048576", &format!("fill:4:{big}"), "pipe:5:6", "write:6:small"];
    let fixture = spawn(&steps, 1);
    let pid = fixture.root();
    let body = checkpoint(pid, false, Source::Bpf);
    let g = Index::new(&body.graph);
    let pipe = g.pipe(pid, 3);
    assert_eq!(pipe.capacity, 1 << 20);
    assert_eq!(pipe.data.len(), big);
    assert!(pipe.data == pattern(big), "bytes in order");
    let small = g.pipe(pid, 5);
    assert_eq!((small.capacity, small.data.as_slice()), (65536, &b"small"[..]));
    // A second checkpoint sees the same bytes, and the target still reads them all.
    let again = checkpoint(pid, false, Source::Bpf);
    assert!(again.graph == body.graph, "a second checkpoint gives the same graph");
    assert!(read_what_the_target_would(pid, 3, big) == pattern(big));
    assert_eq!(read_what_the_target_would(pid, 5, 5), b"small");
    assert_running_untraced(pid);
}

#[test]
fn fifo_data_is_saved_and_offsets_stay_put() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("f");
    let file = dir.path().join("g");
    let steps = [
        format!("mkfifo:{}", fifo.display()),
        format!("open:3:rw:{}", fifo.display()),
        "write:3:through the fifo".into(),
        format!("open:4:rwc:{}", file.display()),
        "write:4:abcdef".into(),
        "seek:4:2".into(),
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let fixture = spawn(&steps, 1);
    let pid = fixture.root();
    let body = checkpoint(pid, false, Source::Bpf);
    let g = Index::new(&body.graph);
    assert_eq!(g.pipe(pid, 3).data, b"through the fifo");
    let pos = fs::read_to_string(format!("/proc/{pid}/fdinfo/4")).unwrap();
    assert!(pos.starts_with("pos:\t2\n"), "the target's offset did not move: {pos}");
    assert_eq!(read_what_the_target_would(pid, 3, 16), b"through the fifo");
}

#[test]
fn a_pipe_whose_reader_is_outside_is_marked_external() {
    require_root!();
    // Parent keeps only the read end, child only the write end; checkpointing the
    // child alone leaves the reader outside.
    let fixture = spawn(&["pipe:3:4", "fork", "close:3"], 2);
    let (parent, child) = (fixture.pids[0], fixture.pids[1]);
    let alone = checkpoint(child, false, Source::Bpf);
    let g = Index::new(&alone.graph);
    assert!(g.inode(child, 4).held_outside);
    assert!(g.file(child, 4).held_outside, "the parent holds the same write description");
    assert!(!alone.graph.held_outside().is_empty());
    let both = checkpoint(parent, true, Source::Bpf);
    let g = Index::new(&both.graph);
    assert!(!g.inode(child, 4).held_outside);
    assert!(!g.file(child, 4).held_outside);
}

#[test]
fn bpf_and_procfs_harvests_give_the_same_graph() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let steps = [
        "pipe:3:4".to_string(),
        "write:4:queued".into(),
        "dup:3:9".into(),
        format!("open:5:rwc:{}", dir.path().join("x").display()),
        "write:5:hello".into(),
        "open:6:r:/dev/zero".into(),
        "cloexec:6".into(),
        "threads:2".into(),
        "fork".into(),
        "close:4".into(),
        "pipe:7:8".into(),
        // An empty pipe resized: its capacity comes from the BPF record, not a syscall.
        "pipesz:8:262144".into(),
        "fork".into(),
        "seek:5:1".into(),
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let fixture = spawn(&steps, 3);
    for tree in [false, true] {
        let bpf = checkpoint(fixture.root(), tree, Source::Bpf);
        let procfs = checkpoint(fixture.root(), tree, Source::Procfs);
        assert!(bpf.graph == procfs.graph, "BPF and /proc graphs differ (tree = {tree})");
        assert_eq!(bpf.graph.tasks.len(), if tree { 5 } else { 3 });
    }
}

#[test]
fn a_tiny_ring_buffer_pauses_the_iterator_and_loses_nothing() {
    require_root!();
    use crd::harvest::{Harvester, Scope, bpf::BpfHarvester};
    // 903 fds: within the smallest common fd limit (1024), ~30 ring fills.
    let fixture = spawn(&["pipes:450"], 1);
    let pid = crd::types::Tgid(fixture.root());
    let frozen = crd::freeze::Frozen::freeze(pid, false, &|| false).unwrap();
    let mut tiny = BpfHarvester::load_with_ring(false, &Default::default(), 4096).unwrap();
    let (small_ring, stats) = tiny.harvest(Scope::Processes(&[pid]), &|| false).unwrap();
    let mut roomy = BpfHarvester::load_with_ring(false, &Default::default(), 1 << 22).unwrap();
    let (big_ring, big_stats) = roomy.harvest(Scope::Processes(&[pid]), &|| false).unwrap();
    drop(frozen);
    assert!(stats.ring_full > 10, "the ring filled and the iterator paused: {stats:?}");
    assert_eq!(big_stats.ring_full, 0);
    assert_eq!(small_ring.fds.len(), 3 + 900);
    // Every record, identical; fds 0-2 are shared with the test runner, whose reference
    // counts other tests change concurrently, so they are compared by identity only.
    let key = |f: &crd::harvest::FdInfo| (f.fd, f.file.id, f.file.object.id);
    assert!(small_ring.fds.iter().map(key).eq(big_ring.fds.iter().map(key)));
    // The kernel's reference counts are compared apart: a concurrent `pidfd_getfd`
    // (another test's `crd ls --all` counting queued bytes) briefly adds one.
    let without_refs = |fds: &[crd::harvest::FdInfo]| -> Vec<crd::harvest::FdInfo> {
        fds.iter()
            .cloned()
            .map(|mut f| {
                f.file.refs = 0;
                f
            })
            .collect()
    };
    let differing = small_ring.fds[3..].iter().zip(&big_ring.fds[3..]).filter(|(a, b)| a != b).count();
    assert!(
        without_refs(&small_ring.fds[3..]) == without_refs(&big_ring.fds[3..]),
        "records from a tiny ring differ ({differing} of them)"
    );
    assert_eq!(small_ring.tasks, big_ring.tasks);
    assert_running_untraced(pid.0);
}

#[test]
fn clone_files_siblings_share_one_fd_table_seen_once() {
    require_root!();
    let fixture = spawn(&["pipe:3:4", "clonefiles", "pipe:5:6"], 1);
    let root = fixture.root();
    let sibling: u32 = fs::read_to_string(format!("/proc/{root}/task/{root}/children"))
        .unwrap()
        .split_whitespace()
        .next()
        .expect("the CLONE_FILES child")
        .parse()
        .unwrap();
    for source in [Source::Bpf, Source::Procfs] {
        let body = checkpoint(root, true, source);
        let tasks = &body.graph.tasks;
        assert_eq!(tasks.iter().map(|t| t.tgid.0).collect::<Vec<_>>(), [root, sibling], "{source}");
        assert!(tasks[0].fd_table.first().is_some());
        assert_eq!(tasks[1].fd_table, Encounter::Again(tasks[0].fd_table.objref()), "{source}: one table");
        let g = Index::new(&body.graph);
        assert_eq!(g.fds(root), [0, 1, 2, 3, 4, 5, 6], "{source}: each slot once");
        assert_eq!(body.graph.slots().count(), 7);
    }
    assert!(checkpoint(root, true, Source::Bpf).graph == checkpoint(root, true, Source::Procfs).graph);
}

#[test]
fn a_stopped_target_is_left_stopped_and_untraced() {
    require_root!();
    let fixture = spawn(&["pipe:3:4"], 1);
    let pid = fixture.root();
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    while !crd_tests::status_field(pid, "State:").starts_with('T') {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let body = checkpoint(pid, false, Source::Bpf);
    assert_eq!(body.graph.tasks.len(), 1);
    // A detached tracee re-enters its group stop on its own, a moment after the detach.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while !crd_tests::status_field(pid, "State:").starts_with("T (stopped)") {
        assert!(
            std::time::Instant::now() < deadline,
            "not stopped again: {}",
            crd_tests::status_field(pid, "State:")
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert_eq!(crd_tests::status_field(pid, "TracerPid:"), "0");
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while crd_tests::status_field(pid, "State:").starts_with('T') {
        assert!(std::time::Instant::now() < deadline, "SIGCONT did not resume it");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert_running_untraced(pid);
}
