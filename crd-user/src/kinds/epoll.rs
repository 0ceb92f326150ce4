//! epoll: an interest list (`struct eventpoll`) of files, each registered under an fd
//! number with its events and 64 bits of user data.
//!
//! - Recognised by its anon-inode name `[eventpoll]`; its object is the `eventpoll`
//!   (`file->private_data`), as an eventfd's is its `eventfd_ctx`.
//! - The BPF harvester walks the interest list itself (`eventpoll::rbr`, crd-ebpf's
//!   `anon` module): one record per item with the watched file's `struct file *`, its
//!   inode and its reference count, then the epoll's record saying how the walk went
//!   ([`Walked`]). Where the walk could not be made (a kernel without `bpf_loop` and an
//!   epoll of more than a few items, more items than the ring holds at once, a tree that
//!   changed under the walk, fields missing from the kernel's BTF) it falls back, and
//!   says so, to what the /proc harvester reads: `/proc/PID/fdinfo/EPFD`
//!   (`tfd: N events: X data: Y pos: P ino: I sdev: D`, one line per item), read after
//!   the harvest ([`crate::harvest::extras::fill_links`]) while the targets are still
//!   frozen.
//! - Save: each watched file is carried by the epoll (`Reach::carried`): the very open
//!   file description the item watches, taken with `pidfd_getfd` from a checkpointed fd
//!   that holds it. After a BPF walk that fd is found by the file's address (the fd at
//!   the registered number in the epoll's own process if it still holds it, else any).
//!   From fdinfo, kcmp (`KCMP_EPOLL_TFD`) says whether the registered number still holds
//!   it, else which checkpointed fd on the same inode does (the registered fd was closed
//!   after a `dup`, or the epoll was inherited by a process whose table differs). The
//!   graph nests it in the epoll's record, so the image names it once, shared with the
//!   fds that hold it. A watched file no checkpointed fd holds (its fd closed, the file
//!   kept open by a process outside the checkpoint or by a message in flight) fails the
//!   save, naming the epoll and the number; after a BPF walk the error also says how many
//!   references keep the file open elsewhere. crd cannot make an fd of a file no fd
//!   holds, so it cannot do better than refuse.
//! - The data is kept whole: asyncio leaves garbage in its upper 32 bits.
//! - Restore: `epoll_create1(EPOLL_CLOEXEC)`; once every description exists (the Fill
//!   stage; a watched epoll is a carried file, made by then too), each target is added
//!   with `EPOLL_CTL_ADD` **under its original fd number**: the kernel keys an item by
//!   (file, fd number) and the program later names it by that number in
//!   `EPOLL_CTL_MOD`/`DEL`. crd's own table may use that number, so the adding runs on a
//!   thread with a private copy of crd's fd table (`unshare(CLONE_FILES)`), where the
//!   target is `dup3`ed onto the number, added, and closed again; crd's table is never
//!   touched. A target that cannot be added fails the whole restore, naming it: never a
//!   partial epoll.
//! - Not kept: which items were ready. The kernel polls each file as it is added, so a
//!   ready edge-triggered item that the program had already been told about is reported
//!   once more (a spurious wakeup, which edge-triggered readers handle with EAGAIN). An
//!   `EPOLLONESHOT` item that has fired shows only its flag bits; the kernel adds
//!   EPOLLERR|EPOLLHUP to every EPOLL_CTL_ADD, so it comes back armed for those two.
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use super::{
    Completion, FileKind, Identity, KindError, ObjectStore, OpenArgs, Opened, ProcSlot, Reach, Recognise,
    Stage,
};
use crate::{
    sys::{self, SyscallError},
    types::{DeviceId, Fd, KernelPtr, Pid, Tgid},
};

pub struct Epoll;

/// One item of an interest list as the image keeps it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Watch {
    /// The fd number the file was registered under.
    pub tfd: u32,
    /// `EPOLLIN`... with EPOLLET, EPOLLONESHOT, EPOLLEXCLUSIVE, EPOLLWAKEUP as given.
    pub events: u32,
    /// The user data, all 64 bits.
    pub data: u64,
}

/// One item: the watch and the inode of the file it watches (what fdinfo shows), and
/// after a BPF walk the file itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Item {
    pub watch: Watch,
    pub ino: u64,
    pub dev: DeviceId,
    /// The watched open file description (`epitem::ffd.file`), from a BPF walk; None from
    /// fdinfo.
    pub file: Option<WatchedFile>,
}

/// The watched file as BPF found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchedFile {
    /// Its `struct file *`: the harvested fds holding it have the same
    /// [`crate::model::FileInfo::id`].
    pub id: KernelPtr,
    /// References to it, as the kernel counts them.
    pub refs: u64,
}

/// How a harvest came by an epoll's interest list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Walked {
    /// From fdinfo: the /proc harvester.
    #[default]
    Fdinfo,
    /// BPF walked the tree: every item names its file.
    Bpf,
    /// BPF could not walk it, for this reason; fdinfo instead.
    FellBack(WalkEnd),
}

/// Why a BPF walk of an interest list was not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkEnd {
    /// The kernel's BTF lacks the fields the walk reads.
    NoFields,
    /// More items than the program walks (see `crd_common::EPOLL_MAX_ITEMS`,
    /// `EPOLL_BOUNDED_ITEMS` before 5.17).
    Truncated,
    /// The tree changed under the walk, or a read failed.
    Torn,
    /// The record says more items than arrived, or a walk state crd does not know.
    Incomplete,
}

/// What a harvest reads of an epoll.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpollLive {
    /// The interest list in the kernel's order (by file, then fd number). None: not read
    /// yet (a BPF record whose walk fell back; filled from fdinfo after the harvest), or
    /// fdinfo was unreadable.
    pub items: Option<Vec<Item>>,
    pub walked: Walked,
}

impl EpollLive {
    /// From a BPF epoll record: its tail says how the walk went, `sent` holds the item
    /// records that came before it (by index; a walk restarted after a full ring
    /// overwrote its first attempt's). `file_ref_bias`: see
    /// [`crd_common::Config::file_ref_bias`].
    pub fn from_walk(
        tail: Option<&crd_common::EpollTail>,
        sent: Vec<Option<crd_common::EpollItemRecord>>,
        file_ref_bias: i64,
    ) -> Self {
        use crd_common::{EPOLL_WALK_COMPLETE, EPOLL_WALK_TORN, EPOLL_WALK_TRUNCATED};
        let fell_back = |end| EpollLive { items: None, walked: Walked::FellBack(end) };
        let Some(tail) = tail else { return fell_back(WalkEnd::NoFields) };
        match tail.walk {
            EPOLL_WALK_COMPLETE => {}
            EPOLL_WALK_TRUNCATED => return fell_back(WalkEnd::Truncated),
            EPOLL_WALK_TORN => return fell_back(WalkEnd::Torn),
            _ => return fell_back(WalkEnd::Incomplete),
        }
        let count = tail.items as usize;
        if sent.len() < count || sent[..count].iter().any(Option::is_none) {
            return fell_back(WalkEnd::Incomplete);
        }
        let items = sent
            .into_iter()
            .take(count)
            .flatten()
            .map(|r| Item {
                watch: Watch { tfd: r.fd, events: r.events, data: r.data },
                ino: r.ino,
                dev: DeviceId::from_kernel(r.s_dev),
                file: Some(WatchedFile {
                    id: KernelPtr(r.file),
                    // Saturating: a damaged record must not overflow.
                    refs: r.file_refs.saturating_add(file_ref_bias).max(0) as u64,
                }),
            })
            .collect();
        EpollLive { items: Some(items), walked: Walked::Bpf }
    }
}

/// What an image holds of an epoll.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollState {
    /// Sorted by (tfd, events, data), so that a round trip names them in the same order
    /// (the kernel orders them by file address); the epoll's record carries the watched
    /// files in this order.
    pub targets: Vec<Watch>,
}

/// The interest list in `fdinfo` (its `tfd:` lines). None: a line that does not parse.
pub fn parse_fdinfo(fdinfo: &str) -> Option<Vec<Item>> {
    let mut items = Vec::new();
    for line in fdinfo.lines().filter(|l| l.starts_with("tfd:")) {
        // "tfd: %8d events: %8x data: %16llx  pos:%lli ino:%lx sdev:%x": a value follows
        // its key in the same word or the next one.
        let mut fields: Vec<(&str, &str)> = Vec::new();
        let mut words = line.split_whitespace();
        while let Some(word) = words.next() {
            let (key, value) = word.split_once(':')?;
            let value = if value.is_empty() { words.next()? } else { value };
            fields.push((key, value));
        }
        let get = |key: &str| fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let hex = |key: &str| get(key).and_then(|v| u64::from_str_radix(v, 16).ok());
        items.push(Item {
            watch: Watch {
                tfd: get("tfd")?.parse().ok()?,
                events: u32::try_from(hex("events")?).ok()?,
                data: hex("data")?,
            },
            ino: hex("ino")?,
            dev: DeviceId::from_kernel(u32::try_from(hex("sdev")?).ok()?),
            file: None,
        });
    }
    Some(items)
}

/// The interest list of `fd` of `tgid`, from its fdinfo (None: unreadable).
pub fn read_items(tgid: Tgid, fd: Fd) -> Option<Vec<Item>> {
    parse_fdinfo(&std::fs::read_to_string(format!("/proc/{}/fdinfo/{}", tgid.0, fd.0)).ok()?)
}

/// Event bits by name, as `ls` shows them.
const EVENT_NAMES: &[(u32, &str)] = &[
    (libc::EPOLLIN as u32, "IN"),
    (libc::EPOLLPRI as u32, "PRI"),
    (libc::EPOLLOUT as u32, "OUT"),
    (libc::EPOLLERR as u32, "ERR"),
    (libc::EPOLLHUP as u32, "HUP"),
    (libc::EPOLLRDNORM as u32, "RDNORM"),
    (libc::EPOLLRDBAND as u32, "RDBAND"),
    (libc::EPOLLWRNORM as u32, "WRNORM"),
    (libc::EPOLLWRBAND as u32, "WRBAND"),
    (libc::EPOLLMSG as u32, "MSG"),
    (libc::EPOLLRDHUP as u32, "RDHUP"),
    (libc::EPOLLEXCLUSIVE as u32, "EXCLUSIVE"),
    (libc::EPOLLWAKEUP as u32, "WAKEUP"),
    (libc::EPOLLONESHOT as u32, "ONESHOT"),
    (libc::EPOLLET as u32, "ET"),
];

/// `IN|ET`; bits without a name in hex.
pub fn events_name(events: u32) -> String {
    let mut names: Vec<String> =
        EVENT_NAMES.iter().filter(|(bit, _)| events & bit != 0).map(|(_, n)| (*n).to_string()).collect();
    let rest = EVENT_NAMES.iter().fold(events, |e, (bit, _)| e & !bit);
    if rest != 0 {
        names.push(format!("{rest:#x}"));
    }
    if names.is_empty() { "0".into() } else { names.join("|") }
}

impl FileKind for Epoll {
    const NAME: &'static str = "epoll";
    const IDENTITY: Identity = Identity::Private;
    const CARRIED_LABEL: &'static str = "watches";
    const HOLDS_CARRIED: bool = false;
    type Live = EpollLive;
    type Saved = EpollState;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.fs_magic == Some(crd_common::ANON_INODE_FS_MAGIC) && r.name == Some("[eventpoll]")
    }

    /// The walk's outcome only: the items came in records of their own, which the
    /// harvester's decoder attaches ([`EpollLive::from_walk`]).
    fn from_bpf(record: &crd_common::FdRecord, tail: &[u8]) -> Option<EpollLive> {
        let tail = (record.tail == crd_common::TAIL_EPOLL)
            .then(|| super::tail::<crd_common::EpollTail>(tail))
            .flatten();
        Some(EpollLive::from_walk(tail.as_ref(), Vec::new(), 0))
    }

    fn from_proc(slot: &ProcSlot<'_>) -> EpollLive {
        EpollLive { items: parse_fdinfo(slot.fdinfo), walked: Walked::Fdinfo }
    }

    fn sketch(live: &EpollLive) -> EpollState {
        let mut targets: Vec<Watch> = live.items.iter().flatten().map(|i| i.watch).collect();
        targets.sort();
        EpollState { targets }
    }

    fn save(live: &EpollLive, reach: &Reach<'_>) -> Result<EpollState, KindError> {
        let items = live.items.as_ref().ok_or_else(|| {
            KindError::Other("its interest list (fdinfo tfd: lines) could not be read".into())
        })?;
        // Each watch, with the lowest fd of the epoll's own process holding the file it
        // watches (None: none does), and a copy of that file.
        let mut found: Vec<(Watch, Option<Fd>, OwnedFd)> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            // Which of the items registered under this number it is (kcmp counts them
            // in the kernel's order, which fdinfo shows).
            let toff = items[..i].iter().filter(|o| o.watch.tfd == item.watch.tfd).count() as u32;
            let reached = match item.file {
                Some(watched) => held(reach, item.watch.tfd, watched.id)?,
                None => target(reach, item, toff)?,
            };
            let (file, own) = reached.ok_or_else(|| {
                let elsewhere = match item.file {
                    Some(watched) => format!(
                        "BPF found it registered, kept open by {} reference(s) outside them: a process not checkpointed, or a message in flight",
                        watched.refs
                    ),
                    None => "crd cannot reach a file through an epoll alone".into(),
                };
                KindError::Other(format!(
                    "tfd {} (inode {}): the file it watches is held by no fd of the checkpointed processes ({elsewhere})",
                    item.watch.tfd, item.ino
                ))
            })?;
            found.push((item.watch, own, file));
        }
        // Two items can share a watch (one fd number, registered for two files in turn),
        // and the kernel orders those by file address, which a restore does not keep:
        // they go by the fd that holds each file in the epoll's own process, which it
        // does (an item's file held by no fd of its own process last).
        found.sort_by_key(|(w, own, _)| (*w, own.map_or(u32::MAX, |fd| fd.0)));
        let mut carried = reach.carried.borrow_mut();
        let mut targets = Vec::with_capacity(found.len());
        for (watch, _, file) in found {
            targets.push(watch);
            carried.push(file);
        }
        Ok(EpollState { targets })
    }

    fn detail(saved: &EpollState) -> Option<String> {
        if saved.targets.is_empty() {
            return Some("no targets".into());
        }
        let each: Vec<String> = saved
            .targets
            .iter()
            .map(|w| format!("tfd={} events={} data={:#x}", w.tfd, events_name(w.events), w.data))
            .collect();
        Some(each.join(", "))
    }

    fn open(_saved: &EpollState, args: &OpenArgs<'_>, _store: &mut ObjectStore) -> Result<Opened, KindError> {
        if !args.first {
            return Err(KindError::Other(
                "a second open file description of one epoll cannot be made (an epoll cannot be reopened)"
                    .into(),
            ));
        }
        // SAFETY: plain syscall with an integer argument.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(SyscallError::last("epoll_create1").into());
        }
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        Ok(Opened { fd: unsafe { OwnedFd::from_raw_fd(raw) }, fresh: true })
    }

    fn complete(saved: &EpollState, stage: Stage, done: &Completion<'_>) -> Result<(), KindError> {
        if stage != Stage::Fill || saved.targets.is_empty() {
            return Ok(());
        }
        if done.carried.len() != saved.targets.len() {
            return Err(KindError::Other(format!(
                "the image has {} watched files for {} targets",
                done.carried.len(),
                saved.targets.len()
            )));
        }
        let (epoll, files) = (done.fd, done.carried);
        std::thread::scope(|s| {
            s.spawn(|| add_all(epoll, &saved.targets, files))
                .join()
                .unwrap_or_else(|_| Err(KindError::Other("the thread adding its targets panicked".into())))
        })
    }

    fn same(a: &EpollState, b: &EpollState) -> Result<(), String> {
        if a != b {
            return Err(format!("epoll {:?} vs {:?}", a.targets, b.targets));
        }
        Ok(())
    }
}

/// A copy of the description at `file` (as a BPF walk named it) from a checkpointed fd
/// holding it, preferring the registered number `tfd` in the epoll's own process, with
/// the lowest fd of that process holding it; None if no checkpointed fd holds it.
fn held(reach: &Reach<'_>, tfd: u32, file: KernelPtr) -> Result<Option<(OwnedFd, Option<Fd>)>, KindError> {
    let holders = reach.holders.get().by_file.get(&file).map(Vec::as_slice).unwrap_or_default();
    let own = (reach.tgid, Fd(tfd));
    let Some(&(tgid, fd)) = holders.iter().find(|&&h| h == own).or_else(|| holders.first()) else {
        return Ok(None);
    };
    let lowest_own = holders.iter().filter(|(t, _)| *t == reach.tgid).map(|(_, fd)| *fd).min();
    let pidfd =
        if tgid == reach.tgid { Some(reach.pidfd) } else { reach.holders.get().pidfds.get(&tgid).copied() };
    match pidfd {
        Some(pidfd) => Ok(Some((sys::pidfd_getfd(pidfd, fd)?, lowest_own))),
        None => Ok(None),
    }
}

/// The very description `item` (from fdinfo) watches, with the lowest fd of the epoll's
/// own process holding it, or None if no checkpointed fd holds it.
fn target(reach: &Reach<'_>, item: &Item, toff: u32) -> Result<Option<(OwnedFd, Option<Fd>)>, KindError> {
    let tfd = item.watch.tfd;
    let me = Pid(reach.tgid.0);
    let watched = |tgid: Tgid, fd: Fd| sys::kcmp_epoll_tfd(Pid(tgid.0), fd, me, reach.fd, tfd, toff);
    let holders =
        reach.holders.get().by_inode.get(&(item.dev, item.ino)).map(Vec::as_slice).unwrap_or_default();
    // The epoll's own process first, by fd number, then the others.
    let mut own: Vec<Fd> = holders.iter().filter(|(t, _)| *t == reach.tgid).map(|(_, fd)| *fd).collect();
    own.sort_unstable();
    for &fd in &own {
        if watched(reach.tgid, fd)? {
            return Ok(Some((sys::pidfd_getfd(reach.pidfd, fd)?, Some(fd))));
        }
    }
    for &(tgid, fd) in holders.iter().filter(|(t, _)| *t != reach.tgid) {
        let Some(pidfd) = reach.holders.get().pidfds.get(&tgid) else { continue };
        if watched(tgid, fd)? {
            return Ok(Some((sys::pidfd_getfd(pidfd.as_fd(), fd)?, None)));
        }
    }
    Ok(None)
}

/// Adds every target to `epoll` under its own fd number, on the calling thread's private
/// copy of the fd table (see the module documentation). Runs on a thread of its own:
/// `unshare(CLONE_FILES)` detaches the calling thread's table for good.
fn add_all(epoll: BorrowedFd<'_>, targets: &[Watch], files: &[BorrowedFd<'_>]) -> Result<(), KindError> {
    // SAFETY: unshare(CLONE_FILES) gives this thread a copy of the fd table it shared
    // with crd's other threads: every fd number stays valid and names the same file, and
    // nothing done to this copy reaches crd's own table.
    if unsafe { libc::unshare(libc::CLONE_FILES) } < 0 {
        return Err(SyscallError::last("unshare(CLONE_FILES)").into());
    }
    // Everything this thread works with moves above every registered number first, so
    // that no dup3 below can replace the epoll or a target not yet added.
    let above = targets.iter().map(|w| w.tfd).max().unwrap_or(0) as i32 + 1;
    let lift = |fd: BorrowedFd<'_>| -> Result<OwnedFd, KindError> {
        // SAFETY: F_DUPFD_CLOEXEC duplicates an fd open in this table to a free number.
        let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, above) };
        if raw < 0 {
            return Err(SyscallError::last("fcntl(F_DUPFD_CLOEXEC)").into());
        }
        // SAFETY: the number was just made in this thread's private table; nothing else
        // owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    };
    let epoll = lift(epoll)?;
    let lifted: Vec<OwnedFd> = files.iter().map(|&f| lift(f)).collect::<Result<_, _>>()?;
    for (watch, file) in targets.iter().zip(&lifted) {
        let named = |e: KindError| {
            KindError::Other(format!("tfd {} ({}): {e}", watch.tfd, events_name(watch.events)))
        };
        let tfd =
            i32::try_from(watch.tfd).map_err(|_| named(KindError::Other("fd number out of range".into())))?;
        // SAFETY: dup3 onto `tfd` in this thread's private table: whatever crd's copy had
        // there is only this table's reference (crd's own table keeps its own); the
        // epoll and the targets sit above every such number.
        if unsafe { libc::dup3(file.as_raw_fd(), tfd, libc::O_CLOEXEC) } < 0 {
            return Err(named(SyscallError::last("dup3").into()));
        }
        // SAFETY: `tfd` was just made a copy of the target in this private table.
        let placed = unsafe { OwnedFd::from_raw_fd(tfd) };
        let mut event = libc::epoll_event { events: watch.events, u64: watch.data };
        // SAFETY: epoll_ctl reads one epoll_event through the pointer, valid for the call.
        let ret = unsafe {
            libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, placed.as_raw_fd(), &mut event)
        };
        if ret < 0 {
            return Err(named(SyscallError::last("epoll_ctl(EPOLL_CTL_ADD)").into()));
        }
        // The item stays: an epoll forgets a file when its last reference goes, not when
        // one fd of it is closed.
        drop(placed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_lines_parse_with_all_64_bits_of_data() {
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t1057\n\
            tfd:        5 events: 80000019 data: deadbeef00000005  pos:0 ino:2a sdev:d\n\
            tfd:       12 events:       19 data:                c  pos:0 ino:4d2 sdev:800003\n";
        let items = parse_fdinfo(fdinfo).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].watch, Watch { tfd: 5, events: 0x8000_0019, data: 0xdead_beef_0000_0005 });
        assert_eq!((items[0].ino, items[0].dev), (0x2a, DeviceId::from_kernel(0xd)));
        assert_eq!(items[1].watch, Watch { tfd: 12, events: 0x19, data: 0xc });
        assert_eq!((items[1].ino, items[1].dev), (0x4d2, DeviceId { major: 8, minor: 3 }));
        assert_eq!(parse_fdinfo("tfd: 5 events: zz data: 1 pos:0 ino:1 sdev:1\n"), None);
        assert_eq!(parse_fdinfo("pos: 0\n"), Some(Vec::new()));
    }

    #[test]
    fn events_are_named_as_ls_shows_them() {
        assert_eq!(events_name(0x8000_0001), "IN|ET");
        assert_eq!(events_name(libc::EPOLLONESHOT as u32 | libc::EPOLLOUT as u32), "OUT|ONESHOT");
        assert_eq!(events_name(0), "0");
        assert_eq!(events_name(0x0100_0000), "0x1000000");
    }
}
