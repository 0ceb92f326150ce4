//! The restore plan: which stubs to make, in which tree, with which fds — pure data,
//! computed from the graph and checked before anything is created.
// Objrefs and PIDs are small integers: a fast hasher, not SipHash.
use foldhash::{HashMap, HashMapExt};

use crate::{
    graph::{Encounter, Graph},
    kinds::{Saved, terminal::End},
    model::Session,
    types::{Fd, ObjRef, Pid, Tgid},
};

/// Where the restored objects come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Recreated from an image: only kinds crd can recreate, and no pipe whose other end
    /// was outside the checkpoint unless `allow_external`.
    Image { allow_external: bool },
    /// Handed over from a live process: the very same objects, any kind.
    Graft,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("the image holds no task")]
    Empty,
    /// Every fd holding an object crd cannot make, grouped by why, on one line.
    #[error("{}", .0.join("; "))]
    Unsupported(Vec<String>),
    #[error(
        "{}: the other end was held outside the checkpointed processes and cannot be reconnected from an image; use `crd graft` on the live process, or --allow-external to recreate it disconnected",
        .0.join(", ")
    )]
    External(Vec<String>),
    #[error(
        "PID {0} shares its fd table with a process that is not its parent; crd restores CLONE_FILES sharing only between parent and child"
    )]
    ForeignTableSharing(Tgid),
    #[error("the image is inconsistent: {0}")]
    Inconsistent(String),
}

/// One fd to install in a stub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdPlan {
    pub fd: Fd,
    pub close_on_exec: bool,
    /// The open file description (its objref).
    pub file: ObjRef,
}

/// Whose fd table a stub fills.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TablePlan {
    /// Its own table, with these fds (by number).
    Own(Vec<FdPlan>),
    /// Its parent's table, shared (CLONE_FILES): the parent fills it.
    SharedWithParent,
}

/// One stub process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessPlan {
    pub old_tgid: Tgid,
    /// Index of the parent stub (None for the root).
    pub parent: Option<usize>,
    /// Indices of the child stubs, in creation order (ascending old PID), so new PIDs
    /// come out in the same order as the old ones.
    pub children: Vec<usize>,
    /// Every thread: old TID and comm, the leader first. Threads share the process's fd
    /// table, as they did: a stub process with as many threads.
    pub threads: Vec<(Pid, String)>,
    pub table: TablePlan,
    /// Its session, process group and controlling terminal.
    pub job: JobPlan,
}

/// How a stub recreates its place in job control (`setsid`, `setpgid`, TIOCSCTTY,
/// TIOCSPGRP), decided here so that a stub only does what can work: a session is
/// inherited, so a process that led its session makes a new one (`setsid`) before it
/// forks its children, and the others are in it by birth; a process group lives inside
/// one session, so the members of a group join the stub that made it (a stub can only
/// join a group of its own session: where the original's session leader is not in the
/// image, its processes share the root stub's session).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobPlan {
    /// It led its session: `setsid` first.
    pub leads_session: bool,
    pub group: Group,
    /// A session leader whose controlling terminal was a pty of the image: it takes the
    /// restored slave (an image restore only; a graft's live pty still controls the
    /// original's session).
    pub ctty: Option<Ctty>,
}

/// A stub's process group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Group {
    /// Stays in the group it has (after `setsid` if it leads its session; the root
    /// stub's, crd's own or its new session's); others of its old group join it.
    #[default]
    Keep,
    /// Makes a group of its own (`setpgid(0, 0)`) that others of its old group join.
    Create,
    /// Joins the group of that stub (by plan index).
    Join(usize),
}

/// The controlling terminal a session leader takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ctty {
    /// A description of the pty slave (crd publishes it like any other).
    pub file: ObjRef,
    /// The stub whose group was the terminal's foreground group (None: not in the image).
    pub foreground: Option<usize>,
}

/// The whole restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// In the graph's order: the root first, parents before children.
    pub processes: Vec<ProcessPlan>,
    /// The highest fd number any stub needs (crd parks its own fds above it).
    pub max_fd: u32,
    /// What of job control cannot be recreated, one line each, for warnings.
    pub warnings: Vec<String>,
}

impl Plan {
    /// The highest objref of a description any stub pulls.
    pub fn max_objref(&self) -> ObjRef {
        self.processes
            .iter()
            .filter_map(|p| match &p.table {
                TablePlan::Own(fds) => fds.iter().map(|f| f.file).max(),
                TablePlan::SharedWithParent => None,
            })
            .chain(self.processes.iter().filter_map(|p| p.job.ctty.map(|c| c.file)))
            .max()
            .unwrap_or(ObjRef(0))
    }
}

/// Plans the restore of `graph`.
pub fn plan(graph: &Graph, mode: Mode) -> Result<Plan, PlanError> {
    if graph.tasks.is_empty() {
        return Err(PlanError::Empty);
    }
    check_objects(graph, mode)?;
    let mut index: HashMap<Tgid, usize> = HashMap::new();
    let mut processes: Vec<ProcessPlan> = Vec::new();
    let mut tables: HashMap<ObjRef, usize> = HashMap::new();
    let mut max_fd = 2;
    let mut sessions: Vec<Session> = Vec::new();
    for task in &graph.tasks {
        if let Some(&i) = index.get(&task.tgid) {
            processes[i].threads.push((task.pid, task.comm.clone()));
            continue;
        }
        let i = processes.len();
        let parent = index.get(&task.parent).copied();
        let table = match &task.fd_table {
            Encounter::First { objref, object } => {
                tables.insert(*objref, i);
                let fds: Vec<FdPlan> = object
                    .fds
                    .iter()
                    .map(|s| FdPlan { fd: s.fd, close_on_exec: s.close_on_exec, file: s.file.objref() })
                    .collect();
                max_fd = fds.iter().map(|f| f.fd.0).fold(max_fd, u32::max);
                TablePlan::Own(fds)
            }
            Encounter::Again(objref) => match (tables.get(objref), parent) {
                (Some(&owner), Some(p)) if owner == p => TablePlan::SharedWithParent,
                (Some(_), _) => return Err(PlanError::ForeignTableSharing(task.tgid)),
                (None, _) => {
                    return Err(PlanError::Inconsistent(format!(
                        "PID {} refers to an unknown fd table",
                        task.tgid
                    )));
                }
            },
        };
        if let Some(p) = parent {
            processes[p].children.push(i);
        }
        index.insert(task.tgid, i);
        processes.push(ProcessPlan {
            old_tgid: task.tgid,
            parent,
            children: Vec::new(),
            threads: vec![(task.pid, task.comm.clone())],
            table,
            job: JobPlan::default(),
        });
        sessions.push(task.session);
    }
    let warnings = plan_jobs(graph, mode, &sessions, &mut processes);
    Ok(Plan { processes, max_fd, warnings })
}

/// Which session a stub is in: the one made by the stub of the old session's leader, or
/// the root stub's (the old leader is not in the image).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum SessionKey {
    Led(u32),
    Root,
}

/// Fills in each stub's [`JobPlan`] from the old sessions (`sessions[i]` is process
/// `i`'s); returns what cannot be recreated. An image without sessions (format 4 or
/// older) leaves every stub as it is forked.
///
/// A session and a group are known apart: session 0 is real (the session of a boot's
/// first process, and of every process under an init that never called `setsid`, as in
/// a VM or a container whose session leader is outside its PID namespace), and a
/// process there may still have made a group of its own.
fn plan_jobs(graph: &Graph, mode: Mode, sessions: &[Session], processes: &mut [ProcessPlan]) -> Vec<String> {
    let mut warnings = Vec::new();
    let known = |i: usize| sessions[i].sid != 0;
    let group_known = |i: usize| sessions[i].pgid != 0;
    let mut keys: Vec<SessionKey> = Vec::with_capacity(processes.len());
    for (i, p) in processes.iter_mut().enumerate() {
        let leads = known(i) && sessions[i].leads_session(p.old_tgid);
        p.job.leads_session = leads;
        keys.push(match (leads, p.parent) {
            (true, _) => SessionKey::Led(sessions[i].sid),
            (false, Some(parent)) => keys[parent],
            (false, None) => SessionKey::Root,
        });
    }
    // A session is only inherited: a process born outside its old leader's subtree (its
    // parent left the session with setsid) cannot be put back in it.
    let tgids: HashMap<u32, usize> = processes.iter().enumerate().map(|(i, p)| (p.old_tgid.0, i)).collect();
    for (i, p) in processes.iter().enumerate() {
        let sid = sessions[i].sid;
        if known(i) && keys[i] != SessionKey::Led(sid) && tgids.contains_key(&sid) {
            warnings.push(format!(
                "PID {} cannot be put back in session {sid} (its parent had left it): it is restored in its parent's",
                p.old_tgid
            ));
        }
    }
    // Each old group's maker in each new session: its old leader if in the image,
    // else its first member in plan order.
    let mut makers: HashMap<(SessionKey, u32), usize> = HashMap::new();
    for (i, p) in processes.iter().enumerate() {
        if group_known(i) && sessions[i].pgid == p.old_tgid.0 {
            makers.entry((keys[i], sessions[i].pgid)).or_insert(i);
        }
    }
    for i in 0..processes.len() {
        if group_known(i) {
            makers.entry((keys[i], sessions[i].pgid)).or_insert(i);
        }
    }
    for i in 0..processes.len() {
        if !group_known(i) {
            continue;
        }
        let maker = makers.get(&(keys[i], sessions[i].pgid)).copied();
        processes[i].job.group = match maker {
            // The root and session leaders keep the group they have (their setsid's,
            // or the one crd's caller put crd in).
            _ if i == 0 || processes[i].job.leads_session => Group::Keep,
            Some(maker) if maker == i => Group::Create,
            Some(maker) => Group::Join(maker),
            None => Group::Keep,
        };
    }
    if !matches!(mode, Mode::Image { .. }) {
        // Taking the live terminal would take it from the original's session, which a
        // graft leaves running (stealing it needs CAP_SYS_ADMIN and harms the original).
        for (i, p) in processes.iter().enumerate() {
            if let (true, Some(tty)) = (p.job.leads_session, sessions[i].tty) {
                warnings.push(format!(
                    "PID {}'s controlling terminal ({tty}) stays the original's: a graft does not take it",
                    p.old_tgid
                ));
            }
        }
        return warnings;
    }
    let index = graph.index();
    for i in 0..processes.len() {
        let (Some(tty), true) = (sessions[i].tty, processes[i].job.leads_session) else { continue };
        let old = processes[i].old_tgid;
        if processes[i].table == TablePlan::SharedWithParent {
            // It would pull the terminal into the table its parent is filling.
            warnings.push(format!(
                "PID {old} shares its parent's fd table: its session is restored without its controlling terminal"
            ));
            continue;
        }
        // A description of the pty slave that was this session's terminal: one of the
        // leader's own fds if it holds one, else any in the image.
        let mut found = None;
        for (task, slot) in graph.slots() {
            let Some((_, _, object)) = index.open(slot.file.objref()) else { continue };
            // Not one whose master is outside: made disconnected (--allow-external), it
            // is hung up before the leader could take it.
            let is_slave = !object.held_outside
                && matches!(&object.state, Saved::Terminal(t) if t.end == End::Slave && !t.other_closed);
            if is_slave && object.rdev == tty && (found.is_none() || task.tgid == old) {
                found = Some(slot.file.objref());
            }
        }
        let Some(file) = found else {
            warnings.push(format!(
                "PID {old}'s controlling terminal ({tty}) is not a pty held in the image: its session is restored without one"
            ));
            continue;
        };
        let fg = sessions[i].foreground;
        let foreground = makers.get(&(keys[i], fg)).copied();
        if foreground.is_none() && fg != 0 {
            warnings.push(format!(
                "the foreground process group {fg} of PID {old}'s terminal is not in the image: the session leader's group is put in the foreground"
            ));
        }
        processes[i].job.ctty = Some(Ctty { file, foreground });
    }
    warnings
}

/// Every object an image restore must recreate: a kind crd can recreate, and no object
/// with a part outside (unless allowed). Every offending fd is named.
fn check_objects(graph: &Graph, mode: Mode) -> Result<(), PlanError> {
    let Mode::Image { allow_external } = mode else { return Ok(()) };
    let index = graph.index();
    let mut external = Vec::new();
    let mut refused = Vec::new();
    for (task, slot) in graph.slots() {
        let (_, objref, object) = index.open(slot.file.objref()).ok_or_else(|| {
            PlanError::Inconsistent(format!("PID {} fd {}: unknown open file or object", task.tgid, slot.fd))
        })?;
        if let Some(why) = object.state.refusal() {
            let (kind, name) = (object.kind(), object.name());
            let at = format!("PID {} fd {} ({kind} {objref} {name})", task.tgid, slot.fd);
            match refused.iter_mut().find(|(reason, _): &&mut (String, Vec<String>)| *reason == why) {
                Some((_, fds)) => fds.push(at),
                None => refused.push((why, vec![at])),
            }
            continue;
        }
        if let (true, Some(target)) = (object.held_outside, object.state.task()) {
            // Not even --allow-external: there is no "disconnected" pidfd to make.
            let (kind, name) = (object.kind(), object.name());
            let why = format!(
                "refers to PID {target}, which is not checkpointed; a {kind} cannot be recreated without its process"
            );
            let at = format!("PID {} fd {} ({kind} {objref} {name})", task.tgid, slot.fd);
            match refused.iter_mut().find(|(reason, _): &&mut (String, Vec<String>)| *reason == why) {
                Some((_, fds)) => fds.push(at),
                None => refused.push((why, vec![at])),
            }
            continue;
        }
        if object.held_outside && !allow_external {
            external.push(format!("PID {} fd {} ({} {objref})", task.tgid, slot.fd, object.kind()));
        }
    }
    if !refused.is_empty() {
        // One clause per reason, naming every fd it refuses.
        let clauses = refused.into_iter().map(|(why, fds)| format!("{}: {why}", fds.join(", ")));
        return Err(PlanError::Unsupported(clauses.collect()));
    }
    if external.is_empty() { Ok(()) } else { Err(PlanError::External(external)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        graph::{FdSlot, FdTable, FileDesc, Object, Task},
        kinds::{Kind, Saved, pipe::PipeState},
        types::{Access, DeviceId},
    };

    fn object(kind: Kind, held_outside: bool) -> Object {
        Object {
            ino: 1,
            mode: 0,
            dev: DeviceId { major: 0, minor: 0 },
            rdev: DeviceId { major: 0, minor: 0 },
            path: None,
            held_outside,
            state: match kind {
                Kind::Pipe => Saved::Pipe(PipeState { capacity: 65536, data: vec![] }),
                Kind::Socket => Saved::Socket(crate::kinds::socket::OtherSocketState {
                    family: Some(crate::kinds::socket::Family::from_raw(libc::AF_NETLINK as u16)),
                    sock_type: None,
                    protocol: 0,
                }),
                other => panic!("no sample of {other}"),
            },
            tied: Vec::new(),
            carried: Vec::new(),
        }
    }

    fn desc(object: Encounter<Box<Object>>) -> FileDesc {
        FileDesc {
            flags: 0,
            access: Access { read: true, write: false },
            pos: 0,
            held_outside: false,
            object,
        }
    }

    fn task(pid: u32, tgid: u32, parent: u32, table: Encounter<FdTable>) -> Task {
        Task {
            pid: Pid(pid),
            tgid: Tgid(tgid),
            parent: Tgid(parent),
            comm: format!("t{pid}"),
            fd_table: table,
            session: Default::default(),
        }
    }

    fn slot(fd: u32, file: Encounter<FileDesc>) -> FdSlot {
        FdSlot { fd: Fd(fd), close_on_exec: fd == 4, file }
    }

    /// Root 10 (threads 10, 11) with a pipe read end at 3 and a dup at 4; child 20 with
    /// its own table holding the same description at 7; child 30 sharing 10's table.
    fn graph(kind: Kind, held_outside: bool) -> Graph {
        let first = Encounter::First {
            objref: ObjRef(2),
            object: desc(Encounter::First {
                objref: ObjRef(3),
                object: Box::new(object(kind, held_outside)),
            }),
        };
        Graph {
            root: Tgid(10),
            tasks: vec![
                task(
                    10,
                    10,
                    1,
                    Encounter::First {
                        objref: ObjRef(1),
                        object: FdTable { fds: vec![slot(3, first), slot(4, Encounter::Again(ObjRef(2)))] },
                    },
                ),
                task(11, 10, 1, Encounter::Again(ObjRef(1))),
                task(
                    20,
                    20,
                    10,
                    Encounter::First {
                        objref: ObjRef(4),
                        object: FdTable { fds: vec![slot(7, Encounter::Again(ObjRef(2)))] },
                    },
                ),
                task(30, 30, 10, Encounter::Again(ObjRef(1))),
            ],
        }
    }

    #[test]
    fn processes_threads_children_and_tables() {
        let plan = plan(&graph(Kind::Pipe, false), Mode::Image { allow_external: false }).unwrap();
        assert_eq!(plan.processes.len(), 3);
        let root = &plan.processes[0];
        assert_eq!(root.threads, vec![(Pid(10), "t10".into()), (Pid(11), "t11".into())]);
        assert_eq!(root.children, vec![1, 2]);
        assert_eq!(
            root.table,
            TablePlan::Own(vec![
                FdPlan { fd: Fd(3), close_on_exec: false, file: ObjRef(2) },
                FdPlan { fd: Fd(4), close_on_exec: true, file: ObjRef(2) },
            ])
        );
        assert_eq!(
            plan.processes[1].table,
            TablePlan::Own(vec![FdPlan { fd: Fd(7), close_on_exec: false, file: ObjRef(2) }])
        );
        assert_eq!(plan.processes[2].table, TablePlan::SharedWithParent);
        assert_eq!(plan.processes[2].parent, Some(0));
        assert_eq!(plan.max_fd, 7);
    }

    #[test]
    fn unsupported_kinds_are_named_with_their_fd() {
        let err = plan(&graph(Kind::Socket, false), Mode::Image { allow_external: false }).unwrap_err();
        assert_eq!(
            err.to_string(),
            "PID 10 fd 3 (socket #3 socket:[1]), PID 10 fd 4 (socket #3 socket:[1]), PID 20 fd 7 (socket #3 socket:[1]): \
             crd does not recreate netlink sockets (only unix, TCP and UDP); `crd graft` hands the live one over"
        );
        // A graft hands over the very same socket: fine.
        assert!(plan(&graph(Kind::Socket, false), Mode::Graft).is_ok());
    }

    #[test]
    fn external_pipes_are_refused_per_fd_unless_allowed() {
        let err = plan(&graph(Kind::Pipe, true), Mode::Image { allow_external: false }).unwrap_err();
        let PlanError::External(fds) = &err else { panic!("{err}") };
        assert_eq!(fds, &["PID 10 fd 3 (pipe #3)", "PID 10 fd 4 (pipe #3)", "PID 20 fd 7 (pipe #3)"]);
        assert!(plan(&graph(Kind::Pipe, true), Mode::Image { allow_external: true }).is_ok());
        assert!(plan(&graph(Kind::Pipe, true), Mode::Graft).is_ok());
    }

    fn with_sessions(sessions: &[(u32, u32, u32)]) -> Graph {
        let mut g = graph(Kind::Pipe, false);
        for t in &mut g.tasks {
            let (_, sid, pgid) = *sessions.iter().find(|(tgid, ..)| *tgid == t.tgid.0).unwrap();
            t.session = Session { sid, pgid, tty: None, foreground: 0 };
        }
        g
    }

    #[test]
    fn session_leaders_make_sessions_and_groups_are_made_once_then_joined() {
        // 10 leads session 10; 20 leads group 20, which 30 joined; 30 is 10's child.
        let g = with_sessions(&[(10, 10, 10), (20, 10, 20), (30, 10, 20)]);
        let plan = plan(&g, Mode::Image { allow_external: false }).unwrap();
        let jobs: Vec<(bool, Group)> =
            plan.processes.iter().map(|p| (p.job.leads_session, p.job.group)).collect();
        assert_eq!(jobs, vec![(true, Group::Keep), (false, Group::Create), (false, Group::Join(1))]);
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    }

    #[test]
    fn a_group_whose_leader_is_not_in_the_image_is_made_by_its_first_member() {
        // The root's session leader (5) and group leader (6) are outside; 20 and 30
        // are in the root's group, so they join the root, which keeps its group.
        let g = with_sessions(&[(10, 5, 6), (20, 5, 6), (30, 5, 7)]);
        let plan = plan(&g, Mode::Graft).unwrap();
        let jobs: Vec<(bool, Group)> =
            plan.processes.iter().map(|p| (p.job.leads_session, p.job.group)).collect();
        assert_eq!(jobs, vec![(false, Group::Keep), (false, Group::Join(0)), (false, Group::Create)]);
    }

    #[test]
    fn groups_are_made_in_session_zero_too() {
        // Under an init that never called setsid (a VM, some containers) every process
        // is in session 0 and group 0; 20 made group 20, which 30 joined.
        let g = with_sessions(&[(10, 0, 0), (20, 0, 20), (30, 0, 20)]);
        let plan = plan(&g, Mode::Image { allow_external: false }).unwrap();
        let jobs: Vec<(bool, Group)> =
            plan.processes.iter().map(|p| (p.job.leads_session, p.job.group)).collect();
        assert_eq!(jobs, vec![(false, Group::Keep), (false, Group::Create), (false, Group::Join(1))]);
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    }

    #[test]
    fn an_image_without_sessions_leaves_the_stubs_as_forked() {
        let plan = plan(&graph(Kind::Pipe, false), Mode::Image { allow_external: false }).unwrap();
        assert!(plan.processes.iter().all(|p| p.job == JobPlan::default()));
    }

    #[test]
    fn a_table_shared_with_a_non_parent_is_refused() {
        let mut g = graph(Kind::Pipe, false);
        g.tasks[3].parent = Tgid(20);
        assert_eq!(plan(&g, Mode::Graft).unwrap_err(), PlanError::ForeignTableSharing(Tgid(30)));
    }
}
