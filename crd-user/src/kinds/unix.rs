//! Unix sockets: stream, datagram and seqpacket; socketpairs, listeners (path and
//! abstract names), connections accepted or still waiting on a listener, the messages
//! queued in each receive queue, and the fds in flight inside them (SCM_RIGHTS).
//!
//! A connected pair is the seed's nested sharing again: two sockets, each its own inode,
//! each the other's peer. Its state ties a socket to its peer ([`Tie::Peer`]) and, for a
//! connection made through a listener, to that listener ([`Tie::Listener`]); the graph
//! nests the tied objects in the socket's record, so the first encounter of either end
//! makes both and deposits the other end under its objref (linux-cr's logic):
//! `socketpair` for a pair, connect + accept for a connection accepted from a listener
//! (through the listener of the image when it exists already, else through a listener
//! of the same name made for the moment), so names come back as they were. A connection
//! still waiting to be accepted is connected to its listener once every listener and
//! accepted connection exists (so accept order is kept).
//!
//! - Recognised by a sockfs inode of family AF_UNIX; live facts from BPF (`unix_sock`)
//!   or sock_diag.
//! - Saved while frozen through a `pidfd_getfd` copy: type, names, buffer sizes,
//!   SO_PASSCRED, the peek offset, and the receive queue read without consuming it
//!   ([`sockio::peek_queue`]), message by message, with the files each carries.
//! - Restore refills each receive queue from the peer (or, for a named datagram socket,
//!   from a socket of crd's own), with the same files in flight, then sets the options
//!   and the shutdowns.
//! - A connected socket whose peer is outside the checkpointed set is held outside: an
//!   image restore refuses it, or with `--allow-external` makes it unconnected.
//!
//! Not kept (said in docs/kinds.md): a datagram's sender name, SCM_CREDENTIALS, and what
//! a client wrote into a connection its listener had not accepted yet (that queue
//! belongs to a socket no fd names).
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

use super::{
    Completion, FileKind, KindError, ObjectStore, OpenArgs, Opened, ProcSlot, Reach, Recognise, Saved, Stage,
    Tie,
    socket::{Family, RCV_SHUTDOWN, SEND_SHUTDOWN, SockType, SocketFacts, UnixName, state},
    sockio::{self, Buffers, Message, Walk},
};
use crate::sys::{self, SyscallError};

pub struct Unix;

/// Where a unix socket stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnixStatus {
    /// Neither listening nor connected (a bound or unbound datagram socket, a fresh one).
    Unconnected,
    Listening,
    Connected,
}

impl UnixStatus {
    fn of(facts: &SocketFacts) -> Self {
        match facts.state {
            state::LISTEN => UnixStatus::Listening,
            state::ESTABLISHED => UnixStatus::Connected,
            // A datagram socket connected to another has a peer but no state change.
            _ if facts.peer.is_some() => UnixStatus::Connected,
            _ => UnixStatus::Unconnected,
        }
    }
}

/// Options restore sets again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixOptions {
    pub buffers: Buffers,
    pub passcred: bool,
    /// SO_PEEK_OFF (-1: off).
    pub peek_off: i32,
}

/// What an image holds of a unix socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixState {
    pub sock_type: SockType,
    pub status: UnixStatus,
    /// `sk_shutdown` bits.
    pub shutdown: u8,
    /// Its own name (getsockname): bound, or for an accepted connection its listener's.
    pub name: UnixName,
    /// Its peer's name (getpeername): for a client, the listener it connected to.
    pub peer_name: UnixName,
    /// The peer's inode number at checkpoint time: the graph ties the peer by it.
    pub peer_ino: Option<u64>,
    /// A listener's backlog.
    pub backlog: u32,
    /// Connections waiting to be accepted on a listener.
    pub pending: u32,
    /// Options (None: only sketched, never saved).
    pub options: Option<UnixOptions>,
    /// The receive queue, oldest first (empty when only sketched).
    pub queue: Vec<Message>,
}

impl UnixState {
    fn connection_oriented(&self) -> bool {
        self.sock_type != SockType::Dgram
    }

    /// The listener this connection was made through: its own name for the accepted
    /// end, its peer's for the connecting end.
    fn listener_name(&self) -> Option<&UnixName> {
        if self.status != UnixStatus::Connected || !self.connection_oriented() {
            return None;
        }
        [&self.name, &self.peer_name].into_iter().find(|n| n.is_named())
    }

    fn queued_bytes(&self) -> usize {
        self.queue.iter().map(|m| m.data.len()).sum()
    }

    fn queued_fds(&self) -> u32 {
        self.queue.iter().map(|m| m.fds).sum()
    }
}

impl FileKind for Unix {
    const NAME: &'static str = "unix";
    const HAS_PATH: bool = false;
    type Live = Box<SocketFacts>;
    type Saved = Box<UnixState>;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.file_type() == libc::S_IFSOCK && r.family == Some(Family::Unix.raw())
    }

    fn from_bpf(_record: &crd_common::FdRecord, tail: &[u8]) -> Option<Self::Live> {
        SocketFacts::from_tail(tail).filter(|f| f.family == Family::Unix).map(Box::new)
    }

    fn from_proc(slot: &ProcSlot<'_>) -> Self::Live {
        Box::new(slot.socket.cloned().unwrap_or_else(|| SocketFacts::unknown(Family::Unix)))
    }

    fn sketch(live: &Self::Live) -> Self::Saved {
        Box::new(UnixState {
            sock_type: live.sock_type,
            status: UnixStatus::of(live),
            shutdown: live.shutdown,
            name: live.name.clone(),
            peer_name: UnixName::Unnamed,
            peer_ino: live.peer,
            backlog: live.backlog,
            pending: live.pending,
            options: None,
            queue: Vec::new(),
        })
    }

    fn save(live: &Self::Live, reach: &Reach<'_>) -> Result<Self::Saved, KindError> {
        let copy = sys::pidfd_getfd(reach.pidfd, reach.fd)?;
        let fd = copy.as_fd();
        let sock_type =
            SockType::from_raw(
                sockio::get_int(fd, libc::SOL_SOCKET, libc::SO_TYPE, "getsockopt(SO_TYPE)")? as u16
            );
        let listening =
            sockio::get_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN, "getsockopt(SO_ACCEPTCONN)")? != 0;
        let name = own_name(fd)?;
        let peer_name = peer_name(fd)?;
        let status = if listening {
            UnixStatus::Listening
        } else if peer_name.is_some() || live.peer.is_some() {
            UnixStatus::Connected
        } else {
            UnixStatus::Unconnected
        };
        let options = UnixOptions {
            buffers: Buffers::read(fd)?,
            passcred: sockio::get_int(fd, libc::SOL_SOCKET, libc::SO_PASSCRED, "getsockopt(SO_PASSCRED)")?
                != 0,
            peek_off: sockio::get_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, "getsockopt(SO_PEEK_OFF)")?,
        };
        let queue = if listening {
            Vec::new()
        } else {
            let walk = match sock_type {
                SockType::Stream => Walk::Stream,
                SockType::Seqpacket if live.shutdown & RCV_SHUTDOWN != 0 => Walk::ShutSeqpacket,
                _ => Walk::Datagrams,
            };
            sockio::peek_queue(fd, walk, &mut reach.carried.borrow_mut())?
        };
        // Each datagram is one buffer: the kernel's count must match what the walk read.
        // (A zero-length datagram someone peeked before is skipped by every peek at an
        // offset: the kernel offers no way to read it in place. Any peek of it marks it
        // so, crd's own walk too: a second checkpoint of a queue holding an empty
        // datagram refuses here. What the process receives is unchanged.)
        if sock_type != SockType::Stream && !listening && live.rqueue as usize > queue.len() {
            return Err(KindError::Other(format!(
                "its queue holds {} datagrams but only {} could be read in place (an empty datagram peeked before, by the process or by an earlier checkpoint, cannot be: the kernel skips it); nothing was written",
                live.rqueue,
                queue.len()
            )));
        }
        Ok(Box::new(UnixState {
            sock_type,
            status,
            shutdown: live.shutdown,
            name,
            peer_name: peer_name.unwrap_or_default(),
            peer_ino: live.peer,
            backlog: live.backlog,
            pending: live.pending,
            options: Some(options),
            queue,
        }))
    }

    /// Its bound name (an accepted connection's is its listener's), as lsof puts it
    /// first; an unnamed socket is named by its inode (`socket:[N]`, see
    /// [`crate::graph::Object::name`]), and its type is in the detail, not repeated here.
    fn name(saved: &Self::Saved) -> Option<String> {
        saved.name.is_named().then(|| saved.name.to_string())
    }

    fn detail(saved: &Self::Saved) -> Option<String> {
        let mut detail = format!("type={}", upper(saved.sock_type));
        match saved.status {
            UnixStatus::Listening => {
                detail.push_str(&format!(" (LISTEN) backlog {}", saved.backlog));
                if saved.pending != 0 {
                    detail.push_str(&format!(" pending {}", saved.pending));
                }
            }
            UnixStatus::Connected => detail.push_str(" (CONNECTED)"),
            UnixStatus::Unconnected => {}
        }
        if let Some(ino) = saved.peer_ino {
            detail.push_str(&format!(" ->INO={ino}"));
        }
        if !saved.queue.is_empty() {
            detail.push_str(&format!(" queued {} bytes", saved.queued_bytes()));
            let fds = saved.queued_fds();
            if fds != 0 {
                detail.push_str(&format!(" {fds} fds in flight"));
            }
        }
        Some(detail)
    }

    fn ties(saved: &Self::Saved) -> Vec<Tie> {
        let mut ties = Vec::new();
        if let Some(ino) = saved.peer_ino {
            ties.push(Tie::Peer(ino));
        }
        if let Some(name) = saved.listener_name() {
            ties.push(Tie::Listener(name.clone()));
        }
        ties
    }

    fn listens_at(saved: &Self::Saved) -> Option<&UnixName> {
        (saved.status == UnixStatus::Listening && saved.name.is_named()).then_some(&saved.name)
    }

    fn outside_unless_tied(saved: &Self::Saved, found: &[bool]) -> bool {
        if saved.status != UnixStatus::Connected {
            return false;
        }
        let mut found = found.iter().copied();
        let peer = saved.peer_ino.map(|_| found.next().unwrap_or(false));
        let listener = saved.listener_name().map(|_| found.next().unwrap_or(false));
        match peer {
            Some(peer) => !peer,
            // A connection no socket has accepted yet: its listener must be inside.
            None => !listener.unwrap_or(false),
        }
    }

    fn open(saved: &Self::Saved, args: &OpenArgs<'_>, store: &mut ObjectStore) -> Result<Opened, KindError> {
        // Made with another object's first encounter (the other end of a pair).
        if let Some(fd) = store.pick_up(args.object, 0) {
            return Ok(Opened { fd, fresh: true });
        }
        let fd = match saved.status {
            UnixStatus::Listening => {
                let fd = bound(saved.sock_type, &saved.name)?;
                listen(fd.as_fd(), saved.backlog)?;
                fd
            }
            UnixStatus::Connected => match mutual_peer(saved, args) {
                Some((peer, peer_state)) => {
                    let (mine, theirs) = pair(saved, peer_state, args)?;
                    store.deposit(peer.object, 0, theirs);
                    mine
                }
                // Waiting on a listener, or connected to a socket that is not mutual
                // (a datagram client of a named socket), or external: connected once
                // everything exists (`complete`).
                None => sockio::socket(libc::AF_UNIX, saved.sock_type.raw())?,
            },
            UnixStatus::Unconnected => bound(saved.sock_type, &saved.name)?,
        };
        Ok(Opened { fd, fresh: true })
    }

    fn complete(saved: &Self::Saved, stage: Stage, done: &Completion<'_>) -> Result<(), KindError> {
        let mut tied = done.tied.iter();
        let peer = saved.peer_ino.and_then(|_| tied.next()).and_then(|(_, made)| *made);
        let listener = saved.listener_name().and_then(|_| tied.next()).and_then(|(_, made)| *made);
        let peer_state = peer.and_then(|(_, s)| unix(s));
        let mutual = peer_state.is_some_and(|p| p.peer_ino.is_some() && p.status == UnixStatus::Connected);
        match stage {
            Stage::Fill => {
                if saved.status == UnixStatus::Connected && !mutual {
                    // A connection waiting on its listener, or a datagram socket
                    // connected to a named one.
                    let target = match (peer_state, listener) {
                        (Some(p), _) if p.name.is_named() => Some(&p.name),
                        (None, Some(_)) => Some(&saved.peer_name),
                        _ => None,
                    };
                    if let Some(name) = target {
                        connect(done.fd, name)?;
                    }
                }
                fill(saved, done, peer.filter(|_| mutual).map(|(fd, _)| fd), peer_state)
            }
            Stage::Seal => {
                if let Some(options) = &saved.options {
                    options.buffers.apply(done.fd)?;
                    sockio::set_int(
                        done.fd,
                        libc::SOL_SOCKET,
                        libc::SO_PASSCRED,
                        options.passcred as i32,
                        "setsockopt(SO_PASSCRED)",
                    )?;
                    if options.peek_off >= 0 {
                        sockio::set_int(
                            done.fd,
                            libc::SOL_SOCKET,
                            libc::SO_PEEK_OFF,
                            options.peek_off,
                            "setsockopt(SO_PEEK_OFF)",
                        )?;
                    }
                }
                shutdown(done.fd, saved.shutdown)
            }
        }
    }

    fn same(a: &Self::Saved, b: &Self::Saved) -> Result<(), String> {
        let key = |s: &Self::Saved| {
            (s.sock_type, s.status, s.shutdown, s.name.clone(), s.peer_name.clone(), s.backlog)
        };
        if key(a) != key(b) {
            return Err(format!(
                "unix socket {:?} vs {:?}",
                (a.sock_type, a.status, a.shutdown, &a.name, &a.peer_name, a.backlog),
                (b.sock_type, b.status, b.shutdown, &b.name, &b.peer_name, b.backlog)
            ));
        }
        if a.queue != b.queue {
            return Err(format!(
                "unix socket queue: {} messages ({} bytes, {} fds) vs {} ({} bytes, {} fds), or other bytes",
                a.queue.len(),
                a.queued_bytes(),
                a.queued_fds(),
                b.queue.len(),
                b.queued_bytes(),
                b.queued_fds()
            ));
        }
        if let (Some(x), Some(y)) = (&a.options, &b.options)
            && x != y
        {
            return Err(format!("unix socket options {x:?} vs {y:?}"));
        }
        Ok(())
    }
}

/// lsof's type names: STREAM, DGRAM, SEQPACKET.
pub(super) fn upper(t: SockType) -> String {
    t.to_string().to_uppercase()
}

fn unix(state: &Saved) -> Option<&UnixState> {
    match state {
        Saved::Unix(s) => Some(s),
        _ => None,
    }
}

/// The peer made with this socket: tied, and connected back to this one.
fn mutual_peer<'a>(
    saved: &UnixState,
    args: &'a OpenArgs<'a>,
) -> Option<(&'a super::Tied<'a>, &'a UnixState)> {
    saved.peer_ino?;
    let peer = args.tied.iter().find(|t| matches!(t.tie, Tie::Peer(_)))?;
    let state = unix(peer.state)?;
    (state.status == UnixStatus::Connected && state.peer_ino == Some(args.ino)).then_some((peer, state))
}

/// Makes a connected pair: (this socket, its peer).
fn pair(saved: &UnixState, peer: &UnixState, args: &OpenArgs<'_>) -> Result<(OwnedFd, OwnedFd), KindError> {
    // A connection made through a listener: its accepted end is named after it.
    let through = if saved.connection_oriented() && saved.name.is_named() && peer.peer_name == saved.name {
        Some((&saved.name, true))
    } else if saved.connection_oriented() && peer.name.is_named() && saved.peer_name == peer.name {
        Some((&peer.name, false))
    } else {
        None
    };
    let Some((name, accepted_is_me)) = through else {
        return socketpair(saved.sock_type);
    };
    let listener =
        args.tied.iter().find(|t| matches!(t.tie, Tie::Listener(n) if n == name)).and_then(|t| t.fd);
    let (client, server) = connect_accept(saved.sock_type, name, listener)?;
    Ok(if accepted_is_me { (server, client) } else { (client, server) })
}

fn socketpair(sock_type: SockType) -> Result<(OwnedFd, OwnedFd), KindError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two fds into the array we pass.
    let ret =
        unsafe { libc::socketpair(libc::AF_UNIX, sock_type.raw() | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    if ret < 0 {
        return Err(SyscallError::last("socketpair").into());
    }
    // SAFETY: the kernel just returned these two fds to us; nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A client connected to `name` and the connection accepted on the listener: the
/// image's listener when it exists, else one made at that name for the moment.
fn connect_accept(
    sock_type: SockType,
    name: &UnixName,
    listener: Option<RawFd>,
) -> Result<(OwnedFd, OwnedFd), KindError> {
    let own_listener;
    let listener_fd = match listener {
        Some(fd) => fd,
        None => {
            let fd = bound(sock_type, name)?;
            listen(fd.as_fd(), 1)?;
            own_listener = fd;
            std::os::fd::AsRawFd::as_raw_fd(&own_listener)
        }
    };
    let client = sockio::socket(libc::AF_UNIX, sock_type.raw())?;
    connect(client.as_fd(), name)?;
    // SAFETY: accept4 on a listening fd we hold; no address is asked for.
    let raw =
        unsafe { libc::accept4(listener_fd, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
    if raw < 0 {
        return Err(SyscallError::last("accept4").into());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    let server = unsafe { OwnedFd::from_raw_fd(raw) };
    if listener.is_none() {
        // The listener of the moment goes; its file with it, so the image's own
        // listener (or the user) can bind the name again.
        if let UnixName::Path(path) = name {
            let _ = std::fs::remove_file(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(path));
        }
    }
    Ok((client, server))
}

/// A socket of `sock_type`, bound to `name` if it has one.
fn bound(sock_type: SockType, name: &UnixName) -> Result<OwnedFd, KindError> {
    let fd = sockio::socket(libc::AF_UNIX, sock_type.raw())?;
    if name.is_named() {
        let (addr, len) = sockaddr(name)?;
        // SAFETY: bind reads `len` bytes of the sockaddr_un we pass.
        let ret = unsafe { libc::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), (&raw const addr).cast(), len) };
        if ret < 0 {
            let e = SyscallError::last("bind");
            if e.errno() == Some(libc::EADDRINUSE) {
                return Err(KindError::Other(match name {
                    UnixName::Path(_) => format!(
                        "{name} is in use: a socket file is left there (remove it if nothing listens on it any more) or the original still runs"
                    ),
                    _ => format!(
                        "{name} is in use: the original (or another program) still holds that abstract name"
                    ),
                }));
            }
            return Err(e.into());
        }
    }
    Ok(fd)
}

fn listen(fd: BorrowedFd<'_>, backlog: u32) -> Result<(), KindError> {
    // SAFETY: plain syscall on a socket we hold.
    if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&fd), backlog.min(i32::MAX as u32) as i32) } < 0
    {
        return Err(SyscallError::last("listen").into());
    }
    Ok(())
}

fn connect(fd: BorrowedFd<'_>, name: &UnixName) -> Result<(), KindError> {
    let (addr, len) = sockaddr(name)?;
    // SAFETY: connect reads `len` bytes of the sockaddr_un we pass.
    let ret = unsafe { libc::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), (&raw const addr).cast(), len) };
    if ret < 0 {
        return Err(KindError::Other(format!(
            "cannot connect to {name}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

fn shutdown(fd: BorrowedFd<'_>, bits: u8) -> Result<(), KindError> {
    let how = match (bits & RCV_SHUTDOWN != 0, bits & SEND_SHUTDOWN != 0) {
        (true, true) => libc::SHUT_RDWR,
        (true, false) => libc::SHUT_RD,
        (false, true) => libc::SHUT_WR,
        (false, false) => return Ok(()),
    };
    // SAFETY: plain syscall on a socket we hold.
    if unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&fd), how) } < 0 {
        let e = SyscallError::last("shutdown");
        // An unconnected socket has nothing to shut down (its bits were its old peer's).
        if e.errno() != Some(libc::ENOTCONN) {
            return Err(e.into());
        }
    }
    Ok(())
}

/// Refills the receive queue: from the mutual peer, or (a named datagram socket) from a
/// socket of crd's own addressed to its name.
fn fill(
    saved: &UnixState,
    done: &Completion<'_>,
    peer: Option<BorrowedFd<'_>>,
    peer_state: Option<&UnixState>,
) -> Result<(), KindError> {
    if saved.queue.is_empty() {
        return Ok(());
    }
    let mut files = done.carried.iter().copied();
    let mut take = |n: u32| -> Result<Vec<BorrowedFd<'_>>, KindError> {
        (0..n)
            .map(|_| files.next().ok_or_else(|| KindError::Other("the image lacks a file in flight".into())))
            .collect()
    };
    match peer {
        Some(sender) => {
            // Room for the whole queue in the sender's buffer; its own size comes back
            // with its options (Seal).
            let room = (saved.queued_bytes() * 2 + (1 << 20)).min(i32::MAX as usize / 2) as i32;
            sockio::set_int(
                sender,
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                room,
                "setsockopt(SO_SNDBUFFORCE)",
            )?;
            let _ = peer_state;
            for message in &saved.queue {
                sockio::send(sender, message, &take(message.fds)?)?;
            }
        }
        None if saved.sock_type != SockType::Stream && saved.name.is_named() => {
            let sender = sockio::socket(libc::AF_UNIX, saved.sock_type.raw())?;
            connect(sender.as_fd(), &saved.name)?;
            for message in &saved.queue {
                sockio::send(sender.as_fd(), message, &take(message.fds)?)?;
            }
        }
        None => {
            return Err(KindError::Other(format!(
                "{} queued bytes cannot be put back: nothing in the image can send to this socket",
                saved.queued_bytes()
            )));
        }
    }
    Ok(())
}

/// A `sockaddr_un` for `name`.
fn sockaddr(name: &UnixName) -> Result<(libc::sockaddr_un, libc::socklen_t), KindError> {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid (unnamed) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes: Vec<u8> = match name {
        UnixName::Unnamed => Vec::new(),
        UnixName::Path(p) => p.clone(),
        UnixName::Abstract(p) => std::iter::once(0).chain(p.iter().copied()).collect(),
    };
    if bytes.len() > addr.sun_path.len() {
        return Err(KindError::Other(format!("the name {name} is too long for a unix socket")));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(&bytes) {
        *dst = *src as libc::c_char;
    }
    let base = std::mem::offset_of!(libc::sockaddr_un, sun_path);
    // A path is NUL-terminated in the length; an abstract name is exactly its bytes.
    let extra = matches!(name, UnixName::Path(_)) as usize;
    Ok((addr, (base + bytes.len() + extra).min(std::mem::size_of::<libc::sockaddr_un>()) as libc::socklen_t))
}

/// A name from getsockname/getpeername's answer.
fn name_of(addr: &libc::sockaddr_un, len: libc::socklen_t) -> UnixName {
    let base = std::mem::offset_of!(libc::sockaddr_un, sun_path);
    let n = (len as usize).saturating_sub(base).min(addr.sun_path.len());
    let bytes: Vec<u8> = addr.sun_path[..n].iter().map(|&c| c as u8).collect();
    UnixName::from_sun_path(&bytes)
}

fn own_name(fd: BorrowedFd<'_>) -> Result<UnixName, KindError> {
    // SAFETY: sockaddr_un is plain old data; getsockname fills at most `len` bytes.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: see above; the pointers are to our locals.
    if unsafe { libc::getsockname(std::os::fd::AsRawFd::as_raw_fd(&fd), (&raw mut addr).cast(), &mut len) }
        < 0
    {
        return Err(SyscallError::last("getsockname").into());
    }
    Ok(name_of(&addr, len))
}

/// The peer's name; None: not connected.
fn peer_name(fd: BorrowedFd<'_>) -> Result<Option<UnixName>, KindError> {
    // SAFETY: sockaddr_un is plain old data; getpeername fills at most `len` bytes.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: see above; the pointers are to our locals.
    if unsafe { libc::getpeername(std::os::fd::AsRawFd::as_raw_fd(&fd), (&raw mut addr).cast(), &mut len) }
        < 0
    {
        let e = SyscallError::last("getpeername");
        if e.errno() == Some(libc::ENOTCONN) {
            return Ok(None);
        }
        return Err(e.into());
    }
    Ok(Some(name_of(&addr, len)))
}
