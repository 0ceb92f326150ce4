//! `crd ls`: an lsof-like view of open files from one harvest, with the sharing the
//! objref graph knows — which tasks share one fd table, which fds share one open file
//! description, which processes hold which ends of each pipe and of each unix socket
//! pair, and, for a connected socket, the PID:FD holding its other end (what lsof shows
//! only with `+E`).
//!
//! Nothing is frozen: `ls` looks, it does not checkpoint. The harvest goes through
//! [`Graph::build`], so objects carry the same objrefs a checkpoint of the same state
//! would give them, and both harvesters (BPF, /proc) list the same thing.
use std::{collections::BTreeMap, path::Path};

// Keys here are kernel identities and small numbers: foldhash, not SipHash's defence
// against chosen keys (see graph.rs).
use foldhash::{HashMap, HashMapExt, HashSet};
use serde::Serialize;

use crate::{
    admission::{Admission, Refused},
    graph::{Graph, GraphIndex, Object, SavedStates},
    harvest::{
        self, Harvest, HarvestError, LoadOptions, Scope, Source,
        extras::{self, UnixQueue},
    },
    kinds::{Kind, Live, Saved, Tie, inet::InetState},
    timings::Phases,
    types::{Access, DeviceId, Fd, ObjRef, Pid, Tgid},
};

#[derive(Debug, thiserror::Error)]
pub enum LsError {
    #[error("no process with PID {0}: check the PID (it may have exited)")]
    NoSuchProcess(Tgid),
    #[error("name the processes to list, or use --all for every process")]
    NothingToList,
    #[error(transparent)]
    Harvest(#[from] HarvestError),
    #[error("interrupted; nothing was listed")]
    Interrupted(#[source] crate::interrupt::Interrupted),
    #[error(transparent)]
    Refused(#[from] Refused),
}

/// Which processes to list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Targets {
    Processes(Vec<Tgid>),
    /// Every process on the machine but crd itself.
    All,
}

impl Targets {
    /// From the command line: PIDs, or `--all`.
    pub fn new(pids: &[u32], all: bool) -> Result<Self, LsError> {
        if all {
            return Ok(Self::All);
        }
        if pids.is_empty() {
            return Err(LsError::NothingToList);
        }
        let mut tgids: Vec<Tgid> = pids.iter().copied().map(Tgid).collect();
        tgids.sort_unstable();
        tgids.dedup();
        if let Some(gone) = tgids.iter().find(|t| !Path::new(&format!("/proc/{}", t.0)).exists()) {
            return Err(LsError::NoSuchProcess(*gone));
        }
        Ok(Self::Processes(tgids))
    }
}

/// What `ls` can say of each unix socket's queue, by (device, inode).
pub type UnixQueues = std::collections::HashMap<(DeviceId, u64), UnixQueue>;

/// One harvest of `targets`, without freezing them, with what the unix sockets' queues
/// hold where it can be known without reading them. Returns the source actually used.
/// `btf`: see [`bpf::BpfHarvester::load`].
pub fn harvest(
    source: Source,
    load: &LoadOptions,
    targets: &Targets,
    interrupted: &dyn Fn() -> bool,
) -> Result<(Source, Harvest, UnixQueues), LsError> {
    let mut harvester = harvest::harvester(source, *targets == Targets::All, load)?;
    let (harvest, unix_queues) =
        harvest_with(harvester.as_mut(), targets, &Admission::Kernel, None, interrupted)?;
    Ok((harvester.source(), harvest, unix_queues))
}

/// As [`harvest`], with a harvester already loaded (for [`Targets::All`], one loaded
/// with `match_all`), listing only what `admission` admits: a named process it refuses
/// is an error, and `--all` leaves out every process it refuses, and `caller` (the
/// service's client, left out as crd leaves itself out).
pub fn harvest_with(
    harvester: &mut dyn harvest::Harvester,
    targets: &Targets,
    admission: &Admission,
    caller: Option<Tgid>,
    interrupted: &dyn Fn() -> bool,
) -> Result<(Harvest, UnixQueues), LsError> {
    if let Targets::Processes(tgids) = targets {
        for tgid in tgids {
            admission.check(*tgid)?;
        }
    }
    let scope = match targets {
        Targets::Processes(tgids) => Scope::Processes(tgids),
        Targets::All => Scope::All,
    };
    let (mut harvest, _) = harvester.harvest(scope, interrupted)?;
    if *targets == Targets::All && (caller.is_some() || !admission.admits_everyone()) {
        let mut admitted: HashMap<Tgid, bool> = HashMap::new();
        let keep: std::collections::HashSet<Tgid> = harvest
            .tasks
            .iter()
            .map(|t| t.tgid)
            .filter(|&tgid| Some(tgid) != caller)
            .filter(|&tgid| *admitted.entry(tgid).or_insert_with(|| admission.check(tgid).is_ok()))
            .collect();
        harvest.retain_processes(&keep);
    }
    extras::fill_links(&mut harvest);
    extras::count_queued(&mut harvest);
    let unix_queues = extras::unix_queues(&harvest);
    // Path and queue reads have no check of their own: Ctrl-C stops the listing here.
    if interrupted() {
        return Err(LsError::Interrupted(crate::interrupt::Interrupted));
    }
    Ok((harvest, unix_queues))
}

/// What `crd ls` shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Listing {
    pub processes: Vec<Process>,
    /// Fd tables used by more than one task (threads, CLONE_FILES processes).
    pub shared_fd_tables: Vec<SharedTable>,
    /// Open file descriptions reached from more than one fd (dup, fork, SCM_RIGHTS).
    pub shared_descriptions: Vec<SharedDescription>,
    /// Every pipe and FIFO, with the fds holding each end.
    pub pipes: Vec<PipeEnds>,
    /// Every connected pair of unix sockets with an end listed, with the fds holding
    /// each end and what is queued for each to read.
    pub socket_pairs: Vec<SocketPair>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Process {
    pub pid: Tgid,
    pub comm: String,
    pub threads: Vec<Pid>,
    pub fd_table: ObjRef,
    pub fds: Vec<OpenFd>,
    /// Its session's controlling terminal (`/dev/pts/3`, else `tty MAJOR:MINOR`),
    /// with the session and the terminal's foreground group; None: it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctty: Option<Ctty>,
}

/// A process's controlling terminal, from `/proc/PID/stat` (see [`crate::model::Session`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ctty {
    pub name: String,
    pub session: u32,
    pub foreground: u32,
}

impl Ctty {
    fn of(session: &crate::model::Session) -> Option<Self> {
        let tty = session.tty?;
        let name = match tty.major {
            136..=143 => format!("/dev/pts/{}", (tty.major - 136) * 256 + tty.minor),
            _ => format!("tty {tty}"),
        };
        Some(Ctty { name, session: session.sid, foreground: session.foreground })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OpenFd {
    pub fd: Fd,
    pub kind: Kind,
    pub access: Access,
    pub close_on_exec: bool,
    /// Open flags without the access mode and O_CLOEXEC.
    pub flags: u32,
    pub offset: i64,
    /// The path, or `pipe:[ino]`-style for objects without one.
    pub name: Name,
    /// What the object's kind tells beyond its name (`count=7 semaphore`,
    /// `4096 bytes seals=shrink`); pipes tell theirs in the pipe section.
    pub detail: Option<String>,
    /// Objref of the open file description.
    pub description: ObjRef,
    /// Objref of the object (an inode, or an anon file's private object).
    pub inode: ObjRef,
    /// A connected socket's other end, where the listing holds it: the fds of the unix
    /// peer the graph ties it to, or of the TCP/UDP socket whose addresses mirror its
    /// own; a pty end's other end (master or slave). Empty otherwise (not connected, or
    /// the other end is not listed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peer: Vec<Holder>,
}

/// A connected pair of unix sockets: a socketpair, or a connection and the end its
/// listener accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SocketPair {
    pub ends: [SocketEnd; 2],
}

/// One end of a [`SocketPair`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SocketEnd {
    /// Objref of the socket; None: no listed process holds it.
    pub inode: Option<ObjRef>,
    pub name: Name,
    pub holders: Vec<Holder>,
    /// Bytes queued for this end to read; None: unknown (a datagram socket, whose
    /// FIONREAD counts one datagram; an end not listed or not reachable).
    pub queued: Option<u64>,
    /// Files in flight in its queue; None: unknown (not listed, or no `scm_fds:` in its
    /// fdinfo).
    pub fds_in_flight: Option<u32>,
}

/// An object's name as `ls` shows it (a path, `pipe:[ino]`...): made once per object and
/// shared by every fd and section that shows it (a pipe's name is shown by both its ends
/// and the pipe section; formatting it each time was a tenth of the listing).
pub type Name = std::sync::Arc<str>;

/// One fd of one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Holder {
    pub pid: Tgid,
    pub fd: Fd,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.pid, self.fd)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SharedTable {
    pub fd_table: ObjRef,
    /// Processes using the table, each with its threads.
    pub users: Vec<(Tgid, Vec<Pid>)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SharedDescription {
    pub description: ObjRef,
    /// Objref of its inode.
    pub inode: ObjRef,
    pub name: Name,
    pub access: Access,
    pub holders: Vec<Holder>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PipeEnds {
    pub inode: ObjRef,
    pub name: Name,
    pub readers: Vec<Holder>,
    pub writers: Vec<Holder>,
    /// Some end is also open in a process not listed.
    pub held_outside: bool,
    /// Bytes queued (unknown if the holder exited or refused pidfd_getfd).
    pub queued: Option<u64>,
}

impl Listing {
    /// Builds the listing of `harvest` through the objref graph; `unix_queues` is what
    /// [`harvest`] found in the unix sockets' queues.
    /// Takes the harvest whole: it goes once the graph is built, before the listing is,
    /// so that at most two of the three are in memory at once (at 100,000 fds each is
    /// tens of megabytes).
    pub fn new(harvest: Harvest, unix_queues: &UnixQueues) -> Self {
        Self::timed(harvest, unix_queues, &mut Phases::start())
    }

    /// [`new`](Self::new), its phases timed (`graph`, then `listing`).
    pub fn timed(harvest: Harvest, unix_queues: &UnixQueues, phases: &mut Phases) -> Self {
        let root = harvest.tasks.iter().map(|t| t.tgid).min().unwrap_or(Tgid(0));
        let graph = Graph::build(root, &harvest, SavedStates::default());
        // Pipes are keyed by inode: (dev, ino) names the same pipe in harvest and graph.
        let queued: HashMap<(DeviceId, u64), Option<u32>> = harvest
            .fds
            .iter()
            .filter_map(|f| match &f.file.object.live {
                Live::Pipe(p) | Live::Fifo(p) => Some(((f.file.object.dev, f.file.object.ino), p.queued)),
                _ => None,
            })
            .collect();
        drop(harvest);
        phases.lap("graph");
        let listing = Self::from_graph(
            &graph,
            |object| queued.get(&(object.dev, object.ino)).copied().flatten().map(u64::from),
            |object| unix_queues.get(&(object.dev, object.ino)).copied().unwrap_or_default(),
        );
        phases.lap("listing");
        listing
    }

    fn from_graph(
        graph: &Graph,
        queued: impl Fn(&Object) -> Option<u64>,
        unix_queue: impl Fn(&Object) -> UnixQueue,
    ) -> Self {
        let index = graph.index();
        let mut processes: BTreeMap<Tgid, Process> = BTreeMap::new();
        for task in &graph.tasks {
            let process = processes.entry(task.tgid).or_insert_with(|| Process {
                pid: task.tgid,
                comm: task.comm.clone(),
                threads: Vec::new(),
                fd_table: task.fd_table.objref(),
                fds: Vec::new(),
                ctty: Ctty::of(&task.session),
            });
            process.threads.push(task.pid);
            if task.pid.0 == task.tgid.0 {
                // The leader's name is the process's name; its table, the one listed.
                process.comm = task.comm.clone();
                process.fd_table = task.fd_table.objref();
            }
        }
        let mut by_table: BTreeMap<ObjRef, Vec<(Tgid, Vec<Pid>)>> = BTreeMap::new();
        let mut by_description = Vec::new();
        // Each pipe end's holder with its access, grouped by pipe below.
        let mut pipe_holders: Vec<(ObjRef, Holder, Access)> = Vec::new();
        // Every listed fd of each object, to name a socket's other end by.
        let mut by_object = Vec::new();
        let mut names = Names::default();
        for process in processes.values_mut() {
            by_table.entry(process.fd_table).or_default().push((process.pid, process.threads.clone()));
            let Some(table) = index.tables.get(&process.fd_table) else { continue };
            for slot in &table.fds {
                let description = slot.file.objref();
                let Some((file, inode_ref, object)) = index.open(description) else { continue };
                let holder = Holder { pid: process.pid, fd: slot.fd };
                by_description.push((description, holder));
                by_object.push((inode_ref, holder));
                if object.kind().is_pipe_like() {
                    pipe_holders.push((inode_ref, holder, file.access));
                }
                process.fds.push(OpenFd {
                    fd: slot.fd,
                    kind: object.kind(),
                    access: file.access,
                    close_on_exec: slot.close_on_exec,
                    flags: file.flags & !(libc::O_ACCMODE as u32),
                    offset: file.pos,
                    name: names.of(inode_ref, object),
                    detail: if object.kind().is_pipe_like() { None } else { object.state.detail() },
                    description,
                    inode: inode_ref,
                    peer: Vec::new(),
                });
            }
        }
        let (by_description, by_object) = (HoldersBy::new(by_description), HoldersBy::new(by_object));
        let peers = peers(&index, &by_object);
        for f in processes.values_mut().flat_map(|p| p.fds.iter_mut()) {
            if let Some(holders) = peers.get(&f.inode).and_then(|peer| by_object.get(peer)) {
                f.peer = holders.to_vec();
                let arrow =
                    format!("->{}", holders.iter().map(Holder::to_string).collect::<Vec<_>>().join(","));
                f.detail = Some(match f.detail.take() {
                    Some(detail) => format!("{detail} {arrow}"),
                    None => arrow,
                });
            }
        }
        let shared_fd_tables = by_table
            .into_iter()
            .filter(|(_, users)| users.len() > 1 || users.iter().any(|(_, threads)| threads.len() > 1))
            .map(|(fd_table, users)| SharedTable { fd_table, users })
            .collect();
        let shared_descriptions = by_description
            .groups()
            .filter(|(_, holders)| holders.len() > 1)
            .filter_map(|(description, holders)| {
                let holders = holders.to_vec();
                let (file, inode_ref, object) = index.open(description)?;
                Some(SharedDescription {
                    description,
                    inode: inode_ref,
                    name: names.of(inode_ref, object),
                    access: file.access,
                    holders,
                })
            })
            .collect();
        // Stable: each end's holders stay in listing order.
        pipe_holders.sort_by_key(|(inode_ref, _, _)| *inode_ref);
        let pipes = pipe_holders
            .chunk_by(|a, b| a.0 == b.0)
            .filter_map(|ends| {
                let inode_ref = ends[0].0;
                let object = index.objects.get(&inode_ref)?;
                Some(PipeEnds {
                    inode: inode_ref,
                    name: names.of(inode_ref, object),
                    readers: ends.iter().filter(|(_, _, access)| access.read).map(|(_, h, _)| *h).collect(),
                    writers: ends.iter().filter(|(_, _, access)| access.write).map(|(_, h, _)| *h).collect(),
                    held_outside: object.held_outside,
                    queued: queued(object),
                })
            })
            .collect();
        let socket_pairs = socket_pairs(&index, &by_object, &unix_queue, &mut names);
        Self {
            processes: processes.into_values().collect(),
            shared_fd_tables,
            shared_descriptions,
            pipes,
            socket_pairs,
        }
    }

    /// Keeps only pipes and FIFOs (`--pipes`).
    pub fn only_pipes(mut self) -> Self {
        for process in &mut self.processes {
            process.fds.retain(|f| f.kind.is_pipe_like());
        }
        let pipes: HashSet<ObjRef> = self.pipes.iter().map(|p| p.inode).collect();
        self.shared_descriptions.retain(|d| pipes.contains(&d.inode));
        self.socket_pairs.clear();
        self
    }

    /// Writes the listing as `crd ls` prints it (the table, or the JSON document with
    /// `json`), buffered and as it goes: at 100,000 fds either is tens of megabytes,
    /// which a `String` first would hold in memory twice over.
    pub fn write(&self, out: impl std::io::Write, json: bool) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
        if json {
            crate::pretty_json::to_writer(&mut out, self)?;
            writeln!(out)?;
        } else {
            let mut text = IoText { out: &mut out, error: None };
            if self.write_text(&mut text).is_err() {
                return Err(text
                    .error
                    .unwrap_or_else(|| std::io::Error::other("the listing could not be formatted")));
            }
        }
        out.flush()
    }

    /// The lsof-like table, then the sharing.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = self.write_text(&mut out);
        out
    }

    /// [`render_text`](Self::render_text) into `out` as it goes (`crd ls` streams it to
    /// stdout: at 100,000 fds the whole table is tens of megabytes). The two sections
    /// that grow with the fds (the table and the pipes) are built a line at a time in
    /// one reused [`Line`], cells padded and numbers written by hand: through
    /// `format_args!` per cell they cost more than building the listing.
    pub fn write_text(&self, out: &mut impl std::fmt::Write) -> std::fmt::Result {
        writeln!(
            out,
            "{:>7} {:<15} {:>6} {:<7} {:<5} {:>10} {:>6} NAME",
            "PID", "COMMAND", "FD", "TYPE", "FLAGS", "OFFSET", "OFD"
        )?;
        let mut line = Line::default();
        for p in &self.processes {
            for f in &p.fds {
                line.row(p, f);
                out.write_str(&line.text)?;
            }
        }
        if !self.shared_fd_tables.is_empty() {
            writeln!(out, "\nfd tables shared by several tasks:")?;
            for t in &self.shared_fd_tables {
                let users: Vec<String> = t
                    .users
                    .iter()
                    .map(|(pid, threads)| match threads.len() {
                        1 => format!("PID {pid}"),
                        n => format!("PID {pid} ({n} threads: {})", join(threads)),
                    })
                    .collect();
                writeln!(out, "  table {}: {}", t.fd_table, users.join("; "))?;
            }
        }
        if !self.shared_descriptions.is_empty() {
            writeln!(out, "\nopen file descriptions shared by several fds (PID:FD):")?;
            for d in &self.shared_descriptions {
                writeln!(out, "  ofd {} {} ({}): {}", d.description, d.name, d.access, join(&d.holders))?;
            }
        }
        if !self.pipes.is_empty() {
            writeln!(out, "\npipes (PID:FD of each end):")?;
            for p in &self.pipes {
                line.pipe(p);
                out.write_str(&line.text)?;
            }
        }
        if self.processes.iter().any(|p| p.ctty.is_some()) {
            writeln!(out, "\ncontrolling terminals:")?;
            for p in &self.processes {
                if let Some(c) = &p.ctty {
                    writeln!(
                        out,
                        "  PID {} ({}): {}, session {}, foreground group {}",
                        p.pid, p.comm, c.name, c.session, c.foreground
                    )?;
                }
            }
        }
        if !self.socket_pairs.is_empty() {
            writeln!(out, "\nunix socket pairs (PID:FD of each end; what is queued for each to read):")?;
            for pair in &self.socket_pairs {
                let [a, b] = &pair.ends;
                writeln!(out, "  {} <-> {}; {}; {}", end(a), end(b), queued_for(a), queued_for(b))?;
            }
        }
        Ok(())
    }
}

/// The listed fds (PID:FD) holding each objref, in listing order: one sorted pair of
/// arrays instead of a map of vectors (at 100,000 fds, 200,000 small allocations).
struct HoldersBy {
    refs: Vec<ObjRef>,
    holders: Vec<Holder>,
}

impl HoldersBy {
    fn new(mut pairs: Vec<(ObjRef, Holder)>) -> Self {
        // Stable: each objref's holders stay in the order they were listed.
        pairs.sort_by_key(|(objref, _)| *objref);
        let (refs, holders) = pairs.into_iter().unzip();
        Self { refs, holders }
    }

    /// The holders of `objref`; None: no listed fd holds it.
    fn get(&self, objref: &ObjRef) -> Option<&[Holder]> {
        let start = self.refs.partition_point(|r| r < objref);
        let end = start + self.refs[start..].partition_point(|r| r == objref);
        (end > start).then(|| &self.holders[start..end])
    }

    /// Each objref once, in order.
    fn keys(&self) -> impl Iterator<Item = ObjRef> + '_ {
        self.groups().map(|(objref, _)| objref)
    }

    /// Each objref with its holders, in order.
    fn groups(&self) -> impl Iterator<Item = (ObjRef, &[Holder])> + '_ {
        self.refs.chunk_by(|a, b| a == b).scan(0, |at, run| {
            let start = *at;
            *at += run.len();
            Some((run[0], &self.holders[start..*at]))
        })
    }
}

/// `NAME PID:FD...`, or `NAME (not listed)`.
fn end(end: &SocketEnd) -> String {
    match end.holders.is_empty() {
        true => format!("{} (not listed)", end.name),
        false => format!("{} {}", end.name, join(&end.holders)),
    }
}

/// What waits for one end: `to 10:3: 4 bytes, 1 fd in flight`, unknowns said so.
fn queued_for(end: &SocketEnd) -> String {
    let who = match end.holders.first() {
        Some(holder) => holder.to_string(),
        None => end.name.to_string(),
    };
    let bytes = match end.queued {
        Some(1) => "1 byte".to_string(),
        Some(n) => format!("{n} bytes"),
        None => "bytes unknown".into(),
    };
    let fds = match end.fds_in_flight {
        Some(1) => "1 fd in flight".to_string(),
        Some(n) => format!("{n} fds in flight"),
        None => "fds in flight unknown".into(),
    };
    format!("to {who}: {bytes}, {fds}")
}

/// Each listed socket's other end (socket objref → socket objref), where the listing
/// holds it: a unix socket's peer as the graph ties it; a TCP or UDP socket connected
/// over an address pair that exactly one other listed socket mirrors (both ends of a
/// loopback connection). Mirrored addresses in two network namespaces would pair wrongly;
/// crd does not know namespaces here, so two candidates pair neither.
fn peers(index: &GraphIndex<'_>, listed: &HoldersBy) -> HashMap<ObjRef, ObjRef> {
    let mut peers = HashMap::new();
    let mut inet: HashMap<(bool, std::net::SocketAddr, std::net::SocketAddr), Vec<ObjRef>> = HashMap::new();
    for objref in listed.keys() {
        let Some(object) = index.objects.get(&objref) else { continue };
        match &object.state {
            Saved::Unix(_) | Saved::Terminal(_) => {
                let peer = object.ties().into_iter().find_map(|(tie, found)| match tie {
                    Tie::Peer(_) | Tie::Pty(_) => found,
                    _ => None,
                });
                if let Some(peer) = peer.filter(|p| listed.get(p).is_some()) {
                    peers.insert(objref, peer);
                }
            }
            Saved::Inet(state) => {
                if let InetState { transport, local: Some(local), remote: Some(remote), .. } = &**state {
                    let tcp = *transport == crate::kinds::inet::Transport::Tcp;
                    inet.entry((tcp, *local, *remote)).or_default().push(objref);
                }
            }
            _ => {}
        }
    }
    for ((tcp, local, remote), mine) in &inet {
        if let ([me], Some([other])) =
            (mine.as_slice(), inet.get(&(*tcp, *remote, *local)).map(Vec::as_slice))
        {
            peers.insert(*me, *other);
        }
    }
    peers
}

/// Every connected pair of unix sockets with an end listed: both ends when each is the
/// other's peer, or one end and its peer's inode when no listed process holds the peer.
/// (A datagram socket connected to a named one that is not connected back is no pair:
/// its fd's `peer` says where it sends.)
fn socket_pairs(
    index: &GraphIndex<'_>,
    listed: &HoldersBy,
    unix_queue: &impl Fn(&Object) -> UnixQueue,
    names: &mut Names,
) -> Vec<SocketPair> {
    let mut listed_end = |objref: ObjRef, object: &Object| {
        let queue = unix_queue(object);
        SocketEnd {
            inode: Some(objref),
            name: names.of(objref, object),
            holders: listed.get(&objref).map(<[Holder]>::to_vec).unwrap_or_default(),
            queued: queue.bytes,
            fds_in_flight: queue.fds_in_flight,
        }
    };
    let peer_of = |object: &Object| {
        object.ties().into_iter().find_map(|(tie, found)| match tie {
            Tie::Peer(ino) => Some((ino, found)),
            _ => None,
        })
    };
    let mut pairs = Vec::new();
    for objref in listed.keys() {
        let Some(object) = index.objects.get(&objref).filter(|o| o.kind() == Kind::Unix) else { continue };
        match peer_of(object) {
            Some((_, Some(peer))) if peer > objref => {
                let Some(other) = index.objects.get(&peer) else { continue };
                if peer_of(other).and_then(|(_, back)| back) != Some(objref) {
                    continue;
                }
                pairs.push(SocketPair { ends: [listed_end(objref, object), listed_end(peer, other)] });
            }
            Some((ino, None)) => {
                let outside = SocketEnd {
                    inode: None,
                    name: format!("socket:[{ino}]").into(),
                    holders: Vec::new(),
                    queued: None,
                    fds_in_flight: None,
                };
                pairs.push(SocketPair { ends: [listed_end(objref, object), outside] });
            }
            _ => {}
        }
    }
    pairs
}

/// Each object's [`Name`] by objref, made on first use.
#[derive(Default)]
struct Names(Vec<Option<Name>>);

impl Names {
    fn of(&mut self, objref: ObjRef, object: &Object) -> Name {
        let at = objref.0 as usize;
        if at >= self.0.len() {
            self.0.resize(at + 1, None);
        }
        self.0[at].get_or_insert_with(|| name(object).into()).clone()
    }
}

fn name(object: &Object) -> String {
    match (&object.path, object.kind()) {
        (None, kind) if kind.has_path() => format!("{kind}:[{}] (gone)", object.ino),
        _ => object.name(),
    }
}

/// lsof's mode letter: r, w, u (both), or space.
fn mode_letter(access: Access) -> char {
    match (access.read, access.write) {
        (true, true) => 'u',
        (true, false) => 'r',
        (false, true) => 'w',
        (false, false) => ' ',
    }
}

/// `e` close-on-exec, `a` O_APPEND, `n` O_NONBLOCK, `s` O_SYNC, `d` O_DIRECT; `-` none.
fn flag_letters(close_on_exec: bool, flags: u32) -> impl Iterator<Item = char> {
    let letters = [
        (close_on_exec, 'e'),
        (flags & libc::O_APPEND as u32 != 0, 'a'),
        (flags & libc::O_NONBLOCK as u32 != 0, 'n'),
        (flags & libc::O_SYNC as u32 == libc::O_SYNC as u32, 's'),
        (flags & libc::O_DIRECT as u32 != 0, 'd'),
    ];
    let none = letters.iter().all(|(set, _)| !set);
    letters.into_iter().filter_map(|(set, letter)| set.then_some(letter)).chain(none.then_some('-'))
}

/// One line of the table or of the pipes section, built in place: reused from line to
/// line, so that a listing of 100,000 fds allocates nothing per line.
#[derive(Default)]
struct Line {
    text: String,
    number: itoa::Buffer,
}

impl Line {
    /// `PID COMMAND FD TYPE FLAGS OFFSET OFD NAME [DETAIL]`, padded as the header.
    fn row(&mut self, p: &Process, f: &OpenFd) {
        self.text.clear();
        let pid = self.number.format(p.pid.0);
        pad_to(&mut self.text, 7, pid.len());
        self.text.push_str(pid);
        self.text.push(' ');
        self.text.push_str(&p.comm);
        pad_to(&mut self.text, 15, p.comm.chars().count());
        self.text.push(' ');
        let fd = self.number.format(f.fd.0);
        pad_to(&mut self.text, 6, fd.len() + 1);
        self.text.push_str(fd);
        self.text.push(mode_letter(f.access));
        self.text.push(' ');
        let kind = f.kind.name();
        self.text.push_str(kind);
        pad_to(&mut self.text, 7, kind.chars().count());
        self.text.push(' ');
        let before = self.text.len();
        self.text.extend(flag_letters(f.close_on_exec, f.flags));
        let flags = self.text.len() - before;
        pad_to(&mut self.text, 5, flags);
        self.text.push(' ');
        if f.kind.is_pipe_like() || f.kind.is_socket() {
            pad_to(&mut self.text, 10, 0);
        } else {
            let offset = self.number.format(f.offset);
            pad_to(&mut self.text, 10, offset.len());
            self.text.push_str(offset);
        }
        self.text.push(' ');
        let ofd = self.number.format(f.description.0);
        pad_to(&mut self.text, 6, ofd.len() + 1);
        self.text.push('#');
        self.text.push_str(ofd);
        self.text.push(' ');
        self.text.push_str(&f.name);
        if let Some(detail) = &f.detail {
            self.text.push(' ');
            self.text.push_str(detail);
        }
        self.text.push('\n');
    }

    /// `  NAME: read PID:FD...; write PID:FD...[; an end is also open elsewhere][; N bytes queued]`.
    fn pipe(&mut self, p: &PipeEnds) {
        self.text.clear();
        self.text.push_str("  ");
        self.text.push_str(&p.name);
        self.text.push_str(": read ");
        self.holders(&p.readers);
        self.text.push_str("; write ");
        self.holders(&p.writers);
        if p.held_outside {
            self.text.push_str("; an end is also open elsewhere");
        }
        if let Some(queued) = p.queued {
            self.text.push_str("; ");
            self.text.push_str(self.number.format(queued));
            self.text.push_str(" bytes queued");
        }
        self.text.push('\n');
    }

    /// `PID:FD PID:FD...`, or `none listed`.
    fn holders(&mut self, holders: &[Holder]) {
        if holders.is_empty() {
            self.text.push_str("none listed");
        }
        for (i, holder) in holders.iter().enumerate() {
            if i > 0 {
                self.text.push(' ');
            }
            self.text.push_str(self.number.format(holder.pid.0));
            self.text.push(':');
            self.text.push_str(self.number.format(holder.fd.0));
        }
    }
}

/// Spaces to take a cell of `width` characters to `cell_width` (padding as `{:>N}` and
/// `{:<N}` do: by characters, none when the cell is wider).
fn pad_to(text: &mut String, cell_width: usize, width: usize) {
    text.extend(std::iter::repeat_n(' ', cell_width.saturating_sub(width)));
}

/// A `fmt::Write` onto an `io::Write`, keeping the I/O error that `fmt::Error` cannot
/// carry.
struct IoText<'a, W: std::io::Write> {
    out: &'a mut W,
    error: Option<std::io::Error>,
}

impl<W: std::io::Write> std::fmt::Write for IoText<'_, W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.out.write_all(s.as_bytes()).map_err(|e| {
            self.error = Some(e);
            std::fmt::Error
        })
    }
}

fn join<T: std::fmt::Display>(items: &[T]) -> Joined<'_, T> {
    Joined(items)
}

/// Items separated by spaces, formatted where they are written.
struct Joined<'a, T>(&'a [T]);

impl<T: std::fmt::Display> std::fmt::Display for Joined<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, item) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{item}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        kinds::socket::{Family, SockType, SocketFacts, state},
        model::{FdInfo, TaskInfo, testing},
    };

    fn task(pid: u32, tgid: u32, table: u64) -> TaskInfo {
        testing::task(pid, tgid, 1, table)
    }

    /// An end of pipe:[77], 5 bytes queued.
    fn pipe_fd(tgid: u32, table: u64, fd: u32, file: u64, read: bool, refs: u64) -> FdInfo {
        let mut f = testing::pipe_end(tgid, table, fd, file, 0x500, read);
        f.file.refs = refs;
        f.file.object.ino = 77;
        testing::pipe_live(&mut f).queued = Some(5);
        f
    }

    /// Process 10 (two threads) holds both ends at fds 3, 4 and a dup of the read end at
    /// 5; process 20 inherited the read end at fd 3.
    fn harvest() -> Harvest {
        Harvest {
            tasks: vec![task(10, 10, 0x100), task(11, 10, 0x100), task(20, 20, 0x200)],
            fds: vec![
                pipe_fd(10, 0x100, 3, 0xa, true, 3),
                pipe_fd(10, 0x100, 4, 0xb, false, 1),
                pipe_fd(10, 0x100, 5, 0xa, true, 3),
                pipe_fd(20, 0x200, 3, 0xa, true, 3),
            ],
        }
        .dedup()
    }

    #[test]
    fn lists_who_holds_which_end_and_what_shares() {
        let listing = Listing::new(harvest(), &UnixQueues::new());
        assert_eq!(listing.processes.len(), 2);
        assert_eq!(listing.processes[0].threads, vec![Pid(10), Pid(11)]);
        let fds: Vec<u32> = listing.processes[0].fds.iter().map(|f| f.fd.0).collect();
        assert_eq!(fds, vec![3, 4, 5]);
        let h = |pid, fd| Holder { pid: Tgid(pid), fd: Fd(fd) };
        assert_eq!(listing.pipes.len(), 1);
        assert_eq!(listing.pipes[0].readers, vec![h(10, 3), h(10, 5), h(20, 3)]);
        assert_eq!(listing.pipes[0].writers, vec![h(10, 4)]);
        assert_eq!(listing.pipes[0].queued, Some(5));
        assert!(!listing.pipes[0].held_outside);
        assert_eq!(listing.shared_descriptions.len(), 1);
        assert_eq!(listing.shared_descriptions[0].holders, vec![h(10, 3), h(10, 5), h(20, 3)]);
        assert_eq!(listing.shared_fd_tables.len(), 1, "the two threads of 10 share a table");
        let text = listing.render_text();
        assert!(text.contains("pipe:[77]: read 10:3 10:5 20:3; write 10:4; 5 bytes queued"), "{text}");
        assert!(text.contains("PID 10 (2 threads: 10 11)"), "{text}");
    }

    /// A socket at `fd` of `tgid` (its own table and description), inode `ino`.
    fn socket_fd(tgid: u32, fd: u32, ino: u64, facts: SocketFacts) -> FdInfo {
        let mut f = testing::pipe_end(tgid, u64::from(tgid) << 8, fd, ino << 4, ino, true);
        f.file.access.write = true;
        f.file.flags = libc::O_RDWR as u32;
        f.file.pos = 0;
        f.file.object.mode = libc::S_IFSOCK | 0o777;
        f.file.object.dev = DeviceId { major: 0, minor: 8 };
        f.file.object.live = match facts.family {
            Family::Unix => Live::Unix(Box::new(facts)),
            _ => Live::Inet(Box::new(facts)),
        };
        f
    }

    fn unix(peer: Option<u64>) -> SocketFacts {
        SocketFacts {
            sock_type: SockType::Stream,
            state: if peer.is_some() { state::ESTABLISHED } else { state::CLOSE },
            peer,
            ..SocketFacts::unknown(Family::Unix)
        }
    }

    fn tcp(local: &str, remote: &str) -> SocketFacts {
        SocketFacts {
            sock_type: SockType::Stream,
            protocol: libc::IPPROTO_TCP as u16,
            state: state::ESTABLISHED,
            local: Some(local.parse().unwrap()),
            remote: Some(remote.parse().unwrap()),
            ..SocketFacts::unknown(Family::Inet)
        }
    }

    #[test]
    fn the_streamed_listing_is_the_rendered_table_or_the_json_document() {
        for harvest in [harvest(), sockets()] {
            let listing = Listing::new(harvest, &UnixQueues::new());
            let mut text = Vec::new();
            listing.write(&mut text, false).unwrap();
            assert_eq!(String::from_utf8(text).unwrap(), listing.render_text());
            let mut json = Vec::new();
            listing.write(&mut json, true).unwrap();
            assert_eq!(
                String::from_utf8(json).unwrap(),
                serde_json::to_string_pretty(&listing).unwrap() + "\n"
            );
        }
    }

    /// A row as `format!`'s padding lays it out: the header's widths, by characters.
    fn padded_row(p: &Process, f: &OpenFd) -> String {
        let fd = format!("{}{}", f.fd, mode_letter(f.access));
        let flags: String = flag_letters(f.close_on_exec, f.flags).collect();
        let offset =
            if f.kind.is_pipe_like() || f.kind.is_socket() { String::new() } else { f.offset.to_string() };
        let detail = f.detail.as_ref().map(|d| format!(" {d}")).unwrap_or_default();
        format!(
            "{:>7} {:<15} {fd:>6} {:<7} {flags:<5} {offset:>10} {:>6} {}{detail}\n",
            p.pid.0, p.comm, f.kind, f.description, f.name
        )
    }

    #[test]
    fn a_row_built_by_hand_is_laid_out_as_the_header_pads_it() {
        let listing = Listing::new(harvest(), &UnixQueues::new());
        let mut process = listing.processes[0].clone();
        let mut fd = process.fds[0].clone();
        let mut line = Line::default();
        // comm, fd (and PID / 7), kind, offset, description, detail, close-on-exec
        type Case<'a> = (&'a str, u32, Kind, i64, u32, Option<&'a str>, bool);
        let cases: [Case<'_>; 5] = [
            ("cat", 3, Kind::Pipe, 0, 7, None, false),
            ("ünïcødé-näme", 1_000_000, Kind::Regular, -1, 1_234_567, Some("count=7"), true),
            ("a-very-long-command-name", 12, Kind::Unix, 99, 3, Some("->10:3"), false),
            ("x", 0, Kind::CharDevice, i64::MAX, u32::MAX, None, true),
            ("", 7, Kind::Eventfd, 42, 12, Some("count=0 semaphore"), false),
        ];
        for (comm, number, kind, offset, description, detail, cloexec) in cases {
            process.pid = Tgid(number.wrapping_mul(7));
            process.comm = comm.into();
            fd.fd = Fd(number);
            fd.kind = kind;
            fd.offset = offset;
            fd.description = ObjRef(description);
            fd.detail = detail.map(String::from);
            fd.close_on_exec = cloexec;
            fd.flags = if cloexec { libc::O_NONBLOCK as u32 | libc::O_APPEND as u32 } else { 0 };
            line.row(&process, &fd);
            assert_eq!(line.text, padded_row(&process, &fd));
        }
    }

    #[test]
    fn a_failed_write_of_the_listing_is_the_write_error() {
        struct Closed;
        impl std::io::Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let listing = Listing::new(harvest(), &UnixQueues::new());
        for json in [false, true] {
            let e = listing.write(Closed, json).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "json {json}: {e}");
        }
    }

    /// 10:3 and 20:4 a socketpair, 10:5 and 20:6 a TCP connection over loopback, 10:7 a
    /// unix socket whose peer (inode 0x999) no listed process holds, 10:8 a TCP
    /// connection to elsewhere.
    fn sockets() -> Harvest {
        Harvest {
            tasks: vec![task(10, 10, 10 << 8), task(20, 20, 20 << 8)],
            fds: vec![
                socket_fd(10, 3, 0x701, unix(Some(0x702))),
                socket_fd(20, 4, 0x702, unix(Some(0x701))),
                socket_fd(10, 5, 0x801, tcp("127.0.0.1:1000", "127.0.0.1:2000")),
                socket_fd(20, 6, 0x802, tcp("127.0.0.1:2000", "127.0.0.1:1000")),
                socket_fd(10, 7, 0x703, unix(Some(0x999))),
                socket_fd(10, 8, 0x803, tcp("127.0.0.1:1001", "10.0.0.1:80")),
            ],
        }
    }

    #[test]
    fn a_connected_socket_names_the_pid_fd_of_its_other_end() {
        let h = |pid, fd| Holder { pid: Tgid(pid), fd: Fd(fd) };
        let mut queues = UnixQueues::new();
        queues.insert(
            (DeviceId { major: 0, minor: 8 }, 0x702),
            UnixQueue { bytes: Some(5006), fds_in_flight: Some(1) },
        );
        let listing = Listing::new(sockets(), &queues);
        let fd = |pid: usize, fd: u32| listing.processes[pid].fds.iter().find(|f| f.fd.0 == fd).unwrap();
        assert_eq!(fd(0, 3).peer, vec![h(20, 4)]);
        assert_eq!(fd(1, 4).peer, vec![h(10, 3)]);
        assert_eq!(fd(0, 5).peer, vec![h(20, 6)]);
        assert_eq!(fd(1, 6).peer, vec![h(10, 5)]);
        assert!(fd(0, 7).peer.is_empty() && fd(0, 8).peer.is_empty(), "other ends not listed");
        assert_eq!(&*fd(0, 3).name, format!("socket:[{}]", 0x701));
        assert_eq!(fd(0, 3).detail.as_deref(), Some("type=STREAM (CONNECTED) ->INO=1794 ->20:4"));
        assert_eq!(fd(0, 5).detail.as_deref(), Some("IPv4 ->20:6"));

        assert_eq!(listing.socket_pairs.len(), 2, "{:#?}", listing.socket_pairs);
        let [a, b] = &listing.socket_pairs[0].ends;
        assert_eq!((a.holders.as_slice(), b.holders.as_slice()), (&[h(10, 3)][..], &[h(20, 4)][..]));
        assert_eq!((b.queued, b.fds_in_flight), (Some(5006), Some(1)));
        assert_eq!((a.queued, a.fds_in_flight), (None, None));
        let [_, outside] = &listing.socket_pairs[1].ends;
        assert_eq!((outside.inode, &*outside.name), (None, "socket:[2457]"));

        let text = listing.render_text();
        for line in [
            "socket:[1793] 10:3 <-> socket:[1794] 20:4; to 10:3: bytes unknown, fds in flight unknown; to 20:4: 5006 bytes, 1 fd in flight",
            "socket:[1795] 10:7 <-> socket:[2457] (not listed)",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        // No offset for any socket kind.
        let row = text.lines().find(|l| l.contains("TCP 127.0.0.1:1000")).unwrap();
        assert!(!row.split_whitespace().any(|w| w == "0"), "{row}");
    }

    #[test]
    fn an_end_counted_by_the_kernel_but_not_listed_is_held_outside() {
        let mut harvest = harvest();
        for f in &mut harvest.fds {
            testing::pipe_live(f).writers = 2;
        }
        let listing = Listing::new(harvest, &UnixQueues::new());
        assert!(listing.pipes[0].held_outside);
        assert!(listing.render_text().contains("also open elsewhere"));
    }
}
