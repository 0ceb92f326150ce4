//! epoll round-trips through an image, compared with the original through the kernel:
//! each item's fd number, events and all 64 bits of data from the restored epoll's
//! fdinfo, and which fd of the process holds the very file it watches (kcmp
//! `KCMP_EPOLL_TFD`) — never through crd's own output. The restored epoll then wakes
//! for real when its targets become ready.
//!
//! In every scenario BPF's own walk of the interest list is compared with what fdinfo
//! and kcmp say: the same items in the same order, each naming (by address) the file the
//! fd kcmp found holds.
use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use crd::{
    Source,
    harvest::{Harvest, HarvestStats, Harvester, Scope, bpf::BpfHarvester, procfs::ProcfsHarvester},
    kinds::{
        Live,
        epoll::{EpollLive, WalkEnd, Walked},
    },
    types::{Fd, Tgid},
};
use crd_tests::kernel::{interest, link_kind, watches};
use crd_tests::programs::{Program, grab, stderr};
use crd_tests::{checkpoint, crd, proc_fds, require_root, restore_with};

/// [`crd_tests::programs::python_json`] of PRELUDE + SCRIPT.
fn python(script: &str) -> (Program, serde_json::Value) {
    crd_tests::programs::python_json(&format!("{PRELUDE}{script}"), &[])
}

/// `add(ep, fd, events, data)`: EPOLL_CTL_ADD with all 64 bits of data (Python's own
/// `epoll.register` sets only the fd half).
const PRELUDE: &str = r#"
import ctypes, json, os, select, socket, sys, time
os.closerange(3, 4096)  # what the test runner leaked is not ours
libc = ctypes.CDLL(None, use_errno=True)
class Ev(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]
def add(ep, fd, events, data):
    if libc.epoll_ctl(ep, 1, fd, ctypes.byref(Ev(events, data))) != 0:
        raise OSError(ctypes.get_errno(), "epoll_ctl")
ET = 1 << 31
def forever():
    while True: time.sleep(3600)
"#;

/// Harvests `pids` (frozen) with a BPF harvester whose ring holds `ring_bytes`.
fn bpf_harvest(pids: &[u32], ring_bytes: u32) -> (Harvest, HarvestStats) {
    let tgids: Vec<Tgid> = pids.iter().copied().map(Tgid).collect();
    let frozen: Vec<_> =
        tgids.iter().map(|&t| crd::freeze::Frozen::freeze(t, false, &|| false).expect("frozen")).collect();
    let mut harvester =
        BpfHarvester::load_with_ring(false, &Default::default(), ring_bytes).expect("BPF loads");
    let harvested = harvester.harvest(Scope::Processes(&tgids), &|| false).expect("BPF harvest");
    drop(frozen);
    harvested
}

/// The epoll at `fd` of `pid` in `harvest`.
fn epoll_of(harvest: &Harvest, pid: u32, fd: u32) -> EpollLive {
    let f = harvest.fds.iter().find(|f| f.tgid == Tgid(pid) && f.fd == Fd(fd)).expect("harvested");
    match &f.file.object.live {
        Live::Epoll(live) => live.clone(),
        other => panic!("PID {pid} fd {fd} is not an epoll: {other:?}"),
    }
}

/// BPF's walk of epoll `ep` of `pid` against fdinfo + kcmp ([`interest`]): the same items
/// in the same (the kernel's) order, every one walked by BPF, each naming the very file
/// that the fd kcmp found holds; a file no fd holds is named by no harvested fd. Also the
/// /proc harvester's items. Returns BPF's items.
fn assert_bpf_walk_agrees(pid: u32, ep: u32) -> EpollLive {
    let (harvest, stats) = bpf_harvest(&[pid], 1 << 20);
    let walked = epoll_of(&harvest, pid, ep);
    assert_eq!(walked.walked, Walked::Bpf, "BPF walked the epoll itself");
    assert!(stats.epoll_walks >= 1 && stats.epoll_fallbacks == 0, "{stats:?}");
    let items = walked.items.clone().expect("items");
    let (by_proc, _) = ProcfsHarvester.harvest(Scope::Processes(&[Tgid(pid)]), &|| false).unwrap();
    let from_fdinfo = epoll_of(&by_proc, pid, ep);
    assert_eq!(from_fdinfo.walked, Walked::Fdinfo);
    let strip = |live: &EpollLive| -> Vec<_> {
        live.items.iter().flatten().map(|i| (i.watch, i.ino, i.dev)).collect()
    };
    assert_eq!(strip(&walked), strip(&from_fdinfo), "BPF and fdinfo list the same items in the same order");
    // The same items as fdinfo, in order, with the fd that kcmp says holds each file.
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{ep}")).unwrap();
    let mut seen: HashMap<u32, u32> = HashMap::new();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("tfd:")).collect();
    assert_eq!(lines.len(), items.len());
    for (line, item) in lines.iter().zip(&items) {
        let tfd: u32 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert_eq!(tfd, item.watch.tfd);
        let toff = seen.entry(tfd).or_default();
        let by_kcmp = proc_fds(pid).into_iter().find(|&fd| watches(pid, fd, ep, tfd, *toff));
        *toff += 1;
        let file = item.file.expect("BPF names the file");
        let by_address: Vec<u32> = harvest
            .fds
            .iter()
            .filter(|f| f.tgid == Tgid(pid) && f.file.id == file.id)
            .map(|f| f.fd.0)
            .collect();
        match by_kcmp {
            Some(fd) => assert!(by_address.contains(&fd), "tfd {tfd}: kcmp says fd {fd}, BPF {by_address:?}"),
            None => assert!(by_address.is_empty(), "tfd {tfd}: held by no fd, yet BPF found {by_address:?}"),
        }
        assert!(file.refs >= 1, "{file:?}");
    }
    walked
}

/// Checkpoints `pid` (BPF, then /proc: both must give the same graph), writes the image,
/// kills the original, restores it, and checks that a checkpoint of the stubs is the
/// same graph. Returns the restored tree.
fn round_trip(program: Program, pid: u32, dir: &std::path::Path) -> crd_tests::RestoredTree {
    let body = checkpoint(pid, true, Source::Bpf);
    let by_procfs = checkpoint(pid, true, Source::Procfs);
    if let Err(difference) = body.graph.same_shape(&by_procfs.graph) {
        panic!("BPF and /proc graphs differ: {difference}");
    }
    let image = dir.join("epoll.crd");
    crd::image::write(&image, &body).expect("image written");
    drop(program);
    let restored =
        restore_with(&["restore", image.to_str().unwrap()]).unwrap_or_else(|e| panic!("restore: {e}"));
    let again = checkpoint(restored.root, true, Source::Bpf);
    if let Err(difference) = body.graph.same_shape(&again.graph) {
        panic!("the restored tree differs: {difference}");
    }
    restored
}

/// Waits up to a second on a copy of an epoll; the data of each ready item.
fn ready(epoll: BorrowedFd<'_>) -> Vec<u64> {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
    // SAFETY: epoll_wait writes at most 8 events into our array.
    let n = unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), 8, 1000) };
    assert!(n >= 0, "epoll_wait: {}", std::io::Error::last_os_error());
    let mut data: Vec<u64> = events[..n as usize].iter().map(|e| e.u64).collect();
    data.sort();
    data
}

const PIPE_EVENTFD_SOCKET: &str = r#"
r, w = os.pipe()
ev = os.eventfd(3, os.EFD_CLOEXEC)
a, b = socket.socketpair()
ep = select.epoll()
add(ep.fileno(), r, select.EPOLLIN | ET, 0xdeadbeef00000000 | r)
add(ep.fileno(), ev, select.EPOLLOUT | select.EPOLLONESHOT, 0xffffffffffffffff)
add(ep.fileno(), a.fileno(), select.EPOLLIN | ET | select.EPOLLEXCLUSIVE, 0x8000000000000001)
print(json.dumps(dict(pid=os.getpid(), ep=ep.fileno(), r=r, w=w, ev=ev, a=a.fileno())), flush=True)
forever()
"#;

#[test]
fn an_epoll_over_a_pipe_an_eventfd_and_a_socket_round_trips_with_all_64_bits_and_wakes() {
    require_root!();
    crd_tests::require_tool!("python3");
    let dir = tempfile::tempdir().unwrap();
    let (program, info) = python(PIPE_EVENTFD_SOCKET);
    let fd = |name: &str| info[name].as_u64().unwrap() as u32;
    let (pid, ep, r) = (fd("pid"), fd("ep"), fd("r"));
    let before = interest(pid, ep);
    assert_eq!(before.len(), 3, "{before:?}");
    assert_bpf_walk_agrees(pid, ep);
    let r_data = 0xdead_beef_0000_0000 | r as u64;
    assert!(
        before.contains(&(r, 0x8000_0019, r_data, Some(r), "pipe".into())),
        "EPOLLIN|ET (+ERR|HUP): {before:?}"
    );
    assert!(before.iter().all(|i| i.3 == Some(i.0)), "each target held at its number: {before:?}");

    // ls names each target, the same from both sources.
    let listing = |source: &str| {
        let out = crd(&["ls", &pid.to_string(), "--json", "--source", source]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let json = listing("bpf");
    assert_eq!(json, listing("procfs"), "BPF and /proc list the same");
    // As on a kernel whose BTF lacks the walk's fields (fdinfo instead), and with the
    // program for kernels without bpf_loop (its bounded walk).
    for clear in [crd_common::KIND_EPOLL, crd_common::KIND_BPF_LOOP] {
        let out = std::process::Command::new(crd_tests::crd_bin())
            .args(["ls", &pid.to_string(), "--json", "--source", "bpf"])
            .env("CRD_TEST_CLEAR_KINDS", clear.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
            json,
            "{clear:#x} cleared"
        );
    }
    let entry =
        json["processes"][0]["fds"].as_array().unwrap().iter().find(|f| f["fd"] == ep).unwrap().clone();
    assert_eq!(entry["kind"], "Epoll");
    let detail = entry["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("tfd={r} events=IN|ERR|HUP|ET data={r_data:#x}")), "{detail}");
    assert!(
        detail.contains(&format!("tfd={} events=OUT|ERR|HUP|ONESHOT data=0xffffffffffffffff", fd("ev"))),
        "{detail}"
    );
    assert!(detail.contains("EXCLUSIVE"), "{detail}");

    let restored = round_trip(program, pid, dir.path());
    let pid = restored.root;
    assert_eq!(interest(pid, ep), before, "the restored epoll watches the same files, as the same items");
    // The restored epoll is live: a write into the restored pipe makes it ready with the
    // pipe's data.
    let epoll = grab(pid, ep);
    let quiet = ready(epoll.as_fd());
    assert!(!quiet.contains(&r_data), "the empty pipe is not ready: {quiet:x?}");
    nix::unistd::write(grab(pid, fd("w")), b"x").unwrap();
    assert!(ready(epoll.as_fd()).contains(&r_data), "the pipe's item is ready after a write");
}

const CLOSED_AFTER_DUP: &str = r#"
pr, pw = os.pipe()
ev = os.eventfd(0, os.EFD_CLOEXEC)
ep = select.epoll()
add(ep.fileno(), pr, select.EPOLLIN, 0x1111111100000000 | pr)
add(ep.fileno(), ev, select.EPOLLIN | ET, 0x2222222200000000 | ev)
d1, d2 = os.dup(pr), os.dup(ev)
os.close(pr); os.close(ev)
null = os.open("/dev/null", os.O_RDONLY)  # takes pr's number: it now names another file
assert null == pr
print(json.dumps(dict(pid=os.getpid(), ep=ep.fileno(), pr=pr, ev=ev, d1=d1, d2=d2, pw=pw)), flush=True)
forever()
"#;

#[test]
fn an_epoll_whose_registered_fds_were_closed_after_a_dup_round_trips() {
    require_root!();
    crd_tests::require_tool!("python3");
    let dir = tempfile::tempdir().unwrap();
    let (program, info) = python(CLOSED_AFTER_DUP);
    let fd = |name: &str| info[name].as_u64().unwrap() as u32;
    let (pid, ep) = (fd("pid"), fd("ep"));
    let before = interest(pid, ep);
    assert_eq!(
        before.iter().map(|i| (i.0, i.3, i.4.as_str())).collect::<Vec<_>>(),
        vec![(fd("pr"), Some(fd("d1")), "pipe"), (fd("ev"), Some(fd("d2")), "anon_inode:[eventfd]")],
        "fdinfo names numbers that no longer hold the files: {before:?}"
    );
    assert_bpf_walk_agrees(pid, ep);
    let restored = round_trip(program, pid, dir.path());
    let pid = restored.root;
    assert_eq!(interest(pid, ep), before);
    assert_eq!(link_kind(pid, fd("pr")), "/dev/null", "the registered number still names another file");
    let epoll = grab(pid, ep);
    nix::unistd::write(grab(pid, fd("pw")), b"x").unwrap();
    assert_eq!(ready(epoll.as_fd()), vec![0x1111_1111_0000_0000 | fd("pr") as u64]);
}

/// fd 100 registered for an eventfd, then made the pipe's read end and registered again,
/// with the same events and data: two items under one number, told apart only by their
/// files (the kernel orders them by file address).
const ONE_NUMBER_TWO_FILES: &str = r#"
ev = os.eventfd(0, os.EFD_CLOEXEC)
r, w = os.pipe()
ep = select.epoll()
n = 100
os.dup2(ev, n)
add(ep.fileno(), n, select.EPOLLIN, 0x5)
os.dup2(r, n)
add(ep.fileno(), n, select.EPOLLIN, 0x5)
os.close(n)
print(json.dumps(dict(pid=os.getpid(), ep=ep.fileno(), n=n, ev=ev, r=r, w=w)), flush=True)
forever()
"#;

#[test]
fn two_items_under_one_number_for_two_files_round_trip_in_the_same_order() {
    require_root!();
    crd_tests::require_tool!("python3");
    // A restore allocates new files, so the kernel's order of the two items is a coin
    // toss each time: the image must not follow it. Four round trips.
    for _ in 0..4 {
        let dir = tempfile::tempdir().unwrap();
        let (program, info) = python(ONE_NUMBER_TWO_FILES);
        let fd = |name: &str| info[name].as_u64().unwrap() as u32;
        let (pid, ep) = (fd("pid"), fd("ep"));
        let before = interest(pid, ep);
        let mut expected =
            vec![(fd("n"), Some(fd("r")), "pipe"), (fd("n"), Some(fd("ev")), "anon_inode:[eventfd]")];
        expected.sort();
        assert_eq!(before.iter().map(|i| (i.0, i.3, i.4.as_str())).collect::<Vec<_>>(), expected);
        let restored = round_trip(program, pid, dir.path());
        assert_eq!(interest(restored.root, ep), before);
    }
}

const EPOLL_OF_EPOLLS: &str = r#"
r, w = os.pipe()
ev = os.eventfd(0, os.EFD_CLOEXEC)
inner1, inner2, outer = select.epoll(), select.epoll(), select.epoll()
add(inner1.fileno(), r, select.EPOLLIN, 0xaaaa000000000000 | r)
add(inner2.fileno(), ev, select.EPOLLIN, 7)
add(outer.fileno(), inner1.fileno(), select.EPOLLIN, 0xbbbb000000000001)
add(outer.fileno(), inner2.fileno(), select.EPOLLIN | ET, 0xbbbb000000000002)
print(json.dumps(dict(pid=os.getpid(), inner1=inner1.fileno(), inner2=inner2.fileno(), outer=outer.fileno(), w=w)), flush=True)
forever()
"#;

#[test]
fn an_epoll_of_epolls_round_trips_and_the_outer_wakes_through_the_inner() {
    require_root!();
    crd_tests::require_tool!("python3");
    let dir = tempfile::tempdir().unwrap();
    let (program, info) = python(EPOLL_OF_EPOLLS);
    let fd = |name: &str| info[name].as_u64().unwrap() as u32;
    let pid = fd("pid");
    let lists = |pid: u32| ["inner1", "inner2", "outer"].map(|n| interest(pid, fd(n)));
    let before = lists(pid);
    assert!(before[2].iter().all(|i| i.4 == "anon_inode:[eventpoll]"), "{before:?}");
    for name in ["inner1", "inner2", "outer"] {
        assert_bpf_walk_agrees(pid, fd(name));
    }
    let restored = round_trip(program, pid, dir.path());
    let pid = restored.root;
    assert_eq!(lists(pid), before);
    let outer = grab(pid, fd("outer"));
    assert_eq!(ready(outer.as_fd()), Vec::<u64>::new(), "nothing is ready yet");
    nix::unistd::write(grab(pid, fd("w")), b"x").unwrap();
    assert_eq!(ready(outer.as_fd()), vec![0xbbbb_0000_0000_0001], "the outer wakes through the inner");
}

#[test]
fn an_epoll_watching_a_file_no_checkpointed_fd_holds_fails_the_checkpoint_by_name() {
    require_root!();
    crd_tests::require_tool!("python3");
    let dir = tempfile::tempdir().unwrap();
    // The child keeps the pipe's read end; the parent watched it and closed its own.
    let (program, info) = python(
        r#"
r, w = os.pipe()
ep = select.epoll()
add(ep.fileno(), r, select.EPOLLIN, 1)
if os.fork() == 0:
    forever()
os.close(r)
print(json.dumps(dict(pid=os.getpid(), ep=ep.fileno(), r=r)), flush=True)
forever()
"#,
    );
    let fd = |name: &str| info[name].as_u64().unwrap() as u32;
    let pid = fd("pid");
    // BPF knows the item: the file it watches, which no fd of the process holds, kept
    // open by the child's fd (one reference at least).
    let walked = assert_bpf_walk_agrees(pid, fd("ep"));
    let watched = walked.items.unwrap()[0].file.unwrap();
    assert!(watched.refs >= 1, "{watched:?}");
    let image = dir.path().join("refused.crd");
    let out = crd(&["checkpoint", &pid.to_string(), "-o", image.to_str().unwrap()]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("fd {} (epoll)", fd("ep"))) && err.contains(&format!("tfd {}", fd("r"))),
        "{err}"
    );
    // The checkpoint harvested with BPF (the default where it runs), whose walk found
    // the file and counts what keeps it open.
    assert!(err.contains("BPF found it registered, kept open by 1 reference(s) outside them"), "{err}");
    assert!(!image.exists(), "no image is written");
    crd_tests::assert_running_untraced(pid);
    drop(program);
}

/// An epoll whose targets cannot all be made (here a netlink socket) is refused as a
/// whole, before anything runs: the restore names the target, and never makes an epoll
/// with part of its items.
#[test]
fn an_epoll_watching_a_file_crd_cannot_recreate_is_refused_as_a_whole_naming_it() {
    require_root!();
    crd_tests::require_tool!("python3");
    let dir = tempfile::tempdir().unwrap();
    let (program, info) = python(
        r#"
nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
r, w = os.pipe()
ep = select.epoll()
add(ep.fileno(), nl.fileno(), select.EPOLLIN, 1)
add(ep.fileno(), r, select.EPOLLIN, 2)
print(json.dumps(dict(pid=os.getpid(), ep=ep.fileno(), nl=nl.fileno())), flush=True)
forever()
"#,
    );
    let fd = |name: &str| info[name].as_u64().unwrap() as u32;
    let pid = fd("pid");
    let image = dir.path().join("netlink.crd");
    let out = crd(&["checkpoint", &pid.to_string(), "-o", image.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    drop(program);
    let out = crd(&["restore", image.to_str().unwrap()]);
    let err = stderr(&out);
    assert!(!out.status.success(), "restored an epoll without its netlink target");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&format!("PID {pid} fd {}", fd("nl"))) && err.contains("netlink"), "{err}");
    assert!(out.stdout.is_empty(), "no partial output");
}

/// `n` items on one epoll: eventfds, each registered with its own number as data.
fn many_items(epolls: usize, n: usize) -> (Program, serde_json::Value) {
    python(&format!(
        r#"
eps = []
for _ in range({epolls}):
    ep = select.epoll()
    for i in range({n}):
        ev = os.eventfd(0, os.EFD_CLOEXEC)
        add(ep.fileno(), ev, select.EPOLLIN, 0x5eed000000000000 | ev)
    eps.append(ep)  # kept: a collected epoll object closes its fd
print(json.dumps(dict(pid=os.getpid(), eps=[ep.fileno() for ep in eps])), flush=True)
forever()
"#
    ))
}

#[test]
fn a_walk_cut_short_by_a_full_ring_starts_over_and_loses_nothing() {
    require_root!();
    crd_tests::require_tool!("python3");
    let bpf_loop = crd::harvest::offsets::KernelBtf::from_sys_fs().is_ok_and(|btf| btf.has_bpf_loop());
    // Without bpf_loop (5.10-5.16) only a few items are walked: the rest is fdinfo's.
    let per_epoll = if bpf_loop { 40 } else { crd_common::EPOLL_BOUNDED_ITEMS as usize };
    let (program, info) = many_items(6, per_epoll);
    let pid = info["pid"].as_u64().unwrap() as u32;
    let eps: Vec<u32> = info["eps"].as_array().unwrap().iter().map(|e| e.as_u64().unwrap() as u32).collect();
    // A 4 KiB ring holds one walk of 40 items but not two: walks are cut short by a full
    // ring, and start over once it is drained.
    let (tiny, tiny_stats) = bpf_harvest(&[pid], 4096);
    let (roomy, roomy_stats) = bpf_harvest(&[pid], 1 << 20);
    assert!(tiny_stats.ring_full >= 3, "{tiny_stats:?}");
    assert_eq!(roomy_stats.ring_full, 0);
    for &ep in &eps {
        let (a, b) = (epoll_of(&tiny, pid, ep), epoll_of(&roomy, pid, ep));
        assert_eq!(a.walked, Walked::Bpf);
        assert_eq!(a, b, "epoll fd {ep}: the same items through either ring");
        assert_eq!(a.items.as_ref().unwrap().len(), per_epoll);
    }
    assert_eq!((tiny_stats.epoll_walks, tiny_stats.epoll_fallbacks), (eps.len() as u64, 0));
    assert_bpf_walk_agrees(pid, eps[0]);
    drop(program);
}

#[test]
fn an_epoll_with_more_items_than_the_walk_takes_is_read_from_fdinfo_and_said_so() {
    require_root!();
    crd_tests::require_tool!("python3");
    // A 4 KiB ring leaves room for a walk of fewer than 100 items (and the bounded walk
    // of 5.10-5.16 takes fewer still).
    let (program, info) = many_items(1, 100);
    let pid = info["pid"].as_u64().unwrap() as u32;
    let ep = info["eps"][0].as_u64().unwrap() as u32;
    let (harvest, stats) = bpf_harvest(&[pid], 4096);
    let live = epoll_of(&harvest, pid, ep);
    assert_eq!(live.walked, Walked::FellBack(WalkEnd::Truncated));
    assert_eq!(live.items, None, "left to fdinfo, read after the harvest");
    assert_eq!((stats.epoll_walks, stats.epoll_fallbacks), (0, 1));
    // The checkpoint reads fdinfo for it: the same graph as /proc's.
    let body = checkpoint(pid, false, Source::Bpf);
    let by_procfs = checkpoint(pid, false, Source::Procfs);
    if let Err(difference) = body.graph.same_shape(&by_procfs.graph) {
        panic!("BPF and /proc graphs differ: {difference}");
    }
    drop(program);
}
