//! Property: for any process tree wired with pipes, dups, files, eventfds, memfds, ptys
//! (in sessions of their own, as their terminals), unix socketpairs (split across
//! processes, with data and files queued in them), epolls watching any of them (epolls
//! among them), timerfds and signalfds, the BPF and /proc harvests give the same graph,
//! and restoring its image and checkpointing the stubs gives the same graph again.
//! proptest shrinks a failure to a small tree.
use std::collections::{BTreeMap, BTreeSet};

use crd::Source;
use crd_tests::{assert_round_trip, checkpoint, image_of_stopped, is_root, spawn};
use proptest::prelude::*;

/// Which file an fd holds: each file has a number of its own (among files of its kind),
/// so that two fds hold the same file exactly when their kinds are equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// An end of pipe number N.
    PipeRead(usize),
    PipeWrite(usize),
    File(usize),
    Eventfd(usize),
    Memfd(usize),
    /// End E (0 or 1) of unix socketpair number N.
    Sock(usize, u8),
    /// Epoll number N: it may watch epolls with lower numbers only, so none watches
    /// itself through others (the kernel refuses a loop).
    Epoll(usize),
    Timer(usize),
    Signal(usize),
    /// The master, or a slave, of pty number N.
    PtyMaster(usize),
    PtySlave(usize),
}

impl Kind {
    /// The other end of a pipe or socketpair (None: not a pair).
    fn peer(self) -> Option<Kind> {
        match self {
            Kind::Sock(n, end) => Some(Kind::Sock(n, 1 - end)),
            _ => None,
        }
    }
}

/// What a socketpair's receive queues hold, kept far below what would make a write
/// block (the default send buffer, ~208 KiB, counts every queued message's overhead).
#[derive(Default)]
struct Queues {
    bytes: [usize; 2],
    messages: [usize; 2],
    /// Directions shut down (index: the receiving end): sending there fails.
    shut: [bool; 2],
}

const SOCKET_TYPES: [&str; 3] = ["s", "d", "q"];

const EPOLLIN: u32 = 0x1;
const EPOLLPRI: u32 = 0x2;
const EPOLLOUT: u32 = 0x4;
const EPOLLRDHUP: u32 = 0x2000;
const EPOLLEXCLUSIVE: u32 = 1 << 28;
const EPOLLONESHOT: u32 = 1 << 30;
const EPOLLET: u32 = 1 << 31;

/// Events an item may be registered with. EPOLLEXCLUSIVE only with IN, OUT, ERR, HUP,
/// WAKEUP and ET, never ONESHOT, and never on an epoll (the kernel refuses the rest).
const EVENTS: [u32; 10] = [
    0,
    EPOLLIN,
    EPOLLOUT,
    EPOLLIN | EPOLLOUT,
    EPOLLIN | EPOLLET,
    EPOLLIN | EPOLLRDHUP | EPOLLPRI,
    EPOLLIN | EPOLLONESHOT,
    EPOLLOUT | EPOLLET | EPOLLONESHOT,
    EPOLLIN | EPOLLEXCLUSIVE,
    EPOLLIN | EPOLLOUT | EPOLLET | EPOLLEXCLUSIVE,
];

/// Whether closing `fd` keeps every file that must have a holder held. A socket must
/// (crd takes a socket whose peer has gone for one connected outside the set), and so
/// must a file an epoll watches once it has been sent in flight: closing its last fd
/// would leave an epoll watching a file no checkpointed fd holds, which crd refuses (a
/// file nothing holds leaves every interest list by itself). So must the master of a
/// pty some session has as its terminal (its last close would hang the session up,
/// SIGHUP and all): `taken` are those ptys.
fn closable(
    open: &BTreeMap<u32, Kind>,
    above: &BTreeSet<Kind>,
    watched: &BTreeSet<Kind>,
    in_flight: &BTreeSet<Kind>,
    taken: &BTreeSet<usize>,
    fd: u32,
) -> bool {
    let k = open[&fd];
    let needs_holder = matches!(k, Kind::Sock(..))
        || (watched.contains(&k) && in_flight.contains(&k))
        || matches!(k, Kind::PtyMaster(n) if taken.contains(&n));
    !needs_holder || above.contains(&k) || open.iter().any(|(other, o)| *other != fd && *o == k)
}

/// Decodes random bytes into a valid fixture script: every step applies to fds that
/// are open and of the right kind, so any byte string is a tree worth restoring.
/// Returns the steps and the number of processes.
///
/// Socketpairs of every type are split across processes (a fork, then the child closes
/// an end the parent keeps), queue data both ways, and carry pipes, files, eventfds and
/// memfds in flight (sent with SCM_RIGHTS, then often closed, so the message is their
/// only holder). Data goes only where something still reads it: a pipe whose read end,
/// or a socket whose peer, is open here or in an ancestor (stopped at its fork with
/// its fds), so no write blocks, fails or raises SIGPIPE.
fn script(genome: &[u8], dir: &std::path::Path) -> (Vec<String>, usize) {
    let mut bytes = genome.iter().copied();
    let mut next = move || bytes.next().unwrap_or(0);
    let mut open: BTreeMap<u32, Kind> = BTreeMap::new();
    let mut steps = Vec::new();
    let (mut processes, mut threads, mut files) = (1usize, 0, 0);
    // A fresh number for each file that is not a pipe or a socketpair.
    let mut made = 0usize;
    let mut fresh = move || {
        made += 1;
        made
    };
    // Epolls made; each item as (epoll, file, fd registered under): the kernel refuses
    // a second item for one file under one fd. What any epoll watches, and what was
    // ever sent in flight.
    let mut epolls = 0usize;
    // Ptys made, those some session took as its terminal, and where the current
    // process stands: leading its session, leading its group, with a terminal.
    let mut ptys = 0;
    let mut taken: BTreeSet<usize> = BTreeSet::new();
    let (mut leader, mut group_leader, mut has_ctty) = (false, false, false);
    let mut items: BTreeSet<(usize, Kind, u32)> = BTreeSet::new();
    let mut watched: BTreeSet<Kind> = BTreeSet::new();
    let mut in_flight: BTreeSet<Kind> = BTreeSet::new();
    // Bytes queued per pipe (kept well under 64 KiB so no write blocks), the queues of
    // each socketpair, and what an ancestor still holds.
    let mut queued: Vec<usize> = Vec::new();
    let mut pairs: Vec<Queues> = Vec::new();
    let mut above: BTreeSet<Kind> = BTreeSet::new();
    let free = |open: &BTreeMap<u32, Kind>, pick: u8| -> u32 {
        let mut fd = 3 + (pick as u32 % 24);
        while open.contains_key(&fd) {
            fd = 3 + (fd - 2) % 24;
        }
        fd
    };
    let pick = |open: &BTreeMap<u32, Kind>, b: u8, want: &dyn Fn(Kind) -> bool| -> Option<u32> {
        let candidates: Vec<u32> = open.iter().filter(|(_, k)| want(**k)).map(|(fd, _)| *fd).collect();
        (!candidates.is_empty()).then(|| candidates[b as usize % candidates.len()])
    };
    let any = |_: Kind| true;
    let is_socket = |k: Kind| matches!(k, Kind::Sock(..));
    let is_pty = |k: Kind| matches!(k, Kind::PtyMaster(_) | Kind::PtySlave(_));
    // A socket end whose peer is held here or above, and whose way to it is not shut
    // down: sending on it queues at the peer.
    let live = |open: &BTreeMap<u32, Kind>, above: &BTreeSet<Kind>, pairs: &[Queues], k: Kind| {
        k.peer().is_some_and(|p| {
            let Kind::Sock(n, end) = p else { return false };
            !pairs[n].shut[end as usize] && (above.contains(&p) || open.values().any(|o| *o == p))
        })
    };
    for _ in 0..genome.len() / 2 {
        if open.len() > 20 {
            break;
        }
        let op = next() % 23;
        match op {
            0 | 1 => {
                let pipe = queued.len();
                queued.push(0);
                let r = free(&open, next());
                open.insert(r, Kind::PipeRead(pipe));
                let w = free(&open, next());
                open.insert(w, Kind::PipeWrite(pipe));
                steps.push(format!("pipe:{r}:{w}"));
            }
            2 => {
                if let Some(a) = pick(&open, next(), &any) {
                    let b = free(&open, next());
                    open.insert(b, open[&a]);
                    steps.push(format!("dup:{a}:{b}"));
                }
            }
            3 => {
                if let Some(a) = pick(&open, next(), &any)
                    && closable(&open, &above, &watched, &in_flight, &taken, a)
                {
                    open.remove(&a);
                    steps.push(format!("close:{a}"));
                }
            }
            4 => {
                let fd = free(&open, next());
                open.insert(fd, Kind::File(fresh()));
                let name = dir.join(format!("f{}", next() % 3));
                steps.push(format!("open:{fd}:rwc:{}", name.display()));
                files += 1;
                steps.push(format!("write:{fd}:file {files} "));
                steps.push(format!("seek:{fd}:{}", next() % 7));
            }
            5 => {
                let readable = |k: Kind| match k {
                    Kind::PipeWrite(p) => {
                        above.contains(&Kind::PipeRead(p)) || open.values().any(|o| *o == Kind::PipeRead(p))
                    }
                    _ => false,
                };
                if let Some(w) = pick(&open, next(), &readable) {
                    let Kind::PipeWrite(p) = open[&w] else { unreachable!() };
                    let len = 1 + next() as usize * 37;
                    if queued[p] + len < 60_000 {
                        queued[p] += len;
                        steps.push(format!("fill:{w}:{len}"));
                    }
                }
            }
            6 => {
                if let Some(a) = pick(&open, next(), &any) {
                    steps.push(format!("{}:{a}", if next() % 2 == 0 { "cloexec" } else { "nonblock" }));
                }
            }
            7 if processes < 4 => {
                processes += 1;
                above.extend(open.values().copied());
                steps.push("fork".into());
                (leader, group_leader) = (false, false);
                // Often split a socketpair: the child lets go of an end its parent keeps.
                if next() % 2 == 0
                    && let Some(a) = pick(&open, next(), &is_socket)
                {
                    open.remove(&a);
                    steps.push(format!("close:{a}"));
                }
            }
            8 if threads < 2 => {
                threads += 1;
                steps.push("threads:1".into());
            }
            9 => {
                let fd = free(&open, next());
                open.insert(fd, Kind::Eventfd(fresh()));
                let flags = ["", "s", "n", "sn"][next() as usize % 4];
                steps.push(format!("eventfd:{fd}:{}:{flags}", next()));
            }
            10 => {
                let fd = free(&open, next());
                open.insert(fd, Kind::Memfd(fresh()));
                let seals = ["", "s", "sg", "S", "sgw"][next() as usize % 5];
                steps.push(format!("memfd:{fd}:m{fd}:{}:{seals}", next() as usize * 61));
                steps.push(format!("seek:{fd}:{}", next() % 5));
            }
            11 => {
                let n = pairs.len();
                pairs.push(Queues::default());
                let a = free(&open, next());
                open.insert(a, Kind::Sock(n, 0));
                let b = free(&open, next());
                open.insert(b, Kind::Sock(n, 1));
                steps.push(format!("socketpair:{a}:{b}:{}", SOCKET_TYPES[next() as usize % 3]));
            }
            12 => {
                // Queue a message (a stream: bytes) at the peer of a socket.
                if let Some(a) = pick(&open, next(), &|k| live(&open, &above, &pairs, k)) {
                    let Some(Kind::Sock(n, end)) = open[&a].peer() else { unreachable!() };
                    let q = &mut pairs[n];
                    let len = 1 + next() as usize * 37;
                    let end = end as usize;
                    if q.bytes[end] + len < 40_000 && q.messages[end] < 12 {
                        q.bytes[end] += len;
                        q.messages[end] += 1;
                        steps.push(format!("fill:{a}:{len}"));
                    }
                }
            }
            13 => {
                // A file in flight: sent to a socket's peer, and often closed here, so
                // the message is all that holds it. Sockets themselves are never sent
                // (a socket in flight may be its own only holder: unix GC territory).
                let sender = pick(&open, next(), &|k| live(&open, &above, &pairs, k));
                let carried = pick(&open, next(), &|k| !is_socket(k) && !is_pty(k));
                if let (Some(a), Some(f)) = (sender, carried) {
                    let Some(Kind::Sock(n, end)) = open[&a].peer() else { unreachable!() };
                    let q = &mut pairs[n];
                    let end = end as usize;
                    if q.messages[end] < 12 {
                        q.bytes[end] += 1;
                        q.messages[end] += 1;
                        steps.push(format!("sendfd:{a}:{f}"));
                        in_flight.insert(open[&f]);
                        if next() % 2 == 0 && closable(&open, &above, &watched, &in_flight, &taken, f) {
                            open.remove(&f);
                            steps.push(format!("close:{f}"));
                        }
                    }
                }
            }
            14 => {
                // Shut a socket down: reading stops its peer's sends, writing its own.
                if let Some(a) = pick(&open, next(), &is_socket) {
                    let Kind::Sock(n, end) = open[&a] else { unreachable!() };
                    let (how, read, write) =
                        [("r", true, false), ("w", false, true), ("rw", true, true)][next() as usize % 3];
                    let end = end as usize;
                    pairs[n].shut[end] |= read;
                    pairs[n].shut[1 - end] |= write;
                    steps.push(format!("shutdown:{a}:{how}"));
                }
            }
            15 | 16 | 19 => {
                // Often a new epoll first; then one to three items: any file that polls
                // (not a regular file or a memfd) in any epoll, an epoll only in one made
                // after it, under the fd it is registered with; later steps may dup and
                // close that fd, or reuse its number.
                // A new epoll often watches an older one first (an epoll of epolls).
                let mut nest = None;
                if op == 15 && epolls < 4 {
                    let fd = free(&open, next());
                    open.insert(fd, Kind::Epoll(epolls));
                    epolls += 1;
                    steps.push(format!("epoll:{fd}"));
                    if next() % 2 == 0 {
                        nest = pick(&open, next(), &|k| matches!(k, Kind::Epoll(e) if e + 1 < epolls))
                            .map(|older| (fd, older));
                    }
                }
                let polls = |k: Kind| !matches!(k, Kind::File(_) | Kind::Memfd(_));
                for _ in 0..1 + next() % 3 {
                    let item = nest.take().or_else(|| {
                        let epoll = pick(&open, next(), &|k| matches!(k, Kind::Epoll(_)));
                        epoll.zip(pick(&open, next(), &polls))
                    });
                    let Some((ep, t)) = item else { break };
                    let (Kind::Epoll(e), k) = (open[&ep], open[&t]) else { unreachable!() };
                    let nested = matches!(k, Kind::Epoll(inner) if inner >= e);
                    if nested || !items.insert((e, k, t)) {
                        continue;
                    }
                    let mut events = EVENTS[next() as usize % EVENTS.len()];
                    if matches!(k, Kind::Epoll(_)) {
                        events &= !EPOLLEXCLUSIVE;
                    }
                    let data = match next() % 4 {
                        0 => u64::MAX,
                        1 => t as u64,
                        _ => (next() as u64) << 56 | (next() as u64) << 32 | (next() as u64) << 8 | t as u64,
                    };
                    watched.insert(k);
                    steps.push(format!("epollctl:{ep}:{t}:{events:x}:{data:#x}"));
                    // Often the fd it was registered under moves: a dup keeps the file,
                    // the number is closed (and may be taken by another file later).
                    if next() % 3 == 0 {
                        let d = free(&open, next());
                        open.insert(d, k);
                        open.remove(&t);
                        steps.push(format!("dup:{t}:{d}"));
                        steps.push(format!("close:{t}"));
                    }
                }
            }
            17 => {
                let fd = free(&open, next());
                open.insert(fd, Kind::Timer(fresh()));
                let clock = ["monotonic", "realtime", "boottime"][next() as usize % 3];
                // Disarmed, in an hour, or soon (expiring while the test runs: ticks).
                let value_ms = [0, 3_600_000 + next() as u64, 1 + next() as u64 % 50][next() as usize % 3];
                let interval_ms = [0, 100 + next() as u64 * 7][next() as usize % 2];
                let flags = ["", "a", "ac", "n"][next() as usize % 4];
                steps.push(format!("timerfd:{fd}:{clock}:{value_ms}:{interval_ms}:{flags}"));
            }
            18 => {
                let fd = free(&open, next());
                open.insert(fd, Kind::Signal(fresh()));
                let signals = ["USR1", "USR2,INT", "HUP,USR1,TERM"][next() as usize % 3];
                steps.push(format!("signalfd:{fd}:{signals}"));
            }
            20 => {
                let n = ptys;
                ptys += 1;
                let m = free(&open, next());
                open.insert(m, Kind::PtyMaster(n));
                let s = free(&open, next());
                open.insert(s, Kind::PtySlave(n));
                steps.push(format!("pty:{m}:{s}"));
                if next() % 2 == 0 {
                    steps.push(format!("winsize:{m}:{}:{}", 1 + next(), 1 + next()));
                }
            }
            21 => {
                // A new session (a process that leads no group may), or a new group.
                if !leader && !group_leader && next() % 2 == 0 {
                    (leader, group_leader, has_ctty) = (true, true, false);
                    steps.push("setsid".into());
                } else if !leader {
                    group_leader = true;
                    steps.push("setpgid".into());
                }
            }
            22 => {
                // A session leader without terminal takes a pty slave no session has,
                // whose master is open (else the slave is hung up).
                let usable = |k: Kind| match k {
                    Kind::PtySlave(n) => {
                        !taken.contains(&n)
                            && (above.contains(&Kind::PtyMaster(n))
                                || open.values().any(|o| *o == Kind::PtyMaster(n)))
                    }
                    _ => false,
                };
                if leader
                    && !has_ctty
                    && let Some(s) = pick(&open, next(), &usable)
                {
                    let Kind::PtySlave(n) = open[&s] else { unreachable!() };
                    taken.insert(n);
                    has_ctty = true;
                    steps.push(format!("ctty:{s}"));
                }
            }
            _ => {}
        }
    }
    (steps, processes)
}

/// The tree of the genome `[12, 0, 23, 236, 170, 149, 171, 26, 143, 49, 234, 101, 11, 213,
/// 134, 0, 52, 179, 12]`, on which the two harvests once differed in the seqpacket
/// queue: a datagram from an unbound socket got stale stack bytes as its sender (nix's
/// recvmsg; crd_user's sockio unit test reproduces that deterministically). Harvested by
/// both, several times, as the property did.
#[test]
fn the_seqpacket_tree_the_property_once_failed_on_harvests_alike() {
    // Its eventfd is a semaphore, which /proc shows from 6.5 on.
    if !is_root() || !crd_tests::harvests_agree_on_every_kind() {
        return;
    }
    let steps = [
        "pipe:23:5",
        "socketpair:6:7:q",
        "eventfd:14:134:s",
        "pipe:8:15",
        "fill:6:1",
        "pipe:3:4",
        "pipe:9:10",
    ];
    for _ in 0..5 {
        let fixture = spawn(&steps, 1);
        let by_procfs = checkpoint(fixture.root(), true, Source::Procfs);
        let by_bpf = checkpoint(fixture.root(), true, Source::Bpf);
        if let Err(difference) = by_procfs.graph.same_shape(&by_bpf.graph) {
            panic!("BPF and /proc graphs differ: {difference}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        // PROPTEST_CASES lowers it where time is short (the VM matrix).
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(12),
        max_shrink_iters: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_wired_tree_round_trips(genome in prop::collection::vec(any::<u8>(), 0..64)) {
        if !is_root() {
            return Ok(());
        }
        let dir = tempfile::tempdir().unwrap();
        let (steps, processes) = script(&genome, dir.path());
        let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
        let fixture = spawn(&steps, processes);
        // /proc first: a timer's time left only shrinks from one harvest to the next.
        let by_procfs = checkpoint(fixture.root(), true, Source::Procfs);
        let (original, image, _log) = image_of_stopped(fixture, dir.path());
        if let Err(difference) = by_procfs.graph.same_shape(&original.graph)
            && crd_tests::harvests_agree_on_every_kind()
        {
            panic!("BPF and /proc graphs differ: {difference}");
        }
        // Panics (and so fails and shrinks) with the first difference.
        assert_round_trip(&original, &image);
    }
}
