//! Anonymous pipes: linux-cr's first example of nested sharing. Both ends are
//! descriptions of one pipe object; the image saves the pipe once, with its capacity and
//! the bytes queued in it.
//!
//! - Recognised by a FIFO inode on pipefs.
//! - BPF tail: `PipeTail` (`pipe_inode_info`: readers, writers, max_usage, bytes queued).
//! - Saved while frozen **without consuming** the queue: `tee(2)` duplicates it into a
//!   scratch pipe of crd's own and crd reads the copy. tee reads from the target's own
//!   read end, fetched with `pidfd_getfd` (the very same description, so nothing on it
//!   changes: no O_NONBLOCK, no resize, no seek), or, when the set holds only write
//!   ends, from a fresh read-only open of `/proc/PID/fd/N` whose flags are crd's alone.
//! - Held outside: the kernel counts more readers or writers than the set holds.
//! - Restore (linux-cr's logic): the first encounter makes the pipe with `pipe2`, keeps
//!   the end it needs and deposits the other under the pipe's objref; a later
//!   description picks its end up, or opens another description of the same pipe
//!   through `/proc/self/fd/N`.
use std::{
    fs,
    io::Read,
    os::fd::{AsFd, AsRawFd, OwnedFd},
};

use nix::{
    fcntl::{self, FcntlArg, OFlag, SpliceFFlags},
    sys::stat::Mode,
    unistd,
};
use serde::{Deserialize, Serialize};

use super::{FileKind, Handle, InsideUse, KindError, ObjectStore, OpenArgs, Opened, Reach, Recognise};
use crate::{
    sys::{self, SyscallError},
    types::Access,
};

pub struct Pipe;

/// What a harvest reads of a pipe (or FIFO).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipeLive {
    /// Open read descriptions of the pipe, system-wide.
    pub readers: u32,
    /// Open write descriptions of the pipe, system-wide.
    pub writers: u32,
    /// Bytes queued, as the kernel side counted them (None: not counted, or more
    /// buffers than the BPF program walks). Checked against what save copies.
    pub queued: Option<u32>,
    /// Capacity in bytes (F_GETPIPE_SZ), where the harvester read it (BPF does).
    pub capacity: Option<u32>,
}

/// What an image holds of a pipe (or FIFO).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipeState {
    /// Capacity in bytes (F_GETPIPE_SZ).
    pub capacity: u32,
    /// Bytes queued, oldest first.
    pub data: Vec<u8>,
}

/// Which end of a pipe a description is: the deposit slot of that end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Read = 0,
    Write = 1,
    Both = 2,
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

impl FileKind for Pipe {
    const NAME: &'static str = "pipe";
    const HAS_PATH: bool = false;
    type Live = PipeLive;
    type Saved = PipeState;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.file_type() == libc::S_IFIFO && r.fs_magic == Some(crd_common::PIPEFS_MAGIC)
    }

    fn from_bpf(_record: &crd_common::FdRecord, tail: &[u8]) -> Option<PipeLive> {
        from_tail(tail)
    }

    fn from_proc(_slot: &super::ProcSlot<'_>) -> PipeLive {
        // /proc counts neither ends nor bytes: the /proc harvester counts the ends by
        // scanning every process, and save copies the queue.
        PipeLive::default()
    }

    fn held_outside(live: &PipeLive, inside: InsideUse) -> bool {
        held_outside(live, inside)
    }

    fn sketch(live: &PipeLive) -> PipeState {
        sketch(live)
    }

    fn save(live: &PipeLive, reach: &Reach<'_>) -> Result<PipeState, KindError> {
        save(live, reach)
    }

    fn detail(saved: &PipeState) -> Option<String> {
        detail(saved)
    }

    fn open(saved: &PipeState, args: &OpenArgs<'_>, store: &mut ObjectStore) -> Result<Opened, KindError> {
        if !args.first {
            return match store.pick_up(args.object, End::of(args.access) as u8) {
                Some(fd) => Ok(Opened { fd, fresh: true }),
                None => Ok(Opened { fd: reopen(store, args)?, fresh: false }),
            };
        }
        let (read, write) = unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| KindError::errno("pipe2", e))?;
        fill(&write, saved, true)?;
        store.set_handle(args.object, Handle::Held(read.as_raw_fd()));
        Ok(match End::of(args.access) {
            End::Read => {
                store.deposit(args.object, End::Write as u8, write);
                Opened { fd: read, fresh: true }
            }
            End::Write => {
                store.deposit(args.object, End::Read as u8, read);
                Opened { fd: write, fresh: true }
            }
            End::Both => {
                store.deposit(args.object, End::Read as u8, read);
                store.deposit(args.object, End::Write as u8, write);
                Opened { fd: reopen(store, args)?, fresh: false }
            }
        })
    }

    fn same(a: &PipeState, b: &PipeState) -> Result<(), String> {
        same(a, b)
    }
}

pub(super) fn from_tail(tail: &[u8]) -> Option<PipeLive> {
    let t: crd_common::PipeTail = super::tail(tail)?;
    Some(PipeLive {
        readers: t.readers,
        writers: t.writers,
        queued: (t.flags & crd_common::PIPE_QUEUE_TRUNCATED == 0).then_some(t.queued),
        capacity: Some(t.max_usage.saturating_mul(page_size())),
    })
}

pub(super) fn held_outside(live: &PipeLive, inside: InsideUse) -> bool {
    live.readers > inside.readers || live.writers > inside.writers
}

pub(super) fn sketch(live: &PipeLive) -> PipeState {
    PipeState { capacity: live.capacity.unwrap_or(0), data: Vec::new() }
}

pub(super) fn detail(saved: &PipeState) -> Option<String> {
    Some(format!("capacity {} queued {}", saved.capacity, saved.data.len()))
}

pub(super) fn same(a: &PipeState, b: &PipeState) -> Result<(), String> {
    if a.capacity != b.capacity {
        return Err(format!("pipe capacity {} vs {}", a.capacity, b.capacity));
    }
    if a.data != b.data {
        return Err(format!("pipe holds {} queued bytes vs {} (or other bytes)", a.data.len(), b.data.len()));
    }
    Ok(())
}

/// The kernel's page size: a pipe's capacity is counted in pages.
fn page_size() -> u32 {
    static PAGE_SIZE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PAGE_SIZE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as u32
    })
}

/// Opens another description of a pipe or FIFO through its handle.
pub(super) fn reopen(store: &ObjectStore, args: &OpenArgs<'_>) -> Result<OwnedFd, KindError> {
    let handle = store
        .handle(args.object)
        .ok_or_else(|| KindError::Other(format!("the image refers to {} before saving it", args.object)))?;
    let path = format!("/proc/self/fd/{handle}");
    let flags = access_flags(args.access) | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    fcntl::open(path.as_str(), flags, Mode::empty()).map_err(|e| KindError::errno("open(/proc/self/fd/N)", e))
}

pub(super) fn access_flags(access: Access) -> OFlag {
    match (access.read, access.write) {
        (true, true) => OFlag::O_RDWR,
        (false, true) => OFlag::O_WRONLY,
        (true, false) => OFlag::O_RDONLY,
        (false, false) => OFlag::O_PATH,
    }
}

/// Gives a pipe its capacity and queues the saved bytes in it (the capacity first, so
/// the data always fits without blocking). `fresh`: made just now by `pipe2`, so empty.
pub(super) fn fill(write_end: &OwnedFd, saved: &PipeState, fresh: bool) -> Result<(), KindError> {
    let errno = |call| move |e: nix::Error| KindError::errno(call, e);
    let current =
        fcntl::fcntl(write_end.as_fd(), FcntlArg::F_GETPIPE_SZ).map_err(errno("fcntl(F_GETPIPE_SZ)"))?;
    if saved.capacity != 0 && current as u32 != saved.capacity {
        fcntl::fcntl(write_end.as_fd(), FcntlArg::F_SETPIPE_SZ(saved.capacity as i32))
            .map_err(errno("fcntl(F_SETPIPE_SZ)"))?;
    }
    if saved.data.len() > saved.capacity.max(current as u32) as usize {
        return Err(KindError::Other(format!("{} queued bytes exceed the pipe capacity", saved.data.len())));
    }
    let queued = if fresh { 0 } else { sys::pipe_queued(write_end.as_fd())? };
    if queued != 0 {
        // A FIFO opened again may still hold bytes from someone else: adding ours
        // would mix two streams.
        return Err(KindError::Other(format!("the pipe already holds {queued} bytes")));
    }
    let mut done = 0;
    while done < saved.data.len() {
        done += unistd::write(write_end.as_fd(), &saved.data[done..]).map_err(errno("write"))?;
    }
    Ok(())
}

/// Copies a frozen pipe's capacity and queue (see the module documentation).
pub(super) fn save(live: &PipeLive, reach: &Reach<'_>) -> Result<PipeState, KindError> {
    // A pipe the BPF harvester saw empty, with its capacity, needs no syscall.
    if let PipeLive { queued: Some(0), capacity: Some(capacity), .. } = *live {
        return Ok(PipeState { capacity, data: Vec::new() });
    }
    // Either end answers F_GETPIPE_SZ and FIONREAD, neither of which changes anything.
    let end = sys::pidfd_getfd(reach.pidfd, reach.fd)?;
    let capacity = fcntl::fcntl(end.as_fd(), FcntlArg::F_GETPIPE_SZ)
        .map_err(|e| KindError::errno("fcntl(F_GETPIPE_SZ)", e))? as u32;
    let queued = sys::pipe_queued(end.as_fd())?;
    let data = if queued == 0 {
        Vec::new()
    } else {
        // tee needs a read end: the target's own, or a fresh read-only open of it.
        let source: OwnedFd = if reach.access.read {
            end
        } else {
            let path = format!("/proc/{}/fd/{}", reach.tgid, reach.fd);
            let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
            fcntl::open(path.as_str(), flags, Mode::empty())
                .map_err(|e| KindError::errno("open(/proc/PID/fd/N)", e))?
        };
        copy_queue(&source, capacity, queued)?
    };
    // Two independent counts of one frozen queue must agree.
    if let Some(counted) = live.queued
        && counted as usize != data.len()
    {
        return Err(KindError::Other(format!(
            "the kernel counted {counted} bytes queued in its pipe but {} were copied; nothing was written",
            data.len()
        )));
    }
    Ok(PipeState { capacity, data })
}

/// Duplicates the queue with one tee(2) into a scratch pipe as large as the source, and
/// reads the copy. One call, because tee always starts from the head of the queue.
fn copy_queue(source: &OwnedFd, capacity: u32, queued: usize) -> Result<Vec<u8>, KindError> {
    let errno = |call| move |e: nix::Error| KindError::errno(call, e);
    let (scratch_r, scratch_w) =
        unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(errno("pipe2"))?;
    fcntl::fcntl(scratch_w.as_fd(), FcntlArg::F_SETPIPE_SZ(capacity as i32))
        .map_err(errno("fcntl(F_SETPIPE_SZ) on the scratch pipe"))?;
    let copied = fcntl::tee(source.as_fd(), scratch_w.as_fd(), queued, SpliceFFlags::SPLICE_F_NONBLOCK)
        .map_err(errno("tee"))?;
    if copied != queued {
        return Err(KindError::Other(format!(
            "could copy only {copied} of the {queued} bytes queued in its pipe; nothing was written"
        )));
    }
    drop(scratch_w);
    let mut data = Vec::with_capacity(queued);
    fs::File::from(scratch_r)
        .read_to_end(&mut data)
        .map_err(|e| KindError::Syscall(SyscallError { call: "read", source: e }))?;
    Ok(data)
}
