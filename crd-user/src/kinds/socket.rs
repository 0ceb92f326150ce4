//! What every socket family shares: the facts a harvest reads of one socket
//! ([`SocketFacts`]: from the BPF [`crd_common::SocketTail`], or from sock_diag in the
//! /proc harvester — the two must agree), the names of families, types and states, and
//! the kind for sockets of families crd does not make ([`OtherSocket`]: netlink, packet,
//! vsock...), which is listed with its family and refused at restore by name.
//!
//! A socket is one inode of sockfs with exactly one open file description
//! (`sock_alloc_file`; `/proc/PID/fd/N` cannot be reopened), so its object is its inode.
//! The unix and inet kinds (`unix.rs`, `inet.rs`) build on these facts.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use super::{FileKind, Identity, KindError, ObjectStore, OpenArgs, Opened, ProcSlot, Recognise};

/// `sk_state` values (include/net/tcp_states.h); unix sockets use three of them.
pub mod state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
}

/// `sk_shutdown` bits.
pub const RCV_SHUTDOWN: u8 = 1;
pub const SEND_SHUTDOWN: u8 = 2;

/// A socket's family (`sk_family`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Family {
    Unix,
    Inet,
    Inet6,
    /// Any other `AF_*` number.
    Other(u16),
}

impl Family {
    pub fn from_raw(family: u16) -> Self {
        match i32::from(family) {
            libc::AF_UNIX => Family::Unix,
            libc::AF_INET => Family::Inet,
            libc::AF_INET6 => Family::Inet6,
            _ => Family::Other(family),
        }
    }

    pub fn raw(self) -> u16 {
        match self {
            Family::Unix => libc::AF_UNIX as u16,
            Family::Inet => libc::AF_INET as u16,
            Family::Inet6 => libc::AF_INET6 as u16,
            Family::Other(raw) => raw,
        }
    }

    /// The family's name as lsof and ss say it (`unix`, `IPv4`, `netlink`...).
    pub fn name(self) -> String {
        let known = match i32::from(self.raw()) {
            libc::AF_UNIX => "unix",
            libc::AF_INET => "IPv4",
            libc::AF_INET6 => "IPv6",
            libc::AF_NETLINK => "netlink",
            libc::AF_PACKET => "packet",
            libc::AF_VSOCK => "vsock",
            libc::AF_BLUETOOTH => "bluetooth",
            libc::AF_ALG => "alg",
            libc::AF_XDP => "xdp",
            libc::AF_CAN => "can",
            libc::AF_TIPC => "tipc",
            libc::AF_KEY => "key",
            libc::AF_NFC => "nfc",
            libc::AF_RDS => "rds",
            _ => return format!("family {}", self.raw()),
        };
        known.to_string()
    }
}

/// A socket's type (`sk_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SockType {
    Stream,
    Dgram,
    Seqpacket,
    Raw,
    Other(u16),
}

impl SockType {
    pub fn from_raw(raw: u16) -> Self {
        match i32::from(raw) {
            libc::SOCK_STREAM => SockType::Stream,
            libc::SOCK_DGRAM => SockType::Dgram,
            libc::SOCK_SEQPACKET => SockType::Seqpacket,
            libc::SOCK_RAW => SockType::Raw,
            _ => SockType::Other(raw),
        }
    }

    pub fn raw(self) -> i32 {
        match self {
            SockType::Stream => libc::SOCK_STREAM,
            SockType::Dgram => libc::SOCK_DGRAM,
            SockType::Seqpacket => libc::SOCK_SEQPACKET,
            SockType::Raw => libc::SOCK_RAW,
            SockType::Other(raw) => i32::from(raw),
        }
    }

    /// Whether the socket keeps message boundaries (each queued message is re-sent as one).
    pub fn has_boundaries(self) -> bool {
        !matches!(self, SockType::Stream)
    }
}

impl fmt::Display for SockType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SockType::Stream => f.write_str("stream"),
            SockType::Dgram => f.write_str("dgram"),
            SockType::Seqpacket => f.write_str("seqpacket"),
            SockType::Raw => f.write_str("raw"),
            SockType::Other(raw) => write!(f, "type {raw}"),
        }
    }
}

/// A unix socket's name: what `bind` gave it (or, for an accepted connection, what its
/// listener's name is).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum UnixName {
    /// Not bound (socketpair ends, clients).
    #[default]
    Unnamed,
    /// A path in the filesystem.
    Path(Vec<u8>),
    /// An abstract name (without its leading NUL byte).
    Abstract(Vec<u8>),
}

impl UnixName {
    /// From the bytes of `sun_path`, `len` of them (as `unix_address::len` minus the
    /// family, or `addrlen` minus the family from getsockname).
    pub fn from_sun_path(path: &[u8]) -> Self {
        match path.split_first() {
            None => UnixName::Unnamed,
            Some((0, rest)) => UnixName::Abstract(rest.to_vec()),
            Some(_) => {
                let len = path.iter().position(|&b| b == 0).unwrap_or(path.len());
                UnixName::Path(path[..len].to_vec())
            }
        }
    }

    pub fn is_named(&self) -> bool {
        !matches!(self, UnixName::Unnamed)
    }
}

impl fmt::Display for UnixName {
    /// As lsof and ss print it: the path, `@name` for an abstract name, nothing unnamed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnixName::Unnamed => Ok(()),
            UnixName::Path(p) => f.write_str(&String::from_utf8_lossy(p)),
            UnixName::Abstract(p) => write!(f, "@{}", String::from_utf8_lossy(p).replace('\0', "@")),
        }
    }
}

/// What a harvest reads of one socket, whatever harvester read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketFacts {
    pub family: Family,
    pub sock_type: SockType,
    pub protocol: u16,
    /// `sk_state` (see [`state`]).
    pub state: u8,
    /// `sk_shutdown` bits.
    pub shutdown: u8,
    /// A listener's backlog (`sk_max_ack_backlog`); 0 for a socket that is not listening
    /// (the kernel keeps other values there: `net.unix.max_dgram_qlen` for every unix
    /// socket, the listener's backlog for an accepted TCP connection).
    pub backlog: u32,
    /// A listener's connections waiting to be accepted (TCP: `sk_ack_backlog`; unix:
    /// `sk_receive_queue.qlen`, one skb per connection); 0 for any other socket.
    pub pending: u32,
    /// Messages (skbs) queued for reading, `sk_receive_queue.qlen`, for the sockets crd
    /// uses it for: a unix listener (its pending connections) and a unix datagram or
    /// seqpacket socket (checked against the messages a save peeks). BPF reads it only
    /// for those (0 otherwise: each field is a cache miss on the `sock`). The /proc
    /// harvester (sock_diag) can count messages only for a unix listener; for every
    /// other socket sock_diag counts bytes, so /proc says 0: the harvesters agree on it
    /// for listeners, stream sockets and empty queues.
    pub rqueue: u32,
    /// unix: the peer socket's inode number, when the peer has one.
    pub peer: Option<u64>,
    /// unix: the bound name.
    pub name: UnixName,
    /// inet: local address and port.
    pub local: Option<SocketAddr>,
    /// inet: remote address and port (None: not connected).
    pub remote: Option<SocketAddr>,
}

impl SocketFacts {
    /// From the BPF record's socket tail. None: the tail is too short.
    pub fn from_tail(bytes: &[u8]) -> Option<Self> {
        let t: crd_common::SocketTail = super::tail(bytes)?;
        let family = Family::from_raw(t.family);
        let addr = |bytes: [u8; 16], port: u16| -> Option<SocketAddr> {
            let ip = match family {
                Family::Inet => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
                Family::Inet6 => IpAddr::V6(Ipv6Addr::from(bytes)),
                _ => return None,
            };
            Some(SocketAddr::new(ip, port))
        };
        let connected = t.remote_port != 0 || t.remote_addr != [0; 16];
        let name_len = (t.name_len as usize).saturating_sub(std::mem::size_of::<libc::sa_family_t>());
        // Backlog and pending mean something for listeners only (see the fields).
        let listening = t.state == state::LISTEN;
        let pending = match (listening, family) {
            (false, _) => 0,
            (true, Family::Unix) => t.rqueue,
            (true, _) => t.pending,
        };
        Some(SocketFacts {
            family,
            sock_type: SockType::from_raw(t.sock_type),
            protocol: t.protocol,
            state: t.state,
            shutdown: t.shutdown,
            backlog: if listening { t.backlog } else { 0 },
            pending,
            rqueue: t.rqueue,
            // The tail names the peer by its `struct sock`: the BPF harvester maps it to
            // an inode once every record is in (harvest::bpf::UnixPeers).
            peer: None,
            name: if family == Family::Unix {
                UnixName::from_sun_path(&t.name[..name_len.min(t.name.len())])
            } else {
                UnixName::Unnamed
            },
            local: addr(t.local_addr, t.local_port),
            remote: if connected { addr(t.remote_addr, t.remote_port) } else { None },
        })
    }

    /// A socket of `family` whose facts the harvester could not read (sock_diag did not
    /// answer for it).
    pub fn unknown(family: Family) -> Self {
        SocketFacts {
            family,
            sock_type: SockType::Other(0),
            protocol: 0,
            state: 0,
            shutdown: 0,
            backlog: 0,
            pending: 0,
            rqueue: 0,
            peer: None,
            name: UnixName::Unnamed,
            local: None,
            remote: None,
        }
    }

    pub fn is_listening(&self) -> bool {
        self.state == state::LISTEN
    }
}

/// A socket of a family crd does not make: listed with its family, refused at restore.
pub struct OtherSocket;

/// What an image holds of such a socket: enough to name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtherSocketState {
    /// None: the harvest could not read the socket's family.
    pub family: Option<Family>,
    pub sock_type: Option<SockType>,
    pub protocol: u16,
}

impl OtherSocketState {
    fn what(&self) -> String {
        match self.family {
            Some(family) => format!("{} sockets", family.name()),
            None => "sockets whose family the harvest could not read".into(),
        }
    }
}

impl FileKind for OtherSocket {
    const NAME: &'static str = "socket";
    const HAS_PATH: bool = false;
    const IDENTITY: Identity = Identity::Inode;
    type Live = Option<SocketFacts>;
    type Saved = OtherSocketState;

    fn recognise(r: &Recognise<'_>) -> bool {
        r.file_type() == libc::S_IFSOCK
    }

    fn from_bpf(_record: &crd_common::FdRecord, tail: &[u8]) -> Option<Option<SocketFacts>> {
        Some(SocketFacts::from_tail(tail))
    }

    fn from_proc(slot: &ProcSlot<'_>) -> Option<SocketFacts> {
        slot.socket.cloned()
    }

    fn sketch(live: &Option<SocketFacts>) -> OtherSocketState {
        OtherSocketState {
            family: live.as_ref().map(|f| f.family),
            sock_type: live.as_ref().map(|f| f.sock_type),
            protocol: live.as_ref().map_or(0, |f| f.protocol),
        }
    }

    fn detail(saved: &OtherSocketState) -> Option<String> {
        let family = saved.family?;
        Some(match saved.sock_type {
            Some(t) => format!("{} {t} protocol {}", family.name(), saved.protocol),
            None => family.name(),
        })
    }

    fn refusal(saved: &OtherSocketState) -> Option<String> {
        Some(format!(
            "crd does not recreate {} (only unix, TCP and UDP); `crd graft` hands the live one over",
            saved.what()
        ))
    }

    fn open(
        saved: &OtherSocketState,
        _args: &OpenArgs<'_>,
        _store: &mut ObjectStore,
    ) -> Result<Opened, KindError> {
        Err(KindError::Other(Self::refusal(saved).unwrap_or_default()))
    }

    fn same(a: &OtherSocketState, b: &OtherSocketState) -> Result<(), String> {
        if a != b {
            return Err(format!("socket {a:?} vs {b:?}"));
        }
        Ok(())
    }
}
