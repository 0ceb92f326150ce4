//! The objref table: every open file description the stubs will need, held by crd
//! until they have pulled their copies with `pidfd_getfd`.
//!
//! Built by walking the graph in order, the linux-cr restart logic literally: the first
//! encounter of a pipe inode creates the pipe once with `pipe2`, keeps the end the
//! current description needs and *deposits* the other end under the inode's objref; a
//! later description of that pipe picks its end up from the deposit (or, if the deposit
//! is already taken, opens another description of the same pipe through
//! `/proc/self/fd/N`). A later encounter of a description (`CR_FD_OBJREF`) creates
//! nothing: it refers to the entry made at its first encounter. Whatever is still
//! deposited when the table is dropped is closed, so no stray end keeps a pipe open.
use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
};

// Objrefs are small dense integers: a fast hasher, not SipHash.
use foldhash::{HashMap, HashMapExt};
use nix::{
    fcntl::{self, FcntlArg, OFlag},
    sys::stat::{Mode, SFlag, fstat},
    unistd,
};

use crate::{
    freeze::Frozen,
    graph::{Encounter, FileDesc, Graph, Inode},
    harvest::InodeKind,
    sys::{self, SyscallError},
    types::{Access, Fd, ObjRef, Tgid},
};

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("PID {tgid} fd {fd} ({what} {objref}): {path} no longer exists")]
    Gone { tgid: Tgid, fd: Fd, what: InodeKind, objref: ObjRef, path: String },
    #[error("PID {tgid} fd {fd} ({what} {objref}): {path} is now a {found}, not a {what}")]
    Changed { tgid: Tgid, fd: Fd, what: InodeKind, objref: ObjRef, path: String, found: &'static str },
    #[error("PID {tgid} fd {fd} ({what} {objref}): the image records no path for it")]
    NoPath { tgid: Tgid, fd: Fd, what: InodeKind, objref: ObjRef },
    #[error("PID {tgid} fd {fd} ({what} {objref}): restoring a {what} is not supported yet")]
    Unsupported { tgid: Tgid, fd: Fd, what: InodeKind, objref: ObjRef },
    #[error("PID {tgid} fd {fd} ({what} {objref}): {source}")]
    Syscall { tgid: Tgid, fd: Fd, what: InodeKind, objref: ObjRef, source: SyscallError },
    #[error("PID {tgid} fd {fd}: the image refers to {objref} before saving it")]
    Inconsistent { tgid: Tgid, fd: Fd, objref: ObjRef },
}

/// Which end of a pipe a description is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum End {
    Read,
    Write,
    Both,
}

impl End {
    fn of(access: Access) -> Self {
        match (access.read, access.write) {
            (true, true) => End::Both,
            (false, true) => End::Write,
            _ => End::Read,
        }
    }
}

/// Open file descriptions by objref, held by crd for the stubs.
#[derive(Default)]
pub struct ObjectTable {
    files: BTreeMap<ObjRef, OwnedFd>,
    /// Pipe ends made by `pipe2` and not yet claimed, by (pipe inode objref, end).
    deposited: HashMap<(ObjRef, End), OwnedFd>,
    /// A handle on every pipe or FIFO inode, to open more descriptions of it.
    inode_handles: HashMap<ObjRef, InodeHandle>,
}

/// How crd reaches a pipe or FIFO inode to open more descriptions of it.
enum InodeHandle {
    /// A pipe's read end that crd already holds, in `deposited` or `files` (moving it
    /// from one to the other keeps its number) until the table is done: no extra fd, so
    /// crd needs one fd per description and a process with 18,000 pipe fds restores
    /// within a 20,000-fd limit.
    Held(RawFd),
    /// A FIFO's read-write "keeper", which also lets its ends open without blocking.
    Keeper(OwnedFd),
}

impl InodeHandle {
    fn raw(&self) -> RawFd {
        match self {
            InodeHandle::Held(fd) => *fd,
            InodeHandle::Keeper(fd) => fd.as_raw_fd(),
        }
    }
}

impl ObjectTable {
    /// Recreates every description of an image, telling `publish` where each is (its
    /// fd number in crd) as soon as it exists, so stubs can start pulling.
    pub fn recreate(graph: &Graph, publish: &mut dyn FnMut(ObjRef, RawFd)) -> Result<Self, ObjectError> {
        let mut table = ObjectTable::default();
        let mut inodes: HashMap<ObjRef, &Inode> = HashMap::new();
        for (task, slot) in graph.slots() {
            let Encounter::First { objref, object: desc } = &slot.file else { continue };
            let at = At { tgid: task.tgid, fd: slot.fd };
            let inode_ref = desc.inode.objref();
            let (inode, first) = match &desc.inode {
                Encounter::First { object, .. } => {
                    inodes.insert(inode_ref, object);
                    (object, true)
                }
                Encounter::Again(r) => match inodes.get(r) {
                    Some(inode) => (*inode, false),
                    None => return Err(ObjectError::Inconsistent { tgid: at.tgid, fd: at.fd, objref: *r }),
                },
            };
            let ctx = Ctx { at, inode, inode_ref };
            let (fd, made) = table.description(&ctx, desc, first)?;
            set_status_flags(&fd, desc.flags, made).map_err(|e| ctx.syscall(e))?;
            publish(*objref, fd.as_raw_fd());
            table.files.insert(*objref, fd);
        }
        // Only the descriptions themselves are needed from here on; the FIFO keepers
        // and unclaimed pipe ends go now, so they cannot hold anything open.
        table.inode_handles.clear();
        table.deposited.clear();
        Ok(table)
    }

    /// Takes every description of a live, frozen process tree: the very same objects
    /// (published as in [`recreate`](Self::recreate)).
    pub fn graft(
        graph: &Graph,
        frozen: &Frozen,
        publish: &mut dyn FnMut(ObjRef, RawFd),
    ) -> Result<Self, ObjectError> {
        let mut table = ObjectTable::default();
        for (task, slot) in graph.slots() {
            let Encounter::First { objref, .. } = &slot.file else { continue };
            let pidfd = frozen.pidfd(task.tgid).ok_or(ObjectError::Inconsistent {
                tgid: task.tgid,
                fd: slot.fd,
                objref: *objref,
            })?;
            let fd = sys::pidfd_getfd(pidfd, slot.fd).map_err(|source| ObjectError::Syscall {
                tgid: task.tgid,
                fd: slot.fd,
                what: InodeKind::Unknown,
                objref: *objref,
                source,
            })?;
            publish(*objref, fd.as_raw_fd());
            table.files.insert(*objref, fd);
        }
        Ok(table)
    }

    /// Creates one description at its first encounter.
    fn description(
        &mut self,
        ctx: &Ctx<'_>,
        desc: &FileDesc,
        first_of_inode: bool,
    ) -> Result<(OwnedFd, Made), ObjectError> {
        let inode = ctx.inode;
        let opened = |fd| Ok((fd, Made::Opened));
        match inode.kind {
            InodeKind::Pipe if first_of_inode => self.new_pipe(ctx, desc),
            InodeKind::Pipe => self.pipe_end(ctx, desc),
            InodeKind::Fifo => {
                if first_of_inode {
                    self.new_fifo(ctx)?;
                }
                let path = ctx.path()?;
                // The keeper is a reader and a writer, so this open never blocks.
                let flags = access_flags(desc.access) | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
                fcntl::open(path, flags, Mode::empty()).map_err(|e| ctx.errno("open", e)).and_then(opened)
            }
            InodeKind::Regular | InodeKind::Directory | InodeKind::CharDevice | InodeKind::BlockDevice => {
                self.open_path(ctx, desc).and_then(opened)
            }
            what => Err(ObjectError::Unsupported {
                tgid: ctx.at.tgid,
                fd: ctx.at.fd,
                what,
                objref: ctx.inode_ref,
            }),
        }
    }

    /// First encounter of a pipe: `pipe2`, capacity, queued bytes; keep the end this
    /// description is, deposit the other.
    fn new_pipe(&mut self, ctx: &Ctx<'_>, desc: &FileDesc) -> Result<(OwnedFd, Made), ObjectError> {
        let (read, write) = unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| ctx.errno("pipe2", e))?;
        if let Some(pipe) = &ctx.inode.pipe {
            fill_pipe(&write, pipe.capacity, &pipe.data, Made::ByPipe2).map_err(|e| ctx.syscall(e))?;
        }
        self.inode_handles.insert(ctx.inode_ref, InodeHandle::Held(read.as_raw_fd()));
        Ok(match End::of(desc.access) {
            End::Read => {
                self.deposited.insert((ctx.inode_ref, End::Write), write);
                (read, Made::ByPipe2)
            }
            End::Write => {
                self.deposited.insert((ctx.inode_ref, End::Read), read);
                (write, Made::ByPipe2)
            }
            End::Both => {
                self.deposited.insert((ctx.inode_ref, End::Read), read);
                self.deposited.insert((ctx.inode_ref, End::Write), write);
                (self.reopen(ctx, desc.access)?, Made::Opened)
            }
        })
    }

    /// A later description of a pipe already made: the deposited end, or a new
    /// description of the same pipe.
    fn pipe_end(&mut self, ctx: &Ctx<'_>, desc: &FileDesc) -> Result<(OwnedFd, Made), ObjectError> {
        match self.deposited.remove(&(ctx.inode_ref, End::of(desc.access))) {
            Some(end) => Ok((end, Made::ByPipe2)),
            None => Ok((self.reopen(ctx, desc.access)?, Made::Opened)),
        }
    }

    /// Opens another description of a pipe or FIFO through its handle.
    fn reopen(&self, ctx: &Ctx<'_>, access: Access) -> Result<OwnedFd, ObjectError> {
        let handle = self.inode_handles.get(&ctx.inode_ref).ok_or(ObjectError::Inconsistent {
            tgid: ctx.at.tgid,
            fd: ctx.at.fd,
            objref: ctx.inode_ref,
        })?;
        let path = format!("/proc/self/fd/{}", handle.raw());
        let flags = access_flags(access) | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        fcntl::open(path.as_str(), flags, Mode::empty()).map_err(|e| ctx.errno("open(/proc/self/fd/N)", e))
    }

    /// First encounter of a FIFO: open a keeper, restore capacity and queued bytes.
    fn new_fifo(&mut self, ctx: &Ctx<'_>) -> Result<(), ObjectError> {
        let path = ctx.path()?;
        let keeper = fcntl::open(path, OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| ctx.open_error(path, e))?;
        ctx.check_type(&keeper, path)?;
        if let Some(pipe) = &ctx.inode.pipe {
            fill_pipe(&keeper, pipe.capacity, &pipe.data, Made::Opened).map_err(|e| ctx.syscall(e))?;
        }
        self.inode_handles.insert(ctx.inode_ref, InodeHandle::Keeper(keeper));
        Ok(())
    }

    /// A named file, directory or device: open its path with the description's flags
    /// and move to its offset.
    fn open_path(&self, ctx: &Ctx<'_>, desc: &FileDesc) -> Result<OwnedFd, ObjectError> {
        let path = ctx.path()?;
        // Creation flags described how the file was made, not how to reopen it.
        let kept = OFlag::from_bits_truncate(desc.flags as i32)
            & (OFlag::O_APPEND
                | OFlag::O_NONBLOCK
                | OFlag::O_DIRECT
                | OFlag::O_NOATIME
                | OFlag::O_SYNC
                | OFlag::O_DSYNC
                | OFlag::O_DIRECTORY
                | OFlag::O_NOFOLLOW
                | OFlag::O_PATH
                | OFlag::O_LARGEFILE);
        let flags = access_flags(desc.access) | kept | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
        let fd = fcntl::open(path, flags, Mode::empty()).map_err(|e| ctx.open_error(path, e))?;
        ctx.check_type(&fd, path)?;
        if desc.pos != 0
            && matches!(ctx.inode.kind, InodeKind::Regular | InodeKind::Directory | InodeKind::BlockDevice)
        {
            unistd::lseek(fd.as_fd(), desc.pos, unistd::Whence::SeekSet)
                .map_err(|e| ctx.errno("lseek", e))?;
        }
        Ok(fd)
    }
}

/// Where in the image an object is being made, for errors.
#[derive(Clone, Copy)]
struct At {
    tgid: Tgid,
    fd: Fd,
}

struct Ctx<'a> {
    at: At,
    inode: &'a Inode,
    inode_ref: ObjRef,
}

impl Ctx<'_> {
    fn path(&self) -> Result<&str, ObjectError> {
        self.inode.path.as_deref().ok_or(ObjectError::NoPath {
            tgid: self.at.tgid,
            fd: self.at.fd,
            what: self.inode.kind,
            objref: self.inode_ref,
        })
    }

    fn syscall(&self, source: SyscallError) -> ObjectError {
        ObjectError::Syscall {
            tgid: self.at.tgid,
            fd: self.at.fd,
            what: self.inode.kind,
            objref: self.inode_ref,
            source,
        }
    }

    fn errno(&self, call: &'static str, e: nix::Error) -> ObjectError {
        self.syscall(SyscallError { call, source: e.into() })
    }

    fn open_error(&self, path: &str, e: nix::Error) -> ObjectError {
        if e == nix::Error::ENOENT {
            return ObjectError::Gone {
                tgid: self.at.tgid,
                fd: self.at.fd,
                what: self.inode.kind,
                objref: self.inode_ref,
                path: path.to_string(),
            };
        }
        self.errno("open", e)
    }

    /// The path must still name the same kind of object.
    fn check_type(&self, fd: &OwnedFd, path: &str) -> Result<(), ObjectError> {
        let stat = fstat(fd.as_fd()).map_err(|e| self.errno("fstat", e))?;
        let found = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
        let expected = SFlag::from_bits_truncate(self.inode.mode & SFlag::S_IFMT.bits());
        if found != expected {
            let name = match found {
                SFlag::S_IFREG => "regular file",
                SFlag::S_IFDIR => "directory",
                SFlag::S_IFIFO => "fifo",
                SFlag::S_IFCHR => "character device",
                SFlag::S_IFBLK => "block device",
                SFlag::S_IFSOCK => "socket",
                _ => "different kind of file",
            };
            return Err(ObjectError::Changed {
                tgid: self.at.tgid,
                fd: self.at.fd,
                what: self.inode.kind,
                objref: self.inode_ref,
                path: path.to_string(),
                found: name,
            });
        }
        if self.inode.kind == InodeKind::Regular && stat.st_ino != self.inode.ino {
            log::warn!(
                "PID {} fd {}: {path} is another file than at checkpoint time (inode {} became {})",
                self.at.tgid,
                self.at.fd,
                self.inode.ino,
                stat.st_ino
            );
        }
        Ok(())
    }
}

fn access_flags(access: Access) -> OFlag {
    match (access.read, access.write) {
        (true, true) => OFlag::O_RDWR,
        (false, true) => OFlag::O_WRONLY,
        (true, false) => OFlag::O_RDONLY,
        (false, false) => OFlag::O_PATH,
    }
}

/// Sets the description's status flags exactly (F_SETFL changes only O_APPEND,
/// O_NONBLOCK, O_ASYNC, O_DIRECT and O_NOATIME).
/// How crd got a description, which tells what it already knows about it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Made {
    /// An end fresh from crd's own `pipe2(O_CLOEXEC)`: no status flags, nothing queued.
    ByPipe2,
    /// Opened by path: flags and contents are whatever the open gave.
    Opened,
}

fn set_status_flags(fd: &OwnedFd, flags: u32, made: Made) -> Result<(), SyscallError> {
    let settable = OFlag::O_APPEND | OFlag::O_NONBLOCK | OFlag::O_ASYNC | OFlag::O_DIRECT | OFlag::O_NOATIME;
    let wanted = OFlag::from_bits_truncate(flags as i32) & settable;
    if made == Made::ByPipe2 && wanted.is_empty() {
        // Already right: saves two fcntl calls per pipe end.
        return Ok(());
    }
    let current = fcntl::fcntl(fd.as_fd(), FcntlArg::F_GETFL)
        .map_err(|e| SyscallError { call: "fcntl(F_GETFL)", source: e.into() })?;
    if current & libc::O_PATH != 0 {
        return Ok(());
    }
    let current = OFlag::from_bits_truncate(current);
    if current & settable != wanted {
        fcntl::fcntl(fd.as_fd(), FcntlArg::F_SETFL((current - settable) | wanted))
            .map_err(|e| SyscallError { call: "fcntl(F_SETFL)", source: e.into() })?;
    }
    Ok(())
}

/// Gives a pipe its capacity and queues `data` in it (the capacity first, so the data
/// always fits without blocking).
fn fill_pipe(write_end: &OwnedFd, capacity: u32, data: &[u8], made: Made) -> Result<(), SyscallError> {
    let errno = |call| move |e: nix::Error| SyscallError { call, source: e.into() };
    let current =
        fcntl::fcntl(write_end.as_fd(), FcntlArg::F_GETPIPE_SZ).map_err(errno("fcntl(F_GETPIPE_SZ)"))?;
    if capacity != 0 && current as u32 != capacity {
        fcntl::fcntl(write_end.as_fd(), FcntlArg::F_SETPIPE_SZ(capacity as i32))
            .map_err(errno("fcntl(F_SETPIPE_SZ)"))?;
    }
    if data.len() > capacity.max(current as u32) as usize {
        return Err(SyscallError {
            call: "write",
            source: std::io::Error::other(format!("{} queued bytes exceed the pipe capacity", data.len())),
        });
    }
    let queued = if made == Made::ByPipe2 { 0 } else { sys::pipe_queued(write_end.as_fd())? };
    if queued != 0 {
        // A FIFO opened again may still hold bytes from someone else: adding ours
        // would mix two streams.
        return Err(SyscallError {
            call: "write",
            source: std::io::Error::other(format!("the pipe already holds {queued} bytes")),
        });
    }
    let mut done = 0;
    while done < data.len() {
        done += unistd::write(write_end.as_fd(), &data[done..]).map_err(errno("write"))?;
    }
    Ok(())
}
