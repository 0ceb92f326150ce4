//! Image format 1, as crd 0.1 wrote it before kinds were modules: every inode carried
//! a `kind` tag and an optional pipe side field. Decoded here into today's graph, so old
//! images still inspect and restore. These types are frozen: never change them.
use serde::Deserialize;

use crate::{
    graph::{self, Encounter},
    kinds::{Kind, Recognise, Saved, decoding, pipe::PipeState, regular::ByPath, terminal::TerminalState},
    types::{Access, DeviceId, Fd, Pid, Tgid},
};

#[derive(Deserialize)]
pub struct ImageBody {
    header: Header,
    graph: Graph,
}

#[derive(Deserialize)]
struct Header {
    crd_version: String,
    kernel_release: String,
    created: u64,
    source: Source,
    tree: bool,
}

#[derive(Deserialize)]
enum Source {
    Bpf,
    Procfs,
    #[allow(dead_code)]
    Auto,
}

#[derive(Deserialize)]
struct Graph {
    root: Tgid,
    tasks: Vec<Task>,
}

#[derive(Deserialize)]
struct Task {
    pid: Pid,
    #[serde(deserialize_with = "decoding::tgid")]
    tgid: Tgid,
    parent: Tgid,
    comm: String,
    fd_table: Encounter<FdTable>,
}

#[derive(Deserialize)]
struct FdTable {
    fds: Vec<FdSlot>,
}

#[derive(Deserialize)]
struct FdSlot {
    #[serde(deserialize_with = "decoding::fd")]
    fd: Fd,
    close_on_exec: bool,
    file: Encounter<FileDesc>,
}

#[derive(Deserialize)]
struct FileDesc {
    flags: u32,
    access: Access,
    pos: i64,
    held_outside: bool,
    inode: Encounter<Inode>,
}

#[derive(Deserialize)]
struct Inode {
    kind: InodeKind,
    ino: u64,
    mode: u32,
    dev: DeviceId,
    rdev: DeviceId,
    path: Option<String>,
    pipe: Option<Pipe>,
}

#[derive(Clone, Copy, Deserialize)]
enum InodeKind {
    Pipe,
    Fifo,
    Regular,
    Directory,
    CharDevice,
    BlockDevice,
    Socket,
    Symlink,
    Anon,
    Unknown,
}

#[derive(Deserialize)]
struct Pipe {
    capacity: u32,
    data: Vec<u8>,
    held_outside: bool,
}

fn encounter<T, U>(e: Encounter<T>, f: impl FnOnce(T) -> U) -> Encounter<U> {
    match e {
        Encounter::First { objref, object } => Encounter::First { objref, object: f(object) },
        Encounter::Again(objref) => Encounter::Again(objref),
    }
}

impl ImageBody {
    /// Today's image body for this format-1 body.
    pub fn upgrade(self) -> super::ImageBody {
        let Header { crd_version, kernel_release, created, source, tree } = self.header;
        let source = match source {
            Source::Procfs => super::Source::Procfs,
            Source::Bpf | Source::Auto => super::Source::Bpf,
        };
        super::ImageBody {
            header: super::Header { crd_version, kernel_release, created, source, tree },
            graph: graph::Graph {
                root: self.graph.root,
                tasks: self.graph.tasks.into_iter().map(Task::upgrade).collect(),
            },
        }
    }
}

impl Task {
    fn upgrade(self) -> graph::Task {
        graph::Task {
            pid: self.pid,
            tgid: self.tgid,
            parent: self.parent,
            comm: self.comm,
            session: Default::default(),
            fd_table: encounter(self.fd_table, |table| graph::FdTable {
                fds: table
                    .fds
                    .into_iter()
                    .map(|slot| graph::FdSlot {
                        fd: slot.fd,
                        close_on_exec: slot.close_on_exec,
                        file: encounter(slot.file, FileDesc::upgrade),
                    })
                    .collect(),
            }),
        }
    }
}

impl FileDesc {
    fn upgrade(self) -> graph::FileDesc {
        graph::FileDesc {
            flags: self.flags,
            access: self.access,
            pos: self.pos,
            held_outside: self.held_outside,
            object: encounter(self.inode, |inode| Box::new(inode.upgrade())),
        }
    }
}

impl Inode {
    fn upgrade(self) -> graph::Object {
        let held_outside = self.pipe.as_ref().is_some_and(|p| p.held_outside);
        let pipe = self.pipe.map(|p| PipeState { capacity: p.capacity, data: p.data }).unwrap_or_default();
        let state = match self.kind {
            InodeKind::Pipe => Saved::Pipe(pipe),
            InodeKind::Fifo => Saved::Fifo(pipe),
            InodeKind::Regular => Saved::Regular(ByPath),
            InodeKind::Directory => Saved::Directory(ByPath),
            // Format 1 did not tell terminals from other devices: today's crd does.
            InodeKind::CharDevice => {
                let r = Recognise {
                    mode: self.mode,
                    fs_magic: None,
                    name: None,
                    rdev: self.rdev,
                    link: None,
                    family: None,
                };
                match Kind::recognise(&r) {
                    Kind::Terminal => Saved::Terminal(Box::new(TerminalState::without_state(self.rdev))),
                    _ => Saved::CharDevice(ByPath),
                }
            }
            InodeKind::BlockDevice => Saved::BlockDevice(ByPath),
            InodeKind::Socket => Saved::Socket(crate::kinds::socket::OtherSocketState {
                family: None,
                sock_type: None,
                protocol: 0,
            }),
            InodeKind::Anon => Saved::Anon(ByPath),
            InodeKind::Symlink | InodeKind::Unknown => Saved::Other(ByPath),
        };
        graph::Object {
            ino: self.ino,
            mode: self.mode,
            dev: self.dev,
            rdev: self.rdev,
            path: self.path,
            held_outside,
            state,
            tied: Vec::new(),
            carried: Vec::new(),
        }
    }
}
