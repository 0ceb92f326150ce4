//! Terminals: pty masters (`/dev/ptmx`) and slaves (`/dev/pts/N`), and the terminals
//! crd cannot make (`/dev/tty`, `/dev/console`).
//!
//! A pty is one object seen from two ends, like a pipe, but the kernel gives the two
//! ends two identities: every master opens the one `/dev/ptmx` inode (so a master is
//! its description, [`Identity::Private`]; a master cannot be opened a second time, only
//! dup'ed or inherited), while a slave is its own inode on devpts (every open of
//! `/dev/pts/N` is the same object). The state names the pty by its index (TIOCGPTN:
//! fdinfo `tty-index:` of the master; the slave's device minor) and ties each end to
//! the other ([`Tie::Pty`]), as a unix socket is tied to its peer: the graph nests the
//! other end in the record of the first, so the masters and slaves of one pty in any
//! processes of the image are restored as one pty. A pty with only one end in the image
//! is held outside (its other end lives elsewhere): refused, or with `--allow-external`
//! made with a new pty whose other end restore then closes (a slave without master
//! reads end-of-file, like a pipe without writer).
//!
//! - Saved while frozen, through a `pidfd_getfd` copy: the termios (tcgetattr; through
//!   a master it reads its slave's), the window size, and of a master its packet mode
//!   (TIOCGPKT) and lock (TIOCGPTLCK). Nothing of these changes anything.
//! - **Not saved: the bytes queued in the pty.** A tty's queues cannot be read without
//!   taking the bytes from their reader (there is no peek, no tee), and crd never
//!   consumes a target's data: the counts (FIONREAD at each end: at the master what the
//!   slave wrote and nobody read yet, at the slave what was typed and not read yet) are
//!   saved, shown by `inspect`, and a checkpoint warns when they are not zero.
//! - Restore: the first end met makes the pty (`/dev/ptmx`, unlock, TIOCGPTPEER for the
//!   slave), sets the termios and window size, and deposits the other end for the other
//!   object; further slave descriptions are opened again through the slave
//!   (`/proc/self/fd/N`, O_NOCTTY). Packet mode and the lock are set last
//!   ([`Stage::Seal`]), once every slave description exists. The index comes back where
//!   it is free: as CRIU does, restore opens ptys until the kernel hands out the old
//!   index (it gives the lowest free one), at most 256 spare ones held meanwhile; where
//!   it is taken the pty gets another (`/dev/pts/7` may come back as `/dev/pts/9`).
//! - The controlling terminal, its session and foreground group are the tasks' state
//!   ([`crate::model::Session`]): the restore's stubs give the session leader the
//!   restored slave with TIOCSCTTY and set the foreground group with TIOCSPGRP.
//! - `/dev/tty` and `/dev/console` are always held outside: `/dev/tty` stands for
//!   whatever terminal controls the opener. With `--allow-external` they are opened by
//!   path by crd (so `/dev/tty` becomes the terminal crd runs in).
//! - Not kept: several devpts instances (containers) with the same index are told apart
//!   by nothing (a master's fdinfo does not say which instance); locked termios
//!   (TIOCSLCKTRMIOS needs CAP_SYS_ADMIN); a line discipline other than N_TTY.
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::{
    fcntl::{self, OFlag},
    sys::stat::Mode,
};
use serde::{Deserialize, Serialize};

use super::{
    Completion, FileKind, Handle, Identity, InsideUse, KindError, ObjectStore, OpenArgs, Opened, ProcSlot,
    Reach, Recognise, Stage, Tie, pipe::access_flags, regular::open_by_path,
};
use crate::{
    sys::{self, SyscallError},
    types::{Access, DeviceId},
};

pub struct Terminal;

/// Unix98 pty slaves: majors 136–143 (UNIX98_PTY_SLAVE_MAJOR and the next 7), 256
/// minors each.
const PTY_SLAVE_MAJORS: std::ops::RangeInclusive<u32> = 136..=143;
/// `/dev/ptmx` (TTYAUX_MAJOR 5, minor 2), the master side.
const PTMX: (u32, u32) = (5, 2);
/// `/dev/tty` (5:0): the opener's controlling terminal.
const DEV_TTY: (u32, u32) = (5, 0);
/// `/dev/console` (5:1).
const DEV_CONSOLE: (u32, u32) = (5, 1);

/// Which end of a terminal a description opens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum End {
    Master,
    Slave,
    /// `/dev/tty` or `/dev/console`: a terminal crd does not make.
    Outside,
    /// Saved by a crd older than format 5, which kept no terminal state.
    #[default]
    Unknown,
}

/// One end of one pty: what [`Tie::Pty`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PtyEnd {
    pub index: u32,
    pub master: bool,
}

/// What a harvest reads of a terminal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TerminalLive {
    pub end: End,
    /// The pty's index; None: not read yet (a master seen by BPF, until its fdinfo's
    /// `tty-index:` is read) or not a pty.
    pub index: Option<u32>,
}

/// A terminal's settings, read from a frozen target's copy of the fd.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub termios: Termios,
    /// rows, columns, x pixels, y pixels.
    pub winsize: [u16; 4],
    /// A master's packet mode (TIOCPKT).
    pub packet: bool,
    /// A master's lock (TIOCSPTLCK): its slave cannot be opened.
    pub locked: bool,
    /// Bytes waiting to be read at this end (FIONREAD), which crd cannot save (see the
    /// module documentation).
    pub unread: u32,
}

/// `struct termios`, field by field (glibc and musl lay the speeds out differently).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Termios {
    pub iflag: u32,
    pub oflag: u32,
    pub cflag: u32,
    pub lflag: u32,
    pub line: u8,
    pub cc: Vec<u8>,
    pub ispeed: u32,
    pub ospeed: u32,
}

/// What an image holds of a terminal. (Format 5; an older image held nothing, which
/// decodes as [`End::Unknown`] and is refused at restore.)
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalState {
    #[serde(deserialize_with = "super::decoding::since_v5")]
    pub end: End,
    #[serde(deserialize_with = "super::decoding::since_v5")]
    pub index: Option<u32>,
    /// None: only sketched (`ls`, graft), not a pty, or a slave hung up (its master
    /// closed: a hung-up tty answers no ioctl).
    #[serde(deserialize_with = "super::decoding::since_v5")]
    pub settings: Option<Settings>,
    /// Its other end is closed everywhere (POLLHUP): a slave whose master was closed
    /// (hung up), or a master whose slave nobody holds open. Such an end is no
    /// external: nothing outside holds the other end, and restore makes it so again.
    #[serde(deserialize_with = "super::decoding::since_v5")]
    pub other_closed: bool,
}

impl TerminalState {
    /// What an image that kept no terminal state (format 1, where a pty end was a
    /// character device) holds of the terminal with this device: a pty end is
    /// [`End::Unknown`] (refused at restore); `/dev/tty` and `/dev/console` are external.
    pub fn without_state(rdev: DeviceId) -> Self {
        let end = match end_of(rdev) {
            End::Outside => End::Outside,
            _ => End::Unknown,
        };
        TerminalState { end, index: None, settings: None, other_closed: false }
    }

    /// Which end of which pty it is, for ties; None when its other end is closed: a
    /// hung-up slave belongs to a pty that is gone, whose index a new pty may reuse.
    fn pty(&self) -> Option<PtyEnd> {
        if self.other_closed {
            return None;
        }
        let master = match self.end {
            End::Master => true,
            End::Slave => false,
            End::Outside | End::Unknown => return None,
        };
        Some(PtyEnd { index: self.index?, master })
    }
}

fn end_of(rdev: DeviceId) -> End {
    let pair = (rdev.major, rdev.minor);
    if pair == PTMX {
        End::Master
    } else if PTY_SLAVE_MAJORS.contains(&rdev.major) {
        End::Slave
    } else {
        End::Outside
    }
}

/// A slave's index from its device number.
fn slave_index(rdev: DeviceId) -> u32 {
    (rdev.major - PTY_SLAVE_MAJORS.start()) * 256 + rdev.minor
}

fn live_of(rdev: DeviceId, fdinfo: Option<&str>) -> TerminalLive {
    let end = end_of(rdev);
    let index = match end {
        End::Slave => Some(slave_index(rdev)),
        // `tty-index:` (4.16+, for lsof) is the master's TIOCGPTN.
        End::Master => fdinfo.and_then(|info| {
            info.lines().find_map(|l| l.strip_prefix("tty-index:")).and_then(|v| v.trim().parse().ok())
        }),
        End::Outside | End::Unknown => None,
    };
    TerminalLive { end, index }
}

impl FileKind for Terminal {
    const NAME: &'static str = "pty";
    const STABLE_NAME: bool = false;
    type Live = TerminalLive;
    type Saved = Box<TerminalState>;

    fn recognise(r: &Recognise<'_>) -> bool {
        let pair = (r.rdev.major, r.rdev.minor);
        r.file_type() == libc::S_IFCHR
            && (PTY_SLAVE_MAJORS.contains(&r.rdev.major) || [PTMX, DEV_TTY, DEV_CONSOLE].contains(&pair))
    }

    fn identity(live: &TerminalLive) -> Identity {
        match live.end {
            End::Master => Identity::Private,
            _ => Identity::Inode,
        }
    }

    fn from_bpf(record: &crd_common::FdRecord, _tail: &[u8]) -> Option<TerminalLive> {
        Some(live_of(DeviceId::from_kernel(record.i_rdev), None))
    }

    fn from_proc(slot: &ProcSlot<'_>) -> TerminalLive {
        live_of(slot.rdev, Some(slot.fdinfo))
    }

    fn fdinfo_pending(live: &TerminalLive) -> bool {
        live.end == End::Master && live.index.is_none()
    }

    fn held_outside(live: &TerminalLive, _inside: InsideUse) -> bool {
        live.end == End::Outside
    }

    fn sketch(live: &TerminalLive) -> Self::Saved {
        Box::new(TerminalState { end: live.end, index: live.index, settings: None, other_closed: false })
    }

    fn save(live: &TerminalLive, reach: &Reach<'_>) -> Result<Self::Saved, KindError> {
        if !matches!(live.end, End::Master | End::Slave) {
            return Ok(Self::sketch(live));
        }
        let copy = sys::pidfd_getfd(reach.pidfd, reach.fd)?;
        let fd = copy.as_fd();
        let master = live.end == End::Master;
        let other_closed = hung_up(fd)?;
        if other_closed && !master {
            return Ok(Box::new(TerminalState {
                end: live.end,
                index: live.index,
                settings: None,
                other_closed,
            }));
        }
        let index =
            if master { Some(get_int(fd, libc::TIOCGPTN, "ioctl(TIOCGPTN)")? as u32) } else { live.index };
        let settings = Settings {
            termios: get_termios(fd)?,
            winsize: get_winsize(fd)?,
            packet: master && get_int(fd, libc::TIOCGPKT, "ioctl(TIOCGPKT)")? != 0,
            locked: master && get_int(fd, libc::TIOCGPTLCK, "ioctl(TIOCGPTLCK)")? != 0,
            unread: get_int(fd, libc::FIONREAD, "ioctl(FIONREAD)")? as u32,
        };
        if settings.unread != 0 {
            let (what, end) = if master { ("written by its slave", "master") } else { ("typed", "slave") };
            log::warn!(
                "PID {} fd {}: {} bytes {what} and not yet read wait in pty {}'s {end}; crd cannot copy a terminal's queue without taking it from its reader, so a restore will not have them",
                reach.tgid,
                reach.fd,
                settings.unread,
                index.map_or("?".into(), |i| i.to_string()),
            );
        }
        Ok(Box::new(TerminalState { end: live.end, index, settings: Some(settings), other_closed }))
    }

    fn detail(saved: &Self::Saved) -> Option<String> {
        let index = saved.index.map_or("?".into(), |i| i.to_string());
        let mut detail = match saved.end {
            End::Master => format!("pty {index} master"),
            End::Slave => format!("pty {index} slave"),
            End::Outside => "not a pty: external".into(),
            End::Unknown => return None,
        };
        if let Some(s) = &saved.settings {
            detail.push_str(&format!(" size {}x{}", s.winsize[1], s.winsize[0]));
            if s.packet {
                detail.push_str(" packet");
            }
            if s.locked {
                detail.push_str(" locked");
            }
            if s.unread != 0 {
                detail.push_str(&format!(" unread {} (not saved)", s.unread));
            }
        }
        if saved.other_closed {
            detail.push_str(if saved.end == End::Master { " slave closed" } else { " hung up" });
        }
        Some(detail)
    }

    fn ties(saved: &Self::Saved) -> Vec<Tie> {
        saved.pty().map(|me| Tie::Pty(PtyEnd { index: me.index, master: !me.master })).into_iter().collect()
    }

    fn pty_end(saved: &Self::Saved) -> Option<PtyEnd> {
        saved.pty()
    }

    /// A pty end whose other end is not in the image lives partly elsewhere, unless
    /// that end is closed everywhere.
    fn outside_unless_tied(saved: &Self::Saved, found: &[bool]) -> bool {
        saved.pty().is_some() && !found.first().copied().unwrap_or(false)
    }

    fn refusal(saved: &Self::Saved) -> Option<String> {
        match saved.end {
            End::Unknown => Some(
                "this image was written by a crd that kept no terminal state (format 4 or older); checkpoint it again, or `crd graft` hands the live one over"
                    .into(),
            ),
            End::Master if saved.settings.is_none() => {
                Some("the image holds no state of this pty (it was only listed)".into())
            }
            _ => None,
        }
    }

    fn open(saved: &Self::Saved, args: &OpenArgs<'_>, store: &mut ObjectStore) -> Result<Opened, KindError> {
        if let Some(why) = Self::refusal(saved) {
            return Err(KindError::Other(why));
        }
        let other = args.tied.first().map(|t| t.object);
        match saved.end {
            End::Master => {
                if let Some(fd) = store.pick_up(args.object, MASTER_SLOT) {
                    return Ok(Opened { fd, fresh: false });
                }
                if !args.first {
                    return Err(KindError::Other(
                        "a pty master has a single open file description; the image holds two".into(),
                    ));
                }
                let (master, slave) = make(saved, args.access)?;
                match other {
                    Some(slave_object) => store.deposit(slave_object, SLAVE_SLOT, slave),
                    // The slave is not in the image (--allow-external): it goes, as the
                    // original's went elsewhere.
                    None => drop(slave),
                }
                Ok(Opened { fd: master, fresh: false })
            }
            End::Slave => {
                let handle = match store.handle(args.object) {
                    Some(handle) => handle,
                    None => {
                        let keeper = match store.pick_up(args.object, SLAVE_SLOT) {
                            Some(fd) => fd,
                            None => {
                                let (master, slave) = make(saved, READ_WRITE)?;
                                // The master object picks it up; without one in the
                                // image (--allow-external) it is closed with the store,
                                // once every slave description exists.
                                store.deposit(other.unwrap_or(args.object), MASTER_SLOT, master);
                                slave
                            }
                        };
                        // TIOCGPTPEER's slave has no O_LARGEFILE, as the original's
                        // when it came from openpty: that one is this description
                        // when its flags are the description's (but for the ones
                        // F_SETFL sets later).
                        if args.access == READ_WRITE && same_open_flags(&keeper, args.flags) {
                            store.set_handle(args.object, Handle::Held(keeper.as_raw_fd()));
                            return Ok(Opened { fd: keeper, fresh: false });
                        }
                        let raw = keeper.as_raw_fd();
                        store.set_handle(args.object, Handle::Owned(keeper));
                        raw
                    }
                };
                let path = format!("/proc/self/fd/{handle}");
                let flags =
                    access_flags(args.access) | OFlag::O_NOCTTY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
                let fd = fcntl::open(path.as_str(), flags, Mode::empty())
                    .map_err(|e| KindError::errno("open(/proc/self/fd/N) of a pty slave", e))?;
                Ok(Opened { fd, fresh: false })
            }
            End::Outside => open_by_path(args, "pty", false).map_err(|e| match e {
                KindError::Syscall(s) if s.errno() == Some(libc::ENXIO) => KindError::Other(format!(
                    "{} stands for its opener's controlling terminal and crd has none: run the restore from a terminal, or leave --allow-external out to have it refused",
                    args.path.unwrap_or("/dev/tty")
                )),
                e => e,
            }),
            End::Unknown => Err(KindError::Other("unknown terminal".into())),
        }
    }

    fn complete(saved: &Self::Saved, stage: Stage, done: &Completion<'_>) -> Result<(), KindError> {
        let (Stage::Seal, End::Master, Some(settings)) = (stage, saved.end, &saved.settings) else {
            return Ok(());
        };
        // Last: a locked pty lets nobody open its slave, not even restore.
        if settings.packet {
            set_int(done.fd, libc::TIOCPKT, 1, "ioctl(TIOCPKT)")?;
        }
        if settings.locked {
            set_int(done.fd, libc::TIOCSPTLCK, 1, "ioctl(TIOCSPTLCK)")?;
        }
        Ok(())
    }

    /// The index comes back as the kernel chooses: compared are the end and the
    /// settings (the unread counts too: a restored pty starts empty, so a round trip
    /// of a pty that held unread bytes differs, and says so).
    fn same(a: &Self::Saved, b: &Self::Saved) -> Result<(), String> {
        if (a.end, a.other_closed) != (b.end, b.other_closed) {
            return Err(format!(
                "pty end {:?} (other closed: {}) vs {:?} ({})",
                a.end, a.other_closed, b.end, b.other_closed
            ));
        }
        if let (Some(x), Some(y)) = (&a.settings, &b.settings)
            && x != y
        {
            return Err(format!("pty settings {x:?} vs {y:?}"));
        }
        Ok(())
    }
}

/// Deposit slots: a master made by its slave's first description, a slave by its master.
const MASTER_SLOT: u8 = 0;
const SLAVE_SLOT: u8 = 1;

/// How restore opens a slave it keeps to open the slave's descriptions from.
const READ_WRITE: Access = Access { read: true, write: true };

/// How many ptys restore opens (and closes again) at most to get a pty its old index.
const MAX_SPARE_PTYS: usize = 256;

/// Makes a pty: its master (with `access`) and a read-write slave, unlocked, with the
/// saved termios and window size.
fn make(saved: &TerminalState, access: Access) -> Result<(OwnedFd, OwnedFd), KindError> {
    let flags = access_flags(access) | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    // The kernel hands out the lowest free index: as CRIU does, open ptys until the old
    // index comes back (or a higher one: the old one is taken), holding the ones below
    // it meanwhile, so that a program that knows its terminal's name (`tty`, utmp) finds
    // it again where it can.
    let mut spare = Vec::new();
    let master = loop {
        let master = fcntl::open("/dev/ptmx", flags, Mode::empty())
            .map_err(|e| KindError::errno("open(/dev/ptmx)", e))?;
        let Some(wanted) = saved.index else { break master };
        let index = get_int(master.as_fd(), libc::TIOCGPTN, "ioctl(TIOCGPTN)")? as u32;
        if index >= wanted || spare.len() >= MAX_SPARE_PTYS {
            break master;
        }
        spare.push(master);
    };
    drop(spare);
    set_int(master.as_fd(), libc::TIOCSPTLCK, 0, "ioctl(TIOCSPTLCK)")?;
    let slave_flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes open flags as its integer argument and returns a new fd.
    let raw = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, slave_flags) };
    let slave = if raw >= 0 {
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(raw) }
    } else {
        // Before 4.13: by name, in crd's own /dev/pts.
        let index = get_int(master.as_fd(), libc::TIOCGPTN, "ioctl(TIOCGPTN)")?;
        let path = format!("/dev/pts/{index}");
        fcntl::open(path.as_str(), OFlag::from_bits_truncate(slave_flags), Mode::empty())
            .map_err(|e| KindError::errno("open(/dev/pts/N)", e))?
    };
    if let Some(settings) = &saved.settings {
        set_termios(slave.as_fd(), &settings.termios)?;
        set_winsize(slave.as_fd(), settings.winsize)?;
    }
    Ok((master, slave))
}

/// Whether `fd` was opened with the open flags `flags` holds, but for the status flags
/// F_SETFL sets (and close-on-exec, which is the fd's).
fn same_open_flags(fd: &OwnedFd, flags: u32) -> bool {
    let settable = libc::O_APPEND
        | libc::O_NONBLOCK
        | libc::O_ASYNC
        | libc::O_DIRECT
        | libc::O_NOATIME
        | libc::O_CLOEXEC;
    let mask = !(settable as u32);
    fcntl::fcntl(fd.as_fd(), fcntl::FcntlArg::F_GETFL).is_ok_and(|now| now as u32 & mask == flags & mask)
}

/// Whether the tty at `fd` reports POLLHUP: its other end is closed everywhere. A poll
/// with no timeout reads nothing and changes nothing.
fn hung_up(fd: BorrowedFd<'_>) -> Result<bool, KindError> {
    let mut poll = libc::pollfd { fd: fd.as_raw_fd(), events: 0, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    if unsafe { libc::poll(&mut poll, 1, 0) } < 0 {
        return Err(SyscallError::last("poll").into());
    }
    Ok(poll.revents & libc::POLLHUP != 0)
}

fn get_int(fd: BorrowedFd<'_>, request: libc::Ioctl, call: &'static str) -> Result<i32, KindError> {
    let mut value: libc::c_int = 0;
    // SAFETY: these requests write one int through the pointer we pass.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut value) } < 0 {
        return Err(SyscallError::last(call).into());
    }
    Ok(value)
}

fn set_int(
    fd: BorrowedFd<'_>,
    request: libc::Ioctl,
    value: i32,
    call: &'static str,
) -> Result<(), KindError> {
    let value: libc::c_int = value;
    // SAFETY: these requests read one int through the pointer we pass.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, &value) } < 0 {
        return Err(SyscallError::last(call).into());
    }
    Ok(())
}

fn get_winsize(fd: BorrowedFd<'_>) -> Result<[u16; 4], KindError> {
    // SAFETY: winsize is plain old data; all zeroes is valid.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize through the pointer we pass.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) } < 0 {
        return Err(SyscallError::last("ioctl(TIOCGWINSZ)").into());
    }
    Ok([ws.ws_row, ws.ws_col, ws.ws_xpixel, ws.ws_ypixel])
}

fn set_winsize(fd: BorrowedFd<'_>, size: [u16; 4]) -> Result<(), KindError> {
    let ws = libc::winsize { ws_row: size[0], ws_col: size[1], ws_xpixel: size[2], ws_ypixel: size[3] };
    // SAFETY: TIOCSWINSZ reads one winsize through the pointer we pass.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(SyscallError::last("ioctl(TIOCSWINSZ)").into());
    }
    Ok(())
}

fn get_termios(fd: BorrowedFd<'_>) -> Result<Termios, KindError> {
    // SAFETY: termios is plain old data; all zeroes is valid.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr fills the termios we pass.
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) } < 0 {
        return Err(SyscallError::last("tcgetattr").into());
    }
    // SAFETY: plain reads of the struct filled above.
    let (ispeed, ospeed) = unsafe { (libc::cfgetispeed(&t), libc::cfgetospeed(&t)) };
    Ok(Termios {
        iflag: t.c_iflag,
        oflag: t.c_oflag,
        cflag: t.c_cflag,
        lflag: t.c_lflag,
        line: t.c_line,
        cc: t.c_cc.to_vec(),
        ispeed,
        ospeed,
    })
}

fn set_termios(fd: BorrowedFd<'_>, saved: &Termios) -> Result<(), KindError> {
    // SAFETY: termios is plain old data; all zeroes is valid.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr fills the termios we pass (the fields crd does not save stay
    // the new pty's).
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) } < 0 {
        return Err(SyscallError::last("tcgetattr").into());
    }
    t.c_iflag = saved.iflag;
    t.c_oflag = saved.oflag;
    t.c_cflag = saved.cflag;
    t.c_lflag = saved.lflag;
    t.c_line = saved.line;
    for (dst, src) in t.c_cc.iter_mut().zip(&saved.cc) {
        *dst = *src;
    }
    // SAFETY: plain writes into the struct above, then tcsetattr reads it.
    let ret = unsafe {
        libc::cfsetispeed(&mut t, saved.ispeed);
        libc::cfsetospeed(&mut t, saved.ospeed);
        libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &t)
    };
    if ret < 0 {
        return Err(SyscallError::last("tcsetattr").into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_and_indices_come_from_the_device_and_the_masters_fdinfo() {
        let master = live_of(DeviceId { major: 5, minor: 2 }, Some("pos:\t0\nflags:\t02\ntty-index:\t7\n"));
        assert_eq!(master, TerminalLive { end: End::Master, index: Some(7) });
        let slave = live_of(DeviceId { major: 137, minor: 3 }, None);
        assert_eq!(slave, TerminalLive { end: End::Slave, index: Some(259) });
        assert_eq!(live_of(DeviceId { major: 5, minor: 0 }, None).end, End::Outside);
        assert!(Terminal::fdinfo_pending(&live_of(DeviceId { major: 5, minor: 2 }, None)));
    }

    #[test]
    fn a_pty_of_an_older_image_decodes_as_unknown_and_is_refused_a_new_one_round_trips() {
        let config = bincode::config::standard();
        // Formats 2 to 4 saved a pty as `{}`: no bytes at all.
        super::super::decoding::set_format(4);
        let (old, used): (TerminalState, usize) = bincode::serde::decode_from_slice(&[], config).unwrap();
        assert_eq!((old.end, used), (End::Unknown, 0));
        assert!(
            Terminal::refusal(&Box::new(old.clone())).is_some_and(|why| why.contains("checkpoint it again"))
        );
        super::super::decoding::set_format(5);
        let new = TerminalState {
            end: End::Slave,
            index: Some(3),
            settings: Some(Settings { winsize: [24, 80, 0, 0], unread: 2, ..Default::default() }),
            other_closed: false,
        };
        let bytes = bincode::serde::encode_to_vec(&new, config).unwrap();
        let (back, _): (TerminalState, usize) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(back, new);
        assert_eq!(
            Terminal::detail(&Box::new(back)).as_deref(),
            Some("pty 3 slave size 80x24 unread 2 (not saved)")
        );
    }

    #[test]
    fn each_end_ties_to_the_other_end_of_its_pty() {
        let master =
            Box::new(TerminalState { end: End::Master, index: Some(4), settings: None, other_closed: false });
        assert_eq!(Terminal::ties(&master), vec![Tie::Pty(PtyEnd { index: 4, master: false })]);
        assert_eq!(Terminal::pty_end(&master), Some(PtyEnd { index: 4, master: true }));
        assert!(Terminal::outside_unless_tied(&master, &[false]));
        assert!(!Terminal::outside_unless_tied(&master, &[true]));
        let tty =
            Box::new(TerminalState { end: End::Outside, index: None, settings: None, other_closed: false });
        assert!(Terminal::ties(&tty).is_empty());
    }
}
