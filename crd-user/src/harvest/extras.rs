//! Facts the harvesters leave out, gathered while the targets are still frozen: the path
//! behind each named object, and each object's saved state with its contents (a pipe's
//! queue, a memfd's bytes), read by its kind ([`crate::kinds::FileKind::save`]).
use std::{collections::HashMap, fs, os::fd::AsFd};

use super::{FdInfo, Harvest};
use crate::{
    freeze::Frozen,
    kinds::{KindError, Live, Reach, Saved},
    sys::{self, SyscallError},
    types::{Fd, KernelPtr, Tgid},
};

#[derive(Debug, thiserror::Error)]
pub enum ExtrasError {
    #[error("PID {tgid} fd {fd} ({kind}): {source}")]
    Save { tgid: Tgid, fd: Fd, kind: &'static str, source: KindError },
    #[error("PID {tgid} fd {fd}: {source}")]
    Pidfd { tgid: Tgid, fd: Fd, source: SyscallError },
}

/// Each object's saved state, by the harvest's object identity.
#[derive(Clone, Debug, Default)]
pub struct Extras {
    pub saved: HashMap<KernelPtr, Saved>,
}

/// Fills in `link` for named objects and saves every object's state with its contents.
pub fn collect(harvest: &mut Harvest, frozen: &Frozen) -> Result<Extras, ExtrasError> {
    fill_links(harvest);
    // One fd per object to read it through: a readable one if the set has one (a pipe's
    // queue can only be copied from a read end).
    let mut sources: foldhash::HashMap<KernelPtr, &FdInfo> = foldhash::HashMap::default();
    for f in &harvest.fds {
        match sources.get(&f.file.object.id) {
            Some(old) if old.file.access.read || !f.file.access.read => {}
            _ => {
                sources.insert(f.file.object.id, f);
            }
        }
    }
    let mut extras = Extras::default();
    for (object, f) in sources {
        let live = &f.file.object.live;
        let pidfd = frozen.pidfd(f.tgid).ok_or_else(|| ExtrasError::Pidfd {
            tgid: f.tgid,
            fd: f.fd,
            source: SyscallError {
                call: "pidfd_open",
                source: std::io::Error::from_raw_os_error(libc::ESRCH),
            },
        })?;
        let reach = Reach { pidfd, tgid: f.tgid, fd: f.fd, access: f.file.access };
        let state = live.save(&reach).map_err(|source| ExtrasError::Save {
            tgid: f.tgid,
            fd: f.fd,
            kind: live.kind().name(),
            source,
        })?;
        extras.saved.insert(object, state);
    }
    Ok(extras)
}

/// Fills in `link` for named objects (files, directories, FIFOs, devices, anon files)
/// from /proc/PID/fd/N; pipes and sockets have no useful name and cost nothing.
pub fn fill_links(harvest: &mut Harvest) {
    for f in &mut harvest.fds {
        if f.link.is_none() && f.file.object.kind().has_path() {
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
    let mut pidfds: HashMap<Tgid, Option<std::os::fd::OwnedFd>> = HashMap::new();
    let mut counted: HashMap<KernelPtr, Option<u32>> = HashMap::new();
    for f in &harvest.fds {
        let unknown = matches!(&f.file.object.live, Live::Pipe(p) | Live::Fifo(p) if p.queued.is_none());
        if !unknown || counted.get(&f.file.object.id).is_some_and(Option::is_some) {
            continue;
        }
        let pidfd = pidfds.entry(f.tgid).or_insert_with(|| sys::pidfd_open(crate::types::Pid(f.tgid.0)).ok());
        let queued = pidfd
            .as_ref()
            .and_then(|pidfd| sys::pidfd_getfd(pidfd.as_fd(), f.fd).ok())
            .and_then(|end| sys::pipe_queued(end.as_fd()).ok())
            .and_then(|n| u32::try_from(n).ok());
        counted.insert(f.file.object.id, queued);
    }
    for f in &mut harvest.fds {
        if let Live::Pipe(pipe) | Live::Fifo(pipe) = &mut f.file.object.live
            && pipe.queued.is_none()
        {
            pipe.queued = counted.get(&f.file.object.id).copied().flatten();
        }
    }
}
