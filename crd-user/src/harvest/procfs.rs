//! The /proc harvester: the same typed records as the BPF harvester, from
//! `/proc/PID/{task,fd,fdinfo}` and kcmp(2).
//!
//! /proc shows no kernel pointers, so identities are synthetic but carry the same
//! meaning: kcmp(KCMP_FILES) groups threads by fd table, (st_dev, st_ino) names an inode,
//! kcmp(KCMP_FILE) groups fds by open file description. /proc shows no reference counts
//! either: they are counted by scanning every other process's fds for the same objects,
//! so that both harvesters mark the same objects as held from outside. Sockets are read
//! with sock_diag, one dump per network namespace ([`super::sockets`]).
use std::{
    collections::{BTreeSet, HashMap},
    fs,
    os::unix::fs::MetadataExt,
};

use super::{
    FdInfo, FileInfo, Harvest, HarvestError, HarvestStats, Harvester, ObjectInfo, Scope, Source, TaskInfo,
    sockets::{self, Sockets},
};
use crate::{
    freeze::list_threads,
    kinds::{
        Identity, Kind, Live, ProcSlot, Recognise,
        socket::{Family, SocketFacts},
    },
    model::Session,
    sys::{Kcmp, SyscallError, kcmp_same},
    types::{Access, DeviceId, Fd, KernelPtr, Pid, Tgid},
};

#[derive(Debug, thiserror::Error)]
pub enum ProcfsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error(transparent)]
    Syscall(#[from] SyscallError),
}

/// Synthetic identities: a tag per object class so they never collide.
const TABLE_TAG: u64 = 0x7ab1 << 48;
const FILE_TAG: u64 = 0xf11e << 48;
const INODE_TAG: u64 = 0x1d0e << 48;

struct Slot {
    link: String,
    fdinfo: String,
    size: u64,
    dev: u64,
    ino: u64,
    mode: u32,
    rdev: u64,
    flags: u32,
    pos: i64,
}

fn read_slot(tid: Pid, fd: Fd) -> Result<Option<Slot>, ProcfsError> {
    let path = format!("/proc/{}/fd/{}", tid.0, fd.0);
    // An fd closed between the listing and here is simply not there.
    let Ok(link) = fs::read_link(&path) else {
        return Ok(None);
    };
    let Ok(meta) = fs::metadata(&path) else {
        return Ok(None);
    };
    let info_path = format!("/proc/{}/fdinfo/{}", tid.0, fd.0);
    let Ok(info) = fs::read_to_string(&info_path) else {
        return Ok(None);
    };
    let mut flags = 0;
    let mut pos = 0;
    for line in info.lines() {
        if let Some(v) = line.strip_prefix("flags:") {
            flags = u32::from_str_radix(v.trim(), 8).unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("pos:") {
            pos = v.trim().parse().unwrap_or(0);
        }
    }
    Ok(Some(Slot {
        link: link.to_string_lossy().into_owned(),
        size: meta.size(),
        dev: meta.dev(),
        ino: meta.ino(),
        mode: meta.mode(),
        rdev: meta.rdev(),
        flags,
        pos,
        fdinfo: info,
    }))
}

fn list_fds(tid: Pid) -> Vec<Fd> {
    let Ok(entries) = fs::read_dir(format!("/proc/{}/fd", tid.0)) else {
        return Vec::new();
    };
    let mut fds: Vec<u32> = entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    fds.sort_unstable();
    fds.into_iter().map(Fd).collect()
}

/// What the link says of the kind: the filesystem of pipes and anon files (whose
/// names say what they are), and the link itself for the kinds that recognise theirs;
/// a socket's family from its facts.
fn classify(slot: &Slot, socket: Option<&SocketFacts>) -> Kind {
    let (fs_magic, name) = if slot.link.starts_with("pipe:[") {
        (Some(crd_common::PIPEFS_MAGIC), None)
    } else if let Some(name) = slot.link.strip_prefix("anon_inode:") {
        (Some(crd_common::ANON_INODE_FS_MAGIC), Some(name))
    } else {
        (None, None)
    };
    Kind::recognise(&Recognise {
        mode: slot.mode,
        fs_magic,
        name,
        rdev: DeviceId::from_user(slot.rdev),
        link: Some(&slot.link),
        family: socket.map(|f| f.family.raw()),
    })
}

/// What is known of the socket at `fd`: sock_diag's facts (unix, TCP, UDP), else its
/// family (`system.sockprotoname`) with the type and protocol `getsockopt` gives on a
/// copy of the fd; None when not even the family can be read. A socket is never dropped.
fn socket_facts(sockets: &mut Sockets, tgid: Tgid, tid: Pid, fd: Fd, slot: &Slot) -> Option<SocketFacts> {
    if slot.mode & libc::S_IFMT != libc::S_IFSOCK {
        return None;
    }
    let known = sockets.facts(tid, slot.ino).cloned();
    let family = || {
        let name = sockets::protoname(&format!("/proc/{}/fd/{}", tid.0, fd.0))?;
        sockets::family_of_protoname(&name).map(Family::from_raw)
    };
    let mut facts = known.or_else(|| family().map(SocketFacts::unknown))?;
    if facts.sock_type == crate::kinds::socket::SockType::Other(0)
        && let Some((sock_type, protocol)) = sockets::type_and_protocol(Pid(tgid.0), fd)
    {
        facts.sock_type = sock_type;
        facts.protocol = protocol;
    }
    Some(facts)
}

/// Whether `facts` are what the inet kind takes: TCP or UDP (sock_diag's answers). An
/// inet socket of another protocol (raw, UDP-Lite, SCTP...) is an opaque `socket`.
fn is_tcp_or_udp(facts: &SocketFacts) -> bool {
    use crate::kinds::socket::SockType;
    matches!(
        (facts.sock_type, i32::from(facts.protocol)),
        (SockType::Stream, libc::IPPROTO_TCP) | (SockType::Dgram, libc::IPPROTO_UDP)
    )
}

/// kcmp(2) between two tasks, where either may have exited since it was listed (a
/// harvest that freezes nothing, such as `ls --all` on a busy machine): a task gone
/// shares nothing any more (ESRCH is "not the same"), where failing would fail the whole
/// listing for one process that ended. Frozen targets cannot end meanwhile.
fn same_unless_gone(a: Pid, b: Pid, what: Kcmp) -> Result<bool, SyscallError> {
    match kcmp_same(a, b, what) {
        Err(e) if e.errno() == Some(libc::ESRCH) => Ok(false),
        other => other,
    }
}

/// One open file description found so far: where to kcmp it from, and its identity.
struct Description {
    tid: Pid,
    fd: Fd,
    id: KernelPtr,
}

/// The /proc harvester (nothing to load).
pub struct ProcfsHarvester;

impl Harvester for ProcfsHarvester {
    fn source(&self) -> Source {
        Source::Procfs
    }

    fn harvest(
        &mut self,
        scope: Scope<'_>,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<(Harvest, HarvestStats), HarvestError> {
        if interrupted() {
            return Err(HarvestError::Interrupted(crate::interrupt::Interrupted));
        }
        let harvest = match scope {
            Scope::Processes(tgids) => harvest(tgids)?,
            Scope::All => harvest(&super::all_processes())?,
        };
        Ok((harvest, HarvestStats::default()))
    }
}

/// Harvests `tgids` (every thread) from /proc.
pub fn harvest(tgids: &[Tgid]) -> Result<Harvest, ProcfsError> {
    let mut harvest = Harvest::default();
    let mut tables: Vec<(Pid, KernelPtr)> = Vec::new();
    let mut seen = Seen {
        inodes: HashMap::new(),
        descriptions: HashMap::new(),
        links: HashMap::new(),
        sockets: Sockets::new(),
    };

    for &tgid in tgids {
        let session = Session::of(tgid);
        for tid in list_threads(tgid) {
            let status_path = format!("/proc/{}/task/{}/status", tgid.0, tid.0);
            let Ok(status) = fs::read_to_string(&status_path) else {
                continue;
            };
            let field =
                |name: &str| status.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()));
            let comm = field("Name:").unwrap_or_default();
            let parent = Tgid(field("PPid:").and_then(|v| v.parse().ok()).unwrap_or(0));
            let mut table = None;
            for (rep, id) in &tables {
                if same_unless_gone(*rep, tid, Kcmp::Files)? {
                    table = Some(*id);
                    break;
                }
            }
            let fd_table = match table {
                Some(id) => id,
                None => {
                    let id = KernelPtr(TABLE_TAG | (tables.len() as u64 + 1));
                    tables.push((tid, id));
                    read_table(tgid, tid, id, &mut seen, &mut harvest)?;
                    id
                }
            };
            harvest.tasks.push(TaskInfo { pid: tid, tgid, parent, comm, fd_table, session });
        }
    }
    count_references(tgids, &mut harvest, &seen.descriptions, &seen.links)?;
    Ok(harvest.dedup())
}

/// What one harvest has met so far, across fd tables.
struct Seen {
    /// (st_dev, st_ino) → the inode's identity.
    inodes: HashMap<(u64, u64), KernelPtr>,
    /// The descriptions of each inode.
    descriptions: HashMap<KernelPtr, Vec<Description>>,
    /// Each link seen in the set, with its inode's identity: where to look for the same
    /// objects in other processes.
    links: HashMap<String, KernelPtr>,
    /// sock_diag's answers, per network namespace.
    sockets: Sockets,
}

fn read_table(
    tgid: Tgid,
    tid: Pid,
    table: KernelPtr,
    seen: &mut Seen,
    harvest: &mut Harvest,
) -> Result<(), ProcfsError> {
    let Seen { inodes, descriptions, links, sockets } = seen;
    for fd in list_fds(tid) {
        let Some(slot) = read_slot(tid, fd)? else {
            continue;
        };
        let next_inode = INODE_TAG | (inodes.len() as u64 + 1);
        let inode_id = *inodes.entry((slot.dev, slot.ino)).or_insert(KernelPtr(next_inode));
        links.insert(slot.link.clone(), inode_id);
        let same_inode = descriptions.entry(inode_id).or_default();
        let mut file_id = None;
        for d in same_inode.iter() {
            if same_unless_gone(d.tid, tid, Kcmp::File(d.fd, fd))? {
                file_id = Some(d.id);
                break;
            }
        }
        let file_id = file_id.unwrap_or_else(|| {
            let id = KernelPtr(FILE_TAG | (inode_id.0 & 0xffff_ffff) << 16 | (same_inode.len() as u64 + 1));
            same_inode.push(Description { tid, fd, id });
            id
        });
        let socket = socket_facts(sockets, tgid, tid, fd, &slot);
        let kind = match classify(&slot, socket.as_ref()) {
            Kind::Inet if !socket.as_ref().is_some_and(is_tcp_or_udp) => Kind::Socket,
            kind => kind,
        };
        let live = Live::from_proc(
            kind,
            &ProcSlot {
                tgid,
                fd,
                fdinfo: &slot.fdinfo,
                link: &slot.link,
                size: slot.size,
                rdev: DeviceId::from_user(slot.rdev),
                socket: socket.as_ref(),
            },
        );
        // /proc shows no private objects: an anon file's object is its description.
        let object_id = match live.identity() {
            Identity::Inode => inode_id,
            Identity::Private => file_id,
        };
        harvest.fds.push(FdInfo {
            tgid,
            fd_table: table,
            fd,
            close_on_exec: slot.flags & libc::O_CLOEXEC as u32 != 0,
            link: Some(slot.link.clone()),
            file: FileInfo {
                id: file_id,
                flags: slot.flags & !(libc::O_CLOEXEC as u32),
                access: Access::from_open_flags(slot.flags),
                pos: slot.pos,
                refs: 0,
                object: ObjectInfo {
                    id: object_id,
                    ino: slot.ino,
                    mode: slot.mode,
                    dev: DeviceId::from_user(slot.dev),
                    rdev: DeviceId::from_user(slot.rdev),
                    live,
                },
            },
        });
    }
    Ok(())
}

/// Fills in what the kernel would count: references to each description and the
/// readers/writers of each pipe, from the set itself and from every other process.
fn count_references(
    tgids: &[Tgid],
    harvest: &mut Harvest,
    descriptions: &HashMap<KernelPtr, Vec<Description>>,
    by_link: &HashMap<String, KernelPtr>,
) -> Result<(), ProcfsError> {
    let mut file_refs: HashMap<KernelPtr, u64> = HashMap::new();
    let mut pipe_ends: HashMap<KernelPtr, (BTreeSet<KernelPtr>, BTreeSet<KernelPtr>)> = HashMap::new();
    for f in &harvest.fds {
        *file_refs.entry(f.file.id).or_default() += 1;
        if f.file.object.kind().is_pipe_like() {
            let ends = pipe_ends.entry(f.file.object.id).or_default();
            if f.file.access.read {
                ends.0.insert(f.file.id);
            }
            if f.file.access.write {
                ends.1.insert(f.file.id);
            }
        }
    }
    let mut outside_readers: HashMap<KernelPtr, u32> = HashMap::new();
    let mut outside_writers: HashMap<KernelPtr, u32> = HashMap::new();
    // Links worth a closer look (`by_link`): the same name as something in the set.
    let me = std::process::id();
    let inside: BTreeSet<u32> = tgids.iter().map(|t| t.0).collect();
    let Ok(procs) = fs::read_dir("/proc") else {
        return Ok(());
    };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || inside.contains(&pid) {
            continue;
        }
        for fd in list_fds(Pid(pid)) {
            let Ok(link) = fs::read_link(format!("/proc/{pid}/fd/{}", fd.0)) else {
                continue;
            };
            let Some(&inode) = by_link.get(link.to_string_lossy().as_ref()) else {
                continue;
            };
            let Some(slot) = read_slot(Pid(pid), fd)? else {
                continue;
            };
            let mut same_description = None;
            for d in descriptions.get(&inode).into_iter().flatten() {
                if kcmp_same(d.tid, Pid(pid), Kcmp::File(d.fd, fd)).unwrap_or(false) {
                    same_description = Some(d.id);
                    break;
                }
            }
            match same_description {
                Some(id) => *file_refs.entry(id).or_default() += 1,
                None => {
                    let access = Access::from_open_flags(slot.flags);
                    if access.read {
                        *outside_readers.entry(inode).or_default() += 1;
                    }
                    if access.write {
                        *outside_writers.entry(inode).or_default() += 1;
                    }
                }
            }
        }
    }
    for f in &mut harvest.fds {
        f.file.refs = file_refs.get(&f.file.id).copied().unwrap_or(0);
        let inode = f.file.object.id;
        if let Live::Pipe(pipe) | Live::Fifo(pipe) = &mut f.file.object.live {
            let (r, w) = pipe_ends.get(&inode).map(|(r, w)| (r.len(), w.len())).unwrap_or_default();
            pipe.readers = r as u32 + outside_readers.get(&inode).copied().unwrap_or(0);
            pipe.writers = w as u32 + outside_writers.get(&inode).copied().unwrap_or(0);
        }
    }
    Ok(())
}

/// Describes one of crd's own fds the way the harvest describes a target's: a file
/// received in flight from a socket's queue. `id` names the description; `object`,
/// where given, names its object (the same inode the harvest already holds).
pub fn own_file(
    fd: Fd,
    id: KernelPtr,
    object: Option<KernelPtr>,
) -> Result<Option<(String, FileInfo)>, ProcfsError> {
    let me = Pid(std::process::id());
    let Some(slot) = read_slot(me, fd)? else {
        return Ok(None);
    };
    // A socket in flight: sock_diag of crd's own namespace knows it (files in flight are
    // rare; one dump each is fine).
    let socket = socket_facts(&mut Sockets::new(), Tgid(me.0), me, fd, &slot);
    let kind = classify(&slot, socket.as_ref());
    let live = Live::from_proc(
        kind,
        &ProcSlot {
            tgid: Tgid(me.0),
            fd,
            fdinfo: &slot.fdinfo,
            link: &slot.link,
            size: slot.size,
            rdev: DeviceId::from_user(slot.rdev),
            socket: socket.as_ref(),
        },
    );
    let object_id = match (live.identity(), object) {
        (Identity::Inode, Some(object)) => object,
        _ => KernelPtr(id.0 ^ INODE_TAG),
    };
    let file = FileInfo {
        id,
        flags: slot.flags & !(libc::O_CLOEXEC as u32),
        access: Access::from_open_flags(slot.flags),
        pos: slot.pos,
        // Only the message holds it.
        refs: 1,
        object: ObjectInfo {
            id: object_id,
            ino: slot.ino,
            mode: slot.mode,
            dev: DeviceId::from_user(slot.dev),
            rdev: DeviceId::from_user(slot.rdev),
            live,
        },
    };
    Ok(Some((slot.link, file)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_that_is_gone_shares_nothing_rather_than_failing_the_harvest() {
        let me = Pid(std::process::id());
        let max: u32 = fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
        // Above pid_max: never a task.
        let gone = Pid(max + 1);
        assert!(matches!(kcmp_same(me, gone, Kcmp::Files), Err(e) if e.errno() == Some(libc::ESRCH)));
        assert!(!same_unless_gone(me, gone, Kcmp::Files).unwrap());
        assert!(!same_unless_gone(gone, me, Kcmp::File(Fd(0), Fd(0))).unwrap());
        assert!(same_unless_gone(me, me, Kcmp::Files).unwrap(), "a live task still compares");
    }
}
