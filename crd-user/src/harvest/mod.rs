//! Harvest: kernel → typed records.
//!
//! Two harvesters produce the same [`Harvest`]: [`bpf`] reads each fd table straight
//! from the kernel with BPF iterators; [`procfs`] walks `/proc` and is both the fallback
//! where BPF iterators are unavailable and the oracle the tests compare BPF against.
//! [`extras`] adds, while the targets are still frozen, the few facts neither gives
//! cheaply: file paths, pipe capacity and the bytes queued in pipes.
pub mod bpf;
pub mod extras;
pub mod offsets;
pub mod procfs;

use serde::{Deserialize, Serialize};

use crate::types::{Access, DeviceId, Fd, KernelPtr, Pid, Tgid};

/// Where the records come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Source {
    /// BPF task/task_file iterators.
    Bpf,
    /// /proc/PID/{fd,fdinfo,task} and kcmp(2): slower, needs no BPF.
    Procfs,
    /// BPF, or /proc (with a warning saying why) where this kernel cannot run crd's BPF
    /// programs: no BTF, a missing field or iterator, a verifier that refuses them.
    Auto,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Bpf => "bpf",
            Source::Procfs => "procfs",
            Source::Auto => "auto",
        })
    }
}

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
}

/// One slot of one fd table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdInfo {
    /// A process using the table (where /proc/PID/fd/N and pidfd_getfd reach the fd).
    pub tgid: Tgid,
    pub fd_table: KernelPtr,
    pub fd: Fd,
    pub close_on_exec: bool,
    /// What /proc/PID/fd/N links to (a path, or `pipe:[ino]`-style), when read.
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
    pub inode: InodeInfo,
}

/// What kind of object an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InodeKind {
    /// Anonymous pipe (pipefs).
    Pipe,
    /// Named pipe on a filesystem.
    Fifo,
    Regular,
    Directory,
    CharDevice,
    BlockDevice,
    Socket,
    Symlink,
    /// anon_inode: eventfd, epoll, signalfd, timerfd, pidfd...
    Anon,
    Unknown,
}

impl InodeKind {
    /// Classifies by `i_mode` and, to tell anonymous pipes and anon inodes apart, by
    /// the superblock magic.
    pub fn classify(i_mode: u32, fs_magic: u64) -> Self {
        const PIPEFS_MAGIC: u64 = 0x5049_5045;
        const ANON_INODE_FS_MAGIC: u64 = 0x0904_1934;
        if fs_magic == ANON_INODE_FS_MAGIC {
            return Self::Anon;
        }
        match i_mode & libc::S_IFMT {
            libc::S_IFIFO if fs_magic == PIPEFS_MAGIC => Self::Pipe,
            libc::S_IFIFO => Self::Fifo,
            libc::S_IFREG => Self::Regular,
            libc::S_IFDIR => Self::Directory,
            libc::S_IFCHR => Self::CharDevice,
            libc::S_IFBLK => Self::BlockDevice,
            libc::S_IFSOCK => Self::Socket,
            libc::S_IFLNK => Self::Symlink,
            _ => Self::Unknown,
        }
    }

    pub fn is_pipe_like(self) -> bool {
        matches!(self, Self::Pipe | Self::Fifo)
    }

    /// Whether a path from /proc/PID/fd/N names this object usefully (pipes and sockets
    /// only have `pipe:[ino]`-style names).
    pub fn has_path(self) -> bool {
        !matches!(self, Self::Pipe | Self::Socket)
    }
}

impl std::fmt::Display for InodeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pipe => "pipe",
            Self::Fifo => "fifo",
            Self::Regular => "file",
            Self::Directory => "dir",
            Self::CharDevice => "chr",
            Self::BlockDevice => "blk",
            Self::Socket => "socket",
            Self::Symlink => "link",
            Self::Anon => "anon",
            Self::Unknown => "unknown",
        })
    }
}

/// One inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeInfo {
    pub id: KernelPtr,
    pub kind: InodeKind,
    pub ino: u64,
    /// `i_mode`: type and permission bits.
    pub mode: u32,
    /// Device of the filesystem holding the inode.
    pub dev: DeviceId,
    /// The device an inode of a device node stands for.
    pub rdev: DeviceId,
    pub pipe: Option<PipeInfo>,
}

/// The pipe behind a pipe or FIFO inode (`pipe_inode_info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipeInfo {
    pub id: KernelPtr,
    /// Open read descriptions of the pipe, system-wide.
    pub readers: u32,
    /// Open write descriptions of the pipe, system-wide.
    pub writers: u32,
    /// Bytes queued, as the kernel side counted them (None: not counted, or more
    /// buffers than the BPF program walks). Checked against what extras copies.
    pub queued: Option<u32>,
    /// Capacity in bytes (F_GETPIPE_SZ), where the harvester read it (BPF does).
    pub capacity: Option<u32>,
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
}

/// Record builders for unit tests across crd.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub fn task(pid: u32, tgid: u32, parent: u32, table: u64) -> TaskInfo {
        TaskInfo {
            pid: Pid(pid),
            tgid: Tgid(tgid),
            parent: Tgid(parent),
            comm: format!("p{tgid}"),
            fd_table: KernelPtr(table),
        }
    }

    /// One end of pipe `inode` (its `pipe_inode_info` at `inode + 1`), held by `tgid`
    /// at `fd` through description `file`.
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
                inode: InodeInfo {
                    id: KernelPtr(inode),
                    kind: InodeKind::Pipe,
                    ino: inode,
                    mode: libc::S_IFIFO | 0o600,
                    dev: DeviceId { major: 0, minor: 14 },
                    rdev: DeviceId { major: 0, minor: 0 },
                    pipe: Some(PipeInfo {
                        id: KernelPtr(inode + 1),
                        readers: 1,
                        writers: 1,
                        queued: None,
                        capacity: None,
                    }),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::pipe_end;
    use super::*;

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
