//! TCP and UDP sockets over IPv4 and IPv6.
//!
//! - Recognised by a sockfs inode of family AF_INET or AF_INET6 carrying TCP or UDP.
//! - Live: [`SocketFacts`] (BPF: `sock_common` addresses and ports; /proc: sock_diag).
//! - `ls` names them as lsof does: `TCP 127.0.0.1:8080 (LISTEN)`, `UDP *:5353`,
//!   `TCP 10.0.0.1:22->10.0.0.2:51234 (ESTABLISHED)`.
//! - Saved while frozen through a `pidfd_getfd` copy: the options restore sets
//!   (SO_REUSEADDR, SO_REUSEPORT, SO_KEEPALIVE, SO_BROADCAST, buffer sizes, TCP_NODELAY,
//!   IPV6_V6ONLY) and a UDP socket's queued datagrams with their senders, peeked
//!   without consuming them. When the checkpoint is asked to
//!   ([`SaveOptions::tcp_established`], `--tcp-established`), an established TCP
//!   connection's state too, read in repair mode ([`tcprepair`]); the image says whether
//!   it holds it.
//! - Restore: a listener is made with its options, bound to the same address and port
//!   and listens with the same backlog; a UDP socket is bound (and connected) again and
//!   its datagrams re-sent to it, each from its original sender's address where crd
//!   can bind it (a local one), else from a port of crd's own; an established TCP
//!   connection saved with its state is rebuilt in repair mode, and leaves repair mode
//!   once every object exists (Seal), so both ends of a connection inside the image are
//!   there when either first sends. Refused by name: an established connection saved
//!   without its state (the refusal names `--tcp-established`), a connection in any
//!   other state, and a listener with connections waiting to be accepted (they would be
//!   lost).
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

use nix::sys::socket::SockaddrStorage;
use serde::{Deserialize, Serialize};

use super::{
    Completion, FileKind, KindError, ObjectStore, OpenArgs, Opened, ProcSlot, Reach, Recognise, SaveOptions,
    Stage, Tie,
    socket::{Family, SockType, SocketFacts, state},
    sockio::{self, Buffers, Message, Walk},
    tcprepair::{self, TcpRepair},
};
use crate::sys::{self, SyscallError};

pub struct Inet;

/// Which transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transport {
    Tcp,
    Udp,
}

/// What an image holds of a TCP or UDP socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InetState {
    pub transport: Transport,
    pub ipv6: bool,
    /// `sk_state` (TCP_* numbering; UDP: CLOSE, or ESTABLISHED when connected).
    pub state: u8,
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    /// A listener's backlog.
    pub backlog: u32,
    /// Connections waiting to be accepted on a listener.
    pub pending: u32,
    /// Options (None: only sketched, never saved).
    pub options: Option<InetOptions>,
    /// A UDP socket's queued datagrams, oldest first.
    pub queue: Vec<Message>,
    /// An established TCP connection's state, read in repair mode; None: not asked for
    /// (`--tcp-established`), or not an established connection. (Format 4.)
    #[serde(deserialize_with = "super::decoding::since_v4")]
    pub repair: Option<TcpRepair>,
}

/// Options restore sets again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InetOptions {
    pub buffers: Buffers,
    pub reuseaddr: bool,
    pub reuseport: bool,
    pub keepalive: bool,
    pub broadcast: bool,
    /// TCP_NODELAY (TCP only).
    pub nodelay: bool,
    /// IPV6_V6ONLY (IPv6 only).
    pub v6only: bool,
}

impl InetOptions {
    fn read(fd: BorrowedFd<'_>, transport: Transport, ipv6: bool) -> Result<Self, KindError> {
        let flag = |level, name, call| sockio::get_int(fd, level, name, call).map(|v| v != 0);
        Ok(InetOptions {
            buffers: Buffers::read(fd)?,
            reuseaddr: flag(libc::SOL_SOCKET, libc::SO_REUSEADDR, "getsockopt(SO_REUSEADDR)")?,
            reuseport: flag(libc::SOL_SOCKET, libc::SO_REUSEPORT, "getsockopt(SO_REUSEPORT)")?,
            keepalive: flag(libc::SOL_SOCKET, libc::SO_KEEPALIVE, "getsockopt(SO_KEEPALIVE)")?,
            broadcast: flag(libc::SOL_SOCKET, libc::SO_BROADCAST, "getsockopt(SO_BROADCAST)")?,
            nodelay: transport == Transport::Tcp
                && flag(libc::IPPROTO_TCP, libc::TCP_NODELAY, "getsockopt(TCP_NODELAY)")?,
            v6only: ipv6 && flag(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, "getsockopt(IPV6_V6ONLY)")?,
        })
    }

    /// What must be set before bind (it decides whether the bind succeeds).
    fn apply_before_bind(&self, fd: BorrowedFd<'_>, ipv6: bool) -> Result<(), KindError> {
        sockio::set_int(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            self.reuseaddr as i32,
            "setsockopt(SO_REUSEADDR)",
        )?;
        sockio::set_int(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            self.reuseport as i32,
            "setsockopt(SO_REUSEPORT)",
        )?;
        if ipv6 {
            sockio::set_int(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                self.v6only as i32,
                "setsockopt(IPV6_V6ONLY)",
            )?;
        }
        Ok(())
    }

    fn apply_after(&self, fd: BorrowedFd<'_>, transport: Transport) -> Result<(), KindError> {
        self.buffers.apply(fd)?;
        sockio::set_int(
            fd,
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            self.keepalive as i32,
            "setsockopt(SO_KEEPALIVE)",
        )?;
        sockio::set_int(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BROADCAST,
            self.broadcast as i32,
            "setsockopt(SO_BROADCAST)",
        )?;
        if transport == Transport::Tcp {
            sockio::set_int(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                self.nodelay as i32,
                "setsockopt(TCP_NODELAY)",
            )?;
        }
        Ok(())
    }
}

impl Transport {
    fn of(facts: &SocketFacts) -> Option<Self> {
        match (facts.sock_type, i32::from(facts.protocol)) {
            (SockType::Stream, libc::IPPROTO_TCP) => Some(Transport::Tcp),
            (SockType::Dgram, libc::IPPROTO_UDP) => Some(Transport::Udp),
            _ => None,
        }
    }
}

impl InetState {
    /// As lsof names it: `TCP 127.0.0.1:8080->127.0.0.1:51234 (ESTABLISHED)`, `UDP *:53`.
    pub fn name(&self) -> String {
        let proto = match self.transport {
            Transport::Tcp => "TCP",
            Transport::Udp => "UDP",
        };
        let mut name = format!("{proto} {}", endpoint(self.local));
        if let Some(remote) = self.remote {
            name.push_str(&format!("->{}", endpoint(Some(remote))));
        }
        if self.transport == Transport::Tcp {
            name.push_str(&format!(" ({})", tcp_state_name(self.state)));
        }
        name
    }
}

impl FileKind for Inet {
    const NAME: &'static str = "inet";
    const HAS_PATH: bool = false;
    type Live = Box<SocketFacts>;
    type Saved = Box<InetState>;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.file_type() == libc::S_IFSOCK
            && matches!(r.family.map(Family::from_raw), Some(Family::Inet | Family::Inet6))
    }

    fn from_bpf(_record: &crd_common::FdRecord, tail: &[u8]) -> Option<Self::Live> {
        SocketFacts::from_tail(tail)
            .filter(|f| matches!(f.family, Family::Inet | Family::Inet6) && Transport::of(f).is_some())
            .map(Box::new)
    }

    fn from_proc(slot: &ProcSlot<'_>) -> Self::Live {
        Box::new(slot.socket.cloned().unwrap_or_else(|| SocketFacts::unknown(Family::Inet)))
    }

    fn sketch(live: &Self::Live) -> Self::Saved {
        Box::new(InetState {
            transport: Transport::of(live).unwrap_or(Transport::Tcp),
            ipv6: live.family == Family::Inet6,
            state: live.state,
            local: live.local,
            remote: live.remote,
            backlog: live.backlog,
            pending: live.pending,
            options: None,
            queue: Vec::new(),
            repair: None,
        })
    }

    fn save(live: &Self::Live, reach: &Reach<'_>) -> Result<Self::Saved, KindError> {
        let mut saved = Self::sketch(live);
        let copy = sys::pidfd_getfd(reach.pidfd, reach.fd)?;
        let fd = copy.as_fd();
        saved.local = address(fd, false)?;
        saved.remote = address(fd, true)?;
        saved.options = Some(InetOptions::read(fd, saved.transport, saved.ipv6)?);
        if saved.transport == Transport::Udp {
            let mut carried = Vec::new();
            saved.queue = sockio::peek_queue(fd, Walk::Datagrams, &mut carried)?;
        }
        if wants_repair(&saved, reach.options) {
            let reuseaddr = saved.options.is_some_and(|o| o.reuseaddr);
            saved.repair = Some(tcprepair::save(fd, reuseaddr)?);
        }
        Ok(saved)
    }

    fn name(saved: &Self::Saved) -> Option<String> {
        Some(saved.name())
    }

    fn detail(saved: &Self::Saved) -> Option<String> {
        let family = if saved.ipv6 { "IPv6" } else { "IPv4" };
        Some(match (saved.state, &saved.repair) {
            (state::LISTEN, _) => format!("{family} backlog {} pending {}", saved.backlog, saved.pending),
            (_, Some(repair)) => format!("{family} {}", repair.detail()),
            _ => family.to_string(),
        })
    }

    fn refusal(saved: &Self::Saved) -> Option<String> {
        if saved.transport == Transport::Udp {
            return None;
        }
        match saved.state {
            state::LISTEN if saved.pending != 0 => Some(format!(
                "{} connections wait to be accepted on {}: a restored listener would lose them; let the program accept them, or use `crd graft`",
                saved.pending,
                Self::name(saved).unwrap_or_default()
            )),
            state::LISTEN | state::CLOSE => None,
            state::ESTABLISHED
                if saved.repair.is_some() && saved.local.is_some() && saved.remote.is_some() =>
            {
                None
            }
            state::ESTABLISHED => Some(format!(
                "{} was checkpointed without its connection state: checkpoint with `crd checkpoint --tcp-established` to restore it (restore then needs the original connection gone: its 4-tuple must be free)",
                Self::name(saved).unwrap_or_default()
            )),
            _ => Some(format!(
                "{} is a TCP connection in a state crd cannot restore (only ESTABLISHED ones, checkpointed with --tcp-established); `crd graft` hands the live one over",
                Self::name(saved).unwrap_or_default()
            )),
        }
    }

    fn open(
        saved: &Self::Saved,
        _args: &OpenArgs<'_>,
        _store: &mut ObjectStore,
    ) -> Result<Opened, KindError> {
        if let Some(why) = Self::refusal(saved) {
            return Err(KindError::Other(why));
        }
        let family = if saved.ipv6 { libc::AF_INET6 } else { libc::AF_INET };
        let sock_type = match saved.transport {
            Transport::Tcp => libc::SOCK_STREAM,
            Transport::Udp => libc::SOCK_DGRAM,
        };
        let fd = sockio::socket(family, sock_type)?;
        if let Some(options) = &saved.options {
            options.apply_before_bind(fd.as_fd(), saved.ipv6)?;
        }
        if let (Some(repair), Some(local), Some(remote)) = (&saved.repair, saved.local, saved.remote) {
            let what = Self::name(saved).unwrap_or_default();
            tcprepair::open(fd.as_fd(), repair, local, remote, &what)?;
            return Ok(Opened { fd, fresh: true });
        }
        if let Some(local) = saved.local.filter(|a| a.port() != 0) {
            bind(fd.as_fd(), local)?;
        }
        if saved.transport == Transport::Tcp && saved.state == state::LISTEN {
            // SAFETY: plain syscall on a socket we hold.
            if unsafe { libc::listen(fd.as_raw_fd(), saved.backlog.min(i32::MAX as u32) as i32) } < 0 {
                return Err(SyscallError::last("listen").into());
            }
        }
        if saved.transport == Transport::Udp
            && let Some(remote) = saved.remote
        {
            let addr = SockaddrStorage::from(remote);
            nix::sys::socket::connect(fd.as_raw_fd(), &addr).map_err(|e| KindError::errno("connect", e))?;
        }
        Ok(Opened { fd, fresh: true })
    }

    fn ties(saved: &Self::Saved) -> Vec<Tie> {
        senders(saved).into_iter().map(Tie::Address).collect()
    }

    fn bound_at(saved: &Self::Saved) -> Option<SocketAddr> {
        saved.local.filter(|a| a.port() != 0 && saved.transport == Transport::Udp)
    }

    fn complete(saved: &Self::Saved, stage: Stage, done: &Completion<'_>) -> Result<(), KindError> {
        match stage {
            Stage::Fill => refill(saved, done),
            Stage::Seal => {
                if let Some(repair) = &saved.repair {
                    tcprepair::seal(done.fd, repair)?;
                    // Leaving repair mode cleared SO_REUSEADDR.
                    let reuseaddr = saved.options.is_some_and(|o| o.reuseaddr);
                    sockio::set_int(
                        done.fd,
                        libc::SOL_SOCKET,
                        libc::SO_REUSEADDR,
                        reuseaddr as i32,
                        "setsockopt(SO_REUSEADDR)",
                    )?;
                }
                match &saved.options {
                    Some(options) => options.apply_after(done.fd, saved.transport),
                    None => Ok(()),
                }
            }
        }
    }

    fn same(a: &Self::Saved, b: &Self::Saved) -> Result<(), String> {
        let key =
            |s: &Self::Saved| (s.transport, s.ipv6, s.state, s.local, s.remote, s.backlog, s.queue.clone());
        if key(a) != key(b) {
            return Err(format!("inet socket {:?} vs {:?}", Inet::name(a), Inet::name(b)));
        }
        if let (Some(x), Some(y)) = (&a.options, &b.options)
            && x != y
        {
            return Err(format!("inet socket options {x:?} vs {y:?}"));
        }
        // Sequence numbers and queues; the timestamp clock and window move on their own.
        let connection = |r: &TcpRepair| {
            (r.recv_seq, r.send_seq, r.recv_queue.clone(), r.send_queue.clone(), r.mss, r.options)
        };
        if let (Some(x), Some(y)) = (&a.repair, &b.repair)
            && connection(x) != connection(y)
        {
            return Err(format!("TCP connection {:?}: {} vs {}", Inet::name(a), x.detail(), y.detail()));
        }
        Ok(())
    }
}

/// Whether save reads the connection's state in repair mode: asked for, and an
/// established TCP connection (repair mode takes only those and closed sockets).
fn wants_repair(saved: &InetState, options: SaveOptions) -> bool {
    options.tcp_established && saved.transport == Transport::Tcp && saved.state == state::ESTABLISHED
}

/// An address as lsof prints it: `*` for the wildcard address, IPv6 in brackets.
/// The local (or remote) address of a socket; None: none (not bound, not connected).
fn address(fd: BorrowedFd<'_>, remote: bool) -> Result<Option<SocketAddr>, KindError> {
    let got = if remote {
        nix::sys::socket::getpeername::<SockaddrStorage>(fd.as_raw_fd())
    } else {
        nix::sys::socket::getsockname::<SockaddrStorage>(fd.as_raw_fd())
    };
    let addr = match got {
        Ok(addr) => addr,
        Err(nix::errno::Errno::ENOTCONN) => return Ok(None),
        Err(e) => return Err(KindError::errno(if remote { "getpeername" } else { "getsockname" }, e)),
    };
    Ok(socket_addr(&addr))
}

fn socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    addr.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

fn bind(fd: BorrowedFd<'_>, local: SocketAddr) -> Result<(), KindError> {
    let addr = SockaddrStorage::from(local);
    nix::sys::socket::bind(fd.as_raw_fd(), &addr).map_err(|e| match e {
        nix::errno::Errno::EADDRINUSE => KindError::Other(format!(
            "{local} is in use: the original (or another program) still holds it; restore after it is gone"
        )),
        e => KindError::errno("bind", e),
    })
}

/// The distinct senders of the queued datagrams, in queue order: the sockets restore
/// sends them from again when the image holds them.
fn senders(saved: &InetState) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for from in saved.queue.iter().filter_map(|m| m.from) {
        if !out.contains(&from) {
            out.push(from);
        }
    }
    out
}

/// Re-sends a UDP socket's queued datagrams to it, each from its sender: the image's
/// socket bound at the sender's address, or one crd binds there for the moment, else a
/// port of crd's own (the sender then differs: said in a warning).
fn refill(saved: &InetState, done: &Completion<'_>) -> Result<(), KindError> {
    let fd = done.fd;
    if saved.queue.is_empty() {
        return Ok(());
    }
    let Some(local) = address(fd, false)? else {
        return Err(KindError::Other(
            "queued datagrams cannot be put back: the socket has no address".into(),
        ));
    };
    // A wildcard address is reached on loopback.
    let target = match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), local.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), local.port())
        }
        _ => local,
    };
    let family = if saved.ipv6 { libc::AF_INET6 } else { libc::AF_INET };
    let to = SockaddrStorage::from(target);
    let mut own: Option<OwnedFd> = None;
    let senders = senders(saved);
    for message in &saved.queue {
        let tied = message.from.and_then(|from| {
            let i = senders.iter().position(|s| *s == from)?;
            done.tied.get(i)?.1.map(|(fd, _)| fd)
        });
        let from_original = message.from.filter(|_| tied.is_none()).and_then(|from| {
            let sender = sockio::socket(family, libc::SOCK_DGRAM).ok()?;
            sockio::set_int(
                sender.as_fd(),
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                1,
                "setsockopt(SO_REUSEADDR)",
            )
            .ok()?;
            sockio::set_int(
                sender.as_fd(),
                libc::SOL_SOCKET,
                libc::SO_REUSEPORT,
                1,
                "setsockopt(SO_REUSEPORT)",
            )
            .ok()?;
            bind(sender.as_fd(), from).ok()?;
            Some(sender)
        });
        let sender = match (tied, &from_original) {
            (Some(sender), _) => sender,
            (None, Some(sender)) => sender.as_fd(),
            (None, None) => {
                if own.is_none() {
                    log::warn!(
                        "a datagram queued on {} is re-sent from a port of crd's own: its sender's address could not be bound",
                        saved.name()
                    );
                    own = Some(sockio::socket(family, libc::SOCK_DGRAM)?);
                }
                own.as_ref().map(AsFd::as_fd).ok_or_else(|| KindError::Other("no sender".into()))?
            }
        };
        let sent = nix::sys::socket::sendto(
            sender.as_raw_fd(),
            &message.data,
            &to,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        )
        .map_err(|e| KindError::errno("sendto", e))?;
        if sent != message.data.len() {
            return Err(KindError::Other(format!(
                "only {sent} of a datagram's {} bytes were re-sent",
                message.data.len()
            )));
        }
    }
    Ok(())
}

fn endpoint(addr: Option<SocketAddr>) -> String {
    let Some(addr) = addr else { return "*:*".into() };
    let ip = if addr.ip().is_unspecified() {
        "*".to_string()
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    let port = if addr.port() == 0 { "*".to_string() } else { addr.port().to_string() };
    format!("{ip}:{port}")
}

/// lsof's TCP state names.
fn tcp_state_name(s: u8) -> &'static str {
    match s {
        state::ESTABLISHED => "ESTABLISHED",
        state::SYN_SENT => "SYN_SENT",
        state::SYN_RECV => "SYN_RECV",
        state::FIN_WAIT1 => "FIN_WAIT1",
        state::FIN_WAIT2 => "FIN_WAIT2",
        state::TIME_WAIT => "TIME_WAIT",
        state::CLOSE => "CLOSED",
        state::CLOSE_WAIT => "CLOSE_WAIT",
        state::LAST_ACK => "LAST_ACK",
        state::LISTEN => "LISTEN",
        state::CLOSING => "CLOSING",
        _ => "UNKNOWN",
    }
}
