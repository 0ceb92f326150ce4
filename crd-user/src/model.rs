//! The records a harvest produces: typed, kernel-meaningful, in no particular order.
//! Both harvesters (BPF and /proc) produce exactly these; everything above (graph,
//! checkpoint, ls) reads only these.
use crate::{
    kinds::{Kind, Live},
    types::{Access, DeviceId, Fd, KernelPtr, Pid, Tgid},
};

/// Everything one harvest saw, in no particular order.
#[derive(Clone, Debug, Default)]
pub struct Harvest {
    pub tasks: Vec<TaskInfo>,
    pub fds: Vec<FdInfo>,
}

/// One thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskInfo {
    pub pid: Pid,
    pub tgid: Tgid,
    /// The real parent's process id (not crd, which is only the ptrace parent).
    pub parent: Tgid,
    pub comm: String,
    /// Identity of the fd table: threads and CLONE_FILES processes share one.
    pub fd_table: KernelPtr,
    /// Its session, process group and controlling terminal.
    pub session: Session,
}

/// Where a process stands in job control: its session, its process group, and its
/// session's controlling terminal with that terminal's foreground group. Both
/// harvesters read it from `/proc/PID/stat` (fields 5 to 8) for the handful of
/// processes they harvest: BPF would have to walk `task->signal->pids[]` and
/// `signal->tty` with offsets of their own for four numbers a read of one small file
/// gives. Zero means unknown (an image of format 4 or older, a process gone meanwhile).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Session {
    /// The session's id: its leader's PID.
    pub sid: u32,
    /// The process group's id: its leader's PID.
    pub pgid: u32,
    /// The controlling terminal's device (`tty_nr`); None: no controlling terminal.
    pub tty: Option<DeviceId>,
    /// The controlling terminal's foreground process group (`tpgid`; 0: none).
    pub foreground: u32,
}

impl Session {
    /// Reads `/proc/PID/stat`; the default (unknown) if the process is gone.
    pub fn of(tgid: Tgid) -> Session {
        std::fs::read_to_string(format!("/proc/{}/stat", tgid.0))
            .ok()
            .and_then(|stat| Session::parse(&stat))
            .unwrap_or_default()
    }

    /// Fields 5 (pgrp), 6 (session), 7 (tty_nr) and 8 (tpgid) of a `/proc/PID/stat`
    /// line, counted after the command name (which may hold spaces and parentheses).
    pub fn parse(stat: &str) -> Option<Session> {
        let rest = &stat[stat.rfind(')')? + 1..];
        let mut fields = rest.split_whitespace().skip(2);
        let pgid = fields.next()?.parse().ok()?;
        let sid = fields.next()?.parse().ok()?;
        let tty_nr: u32 = fields.next()?.parse::<i64>().ok()? as u32;
        let tpgid: i64 = fields.next()?.parse().ok()?;
        Some(Session {
            sid,
            pgid,
            tty: (tty_nr != 0).then(|| DeviceId::from_user(u64::from(tty_nr))),
            foreground: u32::try_from(tpgid).unwrap_or(0),
        })
    }

    /// Whether the process leads its session.
    pub fn leads_session(&self, tgid: Tgid) -> bool {
        self.sid != 0 && self.sid == tgid.0
    }
}

/// One slot of one fd table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdInfo {
    /// A process using the table (where /proc/PID/fd/N and pidfd_getfd reach the fd).
    pub tgid: Tgid,
    pub fd_table: KernelPtr,
    pub fd: Fd,
    pub close_on_exec: bool,
    /// What /proc/PID/fd/N links to (a path, or `anon_inode:[eventfd]`-style), when read.
    pub link: Option<String>,
    pub file: FileInfo,
}

/// One open file description (`struct file`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    pub id: KernelPtr,
    /// `f_flags` without O_CLOEXEC (that bit belongs to the fd, not the description).
    pub flags: u32,
    pub access: Access,
    pub pos: i64,
    /// References to this description that the kernel counts (fd table slots anywhere
    /// on the system, plus mmaps and in-flight messages), excluding the harvester's own.
    pub refs: u64,
    pub object: ObjectInfo,
}

/// The object a description opens: an inode, or for anon files the file's private
/// object (see [`crate::kinds::Identity`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Identity of the object: equal means the same kernel object.
    pub id: KernelPtr,
    pub ino: u64,
    /// `i_mode`: type and permission bits.
    pub mode: u32,
    /// Device of the filesystem holding the inode.
    pub dev: DeviceId,
    /// The device an inode of a device node stands for.
    pub rdev: DeviceId,
    /// What the kind's harvest read (the kind is its variant).
    pub live: Live,
}

/// A file found inside an object rather than in an fd table: an fd in flight in a unix
/// socket's queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Carried {
    /// What /proc showed for it (a path, `pipe:[ino]`...), when read.
    pub link: Option<String>,
    pub file: FileInfo,
}

/// What a checkpoint read while its targets were frozen, beyond the harvest: each
/// object's saved state with its contents, and the files each object carries, both by
/// the harvest's object identity. Objects without a state are sketched from the harvest.
#[derive(Clone, Debug, Default)]
pub struct Saves {
    /// Keyed by kernel address: foldhash (see graph.rs), not SipHash.
    pub states: foldhash::HashMap<KernelPtr, crate::kinds::Saved>,
    /// In the order the object's state names them.
    pub carried: std::collections::HashMap<KernelPtr, Vec<Carried>>,
}

impl ObjectInfo {
    pub fn kind(&self) -> Kind {
        self.live.kind()
    }
}

impl Harvest {
    /// Drops the repeats the task_file iterator makes, in one pass: it visits a table
    /// shared by CLONE_FILES processes once per process (threads of one process only
    /// once), in PID order, so the slots of the lowest PID using a table are kept.
    pub fn drop_repeated_tables(mut self) -> Self {
        let mut user: foldhash::HashMap<KernelPtr, Tgid> = foldhash::HashMap::default();
        // Records come in runs of one (table, process): decide once per run.
        let mut run: Option<(KernelPtr, Tgid, bool)> = None;
        self.fds.retain(|f| match run {
            Some((table, tgid, keep)) if table == f.fd_table && tgid == f.tgid => keep,
            _ => {
                let keep = *user.entry(f.fd_table).or_insert(f.tgid) == f.tgid;
                run = Some((f.fd_table, f.tgid, keep));
                keep
            }
        });
        self.tasks.sort_by_key(|t| (t.tgid, t.pid));
        self.tasks.dedup_by_key(|t| t.pid);
        self
    }

    /// Drops repeats: the task_file iterator visits a table shared by CLONE_FILES
    /// processes once per process; one slot is one slot.
    pub fn dedup(mut self) -> Self {
        self.tasks.sort_by_key(|t| (t.tgid, t.pid));
        self.tasks.dedup_by_key(|t| t.pid);
        self.fds.sort_by_key(|f| (f.fd_table, f.fd, f.tgid));
        self.fds.dedup_by_key(|f| (f.fd_table, f.fd));
        self
    }

    /// Keeps only the processes in `keep`.
    pub fn retain_processes(&mut self, keep: &std::collections::HashSet<Tgid>) {
        self.tasks.retain(|t| keep.contains(&t.tgid));
        self.fds.retain(|f| keep.contains(&f.tgid));
    }
}

/// Record builders for unit tests across crd.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::kinds::pipe::PipeLive;

    pub fn task(pid: u32, tgid: u32, parent: u32, table: u64) -> TaskInfo {
        TaskInfo {
            pid: Pid(pid),
            tgid: Tgid(tgid),
            parent: Tgid(parent),
            comm: format!("p{tgid}"),
            fd_table: KernelPtr(table),
            session: Session::default(),
        }
    }

    /// One end of pipe `inode`, held by `tgid` at `fd` through description `file`.
    pub fn pipe_end(tgid: u32, table: u64, fd: u32, file: u64, inode: u64, read: bool) -> FdInfo {
        FdInfo {
            tgid: Tgid(tgid),
            fd_table: KernelPtr(table),
            fd: Fd(fd),
            close_on_exec: false,
            link: None,
            file: FileInfo {
                id: KernelPtr(file),
                flags: if read { 0 } else { 1 },
                access: Access { read, write: !read },
                pos: 0,
                refs: 1,
                object: ObjectInfo {
                    id: KernelPtr(inode),
                    ino: inode,
                    mode: libc::S_IFIFO | 0o600,
                    dev: DeviceId { major: 0, minor: 14 },
                    rdev: DeviceId { major: 0, minor: 0 },
                    live: Live::Pipe(PipeLive { readers: 1, writers: 1, queued: None, capacity: None }),
                },
            },
        }
    }

    /// The pipe state of a record built by [`pipe_end`].
    pub fn pipe_live(f: &mut FdInfo) -> &mut PipeLive {
        match &mut f.file.object.live {
            Live::Pipe(p) | Live::Fifo(p) => p,
            other => panic!("not a pipe: {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::pipe_end;
    use super::*;

    /// A harvest holds one `FdInfo` per fd and a graph one `FdSlot`: at 100,000 fds,
    /// every byte of them is 100 kB. Enums hold their largest variant inline, so a kind
    /// whose live or saved state is large must box it (the socket kinds do).
    #[test]
    fn per_fd_records_stay_small_whatever_the_largest_kind_state() {
        assert!(size_of::<crate::kinds::Live>() <= 48, "Live: {}", size_of::<crate::kinds::Live>());
        assert!(size_of::<crate::kinds::Saved>() <= 64, "Saved: {}", size_of::<crate::kinds::Saved>());
        assert!(size_of::<FdInfo>() <= 176, "FdInfo: {}", size_of::<FdInfo>());
        // An object is boxed in its description's encounter: a slot that names a description or
        // an object again costs no object's size.
        assert!(size_of::<crate::graph::FdSlot>() <= 48, "FdSlot: {}", size_of::<crate::graph::FdSlot>());
    }

    #[test]
    fn a_stat_line_gives_session_group_terminal_and_foreground() {
        let stat = "4242 (a (weird) name) S 1 4240 4200 34816 4240 4194560 0 0";
        let s = Session::parse(stat).unwrap();
        assert_eq!((s.pgid, s.sid, s.foreground), (4240, 4200, 4240));
        assert_eq!(s.tty, Some(DeviceId { major: 136, minor: 0 }));
        let none = Session::parse("7 (sleep) S 1 7 7 0 -1 4194560").unwrap();
        assert_eq!((none.tty, none.foreground), (None, 0));
        assert!(none.leads_session(Tgid(7)));
    }

    #[test]
    fn a_table_visited_through_several_processes_is_kept_once() {
        // Processes 10 and 11 share table 0xa (CLONE_FILES); 12 has table 0xb (the
        // iterator's visit order: by PID, fds ascending).
        let slot = |tgid, table, fd| pipe_end(tgid, table, fd, 0x100 + fd as u64, 0x500, true);
        let fds =
            vec![slot(10, 0xa, 0), slot(10, 0xa, 1), slot(11, 0xa, 0), slot(11, 0xa, 1), slot(12, 0xb, 3)];
        let kept: Vec<(u32, u64, u32)> = Harvest { tasks: Vec::new(), fds }
            .drop_repeated_tables()
            .fds
            .iter()
            .map(|f| (f.tgid.0, f.fd_table.0, f.fd.0))
            .collect();
        assert_eq!(kept, vec![(10, 0xa, 0), (10, 0xa, 1), (12, 0xb, 3)]);
    }
}
