//! Facts the harvesters leave out, gathered while the targets are still frozen: the path
//! behind each named object, and each object's saved state with its contents (a pipe's
//! queue, a memfd's bytes), read by its kind ([`crate::kinds::FileKind::save`]).
use std::{
    cell::RefCell,
    collections::HashMap,
    fs,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    os::unix::fs::MetadataExt,
};

use super::{FdInfo, Harvest, procfs};
use crate::{
    freeze::Frozen,
    kinds::{HolderIndex, Holders, KindError, Live, Reach, SaveOptions, epoll},
    model::{Carried, Saves},
    sys::{self, Kcmp, SyscallError},
    types::{DeviceId, Fd, KernelPtr, Pid, Tgid},
};

#[derive(Debug, thiserror::Error)]
pub enum ExtrasError {
    #[error("PID {tgid} fd {fd} ({kind}): {source}")]
    Save { tgid: Tgid, fd: Fd, kind: &'static str, source: KindError },
    #[error("PID {tgid} fd {fd}: {source}")]
    Pidfd { tgid: Tgid, fd: Fd, source: SyscallError },
    #[error("PID {tgid} fd {fd}: a file in flight in its queue: {detail}")]
    InFlight { tgid: Tgid, fd: Fd, detail: String },
}

/// Identities of files found only in flight (no fd table holds them).
const IN_FLIGHT_TAG: u64 = 0x1f17 << 48;

/// How deep files in flight may nest (a socket in flight carrying a socket in flight...).
const MAX_IN_FLIGHT_DEPTH: usize = 4;

/// What extras saved.
#[derive(Clone, Debug, Default)]
pub struct Extras {
    pub saved: Saves,
}

/// Fills in `link` for named objects and saves every object's state with its contents
/// (and what `options` asks for beyond that).
pub fn collect(harvest: &mut Harvest, frozen: &Frozen, options: SaveOptions) -> Result<Extras, ExtrasError> {
    fill_links(harvest);
    // One fd per object to read it through: a readable one if the set has one (a pipe's
    // queue can only be copied from a read end).
    let mut sources: foldhash::HashMap<KernelPtr, &FdInfo> =
        foldhash::HashMap::with_capacity_and_hasher(harvest.fds.len(), Default::default());
    for f in &harvest.fds {
        match sources.get(&f.file.object.id) {
            Some(old) if old.file.access.read || !f.file.access.read => {}
            _ => {
                sources.insert(f.file.object.id, f);
            }
        }
    }
    let holders = Holders::new(|| holders(harvest, frozen));
    let mut extras = Extras::default();
    extras.saved.states.reserve(sources.len());
    // Files found in flight, to identify once every object is saved: (the object
    // carrying them, where it was reached, the fds received).
    let mut in_flight: Vec<(KernelPtr, Tgid, Fd, Vec<OwnedFd>)> = Vec::new();
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
        let carried = RefCell::new(Vec::new());
        let reach = Reach {
            pidfd,
            tgid: f.tgid,
            fd: f.fd,
            access: f.file.access,
            carried: &carried,
            options,
            holders: &holders,
        };
        let state = live.save(&reach).map_err(|source| ExtrasError::Save {
            tgid: f.tgid,
            fd: f.fd,
            kind: live.kind().name(),
            source,
        })?;
        extras.saved.states.insert(object, state);
        let carried = carried.into_inner();
        if !carried.is_empty() {
            in_flight.push((object, f.tgid, f.fd, carried));
        }
    }
    identify_in_flight(harvest, in_flight, &mut extras.saved, options, &holders)?;
    Ok(extras)
}

/// Every harvested fd by the inode it opens, with the frozen processes' pidfds.
fn holders<'f>(harvest: &Harvest, frozen: &'f Frozen) -> HolderIndex<'f> {
    let mut holders = HolderIndex::default();
    for f in &harvest.fds {
        holders.by_inode.entry((f.file.object.dev, f.file.object.ino)).or_default().push((f.tgid, f.fd));
        holders.by_file.entry(f.file.id).or_default().push((f.tgid, f.fd));
        if let Some(pidfd) = frozen.pidfd(f.tgid) {
            holders.pidfds.insert(f.tgid, pidfd);
        }
    }
    holders
}

/// Names each file found in flight as the harvest names it: the very description an fd
/// of the set holds (kcmp), or a description of its own on an object the set holds, or
/// on an object only the message holds — whose state is then saved through crd's own
/// copy (and which may carry files in turn).
fn identify_in_flight(
    harvest: &Harvest,
    mut pending: Vec<(KernelPtr, Tgid, Fd, Vec<OwnedFd>)>,
    saves: &mut Saves,
    options: SaveOptions,
    holders: &Holders<'_>,
) -> Result<(), ExtrasError> {
    if pending.is_empty() {
        return Ok(());
    }
    let me = Pid(std::process::id());
    let mut by_inode: HashMap<(DeviceId, u64), Vec<&FdInfo>> = HashMap::new();
    for f in &harvest.fds {
        by_inode.entry((f.file.object.dev, f.file.object.ino)).or_default().push(f);
    }
    let own_pidfd =
        sys::pidfd_open(me).map_err(|source| ExtrasError::Pidfd { tgid: Tgid(me.0), fd: Fd(0), source })?;
    let mut next = 0u64;
    // Kept open until every state is saved: a received fd closed early could let its
    // number be reused by the next one and confuse two files.
    let mut keep: Vec<OwnedFd> = Vec::new();
    for _depth in 0..MAX_IN_FLIGHT_DEPTH {
        let mut deeper = Vec::new();
        for (carrier, tgid, fd, fds) in pending {
            let err = |detail: String| ExtrasError::InFlight { tgid, fd, detail };
            let mut list = Vec::with_capacity(fds.len());
            for received in fds {
                let meta = fs::metadata(format!("/proc/self/fd/{}", received.as_raw_fd()))
                    .map_err(|e| err(format!("cannot stat it: {e}")))?;
                let candidates = by_inode.get(&(DeviceId::from_user(meta.dev()), meta.ino()));
                let own = Fd(received.as_raw_fd() as u32);
                let same = candidates
                    .into_iter()
                    .flatten()
                    .find(|f| sys::kcmp_same(me, Pid(f.tgid.0), Kcmp::File(own, f.fd)).unwrap_or(false));
                if let Some(f) = same {
                    list.push(Carried { link: f.link.clone(), file: f.file.clone() });
                    keep.push(received);
                    continue;
                }
                next += 1;
                let object = candidates.and_then(|c| c.first()).map(|f| f.file.object.id);
                let (link, file) = procfs::own_file(own, KernelPtr(IN_FLIGHT_TAG | next), object)
                    .map_err(|e| err(e.to_string()))?
                    .ok_or_else(|| err("it vanished from crd's own fd table".into()))?;
                if let std::collections::hash_map::Entry::Vacant(slot) = saves.states.entry(file.object.id) {
                    let carried = RefCell::new(Vec::new());
                    let reach = Reach {
                        pidfd: own_pidfd.as_fd(),
                        tgid: Tgid(me.0),
                        fd: own,
                        access: file.access,
                        carried: &carried,
                        options,
                        holders,
                    };
                    let state = file.object.live.save(&reach).map_err(|e| err(e.to_string()))?;
                    slot.insert(state);
                    let carried = carried.into_inner();
                    if !carried.is_empty() {
                        deeper.push((file.object.id, tgid, fd, carried));
                    }
                }
                list.push(Carried { link: Some(link), file });
                keep.push(received);
            }
            saves.carried.insert(carrier, list);
        }
        pending = deeper;
        if pending.is_empty() {
            return Ok(());
        }
    }
    let (_, tgid, fd, _) = &pending[0];
    Err(ExtrasError::InFlight {
        tgid: *tgid,
        fd: *fd,
        detail: format!("files in flight nest more than {MAX_IN_FLIGHT_DEPTH} deep"),
    })
}

/// Fills in `link` for named objects (files, directories, FIFOs, devices, anon files)
/// from /proc/PID/fd/N; pipes and sockets have no useful name and cost nothing. Then the
/// state BPF left to fdinfo ([`crate::kinds::FileKind::fdinfo_pending`]: a pidfd's
/// process, an inotify's watches) is read from /proc/PID/fdinfo/N, through the kind's
/// own /proc reader. A process gone meanwhile leaves it pending (sketched as unknown).
/// Each epoll's interest list that BPF's walk did not give (see
/// [`crate::kinds::epoll::Walked`]) is read the same way.
pub fn fill_links(harvest: &mut Harvest) {
    for f in &mut harvest.fds {
        if f.link.is_none() && f.file.object.kind().has_path() {
            let path = format!("/proc/{}/fd/{}", f.tgid.0, f.fd.0);
            f.link = fs::read_link(path).ok().map(|p| p.to_string_lossy().into_owned());
        }
        if f.file.object.live.fdinfo_pending()
            && let Ok(fdinfo) = fs::read_to_string(format!("/proc/{}/fdinfo/{}", f.tgid.0, f.fd.0))
        {
            let slot = crate::kinds::ProcSlot {
                tgid: f.tgid,
                fd: f.fd,
                fdinfo: &fdinfo,
                link: f.link.as_deref().unwrap_or_default(),
                size: 0,
                rdev: f.file.object.rdev,
                socket: None,
            };
            f.file.object.live = Live::from_proc(f.file.object.kind(), &slot);
        }
        if let Live::Epoll(live) = &mut f.file.object.live
            && live.items.is_none()
        {
            live.items = epoll::read_items(f.tgid, f.fd);
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

/// What `crd ls` can tell of a unix socket's receive queue without freezing anything or
/// reading the queue (a peek would move the target's own peek offset under it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnixQueue {
    /// Bytes queued: 0 for a stream socket one sock_diag dump of its namespace shows
    /// empty (`UNIX_DIAG_RQLEN`), else FIONREAD on a `pidfd_getfd` copy. The kernel sums
    /// every message of a stream or seqpacket socket but counts only the first datagram
    /// of a datagram socket, so those (and listeners, and fds crd could not reach) say
    /// None.
    pub bytes: Option<u64>,
    /// Files in flight in the queue, from the `scm_fds:` line of the fd's fdinfo (the
    /// kernel's own count, `unix_sock::scm_stat`; Linux 5.8+). None: no such line.
    pub fds_in_flight: Option<u32>,
}

/// [`UnixQueue`] of every unix socket of the harvest, by (device, inode). Best effort,
/// as [`count_queued`]: a process that exits in between leaves the counts unknown.
pub fn unix_queues(harvest: &Harvest) -> HashMap<(DeviceId, u64), UnixQueue> {
    use crate::kinds::socket::SockType;
    let mut pidfds: HashMap<Tgid, Option<OwnedFd>> = HashMap::new();
    let mut queues: HashMap<(DeviceId, u64), UnixQueue> = HashMap::new();
    let mut dumped = super::sockets::UnixReceiveQueues::default();
    for f in &harvest.fds {
        let Live::Unix(facts) = &f.file.object.live else { continue };
        let key = (f.file.object.dev, f.file.object.ino);
        if queues.get(&key).is_some_and(|q| q.bytes.is_some() && q.fds_in_flight.is_some()) {
            continue;
        }
        // An empty stream socket, as one sock_diag dump tells for all of them: nothing
        // queued, and so no fd in flight (a stream socket sends fds only with bytes).
        // Anything else is asked socket by socket.
        if facts.sock_type == SockType::Stream
            && !facts.is_listening()
            && dumped.bytes(Pid(f.tgid.0), f.file.object.ino) == Some(0)
        {
            queues.insert(key, UnixQueue { bytes: Some(0), fds_in_flight: Some(0) });
            continue;
        }
        let fdinfo = fs::read_to_string(format!("/proc/{}/fdinfo/{}", f.tgid.0, f.fd.0)).unwrap_or_default();
        let fds_in_flight =
            fdinfo.lines().find_map(|l| l.strip_prefix("scm_fds:")).and_then(|n| n.trim().parse().ok());
        let counts_every_byte = matches!(facts.sock_type, SockType::Stream | SockType::Seqpacket);
        let bytes = if counts_every_byte && !facts.is_listening() {
            let pidfd = pidfds.entry(f.tgid).or_insert_with(|| sys::pidfd_open(Pid(f.tgid.0)).ok());
            pidfd
                .as_ref()
                .and_then(|pidfd| sys::pidfd_getfd(pidfd.as_fd(), f.fd).ok())
                .and_then(|copy| sys::pipe_queued(copy.as_fd()).ok())
                .map(|n| n as u64)
        } else {
            None
        };
        let known = queues.entry(key).or_default();
        known.bytes = known.bytes.or(bytes);
        known.fds_in_flight = known.fds_in_flight.or(fds_in_flight);
    }
    queues
}
