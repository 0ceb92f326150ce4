//! Graph: records → objref graph.
//!
//! linux-cr's nested sharing: an object shared by several users — an fd table shared by
//! threads, an open file description shared by dup'ed fds or across fork, an inode
//! (pipe, file...) shared by several descriptions — is saved once, where it is first
//! encountered, under a fresh [`ObjRef`]; every later encounter records only that
//! objref ([`Encounter::Again`], linux-cr's `CR_FD_OBJREF`). Walking the graph in order
//! therefore always meets an object's full record before any reference to it, which is
//! exactly the order restore needs to recreate each object once.
//!
//! Objrefs count from 1 in first-encounter order over a deterministic walk (processes
//! in tree order, threads by TID, fds by number), so the same state always gives the
//! same graph. This module knows nothing of BPF or /proc: it takes a [`Harvest`] and
//! the objects' saved states (each kind's, see [`crate::kinds`]).
use std::collections::BTreeMap;

// Kernel pointers are unique and well spread: SipHash's defence against chosen keys buys
// nothing here and cost a third of the graph's build time at 100,000 fds.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use serde::{Deserialize, Serialize};

use crate::{
    kinds::{InsideUse, Kind, Saved, Tie, decoding, socket::UnixName, terminal::PtyEnd},
    model::{Carried, FileInfo, Harvest, ObjectInfo, Saves, Session, TaskInfo},
    types::{Access, DeviceId, Fd, KernelPtr, ObjRef, Pid, Tgid},
};

/// Each object's saved state (with contents) and the files it carries, by the harvest's
/// object identity; objects without a state are sketched from what the harvest read.
pub type SavedStates = Saves;

/// The first encounter of an object carries it; later ones refer to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encounter<T> {
    First { objref: ObjRef, object: T },
    Again(ObjRef),
}

impl<T> Encounter<T> {
    pub fn objref(&self) -> ObjRef {
        match self {
            Encounter::First { objref, .. } | Encounter::Again(objref) => *objref,
        }
    }

    /// The object, on its first encounter.
    pub fn first(&self) -> Option<&T> {
        match self {
            Encounter::First { object, .. } => Some(object),
            Encounter::Again(_) => None,
        }
    }

    /// Whether two encounters share alike: both first encounters under the same objref
    /// of objects `same` finds equal, or both later references to the same objref.
    fn same_as(
        &self,
        other: &Self,
        what: &str,
        same: impl FnOnce(&T, &T) -> Result<(), String>,
    ) -> Result<(), String> {
        match (self, other) {
            (Encounter::Again(x), Encounter::Again(y)) if x == y => Ok(()),
            (Encounter::First { objref: x, object: a }, Encounter::First { objref: y, object: b })
                if x == y =>
            {
                same(a, b)
            }
            _ => Err(format!("{what} sharing differs")),
        }
    }
}

/// The checkpointed process tree and everything its fds reach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Graph {
    pub root: Tgid,
    /// Every thread, processes in tree order (parents first, siblings by PID), threads
    /// of a process by TID.
    pub tasks: Vec<Task>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub pid: Pid,
    #[serde(deserialize_with = "decoding::tgid")]
    pub tgid: Tgid,
    /// The real parent's PID (outside the graph for the root).
    pub parent: Tgid,
    pub comm: String,
    pub fd_table: Encounter<FdTable>,
    /// Its session, process group and controlling terminal, at checkpoint time (the
    /// old PIDs). (Format 5; unknown, all zero, in older images.)
    #[serde(deserialize_with = "decoding::since_v5")]
    pub session: Session,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdTable {
    /// By fd number.
    pub fds: Vec<FdSlot>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdSlot {
    #[serde(deserialize_with = "decoding::fd")]
    pub fd: Fd,
    pub close_on_exec: bool,
    pub file: Encounter<FileDesc>,
}

/// An open file description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDesc {
    /// Open flags (O_APPEND, O_NONBLOCK...), without O_CLOEXEC.
    pub flags: u32,
    pub access: Access,
    pub pos: i64,
    /// Also referenced from outside the checkpointed set (an fd of another process, an
    /// mmap...): the kernel counts more references than the set holds.
    pub held_outside: bool,
    /// Boxed: an object is encountered once, and a slot that only names it again (the
    /// other end of a pipe, every dup) then costs 16 bytes, not an object's size.
    pub object: Encounter<Box<Object>>,
}

/// The object a description opens: an inode, or an anon file's private object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    pub ino: u64,
    pub mode: u32,
    pub dev: DeviceId,
    pub rdev: DeviceId,
    /// Path of a named object (regular file, directory, FIFO, device, memfd, anon
    /// file), as /proc/PID/fd/N shows it.
    pub path: Option<String>,
    /// Some part of the object is open outside the checkpointed set beyond what its
    /// descriptions show (a pipe end another process holds): it cannot be reconnected
    /// from an image.
    pub held_outside: bool,
    /// The kind's own state (the kind is its variant).
    pub state: Saved,
    /// The objects it is tied to, one per [`Saved::ties`] in that order (a socket's
    /// peer, its listener), nested here on their first encounter as linux-cr nests a
    /// socket's peer; None: not in the checkpointed set. (Format 3.)
    #[serde(deserialize_with = "decoding::since_v3")]
    pub tied: Vec<Option<Encounter<Box<Object>>>>,
    /// The files it carries (fds in flight in a socket's queue), in the order its state
    /// names them. (Format 3.)
    #[serde(deserialize_with = "decoding::since_v3")]
    pub carried: Vec<Encounter<FileDesc>>,
}

impl Object {
    pub fn kind(&self) -> Kind {
        self.state.kind()
    }

    /// How `ls` and `inspect` name it: its path, or `kind:[ino]`.
    pub fn name(&self) -> String {
        match &self.path {
            Some(path) => path.clone(),
            // An unnamed unix socket is named as /proc/PID/fd/N and `ss` name it, by its
            // inode: its peer's detail (`->INO=N`) then points at a name in the listing.
            None if self.kind() == Kind::Unix => {
                self.state.name().unwrap_or_else(|| format!("socket:[{}]", self.ino))
            }
            None => self.state.name().unwrap_or_else(|| format!("{}:[{}]", self.kind(), self.ino)),
        }
    }

    /// Each tie with the objref of the object it found, in [`Saved::ties`] order (None:
    /// not in the graph). `ls` and `inspect` read peers and listeners through it, so
    /// they show the same pairing restore makes.
    pub fn ties(&self) -> Vec<(Tie, Option<ObjRef>)> {
        let ties = self.state.ties();
        let found = self.tied.iter().map(|t| t.as_ref().map(Encounter::objref));
        ties.into_iter().zip(found.chain(std::iter::repeat(None))).collect()
    }
}

/// What an objref is given for: an fd table by its kernel address, a description or an
/// object by its number in the walk (see [`Numbering`]).
#[derive(Clone, Copy, Debug)]
enum Key {
    FdTable(KernelPtr),
    File(usize),
    Object(usize),
}

/// linux-cr's objhash at checkpoint time: kernel identity → objref.
struct ObjHash {
    tables: HashMap<KernelPtr, ObjRef>,
    /// By description and by object number.
    files: Vec<Option<ObjRef>>,
    objects: Vec<Option<ObjRef>>,
    next: u32,
}

impl ObjHash {
    /// For the descriptions and objects `walk` numbered.
    fn for_walk(walk: &Walk<'_>) -> Self {
        ObjHash {
            tables: HashMap::new(),
            files: vec![None; walk.file_object.len()],
            objects: vec![None; walk.sources.len()],
            next: 0,
        }
    }

    /// Registers the object on first encounter (building it with `make`, which may
    /// register objects nested inside it) or refers to it.
    fn encounter<T>(&mut self, key: Key, make: impl FnOnce(&mut Self) -> T) -> Encounter<T> {
        let known = match key {
            Key::FdTable(table) => self.tables.get(&table).copied(),
            Key::File(at) => self.files[at],
            Key::Object(at) => self.objects[at],
        };
        if let Some(objref) = known {
            return Encounter::Again(objref);
        }
        self.next += 1;
        let objref = ObjRef(self.next);
        match key {
            Key::FdTable(table) => {
                self.tables.insert(table, objref);
            }
            Key::File(at) => self.files[at] = Some(objref),
            Key::Object(at) => self.objects[at] = Some(objref),
        }
        Encounter::First { objref, object: make(self) }
    }
}

/// Objects of a graph by objref, from their first encounters: one index for every
/// reader of a graph (restore, ls, inspect, tests).
#[derive(Default)]
pub struct GraphIndex<'g> {
    pub tables: ByObjRef<'g, FdTable>,
    pub files: ByObjRef<'g, FileDesc>,
    pub objects: ByObjRef<'g, Object>,
}

/// One class of a graph's objects by objref. Objrefs count from 1 in a graph, so a
/// vector indexed by the objref's number finds each in one step and iterates them in
/// objref order (a `BTreeMap` took a tenth of `ls`'s listing at 100,000 fds to build,
/// and more to search).
#[derive(Debug)]
pub struct ByObjRef<'g, T> {
    slots: Vec<Option<&'g T>>,
    len: usize,
}

impl<T> Default for ByObjRef<'_, T> {
    fn default() -> Self {
        Self { slots: Vec::new(), len: 0 }
    }
}

impl<'g, T> ByObjRef<'g, T> {
    fn insert(&mut self, objref: ObjRef, value: &'g T) {
        let at = objref.0 as usize;
        if at >= self.slots.len() {
            self.slots.resize(at + 1, None);
        }
        if self.slots[at].replace(value).is_none() {
            self.len += 1;
        }
    }

    pub fn get(&self, objref: &ObjRef) -> Option<&'g T> {
        self.slots.get(objref.0 as usize).copied().flatten()
    }

    pub fn contains_key(&self, objref: &ObjRef) -> bool {
        self.get(objref).is_some()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Each by objref, in objref order.
    pub fn iter(&self) -> impl Iterator<Item = (ObjRef, &'g T)> + '_ {
        self.slots.iter().enumerate().filter_map(|(at, slot)| Some((ObjRef(at as u32), (*slot)?)))
    }

    pub fn keys(&self) -> impl Iterator<Item = ObjRef> + '_ {
        self.iter().map(|(objref, _)| objref)
    }

    pub fn values(&self) -> impl Iterator<Item = &'g T> + '_ {
        self.iter().map(|(_, value)| value)
    }
}

impl<'g> GraphIndex<'g> {
    /// Indexes a description's first encounter, its object's, and whatever that object
    /// nests (tied objects, carried files).
    fn add_file(&mut self, file: &'g Encounter<FileDesc>) {
        let Encounter::First { objref, object: file } = file else { return };
        self.files.insert(*objref, file);
        self.add_object(&file.object);
    }

    fn add_object(&mut self, object: &'g Encounter<Box<Object>>) {
        let Encounter::First { objref, object } = object else { return };
        self.objects.insert(*objref, &**object);
        for tied in object.tied.iter().flatten() {
            self.add_object(tied);
        }
        for carried in &object.carried {
            self.add_file(carried);
        }
    }

    /// The description `file` and the objref and object it opens.
    pub fn open(&self, file: ObjRef) -> Option<(&'g FileDesc, ObjRef, &'g Object)> {
        let desc = self.files.get(&file)?;
        let objref = desc.object.objref();
        Some((desc, objref, self.objects.get(&objref)?))
    }
}

impl Graph {
    /// Builds the graph of `harvest`, rooted at `root`.
    /// `saved` is consumed: each state moves into its object (a pipe's queued bytes are
    /// not copied again).
    pub fn build(root: Tgid, harvest: &Harvest, saved: SavedStates) -> Graph {
        let mut walk = Walk::new(harvest, saved);
        // Each table's fds (by their place in the harvest), by fd number.
        let mut tables: HashMap<KernelPtr, Vec<usize>> = HashMap::with_capacity(harvest.tasks.len());
        for (at, f) in harvest.fds.iter().enumerate() {
            tables.entry(f.fd_table).or_default().push(at);
        }
        for fds in tables.values_mut() {
            fds.sort_by_key(|&at| harvest.fds[at].fd);
        }
        let mut objhash = ObjHash::for_walk(&walk);
        let tasks = tree_order(root, &harvest.tasks)
            .into_iter()
            .map(|t| Task {
                pid: t.pid,
                tgid: t.tgid,
                parent: t.parent,
                comm: t.comm.clone(),
                session: t.session,
                fd_table: objhash.encounter(Key::FdTable(t.fd_table), |objhash| FdTable {
                    fds: tables
                        .get(&t.fd_table)
                        .into_iter()
                        .flatten()
                        .map(|&at| {
                            let f = &harvest.fds[at];
                            let file = walk.fd_file[at];
                            FdSlot {
                                fd: f.fd,
                                close_on_exec: f.close_on_exec,
                                file: objhash.encounter(Key::File(file), |objhash| {
                                    walk.file_desc(&f.file, file, objhash)
                                }),
                            }
                        })
                        .collect(),
                }),
            })
            .collect();
        Graph { root, tasks }
    }

    /// Every fd slot with the task that first shows it: (task, slot). Threads sharing a
    /// table are listed once, under the first of them.
    pub fn slots(&self) -> impl Iterator<Item = (&Task, &FdSlot)> {
        self.tasks
            .iter()
            .filter_map(|t| t.fd_table.first().map(|table| (t, table)))
            .flat_map(|(t, table)| table.fds.iter().map(move |slot| (t, slot)))
    }

    /// Whether encoding the graph reads contents from the targets' objects.
    pub fn streams_contents(&self) -> bool {
        self.index().objects.values().any(|o| o.state.streams())
    }

    /// Every object by objref, from its first encounter.
    pub fn index(&self) -> GraphIndex<'_> {
        let mut index = GraphIndex::default();
        for task in &self.tasks {
            let Encounter::First { objref, object: table } = &task.fd_table else { continue };
            index.tables.insert(*objref, table);
            for slot in &table.fds {
                index.add_file(&slot.file);
            }
        }
        index
    }

    /// Each object's users, by objref: for a file or inode, the (process, fd) slots that
    /// reach it; for an fd table, the threads that share it.
    pub fn users(&self) -> BTreeMap<ObjRef, Vec<(Pid, Option<Fd>)>> {
        let mut users: BTreeMap<ObjRef, Vec<(Pid, Option<Fd>)>> = BTreeMap::new();
        let mut inode_of_file: HashMap<ObjRef, ObjRef> = HashMap::new();
        for t in &self.tasks {
            users.entry(t.fd_table.objref()).or_default().push((t.pid, None));
        }
        for (_, slot) in self.slots() {
            if let Encounter::First { objref, object } = &slot.file {
                inode_of_file.insert(*objref, object.object.objref());
            }
        }
        for (t, slot) in self.slots() {
            let file = slot.file.objref();
            users.entry(file).or_default().push((t.pid, Some(slot.fd)));
            if let Some(inode) = inode_of_file.get(&file) {
                users.entry(*inode).or_default().push((t.pid, Some(slot.fd)));
            }
        }
        users
    }

    /// Objects shared with processes outside the set, one line each, for warnings.
    pub fn held_outside(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (t, slot) in self.slots() {
            let Encounter::First { objref, object: file } = &slot.file else {
                continue;
            };
            if let Encounter::First { objref: object_ref, object } = &file.object
                && object.held_outside
            {
                out.push(format!(
                    "{} {object_ref} (first seen at PID {} fd {}) has an end open outside the checkpointed processes",
                    object.kind(),
                    t.tgid,
                    slot.fd
                ));
            }
            if file.held_outside {
                out.push(format!(
                    "open file {objref} (PID {} fd {}) is also held outside the checkpointed processes",
                    t.tgid, slot.fd
                ));
            }
        }
        out
    }
}

impl Graph {
    /// Whether `other` is the same state up to renaming: the same tree shape (by
    /// position, since restored processes get new PIDs), thread counts, fd numbers,
    /// close-on-exec bits, kinds, flags, offsets, paths, pipe capacities and queued bytes,
    /// and the same sharing (objrefs, which number objects in walk order, must match).
    /// Inode numbers of pipes (new pipes get new ones) and whether a description is held
    /// outside (a reopened file is not) are not compared. Returns the first difference.
    pub fn same_shape(&self, other: &Graph) -> Result<(), String> {
        if self.tasks.len() != other.tasks.len() {
            return Err(format!("{} tasks vs {}", self.tasks.len(), other.tasks.len()));
        }
        let position = |g: &Graph| -> HashMap<Tgid, usize> {
            let mut map = HashMap::new();
            for t in &g.tasks {
                let next = map.len();
                map.entry(t.tgid).or_insert(next);
            }
            map
        };
        let (pa, pb) = (position(self), position(other));
        for (i, (a, b)) in self.tasks.iter().zip(&other.tasks).enumerate() {
            let here = format!("task #{i} (PID {} vs {})", a.pid, b.pid);
            if pa.get(&a.tgid) != pb.get(&b.tgid) {
                return Err(format!("{here}: belongs to another process"));
            }
            if pa.get(&a.parent) != pb.get(&b.parent) {
                return Err(format!("{here}: another parent"));
            }
            if a.comm != b.comm {
                return Err(format!("{here}: comm {:?} vs {:?}", a.comm, b.comm));
            }
            // Sessions and groups by position, where the original's leader is in the
            // graph (the root stub otherwise leads a session of its own).
            let led = |g: &HashMap<Tgid, usize>, id: u32| g.get(&Tgid(id)).copied();
            for (what, x, y) in [
                ("session", a.session.sid, b.session.sid),
                ("process group", a.session.pgid, b.session.pgid),
                ("foreground group", a.session.foreground, b.session.foreground),
            ] {
                if let Some(leader) = led(&pa, x)
                    && led(&pb, y) != Some(leader)
                {
                    return Err(format!("{here}: {what} led by process #{leader} vs {:?}", led(&pb, y)));
                }
            }
            if led(&pa, a.session.sid).is_some() && a.session.tty.is_some() != b.session.tty.is_some() {
                return Err(format!(
                    "{here}: controlling terminal {:?} vs {:?}",
                    a.session.tty, b.session.tty
                ));
            }
            a.fd_table.same_as(&b.fd_table, "fd table", same_table).map_err(|e| format!("{here}: {e}"))?;
        }
        Ok(())
    }
}

fn same_table(a: &FdTable, b: &FdTable) -> Result<(), String> {
    let fds = |t: &FdTable| t.fds.iter().map(|s| s.fd.0).collect::<Vec<_>>();
    if fds(a) != fds(b) {
        return Err(format!("fds {:?} vs {:?}", fds(a), fds(b)));
    }
    for (x, y) in a.fds.iter().zip(&b.fds) {
        let here = format!("fd {}", x.fd);
        if x.close_on_exec != y.close_on_exec {
            return Err(format!("{here}: close-on-exec {} vs {}", x.close_on_exec, y.close_on_exec));
        }
        x.file.same_as(&y.file, "open file", same_file).map_err(|e| format!("{here}: {e}"))?;
    }
    Ok(())
}

fn same_file(a: &FileDesc, b: &FileDesc) -> Result<(), String> {
    if (a.flags, a.access, a.pos) != (b.flags, b.access, b.pos) {
        return Err(format!(
            "flags/access/offset {:o}/{}/{} vs {:o}/{}/{}",
            a.flags, a.access, a.pos, b.flags, b.access, b.pos
        ));
    }
    a.object.same_as(&b.object, "object", |a, b| same_object(a, b))
}

fn same_object(a: &Object, b: &Object) -> Result<(), String> {
    // A pty comes back under another index: another path and device number.
    let named = |o: &Object| o.kind().stable_name().then(|| (o.path.clone(), o.rdev));
    if (a.kind(), a.mode, named(a)) != (b.kind(), b.mode, named(b)) {
        return Err(format!(
            "{} {:o} {:?} vs {} {:o} {:?}",
            a.kind(),
            a.mode,
            a.path,
            b.kind(),
            b.mode,
            b.path
        ));
    }
    if a.kind().same_inode() && (a.ino, a.dev) != (b.ino, b.dev) {
        return Err(format!("inode {} on {} vs {} on {}", a.ino, a.dev, b.ino, b.dev));
    }
    if a.held_outside != b.held_outside {
        return Err(format!("held outside: {} vs {}", a.held_outside, b.held_outside));
    }
    a.state.same(&b.state)?;
    // What is nested here is compared here: a socket's peer, first met inside this
    // object, is only referenced by its own fd later (its queue would go unchecked),
    // and the files in flight appear in no fd table at all.
    if a.tied.len() != b.tied.len() {
        return Err(format!("{} tied objects vs {}", a.tied.len(), b.tied.len()));
    }
    for (i, (x, y)) in a.tied.iter().zip(&b.tied).enumerate() {
        match (x, y) {
            (None, None) => {}
            (Some(x), Some(y)) => x
                .same_as(y, "tied object", |a, b| same_object(a, b))
                .map_err(|e| format!("tied object {i}: {e}"))?,
            _ => return Err(format!("tied object {i}: inside the set in one graph only")),
        }
    }
    if a.carried.len() != b.carried.len() {
        return Err(format!("{} files in flight vs {}", a.carried.len(), b.carried.len()));
    }
    for (i, (x, y)) in a.carried.iter().zip(&b.carried).enumerate() {
        x.same_as(y, "file in flight", same_file).map_err(|e| format!("file in flight {i}: {e}"))?;
    }
    Ok(())
}

/// Where the walk finds an object's record: an fd's, borrowed from the harvest (with
/// what /proc/PID/fd/N linked to), or a file in flight's, held by the walk.
#[derive(Clone, Copy)]
enum Source<'h> {
    Fd(&'h ObjectInfo, Option<&'h String>),
    InFlight(usize),
}

/// Numbers for the harvest's descriptions and objects, in order of first appearance
/// (fds first, then files in flight): what the walk knows of each sits in vectors
/// indexed by them. Each kernel address is hashed once, when numbered, not once per
/// map per fd (seven maps keyed by address were half a graph's build at 100,000 fds).
struct Numbering {
    files: HashMap<KernelPtr, usize>,
    objects: HashMap<KernelPtr, usize>,
    /// Each description's object number.
    file_object: Vec<usize>,
}

impl Numbering {
    /// The number of the description `file`, numbering it and its object on first
    /// sight; and whether its object was new (its record is then the caller's to keep).
    fn description(&mut self, file: &FileInfo) -> (usize, bool) {
        let next = self.files.len();
        let at = *self.files.entry(file.id).or_insert(next);
        if at != next {
            return (at, false);
        }
        let next_object = self.objects.len();
        let object = *self.objects.entry(file.object.id).or_insert(next_object);
        self.file_object.push(object);
        (at, object == next_object)
    }
}

/// What the walk looks objects up in: every object of the harvest (and every file in
/// flight) with its state, so that an object can nest the objects it is tied to.
struct Walk<'h> {
    /// Each fd's description number, in harvest order; each description's object number.
    fd_file: Vec<usize>,
    file_object: Vec<usize>,
    /// Each object's record.
    sources: Vec<Source<'h>>,
    /// Each object's state, taken by its first encounter.
    states: Vec<Option<Saved>>,
    /// How many fd slots inside the set hold each description, and how many distinct
    /// read and write descriptions inside the set open each object: to compare with
    /// what the kernel counts (linux-cr's leak check).
    slots_inside: Vec<u64>,
    use_inside: Vec<InsideUse>,
    /// Objects by (kind, inode number), for [`Tie::Peer`]: made on the first look-up
    /// (only sockets have peers; a listing of pipes never needs it).
    by_inode: Option<HashMap<(Kind, u64), usize>>,
    /// Listeners by name, for [`Tie::Listener`].
    listeners: HashMap<UnixName, usize>,
    /// Sockets by the address they are bound at, for [`Tie::Address`].
    bound: HashMap<std::net::SocketAddr, usize>,
    /// Pty ends by index and end, for [`Tie::Pty`].
    ptys: HashMap<PtyEnd, usize>,
    /// Every file in flight, with its description number; each carrier's, by the
    /// carrier's kernel address, in the order its state names them.
    in_flight: Vec<(Carried, usize)>,
    carried: HashMap<KernelPtr, std::ops::Range<usize>>,
    /// Every checkpointed task (TID), for the objects that refer to one (a pidfd).
    tasks: HashSet<Pid>,
}

impl<'h> Walk<'h> {
    fn new(harvest: &'h Harvest, saves: Saves) -> Self {
        let Saves { states: mut saved, carried } = saves;
        let fds = harvest.fds.len();
        let mut numbering = Numbering {
            files: HashMap::with_capacity(fds),
            objects: HashMap::with_capacity(fds),
            file_object: Vec::with_capacity(fds),
        };
        let (mut fd_file, mut sources) = (Vec::with_capacity(fds), Vec::with_capacity(fds));
        for f in &harvest.fds {
            let (file, new_object) = numbering.description(&f.file);
            fd_file.push(file);
            if new_object {
                sources.push(Source::Fd(&f.file.object, f.link.as_ref()));
            }
        }
        let fd_objects = sources.len();
        // Carriers in address order, so that the numbering does not depend on a map's.
        let mut carriers: Vec<(KernelPtr, Vec<Carried>)> = carried.into_iter().collect();
        carriers.sort_by_key(|(carrier, _)| *carrier);
        // A file carried by an object that holds no reference to it (an epoll's target)
        // is not counted as a slot: the kernel's count of the description does not
        // include it.
        let held = |carrier: &KernelPtr| saved.get(carrier).is_none_or(|s| s.kind().holds_carried());
        let mut in_flight = Vec::new();
        let mut carried = HashMap::new();
        let mut held_in_flight = Vec::new();
        for (carrier, files) in carriers {
            let start = in_flight.len();
            let counted = held(&carrier);
            for c in files {
                let (file, new_object) = numbering.description(&c.file);
                if new_object {
                    sources.push(Source::InFlight(in_flight.len()));
                }
                held_in_flight.push(counted);
                in_flight.push((c, file));
            }
            carried.insert(carrier, start..in_flight.len());
        }
        let file_object = numbering.file_object;
        // Every fd slot, and every file in flight inside an object of the set (the kernel
        // counts the message's reference too).
        let mut slots_inside = vec![0; file_object.len()];
        let mut use_inside = vec![InsideUse::default(); sources.len()];
        let mut seen = vec![false; file_object.len()];
        let files = harvest.fds.iter().zip(&fd_file).map(|(f, &file)| (&f.file, file, true));
        let files = files
            .chain(in_flight.iter().zip(&held_in_flight).map(|((c, file), &held)| (&c.file, *file, held)));
        for (info, file, slot) in files {
            if slot {
                slots_inside[file] += 1;
            }
            if !std::mem::replace(&mut seen[file], true) {
                let inside = &mut use_inside[file_object[file]];
                inside.readers += info.access.read as u32;
                inside.writers += info.access.write as u32;
            }
        }
        let (mut listeners, mut bound, mut ptys) = (HashMap::new(), HashMap::new(), HashMap::new());
        let mut states = Vec::with_capacity(sources.len());
        for (object, source) in sources.iter().enumerate() {
            let info = match *source {
                Source::Fd(info, _) => info,
                Source::InFlight(at) => &in_flight[at].0.file.object,
            };
            let state = saved.remove(&info.id).unwrap_or_else(|| info.live.sketch());
            if object < fd_objects {
                if let Some(name) = state.listens_at() {
                    listeners.insert(name.clone(), object);
                }
                if let Some(addr) = state.bound_at() {
                    // Several sockets may share an address (SO_REUSEPORT): any one sends.
                    bound.entry(addr).or_insert(object);
                }
            }
            if let Some(end) = state.pty_end() {
                ptys.entry(end).or_insert(object);
            }
            states.push(Some(state));
        }
        let tasks = harvest.tasks.iter().map(|t| t.pid).collect();
        Walk {
            fd_file,
            file_object,
            sources,
            states,
            slots_inside,
            use_inside,
            by_inode: None,
            listeners,
            bound,
            ptys,
            in_flight,
            carried,
            tasks,
        }
    }

    /// The object's record.
    fn info(&self, object: usize) -> &ObjectInfo {
        match self.sources[object] {
            Source::Fd(info, _) => info,
            Source::InFlight(at) => &self.in_flight[at].0.file.object,
        }
    }

    /// What /proc/PID/fd/N linked to for the object, from an fd or a file in flight.
    fn link(&self, object: usize) -> Option<String> {
        match self.sources[object] {
            Source::Fd(_, link) => link.cloned(),
            Source::InFlight(at) => self.in_flight[at].0.link.clone(),
        }
    }

    /// The object of `kind` with inode number `ino` (an fd's before a file in flight's).
    fn by_inode(&mut self, kind: Kind, ino: u64) -> Option<usize> {
        if self.by_inode.is_none() {
            let mut by_inode = HashMap::with_capacity(self.sources.len());
            for object in 0..self.sources.len() {
                let info = self.info(object);
                by_inode.entry((info.kind(), info.ino)).or_insert(object);
            }
            self.by_inode = Some(by_inode);
        }
        self.by_inode.as_ref().and_then(|by_inode| by_inode.get(&(kind, ino)).copied())
    }

    /// The description `file` (numbered `at`), on its first encounter.
    fn file_desc(&mut self, file: &FileInfo, at: usize, objhash: &mut ObjHash) -> FileDesc {
        let object = self.file_object[at];
        FileDesc {
            flags: file.flags,
            access: file.access,
            pos: file.pos,
            held_outside: file.refs > self.slots_inside[at],
            object: objhash.encounter(Key::Object(object), |objhash| {
                Box::new(self.object(&file.object, object, objhash))
            }),
        }
    }

    /// An object's record (`o`, numbered `at`), on its first encounter: its state, then
    /// the objects it is tied to and the files it carries, each encountered in turn.
    fn object(&mut self, o: &ObjectInfo, at: usize, objhash: &mut ObjHash) -> Object {
        let kind = o.kind();
        let state = self.states[at].take().unwrap_or_else(|| o.live.sketch());
        let mut found = Vec::new();
        let tied = state
            .ties()
            .iter()
            .map(|tie| {
                let target = match tie {
                    Tie::Peer(ino) => self.by_inode(kind, *ino),
                    Tie::Listener(name) => self.listeners.get(name).copied().filter(|&t| t != at),
                    Tie::Address(addr) => self.bound.get(addr).copied().filter(|&t| t != at),
                    Tie::Pty(end) => self.ptys.get(end).copied().filter(|&t| t != at),
                };
                found.push(target.is_some());
                let target = target?;
                Some(objhash.encounter(Key::Object(target), |objhash| {
                    let info = match self.sources[target] {
                        Source::Fd(info, _) => std::borrow::Cow::Borrowed(info),
                        Source::InFlight(k) => {
                            std::borrow::Cow::Owned(self.in_flight[k].0.file.object.clone())
                        }
                    };
                    Box::new(self.object(&info, target, objhash))
                }))
            })
            .collect();
        let carried_files = self.carried.get(&o.id).cloned().unwrap_or_default();
        let carried = carried_files
            .map(|k| {
                let (c, file) = &self.in_flight[k];
                let (c, file) = (c.file.clone(), *file);
                objhash.encounter(Key::File(file), |objhash| self.file_desc(&c, file, objhash))
            })
            .collect();
        let inside = self.use_inside[at];
        Object {
            ino: o.ino,
            mode: o.mode,
            dev: o.dev,
            rdev: o.rdev,
            // Only a kind with a path keeps its link: no copy for the others.
            path: if kind.has_path() { self.link(at) } else { None },
            // A pidfd to a process outside the set: the task it refers to is not
            // restored, so it cannot be made.
            held_outside: o.live.held_outside(inside)
                || state.outside_unless_tied(&found)
                || state.task().is_some_and(|t| !self.tasks.contains(&t)),
            state,
            tied,
            carried,
        }
    }
}

/// Tasks in the graph's order: processes depth-first from `root` (children by PID),
/// then any process whose parent is not in the set; threads of a process by TID.
fn tree_order(root: Tgid, tasks: &[TaskInfo]) -> Vec<&TaskInfo> {
    let mut threads: BTreeMap<Tgid, Vec<&TaskInfo>> = BTreeMap::new();
    for t in tasks {
        threads.entry(t.tgid).or_default().push(t);
    }
    for list in threads.values_mut() {
        // The group leader (pid == tgid) first, then by TID.
        list.sort_by_key(|t| (t.pid.0 != t.tgid.0, t.pid));
    }
    let mut children: BTreeMap<Tgid, Vec<Tgid>> = BTreeMap::new();
    for (tgid, list) in &threads {
        if *tgid != root {
            children.entry(list[0].parent).or_default().push(*tgid);
        }
    }
    let mut order: Vec<&TaskInfo> = Vec::new();
    let mut seen = HashSet::new();
    // Depth-first from the root, then from every process not reached (its parent is
    // outside the set), by PID.
    for start in std::iter::once(root).chain(threads.keys().copied()) {
        let mut stack = vec![start];
        while let Some(tgid) = stack.pop() {
            if !seen.insert(tgid) {
                continue;
            }
            order.extend(threads.get(&tgid).into_iter().flatten());
            if let Some(kids) = children.get(&tgid) {
                stack.extend(kids.iter().rev());
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_by_objref_finds_each_and_lists_them_in_objref_order() {
        let (a, b, c) = (10, 20, 30);
        let mut index: ByObjRef<'_, u32> = ByObjRef::default();
        assert!(index.is_empty() && index.get(&ObjRef(0)).is_none());
        index.insert(ObjRef(7), &b);
        index.insert(ObjRef(2), &a);
        index.insert(ObjRef(9), &c);
        index.insert(ObjRef(7), &b);
        assert_eq!(index.len(), 3, "an objref inserted twice counts once");
        assert_eq!(index.get(&ObjRef(2)), Some(&10));
        assert_eq!(index.get(&ObjRef(3)), None, "a gap");
        assert_eq!(index.get(&ObjRef(100)), None, "past the end");
        assert!(index.contains_key(&ObjRef(9)));
        assert_eq!(index.keys().collect::<Vec<_>>(), vec![ObjRef(2), ObjRef(7), ObjRef(9)]);
        assert_eq!(index.values().copied().collect::<Vec<_>>(), vec![10, 20, 30]);
    }
    use crate::{
        kinds::pipe::PipeState,
        model::testing::{pipe_end, pipe_live, task},
    };

    /// A parent (two threads) holding both ends of a pipe, the read end dup'ed to fd 5,
    /// and a child holding the read end across fork.
    fn family() -> Harvest {
        let mut child_end = pipe_end(20, 0x200, 3, 0xf1, 0x100, true);
        child_end.file.refs = 3;
        let mut parent_read = pipe_end(10, 0x100, 3, 0xf1, 0x100, true);
        parent_read.file.refs = 3;
        let mut parent_dup = parent_read.clone();
        parent_dup.fd = Fd(5);
        Harvest {
            tasks: vec![task(20, 20, 10, 0x200), task(11, 10, 1, 0x100), task(10, 10, 1, 0x100)],
            fds: vec![child_end, parent_dup, pipe_end(10, 0x100, 4, 0xf2, 0x100, false), parent_read],
        }
    }

    #[test]
    fn shared_objects_are_saved_once_then_referenced() {
        let g = Graph::build(Tgid(10), &family(), SavedStates::default());
        let order: Vec<u32> = g.tasks.iter().map(|t| t.pid.0).collect();
        assert_eq!(order, [10, 11, 20], "leader, its thread, then the child");
        // Thread 11 shares the leader's table: only an objref.
        assert_eq!(g.tasks[0].fd_table.objref(), ObjRef(1));
        assert_eq!(g.tasks[1].fd_table, Encounter::Again(ObjRef(1)));
        let table = g.tasks[0].fd_table.first().unwrap();
        let fds: Vec<u32> = table.fds.iter().map(|s| s.fd.0).collect();
        assert_eq!(fds, [3, 4, 5]);
        // fd 3: file #2 with pipe inode #3 (first encounters, nested).
        let file = table.fds[0].file.first().expect("first encounter of the read end");
        assert_eq!(table.fds[0].file.objref(), ObjRef(2));
        assert_eq!(file.object.objref(), ObjRef(3));
        // fd 4: the write end is a new file #4 on the same inode #3.
        let write_end = table.fds[1].file.first().unwrap();
        assert_eq!(table.fds[1].file.objref(), ObjRef(4));
        assert_eq!(write_end.object, Encounter::Again(ObjRef(3)));
        // fd 5 (dup of 3): the same description.
        assert_eq!(table.fds[2].file, Encounter::Again(ObjRef(2)));
        // The child: its own table #5, the inherited description #2.
        let child = g.tasks[2].fd_table.first().unwrap();
        assert_eq!(g.tasks[2].fd_table.objref(), ObjRef(5));
        assert_eq!(child.fds[0].file, Encounter::Again(ObjRef(2)));
        assert!(g.held_outside().is_empty(), "{:?}", g.held_outside());
    }

    #[test]
    fn numbering_does_not_depend_on_record_order() {
        let mut shuffled = family();
        shuffled.tasks.reverse();
        shuffled.fds.rotate_left(2);
        assert_eq!(
            Graph::build(Tgid(10), &family(), SavedStates::default()),
            Graph::build(Tgid(10), &shuffled, SavedStates::default())
        );
    }

    #[test]
    fn a_pipe_end_held_outside_is_marked() {
        let mut h = family();
        // The kernel counts two writers; the set holds one write description.
        for f in &mut h.fds {
            pipe_live(f).writers = 2;
        }
        let g = Graph::build(Tgid(10), &h, SavedStates::default());
        let table = g.tasks[0].fd_table.first().unwrap();
        let object = table.fds[0].file.first().unwrap().object.first().unwrap();
        assert!(object.held_outside);
        assert_eq!(g.held_outside().len(), 1);
    }

    #[test]
    fn a_description_with_more_kernel_references_is_held_outside() {
        let mut h = family();
        for f in h.fds.iter_mut().filter(|f| f.file.id == KernelPtr(0xf1)) {
            f.file.refs = 4; // three slots in the set, one more somewhere else
        }
        let g = Graph::build(Tgid(10), &h, SavedStates::default());
        let file = g.tasks[0].fd_table.first().unwrap().fds[0].file.first().unwrap();
        assert!(file.held_outside);
        let write_end = g.tasks[0].fd_table.first().unwrap().fds[1].file.first().unwrap();
        assert!(!write_end.held_outside);
    }

    #[test]
    fn pipe_contents_go_with_the_inode() {
        let mut saved = SavedStates::default();
        let state = PipeState { capacity: 65536, data: b"queued".to_vec() };
        saved.states.insert(KernelPtr(0x100), Saved::Pipe(state.clone()));
        let g = Graph::build(Tgid(10), &family(), saved);
        let object =
            g.tasks[0].fd_table.first().unwrap().fds[0].file.first().unwrap().object.first().unwrap();
        assert_eq!(object.state, Saved::Pipe(state));
    }

    #[test]
    fn users_lists_every_slot_of_a_shared_object() {
        let g = Graph::build(Tgid(10), &family(), SavedStates::default());
        let users = g.users();
        assert_eq!(users[&ObjRef(1)], vec![(Pid(10), None), (Pid(11), None)]);
        assert_eq!(
            users[&ObjRef(2)],
            vec![(Pid(10), Some(Fd(3))), (Pid(10), Some(Fd(5))), (Pid(20), Some(Fd(3)))]
        );
        assert_eq!(users[&ObjRef(3)].len(), 4, "every end of the pipe");
    }
}
