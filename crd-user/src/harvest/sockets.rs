//! Sockets for the /proc harvester: sock_diag (NETLINK_SOCK_DIAG) dumps, one per network
//! namespace, turned into the same [`SocketFacts`] the BPF harvester reads from
//! `struct sock`, keyed by socket inode.
//!
//! - **Which namespace.** sock_diag answers only for the namespace its netlink socket
//!   was created in. Each target's namespace is `/proc/TID/ns/net`; namespaces are told
//!   apart by that file's (st_dev, st_ino) and each is dumped once per harvest. For a
//!   namespace other than crd's own, crd enters it (`setns` on the calling thread — crd
//!   is single-threaded for ptrace), creates the netlink socket, and returns at once:
//!   the socket stays bound to the namespace it was made in, and the dump runs from
//!   crd's own namespace. A socket created in one namespace and held by a process that
//!   moved to another is looked up in every namespace dumped so far.
//! - **What is dumped.** unix (`UDIAG_SHOW_NAME | PEER | RQLEN | ICONS`; the kernel adds
//!   `UNIX_DIAG_SHUTDOWN` on its own), and inet for {IPv4, IPv6} × {TCP, UDP}, all states.
//! - **What it cannot see.** Families without a dump here (netlink, packet, vsock...),
//!   inet protocols other than TCP and UDP, and any family whose diag module is missing:
//!   [`Sockets::facts`] says so with None, and the caller names the family from the
//!   socket's `system.sockprotoname` ([`family_of_protoname`]). No fd is ever dropped.
//!
//! How each [`SocketFacts`] field is filled from sock_diag (the BPF harvester must mean
//! the same; see `SocketFacts`):
//! - `state`, `sock_type`, `protocol`: `udiag_state`/`idiag_state` (`sk_state`),
//!   `udiag_type`; TCP is SOCK_STREAM/IPPROTO_TCP and UDP SOCK_DGRAM/IPPROTO_UDP, as the
//!   dump asked. A unix socket's `protocol` is 0 (sock_diag does not show `sk_protocol`,
//!   which is 0 unless the program passed PF_UNIX to `socket`).
//! - `shutdown`: `UNIX_DIAG_SHUTDOWN` / `INET_DIAG_SHUTDOWN` (`sk_shutdown`).
//! - `backlog`, `pending`: for a listener only (`sk_max_ack_backlog` and the connections
//!   waiting for accept: unix `UNIX_DIAG_RQLEN` = (receive queue length, max backlog),
//!   inet `idiag_wqueue` / `idiag_rqueue`); 0 for every other socket.
//! - `rqueue`: messages (skbs) in the receive queue. For a unix listener that is its
//!   pending connections (`UNIX_DIAG_RQLEN`'s first number is `sk_receive_queue.qlen`
//!   there). For any other socket sock_diag gives bytes, not messages (unix stream and
//!   seqpacket: all queued bytes; unix datagram: the first datagram's length; TCP:
//!   unread sequence space; UDP: receive memory), so /proc leaves `rqueue` at 0: **the
//!   two harvesters agree on it only for listeners and for empty queues.**
//! - `peer`: `UNIX_DIAG_PEER` (the peer's inode; None when 0: a connection not yet
//!   accepted has no inode).
//! - `name`: `UNIX_DIAG_NAME` (a path, or an abstract name after its NUL).
//! - `local`, `remote`: `inet_diag_sockid` (the remote is None when both its address
//!   and port are zero, as the BPF tail decodes it).
use std::{
    collections::HashMap,
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::{fd::AsFd, unix::fs::MetadataExt},
};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    inet::{self, ExtensionFlags, InetRequest, InetResponse, SocketId},
    unix::{self, ShowFlags, UnixRequest, UnixResponse, nlas::UnixDiagName},
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};
use nix::sched::CloneFlags;

use crate::{
    kinds::socket::{Family, SockType, SocketFacts, UnixName, state},
    types::Pid,
};

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("cannot open {path}: {source}")]
    Namespace { path: String, source: io::Error },
    #[error("cannot enter the network namespace of {path}: {source}")]
    Enter { path: String, source: nix::Error },
    #[error("cannot open a NETLINK_SOCK_DIAG socket: {0}")]
    Socket(#[source] io::Error),
    #[error("sock_diag {what}: {source}")]
    Io { what: &'static str, source: io::Error },
    #[error("sock_diag {what}: the kernel refused the dump: {source}")]
    Refused { what: &'static str, source: io::Error },
    #[error("sock_diag {what}: {reason}")]
    Decode { what: &'static str, reason: String },
}

/// One dump request: unix, or one inet family and protocol; or only the unix sockets'
/// receive queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dump {
    Unix,
    Inet { family: u8, protocol: u8 },
    UnixQueues,
}

const DUMPS: [Dump; 5] = [
    Dump::Unix,
    Dump::Inet { family: libc::AF_INET as u8, protocol: libc::IPPROTO_TCP as u8 },
    Dump::Inet { family: libc::AF_INET as u8, protocol: libc::IPPROTO_UDP as u8 },
    Dump::Inet { family: libc::AF_INET6 as u8, protocol: libc::IPPROTO_TCP as u8 },
    Dump::Inet { family: libc::AF_INET6 as u8, protocol: libc::IPPROTO_UDP as u8 },
];

impl Dump {
    fn what(self) -> &'static str {
        match self {
            Dump::Unix => "unix",
            Dump::UnixQueues => "unix queue",
            Dump::Inet { family, protocol } => {
                match (i32::from(family) == libc::AF_INET6, i32::from(protocol) == libc::IPPROTO_TCP) {
                    (false, true) => "TCP/IPv4",
                    (false, false) => "UDP/IPv4",
                    (true, true) => "TCP/IPv6",
                    (true, false) => "UDP/IPv6",
                }
            }
        }
    }

    /// The module that answers this dump (the kernel loads it on the first request
    /// where it can run modprobe).
    fn module(self) -> &'static str {
        match self {
            Dump::Unix | Dump::UnixQueues => "unix_diag",
            Dump::Inet { protocol, .. } if i32::from(protocol) == libc::IPPROTO_TCP => "tcp_diag",
            Dump::Inet { .. } => "udp_diag",
        }
    }

    fn request(self) -> SockDiagMessage {
        match self {
            Dump::Unix => SockDiagMessage::UnixRequest(UnixRequest {
                // Every state (the crate names only ESTABLISHED and LISTEN; unbound,
                // unconnected and datagram sockets are TCP_CLOSE).
                state_flags: unix::StateFlags::from_bits_retain(u32::MAX),
                inode: 0,
                show_flags: ShowFlags::NAME | ShowFlags::PEER | ShowFlags::RQLEN | ShowFlags::ICONS,
                cookie: [0xff; 8],
            }),
            Dump::UnixQueues => SockDiagMessage::UnixRequest(UnixRequest {
                state_flags: unix::StateFlags::from_bits_retain(u32::MAX),
                inode: 0,
                show_flags: ShowFlags::RQLEN,
                cookie: [0xff; 8],
            }),
            Dump::Inet { family, protocol } => SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol,
                extensions: ExtensionFlags::empty(),
                states: inet::StateFlags::all(),
                socket_id: if i32::from(family) == libc::AF_INET6 {
                    SocketId::new_v6()
                } else {
                    SocketId::new_v4()
                },
            }),
        }
    }
}

/// The facts of every socket sock_diag knows in one network namespace, by inode.
pub type Table = HashMap<u64, SocketFacts>;

/// What one dump per network namespace says, for the namespaces met so far, each
/// dumped on first need.
struct PerNamespace<T> {
    /// By namespace identity (st_dev, st_ino of `/proc/TID/ns/net`).
    namespaces: HashMap<(u64, u64), T>,
    /// crd's own namespace: no `setns` needed.
    own: Option<(u64, u64)>,
}

impl<T> Default for PerNamespace<T> {
    fn default() -> Self {
        let own = std::fs::metadata("/proc/thread-self/ns/net").ok().map(|m| (m.dev(), m.ino()));
        PerNamespace { namespaces: HashMap::new(), own }
    }
}

impl<T> PerNamespace<T> {
    /// What `dump` says of the namespace thread `tid` is in (`dump` takes the
    /// namespace's path and whether it is crd's own), then every namespace's, in turn.
    fn of(&mut self, tid: Pid, dump: impl FnOnce(&str, bool) -> T) -> impl Iterator<Item = &T> {
        let path = format!("/proc/{}/ns/net", tid.0);
        let netns = std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        if let Some(netns) = netns
            && !self.namespaces.contains_key(&netns)
        {
            let own = self.own == Some(netns);
            self.namespaces.insert(netns, dump(&path, own));
        }
        let first = netns.and_then(|n| self.namespaces.get(&n));
        first
            .into_iter()
            .chain(self.namespaces.iter().filter(move |(n, _)| Some(**n) != netns).map(|(_, t)| t))
    }
}

/// Every socket of the namespaces the harvest met so far, dumped on first need.
#[derive(Default)]
pub struct Sockets(PerNamespace<Table>);

impl Sockets {
    pub fn new() -> Self {
        Self::default()
    }

    /// What sock_diag says of socket inode `ino`, held by thread `tid`. None: sock_diag
    /// does not know it (a family or protocol without a dump here, a diag module
    /// missing, a namespace crd cannot enter — each said once with a warning). A socket
    /// made in another namespace than its holder's present one is found in any
    /// namespace dumped so far.
    pub fn facts(&mut self, tid: Pid, ino: u64) -> Option<&SocketFacts> {
        let dump = |path: &str, own: bool| {
            dump_namespace(path, own).unwrap_or_else(|e| {
                log::warn!("{e}; sockets in that network namespace are listed by family only");
                Table::new()
            })
        };
        self.0.of(tid, dump).find_map(|t| t.get(&ino))
    }
}

/// The bytes queued for reading in each unix socket that is not listening, by inode,
/// in the namespaces met so far (`UNIX_DIAG_RQLEN`'s first number: what FIONREAD says —
/// every byte for stream and seqpacket sockets, the first datagram's for datagram ones).
/// One dump tells it for every socket of a namespace; `crd ls` otherwise copies each
/// socket into itself to ask.
#[derive(Default)]
pub struct UnixReceiveQueues(PerNamespace<HashMap<u64, u32>>);

impl UnixReceiveQueues {
    /// Bytes queued for socket inode `ino`, held by thread `tid`. None: not known (a
    /// listener, a namespace crd cannot enter, no unix_diag).
    pub fn bytes(&mut self, tid: Pid, ino: u64) -> Option<u32> {
        let dump = |path: &str, own: bool| {
            dump_queues(path, own).unwrap_or_else(|e| {
                log::debug!("{e}; unix queues are asked socket by socket");
                HashMap::new()
            })
        };
        self.0.of(tid, dump).find_map(|t| t.get(&ino)).copied()
    }
}

/// A netlink socket for sock_diag in the namespace `/proc/TID/ns/net` names (`own`:
/// crd's own).
fn diag_socket(path: &str, own: bool) -> Result<Socket, SockDiagError> {
    if own {
        Socket::new(NETLINK_SOCK_DIAG).map_err(SockDiagError::Socket)
    } else {
        let target =
            File::open(path).map_err(|source| SockDiagError::Namespace { path: path.to_string(), source })?;
        in_namespace(&target, path, || Socket::new(NETLINK_SOCK_DIAG))?.map_err(SockDiagError::Socket)
    }
}

/// Dumps the receive queues of the unix sockets of the namespace `path` names.
fn dump_queues(path: &str, own: bool) -> Result<HashMap<u64, u32>, SockDiagError> {
    let socket = diag_socket(path, own)?;
    let messages = dump_one(&socket, Dump::UnixQueues)?;
    Ok(messages.iter().filter_map(unix_queued).collect())
}

/// A unix socket's inode and queued bytes, from its answer. None: a listener (the
/// numbers are then its pending connections and backlog), or a socket without inode.
fn unix_queued(message: &SockDiagMessage) -> Option<(u64, u32)> {
    let SockDiagMessage::UnixResponse(r) = message else { return None };
    if r.header.inode == 0 || r.header.state == state::LISTEN {
        return None;
    }
    r.nlas.iter().find_map(|nla| match nla {
        unix::nlas::Nla::ReceiveQueueLength(bytes, _) => Some((u64::from(r.header.inode), *bytes)),
        _ => None,
    })
}

/// Dumps every socket of the namespace `/proc/TID/ns/net` names (`own`: crd's own).
fn dump_namespace(path: &str, own: bool) -> Result<Table, SockDiagError> {
    let socket = diag_socket(path, own)?;
    let mut table = Table::new();
    for dump in DUMPS {
        // One family failing (its diag module missing: ENOENT) leaves the others, and
        // says so: without the dump, its sockets have no peer, name or address, and a
        // connected pair would look held from outside.
        match dump_one(&socket, dump) {
            Ok(messages) => table.extend(messages.iter().filter_map(|m| facts_of(m, dump))),
            Err(e) => log::warn!(
                "{e}; {} sockets are listed by family only (no peer, name or address): load the {} module",
                dump.what(),
                dump.module()
            ),
        }
    }
    Ok(table)
}

/// Runs `f` with the calling thread in the network namespace `target`, and puts the
/// thread back in its own namespace afterwards, whatever `f` did (even a panic).
fn in_namespace<R>(target: &File, path: &str, f: impl FnOnce() -> R) -> Result<R, SockDiagError> {
    const OWN: &str = "/proc/thread-self/ns/net";
    let original =
        File::open(OWN).map_err(|source| SockDiagError::Namespace { path: OWN.to_string(), source })?;
    nix::sched::setns(target.as_fd(), CloneFlags::CLONE_NEWNET)
        .map_err(|source| SockDiagError::Enter { path: path.to_string(), source })?;
    /// Returns to the original namespace on drop.
    struct Back(File);
    impl Drop for Back {
        fn drop(&mut self) {
            if let Err(e) = nix::sched::setns(self.0.as_fd(), CloneFlags::CLONE_NEWNET) {
                // crd must never go on in a target's namespace (its own sockets, its
                // later dumps would be the target's): stop here. Frozen targets are
                // detached by the kernel when crd exits.
                log::error!("cannot return to crd's own network namespace: {e}");
                std::process::abort();
            }
        }
    }
    let _back = Back(original);
    Ok(f())
}

/// One dump: sends the request and gathers every answer until NLMSG_DONE.
fn dump_one(socket: &Socket, dump: Dump) -> Result<Vec<SockDiagMessage>, SockDiagError> {
    let what = dump.what();
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(header, dump.request().into());
    packet.finalize();
    let mut request = vec![0; packet.buffer_len()];
    packet.serialize(&mut request);
    socket.send(&request, 0).map_err(|source| SockDiagError::Io { what, source })?;

    // Dump parts are at most 32 KiB (netlink_dump); MSG_TRUNC makes recv return the real
    // length, so a longer one is caught rather than silently cut.
    let mut buf = vec![0u8; 64 * 1024];
    let mut messages = Vec::new();
    loop {
        buf.clear();
        let len =
            socket.recv(&mut buf, libc::MSG_TRUNC).map_err(|source| SockDiagError::Io { what, source })?;
        if len > buf.capacity() {
            return Err(SockDiagError::Decode { what, reason: format!("a {len}-byte answer was cut") });
        }
        if parse_answers(&buf[..len], what, &mut messages)? {
            return Ok(messages);
        }
    }
}

/// Parses one datagram of a dump into `out`; true when it ends the dump (NLMSG_DONE).
/// A message the crate cannot parse is skipped (with a debug log), not fatal: its socket
/// is then listed by family only.
fn parse_answers(
    mut bytes: &[u8],
    what: &'static str,
    out: &mut Vec<SockDiagMessage>,
) -> Result<bool, SockDiagError> {
    const HEADER: usize = 16;
    while bytes.len() >= HEADER {
        let len = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        if len < HEADER || len > bytes.len() {
            return Err(SockDiagError::Decode {
                what,
                reason: format!("a message of {len} bytes in {}", bytes.len()),
            });
        }
        match NetlinkMessage::<SockDiagMessage>::deserialize(&bytes[..len]) {
            Ok(message) => match message.payload {
                NetlinkPayload::Done(_) => return Ok(true),
                NetlinkPayload::Error(e) => {
                    let errno = e.code.map_or(0, |c| -c.get());
                    return Err(SockDiagError::Refused { what, source: io::Error::from_raw_os_error(errno) });
                }
                NetlinkPayload::InnerMessage(m) => out.push(m),
                _ => {}
            },
            Err(e) => log::debug!("sock_diag {what}: skipped a message: {e}"),
        }
        // Messages are 4-byte aligned.
        let step = len.next_multiple_of(4).min(bytes.len());
        bytes = &bytes[step..];
    }
    Ok(false)
}

/// The inode and facts of one answer to `dump`. None: no inode, or the wrong answer.
fn facts_of(message: &SockDiagMessage, dump: Dump) -> Option<(u64, SocketFacts)> {
    match (message, dump) {
        (SockDiagMessage::UnixResponse(r), Dump::Unix) => unix_facts(r),
        (SockDiagMessage::InetResponse(r), Dump::Inet { protocol, .. }) => inet_facts(r, protocol),
        _ => None,
    }
}

fn unix_facts(r: &UnixResponse) -> Option<(u64, SocketFacts)> {
    let header = &r.header;
    if header.inode == 0 {
        // A connection not yet accepted: it has no socket, so no inode and no fd.
        return None;
    }
    let listening = header.state == state::LISTEN;
    let mut facts = SocketFacts::unknown(Family::Unix);
    facts.sock_type = SockType::from_raw(u16::from(header.kind));
    facts.state = header.state;
    for nla in &r.nlas {
        match nla {
            unix::nlas::Nla::Name(UnixDiagName::Pathname(p)) => {
                facts.name = UnixName::Path(std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str()).to_vec())
            }
            unix::nlas::Nla::Name(UnixDiagName::Abstract(a)) => facts.name = UnixName::Abstract(a.clone()),
            unix::nlas::Nla::Peer(ino) => facts.peer = (*ino != 0).then_some(u64::from(*ino)),
            unix::nlas::Nla::Shutdown(bits) => facts.shutdown = *bits,
            // For a listener: (its receive queue's length — one skb per pending
            // connection —, its backlog); otherwise bytes (see the module docs).
            unix::nlas::Nla::ReceiveQueueLength(rqueue, wqueue) if listening => {
                facts.pending = *rqueue;
                facts.rqueue = *rqueue;
                facts.backlog = *wqueue;
            }
            _ => {}
        }
    }
    Some((u64::from(header.inode), facts))
}

fn inet_facts(r: &InetResponse, protocol: u8) -> Option<(u64, SocketFacts)> {
    let header = &r.header;
    if header.inode == 0 {
        // A connection in the accept queue, a TIME_WAIT socket: no fd holds it.
        return None;
    }
    let family = Family::from_raw(u16::from(header.family));
    let mut facts = SocketFacts::unknown(family);
    facts.sock_type =
        if i32::from(protocol) == libc::IPPROTO_TCP { SockType::Stream } else { SockType::Dgram };
    facts.protocol = u16::from(protocol);
    facts.state = header.state;
    if header.state == state::LISTEN {
        facts.pending = header.recv_queue;
        facts.backlog = header.send_queue;
    }
    let id = &header.socket_id;
    facts.local = Some(SocketAddr::new(id.source_address, id.source_port));
    let connected = id.destination_port != 0 || !is_zero(id.destination_address);
    facts.remote = connected.then_some(SocketAddr::new(id.destination_address, id.destination_port));
    for nla in &r.nlas {
        if let inet::nlas::Nla::Shutdown(bits) = nla {
            facts.shutdown = *bits;
        }
    }
    Some((u64::from(header.inode), facts))
}

fn is_zero(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.octets() == [0; 4],
        IpAddr::V6(a) => a.octets() == [0; 16],
    }
}

/// A socket's family from its `system.sockprotoname` xattr (`/proc/PID/fd/N`), the
/// protocol's name in the kernel (`struct proto::name`): on 6.18 "UNIX-STREAM" (stream)
/// and "UNIX" (datagram and seqpacket), "TCP", "UDP", "TCPv6", "NETLINK", "PACKET"...
/// None: a name this table does not know.
pub fn family_of_protoname(name: &str) -> Option<u16> {
    let family = match name {
        "UNIX" | "UNIX-STREAM" => libc::AF_UNIX,
        "TCP" | "UDP" | "UDP-Lite" | "RAW" | "PING" | "SCTP" | "MPTCP" | "L2TP/IP" => libc::AF_INET,
        "TCPv6" | "UDPv6" | "UDPLITEv6" | "RAWv6" | "PINGv6" | "SCTPv6" | "MPTCPv6" | "L2TP/IPv6" => {
            libc::AF_INET6
        }
        "NETLINK" => libc::AF_NETLINK,
        "PACKET" => libc::AF_PACKET,
        "AF_VSOCK" => libc::AF_VSOCK,
        "ALG" => libc::AF_ALG,
        "XDP" => libc::AF_XDP,
        "KEY" => libc::AF_KEY,
        "TIPC" => libc::AF_TIPC,
        "RDS" => libc::AF_RDS,
        // (libc lacks these four: linux/socket.h's numbers.)
        "KCM" => 41,
        "QIPCRTR" => 42,
        "SMC" | "SMC6" => 43,
        "MCTP" => 45,
        "CAN_RAW" | "CAN_BCM" | "CAN_ISOTP" | "CAN_J1939" => libc::AF_CAN,
        "L2CAP" | "RFCOMM" | "SCO" | "HCI" | "BNEP" | "CMTP" | "HIDP" | "ISO" => libc::AF_BLUETOOTH,
        _ => return None,
    };
    Some(family as u16)
}

/// The `system.sockprotoname` of the socket at `path` (`/proc/PID/fd/N`), without its NUL.
pub fn protoname(path: &str) -> Option<String> {
    let path = std::ffi::CString::new(path).ok()?;
    let name = c"system.sockprotoname";
    let mut buf = [0u8; 64];
    // SAFETY: both names are NUL-terminated C strings that outlive the call, and `buf`
    // is writable for the length passed; the kernel writes at most that many bytes.
    let len = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let len = usize::try_from(len).ok()?.min(buf.len());
    let bytes = &buf[..len];
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    Some(String::from_utf8_lossy(&bytes[..end]).into_owned())
}

/// The type and protocol of a socket sock_diag does not dump (netlink, packet...), with
/// `getsockopt(SO_TYPE, SO_PROTOCOL)` on a copy of the fd (`pidfd_getfd`). None: the
/// process refuses the copy (or exited); the socket is then listed by family only.
pub fn type_and_protocol(tgid: Pid, fd: crate::types::Fd) -> Option<(SockType, u16)> {
    let pidfd = crate::sys::pidfd_open(tgid).ok()?;
    let copy = crate::sys::pidfd_getfd(pidfd.as_fd(), fd).ok()?;
    let get = |option: libc::c_int| -> Option<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `copy` is a live socket fd; `value` and `len` are valid for writes of
        // the size `len` says, and outlive the call.
        let ret = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&copy),
                libc::SOL_SOCKET,
                option,
                (&raw mut value).cast(),
                &raw mut len,
            )
        };
        (ret == 0).then_some(value)
    };
    let sock_type = u16::try_from(get(libc::SO_TYPE)?).ok()?;
    let protocol = u16::try_from(get(libc::SO_PROTOCOL)?).ok()?;
    Some((SockType::from_raw(sock_type), protocol))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use netlink_packet_core::{DoneMessage, ErrorMessage, NLMSG_DONE};
    use netlink_packet_sock_diag::{
        constants::SOCK_DIAG_BY_FAMILY,
        inet::{InetResponseHeader, nlas::Nla as InetNla},
        unix::{UnixResponseHeader, nlas::Nla as UnixNla},
    };

    use super::*;

    fn bytes(payload: NetlinkPayload<SockDiagMessage>) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.flags = netlink_packet_core::NLM_F_MULTIPART;
        let mut message = NetlinkMessage::new(header, payload);
        message.finalize();
        if let NetlinkPayload::InnerMessage(_) = message.payload {
            message.header.message_type = SOCK_DIAG_BY_FAMILY;
        }
        let mut buf = vec![0; message.buffer_len()];
        message.serialize(&mut buf);
        // As the kernel lays them out: each message padded to 4 bytes.
        buf.resize(buf.len().next_multiple_of(4), 0);
        buf
    }

    fn unix_answer(kind: u8, state: u8, inode: u32, nlas: Vec<UnixNla>) -> Vec<u8> {
        bytes(NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(Box::new(UnixResponse {
            header: UnixResponseHeader { kind, state, inode, cookie: [0; 8] },
            nlas: nlas.into(),
        }))))
    }

    fn done() -> Vec<u8> {
        let mut buf = bytes(NetlinkPayload::Done(DoneMessage::default()));
        buf[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        buf
    }

    fn parse_all(buf: &[u8], dump: Dump) -> (bool, Table) {
        let mut messages = Vec::new();
        let done = parse_answers(buf, dump.what(), &mut messages).unwrap();
        (done, messages.iter().filter_map(|m| facts_of(m, dump)).collect())
    }

    #[test]
    fn unix_answers_give_names_peers_shutdown_and_a_listeners_queue() {
        let mut buf = unix_answer(
            libc::SOCK_STREAM as u8,
            state::LISTEN,
            100,
            vec![
                UnixNla::Name(UnixDiagName::Pathname("/run/app.sock".into())),
                UnixNla::ReceiveQueueLength(1, 16),
                UnixNla::PendingConnections(vec![0]),
                UnixNla::Shutdown(0),
            ],
        );
        buf.extend(unix_answer(
            libc::SOCK_SEQPACKET as u8,
            state::ESTABLISHED,
            101,
            vec![
                UnixNla::Name(UnixDiagName::Abstract(b"bus".to_vec())),
                UnixNla::Peer(102),
                UnixNla::ReceiveQueueLength(300, 0),
                UnixNla::Shutdown(crate::kinds::socket::SEND_SHUTDOWN),
            ],
        ));
        buf.extend(unix_answer(libc::SOCK_STREAM as u8, state::ESTABLISHED, 0, vec![UnixNla::Peer(103)]));
        buf.extend(unix_answer(libc::SOCK_DGRAM as u8, state::CLOSE, 104, vec![UnixNla::Peer(0)]));
        buf.extend(done());
        let (done, table) = parse_all(&buf, Dump::Unix);
        assert!(done);
        assert_eq!(table.len(), 3, "the embryo connection (inode 0) has no fd");
        let listener = &table[&100];
        assert_eq!(listener.sock_type, SockType::Stream);
        assert_eq!(listener.name, UnixName::Path(b"/run/app.sock".to_vec()));
        assert_eq!((listener.pending, listener.backlog, listener.rqueue), (1, 16, 1));
        let conn = &table[&101];
        assert_eq!(conn.sock_type, SockType::Seqpacket);
        assert_eq!(conn.name.to_string(), "@bus");
        assert_eq!(conn.peer, Some(102));
        assert_eq!(conn.shutdown, crate::kinds::socket::SEND_SHUTDOWN);
        assert_eq!((conn.pending, conn.backlog, conn.rqueue), (0, 0, 0), "bytes are not messages");
        assert_eq!(table[&104].peer, None);
        assert_eq!(table[&104].state, state::CLOSE);
    }

    fn inet_answer(
        family: u8,
        state: u8,
        id: SocketId,
        queues: (u32, u32),
        inode: u32,
        shutdown: u8,
    ) -> Vec<u8> {
        bytes(NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(Box::new(InetResponse {
            header: InetResponseHeader {
                family,
                state,
                timer: None,
                socket_id: id,
                recv_queue: queues.0,
                send_queue: queues.1,
                uid: 0,
                inode,
            },
            nlas: vec![InetNla::Shutdown(shutdown)].into(),
        }))))
    }

    #[test]
    fn inet_answers_give_addresses_and_a_listeners_backlog() {
        let tcp = Dump::Inet { family: libc::AF_INET as u8, protocol: libc::IPPROTO_TCP as u8 };
        let mut listen = SocketId::new_v4();
        listen.source_address = Ipv4Addr::LOCALHOST.into();
        listen.source_port = 8080;
        let mut conn = listen.clone();
        conn.destination_address = Ipv4Addr::LOCALHOST.into();
        conn.destination_port = 40000;
        let mut buf = inet_answer(libc::AF_INET as u8, state::LISTEN, listen, (2, 128), 7, 0);
        buf.extend(inet_answer(libc::AF_INET as u8, state::ESTABLISHED, conn, (5, 9), 8, 1));
        buf.extend(inet_answer(libc::AF_INET as u8, state::TIME_WAIT, SocketId::new_v4(), (0, 0), 0, 0));
        buf.extend(done());
        let (done, table) = parse_all(&buf, tcp);
        assert!(done);
        assert_eq!(table.len(), 2);
        let l = &table[&7];
        assert_eq!(
            (l.family, l.sock_type, l.protocol),
            (Family::Inet, SockType::Stream, libc::IPPROTO_TCP as u16)
        );
        assert_eq!(l.local, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(l.remote, None);
        assert_eq!((l.pending, l.backlog), (2, 128));
        let c = &table[&8];
        assert_eq!(c.remote, Some("127.0.0.1:40000".parse().unwrap()));
        assert_eq!((c.pending, c.backlog, c.rqueue, c.shutdown), (0, 0, 0, 1));

        let udp6 = Dump::Inet { family: libc::AF_INET6 as u8, protocol: libc::IPPROTO_UDP as u8 };
        let mut bound = SocketId::new_v6();
        bound.source_address = Ipv6Addr::LOCALHOST.into();
        bound.source_port = 5353;
        let (done, table) =
            parse_all(&inet_answer(libc::AF_INET6 as u8, state::CLOSE, bound, (0, 0), 9, 0), udp6);
        assert!(!done, "no NLMSG_DONE yet: the dump goes on");
        let u = &table[&9];
        assert_eq!((u.family, u.sock_type), (Family::Inet6, SockType::Dgram));
        assert_eq!(u.local, Some("[::1]:5353".parse().unwrap()));
    }

    #[test]
    fn a_refused_dump_is_an_error_and_a_cut_message_too() {
        let mut error = ErrorMessage::default();
        error.code = std::num::NonZeroI32::new(-libc::ENOENT);
        let buf = bytes(NetlinkPayload::Error(error));
        let mut out = Vec::new();
        match parse_answers(&buf, "unix", &mut out) {
            Err(SockDiagError::Refused { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT))
            }
            other => panic!("{other:?}"),
        }
        let whole = unix_answer(libc::SOCK_STREAM as u8, state::CLOSE, 5, vec![]);
        assert!(matches!(
            parse_answers(&whole[..whole.len() - 4], "unix", &mut out),
            Err(SockDiagError::Decode { .. })
        ));
    }

    #[test]
    fn protocol_names_give_families() {
        assert_eq!(family_of_protoname("UNIX-STREAM"), Some(libc::AF_UNIX as u16));
        assert_eq!(family_of_protoname("UNIX"), Some(libc::AF_UNIX as u16));
        assert_eq!(family_of_protoname("TCPv6"), Some(libc::AF_INET6 as u16));
        assert_eq!(family_of_protoname("NETLINK"), Some(libc::AF_NETLINK as u16));
        assert_eq!(family_of_protoname("martian"), None);
    }

    #[test]
    fn a_queue_answer_gives_a_sockets_bytes_and_none_for_a_listener() {
        let mut buf = unix_answer(
            libc::SOCK_STREAM as u8,
            state::ESTABLISHED,
            7,
            vec![UnixNla::ReceiveQueueLength(11, 0)],
        );
        buf.extend(unix_answer(
            libc::SOCK_STREAM as u8,
            state::LISTEN,
            8,
            vec![UnixNla::ReceiveQueueLength(2, 128)],
        ));
        buf.extend(unix_answer(libc::SOCK_STREAM as u8, state::ESTABLISHED, 9, vec![]));
        buf.extend(done());
        let mut messages = Vec::new();
        assert!(parse_answers(&buf, Dump::UnixQueues.what(), &mut messages).unwrap());
        let queued: HashMap<u64, u32> = messages.iter().filter_map(unix_queued).collect();
        assert_eq!(
            queued,
            HashMap::from([(7, 11)]),
            "a listener's numbers are not bytes; no answer, no count"
        );
    }

    #[test]
    fn this_process_unix_queues_are_dumped_from_its_own_namespace() {
        use std::{
            io::Write,
            os::{fd::AsRawFd, unix::fs::MetadataExt},
        };
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.write_all(b"hello").unwrap();
        let ino = |fd: i32| std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino();
        let mut queues = UnixReceiveQueues::default();
        let me = Pid(std::process::id());
        let Some(to_b) = queues.bytes(me, ino(b.as_raw_fd())) else {
            eprintln!("skipped: unix_diag is not available here");
            return;
        };
        assert_eq!(to_b, 5);
        assert_eq!(queues.bytes(me, ino(a.as_raw_fd())), Some(0));
    }

    #[test]
    fn this_process_sockets_are_dumped_from_its_own_namespace() {
        use std::os::{fd::AsRawFd, unix::fs::MetadataExt};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let ino = |fd: i32| std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino();
        let path = format!("/proc/self/fd/{}", a.as_raw_fd());
        // 6.x names a unix stream socket's protocol UNIX-STREAM; 5.10 says UNIX.
        assert!(
            matches!(protoname(&path).as_deref(), Some("UNIX-STREAM" | "UNIX")),
            "{:?}",
            protoname(&path)
        );
        let mut sockets = Sockets::new();
        let me = Pid(std::process::id());
        let Some(l) = sockets.facts(me, ino(listener.as_raw_fd())).cloned() else {
            eprintln!("skipped: sock_diag is not available here");
            return;
        };
        assert_eq!(l.local, listener.local_addr().ok());
        assert_eq!(l.state, state::LISTEN);
        let pair = sockets.facts(me, ino(a.as_raw_fd())).cloned().expect("unix_diag answers too");
        assert_eq!(pair.sock_type, SockType::Stream);
        assert_eq!(pair.peer, Some(ino(_b.as_raw_fd())));
    }
}
