//! Facts the harvesters leave out, gathered while the targets are still frozen: the path
//! behind each named file, and each pipe's capacity and queued bytes.
//!
//! Pipe data is copied **without being consumed**: `tee(2)` duplicates the queued
//! buffers into a scratch pipe of crd's own, and crd reads the copy. The descriptor
//! tee reads from is either the target's own read end, fetched with `pidfd_getfd` — the
//! very same open file description, so crd changes nothing on it (no O_NONBLOCK: tee gets
//! SPLICE_F_NONBLOCK instead; no resize; no seek) — or, when the set holds only write
//! ends, a fresh read-only open of `/proc/PID/fd/N` whose flags are crd's alone.
use std::{
    collections::HashMap,
    fs,
    io::Read,
    os::fd::{AsFd, OwnedFd},
};

use nix::{
    fcntl::{self, FcntlArg, OFlag, SpliceFFlags},
    unistd,
};

use super::{FdInfo, Harvest, PipeInfo};
use crate::{
    freeze::Frozen,
    sys::{self, SyscallError},
    types::{Fd, KernelPtr, Tgid},
};

#[derive(Debug, thiserror::Error)]
pub enum ExtrasError {
    #[error("pipe {what} of PID {tgid} fd {fd}: {source}")]
    Pipe { what: &'static str, tgid: Tgid, fd: Fd, source: SyscallError },
    #[error(
        "PID {tgid} fd {fd}: the kernel counted {counted} bytes queued in its pipe but {copied} were copied; nothing was written"
    )]
    Mismatch { tgid: Tgid, fd: Fd, counted: u32, copied: usize },
    #[error(
        "PID {tgid} fd {fd}: could copy only {copied} of the {queued} bytes queued in its pipe; nothing was written"
    )]
    ShortCopy { tgid: Tgid, fd: Fd, copied: usize, queued: usize },
}

/// A pipe's capacity and the bytes queued in it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipeContents {
    /// F_GETPIPE_SZ, in bytes.
    pub capacity: u32,
    pub data: Vec<u8>,
}

/// Per-inode extras, keyed by the harvest's inode identity.
#[derive(Clone, Debug, Default)]
pub struct Extras {
    pub pipes: HashMap<KernelPtr, PipeContents>,
}

/// Fills in `link` for named objects and reads every pipe's contents.
pub fn collect(harvest: &mut Harvest, frozen: &Frozen) -> Result<Extras, ExtrasError> {
    fill_links(harvest);
    // One source fd per pipe inode: a read end if the set has one.
    let mut sources: foldhash::HashMap<KernelPtr, &FdInfo> = foldhash::HashMap::default();
    for f in harvest.fds.iter().filter(|f| f.file.inode.pipe.is_some()) {
        let better = |old: &&FdInfo| !old.file.access.read && f.file.access.read;
        match sources.get(&f.file.inode.id) {
            Some(old) if !better(old) => {}
            _ => {
                sources.insert(f.file.inode.id, f);
            }
        }
    }
    let mut extras = Extras::default();
    for (inode, f) in sources {
        let pipe = f.file.inode.pipe.as_ref();
        // A pipe the BPF harvester saw empty, with its capacity, needs no syscall.
        if let Some(&PipeInfo { queued: Some(0), capacity: Some(capacity), .. }) = pipe {
            extras.pipes.insert(inode, PipeContents { capacity, data: Vec::new() });
            continue;
        }
        let contents = read_pipe(f, frozen)?;
        // Two independent counts of one frozen queue must agree.
        if let Some(counted) = f.file.inode.pipe.as_ref().and_then(|p| p.queued)
            && counted as usize != contents.data.len()
        {
            return Err(ExtrasError::Mismatch {
                tgid: f.tgid,
                fd: f.fd,
                counted,
                copied: contents.data.len(),
            });
        }
        extras.pipes.insert(inode, contents);
    }
    Ok(extras)
}

/// Fills in `link` for named objects (files, directories, FIFOs, devices) from
/// /proc/PID/fd/N; pipes and sockets have no useful name and cost nothing.
pub fn fill_links(harvest: &mut Harvest) {
    for f in &mut harvest.fds {
        if f.link.is_none() && f.file.inode.kind.has_path() {
            let path = format!("/proc/{}/fd/{}", f.tgid.0, f.fd.0);
            f.link = fs::read_link(path).ok().map(|p| p.to_string_lossy().into_owned());
        }
    }
}

/// Counts the bytes queued in each pipe the harvester could not count (/proc never can;
/// BPF stops after `MAX_PIPE_BUFS_WALKED` buffers) with FIONREAD on a copy of one of its
/// fds. For `crd ls`, which freezes nothing: best effort, a process that exits or
/// refuses pidfd_getfd leaves the count unknown.
pub fn count_queued(harvest: &mut Harvest) {
    let mut pidfds: HashMap<Tgid, Option<OwnedFd>> = HashMap::new();
    let mut counted: HashMap<KernelPtr, Option<u32>> = HashMap::new();
    for f in &harvest.fds {
        let unknown = f.file.inode.pipe.as_ref().is_some_and(|p| p.queued.is_none());
        if !unknown || counted.get(&f.file.inode.id).is_some_and(Option::is_some) {
            continue;
        }
        let pidfd = pidfds.entry(f.tgid).or_insert_with(|| sys::pidfd_open(crate::types::Pid(f.tgid.0)).ok());
        let queued = pidfd
            .as_ref()
            .and_then(|pidfd| sys::pidfd_getfd(pidfd.as_fd(), f.fd).ok())
            .and_then(|end| sys::pipe_queued(end.as_fd()).ok())
            .and_then(|n| u32::try_from(n).ok());
        counted.insert(f.file.inode.id, queued);
    }
    for f in &mut harvest.fds {
        if let Some(pipe) = &mut f.file.inode.pipe
            && pipe.queued.is_none()
        {
            pipe.queued = counted.get(&f.file.inode.id).copied().flatten();
        }
    }
}

fn read_pipe(f: &FdInfo, frozen: &Frozen) -> Result<PipeContents, ExtrasError> {
    let err = |what, source| ExtrasError::Pipe { what, tgid: f.tgid, fd: f.fd, source };
    let pidfd = frozen.pidfd(f.tgid).ok_or_else(|| {
        err(
            "pidfd",
            SyscallError { call: "pidfd_open", source: std::io::Error::from_raw_os_error(libc::ESRCH) },
        )
    })?;
    // Either end answers F_GETPIPE_SZ and FIONREAD, neither of which changes anything.
    let end = sys::pidfd_getfd(pidfd, f.fd).map_err(|e| err("pidfd_getfd", e))?;
    let capacity = fcntl::fcntl(end.as_fd(), FcntlArg::F_GETPIPE_SZ)
        .map_err(|e| err("size", SyscallError { call: "fcntl(F_GETPIPE_SZ)", source: e.into() }))?
        as u32;
    let queued = sys::pipe_queued(end.as_fd()).map_err(|e| err("queue", e))?;
    if queued == 0 {
        return Ok(PipeContents { capacity, data: Vec::new() });
    }
    // tee needs a read end: the target's own, or a fresh read-only open of it.
    let source: OwnedFd = if f.file.access.read {
        end
    } else {
        let path = format!("/proc/{}/fd/{}", f.tgid.0, f.fd.0);
        let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        fcntl::open(path.as_str(), flags, nix::sys::stat::Mode::empty())
            .map_err(|e| err("open", SyscallError { call: "open(/proc/PID/fd/N)", source: e.into() }))?
    };
    let data = copy_queue(&source, capacity, queued).map_err(|e| match e {
        CopyError::Syscall(e) => err("copy", e),
        CopyError::Short(copied) => ExtrasError::ShortCopy { tgid: f.tgid, fd: f.fd, copied, queued },
    })?;
    Ok(PipeContents { capacity, data })
}

enum CopyError {
    Syscall(SyscallError),
    Short(usize),
}

fn syscall(call: &'static str) -> impl Fn(nix::errno::Errno) -> CopyError {
    move |e| CopyError::Syscall(SyscallError { call, source: e.into() })
}

/// Duplicates the queue with one tee(2) into a scratch pipe as large as the source, and
/// reads the copy. One call, because tee always starts from the head of the queue.
fn copy_queue(source: &OwnedFd, capacity: u32, queued: usize) -> Result<Vec<u8>, CopyError> {
    let (scratch_r, scratch_w) =
        unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(syscall("pipe2"))?;
    fcntl::fcntl(scratch_w.as_fd(), FcntlArg::F_SETPIPE_SZ(capacity as i32))
        .map_err(syscall("fcntl(F_SETPIPE_SZ) on the scratch pipe"))?;
    let copied = fcntl::tee(source.as_fd(), scratch_w.as_fd(), queued, SpliceFFlags::SPLICE_F_NONBLOCK)
        .map_err(syscall("tee"))?;
    if copied != queued {
        return Err(CopyError::Short(copied));
    }
    drop(scratch_w);
    let mut data = Vec::with_capacity(queued);
    fs::File::from(scratch_r)
        .read_to_end(&mut data)
        .map_err(|e| CopyError::Syscall(SyscallError { call: "read", source: e }))?;
    Ok(data)
}
